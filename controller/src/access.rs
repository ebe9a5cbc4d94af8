//! Who may watch the mesh through the controller. `Tap.Observe` shows the paths (query strings
//! included), authorities and identities of live requests, and `Stats` the traffic of every
//! workload: on Kubernetes both are served only to users the API server authenticates (the
//! request's bearer token, checked with a TokenReview) and authorizes (a SubjectAccessReview)
//! in every namespace the request names, by RBAC rules users already manage:
//! - tap: verb `watch` on `pods` of API group `tap.mesh.dev` (ClusterRole `mesh-tap`);
//! - stats: verb `get` on `pods` of API group `stats.mesh.dev` (ClusterRole `mesh-stats`).
//!
//! A request for all namespaces needs the permission cluster-wide. The file backend (the local
//! mesh, whose controller listens on loopback only) serves both to anyone who reaches it.
//!
//! An allowed request is remembered for [`ALLOWED_TTL`], so a dashboard polling every second
//! does not cost two reviews per poll (a revocation takes effect within that time); a refusal
//! for [`REFUSED_TTL`] only, so a grant takes effect at once while a client repeating a refused
//! request still costs the API server little. Tokens are secrets: nothing here logs or prints
//! them.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use tokio::sync::Semaphore;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// How long an allowed request is remembered for the same token, action and namespace.
pub const ALLOWED_TTL: Duration = Duration::from_secs(5);

/// How long a refused request is remembered.
pub const REFUSED_TTL: Duration = Duration::from_secs(1);

/// Decisions remembered at most; beyond, expired ones are dropped, then nothing more is kept.
const MAX_DECISIONS: usize = 1024;

/// Reviews in flight at most: a client sending made-up tokens costs the API server no more.
const MAX_REVIEWS_IN_FLIGHT: usize = 8;

/// The longest bearer token accepted (real ones are a few KiB at most).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Watch live requests (`Tap.Observe`).
    Tap,
    /// Read aggregated traffic (`Stats.Summary`, `Stats.Edges`).
    Stats,
}

impl Action {
    /// The RBAC API group of the permission.
    pub fn group(self) -> &'static str {
        match self {
            Action::Tap => "tap.mesh.dev",
            Action::Stats => "stats.mesh.dev",
        }
    }

    /// The RBAC verb of the permission.
    pub fn verb(self) -> &'static str {
        match self {
            Action::Tap => "watch",
            Action::Stats => "get",
        }
    }

    /// The RBAC resource of the permission.
    pub fn resource(self) -> &'static str {
        "pods"
    }

    /// The ClusterRole the install ships for it.
    pub fn cluster_role(self) -> &'static str {
        match self {
            Action::Tap => "mesh-tap",
            Action::Stats => "mesh-stats",
        }
    }

    fn doing(self) -> &'static str {
        match self {
            Action::Tap => "tap pods",
            Action::Stats => "read the traffic stats of pods",
        }
    }
}

/// Who may tap and read stats.
#[derive(Clone)]
pub enum ObserverAccess {
    /// Anyone who reaches the port (the file backend: a local mesh on loopback).
    Open,
    /// Kubernetes users, by RBAC.
    Rbac(Arc<Rbac>),
}

impl fmt::Debug for ObserverAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObserverAccess::Open => f.write_str("Open"),
            ObserverAccess::Rbac(_) => f.write_str("Rbac"),
        }
    }
}

impl ObserverAccess {
    /// Access by the RBAC of the API server `client` talks to.
    pub fn rbac(client: kube::Client) -> Self {
        ObserverAccess::Rbac(Arc::new(Rbac {
            token_reviews: Api::all(client.clone()),
            access_reviews: Api::all(client),
            decisions: Mutex::new(HashMap::new()),
            reviews: Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
        }))
    }

