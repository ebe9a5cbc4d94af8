//! Wire compatibility: proxies of the previous version keep talking to a newer controller (and
//! the other way round during an upgrade), so no field, enum value or RPC that was released may
//! change its number, type or cardinality or vanish without its number being reserved. The
//! released shape is recorded in `compat/baseline.txt`, one line per field, enum value and
//! RPC, as this test derives it from the compiled descriptors; the test compares the current
//! protos against it, like `buf breaking`.
//!
//! A change that only adds fails too, until it is recorded:
//! `MESH_UPDATE_PROTO_BASELINE=1 cargo test -p mesh-proto --test compat`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use prost::Message as _;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

fn baseline_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("compat/baseline.txt")
}

/// What the wire sees of the protos: field and value numbers with their kinds, and RPCs.
#[derive(Debug, Default)]
struct Shape {
    /// `message #number` -> `name type label`.
    fields: BTreeMap<String, String>,
    /// `message` -> its reserved numbers.
    reserved: BTreeMap<String, BTreeSet<i32>>,
    /// `enum =number` -> `name`.
    values: BTreeMap<String, String>,
    /// `service/method` -> `input -> output, streaming`.
    rpcs: BTreeMap<String, String>,
}

impl Shape {
    fn of(set: &FileDescriptorSet) -> Shape {
        let mut shape = Shape::default();
        for file in &set.file {
            let package = file.package();
            for message in &file.message_type {
                shape.message(&format!("{package}.{}", message.name()), message);
            }
            for e in &file.enum_type {
                shape.enumeration(&format!("{package}.{}", e.name()), e);
            }
            for service in &file.service {
                for method in &service.method {
                    shape.rpcs.insert(
                        format!("{package}.{}/{}", service.name(), method.name()),
                        format!(
                            "{} -> {}, client streaming {}, server streaming {}",
                            method.input_type(),
                            method.output_type(),
                            method.client_streaming(),
                            method.server_streaming()
                        ),
                    );
                }
            }
        }
        shape
    }

