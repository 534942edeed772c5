//! The L4 registry: VIPs and their backends, and the map writes that keep `lb_xdp` in step.
//!
//! Ordering rules, so the program never steers a packet to something half-written:
//! - registering: the backend entry is written (in service) before any ring slot names it;
//! - deregistering: the ring slots move away first, then the backend entry is cleared, so
//!   flows pinned to it are re-steered on their next packet;
//! - only ring slots whose backend changed are rewritten (Maglev keeps that to ~1/N).
//!
//! Map access goes through [`L4Maps`], implemented by [`crate::dataplane::Maps`] and by a
//! recording fake in the tests, so all of this is tested without a kernel.
use std::collections::{BTreeMap, VecDeque};

use lb_common::{
    BACKEND_F_IN_SERVICE, Backend, RING_EMPTY, VIP_F_HAS_TCP, VIP_F_HAS_UDP, VIP_MARKER_ID,
    VIP_MARKER_PROTO, VipKey, VipMeta,
};

use crate::{
    config::{L4Target, VipAddr, VipSpec},
    dataplane::{DataplaneError, Maps},
    maglev,
};

/// Writes the registry makes. Addresses and ports in the map types are in network order.
pub trait L4Maps {
    /// Inserts or replaces a VIP entry.
    fn set_vip(&mut self, key: VipKey, meta: VipMeta) -> Result<(), DataplaneError>;
    /// Removes a VIP entry.
    fn remove_vip(&mut self, key: VipKey) -> Result<(), DataplaneError>;
    /// Writes backend `id`.
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), DataplaneError>;
    /// Writes one ring slot (`index` = vip_id * ring_size + slot).
    fn set_ring_slot(&mut self, index: u32, backend_id: u32) -> Result<(), DataplaneError>;
    /// Zeroes backend `id`'s counters before the id is reused.
    fn reset_backend_counters(&mut self, id: u32) -> Result<(), DataplaneError>;
}

impl L4Maps for Maps {
    fn set_vip(&mut self, key: VipKey, meta: VipMeta) -> Result<(), DataplaneError> {
        self.vips
            .insert(key, meta, 0)
            .map_err(|source| DataplaneError::Map {
                what: "writing LB_VIPS".into(),
                source,
            })
    }
    fn remove_vip(&mut self, key: VipKey) -> Result<(), DataplaneError> {
        self.vips
            .remove(&key)
            .map_err(|source| DataplaneError::Map {
                what: "removing from LB_VIPS".into(),
                source,
            })
    }
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), DataplaneError> {
        self.backends
            .set(id, backend, 0)
            .map_err(|source| DataplaneError::Map {
                what: format!("writing LB_BACKENDS[{id}]"),
                source,
            })
    }
    fn set_ring_slot(&mut self, index: u32, backend_id: u32) -> Result<(), DataplaneError> {
        self.rings
            .set(index, backend_id, 0)
            .map_err(|source| DataplaneError::Map {
                what: format!("writing LB_RINGS[{index}]"),
                source,
            })
    }
    fn reset_backend_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
        Maps::reset_backend_counters(self, id)
    }
}

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum L4Error {
    /// A map write failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// No VIP of that name or address.
    #[error("no VIP {0:?}")]
    NoSuchVip(String),
    /// The VIP already exists.
    #[error("VIP {0} already exists")]
    VipExists(VipAddr),
    /// The target is already registered.
    #[error("target {addr}:{port} is already registered with VIP {vip}")]
    TargetExists {
        /// The VIP.
        vip: VipAddr,
        /// Target address.
        addr: std::net::Ipv4Addr,
        /// Target port.
        port: u16,
    },
    /// The target is not registered.
    #[error("target {addr}:{port} is not registered with VIP {vip}")]
    NoSuchTarget {
        /// The VIP.
        vip: VipAddr,
        /// Target address.
        addr: std::net::Ipv4Addr,
        /// Target port.
        port: u16,
    },
    /// Out of VIP or backend ids.
    #[error("the maps are full: {0} (raise --max-vips / --max-backends)")]
    Full(&'static str),
}

/// One registered backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Its id (index in LB_BACKENDS and LB_BACKEND_STATS).
    pub id: u32,
    /// The target.
    pub target: L4Target,
}

