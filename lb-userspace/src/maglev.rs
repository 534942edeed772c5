//! Maglev consistent hashing (in progress).
