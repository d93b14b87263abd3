//! Real LVM tests of the `lvm` pool: thick and thin LVs, tags that survive a restart, idempotent
//! retries, thin snapshots restored and cloned beside their mounted source (ext4, xfs, btrfs),
//! expansion, capacity, and deleting a volume that has snapshots.
//!
//! They need device-mapper (thin pools, activation), which the development machine's kernel
//! lacks, so they run inside the test VM: `tests/vm/lvm-suite.sh` builds them on the host and
//! runs them there (or by hand: `tests/vm/run -- target/debug/deps/lvm-…`). Each test makes its
//! own volume group on a loop device over a sparse file, so tests never see each other's LVs.
//!
//! The harness is tests/common/real.rs (`harness = false`): outside the VM a run says plainly that
//! it ran nothing instead of reporting tests as passed; inside it (the guest's `/run/holdfast-vm`,
//! `HOLDFAST_VM=1` on a machine with device-mapper, or `HOLDFAST_REQUIRE_REAL=1`, which the VM suites
//! set) missing device-mapper is a failure. Arguments as for libtest: name filters, `--exact`,
//! `--skip`, `--list`. Tests are listed in `TESTS`, not marked with test attributes (compiled out here).

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast::config::Config;
use holdfast::error::Error;
use holdfast::exec::{Cmd, Exec, RealExec};
use holdfast::node::format;
use holdfast::pool::lvm::{LvmPool, command, report};
use holdfast::pool::{Attachment, Condition, CreateRequest, Pool, Source};
use holdfast::volume_id::local_name;

#[path = "common/real.rs"]
mod real;

#[path = "common/mod.rs"]
mod common;

// `harness = false` compiles test attributes out without a word: tests go in TESTS.
const _: () = assert!(!real::has_test_attribute(include_str!("lvm.rs")), "tests/lvm.rs: list tests in TESTS, not with test attributes");

const MIB: u64 = 1 << 20;

type TestFn = fn() -> Pin<Box<dyn Future<Output = ()> + Send>>;

const TESTS: &[(&str, TestFn)] = &[
    ("thick_volume_lifecycle", || Box::pin(thick_volume_lifecycle())),
    ("thin_volumes_survive_a_restart_and_retries", || Box::pin(thin_volumes_survive_a_restart_and_retries())),
    ("foreign_lvs_are_left_alone_and_condition_follows_activation", || {
        Box::pin(foreign_lvs_are_left_alone_and_condition_follows_activation())
    }),
    ("snapshot_restore_and_clone_ext4", || Box::pin(snapshot_restore_and_clone("ext4"))),
    ("snapshot_restore_and_clone_xfs", || Box::pin(snapshot_restore_and_clone("xfs"))),
    ("snapshot_restore_and_clone_btrfs", || Box::pin(snapshot_restore_and_clone("btrfs"))),
    ("deleting_a_volume_keeps_its_snapshots_usable", || Box::pin(deleting_a_volume_keeps_its_snapshots_usable())),
    ("capacity_numbers_match_what_fits", || Box::pin(capacity_numbers_match_what_fits())),
    ("copied_tags_do_not_make_a_second_volume", || Box::pin(copied_tags_do_not_make_a_second_volume())),
    ("the_driver_resumes_its_suspended_devices_at_start_up", || Box::pin(the_driver_resumes_its_suspended_devices_at_start_up())),
    ("thick_snapshot_restore_and_clone_ext4", || Box::pin(thick_snapshot_restore_and_clone("ext4"))),
    ("thick_snapshot_restore_and_clone_btrfs", || Box::pin(thick_snapshot_restore_and_clone("btrfs"))),
    ("thick_copies_are_block_exact_and_hand_out_no_old_data", || Box::pin(thick_copies_are_block_exact_and_hand_out_no_old_data())),
    ("an_overflowed_thick_snapshot_is_not_ready_and_never_restored", || {
        Box::pin(an_overflowed_thick_snapshot_is_not_ready_and_never_restored())
    }),
    ("thick_copies_outlive_their_request_and_a_killed_driver", || Box::pin(thick_copies_outlive_their_request_and_a_killed_driver())),
    ("a_snapshotted_thick_volume_grows_only_while_unused", || Box::pin(a_snapshotted_thick_volume_grows_only_while_unused())),
];

fn in_vm() -> bool {
    Path::new("/run/holdfast-vm").exists() || std::env::var("HOLDFAST_VM").is_ok_and(|v| v == "1")
}

/// Why device-mapper cannot run thin pools here, if it cannot.
fn device_mapper_problem() -> Option<String> {
    if !Path::new("/dev/mapper/control").exists() {
        return Some("/dev/mapper/control is missing: the kernel has no device-mapper (modprobe dm_mod)".into());
    }
    match std::process::Command::new("dmsetup").arg("targets").output() {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("thin-pool") => None,
        Ok(out) => Some(format!(
            "dmsetup targets lists no thin-pool target (modprobe dm_thin_pool): {}",
            String::from_utf8_lossy(&out.stdout).trim()
        )),
        Err(e) => Some(format!("cannot run dmsetup: {e} (is lvm2 installed?)")),
    }
}

fn main() -> ExitCode {
    let suite = real::Suite {
        file: "tests/lvm.rs",
        needs: "device-mapper (thin pools, LV activation)",
        how: "tests/vm/lvm-suite.sh (or tests/vm/run -- this binary)",
        required: in_vm(),
        parallel: false,
    };
    real::main(&suite, TESTS, device_mapper_problem)
}

// ---------------------------------------------------------------------------------------------
// The lab: one volume group on one loop device per test, torn down by Drop.

struct Lab {
    _dir: tempfile::TempDir,
    vg: String,
    loop_dev: String,
    exec: Arc<RealExec>,
    mounts: Mutex<Vec<PathBuf>>,
    mount_root: PathBuf,
}

/// Runs a setup command, panicking with its stderr.
async fn run(args: &[&str]) -> String {
    let cmd = Cmd::new(args[0]).args(args[1..].iter().copied()).timeout(Duration::from_secs(300));
    match RealExec.run(cmd).await {
        Ok(out) => out.stdout,
        Err(e) => panic!("{e}"),
    }
}

