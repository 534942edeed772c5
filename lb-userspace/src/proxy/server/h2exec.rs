//! HTTP/2 streams run inside their connection's task.
//!
//! hyper's HTTP/2 server hands every accepted stream (the request's service future and the
//! piping of its response) to an executor. With `TokioExecutor` each stream was a task of its
//! own: spawned, woken from the reactor, then waking the connection task through h2's shared
//! state so that the connection wrote the stream's frames, and the connection ran in a second
//! scheduler pass (often on the other worker, after work stealing).
//!
//! [`StreamExec`] is the executor of one connection: it only queues the stream futures.
//! The native HTTP/2 path (`h2native.rs`) hands its streams over without the queue: its
//! connection is polled only by the driver, which lends it [`NewStreams`] for the poll
//! ([`Driven`]), so each accepted stream goes straight into its slot, on the driver's thread,
//! with no lock, no shared flag and no wake-up (the queue took a lock to push and another to
//! pick up, per stream: about 190 instructions per request at stop 29).
//! [`Streams`] polls them next to the connection future, in the connection's task: a stream's
//! response, the connection's frame writes and the flush happen in one task and, as a rule,
//! one scheduler pass. Wake-ups that the connection and its streams give each other while the
//! task is being polled do not reschedule the task; they make [`Streams::poll_drive`] go round
//! again (streams, then the connection), at most [`MAX_ROUNDS`] times, after which the task
//! yields to the scheduler (so neither a busy connection nor busy streams starve the other or
//! other connections). One wake-up is passed on as it is: when the connection wakes itself
//! while polled and nothing else is due, the task is woken and returns, so that it runs after
//! the tasks already queued — `batch.rs` defers a batch's first flush that way, for the
//! responses that the target connections' tasks woken in the same reactor pass are about to
//! hand over.
//!
//! The running streams sit in slots the connection reuses (a slot and its waker are made once,
//! when more streams run at once than ever before on the connection): a stream costs the
//! driver no allocation. A slot's waker sets the slot's bit in an atomic bitmap of woken slots
//! (one word per 64 slots, shared by the driver and the wakers of those slots), without a lock:
//! wakers may fire from any thread (a target connection's task on another worker), the driver
//! takes each word's bits with one `swap`, and the streams-due flag set after the bit tells it
//! to look. The native path's streams are kept in their slot unboxed; hyper's
//! come boxed (their type is hyper's). `FuturesUnordered`, used before, allocated a task per
//! stream.
//!
//! Behaviour kept from the spawned tasks:
//! - A stream's future ends when the client resets the stream (hyper, and the native path,
//!   watch for RST_STREAM while the service runs) and is dropped then, as before.
//! - A panicking stream ends alone: the panic is caught, the stream's future dropped (h2 resets
//!   the stream), the connection and its other streams go on (tokio caught a panicking task's
//!   panic the same way).
//! - Graceful shutdown (GOAWAY) waits for the open streams: the connection future ends only
//!   when every stream has let go of it, and the streams are polled until then.
//!
//! Deliberate change: when the connection ends for good (the client went away, the tier
//! stopped, an abusive client was cut off), the streams still running are dropped with it at
//! once. Spawned, they ran on until they noticed that their stream had been reset by the
//! connection's end; they could not answer anyway.
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

use super::h2native;

/// Most rounds (connection, then woken streams) in one poll of the connection's task before it
/// yields to the scheduler.
pub(super) const MAX_ROUNDS: usize = 16;

/// A stream's future as hyper hands it over.
type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A stream to run: hyper's (its future boxed, of a type only hyper names) or the native
/// path's, kept unboxed in its slot.
enum Task {
    Hyper(StreamFuture),
    Native(h2native::Stream),
}

impl Task {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Task::Hyper(fut) => fut.as_mut().poll(cx),
            Task::Native(stream) => Pin::new(stream).poll(cx),
        }
    }
}

/// A connection as the driver polls it ([`Streams::poll_drive`]): every future as it is (its
/// streams, if any, come through the executor, [`StreamExec`]), and the native HTTP/2
/// connection (`h2native::Conn`, not a future), which puts the streams it accepts in `new`.
/// `new` is `None` when the connection is polled without a driver.
pub(super) trait Driven {
    type Output;

    fn poll_driven(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        new: Option<&mut NewStreams<'_>>,
    ) -> Poll<Self::Output>;
}

impl<F: Future> Driven for F {
    type Output = F::Output;

    #[inline]
    fn poll_driven(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        _new: Option<&mut NewStreams<'_>>,
    ) -> Poll<F::Output> {
        self.poll(cx)
    }
}

