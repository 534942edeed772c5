//! Loading the XDP programs, pinning and opening their maps, attaching to interfaces.
//!
//! The object built from `lb-ebpf` is embedded in the binary. [`Balancer`] owns a loaded copy
//! of `lb_xdp` and its maps (pinned under `--pin-path` so `lb stats`, `lb dump` and `bpftool`
//! can read them from another process), and `lb_hc_encap`, the TC egress program that sends
//! health-check probes through the same data path (same object, so it reads the same
//! `LB_BACKENDS`); [`Decap`] and [`PassGuard`] own `lb_decap` and `lb_pass`.
//! Programs are attached through BPF links, so they detach when their owner is dropped or the
//! process dies, and nothing is left attached by a crash.
use std::{
    ffi::CString,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp,
        XdpMode as AyaXdpMode, tc::TcAttachOptions,
    },
};
use lb_common::{
    Backend, Counters, DecapReason, FlowKey, FlowValue, HcReason, LbConfig, Reason, VipKey,
    VipMeta, names,
};

use crate::cli::XdpMode;

/// The eBPF object (all three programs), built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Magic number of bpffs in `statfs.f_type` (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors of the dataplane. Each says what was being done and to what.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The eBPF object could not be loaded (verifier rejection, missing privileges, …).
    #[error("loading the XDP programs: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program failed to load or attach.
    #[error("{what}: {source}")]
    Program {
        /// What was being done, e.g. "attaching lb_xdp to eth0 (native mode)".
        what: String,
        /// The underlying error.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("{what}: {source}")]
    Map {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: aya::maps::MapError,
    },
    /// Pinning a map failed.
    #[error("pinning {name} at {path}: {source}")]
    Pin {
        /// Map name.
        name: &'static str,
        /// Pin path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: aya::pin::PinError,
    },
    /// A filesystem operation on the pin directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The pin directory is not usable.
    #[error("--pin-path {path}: {problem}")]
    PinPath {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        problem: String,
    },
    /// No such interface.
    #[error("interface {0} does not exist (in this network namespace)")]
    NoSuchInterface(String),
}

/// Shorthand for results of this module.
pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// Sizes of the maps, from the flags. Every map is created with these before loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Flow-table capacity.
    pub max_flows: u32,
    /// Maglev table size per VIP (prime).
    pub ring_size: u32,
    /// VIP table capacity.
    pub max_vips: u32,
    /// Backend table capacity (over all VIPs).
    pub max_backends: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            max_flows: lb_common::DEFAULT_MAX_FLOWS,
            ring_size: lb_common::DEFAULT_RING_SIZE,
            max_vips: lb_common::DEFAULT_MAX_VIPS,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
        }
    }
}

impl Sizes {
    /// Smallest sizes, for loading only `lb_decap` or `lb_pass` (their maps are unused but
    /// are created with the object).
    const MINIMAL: Sizes = Sizes {
        max_flows: 1,
        ring_size: 1,
        max_vips: 1,
        max_backends: 1,
    };
}

fn load_object(sizes: Sizes) -> Result<Ebpf> {
    let Sizes {
        max_flows,
        ring_size,
        max_vips,
        max_backends,
    } = sizes;
    let ring_slots = ring_size.saturating_mul(max_vips);
    EbpfLoader::new()
        .map_max_entries(names::MAP_FLOWS, max_flows)
        .map_max_entries(names::MAP_RINGS, ring_slots)
        // One address marker per VIP address besides the VIPs (lb_common::VIP_MARKER_PROTO).
        .map_max_entries(names::MAP_VIPS, max_vips.saturating_mul(2))
        .map_max_entries(names::MAP_VIP_STATS, max_vips)
        .map_max_entries(names::MAP_BACKENDS, max_backends)
        .map_max_entries(names::MAP_BACKEND_STATS, max_backends)
        .load(OBJECT)
        .map_err(|e| DataplaneError::Load(Box::new(e)))
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| DataplaneError::Program {
            what: format!("finding program {name} in the object"),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            what: format!("{name} is not an XDP program"),
            source,
        })?;
    prog.load().map_err(|source| DataplaneError::Program {
        what: format!("loading {name} (verifier)"),
        source,
    })?;
    Ok(prog)
}

