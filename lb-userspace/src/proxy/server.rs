//! Listeners and the request pipeline of the L7 tier (ALB semantics; see ALB-REFERENCE.md).
//!
//! A listener accepts TCP (and TLS with SNI certificate selection and ALPN `h2`/`http/1.1` for
//! HTTPS), serves HTTP/1.1 in the connection's own task (`server/h1.rs`; hyper with
//! `http1=hyper`, and for upgrades) and HTTP/2 on the `h2` crate with lb's own glue
//! (`server/h2native.rs`; hyper's HTTP/2 server with `http2=hyper`), its streams polled in the
//! connection's task (`server/h2exec.rs`), and runs every request
//! through the pipeline (`server/pipeline.rs`): desync classification, the checks ALB makes
//! before routing (405, 501, 505), rule evaluation and the action (forward, redirect, fixed
//! response). HTTP/1 bytes pass through the sniffer (`server/sniff.rs`) first, which enforces
//! the header limits and the idle timeout the way ALB does and hyper cannot.
//!
//! Decisions where ALB documents nothing precise:
//! - 464: an HTTP/2 target group (`protocol-version=http2`) only takes HTTP/2 requests; an
//!   HTTP/1 target group refuses gRPC (`content-type: application/grpc…`). Checked before a
//!   target is picked, so a refused request never counts as outstanding on a target.
//! - The connection is closed after 400, 408, 501 and 505 (the request's framing cannot be
//!   trusted, or the client is too slow) and after an ambiguous request in `defensive` mode
//!   (the request to the target then carries `Connection: close` too). 405, 463, 464 and the
//!   target-side 5xx keep the client connection.
//! - Idle timeout: between requests it runs only while no response is outstanding; inside a
//!   request body it always runs; HTTP/2 connections close when idle with no open stream.
//!   Upgraded (WebSocket) connections have no idle timeout; they end when either side closes or
//!   when the tier stops.
//! - An HTTP/1.1 request without exactly one `Host` is a 400 (RFC 9112 §3.2), in every
//!   desync mode: rules never route on a guessed host.
//! - Header limits: request line and each header line 16 KiB, all header lines together
//!   64 KiB (line ends included), at most 1,000 header lines (hyper needs a count bound; ALB
//!   has none). HTTP/2: `SETTINGS_MAX_HEADER_LIST_SIZE` 64 KiB.
//! - WebSocket over HTTP/2 (extended CONNECT, RFC 8441) is not offered.
//! - `header-timeout` (default 60 s, nginx's `client_header_timeout`) bounds how long an HTTP/1
//!   request head may take, against clients that dribble it (ALB documents no such limit).
//!   HTTP/2 heads are bounded by h2's CONTINUATION limits instead (see `http_builder`).
//! - `max-connections` / `max-connections-per-source` (default: none) close a connection over
//!   the limit at once, before TLS (`server/limits.rs`); HTTP/2 clients that keep cancelling
//!   their streams are sent away (`server/abuse.rs`).
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

pub use self::sniff::HEADER_TIMEOUT_REASON;
pub use self::tls::{CertificateSpec, TlsError};
pub use crate::proxy::desync::DesyncMode;

mod abuse;
pub mod affinity;
mod batch;
mod exchange;
mod h1;
mod h2exec;
mod h2native;
mod head;
mod lean;
mod limits;
mod pipeline;
mod service;
mod sniff;
mod spares;
pub mod tls;

use crate::accesslog::{LogWriter, Record, TlsInfo};
use crate::headers::XffMode;
use crate::metrics::{Counter, ListenerCells};
use crate::proxy::client::{ClientConfig, Forwarder, TargetPoolStats};
use crate::rules::{ResolvedRuleSet, RuleSet};
use crate::targets::TargetGroup;

/// Most listeners per load balancer (ALB quota).
pub const MAX_LISTENERS: usize = 50;
/// Most certificates per HTTPS listener: the default plus 25 selected by SNI (ALB quota).
pub const MAX_CERTIFICATES: usize = 26;
/// Idle timeout default (ALB attribute `idle_timeout.timeout_seconds`: 60 s).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle timeout range allowed by ALB (1–4000 s).
pub const IDLE_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=4000;
/// Request-head deadline default: the whole HTTP/1 request head must arrive within this long
/// (nginx `client_header_timeout`; ALB documents no separate limit and closes on its 60 s idle
/// timeout, which a client dribbling one header line at a time never reaches).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `header-timeout` accepted (as the idle timeout: 4000 s).
pub const MAX_HEADER_TIMEOUT: Duration = Duration::from_secs(4000);
/// Client keep-alive lifetime default (ALB attribute `client_keep_alive.seconds`: 3600 s).
pub const DEFAULT_CLIENT_KEEPALIVE: Duration = Duration::from_secs(3600);
/// Client keep-alive range allowed by ALB (60–604800 s).
pub const CLIENT_KEEPALIVE_RANGE: std::ops::RangeInclusive<u64> = 60..=604_800;

/// Listener protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// Plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge).
    Http,
    /// TLS-terminated HTTP/1.1 and HTTP/2.
    Https,
}

impl ListenerProtocol {
    /// `http` or `https`, as in `X-Forwarded-Proto` and redirect URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

impl fmt::Display for ListenerProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One listener: protocol, address and the ALB attributes that apply to its connections.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Name used in logs and errors.
    pub name: String,
    /// HTTP or HTTPS.
    pub protocol: ListenerProtocol,
    /// Address to bind.
    pub bind: SocketAddr,
    /// HTTPS: first is the default certificate, the rest are chosen by SNI (≤ 25).
    pub certificates: Vec<CertificateSpec>,
    /// No bytes from the client for this long → close (408 if no request arrived yet).
    /// Default [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// After this long the connection is closed after the current response (HTTP/1:
    /// `Connection: close`; HTTP/2: GOAWAY). Default [`DEFAULT_CLIENT_KEEPALIVE`].
    pub client_keepalive: Duration,
    /// An HTTP/1 request head (request line through the empty line) that is not complete this
    /// long after it started is answered 408 and the connection closed. It starts when the
    /// connection is accepted (TLS: when the handshake is done) for the first request and with
    /// the first byte of every later one; request bodies are not affected (the idle timeout
    /// watches them). Default [`DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// `X-Forwarded-For` handling (default append).
    pub xff: XffMode,
    /// Desync mitigation mode (default defensive).
    pub desync_mode: DesyncMode,
    /// Most client connections open at once on this listener; a connection accepted beyond it
    /// is closed at once and counted (RejectedConnectionCount). `None` (default): no limit.
    pub max_connections: Option<usize>,
    /// Most client connections open at once from one source address; `None` (default): no
    /// limit. Over it, the connection is closed at once and counted like `max_connections`.
    pub max_connections_per_source: Option<usize>,
    /// HTTP/1 served by the connection's own loop (`server/h1.rs`; default) or, `false`, by
    /// hyper as before (`http1=hyper`).
    pub http1_native: bool,
    /// HTTP/1.1 served by the lean per-worker event loop (`server/lean.rs`, `http1=lean`):
    /// requests it cannot serve, and the rest of their connection, go to the native path.
    /// Plain HTTP listeners of the per-worker runtime only.
    pub http1_lean: bool,
    /// HTTP/2 served by lb's own glue on the `h2` crate (`server/h2native.rs`; default) or,
    /// `false`, by hyper's HTTP/2 server as before (`http2=hyper`). Applies to ALPN `h2` and
    /// to prior knowledge handed over by the native HTTP/1 path; with `http1=hyper`, hyper's
    /// own protocol detection serves prior knowledge.
    pub http2_native: bool,
}

impl ListenerConfig {
    /// A listener with every attribute at its AWS default.
    pub fn new(name: impl Into<String>, protocol: ListenerProtocol, bind: SocketAddr) -> Self {
        Self {
            name: name.into(),
            protocol,
            bind,
            certificates: Vec::new(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            client_keepalive: DEFAULT_CLIENT_KEEPALIVE,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            xff: XffMode::default(),
            desync_mode: DesyncMode::default(),
            max_connections: None,
            max_connections_per_source: None,
            http1_native: true,
            http1_lean: false,
            http2_native: true,
        }
    }
}

/// A `--listener` value that does not parse; the message names the bad part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListenerError {
    /// No `NAME=` prefix.
    #[error(
        "listener {0:?}: expected NAME=http://ADDR:PORT or NAME=https://ADDR:PORT,cert=CERT:KEY"
    )]
    MissingName(String),
    /// Scheme other than http/https.
    #[error("listener {name}: unknown scheme in {value:?} (expected http:// or https://)")]
    BadScheme {
        /// Listener name.
        name: String,
        /// The address part.
        value: String,
    },
    /// Address does not parse.
    #[error("listener {name}: bad address {value:?} (expected ADDR:PORT, IPv6 as [ADDR]:PORT)")]
    BadAddress {
        /// Listener name.
        name: String,
        /// The address.
        value: String,
    },
    /// An option with a bad value.
    #[error("listener {name}: bad {option} value {value:?}: {reason}")]
    BadOption {
        /// Listener name.
        name: String,
        /// Option key.
        option: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// An option we do not know.
    #[error("listener {name}: unknown option {option:?}")]
    UnknownOption {
        /// Listener name.
        name: String,
        /// The option as written.
        option: String,
    },
    /// HTTPS without `cert=`.
    #[error("listener {0}: https needs at least one cert=CERT.pem:KEY.pem")]
    MissingCertificate(String),
    /// `cert=` on an HTTP listener.
    #[error("listener {0}: cert= only applies to https listeners")]
    CertificateOnHttp(String),
    /// More than [`MAX_CERTIFICATES`].
    #[error("listener {name}: {count} certificates (at most 1 default + 25 SNI)")]
    TooManyCertificates {
        /// Listener name.
        name: String,
        /// How many were given.
        count: usize,
    },
}

