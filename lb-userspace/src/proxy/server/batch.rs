//! Write batching under HTTP/2 over TLS: frames that become ready in one scheduler pass share
//! one TLS record and one `writev`.
//!
//! hyper's HTTP/2 connection collects the frames of every stream that is ready when its task
//! runs, then flushes: tokio-rustls encrypts each `poll_write` into a record and writes it at
//! once. Each stream's response becomes ready in the stream's own task, and tokio runs a task
//! woken by another task next (its LIFO slot), so the connection task usually ran after every
//! single response and wrote one record per response (about 0.6 client `writev` per request
//! under `h2load -c32 -m10`, BENCHMARKS.md).
//!
//! [`BatchedWrites`] sits between the HTTP/2 connection and the TLS stream. It keeps the
//! plaintext written to it, and the first flush of a batch wakes the task and returns
//! `Pending`: the task goes to the back of the run queue (tokio runs a task that woke itself
//! after the tasks already queued), the stream tasks woken by the same reactor pass add their
//! frames, and the next flush hands everything to TLS in one write. A flush is deferred at most
//! once: the wake-up guarantees the task is polled again, and h2 flushes on every poll of the
//! connection (and before shutting it down).
//!
//! Since the streams run in the connection's task (`h2exec.rs`), the responses of the streams
//! woken together are written in one pass anyway; the deferral still lets the target
//! connections' tasks woken in the same reactor pass hand over their responses first
//! (`h2exec` passes the connection's self-wake on to the scheduler when nothing else is due).
//!
//! Reads that would wait are answered here. hyper takes each accepted stream from h2 with a
//! call that first runs h2's whole connection driver, and the driver reads until the socket
//! has nothing more. So after one TLS record that carried ten requests, the nine following
//! calls each went down through TLS to tokio's readiness check to learn again that nothing
//! had arrived (1.33 reads per HTTP/2 request that found nothing, under `h2load -c32 -m10`).
//! `BatchedWrites` reads with a waker of its own. After a read that had to wait, the next
//! read returns `Pending` at once, with no call into TLS, until that waker fires (tokio
//! wakes it when the socket becomes readable); the waker then wakes the task that read last.
//! The inner stream still holds a waker that reaches the reading task, so no wake-up is lost.
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most plaintext kept before it is handed to the inner stream without waiting for a flush:
/// four full TLS records.
const MAX_BUFFERED: usize = 64 * 1024;

/// A write of at least this much, when nothing is buffered, goes straight to the inner stream:
/// it fills a TLS record by itself, batching would only copy it.
const PASS_THROUGH: usize = 16 * 1024;

/// An I/O stream whose writes are kept until a flush, and whose flush of new data is deferred
/// once to the end of the current scheduler pass (module docs).
#[derive(Debug)]
pub(super) struct BatchedWrites<IO> {
    io: IO,
    /// Plaintext not yet handed to `io`; `buf[sent..]` is what remains.
    buf: Vec<u8>,
    sent: usize,
    /// The flush of what is in `buf` was already deferred once: the next flush writes it.
    deferred: bool,
    /// The waker reads of `io` are made with (it wakes [`ReadWake::task`]).
    read_waker: Waker,
    read_wake: Arc<ReadWake>,
    /// The last read of `io` returned `Pending`: until `read_wake` fires, another would too.
    read_blocked: bool,
}

/// The waker `io` is read with (module docs): records that it fired, then wakes the task that
/// read last.
#[derive(Debug, Default)]
struct ReadWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ReadWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // `SeqCst` here and in `poll_read`: either the reader sees the flag, or this sees
        // the reader's waker registered (`AtomicWaker` orders the hand-over).
        self.woken.store(true, Ordering::SeqCst);
        self.task.wake();
    }
}

impl<IO> BatchedWrites<IO> {
    pub(super) fn new(io: IO) -> Self {
        let read_wake = Arc::new(ReadWake::default());
        Self {
            io,
            buf: Vec::new(),
            sent: 0,
            deferred: false,
            read_waker: Waker::from(read_wake.clone()),
            read_wake,
            read_blocked: false,
        }
    }

    fn unsent(&self) -> usize {
        self.buf.len() - self.sent
    }
}

