//! Unit tests of the cluster controller over fake agents: placement and routing as a user of
//! the CSI Controller sees them (which node got the volume, which code a call answers).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Code;

use super::registry::{Connector, Registry, RegistryOptions};
use super::*;
use crate::agent_proto::WIRE_VERSION;
use crate::placement::NODE_KEY;
use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::volume_capability::{AccessMode, AccessType, MountVolume};

const M: u64 = 1 << 20;

/// A fake agent: one node's pools and volumes in memory, with the agent's retry rule (a name
/// found in any pool of the node answers; in another pool than asked: ALREADY_EXISTS).
struct FakeAgent {
    node: String,
    zone: String,
    pools: Mutex<Vec<ap::Pool>>,
    volumes: Mutex<BTreeMap<String, ap::Volume>>,
    /// Calls that change something: "create pool name", "delete id".
    calls: Mutex<Vec<String>>,
    /// Simulates an agent that does not answer.
    broken: AtomicBool,
    /// Claims on names: name → (controller, node, pool), as the real agent keeps them.
    claims: Mutex<BTreeMap<String, (String, String, String)>>,
    /// GetVolume and GetCapacity calls (a create over an authoritative index makes none).
    asked: std::sync::atomic::AtomicUsize,
}

impl FakeAgent {
    fn new(node: &str, zone: &str, pools: &[(&str, u64)]) -> Arc<FakeAgent> {
        let pools = pools
            .iter()
            .map(|(name, free)| ap::Pool {
                name: (*name).into(),
                kind: "file".into(),
                health: ap::PoolHealth::Healthy as i32,
                capacity: Some(ap::PoolCapacity {
                    pool: (*name).into(),
                    largest_volume_bytes: *free,
                    free_bytes: *free,
                    minimum_volume_bytes: M,
                    ..Default::default()
                }),
                filesystems: vec!["ext4".into(), "xfs".into()],
                default_fs: "ext4".into(),
                block: true,
                ..Default::default()
            })
            .collect();
        Arc::new(FakeAgent {
            node: node.into(),
            zone: zone.into(),
            pools: Mutex::new(pools),
            volumes: Mutex::new(BTreeMap::new()),
            calls: Mutex::new(Vec::new()),
            broken: AtomicBool::new(false),
            claims: Mutex::new(BTreeMap::new()),
            asked: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn check(&self) -> Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(format!("agent of node {} at fake unreachable", self.node)));
        }
        Ok(())
    }

    fn inventory(&self) -> ap::Inventory {
        ap::Inventory {
            node_id: self.node.clone(),
            advertised_address: format!("{}:7000", self.node),
            segments: [(NODE_KEY.to_owned(), self.node.clone()), ("zone".to_owned(), self.zone.clone())].into(),
            pools: self.pools.lock().unwrap().clone(),
            volumes: self.volumes.lock().unwrap().values().cloned().collect(),
            agent_started_unix: 1,
            ..Default::default()
        }
    }

    /// A volume made behind the controller's back (its change not reported yet).
    fn plant(&self, pool: &str, name: &str) -> String {
        let id = format!("file:{}:{pool}:{name}", self.node);
        let v = ap::Volume {
            pool: pool.into(),
            local_name: name.into(),
            csi_name: name.into(),
            volume: Some(Volume { volume_id: id.clone(), capacity_bytes: 8 * M as i64, ..Default::default() }),
            ..Default::default()
        };
        self.volumes.lock().unwrap().insert(id.clone(), v);
        id
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn names(&self) -> Vec<String> {
        self.volumes.lock().unwrap().values().map(|v| v.csi_name.clone()).collect()
    }
}

#[tonic::async_trait]
impl AgentOps for FakeAgent {
    fn node_id(&self) -> &str {
        &self.node
    }

