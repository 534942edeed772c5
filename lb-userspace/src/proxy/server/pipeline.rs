//! The per-request pipeline, in ALB's order:
//!
//! 1. the sniffer's verdict (HTTP/1): limits, 408, 501, 505 decided on the raw head, and the
//!    desync classification with the listener's mitigation (block → 400 + close);
//! 2. TRACE → 405; a version other than 1.0/1.1/2 → 505 (HTTP/2 requests only reach here as 2);
//! 3. rule evaluation → action: fixed response, redirect, or forward:
//!    group (weighted, `AWSALBTG` group stickiness) → target (`TargetGroup::pick`, none → 503) →
//!    protocol check (464) → header rewrite (463 on too many `X-Forwarded-For`) →
//!    `Forwarder` → response streamed back with the pick's `Set-Cookie`;
//!    a 101 to an `Upgrade` request becomes a byte tunnel (WebSocket).
//!
//! Every response the load balancer makes itself has ALB's status and a small HTML body, and
//! `Connection: close` where ALB closes the connection. A handler dropped before it produced a
//! response means the client went away: 460, counted and traced, nothing sent.
//!
//! Each request fills one record ([`Exchange`]) on the way: emitted when the load balancer
//! answers itself, when the response body ends or is dropped, when the handler is dropped
//! (460), or when a WebSocket tunnel closes; the access log and every request counter come
//! from it.
use std::convert::Infallible;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio_util::sync::{WaitForCancellationFuture, WaitForCancellationFutureOwned};

use super::abuse::StreamCancellations;
use super::exchange::{ConnInfo, Counted, Exchange};
use super::limits::ConnectionSlot;
use super::sniff::{ConnShared, HeadVerdict};
use super::{Listener, Phase};
use crate::accesslog::{ActionKind, LbError};
use crate::headers::{
    ForwardedPeer, ForwardedTail, apply_forwarded, cookie_values, is_hop_by_hop, request_cookies,
    strip_hop_by_hop, trace_id,
};
use crate::proxy::client::{BoxError, Facts, Forwarded, ProxyBody, TargetEndpoint, TargetTls};
use crate::proxy::desync::{Classification, Mitigation, Tier};
use crate::proxy::error::ProxyError;
use crate::rules::{
    FixedResponseAction, GROUP_COOKIE, RedirectAction, RequestView, ResolvedAction,
    ResolvedForward, ResolvedRuleSet,
};
use crate::targets::{Picked, ProtocolVersion, Registration, TargetProtocol};

/// Per-connection context of the request handler.
pub(super) struct ConnCtx {
    pub listener: Arc<Listener>,
    pub peer: SocketAddr,
    /// `peer`'s address as an `X-Forwarded-For` entry, written once for all the
    /// connection's requests.
    pub forwarded_peer: ForwardedPeer,
    pub conn: Arc<ConnShared>,
    /// The connection's place under the listener's connection limits; a WebSocket tunnel
    /// keeps it until the tunnel ends.
    pub slot: Arc<ConnectionSlot>,
    /// Cancelled and answered HTTP/2 streams (rapid-reset detection).
    pub abuse: Arc<StreamCancellations>,
    /// What the connection tells each request's record.
    pub info: ConnInfo,
}

/// A response and whether the client connection must close after it.
struct Outcome {
    response: Response<ProxyBody>,
    close: bool,
    /// A forwarded response's target pick (its count of requests in flight, and the signal
    /// that it left its group, borrowed: a token clone per request took the token tree's lock
    /// twice): kept until the response body is over.
    target: Option<Picked>,
}

impl Outcome {
    fn keep(response: Response<ProxyBody>) -> Self {
        Self {
            response,
            close: false,
            target: None,
        }
    }
}

fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body. `Empty` and the error mapping are zero-sized, so boxing it allocates nothing.
fn empty_body() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The page ALB sends with the errors it generates, e.g. `<title>502 Bad Gateway</title>`.
/// ALB's own wording for 503 and 504 (nginx-style), the standard reason phrase otherwise, and
/// just the number for ALB's non-standard 460/463/464.
pub(super) fn error_page(status: StatusCode) -> String {
    let reason = match status.as_u16() {
        503 => Some("Service Temporarily Unavailable"),
        504 => Some("Gateway Time-out"),
        _ => status.canonical_reason(),
    };
    let title = match reason {
        Some(reason) => format!("{} {}", status.as_u16(), reason),
        None => status.as_u16().to_string(),
    };
    format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n</body>\r\n</html>\r\n"
    )
}

