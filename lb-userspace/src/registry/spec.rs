//! Target specs: `OWNER=ADDR[:PORT][,weight=W]`, the grammar of `lb run --target` and
//! `lb targets register|deregister --target`. The owner is a VIP (its name or
//! `ADDR:PORT/PROTO`) or a target group; [`super::Registry::resolve`] turns a spec into a
//! group and a target address, once, for flags and admin requests alike.
use std::net::IpAddr;

/// A parsed `--target` value: `OWNER=ADDR[:PORT][,weight=W]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    /// VIP name, VIP `ADDR:PORT/PROTO`, or target-group name.
    pub owner: String,
    /// Target address.
    pub addr: IpAddr,
    /// Target port, if given.
    pub port: Option<u16>,
    /// Weight (default 1).
    pub weight: u32,
}

/// Largest target weight accepted.
pub const MAX_WEIGHT: u32 = 65_535;

/// Parses `OWNER=ADDR[:PORT][,weight=W]` (weight 1–[`MAX_WEIGHT`], default 1).
pub fn parse_target(s: &str) -> Result<TargetSpec, String> {
    let (owner, rest) = s
        .split_once('=')
        .ok_or("expected OWNER=ADDR[:PORT][,weight=W], e.g. web=10.0.0.11:80,weight=2")?;
    if owner.is_empty() {
        return Err("the owner (VIP or target group) before '=' is empty".into());
    }
    let mut parts = rest.split(',');
    let hostport = parts.next().unwrap_or_default();
    let (addr, port) = parse_hostport(hostport)?;
    let mut weight = 1;
    for opt in parts {
        match opt.split_once('=') {
            Some(("weight", w)) => {
                weight = w
                    .parse::<u32>()
                    .ok()
                    .filter(|w| (1..=MAX_WEIGHT).contains(w))
                    .ok_or_else(|| {
                        format!("weight {w:?} must be a number from 1 to {MAX_WEIGHT}")
                    })?;
            }
            _ => return Err(format!("unknown option {opt:?} (known: weight=W)")),
        }
    }
    Ok(TargetSpec {
        owner: owner.to_string(),
        addr,
        port,
        weight,
    })
}

/// `ADDR`, `ADDR:PORT`, `[V6]` or `[V6]:PORT` (port 1–65535).
pub fn parse_hostport(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {p:?} must be a number from 1 to 65535"))
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (a, tail) = rest
            .split_once(']')
            .ok_or("missing ']' after IPv6 address")?;
        let addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv6 address"))?;
        return match tail.strip_prefix(':') {
            Some(p) => Ok((addr, Some(port(p)?))),
            None if tail.is_empty() => Ok((addr, None)),
            None => Err(format!("unexpected {tail:?} after the address")),
        };
    }
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok((addr, None));
    }
    let (a, p) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not an address or ADDR:PORT"))?;
    let addr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IP address"))?;
    Ok((addr, Some(port(p)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_specs_parse_ports_weights_and_v6() {
        let t = parse_target("web=10.0.0.11:80,weight=3").unwrap();
        assert_eq!(t.owner, "web");
        assert_eq!(t.port, Some(80));
        assert_eq!(t.weight, 3);
        let t = parse_target("10.100.0.1:80/tcp=10.0.0.12").unwrap();
        assert_eq!(t.owner, "10.100.0.1:80/tcp");
        assert_eq!((t.port, t.weight), (None, 1));
        let t = parse_target("api=[2001:db8::1]:8080").unwrap();
        assert_eq!(t.port, Some(8080));
        for bad in [
            "10.0.0.11",
            "=10.0.0.11",
            "web=10.0.0.11,weight=0",
            "web=10.0.0.11,weight=x",
            "web=10.0.0.11,colour=red",
            "web=host:80",
            "web=10.0.0.11:0",
        ] {
            assert!(parse_target(bad).is_err(), "{bad} accepted");
        }
    }
}
