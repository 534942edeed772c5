//! The host's networking as `lb run` sees it: interface addresses, routes, and the neighbour
//! entries `bpf_fib_lookup` needs (ARP for IPv4, neighbour discovery for IPv6).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Addresses of `iface`, IPv4 and IPv6, in the order the kernel lists them. IPv6 link-local
/// addresses are left out: they cannot be the outer source of packets that are routed.
pub fn iface_addrs(iface: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() == iface.as_bytes() && !ifa.ifa_addr.is_null() {
            // SAFETY: non-null sockaddr from the list.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET means the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 means the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if !a.is_unicast_link_local() {
                    out.push(IpAddr::V6(a));
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// `-4` or `-6` for `ip(8)`.
fn family_flag(addr: IpAddr) -> &'static str {
    if addr.is_ipv6() { "-6" } else { "-4" }
}

/// The device and next hop the kernel routes `addr` through (packets with socket mark
/// `mark`, if given): `ip route get`.
pub fn route_to(addr: IpAddr, mark: Option<u32>) -> Option<(String, IpAddr)> {
    let mut cmd = Command::new("ip");
    cmd.args([family_flag(addr), "-o", "route", "get", &addr.to_string()]);
    if let Some(m) = mark {
        cmd.args(["mark", &m.to_string()]);
    }
    let out = cmd.output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |k: &str| {
        words
            .iter()
            .position(|w| *w == k)
            .and_then(|i| words.get(i + 1))
            .map(|s| s.to_string())
    };
    let dev = after("dev")?;
    let hop = after("via").and_then(|v| v.parse().ok()).unwrap_or(addr);
    Some((dev, hop))
}

/// What `ip neigh show` says of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeighState {
    /// No entry.
    Absent,
    /// An entry, with its state words (`PERMANENT`, `REACHABLE`, `STALE`, `FAILED`, …).
    Present(String),
}

/// Parses one line of `ip neigh show ADDR dev DEV`.
pub fn parse_neigh(line: &str) -> NeighState {
    let line = line.trim();
    if line.is_empty() {
        return NeighState::Absent;
    }
    let state: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    NeighState::Present(state.join(" "))
}

/// Kernel neighbour entries of kind `managed` for backends (and their gateways), so that
/// `bpf_fib_lookup` in lb_xdp finds a MAC address before the first packet of a flow instead of
/// dropping it as `drop_no_route`. The kernel keeps managed entries resolved by itself.
///
/// An entry that exists already, whoever made it and in whatever state, is left exactly as
/// it is: a permanent entry the operator wrote for a next hop that does not answer ARP must
/// not be replaced by one that never resolves. At shutdown only the entries `lb` created are
/// deleted.
///
/// The entries created are also written to a record file (next to the admin socket), so that
/// a run after a crash or after `--keep-dataplane` knows which of the managed entries it finds
/// are `lb`'s: it takes them over and removes them at its own clean shutdown. A recorded entry
/// that is no longer `managed` (the operator replaced it meanwhile) is not taken over.
#[derive(Debug, Default)]
pub struct Neighbours {
    /// (address, device) entries we created, deleted again at shutdown.
    created: Vec<(IpAddr, String)>,
    /// Where `created` is recorded; `None`: nowhere.
    record: Option<PathBuf>,
}

/// The record of the neighbour entries an `lb run` with this admin socket created.
pub fn neighbour_record(admin_socket: &Path) -> PathBuf {
    let mut p = admin_socket.as_os_str().to_owned();
    p.push(".neighbours");
    PathBuf::from(p)
}

/// The line `ip neigh show` prints for `hop` on `dev` (empty: no entry), or `None` if the
/// table cannot be read.
fn show_neigh(hop: IpAddr, dev: &str) -> Option<String> {
    let o = Command::new("ip")
        .args([
            family_flag(hop),
            "neigh",
            "show",
            &hop.to_string(),
            "dev",
            dev,
        ])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

impl Neighbours {
    /// Neighbour entries recorded in `record`: those a previous run recorded that are still
    /// `managed` are taken over as this run's own.
    pub fn with_record(record: PathBuf) -> Self {
        let mut n = Self {
            created: Vec::new(),
            record: Some(record.clone()),
        };
        for line in std::fs::read_to_string(&record).unwrap_or_default().lines() {
            let mut w = line.split_whitespace();
            let (Some(Ok(hop)), Some(dev)) = (w.next().map(str::parse::<IpAddr>), w.next()) else {
                continue;
            };
            let still_ours =
                show_neigh(hop, dev).is_some_and(|l| l.split_whitespace().any(|w| w == "managed"));
            if still_ours {
                tracing::info!(%hop, %dev, "taking over the managed neighbour entry a previous lb run created");
                n.created.push((hop, dev.to_owned()));
            }
        }
        n.save();
        n
    }

    /// Writes the record (or removes it when nothing is recorded).
    fn save(&self) {
        let Some(path) = &self.record else {
            return;
        };
        if self.created.is_empty() {
            let _ = std::fs::remove_file(path);
            return;
        }
        let text: String = self
            .created
            .iter()
            .map(|(hop, dev)| format!("{hop} {dev}\n"))
            .collect();
        let tmp = path.with_extension("neighbours.tmp");
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the neighbour entries lb created; after a crash they would stay");
        }
    }

    /// Makes sure the next hop towards `addr` has a neighbour entry.
    pub fn ensure(&mut self, addr: IpAddr) {
        let Some((dev, hop)) = route_to(addr, None) else {
            tracing::warn!(%addr, "no route to backend: next-hop MAC resolution is left to traffic");
            return;
        };
        if dev == "lo" || self.created.iter().any(|(a, d)| *a == hop && *d == dev) {
            return;
        }
        let state = match show_neigh(hop, &dev) {
            Some(line) => parse_neigh(&line),
            None => {
                tracing::warn!(%hop, %dev, "cannot read the neighbour table; leaving it alone");
                return;
            }
        };
        if let NeighState::Present(s) = state {
            tracing::debug!(%hop, %dev, state = %s, "neighbour entry exists; leaving it as it is");
            return;
        }
        // `add`, not `replace`: if an entry appeared meanwhile, it is not ours to change.
        let ok = Command::new("ip")
            .args([
                family_flag(hop),
                "neigh",
                "add",
                &hop.to_string(),
                "dev",
                &dev,
                "managed",
            ])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            self.created.push((hop, dev));
            self.save();
        } else {
            tracing::warn!(%hop, %dev, "could not add a managed neighbour entry");
        }
    }

    /// Deletes the entries `ensure` created (or took over), and the record.
    pub fn remove_all(&mut self) {
        for (hop, dev) in self.created.drain(..) {
            let _ = Command::new("ip")
                .args([
                    family_flag(hop),
                    "neigh",
                    "del",
                    &hop.to_string(),
                    "dev",
                    &dev,
                ])
                .status();
        }
        self.save();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbour_lines_parse_to_their_state() {
        assert_eq!(parse_neigh(""), NeighState::Absent);
        assert_eq!(
            parse_neigh("10.0.0.11 lladdr 02:00:0a:00:00:0b PERMANENT\n"),
            NeighState::Present("PERMANENT".into())
        );
        assert_eq!(
            parse_neigh("10.0.0.11 lladdr 02:00:0a:00:00:0b extern_learn STALE"),
            NeighState::Present("STALE".into())
        );
        assert_eq!(
            parse_neigh("10.0.0.11  FAILED managed"),
            NeighState::Present("FAILED".into())
        );
    }
}
