//! Shared harness for the integration tests: starts the real `holdfast all-in-one` binary on a
//! Unix socket in a temp dir and talks CSI to it, as csi-sanity, the kubelet or the
//! external-provisioner would.
//!
//! The pool under test comes from the environment, so the same suite runs against every kind:
//! - `HOLDFAST_TEST_CONFIG`: a config file whose first `[[pool]]` is used (shared by all tests
//!   of the run); default: a fresh `file` pool in each driver's temp dir.
//! - `HOLDFAST_TEST_FS`: the filesystem stage tests ask for (default `ext4`).
//! - `HOLDFAST_TOPOLOGY=split`: `holdfast controller` + one `holdfast agent` instead of
//!   all-in-one ([`split`]).
//!
//! Dropping a [`Driver`] first undoes, through the driver, whatever the helpers published,
//! staged and created that the test did not undo (a failed test); then it stops the driver
//! (SIGTERM), prints its log if the test failed, unmounts whatever is still mounted under the
//! temp dir, detaches loop devices backed by files there, and only then removes the dir. So a
//! failing test leaves no mounts, loops or volumes behind, even in a shared pool.

// Each integration test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod split;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use holdfast::client::{self, Clients};
use holdfast::proto::controller_client::ControllerClient;
use holdfast::proto::controller_service_capability::rpc::Type as CtrlCap;
use holdfast::proto::identity_client::IdentityClient;
use holdfast::proto::node_client::NodeClient;
use holdfast::proto::node_service_capability::rpc::Type as NodeCap;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

/// The driver name every test expects.
pub const DRIVER_NAME: &str = "csi.holdfast.dev";
/// The topology key holding the node id.
pub const TOPOLOGY_NODE_KEY: &str = "topology.holdfast.dev/node";
/// The node id the harness gives every driver.
pub const NODE_ID: &str = "conformance-node";
/// 1 MiB.
pub const MIB: i64 = 1 << 20;

/// How long the driver gets to create its socket. Generous: in the TCG test VM on a loaded
/// host, loading the debug binary alone takes 5 to 15 s.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the driver gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The pool the tests provision from.
#[derive(Debug, Clone)]
pub struct PoolUnderTest {
    /// The pool's name (sent as the `pool` parameter).
    pub name: String,
    /// Its kind (`file`, `lvm`, …).
    pub kind: String,
    /// The config file given to the driver.
    pub config: PathBuf,
    /// True when the harness made the pool for this driver alone: then the test may assume it
    /// sees every volume and snapshot in it (exact counts), which a shared pool cannot promise.
    pub owned: bool,
}

/// A driver prepared but not started yet: lets a test put things in place (a stale socket)
/// before the process starts.
pub struct Setup {
    tmp: TempDir,
    /// The socket path the driver will listen on.
    pub socket: PathBuf,
    pool: PoolUnderTest,
    launch: Launch,
}

/// Extra command-line arguments and environment of the driver process (kept for restarts).
#[derive(Debug, Clone, Default)]
struct Launch {
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Setup {
    /// A temp dir holding the config (or the env's config), socket path and log.
    pub fn new() -> Setup {
        let tmp = tempfile::Builder::new().prefix("holdfast-test-").tempdir().expect("create temp dir");
        let socket = tmp.path().join("csi.sock");
        let pool = match std::env::var_os("HOLDFAST_TEST_CONFIG") {
            Some(path) => pool_from_config(Path::new(&path)),
            None => {
                let dir = tmp.path().join("pool");
                std::fs::create_dir(&dir).expect("create pool dir");
                let config = tmp.path().join("holdfast.toml");
                let text = format!("[[pool]]\nname = \"conformance\"\nkind = \"file\"\npath = \"{}\"\n", dir.display());
                std::fs::write(&config, text).expect("write config");
                PoolUnderTest { name: "conformance".into(), kind: "file".into(), config, owned: true }
            }
        };
        Setup { tmp, socket, pool, launch: Launch::default() }
    }

    /// The temp dir the driver will run in (to put wrapper scripts in place before it starts).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Adds a command-line argument of `all-in-one`.
    pub fn arg(mut self, a: &str) -> Setup {
        self.launch.args.push(a.to_owned());
        self
    }

    /// Sets an environment variable of the driver process (e.g. PATH with wrapper scripts first).
    pub fn env(mut self, key: &str, value: &str) -> Setup {
        self.launch.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Spawns the driver and waits until its socket accepts connections.
    pub async fn start(self) -> Driver {
        let dir = self.tmp.path().to_path_buf();
        let log = dir.join("driver.log");
        let endpoint = format!("unix://{}", self.socket.display());
        let mut split = (split::topology() == split::Topology::Split).then(|| split::Split::new(&dir, &self.pool.config));
        let child = spawn_driver(&dir, &endpoint, &self.pool.config, &self.launch, &log, split.as_mut());
        let fs_type = std::env::var("HOLDFAST_TEST_FS").unwrap_or_else(|_| "ext4".into());
        // The Driver owns the child from here on, so a failed start still cleans up.
        let mut driver = Driver {
            dir,
            socket: self.socket,
            endpoint,
            pool: self.pool,
            fs_type,
            child: Some(child),
            log,
            tmp: Some(self.tmp),
            clients: None,
            leftovers: Mutex::new(Vec::new()),
            launch: self.launch,
            split,
        };
        driver.connect().await;
        driver
    }
}

impl Setup {
    /// A driver on the config `make` writes, given the temp dir the driver will run in (pools
    /// may live inside it: they are cleaned up with it). Its first `[[pool]]` is the pool under
    /// test, owned by this driver alone.
    pub fn with_config(make: impl FnOnce(&Path) -> String) -> Setup {
        let tmp = tempfile::Builder::new().prefix("holdfast-test-").tempdir().expect("create temp dir");
        let socket = tmp.path().join("csi.sock");
        let config = tmp.path().join("holdfast.toml");
        let text = make(tmp.path());
        std::fs::write(&config, text).expect("write config");
        let pool = PoolUnderTest { owned: true, ..pool_from_config(&config) };
        Setup { tmp, socket, pool, launch: Launch::default() }
    }
}

/// Starts `holdfast all-in-one` in `dir` (state in `dir/state`), appending to `log`; split:
/// the controller, then the agent in its place.
fn spawn_driver(dir: &Path, endpoint: &str, config: &Path, launch: &Launch, log: &Path, split: Option<&mut split::Split>) -> Child {
    let out = File::options().create(true).append(true).open(log).expect("open driver log");
    let err = out.try_clone().expect("dup driver log");
    let mut cmd = match split {
        Some(s) => {
            s.spawn_controller();
            s.agent_command(endpoint, NODE_ID, &dir.join("state"))
        }
        None => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_holdfast"));
            c.arg("all-in-one").args(["--endpoint", endpoint, "--node-id", NODE_ID]).arg("--config").arg(config);
            c.arg("--state-dir").arg(dir.join("state"));
            c
        }
    };
    cmd.args(["--log-format", "text"])
        .args(&launch.args)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()))
        .envs(launch.envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn holdfast")
}

