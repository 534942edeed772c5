//! Builders for L7 integration tests (linkerd2-proxy style): real targets and real clients on
//! loopback, and a [`Proxy`] guard that runs the L7 tier and stops it on drop.
//!
//! `target::http1().route("/", Reply::text("hello")).run().await` starts a small hyper target;
//! `target::raw(RawBehavior::Reset).run().await` a raw TCP one that misbehaves on purpose.
//! `Proxy::forward_to(&[addr]).start().await` runs the balancer with one HTTP listener whose
//! default rule forwards to one target group. Every socket is bound to 127.0.0.1:0.
#![allow(
    dead_code,
    reason = "each test file uses a different part of the support code"
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb::proxy::client::ClientConfig;
use lb::proxy::server::{L7Config, ListenerConfig, ListenerProtocol, RunningL7};
use lb::rules::{Rule, RuleOrDefault, RuleSet, parse_rule};
use lb::targets::{TargetAddr, TargetGroup, TargetState, parse_target_group};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Safety net for every network wait in tests (never asserted on).
pub const SAFETY: Duration = Duration::from_secs(20);

/// A keep-alive HTTP/1.1 client connection to `addr` (hyper's, its connection task spawned):
/// the requests a test sends on it share one TCP connection, as a browser's or an SDK's do.
pub async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(SAFETY, f)
        .await
        .expect("test step did not finish within the safety timeout")
}

