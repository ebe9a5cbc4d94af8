//! The `file` discovery backend: a folder of Kubernetes-style YAML, reread when it changes.
//!
//! The folder is rescanned as soon as the filesystem reports a change under it (inotify, via
//! `notify`), so an edit reaches the proxies in milliseconds, and also polled (every 250 ms by
//! default), which works on every filesystem (bind mounts, ConfigMap volumes, network shares)
//! and catches what events miss. A file is reread when its size, times or inode change. A file that does not
//! parse is reported (log, metric, `/ready` body) and the objects it last parsed to stay
//! served, so a half-saved edit never empties a service.
//!
//! Tip for writers: write to a temporary name that does not end in `.yaml`/`.yml` (or starts
//! with a dot) and rename it into place, so the backend never reads a half-written file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::Health;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::objects::{Kind, Object, ObjectError, ObjectKey};

/// Folders deeper than this are not read (guards against symlink loops).
const MAX_DEPTH: usize = 16;

/// Why a file's contents could not be read as objects.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not valid YAML.
    #[error("invalid YAML: {0}")]
    Yaml(#[from] serde_saphyr::Error),
    /// A document is not a mapping with `apiVersion` and `kind`.
    #[error("document {index}: not a Kubernetes object (a mapping with apiVersion and kind)")]
    NotAnObject {
        /// 1-based position of the document in the file.
        index: usize,
    },
    /// A document claims one of our kinds but does not fit its schema.
    #[error("document {index}: {source}")]
    Object {
        /// 1-based position of the document in the file.
        index: usize,
        /// What does not fit.
        #[source]
        source: ObjectError,
    },
}

/// Reads every object of a multi-document YAML text. Kinds discovery does not use are skipped
/// (with a debug log); `kind: List` documents are unpacked. Any bad document fails the whole
/// text, so a file is either wholly applied or wholly kept at its last good state.
pub fn parse_documents(text: &str) -> Result<Vec<Object>, ParseError> {
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)?;
    let mut objects = Vec::new();
    for (i, document) in documents.into_iter().enumerate() {
        collect(document, i + 1, &mut objects)?;
    }
    Ok(objects)
}

fn collect(
    document: serde_json::Value,
    index: usize,
    out: &mut Vec<Object>,
) -> Result<(), ParseError> {
    if document.is_null() {
        return Ok(());
    }
    let kind = document
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    let has_version = document
        .get("apiVersion")
        .and_then(serde_json::Value::as_str)
        .is_some();
    let (Some(kind), true) = (kind, has_version) else {
        return Err(ParseError::NotAnObject { index });
    };
    if kind == "List" {
        if let Some(serde_json::Value::Array(items)) = document.get("items") {
            for item in items.clone() {
                collect(item, index, out)?;
            }
        }
        return Ok(());
    }
    match Object::from_value(document) {
        Ok(Some(object)) => out.push(object.with_default_namespace()),
        Ok(None) => tracing::debug!(%kind, "ignoring a kind discovery does not use"),
        Err(source) => return Err(ParseError::Object { index, source }),
    }
    Ok(())
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

/// An object's identity in the folder: its kind and key.
type ObjectId = (Kind, ObjectKey);

#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    /// The objects of the last version that parsed (empty if none ever did); an object a
    /// file defines twice keeps its last definition.
    objects: BTreeMap<ObjectId, Object>,
    /// Why the current version does not parse, if it does not.
    error: Option<String>,
}

/// What one rescan saw.
#[derive(Debug, Default)]
struct ScanOutcome {
    added: usize,
    modified: usize,
    deleted: usize,
    /// Objects whose definition may have changed: those of every file added, reread or gone.
    touched: BTreeSet<ObjectId>,
    /// Files whose current version failed to parse in this scan (newly or again after an edit).
    new_errors: Vec<(PathBuf, String)>,
    /// The folder itself could not be read.
    folder_error: Option<String>,
}

impl ScanOutcome {
    fn changed(&self) -> bool {
        self.added + self.modified + self.deleted > 0
    }
}

/// The folder and what each of its files last parsed to.
#[derive(Debug)]
struct Folder {
    dir: PathBuf,
    // Hashed, not ordered: a scan looks up every file twice, and comparing paths component
    // by component was a tenth of the controller's CPU at 5,000 files.
    files: HashMap<PathBuf, FileState>,
    /// The files defining each object (in path order; almost always one), so that an edit
    /// re-decides only the objects of the files it touched (at 100,000 pods, rebuilding
    /// everything took most of a second). A file's objects share its path.
    definers: BTreeMap<ObjectId, Vec<Arc<Path>>>,
}

