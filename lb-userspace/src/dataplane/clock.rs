//! The flow clock's unit and offset: how `lb_xdp` turns `bpf_jiffies64()` into the
//! CLOCK_MONOTONIC nanoseconds its flow entries hold (`LbConfig::tick_ns`,
//! `LbConfig::clock_offset_ns`).
//!
//! `bpf_jiffies64` is inlined by the verifier (a load of `jiffies_64`), where
//! `bpf_ktime_get_coarse_ns` is a helper call; both move once a timer tick. The kernel advances
//! `jiffies_64` by one per `TICK_NSEC` of CLOCK_MONOTONIC (`tick_do_update_jiffies64`) and
//! updates the coarse clock right after, so `coarse ≈ jiffies * TICK_NSEC + offset` with a
//! constant offset. Neither `CONFIG_HZ` nor the offset is visible to userspace directly, so the
//! loader measures both with the object's `lb_clock` program (run with `BPF_PROG_TEST_RUN`; it
//! reads the coarse clock, the jiffies and the coarse clock again every 2 ms for 150 ms, on to
//! 250 ms when that does not settle it): the tick from the median ticks at both ends of the
//! span, snapped to a `CONFIG_HZ` the kernel offers, the offset from the least-delayed
//! tick among the samples (outliers a tick off left out). Measured once per process.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use aya::Ebpf;
use lb_common::names;

use super::{DataplaneError, Result, run_once};

/// `CONFIG_HZ` values Linux offers (x86 and arm64: 100, 250, 300, 1000), every two at least
/// 15 % apart. 256, 512 and 1024 (old architectures without XDP) are left out: they are within
/// 2.5 % of 250, 500 and 1000, closer than a short measurement on a loaded machine can tell
/// apart for certain, and a wrong unit makes every flow's age drift (2.4 % is 86 s an hour).
const HZ_CHOICES: [u64; 12] = [24, 32, 48, 64, 100, 128, 200, 250, 300, 500, 1000, 1200];

/// How long the loader samples before its first fit: 37 ticks at HZ=250, 15 at HZ=100.
const FIRST_SPAN: Duration = Duration::from_millis(150);
/// How long it goes on sampling (keeping the first samples) when the first fit is undecided:
/// the longest start-up delay the measurement may add.
const LONGEST_SPAN: Duration = Duration::from_millis(250);
/// Time between samples: each tick seen about twice at HZ=250, so the ends hold many ticks
/// to find an undelayed one among.
const STEP: Duration = Duration::from_millis(2);
/// The measured tick may differ from the snapped one by this fraction at most (the choices
/// are at least 15 % apart, so the nearest one is unambiguous).
const TOLERANCE: f64 = 0.07;