/// Where a connection polled by the driver puts the streams it accepts: straight into a free
/// slot (a new one when none is free), marked woken, so the driver polls it in the round that
/// follows the connection's poll, in the same pass (as a queued stream was).
pub(super) struct NewStreams<'a> {
    slots: &'a mut Slots,
}

impl NewStreams<'_> {
    /// Starts a native stream (`h2native.rs`), unboxed in its slot.
    #[inline]
    pub(super) fn native(&mut self, stream: h2native::Stream) {
        self.hand_over(Task::Native(stream));
    }

    /// Starts a boxed stream (the tests' streams).
    #[cfg(test)]
    pub(super) fn boxed(&mut self, fut: StreamFuture) {
        self.hand_over(Task::Hyper(fut));
    }

    /// Starts `task` in a slot and counts it as handed over (due in the driver's next round).
    #[inline]
    fn hand_over(&mut self, task: Task) {
        self.slots.start(task);
        self.slots.started += 1;
    }
}

/// The executor hyper gets for one connection: queues the streams for [`Streams`].
#[derive(Clone)]
pub(super) struct StreamExec {
    shared: Arc<Shared>,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.queue(Task::Hyper(Box::pin(fut)));
    }
}

impl StreamExec {
    /// Queues a native stream (`h2native.rs`), unboxed: only when its connection is polled
    /// without a driver (with one, the stream goes to [`NewStreams`]).
    pub(super) fn execute_native(&self, stream: h2native::Stream) {
        self.queue(Task::Native(stream));
    }

    fn queue(&self, task: Task) {
        self.shared
            .queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
        self.shared.queued_due.store(true, Ordering::SeqCst);
        self.shared.streams_due.store(true, Ordering::SeqCst);
        self.shared.notify();
    }
}

/// State shared by the executor, the two wakers and the driver.
struct Shared {
    /// Streams handed over and not yet picked up by the driver.
    queued: Mutex<Vec<Task>>,
    /// Streams were queued: the driver takes the queue's lock only then (set after the push,
    /// cleared before the lock is taken, so a stream pushed meanwhile is found now or next).
    queued_due: AtomicBool,
    /// The task that runs the driver (woken only when it is not being polled).
    task: AtomicWaker,
    /// The driver is inside its poll: a wake-up only sets a flag, which it reads before it
    /// returns.
    polling: AtomicBool,
    /// The connection future was woken.
    conn_due: AtomicBool,
    /// A stream was woken, or a new one queued.
    streams_due: AtomicBool,
}

impl Shared {
    /// After a `*_due` flag was set: wakes the task unless the driver is polling (then it sees
    /// the flag before returning). `SeqCst` on both sides: either the driver reads the flag
    /// after clearing `polling`, or this reads `polling` as cleared and wakes the task.
    fn notify(&self) {
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

/// The waker the connection future is polled with: marks the connection due.
struct ConnWake {
    shared: Arc<Shared>,
}

impl Wake for ConnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.conn_due.store(true, Ordering::SeqCst);
        self.shared.notify();
    }
}

/// The woken bits of 64 slots (slot `64 * i + b` is bit `b` of word `i`), shared by the driver
/// and those slots' wakers.
type WokenWord = Arc<AtomicU64>;

/// The waker of one stream slot: sets the slot's woken bit and, when the bit was clear, marks
/// the streams due (a slot woken again before it is polled costs one atomic `or`). No lock:
/// the bit is the whole record of the wake-up.
struct SlotWake {
    shared: Arc<Shared>,
    word: WokenWord,
    bit: u64,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // `SeqCst`: the bit is set before the flag, so a driver that sees the flag (it clears
        // it before taking the bits) finds the bit; one that took the bits before this sees
        // the flag in its next round or next poll.
        if self.word.fetch_or(self.bit, Ordering::SeqCst) & self.bit != 0 {
            return;
        }
        self.shared.streams_due.store(true, Ordering::SeqCst);
        self.shared.notify();
    }
}

/// A place for one running stream, reused by the connection's later streams with its waker:
/// a stream costs no allocation of the driver's (`FuturesUnordered` allocated a task per
/// stream, and the native stream was boxed).
struct Slot {
    task: Option<Task>,
    waker: Waker,
}

/// The streams of one connection and the driver that polls them with the connection.
pub(super) struct Streams {
    shared: Arc<Shared>,
    slots: Slots,
    /// The slots to poll in this round (taken from the bitmap).
    ready: Vec<usize>,
    conn_waker: Waker,
    /// The queue's storage, swapped with it when streams are picked up.
    spare: Vec<Task>,
    /// What the tests check ([`Streams::stats`]; the slots made are counted in [`Slots`]).
    #[cfg(test)]
    counts: Stats,
}

