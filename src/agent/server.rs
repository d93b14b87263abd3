//! The Agent API served over gRPC (`agent.proto`'s `Agent` service): each rpc calls the
//! node's [`AgentOps`] with the budget the caller's deadline leaves, exactly as the CSI server
//! does ([`crate::jobs::wait_budget`] on the request's `grpc-timeout`), and logs one line per
//! call. Transport security is the caller's: `holdfast agent` serves this behind
//! [`crate::tls::serve`] (mutual TLS, a client without a valid certificate never reaches a
//! handler) or, under `--insecure`, on a loopback address.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::AgentOps;
use crate::agent_proto as ap;
use crate::agent_proto::agent_server::{Agent, AgentServer};
use crate::csi::traced;
use crate::jobs::wait_budget;
use crate::proto;

/// The largest message the Agent API takes or sends: an inventory of 10,000 volumes is a few
/// MiB, past tonic's default of 4 MiB.
pub const MAX_MESSAGE: usize = 64 << 20;

/// The gRPC service over one node's agent.
pub struct AgentService {
    ops: Arc<dyn AgentOps>,
}

/// The Agent API of `agent`, ready for a tonic router.
pub fn agent_service(agent: Arc<dyn AgentOps>) -> AgentServer<AgentService> {
    AgentServer::new(AgentService { ops: agent }).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE)
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn create_volume(&self, r: Request<ap::CreateVolumeRequest>) -> Result<Response<proto::CreateVolumeResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let name = r.request.as_ref().map(|q| q.name.clone()).unwrap_or_default();
        traced("agent.CreateVolume", &name, self.ops.create_volume(r, budget)).await
    }

    async fn delete_volume(&self, r: Request<proto::DeleteVolumeRequest>) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("agent.DeleteVolume", &id, self.ops.delete_volume(r, budget)).await
    }

    async fn expand_volume(
        &self,
        r: Request<proto::ControllerExpandVolumeRequest>,
    ) -> Result<Response<proto::ControllerExpandVolumeResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("agent.ExpandVolume", &id, self.ops.expand_volume(r, budget)).await
    }

    async fn create_snapshot(&self, r: Request<proto::CreateSnapshotRequest>) -> Result<Response<proto::CreateSnapshotResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let id = r.source_volume_id.clone();
        traced("agent.CreateSnapshot", &id, self.ops.create_snapshot(r, budget)).await
    }

    async fn delete_snapshot(&self, r: Request<proto::DeleteSnapshotRequest>) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let id = r.snapshot_id.clone();
        traced("agent.DeleteSnapshot", &id, self.ops.delete_snapshot(r, budget)).await
    }

    async fn get_volume(&self, r: Request<ap::GetVolumeRequest>) -> Result<Response<ap::GetVolumeResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let key = match &r.key {
            Some(ap::get_volume_request::Key::VolumeId(k) | ap::get_volume_request::Key::CsiName(k)) => k.clone(),
            None => String::new(),
        };
        traced("agent.GetVolume", &key, self.ops.get_volume(r, budget)).await
    }

    async fn list_volumes(&self, r: Request<ap::ListVolumesRequest>) -> Result<Response<ap::ListVolumesResponse>, Status> {
        let budget = wait_budget(r.metadata());
        traced("agent.ListVolumes", "", self.ops.list_volumes(r.into_inner(), budget)).await
    }

    async fn get_snapshot(&self, r: Request<ap::GetSnapshotRequest>) -> Result<Response<ap::GetSnapshotResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let key = match &r.key {
            Some(ap::get_snapshot_request::Key::SnapshotId(k) | ap::get_snapshot_request::Key::CsiName(k)) => k.clone(),
            None => String::new(),
        };
        traced("agent.GetSnapshot", &key, self.ops.get_snapshot(r, budget)).await
    }

    async fn list_snapshots(&self, r: Request<ap::ListSnapshotsRequest>) -> Result<Response<ap::ListSnapshotsResponse>, Status> {
        let budget = wait_budget(r.metadata());
        traced("agent.ListSnapshots", "", self.ops.list_snapshots(r.into_inner(), budget)).await
    }

    async fn get_capacity(&self, r: Request<ap::GetCapacityRequest>) -> Result<Response<ap::GetCapacityResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let pool = r.pool.clone();
        traced("agent.GetCapacity", &pool, self.ops.get_capacity(r, budget)).await
    }

    async fn get_inventory(&self, r: Request<ap::GetInventoryRequest>) -> Result<Response<ap::Inventory>, Status> {
        let budget = wait_budget(r.metadata());
        traced("agent.GetInventory", "", self.ops.get_inventory(budget)).await
    }

    // issue 12: modify
    async fn modify_volume(
        &self,
        r: Request<proto::ControllerModifyVolumeRequest>,
    ) -> Result<Response<proto::ControllerModifyVolumeResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("agent.ModifyVolume", &id, self.ops.modify_volume(r, budget)).await
    }

    // issue 12: group snapshots
    async fn create_volume_group_snapshot(
        &self,
        r: Request<proto::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<proto::CreateVolumeGroupSnapshotResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let name = r.name.clone();
        traced("agent.CreateVolumeGroupSnapshot", &name, self.ops.create_group_snapshot(r, budget)).await
    }

    async fn delete_volume_group_snapshot(
        &self,
        r: Request<proto::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<proto::DeleteVolumeGroupSnapshotResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let id = r.group_snapshot_id.clone();
        traced("agent.DeleteVolumeGroupSnapshot", &id, self.ops.delete_group_snapshot(r, budget)).await
    }

    async fn get_volume_group_snapshot(
        &self,
        r: Request<proto::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<proto::GetVolumeGroupSnapshotResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let id = r.group_snapshot_id.clone();
        traced("agent.GetVolumeGroupSnapshot", &id, self.ops.get_group_snapshot(r, budget)).await
    }

    // issue 11: cluster
    async fn claim_name(&self, r: Request<ap::ClaimNameRequest>) -> Result<Response<ap::ClaimNameResponse>, Status> {
        let budget = wait_budget(r.metadata());
        let r = r.into_inner();
        let name = r.csi_name.clone();
        traced("agent.ClaimName", &name, self.ops.claim_name(r, budget)).await
    }
}
