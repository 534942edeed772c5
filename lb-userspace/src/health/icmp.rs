//! Listens for the answers a backend without `lb decap` (and without a tunnel driver) sends
//! when an encapsulated probe reaches its kernel: ICMP "protocol unreachable" for IP-in-IP
//! (RFC 1122 §3.2.2.1: a host answers an unknown protocol with code 2), ICMPv6 "parameter
//! problem, unrecognised next header" for IPv6 outer headers (RFC 4443 §3.4). A data-path
//! check that times out while such answers arrive from the target is a missing decapsulator,
//! not a dead application.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::io::unix::AsyncFd;

/// When each backend last refused an encapsulated packet.
#[derive(Debug, Default)]
pub struct IcmpWatch {
    seen: Mutex<HashMap<IpAddr, Instant>>,
}

impl IcmpWatch {
    /// Whether `backend` refused an encapsulated packet (ICMP protocol unreachable, ICMPv6
    /// unrecognised next header) since `since`.
    pub fn refused_tunnel_since(&self, backend: IpAddr, since: Instant) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&backend)
            .is_some_and(|t| *t >= since)
    }

    fn record(&self, backend: IpAddr) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(backend, Instant::now());
    }

    /// Opens raw ICMP and ICMPv6 sockets (needs CAP_NET_RAW) and records answers until the
    /// task is dropped. Returns an error if the ICMP socket cannot be opened; without an ICMPv6
    /// socket (no IPv6 on the host) only IPv4 answers are read.
    pub fn start(self: &Arc<Self>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let v4 = self.listen(libc::AF_INET, libc::IPPROTO_ICMP, |p| {
            ipip_refused_by(p).map(IpAddr::V4)
        })?;
        let v6 = self
            .listen(libc::AF_INET6, libc::IPPROTO_ICMPV6, |p| {
                ip6_tunnel_refused_by(p).map(IpAddr::V6)
            })
            .inspect_err(|e| tracing::debug!(error = %e, "no ICMPv6 watch"))
            .ok();
        Ok(tokio::spawn(async move {
            let _ = v4.await;
            if let Some(v6) = v6 {
                v6.abort();
            }
        }))
    }

    /// One raw socket of `family` for `protocol`, each packet read given to `refused_by`.
    fn listen(
        self: &Arc<Self>,
        family: libc::c_int,
        protocol: libc::c_int,
        refused_by: fn(&[u8]) -> Option<IpAddr>,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        // SAFETY: plain socket call; the descriptor is owned right below.
        let fd = unsafe {
            libc::socket(
                family,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                protocol,
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
                if let Some(backend) = refused_by(&buf[..n as usize]) {
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

/// If `icmp6` (an ICMPv6 message as a raw ICMPv6 socket delivers it: no IPv6 header) is
/// parameter problem / unrecognised next header pointing at the next-header field of a quoted
/// IPv6 packet that carries IPv6 or IPv4 (our encapsulations), the quoted packet's
/// destination: the backend that does not decapsulate.
pub fn ip6_tunnel_refused_by(icmp6: &[u8]) -> Option<Ipv6Addr> {
    let (kind, code) = (*icmp6.first()?, *icmp6.get(1)?);
    if kind != 4 || code != 1 {
        return None;
    }
    let pointer = u32::from_be_bytes(icmp6.get(4..8)?.try_into().ok()?);
    let quoted = icmp6.get(8..)?;
    if quoted.len() < 40 || quoted[0] >> 4 != 6 || pointer != 6 {
        return None;
    }
    if quoted[6] != lb_common::IPPROTO_IPV6 && quoted[6] != lb_common::IPPROTO_IPIP {
        return None;
    }
    let dst: [u8; 16] = quoted[24..40].try_into().ok()?;
    Some(Ipv6Addr::from(dst))
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

    /// ICMPv6 `kind`/`code` with `pointer`, quoting an IPv6 header with next header `next`
    /// from 2001:db8::2 to 2001:db8::11.
    fn icmp6(kind: u8, code: u8, pointer: u32, next: u8) -> Vec<u8> {
        let mut p = vec![kind, code, 0, 0];
        p.extend_from_slice(&pointer.to_be_bytes());
        p.extend_from_slice(&[0x60, 0, 0, 0, 0, 40, next, 64]);
        p.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&"2001:db8::11".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&[0; 40]);
        p
    }

    #[test]
    fn unrecognised_next_header_for_our_encapsulations_names_the_backend() {
        let backend: Ipv6Addr = "2001:db8::11".parse().unwrap();
        assert_eq!(ip6_tunnel_refused_by(&icmp6(4, 1, 6, 41)), Some(backend));
        assert_eq!(ip6_tunnel_refused_by(&icmp6(4, 1, 6, 4)), Some(backend));
    }

    #[test]
    fn other_icmpv6_is_ignored() {
        assert_eq!(
            ip6_tunnel_refused_by(&icmp6(4, 1, 6, 6)),
            None,
            "quotes TCP"
        );
        assert_eq!(
            ip6_tunnel_refused_by(&icmp6(4, 0, 6, 41)),
            None,
            "erroneous header field"
        );
        assert_eq!(
            ip6_tunnel_refused_by(&icmp6(4, 1, 40, 41)),
            None,
            "points past the fixed header: an extension header's next header"
        );
        assert_eq!(
            ip6_tunnel_refused_by(&icmp6(1, 4, 0, 41)),
            None,
            "port unreachable"
        );
        assert_eq!(
            ip6_tunnel_refused_by(&icmp6(4, 1, 6, 41)[..40]),
            None,
            "quote cut short"
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