/// The running streams' places, and the streams started in them since the driver last looked.
struct Slots {
    shared: Arc<Shared>,
    /// As many as ever ran at once on the connection (h2 bounds them:
    /// `HTTP2_MAX_CONCURRENT_STREAMS`, plus the reset ones not yet dropped).
    slots: Vec<Slot>,
    /// Empty slots.
    free: Vec<usize>,
    /// The woken bitmap: word `i` holds the bits of slots `64 * i..64 * i + 64`, one word made
    /// with the first slot it covers.
    woken: Vec<WokenWord>,
    /// Streams the connection handed over ([`NewStreams`]) since the driver last polled the
    /// streams (they are due; queued ones are found through `streams_due`).
    started: usize,
    /// Slots made (each reused by later streams once free).
    #[cfg(test)]
    made: usize,
}

impl Slots {
    /// Puts `task` in a free slot (a new one when none is free), marked woken, to be polled in
    /// the driver's next round.
    fn start(&mut self, task: Task) {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => self.make(),
        };
        self.slots[slot].task = Some(task);
        // Polled in the next round with the woken slots (`poll_streams` takes the bits). The
        // bit may be set already by a wake-up meant for the slot's previous stream: then the
        // new stream is polled once all the same (a spurious poll is harmless to a stream
        // that did not ask for it).
        self.woken[slot / 64].fetch_or(1 << (slot % 64), Ordering::SeqCst);
    }

    /// A new empty slot with its waker (and its bitmap word, first slot of 64).
    #[cold]
    fn make(&mut self) -> usize {
        let slot = self.slots.len();
        if slot.is_multiple_of(64) {
            self.woken.push(Arc::new(AtomicU64::new(0)));
        }
        let wake = Arc::new(SlotWake {
            shared: self.shared.clone(),
            word: self.woken[slot / 64].clone(),
            bit: 1 << (slot % 64),
        });
        self.slots.push(Slot {
            task: None,
            waker: Waker::from(wake),
        });
        #[cfg(test)]
        {
            self.made += 1;
        }
        slot
    }
}

/// What a test can check of the driver.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Stats {
    /// Streams started (picked up from the queue or handed over by the connection).
    pub(super) started: usize,
    /// Streams that panicked.
    pub(super) panicked: usize,
    /// Polls that used every round and yielded.
    pub(super) yielded: usize,
    /// Stream slots made (each reused by later streams once free).
    pub(super) slots: usize,
    /// Stream polls (first polls and polls after a wake-up).
    pub(super) polls: usize,
    /// Rounds (streams, then the connection) over all polls of the driver.
    pub(super) rounds: usize,
}

impl Default for Streams {
    fn default() -> Self {
        Self::new()
    }
}

impl Streams {
    pub(super) fn new() -> Self {
        let shared = Arc::new(Shared {
            queued: Mutex::new(Vec::new()),
            queued_due: AtomicBool::new(false),
            task: AtomicWaker::new(),
            polling: AtomicBool::new(false),
            // The first poll polls both.
            conn_due: AtomicBool::new(true),
            streams_due: AtomicBool::new(true),
        });
        Self {
            conn_waker: Waker::from(Arc::new(ConnWake {
                shared: shared.clone(),
            })),
            slots: Slots {
                shared: shared.clone(),
                slots: Vec::new(),
                free: Vec::new(),
                woken: Vec::new(),
                started: 0,
                #[cfg(test)]
                made: 0,
            },
            shared,
            ready: Vec::new(),
            spare: Vec::new(),
            #[cfg(test)]
            counts: Stats::default(),
        }
    }

    /// What the driver did so far.
    #[cfg(test)]
    pub(super) fn stats(&self) -> Stats {
        Stats {
            slots: self.slots.made,
            ..self.counts
        }
    }

    /// The executor to build this connection's hyper connection with.
    pub(super) fn executor(&self) -> StreamExec {
        StreamExec {
            shared: self.shared.clone(),
        }
    }

    /// Polls `conn` and the streams until `conn` ends; a future to `select!` on in the
    /// connection's loop (it borrows `conn` only while it exists).
    pub(super) fn drive<'a, C: Driven>(&'a mut self, conn: Pin<&'a mut C>) -> Drive<'a, C> {
        // The connection's loop may have changed the connection between two of these futures
        // (`graceful_shutdown` wakes nothing): poll it first, as when it was polled directly.
        self.shared.conn_due.store(true, Ordering::SeqCst);
        Drive {
            streams: self,
            conn,
        }
    }

