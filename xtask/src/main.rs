//! `cargo xtask …`: the commands a newcomer and CI run.
//!
//! - `cargo xtask run`: the self-contained demo in network namespaces.
//! - `cargo xtask run [--pgo] -- FLAGS`: `lb run FLAGS` on this host (release build, or the
//!   profile-guided one).
//! - `cargo xtask build [--pgo]`: the release `lb`, or a profile-guided fat-LTO one (`pgo`);
//!   prints the binary's path.
//! - `cargo xtask test`: every test (unit, L7 on loopback, L4 in namespaces) plus fmt/clippy.
//! - `cargo xtask bench xdp|control|l7|l4|all`: the XDP, control-plane, L7 and L4 benchmarks,
//!   or all of them in turn.
//! - `cargo xtask prereqs`: check (and, as root, install) what the build needs.
//!
//! Every command checks the prerequisites first. This crate depends on nothing that needs
//! them, so it builds on a fresh machine before they exist.
mod bench_l4;
mod bench_l7;
mod katran;
mod pgo;

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, demo, test and benchmark lb")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Without flags: the namespace demo. With `-- FLAGS`: `lb run FLAGS` on this host.
    Run {
        /// Run the profile-guided build (`cargo xtask build --pgo`) instead of the release build.
        #[arg(long)]
        pgo: bool,
        /// Flags for `lb run` (after `--`).
        #[arg(last = true)]
        flags: Vec<OsString>,
    },
    /// Build the release `lb` and print its path.
    Build {
        /// Profile-guided and fat LTO: build `lb` instrumented, train it on an L7 load (about a
        /// minute, on loopback ports 18080, 18091 and 18451; nginx, wrk, h2load and openssl are
        /// installed when missing, as root), build it again with the profile, then BOLT it
        /// (instrument, the same training, lay the binary out by that profile). Prints
        /// `target/pgo/bolt/lb`; the PGO-only binary is `target/pgo/use/<host>/release/lb`.
        #[arg(long)]
        pgo: bool,
    },
    /// Run every test: unit, L7 on loopback, L4 in network namespaces; then fmt and clippy.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Only run tests whose name contains this (passed to every test binary).
        filter: Option<String>,
    },
    /// Benchmarks.
    Bench {
        /// Which benchmark.
        #[command(subcommand)]
        which: Bench,
    },
    /// Check prerequisites; install missing ones when run as root.
    Prereqs,
}

#[derive(Subcommand)]
enum Bench {
    /// ns/frame of lb_xdp and lb_decap above XDP_TX/XDP_PASS floors, via BPF_PROG_TEST_RUN
    /// in live-frames mode.
    Xdp {
        /// 5 rounds instead of 21 (well under a minute).
        #[arg(long)]
        quick: bool,
        /// Also measure Katran's XDP balancer (rows "katran …"): build its `balancer.bpf.o`
        /// from this checkout of facebookincubator/katran with Katran's own flags (installs
        /// clang-22 when missing) and run it behind the same front program.
        #[arg(long, value_name = "DIR")]
        katran: Option<PathBuf>,
    },
    /// Control plane: Maglev build, API change → maps latency, flow-entry memory.
    Control,
    /// L7: lb beside HAProxy and nginx (installed from Debian when missing), on loopback.
    L7 {
        /// One short round instead of three long ones.
        #[arg(long)]
        quick: bool,
        /// Measure only these figures (comma-separated: h1, h2, handshakes, resumed), with the
        /// same peers in the same rounds: to iterate on one path faster.
        #[arg(long)]
        only: Option<String>,
        /// Also run this `lb` binary, as `lb-base`, in every round beside the freshly built one:
        /// a same-run A/B comparison of two builds (the ratio column then also reads lb ÷ lb-base).
        #[arg(long)]
        baseline: Option<std::path::PathBuf>,
        /// How many alternating rounds (default 3, or 1 with `--quick`; each round runs every
        /// proxy once per figure, 10 s each, or 3 s with `--quick`). More rounds narrow the
        /// median of the per-round ratios, to settle an A/B on a noisy machine.
        #[arg(long, value_name = "N", value_parser = bench_l7::parse_rounds)]
        rounds: Option<usize>,
        /// Measure the profile-guided build (`cargo xtask build --pgo`) as `lb`; without
        /// `--baseline`, the normal release build runs beside it as `lb-base`.
        #[arg(long)]
        pgo: bool,
        /// Bind every proxy's workers one per CPU: `lb` with `--l7-runtime per-worker
        /// --l7-accept balanced --l7-cpu-affinity auto`, HAProxy with `cpu-map`, nginx with
        /// `worker_cpu_affinity auto` (the client and the backend stay unbound).
        #[arg(long)]
        pin: bool,
        /// `lb` serves its HTTP listener on the lean HTTP/1.1 path (`http1=lean`, with the
        /// per-worker runtime); `lb-base`, the same binary unless `--baseline` names another,
        /// runs beside it on the native path with the same layout.
        #[arg(long)]
        lean: bool,
    },
    /// L4: lb_xdp (DSR) beside nftables DNAT through a namespace topology: UDP packets/s,
    /// TCP connections/s, LB CPU per packet.
    L4 {
        /// Two short rounds (about a minute) instead of five.
        #[arg(long)]
        quick: bool,
    },
    /// Every suite in turn: xdp, l4, control, l7.
    All {
        /// Each suite's short form (7.5 minutes here, builds included).
        #[arg(long)]
        quick: bool,
    },
}

