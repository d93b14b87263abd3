//! Real ZFS tests of the `zfs` pool: datasets with their quota enforced and properties applied,
//! zvols formatted and grown by the node, snapshots restored and volumes cloned (zvol copies
//! mounted beside their source), deleting volumes that others depend on, retries after a driver
//! killed half-way, a missing zpool, and a degraded zpool making volumes abnormal.
//!
//! They need the ZFS kernel module, which the development machine's kernel lacks, so they run
//! inside the test VM: `tests/vm/zfs-suite.sh` builds them on the host, makes the zpool
//! (`HOLDFAST_ZFS_POOL`, default `hfzfs`) on a VM disk and runs them there. Each test works in
//! its own parent dataset `<zpool>/t-<test>-<pid>`, destroyed by a Drop guard.
//!
//! The harness is tests/common/real.rs (`harness = false`): outside the VM a run says plainly that
//! it ran nothing instead of reporting tests as passed; inside it (the guest's `/run/holdfast-vm`,
//! `HOLDFAST_VM=1` on a machine with ZFS, or `HOLDFAST_REQUIRE_REAL=1`, which the VM suites
//! set) missing ZFS is a failure. Arguments as for libtest: name filters, `--exact`,
//! `--skip`, `--list`. Tests are listed in `TESTS`, not marked with test attributes (compiled out here).

use std::future::Future;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use holdfast::config::Config;
use holdfast::error::Error;
use holdfast::exec::{Cmd, Exec, ExecError, Output, RealExec};
use holdfast::node::mount::RealMounter;
use holdfast::node::safepath::RequestPath;
use holdfast::node::{Node, format};
use holdfast::pool::zfs::{HIDDEN, ZfsPool};
use holdfast::pool::{Attachment, Condition, CreateRequest, Pool, Source};
use holdfast::volume_id::local_name;

#[path = "common/real.rs"]
mod real;

// `harness = false` compiles test attributes out without a word: tests go in TESTS.
const _: () = assert!(!real::has_test_attribute(include_str!("zfs.rs")), "tests/zfs.rs: list tests in TESTS, not with test attributes");

const MIB: u64 = 1 << 20;

type TestFn = fn() -> Pin<Box<dyn Future<Output = ()> + Send>>;

const TESTS: &[(&str, TestFn)] = &[
    ("dataset_properties_quota_and_expansion", || Box::pin(dataset_properties_quota_and_expansion())),
    ("zvol_filesystem_and_block_volumes", || Box::pin(zvol_filesystem_and_block_volumes())),
    ("dataset_snapshot_restore_and_clone", || Box::pin(dataset_snapshot_restore_and_clone())),
    ("zvol_copies_mount_beside_their_source_ext4", || Box::pin(zvol_copies_mount_beside_their_source("ext4"))),
    ("zvol_copies_mount_beside_their_source_xfs", || Box::pin(zvol_copies_mount_beside_their_source("xfs"))),
    ("deleting_what_others_depend_on_keeps_their_data", || Box::pin(deleting_what_others_depend_on_keeps_their_data())),
    ("retries_after_a_kill_make_exactly_one_volume", || Box::pin(retries_after_a_kill_make_exactly_one_volume())),
    ("parameters_are_checked_and_mounted_volumes_kept", || Box::pin(parameters_are_checked_and_mounted_volumes_kept())),
    ("missing_zpool_and_missing_parent", || Box::pin(missing_zpool_and_missing_parent())),
    ("degraded_zpool_makes_volumes_abnormal", || Box::pin(degraded_zpool_makes_volumes_abnormal())),
    ("what_an_operator_made_under_a_volume_is_never_destroyed", || Box::pin(what_an_operator_made_under_a_volume_is_never_destroyed())),
    ("copied_holdfast_properties_do_not_make_a_second_volume", || Box::pin(copied_holdfast_properties_do_not_make_a_second_volume())),
];

fn in_vm() -> bool {
    Path::new("/run/holdfast-vm").exists() || std::env::var("HOLDFAST_VM").is_ok_and(|v| v == "1")
}

fn zpool() -> String {
    std::env::var("HOLDFAST_ZFS_POOL").unwrap_or_else(|_| "hfzfs".into())
}

/// Why ZFS cannot run here, if it cannot.
fn zfs_problem() -> Option<String> {
    if !Path::new("/dev/zfs").exists() {
        return Some("/dev/zfs is missing: the zfs kernel module is not loaded (modprobe zfs; the ZFS image: tests/vm/run --zfs)".into());
    }
    match std::process::Command::new("zpool").args(["list", "-H", "-o", "name,health", &zpool()]).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "zpool {} is not there (tests/vm/zfs-suite.sh creates it; or set HOLDFAST_ZFS_POOL): {}",
            zpool(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run zpool: {e} (is zfsutils-linux installed?)")),
    }
}

fn main() -> ExitCode {
    let suite = real::Suite {
        file: "tests/zfs.rs",
        needs: "the ZFS kernel module and a zpool",
        how: "tests/vm/zfs-suite.sh (or tests/vm/run --zfs -- this binary)",
        required: in_vm(),
        parallel: false,
    };
    real::main(&suite, TESTS, zfs_problem)
}

// ---------------------------------------------------------------------------------------------
// The lab: one parent dataset per test, destroyed by Drop with everything under it.

struct Lab {
    dir: tempfile::TempDir,
    parent: String,
    exec: Arc<RealExec>,
    node: Node,
    mounts: Mutex<Vec<PathBuf>>,
    zpools: Mutex<Vec<String>>,
}

/// Runs a command, panicking with its stderr.
async fn run(args: &[&str]) -> String {
    let cmd = Cmd::new(args[0]).args(args[1..].iter().copied()).timeout(Duration::from_secs(300));
    match RealExec.run(cmd).await {
        Ok(out) => out.stdout,
        Err(e) => panic!("{e}"),
    }
}

