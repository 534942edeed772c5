//! `cargo xtask bench l7 [--quick]`: `lb` beside HAProxy and nginx as L7 proxies, on loopback,
//! in one run, rounds alternating A B C.
//!
//! One nginx backend answers every request with a 100-byte body (keep-alive). Each proxy
//! listens for HTTP/1.1 and for HTTPS (ECDSA P-256, ALPN h2 and http/1.1) and forwards to
//! the backend over pooled keep-alive connections, access logs off, at its default
//! worker/thread count (all three use both cores). Figures:
//!
//! - HTTP/1.1 keep-alive (`wrk -t1 -c64`): requests/s, requests per proxy CPU-second, p50/p99;
//! - HTTP/2 over TLS (`h2load -c32 -m10`): requests/s and per proxy CPU-second;
//! - full TLS handshakes, one HTTP/1.0 request per connection, per proxy CPU-second: 32
//!   `openssl s_time -new` clients at once, each making one connection after another with a
//!   new session every time (no resumption);
//! - resumed TLS connections, one request each (`wrk -c32 -H 'Connection: close'` over
//!   HTTPS), per proxy CPU-second: wrk keeps its previous connection's session (`SSL_clear`)
//!   and offers its TLS 1.3 ticket, so after the first connection every proxy resumes (PSK
//!   with a fresh X25519 exchange: no certificate, no signature);
//! - `lb`'s resident memory idle and after the keep-alive run;
//! - `lb+log`: `lb` again with its ALB-format access log on (written to a file), so the cost
//!   of logging shows beside `lb` without it (counting is always on).
//!
//! `--only h1,h2,handshakes,resumed` (any of them) measures those figures only (same peers,
//! same rounds); `--baseline PATH` runs another `lb` binary as `lb-base` in every round, so two
//! builds compare in one run; `--rounds N` runs N alternating rounds instead of 3 (1 with
//! `--quick`), each of the same length. The rounds' orders form a balanced Latin square
//! (`round_order`, Williams' design): over as many rounds as there are proxies each proxy runs
//! in each position once and before each other proxy as often as after it (once more at most,
//! for an odd count), and over a whole period (as many rounds, or twice as many for an odd
//! count) right before each other proxy equally often. So neither a place in the round nor a
//! neighbour (a warmer backend, a page cache, the VM's own rhythm) belongs to one proxy: with
//! `--baseline`, `lb` and `lb-base` take turns in running first. `--pin` binds every proxy's
//! workers one per CPU ([`Pinning`]: `lb`'s per-worker runtime with `--l7-cpu-affinity auto`,
//! HAProxy's `cpu-map`, nginx's `worker_cpu_affinity auto`); the client and the backend stay
//! unbound.
//!
//! A proxy's CPU time (user and system) is read from `/proc` for every process of it (nginx:
//! master and workers) before and after each run. Ratios within a round are the headline; rounds give
//! the spread. Peers' settings are written out in BENCHMARKS.md.
use std::collections::BTreeMap;

use crate::median;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

pub(crate) const BACKEND: &str = "127.0.0.1:18080";
/// TLS 1.3 suites in ALB's order, chosen by the server (as `lb` does): HAProxy and nginx are
/// told the same, so every proxy negotiates AES-128-GCM-SHA256 with an OpenSSL client that
/// would prefer AES-256 (HAProxy enforces its own order by default; nginx is told to).
const SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
/// The backend's answer: exactly 100 bytes.
const BODY: &str = "lb-bench-response-body-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdefghijklmnopqrstuvwxyz-01";

/// One proxy under test: where it listens.
struct Proxy {
    name: &'static str,
    http: u16,
    https: u16,
}

const PROXIES: [Proxy; 4] = [
    Proxy {
        name: "lb",
        http: 18081,
        https: 18441,
    },
    // lb again, with its ALB-format access log written to a file: what logging costs.
    Proxy {
        name: "lb+log",
        http: 18084,
        https: 18444,
    },
    Proxy {
        name: "haproxy",
        http: 18082,
        https: 18442,
    },
    Proxy {
        name: "nginx",
        http: 18083,
        https: 18443,
    },
];

/// With `--baseline PATH`: that other `lb` binary, run in every round.
const BASELINE: Proxy = Proxy {
    name: "lb-base",
    http: 18085,
    https: 18445,
};

