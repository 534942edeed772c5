//! The `lb` binary on loopback, with targets a test controls: start `lb run` with flags, talk
//! to it through the admin CLI, and wait for the states it reports.
#![allow(dead_code, reason = "each test file uses a different part")]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `lb` binary under test.
pub const LB: &str = env!("CARGO_BIN_EXE_lb");

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// How a [`Target`] answers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Status for health checks (requests with `User-Agent: ELB-HealthChecker/2.0`).
    pub health_status: u16,
    /// Accept health-check connections but never answer them.
    pub health_silent: bool,
    /// How long an ordinary request takes before its answer.
    pub delay: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            health_status: 200,
            health_silent: false,
            delay: Duration::ZERO,
        }
    }
}

struct Shared {
    name: String,
    stop: AtomicBool,
    /// Ordinary requests received (counted before the delay).
    started: AtomicU64,
    /// Ordinary requests answered.
    hits: AtomicU64,
    /// Health checks seen.
    checks: AtomicU64,
    /// The last health check's request head.
    last_check: Mutex<String>,
    behaviour: Mutex<Behaviour>,
    conns: Mutex<Vec<TcpStream>>,
}

/// An HTTP/1.1 target on loopback that answers ordinary requests with its name (keep-alive
/// honoured) and health checks with a chosen status; it can be stopped (every connection
/// closed, the port refusing) and started again on the same port.
pub struct Target {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Target {
    /// A target named `name` on an ephemeral port.
    pub fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a target");
        let addr = listener.local_addr().expect("target address");
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            stop: AtomicBool::new(false),
            started: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            last_check: Mutex::new(String::new()),
            behaviour: Mutex::new(Behaviour::default()),
            conns: Mutex::new(Vec::new()),
        });
        let mut t = Self {
            addr,
            shared,
            acceptor: None,
        };
        t.serve(listener);
        t
    }

    fn serve(&mut self, listener: TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        self.shared.stop.store(false, Ordering::SeqCst);
        let shared = self.shared.clone();
        self.acceptor = Some(thread::spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((c, _)) => {
                        if let Ok(clone) = c.try_clone() {
                            shared.conns.lock().unwrap().push(clone);
                        }
                        let shared = shared.clone();
                        thread::spawn(move || handle(c, &shared));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }

    /// Stops: the port refuses connections and every open connection is closed.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Starts again on the same port.
    pub fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).expect("rebind the target's port");
        self.serve(listener);
    }

    /// Changes how it answers.
    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.shared.behaviour.lock().unwrap());
    }

    /// Ordinary requests received so far (answered or not).
    pub fn started(&self) -> u64 {
        self.shared.started.load(Ordering::SeqCst)
    }

    /// Ordinary requests answered so far.
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Health checks seen so far.
    pub fn checks(&self) -> u64 {
        self.shared.checks.load(Ordering::SeqCst)
    }

    /// The head of the last health check it saw.
    pub fn last_check(&self) -> String {
        self.shared.last_check.lock().unwrap().clone()
    }

    /// Its name (the body of its answers).
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

fn handle(mut c: TcpStream, shared: &Shared) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match c.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let lower = head.to_ascii_lowercase();
        let behaviour = shared.behaviour.lock().unwrap().clone();
        if lower.contains("user-agent: elb-healthchecker/2.0") {
            shared.checks.fetch_add(1, Ordering::SeqCst);
            *shared.last_check.lock().unwrap() = head;
            if behaviour.health_silent {
                thread::sleep(Duration::from_secs(30));
                return;
            }
            let _ = write!(
                c,
                "HTTP/1.1 {} Check\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                behaviour.health_status
            );
            return;
        }
        shared.started.fetch_add(1, Ordering::SeqCst);
        thread::sleep(behaviour.delay);
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        shared.hits.fetch_add(1, Ordering::SeqCst);
        let close = lower.contains("connection: close");
        let name = &shared.name;
        let ok = write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n{name}",
            name.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if ok.is_err() || close {
            return;
        }
    }
}

/// `lb run` as a child process; killed on drop.
pub struct Lb {
    child: Child,
    /// Its admin socket.
    pub admin: PathBuf,
    /// Its scratch directory (removed on drop).
    pub dir: PathBuf,
    /// The address of its listener `web`.
    pub listener: SocketAddr,
    /// The TCP admin listener, if it has one.
    pub admin_tcp: Option<SocketAddr>,
    log: PathBuf,
    /// Its ready line (`ready: …; listeners NAME=ADDR …; admin socket …`).
    ready: String,
}

/// The first line a started `lb run` prints on its stdout (piped), which must be its `ready:`
/// line. A child that printed anything else, or nothing, is killed and reaped before the test
/// fails (with what it logged to `log`, if given): a failed start leaves no `lb` running.
pub fn ready_line(child: &mut Child, log: Option<&Path>) -> String {
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().expect("stdout piped")).read_line(&mut line);
    if read.is_err() || !line.starts_with("ready:") {
        let _ = child.kill();
        let _ = child.wait();
        let logged = log
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .unwrap_or_default();
        panic!("lb printed {line:?} ({read:?}) instead of its ready line; log:\n{logged}");
    }
    line
}