impl Default for Setup {
    fn default() -> Self {
        Setup::new()
    }
}

/// Reads the first pool of a config file.
fn pool_from_config(path: &Path) -> PoolUnderTest {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("HOLDFAST_TEST_CONFIG={}: {e}", path.display()));
    let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("HOLDFAST_TEST_CONFIG={}: {e}", path.display()));
    let first = table.get("pool").and_then(|p| p.as_array()).and_then(|a| a.first());
    let field = |k: &str| first.and_then(|p| p.get(k)).and_then(|v| v.as_str()).map(str::to_owned);
    let (Some(name), Some(kind)) = (field("name"), field("kind")) else {
        panic!("HOLDFAST_TEST_CONFIG={}: the first [[pool]] needs a name and a kind", path.display());
    };
    let config = std::fs::canonicalize(path).expect("canonicalize HOLDFAST_TEST_CONFIG");
    PoolUnderTest { name, kind, config, owned: false }
}

/// A running `holdfast all-in-one` and CSI clients connected to it.
pub struct Driver {
    /// The temp dir: socket, log, config, default pool, staging and target paths.
    pub dir: PathBuf,
    /// The plugin socket.
    pub socket: PathBuf,
    /// `unix:///…/csi.sock`.
    pub endpoint: String,
    /// The pool volumes are created in.
    pub pool: PoolUnderTest,
    /// The filesystem stage tests ask for.
    pub fs_type: String,
    child: Option<Child>,
    log: PathBuf,
    tmp: Option<TempDir>,
    clients: Option<Clients>,
    /// What the helpers published, staged and created and no helper undid yet: Drop undoes it
    /// through the driver, so a failed test leaves nothing in a shared pool (an LVM volume
    /// group in the VM) and nothing attached.
    leftovers: Mutex<Vec<Leftover>>,
    launch: Launch,
    /// The controller, when the driver is split ([`split`]); `child` is then the agent.
    split: Option<split::Split>,
}

/// Something to undo if the test does not, in the order Drop undoes them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Leftover {
    Published(String, String),
    Staged(String, String),
    Snapshot(String),
    Volume(String),
    /// issue 12: a group snapshot (its members cannot be deleted alone).
    Group(String),
}

impl Driver {
    /// Starts a driver on the pool the environment names (see the module doc).
    pub async fn start() -> Driver {
        Setup::new().start().await
    }

    async fn connect(&mut self) {
        let channel = self.wait_for_socket().await;
        let clients = match self.split.as_mut() {
            None => Clients::new(channel),
            // Two processes to load (and an agent to register) instead of one.
            Some(s) => s.clients(channel, NODE_ID, Instant::now() + 2 * START_TIMEOUT).await,
        };
        self.clients = Some(clients);
    }

    /// Kills the driver with SIGKILL (no clean-up of its own) and waits for it to be gone.
    pub fn kill(&mut self) {
        self.clients = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(s) = self.split.as_mut() {
            s.kill();
        }
    }

