//! `holdfast controller`: the CSI Controller service of a cluster, over the [`registry`] of
//! agents. It validates what it must to place, places new volumes (`crate::placement`) and
//! routes every other call by the node its id names to that node's agent, which runs the one
//! implementation of the pool operations (validation, idempotency, locks, copies) and answers
//! with the spec's codes, passed on unchanged.
//!
//! Idempotency with an index that may lag: a CreateVolume whose name the index holds goes to
//! the agent and pool holding it (its own retry check answers); a name missing from the index
//! is looked up on every candidate agent before anything is placed; a down agent among the
//! candidates makes the create UNAVAILABLE (it may hold the first attempt); a name found on a
//! node outside the request's requisite topology answers ALREADY_EXISTS. During the start-up
//! grace creates answer UNAVAILABLE (agents re-register after a controller restart).
//!
//! Objects on a node that is down answer UNAVAILABLE; ListVolumes and ControllerGetVolume list
//! them from the index with an abnormal condition "node N unreachable since T"; on a retired
//! node "node N retired", and deleting them succeeds (with a warning in the log).

pub mod admin;
// issue 12: group snapshots
pub mod claims;
pub mod group;
pub mod registry;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tonic::{Request, Response, Status};

use crate::agent::AgentOps;
use crate::agent_proto as ap;
use crate::csi::controller::{DEFAULT_CAPACITY, capacity_for, list_key, minimum_size, paginate};
use crate::csi::{Capability, decode_caps, require, traced};
use crate::error::{Error, Result, bounded};
use crate::jobs;
use crate::placement::{self, NodeState, PlacementRequest, PoolCandidate, Segments};
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self, rpc};
use crate::proto::volume_content_source;
use crate::proto::*;
use crate::volume_id::VolumeId;
use registry::{NodeView, Registry};

/// The longest a look-up (GetVolume by name, GetCapacity) on one agent may take before the
/// create or capacity call goes on without it.
pub const LOOKUP_BUDGET: Duration = Duration::from_secs(10);

/// Parameters only the controller reads (placement); not passed to the agent.
const PLACEMENT_ONLY: [&str; 2] = [placement::PARAM_POOL_SELECTOR, placement::PARAM_POLICY];
/// Keys the external-provisioner adds (`--extra-create-metadata`, secrets references).
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";
/// The request parameters naming a filesystem.
const PARAM_FS: [&str; 2] = ["csi.storage.k8s.io/fstype", "fsType"];

/// The CSI Controller service over a [`Registry`].
pub struct ClusterController {
    reg: Arc<Registry>,
    /// CSI names of creates in progress here: a second create of the same name waits its turn
    /// (ABORTED), so one controller never places one name twice.
    creating: Mutex<HashSet<String>>,
    /// all-in-one: the only node is this process, so an id naming another node names nothing
    /// here (as on a single-node driver) instead of an agent not registered yet.
    standalone: bool,
    /// Creates placed and not answered yet, by (node, pool): (bytes, volumes). Placement counts
    /// them against their pool, so creates at once spread as the policy says instead of all
    /// landing where the last numbers pointed.
    pending: Mutex<HashMap<(String, String), (u64, u64)>>,
    /// One placement at a time (choose, then count): microseconds each.
    placing: Mutex<()>,
    // issue 11: cluster
    /// Claims on names (two active replicas) and creates whose outcome is unknown.
    claims: claims::Claims,
}

/// Takes a create's room back from [`ClusterController::pending`] when it is answered.
struct Reserved<'a> {
    c: &'a ClusterController,
    key: (String, String),
    bytes: u64,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut p = self.c.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = p.get_mut(&self.key) {
            e.0 = e.0.saturating_sub(self.bytes);
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                p.remove(&self.key);
            }
        }
    }
}

/// Releases a name in [`ClusterController::creating`].
struct Creating<'a>(&'a ClusterController, String);

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.0.creating.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

/// Where a call for an id goes.
enum Route {
    /// The agent of an up node.
    Up(String, Arc<dyn AgentOps>),
    /// A node that is down or retired.
    Trouble(NodeView),
    /// No agent serves it: a node that never registered, or an nfs pool nobody serves
    /// (node, pool).
    Unknown(String, String),
}

impl ClusterController {
    /// The controller of a cluster.
    pub fn new(reg: Arc<Registry>) -> ClusterController {
        ClusterController {
            reg,
            creating: Mutex::new(HashSet::new()),
            standalone: false,
            pending: Mutex::new(HashMap::new()),
            placing: Mutex::new(()),
            claims: claims::Claims::new(),
        }
    }

    /// all-in-one's controller: one in-process agent; ids of other nodes name nothing here.
    pub fn standalone(reg: Arc<Registry>) -> ClusterController {
        ClusterController { standalone: true, ..ClusterController::new(reg) }
    }

    /// all-in-one's controller over `driver`'s pools: a registry holding one in-process
    /// [`crate::agent::local::LocalAgent`] (no start-up grace, no remote agent).
    pub async fn over_driver(driver: Arc<crate::driver::Driver>) -> Result<ClusterController> {
        ClusterController::over_agent(crate::agent::local::LocalAgent::new(driver)).await
    }

    // issue 14: metrics
    /// [`ClusterController::over_driver`] over an agent the caller keeps (its pools' metrics).
    pub async fn over_agent(agent: Arc<crate::agent::local::LocalAgent>) -> Result<ClusterController> {
        let connector: registry::Connector = Arc::new(|node: &str, _: &str| -> Arc<dyn AgentOps> {
            // No Registry service is served in all-in-one, so nothing registers: an agent that
            // somehow did could serve nothing.
            Arc::new(registry::Absent(node.to_owned()))
        });
        let reg = Registry::new(registry::RegistryOptions { grace: Duration::ZERO, ..registry::RegistryOptions::new(connector) });
        reg.add_local(agent).await?;
        Ok(ClusterController::standalone(reg))
    }

