//! `cargo xtask build --pgo`: a profile-guided, fat-LTO release build of `lb`.
//!
//! Three steps, each in its own target directory under `target/pgo/` so a normal
//! `cargo build --release` is never invalidated:
//!
//! 1. build `lb` instrumented (`-Cprofile-generate`), fat LTO, one codegen unit
//!    (`target/pgo/gen`);
//! 2. train it: run the instrumented `lb` behind an nginx backend and put an L7 load through it
//!    (see [`train`]), then merge the raw profiles with `llvm-profdata`
//!    (`target/pgo/lb.profdata`);
//! 3. build `lb` again with `-Cprofile-use` of that profile, same LTO settings, linked with
//!    its relocations kept (`target/pgo/use`): the PGO-only binary;
//! 4. BOLT (LLVM's post-link optimiser, Debian's `bolt-22`): instrument that binary
//!    (`llvm-bolt -instrument`), run the same training through it, merge its profiles
//!    (`merge-fdata`), and lay the binary out again by that profile — blocks within
//!    functions, functions within the text, cold blocks split off (`target/pgo/bolt/lb`).
//!
//! The compiler flags reach only the host build of `lb` and its Rust dependencies: they are
//! given as `--config target.<host>.rustflags=[…]` with an explicit `--target <host>` (as the
//! rustc book's PGO chapter advises), so cargo applies them neither to build scripts and proc
//! macros (which would write profiles of their own while building) nor, through the
//! environment, to the nested cargo that `lb-userspace/build.rs` starts for the BPF object
//! (aya-build replaces that build's rustflags with its own `CARGO_ENCODED_RUSTFLAGS`, but not
//! its profile: a `CARGO_PROFILE_RELEASE_LTO` in our environment would reach it). The LTO
//! settings are `--config profile.release.…` for that reason.
//!
//! rustc lists the `-Cprofile-use` file in every crate's dep-info and cargo checks it (for
//! registry crates too), so a new profile rebuilds every crate of the optimised build.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::bench_l7;

/// Which of the two compiler passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass<'a> {
    /// Instrumented: counters written as raw profiles into this directory.
    Generate(&'a Path),
    /// Optimised with this merged profile.
    Use(&'a Path),
}

/// Environment variables that would defeat the `--config` flags of a PGO build: cargo gives
/// `CARGO_ENCODED_RUSTFLAGS` and `RUSTFLAGS` precedence over `target.<host>.rustflags` (the
/// profile flag would be dropped) and ignores `CARGO_BUILD_RUSTFLAGS` when those are set (the
/// caller's flags would be dropped silently); the release-profile variables are inherited by
/// the BPF build's cargo.
const CONFLICTING_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_PROFILE_RELEASE_LTO",
    "CARGO_PROFILE_RELEASE_CODEGEN_UNITS",
];

/// Refuses an environment in which [`CONFLICTING_ENV`] variables are set.
fn check_env(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> anyhow::Result<()> {
    for var in CONFLICTING_ENV {
        if get(var).is_some() {
            bail!(
                "{var} is set: the PGO build passes its own flags with --config (which {var} \
                 would override or carry into the BPF build); unset it"
            );
        }
    }
    Ok(())
}

/// The `cargo` arguments of one PGO pass: `lb` for `host`, in `target_dir`.
pub fn cargo_args(pass: Pass<'_>, host: &str, target_dir: &Path) -> Vec<String> {
    let flags = match pass {
        Pass::Generate(dir) => vec![format!("-Cprofile-generate={}", dir.display())],
        // The relocations stay in the optimised `lb` so BOLT can move whole functions, not
        // only the blocks inside each (the code is the same; the extra sections are not
        // loaded).
        Pass::Use(profile) => vec![
            format!("-Cprofile-use={}", profile.display()),
            EMIT_RELOCS.to_owned(),
        ],
    };
    let rustflags = flags
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    [
        "build",
        "--release",
        "-p",
        "lb-userspace",
        "--bin",
        "lb",
        "--target",
        host,
        "--target-dir",
        &target_dir.display().to_string(),
        "--config",
        "profile.release.lto=\"fat\"",
        "--config",
        "profile.release.codegen-units=1",
        "--config",
        &format!("target.{host}.rustflags=[{rustflags}]"),
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// The link argument that keeps the relocations in the linked `lb` (`ld -q`): BOLT's
/// relocation mode, which reorders functions, needs them.
const EMIT_RELOCS: &str = "-Clink-arg=-Wl,--emit-relocs";

/// `rustc -vV`: (host triple, LLVM major version).
fn rustc_host_and_llvm() -> anyhow::Result<(String, u32)> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("rustc -vV printed no {name:?} line:\n{text}"))
    };
    let host = field("host:")?.to_owned();
    let llvm = field("LLVM version:")?;
    let major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("rustc's LLVM version {llvm:?}"))?;
    Ok((host, major))
}

