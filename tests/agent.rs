//! `holdfast agent`, the real binary: it registers with a controller (here a small Registry
//! server inside the test that records what it receives), heartbeats, reports each change with
//! consecutive sequence numbers, and serves the Agent API, driven here with
//! [`RemoteAgent`] exactly as the controller drives it. With mutual TLS a caller without a
//! certificate of the cluster CA is refused. Only `file` pools (a plain temporary directory)
//! are used, so this runs on any host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast::agent::AgentOps;
use holdfast::agent::remote::RemoteAgent;
use holdfast::agent_proto::registry_server::{Registry, RegistryServer};
use holdfast::agent_proto::{self as ap, WIRE_VERSION};
use holdfast::error::Error;
use holdfast::proto;
use holdfast::tls::{ClientTls, TlsFiles};
use tonic::{Request, Response, Status};

const BUDGET: Duration = Duration::from_secs(20);
const M: i64 = 1 << 20;

/// What the test's controller received.
#[derive(Default)]
struct Seen {
    registrations: Vec<ap::RegisterRequest>,
    heartbeats: Vec<ap::HeartbeatRequest>,
    changes: Vec<ap::Change>,
}

/// A Registry that accepts every agent and records everything.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Seen>>);

#[tonic::async_trait]
impl Registry for Recorder {
    async fn register(&self, req: Request<ap::RegisterRequest>) -> Result<Response<ap::RegisterResponse>, Status> {
        self.0.lock().unwrap().registrations.push(req.into_inner());
        // The nfs pool a node may mount (nothing is mounted until a volume of it is staged).
        let shared =
            ap::NfsPool { name: "shared".into(), server: "nfs.invalid".into(), export: "/exports/k8s".into(), ..Default::default() };
        Ok(Response::new(ap::RegisterResponse { version: Some(WIRE_VERSION), heartbeat_interval_ms: 200, nfs_pools: vec![shared] }))
    }

    async fn heartbeat(&self, req: Request<ap::HeartbeatRequest>) -> Result<Response<ap::HeartbeatResponse>, Status> {
        self.0.lock().unwrap().heartbeats.push(req.into_inner());
        Ok(Response::new(ap::HeartbeatResponse { resync: false }))
    }

    async fn report_changes(&self, req: Request<ap::ReportChangesRequest>) -> Result<Response<ap::ReportChangesResponse>, Status> {
        self.0.lock().unwrap().changes.extend(req.into_inner().changes);
        Ok(Response::new(ap::ReportChangesResponse { resync: false }))
    }
}