impl Folder {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: HashMap::new(),
            definers: BTreeMap::new(),
        }
    }

    /// Rereads what changed since the last scan. Blocking: run it off the async workers.
    fn rescan(&mut self) -> ScanOutcome {
        let mut outcome = ScanOutcome::default();
        let mut seen = HashMap::new();
        if let Err(e) = walk(&self.dir, 0, &mut seen) {
            // Keep everything: a folder briefly missing (remounted, replaced) must not empty
            // the mesh.
            outcome.folder_error = Some(format!("{}: {e}", self.dir.display()));
            return outcome;
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains_key(*p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(file) = self.files.remove(&path) {
                self.forget(&path, &file.objects, &mut outcome.touched);
            }
            outcome.deleted += 1;
        }
        for (path, stamp) in seen {
            let known = self.files.get(&path);
            if known.is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|text| parse_documents(&text).map_err(|e| e.to_string()));
            let was_known = known.is_some();
            let previous = self.files.remove(&path).map(|f| f.objects);
            let (objects, error) = match parsed {
                Ok(objects) => {
                    if let Some(previous) = &previous {
                        self.forget(&path, previous, &mut outcome.touched);
                    }
                    let objects: BTreeMap<ObjectId, Object> = objects
                        .into_iter()
                        .map(|o| ((o.kind(), o.key()), o))
                        .collect();
                    let shared: Arc<Path> = Arc::from(path.as_path());
                    for id in objects.keys() {
                        let paths = self.definers.entry(id.clone()).or_default();
                        if let Err(at) = paths.binary_search(&shared) {
                            paths.insert(at, shared.clone());
                        }
                        outcome.touched.insert(id.clone());
                    }
                    (objects, None)
                }
                Err(error) => {
                    outcome.new_errors.push((path.clone(), error.clone()));
                    (previous.unwrap_or_default(), Some(error))
                }
            };
            self.files.insert(
                path,
                FileState {
                    stamp,
                    objects,
                    error,
                },
            );
            if was_known {
                outcome.modified += 1;
            } else {
                outcome.added += 1;
            }
        }
        outcome
    }

    /// Records that `path` no longer defines `objects`.
    fn forget(
        &mut self,
        path: &Path,
        objects: &BTreeMap<ObjectId, Object>,
        touched: &mut BTreeSet<ObjectId>,
    ) {
        for id in objects.keys() {
            if let Some(paths) = self.definers.get_mut(id) {
                paths.retain(|p| **p != *path);
                if paths.is_empty() {
                    self.definers.remove(id);
                }
            }
            touched.insert(id.clone());
        }
    }

    /// An object as the folder defines it now: from the last file (by path) defining it.
    fn object(&self, id: &ObjectId) -> Option<&Object> {
        let paths = self.definers.get(id)?;
        let path = paths.last()?;
        if paths.len() > 1 {
            tracing::warn!(
                kind = %id.0, object = %id.1, file = %path.display(),
                "object defined in more than one file; the last file (by path) wins"
            );
        }
        self.files.get(path.as_ref())?.objects.get(id)
    }

    /// Every object the folder holds now.
    fn objects(&self) -> Vec<Object> {
        self.definers
            .keys()
            .filter_map(|id| self.object(id).cloned())
            .collect()
    }

    /// Brings the index up to date with the objects a scan touched.
    fn update(&self, index: &mut Index, touched: &BTreeSet<ObjectId>) {
        for id in touched {
            match self.object(id) {
                Some(object) => {
                    index.apply(object.clone());
                }
                None => {
                    index.delete(id.0, &id.1);
                }
            }
        }
    }

    /// The files whose current version does not parse, with why.
    fn errors(&self) -> BTreeMap<String, String> {
        self.files
            .iter()
            .filter_map(|(p, f)| Some((p.display().to_string(), f.error.clone()?)))
            .collect()
    }
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Collects the YAML files under `dir` with their stamps. Hidden entries (editor swap files,
/// ConfigMap volumes' `..data`) are skipped; symlinks are followed.
fn walk(dir: &Path, depth: usize, out: &mut HashMap<PathBuf, Stamp>) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        if is_hidden(&path) {
            continue;
        }
        // Follows symlinks; an entry that vanished meanwhile is simply not there.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Err(e) = walk(&path, depth + 1, out) {
                tracing::debug!(path = %path.display(), error = %e, "skipping unreadable folder");
            }
        } else if meta.is_file() && is_yaml(&path) {
            out.insert(path, Stamp::of(&meta));
        }
    }
    Ok(())
}