/// An `llvm-profdata` that reads the raw profiles rustc's LLVM writes: rustup's `llvm-tools`
/// component (the same LLVM), else Debian's `llvm-N` package for rustc's LLVM major version N.
pub fn llvm_profdata() -> Option<PathBuf> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let (host, major) = rustc_host_and_llvm().ok()?;
    let rustup = sysroot.map(|s| s.join(format!("lib/rustlib/{host}/bin/llvm-profdata")));
    let debian = PathBuf::from(format!("/usr/lib/llvm-{major}/bin/llvm-profdata"));
    rustup.into_iter().chain([debian]).find(|p| p.is_file())
}

/// The two binaries of a PGO build.
#[derive(Debug)]
pub struct Built {
    /// The profile-guided build (`target/pgo/use/<host>/release/lb`).
    pub pgo: PathBuf,
    /// That build laid out again by BOLT (`target/pgo/bolt/lb`).
    pub bolt: PathBuf,
}

/// Builds, trains and rebuilds `lb`, then BOLTs it; returns the paths of both binaries.
pub fn build(target: &Path) -> anyhow::Result<Built> {
    check_env(|var| std::env::var_os(var))?;
    let profdata = llvm_profdata().context(
        "no llvm-profdata matching rustc's LLVM: rustup component add llvm-tools \
         (or install Debian's llvm-N for rustc's LLVM major version N)",
    )?;
    let (host, _) = rustc_host_and_llvm()?;
    // Checked before the (long) compiles, so a missing BOLT fails at once.
    let tools = bolt_tools().with_context(|| {
        format!(
            "no llvm-bolt and merge-fdata in {BOLT_BIN}: the PGO build's last step is BOLT; \
             apt-get install {BOLT_PACKAGE} (cargo xtask prereqs does, as root)"
        )
    })?;
    let dirs = Dirs::under(target);
    let (raw, profile) = (dirs.raw.as_path(), dirs.profile.as_path());
    let (gen_dir, use_dir) = (&dirs.gen_dir, &dirs.use_dir);

    cargo_pass(&cargo_args(Pass::Generate(raw), &host, gen_dir))?;
    let instrumented = gen_dir.join(&host).join("release/lb");
    if newer(profile, &instrumented) {
        // The same instrumented binary would give about the same profile, and a new one
        // rebuilds everything: `lb` is only trained again when it changed.
        eprintln!(
            "xtask: {} is newer than the instrumented lb: using it (delete it to train again)",
            profile.display()
        );
    } else {
        // Old raw profiles would mix a previous build's counters into this one's.
        if raw.exists() {
            std::fs::remove_dir_all(raw).with_context(|| format!("removing {}", raw.display()))?;
        }
        std::fs::create_dir_all(raw).with_context(|| format!("creating {}", raw.display()))?;
        eprintln!(
            "xtask: training {} (about a minute)",
            instrumented.display()
        );
        train(&instrumented, raw)?;
        eprintln!(
            "xtask: {} merge -o {}",
            profdata.display(),
            profile.display()
        );
        let status = Command::new(&profdata)
            .arg("merge")
            .arg("-o")
            .arg(profile)
            .arg(raw)
            .status()
            .with_context(|| format!("running {}", profdata.display()))?;
        ensure!(status.success(), "llvm-profdata merge failed ({status})");
    }

    cargo_pass(&cargo_args(Pass::Use(profile), &host, use_dir))?;
    let optimised = use_dir.join(&host).join("release/lb");
    let bolted = bolt(&tools, &optimised, &dirs)?;
    Ok(Built {
        pgo: optimised,
        bolt: bolted,
    })
}