    async fn create_volume(&self, req: ap::CreateVolumeRequest, _: Duration) -> Result<CreateVolumeResponse> {
        self.check()?;
        let r = req.request.unwrap();
        for k in PLACEMENT_ONLY {
            assert!(!r.parameters.contains_key(k), "the controller passed its own parameter {k} to the agent");
        }
        {
            let mut claims = self.claims.lock().unwrap();
            if let Some((c, node, _)) = claims.get(&r.name) {
                if *c != req.controller && *node != self.node {
                    return Err(Error::Aborted(format!("another controller is placing {} on node {node}", r.name)));
                }
            }
            claims.insert(r.name.clone(), (req.controller.clone(), self.node.clone(), req.pool.clone()));
        }
        self.calls.lock().unwrap().push(format!("create {} {}", req.pool, r.name));
        // A create takes a moment, as a real one does: others are placed meanwhile.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(v) = self.volumes.lock().unwrap().values().find(|v| v.csi_name == r.name) {
            if v.pool != req.pool {
                return Err(Error::AlreadyExists(format!("volume {} lives in pool {}", r.name, v.pool)));
            }
            return Ok(CreateVolumeResponse { volume: v.volume.clone() });
        }
        let want = capacity_for(r.capacity_range.as_ref(), DEFAULT_CAPACITY)?;
        let mut pools = self.pools.lock().unwrap();
        let pool = pools.iter_mut().find(|p| p.name == req.pool).ok_or_else(|| Error::InvalidArgument("no such pool".into()))?;
        let cap = pool.capacity.as_mut().unwrap();
        if cap.largest_volume_bytes < want {
            return Err(Error::ResourceExhausted(format!("pool {} is full", req.pool)));
        }
        cap.largest_volume_bytes -= want;
        cap.free_bytes -= want;
        cap.volume_count += 1;
        let id = format!("file:{}:{}:{}", self.node, req.pool, r.name);
        let source = r.volume_content_source.clone();
        let volume = Volume { volume_id: id.clone(), capacity_bytes: want as i64, content_source: source, ..Default::default() };
        let v = ap::Volume {
            pool: req.pool.clone(),
            local_name: r.name.clone(),
            csi_name: r.name.clone(),
            volume: Some(volume.clone()),
            ..Default::default()
        };
        self.volumes.lock().unwrap().insert(id, v);
        Ok(CreateVolumeResponse { volume: Some(volume) })
    }

    async fn delete_volume(&self, req: DeleteVolumeRequest, _: Duration) -> Result<DeleteVolumeResponse> {
        self.check()?;
        self.calls.lock().unwrap().push(format!("delete {}", req.volume_id));
        self.volumes.lock().unwrap().remove(&req.volume_id);
        Ok(DeleteVolumeResponse {})
    }

    async fn expand_volume(&self, req: ControllerExpandVolumeRequest, _: Duration) -> Result<ControllerExpandVolumeResponse> {
        self.check()?;
        self.calls.lock().unwrap().push(format!("expand {}", req.volume_id));
        Ok(ControllerExpandVolumeResponse { capacity_bytes: req.capacity_range.unwrap().required_bytes, node_expansion_required: true })
    }

    async fn create_snapshot(&self, req: CreateSnapshotRequest, _: Duration) -> Result<CreateSnapshotResponse> {
        self.check()?;
        self.calls.lock().unwrap().push(format!("snapshot {} of {}", req.name, req.source_volume_id));
        let id = VolumeId::parse(&req.source_volume_id).unwrap();
        Ok(CreateSnapshotResponse {
            snapshot: Some(Snapshot {
                snapshot_id: format!("file:{}:{}:{}", self.node, id.pool, req.name),
                source_volume_id: req.source_volume_id,
                ready_to_use: true,
                ..Default::default()
            }),
        })
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest, _: Duration) -> Result<DeleteSnapshotResponse> {
        self.check()?;
        self.calls.lock().unwrap().push(format!("delete-snapshot {}", req.snapshot_id));
        Ok(DeleteSnapshotResponse {})
    }

    async fn get_volume(&self, req: ap::GetVolumeRequest, _: Duration) -> Result<ap::GetVolumeResponse> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        let vols = self.volumes.lock().unwrap();
        let volume = match req.key {
            Some(ap::get_volume_request::Key::VolumeId(id)) => vols.get(&id).cloned(),
            Some(ap::get_volume_request::Key::CsiName(n)) => vols.values().find(|v| v.csi_name == n).cloned(),
            None => None,
        };
        Ok(ap::GetVolumeResponse { volume })
    }

    async fn list_volumes(&self, _: ap::ListVolumesRequest, _: Duration) -> Result<ap::ListVolumesResponse> {
        self.check()?;
        Ok(ap::ListVolumesResponse { volumes: self.volumes.lock().unwrap().values().cloned().collect(), next_token: String::new() })
    }

    async fn get_snapshot(&self, _: ap::GetSnapshotRequest, _: Duration) -> Result<ap::GetSnapshotResponse> {
        self.check()?;
        Ok(ap::GetSnapshotResponse { snapshot: None })
    }

    async fn list_snapshots(&self, _: ap::ListSnapshotsRequest, _: Duration) -> Result<ap::ListSnapshotsResponse> {
        self.check()?;
        Ok(ap::ListSnapshotsResponse::default())
    }

    async fn get_capacity(&self, _: ap::GetCapacityRequest, _: Duration) -> Result<ap::GetCapacityResponse> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        Ok(ap::GetCapacityResponse { pools: self.pools.lock().unwrap().iter().filter_map(|p| p.capacity.clone()).collect() })
    }

    async fn get_inventory(&self, _: Duration) -> Result<ap::Inventory> {
        self.check()?;
        Ok(self.inventory())
    }

    async fn claim_name(&self, req: ap::ClaimNameRequest, _: Duration) -> Result<ap::ClaimNameResponse> {
        self.check()?;
        let mut claims = self.claims.lock().unwrap();
        if req.release {
            if claims.get(&req.csi_name).is_some_and(|(c, _, _)| *c == req.controller) {
                claims.remove(&req.csi_name);
            }
            return Ok(ap::ClaimNameResponse { granted: true, ..Default::default() });
        }
        match claims.get(&req.csi_name) {
            Some((c, node, pool)) if *c != req.controller => {
                Ok(ap::ClaimNameResponse { granted: false, holder: c.clone(), node: node.clone(), pool: pool.clone() })
            }
            _ => {
                claims.insert(req.csi_name, (req.controller, req.node, req.pool));
                Ok(ap::ClaimNameResponse { granted: true, ..Default::default() })
            }
        }
    }
}

