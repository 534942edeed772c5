//! The future hyper gets from the service for each request it serves (HTTP/2 streams, and
//! HTTP/1 on hyper's path): the pipeline's future, boxed.
//!
//! The pipeline's future is large (it holds the whole request's state, the forward to the
//! target included). hyper's HTTP/2 server puts the service future inside its stream future
//! and hands that to the executor (`h2exec.rs`), which boxes it: the stream future was copied
//! twice on the way (about 1,200 instructions of `memcpy` per request, and a large allocation
//! on mimalloc's slow path). Boxed here once, only a pointer travels with the stream.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;

use super::pipeline::{self, ConnCtx};
use crate::proxy::client::ProxyBody;

/// What the service answers: the response, never an error (the pipeline makes its own).
type Answered = Result<Response<ProxyBody>, Infallible>;

/// One request's service future (module docs).
pub(super) struct Respond {
    inner: Pin<Box<dyn Future<Output = Answered> + Send>>,
}

impl Respond {
    /// Starts the pipeline for `req`.
    pub(super) fn new(ctx: &Arc<ConnCtx>, req: Request<Incoming>) -> Self {
        Self {
            inner: Box::pin(pipeline::handle(ctx.clone(), req)),
        }
    }
}

impl Future for Respond {
    type Output = Answered;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answered> {
        self.get_mut().inner.as_mut().poll(cx)
    }
}