/// Debian's package of BOLT for LLVM 22, and where it installs its tools.
pub const BOLT_PACKAGE: &str = "bolt-22";
const BOLT_BIN: &str = "/usr/lib/llvm-22/bin";

/// `llvm-bolt` and `merge-fdata`.
#[derive(Debug)]
pub struct BoltTools {
    bolt: PathBuf,
    merge: PathBuf,
}

/// BOLT's tools, if installed.
pub fn bolt_tools() -> Option<BoltTools> {
    let dir = Path::new(BOLT_BIN);
    let tools = BoltTools {
        bolt: dir.join("llvm-bolt"),
        merge: dir.join("merge-fdata"),
    };
    (tools.bolt.is_file() && tools.merge.is_file()).then_some(tools)
}

/// Where an instrumented `lb` writes its profile: `FILE.<pid>.fdata` in the directory given
/// (one file per process: the training runs two).
const FDATA_FILE: &str = "lb";

/// `llvm-bolt` arguments that instrument `input` into `output`; the instrumented binary writes
/// its profile as it exits (BOLT hooks the ELF's fini: `exit`, which a SIGTERM'd `lb` calls,
/// runs it) into `fdata_dir`, one file per process.
fn instrument_args(input: &Path, output: &Path, fdata_dir: &Path) -> Vec<String> {
    vec![
        input.display().to_string(),
        "-instrument".into(),
        format!(
            "-instrumentation-file={}",
            fdata_dir.join(FDATA_FILE).display()
        ),
        "-instrumentation-file-append-pid".into(),
        "-o".into(),
        output.display().to_string(),
    ]
}

/// The layout BOLT applies with the profile (options checked against BOLT 22).
const BOLT_LAYOUT: &[&str] = &[
    // Blocks within a function: the extended-TSP order (fall-throughs along hot paths).
    "-reorder-blocks=ext-tsp",
    // Functions: callers beside callees, hot ones together (needs the relocations).
    "-reorder-functions=cdsort",
    // Cold blocks out of hot functions, into a cold fragment far away.
    "-split-functions",
    "-split-all-cold",
    // Identical functions folded (generic code monomorphised more than once).
    "-icf=all",
    // The rewritten text's new segment takes GNU_STACK's program header: no new header.
    "-use-gnu-stack",
    // Prints the profile's executed instructions, taken branches etc. before and after.
    "-dyno-stats",
];

/// `llvm-bolt` arguments that lay `input` out by `profile` into `output`.
fn optimize_args(input: &Path, profile: &Path, output: &Path) -> Vec<String> {
    let mut args = vec![
        input.display().to_string(),
        format!("-data={}", profile.display()),
        "-o".into(),
        output.display().to_string(),
    ];
    args.extend(BOLT_LAYOUT.iter().map(|&a| a.to_owned()));
    args
}

