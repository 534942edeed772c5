//! Loading the XDP programs, pinning and opening their maps, attaching to interfaces.
//!
//! The object built from `lb-ebpf` is embedded in the binary. [`Balancer`] owns a loaded copy
//! of `lb_xdp` and its maps (pinned under `--pin-path` so `lb stats`, `lb dump` and `bpftool`
//! can read them from another process), and `lb_hc_encap`, the TC egress program that sends
//! health-check probes through the same data path (same object, so it reads the same
//! `LB_BACKENDS`); [`Decap`] and [`PassGuard`] own `lb_decap` and `lb_pass`.
//!
//! Restarts keep every flow. With a pin directory, `lb_xdp`'s XDP links are pinned too
//! (`xdp_link@IFACE`), so the program stays attached, with its maps, when `lb run` dies. The
//! next `lb run` with the same directory checks that the pinned maps have this binary's layout
//! ([`lb_common::LB_LAYOUT_VERSION`] in `LB_CONFIG`) and sizes, loads its program onto them
//! (`EbpfLoader::map_pin_path`), and swaps it into the pinned links atomically
//! (`bpf_link_update`): no packet meets a detached interface or an empty map. A clean
//! shutdown removes the pins (detaching the program) unless the data plane is to be left in
//! place ([`Balancer::keep_dataplane`]). A lock (`flock` on the directory) keeps two live
//! `lb run`s off one directory. `lb_hc_encap` is attached unpinned (tcx): it only matters
//! while a process runs health checks.
use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    ffi::CString,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapInfo, PerCpuArray, PerCpuValues,
    },
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp,
        XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    AddrKey, Backend, Counters, DecapReason, FlowKey, FlowTableStats, FlowValue, GuardCounters,
    GuardKey, HcReason, LB_CONFIG_MAGIC, LB_LAYOUT_VERSION, LbConfig, NatReverse, NextHop,
    NextHopCounter, RateKey, RateState, Reason, VipKey, VipMeta, names,
};

use crate::cli::XdpMode;

pub mod bench;
pub mod clock;
pub mod route_watch;

use route_watch::RouteWatch;

/// Default of `--nexthop-max-age`: how long `lb_xdp` uses a cached next hop at most.
pub const DEFAULT_NEXTHOP_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// The flow clock's unit could not be measured (see [`clock`]).
    #[error("measuring the kernel's tick (CONFIG_HZ) for the flow clock: {0}")]
    Clock(String),
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
    /// The pinned maps cannot be adopted by this binary.
    #[error("--pin-path {path}: {problem}")]
    Incompatible {
        /// The directory.
        path: PathBuf,
        /// What does not match, and what to do.
        problem: String,
    },
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

/// Source addresses of the outer headers `lb_xdp` and `lb_hc_encap` write, one per family.
/// A backend of a family without one is unreachable (`drop_no_route`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbAddrs {
    /// For IPv4 outer headers.
    pub v4: Option<Ipv4Addr>,
    /// For IPv6 outer headers.
    pub v6: Option<Ipv6Addr>,
}

impl LbAddrs {
    /// `addr` alone.
    pub fn one(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(a) => Self {
                v4: Some(a),
                v6: None,
            },
            IpAddr::V6(a) => Self {
                v4: None,
                v6: Some(a),
            },
        }
    }

    fn write_to(self, cfg: &mut LbConfig) {
        cfg.lb_addr4 = self.v4.map_or(0, lb_common::ipv4_to_map);
        cfg.lb_addr6 = self
            .v6
            .map_or([0; 4], |a| lb_common::addr_to_map(IpAddr::V6(a)).1);
    }
}

/// The max_entries each pinned map must have for `sizes` (and what the loader creates), with
/// the flag to change if a pinned map differs. Maps not listed have fixed sizes.
fn sized_maps(sizes: Sizes) -> [(&'static str, u32, &'static str); 9] {
    let Sizes {
        max_flows,
        ring_size,
        max_vips,
        max_backends,
    } = sizes;
    [
        (
            names::MAP_FLOWS,
            flow_table_entries(max_flows),
            "--max-flows",
        ),
        // Every NAT flow has one reverse entry.
        (names::MAP_NAT_REVERSE, max_flows, "--max-flows"),
        (
            names::MAP_RINGS,
            ring_size.saturating_mul(max_vips),
            "--ring-size times --max-vips",
        ),
        // One address marker per VIP address besides the VIPs (lb_common::VIP_MARKER_PROTO).
        (names::MAP_VIPS, max_vips.saturating_mul(2), "--max-vips"),
        // Index 0: every departed backend; 1 + vip_id: that VIP's.
        (
            names::MAP_RETIRED_STATS,
            max_vips.saturating_add(1),
            "--max-vips",
        ),
        (names::MAP_GUARD_STATS, max_vips, "--max-vips"),
        (names::MAP_BACKENDS, max_backends, "--max-backends"),
        (names::MAP_BACKEND_STATS, max_backends, "--max-backends"),
        (names::MAP_NEXTHOPS, max_backends, "--max-backends"),
    ]
}

/// The entries the kernel gives a flow table asked for `max_flows`: its LRU lists are per CPU
/// (`BPF_F_NO_COMMON_LRU`), and the kernel rounds `max_entries` up to a multiple of the
/// possible CPUs so that every CPU's list gets the same share (`htab_map_alloc`). Pinned maps
/// are compared with this figure.
pub fn flow_table_entries(max_flows: u32) -> u32 {
    static POSSIBLE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let cpus = *POSSIBLE.get_or_init(|| {
        // aya's count of the possible CPUs, the figure the kernel rounds with.
        aya::util::nr_cpus()
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .unwrap_or(1)
    });
    max_flows.div_ceil(cpus).saturating_mul(cpus)
}

/// Loads the object with maps sized for `sizes`. With `pin_dir`, the pinned maps are created
/// and pinned there, or reused if they exist (the caller checked that they fit).
fn load_object(sizes: Sizes, pin_dir: Option<&Path>) -> Result<Ebpf> {
    load_object_from(OBJECT, sizes, pin_dir)
}

