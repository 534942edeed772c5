//! Forwarding requests to targets over pooled connections.
//!
//! The server side picks a target and calls [`Forwarder::forward`] once per request. The
//! forwarder reuses an idle pooled connection when one is safe to reuse, otherwise connects
//! (TCP, optionally TLS, HTTP/1.1 or HTTP/2 as the target says), sends the request and returns
//! the response head with the body streaming behind it.
//!
//! It never fails a request because a target closed an idle keep-alive connection (the classic
//! ALB 502, see ALB-REFERENCE.md):
//! 1. idle connections are retired safely before the target's idle-close time, taken from
//!    `Keep-Alive: timeout=N` or learned per target from the idle connections it closed
//!    (see [`crate::proxy::pool`] and its `estimator`);
//! 2. closed pooled connections are discarded before use (`is_closed`/`is_ready` on hyper's,
//!    a pending EOF or unasked bytes on the socket of our own client's);
//! 3. a request that could not be sent again (a POST) only reuses a connection whose idle time is
//!    proven safe, until then it goes out on a new connection (see [`crate::proxy::pool`]);
//! 4. a request that fails on a reused connection before a response arrived is retried once on
//!    a new connection when that is safe: always when the request was never written (hyper's
//!    `TrySendError::take_message`, or our own client's first write failing), otherwise only
//!    for idempotent methods (RFC 9110 §9.2.2) whose body is empty or small enough to have been
//!    kept. A request that may have reached the target (a POST whose bytes were written) is
//!    never sent twice: it fails with 502.
//!
//! Plain-TCP HTTP/1.1 targets are served by our own client ([`h1`]) in the request's task;
//! `Upgrade`/CONNECT requests, TLS and HTTP/2 targets by hyper's.
//!
//! hyper's HTTP/1.1 connections are driven `with_upgrades()`, and the response's extensions
//! are kept, so after a `101 Switching Protocols` the server side can call
//! `hyper::upgrade::on` on the returned response to tunnel (WebSocket).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::deadline::poll_idle_deadline;
use super::error::ProxyError;
pub use super::pool::TargetPoolStats;
use super::pool::{H1Conn, H2Conn, RawConn, TargetPool};
use crate::headers::ForwardedTail;

mod body;
mod connect;
pub mod h1;
pub mod tls;

pub use body::MAX_REPLAY_BYTES;
use body::{Checkin, Replay, TargetBody};

/// The error type of streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed request or response body.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// How the forwarder talks to targets. Defaults are ALB's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// ALB idle timeout (default 60 s, settable 1–4000 s): how long we wait for response bytes
    /// (→ 504 before the response head, body aborted after it), and the longest a pooled
    /// connection sits idle.
    pub idle_timeout: Duration,
    /// How long connecting (TCP, TLS and the HTTP handshake) may take (ALB: 10 s) → 504.
    pub connect_timeout: Duration,
    /// Largest response head accepted, status line included (ALB: 32 KiB) → 502 beyond.
    pub max_response_header_bytes: usize,
    /// Most idle HTTP/1.1 connections kept per target (not an ALB setting; ALB keeps as many as
    /// it needs). Idle connections beyond it are closed, oldest first. It must cover the
    /// requests in flight to one target at busy moments: below that, every response that comes
    /// back while the pool is full closes its connection and a later request opens a new one
    /// (at 64, one HTTP/2 request in three paid a TCP connect and close under
    /// `h2load -c32 -m10`). Idle connections still age out by the idle timeout.
    pub max_idle_per_target: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            max_response_header_bytes: 32 * 1024,
            max_idle_per_target: 512,
        }
    }
}

/// Where and how to reach one target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TargetEndpoint {
    /// The target's address.
    pub addr: SocketAddr,
    /// TLS to the target (HTTPS target group), if any.
    pub tls: Option<TargetTls>,
    /// Speak HTTP/2 to the target (target group protocol version HTTP2): with TLS negotiated by
    /// ALPN `h2`, without TLS by prior knowledge (h2c). Otherwise HTTP/1.1.
    pub http2: bool,
}

/// TLS settings towards a target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TargetTls {
    /// SNI name (and, when verifying, the name the certificate must hold). Empty: no SNI, the
    /// target's IP address is used for verification.
    pub server_name: String,
    /// Verify the target's certificate. ALB does not (default `false`): targets commonly use
    /// self-signed certificates.
    pub verify: bool,
    /// PEM file with the CA certificates to verify against (needed when `verify` is set).
    pub ca_file: Option<PathBuf>,
}

