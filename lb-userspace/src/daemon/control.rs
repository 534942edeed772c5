//! The control plane of a running `lb run`: the registry's two subscribers (the L7 picker's
//! groups and the L4 ring writer) and the admin API handler, which only writes to the
//! registry and to the listeners' rule books.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::admin::Handler;
use crate::admin::api::{
    self, ApiError, GroupTargetHealth, ListenerDescription, ModifyTargetGroup, PriorityMove,
    Request, Response, RuleDescription, TargetGroupDescription, TargetRef, VipGuardsDescription,
};
use crate::config::l7_group_problem;
use crate::dataplane::Maps;
use crate::health::BackendIds;
use crate::l4::{GuardChange, L4Member, RingWriter, VipAddr, VipSpec};
use crate::proxy::server::{Groups, L7Handle, ListenerConfig};
use crate::registry::{ControlPlane, GroupView, RegistryError, Snapshot, TargetSpec};
use crate::rules::RuleBook;
use crate::targets::{TargetGroup, TargetState, parse_target_group};

use super::host::Neighbours;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps the L7 tier's target groups in line with the registry: one [`TargetGroup`] per
/// HTTP/HTTPS group, fed [`TargetGroup::apply`] whenever its view changes.
pub struct L7Sync {
    handle: L7Handle,
    /// The view each group was last fed.
    applied: Mutex<HashMap<String, Arc<GroupView>>>,
}

impl L7Sync {
    /// Syncs `handle` from now on.
    pub fn new(handle: L7Handle) -> Self {
        Self {
            handle,
            applied: Mutex::new(HashMap::new()),
        }
    }

