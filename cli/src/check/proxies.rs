//! The checks of the mesh's identity and proxies: the issuer and trust anchors, and each
//! meshed pod's proxy (ready, current, holding a valid certificate under the anchors).

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::ListParams;

use super::{Outcome, secret_text};
use crate::install::certs::{self, CertSummary, IdentityPem};
use crate::install::render::names;

/// The trust anchors and the issuer: valid for 60 more days, the issuer signed by an anchor.
pub(super) async fn identity_checks(client: &kube::Client, ns: &str) -> Vec<Outcome> {
    let rotate = "meshctl install --apply --identity-trust-anchors-file ANCHORS --identity-issuer-certificate-file CRT --identity-issuer-key-file KEY (an issuer signed by one of ANCHORS)";
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let anchors_pem = match config_maps.get_opt(names::TRUST_ROOTS).await {
        Ok(Some(cm)) => cm
            .data
            .and_then(|d| d.get(names::TRUST_ROOTS_KEY).cloned())
            .unwrap_or_default(),
        Ok(None) => String::new(),
        Err(e) => {
            return vec![Outcome::fail(
                "identity-trust-anchors",
                format!("cannot read ConfigMap {ns}/{}: {e}", names::TRUST_ROOTS),
                "check that you may read ConfigMaps in the control plane's namespace",
            )];
        }
    };
    let anchors = match certs::parse_bundle(&anchors_pem, "the trust anchors") {
        Ok(anchors) => anchors,
        Err(e) => {
            return vec![Outcome::fail(
                "identity-trust-anchors",
                format!("ConfigMap {ns}/{}: {e}", names::TRUST_ROOTS),
                rotate,
            )];
        }
    };
    let mut outcomes = vec![expiry_outcome(
        "identity-trust-anchors",
        "trust anchor",
        &anchors,
        rotate,
    )];

    let issuer = async {
        let field = |key| secret_text(client, ns, names::ISSUER_SECRET, key);
        Ok::<_, String>(IdentityPem {
            trust_anchors: anchors_pem.clone(),
            issuer_crt: field("tls.crt").await?,
            issuer_key: field("tls.key").await?,
        })
    };
    let outcome = match issuer.await {
        Err(e) => Outcome::fail("identity-issuer", e, rotate),
        Ok(identity) => match identity.validate(&format!("Secret {ns}/{}", names::ISSUER_SECRET)) {
            Err(e) => Outcome::fail("identity-issuer", e.to_string(), rotate),
            Ok(_) => match certs::parse_bundle(&identity.issuer_crt, "the issuer") {
                Ok(chain) => expiry_outcome(
                    "identity-issuer",
                    "issuer (signed by a trust anchor)",
                    &chain[..1],
                    rotate,
                ),
                Err(e) => Outcome::fail("identity-issuer", e.to_string(), rotate),
            },
        },
    };
    outcomes.push(outcome);
    outcomes
}

fn expiry_outcome(name: &str, what: &str, certs_: &[CertSummary], fix: &str) -> Outcome {
    match certs_.iter().min_by_key(|c| c.not_after) {
        Some(soonest) if soonest.remaining() >= certs::RENEW_BEFORE => Outcome::pass(
            name,
            format!(
                "{what} {} ({})",
                certs::describe_expiry(soonest),
                soonest.subject
            ),
        ),
        Some(soonest) => Outcome::fail(
            name,
            format!(
                "{what} {} ({}): less than 60 days left",
                certs::describe_expiry(soonest),
                soonest.subject
            ),
            fix,
        ),
        None => Outcome::fail(name, format!("no {what} certificate"), fix),
    }
}

/// Meshed pods whose proxy certificates are read at most (each is a port-forward).
const MAX_CERTIFICATE_READS: usize = 200;