fn ifindex(iface: &str) -> Result<u32> {
    let c = CString::new(iface).map_err(|_| DataplaneError::NoSuchInterface(iface.into()))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(DataplaneError::NoSuchInterface(iface.into()));
    }
    Ok(idx)
}

/// Attaches `prog` to `iface` in `mode`; `Auto` tries native first, then skb with a warning.
fn attach(prog: &mut Xdp, prog_name: &str, iface: &str, mode: XdpMode) -> Result<()> {
    let idx = ifindex(iface)?;
    let try_mode = |prog: &mut Xdp, m: AyaXdpMode, label: &str| {
        prog.attach_to_if_index(idx, m)
            .map(|_| ())
            .map_err(|source| DataplaneError::Program {
                what: format!("attaching {prog_name} to {iface} ({label} mode)"),
                source,
            })
    };
    match mode {
        XdpMode::Native => try_mode(prog, AyaXdpMode::Driver, "native"),
        XdpMode::Skb => try_mode(prog, AyaXdpMode::Skb, "skb"),
        XdpMode::Auto => match try_mode(prog, AyaXdpMode::Driver, "native") {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(%iface, error = %e, "native XDP failed; falling back to skb mode");
                try_mode(prog, AyaXdpMode::Skb, "skb")
            }
        },
    }
}