/// What `cargo xtask bench l7` was asked for.
pub struct Options {
    /// One short round instead of three long ones.
    pub quick: bool,
    /// These figures only.
    pub only: Option<Vec<Figure>>,
    /// Another `lb` binary to run beside the built one (`lb-base`).
    pub baseline: Option<PathBuf>,
    /// Rounds instead of the default (3, or 1 with `quick`).
    pub rounds: Option<usize>,
    /// `lb` is the profile-guided build (only printed with the command line).
    pub pgo: bool,
    /// Every proxy's workers bound one per CPU ([`Pinning`]).
    pub pin: bool,
    /// `lb` serves its HTTP listener on the lean HTTP/1.1 path (`http1=lean`), and `lb-base`
    /// (the same binary unless `--baseline` names another) on the native path, both with the
    /// per-worker runtime.
    pub lean: bool,
}

/// `--pin`: the settings that bind each proxy's workers one per CPU of those the bench may
/// use (`Cpus_allowed_list`), in order. The client (wrk, h2load, s_time) and the backend stay
/// unbound.
struct Pinning {
    /// The CPUs, as `0-1` or `0,2-3`.
    cpus: String,
    /// How many.
    count: usize,
}

impl Pinning {
    fn of_this_process() -> anyhow::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .context("no Cpus_allowed_list in /proc/self/status")?
            .trim()
            .to_owned();
        let count = std::thread::available_parallelism()?.get();
        Ok(Self { cpus, count })
    }

    /// `lb run` flags.
    fn lb_flags() -> [&'static str; 6] {
        [
            "--l7-runtime",
            "per-worker",
            "--l7-accept",
            "balanced",
            "--l7-cpu-affinity",
            "auto",
        ]
    }

    /// HAProxy `global` lines: its threads (one per CPU, its default) bound in order.
    fn haproxy_global(&self) -> String {
        format!(
            "  nbthread {n}\n  cpu-map auto:1/1-{n} {cpus}\n",
            n = self.count,
            cpus = self.cpus.replace(',', " ")
        )
    }

    /// nginx main-context line.
    fn nginx_main() -> &'static str {
        "worker_cpu_affinity auto;\n"
    }
}

/// `--rounds`: a whole number of rounds, at least 1 (clap names the flag in its error).
pub fn parse_rounds(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("at least 1 round is needed, not 0".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "a whole number of rounds (1, 2, …) is needed, not {text:?}"
        )),
    }
}

/// Run lengths.
struct Plan {
    rounds: usize,
    seconds: u64,
}

/// A started process (and, for nginx, its workers), killed on drop.
pub(crate) struct Running {
    child: Child,
}

