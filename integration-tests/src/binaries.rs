//! The workspace's binaries, built on demand for tests.
//!
//! An integration test can only use `CARGO_BIN_EXE_*` for binaries of its own package, so the
//! product's binaries (`mesh-proxy`, `mesh-controller`, ...) are built here with `cargo build
//! --workspace --bins`, into the same target directory and profile as the running test, once
//! per test process. All of them at once, as `just build` does: building one package's binary
//! alone unifies dependency features differently and recompiles half the dependency tree, so
//! after `just build` this is a no-op.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Binaries already built by this process, by name.
static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());

/// The path of the workspace binary `name` (e.g. `"mesh-proxy"`), freshly built. The first
/// call runs `cargo build --workspace --bins` (quick when nothing changed); later calls
/// return the same path. Panics with the build's output when the build fails: tests cannot
/// go on without it.
pub fn bin_path(name: &str) -> PathBuf {
    // Held across the build so parallel tests in one process build each binary once.
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let path = build(name);
    built.insert(name.to_owned(), path.clone());
    path
}

fn build(name: &str) -> PathBuf {
    let (target_dir, profile) = target_dir_and_profile();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests/ sits inside the workspace");
    // `CARGO` is the cargo running these tests (same toolchain); plain `cargo` otherwise.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args(["build", "--quiet", "--workspace", "--bins", "--target-dir"])
        .arg(&target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    eprintln!("bin_path: building {name}: {command:?}");
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("bin_path: cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "bin_path: `cargo build --workspace --bins` (for {name}) failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let path = target_dir.join(&profile).join(name);
    assert!(
        path.is_file(),
        "bin_path: built {name} but {} is missing",
        path.display()
    );
    path
}

/// Where the running test binary was built: it lives at `<target>/<profile>/deps/<test>`.
/// (A build with `--target <triple>` adds a level; that layout is not supported here.)
fn target_dir_and_profile() -> (PathBuf, String) {
    let test_exe = std::env::current_exe().expect("the test binary has a path");
    let profile_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps/");
    let profile = profile_dir
        .file_name()
        .and_then(|name| name.to_str())
        .expect("the profile directory has a UTF-8 name")
        .to_owned();
    let target_dir = profile_dir
        .parent()
        .expect("the profile directory sits in the target directory")
        .to_path_buf();
    // With a separate build directory (`CARGO_BUILD_BUILD_DIR`, e.g. several worktrees sharing
    // one build cache) the test binary lives in the build directory, while the binaries
    // belong in this tree's own target directory.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(target_dir);
    (target_dir, profile)
}