/// [`load_object`] of another build of the object (`bench xdp --lb-obj`: variants measured
/// beside the built-in one); the map layouts must be this build's.
fn load_object_from(object: &[u8], sizes: Sizes, pin_dir: Option<&Path>) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    for (name, entries, _) in sized_maps(sizes) {
        loader.map_max_entries(name, entries);
    }
    let paths: Vec<(&str, PathBuf)> = pin_dir
        .map(|dir| PINNED.iter().map(|n| (*n, dir.join(n))).collect())
        .unwrap_or_default();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .load(object)
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
    retry_eagain(|| prog.load()).map_err(|source| DataplaneError::Program {
        what: format!("loading {name} (verifier)"),
        source,
    })?;
    Ok(prog)
}

/// Loads a program with SIGCHLD kept away from the loading thread, and again when the kernel
/// still answers EAGAIN. The verifier gives up with EAGAIN when a signal reaches the loading
/// thread while it checks the program (`do_check` tests `signal_pending`); for `lb_xdp` that
/// is a window of about 40 ms, and the SIGCHLD of any child the process started, by any
/// thread, is enough: the kernel hands it to whichever thread does not block it, even with
/// SIGCHLD's default (ignoring) action. In the suite, where parallel tests each start a few
/// dozen `ip` commands, that failed two runs in twelve of `xdp_testrun` under load, five
/// attempts in a row each time. Blocked here, the signal goes to another thread, or waits
/// until the mask is restored. libbpf retries `BPF_PROG_LOAD` on EAGAIN the same way; other
/// signals (a SIGTERM during start-up) still interrupt. Bounded: five attempts.
fn retry_eagain(
    mut load: impl FnMut() -> std::result::Result<(), aya::programs::ProgramError>,
) -> std::result::Result<(), aya::programs::ProgramError> {
    let _blocked = SigchldBlocked::new();
    let mut attempts = 5;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts > 1 =>
            {
                attempts -= 1;
            }
            other => return other,
        }
    }
}

/// SIGCHLD blocked in the calling thread while this lives; the previous mask comes back on
/// drop (also when the load panics).
struct SigchldBlocked {
    previous: Option<libc::sigset_t>,
}

impl SigchldBlocked {
    fn new() -> Self {
        // SAFETY: sigemptyset/sigaddset initialise a local set; pthread_sigmask changes only
        // the calling thread's mask and writes the old one into `previous`.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            let ok = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous) == 0;
            // Cannot fail with these arguments; if it did, the load goes ahead unprotected.
            Self {
                previous: ok.then_some(previous),
            }
        }
    }
}

impl Drop for SigchldBlocked {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous {
            // SAFETY: restores the mask read in `new`, on the same thread: the guard lives in
            // `retry_eagain`'s frame and is never moved elsewhere.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, previous, std::ptr::null_mut()) };
        }
    }
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
fn attach(prog: &mut Xdp, prog_name: &str, iface: &str, mode: XdpMode) -> Result<XdpLinkId> {
    let idx = ifindex(iface)?;
    let try_mode = |prog: &mut Xdp, m: AyaXdpMode, label: &str| {
        prog.attach_to_if_index(idx, m)
            .map_err(|source| DataplaneError::Program {
                what: format!("attaching {prog_name} to {iface} ({label} mode)"),
                source,
            })
    };
    match mode {
        XdpMode::Native => try_mode(prog, AyaXdpMode::Driver, "native"),
        XdpMode::Skb => try_mode(prog, AyaXdpMode::Skb, "skb"),
        XdpMode::Auto => match try_mode(prog, AyaXdpMode::Driver, "native") {
            Ok(id) => Ok(id),
            Err(e) => {
                tracing::warn!(%iface, error = %e, "native XDP failed; falling back to skb mode");
                try_mode(prog, AyaXdpMode::Skb, "skb")
            }
        },
    }
}

/// Makes sure `dir` can hold pins: on a bpffs (mounting one at /sys/fs/bpf when that is where
/// it should be and nothing is mounted).
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

/// Takes the pin directory's lock: an exclusive `flock` on the directory, held as long as the
/// returned descriptor (so for the process's life, whatever ends it). A second `lb run` on the
/// same directory is refused while the first lives; one that finds the lock free may adopt
/// the pins a dead one left.
fn lock_pin_dir(dir: &Path) -> Result<OwnedFd> {
    let c =
        CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| DataplaneError::PinPath {
            path: dir.into(),
            problem: "contains a NUL byte".into(),
        })?;
    // SAFETY: valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(DataplaneError::Io {
            what: "opening",
            path: dir.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a valid descriptor.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DataplaneError::PinPath {
                path: dir.into(),
                problem: "is in use by another running `lb run` (stop it, or pick another \
                          --pin-path)"
                    .into(),
            });
        }
        return Err(DataplaneError::Io {
            what: "locking",
            path: dir.into(),
            source: e,
        });
    }
    Ok(fd)
}

/// Checks the `LB_CONFIG` pinned in `dir` against this binary's layout, and returns it.
fn check_layout(dir: &Path) -> Result<LbConfig> {
    let incompatible = |problem: String| DataplaneError::Incompatible {
        path: dir.into(),
        problem,
    };
    let path = dir.join(names::MAP_CONFIG);
    let info = MapInfo::from_pin(&path)
        .map_err(map_err(format!("opening pinned {}", names::MAP_CONFIG)))?;
    let want = std::mem::size_of::<LbConfig>() as u32;
    if info.value_size() != want || info.key_size() != 4 {
        return Err(incompatible(format!(
            "its maps were made by an lb with another map layout ({} holds {}-byte values; \
             this binary uses layout {LB_LAYOUT_VERSION}, {want}-byte values) and cannot be \
             adopted: stop the lb that made them and remove the directory (that resets every \
             flow), or run the binary that made them",
            names::MAP_CONFIG,
            info.value_size()
        )));
    }
    let data = MapData::from_pin(&path)
        .map_err(map_err(format!("opening pinned {}", names::MAP_CONFIG)))?;
    let config: Array<MapData, LbConfig> = Map::Array(data)
        .try_into()
        .map_err(map_err(format!("opening pinned {}", names::MAP_CONFIG)))?;
    let cfg = config
        .get(&0, 0)
        .map_err(map_err(format!("reading pinned {}", names::MAP_CONFIG)))?;
    if cfg.magic != LB_CONFIG_MAGIC || cfg.layout != LB_LAYOUT_VERSION {
        return Err(incompatible(format!(
            "its maps have map layout {} and this binary uses layout {LB_LAYOUT_VERSION}: they \
             cannot be adopted. Stop the lb that made them and remove the directory (that \
             resets every flow), or run the binary that made them",
            if cfg.magic == LB_CONFIG_MAGIC {
                cfg.layout.to_string()
            } else {
                "unknown".to_owned()
            }
        )));
    }
    Ok(cfg)
}