#[derive(Debug)]
struct VipEntry {
    spec: VipSpec,
    id: u32,
    /// Keyed by (addr, port): the target identity.
    backends: BTreeMap<(std::net::Ipv4Addr, u16), BackendInfo>,
    /// Backend id per slot, as last written.
    ring: Vec<u32>,
}

/// Hands out ids lowest-first and reuses a released id only after every never-used id is
/// gone, so a flow pinned to a departed backend is not silently handed to a newcomer.
#[derive(Debug)]
struct IdPool {
    next: u32,
    max: u32,
    released: VecDeque<u32>,
}

impl IdPool {
    fn new(max: u32) -> Self {
        Self {
            next: 0,
            max,
            released: VecDeque::new(),
        }
    }
    fn take(&mut self) -> Option<u32> {
        if self.next < self.max {
            self.next += 1;
            Some(self.next - 1)
        } else {
            self.released.pop_front()
        }
    }
    fn give_back(&mut self, id: u32) {
        self.released.push_back(id);
    }
}

/// The VIPs and backends `lb_xdp` serves.
pub struct L4Registry<M: L4Maps> {
    maps: M,
    ring_size: u32,
    vips: BTreeMap<VipAddr, VipEntry>,
    vip_ids: IdPool,
    backend_ids: IdPool,
}

impl<M: L4Maps> L4Registry<M> {
    /// An empty registry writing to `maps`.
    pub fn new(maps: M, ring_size: u32, max_vips: u32, max_backends: u32) -> Self {
        Self {
            maps,
            ring_size,
            vips: BTreeMap::new(),
            vip_ids: IdPool::new(max_vips),
            backend_ids: IdPool::new(max_backends),
        }
    }

