//! The `nfs` pool against a real NFS server: the kernel server of the test VM, exporting
//! `/srv/holdfast-nfs` to 127.0.0.1 (`tests/vm/nfs-suite.sh` runs this in the VM). Each test starts
//! the real `holdfast all-in-one` with its own nfs pools and talks CSI to it, then checks the
//! server's side of the export directly.
//!
//! The harness is tests/common/real.rs (`harness = false`). Outside the VM these tests cannot run
//! (this machine's kernel has no NFS): the binary says "NOT RUN" and counts nothing as passed.
//! Inside it (`/run/holdfast-vm` exists), with `HOLDFAST_NFS_TEST=1` or with
//! `HOLDFAST_REQUIRE_REAL=1` they must run: an NFS server that cannot be started or reached fails
//! the run before any test. Arguments as for libtest (filters, `--exact`, `--skip`, `--list`,
//! `--test-threads`); tests are listed in `TESTS`, not marked with test attributes.
//!
//! Tests run in parallel, except the ones that stop the server or measure time, which take
//! [`SERVER`] exclusively. `HOLDFAST_NFS_LOG_DIR=DIR` keeps each plugin's log there.

mod common;
#[path = "common/real.rs"]
mod real;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{expect_code, ok, path_str, run, unique, write_durably};
use holdfast::proto::controller_client::ControllerClient;
use holdfast::proto::node_client::NodeClient;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use holdfast::proto::volume_content_source::{SnapshotSource, Type as Source, VolumeSource};
use holdfast::proto::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::RwLock;
use tonic::Code;
use tonic::transport::Channel;

/// The directory the server exports.
const EXPORT: &str = "/srv/holdfast-nfs";
/// The server, as clients name it.
const SERVER_ADDR: &str = "127.0.0.1";
/// The node id every plugin gets.
const NODE_ID: &str = "nfs-node-1";
/// Tests that stop the server or time things hold this exclusively; the others share it.
static SERVER: RwLock<()> = RwLock::const_new(());

const MIB: i64 = 1 << 20;

// `harness = false` compiles test attributes out without a word: tests go in TESTS.
const _: () = assert!(!real::has_test_attribute(include_str!("nfs.rs")), "tests/nfs.rs: list tests in TESTS, not with test attributes");

/// Whether the tests must run by themselves: in the VM, or asked to with `HOLDFAST_NFS_TEST=1`.
fn required() -> bool {
    Path::new("/run/holdfast-vm").exists() || std::env::var_os("HOLDFAST_NFS_TEST").is_some_and(|v| v != "0")
}

/// Starts the VM's NFS server and exports [`EXPORT`] once per process; `Err` says what failed.
fn setup() -> &'static Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        std::fs::create_dir_all(EXPORT).map_err(|e| format!("creating {EXPORT}: {e}"))?;
        let starter = Command::new("holdfast-vm-nfs-start").stdin(Stdio::null()).output();
        match starter {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Err(format!("holdfast-vm-nfs-start failed: {}", String::from_utf8_lossy(&out.stderr))),
            // Outside the VM's image: the export is expected to be set up already.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("holdfast-vm-nfs-start: {e}")),
        }
        let client = format!("{SERVER_ADDR}:{EXPORT}");
        if !run("exportfs", &["-o", "rw,no_root_squash,insecure,no_subtree_check,sync", &client]) {
            return Err(format!("exportfs of {client} failed"));
        }
        Ok(())
    })
}

type TestFn = fn() -> Pin<Box<dyn Future<Output = ()> + Send>>;

const TESTS: &[(&str, TestFn)] = &[
    ("multi_node_writers_see_each_others_writes", || Box::pin(multi_node_writers_see_each_others_writes())),
    ("kubernetes_topology_requirements_place_nfs_volumes", || Box::pin(kubernetes_topology_requirements_place_nfs_volumes())),
    ("lifecycle_over_nfs_v3_and_v4_2", || Box::pin(lifecycle_over_nfs_v3_and_v4_2())),
    ("on_delete_leaves_what_it_promises", || Box::pin(on_delete_leaves_what_it_promises())),
    ("hostile_names_never_touch_anything_outside_the_export", || Box::pin(hostile_names_never_touch_anything_outside_the_export())),
    ("a_stopped_server_is_reported_abnormal_quickly", || Box::pin(a_stopped_server_is_reported_abnormal_quickly())),
    ("a_stopped_server_makes_only_the_nfs_pool_sick", || Box::pin(a_stopped_server_makes_only_the_nfs_pool_sick())),
    ("a_volume_directory_swapped_for_a_symlink_is_never_used_through_it", || {
        Box::pin(a_volume_directory_swapped_for_a_symlink_is_never_used_through_it())
    }),
    ("timing_create_stage_publish_versus_mkdir_and_mount_by_hand", || {
        Box::pin(timing_create_stage_publish_versus_mkdir_and_mount_by_hand())
    }),
];

fn main() -> ExitCode {
    let suite = real::Suite {
        file: "tests/nfs.rs",
        needs: "an NFS server",
        how: "tests/vm/nfs-suite.sh (or HOLDFAST_NFS_TEST=1 with 127.0.0.1:/srv/holdfast-nfs exported rw,no_root_squash)",
        required: required(),
        // Tests that stop the server or measure time take SERVER exclusively.
        parallel: true,
    };
    // The server is started once, before any test: a server that cannot start fails the run.
    real::main(&suite, TESTS, || setup().as_ref().err().map(|e| format!("the NFS server is not available: {e}")))
}

/// An nfs `[[pool]]` table on the test export.
fn pool(name: &str, extra: &str) -> String {
    format!("[[pool]]\nname = \"{name}\"\nkind = \"nfs\"\nserver = \"{SERVER_ADDR}\"\nexport = \"{EXPORT}\"\n{extra}\n")
}