impl Bench {
    fn name(&self) -> &'static str {
        match self {
            Bench::Xdp { .. } => "xdp",
            Bench::Control => "control",
            Bench::L7 { .. } => "l7",
            Bench::L4 { .. } => "l4",
            Bench::All { .. } => "all",
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let root = workspace_root();
    env::set_current_dir(&root).context("entering the workspace")?;
    add_cargo_bin_to_path();
    prereqs(&root)?;
    match cli.command {
        Cmd::Prereqs => Ok(()),
        Cmd::Run { pgo, flags } => {
            let lb = match run_mode(pgo, &flags)? {
                RunMode::Demo => return demo(&root),
                RunMode::Lb { pgo } => lb_binary(&root, pgo)?,
            };
            let status = Command::new(&lb)
                .arg("run")
                .args(&flags)
                .status()
                .with_context(|| format!("running {}", lb.display()))?;
            if !status.success() {
                bail!("lb run exited with {status}");
            }
            Ok(())
        }
        Cmd::Build { pgo } => {
            println!("{}", lb_binary(&root, pgo)?.display());
            Ok(())
        }
        Cmd::Test { no_lint, filter } => test(&root, no_lint, filter.as_deref()),
        Cmd::Bench { which } => bench(&root, which),
    }
}

fn bench(root: &Path, which: Bench) -> anyhow::Result<()> {
    match which {
        Bench::Xdp { quick, katran } => {
            require_root("the XDP benchmark")?;
            let object = katran
                .map(|dir| katran::build(&dir, &target_dir(root).join("katran")))
                .transpose()?
                .map(|o| o.display().to_string());
            let mut args = vec!["bench", "-p", "lb-userspace", "--bench", "xdp", "--"];
            if quick {
                args.push("--quick");
            }
            if let Some(object) = &object {
                args.extend(["--katran-obj", object]);
            }
            cargo(&args)
        }
        Bench::L7 {
            quick,
            only,
            baseline,
            rounds,
            pgo,
            pin,
            lean,
        } => {
            require_root("the L7 benchmark (it installs and runs HAProxy and nginx)")?;
            let only = only
                .as_deref()
                .map(|names| {
                    names
                        .split(',')
                        .map(bench_l7::Figure::parse)
                        .collect::<anyhow::Result<Vec<_>>>()
                })
                .transpose()?;
            let lb = lb_binary(root, pgo)?;
            // The PGO build is compared with the normal one unless told otherwise.
            let baseline = match (pgo, lean, baseline) {
                (true, false, None) => Some(release_lb(root)?),
                (_, _, baseline) => baseline,
            };
            bench_l7::run(
                root,
                &lb,
                bench_l7::Options {
                    quick,
                    only,
                    baseline,
                    rounds,
                    pgo,
                    pin,
                    lean,
                },
            )
        }
        Bench::L4 { quick } => {
            require_root("the L4 benchmark")?;
            cargo(&["build", "--release", "-p", "lb-userspace", "--bin", "lb"])?;
            bench_l4::run(&target_dir(root).join("release/lb"), quick)?;
            // Part 2: the LB's capacity, with a generator that outruns it.
            let mut args = vec!["bench", "-p", "lb-userspace", "--bench", "l4cap"];
            if quick {
                args.extend(["--", "--quick"]);
            }
            cargo(&args)
        }
        Bench::Control => {
            require_root("the control-plane benchmark")?;
            cargo(&["bench", "-p", "lb-userspace", "--bench", "control"])
        }
        Bench::All { quick } => {
            let suites = [
                Bench::Xdp {
                    quick,
                    katran: None,
                },
                Bench::L4 { quick },
                Bench::Control,
                Bench::L7 {
                    quick,
                    only: None,
                    baseline: None,
                    rounds: None,
                    pgo: false,
                    pin: false,
                    lean: false,
                },
            ];
            for suite in suites {
                let name = suite.name();
                println!(
                    "\n=== cargo xtask bench {name}{}",
                    if quick && !matches!(suite, Bench::Control) {
                        " --quick"
                    } else {
                        ""
                    }
                );
                bench(root, suite).with_context(|| format!("the {name} suite"))?;
            }
            Ok(())
        }
    }
}

/// What `cargo xtask run` does.
#[derive(Debug, PartialEq, Eq)]
enum RunMode {
    /// The namespace demo (no flags).
    Demo,
    /// `lb run FLAGS` with the release build, or the PGO build.
    Lb { pgo: bool },
}

fn run_mode(pgo: bool, flags: &[OsString]) -> anyhow::Result<RunMode> {
    match (pgo, flags.is_empty()) {
        (false, true) => Ok(RunMode::Demo),
        (true, true) => {
            bail!("--pgo runs `lb run FLAGS` with the PGO build: give the flags after `--`")
        }
        (pgo, false) => Ok(RunMode::Lb { pgo }),
    }
}

/// The `lb` binary `cargo xtask run`, `build` and `bench l7` use: the profile-guided build
/// with `--pgo`, else the release build; built first.
fn lb_binary(root: &Path, pgo: bool) -> anyhow::Result<PathBuf> {
    if pgo {
        let built = pgo::build(&target_dir(root))?;
        eprintln!(
            "xtask: PGO build: {}; PGO + BOLT: {} (using the latter; the former for --baseline)",
            built.pgo.display(),
            built.bolt.display()
        );
        Ok(pgo_choice(built))
    } else {
        release_lb(root)
    }
}

/// Which of the PGO build's binaries `--pgo` means: the BOLTed one (10 % and 21 % fewer
/// simulated L1 instruction-cache misses per HTTP/1.1 and HTTP/2 request than the PGO-only
/// build at equal instructions; 1.06x and 1.00x its HTTP/1.1 and HTTP/2 requests per
/// CPU-second on a loaded machine: BENCHMARKS.md, "BOLT on top of the PGO build"). The
/// PGO-only one stays a `--baseline`.
fn pgo_choice(built: pgo::Built) -> PathBuf {
    built.bolt
}

/// `cargo build --release` of `lb`; its path.
fn release_lb(root: &Path) -> anyhow::Result<PathBuf> {
    cargo(&["build", "--release", "-p", "lb-userspace", "--bin", "lb"])?;
    Ok(target_dir(root).join("release/lb"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// bpf-linker and friends are installed in ~/.cargo/bin, which a fresh shell may lack.
fn add_cargo_bin_to_path() {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(bin) = home.map(|h| h.join("bin")) {
        let mut paths: Vec<PathBuf> =
            env::split_paths(&env::var_os("PATH").unwrap_or_default()).collect();
        if !paths.contains(&bin) {
            paths.insert(0, bin);
            if let Ok(joined) = env::join_paths(paths) {
                // SAFETY: single-threaded at this point; nothing reads the environment
                // concurrently.
                unsafe { env::set_var("PATH", joined) };
            }
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} loads XDP programs and creates network namespaces: run as root (sudo -E cargo xtask …)"
        );
    }
    Ok(())
}

fn succeeds(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// One prerequisite: how to tell it is there, and the command that installs it.
struct Prereq {
    what: &'static str,
    present: fn() -> bool,
    install: &'static str,
}

const PREREQS: &[Prereq] = &[
    Prereq {
        what: "nightly toolchain with rust-src (lb-ebpf is built with -Z build-std=core)",
        present: || {
            Command::new("rustup")
                .args(["component", "list", "--toolchain", "nightly", "--installed"])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .any(|l| l.starts_with("rust-src"))
                })
                .unwrap_or(false)
        },
        install: "rustup toolchain install nightly --profile minimal && rustup component add rust-src --toolchain nightly",
    },
    Prereq {
        what: "LLVM 22 development files (bpf-linker links against them)",
        present: || succeeds("dpkg", &["-s", "llvm-22-dev"]),
        install: "apt-get update && apt-get install -y llvm-22-dev",
    },
    Prereq {
        what: "llvm-profdata for rustc's LLVM (cargo xtask build --pgo merges the profiles with it)",
        present: || pgo::llvm_profdata().is_some(),
        install: "rustup component add llvm-tools",
    },
    Prereq {
        what: "BOLT (llvm-bolt, merge-fdata: the last step of cargo xtask build --pgo)",
        present: || pgo::bolt_tools().is_some(),
        install: "apt-get update && apt-get install -y bolt-22",
    },
    Prereq {
        what: "bpf-linker",
        present: || succeeds("bpf-linker", &["--version"]),
        install: "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22",
    },
    Prereq {
        what: "iproute2 (ip), ethtool, nsenter (namespaces for tests and the demo)",
        present: || {
            succeeds("ip", &["-V"])
                && succeeds("ethtool", &["--version"])
                && succeeds("nsenter", &["--version"])
        },
        install: "apt-get update && apt-get install -y iproute2 ethtool util-linux",
    },
    Prereq {
        what: "promtool (Prometheus's parser: a test checks lb's /metrics with it)",
        present: || succeeds("promtool", &["--version"]),
        install: "apt-get update && apt-get install -y --no-install-recommends prometheus",
    },
    Prereq {
        what: "a bpffs at /sys/fs/bpf (lb pins its maps there)",
        present: || {
            std::fs::read_to_string("/proc/mounts")
                .map(|m| {
                    m.lines().any(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
                    })
                })
                .unwrap_or(false)
        },
        install: "mount -t bpf bpffs /sys/fs/bpf",
    },
];

fn missing() -> Vec<&'static Prereq> {
    PREREQS.iter().filter(|p| !(p.present)()).collect()
}

