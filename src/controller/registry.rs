//! The controller's registry of agents: soft state rebuilt from registrations after a restart.
//! For each node id: where its agent serves the Agent API, its segments and pools (with
//! health and capacity), its release and wire version, when it started and when it was last
//! heard from, and the index of its volumes and snapshots by CSI name (the full inventory of
//! its registration, kept current by its changes). The `Registry` gRPC service the agents call
//! feeds it; in-process agents (all-in-one, the controller's own `nfs` pools) feed it from their
//! change stream and are never down.
//!
//! Refusals, each logged: a wire version that is not the same major and at most one minor
//! apart (FAILED_PRECONDITION naming both), a node id on the retired list
//! (FAILED_PRECONDITION), with per-node certificates a certificate not issued to the node id
//! (PERMISSION_DENIED), and a second live agent claiming a registered node id from another
//! address (ALREADY_EXISTS; the first keeps it until it is down).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::agent::AgentOps;
use crate::agent_proto as ap;
use crate::agent_proto::registry_server::{Registry as RegistryApi, RegistryServer};
use crate::error::{Error, Result, bounded};
use crate::placement::{Health, NODE_KEY, NodeState, PoolCandidate, Segments};
use crate::volume_id::valid_node_id;

/// The heartbeat interval agents are asked for, by default.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// How often the retired-nodes file is looked at again.
pub const RETIRED_POLL: Duration = Duration::from_secs(3);
/// How long an in-process agent may take to hand over its inventory.
const INVENTORY_BUDGET: Duration = Duration::from_secs(60);

/// Makes the handle the controller calls a registered agent through (a [`RemoteAgent`] in
/// `holdfast controller`, a fake in tests): node id, advertised address.
///
/// [`RemoteAgent`]: crate::agent::remote::RemoteAgent
pub type Connector = Arc<dyn Fn(&str, &str) -> Arc<dyn AgentOps> + Send + Sync>;

/// How the registry behaves.
pub struct RegistryOptions {
    /// The heartbeat interval agents are told to keep.
    pub heartbeat: Duration,
    /// An agent silent longer than this is down (default: three heartbeats and a margin).
    pub down_after: Duration,
    /// After the controller starts, how long creates wait (UNAVAILABLE) for agents to register
    /// (default: three heartbeats; all-in-one: none).
    pub grace: Duration,
    /// `--retired-nodes`: one node id per line, `#` comments; re-read when it changes.
    pub retired_file: Option<PathBuf>,
    /// `--tls-per-node`: every agent has its own certificate, whose name must be its node id.
    pub per_node_certs: bool,
    /// `--insecure`: plain text, so only agents advertising a loopback address may register.
    pub insecure: bool,
    /// The `nfs` pools nodes may mount, handed to every agent that registers.
    pub nfs_pools: Vec<ap::NfsPool>,
    /// How to reach an agent that registered.
    pub connector: Connector,
}

impl RegistryOptions {
    /// The defaults around `connector`: 5 s heartbeats, down after 17 s, 15 s of grace.
    pub fn new(connector: Connector) -> RegistryOptions {
        RegistryOptions {
            heartbeat: DEFAULT_HEARTBEAT,
            down_after: default_down_after(DEFAULT_HEARTBEAT),
            grace: DEFAULT_HEARTBEAT * 3,
            retired_file: None,
            per_node_certs: false,
            insecure: false,
            nfs_pools: Vec::new(),
            connector,
        }
    }
}

/// Three heartbeats and a margin for a slow network or a busy agent.
pub fn default_down_after(heartbeat: Duration) -> Duration {
    heartbeat * 3 + Duration::from_secs(2)
}

/// (pool, local name): a volume's or snapshot's key on its node.
type Key = (String, String);

/// CSI name → the keys of the objects under it, sorted. Almost always one key: a `Vec` of one
/// is a 48-byte allocation where a one-element `BTreeSet` was a 544-byte B-tree leaf, about a
/// third of the index's memory per volume (issue 11: the controller's RSS with 1,000 volumes).
type Names = HashMap<String, Vec<Key>>;

/// One registered agent.
struct Entry {
    address: String,
    segments: Segments,
    pools: Vec<ap::Pool>,
    release: String,
    version: Option<ap::WireVersion>,
    started_unix: i64,
    last_seen: Instant,
    last_seen_wall: SystemTime,
    /// The last change applied.
    sequence: u64,
    volumes: BTreeMap<Key, ap::Volume>,
    volume_names: Names,
    snapshots: BTreeMap<Key, ap::Snapshot>,
    snapshot_names: Names,
    agent: Arc<dyn AgentOps>,
    in_process: bool,
    /// Whether its going down was logged (one line per change, not one per tick).
    down_logged: bool,
    // issue 11: cluster
    /// Whether the index of its objects is authoritative: its full inventory arrived and every
    /// change since applied in sequence (false from a gap or a heartbeat ahead of it until it
    /// registers again).
    in_sync: bool,
    /// How many times its pools' room was reported (heartbeats, capacity changes).
    room_reports: u64,
}

impl Entry {
    fn from_inventory(inv: ap::Inventory, agent: Arc<dyn AgentOps>, in_process: bool, version: Option<ap::WireVersion>) -> Entry {
        let mut segments: Segments = inv.segments.into_iter().collect();
        segments.entry(NODE_KEY.to_owned()).or_insert_with(|| inv.node_id.clone());
        let mut e = Entry {
            address: inv.advertised_address,
            segments,
            pools: inv.pools,
            release: inv.agent_release,
            version,
            started_unix: inv.agent_started_unix,
            last_seen: Instant::now(),
            last_seen_wall: SystemTime::now(),
            sequence: inv.sequence,
            volumes: BTreeMap::new(),
            volume_names: HashMap::new(),
            snapshots: BTreeMap::new(),
            snapshot_names: HashMap::new(),
            agent,
            in_process,
            down_logged: false,
            in_sync: true,
            room_reports: 0,
        };
        for v in inv.volumes {
            e.put_volume(v);
        }
        for s in inv.snapshots {
            e.put_snapshot(s);
        }
        e
    }

    fn put_volume(&mut self, v: ap::Volume) {
        let key = (v.pool.clone(), v.local_name.clone());
        if let Some(old) = self.volumes.get(&key) {
            if old.csi_name != v.csi_name {
                let name = old.csi_name.clone();
                unindex(&mut self.volume_names, &name, &key);
            }
        }
        index(&mut self.volume_names, &v.csi_name, &key);
        self.volumes.insert(key, v);
    }

    fn drop_volume(&mut self, key: &Key) {
        if let Some(old) = self.volumes.remove(key) {
            unindex(&mut self.volume_names, &old.csi_name, key);
        }
    }