/// A target's response as the forwarder got it.
#[derive(Debug)]
pub struct Forwarded {
    /// The response; the body streams from the target. Its extensions are hyper's, so
    /// `hyper::upgrade::on(&mut response)` works after a 101.
    pub response: Response<ProxyBody>,
    /// The request went over a pooled connection (and was not retried).
    pub reused_connection: bool,
    /// The request failed on a pooled connection and was sent again on a new one.
    pub retried: bool,
    /// How long connecting took, when a new connection was made.
    pub connect_time: Option<Duration>,
    /// The response's head is known to have no hop-by-hop field (our own client looked while
    /// parsing it): `strip_hop_by_hop` would remove nothing. False when not known (hyper's).
    pub no_hop_by_hop: bool,
}

/// Forwards requests to targets over pooled connections. One per process; cheap to clone
/// (clones share the pools).
#[derive(Clone, Debug)]
pub struct Forwarder {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    targets: Mutex<TargetMap>,
    /// Shards per target pool: one per L7 worker.
    shards: usize,
}

/// The targets by endpoint. Looked up once per request: foldhash, not the default SipHash
/// (377 instructions per lookup under callgrind), as the keys are our own configuration's
/// endpoints, never chosen by a client, so flooding one hash bucket is no concern.
type TargetMap =
    std::collections::HashMap<TargetEndpoint, Arc<Target>, foldhash::fast::RandomState>;

/// The forwarder's handle on one target endpoint: its connection pool and TLS settings,
/// made once per endpoint ([`Forwarder::target`]) and kept by whoever sends to it often, so
/// a request finds its pool without the forwarder's lock or a hash of the endpoint (the
/// target group's pick keeps it, see [`crate::targets::Picked::target_handle`]). Cheap to
/// clone. A handle outlives [`Forwarder::retain_targets`] forgetting its endpoint: requests
/// sent through it still work, on a pool the forwarder no longer lists (no `pool_` series);
/// a handle asked for afterwards is a fresh one.
#[derive(Clone, Debug)]
pub struct TargetHandle(Arc<Target>);

impl TargetHandle {
    /// Where and how the handle reaches its target.
    pub fn endpoint(&self) -> &TargetEndpoint {
        &self.0.endpoint
    }

    /// Whether both handles share one pool (the same endpoint, asked for while the forwarder
    /// kept it).
    pub fn same_pool(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// A snapshot of the handle's pool, its workers' shards merged (see [`Forwarder::stats`]).
    pub fn stats(&self) -> TargetPoolStats {
        self.0.stats()
    }
}

/// What the forwarder keeps per target endpoint.
#[derive(Debug)]
struct Target {
    endpoint: TargetEndpoint,
    /// One pool per L7 worker (one in the shared layout): a worker reuses only connections it
    /// made, whose sockets its own reactor watches ([`Target::pool`]).
    pools: Box<[Arc<TargetPool>]>,
    /// The rustls configuration and SNI name, or why they could not be built.
    tls: Option<
        Result<
            (
                Arc<rustls::ClientConfig>,
                rustls::pki_types::ServerName<'static>,
            ),
            String,
        >,
    >,
}

impl Target {
    /// The calling L7 worker's shard of the pool (worker 0's on any other thread).
    fn pool(&self) -> &Arc<TargetPool> {
        // The shared runtime's one shard: no thread-local read on every pool call.
        if let [only] = &*self.pools {
            return only;
        }
        let worker = super::pool::current_worker();
        self.pools.get(worker).unwrap_or(&self.pools[0])
    }

    /// Every shard's snapshot merged ([`TargetPoolStats::merge_shard`]).
    fn stats(&self) -> TargetPoolStats {
        let mut shards = self.pools.iter().map(|p| p.stats());
        let mut all = shards.next().expect("at least one shard");
        for shard in shards {
            all.merge_shard(&shard);
        }
        all
    }
}

/// A connection ready for one request.
enum Conn {
    H1(H1Conn),
    H2(H2Conn),
}

/// A connection a request goes out on: run by hyper (HTTP/2, TLS, upgrades) or by our own
/// HTTP/1.1 client ([`h1`]). Both follow the same pool, retry and error rules
/// ([`Forwarder::forward`]).
enum Any {
    Hyper(Conn),
    Raw(Box<RawConn>),
}

/// Whether a request goes through our own HTTP/1.1 client ([`h1`]) rather than hyper's:
/// plain-TCP HTTP/1.1 targets, except `Upgrade` (WebSocket) and CONNECT requests, which need
/// hyper's upgrade machinery.
fn uses_own_client(endpoint: &TargetEndpoint, req: &Request<ProxyBody>, facts: Facts) -> bool {
    endpoint.tls.is_none()
        && !endpoint.http2
        && req.method() != Method::CONNECT
        && !facts
            .upgrade
            .unwrap_or_else(|| req.headers().contains_key(http::header::UPGRADE))
}

/// What the caller already knows of a request's headers, so that forwarding does not look
/// them up again (each lookup hashes the name): `None` where it does not know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// Whether it has a `Host` field.
    pub host: Option<bool>,
    /// Whether it has an `Upgrade` field.
    pub upgrade: Option<bool>,
}