/// Parses a `--listener` value: `NAME=http://ADDR:PORT` or
/// `NAME=https://ADDR:PORT,cert=CERT.pem:KEY.pem[,cert=…]`, plus `,idle-timeout=SECS`,
/// `,keepalive=SECS`, `,header-timeout=SECS` (fractions allowed, e.g. `0.5`),
/// `,xff=append|preserve|remove`, `,desync=monitor|defensive|strictest`, `,max-connections=N`,
/// `,max-connections-per-source=N`, `,http1=native|hyper|lean`, `,http2=native|hyper`.
pub fn parse_listener(spec: &str) -> Result<ListenerConfig, ListenerError> {
    let Some((name, rest)) = spec.split_once('=').filter(|(n, _)| !n.is_empty()) else {
        return Err(ListenerError::MissingName(spec.to_owned()));
    };
    let name = name.to_owned();
    let mut parts = rest.split(',');
    let addr_part = parts.next().unwrap_or_default();
    let (protocol, addr) = if let Some(a) = addr_part.strip_prefix("http://") {
        (ListenerProtocol::Http, a)
    } else if let Some(a) = addr_part.strip_prefix("https://") {
        (ListenerProtocol::Https, a)
    } else {
        return Err(ListenerError::BadScheme {
            name,
            value: addr_part.to_owned(),
        });
    };
    let bind: SocketAddr = addr.parse().map_err(|_| ListenerError::BadAddress {
        name: name.clone(),
        value: addr.to_owned(),
    })?;
    let mut cfg = ListenerConfig::new(name.clone(), protocol, bind);
    let bad = |option: &str, value: &str, reason: String| ListenerError::BadOption {
        name: name.clone(),
        option: option.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let seconds = |option: &str, value: &str, range: std::ops::RangeInclusive<u64>| {
        let secs: u64 = value
            .parse()
            .map_err(|_| bad(option, value, "not a whole number of seconds".into()))?;
        if !range.contains(&secs) {
            return Err(bad(
                option,
                value,
                format!("must be {}..={} seconds", range.start(), range.end()),
            ));
        }
        Ok(Duration::from_secs(secs))
    };
    let fractional_seconds = |option: &str, value: &str, max: Duration| {
        let secs: f64 = value
            .parse()
            .map_err(|_| bad(option, value, "not a number of seconds".into()))?;
        match Duration::try_from_secs_f64(secs) {
            Ok(d) if !d.is_zero() && d <= max => Ok(d),
            _ => Err(bad(
                option,
                value,
                format!("must be more than 0 and at most {} seconds", max.as_secs()),
            )),
        }
    };
    let count = |option: &str, value: &str| {
        value
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                bad(
                    option,
                    value,
                    "expected a whole number of at least 1".into(),
                )
            })
    };
    for part in parts {
        let Some((key, value)) = part.split_once('=') else {
            return Err(ListenerError::UnknownOption {
                name,
                option: part.to_owned(),
            });
        };
        match key {
            "cert" => {
                if protocol != ListenerProtocol::Https {
                    return Err(ListenerError::CertificateOnHttp(name));
                }
                let Some((cert, key)) = value
                    .rsplit_once(':')
                    .filter(|(c, k)| !c.is_empty() && !k.is_empty())
                else {
                    return Err(bad(key, value, "expected CERT.pem:KEY.pem".into()));
                };
                cfg.certificates.push(CertificateSpec {
                    cert: PathBuf::from(cert),
                    key: PathBuf::from(key),
                });
            }
            "idle-timeout" => cfg.idle_timeout = seconds(key, value, IDLE_TIMEOUT_RANGE)?,
            "keepalive" => cfg.client_keepalive = seconds(key, value, CLIENT_KEEPALIVE_RANGE)?,
            "header-timeout" => {
                cfg.header_timeout = fractional_seconds(key, value, MAX_HEADER_TIMEOUT)?;
            }
            "max-connections" => cfg.max_connections = Some(count(key, value)?),
            "max-connections-per-source" => {
                cfg.max_connections_per_source = Some(count(key, value)?);
            }
            "xff" => {
                cfg.xff = value
                    .parse()
                    .map_err(|_| bad(key, value, "expected append, preserve or remove".into()))?;
            }
            "desync" => {
                cfg.desync_mode = value.parse().map_err(|e| bad(key, value, format!("{e}")))?;
            }
            "http1" | "http2" => {
                let native = match value {
                    "native" => true,
                    "hyper" => false,
                    "lean" if key == "http1" => {
                        if cfg.protocol != ListenerProtocol::Http {
                            return Err(bad(
                                key,
                                value,
                                "the lean HTTP/1.1 path serves plain http listeners only".into(),
                            ));
                        }
                        true
                    }
                    _ if key == "http1" => {
                        return Err(bad(key, value, "expected native, hyper or lean".into()));
                    }
                    _ => return Err(bad(key, value, "expected native or hyper".into())),
                };
                if key == "http1" {
                    cfg.http1_native = native;
                    cfg.http1_lean = value == "lean";
                } else {
                    cfg.http2_native = native;
                }
            }
            _ => {
                return Err(ListenerError::UnknownOption {
                    name,
                    option: key.to_owned(),
                });
            }
        }
    }
    if protocol == ListenerProtocol::Https && cfg.certificates.is_empty() {
        return Err(ListenerError::MissingCertificate(name));
    }
    if cfg.certificates.len() > MAX_CERTIFICATES {
        return Err(ListenerError::TooManyCertificates {
            name,
            count: cfg.certificates.len(),
        });
    }
    Ok(cfg)
}

/// Target groups by name (the names forward actions use). Looked up once per forwarded
/// request: foldhash, not the default SipHash (232 instructions per lookup under callgrind,
/// 108 with foldhash), as the names are our own configuration's (a group-stickiness cookie only selects among
/// them), never chosen by a client.
pub type Groups = HashMap<String, Arc<TargetGroup>, foldhash::fast::RandomState>;

/// The access log the L7 tier writes one record per request to.
pub type AccessLog = LogWriter<Box<Record>>;

/// Which runtime serves the L7 tier's client connections (`lb run --l7-runtime`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L7Runtime {
    /// One tokio multi-thread runtime for everything (the caller's): one accept loop per
    /// listener, connection tasks stolen between its worker threads, one connection pool per
    /// target.
    Shared,
    /// One OS thread per worker, each running its own tokio `current_thread` runtime: every
    /// worker accepts on its own listening socket per listener and serves the connections it
    /// accepted to the end, with its own shard of every target's connection pool (nginx's
    /// `worker_processes` + `reuseport`, HAProxy's `nbthread`, in one process).
    PerWorker,
}

/// How per-worker listening sockets share a listener's port (`lb run --l7-accept`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptMode {
    /// One socket per worker, all bound to the port with `SO_REUSEPORT`: the kernel spreads
    /// new connections over them by a hash of the addresses.
    ReusePort,
    /// One listening socket, a duplicate of it (`dup`) per worker: whichever worker wakes
    /// first accepts.
    SharedSocket,
    /// Sockets as [`ReusePort`](Self::ReusePort), and the worker that accepts a connection
    /// hands it to the worker serving the fewest open connections when that is another one
    /// (HAProxy's default, `tune.listener.multi-queue on`: a listener picks the least loaded
    /// thread). The kernel's hash
    /// splits a few dozen connections unevenly (36/28 of 64 seen), and a worker never gives
    /// work back.
    Balanced,
}

/// The L7 tier's thread layout (see the README's "Worker layout").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerLayout {
    /// Shared runtime or one per worker.
    pub runtime: L7Runtime,
    /// Per-worker runtime: how many workers; `None`: one per CPU the process may use
    /// (`std::thread::available_parallelism`).
    pub workers: Option<std::num::NonZeroUsize>,
    /// Per-worker runtime: how the workers' listening sockets share each port.
    pub accept: AcceptMode,
    /// Per-worker runtime: which CPU each worker's thread is bound to.
    pub affinity: affinity::CpuAffinity,
}

/// `lb run`'s L7 runtime when `--l7-runtime` is not given (and [`WorkerLayout::default`]'s,
/// which in-process tests use). Shared: per-worker used less CPU per request, but its HTTP/1.1
/// p99 was no better (BENCHMARKS.md, "One runtime per CPU (stop 25)").
pub const DEFAULT_L7_RUNTIME: L7Runtime = L7Runtime::Shared;

impl Default for WorkerLayout {
    fn default() -> Self {
        Self {
            runtime: DEFAULT_L7_RUNTIME,
            workers: None,
            accept: AcceptMode::ReusePort,
            affinity: affinity::CpuAffinity::Unbound,
        }
    }
}

impl WorkerLayout {
    /// How many per-worker runtimes this layout runs (0 for the shared runtime).
    pub fn worker_count(&self) -> usize {
        match self.runtime {
            L7Runtime::Shared => 0,
            L7Runtime::PerWorker => self
                .workers
                .or_else(|| std::thread::available_parallelism().ok())
                .map_or(1, std::num::NonZeroUsize::get),
        }
    }
}

/// Everything the L7 tier serves.
pub struct L7Config {
    /// Listeners with their rules.
    pub listeners: Vec<(ListenerConfig, RuleSet)>,
    /// Target groups by name (the names forward actions use).
    pub groups: Groups,
    /// Connections to targets.
    pub client: ClientConfig,
    /// Where each request's access-log line goes (`None`: no access log; the metrics are
    /// counted either way).
    pub access_log: Option<Arc<AccessLog>>,
    /// Which threads serve the client connections.
    pub workers: WorkerLayout,
}

#[cfg(test)]
impl L7Config {
    /// One plain-HTTP listener `name` on `addr` with `rules`, the given groups, and defaults
    /// for the rest (no access log): the unit tests' tier.
    pub(crate) fn one_listener(
        name: &str,
        addr: SocketAddr,
        rules: RuleSet,
        groups: Groups,
    ) -> Self {
        Self {
            listeners: vec![(
                ListenerConfig::new(name, ListenerProtocol::Http, addr),
                rules,
            )],
            groups,
            client: ClientConfig::default(),
            access_log: None,
            workers: WorkerLayout::default(),
        }
    }

    /// Rules that answer every request with an empty 200 (no target group needed).
    pub(crate) fn fixed_200() -> RuleSet {
        RuleSet::new(
            Vec::new(),
            crate::rules::Action::FixedResponse(
                crate::rules::FixedResponseAction::new("200", None, "")
                    .expect("valid fixed response"),
            ),
        )
        .expect("valid rules")
    }
}