impl Lab {
    /// A volume group of `size_mib` with 1 MiB extents (whole-MiB requests are exact).
    async fn new(tag: &str, size_mib: u64) -> Lab {
        let dir = tempfile::Builder::new().prefix("holdfast-lvm-").tempdir_in("/var/tmp").expect("temp dir");
        let file = dir.path().join("pv.img");
        std::fs::File::create(&file).and_then(|f| f.set_len(size_mib * MIB)).expect("sparse PV file");
        let loop_dev = run(&["losetup", "--find", "--show", file.to_str().unwrap()]).await.trim().to_owned();
        let vg = format!("hft-{tag}-{}", std::process::id());
        let mount_root = dir.path().join("mnt");
        std::fs::create_dir(&mount_root).unwrap();
        // The lab owns the loop device from here on, so a failing setup still cleans up.
        let lab = Lab { _dir: dir, vg, loop_dev, exec: Arc::new(RealExec), mounts: Mutex::new(Vec::new()), mount_root };
        run(&["pvcreate", "-q", &lab.loop_dev]).await;
        run(&["vgcreate", "-q", "-s", "1M", &lab.vg, &lab.loop_dev]).await;
        lab
    }

    async fn thin_pool(&self, size_mib: u64) {
        run(&["lvcreate", "-q", "-y", "--type", "thin-pool", "-L", &format!("{size_mib}M"), "-n", "tp0", &self.vg]).await;
    }

    fn pool(&self, name: &str, extra: &str) -> LvmPool {
        let src = format!("[[pool]]\nname = \"{name}\"\nkind = \"lvm\"\nvolume_group = \"{}\"\n{extra}", self.vg);
        let cfg = Config::parse(&src).expect("config").pools.remove(0);
        LvmPool::new(&cfg, self.exec.clone()).expect("LvmPool::new")
    }

    fn thin(&self, name: &str, ratio: f64) -> LvmPool {
        self.pool(name, &format!("thin_pool = \"tp0\"\noverprovision_ratio = {ratio:?}\n"))
    }

    /// Every LV of the volume group.
    async fn lvs(&self) -> Vec<report::Lv> {
        report::parse_lvs(&self.exec.run(command::lvs(&self.vg)).await.expect("lvs").stdout).expect("lvs JSON")
    }

    /// Names of the LVs holdfast would make (`hf-…`, `hfs-…`).
    async fn holdfast_lvs(&self) -> Vec<String> {
        self.lvs().await.into_iter().map(|l| l.name).filter(|n| n.starts_with("hf-") || n.starts_with("hfs-")).collect()
    }

    async fn vg_free(&self) -> u64 {
        let out = self.exec.run(command::vgs(&self.vg)).await.expect("vgs");
        report::parse_vgs(&out.stdout).expect("vgs JSON")[0].free
    }

    async fn device(&self, pool: &dyn Pool, local: &str) -> PathBuf {
        match pool.attach(local).await.unwrap_or_else(|e| panic!("attach {local}: {e}")) {
            Attachment::Device(p) => {
                assert!(std::fs::metadata(&p).expect("device node").file_type().is_block_device(), "{} is not a block device", p.display());
                p
            }
            other => panic!("an LVM volume attaches as a device, not {other:?}"),
        }
    }

    async fn mkfs_and_mount(&self, dev: &Path, fs: &str, name: &str) -> PathBuf {
        format::mkfs(self.exec.as_ref(), dev, fs).await.unwrap_or_else(|e| panic!("mkfs.{fs}: {e}"));
        self.mount(dev, name).await
    }

    async fn mount(&self, dev: &Path, name: &str) -> PathBuf {
        let dir = self.mount_root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        run(&["mount", dev.to_str().unwrap(), dir.to_str().unwrap()]).await;
        self.mounts.lock().unwrap().push(dir.clone());
        dir
    }

