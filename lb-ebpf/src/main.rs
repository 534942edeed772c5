//! The eBPF programs of lb.
//!
//! - `lb_xdp`: the Layer 4 balancer. Drops what a VIP's guards refuse ([`guard`]: source
//!   allow/deny lists, a new-flow rate per source), steers packets for configured VIPs (IPv4
//!   and IPv6) to a backend (flow table with idle timeouts, then Maglev ring), and either
//!   encapsulates them for direct server return in an outer header of the backend's family or,
//!   for a NAT VIP, rewrites them to the target's address and port ([`nat`]; the targets'
//!   replies are translated back). Out with `XDP_TX` or `bpf_redirect`. ICMP errors about DSR
//!   flows go to the flow's backend the same way. Everything else passes untouched.
//! - `lb_decap`: runs on backends; strips the outer header of every encapsulation `lb_xdp`
//!   emits when addressed to the host, so that backends need no tunnel driver.
//! - `lb_pass`: passes everything (benchmark baseline; veth peers in the test topology).
//! - `lb_clock`: reads the kernel's clocks for the loader, which measures the flow clock's
//!   unit with it (`BPF_PROG_TEST_RUN` only, never attached).
//! - `lb_hc_encap` ([`hc_encap`], TC egress): sends marked health-check probes to their backend
//!   through the same encapsulation, so a probe tests what client traffic needs.
//! - `lb_bench_front`, `lb_bench_tx`, `lb_bench_sink` ([`bench`]): benchmark only, never
//!   loaded by `lb run`.
//!
//! One module per concern, one path for both address families: [`parse`] (headers →
//! [`parse::Packet`]), [`lookup`] (VIP, flow table, ring), [`guard`], [`encap`] (next hop, outer
//! header), [`nat`] (address translation both ways), [`nexthop`] (the per-backend next-hop cache), [`icmp`] (the "too big" answers),
//! [`decap`], with the maps in [`maps`] and packet access in [`pkt`]. Every packet increments exactly one reason counter (a forwarded packet's `tx` or `redirect`, and a NAT reply's `nat_reply`, in its backend's record, its only counter update), so nothing is dropped silently.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{FAMILY_V6, Reason, VIP_F_FAIL_OPEN, VIP_F_NAT};

mod bench;
mod decap;
mod encap;
mod guard;
mod hc_encap;
mod icmp;
mod lookup;
mod maps;
mod nat;
mod nexthop;
mod parse;
mod pkt;

use maps::{LB_CONFIG, LB_DECAP_STATS, add, count, counted_in_reasons};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match balance(&ctx) {
        Ok(action) => action,
        Err(r) => {
            count_unless_in_record(r);
            lookup::action_of(r)
        }
    }
}

/// Counts `reason` in `LB_REASONS` unless a backend's record holds it (a forwarded packet or
/// a translated reply: see [`counted_in_reasons`]).
#[inline(always)]
fn count_unless_in_record(reason: Reason) {
    if counted_in_reasons(reason) {
        count(reason);
    }
}