/// Whether `dir` holds a previous run's maps that this binary can adopt with `sizes`: `false`
/// for an empty directory, an error naming what differs otherwise.
fn check_pinned(dir: &Path, sizes: Sizes) -> Result<bool> {
    let present: Vec<&str> = PINNED
        .iter()
        .copied()
        .filter(|n| dir.join(n).exists())
        .collect();
    if present.is_empty() {
        return Ok(false);
    }
    let incompatible = |problem: String| DataplaneError::Incompatible {
        path: dir.into(),
        problem,
    };
    if !present.contains(&names::MAP_CONFIG) {
        return Err(incompatible(format!(
            "holds lb maps ({}) but no {}: they were made by an lb older than map layout \
             versioning and cannot be adopted; stop it and remove the directory (that resets \
             every flow)",
            present.join(", "),
            names::MAP_CONFIG
        )));
    }
    let cfg = check_layout(dir)?;
    if let Some(missing) = PINNED.iter().find(|n| !present.contains(n)) {
        return Err(incompatible(format!(
            "holds an incomplete set of lb maps ({missing} is missing); remove the directory \
             to start afresh (that resets every flow)"
        )));
    }
    if cfg.ring_size != sizes.ring_size {
        return Err(incompatible(format!(
            "its maps were made with --ring-size {}, not {}: restart with the same sizes to \
             keep the flows (or remove the directory to start afresh)",
            cfg.ring_size, sizes.ring_size
        )));
    }
    for (name, entries, flag) in sized_maps(sizes) {
        let info =
            MapInfo::from_pin(dir.join(name)).map_err(map_err(format!("opening pinned {name}")))?;
        if info.max_entries() != entries {
            return Err(incompatible(format!(
                "its {name} holds {} entries and {flag} asks for {entries}: restart with the \
                 sizes it was made with to keep the flows (or remove the directory to start \
                 afresh)",
                info.max_entries()
            )));
        }
    }
    Ok(true)
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

/// Serialises every read-modify-write of `LB_CONFIG` in this process. Its writers are the
/// thread that owns [`Maps`] (the loader, the L4 writer's flags and backend writes, the
/// next-hop cache's maximum age) and the route watch's thread, which moves
/// [`LbConfig::nexthop_generation`] on. Without the lock, a writer that read the entry before
/// another's write could put back an older generation (under which stale next hops were
/// stored: they would be valid again until they age out) or an older flag. Other processes
/// never write the entry: the pin directory's lock admits one `lb run` at a time, and `lb
/// stats` / `lb dump` only read. One lock for every balancer of the process (tests run
/// several): the writes are rare and short.
static LB_CONFIG_WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Reads `LB_CONFIG`, changes it with `f` and writes it back if `f` changed it, under
/// [`LB_CONFIG_WRITE`]; returns the entry as it now is.
pub fn update_lb_config(
    config: &mut Array<MapData, LbConfig>,
    f: impl FnOnce(&mut LbConfig),
) -> Result<LbConfig> {
    // A panic elsewhere while holding the lock leaves no half-done state behind it (the map
    // write is one syscall), so a poisoned lock is as good as a free one.
    let _held = LB_CONFIG_WRITE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = config.get(&0, 0).map_err(map_err("reading LB_CONFIG"))?;
    let mut after = before;
    f(&mut after);
    if after != before {
        config
            .set(0, after, 0)
            .map_err(map_err("writing LB_CONFIG"))?;
    }
    Ok(after)
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
    /// Per-backend counters: the one record a forwarded packet updates.
    pub backend_stats: PerCpuArray<MapData, Counters>,
    /// What departed backends had counted: index 0 all of them, `1 + vip_id` that VIP's
    /// (written by userspace only; see [`Counters`]).
    pub retired: Array<MapData, Counters>,
    /// Per-reason packet counters.
    pub reasons: PerCpuArray<MapData, u64>,
    /// Per-reason packet counters of `lb_hc_encap` (health-check probes).
    pub hc_stats: PerCpuArray<MapData, u64>,
    /// Flow-table keys `lb_xdp` inserted (index 0, per CPU).
    pub flow_inserts: PerCpuArray<MapData, u64>,
    /// What the flow sweeper last found (index 0).
    pub flow_stats: Array<MapData, FlowTableStats>,
    /// NAT: reply 5-tuple → the flow it belongs to.
    pub nat_reverse: HashMap<MapData, FlowKey, NatReverse>,
    /// Allow lists of every VIP.
    pub guard_allow: LpmTrie<MapData, GuardKey, u8>,
    /// Deny lists of every VIP.
    pub guard_deny: LpmTrie<MapData, GuardKey, u8>,
    /// New-flow token buckets per (VIP, source).
    pub rate: HashMap<MapData, RateKey, RateState>,
    /// Guard drops per VIP.
    pub guard_stats: PerCpuArray<MapData, GuardCounters>,
    /// The next hop cached per backend, per CPU.
    pub nexthops: PerCpuArray<MapData, NextHop>,
    /// The next-hop cache's counters.
    pub nexthop_stats: PerCpuArray<MapData, u64>,
}

/// Every map of the balancer that is pinned, in pin order.
const PINNED: [&str; 18] = [
    names::MAP_CONFIG,
    names::MAP_VIPS,
    names::MAP_BACKENDS,
    names::MAP_RINGS,
    names::MAP_FLOWS,
    names::MAP_BACKEND_STATS,
    names::MAP_RETIRED_STATS,
    names::MAP_REASONS,
    names::MAP_HC_STATS,
    names::MAP_FLOW_INSERTS,
    names::MAP_FLOW_STATS,
    names::MAP_NAT_REVERSE,
    names::MAP_GUARD_ALLOW,
    names::MAP_GUARD_DENY,
    names::MAP_RATE,
    names::MAP_GUARD_STATS,
    names::MAP_NEXTHOPS,
    names::MAP_NEXTHOP_STATS,
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

    /// Opens the maps pinned in `dir` by a running `lb run` (or left by one), after checking
    /// that they have this binary's layout.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        if !dir.join(names::MAP_VIPS).exists() {
            return Err(DataplaneError::PinPath {
                path: dir.into(),
                problem: "holds no lb maps: is `lb run` running with this --pin-path?".into(),
            });
        }
        if !dir.join(names::MAP_CONFIG).exists() {
            return Err(DataplaneError::Incompatible {
                path: dir.into(),
                problem: "holds lb maps of a layout older than versioning: read them with the \
                          binary that made them"
                    .into(),
            });
        }
        check_layout(dir)?;
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
            backend_stats: typed!(names::MAP_BACKEND_STATS),
            retired: typed!(names::MAP_RETIRED_STATS),
            reasons: typed!(names::MAP_REASONS),
            hc_stats: typed!(names::MAP_HC_STATS),
            flow_inserts: typed!(names::MAP_FLOW_INSERTS),
            flow_stats: typed!(names::MAP_FLOW_STATS),
            nat_reverse: typed!(names::MAP_NAT_REVERSE),
            guard_allow: typed!(names::MAP_GUARD_ALLOW),
            guard_deny: typed!(names::MAP_GUARD_DENY),
            rate: typed!(names::MAP_RATE),
            guard_stats: typed!(names::MAP_GUARD_STATS),
            nexthops: typed!(names::MAP_NEXTHOPS),
            nexthop_stats: typed!(names::MAP_NEXTHOP_STATS),
        })
    }

    /// The global settings.
    pub fn lb_config(&self) -> Result<LbConfig> {
        self.config.get(&0, 0).map_err(map_err("reading LB_CONFIG"))
    }

    /// Changes the global settings with `f` (see [`update_lb_config`]); returns them as
    /// written.
    pub fn update_lb_config(&mut self, f: impl FnOnce(&mut LbConfig)) -> Result<LbConfig> {
        update_lb_config(&mut self.config, f)
    }

    /// Invalidates every cached next hop (see [`route_watch::bump_generation`]).
    pub fn bump_nexthop_generation(&mut self) -> Result<u32> {
        route_watch::bump_generation(&mut self.config)
    }

    /// How long `lb_xdp` may use a cached next hop; zero turns the cache off.
    pub fn set_nexthop_max_age(&mut self, age: std::time::Duration) -> Result<()> {
        let age = u64::try_from(age.as_nanos()).unwrap_or(u64::MAX);
        self.update_lb_config(|c| c.nexthop_max_age_ns = age)
            .map(|_| ())
    }

    /// Backend `id`'s cached next hop on every CPU, in CPU order.
    pub fn nexthops_of(&self, id: u32) -> Result<Vec<NextHop>> {
        let v = self
            .nexthops
            .get(&id, 0)
            .map_err(map_err(format!("reading LB_NEXTHOPS[{id}]")))?;
        Ok(v.iter().copied().collect())
    }

    /// Sum over CPUs of the next-hop cache's counters, in [`NextHopCounter`] order.
    pub fn nexthop_totals(&self) -> Result<Vec<(NextHopCounter, u64)>> {
        sum_per_cpu(
            &self.nexthop_stats,
            &NextHopCounter::ALL,
            |c| c as u32,
            "LB_NEXTHOP_STATS",
        )
    }

    /// Sum over CPUs of the per-reason counters, in [`Reason`] order, with `tx`, `redirect`
    /// and `nat_reply` derived from the backends' records (see [`Counters`]): one walk of the
    /// backend table. A caller that has [`Self::backend_records`] at hand uses
    /// [`Self::reason_totals_of`].
    pub fn reason_totals(&self) -> Result<Vec<(Reason, u64)>> {
        self.reason_totals_of(&self.backend_records()?)
    }

    /// [`Self::reason_totals`] with the derived reasons taken from `records` (every backend in
    /// use, as [`Self::backend_records`] read them) and what departed backends had counted.
    pub fn reason_totals_of(&self, records: &[BackendRecord]) -> Result<Vec<(Reason, u64)>> {
        let all = all_figures(records, self.retired_counters(None)?);
        let own = sum_per_cpu(&self.reasons, Reason::ALL, |r| r as u32, "LB_REASONS")?;
        Ok(with_derived_reasons(own, &all))
    }

    /// Every backend in use with its record, in one walk of the backend table and one read of
    /// each record: what a report derives its VIP figures ([`vip_figures`]) and reasons
    /// ([`Self::reason_totals_of`]) from, so they agree with the backend rows beside them.
    pub fn backend_records(&self) -> Result<Vec<BackendRecord>> {
        self.backend_entries()?
            .into_iter()
            .map(|(id, backend)| {
                Ok(BackendRecord {
                    id,
                    backend,
                    counters: self.backend_counters(id)?,
                })
            })
            .collect()
    }

    /// Sum over CPUs of `lb_hc_encap`'s per-reason counters, in [`HcReason`] order.
    pub fn hc_totals(&self) -> Result<Vec<(HcReason, u64)>> {
        sum_per_cpu(&self.hc_stats, HcReason::ALL, |r| r as u32, "LB_HC_STATS")
    }

    /// One VIP's figures: its backends' records plus what its departed backends had counted
    /// (see [`Counters`]). One walk of the backend table; a report over every VIP reads
    /// [`Self::backend_records`] once and uses [`vip_figures`].
    pub fn vip_counters(&self, vip_id: u32) -> Result<Counters> {
        Ok(vip_figures(
            vip_id,
            &self.backend_records()?,
            self.retired_counters(Some(vip_id))?,
        ))
    }

    /// What departed backends had counted: of VIP `vip_id`, or of all VIPs (`None`). Zero for
    /// a VIP id beyond the map.
    pub fn retired_counters(&self, vip_id: Option<u32>) -> Result<Counters> {
        let idx = retired_index(vip_id);
        match self.retired.get(&idx, 0) {
            Ok(c) => Ok(c),
            Err(aya::maps::MapError::OutOfBounds { .. }) => Ok(Counters::default()),
            Err(e) => Err(map_err(format!("reading LB_RETIRED_STATS[{idx}]"))(e)),
        }
    }

    /// Folds backend `backend_id`'s record into what VIP `vip_id`'s departed backends (and
    /// all departed backends) had counted. Called once, after the backend's entry was
    /// cleared: from then on no VIP's figures include its record, which is zeroed when the
    /// id is given out again. Writes only `LB_RETIRED_STATS` (userspace's own), never the
    /// per-CPU record `lb_xdp` increments.
    pub fn retire_backend_counters(&mut self, backend_id: u32, vip_id: u32) -> Result<()> {
        let c = self.backend_counters(backend_id)?;
        for idx in [None, Some(vip_id)] {
            let i = retired_index(idx);
            if idx.is_some() && i >= self.retired.len() {
                continue;
            }
            let sum = self.retired_counters(idx)?.plus(c);
            self.retired
                .set(i, sum, 0)
                .map_err(map_err(format!("writing LB_RETIRED_STATS[{i}]")))?;
        }
        Ok(())
    }

    /// Zeroes what VIP `vip_id`'s departed backends had counted (its id is being given to a
    /// new VIP); the total over all VIPs keeps it.
    pub fn reset_vip_counters(&mut self, vip_id: u32) -> Result<()> {
        let i = retired_index(Some(vip_id));
        if i >= self.retired.len() {
            return Ok(());
        }
        self.retired
            .set(i, Counters::default(), 0)
            .map_err(map_err(format!("resetting LB_RETIRED_STATS[{i}]")))
    }

    /// Sum over CPUs of one backend's counters.
    pub fn backend_counters(&self, backend_id: u32) -> Result<Counters> {
        sum_counters(&self.backend_stats, backend_id, "LB_BACKEND_STATS")
    }

    /// Deletes every flow-table entry pinned to one of `ids` (they left for good), so the
    /// entries neither linger in `lb dump flows` nor meet a later owner of an id. Returns how
    /// many were deleted. Walks the whole table once: a control-path operation.
    pub fn remove_flows_of(&mut self, ids: &BTreeSet<u32>) -> Result<usize> {
        let doomed: Vec<FlowKey> = self
            .flows
            .iter()
            .filter_map(|entry| match entry {
                Ok((k, v)) if ids.contains(&v.backend_id) => Some(k),
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
        let reverse: Vec<FlowKey> = self
            .nat_reverse
            .iter()
            .filter_map(|entry| match entry {
                Ok((k, v)) if ids.contains(&v.backend_id) => Some(k),
                _ => None,
            })
            .collect();
        for k in reverse {
            let _ = self.nat_reverse.remove(&k);
        }
        Ok(removed)
    }

    /// Deletes the NAT reverse entries whose flow is gone or now names another backend (the
    /// flow sweeper runs it after deleting expired flows); returns how many are left.
    pub fn sweep_nat_reverse(&mut self) -> Result<u64> {
        let mut live = 0u64;
        let mut doomed: Vec<FlowKey> = Vec::new();
        for entry in self.nat_reverse.iter() {
            // An entry evicted while we walk is simply gone.
            let Ok((k, v)) = entry else { continue };
            let flow = nat_flow_key(&k, &v);
            match self.flows.get(&flow, 0) {
                Ok(f) if f.backend_id == v.backend_id => live += 1,
                _ => doomed.push(k),
            }
        }
        for k in doomed {
            let _ = self.nat_reverse.remove(&k);
        }
        Ok(live)
    }

    /// Sum over CPUs of one VIP's guard counters.
    pub fn guard_counters(&self, vip_id: u32) -> Result<GuardCounters> {
        let v = self
            .guard_stats
            .get(&vip_id, 0)
            .map_err(map_err(format!("reading LB_GUARD_STATS[{vip_id}]")))?;
        Ok(v.iter().fold(GuardCounters::default(), |a, c| {
            let GuardCounters {
                not_allowed,
                denied,
                rate_limited,
            } = *c;
            GuardCounters {
                not_allowed: a.not_allowed + not_allowed,
                denied: a.denied + denied,
                rate_limited: a.rate_limited + rate_limited,
            }
        }))
    }

    /// Zeroes one VIP's guard counters (its id is being given to a new VIP).
    pub fn reset_guard_counters(&mut self, vip_id: u32) -> Result<()> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Io {
            what: "counting CPUs from",
            path: "/sys/devices/system/cpu/possible".into(),
            source: e,
        })?;
        let zeros =
            PerCpuValues::try_from(vec![GuardCounters::default(); n]).map_err(|source| {
                DataplaneError::Io {
                    what: "building per-CPU zeros for",
                    path: "LB_GUARD_STATS".into(),
                    source,
                }
            })?;
        self.guard_stats
            .set(vip_id, zeros, 0)
            .map_err(map_err("resetting LB_GUARD_STATS"))
    }

    /// Every non-empty backend entry with its id.
    pub fn backend_entries(&self) -> Result<Vec<(u32, Backend)>> {
        let mut out = Vec::new();
        for (id, b) in self.backends.iter().enumerate() {
            let b = b.map_err(map_err("reading LB_BACKENDS"))?;
            if b != Backend::default() {
                out.push((id as u32, b));
            }
        }
        Ok(out)
    }

    /// Sum over CPUs of the flow-table keys `lb_xdp` inserted.
    pub fn flow_inserts(&self) -> Result<u64> {
        let v = self
            .flow_inserts
            .get(&0, 0)
            .map_err(map_err("reading LB_FLOW_INSERTS"))?;
        Ok(v.iter().sum())
    }

    /// What the flow sweeper last wrote.
    pub fn flow_table_stats(&self) -> Result<FlowTableStats> {
        self.flow_stats
            .get(&0, 0)
            .map_err(map_err("reading LB_FLOW_STATS"))
    }

    /// Records what the flow sweeper found.
    pub fn set_flow_table_stats(&mut self, stats: FlowTableStats) -> Result<()> {
        self.flow_stats
            .set(0, stats, 0)
            .map_err(map_err("writing LB_FLOW_STATS"))
    }

    /// Capacity of the flow table (its max_entries).
    pub fn flow_capacity(&self) -> Result<u32> {
        self.flows
            .map()
            .info()
            .map(|i| i.max_entries())
            .map_err(map_err("reading LB_FLOWS's info"))
    }

    /// One sweep of the flow table at `now_ns` (CLOCK_MONOTONIC): deletes the entries idle
    /// longer than their VIP's timeout (`timeouts` by VIP id; an entry of an unknown VIP counts
    /// as expired) and counts the rest. Returns (entries left, entries deleted).
    pub fn sweep_flows(
        &mut self,
        now_ns: u64,
        timeouts: &StdHashMap<u32, u64>,
    ) -> Result<(u64, u64)> {
        let mut live = 0u64;
        let mut doomed: Vec<FlowKey> = Vec::new();
        for entry in self.flows.iter() {
            // An entry evicted while we walk is simply gone.
            let Ok((k, v)) = entry else { continue };
            let expired = match timeouts.get(&v.vip_id) {
                Some(0) => false,
                Some(&t) => now_ns.saturating_sub(v.last_seen_ns) > t,
                None => true,
            };
            if expired {
                doomed.push(k);
            } else {
                live += 1;
            }
        }
        let mut deleted = 0u64;
        for k in doomed {
            if self.flows.remove(&k).is_ok() {
                deleted += 1;
            }
        }
        Ok((live, deleted))
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

/// The flow-table key of the flow a NAT reverse entry belongs to: the reply's destination is
/// the client, and the client sent to the VIP.
pub fn nat_flow_key(reply: &FlowKey, rev: &NatReverse) -> FlowKey {
    FlowKey {
        src_addr: reply.dst_addr,
        dst_addr: rev.vip_addr,
        src_port: reply.dst_port,
        dst_port: rev.vip_port,
        proto: reply.proto,
        family: reply.family,
        _pad: [0; 2],
    }
}

/// Each of `keys` with its counter in `map` (indexed by `index`), summed over CPUs.
fn sum_per_cpu<K: Copy>(
    map: &PerCpuArray<MapData, u64>,
    keys: &[K],
    index: impl Fn(K) -> u32,
    name: &str,
) -> Result<Vec<(K, u64)>> {
    keys.iter()
        .map(|&k| {
            let v = map
                .get(&index(k), 0)
                .map_err(map_err(format!("reading {name}")))?;
            Ok((k, v.iter().sum()))
        })
        .collect()
}

fn sum_counters(map: &PerCpuArray<MapData, Counters>, idx: u32, name: &str) -> Result<Counters> {
    let v = map
        .get(&idx, 0)
        .map_err(map_err(format!("reading {name}[{idx}]")))?;
    Ok(v.iter().fold(Counters::default(), |a, c| a.plus(*c)))
}

/// Index in `LB_RETIRED_STATS` of VIP `vip_id`'s departed backends, or of all (`None`).
fn retired_index(vip_id: Option<u32>) -> u32 {
    vip_id.map_or(0, |v| v.saturating_add(1))
}

/// One backend in use and its record (summed over CPUs), as [`Maps::backend_records`] read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendRecord {
    pub id: u32,
    pub backend: Backend,
    pub counters: Counters,
}