    /// The target groups for a snapshot, reusing the running ones (their counters,
    /// round-robin positions and stickiness keys survive every change).
    pub fn groups_for(snapshot: &Snapshot, running: &Groups) -> Groups {
        snapshot
            .groups
            .iter()
            .filter(|(_, v)| v.config.protocol.is_http())
            .map(|(name, v)| {
                let g = running
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(TargetGroup::new((*v.config).clone())));
                (name.clone(), g)
            })
            .collect()
    }

    /// Brings the L7 groups in line with `snapshot`. Idempotent; safe to call from the
    /// subscriber task and from admin requests that need the groups in place at once.
    pub fn apply(&self, snapshot: &Snapshot) {
        let mut applied = lock(&self.applied);
        let running = self.handle.groups();
        let groups = Self::groups_for(snapshot, &running);
        for (name, group) in &groups {
            let view = &snapshot.groups[name];
            if applied.get(name).is_some_and(|v| Arc::ptr_eq(v, view)) {
                continue;
            }
            let members: Vec<_> = view.targets.iter().map(|t| t.member.clone()).collect();
            group.apply(&members, view.failing_open);
            applied.insert(name.clone(), view.clone());
        }
        applied.retain(|name, _| groups.contains_key(name));
        // A target that left every group (deregistered, its draining done) leaves no pool
        // behind: its idle connections close and the map of pools does not grow with every
        // target ever registered.
        let members: std::collections::HashSet<std::net::SocketAddr> = groups
            .keys()
            .flat_map(|name| snapshot.groups[name].targets.iter().map(|t| t.member.addr))
            .collect();
        let dropped = self
            .handle
            .retain_target_pools(|addr| members.contains(&addr));
        if dropped > 0 {
            tracing::debug!(dropped, "connection pools of departed targets dropped");
        }
        let same_set = groups.len() == running.len()
            && groups
                .iter()
                .all(|(n, g)| running.get(n).is_some_and(|r| Arc::ptr_eq(r, g)));
        if !same_set {
            self.handle.set_groups(groups);
        }
    }

    /// The L7 tier's current groups.
    pub fn groups(&self) -> Arc<Groups> {
        self.handle.groups()
    }

    /// Follows the registry until the task is dropped.
    pub async fn run(self: Arc<Self>, plane: Arc<ControlPlane>) {
        let mut rx = plane.subscribe();
        loop {
            let snapshot = rx.borrow_and_update().clone();
            self.apply(&snapshot);
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Keeps `lb_xdp`'s maps in line with the registry: each VIP's ring and backends follow its
/// target group's view.
pub struct L4Sync {
    writer: Mutex<RingWriter<Maps>>,
    vips: Vec<(VipSpec, String)>,
    neighbours: Arc<Mutex<Neighbours>>,
    /// Backends whose next hop was seen to: the neighbour check runs `ip`, so it runs once
    /// per backend, not on every change.
    known: Mutex<std::collections::HashSet<IpAddr>>,
    /// Flow-table entries deleted with departed backends, not yet accounted by the flow
    /// sweeper (it takes them with [`L4Sync::take_flows_removed`]).
    flows_removed: std::sync::atomic::AtomicU64,
    /// The view each VIP was last written from.
    applied: Mutex<HashMap<VipAddr, Arc<GroupView>>>,
}

impl L4Sync {
    /// Syncs `writer` (whose VIPs are added) for `vips` (VIP, group).
    pub fn new(
        writer: RingWriter<Maps>,
        vips: Vec<(VipSpec, String)>,
        neighbours: Arc<Mutex<Neighbours>>,
    ) -> Self {
        Self {
            writer: Mutex::new(writer),
            vips,
            neighbours,
            known: Mutex::new(std::collections::HashSet::new()),
            flows_removed: std::sync::atomic::AtomicU64::new(0),
            applied: Mutex::new(HashMap::new()),
        }
    }

    /// The members of a VIP for a group view.
    pub fn members(view: &GroupView) -> Vec<L4Member> {
        view.targets
            .iter()
            .map(|t| L4Member {
                addr: t.addr().ip(),
                port: t.addr().port(),
                weight: t.member.weight,
                takes_new: t.member.takes_new,
                keeps_existing: t.keeps_existing,
            })
            .collect()
    }

    /// Counts flow-table entries deleted outside [`Self::apply`] (adopting a data plane).
    pub fn add_flows_removed(&self, n: u64) {
        self.flows_removed
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Flow-table entries deleted with departed backends since the last call.
    pub fn take_flows_removed(&self) -> u64 {
        self.flows_removed
            .swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Brings the maps in line with `snapshot`; map errors are logged (the next change
    /// retries).
    pub fn apply(&self, snapshot: &Snapshot) {
        let mut applied = lock(&self.applied);
        for (spec, group) in &self.vips {
            let Some(view) = snapshot.groups.get(group) else {
                continue;
            };
            if applied.get(&spec.vip).is_some_and(|v| Arc::ptr_eq(v, view)) {
                continue;
            }
            let members = Self::members(view);
            let fresh: Vec<IpAddr> = {
                let mut known = lock(&self.known);
                members
                    .iter()
                    .map(|m| m.addr)
                    .filter(|a| known.insert(*a))
                    .collect()
            };
            if !fresh.is_empty() {
                let mut n = lock(&self.neighbours);
                for a in fresh {
                    n.ensure(a);
                }
            }
            let result = lock(&self.writer).apply(&spec.vip, &members, view.failing_open);
            match result {
                Ok(a) => {
                    self.flows_removed
                        .fetch_add(a.flows_removed as u64, std::sync::atomic::Ordering::Relaxed);
                    if a != crate::l4::Applied::default() {
                        tracing::debug!(vip = %spec.vip, slots = a.slots, added = a.added, removed = a.removed, flows_removed = a.flows_removed, "ring updated");
                    }
                    applied.insert(spec.vip, view.clone());
                }
                Err(e) => tracing::error!(vip = %spec.vip, error = %e, "updating the maps failed"),
            }
        }
    }

    /// Follows the registry until the task is dropped.
    pub async fn run(self: Arc<Self>, plane: Arc<ControlPlane>) {
        let mut rx = plane.subscribe();
        loop {
            let snapshot = rx.borrow_and_update().clone();
            let me = self.clone();
            // Map writes are system calls; keep them off the async workers.
            let _ = tokio::task::spawn_blocking(move || me.apply(&snapshot)).await;
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The writer (for `lb run`'s summary and counters).
    pub fn with_writer<T>(&self, f: impl FnOnce(&RingWriter<Maps>) -> T) -> T {
        f(&lock(&self.writer))
    }

    /// The writer, to change directly (benchmarks compare the control plane with it).
    pub fn with_writer_mut<T>(&self, f: impl FnOnce(&mut RingWriter<Maps>) -> T) -> T {
        f(&mut lock(&self.writer))
    }
}

impl BackendIds for L4Sync {
    fn backend_id(&self, vip: &VipAddr, addr: IpAddr, port: u16) -> Option<u32> {
        lock(&self.writer).backend_id(vip, addr, port)
    }
}

/// One L7 listener as the control plane keeps it.
struct ListenerState {
    config: ListenerConfig,
    book: RuleBook,
}

/// The admin API's handler.
pub struct Control {
    plane: Arc<ControlPlane>,
    l7: Option<(Arc<L7Sync>, L7Handle)>,
    l4: Option<Arc<L4Sync>>,
    listeners: Mutex<BTreeMap<String, ListenerState>>,
    vips: Vec<(VipSpec, String)>,
    /// Most L4 backends the maps hold.
    max_backends: usize,
    /// The daemon's metrics (DescribeMetrics, `GET /metrics`).
    metrics: Option<Arc<crate::metrics::history::Hub>>,
}

impl Control {
    /// The handler for a daemon with these parts.
    pub fn new(
        plane: Arc<ControlPlane>,
        l7: Option<(Arc<L7Sync>, L7Handle)>,
        l4: Option<Arc<L4Sync>>,
        listeners: Vec<(ListenerConfig, RuleBook)>,
        vips: Vec<(VipSpec, String)>,
        max_backends: usize,
    ) -> Self {
        Self {
            plane,
            l7,
            l4,
            listeners: Mutex::new(
                listeners
                    .into_iter()
                    .map(|(config, book)| (config.name.clone(), ListenerState { config, book }))
                    .collect(),
            ),
            vips,
            max_backends,
            metrics: None,
        }
    }

    /// Serves `hub`'s metrics (DescribeMetrics and `GET /metrics`).
    pub fn with_metrics(mut self, hub: Arc<crate::metrics::history::Hub>) -> Self {
        self.metrics = Some(hub);
        self
    }

    /// The group a request names: a group, or a VIP forwarding to one.
    fn group_of(&self, owner: &str) -> Result<String, ApiError> {
        if let Some((_, g)) = self.vips.iter().find(|(v, _)| v.answers_to(owner)) {
            return Ok(g.clone());
        }
        self.plane
            .read(|r, _| r.group_config(owner).map(|_| owner.to_owned()))
            .map_err(api_error)
    }

    /// Targets of a request, resolved as `--target` specs of `owner`.
    fn resolve(
        &self,
        owner: &str,
        targets: &[TargetRef],
    ) -> Result<(String, Vec<(SocketAddr, u32)>), ApiError> {
        if targets.is_empty() {
            return Err(ApiError::new("ValidationError", "no targets given"));
        }
        let mut group = None;
        let mut out = Vec::new();
        for t in targets {
            let addr: IpAddr = t.id.parse().map_err(|_| {
                ApiError::new("InvalidTarget", format!("{:?} is not an IP address", t.id))
            })?;
            let spec = TargetSpec {
                owner: owner.to_owned(),
                addr,
                port: t.port,
                weight: t.weight.unwrap_or(1),
            };
            let (g, a) = self
                .plane
                .read(|r, _| r.resolve(&spec))
                .map_err(|e| ApiError::new("InvalidTarget", e))?;
            group = Some(g);
            out.push((a, spec.weight));
        }
        Ok((group.unwrap_or_default(), out))
    }

    /// After a registry change that a rule change depends on: the L7 groups in place now.
    fn sync_l7_now(&self) {
        if let Some((sync, _)) = &self.l7 {
            sync.apply(&self.plane.current());
        }
    }

    /// Applies the registry's latest snapshot to both planes before the request is answered,
    /// so that when `lb targets …` returns, the change is in effect (the subscriber tasks
    /// then find nothing left to do).
    fn settle(&self) {
        self.sync_l7_now();
        if let Some(l4) = &self.l4 {
            l4.apply(&self.plane.current());
        }
    }

    fn describe_health(
        &self,
        owner: Option<&str>,
        only: Option<&[TargetRef]>,
    ) -> Result<Response, ApiError> {
        let groups = match owner {
            Some(o) => vec![self.group_of(o)?],
            None => self.plane.read(|r, _| r.group_names()),
        };
        let only: Option<Vec<SocketAddr>> = match (owner, only) {
            (Some(o), Some(ts)) => {
                Some(self.resolve(o, ts)?.1.into_iter().map(|(a, _)| a).collect())
            }
            _ => None,
        };
        let mut out = Vec::new();
        for g in groups {
            let ds = self
                .plane
                .read(|r, now| r.describe_target_health(&g, only.as_deref(), now))
                .map_err(api_error)?;
            out.extend(ds.into_iter().map(|description| GroupTargetHealth {
                target_group_name: g.clone(),
                description,
            }));
        }
        Ok(Response {
            target_health_descriptions: Some(out),
            ..Response::default()
        })
    }

    fn describe_groups(&self, names: Option<&[String]>) -> Result<Response, ApiError> {
        let snapshot = self.plane.current();
        let listeners = lock(&self.listeners);
        let mut out = Vec::new();
        for (name, view) in &snapshot.groups {
            if names.is_some_and(|n| !n.contains(name)) {
                continue;
            }
            let mut used_by: Vec<String> = listeners
                .values()
                .filter(|l| l.book.group_users().contains_key(name))
                .map(|l| format!("listener {}", l.config.name))
                .collect();
            used_by.extend(
                self.vips
                    .iter()
                    .filter(|(_, g)| g == name)
                    .map(|(v, _)| format!("VIP {}", v.label())),
            );
            let healthy = view
                .targets
                .iter()
                .filter(|t| t.member.state.in_service())
                .count();
            let cfg = &view.config;
            let check = view.check.as_ref();
            out.push(TargetGroupDescription {
                target_group_name: name.clone(),
                protocol: cfg.protocol.as_str().to_ascii_uppercase(),
                health_check: api::HealthCheckFields {
                    health_check_enabled: Some(check.is_some()),
                    health_check_protocol: check.map(|c| c.protocol.as_str().to_owned()),
                    health_check_port: check.map(|c| c.port.to_string()),
                    health_check_path: check
                        .filter(|c| c.protocol != crate::targets::health_check::CheckProtocol::Tcp)
                        .map(|c| c.path.clone()),
                    health_check_interval_seconds: check.map(|c| c.interval.as_secs_f64()),
                    health_check_timeout_seconds: check.map(|c| c.timeout.as_secs_f64()),
                    healthy_threshold_count: check.map(|c| c.healthy_threshold),
                    unhealthy_threshold_count: check.map(|c| c.unhealthy_threshold),
                    matcher: check.map(|c| api::Matcher {
                        http_code: c.matcher.to_string(),
                    }),
                    health_check_mode: check.map(|c| c.mode.as_str().to_owned()),
                },
                used_by,
                healthy_host_count: healthy,
                un_healthy_host_count: view
                    .targets
                    .iter()
                    .filter(|t| {
                        !t.member.state.in_service()
                            && !matches!(
                                t.member.state,
                                TargetState::Draining | TargetState::Unused
                            )
                    })
                    .count(),
                failing_open: view.failing_open,
                attributes: api::attributes_of(cfg),
            });
        }
        if let Some(missing) =
            names.and_then(|n| n.iter().find(|n| !snapshot.groups.contains_key(*n)))
        {
            return Err(ApiError::new(
                "TargetGroupNotFound",
                format!("no target group is named {missing:?}"),
            ));
        }
        Ok(Response {
            target_groups: Some(out),
            ..Response::default()
        })
    }

    /// The guards of one VIP (or every VIP), after applying `change` to the one named.
    fn vip_guards(
        &self,
        name: Option<&str>,
        change: Option<GuardChange>,
    ) -> Result<Response, ApiError> {
        let Some(l4) = &self.l4 else {
            return Err(ApiError::new(
                "ListenerNotFound",
                "this lb run serves no L4 VIPs (no --vip)",
            ));
        };
        let chosen: Vec<&VipSpec> = match name {
            Some(n) => {
                let v = self
                    .vips
                    .iter()
                    .find(|(v, _)| v.answers_to(n))
                    .ok_or_else(|| ApiError::new("ListenerNotFound", format!("no VIP {n:?}")))?;
                vec![&v.0]
            }
            None => self.vips.iter().map(|(v, _)| v).collect(),
        };
        l4.with_writer_mut(|w| {
            let mut out = Vec::new();
            for spec in chosen {
                if let Some(change) = &change {
                    let current = w
                        .vip(&spec.vip)
                        .map(|(s, _)| s.guards.clone())
                        .unwrap_or_default();
                    let next = change
                        .apply(&current)
                        .map_err(|e| ApiError::new("ValidationError", e))?;
                    w.set_guards(&spec.vip, next).map_err(|e| match e {
                        crate::l4::L4Error::InvalidGuards { .. } => {
                            ApiError::new("ValidationError", e.to_string())
                        }
                        other => ApiError::new("InternalError", other.to_string()),
                    })?;
                    tracing::info!(vip = %spec.vip, guards = %w.vip(&spec.vip).map(|(s, _)| s.guards.to_options()).unwrap_or_default(), "VIP guards changed");
                }
                let (now, _) = w
                    .vip(&spec.vip)
                    .ok_or_else(|| ApiError::new("InternalError", "VIP not in the maps"))?;
                out.push(VipGuardsDescription {
                    vip_name: spec.label(),
                    vip: spec.vip.to_string(),
                    mode: now.mode.to_string(),
                    guards: now.guards.to_options(),
                });
            }
            Ok(Response {
                vip_guards: Some(out),
                ..Response::default()
            })
        })
    }

    fn describe_listeners(&self) -> Response {
        let listeners = lock(&self.listeners);
        let mut out: Vec<ListenerDescription> = listeners
            .values()
            .map(|l| ListenerDescription {
                listener_name: l.config.name.clone(),
                protocol: l.config.protocol.as_str().to_ascii_uppercase(),
                address: l.config.bind.to_string(),
                default_actions: l
                    .book
                    .describe()
                    .last()
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default(),
                rule_count: l.book.describe().len().saturating_sub(1),
            })
            .collect();
        out.extend(self.vips.iter().map(|(v, g)| ListenerDescription {
            listener_name: v.label(),
            protocol: v.vip.proto.to_string().to_ascii_uppercase(),
            address: SocketAddr::new(v.vip.addr, v.vip.port).to_string(),
            default_actions: format!("forward={g}"),
            rule_count: 0,
        }));
        Response {
            listeners: Some(out),
            ..Response::default()
        }
    }

    fn rules_of(book: &RuleBook) -> Response {
        Response {
            rules: Some(
                book.describe()
                    .into_iter()
                    .map(|(p, rule)| RuleDescription {
                        priority: if p == 0 {
                            "default".into()
                        } else {
                            p.to_string()
                        },
                        is_default: p == 0,
                        rule,
                    })
                    .collect(),
            ),
            ..Response::default()
        }
    }

    /// Applies a rule-book change to listener `name`: checks the groups it forwards to,
    /// updates who uses which group, puts the groups in place, then swaps the rules.
    fn change_rules(
        &self,
        name: &str,
        change: impl FnOnce(&RuleBook) -> Result<RuleBook, String>,
    ) -> Result<Response, ApiError> {
        let Some((_, handle)) = &self.l7 else {
            return Err(ApiError::new(
                "ListenerNotFound",
                "this lb runs no L7 listener",
            ));
        };
        let mut listeners = lock(&self.listeners);
        let l = listeners.get(name).ok_or_else(|| {
            ApiError::new("ListenerNotFound", format!("no listener is named {name:?}"))
        })?;
        let book = change(&l.book).map_err(|e| {
            let code = if e.contains("PriorityInUse") {
                "PriorityInUse"
            } else if e.contains("RuleNotFound") {
                "RuleNotFound"
            } else {
                "ValidationError"
            };
            ApiError::new(code, e)
        })?;
        for g in book.group_users().keys() {
            if let Some(problem) = self.plane.read(|r, _| l7_group_problem(r, g)) {
                return Err(ApiError::new("TargetGroupNotFound", problem));
            }
        }
        let mut users: BTreeMap<String, usize> = BTreeMap::new();
        for (other, state) in listeners.iter() {
            let b = if other == name { &book } else { &state.book };
            for (g, n) in b.group_users() {
                *users.entry(g).or_default() += n;
            }
        }
        self.plane.write(|r, _| r.set_rule_users(&users));
        self.sync_l7_now();
        handle.set_rules(name, book.compiled());
        tracing::info!(
            listener = name,
            rules = book.describe().len(),
            "rules changed"
        );
        let response = Self::rules_of(&book);
        if let Some(l) = listeners.get_mut(name) {
            l.book = book;
        }
        Ok(response)
    }

    /// Whether registering `n` more targets into `group` fits the L4 maps.
    fn l4_room(&self, group: &str, adding: usize) -> Result<(), ApiError> {
        let serving = self.vips.iter().filter(|(_, g)| g == group).count();
        if serving == 0 {
            return Ok(());
        }
        let used: usize = self
            .plane
            .read(|r, _| self.vips.iter().map(|(_, g)| r.target_count(g)).sum());
        if used + adding * serving > self.max_backends {
            return Err(ApiError::new(
                "TooManyTargets",
                format!(
                    "the L4 maps hold {} backends and {used} are in use (raise --max-backends)",
                    self.max_backends
                ),
            ));
        }
        Ok(())
    }
}

fn api_error(e: RegistryError) -> ApiError {
    let code = match &e {
        RegistryError::NoSuchGroup(_) => "TargetGroupNotFound",
        RegistryError::GroupExists(_) => "DuplicateTargetGroupName",
        RegistryError::GroupInUse { .. } => "ResourceInUse",
        RegistryError::NotRegistered { .. } | RegistryError::InvalidTarget { .. } => {
            "InvalidTarget"
        }
        RegistryError::InvalidVip { .. } | RegistryError::Config(_) => "ValidationError",
    };
    ApiError::new(code, e.to_string())
}

impl Handler for Control {
    fn handle(&self, req: Request) -> Result<Response, ApiError> {
        if let Request::DescribeMetrics = req {
            // Changes nothing: nothing to settle.
            let hub = self
                .metrics
                .as_ref()
                .ok_or_else(|| ApiError::new("ValidationError", "no metrics here"))?;
            return Ok(Response {
                metrics: Some(hub.report()),
                ..Response::default()
            });
        }
        let answer = self.answer(req);
        self.settle();
        answer
    }

    fn prometheus(&self) -> Option<String> {
        let hub = self.metrics.as_ref()?;
        Some(crate::metrics::prometheus::render(&hub.current()))
    }
}

impl Control {
    fn answer(&self, req: Request) -> Result<Response, ApiError> {
        match req {
            Request::RegisterTargets {
                target_group_name,
                targets,
            } => {
                let (group, targets) = self.resolve(&target_group_name, &targets)?;
                self.l4_room(&group, targets.len())?;
                self.plane
                    .write(|r, _| r.register(&group, &targets))
                    .map_err(api_error)?;
                tracing::info!(group, ?targets, "targets registered");
                Ok(Response::default())
            }
            Request::DeregisterTargets {
                target_group_name,
                targets,
            } => {
                let (group, targets) = self.resolve(&target_group_name, &targets)?;
                let addrs: Vec<SocketAddr> = targets.iter().map(|(a, _)| *a).collect();
                self.plane
                    .write(|r, now| r.deregister(&group, &addrs, now))
                    .map_err(api_error)?;
                tracing::info!(group, ?addrs, "targets deregistered");
                Ok(Response::default())
            }
            Request::SetTargetsEnabled {
                target_group_name,
                targets,
                enabled,
            } => {
                let (group, targets) = self.resolve(&target_group_name, &targets)?;
                let addrs: Vec<SocketAddr> = targets.iter().map(|(a, _)| *a).collect();
                self.plane
                    .write(|r, _| r.set_enabled(&group, &addrs, enabled))
                    .map_err(api_error)?;
                tracing::info!(group, ?addrs, enabled, "operator switch");
                Ok(Response::default())
            }
            Request::DescribeTargetHealth {
                target_group_name,
                targets,
            } => self.describe_health(target_group_name.as_deref(), targets.as_deref()),
            Request::DescribeTargetGroups { names } => self.describe_groups(names.as_deref()),
            Request::CreateTargetGroup { name, options } => {
                let spec = if options.trim().is_empty() {
                    name.clone()
                } else {
                    format!("{name},{options}")
                };
                let cfg = parse_target_group(&spec)
                    .map_err(|e| ApiError::new("ValidationError", e.to_string()))?;
                self.plane
                    .write(|r, _| r.create_group(cfg))
                    .map_err(api_error)?;
                self.sync_l7_now();
                tracing::info!(group = name, "target group created");
                self.describe_groups(Some(&[name]))
            }
            Request::DeleteTargetGroup { target_group_name } => {
                self.plane
                    .write(|r, _| r.delete_group(&target_group_name))
                    .map_err(api_error)?;
                self.sync_l7_now();
                tracing::info!(group = target_group_name, "target group deleted");
                Ok(Response::default())
            }
            Request::ModifyTargetGroup(m) => {
                let ModifyTargetGroup {
                    target_group_name, ..
                } = &*m;
                let group = self.group_of(target_group_name)?;
                let changes = m
                    .to_options()
                    .map_err(|e| ApiError::new("ValidationError", e))?;
                self.plane
                    .write(|r, _| r.modify_group(&group, &changes))
                    .map_err(api_error)?;
                tracing::info!(group, ?changes, "target group modified");
                self.describe_groups(Some(&[group]))
            }
            Request::DescribeListeners => Ok(self.describe_listeners()),
            Request::DescribeVipGuards { vip_name } => self.vip_guards(vip_name.as_deref(), None),
            Request::ModifyVipGuards { vip_name, options } => {
                let change = GuardChange::from_options(&options)
                    .map_err(|e| ApiError::new("ValidationError", e))?;
                self.vip_guards(Some(&vip_name), Some(change))
            }
            Request::DescribeMetrics => Err(ApiError::new(
                "ValidationError",
                "DescribeMetrics is answered before any change",
            )),
            Request::DescribeRules { listener_name } => {
                let listeners = lock(&self.listeners);
                let l = listeners.get(&listener_name).ok_or_else(|| {
                    ApiError::new(
                        "ListenerNotFound",
                        format!("no listener is named {listener_name:?}"),
                    )
                })?;
                Ok(Self::rules_of(&l.book))
            }
            Request::CreateRule {
                listener_name,
                priority,
                rule,
            } => self.change_rules(&listener_name, |b| b.with_rule(priority, &rule)),
            Request::ModifyRule {
                listener_name,
                priority,
                rule,
            } => {
                let p = parse_priority(&priority)?;
                self.change_rules(&listener_name, |b| b.with_modified(p, &rule))
            }
            Request::DeleteRule {
                listener_name,
                priority,
            } => self.change_rules(&listener_name, |b| b.without(priority)),
            Request::SetRulePriorities {
                listener_name,
                rule_priorities,
            } => {
                let moves: Vec<(u32, u32)> = rule_priorities
                    .iter()
                    .map(
                        |PriorityMove {
                             priority,
                             new_priority,
                         }| (*priority, *new_priority),
                    )
                    .collect();
                self.change_rules(&listener_name, |b| b.with_priorities(&moves))
            }
        }
    }
}

/// `default` or `0` (the default rule), or a priority.
fn parse_priority(s: &str) -> Result<u32, ApiError> {
    if s.eq_ignore_ascii_case("default") {
        return Ok(0);
    }
    s.parse().map_err(|_| {
        ApiError::new(
            "ValidationError",
            format!("priority {s:?} is not a number or `default`"),
        )
    })
}
