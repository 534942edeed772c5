//! The global allocator: mimalloc, with each thread's last freed small blocks handed out again
//! first, most recently freed first.
//!
//! Why: mimalloc hands a page's freed blocks out again only once the page's free list runs
//! out (its `local_free` list), so an object a request allocates and frees lands in a
//! different block on each request and rotates through the whole page: its lines were last
//! touched many requests ago and miss the L1 data cache. Here the block the previous request
//! freed is the next one given out for the same size class (as glibc's and jemalloc's
//! per-thread caches do).
use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ptr;

use mimalloc::MiMalloc;

/// Size classes are multiples of this; it is also the alignment every kept block has.
const GRAIN: usize = 16;
/// Size classes kept: 16, 32, … 512 bytes.
const CLASSES: usize = 32;
/// Blocks kept per class and thread: one 64-byte line per class (`len` and the slots), at most
/// 7 × (16 + 32 + … + 512) bytes = 58 KiB per thread, freed when the thread ends.
const DEPTH: usize = 7;

/// mimalloc behind a per-thread LIFO of freed blocks of up to 512 bytes.
pub struct Lifo;

#[repr(C, align(64))]
struct Class {
    len: usize,
    slots: [*mut u8; DEPTH],
}

struct Kept([Class; CLASSES]);

impl Drop for Kept {
    fn drop(&mut self) {
        for (at, class) in self.0.iter_mut().enumerate() {
            for &block in &class.slots[..class.len] {
                // SAFETY: every kept block was allocated by mimalloc with its class's layout
                // and is used by nothing.
                unsafe { MiMalloc.dealloc(block, class_layout(at)) };
            }
            class.len = 0;
        }
    }
}

thread_local! {
    static KEPT: UnsafeCell<Kept> = const {
        UnsafeCell::new(Kept(
            [const { Class { len: 0, slots: [ptr::null_mut(); DEPTH] } }; CLASSES],
        ))
    };
}

/// The class of `layout`, if blocks of its size and alignment are kept.
fn class_of(layout: Layout) -> Option<usize> {
    (layout.size() <= CLASSES * GRAIN && layout.align() <= GRAIN && layout.size() > 0)
        .then(|| (layout.size() - 1) / GRAIN)
}

/// The layout every block of class `at` is allocated with.
fn class_layout(at: usize) -> Layout {
    // GRAIN is a power of two and the size a multiple of it, far below isize::MAX.
    Layout::from_size_align((at + 1) * GRAIN, GRAIN).expect("a valid class layout")
}

/// The block of class `at` freed last on this thread, if one is kept.
fn pop(at: usize) -> Option<*mut u8> {
    KEPT.try_with(|kept| {
        // SAFETY: the only references to this thread's `Kept` are made here and in `push`,
        // neither of which calls anything that could re-enter the allocator while it holds
        // one, so this one is unique.
        let class = unsafe { &mut (*kept.get()).0[at] };
        class.len = class.len.checked_sub(1)?;
        Some(class.slots[class.len])
    })
    .ok()
    .flatten()
}

/// Keeps `block` of class `at`; false if the class is full (or the thread is ending).
fn push(at: usize, block: *mut u8) -> bool {
    KEPT.try_with(|kept| {
        // SAFETY: as in `pop`.
        let class = unsafe { &mut (*kept.get()).0[at] };
        if class.len == DEPTH {
            return false;
        }
        class.slots[class.len] = block;
        class.len += 1;
        true
    })
    .unwrap_or(false)
}