    async fn umount(&self, dir: &Path) {
        run(&["umount", dir.to_str().unwrap()]).await;
        self.mounts.lock().unwrap().retain(|m| m != dir);
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
        sh(&["vgremove", "-q", "-ff", &self.vg]);
        sh(&["pvremove", "-q", "-ff", "-y", &self.loop_dev]);
        sh(&["losetup", "-d", &self.loop_dev]);
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
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn fs_size(dir: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(dir).unwrap();
    s.blocks() * s.fragment_size()
}

fn device_size(dev: &Path) -> u64 {
    format::size_of(dev).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

async fn thick_volume_lifecycle() {
    let lab = Lab::new("thick", 256).await;
    let pool = lab.pool("thick", "");
    let free = lab.vg_free().await;
    assert_eq!(pool.capacity().await.unwrap(), free / MIB * MIB, "thick capacity is the VG's free space");

    let req = request("Thick Volume ✓ with a name that is not a local name", 16 * MIB, Some("ext4"));
    let v = pool.create_volume(&req).await.unwrap();
    assert_eq!((v.capacity, v.csi_name.as_str(), v.fs_type.as_deref()), (16 * MIB, req.csi_name.as_str(), Some("ext4")));
    assert_eq!(pool.capacity().await.unwrap(), free / MIB * MIB - 16 * MIB);
    assert_eq!(pool.create_volume(&req).await.unwrap(), v, "a retried create returns the same volume");
    assert_eq!(lab.holdfast_lvs().await.len(), 1, "the retry made no second LV");
    let bigger = CreateRequest { capacity: 32 * MIB, ..req.clone() };
    assert!(matches!(pool.create_volume(&bigger).await, Err(Error::AlreadyExists(_))));

    let dev = lab.device(&pool, &req.local).await;
    assert_eq!(device_size(&dev), 16 * MIB);
    let mnt = lab.mkfs_and_mount(&dev, "ext4", "thick").await;
    write_durably(&mnt.join("data"), b"thick data\n");
    assert_eq!(pool.condition(&req.local).await.unwrap(), Condition::Healthy);

    // Online expansion: the LV grows here, the node grows the filesystem.
    let before = fs_size(&mnt);
    assert_eq!(pool.expand_volume(&req.local, 40 * MIB).await.unwrap(), 40 * MIB);
    assert_eq!(pool.expand_volume(&req.local, 8 * MIB).await.unwrap(), 40 * MIB, "never shrinks");
    assert_eq!(device_size(&dev), 40 * MIB);
    format::grow(lab.exec.as_ref(), "ext4", &dev, &mnt).await.unwrap();
    assert!(fs_size(&mnt) > before + 20 * MIB, "ext4 grew from {before} to {}", fs_size(&mnt));

    assert!(matches!(pool.delete_volume(&req.local).await, Err(Error::FailedPrecondition(_))), "a mounted LV is not removed");
    // (Thick snapshots, restores and clones: the thick_* tests below; issue 12 made them work.)

    lab.umount(&mnt).await;
    pool.detach(&req.local).await.unwrap();
    pool.delete_volume(&req.local).await.unwrap();
    pool.delete_volume(&req.local).await.unwrap();
    assert_eq!(pool.get_volume(&req.local).await.unwrap(), None);
    assert!(lab.holdfast_lvs().await.is_empty());

    // The extents of the deleted volume come back blank: the node never sees old data.
    let again = pool.create_volume(&request("reuse", 40 * MIB, Some("ext4"))).await.unwrap();
    let dev = lab.device(&pool, &again.local).await;
    assert_eq!(format::probe(lab.exec.as_ref(), &dev).await.unwrap(), None, "a new thick LV must carry no old signature");
}

async fn thin_volumes_survive_a_restart_and_retries() {
    let lab = Lab::new("thin", 512).await;
    lab.thin_pool(256).await;
    let pool = lab.thin("thin", 2.0);
    let cap = pool.capacity().await.unwrap();
    assert!(cap > 480 * MIB && cap <= 512 * MIB, "a fresh 256 MiB pool with ratio 2 offers about 512 MiB, not {cap}");

    // The longest CSI name, in multi-byte UTF-8: stored hex-encoded in a tag.
    let name = "名".repeat(42) + "ab";
    assert_eq!(name.len(), 128);
    let req = request(&name, 64 * MIB, Some("ext4"));
    let v = pool.create_volume(&req).await.unwrap();
    assert_eq!(v.capacity, 64 * MIB);
    let after = pool.capacity().await.unwrap();
    assert!(after <= cap - 64 * MIB, "capacity {after} did not drop by the 64 MiB promised (was {cap})");

    // A restarted driver (a new pool over the same VG) finds everything from the tags alone.
    let restarted = lab.thin("thin", 2.0);
    assert_eq!(restarted.get_volume(&req.local).await.unwrap(), Some(v.clone()));
    assert_eq!(restarted.list_volumes().await.unwrap(), vec![v.clone()]);
    // Concurrent retries through two instances: both succeed, one LV.
    let (a, b) = tokio::join!(pool.create_volume(&req), restarted.create_volume(&req));
    assert_eq!((a.unwrap(), b.unwrap()), (v.clone(), v.clone()));
    assert_eq!(lab.holdfast_lvs().await.len(), 1, "retries made a second LV");
    // Another pool sharing the volume group sees none of it.
    assert!(lab.thin("other", 2.0).list_volumes().await.unwrap().is_empty());

    assert!(matches!(pool.create_volume(&request("huge", 2 << 30, Some("ext4"))).await, Err(Error::ResourceExhausted(_))));

    let dev = lab.device(&pool, &req.local).await;
    let mnt = lab.mkfs_and_mount(&dev, "ext4", "thin").await;
    write_durably(&mnt.join("data"), &vec![7u8; 4 * MIB as usize]);
    assert_eq!(pool.condition(&req.local).await.unwrap(), Condition::Healthy);
    assert_eq!(pool.expand_volume(&req.local, 96 * MIB).await.unwrap(), 96 * MIB);
    format::grow(lab.exec.as_ref(), "ext4", &dev, &mnt).await.unwrap();
    lab.umount(&mnt).await;

    // Raw block volume: the device itself, of exactly the requested size.
    let blk = pool.create_volume(&request("raw-block", 32 * MIB, None)).await.unwrap();
    assert!(blk.block && blk.fs_type.is_none());
    assert_eq!(device_size(&lab.device(&pool, &blk.local).await), 32 * MIB);

    for v in pool.list_volumes().await.unwrap() {
        pool.delete_volume(&v.local).await.unwrap();
    }
    assert!(lab.holdfast_lvs().await.is_empty());
    assert!(pool.capacity().await.unwrap() >= cap - MIB, "deleting gave the promises back");
}

async fn foreign_lvs_are_left_alone_and_condition_follows_activation() {
    let lab = Lab::new("foreign", 256).await;
    lab.thin_pool(128).await;
    let pool = lab.thin("p", 1.0);
    // An LV that holdfast did not make, at the very name a create of "foreign" would use.
    let local = local_name("foreign");
    let lv = format!("hf-{local}");
    run(&["lvcreate", "-q", "-y", "-n", &lv, "-V", "8M", "--thinpool", &format!("{}/tp0", lab.vg)]).await;
    assert!(pool.list_volumes().await.unwrap().is_empty());
    assert_eq!(pool.get_volume(&local).await.unwrap(), None);
    pool.delete_volume(&local).await.unwrap();
    assert!(lab.holdfast_lvs().await.contains(&lv), "a foreign LV was removed");
    let clash = pool.create_volume(&request("foreign", 8 * MIB, Some("ext4"))).await.unwrap_err();
    assert!(matches!(&clash, Error::AlreadyExists(m) if m.contains("not a volume of holdfast pool")), "{clash:?}");

    let v = pool.create_volume(&request("vol", 16 * MIB, Some("ext4"))).await.unwrap();
    assert_eq!(pool.condition(&v.local).await.unwrap(), Condition::Healthy);
    let target = format!("{}/hf-{}", lab.vg, v.local);
    run(&["lvchange", "-q", "-an", &target]).await;
    assert!(matches!(pool.condition(&v.local).await.unwrap(), Condition::Abnormal(m) if m.contains("not active")));
    lab.device(&pool, &v.local).await;
    assert_eq!(pool.condition(&v.local).await.unwrap(), Condition::Healthy, "attach activates again");
    run(&["lvremove", "-q", "-y", &target]).await;
    assert!(matches!(pool.condition(&v.local).await.unwrap(), Condition::Abnormal(m) if m.contains("gone")));
}

async fn copied_tags_do_not_make_a_second_volume() {
    let lab = Lab::new("copied", 256).await;
    lab.thin_pool(128).await;
    let pool = lab.thin("p", 1.0);
    let real = pool.create_volume(&request("the-real-one", 16 * MIB, Some("ext4"))).await.unwrap();
    let snap = pool.create_snapshot(&real.local, "real-snap", "real-snap", &holdfast::volume_id::new_uid()).await.unwrap();
    let lvs = lab.lvs().await;
    let tags_of = |name: String| lvs.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("no LV {name}")).tags.clone();
    // LVs made by hand, each given every tag of a real volume or snapshot.
    // At the names a volume and a snapshot called "impostor" would get.
    let impostor = local_name("impostor");
    let copies = [
        (format!("hf-{impostor}"), tags_of(format!("hf-{}", real.local))),
        (format!("hfs-{impostor}"), tags_of(format!("hfs-{}", snap.local))),
    ];
    for (name, tags) in &copies {
        assert!(tags.iter().any(|t| t == "holdfast.managed"), "{name}: {tags:?}");
        run(&["lvcreate", "-q", "-y", "-n", name.as_str(), "-V", "8M", "--thinpool", &format!("{}/tp0", lab.vg)]).await;
        let mut argv = vec!["lvchange".to_owned(), "-q".to_owned()];
        for t in tags {
            argv.push("--addtag".into());
            argv.push(t.clone());
        }
        argv.push(format!("{}/{name}", lab.vg));
        run(&argv.iter().map(String::as_str).collect::<Vec<_>>()).await;
    }
    let listed: Vec<String> = pool.list_volumes().await.unwrap().into_iter().map(|v| v.local).collect();
    assert_eq!(listed, std::slice::from_ref(&real.local), "copied tags made a second volume");
    let snaps: Vec<String> = pool.list_snapshots().await.unwrap().into_iter().map(|s| s.local).collect();
    assert_eq!(snaps, std::slice::from_ref(&snap.local), "copied tags made a second snapshot");
    assert_eq!(pool.get_volume(&impostor).await.unwrap(), None);
    assert_eq!(pool.get_snapshot(&impostor).await.unwrap(), None);
    pool.delete_volume(&impostor).await.unwrap();
    pool.delete_snapshot(&impostor).await.unwrap();
    let err = pool.create_volume(&request("impostor", 8 * MIB, Some("ext4"))).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "a create took over an LV with copied tags: {err}");
    let left = lab.holdfast_lvs().await;
    for (name, _) in &copies {
        assert!(left.contains(name), "{name} was removed: {left:?}");
    }
    // The real volume is still the one and only, and goes when asked.
    assert_eq!(pool.get_volume(&real.local).await.unwrap().map(|v| v.csi_name), Some("the-real-one".to_owned()));
    pool.delete_snapshot(&snap.local).await.unwrap();
    pool.delete_volume(&real.local).await.unwrap();
    let left = lab.holdfast_lvs().await;
    assert_eq!(left.len(), 2, "only the hand-made LVs remain: {left:?}");
}

async fn snapshot_restore_and_clone(fs: &str) {
    let lab = Lab::new(fs, 1024).await;
    lab.thin_pool(768).await;
    let pool = lab.thin("snap", 4.0);
    let size = format::min_size(fs).max(128 * MIB);
    let src = pool.create_volume(&request(&format!("{fs}-source"), size, Some(fs))).await.unwrap();
    let src_dev = lab.device(&pool, &src.local).await;
    let src_mnt = lab.mkfs_and_mount(&src_dev, fs, "source").await;
    let before = b"written before the snapshot\n".repeat(1000);
    write_durably(&src_mnt.join("before"), &before);

    // Snapshot of the mounted, written filesystem (crash-consistent, as CSI takes them).
    let snap = pool.create_snapshot(&src.local, &format!("{fs}-snap"), "snap1", &holdfast::volume_id::new_uid()).await.unwrap();
    assert_eq!((snap.source_volume.as_str(), snap.size, snap.ready), (src.local.as_str(), size, true));
    assert_eq!(
        pool.create_snapshot(&src.local, &format!("{fs}-snap"), "snap1", &holdfast::volume_id::new_uid()).await.unwrap(),
        snap,
        "retry"
    );
    assert_eq!(pool.list_snapshots().await.unwrap(), vec![snap.clone()]);
    write_durably(&src_mnt.join("after"), b"written after the snapshot\n");

    // Restore into a larger volume, mounted beside its (still mounted) source.
    let restore = CreateRequest { source: Some(Source::Snapshot("snap1".into())), ..request(&format!("{fs}-restore"), 2 * size, Some(fs)) };
    let restored = pool.create_volume(&restore).await.unwrap();
    assert_eq!((restored.capacity, restored.source.clone()), (2 * size, restore.source.clone()));
    assert_eq!(pool.create_volume(&restore).await.unwrap(), restored, "a retried restore returns the same volume");
    let r_dev = lab.device(&pool, &restored.local).await;
    let src_uuid = format::probe(lab.exec.as_ref(), &src_dev).await.unwrap().and_then(|s| s.uuid);
    let r_sig = format::probe(lab.exec.as_ref(), &r_dev).await.unwrap().expect("the restore holds the filesystem");
    assert_eq!(r_sig.kind, fs);
    assert!(r_sig.uuid.is_some() && r_sig.uuid != src_uuid, "restored UUID {:?} equals the source's", r_sig.uuid);
    let r_mnt = lab.mount(&r_dev, "restored").await;
    assert_eq!(std::fs::read(r_mnt.join("before")).unwrap(), before);
    assert!(!r_mnt.join("after").exists(), "the restore shows a write made after the snapshot");
    format::grow(lab.exec.as_ref(), fs, &r_dev, &r_mnt).await.unwrap();
    assert!(fs_size(&r_mnt) > size, "the restored {fs} did not grow into its larger volume");
    write_durably(&r_mnt.join("only-in-restore"), b"x\n");
    assert!(!src_mnt.join("only-in-restore").exists());

    // Clone of the mounted source volume: has both files, mounts beside it too.
    let clone_req = CreateRequest { source: Some(Source::Volume(src.local.clone())), ..request(&format!("{fs}-clone"), size, Some(fs)) };
    let clone = pool.create_volume(&clone_req).await.unwrap();
    let c_dev = lab.device(&pool, &clone.local).await;
    let c_mnt = lab.mount(&c_dev, "clone").await;
    assert_eq!(std::fs::read(c_mnt.join("before")).unwrap(), before);
    assert!(c_mnt.join("after").exists(), "the clone lacks a write made before it");
    assert_eq!(pool.condition(&clone.local).await.unwrap(), Condition::Healthy);

    for m in [&c_mnt, &r_mnt, &src_mnt] {
        lab.umount(m).await;
    }
    for v in [&clone.local, &restored.local, &src.local] {
        pool.delete_volume(v).await.unwrap();
    }
    pool.delete_snapshot("snap1").await.unwrap();
    pool.delete_snapshot("snap1").await.unwrap();
    assert_eq!(pool.get_snapshot("snap1").await.unwrap(), None);
    assert!(lab.holdfast_lvs().await.is_empty());
}

async fn deleting_a_volume_keeps_its_snapshots_usable() {
    let lab = Lab::new("orphan", 512).await;
    lab.thin_pool(384).await;
    let pool = lab.thin("orphan", 2.0);
    let src = pool.create_volume(&request("origin", 64 * MIB, Some("ext4"))).await.unwrap();
    let dev = lab.device(&pool, &src.local).await;
    let mnt = lab.mkfs_and_mount(&dev, "ext4", "origin").await;
    let data = b"outlives its volume\n".repeat(5000);
    write_durably(&mnt.join("data"), &data);
    lab.umount(&mnt).await;
    let snap = pool.create_snapshot(&src.local, "orphan-snap", "orphan-snap", &holdfast::volume_id::new_uid()).await.unwrap();

    pool.delete_volume(&src.local).await.unwrap();
    assert_eq!(pool.get_volume(&src.local).await.unwrap(), None);
    assert_eq!(pool.get_snapshot("orphan-snap").await.unwrap(), Some(snap.clone()), "the snapshot outlives its volume");

    let restore = CreateRequest { source: Some(Source::Snapshot(snap.local.clone())), ..request("from-orphan", 64 * MIB, Some("ext4")) };
    let v = pool.create_volume(&restore).await.unwrap();
    let r_mnt = lab.mount(&lab.device(&pool, &v.local).await, "restored").await;
    assert_eq!(std::fs::read(r_mnt.join("data")).unwrap(), data);
    lab.umount(&r_mnt).await;
    pool.delete_volume(&v.local).await.unwrap();
    pool.delete_snapshot(&snap.local).await.unwrap();
    assert!(lab.holdfast_lvs().await.is_empty());
}

async fn capacity_numbers_match_what_fits() {
    // Thick: everything free can be allocated, and then nothing.
    let lab = Lab::new("cap", 256).await;
    let thick = lab.pool("thick", "");
    let all = thick.capacity().await.unwrap();
    assert_eq!(all, lab.vg_free().await / MIB * MIB);
    thick.create_volume(&request("all", all, None)).await.unwrap();
    assert_eq!(thick.capacity().await.unwrap(), 0);
    let err = thick.create_volume(&request("one-more", MIB, None)).await.unwrap_err();
    assert!(matches!(&err, Error::ResourceExhausted(_)), "{err:?}");
    thick.delete_volume(&local_name("all")).await.unwrap();

    // Thin, ratio 1.5 over a 64 MiB pool: 96 MiB may be promised, and no more.
    lab.thin_pool(64).await;
    let thin = lab.thin("thin", 1.5);
    assert_eq!(thin.capacity().await.unwrap(), 96 * MIB);
    let v = thin.create_volume(&request("first", 64 * MIB, None)).await.unwrap();
    assert_eq!(thin.capacity().await.unwrap(), 32 * MIB);
    assert!(matches!(thin.create_volume(&request("second", 64 * MIB, None)).await, Err(Error::ResourceExhausted(_))));
    assert!(matches!(thin.expand_volume(&v.local, 128 * MIB).await, Err(Error::ResourceExhausted(_))));
    assert_eq!(thin.expand_volume(&v.local, 96 * MIB).await.unwrap(), 96 * MIB);
    assert_eq!(thin.capacity().await.unwrap(), 0);
    // The thick pool on the same VG sees the extents the thin pool took.
    assert!(thick.capacity().await.unwrap() <= all - 64 * MIB);
    thin.delete_volume(&v.local).await.unwrap();
    assert_eq!(thin.capacity().await.unwrap(), 96 * MIB);
}

/// `dmsetup info` attributes of the device of `vg/lv` (e.g. `L-sw`; `s`: suspended).
async fn dm_attr(vg: &str, lv: &str) -> String {
    let name = format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"));
    run(&["dmsetup", "info", "-c", "--noheadings", "-o", "attr", &name]).await.trim().to_owned()
}

/// A `lvcreate --snapshot` or `lvextend` killed mid-way leaves its origin suspended (here
/// `dmsetup suspend` does the same): the driver resumes the devices of its own volume group
/// before it serves, and leaves another volume group's alone.
async fn the_driver_resumes_its_suspended_devices_at_start_up() {
    let ours = Lab::new("resume", 256).await;
    ours.thin_pool(128).await;
    let theirs = Lab::new("foreign", 64).await;
    let pool = ours.thin("resume", 1.0);
    let v = pool.create_volume(&request("suspended", 16 * MIB, Some("ext4"))).await.unwrap();
    let dev = ours.device(&pool, &v.local).await;
    run(&["lvcreate", "-q", "-y", "-L", "8M", "-n", "other", &theirs.vg]).await;
    let lv = holdfast::pool::lvm::volume_lv(&v.local);
    for (vg, lv) in [(ours.vg.as_str(), lv.as_str()), (theirs.vg.as_str(), "other")] {
        let name = format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"));
        run(&["dmsetup", "suspend", &name]).await;
        assert_eq!(dm_attr(vg, lv).await.chars().nth(2), Some('s'), "{vg}/{lv} is suspended");
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("holdfast.toml");
    std::fs::write(&config, format!("[[pool]]\nname = \"resume\"\nkind = \"lvm\"\nvolume_group = \"{}\"\nthin_pool = \"tp0\"\n", ours.vg))
        .unwrap();
    let socket = dir.path().join("csi.sock");
    let log = std::fs::File::create(dir.path().join("driver.log")).unwrap();
    let mut driver = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["all-in-one", "--node-id", "lvm-test", "--endpoint", &format!("unix://{}", socket.display())])
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn holdfast");
    // The repair runs before the socket is served.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() && Instant::now() < deadline && driver.try_wait().unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = driver.kill();
    let _ = driver.wait();
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap_or_default();
    let (ours_attr, theirs_attr) = (dm_attr(&ours.vg, &lv).await, dm_attr(&theirs.vg, "other").await);
    // Resumed by hand before asserting, so a failure cannot leave the VM's devices suspended.
    for (vg, lv) in [(ours.vg.as_str(), lv.as_str()), (theirs.vg.as_str(), "other")] {
        let name = format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"));
        let _ = std::process::Command::new("dmsetup").args(["resume", &name]).output();
    }
    assert!(socket.exists(), "the driver did not start; its log:\n{log}");
    assert_eq!(ours_attr.chars().nth(2), Some('-'), "our LV is still suspended ({ours_attr}); log:\n{log}");
    assert!(log.contains("resumed a device-mapper device left suspended"), "not logged:\n{log}");
    assert_eq!(theirs_attr.chars().nth(2), Some('s'), "another volume group's device was resumed");
    // Writable again: a direct write to the device returns.
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dev.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&d).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        f.sync_all().unwrap();
        let _ = tx.send(());
    });
    assert!(rx.recv_timeout(Duration::from_secs(20)).is_ok(), "a write to the resumed device hangs");
    pool.delete_volume(&v.local).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Thick pools: copy-on-write snapshots, restores and clones by block copy (issue 12).

