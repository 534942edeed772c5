//! Benchmark only (`cargo xtask bench xdp --katran DIR`): Katran's `balancer_ingress`
//! (facebookincubator/katran, `katran/lib/bpf/balancer.bpf.c`), loaded from an object built
//! outside this repository, configured the way the benchmark configures `lb_xdp`, so both run
//! behind the same front program in the same run. `lb run` never uses any of it.
//!
//! What Katran's userspace (`KatranLb`) would do, reduced to what the benchmark needs: one VIP
//! per family in `vip_map`, the reals in `reals` (ids from 1: Katran drops a ring slot holding
//! 0), a consistent-hash ring per VIP in `ch_rings`, the default gateway's MAC in
//! `ctl_array[0]`, and one LRU flow table per CPU in `lru_mapping` (without one, every packet
//! would take the `fallback_cache` path and count `FALLBACK_LRU_CNTR`). The ring is built with
//! our Maglev ([`crate::maglev::build`]) instead of Katran's (a different hash, same kind of
//! table); the cost per packet does not depend on which slot holds which real.
//!
//! The map value layouts below are those of `katran/lib/bpf/balancer_structs.h` (C layout,
//! checked by the unit tests); the compile-time sizes (`MAX_VIPS`, `RING_SIZE`) are read back
//! from the loaded maps, so an object built with other `-D` flags is configured correctly.
use std::{
    net::IpAddr,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{ProgramFd, Xdp},
};

use super::super::{DataplaneError, Result, map_err, retry_eagain, run_once};
use crate::maglev;

/// The program in Katran's object.
pub const PROG: &str = "balancer_ingress";

/// Index (above `MAX_VIPS`) of Katran's global counters in its `stats` map
/// (`balancer_consts.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum KatranCounter {
    /// `LRU_CNTRS`: v1 VIP packets that reached the flow-table stage, v2 of them routed by the
    /// ring (no LRU entry).
    Lru = 0,
    /// `LRU_MISS_CNTR`: TCP LRU misses, v1 SYN, v2 non-SYN.
    LruMiss = 1,
    /// `NEW_CONN_RATE_CNTR`: v1 new connections in the current second, v2 its start (ns).
    NewConnRate = 2,
    /// `FALLBACK_LRU_CNTR`: v1 packets without a per-CPU LRU (must stay 0 here).
    FallbackLru = 3,
    /// `XDP_TOTAL_CNTR`: every packet the program saw.
    XdpTotal = 16,
    /// `XDP_TX_CNTR`: packets returned with `XDP_TX`.
    XdpTx = 17,
    /// `XDP_DROP_CNTR`.
    XdpDrop = 18,
    /// `XDP_PASS_CNTR`.
    XdpPass = 19,
}

/// `struct vip_definition`: the VIP address (IPv4 in the first 4 bytes), port and protocol,
/// both as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipDefinition {
    /// `vip` / `vipv6`, network order.
    pub addr: [u8; 16],
    /// Network order.
    pub port: [u8; 2],
    /// IANA protocol.
    pub proto: u8,
    /// C padding (the struct is 4-byte aligned).
    pub pad: u8,
}

/// `struct vip_meta`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// `F_*` VIP flags (none here: hash on the 5-tuple, LRU on).
    pub flags: u32,
    /// The VIP's index: its ring is `ch_rings[vip_num * RING_SIZE ..]`, its counters
    /// `stats[vip_num]`.
    pub vip_num: u32,
}

/// `struct real_definition`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RealDefinition {
    /// `dst` / `dstv6`, network order.
    pub addr: [u8; 16],
    /// `F_IPV6` for an IPv6 real.
    pub flags: u8,
    /// C padding.
    pub pad: [u8; 3],
}

/// `struct lb_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbStats {
    /// First counter.
    pub v1: u64,
    /// Second counter.
    pub v2: u64,
}

/// `struct ctl_value` (a union of a u64, an ifindex and a MAC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtlValue {
    /// The MAC in the first 6 bytes.
    pub bytes: [u8; 8],
}

/// `struct flow_key` (the LRU's key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source and destination port, network order.
    pub ports: [u8; 4],
    /// IANA protocol.
    pub proto: u8,
    /// C padding.
    pub pad: [u8; 3],
}

/// `struct real_pos_lru` (the LRU's value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RealPosLru {
    /// Real id.
    pub pos: u32,
    /// C padding.
    pub pad: u32,
    /// Last use (UDP only).
    pub atime: u64,
}

