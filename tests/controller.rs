//! `holdfast controller` with real `holdfast agent` processes on this machine (plain text on
//! loopback, `--insecure`), driven over the controller's CSI socket as the external-provisioner
//! would: placement by topology, routing by id, capacity per segment, an agent killed and
//! back, a controller restarted, and the agents it must refuse. Each agent has its own `file`
//! pool in the test's temp dir; the multi-node test with network namespaces and TLS is
//! tests/multinode.rs.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holdfast::agent_proto::admin_client::AdminClient;
use holdfast::agent_proto::{ListNodesRequest, NodeStatus};
use holdfast::proto::controller_client::ControllerClient;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use holdfast::proto::*;
use tonic::Code;
use tonic::transport::Channel;

const NODE_KEY: &str = "topology.holdfast.dev/node";
const MIB: i64 = 1 << 20;
/// Heartbeats every 200 ms, down after 1.5 s: the test's timeouts.
const HEARTBEAT_MS: &str = "200";
const DOWN_AFTER: Duration = Duration::from_millis(1500);

/// A child process killed (and reaped) when dropped; its log printed if the test failed.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(args: &[String], log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open log");
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn holdfast");
        Proc { child, log: log.to_owned() }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} -----\n{}", self.log.display(), self.log_text());
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One controller and its agents, in one temp dir.
struct Cluster {
    dir: tempfile::TempDir,
    registry: String,
    grace_ms: u64,
    /// Mutual TLS with per-node certificates (made by `holdfast certs` under `certs/`), or plain.
    tls: bool,
    /// Under TLS, the controller's flags for agents sharing one certificate (`holdfast-agent`,
    /// as the deploy files ship) instead of `--tls-per-node`.
    shared_cert: Option<Vec<String>>,
    controller: Option<Proc>,
    agents: BTreeMap<String, Proc>,
    csi: Option<Channel>,
}

impl Cluster {
    async fn start(grace_ms: u64) -> Cluster {
        Cluster::start_with(grace_ms, false).await
    }

    async fn start_with(grace_ms: u64, tls: bool) -> Cluster {
        Cluster::start_tls(grace_ms, tls, None).await
    }

