//! Compiles the demo app's own gRPC API (`proto/demo/v1/authors.proto`) with protox (pure
//! Rust, no system protoc), as `mesh-proto` does for the mesh's APIs. It lives here rather
//! than in `mesh-proto` because only the demo app speaks it: it is not part of the mesh.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/demo/v1/authors.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