/// Makes sure `dir` can hold pins: on a bpffs (mounting one at /sys/fs/bpf when that is where
/// it should be and nothing is mounted), and not already holding another instance's pins.
fn prepare_pin_dir(dir: &Path) -> Result<()> {
    let bpffs_root = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
        fs::create_dir_all(bpffs_root).map_err(|source| DataplaneError::Io {
            what: "creating",
            path: bpffs_root.into(),
            source,
        })?;
        let src = CString::new("bpffs").expect("no NUL");
        let target = CString::new("/sys/fs/bpf").expect("no NUL");
        let fstype = CString::new("bpf").expect("no NUL");
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(DataplaneError::Io {
                what: "mounting a bpffs at",
                path: bpffs_root.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        tracing::info!("mounted a bpffs at /sys/fs/bpf");
    }
    if dir.join(names::MAP_FLOWS).exists() {
        return Err(DataplaneError::PinPath {
            path: dir.into(),
            problem: "already holds lb maps: another `lb run` uses this directory (pick another \
                      --pin-path), or an earlier one was killed (remove it: rm -r DIR)"
                .into(),
        });
    }
    fs::create_dir_all(dir).map_err(|source| DataplaneError::Io {
        what: "creating",
        path: dir.into(),
        source,
    })?;
    if !is_bpffs(dir) {
        return Err(DataplaneError::PinPath {
            path: dir.into(),
            problem: "is not on a bpffs (mount one: mount -t bpf bpffs DIR)".into(),
        });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Typed handles on the balancer's maps, from a loaded object or from pins.
pub struct Maps {
    /// Global settings.
    pub config: Array<MapData, LbConfig>,
    /// VIP table.
    pub vips: HashMap<MapData, VipKey, VipMeta>,
    /// Backend table.
    pub backends: Array<MapData, Backend>,
    /// All Maglev rings, VIP after VIP.
    pub rings: Array<MapData, u32>,
    /// Flow table.
    pub flows: HashMap<MapData, FlowKey, FlowValue>,
    /// Per-VIP counters.
    pub vip_stats: PerCpuArray<MapData, Counters>,
    /// Per-backend counters.
    pub backend_stats: PerCpuArray<MapData, Counters>,
    /// Per-reason packet counters.
    pub reasons: PerCpuArray<MapData, u64>,
    /// Per-reason packet counters of `lb_hc_encap` (health-check probes).
    pub hc_stats: PerCpuArray<MapData, u64>,
}

/// Every map of the balancer that is pinned, in pin order.
const PINNED: [&str; 9] = [
    names::MAP_CONFIG,
    names::MAP_VIPS,
    names::MAP_BACKENDS,
    names::MAP_RINGS,
    names::MAP_FLOWS,
    names::MAP_VIP_STATS,
    names::MAP_BACKEND_STATS,
    names::MAP_REASONS,
    names::MAP_HC_STATS,
];

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Map { what, source }
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let take = |name: &'static str| {
            ebpf.take_map(name).ok_or_else(|| DataplaneError::Map {
                what: format!("finding map {name} in the object"),
                source: aya::maps::MapError::InvalidName { name: name.into() },
            })
        };
        Self::from_maps(take)
    }

    /// Opens the maps pinned in `dir` by a running `lb run`.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        if !dir.join(names::MAP_VIPS).exists() {
            return Err(DataplaneError::PinPath {
                path: dir.into(),
                problem: "holds no lb maps: is `lb run` running with this --pin-path?".into(),
            });
        }
        Self::from_maps(|name| {
            let data = MapData::from_pin(dir.join(name))
                .map_err(map_err(format!("opening pinned {name}")))?;
            Map::from_map_data(data).map_err(map_err(format!("opening pinned {name}")))
        })
    }

    fn from_maps(mut get: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        macro_rules! typed {
            ($name:expr) => {
                get($name)?
                    .try_into()
                    .map_err(map_err(format!("map {} has an unexpected type", $name)))?
            };
        }
        Ok(Self {
            config: typed!(names::MAP_CONFIG),
            vips: typed!(names::MAP_VIPS),
            backends: typed!(names::MAP_BACKENDS),
            rings: typed!(names::MAP_RINGS),
            flows: typed!(names::MAP_FLOWS),
            vip_stats: typed!(names::MAP_VIP_STATS),
            backend_stats: typed!(names::MAP_BACKEND_STATS),
            reasons: typed!(names::MAP_REASONS),
            hc_stats: typed!(names::MAP_HC_STATS),
        })
    }

    /// The global settings.
    pub fn lb_config(&self) -> Result<LbConfig> {
        self.config.get(&0, 0).map_err(map_err("reading LB_CONFIG"))
    }

    /// Writes the global settings.
    pub fn set_lb_config(&mut self, cfg: LbConfig) -> Result<()> {
        self.config
            .set(0, cfg, 0)
            .map_err(map_err("writing LB_CONFIG"))
    }

    /// Sum over CPUs of the per-reason counters, in [`Reason`] order.
    pub fn reason_totals(&self) -> Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|&r| {
                let v = self
                    .reasons
                    .get(&(r as u32), 0)
                    .map_err(map_err("reading LB_REASONS"))?;
                Ok((r, v.iter().sum()))
            })
            .collect()
    }

    /// Sum over CPUs of `lb_hc_encap`'s per-reason counters, in [`HcReason`] order.
    pub fn hc_totals(&self) -> Result<Vec<(HcReason, u64)>> {
        HcReason::ALL
            .iter()
            .map(|&r| {
                let v = self
                    .hc_stats
                    .get(&(r as u32), 0)
                    .map_err(map_err("reading LB_HC_STATS"))?;
                Ok((r, v.iter().sum()))
            })
            .collect()
    }

    /// Sum over CPUs of one VIP's counters.
    pub fn vip_counters(&self, vip_id: u32) -> Result<Counters> {
        sum_counters(&self.vip_stats, vip_id, "LB_VIP_STATS")
    }

    /// Sum over CPUs of one backend's counters.
    pub fn backend_counters(&self, backend_id: u32) -> Result<Counters> {
        sum_counters(&self.backend_stats, backend_id, "LB_BACKEND_STATS")
    }

    /// Deletes every flow-table entry pinned to `backend_id` (it left for good), so the
    /// entries neither linger in `lb dump flows` nor meet a later owner of the id. Returns
    /// how many were deleted. Walks the whole table: a control-path operation.
    pub fn remove_flows_of(&mut self, backend_id: u32) -> Result<usize> {
        let doomed: Vec<FlowKey> = self
            .flows
            .iter()
            .filter_map(|entry| match entry {
                Ok((k, v)) if v.backend_id == backend_id => Some(k),
                // An entry evicted while we walk is simply gone.
                _ => None,
            })
            .collect();
        let mut removed = 0;
        for k in doomed {
            if self.flows.remove(&k).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Zeroes one backend's counters (its id is being given to a new backend).
    pub fn reset_backend_counters(&mut self, backend_id: u32) -> Result<()> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Io {
            what: "counting CPUs from",
            path: "/sys/devices/system/cpu/possible".into(),
            source: e,
        })?;
        let zeros = PerCpuValues::try_from(vec![Counters::default(); n]).map_err(|source| {
            DataplaneError::Io {
                what: "building per-CPU zeros for",
                path: "LB_BACKEND_STATS".into(),
                source,
            }
        })?;
        self.backend_stats
            .set(backend_id, zeros, 0)
            .map_err(map_err("resetting LB_BACKEND_STATS"))
    }
}