/// Names of the temporary copy sources (`hfc-…`) a thick clone makes and must remove.
async fn copy_sources(lab: &Lab) -> Vec<String> {
    lab.lvs().await.into_iter().map(|l| l.name).filter(|n| n.starts_with("hfc-")).collect()
}

/// Snapshot of a mounted thick volume, restored into a larger volume and cloned while mounted:
/// each holds exactly what its source held at that point, mounts beside it with a new UUID;
/// the source cannot be deleted while it has the snapshot.
async fn thick_snapshot_restore_and_clone(fs: &str) {
    let lab = Lab::new(&format!("thick-{fs}"), 1024).await;
    let pool = lab.pool("thick-snap", "");
    // 128 MiB at least: btrfs refuses to resize below 256 MiB, and the restore is twice the size.
    let size = format::min_size(fs).max(128 * MIB);
    let src = pool.create_volume(&request(&format!("{fs}-thick-source"), size, Some(fs))).await.unwrap();
    let src_dev = lab.device(&pool, &src.local).await;
    let src_mnt = lab.mkfs_and_mount(&src_dev, fs, "source").await;
    let before = b"written before the snapshot\n".repeat(2000);
    write_durably(&src_mnt.join("before"), &before);

    let snap = pool.create_snapshot(&src.local, &format!("{fs}-thick-snap"), "tsnap1", &holdfast::volume_id::new_uid()).await.unwrap();
    assert_eq!((snap.source_volume.as_str(), snap.size, snap.ready), (src.local.as_str(), size, true));
    let again = pool.create_snapshot(&src.local, &format!("{fs}-thick-snap"), "tsnap1", &holdfast::volume_id::new_uid()).await.unwrap();
    assert_eq!(again, snap, "a retried snapshot is the same one");
    assert_eq!(pool.list_snapshots().await.unwrap(), vec![snap.clone()]);
    let cow = lab.lvs().await.into_iter().find(|l| l.name == holdfast::pool::lvm::snapshot_lv("tsnap1")).expect("the snapshot LV");
    assert!(cow.attr.cow_snapshot() && cow.origin == holdfast::pool::lvm::volume_lv(&src.local), "a COW snapshot of its origin: {cow:?}");
    write_durably(&src_mnt.join("after"), b"written after the snapshot\n");

    let restore =
        CreateRequest { source: Some(Source::Snapshot("tsnap1".into())), ..request(&format!("{fs}-thick-restore"), 2 * size, Some(fs)) };
    let restored = pool.create_volume(&restore).await.unwrap();
    assert_eq!((restored.capacity, restored.source.clone()), (2 * size, restore.source.clone()));
    assert_eq!(pool.create_volume(&restore).await.unwrap(), restored, "a retried restore returns the same volume");
    let r_dev = lab.device(&pool, &restored.local).await;
    let src_uuid = format::probe(lab.exec.as_ref(), &src_dev).await.unwrap().and_then(|s| s.uuid);
    let r_sig = format::probe(lab.exec.as_ref(), &r_dev).await.unwrap().expect("the restore holds the filesystem");
    assert_eq!(r_sig.kind, fs);
    assert!(r_sig.uuid.is_some() && r_sig.uuid != src_uuid, "restored UUID {:?} equals the source's", r_sig.uuid);
    let r_mnt = lab.mount(&r_dev, "restored").await;
    assert_eq!(std::fs::read(r_mnt.join("before")).unwrap(), before);
    assert!(!r_mnt.join("after").exists(), "the restore shows a write made after the snapshot");
    format::grow(lab.exec.as_ref(), fs, &r_dev, &r_mnt).await.unwrap();
    assert!(fs_size(&r_mnt) > size, "the restored {fs} did not grow into its larger volume");

    // A clone of the mounted, written source: copied through a temporary snapshot, removed after.
    let clone_req =
        CreateRequest { source: Some(Source::Volume(src.local.clone())), ..request(&format!("{fs}-thick-clone"), size, Some(fs)) };
    let clone = pool.create_volume(&clone_req).await.unwrap();
    assert!(copy_sources(&lab).await.is_empty(), "the clone's temporary snapshot is left: {:?}", copy_sources(&lab).await);
    let c_dev = lab.device(&pool, &clone.local).await;
    let c_mnt = lab.mount(&c_dev, "clone").await;
    assert_eq!(std::fs::read(c_mnt.join("before")).unwrap(), before);
    assert!(c_mnt.join("after").exists(), "the clone lacks a write made before it");
    assert_eq!(pool.condition(&clone.local).await.unwrap(), Condition::Healthy);

    for m in [&c_mnt, &r_mnt, &src_mnt] {
        lab.umount(m).await;
    }
    // A COW snapshot cannot outlive its origin: the delete is refused, naming it.
    let err = pool.delete_volume(&src.local).await.unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains(&format!("{fs}-thick-snap"))), "{err:?}");
    assert!(pool.get_volume(&src.local).await.unwrap().is_some(), "the refused delete removed the volume");
    assert_eq!(pool.get_snapshot("tsnap1").await.unwrap(), Some(snap.clone()), "the refused delete removed the snapshot");
    pool.delete_snapshot("tsnap1").await.unwrap();
    pool.delete_snapshot("tsnap1").await.unwrap();
    for v in [&clone.local, &restored.local, &src.local] {
        pool.delete_volume(v).await.unwrap();
    }
    assert!(lab.holdfast_lvs().await.is_empty());
}

