//! Authentication of callers: which ServiceAccount a proxy's token proves.
//!
//! The CA signs only for the identity a token proves, so this is the whole of its access
//! control. Two implementations: [`TokenReviewAuthenticator`] asks a Kubernetes API server
//! (the projected ServiceAccount token, with the mesh's audience), and [`StaticTokens`] serves
//! the file backend, whose YAML declares a token per ServiceAccount with the
//! [`TOKEN_ANNOTATION`]. Tokens are secrets: nothing here logs or prints them.

use std::collections::HashMap;
use std::fmt;
use std::sync::RwLock;

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};

use super::spiffe::ServiceAccountName;

/// The ServiceAccount annotation that declares a token in the file backend:
/// `mesh.dev/identity-token: <secret>`.
pub const TOKEN_ANNOTATION: &str = "mesh.dev/identity-token";

/// The audience the mesh's projected ServiceAccount tokens are minted for; the TokenReview
/// requires it, so tokens minted for the API server or for other services are refused.
pub const TOKEN_AUDIENCE: &str = "mesh.dev/identity";

/// The namespace of a ServiceAccount that names none, as `kubectl apply` assumes.
const DEFAULT_NAMESPACE: &str = "default";

/// Why a token proves no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is unknown, invalid, expired, for another audience, or not a
    /// ServiceAccount's. The caller should get UNAUTHENTICATED.
    #[error("token rejected: {0}")]
    Rejected(String),
    /// The token could not be checked (the API server is unreachable or refuses the
    /// controller). The caller should retry.
    #[error("token could not be checked: {0}")]
    Unavailable(String),
}

/// Proves which ServiceAccount a token belongs to.
pub trait TokenAuthenticator: Send + Sync {
    /// The ServiceAccount `token` proves, or why it proves none.
    fn authenticate<'a>(
        &'a self,
        token: &'a [u8],
    ) -> BoxFuture<'a, Result<ServiceAccountName, AuthError>>;
}

/// Tokens declared by the file backend's ServiceAccounts with [`TOKEN_ANNOTATION`].
/// Replaceable in place when the files change. `Debug` never shows tokens.
#[derive(Default)]
pub struct StaticTokens {
    by_token: RwLock<HashMap<Vec<u8>, ServiceAccountName>>,
}

impl fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticTokens")
            .field("tokens", &self.len())
            .finish()
    }
}

impl StaticTokens {
    /// The tokens `service_accounts` declare.
    pub fn from_service_accounts(service_accounts: &[ServiceAccount]) -> Self {
        let tokens = Self::default();
        tokens.set_service_accounts(service_accounts);
        tokens
    }

    /// Replaces every token with those `service_accounts` declare. A token declared by two
    /// ServiceAccounts proves neither, and is reported (without the token).
    pub fn set_service_accounts(&self, service_accounts: &[ServiceAccount]) {
        let mut by_token: HashMap<Vec<u8>, ServiceAccountName> = HashMap::new();
        let mut ambiguous: Vec<Vec<u8>> = Vec::new();
        for sa in service_accounts {
            let Some(token) = sa
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TOKEN_ANNOTATION))
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
            else {
                continue;
            };
            let Some(name) = sa.metadata.name.clone() else {
                continue;
            };
            let namespace = sa
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            let owner = ServiceAccountName::new(namespace, name);
            match by_token.get(token.as_bytes()) {
                Some(first) if *first != owner => {
                    tracing::warn!(
                        first = %first,
                        second = %owner,
                        annotation = TOKEN_ANNOTATION,
                        "two ServiceAccounts declare the same identity token; it proves neither"
                    );
                    ambiguous.push(token.as_bytes().to_vec());
                }
                Some(_) => {}
                None => {
                    by_token.insert(token.as_bytes().to_vec(), owner);
                }
            }
        }
        for token in ambiguous {
            by_token.remove(&token);
        }
        match self.by_token.write() {
            Ok(mut guard) => *guard = by_token,
            Err(poisoned) => *poisoned.into_inner() = by_token,
        }
    }

    /// How many tokens prove an identity.
    pub fn len(&self) -> usize {
        match self.by_token.read() {
            Ok(guard) => guard.len(),
            Err(poisoned) => poisoned.into_inner().len(),
        }
    }

    /// Whether no token proves an identity.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, token: &[u8]) -> Option<ServiceAccountName> {
        match self.by_token.read() {
            Ok(guard) => guard.get(token).cloned(),
            Err(poisoned) => poisoned.into_inner().get(token).cloned(),
        }
    }
}