// SAFETY: plain `repr(C)` data without implicit padding (explicit pad fields), any bit
// pattern valid.
unsafe impl Pod for VipDefinition {}
// SAFETY: as above.
unsafe impl Pod for VipMeta {}
// SAFETY: as above.
unsafe impl Pod for RealDefinition {}
// SAFETY: as above.
unsafe impl Pod for LbStats {}
// SAFETY: as above.
unsafe impl Pod for CtlValue {}
// SAFETY: as above.
unsafe impl Pod for FlowKey {}
// SAFETY: as above.
unsafe impl Pod for RealPosLru {}

/// `F_IPV6` of `real_definition.flags`.
const F_IPV6: u8 = 1;

fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match addr {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

impl VipDefinition {
    /// The key of `vip_map` for `addr:port/proto`.
    pub fn new(addr: IpAddr, port: u16, proto: u8) -> Self {
        Self {
            addr: addr_bytes(addr),
            port: port.to_be_bytes(),
            proto,
            pad: 0,
        }
    }
}

impl RealDefinition {
    /// A real at `addr` (IPv6 reals get `F_IPV6`: Katran encapsulates IPv6-in-IPv6 to them).
    pub fn new(addr: IpAddr) -> Self {
        Self {
            addr: addr_bytes(addr),
            flags: if addr.is_ipv6() { F_IPV6 } else { 0 },
            pad: [0; 3],
        }
    }
}

/// A VIP's consistent-hash ring as Katran reads it: `ring_size` slots, each a real id
/// `first_id ..= first_id + reals.len() - 1` (id `first_id + i` is `reals[i]`), filled with
/// Maglev at equal weights. Never 0 (Katran treats id 0 as an unset slot and drops).
pub fn ring(reals: &[IpAddr], first_id: u32, ring_size: u32) -> Vec<u32> {
    let members: Vec<maglev::Member> = reals
        .iter()
        .map(|&addr| maglev::Member {
            addr,
            port: 0,
            weight: 1,
        })
        .collect();
    maglev::build(&members, ring_size)
        .into_iter()
        .map(|slot| first_id + slot)
        .collect()
}

/// `BPF_MAP_CREATE` of an LRU hash with Katran's flow key and value (aya creates only the map
/// types of its `create` constructors). The kernel accepts it as an inner map of `lru_mapping`
/// because type, key, value size and flags match the template's (`max_entries` may differ).
fn create_lru(max_entries: u32, name: &str) -> std::io::Result<OwnedFd> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    // union bpf_attr, the BPF_MAP_CREATE part (include/uapi/linux/bpf.h): map_type, key_size,
    // value_size, max_entries, map_flags, inner_map_fd, numa_node, map_name[16], …; the rest
    // must be zero.
    #[repr(C)]
    struct Attr {
        words: [u32; 7],
        name: [u8; 16],
        rest: [u8; 84],
    }
    let mut attr = Attr {
        words: [
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<FlowKey>() as u32,
            size_of::<RealPosLru>() as u32,
            max_entries,
            0,
            0,
            0,
        ],
        name: [0; 16],
        rest: [0; 84],
    };
    let n = name.len().min(15);
    attr.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: a valid attr of the size passed; the kernel returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const attr,
            size_of::<Attr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One CPU's LRU flow table.
type Lru = HashMap<MapData, FlowKey, RealPosLru>;

/// Katran's `balancer_ingress`, loaded (not attached), with its maps and one LRU per CPU.
pub struct Katran {
    ebpf: Ebpf,
    /// Katran's `MAX_VIPS` (from the `stats` map: `MAX_VIPS * 2` entries).
    max_vips: u32,
    /// Katran's `RING_SIZE` (from `ch_rings`: `MAX_VIPS * RING_SIZE` entries).
    ring_size: u32,
    /// The per-CPU LRU flow tables (`lru_mapping` holds references too).
    lrus: Vec<Lru>,
}

impl Katran {
    /// Loads `balancer_ingress` from the object at `path` and gives every possible CPU an LRU
    /// flow table of `lru_size` entries.
    pub fn load(path: &Path, lru_size: u32) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .load_file(path)
            .map_err(|e| DataplaneError::Load(Box::new(e)))?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROG)
            .ok_or_else(|| DataplaneError::Program {
                what: format!("finding {PROG} in {}", path.display()),
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: format!("{PROG} is not an XDP program"),
                source,
            })?;
        retry_eagain(|| prog.load()).map_err(|source| DataplaneError::Program {
            what: format!("loading {PROG} (verifier)"),
            source,
        })?;
        let stats_len = per_cpu_stats(&ebpf)?.len();
        let max_vips = stats_len / 2;
        let rings: Array<_, u32> = typed(&ebpf, "ch_rings")?;
        let ring_size = rings.len() / max_vips.max(1);
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DataplaneError::Io {
            what: "reading",
            path: "/sys/devices/system/cpu/possible".into(),
            source,
        })?;
        let mut lrus = Vec::with_capacity(cpus);
        for cpu in 0..cpus {
            let io = |source| DataplaneError::Io {
                what: "creating Katran's per-CPU LRU flow table",
                path: format!("cpu {cpu}").into(),
                source,
            };
            let fd = create_lru(lru_size, &format!("katran_lru{cpu}")).map_err(io)?;
            let dup = fd.try_clone().map_err(io)?;
            let inner = MapData::from_fd(fd).map_err(map_err("Katran's LRU"))?;
            let mut mapping: ArrayOfMaps<_, MapData> = typed_mut(&mut ebpf, "lru_mapping")?;
            mapping
                .set(cpu as u32, &inner, 0)
                .map_err(map_err(format!("lru_mapping[{cpu}]")))?;
            let data = MapData::from_fd(dup).map_err(map_err("Katran's LRU"))?;
            let lru = Lru::try_from(aya::maps::Map::LruHashMap(data))
                .map_err(map_err("Katran's LRU has an unexpected type"))?;
            lrus.push(lru);
        }
        Ok(Self {
            ebpf,
            max_vips,
            ring_size,
            lrus,
        })
    }

    /// Katran's `RING_SIZE` of this object.
    pub fn ring_size(&self) -> u32 {
        self.ring_size
    }

    /// The program, for the front's program array.
    pub fn program_fd(&self) -> Result<&ProgramFd> {
        let prog: &Xdp = self
            .ebpf
            .program(PROG)
            .ok_or_else(|| DataplaneError::Program {
                what: format!("finding {PROG}"),
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: format!("{PROG} is not XDP"),
                source,
            })?;
        prog.fd().map_err(|source| DataplaneError::Program {
            what: format!("the descriptor of {PROG}"),
            source,
        })
    }

    /// Adds the VIP `vip_num` (`addr:port/proto`) with `reals` as real ids `first_id ..`, and
    /// fills its ring.
    pub fn add_vip(
        &mut self,
        vip_num: u32,
        (addr, port, proto): (IpAddr, u16, u8),
        reals: &[IpAddr],
        first_id: u32,
    ) -> Result<()> {
        let mut vips: HashMap<_, VipDefinition, VipMeta> = typed_mut(&mut self.ebpf, "vip_map")?;
        vips.insert(
            VipDefinition::new(addr, port, proto),
            VipMeta { flags: 0, vip_num },
            0,
        )
        .map_err(map_err("vip_map"))?;
        let mut real_map: Array<_, RealDefinition> = typed_mut(&mut self.ebpf, "reals")?;
        for (i, r) in reals.iter().enumerate() {
            real_map
                .set(first_id + i as u32, RealDefinition::new(*r), 0)
                .map_err(map_err("reals"))?;
        }
        let slots = ring(reals, first_id, self.ring_size);
        let mut rings: Array<_, u32> = typed_mut(&mut self.ebpf, "ch_rings")?;
        let base = vip_num * self.ring_size;
        for (i, id) in slots.into_iter().enumerate() {
            rings
                .set(base + i as u32, id, 0)
                .map_err(map_err("ch_rings"))?;
        }
        Ok(())
    }

    /// Sets the MAC Katran sends every encapsulated packet to (`ctl_array[0]`: the default
    /// gateway's; Katran does no route or neighbour lookup).
    pub fn set_gateway_mac(&mut self, mac: [u8; 6]) -> Result<()> {
        let mut ctl: Array<_, CtlValue> = typed_mut(&mut self.ebpf, "ctl_array")?;
        let mut v = CtlValue::default();
        v.bytes[..6].copy_from_slice(&mac);
        ctl.set(0, v, 0).map_err(map_err("ctl_array"))
    }

    /// Sum over CPUs of `stats[index]`.
    fn stats_at(&self, index: u32) -> Result<LbStats> {
        let v = per_cpu_stats(&self.ebpf)?
            .get(&index, 0)
            .map_err(map_err("reading Katran's stats"))?;
        Ok(v.iter().fold(LbStats::default(), |a, s| LbStats {
            v1: a.v1 + s.v1,
            v2: a.v2 + s.v2,
        }))
    }

    /// One of Katran's global counters.
    pub fn counter(&self, c: KatranCounter) -> Result<LbStats> {
        self.stats_at(self.max_vips + c as u32)
    }

    /// The per-VIP counter of `vip_num`: v1 packets, v2 bytes.
    pub fn vip_stats(&self, vip_num: u32) -> Result<LbStats> {
        self.stats_at(vip_num)
    }

    /// Starts a new one-second window of Katran's new-connection rate limit
    /// (`MAX_CONN_RATE`), so that a run of fewer new flows than the limit never meets its
    /// "under flood" shortcut (which skips the LRU insert).
    pub fn reset_conn_rate(&mut self) -> Result<()> {
        let key = self.max_vips + KatranCounter::NewConnRate as u32;
        let cpus = self.lrus.len();
        let mut stats = per_cpu_stats_mut(&mut self.ebpf)?;
        let zero = PerCpuValues::try_from(vec![LbStats::default(); cpus]).map_err(|source| {
            DataplaneError::Io {
                what: "building per-CPU values for",
                path: "Katran's stats".into(),
                source,
            }
        })?;
        stats
            .set(key, zero, 0)
            .map_err(map_err("resetting Katran's new-connection rate"))
    }

    /// Entries in CPU `cpu`'s LRU flow table.
    pub fn lru_len(&self, cpu: usize) -> Result<usize> {
        let lru = self.lrus.get(cpu).ok_or_else(|| DataplaneError::Map {
            what: format!("Katran's LRU of cpu {cpu}"),
            source: aya::maps::MapError::OutOfBounds {
                index: cpu as u32,
                max_entries: self.lrus.len() as u32,
            },
        })?;
        Ok(lru.keys().filter(std::result::Result::is_ok).count())
    }

    /// One (non-live) test run: the action and the packet as left.
    pub fn test_run(&self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_once(&self.ebpf, PROG, packet, None)
    }
}