/// A VIP's figures from the backends' entries and records (entries of other VIPs are left
/// out) and what its departed backends had counted.
pub fn vip_figures(vip_id: u32, records: &[BackendRecord], retired: Counters) -> Counters {
    records
        .iter()
        .filter(|r| r.backend.vip_id == vip_id && r.backend != Backend::default())
        .fold(retired, |a, r| a.plus(r.counters))
}

/// Every VIP's figures together: the records of every backend in use and what all departed
/// backends had counted. `tx`, `redirect` and `nat_reply` are derived from it.
pub fn all_figures(records: &[BackendRecord], retired: Counters) -> Counters {
    records
        .iter()
        .filter(|r| r.backend != Backend::default())
        .fold(retired, |a, r| a.plus(r.counters))
}

/// `LB_REASONS`' own counts with `tx`, `redirect` and `nat_reply` added from `records`: the sum
/// of every backend record in use and of all departed backends (see [`Counters`]).
pub fn with_derived_reasons(mut own: Vec<(Reason, u64)>, records: &Counters) -> Vec<(Reason, u64)> {
    for (r, n) in &mut own {
        *n = n.wrapping_add(match r {
            Reason::Tx => records.tx(),
            Reason::Redirect => records.redirected,
            Reason::NatReply => records.nat_replies(),
            _ => 0,
        });
    }
    own
}

