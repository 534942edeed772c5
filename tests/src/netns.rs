//! Network namespaces: creating and deleting them, running code and commands inside them, and
//! removing what earlier, crashed runs of this harness left behind.
//!
//! Every name this harness creates starts with `lbt-<pid>-`, where `<pid>` is the id of the
//! test process. That prefix is what [`remove_leftovers`] uses to recognise (and only ever
//! touch) the debris of runs whose process no longer exists.
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

/// Directory where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";
/// bpffs mount point under which each topology pins its maps (one subdirectory per LB).
pub const BPFFS: &str = "/sys/fs/bpf";
/// Directory under which each topology keeps its logs and admin sockets.
pub const TMP_DIR: &str = "/tmp";
/// First component of every name the harness creates.
pub const NAME_PREFIX: &str = "lbt-";

/// Path of the handle of namespace `ns` (what `nsenter --net=` and [`in_netns`] open).
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Runs `program args…` in the current namespace, failing with its stderr if it exits non-zero.
pub fn run<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_command(&mut cmd)
}

/// Runs `program args…` inside namespace `ns` (through `nsenter --net=`, which unlike
/// `ip netns exec` leaves /sys, and with it the bpffs, alone).
pub fn run_in<I, S>(ns: &str, program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_command(&mut nsenter(ns, program, args))
}

/// A `Command` that runs `program args…` inside namespace `ns`.
pub fn nsenter<I, S>(ns: &str, program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .arg(program)
        .args(args);
    cmd
}

/// Whether [`run_command`] prints each command line before running it (the demo's
/// `--verbose`, for operators who want to replay the setup by hand).
static ECHO: AtomicBool = AtomicBool::new(false);

/// Makes [`run_command`] print every command line (prefixed with `$ `) before running it.
pub fn set_echo(on: bool) {
    ECHO.store(on, Ordering::Relaxed);
}

/// Runs a prepared command, failing with the command line, exit status and stderr when it
/// does not exit 0.
pub fn run_command(cmd: &mut Command) -> Result<Output> {
    let line = command_line(cmd);
    if ECHO.load(Ordering::Relaxed) {
        println!("$ {line}");
    }
    let out = cmd.output().with_context(|| format!("starting `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// The command line of `cmd`, for error messages and for showing operators what runs.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Creates namespace `ns` with its loopback up.
pub fn create_netns(ns: &str) -> Result<()> {
    run("ip", ["netns", "add", ns])?;
    run_in(ns, "ip", ["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes namespace `ns` (its interfaces go with it; a veth whose peer lives elsewhere is
/// deleted as a pair). Missing namespaces are not an error.
pub fn delete_netns(ns: &str) -> Result<()> {
    if !netns_path(ns).exists() {
        return Ok(());
    }
    run("ip", ["netns", "delete", ns]).map(|_| ())
}

/// Sets sysctl `key` (dotted form) to `value` inside namespace `ns`.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    run_in(ns, "sysctl", ["-q", "-w", &format!("{key}={value}")]).map(|_| ())
}

/// Runs `f` on a fresh thread whose network namespace is `ns`, and returns its result.
///
/// `setns(CLONE_NEWNET)` changes only the calling thread's namespace, so the test thread is
/// never moved; sockets created by `f` stay in `ns` for their whole life, whichever thread uses
/// them later.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            anyhow::anyhow!("code running in namespace {ns} panicked: {msg}")
        })?
    })
}

/// Spawns a named, long-lived thread inside namespace `ns`. `f` is not run if entering the
/// namespace fails; the error is the thread's result.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    thread_name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let path = netns_path(ns);
    std::thread::Builder::new()
        .name(thread_name.to_owned())
        .spawn(move || {
            enter_netns(&path)?;
            f()
        })
        .with_context(|| format!("spawning thread {thread_name}"))
}

/// Moves the calling thread into the network namespace whose handle is `path`.
pub fn enter_netns(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: `file` is an open namespace handle for the duration of the call; setns only
    // changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns into {}", path.display()));
    }
    Ok(())
}

/// Fails with a clear message unless the process runs as root: everything the harness does
/// (namespaces, veths, XDP, bpffs) needs it, and a kernel test must never pass silently by
/// skipping.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "this test builds network namespaces and attaches XDP programs, so it must run as \
             root (effective uid is {euid}); run it with `sudo -E cargo xtask test`"
        );
    }
    Ok(())
}

/// A counter of `/proc/net/snmp` (e.g. group `Tcp`, field `InSegs`) in namespace `ns`.
pub fn snmp(ns: &str, group: &str, field: &str) -> Result<u64> {
    let text = in_netns(ns, || std::fs::read_to_string("/proc/thread-self/net/snmp"))?
        .context("reading /proc/thread-self/net/snmp")?;
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {group} lines in the snmp of {ns}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no {group} {field} in the snmp of {ns}"))
}

/// Mounts a bpffs on /sys/fs/bpf unless one is already there.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_dev, at, fstype) = (f.next(), f.next(), f.next());
        at == Some(BPFFS) && fstype == Some("bpf")
    });
    if !mounted {
        run("mount", ["-t", "bpf", "bpffs", BPFFS]).context("mounting the bpffs")?;
    }
    Ok(())
}

/// The pid encoded in a harness name `lbt-<pid>-…`, if `name` is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, tail) = rest.split_once('-')?;
    if tail.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Whether a process with id `pid` exists.
fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Whether `name` was made by a run of this harness whose process is gone.
fn is_dead_leftover(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| pid != std::process::id() && !pid_alive(pid))
}

/// Removes what earlier runs of this harness left behind when their process died without
/// running its destructors (SIGKILL, abort): namespaces, pin directories and temp directories
/// named `lbt-<pid>-…` whose `<pid>` no longer exists, and any process still living in such a
/// namespace. Never touches anything else. Best effort: failures are reported on stderr.
pub fn remove_leftovers() {
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_dead_leftover(&name) {
                kill_processes_in_netns(&entry.path());
                if let Err(e) = delete_netns(&name) {
                    eprintln!("lb-tests: removing leftover namespace {name}: {e:#}");
                }
            }
        }
    }
    for dir in [BPFFS, TMP_DIR] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if is_dead_leftover(&name)
                    && let Err(e) = std::fs::remove_dir_all(entry.path())
                {
                    eprintln!(
                        "lb-tests: removing leftover {}: {e}",
                        entry.path().display()
                    );
                }
            }
        }
    }
}

/// SIGKILLs every process whose network namespace is the one behind `handle` (compared by
/// inode, so only processes inside that very namespace).
fn kill_processes_in_netns(handle: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(handle) else {
        return;
    };
    let wanted = format!("net:[{}]", meta.ino());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let link = std::fs::read_link(p.path().join("ns/net"));
        if link.is_ok_and(|l| l.as_os_str() == wanted.as_str()) {
            // SAFETY: plain kill(2) on a pid that lives in a namespace only this harness creates.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_reads_only_harness_names() {
        assert_eq!(owner_pid("lbt-1234-0-br"), Some(1234));
        assert_eq!(owner_pid("lbt-1234-"), None);
        assert_eq!(owner_pid("lbt-x-0-br"), None);
        assert_eq!(owner_pid("lb-1234-0-br"), None);
        assert_eq!(owner_pid("other"), None);
    }
}
