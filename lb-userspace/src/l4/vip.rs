//! What an L4 VIP is: address (IPv4 or IPv6), port and protocol, an optional name, its flow
//! idle timeout, its mode (direct server return or NAT) with the rule each puts on its targets'
//! ports, and its guards.
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use super::guards::Guards;

/// NLB's TCP idle timeout: a TCP flow's entry is valid this long after its last packet.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(350);
/// NLB's UDP idle timeout (fixed on AWS).
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest idle timeout a VIP accepts (NLB's upper bound for TCP since 2024).
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(6000);
/// Shortest idle timeout a VIP accepts. NLB's lower bound for TCP is 60 s; shorter values are
/// accepted for tests, as health-check intervals are.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// How a VIP's packets reach its targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VipMode {
    /// Direct server return: encapsulated (IP-in-IP) unchanged; targets carry the VIP on `lo`,
    /// run `lb decap` (or a tunnel driver) and answer the client directly.
    #[default]
    Dsr,
    /// NAT: destination rewritten to the target's address and port, client address kept;
    /// targets need nothing, but must route their replies through the balancer.
    Nat,
}

impl VipMode {
    /// The spelling of `--vip …,mode=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dsr => "dsr",
            Self::Nat => "nat",
        }
    }

    /// Parses `dsr` or `nat`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "dsr" => Some(Self::Dsr),
            "nat" => Some(Self::Nat),
            _ => None,
        }
    }
}

impl fmt::Display for VipMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// L4 protocol of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::IPPROTO_TCP,
            Proto::Udp => lb_common::IPPROTO_UDP,
        }
    }

    /// From an IANA protocol number.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::IPPROTO_TCP => Some(Proto::Tcp),
            lb_common::IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    /// NLB's idle timeout for flows of this protocol.
    pub fn default_idle_timeout(self) -> Duration {
        match self {
            Proto::Tcp => DEFAULT_TCP_IDLE_TIMEOUT,
            Proto::Udp => DEFAULT_UDP_IDLE_TIMEOUT,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// The identity of an L4 VIP: address, port (0 = every port) and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipAddr {
    /// Address (IPv4 or IPv6).
    pub addr: IpAddr,
    /// Port; 0 = every port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl VipAddr {
    /// The key of this VIP in the `LB_VIPS` map.
    pub fn map_key(&self) -> lb_common::VipKey {
        let (family, addr) = lb_common::addr_to_map(self.addr);
        lb_common::VipKey {
            addr,
            port: self.port.to_be(),
            proto: self.proto.number(),
            family,
        }
    }

    /// The key of the address marker of this VIP's address (see
    /// [`lb_common::VIP_MARKER_PROTO`]).
    pub fn marker_key(&self) -> lb_common::VipKey {
        lb_common::VipKey {
            port: 0,
            proto: lb_common::VIP_MARKER_PROTO,
            ..self.map_key()
        }
    }

    /// The VIP a `LB_VIPS` key stands for; None for address markers, unknown protocols and
    /// unknown families.
    pub fn from_map_key(key: &lb_common::VipKey) -> Option<Self> {
        Some(Self {
            addr: lb_common::addr_from_map(key.family, key.addr)?,
            port: u16::from_be(key.port),
            proto: Proto::from_number(key.proto)?,
        })
    }

    /// The port a target of this VIP must be registered on under direct server return, given
    /// the port the operator wrote (if any): the VIP's own port (DSR delivers the packet
    /// unchanged), or no port at all for an every-port VIP.
    pub fn dsr_target_port(&self, given: Option<u16>) -> Result<u16, String> {
        match (self.port, given) {
            (0, None) => Ok(0),
            (0, Some(p)) => Err(format!(
                "VIP {self} takes every port, so a target port ({p}) cannot apply: DSR \
                 delivers packets unchanged"
            )),
            (vp, None) => Ok(vp),
            (vp, Some(p)) if p == vp => Ok(p),
            (vp, Some(p)) => Err(format!(
                "port {p} differs from the VIP port {vp}: with direct server return the \
                 backend receives the packet unchanged, so it must listen on the VIP port \
                 (or give the VIP mode=nat)"
            )),
        }
    }

    /// The port a target of this VIP is registered on under NAT, given the port the operator
    /// wrote (if any): that port (the destination is rewritten to it), else the VIP's; for an
    /// every-port VIP none (the client's port is kept).
    pub fn nat_target_port(&self, given: Option<u16>) -> Result<u16, String> {
        match (self.port, given) {
            (0, None) => Ok(0),
            (0, Some(p)) => Err(format!(
                "VIP {self} takes every port, so a target port ({p}) cannot apply: NAT keeps the \
                 port the client used"
            )),
            (vp, None) => Ok(vp),
            (_, Some(p)) => Ok(p),
        }
    }
}

impl fmt::Display for VipAddr {
    /// `10.100.0.1:80/tcp`, `[fd00:100::1]:80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

impl FromStr for VipAddr {
    type Err = String;

    /// `ADDR:PORT/PROTO`, e.g. `10.100.0.1:80/tcp` or `[fd00:100::1]:80/tcp`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (hostport, proto) = s
            .rsplit_once('/')
            .ok_or("expected ADDR:PORT/PROTO, e.g. 10.100.0.1:80/tcp or [fd00::1]:80/tcp")?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => return Err(format!("protocol {other:?} is not tcp or udp")),
        };
        let (addr, port) = hostport
            .rsplit_once(':')
            .ok_or("expected ADDR:PORT/PROTO (port missing; use port 0 for every port)")?;
        let addr: IpAddr = match addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
            Some(v6) => v6
                .parse::<std::net::Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| format!("{v6:?} is not an IPv6 address"))?,
            None if addr.contains(':') => {
                return Err(format!(
                    "{addr:?}: write an IPv6 VIP in brackets, e.g. [{addr}]:80/tcp"
                ));
            }
            None => addr
                .parse()
                .map_err(|_| format!("{addr:?} is not an IP address"))?,
        };
        let unusable = match addr {
            IpAddr::V4(a) => a.is_broadcast() || a.is_multicast() || a.is_unspecified(),
            IpAddr::V6(a) => {
                a.is_multicast()
                    || a.is_unspecified()
                    || a.is_loopback()
                    || a.to_ipv4_mapped().is_some()
                    || a.is_unicast_link_local()
            }
        };
        if unusable {
            return Err(format!("{addr} cannot be a VIP"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
        Ok(VipAddr { addr, port, proto })
    }
}

/// A VIP: its identity, optional name, flow idle timeout, mode and guards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    /// Optional name (targets may refer to it).
    pub name: Option<String>,
    /// Address, port, protocol.
    pub vip: VipAddr,
    /// How long a flow's entry stays valid after its last packet (NLB: TCP 350 s, UDP 120 s).
    pub idle_timeout: Duration,
    /// DSR (the default) or NAT.
    pub mode: VipMode,
    /// Source lists and new-flow rate limit (none by default).
    pub guards: Guards,
}