/// The loaded balancer: `lb_xdp` and `lb_hc_encap`, their maps (pinned), and their
/// attachments. Dropping it detaches both programs everywhere and removes the pins, unless
/// [`Balancer::keep_dataplane`] asked to leave `lb_xdp` and its maps in place.
pub struct Balancer {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    /// The pin directory's lock, held for the process's life.
    _lock: Option<OwnedFd>,
    /// The maps were a previous run's, adopted.
    adopted: bool,
    attached: Vec<String>,
    /// Pins of the XDP links (one per attached interface).
    link_pins: Vec<PathBuf>,
    hc_attached: Vec<String>,
    keep: bool,
    /// Bumps the next-hop generation on every route, neighbour, link or address change.
    _route_watch: Option<RouteWatch>,
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

/// The pin of `lb_xdp`'s link on `iface`.
fn link_pin(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{}{iface}", names::PIN_XDP_LINK_PREFIX))
}

impl Balancer {
    /// Loads `lb_xdp` and `lb_hc_encap` with maps of the given sizes and writes the global
    /// settings. Maps are pinned under `pin_dir` when given (tests and benchmarks may run
    /// unpinned); if the directory holds a previous run's maps, they are checked (layout,
    /// sizes) and adopted with everything in them, flows included ([`Self::adopted`]).
    /// Neither program is attached yet.
    pub fn load(sizes: Sizes, addrs: LbAddrs, pin_dir: Option<&Path>) -> Result<(Self, Maps)> {
        Self::load_from(OBJECT, sizes, addrs, pin_dir)
    }

