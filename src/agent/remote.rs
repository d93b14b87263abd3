//! [`RemoteAgent`]: the Agent API of another node, called over gRPC (mutual TLS, or plain
//! text on loopback under `--insecure`). The channel is opened on the first call and reopened
//! after a failure, so making one never blocks and a node that is down costs nothing until
//! asked. Each call carries its budget as its gRPC deadline (none when the caller's client sent
//! none, as all-in-one would run it); a peer's answer keeps its code
//! ([`Error::from_status`]); a transport failure is UNAVAILABLE naming the node and address.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::AgentOps;
use super::server::MAX_MESSAGE;
use crate::agent_proto as ap;
use crate::agent_proto::agent_client::AgentClient;
use crate::error::{Error, Result};
use crate::jobs;
use crate::proto;
use crate::tls::{self, ClientTls};

/// Time past the budget before the caller stops waiting itself (the peer answers within the
/// budget; this covers a peer that does not answer at all).
const GRACE: Duration = Duration::from_secs(1);
/// After a failed connection attempt, calls fail at once for this long instead of each waiting
/// for its own attempt (many calls to a dead node must not queue behind each other).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// The channel, or why the last attempt to open one failed and when.
#[derive(Default)]
struct Conn {
    channel: Option<Channel>,
    failed: Option<(std::time::Instant, String)>,
}

/// The agent of another node.
pub struct RemoteAgent {
    node_id: String,
    address: String,
    server_name: String,
    tls: Option<Arc<ClientTls>>,
    conn: tokio::sync::Mutex<Conn>,
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
            conn: tokio::sync::Mutex::new(Conn::default()),
        }
    }

    /// The address this agent is called at.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn unreachable(&self, why: &str) -> Error {
        Error::Unavailable(format!("agent of node {} at {} unreachable: {why}", self.node_id, crate::error::bounded(&self.address)))
    }

    /// A client on the open channel, opening it first if needed (within `budget`).
    async fn client(&self, budget: Duration) -> Result<AgentClient<Channel>> {
        let mut conn = self.conn.lock().await;
        let channel = match (&conn.channel, &conn.failed) {
            (Some(c), _) => c.clone(),
            (None, Some((at, why))) if at.elapsed() < RECONNECT_AFTER => return Err(self.unreachable(why)),
            (None, _) => {
                let connect = async {
                    match &self.tls {
                        Some(t) => tls::connect(&self.address, &self.server_name, t.clone()).await,
                        None => plain(&self.address).await,
                    }
                };
                let opened = match tokio::time::timeout(budget.min(tls::HANDSHAKE_TIMEOUT), connect).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no connection within {:?}", budget.min(tls::HANDSHAKE_TIMEOUT))),
                };
                match opened {
                    Ok(c) => {
                        conn.failed = None;
                        conn.channel.insert(c).clone()
                    }
                    Err(e) => {
                        conn.failed = Some((std::time::Instant::now(), e.clone()));
                        return Err(self.unreachable(&e));
                    }
                }
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
        // Connecting is bounded on its own: a node that cannot be reached is UNAVAILABLE.
        let client = self.client(budget).await?;
        // The caller's client sent no deadline (`jobs::call_budget`): the agent then runs the
        // call as all-in-one would, with no deadline (it waits the default time for a copy job),
        // and only our own bound below, at the longest wait, ends a peer that never answers.
        // Sending a deadline of our own would make the agent's server drop a create that takes
        // longer (a slow lvcreate on a loaded node) midway.
        let deadline = (!jobs::is_unbounded(budget)).then_some(budget);
        let bound = deadline.unwrap_or(jobs::MAX_WAIT);
        let run = async {
            let mut request = tonic::Request::new(req);
            if let Some(d) = deadline {
                request.set_timeout(d);
            }
            match f(client, request).await {
                Ok(r) => Ok(r.into_inner()),
                // Our own deadline passed (tonic's client timeout): the agent is reachable, only
                // slow; the call may still finish there, and a retry finds what it made.
                Err(status) if is_timeout(&status) => Err(self.too_slow(bound)),
                Err(status) if is_transport(&status) => {
                    // Reopened on the next call (a restarted agent, a new address behind a name).
                    self.conn.lock().await.channel = None;
                    Err(self.unreachable(status.message()))
                }
                Err(status) => Err(Error::from_status(&status, &format!("agent of node {}", self.node_id))),
            }
        };
        match tokio::time::timeout(bound + GRACE, run).await {
            Ok(r) => r,
            Err(_) => Err(self.too_slow(bound)),
        }
    }

    fn too_slow(&self, bound: Duration) -> Error {
        Error::DeadlineExceeded(format!(
            "agent of node {} at {} did not answer within {bound:?}",
            self.node_id,
            crate::error::bounded(&self.address)
        ))
    }
}

