//! What an L4 VIP is: address, port and protocol, an optional name, and the rule DSR puts on
//! its targets' ports.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

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
    /// Address.
    pub addr: Ipv4Addr,
    /// Port; 0 = every port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl VipAddr {
    /// The key of this VIP in the `LB_VIPS` map.
    pub fn map_key(&self) -> lb_common::VipKey {
        lb_common::VipKey {
            addr: lb_common::ipv4_to_map(self.addr),
            port: self.port.to_be(),
            proto: self.proto.number(),
            _pad: 0,
        }
    }

    /// The VIP a `LB_VIPS` key stands for; None for address markers and unknown protocols.
    pub fn from_map_key(key: &lb_common::VipKey) -> Option<Self> {
        Some(Self {
            addr: lb_common::ipv4_from_map(key.addr),
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
                 backend receives the packet unchanged, so it must listen on the VIP port"
            )),
        }
    }
}

impl fmt::Display for VipAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

impl FromStr for VipAddr {
    type Err = String;

    /// `ADDR:PORT/PROTO`, e.g. `10.100.0.1:80/tcp`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (hostport, proto) = s
            .rsplit_once('/')
            .ok_or("expected ADDR:PORT/PROTO, e.g. 10.100.0.1:80/tcp")?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => return Err(format!("protocol {other:?} is not tcp or udp")),
        };
        let (addr, port) = hostport
            .rsplit_once(':')
            .ok_or("expected ADDR:PORT/PROTO (port missing; use port 0 for every port)")?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let IpAddr::V4(addr) = addr else {
            return Err("IPv6 VIPs are not supported yet".into());
        };
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return Err(format!("{addr} cannot be a VIP"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
        Ok(VipAddr { addr, port, proto })
    }
}

/// A VIP: its identity and optional name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    /// Optional name (targets may refer to it).
    pub name: Option<String>,
    /// Address, port, protocol.
    pub vip: VipAddr,
}

impl VipSpec {
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
        assert_eq!(k.addr.to_ne_bytes(), [10, 100, 0, 1]);
        assert_eq!(k.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(k.proto, 17);
        assert_eq!(VipAddr::from_map_key(&k), Some(v));
        let marker = lb_common::VipKey {
            proto: lb_common::VIP_MARKER_PROTO,
            ..k
        };
        assert_eq!(VipAddr::from_map_key(&marker), None);
    }

    #[test]
    fn a_vip_answers_to_its_name_and_its_address_spec_only() {
        let v = VipSpec {
            name: Some("web".into()),
            vip: "10.100.0.1:80/tcp".parse().unwrap(),
        };
        assert!(v.answers_to("web"));
        assert!(v.answers_to("10.100.0.1:80/tcp"));
        assert!(v.answers_to("10.100.0.1:80/TCP"));
        for other in ["api", "10.100.0.1:81/tcp", "10.100.0.1:80/udp", "WEB"] {
            assert!(!v.answers_to(other), "{other}");
        }
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
