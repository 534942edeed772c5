//! Command-line interface of the `lb` binary (clap derive). Parsing only: turning flags into a
//! validated model is `config`'s job, so that every problem can be reported with its flag.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default bpffs directory for pinned maps.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";
/// Default path of the admin socket of a running `lb run`.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/lb/admin.sock";

/// lb: an ELB-style load balancer (L4 in XDP, L7 in userspace).
#[derive(Debug, Parser)]
#[command(name = "lb", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// How `lb` logs to stderr: `text` (colours only on a terminal) or `json` (one object per
    /// line, for log shippers).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The format of `lb`'s own log (stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The filter of `lb`'s own log when `LB_LOG` is not set: `info`, but rustls only from
/// `error`. rustls warns about what a client sent (an IP address as SNI, as wrk sends when
/// given `https://127.0.0.1/`; alerts; malformed messages) once per connection, so any client could make `lb` format and write a line per
/// connection. Client TLS failures are counted (`ClientTLSNegotiationErrorCount`) and logged
/// at `debug` by the listener instead; `LB_LOG=info,rustls=warn` brings rustls's warnings back.
pub const DEFAULT_LOG_FILTER: &str = "info,rustls=error";

/// The subcommands.
#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure the match"
)]
pub enum Command {
    /// Run the load balancer: attach lb_xdp for L4 VIPs, serve L7 listeners, until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Run the backend-side decapsulator (lb_decap) on interfaces until SIGINT/SIGTERM.
    Decap(DecapArgs),
    /// Metrics of a running `lb run`: L4 from its pinned maps, L7 and health through its admin
    /// API; totals, the last 1 and 5 minutes, rates.
    Stats(StatsArgs),
    /// Print the contents of a pinned map of a running `lb run`.
    Dump(DumpArgs),
    /// Register, deregister and describe the targets of a running `lb run` (admin API).
    Targets(TargetsArgs),
    /// Describe, create, modify and delete target groups of a running `lb run` (admin API).
    Groups(GroupsArgs),
    /// Describe the listeners of a running `lb run` (admin API).
    Listeners(ListenersArgs),
    /// Describe, create, modify, delete and reorder listener rules of a running `lb run`.
    Rules(RulesArgs),
    /// Describe and change the guards (source lists, new-flow rate) of the L4 VIPs of a
    /// running `lb run` (admin API).
    Vips(VipsArgs),
}

/// XDP attach mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum XdpMode {
    /// Driver (native) mode; fails if the driver lacks XDP support.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Skb,
    /// Native, falling back to skb with a warning.
    #[default]
    Auto,
}