/// Why sending a request on a connection failed, on either client.
enum SendError {
    /// The request was never written to the connection (hyper gave it back, or our own
    /// client's first write failed): it is whole and can go out on another connection. Hyper's
    /// gives it back here; our own client left it in the caller's place (`None`).
    NotSent(Option<Box<Request<ProxyBody>>>, BoxError),
    /// The request may have been written; no response head arrived.
    Failed {
        error: BoxError,
        /// It looks like the target closed a connection it had kept idle before the request
        /// arrived (see [`is_stale_connection_symptom`], [`h1::H1Error::is_stale_symptom`]).
        stale: bool,
        /// Reading the client's request body failed (our own client tells it apart).
        body: bool,
        /// The request's head as it went out is still in the caller's place (our own client
        /// leaves it there; hyper took the request).
        head_kept: bool,
    },
    /// No response head within the idle timeout.
    Timeout,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotSent(_, error) | Self::Failed { error, .. } => error.fmt(f),
            Self::Timeout => f.write_str("no response head within the idle timeout"),
        }
    }
}

impl Forwarder {
    /// A forwarder with no connections yet, one pool per target.
    pub fn new(config: ClientConfig) -> Self {
        Self::sharded(config, 1)
    }

    /// A forwarder whose target pools have one shard per L7 worker (`workers`, at least 1):
    /// each worker thread ([`crate::proxy::pool::current_worker`]) reuses only the connections
    /// it made, with their own estimator, sweeper task and HTTP/2 connection.
    pub fn sharded(config: ClientConfig, workers: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                targets: Mutex::new(TargetMap::default()),
                shards: workers.max(1),
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Sends `req` (already rewritten by the server side: headers, origin-form path) to
    /// `target` and returns the response with a streaming body.
    ///
    /// The request's version and URI form are adapted to the connection (HTTP/1.1 origin-form
    /// with `Host`, or HTTP/2 with `:scheme`/`:authority` taken from `Host`). Errors map to ALB
    /// statuses through [`ProxyError::status`]: refused/reset/unreachable or TLS failure →
    /// [`ProxyError::Connect`] (502), connecting too slow → [`ProxyError::ConnectTimeout`] (504),
    /// target broke off or answered garbage or an oversized head → [`ProxyError::TargetFailed`]
    /// (502), no response head within the idle timeout → [`ProxyError::TargetTimeout`] (504), the
    /// client's request body failed → [`ProxyError::ClientClosed`] (460).
    pub async fn forward(
        &self,
        target: &TargetEndpoint,
        mut req: Request<ProxyBody>,
    ) -> Result<Forwarded, ProxyError> {
        let target = self.target(target);
        self.forward_to(&target, &mut req, Facts::default(), None)
            .await
    }

    /// The handle on `endpoint`'s pool: the one the forwarder keeps for it, or a new one it
    /// keeps from now on (until [`retain_targets`](Self::retain_targets) forgets it). Takes
    /// the forwarder's lock; keep the handle rather than asking per request.
    pub fn target(&self, endpoint: &TargetEndpoint) -> TargetHandle {
        TargetHandle(self.inner.target(endpoint))
    }

    /// [`forward`](Self::forward) to a target the caller already holds the handle of: no lock,
    /// no lookup. `facts`: what the caller knows of the request's headers (true facts only).
    /// `tail`: fields that belong at the end of the request's map, kept out of it (our own
    /// client writes them after the map's fields; for hyper's they go into the map).
    ///
    /// `req` is borrowed: it stays in the caller's place for the whole forward (rewritten
    /// there, its body consumed there), and a retry on a new connection re-reads it from
    /// there. Taken by value, it was written into the forward's, a `send_raw` layer's and
    /// `h1::send`'s futures in turn, 224-240 bytes each, on every request.
    ///
    /// A plain function returning an `async move` block, not an `async fn`, which would store
    /// each argument twice in its future (captured, then moved into a local of the body on the
    /// first poll: the request and the tail, 312 bytes written once more per request).
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` stores each argument twice in its future (see above)"
    )]
    pub fn forward_to<'a>(
        &'a self,
        target: &'a TargetHandle,
        req: &'a mut Request<ProxyBody>,
        facts: Facts,
        mut tail: Option<ForwardedTail<'a>>,
    ) -> impl Future<Output = Result<Forwarded, ProxyError>> + Send + 'a {
        async move {
            let target = &target.0;
            // Whether our own client sends it does not depend on what `prepare_request` changes
            // (version, URI, `Host`); the tail goes into the map before those changes, where the
            // map functions would have put it.
            let own = uses_own_client(&target.endpoint, req, facts);
            if !own && let Some(tail) = tail.take() {
                tail.append_to(req.headers_mut());
            }
            // The request is rewritten and its body wrapped in place: passing it by value to
            // `prepare_request` and taking it apart and back (`into_parts`, `from_parts`) moved
            // its 224-240 bytes four times into this future, on every request.
            prepare_request(req, &target.endpoint, facts);
            let idempotent = is_idempotent(req.method());
            // Whether the request could be sent again if a reused connection turns out stale: an
            // idempotent method whose body is empty or small enough to be kept (see `Replay`).
            let retryable = idempotent
                && (http_body::Body::is_end_stream(req.body())
                    || http_body::Body::size_hint(req.body())
                        .upper()
                        .is_some_and(|n| n <= MAX_REPLAY_BYTES as u64));
            // An empty body (most requests) needs no watch: `Replay::watch` would give it back.
            let replay = if http_body::Body::is_end_stream(req.body()) {
                Replay::Empty
            } else {
                let (body, replay) = Replay::watch(std::mem::take(req.body_mut()), idempotent);
                *req.body_mut() = body;
                replay
            };
            // What a retry is built from: our own client gives back the head it sent, so a copy is
            // kept only for hyper's connections (a clone of every header, on every request).
            let template = (idempotent && !own).then(|| RequestTemplate::of(req));

            let mut retried = false;
            // A labelled block with `let … else`, not `if let`: the checkout's result (144
            // bytes) is then dead once taken apart, where as the `if let`'s scrutinee it was
            // kept in this future across the send and written there on every request.
            'pooled: {
                let Some((conn, idle_for)) = self.checkout(target, retryable, own).await else {
                    break 'pooled;
                };
                target.pool().count_reused();
                match self.send_any(target, conn, req, &mut tail, &replay).await {
                    Ok((response, no_hop_by_hop)) => {
                        if let Some(idle_for) = idle_for {
                            target.pool().observe_reuse_answered(idle_for);
                        }
                        return Ok(Forwarded {
                            response,
                            reused_connection: true,
                            retried: false,
                            connect_time: None,
                            no_hop_by_hop,
                        });
                    }
                    Err(SendError::NotSent(request, error)) => {
                        tracing::debug!(target_addr = %target.endpoint.addr, %error, "pooled connection closed before the request was written; retrying on a new connection");
                        // Hyper's client gives the request back; our own left it in place.
                        if let Some(request) = request {
                            *req = *request;
                        }
                    }
                    Err(SendError::Failed {
                        stale: true,
                        body,
                        error,
                        head_kept,
                    }) if !replay.body_failed() => {
                        let failed = SendError::Failed {
                            stale: true,
                            body,
                            error,
                            head_kept: false,
                        };
                        // Our own client left the head as sent in place: only the body is
                        // replayed into it. Hyper's took the request: it is built again.
                        let again = idempotent
                            && match (head_kept, template) {
                                (true, _) => {
                                    replay.replay().map(|body| *req.body_mut() = body).is_some()
                                }
                                (false, Some(template)) => replay
                                    .replay()
                                    .map(|body| *req = template.build(body))
                                    .is_some(),
                                (false, None) => false,
                            };
                        if !again {
                            return Err(self.error(target, failed, &replay));
                        }
                        tracing::debug!(target_addr = %target.endpoint.addr, error = %failed, "idempotent request failed on a pooled connection; retrying on a new connection");
                    }
                    Err(other) => return Err(self.error(target, other, &replay)),
                }
                retried = true;
                target.pool().count_retried();
            }

            let config = &self.inner.config;
            // Connecting is boxed (here and in `checkout`): it is rare once the pool is warm, and
            // its state would otherwise take room in every request's future, which HTTP/2 moves
            // into a task of its own per stream.
            let (conn, connect_time) = if own {
                let (conn, time) = Box::pin(connect::connect_raw(target, config)).await?;
                (Any::Raw(conn), time)
            } else {
                let (conn, time) = Box::pin(connect::connect(target, config)).await?;
                (Any::Hyper(conn), time)
            };
            target.pool().count_fresh();
            match self.send_any(target, conn, req, &mut tail, &replay).await {
                Ok((response, no_hop_by_hop)) => Ok(Forwarded {
                    response,
                    reused_connection: false,
                    retried,
                    connect_time: Some(connect_time),
                    no_hop_by_hop,
                }),
                Err(error) => Err(self.error(target, error, &replay)),
            }
        }
    }

    /// A pooled connection for the next request, with how long it was idle (HTTP/1.1 only):
    /// one of our own client's when `own`, else one hyper runs.
    async fn checkout(
        &self,
        target: &Target,
        retryable: bool,
        own: bool,
    ) -> Option<(Any, Option<Duration>)> {
        if own {
            let (conn, idle_for) = target.pool().checkout_raw(retryable)?;
            return Some((Any::Raw(conn), Some(idle_for)));
        }
        let (conn, idle_for) = Box::pin(self.pool_checkout(target, retryable)).await?;
        Some((Any::Hyper(conn), idle_for))
    }

    /// Sends on either client. Not an `async fn`: one would keep `conn` and `req` a second
    /// time beside the future it awaits. Always inlined: called, it returned its future (the
    /// send's state, several hundred bytes) into a temporary that `forward_to` then copied
    /// into its own state, on every request.
    ///
    /// Our own client's send is `h1::send`'s future itself, its failure mapped by a
    /// `map_err`: an `async fn` around it (`send_raw`, until stop 31) kept its arguments (the
    /// connection, the tail, five references: 120 bytes) in a layer of its own and copied
    /// them into the send's future on its first poll, per request. `tail` stays in the
    /// caller's place: a send that fails leaves it empty, its fields in the request's map.
    #[inline(always)]
    fn send_any<'a, 't: 'a>(
        &'a self,
        target: &'a Arc<Target>,
        conn: Any,
        req: &'a mut Request<ProxyBody>,
        tail: &'a mut Option<ForwardedTail<'t>>,
        replay: &'a Replay,
    ) -> impl Future<Output = Result<(Response<ProxyBody>, bool), SendError>> + 'a {
        use futures_util::TryFutureExt as _;
        use futures_util::future::Either;
        match conn {
            Any::Hyper(conn) => {
                // `forward_to` has put the tail into the map already: a request gets a
                // connection hyper runs only when it does not go through our own client.
                debug_assert!(tail.is_none(), "a tail reaches only our own client");
                // What hyper's client parsed is not known to be free of hop-by-hop fields.
                // Hyper takes the request by value (and gives it back if it did not send it).
                let req = std::mem::take(req);
                Either::Left(self.send(target, conn, req, replay).map_ok(|r| (r, false)))
            }
            Any::Raw(conn) => {
                let config = &self.inner.config;
                // `h1::send` bounds the exchange by the idle timeout itself, with the
                // connection's own timer, and takes the target's `Keep-Alive` hint from the
                // head, if it had one.
                Either::Right(
                    h1::send(
                        conn,
                        req,
                        tail,
                        config.max_response_header_bytes,
                        target.pool(),
                        target.endpoint.addr,
                        config.idle_timeout,
                        replay,
                    )
                    .map_err(raw_failure),
                )
            }
        }
    }

    /// Forgets every target whose address `keep` refuses: its pool, with its idle connections
    /// (closed as they drop) and its counters. Requests still running on such a target hold
    /// their own reference and finish; a later request to the address starts a fresh pool.
    /// Returns how many targets were forgotten. Without this, every target ever registered
    /// kept a pool until the process ended.
    pub fn retain_targets(&self, keep: impl Fn(SocketAddr) -> bool) -> usize {
        let mut targets = self.inner.lock_targets();
        let before = targets.len();
        targets.retain(|endpoint, _| keep(endpoint.addr));
        before - targets.len()
    }

    /// A snapshot of every target's pool: learned idle-close time, idle connections, counters
    /// (reused, fresh, retried after a stale connection, retired early, unproven reuse avoided).
    pub fn stats(&self) -> Vec<TargetPoolStats> {
        let targets: Vec<Arc<Target>> = self.inner.lock_targets().values().cloned().collect();
        targets.iter().map(|target| target.stats()).collect()
    }

    /// [`stats`](Self::stats) of every target, one entry per L7 worker's shard: `(worker,
    /// stats)`.
    pub fn stats_per_worker(&self) -> Vec<(usize, TargetPoolStats)> {
        let targets: Vec<Arc<Target>> = self.inner.lock_targets().values().cloned().collect();
        targets
            .iter()
            .flat_map(|target| {
                target
                    .pools
                    .iter()
                    .enumerate()
                    .map(|(worker, pool)| (worker, pool.stats()))
            })
            .collect()
    }

    async fn send(
        &self,
        target: &Arc<Target>,
        conn: Conn,
        req: Request<ProxyBody>,
        replay: &Replay,
    ) -> Result<Response<ProxyBody>, SendError> {
        let idle_timeout = self.inner.config.idle_timeout;
        let addr = target.endpoint.addr;
        let (response, checkin) = match conn {
            Conn::H1(mut conn) => {
                let sent = std::pin::pin!(conn.sender.try_send_request(req));
                let response = await_head(sent, idle_timeout, replay).await?;
                if let Some(hint) = crate::headers::keep_alive_timeout(response.headers()) {
                    target.pool().set_keep_alive_hint(hint);
                }
                // After a 101 the connection belongs to the upgrade; otherwise it goes back to
                // the pool when the body has been read.
                let checkin = (response.status() != StatusCode::SWITCHING_PROTOCOLS)
                    .then(|| Checkin::new(conn, Arc::clone(target.pool())));
                (response, checkin)
            }
            Conn::H2(mut conn) => {
                let sent = std::pin::pin!(conn.sender.try_send_request(req));
                (await_head(sent, idle_timeout, replay).await?, None)
            }
        };
        Ok(response.map(|body| TargetBody::new(body, addr, idle_timeout, checkin).boxed_unsync()))
    }

    fn error(&self, target: &Target, error: SendError, replay: &Replay) -> ProxyError {
        let addr = target.endpoint.addr.to_string();
        match error {
            SendError::Timeout => ProxyError::TargetTimeout {
                target: addr,
                timeout: self.inner.config.idle_timeout,
            },
            _ if replay.body_failed() => ProxyError::ClientClosed,
            SendError::Failed { body: true, .. } => ProxyError::ClientClosed,
            SendError::NotSent(_, error) | SendError::Failed { error, .. } => {
                ProxyError::TargetFailed {
                    target: addr,
                    source: error,
                }
            }
        }
    }
}

type Sent = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<ProxyBody>>>;

/// Waits for the response head. The idle timeout counts from the last request body bytes
/// sent, not from the start: a slow upload is activity, as on ALB's connections.
async fn await_head(
    sent: Pin<&mut impl Future<Output = Sent>>,
    idle_timeout: Duration,
    replay: &Replay,
) -> Result<Response<Incoming>, SendError> {
    let started = tokio::time::Instant::now();
    let timer = std::pin::pin!(tokio::time::sleep_until(started + idle_timeout));
    match within_idle_timeout(sent, timer, started, idle_timeout, replay).await {
        Some(result) => receive(result),
        None => Err(SendError::Timeout),
    }
}

/// Runs `exchange` (sending a request and waiting for its response head) unless it goes quiet
/// for the idle timeout (`None`): quiet since `started` or the last request body bytes sent.
/// Both paths to targets use it: lb's HTTP/1.1 client with its connection's kept timer, hyper's
/// with a new one. `exchange` comes pinned by the caller, which keeps it in its own state (an
/// `async fn` taking it by value would hold a second, pinned copy). `timer` is due at `started + idle_timeout` or
/// earlier; when it fires before the real deadline (set for an earlier request, or the body is
/// still uploading), it is set to that deadline.
pub(crate) async fn within_idle_timeout<T>(
    mut exchange: Pin<&mut impl Future<Output = T>>,
    mut timer: Pin<&mut tokio::time::Sleep>,
    started: tokio::time::Instant,
    idle_timeout: Duration,
    replay: &Replay,
) -> Option<T> {
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = exchange.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        poll_idle_deadline(timer.as_mut(), cx, || {
            let quiet_since = replay
                .last_activity()
                .map_or(started, |last| last.max(started));
            quiet_since + idle_timeout
        })
        .map(|()| None)
    })
    .await
}

