//! Per-VIP guards, as configured: source allow and deny lists (CIDRs of the VIP's family) and
//! a new-flow rate limit per source. `lb_xdp` applies them before any state is created (see
//! `lb-ebpf/src/guard.rs`); the ring writer keeps its maps in line with them.
//!
//! The grammar is the same on `lb run --vip …,OPTION=VALUE` and in `lb vips set-guards VIP
//! OPTIONS`: `allow=CIDR|CIDR…`, `deny=CIDR|CIDR…` (empty: no list), `new-flow-rate=N|off`
//! (new flows per second per source), `new-flow-burst=M` (how many at once; default N).
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use lb_common::{GUARD_PREFIX_BASE, GuardKey, RateKey};

/// Most CIDRs in one list of one VIP (the tries hold [`lb_common::MAX_GUARD_CIDRS`] over all).
pub const MAX_CIDRS_PER_LIST: usize = 1024;
/// Highest new-flow rate (per source, per second) and burst accepted.
pub const MAX_RATE: u32 = 1_000_000;

/// An address block: `ADDR/LEN` with no bits set past the prefix, or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The first address of the block.
    pub addr: IpAddr,
    /// Prefix length (0–32 for IPv4, 0–128 for IPv6).
    pub len: u8,
}

impl Cidr {
    /// Whether `ip` is inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(a) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(net)
            }
            _ => false,
        }
    }

    /// The trie entry of this block for VIP `vip_id`: (prefix length, key).
    pub fn guard_key(&self, vip_id: u32) -> (u32, GuardKey) {
        let (family, addr) = lb_common::addr_to_map(self.addr);
        (
            GUARD_PREFIX_BASE + u32::from(self.len),
            GuardKey {
                vip_id,
                family,
                _pad: [0; 3],
                addr,
            },
        )
    }

    /// The block a trie entry stands for (None for an entry no [`Cidr::guard_key`] makes).
    pub fn from_guard_key(prefix_len: u32, key: &GuardKey) -> Option<Self> {
        let addr = lb_common::addr_from_map(key.family, key.addr)?;
        let len = u8::try_from(prefix_len.checked_sub(GUARD_PREFIX_BASE)?).ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Self { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `2001:db8::/32`, or one address (`/32`, `/128`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        let cidr = Self { addr, len };
        let net = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        if net != addr {
            return Err(format!(
                "{s:?} has bits set past its prefix: did you mean {net}/{len}?"
            ));
        }
        Ok(cidr)
    }
}

/// A new-flow rate limit per source: `per_second` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// New flows per second a source may open, sustained.
    pub per_second: u32,
    /// New flows a source may open at once (the bucket's depth).
    pub burst: u32,
}

impl RateLimit {
    /// [`lb_common::VipMeta::rate_interval_ns`]: nanoseconds per new flow.
    pub fn interval_ns(&self) -> u64 {
        1_000_000_000 / u64::from(self.per_second.max(1))
    }

    /// [`lb_common::VipMeta::rate_tolerance_ns`]: how far ahead of the rate a source may run.
    pub fn tolerance_ns(&self) -> u64 {
        u64::from(self.burst.max(1) - 1) * self.interval_ns()
    }
}

/// A VIP's guards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guards {
    /// Sources accepted (empty: every source, unless denied).
    pub allow: Vec<Cidr>,
    /// Sources dropped (a deny entry wins over an allow entry).
    pub deny: Vec<Cidr>,
    /// New-flow rate limit per source.
    pub rate: Option<RateLimit>,
}