/// Flags of `lb run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Interface that receives VIP traffic; lb_xdp is attached to each (repeatable).
    #[arg(long = "iface", value_name = "IFACE")]
    pub ifaces: Vec<String>,

    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    pub xdp_mode: XdpMode,

    /// Source address of the outer header of encapsulated packets, one per family: IPv4 for
    /// IPv4 backends, IPv6 for IPv6 backends (repeatable; default: the first IPv4 and the first
    /// global IPv6 address of the first --iface).
    #[arg(long = "lb-addr", value_name = "ADDR")]
    pub lb_addrs: Vec<std::net::IpAddr>,

    /// An L4 virtual IP: `[NAME=]ADDR:PORT/PROTO[,forward=GROUP][,idle-timeout=SECS]
    /// [,mode=dsr|nat][,allow=CIDR|…][,deny=CIDR|…][,new-flow-rate=N|off][,new-flow-burst=M]`,
    /// PROTO `tcp` or `udp`; PORT 0 = every port; IPv6 in brackets (repeatable). `mode=nat`
    /// rewrites packets to the target (which may listen on another port) and needs the
    /// balancer as the targets' gateway; the guards drop refused sources in XDP.
    /// Example: `--vip web=10.100.0.1:80/tcp`, `--vip web6=[2001:db8::1]:443/tcp,mode=nat`.
    #[arg(long = "vip", value_name = "SPEC")]
    pub vips: Vec<String>,

    /// A target: `OWNER=ADDR[:PORT][,weight=W]` where OWNER is a VIP (its NAME or its
    /// `ADDR:PORT/PROTO`) or an L7 target group name (repeatable).
    /// Example: `--target web=10.0.0.11,weight=2`.
    #[arg(long = "target", value_name = "SPEC")]
    pub targets: Vec<String>,

    /// An L7 listener: `NAME=PROTO://ADDR:PORT[,OPTION=VALUE…]` (repeatable; see README).
    #[arg(long = "listener", value_name = "SPEC")]
    pub listeners: Vec<String>,

    /// An L7 target group: `NAME[,OPTION=VALUE…]` (repeatable; see README).
    #[arg(long = "target-group", value_name = "SPEC")]
    pub target_groups: Vec<String>,

    /// An L7 listener rule: `LISTENER,priority=N,CONDITION…,ACTION` (repeatable; see README).
    #[arg(long = "rule", value_name = "SPEC")]
    pub rules: Vec<String>,

    /// Flow-table capacity (LRU: the least recently seen flow is evicted when full), rounded
    /// up to a multiple of the possible CPUs: each CPU's inserts evict only from its own equal
    /// share.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_FLOWS)]
    pub max_flows: u32,

    /// Maglev table size per VIP; must be prime.
    #[arg(long, default_value_t = lb_common::DEFAULT_RING_SIZE)]
    pub ring_size: u32,

    /// Most L4 VIPs the maps are sized for.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_VIPS)]
    pub max_vips: u32,

    /// Most L4 backends (over all VIPs) the maps are sized for.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    pub max_backends: u32,

    /// bpffs directory where the maps are pinned (mounted if it is under an unmounted
    /// /sys/fs/bpf).
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,

    /// On SIGINT/SIGTERM, how long in-flight L7 requests may take to finish (seconds).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub drain_timeout: u64,

    /// Which threads serve L7 client connections: `shared` (one multi-thread runtime for
    /// everything) or `per-worker` (one thread per worker, each with its own runtime,
    /// listening sockets and target connection pools). See README "Worker layout".
    #[arg(long, value_enum, value_name = "LAYOUT", default_value_t = L7RuntimeArg::Shared)]
    pub l7_runtime: L7RuntimeArg,

    /// L7 workers with `--l7-runtime per-worker`: `auto` (one per CPU this process may run on)
    /// or a number (1–1024).
    #[arg(long, value_name = "N|auto", default_value = "auto", value_parser = parse_l7_workers)]
    pub l7_workers: L7Workers,

    /// How the per-worker listening sockets share a listener's port: `reuseport` (one socket
    /// per worker with SO_REUSEPORT; the kernel spreads connections by address hash),
    /// `shared-socket` (one socket, duplicated into every worker) or `balanced` (reuseport
    /// sockets; the accepting worker hands each connection to the least loaded worker).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = L7AcceptArg::Reuseport)]
    pub l7_accept: L7AcceptArg,

    /// Binds each per-worker runtime's thread to one CPU (HAProxy's `cpu-map`, nginx's
    /// `worker_cpu_affinity`): `none` (the scheduler places them), `auto` (worker i on the
    /// i-th CPU this process may run on, wrapping round) or a CPU list such as `0-3,8` (the same
    /// over the CPUs listed). Only with `--l7-runtime per-worker`. See README "Worker layout".
    #[arg(long, value_name = "none|auto|CPUS", default_value = "none",
          value_parser = crate::proxy::server::affinity::CpuAffinity::parse)]
    pub l7_cpu_affinity: crate::proxy::server::affinity::CpuAffinity,

    /// Unix socket of the admin API (`lb targets …`, `lb rules …`); created mode 0600.
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,

    /// Also serve the admin API on this loopback TCP address (requests need the bearer token
    /// of --admin-token-file).
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_listen: Option<std::net::SocketAddr>,

    /// File holding the bearer token of the TCP admin listener (one word, ≥ 16 characters).
    #[arg(long, value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,

    /// Write one ALB-format access-log line per L7 request to PATH (`-`: stdout). Lines
    /// are written by a background thread; when it falls behind they are dropped and
    /// counted, never waited for. SIGHUP reopens the file (after logrotate moved it).
    #[arg(long, value_name = "PATH")]
    pub access_log: Option<PathBuf>,

    /// Rotate the access log before it grows past SIZE bytes (suffixes K, M, G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub access_log_max_size: Option<u64>,

    /// Rotate the access log every SECS seconds.
    #[arg(long, value_name = "SECS")]
    pub access_log_rotate_interval: Option<u64>,

    /// Rotated access-log (and health-check-log) files kept; older ones are deleted.
    #[arg(long, value_name = "N", default_value_t = crate::accesslog::Rotation::DEFAULT_KEEP)]
    pub access_log_keep: usize,

    /// Write one line per health-check probe to PATH (`-`: stdout), rotated like the
    /// access log.
    #[arg(long, value_name = "PATH")]
    pub health_check_log: Option<PathBuf>,

    /// The load balancer's name, in the logs' `elb` field (`app/NAME/ID`).
    #[arg(long, value_name = "NAME", default_value = "lb")]
    pub lb_name: String,

    /// How often the flow table is swept (expired entries deleted, its size and the live flows
    /// the LRU evicted counted for `lb stats`), in seconds; each sweep walks the whole table.
    /// Default: half the shortest VIP idle timeout, between 1 and 30 s.
    #[arg(long, value_name = "SECS")]
    pub flow_sweep_interval: Option<f64>,

    /// How long lb_xdp may use a backend's cached next hop (egress interface and MACs) before
    /// it resolves it again, in seconds; 0 turns the cache off (every packet is looked up).
    /// Route, neighbour, link and address changes invalidate the cache at once while `lb run`
    /// runs; this age bounds how stale it gets when nobody watches (see README).
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub nexthop_max_age: f64,

    /// On SIGINT/SIGTERM, leave lb_xdp attached and its maps pinned: L4 flows keep flowing
    /// (with the targets as they are, no health checks) until the next `lb run` with the same
    /// --pin-path adopts them. Without it a clean shutdown removes everything.
    #[arg(long)]
    pub keep_dataplane: bool,

    /// Validate the flags, print the resulting configuration and exit.
    #[arg(long)]
    pub check: bool,
}

