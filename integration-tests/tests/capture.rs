//! `mesh-proxy init` for real: the rules it installs in a network namespace, that installing
//! is idempotent and removing is clean, and that captured connections reach the proxy's
//! listeners with their original destination intact.
//!
//! Needs root (network namespaces, iptables); says so loudly and fails under `CI=true` when
//! not. Everything happens inside namespaces created here, which have no route out.

use std::ffi::OsString;
use std::path::PathBuf;

use mesh_integration_tests::bin_path;
use mesh_integration_tests::netns::{ChildGuard, NetNs, require_root};

/// The uid `mesh-proxy init` exempts by default: the proxy's.
const PROXY_UID: &str = "2102";

fn mesh_proxy() -> PathBuf {
    bin_path("mesh-proxy")
}

/// Builds `mesh-proxy` first: a test killed by its timeout mid-build runs no `Drop`, so a
/// namespace created before the build would be left behind.
fn build_before_creating_namespaces() {
    mesh_proxy();
}

/// Runs `mesh-proxy init FLAGS...` in `netns`, returning its stdout.
fn init(netns: &NetNs, flags: &[&str]) -> String {
    let mut argv: Vec<OsString> = vec![mesh_proxy().into(), "init".into()];
    argv.extend(flags.iter().map(OsString::from));
    netns.run(argv)
}

/// Our lines of `PROGRAM -t nat -S` in `netns`, in listing order.
fn mesh_rules(netns: &NetNs, program: &str) -> Vec<String> {
    netns
        .run([program, "-t", "nat", "-S"])
        .lines()
        .filter(|line| line.contains("MESH_"))
        .map(str::to_owned)
        .collect()
}