/// A cluster of fake agents behind one controller.
struct Cluster {
    c: ClusterController,
    agents: BTreeMap<String, Arc<FakeAgent>>,
    retired: Option<tempfile::NamedTempFile>,
}

/// Nodes a (zone z1, 5 GiB in pool `fast`), b (z1, 9 GiB in `slow`), c (z2, 2 GiB in `bulk`).
fn cluster() -> Cluster {
    cluster_with(Duration::from_secs(60), None)
}

fn cluster_with(down_after: Duration, retired: Option<&str>) -> Cluster {
    let g = 1024 * M;
    let agents: BTreeMap<String, Arc<FakeAgent>> = [
        FakeAgent::new("a", "z1", &[("fast", 5 * g)]),
        FakeAgent::new("b", "z1", &[("slow", 9 * g)]),
        FakeAgent::new("c", "z2", &[("bulk", 2 * g)]),
    ]
    .into_iter()
    .map(|a| (a.node.clone(), a))
    .collect();
    let lookup = agents.clone();
    let connector: Connector = Arc::new(move |node: &str, _: &str| lookup[node].clone() as Arc<dyn AgentOps>);
    let file = retired.map(|text| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    });
    let reg = Registry::new(RegistryOptions {
        grace: Duration::ZERO,
        down_after,
        retired_file: file.as_ref().map(|f| f.path().to_owned()),
        ..RegistryOptions::new(connector)
    });
    for a in agents.values() {
        if retired.is_some_and(|r| super::registry::parse_retired(r).contains(&a.node)) {
            continue;
        }
        reg.register(Request::new(ap::RegisterRequest { version: Some(WIRE_VERSION), inventory: Some(a.inventory()) })).unwrap();
    }
    Cluster { c: ClusterController::new(reg), agents, retired: file }
}

impl Cluster {
    fn agent(&self, node: &str) -> &FakeAgent {
        &self.agents[node]
    }

    /// Keeps the named nodes' agents alive (a heartbeat each).
    fn heartbeat(&self, nodes: &[&str]) {
        for n in nodes {
            let hb =
                ap::HeartbeatRequest { version: Some(WIRE_VERSION), node_id: (*n).into(), agent_started_unix: 1, ..Default::default() };
            assert!(!self.c.registry().heartbeat(Request::new(hb)).unwrap().resync);
        }
    }

    async fn create(&self, req: CreateVolumeRequest) -> Result<Volume> {
        Ok(self.c.create(req, Duration::from_secs(5)).await?.volume.unwrap())
    }
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn seg(pairs: &[(&str, &str)]) -> Topology {
    Topology { segments: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
}

fn create_req(name: &str, gib: u64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: (gib * 1024 * M) as i64, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap()],
        ..Default::default()
    }
}

fn with_topology(req: CreateVolumeRequest, requisite: Vec<Topology>, preferred: Vec<Topology>) -> CreateVolumeRequest {
    CreateVolumeRequest { accessibility_requirements: Some(TopologyRequirement { requisite, preferred }), ..req }
}

fn with_params(req: CreateVolumeRequest, params: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest { parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..req }
}

fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
    Status::from(r.unwrap_err()).code()
}

fn node_of(v: &Volume) -> String {
    VolumeId::parse(&v.volume_id).unwrap().node.unwrap()
}