    /// The map writer (the daemon reads counters through it).
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Adds a VIP with no backends (its ring is empty: packets are dropped and counted as
    /// `drop_no_backend` until a target is registered).
    pub fn add_vip(&mut self, spec: VipSpec) -> Result<(), L4Error> {
        if self.vips.contains_key(&spec.vip) {
            return Err(L4Error::VipExists(spec.vip));
        }
        let id = self.vip_ids.take().ok_or(L4Error::Full("VIPs"))?;
        let base = id * self.ring_size;
        for slot in 0..self.ring_size {
            self.maps.set_ring_slot(base + slot, RING_EMPTY)?;
        }
        self.maps.set_vip(
            spec.vip.map_key(),
            VipMeta {
                vip_id: id,
                flags: 0,
            },
        )?;
        // The address marker lets lb_xdp recognise fragments for any VIP of this address: one
        // bit per protocol that has a VIP there (this one included).
        let flags = self
            .vips
            .keys()
            .filter(|v| v.addr == spec.vip.addr)
            .chain([&spec.vip])
            .fold(0, |f, v| {
                f | match v.proto {
                    crate::config::Proto::Tcp => VIP_F_HAS_TCP,
                    crate::config::Proto::Udp => VIP_F_HAS_UDP,
                }
            });
        self.maps.set_vip(
            VipKey {
                addr: lb_common::ipv4_to_map(spec.vip.addr),
                port: 0,
                proto: VIP_MARKER_PROTO,
                _pad: 0,
            },
            VipMeta {
                vip_id: VIP_MARKER_ID,
                flags,
            },
        )?;
        self.vips.insert(
            spec.vip,
            VipEntry {
                spec,
                id,
                backends: BTreeMap::new(),
                ring: vec![RING_EMPTY; self.ring_size as usize],
            },
        );
        Ok(())
    }

    /// Finds a VIP by name or `ADDR:PORT/PROTO`.
    pub fn resolve(&self, owner: &str) -> Option<VipAddr> {
        self.vips
            .values()
            .find(|v| v.spec.answers_to(owner))
            .map(|v| v.spec.vip)
    }

    /// The VIP's spec.
    pub fn vip_spec(&self, vip: &VipAddr) -> Option<&VipSpec> {
        self.vips.get(vip).map(|e| &e.spec)
    }

    /// Registers targets with a VIP, then rewrites the changed ring slots once.
    pub fn register(&mut self, vip: &VipAddr, targets: &[L4Target]) -> Result<usize, L4Error> {
        let entry = self
            .vips
            .get(vip)
            .ok_or_else(|| L4Error::NoSuchVip(vip.to_string()))?;
        for t in targets {
            if entry.backends.contains_key(&(t.addr, t.port)) {
                return Err(L4Error::TargetExists {
                    vip: *vip,
                    addr: t.addr,
                    port: t.port,
                });
            }
        }
        let vip_id = entry.id;
        for t in targets {
            let id = self.backend_ids.take().ok_or(L4Error::Full("backends"))?;
            self.maps.reset_backend_counters(id)?;
            self.maps.set_backend(
                id,
                Backend {
                    addr: lb_common::ipv4_to_map(t.addr),
                    port: t.port.to_be(),
                    flags: BACKEND_F_IN_SERVICE,
                    _pad: 0,
                    vip_id,
                    weight: t.weight,
                },
            )?;
            let entry = self.vips.get_mut(vip).expect("checked");
            entry
                .backends
                .insert((t.addr, t.port), BackendInfo { id, target: *t });
        }
        self.rebuild(vip)
    }

    /// Deregisters targets (by address and port) from a VIP: ring slots move away first, then
    /// the backend entries are cleared so their flows are re-steered.
    pub fn deregister(
        &mut self,
        vip: &VipAddr,
        targets: &[(std::net::Ipv4Addr, u16)],
    ) -> Result<usize, L4Error> {
        let entry = self
            .vips
            .get_mut(vip)
            .ok_or_else(|| L4Error::NoSuchVip(vip.to_string()))?;
        for &(addr, port) in targets {
            if !entry.backends.contains_key(&(addr, port)) {
                return Err(L4Error::NoSuchTarget {
                    vip: *vip,
                    addr,
                    port,
                });
            }
        }
        let removed: Vec<BackendInfo> = targets
            .iter()
            .filter_map(|k| entry.backends.remove(k))
            .collect();
        let changed = self.rebuild(vip)?;
        for b in removed {
            self.maps.set_backend(b.id, Backend::default())?;
            self.backend_ids.give_back(b.id);
        }
        Ok(changed)
    }

    /// Recomputes a VIP's ring and writes the slots that changed; returns how many.
    fn rebuild(&mut self, vip: &VipAddr) -> Result<usize, L4Error> {
        let entry = self.vips.get_mut(vip).expect("caller checked");
        let infos: Vec<BackendInfo> = entry.backends.values().copied().collect();
        let members: Vec<maglev::Member> = infos
            .iter()
            .map(|b| maglev::Member {
                addr: b.target.addr.into(),
                port: b.target.port,
                weight: b.target.weight,
            })
            .collect();
        let table = maglev::build(&members, self.ring_size);
        let base = entry.id * self.ring_size;
        let mut changed = 0;
        for (slot, member) in table.iter().enumerate() {
            let id = if *member == maglev::EMPTY {
                RING_EMPTY
            } else {
                infos[*member as usize].id
            };
            if entry.ring[slot] != id {
                self.maps.set_ring_slot(base + slot as u32, id)?;
                entry.ring[slot] = id;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Every VIP with its backends, in address order.
    pub fn describe(&self) -> Vec<(VipSpec, u32, Vec<BackendInfo>)> {
        self.vips
            .values()
            .map(|e| (e.spec.clone(), e.id, e.backends.values().copied().collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::Proto;

    /// Records map contents and the order of writes.
    #[derive(Default)]
    struct FakeMaps {
        vips: BTreeMap<(u32, u16, u8), VipMeta>,
        backends: BTreeMap<u32, Backend>,
        ring: BTreeMap<u32, u32>,
        log: Vec<String>,
    }

    impl L4Maps for FakeMaps {
        fn set_vip(&mut self, k: VipKey, m: VipMeta) -> Result<(), DataplaneError> {
            self.vips.insert((k.addr, k.port, k.proto), m);
            Ok(())
        }
        fn remove_vip(&mut self, k: VipKey) -> Result<(), DataplaneError> {
            self.vips.remove(&(k.addr, k.port, k.proto));
            Ok(())
        }
        fn set_backend(&mut self, id: u32, b: Backend) -> Result<(), DataplaneError> {
            self.log.push(format!("backend {id} flags {}", b.flags));
            self.backends.insert(id, b);
            Ok(())
        }
        fn set_ring_slot(&mut self, i: u32, id: u32) -> Result<(), DataplaneError> {
            // The invariant the program relies on: a ring slot never names a backend that is
            // not (yet/any more) in service.
            if id != RING_EMPTY {
                let b = self.backends.get(&id).copied().unwrap_or_default();
                assert_eq!(
                    b.flags, BACKEND_F_IN_SERVICE,
                    "slot {i} -> backend {id} not in service"
                );
            }
            self.ring.insert(i, id);
            Ok(())
        }
        fn reset_backend_counters(&mut self, _id: u32) -> Result<(), DataplaneError> {
            Ok(())
        }
    }

    const M: u32 = 251;

    fn vip(port: u16) -> VipSpec {
        VipSpec {
            name: Some("web".into()),
            vip: VipAddr {
                addr: Ipv4Addr::new(10, 100, 0, 1),
                port,
                proto: Proto::Tcp,
            },
        }
    }

    fn target(last: u8) -> L4Target {
        L4Target {
            addr: Ipv4Addr::new(10, 0, 0, last),
            port: 80,
            weight: 1,
        }
    }

    fn ring_of(r: &L4Registry<FakeMaps>, vip_id: u32) -> Vec<u32> {
        (0..M).map(|s| r.maps.ring[&(vip_id * M + s)]).collect()
    }

    #[test]
    fn a_new_vip_has_an_empty_ring_and_a_map_entry() {
        let mut r = L4Registry::new(FakeMaps::default(), M, 4, 16);
        r.add_vip(vip(80)).unwrap();
        assert!(ring_of(&r, 0).iter().all(|&s| s == RING_EMPTY));
        let key = (u32::from_ne_bytes([10, 100, 0, 1]), 80u16.to_be(), 6);
        assert_eq!(r.maps.vips[&key].vip_id, 0);
        let marker = (u32::from_ne_bytes([10, 100, 0, 1]), 0u16, VIP_MARKER_PROTO);
        assert_eq!(r.maps.vips[&marker].flags, VIP_F_HAS_TCP);
        let mut udp = vip(53);
        udp.vip.proto = Proto::Udp;
        udp.name = None;
        r.add_vip(udp).unwrap();
        assert_eq!(r.maps.vips[&marker].flags, VIP_F_HAS_TCP | VIP_F_HAS_UDP);
        assert!(matches!(r.add_vip(vip(80)), Err(L4Error::VipExists(_))));
        assert_eq!(r.resolve("web"), Some(vip(80).vip));
        assert_eq!(r.resolve("10.100.0.1:80/tcp"), Some(vip(80).vip));
    }

    #[test]
    fn registering_fills_the_ring_with_in_service_backends() {
        let mut r = L4Registry::new(FakeMaps::default(), M, 4, 16);
        r.add_vip(vip(80)).unwrap();
        let changed = r
            .register(&vip(80).vip, &[target(11), target(12), target(13)])
            .unwrap();
        assert_eq!(changed, M as usize);
        let ring = ring_of(&r, 0);
        for id in 0..3 {
            assert!(ring.contains(&id), "backend {id} owns no slot");
            assert_eq!(
                r.maps.backends[&id].addr,
                u32::from_ne_bytes([10, 0, 0, 11 + id as u8])
            );
            assert_eq!(r.maps.backends[&id].vip_id, 0);
        }
    }

    #[test]
    fn removing_a_backend_rewrites_only_its_slots_then_clears_it() {
        let mut r = L4Registry::new(FakeMaps::default(), M, 4, 16);
        r.add_vip(vip(80)).unwrap();
        r.register(&vip(80).vip, &[target(11), target(12), target(13)])
            .unwrap();
        let before = ring_of(&r, 0);
        let owned = before.iter().filter(|&&id| id == 1).count();
        r.maps.log.clear();
        let changed = r
            .deregister(&vip(80).vip, &[(Ipv4Addr::new(10, 0, 0, 12), 80)])
            .unwrap();
        let after = ring_of(&r, 0);
        assert!(!after.contains(&1));
        assert!(
            changed >= owned && changed <= owned + (M as usize) / 50,
            "{changed} vs {owned}"
        );
        // Slots of the others that did not belong to the removed one mostly stay.
        let kept = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 1 && b == a)
            .count();
        assert!(kept as f64 >= (M as usize - owned) as f64 * 0.95);
        // The backend entry is cleared after the ring moved away (the fake asserts the
        // ring never names a backend out of service).
        assert_eq!(r.maps.log.last().unwrap(), "backend 1 flags 0");
        assert_eq!(r.maps.backends[&1], Backend::default());
    }

    #[test]
    fn released_ids_are_reused_only_after_fresh_ones_run_out() {
        let mut r = L4Registry::new(FakeMaps::default(), M, 4, 3);
        r.add_vip(vip(80)).unwrap();
        r.register(&vip(80).vip, &[target(11), target(12)]).unwrap();
        r.deregister(&vip(80).vip, &[(Ipv4Addr::new(10, 0, 0, 11), 80)])
            .unwrap();
        r.register(&vip(80).vip, &[target(13)]).unwrap();
        let ids: Vec<u32> = r.describe()[0].2.iter().map(|b| b.id).collect();
        assert_eq!(ids, vec![1, 2], "fresh id 2 used before released id 0");
        r.register(&vip(80).vip, &[target(14)]).unwrap();
        assert!(r.describe()[0].2.iter().any(|b| b.id == 0));
        assert!(matches!(
            r.register(&vip(80).vip, &[target(15)]),
            Err(L4Error::Full(_))
        ));
    }

    #[test]
    fn duplicate_and_unknown_targets_are_refused_without_changes() {
        let mut r = L4Registry::new(FakeMaps::default(), M, 4, 16);
        r.add_vip(vip(80)).unwrap();
        r.register(&vip(80).vip, &[target(11)]).unwrap();
        let ring = ring_of(&r, 0);
        assert!(matches!(
            r.register(&vip(80).vip, &[target(12), target(11)]),
            Err(L4Error::TargetExists { .. })
        ));
        assert!(matches!(
            r.deregister(&vip(80).vip, &[(Ipv4Addr::new(10, 0, 0, 99), 80)]),
            Err(L4Error::NoSuchTarget { .. })
        ));
        assert_eq!(ring, ring_of(&r, 0));
        assert_eq!(r.describe()[0].2.len(), 1);
    }

    #[test]
    fn removing_the_last_backend_empties_the_ring() {
        let mut r = L4Registry::new(FakeMaps::default(), M, 4, 16);
        r.add_vip(vip(80)).unwrap();
        r.register(&vip(80).vip, &[target(11)]).unwrap();
        r.deregister(&vip(80).vip, &[(Ipv4Addr::new(10, 0, 0, 11), 80)])
            .unwrap();
        assert!(ring_of(&r, 0).iter().all(|&s| s == RING_EMPTY));
    }
}