/// How long one proxy may take to show its certificates.
const CERTIFICATE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The meshed pods' certificates, read from their proxies through the API server as
/// `meshctl identity POD` does: each has one, valid for more than a day, under the control
/// plane's trust anchors.
pub(super) async fn proxy_certificates_check(
    client: &kube::Client,
    control_plane_ns: &str,
    namespace: Option<&str>,
) -> Outcome {
    const NAME: &str = "proxy-certificates";
    let fix = "a proxy renews its certificate itself: see `meshctl identity POD -n NS` for its last \
               error and `kubectl -n mesh-system logs deploy/mesh-controller`; a proxy trusting \
               other anchors needs a restart (`kubectl rollout restart`) after an anchor change";
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), control_plane_ns);
    let anchors_pem = match config_maps.get_opt(names::TRUST_ROOTS).await {
        Ok(found) => found
            .and_then(|cm| cm.data)
            .and_then(|d| d.get(names::TRUST_ROOTS_KEY).cloned())
            .unwrap_or_default(),
        Err(e) => {
            return Outcome::fail(
                NAME,
                format!(
                    "cannot read the trust anchors {control_plane_ns}/{}: {e}",
                    names::TRUST_ROOTS
                ),
                "check that you may read ConfigMaps in the control plane's namespace",
            );
        }
    };
    let anchors = der_blocks(&anchors_pem);
    let list = match list_pods(client, namespace, NAME).await {
        Ok(list) => list,
        Err(failed) => return failed,
    };
    let meshed: Vec<(String, String)> = list
        .items
        .iter()
        .filter(|pod| {
            pod.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(mesh_injector::annotations::INJECTED))
                && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .filter_map(|pod| Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?)))
        .collect();
    let now = mesh_spiffe::report::Timestamp::now();
    let mut problems = Vec::new();
    for (ns, name) in meshed.iter().take(MAX_CERTIFICATE_READS) {
        let pod = format!("{ns}/{name}");
        match crate::identity::fetch_through_api_server(client, ns, name, CERTIFICATE_READ_TIMEOUT)
            .await
        {
            Ok(report) => problems.extend(certificate_problems(&pod, &report, &anchors, now)),
            Err(e) => problems.push(format!("{pod}: cannot read its certificates: {e:#}")),
        }
    }
    let read = meshed.len().min(MAX_CERTIFICATE_READS);
    let skipped = match meshed.len().saturating_sub(MAX_CERTIFICATE_READS) {
        0 => String::new(),
        n => format!(" ({n} more not read: name a namespace with -n)"),
    };
    if problems.is_empty() {
        Outcome::pass(
            NAME,
            format!(
                "{read} running meshed pod(s): every certificate valid, renewed in time, under the control plane's anchors{skipped}"
            ),
        )
    } else {
        Outcome::fail(NAME, format!("{}{skipped}", problems.join("; ")), fix)
    }
}

/// The DER of each certificate of a PEM bundle (nothing for what does not parse).
fn der_blocks(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|der| der.to_vec())
        .collect()
}

/// What is wrong with one proxy's certificates: none, expired, or expiring soon (within a day,
/// or, for leaves shorter-lived than five days such as the default 24 h ones, within a fifth
/// of their lifetime: the proxy renews at 70%, so such a leaf missed its renewal), or trust
/// anchors none of which is the control plane's (it would refuse the mesh's peers).
fn certificate_problems(
    pod: &str,
    report: &mesh_spiffe::report::IdentityReport,
    control_plane_anchors: &[Vec<u8>],
    now: mesh_spiffe::report::Timestamp,
) -> Vec<String> {
    use mesh_spiffe::report::IdentityState;
    const DAY: i64 = 24 * 60 * 60;
    let mut problems = Vec::new();
    match report.state {
        IdentityState::Disabled => problems.push(format!(
            "{pod}: its proxy runs without an identity (plaintext only)"
        )),
        IdentityState::Pending => problems.push(format!(
            "{pod}: its proxy has no certificate yet{}",
            report
                .last_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        )),
        IdentityState::Certified => {}
    }
    if let Some(leaf) = report.chain.first() {
        let left = leaf.not_after.0 - now.0;
        let lifetime = leaf.not_after.0 - leaf.not_before.0;
        let soon = DAY.min(lifetime / 5);
        if left <= 0 {
            problems.push(format!(
                "{pod}: its certificate expired {}h ago",
                -left / 3600
            ));
        } else if left < soon {
            problems.push(format!(
                "{pod}: its certificate expires in {}h {}m",
                left / 3600,
                left / 60 % 60
            ));
        }
    }
    if report.state != IdentityState::Disabled && !control_plane_anchors.is_empty() {
        let trusted = report
            .trust_anchors
            .iter()
            .flat_map(|anchor| der_blocks(&anchor.pem))
            .any(|der| control_plane_anchors.contains(&der));
        if !trusted {
            problems.push(format!(
                "{pod}: its proxy trusts anchors that are not the control plane's"
            ));
        }
    }
    problems
}

