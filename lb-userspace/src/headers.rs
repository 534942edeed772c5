//! headers (in progress).