/// Our own client's failure as either client's [`SendError`].
fn raw_failure(failure: h1::Failure) -> SendError {
    match failure {
        h1::Failure::TimedOut => SendError::Timeout,
        h1::Failure::NotSent(error) => SendError::NotSent(None, Box::new(error)),
        h1::Failure::Failed(error) => SendError::Failed {
            stale: error.is_stale_symptom(),
            body: matches!(error, h1::H1Error::Body(_)),
            error: Box::new(error),
            head_kept: true,
        },
    }
}

fn receive(result: Sent) -> Result<Response<Incoming>, SendError> {
    match result {
        Ok(response) => Ok(response),
        Err(mut error) => match error.take_message() {
            Some(request) => Err(SendError::NotSent(
                Some(Box::new(request)),
                Box::new(error.into_error()),
            )),
            None => {
                let error = error.into_error();
                Err(SendError::Failed {
                    stale: is_stale_connection_symptom(&error),
                    body: false,
                    error: Box::new(error),
                    head_kept: false,
                })
            }
        },
    }
}

impl Inner {
    fn lock_targets(&self) -> std::sync::MutexGuard<'_, TargetMap> {
        self.targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn target(&self, endpoint: &TargetEndpoint) -> Arc<Target> {
        let mut targets = self.lock_targets();
        if let Some(target) = targets.get(endpoint) {
            return Arc::clone(target);
        }
        let tls = endpoint.tls.as_ref().map(|tls| {
            let alpn: &[u8] = if endpoint.http2 { b"h2" } else { b"http/1.1" };
            let config = tls::client_config(tls, alpn).map_err(|e| e.to_string())?;
            let name = tls::server_name(tls, endpoint.addr)
                .map_err(|e| format!("server name {:?}: {e}", tls.server_name))?;
            Ok((config, name))
        });
        let pools = (0..self.shards)
            .map(|worker| {
                let pool = TargetPool::new(
                    endpoint.addr,
                    endpoint.tls.is_some(),
                    endpoint.http2,
                    self.config.idle_timeout,
                    self.config.max_idle_per_target,
                );
                Arc::new(if self.shards > 1 {
                    pool.for_worker(worker)
                } else {
                    pool
                })
            })
            .collect();
        let target = Arc::new(Target {
            endpoint: endpoint.clone(),
            pools,
            tls,
        });
        targets.insert(endpoint.clone(), Arc::clone(&target));
        target
    }
}