/// One reading of `lb_clock`: coarse clock, jiffies, coarse clock again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// `bpf_ktime_get_coarse_ns()` before the jiffies.
    pub before: u64,
    /// `bpf_jiffies64()`.
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns()` after.
    pub after: u64,
}

/// How `lb_xdp` reads time: `jiffies * tick_ns + offset_ns` (wrapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowClock {
    /// `CONFIG_HZ`.
    pub hz: u64,
    /// Nanoseconds per jiffy (the kernel's `TICK_NSEC`).
    pub tick_ns: u64,
    /// CLOCK_MONOTONIC at jiffy 0, modulo 2^64.
    pub offset_ns: u64,
}

impl FlowClock {
    /// The time `lb_xdp` reads at `jiffies`.
    pub fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_add(self.offset_ns)
    }
}

/// Why samples fit no flow clock, with what they showed (the loader's error says it).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Unfit {
    /// Fewer than two samples read the coarse clock the same before and after the jiffies.
    #[error(
        "{usable} of {total} samples usable (the others saw a tick between their two \
         coarse-clock reads)"
    )]
    TooFew {
        /// Samples without a tick between their coarse reads.
        usable: usize,
        /// All samples.
        total: usize,
    },
    /// The jiffies or the coarse clock went backwards from one usable sample to the next.
    #[error("sample {index} reads earlier than the one before it (jiffies or coarse clock)")]
    Backwards {
        /// Its position among the usable samples.
        index: usize,
    },
    /// The usable samples span too few jiffies, or no coarse time, to measure a tick.
    #[error(
        "the {usable} usable samples span {ticks} jiffies and {span_ns} ns of the coarse \
         clock: too short to measure a tick"
    )]
    TooShort {
        /// Usable samples.
        usable: usize,
        /// Jiffies from the first to the last.
        ticks: u64,
        /// Coarse-clock nanoseconds from the first to the last.
        span_ns: u64,
    },
    /// The measured tick is further than [`TOLERANCE`] from every `CONFIG_HZ`'s.
    #[error(
        "{usable} of {total} samples over {ticks} jiffies ({span_ms:.1} ms of the coarse \
         clock) give {measured_ns:.0} ns per jiffy between the median ticks at both ends \
         ({first_to_last_ns:.0} from the first to the last sample), {off_percent:.1} % \
         from the nearest CONFIG_HZ's tick (HZ={nearest_hz}: {nearest_tick_ns} ns); at most \
         {tolerance_percent:.0} % expected"
    )]
    NoHz {
        /// Usable samples.
        usable: usize,
        /// All samples.
        total: usize,
        /// Jiffies from the first usable sample to the last.
        ticks: u64,
        /// Coarse-clock milliseconds from the first usable sample to the last.
        span_ms: f64,
        /// The tick measured between the median ticks at both ends.
        measured_ns: f64,
        /// The first sample to the last, for comparison.
        first_to_last_ns: f64,
        /// The nearest `CONFIG_HZ`.
        nearest_hz: u64,
        /// Its tick.
        nearest_tick_ns: u64,
        /// How far the measured tick is from it, in percent.
        off_percent: f64,
        /// [`TOLERANCE`] in percent.
        tolerance_percent: f64,
    },
}

/// The kernel's `TICK_NSEC` for `hz`.
pub fn tick_nsec(hz: u64) -> u64 {
    (1_000_000_000 + hz / 2) / hz
}

/// The nanoseconds per jiffy that `good` (usable samples in time order, the jiffies moving by
/// `ticks` ≥ 2 from the first to the last) show between the typical ticks at both ends.
///
/// Each sample's offset, its coarse time less its jiffies times the tick, is the same for
/// nearly all samples (on this machine's kernel, 6.18 at HZ=250, within nanoseconds), but a
/// few can stand out by whole ticks: one that ran between the tick handler's jiffies update
/// and its coarse-clock update (a window a loaded VM can stretch, when the host preempts the
/// vCPU in it) reads the new jiffies with the old coarse time, a tick early or several; on
/// kernels whose coarse clock is the tick handler's own time, a late handler makes a sample
/// late by up to a tick. From the first sample to the last, one such end moves the measured
/// tick by a tick over the span (10 % over 100 ms at HZ=100). So the tick is the slope
/// between the median sample of the head (jiffies in the first quarter of the span) and that
/// of the tail (the last quarter): a minority of samples at either end, early or late by any
/// amount, cannot move it.
fn ends_tick(good: &[Sample], ticks: u64) -> f64 {
    let (j0, c0) = (good[0].jiffies, good[0].after);
    let points: Vec<(f64, f64)> = good
        .iter()
        .map(|s| ((s.jiffies - j0) as f64, (s.after - c0) as f64))
        .collect();
    let quarter = (ticks / 4) as f64;
    let last = ticks as f64;
    let head: Vec<usize> = (0..points.len())
        .filter(|&i| points[i].0 <= quarter)
        .collect();
    let tail: Vec<usize> = (0..points.len())
        .filter(|&i| points[i].0 >= last - quarter)
        .collect();
    // The sample of `set` whose offset under `slope` is the median; of an even count, the
    // upper one: the disturbance seen on real kernels is early (read in the handler's
    // window), so of two samples, one of them early, the other one.
    let median = |set: &[usize], slope: f64| {
        let mut by_offset: Vec<(f64, usize)> = set
            .iter()
            .map(|&i| (points[i].1 - points[i].0 * slope, i))
            .collect();
        by_offset.sort_by(|a, b| a.0.total_cmp(&b.0));
        by_offset[by_offset.len() / 2].1
    };
    // The offsets are taken with the first-to-last slope, off by the ends' disturbance over
    // the span: across an end (a quarter of the span) that shifts them by a quarter of the
    // disturbance, which leaves the disturbed samples on their side of the others. (Picking
    // again with the slope the medians give changed no case in the tests.)
    let rough = points[points.len() - 1].1 / last;
    let (a, b) = (median(&head, rough), median(&tail, rough));
    let ((xa, ya), (xb, yb)) = (points[a], points[b]);
    // The head's jiffies are at most a quarter, the tail's at least three quarters of the
    // span (≥ 2), so xb > xa.
    (yb - ya) / (xb - xa)
}

/// The clock that fits `samples` (in time order, spanning several ticks), or what they
/// measured when it fits no `CONFIG_HZ` within [`TOLERANCE`]. Samples that saw a tick
/// between their two coarse reads are left out. The tick comes from the median ticks at
/// both ends ([`ends_tick`]), snapped to the nearest `CONFIG_HZ`.
pub fn fit(samples: &[Sample]) -> std::result::Result<FlowClock, Unfit> {
    let good: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.before == s.after)
        .collect();
    let (Some(first), Some(last)) = (good.first(), good.last()) else {
        return Err(Unfit::TooFew {
            usable: 0,
            total: samples.len(),
        });
    };
    if good.len() < 2 {
        return Err(Unfit::TooFew {
            usable: good.len(),
            total: samples.len(),
        });
    }
    if let Some(index) = (1..good.len())
        .find(|&i| good[i].jiffies < good[i - 1].jiffies || good[i].after < good[i - 1].after)
    {
        return Err(Unfit::Backwards { index });
    }
    let ticks = last.jiffies - first.jiffies;
    let span = last.after - first.after;
    if ticks < 2 || span == 0 {
        return Err(Unfit::TooShort {
            usable: good.len(),
            ticks,
            span_ns: span,
        });
    }
    let measured = ends_tick(&good, ticks);
    let hz = HZ_CHOICES
        .into_iter()
        .min_by(|a, b| {
            let da = (tick_nsec(*a) as f64 - measured).abs();
            let db = (tick_nsec(*b) as f64 - measured).abs();
            da.total_cmp(&db)
        })
        .expect("HZ_CHOICES is not empty");
    let tick_ns = tick_nsec(hz);
    let off = measured / tick_ns as f64 - 1.0;
    if !off.is_finite() || off.abs() > TOLERANCE {
        return Err(Unfit::NoHz {
            usable: good.len(),
            total: samples.len(),
            ticks,
            span_ms: span as f64 / 1e6,
            measured_ns: measured,
            first_to_last_ns: span as f64 / ticks as f64,
            nearest_hz: hz,
            nearest_tick_ns: tick_ns,
            off_percent: off * 100.0,
            tolerance_percent: TOLERANCE * 100.0,
        });
    }
    // The offset each sample implies; they differ by the tick handler's latency (and by one
    // tick for a sample that read the new jiffies before the coarse clock moved): the median.
    let base = good[0]
        .after
        .wrapping_sub(good[0].jiffies.wrapping_mul(tick_ns));
    let mut rel: Vec<i64> = good
        .iter()
        .map(|s| {
            s.after
                .wrapping_sub(s.jiffies.wrapping_mul(tick_ns))
                .wrapping_sub(base) as i64
        })
        .collect();
    rel.sort_unstable();
    let median = rel[rel.len() / 2];
    // The earliest within half a tick of the median: the least-delayed tick, so the clock
    // reads as late as the coarse clock at most (never ahead of CLOCK_MONOTONIC).
    let half = (tick_ns / 2) as i64;
    let least = rel
        .iter()
        .copied()
        .find(|r| *r >= median - half)
        .unwrap_or(median);
    let offset_ns = base.wrapping_add(least as u64);
    Ok(FlowClock {
        hz,
        tick_ns,
        offset_ns,
    })
}

/// Reads the clocks once through `lb_clock` of `ebpf` (loaded).
fn sample(ebpf: &Ebpf) -> Result<Sample> {
    let (action, out) = run_once(ebpf, names::PROG_CLOCK, &[0u8; 64], None)?;
    let word = |i: usize| {
        out.get(i * 8..i * 8 + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    match (action, word(0), word(1), word(2)) {
        (2, Some(before), Some(jiffies), Some(after)) => Ok(Sample {
            before,
            jiffies,
            after,
        }),
        _ => Err(DataplaneError::Clock(format!(
            "{} returned {action} with {} bytes",
            names::PROG_CLOCK,
            out.len()
        ))),
    }
}

/// The flow clock of this kernel, measured with `lb_clock` of `ebpf` (loaded) the first time
/// and remembered for the process (it is a property of the running kernel). Takes about
/// 150 ms the first time, 250 ms at most.
pub fn flow_clock(ebpf: &Ebpf) -> Result<FlowClock> {
    static CLOCK: OnceLock<FlowClock> = OnceLock::new();
    if let Some(c) = CLOCK.get() {
        return Ok(*c);
    }
    let start = Instant::now();
    let mut samples = vec![sample(ebpf)?];
    let mut until = FIRST_SPAN;
    loop {
        while start.elapsed() < until {
            std::thread::sleep(STEP);
            samples.push(sample(ebpf)?);
        }
        match fit(&samples) {
            Ok(c) => {
                tracing::debug!(
                    hz = c.hz,
                    tick_ns = c.tick_ns,
                    samples = samples.len(),
                    took = ?start.elapsed(),
                    "flow clock measured"
                );
                return Ok(*CLOCK.get_or_init(|| c));
            }
            // A loaded machine can delay every tick at one end: sample on, over a longer
            // span, keeping the samples so far.
            Err(_) if until < LONGEST_SPAN => until = LONGEST_SPAN,
            Err(unfit) => {
                return Err(DataplaneError::Clock(format!(
                    "lb_clock sampled for {:?}: {unfit}",
                    start.elapsed()
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples of a kernel with `hz`, jiffies starting at `j0` when CLOCK_MONOTONIC reads
    /// `t0`, each coarse read `late` ns after its tick, one sample every `every` jiffies.
    fn kernel(hz: u64, j0: u64, t0: u64, late: &[u64], every: u64) -> Vec<Sample> {
        let tick = tick_nsec(hz);
        late.iter()
            .enumerate()
            .map(|(i, l)| {
                let j = j0 + i as u64 * every;
                let c = t0 + (j - j0) * tick + l;
                Sample {
                    before: c,
                    jiffies: j,
                    after: c,
                }
            })
            .collect()
    }

    /// The tick the samples show, as `fit` measures it (before snapping).
    fn measured(s: &[Sample]) -> f64 {
        ends_tick(s, s[s.len() - 1].jiffies - s[0].jiffies)
    }

    /// How far the first-to-last tick (the estimator before this one) is from `hz`'s.
    fn first_to_last_off(s: &[Sample], hz: u64) -> f64 {
        let (a, b) = (s[0], s[s.len() - 1]);
        (b.after - a.after) as f64 / (b.jiffies - a.jiffies) as f64 / tick_nsec(hz) as f64 - 1.0
    }

    /// A deterministic stream of fractions in [0, 1) (xorshift64): the same "random" delays
    /// on every run.
    struct Delays(u64);

    impl Delays {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Where a stall of the tick handler falls in [`stalled`]'s samples.
    #[derive(Clone, Copy, Debug)]
    enum End {
        Start,
        End,
    }

    /// Samples as the loader takes them (two per tick, over about `ticks` ticks) of a kernel
    /// with `hz` whose coarse clock moves with the jiffies (as this machine's does, to the
    /// nanosecond), but whose tick handler, once, ran `m` ticks late (its CPU descheduled:
    /// both clocks stale, which is harmless) and was then preempted between its jiffies
    /// update and its coarse-clock update for `window` samples, which read the jiffies `m`
    /// ticks ahead of the coarse clock: the loader's first samples (`End::Start`) or its last
    /// (`End::End`).
    fn stalled(hz: u64, ticks: u64, end: End, m: u64, window: usize) -> Vec<Sample> {
        let tick = tick_nsec(hz);
        let (j0, t0) = (4_295_000_000u64, 7_000_000_000u64);
        // The handler for tick `at` runs at tick `at + m - 1`.
        let at = match end {
            End::Start => 1,
            End::End => ticks - m + 1,
        };
        let sample = |j: u64, c: u64| Sample {
            before: t0 + c * tick,
            jiffies: j0 + j,
            after: t0 + c * tick,
        };
        let mut out = Vec::new();
        let mut in_window = 0..0;
        for k in 0..=ticks {
            if (at..at + m - 1).contains(&k) {
                // The handler has not run: both clocks read the tick before.
                out.extend([sample(at - 1, at - 1); 2]);
                continue;
            }
            if k == at + m - 1 {
                // It has updated the jiffies, not yet the coarse clock.
                in_window = out.len()..out.len() + window;
                out.extend(std::iter::repeat_n(sample(k, at - 1), window));
            }
            out.extend([sample(k, k); 2]);
        }
        match end {
            End::Start => out.split_off(in_window.start),
            End::End => {
                out.truncate(in_window.end);
                out
            }
        }
    }

    #[test]
    fn the_tick_and_offset_of_each_common_hz_are_found() {
        // Jiffies start at 2^32 - 300 * HZ (INITIAL_JIFFIES), so the offset is "negative".
        for hz in [100, 250, 300, 1000] {
            let j0 = (1u64 << 32) - 300 * hz + 12_345;
            let t0 = 64_369_645_000_000;
            let late = [
                3_000, 5_000, 2_000, 40_000, 3_000, 2_500, 4_000, 3_500, 2_000, 3_000,
            ];
            let s = kernel(hz, j0, t0, &late, hz / 50 + 1);
            let c = fit(&s).expect("fits");
            assert_eq!((c.hz, c.tick_ns), (hz, tick_nsec(hz)));
            // The clock reads each sample's coarse time within the handler's jitter.
            for x in &s {
                let d = c.at(x.jiffies) as i64 - x.after as i64;
                assert!(d.abs() <= 40_000, "hz {hz}: off by {d} ns");
            }
            // A wrong unit would be off by seconds at this jiffies count.
            let wrong = FlowClock {
                tick_ns: tick_nsec(hz) + 1_000,
                ..c
            };
            assert!(wrong.at(j0 + 1_000_000) - c.at(j0 + 1_000_000) >= 1_000_000_000);
        }
    }

    /// A loaded machine delays a tick: at HZ=250, 25 ticks measured from a first sample 2.4 ms
    /// late read as a 3.904 ms tick from the first to the last sample, nearer 256's (3.906)
    /// than 250's (4.0). (`xdp_testrun` once saw the flow clock run 2.4 % slow that way, when
    /// 256 was still a choice.)
    #[test]
    fn a_late_tick_still_snaps_to_the_kernels_hz() {
        let mut late = [1_000u64; 26];
        late[0] = 2_400_000;
        let s = kernel(250, 1_000, 0, &late, 1);
        assert_eq!(fit(&s).expect("fits").hz, 250);
        // The on-time ticks at the start carry it: the late one does not move it at all.
        assert_eq!(measured(&s), 4_000_000.0);
        assert!(first_to_last_off(&s, 250) < -0.02);
        // Control: the same samples with every tick on time fit too.
        assert_eq!(
            fit(&kernel(250, 1_000, 0, &[1_000; 26], 1)).unwrap().hz,
            250
        );
    }

    /// The tick handler stalled between its jiffies update and its coarse-clock update, at
    /// either end of the loader's first span (150 ms), after running 12 ms late: the samples
    /// in the window read the jiffies ahead of the coarse clock by the ticks of 12 ms, which
    /// from the first sample to the last is 8–13 % off (refused before this estimator, at
    /// every try); the median at each end is an undisturbed sample, and the tick is exact.
    #[test]
    fn a_tick_handler_stalled_between_its_two_updates_at_either_end_does_not_move_the_tick() {
        for hz in [100, 250, 300, 1000] {
            let tick = tick_nsec(hz);
            let ticks = 150_000_000 / tick;
            let m = 12_000_000 / tick + 1;
            for end in [End::Start, End::End] {
                let s = stalled(hz, ticks, end, m, 3);
                let what = format!("hz {hz}, {m} ticks ahead at the {end:?}");
                assert_eq!(measured(&s), tick as f64, "{what}");
                let c = fit(&s).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(c.hz, hz, "{what}");
                // Control: from the first sample to the last, beyond the tolerance.
                let naive = first_to_last_off(&s, hz);
                assert!(naive.abs() > TOLERANCE, "{what}: {naive}");
                // Control: the same kernel without the stall's window fits to the same tick.
                let calm = stalled(hz, ticks, end, m, 0);
                assert!(first_to_last_off(&calm, hz).abs() < 1e-9, "{what}");
            }
        }
    }

    /// On a kernel whose coarse clock is the tick handler's own time, a late handler makes a
    /// sample late by up to a tick. Late ticks at both ends at once (the first sample and the
    /// last, and a minority next to them): the medians at both ends are on time.
    #[test]
    fn late_ticks_at_both_ends_do_not_move_the_tick() {
        for hz in [100, 250, 300, 1000] {
            let tick = tick_nsec(hz);
            // 17 ticks: the head is jiffies 0–4, the tail 12–16; in each, 2 of 5 late.
            let late: Vec<u64> = [95, 3, 60, 1, 2, 50, 40, 10, 70, 30, 50, 80, 2, 90, 3, 1, 0]
                .iter()
                .map(|pct| tick * pct / 100 + 5_000)
                .collect();
            let s = kernel(hz, 77_000, 3_000_000_000, &late, 1);
            let m = measured(&s);
            // The medians are 1 % of a tick apart over 12 ticks.
            assert!(
                (m / tick as f64 - 1.0).abs() < 0.001,
                "hz {hz}: measured {m} ns"
            );
            assert_eq!(fit(&s).expect("fits").hz, hz);
            // Control: from the first sample to the last, 5.6 % short.
            let naive = first_to_last_off(&s, hz);
            assert!(naive < -0.05, "hz {hz}: {naive}");
        }
    }

    /// Every CONFIG_HZ the loader knows, over the loader's first span (150 ms, at least 10
    /// ticks), one sample per tick, with the tick handler late by up to a quarter of a tick
    /// on every tick and by half a tick to a whole one on every third (a loaded machine):
    /// always the right HZ, the measured tick within 3 % of it. Ten sequences of delays per
    /// HZ.
    #[test]
    fn jittered_and_late_ticks_of_every_config_hz_are_found() {
        let mut worst: f64 = 0.0;
        for hz in HZ_CHOICES {
            let tick = tick_nsec(hz);
            let n = (150_000_000 / tick).max(10) as usize + 1;
            for seed in 1..=10u64 {
                let mut d = Delays(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let late: Vec<u64> = (0..n)
                    .map(|i| {
                        let f = if i % 3 == 0 {
                            0.5 + 0.5 * d.next()
                        } else {
                            0.25 * d.next()
                        };
                        (f * 0.99 * tick as f64) as u64
                    })
                    .collect();
                let s = kernel(hz, 1_000_000 + seed * 7, 9_000_000_000, &late, 1);
                let off = measured(&s) / tick as f64 - 1.0;
                worst = worst.max(off.abs());
                let c = fit(&s).unwrap_or_else(|e| panic!("hz {hz}, seed {seed}: {e}"));
                assert_eq!(c.hz, hz, "seed {seed}");
                assert!(off.abs() < 0.03, "hz {hz}, seed {seed}: {off}");
            }
        }
        assert!(worst > 0.0, "the delays moved the measurement at all");
    }

    /// A coarse clock that moves in steps of its own, out of phase with the jiffies (the
    /// timekeeper accumulates whole tick intervals): each sample's offset is one of two values
    /// a tick apart. At HZ=250 over the loader's first span, mostly the upper one, the first
    /// sample on the upper value and the last on the lower (from the first to the last,
    /// 2.7 % off): the medians at both ends are on the upper value, and the tick is exact.
    #[test]
    fn a_coarse_clock_stepping_out_of_phase_with_the_jiffies_is_measured_exactly() {
        let hz = 250;
        let tick = tick_nsec(hz);
        let (lower, upper) = (500_000, tick + 500_000);
        let mut d = Delays(42);
        let n = 38;
        let mut late: Vec<u64> = (0..n)
            .map(|_| if d.next() < 0.7 { upper } else { lower })
            .collect();
        late[0] = upper;
        late[n - 1] = lower;
        let s = kernel(hz, 10_000, 0, &late, 1);
        assert_eq!(measured(&s), tick as f64);
        assert_eq!(fit(&s).expect("fits").hz, hz);
        assert!(first_to_last_off(&s, hz) < -0.02);
    }

    /// A sampler starved of CPU (tests loading the program in parallel on 2 vCPUs) can end
    /// up with two samples at an end, one of them read in the tick handler's window (a tick
    /// early): of the two, the other one is taken, at either end.
    #[test]
    fn a_starved_sampler_with_two_samples_at_an_end_one_of_them_early_measures_exactly() {
        let tick = tick_nsec(250);
        let at = |j: u64, c: u64| Sample {
            before: c * tick,
            jiffies: 9_000 + j,
            after: c * tick,
        };
        // Jiffies 1 to 38: the head is 1–10, the tail 29–38, two samples in each.
        let early_first = [
            at(1, 0),
            at(2, 2),
            at(15, 15),
            at(25, 25),
            at(37, 37),
            at(38, 38),
        ];
        let early_last = [
            at(1, 1),
            at(2, 2),
            at(15, 15),
            at(25, 25),
            at(37, 37),
            at(38, 37),
        ];
        for s in [early_first, early_last] {
            assert_eq!(measured(&s), tick as f64, "{s:?}");
            assert_eq!(fit(&s).expect("fits").hz, 250);
            // Control: the early sample is an end of the span, so first-to-last is off.
            assert!(first_to_last_off(&s, 250).abs() > 0.02);
        }
    }

    #[test]
    fn samples_that_straddle_a_tick_or_fit_no_hz_are_refused_with_what_they_showed() {
        let mut s = kernel(250, 1_000, 0, &[1_000; 11], 3);
        for x in &mut s {
            x.after += 4_000_000;
        }
        assert_eq!(
            fit(&s),
            Err(Unfit::TooFew {
                usable: 0,
                total: 11
            }),
            "every sample saw a tick between its reads"
        );
        // 7 ms per jiffy is no kernel's tick.
        let odd: Vec<Sample> = (0..10)
            .map(|i| Sample {
                before: i * 7_000_000 * 3,
                jiffies: 1_000 + i * 3,
                after: i * 7_000_000 * 3,
            })
            .collect();
        let unfit = fit(&odd).expect_err("7 ms is no tick");
        let text = unfit.to_string();
        for part in [
            "10 of 10 samples",
            "27 jiffies",
            "189.0 ms",
            "7000000 ns per jiffy",
            "HZ=128: 7812500 ns",
            "-10.4 %",
        ] {
            assert!(text.contains(part), "{part:?} in {text:?}");
        }
        assert_eq!(
            fit(&[]),
            Err(Unfit::TooFew {
                usable: 0,
                total: 0
            })
        );
        assert!(matches!(
            fit(&odd[..1]),
            Err(Unfit::TooFew { usable: 1, .. })
        ));
        assert!(matches!(
            fit(&odd[..1].repeat(3)),
            Err(Unfit::TooShort { ticks: 0, .. })
        ));
        // Out of order: refused, not a panic on the subtraction.
        let mut backwards = kernel(250, 1_000, 0, &[1_000; 11], 3);
        backwards.swap(2, 7);
        assert_eq!(fit(&backwards), Err(Unfit::Backwards { index: 3 }));
        let mut coarse_back = kernel(250, 1_000, 0, &[1_000; 11], 3);
        coarse_back[5].before -= 20_000_000;
        coarse_back[5].after -= 20_000_000;
        assert_eq!(fit(&coarse_back), Err(Unfit::Backwards { index: 5 }));
    }

    #[test]
    fn one_sample_with_the_new_jiffies_and_the_old_coarse_time_does_not_move_the_offset() {
        let mut s = kernel(250, 1_000, 0, &[2_000; 11], 3);
        s[4].jiffies += 1;
        let c = fit(&s).expect("fits");
        assert_eq!(c.at(s[0].jiffies), s[0].after);
    }
}
