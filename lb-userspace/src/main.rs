//! The `lb` binary: parses flags and dispatches; everything else lives in the library.
use std::process::ExitCode;

use clap::Parser as _;
use lb::cli::{Cli, Command, LogFormat};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
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
    Ok(builder.enable_all().build()?)
}
