//! HTTP/2 served by lb's own glue on the `h2` crate (the "native" path, `http2=native`),
//! without hyper's HTTP/2 server in between.
//!
//! [`Conn`] is the connection, polled by the connection's [`Streams`] driver (`h2exec.rs`,
//! [`Driven`]): it runs h2's handshake with the settings hyper was given ([`builder`]: the same
//! values, set on `h2::server::Builder` directly), accepts the client's streams and hands each,
//! as a [`Stream`] future, straight to the driver's [`NewStreams`] (the streams run in the
//! connection's task, with its round limit, panic isolation and deferred first flush, exactly
//! as they did under hyper). The connection's control loop in
//! `server.rs` asks for a graceful shutdown through [`Control`] (GOAWAY, the open streams
//! finish, then the connection ends), as it called hyper's `graceful_shutdown`.
//!
//! A [`Stream`] does what hyper's `H2Stream` did, minus what lb does not need:
//! - the request goes to the pipeline (`service::Respond`, which also gives the response its
//!   never-indexed `Date`) with a body reading the stream ([`RequestBody`]: each DATA frame's
//!   bytes are released to flow control as the pipeline takes them; trailers after the data;
//!   an exact size hint from a valid `content-length`, so the target sees the same framing);
//! - while the pipeline runs, `SendResponse::poll_reset` is watched: a client's RST_STREAM
//!   drops the pipeline's future, which counts the stream as cancelled for rapid-reset
//!   detection (`abuse.rs`), as hyper did;
//! - the response head is sent with END_STREAM when the body is already at its end (HEAD, 204,
//!   304 and every empty body), else with `content-length` set from the body's exact size when
//!   missing (as hyper did), and the body is piped with `reserve_capacity`/`poll_capacity`: a
//!   chunk is held only until the client's window takes it, never more than h2's send buffer
//!   (`max_send_buf_size`) is queued; trailers go out as a trailing HEADERS frame (gRPC); a body
//!   error resets the stream with INTERNAL_ERROR; the client's RST_STREAM ends the piping.
//!
//! Not done, as lb never needs it: hyper's `strip_connection_headers` (the pipeline has removed
//! every connection-specific header from a forwarded response, and lb's own responses carry
//! none; h2 refuses a head that still has one, which resets the stream), keep-alive PINGs
//! (off on lb's listeners) and the adaptive window (off).
//!
//! CONNECT (`:method CONNECT`; extended CONNECT is not enabled, so h2 refuses `:protocol`): the
//! request reaches the pipeline with an empty body, as from hyper, and a non-zero
//! `content-length` resets the stream; a successful answer is sent without `content-length`,
//! then the stream ends (hyper set up a tunnel that nothing in lb ever took: the client saw the
//! head and an empty body ending the stream; `connect_gets_what_it_got_from_hyper` compares).
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::h2exec::{Driven, NewStreams, StreamExec};
use super::pipeline::ConnCtx;
use super::service;
use crate::headers::for_each_value_mut;
use crate::proxy::client::ProxyBody;

