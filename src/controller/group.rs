//! The CSI GroupController service (issue 12): group snapshots, routed like snapshots. A
//! group lives in one pool of one node, so the controller checks that every source volume id
//! names the first one's node and pool (INVALID_ARGUMENT naming the one that does not), then
//! hands the request to that node's agent, which takes the group ([`crate::agent::local`]).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{ClusterController, Route, registry};
use crate::agent_proto as ap;
use crate::csi::{require, traced};
use crate::error::{Error, Result, bounded};
use crate::jobs;
use crate::placement::NodeState;
use crate::proto::group_controller_server::GroupController;
use crate::proto::*;
use crate::volume_id::VolumeId;

/// The GroupController service over the cluster's controller.
pub struct GroupService(pub Arc<ClusterController>);

impl ClusterController {
    /// CreateVolumeGroupSnapshot: one node, one pool, then the node's agent.
    async fn create_group(&self, req: CreateVolumeGroupSnapshotRequest, budget: Duration) -> Result<CreateVolumeGroupSnapshotResponse> {
        crate::agent::local::group::check_group_name(&req.name)?;
        let Some(first) = req.source_volume_ids.first() else {
            return Err(Error::InvalidArgument("source_volume_ids is required".into()));
        };
        let mut ids = Vec::new();
        for raw in &req.source_volume_ids {
            let missing = || Error::NotFound(format!("source volume {} does not exist", bounded(raw)));
            ids.push(VolumeId::parse(raw).filter(VolumeId::may_name_volume).ok_or_else(missing)?);
        }
        let head = &ids[0];
        if let Some((i, other)) =
            ids.iter().enumerate().find(|(_, id)| id.node != head.node || id.pool != head.pool || id.kind != head.kind)
        {
            return Err(Error::InvalidArgument(format!(
                "volume {} is on node {} pool {:?}, not on node {} pool {:?} of volume {}: a group snapshot is of volumes of one pool of one node",
                bounded(&req.source_volume_ids[i]),
                other.node.as_deref().unwrap_or("-"),
                other.pool,
                head.node.as_deref().unwrap_or("-"),
                head.pool,
                bounded(first)
            )));
        }
        let missing = || Error::NotFound(format!("source volume {} does not exist", bounded(first)));
        match self.route(head) {
            Route::Up(node, agent) => {
                let name = req.name.clone();
                let resp = agent.create_group_snapshot(req, budget).await?;
                for s in resp.group_snapshot.iter().flat_map(|g| g.snapshots.iter()) {
                    if let Some(sid) = VolumeId::parse(&s.snapshot_id) {
                        let csi_name = crate::agent::local::group::member_name(
                            &name,
                            &VolumeId::parse(&s.source_volume_id).map(|v| v.local).unwrap_or_default(),
                        );
                        let entry = ap::Snapshot {
                            pool: sid.pool,
                            local_name: sid.local,
                            csi_name,
                            snapshot: Some(s.clone()),
                            ..Default::default()
                        };
                        self.reg.note_snapshot(&node, entry);
                    }
                }
                Ok(resp)
            }
            Route::Trouble(n) if n.state == NodeState::Down => Err(registry::unreachable(&n)),
            Route::Trouble(n) => Err(Error::NotFound(format!("source volume {} is on retired node {}", bounded(first), n.node_id))),
            Route::Unknown(node, pool) => Err(self.unknown(&node, &pool, missing())),
        }
    }

    /// DeleteVolumeGroupSnapshot: an id naming nothing is OK.
    async fn delete_group(&self, req: DeleteVolumeGroupSnapshotRequest, budget: Duration) -> Result<DeleteVolumeGroupSnapshotResponse> {
        require("group_snapshot_id", &req.group_snapshot_id)?;
        let Some(id) = VolumeId::parse(&req.group_snapshot_id).filter(VolumeId::is_group) else {
            return Ok(DeleteVolumeGroupSnapshotResponse {});
        };
        match self.route(&id) {
            Route::Up(node, agent) => {
                let listed: Vec<VolumeId> = req.snapshot_ids.iter().filter_map(|s| VolumeId::parse(s)).collect();
                let resp = agent.delete_group_snapshot(req, budget).await?;
                for sid in listed {
                    self.reg.forget_snapshot(&node, &sid.pool, &sid.local);
                }
                Ok(resp)
            }
            Route::Trouble(n) if n.state == NodeState::Retired => Ok(DeleteVolumeGroupSnapshotResponse {}),
            Route::Trouble(n) => Err(registry::unreachable(&n)),
            Route::Unknown(node, pool) => match self.unknown(&node, &pool, Error::NotFound(String::new())) {
                Error::NotFound(_) => Ok(DeleteVolumeGroupSnapshotResponse {}),
                e => Err(e),
            },
        }
    }

    /// GetVolumeGroupSnapshot.
    async fn get_group(&self, req: GetVolumeGroupSnapshotRequest, budget: Duration) -> Result<GetVolumeGroupSnapshotResponse> {
        require("group_snapshot_id", &req.group_snapshot_id)?;
        let missing = || Error::NotFound(format!("group snapshot {} does not exist", bounded(&req.group_snapshot_id)));
        let id = VolumeId::parse(&req.group_snapshot_id).filter(VolumeId::is_group).ok_or_else(missing)?;
        match self.route(&id) {
            Route::Up(_, agent) => agent.get_group_snapshot(req, budget).await,
            Route::Trouble(n) if n.state == NodeState::Down => Err(registry::unreachable(&n)),
            Route::Trouble(_) => Err(missing()),
            Route::Unknown(node, pool) => Err(self.unknown(&node, &pool, missing())),
        }
    }
}

#[tonic::async_trait]
impl GroupController for GroupService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        use group_controller_service_capability::{Rpc, Type, rpc};
        let cap = GroupControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32 })),
        };
        Ok(Response::new(GroupControllerGetCapabilitiesResponse { capabilities: vec![cap] }))
    }

    async fn create_volume_group_snapshot(
        &self,
        r: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let name = r.name.clone();
        traced("CreateVolumeGroupSnapshot", &name, self.0.create_group(r, budget)).await
    }

    async fn delete_volume_group_snapshot(
        &self,
        r: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let id = r.group_snapshot_id.clone();
        traced("DeleteVolumeGroupSnapshot", &id, self.0.delete_group(r, budget)).await
    }

    async fn get_volume_group_snapshot(
        &self,
        r: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let id = r.group_snapshot_id.clone();
        traced("GetVolumeGroupSnapshot", &id, self.0.get_group(r, budget)).await
    }
}