/// One property of a dataset, as `zfs get -Hp` prints it.
async fn prop(name: &str, property: &str) -> String {
    run(&["zfs", "get", "-H", "-p", "-o", "value", property, name]).await.trim().to_owned()
}

impl Lab {
    async fn new(tag: &str) -> Lab {
        let dir = tempfile::Builder::new().prefix("holdfast-zfs-").tempdir().expect("temp dir");
        let parent = format!("{}/t-{tag}-{}", zpool(), std::process::id());
        let exec = Arc::new(RealExec);
        let node = Node::new(exec.clone(), Arc::new(RealMounter::new(exec.clone())));
        Lab { dir, parent, exec, node, mounts: Mutex::new(Vec::new()), zpools: Mutex::new(Vec::new()) }
    }

    fn config(name: &str, dataset: &str, extra: &str) -> holdfast::config::PoolConfig {
        let src = format!("[[pool]]\nname = \"{name}\"\nkind = \"zfs\"\ndataset = \"{dataset}\"\n{extra}");
        Config::parse(&src).expect("config").pools.remove(0)
    }

    fn pool(&self, extra: &str) -> ZfsPool {
        ZfsPool::new(&Self::config("zp", &self.parent, extra), self.exec.clone()).expect("ZfsPool::new")
    }

    fn pool_with(&self, exec: Arc<dyn Exec>) -> ZfsPool {
        ZfsPool::new(&Self::config("zp", &self.parent, ""), exec).expect("ZfsPool::new")
    }

