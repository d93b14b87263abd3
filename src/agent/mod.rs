//! The agent side of holdfast: what the controller asks of the pools of one node, as one Rust
//! trait ([`AgentOps`]) with the Agent API's messages (`proto/holdfast/v1/agent.proto`).
//!
//! Two implementations exist and the controller cannot tell them apart:
//! - [`local::LocalAgent`] runs the operations on this process's own [`Driver`]: in
//!   `holdfast agent` behind the gRPC server ([`server`]), in `holdfast all-in-one` and for the
//!   controller's own `nfs` pools in-process. It is the one implementation of CSI's controller
//!   operations on pools (validation, idempotency, locks, copies).
//! - [`remote::RemoteAgent`] calls an agent over mutual TLS.
//!
//! Every call carries a budget: the longest the caller waits (a copy still running when it is
//! spent answers ABORTED "copy of … in progress", as on a single node). Errors keep the spec's
//! codes across the hop ([`crate::error::Error::from_status`]).

use std::time::Duration;

pub mod local;
pub mod register;
pub mod remote;
pub mod server;

use crate::agent_proto as ap;
use crate::error::Result;
use crate::proto;

/// The Agent API of one node, in-process or remote. Method for method the `Agent` service of
/// `agent.proto`; see there for what each promises.
#[tonic::async_trait]
pub trait AgentOps: Send + Sync + 'static {
    /// The node this agent serves (part of every id it issues).
    fn node_id(&self) -> &str;
    /// CreateVolume in `req.pool`, waiting for a copy at most `budget`.
    async fn create_volume(&self, req: ap::CreateVolumeRequest, budget: Duration) -> Result<proto::CreateVolumeResponse>;
    /// DeleteVolume of an id this agent issued (an id naming nothing: OK).
    async fn delete_volume(&self, req: proto::DeleteVolumeRequest, budget: Duration) -> Result<proto::DeleteVolumeResponse>;
    /// ControllerExpandVolume.
    async fn expand_volume(
        &self,
        req: proto::ControllerExpandVolumeRequest,
        budget: Duration,
    ) -> Result<proto::ControllerExpandVolumeResponse>;
    /// CreateSnapshot of a volume of this node, waiting for its copy at most `budget`.
    async fn create_snapshot(&self, req: proto::CreateSnapshotRequest, budget: Duration) -> Result<proto::CreateSnapshotResponse>;
    /// DeleteSnapshot.
    async fn delete_snapshot(&self, req: proto::DeleteSnapshotRequest, budget: Duration) -> Result<proto::DeleteSnapshotResponse>;
    /// One volume by id or CSI name; `volume: None` when there is none.
    async fn get_volume(&self, req: ap::GetVolumeRequest, budget: Duration) -> Result<ap::GetVolumeResponse>;
    /// One page of this node's volumes.
    async fn list_volumes(&self, req: ap::ListVolumesRequest, budget: Duration) -> Result<ap::ListVolumesResponse>;
    /// One snapshot by id or CSI name; `snapshot: None` when there is none.
    async fn get_snapshot(&self, req: ap::GetSnapshotRequest, budget: Duration) -> Result<ap::GetSnapshotResponse>;
    /// One page of this node's snapshots.
    async fn list_snapshots(&self, req: ap::ListSnapshotsRequest, budget: Duration) -> Result<ap::ListSnapshotsResponse>;
    /// Capacity of one pool or of every pool.
    async fn get_capacity(&self, req: ap::GetCapacityRequest, budget: Duration) -> Result<ap::GetCapacityResponse>;
    /// The full inventory now.
    async fn get_inventory(&self, budget: Duration) -> Result<ap::Inventory>;

    // issue 11: cluster
    /// Claims (or releases) a CSI name for a controller before it places the volume; an agent
    /// that does not know claims (an older one) refuses UNIMPLEMENTED.
    async fn claim_name(&self, req: ap::ClaimNameRequest, budget: Duration) -> Result<ap::ClaimNameResponse>;
    // issue 12: modify
    /// ControllerModifyVolume of a volume of this node. The default is for agents that serve
    /// no pools of their own (a node no process serves): UNIMPLEMENTED.
    async fn modify_volume(
        &self,
        req: proto::ControllerModifyVolumeRequest,
        _budget: Duration,
    ) -> Result<proto::ControllerModifyVolumeResponse> {
        Err(crate::error::Error::Unimplemented(format!(
            "node {} cannot modify volume {}",
            self.node_id(),
            crate::error::bounded(&req.volume_id)
        )))
    }

    // issue 12: group snapshots (defaults: an agent that serves none, e.g. a test's fake)
    /// CreateVolumeGroupSnapshot of volumes of one pool of this node.
    async fn create_group_snapshot(
        &self,
        _req: proto::CreateVolumeGroupSnapshotRequest,
        _budget: Duration,
    ) -> Result<proto::CreateVolumeGroupSnapshotResponse> {
        Err(no_groups(self.node_id()))
    }
    /// DeleteVolumeGroupSnapshot (an id naming nothing: OK).
    async fn delete_group_snapshot(
        &self,
        _req: proto::DeleteVolumeGroupSnapshotRequest,
        _budget: Duration,
    ) -> Result<proto::DeleteVolumeGroupSnapshotResponse> {
        Err(no_groups(self.node_id()))
    }
    /// GetVolumeGroupSnapshot (NOT_FOUND when no member is left).
    async fn get_group_snapshot(
        &self,
        _req: proto::GetVolumeGroupSnapshotRequest,
        _budget: Duration,
    ) -> Result<proto::GetVolumeGroupSnapshotResponse> {
        Err(no_groups(self.node_id()))
    }
}

/// What an agent without group snapshots answers.
fn no_groups(node: &str) -> crate::error::Error {
    crate::error::Error::Unimplemented(format!("the agent of node {node} does not serve group snapshots (upgrade it)"))
}