/// Checks every prerequisite; as root, installs what is missing with
/// scripts/install-prereqs.sh (which installs nothing that is already there), otherwise prints
/// the commands to run.
fn prereqs(root: &Path) -> anyhow::Result<()> {
    let gone = missing();
    if gone.is_empty() {
        return Ok(());
    }
    for p in &gone {
        eprintln!("xtask: missing: {}", p.what);
    }
    if !is_root() {
        eprintln!("xtask: run these as root (or run cargo xtask as root to install them):");
        for p in &gone {
            eprintln!("    {}", p.install);
        }
        bail!("prerequisites missing");
    }
    let script = root.join("scripts/install-prereqs.sh");
    eprintln!("xtask: installing with {}", script.display());
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    let still = missing();
    if !still.is_empty() {
        for p in still {
            eprintln!(
                "xtask: still missing after install: {} (try: {})",
                p.what, p.install
            );
        }
        bail!("prerequisites missing");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_env(args, &[])
}

fn cargo_env(args: &[&str], envs: &[(&str, &Path)]) -> anyhow::Result<()> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args);
    // `cargo xtask` runs us through `cargo run`, which sets the package variables of xtask
    // (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, …). Passed on, they differ from a shell's `cargo
    // build`, and build scripts that watch them (ring's) run again, rebuilding ring, rustls and
    // lb: every `cargo xtask bench` after a shell build rebuilt for minutes.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || matches!(
                &*k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&*k);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn demo(root: &Path) -> anyhow::Result<()> {
    require_root("the demo")?;
    cargo(&[
        "build",
        "-p",
        "lb-userspace",
        "-p",
        "lb-tests",
        "--bin",
        "lb",
        "--bin",
        "lb-demo",
    ])?;
    let dir = target_dir(root).join("debug");
    let lb = dir.join("lb");
    let status = Command::new(dir.join("lb-demo"))
        .arg(&lb)
        .env("LB_BIN", &lb)
        .status()
        .context("running lb-demo")?;
    if !status.success() {
        bail!("the demo failed ({status})");
    }
    Ok(())
}