    /// The registry it places and routes with.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.reg
    }

    fn route(&self, id: &VolumeId) -> Route {
        let view = match &id.node {
            Some(n) => self.reg.node(n),
            None => self.reg.in_process_for_pool(&id.pool),
        };
        match view {
            Some(v) if v.state == NodeState::Up => match v.agent.clone() {
                Some(a) => Route::Up(v.node_id, a),
                None => Route::Unknown(v.node_id, id.pool.clone()),
            },
            Some(v) => Route::Trouble(v),
            None => Route::Unknown(id.node.clone().unwrap_or_else(|| format!("(no node serves pool {})", id.pool)), id.pool.clone()),
        }
    }

    /// The error for an id whose node has no agent: UNAVAILABLE while agents may still be
    /// registering or in a cluster (it may come); in all-in-one `absent`, unless the id names a
    /// pool of this node on another node (UNAVAILABLE, as a single-node driver always said).
    fn unknown(&self, node: &str, pool: &str, absent: Error) -> Error {
        if self.standalone {
            // Another node's id naming a pool this node has too (all-in-one on every node): that
            // node's own driver serves it; answering "gone" here would lose it.
            let here = self.reg.nodes_view().into_iter().find(|n| n.in_process && n.node_id != node);
            if let Some(here) = here.filter(|h| h.pools.iter().any(|p| p.name == pool)) {
                return Error::Unavailable(format!(
                    "the object lives on node {}, and this instance serves node {}; send the request to that node's driver",
                    bounded(node),
                    here.node_id
                ));
            }
            return absent;
        }
        let why = if self.reg.ready() { "has no registered agent" } else { "has not registered yet (the controller just started)" };
        Error::Unavailable(format!(
            "node {} {why}; retry when its agent runs, or list it in the retired-nodes file if it is gone for good",
            bounded(node)
        ))
    }

    /// The registry's pools with the creates in flight counted in.
    fn candidates(&self) -> Vec<PoolCandidate> {
        let mut all = self.reg.candidates();
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for c in all.iter_mut() {
            if let Some((bytes, n)) = p.get(&(c.node.clone(), c.pool.clone())) {
                c.largest_volume = c.largest_volume.saturating_sub(*bytes);
                c.free = c.free.saturating_sub(*bytes);
                c.used += bytes;
                c.volumes += n;
            }
        }
        drop(p);
        self.claims.count_settling(&self.reg, &mut all);
        all
    }

    fn reserve(&self, node: &str, pool: &str, bytes: u64) -> Reserved<'_> {
        let key = (node.to_owned(), pool.to_owned());
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(key.clone()).or_default();
        e.0 += bytes;
        e.1 += 1;
        Reserved { c: self, key, bytes }
    }

    fn start_create(&self, name: &str) -> Result<Creating<'_>> {
        let mut c = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if !c.insert(name.to_owned()) {
            return Err(Error::Aborted(format!("a create of volume {} is in progress; retry when it has finished", bounded(name))));
        }
        Ok(Creating(self, name.to_owned()))
    }

    /// CreateVolume: validate, find the name, place, route.
    async fn create(&self, req: CreateVolumeRequest, budget: Duration) -> Result<CreateVolumeResponse> {
        // The budget runs from the call's start: the look-ups and the placement spend it too,
        // so the agent is given what is left (a copy still running then answers ABORTED in
        // time, before the client's own deadline cuts the call off).
        let deadline = std::time::Instant::now() + budget;
        require("name", &req.name)?;
        let caps = decode_caps(&req.volume_capabilities)?;
        let block = caps[0].block;
        if caps.iter().any(|c| c.block != block) {
            return Err(Error::InvalidArgument("volume_capabilities mix block and mount access types".into()));
        }
        let capacity = capacity_for(req.capacity_range.as_ref(), DEFAULT_CAPACITY)?;
        let params: BTreeMap<String, String> = req.parameters.clone().into_iter().collect();
        let (requisite, preferred) = topologies(req.accessibility_requirements.as_ref());
        let preq = PlacementRequest::from_parameters(&params, capacity, requisite, preferred)?;
        let fs = requested_fs(&req.parameters, &caps)?;
        if !self.reg.ready() {
            return Err(Error::Unavailable(format!(
                "the controller started moments ago and waits for the agents to register before creating volume {}; retry",
                bounded(&req.name)
            )));
        }
        let _creating = self.start_create(&req.name)?;
        let forward = |pool: &str| ap::CreateVolumeRequest {
            pool: pool.to_owned(),
            request: Some(CreateVolumeRequest {
                parameters: req
                    .parameters
                    .iter()
                    .filter(|(k, _)| !PLACEMENT_ONLY.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                ..req.clone()
            }),
            controller: self.claims.id().to_owned(),
        };

        // Known to the index: the agent holding it answers (its own retry check).
        if let Some((node, v)) = self.reg.volumes_named(&req.name).into_iter().next() {
            self.claims.settled(&req.name);
            return self.create_found(&req, &preq, &node, &v.pool, forward(&v.pool), jobs::left(deadline)).await;
        }

        // A clone or restore is made inside the pool of its source.
        if let Some(source) = req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            let (field, id, snapshot) = match source {
                volume_content_source::Type::Snapshot(s) => ("volume_content_source.snapshot.snapshot_id", s.snapshot_id.as_str(), true),
                volume_content_source::Type::Volume(v) => ("volume_content_source.volume.volume_id", v.volume_id.as_str(), false),
            };
            require(field, id)?;
            let what = if snapshot { "snapshot" } else { "volume" };
            let missing = || Error::NotFound(format!("source {what} {} does not exist", bounded(id)));
            let sid =
                VolumeId::parse(id).filter(|i| if snapshot { i.may_name_snapshot() } else { i.may_name_volume() }).ok_or_else(missing)?;
            return match self.route(&sid) {
                Route::Up(node, agent) => {
                    self.created(&node, agent.create_volume(forward(&sid.pool), jobs::left(deadline)).await?, &req.name)
                }
                Route::Trouble(n) if n.state == NodeState::Down => Err(registry::unreachable(&n)),
                Route::Trouble(n) => Err(Error::NotFound(format!("source {what} {} is on retired node {}", bounded(id), n.node_id))),
                Route::Unknown(node, pool) => Err(self.unknown(&node, &pool, missing())),
            };
        }

        // Candidates: the pools the parameters, the capabilities and the topology allow.
        let all = self.candidates();
        let by_params: Vec<PoolCandidate> = all.iter().filter(|p| matches_parameters(p, &preq)).cloned().collect();
        let pools_of = |node: &str| -> Vec<ap::Pool> { self.reg.node(node).map(|n| n.pools).unwrap_or_default() };
        let mut described: HashMap<String, Vec<ap::Pool>> = HashMap::new();
        for p in &by_params {
            described.entry(p.node.clone()).or_insert_with(|| pools_of(&p.node));
        }
        let pool_of = |c: &PoolCandidate| described.get(&c.node).and_then(|ps| ps.iter().find(|p| p.name == c.pool)).cloned();
        let fitting: Vec<PoolCandidate> =
            by_params.iter().filter(|c| pool_of(c).is_some_and(|p| serves(&p, &caps, block, fs.as_deref()))).cloned().collect();
        if !by_params.is_empty() && fitting.is_empty() {
            let mode = caps.iter().find(|c| !by_params.iter().filter_map(&pool_of).any(|p| mode_ok(&p, c)));
            return Err(match (mode, &fs) {
                (Some(c), _) => Error::InvalidArgument(format!(
                    "access mode {} is not supported by the selected pools{}",
                    c.mode.as_str_name(),
                    if c.block { " for raw block volumes" } else { " (multi-node modes need a shared pool such as nfs)" }
                )),
                (None, Some(f)) if !block => Error::InvalidArgument(format!("fstype {f:?} is not served by the selected pools")),
                _ => Error::InvalidArgument("no selected pool makes raw block volumes".into()),
            });
        }
        // The pools of other kinds stay in, refused by placement with their reasons.
        let considered: Vec<PoolCandidate> = all
            .iter()
            .filter(|p| !matches_parameters(p, &preq) || fitting.iter().any(|f| f.node == p.node && f.pool == p.pool))
            .cloned()
            .collect();
        let mut placed = placement::place(&considered, &preq);
        let down = placed.down_nodes().iter().map(|s| s.to_string()).collect::<Vec<_>>();
        if !down.is_empty() {
            return Err(Error::Unavailable(format!(
                "node {} may hold volume {} and is unreachable; retry when it is back",
                down.join(", "),
                bounded(&req.name)
            )));
        }
        // A node whose index is not authoritative (its inventory or a change is missing) is
        // asked whether it holds the name; the others are answered by the index. Capacities
        // are what the agents reported (heartbeats, changes): nothing is asked per create.
        let mut nodes: Vec<String> = fitting
            .iter()
            .filter(|c| c.node_state == NodeState::Up && placement::reachable(&c.segments, c.shared, &preq.requisite))
            .map(|c| c.node.clone())
            .collect();
        nodes.sort();
        nodes.dedup();
        // An earlier attempt here whose outcome is unknown (its answer was lost): the node it
        // went to may hold the volume or still make it; its agent answers the retry (claimed
        // for that node first, as any create on several candidates).
        if let Some((node, pool)) = self.claims.unsettled(&req.name) {
            if let claims::Claimed::Elsewhere(other, _) = self.claims.claim(&self.reg, &nodes, &req.name, &node, &pool).await? {
                return Err(Error::Aborted(format!(
                    "another controller is placing volume {} on node {other} while an earlier attempt here went to node {node}; retry",
                    bounded(&req.name)
                )));
            }
            let res = self.create_found(&req, &preq, &node, &pool, forward(&pool), jobs::left(deadline)).await;
            self.claims.outcome(&req.name, &node, &pool, &res);
            return res;
        }
        let asked: Vec<(String, Vec<String>)> = nodes
            .iter()
            .filter(|n| !self.reg.index_complete(n))
            .map(|n| (n.clone(), fitting.iter().filter(|c| c.node == *n).map(|c| c.pool.clone()).collect()))
            .collect();
        if !asked.is_empty() {
            if let Some((node, pool)) = self.look_up(&asked, &req.name).await? {
                return self.create_found(&req, &preq, &node, &pool, forward(&pool), jobs::left(deadline)).await;
            }
        }
        // Only pools the registry holds unhealthy could take it: their agents said so at their
        // last report, seconds ago, and an outage (an NFS server restarting) may be over. They
        // are asked for their room now, once, before the create is refused for that.
        if let Err(Error::Unavailable(_)) = placed.choice(&preq) {
            self.refresh_sick(&fitting, deadline).await;
        }
        // Chosen and counted in one step, so a create placed at the same moment sees it.
        let (choice, _reserved) = {
            let _one = self.placing.lock().unwrap_or_else(|e| e.into_inner());
            let considered: Vec<PoolCandidate> = self
                .candidates()
                .into_iter()
                .filter(|p| !matches_parameters(p, &preq) || fitting.iter().any(|f| f.node == p.node && f.pool == p.pool))
                .collect();
            placed = placement::place(&considered, &preq);
            let choice = placed.choice(&preq)?.clone();
            let reserved = self.reserve(&choice.node, &choice.pool, capacity);
            (choice, reserved)
        };
        // Another active controller may place the same name at this moment: the name is
        // claimed on a few of the candidate nodes first (all or nothing); a claim held by the
        // other sends this create where the other places it.
        let (node, pool) = match self.claims.claim(&self.reg, &nodes, &req.name, &choice.node, &choice.pool).await? {
            claims::Claimed::Free => (choice.node.clone(), choice.pool.clone()),
            claims::Claimed::Elsewhere(node, pool) => {
                if !fitting.iter().any(|f| f.node == node && f.pool == pool) {
                    return Err(Error::Aborted(format!(
                        "another controller is placing volume {} on node {node} (pool {pool}), outside this request's candidates; retry",
                        bounded(&req.name)
                    )));
                }
                (node, pool)
            }
        };
        let agent = self.agent_of(&node)?;
        let reports = self.reg.room_reports(&node);
        self.claims.dispatched(&req.name, &node, &pool);
        let res = agent.create_volume(forward(&pool), jobs::left(deadline)).await;
        self.claims.outcome(&req.name, &node, &pool, &res);
        if res.is_ok() {
            self.claims.settle(&self.reg, &node, &pool, capacity, reports);
        } else if self.claims.definitive(&res) {
            self.claims.release(&self.reg, &nodes, &req.name).await;
        }
        self.created(&node, res?, &req.name)
    }

    /// A create of a name that exists on `node` in `pool`: outside the requisite topology it
    /// is another volume (ALREADY_EXISTS); otherwise its agent answers the retry.
    async fn create_found(
        &self,
        req: &CreateVolumeRequest,
        preq: &PlacementRequest,
        node: &str,
        pool: &str,
        forward: ap::CreateVolumeRequest,
        budget: Duration,
    ) -> Result<CreateVolumeResponse> {
        let Some(n) = self.reg.node(node) else {
            return Err(Error::Unavailable(format!("node {node} holding volume {} left the registry; retry", bounded(&req.name))));
        };
        match n.state {
            NodeState::Up => {}
            NodeState::Down => return Err(registry::unreachable(&n)),
            NodeState::Retired => {
                return Err(Error::AlreadyExists(format!(
                    "volume {} exists on retired node {node}; delete it (that succeeds) before creating it again",
                    bounded(&req.name)
                )));
            }
        }
        let inside = n
            .pools
            .iter()
            .find(|p| p.name == pool)
            .map(|p| registry::candidate(&n, p))
            .is_none_or(|c| placement::reachable(&c.segments, c.shared, &preq.requisite));
        if !inside {
            return Err(Error::AlreadyExists(format!(
                "volume {} already exists on node {node} (pool {pool}), outside the requested topology",
                bounded(&req.name)
            )));
        }
        let agent = n.agent.clone().ok_or_else(|| Error::Internal(format!("node {node} has no agent")))?;
        let resp = agent.create_volume(forward, budget).await?;
        self.created(node, resp, &req.name)
    }

    /// Notes a created volume in the index at once and answers it.
    fn created(&self, node: &str, resp: CreateVolumeResponse, name: &str) -> Result<CreateVolumeResponse> {
        if let Some(v) = &resp.volume {
            if let Some(id) = VolumeId::parse(&v.volume_id) {
                self.reg.note_volume(
                    node,
                    ap::Volume {
                        pool: id.pool.clone(),
                        local_name: id.local.clone(),
                        csi_name: name.to_owned(),
                        volume: Some(v.clone()),
                        ..Default::default()
                    },
                );
            }
        }
        Ok(resp)
    }

    fn agent_of(&self, node: &str) -> Result<Arc<dyn AgentOps>> {
        self.reg.node(node).and_then(|n| n.agent).ok_or_else(|| Error::Unavailable(format!("node {node} left the registry; retry")))
    }

    /// Asks each node whether it holds `name`; a node must hear from every pool of its that is
    /// a candidate (`(node, candidate pools)`), other pools of it may be sick. The first that
    /// holds it: (node, pool). A node that cannot answer makes the create UNAVAILABLE: it may
    /// hold the first attempt.
    async fn look_up(&self, nodes: &[(String, Vec<String>)], name: &str) -> Result<Option<(String, String)>> {
        let mut set = JoinSet::new();
        for (node, pools) in nodes {
            let agent = self.agent_of(node)?;
            let (node, name, pools) = (node.clone(), name.to_owned(), pools.clone());
            set.spawn(async move {
                let get = ap::GetVolumeRequest { key: Some(ap::get_volume_request::Key::CsiName(name)), pools };
                (node, agent.get_volume(get, LOOKUP_BUDGET).await)
            });
        }
        let mut found = None;
        let mut failed = Vec::new();
        while let Some(joined) = set.join_next().await {
            let Ok((node, got)) = joined else { continue };
            match got {
                Ok(ap::GetVolumeResponse { volume: Some(v) }) => found = Some((node, v.pool)),
                Ok(_) => {}
                Err(e) => failed.push(format!("node {node}: {e}")),
            }
        }
        if found.is_none() && !failed.is_empty() {
            return Err(Error::Unavailable(format!(
                "cannot ask every node that may hold volume {} whether it does ({}); retry",
                bounded(name),
                failed.join("; ")
            )));
        }
        Ok(found)
    }

    async fn delete(&self, req: DeleteVolumeRequest, budget: Duration) -> Result<DeleteVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        // An id this driver never issued names nothing: deleting nothing succeeds (spec).
        let Some(id) = VolumeId::parse(&req.volume_id).filter(VolumeId::may_name_volume) else { return Ok(DeleteVolumeResponse {}) };
        match self.route(&id) {
            Route::Up(node, agent) => {
                let resp = agent.delete_volume(req, budget).await?;
                self.reg.forget_volume(&node, &id.pool, &id.local);
                Ok(resp)
            }
            Route::Trouble(n) if n.state == NodeState::Retired => {
                tracing::warn!(volume = %bounded(&req.volume_id), node = %n.node_id, "deleting a volume of a retired node: only forgotten, its storage is not touched");
                self.reg.forget_volume(&n.node_id, &id.pool, &id.local);
                Ok(DeleteVolumeResponse {})
            }
            Route::Trouble(n) => Err(registry::unreachable(&n)),
            Route::Unknown(node, pool) => Err(self.unknown(&node, &pool, Error::NotFound(String::new()))).or_else(|e| match e {
                Error::NotFound(_) => Ok(DeleteVolumeResponse {}),
                e => Err(e),
            }),
        }
    }

    async fn expand(&self, req: ControllerExpandVolumeRequest, budget: Duration) -> Result<ControllerExpandVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        if req.capacity_range.is_none() {
            return Err(Error::InvalidArgument("capacity_range is required".into()));
        }
        let missing = || Error::NotFound(format!("volume {} does not exist", bounded(&req.volume_id)));
        let id = VolumeId::parse(&req.volume_id).filter(VolumeId::may_name_volume).ok_or_else(missing)?;
        match self.route(&id) {
            Route::Up(_, agent) => agent.expand_volume(req, budget).await,
            Route::Trouble(n) => Err(registry::unreachable(&n)),
            Route::Unknown(node, pool) => Err(self.unknown(&node, &pool, missing())),
        }
    }

    async fn snapshot(&self, req: CreateSnapshotRequest, budget: Duration) -> Result<CreateSnapshotResponse> {
        require("name", &req.name)?;
        require("source_volume_id", &req.source_volume_id)?;
        let missing = || Error::NotFound(format!("source volume {} does not exist", bounded(&req.source_volume_id)));
        let id = VolumeId::parse(&req.source_volume_id).filter(VolumeId::may_name_volume).ok_or_else(missing)?;
        // A snapshot of that name on another node was taken of another volume.
        let source_node = id.node.clone().or_else(|| self.reg.in_process_for_pool(&id.pool).map(|n| n.node_id));
        if let Some((node, s)) = self.reg.snapshots_named(&req.name).into_iter().find(|(n, _)| Some(n) != source_node.as_ref()) {
            let of = s.snapshot.map(|s| s.source_volume_id).unwrap_or_default();
            return Err(Error::AlreadyExists(format!(
                "snapshot {} already exists on node {node} with source {}, not {}",
                bounded(&req.name),
                bounded(&of),
                bounded(&req.source_volume_id)
            )));
        }
        match self.route(&id) {
            Route::Up(node, agent) => {
                let name = req.name.clone();
                let resp = agent.create_snapshot(req, budget).await?;
                if let Some(s) = resp.snapshot.as_ref() {
                    if let Some(sid) = VolumeId::parse(&s.snapshot_id) {
                        self.reg.note_snapshot(
                            &node,
                            ap::Snapshot {
                                pool: sid.pool,
                                local_name: sid.local,
                                csi_name: name,
                                snapshot: Some(s.clone()),
                                ..Default::default()
                            },
                        );
                    }
                }
                Ok(resp)
            }
            Route::Trouble(n) if n.state == NodeState::Down => Err(registry::unreachable(&n)),
            Route::Trouble(n) => {
                Err(Error::NotFound(format!("source volume {} is on retired node {}", bounded(&req.source_volume_id), n.node_id)))
            }
            Route::Unknown(node, pool) => Err(self.unknown(&node, &pool, missing())),
        }
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest, budget: Duration) -> Result<DeleteSnapshotResponse> {
        require("snapshot_id", &req.snapshot_id)?;
        let Some(id) = VolumeId::parse(&req.snapshot_id).filter(VolumeId::may_name_snapshot) else { return Ok(DeleteSnapshotResponse {}) };
        match self.route(&id) {
            Route::Up(node, agent) => {
                let resp = agent.delete_snapshot(req, budget).await?;
                self.reg.forget_snapshot(&node, &id.pool, &id.local);
                Ok(resp)
            }
            Route::Trouble(n) if n.state == NodeState::Retired => {
                tracing::warn!(snapshot = %bounded(&req.snapshot_id), node = %n.node_id, "deleting a snapshot of a retired node: only forgotten, its storage is not touched");
                self.reg.forget_snapshot(&n.node_id, &id.pool, &id.local);
                Ok(DeleteSnapshotResponse {})
            }
            Route::Trouble(n) => Err(registry::unreachable(&n)),
            Route::Unknown(node, pool) => match self.unknown(&node, &pool, Error::NotFound(String::new())) {
                Error::NotFound(_) => Ok(DeleteSnapshotResponse {}),
                e => Err(e),
            },
        }
    }

    /// The volume an id names as the index has it (for a node that cannot be asked).
    fn indexed_volume(&self, node: &str, id: &str) -> Option<ap::Volume> {
        self.reg.volumes_of(node).into_iter().find(|v| v.volume.as_ref().is_some_and(|c| c.volume_id == id))
    }

    async fn get_volume(&self, req: ControllerGetVolumeRequest, budget: Duration) -> Result<ControllerGetVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let missing = || Error::NotFound(format!("volume {} does not exist", bounded(&req.volume_id)));
        let id = VolumeId::parse(&req.volume_id).filter(VolumeId::may_name_volume).ok_or_else(missing)?;
        let (volume, condition) = match self.route(&id) {
            Route::Up(node, agent) => {
                let get = ap::GetVolumeRequest { key: Some(ap::get_volume_request::Key::VolumeId(req.volume_id.clone())), pools: vec![] };
                let mut v = agent.get_volume(get, budget).await?.volume.ok_or_else(missing)?;
                let kinds = self.reg.node(&node).map(|n| pool_kinds(&n)).unwrap_or_default();
                let condition = condition_of(&node, &kinds, &mut v);
                (v.volume, condition)
            }
            Route::Trouble(n) => {
                let v = self.indexed_volume(&n.node_id, &req.volume_id).ok_or_else(missing)?;
                (v.volume, abnormal(&n))
            }
            Route::Unknown(node, pool) => return Err(self.unknown(&node, &pool, missing())),
        };
        Ok(ControllerGetVolumeResponse {
            volume,
            status: Some(controller_get_volume_response::VolumeStatus { published_node_ids: vec![], volume_condition: Some(condition) }),
        })
    }

    async fn validate(&self, req: ValidateVolumeCapabilitiesRequest, budget: Duration) -> Result<ValidateVolumeCapabilitiesResponse> {
        require("volume_id", &req.volume_id)?;
        let caps = decode_caps(&req.volume_capabilities)?;
        let missing = || Error::NotFound(format!("volume {} does not exist", bounded(&req.volume_id)));
        let id = VolumeId::parse(&req.volume_id).filter(VolumeId::may_name_volume).ok_or_else(missing)?;
        let (node, volume) = match self.route(&id) {
            Route::Up(node, agent) => {
                let get = ap::GetVolumeRequest { key: Some(ap::get_volume_request::Key::VolumeId(req.volume_id.clone())), pools: vec![] };
                (node, agent.get_volume(get, budget).await?.volume.ok_or_else(missing)?)
            }
            Route::Trouble(n) => (n.node_id.clone(), self.indexed_volume(&n.node_id, &req.volume_id).ok_or_else(missing)?),
            Route::Unknown(node, pool) => return Err(self.unknown(&node, &pool, missing())),
        };
        let pool = self.reg.node(&node).and_then(|n| n.pools.into_iter().find(|p| p.name == volume.pool)).unwrap_or_default();
        // A filesystem volume records its filesystem in its context; a raw block one does not.
        let is_block = !volume.volume.as_ref().is_some_and(|v| v.volume_context.contains_key(crate::csi::controller::CTX_FS_TYPE));
        if let Some(c) = caps.iter().find(|c| !mode_ok(&pool, c) || c.block != is_block) {
            let why = if c.block != is_block {
                format!("volume is a {} volume", if is_block { "block" } else { "filesystem" })
            } else {
                format!("access mode {} is not supported", c.mode.as_str_name())
            };
            return Ok(ValidateVolumeCapabilitiesResponse { confirmed: None, message: why });
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    async fn list(&self, req: ListVolumesRequest, budget: Duration) -> Result<ListVolumesResponse> {
        if req.max_entries < 0 {
            return Err(Error::InvalidArgument(format!("max_entries {} must not be negative", req.max_entries)));
        }
        // A token this driver did not issue is refused before any agent is asked.
        paginate(Vec::<(String, ())>::new(), req.max_entries, &req.starting_token)?;
        let mut set = JoinSet::new();
        let mut items: Vec<(String, (Volume, VolumeCondition))> = Vec::new();
        for n in self.reg.nodes_view().into_iter().filter(|n| n.registered) {
            match (n.state, n.agent.clone()) {
                (NodeState::Up, Some(agent)) => {
                    let (max, token) = (req.max_entries, req.starting_token.clone());
                    set.spawn(async move {
                        let got = volumes_from(agent.as_ref(), max, token, budget).await;
                        (n, got)
                    });
                }
                _ => {
                    let cond = abnormal(&n);
                    for v in self.reg.volumes_of(&n.node_id) {
                        if let Some(vol) = v.volume {
                            items.push((vol.volume_id.clone(), (vol, cond.clone())));
                        }
                    }
                }
            }
        }
        // The smallest key an agent's partial answer stopped before: nothing at or after it
        // belongs in this page (that agent's volumes there were not asked for yet).
        let mut limit: Option<String> = None;
        while let Some(joined) = set.join_next().await {
            let Ok((n, got)) = joined else { continue };
            match got {
                Ok((vols, next)) => {
                    let next = list_key(&next).to_owned();
                    if !next.is_empty() && limit.as_ref().is_none_or(|l| next < *l) {
                        limit = Some(next);
                    }
                    let kinds = pool_kinds(&n);
                    for mut v in vols {
                        let cond = condition_of(&n.node_id, &kinds, &mut v);
                        if let Some(vol) = v.volume {
                            items.push((vol.volume_id.clone(), (vol, cond)));
                        }
                    }
                }
                // An agent that does not answer fails no listing: its volumes as the index has them.
                Err(e) => {
                    let cond = VolumeCondition { abnormal: true, message: format!("node {} does not answer: {e}", n.node_id) };
                    for v in self.reg.volumes_of(&n.node_id) {
                        if let Some(vol) = v.volume {
                            items.push((vol.volume_id.clone(), (vol, cond.clone())));
                        }
                    }
                }
            }
        }
        if let Some(l) = &limit {
            items.retain(|(k, _)| list_key(k) < l.as_str());
        }
        let (page, mut next_token) = paginate(items, req.max_entries, &req.starting_token)?;
        if next_token.is_empty() {
            next_token = limit.unwrap_or_default();
        }
        let entries = page
            .into_iter()
            .map(|(volume, cond)| list_volumes_response::Entry {
                volume: Some(volume),
                status: Some(list_volumes_response::VolumeStatus { published_node_ids: vec![], volume_condition: Some(cond) }),
            })
            .collect();
        Ok(ListVolumesResponse { entries, next_token })
    }

    async fn list_snapshots(&self, req: ListSnapshotsRequest, budget: Duration) -> Result<ListSnapshotsResponse> {
        if req.max_entries < 0 {
            return Err(Error::InvalidArgument(format!("max_entries {} must not be negative", req.max_entries)));
        }
        // A filter by id asks only the node the id names.
        let named = [&req.snapshot_id, &req.source_volume_id].into_iter().find(|s| !s.is_empty());
        let only: Option<String> = match named.map(|s| VolumeId::parse(s)) {
            Some(None) => return Ok(ListSnapshotsResponse::default()),
            Some(Some(id)) => match self.route(&id) {
                Route::Up(n, _) => Some(n),
                Route::Trouble(n) => Some(n.node_id),
                Route::Unknown(node, pool) => {
                    return match self.unknown(&node, &pool, Error::NotFound(String::new())) {
                        Error::NotFound(_) => Ok(ListSnapshotsResponse::default()),
                        e => Err(e),
                    };
                }
            },
            None => None,
        };
        let mut set = JoinSet::new();
        let mut items: Vec<(String, Snapshot)> = Vec::new();
        for n in self.reg.nodes_view().into_iter().filter(|n| n.registered && only.as_ref().is_none_or(|o| *o == n.node_id)) {
            match (n.state, n.agent.clone()) {
                (NodeState::Up, Some(agent)) => {
                    set.spawn(async move {
                        let got = all_snapshots(agent.as_ref(), budget).await;
                        (n, got)
                    });
                }
                _ => items
                    .extend(self.reg.snapshots_of(&n.node_id).into_iter().filter_map(|s| s.snapshot).map(|s| (s.snapshot_id.clone(), s))),
            }
        }
        while let Some(joined) = set.join_next().await {
            let Ok((n, got)) = joined else { continue };
            match got {
                Ok(snaps) => items.extend(snaps.into_iter().filter_map(|s| s.snapshot).map(|s| (s.snapshot_id.clone(), s))),
                // A filter naming this node must be answered by it ("none" would be a lie).
                Err(e) if only.is_some() => return Err(e),
                Err(_) => items
                    .extend(self.reg.snapshots_of(&n.node_id).into_iter().filter_map(|s| s.snapshot).map(|s| (s.snapshot_id.clone(), s))),
            }
        }
        items.retain(|(_, s)| {
            (req.snapshot_id.is_empty() || s.snapshot_id == req.snapshot_id)
                && (req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id)
        });
        let (page, next_token) = paginate(items, req.max_entries, &req.starting_token)?;
        let entries = page.into_iter().map(|s| list_snapshots_response::Entry { snapshot: Some(s) }).collect();
        Ok(ListSnapshotsResponse { entries, next_token })
    }

    async fn get_snapshot(&self, req: GetSnapshotRequest, budget: Duration) -> Result<GetSnapshotResponse> {
        require("snapshot_id", &req.snapshot_id)?;
        let missing = || Error::NotFound(format!("snapshot {} does not exist", bounded(&req.snapshot_id)));
        let id = VolumeId::parse(&req.snapshot_id).filter(VolumeId::may_name_snapshot).ok_or_else(missing)?;
        match self.route(&id) {
            Route::Up(_, agent) => {
                let get = ap::GetSnapshotRequest { key: Some(ap::get_snapshot_request::Key::SnapshotId(req.snapshot_id.clone())) };
                let s = agent.get_snapshot(get, budget).await?.snapshot.ok_or_else(missing)?;
                Ok(GetSnapshotResponse { snapshot: s.snapshot })
            }
            Route::Trouble(n) => {
                let s = self
                    .reg
                    .snapshots_of(&n.node_id)
                    .into_iter()
                    .filter_map(|s| s.snapshot)
                    .find(|s| s.snapshot_id == req.snapshot_id)
                    .ok_or_else(missing)?;
                Ok(GetSnapshotResponse { snapshot: Some(s) })
            }
            Route::Unknown(node, pool) => Err(self.unknown(&node, &pool, missing())),
        }
    }

    /// Asks the agents of the unhealthy pools among `fitting` for their room (bounded by
    /// [`LOOKUP_BUDGET`] and the call's deadline); what they answer updates the registry, a
    /// pool that answers with room being healthy again.
    async fn refresh_sick(&self, fitting: &[PoolCandidate], deadline: std::time::Instant) {
        let mut nodes: Vec<&str> =
            fitting.iter().filter(|c| matches!(c.health, placement::Health::Unavailable(_))).map(|c| c.node.as_str()).collect();
        nodes.sort();
        nodes.dedup();
        let agents = nodes.into_iter().filter_map(|n| self.agent_of(n).ok().map(|a| (n.to_owned(), a))).collect();
        self.ask_room(agents, LOOKUP_BUDGET.min(jobs::left(deadline))).await;
    }

    /// Asks each of `agents` (node id, agent) for the room of all its pools at once, at most
    /// `budget`; the answers update the registry (an agent that does not answer in time keeps
    /// the numbers it reported last).
    async fn ask_room(&self, agents: Vec<(String, Arc<dyn AgentOps>)>, budget: Duration) {
        let mut set = JoinSet::new();
        for (node, agent) in agents {
            set.spawn(async move { (node, agent.get_capacity(ap::GetCapacityRequest { pool: String::new() }, budget).await) });
        }
        while let Some(joined) = set.join_next().await {
            if let Ok((node, Ok(c))) = joined {
                self.reg.update_capacities(&node, &c.pools);
            }
        }
    }

    /// GetCapacity: the largest volume one matching pool in the segment can take now, asked of
    /// the agents (the registry's numbers when one does not answer in time).
    async fn capacity(&self, req: GetCapacityRequest) -> Result<GetCapacityResponse> {
        let caps = if req.volume_capabilities.is_empty() { vec![] } else { decode_caps(&req.volume_capabilities)? };
        let params: BTreeMap<String, String> = req.parameters.clone().into_iter().collect();
        let preq = PlacementRequest::from_parameters(&params, 0, vec![], vec![])?;
        let fs = requested_fs(&req.parameters, &caps)?;
        let block = caps.iter().any(|c| c.block);
        let segment: Option<Segments> = req.accessible_topology.as_ref().map(|t| t.segments.clone().into_iter().collect());
        self.check_parameters(&req.parameters)?;
        let agents = self
            .reg
            .nodes_view()
            .into_iter()
            .filter(|n| n.registered && n.state == NodeState::Up)
            .filter_map(|n| n.agent.map(|a| (n.node_id, a)))
            .collect();
        self.ask_room(agents, LOOKUP_BUDGET).await;
        let mut pools: Vec<PoolCandidate> = Vec::new();
        let mut smallest: Option<u64> = None;
        for n in self.reg.nodes_view().into_iter().filter(|n| n.registered) {
            for p in &n.pools {
                let fs_here = (!block).then(|| fs.clone().unwrap_or_else(|| p.default_fs.clone()));
                if !serves(p, &caps, block, fs_here.as_deref()) {
                    continue;
                }
                let c = registry::candidate(&n, p);
                if placement::refusal(&c, &PlacementRequest { requisite: segment.clone().into_iter().collect(), ..preq.clone() }).is_none()
                {
                    let unit = p.capacity.as_ref().map(|c| c.minimum_volume_bytes).unwrap_or(0);
                    let min = minimum_size(fs_here.as_deref().filter(|f| !f.is_empty()), unit);
                    smallest = Some(smallest.map_or(min, |s| s.min(min)));
                }
                pools.push(c);
            }
        }
        let best = placement::capacity(&pools, &preq, segment.as_ref());
        Ok(GetCapacityResponse {
            available_capacity: best as i64,
            maximum_volume_size: Some(best as i64),
            minimum_volume_size: Some(smallest.unwrap_or(crate::pool::MIB) as i64),
        })
    }
}

/// The `nfs` pools of the controller's configuration as the agents receive them (a node
/// mounts only exports of these).
pub fn nfs_pool_definitions(cfg: &crate::config::Config) -> Vec<ap::NfsPool> {
    cfg.pools
        .iter()
        .filter(|p| p.kind() == crate::volume_id::PoolKind::Nfs)
        .map(|p| ap::NfsPool {
            name: p.name().to_owned(),
            server: p.server.clone().unwrap_or_default(),
            export: p.export.clone().unwrap_or_default(),
            mount_options: p.mount_options.clone().unwrap_or_default(),
            segments: p.pool_topology.clone().unwrap_or_default().into_iter().collect(),
        })
        .collect()
}

impl ClusterController {
    /// INVALID_ARGUMENT for a parameter neither the controller nor any registered pool knows (a
    /// typo in a StorageClass); with no pool registered yet, nothing can be told.
    fn check_parameters(&self, params: &HashMap<String, String>) -> Result<()> {
        let pools: Vec<ap::Pool> = self.reg.nodes_view().into_iter().flat_map(|n| n.pools).collect();
        if pools.is_empty() {
            return Ok(());
        }
        for key in params.keys() {
            let ours = [placement::PARAM_POOL, placement::PARAM_KIND].contains(&key.as_str())
                || PLACEMENT_ONLY.contains(&key.as_str())
                || PARAM_FS.contains(&key.as_str())
                || key.starts_with(PROVISIONER_PREFIX);
            if !ours && !pools.iter().any(|p| p.parameters.iter().any(|k| k == key)) {
                return Err(Error::InvalidArgument(format!("unknown parameter {}: check the StorageClass parameters", bounded(key))));
            }
        }
        Ok(())
    }
}

// issue 12: modify
impl ClusterController {
    /// ControllerModifyVolume: routed to the agent of the volume's node, which checks every key
    /// against the volume's pool and applies them (the volume's lock is the agent's).
    async fn modify(&self, req: ControllerModifyVolumeRequest, budget: Duration) -> Result<ControllerModifyVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        if req.mutable_parameters.is_empty() {
            return Err(Error::InvalidArgument("mutable_parameters is required: the parameters to change".into()));
        }
        let missing = || Error::NotFound(format!("volume {} does not exist", bounded(&req.volume_id)));
        let id = VolumeId::parse(&req.volume_id).filter(VolumeId::may_name_volume).ok_or_else(missing)?;
        match self.route(&id) {
            Route::Up(node, agent) => {
                let resp = agent.modify_volume(req.clone(), budget).await?;
                // The index shows the new values at once (the agent's change feed follows too).
                let get = ap::GetVolumeRequest { key: Some(ap::get_volume_request::Key::VolumeId(req.volume_id.clone())), pools: vec![] };
                if let Ok(ap::GetVolumeResponse { volume: Some(v) }) = agent.get_volume(get, budget).await {
                    self.reg.note_volume(&node, v);
                }
                Ok(resp)
            }
            Route::Trouble(n) => Err(registry::unreachable(&n)),
            Route::Unknown(node, pool) => Err(self.unknown(&node, &pool, missing())),
        }
    }
}

