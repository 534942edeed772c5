//! CPU affinity of the per-worker runtime's threads (`lb run --l7-cpu-affinity`): HAProxy's
//! `cpu-map`, nginx's `worker_cpu_affinity`.
//!
//! Left to the scheduler, two L7 workers that never run out of work can share one CPU for
//! long stretches while the client and the backend share the other: each then waits a whole
//! time slice (1–4 ms here) for the other to be preempted, and the connections it holds wait
//! with it. That is where `lb`'s long waits for a CPU came from on 2 vCPUs, and bound, its
//! HTTP/1.1 p99 fell below unbound HAProxy's (BENCHMARKS.md, "Two workers on one CPU
//! (stop 42)"). Bound one per CPU, a worker shares its CPU only with threads that sleep.
//!
//! `auto` binds worker `i` to the `i`-th CPU (in ascending order) of those the process may run
//! on when the tier starts, wrapping round when there are more workers than CPUs; a list
//! (`0-3,8`) does the same over the CPUs it names, each of which must be one the process may
//! run on. Each worker binds its own thread when it starts; a bind that fails then (a CPU taken
//! offline in between) is logged and the worker runs unbound.
use std::fmt;

/// Most CPUs a set holds: glibc's `CPU_SETSIZE`.
pub const MAX_CPUS: usize = 1024;

/// A set of CPU numbers below [`MAX_CPUS`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CpuSet([u64; MAX_CPUS / 64]);

impl CpuSet {
    /// No CPU.
    pub const fn empty() -> Self {
        Self([0; MAX_CPUS / 64])
    }

    /// Adds `cpu`; false when it is not below [`MAX_CPUS`].
    pub fn insert(&mut self, cpu: usize) -> bool {
        if cpu >= MAX_CPUS {
            return false;
        }
        self.0[cpu / 64] |= 1 << (cpu % 64);
        true
    }

    pub fn contains(&self, cpu: usize) -> bool {
        cpu < MAX_CPUS && self.0[cpu / 64] & (1 << (cpu % 64)) != 0
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_CPUS).filter(|&c| self.contains(c))
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// The CPUs the calling thread may run on (`sched_getaffinity`).
    pub fn of_this_thread() -> std::io::Result<Self> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
        let mut raw: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is the calling thread; the size is the buffer's.
        let r = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut raw) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut set = Self::empty();
        for cpu in 0..MAX_CPUS {
            // SAFETY: cpu is below CPU_SETSIZE.
            if unsafe { libc::CPU_ISSET(cpu, &raw) } {
                set.insert(cpu);
            }
        }
        Ok(set)
    }
}

/// `0-3,8`: runs of consecutive CPUs as ranges.
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cpus = self.iter().peekable();
        let mut first = true;
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.next_if_eq(&(end + 1)).is_some() {
                end += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

/// Which CPUs the per-worker runtime's threads run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuAffinity {
    /// Wherever the scheduler puts them.
    #[default]
    Unbound,
    /// One per CPU the process may run on, in order.
    Auto,
    /// One per CPU of this set, in order.
    Cpus(CpuSet),
}

impl CpuAffinity {
    /// `none`, `auto` or a CPU list such as `0-3,8` (`--l7-cpu-affinity`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => return Ok(Self::Unbound),
            "auto" => return Ok(Self::Auto),
            _ => {}
        }
        let mut set = CpuSet::empty();
        for item in s.split(',') {
            let (lo, hi) = item.split_once('-').unwrap_or((item, item));
            let num = |n: &str| {
                n.parse::<usize>()
                    .ok()
                    .filter(|&c| c < MAX_CPUS)
                    .ok_or_else(|| {
                        format!(
                            "{s:?}: {item:?} is not a CPU number (0 to {}) or a range of them; \
                             expected none, auto or a list such as 0-3,8",
                            MAX_CPUS - 1
                        )
                    })
            };
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                return Err(format!("{s:?}: the range {item:?} runs backwards"));
            }
            for cpu in lo..=hi {
                set.insert(cpu);
            }
        }
        Ok(Self::Cpus(set))
    }

    /// The CPU of each of `workers` workers (`None`: unbound), given the CPUs the process may
    /// run on. Err names the listed CPUs the process may not run on.
    pub fn plan(&self, workers: usize, allowed: &CpuSet) -> Result<Vec<Option<usize>>, String> {
        let cpus: Vec<usize> = match self {
            Self::Unbound => return Ok(vec![None; workers]),
            Self::Auto => allowed.iter().collect(),
            Self::Cpus(set) => {
                let mut outside = CpuSet::empty();
                for cpu in set.iter().filter(|&c| !allowed.contains(c)) {
                    outside.insert(cpu);
                }
                if !outside.is_empty() {
                    return Err(format!(
                        "CPUs {outside} are not among those this process may run on ({allowed})"
                    ));
                }
                set.iter().collect()
            }
        };
        if cpus.is_empty() {
            return Err("no CPU to bind the workers to".into());
        }
        Ok((0..workers).map(|w| Some(cpus[w % cpus.len()])).collect())
    }
}