/// A scratch directory unique to this process and `name`.
pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lb-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// [`tempdir`] removed when dropped, also when the test fails before its end.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> Self {
        Self(tempdir(name))
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed and reaped when dropped, also when the test fails while it runs.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Lb {
    /// Starts `lb run FLAGS` (one listener must be named `web`) and waits for its ready line.
    pub fn start(name: &str, flags: &[String]) -> Self {
        Self::start_with(name, &[], flags)
    }

    /// [`start`](Self::start) with global options before `run` (e.g. `--log-format json`).
    pub fn start_with(name: &str, global: &[&str], flags: &[String]) -> Self {
        Self::start_logging(name, global, flags, Some("info"))
    }

    /// [`start_with`](Self::start_with) with `LB_LOG` set to `log_filter`, or unset (`lb`'s
    /// default filter) for `None`.
    pub fn start_logging(
        name: &str,
        global: &[&str],
        flags: &[String],
        log_filter: Option<&str>,
    ) -> Self {
        let dir = tempdir(name);
        let admin = dir.join("admin.sock");
        let log = dir.join("lb.log");
        let mut cmd = Command::new(LB);
        cmd.args(global)
            .arg("run")
            .args(flags)
            .arg("--admin-socket")
            .arg(&admin);
        match log_filter {
            Some(f) => cmd.env("LB_LOG", f),
            None => cmd.env_remove("LB_LOG"),
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn lb");
        let line = ready_line(&mut child, Some(&log));
        // "… listeners web=127.0.0.1:PORT; admin socket PATH and 127.0.0.1:PORT"
        let listener = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("web="))
            .map(|a| a.trim_end_matches(';').parse().expect("listener address"))
            .expect("listener address in the ready line");
        let admin_tcp = line
            .split(" and ")
            .nth(1)
            .and_then(|a| a.trim().parse().ok());
        Self {
            child,
            admin,
            listener,
            admin_tcp,
            dir,
            log,
            ready: line,
        }
    }

    /// The address of the listener `name`, from the ready line.
    pub fn listener_addr(&self, name: &str) -> SocketAddr {
        let prefix = format!("{name}=");
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
            .map(|a| a.trim_end_matches(';').parse().expect("listener address"))
            .unwrap_or_else(|| panic!("no listener {name} in {:?}", self.ready))
    }

    /// What `lb run` logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `lb ARGS --admin-socket SOCKET`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(LB)
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin)
            .output()
            .expect("run the lb CLI")
    }

    /// `lb ARGS …`, which must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "lb {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `lb targets register --target GROUP=ADDR`, which must succeed.
    pub fn register(&self, group: &str, addr: SocketAddr) {
        self.cli_ok(&[
            "targets",
            "register",
            "--target",
            &format!("{group}={addr}"),
        ]);
    }

    /// `lb targets deregister --target GROUP=ADDR`, which must succeed.
    pub fn deregister(&self, group: &str, addr: SocketAddr) {
        self.cli_ok(&[
            "targets",
            "deregister",
            "--target",
            &format!("{group}={addr}"),
        ]);
    }

    /// `lb targets health --group GROUP --json`: (port, state, reason, description) per
    /// target.
    pub fn health(&self, group: &str) -> Vec<Health> {
        let text = self.cli_ok(&["targets", "health", "--group", group, "--json"]);
        let v: Value = serde_json::from_str(&text).expect("health JSON");
        v["TargetHealthDescriptions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| Health {
                        port: d["Target"]["Port"].as_u64().unwrap_or(0) as u16,
                        state: d["TargetHealth"]["State"].as_str().unwrap_or("").to_owned(),
                        reason: d["TargetHealth"]["Reason"].as_str().map(str::to_owned),
                        description: d["TargetHealth"]["Description"].as_str().map(str::to_owned),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The health of the target on `port` of `group`.
    pub fn health_of(&self, group: &str, port: u16) -> Option<Health> {
        self.health(group).into_iter().find(|h| h.port == port)
    }

    /// Waits until the target on `port` of `group` is in `state`.
    pub fn wait_state(&self, group: &str, port: u16, state: &str) -> Health {
        wait_for(
            &format!("{group}:{port} to be {state}"),
            Duration::from_secs(20),
            || self.health_of(group, port).filter(|h| h.state == state),
        )
    }

    /// One request on a new connection: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.listener).expect("connect to lb");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        parse_response(&resp)
    }

    /// Sends `signal` (e.g. SIGHUP) to it.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Stops it with SIGTERM and waits for it to exit. Its directory stays until it is
    /// dropped, so a test can check what the exit left behind (the admin socket).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.wait().expect("wait for lb")
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- lb log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `(status, body)` of an HTTP/1.1 response (status 0 if there was none).
pub fn parse_response(resp: &str) -> (u16, String) {
    let status = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// One target's health as `lb targets health` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Its port.
    pub port: u16,
    /// AWS state.
    pub state: String,
    /// AWS reason code.
    pub reason: Option<String>,
    /// Description.
    pub description: Option<String>,
}

/// A keep-alive HTTP/1.1 client connection to `lb`.
pub struct KeepAlive {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    /// Connects.
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self { stream, reader }
    }

    /// Its local address (to tell that the same connection was used).
    pub fn local(&self) -> SocketAddr {
        self.stream.local_addr().unwrap()
    }

    /// One request on this connection; None if the connection is closed.
    pub fn get(&mut self, path: &str) -> Option<(u16, String)> {
        write!(self.stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line).ok()? == 0 {
            return None;
        }
        let status = status_line.get(9..12)?.parse().ok()?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).ok()?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().ok()?;
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body).ok()?;
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// A file holding `token`, readable only by root.
pub fn token_file(dir: &Path, token: &str) -> PathBuf {
    let p = dir.join("token");
    std::fs::write(&p, token).expect("token file");
    p
}
