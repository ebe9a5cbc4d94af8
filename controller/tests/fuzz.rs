//! Fuzz targets for the controller's file backend, on stable Rust under plain `cargo test` /
//! `cargo nextest`: `file::parse_documents` (a YAML file into the objects discovery and policy
//! read) on arbitrary text, on YAML assembled from the constructs that break parsers, and on
//! documents of every kind it reads with arbitrary contents. Each runs for a few seconds
//! (`MESH_FUZZ_SECONDS` for longer; `just fuzz`). proptest rather than bolero: bolero 0.13
//! pins indexmap to exactly 2.11.2, which would downgrade the indexmap of the shipped binaries
//! (the runner says more).

#[path = "../../proxy/tests/fuzz/runner.rs"]
mod runner;

use mesh_controller::file::{ParseError, parse_documents};
use mesh_controller::objects::Kind;
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use runner::fuzz;

/// Lines of YAML: the constructs a parser must survive (anchors and aliases, tags, flow and
/// block nesting, block scalars, complex keys, document markers, tabs) among plain ones.
fn yaml_line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "apiVersion: v1",
            "apiVersion: policy.mesh.dev/v1alpha1",
            "kind: Service",
            "kind: Pod",
            "kind: List",
            "kind: Server",
            "metadata:",
            "  name: web",
            "  namespace: shop",
            "metadata: {name: web}",
            "spec:",
            "  ports: [{port: 80}]",
            "  ports: 80",
            "items:",
            "- apiVersion: v1",
            "  kind: Namespace",
            "---",
            "...",
            "%YAML 1.2",
            "a: &a [1, 2, 3]",
            "b: [*a, *a, *a, *a]",
            "c: *undefined",
            "<<: *a",
            "d: !!binary aGVsbG8=",
            "e: !custom x",
            "? [complex, key]",
            ": value",
            "f: |",
            "  literal text",
            "g: >-",
            "\tTAB: indented",
            "{",
            "[",
            "]",
            "'unterminated",
            "\"esc\\ape\"",
            "key: value # comment",
            "- - - nested",
            "",
        ])
        .prop_map(str::to_owned),
        1 => "[ -~]{0,16}",
        1 => ".{0,8}",
    ]
}

fn yaml_text() -> impl Strategy<Value = String> {
    prop_oneof![
        32 => vec(yaml_line(), 0..16).prop_map(|lines| lines.join("\n")),
        8 => ".{0,64}",
        // Deep nesting: the parser's depth budget, not the stack, must stop it.
        4 => (1..5000usize, prop::sample::select(vec!["[", "{a: ", "- "]))
            .prop_map(|(depth, open)| open.repeat(depth)),
        // Alias expansion: each level doubles what the last referred to, until the parser's
        // node budget stops it (from 16 levels; about a second each in a debug build, so rare).
        1 => (1..18usize).prop_map(|levels| {
            let mut text = "l0: &l0 [x, x]\n".to_owned();
            for level in 1..levels {
                let previous = level - 1;
                text.push_str(&format!("l{level}: &l{level} [*l{previous}, *l{previous}]\n"));
            }
            text
        }),
    ]
}

/// The number of documents a text can hold at most, for checking the positions errors name.
fn most_documents(text: &str) -> usize {
    text.matches("---").count() + text.matches("...").count() + 1
}

/// Parses `text` and checks the answer: objects, each with the namespace the API server
/// would give it, or a clear error (invalid YAML, or the position of the bad document).
/// Returns the objects' kinds or the error's message.
fn parse_and_check(text: &str) -> Result<Result<Vec<Kind>, String>, TestCaseError> {
    match parse_documents(text) {
        Ok(objects) => {
            for object in &objects {
                let key = object.key();
                if object.kind() == Kind::Namespace {
                    prop_assert!(key.namespace.is_empty(), "{}", key);
                } else {
                    prop_assert!(!key.namespace.is_empty(), "{}", key);
                }
            }
            Ok(Ok(objects.iter().map(|object| object.kind()).collect()))
        }
        Err(error) => {
            let message = error.to_string();
            match &error {
                ParseError::Yaml(_) => {
                    prop_assert!(message.starts_with("invalid YAML: "), "{}", message);
                }
                ParseError::NotAnObject { index } | ParseError::Object { index, .. } => {
                    prop_assert!(*index >= 1 && *index <= most_documents(text), "{}", message);
                    let position = format!("document {index}: ");
                    prop_assert!(message.starts_with(&position), "{}", message);
                }
            }
            prop_assert!(message.len() > "document 1: ".len(), "{}", message);
            Ok(Err(message))
        }
    }
}

/// Any text gives objects or an error saying what is wrong, without panicking or running out
/// of stack or memory; parsing the same text twice gives the same answer.
#[test]
fn any_text_parses_or_says_what_is_wrong() {
    fuzz(yaml_text(), |text| {
        let first = parse_and_check(&text)?;
        let second = parse_and_check(&text)?;
        prop_assert_eq!(first, second);
        Ok(())
    });
}