#[tokio::test]
async fn placement_follows_parameters_topology_and_room() {
    struct Case {
        name: &'static str,
        req: CreateVolumeRequest,
        want: std::result::Result<&'static str, Code>,
    }
    let cases = [
        Case { name: "most free by default", req: create_req("v1", 1), want: Ok("b") },
        Case { name: "requisite zone z2", req: with_topology(create_req("v2", 1), vec![seg(&[("zone", "z2")])], vec![]), want: Ok("c") },
        Case {
            name: "preferred node a first",
            req: with_topology(create_req("v3", 1), vec![], vec![seg(&[(NODE_KEY, "a")]), seg(&[(NODE_KEY, "b")])]),
            want: Ok("a"),
        },
        Case { name: "a pool parameter", req: with_params(create_req("v4", 1), &[("pool", "bulk")]), want: Ok("c") },
        Case { name: "a full node is skipped", req: with_params(create_req("v5", 6), &[("placementPolicy", "least-used")]), want: Ok("b") },
        Case { name: "nothing fits", req: create_req("v6", 10), want: Err(Code::ResourceExhausted) },
        Case {
            name: "the topology holds no pool with room",
            req: with_topology(create_req("v7", 3), vec![seg(&[("zone", "z2")])], vec![]),
            want: Err(Code::ResourceExhausted),
        },
        Case { name: "an unknown pool", req: with_params(create_req("v8", 1), &[("pool", "fsat")]), want: Err(Code::InvalidArgument) },
        Case {
            name: "a malformed selector",
            req: with_params(create_req("v9", 1), &[("poolSelector", "a b")]),
            want: Err(Code::InvalidArgument),
        },
    ];
    for c in cases {
        let cl = cluster();
        match (cl.create(c.req).await, c.want) {
            (Ok(v), Ok(node)) => assert_eq!(node_of(&v), node, "{}", c.name),
            (Err(e), Err(want)) => assert_eq!(Status::from(e).code(), want, "{}", c.name),
            (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
        }
    }
}

#[tokio::test]
async fn no_room_says_what_was_considered() {
    let cl = cluster();
    let err = cl.create(create_req("big", 10)).await.unwrap_err();
    let msg = err.to_string();
    for part in ["pool \"fast\" on node \"a\": no room", "pool \"slow\" on node \"b\": no room", "pool \"bulk\" on node \"c\": no room"] {
        assert!(msg.contains(part), "{msg}");
    }
}

#[tokio::test]
async fn a_retry_is_answered_by_the_node_holding_the_name_even_behind_the_index() {
    let cl = cluster();
    let first = cl.create(create_req("once", 1)).await.unwrap();
    let again = cl.create(create_req("once", 1)).await.unwrap();
    assert_eq!(again.volume_id, first.volume_id);
    // Made on node c but not reported yet, and c's heartbeat says a change is missing (the
    // index is not authoritative for c): found there by the look-up, not made twice on b.
    let planted = cl.agent("c").plant("bulk", "behind");
    let hb =
        ap::HeartbeatRequest { version: Some(WIRE_VERSION), node_id: "c".into(), agent_started_unix: 1, sequence: 1, ..Default::default() };
    assert!(cl.c.registry().heartbeat(Request::new(hb)).unwrap().resync);
    let got = cl.create(create_req("behind", 1)).await.unwrap();
    assert_eq!(got.volume_id, planted);
    for n in ["a", "b"] {
        assert!(!cl.agent(n).names().contains(&"behind".to_owned()), "a second volume on node {n}");
    }
    assert_eq!(cl.agent("c").calls(), ["create bulk behind"], "routed to its pool, where the agent's retry check answers");
}

#[tokio::test]
async fn a_name_found_outside_the_requisite_topology_already_exists() {
    let cl = cluster();
    let v = cl.create(create_req("moved", 1)).await.unwrap();
    assert_eq!(node_of(&v), "b");
    let elsewhere = with_topology(create_req("moved", 1), vec![seg(&[(NODE_KEY, "c")])], vec![]);
    assert_eq!(code(cl.create(elsewhere).await), Code::AlreadyExists);
    assert_eq!(cl.agent("c").names(), Vec::<String>::new());
}

#[tokio::test]
async fn a_down_candidate_blocks_only_the_creates_it_could_hold() {
    let cl = cluster_with(Duration::from_millis(200), None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cl.heartbeat(&["a", "c"]);
    // b is down: it could hold an earlier attempt of any create it is a candidate for.
    assert_eq!(code(cl.create(create_req("any", 1)).await), Code::Unavailable);
    assert!(cl.agents.values().all(|a| a.names().is_empty()), "nothing was made");
    // A create that b could not hold (zone z2) proceeds.
    let z2 = with_topology(create_req("z2", 1), vec![seg(&[("zone", "z2")])], vec![]);
    assert_eq!(node_of(&cl.create(z2).await.unwrap()), "c");
    // An agent that cannot be asked blocks too, and nothing is made.
    cl.agent("c").broken.store(true, Ordering::SeqCst);
    let z2 = with_topology(create_req("z2-new", 1), vec![seg(&[("zone", "z2")])], vec![]);
    assert_eq!(code(cl.create(z2).await), Code::Unavailable);
}

#[tokio::test]
async fn calls_for_a_down_node_are_unavailable_and_its_volumes_abnormal() {
    let cl = cluster_with(Duration::from_millis(200), None);
    let on_b = cl.create(create_req("on-b", 1)).await.unwrap();
    let on_c = cl.create(with_params(create_req("on-c", 1), &[("pool", "bulk")])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cl.heartbeat(&["a", "c"]);
    let d = Duration::from_secs(5);
    let del = DeleteVolumeRequest { volume_id: on_b.volume_id.clone(), ..Default::default() };
    assert_eq!(code(cl.c.delete(del, d).await), Code::Unavailable);
    let exp = ControllerExpandVolumeRequest {
        volume_id: on_b.volume_id.clone(),
        capacity_range: Some(CapacityRange { required_bytes: 2 << 30, limit_bytes: 0 }),
        ..Default::default()
    };
    assert_eq!(code(cl.c.expand(exp, d).await), Code::Unavailable);
    let snap = CreateSnapshotRequest { name: "s".into(), source_volume_id: on_b.volume_id.clone(), ..Default::default() };
    assert_eq!(code(cl.c.snapshot(snap, d).await), Code::Unavailable);

    let got = cl.c.get_volume(ControllerGetVolumeRequest { volume_id: on_b.volume_id.clone() }, d).await.unwrap();
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.starts_with("node b unreachable since 20"), "{cond:?}");
    let listed = cl.c.list(ListVolumesRequest::default(), d).await.unwrap();
    let by_id: BTreeMap<String, VolumeCondition> =
        listed.entries.into_iter().map(|e| (e.volume.unwrap().volume_id, e.status.unwrap().volume_condition.unwrap())).collect();
    assert_eq!(by_id.len(), 2, "{by_id:?}");
    assert!(by_id[&on_b.volume_id].abnormal && by_id[&on_b.volume_id].message.contains("node b unreachable since"));
    assert!(!by_id[&on_c.volume_id].abnormal);
    // Back: healthy again, its volume intact.
    cl.heartbeat(&["b"]);
    let got = cl.c.get_volume(ControllerGetVolumeRequest { volume_id: on_b.volume_id.clone() }, d).await.unwrap();
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);
}

#[tokio::test]
async fn a_retired_nodes_objects_are_deletable_and_listed_retired() {
    let cl = cluster_with(Duration::from_secs(60), Some("# none yet\n"));
    let on_b = cl.create(create_req("on-b", 1)).await.unwrap();
    std::fs::write(cl.retired_path(), "b\n").unwrap();
    assert!(cl.c.registry().reload_retired());
    let d = Duration::from_secs(5);
    let listed = cl.c.list(ListVolumesRequest::default(), d).await.unwrap();
    let cond = listed.entries[0].status.clone().unwrap().volume_condition.unwrap();
    assert_eq!((cond.abnormal, cond.message.as_str()), (true, "node b retired"));
    // Never placed on again.
    assert_eq!(node_of(&cl.create(create_req("after", 1)).await.unwrap()), "a");
    cl.c.delete(DeleteVolumeRequest { volume_id: on_b.volume_id.clone(), ..Default::default() }, d).await.expect("deletable");
    assert_eq!(cl.agent("b").calls(), ["create slow on-b"], "the retired node's agent is not called");
    assert!(
        cl.c.list(ListVolumesRequest::default(), d)
            .await
            .unwrap()
            .entries
            .iter()
            .all(|e| e.volume.as_ref().unwrap().volume_id != on_b.volume_id)
    );
    let snap = DeleteSnapshotRequest { snapshot_id: "file:b:slow:snap-1".into(), ..Default::default() };
    cl.c.delete_snapshot(snap, d).await.expect("a retired node's snapshot is deletable");
}

impl Cluster {
    fn retired_path(&self) -> std::path::PathBuf {
        self.retired.as_ref().map(|f| f.path().to_owned()).expect("cluster_with a retired file")
    }
}

#[tokio::test]
async fn clones_go_to_the_source_node_and_pool() {
    let cl = cluster();
    let src = cl.create(with_params(create_req("src", 1), &[("pool", "fast")])).await.unwrap();
    let clone = CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: src.volume_id.clone() })),
        }),
        ..create_req("clone", 1)
    };
    let v = cl.create(clone).await.unwrap();
    assert_eq!(node_of(&v), "a");
    assert_eq!(cl.agent("a").calls(), ["create fast src", "create fast clone"]);
    let snap = CreateSnapshotRequest { name: "s1".into(), source_volume_id: src.volume_id.clone(), ..Default::default() };
    let s = cl.c.snapshot(snap, Duration::from_secs(5)).await.unwrap().snapshot.unwrap();
    assert!(s.snapshot_id.starts_with("file:a:fast:"), "{}", s.snapshot_id);
    // The same snapshot name of a volume on another node was taken of another volume.
    let other = cl.create(create_req("other", 1)).await.unwrap();
    let snap = CreateSnapshotRequest { name: "s1".into(), source_volume_id: other.volume_id, ..Default::default() };
    assert_eq!(code(cl.c.snapshot(snap, Duration::from_secs(5)).await), Code::AlreadyExists);
}

