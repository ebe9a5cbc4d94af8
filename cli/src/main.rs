//! `meshctl`: the mesh's command line. Each subcommand lives in its own module; this file only
//! parses arguments and dispatches.

use clap::{CommandFactory as _, Parser, Subcommand};

mod check;
mod controller;
mod dashboard;
mod demo;
mod demo_app;
mod external;
mod identity;
mod inject;
mod install;
mod kubernetes;
mod local;
mod multicluster;
mod observability;
mod output;
mod stat;
mod tap;

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
    /// Every namespace (what stat, edges, tap, top, dashboard and check --proxy do without -n).
    #[arg(short = 'A', long, global = true, conflicts_with = "namespace")]
    pub all_namespaces: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version of meshctl.
    Version,
    /// Print a shell completion script: `source <(meshctl completion bash)`, or for zsh
    /// `meshctl completion zsh > "${fpath[1]}/_meshctl"`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Run Kubernetes YAML on this machine as local pods with the mesh (up, status, logs, down).
    Local(local::LocalArgs),
    /// Run one service of the demo app (what `meshctl demo`'s pods run).
    #[command(name = "demo-app", hide = true)]
    DemoApp(demo_app::DemoAppArgs),
    /// Traffic statistics per workload, pod, namespace, authority or route (from the controller).
    Stat(stat::StatArgs),
    /// Who calls whom, with which identities, and what policy refused.
    Edges(stat::EdgesArgs),
    /// Live requests of a workload, pod or namespace, as they happen (through the controller).
    Tap(tap::TapArgs),
    /// Live requests of a workload, pod or namespace, counted by method and path.
    Top(tap::TopArgs),
    /// A live terminal dashboard of the mesh's traffic.
    Dashboard(dashboard::DashboardArgs),
    /// The whole mesh on this machine: a demo app in a local mesh, then the dashboard.
    Demo(demo::DemoArgs),
    /// Add the mesh to every pod and pod template of Kubernetes YAML (FILE or -), to stdout.
    Inject(inject::InjectArgs),
    /// Remove what `meshctl inject` added from Kubernetes YAML (FILE or -), to stdout.
    Uninject(inject::UninjectArgs),
    /// Print (or apply, with --apply) everything the mesh's control plane needs in a cluster.
    Install(install::InstallArgs),
    /// Move an installed control plane to this version in place: `install --apply` that keeps
    /// the identity issuer, trust anchors and webhook certificate, and prunes what this version
    /// no longer has. Proxies update when their pods restart (`meshctl check --proxy` lists them).
    Upgrade(install::InstallArgs),
    /// Print (or delete, with --delete) what `meshctl install` created.
    Uninstall(install::UninstallArgs),
    /// A proxy's certificate chain, trust anchors and renewal: of POD (through the API server,
    /// or with --local from the local mesh), or of the admin server at --proxy HOST:PORT.
    Identity(identity::IdentityArgs),
    /// Write what a host outside Kubernetes needs to join the mesh as ExternalWorkload NAME
    /// (its proxy's settings, a join token, the trust anchors) and print how to start it.
    #[command(name = "external-workload")]
    ExternalWorkload(external::ExternalWorkloadArgs),
    /// Link clusters: each mirrors the Services the other exports (link, unlink).
    Multicluster(multicluster::MulticlusterArgs),
    /// Check that the mesh is installed and healthy (or, with --pre, that it can be).
    Check(check::CheckArgs),
    /// The Grafana dashboards of the mesh: list them, print one, or write them all.
    Dashboards(observability::DashboardsArgs),
    /// Print a Prometheus scrape configuration for the proxies and the control plane
    /// (Kubernetes pod discovery, or with --local the local mesh's static targets).
    #[command(name = "prometheus-config")]
    PrometheusConfig(observability::PrometheusConfigArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let global = cli.global;
    match cli.command {
        Command::Local(args) => local::run(args, global.namespace.as_deref()),
        Command::DemoApp(args) => demo_app::run(args),
        Command::Stat(args) => stat::run_stat(args, &global),
        Command::Edges(args) => stat::run_edges(args, &global),
        Command::Tap(args) => tap::run_tap(args, &global),
        Command::Top(args) => tap::run_top(args, &global),
        Command::Dashboard(args) => dashboard::run(args, &global),
        Command::Demo(args) => demo::run(args),
        Command::Inject(args) => inject::run_inject(&args, global.namespace.as_deref()),
        Command::Uninject(args) => inject::run_uninject(&args),
        Command::Install(args) => install::run_install(args, &global),
        Command::Upgrade(args) => install::run_upgrade(args, &global),
        Command::Uninstall(args) => install::run_uninstall(args, &global),
        Command::Check(args) => check::run(args, &global),
        Command::Multicluster(args) => multicluster::run(args, &global),
        Command::ExternalWorkload(args) => external::run(args, &global),
        Command::Identity(args) => identity::run(args, &global),
        Command::Dashboards(args) => observability::run_dashboards(args),
        Command::PrometheusConfig(args) => observability::run_prometheus_config(args),
        Command::Completion { shell } => {
            completion(shell, &mut std::io::stdout());
            Ok(())
        }
        Command::Version => {
            println!("meshctl {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

/// Writes `shell`'s completion script of meshctl to `out`.
fn completion(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "meshctl", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_know_the_commands_and_their_flags() {
        use clap::ValueEnum as _;
        for shell in clap_complete::Shell::value_variants() {
            let mut script = Vec::new();
            completion(*shell, &mut script);
            let script = String::from_utf8(script).expect("UTF-8");
            for word in ["meshctl", "tap", "dashboard", "token", "kubeconfig"] {
                assert!(script.contains(word), "{shell}: no {word:?}");
            }
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
