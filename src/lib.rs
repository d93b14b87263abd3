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

    /// The wire version this process speaks: [`WIRE_VERSION`], except in debug builds, where
    /// the environment variable `HOLDFAST_TEST_WIRE_VERSION=MAJOR.MINOR` replaces it so tests
    /// can run an agent of another version against a controller (release builds ignore it).
    /// Both sides call this: the agent for what it sends, the controller as its own version.
    pub fn wire_version() -> WireVersion {
        #[cfg(debug_assertions)]
        if let Some(v) = std::env::var("HOLDFAST_TEST_WIRE_VERSION").ok().as_deref().and_then(parse_wire_version) {
            return v;
        }
        WIRE_VERSION
    }

    /// Parses `MAJOR.MINOR`.
    pub fn parse_wire_version(s: &str) -> Option<WireVersion> {
        let (major, minor) = s.trim().split_once('.')?;
        Some(WireVersion { major: major.parse().ok()?, minor: minor.parse().ok()? })
    }
}

/// The version `holdfast --version` prints: the crate's version and the git commit it was built
/// from (GetPluginInfo reports the two apart: `vendor_version` and the manifest's `commit`).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("HOLDFAST_GIT_COMMIT"), ")");

/// The git commit this binary was built from ("unknown" when built outside a checkout).
pub const GIT_COMMIT: &str = env!("HOLDFAST_GIT_COMMIT");

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
// issue 14: metrics, health endpoints
pub mod metrics;
pub mod node;
pub mod observe;
pub mod placement;
pub mod pool;
pub mod server;
pub mod store;
pub mod tls;
pub mod volume_id;
