//! holdfast: a CSI storage driver. The library holds everything; `main.rs` is only the CLI.
#![forbid(unsafe_code)]

/// The generated CSI v1.12 messages, clients and servers (`proto/csi.proto`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

pub mod bench;
pub mod blocking;
pub mod config;
pub mod crash;
pub mod csi;
pub mod ctl;
pub mod driver;
pub mod endpoint;
pub mod error;
pub mod exec;
pub mod jobs;
pub mod locks;
pub mod node;
pub mod placement;
pub mod pool;
pub mod server;
pub mod volume_id;
