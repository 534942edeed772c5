//! Connection limits of one listener: at most `max-connections` client connections open at
//! once, and at most `max-connections-per-source` from one source address.
//!
//! The accept loop asks [`ConnectionLimits::admit`] for every accepted connection. Over a limit
//! the connection is closed at once, before any byte is read or a TLS handshake is made, and
//! counted (RejectedConnectionCount). Under it the connection gets a [`ConnectionSlot`] that
//! gives its place back when dropped: when the connection ends, or, for a connection that
//! became a WebSocket tunnel, when the tunnel ends.
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Open connections of one listener and its limits.
#[derive(Debug)]
pub(super) struct ConnectionLimits {
    max_total: Option<usize>,
    max_per_source: Option<usize>,
    open: Arc<Mutex<Open>>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// Only kept when there is a per-source limit.
    per_source: HashMap<IpAddr, usize>,
}

/// Which limit a rejected connection hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OverLimit {
    /// `max-connections` (the value).
    Listener(usize),
    /// `max-connections-per-source` (the value).
    Source(usize),
}

impl fmt::Display for OverLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Listener(n) => write!(f, "max-connections={n}"),
            Self::Source(n) => write!(f, "max-connections-per-source={n}"),
        }
    }
}

/// One admitted connection's place under the limits; released on drop.
#[derive(Debug)]
pub(super) struct ConnectionSlot {
    open: Arc<Mutex<Open>>,
    /// The source address, when the per-source count includes this connection.
    source: Option<IpAddr>,
}

fn lock(open: &Mutex<Open>) -> MutexGuard<'_, Open> {
    // Plain counters: a panic elsewhere leaves them usable.
    open.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ConnectionLimits {
    /// Limits as configured on the listener (`None`: no limit).
    pub(super) fn new(max_total: Option<usize>, max_per_source: Option<usize>) -> Self {
        Self {
            max_total,
            max_per_source,
            open: Arc::default(),
        }
    }

    /// Takes a place for a new connection from `source`, or says which limit is reached.
    pub(super) fn admit(&self, source: IpAddr) -> Result<ConnectionSlot, OverLimit> {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d: one source.
        let source = source.to_canonical();
        let mut open = lock(&self.open);
        if let Some(max) = self.max_total
            && open.total >= max
        {
            return Err(OverLimit::Listener(max));
        }
        let counted_source = match self.max_per_source {
            Some(max) => {
                let n = open.per_source.entry(source).or_default();
                if *n >= max {
                    return Err(OverLimit::Source(max));
                }
                *n += 1;
                Some(source)
            }
            None => None,
        };
        open.total += 1;
        Ok(ConnectionSlot {
            open: Arc::clone(&self.open),
            source: counted_source,
        })
    }

    /// Connections open now (ActiveConnectionCount).
    pub(super) fn open(&self) -> usize {
        lock(&self.open).total
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        open.total = open.total.saturating_sub(1);
        if let Some(source) = self.source
            && let Some(n) = open.per_source.get_mut(&source)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_source.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn no_limits_admit_everything() {
        let limits = ConnectionLimits::new(None, None);
        let slots: Vec<_> = (0..1000)
            .map(|_| limits.admit(ip("10.0.0.1")).expect("admitted"))
            .collect();
        assert_eq!(limits.open(), 1000);
        drop(slots);
        assert_eq!(limits.open(), 0);
    }

    #[test]
    fn the_listener_limit_rejects_beyond_it_and_frees_on_drop() {
        let limits = ConnectionLimits::new(Some(2), None);
        let a = limits.admit(ip("10.0.0.1")).expect("first");
        let _b = limits.admit(ip("10.0.0.2")).expect("second");
        assert_eq!(
            limits.admit(ip("10.0.0.3")).err(),
            Some(OverLimit::Listener(2))
        );
        drop(a);
        assert!(limits.admit(ip("10.0.0.3")).is_ok(), "a place was freed");
    }

    #[test]
    fn the_per_source_limit_counts_each_source_separately() {
        let limits = ConnectionLimits::new(Some(10), Some(2));
        let a1 = limits.admit(ip("10.0.0.1")).expect("a1");
        let _a2 = limits.admit(ip("10.0.0.1")).expect("a2");
        assert_eq!(
            limits.admit(ip("10.0.0.1")).err(),
            Some(OverLimit::Source(2))
        );
        let _b1 = limits.admit(ip("10.0.0.2")).expect("another source");
        drop(a1);
        let _a3 = limits.admit(ip("10.0.0.1")).expect("a place was freed");
        assert_eq!(limits.open(), 3);
    }

    #[test]
    fn a_mapped_ipv4_address_is_the_same_source() {
        let limits = ConnectionLimits::new(None, Some(1));
        let _a = limits.admit(ip("192.0.2.1")).expect("first");
        assert_eq!(
            limits.admit(ip("::ffff:192.0.2.1")).err(),
            Some(OverLimit::Source(1))
        );
    }

    #[test]
    fn a_rejected_connection_holds_no_place() {
        let limits = ConnectionLimits::new(Some(1), Some(1));
        let _a = limits.admit(ip("10.0.0.1")).expect("first");
        for _ in 0..5 {
            assert!(limits.admit(ip("10.0.0.2")).is_err());
        }
        assert_eq!(limits.open(), 1);
        assert!(!lock(&limits.open).per_source.contains_key(&ip("10.0.0.2")));
    }
}