/// The command that replaces `pod` with a new one: a rollout restart of the workload that
/// owns it (a Deployment through its ReplicaSet, a StatefulSet, a DaemonSet), else deleting
/// the pod itself.
fn restart_command(pod: &Pod) -> String {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let workload = owner.and_then(|owner| match owner.kind.as_str() {
        // A Deployment's ReplicaSet is named <deployment>-<pod-template-hash>.
        "ReplicaSet" => {
            let hash = pod.metadata.labels.as_ref()?.get("pod-template-hash")?;
            let deployment = owner.name.strip_suffix(&format!("-{hash}"))?;
            Some(format!("deploy/{deployment}"))
        }
        "StatefulSet" => Some(format!("statefulset/{}", owner.name)),
        "DaemonSet" => Some(format!("daemonset/{}", owner.name)),
        _ => None,
    });
    match workload {
        Some(workload) => format!("kubectl -n {ns} rollout restart {workload}"),
        None => format!("kubectl -n {ns} delete pod {name}"),
    }
}

/// The pods of `namespace` (all namespaces when `None`), or the failed check `name` saying
/// they could not be listed.
async fn list_pods(
    client: &kube::Client,
    namespace: Option<&str>,
    name: &str,
) -> Result<kube::core::ObjectList<Pod>, Outcome> {
    let pods: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    pods.list(&ListParams::default()).await.map_err(|e| {
        Outcome::fail(
            name,
            format!("cannot list pods: {e}"),
            "check that you may list pods",
        )
    })
}

/// The meshed pods: their proxy is this version and ready.
pub(super) async fn proxy_check(client: &kube::Client, namespace: Option<&str>) -> Outcome {
    const NAME: &str = "proxies";
    let list = match list_pods(client, namespace, NAME).await {
        Ok(list) => list,
        Err(failed) => return failed,
    };
    let mut meshed = 0;
    let mut problems = Vec::new();
    // The restarts that give old proxies the current one, a line per workload.
    let mut restarts = std::collections::BTreeSet::new();
    for pod in &list.items {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let Some(version) = annotations.get(mesh_injector::annotations::INJECTED) else {
            continue;
        };
        meshed += 1;
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        if version != mesh_injector::VERSION {
            problems.push(format!(
                "{name} runs proxy {version}, not {}",
                mesh_injector::VERSION
            ));
            restarts.insert(restart_command(pod));
        }
        let status = pod.status.clone().unwrap_or_default();
        let proxy_ready = status
            .init_container_statuses
            .unwrap_or_default()
            .into_iter()
            .chain(status.container_statuses.unwrap_or_default())
            .find(|c| c.name == mesh_injector::PROXY_CONTAINER)
            .is_some_and(|c| c.ready);
        if !proxy_ready {
            problems.push(format!("{name}: its proxy is not ready"));
        }
    }
    if problems.is_empty() {
        Outcome::pass(
            NAME,
            format!("{meshed} meshed pod(s), every proxy ready and current"),
        )
    } else {
        let fix = if restarts.is_empty() {
            "see `kubectl logs POD -c mesh-proxy` and `kubectl describe pod POD`".to_owned()
        } else {
            let commands: Vec<String> = restarts.into_iter().collect();
            format!(
                "restart their workloads, whose new pods get the current proxy: {}",
                commands.join("; ")
            )
        };
        Outcome::fail(NAME, problems.join("; "), fix)
    }
}

#[cfg(test)]
mod tests {
    use mesh_spiffe::report::{CertificateReport, IdentityReport, IdentityState, Timestamp};

    use super::*;

    /// A report of `state` whose leaf ends at `not_after` and whose anchor is `anchor_pem`.
    fn report(state: IdentityState, not_after: i64, anchor_pem: &str) -> IdentityReport {
        let cert = |pem: &str| CertificateReport {
            subject: String::new(),
            issuer: String::new(),
            serial: String::new(),
            spiffe_id: None,
            not_before: Timestamp(0),
            not_after: Timestamp(not_after),
            pem: pem.to_owned(),
        };
        IdentityReport {
            state,
            chain: vec![cert("")],
            trust_anchors: vec![cert(anchor_pem)],
            ..IdentityReport::disabled()
        }
    }

