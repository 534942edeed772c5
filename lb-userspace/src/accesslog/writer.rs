//! The background log writer: requests hand it lines through a bounded queue and never wait.
//!
//! One thread per log formats the queued entries and writes them to a file (rotated by size
//! and/or age, reopened on request: SIGHUP after logrotate moved it) or to stdout. When the
//! queue is full — the disk is slow, the pipe is not read — the entry is dropped and counted
//! ([`WriterStats::dropped`]): a slow log never stalls a request.
//!
//! Queuing an entry takes no lock and makes no system call: the writer is never woken per
//! entry. It wakes every [`POLL`] and writes everything queued in one go (one `write` per
//! batch), so a busy listener pays for its log in formatting on another thread and a
//! fraction of a system call per line, not a futex wake-up and a context switch per line.
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// Entries queued at most before new ones are dropped (about a second of a busy listener;
/// a few MiB of memory at worst).
pub const QUEUE_CAPACITY: usize = 8192;

/// How often the writer looks for queued entries (and for a reopen or a rotation due): the
/// longest a line waits before it is written. At [`QUEUE_CAPACITY`] entries per poll it
/// keeps up with 400,000 lines a second.
pub const POLL: Duration = Duration::from_millis(20);

/// Where lines go.
pub enum Destination {
    /// Standard output (`--access-log -`).
    Stdout,
    /// A file, appended to (created mode 0640 if missing).
    File(PathBuf),
    /// Any writer (tests: a pipe nobody reads).
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Writer(_) => f.write_str("writer"),
        }
    }
}

/// When a log file is rotated: renamed to `PATH.YYYYMMDDTHHMMSSZ` and a new one started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate before a line would make the file larger than this. `None` (default): never
    /// by size.
    pub max_bytes: Option<u64>,
    /// Rotate when the file has been written to for this long. `None` (default): never by
    /// age (ALB itself publishes a file every 5 minutes).
    pub interval: Option<Duration>,
    /// Rotated files kept; older ones are deleted. Default [`Rotation::DEFAULT_KEEP`].
    pub keep: usize,
}

impl Rotation {
    /// Rotated files kept by default.
    pub const DEFAULT_KEEP: usize = 10;
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: None,
            interval: None,
            keep: Self::DEFAULT_KEEP,
        }
    }
}

/// What a writer did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Lines written (a flush after them succeeded).
    pub written: u64,
    /// Lines lost: the queue was full (the writer could not keep up), or a write or flush
    /// failed with them unflushed. `written + dropped` is every line logged.
    pub dropped: u64,
    /// Failed writes and flushes (disk full, closed pipe).
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
}

/// A log written by a background thread. Cheap to share (`Arc`); the thread ends when the last
/// handle is dropped, after writing what is queued.
pub struct LogWriter<T> {
    tx: SyncSender<T>,
    /// Set by [`LogWriter::close`]: entries are refused, the writer drains what is queued
    /// and stops.
    closed: Arc<AtomicBool>,
    counters: Arc<Counters>,
    reopen: Arc<AtomicBool>,
    done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl<T> std::fmt::Debug for LogWriter<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("written", &self.counters.written)
            .field("dropped", &self.counters.dropped)
            .finish()
    }
}