fn sum_counters(map: &PerCpuArray<MapData, Counters>, idx: u32, name: &str) -> Result<Counters> {
    let v = map
        .get(&idx, 0)
        .map_err(map_err(format!("reading {name}[{idx}]")))?;
    Ok(v.iter().fold(Counters::default(), |a, c| {
        let Counters {
            packets,
            bytes,
            new_flows,
            unhealthy_routing_flows,
        } = *c;
        Counters {
            packets: a.packets + packets,
            bytes: a.bytes + bytes,
            new_flows: a.new_flows + new_flows,
            unhealthy_routing_flows: a.unhealthy_routing_flows + unhealthy_routing_flows,
        }
    }))
}

/// The loaded balancer: `lb_xdp` and `lb_hc_encap`, their maps (pinned), and their
/// attachments. Dropping it detaches both programs everywhere and removes the pins.
pub struct Balancer {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    attached: Vec<String>,
    hc_attached: Vec<String>,
}

/// One `BPF_PROG_TEST_RUN` of `lb_hc_encap` ([`Balancer::test_run_hc_encap`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcTestRun {
    /// The TC action the program returned (`TC_ACT_UNSPEC` = -1, `TC_ACT_OK` = 0,
    /// `TC_ACT_SHOT` = 2, `TC_ACT_REDIRECT` = 7).
    pub action: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// `skb->mark` after the run.
    pub mark: u32,
}

impl Balancer {
    /// Loads `lb_xdp` and `lb_hc_encap` with maps of the given sizes and writes the global
    /// settings. Maps are pinned under `pin_dir` when given (tests and benchmarks may run
    /// unpinned). Neither program is attached yet.
    pub fn load(sizes: Sizes, lb_addr: Ipv4Addr, pin_dir: Option<&Path>) -> Result<(Self, Maps)> {
        if let Some(dir) = pin_dir {
            prepare_pin_dir(dir)?;
        }
        let loaded = load_object(sizes).and_then(|mut ebpf| {
            xdp_program(&mut ebpf, names::PROG_XDP)?;
            hc_program(&mut ebpf)?
                .load()
                .map_err(|source| DataplaneError::Program {
                    what: format!("loading {} (verifier)", names::PROG_HC_ENCAP),
                    source,
                })?;
            Ok(ebpf)
        });
        let ebpf = match loaded {
            Ok(e) => e,
            Err(e) => {
                // Leave no empty pin directory behind (remove_dir refuses a non-empty one).
                if let Some(dir) = pin_dir {
                    let _ = fs::remove_dir(dir);
                }
                return Err(e);
            }
        };
        let mut this = Self {
            ebpf,
            pin_dir: None,
            attached: Vec::new(),
            hc_attached: Vec::new(),
        };
        if let Some(dir) = pin_dir {
            // Set before pinning, so a failure half-way still unpins what was pinned.
            this.pin_dir = Some(dir.to_path_buf());
            for name in PINNED {
                let path = dir.join(name);
                let map = this.ebpf.map(name).ok_or_else(|| DataplaneError::Map {
                    what: format!("finding map {name}"),
                    source: aya::maps::MapError::InvalidName { name: name.into() },
                })?;
                map.pin(&path)
                    .map_err(|source| DataplaneError::Pin { name, path, source })?;
            }
        }
        let mut maps = Maps::take(&mut this.ebpf)?;
        maps.set_lb_config(LbConfig {
            lb_addr: lb_common::ipv4_to_map(lb_addr),
            ring_size: sizes.ring_size,
            flags: 0,
            _pad: 0,
        })?;
        Ok((this, maps))
    }

