# mesh: the entry points. `just` lists them.

default:
    @just --list

# Install the system tools the build and tests need (apt; idempotent).
setup:
    scripts/setup

# Build every binary: mesh-proxy, mesh-controller, mesh-injector, meshctl.
build:
    cargo build --workspace --bins

# Everything CI runs: format check, clippy with warnings denied, then every test.
test: setup fmt-check lint
    cargo nextest run --workspace --all-targets --no-tests=fail

# Clippy over every crate and target, warnings denied.
lint:
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Format the code.
fmt:
    cargo fmt --all

# Check the formatting without changing anything.
fmt-check:
    cargo fmt --all -- --check

# Run the mesh on this machine.
demo *ARGS: setup
    cargo run --quiet --bin meshctl -- demo {{ARGS}}

# Benchmarks (the benchmark issue): not yet.
bench *ARGS:
    @echo "just bench: not yet (benchmark issue)"; exit 1