/// The L7 suites `cargo xtask test` runs a second time on the lean HTTP/1.1 path.
const LEAN_SUITES: &[&str] = &[
    "l7_access_log",
    "l7_algorithms",
    "l7_desync",
    "l7_headers",
    "l7_http2_abuse",
    "l7_http2_native",
    "l7_lifecycle",
    "l7_limits",
    "l7_rules",
    "l7_stale_keepalive",
    "l7_status",
    "l7_tls",
];

fn test(root: &Path, no_lint: bool, filter: Option<&str>) -> anyhow::Result<()> {
    require_root("the test suite (XDP and namespace tests)")?;
    let lb = target_dir(root).join("debug/lb");
    let with_filter = |base: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        if let Some(f) = filter {
            v.push("--".into());
            v.push(f.into());
        }
        v
    };
    cargo(&["build", "-p", "lb-userspace", "--bin", "lb"])?;
    // Unit tests, L7 tests on loopback and BPF_PROG_TEST_RUN tests: each test isolates itself
    // (ephemeral ports, private network namespaces), so they run in parallel.
    // lb-ebpf builds only for the BPF target (the default members leave it out).
    let args = with_filter(&[
        "test",
        "-p",
        "lb-common",
        "-p",
        "lb-userspace",
        "-p",
        "xtask",
    ]);
    cargo_env(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("LB_BIN", &lb)],
    )?;
    // The L7 suites once more with their plain HTTP listeners on the lean HTTP/1.1 path
    // (`LB_TEST_HTTP1=lean`, tests/support): what they check of the native path's behaviour
    // must hold there too, served by the lean loop or by the native path it hands over to.
    // Left out: the suites that count the native path's requests or check the default worker
    // layout (l7_http1_native, l7_workers), and those that build their listeners otherwise.
    let mut args = vec!["test".to_string(), "-p".into(), "lb-userspace".into()];
    for suite in LEAN_SUITES {
        args.push("--test".into());
        args.push((*suite).into());
    }
    if let Some(f) = filter {
        args.push("--".into());
        args.push(f.into());
    }
    cargo_env(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("LB_BIN", &lb), ("LB_TEST_HTTP1", Path::new("lean"))],
    )?;
    // Namespace topologies with real traffic: one at a time (2 cores; timing-sensitive traffic).
    let mut args = vec![
        "test".to_string(),
        "-p".into(),
        "lb-tests".into(),
        "--".into(),
        "--test-threads=1".into(),
    ];
    if let Some(f) = filter {
        args.push(f.into());
    }
    cargo_env(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("LB_BIN", &lb)],
    )?;
    if !no_lint {
        cargo(&["fmt", "--all", "--check"])?;
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
        // lb-ebpf only builds for the BPF target: lint it there, with the toolchain that builds it.
        let bpf_lint_dir = target_dir(root).join("bpf-clippy");
        let args = [
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "lb-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ];
        eprintln!("xtask: rustup {} … -- -D warnings", args.join(" "));
        let status = Command::new("rustup")
            .args(args)
            .arg(&bpf_lint_dir)
            .args(["--", "-D", "warnings"])
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .status()
            .context("running clippy on lb-ebpf")?;
        if !status.success() {
            bail!("clippy on lb-ebpf failed ({status})");
        }
    }
    eprintln!("xtask: all tests passed");
    Ok(())
}