    /// Attaches `lb_xdp` to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        attach_named(&mut self.ebpf, names::PROG_XDP, iface, mode)?;
        self.attached.push(iface.to_string());
        Ok(())
    }

    /// Interfaces `lb_xdp` is attached to.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Attaches `lb_hc_encap` to the egress of `iface` (a tcx link, after any programs already
    /// on that hook), so health-check probes that leave by `iface` with a mark from
    /// [`lb_common::hc_mark`] are encapsulated to their backend. Attach it to every interface
    /// a probe to a VIP may be routed out of (normally the one with the default route).
    pub fn attach_hc_encap(&mut self, iface: &str) -> Result<()> {
        let prog = hc_program(&mut self.ebpf)?;
        prog.attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|source| DataplaneError::Program {
            what: format!(
                "attaching {} to the egress of {iface} (tcx)",
                names::PROG_HC_ENCAP
            ),
            source,
        })?;
        self.hc_attached.push(iface.to_string());
        Ok(())
    }

    /// Interfaces whose egress `lb_hc_encap` is attached to.
    pub fn hc_attached(&self) -> &[String] {
        &self.hc_attached
    }

    /// Runs `lb_hc_encap` once with `BPF_PROG_TEST_RUN` on `frame` (an Ethernet frame, as TC
    /// egress sees it) with `skb->mark = mark`, as if leaving by interface `ifindex` of the
    /// calling thread's network namespace (`None`: the namespace's `lo`). Nothing is sent: a
    /// redirect only shows in the returned action.
    pub fn test_run_hc_encap(
        &self,
        frame: &[u8],
        mark: u32,
        ifindex: Option<u32>,
    ) -> Result<TcTestRun> {
        // `struct __sk_buff` (include/uapi/linux/bpf.h): `mark` at byte 8, `ifindex` at 40.
        // The kernel accepts only a few fields as input (mark, priority, ifindex, cb, tstamp,
        // …; the rest must be zero) and requires the output buffer to hold the whole struct
        // (192 bytes on 6.x), so both buffers are larger and zero-padded.
        const SKB_CTX: usize = 256;
        const MARK: usize = 8;
        const IFINDEX: usize = 40;
        let mut ctx_in = [0u8; SKB_CTX];
        ctx_in[MARK..MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        if let Some(idx) = ifindex {
            ctx_in[IFINDEX..IFINDEX + 4].copy_from_slice(&idx.to_ne_bytes());
        }
        let mut ctx_out = [0u8; SKB_CTX];
        let mut out = vec![0u8; frame.len() + 256];
        let prog: &SchedClassifier = self
            .ebpf
            .program(names::PROG_HC_ENCAP)
            .ok_or_else(|| DataplaneError::Program {
                what: format!("finding {}", names::PROG_HC_ENCAP),
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: format!("{} is not a TC classifier", names::PROG_HC_ENCAP),
                source,
            })?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx_in);
        opts.ctx_out = Some(&mut ctx_out);
        let res = prog
            .test_run(opts)
            .map_err(|source| DataplaneError::Program {
                what: format!(
                    "BPF_PROG_TEST_RUN of {} (mark {mark:#x}, ifindex {ifindex:?})",
                    names::PROG_HC_ENCAP
                ),
                source,
            })?;
        out.truncate(res.data_size_out as usize);
        Ok(TcTestRun {
            action: res.return_value as i32,
            frame: out,
            mark: u32::from_ne_bytes(
                ctx_out[MARK..MARK + 4]
                    .try_into()
                    .expect("4 bytes of a fixed-size buffer"),
            ),
        })
    }

    /// Runs `lb_xdp` once on `packet` with `BPF_PROG_TEST_RUN` (no interface needed). Returns
    /// the XDP action and the packet as the program left it.
    pub fn test_run(&self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_once(&self.ebpf, names::PROG_XDP, packet, None)
    }

    /// `BPF_PROG_TEST_RUN` with a repeat count (benchmarks).
    pub fn test_run_raw(
        &self,
        packet: &[u8],
        out: Option<&mut [u8]>,
        repeat: u32,
    ) -> Result<aya::programs::TestRunResult> {
        test_run_named(&self.ebpf, names::PROG_XDP, packet, out, repeat, None)
    }

    /// Runs `lb_xdp` once on `packet` as if it had arrived on interface `ingress_ifindex` (of
    /// the calling thread's network namespace). Without this the kernel's test run uses the
    /// namespace's `lo` as ingress device; with it the program sees the real receiving
    /// interface, so a backend reachable through that same interface gives `XDP_TX`.
    pub fn test_run_ingress(&self, packet: &[u8], ingress_ifindex: u32) -> Result<(u32, Vec<u8>)> {
        run_once(&self.ebpf, names::PROG_XDP, packet, Some(ingress_ifindex))
    }
}