/// Waits, polling every 10 ms, until `done` holds; panics naming `what` after half the safety
/// net (so before an enclosing [`within`] does). A deadline, never a timed assertion.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SAFETY / 2;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached within the safety deadline"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub mod target {
    use super::*;

    /// What a route of a hyper target answers.
    #[derive(Clone, Debug)]
    pub enum Reply {
        /// 200 with this body.
        Text(String),
        /// 200 with `METHOD URI VERSION` and then every received header as `name: value` lines.
        EchoHeaders,
        /// Waits, then 200 with the body.
        Slow(Duration, String),
        /// Never answers.
        Hang,
        /// 200 with the request body (read whole first).
        EchoBody,
        /// 101 and then echoes every byte back (a WebSocket-like upgrade echo).
        UpgradeEcho,
        /// 200 whose body sends `first`, then waits for the gate before sending `second`:
        /// proves the balancer streams instead of buffering the whole body. Built with
        /// [`Reply::gated`].
        Gated {
            first: String,
            gate: Gate,
            second: String,
        },
    }

    impl Reply {
        pub fn text(s: &str) -> Self {
            Self::Text(s.to_owned())
        }

        /// A [`Reply::Gated`] and the [`Gate`] that releases its second part.
        pub fn gated(first: &str, second: &str) -> (Self, Gate) {
            let gate = Gate::default();
            let reply = Self::Gated {
                first: first.to_owned(),
                gate: gate.clone(),
                second: second.to_owned(),
            };
            (reply, gate)
        }
    }

    /// Holds back the second part of every [`Reply::Gated`] built with it until
    /// [`Gate::release`]; then it stays open: every response waiting passes, and so does one
    /// whose body reaches the gate only later.
    #[derive(Clone, Debug, Default)]
    pub struct Gate(Arc<GateState>);

    #[derive(Debug, Default)]
    struct GateState {
        open: std::sync::atomic::AtomicBool,
        notify: tokio::sync::Notify,
    }

    impl Gate {
        /// Opens the gate for good.
        pub fn release(&self) {
            self.0.open.store(true, Ordering::SeqCst);
            self.0.notify.notify_waiters();
        }

        /// Waits until the gate is open.
        async fn passed(&self) {
            loop {
                let notified = self.0.notify.notified();
                tokio::pin!(notified);
                // Registered before the check: a release in between is not missed.
                notified.as_mut().enable();
                if self.0.open.load(Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        }
    }

    pub struct Builder {
        routes: Vec<(String, Reply)>,
        http2: bool,
        /// HTTP/1.1 over TLS ([`https1`]).
        tls: bool,
    }

    pub fn http1() -> Builder {
        Builder {
            routes: Vec::new(),
            http2: false,
            tls: false,
        }
    }

    pub fn http2() -> Builder {
        Builder {
            routes: Vec::new(),
            http2: true,
            tls: false,
        }
    }

    /// An HTTP/1.1 target over TLS (ALPN `http/1.1`) with a fresh self-signed certificate for
    /// `localhost`: a `protocol=https` group's target (certificates are not verified unless
    /// the group says `verify-tls=true`).
    pub fn https1() -> Builder {
        Builder {
            routes: Vec::new(),
            http2: false,
            tls: true,
        }
    }

    /// The TLS acceptor of an [`https1`] target: a self-signed certificate made with rcgen.
    fn self_signed_acceptor() -> tokio_rustls::TlsAcceptor {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("self-signed certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()),
        );
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server certificate");
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(server))
    }

    /// A running target; it stops when dropped.
    pub struct Target {
        pub addr: SocketAddr,
        /// Requests the target received (whole heads parsed by hyper).
        pub hits: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Target {
        pub fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    impl Drop for Target {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Builder {
        /// Requests whose path starts with `prefix` get `reply` (first match wins; `/` matches
        /// everything).
        pub fn route(mut self, prefix: &str, reply: Reply) -> Self {
            self.routes.push((prefix.to_owned(), reply));
            self
        }

        pub async fn run(self) -> Target {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
            let addr = listener.local_addr().expect("addr");
            let hits = Arc::new(AtomicUsize::new(0));
            let routes = Arc::new(self.routes);
            let http2 = self.http2;
            let tls = self.tls.then(self_signed_acceptor);
            let h = hits.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let routes = routes.clone();
                    let hits = h.clone();
                    if let Some(acceptor) = tls.clone() {
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let svc = hyper::service::service_fn(move |req| {
                                hits.fetch_add(1, Ordering::SeqCst);
                                answer(routes.clone(), req)
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        });
                        continue;
                    }
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            hits.fetch_add(1, Ordering::SeqCst);
                            answer(routes.clone(), req)
                        });
                        if http2 {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tcp), svc)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), svc)
                                .with_upgrades()
                                .await;
                        }
                    });
                }
            });
            Target { addr, hits, task }
        }
    }

    type TargetBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

    fn full(b: Bytes) -> TargetBody {
        BodyExt::boxed(Full::new(b))
    }

    /// A `Stream` over an mpsc receiver (no tokio-stream dependency).
    fn tokio_stream_from<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    async fn answer(
        routes: Arc<Vec<(String, Reply)>>,
        mut req: Request<Incoming>,
    ) -> Result<Response<TargetBody>, Infallible> {
        let reply = routes
            .iter()
            .find(|(p, _)| req.uri().path().starts_with(p.as_str()))
            .map(|(_, r)| r.clone())
            .unwrap_or(Reply::Text("no route".into()));
        let text = match reply {
            Reply::Text(t) => t,
            Reply::EchoHeaders => {
                let mut s = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
                for (k, v) in req.headers() {
                    s.push_str(&format!(
                        "{}: {}\n",
                        k,
                        String::from_utf8_lossy(v.as_bytes())
                    ));
                }
                s
            }
            Reply::Slow(d, t) => {
                tokio::time::sleep(d).await;
                t
            }
            Reply::Hang => {
                std::future::pending::<()>().await;
                String::new()
            }
            Reply::EchoBody => {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                String::from_utf8_lossy(&body.unwrap_or_default()).into_owned()
            }
            Reply::Gated {
                first,
                gate,
                second,
            } => {
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
                tokio::spawn(async move {
                    let _ = tx.send(Ok(Frame::data(Bytes::from(first)))).await;
                    gate.passed().await;
                    let _ = tx.send(Ok(Frame::data(Bytes::from(second)))).await;
                });
                let body = StreamBody::new(tokio_stream_from(rx));
                return Ok(Response::new(BodyExt::boxed(body)));
            }
            Reply::UpgradeEcho => {
                let on = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(up) = on.await {
                        let mut io = TokioIo::new(up);
                        let mut buf = [0u8; 1024];
                        loop {
                            match io.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if io.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                });
                let mut resp = Response::new(full(Bytes::new()));
                *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                resp.headers_mut()
                    .insert("upgrade", http::HeaderValue::from_static("websocket"));
                resp.headers_mut()
                    .insert("connection", http::HeaderValue::from_static("upgrade"));
                return Ok(resp);
            }
        };
        Ok(Response::new(full(Bytes::from(text))))
    }

    /// Targets that break HTTP on purpose.
    #[derive(Clone, Copy, Debug)]
    pub enum RawBehavior {
        /// Accepts and resets the connection (RST) as soon as the request arrives.
        Reset,
        /// Answers the request with bytes that are not HTTP.
        Garbage,
        /// Reads the request and closes cleanly (FIN) without answering.
        CloseAfterRequest,
    }

    pub fn raw(behavior: RawBehavior) -> RawBuilder {
        RawBuilder { behavior }
    }

    pub struct RawBuilder {
        behavior: RawBehavior,
    }

    impl RawBuilder {
        pub async fn run(self) -> Target {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind raw target");
            let addr = listener.local_addr().expect("addr");
            let hits = Arc::new(AtomicUsize::new(0));
            let h = hits.clone();
            let behavior = self.behavior;
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut tcp, _)) = listener.accept().await else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        let _ = tcp.read(&mut buf).await;
                        match behavior {
                            RawBehavior::Reset => {
                                // SO_LINGER 0 makes the close an RST; blocking on drop is not
                                // a concern with a zero timeout.
                                #[allow(deprecated, reason = "zero linger never blocks")]
                                let _ = tcp.set_linger(Some(Duration::ZERO));
                                drop(tcp);
                            }
                            RawBehavior::Garbage => {
                                let _ = tcp.write_all(b"this is not http\r\n\r\n").await;
                                let _ = tcp.shutdown().await;
                            }
                            RawBehavior::CloseAfterRequest => {
                                let _ = tcp.shutdown().await;
                            }
                        }
                    });
                }
            });
            Target { addr, hits, task }
        }
    }
}

