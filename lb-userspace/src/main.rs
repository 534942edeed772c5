use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let cli = lb::cli::Cli::parse();
    println!("{cli:?}");
    Ok(())
}
