//! The L4 ring writer: brings `lb_xdp`'s maps in line with the registry's view of each VIP's
//! target group.
//!
//! Two facts per backend are kept apart, as the architecture asks:
//! - *in the ring*: Maglev slots name it, so it takes new flows;
//! - *active* ([`BACKEND_F_ACTIVE`]): flows pinned to it keep being forwarded. A draining or
//!   unhealthy-draining target leaves the ring but stays active until its time is up.
//!
//! Ordering rules, so the program never steers a packet to something half-written:
//! - a backend entry is written (active) before any ring slot names it;
//! - a backend leaves the ring (its slots move) before its entry loses the active bit or is
//!   cleared; flows pinned to it are then re-steered on their next packet;
//! - only ring slots whose backend changed are rewritten (Maglev keeps that to ~1/N);
//! - a departed backend's flow-table entries are deleted, and its id is reused only after
//!   every never-used id is gone.
//!
//! Guards ([`RingWriter::set_guards`]) follow the same idea: new trie entries first, then the
//! VIP's flags, then the entries that left, so a change never opens a window in which a
//! source both lists admit is dropped, or one they refuse passes.
//!
//! A writer can start from maps a previous `lb run` left pinned ([`RingWriter::adopt`]): it
//! keeps the VIP and backend ids the flow table refers to and the ring as it is, so the first
//! [`RingWriter::apply`] rewrites only what the new configuration changes.
//!
//! Map access goes through [`L4Maps`], implemented by [`crate::dataplane::Maps`] and by a
//! recording fake in the tests, so all of this is tested without a kernel.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;

use lb_common::{
    BACKEND_F_ACTIVE, BACKEND_F_IN_RING, Backend, CONFIG_F_NAT, GuardKey, RING_EMPTY,
    VIP_F_ALLOW_LIST, VIP_F_DENY_LIST, VIP_F_FAIL_OPEN, VIP_F_HAS_TCP, VIP_F_HAS_UDP, VIP_F_NAT,
    VIP_MARKER_ID, VIP_MARKER_PROTO, VipKey, VipMeta,
};

use super::guards::Guards;
use super::vip::{Proto, VipAddr, VipMode, VipSpec};
use crate::{
    dataplane::{DataplaneError, Maps},
    maglev,
};

/// What the ring writer reads and writes. Addresses and ports in the map types are in
/// network order.
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
    /// Folds backend `id`'s counters into what VIP `vip_id`'s departed backends had counted,
    /// once, right after its entry was cleared (see [`lb_common::Counters`]).
    fn retire_backend_counters(&mut self, id: u32, vip_id: u32) -> Result<(), DataplaneError>;
    /// Zeroes what VIP `id`'s departed backends had counted before the id is (re)used.
    fn reset_vip_counters(&mut self, id: u32) -> Result<(), DataplaneError>;
    /// Deletes every flow-table entry pinned to one of `ids` (one walk of the table);
    /// returns how many.
    fn remove_flows_of(&mut self, ids: &BTreeSet<u32>) -> Result<usize, DataplaneError>;
    /// Every entry of the VIP table, address markers included.
    fn vip_entries(&self) -> Result<Vec<(VipKey, VipMeta)>, DataplaneError>;
    /// Every backend entry that is not empty, with its id.
    fn backend_entries(&self) -> Result<Vec<(u32, Backend)>, DataplaneError>;
    /// `len` ring slots from `index` on.
    fn ring_slots(&self, index: u32, len: u32) -> Result<Vec<u32>, DataplaneError>;
    /// Sets `LB_CONFIG.flags` (the rest of the settings stay).
    fn set_config_flags(&mut self, flags: u32) -> Result<(), DataplaneError>;
    /// Every entry of both guard tries: (list, prefix length, key).
    fn guard_entries(&self) -> Result<Vec<(GuardList, u32, GuardKey)>, DataplaneError>;
    /// Adds a guard trie entry.
    fn set_guard(
        &mut self,
        list: GuardList,
        prefix: u32,
        key: GuardKey,
    ) -> Result<(), DataplaneError>;
    /// Removes a guard trie entry.
    fn remove_guard(
        &mut self,
        list: GuardList,
        prefix: u32,
        key: GuardKey,
    ) -> Result<(), DataplaneError>;
    /// Zeroes VIP `id`'s guard counters before the id is (re)used.
    fn reset_guard_counters(&mut self, id: u32) -> Result<(), DataplaneError>;
}

/// Which guard trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GuardList {
    /// `LB_GUARD_ALLOW`.
    Allow,
    /// `LB_GUARD_DENY`.
    Deny,
}

fn map_error(what: String) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { what, source }
}

impl L4Maps for Maps {
    fn set_vip(&mut self, key: VipKey, meta: VipMeta) -> Result<(), DataplaneError> {
        self.vips
            .insert(key, meta, 0)
            .map_err(map_error("writing LB_VIPS".into()))
    }
    fn remove_vip(&mut self, key: VipKey) -> Result<(), DataplaneError> {
        self.vips
            .remove(&key)
            .map_err(map_error("removing from LB_VIPS".into()))
    }
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), DataplaneError> {
        self.backends
            .set(id, backend, 0)
            .map_err(map_error(format!("writing LB_BACKENDS[{id}]")))?;
        // The bump is what invalidates a rewritten slot's cached next hop: `lb_xdp` no longer
        // compares the entry's address with the backend's, it reads the generation before the
        // backend's entry and trusts it (lb-ebpf/src/nexthop.rs, `generation`). It also covers a
        // change of mode (DSR and NAT resolve from different sources). Keep it after the write.
        self.bump_nexthop_generation().map(|_| ())
    }
    fn set_ring_slot(&mut self, index: u32, backend_id: u32) -> Result<(), DataplaneError> {
        self.rings
            .set(index, backend_id, 0)
            .map_err(map_error(format!("writing LB_RINGS[{index}]")))
    }
    fn reset_backend_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
        Maps::reset_backend_counters(self, id)
    }
    fn retire_backend_counters(&mut self, id: u32, vip_id: u32) -> Result<(), DataplaneError> {
        Maps::retire_backend_counters(self, id, vip_id)
    }
    fn reset_vip_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
        Maps::reset_vip_counters(self, id)
    }
    fn remove_flows_of(&mut self, ids: &BTreeSet<u32>) -> Result<usize, DataplaneError> {
        Maps::remove_flows_of(self, ids)
    }
    fn vip_entries(&self) -> Result<Vec<(VipKey, VipMeta)>, DataplaneError> {
        self.vips
            .iter()
            .map(|e| e.map_err(map_error("reading LB_VIPS".into())))
            .collect()
    }
    fn backend_entries(&self) -> Result<Vec<(u32, Backend)>, DataplaneError> {
        Maps::backend_entries(self)
    }
    fn ring_slots(&self, index: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
        (index..index + len)
            .map(|i| {
                self.rings
                    .get(&i, 0)
                    .map_err(map_error(format!("reading LB_RINGS[{i}]")))
            })
            .collect()
    }
    fn set_config_flags(&mut self, flags: u32) -> Result<(), DataplaneError> {
        self.update_lb_config(|cfg| cfg.flags = flags).map(|_| ())
    }
    fn guard_entries(&self) -> Result<Vec<(GuardList, u32, GuardKey)>, DataplaneError> {
        let mut out = Vec::new();
        for (list, trie, name) in [
            (GuardList::Allow, &self.guard_allow, "LB_GUARD_ALLOW"),
            (GuardList::Deny, &self.guard_deny, "LB_GUARD_DENY"),
        ] {
            for k in trie.keys() {
                let k = k.map_err(map_error(format!("reading {name}")))?;
                out.push((list, k.prefix_len(), k.data()));
            }
        }
        Ok(out)
    }
    fn set_guard(
        &mut self,
        list: GuardList,
        prefix: u32,
        key: GuardKey,
    ) -> Result<(), DataplaneError> {
        let k = aya::maps::lpm_trie::Key::new(prefix, key);
        match list {
            GuardList::Allow => self.guard_allow.insert(&k, 1, 0),
            GuardList::Deny => self.guard_deny.insert(&k, 1, 0),
        }
        .map_err(map_error(format!("writing the {list:?} list")))
    }
    fn remove_guard(
        &mut self,
        list: GuardList,
        prefix: u32,
        key: GuardKey,
    ) -> Result<(), DataplaneError> {
        let k = aya::maps::lpm_trie::Key::new(prefix, key);
        match list {
            GuardList::Allow => self.guard_allow.remove(&k),
            GuardList::Deny => self.guard_deny.remove(&k),
        }
        .map_err(map_error(format!("removing from the {list:?} list")))
    }
    fn reset_guard_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
        Maps::reset_guard_counters(self, id)
    }
}