#[tokio::test]
async fn capacity_is_the_largest_single_volume_per_segment() {
    let g = 1024 * M;
    let cl = cluster();
    // A second pool on a: 5 GiB + 3 GiB there, never 8.
    cl.agent("a").pools.lock().unwrap().push(FakeAgent::new("a", "z1", &[("more", 3 * g)]).pools.lock().unwrap()[0].clone());
    let req = |segment: Option<Topology>| GetCapacityRequest {
        volume_capabilities: vec![mount_cap()],
        accessible_topology: segment,
        ..Default::default()
    };
    let cases = [
        ("anywhere", None, 9 * g),
        ("node a", Some(seg(&[(NODE_KEY, "a")])), 5 * g),
        ("zone z1", Some(seg(&[("zone", "z1")])), 9 * g),
        ("zone z2", Some(seg(&[("zone", "z2")])), 2 * g),
        ("unknown node", Some(seg(&[(NODE_KEY, "x")])), 0),
    ];
    for (name, segment, want) in cases {
        let got = cl.c.capacity(req(segment)).await.unwrap();
        assert_eq!(got.available_capacity as u64, want, "{name}");
        assert_eq!(got.maximum_volume_size, Some(want as i64), "{name}");
        assert!(got.minimum_volume_size.unwrap() > 0, "{name}");
    }
    // Asked live: a volume made since shows at once.
    cl.create(create_req("fill", 4)).await.unwrap();
    assert_eq!(cl.c.capacity(req(Some(seg(&[(NODE_KEY, "b")])))).await.unwrap().available_capacity as u64, 5 * g);
    let xfs = GetCapacityRequest { parameters: [("fsType".to_owned(), "xfs".to_owned())].into(), ..req(None) };
    assert_eq!(cl.c.capacity(xfs).await.unwrap().minimum_volume_size, Some(300 * M as i64), "xfs needs 300 MiB");
}