    /// Starts the driver again, with the same config, state directory, arguments and
    /// environment, and reconnects (after [`Driver::kill`], as a supervisor would).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: the driver is still running");
        // A killed driver leaves its socket file: connecting to it before the new driver has
        // replaced it gives a channel whose first call fails ("transport error"), as seen on a
        // loaded VM. The new driver replaces a stale socket itself (conformance
        // stale_socket_is_replaced_at_start); the harness waits for the new one.
        let _ = std::fs::remove_file(&self.socket);
        self.child = Some(spawn_driver(&self.dir, &self.endpoint, &self.pool.config, &self.launch, &self.log, self.split.as_mut()));
        self.connect().await;
    }

    async fn wait_for_socket(&mut self) -> Channel {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("holdfast exited during start-up with {status}; its log:\n{}", self.log_text());
            }
            if self.socket.exists() {
                // The connection's tasks run on the harness's own runtime, so they keep
                // answering the server (HTTP/2 GOAWAY on shutdown) even while a test, or Drop,
                // blocks its own thread; a real CO's client is always live like that.
                let endpoint = self.endpoint.clone();
                let connected = background().spawn(async move { holdfast::endpoint::connect(&endpoint).await }).await;
                if let Ok(Ok(ch)) = connected {
                    return ch;
                }
            }
            if Instant::now() > deadline {
                panic!("holdfast did not listen on {} within {START_TIMEOUT:?}; its log:\n{}", self.endpoint, self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An Identity client (clones share the connection).
    pub fn identity(&self) -> IdentityClient<Channel> {
        self.clients.as_ref().expect("driver started").identity.clone()
    }
    /// A Controller client.
    pub fn controller(&self) -> ControllerClient<Channel> {
        self.clients.as_ref().expect("driver started").controller.clone()
    }
    /// A Node client.
    pub fn node(&self) -> NodeClient<Channel> {
        self.clients.as_ref().expect("driver started").node.clone()
    }
    /// issue 12: a GroupController client (on the controller's socket when split).
    pub fn group(&self) -> holdfast::proto::group_controller_client::GroupControllerClient<Channel> {
        self.clients.as_ref().expect("driver started").group.clone()
    }

    /// What the driver wrote so far.
    pub fn log_text(&self) -> String {
        let own = std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()));
        match &self.split {
            None => own,
            Some(s) => format!("----- agent -----\n{own}----- controller -----\n{}", s.log_text()),
        }
    }

    /// The controller's socket when the driver is split (Identity and Controller answer
    /// there; `socket` is then the agent's, serving Node).
    pub fn controller_socket(&self) -> Option<&Path> {
        self.split.as_ref().map(|s| s.socket.as_path())
    }

    /// The process id, for signal tests.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit, with the clients still connected
    /// (as a CO's are); `None` if it did not exit (it is then killed).
    /// Split: both processes, and the first failure (or `None`) of the two.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.take()?;
        let controller = self.split.as_mut().and_then(split::Split::take);
        signal_term(&child);
        if let Some(c) = &controller {
            signal_term(c);
        }
        let deadline = Instant::now() + timeout;
        let status = wait_exit(child, deadline).await;
        match controller {
            None => status,
            Some(c) => match (status, wait_exit(c, deadline).await) {
                (Some(a), Some(c)) => Some(if a.success() { c } else { a }),
                _ => None,
            },
        }
    }

    /// Parameters every create sends: the pool under test.
    pub fn params(&self) -> HashMap<String, String> {
        HashMap::from([("pool".to_owned(), self.pool.name.clone())])
    }

    /// The topology segment of this node.
    pub fn node_topology(&self) -> Topology {
        Topology { segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), NODE_ID.to_owned())]) }
    }

    /// A filesystem capability with the fs under test.
    pub fn mount_cap(&self, mode: Mode) -> VolumeCapability {
        client::mount_capability(&self.fs_type, &[], mode)
    }

    /// The smallest volume the fs under test can be made on, rounded to a comfortable size
    /// (XFS refuses less than 300 MiB, btrfs about 110 MiB).
    pub fn fs_volume_size(&self) -> i64 {
        match self.fs_type.as_str() {
            "xfs" => 320 * MIB,
            "btrfs" => 256 * MIB,
            _ => 64 * MIB,
        }
    }

    /// A CreateVolume request for the pool under test.
    pub fn create_request(&self, name: &str, required: i64, cap: VolumeCapability) -> CreateVolumeRequest {
        // `required` as given (a test may send what no caller should): no clamping here.
        client::create_volume_request(name, CapacityRange { required_bytes: required, limit_bytes: 0 }, cap, self.params())
    }

    /// Creates a volume, failing the test on any error.
    pub async fn create(&self, name: &str, required: i64, cap: VolumeCapability) -> Volume {
        self.create_with(self.create_request(name, required, cap)).await
    }

    /// Sends a CreateVolume request, failing the test on any error.
    pub async fn create_with(&self, req: CreateVolumeRequest) -> Volume {
        let name = req.name.clone();
        let resp = until_copied(|| {
            let (mut c, r) = (self.controller(), req.clone());
            async move { c.create_volume(r).await }
        })
        .await;
        let volume = ok(resp, &format!("CreateVolume {name}")).volume.expect("CreateVolume answered no volume");
        self.remember(Leftover::Volume(volume.volume_id.clone()));
        volume
    }

    fn remember(&self, l: Leftover) {
        let mut all = self.leftovers.lock().unwrap_or_else(|e| e.into_inner());
        if !all.contains(&l) {
            all.push(l);
        }
    }

    fn forget(&self, l: &Leftover) {
        self.leftovers.lock().unwrap_or_else(|e| e.into_inner()).retain(|x| x != l);
    }

    /// Deletes a volume, failing the test on any error.
    pub async fn delete(&self, volume_id: &str) {
        let req = DeleteVolumeRequest { volume_id: volume_id.to_owned(), ..Default::default() };
        ok(self.controller().delete_volume(req).await, &format!("DeleteVolume {volume_id}"));
        self.forget(&Leftover::Volume(volume_id.to_owned()));
    }

    /// Creates a snapshot, failing the test on any error.
    pub async fn snapshot(&self, name: &str, source_volume_id: &str) -> Snapshot {
        let req = CreateSnapshotRequest { name: name.to_owned(), source_volume_id: source_volume_id.to_owned(), ..Default::default() };
        let resp = until_copied(|| {
            let (mut c, r) = (self.controller(), req.clone());
            async move { c.create_snapshot(r).await }
        })
        .await;
        let snap = ok(resp, &format!("CreateSnapshot {name}")).snapshot.expect("CreateSnapshot answered no snapshot");
        self.remember(Leftover::Snapshot(snap.snapshot_id.clone()));
        snap
    }

    /// Deletes snapshot `snapshot_id` at the end of the test if the test does not (for
    /// snapshots a test created by its own CreateSnapshot calls).
    pub fn remember_snapshot(&self, snapshot_id: &str) {
        self.remember(Leftover::Snapshot(snapshot_id.to_owned()));
    }

    /// Deletes volume `volume_id` at the end of the test if the test does not (for volumes a
    /// test created by its own CreateVolume calls).
    pub fn remember_volume(&self, volume_id: &str) {
        self.remember(Leftover::Volume(volume_id.to_owned()));
    }

    /// issue 12: deletes group snapshot `id` at the end of the test if the test does not.
    pub fn remember_group(&self, id: &str) {
        self.remember(Leftover::Group(id.to_owned()));
    }

    /// issue 12: deletes a group snapshot, failing the test on any error.
    pub async fn delete_group(&self, id: &str) {
        let req = DeleteVolumeGroupSnapshotRequest { group_snapshot_id: id.to_owned(), ..Default::default() };
        ok(self.group().delete_volume_group_snapshot(req).await, &format!("DeleteVolumeGroupSnapshot {id}"));
        self.forget(&Leftover::Group(id.to_owned()));
    }

    /// Deletes a snapshot, failing the test on any error.
    pub async fn delete_snapshot(&self, snapshot_id: &str) {
        let req = DeleteSnapshotRequest { snapshot_id: snapshot_id.to_owned(), ..Default::default() };
        ok(self.controller().delete_snapshot(req).await, &format!("DeleteSnapshot {snapshot_id}"));
        self.forget(&Leftover::Snapshot(snapshot_id.to_owned()));
    }

    /// A fresh staging directory (the CO creates it; spec NodeStageVolume).
    pub fn staging_dir(&self, name: &str) -> PathBuf {
        let p = self.dir.join("staging").join(name);
        std::fs::create_dir_all(&p).expect("create staging dir");
        p
    }

    /// A target path whose parent exists but which itself does not: the SP creates it
    /// (spec NodePublishVolume: "Creation of target_path is the responsibility of the SP").
    pub fn target_path(&self, name: &str) -> PathBuf {
        let parent = self.dir.join("pods").join(name);
        std::fs::create_dir_all(&parent).expect("create target parent");
        parent.join("mount")
    }

    /// NodeStageVolume request.
    pub fn stage_request(&self, volume_id: &str, staging: &Path, cap: &VolumeCapability) -> NodeStageVolumeRequest {
        client::stage_request(volume_id, &path_str(staging), cap.clone())
    }

    /// NodePublishVolume request.
    pub fn publish_request(
        &self,
        volume_id: &str,
        staging: &Path,
        target: &Path,
        cap: &VolumeCapability,
        readonly: bool,
    ) -> NodePublishVolumeRequest {
        client::publish_request(volume_id, &path_str(staging), &path_str(target), cap.clone(), readonly)
    }

    /// Stages a volume, failing the test on any error.
    pub async fn stage(&self, volume_id: &str, staging: &Path, cap: &VolumeCapability) {
        let resp = self.node().node_stage_volume(self.stage_request(volume_id, staging, cap)).await;
        self.remember(Leftover::Staged(volume_id.to_owned(), path_str(staging)));
        ok(resp, &format!("NodeStageVolume {volume_id} at {}", staging.display()));
    }

    /// Publishes a staged volume, failing the test on any error.
    pub async fn publish(&self, volume_id: &str, staging: &Path, target: &Path, cap: &VolumeCapability, readonly: bool) {
        let resp = self.node().node_publish_volume(self.publish_request(volume_id, staging, target, cap, readonly)).await;
        self.remember(Leftover::Published(volume_id.to_owned(), path_str(target)));
        ok(resp, &format!("NodePublishVolume {volume_id} at {}", target.display()));
    }

    /// Unpublishes, failing the test on any error.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) {
        let req = client::unpublish_request(volume_id, &path_str(target));
        ok(self.node().node_unpublish_volume(req).await, &format!("NodeUnpublishVolume {volume_id} at {}", target.display()));
        self.forget(&Leftover::Published(volume_id.to_owned(), path_str(target)));
    }

    /// Unstages, failing the test on any error.
    pub async fn unstage(&self, volume_id: &str, staging: &Path) {
        let req = client::unstage_request(volume_id, &path_str(staging));
        ok(self.node().node_unstage_volume(req).await, &format!("NodeUnstageVolume {volume_id} at {}", staging.display()));
        self.forget(&Leftover::Staged(volume_id.to_owned(), path_str(staging)));
    }

    /// Creates a filesystem volume of the fs's minimum size (its CSI name is `name` plus a
    /// unique suffix; `name` names its staging and target dirs), stages and publishes it (rw).
    pub async fn mounted_volume(&self, name: &str, mode: Mode) -> Mounted {
        let cap = self.mount_cap(mode);
        let volume = self.create(&unique(name), self.fs_volume_size(), cap.clone()).await;
        let staging = self.staging_dir(name);
        let target = self.target_path(name);
        self.stage(&volume.volume_id, &staging, &cap).await;
        self.publish(&volume.volume_id, &staging, &target, &cap, false).await;
        Mounted { volume, cap, staging, target }
    }

    /// Unpublishes, unstages and deletes what [`Driver::mounted_volume`] made.
    pub async fn tear_down(&self, m: &Mounted) {
        self.unpublish(&m.volume.volume_id, &m.target).await;
        self.unstage(&m.volume.volume_id, &m.staging).await;
        self.delete(&m.volume.volume_id).await;
    }

    /// NodeGetVolumeStats, failing the test on any error.
    pub async fn stats(&self, volume_id: &str, volume_path: &Path, staging: &Path) -> NodeGetVolumeStatsResponse {
        let req = NodeGetVolumeStatsRequest {
            volume_id: volume_id.to_owned(),
            volume_path: path_str(volume_path),
            staging_target_path: path_str(staging),
        };
        ok(self.node().node_get_volume_stats(req).await, &format!("NodeGetVolumeStats {volume_id}"))
    }

    /// The controller capabilities the driver advertises.
    pub async fn controller_caps(&self) -> Vec<CtrlCap> {
        let resp =
            ok(self.controller().controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await, "ControllerGetCapabilities");
        resp.capabilities
            .iter()
            .filter_map(|c| match c.r#type {
                Some(controller_service_capability::Type::Rpc(r)) => CtrlCap::try_from(r.r#type).ok(),
                None => None,
            })
            .collect()
    }

    /// The node capabilities the driver advertises.
    pub async fn node_caps(&self) -> Vec<NodeCap> {
        let resp = ok(self.node().node_get_capabilities(NodeGetCapabilitiesRequest {}).await, "NodeGetCapabilities");
        resp.capabilities
            .iter()
            .filter_map(|c| match c.r#type {
                Some(node_service_capability::Type::Rpc(r)) => NodeCap::try_from(r.r#type).ok(),
                None => None,
            })
            .collect()
    }

    /// Fails the test unless the driver advertises every one of these controller capabilities.
    /// Like csi-sanity, tests exercise only what is advertised; unlike it, a missing capability
    /// is a failure here, because every holdfast pool kind must offer them.
    pub async fn require_controller(&self, wanted: &[CtrlCap]) {
        let have = self.controller_caps().await;
        let missing: Vec<_> = wanted.iter().filter(|w| !have.contains(w)).map(|w| w.as_str_name()).collect();
        assert!(missing.is_empty(), "the driver does not advertise controller capabilities {missing:?} (it has {have:?})");
    }

    /// Fails the test unless the driver advertises every one of these node capabilities.
    pub async fn require_node(&self, wanted: &[NodeCap]) {
        let have = self.node_caps().await;
        let missing: Vec<_> = wanted.iter().filter(|w| !have.contains(w)).map(|w| w.as_str_name()).collect();
        assert!(missing.is_empty(), "the driver does not advertise node capabilities {missing:?} (it has {have:?})");
    }

    /// Every volume id ListVolumes returns, paging with `page` entries per call.
    pub async fn list_volume_ids(&self, page: i32) -> Vec<String> {
        let mut ids = Vec::new();
        let mut token = String::new();
        for _ in 0..1000 {
            let req = ListVolumesRequest { max_entries: page, starting_token: token };
            let resp = ok(self.controller().list_volumes(req).await, "ListVolumes");
            assert!(
                page == 0 || resp.entries.len() <= page as usize,
                "ListVolumes returned {} entries for max_entries {page}",
                resp.entries.len()
            );
            ids.extend(resp.entries.into_iter().map(|e| e.volume.expect("ListVolumes entry without volume").volume_id));
            if resp.next_token.is_empty() {
                return ids;
            }
            token = resp.next_token;
        }
        panic!("ListVolumes kept returning a next_token after 1000 pages");
    }

    /// Every snapshot ListSnapshots returns for a request (paged by `req.max_entries`).
    pub async fn list_snapshots(&self, mut req: ListSnapshotsRequest) -> Vec<Snapshot> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            let resp = ok(self.controller().list_snapshots(req.clone()).await, "ListSnapshots");
            let page = req.max_entries;
            assert!(
                page == 0 || resp.entries.len() <= page as usize,
                "ListSnapshots returned {} entries for max_entries {page}",
                resp.entries.len()
            );
            out.extend(resp.entries.into_iter().map(|e| e.snapshot.expect("ListSnapshots entry without snapshot")));
            if resp.next_token.is_empty() {
                return out;
            }
            req.starting_token = resp.next_token;
        }
        panic!("ListSnapshots kept returning a next_token after 1000 pages");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Through the driver first (it detaches what it attached), then by force.
        self.undo_leftovers();
        let mut left = unmount_all_under(&self.dir);
        // Hang up, so the driver's graceful shutdown has no connection to wait for.
        self.clients = None;
        if let Some(mut child) = self.child.take() {
            signal_term(&child);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    eprintln!("holdfast did not exit {STOP_TIMEOUT:?} after SIGTERM; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mut c) = self.split.as_mut().and_then(split::Split::take) {
            signal_term(&c);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::thread::panicking() {
            eprintln!("----- holdfast log ({}) -----\n{}----- end of holdfast log -----", self.log.display(), self.log_text());
        }
        detach_loops_under(&self.dir);
        left.extend(unmount_all_under(&self.dir));
        if !left.is_empty() {
            // Removing the dir would delete files inside whatever is still mounted: keep it.
            let kept = self.tmp.take().map(TempDir::keep);
            eprintln!("cannot unmount {left:?}; keeping {kept:?} for inspection");
        }
    }
}

