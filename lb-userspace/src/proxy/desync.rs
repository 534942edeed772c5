//! desync (in progress).