    /// The eBPF object [`Self::load`] loads, for the benchmark to load a copy of it the way it
    /// loads another build (`--lb-obj`), and so pair Katran with a balancer loaded alike.
    #[doc(hidden)]
    pub fn object() -> &'static [u8] {
        OBJECT
    }

    /// [`Self::load`] from another build of the eBPF object with this build's map layouts
    /// (the benchmark's `--lb-obj`, which measures variants of `lb_xdp` in the same run).
    #[doc(hidden)]
    pub fn load_from(
        object: &[u8],
        sizes: Sizes,
        addrs: LbAddrs,
        pin_dir: Option<&Path>,
    ) -> Result<(Self, Maps)> {
        let (lock, adopted) = match pin_dir {
            Some(dir) => {
                prepare_pin_dir(dir)?;
                let lock = lock_pin_dir(dir)?;
                (Some(lock), check_pinned(dir, sizes)?)
            }
            None => (None, false),
        };
        let loaded = load_object_from(object, sizes, pin_dir).and_then(|mut ebpf| {
            xdp_program(&mut ebpf, names::PROG_XDP)?;
            xdp_program(&mut ebpf, names::PROG_CLOCK)?;
            let hc = hc_program(&mut ebpf)?;
            retry_eagain(|| hc.load()).map_err(|source| DataplaneError::Program {
                what: format!("loading {} (verifier)", names::PROG_HC_ENCAP),
                source,
            })?;
            Ok(ebpf)
        });
        let ebpf = match loaded {
            Ok(e) => e,
            Err(e) => {
                // Leave nothing this attempt pinned behind (never an adopted run's pins).
                if let (Some(dir), false) = (pin_dir, adopted) {
                    remove_pins(dir);
                }
                return Err(e);
            }
        };
        let mut this = Self {
            ebpf,
            pin_dir: pin_dir.map(Path::to_path_buf),
            _lock: lock,
            adopted,
            attached: Vec::new(),
            link_pins: Vec::new(),
            hc_attached: Vec::new(),
            keep: false,
            _route_watch: None,
        };
        let mut maps = Maps::take(&mut this.ebpf)?;
        // Measured at every start (an adopted program goes on reading the old values, which
        // differ by the measurement's jitter at most, until the new one replaces it).
        let flow_clock = clock::flow_clock(&this.ebpf)?;
        maps.update_lb_config(|cfg| {
            if !adopted {
                *cfg = LbConfig {
                    magic: LB_CONFIG_MAGIC,
                    layout: LB_LAYOUT_VERSION,
                    ring_size: sizes.ring_size,
                    ..LbConfig::default()
                };
            }
            addrs.write_to(cfg);
            cfg.tick_ns = flow_clock.tick_ns;
            cfg.clock_offset_ns = flow_clock.offset_ns;
        })?;
        // The watch subscribes before the generation moves on, so no change falls between
        // them; entries an adopted program cached before this run are invalid from here on.
        let watch = RouteWatch::start(&maps.config);
        maps.bump_nexthop_generation()?;
        match watch {
            Ok(w) => {
                this._route_watch = Some(w);
                maps.set_nexthop_max_age(DEFAULT_NEXTHOP_MAX_AGE)?;
            }
            Err(e) => {
                // Without the watch a cached next hop could outlive a route change: no cache.
                tracing::warn!(error = %e, "cannot watch route changes (netlink); lb_xdp looks up every packet's next hop");
                maps.set_nexthop_max_age(std::time::Duration::ZERO)?;
            }
        }
        Ok((this, maps))
    }