impl Driver {
    /// Best-effort NodeUnpublish / NodeUnstage / DeleteSnapshot / DeleteVolume of whatever the
    /// test did not undo, newest first within each kind, over the client runtime (Drop cannot
    /// await).
    fn undo_leftovers(&self) {
        let mut leftovers: Vec<Leftover> = std::mem::take(&mut *self.leftovers.lock().unwrap_or_else(|e| e.into_inner()));
        let Some(clients) = &self.clients else { return };
        if leftovers.is_empty() || self.child.is_none() {
            return;
        }
        leftovers.reverse();
        // A stable sort: kinds in undo order, newest first within a kind.
        leftovers.sort_by_key(rank);
        let (mut controller, mut node, mut group) = (clients.controller.clone(), clients.node.clone(), clients.group.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        background().spawn(async move {
            for l in leftovers {
                let res = match &l {
                    Leftover::Published(volume_id, target_path) => {
                        node.node_unpublish_volume(client::unpublish_request(volume_id, target_path)).await.map(drop)
                    }
                    Leftover::Staged(volume_id, staging) => {
                        node.node_unstage_volume(client::unstage_request(volume_id, staging)).await.map(drop)
                    }
                    Leftover::Snapshot(id) => {
                        controller.delete_snapshot(DeleteSnapshotRequest { snapshot_id: id.clone(), ..Default::default() }).await.map(drop)
                    }
                    Leftover::Volume(id) => {
                        controller.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.map(drop)
                    }
                    Leftover::Group(id) => {
                        let req = DeleteVolumeGroupSnapshotRequest { group_snapshot_id: id.clone(), ..Default::default() };
                        group.delete_volume_group_snapshot(req).await.map(drop)
                    }
                };
                if let Err(s) = res {
                    eprintln!("clean-up: undoing {l:?}: {:?} {}", s.code(), s.message());
                }
            }
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            eprintln!("clean-up: undoing what the test left took over 30 s; giving up");
        }
    }
}

/// Undo order: unpublish, unstage, delete snapshots, delete volumes.
fn rank(l: &Leftover) -> u8 {
    match l {
        Leftover::Published(..) => 0,
        Leftover::Staged(..) => 1,
        Leftover::Snapshot(_) | Leftover::Group(_) => 2,
        Leftover::Volume(_) => 3,
    }
}

/// A volume staged and published by [`Driver::mounted_volume`].
#[derive(Debug, Clone)]
pub struct Mounted {
    /// The volume as CreateVolume returned it.
    pub volume: Volume,
    /// The capability it was staged and published with.
    pub cap: VolumeCapability,
    /// Its staging path.
    pub staging: PathBuf,
    /// Its target path (mounted).
    pub target: PathBuf,
}

/// The runtime that carries the client connections (see [`Driver::wait_for_socket`]).
pub(crate) fn background() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("build the client runtime")
    })
}