/// Ring writer errors.
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
    /// Out of VIP or backend ids.
    #[error("the maps are full: {0} (raise --max-vips / --max-backends)")]
    Full(&'static str),
    /// Guards that do not fit the VIP.
    #[error("VIP {vip}: {problem}")]
    InvalidGuards {
        /// The VIP.
        vip: VipAddr,
        /// What is wrong.
        problem: String,
    },
}

/// One target of a VIP as the registry sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4Member {
    /// Backend address (outer destination of encapsulated packets; its family is the outer
    /// header's).
    pub addr: IpAddr,
    /// Backend port (the VIP port under DSR; 0 for every-port VIPs).
    pub port: u16,
    /// Maglev weight.
    pub weight: u32,
    /// In the ring: takes new flows.
    pub takes_new: bool,
    /// Keeps forwarding the flows pinned to it (always true when `takes_new`).
    pub keeps_existing: bool,
}

impl L4Member {
    /// A member in service: in the ring, keeping its flows.
    pub fn in_service(addr: IpAddr, port: u16, weight: u32) -> Self {
        Self {
            addr,
            port,
            weight,
            takes_new: true,
            keeps_existing: true,
        }
    }

    fn flags(&self) -> u8 {
        let mut f = 0;
        if self.keeps_existing || self.takes_new {
            f |= BACKEND_F_ACTIVE;
        }
        if self.takes_new {
            f |= BACKEND_F_IN_RING;
        }
        f
    }

    /// The member a backend entry describes; None for an empty or unreadable entry.
    fn from_entry(b: &Backend) -> Option<Self> {
        Some(Self {
            addr: lb_common::addr_from_map(b.family, b.addr)?,
            port: u16::from_be(b.port),
            weight: b.weight,
            takes_new: b.flags & BACKEND_F_IN_RING != 0,
            keeps_existing: b.flags & BACKEND_F_ACTIVE != 0,
        })
    }
}

/// One backend of a VIP: its id (index in LB_BACKENDS and LB_BACKEND_STATS) and what it was
/// last written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Its id.
    pub id: u32,
    /// The member as last applied.
    pub member: L4Member,
}

/// What one [`RingWriter::apply`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Ring slots rewritten.
    pub slots: usize,
    /// Backends added.
    pub added: usize,
    /// Backends removed (their entries cleared, flows deleted, ids released).
    pub removed: usize,
    /// Flow-table entries deleted with removed backends.
    pub flows_removed: usize,
}

/// One configured VIP found in pinned maps by [`RingWriter::adopt`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedVip {
    /// The VIP.
    pub vip: VipAddr,
    /// Its id (kept).
    pub id: u32,
    /// Whether its group failed open when the maps were last written.
    pub fail_open: bool,
    /// Its backends as the maps held them (ids kept).
    pub backends: Vec<BackendInfo>,
}

/// What [`RingWriter::adopt`] found in the maps and did with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Configured VIPs found, with their backends.
    pub vips: Vec<AdoptedVip>,
    /// VIPs in the maps that are not configured any more: removed, with their backends and
    /// flows.
    pub removed_vips: Vec<VipAddr>,
    /// Backend entries of no VIP (or of a removed one) cleared.
    pub backends_cleared: usize,
    /// Flow-table entries deleted with them.
    pub flows_removed: usize,
}

#[derive(Debug)]
struct VipEntry {
    spec: VipSpec,
    id: u32,
    /// Keyed by (addr, port): the target identity.
    backends: BTreeMap<(IpAddr, u16), BackendInfo>,
    /// Backend id per slot, as last written.
    ring: Vec<u32>,
    fail_open: bool,
}

impl VipEntry {
    fn meta(&self) -> VipMeta {
        let VipSpec {
            mode,
            guards,
            idle_timeout,
            ..
        } = &self.spec;
        let mut flags = 0;
        if self.fail_open {
            flags |= VIP_F_FAIL_OPEN;
        }
        if *mode == VipMode::Nat {
            flags |= VIP_F_NAT;
        }
        if !guards.allow.is_empty() {
            flags |= VIP_F_ALLOW_LIST;
        }
        if !guards.deny.is_empty() {
            flags |= VIP_F_DENY_LIST;
        }
        VipMeta {
            vip_id: self.id,
            flags,
            idle_timeout_ns: u64::try_from(idle_timeout.as_nanos()).unwrap_or(u64::MAX),
            rate_interval_ns: guards.rate.map_or(0, |r| r.interval_ns()),
            rate_tolerance_ns: guards.rate.map_or(0, |r| r.tolerance_ns()),
        }
    }
}