/// A running `holdfast all-in-one` with a config of nfs pools.
struct Plugin {
    dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    log: PathBuf,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

impl Plugin {
    async fn start(config: &str) -> Plugin {
        let tmp = tempfile::Builder::new().prefix("holdfast-nfs-").tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let cfg = dir.join("holdfast.toml");
        std::fs::write(&cfg, config).expect("write config");
        let log = dir.join("driver.log");
        let out = File::create(&log).expect("create log");
        let endpoint = format!("unix://{}", dir.join("csi.sock").display());
        let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(["all-in-one", "--endpoint", &endpoint, "--node-id", NODE_ID, "--log-format", "text", "--config"])
            .arg(&cfg)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("HOLDFAST_LOG", std::env::var("HOLDFAST_LOG").unwrap_or_else(|_| "debug".into()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .expect("spawn holdfast");
        let deadline = Instant::now() + Duration::from_secs(60);
        let channel = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("holdfast exited with {status} at start; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            if dir.join("csi.sock").exists() {
                if let Ok(ch) = holdfast::endpoint::connect(&endpoint).await {
                    break ch;
                }
            }
            assert!(Instant::now() < deadline, "holdfast did not listen within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Plugin {
            dir,
            tmp: Some(tmp),
            child: Some(child),
            log,
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    /// A fresh directory for a staging path (the CO makes it).
    fn staging(&self, name: &str) -> PathBuf {
        let p = self.dir.join("staging").join(name);
        std::fs::create_dir_all(&p).expect("staging dir");
        p
    }

    /// A target path whose parent exists.
    fn target(&self, name: &str) -> PathBuf {
        let parent = self.dir.join("pods").join(name);
        std::fs::create_dir_all(&parent).expect("target parent");
        parent.join("mount")
    }

    async fn create(&self, pool: &str, name: &str, mode: Mode, extra: &[(&str, &str)]) -> Volume {
        let resp = self.controller.clone().create_volume(create_request(pool, name, mode, extra)).await;
        ok(resp, &format!("CreateVolume {name}")).volume.expect("no volume")
    }

    async fn stage(&self, id: &str, staging: &Path, mode: Mode) {
        let req = NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path_str(staging),
            volume_capability: Some(cap(mode)),
            ..Default::default()
        };
        ok(self.node.clone().node_stage_volume(req).await, &format!("NodeStageVolume {id}"));
    }

    async fn publish(&self, id: &str, staging: &Path, target: &Path, mode: Mode, readonly: bool) {
        let req = NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path_str(staging),
            target_path: path_str(target),
            volume_capability: Some(cap(mode)),
            readonly,
            ..Default::default()
        };
        ok(self.node.clone().node_publish_volume(req).await, &format!("NodePublishVolume {id}"));
    }

    async fn unpublish(&self, id: &str, target: &Path) {
        let req = NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: path_str(target) };
        ok(self.node.clone().node_unpublish_volume(req).await, &format!("NodeUnpublishVolume {id}"));
    }

    async fn unstage(&self, id: &str, staging: &Path) {
        let req = NodeUnstageVolumeRequest { volume_id: id.into(), staging_target_path: path_str(staging) };
        ok(self.node.clone().node_unstage_volume(req).await, &format!("NodeUnstageVolume {id}"));
    }

    async fn delete(&self, id: &str) {
        ok(self.controller.clone().delete_volume(DeleteVolumeRequest { volume_id: id.into(), ..Default::default() }).await, "DeleteVolume");
    }

    fn stats_request(&self, id: &str, path: &Path) -> NodeGetVolumeStatsRequest {
        NodeGetVolumeStatsRequest { volume_id: id.into(), volume_path: path_str(path), staging_target_path: String::new() }
    }

    async fn stats(&self, id: &str, path: &Path) -> NodeGetVolumeStatsResponse {
        ok(self.node.clone().node_get_volume_stats(self.stats_request(id, path)).await, &format!("NodeGetVolumeStats {id}"))
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::thread::panicking() {
            eprintln!("----- holdfast log -----\n{}----- end of log -----", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
        // Kept for later reading when asked (the VM's own disk is thrown away).
        if let Some(keep) = std::env::var_os("HOLDFAST_NFS_LOG_DIR") {
            let name = self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let _ = std::fs::create_dir_all(&keep).and_then(|_| std::fs::copy(&self.log, Path::new(&keep).join(format!("{name}.log"))));
        }
        // Lazily: an NFS mount whose server is gone must not block the clean-up.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> =
            mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| Path::new(m).starts_with(&self.dir)).collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            run("umount", &["--lazy", m]);
        }
        let _ = self.tmp.take();
    }
}

fn cap(mode: Mode) -> VolumeCapability {
    VolumeCapability { access_mode: Some(AccessMode { mode: mode as i32 }), access_type: Some(AccessType::Mount(MountVolume::default())) }
}

fn create_request(pool: &str, name: &str, mode: Mode, extra: &[(&str, &str)]) -> CreateVolumeRequest {
    let mut parameters = HashMap::from([("pool".to_owned(), pool.to_owned())]);
    parameters.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: 64 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![cap(mode)],
        parameters,
        ..Default::default()
    }
}

/// The server-side directory of a volume made with the default template (`${csi.name}`).
fn on_server(subdir: &str) -> PathBuf {
    Path::new(EXPORT).join(subdir)
}

/// The mountinfo line of whatever is mounted at `path`: (fs type, super options).
fn mount_of(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rfind(|l| l.split(' ').nth(4) == Some(&path_str(path))).and_then(|l| {
        let post = l.split(" - ").nth(1)?;
        let f: Vec<&str> = post.split(' ').collect();
        Some((f.first()?.to_string(), f.get(2)?.to_string()))
    })
}

// ---------------------------------------------------------------------------------------------

async fn multi_node_writers_see_each_others_writes() {
    let _shared = SERVER.read().await;
    let p = Plugin::start(&pool("nfs-mnmw", "mount_options = [\"nfsvers=4.2\"]")).await;
    let mode = Mode::MultiNodeMultiWriter;
    let name = unique("mnmw");
    let v = p.create("nfs-mnmw", &name, mode, &[]).await;
    let id = v.volume_id.as_str();
    assert!(id.starts_with("nfs:-:nfs-mnmw:"), "an nfs volume id names no node: {id}");
    let validate = ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![cap(Mode::MultiNodeMultiWriter), cap(Mode::MultiNodeReaderOnly)],
        ..Default::default()
    };
    let resp = ok(p.controller.clone().validate_volume_capabilities(validate).await, "ValidateVolumeCapabilities");
    assert!(resp.confirmed.is_some(), "multi-node modes not confirmed: {}", resp.message);