/// Waits for `child` to exit until `deadline`; then kills it and answers `None`.
async fn wait_exit(mut child: Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal_term(child: &Child) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
    let _ = kill(pid, Signal::SIGTERM);
}

/// Whether this process holds a capability in its effective set (`capabilities(7)` number),
/// for the few kernel operations a sandbox may withhold even from root.
pub fn has_capability(cap: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim).unwrap_or("0");
    u64::from_str_radix(eff, 16).map(|bits| bits & (1u64 << cap) != 0).unwrap_or(false)
}

/// CAP_SYS_RESOURCE: online ext4 growth (`EXT4_IOC_RESIZE_FS`) needs it.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// A raw block capability.
pub fn block_cap(mode: Mode) -> VolumeCapability {
    client::block_capability(mode)
}

/// A name unique across tests, processes and runs (a shared pool may hold leftovers from an
/// earlier failed run).
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() % 1_000_000_000).unwrap_or(0);
    format!("{prefix}-{}-{t}-{n}", std::process::id())
}

/// A path as the string a CSI request carries.
pub fn path_str(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_owned()
}

/// Unwraps a response, failing the test with the gRPC status.
/// Repeats a request while it answers ABORTED because its copy is still running ("copy of …
/// in progress"), as a CO retries: copies (clones, restores, snapshots) run detached from their
/// request, and on a slow machine (the software-emulated VM) one may outlast the request's wait.
/// Any other answer, lock contention included, is returned at once. Bounded (15 min).
pub async fn until_copied<T, F, Fut>(mut call: F) -> Result<Response<T>, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let give_up = Instant::now() + Duration::from_secs(900);
    loop {
        let r = call().await;
        match &r {
            Err(e) if copy_in_progress(e) && Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ => return r,
        }
    }
}