/// `lb_hc_encap` of `ebpf` (loaded or not).
fn hc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    let name = names::PROG_HC_ENCAP;
    ebpf.program_mut(name)
        .ok_or_else(|| DataplaneError::Program {
            what: format!("finding program {name} in the object"),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            what: format!("{name} is not a TC classifier"),
            source,
        })
}

/// A program of `ebpf` that [`xdp_program`] loaded.
fn loaded_xdp<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Xdp> {
    ebpf.program(name)
        .ok_or_else(|| DataplaneError::Program {
            what: format!("finding {name}"),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            what: format!("{name} is not XDP"),
            source,
        })
}

/// Attaches the loaded program `name` of `ebpf` to `iface`.
fn attach_named(ebpf: &mut Ebpf, name: &str, iface: &str, mode: XdpMode) -> Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| DataplaneError::Program {
            what: format!("finding {name}"),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            what: format!("{name} is not XDP"),
            source,
        })?;
    attach(prog, name, iface, mode)
}

/// Runs program `name` once on `packet`; returns the action and the packet as left.
fn run_once(
    ebpf: &Ebpf,
    name: &str,
    packet: &[u8],
    ingress_ifindex: Option<u32>,
) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; packet.len() + 256];
    let res = test_run_named(ebpf, name, packet, Some(&mut out), 1, ingress_ifindex)?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out))
}

/// `BPF_PROG_TEST_RUN` of program `name`. With `ingress_ifindex`, an input `struct xdp_md`
/// names the receiving interface (otherwise the kernel uses the namespace's `lo`). Layout from
/// include/uapi/linux/bpf.h: `data`, `data_end`, `data_meta`, `ingress_ifindex`,
/// `rx_queue_index`, `egress_ifindex`, all `u32`; the kernel requires `data == 0`,
/// `data_end == packet length`, no metadata and `egress_ifindex == 0`.
fn test_run_named(
    ebpf: &Ebpf,
    name: &str,
    packet: &[u8],
    out: Option<&mut [u8]>,
    repeat: u32,
    ingress_ifindex: Option<u32>,
) -> Result<aya::programs::TestRunResult> {
    let prog = loaded_xdp(ebpf, name)?;
    let ctx: Option<Vec<u8>> = ingress_ifindex.map(|idx| {
        let fields: [u32; 6] = [0, packet.len() as u32, 0, idx, 0, 0];
        fields.iter().flat_map(|f| f.to_ne_bytes()).collect()
    });
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = out;
    opts.repeat = repeat;
    opts.ctx_in = ctx.as_deref();
    prog.test_run(opts)
        .map_err(|source| DataplaneError::Program {
            what: format!("BPF_PROG_TEST_RUN of {name} (ingress ifindex {ingress_ifindex:?})"),
            source,
        })
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // Links detach when `ebpf` drops; the pins would outlive us, so remove them.
        if let Some(dir) = &self.pin_dir {
            for name in PINNED {
                let _ = fs::remove_file(dir.join(name));
            }
            let _ = fs::remove_dir(dir);
        }
    }
}