/// Reads `len` bytes of block device `dev` from its start.
fn read_device(dev: &Path, len: u64) -> Vec<u8> {
    use std::io::Read;
    let mut f = std::fs::File::open(dev).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// Writes `data` at `offset` of block device `dev`, durably.
fn write_device(dev: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// Raw block volumes, compared byte for byte: a restore holds the snapshot's blocks exactly
/// (zero runs included, which the copy zeroes instead of writing) and a clone the source's;
/// past the source's size a larger copy reads zeros, never what the extents held before.
async fn thick_copies_are_block_exact_and_hand_out_no_old_data() {
    let lab = Lab::new("thick-block", 256).await;
    let pool = lab.pool("thick-block", "");
    // Extents full of old data (a deleted LV's), which new LVs get.
    run(&["lvcreate", "-q", "-y", "-L", "200M", "-n", "junk", &lab.vg]).await;
    let junk = PathBuf::from(format!("/dev/{}/junk", lab.vg));
    for i in 0..200u64 {
        write_device(&junk, i * MIB, &vec![0xAB; MIB as usize]);
    }
    run(&["lvremove", "-q", "-y", &format!("{}/junk", lab.vg)]).await;

    let src = pool.create_volume(&request("block-source", 16 * MIB, None)).await.unwrap();
    let dev = lab.device(&pool, &src.local).await;
    write_device(&dev, 0, &vec![0x11; MIB as usize]);
    write_device(&dev, MIB, &vec![0; 7 * MIB as usize]);
    write_device(&dev, 8 * MIB + 4096, b"a few bytes in the middle");
    let at_snapshot = read_device(&dev, 16 * MIB);
    pool.create_snapshot(&src.local, "block-snap", "bsnap", &holdfast::volume_id::new_uid()).await.unwrap();
    write_device(&dev, 0, &vec![0x33; MIB as usize]);
    let now = read_device(&dev, 16 * MIB);
    assert_ne!(now, at_snapshot);

    let restore = CreateRequest { source: Some(Source::Snapshot("bsnap".into())), ..request("block-restore", 48 * MIB, None) };
    let r = pool.create_volume(&restore).await.unwrap();
    let r_dev = lab.device(&pool, &r.local).await;
    let got = read_device(&r_dev, 48 * MIB);
    assert!(got[..16 * MIB as usize] == at_snapshot[..], "the restore differs from the snapshot");
    assert!(got[16 * MIB as usize..].iter().all(|b| *b == 0), "past the source's size the restore is not zero (old data handed out)");

    let clone = CreateRequest { source: Some(Source::Volume(src.local.clone())), ..request("block-clone", 16 * MIB, None) };
    let c = pool.create_volume(&clone).await.unwrap();
    assert!(read_device(&lab.device(&pool, &c.local).await, 16 * MIB) == now, "the clone differs from its source");
    assert!(copy_sources(&lab).await.is_empty());

    pool.delete_snapshot("bsnap").await.unwrap();
    for v in [&c.local, &r.local, &src.local] {
        pool.delete_volume(v).await.unwrap();
    }
    assert!(lab.holdfast_lvs().await.is_empty());
}

/// A snapshot whose origin changed more than its COW space holds is invalidated by
/// dm-snapshot: reported not ready, refused as a source (FAILED_PRECONDITION, nothing made).
async fn an_overflowed_thick_snapshot_is_not_ready_and_never_restored() {
    let lab = Lab::new("overflow", 256).await;
    let pool = lab.pool("overflow", "snapshot_reserve = \"1MiB\"\n");
    let src = pool.create_volume(&request("overflowing", 16 * MIB, None)).await.unwrap();
    let dev = lab.device(&pool, &src.local).await;
    write_device(&dev, 0, &vec![0x44; MIB as usize]);
    let snap = pool.create_snapshot(&src.local, "overflow-snap", "osnap", &holdfast::volume_id::new_uid()).await.unwrap();
    assert!(snap.ready);
    // 8 MiB of changes through a 1 MiB COW space.
    write_device(&dev, 0, &vec![0x55; 8 * MIB as usize]);
    let lv = lab.lvs().await.into_iter().find(|l| l.name == holdfast::pool::lvm::snapshot_lv("osnap")).expect("the snapshot LV");
    assert!(lv.attr.invalid_snapshot(), "LVM did not invalidate the overflowed snapshot: {lv:?}");
    assert!(!pool.get_snapshot("osnap").await.unwrap().expect("still listed").ready, "an overflowed snapshot is reported ready");
    assert!(!pool.list_snapshots().await.unwrap()[0].ready);

    let before = lab.holdfast_lvs().await;
    let restore = CreateRequest { source: Some(Source::Snapshot("osnap".into())), ..request("from-overflowed", 16 * MIB, None) };
    let err = pool.create_volume(&restore).await.unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("overflowed") && m.contains("overflow-snap")), "{err:?}");
    assert_eq!(lab.holdfast_lvs().await, before, "a refused restore made an LV");
    pool.delete_snapshot("osnap").await.unwrap();
    pool.delete_volume(&src.local).await.unwrap();
    assert!(lab.holdfast_lvs().await.is_empty());
}

