//! Packet access and the header constants every module needs: bounds-checked pointers into the
//! packet (the verifier accepts a packet access only after a comparison against `data_end`),
//! and the Internet checksum.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// Ethernet header length (no VLAN tags: those frames are not parsed).
pub const ETH_LEN: usize = 14;
/// IPv4 header without options.
pub const IPV4_LEN: usize = 20;
/// IPv6 fixed header.
pub const IPV6_LEN: usize = 40;
/// EtherType IPv4 as it appears in the header (network order read natively).
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// EtherType IPv6, likewise.
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// `AF_INET` for `bpf_fib_lookup`.
pub const AF_INET: u8 = 2;
/// `AF_INET6` for `bpf_fib_lookup`.
pub const AF_INET6: u8 = 10;
/// More-fragments flag and fragment offset, in network order within the 16-bit field.
pub const IP_MF_OFFSET_MASK_BE: u16 = 0x3fffu16.to_be();
/// Don't-fragment flag, in network order within the 16-bit field.
pub const IP_DF_BE: u16 = 0x4000u16.to_be();
/// TTL / hop limit of every header the programs write.
pub const OUTER_TTL: u8 = 64;

/// Zeroes `slot` in place with aligned 32-bit stores and returns it, initialised.
///
/// The one way the programs zero a struct. Neither `core::mem::zeroed()` nor a struct literal
/// with an odd-sized padding field (`family: u8, _pad: [u8; 3]`) is safe in BPF: LLVM's BPF
/// backend turns a large zeroing, three zero bytes at an unaligned address, or a copy of a
/// value it knows to be zero into a call to `memset`, a byte-by-byte loop run as a subprogram
/// (the 64-byte `bpf_fib_lookup` block once cost every packet ~320 instructions so). The stores
/// are volatile so that LLVM cannot merge them back into such a call, and the value is used in
/// place, never copied out of a zeroed temporary. Assign the other fields afterwards. (The
/// `no_bpf_program_calls_an_out_of_line_memory_builtin` test in lb-userspace checks the built
/// object.)
///
/// # Safety
/// All-zero bytes must be a valid `T` (plain integers, arrays and unions of them).
#[inline(always)]
pub unsafe fn zero<T>(slot: &mut core::mem::MaybeUninit<T>) -> &mut T {
    const { assert!(size_of::<T>().is_multiple_of(4) && core::mem::align_of::<T>() >= 4) };
    let words = slot.as_mut_ptr().cast::<u32>();
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: within `slot`, 4-aligned (asserted above).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte written; the caller guarantees all-zero is a valid `T`.
    unsafe { slot.assume_init_mut() }
}

/// Returns a pointer to a `T` at `offset` bytes into the packet, if the packet is long enough.
///
/// The explicit comparison against `data_end` is what the verifier needs to accept the
/// subsequent access; `offset` must have a known upper bound where it is variable.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// `x`, through a volatile read: LLVM can no longer relate it to anything it knew about `x`.
///
/// Verifier constraint: a check like `off + 20 <= end` (the end of the IP packet), where `end`
/// was earlier compared with the frame length, lets LLVM prove a later `ptr_at` bounds check
/// redundant and delete it; but the verifier only trusts comparisons of packet pointers with
/// `data_end`, so the access is then rejected ("invalid access to packet"). Laundering `end`
/// keeps every `ptr_at` check in the program.
#[inline(always)]
pub fn opaque(x: usize) -> usize {
    // SAFETY: a read of a local variable.
    unsafe { core::ptr::read_volatile(&x) }
}