/// Whether `s` is the ABORTED "copy of … in progress" of a copy still running: as all-in-one
/// answers it, or as the controller passes on its agent's answer, which names the node first
/// ("agent of node N: copy of …"; every error routed to an agent carries that context).
pub fn copy_in_progress(s: &Status) -> bool {
    let m = s.message();
    let m = m.strip_prefix("agent of node ").and_then(|rest| rest.split_once(": ")).map_or(m, |(_, theirs)| theirs);
    s.code() == Code::Aborted && m.starts_with("copy of ")
}

pub fn ok<T>(r: Result<Response<T>, Status>, what: &str) -> T {
    match r {
        Ok(resp) => resp.into_inner(),
        Err(s) => panic!("{what}: expected OK, got {:?}: {}", s.code(), s.message()),
    }
}

/// The gRPC code of a result (`Code::Ok` on success).
pub fn code_of<T>(r: &Result<T, Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Fails the test unless the call failed with `want`.
pub fn expect_code<T: std::fmt::Debug>(r: Result<Response<T>, Status>, want: Code, what: &str) -> Status {
    match r {
        Ok(resp) => panic!("{what}: expected {want:?}, got OK: {:?}", resp.into_inner()),
        Err(s) if s.code() == want => s,
        Err(s) => panic!("{what}: expected {want:?}, got {:?}: {}", s.code(), s.message()),
    }
}

/// Writes a file and makes it durable (file and directory entry), as an application that
/// wants its data in a snapshot would.
pub fn write_durably(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).unwrap_or_else(|e| panic!("fsync {}: {e}", dir.display()));
    }
}