    fn put_snapshot(&mut self, s: ap::Snapshot) {
        let key = (s.pool.clone(), s.local_name.clone());
        if let Some(old) = self.snapshots.get(&key) {
            if old.csi_name != s.csi_name {
                let name = old.csi_name.clone();
                unindex(&mut self.snapshot_names, &name, &key);
            }
        }
        index(&mut self.snapshot_names, &s.csi_name, &key);
        self.snapshots.insert(key, s);
    }

    fn drop_snapshot(&mut self, key: &Key) {
        if let Some(old) = self.snapshots.remove(key) {
            unindex(&mut self.snapshot_names, &old.csi_name, key);
        }
    }

    /// Applies one change; false when it does not follow the last one applied (a gap).
    fn apply(&mut self, c: ap::Change) -> bool {
        use ap::change::Change as C;
        if c.sequence <= self.sequence {
            // Sent again (a retried report): already applied.
            return true;
        }
        if c.sequence != self.sequence + 1 {
            return false;
        }
        self.sequence = c.sequence;
        match c.change {
            Some(C::VolumeCreated(v)) | Some(C::VolumeUpdated(v)) => self.put_volume(v),
            Some(C::VolumeDeleted(r)) => self.drop_volume(&(r.pool, r.local_name)),
            Some(C::SnapshotCreated(s)) => self.put_snapshot(s),
            Some(C::SnapshotDeleted(r)) => self.drop_snapshot(&(r.pool, r.local_name)),
            Some(C::PoolUpdated(p)) => {
                match self.pools.iter_mut().find(|q| q.name == p.name) {
                    Some(q) => *q = p,
                    None => self.pools.push(p),
                }
                self.room_reports += 1;
            }
            Some(C::PoolCapacity(c)) => self.set_room(&[c]),
            // A kind of change this build does not know (a newer agent): nothing to apply.
            None => {}
        }
        true
    }

    /// The room its pools reported (a heartbeat, a change, a live answer). A pool that just
    /// told its room is healthy again, even before its agent's health report says so.
    fn set_room(&mut self, caps: &[ap::PoolCapacity]) {
        if caps.is_empty() {
            return;
        }
        for c in caps {
            if let Some(p) = self.pools.iter_mut().find(|p| p.name == c.pool) {
                p.capacity = Some(c.clone());
                if c.minimum_volume_bytes > 0 && p.health == ap::PoolHealth::Unavailable as i32 {
                    p.health = ap::PoolHealth::Healthy as i32;
                    p.health_message.clear();
                }
            }
        }
        self.room_reports += 1;
    }

    fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_seen)
    }

    fn seen(&mut self) {
        self.last_seen = Instant::now();
        self.last_seen_wall = SystemTime::now();
    }
}

fn index(names: &mut Names, name: &str, key: &Key) {
    match names.get_mut(name) {
        Some(keys) => {
            if let Err(at) = keys.binary_search(key) {
                keys.insert(at, key.clone());
            }
        }
        None => {
            names.insert(name.to_owned(), vec![key.clone()]);
        }
    }
}

fn unindex(names: &mut Names, name: &str, key: &Key) {
    if let Some(keys) = names.get_mut(name) {
        keys.retain(|k| k != key);
        if keys.is_empty() {
            names.remove(name);
        }
    }
}

/// A node as the registry sees it now: for placement, GetCapacity and `holdfast ctl nodes`.
#[derive(Clone)]
pub struct NodeView {
    /// The node id.
    pub node_id: String,
    /// Up, down (silent past the timeout) or retired (listed in the retired-nodes file).
    pub state: NodeState,
    /// Whether it ever registered (a retired node may be listed without).
    pub registered: bool,
    /// Served inside the controller's own process (never down).
    pub in_process: bool,
    /// Where its agent serves the Agent API.
    pub address: String,
    /// Its topology segments.
    pub segments: Segments,
    /// Its pools, with health and capacity as last reported.
    pub pools: Vec<ap::Pool>,
    /// Volumes and snapshots in its inventory.
    pub volumes: usize,
    /// Snapshots in its inventory.
    pub snapshots: usize,
    /// The holdfast release of its agent.
    pub release: String,
    /// The wire version it registered with (none for in-process agents).
    pub version: Option<ap::WireVersion>,
    /// Its agent's process start (seconds since the epoch).
    pub started_unix: i64,
    /// When it was last heard from (seconds since the epoch).
    pub last_seen_unix: i64,
    /// How to call it (none for a retired node that never registered).
    pub agent: Option<Arc<dyn AgentOps>>,
}