/// `--l7-runtime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum L7RuntimeArg {
    /// One runtime per worker thread.
    PerWorker,
    /// One multi-thread runtime.
    Shared,
}

/// `--l7-accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum L7AcceptArg {
    /// One socket per worker, SO_REUSEPORT.
    Reuseport,
    /// One socket, duplicated.
    SharedSocket,
    /// SO_REUSEPORT sockets; each connection served by the least loaded worker.
    Balanced,
}

/// `--l7-workers`: a count, or `None` for `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L7Workers(pub Option<std::num::NonZeroUsize>);

/// Most L7 workers `--l7-workers` accepts.
pub const MAX_L7_WORKERS: usize = 1024;

fn parse_l7_workers(s: &str) -> Result<L7Workers, String> {
    if s == "auto" {
        return Ok(L7Workers(None));
    }
    s.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_L7_WORKERS).contains(n))
        .and_then(std::num::NonZeroUsize::new)
        .map(|n| L7Workers(Some(n)))
        .ok_or_else(|| format!("{s:?}: expected auto or a whole number from 1 to {MAX_L7_WORKERS}"))
}

impl RunArgs {
    /// The L7 worker layout the flags ask for.
    pub fn l7_layout(&self) -> crate::proxy::server::WorkerLayout {
        use crate::proxy::server::{AcceptMode, L7Runtime, WorkerLayout};
        WorkerLayout {
            runtime: match self.l7_runtime {
                L7RuntimeArg::PerWorker => L7Runtime::PerWorker,
                L7RuntimeArg::Shared => L7Runtime::Shared,
            },
            workers: self.l7_workers.0,
            accept: match self.l7_accept {
                L7AcceptArg::Reuseport => AcceptMode::ReusePort,
                L7AcceptArg::SharedSocket => AcceptMode::SharedSocket,
                L7AcceptArg::Balanced => AcceptMode::Balanced,
            },
            affinity: self.l7_cpu_affinity,
        }
    }
}

/// `100`, `64K`, `100M`, `1G` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 100M)"))?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (K, M or G)")),
    };
    n.checked_mul(mult)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a size above 0"))
}

/// Flags of `lb stats`.
#[derive(Debug, Args, Clone)]
pub struct StatsArgs {
    /// bpffs directory of the running `lb run` (its L4 maps).
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,

    /// Admin socket of the running `lb run` (L7 and health metrics, and the history behind
    /// the 1- and 5-minute columns).
    #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,

    /// Use the TCP admin listener at this address instead of the socket.
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_url: Option<std::net::SocketAddr>,

    /// Bearer token for --admin-url (or set LB_ADMIN_TOKEN).
    #[arg(long, env = "LB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Print JSON instead of tables (with --watch: one document per line).
    #[arg(long)]
    pub json: bool,

    /// Refresh every SECS seconds (default 2) until interrupted.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<f64>,
}