/// The requisite and preferred topologies of a request.
fn topologies(t: Option<&TopologyRequirement>) -> (Vec<Segments>, Vec<Segments>) {
    let conv = |ts: &[Topology]| ts.iter().map(|s| s.segments.clone().into_iter().collect()).collect();
    t.map(|t| (conv(&t.requisite), conv(&t.preferred))).unwrap_or_default()
}

/// The filesystem a request names (parameter or capability); INVALID_ARGUMENT when the two
/// contradict each other.
fn requested_fs(params: &HashMap<String, String>, caps: &[Capability]) -> Result<Option<String>> {
    let fs_param = PARAM_FS.iter().find_map(|k| params.get(*k)).cloned();
    let fs_cap = caps.iter().map(|c| c.fs_type.clone()).find(|f| !f.is_empty());
    if let (Some(a), Some(b)) = (&fs_param, &fs_cap) {
        if a != b {
            return Err(Error::InvalidArgument(format!("the fstype parameter {a:?} contradicts the mount capability's fs_type {b:?}")));
        }
    }
    Ok(fs_cap.or(fs_param))
}

/// Whether the request's `pool`, `kind` and `poolSelector` select this pool.
fn matches_parameters(c: &PoolCandidate, req: &PlacementRequest) -> bool {
    req.pool.as_ref().is_none_or(|p| *p == c.pool) && req.kind.as_ref().is_none_or(|k| *k == c.kind) && req.selector.matches(&c.labels)
}

