//! The split topology of the harness: with `HOLDFAST_TOPOLOGY=split`, a [`super::Driver`] is
//! `holdfast controller` plus one `holdfast agent` instead of `holdfast all-in-one`, on
//! loopback with `--insecure`, so the same suites check that the hop between them changes
//! nothing a CSI client sees. The CSI clients talk Identity and Controller to the controller's
//! socket (as the external-provisioner does) and Node to the agent's (as the kubelet does).
//!
//! The config under test is split as a cluster deploys it: `nfs` pools go to the controller
//! (it serves them; agents learn them when they register), everything else to the agent.
//! Each driver gets a loopback address of its own (`127.X.Y.Z`), so parallel tests and runs
//! never race for ports.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use holdfast::agent_proto::ListNodesRequest;
use holdfast::agent_proto::admin_client::AdminClient;
use holdfast::client::Clients;
use holdfast::proto::*;
use tonic::Code;
use tonic::transport::Channel;

/// Which processes a [`super::Driver`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// `holdfast all-in-one` (the default).
    AllInOne,
    /// `holdfast controller` + `holdfast agent`.
    Split,
}

/// The topology `HOLDFAST_TOPOLOGY` names (`all-in-one`, the default, or `split`).
pub fn topology() -> Topology {
    match std::env::var("HOLDFAST_TOPOLOGY").as_deref() {
        Err(_) | Ok("") | Ok("all-in-one") => Topology::AllInOne,
        Ok("split") => Topology::Split,
        Ok(other) => panic!("HOLDFAST_TOPOLOGY={other:?}: use all-in-one or split"),
    }
}

/// Test timings of the controller (ms): heartbeats twice a second, half a second of start-up
/// grace (the time it gives agents to register before it places volumes), and a minute of
/// silence before the agent counts as down: the suite does not test dead nodes
/// (tests/multinode.rs does), and in the software-emulated VM a busy agent's heartbeats can
/// lag by seconds.
const HEARTBEAT_MS: &str = "500";
const GRACE_MS: &str = "500";
const DOWN_AFTER_MS: &str = "60000";
/// The controller's and the agent's ports on the driver's own loopback address.
const CONTROLLER_PORT: u16 = 7440;
const AGENT_PORT: u16 = 7441;

/// The controller of a split driver; the agent is the driver's own child.
#[derive(Debug)]
pub struct Split {
    /// The controller's CSI socket.
    pub socket: PathBuf,
    /// The controller's log.
    pub log: PathBuf,
    controller: Option<Child>,
    address: String,
    controller_config: PathBuf,
    agent_config: PathBuf,
    state: PathBuf,
}

/// A loopback address no other driver of this machine uses now: from the process id and a
/// counter (127.0.0.0/8 is loopback as a whole on Linux).
fn own_loopback() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    format!("127.{}.{}.{}", 1 + (pid >> 8) % 254, pid % 256, 1 + n % 250)
}

impl Split {
    /// Prepares the controller's half in `dir` for the config at `config`.
    pub fn new(dir: &Path, config: &Path) -> Split {
        let text = std::fs::read_to_string(config).unwrap_or_else(|e| panic!("read {}: {e}", config.display()));
        let (controller_text, agent_text) = split_config(&text);
        let controller_config = dir.join("controller.toml");
        let agent_config = dir.join("agent.toml");
        std::fs::write(&controller_config, controller_text).expect("write the controller's config");
        std::fs::write(&agent_config, agent_text).expect("write the agent's config");
        Split {
            socket: dir.join("controller.sock"),
            log: dir.join("controller.log"),
            controller: None,
            address: own_loopback(),
            controller_config,
            agent_config,
            state: dir.join("controller-state"),
        }
    }

