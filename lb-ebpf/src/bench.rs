//! Benchmark-only programs and maps (`cargo xtask bench xdp`). `lb run` never loads or
//! attaches these programs; their maps are created with the object but stay empty.
//!
//! `BPF_PROG_TEST_RUN` in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`) runs a program on
//! frames from a page pool that it recycles without restoring their contents, so a program
//! that rewrites its packet (every encapsulating path of `lb_xdp`) would meet its own output
//! from the second use of a page on. [`lb_bench_front`] therefore writes the intended frame
//! from a template before every repeat, optionally with a fresh client (address and port) per
//! repeat or one of a fixed set of flows, and tail-calls the program measured. Every row of the
//! benchmark, the floors included, runs behind it, so its cost cancels out of the differences.
//!
//! `cargo xtask bench l4` also uses it as a packet generator: the front tail-calls the
//! `XDP_TX` floor, so every repeat is transmitted to the veth peer, where the balancer under
//! test receives it.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, PerCpuArray, ProgramArray},
    helpers::bpf_xdp_store_bytes,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{BENCH_FRAME_MAX, BENCH_VARY_FLOWS, BENCH_VARY_NONE, BenchCounter, BenchTemplate};
use network_types::eth::EthHdr;

use crate::pkt::{frame_len, opaque, ptr_at};

const COUNTERS: usize = BenchCounter::COUNT as usize;

#[btf_map]
static LB_BENCH_TEMPLATE: Array<BenchTemplate, 1> = Array::new();
#[btf_map]
static LB_BENCH_PROGS: ProgramArray<1> = ProgramArray::new();
#[btf_map]
static LB_BENCH_STATS: PerCpuArray<u64, COUNTERS> = PerCpuArray::new();

/// Increments a counter; returns its value before.
#[inline(always)]
fn bump(c: BenchCounter) -> u64 {
    match LB_BENCH_STATS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot; nothing else runs on this CPU meanwhile.
        Some(p) => unsafe {
            let v = *p;
            *p = v + 1;
            v
        },
        None => 0,
    }
}

/// Benchmark only: restores the intended frame (see the module doc), then tail-calls
/// `LB_BENCH_PROGS[0]`. Returns `XDP_ABORTED` (and counts why) if it cannot.
#[xdp]
pub fn lb_bench_front(ctx: XdpContext) -> u32 {
    let seq = bump(BenchCounter::Runs);
    let Some(t) = LB_BENCH_TEMPLATE.get_ptr_mut(0) else {
        bump(BenchCounter::TemplateFailed);
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a pointer to the map value, valid for this run.
    let (len, vary, addr_off, port_off, port_base, port_mask) = unsafe {
        (
            (*t).len,
            (*t).vary,
            (*t).vary_addr_off,
            (*t).vary_port_off,
            (*t).vary_port_base,
            (*t).vary_port_mask,
        )
    };
    // Verifier constraint: the helper's length must be provably within 1..=BENCH_FRAME_MAX;
    // `opaque` keeps LLVM from folding the two checks into one on a derived register.
    let len = opaque(len as usize);
    if len == 0 || len > BENCH_FRAME_MAX || len != frame_len(&ctx) {
        bump(BenchCounter::TemplateFailed);
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the context is the kernel's; the buffer is the map value, `len` bytes of it.
    let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, (*t).frame.as_mut_ptr().cast(), len as u32) };
    if rc != 0 {
        bump(BenchCounter::TemplateFailed);
        return xdp_action::XDP_ABORTED;
    }
    if vary == BENCH_VARY_FLOWS {
        // Masked: a variable packet offset needs a known bound.
        let Some(p) = ptr_at::<[u8; 2]>(&ctx, port_off as usize & 0x7f) else {
            bump(BenchCounter::TemplateFailed);
            return xdp_action::XDP_ABORTED;
        };
        let port = port_base.wrapping_add(seq as u32 & port_mask) as u16;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *p = port.to_be_bytes() };
    } else if vary != BENCH_VARY_NONE {
        // Masked: a variable packet offset needs a known bound.
        let (Some(a), Some(p)) = (
            ptr_at::<[u8; 4]>(&ctx, addr_off as usize & 0x7f),
            ptr_at::<[u8; 2]>(&ctx, port_off as usize & 0x7f),
        ) else {
            bump(BenchCounter::TemplateFailed);
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let word = u32::from_be_bytes(*a).wrapping_add((seq >> 16) as u32);
            *a = word.to_be_bytes();
            *p = (seq as u16).to_be_bytes();
        }
    }
    // SAFETY: a tail call; on success it does not return.
    unsafe { LB_BENCH_PROGS.tail_call(&ctx, 0) };
    bump(BenchCounter::TailCallFailed);
    xdp_action::XDP_ABORTED
}

/// Benchmark only: the `XDP_TX` floor. Swaps the Ethernet addresses and sends the frame back
/// out: the least a program that transmits can do.
#[xdp]
pub fn lb_bench_tx(ctx: XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let (dst, src) = ((*eth).dst_addr, (*eth).src_addr);
        (*eth).dst_addr = src;
        (*eth).src_addr = dst;
    }
    xdp_action::XDP_TX
}

/// Benchmark only: on the veth peer, counts and drops the frames the benchmark transmits.
#[xdp]
pub fn lb_bench_sink(_ctx: XdpContext) -> u32 {
    bump(BenchCounter::SinkReceived);
    xdp_action::XDP_DROP
}
