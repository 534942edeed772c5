//! targets (in progress).