impl<T: Send + 'static> LogWriter<T> {
    /// Opens `destination` (so a bad path is reported now, not at the first line) and starts
    /// the thread that writes each entry as `format` renders it (one line, no newline).
    pub fn start(
        name: &str,
        destination: Destination,
        rotation: Rotation,
        format: impl Fn(&T, &mut String) + Send + 'static,
    ) -> io::Result<Self> {
        Self::with_capacity(name, destination, rotation, QUEUE_CAPACITY, format)
    }

    /// [`Self::start`] with a queue of `capacity` entries.
    pub fn with_capacity(
        name: &str,
        destination: Destination,
        rotation: Rotation,
        capacity: usize,
        format: impl Fn(&T, &mut String) + Send + 'static,
    ) -> io::Result<Self> {
        let sink = Sink::open(destination, rotation)?;
        let (tx, rx) = sync_channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let reopen = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = sync_channel(1);
        let c = counters.clone();
        let r = reopen.clone();
        let stop = closed.clone();
        thread::Builder::new()
            .name(format!("lb-{name}"))
            .spawn(move || {
                run(rx, sink, &c, &r, &stop, format);
                let _ = done_tx.send(());
            })?;
        Ok(Self {
            tx,
            closed,
            counters,
            reopen,
            done: Mutex::new(Some(done_rx)),
        })
    }

    /// Queues an entry; drops (and counts) it when the queue is full. Never blocks.
    pub fn log(&self, entry: T) {
        let sent = if self.closed.load(Ordering::Relaxed) {
            Err(TrySendError::Disconnected(entry))
        } else {
            self.tx.try_send(entry)
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = sent {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the file and opens the path again before the next line (SIGHUP: logrotate
    /// moved the file away).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Counts so far.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            written: self.counters.written.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            errors: self.counters.errors.load(Ordering::Relaxed),
        }
    }

    /// Stops taking entries and waits up to `wait` for the queued ones to be written (a
    /// writer stuck on a pipe nobody reads is left behind).
    pub fn close(&self, wait: Duration) {
        self.closed.store(true, Ordering::Relaxed);
        let done = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(done) = done {
            let _ = done.recv_timeout(wait);
        }
    }
}

fn run<T>(
    rx: Receiver<T>,
    mut sink: Sink,
    counters: &Counters,
    reopen: &AtomicBool,
    closed: &AtomicBool,
    format: impl Fn(&T, &mut String),
) {
    let mut line = String::with_capacity(512);
    loop {
        if reopen.swap(false, Ordering::Relaxed)
            && let Err(e) = sink.reopen()
        {
            tracing::warn!(log = ?sink.describe(), error = %e, "reopening the log failed");
        }
        if let Err(e) = sink.rotate_if_old() {
            tracing::warn!(log = ?sink.describe(), error = %e, "rotating the log failed");
        }
        // Read `closed` before draining: whatever was queued before it was set is written.
        let closing = closed.load(Ordering::Relaxed);
        // Everything queued now, then one flush. A line counts as written once a flush
        // after it succeeded; when a write or flush fails, the lines since the last good
        // flush count as dropped (some may have made it: the count errs on the side of
        // loss, and written + dropped is every line ever queued or refused).
        let mut pending: u64 = 0;
        let lost = |pending: &mut u64| {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            counters.dropped.fetch_add(*pending, Ordering::Relaxed);
            *pending = 0;
        };
        let disconnected = loop {
            match rx.try_recv() {
                Ok(entry) => {
                    line.clear();
                    format(&entry, &mut line);
                    line.push('\n');
                    pending += 1;
                    if sink.write_line(line.as_bytes()).is_err() {
                        lost(&mut pending);
                    }
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if pending > 0 {
            match sink.flush() {
                Ok(()) => {
                    counters.written.fetch_add(pending, Ordering::Relaxed);
                }
                Err(_) => lost(&mut pending),
            }
        }
        if closing || disconnected {
            break;
        }
        thread::sleep(POLL);
    }
    let _ = sink.flush();
}

/// The open destination.
enum Sink {
    Stdout(BufWriter<io::Stdout>),
    Writer(BufWriter<Box<dyn Write + Send>>),
    File {
        path: PathBuf,
        file: BufWriter<File>,
        size: u64,
        opened: Instant,
        rotation: Rotation,
    },
}

fn open_append(path: &Path) -> io::Result<(BufWriter<File>, u64)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok((BufWriter::with_capacity(64 * 1024, file), size))
}

impl Sink {
    fn open(destination: Destination, rotation: Rotation) -> io::Result<Self> {
        Ok(match destination {
            Destination::Stdout => Self::Stdout(BufWriter::new(io::stdout())),
            Destination::Writer(w) => Self::Writer(BufWriter::new(w)),
            Destination::File(path) => {
                let (file, size) = open_append(&path).map_err(|e| {
                    io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
                })?;
                Self::File {
                    path,
                    file,
                    size,
                    opened: Instant::now(),
                    rotation,
                }
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            Self::Stdout(_) => "stdout".into(),
            Self::Writer(_) => "writer".into(),
            Self::File { path, .. } => path.display().to_string(),
        }
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Self::Stdout(w) => w.write_all(line),
            Self::Writer(w) => w.write_all(line),
            Self::File {
                file,
                size,
                rotation,
                ..
            } => {
                if let Some(max) = rotation.max_bytes
                    && *size > 0
                    && *size + line.len() as u64 > max
                {
                    self.rotate()?;
                    return self.write_line(line);
                }
                file.write_all(line)?;
                *size += line.len() as u64;
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Stdout(w) => w.flush(),
            Self::Writer(w) => w.flush(),
            Self::File { file, .. } => file.flush(),
        }
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let Self::File {
            path,
            file,
            size,
            opened,
            ..
        } = self
        {
            file.flush()?;
            let (f, s) = open_append(path)?;
            *file = f;
            *size = s;
            *opened = Instant::now();
        }
        Ok(())
    }

    fn rotate_if_old(&mut self) -> io::Result<()> {
        match self {
            Self::File {
                opened,
                size,
                rotation:
                    Rotation {
                        interval: Some(interval),
                        ..
                    },
                ..
            } if opened.elapsed() >= *interval && *size > 0 => self.rotate(),
            _ => Ok(()),
        }
    }

    /// Renames the file to `PATH.<UTC time>`, starts a new one, deletes the oldest rotated
    /// files beyond `keep`.
    fn rotate(&mut self) -> io::Result<()> {
        let Self::File {
            path,
            file,
            size,
            opened,
            rotation,
        } = self
        else {
            return Ok(());
        };
        file.flush()?;
        let mut stamp = String::new();
        super::iso8601(SystemTime::now(), &mut stamp);
        // 2018-07-02T22:23:00.186641Z → 20180702T222300Z (ALB's end-time style).
        let compact: String = stamp
            .chars()
            .take(19)
            .filter(|c| *c != '-' && *c != ':')
            .collect();
        let base = format!("{}.{compact}Z", path.display());
        let mut target = PathBuf::from(&base);
        let mut n = 1;
        while target.exists() {
            target = PathBuf::from(format!("{base}-{n}"));
            n += 1;
        }
        std::fs::rename(&*path, &target)?;
        let (f, s) = open_append(path)?;
        *file = f;
        *size = s;
        *opened = Instant::now();
        prune(path, rotation.keep);
        Ok(())
    }
}

/// Deletes rotated copies of `path` beyond the `keep` newest (their names sort by time).
fn prune(path: &Path, keep: usize) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut rotated: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    rotated.sort();
    let excess = rotated.len().saturating_sub(keep);
    for old in rotated.into_iter().take(excess) {
        let _ = std::fs::remove_file(old);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Condvar;

    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "lb-writer-{name}-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn text(n: &u32, out: &mut String) {
        out.push_str(&format!("line {n:04}"));
    }

    fn wait_until(mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "condition never held"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_reach_the_file_in_order() {
        let dir = tempdir("order");
        let path = dir.join("access.log");
        let w = LogWriter::start(
            "t",
            Destination::File(path.clone()),
            Rotation::default(),
            text,
        )
        .unwrap();
        for i in 0..100 {
            w.log(i);
        }
        w.close(Duration::from_secs(5));
        let got = std::fs::read_to_string(&path).unwrap();
        let want: String = (0..100).map(|i| format!("line {i:04}\n")).collect();
        assert_eq!(got, want);
        assert_eq!(w.stats().written, 100);
        assert_eq!(w.stats().dropped, 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn size_rotation_keeps_every_line_and_prunes_old_files() {
        let dir = tempdir("size");
        let path = dir.join("access.log");
        let rotation = Rotation {
            max_bytes: Some(100),
            interval: None,
            keep: 3,
        };
        let w = LogWriter::start("t", Destination::File(path.clone()), rotation, text).unwrap();
        // 10 bytes a line: 10 lines per file. Sent in batches so rotations get distinct names.
        for i in 0..50 {
            w.log(i);
        }
        w.close(Duration::from_secs(5));
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() <= 4, "{files:?}");
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 100, "{f:?}");
        }
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.ends_with("line 0049\n"), "{current}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn reopen_follows_a_file_moved_away() {
        let dir = tempdir("reopen");
        let path = dir.join("access.log");
        let w = LogWriter::start(
            "t",
            Destination::File(path.clone()),
            Rotation::default(),
            text,
        )
        .unwrap();
        w.log(1);
        wait_until(|| w.stats().written == 1);
        let moved = dir.join("access.log.1");
        std::fs::rename(&path, &moved).unwrap();
        w.reopen();
        w.log(2);
        w.close(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "line 0001\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "line 0002\n");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A writer that blocks until released, like a pipe nobody reads.
    struct Stuck {
        gate: Arc<(Mutex<bool>, Condvar)>,
        entered: Arc<AtomicBool>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.entered.store(true, Ordering::SeqCst);
            let (lock, cv) = &*self.gate;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_writer_that_cannot_keep_up_drops_and_counts_without_blocking() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let entered = Arc::new(AtomicBool::new(false));
        let stuck = Stuck {
            gate: gate.clone(),
            entered: entered.clone(),
        };
        let w = LogWriter::with_capacity(
            "t",
            Destination::Writer(Box::new(stuck)),
            Rotation::default(),
            4,
            text,
        )
        .unwrap();
        w.log(0);
        wait_until(|| entered.load(Ordering::SeqCst));
        let started = Instant::now();
        for i in 1..=1000 {
            w.log(i);
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "logging never waits"
        );
        assert_eq!(
            w.stats().dropped,
            1000 - 4,
            "only the queue's 4 places were taken"
        );
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        w.close(Duration::from_secs(5));
        assert_eq!(
            w.stats(),
            WriterStats {
                written: 5,
                dropped: 996,
                errors: 0
            }
        );
    }
}
