//! `mesh-proxy`: runs the sidecar proxy, configured from `MESH_PROXY_*` environment variables.

use clap::Parser;

/// The mesh's sidecar proxy. With no subcommand it runs the proxy, configured from
/// `MESH_PROXY_*` environment variables.
#[derive(Debug, Parser)]
#[command(name = "mesh-proxy", version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("the proxy is not built yet (issue: mesh-proxy data plane)")
}