/// A target group from a `--target-group` spec with `targets`, all marked healthy.
pub fn group(spec: &str, targets: Vec<TargetAddr>) -> Arc<TargetGroup> {
    let group = TargetGroup::new(parse_target_group(spec).expect("target group spec"));
    group.set_targets(targets.clone());
    for t in targets {
        group.set_state(t.addr, TargetState::Healthy);
    }
    Arc::new(group)
}

/// A listener's rules from `--rule` specs (listener name ignored; one must be `default`).
pub fn rules(specs: &[&str]) -> RuleSet {
    let mut rules: Vec<Rule> = Vec::new();
    let mut default = None;
    for spec in specs {
        match parse_rule(spec).expect("rule spec").rule {
            RuleOrDefault::Rule(r) => rules.push(r),
            RuleOrDefault::Default(a) => default = Some(a),
        }
    }
    RuleSet::new(rules, default.expect("a default rule")).expect("valid rules")
}

/// The balancer under test; stopped (hard) on drop.
pub struct Proxy {
    pub addr: SocketAddr,
    pub running: Option<RunningL7>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::env::var("LB_TEST_HTTP1").as_deref() == Ok("lean")
            && let Some(r) = &self.running
        {
            // What the lean path served of the test (LB_TEST_HTTP1=lean runs).
            let c = r.counters();
            eprintln!(
                "lean-path: requests {} handoffs {}",
                c.http1_lean_requests.get(),
                c.http1_lean_handoffs.load(Ordering::Relaxed)
            );
        }
        drop(self.running.take());
    }
}

