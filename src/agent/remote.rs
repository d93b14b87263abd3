//! [`RemoteAgent`]: the Agent API of another node, called over gRPC (mutual TLS, or plain
//! text on loopback under `--insecure`). The channel is opened on the first call and reopened
//! after a failure, so making one never blocks and a node that is down costs nothing until
//! asked. Each call carries its budget as its gRPC deadline; a peer's answer keeps its code
//! ([`Error::from_status`]); a transport failure is UNAVAILABLE naming the node and address.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::AgentOps;
use super::server::MAX_MESSAGE;
use crate::agent_proto as ap;
use crate::agent_proto::agent_client::AgentClient;
use crate::error::{Error, Result};
use crate::proto;
use crate::tls::{self, ClientTls};

/// Time past the budget before the caller stops waiting itself (the peer answers within the
/// budget; this covers a peer that does not answer at all).
const GRACE: Duration = Duration::from_secs(1);

/// The agent of another node.
pub struct RemoteAgent {
    node_id: String,
    address: String,
    server_name: String,
    tls: Option<Arc<ClientTls>>,
    channel: tokio::sync::Mutex<Option<Channel>>,
}

impl RemoteAgent {
    /// The agent of `node_id` at `address` (`host:port`), whose certificate must name
    /// `server_name`. Lazily connecting (never blocks); `tls: None` only under --insecure.
    pub fn new(node_id: &str, address: &str, server_name: &str, tls: Option<Arc<ClientTls>>) -> RemoteAgent {
        RemoteAgent {
            node_id: node_id.to_owned(),
            address: address.to_owned(),
            server_name: server_name.to_owned(),
            tls,
            channel: tokio::sync::Mutex::new(None),
        }
    }

    /// The address this agent is called at.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn unreachable(&self, why: &str) -> Error {
        Error::Unavailable(format!("agent of node {} at {} unreachable: {why}", self.node_id, crate::error::bounded(&self.address)))
    }

    /// A client on the open channel, opening it first if needed.
    async fn client(&self) -> Result<AgentClient<Channel>> {
        let mut open = self.channel.lock().await;
        let channel = match open.as_ref() {
            Some(c) => c.clone(),
            None => {
                let c = match &self.tls {
                    Some(t) => tls::connect(&self.address, &self.server_name, t.clone()).await,
                    None => plain(&self.address).await,
                }
                .map_err(|e| self.unreachable(&e))?;
                *open = Some(c.clone());
                c
            }
        };
        Ok(AgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE))
    }

    /// Runs one call within `budget`, mapping its failure.
    async fn call<Req, Resp, F, Fut>(&self, req: Req, budget: Duration, f: F) -> Result<Resp>
    where
        F: FnOnce(AgentClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let run = async {
            let client = self.client().await?;
            let mut request = tonic::Request::new(req);
            request.set_timeout(budget);
            match f(client, request).await {
                Ok(r) => Ok(r.into_inner()),
                Err(status) if is_transport(&status) => {
                    // Reopened on the next call (a restarted agent, a new address behind a name).
                    *self.channel.lock().await = None;
                    Err(self.unreachable(status.message()))
                }
                Err(status) => Err(Error::from_status(&status, &format!("agent of node {}", self.node_id))),
            }
        };
        match tokio::time::timeout(budget + GRACE, run).await {
            Ok(r) => r,
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "agent of node {} at {} did not answer within {budget:?}",
                self.node_id,
                crate::error::bounded(&self.address)
            ))),
        }
    }
}

/// A plain-text channel (`--insecure`, loopback only: checked where the flag is parsed).
async fn plain(address: &str) -> std::result::Result<Channel, String> {
    Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("address {address:?}: {e}"))?
        .connect_timeout(tls::HANDSHAKE_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))
}

/// Whether a failed call failed on the way (no answer from the agent): tonic keeps the
/// transport's error as the status's source, an answer has none.
fn is_transport(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some() && matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
}

#[tonic::async_trait]
impl AgentOps for RemoteAgent {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn create_volume(&self, req: ap::CreateVolumeRequest, budget: Duration) -> Result<proto::CreateVolumeResponse> {
        self.call(req, budget, |mut c, r| async move { c.create_volume(r).await }).await
    }

    async fn delete_volume(&self, req: proto::DeleteVolumeRequest, budget: Duration) -> Result<proto::DeleteVolumeResponse> {
        self.call(req, budget, |mut c, r| async move { c.delete_volume(r).await }).await
    }

    async fn expand_volume(
        &self,
        req: proto::ControllerExpandVolumeRequest,
        budget: Duration,
    ) -> Result<proto::ControllerExpandVolumeResponse> {
        self.call(req, budget, |mut c, r| async move { c.expand_volume(r).await }).await
    }

    async fn create_snapshot(&self, req: proto::CreateSnapshotRequest, budget: Duration) -> Result<proto::CreateSnapshotResponse> {
        self.call(req, budget, |mut c, r| async move { c.create_snapshot(r).await }).await
    }

    async fn delete_snapshot(&self, req: proto::DeleteSnapshotRequest, budget: Duration) -> Result<proto::DeleteSnapshotResponse> {
        self.call(req, budget, |mut c, r| async move { c.delete_snapshot(r).await }).await
    }

    async fn get_volume(&self, req: ap::GetVolumeRequest, budget: Duration) -> Result<ap::GetVolumeResponse> {
        self.call(req, budget, |mut c, r| async move { c.get_volume(r).await }).await
    }

    async fn list_volumes(&self, req: ap::ListVolumesRequest, budget: Duration) -> Result<ap::ListVolumesResponse> {
        self.call(req, budget, |mut c, r| async move { c.list_volumes(r).await }).await
    }

    async fn get_snapshot(&self, req: ap::GetSnapshotRequest, budget: Duration) -> Result<ap::GetSnapshotResponse> {
        self.call(req, budget, |mut c, r| async move { c.get_snapshot(r).await }).await
    }

    async fn list_snapshots(&self, req: ap::ListSnapshotsRequest, budget: Duration) -> Result<ap::ListSnapshotsResponse> {
        self.call(req, budget, |mut c, r| async move { c.list_snapshots(r).await }).await
    }

    async fn get_capacity(&self, req: ap::GetCapacityRequest, budget: Duration) -> Result<ap::GetCapacityResponse> {
        self.call(req, budget, |mut c, r| async move { c.get_capacity(r).await }).await
    }

    async fn get_inventory(&self, budget: Duration) -> Result<ap::Inventory> {
        self.call(ap::GetInventoryRequest {}, budget, |mut c, r| async move { c.get_inventory(r).await }).await
    }
}
