//! holdfast: a CSI storage driver. The library holds everything; `main.rs` is only the CLI.
#![forbid(unsafe_code)]

/// The generated CSI v1.12 messages, clients and servers (`proto/csi.proto`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// The generated holdfast Agent API (`proto/holdfast/v1/agent.proto`): the controller ↔ agent
/// messages, the `Agent` service every agent serves and the `Registry` service the controller
/// serves.
pub mod agent_proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("holdfast.v1");

    /// The wire version this build speaks (sent in every registration and heartbeat).
    pub const WIRE_VERSION: WireVersion = WireVersion { major: 1, minor: 0 };
}

pub mod agent;
pub mod bench;
pub mod blocking;
pub mod certs;
pub mod client;
pub mod config;
pub mod controller;
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
pub mod store;
pub mod tls;
pub mod volume_id;