/// Any JSON value, a few levels deep, for the fields of a document.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        // Printable text: JSON may carry raw control characters that YAML does not allow.
        prop_oneof!["[a-z0-9.-]{0,8}", "\\PC{0,8}"].prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::from),
            vec(("[a-zA-Z]{1,8}", inner), 0..4)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Fields that each kind reads, so that documents sometimes fit and sometimes do not.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "ports", "selector", "clusterIP", "containers", "podIP", "endpoints", "addressType",
            "port", "podSelector", "targetRef", "requiredAuthenticationRefs", "identities",
            "networks", "rules", "parentRefs", "hostnames", "matches", "backendRefs",
            "serviceAccountName", "annotations", "items", "trafficPolicy", "cidr", "except",
        ])
        .prop_map(str::to_owned),
        1 => "[a-zA-Z]{1,8}",
    ]
}

/// One document of a kind the backend reads (or a kind it skips, or a List of documents).
fn document() -> impl Strategy<Value = Value> {
    let kind = prop::sample::select(vec![
        ("v1", "Namespace"),
        ("v1", "Service"),
        ("v1", "Pod"),
        ("v1", "ServiceAccount"),
        ("discovery.k8s.io/v1", "EndpointSlice"),
        ("policy.mesh.dev/v1alpha1", "Server"),
        ("policy.mesh.dev/v1alpha1", "AuthorizationPolicy"),
        ("policy.mesh.dev/v1alpha1", "MeshTLSAuthentication"),
        ("policy.mesh.dev/v1alpha1", "NetworkAuthentication"),
        ("policy.mesh.dev/v1alpha1", "HTTPLocalRateLimitPolicy"),
        ("policy.mesh.dev/v1alpha1", "EgressNetwork"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        ("gateway.networking.k8s.io/v1beta1", "GRPCRoute"),
        ("gateway.networking.k8s.io/v1alpha2", "TLSRoute"),
        ("gateway.networking.k8s.io/v1alpha2", "TCPRoute"),
        ("apps/v1", "Deployment"),
        ("v1", "List"),
        ("v2", "Pod"),
    ]);
    let metadata = (
        prop_oneof!["web", "\\PC{0,8}"],
        prop::option::of(prop_oneof!["shop", "", "\\PC{0,4}"]),
    )
        .prop_map(|(name, namespace)| match namespace {
            Some(namespace) => json!({"name": name, "namespace": namespace}),
            None => json!({"name": name}),
        });
    let spec = vec((field_name(), any_json()), 0..4)
        .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>()));
    (
        kind,
        metadata,
        prop::option::of(spec),
        vec(any_json(), 0..3),
    )
        .prop_map(|((api_version, kind), metadata, spec, items)| {
            let mut document =
                json!({"apiVersion": api_version, "kind": kind, "metadata": metadata});
            if let Some(spec) = spec {
                document["spec"] = spec;
            }
            if kind == "List" {
                document["items"] = Value::from(items);
            }
            document
        })
}

/// Documents of every kind with arbitrary contents, as a multi-document file (JSON is YAML):
/// the file parses, or the error names the first document that does not fit, by position,
/// with the kind and name it claimed.
#[test]
fn documents_of_every_kind_parse_or_name_the_one_at_fault() {
    fuzz(vec(document(), 1..5), |documents| {
        let text = documents
            .iter()
            .map(|document| serde_json::to_string(document).expect("encodes"))
            .collect::<Vec<_>>()
            .join("\n---\n");
        match parse_documents(&text) {
            Ok(objects) => {
                // Every document of a kind the backend reads became an object.
                let read = documents
                    .iter()
                    .filter(|d| !matches!(d["kind"].as_str(), Some("List" | "Deployment")))
                    .filter(|d| d["apiVersion"] != "v2")
                    .count();
                prop_assert!(
                    objects.len() >= read,
                    "{} objects of {} documents",
                    objects.len(),
                    read
                );
            }
            Err(ParseError::Object { index, source }) => {
                let document = &documents[index - 1];
                let claimed = document["kind"].as_str().unwrap_or_default();
                let items = document["items"].as_array().cloned().unwrap_or_default();
                let claimed_by_item = items
                    .iter()
                    .any(|item| item.get("kind").and_then(Value::as_str) == Some(&source.kind));
                prop_assert!(
                    source.kind == claimed || claimed_by_item,
                    "document {} claimed {}, the error says {}",
                    index,
                    claimed,
                    source
                );
            }
            Err(ParseError::NotAnObject { index }) => {
                let document = &documents[index - 1];
                prop_assert_eq!(
                    document["kind"].as_str(),
                    Some("List"),
                    "document {}",
                    index
                );
            }
            Err(error @ ParseError::Yaml(_)) => {
                return Err(TestCaseError::fail(format!(
                    "JSON that is not YAML: {error}"
                )));
            }
        }
        Ok(())
    });
}