/// Runs the file backend until `shutdown` turns true: the first scan, then one after each
/// burst of filesystem events and every `poll_interval`, each change published to the index.
pub(crate) async fn run(
    dir: PathBuf,
    poll_interval: Duration,
    mut index: Index,
    health: Health,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut folder = Some(Folder::new(dir.clone()));
    let (wake, mut woken) = mpsc::channel::<()>(1);
    // Kept alive for the whole run; without it (no inotify here) the poll alone finds changes.
    let _watcher = watch_folder(&dir, wake);
    let mut synced = false;
    loop {
        let Some(mut current) = folder.take() else {
            return;
        };
        let scanned = tokio::task::spawn_blocking(move || {
            let outcome = current.rescan();
            (current, outcome)
        })
        .await;
        let (current, outcome) = match scanned {
            Ok(result) => result,
            Err(e) => {
                // Only a panic in the scan gets here; stop rather than serve from nothing.
                tracing::error!(error = %e, "file discovery scan failed");
                return;
            }
        };
        for (path, error) in &outcome.new_errors {
            tracing::warn!(file = %path.display(), %error, "malformed file; serving its last good state");
            metrics.file_parse_error();
        }
        if let Some(error) = &outcome.folder_error {
            tracing::warn!(%error, "cannot read the config folder; serving the last good state");
        }
        metrics.file_events("added", outcome.added);
        metrics.file_events("modified", outcome.modified);
        metrics.file_events("deleted", outcome.deleted);
        if !synced {
            index.replace_all(current.objects());
        } else {
            current.update(&mut index, &outcome.touched);
        }
        if outcome.changed() || !synced {
            index.publish();
            metrics.set_index_sizes(&index.counts());
        }
        let mut problems = current.errors();
        if let Some(error) = outcome.folder_error {
            problems.insert(dir.display().to_string(), error);
        }
        metrics.set_files_malformed(problems.len());
        health.set_problems("file", problems);
        if !synced {
            synced = true;
            health.set_synced();
            tracing::info!(dir = %dir.display(), files = current.files.len(), "file discovery synced");
        }
        folder = Some(current);
        let by_event = tokio::select! {
            _ = tokio::time::sleep(poll_interval) => false,
            Some(()) = woken.recv() => true,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        if by_event {
            // One edit is several events (write, rename); let them land, then scan once.
            tokio::time::sleep(EVENT_SETTLE).await;
            while woken.try_recv().is_ok() {}
        }
    }
}

/// How long a burst of filesystem events may take before the folder is scanned.
const EVENT_SETTLE: Duration = Duration::from_millis(5);

/// Whether a filesystem event can mean a file changed. Opening or reading one cannot, and
/// the scan itself opens the folder and the files it rereads: counting those woke the scan
/// again at once, forever (0.9 cores at 5,000 files, with nothing changing).
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watches `dir` (recursively) and sends on `wake` when anything under it changes; the
/// channel holds one wake-up, so a burst of events costs one scan. `None` (logged) when the
/// filesystem gives no events, e.g. out of inotify watches.
fn watch_folder(dir: &Path, wake: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let on_event = move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| is_change(&event.kind)) {
            let _ = wake.try_send(());
        }
    };
    let watching = notify::recommended_watcher(on_event).and_then(|mut watcher| {
        notify::Watcher::watch(&mut watcher, dir, notify::RecursiveMode::Recursive)?;
        Ok(watcher)
    });
    match watching {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "no filesystem events for the config folder; changes are found by polling only");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_that_can_change_a_file_wake_the_scan() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RemoveKind, RenameMode,
        };
        let cases = [
            (EventKind::Access(AccessKind::Open(AccessMode::Any)), false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                false,
            ),
            (EventKind::Access(AccessKind::Read), false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                true,
            ),
            (EventKind::Create(CreateKind::File), true),
            (EventKind::Modify(ModifyKind::Name(RenameMode::To)), true),
            (EventKind::Modify(ModifyKind::Any), true),
            (EventKind::Remove(RemoveKind::File), true),
            (EventKind::Any, true),
        ];
        for (kind, want) in cases {
            assert_eq!(is_change(&kind), want, "{kind:?}");
        }
    }

    #[test]
    fn documents_parse_into_objects_or_name_what_is_wrong() {
        type Want = Result<Vec<(Kind, &'static str)>, &'static str>;
        let cases: [(&str, Want); 8] = [
            ("", Ok(vec![])),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {name: web-1}\n",
                Ok(vec![
                    (Kind::Service, "shop/web"),
                    (Kind::Pod, "default/web-1"),
                ]),
            ),
            (
                "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\n",
                Ok(vec![]),
            ),
            (
                "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: shop}\n",
                Ok(vec![(Kind::Namespace, "shop")]),
            ),
            ("kind: [unclosed\n", Err("invalid YAML")),
            (
                "just a string\n",
                Err("document 1: not a Kubernetes object"),
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: 80}\n",
                Err("document 2: Service b:"),
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: 1}]}\n",
                Err("document 1: Pod a:"),
            ),
        ];
        for (text, want) in cases {
            let got = parse_documents(text)
                .map(|objects| {
                    objects
                        .iter()
                        .map(|o| (o.kind(), o.key().to_string()))
                        .collect::<Vec<_>>()
                })
                .map_err(|e| e.to_string());
            match (got, want) {
                (Ok(got), Ok(want)) => {
                    let want: Vec<(Kind, String)> =
                        want.into_iter().map(|(k, s)| (k, s.to_owned())).collect();
                    assert_eq!(got, want, "{text:?}");
                }
                (Err(got), Err(want)) => assert!(got.starts_with(want), "{text:?}: {got}"),
                (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "mesh-controller-file-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        dir
    }

    fn write(path: &Path, text: &str) {
        // Rename into place so each write is a new inode: a rescan sees it whatever the
        // filesystem's timestamp granularity.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write a temp file");
        std::fs::rename(&tmp, path).expect("rename into place");
    }

    #[test]
    fn a_folder_keeps_the_last_good_state_of_a_malformed_file() {
        let dir = temp_dir("last-good");
        std::fs::create_dir_all(dir.join("sub")).expect("create a subfolder");
        let svc = dir.join("sub/svc.yaml");
        write(
            &svc,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n",
        );
        write(&dir.join("ignored.txt"), "not yaml at all: [");
        write(&dir.join(".hidden.yaml"), "not yaml at all: [");
        let mut folder = Folder::new(dir.clone());
        let keys = |f: &Folder| -> Vec<ObjectKey> { f.objects().iter().map(Object::key).collect() };

        let first = folder.rescan();
        assert_eq!((first.added, first.modified, first.deleted), (1, 0, 0));
        assert_eq!(keys(&folder), vec![ObjectKey::new("default", "web")]);

        assert!(
            !folder.rescan().changed(),
            "an untouched folder is not reread"
        );

        write(
            &svc,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web\n",
        );
        let broken = folder.rescan();
        assert_eq!(broken.modified, 1);
        assert_eq!(broken.new_errors.len(), 1);
        assert_eq!(broken.new_errors[0].0, svc);
        assert_eq!(
            keys(&folder),
            vec![ObjectKey::new("default", "web")],
            "last good kept"
        );
        let errors = folder.errors();
        assert!(
            errors.contains_key(&svc.display().to_string()),
            "{errors:?}"
        );

        write(
            &svc,
            "apiVersion: v1\nkind: Service\nmetadata: {name: api}\n",
        );
        folder.rescan();
        assert_eq!(keys(&folder), vec![ObjectKey::new("default", "api")]);
        assert!(folder.errors().is_empty());

        std::fs::remove_file(&svc).expect("remove the file");
        let gone = folder.rescan();
        assert_eq!(gone.deleted, 1);
        assert!(keys(&folder).is_empty());

        std::fs::remove_dir_all(&dir).expect("remove the temp dir");
        let missing = folder.rescan();
        assert!(missing.folder_error.is_some());
    }

    /// An edit re-decides only the objects of the files it touched, and an object two files
    /// define comes from the last of them (by path), falling back when that one goes.
    #[test]
    fn an_edit_updates_the_index_with_the_objects_it_touched() {
        let dir = temp_dir("incremental");
        let service = |port: u16| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
                 spec: {{ports: [{{port: {port}}}]}}\n"
            )
        };
        let other = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n";
        write(&dir.join("a.yaml"), &service(80));
        write(&dir.join("b.yaml"), &service(81));
        write(&dir.join("c.yaml"), other);
        let mut folder = Folder::new(dir.clone());
        let (mut index, _) = Index::new(crate::index::IndexOptions::default());
        folder.rescan();
        index.replace_all(folder.objects());
        let ports = |index: &mut Index| -> Option<Vec<u16>> {
            index.publish();
            let snapshot = index.subscribe().borrow().clone();
            let view = snapshot.service(&ObjectKey::new("shop", "web"))?;
            Some(view.ports.keys().copied().collect())
        };
        assert_eq!(ports(&mut index), Some(vec![81]), "the last file wins");

        std::fs::remove_file(dir.join("b.yaml")).expect("remove b.yaml");
        let outcome = folder.rescan();
        let web = (Kind::Service, ObjectKey::new("shop", "web"));
        assert_eq!(
            outcome.touched,
            BTreeSet::from([web.clone()]),
            "c.yaml is not touched"
        );
        folder.update(&mut index, &outcome.touched);
        assert_eq!(
            ports(&mut index),
            Some(vec![80]),
            "back to a.yaml's definition"
        );

        write(
            &dir.join("a.yaml"),
            &other.replace("name: api", "name: cart"),
        );
        let outcome = folder.rescan();
        folder.update(&mut index, &outcome.touched);
        assert_eq!(ports(&mut index), None, "web is defined nowhere now");
        assert_eq!(index.counts().get(&Kind::Service), Some(&2), "api and cart");

        std::fs::remove_dir_all(&dir).expect("remove the temp dir");
    }
}
