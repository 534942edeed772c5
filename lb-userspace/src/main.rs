//! The `lb` binary: parses flags and dispatches; everything else lives in the library.
use std::process::ExitCode;

use clap::Parser as _;
use lb::cli::{Cli, Command, LogFormat};

mod lifo;

#[global_allocator]
static ALLOC: lifo::Lifo = lifo::Lifo;

fn main() -> ExitCode {
    // The bench-only placement knob (`LB_PLACEMENT`, see `lb::proxy::server::parse_placement`):
    // read first, so its blocks are the first the main thread leaks.
    let var = lb::proxy::server::PLACEMENT_VAR;
    let value = std::env::var_os(var).map(|v| v.to_string_lossy().into_owned());
    match lb::proxy::server::parse_placement(value.as_deref()) {
        Ok(0) => {}
        Ok(n) => {
            lb::proxy::server::set_placement(n);
            lb::proxy::server::leak_placement_blocks(n);
        }
        Err(e) => {
            eprintln!("lb: {e}");
            return ExitCode::from(2);
        }
    }
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(a) => {
            raise_open_files_limit();
            // With per-worker L7 runtimes the main runtime runs only the control side (health
            // checks, admin API, metrics, map writers): one thread of its own is enough, and
            // the workers get the CPUs.
            let main_threads = match a.l7_runtime {
                lb::cli::L7RuntimeArg::PerWorker => Some(1),
                lb::cli::L7RuntimeArg::Shared => None,
            };
            runtime_with(main_threads).and_then(|rt| rt.block_on(lb::daemon::run(a)))
        }
        Command::Decap(a) => runtime().and_then(|rt| rt.block_on(lb::daemon::decap(a))),
        Command::Stats(a) => lb::stats::run(&a),
        Command::Dump(a) => lb::inspect::dump(&a),
        Command::Targets(a) => lb::ctl::targets(a),
        Command::Groups(a) => lb::ctl::groups(a),
        Command::Listeners(a) => lb::ctl::listeners(a),
        Command::Rules(a) => lb::ctl::rules(a),
        Command::Vips(a) => lb::ctl::vips(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Configuration errors list every problem on their own lines.
            if let Some(c) = e.downcast_ref::<lb::config::ConfigErrors>() {
                eprint!("lb: {c}");
                return ExitCode::from(2);
            }
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lb`'s own log on stderr: `LB_LOG` filters (default [`lb::cli::DEFAULT_LOG_FILTER`]);
/// colours only when stderr is a terminal; `--log-format json` for log shippers.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("LB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(lb::cli::DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// `lb run` holds a descriptor per connection: raise the soft open-files limit to the hard one
/// and say what it is (see `lb::rlimit`).
fn raise_open_files_limit() {
    match lb::rlimit::raise_open_files_limit() {
        Ok(l) if l.soft > l.previous_soft => tracing::info!(
            "open files limit raised from {} to {} (the hard limit)",
            l.previous_soft,
            l.soft
        ),
        Ok(l) => tracing::info!("open files limit {} (the hard limit)", l.soft),
        Err(e) => tracing::warn!("could not raise the open files limit: {e}"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// A multi-thread runtime with `threads` workers (`None`: tokio's default, one per CPU or
/// `TOKIO_WORKER_THREADS`).
fn runtime_with(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    // `LB_PLACEMENT` (bench-only): the shared runtime's threads run the L7 request path by
    // default, so they get the placement too. A stack `n` × 64 bytes longer than std's 2 MiB
    // default puts its top, and the thread's TLS block glibc keeps there, `n` lines further
    // into their page; the leaked blocks move the thread's small heap blocks.
    let placement = lb::proxy::server::placement();
    if placement > 0 {
        builder
            .thread_stack_size((2 << 20) + usize::from(placement) * 64)
            .on_thread_start(move || lb::proxy::server::leak_placement_blocks(placement));
    }
    Ok(builder.enable_all().build()?)
}

/// Backs `lb`'s heap with normal 4 KiB pages unless `MIMALLOC_ALLOW_THP` is set. mimalloc
/// marks its 1 GiB arena for transparent huge pages, so the kernel maps it 2 MiB at a time:
/// `lb`'s heap of 2–4 MB was counted as 9–15 MB resident, and the resident figure moved in
/// 2 MiB steps; without huge pages the CPU per request was no higher (BENCHMARKS.md,
/// "Resident memory: mimalloc's huge pages (stop 28)").
///
/// Run from `.preinit_array`, before any constructor (mimalloc's own included) and before
/// `main`: pages faulted before the call keep their size, and from `main` two huge pages were
/// already in. Nothing here allocates; the environment is read from the `envp` the loader
/// passes (`getenv` does not see it yet at this point). A kernel without the call leaves
/// things as they were.
///
/// This is the `prctl` mimalloc makes itself at start when its `allow_thp` option is off;
/// that option's default can only be changed by the environment variable or a C define the
/// `mimalloc` crate does not expose. Its `no_thp` feature only drops the `MADV_HUGEPAGE`
/// advice: a kernel in THP mode `always` would still map the arena in huge pages, and
/// `MIMALLOC_ALLOW_THP=1` could no longer bring them back.
extern "C" fn small_pages_for_the_heap(
    _argc: libc::c_int,
    _argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) {
    const NAME: &[u8] = b"MIMALLOC_ALLOW_THP=";
    // SAFETY: glibc calls `.preinit_array` functions with the process's `envp`: NULL or a
    // NULL-terminated array of NUL-terminated strings, alive for the whole process.
    // PR_SET_THP_DISABLE takes plain integers and changes only this process's page-size
    // policy for memory it faults in from now on.
    unsafe {
        let mut at = envp;
        while !at.is_null() && !(*at).is_null() {
            if std::ffi::CStr::from_ptr(*at).to_bytes().starts_with(NAME) {
                return;
            }
            at = at.add(1);
        }
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[used]
#[unsafe(link_section = ".preinit_array")]
static SMALL_PAGES: extern "C" fn(
    libc::c_int,
    *const *const libc::c_char,
    *const *const libc::c_char,
) = small_pages_for_the_heap;
