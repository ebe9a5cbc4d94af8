//! `meshctl`: the mesh's command line. Each subcommand lives in its own module; this file only
//! parses arguments and dispatches.

use clap::{Parser, Subcommand};

mod demo;
mod demo_app;
mod inject;
mod local;

/// The mesh's command line: install and check the mesh, mesh workloads, watch their traffic,
/// and run the whole mesh on this machine.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every command honours.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalArgs {
    /// Path to the kubeconfig file.
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace to act in.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version of meshctl.
    Version,
    /// Run Kubernetes YAML on this machine as local pods with the mesh (up, status, logs, down).
    Local(local::LocalArgs),
    /// Run one service of the demo app (what `meshctl demo`'s pods run).
    #[command(name = "demo-app", hide = true)]
    DemoApp(demo_app::DemoAppArgs),
    /// Add the mesh to every pod and pod template of Kubernetes YAML (FILE or -), to stdout.
    Inject(inject::InjectArgs),
    /// Remove what `meshctl inject` added from Kubernetes YAML (FILE or -), to stdout.
    Uninject(inject::UninjectArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let global = cli.global;
    match cli.command {
        Command::Local(args) => local::run(args, global.namespace.as_deref()),
        Command::DemoApp(args) => demo_app::run(args),
        Command::Inject(args) => inject::run_inject(&args, global.namespace.as_deref()),
        Command::Uninject(args) => inject::run_uninject(&args),
        Command::Version => {
            println!("meshctl {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
