//! l4 (in progress).