impl TokenAuthenticator for StaticTokens {
    fn authenticate<'a>(
        &'a self,
        token: &'a [u8],
    ) -> BoxFuture<'a, Result<ServiceAccountName, AuthError>> {
        let result = self.lookup(token).ok_or_else(|| {
            AuthError::Rejected(format!(
                "no ServiceAccount declares this token (annotation {TOKEN_ANNOTATION})"
            ))
        });
        Box::pin(std::future::ready(result))
    }
}

/// Checks tokens with the Kubernetes TokenReview API (authentication.k8s.io/v1). The
/// controller's ServiceAccount needs `create` on `tokenreviews`.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    reviews: Api<TokenReview>,
    audience: String,
}

impl fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// Reviews tokens through `client`, requiring the audience [`TOKEN_AUDIENCE`].
    pub fn new(client: kube::Client) -> Self {
        Self::with_audience(client, TOKEN_AUDIENCE)
    }

    /// Reviews tokens through `client`, requiring `audience`.
    pub fn with_audience(client: kube::Client, audience: impl Into<String>) -> Self {
        Self {
            reviews: Api::all(client),
            audience: audience.into(),
        }
    }

    async fn review(&self, token: &[u8]) -> Result<ServiceAccountName, AuthError> {
        let token = std::str::from_utf8(token)
            .map_err(|_| AuthError::Rejected("the token is not UTF-8".to_owned()))?;
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let review = self
            .reviews
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
                    AuthError::Unavailable(format!(
                        "the API server refused the controller's TokenReview (may its ServiceAccount create tokenreviews?): {e}"
                    ))
                }
                _ => AuthError::Unavailable(format!("TokenReview failed: {e}")),
            })?;
        let status = review
            .status
            .ok_or_else(|| AuthError::Unavailable("TokenReview has no status".to_owned()))?;
        if status.authenticated != Some(true) {
            let reason = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "the API server did not authenticate it".to_owned());
            return Err(AuthError::Rejected(reason));
        }
        // The API server answers with the audiences the token is valid for among those asked;
        // an older server that ignores audiences answers none, and then the token is refused.
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(AuthError::Rejected(format!(
                "the token is not for audience {:?}",
                self.audience
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        service_account_of(&username).ok_or_else(|| {
            AuthError::Rejected(format!(
                "the token belongs to {username:?}, not to a ServiceAccount"
            ))
        })
    }
}

impl TokenAuthenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(
        &'a self,
        token: &'a [u8],
    ) -> BoxFuture<'a, Result<ServiceAccountName, AuthError>> {
        Box::pin(self.review(token))
    }
}

/// The ServiceAccount of a Kubernetes username `system:serviceaccount:<ns>:<name>`.
fn service_account_of(username: &str) -> Option<ServiceAccountName> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return None;
    }
    Some(ServiceAccountName::new(namespace, name))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn sa(namespace: Option<&str>, name: &str, token: Option<&str>) -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: namespace.map(str::to_owned),
                annotations: token
                    .map(|t| BTreeMap::from([(TOKEN_ANNOTATION.to_owned(), t.to_owned())])),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        }
    }

    #[tokio::test]
    async fn static_tokens_map_annotations_to_service_accounts() {
        let tokens = StaticTokens::from_service_accounts(&[
            sa(Some("shop"), "web", Some("s3cret-web\n")),
            sa(None, "api", Some("s3cret-api")),
            sa(Some("shop"), "no-token", None),
            sa(Some("shop"), "blank", Some("  ")),
            sa(Some("a"), "one", Some("shared")),
            sa(Some("b"), "two", Some("shared")),
        ]);
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            tokens.authenticate(b"s3cret-web").await,
            Ok(ServiceAccountName::new("shop", "web"))
        );
        assert_eq!(
            tokens.authenticate(b"s3cret-api").await,
            Ok(ServiceAccountName::new("default", "api"))
        );
        for bad in [&b"shared"[..], b"", b"s3cret", b"nope"] {
            assert!(matches!(
                tokens.authenticate(bad).await,
                Err(AuthError::Rejected(_))
            ));
        }
        assert!(!format!("{tokens:?}").contains("s3cret"));

        tokens.set_service_accounts(&[sa(Some("shop"), "web", Some("rotated"))]);
        assert!(tokens.authenticate(b"s3cret-web").await.is_err());
        assert!(tokens.authenticate(b"rotated").await.is_ok());
    }

    #[test]
    fn only_service_account_usernames_name_an_identity() {
        assert_eq!(
            service_account_of("system:serviceaccount:shop:web"),
            Some(ServiceAccountName::new("shop", "web"))
        );
        for username in [
            "",
            "admin",
            "system:serviceaccount:shop",
            "system:serviceaccount::web",
            "system:serviceaccount:shop:",
            "system:serviceaccount:shop:web:extra",
            "system:node:worker-1",
        ] {
            assert_eq!(service_account_of(username), None, "{username}");
        }
    }
}
