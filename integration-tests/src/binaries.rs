//! The workspace's binaries, built on demand for tests.
//!
//! An integration test can only use `CARGO_BIN_EXE_*` for binaries of its own package, so the
//! product's binaries (`mesh-proxy`, `mesh-controller`, ...) are built here with `cargo build
//! --workspace --all-targets`, into the same target directory and profile as the running
//! test, once per test process. All targets, as the test run itself builds them: any other
//! set unifies dependency features differently (dev-dependencies add some), so the binaries
//! would be relinked by every test process and again by the next test run. After `just test`'s
//! build this is a no-op.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Where this process's build put the binaries (`<target>/<profile>`), once it ran.
static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The path of the workspace binary `name` (e.g. `"mesh-proxy"`), freshly built. The first
/// call runs `cargo build --workspace --all-targets` (quick when nothing changed), which
/// builds every binary; later calls only look. Panics with the build's output when the build
/// fails, or when there is no such binary: tests cannot go on without it.
pub fn bin_path(name: &str) -> PathBuf {
    // Held across the build so parallel tests in one process build once.
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = built.get_or_insert_with(|| build(name));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "bin_path: built the workspace but {} is missing",
        path.display()
    );
    path
}

/// The workspace's root folder (scripts, target, the crates).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests/ sits inside the workspace")
        .to_path_buf()
}

/// Builds every target; returns the folder the binaries are in.
fn build(name: &str) -> PathBuf {
    let (target_dir, profile) = target_dir_and_profile();
    let workspace = workspace_root();
    // `CARGO` is the cargo running these tests (same toolchain); plain `cargo` otherwise.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args([
            "build",
            "--quiet",
            "--workspace",
            "--all-targets",
            "--target-dir",
        ])
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
        "bin_path: `cargo build --workspace --all-targets` (for {name}) failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    target_dir.join(&profile)
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