/// As `--l7-cpu-affinity` takes it: `none`, `auto` or the list.
impl fmt::Display for CpuAffinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unbound => f.write_str("none"),
            Self::Auto => f.write_str("auto"),
            Self::Cpus(set) => set.fmt(f),
        }
    }
}

/// Binds the calling thread to `cpu` alone.
pub fn bind_this_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= MAX_CPUS {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: cpu_set_t is plain data, and cpu is below CPU_SETSIZE.
    let mut raw: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut raw) };
    // SAFETY: pid 0 is the calling thread; the size is the set's.
    let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(cpus: &[usize]) -> CpuSet {
        let mut s = CpuSet::empty();
        for &c in cpus {
            assert!(s.insert(c));
        }
        s
    }

    #[test]
    fn parses_none_auto_and_lists_with_ranges() {
        assert_eq!(CpuAffinity::parse("none"), Ok(CpuAffinity::Unbound));
        assert_eq!(CpuAffinity::parse("auto"), Ok(CpuAffinity::Auto));
        assert_eq!(
            CpuAffinity::parse("0-3,8,10-11"),
            Ok(CpuAffinity::Cpus(set(&[0, 1, 2, 3, 8, 10, 11])))
        );
        assert_eq!(CpuAffinity::parse("5"), Ok(CpuAffinity::Cpus(set(&[5]))));
        assert_eq!(
            CpuAffinity::parse("1023"),
            Ok(CpuAffinity::Cpus(set(&[1023])))
        );
    }

    #[test]
    fn rejects_what_is_not_a_cpu_list_and_says_why() {
        for bad in ["", "x", "1,", "-1", "1-", "1024", "2-x", "0,,1", "Auto"] {
            let e = CpuAffinity::parse(bad).expect_err(bad);
            assert!(e.contains("not a CPU number"), "{bad}: {e}");
        }
        let e = CpuAffinity::parse("3-1").expect_err("backwards");
        assert!(e.contains("runs backwards"), "{e}");
    }

    #[test]
    fn lists_print_as_ranges() {
        assert_eq!(set(&[0, 1, 2, 3, 8, 10, 11]).to_string(), "0-3,8,10-11");
        assert_eq!(set(&[7]).to_string(), "7");
        assert_eq!(set(&[]).to_string(), "");
    }

    #[test]
    fn plans_one_worker_per_cpu_in_order_and_wraps_round() {
        let allowed = set(&[0, 1, 4, 5]);
        assert_eq!(
            CpuAffinity::Unbound.plan(3, &allowed),
            Ok(vec![None, None, None])
        );
        assert_eq!(
            CpuAffinity::Auto.plan(6, &allowed),
            Ok([0, 1, 4, 5, 0, 1].map(Some).to_vec())
        );
        assert_eq!(
            CpuAffinity::Cpus(set(&[5, 1])).plan(3, &allowed),
            Ok([1, 5, 1].map(Some).to_vec())
        );
    }

    #[test]
    fn a_listed_cpu_the_process_may_not_use_is_refused() {
        let e = CpuAffinity::Cpus(set(&[1, 2, 3]))
            .plan(2, &set(&[0, 1]))
            .expect_err("2 and 3 are not allowed");
        assert_eq!(
            e,
            "CPUs 2-3 are not among those this process may run on (0-1)"
        );
        assert!(CpuAffinity::Auto.plan(1, &CpuSet::empty()).is_err());
    }

    #[test]
    fn a_bound_thread_runs_only_on_its_cpu() {
        let allowed = CpuSet::of_this_thread().expect("sched_getaffinity");
        let last = allowed.iter().last().expect("a CPU");
        let got = std::thread::spawn(move || {
            bind_this_thread(last).expect("sched_setaffinity");
            CpuSet::of_this_thread().expect("sched_getaffinity")
        })
        .join()
        .unwrap();
        assert_eq!(got, set(&[last]));
        // Control: the spawning thread kept its own set.
        assert_eq!(CpuSet::of_this_thread().unwrap(), allowed);
    }
}
