//! The gRPC APIs every mesh program speaks, generated from the versioned `.proto` files in
//! `proto/proto/mesh/*/v1/`.
//!
//! This crate owns the wire contract and nothing else: no logic, no I/O, no conversions that
//! belong to one user. The modules mirror the protobuf packages (`mesh.destination.v1` is
//! [`mesh::destination::v1`]); the short aliases below are what callers import.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod codec;

/// Generated code, one module per protobuf package.
pub mod mesh {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("mesh.common.v1");
        }
    }
    pub mod destination {
        pub mod v1 {
            tonic::include_proto!("mesh.destination.v1");
        }
    }
    pub mod identity {
        pub mod v1 {
            tonic::include_proto!("mesh.identity.v1");
        }
    }
    pub mod policy {
        pub mod v1 {
            tonic::include_proto!("mesh.policy.v1");
        }
    }
    pub mod tap {
        pub mod v1 {
            tonic::include_proto!("mesh.tap.v1");
        }
    }
    pub mod stats {
        pub mod v1 {
            tonic::include_proto!("mesh.stats.v1");
        }
    }
    pub mod workload {
        pub mod v1 {
            tonic::include_proto!("mesh.workload.v1");
        }
    }
}

pub use mesh::common::v1 as common;
pub use mesh::destination::v1 as destination;
pub use mesh::identity::v1 as identity;
pub use mesh::policy::v1 as policy;
pub use mesh::stats::v1 as stats;
pub use mesh::tap::v1 as tap;
pub use mesh::workload::v1 as workload;

/// Re-exported so users name the same prost/tonic versions as the generated code.
pub use prost;
pub use prost_types;
pub use tonic;

mod convert;
pub use convert::AddressError;
