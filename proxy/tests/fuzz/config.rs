//! The proxy's configuration (`config.rs`): `MESH_PROXY_*` values as a pod spec or a person
//! may write them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use mesh_proxy::config::{Config, parse_bytes, parse_duration, parse_ports};
use proptest::collection::vec;
use proptest::prelude::*;

use crate::runner::fuzz;

/// Every variable the proxy reads, with values of the kind it expects.
const VARIABLES: &[(&str, &[&str])] = &[
    (
        "MESH_PROXY_INBOUND_LISTEN",
        &["0.0.0.0:4143", "[::]:4143", "4143"],
    ),
    ("MESH_PROXY_OUTBOUND_LISTEN", &["127.0.0.1:4140"]),
    ("MESH_PROXY_ADMIN_LISTEN", &["0.0.0.0:4191"]),
    (
        "MESH_PROXY_INBOUND_APP_IP",
        &["127.0.0.1", "::1", "localhost"],
    ),
    (
        "MESH_PROXY_CONTROLLER_ADDR",
        &["http://127.0.0.1:8086", "127.0.0.1:8086", ""],
    ),
    (
        "MESH_PROXY_OPAQUE_PORTS",
        &["25, 8000-8002", "90-80", "0", "65536", ",,"],
    ),
    ("MESH_PROXY_LOG_FORMAT", &["plain", "json", "xml"]),
    ("MESH_PROXY_LOG_LEVEL", &["info", "mesh_proxy=debug"]),
    (
        "MESH_PROXY_IDENTITY",
        &["spiffe://cluster.local/ns/shop/sa/web", "web", ""],
    ),
    (
        "MESH_PROXY_IDENTITY_TOKEN_FILE",
        &["/var/run/mesh/identity/token"],
    ),
    (
        "MESH_PROXY_TRUST_ANCHORS",
        &["-----BEGIN CERTIFICATE-----", ""],
    ),
    ("MESH_PROXY_IDENTITY_ADDR", &["http://127.0.0.1:8086"]),
    (
        "MESH_PROXY_DEFAULT_INBOUND_POLICY",
        &["deny", "audit", "all-authenticated", "allow"],
    ),
    (
        "MESH_PROXY_TAP_IDENTITY",
        &["spiffe://cluster.local/ns/mesh-system/sa/mesh-controller"],
    ),
    ("MESH_PROXY_ACCESS_LOG", &["json", "apache", "xml", ""]),
    (
        "MESH_PROXY_TRACE_COLLECTOR",
        &["http://collector:4317", "collector:4317", ""],
    ),
    (
        "MESH_PROXY_TRACE_SAMPLE_RATE",
        &["0.5", "1", "2", "-0", "NaN", "1e-1", "1e1", "inf"],
    ),
    (
        "MESH_PROXY_INBOUND_MAX_CONNECTIONS",
        &["1", "0", "00", "+0", "-1", "many"],
    ),
    ("MESH_PROXY_OUTBOUND_MAX_CONNECTIONS", &["10000", "0"]),
    ("MESH_PROXY_ADMIN_MAX_CONNECTIONS", &["8"]),
    ("MESH_PROXY_LISTEN_BACKLOG", &["1024", "99999999999"]),
    ("MESH_PROXY_ENDPOINT_MAX_CONNECTIONS", &["64", "0"]),
    ("MESH_PROXY_DETECT_TIMEOUT", &["250ms", "ten", "0s"]),
    ("MESH_PROXY_CONNECT_TIMEOUT", &["1s", "1"]),
    (
        "MESH_PROXY_DISCOVERY_TIMEOUT",
        &["3s", "99999999999999999999h"],
    ),
    (
        "MESH_PROXY_SHUTDOWN_GRACE_PERIOD",
        &["10s", "1m", "307445734561825861m"],
    ),
    ("MESH_PROXY_HTTP_HEADER_READ_TIMEOUT", &["2s", "0s", "0ms"]),
    ("MESH_PROXY_TCP_IDLE_TIMEOUT", &["1h", "0m"]),
    ("MESH_PROXY_TLS_HANDSHAKE_TIMEOUT", &["10s"]),
    (
        "MESH_PROXY_RETRY_BUFFER_BYTES",
        &["64Ki", "16MB", "0", "17179869184Gi"],
    ),
    ("MESH_PROXY_RETRY_BUFFER_CONNECTION_BYTES", &["1Mi", "0Ki"]),
    ("MESH_PROXY_NAMESPACE", &["shop"]),
    ("MESH_PROXY_WORKLOAD_KIND", &["deployment"]),
    ("MESH_PROXY_WORKLOAD_NAME", &["web"]),
    ("MESH_PROXY_POD", &["web-1"]),
];

/// The one variable the proxy reads a file from: only paths that are safe to read here.
const TRUST_ANCHORS_FILE: &str = "MESH_PROXY_TRUST_ANCHORS_FILE";

fn environment() -> impl Strategy<Value = BTreeMap<String, String>> {
    let variable = prop::sample::select(VARIABLES).prop_flat_map(|(var, examples)| {
        let examples: Vec<String> = examples.iter().map(|e| (*e).to_owned()).collect();
        let value = prop_oneof![
            3 => prop::sample::select(examples),
            1 => " ?[0-9]{1,25}(ms|s|m|h|Ki|Mi|Gi|\\.[0-9]+)? ?",
            1 => ".{0,12}",
        ];
        (Just(var.to_owned()), value)
    });
    let anchors_file = prop::sample::select(vec!["", "/nonexistent/anchors.pem", "/dev/null"])
        .prop_map(|path| (TRUST_ANCHORS_FILE.to_owned(), path.to_owned()));
    let pair = prop_oneof![8 => variable, 1 => anchors_file];
    vec(pair, 0..10).prop_map(|pairs| pairs.into_iter().collect())
}