/// Instruments `optimised`, trains it, merges its profiles and lays it out again; returns the
/// BOLTed binary. The training is skipped when the merged profile is newer than `optimised`
/// (as the PGO step does with its own profile); the layout is always redone (seconds).
fn bolt(tools: &BoltTools, optimised: &Path, dirs: &Dirs) -> anyhow::Result<PathBuf> {
    let run = |args: &[String], what: &str| -> anyhow::Result<()> {
        eprintln!("xtask: {} {}", tools.bolt.display(), args.join(" "));
        let status = Command::new(&tools.bolt)
            .args(args)
            .status()
            .with_context(|| format!("running {}", tools.bolt.display()))?;
        ensure!(status.success(), "llvm-bolt ({what}) failed ({status})");
        Ok(())
    };
    std::fs::create_dir_all(&dirs.bolt_dir)
        .with_context(|| format!("creating {}", dirs.bolt_dir.display()))?;
    if newer(&dirs.bolt_profile, optimised) {
        eprintln!(
            "xtask: {} is newer than {}: using it (delete it to train again)",
            dirs.bolt_profile.display(),
            optimised.display()
        );
    } else {
        let fdata = &dirs.fdata_dir;
        if fdata.exists() {
            std::fs::remove_dir_all(fdata)
                .with_context(|| format!("removing {}", fdata.display()))?;
        }
        std::fs::create_dir_all(fdata).with_context(|| format!("creating {}", fdata.display()))?;
        run(
            &instrument_args(optimised, &dirs.instrumented, fdata),
            "instrument",
        )?;
        eprintln!(
            "xtask: training {} (about a minute)",
            dirs.instrumented.display()
        );
        train(&dirs.instrumented, fdata)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(fdata)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.sort();
        eprintln!(
            "xtask: {} -o {} ({} profiles)",
            tools.merge.display(),
            dirs.bolt_profile.display(),
            files.len()
        );
        let status = Command::new(&tools.merge)
            .arg("-o")
            .arg(&dirs.bolt_profile)
            .args(&files)
            .status()
            .with_context(|| format!("running {}", tools.merge.display()))?;
        ensure!(status.success(), "merge-fdata failed ({status})");
    }
    run(
        &optimize_args(optimised, &dirs.bolt_profile, &dirs.bolted),
        "layout",
    )?;
    Ok(dirs.bolted.clone())
}

/// Where the PGO build keeps its files, all under `target/pgo/`.
#[derive(Debug)]
struct Dirs {
    /// The instrumented `lb`'s raw profiles.
    raw: PathBuf,
    /// Their merge, the optimised pass's input.
    profile: PathBuf,
    /// The instrumented pass's target directory.
    gen_dir: PathBuf,
    /// The optimised pass's target directory.
    use_dir: PathBuf,
    /// BOLT's files: the instrumented binary, its profiles, their merge, the BOLTed binary.
    bolt_dir: PathBuf,
    instrumented: PathBuf,
    fdata_dir: PathBuf,
    bolt_profile: PathBuf,
    bolted: PathBuf,
}

impl Dirs {
    /// The directories of a PGO build in the workspace target directory `target`.
    fn under(target: &Path) -> Dirs {
        let pgo = target.join("pgo");
        let bolt = pgo.join("bolt");
        Dirs {
            raw: pgo.join("profraw"),
            profile: pgo.join("lb.profdata"),
            gen_dir: pgo.join("gen"),
            use_dir: pgo.join("use"),
            instrumented: bolt.join("lb.instrumented"),
            fdata_dir: bolt.join("fdata"),
            bolt_profile: bolt.join("lb.fdata"),
            bolted: bolt.join("lb"),
            bolt_dir: bolt,
        }
    }
}

/// Whether `a` exists and was modified after `b`.
fn newer(a: &Path, b: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (modified(a), modified(b)) {
        (Some(a), Some(b)) => a > b,
        _ => false,
    }
}

fn cargo_pass(args: &[String]) -> anyhow::Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    crate::cargo(&args)
}

/// Where the training's `lb` listens (away from the benchmark's ports).
const HTTP: u16 = 18091;
const HTTPS: u16 = 18451;

