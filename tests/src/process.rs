//! The `lb` binary: where it is, and long-running `lb run` / `lb decap` children that announce
//! `ready` and are stopped (SIGTERM, then SIGKILL) when their guard drops.
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns;

/// How long a child may take to print `ready` (loading and verifying the programs, writing
/// 65537-slot rings): a safety net, not an expectation.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child gets to exit after SIGTERM before it is SIGKILLed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Path of the `lb` binary: `$LB_BIN` if set, else `<target dir>/debug/lb`, where the target
/// dir is `$CARGO_TARGET_DIR` or the workspace's `target/`. Fails, saying how to build it, if
/// the file does not exist.
pub fn lb_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("LB_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
            target.join("debug/lb")
        }
    };
    if !path.is_file() {
        bail!(
            "the lb binary is not at {} (set LB_BIN to override); build it with \
             `cargo build -p lb-userspace`; `cargo xtask test` does this",
            path.display()
        );
    }
    Ok(path)
}

/// A running `lb` child (normally `nsenter --net=… -- lb run|decap …`, which execs `lb` in
/// place, so the child's pid is lb's). Stopped with SIGTERM (then SIGKILL) on drop.
#[derive(Debug)]
pub struct LbProcess {
    /// What this process is, for messages (`lb run in lbt-…-lb0`).
    label: String,
    child: Child,
    /// Where the child's stderr goes (and its stdout after `ready`).
    log: PathBuf,
    /// The command line, as an operator would type it.
    command_line: String,
}

impl LbProcess {
    /// Starts `cmd`, logging its stderr and stdout to `log`, and waits until it prints a line
    /// starting with `ready`. Fails with the log's content if it exits or times out first.
    ///
    /// The child runs in its own process group and gets `PR_SET_PDEATHSIG(SIGTERM)`, so it does not outlive a test process that
    /// dies without running destructors. (That signal follows the *thread* that spawned it:
    /// spawn from a thread that lives as long as the guard, as test threads do.)
    pub fn spawn(label: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let command_line = netns::command_line(&cmd);
        let log_file =
            File::create(log).with_context(|| format!("creating log {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file.try_clone().context("duplicating log file")?);
        // SAFETY: setpgid and prctl are async-signal-safe and touch only the child.
        unsafe {
            cmd.pre_exec(|| {
                // Own process group: a Ctrl-C in the terminal reaches the harness, which then
                // stops its children in order, instead of killing them all mid-step.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting `{command_line}`"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (ready_tx, ready_rx) = mpsc::channel();
        // Drains stdout for the child's whole life (a full pipe would block it), reporting the
        // `ready` line and copying everything to the log.
        let mut log_copy = log_file;
        std::thread::Builder::new()
            .name(format!("{label} stdout"))
            .spawn(move || {
                let mut ready_tx = Some(ready_tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log_copy, "{line}");
                    if line.starts_with("ready")
                        && let Some(tx) = ready_tx.take()
                    {
                        let _ = tx.send(());
                    }
                }
            })
            .context("spawning stdout reader")?;
        let mut me = Self {
            label: label.to_owned(),
            child,
            log: log.to_owned(),
            command_line,
        };
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(()) => Ok(me),
            Err(e) => {
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => {
                        format!("did not print `ready` within {READY_TIMEOUT:?}")
                    }
                    mpsc::RecvTimeoutError::Disconnected => {
                        let status = me.child.wait().map(|s| s.to_string());
                        format!(
                            "exited before printing `ready` ({})",
                            status.unwrap_or_default()
                        )
                    }
                };
                let _ = me.stop();
                bail!(
                    "{} (`{}`) {why}; its output:\n{}",
                    me.label,
                    me.command_line,
                    me.log_text()
                )
            }
        }
    }

    /// The command line the process was started with.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Everything the process wrote so far (stderr and stdout).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL; always reaps the child. Returns how
    /// it ended (`None` if that could not be read): a clean exit after SIGTERM is status 0.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_with(libc::SIGTERM)
    }

    /// [`Self::stop`] with another signal first (SIGINT: what Ctrl-C sends).
    pub fn stop_with(&mut self, signal: libc::c_int) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(pid, signal) };
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!(
                "lb-tests: {} ignored signal {signal} for {STOP_GRACE:?}; killing it",
                self.label
            );
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
