//! Heap blocks of finished request futures, kept by each thread for its next request's future
//! of the same layout: the HTTP/2 and hyper pipeline futures (`service.rs`) and the native
//! HTTP/1 loop's handler futures (`h1.rs`, [`super::h1`]'s `Reused`).
//!
//! Why: these futures are several KiB. A fresh allocation of that size is mimalloc's slow path
//! (about 250 instructions, and 70 more to free it), and its memory was freed many requests
//! ago (mimalloc reuses a page's freed blocks only once its free list runs out), so each of its
//! cache lines misses the L1 data cache on the first write. The block given back last, by the
//! request that finished just before on this thread, is taken first: likely still in the L1.
use std::alloc::Layout;
use std::cell::RefCell;
use std::ptr::NonNull;

/// A thread's kept blocks, each with the layout it was allocated with; freed when the thread
/// ends.
pub(super) struct Spares(Vec<(NonNull<u8>, Layout)>);

/// Most blocks a thread keeps (a burst of finished requests refills the list, the next burst
/// empties it): 64 × 4.9 KB (the largest future), about 314 KB per worker thread at most,
/// whatever the number of connections. Under HTTP/2 with many concurrent streams a smaller
/// store runs dry and each stream's future takes mimalloc's slow path again (BENCHMARKS.md,
/// "HTTP/2 cycles per request (stop 28)": 16 blocks, 0.9–1.2 slow-path calls per request).
/// The 2 MB of resident memory once put on 64 blocks was one more transparent huge page
/// touched, not the blocks ("Resident memory: mimalloc's huge pages (stop 28)").
pub(super) const SPARES_MAX: usize = 64;

thread_local! {
    static SPARES: RefCell<Spares> = const { RefCell::new(Spares(Vec::new())) };
}

impl Spares {
    /// A kept block of `layout`, the one given back last first; `None` if there is none (or
    /// the thread is ending).
    pub(super) fn take(layout: Layout) -> Option<NonNull<u8>> {
        SPARES
            .try_with(|spares| {
                let mut spares = spares.try_borrow_mut().ok()?;
                let at = spares.0.iter().rposition(|&(_, kept)| kept == layout)?;
                Some(spares.0.swap_remove(at).0)
            })
            .ok()
            .flatten()
    }

    /// Keeps `ptr` (allocated with `layout`, its contents dropped), or frees it when the
    /// thread keeps [`SPARES_MAX`] already.
    ///
    /// # Safety
    /// `ptr` was allocated by the global allocator with `layout` and is used by nothing.
    pub(super) unsafe fn put(ptr: NonNull<u8>, layout: Layout) {
        let kept = SPARES
            .try_with(|spares| {
                let Ok(mut spares) = spares.try_borrow_mut() else {
                    return false;
                };
                if spares.0.len() >= SPARES_MAX {
                    return false;
                }
                spares.0.push((ptr, layout));
                true
            })
            .unwrap_or(false);
        if !kept {
            // SAFETY: as the caller promised.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }
    }

    /// Blocks this thread keeps now (tests).
    #[cfg(test)]
    pub(super) fn kept() -> usize {
        SPARES.with(|spares| spares.borrow().0.len())
    }

    /// Frees every block this thread keeps (tests that count allocations).
    #[cfg(test)]
    pub(super) fn drain() {
        drop(SPARES.with(|spares| spares.replace(Spares(Vec::new()))));
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        for (ptr, layout) in self.0.drain(..) {
            // SAFETY: every kept block was allocated with its layout and is used by nothing.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }
    }
}