/// Through the real driver: a restore and a clone slower than the client's deadline run on
/// detached (ABORTED "copy … in progress" meanwhile), survive a kill -9 of the driver (the
/// restarted driver copies again; no half-copied volume is ever returned) and the retry gets
/// the volume holding exactly the source's blocks. DeleteVolume of the snapshotted source
/// answers FAILED_PRECONDITION naming the snapshot.
async fn thick_copies_outlive_their_request_and_a_killed_driver() {
    use common::{Driver, Setup};
    use holdfast::proto::volume_capability::access_mode::Mode;
    use holdfast::proto::*;
    use tonic::Code;

    let lab = Lab::new("detached", 512).await;
    let vg = lab.vg.clone();
    // 32 chunks of 1 MiB at 1 s: a copy takes at least 32 s. The client deadlines below leave
    // the driver's look-ups (several `lvs` under software emulation) time to reach the copy.
    let setup = Setup::with_config(|_| format!("[[pool]]\nname = \"thick-jobs\"\nkind = \"lvm\"\nvolume_group = \"{vg}\"\n"))
        .env(holdfast::pool::lvm::blockcopy::TEST_DELAY_ENV, "1000");
    let mut d: Driver = setup.start().await;
    let cap = common::block_cap(Mode::SingleNodeWriter);
    let source = d.create("detached-source", 32 * common::MIB, cap.clone()).await;
    let lv_of = |id: &str| {
        PathBuf::from(format!(
            "/dev/{vg}/{}",
            holdfast::pool::lvm::volume_lv(&holdfast::volume_id::VolumeId::parse(id).expect("a volume id").local)
        ))
    };
    let src_dev = lv_of(&source.volume_id);
    for i in 0..32u64 {
        write_device(&src_dev, i * MIB, &format!("block {i} of the source ").into_bytes().repeat(1000));
    }
    let want = read_device(&src_dev, 32 * MIB);
    let snap = d.snapshot("detached-snap", &source.volume_id).await;
    assert!(snap.ready_to_use);

    async fn within(d: &Driver, req: CreateVolumeRequest, t: Duration) -> Result<Volume, tonic::Status> {
        let mut r = tonic::Request::new(req);
        r.set_timeout(t);
        d.controller().create_volume(r).await.map(|v| v.into_inner().volume.expect("no volume"))
    }
    let from = |name: &str, source: volume_content_source::Type| {
        let mut req = d.create_request(name, 32 * common::MIB, cap.clone());
        req.volume_content_source = Some(VolumeContentSource { r#type: Some(source) });
        req
    };
    let restore = from(
        "detached-restore",
        volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: snap.snapshot_id.clone() }),
    );
    let clone = from(
        "detached-clone",
        volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: source.volume_id.clone() }),
    );

    for (what, req) in [("restore", &restore), ("clone", &clone)] {
        // The client gives up first (its deadline: DEADLINE_EXCEEDED, or CANCELLED when the
        // server's timeout fires first); the copy goes on, and a retry finds it running.
        let gave_up = |c: Code| matches!(c, Code::Aborted | Code::DeadlineExceeded | Code::Cancelled);
        let first = within(&d, req.clone(), Duration::from_secs(6)).await.unwrap_err();
        assert!(gave_up(first.code()), "{what}: {:?} {}", first.code(), first.message());
        let mut running = None;
        for _ in 0..3 {
            let retry = within(&d, req.clone(), Duration::from_secs(10)).await.unwrap_err();
            assert!(gave_up(retry.code()), "{what}: {:?} {}", retry.code(), retry.message());
            if retry.code() == Code::Aborted {
                running = Some(retry);
                break;
            }
        }
        let retry = running.unwrap_or_else(|| panic!("{what}: no retry answered ABORTED while the copy ran"));
        assert!(retry.message().contains("in progress"), "{what}: {}", retry.message());
        // Killed mid-copy: the new LV exists, unfinished; the restarted driver copies again.
        d.kill();
        d.restart().await;
        let deadline = Instant::now() + Duration::from_secs(600);
        let v = loop {
            match within(&d, req.clone(), Duration::from_secs(20)).await {
                Ok(v) => break v,
                Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                    assert!(e.message().contains("in progress"), "{what}: {}", e.message());
                }
                // Look-ups waiting behind the restarted copy's LVM commands can outlast the
                // client's deadline under emulation: a CO retries those too.
                Err(e) if gave_up(e.code()) && Instant::now() < deadline => {}
                Err(e) => panic!("{what} after the restart: {:?} {}", e.code(), e.message()),
            }
        };
        d.remember_volume(&v.volume_id);
        let expected = if what == "restore" { &want } else { &read_device(&src_dev, 32 * MIB) };
        assert!(read_device(&lv_of(&v.volume_id), 32 * MIB) == *expected, "{what}: the copy differs from its source");
        assert!(copy_sources(&lab).await.is_empty(), "{what}: a temporary snapshot is left: {:?}", copy_sources(&lab).await);
    }

    // The snapshotted source cannot go; without its snapshot it can.
    let req = DeleteVolumeRequest { volume_id: source.volume_id.clone(), ..Default::default() };
    let refused = d.controller().delete_volume(req).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{}", refused.message());
    assert!(refused.message().contains("detached-snap"), "{}", refused.message());
    d.delete_snapshot(&snap.snapshot_id).await;
    d.delete(&source.volume_id).await;
}