    /// One poll of the connection's task: the streams that were woken or queued, then the
    /// connection if it was woken, again while either woke the other, at most [`MAX_ROUNDS`]
    /// times (module docs).
    pub(super) fn poll_drive<C: Driven>(
        &mut self,
        mut conn: Pin<&mut C>,
        cx: &mut Context<'_>,
    ) -> Poll<C::Output> {
        self.shared.task.register(cx.waker());
        for _ in 0..MAX_ROUNDS {
            #[cfg(test)]
            {
                self.counts.rounds += 1;
            }
            self.shared.polling.store(true, Ordering::SeqCst);
            // Streams first: the responses they produce go out with the connection's poll
            // that follows. Those the connection started in the previous round are due too.
            let started = std::mem::take(&mut self.slots.started);
            #[cfg(test)]
            {
                self.counts.started += started;
            }
            if self.shared.streams_due.swap(false, Ordering::SeqCst) | (started != 0) {
                self.pick_up();
                self.poll_streams();
            }
            // The connection woke itself while it was polled: it asks to run again after the
            // tasks already queued (`batch.rs` defers the first flush of a batch so).
            let mut conn_yields = false;
            if self.shared.conn_due.swap(false, Ordering::SeqCst) {
                let mut ccx = Context::from_waker(&self.conn_waker);
                let mut new = NewStreams {
                    slots: &mut self.slots,
                };
                if let Poll::Ready(out) = conn.as_mut().poll_driven(&mut ccx, Some(&mut new)) {
                    self.shared.polling.store(false, Ordering::SeqCst);
                    return Poll::Ready(out);
                }
                conn_yields = self.shared.conn_due.swap(false, Ordering::SeqCst);
            }
            self.shared.polling.store(false, Ordering::SeqCst);
            if self.slots.started != 0
                || self.shared.streams_due.load(Ordering::SeqCst)
                || self.shared.conn_due.load(Ordering::SeqCst)
            {
                // More to do in this pass anyway (a stream started or woken by the connection,
                // or a wake from outside): the connection runs again in it.
                if conn_yields {
                    self.shared.conn_due.store(true, Ordering::SeqCst);
                }
                continue;
            }
            if conn_yields {
                self.shared.conn_due.store(true, Ordering::SeqCst);
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        // Still work to do: let the scheduler run other tasks first. The flags stay set, so
        // the next poll starts with it.
        #[cfg(test)]
        {
            self.counts.yielded += 1;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Moves the queued streams (hyper's) into free slots, each marked woken, to be polled in
    /// this round. The queue's lock is taken only when something was queued.
    fn pick_up(&mut self) {
        if !self.shared.queued_due.load(Ordering::SeqCst) {
            return;
        }
        self.shared.queued_due.store(false, Ordering::SeqCst);
        std::mem::swap(
            &mut *self
                .shared
                .queued
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            &mut self.spare,
        );
        #[cfg(test)]
        {
            self.counts.started += self.spare.len();
        }
        for task in self.spare.drain(..) {
            self.slots.start(task);
        }
    }

    /// Polls the new and the woken streams once each; their bits are cleared before the first
    /// of them is polled, so a stream woken from then on (by its own poll, another stream's or
    /// another thread) has its bit set again and is polled in the next round. A panicking
    /// stream is dropped (h2 resets it), the others go on.
    fn poll_streams(&mut self) {
        for (i, word) in self.slots.woken.iter().enumerate() {
            // A plain load first: most words of a connection with many slots have no bit set,
            // and the `swap` is a locked instruction.
            if word.load(Ordering::SeqCst) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::SeqCst);
            while bits != 0 {
                self.ready.push(64 * i + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        for i in 0..self.ready.len() {
            let slot = &mut self.slots.slots[self.ready[i]];
            let Some(task) = &mut slot.task else {
                continue;
            };
            #[cfg(test)]
            {
                self.counts.polls += 1;
            }
            let mut cx = Context::from_waker(&slot.waker);
            let panicked = match std::panic::catch_unwind(AssertUnwindSafe(|| task.poll(&mut cx))) {
                Ok(Poll::Pending) => continue,
                Ok(Poll::Ready(())) => false,
                Err(_) => true,
            };
            // Dropped outside the catch, as `FuturesUnordered` dropped a panicked future.
            slot.task = None;
            self.slots.free.push(self.ready[i]);
            if panicked {
                #[cfg(test)]
                {
                    self.counts.panicked += 1;
                }
                tracing::error!(
                    "an HTTP/2 stream panicked; its stream was reset, the connection goes on"
                );
            }
        }
        self.ready.clear();
    }
}

/// [`Streams::drive`]'s future.
pub(super) struct Drive<'a, C> {
    streams: &'a mut Streams,
    conn: Pin<&'a mut C>,
}

impl<C: Driven> Future for Drive<'_, C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        this.streams.poll_drive(this.conn.as_mut(), cx)
    }
}

#[cfg(test)]
mod tests;