/// Whether a pool serves an access mode: node-local modes everywhere, every mode on shared
/// pools for filesystem volumes.
fn mode_ok(p: &ap::Pool, c: &Capability) -> bool {
    c.mode_supported() || (p.multi_node && !c.block)
}

/// Whether a pool can make the volume the capabilities describe.
fn serves(p: &ap::Pool, caps: &[Capability], block: bool, fs: Option<&str>) -> bool {
    if !caps.iter().all(|c| mode_ok(p, c)) {
        return false;
    }
    if block {
        return p.block;
    }
    fs.is_none_or(|f| f.is_empty() || p.filesystems.is_empty() || p.filesystems.iter().any(|x| x == f))
}

fn healthy() -> VolumeCondition {
    VolumeCondition { abnormal: false, message: "volume is healthy".into() }
}

/// The kind of each pool of a node, by pool name.
fn pool_kinds(n: &NodeView) -> HashMap<String, String> {
    n.pools.iter().map(|p| (p.name.clone(), p.kind.clone())).collect()
}

/// issue 11: perf11. The condition of a volume an agent of `node` answered with: the agent's
/// own, unless the volume's record is of a newer schema than this controller's build reads for
/// its pool's kind (an agent upgraded before the controller). Such a volume stays in the index
/// and is served by its agent, which reads its own records, but is reported abnormal so the
/// operator upgrades the controller before relying on it. Takes the agent's condition out of `v`.
fn condition_of(node: &str, kinds: &HashMap<String, String>, v: &mut ap::Volume) -> VolumeCondition {
    let own = match v.condition.take() {
        Some(c) if c.abnormal => return c,
        own => own,
    };
    let newest = kinds.get(&v.pool).and_then(|k| k.parse::<crate::volume_id::PoolKind>().ok()).map(crate::pool::schema::record_schema);
    match newest {
        Some(newest) if v.record_schema > newest => VolumeCondition {
            abnormal: true,
            message: format!(
                "the record of this volume in pool {} on node {node} is of schema {}, newer than this controller reads ({newest}): \
                 upgrade the controller to the agent's release",
                bounded(&v.pool),
                v.record_schema
            ),
        },
        _ => own.unwrap_or_else(healthy),
    }
}