impl Forwarder {
    /// A pooled connection for the next request on hyper's client, with how long it was idle
    /// (HTTP/1.1 only). On plain-TCP targets the pool holds our own client's connections; an
    /// idle one is handed to hyper.
    async fn pool_checkout(
        &self,
        target: &Target,
        retryable: bool,
    ) -> Option<(Conn, Option<Duration>)> {
        if target.endpoint.http2 {
            return target.pool().checkout_h2().map(|c| (Conn::H2(c), None));
        }
        if let Some(reused) = target.pool().checkout_h1(retryable) {
            return Some((Conn::H1(reused.conn), Some(reused.idle_for)));
        }
        if target.endpoint.tls.is_some() {
            return None;
        }
        let (raw, idle_for) = target.pool().checkout_raw(retryable)?;
        let conn = connect::into_hyper(target, &self.inner.config, raw)
            .await
            .ok()?;
        Some((conn, Some(idle_for)))
    }
}

/// Idempotent methods (RFC 9110 §9.2.2): sending them twice has the effect of sending them once,
/// so a request that may have reached the target can be sent again.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a failure on a reused connection looks like the target having closed it (so the
/// request never got a chance): closed, reset or broken before a response head. Timeouts and
/// malformed responses are the target's answer, not staleness, and are not retried.
fn is_stale_connection_symptom(error: &hyper::Error) -> bool {
    if error.is_parse() || error.is_timeout() || error.is_user() {
        return false;
    }
    if error.is_incomplete_message() || error.is_canceled() || error.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = cause.source();
    }
    false
}