    /// Whether the caller whose request carries `metadata` may do `action` in each of
    /// `namespaces` (`None`: all namespaces); the first refusal as the request's error.
    pub async fn check(
        &self,
        metadata: &MetadataMap,
        action: Action,
        namespaces: &[Option<&str>],
    ) -> Result<(), Status> {
        match self {
            ObserverAccess::Open => Ok(()),
            ObserverAccess::Rbac(rbac) => {
                let token = bearer_token(metadata)?;
                for namespace in namespaces {
                    rbac.check(token, action, *namespace).await?;
                }
                Ok(())
            }
        }
    }
}

/// The request's bearer token, or why there is none.
fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Err(Status::unauthenticated(
            "tap and stats are served only to Kubernetes users: send the bearer token of a \
             user or ServiceAccount the API server knows (meshctl sends --token or \
             MESH_TOKEN; e.g. `kubectl create token NAME -n NAMESPACE`)",
        ));
    };
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated("the authorization header is not `Bearer <token>`")
        })?;
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Status::unauthenticated(format!(
            "the bearer token is longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    Ok(token)
}

/// Decisions by token, action and namespace.
type DecisionKey = (String, Action, Option<String>);

/// A decision and until when it holds.
type Decision = (Instant, Result<(), Status>);

/// Authentication with TokenReview and authorization with SubjectAccessReview. The
/// controller's ServiceAccount needs `create` on both.
pub struct Rbac {
    token_reviews: Api<TokenReview>,
    access_reviews: Api<SubjectAccessReview>,
    decisions: Mutex<HashMap<DecisionKey, Decision>>,
    reviews: Semaphore,
}

impl Rbac {
    async fn check(
        &self,
        token: &str,
        action: Action,
        namespace: Option<&str>,
    ) -> Result<(), Status> {
        let key: DecisionKey = (token.to_owned(), action, namespace.map(str::to_owned));
        if let Some(decision) = self.remembered(&key) {
            return decision;
        }
        let decision = self.review(token, action, namespace).await;
        // An API server that could not answer decides nothing worth remembering.
        if !matches!(&decision, Err(status) if status.code() == tonic::Code::Unavailable) {
            self.remember(key, decision.clone());
        }
        decision
    }

    fn remembered(&self, key: &DecisionKey) -> Option<Result<(), Status>> {
        let decisions = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        decisions
            .get(key)
            .filter(|(until, _)| Instant::now() < *until)
            .map(|(_, decision)| decision.clone())
    }

    fn remember(&self, key: DecisionKey, decision: Result<(), Status>) {
        let now = Instant::now();
        let until = now
            + if decision.is_ok() {
                ALLOWED_TTL
            } else {
                REFUSED_TTL
            };
        let mut decisions = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        if decisions.len() >= MAX_DECISIONS {
            decisions.retain(|_, (until, _)| now < *until);
        }
        if decisions.len() < MAX_DECISIONS {
            decisions.insert(key, (until, decision));
        }
    }

    async fn review(
        &self,
        token: &str,
        action: Action,
        namespace: Option<&str>,
    ) -> Result<(), Status> {
        let _permit = self
            .reviews
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the controller is shutting down"))?;
        let user = self.authenticate(token).await?;
        let name = user.username.clone().unwrap_or_default();
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    namespace: namespace.map(str::to_owned),
                    verb: Some(action.verb().to_owned()),
                    group: Some(action.group().to_owned()),
                    resource: Some(action.resource().to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answer = self
            .access_reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "the API server did not answer the controller's SubjectAccessReview (may its \
                     ServiceAccount create subjectaccessreviews?): {e}"
                ))
            })?;
        let status = answer.status.unwrap_or_default();
        if status.allowed {
            tracing::debug!(user = %name, ?action, ?namespace, "observer authorized");
            return Ok(());
        }
        tracing::info!(user = %name, ?action, ?namespace, "observer refused by RBAC");
        let mut message = refusal(&name, action, namespace);
        if let Some(error) = status.evaluation_error.filter(|e| !e.is_empty()) {
            message.push_str(&format!(" (the API server's evaluation error: {error})"));
        }
        Err(Status::permission_denied(message))
    }

    async fn authenticate(&self, token: &str) -> Result<UserInfo, Status> {
        let review = TokenReview {
            // No audiences: the API server's own, those of the tokens its users hold.
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let answer = self
            .token_reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "the API server did not answer the controller's TokenReview (may its \
                     ServiceAccount create tokenreviews?): {e}"
                ))
            })?;
        let status = answer.status.unwrap_or_default();
        match status.user {
            Some(user) if status.authenticated == Some(true) => Ok(user),
            _ => Err(Status::unauthenticated(format!(
                "the API server does not accept the bearer token{}",
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ))),
        }
    }
}