// SAFETY: every block handed out is a live mimalloc block of at least the requested size and
// alignment (a kept class's blocks are `class_layout`'s, which covers every layout of the
// class), given to one owner at a time: a block is in a thread's `Kept` only between its
// `dealloc` and the next `alloc` that pops it, and what is not kept goes to mimalloc with the
// layout it was allocated with.
unsafe impl GlobalAlloc for Lifo {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(at) => match pop(at) {
                Some(block) => block,
                // SAFETY: a valid layout of non-zero size.
                None => unsafe { MiMalloc.alloc(class_layout(at)) },
            },
            // SAFETY: as the caller promised.
            None => unsafe { MiMalloc.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(at) => match pop(at) {
                Some(block) => {
                    // SAFETY: the block has room for `layout.size()` bytes and nobody else uses it.
                    unsafe { ptr::write_bytes(block, 0, layout.size()) };
                    block
                }
                // SAFETY: a valid layout of non-zero size.
                None => unsafe { MiMalloc.alloc_zeroed(class_layout(at)) },
            },
            // SAFETY: as the caller promised.
            None => unsafe { MiMalloc.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(layout) {
            Some(at) => {
                if !push(at, ptr) {
                    // SAFETY: the block was allocated by mimalloc with its class's layout.
                    unsafe { MiMalloc.dealloc(ptr, class_layout(at)) };
                }
            }
            // SAFETY: as the caller promised.
            None => unsafe { MiMalloc.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller promises a size that, rounded to the alignment, fits an isize.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(layout), class_of(new)) {
            (None, None) => unsafe { MiMalloc.realloc(ptr, layout, new_size) },
            (Some(old), Some(to)) if old == to => ptr,
            _ => {
                // SAFETY: a valid non-zero layout (the caller's promise); the old block holds
                // `layout.size()` bytes and is released once copied.
                unsafe {
                    let moved = self.alloc(new);
                    if !moved.is_null() {
                        ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_freed_last_is_handed_out_first_for_its_size_class() {
        let small = Layout::from_size_align(40, 8).unwrap();
        let same_class = Layout::from_size_align(33, 1).unwrap();
        // SAFETY: valid layouts; each block is freed once, with its layout.
        unsafe {
            let a = Lifo.alloc(small);
            let b = Lifo.alloc(small);
            Lifo.dealloc(a, small);
            Lifo.dealloc(b, small);
            assert_eq!(Lifo.alloc(same_class), b, "not the block freed last");
            assert_eq!(Lifo.alloc(small), a);
            Lifo.dealloc(a, small);
            Lifo.dealloc(b, same_class);
        }
    }

    #[test]
    fn a_class_keeps_at_most_depth_blocks_and_big_blocks_are_not_kept() {
        let small = Layout::from_size_align(200, 16).unwrap();
        let big = Layout::from_size_align(4096, 8).unwrap();
        let at = class_of(small).unwrap();
        // SAFETY: valid layouts; each block is freed once, with its layout.
        unsafe {
            // Whatever this thread kept of the class before the test goes back to mimalloc,
            // so that the class starts empty.
            while let Some(kept) = pop(at) {
                MiMalloc.dealloc(kept, class_layout(at));
            }
            let blocks: Vec<_> = (0..DEPTH + 2).map(|_| Lifo.alloc(small)).collect();
            for &b in &blocks {
                Lifo.dealloc(b, small);
            }
            KEPT.with(|k| assert_eq!((*k.get()).0[at].len, DEPTH));
            let again: Vec<_> = (0..DEPTH).map(|_| Lifo.alloc(small)).collect();
            assert_eq!(again[0], blocks[DEPTH - 1]);
            for b in again {
                Lifo.dealloc(b, small);
            }
            let x = Lifo.alloc(big);
            Lifo.dealloc(x, big);
            KEPT.with(|k| assert_eq!((*k.get()).0[at].len, DEPTH));
        }
    }

    #[test]
    fn realloc_within_a_class_keeps_the_block_and_across_classes_keeps_the_bytes() {
        let l = Layout::from_size_align(20, 4).unwrap();
        // SAFETY: valid layouts; the block is used only through the pointer realloc returns.
        unsafe {
            let a = Lifo.alloc(l);
            ptr::write_bytes(a, 7, 20);
            assert_eq!(Lifo.realloc(a, l, 30), a);
            let b = Lifo.realloc(a, Layout::from_size_align(30, 4).unwrap(), 1000);
            assert_eq!(*b.add(19), 7);
            Lifo.dealloc(b, Layout::from_size_align(1000, 4).unwrap());
        }
    }
}
