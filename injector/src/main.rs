//! `mesh-injector`: the mutating admission webhook that injects the sidecar.

use clap::Parser;

/// The mesh's mutating admission webhook: injects the sidecar into pods of meshed namespaces.
#[derive(Debug, Parser)]
#[command(name = "mesh-injector", version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("the injector is not built yet (issue: sidecar injection)")
}