impl Guards {
    /// Whether the VIP has no guard at all.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty() && self.rate.is_none()
    }

    /// Checks the lists against the VIP's family (a block of the other family could never
    /// match: in an allow list it would silently refuse everyone) and their sizes.
    pub fn validate(&self, vip_v6: bool) -> Result<(), String> {
        for (name, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            if list.len() > MAX_CIDRS_PER_LIST {
                return Err(format!(
                    "{name}= holds {} CIDRs; at most {MAX_CIDRS_PER_LIST}",
                    list.len()
                ));
            }
            if let Some(c) = list.iter().find(|c| c.addr.is_ipv6() != vip_v6) {
                return Err(format!(
                    "{name}={c}: the VIP is {} and only sees {} sources",
                    if vip_v6 { "IPv6" } else { "IPv4" },
                    if vip_v6 { "IPv6" } else { "IPv4" }
                ));
            }
        }
        Ok(())
    }

    /// The options that give these guards (what `lb vips guards` prints).
    pub fn to_options(&self) -> String {
        let list = |l: &[Cidr]| {
            l.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("|")
        };
        let mut out = vec![
            format!("allow={}", list(&self.allow)),
            format!("deny={}", list(&self.deny)),
        ];
        match self.rate {
            Some(r) => {
                out.push(format!("new-flow-rate={}", r.per_second));
                out.push(format!("new-flow-burst={}", r.burst));
            }
            None => out.push("new-flow-rate=off".into()),
        }
        out.join(",")
    }
}

/// A change to a VIP's guards: each part given replaces that part; the rest stays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardChange {
    /// A new allow list (empty: none).
    pub allow: Option<Vec<Cidr>>,
    /// A new deny list (empty: none).
    pub deny: Option<Vec<Cidr>>,
    /// A new rate (`Some(None)`: no limit).
    pub rate: Option<Option<u32>>,
    /// A new burst.
    pub burst: Option<u32>,
}

/// `CIDR|CIDR…` (empty: no CIDR).
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    let mut out: Vec<Cidr> = Vec::new();
    for part in s.split('|').map(str::trim).filter(|p| !p.is_empty()) {
        let c: Cidr = part.parse()?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

fn parse_rate(what: &str, v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_RATE).contains(n))
        .ok_or_else(|| format!("{what}={v}: must be a number from 1 to {MAX_RATE}"))
}