/// Whether `ip6tables` can manage the IPv6 nat table in `netns` (else init skips IPv6).
fn ipv6_capture_available(netns: &NetNs) -> bool {
    let usable = netns
        .command("ip6tables")
        .args(["-t", "nat", "-S"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !usable {
        eprintln!("!!! ip6tables is unusable here: the IPv6 half of this test is NOT RUN");
    }
    usable
}

/// `curl` from inside `netns` (as `uid` when given): the body, or curl's exit code.
fn curl(netns: &NetNs, url: &str, uid: Option<&str>) -> Result<String, i32> {
    let mut command = match uid {
        None => netns.command("curl"),
        Some(uid) => {
            let mut command = netns.command("setpriv");
            let uid_flags = [
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_owned(),
            ];
            command.args(uid_flags).arg("curl");
            command
        }
    };
    command.args(["--silent", "--noproxy", "*", "--max-time", "5", url]);
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(output.status.code().unwrap_or(-1))
    }
}

/// curl's exit code when the connection was refused: nothing listened where it arrived.
const CONNECTION_REFUSED: Result<String, i32> = Err(7);

/// Starts an `orig-dst-echo` named `name` on `listen` in `netns`, once it is listening.
fn echo(netns: &NetNs, listen: &str, name: &str) -> ChildGuard {
    let mut child = netns.spawn([env!("CARGO_BIN_EXE_orig-dst-echo"), listen, name]);
    let line = child.read_line();
    assert!(
        line.starts_with("listening on "),
        "orig-dst-echo said {line:?}"
    );
    child
}

fn ok(body: &str) -> Result<String, i32> {
    Ok(body.to_owned())
}

#[test]
fn init_installs_rules_idempotently_and_remove_deletes_them() {
    if !require_root("init_installs_rules_idempotently_and_remove_deletes_them") {
        return;
    }
    build_before_creating_namespaces();
    let netns = NetNs::new();
    let check_ipv6 = ipv6_capture_available(&netns);
    let flags = [
        "--skip-inbound-ports=8081,9000-9010",
        "--skip-outbound-ports=5432",
        "--skip-subnets=10.0.0.0/8,fd00::/8",
    ];
    let expected_v4 = [
        "-N MESH_INBOUND",
        "-N MESH_OUTBOUND",
        "-A PREROUTING -p tcp -j MESH_INBOUND",
        "-A OUTPUT -p tcp -j MESH_OUTBOUND",
        "-A MESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
        "-A MESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
        "-A MESH_INBOUND -p tcp -m tcp --dport 8081 -j RETURN",
        "-A MESH_INBOUND -p tcp -m tcp --dport 9000:9010 -j RETURN",
        "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143",
        "-A MESH_OUTBOUND ! -d 127.0.0.0/8 -o lo -m owner --uid-owner 2102 -j MESH_INBOUND",
        "-A MESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
        "-A MESH_OUTBOUND -d 127.0.0.0/8 -j RETURN",
        "-A MESH_OUTBOUND -p tcp -m tcp --dport 5432 -j RETURN",
        "-A MESH_OUTBOUND -d 10.0.0.0/8 -j RETURN",
        "-A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
    ];
    let expected_v6 = [
        "-N MESH_INBOUND",
        "-N MESH_OUTBOUND",
        "-A PREROUTING -p tcp -j MESH_INBOUND",
        "-A OUTPUT -p tcp -j MESH_OUTBOUND",
        "-A MESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
        "-A MESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
        "-A MESH_INBOUND -p tcp -m tcp --dport 8081 -j RETURN",
        "-A MESH_INBOUND -p tcp -m tcp --dport 9000:9010 -j RETURN",
        "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143",
        "-A MESH_OUTBOUND ! -d ::1/128 -o lo -m owner --uid-owner 2102 -j MESH_INBOUND",
        "-A MESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
        "-A MESH_OUTBOUND -d ::1/128 -j RETURN",
        "-A MESH_OUTBOUND -p tcp -m tcp --dport 5432 -j RETURN",
        "-A MESH_OUTBOUND -d fd00::/8 -j RETURN",
        "-A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
    ];
    let assert_installed = |when: &str| {
        assert_eq!(mesh_rules(&netns, "iptables"), expected_v4, "IPv4 {when}");
        if check_ipv6 {
            assert_eq!(mesh_rules(&netns, "ip6tables"), expected_v6, "IPv6 {when}");
        }
    };

    // --dry-run prints the commands and changes nothing.
    let script = init(&netns, &[&flags[..], &["--dry-run"]].concat());
    assert!(
        script.contains("iptables -t nat -A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143"),
        "{script}"
    );
    assert!(
        script.contains("ip6tables -t nat -A MESH_OUTBOUND -d fd00::/8 -j RETURN"),
        "{script}"
    );
    assert_eq!(
        mesh_rules(&netns, "iptables"),
        Vec::<String>::new(),
        "after --dry-run"
    );

    init(&netns, &flags);
    assert_installed("after the first install");

    // The same settings again, this time from the environment: the same rules, no duplicates.
    let mut again = netns.command(mesh_proxy());
    again
        .arg("init")
        .env("MESH_INIT_SKIP_INBOUND_PORTS", "8081,9000-9010")
        .env("MESH_INIT_SKIP_OUTBOUND_PORTS", "5432")
        .env("MESH_INIT_SKIP_SUBNETS", "10.0.0.0/8,fd00::/8");
    let output = again.output().expect("run mesh-proxy init");
    assert!(
        output.status.success(),
        "second init: {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_installed("after installing twice");

    // Other settings replace the rules rather than adding to them.
    init(&netns, &["--proxy-uid=1234"]);
    let rules = mesh_rules(&netns, "iptables");
    assert_eq!(rules.len(), 11, "{rules:#?}");
    assert!(rules.contains(&"-A MESH_OUTBOUND -m owner --uid-owner 1234 -j RETURN".to_owned()));
    assert!(
        !rules
            .iter()
            .any(|rule| rule.contains("2102") || rule.contains("5432"))
    );

    init(&netns, &["--remove"]);
    assert_eq!(
        mesh_rules(&netns, "iptables"),
        Vec::<String>::new(),
        "IPv4 after --remove"
    );
    if check_ipv6 {
        assert_eq!(
            mesh_rules(&netns, "ip6tables"),
            Vec::<String>::new(),
            "IPv6 after --remove"
        );
    }
    // Removing what is not there is fine too (an init container may run twice).
    init(&netns, &["--remove"]);
}

#[test]
fn init_rejects_a_bad_value_by_name() {
    if !require_root("init_rejects_a_bad_value_by_name") {
        return;
    }
    build_before_creating_namespaces();
    let netns = NetNs::new();
    let output = netns
        .command(mesh_proxy())
        .args(["init", "--skip-subnets=10.0.0/8"])
        .output()
        .expect("run mesh-proxy init");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(r#"--skip-subnets: "10.0.0/8" is not a CIDR"#),
        "{stderr}"
    );
    assert_eq!(mesh_rules(&netns, "iptables"), Vec::<String>::new());
}

#[test]
fn outbound_connection_to_a_cluster_ip_is_redirected_with_its_original_destination() {
    if !require_root(
        "outbound_connection_to_a_cluster_ip_is_redirected_with_its_original_destination",
    ) {
        return;
    }
    build_before_creating_namespaces();
    let netns = NetNs::new();
    // Service IPs that the local mesh routes to `lo`, as NETNS.md describes.
    netns.run(["ip", "route", "add", "local", "10.96.0.10/32", "dev", "lo"]);
    netns.run(["ip", "route", "add", "local", "10.96.0.11/32", "dev", "lo"]);
    init(
        &netns,
        &["--skip-outbound-ports=8080", "--skip-subnets=10.96.0.11/32"],
    );
    let _outbound = echo(&netns, "127.0.0.1:4140", "outbound");

    // The application (root here, not the proxy's uid) is captured...
    assert_eq!(
        curl(&netns, "http://10.96.0.10/", None),
        ok("outbound 10.96.0.10:80")
    );
    assert_eq!(
        curl(&netns, "http://10.96.0.10:9999/", None),
        ok("outbound 10.96.0.10:9999")
    );
    // ...except to skipped ports, skipped subnets and loopback, which go where they were
    // addressed (nothing listens there, hence refused).
    assert_eq!(
        curl(&netns, "http://10.96.0.10:8080/", None),
        CONNECTION_REFUSED
    );
    assert_eq!(curl(&netns, "http://10.96.0.11/", None), CONNECTION_REFUSED);
    assert_eq!(curl(&netns, "http://127.0.0.2/", None), CONNECTION_REFUSED);
    // The proxy's own connections are never captured.
    assert_eq!(
        curl(&netns, "http://10.96.0.10/", Some(PROXY_UID)),
        CONNECTION_REFUSED
    );
    // A connection straight to the listener has no original destination.
    assert_eq!(
        curl(&netns, "http://127.0.0.1:4140/", None),
        ok("outbound not redirected")
    );

    if ipv6_capture_available(&netns) {
        netns.run([
            "ip",
            "-6",
            "route",
            "add",
            "local",
            "fd00:96::10/128",
            "dev",
            "lo",
        ]);
        let _outbound6 = echo(&netns, "[::1]:4140", "outbound6");
        assert_eq!(
            curl(&netns, "http://[fd00:96::10]/", None),
            ok("outbound6 [fd00:96::10]:80")
        );
    }
}

#[test]
fn inbound_connection_is_redirected_and_the_proxy_reaches_its_own_pod_through_inbound() {
    if !require_root(
        "inbound_connection_is_redirected_and_the_proxy_reaches_its_own_pod_through_inbound",
    ) {
        return;
    }
    build_before_creating_namespaces();
    let client = NetNs::new();
    let server = NetNs::new();
    client.link(&server, "10.77.0.1/24", "10.77.0.2/24");
    init(&server, &["--skip-inbound-ports=9000"]);
    // `[::]` also accepts IPv4 (as IPv4-mapped addresses), like a dual-stack proxy listener.
    let _inbound = echo(&server, "[::]:4143", "inbound");
    let _outbound = echo(&server, "127.0.0.1:4140", "outbound");
    let _app = echo(&server, "0.0.0.0:9000", "app");

    // From another pod: captured to the inbound port, except skipped ports.
    assert_eq!(
        curl(&client, "http://10.77.0.2:8080/", None),
        ok("inbound 10.77.0.2:8080")
    );
    assert_eq!(
        curl(&client, "http://10.77.0.2:9000/", None),
        ok("app not redirected")
    );
    // Inside the pod, the application calling its own pod IP goes through the outbound proxy...
    assert_eq!(
        curl(&server, "http://10.77.0.2:8080/", None),
        ok("outbound 10.77.0.2:8080")
    );
    // ...and the proxy's own connection to its pod IP arrives through the inbound proxy.
    assert_eq!(
        curl(&server, "http://10.77.0.2:8080/", Some(PROXY_UID)),
        ok("inbound 10.77.0.2:8080")
    );
    // The proxy's connection to a skipped inbound port reaches the application directly.
    assert_eq!(
        curl(&server, "http://10.77.0.2:9000/", Some(PROXY_UID)),
        ok("app not redirected")
    );
}