/// The balancer proper: the XDP action of a packet it counted, or (`Err`) the reason a packet
/// ended early, whose action [`lookup::action_of`] gives and which `lb_xdp` counts. Counted
/// here, on each way out, and not where the ways meet: a forwarded packet then skips the test
/// of a reason it is known not to need (8 BPF instructions of a hit; BENCHMARKS.md, "XDP hit:
/// counted down further (stop 38)").
#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<u32, Reason> {
    let mut slot = MaybeUninit::uninit();
    let pkt = parse::packet(ctx, &mut slot)?;
    let vip = match lookup::vip(&mut pkt.vip_key, pkt.key.proto, pkt.fragment) {
        Ok(v) => v,
        // For no VIP: perhaps a NAT target's reply.
        Err(Reason::PassNotVip) if !pkt.fragment && !pkt.icmp_error => {
            let (action, reason) = nat::reply(ctx, pkt);
            count_unless_in_record(reason);
            return Ok(action);
        }
        Err(done) => return Err(done),
    };
    let pkt: &parse::Packet = pkt;
    // Guards first: a refused source creates no state.
    guard::source(&pkt.key, &vip)?;
    let Some(cfg) = LB_CONFIG.get(0) else {
        return Err(Reason::DropInternal);
    };
    // Read in place, not copied. `lookup::backend` reads the next-hop cache's generation
    // before the backend's entry (`Steer::generation`).
    let now = lookup::coarse_now(cfg);
    let nat = vip.flags & VIP_F_NAT != 0;
    // An opening SYN of a DSR VIP is steered by the ring and inserted without a lookup first
    // (NAT flows also keep a reverse entry, written with the forward one in `forward_nat`).
    let open = !nat && pkt.opens();
    let steer = lookup::backend(&pkt.key, &vip, cfg, now, !pkt.icmp_error, open)?;
    // An ICMP error uses its flow's backend but is no flow of its own.
    let new_flow = steer.new_flow && !pkt.icmp_error;
    if new_flow && let Err(done) = guard::new_flow(&pkt.key, &vip) {
        lookup::unrecord(&pkt.key, &steer);
        return Err(done);
    }
    let action = if nat {
        forward_nat(ctx, pkt, &vip, &steer, new_flow, cfg, now)?
    } else {
        let mut block = encap::FibBlock::uninit();
        let route = match encap::route(ctx, pkt, &steer, cfg, now, &mut block) {
            Ok(r) => r,
            Err(done) => {
                lookup::unrecord(&pkt.key, &steer);
                return Err(done);
            }
        };
        if new_flow {
            lookup::record(&pkt.key, &steer, &vip, now);
        }
        let flow_label = if steer.backend.family == FAMILY_V6 {
            lookup::flow_label(&pkt.key)
        } else {
            0
        };
        let a = encap::push(ctx, pkt, &route, steer.backend, cfg, flow_label)?;
        let reason = if a == xdp_action::XDP_TX {
            Reason::Tx
        } else {
            Reason::Redirect
        };
        (a, reason)
    };

    let action = if pkt.icmp_error {
        (action.0, Reason::IcmpToBackend)
    } else {
        action
    };
    // One counter record per forwarded packet: the VIP's figures and the reasons `tx` and
    // `redirect` are derived from the backends' records by userspace.
    let fail_open = vip.flags & VIP_F_FAIL_OPEN != 0;
    add(steer.id, pkt.ip_len as u64, new_flow, fail_open, action.1);
    count_unless_in_record(action.1);
    Ok(action.0)
}

/// NAT mode: the packet rewritten to its target and sent on (see [`nat`]). The flow (and its
/// reverse entry) is recorded once the next hop is known, so a dropped packet leaves none.
#[inline(always)]
fn forward_nat(
    ctx: &XdpContext,
    pkt: &parse::Packet,
    vip: &lb_common::VipMeta,
    steer: &lookup::Steer,
    new_flow: bool,
    cfg: &lb_common::LbConfig,
    now: u64,
) -> Result<(u32, Reason), Reason> {
    if pkt.icmp_error {
        return Err(Reason::DropNatIcmp);
    }
    let backend = steer.backend;
    if backend.family != pkt.key.family {
        // Userspace never pairs a NAT VIP with a target of the other family.
        return Err(Reason::DropInternal);
    }
    if pkt.ttl <= 1 {
        return Err(Reason::PassTtlExceeded);
    }
    let port = nat::target_port(backend, &pkt.key);
    let mut block = encap::FibBlock::uninit();
    let next = nat::to_target(ctx, pkt, steer, port, cfg, now, &mut block)?;
    if new_flow {
        lookup::record(&pkt.key, steer, vip, now);
    }
    nat::remember(
        &pkt.key,
        backend,
        steer.id,
        port,
        vip.idle_timeout_ns,
        new_flow,
        steer.ticked,
    );
    let done = nat::forward(ctx, pkt, &backend.addr, port, &next);
    match done.1 {
        Reason::Tx | Reason::Redirect | Reason::NatViaKernel => Ok(done),
        _ => Err(done.1),
    }
}

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let reason = decap::decap(&ctx);
    if let Some(c) = LB_DECAP_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_PASS
}

/// Writes the coarse clock, `jiffies_64` and the coarse clock again at the start of the packet
/// (three native `u64`) and passes it: run by the loader with `BPF_PROG_TEST_RUN` to measure
/// the flow clock's unit and offset (`LbConfig::tick_ns`), never attached.
#[xdp]
pub fn lb_clock(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 24 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: no preconditions.
    let (before, jiffies, after) = unsafe {
        let before = aya_ebpf::helpers::bpf_ktime_get_coarse_ns();
        let jiffies = aya_ebpf::helpers::bpf_jiffies64();
        (
            before,
            jiffies,
            aya_ebpf::helpers::bpf_ktime_get_coarse_ns(),
        )
    };
    let p = start as *mut u64;
    // SAFETY: 24 bytes checked above; unaligned stores, as packet data need not be aligned.
    unsafe {
        p.write_unaligned(before);
        p.add(1).write_unaligned(jiffies);
        p.add(2).write_unaligned(after);
    }
    xdp_action::XDP_PASS
}

#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