    /// Names of everything under the parent (datasets, zvols, snapshots), parent excluded.
    async fn objects(&self) -> Vec<String> {
        let out = run(&["zfs", "list", "-H", "-o", "name", "-t", "all", "-r", &self.parent]).await;
        out.lines().filter(|l| *l != self.parent).map(str::to_owned).collect()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stages a volume as the CSI node does (attach, format a blank device, mount).
    async fn stage(&self, pool: &dyn Pool, local: &str, fs: &str, name: &str) -> (Attachment, PathBuf) {
        let attachment = pool.attach(local).await.unwrap_or_else(|e| panic!("attach {local}: {e}"));
        let staging = self.path(name);
        let at = RequestPath::internal(&staging).unwrap();
        self.node.stage_filesystem(&attachment, &at, fs, &[]).await.unwrap_or_else(|e| panic!("stage {local}: {e}"));
        self.mounts.lock().unwrap().push(staging.clone());
        (attachment, staging)
    }

    async fn unstage(&self, staging: &Path) {
        let at = RequestPath::internal(staging).unwrap();
        // Only this lab's own mounts are ever at its paths.
        self.node.unstage(&at, &|_| true).await.unwrap_or_else(|e| panic!("unstage {}: {e}", staging.display()));
        self.mounts.lock().unwrap().retain(|m| m != staging);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let sh = |args: &[&str]| {
            let _ = std::process::Command::new(args[0]).args(&args[1..]).output();
        };
        for m in self.mounts.lock().unwrap().iter().rev() {
            sh(&["umount", "-l", m.to_str().unwrap()]);
        }
        // Only the test's own parent: -R takes the clones inside it too.
        sh(&["zfs", "destroy", "-R", "-f", &self.parent]);
        for p in self.zpools.lock().unwrap().iter() {
            sh(&["zpool", "destroy", "-f", p]);
        }
    }
}

fn request(csi_name: &str, capacity: u64, fs: Option<&str>) -> CreateRequest {
    CreateRequest {
        csi_name: csi_name.into(),
        local: local_name(csi_name),
        capacity,
        block: fs.is_none(),
        fs_type: fs.map(str::to_owned),
        source: None,
        parameters: Default::default(),
        limit: 0,
        uid: holdfast::volume_id::new_uid(),
        source_uid: None,
        mutable: Default::default(),
    }
}

fn write_durably(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn fs_size(dir: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(dir).unwrap();
    s.blocks() * s.fragment_size()
}

/// Incompressible bytes (compression must not make room a quota test relies on).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes incompressible data to `path` in 1 MiB chunks, up to `limit` bytes, then fsyncs;
/// returns the bytes written and the error that stopped it, if any. (The same random MiB each
/// time: ZFS compresses each record on its own and dedups nothing here.)
fn fill(path: &Path, limit: u64) -> (u64, Option<std::io::Error>) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = noise(MIB as usize, limit);
    let mut written = 0;
    while written < limit {
        if let Err(e) = f.write_all(&chunk) {
            return (written, Some(e));
        }
        written += MIB;
    }
    (written, f.sync_all().err())
}

fn device(a: &Attachment) -> PathBuf {
    match a {
        Attachment::Device(p) => {
            assert!(std::fs::metadata(p).expect("device node").file_type().is_block_device(), "{} is not a block device", p.display());
            p.clone()
        }
        other => panic!("a zvol attaches as a device, not {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

async fn dataset_properties_quota_and_expansion() {
    let lab = Lab::new("quota").await;
    let pool = lab.pool("properties = { compression = \"lz4\", atime = \"off\" }\n");
    let mut req = request("Quota Volume ✓ not a local name", 16 * MIB, Some("zfs"));
    req.parameters.insert("recordsize".into(), "16K".into());
    req.parameters.insert("volblocksize".into(), "16K".into()); // a zvol property: not applied to a dataset
    let v = pool.create_volume(&req).await.unwrap();
    assert_eq!((v.capacity, v.block, v.fs_type.as_deref(), v.csi_name.as_str()), (16 * MIB, false, Some("zfs"), req.csi_name.as_str()));
    let ds = format!("{}/{}", lab.parent, req.local);
    for (p, want) in [
        ("mountpoint", "legacy"),
        ("refquota", "16777216"),
        ("quota", "0"),
        ("compression", "lz4"),
        ("atime", "off"),
        ("recordsize", "16384"),
        ("holdfast:name", req.csi_name.as_str()),
        ("holdfast:pool", "zp"),
    ] {
        assert_eq!(prop(&ds, p).await, want, "{p} of {ds}");
    }
    assert_eq!(pool.create_volume(&req).await.unwrap(), v, "a retried create returns the same volume");
    assert!(matches!(pool.create_volume(&CreateRequest { capacity: 32 * MIB, ..req.clone() }).await, Err(Error::AlreadyExists(_))));

    // The node mounts it by name; the quota holds writes to the capacity.
    let (attachment, staging) = lab.stage(&pool, &req.local, "zfs", "quota").await;
    assert_eq!(attachment, Attachment::Mount { source: ds.clone(), fs_type: "zfs".into(), options: vec![] });
    let size = fs_size(&staging);
    assert!(size <= 16 * MIB && size > 12 * MIB, "statvfs size {size} of a 16 MiB refquota");
    let (written, err) = fill(&staging.join("big"), 32 * MIB);
    let err = err.unwrap_or_else(|| panic!("wrote {written} bytes into a 16 MiB volume without an error"));
    assert!(matches!(err.raw_os_error(), Some(libc::EDQUOT) | Some(libc::ENOSPC)), "write past the quota failed with {err}");
    assert!(written <= 24 * MIB, "{written} bytes went into a 16 MiB volume");
    std::fs::remove_file(staging.join("big")).unwrap();
    assert_eq!(pool.condition(&req.local).await.unwrap(), Condition::Healthy);

    // Expansion raises the quota; the mounted filesystem shows it at once.
    assert_eq!(pool.expand_volume(&req.local, 48 * MIB).await.unwrap(), 48 * MIB);
    assert_eq!(pool.expand_volume(&req.local, 8 * MIB).await.unwrap(), 48 * MIB, "never shrinks");
    assert!(fs_size(&staging) > 44 * MIB, "statvfs size {} after expanding to 48 MiB", fs_size(&staging));
    let (written, err) = fill(&staging.join("bigger"), 24 * MIB);
    assert!(err.is_none(), "after expansion, writing {written} of 24 MiB failed: {err:?}");

    // quota_mode = "quota" sets quota instead.
    let qpool = lab.pool("quota_mode = \"quota\"\n");
    let q = qpool.create_volume(&request("with-quota", 16 * MIB, Some("zfs"))).await.unwrap();
    let qds = format!("{}/{}", lab.parent, q.local);
    assert_eq!((prop(&qds, "quota").await.as_str(), prop(&qds, "refquota").await.as_str()), ("16777216", "0"));
    assert_eq!(q.capacity, 16 * MIB);

    lab.unstage(&staging).await;
    pool.delete_volume(&req.local).await.unwrap();
    pool.delete_volume(&req.local).await.unwrap();
    qpool.delete_volume(&q.local).await.unwrap();
    assert_eq!(pool.get_volume(&req.local).await.unwrap(), None);
    assert!(lab.objects().await.is_empty(), "left behind: {:?}", lab.objects().await);
}

async fn zvol_filesystem_and_block_volumes() {
    let lab = Lab::new("zvol").await;
    let pool = lab.pool("");
    let cap = pool.capacity().await.unwrap();
    let v = pool.create_volume(&request("zvol-ext4", 64 * MIB, Some("ext4"))).await.unwrap();
    assert_eq!((v.capacity, v.block, v.fs_type.as_deref()), (64 * MIB, false, Some("ext4")));
    let ds = format!("{}/{}", lab.parent, v.local);
    assert_eq!(prop(&ds, "volsize").await, (64 * MIB).to_string());
    assert!(pool.capacity().await.unwrap() <= cap - 64 * MIB, "a non-sparse zvol reserves its size");

    let (attachment, staging) = lab.stage(&pool, &v.local, "ext4", "zvol").await;
    let dev = device(&attachment);
    assert_eq!(dev, PathBuf::from(format!("/dev/zvol/{ds}")));
    assert_eq!(format::probe(lab.exec.as_ref(), &dev).await.unwrap().map(|s| s.kind).as_deref(), Some("ext4"));
    write_durably(&staging.join("data"), b"on a zvol\n");
    let before = fs_size(&staging);
    assert_eq!(pool.expand_volume(&v.local, 128 * MIB).await.unwrap(), 128 * MIB);
    assert_eq!(format::size_of(&dev).unwrap(), 128 * MIB);
    let grown = lab.node.expand_filesystem(&dev, &RequestPath::internal(&staging).unwrap()).await.unwrap();
    assert_eq!(grown, 128 * MIB);
    assert!(fs_size(&staging) > before + 50 * MIB, "ext4 grew from {before} to {}", fs_size(&staging));
    assert_eq!(pool.condition(&v.local).await.unwrap(), Condition::Healthy);
    lab.unstage(&staging).await;

    // Raw block: the zvol itself, of exactly its size, blank.
    let sparse = lab.pool("sparse = true\n");
    let b = sparse.create_volume(&request("raw-block", 32 * MIB, None)).await.unwrap();
    assert!(b.block && b.fs_type.is_none());
    let bds = format!("{}/{}", lab.parent, b.local);
    assert_eq!(prop(&bds, "refreservation").await, "0", "sparse = true makes zvols without a reservation");
    let bdev = device(&sparse.attach(&b.local).await.unwrap());
    assert_eq!(format::size_of(&bdev).unwrap(), 32 * MIB);
    assert_eq!(format::probe(lab.exec.as_ref(), &bdev).await.unwrap(), None, "a new zvol carries no signature");

    for local in [&v.local, &b.local] {
        pool.delete_volume(local).await.unwrap();
    }
    assert!(lab.objects().await.is_empty(), "left behind: {:?}", lab.objects().await);
    assert!(matches!(pool.condition(&v.local).await.unwrap(), Condition::Abnormal(m) if m.contains("gone")));
}

async fn dataset_snapshot_restore_and_clone() {
    let lab = Lab::new("snap").await;
    let pool = lab.pool("");
    let src = pool.create_volume(&request("ds-source", 64 * MIB, Some("zfs"))).await.unwrap();
    let (_, src_mnt) = lab.stage(&pool, &src.local, "zfs", "source").await;
    let before = noise(3 * MIB as usize, 7);
    write_durably(&src_mnt.join("before"), &before);

    let snap = pool.create_snapshot(&src.local, "ds-snap", "ds-snap", &holdfast::volume_id::new_uid()).await.unwrap();
    assert_eq!((snap.source_volume.as_str(), snap.size, snap.ready), (src.local.as_str(), 64 * MIB, true));
    assert_eq!(pool.create_snapshot(&src.local, "ds-snap", "ds-snap", &holdfast::volume_id::new_uid()).await.unwrap(), snap, "retry");
    assert_eq!(pool.list_snapshots().await.unwrap(), vec![snap.clone()]);
    assert!(matches!(
        pool.create_snapshot("other", "ds-snap", "ds-snap", &holdfast::volume_id::new_uid()).await,
        Err(Error::AlreadyExists(_))
    ));
    write_durably(&src_mnt.join("after"), b"written after the snapshot\n");

    // Restore into a larger volume; a zvol request from a dataset snapshot is refused.
    let restore = CreateRequest { source: Some(Source::Snapshot("ds-snap".into())), ..request("ds-restore", 128 * MIB, Some("zfs")) };
    let restored = pool.create_volume(&restore).await.unwrap();
    assert_eq!((restored.capacity, restored.source.clone()), (128 * MIB, restore.source.clone()));
    assert_eq!(pool.create_volume(&restore).await.unwrap(), restored, "a retried restore returns the same volume");
    let as_zvol = CreateRequest { source: restore.source.clone(), ..request("as-zvol", 128 * MIB, Some("ext4")) };
    assert!(matches!(pool.create_volume(&as_zvol).await, Err(Error::InvalidArgument(_))));
    let too_small = CreateRequest { source: restore.source.clone(), ..request("too-small", 32 * MIB, Some("zfs")) };
    assert!(matches!(pool.create_volume(&too_small).await, Err(Error::OutOfRange(_))));
    let (_, r_mnt) = lab.stage(&pool, &restored.local, "zfs", "restored").await;
    assert_eq!(std::fs::read(r_mnt.join("before")).unwrap(), before, "the restored data differs");
    assert!(!r_mnt.join("after").exists(), "the restore shows a write made after the snapshot");
    assert!(fs_size(&r_mnt) > 100 * MIB, "the restore did not get its larger quota");
    write_durably(&r_mnt.join("only-in-restore"), b"x\n");
    assert!(!src_mnt.join("only-in-restore").exists());

    // Clone of the mounted source volume, through a hidden intermediate snapshot.
    let clone_req = CreateRequest { source: Some(Source::Volume(src.local.clone())), ..request("ds-clone", 64 * MIB, Some("zfs")) };
    let clone = pool.create_volume(&clone_req).await.unwrap();
    let (_, c_mnt) = lab.stage(&pool, &clone.local, "zfs", "clone").await;
    assert_eq!(std::fs::read(c_mnt.join("before")).unwrap(), before);
    assert!(c_mnt.join("after").exists(), "the clone lacks a write made before it");
    assert!(lab.objects().await.iter().any(|o| o.ends_with(&format!("@clone.{}", clone.local))), "no intermediate snapshot");
    assert_eq!(pool.list_snapshots().await.unwrap(), vec![snap.clone()], "the intermediate snapshot is not a CSI snapshot");

    for m in [&c_mnt, &r_mnt, &src_mnt] {
        lab.unstage(m).await;
    }
    pool.delete_volume(&clone.local).await.unwrap();
    assert!(!lab.objects().await.iter().any(|o| o.contains("@clone.")), "the intermediate snapshot outlived its clone");
    for v in [&restored.local, &src.local] {
        pool.delete_volume(v).await.unwrap();
    }
    pool.delete_snapshot("ds-snap").await.unwrap();
    pool.delete_snapshot("ds-snap").await.unwrap();
    assert_eq!(pool.get_snapshot("ds-snap").await.unwrap(), None);
    assert!(lab.objects().await.is_empty(), "left behind: {:?}", lab.objects().await);
}

async fn zvol_copies_mount_beside_their_source(fs: &str) {
    let lab = Lab::new(&format!("copy-{fs}")).await;
    let pool = lab.pool("sparse = true\n");
    let size = format::min_size(fs).max(64 * MIB);
    let src = pool.create_volume(&request(&format!("{fs}-source"), size, Some(fs))).await.unwrap();
    let (src_att, src_mnt) = lab.stage(&pool, &src.local, fs, "source").await;
    let before = b"written before the snapshot\n".repeat(1000);
    write_durably(&src_mnt.join("before"), &before);

    // Snapshot of the mounted filesystem (frozen while it is taken).
    let snap = pool.create_snapshot(&src.local, &format!("{fs}-snap"), "snap1", &holdfast::volume_id::new_uid()).await.unwrap();
    assert_eq!(snap.size, size);
    write_durably(&src_mnt.join("after"), b"written after the snapshot\n");

    let src_uuid = format::probe(lab.exec.as_ref(), &device(&src_att)).await.unwrap().and_then(|s| s.uuid);
    let restore = CreateRequest { source: Some(Source::Snapshot("snap1".into())), ..request(&format!("{fs}-restore"), 2 * size, Some(fs)) };
    let restored = pool.create_volume(&restore).await.unwrap();
    assert_eq!(restored.capacity, 2 * size);
    assert_eq!(pool.create_volume(&restore).await.unwrap(), restored, "retry");
    let other_fs = if fs == "ext4" { "xfs" } else { "ext4" };
    let wrong = CreateRequest { source: restore.source.clone(), ..request("wrong-fs", 2 * size, Some(other_fs)) };
    assert!(matches!(pool.create_volume(&wrong).await, Err(Error::InvalidArgument(_))));
    let (r_att, r_mnt) = lab.stage(&pool, &restored.local, fs, "restored").await;
    let r_sig = format::probe(lab.exec.as_ref(), &device(&r_att)).await.unwrap().expect("the restore holds the filesystem");
    assert!(r_sig.uuid.is_some() && r_sig.uuid != src_uuid, "restored UUID {:?} equals the source's", r_sig.uuid);
    assert_eq!(std::fs::read(r_mnt.join("before")).unwrap(), before);
    assert!(!r_mnt.join("after").exists());
    assert!(fs_size(&r_mnt) > size, "the restored {fs} was not grown into its larger volume at stage");

    let clone_req = CreateRequest { source: Some(Source::Volume(src.local.clone())), ..request(&format!("{fs}-clone"), size, Some(fs)) };
    let clone = pool.create_volume(&clone_req).await.unwrap();
    let (c_att, c_mnt) = lab.stage(&pool, &clone.local, fs, "clone").await;
    let c_uuid = format::probe(lab.exec.as_ref(), &device(&c_att)).await.unwrap().and_then(|s| s.uuid);
    assert!(c_uuid != src_uuid && c_uuid != r_sig.uuid, "the clone's UUID is not its own");
    assert_eq!(std::fs::read(c_mnt.join("before")).unwrap(), before);
    assert!(c_mnt.join("after").exists());
    assert_eq!(pool.condition(&clone.local).await.unwrap(), Condition::Healthy);

    for m in [&c_mnt, &r_mnt, &src_mnt] {
        lab.unstage(m).await;
    }
    for v in [&clone.local, &restored.local, &src.local] {
        pool.delete_volume(v).await.unwrap();
    }
    pool.delete_snapshot("snap1").await.unwrap();
    assert!(lab.objects().await.is_empty(), "left behind: {:?}", lab.objects().await);
}

async fn deleting_what_others_depend_on_keeps_their_data() {
    let lab = Lab::new("deps").await;
    let pool = lab.pool("");
    let a = pool.create_volume(&request("origin-a", 32 * MIB, Some("zfs"))).await.unwrap();
    let (_, a_mnt) = lab.stage(&pool, &a.local, "zfs", "a").await;
    let data = noise(MIB as usize, 3);
    write_durably(&a_mnt.join("data"), &data);
    lab.unstage(&a_mnt).await;
    let snap = pool.create_snapshot(&a.local, "snap-of-a", "snap-of-a", &holdfast::volume_id::new_uid()).await.unwrap();

    // A has a snapshot: deleting A hides it (the name is free again), the snapshot stays usable.
    pool.delete_volume(&a.local).await.unwrap();
    assert_eq!(pool.get_volume(&a.local).await.unwrap(), None);
    assert!(pool.list_volumes().await.unwrap().is_empty());
    assert!(lab.objects().await.iter().any(|o| o.contains(HIDDEN)), "A was destroyed instead of hidden: {:?}", lab.objects().await);
    assert_eq!(pool.get_snapshot("snap-of-a").await.unwrap(), Some(snap.clone()));
    let b = pool
        .create_volume(&CreateRequest { source: Some(Source::Snapshot(snap.local.clone())), ..request("restore-b", 32 * MIB, Some("zfs")) })
        .await
        .unwrap();
    // The deleted volume's name can be used again at once.
    let a2 = pool.create_volume(&request("origin-a", 16 * MIB, Some("zfs"))).await.unwrap();
    assert_eq!(a2.capacity, 16 * MIB);
    pool.delete_volume(&a2.local).await.unwrap();

    // Deleting the snapshot while B was cloned from it: hidden, destroyed later by ZFS.
    pool.delete_snapshot(&snap.local).await.unwrap();
    assert_eq!(pool.get_snapshot(&snap.local).await.unwrap(), None);
    assert!(pool.list_snapshots().await.unwrap().is_empty());
    let (_, b_mnt) = lab.stage(&pool, &b.local, "zfs", "b").await;
    assert_eq!(std::fs::read(b_mnt.join("data")).unwrap(), data, "B lost its data");
    lab.unstage(&b_mnt).await;

    // The last dependent goes: everything goes.
    pool.delete_volume(&b.local).await.unwrap();
    assert!(lab.objects().await.is_empty(), "left behind: {:?}", lab.objects().await);

    // Clone of a volume, then the volume deleted first, then the clone.
    let c = pool.create_volume(&request("origin-c", 32 * MIB, Some("ext4"))).await.unwrap();
    let (_, c_mnt) = lab.stage(&pool, &c.local, "ext4", "c").await;
    write_durably(&c_mnt.join("data"), &data);
    lab.unstage(&c_mnt).await;
    let d = pool
        .create_volume(&CreateRequest { source: Some(Source::Volume(c.local.clone())), ..request("clone-d", 32 * MIB, Some("ext4")) })
        .await
        .unwrap();
    pool.delete_volume(&c.local).await.unwrap();
    assert_eq!(pool.get_volume(&c.local).await.unwrap(), None);
    let (_, d_mnt) = lab.stage(&pool, &d.local, "ext4", "d").await;
    assert_eq!(std::fs::read(d_mnt.join("data")).unwrap(), data, "the clone lost its data");
    lab.unstage(&d_mnt).await;
    pool.delete_volume(&d.local).await.unwrap();
    assert!(lab.objects().await.is_empty(), "left behind: {:?}", lab.objects().await);
}

async fn what_an_operator_made_under_a_volume_is_never_destroyed() {
    let lab = Lab::new("foreign").await;
    let pool = lab.pool("");
    let data = noise(MIB as usize, 11);
    for (case, by_hand) in [("child", "child dataset"), ("snap", "snapshot")] {
        let v = pool.create_volume(&request(&format!("foreign-{case}"), 32 * MIB, Some("zfs"))).await.unwrap();
        let dataset = format!("{}/{}", lab.parent, v.local);
        let (_, mnt) = lab.stage(&pool, &v.local, "zfs", case).await;
        write_durably(&mnt.join("data"), &data);
        lab.unstage(&mnt).await;
        // What an operator makes by hand, with data of its own.
        let theirs = if case == "child" {
            let child = format!("{dataset}/by-hand");
            let at = lab.path(&format!("{case}-child"));
            std::fs::create_dir_all(&at).unwrap();
            run(&["zfs", "create", "-o", &format!("mountpoint={}", at.display()), &child]).await;
            write_durably(&at.join("theirs"), &data);
            run(&["zfs", "umount", &child]).await;
            child
        } else {
            let snap = format!("{dataset}@by-hand");
            run(&["zfs", "snapshot", &snap]).await;
            snap
        };
        let err = pool.delete_volume(&v.local).await.expect_err(&format!("DeleteVolume with a {by_hand} beneath it"));
        assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains(&theirs)), "{by_hand}: {err}");
        let objects = lab.objects().await;
        assert!(objects.contains(&theirs) && objects.contains(&dataset), "{by_hand}: something went: {objects:?}");
        assert!(!objects.iter().any(|o| o.contains(HIDDEN)), "{by_hand}: the volume was hidden anyway: {objects:?}");
        assert_eq!(pool.get_volume(&v.local).await.unwrap().map(|i| i.local), Some(v.local.clone()), "{by_hand}: the volume is gone");
        // Their data is intact; once they move it away the delete goes through.
        if case == "child" {
            let at = lab.path(&format!("{case}-child"));
            run(&["zfs", "mount", &theirs]).await;
            assert_eq!(std::fs::read(at.join("theirs")).unwrap(), data);
            run(&["zfs", "umount", &theirs]).await;
            run(&["zfs", "rename", &theirs, &format!("{}/kept-{case}", lab.parent)]).await;
        } else {
            run(&["zfs", "clone", &theirs, &format!("{}/kept-{case}", lab.parent)]).await;
            run(&["zfs", "promote", &format!("{}/kept-{case}", lab.parent)]).await;
        }
        pool.delete_volume(&v.local).await.unwrap_or_else(|e| panic!("{by_hand} moved away: {e}"));
        assert_eq!(pool.get_volume(&v.local).await.unwrap(), None);
        assert!(lab.objects().await.iter().any(|o| o.ends_with(&format!("kept-{case}"))), "{:?}", lab.objects().await);
    }
    // A snapshot taken by hand of a deleted volume that holdfast only hid keeps it too.
    let v = pool.create_volume(&request("foreign-hidden", 32 * MIB, Some("zfs"))).await.unwrap();
    let s = pool.create_snapshot(&v.local, "snap-of-hidden", "snap-of-hidden", &holdfast::volume_id::new_uid()).await.unwrap();
    pool.delete_volume(&v.local).await.unwrap();
    let hidden = lab.objects().await.into_iter().find(|o| o.contains(HIDDEN) && !o.contains('@')).expect("hidden volume");
    run(&["zfs", "snapshot", &format!("{hidden}@by-hand")]).await;
    pool.delete_snapshot(&s.local).await.unwrap();
    let objects = lab.objects().await;
    assert!(objects.contains(&format!("{hidden}@by-hand")), "the sweep destroyed a hand-made snapshot: {objects:?}");
}

async fn copied_holdfast_properties_do_not_make_a_second_volume() {
    let lab = Lab::new("copied").await;
    let pool = lab.pool("");
    let real = pool.create_volume(&request("the-real-one", 32 * MIB, Some("zfs"))).await.unwrap();
    let zreal = pool.create_volume(&request("the-real-zvol", 16 * MIB, None)).await.unwrap();
    let snap = pool.create_snapshot(&real.local, "real-snap", "real-snap", &holdfast::volume_id::new_uid()).await.unwrap();
    // Every holdfast:* property set on an object, as `zfs get` shows them.
    let record = |name: String| async move {
        let out = run(&["zfs", "get", "-H", "-p", "-o", "property,value", "-s", "local", "all", &name]).await;
        out.lines().filter(|l| l.starts_with("holdfast:")).map(|l| l.replacen('\t', "=", 1)).collect::<Vec<String>>()
    };
    let copy = |what: &str, from: Vec<String>, args: Vec<String>| {
        let mut argv: Vec<String> = args;
        let at = argv.len() - 1;
        for p in from {
            argv.insert(at, "-o".into());
            argv.insert(at + 1, p);
        }
        assert!(argv.len() > 3, "{what}: nothing to copy");
        argv
    };
    // At the local names creates of "impostor" and "zimpostor" would use.
    let (impostor, zimpostor) = (local_name("impostor"), local_name("zimpostor"));
    let ds_copy = format!("{}/{impostor}", lab.parent);
    let zvol_copy = format!("{}/{zimpostor}", lab.parent);
    let snap_copy = format!("{}/{}@{impostor}", lab.parent, real.local);
    let argv =
        copy("dataset", record(format!("{}/{}", lab.parent, real.local)).await, vec!["zfs".into(), "create".into(), ds_copy.clone()]);
    run(&argv.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let argv = copy(
        "zvol",
        record(format!("{}/{}", lab.parent, zreal.local)).await,
        vec!["zfs".into(), "create".into(), "-V".into(), "16M".into(), zvol_copy.clone()],
    );
    run(&argv.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let argv = copy(
        "snapshot",
        record(format!("{}/{}@{}", lab.parent, real.local, snap.local)).await,
        vec!["zfs".into(), "snapshot".into(), snap_copy.clone()],
    );
    run(&argv.iter().map(String::as_str).collect::<Vec<_>>()).await;

    let mut listed: Vec<String> = pool.list_volumes().await.unwrap().into_iter().map(|v| v.local).collect();
    listed.sort();
    let mut want = vec![real.local.clone(), zreal.local.clone()];
    want.sort();
    assert_eq!(listed, want, "a copied record made a second volume");
    for (name, local) in [("impostor", &impostor), ("zimpostor", &zimpostor)] {
        assert_eq!(pool.get_volume(local).await.unwrap(), None, "{name}");
        pool.delete_volume(local).await.unwrap();
        let err = pool.create_volume(&request(name, 16 * MIB, Some("zfs"))).await.unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{name}: a create took over a foreign dataset: {err}");
    }
    let snaps: Vec<String> = pool.list_snapshots().await.unwrap().into_iter().map(|s| s.local).collect();
    assert_eq!(snaps, std::slice::from_ref(&snap.local), "a copied snapshot record made a second snapshot");
    let objects = lab.objects().await;
    for o in [&ds_copy, &zvol_copy, &snap_copy] {
        assert!(objects.contains(o), "{o} was destroyed: {objects:?}");
    }
    // The real ones still work, and deleting the real volume refuses for the hand-made snapshot.
    assert_eq!(pool.get_volume(&real.local).await.unwrap().map(|v| v.csi_name), Some("the-real-one".to_owned()));
    let err = pool.delete_volume(&real.local).await.unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains(&snap_copy)), "{err}");
}

/// Runs commands for real, but after the first whose command line starts with `prefix` has succeeded,
/// answers as if the driver had been killed before it saw the result.
struct KillAfter {
    prefix: String,
    fired: AtomicBool,
}

#[async_trait]
impl Exec for KillAfter {
    async fn run(&self, cmd: Cmd) -> Result<Output, ExecError> {
        let line = cmd.display();
        let out = RealExec.run(cmd).await;
        // Only a command that did its work counts: a first `zfs create` refused for a missing
        // parent is retried by the pool, and the kill belongs after the one that made the object.
        if out.is_ok() && line.starts_with(&self.prefix) && !self.fired.swap(true, Ordering::SeqCst) {
            return Err(ExecError::Timeout { cmd: format!("{line} (killed here by the test)"), timeout: Duration::ZERO });
        }
        out
    }
}

async fn retries_after_a_kill_make_exactly_one_volume() {
    let lab = Lab::new("retry").await;
    let count = |objects: &[String], local: &str| objects.iter().filter(|o| o.ends_with(&format!("/{local}"))).count();

    // Killed between `zfs create` and the response: a new instance finds the one dataset.
    let req = request("killed-create", 32 * MIB, Some("zfs"));
    let killed = lab.pool_with(Arc::new(KillAfter { prefix: "zfs create -o mountpoint=legacy".into(), fired: AtomicBool::new(false) }));
    assert!(killed.create_volume(&req).await.is_err(), "the killed create reported success");
    drop(killed);
    let pool = lab.pool("");
    let v = pool.create_volume(&req).await.unwrap();
    assert_eq!(v.capacity, 32 * MIB);
    assert_eq!(count(&lab.objects().await, &req.local), 1);
    assert_eq!(pool.list_volumes().await.unwrap(), vec![v.clone()]);

    // Killed between `zfs clone` of a zvol and the end of the copy (grow, new UUID): the retry
    // finishes it.
    let src = pool.create_volume(&request("zsrc", 32 * MIB, Some("ext4"))).await.unwrap();
    let (src_att, src_mnt) = lab.stage(&pool, &src.local, "ext4", "zsrc").await;
    write_durably(&src_mnt.join("data"), b"copied\n");
    let clone_req = CreateRequest { source: Some(Source::Volume(src.local.clone())), ..request("killed-clone", 64 * MIB, Some("ext4")) };
    let killed = lab.pool_with(Arc::new(KillAfter { prefix: "zfs clone".into(), fired: AtomicBool::new(false) }));
    assert!(killed.create_volume(&clone_req).await.is_err());
    drop(killed);
    assert_eq!(pool.get_volume(&clone_req.local).await.unwrap().map(|v| v.capacity), Some(32 * MIB), "not grown yet");
    assert!(matches!(pool.attach(&clone_req.local).await, Err(Error::FailedPrecondition(_))), "an unfinished copy is not attached");
    assert!(matches!(pool.condition(&clone_req.local).await.unwrap(), Condition::Abnormal(m) if m.contains("unfinished")));
    let clone = pool.create_volume(&clone_req).await.unwrap();
    assert_eq!(clone.capacity, 64 * MIB);
    assert_eq!(count(&lab.objects().await, &clone_req.local), 1);
    let (c_att, c_mnt) = lab.stage(&pool, &clone.local, "ext4", "zclone").await;
    assert_ne!(
        format::probe(lab.exec.as_ref(), &device(&c_att)).await.unwrap().and_then(|s| s.uuid),
        format::probe(lab.exec.as_ref(), &device(&src_att)).await.unwrap().and_then(|s| s.uuid)
    );
    assert_eq!(std::fs::read(c_mnt.join("data")).unwrap(), b"copied\n");
    for m in [&c_mnt, &src_mnt] {
        lab.unstage(m).await;
    }
    for l in [&clone.local, &src.local, &v.local] {
        pool.delete_volume(l).await.unwrap();
    }
    assert!(lab.objects().await.is_empty(), "left behind: {:?}", lab.objects().await);
}

async fn parameters_are_checked_and_mounted_volumes_kept() {
    let lab = Lab::new("params").await;
    let pool = lab.pool("");
    let mut req = request("bad-params", 16 * MIB, Some("zfs"));
    req.parameters.insert("mountpoint".into(), "/etc".into());
    let err = pool.create_volume(&req).await.unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("\"mountpoint\"")), "{err:?}");
    req.parameters = [("compression".to_owned(), "bogus".to_owned())].into();
    let err = pool.create_volume(&req).await.unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("compression")), "{err:?}");
    assert!(lab.objects().await.is_empty(), "a refused create left {:?}", lab.objects().await);

    // A mounted dataset or zvol is never destroyed (zfs destroy would unmount it under its users).
    for fs in ["zfs", "ext4"] {
        let v = pool.create_volume(&request(&format!("mounted-{fs}"), 32 * MIB, Some(fs))).await.unwrap();
        let (_, mnt) = lab.stage(&pool, &v.local, fs, &format!("mounted-{fs}")).await;
        let err = pool.delete_volume(&v.local).await.unwrap_err();
        assert!(matches!(&err, Error::FailedPrecondition(_)), "{fs}: {err:?}");
        assert!(pool.get_volume(&v.local).await.unwrap().is_some());
        lab.unstage(&mnt).await;
        pool.delete_volume(&v.local).await.unwrap();
    }
    // A foreign dataset under the parent, at the name a create of "foreign" would use, is left alone.
    let foreign = format!("{}/{}", lab.parent, local_name("foreign"));
    run(&["zfs", "create", "-o", "mountpoint=legacy", &foreign]).await;
    assert!(pool.list_volumes().await.unwrap().is_empty());
    pool.delete_volume(&local_name("foreign")).await.unwrap();
    let clash = pool.create_volume(&request("foreign", 16 * MIB, Some("zfs"))).await.unwrap_err();
    assert!(matches!(&clash, Error::AlreadyExists(m) if m.contains("not a volume of holdfast pool")), "{clash:?}");
    assert_eq!(lab.objects().await, vec![foreign]);
}