/// Counters of the whole L7 tier (CloudWatch names in the docs), the request ones derived from
/// each request's record. Read with `Ordering::Relaxed`, or with [`Counter::get`] for the
/// ones every request adds to (kept per thread: no `lock`-prefixed add on a line both workers
/// write). The per-listener, per-group and per-target metrics are in [`crate::metrics`].
#[derive(Debug, Default)]
pub struct L7Counters {
    /// ClientTLSNegotiationErrorCount: TLS handshakes with clients that failed or timed out.
    pub client_tls_negotiation_errors: AtomicU64,
    /// DesyncMitigationMode_NonCompliant_Request_Count: requests classified other than
    /// compliant (whatever the mode did with them).
    pub desync_non_compliant_requests: AtomicU64,
    /// HTTP 460: the client closed the connection before the response was sent (also
    /// counted in `elb_4xx`).
    pub client_closed_requests: AtomicU64,
    /// HTTPCode_ELB_4XX_Count.
    pub elb_4xx: AtomicU64,
    /// HTTPCode_ELB_5XX_Count.
    pub elb_5xx: AtomicU64,
    /// RequestCount: requests for which a target was chosen.
    pub requests_forwarded: Counter,
    /// HTTP_Fixed_Response_Count.
    pub fixed_responses: AtomicU64,
    /// HTTP_Redirect_Count.
    pub redirects: AtomicU64,
    /// RuleEvaluations.
    pub rule_evaluations: Counter,
    /// NewConnectionCount.
    pub new_connections: AtomicU64,
    /// RejectedConnectionCount: client connections closed at once because the listener's
    /// `max-connections` or `max-connections-per-source` was reached.
    pub rejected_connections: AtomicU64,
    /// HTTP/1 request heads not complete within the listener's `header-timeout` (each answered
    /// 408; also counted in HTTPCode_ELB_4XX_Count).
    pub header_timeouts: AtomicU64,
    /// HTTP/2 connections closed because the client kept cancelling the streams it opened
    /// (rapid reset, CVE-2023-44487): see `server/abuse.rs`.
    pub http2_abusive_connections: AtomicU64,
    /// HTTP/1 requests served by the native HTTP/1 path (`server/h1.rs`), not hyper's. Not a
    /// CloudWatch metric: it shows which path served the requests.
    pub http1_native_requests: Counter,
    /// HTTP/1 connections the native path handed to hyper (an upgrade, or the HTTP/2
    /// preface).
    pub http1_handoffs: AtomicU64,
    /// HTTP/2 streams served by the native HTTP/2 path (`server/h2native.rs`), not hyper's.
    /// Not a CloudWatch metric: it shows which path served the requests.
    pub http2_native_requests: Counter,
    /// HTTP/1.1 requests served by the lean loop (`server/lean`, `http1=lean`). Not a
    /// CloudWatch metric: it shows which path served the requests.
    pub http1_lean_requests: Counter,
    /// Client connections the lean loop handed to the native path (a request it does not
    /// serve: the native path serves it and the rest of the connection).
    pub http1_lean_handoffs: AtomicU64,
}

impl L7Counters {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one request from its record.
    fn record(&self, r: &Record) {
        use crate::accesslog::ActionKind;
        if r.classification.tier > crate::proxy::desync::Tier::Compliant {
            Self::add(&self.desync_non_compliant_requests, 1);
        }
        if r.generated_by_lb() {
            match r.elb_status.unwrap_or(0) / 100 {
                4 => Self::add(&self.elb_4xx, 1),
                5 => Self::add(&self.elb_5xx, 1),
                _ => {}
            }
        }
        if r.elb_status == Some(460) {
            Self::add(&self.client_closed_requests, 1);
        }
        if r.target.is_some() {
            self.requests_forwarded.add(1);
        }
        match r.action {
            Some(ActionKind::FixedResponse) => Self::add(&self.fixed_responses, 1),
            Some(ActionKind::Redirect) => Self::add(&self.redirects, 1),
            _ => {}
        }
        if r.rules_evaluated > 0 {
            // An add of 0 writes the line all the same.
            self.rule_evaluations.add(u64::from(r.rules_evaluated));
        }
        if r.lb_error_detail.as_deref() == Some(HEADER_TIMEOUT_REASON) {
            Self::add(&self.header_timeouts, 1);
        }
    }
}

/// Lifecycle of the whole tier, broadcast to every accept loop, connection and tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// Stop accepting; connections finish their current requests and close.
    Draining,
    /// Drain deadline passed: close everything now.
    Stopped,
}

/// `rules` with every forward action's groups looked up in `groups` once (see
/// [`ResolvedRuleSet`]).
fn resolved(rules: RuleSet, groups: &Groups) -> Arc<ResolvedRuleSet> {
    Arc::new(ResolvedRuleSet::new(rules, |name| {
        groups.get(name).cloned()
    }))
}

/// What every listener shares.
struct Shared {
    /// Swapped whole when groups come or go. A request finds its group in its rule set
    /// (resolved against these when stored); the map is read by name only for a rule set
    /// stored unresolved.
    groups: ArcSwap<Groups>,
    /// Held while a rule set is resolved and stored, or the groups and the rule sets resolved
    /// against them are: a change of the rules and one of the groups at the same moment
    /// cannot leave a rule set resolved against groups that were replaced.
    resolving: std::sync::Mutex<()>,
    forwarder: Forwarder,
    counters: Arc<L7Counters>,
    phase: watch::Receiver<Phase>,
    access_log: Option<Arc<AccessLog>>,
    /// Each worker's client-connection counts (one entry in the shared runtime).
    workers: Box<[WorkerCounts]>,
    /// The layout's runtime: with [`L7Runtime::PerWorker`] the per-worker counts are exposed.
    runtime: L7Runtime,
}

/// One worker's client-connection counts, on a cache line of its own (each worker's accept
/// loop and connections write their own).
#[derive(Default)]
#[repr(align(64))]
struct WorkerCounts {
    /// Client connections accepted (over all listeners, rejected ones included).
    accepted: AtomicU64,
    /// Client connections being served now: where [`AcceptMode::Balanced`] sends the next one.
    open: AtomicU64,
}

/// One worker's client connections, as [`L7Handle::worker_counts`] reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerCount {
    /// Accepted so far by this worker (over all listeners, rejected ones included).
    pub accepted: u64,
    /// Being served now by this worker (accepted and not yet closed, wherever accepted).
    pub open: u64,
}

/// One listener at run time.
struct Listener {
    cfg: ListenerConfig,
    /// `cfg.name`, shared with every record.
    name: Arc<str>,
    /// Its metrics.
    cells: Arc<ListenerCells>,
    /// HTTPS: the certificate resolver, and each certificate's file (in the same order), to
    /// log which one a connection got.
    certificates: Option<(Arc<tls::SniResolver>, Vec<Arc<str>>)>,
    /// Swapped whole when a rule changes: a request evaluates one version from start to end,
    /// and open connections are not touched.
    rules: Arc<ArcSwap<ResolvedRuleSet>>,
    port: u16,
    /// `port` as the `X-Forwarded-Port` value, made once ([`crate::headers::forwarded_port`]).
    forwarded_port: http::HeaderValue,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    /// Open client connections, for `max-connections` and `max-connections-per-source`.
    connections: limits::ConnectionLimits,
}

/// Changes a running L7 tier's rules and target groups, atomically, without touching open
/// connections.
#[derive(Clone)]
pub struct L7Handle {
    shared: Arc<Shared>,
    rules: Arc<HashMap<String, Arc<ArcSwap<ResolvedRuleSet>>>>,
    listeners: Arc<Vec<Arc<Listener>>>,
}

/// One listener's metrics, for the collect step.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    /// The listener's name.
    pub name: Arc<str>,
    /// Its counters.
    pub cells: Arc<ListenerCells>,
    /// Client connections open now (ActiveConnectionCount).
    pub open_connections: usize,
}

impl L7Handle {
    /// Replaces a listener's rules (their forward actions resolved against the current
    /// groups); false if there is no such listener.
    pub fn set_rules(&self, listener: &str, rules: Arc<RuleSet>) -> bool {
        match self.rules.get(listener) {
            Some(slot) => {
                let _serial = self
                    .shared
                    .resolving
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let groups = self.shared.groups.load();
                slot.store(resolved(Arc::unwrap_or_clone(rules), &groups));
                true
            }
            None => false,
        }
    }

    /// Replaces the target groups, and every listener's rules with a copy resolved against
    /// them (a request then finds its group in its rule set, as if by name in `groups`).
    pub fn set_groups(&self, groups: Groups) {
        let _serial = self
            .shared
            .resolving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for slot in self.rules.values() {
            let rules = slot.load().rules().clone();
            slot.store(resolved(rules, &groups));
        }
        self.shared.groups.store(Arc::new(groups));
    }

    /// The current target groups.
    pub fn groups(&self) -> Arc<Groups> {
        self.shared.groups.load_full()
    }

    /// Every listener's metrics now.
    pub fn listener_metrics(&self) -> Vec<ListenerMetrics> {
        self.listeners
            .iter()
            .map(|l| ListenerMetrics {
                name: l.name.clone(),
                cells: l.cells.clone(),
                open_connections: l.connections.open(),
            })
            .collect()
    }

    /// Per-target connection pool statistics (see [`RunningL7::pool_stats`]).
    pub fn pool_stats(&self) -> Vec<TargetPoolStats> {
        self.shared.forwarder.stats()
    }

    /// Drops the connection pools of targets whose address `keep` refuses (see
    /// [`Forwarder::retain_targets`]); returns how many.
    pub fn retain_target_pools(&self, keep: impl Fn(SocketAddr) -> bool) -> usize {
        self.shared.forwarder.retain_targets(keep)
    }

    /// The tier's counters.
    pub fn counters(&self) -> &Arc<L7Counters> {
        &self.shared.counters
    }

    /// Each worker's client connections, accepted so far and open now; one entry with the
    /// shared runtime.
    pub fn worker_counts(&self) -> Vec<WorkerCount> {
        self.shared
            .workers
            .iter()
            .map(|w| WorkerCount {
                accepted: L7Counters::get(&w.accepted),
                open: L7Counters::get(&w.open),
            })
            .collect()
    }

    /// Whether the tier runs one runtime per worker (`--l7-runtime per-worker`); the metrics
    /// show the per-worker counts only then.
    pub fn per_worker(&self) -> bool {
        self.shared.runtime == L7Runtime::PerWorker
    }

    /// Per-target pool statistics of each worker's shard: `(worker, stats)`.
    pub fn pool_stats_per_worker(&self) -> Vec<(usize, TargetPoolStats)> {
        self.shared.forwarder.stats_per_worker()
    }
}