    #[test]
    fn old_proxies_are_updated_by_restarting_their_workloads() {
        let pod = |owner: Option<(&str, &str)>, hash: Option<&str>| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": "web-5d8f7-abcde", "namespace": "shop",
                    "labels": hash.map(|h| serde_json::json!({"pod-template-hash": h})),
                    "ownerReferences": owner.map(|(kind, name)| serde_json::json!([{
                        "apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u",
                        "controller": true,
                    }])),
                },
            }))
            .expect("a pod")
        };
        let cases = [
            (
                pod(Some(("ReplicaSet", "web-5d8f7")), Some("5d8f7")),
                "kubectl -n shop rollout restart deploy/web",
            ),
            (
                pod(Some(("StatefulSet", "db")), None),
                "kubectl -n shop rollout restart statefulset/db",
            ),
            (
                pod(Some(("DaemonSet", "agent")), None),
                "kubectl -n shop rollout restart daemonset/agent",
            ),
            (
                pod(Some(("Job", "once")), None),
                "kubectl -n shop delete pod web-5d8f7-abcde",
            ),
            (
                pod(None, None),
                "kubectl -n shop delete pod web-5d8f7-abcde",
            ),
            // A ReplicaSet of its own (no Deployment) has no hash label.
            (
                pod(Some(("ReplicaSet", "web-5d8f7")), None),
                "kubectl -n shop delete pod web-5d8f7-abcde",
            ),
        ];
        for (pod, want) in cases {
            assert_eq!(restart_command(&pod), want);
        }
    }

    #[test]
    fn certificates_expiring_within_a_day_or_under_other_anchors_are_named() {
        let ours = mesh_controller::identity::GeneratedCa::generate(
            "cluster.local",
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        )
        .expect("a CA");
        let theirs = mesh_controller::identity::GeneratedCa::generate(
            "cluster.local",
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        )
        .expect("another CA");
        let anchors = der_blocks(&ours.trust_anchor.cert_pem);
        assert_eq!(anchors.len(), 1);
        let now = Timestamp(1_000_000);
        let ours_pem = ours.trust_anchor.cert_pem.as_str();
        let day = 24 * 3600;

        let healthy = report(IdentityState::Certified, now.0 + 2 * day, ours_pem);
        assert!(certificate_problems("shop/web", &healthy, &anchors, now).is_empty());
        // A default 24 h leaf: fresh is fine, 3 h before its end it missed its renewal.
        let mut fresh = report(IdentityState::Certified, now.0 + day - 60, ours_pem);
        fresh.chain[0].not_before = Timestamp(now.0 - 60);
        assert!(certificate_problems("shop/web", &fresh, &anchors, now).is_empty());
        let mut late = report(IdentityState::Certified, now.0 + 3 * 3600, ours_pem);
        late.chain[0].not_before = Timestamp(now.0 + 3 * 3600 - day);
        assert_eq!(
            certificate_problems("shop/web", &late, &anchors, now),
            ["shop/web: its certificate expires in 3h 0m"]
        );

        let soon = report(IdentityState::Certified, now.0 + 3 * 3600 + 120, ours_pem);
        assert_eq!(
            certificate_problems("shop/web", &soon, &anchors, now),
            ["shop/web: its certificate expires in 3h 2m"]
        );
        let expired = report(IdentityState::Certified, now.0 - 7200, ours_pem);
        assert_eq!(
            certificate_problems("shop/web", &expired, &anchors, now),
            ["shop/web: its certificate expired 2h ago"]
        );
        let foreign = report(
            IdentityState::Certified,
            now.0 + 2 * day,
            &theirs.trust_anchor.cert_pem,
        );
        assert_eq!(
            certificate_problems("shop/web", &foreign, &anchors, now),
            ["shop/web: its proxy trusts anchors that are not the control plane's"]
        );
        let mut pending = report(IdentityState::Pending, now.0 + 2 * day, ours_pem);
        pending.chain.clear();
        pending.last_error = Some("the controller is unreachable".to_owned());
        assert_eq!(
            certificate_problems("shop/web", &pending, &anchors, now),
            ["shop/web: its proxy has no certificate yet (the controller is unreachable)"]
        );
    }
}
