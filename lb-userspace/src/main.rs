//! The `lb` binary: parses flags and dispatches; everything else lives in the library.
use std::process::ExitCode;

use clap::Parser as _;
use lb::cli::{Cli, Command};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => {
            raise_open_files_limit();
            runtime().and_then(|rt| rt.block_on(lb::daemon::run(a)))
        }
        Command::Decap(a) => runtime().and_then(|rt| rt.block_on(lb::daemon::decap(a))),
        Command::Stats(a) => lb::inspect::stats(&a),
        Command::Dump(a) => lb::inspect::dump(&a),
        Command::Targets(a) => lb::ctl::targets(a),
        Command::Groups(a) => lb::ctl::groups(a),
        Command::Listeners(a) => lb::ctl::listeners(a),
        Command::Rules(a) => lb::ctl::rules(a),
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
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
