//! The `Admin` service of `agent.proto` on the controller's CSI socket: what `holdfast ctl
//! nodes` shows (every node of the registry, up / down / retired, with its pools).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::registry::{NodeView, Registry};
use crate::agent_proto::admin_server::{Admin, AdminServer};
use crate::agent_proto::{ListNodesRequest, ListNodesResponse, NodeStatus};
use crate::placement::NodeState;

/// The Admin service over a registry.
pub struct AdminService(Arc<Registry>);

/// The Admin service for `reg`, ready to add to a server.
pub fn admin_service(reg: Arc<Registry>) -> AdminServer<AdminService> {
    AdminServer::new(AdminService(reg))
}

/// The wire form of a node's state.
pub fn state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Up => "up",
        NodeState::Down => "down",
        NodeState::Retired => "retired",
    }
}

/// One node as `ListNodes` answers it.
pub fn status(n: NodeView) -> NodeStatus {
    NodeStatus {
        node_id: n.node_id,
        state: state_name(n.state).to_owned(),
        address: n.address,
        pools: n.pools,
        volumes: n.volumes as u64,
        snapshots: n.snapshots as u64,
        agent_release: n.release,
        version: n.version,
        agent_started_unix: n.started_unix,
        last_seen_unix: n.last_seen_unix,
        in_process: n.in_process,
        segments: n.segments.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_nodes(&self, _: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        Ok(Response::new(ListNodesResponse { nodes: self.0.nodes_view().into_iter().map(status).collect() }))
    }
}
