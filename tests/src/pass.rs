//! The `lb_pass` attachment on veth peers, provided by the `lb` library.

/// Attaches `lb_pass` to `iface` in the calling thread's namespace; detached when the returned
/// guard drops (drop it in the same namespace's thread, as [`crate::topology`] does).
pub fn attach_pass(iface: &str) -> anyhow::Result<lb::dataplane::PassGuard> {
    Ok(lb::dataplane::attach_pass(iface)?)
}