/// Length of the frame.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// Adds the 16-bit big-endian words of `b` (`N` even) to a one's-complement running sum
/// (RFC 1071), without folding.
#[inline(always)]
pub fn csum_add<const N: usize>(mut sum: u32, b: &[u8; N]) -> u32 {
    let mut i = 0;
    // Bounded loop: N is a constant.
    while i + 1 < N {
        sum += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Folds a running sum and complements it: the checksum field's value (RFC 1071).
#[inline(always)]
pub fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Adds, for each 16-bit big-endian word of `old` and `new` (`N` even), `~old + new` to a
/// running sum: the difference term of an incremental checksum update (RFC 1624 eqn. 3,
/// `HC' = ~(~HC + ~m + m')`), for any number of changed words.
#[inline(always)]
pub fn csum_diff<const N: usize>(mut sum: u32, old: &[u8; N], new: &[u8; N]) -> u32 {
    let mut i = 0;
    // Bounded loop: N is a constant.
    while i + 1 < N {
        sum += (!u16::from_be_bytes([old[i], old[i + 1]])) as u32;
        sum += u16::from_be_bytes([new[i], new[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// The checksum field `check` after words changed by `diff` ([`csum_diff`]): RFC 1624 eqn. 3,
/// which (unlike RFC 1141's `HC + m + ~m'`) never yields 0x0000 where 0xffff is right
/// (RFC 1624 §3).
#[inline(always)]
pub fn csum_replace(check: u16, diff: u32) -> u16 {
    csum_fold((!check) as u32 + diff)
}

/// One's-complement checksum (RFC 1071) of `N` bytes, `N` even.
#[inline(always)]
pub fn checksum_bytes<const N: usize>(b: &[u8; N]) -> u16 {
    csum_fold(csum_add(0, b))
}

/// The two 16-bit words, in memory order, of a header-order 32-bit word (an IPv4 address as
/// the maps store it): what a 16-bit store at its offset writes.
#[inline(always)]
pub fn halves(w: u32) -> [u16; 2] {
    let b = w.to_ne_bytes();
    [
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    ]
}

/// Writes the 16 address bytes of `a` (header-order words, as the maps hold them) to the
/// packet at `p` with 16-bit stores, each word loaded just before its two stores (volatile
/// stores keep that order: the words all loaded first did not fit the registers).
///
/// # Safety
/// As [`store_words`], for 8 words at `p`.
#[inline(always)]
pub unsafe fn store_addr_halves(p: *mut u16, a: &[u32; 4]) {
    let mut i = 0;
    // Bounded loop: 4 words.
    while i < 4 {
        let [lo, hi] = halves(a[i]);
        // SAFETY: within the 8 words the caller guarantees.
        unsafe {
            core::ptr::write_volatile(p.add(2 * i), lo);
            core::ptr::write_volatile(p.add(2 * i + 1), hi);
        }
        i += 1;
    }
}

/// One's-complement sum (RFC 1071) of 16-bit words held in memory order, without folding.
/// RFC 1071 §2(B): the sum of byte-swapped words is the byte-swapped sum, so a checksum
/// computed over memory-order words and stored as one is correct whatever the host's byte
/// order; no swap per word.
#[inline(always)]
pub fn csum_words<const N: usize>(mut sum: u32, w: &[u16; N]) -> u32 {
    let mut i = 0;
    // Bounded loop: N is a constant.
    while i < N {
        sum += w[i] as u32;
        i += 1;
    }
    sum
}

/// Writes `w` to the packet at `p` with 16-bit stores, `w[0]` first.
///
/// Why 16-bit stores: a byte array written to the packet compiles to one byte store per byte
/// (LLVM's BPF backend never emits a misaligned wider store, and a packet pointer's type says
/// nothing about its alignment); 16 bits is the alignment every header field here has, and
/// the one the programs already assume of frames (`EthHdr::ether_type`, the port pair).
///
/// # Safety
/// `p` must be 2-aligned with `2 * N` writable packet bytes behind it (bounds checked by
/// [`ptr_at`]), and no reference into them may be live.
#[inline(always)]
pub unsafe fn store_words<const N: usize>(p: *mut [u16; N], w: &[u16; N]) {
    let p = p.cast::<u16>();
    let mut i = 0;
    // Bounded loop: N is a constant.
    while i < N {
        // SAFETY: within the `N` words the caller guarantees.
        unsafe { p.add(i).write(w[i]) };
        i += 1;
    }
}

/// The Ethernet header addressed from `smac` to `dmac` (MACs as memory-order 16-bit words)
/// with `ether_type` (network order read natively), as seven memory-order 16-bit words for
/// [`store_words`].
#[inline(always)]
pub fn eth_words(dmac: &[u16; 3], smac: &[u16; 3], ether_type: u16) -> [u16; 7] {
    [
        dmac[0], dmac[1], dmac[2], smac[0], smac[1], smac[2], ether_type,
    ]
}

/// The four words of an address in a map value (a backend's), loaded one by one. Copied as a
/// whole out of a map value into another (or into a stack block), the 16 bytes became a call
/// to `memmove`, a byte loop (see [`zero`]); volatile loads keep them four word loads.
#[inline(always)]
pub fn load_addr(a: &[u32; 4]) -> [u32; 4] {
    let p = a.as_ptr();
    // SAFETY: four reads within `a`.
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

/// The 16 bytes of an address stored as four header-order words.
#[inline(always)]
pub fn words_to_bytes(w: &[u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&w[0].to_ne_bytes());
    b[4..8].copy_from_slice(&w[1].to_ne_bytes());
    b[8..12].copy_from_slice(&w[2].to_ne_bytes());
    b[12..16].copy_from_slice(&w[3].to_ne_bytes());
    b
}

/// The header-order 32-bit word whose first two bytes (in memory) are `lo`'s and last two
/// `hi`'s: one shift and one or. Composing it from the four bytes instead
/// (`u32::from_ne_bytes` of both halves' `to_ne_bytes`) made LLVM keep the bytes apart: ten
/// instructions a word, and register spills, where this takes four.
#[inline(always)]
pub fn pair(lo: u16, hi: u16) -> u32 {
    if cfg!(target_endian = "little") {
        lo as u32 | (hi as u32) << 16
    } else {
        (lo as u32) << 16 | hi as u32
    }
}

/// Stores the four header-order words of the 16 address bytes starting at `w[at]` (16-bit
/// words in memory order, read from a 2-aligned header: see [`store_words`]) into each of
/// `dst` (one place, or two: a flow key's address and its VIP key's): eight 16-bit loads
/// instead of [`bytes_to_words`]'s sixteen byte loads and their shifts, each word stored as
/// soon as it is composed, into every place (volatile stores: returned as one value, the eight
/// words of an IPv6 key's addresses were all composed, and spilled, before any was stored;
/// stop 22's `halves_to_words` did that; a copy of a stored address would load it back).
///
/// # Safety
/// Every `dst` must be valid for writes and 4-aligned.
#[inline(always)]
pub unsafe fn store_addr<const N: usize, const M: usize>(
    dst: [*mut [u32; 4]; M],
    w: &[u16; N],
    at: usize,
) {
    let mut i = 0;
    while i < 4 {
        let x = pair(w[at + 2 * i], w[at + 2 * i + 1]);
        let mut j = 0;
        // Bounded loops: 4 and M are constants.
        while j < M {
            // SAFETY: within `dst[j]`, as the caller guarantees.
            unsafe { core::ptr::write_volatile(dst[j].cast::<u32>().add(i), x) };
            j += 1;
        }
        i += 1;
    }
}

/// Four header-order words of 16 address bytes starting at `b[at]`.
#[inline(always)]
pub fn bytes_to_words<const N: usize>(b: &[u8; N], at: usize) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([b[at + i], b[at + i + 1], b[at + i + 2], b[at + i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Stores an IPv4 address (a header-order word) as a key's four words, `a` first and three
/// zero words behind it, with volatile stores: plain zero words next to each other become a
/// call to `memset` (see [`zero`]). The last two zero words are one 64-bit store: three
/// instructions less per IPv4 packet (three addresses; BENCHMARKS.md, "XDP hit: counted down
/// further (stop 38)").
///
/// # Safety
/// `dst` must be valid for writes and 4-aligned, and `dst + 8` 8-aligned (the verifier
/// rejects a misaligned stack access; [`Packet`](crate::parse::Packet) asserts its offsets).
#[inline(always)]
pub unsafe fn store_addr4(dst: *mut [u32; 4], a: u32) {
    let d = dst.cast::<u32>();
    // SAFETY: within `dst`, and `d + 2` 8-aligned, as the caller guarantees.
    unsafe {
        core::ptr::write_volatile(d, a);
        core::ptr::write_volatile(d.add(1), 0);
        core::ptr::write_volatile(d.add(2).cast::<u64>(), 0);
    }
}
