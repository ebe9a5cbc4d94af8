//! The Helm chart and `meshctl install` make the same objects from the same values.
//!
//! The chart's templates are rendered with gtmpl, a Go text/template engine, given the few
//! Sprig functions they use (quote, b64enc, required) with Helm's meaning. Helm itself is not
//! to be had on this machine; the templates stick to what both engines agree on.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use gtmpl_value::{FuncError, Number, Value as Gv};
use serde_json::{Value, json};

use super::certs::{IdentityPem, WebhookPem};
use super::{render, values, values_tree};

fn to_gtmpl(value: &Value) -> Gv {
    match value {
        Value::Null => Gv::Nil,
        Value::Bool(b) => Gv::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Gv::Number(Number::from(u)),
            (None, Some(i), _) => Gv::Number(Number::from(i)),
            (_, _, Some(f)) => Gv::Number(Number::from(f)),
            _ => Gv::Nil,
        },
        Value::String(s) => Gv::String(s.clone()),
        Value::Array(items) => Gv::Array(items.iter().map(to_gtmpl).collect()),
        Value::Object(map) => Gv::Map(
            map.iter()
                .map(|(k, v)| (k.clone(), to_gtmpl(v)))
                .collect::<HashMap<_, _>>(),
        ),
    }
}

fn as_text(value: &Gv) -> String {
    match value {
        Gv::String(s) => s.clone(),
        Gv::NoValue | Gv::Nil => String::new(),
        other => other.to_string(),
    }
}

/// Sprig's `quote`: Go's `%q` of the value as a string.
fn quote(args: &[Gv]) -> Result<Gv, FuncError> {
    let text = args.first().map(as_text).unwrap_or_default();
    let mut quoted = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            '\r' => quoted.push_str("\\r"),
            c if c.is_control() => quoted.push_str(&format!("\\x{:02x}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    Ok(Gv::String(quoted))
}

/// Sprig's `b64enc`.
fn b64enc(args: &[Gv]) -> Result<Gv, FuncError> {
    let text = args.first().map(as_text).unwrap_or_default();
    let encoded = render::base64_encode(text.as_bytes());
    Ok(Gv::String(encoded.as_str().unwrap_or_default().to_owned()))
}

/// Helm's `required MESSAGE VALUE`: fails the render on an empty value.
fn required(args: &[Gv]) -> Result<Gv, FuncError> {
    let [message, value] = args else {
        return Err(FuncError::ExactlyXArgs("required".into(), 2));
    };
    if as_text(value).is_empty() {
        return Err(FuncError::Generic(as_text(message)));
    }
    Ok(value.clone())
}

/// `helm template`'s objects for `values`: every template under `charts/mesh/templates/`
/// plus the `crds/` folder.
fn render_chart(values: &Value) -> Result<Vec<Value>, String> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/mesh");
    let context = gtmpl::Context::from(to_gtmpl(&json!({
        "Values": values,
        "Release": {"Name": "mesh", "Namespace": values["namespace"]},
    })));
    let mut objects = Vec::new();
    for folder in ["crds", "templates"] {
        let mut files: Vec<_> = std::fs::read_dir(chart.join(folder))
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
            let mut template = gtmpl::Template::default();
            template.add_func("quote", quote);
            template.add_func("b64enc", b64enc);
            template.add_func("required", required);
            template
                .parse(text)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            let rendered = template
                .render(&context)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            let documents: Vec<Value> = serde_saphyr::from_multiple(&rendered)
                .map_err(|e| format!("{}: rendered YAML: {e}\n{rendered}", file.display()))?;
            objects.extend(documents.into_iter().filter(|d| !d.is_null()));
        }
    }
    Ok(objects)
}

fn keyed(objects: Vec<Value>) -> BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|object| (crate::kubernetes::describe(&object), object))
        .collect()
}

fn values_for(overlay: Value) -> values::Values {
    let mut tree = values::default_tree().expect("the chart's values parse");
    values::overlay(&mut tree, overlay);
    let mut values = values::Values::from_tree(tree).expect("valid values");
    let identity = IdentityPem::generate("cluster.local").expect("identity");
    let webhook = WebhookPem::generate("mesh-system", "cluster.local", "").expect("webhook");
    values.identity.trust_anchors_pem = identity.trust_anchors;
    values.identity.issuer.crt_pem = identity.issuer_crt;
    values.identity.issuer.key_pem = identity.issuer_key;
    values.webhook.ca_bundle_pem = webhook.ca_bundle;
    values.webhook.crt_pem = webhook.crt;
    values.webhook.key_pem = webhook.key;
    values
}

