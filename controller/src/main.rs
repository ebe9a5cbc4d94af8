//! `mesh-controller`: the mesh's control plane.

use clap::Parser;

/// The mesh's control plane: discovery, identity, policy and observability over gRPC.
#[derive(Debug, Parser)]
#[command(name = "mesh-controller", version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("the controller is not built yet (issue: mesh-controller discovery)")
}