fn abnormal(n: &NodeView) -> VolumeCondition {
    VolumeCondition { abnormal: true, message: n.trouble().unwrap_or_else(|| format!("node {} does not answer", n.node_id)) }
}

/// Every volume of an agent, page by page.
async fn all_volumes(agent: &dyn AgentOps, budget: Duration) -> Result<Vec<ap::Volume>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = agent.list_volumes(ap::ListVolumesRequest { max_entries: 0, starting_token: token }, budget).await?;
        out.extend(page.volumes);
        if page.next_token.is_empty() {
            return Ok(out);
        }
        token = page.next_token;
    }
}

/// The volumes of an agent that a ListVolumes page of `max` entries (0: all) from `token` can
/// hold: the first `max` + 1 of the agent's (the one more tells whether a next page exists), as
/// the merged page of all agents takes at most `max` from each. So a page costs the page.
/// With the agent's next token: where its answer stopped (empty: it gave all from `token`).
async fn volumes_from(agent: &dyn AgentOps, max: i32, token: String, budget: Duration) -> Result<(Vec<ap::Volume>, String)> {
    if max <= 0 {
        return Ok((all_volumes(agent, budget).await?, String::new()));
    }
    let want = u32::try_from(max).unwrap_or(u32::MAX).saturating_add(1);
    let page = agent.list_volumes(ap::ListVolumesRequest { max_entries: want, starting_token: token }, budget).await?;
    Ok((page.volumes, page.next_token))
}