/// Total bytes of the filesystem mounted at `path` (what `df` shows as size).
pub fn fs_total_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()));
    st.blocks() * st.fragment_size()
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    mount_points().iter().any(|m| m == path)
}

/// Runs a command, returning whether it exited 0 (the harness's own clean-up and
/// behind-the-driver's-back actions; the driver's commands go through its `Exec`).
pub fn run(program: &str, args: &[&str]) -> bool {
    match Command::new(program).args(args).stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!("{program} {args:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
            false
        }
        Err(e) => {
            eprintln!("cannot run {program}: {e}");
            false
        }
    }
}

/// Mount points from /proc/self/mountinfo (field 5, octal escapes decoded).
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(|m| PathBuf::from(unescape_octal(m))).collect()
}

fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Unmounts everything mounted under `dir`, deepest first; returns what is still mounted.
fn unmount_all_under(dir: &Path) -> Vec<PathBuf> {
    // A path may carry stacked mounts, so go round until nothing is left (bounded).
    for _ in 0..10 {
        let mut under: Vec<PathBuf> = mount_points().into_iter().filter(|m| m.starts_with(dir)).collect();
        if under.is_empty() {
            return under;
        }
        under.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        under.dedup();
        for m in &under {
            let m = path_str(m);
            if !run("umount", &["--recursive", &m]) {
                run("umount", &["--recursive", "--lazy", &m]);
            }
        }
    }
    mount_points().into_iter().filter(|m| m.starts_with(dir)).collect()
}