async fn missing_zpool_and_missing_parent() {
    let lab = Lab::new("missing").await;
    let exec: Arc<dyn Exec> = lab.exec.clone();
    let nopool = ZfsPool::new(&Lab::config("np", "hfnosuchpool/holdfast", ""), exec.clone()).unwrap();
    let err = nopool.create_volume(&request("v", 16 * MIB, Some("zfs"))).await.unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("zpool \"hfnosuchpool\"")), "{err:?}");
    assert!(matches!(nopool.capacity().await, Err(Error::FailedPrecondition(_))));
    assert_eq!(nopool.get_volume("v").await.unwrap(), None);
    nopool.delete_volume("v").await.unwrap();

    // A parent two levels down that does not exist yet: capacity comes from the zpool, and the
    // first create makes it, unmounted.
    let deep = format!("{}/a/b", lab.parent);
    let pool = ZfsPool::new(&Lab::config("deep", &deep, ""), exec).unwrap();
    assert!(pool.capacity().await.unwrap() > 100 * MIB);
    assert!(pool.list_volumes().await.unwrap().is_empty());
    let v = pool.create_volume(&request("v", 16 * MIB, Some("zfs"))).await.unwrap();
    assert_eq!(prop(&deep, "mountpoint").await, "none");
    assert_eq!(pool.list_volumes().await.unwrap(), vec![v.clone()]);
    pool.delete_volume(&v.local).await.unwrap();
}