/// Every snapshot of an agent, page by page.
async fn all_snapshots(agent: &dyn AgentOps, budget: Duration) -> Result<Vec<ap::Snapshot>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = agent.list_snapshots(ap::ListSnapshotsRequest { max_entries: 0, starting_token: token }, budget).await?;
        out.extend(page.snapshots);
        if page.next_token.is_empty() {
            return Ok(out);
        }
        token = page.next_token;
    }
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Controller for ClusterController {
    async fn create_volume(&self, r: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let name = r.name.clone();
        traced("CreateVolume", &name, self.create(r, budget)).await
    }

    async fn delete_volume(&self, r: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("DeleteVolume", &id, self.delete(r, budget)).await
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
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("ValidateVolumeCapabilities", &id, self.validate(r, budget)).await
    }

    async fn list_volumes(&self, r: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        traced("ListVolumes", "", self.list(r.into_inner(), budget)).await
    }

    async fn get_capacity(&self, r: Request<GetCapacityRequest>) -> Result<Response<GetCapacityResponse>, Status> {
        traced("GetCapacity", "", self.capacity(r.into_inner())).await
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
            // issue 12: modify
            T::ModifyVolume,
        ];
        Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities: caps.into_iter().map(rpc_cap).collect() }))
    }

    async fn create_snapshot(&self, r: Request<CreateSnapshotRequest>) -> Result<Response<CreateSnapshotResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let name = r.name.clone();
        traced("CreateSnapshot", &name, self.snapshot(r, budget)).await
    }

    async fn delete_snapshot(&self, r: Request<DeleteSnapshotRequest>) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let id = r.snapshot_id.clone();
        traced("DeleteSnapshot", &id, self.delete_snapshot(r, budget)).await
    }

    async fn list_snapshots(&self, r: Request<ListSnapshotsRequest>) -> Result<Response<ListSnapshotsResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        traced("ListSnapshots", "", self.list_snapshots(r.into_inner(), budget)).await
    }

    async fn controller_expand_volume(
        &self,
        r: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("ControllerExpandVolume", &id, self.expand(r, budget)).await
    }

    async fn controller_get_volume(&self, r: Request<ControllerGetVolumeRequest>) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("ControllerGetVolume", &id, self.get_volume(r, budget)).await
    }

    async fn controller_modify_volume(
        &self,
        r: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("ControllerModifyVolume", &id, self.modify(r, budget)).await
    }

    async fn get_snapshot(&self, r: Request<GetSnapshotRequest>) -> Result<Response<GetSnapshotResponse>, Status> {
        let budget = jobs::call_budget(r.metadata());
        let r = r.into_inner();
        let id = r.snapshot_id.clone();
        traced("GetSnapshot", &id, self.get_snapshot(r, budget)).await
    }
}

#[cfg(test)]
mod tests;
