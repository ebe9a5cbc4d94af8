# mesh: the entry points. `just` lists them.

default:
    @just --list

# Install the system tools the build and tests need (apt; idempotent).
setup:
    scripts/setup

# Build every binary: mesh-proxy, mesh-controller, mesh-injector, meshctl.
build:
    cargo build --workspace --bins

# Every target is built first (the binaries with the tests' features, as the end-to-end tests'
# `bin_path` builds them, so nothing is relinked while tests run them as real processes), and
# the Kubernetes binaries the cluster tests start (once per machine, ~5 and ~8 minutes on a
# fresh one: built inside a test they would outlast its timeout; root only, like those tests).
# Everything CI runs: format check, clippy with warnings denied, then every test.
test: setup fmt-check lint
    if [ "$(id -u)" -eq 0 ]; then scripts/k8s-test-cluster build && scripts/k8s-node build; fi
    cargo build --workspace --all-targets
    cargo nextest run --workspace --all-targets --no-tests=fail

# A failure prints the smallest input it found and the MESH_FUZZ_SEED that replays it.
# The fuzz targets (tests/fuzz) of mesh-proxy, mesh-injector, mesh-controller, SECONDS each.
fuzz SECONDS="60":
    MESH_FUZZ_SECONDS={{SECONDS}} cargo nextest run --profile fuzz -p mesh-proxy -p mesh-injector -p mesh-controller --test fuzz

# Clippy over every crate and target, warnings denied.
lint:
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Format the code.
fmt:
    cargo fmt --all

# Check the formatting without changing anything.
fmt-check:
    cargo fmt --all -- --check

# Run the mesh on this machine: the demo app in a local mesh, then the live dashboard
# (`just demo --headless --duration 30s` prints a summary instead). `local up` runs the
# mesh-proxy and mesh-controller built beside meshctl, so all three are built first.
demo *ARGS: setup
    cargo build --quiet --bin meshctl --bin mesh-proxy --bin mesh-controller
    cargo run --quiet --bin meshctl -- demo {{ARGS}}

# Two clusters on this machine (two API servers, a controller each), linked: west calls a
# Service east exports, by its mirror's name, over mutual TLS; then check, scale, unlink.
multicluster-demo: setup
    scripts/multicluster-demo

# Benchmarks: the mesh beside a direct path and HAProxy; writes BENCHMARKS.md and
# bench-results.json. `just bench` takes under 10 minutes, `just bench quick` under 2.
bench *ARGS: setup
    scripts/bench-setup
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true; cargo run --release -p mesh-bench -- {{ARGS}}

# Callgrind (deterministic: a 1% change shows) counts a proxy's user instructions per request
# through the bench's mTLS hop, and where they go: `just callgrind server 3000`.
callgrind SIDE="client" REQUESTS="3000": setup
    scripts/bench-setup
    cargo build --release -p mesh-proxy -p mesh-bench
    scripts/callgrind-hop {{SIDE}} {{REQUESTS}}

# The container images of mesh-proxy, mesh-controller and mesh-injector, from release binaries:
# target/images/<name>.tar (docker-archive, tagged localhost/mesh/<name>:<version>) and
# target/images/oci/<name>.tar (OCI layout). Same inputs, same digests. No Docker needed.
images: setup
    scripts/images

# `up` starts the node (building its binaries once, ~8 min) and imports the images `just images`
# built; `down` stops it and puts the host back (sysctls, links, rules). Root only.
# A real single-node Kubernetes here (kubelet, containerd, CNI, kube-proxy, DNS): up or down.
cluster ACTION:
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{ACTION}}" in
      up)
        kubeconfig=$(scripts/k8s-node up)
        if ls target/images/*.tar >/dev/null 2>&1; then scripts/k8s-node import target/images/*.tar; fi
        echo "export KUBECONFIG=$kubeconfig"
        ;;
      down) scripts/k8s-node down ;;
      *) echo "usage: just cluster up|down" >&2; exit 1 ;;
    esac

# Regenerate the Grafana dashboards (charts/mesh/dashboards/*.json) from scripts/dashboards.py.
dashboards:
    python3 scripts/dashboards.py