/// issue 12: LVM grows the origin of COW snapshots only while it is inactive. A mounted thick
/// volume that has a snapshot: the expansion is FAILED_PRECONDITION naming the snapshot, and
/// nothing changed (size, data, snapshot); unmounted, the same expansion grows it (deactivated,
/// extended, activated again), the filesystem then grows into it (NodeExpandVolume at the next
/// stage), and the snapshot still holds, restorable, what the volume held when it was taken.
async fn a_snapshotted_thick_volume_grows_only_while_unused() {
    let lab = Lab::new("thick-grow", 1024).await;
    let pool = lab.pool("thick-grow", "");
    let size = 64 * MIB;
    let v = pool.create_volume(&request("thick-grow-source", size, Some("ext4"))).await.unwrap();
    let dev = lab.device(&pool, &v.local).await;
    let mnt = lab.mkfs_and_mount(&dev, "ext4", "source").await;
    write_durably(&mnt.join("before"), b"written before the snapshot\n");
    let snap = pool.create_snapshot(&v.local, "thick-grow-snap", "tgsnap1", &holdfast::volume_id::new_uid()).await.unwrap();
    write_durably(&mnt.join("after"), b"written after the snapshot\n");

    let err = pool.expand_volume(&v.local, 2 * size).await.unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("thick-grow-snap") && m.contains("unstage")), "{err:?}");
    assert_eq!(device_size(&dev), size, "the refused expansion grew the device");
    assert_eq!(pool.get_volume(&v.local).await.unwrap().map(|g| g.capacity), Some(size));
    assert_eq!(std::fs::read(mnt.join("after")).unwrap(), b"written after the snapshot\n", "the mounted data changed");
    assert_eq!(pool.get_snapshot("tgsnap1").await.unwrap(), Some(snap.clone()), "the refusal touched the snapshot");

    lab.umount(&mnt).await;
    let grown = pool.expand_volume(&v.local, 2 * size).await.unwrap();
    assert_eq!(grown, 2 * size);
    assert_eq!(pool.expand_volume(&v.local, 2 * size).await.unwrap(), 2 * size, "a retried expansion");
    let dev = lab.device(&pool, &v.local).await;
    assert_eq!(device_size(&dev), 2 * size, "the device did not grow");
    let mnt = lab.mount(&dev, "source-again").await;
    format::grow(lab.exec.as_ref(), "ext4", &dev, &mnt).await.unwrap();
    assert!(fs_size(&mnt) > size, "the filesystem did not grow into the larger volume");
    assert_eq!(std::fs::read(mnt.join("after")).unwrap(), b"written after the snapshot\n");
    let now = pool.get_snapshot("tgsnap1").await.unwrap().expect("the snapshot is gone");
    assert!(now.ready && now.size == size, "the snapshot after the expansion: {now:?}");

    // The snapshot still restores what the volume held when it was taken.
    let restore = CreateRequest { source: Some(Source::Snapshot("tgsnap1".into())), ..request("thick-grow-restore", size, Some("ext4")) };
    let restored = pool.create_volume(&restore).await.unwrap();
    let r_dev = lab.device(&pool, &restored.local).await;
    let r_mnt = lab.mount(&r_dev, "restored").await;
    assert_eq!(std::fs::read(r_mnt.join("before")).unwrap(), b"written before the snapshot\n");
    assert!(!r_mnt.join("after").exists(), "the restore shows a write made after the snapshot");
    for m in [&r_mnt, &mnt] {
        lab.umount(m).await;
    }
    pool.delete_snapshot("tgsnap1").await.unwrap();
    for l in [&restored.local, &v.local] {
        pool.delete_volume(l).await.unwrap();
    }
    assert!(lab.holdfast_lvs().await.is_empty());
}