#[tokio::test]
async fn creates_wait_for_the_agents_after_a_start() {
    let reg = Registry::new(RegistryOptions {
        grace: Duration::from_secs(60),
        ..RegistryOptions::new(super::registry::tests::inert_connector())
    });
    let c = ClusterController::new(reg);
    let err = c.create(create_req("early", 1), Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(Status::from(err).code(), Code::Unavailable);
    // Ids of a node that has not registered yet: retryable, not "gone".
    let del = DeleteVolumeRequest { volume_id: "file:late:p:x".into(), ..Default::default() };
    assert_eq!(code(c.delete(del, Duration::from_secs(1)).await), Code::Unavailable);
    // Ids this driver never issued name nothing.
    c.delete(DeleteVolumeRequest { volume_id: "garbage".into(), ..Default::default() }, Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let cl = Arc::new(cluster());
    let mut set = JoinSet::new();
    for _ in 0..8 {
        let cl = cl.clone();
        set.spawn(async move { cl.create(create_req("same", 1)).await.map(|v| v.volume_id).map_err(|e| Status::from(e).code()) });
    }
    let mut ids = Vec::new();
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(id) => ids.push(id),
            Err(c) => assert_eq!(c, Code::Aborted, "contention answers ABORTED"),
        }
    }
    assert!(!ids.is_empty());
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let made: usize = cl.agents.values().map(|a| a.names().len()).sum();
    assert_eq!(made, 1);
}

#[tokio::test]
async fn capabilities_no_pool_serves_are_invalid() {
    let cl = cluster();
    let multi = CreateVolumeRequest {
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode { mode: Mode::MultiNodeMultiWriter as i32 }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }],
        ..create_req("multi", 1)
    };
    assert_eq!(code(cl.create(multi).await), Code::InvalidArgument);
    let btrfs = with_params(create_req("b", 1), &[("fsType", "btrfs")]);
    assert_eq!(code(cl.create(btrfs).await), Code::InvalidArgument);
    let contradiction = CreateVolumeRequest {
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
            access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })),
        }],
        ..with_params(create_req("c", 1), &[("fsType", "xfs")])
    };
    assert_eq!(code(cl.create(contradiction).await), Code::InvalidArgument);
}