/// Configuration of a one-listener balancer.
pub struct ProxyBuilder {
    pub listener: ListenerConfig,
    pub rules: RuleSet,
    pub groups: lb::proxy::server::Groups,
    pub client: ClientConfig,
    pub access_log: Option<Arc<lb::proxy::server::AccessLog>>,
    /// The L7 worker layout: `lb run`'s default unless a test sets it ([`Self::workers`]).
    pub workers: lb::proxy::server::WorkerLayout,
}

impl ProxyBuilder {
    /// One HTTP listener `web` whose rules are still to be given ([`Self::rules`]); until then
    /// every request gets a fixed 404.
    pub fn new() -> Self {
        Self {
            listener: ListenerConfig::new(
                "web",
                ListenerProtocol::Http,
                "127.0.0.1:0".parse().expect("addr"),
            ),
            rules: rules(&["web,default,fixed-response=404"]),
            groups: Default::default(),
            client: ClientConfig::default(),
            access_log: None,
            workers: Default::default(),
        }
    }

    /// One HTTP listener; default rule forwards to group `tg` over `targets` (HTTP/1).
    pub fn forward_to(targets: &[SocketAddr]) -> Self {
        Self::new()
            .group("tg", targets)
            .rules(&["web,default,forward=tg"])
    }

    /// Adds a group named `name` with default options.
    pub fn group(self, name: &str, targets: &[SocketAddr]) -> Self {
        self.group_spec(name, targets)
    }

    /// Adds a group from a `--target-group` spec.
    pub fn group_spec(self, spec: &str, targets: &[SocketAddr]) -> Self {
        self.group_targets(spec, targets.iter().copied().map(TargetAddr::new).collect())
    }

    /// Adds a group from a spec with weighted targets.
    pub fn group_targets(mut self, spec: &str, targets: Vec<TargetAddr>) -> Self {
        let g = group(spec, targets);
        self.groups.insert(g.name().to_owned(), g);
        self
    }

    /// Replaces the listener's rules (`--rule` specs).
    pub fn rules(mut self, specs: &[&str]) -> Self {
        self.rules = rules(specs);
        self
    }

    pub fn listener(mut self, f: impl FnOnce(&mut ListenerConfig)) -> Self {
        f(&mut self.listener);
        self
    }

    pub fn client(mut self, f: impl FnOnce(&mut ClientConfig)) -> Self {
        f(&mut self.client);
        self
    }

    /// Sets the L7 worker layout.
    pub fn workers(mut self, layout: lb::proxy::server::WorkerLayout) -> Self {
        self.workers = layout;
        self
    }

    pub async fn start(self) -> Proxy {
        self.try_start().await.expect("start the L7 tier")
    }

    /// The start, or why the tier refused to start.
    pub async fn try_start(mut self) -> anyhow::Result<Proxy> {
        // LB_TEST_HTTP1=lean runs a test's plain native HTTP/1 listener on the lean path
        // (`http1=lean`, per-worker runtime): the suite as a check of the lean path's
        // behaviour against the native path's.
        if std::env::var("LB_TEST_HTTP1").as_deref() == Ok("lean")
            && self.listener.protocol == ListenerProtocol::Http
            && self.listener.http1_native
            && self.listener.http2_native
        {
            self.listener.http1_lean = true;
            self.workers.runtime = lb::proxy::server::L7Runtime::PerWorker;
        }
        let running = lb::proxy::server::start(L7Config {
            listeners: vec![(self.listener, self.rules)],
            groups: self.groups,
            client: self.client,
            access_log: self.access_log,
            workers: self.workers,
        })
        .await?;
        let addr = running.addrs[0].1;
        Ok(Proxy {
            addr,
            running: Some(running),
        })
    }
}

