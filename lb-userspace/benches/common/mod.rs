//! Helpers the XDP benchmarks share (`benches/xdp.rs`, `benches/l4cap.rs`): commands, interface
//! lookups, CPU placement, medians, counter reads.
use std::{io, process::Command};

use anyhow::{Context as _, ensure};
use lb::dataplane::Maps;
use lb_common::Reason;

/// Runs a command; fails with its stderr if it fails.
pub fn run_cmd(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A command's trimmed stdout, or what went wrong (for the report's header lines).
pub fn cmd_output(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("({args:?}: {e})"))
}

/// The index of interface `name` in this network namespace.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(idx != 0, "no interface {name}");
    Ok(idx)
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
pub fn pin(tid: i32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set)
    };
    ensure!(
        rc == 0,
        "sched_setaffinity({tid}, cpu {cpu}): {}",
        io::Error::last_os_error()
    );
    Ok(())
}

/// Median (NaN for no values).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n.is_multiple_of(2) {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    } else {
        s[n / 2]
    }
}

/// `lb_xdp`'s total for one packet outcome, over CPUs.
pub fn reason(maps: &Maps, r: Reason) -> anyhow::Result<u64> {
    Ok(maps
        .reason_totals()?
        .into_iter()
        .find(|(x, _)| *x == r)
        .map_or(0, |(_, n)| n))
}
