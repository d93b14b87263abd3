//! Many nodes on one machine: one `holdfast controller` and three `holdfast agent` processes,
//! each agent in a network namespace of its own (tests/common/netns.rs) with its own address,
//! node id, zone label and `file` pool (a tmpfs of its own size), all secured by mutual TLS with
//! certificates from `holdfast certs`. The tests drive the controller's CSI socket as the
//! external-provisioner would and each agent's plugin socket as its kubelet would, and check
//! what an operator would: where volumes land (ids, topology, files in the pools), what
//! capacity is reported, what happens when a node dies, comes back or is retired, when the
//! controller restarts, and who is refused.
//!
//! Timeouts are short (heartbeat 1 s, down after 3 s) so the whole file runs in about a minute.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{MIB, clean_up_dir, expect_code, ok, path_str, unique};
use holdfast::agent_proto::ListNodesRequest;
use holdfast::agent_proto::admin_client::AdminClient;
use holdfast::client::{self, Clients};
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::*;
use netns::{Net, NodeNet};
use tonic::Code;

/// The zone label key every agent reports.
const ZONE_KEY: &str = "topology.kubernetes.io/zone";
/// The node key of holdfast's topology.
const NODE_KEY: &str = "topology.holdfast.dev/node";
/// The port every agent listens on inside its own namespace (each has its own port space).
const AGENT_PORT: u16 = 7443;
/// The name the controller's certificate carries and agents check.
const CONTROLLER_NAME: &str = "holdfast-controller";
/// Heartbeat interval given to the controller (ms; it tells the agents).
const HEARTBEAT_MS: &str = "1000";
/// Silence after which the controller takes an agent for down (ms).
const DOWN_MS: &str = "3000";
/// The controller's start-up grace before it places volumes (ms).
const GRACE_MS: &str = "2000";
/// The longest any wait for the cluster to settle may take (debug binaries on a loaded host).
const SETTLE: Duration = Duration::from_secs(45);

/// One simulated node: its id, zone and pool size.
#[derive(Debug, Clone)]
struct NodeSpec {
    id: &'static str,
    zone: &'static str,
    pool_mib: u64,
}

/// The three nodes of the main cluster: two zones, three pool sizes.
const NODES: [NodeSpec; 3] = [
    NodeSpec { id: "node-a", zone: "zone-1", pool_mib: 512 },
    NodeSpec { id: "node-b", zone: "zone-1", pool_mib: 256 },
    NodeSpec { id: "node-c", zone: "zone-2", pool_mib: 128 },
];

/// A child process with its log and how to start it again.
struct Proc {
    what: String,
    log: PathBuf,
    child: Option<Child>,
    /// Builds the command line (a fresh `Command` each start).
    make: Box<dyn Fn() -> Command + Send + Sync>,
}