/// A load-balancer-generated error response; `why` goes into the record.
///
/// Out of line and cold, as [`from_error`]: inlined, its page, response and header insert
/// sized the frames of `route`, `prepare_forward` and `Reply::finish`, and every request ran
/// below them (stop 33).
#[cold]
#[inline(never)]
fn lb_error(
    ex: &mut Exchange,
    status: StatusCode,
    close: bool,
    why: Option<(LbError, String)>,
) -> Outcome {
    ex.answer(status, why);
    let mut response = Response::new(full(error_page(status)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    Outcome {
        response,
        close,
        target: None,
    }
}

/// Statuses after which ALB closes the client connection: the request's framing cannot be
/// trusted (400, 501, 505) or the client was too slow (408).
fn closes_connection(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 408 | 501 | 505)
}

/// The error response for `e` (see [`lb_error`] for why it is out of line).
#[cold]
#[inline(never)]
fn from_error(ex: &mut Exchange, e: &ProxyError) -> Outcome {
    let status = e.status();
    ex.failed(e);
    if let ProxyError::ClientClosed = e {
        // 460: the client went away (its request body broke off); nothing can reach it. The
        // response below only lets hyper finish; the connection closes.
        tracing::info!(
            status = status.as_u16(),
            "client closed the connection before the response"
        );
        let mut response = Response::new(full(Bytes::new()));
        *response.status_mut() = status;
        return Outcome {
            response,
            close: true,
            target: None,
        };
    }
    tracing::debug!(error = %e, status = status.as_u16(), "request failed");
    let mut response = Response::new(full(error_page(status)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    Outcome {
        response,
        close: closes_connection(status),
        target: None,
    }
}

/// Marks the request in flight until dropped (with the response body, if any).
struct Inflight(Arc<ConnShared>);

impl Inflight {
    fn new(conn: &Arc<ConnShared>) -> Self {
        conn.request_started();
        Self(conn.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// Tallies an HTTP/2 stream for rapid-reset detection: cancelled if the handler is dropped
/// (the client reset the stream) before a response exists, answered otherwise. (The 460
/// itself is the record's: see [`Exchange`].)
struct ClientGone {
    armed: bool,
    /// Set for HTTP/2 streams.
    stream: Option<Arc<StreamCancellations>>,
}

impl Drop for ClientGone {
    fn drop(&mut self) {
        if let Some(stream) = &self.stream {
            if self.armed {
                stream.cancelled();
            } else {
                stream.answered();
            }
        }
    }
}

/// Every response body the pipeline hands out, in one allocation: the response's own body
/// and what lives as long as it does. Until the body has been sent, fails or is dropped it
/// keeps the target pick and the request's in-flight mark, counts what reaches the client into
/// the request's record and emits the record at the end; a forwarded body ends with an error
/// when its target leaves the group (its deregistration delay is over): the client sees the
/// response cut off, as from ALB.
///
/// (One type instead of a box per concern: the cut-off watch, the pick, the record and the
/// in-flight mark were four wrappers, five allocations per forwarded request.)
struct Answer {
    inner: ProxyBody,
    /// A forwarded body's target, watched for leaving its group.
    cut: Option<Cut>,
    exchange: Option<Exchange>,
    inflight: Option<Inflight>,
}

/// Holds the target a response body streams from and watches for it leaving its group (the
/// signal is the pick's, [`Picked::gone`]).
struct Cut {
    picked: Picked,
    /// Registered only when the body has to wait (the usual small body never does), so the
    /// wait costs an allocation (and a token clone) only then.
    waiting: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl Cut {
    fn new(picked: Picked) -> Self {
        Self {
            picked,
            waiting: None,
        }
    }

    /// Whether the target is gone; with `cx`, the task is also woken when it goes.
    fn poll_gone(&mut self, cx: Option<&mut Context<'_>>) -> bool {
        if self.picked.left() {
            return true;
        }
        let Some(cx) = cx else {
            return false;
        };
        let picked = &self.picked;
        self.waiting
            .get_or_insert_with(|| Box::pin(picked.gone_owned()))
            .as_mut()
            .poll(cx)
            .is_ready()
    }
}

impl Answer {
    fn new(inner: ProxyBody, inflight: Inflight) -> Self {
        Self {
            inner,
            cut: None,
            exchange: None,
            inflight: Some(inflight),
        }
    }

    /// The body is over (ended, failed or cut off): the record is emitted and the guards go.
    fn done(&mut self, error: Option<String>) {
        self.cut = None;
        if let Some(mut ex) = self.exchange.take() {
            if let Some(e) = error {
                ex.body_failed(e);
            }
            ex.finish();
        }
        self.inflight = None;
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        const CUT_OFF: &str = "target left its group (deregistration delay over)";
        let this = self.get_mut();
        if let Some(cut) = &mut this.cut
            && cut.poll_gone(None)
        {
            this.done(Some(CUT_OFF.to_owned()));
            return Poll::Ready(Some(Err(CUT_OFF.into())));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(ex)) = (frame.data_ref(), this.exchange.as_mut()) {
                    ex.sent_body(d.len() as u64);
                }
                if this.inner.is_end_stream() {
                    this.done(None);
                }
            }
            Poll::Ready(None) => this.done(None),
            Poll::Ready(Some(Err(e))) => this.done(Some(e.to_string())),
            Poll::Pending => {
                if let Some(cut) = &mut this.cut
                    && cut.poll_gone(Some(cx))
                {
                    this.done(Some(CUT_OFF.to_owned()));
                    return Poll::Ready(Some(Err(CUT_OFF.into())));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Watches on the targets a connection's requests went to, kept from one request to the next
/// (the native HTTP/1 loop's; hyper's and HTTP/2's handlers watch per request). A request
/// forwarded to a target it watches already polls that watch: its waiter stays in the
/// target's list with the connection task's waker, where a watch made per request registered
/// its waiter and removed it again (about 260 instructions per request). A target that left
/// its group wakes the connection task; the request in flight on it, if any, sees it gone.
///
/// At most [`TargetWatches::KEPT`] targets: a request to another one, when each place is
/// taken by a registration still alive, watches for itself as before (a connection spread
/// over many targets gains nothing and loses nothing but a few compares).
///
/// The connection's first forwarded request watches for itself too: a kept watch costs an
/// allocation, a token clone (the token tree's lock, again at its drop) and a `Weak` more
/// than a request's own, which only a later request pays back, and most connections made
/// for one request (HTTP/1.0, `Connection: close`, a full TLS handshake per request) never
/// make one. Watches are kept from the second forwarded request on, for whichever targets
/// the requests go to (a marker per registration instead would never keep the watches of a
/// connection whose requests alternate between two targets).
#[derive(Default)]
pub(super) struct TargetWatches {
    kept: [Option<KeptWatch>; TargetWatches::KEPT],
    /// Whether a request of this connection was forwarded already (see above).
    forwarded: bool,
}

struct KeptWatch {
    of: Registration,
    waiting: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker `waiting` was last polled with (a no-op one before its first poll).
    waker: std::task::Waker,
}

impl KeptWatch {
    /// Ready when `picked`'s target (this watch's) left its group; else pending, the task
    /// woken when it leaves. `waiting` is polled only when `cx`'s waker would not wake the
    /// task it holds: its waiter stays registered with that one, and polling it again took
    /// the token's lock and the waiter list's, about 140 instructions per request.
    fn poll(&mut self, picked: &Picked, cx: &mut Context<'_>) -> Poll<()> {
        if picked.left() {
            return Poll::Ready(());
        }
        if self.waker.will_wake(cx.waker()) {
            return Poll::Pending;
        }
        let polled = self.waiting.as_mut().poll(cx);
        if polled.is_pending() {
            self.waker.clone_from(cx.waker());
        }
        polled
    }
}

impl TargetWatches {
    /// Targets watched at once.
    pub(super) const KEPT: usize = 4;

    /// The kept watch on `picked`'s target, for one forwarded request (called once per
    /// request): the one there is, or a new one in a place that is free or whose
    /// registration is over. `None` for the connection's first forwarded request, and when
    /// every place holds a live registration.
    fn watch(&mut self, picked: &Picked) -> Option<&mut KeptWatch> {
        if !std::mem::replace(&mut self.forwarded, true) {
            return None;
        }
        let at = match self
            .kept
            .iter()
            .position(|k| k.as_ref().is_some_and(|k| picked.is_of(&k.of)))
        {
            Some(at) => at,
            None => {
                let at = self
                    .kept
                    .iter()
                    .position(|k| k.as_ref().is_none_or(|k| k.of.is_over()))?;
                self.kept[at] = Some(KeptWatch {
                    of: picked.registration(),
                    waiting: Box::pin(picked.gone_owned()),
                    waker: std::task::Waker::noop().clone(),
                });
                at
            }
        };
        self.kept[at].as_mut()
    }

    /// Targets watched now (tests).
    #[cfg(test)]
    fn watched(&self) -> usize {
        self.kept.iter().flatten().count()
    }
}

/// What the pipeline takes as a request body: hyper's `Incoming`, or the native HTTP/1
/// path's own (`h1.rs`).
pub(super) trait RequestBody:
    Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

impl<B> RequestBody for B where B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{}

/// A request as the handler takes it: its body boxed as the forwarder sends it, and the
/// counter of the body's bytes (none for a body without content, which boxes without
/// allocating). Called by [`handle`]'s callers before the handler's future is made, so that
/// `handle` only returns its block (see there).
pub(super) fn forwardable<B: RequestBody>(
    req: Request<B>,
) -> (Request<ProxyBody>, Option<Arc<AtomicU64>>) {
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        // Nothing to stream or count (a GET, say): no counter.
        drop(body);
        return (Request::from_parts(parts, empty_body()), None);
    }
    let (counted, n) = Counted::new(body);
    (
        Request::from_parts(parts, counted.map_err(Into::into).boxed_unsync()),
        Some(n),
    )
}

/// The request handler of one connection (hyper's service; the native HTTP/1 loop calls it
/// too). `ctx`: the service's `Arc` (its future must own what it reads), or a plain
/// reference where the caller outlives the future (the native loop: no `Arc` clone and drop,
/// two atomic read-modify-writes, per request). `req` and `body_in`: what [`forwardable`]
/// made of the request. `watches`: the connection's kept watches on its targets, if it keeps
/// them (the native loop), else the request watches its target for itself.
///
/// The request comes with its body boxed as the forwarder takes it, so the future holds the
/// request once, as it is forwarded: routing rewrites it in place. (It was captured with its
/// own body type and rebuilt by the routing into a second request, returned by value through
/// the routing and kept beside the first across the forward: 224 more bytes of the future,
/// and the routing's copies of the request, written per request.) The body is boxed by the
/// callers, not here: any work before the block makes the compiler build the whole future on
/// the stack and copy it into HTTP/2's heap slot (stop 31, about 2.5 KB per request).
///
/// A plain function returning an `async move` block, not an `async fn`: an `async fn` moves
/// each argument from its future's captured state into a local of the body on the first
/// poll, so the request (264 bytes) was stored twice in the stream's future and copied once
/// more per request; the block uses what it captured in place.
#[expect(
    clippy::manual_async_fn,
    reason = "an `async fn` stores each argument twice in its future (see above)"
)]
pub(super) fn handle<C: std::borrow::Borrow<Arc<ConnCtx>> + Send>(
    ctx: C,
    mut req: Request<ProxyBody>,
    body_in: Option<Arc<AtomicU64>>,
    watches: Option<&mut TargetWatches>,
) -> impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send {
    async move {
        // Borrowed by the native HTTP/1 loop (which awaits the handler in place), owned by an
        // HTTP/2 stream's future; the record's exchange takes a clone of its own.
        let ctx: &Arc<ConnCtx> = ctx.borrow();
        let version = req.version();
        if version == Version::HTTP_2 && ctx.abuse.is_tripped() {
            // The connection was judged abusive (rapid reset) and is being closed: the streams
            // h2 still accepts before the GOAWAY takes effect never reach a target, however far
            // behind the connection task is.
            return Ok(refused());
        }
        let inflight = Inflight::new(&ctx.conn);
        let gone = ClientGone {
            armed: true,
            stream: (version == Version::HTTP_2).then(|| ctx.abuse.clone()),
        };
        let verdict = if version == Version::HTTP_2 {
            None
        } else {
            ctx.conn.pop_verdict()
        };
        let mut ex = Exchange::start(ctx.clone(), &req, verdict.as_ref());
        // The record counts what the body yields; a body the load balancer answers without
        // forwarding is dropped unread and adds nothing.
        ex.count_body(body_in);
        let upgrade_pending = matches!(verdict, Some(HeadVerdict::Pass { upgrade: true, .. }));
        // One version of the rules (and of the groups they were resolved against) for the
        // routing, whatever changes meanwhile: a guard, not an `Arc` clone (a write of the
        // rule set's shared count line by every request, from every worker). The guard is
        // dropped with the routing, before the await: what the forward and the reply need is
        // owned or borrowed from the connection. Held across the await, it outlived the
        // thread's eight guard slots whenever more than eight requests per worker wait for
        // their targets (any keep-alive load of more connections, any HTTP/2 load), and each
        // guard past those took the rule set's count after all, plus arc_swap's fallback.
        // Routing and the request's rewrite (in place) are plain functions and the forward is
        // awaited here, the handler's only await: each nested async function copied the
        // request (and its own arguments) into its future and again into its locals, on every
        // request. The routing result is taken apart in this statement, so it is dead before
        // the await: matched in the expression the await's result went to, it (472 bytes) was
        // kept in the stream's future across the forward and written there on every request.
        let Dispatch {
            facts,
            tail,
            endpoint,
            reply,
        } = match route(ctx, &ctx.listener.rules.load(), verdict, &mut req, &mut ex) {
            Routed::Answer(outcome) => {
                // The request body goes now, as when the routing took the request by value
                // (the native loop learns at once that it was not read).
                drop(std::mem::take(req.body_mut()));
                return Ok(respond(
                    ctx,
                    outcome,
                    ex,
                    inflight,
                    gone,
                    version,
                    upgrade_pending,
                ));
            }
            Routed::Forward(dispatch) => dispatch,
        };
        ex.dispatching();
        // The pick keeps the forwarder's handle on its target's pool: only the first
        // request to a registration asks the forwarder (its lock, a hash of the endpoint).
        let forwarder = &ctx.listener.shared.forwarder;
        let target = reply
            .picked
            .target_handle(|| forwarder.target(&endpoint.of(reply.picked.addr)));
        let polled = {
            // The forward and the watch on its target (when the target's deregistration
            // delay ends, what is still open on it is closed), pinned where they are
            // made and polled in place, the forward first: `select! { biased; … }`
            // copied the forward's future, over 3 KiB, twice more per request. The
            // watch is polled only when the forward has to wait (in practice always: it
            // waits for the target): the connection's kept one ([`TargetWatches`], looked
            // up once per request) if it has one for the target, else one made here.
            let mut forwarding =
                std::pin::pin!(forwarder.forward_to(target, &mut req, facts, tail));
            let mut own_watch = std::pin::pin!(None::<WaitForCancellationFuture<'_>>);
            let mut kept = watches.and_then(|w| w.watch(&reply.picked));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = forwarding.as_mut().poll(cx) {
                    return Poll::Ready(Some(result));
                }
                if let Some(kept) = kept.as_deref_mut() {
                    return kept.poll(&reply.picked, cx).map(|()| None);
                }
                if own_watch.is_none() {
                    own_watch.set(Some(reply.picked.gone()));
                }
                match own_watch.as_mut().as_pin_mut() {
                    Some(watch) => watch.poll(cx).map(|()| None),
                    None => Poll::Pending,
                }
            })
            .await
        };
        let outcome = reply.finish(ctx, polled, &mut ex);
        Ok(respond(
            ctx,
            outcome,
            ex,
            inflight,
            gone,
            version,
            upgrade_pending,
        ))
    }
}

/// The response's last steps, for the load balancer's own answer and a target's alike: the
/// upgrade decision, `Connection: close`, the stream's tally, the record, and the body's
/// wrapper that ends the request in flight (and the record, when the target's body ends).
fn respond(
    ctx: &ConnCtx,
    outcome: Outcome,
    mut ex: Exchange,
    inflight: Inflight,
    mut gone: ClientGone,
    version: Version,
    upgrade_pending: bool,
) -> Response<ProxyBody> {
    let Outcome {
        mut response,
        close,
        target,
    } = outcome;
    if upgrade_pending {
        ctx.conn
            .decide_upgrade(response.status() == StatusCode::SWITCHING_PROTOCOLS);
    }
    if close && version != Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    gone.armed = false;
    ex.responding(response.status(), response.headers());
    let answer = |body: ProxyBody, exchange: Option<Exchange>| {
        let mut answer = Answer::new(body, inflight);
        answer.cut = target.map(Cut::new);
        answer.exchange = exchange;
        answer.boxed_unsync()
    };
    // One `map` for every case: each inlined copy of it moved the response (and the boxing
    // closure) through slots of its own in this frame.
    let exchange = if !ex.answered_by_target() {
        // The load balancer's own answer (or a 101 whose record went to the tunnel): its
        // body is known whole, so the record is complete now.
        if let Some(n) = response.body().size_hint().exact() {
            ex.sent_body(n);
        }
        ex.finish();
        None
    } else if response.body().is_end_stream() {
        // hyper may never poll an empty body.
        ex.finish();
        None
    } else {
        Some(ex)
    };
    response.map(|b| answer(b, exchange))
}

/// The empty 503 a stream of a connection judged abusive gets. Out of line and cold: the
/// handler's frame is polled on every request.
#[cold]
#[inline(never)]
fn refused() -> Response<ProxyBody> {
    let mut refused = Response::new(full(Bytes::new()));
    *refused.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    refused
}

/// What routing decided: the load balancer's own answer, or a request to forward.
enum Routed<'r> {
    Answer(Outcome),
    Forward(Dispatch<'r>),
}

impl From<Outcome> for Routed<'_> {
    fn from(outcome: Outcome) -> Self {
        Self::Answer(outcome)
    }
}

/// What sending the request (rewritten for its target in place) needs.
struct Dispatch<'r> {
    /// What is known of the request's headers (the forwarder need not look them up).
    facts: Facts,
    /// The forwarded fields and the trace id, when they are kept out of the request's map.
    tail: Option<ForwardedTail<'r>>,
    /// How the group reaches its targets (used only if the pick has no pool handle yet).
    endpoint: EndpointSettings,
    reply: Reply,
}

/// How a target group reaches its targets: what a [`TargetEndpoint`] takes from the group's
/// configuration. Plain data, so a request carries it without building the endpoint (and,
/// for HTTPS, its SNI string) every time.
#[derive(Clone, Copy, Debug)]
struct EndpointSettings {
    https: bool,
    verify_tls: bool,
    http2: bool,
}

impl EndpointSettings {
    fn of_group(cfg: &crate::targets::TargetGroupConfig) -> Self {
        Self {
            https: cfg.protocol == TargetProtocol::Https,
            verify_tls: cfg.verify_tls,
            http2: cfg.protocol_version == ProtocolVersion::Http2,
        }
    }

    /// The endpoint of the target at `addr`.
    fn of(self, addr: SocketAddr) -> TargetEndpoint {
        TargetEndpoint {
            addr,
            tls: self.https.then(|| TargetTls {
                server_name: addr.ip().to_string(),
                verify: self.verify_tls,
                ca_file: None,
            }),
            http2: self.http2,
        }
    }
}

/// What the target's response needs once it arrives.
///
/// Owned, or borrowed from the connection: nothing in it borrows the rule set, so the handler
/// lets go of the rules before it awaits the target (see [`handle`]).
struct Reply {
    /// The group stickiness cookie to add to a target's response (the forward action has
    /// group stickiness), made when the group was chosen. Boxed: one word in the reply that
    /// every forwarded request moves, where the value would be five (the borrowed action and
    /// group name it replaces were three).
    group_cookie: Option<Box<HeaderValue>>,
    picked: Picked,
    /// The client asked to switch protocols (WebSocket).
    upgrade: bool,
    client_upgrade: hyper::upgrade::OnUpgrade,
    /// Ambiguous request (desync defensive mode): both connections close after it.
    close_target: bool,
}

fn route<'r>(
    ctx: &'r ConnCtx,
    rules: &ResolvedRuleSet,
    verdict: Option<HeadVerdict>,
    req: &mut Request<ProxyBody>,
    ex: &mut Exchange,
) -> Routed<'r> {
    let listener = &ctx.listener;
    let mut close_after = false;
    match verdict {
        Some(HeadVerdict::Reject { status, reason, .. }) => {
            return rejected(ctx, ex, status, reason).into();
        }
        Some(HeadVerdict::Pass {
            classification,
            mitigation,
            ..
        }) => {
            if classification.tier > Tier::Compliant {
                log_non_compliant(ctx.peer, classification);
            }
            // Block never reaches here: the sniffer rejects it before hyper.
            close_after = mitigation == Mitigation::ForwardThenClose;
        }
        None => {}
    }

    if req.method() == Method::TRACE {
        return from_error(ex, &ProxyError::MethodNotAllowed).into();
    }
    if !matches!(
        req.version(),
        Version::HTTP_10 | Version::HTTP_11 | Version::HTTP_2
    ) {
        return from_error(ex, &ProxyError::VersionNotSupported).into();
    }

    let (host, seen) = Seen::scan(req.headers());
    let host = host
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let view = RequestView {
        method: req.method().as_str(),
        host,
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
        source_ip: ctx.peer.ip(),
    };
    let matched = rules.evaluate(&view);
    let kind = match matched.action {
        ResolvedAction::FixedResponse(_) => ActionKind::FixedResponse,
        ResolvedAction::Redirect(_) => ActionKind::Redirect,
        ResolvedAction::Forward(_) => ActionKind::Forward,
    };
    ex.rule(matched.priority, matched.rules_evaluated, kind);
    let mut outcome = match matched.action {
        ResolvedAction::FixedResponse(fixed) => fixed_outcome(fixed, ex),
        ResolvedAction::Redirect(redirect) => redirected(redirect, &view, listener, ex),
        ResolvedAction::Forward(forward) => {
            let upgrade = hyper::upgrade::on(&mut *req);
            let prepared = prepare_forward(ctx, forward, req, seen, upgrade, close_after, ex);
            return match prepared {
                Ok(dispatch) => Routed::Forward(dispatch),
                Err(mut outcome) => {
                    outcome.close |= close_after;
                    Routed::Answer(outcome)
                }
            };
        }
    };
    outcome.close |= close_after;
    Routed::Answer(outcome)
}

/// The routing's cold ends, out of line so that `route`'s frame (on every forwarded
/// request's path) holds none of their values (stop 33).
///
/// A head the sniffer refused: ALB's error page, and the connection closes.
#[cold]
#[inline(never)]
fn rejected(ctx: &ConnCtx, ex: &mut Exchange, status: StatusCode, reason: &str) -> Outcome {
    tracing::debug!(client = %ctx.peer, status = status.as_u16(), reason, "request rejected");
    lb_error(
        ex,
        status,
        true,
        Some((LbError::ClientRequest, reason.to_owned())),
    )
}

#[cold]
#[inline(never)]
fn log_non_compliant(peer: SocketAddr, classification: Classification) {
    tracing::info!(
        client = %peer,
        classification = classification.tier.as_str(),
        reason = classification.reason.map(|r| r.as_str()),
        "non-compliant request"
    );
}

/// A fixed-response action's answer.
#[cold]
#[inline(never)]
fn fixed_outcome(fixed: &FixedResponseAction, ex: &mut Exchange) -> Outcome {
    let response = fixed_response(fixed);
    ex.answer(response.status(), None);
    Outcome::keep(response)
}

/// A redirect action's answer (500 if the URL it makes is not a valid header value).
#[cold]
#[inline(never)]
fn redirected(
    redirect: &RedirectAction,
    view: &RequestView<'_>,
    listener: &Listener,
    ex: &mut Exchange,
) -> Outcome {
    let location = redirect.location(view, listener.cfg.protocol.as_str(), listener.port);
    ex.redirect(&location);
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = redirect.status();
    match HeaderValue::try_from(location) {
        Ok(v) => {
            response.headers_mut().insert(header::LOCATION, v);
            ex.answer(response.status(), None);
            Outcome::keep(response)
        }
        Err(_) => lb_error(
            ex,
            StatusCode::INTERNAL_SERVER_ERROR,
            false,
            Some((
                LbError::Internal,
                "redirect URL is not a valid header".into(),
            )),
        ),
    }
}

fn fixed_response(fixed: &FixedResponseAction) -> Response<ProxyBody> {
    let mut response = Response::new(full(fixed.body.clone()));
    *response.status_mut() = fixed.status;
    if let Some(ct) = &fixed.content_type
        && let Ok(ct) = HeaderValue::try_from(ct.as_str())
    {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
}

/// What routing and forwarding read of the request's headers, found in one pass over them
/// before anything is rewritten: five lookups (`Host`, `Content-Type`, `Upgrade`, `Cookie`,
/// and `Host` again after the hop-by-hop headers are gone) each hashed a name and probed the
/// map. [`Seen::by_lookup`] is the same by lookups (the tests compare them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    /// A `Host` field (never removed by [`strip_hop_by_hop`], so still there after it).
    host: bool,
    /// An `Upgrade` field.
    upgrade: bool,
    /// A `Cookie` field.
    cookie: bool,
    /// The first `Content-Type` says gRPC (`application/grpc…`).
    grpc: bool,
    /// An `X-Forwarded-For`, `-Proto`, `-Port` or `X-Amzn-Trace-Id` field
    /// ([`ForwardedTail::names`]): without one, what forwarding adds is a [`ForwardedTail`].
    forwarded: bool,
    /// A hop-by-hop field ([`is_hop_by_hop`]; `Upgrade` is one). Without one there is no
    /// `Connection` either (it is one), so [`strip_hop_by_hop`] has nothing to remove.
    hop_by_hop: bool,
}

impl Seen {
    /// The first `Host` value, and what is seen.
    fn scan(headers: &http::HeaderMap) -> (Option<&HeaderValue>, Self) {
        let mut seen = Self::default();
        let mut host = None;
        let mut content_type = None;
        for (name, value) in headers {
            if *name == header::HOST {
                host = host.or(Some(value));
            } else if *name == header::COOKIE {
                seen.cookie = true;
            } else if *name == header::CONTENT_TYPE {
                content_type = content_type.or(Some(value));
            } else if *name == header::UPGRADE {
                seen.upgrade = true;
                seen.hop_by_hop = true;
            } else if ForwardedTail::names(name) {
                seen.forwarded = true;
            } else if is_hop_by_hop(name) {
                seen.hop_by_hop = true;
            }
        }
        seen.host = host.is_some();
        seen.grpc = content_type.is_some_and(is_grpc);
        (host, seen)
    }

    /// [`Seen::scan`] by one lookup per name: the reference the tests hold the scan to.
    #[cfg(test)]
    fn by_lookup(headers: &http::HeaderMap) -> (Option<&HeaderValue>, Self) {
        let host = headers.get(header::HOST);
        let seen = Self {
            host: headers.contains_key(header::HOST),
            upgrade: headers.contains_key(header::UPGRADE),
            cookie: headers.contains_key(header::COOKIE),
            grpc: headers.get(header::CONTENT_TYPE).is_some_and(is_grpc),
            forwarded: [
                crate::headers::X_FORWARDED_FOR,
                crate::headers::X_FORWARDED_PROTO,
                crate::headers::X_FORWARDED_PORT,
                crate::headers::X_AMZN_TRACE_ID,
            ]
            .into_iter()
            .any(|name| headers.contains_key(name)),
            hop_by_hop: [
                header::CONNECTION,
                crate::headers::KEEP_ALIVE,
                crate::headers::PROXY_CONNECTION,
                header::TE,
                header::TRAILER,
                header::TRANSFER_ENCODING,
                header::UPGRADE,
                header::PROXY_AUTHENTICATE,
                header::PROXY_AUTHORIZATION,
            ]
            .into_iter()
            .any(|name| headers.contains_key(name)),
        };
        (host, seen)
    }
}

/// `content-type: application/grpc…`.
fn is_grpc(content_type: &HeaderValue) -> bool {
    content_type
        .to_str()
        .is_ok_and(|ct| ct.starts_with("application/grpc"))
}

/// Whether the request asks to switch protocols (WebSocket).
fn wants_upgrade(version: Version, seen: Seen) -> bool {
    version == Version::HTTP_11 && seen.upgrade
}

/// The 464 check: what the target group's protocol version cannot carry. An HTTP/2 (or gRPC)
/// group needs HTTP/2 requests; an HTTP/1 group cannot carry gRPC
/// (`content-type: application/grpc…`), which needs HTTP/2 trailers end to end.
fn protocol_mismatch(version: Version, seen: Seen, group_version: ProtocolVersion) -> bool {
    match group_version {
        ProtocolVersion::Http2 => version != Version::HTTP_2,
        ProtocolVersion::Http1 => seen.grpc,
    }
}

/// Forwarding up to the send: the group (sticky or weighted), the 464 check, the request's
/// headers (463 first), the target (503 if none), the trace id and the target's URI and
/// version, all rewritten in `req` in place. `Err` is the load balancer's answer instead.
#[expect(
    clippy::result_large_err,
    reason = "returned once per request; a boxed answer would allocate"
)]
fn prepare_forward<'r>(
    ctx: &'r ConnCtx,
    forward: ResolvedForward<'_>,
    req: &mut Request<ProxyBody>,
    seen: Seen,
    client_upgrade: hyper::upgrade::OnUpgrade,
    close_target: bool,
    ex: &mut Exchange,
) -> Result<Dispatch<'r>, Outcome> {
    let listener = &ctx.listener;

    // Group: sticky group cookie first (if it names one of this action's groups), else weighted.
    // Owned: the headers are rewritten before the pick (463 comes first).
    let ResolvedForward { action, .. } = forward;
    let cookies = seen
        .cookie
        .then(|| request_cookies(req.headers()).map(|c| c.into_owned()))
        .flatten();
    let sticky_group = action.group_stickiness.and_then(|_| {
        cookie_values(cookies.as_deref()?, GROUP_COOKIE)
            .find_map(|g| action.groups.iter().position(|wg| wg.name == g))
    });
    let index = sticky_group.or_else(|| action.choose_index_with(rand::random));
    // The group as the rule set was resolved against the groups when it was stored (no map
    // load, no hash of the name): a group the resolution did not find answers as an unknown
    // group.
    let group_name = || index.map_or("", |i| action.groups[i].name.as_str());
    let Some((group, group_cookie)) = index.and_then(|i| forward.group(i)) else {
        return Err(unknown_group(group_name(), ex));
    };
    let group_cfg = group.config();
    if protocol_mismatch(req.version(), seen, group_cfg.protocol_version) {
        return Err(from_error(ex, &ProxyError::ProtocolMismatch));
    }

    let upgrade = wants_upgrade(req.version(), seen);
    let body_empty = req.body().is_end_stream();
    // The client's hop-by-hop headers go first, so that naming `X-Forwarded-For` or
    // `X-Amzn-Trace-Id` in `Connection` removes the client's copy, never the one added below.
    // Without any (the scan saw none) the strip would walk the fields to remove nothing.
    if seen.hop_by_hop {
        strip_hop_by_hop(req.headers_mut(), upgrade);
    }
    let mut has_host = seen.host;
    if !seen.host
        && let Some(authority) = req.uri().authority()
        && let Ok(h) = HeaderValue::from_str(authority.as_str())
    {
        // HTTP/2 clients send `:authority`; HTTP/1 targets need `Host`.
        req.headers_mut().insert(header::HOST, h);
        has_host = true;
    }
    let facts = Facts {
        host: Some(has_host),
        // Without an `Upgrade` from the client there is none (nothing below adds one); with
        // one, the hop-by-hop strip may have removed it: the forwarder looks.
        upgrade: (!seen.upgrade).then_some(false),
    };
    // A request with none of the fields added below, with its `Host`, without a body and
    // without a `Connection: close` to add (each of which would go into the map after them)
    // gets them as a tail that the target's HTTP/1.1 client writes after the map's fields:
    // the same head, without four hashed map inserts. Such a request cannot be refused with
    // 463 (only the peer's address goes into its `X-Forwarded-For`).
    let tail_fits = !seen.forwarded && has_host && !close_target && body_empty;
    // 463 before a target is picked: a refused request never counts on a target.
    if !tail_fits
        && let Err(too_many) = apply_forwarded(
            req.headers_mut(),
            &ctx.forwarded_peer,
            &HeaderValue::from_static(listener.cfg.protocol.as_str()),
            &listener.forwarded_port,
            listener.cfg.xff,
        )
    {
        return Err(from_error(
            ex,
            &ProxyError::TooManyForwardedFor(too_many.count),
        ));
    }
    // The stickiness cookies' expiry and the trace id's epoch seconds count from when the
    // request arrived (the access log's `request_creation_time`): no clock read of their own.
    let now = ex.received_at();
    let Some(picked) = group.pick_at(cookies.as_deref(), now) else {
        return Err(no_target(group_name(), ex));
    };
    ex.picked(group, &picked);
    let tail = if tail_fits {
        let tail = ForwardedTail::new(
            &ctx.forwarded_peer,
            listener.cfg.protocol.as_str(),
            &listener.forwarded_port,
            listener.cfg.xff,
            now,
            &mut rand::rng(),
        );
        ex.trace_id(tail.trace_id());
        Some(tail)
    } else {
        ex.trace_id(trace_id(req.headers_mut(), now, &mut rand::rng()));
        None
    };
    if close_target {
        // Ambiguous request (desync defensive mode): the target connection must not be reused.
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    origin_form(req.uri_mut());
    let target_version = match group_cfg.protocol_version {
        ProtocolVersion::Http2 => Version::HTTP_2,
        ProtocolVersion::Http1 => Version::HTTP_11,
    };
    *req.version_mut() = target_version;
    let endpoint = EndpointSettings::of_group(group_cfg);
    Ok(Dispatch {
        facts,
        tail,
        endpoint,
        reply: Reply {
            group_cookie: group_cookie.cloned().map(Box::new),
            picked,
            upgrade,
            client_upgrade,
            close_target,
        },
    })
}