/// The `h2` server settings of every listener: exactly those `http_builder` gives hyper's
/// HTTP/2 server (see the reasons there). Keep-alive PINGs and the adaptive window, which hyper
/// implements above h2, are off there and absent here. Built once: every connection's
/// handshake takes it by reference ([`BUILDER`]).
fn builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(super::HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(super::HTTP2_CONNECTION_WINDOW)
        .max_frame_size(super::HTTP2_MAX_FRAME_SIZE)
        .max_header_list_size(super::HTTP2_MAX_HEADER_LIST_SIZE)
        .max_local_error_reset_streams(Some(super::HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_send_buffer_size(super::HTTP2_MAX_SEND_BUF_SIZE)
        .max_concurrent_streams(super::HTTP2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(super::HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS);
    b
}

/// [`builder`]'s settings, built on first use and shared by every connection.
static BUILDER: std::sync::LazyLock<h2::server::Builder> = std::sync::LazyLock::new(builder);

/// Lets the connection's control loop ask for a graceful shutdown (GOAWAY, open streams
/// finish). The loop polls the connection again after every step it takes, so a flag is
/// enough: [`Conn`] reads it on every poll.
#[derive(Debug, Default)]
pub(super) struct Control {
    shutdown: AtomicBool,
}

impl Control {
    pub(super) fn graceful_shutdown(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
    }
}

enum State<IO> {
    Handshaking(h2::server::Handshake<IO, Bytes>),
    Serving(h2::server::Connection<IO, Bytes>),
}

/// One client connection served natively (module docs); ends when h2 has closed it. Not a
/// future: polled by its driver, which takes its new streams ([`Driven`]).
pub(super) struct Conn<IO> {
    state: State<IO>,
    ctx: Arc<ConnCtx>,
    /// Where new streams go when the connection is polled without a driver.
    exec: StreamExec,
    control: Arc<Control>,
    /// GOAWAY was asked of h2 already.
    shut: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
    pub(super) fn new(io: IO, ctx: Arc<ConnCtx>, exec: StreamExec, control: Arc<Control>) -> Self {
        Self {
            state: State::Handshaking(BUILDER.handshake(io)),
            ctx,
            exec,
            control,
            shut: false,
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Driven for Conn<IO> {
    type Output = Result<(), h2::Error>;

    fn poll_driven(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut new: Option<&mut NewStreams<'_>>,
    ) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let conn = match &mut this.state {
                State::Handshaking(hs) => {
                    let conn = ready!(Pin::new(hs).poll(cx))?;
                    this.state = State::Serving(conn);
                    continue;
                }
                State::Serving(conn) => conn,
            };
            if !this.shut && this.control.shutdown.load(Ordering::Relaxed) {
                this.shut = true;
                conn.graceful_shutdown();
            }
            // As hyper: accept until h2 says there will be no more streams (after GOAWAY, once
            // the open streams are done), which is also when the connection is closed.
            match ready!(conn.poll_accept(cx)) {
                Some(Ok((req, reply))) => {
                    this.ctx
                        .listener
                        .shared
                        .counters
                        .http2_native_requests
                        .add(1);
                    let stream = Stream::new(&this.ctx, req, reply);
                    match new.as_deref_mut() {
                        Some(new) => new.native(stream),
                        None => this.exec.execute_native(stream),
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// One stream: the pipeline's future, then the piping of the response body (module docs).
pub(super) struct Stream {
    reply: h2::server::SendResponse<Bytes>,
    state: StreamState,
}

enum StreamState {
    Service {
        respond: service::Respond,
        /// CONNECT: its answer gets no body (module docs).
        connect: bool,
    },
    Body(Pipe),
    Done,
}

impl Stream {
    fn new(
        ctx: &Arc<ConnCtx>,
        req: Request<h2::RecvStream>,
        mut reply: h2::server::SendResponse<Bytes>,
    ) -> Self {
        // The request's `content-length` when every value is the same valid number, as
        // hyper's `content_length_parse_all` (h2 has already refused a stream whose values
        // disagree); the rule our own HTTP/1.1 client reads a length by. Not looked up when
        // the HEADERS frame ended the stream: h2 resets such a stream with a non-zero length
        // (RFC 9113 §8.1.1), and no trailers can follow, so the body is empty whatever the
        // header says, and is given as such (exact size 0, at its end: as hyper's `Incoming`
        // for an ended stream) without keeping the stream's receive half: asking h2 whether
        // it has ended takes its lock each time (about 60 instructions, twice more per
        // request in the pipeline).
        let ended = req.body().is_end_stream();
        let content_length = if ended {
            None
        } else {
            crate::proxy::client::h1::content_length(req.headers()).and_then(Result::ok)
        };
        let connect = req.method() == Method::CONNECT;
        let (parts, recv) = req.into_parts();
        let body = if ended {
            drop(recv);
            RequestBody::empty()
        } else if connect {
            if content_length.is_some_and(|len| len != 0) {
                reply.send_reset(h2::Reason::INTERNAL_ERROR);
                return Self {
                    reply,
                    state: StreamState::Done,
                };
            }
            drop(recv);
            RequestBody::empty()
        } else {
            RequestBody::new(recv, content_length)
        };
        let respond = service::Respond::new(ctx, Request::from_parts(parts, body));
        Self {
            reply,
            state: StreamState::Service { respond, connect },
        }
    }

    /// Sends the head; `None` when the stream is done (ended with the head, or reset).
    fn send_head(&mut self, response: Response<ProxyBody>, connect: bool) -> Option<Pipe> {
        let (head, body) = response.into_parts();
        let mut head = Response::from_parts(head, ());
        if connect && head.status().is_success() {
            head.headers_mut().remove(http::header::CONTENT_LENGTH);
            match self.reply.send_response(head, false) {
                Ok(mut tx) => {
                    let _ = tx.send_data(Bytes::new(), true);
                }
                Err(_) => self.reply.send_reset(h2::Reason::INTERNAL_ERROR),
            }
            return None;
        }
        if body.is_end_stream() {
            if self.reply.send_response(head, true).is_err() {
                self.reply.send_reset(h2::Reason::INTERNAL_ERROR);
            }
            return None;
        }
        if let Some(len) = body.size_hint().exact() {
            content_length_if_missing(head.headers_mut(), len);
        }
        match self.reply.send_response(head, false) {
            Ok(tx) => Some(Pipe {
                tx,
                body,
                buffered: None,
            }),
            Err(_) => {
                self.reply.send_reset(h2::Reason::INTERNAL_ERROR);
                None
            }
        }
    }
}

impl Future for Stream {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                StreamState::Service { respond, connect } => {
                    let response = match Pin::new(respond).poll(cx) {
                        Poll::Ready(Ok(response)) => response,
                        Poll::Ready(Err(never)) => match never {},
                        Poll::Pending => {
                            // The client's RST_STREAM cancels the request: the pipeline's
                            // future is dropped (it counts the cancellation), as in hyper.
                            if this.reply.poll_reset(cx).is_ready() {
                                this.state = StreamState::Done;
                                return Poll::Ready(());
                            }
                            return Poll::Pending;
                        }
                    };
                    let connect = *connect;
                    this.state = match this.send_head(response, connect) {
                        Some(pipe) => StreamState::Body(pipe),
                        None => StreamState::Done,
                    };
                }
                StreamState::Body(pipe) => {
                    ready!(pipe.poll(cx));
                    this.state = StreamState::Done;
                }
                StreamState::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Gives the head `content-length: len` unless it has a `content-length` already (as hyper
/// did). A usual head is scanned, not looked up ([`for_each_value_mut`]).
fn content_length_if_missing(headers: &mut http::HeaderMap, len: u64) {
    use http::header::CONTENT_LENGTH;
    if !for_each_value_mut(headers, CONTENT_LENGTH, |_| {}) {
        headers.insert(CONTENT_LENGTH, http::HeaderValue::from(len));
    }
}

/// A response body on its way to the client, flow-controlled (as hyper's `PipeToSendStream`).
struct Pipe {
    tx: h2::SendStream<Bytes>,
    body: ProxyBody,
    /// A chunk polled from the body, waiting for the client's window; with its end-of-stream.
    buffered: Option<(Bytes, bool)>,
}

impl Pipe {
    /// Ready when the body was sent, failed (the stream reset) or the client reset the stream.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some((chunk, eos)) = self.buffered.take() {
                while self.tx.capacity() == 0 {
                    match self.tx.poll_capacity(cx) {
                        Poll::Pending => {
                            self.buffered = Some((chunk, eos));
                            return self.pending_unless_reset(cx);
                        }
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                    }
                }
                // h2 takes the whole chunk and sends what the window allows; the rest waits in
                // its send buffer, which `max_send_buf_size` bounds: `poll_capacity` returns
                // nothing until the buffer has drained below it.
                if self.tx.send_data(chunk, eos).is_err() || eos {
                    return Poll::Ready(());
                }
                continue;
            }
            let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) else {
                return self.pending_unless_reset(cx);
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let eos = self.body.is_end_stream();
                        if chunk.is_empty() || eos {
                            // The last chunk (most responses' only one) goes to h2 at once,
                            // without the capacity round trip: h2 asks the client's window
                            // for it in `send_data` and holds it until the window allows, one
                            // chunk, as `buffered` would have held it; nothing more is pulled
                            // from the body after it.
                            if self.tx.send_data(chunk, eos).is_err() || eos {
                                return Poll::Ready(());
                            }
                            continue;
                        }
                        // A minimal claim on the window (hyper #4003: never pin connection
                        // window for a body that has produced nothing); h2 raises it to the
                        // chunk's length in `send_data`.
                        self.tx.reserve_capacity(1);
                        self.buffered = Some((chunk, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.tx.reserve_capacity(0);
                            let _ = self.tx.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(_)) => {
                    self.tx.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
                None => {
                    let _ = self.tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

impl Pipe {
    /// Before the piping waits (for the body or for the client's window): `Pending` with the
    /// stream's reset watched, so the client's RST_STREAM wakes it and ends the piping (the
    /// body dropped) at once; `Ready` when the stream was reset already. Asked only before a
    /// wait, not on every turn of the loop: each ask takes h2's lock (about 125 instructions),
    /// and most responses never wait (their one chunk is sent on the first turn). A stream
    /// reset while the piping was not waiting is noticed at the next step all the same: h2
    /// refuses its data (`send_data` fails) and ends its capacity (`poll_capacity` gives
    /// `None`), so at most the body's next chunk is pulled before the body is dropped.
    fn pending_unless_reset(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.tx.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A request body read from the client's stream (module docs). Its bytes are released to h2's
/// flow control as they are handed to the pipeline, so the client's window reopens as the
/// pipeline consumes the body (and not before: at most the 1 MiB window is ever buffered).
pub(super) struct RequestBody {
    recv: Option<h2::RecvStream>,
    data_done: bool,
    /// What `content-length` still announces, for the size hint.
    remaining: Option<u64>,
}

impl RequestBody {
    /// The body of a stream the HEADERS frame did not end (an ended one is [`Self::empty`]).
    fn new(recv: h2::RecvStream, content_length: Option<u64>) -> Self {
        Self {
            recv: Some(recv),
            data_done: false,
            remaining: content_length,
        }
    }

    fn empty() -> Self {
        Self {
            recv: None,
            data_done: true,
            remaining: Some(0),
        }
    }
}

/// A request body error: the client's stream failed (reset, flow-control or length error).
type BodyError = h2::Error;

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(recv) = &mut this.recv else {
            return Poll::Ready(None);
        };
        if !this.data_done {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(bytes)) => {
                    let _ = recv.flow_control().release_capacity(bytes.len());
                    if let Some(left) = &mut this.remaining {
                        *left = left.saturating_sub(bytes.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                // RST_STREAM(NO_ERROR): the client needs no more of the body read (RFC 9113
                // §8.1); the body ends, as with hyper.
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if e.reason() == Some(h2::Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.as_ref().is_none_or(h2::RecvStream::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::header::{CONTENT_LENGTH, SET_COOKIE};
    use http::{HeaderMap, HeaderValue};

    use super::*;

    /// Both ways (a head scanned, one looked up): a `content-length` the head has is kept as it
    /// is (here a value other than the body's size, to tell), a missing one is set to the size;
    /// the other lines are unchanged.
    #[test]
    fn content_length_is_set_only_when_missing() {
        for names in [3, crate::headers::SCAN_MAX + 4] {
            for has_length in [true, false] {
                let mut headers = HeaderMap::new();
                for i in 0..names {
                    headers.append(
                        http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).expect("name"),
                        HeaderValue::from(i),
                    );
                }
                headers.append(SET_COOKIE, HeaderValue::from_static("a=1"));
                if has_length {
                    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("7"));
                }
                let before = headers.clone();
                content_length_if_missing(&mut headers, 100);
                let want = if has_length { "7" } else { "100" };
                assert_eq!(
                    headers.get_all(CONTENT_LENGTH).iter().collect::<Vec<_>>(),
                    [want],
                    "{names} names, has a length: {has_length}"
                );
                headers.remove(CONTENT_LENGTH);
                let mut before = before;
                before.remove(CONTENT_LENGTH);
                assert_eq!(headers, before, "the other lines unchanged");
            }
        }
    }
}