/// The training load, about a minute: what the L7 tier does in production, not only the
/// benchmark's two loads.
///
/// One `lb` with two listeners (HTTP and HTTPS), two target groups on the nginx backend
/// (`be`: round robin; `api`: least outstanding requests with `lb_cookie` stickiness), HTTP
/// health checks of both every second, and path, header and weighted-forward rules beside the
/// defaults. Through it, one after another:
///
/// - HTTP/1.1 keep-alive, `wrk -c64`: 12 s on `/` (default rule), 4 s on `/api/…` (path rule);
/// - HTTP/2 over TLS, `h2load -c32 -m10`: 12 s on `/` and `/api/…` alternating;
/// - HTTP/1.1 keep-alive over TLS, `wrk -c16`: 4 s;
/// - full TLS handshakes, one HTTP/1.0 request each: 8 `openssl s_time -new` clients, 8 s;
/// - resumed TLS connections, one request each (`wrk -c32`, `Connection: close`): 6 s;
///
/// then a second `lb` with the same configuration and the access log on: HTTP/1.1 keep-alive
/// 5 s; then a third with the per-worker runtime and its HTTP listener on the lean path
/// (`http1=lean`): HTTP/1.1 keep-alive 8 s on `/` (the lean loop) and 2 s on `/api/…` (a
/// sticky group: handed to the native path). Each `lb` is stopped with SIGTERM, so its
/// profile is written as it exits.
///
/// On a machine whose benchmarks are serialised with `flock FILE`, `XTASK_LOAD_LOCK=FILE` makes
/// the training hold that lock while it loads the machine (it waits for its turn).
pub fn train(lb: &Path, raw: &Path) -> anyhow::Result<()> {
    let _lock = std::env::var_os("XTASK_LOAD_LOCK")
        .map(|f| LoadLock::take(Path::new(&f)))
        .transpose()?;
    let dir = std::env::temp_dir().join(format!("lb-pgo-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = bench_l7::RemoveDir(dir.clone());
    bench_l7::ensure_tools()?;
    let certs = bench_l7::certificate(&dir)?;
    let _backend = bench_l7::nginx_backend(&dir)?;
    let http = format!("http://127.0.0.1:{HTTP}");
    let https = format!("https://127.0.0.1:{HTTPS}");
    let step = |what: &str, r: anyhow::Result<bench_l7::Sample>| -> anyhow::Result<()> {
        let s = r.with_context(|| format!("training: {what}"))?;
        eprintln!(
            "xtask: training: {what}: {:.0} req/s, {} errors",
            s.rps, s.errors
        );
        ensure!(s.errors == 0, "training: {what}: {} errors", s.errors);
        Ok(())
    };

    let lb_run = start(lb, raw, &dir, &certs, Variant::Plain)?;
    step(
        "h1 /",
        bench_l7::run_wrk(&format!("{http}/"), 64, 12, false),
    )?;
    step(
        "h1 /api",
        bench_l7::run_wrk(&format!("{http}/api/v1/items?id=7"), 64, 4, false),
    )?;
    step(
        "h2 over TLS",
        bench_l7::run_h2load_urls(
            &[&format!("{https}/"), &format!("{https}/api/v1/items")],
            12,
        ),
    )?;
    step(
        "h1 over TLS",
        bench_l7::run_wrk(&format!("{https}/"), 16, 4, false),
    )?;
    step("full handshakes", bench_l7::run_s_time(HTTPS, 8, 8))?;
    step(
        "resumed handshakes",
        bench_l7::run_wrk(&format!("{https}/"), 32, 6, true),
    )?;
    stop(lb_run, raw)?;

    let lb_log = start(lb, raw, &dir, &certs, Variant::AccessLog)?;
    step(
        "h1 / with the access log",
        bench_l7::run_wrk(&format!("{http}/"), 64, 5, false),
    )?;
    stop(lb_log, raw)?;

    let lb_lean = start(lb, raw, &dir, &certs, Variant::Lean)?;
    step(
        "h1 / on the lean path",
        bench_l7::run_wrk(&format!("{http}/"), 64, 8, false),
    )?;
    step(
        "h1 /api handed from the lean path",
        bench_l7::run_wrk(&format!("{http}/api/v1/items?id=7"), 16, 2, false),
    )?;
    stop(lb_lean, raw)?;
    Ok(())
}

/// Which training `lb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The default configuration.
    Plain,
    /// With the access log.
    AccessLog,
    /// The per-worker runtime with the HTTP listener on the lean path.
    Lean,
}

/// An exclusive `flock(2)` on a file, held until dropped (the lock `flock FILE cmd` takes).
struct LoadLock(std::fs::File);

impl LoadLock {
    fn take(path: &Path) -> anyhow::Result<LoadLock> {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("XTASK_LOAD_LOCK: opening {}", path.display()))?;
        eprintln!("xtask: waiting for the lock on {}", path.display());
        // SAFETY: flock(2) on a descriptor we own; blocks until the lock is ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        ensure!(
            rc == 0,
            "XTASK_LOAD_LOCK: flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Ok(LoadLock(file))
    }
}