#[tokio::test]
async fn creates_in_flight_count_against_their_pool() {
    let cl = Arc::new(cluster());
    let mut set = JoinSet::new();
    for i in 0..20 {
        let cl = cl.clone();
        let req = with_topology(
            with_params(
                CreateVolumeRequest {
                    capacity_range: Some(CapacityRange { required_bytes: 64 * M as i64, limit_bytes: 0 }),
                    ..create_req(&format!("spread-{i}"), 0)
                },
                &[("placementPolicy", "spread")],
            ),
            vec![seg(&[("zone", "z1")])],
            vec![],
        );
        set.spawn(async move { node_of(&cl.create(req).await.unwrap()) });
    }
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(n) = set.join_next().await {
        *per_node.entry(n.unwrap()).or_default() += 1;
    }
    assert_eq!(per_node.values().sum::<usize>(), 20);
    assert!(per_node.get("a").copied().unwrap_or(0) >= 8 && per_node.get("b").copied().unwrap_or(0) >= 8, "{per_node:?}");
}

#[tokio::test]
async fn all_in_one_sends_another_nodes_ids_to_that_node() {
    let solo = FakeAgent::new("solo", "z1", &[("p", 1 << 30)]);
    let reg = Registry::new(RegistryOptions { grace: Duration::ZERO, ..RegistryOptions::new(super::registry::tests::inert_connector()) });
    reg.add_in_process(solo.clone(), tokio::sync::broadcast::channel(4).1).await.unwrap();
    let c = ClusterController::standalone(reg);
    let d = Duration::from_secs(1);
    // A pool this node has, on another node: that node's driver must answer, never "gone".
    let theirs = DeleteVolumeRequest { volume_id: "file:other:p:x".into(), ..Default::default() };
    assert_eq!(code(c.delete(theirs, d).await), Code::Unavailable);
    // A pool this node does not have: names nothing here.
    c.delete(DeleteVolumeRequest { volume_id: "file:other:q:x".into(), ..Default::default() }, d).await.unwrap();
    let get = ControllerGetVolumeRequest { volume_id: "file:other:q:x".into() };
    assert_eq!(code(c.get_volume(get, d).await), Code::NotFound);
    let v = c.create(create_req("here", 0), Duration::from_secs(5)).await.unwrap().volume.unwrap();
    assert!(v.volume_id.starts_with("file:solo:p:"));
}

#[tokio::test]
async fn two_controllers_creating_one_name_at_once_make_one_volume() {
    // Two active replicas, each with its own registry of the same agents (their sidecars elect
    // leaders separately). Each claims the name on the candidate agents before placing; the
    // second is sent where the first places it, where the agent's own retry check answers.
    let cl = cluster();
    let lookup = cl.agents.clone();
    let connector: Connector = Arc::new(move |node: &str, _: &str| lookup[node].clone() as Arc<dyn AgentOps>);
    let reg = Registry::new(RegistryOptions { grace: Duration::ZERO, ..RegistryOptions::new(connector) });
    for a in cl.agents.values() {
        reg.register(Request::new(ap::RegisterRequest { version: Some(WIRE_VERSION), inventory: Some(a.inventory()) })).unwrap();
    }
    let other = ClusterController::new(reg);
    for round in 0..5 {
        let name = format!("shared-{round}");
        let (a, b) = tokio::join!(cl.create(create_req(&name, 1)), other.create(create_req(&name, 1), Duration::from_secs(5)));
        let (a, b) = (a.unwrap(), b.unwrap().volume.unwrap());
        assert_eq!(a.volume_id, b.volume_id, "round {round}");
        let made = cl.agents.values().flat_map(|ag| ag.names()).filter(|n| *n == name).count();
        assert_eq!(made, 1, "round {round}: one volume of the name in the cluster");
    }
}

#[tokio::test]
async fn capacity_refuses_parameters_no_pool_knows() {
    let cl = cluster();
    cl.agent("a").pools.lock().unwrap()[0].parameters = vec!["provisioning".into()];
    // The registry learns pools at registration; register a again with its parameters.
    let inv = cl.agent("a").inventory();
    cl.c.registry().register(Request::new(ap::RegisterRequest { version: Some(WIRE_VERSION), inventory: Some(inv) })).unwrap();
    let req = |k: &str| GetCapacityRequest { parameters: [(k.to_owned(), "x".to_owned())].into(), ..Default::default() };
    for ok in ["provisioning", "pool", "poolSelector", "fsType", "csi.storage.k8s.io/pvc/name"] {
        let got = cl.c.capacity(GetCapacityRequest { parameters: [(ok.to_owned(), "thin".to_owned())].into(), ..Default::default() }).await;
        assert!(!matches!(got, Err(Error::InvalidArgument(ref m)) if m.contains("unknown parameter")), "{ok}: {got:?}");
    }
    assert_eq!(code(cl.c.capacity(req("provisoning")).await), Code::InvalidArgument);
}