/// `prepare_forward`'s cold ends, out of line for the reason [`rejected`] is.
#[cold]
#[inline(never)]
fn unknown_group(group_name: &str, ex: &mut Exchange) -> Outcome {
    tracing::error!(group = %group_name, "forward action names an unknown target group");
    lb_error(
        ex,
        StatusCode::INTERNAL_SERVER_ERROR,
        false,
        Some((
            LbError::Internal,
            format!("forward action names an unknown target group {group_name:?}"),
        )),
    )
}

#[cold]
#[inline(never)]
fn no_target(group_name: &str, ex: &mut Exchange) -> Outcome {
    from_error(
        ex,
        &ProxyError::NoTarget {
            group: group_name.to_owned(),
        },
    )
}

/// The request target as the target gets it: the path and query alone. An HTTP/1 request's
/// target is that already (origin-form), and is left as it is: rebuilding it cloned the path,
/// checked the parts and dropped the old URI on every request, for an equal one.
fn origin_form(uri: &mut http::Uri) {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    if let Some(pq) = uri.path_and_query().cloned() {
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(pq);
        if let Ok(u) = http::Uri::from_parts(parts) {
            *uri = u;
        }
    }
}

impl Reply {
    /// The forward's result (`None`: the target left its group first) made into the
    /// client's response: 502/504 and friends, or the target's response with its hop-by-hop
    /// headers removed and the stickiness cookies added; a 101 to an upgrade request starts
    /// the tunnel.
    fn finish(
        self,
        ctx: &ConnCtx,
        polled: Option<Result<Forwarded, ProxyError>>,
        ex: &mut Exchange,
    ) -> Outcome {
        let Self {
            group_cookie,
            picked,
            upgrade,
            client_upgrade,
            close_target,
        } = self;
        let forwarded = match polled {
            Some(Ok(f)) => f,
            Some(Err(e)) => return from_error(ex, &e),
            None => return drain_expired(picked.addr, ex),
        };
        ex.forwarded(&forwarded);
        let mut response = forwarded.response;
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade;
        let target_upgrade = switching.then(|| hyper::upgrade::on(&mut response));
        if !forwarded.no_hop_by_hop {
            strip_hop_by_hop(response.headers_mut(), switching);
        }
        for cookie in picked.set_cookies(response.headers()) {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        if let Some(v) = group_cookie {
            response.headers_mut().append(header::SET_COOKIE, *v);
        }
        if let Some(target_upgrade) = target_upgrade {
            start_tunnel(ctx, &picked, &response, client_upgrade, target_upgrade, ex);
        }
        Outcome {
            response,
            close: close_target,
            target: Some(picked),
        }
    }
}

/// The 502 (`TargetDrainExpired`) when the target left its group (deregistration delay over)
/// before it answered. Out of line: see [`rejected`].
#[cold]
#[inline(never)]
fn drain_expired(addr: SocketAddr, ex: &mut Exchange) -> Outcome {
    from_error(
        ex,
        &ProxyError::DrainExpired {
            target: addr.to_string(),
        },
    )
}

/// A 101 to an upgrade request: the tunnel's task, which takes the record (a WebSocket is
/// logged when it closes). Out of line and cold: the tunnel's future (built here, then moved
/// into its task) sized `Reply::finish`'s frame for every request.
#[cold]
#[inline(never)]
fn start_tunnel(
    ctx: &ConnCtx,
    picked: &Picked,
    response: &Response<ProxyBody>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    target_upgrade: hyper::upgrade::OnUpgrade,
    ex: &mut Exchange,
) {
    ex.responding(response.status(), response.headers());
    let record = ex.split_off();
    tokio::spawn(tunnel(
        client_upgrade,
        target_upgrade,
        ctx.listener.shared.phase.clone(),
        picked.gone_owned(),
        ctx.peer,
        ctx.slot.clone(),
        record,
    ));
}

/// Copies bytes both ways between an upgraded client and target connection until either side
/// closes, the target leaves its group (deregistration delay over) or the tier stops.
/// `_slot` keeps the client connection counted under the listener's connection limits while
/// the tunnel lives.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    target: hyper::upgrade::OnUpgrade,
    mut phase: tokio::sync::watch::Receiver<Phase>,
    gone: WaitForCancellationFutureOwned,
    peer: SocketAddr,
    _slot: Arc<ConnectionSlot>,
    mut record: Exchange,
) {
    let (client, target) = match tokio::try_join!(client, target) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(client = %peer, error = %e, "upgrade failed");
            record.body_failed(format!("upgrade failed: {e}"));
            return;
        }
    };
    let mut client = TokioIo::new(Tally::new(client));
    let mut target = TokioIo::new(target);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut target) => {
            if let Err(e) = result {
                tracing::debug!(client = %peer, error = %e, "tunnel ended with an error");
            }
        }
        () = async {
            while phase.changed().await.is_ok() {
                if *phase.borrow() == Phase::Stopped {
                    return;
                }
            }
        } => {}
        () = gone => {
            tracing::debug!(client = %peer, "tunnel closed: its target left the group");
        }
    }
    let tally = client.inner();
    record.tunnel_closed(tally.read, tally.written);
    record.finish();
}