impl Drop for LoadLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: unlocking our own descriptor (closing it would unlock it too).
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn start(
    lb: &Path,
    raw: &Path,
    dir: &Path,
    (cert, key, _): &(PathBuf, PathBuf, PathBuf),
    variant: Variant,
) -> anyhow::Result<bench_l7::Running> {
    let backend = bench_l7::BACKEND;
    let mut args: Vec<String> = vec![
        "run".into(),
        "--listener".into(),
        format!(
            "web=http://127.0.0.1:{HTTP}{}",
            if variant == Variant::Lean {
                ",http1=lean"
            } else {
                ""
            }
        ),
        "--listener".into(),
        format!(
            "tls=https://127.0.0.1:{HTTPS},cert={}:{}",
            cert.display(),
            key.display()
        ),
        "--target-group".into(),
        "be,health-check-interval=1,health-check-timeout=0.5".into(),
        "--target-group".into(),
        "api,algorithm=least_outstanding_requests,stickiness=lb_cookie:3600,\
         health-check-interval=1,health-check-timeout=0.5"
            .into(),
        "--target".into(),
        format!("be={backend}"),
        "--target".into(),
        format!("api={backend}"),
        "--rule".into(),
        "web,priority=10,path=/api/*,forward=api".into(),
        "--rule".into(),
        "web,priority=20,header=X-Canary:1,forward=be:1|api:1".into(),
        "--rule".into(),
        "web,default,forward=be".into(),
        "--rule".into(),
        "tls,priority=10,path=/api/*,forward=api".into(),
        "--rule".into(),
        "tls,default,forward=be".into(),
        "--admin-socket".into(),
        dir.join(format!("train-{variant:?}.sock"))
            .display()
            .to_string(),
    ];
    match variant {
        Variant::Plain => {}
        Variant::AccessLog => {
            args.push("--access-log".into());
            args.push(dir.join("access.log").display().to_string());
        }
        Variant::Lean => {
            args.push("--l7-runtime".into());
            args.push("per-worker".into());
        }
    }
    let r = bench_l7::spawn(
        "the instrumented lb",
        Command::new(lb)
            .args(&args)
            // The runtime's own file name pattern: one file per process and binary.
            .env("LLVM_PROFILE_FILE", raw.join("lb-%p-%m.profraw")),
        &dir.join(format!("lb-train-{variant:?}.log")),
    )?;
    bench_l7::wait_port(HTTP)?;
    bench_l7::wait_port(HTTPS)?;
    // The first health checks (within a second of the start) bring the targets in service.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = bench_l7::run_wrk(&format!("http://127.0.0.1:{HTTP}/api/"), 1, 1, false)?;
        if s.errors == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "training: the targets are not in service 30 s after the start (see {})",
            dir.display()
        );
    }
    Ok(r)
}