// issue 11: cluster
#[tokio::test]
async fn creates_over_an_authoritative_index_ask_no_agent_and_place_on_reported_room() {
    let cl = cluster();
    for i in 0..6 {
        cl.create(create_req(&format!("quiet-{i}"), 1)).await.unwrap();
    }
    let asked: usize = cl.agents.values().map(|a| a.asked.load(Ordering::SeqCst)).sum();
    assert_eq!(asked, 0, "no GetVolume / GetCapacity per create while every index is in sequence");
    // b (9 GiB) took the first creates; its room counts them although the fake never reports
    // it, so most-free moved on to a (5 GiB) once b had less.
    let on_a = cl.agent("a").names().len();
    assert!(on_a >= 1, "answered creates count against their pool until reported: {:?}", cl.agent("b").names());
    // A heartbeat ahead of the index: that node is asked before the next create is placed.
    let hb =
        ap::HeartbeatRequest { version: Some(WIRE_VERSION), node_id: "a".into(), agent_started_unix: 1, sequence: 7, ..Default::default() };
    assert!(cl.c.registry().heartbeat(Request::new(hb)).unwrap().resync);
    cl.create(create_req("after-gap", 1)).await.unwrap();
    assert_eq!(cl.agent("a").asked.load(Ordering::SeqCst), 1);
    assert_eq!(cl.agent("b").asked.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_retried_on_its_node() {
    let cl = cluster();
    // The first attempt reaches b, which makes it, but the answer is lost (b "unreachable").
    cl.agent("b").plant("slow", "lost");
    cl.c.claims.dispatched("lost", "b", "slow");
    cl.c.claims.outcome::<()>("lost", "b", "slow", &Err(Error::Unavailable("cut off".into())));
    // The retry goes to b (its agent's retry check answers), never to a fresh placement.
    let got = cl.create(with_params(create_req("lost", 1), &[("placementPolicy", "least-used")])).await.unwrap();
    assert_eq!(node_of(&got), "b");
    let made = cl.agents.values().flat_map(|a| a.names()).filter(|n| n == "lost").count();
    assert_eq!(made, 1);
}

#[tokio::test]
async fn a_volume_record_newer_than_the_controller_reads_is_served_but_reported_abnormal() {
    let cl = cluster();
    let d = Duration::from_secs(5);
    let newest = crate::pool::schema::record_schema(crate::volume_id::PoolKind::File);
    // What today's agents report: the schema their pools write (never 0 any more).
    let current = cl.agent("c").plant("bulk", "current");
    let newer = cl.agent("c").plant("bulk", "newer");
    for (id, schema) in [(&current, newest), (&newer, newest + 1)] {
        cl.agent("c").volumes.lock().unwrap().get_mut(id).unwrap().record_schema = schema;
    }
    let condition = |id: &str| {
        let id = id.to_owned();
        let c = &cl.c;
        async move { c.get_volume(ControllerGetVolumeRequest { volume_id: id }, d).await.unwrap().status.unwrap().volume_condition.unwrap() }
    };
    assert!(!condition(&current).await.abnormal);
    let cond = condition(&newer).await;
    assert!(cond.abnormal, "{cond:?}");
    let want = format!("schema {}, newer than this controller reads ({newest}): upgrade the controller", newest + 1);
    assert!(cond.message.contains(&want) && cond.message.contains("node c"), "{}", cond.message);
    let listed: BTreeMap<String, VolumeCondition> =
        cl.c.list(ListVolumesRequest::default(), d)
            .await
            .unwrap()
            .entries
            .into_iter()
            .map(|e| (e.volume.unwrap().volume_id, e.status.unwrap().volume_condition.unwrap()))
            .collect();
    assert!(listed[&newer].abnormal && listed[&newer].message.contains(&want), "{listed:?}");
    assert!(!listed[&current].abnormal);
    // Still its agent's volume: it answers the calls for it (the agent reads its own records).
    let del = DeleteVolumeRequest { volume_id: newer.clone(), ..Default::default() };
    cl.c.delete(del, d).await.unwrap();
    assert!(cl.agent("c").calls().contains(&format!("delete {newer}")));
}
