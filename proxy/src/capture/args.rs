//! The flags of `mesh-proxy init` and their validation into typed values.
//!
//! The lists stay strings in [`InitArgs`] (so a value from the environment reaches us verbatim)
//! and are checked in [`InitArgs::validate`], which names the flag and the value at fault.

use std::fmt;
use std::net::IpAddr;

use super::CaptureError;

/// The proxy's admin port: never captured, so probes and metrics scrapes reach it directly.
pub const ADMIN_PORT: u16 = 4191;

/// Flags of `mesh-proxy init` (every flag can also come from its `MESH_INIT_*` variable).
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Port of the proxy's inbound listener: inbound TCP is redirected here.
    #[arg(long, env = "MESH_INIT_INBOUND_PORT", default_value_t = 4143,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,

    /// Port of the proxy's outbound listener: the application's outbound TCP is redirected here.
    #[arg(long, env = "MESH_INIT_OUTBOUND_PORT", default_value_t = 4140,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,

    /// The uid the proxy runs as: its own connections are never captured.
    #[arg(long, env = "MESH_INIT_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,

    /// Inbound ports (or ranges like 4190-4191) that bypass the proxy, comma separated. The
    /// proxy's inbound port and its admin port 4191 are always skipped.
    #[arg(
        long,
        env = "MESH_INIT_SKIP_INBOUND_PORTS",
        value_name = "PORTS",
        value_delimiter = ','
    )]
    pub skip_inbound_ports: Vec<String>,

    /// Outbound destination ports (or ranges) that bypass the proxy, comma separated.
    #[arg(
        long,
        env = "MESH_INIT_SKIP_OUTBOUND_PORTS",
        value_name = "PORTS",
        value_delimiter = ','
    )]
    pub skip_outbound_ports: Vec<String>,

    /// Outbound destination subnets (CIDRs, IPv4 or IPv6) that bypass the proxy, comma separated.
    #[arg(
        long,
        env = "MESH_INIT_SKIP_SUBNETS",
        value_name = "CIDRS",
        value_delimiter = ','
    )]
    pub skip_subnets: Vec<String>,

    /// Remove the capture rules instead of installing them.
    #[arg(long, env = "MESH_INIT_REMOVE")]
    pub remove: bool,

    /// Print the iptables commands and change nothing.
    #[arg(long, env = "MESH_INIT_DRY_RUN")]
    pub dry_run: bool,
}

impl Default for InitArgs {
    /// The same values as the flags' defaults.
    fn default() -> Self {
        InitArgs {
            inbound_port: 4143,
            outbound_port: 4140,
            proxy_uid: 2102,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_subnets: Vec::new(),
            remove: false,
            dry_run: false,
        }
    }
}

/// [`InitArgs`] once validated: what the plan is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub proxy_uid: u32,
    /// Always starts with the inbound and admin ports; no duplicates.
    pub skip_inbound_ports: Vec<PortRange>,
    /// No duplicates.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Host bits cleared; no duplicates.
    pub skip_subnets: Vec<Cidr>,
    pub remove: bool,
}

impl InitArgs {
    /// Checks every list, naming the flag and the value at fault.
    pub fn validate(&self) -> Result<Settings, CaptureError> {
        // The proxy's own listeners must stay reachable directly: a connection to the inbound
        // port that was redirected to the inbound port would carry no useful destination.
        let mut skip_inbound_ports = vec![
            PortRange::single(self.inbound_port),
            PortRange::single(ADMIN_PORT),
        ];
        skip_inbound_ports.extend(parse_ports(
            "--skip-inbound-ports",
            &self.skip_inbound_ports,
        )?);
        Ok(Settings {
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            proxy_uid: self.proxy_uid,
            skip_inbound_ports: dedup(skip_inbound_ports),
            skip_outbound_ports: dedup(parse_ports(
                "--skip-outbound-ports",
                &self.skip_outbound_ports,
            )?),
            skip_subnets: dedup(parse_cidrs("--skip-subnets", &self.skip_subnets)?),
            remove: self.remove,
        })
    }
}