    // Two "nodes": two separate NFS mounts of the volume, each published to its own pod.
    let (sa, sb) = (p.staging("a"), p.staging("b"));
    let (ta, tb) = (p.target("a"), p.target("b"));
    p.stage(id, &sa, mode).await;
    p.stage(id, &sb, mode).await;
    p.publish(id, &sa, &ta, mode, false).await;
    p.publish(id, &sb, &tb, mode, false).await;
    assert!(matches!(mount_of(&sa), Some((fs, _)) if fs == "nfs4"), "staging a: {:?}", mount_of(&sa));
    write_durably(&ta.join("from-a"), b"written by a\n");
    assert_eq!(std::fs::read(tb.join("from-a")).expect("b reads a's file"), b"written by a\n");
    write_durably(&tb.join("from-b"), b"written by b\n");
    assert_eq!(std::fs::read(ta.join("from-b")).expect("a reads b's file"), b"written by b\n");
    // Appends from both sides land in one file.
    for (t, line) in [(&ta, "a\n"), (&tb, "b\n"), (&ta, "a\n")] {
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(t.join("log")).unwrap();
        f.write_all(line.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(std::fs::read_to_string(tb.join("log")).unwrap(), "a\nb\na\n");
    assert_eq!(std::fs::read(on_server(&name).join("from-a")).unwrap(), b"written by a\n", "the server holds the file");

    // A reader-only publish of the same volume cannot write.
    let tr = p.target("reader");
    let sr = p.staging("reader");
    p.stage(id, &sr, Mode::MultiNodeReaderOnly).await;
    p.publish(id, &sr, &tr, Mode::MultiNodeReaderOnly, true).await;
    assert_eq!(std::fs::read(tr.join("from-b")).unwrap(), b"written by b\n");
    let err = std::fs::write(tr.join("nope"), b"x").expect_err("a read-only publish accepted a write");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    for (s, t) in [(&sa, &ta), (&sb, &tb), (&sr, &tr)] {
        p.unpublish(id, t).await;
        p.unstage(id, s).await;
    }
    p.delete(id).await;
}

async fn kubernetes_topology_requirements_place_nfs_volumes() {
    let _shared = SERVER.read().await;
    let p = Plugin::start(&pool("nfs-topo", "")).await;
    // What the external-provisioner sends with WaitForFirstConsumer: the chosen node's segments.
    let node = Topology { segments: HashMap::from([("topology.holdfast.dev/node".to_owned(), NODE_ID.to_owned())]) };
    let req = CreateVolumeRequest {
        accessibility_requirements: Some(TopologyRequirement { requisite: vec![node.clone()], preferred: vec![node.clone()] }),
        ..create_request("nfs-topo", &unique("topo"), Mode::MultiNodeMultiWriter, &[])
    };
    let v = ok(p.controller.clone().create_volume(req).await, "CreateVolume with the node's topology as requisite").volume.unwrap();
    for t in &v.accessible_topology {
        assert!(!t.segments.contains_key("topology.holdfast.dev/node"), "an nfs volume is pinned to a node: {:?}", v.accessible_topology);
    }
    let cap_req = GetCapacityRequest {
        volume_capabilities: vec![cap(Mode::MultiNodeMultiWriter)],
        parameters: HashMap::from([("pool".into(), "nfs-topo".into())]),
        accessible_topology: Some(node),
    };
    let got = ok(p.controller.clone().get_capacity(cap_req).await, "GetCapacity for the node").available_capacity;
    assert!(got > 0, "GetCapacity for a node that can reach the export is {got}");
    p.delete(&v.volume_id).await;
}

async fn lifecycle_over_nfs_v3_and_v4_2() {
    let _shared = SERVER.read().await;
    let cases = [("nfs-v3", "nfsvers=3", "nfs", "vers=3"), ("nfs-v42", "nfsvers=4.2", "nfs4", "vers=4.2")];
    // One driver per pool: two pools on one export are refused (they could take each other's
    // directories), so each NFS version gets a driver of its own.
    for (pool_name, opt, want_fs, want_vers) in cases {
        let p = Plugin::start(&pool(pool_name, &format!("mount_options = [\"{opt}\"]"))).await;
        let mode = Mode::SingleNodeWriter;
        let name = unique(pool_name);
        let v = p.create(pool_name, &name, mode, &[("mode", "0777")]).await;
        let id = v.volume_id.clone();
        let dir = on_server(&name);
        assert!(dir.is_dir(), "{pool_name}: {} missing on the server", dir.display());
        let (staging, target) = (p.staging(pool_name), p.target(pool_name));
        p.stage(&id, &staging, mode).await;
        p.stage(&id, &staging, mode).await;
        p.publish(&id, &staging, &target, mode, false).await;
        let (fs, opts) = mount_of(&staging).unwrap_or_else(|| panic!("{pool_name}: nothing mounted at the staging path"));
        assert_eq!(fs, want_fs, "{pool_name}: {opts}");
        assert!(opts.split(',').any(|o| o == want_vers), "{pool_name}: {opts}");
        write_durably(&target.join("data"), b"payload\n");
        assert_eq!(std::fs::read(dir.join("data")).unwrap(), b"payload\n", "{pool_name}: the write is on the server");
        std::fs::File::create(target.join("sparse")).unwrap().set_len(256 * MIB as u64).unwrap();
        let xattr_set = rustix::fs::setxattr(target.join("data"), "user.holdfast", b"x1", rustix::fs::XattrFlags::empty()).is_ok();
        if want_fs == "nfs4" {
            assert!(xattr_set, "{pool_name}: NFSv4.2 supports user xattrs");
        }
        let stats = p.stats(&id, &target).await;
        let cond = stats.volume_condition.expect("condition");
        assert!(!cond.abnormal, "{pool_name}: {}", cond.message);
        assert!(stats.usage.iter().any(|u| u.total > 0), "{pool_name}: usage {:?}", stats.usage);

        // Snapshot, restore, clone: data, holes and xattrs survive.
        let snap_req = CreateSnapshotRequest { name: unique("snap"), source_volume_id: id.clone(), ..Default::default() };
        let snap = ok(
            until_copied(|| {
                let (mut c, r) = (p.controller.clone(), snap_req.clone());
                async move { c.create_snapshot(r).await }
            })
            .await,
            "CreateSnapshot",
        )
        .snapshot
        .unwrap();
        assert!(snap.ready_to_use);
        let sources = [
            ("restore", Source::Snapshot(SnapshotSource { snapshot_id: snap.snapshot_id.clone() })),
            ("clone", Source::Volume(VolumeSource { volume_id: id.clone() })),
        ];
        for (what, source) in sources {
            let copy_name = unique(what);
            let req = CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource { r#type: Some(source) }),
                ..create_request(pool_name, &copy_name, mode, &[])
            };
            let copy = ok(
                until_copied(|| {
                    let (mut c, r) = (p.controller.clone(), req.clone());
                    async move { c.create_volume(r).await }
                })
                .await,
                what,
            )
            .volume
            .unwrap();
            let cdir = on_server(&copy_name);
            assert_eq!(std::fs::read(cdir.join("data")).unwrap(), b"payload\n", "{pool_name} {what}");
            let sparse = std::fs::metadata(cdir.join("sparse")).unwrap();
            assert_eq!(sparse.len(), 256 * MIB as u64);
            assert!(std::os::unix::fs::MetadataExt::blocks(&sparse) * 512 < MIB as u64, "{pool_name} {what}: the hole was filled");
            if xattr_set {
                let mut buf = [0u8; 16];
                let n = rustix::fs::getxattr(cdir.join("data"), "user.holdfast", &mut buf[..]).unwrap_or(0);
                assert_eq!(&buf[..n], b"x1", "{pool_name} {what}: xattr lost");
            }
            let mode_bits = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cdir).unwrap().permissions()) & 0o7777;
            assert_eq!(mode_bits, 0o777, "{pool_name} {what}: the copy keeps the source's mode");
            p.delete(&copy.volume_id).await;
            assert!(!cdir.exists(), "{pool_name} {what}: still on the server after delete");
        }
        ok(
            p.controller.clone().delete_snapshot(DeleteSnapshotRequest { snapshot_id: snap.snapshot_id, ..Default::default() }).await,
            "DeleteSnapshot",
        );

        // Expansion is recorded (no quota on NFS).
        let req = ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
            ..Default::default()
        };
        assert_eq!(ok(p.controller.clone().controller_expand_volume(req).await, "ControllerExpandVolume").capacity_bytes, 128 * MIB);

