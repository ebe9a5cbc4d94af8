//! Pods by label, kept up to date as pods change, so that a Service's selector costs the pods
//! it matches rather than every pod of its namespace (building this map again at each
//! publish took 13% of the controller's CPU at 100,000 pods in one namespace).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::objects::ObjectKey;
use crate::pod::Labels;

/// namespace -> label key -> label value -> names of the pods carrying it.
#[derive(Debug, Default)]
pub(super) struct PodLabels {
    namespaces: HashMap<String, HashMap<String, HashMap<String, BTreeSet<String>>>>,
}

impl PodLabels {
    /// Records that the pod `key` went from the labels `old` to `new` (either absent).
    pub(super) fn update(&mut self, key: &ObjectKey, old: Option<&Labels>, new: Option<&Labels>) {
        if old == new {
            return;
        }
        for (label, value) in old.into_iter().flat_map(Labels::iter) {
            self.remove(key, label, value);
        }
        if let Some(new) = new {
            let namespace = self.namespaces.entry(key.namespace.clone()).or_default();
            for (label, value) in new.iter() {
                namespace
                    .entry(label.to_owned())
                    .or_default()
                    .entry(value.to_owned())
                    .or_default()
                    .insert(key.name.clone());
            }
        }
    }

    fn remove(&mut self, key: &ObjectKey, label: &str, value: &str) {
        let Some(namespace) = self.namespaces.get_mut(&key.namespace) else {
            return;
        };
        let Some(values) = namespace.get_mut(label) else {
            return;
        };
        if let Some(pods) = values.get_mut(value) {
            pods.remove(&key.name);
            if pods.is_empty() {
                values.remove(value);
            }
        }
        if values.is_empty() {
            namespace.remove(label);
        }
        if namespace.is_empty() {
            self.namespaces.remove(&key.namespace);
        }
    }

    /// Names of the pods of `namespace` that may match `selector`, in name order: those
    /// carrying its rarest label. Every pod it selects is among them; the caller still checks
    /// the whole selector. Empty for an empty selector (it selects nothing).
    pub(super) fn candidates(
        &self,
        namespace: &str,
        selector: &BTreeMap<String, String>,
    ) -> Option<&BTreeSet<String>> {
        let labels = self.namespaces.get(namespace)?;
        let mut shortest: Option<&BTreeSet<String>> = None;
        for (label, value) in selector {
            let pods = labels.get(label).and_then(|values| values.get(value))?;
            if shortest.is_none_or(|s| pods.len() < s.len()) {
                shortest = Some(pods);
            }
        }
        shortest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod_labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn names(set: Option<&BTreeSet<String>>) -> Vec<&str> {
        set.into_iter().flatten().map(String::as_str).collect()
    }

    #[test]
    fn candidates_follow_label_changes() {
        let mut index = PodLabels::default();
        let web1 = ObjectKey::new("shop", "web-1");
        let web2 = ObjectKey::new("shop", "web-2");
        let api = ObjectKey::new("shop", "api-1");
        let other = ObjectKey::new("other", "web-9");
        let web_v1 = pod_labels(&[("app", "web"), ("version", "v1")]);
        index.update(&web1, None, Some(&web_v1));
        index.update(
            &web2,
            None,
            Some(&pod_labels(&[("app", "web"), ("version", "v2")])),
        );
        index.update(
            &api,
            None,
            Some(&pod_labels(&[("app", "api"), ("version", "v1")])),
        );
        index.update(&other, None, Some(&pod_labels(&[("app", "web")])));

        let app_web = labels(&[("app", "web")]);
        assert_eq!(
            names(index.candidates("shop", &app_web)),
            ["web-1", "web-2"]
        );
        assert_eq!(names(index.candidates("other", &app_web)), ["web-9"]);
        // The rarest label's pods: app=web has two, version=v1 two, so either; both hold web-1.
        let web_and_v1 = labels(&[("app", "web"), ("version", "v1")]);
        assert!(names(index.candidates("shop", &web_and_v1)).contains(&"web-1"));
        assert_eq!(
            names(index.candidates("shop", &labels(&[("app", "cart")]))),
            Vec::<&str>::new()
        );
        assert_eq!(
            names(index.candidates("shop", &BTreeMap::new())),
            Vec::<&str>::new()
        );

        // Relabelled, then deleted.
        index.update(&web1, Some(&web_v1), Some(&pod_labels(&[("app", "api")])));
        assert_eq!(names(index.candidates("shop", &app_web)), ["web-2"]);
        assert_eq!(
            names(index.candidates("shop", &labels(&[("app", "api")]))),
            ["api-1", "web-1"]
        );
        index.update(
            &web2,
            Some(&pod_labels(&[("app", "web"), ("version", "v2")])),
            None,
        );
        assert_eq!(
            names(index.candidates("shop", &app_web)),
            Vec::<&str>::new()
        );
        index.update(&other, Some(&pod_labels(&[("app", "web")])), None);
        assert!(
            !index.namespaces.contains_key("other"),
            "emptied namespaces are dropped"
        );
    }
}