/// The middle value of a suite's rounds; for an even count the mean of the middle two (the
/// L7 suite took the upper one until stop 29, so its 4-round medians leaned high).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![0.95, 1.06, 1.06, 0.82]), 1.005);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0]), 4.0);
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["cargo xtask"].iter().chain(args))
    }

    #[test]
    fn pgo_is_a_flag_of_build_run_and_bench_l7() {
        assert!(matches!(
            parse(&["build"]).unwrap().command,
            Cmd::Build { pgo: false }
        ));
        assert!(matches!(
            parse(&["build", "--pgo"]).unwrap().command,
            Cmd::Build { pgo: true }
        ));
        match parse(&[
            "run",
            "--pgo",
            "--",
            "--listener",
            "web=http://127.0.0.1:80",
        ])
        .unwrap()
        .command
        {
            Cmd::Run { pgo, flags } => {
                assert!(pgo);
                assert_eq!(flags, ["--listener", "web=http://127.0.0.1:80"]);
            }
            _ => panic!("not run"),
        }
        match parse(&["bench", "l7", "--pgo", "--only", "h1,h2"])
            .unwrap()
            .command
        {
            Cmd::Bench {
                which: Bench::L7 { pgo, only, .. },
            } => {
                assert!(pgo);
                assert_eq!(only.as_deref(), Some("h1,h2"));
            }
            _ => panic!("not bench l7"),
        }
    }

    #[test]
    fn pgo_elsewhere_is_an_error_naming_the_flag() {
        // Positive control: the same subcommands parse without it.
        assert!(parse(&["bench", "l4"]).is_ok());
        assert!(parse(&["test"]).is_ok());
        for args in [
            &["bench", "l4", "--pgo"][..],
            &["test", "--pgo"],
            &["build", "--pgo=yes"],
        ] {
            let e = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} parsed"));
            assert!(e.to_string().contains("--pgo"), "{args:?}: {e}");
        }
    }

    #[test]
    fn pgo_means_the_bolted_binary_and_the_pgo_only_one_is_not_lost() {
        let built = pgo::Built {
            pgo: PathBuf::from("/w/target/pgo/use/x86_64-unknown-linux-gnu/release/lb"),
            bolt: PathBuf::from("/w/target/pgo/bolt/lb"),
        };
        assert_ne!(built.pgo, built.bolt);
        assert_eq!(pgo_choice(built), Path::new("/w/target/pgo/bolt/lb"));
    }

    #[test]
    fn run_pgo_without_lb_flags_is_refused() {
        let mode = |args: &[&str]| {
            let Cmd::Run { pgo, flags } = parse(args).unwrap().command else {
                panic!("not run");
            };
            run_mode(pgo, &flags)
        };
        assert_eq!(mode(&["run"]).unwrap(), RunMode::Demo);
        assert_eq!(
            mode(&["run", "--", "--listener", "a=http://127.0.0.1:1"]).unwrap(),
            RunMode::Lb { pgo: false }
        );
        assert_eq!(
            mode(&["run", "--pgo", "--", "--listener", "a=http://127.0.0.1:1"]).unwrap(),
            RunMode::Lb { pgo: true }
        );
        // The demo has no PGO variant: `run --pgo` alone must not silently start it.
        let e = mode(&["run", "--pgo"]).unwrap_err();
        assert!(e.to_string().starts_with("--pgo "), "{e}");
    }
}
