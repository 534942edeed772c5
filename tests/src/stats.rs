//! Reading `lb stats --json` (shape to be confirmed when the daemon lands).
