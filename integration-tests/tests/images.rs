//! The container images `scripts/images` builds (from the debug binaries here): the same
//! binaries give the same digests, and the proxy image's own iptables installs the capture
//! rules, run from the image's root filesystem in a network namespace as the mesh-init
//! container runs it in a pod.
//!
//! Needs root (chroot, network namespaces); says so and fails under `CI=true` when not.

use std::path::Path;
use std::process::Command;

use mesh_integration_tests::netns::{NetNs, require_root};
use mesh_integration_tests::workspace_root;

/// Builds the images into `out`; returns what the script printed (a line per image with its
/// digest).
fn build(out: &Path) -> String {
    let output = Command::new(workspace_root().join("scripts/images"))
        .env("MESH_IMAGES_PROFILE", "debug")
        .env("MESH_IMAGES_OUT", out)
        .output()
        .expect("run scripts/images");
    assert!(
        output.status.success(),
        "scripts/images failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn the_images_are_reproducible_and_the_proxy_image_captures_with_its_own_iptables() {
    if !require_root("images") {
        return;
    }
    let scratch = std::env::temp_dir().join(format!("mesh-images-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let (first, second) = (scratch.join("first"), scratch.join("second"));
    let printed = build(&first);
    let again = build(&second);
    let digests = |printed: &str| -> Vec<String> {
        printed
            .lines()
            .map(|line| line.split('\t').take(2).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(
        digests(&printed),
        digests(&again),
        "two builds, two sets of digests"
    );
    let version = env!("CARGO_PKG_VERSION");
    for name in ["proxy", "controller", "injector"] {
        assert!(
            printed.contains(&format!("localhost/mesh/{name}:{version}\tsha256:")),
            "{printed}"
        );
        for archive in [format!("{name}.tar"), format!("oci/{name}.tar")] {
            assert_eq!(
                sha256(&first.join(&archive)),
                sha256(&second.join(&archive)),
                "{archive} differs between two builds"
            );
        }
    }

    // The proxy image's root filesystem, as a container runtime would unpack it.
    let unpacked = scratch.join("unpacked");
    std::fs::create_dir_all(&unpacked).expect("scratch folder");
    let untar = |archive: &Path, into: &Path| {
        let status = Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(into)
            .status()
            .expect("run tar");
        assert!(status.success(), "tar -xf {}", archive.display());
    };
    untar(&first.join("proxy.tar"), &unpacked);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(unpacked.join("manifest.json")).expect("manifest.json"),
    )
    .expect("a docker-archive manifest");
    let layer = manifest[0]["Layers"][0].as_str().expect("one layer");
    let rootfs = scratch.join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("rootfs folder");
    untar(&unpacked.join(layer), &rootfs);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(unpacked.join(manifest[0]["Config"].as_str().expect("a config")))
            .expect("the config"),
    )
    .expect("an image config");
    assert_eq!(
        config["config"]["User"], "2102",
        "the proxy runs as its uid"
    );
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.version"],
        version
    );

    // `mesh-proxy init` with the image's iptables, in a pod-like network namespace. A runtime
    // gives a container its /dev; the chroot gets the one node a spawn needs.
    std::fs::create_dir_all(rootfs.join("dev")).expect("dev folder");
    let status = Command::new("mknod")
        .args(["-m", "666"])
        .arg(rootfs.join("dev/null"))
        .args(["c", "1", "3"])
        .status()
        .expect("mknod");
    assert!(status.success(), "mknod /dev/null");
    let pod = NetNs::new();
    let in_image = |argv: &[&str]| {
        let output = pod
            .command("chroot")
            .arg(&rootfs)
            .args(argv)
            .output()
            .expect("chroot into the image");
        assert!(
            output.status.success(),
            "{argv:?} in the proxy image failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    in_image(&[
        "/usr/local/bin/mesh-proxy",
        "init",
        "--skip-inbound-ports=9000",
    ]);
    let rules = in_image(&["iptables", "-t", "nat", "-S"]);
    for rule in [
        "-A PREROUTING -p tcp -j MESH_INBOUND",
        "-A MESH_INBOUND -p tcp -m tcp --dport 9000 -j RETURN",
        "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 4143",
        "-A MESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
        "-A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
    ] {
        assert!(rules.contains(rule), "{rule} missing:\n{rules}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