/// Any environment gives a configuration or an error that names a variable, and the value it
/// had when it was set (as the proxy trims it); a configuration keeps the bounds it promises.
#[test]
fn configuration_errors_name_the_variable_and_its_value() {
    fuzz(environment(), |env| {
        match Config::from_lookup(|var| env.get(var).cloned()) {
            Ok(config) => {
                prop_assert!((0.0..=1.0).contains(&config.trace_sample_rate));
                let limits = &config.limits;
                prop_assert!(limits.inbound_connections > 0 && limits.outbound_connections > 0);
                prop_assert!(limits.admin_connections > 0 && limits.endpoint_connections > 0);
                prop_assert!(limits.retry_buffer_bytes > 0);
                prop_assert!(limits.retry_buffer_connection_bytes > 0);
                for timeout in [
                    limits.http_header_read_timeout,
                    limits.tcp_idle_timeout,
                    limits.tls_handshake_timeout,
                ] {
                    prop_assert!(timeout > Duration::ZERO);
                }
                prop_assert!(!config.opaque_ports.contains(&0));
            }
            Err(error) => {
                prop_assert!(error.var.starts_with("MESH_PROXY_"), "{}", error);
                prop_assert!(error.to_string().contains(&error.var), "{}", error);
                prop_assert!(!error.reason.is_empty(), "{}", error);
                if let Some(value) = env.get(&error.var) {
                    prop_assert_eq!(&error.value, value.trim(), "{}", error);
                }
            }
        }
        Ok(())
    });
}

const DURATION_UNITS: &[(&str, u64)] = &[("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)];

/// A whole number and a unit is that duration, unless it overflows; nothing else is one.
#[test]
fn durations_parse_exactly() {
    fuzz(
        (
            prop_oneof![0..10_000u64, any::<u64>()],
            prop::sample::select(DURATION_UNITS),
            " {0,2}",
            ".{0,8}",
        ),
        |(number, (unit, millis), space, noise)| {
            let text = format!("{space}{number}{unit}{space}");
            let want = u128::from(number) * u128::from(millis);
            let parsed = parse_duration(&text);
            if let Some(duration) = parsed {
                prop_assert_eq!(duration.as_millis(), want);
            } else {
                // Only minutes and hours multiply; seconds past u64 cannot be a Duration.
                prop_assert!(want / 1000 > u128::from(u64::MAX));
            }
            let _ = parse_duration(&noise);
            Ok(())
        },
    );
}

const SIZE_UNITS: &[(&str, u32)] = &[("", 0), ("Ki", 10), ("Mi", 20), ("Gi", 30)];

/// A whole number and a binary suffix is that many bytes, unless it overflows.
#[test]
fn sizes_parse_exactly() {
    fuzz(
        (
            prop_oneof![0..100_000usize, any::<usize>()],
            prop::sample::select(SIZE_UNITS),
            ".{0,8}",
        ),
        |(number, (unit, shift), noise)| {
            let want = number.checked_mul(1usize << shift);
            prop_assert_eq!(parse_bytes(&format!("{number}{unit}")), want);
            prop_assert_eq!(parse_bytes(&format!(" {number}{unit} ")), want);
            let _ = parse_bytes(&noise);
            Ok(())
        },
    );
}

/// A list of ports and ranges, however spaced, is exactly the ports it names; anything
/// outside 1-65535 or a backwards range is an error naming the variable and the list.
#[test]
fn port_lists_are_exactly_their_ports() {
    let item = prop_oneof![
        any::<u16>().prop_map(|port| (u32::from(port), u32::from(port))),
        (any::<u16>(), 0..20u16)
            .prop_map(|(low, span)| { (u32::from(low), u32::from(low) + u32::from(span)) }),
        (65_530..70_000u32).prop_map(|port| (port, port)),
    ];
    fuzz(
        (vec((item, " {0,2}", prop::bool::ANY), 0..6), ".{0,10}"),
        |(items, noise)| {
            let mut text = String::new();
            let mut want = BTreeSet::new();
            let mut valid = true;
            for ((low, high), space, as_range) in &items {
                let item = if low == high && !as_range {
                    format!("{space}{low}{space}")
                } else {
                    format!("{space}{low}{space}-{space}{high}{space}")
                };
                text.push_str(&item);
                text.push(',');
                if *low == 0 || *high > 65_535 || low > high {
                    valid = false;
                } else {
                    want.extend(*low as u16..=*high as u16);
                }
            }
            match parse_ports("MESH_PROXY_OPAQUE_PORTS", &text) {
                Ok(ports) => {
                    prop_assert!(valid, "{:?} parsed", text);
                    prop_assert_eq!(ports, want);
                }
                Err(error) => {
                    prop_assert!(!valid, "{:?}: {}", text, error);
                    prop_assert_eq!(error.var, "MESH_PROXY_OPAQUE_PORTS");
                    prop_assert_eq!(error.value, text);
                }
            }
            if let Ok(ports) = parse_ports("MESH_PROXY_OPAQUE_PORTS", &noise) {
                prop_assert!(!ports.contains(&0));
            }
            Ok(())
        },
    );
}