impl Recorder {
    /// Serves on a free loopback port (plain text); answers the address.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let svc = RegistryServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        addr
    }

    /// Waits up to 30 s for `done` to hold of what was received.
    async fn wait_for(&self, what: &str, done: impl Fn(&Seen) -> bool) {
        let until = Instant::now() + Duration::from_secs(30);
        while !done(&self.0.lock().unwrap()) {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A loopback address nobody listens on right now.
fn free_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// One `holdfast agent` process, killed when dropped.
struct AgentProcess {
    child: Child,
    log: PathBuf,
    listen: String,
}

impl AgentProcess {
    fn start(dir: &Path, node: &str, controller: &str, security: &[&str]) -> AgentProcess {
        let pool = dir.join("pool");
        std::fs::create_dir_all(&pool).unwrap();
        let config = dir.join("holdfast.toml");
        std::fs::write(
            &config,
            format!("[[pool]]\nname = \"p\"\nkind = \"file\"\npath = \"{}\"\nlabels = {{ tier = \"gold\" }}\n", pool.display()),
        )
        .unwrap();
        let listen = free_address();
        let log = dir.join("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .arg("agent")
            .args(["--endpoint", &format!("unix://{}", dir.join("csi.sock").display())])
            .args(["--controller", controller, "--listen", &listen, "--node-id", node])
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(security)
            .env("HOLDFAST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start holdfast agent");
        AgentProcess { child, log, listen }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the Agent API accepts connections.
    async fn wait_listening(&mut self) {
        let until = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&self.listen).await.is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("holdfast agent exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < until, "the Agent API never listened:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn create(name: &str) -> proto::CreateVolumeRequest {
    use proto::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    proto::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(proto::CapacityRange { required_bytes: 8 * M, limit_bytes: 0 }),
        volume_capabilities: vec![proto::VolumeCapability {
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }],
        ..Default::default()
    }
}

fn pinned(pool: &str, name: &str) -> ap::CreateVolumeRequest {
    ap::CreateVolumeRequest { pool: pool.into(), request: Some(create(name)), ..Default::default() }
}

fn by_name(name: &str) -> ap::GetVolumeRequest {
    ap::GetVolumeRequest { key: Some(ap::get_volume_request::Key::CsiName(name.into())), pools: vec![] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registers_reports_its_changes_and_serves_the_agent_api() {
    let tmp = tempfile::tempdir().unwrap();
    let controller = Recorder::default();
    let addr = controller.serve().await;
    let mut agent = AgentProcess::start(tmp.path(), "n1", &addr, &["--insecure"]);
    agent.wait_listening().await;

    controller.wait_for("the registration", |s| !s.registrations.is_empty()).await;
    let reg = controller.0.lock().unwrap().registrations[0].clone();
    assert_eq!(reg.version, Some(WIRE_VERSION));
    let inv = reg.inventory.unwrap();
    assert_eq!(inv.node_id, "n1");
    assert_eq!(inv.advertised_address, agent.listen, "--advertise defaults to --listen");
    assert_eq!(inv.segments.get("topology.holdfast.dev/node").map(String::as_str), Some("n1"));
    assert_eq!(inv.pools.len(), 1);
    let pool = &inv.pools[0];
    assert_eq!((pool.name.as_str(), pool.kind.as_str()), ("p", "file"));
    assert_eq!(pool.labels.get("tier").map(String::as_str), Some("gold"));
    assert_eq!(pool.health, ap::PoolHealth::Healthy as i32);
    assert!(pool.capacity.as_ref().unwrap().largest_volume_bytes > 8 * M as u64);
    assert!(inv.volumes.is_empty());
    controller.wait_for("heartbeats at the interval the controller asked", |s| s.heartbeats.len() >= 3).await;
    let hb = controller.0.lock().unwrap().heartbeats[0].clone();
    assert_eq!((hb.node_id.as_str(), hb.sequence, hb.agent_started_unix), ("n1", inv.sequence, inv.agent_started_unix));
    assert_eq!(hb.pools.len(), 1);

    let remote = RemoteAgent::new("n1", &agent.listen, "n1", None);
    let v = remote.create_volume(pinned("p", "pv-a"), BUDGET).await.unwrap().volume.unwrap();
    assert!(v.volume_id.starts_with("file:n1:p:"), "{}", v.volume_id);
    let again = remote.create_volume(pinned("p", "pv-a"), BUDGET).await.expect("a retry is idempotent").volume.unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    let err = remote.create_volume(pinned("elsewhere", "pv-b"), BUDGET).await.unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("not a pool of node n1")), "{err}");
    let found = remote.get_volume(by_name("pv-a"), BUDGET).await.unwrap().volume.expect("found by its CSI name");
    assert_eq!(found.volume.unwrap().volume_id, v.volume_id);
    assert_eq!((found.pool.as_str(), found.csi_name.as_str()), ("p", "pv-a"));
    let listed = remote.list_volumes(ap::ListVolumesRequest::default(), BUDGET).await.unwrap();
    assert_eq!(listed.volumes.len(), 1);
    remote.delete_volume(proto::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }, BUDGET).await.unwrap();
    assert!(remote.get_volume(by_name("pv-a"), BUDGET).await.unwrap().volume.is_none(), "deleted");

    // Exactly one creation and one deletion, numbered on from the inventory; each followed by
    // the pool's room after it (issue 11: cluster), so the controller never asks for it.
    controller.wait_for("the changes", |s| s.changes.len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let changes = controller.0.lock().unwrap().changes.clone();
    let seqs: Vec<u64> = changes.iter().map(|c| c.sequence).collect();
    assert_eq!(seqs, (inv.sequence + 1..=inv.sequence + changes.len() as u64).collect::<Vec<_>>(), "{changes:?}");
    let room = |c: &ap::Change| matches!(&c.change, Some(ap::change::Change::PoolCapacity(p)) if p.pool == "p");
    assert!(room(changes.last().unwrap()), "the room after the delete: {changes:?}");
    let last_room = changes.iter().rev().find_map(|c| match &c.change {
        Some(ap::change::Change::PoolCapacity(p)) => Some(p.clone()),
        _ => None,
    });
    assert_eq!(last_room.map(|p| (p.volume_count, p.used_bytes)), Some((0, 0)), "{changes:?}");
    let changes: Vec<ap::Change> = changes.into_iter().filter(|c| !room(c)).collect();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(matches!(&changes[0].change, Some(ap::change::Change::VolumeCreated(c)) if c.csi_name == "pv-a"), "{changes:?}");
    assert!(matches!(&changes[1].change, Some(ap::change::Change::VolumeDeleted(d)) if d.csi_name == "pv-a"), "{changes:?}");
    let last = controller.0.lock().unwrap().heartbeats.len();
    controller.wait_for("a heartbeat after the changes", |s| s.heartbeats.len() > last + 1).await;
    let sequence = controller.0.lock().unwrap().changes.last().unwrap().sequence;
    assert_eq!(controller.0.lock().unwrap().heartbeats.last().unwrap().sequence, sequence, "heartbeats carry the last sequence");

    // The plugin socket serves Identity and Node for this node, not Controller.
    let mut csi = holdfast::client::Clients::connect(&format!("unix://{}", tmp.path().join("csi.sock").display())).await.unwrap();
    let info = csi.node.node_get_info(proto::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, "n1");
    let refused = csi.controller.create_volume(create("pv-c")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
    // ... and advertises only that (issue 11: cluster): no CONTROLLER_SERVICE, so a CO never
    // sends controller calls to an agent.
    let caps = csi.identity.get_plugin_capabilities(proto::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(proto::plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(!services.contains(&(proto::plugin_capability::service::Type::ControllerService as i32)), "{services:?}");
    assert!(services.contains(&(proto::plugin_capability::service::Type::VolumeAccessibilityConstraints as i32)), "{services:?}");
    // The controller's nfs pools are learnt; a volume of any other nfs pool is not served here,
    // so a hand-made PV cannot point the node at an arbitrary server.
    assert!(agent.log().contains("nfs pools from the controller") && agent.log().contains("shared"), "{}", agent.log());
    let stage = |id: &str| proto::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: tmp.path().join("staging").display().to_string(),
        volume_capability: create("x").volume_capabilities.pop(),
        ..Default::default()
    };
    let err = csi.node.node_stage_volume(stage("nfs:-:elsewhere:pvc-1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("not served by this node"), "{err:?}");

    // A dead agent is UNAVAILABLE, naming the node and its address.
    drop(agent);
    let err = remote.get_inventory(Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(&err, Error::Unavailable(m) if m.contains("node n1") && m.contains("unreachable")), "{err}");
}

fn certs(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("certs").args(args).output().expect("run holdfast certs");
    assert!(out.status.success(), "holdfast certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn files(dir: &Path) -> TlsFiles {
    TlsFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key"), ca: dir.join("ca.crt") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_agent_refuses_a_caller_without_a_valid_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_str().unwrap().to_owned();
    certs(&["ca", "--out", &p("ca")]);
    certs(&["node", "--ca", &p("ca"), "--node-id", "n2", "--san", "127.0.0.1", "--out", &p("n2")]);
    certs(&["node", "--ca", &p("ca"), "--node-id", "holdfast-controller", "--out", &p("controller")]);
    certs(&["ca", "--out", &p("other-ca")]);
    certs(&["node", "--ca", &p("other-ca"), "--node-id", "holdfast-controller", "--out", &p("impostor")]);
    let dir = tmp.path().join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let n2 = files(&tmp.path().join("n2"));
    let tls = ["--tls-cert", n2.cert.to_str().unwrap(), "--tls-key", n2.key.to_str().unwrap(), "--tls-ca", n2.ca.to_str().unwrap()];
    // No controller listens there: registration retries in the background, the API serves.
    let mut agent = AgentProcess::start(&dir, "n2", &free_address(), &tls);
    agent.wait_listening().await;

    let client = |dir: &str| Some(Arc::new(ClientTls::client(files(&tmp.path().join(dir))).unwrap()));
    let trusted = RemoteAgent::new("n2", &agent.listen, "n2", client("controller"));
    let inv = trusted.get_inventory(BUDGET).await.expect("a certificate of the cluster CA is let in");
    assert_eq!(inv.node_id, "n2");

    for (what, caller) in [
        ("another CA's certificate", RemoteAgent::new("n2", &agent.listen, "n2", client("impostor"))),
        ("no certificate (plain text)", RemoteAgent::new("n2", &agent.listen, "n2", None)),
    ] {
        let err = caller.get_inventory(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_) | Error::DeadlineExceeded(_)), "{what}: {err}");
        let created = caller.create_volume(pinned("p", "intruder"), Duration::from_secs(5)).await;
        assert!(created.is_err(), "{what}: a create went through");
    }
    let listed = trusted.list_volumes(ap::ListVolumesRequest::default(), BUDGET).await.unwrap();
    assert!(listed.volumes.is_empty(), "a refused caller made a volume: {listed:?}");
    assert!(agent.log().contains("refused a connection"), "the refusal is logged:\n{}", agent.log());
}

#[test]
fn an_agent_refuses_insecure_on_a_routable_address_and_a_wildcard_without_advertise() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("holdfast.toml");
    std::fs::write(&config, format!("[[pool]]\nname = \"p\"\nkind = \"file\"\npath = \"{}\"\n", tmp.path().join("pool").display()))
        .unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .arg("agent")
            .args(["--endpoint", &format!("unix://{}", tmp.path().join("csi.sock").display()), "--node-id", "n3", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .args(extra)
            .output()
            .unwrap()
    };
    struct Case {
        name: &'static str,
        args: &'static [&'static str],
        want: &'static str,
    }
    let cases = [
        Case {
            name: "insecure to a routable controller",
            args: &["--insecure", "--controller", "10.0.0.1:9100", "--listen", "127.0.0.1:0"],
            want: "10.0.0.1:9100",
        },
        Case {
            name: "wildcard listen without advertise",
            args: &["--insecure", "--controller", "127.0.0.1:9100", "--listen", "0.0.0.0:0"],
            want: "--advertise",
        },
        Case { name: "neither TLS nor insecure", args: &["--controller", "127.0.0.1:9100", "--listen", "127.0.0.1:0"], want: "--tls-cert" },
    ];
    for c in cases {
        let out = run(c.args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: started", c.name);
        assert!(err.contains(c.want), "{}: {err}", c.name);
    }
}
