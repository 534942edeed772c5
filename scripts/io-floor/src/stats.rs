//! Counters printed on SIGTERM/SIGINT (to stderr), so a run shows what the forwarder did.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub static RESPONSES: AtomicU64 = AtomicU64::new(0);
pub static SHORT_WRITES: AtomicU64 = AtomicU64::new(0);
/// Sends that failed (e.g. EPIPE / ECONNRESET when wrk closes its connections at the end).
pub static FAILED_WRITES: AtomicU64 = AtomicU64::new(0);
pub static BAD: AtomicU64 = AtomicU64::new(0);
pub static PAIRS_OPENED: AtomicU64 = AtomicU64::new(0);
pub static PAIRS_CLOSED: AtomicU64 = AtomicU64::new(0);
pub static ENOBUFS: AtomicU64 = AtomicU64::new(0);

/// Blocks SIGTERM and SIGINT in the calling thread (call first: threads inherit the mask) and
/// starts a thread that waits for either, prints the counters and exits.
pub fn install() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            eprintln!(
                "io-floor: responses {} short_writes {} failed_writes {} bad {} pairs_opened {} pairs_closed {} enobufs {}",
                RESPONSES.load(Relaxed),
                SHORT_WRITES.load(Relaxed),
                FAILED_WRITES.load(Relaxed),
                BAD.load(Relaxed),
                PAIRS_OPENED.load(Relaxed),
                PAIRS_CLOSED.load(Relaxed),
                ENOBUFS.load(Relaxed)
            );
            libc::_exit(0);
        });
    }
}

static BURN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn spin(n: u64) {
    let mut x = 1u64;
    for i in 0..n {
        // black_box per step: one dependent multiply-add each, not reassociated by LLVM
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
    }
}

/// Iterations of `spin` for `IOFLOOR_BURN_NS` nanoseconds, calibrated once (the fastest of 20
/// timed runs of 20,000 iterations, so a preemption during calibration does not count).
fn iterations() -> u64 {
    let ns: f64 = std::env::var("IOFLOOR_BURN_NS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if ns <= 0.0 {
        return 0;
    }
    let best = (0..20)
        .map(|_| {
            let t = std::time::Instant::now();
            spin(20_000);
            t.elapsed().as_nanos() as f64
        })
        .fold(f64::MAX, f64::min);
    let n = (ns * 20_000.0 / best) as u64;
    eprintln!("io-floor: IOFLOOR_BURN_NS={ns}: {n} iterations per request");
    n
}

/// User time added per request (`IOFLOOR_BURN_NS`, unset or 0: none), so a model's system time
/// can be seen at a proxy's user time (lb spends 6–9 µs per HTTP/1.1 request in user space,
/// this tool's own framing under 2 µs).
#[inline(never)]
pub fn burn() {
    spin(*BURN.get_or_init(iterations));
}