impl NodeView {
    /// "node N unreachable since T" / "node N retired" for an object on a node that is not
    /// up, or None when it is.
    pub fn trouble(&self) -> Option<String> {
        match self.state {
            NodeState::Up => None,
            NodeState::Down => Some(format!("node {} unreachable since {}", self.node_id, utc(self.last_seen_unix))),
            NodeState::Retired => Some(format!("node {} retired", self.node_id)),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time.
pub fn utc(unix: i64) -> String {
    let s = crate::pool::nfs::store::utc_stamp(unix);
    // YYYYMMDDTHHMMSSZ → YYYY-MM-DDTHH:MM:SSZ
    format!("{}-{}-{}T{}:{}:{}Z", &s[0..4], &s[4..6], &s[6..8], &s[9..11], &s[11..13], &s[13..15])
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The retired-nodes list and where it comes from.
#[derive(Default)]
struct Retired {
    ids: BTreeSet<String>,
    /// The last contents read (to notice a change without comparing sets on every poll).
    text: Option<String>,
    /// The last read failure logged (logged once per change).
    error: Option<String>,
}

/// Parses the retired-nodes file: one node id per line; `#` starts a comment; blank lines and
/// surrounding spaces are ignored.
pub fn parse_retired(text: &str) -> BTreeSet<String> {
    text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// The registry. See the module documentation.
pub struct Registry {
    opts: RegistryOptions,
    started: Instant,
    nodes: Mutex<BTreeMap<String, Entry>>,
    retired: Mutex<Retired>,
}

impl Registry {
    /// A registry with no agent yet; reads the retired-nodes file and, inside a tokio
    /// runtime, starts watching it and the agents' silence.
    pub fn new(opts: RegistryOptions) -> Arc<Registry> {
        let r = Arc::new(Registry { opts, started: Instant::now(), nodes: Mutex::new(BTreeMap::new()), retired: Mutex::default() });
        r.reload_retired();
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(watch(Arc::downgrade(&r)));
        }
        r
    }

    /// The gRPC service agents register with.
    pub fn service(self: &Arc<Self>) -> RegistryServer<RegistryService> {
        RegistryServer::new(RegistryService(self.clone()))
    }

    /// The options it runs with.
    pub fn options(&self) -> &RegistryOptions {
        &self.opts
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn retired_ids(&self) -> BTreeSet<String> {
        self.retired.lock().unwrap_or_else(|p| p.into_inner()).ids.clone()
    }

    /// Whether `node` is on the retired list.
    pub fn is_retired(&self, node: &str) -> bool {
        self.retired.lock().unwrap_or_else(|p| p.into_inner()).ids.contains(node)
    }

    /// Whether creates may proceed: the start-up grace (agents re-registering after a
    /// controller restart) has passed.
    pub fn ready(&self) -> bool {
        self.started.elapsed() >= self.opts.grace
    }

    /// Reads the retired-nodes file again; an unreadable file keeps the previous list (logged
    /// once per distinct failure). Answers whether the list changed.
    pub fn reload_retired(&self) -> bool {
        let Some(path) = &self.opts.retired_file else { return false };
        let read = std::fs::read_to_string(path);
        let mut r = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        match read {
            Ok(text) => {
                r.error = None;
                if r.text.as_deref() == Some(text.as_str()) {
                    return false;
                }
                let ids = parse_retired(&text);
                for bad in ids.iter().filter(|id| !valid_node_id(id)) {
                    tracing::warn!(file = %path.display(), line = %bounded(bad), "the retired-nodes file names something that is not a node id");
                }
                let changed = ids != r.ids;
                if changed {
                    let added: Vec<&String> = ids.difference(&r.ids).collect();
                    let removed: Vec<&String> = r.ids.difference(&ids).collect();
                    tracing::info!(file = %path.display(), ?added, ?removed, retired = ids.len(), "retired-nodes list changed");
                }
                r.ids = ids;
                r.text = Some(text);
                changed
            }
            Err(e) => {
                let msg = e.to_string();
                if r.error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(file = %path.display(), error = %msg, kept = r.ids.len(), "cannot read the retired-nodes file; keeping the previous list");
                    r.error = Some(msg);
                }
                false
            }
        }
    }

    /// Logs agents that fell silent past the timeout (once each).
    fn note_silence(&self) {
        let now = Instant::now();
        for (id, e) in self.nodes().iter_mut() {
            let down = !e.in_process && e.silent_for(now) > self.opts.down_after;
            if down && !e.down_logged {
                tracing::warn!(node = %id, address = %e.address, since = %utc(unix(e.last_seen_wall)), "agent silent past the timeout: node is down; calls for its volumes answer UNAVAILABLE");
            }
            e.down_logged = down;
        }
    }

    fn view(&self, id: &str, e: &Entry, retired: &BTreeSet<String>, now: Instant) -> NodeView {
        let state = if retired.contains(id) {
            NodeState::Retired
        } else if !e.in_process && e.silent_for(now) > self.opts.down_after {
            NodeState::Down
        } else {
            NodeState::Up
        };
        NodeView {
            node_id: id.to_owned(),
            state,
            registered: true,
            in_process: e.in_process,
            address: e.address.clone(),
            segments: e.segments.clone(),
            pools: e.pools.clone(),
            volumes: e.volumes.len(),
            snapshots: e.snapshots.len(),
            release: e.release.clone(),
            version: e.version,
            started_unix: e.started_unix,
            last_seen_unix: unix(e.last_seen_wall),
            agent: Some(e.agent.clone()),
        }
    }

    /// Every node: registered ones, and retired ones that never registered (so `ctl nodes`
    /// shows the whole list), by node id.
    pub fn nodes_view(&self) -> Vec<NodeView> {
        let retired = self.retired_ids();
        let now = Instant::now();
        let nodes = self.nodes();
        let mut out: Vec<NodeView> = nodes.iter().map(|(id, e)| self.view(id, e, &retired, now)).collect();
        for id in retired.iter().filter(|id| !nodes.contains_key(*id)) {
            out.push(NodeView {
                node_id: id.clone(),
                state: NodeState::Retired,
                registered: false,
                in_process: false,
                address: String::new(),
                segments: Segments::new(),
                pools: Vec::new(),
                volumes: 0,
                snapshots: 0,
                release: String::new(),
                version: None,
                started_unix: 0,
                last_seen_unix: 0,
                agent: None,
            });
        }
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// One node (registered, or retired without having registered).
    pub fn node(&self, id: &str) -> Option<NodeView> {
        let retired = self.retired_ids();
        if let Some(e) = self.nodes().get(id) {
            return Some(self.view(id, e, &retired, Instant::now()));
        }
        retired.contains(id).then(|| self.nodes_view().into_iter().find(|n| n.node_id == id)).flatten()
    }

    /// The in-process agent serving `pool` (the controller's `nfs` pools; all-in-one's every
    /// pool): where ids without a node (`nfs:-:pool:…`) are routed.
    pub fn in_process_for_pool(&self, pool: &str) -> Option<NodeView> {
        let retired = self.retired_ids();
        let now = Instant::now();
        self.nodes()
            .iter()
            .find(|(_, e)| e.in_process && e.pools.iter().any(|p| p.name == pool))
            .map(|(id, e)| self.view(id, e, &retired, now))
    }

    /// Every pool of every registered node, as placement sees it.
    pub fn candidates(&self) -> Vec<PoolCandidate> {
        let mut out = Vec::new();
        for n in self.nodes_view().into_iter().filter(|n| n.registered) {
            for p in &n.pools {
                out.push(candidate(&n, p));
            }
        }
        out
    }

    /// The volumes the index holds under CSI name `name`: (node, volume).
    pub fn volumes_named(&self, name: &str) -> Vec<(String, ap::Volume)> {
        let nodes = self.nodes();
        let mut out = Vec::new();
        for (id, e) in nodes.iter() {
            for key in e.volume_names.get(name).into_iter().flatten() {
                if let Some(v) = e.volumes.get(key) {
                    out.push((id.clone(), v.clone()));
                }
            }
        }
        out
    }

    /// The snapshots the index holds under CSI name `name`: (node, snapshot).
    pub fn snapshots_named(&self, name: &str) -> Vec<(String, ap::Snapshot)> {
        let nodes = self.nodes();
        let mut out = Vec::new();
        for (id, e) in nodes.iter() {
            for key in e.snapshot_names.get(name).into_iter().flatten() {
                if let Some(s) = e.snapshots.get(key) {
                    out.push((id.clone(), s.clone()));
                }
            }
        }
        out
    }

    /// Every volume of `node` in the index.
    pub fn volumes_of(&self, node: &str) -> Vec<ap::Volume> {
        self.nodes().get(node).map(|e| e.volumes.values().cloned().collect()).unwrap_or_default()
    }

    /// Every snapshot of `node` in the index.
    pub fn snapshots_of(&self, node: &str) -> Vec<ap::Snapshot> {
        self.nodes().get(node).map(|e| e.snapshots.values().cloned().collect()).unwrap_or_default()
    }

    /// Records what a call made on `node` answered at once, before its change arrives, so the
    /// next create of the same name finds it in the index.
    pub fn note_volume(&self, node: &str, v: ap::Volume) {
        if let Some(e) = self.nodes().get_mut(node) {
            e.put_volume(v);
        }
    }

    /// As [`Registry::note_volume`], for a snapshot.
    pub fn note_snapshot(&self, node: &str, s: ap::Snapshot) {
        if let Some(e) = self.nodes().get_mut(node) {
            e.put_snapshot(s);
        }
    }

    /// Forgets a volume a delete removed on `node`.
    pub fn forget_volume(&self, node: &str, pool: &str, local: &str) {
        if let Some(e) = self.nodes().get_mut(node) {
            e.drop_volume(&(pool.to_owned(), local.to_owned()));
        }
    }

    /// Forgets a snapshot a delete removed on `node`.
    pub fn forget_snapshot(&self, node: &str, pool: &str, local: &str) {
        if let Some(e) = self.nodes().get_mut(node) {
            e.drop_snapshot(&(pool.to_owned(), local.to_owned()));
        }
    }

    /// A node's pools as its agent described them just now (health included).
    pub fn update_pools(&self, node: &str, pools: Vec<ap::Pool>) {
        if let Some(e) = self.nodes().get_mut(node) {
            e.pools = pools;
        }
    }

    /// Capacities a node answered just now (GetCapacity asked live).
    pub fn update_capacities(&self, node: &str, caps: &[ap::PoolCapacity]) {
        if let Some(e) = self.nodes().get_mut(node) {
            // It just told its room (a pool that cannot answers zeros): the outage that marked
            // it unavailable is over, so a create right after an NFS server came back is placed.
            e.set_room(caps);
        }
    }

    // issue 11: cluster
    /// Whether the index is authoritative for `node`: its full inventory arrived and its
    /// changes since were applied in sequence, so a name missing from the index is not there
    /// (no look-up needed).
    pub fn index_complete(&self, node: &str) -> bool {
        self.nodes().get(node).is_some_and(|e| e.in_sync)
    }

    /// How many times `node` reported its pools' room so far (see [`Registry::update_capacities`]).
    pub fn room_reports(&self, node: &str) -> u64 {
        self.nodes().get(node).map(|e| e.room_reports).unwrap_or(0)
    }

    /// Adds the in-process [`LocalAgent`] (all-in-one; the controller's `nfs` pools): see
    /// [`Registry::add_in_process`].
    ///
    /// [`LocalAgent`]: crate::agent::local::LocalAgent
    pub async fn add_local(self: &Arc<Self>, agent: Arc<crate::agent::local::LocalAgent>) -> Result<()> {
        let changes = agent.subscribe();
        self.add_in_process(agent, changes).await
    }

    /// Adds an agent of this very process (all-in-one; the controller's `nfs` pools): its
    /// inventory now, then its changes as they happen (a gap or a lag makes it read the whole
    /// inventory again). Never down. Subscribe before calling, so no change between the
    /// inventory and the stream is lost.
    pub async fn add_in_process(self: &Arc<Self>, agent: Arc<dyn AgentOps>, mut changes: broadcast::Receiver<ap::Change>) -> Result<()> {
        let node = agent.node_id().to_owned();
        let inv = agent.get_inventory(INVENTORY_BUDGET).await?;
        self.nodes().insert(node.clone(), Entry::from_inventory(inv, agent.clone(), true, None));
        tracing::info!(node = %node, "in-process agent added");
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let resync = match changes.recv().await {
                    Ok(c) => {
                        let Some(reg) = weak.upgrade() else { return };
                        let mut nodes = reg.nodes();
                        nodes.get_mut(&node).is_some_and(|e| !e.apply(c))
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(node = %node, missed = n, "missed changes of the in-process agent; reading its inventory again");
                        true
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if resync {
                    let Some(reg) = weak.upgrade() else { return };
                    match agent.get_inventory(INVENTORY_BUDGET).await {
                        Ok(inv) => {
                            reg.nodes().insert(node.clone(), Entry::from_inventory(inv, agent.clone(), true, None));
                        }
                        Err(e) => tracing::error!(node = %node, error = %e, "cannot read the in-process agent's inventory"),
                    }
                }
            }
        });
        Ok(())
    }

    /// Refuses a wire version that is not the same major as this build's, or more than one
    /// minor apart.
    pub fn check_version(theirs: Option<&ap::WireVersion>, node: &str) -> Result<ap::WireVersion, Status> {
        version_check(ap::wire_version(), theirs, node)
    }

    /// With per-node certificates, the certificate must be issued to the node id.
    fn check_identity<T>(&self, req: &Request<T>, node: &str) -> Result<(), Status> {
        if !self.opts.per_node_certs {
            return Ok(());
        }
        match crate::tls::peer_of(req) {
            Some(peer) if peer.names.names(node) => Ok(()),
            Some(peer) => Err(Status::permission_denied(format!(
                "the client certificate (common name {}) is not issued to node {}; with --tls-per-node each agent presents its own node's certificate",
                bounded(peer.names.common_name.as_deref().unwrap_or("")),
                bounded(node)
            ))),
            None => Err(Status::permission_denied(format!(
                "no client certificate to check against node {}; --tls-per-node needs mutual TLS",
                bounded(node)
            ))),
        }
    }

    /// Register: see the module documentation for the refusals.
    pub fn register(&self, req: Request<ap::RegisterRequest>) -> Result<ap::RegisterResponse, Status> {
        let remote = crate::tls::peer_of(&req)
            .map(|p| p.remote.to_string())
            .or_else(|| req.remote_addr().map(|a| a.to_string()))
            .unwrap_or_default();
        let node = req.get_ref().inventory.as_ref().map(|i| i.node_id.clone()).unwrap_or_default();
        let res = self.register_inner(req, &node);
        if let Err(s) = &res {
            tracing::warn!(node = %bounded(&node), remote = %remote, code = ?s.code(), message = ?s.message(), "refused an agent's registration");
        }
        res
    }

    fn register_inner(&self, req: Request<ap::RegisterRequest>, node: &str) -> Result<ap::RegisterResponse, Status> {
        let version = Self::check_version(req.get_ref().version.as_ref(), node)?;
        if !valid_node_id(node) {
            return Err(Status::invalid_argument(format!("node id {} is not a valid node id", bounded(node))));
        }
        if self.is_retired(node) {
            return Err(Status::failed_precondition(format!(
                "node {} is listed as retired{}; remove it from the list to let its agent register",
                bounded(node),
                self.opts.retired_file.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
            )));
        }
        self.check_identity(&req, node)?;
        let inv = req.into_inner().inventory.unwrap_or_default();
        if inv.advertised_address.is_empty() {
            return Err(Status::invalid_argument(format!("agent of node {} advertises no address", bounded(node))));
        }
        if self.opts.insecure {
            crate::tls::check_insecure(&[&inv.advertised_address]).map_err(Status::failed_precondition)?;
        }
        let mut nodes = self.nodes();
        let now = Instant::now();
        let mut reuse = None;
        if let Some(old) = nodes.get(node) {
            let live = old.in_process || old.silent_for(now) <= self.opts.down_after;
            // A live agent never changes its advertised address (it is fixed at its start), and
            // process starts are whole seconds (two agents started together share one): another
            // address while the first is alive is another agent, whatever its start.
            if old.in_process || (live && old.address != inv.advertised_address) {
                return Err(Status::already_exists(format!(
                    "node id {} is already registered by a live agent at {} (started {}); this agent at {} (started {}) is refused: \
                     give each node its own --node-id",
                    bounded(node),
                    bounded(&old.address),
                    utc(old.started_unix),
                    bounded(&inv.advertised_address),
                    utc(inv.agent_started_unix)
                )));
            }
            if old.address == inv.advertised_address {
                reuse = Some(old.agent.clone());
            }
        }
        let agent = reuse.unwrap_or_else(|| (self.opts.connector)(node, &inv.advertised_address));
        let entry = Entry::from_inventory(inv, agent, false, Some(version));
        tracing::info!(
            node = %node,
            address = %entry.address,
            pools = entry.pools.len(),
            volumes = entry.volumes.len(),
            snapshots = entry.snapshots.len(),
            release = %entry.release,
            version = format_args!("{}.{}", version.major, version.minor),
            "agent registered"
        );
        let was_down = nodes.get(node).is_some_and(|o| o.down_logged);
        if was_down {
            tracing::info!(node = %node, "node is up again");
        }
        nodes.insert(node.to_owned(), entry);
        Ok(ap::RegisterResponse {
            version: Some(ap::wire_version()),
            heartbeat_interval_ms: self.opts.heartbeat.as_millis().min(u32::MAX as u128) as u32,
            nfs_pools: self.opts.nfs_pools.clone(),
        })
    }

    /// Heartbeat: `resync` when the agent is unknown, restarted, or ahead of the changes
    /// applied here.
    pub fn heartbeat(&self, req: Request<ap::HeartbeatRequest>) -> Result<ap::HeartbeatResponse, Status> {
        let node = req.get_ref().node_id.clone();
        Self::check_version(req.get_ref().version.as_ref(), &node)?;
        self.check_identity(&req, &node)?;
        let hb = req.into_inner();
        if self.is_retired(&node) {
            // Its Register is refused, and logged, there.
            return Ok(ap::HeartbeatResponse { resync: true });
        }
        let mut nodes = self.nodes();
        let Some(e) = nodes.get_mut(&node).filter(|e| !e.in_process) else { return Ok(ap::HeartbeatResponse { resync: true }) };
        if e.started_unix != hb.agent_started_unix || e.sequence != hb.sequence {
            tracing::info!(node = %node, have = e.sequence, agent = hb.sequence, "agent's changes do not match the index; asking it to register again");
            e.in_sync = false;
            return Ok(ap::HeartbeatResponse { resync: true });
        }
        if e.down_logged {
            tracing::info!(node = %node, "node is up again");
            e.down_logged = false;
        }
        e.seen();
        e.set_room(&hb.pools);
        Ok(ap::HeartbeatResponse { resync: false })
    }

    /// ReportChanges: applied in sequence; a gap answers `resync`.
    pub fn report_changes(&self, req: Request<ap::ReportChangesRequest>) -> Result<ap::ReportChangesResponse, Status> {
        let node = req.get_ref().node_id.clone();
        Self::check_version(req.get_ref().version.as_ref(), &node)?;
        self.check_identity(&req, &node)?;
        let report = req.into_inner();
        let mut nodes = self.nodes();
        let Some(e) = nodes.get_mut(&node).filter(|e| !e.in_process) else { return Ok(ap::ReportChangesResponse { resync: true }) };
        e.seen();
        for c in report.changes {
            let seq = c.sequence;
            if !e.apply(c) {
                tracing::info!(node = %node, have = e.sequence, got = seq, "a change is missing; asking the agent to register again");
                e.in_sync = false;
                return Ok(ap::ReportChangesResponse { resync: true });
            }
        }
        Ok(ap::ReportChangesResponse { resync: false })
    }
}

/// [`Registry::check_version`] against the version `ours`.
pub fn version_check(ours: ap::WireVersion, theirs: Option<&ap::WireVersion>, node: &str) -> Result<ap::WireVersion, Status> {
    let Some(v) = theirs else {
        return Err(Status::failed_precondition(format!(
            "agent of node {} sent no Agent API version; this controller speaks {}.{}",
            bounded(node),
            ours.major,
            ours.minor
        )));
    };
    if v.major != ours.major || v.minor.abs_diff(ours.minor) > 1 {
        return Err(Status::failed_precondition(format!(
            "agent of node {} speaks Agent API version {}.{}, this controller speaks {}.{} and accepts {}.x with a minor \
             version at most one apart; upgrade the older of the two",
            bounded(node),
            v.major,
            v.minor,
            ours.major,
            ours.minor,
            ours.major
        )));
    }
    Ok(*v)
}

/// The pool of a node as placement sees it.
pub fn candidate(n: &NodeView, p: &ap::Pool) -> PoolCandidate {
    let cap = p.capacity.clone().unwrap_or_default();
    // A node-local pool is reachable on its node; a shared one where its own segments say
    // (none: everywhere).
    let segments = if p.multi_node || !p.segments.is_empty() { p.segments.clone().into_iter().collect() } else { n.segments.clone() };
    let health = match ap::PoolHealth::try_from(p.health).unwrap_or(ap::PoolHealth::Unspecified) {
        ap::PoolHealth::Degraded => Health::Degraded(p.health_message.clone()),
        ap::PoolHealth::Unavailable => Health::Unavailable(p.health_message.clone()),
        ap::PoolHealth::Healthy | ap::PoolHealth::Unspecified => Health::Healthy,
    };
    PoolCandidate {
        node: n.node_id.clone(),
        pool: p.name.clone(),
        kind: p.kind.clone(),
        labels: p.labels.clone().into_iter().collect(),
        segments,
        shared: p.multi_node,
        health,
        node_state: n.state,
        largest_volume: cap.largest_volume_bytes,
        used: cap.used_bytes,
        free: cap.free_bytes,
        volumes: cap.volume_count as u64,
    }
}

/// Polls the retired-nodes file and logs agents falling silent, until the registry is gone.
async fn watch(reg: Weak<Registry>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_reload = Instant::now();
    loop {
        tick.tick().await;
        let Some(r) = reg.upgrade() else { return };
        r.note_silence();
        if r.opts.retired_file.is_some() && last_reload.elapsed() >= RETIRED_POLL {
            last_reload = Instant::now();
            // A small file, but on whatever file system the operator chose: off the async threads.
            let r2 = r.clone();
            let _ = tokio::task::spawn_blocking(move || r2.reload_retired()).await;
        }
    }
}

/// The Registry gRPC service over a [`Registry`].
pub struct RegistryService(Arc<Registry>);

#[tonic::async_trait]
impl RegistryApi for RegistryService {
    async fn register(&self, req: Request<ap::RegisterRequest>) -> Result<Response<ap::RegisterResponse>, Status> {
        self.0.register(req).map(Response::new)
    }

    async fn heartbeat(&self, req: Request<ap::HeartbeatRequest>) -> Result<Response<ap::HeartbeatResponse>, Status> {
        self.0.heartbeat(req).map(Response::new)
    }

    async fn report_changes(&self, req: Request<ap::ReportChangesRequest>) -> Result<Response<ap::ReportChangesResponse>, Status> {
        self.0.report_changes(req).map(Response::new)
    }
}

/// The agent of a node no process serves (what all-in-one would dial, if anything registered
/// with it): every call answers UNAVAILABLE.
pub struct Absent(pub String);

impl Absent {
    fn err(&self) -> Error {
        Error::Unavailable(format!("node {} has no agent this process can reach", bounded(&self.0)))
    }
}

#[tonic::async_trait]
impl AgentOps for Absent {
    fn node_id(&self) -> &str {
        &self.0
    }
    async fn create_volume(&self, _: ap::CreateVolumeRequest, _: Duration) -> Result<crate::proto::CreateVolumeResponse> {
        Err(self.err())
    }
    async fn delete_volume(&self, _: crate::proto::DeleteVolumeRequest, _: Duration) -> Result<crate::proto::DeleteVolumeResponse> {
        Err(self.err())
    }
    async fn expand_volume(
        &self,
        _: crate::proto::ControllerExpandVolumeRequest,
        _: Duration,
    ) -> Result<crate::proto::ControllerExpandVolumeResponse> {
        Err(self.err())
    }
    async fn create_snapshot(&self, _: crate::proto::CreateSnapshotRequest, _: Duration) -> Result<crate::proto::CreateSnapshotResponse> {
        Err(self.err())
    }
    async fn delete_snapshot(&self, _: crate::proto::DeleteSnapshotRequest, _: Duration) -> Result<crate::proto::DeleteSnapshotResponse> {
        Err(self.err())
    }
    async fn get_volume(&self, _: ap::GetVolumeRequest, _: Duration) -> Result<ap::GetVolumeResponse> {
        Err(self.err())
    }
    async fn list_volumes(&self, _: ap::ListVolumesRequest, _: Duration) -> Result<ap::ListVolumesResponse> {
        Err(self.err())
    }
    async fn get_snapshot(&self, _: ap::GetSnapshotRequest, _: Duration) -> Result<ap::GetSnapshotResponse> {
        Err(self.err())
    }
    async fn list_snapshots(&self, _: ap::ListSnapshotsRequest, _: Duration) -> Result<ap::ListSnapshotsResponse> {
        Err(self.err())
    }
    async fn get_capacity(&self, _: ap::GetCapacityRequest, _: Duration) -> Result<ap::GetCapacityResponse> {
        Err(self.err())
    }
    async fn get_inventory(&self, _: Duration) -> Result<ap::Inventory> {
        Err(self.err())
    }
    // issue 11: cluster
    async fn claim_name(&self, _: ap::ClaimNameRequest, _: Duration) -> Result<ap::ClaimNameResponse> {
        Err(self.err())
    }
}

/// An error for a node that cannot serve a call now.
pub fn unreachable(n: &NodeView) -> Error {
    match n.trouble() {
        Some(t) if n.state == NodeState::Down => Error::Unavailable(format!("{t}; retry when it is back")),
        Some(t) => Error::FailedPrecondition(t),
        None => Error::Internal(format!("node {} is up", n.node_id)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::agent_proto::WIRE_VERSION;
    use crate::agent_proto::WireVersion;

    pub(crate) fn inert_connector() -> Connector {
        Arc::new(|node: &str, _addr: &str| Arc::new(Absent(node.to_owned())) as Arc<dyn AgentOps>)
    }

    fn opts() -> RegistryOptions {
        RegistryOptions {
            heartbeat: Duration::from_secs(1),
            down_after: Duration::from_secs(3),
            grace: Duration::from_secs(3),
            ..RegistryOptions::new(inert_connector())
        }
    }

    pub(crate) fn volume(pool: &str, local: &str, name: &str) -> ap::Volume {
        ap::Volume { pool: pool.into(), local_name: local.into(), csi_name: name.into(), ..Default::default() }
    }

    pub(crate) fn inventory(node: &str, addr: &str, started: i64, sequence: u64) -> ap::Inventory {
        ap::Inventory {
            node_id: node.into(),
            advertised_address: addr.into(),
            pools: vec![ap::Pool { name: "p".into(), kind: "file".into(), ..Default::default() }],
            volumes: vec![volume("p", "a", "vol-a")],
            sequence,
            agent_started_unix: started,
            ..Default::default()
        }
    }

    fn register(r: &Registry, inv: ap::Inventory, v: WireVersion) -> Result<ap::RegisterResponse, Status> {
        r.register(Request::new(ap::RegisterRequest { version: Some(v), inventory: Some(inv) }))
    }

    fn heartbeat(r: &Registry, node: &str, started: i64, sequence: u64) -> bool {
        r.heartbeat(Request::new(ap::HeartbeatRequest {
            version: Some(WIRE_VERSION),
            node_id: node.into(),
            sequence,
            pools: vec![],
            agent_started_unix: started,
        }))
        .unwrap()
        .resync
    }

    fn report(r: &Registry, node: &str, changes: Vec<ap::Change>) -> bool {
        r.report_changes(Request::new(ap::ReportChangesRequest { version: Some(WIRE_VERSION), node_id: node.into(), changes }))
            .unwrap()
            .resync
    }

    #[test]
    fn versions_one_minor_apart_are_accepted_others_refused_naming_both() {
        let v = |major, minor| WireVersion { major, minor };
        let ours = v(1, 3);
        let cases = [
            ("same", v(1, 3), true),
            ("one minor older", v(1, 2), true),
            ("one minor newer", v(1, 4), true),
            ("two minors older", v(1, 1), false),
            ("two minors newer", v(1, 5), false),
            ("next major", v(2, 3), false),
            ("previous major", v(0, 3), false),
        ];
        for (name, theirs, ok) in cases {
            match (version_check(ours, Some(&theirs), "n1"), ok) {
                (Ok(got), true) => assert_eq!(got, theirs, "{name}"),
                (Err(s), false) => {
                    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{name}");
                    let both = [format!("{}.{}", theirs.major, theirs.minor), "1.3".to_owned()];
                    assert!(both.iter().all(|b| s.message().contains(b.as_str())), "{name}: {}", s.message());
                }
                (got, _) => panic!("{name}: {got:?}"),
            }
        }
        assert_eq!(version_check(ours, None, "n1").unwrap_err().code(), tonic::Code::FailedPrecondition, "no version");
    }

    #[tokio::test]
    async fn registration_checks_the_version_of_this_build() {
        let r = Registry::new(opts());
        let ours = WIRE_VERSION;
        let resp = register(&r, inventory("n1", "10.0.0.1:7000", 1, 0), ours).unwrap();
        assert_eq!(resp.version, Some(ours));
        assert_eq!(resp.heartbeat_interval_ms, 1000);
        let newer = WireVersion { major: ours.major, minor: ours.minor + 1 };
        register(&r, inventory("n2", "10.0.0.2:7000", 1, 0), newer).expect("one minor newer");
        let next = WireVersion { major: ours.major + 1, minor: 0 };
        let err = register(&r, inventory("n3", "10.0.0.3:7000", 1, 0), next).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(r.node("n3").is_none(), "a refused agent is not registered");
        let none = r.register(Request::new(ap::RegisterRequest { version: None, inventory: Some(inventory("n4", "a:1", 1, 0)) }));
        assert_eq!(none.unwrap_err().code(), tonic::Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn a_second_live_agent_claiming_a_node_id_is_refused() {
        let r = Registry::new(opts());
        register(&r, inventory("n1", "10.0.0.1:7000", 100, 0), WIRE_VERSION).unwrap();
        // Another process at another address: refused while the first is alive.
        let err = register(&r, inventory("n1", "10.0.0.2:7000", 200, 0), WIRE_VERSION).unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);
        assert!(err.message().contains("10.0.0.1:7000") && err.message().contains("10.0.0.2:7000"), "{}", err.message());
        assert_eq!(r.node("n1").unwrap().address, "10.0.0.1:7000", "the first registration stays");
        // Started in the same second (process starts are whole seconds): still another agent.
        let err = register(&r, inventory("n1", "10.0.0.2:7000", 100, 0), WIRE_VERSION).unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);
        // The same agent restarted at its address: accepted.
        register(&r, inventory("n1", "10.0.0.1:7000", 300, 0), WIRE_VERSION).expect("a restart at the same address");
        assert_eq!(r.node("n1").unwrap().started_unix, 300);
    }

    #[tokio::test]
    async fn a_silent_agent_is_down_and_up_again_when_it_heartbeats() {
        let r = Registry::new(RegistryOptions { down_after: Duration::from_millis(300), ..opts() });
        register(&r, inventory("n1", "10.0.0.1:7000", 100, 0), WIRE_VERSION).unwrap();
        assert_eq!(r.node("n1").unwrap().state, NodeState::Up);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let n = r.node("n1").unwrap();
        assert_eq!(n.state, NodeState::Down);
        assert!(n.trouble().unwrap().starts_with("node n1 unreachable since 20"), "{:?}", n.trouble());
        assert_eq!(r.candidates()[0].node_state, NodeState::Down, "placement sees it down");
        assert!(!heartbeat(&r, "n1", 100, 0), "its heartbeat is in sequence");
        assert_eq!(r.node("n1").unwrap().state, NodeState::Up, "a heartbeat brings it back");
        // A node down long enough may be taken over by another agent (a replaced machine).
        tokio::time::sleep(Duration::from_millis(400)).await;
        register(&r, inventory("n1", "10.0.0.9:7000", 999, 0), WIRE_VERSION).expect("a down node's id may be registered again");
        assert_eq!(r.node("n1").unwrap().state, NodeState::Up);
    }

    #[tokio::test]
    async fn the_name_index_follows_creates_renames_and_deletes() {
        let r = Registry::new(opts());
        register(&r, inventory("n1", "10.0.0.1:7000", 100, 0), WIRE_VERSION).unwrap();
        let named =
            |name: &str| -> Vec<(String, String)> { r.volumes_named(name).into_iter().map(|(_, v)| (v.pool, v.local_name)).collect() };
        let key = |pool: &str, local: &str| (pool.to_owned(), local.to_owned());
        // The same name in two pools (two creates racing on one node): both, in key order.
        r.note_volume("n1", volume("q", "b", "vol-a"));
        assert_eq!(named("vol-a"), [key("p", "a"), key("q", "b")]);
        // Told again (the call's answer, then its change): still once.
        r.note_volume("n1", volume("q", "b", "vol-a"));
        assert_eq!(named("vol-a"), [key("p", "a"), key("q", "b")]);
        // A key under a new name leaves the old one.
        r.note_volume("n1", volume("p", "a", "vol-z"));
        assert_eq!(named("vol-a"), [key("q", "b")]);
        assert_eq!(named("vol-z"), [key("p", "a")]);
        let deleted = ap::Change {
            sequence: 1,
            change: Some(ap::change::Change::VolumeDeleted(ap::VolumeRef {
                pool: "q".into(),
                local_name: "b".into(),
                csi_name: "vol-a".into(),
            })),
        };
        assert!(!report(&r, "n1", vec![deleted]));
        assert!(named("vol-a").is_empty());
        assert_eq!(named("vol-z"), [key("p", "a")]);
    }

    #[tokio::test]
    async fn changes_apply_in_sequence_and_a_gap_asks_for_a_resync() {
        let r = Registry::new(opts());
        register(&r, inventory("n1", "10.0.0.1:7000", 100, 5), WIRE_VERSION).unwrap();
        assert_eq!(r.volumes_named("vol-a").len(), 1);
        let created = |seq, local: &str, name: &str| ap::Change {
            sequence: seq,
            change: Some(ap::change::Change::VolumeCreated(volume("p", local, name))),
        };
        let deleted = |seq, local: &str, name: &str| ap::Change {
            sequence: seq,
            change: Some(ap::change::Change::VolumeDeleted(ap::VolumeRef {
                pool: "p".into(),
                local_name: local.into(),
                csi_name: name.into(),
            })),
        };
        assert!(!report(&r, "n1", vec![created(6, "b", "vol-b"), deleted(7, "a", "vol-a")]));
        assert!(r.volumes_named("vol-a").is_empty());
        assert_eq!(r.volumes_named("vol-b")[0].0, "n1");
        assert!(!report(&r, "n1", vec![created(7, "x", "dup")]), "an already applied change sent again is skipped");
        assert!(r.volumes_named("dup").is_empty());
        assert!(!heartbeat(&r, "n1", 100, 7), "in sequence");
        assert!(heartbeat(&r, "n1", 100, 8), "the agent says 8: one change was missed");
        assert!(report(&r, "n1", vec![created(9, "c", "vol-c")]), "a gap");
        assert!(r.volumes_named("vol-c").is_empty(), "nothing after the gap is applied");
        assert!(heartbeat(&r, "n1", 101, 7), "a restarted agent registers again");
        assert!(heartbeat(&r, "ghost", 1, 0), "an unknown agent registers");
        assert!(report(&r, "ghost", vec![]), "an unknown agent registers");
    }

    #[tokio::test]
    async fn an_insecure_controller_takes_only_loopback_agents() {
        let r = Registry::new(RegistryOptions { insecure: true, ..opts() });
        register(&r, inventory("n1", "127.0.0.1:7000", 1, 0), WIRE_VERSION).expect("loopback");
        let err = register(&r, inventory("n2", "10.0.0.2:7000", 1, 0), WIRE_VERSION).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("10.0.0.2:7000"), "{}", err.message());
    }

    #[tokio::test]
    async fn per_node_certificates_must_name_the_node() {
        let r = Registry::new(RegistryOptions { per_node_certs: true, ..opts() });
        let with_cert = |cn: &str, node: &str| {
            let mut req = Request::new(ap::RegisterRequest { version: Some(WIRE_VERSION), inventory: Some(inventory(node, "h:1", 1, 0)) });
            req.extensions_mut().insert(crate::tls::PeerInfo {
                remote: "127.0.0.1:5000".parse().unwrap(),
                names: Arc::new(crate::tls::PeerNames { common_name: Some(cn.into()), ..Default::default() }),
            });
            req
        };
        r.register(with_cert("n1", "n1")).expect("its own certificate");
        let err = r.register(with_cert("n1", "n2")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("n2"), "{}", err.message());
        let err = register(&r, inventory("n3", "h:1", 1, 0), WIRE_VERSION).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "no certificate at all");
        // Shared certificates (the default): any valid certificate may register any node id.
        let shared = Registry::new(opts());
        shared.register(with_cert("holdfast-agent", "n2")).expect("shared certificate");
    }

    #[tokio::test]
    async fn the_retired_list_is_read_again_and_kept_when_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("retired");
        std::fs::write(&file, "# gone for good\nn1\n  n2  # rack 4 burned\n\n").unwrap();
        let r = Registry::new(RegistryOptions { retired_file: Some(file.clone()), ..opts() });
        assert!(r.is_retired("n1") && r.is_retired("n2") && !r.is_retired("n3"));
        let err = register(&r, inventory("n1", "h:1", 1, 0), WIRE_VERSION).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("retired"), "{}", err.message());
        let listed: Vec<(String, NodeState)> = r.nodes_view().into_iter().map(|n| (n.node_id, n.state)).collect();
        assert_eq!(listed, [("n1".to_owned(), NodeState::Retired), ("n2".to_owned(), NodeState::Retired)]);

        register(&r, inventory("n3", "h:3", 1, 0), WIRE_VERSION).unwrap();
        std::fs::write(&file, "n3\n").unwrap();
        assert!(r.reload_retired());
        assert!(!r.is_retired("n1") && r.is_retired("n3"));
        assert_eq!(r.node("n3").unwrap().state, NodeState::Retired, "a registered node can be retired");
        assert_eq!(r.node("n3").unwrap().trouble().unwrap(), "node n3 retired");
        assert!(heartbeat(&r, "n3", 1, 0), "a retired node's agent is sent to register, and refused there");

        std::fs::remove_file(&file).unwrap();
        assert!(!r.reload_retired());
        assert!(r.is_retired("n3"), "an unreadable file keeps the previous list");
        register(&r, inventory("n1", "h:1", 1, 0), WIRE_VERSION).expect("n1 is no longer retired");
    }

    #[tokio::test]
    async fn creates_wait_for_the_start_up_grace() {
        let r = Registry::new(RegistryOptions { grace: Duration::from_millis(200), ..opts() });
        assert!(!r.ready());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(r.ready());
        let aio = Registry::new(RegistryOptions { grace: Duration::ZERO, ..opts() });
        assert!(aio.ready(), "all-in-one has no agent to wait for");
    }

    #[test]
    fn candidates_take_the_node_segments_unless_shared() {
        let n = NodeView {
            node_id: "n1".into(),
            state: NodeState::Up,
            registered: true,
            in_process: false,
            address: String::new(),
            segments: Segments::from([(NODE_KEY.to_owned(), "n1".to_owned())]),
            pools: vec![],
            volumes: 0,
            snapshots: 0,
            release: String::new(),
            version: None,
            started_unix: 0,
            last_seen_unix: 0,
            agent: None,
        };
        let local = ap::Pool {
            name: "p".into(),
            health: ap::PoolHealth::Degraded as i32,
            health_message: "thin pool 91% full".into(),
            capacity: Some(ap::PoolCapacity {
                largest_volume_bytes: 7,
                used_bytes: 2,
                free_bytes: 9,
                volume_count: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = candidate(&n, &local);
        assert_eq!(c.segments, n.segments);
        assert!(!c.shared);
        assert_eq!((c.largest_volume, c.used, c.free, c.volumes), (7, 2, 9, 3));
        assert_eq!(c.health, Health::Degraded("thin pool 91% full".into()));
        let shared = ap::Pool { name: "nfs".into(), multi_node: true, ..Default::default() };
        let c = candidate(&n, &shared);
        assert!(c.shared && c.segments.is_empty(), "a shared pool without segments is reachable everywhere");
    }

    #[test]
    fn retired_file_syntax() {
        let got: Vec<String> = parse_retired("a\n#b\n c # d\n\n\te\t\n").into_iter().collect();
        assert_eq!(got, ["a", "c", "e"]);
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