/// Keeps the first of each value, in order: the rules read in the order they were given.
fn dedup<T: PartialEq>(values: Vec<T>) -> Vec<T> {
    let mut kept = Vec::with_capacity(values.len());
    for value in values {
        if !kept.contains(&value) {
            kept.push(value);
        }
    }
    kept
}

/// The non-empty items of a comma list: a trailing comma or an empty variable is not an error.
fn items(values: &[String]) -> impl Iterator<Item = &str> {
    values
        .iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// A TCP port or an inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        PortRange {
            low: port,
            high: port,
        }
    }
}

/// The iptables `--dport` syntax: `4191` or `4190:4191`.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}:{}", self.low, self.high)
        }
    }
}

/// Parses `8080`, `4190-4191`, ... from a comma list given as `flag`.
pub fn parse_ports(flag: &'static str, values: &[String]) -> Result<Vec<PortRange>, CaptureError> {
    items(values)
        .map(|item| {
            parse_port_range(item).map_err(|reason| CaptureError::BadPort {
                flag,
                value: item.to_owned(),
                reason,
            })
        })
        .collect()
}

fn parse_port_range(item: &str) -> Result<PortRange, &'static str> {
    let range = match item.split_once('-') {
        None => PortRange::single(parse_port(item)?),
        Some((low, high)) => PortRange {
            low: parse_port(low.trim())?,
            high: parse_port(high.trim())?,
        },
    };
    if range.low > range.high {
        return Err("the range ends before it starts");
    }
    Ok(range)
}

fn parse_port(text: &str) -> Result<u16, &'static str> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err("not a number");
    }
    match text.parse::<u16>() {
        Ok(0) => Err("port 0 is not a port"),
        Ok(port) => Ok(port),
        Err(_) => Err("ports end at 65535"),
    }
}

/// An IPv4 or IPv6 subnet, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Parses `10.0.0.0/8`, `fd00::/8`, ... from a comma list given as `flag`. A bare address is
/// taken as a single host (`/32` or `/128`).
pub fn parse_cidrs(flag: &'static str, values: &[String]) -> Result<Vec<Cidr>, CaptureError> {
    items(values)
        .map(|item| {
            parse_cidr(item).map_err(|reason| CaptureError::BadCidr {
                flag,
                value: item.to_owned(),
                reason,
            })
        })
        .collect()
}