    /// Sets how long `lb_xdp` may use a cached next hop (`--nexthop-max-age`; zero: no
    /// cache). Without a route watch (netlink refused) the cache stays off whatever is asked.
    pub fn set_nexthop_max_age(&self, maps: &mut Maps, age: std::time::Duration) -> Result<()> {
        let age = if self._route_watch.is_some() {
            age
        } else {
            std::time::Duration::ZERO
        };
        maps.set_nexthop_max_age(age)
    }

    /// Whether [`Self::load`] adopted a previous run's maps.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Whether to leave `lb_xdp` attached and its maps pinned when this balancer drops, so the
    /// flows go on (with the ring as it is) until the next `lb run` with the same pin directory
    /// adopts them; otherwise dropping removes everything. Only with a pin directory;
    /// `lb_hc_encap` is detached either way.
    pub fn keep_dataplane(&mut self, keep: bool) {
        self.keep = keep && self.pin_dir.is_some();
    }

    /// Attaches `lb_xdp` to `iface`. With a pin directory the link is pinned, so the program
    /// stays attached if the process dies; a link a previous run pinned for `iface` gets this
    /// program swapped in atomically instead (it keeps its attach mode).
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        let Some(dir) = self.pin_dir.clone() else {
            attach_named(&mut self.ebpf, names::PROG_XDP, iface, mode)?;
            self.attached.push(iface.to_string());
            return Ok(());
        };
        let pin = link_pin(&dir, iface);
        let prog = loaded_xdp_mut(&mut self.ebpf, names::PROG_XDP)?;
        let mut replaced = false;
        if pin.exists() {
            let swapped = PinnedLink::from_pin(&pin)
                .map_err(|e| e.to_string())
                .and_then(|p| XdpLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
                .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
            match swapped {
                Ok(_) => {
                    tracing::info!(%iface, "lb_xdp swapped into the link a previous run left attached");
                    replaced = true;
                }
                Err(e) => {
                    // E.g. the interface was deleted and made again: the old link is defunct.
                    tracing::warn!(%iface, error = %e, "the pinned XDP link cannot be reused; attaching afresh");
                    let _ = fs::remove_file(&pin);
                }
            }
        }
        if !replaced {
            let id = attach(prog, names::PROG_XDP, iface, mode)?;
            let link = prog
                .take_link(id)
                .map_err(|source| DataplaneError::Program {
                    what: format!("taking the link of {} on {iface}", names::PROG_XDP),
                    source,
                })?;
            let fd: FdLink = link.try_into().map_err(|e| DataplaneError::PinPath {
                path: pin.clone(),
                problem: format!(
                    "lb_xdp on {iface} was attached without a BPF link ({e}); a kernel with \
                     XDP links (5.9+) is needed to pin it"
                ),
            })?;
            // Held by the pin from here on; our descriptor closes at the end of the scope.
            fd.pin(&pin).map_err(|source| DataplaneError::Pin {
                name: names::PROG_XDP,
                path: pin.clone(),
                source,
            })?;
        }
        self.link_pins.push(pin);
        self.attached.push(iface.to_string());
        Ok(())
    }