/// Whether a failed call is tonic's client-side timeout ([`tonic::TimeoutExpired`] somewhere in
/// its chain of sources).
fn is_timeout(status: &tonic::Status) -> bool {
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// A plain-text channel (`--insecure`, loopback only: checked where the flag is parsed).
async fn plain(address: &str) -> std::result::Result<Channel, String> {
    Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("address {address:?}: {e}"))?
        .connect_timeout(tls::HANDSHAKE_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {address}: {}", super::register::with_causes(&e)))
}

/// Whether a failed call failed on the way (no answer from the agent: refused, reset,
/// cancelled by a broken connection): tonic keeps the transport's error as the status's source,
/// an answer has none. A deadline the client enforced stays DEADLINE_EXCEEDED.
fn is_transport(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some() && status.code() != tonic::Code::DeadlineExceeded
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

    // issue 12: modify
    async fn modify_volume(
        &self,
        req: proto::ControllerModifyVolumeRequest,
        budget: Duration,
    ) -> Result<proto::ControllerModifyVolumeResponse> {
        self.call(req, budget, |mut c, r| async move { c.modify_volume(r).await }).await
    }

    // issue 12: group snapshots
    async fn create_group_snapshot(
        &self,
        req: proto::CreateVolumeGroupSnapshotRequest,
        budget: Duration,
    ) -> Result<proto::CreateVolumeGroupSnapshotResponse> {
        self.call(req, budget, |mut c, r| async move { c.create_volume_group_snapshot(r).await }).await
    }

    async fn delete_group_snapshot(
        &self,
        req: proto::DeleteVolumeGroupSnapshotRequest,
        budget: Duration,
    ) -> Result<proto::DeleteVolumeGroupSnapshotResponse> {
        self.call(req, budget, |mut c, r| async move { c.delete_volume_group_snapshot(r).await }).await
    }

    async fn get_group_snapshot(
        &self,
        req: proto::GetVolumeGroupSnapshotRequest,
        budget: Duration,
    ) -> Result<proto::GetVolumeGroupSnapshotResponse> {
        self.call(req, budget, |mut c, r| async move { c.get_volume_group_snapshot(r).await }).await
    }

    // issue 11: cluster
    async fn claim_name(&self, req: ap::ClaimNameRequest, budget: Duration) -> Result<ap::ClaimNameResponse> {
        self.call(req, budget, |mut c, r| async move { c.claim_name(r).await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::local::LocalAgent;

    /// An agent with no pools served in-process on a loopback port; answers its address.
    async fn serve(tmp: &std::path::Path) -> String {
        let exec = Arc::new(crate::exec::FakeExec::new());
        let mounter = Arc::new(crate::node::mount::FakeMounter::new());
        let driver = crate::driver::Driver::new("n1", &crate::config::Config::default(), tmp, exec, mounter).unwrap();
        let agent = LocalAgent::new(Arc::new(driver));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(crate::agent::server::agent_service(agent))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    #[tokio::test]
    async fn an_answer_keeps_its_code_and_names_the_node() {
        let tmp = tempfile::tempdir().unwrap();
        let addr = serve(tmp.path()).await;
        let remote = RemoteAgent::new("n1", &addr, "n1", None);
        let inv = remote.get_inventory(Duration::from_secs(5)).await.unwrap();
        assert_eq!(inv.node_id, "n1");
        let err = remote.get_capacity(ap::GetCapacityRequest { pool: "nope".into() }, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(&err, Error::NotFound(m) if m.starts_with("agent of node n1: ") && m.contains("nope")), "{err}");
    }

    #[tokio::test]
    async fn a_slow_agent_is_deadline_exceeded_not_unreachable() {
        // A peer that accepts the connection and never answers: a node busy past the caller's
        // deadline. That is DEADLINE_EXCEEDED (retry: the call may still finish there), never
        // "unreachable", which would send an operator looking for a network fault.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                let (c, _) = listener.accept().await.unwrap();
                conns.push(c);
            }
        });
        let remote = RemoteAgent::new("n1", &addr, "n1", None);
        let err = remote.get_inventory(Duration::from_secs(1)).await.unwrap_err();
        assert!(
            matches!(&err, Error::DeadlineExceeded(m) if m.contains("agent of node n1") && m.contains("did not answer within 1s")),
            "{err}"
        );
        held.abort();
    }

    #[tokio::test]
    async fn an_unreachable_agent_is_unavailable_at_once_for_every_caller() {
        // TEST-NET-1: nothing answers there (a connection hangs, or fails at once where there
        // is no route); each caller may wait at most its 2 s budget, and the attempt is shared.
        let addr = "192.0.2.1:9".to_owned();
        let remote = Arc::new(RemoteAgent::new("n9", &addr, "n9", None));
        let started = std::time::Instant::now();
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let r = remote.clone();
                tokio::spawn(async move { r.get_inventory(Duration::from_secs(2)).await })
            })
            .collect();
        for c in calls {
            let err = c.await.unwrap().unwrap_err();
            assert!(
                matches!(&err, Error::Unavailable(m) if m.contains("agent of node n9") && m.contains(&addr) && m.contains("unreachable")),
                "{err}"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(4), "callers queued behind each other: {:?}", started.elapsed());
    }
}
