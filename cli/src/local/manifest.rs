//! Reading the Kubernetes YAML that `meshctl local up -f` runs: files or folders of
//! multi-document YAML, sorted into the kinds the local runtime acts on.
//!
//! Only reading happens here; what the objects become (pods, addresses, files for the
//! controller) is [`super::plan`]'s job. Every error names the file, and the document when the
//! YAML parsed but an object does not fit its kind.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};

/// Why the manifests cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file or folder cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not valid YAML.
    #[error("{path}: invalid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    /// A document is not a Kubernetes object.
    #[error(
        "{path}: document {index}: not a Kubernetes object (a mapping with apiVersion and kind)"
    )]
    NotAnObject { path: PathBuf, index: usize },
    /// A document claims a kind but does not fit its schema.
    #[error("{path}: document {index} ({kind} {name}): {message}")]
    Object {
        path: PathBuf,
        index: usize,
        kind: String,
        name: String,
        message: String,
    },
    /// Nothing to run.
    #[error("{0}: no Kubernetes objects found (expected .yaml, .yml or .json files)")]
    Empty(String),
}

/// Every object of the manifests, by kind, in the order they were read.
#[derive(Debug, Default)]
pub struct Manifests {
    pub namespaces: Vec<Namespace>,
    pub service_accounts: Vec<ServiceAccount>,
    pub services: Vec<Service>,
    pub deployments: Vec<Deployment>,
    pub pods: Vec<Pod>,
    /// Objects the controller reads but the runtime does not act on (policy and Gateway API
    /// resources, EndpointSlices): written to the controller's folder as they are.
    pub passthrough: Vec<serde_json::Value>,
    /// Kinds neither the runtime nor the controller use, as `kind name (file)`: reported, not
    /// an error, so a full application's YAML (ConfigMaps, ...) still runs.
    pub ignored: Vec<String>,
}

/// API groups whose objects go to the controller unchanged.
const PASSTHROUGH_GROUPS: &[&str] = &["policy.mesh.dev/", "gateway.networking.k8s.io/"];

impl Manifests {
    /// Reads every path: a file, or a folder whose `.yaml`, `.yml` and `.json` files are read
    /// in name order (not recursively, as `kubectl apply -f DIR`).
    pub fn read(paths: &[PathBuf]) -> Result<Manifests, ManifestError> {
        let mut manifests = Manifests::default();
        for path in paths {
            let files = files_of(path)?;
            for file in files {
                let text =
                    std::fs::read_to_string(&file).map_err(|source| ManifestError::Read {
                        path: file.clone(),
                        source,
                    })?;
                manifests.add_text(&file, &text)?;
            }
        }
        if manifests.is_empty() {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            return Err(ManifestError::Empty(names.join(", ")));
        }
        Ok(manifests)
    }

    fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.services.is_empty()
            && self.deployments.is_empty()
            && self.pods.is_empty()
            && self.passthrough.is_empty()
    }

    /// Adds the objects of one multi-document text read from `path`.
    pub fn add_text(&mut self, path: &Path, text: &str) -> Result<(), ManifestError> {
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(text).map_err(|error| ManifestError::Yaml {
                path: path.to_owned(),
                message: error.to_string(),
            })?;
        for (i, document) in documents.into_iter().enumerate() {
            self.add_document(path, i + 1, document)?;
        }
        Ok(())
    }

    fn add_document(
        &mut self,
        path: &Path,
        index: usize,
        document: serde_json::Value,
    ) -> Result<(), ManifestError> {
        if document.is_null() {
            return Ok(());
        }
        let text_of = |pointer: &str| {
            document
                .pointer(pointer)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let (Some(kind), Some(api_version)) = (text_of("/kind"), text_of("/apiVersion")) else {
            return Err(ManifestError::NotAnObject {
                path: path.to_owned(),
                index,
            });
        };
        let name = text_of("/metadata/name").unwrap_or_else(|| "?".to_owned());
        if kind == "List" {
            let items = document
                .get("items")
                .and_then(serde_json::Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in items {
                self.add_document(path, index, item)?;
            }
            return Ok(());
        }
        if name == "?" {
            return Err(ManifestError::Object {
                path: path.to_owned(),
                index,
                kind,
                name,
                message: "metadata.name is required".to_owned(),
            });
        }
        let fit = |message: serde_json::Error| ManifestError::Object {
            path: path.to_owned(),
            index,
            kind: kind.clone(),
            name: name.clone(),
            message: message.to_string(),
        };
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => self
                .namespaces
                .push(serde_json::from_value(document).map_err(fit)?),
            ("v1", "ServiceAccount") => self
                .service_accounts
                .push(serde_json::from_value(document).map_err(fit)?),
            ("v1", "Service") => self
                .services
                .push(serde_json::from_value(document).map_err(fit)?),
            ("v1", "Pod") => self
                .pods
                .push(serde_json::from_value(document).map_err(fit)?),
            ("apps/v1", "Deployment") => self
                .deployments
                .push(serde_json::from_value(document).map_err(fit)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => self.passthrough.push(document),
            (group, _) if PASSTHROUGH_GROUPS.iter().any(|g| group.starts_with(g)) => {
                self.passthrough.push(document);
            }
            _ => self
                .ignored
                .push(format!("{kind} {name} ({})", path.display())),
        }
        Ok(())
    }
}

/// The manifest files of a path: itself, or a folder's YAML and JSON files in name order.
fn files_of(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_error = |source| ManifestError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let file = entry.path();
        let is_manifest = file
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if is_manifest && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Manifests, ManifestError> {
        let mut manifests = Manifests::default();
        manifests.add_text(Path::new("app.yaml"), text)?;
        Ok(manifests)
    }

    #[test]
    fn documents_are_sorted_by_kind() {
        let manifests = read(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n\
             spec: {selector: {matchLabels: {app: web}}, template: {spec: {containers: [{name: app}]}}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: web}\n---\n\
             apiVersion: policy.mesh.dev/v1alpha1\nkind: Server\nmetadata: {name: s}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n",
        )
        .expect("valid manifests");
        assert_eq!(manifests.namespaces.len(), 1);
        assert_eq!(manifests.deployments.len(), 1);
        assert_eq!(manifests.services.len(), 1);
        assert_eq!(manifests.passthrough.len(), 1);
        assert_eq!(manifests.ignored, vec!["ConfigMap c (app.yaml)".to_owned()]);
    }

    #[test]
    fn errors_name_the_file_and_the_document() {
        let cases = [
            ("kind: [unclosed\n", "app.yaml: invalid YAML"),
            (
                "- just\n- a list\n",
                "app.yaml: document 1: not a Kubernetes object",
            ),
            (
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: eighty}\n",
                "app.yaml: document 2 (Service web):",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {}\n",
                "app.yaml: document 1 (Pod ?): metadata.name is required",
            ),
        ];
        for (text, want) in cases {
            let error = read(text).expect_err(text).to_string();
            assert!(
                error.starts_with(want),
                "{text:?}: got {error:?}, want {want:?}..."
            );
        }
    }
}