        p.unpublish(&id, &target).await;
        p.unstage(&id, &staging).await;
        p.unstage(&id, &staging).await;
        p.delete(&id).await;
        p.delete(&id).await;
        assert!(!dir.exists(), "{pool_name}: {} left on the server", dir.display());
    }
}

async fn on_delete_leaves_what_it_promises() {
    let _shared = SERVER.read().await;
    let tag = unique("ondel");
    // One driver per pool: pools on one export are refused at start-up.
    for how in ["delete", "retain", "archive"] {
        let p =
            Plugin::start(&pool(&format!("nfs-{how}"), &format!("on_delete = \"{how}\"\nsubdir = \"{tag}/{how}/${{pvc.metadata.name}}\"")))
                .await;
        let v = p
            .create(
                &format!("nfs-{how}"),
                &unique(how),
                Mode::SingleNodeWriter,
                &[("csi.storage.k8s.io/pvc/name", "data"), ("csi.storage.k8s.io/pvc/namespace", "ns")],
            )
            .await;
        let parent = on_server(&format!("{tag}/{how}"));
        std::fs::write(parent.join("data/precious"), b"keep me?").unwrap();
        p.delete(&v.volume_id).await;
        p.delete(&v.volume_id).await;
        let left: BTreeSet<String> = std::fs::read_dir(&parent)
            .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        match how {
            "delete" => assert!(!parent.exists(), "delete left {left:?} (and its empty parent)"),
            "retain" => {
                assert_eq!(left, BTreeSet::from(["data".to_owned()]));
                assert_eq!(std::fs::read(parent.join("data/precious")).unwrap(), b"keep me?");
            }
            _ => {
                assert_eq!(left.len(), 1, "archive left {left:?}");
                let name = left.first().unwrap();
                assert!(name.starts_with("archived-data-") && name.ends_with('Z'), "archived as {name}");
                assert_eq!(std::fs::read(parent.join(name).join("precious")).unwrap(), b"keep me?");
            }
        }
        let got = p.controller.clone().controller_get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await;
        expect_code(got, Code::NotFound, &format!("ControllerGetVolume after delete ({how})"));
        // A new claim of a retained or archived place starts empty or is refused; never mixes data.
        if how == "retain" {
            let again =
                create_request(&format!("nfs-{how}"), &unique(how), Mode::SingleNodeWriter, &[("csi.storage.k8s.io/pvc/name", "data")]);
            expect_code(p.controller.clone().create_volume(again).await, Code::FailedPrecondition, "CreateVolume over retained data");
        }
    }
    let _ = std::fs::remove_dir_all(on_server(&tag));
}