    fn message(&mut self, name: &str, message: &DescriptorProto) {
        for field in &message.field {
            // A oneof member and a proto3 optional differ in generated code, not on the wire.
            let kind = match field.type_name() {
                "" => format!("{:?}", field.r#type()),
                type_name => type_name.to_owned(),
            };
            self.fields.insert(
                format!("{name} #{}", field.number()),
                format!("{} {kind} {:?}", field.name(), field.label()),
            );
        }
        let reserved = self.reserved.entry(name.to_owned()).or_default();
        for range in &message.reserved_range {
            // Descriptor ranges are end-exclusive.
            reserved.extend(range.start()..range.end());
        }
        for nested in &message.nested_type {
            self.message(&format!("{name}.{}", nested.name()), nested);
        }
        for e in &message.enum_type {
            self.enumeration(&format!("{name}.{}", e.name()), e);
        }
    }

    fn enumeration(&mut self, name: &str, e: &EnumDescriptorProto) {
        for value in &e.value {
            self.values.insert(
                format!("{name} ={}", value.number()),
                value.name().to_owned(),
            );
        }
    }

    /// The baseline's text: sorted, one fact a line.
    fn lines(&self) -> Vec<String> {
        let fields = self.fields.iter().map(|(k, v)| format!("field {k}: {v}"));
        let values = self.values.iter().map(|(k, v)| format!("value {k}: {v}"));
        let rpcs = self.rpcs.iter().map(|(k, v)| format!("rpc {k}: {v}"));
        fields.chain(values).chain(rpcs).collect()
    }
}

/// Why `now` breaks what `released` promised, one reason a line.
fn breaks(released: &[String], now: &Shape) -> Vec<String> {
    let current: BTreeSet<String> = now.lines().into_iter().collect();
    let mut problems = Vec::new();
    for line in released {
        if current.contains(line) {
            continue;
        }
        let Some((what, _)) = line.split_once(": ") else {
            problems.push(format!("unreadable baseline line {line:?}"));
            continue;
        };
        // A field may be renamed (the wire knows numbers only), or removed with its number
        // reserved; anything else breaks released peers.
        if let Some(key) = what.strip_prefix("field ") {
            let released_kind = line.split_once(": ").map(|(_, v)| v).unwrap_or_default();
            let kind_of = |v: &str| v.split_once(' ').map(|(_, k)| k.to_owned());
            match now.fields.get(key) {
                Some(v) if kind_of(v) == kind_of(released_kind) => continue,
                Some(v) => problems.push(format!("{key} was `{released_kind}`, is `{v}`")),
                None => {
                    let (message, number) = key.rsplit_once(" #").unwrap_or((key, "0"));
                    let number: i32 = number.parse().unwrap_or(0);
                    if !now
                        .reserved
                        .get(message)
                        .is_some_and(|r| r.contains(&number))
                    {
                        problems.push(format!(
                            "{key} (`{released_kind}`) was removed without `reserved {number};`"
                        ));
                    }
                }
            }
        } else {
            problems.push(format!("{line} changed or was removed"));
        }
    }
    problems
}

#[test]
fn released_protos_keep_their_wire_format() {
    let set = FileDescriptorSet::decode(DESCRIPTORS).expect("the build's descriptors");
    let now = Shape::of(&set);
    let lines = now.lines();
    assert!(lines.len() > 50, "too few facts: {lines:?}");
    if std::env::var_os("MESH_UPDATE_PROTO_BASELINE").is_some() {
        std::fs::create_dir_all(baseline_path().parent().expect("a folder")).expect("mkdir");
        std::fs::write(baseline_path(), lines.join("\n") + "\n").expect("write the baseline");
        return;
    }
    let released: Vec<String> = std::fs::read_to_string(baseline_path())
        .expect("compat/baseline.txt (record it with MESH_UPDATE_PROTO_BASELINE=1)")
        .lines()
        .map(str::to_owned)
        .collect();
    let problems = breaks(&released, &now);
    assert!(
        problems.is_empty(),
        "the protos break released peers:\n{}",
        problems.join("\n")
    );
    let known: BTreeSet<&String> = released.iter().collect();
    let added: Vec<&String> = lines.iter().filter(|l| !known.contains(l)).collect();
    assert!(
        added.is_empty(),
        "new in the protos, not yet recorded (MESH_UPDATE_PROTO_BASELINE=1 cargo test -p \
         mesh-proto --test compat):\n{}",
        added
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_changed_number_type_or_rpc_is_a_break_and_a_reserved_removal_is_not() {
    let set = FileDescriptorSet::decode(DESCRIPTORS).expect("the build's descriptors");
    let now = Shape::of(&set);
    let lines = now.lines();
    assert!(breaks(&lines, &now).is_empty());
    let field = lines
        .iter()
        .find(|l| l.starts_with("field "))
        .expect("a field")
        .clone();
    // The same number recorded with another type: a break.
    let (key, value) = field.split_once(": ").expect("field line");
    let (name, _) = value.split_once(' ').expect("name and kind");
    let retyped = format!("{key}: {name} TYPE_BYTES LABEL_REPEATED");
    assert_eq!(breaks(&[retyped], &now).len(), 1);
    // A renamed field (same number and kind): fine.
    let renamed = format!("{key}: renamed {}", value.split_once(' ').expect("kind").1);
    assert!(breaks(&[renamed], &now).is_empty());
    // A field number that exists no more and is not reserved: a break.
    let gone = "field mesh.destination.v1.GetDestination #999: old TYPE_STRING LABEL_OPTIONAL";
    assert_eq!(breaks(&[gone.to_owned()], &now).len(), 1, "{gone}");
    // An RPC whose streaming changed: a break.
    let rpc = lines
        .iter()
        .find(|l| l.starts_with("rpc ") && l.ends_with("server streaming true"))
        .expect("a server-streaming rpc");
    let unary = rpc.replace("server streaming true", "server streaming false");
    assert_eq!(breaks(&[unary], &now).len(), 1);
}