impl VipSpec {
    /// A DSR VIP with NLB's idle timeout for its protocol and no guards.
    pub fn new(name: Option<String>, vip: VipAddr) -> Self {
        Self {
            name,
            idle_timeout: vip.proto.default_idle_timeout(),
            vip,
            mode: VipMode::Dsr,
            guards: Guards::default(),
        }
    }

    /// The same VIP in NAT mode.
    pub fn nat(mut self) -> Self {
        self.mode = VipMode::Nat;
        self
    }

    /// The port a target is registered on, given the port the operator wrote: the rule of
    /// the VIP's mode ([`VipAddr::dsr_target_port`], [`VipAddr::nat_target_port`]).
    pub fn target_port(&self, given: Option<u16>) -> Result<u16, String> {
        match self.mode {
            VipMode::Dsr => self.vip.dsr_target_port(given),
            VipMode::Nat => self.vip.nat_target_port(given),
        }
    }

    /// Whether `owner` (the part before `=` of a `--target`) names this VIP: by its name or
    /// by its `ADDR:PORT/PROTO`.
    pub fn answers_to(&self, owner: &str) -> bool {
        self.name.as_deref() == Some(owner) || owner.parse::<VipAddr>().is_ok_and(|a| a == self.vip)
    }

    /// How operators see it: its name, else its address.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.vip.to_string())
    }
}

