//! A pod's volumes as local folders, as the kubelet would make them: projected
//! ServiceAccount-token volumes with their token files, and `emptyDir` volumes as empty
//! folders private to the container that mounts them. Other kinds of volume get no folder.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Pod, PodSpec, Volume};
use serde::{Deserialize, Serialize};

use super::{Mode, PlanOptions, name_of, service_account_token};

/// A file of a pod's volumes, as the kubelet would project it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodFile {
    pub path: PathBuf,
    pub contents: String,
    /// Root mode: the uid that must read it (the proxy's); the file is private to it.
    pub owner: Option<u32>,
}

/// An `emptyDir` volume's folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodDir {
    pub path: PathBuf,
    /// Root mode: the uid of the container that mounts it; the folder is private to it.
    pub owner: Option<u32>,
}

/// What [`pod_volumes`] makes.
#[derive(Debug, Default)]
pub(super) struct PodVolumes {
    /// Volume name -> its local folder.
    pub folders: BTreeMap<String, PathBuf>,
    pub files: Vec<PodFile>,
    pub dirs: Vec<PodDir>,
}

/// The pod's volumes as local folders under the state folder.
pub(super) fn pod_volumes(pod: &Pod, namespace: &str, options: &PlanOptions) -> PodVolumes {
    let mut out = PodVolumes::default();
    let Some(spec) = pod.spec.as_ref() else {
        return out;
    };
    let account = spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let pod_name = name_of(&pod.metadata);
    for volume in spec.volumes.iter().flatten() {
        let dir = options
            .state_dir
            .join("volumes")
            .join(namespace)
            .join(&pod_name)
            .join(&volume.name);
        // Whoever mounts it must read it: the proxy runs as its own uid in root mode.
        let owner = (options.mode == Mode::Root)
            .then(|| mounting_uid(spec, volume))
            .flatten();
        if volume.empty_dir.is_some() {
            out.dirs.push(PodDir {
                path: dir.clone(),
                owner,
            });
            out.folders.insert(volume.name.clone(), dir);
            continue;
        }
        let tokens: Vec<&str> = volume
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_deref())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.service_account_token.as_ref())
            .map(|t| t.path.as_str())
            .collect();
        if tokens.is_empty() {
            continue;
        }
        let token = options
            .identity
            .as_ref()
            .map(|identity| service_account_token(&identity.token_secret, namespace, account))
            .unwrap_or_default();
        for path in tokens {
            out.files.push(PodFile {
                path: dir.join(path),
                contents: token.clone(),
                owner,
            });
        }
        out.folders.insert(volume.name.clone(), dir);
    }
    out
}

/// The uid the first container mounting `volume` runs as, when it says.
fn mounting_uid(spec: &PodSpec, volume: &Volume) -> Option<u32> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == volume.name)
        })
        .find_map(|c| c.security_context.as_ref()?.run_as_user)
        .and_then(|uid| u32::try_from(uid).ok())
}
