//! Empty library target: lets `lb-userspace` name this crate as a build dependency so cargo
//! rebuilds it when the programs (the binary target, built by aya-build) change.
#![no_std]