/// What is needed to build an idempotent request again for a retry.
struct RequestTemplate {
    method: Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
    extensions: http::Extensions,
}

impl RequestTemplate {
    fn of<B>(req: &Request<B>) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            extensions: req.extensions().clone(),
        }
    }

    fn build(self, body: ProxyBody) -> Request<ProxyBody> {
        let Self {
            method,
            uri,
            version,
            headers,
            extensions,
        } = self;
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        *req.extensions_mut() = extensions;
        req
    }
}

/// Adapts version and URI form to the connection: HTTP/1.1 wants origin-form and `Host`;
/// HTTP/2 wants `:scheme` and `:authority` (from the URI, else `Host`, else the address).
fn prepare_request(req: &mut Request<ProxyBody>, endpoint: &TargetEndpoint, facts: Facts) {
    if req.method() == Method::CONNECT {
        return;
    }
    // Only asked for when needed: an HTTP/1.1 request with its `Host` (every one the native
    // path forwards) needs no authority, and parsing one copies it.
    let authority = |req: &Request<ProxyBody>| {
        let authority = req.uri().authority().cloned().or_else(|| {
            let host = req.headers().get(HOST)?.to_str().ok()?;
            Authority::try_from(host).ok()
        });
        authority.unwrap_or_else(|| {
            Authority::try_from(endpoint.addr.to_string().as_str())
                .unwrap_or_else(|_| Authority::from_static("localhost"))
        })
    };
    let path = |req: &Request<ProxyBody>| {
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    };
    if endpoint.http2 {
        let (authority, path) = (authority(req), path(req));
        *req.version_mut() = Version::HTTP_2;
        let scheme = if endpoint.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        if let Ok(uri) = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path)
            .build()
        {
            *req.uri_mut() = uri;
            // `:authority` carries the host now. RFC 9113 lets an intermediary keep `Host`
            // too, but nginx (1.22, Debian 12's) refuses such a request as carrying a
            // duplicate host; HAProxy and Envoy send `:authority` alone, and so does lb.
            req.headers_mut().remove(HOST);
        }
    } else {
        *req.version_mut() = Version::HTTP_11;
        if !facts
            .host
            .unwrap_or_else(|| req.headers().contains_key(HOST))
            && let Ok(host) = http::HeaderValue::from_str(authority(req).as_str())
        {
            req.headers_mut().insert(HOST, host);
        }
        if req.uri().authority().is_some() {
            *req.uri_mut() = Uri::from(path(req));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(
        mut req: Request<ProxyBody>,
        endpoint: &TargetEndpoint,
        facts: Facts,
    ) -> Request<ProxyBody> {
        prepare_request(&mut req, endpoint, facts);
        req
    }

    fn request(uri: &str, host: Option<&str>) -> Request<ProxyBody> {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        builder
            .body(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .expect("valid test request")
    }

    fn endpoint(http2: bool, tls: bool) -> TargetEndpoint {
        TargetEndpoint {
            addr: "127.0.0.1:8080".parse().expect("valid address"),
            tls: tls.then(|| TargetTls {
                server_name: "example.test".into(),
                verify: false,
                ca_file: None,
            }),
            http2,
        }
    }

    #[test]
    fn idempotent_methods_are_those_of_rfc_9110() {
        for method in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&method), "{method}");
        }
        for method in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&method), "{method}");
        }
    }

    #[test]
    fn http1_requests_are_sent_in_origin_form_with_host() {
        let req = prepared(
            request("http://app.test:81/a?b=1", None),
            &endpoint(false, false),
            Facts::default(),
        );
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()[HOST], "app.test:81");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn http1_requests_keep_the_clients_host() {
        let req = prepared(
            request("/x", Some("app.test")),
            &endpoint(false, false),
            Facts::default(),
        );
        assert_eq!(req.uri(), "/x");
        assert_eq!(req.headers()[HOST], "app.test");
    }

    /// Requests prepared with what the caller knows of their headers come out as those
    /// prepared by looking, and go to the same client, for every kind of endpoint and request;
    /// counts that a `Host` was added and that both clients were chosen.
    #[test]
    fn known_facts_prepare_what_looking_prepares() {
        let (mut added, mut own, mut hyper) = (0, 0, 0);
        for uri in ["/x?y", "http://app.test:81/a", "*"] {
            for host in [None, Some("app.test")] {
                for upgrade in [false, true] {
                    for method in [Method::GET, Method::CONNECT] {
                        for (h2, tls) in
                            [(false, false), (true, false), (true, true), (false, true)]
                        {
                            let make = || {
                                let mut req = request(uri, host);
                                *req.method_mut() = method.clone();
                                if upgrade {
                                    req.headers_mut().insert(
                                        http::header::UPGRADE,
                                        "websocket".parse().unwrap(),
                                    );
                                }
                                req
                            };
                            let endpoint = endpoint(h2, tls);
                            let facts = Facts {
                                host: Some(host.is_some()),
                                upgrade: Some(upgrade),
                            };
                            let known = prepared(make(), &endpoint, facts);
                            let looked = prepared(make(), &endpoint, Facts::default());
                            assert_eq!(
                                (known.uri(), known.version(), known.headers()),
                                (looked.uri(), looked.version(), looked.headers())
                            );
                            let chosen = uses_own_client(&endpoint, &known, facts);
                            assert_eq!(
                                chosen,
                                uses_own_client(&endpoint, &looked, Facts::default())
                            );
                            added +=
                                usize::from(host.is_none() && known.headers().contains_key(HOST));
                            own += usize::from(chosen);
                            hyper += usize::from(!chosen);
                        }
                    }
                }
            }
        }
        assert!(added > 0 && own > 0 && hyper > 0, "{added} {own} {hyper}");
    }

    #[test]
    fn http2_requests_get_scheme_and_authority_from_host() {
        let req = prepared(
            request("/x?y", Some("app.test")),
            &endpoint(true, true),
            Facts::default(),
        );
        assert_eq!(req.uri(), "https://app.test/x?y");
        assert_eq!(req.version(), Version::HTTP_2);
        let req = prepared(request("/", None), &endpoint(true, false), Facts::default());
        assert_eq!(req.uri(), "http://127.0.0.1:8080/");
    }

    #[test]
    fn client_config_defaults_are_albs() {
        let ClientConfig {
            idle_timeout,
            connect_timeout,
            max_response_header_bytes,
            max_idle_per_target,
        } = ClientConfig::default();
        assert_eq!(idle_timeout, Duration::from_secs(60));
        assert_eq!(connect_timeout, Duration::from_secs(10));
        assert_eq!(max_response_header_bytes, 32 * 1024);
        assert!(max_idle_per_target > 0);
    }
}