impl Proc {
    fn start(what: &str, log: PathBuf, make: Box<dyn Fn() -> Command + Send + Sync>) -> Proc {
        let mut p = Proc { what: what.to_owned(), log, child: None, make };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.what);
        let out = File::options().create(true).append(true).open(&self.log).expect("open log");
        let err = out.try_clone().expect("dup log");
        let child = (self.make)()
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.what));
        self.child = Some(child);
    }

    /// SIGKILL, as a node that loses power; waits until it is gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it exited (and how), without waiting.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL after a few seconds.
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(c.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One agent: its node, namespace, directories and process.
struct Agent {
    spec: NodeSpec,
    dir: PathBuf,
    proc: Proc,
}

impl Agent {
    fn pool_dir(&self) -> PathBuf {
        self.dir.join("pool")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("csi.sock")
    }

    /// The volumes its pool holds, by their metadata files (a volume exists exactly when its
    /// `.json` does: src/pool/file/mod.rs).
    fn volume_files(&self) -> BTreeSet<String> {
        let Ok(rd) = std::fs::read_dir(self.pool_dir().join("volumes")) else { return BTreeSet::new() };
        rd.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
            .collect()
    }

    /// CSI clients on its plugin socket (Identity + Node), as its kubelet connects.
    async fn clients(&self) -> Clients {
        let endpoint = format!("unix://{}", self.socket().display());
        let deadline = Instant::now() + SETTLE;
        loop {
            if self.socket().exists()
                && let Ok(c) = Clients::connect(&endpoint).await
            {
                return c;
            }
            assert!(Instant::now() < deadline, "{} never served {endpoint}; log:\n{}", self.spec.id, self.proc.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How a cluster is started beyond the defaults.
#[derive(Default, Clone)]
struct Options {
    /// Environment of the controller process.
    controller_env: Vec<(String, String)>,
    /// A second controller replica, active at the same time (agents register with both).
    two_controllers: bool,
    /// The heartbeat interval and down timeout (ms) instead of HEARTBEAT_MS and DOWN_MS.
    heartbeat: Option<(&'static str, &'static str)>,
}

/// A controller and its agents, with everything they use under one temp dir; Drop stops the
/// processes, unmounts what is mounted under the dir (pools, stagings, publishes) and removes
/// the namespaces.
struct Cluster {
    // Field order is drop order after `Drop::drop`: processes are stopped there first.
    agents: Vec<Agent>,
    controller: Proc,
    controller_socket: PathBuf,
    /// The second replica and its CSI socket (Options::two_controllers).
    second: Option<(Proc, PathBuf)>,
    /// What agents get as `--controller`: every replica's Registry address.
    registry_addrs: String,
    retired_file: PathBuf,
    certs: PathBuf,
    net: Net,
    tmp: tempfile::TempDir,
}

/// Runs `holdfast certs ARGS`, failing the test on an error.
fn certs(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("certs").args(args).output().expect("run holdfast certs");
    assert!(out.status.success(), "holdfast certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A free TCP port on `ip` (bound and released: nothing else binds this test's own address).
fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0)).expect("bind for a free port").local_addr().unwrap().port()
}

/// TLS flags for a process whose certificate directory is `dir`.
fn tls_args(dir: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        path_str(&dir.join("tls.crt")),
        "--tls-key".into(),
        path_str(&dir.join("tls.key")),
        "--tls-ca".into(),
        path_str(&dir.join("ca.crt")),
    ]
}

/// `holdfast controller` NAME serving CSI on `socket` and the Registry on `addr`, with the
/// cluster's certificates and retired-nodes file (its log and state under `tmp`).
fn controller_proc(tmp: &Path, name: &str, socket: &Path, addr: SocketAddrV4, retired: &Path, certs_dir: &Path, opts: &Options) -> Proc {
    let (socket, listen, retired, tls) = (socket.to_owned(), addr.to_string(), retired.to_owned(), tls_args(&certs_dir.join("controller")));
    let env = opts.controller_env.clone();
    let (heartbeat, down) = opts.heartbeat.unwrap_or((HEARTBEAT_MS, DOWN_MS));
    let state = tmp.join(format!("{name}-state"));
    Proc::start(
        name,
        tmp.join(format!("{name}.log")),
        Box::new(move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_holdfast"));
            cmd.arg("controller")
                .args(["--endpoint", &format!("unix://{}", socket.display())])
                .args(["--listen", &listen])
                .arg("--retired-nodes")
                .arg(&retired)
                .arg("--state-dir")
                .arg(&state)
                .args(["--heartbeat-ms", heartbeat, "--down-after-ms", down, "--startup-grace-ms", GRACE_MS])
                // Per-node certificates: each must name the node id it registers.
                .arg("--tls-per-node")
                .args(&tls)
                .envs(env.iter().map(|(k, v)| (k, v)));
            cmd
        }),
    )
}

impl Cluster {
    /// Namespaces for `extra` more agents than `specs` are made too (for impostors).
    async fn start(specs: &[NodeSpec], extra: usize, opts: Options) -> Cluster {
        let tmp = tempfile::Builder::new().prefix("holdfast-multinode-").tempdir_in("/var/tmp").expect("temp dir");
        let net = Net::new(specs.len() + extra).unwrap_or_else(|e| panic!("network namespaces: {e}"));
        let certs_dir = tmp.path().join("certs");
        std::fs::create_dir(&certs_dir).unwrap();
        let c = |s: &str| path_str(&certs_dir.join(s));
        certs(&["ca", "--out", &c("ca")]);
        let host_ip = net.host_ip().to_string();
        certs(&["node", "--ca", &c("ca"), "--node-id", CONTROLLER_NAME, "--san", &host_ip, "--out", &c("controller")]);
        let controller_addr = SocketAddrV4::new(net.host_ip(), free_port(net.host_ip()));
        let retired_file = tmp.path().join("retired-nodes");
        std::fs::write(&retired_file, "# node ids, one a line\n").unwrap();
        let controller_socket = tmp.path().join("controller.sock");
        let controller = controller_proc(tmp.path(), "controller", &controller_socket, controller_addr, &retired_file, &certs_dir, &opts);
        let mut registry_addrs = controller_addr.to_string();
        let second = opts.two_controllers.then(|| {
            let addr = SocketAddrV4::new(net.host_ip(), free_port(net.host_ip()));
            registry_addrs.push_str(&format!(",{addr}"));
            let socket = tmp.path().join("controller-2.sock");
            (controller_proc(tmp.path(), "controller-2", &socket, addr, &retired_file, &certs_dir, &opts), socket)
        });
        let mut cluster =
            Cluster { agents: Vec::new(), controller, controller_socket, second, registry_addrs, retired_file, certs: certs_dir, net, tmp };
        for (i, spec) in specs.iter().enumerate() {
            cluster.add_agent(i, spec.clone(), spec.id, &[]);
        }
        cluster
    }

    fn node_net(&self, i: usize) -> NodeNet {
        self.net.node(i).clone()
    }

    /// Makes the certificate of `cert_name` (signed by `ca`, `ca` default), a tmpfs pool of
    /// the spec's size, the config, and starts `holdfast agent --node-id node_id` in
    /// namespace `i`. `env`: extra environment of the agent.
    fn add_agent(&mut self, i: usize, spec: NodeSpec, cert_name: &str, env: &[(&str, &str)]) -> usize {
        self.add_agent_with(i, spec, cert_name, "ca", env)
    }

    fn add_agent_with(&mut self, i: usize, spec: NodeSpec, cert_name: &str, ca: &str, env: &[(&str, &str)]) -> usize {
        let net = self.node_net(i);
        let dir = self.tmp.path().join(format!("agent-{i}-{}", spec.id));
        let pool = dir.join("pool");
        std::fs::create_dir_all(&pool).unwrap();
        // A pool of its own size: a tmpfs, so its free space is exact and nobody else's.
        let size = format!("size={}m", spec.pool_mib);
        assert!(common::run("mount", &["-t", "tmpfs", "-o", &size, "holdfast-test-pool", &path_str(&pool)]), "mount the pool tmpfs");
        let cert_dir = self.certs.join(format!("agent-{i}"));
        let c = |s: &Path| path_str(s);
        if ca == "ca" {
            certs(&[
                "node",
                "--ca",
                &c(&self.certs.join("ca")),
                "--node-id",
                cert_name,
                "--san",
                &net.ip.to_string(),
                "--out",
                &c(&cert_dir),
            ]);
        } else {
            let other = self.certs.join(ca);
            if !other.exists() {
                certs(&["ca", "--out", &c(&other)]);
            }
            certs(&["node", "--ca", &c(&other), "--node-id", cert_name, "--san", &net.ip.to_string(), "--out", &c(&cert_dir)]);
            // It trusts the cluster's CA for the controller; only its own certificate is foreign.
            std::fs::copy(self.certs.join("ca/ca.crt"), cert_dir.join("ca.crt")).unwrap();
        }
        let config = dir.join("holdfast.toml");
        let text = format!(
            "[topology]\n\"{ZONE_KEY}\" = \"{}\"\n\n[[pool]]\nname = \"local\"\nkind = \"file\"\npath = \"{}\"\n",
            spec.zone,
            pool.display()
        );
        std::fs::write(&config, text).unwrap();
        let (socket, state, tls) = (dir.join("csi.sock"), dir.join("state"), tls_args(&cert_dir));
        let (controller, listen) = (self.registry_addrs.clone(), SocketAddrV4::new(net.ip, AGENT_PORT).to_string());
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let node_id = spec.id;
        let ns = net.clone();
        let proc = Proc::start(
            &format!("agent {node_id} in {}", net.ns),
            dir.join("agent.log"),
            Box::new(move || {
                let mut cmd = ns.command(env!("CARGO_BIN_EXE_holdfast"));
                cmd.arg("agent")
                    .args(["--endpoint", &format!("unix://{}", socket.display())])
                    .args(["--controller", &controller, "--listen", &listen, "--node-id", node_id])
                    .arg("--config")
                    .arg(&config)
                    .arg("--state-dir")
                    .arg(&state)
                    .args(&tls)
                    .envs(env.iter().map(|(k, v)| (k, v)));
                cmd
            }),
        );
        self.agents.push(Agent { spec, dir, proc });
        self.agents.len() - 1
    }

    fn agent(&self, id: &str) -> &Agent {
        self.agents.iter().find(|a| a.spec.id == id).expect("agent of that node")
    }

    fn agent_mut(&mut self, id: &str) -> &mut Agent {
        self.agents.iter_mut().find(|a| a.spec.id == id).expect("agent of that node")
    }

    /// The controller's CSI clients (Identity + Controller), waiting for its socket.
    async fn csi(&mut self) -> Clients {
        let endpoint = format!("unix://{}", self.controller_socket.display());
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Some(status) = self.controller.exited() {
                panic!("the controller exited with {status}; log:\n{}", self.controller.log_text());
            }
            if self.controller_socket.exists()
                && let Ok(c) = Clients::connect(&endpoint).await
            {
                return c;
            }
            assert!(Instant::now() < deadline, "the controller never served {endpoint}; log:\n{}", self.controller.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The registry as `holdfast ctl nodes` shows it: node id → state (`up`, `down`, `retired`).
    async fn node_states(&self) -> BTreeMap<String, String> {
        let channel = holdfast::endpoint::connect(&format!("unix://{}", self.controller_socket.display())).await.expect("connect");
        let resp = AdminClient::new(channel).list_nodes(ListNodesRequest {}).await.expect("Admin ListNodes");
        resp.into_inner().nodes.into_iter().filter(|n| !n.in_process).map(|n| (n.node_id, n.state)).collect()
    }

    /// Waits until the controller lists each of `nodes` up, reports capacity there and places
    /// volumes (its start-up grace is over); returns its clients.
    async fn ready(&mut self, nodes: &[&str]) -> Clients {
        let csi = self.csi().await;
        let deadline = Instant::now() + SETTLE;
        loop {
            let states = self.node_states().await;
            if nodes.iter().all(|n| states.get(*n).map(String::as_str) == Some("up")) {
                break;
            }
            assert!(Instant::now() < deadline, "nodes {nodes:?} not all up: {states:?}; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for n in nodes {
            loop {
                let cap = capacity(&csi, &node_topology(n)).await;
                if cap.as_ref().is_ok_and(|&c| c > 0) {
                    break;
                }
                if Instant::now() > deadline {
                    panic!("node {n} never showed capacity at the controller ({cap:?}); logs:\n{}", self.logs());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Past the grace, a create of a name nobody has is placed: probe with a request no
        // pool can take, which answers RESOURCE_EXHAUSTED instead of UNAVAILABLE once ready.
        loop {
            let r = csi.controller.clone().create_volume(create_request(&unique("ready-probe"), 1 << 50, None, &[])).await;
            match r {
                Err(s) if s.code() == Code::ResourceExhausted => break,
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => panic!("ready probe: expected RESOURCE_EXHAUSTED, got {:?}; logs:\n{}", other.map(|_| ()), self.logs()),
            }
        }
        csi
    }

    /// Every process's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = format!("----- controller -----\n{}", self.controller.log_text());
        if let Some((second, _)) = &self.second {
            out.push_str(&format!("----- {} -----\n{}", second.what, second.log_text()));
        }
        for a in &self.agents {
            out.push_str(&format!("----- {} -----\n{}", a.proc.what, a.proc.log_text()));
        }
        out
    }

    /// Makes the second controller replica the one `csi`, `ready` and `node_states` talk to,
    /// and the first the second (call again to swap back).
    fn swap_controllers(&mut self) {
        let (proc, socket) = self.second.as_mut().expect("a second controller");
        std::mem::swap(&mut self.controller, proc);
        std::mem::swap(&mut self.controller_socket, socket);
    }

    /// Writes the retired-nodes file.
    fn retire(&self, ids: &[&str]) {
        let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
        let tmp = self.retired_file.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.retired_file).unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // Agents first: they may hold mounts; then the controller.
        for a in &mut self.agents {
            a.proc.stop();
        }
        self.controller.stop();
        if let Some((second, _)) = &mut self.second {
            second.stop();
        }
        let left = clean_up_dir(self.tmp.path());
        if !left.is_empty() {
            eprintln!("cannot unmount {left:?}; keeping {} for inspection", self.tmp.path().display());
            let keep = tempfile::Builder::new().tempdir().unwrap();
            let old = std::mem::replace(&mut self.tmp, keep);
            let _ = old.keep();
        }
    }
}

fn node_topology(node: &str) -> Topology {
    Topology { segments: HashMap::from([(NODE_KEY.to_owned(), node.to_owned())]) }
}

fn zone_topology(zone: &str) -> Topology {
    Topology { segments: HashMap::from([(ZONE_KEY.to_owned(), zone.to_owned())]) }
}

fn cap() -> VolumeCapability {
    client::mount_capability("ext4", &[], Mode::SingleNodeWriter)
}

/// A CreateVolume request of `bytes`, with requisite / preferred topologies and parameters.
fn create_request(name: &str, bytes: i64, topology: Option<TopologyRequirement>, params: &[(&str, &str)]) -> CreateVolumeRequest {
    let params = params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let mut req = client::create_volume_request(name, CapacityRange { required_bytes: bytes, limit_bytes: 0 }, cap(), params);
    req.accessibility_requirements = topology;
    req
}

fn requirement(requisite: &[&Topology], preferred: &[&Topology]) -> Option<TopologyRequirement> {
    let all = |t: &[&Topology]| t.iter().map(|&t| t.clone()).collect();
    Some(TopologyRequirement { requisite: all(requisite), preferred: all(preferred) })
}

/// The node a volume was placed on, by its topology (checked against its id).
fn node_of(v: &Volume) -> String {
    let by_id = v.volume_id.split(':').nth(1).unwrap_or_default().to_owned();
    let by_topology: Vec<&String> = v.accessible_topology.iter().filter_map(|t| t.segments.get(NODE_KEY)).collect();
    assert_eq!(by_topology, vec![&by_id], "volume {} reports topology {:?}", v.volume_id, v.accessible_topology);
    by_id
}

async fn create(csi: &Clients, req: CreateVolumeRequest) -> Volume {
    let name = req.name.clone();
    ok(csi.controller.clone().create_volume(req).await, &format!("CreateVolume {name}")).volume.expect("a volume")
}

async fn capacity(csi: &Clients, topology: &Topology) -> Result<i64, tonic::Status> {
    let req = GetCapacityRequest { volume_capabilities: vec![cap()], accessible_topology: Some(topology.clone()), ..Default::default() };
    csi.controller.clone().get_capacity(req).await.map(|r| r.into_inner().available_capacity)
}

async fn capacity_response(csi: &Clients, topology: &Topology) -> GetCapacityResponse {
    let req = GetCapacityRequest { volume_capabilities: vec![cap()], accessible_topology: Some(topology.clone()), ..Default::default() };
    ok(csi.controller.clone().get_capacity(req).await, &format!("GetCapacity {topology:?}"))
}

async fn get_volume(csi: &Clients, id: &str) -> Result<ControllerGetVolumeResponse, tonic::Status> {
    csi.controller.clone().controller_get_volume(ControllerGetVolumeRequest { volume_id: id.to_owned() }).await.map(|r| r.into_inner())
}

async fn delete(csi: &Clients, id: &str) -> Result<(), tonic::Status> {
    csi.controller.clone().delete_volume(DeleteVolumeRequest { volume_id: id.to_owned(), ..Default::default() }).await.map(drop)
}

/// Every entry of ListVolumes, paged.
async fn list_volumes(csi: &Clients) -> Vec<list_volumes_response::Entry> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..1000 {
        let req = ListVolumesRequest { max_entries: 7, starting_token: token };
        let resp = ok(csi.controller.clone().list_volumes(req).await, "ListVolumes");
        out.extend(resp.entries);
        if resp.next_token.is_empty() {
            return out;
        }
        token = resp.next_token;
    }
    panic!("ListVolumes kept paging");
}

/// The condition ListVolumes reports for `id` (`None`: listed without one, or not listed).
fn listed_condition(entries: &[list_volumes_response::Entry], id: &str) -> Option<Option<VolumeCondition>> {
    entries
        .iter()
        .find(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == id))
        .map(|e| e.status.as_ref().and_then(|s| s.volume_condition.clone()))
}

/// Polls `check` every 200 ms until it returns `Some`, at most `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = check().await {
            return t;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// NodeStage + NodePublish (read-write) through one agent's plugin socket.
async fn mount_on(node: &Clients, id: &str, staging: &Path, target: &Path) {
    ok(node.node.clone().node_stage_volume(client::stage_request(id, &path_str(staging), cap())).await, "NodeStageVolume");
    let req = client::publish_request(id, &path_str(staging), &path_str(target), cap(), false);
    ok(node.node.clone().node_publish_volume(req).await, "NodePublishVolume");
}

/// NodeUnpublish + NodeUnstage through one agent's plugin socket.
async fn unmount_on(node: &Clients, id: &str, staging: &Path, target: &Path) {
    ok(node.node.clone().node_unpublish_volume(client::unpublish_request(id, &path_str(target))).await, "NodeUnpublishVolume");
    ok(node.node.clone().node_unstage_volume(client::unstage_request(id, &path_str(staging))).await, "NodeUnstageVolume");
}

/// The statvfs free bytes of a pool directory.
fn free_bytes(dir: &Path) -> i64 {
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    (st.blocks_available() * st.fragment_size()) as i64
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_capacity_and_node_side_across_three_nodes() {
    let mut cl = Cluster::start(&NODES, 0, Options::default()).await;
    let csi = cl.ready(&["node-a", "node-b", "node-c"]).await;
    let (a, b, c) = (node_topology("node-a"), node_topology("node-b"), node_topology("node-c"));

    // GetCapacity per node: the largest volume that node's pool takes (its free space, within
    // what the pool keeps for its own files), never more.
    let mut per_node = BTreeMap::new();
    for spec in &NODES {
        let agent = cl.agent(spec.id);
        let resp = capacity_response(&csi, &node_topology(spec.id)).await;
        let free = free_bytes(&agent.pool_dir());
        assert!(resp.available_capacity <= free, "{}: capacity {} above the pool's free {free}", spec.id, resp.available_capacity);
        assert!(resp.available_capacity > free - 16 * MIB, "{}: capacity {} far below free {free}", spec.id, resp.available_capacity);
        if let Some(max) = resp.maximum_volume_size {
            assert_eq!(max, resp.available_capacity, "{}: maximum_volume_size is the largest single volume", spec.id);
        }
        per_node.insert(spec.id, resp.available_capacity);
    }
    assert!(per_node["node-a"] > per_node["node-b"] && per_node["node-b"] > per_node["node-c"], "{per_node:?}");
    // Per zone: the largest one pool there takes, not the sum of the zone's pools.
    assert_eq!(capacity(&csi, &zone_topology("zone-1")).await.unwrap(), per_node["node-a"], "zone-1 is node-a's pool, not a sum");
    assert_eq!(capacity(&csi, &zone_topology("zone-2")).await.unwrap(), per_node["node-c"]);
    assert_eq!(capacity(&csi, &zone_topology("zone-9")).await.unwrap(), 0, "a zone without nodes");

    // Placement: requisite pins, preferred orders (before the default most-free policy, which
    // alone would pick node-a, the largest).
    let v = create(&csi, create_request(&unique("pref-b"), 8 * MIB, requirement(&[&a, &b, &c], &[&b]), &[])).await;
    assert_eq!(node_of(&v), "node-b", "preferred node-b first");
    let v = create(&csi, create_request(&unique("pref-cb"), 8 * MIB, requirement(&[&a, &b, &c], &[&c, &b]), &[])).await;
    assert_eq!(node_of(&v), "node-c", "preferred in order");
    let v = create(&csi, create_request(&unique("zone-2"), 8 * MIB, requirement(&[&zone_topology("zone-2")], &[]), &[])).await;
    assert_eq!(node_of(&v), "node-c", "requisite zone-2 is node-c only");
    let v = create(&csi, create_request(&unique("free"), 8 * MIB, None, &[])).await;
    assert_eq!(node_of(&v), "node-a", "most-free by default");
    let on_a = cl.agent("node-a").volume_files();
    assert_eq!(on_a.len(), 1, "the volume is in node-a's own pool: {on_a:?}");

    // A full node is skipped: fill node-c, then prefer it.
    // (In whole MiB: the pool rounds sizes up to its allocation unit, and GetCapacity reports
    // the exact free bytes.)
    let room_c = capacity(&csi, &c).await.unwrap() / MIB * MIB;
    let fill = create(&csi, create_request(&unique("fill-c"), room_c, requirement(&[&c], &[]), &[])).await;
    assert_eq!(node_of(&fill), "node-c");
    assert!(capacity(&csi, &c).await.unwrap() < 4 * MIB, "node-c is full");
    let v = create(&csi, create_request(&unique("skip-c"), 8 * MIB, requirement(&[&c, &b], &[&c]), &[])).await;
    assert_eq!(node_of(&v), "node-b", "the full preferred node is skipped");
    // Nothing fits: RESOURCE_EXHAUSTED, naming what was considered.
    let s = expect_code(
        csi.controller.clone().create_volume(create_request(&unique("only-c"), 8 * MIB, requirement(&[&c], &[]), &[])).await,
        Code::ResourceExhausted,
        "a create only the full node-c may take",
    );
    assert!(s.message().contains("node-c"), "the refusal names the node considered: {}", s.message());
    let s = expect_code(
        csi.controller.clone().create_volume(create_request(&unique("huge"), 4 << 30, None, &[])).await,
        Code::ResourceExhausted,
        "a create larger than every pool",
    );
    for n in ["node-a", "node-b", "node-c"] {
        assert!(s.message().contains(n), "the refusal names {n}: {}", s.message());
    }

    // 50 concurrent creates, spread over the nodes (policy `spread`), none made twice: each
    // name is sent twice at once (a provisioner's retry while the first call is in flight),
    // the answers agree (or one is ABORTED, "in progress"), the same 50 sent again answer the
    // same ids, and the pools hold exactly 50 new volumes.
    let before: usize = cl.agents.iter().map(|a| a.volume_files().len()).sum();
    let names: Vec<String> = (0..50).map(|i| unique(&format!("many-{i}"))).collect();
    let send = |names: Vec<String>, copies: usize| {
        let csi = csi.clone();
        async move {
            let calls: Vec<_> = names
                .iter()
                .flat_map(|n| std::iter::repeat_n(n.clone(), copies))
                .map(|n| {
                    let mut ctl = csi.controller.clone();
                    tokio::spawn(async move {
                        let req =
                            create_request(&n, 2 * MIB, requirement(&[&zone_topology("zone-1")], &[]), &[("placementPolicy", "spread")]);
                        (n.clone(), ctl.create_volume(req).await.map(|r| r.into_inner().volume.expect("a volume")))
                    })
                })
                .collect();
            let mut out: BTreeMap<String, Volume> = BTreeMap::new();
            for c in calls {
                let (n, r) = c.await.unwrap();
                match r {
                    Ok(v) => {
                        if let Some(seen) = out.get(&n) {
                            assert_eq!(seen.volume_id, v.volume_id, "two concurrent creates of {n} made two volumes");
                        }
                        out.insert(n, v);
                    }
                    Err(s) if s.code() == Code::Aborted && copies > 1 => {}
                    Err(s) => panic!("concurrent CreateVolume {n}: {:?} {}", s.code(), s.message()),
                }
            }
            out
        }
    };
    let first = send(names.clone(), 2).await;
    let again = send(names.clone(), 1).await;
    // Of two calls at once one proceeds; the other waits for nothing (ABORTED) or answers it.
    assert_eq!(first.len(), 50, "every name created in the first round");
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    for n in &names {
        assert_eq!(first[n].volume_id, again[n].volume_id, "{n} answered two ids");
        *by_node.entry(node_of(&first[n])).or_default() += 1;
    }
    let ids: BTreeSet<&String> = first.values().map(|v| &v.volume_id).collect();
    assert_eq!(ids.len(), 50, "50 distinct volumes");
    assert!(by_node.len() == 2 && by_node.values().all(|&k| k >= 10), "spread over node-a and node-b (zone-1): {by_node:?}");
    let after: usize = cl.agents.iter().map(|a| a.volume_files().len()).sum();
    assert_eq!(after - before, 50, "the pools hold exactly 50 new volumes");
    let listed: Vec<String> =
        list_volumes(&csi).await.into_iter().filter_map(|e| e.volume).map(|v| v.volume_id).filter(|id| ids.contains(id)).collect();
    assert_eq!(listed.len(), 50, "ListVolumes lists each of the 50 once");

    // Node side through node-b's own plugin socket: NodeGetInfo names it, stage + publish a
    // volume of node-b mounts it for the host (the kubelet's mount namespace).
    let nb = cl.agent("node-b").clients().await;
    let info = ok(nb.node.clone().node_get_info(NodeGetInfoRequest {}).await, "NodeGetInfo on node-b");
    assert_eq!(info.node_id, "node-b");
    let segs = info.accessible_topology.expect("topology").segments;
    assert_eq!((segs.get(NODE_KEY).map(String::as_str), segs.get(ZONE_KEY).map(String::as_str)), (Some("node-b"), Some("zone-1")));
    let vol = create(&csi, create_request(&unique("mounted"), 64 * MIB, requirement(&[&b], &[]), &[])).await;
    let work = cl.tmp.path().join("kubelet-b");
    let (staging, target) = (work.join("staging"), work.join("pod"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let target_s = path_str(&target.join("mount"));
    std::fs::create_dir_all(&target).unwrap();
    ok(nb.node.clone().node_stage_volume(client::stage_request(&vol.volume_id, &path_str(&staging), cap())).await, "NodeStage on node-b");
    ok(
        nb.node.clone().node_publish_volume(client::publish_request(&vol.volume_id, &path_str(&staging), &target_s, cap(), false)).await,
        "NodePublish on node-b",
    );
    common::write_durably(&target.join("mount/data"), b"written through node-b\n");
    assert!(common::is_mount_point(&target.join("mount")), "the publish is visible in the host's mount table");
    ok(nb.node.clone().node_unpublish_volume(client::unpublish_request(&vol.volume_id, &target_s)).await, "NodeUnpublish");
    ok(nb.node.clone().node_unstage_volume(client::unstage_request(&vol.volume_id, &path_str(&staging))).await, "NodeUnstage");
    assert!(!common::is_mount_point(&target.join("mount")));
    // A volume of node-c is not node-b's to stage.
    let r = nb.node.clone().node_stage_volume(client::stage_request(&fill.volume_id, &path_str(&staging), cap())).await;
    assert!(r.is_err(), "node-b staged node-c's volume");
    assert!(!common::is_mount_point(&staging));
    let on_b = cl.agent("node-b").volume_files().len();
    ok(delete(&csi, &vol.volume_id).await.map(tonic::Response::new), "DeleteVolume of node-b's volume");
    assert_eq!(cl.agent("node-b").volume_files().len(), on_b - 1, "deleted from node-b's pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_returning_and_retired_nodes_and_a_controller_restart() {
    let mut cl = Cluster::start(&NODES, 0, Options::default()).await;
    let csi = cl.ready(&["node-a", "node-b", "node-c"]).await;
    let mut on: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for n in ["node-a", "node-b", "node-c"] {
        for k in 0..2 {
            // node-b's first one is large enough for an ext4 filesystem holding data.
            let size = if (n, k) == ("node-b", 0) { 64 * MIB } else { 4 * MIB };
            let v = create(&csi, create_request(&unique(&format!("{n}-{k}")), size, requirement(&[&node_topology(n)], &[]), &[])).await;
            assert_eq!(node_of(&v), n);
            on.entry(n).or_default().push(v.volume_id);
        }
    }
    let all: BTreeSet<String> = on.values().flatten().cloned().collect();
    let b_vol = on["node-b"][0].clone();
    // Data on node-b's volume, written through node-b's plugin socket.
    let kubelet = cl.tmp.path().join("kubelet-b");
    let (staging, target) = (kubelet.join("staging"), kubelet.join("pod/mount"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let nb = cl.agent("node-b").clients().await;
    mount_on(&nb, &b_vol, &staging, &target).await;
    common::write_durably(&target.join("data"), b"kept while node-b was away\n");
    unmount_on(&nb, &b_vol, &staging, &target).await;

    // node-b loses power: within the down timeout its volumes answer UNAVAILABLE and report
    // "unreachable"; creates that need it wait (UNAVAILABLE), others go on.
    let killed = Instant::now();
    cl.agent_mut("node-b").proc.kill();
    let cond = eventually(Duration::from_secs(15), "node-b's volume abnormal", || {
        let (csi, id) = (csi.clone(), b_vol.clone());
        async move {
            let r = get_volume(&csi, &id).await.ok()?;
            let cond = r.status.and_then(|s| s.volume_condition)?;
            cond.abnormal.then_some(cond)
        }
    })
    .await;
    assert!(killed.elapsed() < Duration::from_secs(3 + 8), "abnormal after {:?}", killed.elapsed());
    assert!(cond.message.contains("node-b") && cond.message.contains("unreachable"), "condition: {}", cond.message);
    assert_eq!(cl.node_states().await.get("node-b").map(String::as_str), Some("down"), "`ctl nodes` shows node-b down");
    let listed = list_volumes(&csi).await;
    let lc = listed_condition(&listed, &b_vol).expect("node-b's volume still listed").expect("with a condition");
    assert!(lc.abnormal && lc.message.contains("unreachable"), "ListVolumes condition {lc:?}");
    let a_cond = listed_condition(&listed, &on["node-a"][0]).expect("node-a's volume listed");
    assert!(a_cond.as_ref().is_none_or(|c| !c.abnormal), "node-a's volume is healthy: {a_cond:?}");
    expect_code(
        csi.controller.clone().delete_volume(DeleteVolumeRequest { volume_id: b_vol.clone(), ..Default::default() }).await,
        Code::Unavailable,
        "DeleteVolume on a down node",
    );
    expect_code(
        csi.controller
            .clone()
            .create_volume(create_request(&unique("needs-b"), 4 * MIB, requirement(&[&node_topology("node-b")], &[]), &[]))
            .await,
        Code::Unavailable,
        "a create whose only candidate is down",
    );
    let v = create(&csi, create_request(&unique("on-a"), 4 * MIB, requirement(&[&node_topology("node-a")], &[]), &[])).await;
    assert_eq!(node_of(&v), "node-a", "a create that does not need node-b goes on");
    ok(delete(&csi, &v.volume_id).await.map(tonic::Response::new), "DeleteVolume on node-a");

    // node-b comes back with its pool: healthy again, its volumes intact.
    cl.agent_mut("node-b").proc.spawn();
    eventually(SETTLE, "node-b's volume healthy again", || {
        let (csi, id) = (csi.clone(), b_vol.clone());
        async move {
            let r = get_volume(&csi, &id).await.ok()?;
            r.status.and_then(|s| s.volume_condition).is_none_or(|c| !c.abnormal).then_some(())
        }
    })
    .await;
    assert_eq!(cl.node_states().await.get("node-b").map(String::as_str), Some("up"));
    let got = get_volume(&csi, &b_vol).await.expect("ControllerGetVolume of node-b's volume");
    assert_eq!(got.volume.as_ref().map(|v| v.capacity_bytes), Some(64 * MIB), "its volume, as it was");
    assert_eq!(cl.agent("node-b").volume_files().len(), 2);
    let nb = cl.agent("node-b").clients().await;
    mount_on(&nb, &b_vol, &staging, &target).await;
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"kept while node-b was away\n", "its data intact");
    unmount_on(&nb, &b_vol, &staging, &target).await;

    // The controller restarts (kill -9): the registry is rebuilt from registrations, and no
    // volume is lost or listed twice; a retried create finds its volume, not a new one.
    cl.controller.kill();
    cl.controller.spawn();
    let csi = cl.ready(&["node-a", "node-b", "node-c"]).await;
    let ids: Vec<String> = list_volumes(&csi).await.into_iter().filter_map(|e| e.volume).map(|v| v.volume_id).collect();
    let listed: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), listed.len(), "no volume listed twice: {ids:?}");
    assert_eq!(listed, all, "every volume known again after the restart");
    let files: usize = cl.agents.iter().map(|a| a.volume_files().len()).sum();
    assert_eq!(files, 6, "no volume made or lost in the pools");

    // node-c is retired (gone for good): its volumes are deletable, listed "node retired",
    // and placement never picks it; an agent registering as node-c is refused.
    cl.agent_mut("node-c").proc.kill();
    cl.retire(&["node-c"]);
    let c_vol = on["node-c"][0].clone();
    eventually(Duration::from_secs(20), "node-c's volumes listed as retired", || {
        let (csi, id) = (csi.clone(), c_vol.clone());
        async move {
            let listed = list_volumes(&csi).await;
            let c = listed_condition(&listed, &id)??;
            (c.abnormal && c.message.contains("retired")).then_some(())
        }
    })
    .await;
    assert_eq!(cl.node_states().await.get("node-c").map(String::as_str), Some("retired"));
    ok(delete(&csi, &c_vol).await.map(tonic::Response::new), "DeleteVolume of a retired node's volume");
    ok(delete(&csi, &c_vol).await.map(tonic::Response::new), "DeleteVolume of it again");
    let listed: BTreeSet<String> = list_volumes(&csi).await.into_iter().filter_map(|e| e.volume).map(|v| v.volume_id).collect();
    assert!(!listed.contains(&c_vol), "a deleted volume of a retired node is no longer listed");
    let r = csi
        .controller
        .clone()
        .create_volume(create_request(&unique("zone-2"), 4 * MIB, requirement(&[&zone_topology("zone-2")], &[]), &[]))
        .await;
    assert!(r.is_err(), "placed on the retired node-c: {r:?}");
    cl.agent_mut("node-c").proc.spawn();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = csi
        .controller
        .clone()
        .create_volume(create_request(&unique("zone-2"), 4 * MIB, requirement(&[&zone_topology("zone-2")], &[]), &[]))
        .await;
    assert!(r.is_err(), "a retired node's agent was accepted again: {r:?}");
    assert_eq!(cl.node_states().await.get("node-c").map(String::as_str), Some("retired"), "still retired");
    assert_eq!(capacity(&csi, &node_topology("node-c")).await.unwrap_or(0), 0, "no capacity on a retired node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_a_valid_identity_or_version_are_refused() {
    // The controller speaks wire version 1.1 (test-only override, debug builds): today's
    // agents, 1.0, are the previous minor version and must be accepted.
    let opts = Options { controller_env: vec![("HOLDFAST_TEST_WIRE_VERSION".into(), "1.1".into())], ..Default::default() };
    let mut cl = Cluster::start(&NODES[..1], 6, opts).await;
    let csi = cl.ready(&["node-a"]).await;
    let small = |id| NodeSpec { id, zone: "zone-1", pool_mib: 64 };

    // 1: a certificate from another CA, for a node of its own.
    cl.add_agent_with(1, small("node-x"), "node-x", "other-ca", &[]);
    // 2: a valid certificate naming node-y, claiming to be node-v (per-node certificates
    // bind the name to the node id).
    cl.add_agent(2, small("node-v"), "node-y", &[]);
    // 3: a second valid certificate of node-a (as a shared or re-issued one would be), from
    // another address while node-a is live.
    cl.add_agent(3, small("node-a"), "node-a", &[]);
    // 4: two minor versions away from the controller's (1.3 against 1.1).
    cl.add_agent(4, small("node-z"), "node-z", &[("HOLDFAST_TEST_WIRE_VERSION", "1.3")]);
    // 5: the control: a valid agent started with them, which must be accepted, so the
    // refusals are not mere slowness.
    cl.add_agent(5, small("node-w"), "node-w", &[]);
    // 6: one minor version newer (1.2): accepted, which also proves the controller really
    // speaks 1.1 (a 1.0 controller would refuse 1.2, and a 1.2 one would refuse 1.0's node-a).
    cl.add_agent(6, small("node-u"), "node-u", &[("HOLDFAST_TEST_WIRE_VERSION", "1.2")]);
    cl.ready(&["node-w", "node-u"]).await;
    // Several heartbeats later, none of the refused is known.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let states = cl.node_states().await;
    for n in ["node-x", "node-v", "node-z"] {
        assert_eq!(states.get(n), None, "{n} is in the registry: {states:?}; logs:\n{}", cl.logs());
        assert_eq!(capacity(&csi, &node_topology(n)).await.unwrap_or(0), 0, "{n} was accepted; logs:\n{}", cl.logs());
    }
    assert_eq!(states.get("node-a").map(String::as_str), Some("up"));
    assert_eq!(states.get("node-u").map(String::as_str), Some("up"));
    // The operator sees each refusal in the controller's log, naming the node.
    let log = cl.controller.log_text();
    for n in ["node-v", "node-a", "node-z"] {
        assert!(log.lines().any(|l| l.contains("refused") && l.contains(n)), "no refusal of {n} in the controller's log:\n{log}");
    }
    assert!(
        log.lines().any(|l| l.contains("refused a connection") && l.contains(&cl.node_net(1).ip.to_string())),
        "the foreign certificate's handshake"
    );
    // Volumes of node-a land in the real node-a's pool, never in the second claimant's.
    for i in 0..3 {
        let v = create(&csi, create_request(&unique(&format!("a-{i}")), 4 * MIB, requirement(&[&node_topology("node-a")], &[]), &[])).await;
        assert_eq!(node_of(&v), "node-a");
    }
    assert_eq!(cl.agents[0].volume_files().len(), 3, "in the real node-a's pool");
    assert_eq!(cl.agents[3].volume_files().len(), 0, "nothing in the second claimant's pool");
    let v = create(&csi, create_request(&unique("w"), 4 * MIB, requirement(&[&node_topology("node-w")], &[]), &[])).await;
    assert_eq!(cl.agents[5].volume_files().len(), 1, "the control agent serves");
    ok(delete(&csi, &v.volume_id).await.map(tonic::Response::new), "DeleteVolume on node-w");
}

#[test]
fn the_split_harness_gives_nfs_pools_to_the_controller_and_the_rest_to_the_agent() {
    let text = "allowed_path_prefixes = [\"/var/lib/kubelet\"]\n[topology]\nzone = \"z1\"\n\
                [[pool]]\nname = \"share\"\nkind = \"nfs\"\nserver = \"10.0.0.1\"\nexport = \"/srv\"\n\
                [[pool]]\nname = \"disk\"\nkind = \"file\"\npath = \"/var/lib/holdfast\"\n";
    let (controller, agent) = common::split::split_config(text);
    let names = |t: &str| -> Vec<String> {
        let t: toml::Table = t.parse().unwrap();
        t.get("pool").and_then(|p| p.as_array()).into_iter().flatten().filter_map(|p| p.get("name")?.as_str().map(str::to_owned)).collect()
    };
    assert_eq!(names(&controller), ["share"]);
    assert_eq!(names(&agent), ["disk"]);
    let agent_table: toml::Table = agent.parse().unwrap();
    assert!(agent_table.get("topology").is_some() && agent_table.get("allowed_path_prefixes").is_some());
    assert!(!controller.contains("topology"), "{controller}");
    // Local pools only: the controller's config is empty.
    let (controller, agent) = common::split::split_config("[[pool]]\nname = \"d\"\nkind = \"file\"\npath = \"/x\"\n");
    assert_eq!(controller.trim(), "");
    assert_eq!(names(&agent), ["d"]);
}

// issue 11: cluster
/// A CreateVolume as the external-provisioner sends it: retried while the answer is ABORTED
/// or UNAVAILABLE (contention, a claim held by the other replica), up to `within`.
async fn create_retrying(csi: &Clients, req: CreateVolumeRequest, within: Duration) -> Result<Volume, tonic::Status> {
    let deadline = Instant::now() + within;
    loop {
        match csi.controller.clone().create_volume(req.clone()).await {
            Ok(r) => return Ok(r.into_inner().volume.expect("a volume")),
            Err(s) if matches!(s.code(), Code::Aborted | Code::Unavailable) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// Two active controller replicas (their sidecars elect leaders separately) and three agents
/// registered with both: creates of one name through both at once, many rounds, each make
/// one volume and answer both callers its id, even while one replica also places other
/// volumes (so the two see different room); a replica killed with -9 in the middle of a
/// create leaves the name to the other, and once back answers the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_active_controllers_make_one_volume_of_one_name() {
    let nodes = [
        NodeSpec { id: "node-a", zone: "zone-1", pool_mib: 256 },
        NodeSpec { id: "node-b", zone: "zone-1", pool_mib: 256 },
        NodeSpec { id: "node-c", zone: "zone-2", pool_mib: 256 },
    ];
    let mut cluster = Cluster::start(&nodes, 0, Options { two_controllers: true, ..Default::default() }).await;
    let ids = ["node-a", "node-b", "node-c"];
    let one = cluster.ready(&ids).await;
    cluster.swap_controllers();
    let two = cluster.ready(&ids).await;
    cluster.swap_controllers();
    let within = Duration::from_secs(30);
    let volumes_named = |cluster: &Cluster, name: &str| -> usize {
        // Each volume's record in its pool names its CSI name.
        let quoted = format!("\"{name}\"");
        cluster
            .agents
            .iter()
            .map(|a| {
                let dir = a.pool_dir().join("volumes");
                a.volume_files().iter().filter(|f| std::fs::read_to_string(dir.join(f)).is_ok_and(|t| t.contains(&quoted))).count()
            })
            .sum()
    };
    for round in 0..30 {
        let name = unique(&format!("shared-{round}"));
        let req = create_request(&name, MIB, None, &[]);
        // Replica one also places a bigger volume at that moment: its room differs from two's.
        let filler = create_request(&unique(&format!("filler-{round}")), 8 * MIB, None, &[]);
        let (a, b, f) = tokio::join!(
            create_retrying(&one, req.clone(), within),
            create_retrying(&two, req.clone(), within),
            create_retrying(&one, filler, within)
        );
        let (a, b) = (
            a.unwrap_or_else(|e| panic!("round {round}, replica one: {e:?}")),
            b.unwrap_or_else(|e| panic!("round {round}, replica two: {e:?}")),
        );
        f.unwrap_or_else(|e| panic!("round {round}, filler: {e:?}"));
        assert_eq!(a.volume_id, b.volume_id, "round {round}: both callers get the same volume");
        assert_eq!(volumes_named(&cluster, &name), 1, "round {round}: one volume of {name} in the cluster; logs:\n{}", cluster.logs());
    }

    // Replica two is killed -9 while its create is on the way; replica one then creates the
    // name: one volume, and replica two, back, answers the same id.
    let name = unique("orphan");
    let req = create_request(&name, MIB, None, &[]);
    let pending = {
        let two = two.clone();
        let req = req.clone();
        tokio::spawn(async move { two.controller.clone().create_volume(req).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    cluster.second.as_mut().unwrap().0.kill();
    let _ = pending.await;
    let made = create_retrying(&one, req.clone(), within).await.expect("replica one creates it");
    assert_eq!(volumes_named(&cluster, &name), 1, "one volume after the kill; logs:\n{}", cluster.logs());
    cluster.second.as_mut().unwrap().0.spawn();
    cluster.swap_controllers();
    let two = cluster.ready(&ids).await;
    cluster.swap_controllers();
    let again = create_retrying(&two, req, within).await.expect("replica two, restarted");
    assert_eq!(again.volume_id, made.volume_id);
    assert_eq!(volumes_named(&cluster, &name), 1);
}

/// The health of `pool` on `node` as the controller's registry has it (`holdfast ctl nodes`).
async fn pool_health(cl: &Cluster, node: &str, pool: &str) -> (holdfast::agent_proto::PoolHealth, String) {
    let channel = holdfast::endpoint::connect(&format!("unix://{}", cl.controller_socket.display())).await.expect("connect");
    let resp = AdminClient::new(channel).list_nodes(ListNodesRequest {}).await.expect("Admin ListNodes").into_inner();
    let n = resp.nodes.into_iter().find(|n| n.node_id == node).unwrap_or_else(|| panic!("node {node} is not in the registry"));
    let p = n.pools.into_iter().find(|p| p.name == pool).unwrap_or_else(|| panic!("pool {pool} is not listed on {node}"));
    (p.health(), p.health_message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_health_change_reaches_the_controller_at_once() {
    use holdfast::agent_proto::PoolHealth;
    // Heartbeats a minute apart (and down only after three minutes): what the controller
    // learns within seconds came as a change, not with a heartbeat. The agent's own periodic
    // pass over its pools runs every 15 s; the waits below are far shorter.
    let opts = Options { heartbeat: Some(("60000", "180000")), ..Default::default() };
    let mut cl = Cluster::start(&NODES[..1], 0, opts).await;
    let csi = cl.ready(&["node-a"]).await;
    let v = create(&csi, create_request(&unique("health"), 4 * MIB, None, &[])).await;
    assert_eq!(pool_health(&cl, "node-a", "local").await.0, PoolHealth::Healthy);
    let within = Duration::from_secs(3);

    // The pool's directory goes away (as a filesystem that is not mounted any more). The agent
    // notices on its next look at the pool: here the controller's ListVolumes, which the agent
    // answers from its pools, listing the volume abnormal.
    // (A listing first: a sick pool's volumes are listed as the agent last listed them.)
    assert!(listed_condition(&list_volumes(&csi).await, &v.volume_id).is_some(), "the volume is listed");
    let volumes = cl.agent("node-a").pool_dir().join("volumes");
    let away = cl.agent("node-a").pool_dir().join("volumes.away");
    std::fs::rename(&volumes, &away).unwrap();
    let noticed = Instant::now();
    let listed = listed_condition(&list_volumes(&csi).await, &v.volume_id).expect("the volume is listed").expect("with a condition");
    assert!(listed.abnormal && listed.message.contains("pool local"), "{listed:?}");
    let cl_ref = &cl;
    let message = eventually(within, "the controller hears the pool is unavailable", || async move {
        let (health, message) = pool_health(cl_ref, "node-a", "local").await;
        (health == PoolHealth::Unavailable).then_some(message)
    })
    .await;
    let took = noticed.elapsed();
    assert!(message.contains("missing"), "the operator is told why: {message}");
    // Nothing is placed on it: the node's capacity is gone at the controller too.
    assert_eq!(capacity(&csi, &node_topology("node-a")).await.expect("GetCapacity"), 0, "capacity of a sick pool");
    eprintln!("unavailable at the controller {took:?} after the agent noticed");

    // Back: the next look reports it healthy, again at once.
    std::fs::rename(&away, &volumes).unwrap();
    let back = Instant::now();
    let listed = listed_condition(&list_volumes(&csi).await, &v.volume_id).expect("the volume is listed").expect("with a condition");
    assert!(!listed.abnormal, "{listed:?}");
    eventually(within, "the controller hears the pool is back", || async move {
        (pool_health(cl_ref, "node-a", "local").await.0 == PoolHealth::Healthy).then_some(())
    })
    .await;
    eprintln!("healthy at the controller {:?} after the agent noticed", back.elapsed());
    assert!(capacity(&csi, &node_topology("node-a")).await.expect("GetCapacity") > 0, "the pool's room is back");
    ok(delete(&csi, &v.volume_id).await.map(tonic::Response::new), "DeleteVolume");
}