fn per_cpu_stats(ebpf: &Ebpf) -> Result<PerCpuArray<&MapData, LbStats>> {
    typed(ebpf, "stats")
}

fn per_cpu_stats_mut(ebpf: &mut Ebpf) -> Result<PerCpuArray<&mut MapData, LbStats>> {
    typed_mut(ebpf, "stats")
}

fn missing(name: &str) -> DataplaneError {
    DataplaneError::Map {
        what: format!("finding Katran's map {name}"),
        source: aya::maps::MapError::InvalidName { name: name.into() },
    }
}

fn typed<'a, T>(ebpf: &'a Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    ebpf.map(name)
        .ok_or_else(|| missing(name))?
        .try_into()
        .map_err(map_err(format!("Katran's {name} has an unexpected type")))
}

fn typed_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    ebpf.map_mut(name)
        .ok_or_else(|| missing(name))?
        .try_into()
        .map_err(map_err(format!("Katran's {name} has an unexpected type")))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn map_values_have_katrans_c_sizes() {
        // sizeof() of the C structs in balancer_structs.h (x86-64 and bpf alike).
        assert_eq!(size_of::<VipDefinition>(), 20);
        assert_eq!(size_of::<VipMeta>(), 8);
        assert_eq!(size_of::<RealDefinition>(), 20);
        assert_eq!(size_of::<LbStats>(), 16);
        assert_eq!(size_of::<CtlValue>(), 8);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<RealPosLru>(), 16);
    }

    #[test]
    fn vip_key_is_address_then_wire_order_port_and_protocol() {
        let v = VipDefinition::new(Ipv4Addr::new(198, 51, 100, 1).into(), 80, 6);
        let mut want = [0u8; 20];
        want[..4].copy_from_slice(&[198, 51, 100, 1]);
        want[16..18].copy_from_slice(&[0, 80]);
        want[18] = 6;
        // SAFETY: repr(C), 20 bytes, no implicit padding.
        let got: [u8; 20] = unsafe { std::mem::transmute(v) };
        assert_eq!(got, want);
    }

    #[test]
    fn only_ipv6_reals_are_flagged_ipv6() {
        assert_eq!(
            RealDefinition::new(Ipv4Addr::new(10, 0, 0, 11).into()).flags,
            0
        );
        let r = RealDefinition::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11).into());
        assert_eq!(r.flags, F_IPV6);
        assert_eq!(r.addr[15], 0x11);
    }

    #[test]
    fn ring_holds_only_real_ids_in_near_equal_shares() {
        let reals: Vec<IpAddr> = (11..19)
            .map(|n| Ipv4Addr::new(10, 0, 0, n).into())
            .collect();
        let ring = ring(&reals, 9, 65_537);
        assert_eq!(ring.len(), 65_537);
        let mut count = [0usize; 8];
        for &id in &ring {
            assert!((9..17).contains(&id), "slot holds id {id}");
            count[(id - 9) as usize] += 1;
        }
        let (min, max) = (count.iter().min().unwrap(), count.iter().max().unwrap());
        // Maglev at equal weights: every real gets 65,537 / 8 slots, give or take one.
        assert!(max - min <= 1, "shares {count:?}");
    }
}