/// A running L7 tier (from [`start`]).
pub struct RunningL7 {
    /// Every listener's name and bound address (port 0 resolved).
    pub addrs: Vec<(String, SocketAddr)>,
    handle: L7Handle,
    counters: Arc<L7Counters>,
    forwarder: Forwarder,
    phase: watch::Sender<Phase>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningL7 {
    /// The handle that changes rules and groups at run time.
    pub fn handle(&self) -> L7Handle {
        self.handle.clone()
    }

    /// The tier's counters.
    pub fn counters(&self) -> &Arc<L7Counters> {
        &self.counters
    }

    /// Per-target connection pool statistics: reuse, new connections, retries after a stale
    /// pooled connection, early retirements, unproven reuse avoided, learned idle-close times.
    /// [`TargetPoolStats::add_counters`] sums them for metrics.
    pub fn pool_stats(&self) -> Vec<TargetPoolStats> {
        self.forwarder.stats()
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain`, then closes
    /// everything and returns when all connections are gone.
    pub async fn shutdown(mut self, drain: Duration) -> anyhow::Result<()> {
        self.phase.send_replace(Phase::Draining);
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        if tokio::time::timeout(drain, &mut task).await.is_err() {
            self.phase.send_replace(Phase::Stopped);
            task.await.context("L7 tier task failed")?;
        }
        self.phase.send_replace(Phase::Stopped);
        Ok(())
    }
}

impl Drop for RunningL7 {
    fn drop(&mut self) {
        self.phase.send_replace(Phase::Stopped);
    }
}

/// Binds every listener (bind errors name the listener) and serves until [`RunningL7::shutdown`].
/// With [`L7Runtime::PerWorker`] the workers' threads are started here and joined when the
/// tier has stopped; with [`L7Runtime::Shared`] everything runs on the caller's runtime.
pub async fn start(cfg: L7Config) -> anyhow::Result<RunningL7> {
    let L7Config {
        listeners,
        groups,
        client,
        access_log,
        workers: layout,
    } = cfg;
    anyhow::ensure!(
        listeners.len() <= MAX_LISTENERS,
        "{} listeners configured; a load balancer has at most {MAX_LISTENERS}",
        listeners.len()
    );
    let workers = layout.worker_count();
    // Checked before anything is bound: a CPU list naming CPUs the process may not use fails
    // the start.
    let cpus = match layout.affinity {
        affinity::CpuAffinity::Unbound => vec![None; workers],
        a => {
            anyhow::ensure!(
                layout.runtime == L7Runtime::PerWorker,
                "a CPU affinity needs the per-worker runtime"
            );
            let allowed = affinity::CpuSet::of_this_thread()
                .context("reading the CPUs this process may run on")?;
            a.plan(workers, &allowed).map_err(anyhow::Error::msg)?
        }
    };
    if let Some(l) = listeners.iter().find(|(l, _)| l.http1_lean)
        && layout.runtime != L7Runtime::PerWorker
    {
        anyhow::bail!(
            "listener {}: http1=lean needs the per-worker runtime (--l7-runtime per-worker)",
            l.0.name
        );
    }
    let counters = Arc::new(L7Counters::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    // One pool shard and one count per worker; the shared runtime is one "worker" here.
    let shards = workers.max(1);
    let forwarder = Forwarder::sharded(client, shards);
    let shared = Arc::new(Shared {
        groups: ArcSwap::from_pointee(groups),
        resolving: std::sync::Mutex::new(()),
        forwarder: forwarder.clone(),
        counters: counters.clone(),
        phase: phase_rx,
        access_log,
        workers: (0..shards).map(|_| WorkerCounts::default()).collect(),
        runtime: layout.runtime,
    });
    let mut bound = Vec::new();
    let mut addrs = Vec::new();
    let mut rule_slots = HashMap::new();
    for (lcfg, rules) in listeners {
        let rules = Arc::new(ArcSwap::new(resolved(rules, &shared.groups.load())));
        rule_slots.insert(lcfg.name.clone(), rules.clone());
        let (tls, certificates) = match lcfg.protocol {
            ListenerProtocol::Http => (None, None),
            ListenerProtocol::Https => {
                let (config, resolver) = tls::server_config_with_resolver(&lcfg.certificates)
                    .with_context(|| format!("listener {}: loading certificates", lcfg.name))?;
                let files = lcfg
                    .certificates
                    .iter()
                    .map(|c| Arc::from(c.cert.display().to_string()))
                    .collect();
                (
                    Some(tokio_rustls::TlsAcceptor::from(config)),
                    Some((resolver, files)),
                )
            }
        };
        let sockets = if workers == 0 {
            TcpListener::bind(lcfg.bind).await.map(Sockets::Shared)
        } else {
            bind_per_worker(lcfg.bind, workers, layout.accept).map(Sockets::PerWorker)
        }
        .with_context(|| format!("listener {}: binding {}", lcfg.name, lcfg.bind))?;
        let local = sockets.local_addr()?;
        addrs.push((lcfg.name.clone(), local));
        let listener = Arc::new(Listener {
            name: Arc::from(lcfg.name.as_str()),
            cells: Arc::default(),
            certificates,
            port: local.port(),
            forwarded_port: crate::headers::forwarded_port(local.port()),
            connections: limits::ConnectionLimits::new(
                lcfg.max_connections,
                lcfg.max_connections_per_source,
            ),
            cfg: lcfg,
            rules,
            tls,
            shared: shared.clone(),
        });
        bound.push((listener, sockets));
    }
    let shared_for_handle = shared.clone();
    let listeners_for_handle: Vec<Arc<Listener>> = bound.iter().map(|(l, _)| l.clone()).collect();
    let task = if workers == 0 {
        tokio::spawn(async move {
            let mut loops = JoinSet::new();
            for (listener, sockets) in bound {
                if let Sockets::Shared(socket) = sockets {
                    loops.spawn(accept_loop(listener, socket, 0, None));
                }
            }
            while loops.join_next().await.is_some() {}
        })
    } else {
        let first_port = addrs.first().map_or(0, |(_, a)| a.port());
        let threads = start_workers(bound, &cpus, first_port, layout.accept)?;
        tokio::spawn(threads.join())
    };
    Ok(RunningL7 {
        addrs,
        handle: L7Handle {
            shared: shared_for_handle,
            rules: Arc::new(rule_slots),
            listeners: Arc::new(listeners_for_handle),
        },
        counters,
        forwarder,
        phase: phase_tx,
        task: Some(task),
    })
}

/// A listener's listening sockets: the shared runtime's one, or one per worker.
enum Sockets {
    Shared(TcpListener),
    PerWorker(Vec<std::net::TcpListener>),
}

impl Sockets {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Shared(s) => s.local_addr(),
            Self::PerWorker(v) => v[0].local_addr(),
        }
    }
}

/// Listen backlog of every listening socket (tokio's `TcpListener::bind` uses the same).
const LISTEN_BACKLOG: u32 = 1024;

/// `workers` listening sockets for `addr` (port 0: the port the first one got), non-blocking,
/// not yet registered with any runtime: bound with `SO_REUSEPORT` each, or one socket and its
/// duplicates.
fn bind_per_worker(
    addr: SocketAddr,
    workers: usize,
    accept: AcceptMode,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let new_socket = |addr: SocketAddr| {
        if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
    };
    let socket = |addr: SocketAddr, reuseport: bool| -> std::io::Result<std::net::TcpListener> {
        let s = new_socket(addr)?;
        s.set_reuseaddr(true)?;
        if reuseport {
            s.set_reuseport(true)?;
        }
        s.bind(addr)?;
        // Registered with the caller's runtime only until `into_std`: each worker registers
        // its sockets with its own.
        s.listen(LISTEN_BACKLOG)?.into_std()
    };
    let reuseport = accept != AcceptMode::SharedSocket && workers > 1;
    if reuseport && addr.port() != 0 {
        // A port another process holds with `SO_REUSEPORT` (a second `lb run` as the same user)
        // would take our sockets into its group and share our traffic: a bind without it is
        // refused there, as on any port in use.
        let probe = new_socket(addr)?;
        probe.set_reuseaddr(true)?;
        probe.bind(addr)?;
    }
    let first = socket(addr, reuseport)?;
    let local = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        let next = if reuseport {
            socket(local, true)?
        } else {
            sockets[0].try_clone()?
        };
        sockets.push(next);
    }
    Ok(sockets)
}

/// The per-worker threads, joined by [`WorkerThreads::join`].
struct WorkerThreads {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Each closes (its sender is dropped) as its thread ends.
    ended: Vec<tokio::sync::oneshot::Receiver<()>>,
}

impl WorkerThreads {
    /// Waits (without blocking the runtime) until every worker has ended, then joins them.
    async fn join(self) {
        for ended in self.ended {
            let _ = ended.await;
        }
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("an L7 worker thread panicked");
            }
        }
    }
}

/// The environment variable of the bench-only placement knob (see [`parse_placement`]).
pub const PLACEMENT_VAR: &str = "LB_PLACEMENT";

/// The largest placement [`PLACEMENT_VAR`] takes: 64 placements, one per 64-byte line of a
/// 4 KiB page (the L1 data cache's 64 sets).
pub const MAX_PLACEMENT: u8 = 63;

/// The placement `lb run` was started with: 0 unless [`set_placement`] was called.
static PLACEMENT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// [`PLACEMENT_VAR`]'s value is not a placement.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{PLACEMENT_VAR} must be a whole number from 0 to {MAX_PLACEMENT}, not {value:?}")]
pub struct PlacementError {
    /// What the variable held.
    pub value: String,
}

/// Parses `LB_PLACEMENT`, a bench-only knob that changes only where the request path's memory
/// lands, not the work it does: with `n` > 0, every L7 worker runs its runtime `n` 64-byte
/// frames deeper in its stack ([`placed_deeper`]; the shared runtime's threads, which serve
/// by default, get a stack `n` × 64 bytes longer, which moves its top), and the main thread (before the
/// configuration is built) and every worker (before its runtime starts) leak `n` blocks of
/// every size from 8 to 512 bytes ([`leak_placement_blocks`]), so the blocks the request path
/// allocates later start at other offsets of their pages. The working set of one request is
/// about the L1 data cache's size, so which of its 64 sets each line lands in moves the
/// simulated 8-way miss count by 10-20 per request from one build to the next (BENCHMARKS.md,
/// "Placement: the 8-way miss count's spread over where lines land (stop 34)"); measuring one
/// build at several placements gives that spread. Unset (`None`) or 0 is the normal layout
/// and adds nothing; anything but 0..=63 is an error naming the variable.
pub fn parse_placement(value: Option<&str>) -> Result<u8, PlacementError> {
    let Some(value) = value else { return Ok(0) };
    match value.trim().parse::<u8>() {
        Ok(n) if n <= MAX_PLACEMENT => Ok(n),
        _ => Err(PlacementError {
            value: value.to_owned(),
        }),
    }
}

/// Sets the placement the L7 workers started from now on use (see [`parse_placement`]).
pub fn set_placement(n: u8) {
    PLACEMENT.store(n.min(MAX_PLACEMENT), std::sync::atomic::Ordering::Relaxed);
}

/// The placement [`set_placement`] set (0 if none).
pub fn placement() -> u8 {
    PLACEMENT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Leaks `n` blocks of every size from 8 to 512 bytes in steps of 8 (which covers every small
/// size class of mimalloc and of the thread's freed-block cache) on the calling thread's heap,
/// so the blocks allocated afterwards sit `n` blocks further into their pages. Nothing for 0.
pub fn leak_placement_blocks(n: u8) {
    for _ in 0..n {
        for size in (8..=512).step_by(8) {
            std::hint::black_box(Box::leak(vec![0u8; size].into_boxed_slice()));
        }
    }
}

/// Runs `f` `frames` frames of at least 64 bytes deeper in the stack than a direct call would
/// (for 0, a direct call): a worker's runtime, and every future it polls, then sits that much
/// lower in the worker's stack.
#[inline(never)]
fn placed_deeper<R>(frames: u8, f: impl FnOnce() -> R) -> R {
    if frames == 0 {
        return f();
    }
    let pad = std::hint::black_box([frames; 64]);
    let r = placed_deeper(frames - 1, f);
    std::hint::black_box(&pad);
    r
}

/// Starts one thread per entry of `cpus`, named `l7w{INDEX}:{port}` (`port`: the first
/// listener's, which tells apart the workers of tiers in one process), each bound to its CPU
/// when one is given, with its own `current_thread` runtime and its socket of every listener.
fn start_workers(
    bound: Vec<(Arc<Listener>, Sockets)>,
    cpus: &[Option<usize>],
    port: u16,
    accept: AcceptMode,
) -> anyhow::Result<WorkerThreads> {
    let workers = cpus.len();
    // Balanced: a channel into every worker for the connections others hand it. The senders
    // are held by every accept loop, so a worker's receiving loop ends when all accept loops
    // have ended (a drain), and waits for the connections it was given.
    let (handoff, mut inboxes): (Option<Arc<[Handoff]>>, Vec<_>) = if accept == AcceptMode::Balanced
    {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        (Some(tx.into()), rx.into_iter().map(Some).collect())
    } else {
        (None, (0..workers).map(|_| None).collect())
    };
    let mut per_worker: Vec<Vec<(Arc<Listener>, std::net::TcpListener)>> =
        (0..workers).map(|_| Vec::new()).collect();
    for (listener, sockets) in bound {
        let Sockets::PerWorker(sockets) = sockets else {
            unreachable!("per-worker layouts bind per-worker sockets")
        };
        for (worker, socket) in sockets.into_iter().enumerate() {
            per_worker[worker].push((listener.clone(), socket));
        }
    }
    let mut threads = WorkerThreads {
        threads: Vec::with_capacity(workers),
        ended: Vec::with_capacity(workers),
    };
    for ((worker, sockets), &cpu) in per_worker.into_iter().enumerate().zip(cpus) {
        let handoff = handoff.clone();
        let inbox = inboxes[worker].take();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building an L7 worker's runtime")?;
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
        let placement = placement();
        let thread = std::thread::Builder::new()
            .name(format!("l7w{worker}:{port}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    match affinity::bind_this_thread(cpu) {
                        Ok(()) => tracing::info!(worker, cpu, "L7 worker bound to its CPU"),
                        Err(e) => tracing::error!(
                            worker, cpu, error = %e,
                            "binding the L7 worker to its CPU failed; it runs unbound"
                        ),
                    }
                }
                crate::proxy::pool::set_current_worker(worker);
                leak_placement_blocks(placement);
                placed_deeper(placement, || runtime.block_on(async move {
                    let mut loops = JoinSet::new();
                    for (listener, socket) in sockets {
                        if listener.cfg.http1_lean {
                            match lean::start(listener.clone(), socket, worker, cpu) {
                                Ok(ended) => {
                                    loops.spawn(ended);
                                }
                                Err(e) => {
                                    tracing::error!(listener = %listener.cfg.name, worker, error = %e, "starting the lean HTTP/1.1 loop failed");
                                }
                            }
                            continue;
                        }
                        match TcpListener::from_std(socket) {
                            Ok(socket) => {
                                loops.spawn(accept_loop(listener, socket, worker, handoff.clone()));
                            }
                            Err(e) => {
                                tracing::error!(listener = %listener.cfg.name, worker, error = %e, "registering a listening socket failed");
                            }
                        }
                    }
                    drop(handoff);
                    if let Some(inbox) = inbox {
                        loops.spawn(serve_handed(inbox, worker));
                    }
                    while loops.join_next().await.is_some() {}
                }));
                // Tasks left on the runtime (pool sweepers, target connection drivers) end
                // with it, before the thread says it has ended.
                drop(runtime);
                drop(ended_tx);
            })
            .context("starting an L7 worker thread")?;
        threads.threads.push(thread);
        threads.ended.push(ended_rx);
    }
    Ok(threads)
}

/// Binds every listener, serves until `shutdown` resolves, then stops accepting and lets
/// in-flight requests finish up to `drain` before closing.
pub async fn serve(
    cfg: L7Config,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> anyhow::Result<()> {
    let running = start(cfg).await?;
    for (name, addr) in &running.addrs {
        tracing::info!(listener = %name, %addr, "listening");
    }
    shutdown.await;
    tracing::info!(?drain, "shutting down listeners");
    running.shutdown(drain).await
}

/// Most concurrent HTTP/2 streams per client connection: ALB's limit (128 parallel requests per
/// HTTP/2 connection). hyper's default is 200.
pub(crate) const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 128;
/// HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`: ALB's 64 KiB for all request headers.
const HTTP2_MAX_HEADER_LIST_SIZE: u32 = sniff::MAX_HEADERS_TOTAL as u32;
/// HTTP/2 frame size: 16 KiB.
const HTTP2_MAX_FRAME_SIZE: u32 = 16 * 1024;
/// Streams reset before they were accepted before the client gets GOAWAY ENHANCE_YOUR_CALM.
const HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams we reset for the client's protocol errors before GOAWAY.
const HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 128;
/// Receive windows, per connection and per stream.
const HTTP2_CONNECTION_WINDOW: u32 = 1024 * 1024;
const HTTP2_STREAM_WINDOW: u32 = 1024 * 1024;
/// Per-stream send buffer.
const HTTP2_MAX_SEND_BUF_SIZE: usize = 128 * 1024;

/// hyper settings shared by all listeners: header limits as ALB (the sniffer enforces them
/// exactly for HTTP/1; hyper's own limits are set above them so they never fire first: its
/// default of 100 header fields is [`sniff::MAX_HEADER_COUNT`], left unset because setting any
/// count moves hyper's header slots to the heap), and
/// HTTP/2 settings chosen against resource-exhaustion attacks. `exec` runs the HTTP/2 streams
/// (one connection's [`h2exec::StreamExec`]: they run in the connection's task).
fn http_builder<E>(exec: E) -> auto::Builder<E> {
    let mut b = auto::Builder::new(exec);
    b.http1()
        .timer(TokioTimer::new())
        // The sniffer enforces `header-timeout` with ALB's 408; hyper's own timeout would close
        // without a response.
        .header_read_timeout(None)
        .max_buf_size(2 * sniff::MAX_HEADERS_TOTAL + 2 * sniff::MAX_LINE);
    b.http2()
        .timer(TokioTimer::new())
        // ALB's 64 KiB for all request headers. It also bounds a CONTINUATION flood
        // (CVE-2024-27316 class): h2 accepts at most max(5, 1.25 × this / max_frame_size)
        // CONTINUATION frames per header block (5 here) and never buffers more than this many
        // header bytes, then answers GOAWAY ENHANCE_YOUR_CALM / COMPRESSION_ERROR.
        .max_header_list_size(HTTP2_MAX_HEADER_LIST_SIZE)
        // 16 KiB, the protocol's minimum and h2's default, stated because the CONTINUATION bound
        // above is derived from it.
        .max_frame_size(HTTP2_MAX_FRAME_SIZE)
        // Each open stream can hold a request to a target and buffers; ALB's 128 bounds that.
        .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
        // Rapid reset (CVE-2023-44487) in its usual shape, HEADERS and RST_STREAM in one burst:
        // more than 20 streams reset before they were accepted → GOAWAY ENHANCE_YOUR_CALM.
        // (Streams cancelled after the handler started are bounded in `abuse.rs`.)
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        // Streams we had to reset because the client broke the protocol on them (malformed
        // headers, flow-control violations): a client doing that on purpose makes us spend
        // work per stream; 128 (one stream window's worth) is far above any honest client's
        // mistakes. h2's default is 1024.
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS)
        // Received-data buffering: a client may have 1 MiB in flight per connection and per
        // stream (hyper's defaults, stated): request bodies are buffered at most this much
        // before flow control stops the client. No adaptive window: it would let one client
        // grow the buffers.
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .adaptive_window(false)
        // Per-stream send buffer: bounds what we hold for a client that does not read its
        // responses (128 streams × 128 KiB = 16 MiB per connection at worst; h2's default is
        // ~400 KiB per stream).
        .max_send_buf_size(HTTP2_MAX_SEND_BUF_SIZE)
        // No keep-alive PINGs: a client answering them would reset the sniffer's idle clock
        // (bytes arrived), so idle HTTP/2 connections would never be closed. Dead peers are
        // found by the idle timeout instead.
        .keep_alive_interval(None)
        // `service::Respond` gives every HTTP/2 response its `Date` (the target's, else the
        // current second's), marked never indexed; hyper's would look the header up again.
        .auto_date_header(false);
    b
}

/// A connection one worker accepted (and admitted) for another to serve.
struct Handed {
    listener: Arc<Listener>,
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    slot: limits::ConnectionSlot,
    open: OpenConnection,
}

/// The sending half of a worker's channel of [`Handed`] connections.
type Handoff = tokio::sync::mpsc::UnboundedSender<Handed>;

/// One connection in its worker's open count ([`WorkerCounts::open`]) while it lives.
struct OpenConnection {
    shared: Arc<Shared>,
    worker: usize,
}

impl OpenConnection {
    fn new(shared: &Arc<Shared>, worker: usize) -> Self {
        shared.workers[worker].open.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: shared.clone(),
            worker,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.shared.workers[self.worker]
            .open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The worker serving the fewest open connections; `me` on a tie.
fn least_loaded(workers: &[WorkerCounts], me: usize) -> usize {
    let mut best = me;
    let mut fewest = workers[me].open.load(Ordering::Relaxed);
    for (w, n) in workers.iter().enumerate() {
        let n = n.open.load(Ordering::Relaxed);
        if n < fewest {
            best = w;
            fewest = n;
        }
    }
    best
}

/// Serves the connections other workers hand to `worker` until every accept loop has ended,
/// then waits for them.
async fn serve_handed(mut inbox: tokio::sync::mpsc::UnboundedReceiver<Handed>, worker: usize) {
    let conns = TaskTracker::new();
    while let Some(h) = inbox.recv().await {
        match TcpStream::from_std(h.tcp) {
            Ok(tcp) => {
                conns.spawn(async move {
                    let _open = h.open;
                    serve_connection(h.listener, tcp, h.peer, h.slot).await;
                });
            }
            Err(e) => {
                tracing::warn!(listener = %h.listener.cfg.name, worker, error = %e, "registering a handed connection failed");
            }
        }
    }
    conns.close();
    conns.wait().await;
}

async fn accept_loop(
    listener: Arc<Listener>,
    socket: TcpListener,
    worker: usize,
    handoff: Option<Arc<[Handoff]>>,
) {
    let mut phase = listener.shared.phase.clone();
    // Connection tasks are tracked, not joined one by one: a JoinSet would wake this loop
    // for every connection that ends (and lock its set twice per connection), which a full
    // TLS handshake per connection made a visible share of the work. Connections end by
    // themselves when the phase says so; the loop waits for all of them before returning.
    let conns = TaskTracker::new();
    loop {
        tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok((tcp, peer)) => {
                    L7Counters::add(&listener.shared.workers[worker].accepted, 1);
                    L7Counters::add(&listener.shared.counters.new_connections, 1);
                    L7Counters::add(&listener.cells.new_connections, 1);
                    match listener.connections.admit(peer.ip()) {
                        Ok(slot) => {
                            let shared = &listener.shared;
                            let to = handoff.as_ref().map_or(worker, |_| least_loaded(&shared.workers, worker));
                            let tcp = match (to != worker, &handoff) {
                                (true, Some(handoff)) => match hand(&handoff[to], &listener, tcp, peer, slot, to) {
                                    Ok(()) => continue,
                                    Err(back) => back,
                                },
                                _ => Some((tcp, slot)),
                            };
                            if let Some((tcp, slot)) = tcp {
                                // The connection holds the listener before it is counted open.
                                let listener = listener.clone();
                                let open = OpenConnection::new(shared, worker);
                                conns.spawn(async move {
                                    let _open = open;
                                    serve_connection(listener, tcp, peer, slot).await;
                                });
                            }
                        }
                        Err(over) => {
                            // Closed at once: no TLS handshake, no byte read or written.
                            L7Counters::add(&listener.shared.counters.rejected_connections, 1);
                            L7Counters::add(&listener.cells.rejected_connections, 1);
                            tracing::debug!(listener = %listener.cfg.name, %peer, limit = %over, "connection rejected");
                            drop(tcp);
                        }
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %listener.cfg.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() != Phase::Running {
                    break;
                }
            }
        }
    }
    drop(socket);
    conns.close();
    conns.wait().await;
}

/// Hands an accepted connection to worker `to`. `Err(Some(..))` gives it back when that
/// worker has stopped taking connections (a drain); `Err(None)` when its socket could not be
/// taken from this worker's reactor (closed).
fn hand(
    handoff: &Handoff,
    listener: &Arc<Listener>,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: limits::ConnectionSlot,
    to: usize,
) -> Result<(), Option<(TcpStream, limits::ConnectionSlot)>> {
    let tcp = match tcp.into_std() {
        Ok(tcp) => tcp,
        Err(e) => {
            tracing::debug!(listener = %listener.cfg.name, %peer, error = %e, "handing a connection over failed");
            return Err(None);
        }
    };
    let handed = Handed {
        listener: listener.clone(),
        tcp,
        peer,
        slot,
        open: OpenConnection::new(&listener.shared, to),
    };
    handoff.send(handed).map_err(|back| {
        let Handed { tcp, slot, .. } = back.0;
        TcpStream::from_std(tcp).ok().map(|tcp| (tcp, slot))
    })
}

/// Serves one accepted client connection; `slot` holds its place under the connection limits
/// until the connection (or the WebSocket tunnel it became) ends.
async fn serve_connection(
    listener: Arc<Listener>,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: limits::ConnectionSlot,
) {
    let _ = tcp.set_nodelay(true);
    let counters = &listener.shared.counters;
    let slot = Arc::new(slot);
    let id = rand::random::<u64>();
    match &listener.tls {
        None => {
            run_http(
                listener,
                tcp,
                peer,
                true,
                slot,
                exchange::ConnInfo { id, tls: None },
            )
            .await
        }
        Some(acceptor) => {
            let handshake = tokio::time::timeout(listener.cfg.idle_timeout, acceptor.accept(tcp));
            match handshake.await {
                Ok(Ok(stream)) => {
                    let session = stream.get_ref().1;
                    let h2 = session.alpn_protocol() == Some(b"h2");
                    let tls = tls_info(&listener, session);
                    let conn = exchange::ConnInfo {
                        id,
                        tls: Some(Arc::new(tls)),
                    };
                    if h2 {
                        // Responses ready in one scheduler pass share a TLS record and a
                        // write (`batch.rs`).
                        let stream = batch::BatchedWrites::new(stream);
                        run_http(listener, stream, peer, false, slot, conn).await;
                    } else {
                        run_http(listener, stream, peer, true, slot, conn).await;
                    }
                }
                Ok(Err(e)) => {
                    L7Counters::add(&counters.client_tls_negotiation_errors, 1);
                    L7Counters::add(&listener.cells.client_tls_errors, 1);
                    tracing::debug!(listener = %listener.cfg.name, %peer, error = %e, "client TLS handshake failed");
                }
                Err(_) => {
                    L7Counters::add(&counters.client_tls_negotiation_errors, 1);
                    L7Counters::add(&listener.cells.client_tls_errors, 1);
                    tracing::debug!(listener = %listener.cfg.name, %peer, "client TLS handshake timed out");
                }
            }
        }
    }
}

/// What the access log records of a client TLS session: cipher and protocol in OpenSSL's
/// names, the SNI name, the certificate chosen.
fn tls_info(listener: &Listener, session: &rustls::ServerConnection) -> TlsInfo {
    let sni = session.server_name().map(str::to_owned);
    let certificate = listener
        .certificates
        .as_ref()
        .and_then(|(resolver, files)| files.get(resolver.choose_index(sni.as_deref())).cloned());
    TlsInfo {
        cipher: session
            .negotiated_cipher_suite()
            .map_or("-", |s| tls::openssl_cipher_name(s.suite())),
        protocol: session.protocol_version().map_or("-", tls::protocol_name),
        sni,
        certificate,
    }
}

/// Serves `io` to its end. The connection's one count of `listener` moves into its context:
/// the listener's count is a line every worker's connections write, once per connection.
async fn run_http<IO>(
    listener: Arc<Listener>,
    io: IO,
    peer: SocketAddr,
    http1: bool,
    slot: Arc<limits::ConnectionSlot>,
    conn: exchange::ConnInfo,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn_shared = sniff::ConnShared::new();
    let io = sniff::Sniffer::new(
        io,
        conn_shared.clone(),
        listener.cfg.desync_mode,
        sniff::Timeouts {
            idle: listener.cfg.idle_timeout,
            header: listener.cfg.header_timeout,
        },
        http1,
    );
    let abuse = Arc::new(abuse::StreamCancellations::default());
    let ctx = Arc::new(pipeline::ConnCtx {
        listener,
        peer,
        forwarded_peer: crate::headers::ForwardedPeer::new(peer.ip()),
        conn: conn_shared,
        slot,
        abuse: abuse.clone(),
        info: conn,
    });
    let listener = &ctx.listener;
    let keepalive = tokio::time::sleep(listener.cfg.client_keepalive);
    tokio::pin!(keepalive);
    // One control loop (keep-alive lifetime, drain, stop, abuse) for the whole connection: the
    // native HTTP/1 part and, after a handoff, hyper carry on with the same timer and state.
    let mut control = ConnControl {
        listener,
        peer,
        abuse: &abuse,
        keepalive: keepalive.as_mut(),
        keepalive_done: false,
        phase: listener.shared.phase.clone(),
        draining: false,
    };
    let mut io = io;
    if http1 && listener.cfg.http1_native {
        // HTTP/1 without hyper (`server/h1.rs`) until a request needs hyper.
        io.set_native();
        let native_control = Arc::new(h1::Control::default());
        let native = h1::serve(ctx.clone(), io, native_control.clone());
        tokio::pin!(native);
        // As hyper's graceful shutdown: close now if idle, else after the current response
        // (`Connection: close`).
        match control
            .run(None, native, |_| native_control.shutdown())
            .await
        {
            Some(h1::Ended::Handoff(handed)) => io = *handed,
            Some(h1::Ended::Closed) | None => return,
        }
    }
    // HTTP/2 streams run in this task, polled with the connection (`server/h2exec.rs`).
    let mut streams = h2exec::Streams::new();
    if listener.cfg.http2_native && io.is_http2() {
        // HTTP/2 without hyper (`server/h2native.rs`).
        let shutdown = Arc::new(h2native::Control::default());
        let conn = h2native::Conn::new(io, ctx.clone(), streams.executor(), shutdown.clone());
        tokio::pin!(conn);
        let ended = control
            .run(Some(&mut streams), conn, |_| {
                shutdown.graceful_shutdown();
                false
            })
            .await;
        control.log_error(ended);
    } else {
        let service_ctx = ctx.clone();
        let service =
            hyper::service::service_fn(move |req| service::Respond::new(&service_ctx, req));
        let http = http_builder(streams.executor());
        let conn = http.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let ended = control
            .run(Some(&mut streams), conn, |conn| {
                conn.graceful_shutdown();
                false
            })
            .await;
        control.log_error(ended);
    }
}

/// The control side of a client connection, native or served by hyper: its keep-alive
/// lifetime, rapid-reset abuse (HTTP/2) and the tier's phase. It outlives a native HTTP/1
/// connection's handoff to hyper: the timer and the drain already acted on carry over.
struct ConnControl<'a> {
    listener: &'a Arc<Listener>,
    peer: SocketAddr,
    abuse: &'a Arc<abuse::StreamCancellations>,
    keepalive: std::pin::Pin<&'a mut tokio::time::Sleep>,
    keepalive_done: bool,
    phase: watch::Receiver<Phase>,
    draining: bool,
}

impl ConnControl<'_> {
    /// Drives `conn` (with its HTTP/2 streams if `streams` is given) until it ends, `Some`
    /// with what it returned, or must be closed, `None`. `shutdown` asks it for a graceful
    /// shutdown (HTTP/1: close after the current response; HTTP/2: GOAWAY, open streams
    /// finish) and says whether to close it now instead (an idle native HTTP/1 connection).
    async fn run<C: h2exec::Driven>(
        &mut self,
        mut streams: Option<&mut h2exec::Streams>,
        mut conn: std::pin::Pin<&mut C>,
        mut shutdown: impl FnMut(std::pin::Pin<&mut C>) -> bool,
    ) -> Option<C::Output> {
        if (self.keepalive_done || self.draining) && shutdown(conn.as_mut()) {
            return None;
        }
        // Armed when the connection is judged abusive: the hard close after GOAWAY.
        let abuse_close = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(abuse_close);
        let mut abusive = false;
        let tripped = self.abuse.tripped();
        tokio::pin!(tripped);
        // The keep-alive timer, the abuse trip, the abuse close and the phase watch are polled
        // only when one of them woke the task (`Woken`), not on every wake-up the
        // connection's I/O and streams cause (`select!` polled all four each time: about 500
        // instructions per HTTP/1.1 request for branches that almost never fire).
        let woken = Woken::new();
        loop {
            let step = {
                let changed = self.phase.changed();
                tokio::pin!(changed);
                woken.set();
                let mut polled = match streams.as_deref_mut() {
                    Some(streams) => Polled::WithStreams(streams.drive(conn.as_mut())),
                    None => Polled::Alone(conn.as_mut()),
                };
                let keepalive_done = self.keepalive_done;
                let keepalive = &mut self.keepalive;
                std::future::poll_fn(|cx| {
                    let ended = match &mut polled {
                        Polled::Alone(conn) => poll_alone(conn.as_mut(), cx),
                        Polled::WithStreams(drive) => std::pin::Pin::new(drive).poll(cx),
                    };
                    if let std::task::Poll::Ready(output) = ended {
                        return std::task::Poll::Ready(ConnStep::Ended(output));
                    }
                    woken.poll_if_woken(cx, |wcx| {
                        if !keepalive_done && keepalive.as_mut().poll(wcx).is_ready() {
                            return std::task::Poll::Ready(ConnStep::KeepAlive);
                        }
                        if !abusive && tripped.as_mut().poll(wcx).is_ready() {
                            return std::task::Poll::Ready(ConnStep::Abusive);
                        }
                        if abusive && abuse_close.as_mut().poll(wcx).is_ready() {
                            return std::task::Poll::Ready(ConnStep::AbuseClose);
                        }
                        changed.as_mut().poll(wcx).map(ConnStep::Phase)
                    })
                })
                .await
            };
            match step {
                ConnStep::Ended(output) => return Some(output),
                ConnStep::KeepAlive => {
                    // Client keep-alive lifetime: finish the current request, then close
                    // (HTTP/1: `Connection: close`; HTTP/2: GOAWAY).
                    self.keepalive_done = true;
                    if shutdown(conn.as_mut()) {
                        return None;
                    }
                }
                ConnStep::Abusive => {
                    abusive = true;
                    let listener = self.listener;
                    L7Counters::add(&listener.shared.counters.http2_abusive_connections, 1);
                    L7Counters::add(&listener.cells.http2_abusive_connections, 1);
                    tracing::warn!(listener = %listener.cfg.name, peer = %self.peer, "client keeps cancelling its HTTP/2 streams (rapid reset): closing the connection");
                    if shutdown(conn.as_mut()) {
                        return None;
                    }
                    abuse_close
                        .as_mut()
                        .reset(tokio::time::Instant::now() + abuse::ABUSE_CLOSE_GRACE);
                }
                ConnStep::AbuseClose => return None,
                ConnStep::Phase(changed) => {
                    match phase_step(changed, &self.phase, &mut self.draining) {
                        PhaseStep::Nothing => {}
                        PhaseStep::Drain => {
                            if shutdown(conn.as_mut()) {
                                return None;
                            }
                        }
                        PhaseStep::Stop => return None,
                    }
                }
            }
        }
    }

    /// Logs a hyper-served or native HTTP/2 connection that ended with an error.
    fn log_error<E: fmt::Display>(&self, ended: Option<Result<(), E>>) {
        if let Some(Err(e)) = ended {
            tracing::debug!(listener = %self.listener.cfg.name, peer = %self.peer, error = %e, "client connection ended with an error");
        }
    }
}

/// A connection as [`ConnControl::run`] polls it: alone (native HTTP/1) or with its HTTP/2
/// streams (`server/h2exec.rs`).
enum Polled<'a, C> {
    Alone(std::pin::Pin<&'a mut C>),
    WithStreams(h2exec::Drive<'a, C>),
}

/// Polls a connection driven alone (native HTTP/1) out of line. Inlined into the control
/// loop's poll, the native connection's future cost about 150 instructions more per HTTP/1.1
/// request: LLVM then left helpers of the request path out of line (callgrind; BENCHMARKS.md,
/// "One connection control loop (stop 26)").
#[inline(never)]
fn poll_alone<C: h2exec::Driven>(
    conn: std::pin::Pin<&mut C>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<C::Output> {
    h2exec::Driven::poll_driven(conn, cx, None)
}

/// What woke a connection's task for good.
enum ConnStep<O> {
    Ended(O),
    KeepAlive,
    Abusive,
    AbuseClose,
    Phase(Result<(), watch::error::RecvError>),
}

/// A waker for a connection's rarely firing futures (timers, watches): it notes that one of
/// them fired, then wakes the task. The task polls them only after such a note, instead of on
/// every wake-up its I/O causes.
struct Woken {
    flag: Arc<WokenFlag>,
    waker: std::task::Waker,
}

struct WokenFlag {
    woken: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl futures_util::task::ArcWake for WokenFlag {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.woken.store(true, Ordering::Release);
        arc_self.task.wake();
    }
}

impl Woken {
    fn new() -> Self {
        let flag = Arc::new(WokenFlag {
            woken: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        let waker = futures_util::task::waker(flag.clone());
        Self { flag, waker }
    }

    /// Marks the futures as due a poll (a new one that has never registered its waker).
    fn set(&self) {
        self.flag.woken.store(true, Ordering::Release);
    }

    /// Runs `poll` with this waker if one of its futures fired since the last run (or
    /// [`Self::set`] was called); `Pending` otherwise. The task's own waker is registered
    /// first, so a firing in between wakes the task again.
    #[inline]
    fn poll_if_woken<T>(
        &self,
        cx: &mut std::task::Context<'_>,
        poll: impl FnOnce(&mut std::task::Context<'_>) -> std::task::Poll<T>,
    ) -> std::task::Poll<T> {
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Pending;
        }
        poll(&mut std::task::Context::from_waker(&self.waker))
    }
}

/// What a change of the tier's phase asks of one client connection.
enum PhaseStep {
    Nothing,
    /// Close at the next request boundary (the first time the tier drains).
    Drain,
    /// Close now.
    Stop,
}

/// Reads a phase change for a connection's loop, native or hyper; `draining` remembers that
/// the drain was already acted on.
fn phase_step(
    changed: Result<(), watch::error::RecvError>,
    phase: &watch::Receiver<Phase>,
    draining: &mut bool,
) -> PhaseStep {
    let now = if changed.is_err() {
        Phase::Stopped
    } else {
        *phase.borrow()
    };
    match now {
        Phase::Running => PhaseStep::Nothing,
        Phase::Draining if !*draining => {
            *draining = true;
            PhaseStep::Drain
        }
        Phase::Draining => PhaseStep::Nothing,
        Phase::Stopped => PhaseStep::Stop,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_placement_knob_takes_0_to_63_and_refuses_anything_else_naming_the_variable() {
        assert_eq!(parse_placement(None), Ok(0));
        assert_eq!(parse_placement(Some("0")), Ok(0));
        assert_eq!(parse_placement(Some("19")), Ok(19));
        assert_eq!(parse_placement(Some("63")), Ok(63));
        for junk in ["64", "255", "-1", "", "x", "5k", "1.5"] {
            let e = parse_placement(Some(junk)).expect_err(junk);
            assert_eq!(e.value, junk);
            let said = e.to_string();
            assert!(
                said.contains("LB_PLACEMENT") && said.contains("0 to 63"),
                "{said}"
            );
        }
    }

    #[test]
    fn a_placement_runs_the_worker_runtime_at_least_n_lines_deeper_in_its_stack() {
        // Both runs on one thread, so the only difference is the depth.
        let local_in_runtime = |n: u8| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            placed_deeper(n, || {
                runtime.block_on(async {
                    let local = std::hint::black_box(0u8);
                    std::hint::black_box(&local) as *const u8 as usize
                })
            })
        };
        let at_0 = local_in_runtime(0);
        for n in [1u8, 5, 37] {
            let at_n = local_in_runtime(n);
            assert!(
                at_0 >= at_n + usize::from(n) * 64,
                "placement {n}: a local at {at_n:#x}, at placement 0 {at_0:#x}"
            );
        }
    }

    use super::*;

    /// A waker that counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);
    impl futures_util::task::ArcWake for Count {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn woken_polls_its_futures_only_after_their_waker_fired_or_a_set() {
        let task = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let task_waker = futures_util::task::waker(task.clone());
        let mut cx = std::task::Context::from_waker(&task_waker);
        let woken = Woken::new();
        let mut polls = 0;
        let mut inner_waker = None;
        let mut poll = |woken: &Woken, cx: &mut std::task::Context<'_>| {
            woken.poll_if_woken(cx, |wcx| {
                polls += 1;
                inner_waker = Some(wcx.waker().clone());
                std::task::Poll::<()>::Pending
            })
        };
        // Positive control: a new `Woken` polls at once (its futures must register).
        assert!(poll(&woken, &mut cx).is_pending());
        // Task wake-ups from elsewhere (the I/O) do not poll the futures again.
        assert!(poll(&woken, &mut cx).is_pending());
        assert!(poll(&woken, &mut cx).is_pending());
        assert_eq!(polls, 1, "polled once, on the first call only");
        // A future fires: the task is woken, and the next call polls.
        inner_waker.take().expect("registered").wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "the task was woken");
        let mut poll = |woken: &Woken, cx: &mut std::task::Context<'_>| {
            woken.poll_if_woken(cx, |_| {
                polls += 1;
                std::task::Poll::<()>::Pending
            })
        };
        assert!(poll(&woken, &mut cx).is_pending());
        assert!(poll(&woken, &mut cx).is_pending());
        // `set` (a new future to register) polls once more.
        woken.set();
        assert!(poll(&woken, &mut cx).is_pending());
        assert_eq!(polls, 3, "once after the wake, once after set");
    }

    #[test]
    fn http_listener_gets_aws_defaults() {
        let l = parse_listener("web=http://127.0.0.1:8080").expect("parses");
        assert_eq!(l.name, "web");
        assert_eq!(l.protocol, ListenerProtocol::Http);
        assert_eq!(l.bind, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(l.idle_timeout, Duration::from_secs(60));
        assert_eq!(l.client_keepalive, Duration::from_secs(3600));
        assert_eq!(l.xff, XffMode::Append);
        assert_eq!(l.desync_mode, DesyncMode::Defensive);
        assert!(l.certificates.is_empty());
        assert_eq!(l.header_timeout, Duration::from_secs(60));
        assert_eq!(l.max_connections, None);
        assert_eq!(l.max_connections_per_source, None);
    }

    #[test]
    fn http1_and_http2_pick_their_server() {
        let l = parse_listener("web=http://127.0.0.1:80").expect("parses");
        assert!(l.http1_native && l.http2_native, "native by default");
        let l = parse_listener("web=http://127.0.0.1:80,http2=hyper").expect("parses");
        assert!(l.http1_native && !l.http2_native);
        let l = parse_listener("web=http://127.0.0.1:80,http1=hyper,http2=native").expect("parses");
        assert!(!l.http1_native && l.http2_native);
        let l = parse_listener("web=http://127.0.0.1:80,http1=lean").expect("parses");
        assert!(
            l.http1_lean && l.http1_native,
            "lean hands over to the native path"
        );
        assert!(
            !parse_listener("web=http://127.0.0.1:80,http1=native")
                .unwrap()
                .http1_lean
        );
        let err = parse_listener("tls=https://127.0.0.1:443,cert=a.pem:a.key,http1=lean")
            .expect_err("lean on TLS")
            .to_string();
        assert!(err.contains("plain http listeners only"), "{err}");
        let err = parse_listener("web=http://127.0.0.1:80,http2=lean")
            .expect_err("no lean HTTP/2")
            .to_string();
        assert!(err.contains("native or hyper"), "{err}");
        let err = parse_listener("web=http://127.0.0.1:80,http2=nghttp2")
            .expect_err("unknown server")
            .to_string();
        assert!(
            err.contains("http2") && err.contains("native or hyper"),
            "{err}"
        );
    }

    #[test]
    fn header_timeout_takes_fractions_and_limits_take_counts() {
        let l = parse_listener(
            "web=http://127.0.0.1:80,header-timeout=0.5,max-connections=1000,max-connections-per-source=20",
        )
        .expect("parses");
        assert_eq!(l.header_timeout, Duration::from_millis(500));
        assert_eq!(l.max_connections, Some(1000));
        assert_eq!(l.max_connections_per_source, Some(20));
        let l = parse_listener("web=http://127.0.0.1:80,header-timeout=30").expect("parses");
        assert_eq!(l.header_timeout, Duration::from_secs(30));
    }

    #[test]
    fn https_listener_with_certificates_and_options() {
        let l = parse_listener(
            "secure=https://[::1]:8443,cert=/c/a.pem:/c/a.key,cert=/c/b.pem:/c/b.key,idle-timeout=120,keepalive=600,xff=remove,desync=strictest",
        )
        .expect("parses");
        assert_eq!(l.protocol, ListenerProtocol::Https);
        assert_eq!(l.bind, "[::1]:8443".parse().expect("addr"));
        assert_eq!(l.certificates.len(), 2);
        assert_eq!(l.certificates[1].cert, PathBuf::from("/c/b.pem"));
        assert_eq!(l.certificates[1].key, PathBuf::from("/c/b.key"));
        assert_eq!(l.idle_timeout, Duration::from_secs(120));
        assert_eq!(l.client_keepalive, Duration::from_secs(600));
        assert_eq!(l.xff, XffMode::Remove);
        assert_eq!(l.desync_mode, DesyncMode::Strictest);
    }

    #[test]
    fn errors_name_the_bad_part() {
        let cases = [
            ("http://1.2.3.4:80", "expected NAME="),
            ("web=ftp://1.2.3.4:80", "unknown scheme"),
            ("web=http://1.2.3.4", "bad address"),
            ("web=http://1.2.3.4:80,idle-timeout=0", "idle-timeout"),
            ("web=http://1.2.3.4:80,idle-timeout=4001", "1..=4000"),
            ("web=http://1.2.3.4:80,keepalive=abc", "keepalive"),
            ("web=http://1.2.3.4:80,xff=sometimes", "xff"),
            ("web=http://1.2.3.4:80,desync=lenient", "desync"),
            (
                "web=http://1.2.3.4:80,colour=blue",
                "unknown option \"colour\"",
            ),
            ("web=http://1.2.3.4:80,cert=a:b", "only applies to https"),
            ("web=https://1.2.3.4:443", "needs at least one cert"),
            ("web=https://1.2.3.4:443,cert=nokey", "CERT.pem:KEY.pem"),
            ("web=http://1.2.3.4:80,header-timeout=0", "header-timeout"),
            ("web=http://1.2.3.4:80,header-timeout=-1", "header-timeout"),
            ("web=http://1.2.3.4:80,header-timeout=NaN", "header-timeout"),
            ("web=http://1.2.3.4:80,header-timeout=inf", "header-timeout"),
            ("web=http://1.2.3.4:80,header-timeout=4001", "at most 4000"),
            (
                "web=http://1.2.3.4:80,header-timeout=soon",
                "header-timeout",
            ),
            ("web=http://1.2.3.4:80,max-connections=0", "max-connections"),
            (
                "web=http://1.2.3.4:80,max-connections=-5",
                "max-connections",
            ),
            (
                "web=http://1.2.3.4:80,max-connections-per-source=lots",
                "max-connections-per-source",
            ),
        ];
        for (spec, needle) in cases {
            let err = parse_listener(spec).expect_err(spec).to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
        let many = (0..27)
            .map(|i| format!(",cert=c{i}.pem:k{i}.pem"))
            .collect::<String>();
        let err = parse_listener(&format!("web=https://1.2.3.4:443{many}"))
            .expect_err("27 certificates")
            .to_string();
        assert!(err.contains("27 certificates"), "{err}");
    }

    /// A request finds its forward action's group in its rule set, resolved when the rule
    /// set was stored: every change of the groups or of the rules stores rule sets resolved
    /// against the groups of that moment (a group replaced, removed or added again), as the
    /// lookup by name per request found them.
    #[tokio::test]
    async fn rule_sets_are_resolved_against_the_groups_of_every_change() {
        use crate::rules::{Action, ForwardAction, WeightedGroup};
        use crate::targets::parse_target_group;
        let forward_web = || {
            let action = ForwardAction::new(
                vec![WeightedGroup {
                    name: "web".into(),
                    weight: 1,
                }],
                None,
            )
            .expect("valid forward");
            RuleSet::new(Vec::new(), Action::Forward(action)).expect("valid rules")
        };
        let group = || Arc::new(TargetGroup::new(parse_target_group("web").expect("group")));
        let groups = |g: &Arc<TargetGroup>| Groups::from_iter([("web".to_owned(), g.clone())]);
        // The group the listener's rule set resolved "web" to (`None`: no such group).
        let resolved = |handle: &L7Handle| {
            let rules = handle.rules["web"].load_full();
            let headers = http::HeaderMap::new();
            let view = crate::rules::RequestView {
                method: "GET",
                host: None,
                path: "/",
                query: None,
                headers: &headers,
                source_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            };
            match rules.evaluate(&view).action {
                crate::rules::ResolvedAction::Forward(f) => f.group(0).map(|(g, _)| Arc::clone(g)),
                _ => None,
            }
        };
        let same = |a: Option<Arc<TargetGroup>>, b: &Arc<TargetGroup>| {
            a.is_some_and(|a| Arc::ptr_eq(&a, b))
        };
        let first = group();
        let cfg = L7Config::one_listener(
            "web",
            "127.0.0.1:0".parse().unwrap(),
            forward_web(),
            groups(&first),
        );
        let running = start(cfg).await.expect("listener starts");
        let handle = running.handle();
        assert!(same(resolved(&handle), &first), "at start");
        let second = group();
        handle.set_groups(groups(&second));
        assert!(
            same(resolved(&handle), &second),
            "after the group was replaced"
        );
        handle.set_groups(Groups::default());
        assert!(resolved(&handle).is_none(), "after the group was removed");
        let third = group();
        handle.set_groups(groups(&third));
        assert!(same(resolved(&handle), &third), "after it came back");
        assert!(handle.set_rules("web", Arc::new(forward_web())));
        assert!(
            same(resolved(&handle), &third),
            "new rules, resolved on store"
        );
        running.shutdown(Duration::ZERO).await.expect("shutdown");
    }

    /// A request waiting for its target holds no count of what every connection shares: the
    /// rule set (its routing's guard is gone before the forward is awaited), the listener and
    /// the target group (its record holds the connection's context and the pick's target
    /// entry). Each such count is a line that both workers' requests write. Held across the
    /// await, every guard beyond a thread's eight arc_swap slots took the rule set's count, so
    /// 40 requests waiting on two workers raised it by at least 24; a record holding clones of
    /// the listener and the group raised theirs by 40. Positive controls: 40 guards held on one
    /// thread raise the rule set's count by at least 32, and the 40 connections (each holds
    /// the listener) raised the listener's by 40.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_waiting_for_their_target_hold_no_count_of_what_connections_share() {
        use crate::rules::{Action, ForwardAction, WeightedGroup};
        use crate::targets::{TargetAddr, parse_target_group};
        use std::sync::atomic::AtomicUsize;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const WAITING: usize = 40;
        // The target: reads each request's head, counts it, and never answers.
        let target = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
        let target_addr = target.local_addr().expect("target addr");
        let heads = Arc::new(AtomicUsize::new(0));
        let counted = heads.clone();
        let target_task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut conn, _)) = target.accept().await else {
                    return;
                };
                let counted = counted.clone();
                held.push(tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    // Held open, unanswered, until the test ends.
                    let _ = conn.read(&mut buf).await;
                }));
            }
        });
        let forward = ForwardAction::new(
            vec![WeightedGroup {
                name: "web".into(),
                weight: 1,
            }],
            None,
        )
        .expect("valid forward");
        let rules = RuleSet::new(Vec::new(), Action::Forward(forward)).expect("valid rules");
        let group = Arc::new(TargetGroup::new(parse_target_group("web").expect("group")));
        group.register(TargetAddr::new(target_addr));
        let web = group.clone();
        let cfg = L7Config::one_listener(
            "web",
            "127.0.0.1:0".parse().unwrap(),
            rules,
            Groups::from_iter([("web".to_owned(), group)]),
        );
        let running = start(cfg).await.expect("listener starts");
        let lb_addr = running.addrs[0].1;
        let handle = running.handle();
        let slot = handle.rules["web"].clone();
        // The rule set's count: the slot's own and the one taken here to read it.
        let count = || Arc::strong_count(&slot.load_full()) - 1;
        let idle = count();
        let listener = handle.listeners[0].clone();
        let listener_idle = Arc::strong_count(&listener);
        let open = || handle.worker_counts().iter().map(|w| w.open).sum::<u64>();
        let mut clients = Vec::new();
        for _ in 0..WAITING {
            clients.push(
                tokio::net::TcpStream::connect(lb_addr)
                    .await
                    .expect("connect to lb"),
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while open() < WAITING as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {WAITING} connections open",
                open()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The connections are served (each holds the listener, taken before it is counted
        // open), no request has come yet. Waited for, not read once: the open count and the
        // listener's are two atomics, read without an order between them.
        while Arc::strong_count(&listener) < listener_idle + WAITING {
            assert!(
                std::time::Instant::now() < deadline,
                "{WAITING} connections raised the listener's count from {listener_idle} to {} \
                 only",
                Arc::strong_count(&listener)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let listener_connected = Arc::strong_count(&listener);
        let group_connected = Arc::strong_count(&web);
        for c in &mut clients {
            c.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                .await
                .expect("send request");
        }
        while heads.load(Ordering::SeqCst) < WAITING {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {WAITING} requests reached the target",
                heads.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // All three compared at once, so a failure shows every count that moved.
        let waiting = (
            count(),
            Arc::strong_count(&listener),
            Arc::strong_count(&web),
        );
        assert_eq!(
            waiting,
            (idle, listener_connected, group_connected),
            "counts of the rule set, the listener and the group with {WAITING} requests \
             waiting for their target, against before the requests"
        );
        // The control: guards held past a thread's slots do show in the count.
        let guards: Vec<_> = (0..WAITING).map(|_| slot.load()).collect();
        assert!(
            count() >= idle + WAITING - 8,
            "{WAITING} guards on one thread raised the count from {idle} to {} only",
            count()
        );
        drop(guards);
        drop(clients);
        running.shutdown(Duration::ZERO).await.expect("shutdown");
        target_task.abort();
    }

    #[tokio::test]
    async fn bind_errors_name_the_listener() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        let cfg = L7Config::one_listener("busy", addr, L7Config::fixed_200(), Groups::default());
        let err = start(cfg).await.err().expect("address in use");
        assert!(format!("{err:#}").contains("listener busy"), "{err:#}");
    }
}