    /// Detaches `lb_xdp` from interfaces a previous run attached it to and this one does not
    /// (their pinned links are removed). Returns them.
    pub fn detach_others(&mut self) -> Vec<String> {
        let Some(dir) = &self.pin_dir else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix(names::PIN_XDP_LINK_PREFIX)
                && !self.attached.iter().any(|a| a == iface)
                && fs::remove_file(entry.path()).is_ok()
            {
                gone.push(iface.to_owned());
            }
        }
        gone
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

/// A program of `ebpf` that [`xdp_program`] loaded, to attach.
fn loaded_xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
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

/// Attaches the loaded program `name` of `ebpf` to `iface` (an unpinned link, detached when
/// `ebpf` drops).
fn attach_named(ebpf: &mut Ebpf, name: &str, iface: &str, mode: XdpMode) -> Result<()> {
    let prog = loaded_xdp_mut(ebpf, name)?;
    attach(prog, name, iface, mode).map(|_| ())
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

/// Removes every pin of an `lb run` from `dir` (maps and XDP links: a link whose pin is gone
/// detaches once no process holds it), then the directory if empty.
fn remove_pins(dir: &Path) {
    for name in PINNED {
        let _ = fs::remove_file(dir.join(name));
    }
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(names::PIN_XDP_LINK_PREFIX)
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if self.keep {
            // The pins hold the links and maps; our descriptors close with `ebpf`.
            return;
        }
        // Unpinned links detach when `ebpf` drops; pinned ones once their pins are gone.
        if let Some(dir) = &self.pin_dir {
            remove_pins(dir);
        }
    }
}

/// The backend-side decapsulator, attached to one or more interfaces.
pub struct Decap {
    ebpf: Ebpf,
    attached: Vec<String>,
}

impl Decap {
    /// Loads `lb_decap`, accepting IP-in-IP (either family, either way round) whose outer
    /// destination is in `addrs`.
    pub fn load(addrs: &[IpAddr]) -> Result<Self> {
        let mut ebpf = load_object(Sizes::MINIMAL, None)?;
        xdp_program(&mut ebpf, names::PROG_DECAP)?;
        {
            let mut map: HashMap<_, AddrKey, u8> = ebpf
                .map_mut(names::MAP_DECAP_ADDRS)
                .ok_or_else(|| DataplaneError::Map {
                    what: format!("finding {}", names::MAP_DECAP_ADDRS),
                    source: aya::maps::MapError::InvalidName {
                        name: names::MAP_DECAP_ADDRS.into(),
                    },
                })?
                .try_into()
                .map_err(map_err("LB_DECAP_ADDRS has an unexpected type"))?;
            for a in addrs {
                let (family, addr) = lb_common::addr_to_map(*a);
                let key = AddrKey {
                    addr,
                    family,
                    _pad: [0; 3],
                };
                map.insert(key, 1, 0)
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
        let mut ebpf = load_object(Sizes::MINIMAL, None)?;
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

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

    /// Whether SIGCHLD is in the calling thread's signal mask.
    fn sigchld_blocked() -> bool {
        // SAFETY: reads this thread's mask into a local set (a null `set` changes nothing).
        unsafe {
            let mut current: libc::sigset_t = std::mem::zeroed();
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut current),
                0
            );
            libc::sigismember(&current, libc::SIGCHLD) == 1
        }
    }

    #[test]
    fn sigchld_is_blocked_only_while_a_program_loads_also_when_the_load_panics() {
        // A fresh thread: the test harness's own mask is not ours to assume.
        std::thread::spawn(|| {
            assert!(
                !sigchld_blocked(),
                "positive control: unblocked to begin with"
            );
            let mut seen_during = None;
            super::retry_eagain(|| {
                seen_during = Some(sigchld_blocked());
                Ok(())
            })
            .expect("the closure succeeds");
            assert_eq!(seen_during, Some(true), "blocked while loading");
            assert!(!sigchld_blocked(), "the previous mask is back");
            let panicked = std::panic::catch_unwind(|| {
                let _ = super::retry_eagain(|| panic!("a load that panics"));
            });
            assert!(panicked.is_err());
            assert!(
                !sigchld_blocked(),
                "the previous mask is back after a panic"
            );
        })
        .join()
        .expect("the checks pass");
    }

    /// Out-of-line memory builtins from `compiler_builtins`. The object always contains them;
    /// a program that calls one runs a byte-by-byte loop as a BPF subprogram. LLVM emits such
    /// calls silently for large zeroing or copies: `core::mem::zeroed()` of the 64-byte
    /// `bpf_fib_lookup` block once cost every packet ~320 instructions this way (see
    /// `FibBlock::zeroed_params` in lb-ebpf/src/encap.rs).
    const BUILTINS: [&str; 5] = ["memset", "memcpy", "memmove", "memcmp", "bcmp"];

    /// Every (function, symbol) a relocation of the built eBPF object refers to from inside
    /// that function: calls to functions in other sections, and map references.
    fn relocation_targets() -> Vec<(String, String)> {
        let file = object::File::parse(super::OBJECT).expect("parsing the built eBPF object");
        let mut out = Vec::new();
        for section in file.sections() {
            // The functions of this section, by address, to name where a relocation is.
            let mut funcs: Vec<(u64, &str)> = file
                .symbols()
                .filter(|s| {
                    s.section_index() == Some(section.index())
                        && s.kind() == object::SymbolKind::Text
                })
                .map(|s| (s.address(), s.name().unwrap_or("?")))
                .collect();
            funcs.sort();
            for (offset, reloc) in section.relocations() {
                if let RelocationTarget::Symbol(idx) = reloc.target()
                    && let Ok(sym) = file.symbol_by_index(idx)
                {
                    let from = funcs
                        .iter()
                        .rev()
                        .find(|(addr, _)| *addr <= offset)
                        .map_or(section.name().unwrap_or("?"), |(_, name)| name);
                    out.push((from.to_string(), sym.name().unwrap_or("?").to_string()));
                }
            }
        }
        out
    }

    #[test]
    fn no_bpf_program_calls_an_out_of_line_memory_builtin() {
        let targets = relocation_targets();
        // Positive control: relocations are read and resolved to names (every program
        // reads the configuration map).
        assert!(
            targets
                .iter()
                .any(|(_, sym)| sym == lb_common::names::MAP_CONFIG),
            "no relocation names {}: {targets:?}",
            lb_common::names::MAP_CONFIG
        );
        let calls: Vec<&(String, String)> = targets
            .iter()
            .filter(|(_, sym)| BUILTINS.contains(&sym.as_str()))
            .collect();
        assert!(
            calls.is_empty(),
            "the eBPF object calls {calls:?} (caller, callee): a per-packet byte loop in \
             BPF; zero or copy with aligned word stores instead (see FibBlock::zeroed_params)"
        );
    }
}