/// Names of VIPs and listeners: letters, digits, `-` and `_`, 1 to 32 characters.
pub fn validate_name(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 32 {
        return Err(format!("name {n:?} must be 1 to 32 characters"));
    }
    if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "name {n:?} may only hold letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_map_keys_round_trip_in_network_order_and_markers_are_no_vips() {
        let v: VipAddr = "10.100.0.1:8080/udp".parse().unwrap();
        let k = v.map_key();
        // As in the packet header: address bytes and port bytes in wire order.
        assert_eq!(k.addr[0].to_ne_bytes(), [10, 100, 0, 1]);
        assert_eq!(k.addr[1..], [0, 0, 0]);
        assert_eq!(k.family, lb_common::FAMILY_V4);
        assert_eq!(k.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(k.proto, 17);
        assert_eq!(VipAddr::from_map_key(&k), Some(v));
        assert_eq!(VipAddr::from_map_key(&v.marker_key()), None);

        let v6: VipAddr = "[fd00:100::1]:443/tcp".parse().unwrap();
        let k6 = v6.map_key();
        assert_eq!(k6.family, lb_common::FAMILY_V6);
        assert_eq!(k6.addr[0].to_ne_bytes(), [0xfd, 0, 1, 0]);
        assert_eq!(k6.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!(VipAddr::from_map_key(&k6), Some(v6));
        assert_eq!(v6.to_string(), "[fd00:100::1]:443/tcp");
    }

    #[test]
    fn vips_of_both_families_parse_and_unusable_addresses_are_refused() {
        for ok in [
            "10.100.0.1:80/tcp",
            "[fd00:100::1]:0/udp",
            "[2001:db8::5]:53/UDP",
        ] {
            let v: VipAddr = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(v.to_string().to_lowercase(), ok.to_lowercase());
        }
        for bad in [
            "fd00::1:80/tcp",
            "[fd00::1:80/tcp",
            "[::]:80/tcp",
            "[::1]:80/tcp",
            "[ff02::1]:80/tcp",
            "[fe80::1]:80/tcp",
            "[::ffff:10.0.0.1]:80/tcp",
            "224.0.0.1:80/udp",
        ] {
            assert!(bad.parse::<VipAddr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn idle_timeouts_default_to_nlbs() {
        let tcp = VipSpec::new(None, "10.100.0.1:80/tcp".parse().unwrap());
        let udp = VipSpec::new(None, "10.100.0.1:53/udp".parse().unwrap());
        assert_eq!(tcp.idle_timeout, Duration::from_secs(350));
        assert_eq!(udp.idle_timeout, Duration::from_secs(120));
    }

    #[test]
    fn a_vip_answers_to_its_name_and_its_address_spec_only() {
        let v = VipSpec::new(Some("web".into()), "10.100.0.1:80/tcp".parse().unwrap());
        assert!(v.answers_to("web"));
        assert!(v.answers_to("10.100.0.1:80/tcp"));
        assert!(v.answers_to("10.100.0.1:80/TCP"));
        for other in ["api", "10.100.0.1:81/tcp", "10.100.0.1:80/udp", "WEB"] {
            assert!(!v.answers_to(other), "{other}");
        }
    }

    #[test]
    fn nat_targets_may_listen_on_another_port_but_not_for_every_port_vips() {
        let web = VipSpec::new(None, "10.100.0.1:80/tcp".parse().unwrap()).nat();
        let any = VipSpec::new(None, "10.100.0.1:0/tcp".parse().unwrap()).nat();
        assert_eq!(web.target_port(None), Ok(80));
        assert_eq!(web.target_port(Some(8080)), Ok(8080));
        assert_eq!(any.target_port(None), Ok(0));
        assert!(
            any.target_port(Some(8080))
                .unwrap_err()
                .contains("every port")
        );
        assert_eq!(VipMode::parse("NAT"), Some(VipMode::Nat));
        assert_eq!(VipMode::parse("tunnel"), None);
    }

    #[test]
    fn dsr_targets_listen_on_the_vip_port() {
        let web: VipAddr = "10.100.0.1:80/tcp".parse().unwrap();
        let any: VipAddr = "10.100.0.1:0/tcp".parse().unwrap();
        assert_eq!(web.dsr_target_port(None), Ok(80));
        assert_eq!(web.dsr_target_port(Some(80)), Ok(80));
        assert!(
            web.dsr_target_port(Some(8080))
                .unwrap_err()
                .contains("VIP port")
        );
        assert_eq!(any.dsr_target_port(None), Ok(0));
        assert!(
            any.dsr_target_port(Some(80))
                .unwrap_err()
                .contains("every port")
        );
    }
}