impl Running {
    fn pids(&self) -> Vec<u32> {
        let root = self.child.id();
        let mut pids = vec![root];
        // nginx's workers are children of the master.
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if ppid(pid) == Some(root) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// (user, system) CPU seconds of the process and its children processes.
    fn cpu_seconds(&self) -> (f64, f64) {
        self.pids()
            .into_iter()
            .map(cpu_of)
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Resident memory of the main process, in MiB.
    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

impl Running {
    /// SIGTERM (so nginx, HAProxy and lb exit cleanly), then up to `grace` for the exit: its
    /// status, or `None` while it still runs. A child already reaped is not signalled again:
    /// its pid may belong to another process by now.
    fn sigterm_and_wait(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, then wait up to `grace` for the exit; an error if it did not (the drop then
    /// kills it).
    pub(crate) fn terminate(mut self, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
        match self.sigterm_and_wait(grace) {
            Some(status) => Ok(status),
            None => bail!(
                "process {} still running {} s after SIGTERM",
                self.child.id(),
                grace.as_secs()
            ),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.sigterm_and_wait(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// (user, system) CPU seconds of one process.
fn cpu_of(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return (0.0, 0.0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; here, after the name, 12 and 13 (0-based 11, 12).
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) / hz, ticks(12) / hz)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the peers and load generators from Debian when they are missing.
pub(crate) fn ensure_tools() -> anyhow::Result<()> {
    let wanted = [
        ("haproxy", "haproxy"),
        ("nginx", "nginx"),
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
        ("openssl", "openssl"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} (apt-get)", missing.join(" "));
    let ok = Command::new("sh")
        .args([
            "-c",
            &format!(
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                 --no-install-recommends {}",
                missing.join(" ")
            ),
        ])
        .status()
        .context("running apt-get")?
        .success();
    ensure!(ok, "installing {} failed", missing.join(" "));
    // The nginx package starts a system service; the bench runs its own instances.
    let _ = Command::new("sh")
        .args(["-c", "service nginx stop >/dev/null 2>&1 || true"])
        .status();
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// An ECDSA P-256 certificate for 127.0.0.1: (cert, key, cert+key for HAProxy).
pub(crate) fn certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let (cert, key, both) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("both.pem"),
    );
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .context("running openssl")?
        .success();
    ensure!(ok, "openssl could not make a certificate");
    let mut combined = std::fs::read_to_string(&cert)?;
    combined.push_str(&std::fs::read_to_string(&key)?);
    write(&both, &combined)?;
    Ok((cert, key, both))
}

pub(crate) fn spawn(what: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Running> {
    let log = std::fs::File::create(log)?;
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    Ok(Running { child })
}

pub(crate) fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on 127.0.0.1:{port} after 10 s")
}

pub(crate) fn nginx_backend(dir: &Path) -> anyhow::Result<Running> {
    let conf = dir.join("backend.conf");
    write(
        &conf,
        &format!(
            "worker_processes 1;\ndaemon off;\npid {d}/backend.pid;\nerror_log {d}/backend-error.log;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
               server {{\n    listen {BACKEND} backlog=4096;\n    default_type text/plain;\n\
                 location / {{ return 200 \"{BODY}\"; }}\n  }}\n}}\n",
            d = dir.display()
        ),
    )?;
    let r = spawn(
        "the nginx backend",
        Command::new("nginx")
            .args(["-c"])
            .arg(&conf)
            .args(["-p"])
            .arg(dir),
        &dir.join("backend.log"),
    )?;
    wait_port(18080)?;
    Ok(r)
}

fn start_proxy(
    p: &Proxy,
    dir: &Path,
    lb: &Path,
    certs: &(PathBuf, PathBuf, PathBuf),
    pin: Option<&Pinning>,
    lean: bool,
) -> anyhow::Result<Running> {
    let (cert, key, both) = certs;
    let r = match p.name {
        "lb" | "lb+log" | "lb-base" => {
            let mut args: Vec<String> = [
                "run".to_owned(),
                "--listener".to_owned(),
                format!(
                    "web=http://127.0.0.1:{}{}",
                    p.http,
                    if lean && p.name == "lb" {
                        ",http1=lean"
                    } else {
                        ""
                    }
                ),
                "--listener".to_owned(),
                format!(
                    "tls=https://127.0.0.1:{},cert={}:{}",
                    p.https,
                    cert.display(),
                    key.display()
                ),
                "--target-group".to_owned(),
                "be,health-check=off".to_owned(),
                "--target".to_owned(),
                format!("be={BACKEND}"),
                "--rule".to_owned(),
                "web,default,forward=be".to_owned(),
                "--rule".to_owned(),
                "tls,default,forward=be".to_owned(),
                "--admin-socket".to_owned(),
                dir.join(format!("{}-admin.sock", p.http))
                    .display()
                    .to_string(),
            ]
            .into();
            if p.name == "lb+log" {
                args.push("--access-log".to_owned());
                args.push(dir.join("access.log").display().to_string());
            }
            if pin.is_some() {
                args.extend(Pinning::lb_flags().map(str::to_owned));
            } else if lean {
                args.extend(["--l7-runtime".to_owned(), "per-worker".to_owned()]);
            }
            spawn(p.name, Command::new(lb).args(&args), &dir.join("lb.log"))?
        }
        "haproxy" => {
            let conf = dir.join("haproxy.cfg");
            write(
                &conf,
                &format!(
                    "global\n  maxconn 8000\n  tune.ssl.default-dh-param 2048\n  ssl-default-bind-ciphersuites {SUITES}\n{pin}\
                     defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n\
                     frontend fe_http\n  bind 127.0.0.1:{http}\n  default_backend be\n\
                     frontend fe_https\n  bind 127.0.0.1:{https} ssl crt {both} alpn h2,http/1.1\n  default_backend be\n\
                     backend be\n  server s1 {BACKEND}\n",
                    http = p.http,
                    https = p.https,
                    both = both.display(),
                    pin = pin.map_or(String::new(), Pinning::haproxy_global)
                ),
            )?;
            spawn(
                "haproxy",
                Command::new("haproxy").args(["-db", "-f"]).arg(&conf),
                &dir.join("haproxy.log"),
            )?
        }
        _ => {
            let conf = dir.join("nginx-proxy.conf");
            write(
                &conf,
                &format!(
                    "worker_processes auto;\n{pin}daemon off;\npid {d}/proxy.pid;\nerror_log {d}/proxy-error.log;\n\
                     events {{ worker_connections 16384; }}\n\
                     http {{\n  access_log off;\n  keepalive_requests 100000000;\n\
                       upstream be {{ server {BACKEND}; keepalive 256; }}\n\
                       server {{\n    listen 127.0.0.1:{http} backlog=4096;\n    listen 127.0.0.1:{https} ssl http2 backlog=4096;\n\
                         ssl_certificate {c};\n    ssl_certificate_key {k};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_prefer_server_ciphers on;\n    ssl_conf_command Ciphersuites {SUITES};\n\
                         location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
                    pin = if pin.is_some() {
                        Pinning::nginx_main()
                    } else {
                        ""
                    },
                    d = dir.display(),
                    http = p.http,
                    https = p.https,
                    c = cert.display(),
                    k = key.display()
                ),
            )?;
            spawn(
                "nginx (proxy)",
                Command::new("nginx")
                    .args(["-c"])
                    .arg(&conf)
                    .args(["-p"])
                    .arg(dir),
                &dir.join("nginx-proxy.log"),
            )?
        }
    };
    wait_port(p.http)?;
    wait_port(p.https)?;
    Ok(r)
}

/// One load run's result.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    pub(crate) rps: f64,
    per_cpu_s: f64,
    /// The proxy's user and system CPU time per request, in µs.
    user_us: f64,
    sys_us: f64,
    p50_ms: f64,
    p99_ms: f64,
    pub(crate) errors: u64,
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().context("running the load generator")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "load generator failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// `wrk` latency like `1.23ms`, `850.00us`, `2.01s` → ms.
fn wrk_ms(s: &str) -> f64 {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mult
}

pub(crate) fn run_wrk(url: &str, conns: u32, seconds: u64, close: bool) -> anyhow::Result<Sample> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let text = output(cmd.arg(url))?;
    let mut s = Sample::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["Requests/sec:", v] => s.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => s.p50_ms = wrk_ms(v),
            ["99%", v] => s.p99_ms = wrk_ms(v),
            ["Non-2xx", "or", "3xx", "responses:", v] => s.errors += v.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", ..] => {
                s.errors += w
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    ensure!(s.rps > 0.0, "could not read wrk's output:\n{text}");
    Ok(s)
}

fn run_h2load(url: &str, seconds: u64) -> anyhow::Result<Sample> {
    run_h2load_urls(&[url], seconds)
}

/// `h2load -c32 -m10` for `seconds`; with several URLs (same scheme, host and port), each
/// client's requests go to them in turn.
pub(crate) fn run_h2load_urls(urls: &[&str], seconds: u64) -> anyhow::Result<Sample> {
    let text = output(
        Command::new("h2load")
            .args([
                "-c32",
                "-m10",
                "-t1",
                "-D",
                &seconds.to_string(),
                "--warm-up-time=1",
            ])
            .args(urls),
    )?;
    let mut s = Sample::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("finished in") {
            // "finished in 10.00s, 51234.50 req/s, 4.56MB/s"
            s.rps = rest
                .split(',')
                .nth(1)
                .and_then(|v| v.trim().strip_suffix(" req/s"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
        }
        if let Some(rest) = line.strip_prefix("requests:") {
            // "requests: 512345 total, 512345 started, 512345 done, 512345 succeeded, 0 failed, 0 errored, 0 timeout"
            for part in rest.split(',') {
                let w: Vec<&str> = part.split_whitespace().collect();
                if let [n, "failed" | "errored" | "timeout"] = w.as_slice() {
                    s.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    ensure!(s.rps > 0.0, "could not read h2load's output:\n{text}");
    Ok(s)
}

/// Full handshakes: `clients` `openssl s_time -new` processes at once against the HTTPS
/// listener on `port`, each connecting, sending `GET / HTTP/1.0` and reading the response
/// until the proxy closes, one connection after another for `seconds`, with a new session
/// every time (`-new`: no resumption). A connection that read less than the backend's body
/// counts as an error.
pub(crate) fn run_s_time(port: u16, clients: u32, seconds: u64) -> anyhow::Result<Sample> {
    let children = (0..clients)
        .map(|_| {
            Command::new("openssl")
                .args([
                    "s_time",
                    "-connect",
                    &format!("127.0.0.1:{port}"),
                    "-new",
                    "-www",
                    "/",
                    "-time",
                    &seconds.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("running openssl s_time")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut s = Sample::default();
    let mut connections = 0u64;
    for child in children {
        let out = child
            .wait_with_output()
            .context("waiting for openssl s_time")?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "openssl s_time failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // "806 connections in 3 real seconds, 223 bytes read per connection"
        let line = text
            .lines()
            .find(|l| l.contains("connections in") && l.contains("real seconds"))
            .with_context(|| format!("could not read openssl s_time's output:\n{text}"))?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let n: u64 = w.first().and_then(|v| v.parse().ok()).unwrap_or(0);
        let per_conn: usize = w
            .iter()
            .position(|x| *x == "bytes")
            .and_then(|i| w.get(i.checked_sub(1)?)?.trim_end_matches(',').parse().ok())
            .unwrap_or(0);
        if per_conn < BODY.len() {
            s.errors += n.max(1);
        }
        connections += n;
    }
    // `measure` counts rps × seconds requests against the CPU time spent.
    s.rps = connections as f64 / seconds as f64;
    ensure!(s.rps > 0.0, "openssl s_time made no connection");
    Ok(s)
}

/// The TLS version, cipher suite and key-exchange group an OpenSSL client (`openssl s_client`, as wrk's OpenSSL
/// offers them) negotiates with the proxy listening on `port`.
fn negotiated(port: u16) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-brief",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(Stdio::null())
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?", str::trim)
            .to_owned()
    };
    let group = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("Peer Temp Key:")
                .or_else(|| l.strip_prefix("Server Temp Key:"))
        })
        .map_or("?", str::trim)
        .to_owned();
    format!(
        "{} {}, key exchange {group}",
        field("Protocol version:"),
        field("Ciphersuite:")
    )
}

/// A figure measured per proxy per round.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Figure {
    H1KeepAlive,
    H2Tls,
    Handshakes,
    Resumed,
}

impl Figure {
    const ALL: [Figure; 4] = [
        Figure::H1KeepAlive,
        Figure::H2Tls,
        Figure::Handshakes,
        Figure::Resumed,
    ];

    /// `--only`'s names: `h1`, `h2`, `handshakes`, `resumed`.
    pub fn parse(name: &str) -> anyhow::Result<Figure> {
        Ok(match name {
            "h1" => Figure::H1KeepAlive,
            "h2" => Figure::H2Tls,
            "handshakes" => Figure::Handshakes,
            "resumed" => Figure::Resumed,
            _ => bail!("--only takes h1, h2, handshakes or resumed, not {name:?}"),
        })
    }

    fn short(self) -> &'static str {
        match self {
            Figure::H1KeepAlive => "h1",
            Figure::H2Tls => "h2",
            Figure::Handshakes => "handshakes",
            Figure::Resumed => "resumed",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Figure::H1KeepAlive => "HTTP/1.1 keep-alive (wrk -t1 -c64)",
            Figure::H2Tls => "HTTP/2 over TLS (h2load -c32 -m10)",
            Figure::Handshakes => {
                "full TLS handshakes, 1 request each (32 × openssl s_time -new, HTTP/1.0)"
            }
            Figure::Resumed => {
                "resumed TLS connections, 1 request each (wrk -c32, Connection: close)"
            }
        }
    }
}

fn measure(f: Figure, p: &Proxy, proxy: &Running, seconds: u64) -> anyhow::Result<Sample> {
    let before = proxy.cpu_seconds();
    let mut s = match f {
        Figure::H1KeepAlive => {
            run_wrk(&format!("http://127.0.0.1:{}/", p.http), 64, seconds, false)?
        }
        Figure::H2Tls => run_h2load(&format!("https://127.0.0.1:{}/", p.https), seconds)?,
        Figure::Handshakes => run_s_time(p.https, 32, seconds)?,
        Figure::Resumed => run_wrk(
            &format!("https://127.0.0.1:{}/", p.https),
            32,
            seconds,
            true,
        )?,
    };
    let after = proxy.cpu_seconds();
    let (user, sys) = (after.0 - before.0, after.1 - before.1);
    let requests = s.rps * seconds as f64;
    s.per_cpu_s = if user + sys > 0.0 {
        requests / (user + sys)
    } else {
        f64::NAN
    };
    s.user_us = user * 1e6 / requests;
    s.sys_us = sys * 1e6 / requests;
    Ok(s)
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{}–{}", k(lo), k(hi))
}

fn k(x: f64) -> String {
    if x >= 1000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

/// `cargo xtask bench l7`.
pub fn run(root: &Path, lb: &Path, opts: Options) -> anyhow::Result<()> {
    let quick = opts.quick;
    ensure_tools()?;
    if let Some(b) = &opts.baseline {
        ensure!(b.is_file(), "--baseline {}: no such file", b.display());
    }
    let figures: Vec<Figure> = Figure::ALL
        .into_iter()
        .filter(|f| opts.only.as_ref().is_none_or(|o| o.contains(f)))
        .collect();
    let mut proxies: Vec<&Proxy> = PROXIES.iter().collect();
    // `--lean`: the same binary on the native path beside it, unless another is named.
    let baseline = opts
        .baseline
        .clone()
        .or_else(|| opts.lean.then(|| lb.to_owned()));
    if baseline.is_some() {
        proxies.insert(1, &BASELINE);
    }
    let binary = |p: &Proxy| -> PathBuf {
        match (&baseline, p.name) {
            (Some(b), "lb-base") => b.clone(),
            _ => lb.to_owned(),
        }
    };
    let mut plan = if quick {
        Plan {
            rounds: 1,
            seconds: 3,
        }
    } else {
        Plan {
            rounds: 3,
            seconds: 10,
        }
    };
    if let Some(rounds) = opts.rounds {
        ensure!(rounds > 0, "--rounds: at least 1 round is needed, not 0");
        plan.rounds = rounds;
    }
    let dir = std::env::temp_dir().join(format!("lb-bench-l7-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    let certs = certificate(&dir)?;
    let _backend = nginx_backend(&dir)?;
    let pinning = opts.pin.then(Pinning::of_this_process).transpose()?;

    println!("lb L7 benchmark, beside HAProxy and nginx");
    println!(
        "command:  cargo xtask bench l7{}{}{}{}{}{}{}",
        if quick { " --quick" } else { "" },
        if opts.pgo { " --pgo" } else { "" },
        opts.rounds
            .map_or(String::new(), |n| format!(" --rounds {n}")),
        opts.only.as_ref().map_or(String::new(), |f| format!(
            " --only {}",
            f.iter().map(|f| f.short()).collect::<Vec<_>>().join(",")
        )),
        opts.baseline
            .as_ref()
            .map_or(String::new(), |b| format!(" --baseline {}", b.display())),
        if opts.pin { " --pin" } else { "" },
        if opts.lean { " --lean" } else { "" },
    );
    if opts.lean {
        println!(
            "lean:     lb serves its HTTP listener with http1=lean, lb-base ({}) on the native path, both --l7-runtime per-worker",
            baseline
                .as_ref()
                .map_or(String::new(), |b| b.display().to_string())
        );
    }
    println!("versions: {}", versions(lb));
    println!(
        "machine:  {} cpus, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        uname()
    );
    println!(
        "runs:     {} round(s) x {} s per figure and proxy, proxies alternating {} (balanced order: each proxy once in each place, before and after each other one in turn)",
        plan.rounds,
        plan.seconds,
        proxies.iter().map(|p| p.name).collect::<Vec<_>>().join(" ")
    );
    println!("backend:  one nginx worker, 100-byte body, keep-alive; access logs off (but lb+log)");
    if let Some(p) = &pinning {
        println!(
            "pinning:  workers one per CPU of {}: lb {}, HAProxy `{}`, nginx `{}`; client and backend unbound",
            p.cpus,
            Pinning::lb_flags().join(" "),
            p.haproxy_global().trim().replace("\n  ", "; "),
            Pinning::nginx_main().trim()
        );
    }
    println!();
    let _ = root;

    let mut results: BTreeMap<(Figure, &str), Vec<Sample>> = BTreeMap::new();
    let mut lb_rss = (0.0f64, 0.0f64);
    for round in 0..plan.rounds {
        for &f in &figures {
            for p in round_order(&proxies, round) {
                let proxy = start_proxy(p, &dir, &binary(p), &certs, pinning.as_ref(), opts.lean)?;
                if round == 0 && f == figures[0] {
                    println!(
                        "{:<8} negotiates {} with an OpenSSL client",
                        p.name,
                        negotiated(p.https)
                    );
                }
                // A short warm-up fills the pools.
                let _ = run_wrk(&format!("http://127.0.0.1:{}/", p.http), 8, 1, false);
                if p.name == "lb" && f == Figure::H1KeepAlive {
                    lb_rss.0 = proxy.rss_mib();
                }
                let s = measure(f, p, &proxy, plan.seconds)
                    .with_context(|| format!("round {} {:?} {}", round + 1, f, p.name))?;
                if p.name == "lb" && f == Figure::H1KeepAlive {
                    lb_rss.1 = proxy.rss_mib();
                }
                // h2load and s_time report no percentiles.
                let latency = if matches!(f, Figure::H2Tls | Figure::Handshakes) {
                    String::new()
                } else {
                    format!("  p50 {:>6.2} ms  p99 {:>6.2} ms", s.p50_ms, s.p99_ms)
                };
                eprintln!(
                    "  round {} {:<12} {:<8} {:>9.0} req/s {:>9.0} req/CPU-s{latency}  errors {}",
                    round + 1,
                    format!("{f:?}"),
                    p.name,
                    s.rps,
                    s.per_cpu_s,
                    s.errors
                );
                results.entry((f, p.name)).or_default().push(s);
            }
        }
    }

    let mut table = String::new();
    for &f in &figures {
        let _ = writeln!(table, "{}", f.label());
        let _ = writeln!(
            table,
            "  {:<8} {:>20} {:>20} {:>15} {:>7} {:>7} {:>6}   {:>22}",
            "proxy",
            "req/s",
            "req per CPU-s",
            "µs/req usr+sys",
            "p50 ms",
            "p99 ms",
            "errors",
            "lb ÷ peer (req/CPU-s)"
        );
        let lb_per: Vec<f64> = results[&(f, "lb")].iter().map(|s| s.per_cpu_s).collect();
        for &p in &proxies {
            let v = &results[&(f, p.name)];
            let rps: Vec<f64> = v.iter().map(|s| s.rps).collect();
            let per: Vec<f64> = v.iter().map(|s| s.per_cpu_s).collect();
            let ratio = if p.name == "lb" {
                String::new()
            } else {
                // Ratio per round, then the median: the same round's conditions for both.
                let r: Vec<f64> = lb_per.iter().zip(&per).map(|(a, b)| a / b).collect();
                format!(
                    "{:.2} ({:.2}–{:.2})",
                    median(r.clone()),
                    r.iter().copied().fold(f64::INFINITY, f64::min),
                    r.iter().copied().fold(0.0, f64::max)
                )
            };
            let lat = |g: fn(&Sample) -> f64| {
                // h2load and s_time report no percentiles.
                if matches!(f, Figure::H2Tls | Figure::Handshakes) {
                    "-".to_owned()
                } else {
                    format!("{:.2}", median(v.iter().map(g).collect()))
                }
            };
            let _ = writeln!(
                table,
                "  {:<8} {:>20} {:>20} {:>15} {:>7} {:>7} {:>6}   {:>22}",
                p.name,
                format!("{} ({})", k(median(rps.clone())), range(&rps)),
                format!("{} ({})", k(median(per.clone())), range(&per)),
                format!(
                    "{:.1}+{:.1}",
                    median(v.iter().map(|s| s.user_us).collect()),
                    median(v.iter().map(|s| s.sys_us).collect())
                ),
                lat(|s| s.p50_ms),
                lat(|s| s.p99_ms),
                v.iter().map(|s| s.errors).sum::<u64>(),
                ratio
            );
        }
        let _ = writeln!(table);
    }
    if figures.contains(&Figure::H1KeepAlive) {
        let _ = writeln!(
            table,
            "lb resident memory: {:.1} MiB idle, {:.1} MiB after the keep-alive run",
            lb_rss.0, lb_rss.1
        );
    }
    println!("{table}");
    Ok(())
}

/// Removes the bench's scratch directory, also when a step fails.
pub(crate) struct RemoveDir(pub(crate) PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn versions(lb: &Path) -> String {
    let v = |cmd: &mut Command| -> String {
        cmd.output()
            .map(|o| {
                let t = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                t.lines().next().unwrap_or("").trim().to_owned()
            })
            .unwrap_or_default()
    };
    format!(
        "{}; {}; {}",
        v(Command::new(lb).arg("--version")),
        v(Command::new("haproxy").arg("-v")),
        v(Command::new("nginx").arg("-v"))
    )
}

fn uname() -> String {
    Command::new("uname")
        .arg("-sr")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The order the proxies run in during round `round` (0-based): a row of a Williams design.
/// With n proxies, round q of a period (n rounds for an even n, 2n for an odd one) runs the
/// sequence 0, 1, n-1, 2, n-2, 3, … with every index shifted by q (mod n); for an odd n the
/// period's second n rounds run the first n's orders backwards. Any n consecutive rounds that
/// start a period put each proxy once in each place; over a whole period each proxy runs
/// right before each other one equally often (once for an even n, twice for an odd one).
fn round_order<T: Copy>(items: &[T], round: usize) -> Vec<T> {
    let n = items.len();
    let period = if n.is_multiple_of(2) { n } else { 2 * n };
    let q = round % period.max(1);
    let mut order: Vec<T> = (0..n)
        .map(|i| {
            let step = match i {
                0 => 0,
                odd if odd % 2 == 1 => odd.div_ceil(2),
                even => n - even / 2,
            };
            items[(step + q) % n]
        })
        .collect();
    if q >= n {
        order.reverse();
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many rounds ran one proxy (by index) with another: `(a, b)` → count.
    type PairCounts = BTreeMap<(usize, usize), usize>;

    /// `(a, b)` → how many of `rounds` ran `a` right before `b`, and how many ran `a` (anywhere)
    /// before `b`.
    fn pairs(rounds: &[Vec<usize>]) -> (PairCounts, PairCounts) {
        let (mut next, mut before) = (BTreeMap::new(), BTreeMap::new());
        for order in rounds {
            for (i, &a) in order.iter().enumerate() {
                if let Some(&b) = order.get(i + 1) {
                    *next.entry((a, b)).or_insert(0) += 1;
                }
                for &b in &order[i + 1..] {
                    *before.entry((a, b)).or_insert(0) += 1;
                }
            }
        }
        (next, before)
    }

    #[test]
    fn each_proxy_takes_each_place_once_and_every_neighbour_in_turn() {
        for n in 1..=7 {
            let items: Vec<usize> = (0..n).collect();
            let period = if n.is_multiple_of(2) { n } else { 2 * n };
            let rounds: Vec<Vec<usize>> = (0..period).map(|r| round_order(&items, r)).collect();
            for (r, order) in rounds.iter().enumerate() {
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, items, "n {n}, round {r}: each proxy once");
                assert_eq!(
                    order,
                    &round_order(&items, r + period),
                    "n {n}, round {r}: the next period repeats this one"
                );
            }
            // Each place once over the period's first n rounds, and over its last n.
            for half in rounds.chunks(n) {
                for place in 0..n {
                    let mut there: Vec<usize> = half.iter().map(|o| o[place]).collect();
                    there.sort_unstable();
                    assert_eq!(there, items, "n {n}, place {place}");
                }
            }
            let (next, _) = pairs(&rounds);
            let times = if n.is_multiple_of(2) { 1 } else { 2 };
            for a in 0..n {
                for b in (0..n).filter(|&b| b != a) {
                    assert_eq!(
                        next.get(&(a, b)).copied().unwrap_or(0),
                        times,
                        "n {n}: {a} right before {b}"
                    );
                }
            }
            // Over the first n rounds (the bench's usual count), before and after in turn.
            let (_, before) = pairs(&rounds[..n]);
            for a in 0..n {
                for b in (0..n).filter(|&b| b != a) {
                    let ab = before.get(&(a, b)).copied().unwrap_or(0);
                    let ba = before.get(&(b, a)).copied().unwrap_or(0);
                    assert!(
                        ab.abs_diff(ba) <= n % 2,
                        "n {n}: {a} before {b} {ab} times, after {ba}"
                    );
                }
            }
        }
    }

    #[test]
    fn with_a_baseline_lb_and_lb_base_take_turns_in_running_first() {
        // The bench's own list with `--baseline`: the baseline second.
        let mut proxies: Vec<&str> = PROXIES.iter().map(|p| p.name).collect();
        proxies.insert(1, BASELINE.name);
        let first = |r| {
            let order = round_order(&proxies, r);
            let at = |name| order.iter().position(|p| *p == name).unwrap();
            at("lb") < at("lb-base")
        };
        let lb_first = (0..proxies.len()).filter(|&r| first(r)).count();
        assert_eq!(
            lb_first,
            proxies.len().div_ceil(2),
            "lb first in {lb_first} rounds"
        );
        assert!(
            first(0) && !first(1),
            "the first two rounds already swap them"
        );
    }

    #[test]
    fn rounds_must_be_a_whole_number_of_at_least_one() {
        assert_eq!(parse_rounds("1"), Ok(1));
        assert_eq!(parse_rounds("12"), Ok(12));
        for bad in ["0", "", "-1", "three", "2.5", "1e3"] {
            let e = parse_rounds(bad).expect_err(bad);
            assert!(e.contains("is needed, not"), "{bad:?}: {e}");
        }
    }
}