impl GuardChange {
    /// Takes one `KEY=VALUE` option if it is a guard option; `Ok(false)` if the key is not.
    pub fn take_option(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let once = |set: bool| {
            if set {
                Err(format!("{key}= is given twice"))
            } else {
                Ok(())
            }
        };
        match key {
            "allow" => {
                once(self.allow.is_some())?;
                self.allow = Some(parse_cidrs(value)?);
            }
            "deny" => {
                once(self.deny.is_some())?;
                self.deny = Some(parse_cidrs(value)?);
            }
            "new-flow-rate" => {
                once(self.rate.is_some())?;
                self.rate = Some(match value {
                    "off" | "0" => None,
                    v => Some(parse_rate(key, v)?),
                });
            }
            "new-flow-burst" => {
                once(self.burst.is_some())?;
                self.burst = Some(parse_rate(key, value)?);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `OPTION=VALUE[,…]` with the guard options only.
    pub fn from_options(s: &str) -> Result<Self, String> {
        let mut c = Self::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected OPTION=VALUE"))?;
            if !c.take_option(k, v)? {
                return Err(format!(
                    "unknown option {k:?} (known: allow=CIDR|…, deny=CIDR|…, \
                     new-flow-rate=N|off, new-flow-burst=M)"
                ));
            }
        }
        if c == Self::default() {
            return Err("nothing to change".into());
        }
        Ok(c)
    }

    /// `base` with this change applied. A burst needs a rate (given now or already set); a
    /// new rate without a burst gets a burst of one second's worth.
    pub fn apply(&self, base: &Guards) -> Result<Guards, String> {
        let mut g = base.clone();
        if let Some(a) = &self.allow {
            g.allow.clone_from(a);
        }
        if let Some(d) = &self.deny {
            g.deny.clone_from(d);
        }
        match (self.rate, self.burst) {
            (Some(None), Some(_)) => {
                return Err("new-flow-burst= needs a new-flow-rate=, not off".into());
            }
            (Some(None), None) => g.rate = None,
            (Some(Some(r)), burst) => {
                g.rate = Some(RateLimit {
                    per_second: r,
                    burst: burst.unwrap_or(r),
                });
            }
            (None, Some(b)) => match &mut g.rate {
                Some(r) => r.burst = b,
                None => return Err("new-flow-burst= needs a new-flow-rate=".into()),
            },
            (None, None) => {}
        }
        Ok(g)
    }
}

/// The rate-state key of `source` under VIP `vip_id` (what `lb dump limited` reads).
pub fn rate_key(vip_id: u32, source: IpAddr) -> RateKey {
    let (family, addr) = lb_common::addr_to_map(source);
    RateKey {
        vip_id,
        family,
        _pad: [0; 3],
        addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_both_families_and_refuse_host_bits() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()), "other family");
        let one: Cidr = "2001:db8::7".parse().unwrap();
        assert_eq!(one.len, 128);
        assert_eq!(one.to_string(), "2001:db8::7/128");
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        let e = "10.1.2.3/16".parse::<Cidr>().unwrap_err();
        assert!(e.contains("10.1.0.0/16"), "{e}");
        for bad in ["10.0.0.0/33", "fd00::/129", "nonsense", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn trie_keys_round_trip_and_count_the_vip_and_family_in_the_prefix() {
        let c: Cidr = "192.0.2.0/24".parse().unwrap();
        let (prefix, key) = c.guard_key(7);
        assert_eq!(prefix, 64 + 24);
        assert_eq!(key.vip_id, 7);
        assert_eq!(key.addr[0].to_ne_bytes(), [192, 0, 2, 0]);
        assert_eq!(Cidr::from_guard_key(prefix, &key), Some(c));
        assert_eq!(Cidr::from_guard_key(10, &key), None);
    }

    #[test]
    fn guard_options_change_only_what_they_name() {
        let g = GuardChange::from_options("allow=10.0.0.0/8|192.0.2.1,new-flow-rate=10")
            .unwrap()
            .apply(&Guards::default())
            .unwrap();
        assert_eq!(g.allow.len(), 2);
        assert_eq!(
            g.rate,
            Some(RateLimit {
                per_second: 10,
                burst: 10
            })
        );
        let g2 = GuardChange::from_options("new-flow-burst=3")
            .unwrap()
            .apply(&g)
            .unwrap();
        assert_eq!(g2.allow, g.allow, "untouched");
        assert_eq!(g2.rate.unwrap().burst, 3);
        let g3 = GuardChange::from_options("allow=,new-flow-rate=off")
            .unwrap()
            .apply(&g2)
            .unwrap();
        assert!(g3.is_empty());
        assert!(
            GuardChange::from_options("new-flow-burst=3")
                .unwrap()
                .apply(&Guards::default())
                .is_err()
        );
        for bad in [
            "",
            "allow=10.0.0.0/8,allow=10.0.0.0/8",
            "new-flow-rate=0.5",
            "new-flow-rate=2000000",
            "colour=red",
        ] {
            assert!(GuardChange::from_options(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            g.to_options(),
            "allow=10.0.0.0/8|192.0.2.1/32,deny=,new-flow-rate=10,new-flow-burst=10"
        );
    }

    #[test]
    fn lists_must_match_the_vips_family() {
        let g = Guards {
            deny: vec!["2001:db8::/32".parse().unwrap()],
            ..Guards::default()
        };
        assert!(g.validate(true).is_ok());
        assert!(g.validate(false).unwrap_err().contains("IPv4"));
    }

    #[test]
    fn a_rate_becomes_an_interval_and_a_tolerance() {
        let r = RateLimit {
            per_second: 10,
            burst: 5,
        };
        assert_eq!(r.interval_ns(), 100_000_000);
        assert_eq!(r.tolerance_ns(), 400_000_000);
        let one = RateLimit {
            per_second: 1,
            burst: 1,
        };
        assert_eq!(one.tolerance_ns(), 0, "a burst of one: no run-ahead");
    }
}
