//! `meshctl check --multicluster`: for each linked cluster, is its link valid, is its API
//! server reachable with the link's credentials, are the mirrors in step with what it exports,
//! and do the two clusters share a trust anchor (without one, neither verifies the other's
//! workloads)?

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::Api;
use kube::api::ListParams;
use mesh_controller::multicluster::Link;
use mesh_controller::multicluster::link::LABEL_LINK;
use mesh_controller::multicluster::mirror::{LABEL_EXPORTED, LABEL_MIRROR_CLUSTER, mirror_name};

use super::Outcome;
use crate::install::render::names;

/// How long a linked cluster's API server may take to answer.
const REMOTE_PATIENCE: Duration = Duration::from_secs(10);

/// (namespace, name) of a Service.
type Key = (String, String);

/// The mirrors missing here and the ones left over, as `namespace/name`.
pub fn drift(
    cluster: &str,
    exported: &BTreeSet<Key>,
    mirrors: &BTreeSet<Key>,
) -> (Vec<String>, Vec<String>) {
    let wanted: BTreeSet<Key> = exported
        .iter()
        .map(|(ns, name)| (ns.clone(), mirror_name(name, cluster)))
        .collect();
    let show = |keys: std::collections::btree_set::Difference<'_, Key>| {
        keys.map(|(ns, name)| format!("{ns}/{name}")).collect()
    };
    (
        show(wanted.difference(mirrors)),
        show(mirrors.difference(&wanted)),
    )
}

/// The base64 bodies of the certificates in a PEM bundle: what two bundles compare by.
fn certificates(pem: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut body: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        if line == "-----BEGIN CERTIFICATE-----" {
            body = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            out.extend(body.take());
        } else if let Some(body) = body.as_mut() {
            body.push_str(line);
        }
    }
    out
}

/// Whether two trust anchor bundles have a certificate in common.
pub fn share_an_anchor(local: &str, remote: &str) -> bool {
    !certificates(local).is_disjoint(&certificates(remote))
}

fn keys(services: Vec<Service>) -> BTreeSet<Key> {
    services
        .into_iter()
        .map(|s| {
            (
                s.metadata.namespace.unwrap_or_default(),
                s.metadata.name.unwrap_or_default(),
            )
        })
        .collect()
}

async fn anchors(client: &kube::Client, ns: &str) -> Result<String, String> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match maps.get_opt(names::TRUST_ROOTS).await {
        Ok(Some(map)) => map
            .data
            .and_then(|d| d.get(names::TRUST_ROOTS_KEY).cloned())
            .ok_or_else(|| {
                format!(
                    "ConfigMap {ns}/{} has no {}",
                    names::TRUST_ROOTS,
                    names::TRUST_ROOTS_KEY
                )
            }),
        Ok(None) => Err(format!(
            "ConfigMap {ns}/{} does not exist",
            names::TRUST_ROOTS
        )),
        Err(e) => Err(format!(
            "cannot read ConfigMap {ns}/{}: {e}",
            names::TRUST_ROOTS
        )),
    }
}

/// Every multicluster check of the cluster `client` reaches, whose control plane is in `ns`.
pub(super) async fn multicluster_checks(
    client: &kube::Client,
    ns: &str,
    trust_domain: &str,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let links = match secrets
        .list(&ListParams::default().labels(LABEL_LINK))
        .await
    {
        Ok(list) => list.items,
        Err(e) => {
            outcomes.push(Outcome::fail(
                "multicluster-links",
                format!("cannot list the link Secrets of {ns}: {e}"),
                "run check as a user who may list Secrets in the control plane's namespace",
            ));
            return outcomes;
        }
    };
    if links.is_empty() {
        outcomes.push(Outcome::fail(
            "multicluster-links",
            format!("no cluster is linked (no Secret labelled {LABEL_LINK} in {ns})"),
            "meshctl --context OTHER multicluster link --cluster-name OTHER | kubectl apply -f -",
        ));
        return outcomes;
    }
    outcomes.push(mirroring_enabled(client, ns).await);
    let local_anchors = anchors(client, ns).await;
    for secret in &links {
        let secret_name = secret.metadata.name.clone().unwrap_or_default();
        let link = match Link::from_secret(secret, trust_domain) {
            Ok(link) => link,
            Err(e) => {
                outcomes.push(Outcome::fail(
                    &format!("multicluster-link/{secret_name}"),
                    format!("Secret {ns}/{secret_name} is not a valid link: {e}"),
                    "link again: meshctl --context OTHER multicluster link --cluster-name OTHER | kubectl apply -f -",
                ));
                continue;
            }
        };
        outcomes.extend(link_checks(client, ns, &link, &local_anchors).await);
    }
    outcomes
}