/// The client side of a tunnel, counting the bytes each way (the WebSocket's record).
struct Tally<IO> {
    io: IO,
    read: u64,
    written: u64,
}

impl<IO> Tally<IO> {
    fn new(io: IO) -> Self {
        Self {
            io,
            read: 0,
            written: 0,
        }
    }
}

impl<IO: hyper::rt::Read + Unpin> hyper::rt::Read for Tally<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        // Count through a small stack buffer: ReadBufCursor does not say how much was filled.
        let mut tmp = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
        let want = buf.remaining().min(tmp.len());
        let mut inner = hyper::rt::ReadBuf::uninit(&mut tmp[..want]);
        let polled = Pin::new(&mut self.io).poll_read(cx, inner.unfilled());
        if let Poll::Ready(Ok(())) = polled {
            let filled = inner.filled();
            self.read += filled.len() as u64;
            buf.put_slice(filled);
        }
        polled
    }
}

impl<IO: hyper::rt::Write + Unpin> hyper::rt::Write for Tally<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::tests::allocations::so_far;
    use crate::targets::Detached;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    /// A response body whose target has not sent anything yet.
    struct Waiting;

    impl Body for Waiting {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
    }

    /// Counts how often it was woken.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A connection's kept watches: none for its first forwarded request (it watches for
    /// itself: a one-request connection makes no kept watch), then one per target
    /// registration, found again by a later pick
    /// of the same registration (no new watch), woken and ready when that target leaves, while
    /// the other target's stays pending (the control); a place whose registration is over is
    /// taken again; with every place held by a live registration, the request watches for
    /// itself (`None`); a watch polled from another task wakes that one.
    #[test]
    fn kept_watches_follow_each_registration_and_see_it_leave() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (a_gone, b_gone) = (Detached::new(addr), Detached::new(addr));
        let (a, b) = (a_gone.pick(), b_gone.pick());
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut watches = TargetWatches::default();

        let mut poll = |watches: &mut TargetWatches, p: &Picked| {
            watches.watch(p).expect("a place").poll(p, &mut cx)
        };
        assert!(
            watches.watch(&a).is_none(),
            "the connection's first request kept a watch"
        );
        assert_eq!(watches.watched(), 0);
        // Its second request keeps one (the control: a place was free).
        assert!(poll(&mut watches, &a).is_pending());
        assert_eq!(watches.watched(), 1);
        assert!(poll(&mut watches, &a).is_pending());
        assert_eq!(watches.watched(), 1, "a's next request made a new watch");
        assert!(poll(&mut watches, &b).is_pending());
        assert_eq!(watches.watched(), 2, "b shared a's watch");

        b_gone.leave();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "b leaving woke no one");
        assert!(poll(&mut watches, &b).is_ready(), "b left unseen");
        assert!(poll(&mut watches, &a).is_pending(), "a seen gone with b");

        // b's registration over (its last pick gone): its place is taken again.
        drop((b, b_gone));
        let others: Vec<(Detached, Picked)> = (0..TargetWatches::KEPT)
            .map(|_| {
                let d = Detached::new(addr);
                let p = d.pick();
                (d, p)
            })
            .collect();
        for (_, p) in &others[..TargetWatches::KEPT - 1] {
            assert!(poll(&mut watches, p).is_pending());
        }
        assert_eq!(watches.watched(), TargetWatches::KEPT);
        assert!(
            watches.watch(&others[TargetWatches::KEPT - 1].1).is_none(),
            "every place holds a live registration"
        );
        // Polled by another task now (its waker would not wake the first): that task is the
        // one woken when a leaves.
        let moved = Arc::new(Wakes::default());
        let moved_waker = Waker::from(moved.clone());
        let mut moved_cx = Context::from_waker(&moved_waker);
        let kept = watches.watch(&a).expect("a's place");
        assert!(kept.poll(&a, &mut moved_cx).is_pending());
        a_gone.leave();
        assert_eq!(moved.0.load(Ordering::SeqCst), 1, "the new waker not woken");
        assert!(poll(&mut watches, &a).is_ready(), "a left unseen");
    }

    fn target() -> Detached {
        Detached::new(SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    fn answer(inner: ProxyBody, gone: &Detached) -> Pin<Box<Answer>> {
        Box::pin(Answer {
            inner,
            cut: Some(Cut::new(gone.pick())),
            exchange: None,
            inflight: None,
        })
    }

    #[test]
    fn a_response_body_waiting_on_its_target_is_cut_off_when_the_target_leaves() {
        let gone = target();
        let mut body = answer(Waiting.boxed_unsync(), &gone);
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(body.as_mut().poll_frame(&mut cx).is_pending());
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "woken with nothing to do"
        );
        gone.leave();
        // The waiting body's task is woken by the target leaving, not only by the target.
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "not woken when the target left"
        );
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Err(e))) => assert!(e.to_string().contains("left its group"), "{e}"),
            other => panic!("not cut off: {:?}", other.map(|f| f.map(|r| r.is_ok()))),
        }
    }

    #[test]
    fn a_response_body_of_a_target_already_gone_is_cut_off_before_it_is_read() {
        let gone = target();
        gone.leave();
        let mut body = answer(full("never sent"), &gone);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Err(_)))
        ));
        // Control: the same body with its target still there is read.
        let mut body = answer(full("sent"), &target());
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => assert_eq!(frame.data_ref().unwrap(), "sent"),
            _ => panic!("a ready body was not read"),
        }
    }

    /// The usual small response (its bytes arrived with the head) passes through the
    /// pipeline's body without an allocation: the cut-off watch registers only when the body
    /// has to wait.
    #[test]
    fn a_ready_response_body_passes_without_allocating() {
        let gone = target();
        let mut cx = Context::from_waker(Waker::noop());
        let mut ready = answer(full("hello"), &gone);
        let before = so_far();
        let polled = ready.as_mut().poll_frame(&mut cx);
        let after = so_far();
        assert!(matches!(polled, Poll::Ready(Some(Ok(_)))));
        drop(polled);
        assert_eq!(after - before, 0, "a ready body allocated");
        // Control: a body that has to wait registers the watch, and the counter sees it.
        let mut waiting = answer(Waiting.boxed_unsync(), &gone);
        let before = so_far();
        assert!(waiting.as_mut().poll_frame(&mut cx).is_pending());
        assert!(
            so_far() > before,
            "the counter missed the watch's allocation"
        );
    }

    /// A request without a body (a GET) is sent on with a body that costs no allocation.
    #[test]
    fn an_empty_request_body_boxes_without_allocating() {
        let before = so_far();
        let empty = std::hint::black_box(empty_body());
        let after = so_far();
        assert_eq!(after - before, 0, "an empty body allocated");
        assert!(empty.is_end_stream());
        // Control: a body with content is boxed on the heap, and the counter sees it.
        let full = std::hint::black_box(full("x"));
        assert!(so_far() > after);
        drop((empty, full));
    }

    #[test]
    fn error_pages_look_like_albs() {
        let page = error_page(StatusCode::BAD_GATEWAY);
        assert!(page.starts_with("<html>\r\n<head><title>502 Bad Gateway</title></head>"));
        assert!(error_page(StatusCode::from_u16(463).expect("463")).contains("<title>463</title>"));
        assert!(
            error_page(StatusCode::GATEWAY_TIMEOUT).contains("<title>504 Gateway Time-out</title>")
        );
    }

    /// The one-pass scan of the request's headers against the lookups it replaced, over maps
    /// built from the fields it reads (repeated, first values differing) beside fields it must
    /// ignore; counts that each outcome was reached.
    #[test]
    fn the_routing_scan_agrees_with_a_lookup_per_name() {
        let fields: &[(&str, &[u8])] = &[
            ("host", b"a.example"),
            ("host", b"b.example:8080"),
            ("host", b"\xe9t\xe9"),
            ("cookie", b"AWSALBTG=x"),
            ("cookie", b"\xff"),
            ("content-type", b"application/grpc+proto"),
            ("content-type", b"text/plain"),
            ("content-type", b"application/grp"),
            ("upgrade", b"websocket"),
            ("connection", b"upgrade, host"),
            ("x-host", b"c.example"),
            ("set-cookie", b"a=1"),
            ("x-forwarded-for", b"192.0.2.1"),
            ("x-forwarded-proto", b"https"),
            ("x-forwarded-port", b"443"),
            ("x-amzn-trace-id", b"Root=1-2-3"),
            ("x-forwarded-host", b"d.example"),
            ("connection", b"keep-alive"),
            ("keep-alive", b"timeout=5"),
            ("te", b"trailers"),
            ("proxy-connection", b"close"),
            ("transfer-encoding", b"chunked"),
            ("proxy-authorization", b"Basic x"),
            ("trailer", b"x-checksum"),
            // A near miss of `Trailer` (the scan must not count it).
            ("trailers", b"x"),
            ("user-agent", b"h2load"),
        ];
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let mut next = move |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        let mut reached = [0usize; 9];
        for _ in 0..20_000 {
            let mut headers = http::HeaderMap::new();
            for _ in 0..next(7) {
                let (name, value) = fields[next(fields.len())];
                headers.append(
                    http::HeaderName::from_static(name),
                    HeaderValue::from_bytes(value).unwrap(),
                );
            }
            let scanned = Seen::scan(&headers);
            assert_eq!(scanned, Seen::by_lookup(&headers), "{headers:?}");
            let (host, seen) = scanned;
            // Skipping `request_cookies` when no `Cookie` was seen gives what calling it does.
            if !seen.cookie {
                assert_eq!(request_cookies(&headers), None);
            }
            // Skipping the request's strip when no hop-by-hop field was seen gives what
            // stripping does (the same map, in order); with one, the strip changes the map
            // (the positive control: the condition is not always true).
            let mut stripped = headers.clone();
            strip_hop_by_hop(&mut stripped, seen.upgrade);
            let strip_changed = !stripped.iter().eq(headers.iter());
            if !seen.hop_by_hop {
                assert!(!strip_changed, "{headers:?}");
            }
            for (i, hit) in [
                host.is_some_and(|h| h.as_bytes() == b"b.example:8080"),
                seen.upgrade,
                seen.cookie,
                seen.grpc,
                headers.contains_key(header::CONTENT_TYPE) && !seen.grpc,
                seen.forwarded,
                // Only a near miss of the four names (the scan must not count it).
                !seen.forwarded && headers.contains_key("x-forwarded-host"),
                // The skip taken on a non-empty map, and the strip needed where it is not.
                !seen.hop_by_hop && !headers.is_empty(),
                seen.hop_by_hop && strip_changed,
            ]
            .into_iter()
            .enumerate()
            {
                reached[i] += usize::from(hit);
            }
        }
        assert!(reached.iter().all(|&n| n > 500), "{reached:?}");
    }

    /// Leaving an origin-form target as it is gives what rebuilding it from its path and
    /// query gives, for every form of target; counts that both paths ran.
    #[test]
    fn an_origin_form_target_is_left_as_rebuilding_would_make_it() {
        let rebuilt = |uri: &http::Uri| {
            let mut uri = uri.clone();
            if let Some(pq) = uri.path_and_query().cloned() {
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = Some(pq);
                if let Ok(u) = http::Uri::from_parts(parts) {
                    uri = u;
                }
            }
            uri
        };
        let (mut kept, mut changed) = (0, 0);
        for text in [
            "/",
            "/a/b?c=d&e",
            "/?",
            "*",
            "/caf%C3%A9",
            "http://h.test/p?q",
            "https://h.test",
            "http://user@h.test:8080/x",
            "h.test:443",
        ] {
            let uri: http::Uri = text.parse().expect(text);
            let mut ours = uri.clone();
            origin_form(&mut ours);
            let reference = rebuilt(&uri);
            assert_eq!(ours, reference, "{text}");
            assert_eq!(
                (ours.scheme(), ours.authority(), ours.path_and_query()),
                (
                    reference.scheme(),
                    reference.authority(),
                    reference.path_and_query()
                ),
                "{text}"
            );
            if ours == uri {
                kept += 1;
            } else {
                changed += 1;
            }
        }
        assert!(kept >= 5 && changed >= 3, "{kept} {changed}");
    }
}
