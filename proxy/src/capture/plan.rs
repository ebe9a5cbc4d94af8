//! The capture rules as data: a pure function from the validated flags to the iptables steps
//! for one IP family. Nothing here runs a command, so every rule is unit tested.

use super::args::{Cidr, Settings};

/// Our chain for inbound TCP, jumped to from `PREROUTING`.
pub const INBOUND_CHAIN: &str = "MESH_INBOUND";
/// Our chain for outbound TCP, jumped to from `OUTPUT`.
pub const OUTBOUND_CHAIN: &str = "MESH_OUTBOUND";

/// Every rule lives in the `nat` table: `REDIRECT` is a NAT target.
const TABLE: &str = "nat";

/// An IP family, with the program that manages its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    pub fn program(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        }
    }

    /// The loopback destinations, which are never captured.
    fn loopback(self) -> &'static str {
        match self {
            Family::Ipv4 => "127.0.0.0/8",
            Family::Ipv6 => "::1/128",
        }
    }

    fn contains(self, cidr: &Cidr) -> bool {
        match self {
            Family::Ipv4 => cidr.network.is_ipv4(),
            Family::Ipv6 => cidr.network.is_ipv6(),
        }
    }
}

/// One rule: its chain and its match and target, written the way `iptables -S` prints them
/// (so a listing can be compared with the plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(chain: &'static str, spec: &[&str]) -> Self {
        Rule {
            chain,
            spec: spec.iter().map(|word| (*word).to_owned()).collect(),
        }
    }

    /// The rule as `iptables -S` lists it: `-A CHAIN ...`.
    pub fn to_listing(&self) -> String {
        format!("-A {} {}", self.chain, self.spec.join(" "))
    }

    /// The arguments of `iptables` for `operation` (`-A`, `-C`, `-D`) on this rule.
    pub fn args(&self, operation: &str) -> Vec<String> {
        let mut args = vec!["-t".to_owned(), TABLE.to_owned(), operation.to_owned()];
        args.push(self.chain.to_owned());
        args.extend(self.spec.iter().cloned());
        args
    }
}

/// The arguments of `iptables` for `operation` (`-N`, `-F`, `-X`, `-S`) on a chain.
pub fn chain_args(operation: &str, chain: &str) -> Vec<String> {
    vec![
        "-t".to_owned(),
        TABLE.to_owned(),
        operation.to_owned(),
        chain.to_owned(),
    ]
}

