//! dataplane (in progress).