/// What a refused user reads: who, what, where, and the command that grants it.
pub fn refusal(user: &str, action: Action, namespace: Option<&str>) -> String {
    let subject = match user.strip_prefix("system:serviceaccount:") {
        Some(account) => format!("--serviceaccount={account}"),
        None => format!("--user={user}"),
    };
    let binding = format!(
        "{}-{}",
        user.rsplit(':')
            .next()
            .unwrap_or(user)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            })
            .collect::<String>(),
        action.cluster_role()
    );
    let (where_, grant) = match namespace {
        Some(ns) => (
            format!("in namespace {ns:?}"),
            format!(
                "kubectl create rolebinding {binding} --namespace={ns} --clusterrole={} {subject}",
                action.cluster_role()
            ),
        ),
        None => (
            "in all namespaces".to_owned(),
            format!(
                "kubectl create clusterrolebinding {binding} --clusterrole={} {subject}",
                action.cluster_role()
            ),
        ),
    };
    format!(
        "user {user:?} may not {} {where_}: RBAC must allow verb {:?} on resource {:?} of API \
         group {:?}; an admin grants it with: {grant}",
        action.doing(),
        action.verb(),
        action.resource(),
        action.group(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: Option<&str>) -> MetadataMap {
        let mut map = MetadataMap::new();
        if let Some(value) = value {
            map.insert("authorization", value.parse().expect("ascii"));
        }
        map
    }

    #[test]
    fn bearer_tokens_are_read_and_bad_headers_named() {
        assert_eq!(
            bearer_token(&metadata(Some("Bearer abc"))).ok(),
            Some("abc")
        );
        assert_eq!(
            bearer_token(&metadata(Some("bearer  abc "))).ok(),
            Some("abc")
        );
        let missing = bearer_token(&metadata(None)).expect_err("no header");
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(
            missing.message().contains("--token"),
            "{}",
            missing.message()
        );
        for bad in ["Basic abc", "Bearer", "Bearer   ", "abc"] {
            let error = bearer_token(&metadata(Some(bad))).expect_err(bad);
            assert_eq!(error.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert!(bearer_token(&metadata(Some(&long))).is_err());
    }

    #[test]
    fn refusals_name_user_verb_namespace_and_the_grant() {
        let sa = refusal(
            "system:serviceaccount:team:alice",
            Action::Tap,
            Some("books"),
        );
        assert_eq!(
            sa,
            "user \"system:serviceaccount:team:alice\" may not tap pods in namespace \"books\": \
             RBAC must allow verb \"watch\" on resource \"pods\" of API group \"tap.mesh.dev\"; \
             an admin grants it with: kubectl create rolebinding alice-mesh-tap \
             --namespace=books --clusterrole=mesh-tap --serviceaccount=team:alice"
        );
        let user = refusal("Bob@Example.com", Action::Stats, None);
        assert!(user.contains("in all namespaces"), "{user}");
        assert!(
            user.ends_with(
                "kubectl create clusterrolebinding bob-example.com-mesh-stats \
                 --clusterrole=mesh-stats --user=Bob@Example.com"
            ),
            "{user}"
        );
    }

    #[tokio::test]
    async fn open_access_needs_no_token() {
        let open = ObserverAccess::Open;
        assert!(
            open.check(&metadata(None), Action::Tap, &[None])
                .await
                .is_ok()
        );
    }
}