/// Flags of `lb decap`.
#[derive(Debug, Args, Clone)]
pub struct DecapArgs {
    /// Interface that receives encapsulated packets (repeatable).
    #[arg(long = "iface", value_name = "IFACE", required = true)]
    pub ifaces: Vec<String>,

    /// Outer destination addresses to decapsulate, IPv4 or IPv6 (default: every IPv4 and
    /// every global IPv6 address of the interfaces).
    #[arg(long = "addr", value_name = "ADDR")]
    pub addrs: Vec<std::net::IpAddr>,

    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    pub xdp_mode: XdpMode,
}

/// Where the pinned maps are.
#[derive(Debug, Args, Clone)]
pub struct PinArgs {
    /// bpffs directory of the running `lb run`.
    #[arg(long, global = true, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,

    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Flags of `lb dump`.
#[derive(Debug, Args, Clone)]
pub struct DumpArgs {
    /// Which map.
    #[command(subcommand)]
    pub what: DumpWhat,

    #[command(flatten)]
    pub pin: PinArgs,
}

/// What `lb dump` prints.
#[derive(Debug, Subcommand, Clone)]
pub enum DumpWhat {
    /// The VIP table.
    Vips,
    /// The backend table.
    Backends,
    /// The flow table (5-tuple → backend).
    Flows,
    /// The next hop lb_xdp cached per backend and CPU (egress interface, MACs, age).
    Nexthops,
    /// The sources the new-flow rate limit dropped most (busiest first), per VIP.
    Limited {
        /// How many sources to show.
        #[arg(long, default_value_t = 20)]
        top: usize,
    },
    /// The Maglev ring of one VIP, as slot counts per backend (`--slots` for every slot).
    Ring {
        /// The VIP: `ADDR:PORT/PROTO`.
        vip: String,
        /// Print every slot, not just the share per backend.
        #[arg(long)]
        slots: bool,
    },
}

/// How to reach the admin API of a running `lb run`.
#[derive(Debug, Args, Clone)]
pub struct AdminArgs {
    /// Admin socket of the running `lb run`.
    #[arg(long, global = true, default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,

    /// Use the TCP admin listener at this address instead of the socket.
    #[arg(long, global = true, value_name = "ADDR:PORT")]
    pub admin_url: Option<std::net::SocketAddr>,