    /// The controller's endpoint.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Starts the controller (appending to its log).
    pub fn spawn_controller(&mut self) {
        assert!(self.controller.is_none(), "the controller is already running");
        let out = File::options().create(true).append(true).open(&self.log).expect("open the controller log");
        let err = out.try_clone().expect("dup the controller log");
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .arg("controller")
            .args(["--endpoint", &self.endpoint()])
            .args(["--listen", &format!("{}:{CONTROLLER_PORT}", self.address)])
            .arg("--config")
            .arg(&self.controller_config)
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--heartbeat-ms", HEARTBEAT_MS, "--startup-grace-ms", GRACE_MS, "--down-after-ms", DOWN_AFTER_MS, "--insecure"])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn holdfast controller");
        self.controller = Some(child);
    }

    /// The agent's command line (the driver adds its own arguments, environment and output):
    /// the agent of node `node_id` on `endpoint`.
    pub fn agent_command(&self, endpoint: &str, node_id: &str, state_dir: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_holdfast"));
        cmd.arg("agent")
            .args(["--endpoint", endpoint, "--node-id", node_id])
            .args(["--controller", &format!("{}:{CONTROLLER_PORT}", self.address)])
            .args(["--listen", &format!("{}:{AGENT_PORT}", self.address)])
            .arg("--config")
            .arg(&self.agent_config)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--insecure");
        cmd
    }

    /// The controller's exit status, if it exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.controller.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.controller.as_ref().map(Child::id)
    }

    /// Takes the child (to signal or reap it).
    pub fn take(&mut self) -> Option<Child> {
        self.controller.take()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Clients of a split driver: Identity and Controller on the controller's socket, Node
    /// on the agent's channel. Waits until the controller has the agent's pools and places
    /// volumes (its start-up grace is over).
    pub async fn clients(&mut self, node: Channel, node_id: &str, deadline: Instant) -> Clients {
        let controller = loop {
            if let Some(status) = self.exited() {
                panic!("holdfast controller exited during start-up with {status}; its log:\n{}", self.log_text());
            }
            if self.socket.exists() {
                let endpoint = self.endpoint();
                let connected = super::background().spawn(async move { holdfast::endpoint::connect(&endpoint).await }).await;
                if let Ok(Ok(ch)) = connected {
                    break ch;
                }
            }
            assert!(Instant::now() < deadline, "holdfast controller did not listen on {}; its log:\n{}", self.endpoint(), self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let admin = AdminClient::new(controller.clone());
        let started = Instant::now();
        let mut clients = Clients::new(controller);
        clients.node = holdfast::proto::node_client::NodeClient::new(node);
        self.wait_ready(&clients, admin, node_id, deadline).await;
        if started.elapsed() > Duration::from_secs(10) {
            eprintln!("split driver: the controller was ready {:?} after its socket", started.elapsed());
        }
        clients
    }

    /// Until the controller lists the agent up (`holdfast ctl nodes`), GetCapacity on its node
    /// is positive and a create that nothing can hold answers RESOURCE_EXHAUSTED (not
    /// UNAVAILABLE: the controller's start-up grace, waiting for agents to register).
    async fn wait_ready(&self, clients: &Clients, mut admin: AdminClient<Channel>, node_id: &str, deadline: Instant) {
        loop {
            let nodes = admin.list_nodes(ListNodesRequest {}).await.map(|r| r.into_inner().nodes);
            if nodes.as_ref().is_ok_and(|n| n.iter().any(|n| n.node_id == node_id && n.state == "up")) {
                break;
            }
            assert!(Instant::now() < deadline, "the controller never listed agent {node_id} up ({nodes:?}); its log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let topology = holdfast::proto::Topology { segments: [(super::TOPOLOGY_NODE_KEY.to_owned(), node_id.to_owned())].into() };
        loop {
            let req = GetCapacityRequest { accessible_topology: Some(topology.clone()), ..Default::default() };
            let cap = clients.controller.clone().get_capacity(req).await.map(|r| r.into_inner().available_capacity);
            if cap.as_ref().is_ok_and(|&c| c > 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the controller never reported the agent's capacity ({cap:?}); its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        loop {
            let cap = holdfast::client::mount_capability("", &[], volume_capability::access_mode::Mode::SingleNodeWriter);
            let name = super::unique("split-ready-probe");
            let req = holdfast::client::create_volume_request(
                &name,
                CapacityRange { required_bytes: 1 << 50, limit_bytes: 0 },
                cap,
                Default::default(),
            );
            match clients.controller.clone().create_volume(req).await {
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(s) if s.code() == Code::ResourceExhausted || s.code() == Code::OutOfRange => return,
                other => {
                    panic!("split start-up probe: expected RESOURCE_EXHAUSTED, got {other:?}; the controller's log:\n{}", self.log_text())
                }
            }
        }
    }
}

/// Splits a config file: (the controller's: its `nfs` pools; the agent's: everything else).
/// Top-level keys (topology, allowed path prefixes) stay with the agent, the node they
/// describe.
pub fn split_config(text: &str) -> (String, String) {
    let mut table: toml::Table = text.parse().expect("the config under test is TOML");
    let pools = match table.remove("pool") {
        Some(toml::Value::Array(a)) => a,
        _ => Vec::new(),
    };
    let is_nfs = |p: &toml::Value| p.get("kind").and_then(|k| k.as_str()) == Some("nfs");
    let (nfs, local): (Vec<toml::Value>, Vec<toml::Value>) = pools.into_iter().partition(is_nfs);
    let mut controller = toml::Table::new();
    if !nfs.is_empty() {
        controller.insert("pool".into(), toml::Value::Array(nfs));
    }
    let mut agent = table;
    if !local.is_empty() {
        agent.insert("pool".into(), toml::Value::Array(local));
    }
    (controller.to_string(), agent.to_string())
}