/// Whether the controller is told to mirror (installed with `--multicluster`).
async fn mirroring_enabled(client: &kube::Client, ns: &str) -> Outcome {
    const NAME: &str = "multicluster-controller";
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let args: Vec<String> = match deployments.get_opt(names::CONTROLLER).await {
        Ok(Some(deployment)) => deployment
            .spec
            .and_then(|s| s.template.spec)
            .map(|s| {
                s.containers
                    .into_iter()
                    .flat_map(|c| c.args.unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default(),
        Ok(None) => {
            return Outcome::fail(
                NAME,
                format!("deployment {ns}/{} does not exist", names::CONTROLLER),
                "meshctl install --multicluster --apply",
            );
        }
        Err(e) => {
            return Outcome::fail(
                NAME,
                format!("cannot read deploy/{}: {e}", names::CONTROLLER),
                format!("kubectl -n {ns} get deploy/{}", names::CONTROLLER),
            );
        }
    };
    if args
        .iter()
        .any(|a| a.starts_with("--multicluster-namespace"))
    {
        Outcome::pass(NAME, "the controller mirrors linked clusters' Services")
    } else {
        Outcome::fail(
            NAME,
            "the controller is not installed to mirror linked clusters: links are ignored",
            "meshctl upgrade --multicluster",
        )
    }
}

/// Reachability, mirrors in step, and a shared anchor, for one link.
async fn link_checks(
    client: &kube::Client,
    ns: &str,
    link: &Link,
    local_anchors: &Result<String, String>,
) -> Vec<Outcome> {
    let cluster = &link.cluster;
    let relink = format!(
        "link again: meshctl --context {cluster} multicluster link --cluster-name {cluster} | kubectl apply -f -"
    );
    let reach = format!("multicluster-reach/{cluster}");
    let remote = match link.client().await {
        Ok(remote) => remote,
        Err(e) => {
            return vec![Outcome::fail(
                &reach,
                format!("the link's kubeconfig: {e}"),
                relink,
            )];
        }
    };
    let services: Api<Service> = Api::all(remote.clone());
    let exported = tokio::time::timeout(
        REMOTE_PATIENCE,
        services.list(&ListParams::default().labels(&format!("{LABEL_EXPORTED}=true"))),
    )
    .await;
    let exported = match exported {
        Ok(Ok(list)) => keys(list.items),
        Ok(Err(e)) => {
            return vec![Outcome::fail(
                &reach,
                format!("cannot list {cluster}'s Services with the link's credentials: {e}"),
                relink,
            )];
        }
        Err(_) => {
            return vec![Outcome::fail(
                &reach,
                format!(
                    "{cluster}'s API server did not answer within {}s",
                    REMOTE_PATIENCE.as_secs()
                ),
                format!("check that this cluster reaches {cluster}'s API server, or {relink}"),
            )];
        }
    };
    let mut outcomes = vec![Outcome::pass(
        &reach,
        format!(
            "{cluster}'s API server answers; it exports {} Service(s)",
            exported.len()
        ),
    )];

    let local: Api<Service> = Api::all(client.clone());
    let mirrors_name = format!("multicluster-mirrors/{cluster}");
    match local
        .list(&ListParams::default().labels(&format!("{LABEL_MIRROR_CLUSTER}={cluster}")))
        .await
    {
        Ok(list) => {
            let (missing, extra) = drift(cluster, &exported, &keys(list.items));
            if missing.is_empty() && extra.is_empty() {
                outcomes.push(Outcome::pass(
                    &mirrors_name,
                    format!("{} mirror(s) in step", exported.len()),
                ));
            } else {
                let mut detail = Vec::new();
                if !missing.is_empty() {
                    detail.push(format!("missing {}", missing.join(", ")));
                }
                if !extra.is_empty() {
                    detail.push(format!("left over {}", extra.join(", ")));
                }
                outcomes.push(Outcome::fail(
                    &mirrors_name,
                    format!("mirrors out of step with {cluster}: {}", detail.join("; ")),
                    format!(
                        "kubectl -n {ns} logs deploy/{} | grep -i mirror (a namespace missing here, or a Service of that name that is not a mirror)",
                        names::CONTROLLER
                    ),
                ));
            }
        }
        Err(e) => outcomes.push(Outcome::fail(
            &mirrors_name,
            format!("cannot list the mirrors: {e}"),
            "kubectl get services -A -l multicluster.mesh.dev/cluster",
        )),
    }

    if let Some(gateway) = &link.gateway {
        outcomes.push(gateway_check(cluster, gateway.addr).await);
    }

    let anchors_name = format!("multicluster-anchors/{cluster}");
    let remote_anchors = anchors(&remote, ns).await;
    outcomes.push(match (local_anchors.as_ref(), remote_anchors.as_ref()) {
        (Ok(local), Ok(remote)) if share_an_anchor(local, remote) => {
            Outcome::pass(&anchors_name, format!("this cluster and {cluster} share a trust anchor"))
        }
        (Ok(_), Ok(_)) => Outcome::fail(
            &anchors_name,
            format!("this cluster and {cluster} have no trust anchor in common: their proxies cannot verify each other"),
            "install both with the same --identity-trust-anchors-file (each with its own issuer)",
        ),
        (Err(e), _) | (_, Err(e)) => Outcome::fail(&anchors_name, e.clone(), "meshctl check (identity) on each cluster"),
    });
    outcomes
}

/// Whether the linked cluster's gateway accepts connections, from where meshctl runs (the
/// proxies' network may differ: this catches a wrong address or a gateway that is down).
async fn gateway_check(cluster: &str, addr: std::net::SocketAddr) -> Outcome {
    let name = format!("multicluster-gateway/{cluster}");
    match tokio::time::timeout(REMOTE_PATIENCE, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Outcome::pass(
            &name,
            format!("{cluster}'s gateway at {addr} accepts connections"),
        ),
        Ok(Err(e)) => Outcome::fail(
            &name,
            format!("{cluster}'s gateway at {addr} refuses connections: {e}"),
            format!(
                "kubectl --context {cluster} -n mesh-system get deploy,svc mesh-gateway; or link again with the right --gateway-address"
            ),
        ),
        Err(_) => Outcome::fail(
            &name,
            format!(
                "{cluster}'s gateway at {addr} did not answer within {}s",
                REMOTE_PATIENCE.as_secs()
            ),
            "check that this network reaches the gateway's Service (LoadBalancer, firewall)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(keys: &[(&str, &str)]) -> BTreeSet<Key> {
        keys.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn mirrors_are_compared_with_what_the_cluster_exports() {
        let exported = set(&[("shop", "books"), ("shop", "authors")]);
        let cases: [(BTreeSet<Key>, Vec<&str>, Vec<&str>); 3] = [
            (
                set(&[("shop", "books-east"), ("shop", "authors-east")]),
                vec![],
                vec![],
            ),
            (
                set(&[("shop", "books-east")]),
                vec!["shop/authors-east"],
                vec![],
            ),
            (
                set(&[
                    ("shop", "books-east"),
                    ("shop", "authors-east"),
                    ("web", "old-east"),
                ]),
                vec![],
                vec!["web/old-east"],
            ),
        ];
        for (mirrors, missing, extra) in cases {
            assert_eq!(
                drift("east", &exported, &mirrors),
                (
                    missing.into_iter().map(str::to_owned).collect(),
                    extra.into_iter().map(str::to_owned).collect()
                )
            );
        }
    }

    #[test]
    fn anchors_are_shared_when_one_certificate_is_in_both_bundles() {
        let a = "-----BEGIN CERTIFICATE-----\nAAAA\nBBBB\n-----END CERTIFICATE-----\n";
        let b = "-----BEGIN CERTIFICATE-----\nCCCC\n-----END CERTIFICATE-----\n";
        let both = format!("{b}{a}");
        assert!(
            share_an_anchor(a, &both),
            "a bundle of old and new during a rotation"
        );
        assert!(
            share_an_anchor(&a.replace('\n', "\r\n"), a),
            "line endings do not matter"
        );
        assert!(!share_an_anchor(a, b));
        assert!(!share_an_anchor("", ""), "nothing is not a shared anchor");
    }

    #[tokio::test]
    async fn a_gateway_that_refuses_connections_fails_its_check() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = open.local_addr().expect("an address");
        assert!(gateway_check("east", addr).await.ok);
        drop(open);
        let closed = gateway_check("east", addr).await;
        assert!(!closed.ok);
        assert!(
            closed.detail.contains("refuses connections"),
            "{}",
            closed.detail
        );
    }
}
