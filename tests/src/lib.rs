//! Test harness: network-namespace topologies and small servers.