impl<IO: AsyncWrite + Unpin> BatchedWrites<IO> {
    /// Hands everything kept to `io` (`Pending` while it cannot take more).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        self.deferred = false;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: drains first when they would not fit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.unsent() > 0 && self.unsent() + len > MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for BatchedWrites<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.read_wake.task.register(cx.waker());
        if this.read_blocked && !this.read_wake.woken.load(Ordering::SeqCst) {
            // Nothing can have arrived since the last read waited (module docs); the waker
            // just registered is woken when something does.
            return Poll::Pending;
        }
        // Cleared before reading: a wake-up from now on makes the next read go through.
        this.read_wake.woken.store(false, Ordering::SeqCst);
        let read =
            Pin::new(&mut this.io).poll_read(&mut Context::from_waker(&this.read_waker), buf);
        this.read_blocked = read.is_pending();
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx, data.len()))?;
        if this.unsent() == 0 && data.len() >= PASS_THROUGH {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        let n = data.len().min(MAX_BUFFERED - this.unsent());
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, len))?;
        if this.unsent() == 0 && len >= PASS_THROUGH {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(MAX_BUFFERED - this.unsent());
            this.buf.extend_from_slice(&b[..take]);
            n += take;
            if take < b.len() {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        // Slices are copied into one buffer: h2 then hands over a frame head and its payload
        // in one call.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.unsent() > 0 {
            if !this.deferred {
                // Once per batch: run again after the tasks already queued, whose frames
                // then go out with these.
                this.deferred = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use super::*;

    /// An inner stream that records every write it gets (as TLS would make one record and one
    /// syscall of each).
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shutdown: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shutdown = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn write<W: AsyncWrite + Unpin>(w: &mut W, cx: &mut Context<'_>, data: &[u8]) {
        assert!(matches!(
            Pin::new(w).poll_write(cx, data),
            Poll::Ready(Ok(n)) if n == data.len()
        ));
    }

    /// What a connection task does when polled once per ready response: write its frames,
    /// flush; `rounds` times. Returns how many flush calls returned `Pending`.
    fn respond_one_at_a_time<W: AsyncWrite + Unpin>(
        w: &mut W,
        cx: &mut Context<'_>,
        frames: &[&[u8]],
    ) -> usize {
        let mut pending = 0;
        for frame in frames {
            write(w, cx, frame);
            if Pin::new(&mut *w).poll_flush(cx).is_pending() {
                pending += 1;
            }
        }
        pending
    }

    #[test]
    fn frames_flushed_one_at_a_time_go_out_in_one_write() {
        let frames: [&[u8]; 3] = [b"headers+data 1;", b"headers+data 2;", b"headers+data 3;"];
        let waker = Arc::new(CountingWaker::default());
        let w = Waker::from(waker.clone());
        let mut cx = Context::from_waker(&w);

        // Positive control: straight on the stream, one write (one TLS record) per flush.
        let mut bare = Recorder::default();
        assert_eq!(respond_one_at_a_time(&mut bare, &mut cx, &frames), 0);
        assert_eq!(bare.writes.len(), 3);

        // Batched: the first flush is deferred (and wakes the task), the second writes all
        // three frames at once, and the third (the write after it) is deferred again.
        let mut batched = BatchedWrites::new(Recorder::default());
        let pending = respond_one_at_a_time(&mut batched, &mut cx, &frames);
        assert_eq!(pending, 2);
        assert_eq!(batched.io.writes, [frames[..2].concat()]);
        assert_eq!(
            waker.0.load(Ordering::SeqCst),
            2,
            "every deferral wakes the task"
        );
        // The task, woken, flushes again: the last frame goes out.
        assert!(Pin::new(&mut batched).poll_flush(&mut cx).is_ready());
        assert_eq!(
            batched.io.writes,
            [frames[..2].concat(), frames[2].to_vec()]
        );
    }

    #[test]
    fn a_lone_response_is_written_on_the_flush_after_the_wake_up() {
        let waker = Arc::new(CountingWaker::default());
        let w = Waker::from(waker.clone());
        let mut cx = Context::from_waker(&w);
        let mut batched = BatchedWrites::new(Recorder::default());
        write(&mut batched, &mut cx, b"only response");
        assert!(Pin::new(&mut batched).poll_flush(&mut cx).is_pending());
        assert_eq!(waker.0.load(Ordering::SeqCst), 1);
        assert!(batched.io.writes.is_empty());
        // Nothing else happened in between: the second flush writes it and completes.
        assert!(matches!(
            Pin::new(&mut batched).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(batched.io.writes, [b"only response".to_vec()]);
        assert_eq!(batched.io.flushes, 1);
        // A flush with nothing kept is not deferred.
        assert!(Pin::new(&mut batched).poll_flush(&mut cx).is_ready());
        assert_eq!(waker.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn shutdown_writes_what_is_kept_first_and_big_writes_pass_through() {
        let waker = Arc::new(CountingWaker::default());
        let w = Waker::from(waker.clone());
        let mut cx = Context::from_waker(&w);
        let mut batched = BatchedWrites::new(Recorder::default());
        let big = vec![7u8; PASS_THROUGH];
        write(&mut batched, &mut cx, &big);
        assert_eq!(batched.io.writes.len(), 1, "a record's worth is not copied");
        write(&mut batched, &mut cx, b"goaway");
        assert!(Pin::new(&mut batched).poll_shutdown(&mut cx).is_ready());
        assert_eq!(batched.io.writes[1], b"goaway");
        assert!(batched.io.shutdown);
    }

    #[test]
    fn a_full_buffer_is_handed_on_without_waiting_for_a_flush() {
        let waker = Arc::new(CountingWaker::default());
        let w = Waker::from(waker.clone());
        let mut cx = Context::from_waker(&w);
        let mut batched = BatchedWrites::new(Recorder::default());
        let chunk = vec![1u8; 1000];
        let mut written = 0;
        while written <= MAX_BUFFERED {
            write(&mut batched, &mut cx, &chunk);
            written += chunk.len();
        }
        assert_eq!(batched.io.writes.len(), 1);
        assert!(batched.io.writes[0].len() <= MAX_BUFFERED);
        assert_eq!(batched.unsent() + batched.io.writes[0].len(), written);
    }

    /// An inner stream to read from: counts its reads, keeps the waker of the last one, and
    /// has `ready` bytes or else waits.
    #[derive(Default)]
    struct Source {
        reads: usize,
        ready: Vec<u8>,
        waker: Option<Waker>,
    }

    impl AsyncRead for Source {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.reads += 1;
            if this.ready.is_empty() {
                this.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            buf.put_slice(&std::mem::take(&mut this.ready));
            Poll::Ready(Ok(()))
        }
    }

    fn read<R: AsyncRead + Unpin>(r: &mut R, cx: &mut Context<'_>) -> Poll<Vec<u8>> {
        let mut space = [0u8; 64];
        let mut buf = ReadBuf::new(&mut space);
        match Pin::new(r).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => Poll::Ready(buf.filled().to_vec()),
            Poll::Ready(Err(e)) => panic!("read failed: {e}"),
            Poll::Pending => Poll::Pending,
        }
    }

    #[test]
    fn a_read_that_would_wait_again_does_not_reach_the_inner_stream_until_it_wakes() {
        let task = Arc::new(CountingWaker::default());
        let w = Waker::from(task.clone());
        let mut cx = Context::from_waker(&w);
        let mut s = BatchedWrites::new(Source::default());

        assert!(read(&mut s, &mut cx).is_pending());
        assert_eq!(s.io.reads, 1);
        // Nothing woke the inner stream's waker: the next reads stop here.
        assert!(read(&mut s, &mut cx).is_pending());
        assert!(read(&mut s, &mut cx).is_pending());
        assert_eq!(
            s.io.reads, 1,
            "reads that would wait are answered without the inner stream"
        );

        // Data arrives and the inner stream wakes the waker it holds: the task is woken, and
        // the next read reaches the inner stream and gets the data (the positive control).
        s.io.ready = b"frames".to_vec();
        s.io.waker
            .take()
            .expect("the inner read kept a waker")
            .wake();
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "the reading task is woken"
        );
        assert_eq!(read(&mut s, &mut cx), Poll::Ready(b"frames".to_vec()));
        assert_eq!(s.io.reads, 2);

        // After a read that got data, the next one goes through again (and waits).
        assert!(read(&mut s, &mut cx).is_pending());
        assert_eq!(s.io.reads, 3);
        assert!(read(&mut s, &mut cx).is_pending());
        assert_eq!(s.io.reads, 3);
    }

    #[test]
    fn a_wake_up_reaches_the_task_that_read_last() {
        let first = Arc::new(CountingWaker::default());
        let second = Arc::new(CountingWaker::default());
        let (w1, w2) = (Waker::from(first.clone()), Waker::from(second.clone()));
        let mut s = BatchedWrites::new(Source::default());

        assert!(read(&mut s, &mut Context::from_waker(&w1)).is_pending());
        assert!(read(&mut s, &mut Context::from_waker(&w2)).is_pending());
        assert_eq!(s.io.reads, 1);
        s.io.waker
            .take()
            .expect("the inner read kept a waker")
            .wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