/// The trie entries `guards` of VIP `id` need.
fn guard_entries_of(id: u32, guards: &Guards) -> BTreeSet<(GuardList, u32, GuardKey)> {
    let allow = guards.allow.iter().map(|c| (GuardList::Allow, c));
    let deny = guards.deny.iter().map(|c| (GuardList::Deny, c));
    allow
        .chain(deny)
        .map(|(list, c)| {
            let (prefix, key) = c.guard_key(id);
            (list, prefix, key)
        })
        .collect()
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
    /// A pool in which `used` are taken: ids above the highest used one are fresh, free ids
    /// below it count as released (an earlier run may have used them).
    fn with_used(max: u32, used: &BTreeSet<u32>) -> Self {
        let next = used.last().map_or(0, |&m| m + 1).min(max);
        Self {
            next,
            max,
            released: (0..next).filter(|id| !used.contains(id)).collect(),
        }
    }
    fn available(&self) -> usize {
        (self.max - self.next) as usize + self.released.len()
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

/// The VIPs and backends `lb_xdp` serves, as last written to the maps.
pub struct RingWriter<M: L4Maps> {
    maps: M,
    ring_size: u32,
    vips: BTreeMap<VipAddr, VipEntry>,
    vip_ids: IdPool,
    backend_ids: IdPool,
}

impl<M: L4Maps> RingWriter<M> {
    /// An empty writer for `maps`.
    pub fn new(maps: M, ring_size: u32, max_vips: u32, max_backends: u32) -> Self {
        Self {
            maps,
            ring_size,
            vips: BTreeMap::new(),
            vip_ids: IdPool::new(max_vips),
            backend_ids: IdPool::new(max_backends),
        }
    }

    /// A writer for maps that may hold a previous run's state, serving exactly `vips`:
    /// - a configured VIP found in the maps keeps its id, ring and backends (with their ids),
    ///   and gets its configured idle timeout; the first [`Self::apply`] then moves only what
    ///   changed;
    /// - a VIP in the maps that is not configured is removed, with its backends' entries and
    ///   flows (after its ring is emptied, so nothing steers to a cleared entry);
    /// - backend entries that belong to no VIP are cleared with their flows;
    /// - configured VIPs not in the maps are added as by [`Self::add_vip`].
    ///
    /// On empty maps this is [`Self::new`] followed by [`Self::add_vip`] for each VIP.
    pub fn adopt(
        maps: M,
        ring_size: u32,
        max_vips: u32,
        max_backends: u32,
        vips: &[VipSpec],
    ) -> Result<(Self, Adoption), L4Error> {
        let vip_entries = maps.vip_entries()?;
        let backend_entries = maps.backend_entries()?;
        let wanted: BTreeMap<VipAddr, &VipSpec> = vips.iter().map(|v| (v.vip, v)).collect();
        let mut adoption = Adoption::default();
        let mut this = Self::new(maps, ring_size, max_vips, max_backends);

        let mut stale_keys: Vec<VipKey> = Vec::new();
        let mut stale_ids: Vec<u32> = Vec::new();
        for (key, meta) in &vip_entries {
            if key.proto == VIP_MARKER_PROTO {
                // Rewritten below for the configured addresses.
                stale_keys.push(*key);
                continue;
            }
            let known = VipAddr::from_map_key(key);
            let spec = known.and_then(|v| wanted.get(&v));
            let usable = meta.vip_id < max_vips
                && !this.vips.values().any(|e: &VipEntry| e.id == meta.vip_id);
            let (Some(vip), Some(spec), true) = (known, spec, usable) else {
                stale_keys.push(*key);
                if meta.vip_id < max_vips {
                    stale_ids.push(meta.vip_id);
                }
                if let Some(v) = known {
                    adoption.removed_vips.push(v);
                }
                continue;
            };
            let ring = this.maps.ring_slots(meta.vip_id * ring_size, ring_size)?;
            let backends: BTreeMap<(IpAddr, u16), BackendInfo> = backend_entries
                .iter()
                .filter(|(_, b)| b.vip_id == meta.vip_id)
                .filter_map(|(id, b)| {
                    let member = L4Member::from_entry(b)?;
                    Some(((member.addr, member.port), BackendInfo { id: *id, member }))
                })
                .collect();
            adoption.vips.push(AdoptedVip {
                vip,
                id: meta.vip_id,
                fail_open: meta.flags & VIP_F_FAIL_OPEN != 0,
                backends: backends.values().copied().collect(),
            });
            this.vips.insert(
                vip,
                VipEntry {
                    spec: (*spec).clone(),
                    id: meta.vip_id,
                    backends,
                    ring,
                    fail_open: meta.flags & VIP_F_FAIL_OPEN != 0,
                },
            );
        }

        let adopted_ids: BTreeSet<u32> = this.vips.values().map(|e| e.id).collect();
        stale_ids.retain(|id| !adopted_ids.contains(id));
        // Retire what is not configured: unreachable first (VIP keys), then its ring, then
        // its backends and their flows.
        for key in stale_keys {
            this.maps.remove_vip(key)?;
        }
        for id in &stale_ids {
            let base = id * ring_size;
            let ring = this.maps.ring_slots(base, ring_size)?;
            for (slot, b) in ring.iter().enumerate() {
                if *b != RING_EMPTY {
                    this.maps.set_ring_slot(base + slot as u32, RING_EMPTY)?;
                }
            }
        }
        let kept: BTreeSet<u32> = this
            .vips
            .values()
            .flat_map(|e| e.backends.values().map(|b| b.id))
            .collect();
        let doomed: BTreeSet<u32> = backend_entries
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !kept.contains(id))
            .collect();
        for (id, b) in backend_entries.iter().filter(|(id, _)| doomed.contains(id)) {
            this.maps.set_backend(*id, Backend::default())?;
            // Its VIP's figures no longer include the record: folded in once, here.
            this.maps.retire_backend_counters(*id, b.vip_id)?;
        }
        if !doomed.is_empty() {
            adoption.flows_removed = this.maps.remove_flows_of(&doomed)?;
        }
        adoption.backends_cleared = doomed.len();

        this.vip_ids = IdPool::with_used(max_vips, &adopted_ids);
        this.backend_ids = IdPool::with_used(max_backends, &kept);

        // Guards: the adopted VIPs' entries this run configures are added before their
        // flags say to look them up; entries of anything else go after the flags moved on.
        let present: BTreeSet<(GuardList, u32, GuardKey)> =
            this.maps.guard_entries()?.into_iter().collect();
        let wanted_guards: BTreeSet<(GuardList, u32, GuardKey)> = this
            .vips
            .values()
            .flat_map(|e| guard_entries_of(e.id, &e.spec.guards))
            .collect();
        for (list, prefix, key) in wanted_guards.difference(&present) {
            this.maps.set_guard(*list, *prefix, *key)?;
        }

        // The adopted VIPs' entries carry this run's idle timeouts, modes and guards; every
        // configured address gets its marker back.
        let adopted: Vec<VipAddr> = this.vips.keys().copied().collect();
        for vip in &adopted {
            let meta = this.vips[vip].meta();
            this.maps.set_vip(vip.map_key(), meta)?;
            this.write_marker(vip.addr, vip)?;
        }
        for (list, prefix, key) in present.difference(&wanted_guards) {
            this.maps.remove_guard(*list, *prefix, *key)?;
        }
        for spec in vips {
            if !this.vips.contains_key(&spec.vip) {
                this.add_vip(spec.clone())?;
            }
        }
        this.write_config_flags()?;
        Ok((this, adoption))
    }

    /// `LB_CONFIG.flags` for the VIPs now served (NAT replies are looked for only when a NAT
    /// VIP exists).
    fn write_config_flags(&mut self) -> Result<(), L4Error> {
        let nat = self.vips.values().any(|e| e.spec.mode == VipMode::Nat);
        self.maps
            .set_config_flags(if nat { CONFIG_F_NAT } else { 0 })?;
        Ok(())
    }

    /// Replaces a VIP's guards: new trie entries, then the VIP's flags and rate, then the
    /// entries that left (see the module docs).
    pub fn set_guards(&mut self, vip: &VipAddr, guards: Guards) -> Result<(), L4Error> {
        let entry = self
            .vips
            .get(vip)
            .ok_or_else(|| L4Error::NoSuchVip(vip.to_string()))?;
        guards
            .validate(vip.addr.is_ipv6())
            .map_err(|problem| L4Error::InvalidGuards { vip: *vip, problem })?;
        let old = guard_entries_of(entry.id, &entry.spec.guards);
        let new = guard_entries_of(entry.id, &guards);
        for (list, prefix, key) in new.difference(&old) {
            self.maps.set_guard(*list, *prefix, *key)?;
        }
        let entry = self.vips.get_mut(vip).expect("checked above");
        entry.spec.guards = guards;
        let meta = entry.meta();
        self.maps.set_vip(vip.map_key(), meta)?;
        for (list, prefix, key) in old.difference(&new) {
            self.maps.remove_guard(*list, *prefix, *key)?;
        }
        Ok(())
    }

    /// A VIP's spec and id (its guards as applied).
    pub fn vip(&self, vip: &VipAddr) -> Option<(&VipSpec, u32)> {
        self.vips.get(vip).map(|e| (&e.spec, e.id))
    }

    /// The map writer (the daemon reads counters through it).
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The map writer, to change what the writer does not own (tests age flow entries).
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Writes the address marker of `addr`: one bit per protocol that has a VIP there, `new`
    /// included (it may not be in `self.vips` yet).
    fn write_marker(&mut self, addr: IpAddr, new: &VipAddr) -> Result<(), L4Error> {
        let flags = self
            .vips
            .keys()
            .filter(|v| v.addr == addr)
            .chain([new])
            .fold(0, |f, v| {
                f | match v.proto {
                    Proto::Tcp => VIP_F_HAS_TCP,
                    Proto::Udp => VIP_F_HAS_UDP,
                }
            });
        self.maps.set_vip(
            new.marker_key(),
            VipMeta {
                vip_id: VIP_MARKER_ID,
                flags,
                ..VipMeta::default()
            },
        )?;
        Ok(())
    }

    /// Adds a VIP with no backends (its ring is empty: packets are dropped and counted as
    /// `drop_no_backend` until a target takes flows).
    pub fn add_vip(&mut self, spec: VipSpec) -> Result<(), L4Error> {
        if self.vips.contains_key(&spec.vip) {
            return Err(L4Error::VipExists(spec.vip));
        }
        spec.guards
            .validate(spec.vip.addr.is_ipv6())
            .map_err(|problem| L4Error::InvalidGuards {
                vip: spec.vip,
                problem,
            })?;
        let id = self.vip_ids.take().ok_or(L4Error::Full("VIPs"))?;
        let base = id * self.ring_size;
        for slot in 0..self.ring_size {
            self.maps.set_ring_slot(base + slot, RING_EMPTY)?;
        }
        self.maps.reset_guard_counters(id)?;
        self.maps.reset_vip_counters(id)?;
        for (list, prefix, key) in guard_entries_of(id, &spec.guards) {
            self.maps.set_guard(list, prefix, key)?;
        }
        let entry = VipEntry {
            spec,
            id,
            backends: BTreeMap::new(),
            ring: vec![RING_EMPTY; self.ring_size as usize],
            fail_open: false,
        };
        let vip = entry.spec.vip;
        self.maps.set_vip(vip.map_key(), entry.meta())?;
        // The address marker lets lb_xdp recognise fragments for any VIP of this address.
        self.write_marker(vip.addr, &vip)?;
        self.vips.insert(vip, entry);
        self.write_config_flags()
    }

    /// Finds a VIP by name or `ADDR:PORT/PROTO`.
    pub fn resolve(&self, owner: &str) -> Option<VipAddr> {
        self.vips
            .values()
            .find(|v| v.spec.answers_to(owner))
            .map(|v| v.spec.vip)
    }

    /// The backend id of `addr:port` under `vip`, if it is a member (health checks through
    /// the data path mark their probes with it).
    pub fn backend_id(&self, vip: &VipAddr, addr: IpAddr, port: u16) -> Option<u32> {
        self.vips
            .get(vip)?
            .backends
            .get(&(addr, port))
            .map(|b| b.id)
    }

    /// Brings a VIP's backends and ring in line with `members` (the registry's view of its
    /// target group) and sets its fail-open flag. Members missing from the list are removed.
    /// With duplicate (addr, port) the first wins.
    pub fn apply(
        &mut self,
        vip: &VipAddr,
        members: &[L4Member],
        fail_open: bool,
    ) -> Result<Applied, L4Error> {
        let entry = self
            .vips
            .get(vip)
            .ok_or_else(|| L4Error::NoSuchVip(vip.to_string()))?;
        let vip_id = entry.id;
        let mut wanted: BTreeMap<(IpAddr, u16), L4Member> = BTreeMap::new();
        for m in members {
            wanted.entry((m.addr, m.port)).or_insert(*m);
        }
        let new_count = wanted
            .keys()
            .filter(|k| !entry.backends.contains_key(k))
            .count();
        if new_count > self.backend_ids.available() {
            return Err(L4Error::Full("backends"));
        }
        let mut applied = Applied::default();

        // 1. New backends, and backends gaining a bit or changing weight: written first.
        let mut later: Vec<(u32, L4Member)> = Vec::new();
        for (key, m) in &wanted {
            let entry = self.vips.get_mut(vip).expect("checked above");
            match entry.backends.get(key).copied() {
                None => {
                    let id = self.backend_ids.take().ok_or(L4Error::Full("backends"))?;
                    self.maps.reset_backend_counters(id)?;
                    self.maps.set_backend(id, backend_entry(m, vip_id))?;
                    entry.backends.insert(*key, BackendInfo { id, member: *m });
                    applied.added += 1;
                }
                Some(old) if old.member == *m => {}
                Some(old) => {
                    let (was, now) = (old.member.flags(), m.flags());
                    if was & !now != 0 {
                        // Losing a bit (it cannot gain one at the same time: in the ring
                        // implies active): after the ring moved away.
                        later.push((old.id, *m));
                    } else {
                        self.maps.set_backend(old.id, backend_entry(m, vip_id))?;
                    }
                    entry.backends.insert(
                        *key,
                        BackendInfo {
                            id: old.id,
                            member: *m,
                        },
                    );
                }
            }
        }
        // Members that left: out of the model now, out of the maps after the ring.
        let entry = self.vips.get_mut(vip).expect("checked above");
        let gone: Vec<BackendInfo> = entry
            .backends
            .iter()
            .filter(|(k, _)| !wanted.contains_key(k))
            .map(|(_, b)| *b)
            .collect();
        for b in &gone {
            entry.backends.remove(&(b.member.addr, b.member.port));
        }

        // 2. The ring.
        applied.slots = self.rebuild(vip)?;

        // 3. Bits lost, departures, the fail-open flag.
        for (id, m) in later {
            self.maps.set_backend(id, backend_entry(&m, vip_id))?;
        }
        for b in &gone {
            self.maps.set_backend(b.id, Backend::default())?;
            // The VIP's figures no longer include the record: folded in once, here.
            self.maps.retire_backend_counters(b.id, vip_id)?;
        }
        if !gone.is_empty() {
            let ids: BTreeSet<u32> = gone.iter().map(|b| b.id).collect();
            applied.flows_removed += self.maps.remove_flows_of(&ids)?;
            for b in &gone {
                self.backend_ids.give_back(b.id);
            }
            applied.removed += gone.len();
        }
        let entry = self.vips.get_mut(vip).expect("checked above");
        if entry.fail_open != fail_open {
            entry.fail_open = fail_open;
            let meta = entry.meta();
            self.maps.set_vip(vip.map_key(), meta)?;
        }
        Ok(applied)
    }

    /// Recomputes a VIP's ring from its members that take new flows and writes the slots
    /// that changed; returns how many.
    fn rebuild(&mut self, vip: &VipAddr) -> Result<usize, L4Error> {
        let entry = self.vips.get_mut(vip).expect("caller checked");
        let infos: Vec<BackendInfo> = entry
            .backends
            .values()
            .filter(|b| b.member.takes_new)
            .copied()
            .collect();
        let members: Vec<maglev::Member> = infos
            .iter()
            .map(|b| maglev::Member {
                addr: b.member.addr,
                port: b.member.port,
                weight: b.member.weight,
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

    /// Every VIP with its id and backends, in address order.
    pub fn describe(&self) -> Vec<(VipSpec, u32, Vec<BackendInfo>)> {
        self.vips
            .values()
            .map(|e| (e.spec.clone(), e.id, e.backends.values().copied().collect()))
            .collect()
    }
}

fn backend_entry(m: &L4Member, vip_id: u32) -> Backend {
    let (family, addr) = lb_common::addr_to_map(m.addr);
    Backend {
        addr,
        port: m.port.to_be(),
        flags: m.flags(),
        family,
        vip_id,
        weight: m.weight,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// Records map contents and the order of writes, and checks on every write the
    /// invariant `lb_xdp` relies on: a ring slot never names a backend that is not active.
    #[derive(Default)]
    struct FakeMaps {
        vips: BTreeMap<([u32; 4], u16, u8, u8), VipMeta>,
        backends: BTreeMap<u32, Backend>,
        ring: BTreeMap<u32, u32>,
        flows: Vec<u32>,
        log: Vec<String>,
        config_flags: u32,
        guards: BTreeSet<(GuardList, u32, GuardKey)>,
        /// Backend records (what `lb_xdp` counts), by id.
        records: BTreeMap<u32, lb_common::Counters>,
        /// `LB_RETIRED_STATS` by index (0: all, 1 + vip id).
        retired: BTreeMap<u32, lb_common::Counters>,
    }

    impl FakeMaps {
        /// The backends in use and their records, as `Maps::backend_records` reads them.
        fn backend_records(&self) -> Vec<crate::dataplane::BackendRecord> {
            self.backends
                .iter()
                .filter(|(_, b)| **b != Backend::default())
                .map(|(id, b)| crate::dataplane::BackendRecord {
                    id: *id,
                    backend: *b,
                    counters: self.records.get(id).copied().unwrap_or_default(),
                })
                .collect()
        }

        /// VIP `vip_id`'s figures as `lb stats` and the metrics derive them.
        fn vip_figures(&self, vip_id: u32) -> lb_common::Counters {
            let retired = self.retired.get(&(vip_id + 1)).copied().unwrap_or_default();
            crate::dataplane::vip_figures(vip_id, &self.backend_records(), retired)
        }

        /// The sum `Maps::reason_totals` derives `tx` from: every backend entry in use and
        /// all departed backends.
        fn all_records(&self) -> lb_common::Counters {
            let retired = self.retired.get(&0).copied().unwrap_or_default();
            crate::dataplane::all_figures(&self.backend_records(), retired)
        }

        /// `lb_xdp` forwarding `n` packets of one byte each to backend `id` (`XDP_TX`).
        fn forward(&mut self, id: u32, n: u64) {
            let c = self.records.entry(id).or_default();
            c.packets += n;
            c.bytes += n;
        }
    }

    fn vkey(k: &VipKey) -> ([u32; 4], u16, u8, u8) {
        (k.addr, k.port, k.proto, k.family)
    }

    impl L4Maps for FakeMaps {
        fn set_vip(&mut self, k: VipKey, m: VipMeta) -> Result<(), DataplaneError> {
            if k.proto != VIP_MARKER_PROTO {
                self.log
                    .push(format!("vip {} flags {:#x}", m.vip_id, m.flags));
            }
            self.vips.insert(vkey(&k), m);
            Ok(())
        }
        fn remove_vip(&mut self, k: VipKey) -> Result<(), DataplaneError> {
            self.vips.remove(&vkey(&k));
            Ok(())
        }
        fn set_backend(&mut self, id: u32, b: Backend) -> Result<(), DataplaneError> {
            if b.flags & BACKEND_F_ACTIVE == 0 {
                let named = self.ring.values().any(|&r| r == id);
                assert!(
                    !named,
                    "backend {id} deactivated while a ring slot names it"
                );
            }
            self.log.push(format!("backend {id} flags {}", b.flags));
            self.backends.insert(id, b);
            Ok(())
        }
        fn set_ring_slot(&mut self, i: u32, id: u32) -> Result<(), DataplaneError> {
            if id != RING_EMPTY {
                let b = self.backends.get(&id).copied().unwrap_or_default();
                assert!(
                    b.flags & BACKEND_F_ACTIVE != 0,
                    "slot {i} -> backend {id} not active"
                );
            }
            self.ring.insert(i, id);
            Ok(())
        }
        fn reset_backend_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
            self.records.remove(&id);
            Ok(())
        }
        fn retire_backend_counters(&mut self, id: u32, vip_id: u32) -> Result<(), DataplaneError> {
            assert_eq!(
                self.backends.get(&id).copied().unwrap_or_default(),
                Backend::default(),
                "backend {id} retired while its entry still counts for its VIP"
            );
            let c = self.records.get(&id).copied().unwrap_or_default();
            for i in [0, vip_id + 1] {
                let r = self.retired.entry(i).or_default();
                *r = r.plus(c);
            }
            Ok(())
        }
        fn reset_vip_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
            self.retired.remove(&(id + 1));
            Ok(())
        }
        fn remove_flows_of(&mut self, ids: &BTreeSet<u32>) -> Result<usize, DataplaneError> {
            let before = self.flows.len();
            self.flows.retain(|f| !ids.contains(f));
            self.log.push(format!("flows of {ids:?} removed"));
            Ok(before - self.flows.len())
        }
        fn vip_entries(&self) -> Result<Vec<(VipKey, VipMeta)>, DataplaneError> {
            Ok(self
                .vips
                .iter()
                .map(|(&(addr, port, proto, family), m)| {
                    (
                        VipKey {
                            addr,
                            port,
                            proto,
                            family,
                        },
                        *m,
                    )
                })
                .collect())
        }
        fn backend_entries(&self) -> Result<Vec<(u32, Backend)>, DataplaneError> {
            Ok(self
                .backends
                .iter()
                .filter(|(_, b)| **b != Backend::default())
                .map(|(id, b)| (*id, *b))
                .collect())
        }
        fn ring_slots(&self, index: u32, len: u32) -> Result<Vec<u32>, DataplaneError> {
            Ok((index..index + len)
                .map(|i| self.ring.get(&i).copied().unwrap_or(0))
                .collect())
        }
        fn set_config_flags(&mut self, flags: u32) -> Result<(), DataplaneError> {
            self.config_flags = flags;
            Ok(())
        }
        fn guard_entries(&self) -> Result<Vec<(GuardList, u32, GuardKey)>, DataplaneError> {
            Ok(self.guards.iter().copied().collect())
        }
        fn set_guard(
            &mut self,
            list: GuardList,
            prefix: u32,
            key: GuardKey,
        ) -> Result<(), DataplaneError> {
            self.log
                .push(format!("guard {list:?} +{prefix} vip {}", key.vip_id));
            self.guards.insert((list, prefix, key));
            Ok(())
        }
        fn remove_guard(
            &mut self,
            list: GuardList,
            prefix: u32,
            key: GuardKey,
        ) -> Result<(), DataplaneError> {
            self.log
                .push(format!("guard {list:?} -{prefix} vip {}", key.vip_id));
            self.guards.remove(&(list, prefix, key));
            Ok(())
        }
        fn reset_guard_counters(&mut self, _id: u32) -> Result<(), DataplaneError> {
            Ok(())
        }
    }

    const M: u32 = 251;

    fn vip(port: u16) -> VipSpec {
        VipSpec::new(
            Some("web".into()),
            VipAddr {
                addr: Ipv4Addr::new(10, 100, 0, 1).into(),
                port,
                proto: Proto::Tcp,
            },
        )
    }

    fn member(last: u8) -> L4Member {
        L4Member::in_service(Ipv4Addr::new(10, 0, 0, last).into(), 80, 1)
    }

    fn v4_words(a: [u8; 4]) -> [u32; 4] {
        [u32::from_ne_bytes(a), 0, 0, 0]
    }

    fn ring_of(r: &RingWriter<FakeMaps>, vip_id: u32) -> Vec<u32> {
        (0..M).map(|s| r.maps.ring[&(vip_id * M + s)]).collect()
    }

    fn writer() -> RingWriter<FakeMaps> {
        let mut r = RingWriter::new(FakeMaps::default(), M, 4, 16);
        r.add_vip(vip(80)).unwrap();
        r
    }

    #[test]
    fn a_new_vip_has_an_empty_ring_and_a_map_entry() {
        let mut r = writer();
        assert!(ring_of(&r, 0).iter().all(|&s| s == RING_EMPTY));
        let key = (
            v4_words([10, 100, 0, 1]),
            80u16.to_be(),
            6,
            lb_common::FAMILY_V4,
        );
        assert_eq!(r.maps.vips[&key].vip_id, 0);
        assert_eq!(
            r.maps.vips[&key].idle_timeout_ns, 350_000_000_000,
            "NLB's TCP idle timeout"
        );
        let marker = (
            v4_words([10, 100, 0, 1]),
            0u16,
            VIP_MARKER_PROTO,
            lb_common::FAMILY_V4,
        );
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
    fn members_in_service_fill_the_ring() {
        let mut r = writer();
        let applied = r
            .apply(&vip(80).vip, &[member(11), member(12), member(13)], false)
            .unwrap();
        assert_eq!((applied.slots, applied.added), (M as usize, 3));
        let ring = ring_of(&r, 0);
        for id in 0..3 {
            assert!(ring.contains(&id), "backend {id} owns no slot");
            let b = r.maps.backends[&id];
            assert_eq!(b.addr, v4_words([10, 0, 0, 11 + id as u8]));
            assert_eq!(b.family, lb_common::FAMILY_V4);
            assert_eq!(b.flags, BACKEND_F_ACTIVE | BACKEND_F_IN_RING);
            assert_eq!(b.vip_id, 0);
        }
        // The same view again changes nothing.
        let again = r
            .apply(&vip(80).vip, &[member(11), member(12), member(13)], false)
            .unwrap();
        assert_eq!(again, Applied::default());
    }

    #[test]
    fn removing_a_member_rewrites_only_its_slots_then_clears_it_and_its_flows() {
        let mut r = writer();
        r.apply(&vip(80).vip, &[member(11), member(12), member(13)], false)
            .unwrap();
        r.maps.flows = vec![0, 1, 1, 2];
        let before = ring_of(&r, 0);
        let owned = before.iter().filter(|&&id| id == 1).count();
        r.maps.log.clear();
        let applied = r
            .apply(&vip(80).vip, &[member(11), member(13)], false)
            .unwrap();
        let after = ring_of(&r, 0);
        assert!(!after.contains(&1));
        // Maglev's disruption is near-minimal: the removed backend's slots, and few others.
        assert!(
            applied.slots >= owned && applied.slots <= owned + (M as usize) / 50,
            "{} slots moved, {owned} were the removed backend's",
            applied.slots
        );
        let kept = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 1 && b == a)
            .count();
        assert!(kept as f64 >= (M as usize - owned) as f64 * 0.95);
        assert_eq!(
            r.maps.log,
            ["backend 1 flags 0", "flows of {1} removed"],
            "cleared after the ring moved away, then its flows deleted"
        );
        assert_eq!(r.maps.flows, [0, 2]);
        assert_eq!((applied.removed, applied.flows_removed), (1, 2));
    }

    #[test]
    fn a_draining_member_leaves_the_ring_but_keeps_its_flows() {
        let mut r = writer();
        r.apply(&vip(80).vip, &[member(11), member(12)], false)
            .unwrap();
        r.maps.log.clear();
        let draining = L4Member {
            takes_new: false,
            keeps_existing: true,
            ..member(12)
        };
        r.apply(&vip(80).vip, &[member(11), draining], false)
            .unwrap();
        assert!(ring_of(&r, 0).iter().all(|&s| s == 0));
        assert_eq!(r.maps.backends[&1].flags, BACKEND_F_ACTIVE);
        assert_eq!(r.maps.log.last().unwrap(), "backend 1 flags 1");
        // Its time is up: it stops keeping flows (they are re-steered), still registered.
        let done = L4Member {
            keeps_existing: false,
            ..draining
        };
        r.apply(&vip(80).vip, &[member(11), done], false).unwrap();
        assert_eq!(r.maps.backends[&1].flags, 0);
        assert_eq!(r.maps.backends[&1].addr, v4_words([10, 0, 0, 12]));
    }

    #[test]
    fn a_member_rejoining_is_activated_before_the_ring_names_it() {
        let mut r = writer();
        let out = L4Member {
            takes_new: false,
            keeps_existing: false,
            ..member(12)
        };
        r.apply(&vip(80).vip, &[member(11), out], false).unwrap();
        assert_eq!(r.maps.backends[&1].flags, 0);
        // The fake panics if the ring named backend 1 before its entry was active.
        r.apply(&vip(80).vip, &[member(11), member(12)], false)
            .unwrap();
        assert!(ring_of(&r, 0).contains(&1));
    }

    #[test]
    fn fail_open_is_flagged_on_the_vip() {
        let mut r = writer();
        r.apply(&vip(80).vip, &[member(11)], true).unwrap();
        let key = (
            v4_words([10, 100, 0, 1]),
            80u16.to_be(),
            6,
            lb_common::FAMILY_V4,
        );
        assert_eq!(r.maps.vips[&key].flags, VIP_F_FAIL_OPEN);
        r.apply(&vip(80).vip, &[member(11)], false).unwrap();
        assert_eq!(r.maps.vips[&key].flags, 0);
    }

    #[test]
    fn released_ids_are_reused_only_after_fresh_ones_run_out() {
        let mut r = RingWriter::new(FakeMaps::default(), M, 4, 3);
        r.add_vip(vip(80)).unwrap();
        r.apply(&vip(80).vip, &[member(11), member(12)], false)
            .unwrap();
        r.apply(&vip(80).vip, &[member(12)], false).unwrap();
        r.apply(&vip(80).vip, &[member(12), member(13)], false)
            .unwrap();
        let ids: Vec<u32> = r.describe()[0].2.iter().map(|b| b.id).collect();
        assert_eq!(ids, vec![1, 2], "fresh id 2 used before released id 0");
        r.apply(&vip(80).vip, &[member(12), member(13), member(14)], false)
            .unwrap();
        assert!(r.describe()[0].2.iter().any(|b| b.id == 0));
        let full = r.apply(
            &vip(80).vip,
            &[member(12), member(13), member(14), member(15)],
            false,
        );
        assert!(matches!(full, Err(L4Error::Full(_))));
        assert_eq!(
            r.describe()[0].2.len(),
            3,
            "a refused apply changes nothing"
        );
    }

    #[test]
    fn removing_the_last_member_empties_the_ring() {
        let mut r = writer();
        r.apply(&vip(80).vip, &[member(11)], false).unwrap();
        r.apply(&vip(80).vip, &[], false).unwrap();
        assert!(ring_of(&r, 0).iter().all(|&s| s == RING_EMPTY));
        assert_eq!(
            r.backend_id(&vip(80).vip, Ipv4Addr::new(10, 0, 0, 11).into(), 80),
            None
        );
    }

    #[test]
    fn a_weight_change_moves_slots_towards_the_heavier_member() {
        let mut r = writer();
        r.apply(&vip(80).vip, &[member(11), member(12)], false)
            .unwrap();
        let heavy = L4Member {
            weight: 3,
            ..member(12)
        };
        r.apply(&vip(80).vip, &[member(11), heavy], false).unwrap();
        let share = ring_of(&r, 0).iter().filter(|&&s| s == 1).count() as f64 / f64::from(M);
        assert!((share - 0.75).abs() < 0.02, "{share}");
        assert_eq!(r.maps.backends[&1].weight, 3);
    }

    #[test]
    fn ipv6_vips_and_backends_of_either_family_share_one_path() {
        let mut r = writer();
        let v6 = VipSpec::new(Some("web6".into()), "[fd00:100::1]:80/tcp".parse().unwrap());
        r.add_vip(v6.clone()).unwrap();
        let b6 = L4Member::in_service(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11).into(), 80, 1);
        let applied = r.apply(&v6.vip, &[b6, member(12)], false).unwrap();
        assert_eq!(applied.added, 2);
        let ids: Vec<u32> = r.describe()[1].2.iter().map(|b| b.id).collect();
        let six = r.maps.backends[&ids[1]];
        assert_eq!(six.family, lb_common::FAMILY_V6);
        assert_eq!(six.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        let four = r.maps.backends[&ids[0]];
        assert_eq!(four.family, lb_common::FAMILY_V4);
        let marker = r
            .maps
            .vips
            .iter()
            .find(|(k, _)| k.2 == VIP_MARKER_PROTO && k.3 == lb_common::FAMILY_V6)
            .map(|(_, m)| m.flags);
        assert_eq!(marker, Some(VIP_F_HAS_TCP));
        assert_eq!(
            r.backend_id(&v6.vip, b6.addr, 80),
            Some(ids[1]),
            "the health checker finds an IPv6 backend's id"
        );
    }

    /// A writer adopting `maps` for `vips`.
    fn adopt(maps: FakeMaps, vips: &[VipSpec]) -> (RingWriter<FakeMaps>, Adoption) {
        RingWriter::adopt(maps, M, 4, 16, vips).unwrap()
    }

    #[test]
    fn adopting_maps_keeps_ids_and_ring_and_the_same_view_rewrites_nothing() {
        let mut r = writer();
        r.apply(&vip(80).vip, &[member(11), member(12), member(13)], false)
            .unwrap();
        let ring_before = ring_of(&r, 0);
        let ids_before: Vec<(IpAddr, u32)> = r.describe()[0]
            .2
            .iter()
            .map(|b| (b.member.addr, b.id))
            .collect();
        let mut maps = r.maps;
        maps.log.clear();
        let mut longer = vip(80);
        longer.idle_timeout = std::time::Duration::from_secs(600);
        let (mut r, adoption) = adopt(maps, &[longer]);
        assert_eq!(adoption.vips.len(), 1);
        assert_eq!(adoption.vips[0].backends.len(), 3);
        assert!(adoption.removed_vips.is_empty());
        let ids_after: Vec<(IpAddr, u32)> = r.describe()[0]
            .2
            .iter()
            .map(|b| (b.member.addr, b.id))
            .collect();
        assert_eq!(ids_after, ids_before, "backend ids kept");
        let key = (
            v4_words([10, 100, 0, 1]),
            80u16.to_be(),
            6,
            lb_common::FAMILY_V4,
        );
        assert_eq!(r.maps.vips[&key].idle_timeout_ns, 600_000_000_000);
        assert!(
            !r.maps.log.iter().any(|l| l.starts_with("backend")),
            "no backend rewritten: {:?}",
            r.maps.log
        );
        let again = r
            .apply(&vip(80).vip, &[member(11), member(12), member(13)], false)
            .unwrap();
        assert_eq!(again, Applied::default(), "the same view changes nothing");
        assert_eq!(ring_of(&r, 0), ring_before);
    }

    #[test]
    fn adopting_with_one_more_target_moves_only_its_share_and_new_ids_are_fresh() {
        let mut r = writer();
        r.apply(&vip(80).vip, &[member(11), member(12), member(13)], false)
            .unwrap();
        // Backend 1 leaves: id 1 is released, a later run must not hand it out first.
        r.apply(&vip(80).vip, &[member(11), member(13)], false)
            .unwrap();
        let before = ring_of(&r, 0);
        let (mut r, _) = adopt(r.maps, &[vip(80)]);
        let applied = r
            .apply(&vip(80).vip, &[member(11), member(13), member(14)], false)
            .unwrap();
        assert_eq!(applied.added, 1);
        let new_id = r.backend_id(&vip(80).vip, member(14).addr, 80).unwrap();
        assert_eq!(new_id, 3, "a never-used id before the released one");
        let after = ring_of(&r, 0);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert_eq!(moved, applied.slots);
        let its = after.iter().filter(|&&s| s == new_id).count();
        // Maglev's disruption is near-minimal: the newcomer's share, and few others.
        assert!(
            moved >= its && moved <= its + (M as usize) / 50,
            "{moved} slots moved, {its} now belong to the new backend"
        );
    }

    #[test]
    fn adopting_removes_vips_and_backends_that_are_not_configured() {
        let mut r = writer();
        let mut dns = vip(53);
        dns.vip.proto = Proto::Udp;
        dns.name = Some("dns".into());
        r.add_vip(dns.clone()).unwrap();
        r.apply(&vip(80).vip, &[member(11)], false).unwrap();
        r.apply(&dns.vip, &[member(12)], false).unwrap();
        // A backend entry of no VIP (a crashed writer's leftover).
        r.maps
            .set_backend(
                9,
                Backend {
                    family: lb_common::FAMILY_V4,
                    vip_id: 3,
                    ..Backend::default()
                },
            )
            .unwrap();
        r.maps.flows = vec![0, 1, 1, 9];
        let (r, adoption) = adopt(r.maps, &[vip(80)]);
        assert_eq!(adoption.removed_vips, vec![dns.vip]);
        assert_eq!(adoption.backends_cleared, 2);
        assert_eq!(adoption.flows_removed, 3);
        assert_eq!(r.maps.flows, [0]);
        let dns_key = (
            v4_words([10, 100, 0, 1]),
            53u16.to_be(),
            17,
            lb_common::FAMILY_V4,
        );
        assert!(!r.maps.vips.contains_key(&dns_key));
        assert!(
            ring_of(&r, 1).iter().all(|&s| s == RING_EMPTY),
            "its ring emptied"
        );
        let marker = (
            v4_words([10, 100, 0, 1]),
            0u16,
            VIP_MARKER_PROTO,
            lb_common::FAMILY_V4,
        );
        assert_eq!(r.maps.vips[&marker].flags, VIP_F_HAS_TCP, "UDP bit gone");
    }

    #[test]
    fn nat_vips_are_flagged_and_turn_on_reply_lookups() {
        let mut r = writer();
        assert_eq!(r.maps.config_flags, 0, "no NAT VIP: no reply lookups");
        let nat = VipSpec::new(Some("nat".into()), "10.100.0.2:80/tcp".parse().unwrap()).nat();
        r.add_vip(nat.clone()).unwrap();
        assert_eq!(r.maps.config_flags, CONFIG_F_NAT);
        let key = nat.vip.map_key();
        assert_eq!(r.maps.vips[&vkey(&key)].flags, VIP_F_NAT);
        // A restart without it turns the lookups off again.
        let (r, _) = adopt(r.maps, &[vip(80)]);
        assert_eq!(r.maps.config_flags, 0);
    }

    #[test]
    fn guards_are_written_entries_first_flags_next_and_old_entries_last() {
        let mut r = writer();
        let web = vip(80).vip;
        let g1 = crate::l4::GuardChange::from_options(
            "allow=10.0.0.0/8,deny=10.9.0.0/16,new-flow-rate=10,new-flow-burst=5",
        )
        .unwrap()
        .apply(&Guards::default())
        .unwrap();
        r.maps.log.clear();
        r.set_guards(&web, g1.clone()).unwrap();
        assert_eq!(
            r.maps.log,
            [
                "guard Allow +72 vip 0",
                "guard Deny +80 vip 0",
                &format!("vip 0 flags {:#x}", VIP_F_ALLOW_LIST | VIP_F_DENY_LIST),
            ]
        );
        let meta = r.maps.vips[&vkey(&web.map_key())];
        assert_eq!(meta.rate_interval_ns, 100_000_000);
        assert_eq!(meta.rate_tolerance_ns, 400_000_000);
        // Replace the allow list, drop the deny list and the rate.
        let g2 = crate::l4::GuardChange::from_options("allow=192.0.2.0/24,deny=,new-flow-rate=off")
            .unwrap()
            .apply(&g1)
            .unwrap();
        r.maps.log.clear();
        r.set_guards(&web, g2).unwrap();
        assert_eq!(
            r.maps.log,
            [
                "guard Allow +88 vip 0",
                &format!("vip 0 flags {VIP_F_ALLOW_LIST:#x}"),
                "guard Allow -72 vip 0",
                "guard Deny -80 vip 0",
            ]
        );
        assert_eq!(r.maps.vips[&vkey(&web.map_key())].rate_interval_ns, 0);
        assert_eq!(r.maps.guards.len(), 1);
        // The other family is refused, and changes nothing.
        let v6 = Guards {
            deny: vec!["2001:db8::/32".parse().unwrap()],
            ..Guards::default()
        };
        assert!(matches!(
            r.set_guards(&web, v6),
            Err(L4Error::InvalidGuards { .. })
        ));
        assert_eq!(r.maps.guards.len(), 1);
    }

    #[test]
    fn adopting_reconciles_the_guard_tries_with_the_configuration() {
        let mut r = writer();
        let mut dns = vip(53);
        dns.vip.proto = Proto::Udp;
        dns.name = Some("dns".into());
        dns.guards.deny = vec!["10.0.0.0/8".parse().unwrap()];
        r.add_vip(dns.clone()).unwrap();
        let g = Guards {
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            ..Guards::default()
        };
        r.set_guards(&vip(80).vip, g).unwrap();
        assert_eq!(r.maps.guards.len(), 2);
        // The next run configures web with another list and no dns.
        let mut web = vip(80);
        web.guards.allow = vec!["192.0.2.0/24".parse().unwrap()];
        let (r, _) = adopt(r.maps, &[web]);
        let left: Vec<String> = r
            .maps
            .guards
            .iter()
            .map(|(l, p, k)| {
                format!(
                    "{l:?} {} vip {}",
                    crate::l4::Cidr::from_guard_key(*p, k).unwrap(),
                    k.vip_id
                )
            })
            .collect();
        assert_eq!(left, ["Allow 192.0.2.0/24 vip 0"]);
    }

    #[test]
    fn adopting_empty_maps_is_a_fresh_start() {
        let (r, adoption) = adopt(FakeMaps::default(), &[vip(80)]);
        assert_eq!(adoption, Adoption::default());
        assert!(ring_of(&r, 0).iter().all(|&s| s == RING_EMPTY));
        assert_eq!(r.describe().len(), 1);
    }

    #[test]
    fn a_vips_figures_are_its_backends_records_plus_its_departed_backends_folded_once() {
        // Room for exactly the four backends below, so a departed id is reused at once.
        let mut r = RingWriter::new(FakeMaps::default(), M, 4, 4);
        r.add_vip(vip(80)).unwrap();
        let web = vip(80).vip;
        r.apply(&web, &[member(11), member(12), member(13)], false)
            .unwrap();
        // A second VIP whose backend records must never count for the first.
        r.add_vip(vip(443)).unwrap();
        r.apply(&vip(443).vip, &[member(11)], false).unwrap();
        let other = r.backend_id(&vip(443).vip, member(11).addr, 80).unwrap();
        let id = |r: &RingWriter<FakeMaps>, last: u8| r.backend_id(&web, member(last).addr, 80);
        let (a, b, c) = (
            id(&r, 11).unwrap(),
            id(&r, 12).unwrap(),
            id(&r, 13).unwrap(),
        );
        assert_ne!(other, a, "one backend id per (VIP, target)");
        r.maps.forward(a, 1);
        r.maps.forward(b, 10);
        r.maps.forward(c, 100);
        r.maps.forward(other, 1000);
        assert_eq!(r.maps.vip_figures(0).packets, 111);
        assert_eq!(r.maps.vip_figures(1).packets, 1000);

        // 12 leaves: its 10 packets stay the VIP's, folded in once.
        r.apply(&web, &[member(11), member(13)], false).unwrap();
        assert_eq!(id(&r, 12), None);
        assert_eq!(r.maps.vip_figures(0).packets, 111);
        assert_eq!(r.maps.all_records().tx(), 1111, "reason tx keeps them too");
        // Its id goes to a newcomer (here of the other VIP): the record starts from zero and
        // counts for the newcomer's VIP only.
        r.apply(&vip(443).vip, &[member(11), member(14)], false)
            .unwrap();
        let newcomer = r.backend_id(&vip(443).vip, member(14).addr, 80).unwrap();
        assert_eq!(newcomer, b, "the departed id is reused");
        assert_eq!(r.maps.vip_figures(0).packets, 111);
        assert_eq!(r.maps.vip_figures(1).packets, 1000);
        r.maps.forward(newcomer, 5);
        assert_eq!(r.maps.vip_figures(0).packets, 111);
        assert_eq!(r.maps.vip_figures(1).packets, 1005);
        assert_eq!(r.maps.all_records().tx(), 1116);

        // The newcomer leaves again: folded into the other VIP, once.
        r.apply(&vip(443).vip, &[member(11)], false).unwrap();
        assert_eq!(r.maps.vip_figures(1).packets, 1005);
        assert_eq!(r.maps.all_records().tx(), 1116);
        // Every backend leaves: the figures stay.
        r.apply(&web, &[], false).unwrap();
        assert_eq!(r.maps.vip_figures(0).packets, 111);
        assert_eq!(r.maps.all_records().tx(), 1116);
    }

    #[test]
    fn departed_backends_counts_survive_adoption_and_a_reused_vip_id_starts_from_zero() {
        let mut r = writer();
        let web = vip(80).vip;
        r.apply(&web, &[member(11), member(12)], false).unwrap();
        let a = r.backend_id(&web, member(11).addr, 80).unwrap();
        let b = r.backend_id(&web, member(12).addr, 80).unwrap();
        r.maps.forward(a, 3);
        r.maps.forward(b, 4);
        r.apply(&web, &[member(11)], false).unwrap();
        // A restart: the pinned maps (records and retired counts) are adopted.
        let (r, _) = adopt(r.maps, &[vip(80)]);
        assert_eq!(r.maps.vip_figures(0).packets, 7, "kept across the restart");
        assert_eq!(r.maps.all_records().tx(), 7);
        // A restart whose configuration dropped the VIP: its backends are cleared (and
        // folded, once); the reason counts keep them, and a new VIP given the id starts
        // from zero.
        let mut other = vip(8080);
        other.name = None;
        let (r, adoption) = adopt(r.maps, std::slice::from_ref(&other));
        assert_eq!(adoption.backends_cleared, 1);
        assert_eq!(r.maps.all_records().tx(), 7, "folded exactly once");
        assert_eq!(
            r.vip(&other.vip).map(|(_, id)| id),
            Some(0),
            "the id is reused"
        );
        assert_eq!(r.maps.vip_figures(0), lb_common::Counters::default());
    }
}