    /// Bearer token for --admin-url (or set LB_ADMIN_TOKEN).
    #[arg(long, global = true, env = "LB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Flags of `lb targets`.
#[derive(Debug, Args, Clone)]
pub struct TargetsArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: TargetsAction,

    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Target changes (AWS register-targets / deregister-targets / describe-target-health).
#[derive(Debug, Subcommand, Clone)]
pub enum TargetsAction {
    /// Add targets (same syntax as `lb run --target`); a registered target takes the new
    /// weight.
    Register {
        /// `OWNER=ADDR[:PORT][,weight=W]` (repeatable).
        #[arg(long = "target", value_name = "SPEC", required = true)]
        targets: Vec<String>,
    },
    /// Remove targets: they drain for the group's deregistration delay, then leave.
    Deregister {
        /// `OWNER=ADDR[:PORT]` (repeatable).
        #[arg(long = "target", value_name = "SPEC", required = true)]
        targets: Vec<String>,
    },
    /// Take targets out of service by hand (no new traffic; open connections continue).
    Disable {
        /// `OWNER=ADDR[:PORT]` (repeatable).
        #[arg(long = "target", value_name = "SPEC", required = true)]
        targets: Vec<String>,
    },
    /// Put targets taken out by `disable` back in service.
    Enable {
        /// `OWNER=ADDR[:PORT]` (repeatable).
        #[arg(long = "target", value_name = "SPEC", required = true)]
        targets: Vec<String>,
    },
    /// Target, port, state, reason and description (AWS describe-target-health).
    #[command(alias = "describe")]
    Health {
        /// Only this target group or VIP (default: all).
        #[arg(long = "group", value_name = "GROUP|VIP")]
        group: Option<String>,
    },
}

/// Flags of `lb groups`.
#[derive(Debug, Args, Clone)]
pub struct GroupsArgs {
    /// What to do (default: list).
    #[command(subcommand)]
    pub action: Option<GroupsAction>,

    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Target group verbs (AWS describe-target-groups, create-target-group, modify-target-group,
/// delete-target-group).
#[derive(Debug, Subcommand, Clone)]
pub enum GroupsAction {
    /// Every group with its settings (AWS describe-target-groups).
    #[command(alias = "list")]
    Describe,
    /// A new, empty group: same syntax as `lb run --target-group`.
    Create {
        /// `NAME[,OPTION=VALUE…]`.
        spec: String,
    },
    /// Change health checks and attributes: `OPTION=VALUE[,OPTION=VALUE…]` with the options
    /// of `--target-group` (health-check-*, deregistration-delay, slow-start, …).
    Modify {
        /// The group.
        name: String,
        /// `OPTION=VALUE[,…]`.
        options: String,
    },
    /// Remove a group no rule or VIP uses.
    Delete {
        /// The group.
        name: String,
    },
}

/// Flags of `lb vips`.
#[derive(Debug, Args, Clone)]
pub struct VipsArgs {
    /// What to do (default: describe every VIP's guards).
    #[command(subcommand)]
    pub action: Option<VipsAction>,

    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `lb vips` verbs.
#[derive(Debug, Subcommand, Clone)]
pub enum VipsAction {
    /// The mode and guards of one VIP, or of every VIP.
    Guards {
        /// The VIP: its name or `ADDR:PORT/PROTO`.
        vip: Option<String>,
    },
    /// Change a VIP's guards at run time: `allow=CIDR|…`, `deny=CIDR|…` (empty: no list),
    /// `new-flow-rate=N|off`, `new-flow-burst=M`; options not given stay as they are.
    /// Example: `lb vips set-guards web deny=192.0.2.0/24,new-flow-rate=50`.
    SetGuards {
        /// The VIP: its name or `ADDR:PORT/PROTO`.
        vip: String,
        /// `OPTION=VALUE[,…]`.
        options: String,
    },
}

/// Flags of `lb listeners`.
#[derive(Debug, Args, Clone)]
pub struct ListenersArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Flags of `lb rules`.
#[derive(Debug, Args, Clone)]
pub struct RulesArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: RulesAction,

    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Listener rule verbs (AWS describe-rules, create-rule, modify-rule, delete-rule,
/// set-rule-priorities). A rule's body is the `--rule` syntax after the listener name and
/// priority: conditions and action, e.g. `path=/api/*,forward=api`.
#[derive(Debug, Subcommand, Clone)]
pub enum RulesAction {
    /// The rules of a listener, by priority, then its default rule.
    #[command(alias = "list")]
    Describe {
        /// The listener.
        #[arg(long)]
        listener: String,
    },
    /// Add a rule.
    Create {
        /// The listener.
        #[arg(long)]
        listener: String,
        /// Its priority (1–50000, free on this listener).
        #[arg(long)]
        priority: u32,
        /// Conditions and action, e.g. `path=/api/*,forward=api`.
        rule: String,
    },
    /// Replace a rule's conditions and action (priority `default` or 0: the default rule).
    Modify {
        /// The listener.
        #[arg(long)]
        listener: String,
        /// The rule's priority, or `default`.
        #[arg(long)]
        priority: String,
        /// Conditions and action.
        rule: String,
    },
    /// Remove a rule.
    Delete {
        /// The listener.
        #[arg(long)]
        listener: String,
        /// The rule's priority.
        #[arg(long)]
        priority: u32,
    },
    /// Move rules to new priorities in one step: `FROM:TO` pairs (`10:20 20:10` swaps).
    SetPriorities {
        /// The listener.
        #[arg(long)]
        listener: String,
        /// `FROM:TO` (repeatable).
        #[arg(required = true, value_name = "FROM:TO")]
        moves: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::DEFAULT_LOG_FILTER;

    /// A `MakeWriter` that appends every line to one shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn default_log_filter_drops_rustls_per_connection_warnings_but_keeps_lb_info_and_rustls_errors()
    {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER))
            .with_writer(out.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // What rustls logs (through the `log` bridge, under its module path) when a
            // client sends an IP address as SNI.
            tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI extension");
            tracing::error!(target: "rustls::conn", "rustls-error-line");
            tracing::info!(target: "lb::proxy::server", "listening-line");
            tracing::warn!(target: "lb::proxy::server", "lb-warning-line");
        });
        let text = String::from_utf8(out.0.lock().expect("buffer").clone()).expect("utf-8");
        // Positive controls: the same subscriber writes lb's info and warnings and rustls's
        // errors.
        assert!(text.contains("listening-line"), "{text}");
        assert!(text.contains("lb-warning-line"), "{text}");
        assert!(text.contains("rustls-error-line"), "{text}");
        assert!(!text.contains("Illegal SNI"), "{text}");
    }
}
