//! Body wrappers: recording an idempotent request's body so it can be sent again, and the
//! response body with the target idle timeout.
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

use super::{BoxError, ProxyBody};
use crate::proxy::error::ProxyError;
use crate::proxy::pool::{H1Conn, TargetPool};

/// The largest request body kept for a possible retry. Idempotent requests with larger bodies
/// are not retried (the body streamed through and is gone).
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

#[derive(Default)]
/// What streamed through a recorded body so far.
pub struct Recorded {
    frames: Vec<RecordedFrame>,
    bytes: usize,
    overflowed: bool,
    complete: bool,
    /// Whether to keep the frames (only idempotent requests may be sent again).
    keep: bool,
    /// The body stream (the client's upload) failed.
    failed: bool,
    /// When the last frame went through.
    last_frame: Option<Instant>,
}

enum RecordedFrame {
    Data(Bytes),
    Trailers(HeaderMap),
}

/// Watches a request body on its way to the target: whether it failed (the client's side broke
/// off) and, for idempotent requests, what was sent, so it can be replayed if small and complete.
pub enum Replay {
    /// The body was empty from the start.
    Empty,
    /// The body is being recorded as it streams to the target.
    Recording(Arc<Mutex<Recorded>>),
}

impl Replay {
    /// Wraps `body` so that failures are noticed and, if `keep`, what streams through is
    /// recorded (up to [`MAX_REPLAY_BYTES`]).
    pub fn watch(body: ProxyBody, keep: bool) -> (ProxyBody, Replay) {
        if body.is_end_stream() {
            return (body, Replay::Empty);
        }
        let recorded = Arc::new(Mutex::new(Recorded {
            keep,
            ..Recorded::default()
        }));
        let body = RecordingBody {
            inner: body,
            recorded: Arc::clone(&recorded),
        };
        (body.boxed_unsync(), Replay::Recording(recorded))
    }

    /// The same body again, if it was empty or was recorded completely.
    pub fn replay(&self) -> Option<ProxyBody> {
        match self {
            Replay::Empty => Some(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            Replay::Recording(recorded) => {
                let recorded = recorded.lock().ok()?;
                if !recorded.keep || !recorded.complete || recorded.overflowed {
                    return None;
                }
                let frames = recorded
                    .frames
                    .iter()
                    .map(|frame| match frame {
                        RecordedFrame::Data(data) => Frame::data(data.clone()),
                        RecordedFrame::Trailers(trailers) => Frame::trailers(trailers.clone()),
                    })
                    .collect();
                Some(
                    ReplayBody {
                        frames,
                        remaining: recorded.bytes as u64,
                    }
                    .boxed_unsync(),
                )
            }
        }
    }
}

impl Replay {
    /// When the last request body frame went to the target, if any did.
    pub fn last_activity(&self) -> Option<Instant> {
        match self {
            Replay::Empty => None,
            Replay::Recording(recorded) => recorded.lock().ok()?.last_frame,
        }
    }

    /// Whether reading the request body failed (the client broke off its upload).
    pub fn body_failed(&self) -> bool {
        match self {
            Replay::Empty => false,
            Replay::Recording(recorded) => recorded.lock().map_or(true, |recorded| recorded.failed),
        }
    }
}

struct RecordingBody {
    inner: ProxyBody,
    recorded: Arc<Mutex<Recorded>>,
}

impl Body for RecordingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // hyper stops polling once the body says it has ended (Content-Length reached), so the
        // end is noticed here as well as from a final `None`.
        let ended = self.inner.is_end_stream();
        if let Poll::Ready(item) = &polled
            && let Ok(mut recorded) = self.recorded.lock()
        {
            recorded.complete |= ended;
            if matches!(item, Some(Ok(_))) {
                recorded.last_frame = Some(Instant::now());
            }
            match item {
                Some(Ok(frame)) if recorded.keep && !recorded.overflowed => {
                    if let Some(data) = frame.data_ref() {
                        recorded.bytes += data.len();
                        if recorded.bytes > MAX_REPLAY_BYTES {
                            recorded.overflowed = true;
                            recorded.frames = Vec::new();
                        } else {
                            recorded.frames.push(RecordedFrame::Data(data.clone()));
                        }
                    } else if let Some(trailers) = frame.trailers_ref() {
                        recorded
                            .frames
                            .push(RecordedFrame::Trailers(trailers.clone()));
                    }
                }
                None => recorded.complete = true,
                Some(Err(_)) => recorded.failed = true,
                Some(Ok(_)) => {}
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

struct ReplayBody {
    frames: VecDeque<Frame<Bytes>>,
    remaining: u64,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = self.frames.pop_front();
        if let Some(data) = frame.as_ref().and_then(Frame::data_ref) {
            self.remaining = self.remaining.saturating_sub(data.len() as u64);
        }
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        // Trailers do not count; data frames add up to exactly this.
        SizeHint::with_exact(self.remaining)
    }
}

/// An HTTP/1.1 connection to give back to its pool once its response has been read.
pub struct Checkin {
    conn: H1Conn,
    pool: Arc<TargetPool>,
}

impl Checkin {
    /// Pairs a connection with its pool.
    pub fn new(conn: H1Conn, pool: Arc<TargetPool>) -> Self {
        Self { conn, pool }
    }

    /// Puts the connection back now if hyper says it can take another request, otherwise as
    /// soon as it can (never, if it closes instead).
    pub fn give_back(self) {
        let Self { mut conn, pool } = self;
        if conn.sender.is_ready() {
            pool.checkin_h1(conn);
        } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if conn.sender.ready().await.is_ok() {
                    pool.checkin_h1(conn);
                }
            });
        }
    }
}

/// The target's response body: streamed as it arrives, failing with
/// [`ProxyError::TargetTimeout`] when the target sends nothing for the idle timeout and with
/// [`ProxyError::TargetFailed`] when the target breaks off. When it has been read to the end,
/// its HTTP/1.1 connection goes back to the pool at once, so the next request can reuse it.
pub struct TargetBody {
    inner: hyper::body::Incoming,
    target: SocketAddr,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    checkin: Option<Checkin>,
}

impl TargetBody {
    /// Wraps a response body from `target`; `checkin` is its connection, if it is to be pooled.
    pub fn new(
        inner: hyper::body::Incoming,
        target: SocketAddr,
        idle_timeout: Duration,
        checkin: Option<Checkin>,
    ) -> Self {
        let idle = Box::pin(tokio::time::sleep(idle_timeout));
        let mut body = Self {
            inner,
            target,
            idle_timeout,
            idle,
            checkin,
        };
        body.give_back_if_done();
        body
    }

    fn give_back_if_done(&mut self) {
        if self.inner.is_end_stream()
            && let Some(checkin) = self.checkin.take()
        {
            checkin.give_back();
        }
    }
}

impl Drop for TargetBody {
    fn drop(&mut self) {
        // Dropped before the end: hyper closes the connection, nothing to give back.
        self.give_back_if_done();
    }
}

impl Body for TargetBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = Instant::now() + self.idle_timeout;
                self.idle.as_mut().reset(deadline);
                self.give_back_if_done();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                Poll::Ready(Some(Err(Box::new(ProxyError::TargetFailed {
                    target: self.target.to_string(),
                    source: Box::new(error),
                }))))
            }
            Poll::Ready(None) => {
                if let Some(checkin) = self.checkin.take() {
                    checkin.give_back();
                }
                Poll::Ready(None)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(ProxyError::TargetTimeout {
                    target: self.target.to_string(),
                    timeout: self.idle_timeout,
                })))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
