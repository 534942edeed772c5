//! The `lb_pass` attachment on veth peers, provided by the `lb` library.
//!
//! Until `lb::dataplane::attach_pass` lands in main, this fails with a clear message.

/// Attaches `lb_pass` to `iface` in the calling thread's namespace; detaches on drop.
pub fn attach_pass(iface: &str) -> anyhow::Result<Box<dyn std::any::Any>> {
    anyhow::bail!("lb::dataplane::attach_pass({iface}) has not landed in lb-userspace yet")
}