async fn degraded_zpool_makes_volumes_abnormal() {
    let lab = Lab::new("degraded").await;
    let name = format!("hfdeg{}", std::process::id());
    let (f1, f2) = (lab.path("d1.img"), lab.path("d2.img"));
    for f in [&f1, &f2] {
        std::fs::File::create(f).and_then(|h| h.set_len(128 * MIB)).unwrap();
    }
    run(&["zpool", "create", "-f", &name, "mirror", f1.to_str().unwrap(), f2.to_str().unwrap()]).await;
    lab.zpools.lock().unwrap().push(name.clone());
    let pool = ZfsPool::new(&Lab::config("deg", &format!("{name}/holdfast"), ""), lab.exec.clone()).unwrap();
    let v = pool.create_volume(&request("v", 16 * MIB, Some("zfs"))).await.unwrap();
    assert_eq!(pool.condition(&v.local).await.unwrap(), Condition::Healthy);
    run(&["zpool", "offline", &name, f2.to_str().unwrap()]).await;
    // A new instance: the health reading of the first is cached for a few seconds.
    let fresh = ZfsPool::new(&Lab::config("deg", &format!("{name}/holdfast"), ""), lab.exec.clone()).unwrap();
    match fresh.condition(&v.local).await.unwrap() {
        Condition::Abnormal(m) => assert!(m.contains("DEGRADED") && m.contains("offline"), "{m}"),
        Condition::Healthy => panic!("a degraded zpool's volume is healthy"),
    }
    run(&["zpool", "destroy", "-f", &name]).await;
    lab.zpools.lock().unwrap().clear();
}
