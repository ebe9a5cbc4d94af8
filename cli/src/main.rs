//! `meshctl`: the mesh's command line.

use clap::Parser;

/// The mesh's command line.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    Ok(())
}