/// One step of installing or removing. Some steps depend on what is already there (that is
/// what makes install and remove idempotent); the executor checks, the plan only says what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the chain, or empty it when it exists: our chains are rebuilt from scratch.
    ResetChain(&'static str),
    /// Append a rule to one of our (just reset) chains.
    Append(Rule),
    /// Append a rule to a built-in chain unless `-C` finds it there already: the jumps.
    AppendUnlessPresent(Rule),
    /// Delete every copy of a rule, if any.
    DeleteEvery(Rule),
    /// Flush and delete a chain, if it exists.
    DeleteChain(&'static str),
}

impl Step {
    /// The step as a shell command line, for `--dry-run`.
    pub fn to_shell(&self, program: &str) -> String {
        let command = |args: Vec<String>| format!("{program} {}", args.join(" "));
        match self {
            Step::ResetChain(chain) => format!(
                "{} 2>/dev/null || {}",
                command(chain_args("-N", chain)),
                command(chain_args("-F", chain)),
            ),
            Step::Append(rule) => command(rule.args("-A")),
            Step::AppendUnlessPresent(rule) => format!(
                "{} 2>/dev/null || {}",
                command(rule.args("-C")),
                command(rule.args("-A")),
            ),
            Step::DeleteEvery(rule) => {
                format!("while {} 2>/dev/null; do :; done", command(rule.args("-D")))
            }
            Step::DeleteChain(chain) => format!(
                "if {} >/dev/null 2>&1; then {} && {}; fi",
                command(chain_args("-S", chain)),
                command(chain_args("-F", chain)),
                command(chain_args("-X", chain)),
            ),
        }
    }
}

/// The steps that install (or, with `remove`, remove) capture for one IP family.
///
/// Install: reset `MESH_INBOUND` and `MESH_OUTBOUND`, fill them with [`rules`], then add the
/// two jumps unless present:
///
/// ```text
/// -A PREROUTING -p tcp -j MESH_INBOUND
/// -A OUTPUT -p tcp -j MESH_OUTBOUND
/// ```
///
/// The jumps come last so no packet meets a half-built chain on a first install. Remove:
/// delete every copy of the jumps, then flush and delete `MESH_OUTBOUND` (which jumps to
/// `MESH_INBOUND`, so it goes first) and `MESH_INBOUND`.
pub fn plan(settings: &Settings, family: Family) -> Vec<Step> {
    let jumps = [
        Rule::new("PREROUTING", &["-p", "tcp", "-j", INBOUND_CHAIN]),
        Rule::new("OUTPUT", &["-p", "tcp", "-j", OUTBOUND_CHAIN]),
    ];
    if settings.remove {
        let mut steps: Vec<Step> = jumps.into_iter().map(Step::DeleteEvery).collect();
        steps.push(Step::DeleteChain(OUTBOUND_CHAIN));
        steps.push(Step::DeleteChain(INBOUND_CHAIN));
        return steps;
    }
    let mut steps = vec![
        Step::ResetChain(INBOUND_CHAIN),
        Step::ResetChain(OUTBOUND_CHAIN),
    ];
    steps.extend(rules(settings, family).into_iter().map(Step::Append));
    steps.extend(jumps.into_iter().map(Step::AppendUnlessPresent));
    steps
}

/// The rules of our two chains, in order (first match wins). With the defaults, for IPv4:
///
/// ```text
/// -A MESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN
/// -A MESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN
/// -A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143
/// -A MESH_OUTBOUND ! -d 127.0.0.0/8 -o lo -m owner --uid-owner 2102 -j MESH_INBOUND
/// -A MESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN
/// -A MESH_OUTBOUND -d 127.0.0.0/8 -j RETURN
/// -A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 4140
/// ```
///
/// with one `RETURN` per skipped port or range (`--dport 4190:4191`) in either chain, and one
/// `-d CIDR -j RETURN` per skipped subnet of this family, before the final `REDIRECT`.
///
/// Why the outbound chain reads this way:
/// - **The proxy talking to its own pod** (`! -d 127.0.0.0/8 -o lo`, proxy uid): when the
///   application calls a service whose endpoint is this very pod, the proxy dials the pod's
///   own IP, which the kernel routes over `lo`. Sending that connection through the inbound
///   chain makes it arrive at the inbound proxy like any other caller's (policy, metrics), as
///   Istio does. The inbound proxy then forwards to `127.0.0.1`, which this rule excludes, so
///   there is no loop; and inbound's skipped ports (the proxy's own) still apply.
/// - **The proxy's own traffic** (`--uid-owner`) passes untouched, else it would loop.
/// - **Loopback destinations** pass: an application talking to a sidecar on `127.0.0.1` is
///   local. We exclude the loopback *addresses*, not the `lo` interface: a connection to a
///   service IP that the local mesh routes to `lo` (e.g. `10.96.0.10`), or to the pod's own
///   IP, must still reach the outbound proxy.
/// - **Skipped ports and subnets** pass; everything else TCP is redirected to the outbound
///   port. Only TCP is captured (the jumps match `-p tcp`), so DNS over UDP is untouched.
///
/// On the inbound side only TCP to skipped ports passes; the proxy's inbound and admin ports
/// are always skipped (see `InitArgs::validate`).
pub fn rules(settings: &Settings, family: Family) -> Vec<Rule> {
    let uid = settings.proxy_uid.to_string();
    let loopback = family.loopback();
    let mut rules = Vec::new();

    for ports in &settings.skip_inbound_ports {
        rules.push(return_for_port(INBOUND_CHAIN, &ports.to_string()));
    }
    rules.push(redirect(INBOUND_CHAIN, settings.inbound_port));

    #[rustfmt::skip]
    rules.push(Rule::new(OUTBOUND_CHAIN, &[
        "!", "-d", loopback, "-o", "lo", "-m", "owner", "--uid-owner", &uid, "-j", INBOUND_CHAIN,
    ]));
    rules.push(Rule::new(
        OUTBOUND_CHAIN,
        &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
    ));
    rules.push(Rule::new(OUTBOUND_CHAIN, &["-d", loopback, "-j", "RETURN"]));
    for ports in &settings.skip_outbound_ports {
        rules.push(return_for_port(OUTBOUND_CHAIN, &ports.to_string()));
    }
    for subnet in settings
        .skip_subnets
        .iter()
        .filter(|cidr| family.contains(cidr))
    {
        rules.push(Rule::new(
            OUTBOUND_CHAIN,
            &["-d", &subnet.to_string(), "-j", "RETURN"],
        ));
    }
    rules.push(redirect(OUTBOUND_CHAIN, settings.outbound_port));
    rules
}

/// One rule per port or range rather than `-m multiport`: multiport takes at most 15 ports.
fn return_for_port(chain: &'static str, ports: &str) -> Rule {
    Rule::new(
        chain,
        &["-p", "tcp", "-m", "tcp", "--dport", ports, "-j", "RETURN"],
    )
}

fn redirect(chain: &'static str, port: u16) -> Rule {
    Rule::new(
        chain,
        &[
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port.to_string(),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::InitArgs;

    fn settings(args: InitArgs) -> Settings {
        args.validate().expect("test args are valid")
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|item| (*item).to_owned()).collect()
    }

    fn listing(settings: &Settings, family: Family) -> Vec<String> {
        rules(settings, family)
            .iter()
            .map(Rule::to_listing)
            .collect()
    }

    #[test]
    fn rules_by_flags_and_family() {
        let cases: Vec<(&str, InitArgs, Family, Vec<&str>)> = vec![
            (
                "defaults, IPv4",
                InitArgs::default(),
                Family::Ipv4,
                vec![
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
                    "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                    "-A MESH_OUTBOUND ! -d 127.0.0.0/8 -o lo -m owner --uid-owner 2102 -j MESH_INBOUND",
                    "-A MESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
                    "-A MESH_OUTBOUND -d 127.0.0.0/8 -j RETURN",
                    "-A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
                ],
            ),
            (
                "defaults, IPv6",
                InitArgs::default(),
                Family::Ipv6,
                vec![
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
                    "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                    "-A MESH_OUTBOUND ! -d ::1/128 -o lo -m owner --uid-owner 2102 -j MESH_INBOUND",
                    "-A MESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
                    "-A MESH_OUTBOUND -d ::1/128 -j RETURN",
                    "-A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
                ],
            ),
            (
                "other ports and uid",
                InitArgs {
                    inbound_port: 5143,
                    outbound_port: 5140,
                    proxy_uid: 0,
                    ..InitArgs::default()
                },
                Family::Ipv4,
                vec![
                    "-A MESH_INBOUND -p tcp -m tcp --dport 5143 -j RETURN",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
                    "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 5143",
                    "-A MESH_OUTBOUND ! -d 127.0.0.0/8 -o lo -m owner --uid-owner 0 -j MESH_INBOUND",
                    "-A MESH_OUTBOUND -m owner --uid-owner 0 -j RETURN",
                    "-A MESH_OUTBOUND -d 127.0.0.0/8 -j RETURN",
                    "-A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 5140",
                ],
            ),
            (
                "skipped ports, ranges and subnets of this family only",
                InitArgs {
                    skip_inbound_ports: strings(&["22,8000-8010"]),
                    skip_outbound_ports: strings(&["5432", "6379-6380"]),
                    skip_subnets: strings(&["10.0.0.0/8,fd00::/8", "169.254.169.254"]),
                    ..InitArgs::default()
                },
                Family::Ipv4,
                vec![
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 8000:8010 -j RETURN",
                    "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                    "-A MESH_OUTBOUND ! -d 127.0.0.0/8 -o lo -m owner --uid-owner 2102 -j MESH_INBOUND",
                    "-A MESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
                    "-A MESH_OUTBOUND -d 127.0.0.0/8 -j RETURN",
                    "-A MESH_OUTBOUND -p tcp -m tcp --dport 5432 -j RETURN",
                    "-A MESH_OUTBOUND -p tcp -m tcp --dport 6379:6380 -j RETURN",
                    "-A MESH_OUTBOUND -d 10.0.0.0/8 -j RETURN",
                    "-A MESH_OUTBOUND -d 169.254.169.254/32 -j RETURN",
                    "-A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
                ],
            ),
            (
                "the same skips, IPv6",
                InitArgs {
                    skip_outbound_ports: strings(&["5432"]),
                    skip_subnets: strings(&["10.0.0.0/8,fd00::/8"]),
                    ..InitArgs::default()
                },
                Family::Ipv6,
                vec![
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
                    "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                    "-A MESH_OUTBOUND ! -d ::1/128 -o lo -m owner --uid-owner 2102 -j MESH_INBOUND",
                    "-A MESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
                    "-A MESH_OUTBOUND -d ::1/128 -j RETURN",
                    "-A MESH_OUTBOUND -p tcp -m tcp --dport 5432 -j RETURN",
                    "-A MESH_OUTBOUND -d fd00::/8 -j RETURN",
                    "-A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
                ],
            ),
            (
                "a skipped proxy port is not listed twice",
                InitArgs {
                    skip_inbound_ports: strings(&["4191,4143,4191"]),
                    ..InitArgs::default()
                },
                Family::Ipv4,
                vec![
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
                    "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                    "-A MESH_OUTBOUND ! -d 127.0.0.0/8 -o lo -m owner --uid-owner 2102 -j MESH_INBOUND",
                    "-A MESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
                    "-A MESH_OUTBOUND -d 127.0.0.0/8 -j RETURN",
                    "-A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
                ],
            ),
        ];
        for (name, args, family, expected) in cases {
            assert_eq!(listing(&settings(args), family), expected, "case: {name}");
        }
    }

    #[test]
    fn install_resets_our_chains_fills_them_then_adds_the_jumps() {
        let settings = settings(InitArgs::default());
        let steps = plan(&settings, Family::Ipv4);
        let rule_count = rules(&settings, Family::Ipv4).len();
        assert_eq!(steps.len(), 2 + rule_count + 2);
        assert_eq!(steps[0], Step::ResetChain(INBOUND_CHAIN));
        assert_eq!(steps[1], Step::ResetChain(OUTBOUND_CHAIN));
        assert!(
            steps[2..2 + rule_count]
                .iter()
                .all(|step| matches!(step, Step::Append(_)))
        );
        let shell: Vec<String> = steps.iter().map(|step| step.to_shell("iptables")).collect();
        assert_eq!(
            shell[..2],
            [
                "iptables -t nat -N MESH_INBOUND 2>/dev/null || iptables -t nat -F MESH_INBOUND",
                "iptables -t nat -N MESH_OUTBOUND 2>/dev/null || iptables -t nat -F MESH_OUTBOUND",
            ]
        );
        assert_eq!(
            shell[2],
            "iptables -t nat -A MESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN"
        );
        assert_eq!(
            shell[shell.len() - 2..],
            [
                "iptables -t nat -C PREROUTING -p tcp -j MESH_INBOUND 2>/dev/null \
                 || iptables -t nat -A PREROUTING -p tcp -j MESH_INBOUND",
                "iptables -t nat -C OUTPUT -p tcp -j MESH_OUTBOUND 2>/dev/null \
                 || iptables -t nat -A OUTPUT -p tcp -j MESH_OUTBOUND",
            ]
        );
    }

    #[test]
    fn remove_deletes_the_jumps_then_the_chains_outbound_first() {
        for family in Family::ALL {
            let settings = settings(InitArgs {
                remove: true,
                skip_inbound_ports: strings(&["22"]),
                ..InitArgs::default()
            });
            let shell: Vec<String> = plan(&settings, family)
                .iter()
                .map(|step| step.to_shell(family.program()))
                .collect();
            let program = family.program();
            assert_eq!(
                shell,
                [
                    format!(
                        "while {program} -t nat -D PREROUTING -p tcp -j MESH_INBOUND 2>/dev/null; do :; done"
                    ),
                    format!(
                        "while {program} -t nat -D OUTPUT -p tcp -j MESH_OUTBOUND 2>/dev/null; do :; done"
                    ),
                    format!(
                        "if {program} -t nat -S MESH_OUTBOUND >/dev/null 2>&1; \
                         then {program} -t nat -F MESH_OUTBOUND && {program} -t nat -X MESH_OUTBOUND; fi"
                    ),
                    format!(
                        "if {program} -t nat -S MESH_INBOUND >/dev/null 2>&1; \
                         then {program} -t nat -F MESH_INBOUND && {program} -t nat -X MESH_INBOUND; fi"
                    ),
                ]
            );
        }
    }

    #[test]
    fn rule_args_put_the_operation_before_the_chain() {
        let rule = Rule::new("OUTPUT", &["-p", "tcp", "-j", OUTBOUND_CHAIN]);
        assert_eq!(
            rule.args("-C"),
            [
                "-t",
                "nat",
                "-C",
                "OUTPUT",
                "-p",
                "tcp",
                "-j",
                "MESH_OUTBOUND"
            ]
        );
        assert_eq!(
            chain_args("-X", INBOUND_CHAIN),
            ["-t", "nat", "-X", "MESH_INBOUND"]
        );
    }
}