/// The backend-side decapsulator, attached to one or more interfaces.
pub struct Decap {
    ebpf: Ebpf,
    attached: Vec<String>,
}

impl Decap {
    /// Loads `lb_decap`, accepting IP-in-IP packets whose outer destination is in `addrs`.
    pub fn load(addrs: &[Ipv4Addr]) -> Result<Self> {
        let mut ebpf = load_object(Sizes::MINIMAL)?;
        xdp_program(&mut ebpf, names::PROG_DECAP)?;
        {
            let mut map: HashMap<_, u32, u8> = ebpf
                .map_mut("LB_DECAP_ADDRS")
                .ok_or_else(|| DataplaneError::Map {
                    what: "finding LB_DECAP_ADDRS".into(),
                    source: aya::maps::MapError::InvalidName {
                        name: "LB_DECAP_ADDRS".into(),
                    },
                })?
                .try_into()
                .map_err(map_err("LB_DECAP_ADDRS has an unexpected type"))?;
            for a in addrs {
                map.insert(lb_common::ipv4_to_map(*a), 1, 0)
                    .map_err(map_err(format!("adding {a} to LB_DECAP_ADDRS")))?;
            }
        }
        Ok(Self {
            ebpf,
            attached: Vec::new(),
        })
    }

    /// Attaches `lb_decap` to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        attach_named(&mut self.ebpf, names::PROG_DECAP, iface, mode)?;
        self.attached.push(iface.to_string());
        Ok(())
    }

    /// Sum over CPUs of the decapsulator's counters.
    pub fn counters(&self) -> Result<Vec<(DecapReason, u64)>> {
        let map: PerCpuArray<_, u64> = self
            .ebpf
            .map(names::MAP_DECAP_STATS)
            .ok_or_else(|| DataplaneError::Map {
                what: "finding LB_DECAP_STATS".into(),
                source: aya::maps::MapError::InvalidName {
                    name: names::MAP_DECAP_STATS.into(),
                },
            })?
            .try_into()
            .map_err(map_err("LB_DECAP_STATS has an unexpected type"))?;
        DecapReason::ALL
            .iter()
            .map(|&r| {
                let v = map
                    .get(&(r as u32), 0)
                    .map_err(map_err("reading LB_DECAP_STATS"))?;
                Ok((r, v.iter().sum()))
            })
            .collect()
    }

    /// Runs `lb_decap` once on `packet` (tests).
    pub fn test_run(&self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_once(&self.ebpf, names::PROG_DECAP, packet, None)
    }
}

/// `lb_pass` attached to one interface; detached on drop.
pub struct PassGuard {
    ebpf: Ebpf,
}

impl PassGuard {
    /// Loads `lb_pass` without attaching it (the benchmark baseline).
    pub fn load_unattached() -> Result<Self> {
        let mut ebpf = load_object(Sizes::MINIMAL)?;
        xdp_program(&mut ebpf, names::PROG_PASS)?;
        Ok(Self { ebpf })
    }

    /// `BPF_PROG_TEST_RUN` of `lb_pass` (benchmark baseline).
    pub fn test_run_raw(
        &self,
        packet: &[u8],
        out: Option<&mut [u8]>,
        repeat: u32,
    ) -> Result<aya::programs::TestRunResult> {
        test_run_named(&self.ebpf, names::PROG_PASS, packet, out, repeat, None)
    }
}

/// Attaches `lb_pass` to `iface` in the calling thread's network namespace.
///
/// Frames sent with `XDP_TX` on a veth are delivered only when the peer's NAPI runs, which
/// needs an XDP program on the peer; this is that program.
pub fn attach_pass(iface: &str) -> Result<PassGuard> {
    let mut guard = PassGuard::load_unattached()?;
    attach_named(&mut guard.ebpf, names::PROG_PASS, iface, XdpMode::Native)?;
    Ok(guard)
}
