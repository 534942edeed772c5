//! Listens for ICMP "protocol unreachable" answers to our IP-in-IP packets: what a backend
//! without `lb decap` (and without an ipip driver) sends when an encapsulated probe reaches
//! its kernel (RFC 1122 §3.2.2.1: a host answers an unknown protocol with code 2). A
//! data-path check that times out while such answers arrive from the target is a missing
//! decapsulator, not a dead application.
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::io::unix::AsyncFd;

/// When each backend last answered IP-in-IP with protocol unreachable.
#[derive(Debug, Default)]
pub struct IcmpWatch {
    seen: Mutex<HashMap<Ipv4Addr, Instant>>,
}

impl IcmpWatch {
    /// Whether `backend` answered IP-in-IP with protocol unreachable since `since`.
    pub fn refused_ipip_since(&self, backend: Ipv4Addr, since: Instant) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&backend)
            .is_some_and(|t| *t >= since)
    }

    fn record(&self, backend: Ipv4Addr) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(backend, Instant::now());
    }

    /// Opens a raw ICMP socket (needs CAP_NET_RAW) and records answers until the task is
    /// dropped. Returns an error if the socket cannot be opened.
    pub fn start(self: &Arc<Self>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        // SAFETY: plain socket call; the descriptor is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `owned` is open and stays so, with the same descriptor, as long as the
        // AsyncFd that owns it.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let me = Arc::clone(self);
        Ok(tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok(mut ready) = fd.readable().await else {
                    return;
                };
                // SAFETY: reading into a buffer of the size passed, from our descriptor.
                let n = unsafe {
                    libc::recv(
                        fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                if n < 0 {
                    ready.clear_ready();
                    continue;
                }
                if let Some(backend) = ipip_refused_by(&buf[..n as usize]) {
                    me.record(backend);
                }
            }
        }))
    }
}

/// If `packet` (an IPv4 datagram as a raw socket delivers it) is ICMP destination unreachable
/// / protocol unreachable quoting an IP-in-IP packet, the quoted packet's destination: the
/// backend that does not decapsulate.
pub fn ipip_refused_by(packet: &[u8]) -> Option<Ipv4Addr> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let icmp = packet.get(ihl..)?;
    let (kind, code) = (*icmp.first()?, *icmp.get(1)?);
    if kind != 3 || code != 2 {
        return None;
    }
    let quoted = icmp.get(8..)?;
    if quoted.len() < 20 || quoted[0] >> 4 != 4 || quoted[9] != lb_common::IPPROTO_IPIP {
        return None;
    }
    Some(Ipv4Addr::new(
        quoted[16], quoted[17], quoted[18], quoted[19],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn icmp(kind: u8, code: u8, quoted_proto: u8) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 11, 10, 0, 0, 2,
        ];
        p.extend_from_slice(&[kind, code, 0, 0, 0, 0, 0, 0]);
        let mut quoted = vec![0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, quoted_proto, 0, 0];
        quoted.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 11]);
        p.extend_from_slice(&quoted);
        p.extend_from_slice(&[0; 8]);
        p
    }

    #[test]
    fn protocol_unreachable_for_ipip_names_the_backend() {
        assert_eq!(
            ipip_refused_by(&icmp(3, 2, 4)),
            Some(Ipv4Addr::new(10, 0, 0, 11))
        );
    }

    #[test]
    fn other_icmp_is_ignored() {
        assert_eq!(ipip_refused_by(&icmp(3, 3, 4)), None, "port unreachable");
        assert_eq!(
            ipip_refused_by(&icmp(3, 2, 6)),
            None,
            "quotes TCP, not IPIP"
        );
        assert_eq!(ipip_refused_by(&icmp(0, 0, 4)), None, "echo reply");
        assert_eq!(ipip_refused_by(&[0x45, 0, 0]), None, "truncated");
        assert_eq!(
            ipip_refused_by(&icmp(3, 2, 4)[..30]),
            None,
            "quote cut short"
        );
    }
}