fn assert_same_objects(values: &values::Values) {
    let mut installed = render::crds().expect("CRDs parse");
    installed.extend(render::control_plane(values));
    let installed = keyed(installed);
    let charted = keyed(render_chart(&values_tree(values)).expect("the chart renders"));
    assert_eq!(
        installed.keys().collect::<Vec<_>>(),
        charted.keys().collect::<Vec<_>>(),
        "the chart and meshctl install make different sets of objects"
    );
    for (key, object) in &installed {
        assert_eq!(
            object, &charted[key],
            "{key} differs between meshctl install (left) and the chart (right)"
        );
    }
}

#[test]
fn the_chart_renders_what_install_prints_for_the_default_values() {
    assert_same_objects(&values_for(json!({})));
}

#[test]
fn the_chart_renders_what_install_prints_with_ha_and_an_external_webhook() {
    assert_same_objects(&values_for(json!({
        "ha": true,
        "namespace": "mesh",
        "webhook": {"url": "https://127.0.0.1:9443/inject", "failurePolicy": "Fail"},
        "proxy": {"cpuLimit": "1", "defaultInboundPolicy": "deny"},
    })));
}

#[test]
fn the_chart_renders_what_install_prints_with_multicluster() {
    let values = values_for(json!({"multicluster": {"enabled": true}}));
    assert_same_objects(&values);
    assert_same_objects(&values_for(json!({
        "ha": true,
        "multicluster": {"enabled": true, "gateway": {"enabled": true, "serviceType": "NodePort"}},
    })));
    let objects = render::control_plane(&values);
    let role = objects
        .iter()
        .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == "mesh-controller-multicluster")
        .expect("the multicluster Role");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]),
        "Secrets are read in the control plane's namespace only"
    );
    let without = render::control_plane(&values_for(json!({})));
    assert!(
        !without
            .iter()
            .any(|o| o["metadata"]["name"] == "mesh-controller-multicluster"),
        "off by default: no Secret is read, no Service written"
    );
}

/// The chart's `templates/dashboards.yaml`: one ConfigMap per dashboard, its JSON a YAML
/// double-quoted string (JSON's escapes are YAML's) with each `{{` of Grafana's legends
/// escaped for the template engine.
fn dashboards_template() -> String {
    let mut text = String::from(
        "# Generated from charts/mesh/dashboards/ by `MESH_UPDATE_CHART=1 cargo test -p meshctl chart`;\n\
         # do not edit.\n{{- if .Values.dashboards }}\n",
    );
    for (name, json) in crate::observability::DASHBOARDS {
        let literal = serde_json::to_string(&render::compact_json(json)).expect("a JSON string");
        let literal = literal.replace("{{", "{{ \"{{\" }}");
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: grafana-dashboard-{name}\n  \
             namespace: {{{{ .Values.namespace }}}}\n  labels:\n    app.kubernetes.io/name: mesh-dashboards\n    \
             app.kubernetes.io/part-of: mesh\n    mesh.dev/control-plane-ns: {{{{ .Values.namespace }}}}\n    \
             grafana_dashboard: \"1\"\ndata:\n  {name}.json: {literal}\n"
        ));
    }
    text.push_str("{{- end }}\n");
    text
}

#[test]
fn the_dashboards_template_is_generated_from_the_dashboards() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/mesh/templates/dashboards.yaml");
    let generated = dashboards_template();
    if std::env::var_os("MESH_UPDATE_CHART").is_some() {
        std::fs::write(&path, &generated).expect("write the template");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{} is out of date: run `MESH_UPDATE_CHART=1 cargo test -p meshctl chart` and commit it",
        path.display()
    );
}

#[test]
fn without_dashboards_neither_makes_them() {
    let values = values_for(json!({"dashboards": false}));
    assert!(render::dashboards(&values).is_empty());
    assert_same_objects(&values);
}

#[test]
fn the_chart_refuses_missing_keys_like_helm() {
    let values = values_for(json!({}));
    let mut tree = values_tree(&values);
    tree["identity"]["issuer"]["crtPEM"] = json!("");
    let error = render_chart(&tree).expect_err("refused");
    assert!(
        error.contains("identity.issuer.crtPEM is required"),
        "{error}"
    );
}