/// Every entry under `dir`, recursively (not following symlinks), for before/after comparisons.
fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

async fn hostile_names_never_touch_anything_outside_the_export() {
    // Alone on the server: it compares listings of the whole export before and after.
    let _alone = SERVER.write().await;
    let tag = unique("hostile");
    // One driver per pool: pools on one export are refused at start-up.
    let plain = Plugin::start(&pool("nfs-plain", "")).await;
    let nested =
        Plugin::start(&pool("nfs-nested", &format!("subdir = \"{tag}/${{pvc.metadata.namespace}}/${{pvc.metadata.name}}\""))).await;
    let p = &plain;
    let watched = ["/etc", "/srv", "/run/holdfast"];
    let before: Vec<BTreeSet<PathBuf>> = watched.iter().map(|d| listing(Path::new(d))).collect();
    struct Case {
        pool: &'static str,
        name: &'static str,
        params: &'static [(&'static str, &'static str)],
        want: Code,
    }
    let cases = [
        Case { pool: "nfs-plain", name: "../../etc", params: &[], want: Code::InvalidArgument },
        Case { pool: "nfs-plain", name: "..", params: &[], want: Code::InvalidArgument },
        Case { pool: "nfs-plain", name: "/etc/passwd", params: &[], want: Code::InvalidArgument },
        Case { pool: "nfs-plain", name: ".holdfast", params: &[], want: Code::InvalidArgument },
        Case {
            pool: "nfs-nested",
            name: "pvc-h1",
            params: &[("csi.storage.k8s.io/pvc/namespace", "ns"), ("csi.storage.k8s.io/pvc/name", "../../etc")],
            want: Code::InvalidArgument,
        },
        Case {
            pool: "nfs-nested",
            name: "pvc-h2",
            params: &[("csi.storage.k8s.io/pvc/namespace", ".."), ("csi.storage.k8s.io/pvc/name", "..")],
            want: Code::InvalidArgument,
        },
        Case { pool: "nfs-nested", name: "pvc-h3", params: &[("csi.storage.k8s.io/pvc/namespace", "ns")], want: Code::InvalidArgument },
        // A symlink planted on the export towards /etc is never followed.
        Case {
            pool: "nfs-nested",
            name: "pvc-h4",
            params: &[("csi.storage.k8s.io/pvc/namespace", "evil"), ("csi.storage.k8s.io/pvc/name", "x")],
            want: Code::FailedPrecondition,
        },
    ];
    std::fs::create_dir_all(on_server(&tag)).unwrap();
    std::os::unix::fs::symlink("/etc", on_server(&tag).join("evil")).unwrap();
    let before_export = listing(Path::new(EXPORT));
    for c in cases {
        let req = create_request(c.pool, c.name, Mode::SingleNodeWriter, c.params);
        let driver = if c.pool == "nfs-plain" { &plain } else { &nested };
        let s =
            expect_code(driver.controller.clone().create_volume(req).await, c.want, &format!("CreateVolume {:?} {:?}", c.name, c.params));
        assert!(!s.message().is_empty());
    }
    for (d, b) in watched.iter().zip(&before) {
        let after = listing(Path::new(d));
        let new: Vec<_> = after.difference(b).filter(|p| !p.starts_with(EXPORT) && !p.starts_with("/run/holdfast/nfs")).collect();
        assert!(new.is_empty(), "{d}: new entries outside the export: {new:?}");
    }
    let after_export = listing(Path::new(EXPORT));
    let new: Vec<_> = after_export.difference(&before_export).filter(|p| !p.starts_with(Path::new(EXPORT).join(".holdfast"))).collect();
    assert!(new.is_empty(), "refused creates left {new:?} on the export");
    // Ids are never paths either.
    for bad in ["nfs:-:nfs-plain:..", "nfs:-:nfs-plain:../../etc", "nfs:-:nfs-plain:a/b"] {
        let got = p.controller.clone().controller_get_volume(ControllerGetVolumeRequest { volume_id: bad.into() }).await;
        expect_code(got, Code::NotFound, bad);
        ok(p.controller.clone().delete_volume(DeleteVolumeRequest { volume_id: bad.into(), ..Default::default() }).await, bad);
    }
    let _ = std::fs::remove_dir_all(on_server(&tag));
}

/// Restarts the NFS server (and re-exports) when dropped, so a failed test does not leave it down.
struct ServerRestart;

impl Drop for ServerRestart {
    fn drop(&mut self) {
        run("rpc.nfsd", &["8"]);
        run("exportfs", &["-o", "rw,no_root_squash,insecure,no_subtree_check,sync", &format!("{SERVER_ADDR}:{EXPORT}")]);
    }
}

/// Polls NodeGetVolumeStats until the condition is `abnormal` (or the deadline passes); returns
/// the last answer and how long the last call took.
async fn stats_within(p: &Plugin, id: &str, target: &Path, limit: Duration) -> Result<(VolumeCondition, Duration), String> {
    let started = Instant::now();
    match tokio::time::timeout(limit, p.node.clone().node_get_volume_stats(p.stats_request(id, target))).await {
        Err(_) => Err(format!("NodeGetVolumeStats did not answer within {limit:?}")),
        Ok(Err(s)) => Err(format!("NodeGetVolumeStats failed with {:?}: {}", s.code(), s.message())),
        Ok(Ok(r)) => Ok((r.into_inner().volume_condition.unwrap_or_default(), started.elapsed())),
    }
}