    async fn start_tls(grace_ms: u64, tls: bool, shared_cert: Option<Vec<String>>) -> Cluster {
        let dir = tempfile::Builder::new().prefix("holdfast-controller-").tempdir().unwrap();
        std::fs::write(dir.path().join("retired"), "# gone for good\n").unwrap();
        let mut c = Cluster {
            registry: format!("127.0.0.1:{}", free_port()),
            grace_ms,
            tls,
            shared_cert,
            dir,
            controller: None,
            agents: BTreeMap::new(),
            csi: None,
        };
        if tls {
            let certs = c.path("certs");
            let run = |args: &[&str]| {
                let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).args(args).output().unwrap();
                assert!(out.status.success(), "holdfast {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            };
            let ca = certs.join("ca");
            run(&["certs", "ca", "--out", ca.to_str().unwrap()]);
            for (name, san) in [("holdfast-controller", Some("127.0.0.1")), ("n1", None), ("n2", None), ("holdfast-agent", None)] {
                let out = certs.join(name);
                let mut args = vec!["certs", "node", "--ca", ca.to_str().unwrap(), "--node-id", name, "--out", out.to_str().unwrap()];
                if let Some(san) = san {
                    args.extend(["--san", san]);
                }
                run(&args);
            }
        }
        c.start_controller().await;
        c
    }

    /// The TLS flags of a process presenting the certificate `name` (plain: `--insecure`).
    fn tls_args(&self, name: &str) -> Vec<String> {
        if !self.tls {
            return vec!["--insecure".into()];
        }
        let d = self.path("certs").join(name);
        ["tls.crt", "tls.key", "ca.crt"]
            .iter()
            .zip(["--tls-cert", "--tls-key", "--tls-ca"])
            .map(|(f, flag)| format!("{flag}={}", d.join(f).display()))
            .collect()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn start_controller(&mut self) {
        let socket = self.path("controller.sock");
        let args: Vec<String> = [
            "controller",
            &format!("--endpoint=unix://{}", socket.display()),
            &format!("--listen={}", self.registry),
            &format!("--heartbeat-ms={HEARTBEAT_MS}"),
            &format!("--down-after-ms={}", DOWN_AFTER.as_millis()),
            &format!("--startup-grace-ms={}", self.grace_ms),
            &format!("--retired-nodes={}", self.path("retired").display()),
            &format!("--state-dir={}", self.path("controller-state").display()),
        ]
        .map(String::from)
        .to_vec();
        let mut args = args;
        args.extend(self.tls_args("holdfast-controller"));
        match (&self.shared_cert, self.tls) {
            (Some(flags), true) => args.extend(flags.iter().cloned()),
            (None, true) => args.push("--tls-per-node".into()),
            _ => {}
        }
        let proc = Proc::spawn(&args, &self.path("controller.log"));
        self.controller = Some(proc);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if socket.exists() {
                if let Ok(ch) = holdfast::endpoint::connect(&format!("unix://{}", socket.display())).await {
                    self.csi = Some(ch);
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the controller did not serve; its log:\n{}", self.controller_log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn controller_log(&self) -> String {
        self.controller.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// Starts the agent of `node` (zone `zone`, one file pool `pool-<node>`) listening on `port`.
    fn start_agent(&mut self, key: &str, node: &str, zone: &str, port: u16) {
        self.start_agent_with_cert(key, node, zone, port, node);
    }

    /// As [`Cluster::start_agent`], presenting the certificate made for `cert`.
    fn start_agent_with_cert(&mut self, key: &str, node: &str, zone: &str, port: u16, cert: &str) {
        let pool = self.path(&format!("pool-{node}"));
        std::fs::create_dir_all(&pool).unwrap();
        let config = self.path(&format!("{node}.toml"));
        std::fs::write(
            &config,
            format!("[topology]\nzone = \"{zone}\"\n\n[[pool]]\nname = \"pool-{node}\"\nkind = \"file\"\npath = \"{}\"\n", pool.display()),
        )
        .unwrap();
        let args: Vec<String> = [
            "agent",
            &format!("--endpoint=unix://{}", self.path(&format!("{key}.sock")).display()),
            &format!("--controller={}", self.registry),
            &format!("--listen=127.0.0.1:{port}"),
            &format!("--node-id={node}"),
            &format!("--config={}", config.display()),
            &format!("--state-dir={}", self.path(&format!("{key}-state")).display()),
        ]
        .map(String::from)
        .to_vec();
        let mut args = args;
        args.extend(self.tls_args(cert));
        let proc = Proc::spawn(&args, &self.path(&format!("{key}.log")));
        self.agents.insert(key.to_owned(), proc);
    }

    fn controller_client(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.csi.clone().expect("controller started"))
    }

    async fn nodes(&self) -> BTreeMap<String, NodeStatus> {
        let mut admin = AdminClient::new(self.csi.clone().unwrap());
        admin.list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes.into_iter().map(|n| (n.node_id.clone(), n)).collect()
    }

    /// Waits until `node` is in `state` in the registry.
    async fn until_state(&self, node: &str, state: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.nodes().await.get(node).is_some_and(|n| n.state == state) {
                return;
            }
            assert!(Instant::now() < deadline, "node {node} not {state} within {within:?}; nodes {:?}", self.nodes().await.keys());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn create(&self, req: CreateVolumeRequest) -> Result<Volume, tonic::Status> {
        self.controller_client().create_volume(req).await.map(|r| r.into_inner().volume.unwrap())
    }
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn topo(pairs: &[(&str, &str)]) -> Topology {
    Topology { segments: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
}

fn request(name: &str, bytes: i64, requisite: Vec<Topology>, preferred: Vec<Topology>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap()],
        accessibility_requirements: Some(TopologyRequirement { requisite, preferred }),
        ..Default::default()
    }
}

fn node_of(v: &Volume) -> String {
    v.volume_id.split(':').nth(1).unwrap().to_owned()
}

async fn two_agents(grace_ms: u64) -> Cluster {
    let mut c = Cluster::start(grace_ms).await;
    c.start_agent("n1", "n1", "z1", free_port());
    c.start_agent("n2", "n2", "z2", free_port());
    for n in ["n1", "n2"] {
        c.until_state(n, "up", Duration::from_secs(30)).await;
    }
    c
}

#[tokio::test]
async fn volumes_are_placed_by_topology_and_routed_to_their_agent() {
    let c = two_agents(0).await;
    let on_z2 = c.create(request("in-z2", 64 * MIB, vec![topo(&[("zone", "z2")])], vec![])).await.unwrap();
    assert_eq!(node_of(&on_z2), "n2");
    assert_eq!(on_z2.accessible_topology[0].segments[NODE_KEY], "n2");
    let preferred = c.create(request("pref-n1", 64 * MIB, vec![], vec![topo(&[(NODE_KEY, "n1")])])).await.unwrap();
    assert_eq!(node_of(&preferred), "n1");
    // A retry answers the same volume; the index names where it is.
    let again = c.create(request("pref-n1", 64 * MIB, vec![], vec![topo(&[(NODE_KEY, "n2")])])).await.unwrap();
    assert_eq!(again.volume_id, preferred.volume_id);
    // The same name required elsewhere is another volume.
    let moved = c.create(request("pref-n1", 64 * MIB, vec![topo(&[(NODE_KEY, "n2")])], vec![])).await.unwrap_err();
    assert_eq!(moved.code(), Code::AlreadyExists, "{moved:?}");
    // Nothing fits: every pool considered is named with its reason.
    let huge = c.create(request("huge", 1 << 60, vec![], vec![])).await.unwrap_err();
    assert_eq!(huge.code(), Code::ResourceExhausted);
    assert!(huge.message().contains("pool \"pool-n1\" on node \"n1\"") && huge.message().contains("pool-n2"), "{}", huge.message());

    // The files are in the chosen node's pool only.
    let files = |node: &str| std::fs::read_dir(c.path(&format!("pool-{node}/volumes"))).map(|d| d.count()).unwrap_or(0);
    assert!(files("n2") > 0 && files("n1") > 0);

    // Capacity per node and per zone: one pool's largest volume, never the sum of both.
    let cap = |segment: Option<Topology>| {
        let mut ctl = c.controller_client();
        async move {
            ctl.get_capacity(GetCapacityRequest {
                volume_capabilities: vec![mount_cap()],
                accessible_topology: segment,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let n1 = cap(Some(topo(&[(NODE_KEY, "n1")]))).await.available_capacity;
    let z2 = cap(Some(topo(&[("zone", "z2")]))).await.available_capacity;
    let any = cap(None).await;
    assert!(n1 > 0 && z2 > 0);
    // Both pools are on the test's file system, whose free space others change meanwhile:
    // anywhere is about the best single pool, and far from the sum of both.
    let best = n1.max(z2);
    assert!((any.available_capacity - best).abs() < best / 100, "anywhere {} vs the best pool {best}", any.available_capacity);
    assert!(any.available_capacity < (n1 + z2) * 3 / 4, "anywhere {} looks like a sum of {n1} and {z2}", any.available_capacity);
    assert_eq!(any.maximum_volume_size, Some(any.available_capacity));
    assert_eq!(cap(Some(topo(&[(NODE_KEY, "n9")]))).await.available_capacity, 0);

    let listed = c.controller_client().list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    let ids: Vec<String> = listed.entries.iter().map(|e| e.volume.clone().unwrap().volume_id).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    for v in [&on_z2, &preferred] {
        assert!(ids.contains(&v.volume_id));
        c.controller_client().delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await.unwrap();
    }
    assert!(c.controller_client().list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.is_empty());

    // `holdfast ctl nodes` shows both up with their pools.
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["ctl", "--json", &format!("--endpoint=unix://{}", c.path("controller.sock").display()), "nodes"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let nodes: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(nodes.len(), 2, "{text}");
    for n in &nodes {
        assert_eq!(n["state"], "up", "{n}");
        assert!(n["pools"][0]["free_bytes"].as_u64().unwrap() > 0, "{n}");
    }
}

#[tokio::test]
async fn a_killed_agent_is_down_then_back_with_its_volumes() {
    let mut c = two_agents(0).await;
    let v = c.create(request("kept", 64 * MIB, vec![topo(&[(NODE_KEY, "n1")])], vec![])).await.unwrap();
    let port = c.nodes().await["n1"].address.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    drop(c.agents.remove("n1"));
    c.until_state("n1", "down", DOWN_AFTER * 3).await;

    let mut ctl = c.controller_client();
    let got = ctl.controller_get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await.unwrap().into_inner();
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.starts_with("node n1 unreachable since "), "{cond:?}");
    let listed = ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries[0].status.clone().unwrap().volume_condition.unwrap().abnormal);
    let del = ctl.delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(del.code(), Code::Unavailable, "{del:?}");
    // A create n1 could hold waits for it; one outside it goes on.
    let blocked = c.create(request("new", 64 * MIB, vec![], vec![])).await.unwrap_err();
    assert_eq!(blocked.code(), Code::Unavailable, "{blocked:?}");
    let z2 = c.create(request("new-z2", 64 * MIB, vec![topo(&[("zone", "z2")])], vec![])).await.unwrap();
    assert_eq!(node_of(&z2), "n2");

    c.start_agent("n1", "n1", "z1", port);
    c.until_state("n1", "up", Duration::from_secs(30)).await;
    let got = ctl.controller_get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await.unwrap().into_inner();
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal, "back, and healthy");
    for id in [&v.volume_id, &z2.volume_id] {
        ctl.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.unwrap();
    }
}

#[tokio::test]
async fn a_restarted_controller_rebuilds_its_registry() {
    let mut c = two_agents(1500).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let v = c.create(request("survivor", 64 * MIB, vec![], vec![topo(&[(NODE_KEY, "n2")])])).await.unwrap();
    drop(c.controller.take());
    c.start_controller().await;
    let early = c.create(request("survivor", 64 * MIB, vec![], vec![])).await.unwrap_err();
    assert_eq!(early.code(), Code::Unavailable, "during the start-up grace: {early:?}");
    for n in ["n1", "n2"] {
        c.until_state(n, "up", Duration::from_secs(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(1600)).await;
    // Found again through the rebuilt index: not made a second time on n1.
    let again = c.create(request("survivor", 64 * MIB, vec![], vec![topo(&[(NODE_KEY, "n1")])])).await.unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    let listed = c.controller_client().list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 1, "{:?}", listed.entries);
    c.controller_client().delete_volume(DeleteVolumeRequest { volume_id: v.volume_id, ..Default::default() }).await.unwrap();
}

#[tokio::test]
async fn agents_claiming_a_taken_or_retired_node_id_are_refused() {
    let mut c = two_agents(0).await;
    let first = c.nodes().await["n1"].address.clone();
    // A second live agent claiming n1 from another address.
    c.start_agent("impostor", "n1", "z1", free_port());
    // Retired: listed, then started.
    std::fs::write(c.path("retired"), "# gone for good\nold\n").unwrap();
    c.until_state("old", "retired", Duration::from_secs(10)).await;
    c.start_agent("old", "old", "z1", free_port());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = c.controller_log();
        let impostor = log.lines().any(|l| l.contains("refused an agent's registration") && l.contains("AlreadyExists"));
        let retired = log.lines().any(|l| l.contains("refused an agent's registration") && l.contains("retired"));
        if impostor && retired {
            break;
        }
        assert!(Instant::now() < deadline, "no refusal logged; controller log:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes = c.nodes().await;
    assert_eq!(nodes["n1"].address, first, "the first agent keeps its node id");
    assert_eq!(nodes["n1"].state, "up");
    assert_eq!(nodes["old"].state, "retired");
    assert!(nodes["old"].pools.is_empty(), "a retired node's agent never registered: {:?}", nodes["old"]);
}

#[tokio::test]
async fn with_per_node_certificates_an_agent_must_present_its_own() {
    let mut c = Cluster::start_with(0, true).await;
    c.start_agent("n1", "n1", "z1", free_port());
    c.until_state("n1", "up", Duration::from_secs(30)).await;
    // Node n3 presenting n2's certificate (valid, of the cluster CA, but not n3's).
    c.start_agent_with_cert("n3", "n3", "z1", free_port(), "n2");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.controller_log().lines().any(|l| l.contains("refused an agent's registration") && l.contains("PermissionDenied")) {
        assert!(Instant::now() < deadline, "no refusal logged; controller log:\n{}", c.controller_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!c.nodes().await.contains_key("n3"));
    // The controller dials n1 over mutual TLS, checking n1's own certificate.
    let v = c.create(request("over-tls", 64 * MIB, vec![], vec![])).await.unwrap();
    assert_eq!(node_of(&v), "n1");
    c.controller_client().delete_volume(DeleteVolumeRequest { volume_id: v.volume_id, ..Default::default() }).await.unwrap();
}

/// The TLS setup the deploy files ship: every agent presents the one certificate
/// `holdfast-agent` (docs/operations.md makes it with `holdfast certs`, the cert-manager
/// component as a Certificate), and the controller checks that name when it dials an agent, with
/// the flag deploy/kubernetes/base/controller.yaml gives it. Without the flag it checks for the
/// node id, and no call reaches an agent although the agents register.
#[tokio::test(flavor = "multi_thread")]
async fn the_shared_agent_certificate_of_the_deploy_files_reaches_the_agents() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/base/controller.yaml")).unwrap();
    let flag = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("- --agent-server-name="))
        .expect("deploy/kubernetes/base/controller.yaml gives the controller --agent-server-name");
    assert_eq!(flag, "holdfast-agent", "the name of the agents' shared certificate");
    let mut c = Cluster::start_tls(0, true, Some(vec![format!("--agent-server-name={flag}")])).await;
    c.start_agent_with_cert("n1", "n1", "z1", free_port(), "holdfast-agent");
    c.until_state("n1", "up", Duration::from_secs(30)).await;
    let v = c.create(request("shared-cert", 64 * MIB, vec![], vec![])).await.unwrap();
    assert_eq!(node_of(&v), "n1");
    c.controller_client().delete_volume(DeleteVolumeRequest { volume_id: v.volume_id, ..Default::default() }).await.unwrap();
    drop(c);

    let mut c = Cluster::start_tls(0, true, Some(vec![])).await;
    c.start_agent_with_cert("n1", "n1", "z1", free_port(), "holdfast-agent");
    c.until_state("n1", "up", Duration::from_secs(30)).await;
    let err = c.create(request("shared-cert", 64 * MIB, vec![], vec![])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}