/// A response with its body collected.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// Sends `req` over a fresh HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Got {
    within(async {
        let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Got {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .await
}

/// `GET path` with a Host header.
pub async fn get(addr: SocketAddr, path: &str) -> Got {
    send(
        addr,
        Request::get(path)
            .header("host", "app.test")
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await
}

/// Writes raw bytes and reads everything until the proxy closes the connection.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    within(async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect to proxy");
        tcp.write_all(bytes).await.expect("write");
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
}

/// The status code of the first response in raw response text.
pub fn status_of(raw: &str) -> u16 {
    raw.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"))
}

/// The head (status line and headers, without the empty line) and the rest of the first
/// response in raw response text, so header checks never match text of the body.
pub fn split_response(raw: &str) -> (&str, &str) {
    raw.split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head in {raw:?}"))
}

/// Whether a raw response head has the header `name: value` (both case-insensitive).
pub fn head_has(head: &str, name: &str, value: &str) -> bool {
    head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case(name) && v.trim().eq_ignore_ascii_case(value)
        })
    })
}

/// A response's whole body as text (lossy UTF-8).
async fn body_text(resp: Response<Incoming>) -> String {
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// `n` sequential `GET path` over one keep-alive connection; returns the bodies in order.
pub async fn get_many(addr: SocketAddr, path: &str, n: usize) -> Vec<String> {
    within(async {
        let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut bodies = Vec::with_capacity(n);
        for _ in 0..n {
            sender.ready().await.expect("connection ready");
            let resp = sender
                .send_request(
                    Request::get(path)
                        .header("host", "app.test")
                        .body(Full::new(Bytes::new()))
                        .expect("request"),
                )
                .await
                .expect("response");
            bodies.push(body_text(resp).await);
        }
        bodies
    })
    .await
}

/// [`get_many`] over HTTP/2 with prior knowledge (h2c): `n` requests, one after the other,
/// on one connection.
pub async fn get_many_h2(addr: SocketAddr, path: &str, n: usize) -> Vec<String> {
    within(async {
        let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2c handshake");
        tokio::spawn(conn);
        let mut bodies = Vec::with_capacity(n);
        for _ in 0..n {
            sender.ready().await.expect("connection ready");
            let resp = sender
                .send_request(
                    Request::get(format!("http://app.test{path}"))
                        .body(Full::new(Bytes::new()))
                        .expect("request"),
                )
                .await
                .expect("response");
            bodies.push(body_text(resp).await);
        }
        bodies
    })
    .await
}

/// Splits an access-log line: spaces separate fields, double quotes group (a `\"` inside a
/// quoted field is a quote).
pub fn log_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => quoted = !quoted,
            ' ' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Fields of an access-log line: ALB's 29 and `lb`'s 6.
pub const LOG_FIELDS: usize = 35;

/// An access log written to a file of its own, in a directory removed on drop.
pub struct LogFile {
    pub path: std::path::PathBuf,
    pub writer: Arc<lb::proxy::server::AccessLog>,
}

impl LogFile {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-access-log-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("access.log");
        let writer = lb::accesslog::access_log_writer(
            lb::accesslog::Destination::File(path.clone()),
            lb::accesslog::Rotation::default(),
            1024,
            "app/lb/0123456789abcdef".into(),
        )
        .expect("access log");
        Self {
            path,
            writer: Arc::new(writer),
        }
    }

    /// A proxy forwarding to `targets` that writes this log.
    pub async fn proxy(&self, targets: &[SocketAddr]) -> Proxy {
        let mut b = ProxyBuilder::forward_to(targets);
        b.access_log = Some(self.writer.clone());
        b.start().await
    }

    /// Waits for the `n`th line and returns it split into fields (all [`LOG_FIELDS`]).
    pub async fn line(&self, n: usize) -> Vec<String> {
        within(async {
            loop {
                let text = std::fs::read_to_string(&self.path).unwrap_or_default();
                if let Some(l) = text.lines().nth(n - 1) {
                    let f = log_fields(l);
                    assert_eq!(f.len(), LOG_FIELDS, "{l}");
                    return f;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        if let Some(d) = self.path.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
