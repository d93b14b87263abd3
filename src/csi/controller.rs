//! CSI Controller over this node's pools: a thin CSI wrapper over the in-process agent
//! ([`LocalAgent`]), which holds the one implementation of the pool operations. Every call
//! keeps its log line and its budget (the request's deadline) here.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::traced;
use crate::agent::local::LocalAgent;
use crate::driver::Driver;
use crate::jobs;
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self, rpc};
use crate::proto::*;

pub use crate::agent::local::{CTX_FS_TYPE, CTX_POOL, DEFAULT_CAPACITY, capacity_for, minimum_size, paginate};

/// The Controller service.
pub struct ControllerService {
    agent: Arc<LocalAgent>,
}

impl ControllerService {
    /// Serves the controller for `driver`'s pools (an agent of its own).
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerService { agent: LocalAgent::new(driver) }
    }

    /// Serves the controller over an existing agent (whose change feed others follow).
    pub fn over(agent: Arc<LocalAgent>) -> Self {
        ControllerService { agent }
    }
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, r: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let budget = jobs::wait_budget(r.metadata());
        let r = r.into_inner();
        let name = r.name.clone();
        traced("CreateVolume", &name, self.agent.create_within("", r, budget)).await
    }

    async fn delete_volume(&self, r: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("DeleteVolume", &id, self.agent.delete(r)).await
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented("holdfast volumes need no controller publish (attachRequired: false)"))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented("holdfast volumes need no controller unpublish (attachRequired: false)"))
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("ValidateVolumeCapabilities", &id, self.agent.validate(r)).await
    }

    async fn list_volumes(&self, r: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        traced("ListVolumes", "", self.agent.list(r.into_inner())).await
    }

    async fn get_capacity(&self, r: Request<GetCapacityRequest>) -> Result<Response<GetCapacityResponse>, Status> {
        traced("GetCapacity", "", self.agent.capacity(r.into_inner())).await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use rpc::Type as T;
        let caps = [
            T::CreateDeleteVolume,
            T::CreateDeleteSnapshot,
            T::CloneVolume,
            T::ExpandVolume,
            T::ListVolumes,
            T::ListSnapshots,
            T::GetCapacity,
            T::GetVolume,
            T::VolumeCondition,
            T::SingleNodeMultiWriter,
        ];
        Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities: caps.into_iter().map(rpc_cap).collect() }))
    }

    async fn create_snapshot(&self, r: Request<CreateSnapshotRequest>) -> Result<Response<CreateSnapshotResponse>, Status> {
        let budget = jobs::wait_budget(r.metadata());
        let r = r.into_inner();
        let id = r.source_volume_id.clone();
        traced("CreateSnapshot", &id, self.agent.snapshot_within(r, budget)).await
    }

    async fn delete_snapshot(&self, r: Request<DeleteSnapshotRequest>) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = r.into_inner();
        let id = r.snapshot_id.clone();
        traced("DeleteSnapshot", &id, self.agent.delete_snapshot(r)).await
    }

    async fn list_snapshots(&self, r: Request<ListSnapshotsRequest>) -> Result<Response<ListSnapshotsResponse>, Status> {
        traced("ListSnapshots", "", self.agent.list_snapshots(r.into_inner())).await
    }

    async fn get_snapshot(&self, r: Request<GetSnapshotRequest>) -> Result<Response<GetSnapshotResponse>, Status> {
        let r = r.into_inner();
        let id = r.snapshot_id.clone();
        traced("GetSnapshot", &id, self.agent.get_snapshot(r)).await
    }

    async fn controller_expand_volume(
        &self,
        r: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("ControllerExpandVolume", &id, self.agent.expand(r)).await
    }

    async fn controller_get_volume(&self, r: Request<ControllerGetVolumeRequest>) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("ControllerGetVolume", &id, self.agent.get_volume(r)).await
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerModifyVolume is not supported (no mutable parameters)"))
    }
}
