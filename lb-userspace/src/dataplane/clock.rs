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
//! reads the coarse clock, the jiffies and the coarse clock again): the tick from samples
//! 100 ms apart, snapped to a `CONFIG_HZ` the kernel offers, the offset from the least-delayed
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
/// 2.5 % of 250, 500 and 1000, closer than a 100 ms measurement on a loaded machine can tell
/// apart (one late tick moves it by several percent), and a wrong unit makes every flow's age
/// drift (2.4 % is 86 s an hour).
const HZ_CHOICES: [u64; 12] = [24, 32, 48, 64, 100, 128, 200, 250, 300, 500, 1000, 1200];

/// How far apart the first and last samples are at least.
const SPAN: Duration = Duration::from_millis(100);
/// Time between samples.
const STEP: Duration = Duration::from_millis(10);
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

/// The kernel's `TICK_NSEC` for `hz`.
pub fn tick_nsec(hz: u64) -> u64 {
    (1_000_000_000 + hz / 2) / hz
}

/// The clock that fits `samples` (in time order, at least two, spanning several ticks), or
/// `None` when they fit no `CONFIG_HZ` within [`TOLERANCE`]. Samples that saw a tick between
/// their two coarse reads are left out.
pub fn fit(samples: &[Sample]) -> Option<FlowClock> {
    let good: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.before == s.after)
        .collect();
    let (first, last) = (good.first()?, good.last()?);
    let ticks = last.jiffies.checked_sub(first.jiffies)?;
    let span = last.after.checked_sub(first.after)?;
    if ticks < 2 || span == 0 {
        return None;
    }
    let measured = span as f64 / ticks as f64;
    let hz = *HZ_CHOICES.iter().min_by(|a, b| {
        let da = (tick_nsec(**a) as f64 - measured).abs();
        let db = (tick_nsec(**b) as f64 - measured).abs();
        da.total_cmp(&db)
    })?;
    let tick_ns = tick_nsec(hz);
    if (measured / tick_ns as f64 - 1.0).abs() > TOLERANCE {
        return None;
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
    Some(FlowClock {
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
/// 100 ms the first time.
pub fn flow_clock(ebpf: &Ebpf) -> Result<FlowClock> {
    static CLOCK: OnceLock<FlowClock> = OnceLock::new();
    if let Some(c) = CLOCK.get() {
        return Ok(*c);
    }
    let mut span = SPAN;
    let mut last_problem = String::new();
    // A loaded machine can delay ticks; try again over longer spans before giving up.
    for _ in 0..4 {
        let start = Instant::now();
        let mut samples = vec![sample(ebpf)?];
        while start.elapsed() < span {
            std::thread::sleep(STEP);
            samples.push(sample(ebpf)?);
        }
        match fit(&samples) {
            Some(c) => {
                tracing::debug!(hz = c.hz, tick_ns = c.tick_ns, "flow clock measured");
                return Ok(*CLOCK.get_or_init(|| c));
            }
            None => {
                last_problem = format!("{} samples over {span:?} fit no CONFIG_HZ", samples.len());
                span *= 2;
            }
        }
    }
    Err(DataplaneError::Clock(last_problem))
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
    /// late read as a 3.904 ms tick, nearer 256's (3.906) than 250's (4.0). (`xdp_testrun` once
    /// saw the flow clock run 2.4 % slow that way, when 256 was still a choice.)
    #[test]
    fn a_late_tick_still_snaps_to_the_kernels_hz() {
        let mut late = [1_000u64; 26];
        late[0] = 2_400_000;
        let c = fit(&kernel(250, 1_000, 0, &late, 1)).expect("fits");
        assert_eq!(c.hz, 250);
        // Control: the same samples with every tick on time fit too.
        assert_eq!(
            fit(&kernel(250, 1_000, 0, &[1_000; 26], 1)).unwrap().hz,
            250
        );
    }

    #[test]
    fn samples_that_straddle_a_tick_or_fit_no_hz_are_refused() {
        let mut s = kernel(250, 1_000, 0, &[1_000; 11], 3);
        for x in &mut s {
            x.after += 4_000_000;
        }
        assert_eq!(fit(&s), None, "every sample saw a tick between its reads");
        // 7 ms per jiffy is no kernel's tick.
        let odd: Vec<Sample> = (0..10)
            .map(|i| Sample {
                before: i * 7_000_000 * 3,
                jiffies: 1_000 + i * 3,
                after: i * 7_000_000 * 3,
            })
            .collect();
        assert_eq!(fit(&odd), None);
        assert_eq!(fit(&[]), None);
        assert_eq!(fit(&odd[..1]), None);
    }

    #[test]
    fn one_sample_with_the_new_jiffies_and_the_old_coarse_time_does_not_move_the_offset() {
        let mut s = kernel(250, 1_000, 0, &[2_000; 11], 3);
        s[4].jiffies += 1;
        let c = fit(&s).expect("fits");
        assert_eq!(c.at(s[0].jiffies), s[0].after);
    }
}
