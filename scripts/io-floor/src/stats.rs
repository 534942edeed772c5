//! Counters printed on SIGTERM/SIGINT (to stderr), so a run shows what the forwarder did.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub static RESPONSES: AtomicU64 = AtomicU64::new(0);
pub static SHORT_WRITES: AtomicU64 = AtomicU64::new(0);
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
                "io-floor: responses {} short_writes {} bad {} pairs_opened {} pairs_closed {} enobufs {}",
                RESPONSES.load(Relaxed),
                SHORT_WRITES.load(Relaxed),
                BAD.load(Relaxed),
                PAIRS_OPENED.load(Relaxed),
                PAIRS_CLOSED.load(Relaxed),
                ENOBUFS.load(Relaxed)
            );
            libc::_exit(0);
        });
    }
}