async fn wait_healthy(p: &Plugin, id: &str, target: &Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok((c, _)) = stats_within(p, id, target, Duration::from_secs(30)).await {
            if !c.abnormal {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the volume did not become healthy again within 90 s of restarting the server");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn a_stopped_server_is_reported_abnormal_quickly() {
    let _alone = SERVER.write().await;
    // The default (hard) mount, and a soft one that gives up after ~2 s.
    // One driver per pool: pools on one export are refused at start-up.
    let hard = Plugin::start(&pool("nfs-hard", "mount_options = [\"nfsvers=4.2\"]")).await;
    let soft = Plugin::start(&pool("nfs-soft", "mount_options = [\"nfsvers=4.2\", \"soft\", \"timeo=10\", \"retrans=1\"]")).await;
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for pool_name in ["nfs-soft", "nfs-hard"] {
        let p = if pool_name == "nfs-soft" { &soft } else { &hard };
        let mode = Mode::MultiNodeMultiWriter;
        let v = p.create(pool_name, &unique(pool_name), mode, &[]).await;
        let id = v.volume_id.clone();
        let (staging, target) = (p.staging(pool_name), p.target(pool_name));
        p.stage(&id, &staging, mode).await;
        p.publish(&id, &staging, &target, mode, false).await;
        write_durably(&target.join("f"), b"x");
        let (healthy, _) = stats_within(p, &id, &target, Duration::from_secs(30)).await.unwrap();
        assert!(!healthy.abnormal, "{pool_name}: {}", healthy.message);

        for (how, stop, start) in [
            ("exportfs -u", vec!["exportfs", "-u"], vec!["exportfs", "-o", "rw,no_root_squash,insecure,no_subtree_check,sync"]),
            ("rpc.nfsd 0", vec!["rpc.nfsd", "0"], vec!["rpc.nfsd", "8"]),
        ] {
            let client = format!("{SERVER_ADDR}:{EXPORT}");
            let with_client = |mut v: Vec<&'static str>| -> Vec<String> {
                let mut out: Vec<String> = v.drain(..).map(str::to_owned).collect();
                if out[0] == "exportfs" {
                    out.push(client.clone());
                }
                out
            };
            let (stop, start) = (with_client(stop), with_client(start));
            let restart = ServerRestart;
            assert!(run(&stop[0], &stop[1..].iter().map(String::as_str).collect::<Vec<_>>()), "{how}");
            // The pool's own view (no node-side statvfs involved): ControllerGetVolume's condition.
            let started = Instant::now();
            let get = ControllerGetVolumeRequest { volume_id: id.clone() };
            match tokio::time::timeout(Duration::from_secs(30), p.controller.clone().controller_get_volume(get)).await {
                Ok(Ok(r)) => {
                    let c = r.into_inner().status.and_then(|s| s.volume_condition).unwrap_or_default();
                    let took = started.elapsed();
                    report
                        .push(format!("{pool_name} after {how}: ControllerGetVolume abnormal={} in {took:.1?}: {}", c.abnormal, c.message));
                    if !c.abnormal || took > Duration::from_secs(10) {
                        failures.push(format!("{pool_name} after {how}: ControllerGetVolume abnormal={} in {took:.1?}", c.abnormal));
                    }
                }
                Ok(Err(s)) => failures.push(format!("{pool_name} after {how}: ControllerGetVolume {:?}: {}", s.code(), s.message())),
                Err(_) => failures.push(format!("{pool_name} after {how}: ControllerGetVolume did not answer within 30 s")),
            }
            match stats_within(p, &id, &target, Duration::from_secs(30)).await {
                Ok((c, took)) => {
                    report.push(format!("{pool_name} after {how}: abnormal={} in {took:.1?}: {}", c.abnormal, c.message));
                    if !c.abnormal || took > Duration::from_secs(10) {
                        failures.push(format!("{pool_name} after {how}: abnormal={} in {took:.1?}", c.abnormal));
                    }
                }
                Err(e) => {
                    report.push(format!("{pool_name} after {how}: {e}"));
                    failures.push(format!("{pool_name} after {how}: {e}"));
                }
            }
            assert!(run(&start[0], &start[1..].iter().map(String::as_str).collect::<Vec<_>>()), "restarting after {how}");
            drop(restart);
            wait_healthy(p, &id, &target).await;
        }
        p.unpublish(&id, &target).await;
        p.unstage(&id, &staging).await;
        p.delete(&id).await;
    }
    let _ = writeln!(std::io::stderr(), "stopped-server report:\n  {}", report.join("\n  "));
    assert!(failures.is_empty(), "NodeGetVolumeStats with the server stopped: {failures:?}\nfull report: {report:#?}");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Runs a command for the by-hand measurement, failing the test if it fails.
fn sh(program: &str, args: &[&str]) {
    assert!(run(program, args), "{program} {args:?}");
}

async fn timing_create_stage_publish_versus_mkdir_and_mount_by_hand() {
    let _alone = SERVER.write().await;
    const ROUNDS: usize = 5;
    let opts = "nfsvers=4.2";
    let p = Plugin::start(&pool("nfs-time", &format!("mount_options = [\"{opt}\"]", opt = opts))).await;
    let mode = Mode::SingleNodeWriter;
    // Warm-up: the first call mounts the pool's working mount.
    let w = p.create("nfs-time", &unique("warm"), mode, &[]).await;
    p.delete(&w.volume_id).await;

    let (mut hf_total, mut hf_create, mut hf_stage, mut hf_publish) = (vec![], vec![], vec![], vec![]);
    let mut made = Vec::new();
    for i in 0..ROUNDS {
        let (staging, target) = (p.staging(&format!("hf{i}")), p.target(&format!("hf{i}")));
        let t0 = Instant::now();
        let v = p.create("nfs-time", &unique("time"), mode, &[]).await;
        let t1 = Instant::now();
        p.stage(&v.volume_id, &staging, mode).await;
        let t2 = Instant::now();
        p.publish(&v.volume_id, &staging, &target, mode, false).await;
        let t3 = Instant::now();
        hf_create.push(t1 - t0);
        hf_stage.push(t2 - t1);
        hf_publish.push(t3 - t2);
        hf_total.push(t3 - t0);
        made.push((v.volume_id, staging, target));
    }
    for (id, staging, target) in &made {
        p.unpublish(id, target).await;
        p.unstage(id, staging).await;
        p.delete(id).await;
    }

    // By hand: the export mounted once (like holdfast's working mount), then per volume
    // mkdir + mount of the subdirectory + bind to the pod's path.
    let work = p.path("by-hand-export");
    std::fs::create_dir_all(&work).unwrap();
    sh("mount", &["-t", "nfs", "-o", opts, &format!("{SERVER_ADDR}:{EXPORT}"), &path_str(&work)]);
    let mut by_hand = Vec::new();
    let tag = unique("byhand");
    for i in 0..ROUNDS {
        let (staging, target) = (p.staging(&format!("bh{i}")), p.target(&format!("bh{i}")));
        let name = format!("{tag}-{i}");
        let t0 = Instant::now();
        sh("mkdir", &[&path_str(&work.join(&name))]);
        sh("mount", &["-t", "nfs", "-o", opts, &format!("{SERVER_ADDR}:{EXPORT}/{name}"), &path_str(&staging)]);
        std::fs::create_dir(&target).unwrap();
        sh("mount", &["--bind", &path_str(&staging), &path_str(&target)]);
        by_hand.push(t0.elapsed());
        sh("umount", &[&path_str(&target)]);
        sh("umount", &[&path_str(&staging)]);
        std::fs::remove_dir(work.join(&name)).unwrap();
    }
    sh("umount", &[&path_str(&work)]);
    let line = |what: &str, v: &Vec<Duration>| {
        format!(
            "{what:<44} median {:>8}  min {:>8}  max {:>8}",
            ms(median(v.clone())),
            ms(*v.iter().min().unwrap()),
            ms(*v.iter().max().unwrap())
        )
    };
    let _ = writeln!(
        std::io::stderr(),
        "timing over {ROUNDS} rounds ({opts}):\n  {}\n    {}\n    {}\n    {}\n  {}",
        line("holdfast CreateVolume+NodeStage+NodePublish", &hf_total),
        line("CreateVolume", &hf_create),
        line("NodeStageVolume", &hf_stage),
        line("NodePublishVolume", &hf_publish),
        line("by hand: mkdir + mount + mount --bind", &by_hand),
    );
}

/// A volume group with a thin pool `tp0` on a loop device, for a node-local pool beside the nfs
/// ones; removed on drop.
struct LoopVg {
    _dir: tempfile::TempDir,
    device: String,
    vg: String,
}

impl LoopVg {
    fn new(tag: &str) -> LoopVg {
        let dir = tempfile::Builder::new().prefix("holdfast-nfs-vg-").tempdir_in("/var/tmp").expect("temp dir");
        let file = dir.path().join("pv.img");
        File::create(&file).and_then(|f| f.set_len(512 << 20)).expect("PV file");
        let out = Command::new("losetup").args(["--find", "--show"]).arg(&file).output().expect("losetup");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let vg = format!("hfsick-{tag}-{}", std::process::id());
        let lvg = LoopVg { _dir: dir, device, vg };
        assert!(run("pvcreate", &["-q", &lvg.device]), "pvcreate");
        assert!(run("vgcreate", &["-q", "-s", "1M", &lvg.vg, &lvg.device]), "vgcreate");
        // A thin pool: lvm pools take snapshots in one.
        assert!(run("lvcreate", &["-q", "-y", "--type", "thin-pool", "-L", "256M", "-n", "tp0", &lvg.vg]), "lvcreate thin pool");
        lvg
    }
}

impl Drop for LoopVg {
    fn drop(&mut self) {
        run("vgremove", &["-q", "-f", &self.vg]);
        run("pvremove", &["-q", "-f", &self.device]);
        run("losetup", &["-d", &self.device]);
    }
}

async fn a_stopped_server_makes_only_the_nfs_pool_sick() {
    let _alone = SERVER.write().await;
    let vg = LoopVg::new("sick");
    let config = format!("[[pool]]\nname = \"fast\"\nkind = \"lvm\"\nvolume_group = \"{}\"\nthin_pool = \"tp0\"\n\n", vg.vg)
        + &pool("shared", "mount_options = [\"nfsvers=4.2\", \"soft\", \"timeo=10\", \"retrans=1\"]");
    let p = Plugin::start(&config).await;
    let mode = Mode::SingleNodeWriter;
    let on_nfs = p.create("shared", &unique("sick-nfs"), mode, &[]).await;
    let on_lvm = p.create("fast", &unique("sick-lvm"), mode, &[]).await;
    let listed = ok(p.controller.clone().list_volumes(ListVolumesRequest::default()).await, "ListVolumes");
    assert_eq!(listed.entries.len(), 2, "{listed:?}");

    let restart = ServerRestart;
    assert!(run("rpc.nfsd", &["0"]), "rpc.nfsd 0");
    let within = Duration::from_secs(30);
    let mut c = p.controller.clone();
    // A create that could land on the sick pool (no pool parameter) cannot know whether an
    // earlier attempt did: retryable UNAVAILABLE, and nothing is made anywhere.
    let mut anywhere = create_request("fast", &unique("sick-any"), mode, &[]);
    anywhere.parameters.clear();
    let r = tokio::time::timeout(within, c.create_volume(anywhere.clone())).await.expect("CreateVolume did not answer");
    expect_code(r, Code::Unavailable, "CreateVolume whose candidates include the stopped server's pool");
    // A create on the healthy pool proceeds.
    let named = create_request("fast", &unique("sick-fast"), mode, &[]);
    let r = tokio::time::timeout(within, c.create_volume(named)).await.expect("CreateVolume pool=fast did not answer");
    let made = ok(r, "CreateVolume pool=fast with the NFS server stopped").volume.expect("no volume");
    // ListVolumes answers from the healthy pool and lists the sick pool's volume as abnormal.
    let r = tokio::time::timeout(within, c.list_volumes(ListVolumesRequest::default())).await.expect("ListVolumes did not answer");
    let listed = ok(r, "ListVolumes with the NFS server stopped");
    let cond = |id: &str| {
        listed
            .entries
            .iter()
            .find(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == id))
            .and_then(|e| e.status.clone()?.volume_condition)
    };
    assert!(cond(&on_lvm.volume_id).is_some_and(|c| !c.abnormal), "lvm volume: {:?}", cond(&on_lvm.volume_id));
    assert!(cond(&made.volume_id).is_some_and(|c| !c.abnormal), "new lvm volume: {:?}", cond(&made.volume_id));
    assert!(cond(&on_nfs.volume_id).is_some_and(|c| c.abnormal), "nfs volume: {:?}", cond(&on_nfs.volume_id));
    assert!(
        !listed.entries.iter().any(|e| e.volume.as_ref().is_some_and(|v| v.volume_id.contains("sick-any"))),
        "the refused create made a volume"
    );
    // GetCapacity: the healthy pool's room.
    let req = GetCapacityRequest { volume_capabilities: vec![cap(mode)], ..Default::default() };
    let r = tokio::time::timeout(within, c.get_capacity(req)).await.expect("GetCapacity did not answer");
    assert!(ok(r, "GetCapacity with the NFS server stopped").available_capacity > 0);
    // CreateSnapshot of a volume of the healthy pool.
    let snap = CreateSnapshotRequest { name: unique("sick-snap"), source_volume_id: on_lvm.volume_id.clone(), ..Default::default() };
    let r = tokio::time::timeout(within, c.create_snapshot(snap)).await.expect("CreateSnapshot did not answer");
    let snap = ok(r, "CreateSnapshot on lvm with the NFS server stopped").snapshot.expect("no snapshot");
    // The pool's sickness is logged once, not once per call.
    let log = std::fs::read_to_string(&p.log).unwrap_or_default();
    let lines = log.lines().filter(|l| l.contains("pool does not answer") && l.contains("shared")).count();
    assert_eq!(lines, 1, "log lines about the sick pool:\n{log}");

    drop(restart);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match tokio::time::timeout(within, c.create_volume(anywhere.clone())).await {
            Ok(Ok(v)) => {
                p.delete(&v.into_inner().volume.expect("no volume").volume_id).await;
                break;
            }
            other => assert!(Instant::now() < deadline, "creates did not work again within 90 s of restarting the server: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ok(c.delete_snapshot(DeleteSnapshotRequest { snapshot_id: snap.snapshot_id, ..Default::default() }).await, "DeleteSnapshot");
    for id in [&on_lvm.volume_id, &made.volume_id, &on_nfs.volume_id] {
        p.delete(id).await;
    }
}

async fn a_volume_directory_swapped_for_a_symlink_is_never_used_through_it() {
    let _shared = SERVER.read().await;
    let p = Plugin::start(&pool("nfs-swap", "mount_options = [\"nfsvers=4.2\"]")).await;
    let mode = Mode::MultiNodeMultiWriter;
    let name = unique("swapped");
    let v = p.create("nfs-swap", &name, mode, &[]).await;
    let dir = on_server(&name);
    write_durably(&dir.join("mine"), b"the volume's");
    // A workload with access to the export moves the directory away and links a victim in.
    let victim = on_server(&unique("victim"));
    std::fs::create_dir(&victim).unwrap();
    write_durably(&victim.join("secret"), b"someone else's");
    let moved = on_server(&unique("moved"));
    std::fs::rename(&dir, &moved).unwrap();
    std::os::unix::fs::symlink(&victim, &dir).unwrap();

    let staging = p.staging("swapped");
    let stage = NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: path_str(&staging),
        volume_capability: Some(cap(mode)),
        ..Default::default()
    };
    expect_code(p.node.clone().node_stage_volume(stage).await, Code::FailedPrecondition, "NodeStageVolume of a swapped directory");
    assert_eq!(mount_of(&staging), None, "something was mounted at the staging path");
    let snap = CreateSnapshotRequest { name: unique("swapped-snap"), source_volume_id: v.volume_id.clone(), ..Default::default() };
    expect_code(p.controller.clone().create_snapshot(snap).await, Code::FailedPrecondition, "CreateSnapshot of a swapped directory");
    let mut clone = create_request("nfs-swap", &unique("swapped-clone"), mode, &[]);
    clone.volume_content_source =
        Some(VolumeContentSource { r#type: Some(Source::Volume(VolumeSource { volume_id: v.volume_id.clone() })) });
    expect_code(p.controller.clone().create_volume(clone).await, Code::FailedPrecondition, "a clone of a swapped directory");
    let del = DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() };
    expect_code(p.controller.clone().delete_volume(del).await, Code::FailedPrecondition, "DeleteVolume of a swapped directory");
    assert_eq!(std::fs::read(victim.join("secret")).unwrap(), b"someone else's", "the victim was touched");
    assert!(dir.is_symlink(), "the link was moved");

    // Put back, everything works again.
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&moved, &dir).unwrap();
    p.delete(&v.volume_id).await;
    assert!(!dir.exists());
    std::fs::remove_dir_all(&victim).unwrap();
}

/// Repeats a copying request (clone, restore, snapshot) while it answers ABORTED, as a CO does:
/// copies run detached from their request, and one longer than the request's wait (seconds
/// under the software-emulated VM) answers "copy … in progress" until it is done. Bounded.
async fn until_copied<T, F, Fut>(mut call: F) -> Result<tonic::Response<T>, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
    loop {
        let r = call().await;
        match &r {
            Err(e) if e.code() == tonic::Code::Aborted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            _ => return r,
        }
    }
}