/// Detaches every loop device whose backing file lies under `dir` (including deleted files).
fn detach_loops_under(dir: &Path) {
    let Ok(out) = Command::new("losetup").args(["--list", "--json", "--output", "NAME,BACK-FILE"]).output() else {
        return;
    };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return;
    };
    let devices = json.get("loopdevices").and_then(|d| d.as_array()).cloned().unwrap_or_default();
    for dev in devices {
        let (Some(name), Some(back)) = (dev.get("name").and_then(|v| v.as_str()), dev.get("back-file").and_then(|v| v.as_str())) else {
            continue;
        };
        if Path::new(back).starts_with(dir) {
            run("losetup", &["--detach", name]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers for tests that control how the driver starts (tests/hostile.rs): a config of their
// own, a state directory that outlives one driver process (restart after kill -9), extra
// environment (a PATH with wrapper tools first), a umask.

/// How [`Setup::start_with`] starts the driver, beyond what [`Setup::start`] does.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The state directory (default: `state` in the driver's temp dir). Give the same one to
    /// a second driver to see what a restarted driver does with the first one's records.
    pub state_dir: Option<PathBuf>,
    /// Extra environment variables for the driver process.
    pub env: Vec<(String, String)>,
    /// `text` (default) or `json`.
    pub log_format: Option<String>,
    /// Starts the driver under this umask (through `sh -c 'umask …; exec …'`).
    pub umask: Option<u32>,
}

impl Setup {
    /// Like [`Setup::new`], but with a pool of this test's own: `config` is the config file
    /// and `pool`/`kind` name its first pool (the env's config is not used).
    pub fn with_own_pool(config: &Path, pool: &str, kind: &str) -> Setup {
        let mut setup = Setup::new();
        setup.pool = PoolUnderTest { name: pool.to_owned(), kind: kind.to_owned(), config: config.to_path_buf(), owned: true };
        setup
    }

    /// The driver's temp dir (socket, log; removed when the driver is dropped).
    pub fn temp_dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Spawns the driver as [`Setup::start`] does, then replaces it, before any call, with one
    /// started with `opts` (same socket, log and clients' endpoint): built on [`Setup::start`]
    /// so that this keeps working whatever else the harness learns to pass.
    pub async fn start_with(self, opts: StartOptions) -> Driver {
        assert_eq!(split::topology(), split::Topology::AllInOne, "start_with starts all-in-one only (HOLDFAST_TOPOLOGY=split)");
        let mut driver = self.start().await;
        driver.clients = None;
        if let Some(mut child) = driver.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = File::create(&driver.log).expect("create driver log");
        let err = out.try_clone().expect("dup driver log");
        let state = opts.state_dir.clone().unwrap_or_else(|| driver.dir.join("state"));
        let format = opts.log_format.clone().unwrap_or_else(|| "text".into());
        let bin = env!("CARGO_BIN_EXE_holdfast");
        let mut cmd = match opts.umask {
            Some(mask) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("umask {mask:03o} && exec \"$0\" \"$@\"")).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("all-in-one")
            .args(["--endpoint", &driver.endpoint, "--node-id", NODE_ID])
            .arg("--config")
            .arg(&driver.pool.config)
            .args(["--log-format", &format])
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()))
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if opts.umask.is_some() {
            // The first driver created the socket's directory: let this one create it.
            let _ = std::fs::remove_file(&driver.socket);
            for dir in driver.socket.ancestors().skip(1).take_while(|a| a.starts_with(&driver.dir) && *a != driver.dir.as_path()) {
                let _ = std::fs::remove_dir(dir);
            }
        }
        driver.child = Some(cmd.spawn().expect("spawn holdfast"));
        let channel = driver.wait_for_socket().await;
        driver.clients = Some(Clients::new(channel));
        driver
    }
}

impl Driver {
    /// Kills the driver with SIGKILL (no clean-up of its own) and reaps it. What the helpers
    /// remembered is forgotten: a restarted driver (or the test) undoes it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(s) = self.split.as_mut() {
            s.kill();
        }
        self.leftovers.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Hands what the helpers remembered to be undone by another driver (after a restart on
    /// the same pool and state), so that one's Drop cleans up the test's volumes.
    pub fn adopt_leftovers_of(&self, volumes: &[String], staged: &[(String, PathBuf)]) {
        for v in volumes {
            self.remember(Leftover::Volume(v.clone()));
        }
        for (v, p) in staged {
            self.remember(Leftover::Staged(v.clone(), path_str(p)));
        }
    }
}

/// Unmounts everything under `dir` (deepest first) and detaches loop devices backed by files
/// under it; returns what could not be unmounted. For test dirs outside a driver's own.
pub fn clean_up_dir(dir: &Path) -> Vec<PathBuf> {
    let mut left = unmount_all_under(dir);
    detach_loops_under(dir);
    left.extend(unmount_all_under(dir));
    left
}

/// The mount points in this process's mount table, as [`is_mount_point`] sees them.
pub fn all_mount_points() -> Vec<PathBuf> {
    mount_points()
}

/// Whether the pool under test's snapshots die with their volume, so DeleteVolume of a volume
/// that has snapshots is refused (FAILED_PRECONDITION naming them): a thick LVM pool (no
/// `thin_pool` in its config), whose snapshots are copy-on-write LVs of their origin. Every
/// other kind keeps them independent.
pub fn snapshots_die_with_their_volume(d: &Driver) -> bool {
    if d.pool.kind != "lvm" {
        return false;
    }
    let text = std::fs::read_to_string(&d.pool.config).unwrap_or_default();
    let table: toml::Table = text.parse().unwrap_or_default();
    let first = table.get("pool").and_then(|p| p.as_array()).and_then(|a| a.first());
    first.and_then(|p| p.get("thin_pool")).is_none()
}

/// The Python with grpcio: `HOLDFAST_PYTHON`, else the venv scripts/install-deps makes
/// (`HOLDFAST_PYTHON_VENV`, default /var/cache/holdfast-python), else `python3`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("HOLDFAST_PYTHON") {
        return p.into();
    }
    let venv = std::env::var_os("HOLDFAST_PYTHON_VENV").map(PathBuf::from).unwrap_or_else(|| "/var/cache/holdfast-python".into());
    let p = venv.join("bin/python3");
    if p.exists() { p } else { "python3".into() }
}