/// Stops one training `lb` with SIGTERM and checks that it wrote its profile.
fn stop(lb: bench_l7::Running, raw: &Path) -> anyhow::Result<()> {
    let count = || std::fs::read_dir(raw).map_or(0, |d| d.count());
    let before = count();
    let status = lb.terminate(Duration::from_secs(60))?;
    ensure!(status.success(), "the instrumented lb exited with {status}");
    ensure!(
        count() > before,
        "the instrumented lb wrote no profile into {}",
        raw.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "x86_64-unknown-linux-gnu";

    fn config_values(args: &[String]) -> Vec<&str> {
        args.windows(2)
            .filter(|w| w[0] == "--config")
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn profile_flags_go_to_the_host_target_only() {
        let raw = Path::new("/t/pgo/profraw");
        let profile = Path::new("/t/pgo/lb.profdata");
        for (pass, flag) in [
            (Pass::Generate(raw), "-Cprofile-generate=/t/pgo/profraw"),
            (Pass::Use(profile), "-Cprofile-use=/t/pgo/lb.profdata"),
        ] {
            let args = cargo_args(pass, HOST, Path::new("/t/pgo/x"));
            // An explicit --target: cargo then applies target rustflags to neither build
            // scripts nor proc macros.
            let t = args.iter().position(|a| a == "--target").expect("--target");
            assert_eq!(args[t + 1], HOST);
            let configs = config_values(&args);
            // The optimised pass is linked with its relocations, for BOLT's function
            // reordering; the instrumented pass (never BOLTed) is not.
            let rustflags = match pass {
                Pass::Generate(_) => format!("[\"{flag}\"]"),
                Pass::Use(_) => format!("[\"{flag}\", \"-Clink-arg=-Wl,--emit-relocs\"]"),
            };
            assert!(
                configs.contains(&format!("target.{HOST}.rustflags={rustflags}").as_str()),
                "{configs:?}"
            );
            // The flag appears in that one place and nowhere else on the command line.
            let mentions = args.iter().filter(|a| a.contains("profile-")).count();
            assert_eq!(mentions, 1, "{args:?}");
            assert!(configs.contains(&"profile.release.lto=\"fat\""));
            assert!(configs.contains(&"profile.release.codegen-units=1"));
        }
    }

    #[test]
    fn each_pass_has_its_own_target_dir() {
        // The directories `build` actually uses: the two passes' target directories differ
        // from each other and from the normal build's (`target`, whose release build is in
        // `target/release`), and none holds another, so neither pass's cargo overwrites (or
        // invalidates the fingerprints of) the other pass's build or the normal release build.
        let target = Path::new("/w/target");
        let d = Dirs::under(target);
        let release = target.join("release");
        let dirs = [&release, &d.gen_dir, &d.use_dir];
        for (i, a) in dirs.iter().enumerate() {
            for b in &dirs[i + 1..] {
                assert!(
                    !a.starts_with(b) && !b.starts_with(a),
                    "{} and {} overlap",
                    a.display(),
                    b.display()
                );
            }
        }
        assert!(d.gen_dir != target && d.use_dir != target);
        // And cargo is given those directories, one per pass.
        let dir = |args: &[String]| {
            let i = args.iter().position(|a| a == "--target-dir").unwrap();
            PathBuf::from(&args[i + 1])
        };
        let gen_args = cargo_args(Pass::Generate(&d.raw), HOST, &d.gen_dir);
        let use_args = cargo_args(Pass::Use(&d.profile), HOST, &d.use_dir);
        assert_eq!(dir(&gen_args), d.gen_dir);
        assert_eq!(dir(&use_args), d.use_dir);
        // The raw profiles and the merged profile are outside both passes' target directories
        // (a `cargo clean` of one pass keeps the profile); so are BOLT's files, which no cargo
        // run may overwrite, and which leave the PGO-only binary in place.
        for p in [
            &d.raw,
            &d.profile,
            &d.bolt_dir,
            &d.instrumented,
            &d.fdata_dir,
            &d.bolt_profile,
            &d.bolted,
        ] {
            assert!(
                !p.starts_with(&d.gen_dir) && !p.starts_with(&d.use_dir),
                "{p:?}"
            );
        }
    }

    /// The value of `-name=value` in `args`.
    fn option<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
        args.iter()
            .find_map(|a| a.strip_prefix(name)?.strip_prefix('='))
    }

    /// The argument after `-o`.
    fn output(args: &[String]) -> &str {
        let o = args.iter().position(|a| a == "-o").expect("-o");
        &args[o + 1]
    }

    #[test]
    fn bolt_instruments_the_pgo_binary_into_a_profile_per_process() {
        let d = Dirs::under(Path::new("/w/target"));
        let optimised = d.use_dir.join(HOST).join("release/lb");
        let args = instrument_args(&optimised, &d.instrumented, &d.fdata_dir);
        // The input is the PGO-only binary, which stays as it is: the output is elsewhere.
        assert_eq!(args[0], optimised.display().to_string());
        assert_eq!(output(&args), d.instrumented.display().to_string());
        assert_ne!(d.instrumented, optimised);
        assert!(args.iter().any(|a| a == "-instrument"), "{args:?}");
        // The profile goes into the directory `train` checks after each `lb` and merges from,
        // one file per process: the training's two `lb`s would overwrite each other's
        // otherwise.
        let file = Path::new(option(&args, "-instrumentation-file").expect("a profile file"));
        assert_eq!(file.parent(), Some(d.fdata_dir.as_path()), "{args:?}");
        assert!(
            args.iter().any(|a| a == "-instrumentation-file-append-pid"),
            "{args:?}"
        );
    }

    #[test]
    fn bolt_lays_out_blocks_and_functions_by_the_merged_profile() {
        let d = Dirs::under(Path::new("/w/target"));
        let optimised = d.use_dir.join(HOST).join("release/lb");
        let args = optimize_args(&optimised, &d.bolt_profile, &d.bolted);
        assert_eq!(args[0], optimised.display().to_string());
        assert_eq!(output(&args), d.bolted.display().to_string());
        assert_ne!(d.bolted, optimised);
        assert_eq!(
            option(&args, "-data"),
            Some(d.bolt_profile.display().to_string().as_str())
        );
        // Functions are reordered (what the relocations are kept for), blocks too, and cold
        // blocks split off: the instruction-cache layout this step is for.
        let reorder = option(&args, "-reorder-functions").expect("-reorder-functions");
        assert_ne!(reorder, "none");
        assert_eq!(option(&args, "-reorder-blocks"), Some("ext-tsp"));
        assert!(args.iter().any(|a| a == "-split-functions"), "{args:?}");
        // Never instrumented: this is the binary that is run.
        assert!(
            !args.iter().any(|a| a.starts_with("-instrument")),
            "{args:?}"
        );
    }

    #[test]
    fn an_environment_that_would_leak_into_the_bpf_build_is_refused() {
        // Positive control: nothing set, nothing refused.
        check_env(|_| None).expect("an empty environment");
        // cargo_pass adds no environment of its own, so the caller's environment is the only
        // way flags could reach aya-build's nested cargo: each variable cargo reads for
        // rustflags or the release profile's LTO settings is refused, by name.
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_BUILD_RUSTFLAGS",
            "CARGO_PROFILE_RELEASE_LTO",
            "CARGO_PROFILE_RELEASE_CODEGEN_UNITS",
        ] {
            let e = check_env(|v| (v == var).then(|| "-Cfoo".into())).expect_err(var);
            assert!(e.to_string().starts_with(&format!("{var} is set")), "{e}");
        }
    }

    #[test]
    fn the_load_lock_is_held_until_dropped() {
        use std::os::fd::AsRawFd as _;
        let path = std::env::temp_dir().join(format!("xtask-load-lock-{}", std::process::id()));
        let try_lock = || {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: flock(2) on our own descriptor, non-blocking.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            rc == 0
        };
        let lock = LoadLock::take(&path).unwrap();
        assert!(
            !try_lock(),
            "a second lock was granted while the first is held"
        );
        drop(lock);
        // Positive control: the same attempt succeeds once it is released.
        assert!(try_lock(), "the lock was not released");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_profile_is_reused_only_when_newer_than_the_instrumented_lb() {
        use std::time::SystemTime;
        let dir = std::env::temp_dir().join(format!("xtask-newer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (profile, lb) = (dir.join("lb.profdata"), dir.join("lb"));
        let at = |p: &Path, secs: u64| {
            let f = std::fs::File::create(p).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                .unwrap();
        };
        at(&lb, 2_000_000_000);
        assert!(!newer(&profile, &lb), "no profile yet");
        at(&profile, 1_000_000_000);
        assert!(!newer(&profile, &lb), "profile older than the binary");
        at(&profile, 2_000_000_001);
        assert!(newer(&profile, &lb), "profile newer than the binary");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