fn parse_cidr(item: &str) -> Result<Cidr, &'static str> {
    let (address, prefix_len) = match item.split_once('/') {
        Some((address, prefix_len)) => (address, Some(prefix_len)),
        None => (item, None),
    };
    let address: IpAddr = address.parse().map_err(|_| "not an IP address")?;
    let max_len: u8 = if address.is_ipv4() { 32 } else { 128 };
    let prefix_len = match prefix_len {
        None => max_len,
        Some(text) if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) => text
            .parse::<u8>()
            .ok()
            .filter(|len| *len <= max_len)
            .ok_or(if max_len == 32 {
                "an IPv4 prefix length is at most 32"
            } else {
                "an IPv6 prefix length is at most 128"
            })?,
        Some(_) => return Err("the prefix length is not a number"),
    };
    // Clear the host bits so `10.1.2.3/8` and `10.0.0.0/8` are one subnet, as iptables sees it.
    let network = match address {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    };
    Ok(Cidr {
        network,
        prefix_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `mesh-proxy init` as the binary will parse it.
    #[derive(Debug, clap::Parser)]
    struct Init {
        #[command(flatten)]
        args: InitArgs,
    }

    fn parse(flags: &[&str]) -> Result<InitArgs, clap::Error> {
        Init::try_parse_from(std::iter::once("init").chain(flags.iter().copied()))
            .map(|init| init.args)
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|item| (*item).to_owned()).collect()
    }

    #[test]
    fn defaults_match_the_flags() {
        let parsed = parse(&[]).expect("no flags is valid");
        let default = InitArgs::default();
        assert_eq!(parsed.inbound_port, default.inbound_port);
        assert_eq!(parsed.outbound_port, default.outbound_port);
        assert_eq!(parsed.proxy_uid, default.proxy_uid);
        assert_eq!(parsed.skip_inbound_ports, default.skip_inbound_ports);
        assert_eq!(parsed.skip_outbound_ports, default.skip_outbound_ports);
        assert_eq!(parsed.skip_subnets, default.skip_subnets);
        assert_eq!(parsed.remove, default.remove);
        assert_eq!(parsed.dry_run, default.dry_run);
    }

    #[test]
    fn flags_parse_into_args() {
        let args = parse(&[
            "--inbound-port=5143",
            "--outbound-port=5140",
            "--proxy-uid=1000",
            "--skip-inbound-ports=22,8000-8010",
            "--skip-inbound-ports=9000",
            "--skip-outbound-ports=5432",
            "--skip-subnets=10.0.0.0/8,fd00::/8",
            "--remove",
            "--dry-run",
        ])
        .expect("valid flags");
        assert_eq!(
            (args.inbound_port, args.outbound_port, args.proxy_uid),
            (5143, 5140, 1000)
        );
        assert_eq!(
            args.skip_inbound_ports,
            strings(&["22", "8000-8010", "9000"])
        );
        assert_eq!(args.skip_outbound_ports, strings(&["5432"]));
        assert_eq!(args.skip_subnets, strings(&["10.0.0.0/8", "fd00::/8"]));
        assert!(args.remove && args.dry_run);
    }

    #[test]
    fn bad_numeric_flags_are_rejected_by_name() {
        for (flags, flag) in [
            (&["--inbound-port=0"][..], "--inbound-port"),
            (&["--outbound-port=70000"][..], "--outbound-port"),
            (&["--proxy-uid=-1"][..], "--proxy-uid"),
            (&["--inbound-port=http"][..], "--inbound-port"),
        ] {
            let error = parse(flags).expect_err("an invalid value").to_string();
            assert!(error.contains(flag), "{flags:?}: {error}");
        }
    }

    /// The reason in a parse error (the message around it is checked once, below).
    fn reason(error: CaptureError) -> &'static str {
        match error {
            CaptureError::BadPort { reason, .. } | CaptureError::BadCidr { reason, .. } => reason,
            other => panic!("not a parse error: {other}"),
        }
    }

    #[test]
    fn port_lists() {
        // A list, and the ranges it holds as iptables writes them, or why it is refused.
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("", Ok("")),
            ("80", Ok("80")),
            ("80,443", Ok("80,443")),
            (" 80 , 443 ,", Ok("80,443")),
            ("4190-4191", Ok("4190:4191")),
            ("4190 - 4191", Ok("4190:4191")),
            ("1-65535", Ok("1:65535")),
            ("8080-8080", Ok("8080")),
            ("0", Err("port 0 is not a port")),
            ("65536", Err("ports end at 65535")),
            ("99999999999999999999", Err("ports end at 65535")),
            ("http", Err("not a number")),
            ("-1", Err("not a number")),
            ("+80", Err("not a number")),
            ("80-", Err("not a number")),
            ("80-90-100", Err("not a number")),
            ("80:90", Err("not a number")),
            ("80,x", Err("not a number")),
            ("90-80", Err("the range ends before it starts")),
            ("1-0", Err("port 0 is not a port")),
        ];
        for (input, expected) in cases {
            let got = parse_ports("--p", &strings(&[input]))
                .map(|ranges| {
                    ranges
                        .iter()
                        .map(PortRange::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .map_err(reason);
            assert_eq!(got, expected.map(str::to_owned), "input {input:?}");
        }
    }

    #[test]
    fn a_bad_port_names_the_flag_and_the_value() {
        let error = parse_ports("--skip-inbound-ports", &strings(&["80,90-80"]))
            .expect_err("a reversed range");
        assert_eq!(
            error.to_string(),
            r#"--skip-inbound-ports: "90-80" is not a port or port range like 4190-4191 (the range ends before it starts)"#
        );
    }

    #[test]
    fn cidr_lists() {
        // A list, and the subnets it holds with host bits cleared, or why it is refused.
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("10.0.0.0/8", Ok("10.0.0.0/8")),
            ("10.1.2.3/8", Ok("10.0.0.0/8")),
            ("192.168.1.7", Ok("192.168.1.7/32")),
            ("0.0.0.0/0", Ok("0.0.0.0/0")),
            ("10.96.0.10/32", Ok("10.96.0.10/32")),
            ("10.0.0.0/8, 172.16.0.0/12,", Ok("10.0.0.0/8,172.16.0.0/12")),
            ("fd00::/8", Ok("fd00::/8")),
            ("fd12:3456::1/32", Ok("fd12:3456::/32")),
            ("::1", Ok("::1/128")),
            ("::/0", Ok("::/0")),
            ("10.0.0/8", Err("not an IP address")),
            ("cluster", Err("not an IP address")),
            ("/8", Err("not an IP address")),
            ("10.0.0.0/33", Err("an IPv4 prefix length is at most 32")),
            ("10.0.0.0/999", Err("an IPv4 prefix length is at most 32")),
            ("fd00::/129", Err("an IPv6 prefix length is at most 128")),
            ("10.0.0.0/", Err("the prefix length is not a number")),
            ("10.0.0.0/-1", Err("the prefix length is not a number")),
            ("10.0.0.0/8/8", Err("the prefix length is not a number")),
        ];
        for (input, expected) in cases {
            let got = parse_cidrs("--s", &strings(&[input]))
                .map(|cidrs| {
                    cidrs
                        .iter()
                        .map(Cidr::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .map_err(reason);
            assert_eq!(got, expected.map(str::to_owned), "input {input:?}");
        }
    }

    #[test]
    fn a_bad_cidr_names_the_flag_and_the_value() {
        let error = parse_cidrs("--skip-subnets", &strings(&["10.0.0/8"])).expect_err("3 octets");
        assert_eq!(
            error.to_string(),
            r#"--skip-subnets: "10.0.0/8" is not a CIDR like 10.0.0.0/8 or fd00::/8 (not an IP address)"#
        );
    }

    #[test]
    fn validate_always_skips_the_proxy_ports_and_drops_duplicates() {
        let args = InitArgs {
            inbound_port: 5143,
            skip_inbound_ports: strings(&["22,4191,22", "5143"]),
            skip_outbound_ports: strings(&["5432,5432"]),
            skip_subnets: strings(&["10.1.0.0/8,10.0.0.0/8"]),
            ..InitArgs::default()
        };
        let settings = args.validate().expect("valid args");
        assert_eq!(
            settings.skip_inbound_ports,
            [5143, 4191, 22].map(PortRange::single).to_vec()
        );
        assert_eq!(settings.skip_outbound_ports, vec![PortRange::single(5432)]);
        assert_eq!(settings.skip_subnets.len(), 1);
    }

    #[test]
    fn validate_names_the_flag_at_fault() {
        let cases = [
            (
                InitArgs {
                    skip_inbound_ports: strings(&["80,abc"]),
                    ..InitArgs::default()
                },
                r#"--skip-inbound-ports: "abc" is not a port"#,
            ),
            (
                InitArgs {
                    skip_outbound_ports: strings(&["99999"]),
                    ..InitArgs::default()
                },
                r#"--skip-outbound-ports: "99999" is not a port"#,
            ),
            (
                InitArgs {
                    skip_subnets: strings(&["10.0.0/8"]),
                    ..InitArgs::default()
                },
                r#"--skip-subnets: "10.0.0/8" is not a CIDR"#,
            ),
        ];
        for (args, expected) in cases {
            let error = args.validate().expect_err("invalid args").to_string();
            assert!(error.starts_with(expected), "{error}");
        }
    }
}
