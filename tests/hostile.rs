//! Hostile and careless callers (issue 8): the real `holdfast all-in-one` binary is asked to
//! unmount, grow, expose or report on things that are not its volumes, to follow symlinks to a
//! victim, to stage one volume at several paths, to work on a frozen pool filesystem, to start
//! with overlapping pools, to echo huge or multi-line ids, and it is killed with SIGKILL at each
//! step of a snapshot. Every test asserts what an operator would check afterwards: the foreign
//! data is untouched, the call answered the code the issue requires, and nothing the test did
//! not ask for is left mounted, attached or frozen.
//!
//! Two groups:
//! - `any_pool::*` (foreign mounts, symlinks, foreign paths, one staging path per volume) use
//!   the pool the environment names (`HOLDFAST_TEST_CONFIG`, as tests/conformance.rs), so the
//!   VM suites run them against lvm, zfs and nfs pools: `cargo test --test hostile any_pool::`.
//! - `host::*` build `file` pools of their own (often on a small loop-mounted filesystem of
//!   their own, to fill or freeze it) and need loop devices, mkfs and fsfreeze on the host.
//!
//! Every mount, loop device and freeze a test makes is undone by a guard (thaw first, then
//! unmount, then detach), so a failing test leaves nothing behind; tests only ever touch paths
//! under their own temp dirs.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use holdfast::proto::*;
use tonic::Code;

// ---------------------------------------------------------------------------------------------
// Guards and helpers

/// A tmpfs of "someone else's" with a file in it, mounted by the test; unmounted on drop.
struct ForeignMount {
    path: PathBuf,
    file: PathBuf,
    content: Vec<u8>,
}

impl ForeignMount {
    fn tmpfs(path: &Path) -> ForeignMount {
        std::fs::create_dir_all(path).expect("create foreign mount point");
        assert!(run("mount", &["-t", "tmpfs", "-o", "size=4m,mode=0755", "hostile-foreign", &path_str(path)]), "mount a tmpfs");
        let file = path.join("precious.txt");
        let content = format!("someone else's data {}\n", unique("f")).into_bytes();
        write_durably(&file, &content);
        ForeignMount { path: path.to_path_buf(), file, content }
    }

    /// Fails unless the tmpfs is still mounted there, alone, with its file intact.
    fn assert_untouched(&self, what: &str) {
        assert!(is_mount_point(&self.path), "{what}: the foreign mount at {} was unmounted", self.path.display());
        assert_eq!(mounts_at(&self.path), 1, "{what}: something was mounted over the foreign mount at {}", self.path.display());
        let now = std::fs::read(&self.file).ok();
        assert_eq!(now.as_deref(), Some(&self.content[..]), "{what}: the foreign file {} changed or is gone", self.file.display());
    }
}

impl Drop for ForeignMount {
    fn drop(&mut self) {
        // Only this path, which lies in the test's own temp dir.
        for _ in 0..5 {
            if !is_mount_point(&self.path) {
                break;
            }
            run("umount", &[&path_str(&self.path)]);
        }
    }
}

/// A loop device the test attached to an image of its own; detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(image: &Path) -> Loop {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(image).output().expect("run losetup");
        assert!(out.status.success(), "losetup --find --show {}: {}", image.display(), String::from_utf8_lossy(&out.stderr));
        Loop { dev: String::from_utf8_lossy(&out.stdout).trim().to_owned() }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        run("losetup", &["--detach", &self.dev]);
    }
}

/// A mount the test made itself; unmounted on drop.
struct MountGuard {
    path: PathBuf,
}

impl MountGuard {
    fn mount(source: &str, path: &Path, args: &[&str]) -> MountGuard {
        std::fs::create_dir_all(path).expect("create mount point");
        let p = path_str(path);
        let mut all: Vec<&str> = args.to_vec();
        all.extend([source, p.as_str()]);
        assert!(run("mount", &all), "mount {source} at {p}");
        MountGuard { path: path.to_path_buf() }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        for _ in 0..5 {
            if !is_mount_point(&self.path) {
                break;
            }
            if !run("umount", &[&path_str(&self.path)]) {
                run("umount", &["--lazy", &path_str(&self.path)]);
            }
        }
    }
}

/// Thaws a filesystem on drop (whether the test or the driver froze it), and kills a paused
/// wrapper tool the test left. Dropped before anything is unmounted: unmounting a frozen
/// filesystem would leave its superblock frozen with no mount point to thaw it through.
struct Thaw {
    paths: Vec<PathBuf>,
    paused_pid_file: Option<PathBuf>,
}

impl Thaw {
    fn freeze(path: &Path) -> Thaw {
        assert!(run("fsfreeze", &["--freeze", &path_str(path)]), "fsfreeze --freeze {}", path.display());
        Thaw { paths: vec![path.to_path_buf()], paused_pid_file: None }
    }
}

impl Drop for Thaw {
    fn drop(&mut self) {
        if let Some(pid) = self.paused_pid_file.as_deref().and_then(|f| std::fs::read_to_string(f).ok()) {
            // The wrapper script this test started (its pid, written by itself).
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        for p in &self.paths {
            if is_mount_point(p) {
                // Fails (harmlessly) when it is not frozen.
                let _ = Command::new("fsfreeze").arg("--unfreeze").arg(p).stderr(Stdio::null()).status();
            }
        }
    }
}

/// A temp dir outside any driver's own (pools, state, images that outlive one driver process);
/// on drop, everything mounted under it is unmounted and loops backed by its files detached.
struct Outer {
    tmp: Option<tempfile::TempDir>,
}

impl Outer {
    fn new() -> Outer {
        Outer { tmp: Some(tempfile::Builder::new().prefix("holdfast-hostile-").tempdir().expect("create temp dir")) }
    }
    fn path(&self) -> &Path {
        self.tmp.as_ref().expect("temp dir").path()
    }
    /// A `file` pool named `conformance` at `pool_dir`, plus `extra` TOML; returns the config.
    fn file_config(&self, pool_dir: &Path, extra: &str) -> PathBuf {
        std::fs::create_dir_all(pool_dir).expect("create pool dir");
        let cfg = self.path().join("holdfast.toml");
        let text = format!("{extra}[[pool]]\nname = \"conformance\"\nkind = \"file\"\npath = \"{}\"\n", pool_dir.display());
        std::fs::write(&cfg, text).expect("write config");
        cfg
    }
}

impl Drop for Outer {
    fn drop(&mut self) {
        let left = clean_up_dir(self.path());
        if !left.is_empty() {
            let kept = self.tmp.take().map(tempfile::TempDir::keep);
            eprintln!("cannot unmount {left:?}; keeping {kept:?} for inspection");
        }
    }
}

/// A driver on a `file` pool of the test's own in `outer` (whatever the environment says).
async fn file_driver(outer: &Outer, extra_config: &str) -> Driver {
    let cfg = outer.file_config(&outer.path().join("pool"), extra_config);
    Setup::with_config(&cfg, "conformance", "file").start().await
}

/// How many mounts are stacked at `path`.
fn mounts_at(path: &Path) -> usize {
    all_mount_points().iter().filter(|m| m.as_path() == path).count()
}

/// The mount points under `dir` (a snapshot to compare before and after a refused call).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = all_mount_points().into_iter().filter(|m| m.starts_with(dir)).collect();
    v.sort();
    v
}

/// `major:minor` and root of the mount at `path` (its superblock and the subtree it shows):
/// two mount entries with the same pair show the same thing.
fn mount_identity(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path_str(path);
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && unescape(f[4]) == want).then(|| (f[2].to_owned(), f[3].to_owned()))
    })
}

/// Every mount in the table showing the same superblock and subtree.
fn mounts_of(identity: &(String, String)) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 4 && f[2] == identity.0 && f[3] == identity.1).then(|| unescape(f[4]))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// An id of the pool under test that names no volume.
fn unknown_volume_id(d: &Driver) -> String {
    let node = if d.pool.kind == "nfs" { "-" } else { NODE_ID };
    format!("{}:{}:{}:{}", d.pool.kind, node, d.pool.name, unique("no-such-volume"))
}

/// Fails unless the call failed with one of `want`; returns the status.
fn expect_one_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, want: &[Code], what: &str) -> tonic::Status {
    match r {
        Ok(resp) => panic!("{what}: expected one of {want:?}, got OK: {:?}", resp.into_inner()),
        Err(s) if want.contains(&s.code()) => s,
        Err(s) => panic!("{what}: expected one of {want:?}, got {:?}: {}", s.code(), s.message()),
    }
}

/// A victim directory with a file in it, checked after a refused call.
struct Victim {
    dir: PathBuf,
    file: PathBuf,
    content: Vec<u8>,
}

impl Victim {
    fn new(dir: &Path) -> Victim {
        std::fs::create_dir_all(dir).expect("create victim dir");
        let file = dir.join("victim.txt");
        let content = format!("the victim's data {}\n", unique("v")).into_bytes();
        write_durably(&file, &content);
        Victim { dir: dir.to_path_buf(), file, content }
    }
    fn assert_untouched(&self, what: &str) {
        assert!(!is_mount_point(&self.dir), "{what}: something was mounted over the victim dir {}", self.dir.display());
        assert_eq!(std::fs::read(&self.file).ok().as_deref(), Some(&self.content[..]), "{what}: the victim file changed");
    }
}

/// NodeExpandVolume request.
fn expand_request(id: &str, volume_path: &Path, staging: &str, bytes: i64, cap: &VolumeCapability) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest {
        volume_id: id.to_owned(),
        volume_path: path_str(volume_path),
        staging_target_path: staging.to_owned(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

/// ControllerExpandVolume to `bytes`; the new capacity.
async fn expand_controller(d: &Driver, id: &str, bytes: i64, cap: &VolumeCapability) -> i64 {
    let req = ControllerExpandVolumeRequest {
        volume_id: id.to_owned(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    ok(d.controller().controller_expand_volume(req).await, "ControllerExpandVolume").capacity_bytes
}

/// An ext4 filesystem capability (tests that size things themselves).
fn ext4_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })),
    }
}

/// The image of a `file` pool volume (`<pool path>/volumes/<local>.img`).
fn file_image(pool_dir: &Path, volume_id: &str) -> PathBuf {
    let local = volume_id.rsplit(':').next().expect("volume id has fields");
    pool_dir.join("volumes").join(format!("{local}.img"))
}

/// The loop devices backed by `image` (`losetup -j`).
fn loops_of(image: &Path) -> String {
    let out = Command::new("losetup").arg("-j").arg(image).output().expect("run losetup -j");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Writes and fsyncs a small file from a child process; false if that did not finish within
/// `timeout` (the filesystem is frozen). The writer is left to finish when the test thaws.
fn write_finishes(path: &Path, timeout: Duration) -> bool {
    let mut child: Child = Command::new("dd")
        .args(["if=/dev/zero", "bs=4096", "count=1", "conv=fsync", "status=none"])
        .arg(format!("of={}", path.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn dd");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        if Instant::now() > deadline {
            // Reaped by the OS once the thaw lets it finish; killing it now would not help
            // (a writer waiting on a frozen filesystem sleeps uninterruptibly).
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Any pool: foreign mounts, symlinks, foreign paths, one staging path

mod any_pool {
    use super::*;

    /// Issue 8 item 1: NodeUnpublishVolume of a volume that does not exist, at a path where
    /// someone else's tmpfs is mounted: OK, and the tmpfs stays mounted with its file.
    #[tokio::test]
    async fn unpublish_of_an_unknown_volume_leaves_a_foreign_mount_alone() {
        let d = Driver::start().await;
        let target = d.target_path("foreign-unpublish");
        let foreign = ForeignMount::tmpfs(&target);
        let req = NodeUnpublishVolumeRequest { volume_id: unknown_volume_id(&d), target_path: path_str(&target) };
        let r = d.node().node_unpublish_volume(req).await;
        // What happened to the foreign mount first, then the answer.
        foreign.assert_untouched("NodeUnpublishVolume of an unknown volume");
        ok(r, "NodeUnpublishVolume of an unknown volume at a foreign mount");
    }

    /// Item 1: the same with a real, published volume whose target is elsewhere: OK, the
    /// foreign mount is untouched and the volume's own target stays published.
    #[tokio::test]
    async fn unpublish_of_a_real_volume_leaves_a_foreign_mount_alone() {
        let d = Driver::start().await;
        let m = d.mounted_volume("real-unpublish", Mode::SingleNodeWriter).await;
        let path = d.target_path("foreign-unpublish-real");
        let foreign = ForeignMount::tmpfs(&path);
        let req = NodeUnpublishVolumeRequest { volume_id: m.volume.volume_id.clone(), target_path: path_str(&path) };
        let r = d.node().node_unpublish_volume(req).await;
        // What happened to the foreign mount first, then the answer.
        foreign.assert_untouched("NodeUnpublishVolume of a real volume at a foreign path");
        ok(r, "NodeUnpublishVolume of a real volume at a foreign mount");
        assert!(is_mount_point(&m.target), "the volume's own target was unmounted by an unpublish of another path");
        d.tear_down(&m).await;
    }

    /// Item 1: NodeUnstageVolume of a volume that does not exist at a foreign mount: OK,
    /// untouched.
    #[tokio::test]
    async fn unstage_of_an_unknown_volume_leaves_a_foreign_mount_alone() {
        let d = Driver::start().await;
        let staging = d.dir.join("staging").join("foreign-unstage");
        let foreign = ForeignMount::tmpfs(&staging);
        let req = NodeUnstageVolumeRequest { volume_id: unknown_volume_id(&d), staging_target_path: path_str(&staging) };
        let r = d.node().node_unstage_volume(req).await;
        // What happened to the foreign mount first, then the answer.
        foreign.assert_untouched("NodeUnstageVolume of an unknown volume");
        ok(r, "NodeUnstageVolume of an unknown volume at a foreign mount");
    }

    /// Item 1: NodeUnstageVolume of a real volume staged elsewhere, at a foreign mount: OK,
    /// the foreign mount is untouched and the volume stays staged where it is.
    #[tokio::test]
    async fn unstage_of_a_real_volume_leaves_a_foreign_mount_alone() {
        let d = Driver::start().await;
        let cap = d.mount_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("real-unstage"), d.fs_volume_size(), cap.clone()).await;
        let staging = d.staging_dir("real-unstage");
        d.stage(&v.volume_id, &staging, &cap).await;
        let path = d.dir.join("staging").join("foreign-unstage-real");
        let foreign = ForeignMount::tmpfs(&path);
        let req = NodeUnstageVolumeRequest { volume_id: v.volume_id.clone(), staging_target_path: path_str(&path) };
        let r = d.node().node_unstage_volume(req).await;
        // What happened to the foreign mount first, then the answer.
        foreign.assert_untouched("NodeUnstageVolume of a real volume at a foreign path");
        ok(r, "NodeUnstageVolume of a real volume at a foreign mount");
        assert!(is_mount_point(&staging), "the volume's own staging mount was unmounted by an unstage of another path");
        d.unstage(&v.volume_id, &staging).await;
        d.delete(&v.volume_id).await;
    }

    /// Item 2: a target path that is a symlink to a victim directory, or that has a symlink
    /// in a parent component, or that goes through /proc/self/root: refused, nothing mounted.
    #[tokio::test]
    async fn publish_through_a_symlink_or_proc_is_refused() {
        let d = Driver::start().await;
        let cap = d.mount_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("symlink-publish"), d.fs_volume_size(), cap.clone()).await;
        let id = v.volume_id.clone();
        let staging = d.staging_dir("symlink-publish");
        d.stage(&id, &staging, &cap).await;
        let refused = [Code::InvalidArgument, Code::FailedPrecondition];

        // The target itself is a link to the victim.
        let victim = Victim::new(&d.dir.join("victim-a"));
        let target = d.target_path("symlink-leaf");
        symlink(&victim.dir, &target).expect("make the symlink");
        let before = mounts_under(&d.dir);
        let r = d.node().node_publish_volume(d.publish_request(&id, &staging, &target, &cap, false)).await;
        expect_one_of(r, &refused, "NodePublishVolume at a symlink to a victim dir");
        victim.assert_untouched("NodePublishVolume at a symlink");
        assert!(std::fs::symlink_metadata(&target).map(|m| m.file_type().is_symlink()).unwrap_or(false), "the symlink was replaced");
        assert_eq!(mounts_under(&d.dir), before, "NodePublishVolume at a symlink mounted something");

        // A parent component is a link: <pods>/link → <victim root>, target <pods>/link/mount.
        let victim_root = d.dir.join("victim-b");
        let victim = Victim::new(&victim_root.join("mount"));
        let link = d.dir.join("pods").join("symlink-parent");
        std::fs::create_dir_all(link.parent().expect("parent")).expect("create pods dir");
        symlink(&victim_root, &link).expect("make the symlink");
        let target = link.join("mount");
        let r = d.node().node_publish_volume(d.publish_request(&id, &staging, &target, &cap, false)).await;
        expect_one_of(r, &refused, "NodePublishVolume below a symlinked parent");
        victim.assert_untouched("NodePublishVolume below a symlinked parent");
        assert_eq!(mounts_under(&d.dir), before, "NodePublishVolume below a symlinked parent mounted something");

        // /proc/self/root/… names the same place by a magic link.
        let real = d.target_path("proc-root");
        let via_proc = PathBuf::from(format!("/proc/self/root{}", path_str(&real)));
        let r = d.node().node_publish_volume(d.publish_request(&id, &staging, &via_proc, &cap, false)).await;
        expect_one_of(r, &refused, "NodePublishVolume at /proc/self/root/…");
        assert!(!is_mount_point(&real), "NodePublishVolume through /proc/self/root mounted the volume at {}", real.display());
        assert_eq!(mounts_under(&d.dir), before, "NodePublishVolume through /proc/self/root mounted something");

        d.unstage(&id, &staging).await;
        d.delete(&id).await;
    }

    /// Item 2: a staging path that is a symlink to a victim, or under /proc/self/root:
    /// refused, nothing mounted there.
    #[tokio::test]
    async fn stage_through_a_symlink_or_proc_is_refused() {
        let d = Driver::start().await;
        let cap = d.mount_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("symlink-stage"), d.fs_volume_size(), cap.clone()).await;
        let id = v.volume_id.clone();
        let refused = [Code::InvalidArgument, Code::FailedPrecondition];
        let victim = Victim::new(&d.dir.join("victim-stage"));
        let link = d.dir.join("staging").join("symlink-stage");
        std::fs::create_dir_all(link.parent().expect("parent")).expect("create staging dir");
        symlink(&victim.dir, &link).expect("make the symlink");
        let before = mounts_under(&d.dir);
        let r = d.node().node_stage_volume(d.stage_request(&id, &link, &cap)).await;
        expect_one_of(r, &refused, "NodeStageVolume at a symlink to a victim dir");
        victim.assert_untouched("NodeStageVolume at a symlink");
        assert_eq!(mounts_under(&d.dir), before, "NodeStageVolume at a symlink mounted something");

        let real = d.staging_dir("proc-stage");
        let via_proc = PathBuf::from(format!("/proc/self/root{}", path_str(&real)));
        let r = d.node().node_stage_volume(d.stage_request(&id, &via_proc, &cap)).await;
        expect_one_of(r, &refused, "NodeStageVolume at /proc/self/root/…");
        assert!(!is_mount_point(&real), "NodeStageVolume through /proc/self/root mounted the volume at {}", real.display());
        assert_eq!(mounts_under(&d.dir), before, "NodeStageVolume through /proc/self/root mounted something");
        d.delete(&id).await;
    }

    /// Item 2: a raw block publish whose target is a symlink to a victim file: refused, the
    /// file keeps its content and nothing is bound over it.
    #[tokio::test]
    async fn block_publish_through_a_symlink_to_a_file_is_refused() {
        // Not for nfs pools, which serve no raw block volumes: their suite skips it by name.
        let d = Driver::start().await;
        let cap = block_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("symlink-block"), 16 * MIB, cap.clone()).await;
        let id = v.volume_id.clone();
        let staging = d.staging_dir("symlink-block");
        d.stage(&id, &staging, &cap).await;
        let victim_file = d.dir.join("victim-file");
        let content = format!("a file that is not a device {}\n", unique("b")).into_bytes();
        write_durably(&victim_file, &content);
        let target = d.target_path("symlink-block");
        symlink(&victim_file, &target).expect("make the symlink");
        let before = mounts_under(&d.dir);
        let r = d.node().node_publish_volume(d.publish_request(&id, &staging, &target, &cap, false)).await;
        expect_one_of(r, &[Code::InvalidArgument, Code::FailedPrecondition], "block NodePublishVolume at a symlink to a file");
        assert!(!is_mount_point(&victim_file), "the volume's device was bound over the victim file");
        let meta = std::fs::metadata(&victim_file).expect("stat victim file");
        assert!(meta.file_type().is_file(), "the victim is no longer a regular file: {:?}", meta.file_type());
        assert_eq!(std::fs::read(&victim_file).expect("read victim file"), content, "the victim file changed");
        assert_eq!(mounts_under(&d.dir), before, "block NodePublishVolume at a symlink mounted something");
        d.unstage(&id, &staging).await;
        d.delete(&id).await;
    }

    /// Item 1: NodeExpandVolume whose volume_path is a foreign XFS mount (with room to grow):
    /// NOT_FOUND, and the foreign filesystem keeps its size.
    #[tokio::test]
    async fn expand_at_a_foreign_xfs_mount_is_not_found_and_grows_nothing() {
        let d = Driver::start().await;
        let m = d.mounted_volume("foreign-expand", Mode::SingleNodeWriter).await;
        let id = m.volume.volume_id.clone();
        let grown = expand_controller(&d, &id, m.volume.capacity_bytes + 64 * MIB, &m.cap).await;

        // A 640 MiB image holding a 320 MiB XFS: xfs_growfs would double it.
        let image = d.dir.join("foreign-xfs.img");
        std::fs::File::create(&image).and_then(|f| f.set_len(640 << 20)).expect("create xfs image");
        assert!(run("mkfs.xfs", &["-q", "-d", "size=320m", &path_str(&image)]), "mkfs.xfs");
        let lo = Loop::attach(&image);
        let point = d.dir.join("foreign-xfs");
        let mount = MountGuard::mount(&lo.dev, &point, &["-t", "xfs"]);
        let file = point.join("precious.txt");
        write_durably(&file, b"foreign xfs data\n");
        let size = fs_total_bytes(&point);
        let info = xfs_data_blocks(&point);

        for (what, staging) in [("no staging path", String::new()), ("the volume's staging path", path_str(&m.staging))] {
            let r = d.node().node_expand_volume(expand_request(&id, &point, &staging, grown, &m.cap)).await;
            expect_code(r, Code::NotFound, &format!("NodeExpandVolume at a foreign XFS mount ({what})"));
            assert_eq!(fs_total_bytes(&point), size, "the foreign XFS was grown ({what})");
            assert_eq!(xfs_data_blocks(&point), info, "xfs_info: the foreign XFS was grown ({what})");
        }
        let r = d.node().node_expand_volume(expand_request(&unknown_volume_id(&d), &point, "", grown, &m.cap)).await;
        expect_code(r, Code::NotFound, "NodeExpandVolume of an unknown volume at a foreign XFS mount");
        assert_eq!(fs_total_bytes(&point), size, "the foreign XFS was grown (unknown volume)");
        assert_eq!(std::fs::read(&file).expect("read foreign file"), b"foreign xfs data\n");
        drop(mount);
        drop(lo);
        d.tear_down(&m).await;
    }

    /// The data block count `xfs_info` reports.
    fn xfs_data_blocks(point: &Path) -> String {
        let out = Command::new("xfs_info").arg(point).output().expect("run xfs_info");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let data = text.lines().find(|l| l.trim_start().starts_with("data")).unwrap_or_else(|| panic!("xfs_info: {text}"));
        data.split_whitespace().find_map(|w| w.strip_prefix("blocks=")).unwrap_or("?").trim_end_matches(',').to_owned()
    }

    /// Item 1: NodePublishVolume with someone else's mount as staging_target_path: NOT_FOUND
    /// or FAILED_PRECONDITION, and nothing of it appears at the target; with the volume staged
    /// elsewhere and with it not staged at all.
    #[tokio::test]
    async fn publish_from_a_foreign_staging_mount_exposes_nothing() {
        let d = Driver::start().await;
        let cap = d.mount_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("foreign-staging"), d.fs_volume_size(), cap.clone()).await;
        let id = v.volume_id.clone();
        let foreign = ForeignMount::tmpfs(&d.dir.join("staging").join("foreign-staging"));
        let want = [Code::NotFound, Code::FailedPrecondition];

        let target = d.target_path("foreign-staging-unstaged");
        let r = d.node().node_publish_volume(d.publish_request(&id, &foreign.path, &target, &cap, false)).await;
        expect_one_of(r, &want, "NodePublishVolume from a foreign staging mount (volume not staged)");
        assert!(!is_mount_point(&target), "the foreign mount was exposed at the target (volume not staged)");
        assert!(!target.join("precious.txt").exists(), "the foreign file is visible at the target");

        let staging = d.staging_dir("foreign-staging-own");
        d.stage(&id, &staging, &cap).await;
        let target = d.target_path("foreign-staging-staged");
        let r = d.node().node_publish_volume(d.publish_request(&id, &foreign.path, &target, &cap, false)).await;
        expect_one_of(r, &want, "NodePublishVolume from a foreign staging mount (volume staged elsewhere)");
        assert!(!is_mount_point(&target), "the foreign mount was exposed at the target (volume staged elsewhere)");
        assert!(!target.join("precious.txt").exists(), "the foreign file is visible at the target");
        foreign.assert_untouched("NodePublishVolume from a foreign staging mount");
        d.unstage(&id, &staging).await;
        d.delete(&id).await;
    }

    /// Item 1: NodeGetVolumeStats(volume_path="/") and at a foreign mount: NOT_FOUND, never
    /// the host root reported as a healthy volume.
    #[tokio::test]
    async fn stats_of_root_or_a_foreign_mount_is_not_found() {
        let d = Driver::start().await;
        let m = d.mounted_volume("stats-root", Mode::SingleNodeWriter).await;
        let id = m.volume.volume_id.clone();
        let foreign = ForeignMount::tmpfs(&d.dir.join("foreign-stats"));
        for (what, path) in [("/", PathBuf::from("/")), ("a foreign tmpfs", foreign.path.clone())] {
            for staging in [String::new(), path_str(&m.staging)] {
                let req =
                    NodeGetVolumeStatsRequest { volume_id: id.clone(), volume_path: path_str(&path), staging_target_path: staging.clone() };
                let r = d.node().node_get_volume_stats(req).await;
                expect_code(r, Code::NotFound, &format!("NodeGetVolumeStats at {what} (staging {staging:?})"));
            }
        }
        let req =
            NodeGetVolumeStatsRequest { volume_id: unknown_volume_id(&d), volume_path: "/".into(), staging_target_path: String::new() };
        expect_code(d.node().node_get_volume_stats(req).await, Code::NotFound, "NodeGetVolumeStats of an unknown volume at /");
        foreign.assert_untouched("NodeGetVolumeStats at a foreign mount");
        d.tear_down(&m).await;
    }

    /// Item 1: a single-node volume staged at `<a>/b`, then at `<a>/./b`, `<a>//b` (the same
    /// path once normalised: OK, or FAILED_PRECONDITION) and at another path
    /// (FAILED_PRECONDITION naming the first): one mount of the volume in the end.
    #[tokio::test]
    async fn a_single_node_volume_is_staged_at_one_path() {
        let d = Driver::start().await;
        let cap = d.mount_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("one-staging"), d.fs_volume_size(), cap.clone()).await;
        let id = v.volume_id.clone();
        let first = d.staging_dir("one/b");
        d.stage(&id, &first, &cap).await;
        let identity = mount_identity(&first).expect("the staging path is mounted");
        let a = path_str(first.parent().expect("parent"));
        for spelled in [format!("{a}/./b"), format!("{a}//b"), format!("{a}/b/")] {
            let mut req = d.stage_request(&id, &first, &cap);
            req.staging_target_path = spelled.clone();
            let r = d.node().node_stage_volume(req).await;
            match r {
                Ok(_) => {}
                Err(s) if s.code() == Code::FailedPrecondition => {}
                Err(s) => panic!(
                    "NodeStageVolume at {spelled:?}: expected OK (same path) or FAILED_PRECONDITION, got {:?}: {}",
                    s.code(),
                    s.message()
                ),
            }
        }
        let other = d.staging_dir("one-other");
        let r = d.node().node_stage_volume(d.stage_request(&id, &other, &cap)).await;
        let s = expect_code(r, Code::FailedPrecondition, "NodeStageVolume of a staged single-node volume at a second path");
        assert!(s.message().contains(&path_str(&first)), "FAILED_PRECONDITION does not name the first staging path: {}", s.message());
        assert!(!is_mount_point(&other), "the volume was mounted at the second staging path");
        let all = mounts_of(&identity);
        assert_eq!(all.len(), 1, "the volume is mounted {} times: {all:?}", all.len());
        d.unstage(&id, &first).await;
        assert!(mounts_of(&identity).is_empty(), "mounts of the volume left after unstage: {:?}", mounts_of(&identity));
        d.delete(&id).await;
    }

    /// Item 1: what a volume has staged is still known after a kill -9 and restart (the stage
    /// record): an unstage at a foreign mount is a no-op, stats of "/" are NOT_FOUND, a second
    /// staging path is FAILED_PRECONDITION, and the real unstage unmounts the volume.
    #[tokio::test]
    async fn stage_records_survive_a_restart() {
        let outer = Outer::new();
        let opts = StartOptions { state_dir: Some(outer.path().join("state")), ..Default::default() };
        let mut first = Setup::new().start_with(opts.clone()).await;
        let cap = first.mount_cap(Mode::SingleNodeWriter);
        let v = first.create(&unique("restart"), first.fs_volume_size(), cap.clone()).await;
        let id = v.volume_id.clone();
        let staging = outer.path().join("staging");
        std::fs::create_dir_all(&staging).expect("create staging dir");
        first.stage(&id, &staging, &cap).await;
        write_durably(&staging.join("kept"), b"staged before the restart\n");
        first.kill9();
        let pool = first.pool.clone();
        let second = Setup::with_config(&pool.config, &pool.name, &pool.kind).start_with(opts).await;
        second.adopt_leftovers_of(std::slice::from_ref(&id), &[(id.clone(), staging.clone())]);
        let foreign = ForeignMount::tmpfs(&outer.path().join("foreign"));

        let req = NodeUnstageVolumeRequest { volume_id: id.clone(), staging_target_path: path_str(&foreign.path) };
        let r = second.node().node_unstage_volume(req).await;
        foreign.assert_untouched("NodeUnstageVolume at a foreign mount after a restart");
        ok(r, "NodeUnstageVolume at a foreign mount after a restart");
        assert!(is_mount_point(&staging), "the volume's staging mount is gone after an unstage of another path");
        let req = NodeGetVolumeStatsRequest { volume_id: id.clone(), volume_path: "/".into(), staging_target_path: String::new() };
        expect_code(second.node().node_get_volume_stats(req).await, Code::NotFound, "NodeGetVolumeStats at / after a restart");
        let other = outer.path().join("other");
        std::fs::create_dir_all(&other).expect("create dir");
        let r = second.node().node_stage_volume(second.stage_request(&id, &other, &cap)).await;
        expect_code(r, Code::FailedPrecondition, "NodeStageVolume at a second path after a restart");
        assert!(!is_mount_point(&other), "staged at a second path after a restart");
        let stats = second.stats(&id, &staging, &staging).await;
        assert!(!stats.volume_condition.expect("no volume_condition").abnormal, "the staged volume reports abnormal after a restart");
        second.unstage(&id, &staging).await;
        assert!(!is_mount_point(&staging), "NodeUnstageVolume after a restart left the volume mounted");
        second.delete(&id).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Host only: file pools of the test's own

mod host {
    use super::*;

    /// Item 5: a NodeStage that fails because the device holds something else (a swap
    /// signature) answers FAILED_PRECONDITION, formats nothing, leaves no loop device, and the
    /// volume can be deleted right away.
    #[tokio::test]
    async fn failed_stage_leaves_no_loop_device() {
        let outer = Outer::new();
        let d = file_driver(&outer, "").await;
        let cap = ext4_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("failed-stage"), 64 * MIB, cap.clone()).await;
        let image = file_image(&outer.path().join("pool"), &v.volume_id);
        assert!(image.exists(), "no image at {}", image.display());
        assert!(run("mkswap", &["-f", &path_str(&image)]), "mkswap on the image");
        let staging = d.staging_dir("failed-stage");
        let r = d.node().node_stage_volume(d.stage_request(&v.volume_id, &staging, &cap)).await;
        expect_code(r, Code::FailedPrecondition, "NodeStageVolume of a device holding a swap signature");
        assert!(!is_mount_point(&staging), "the staging path is mounted after a failed stage");
        assert_eq!(loops_of(&image), "", "a loop device is still attached after the failed stage");
        let out = Command::new("blkid").args(["-p", "-o", "value", "-s", "TYPE"]).arg(&image).output().expect("blkid");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "swap", "the device was reformatted");
        d.delete(&v.volume_id).await;
    }

    /// Item 5: NodeExpandVolume on a volume that is not staged (OK or NOT_FOUND) leaves no loop
    /// device, and DeleteVolume then succeeds without an unstage.
    #[tokio::test]
    async fn expanding_an_unstaged_volume_leaves_no_loop_device() {
        let outer = Outer::new();
        let d = file_driver(&outer, "").await;
        let cap = ext4_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("expand-unstaged"), 64 * MIB, cap.clone()).await;
        let id = v.volume_id.clone();
        let staging = d.staging_dir("expand-unstaged");
        d.stage(&id, &staging, &cap).await;
        d.unstage(&id, &staging).await;
        let grown = expand_controller(&d, &id, 128 * MIB, &cap).await;
        let image = file_image(&outer.path().join("pool"), &id);
        let r = d.node().node_expand_volume(expand_request(&id, &staging, &path_str(&staging), grown, &cap)).await;
        match r {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => panic!("NodeExpandVolume of an unstaged volume: expected OK or NOT_FOUND, got {:?}: {}", s.code(), s.message()),
        }
        assert!(!is_mount_point(&staging), "NodeExpandVolume mounted the unstaged volume");
        assert_eq!(loops_of(&image), "", "a loop device is left attached by NodeExpandVolume of an unstaged volume");
        d.delete(&id).await;
    }

    /// Starts the binary on `config` and expects it to refuse within 20 s; its output.
    fn refused_start(config: &Path, dir: &Path) -> String {
        let log = dir.join("start.log");
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("dup log");
        let endpoint = format!("unix://{}", dir.join("csi.sock").display());
        let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .arg("all-in-one")
            .args(["--endpoint", &endpoint, "--node-id", NODE_ID, "--log-format", "text"])
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn holdfast");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break s;
            }
            // Listening (or still running after the deadline) means it accepted the config.
            if dir.join("csi.sock").exists() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("holdfast started with overlapping pools; its log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!status.success(), "holdfast exited 0 with overlapping pools; log:\n{text}");
        text
    }

    /// Item 6: two pools whose paths are equal (also spelled differently, or aliased through a
    /// symlink) or nested: a start-up error naming both.
    #[test]
    fn overlapping_file_pools_refuse_to_start() {
        let outer = Outer::new();
        let base = outer.path().join("pools");
        std::fs::create_dir_all(base.join("shared").join("inner")).expect("create pool dirs");
        symlink(base.join("shared"), base.join("alias")).expect("make alias");
        let shared = path_str(&base.join("shared"));
        let cases = [
            ("the same directory", shared.clone(), shared.clone()),
            ("the same directory spelled differently", shared.clone(), format!("{shared}/")),
            ("the same directory spelled with //", shared.clone(), shared.replace("/shared", "//shared")),
            ("a directory and its alias through a symlink", shared.clone(), path_str(&base.join("alias"))),
            ("a directory and one inside it", shared.clone(), format!("{shared}/inner")),
            ("a directory inside another, listed first", format!("{shared}/inner"), shared.clone()),
        ];
        let mut wrong = Vec::new();
        for (i, (what, a, b)) in cases.iter().enumerate() {
            let dir = outer.path().join(format!("case-{i}"));
            std::fs::create_dir_all(&dir).expect("create case dir");
            let cfg = dir.join("holdfast.toml");
            let text = format!(
                "[[pool]]\nname = \"alpha-pool\"\nkind = \"file\"\npath = \"{a}\"\n\n[[pool]]\nname = \"beta-pool\"\nkind = \"file\"\npath = \"{b}\"\n"
            );
            std::fs::write(&cfg, text).expect("write config");
            let log = std::panic::catch_unwind(|| refused_start(&cfg, &dir));
            match log {
                Err(_) => wrong.push(format!("{what}: the driver started or exited 0")),
                Ok(text) if !(text.contains("alpha-pool") && text.contains("beta-pool")) => {
                    wrong.push(format!("{what}: the refusal does not name both pools: {}", text.trim()))
                }
                Ok(_) => {}
            }
        }
        assert!(wrong.is_empty(), "overlapping pools:\n  {}", wrong.join("\n  "));
    }

    /// Item 8: a 10 KB volume id answers NOT_FOUND with a message under 1 KiB (one clients
    /// accept as metadata), from every call that looks a volume up.
    #[tokio::test]
    async fn a_10kb_volume_id_is_not_found_with_a_short_message() {
        let outer = Outer::new();
        let d = file_driver(&outer, "").await;
        let cap = ext4_cap(Mode::SingleNodeWriter);
        let ids = [format!("file:{NODE_ID}:conformance:{}", "a".repeat(10 * 1024)), "x".repeat(10 * 1024)];
        let target = d.target_path("long-id");
        let staging = d.staging_dir("long-id");
        let mut wrong = Vec::new();
        for id in &ids {
            let calls: Vec<(&str, Result<(), tonic::Status>)> = vec![
                (
                    "ControllerGetVolume",
                    d.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() }).await.map(drop),
                ),
                (
                    "ControllerExpandVolume",
                    d.controller()
                        .controller_expand_volume(ControllerExpandVolumeRequest {
                            volume_id: id.clone(),
                            capacity_range: Some(CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
                            volume_capability: Some(cap.clone()),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                ),
                (
                    "CreateSnapshot",
                    d.controller()
                        .create_snapshot(CreateSnapshotRequest {
                            name: unique("long-id"),
                            source_volume_id: id.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                ),
                ("NodeStageVolume", d.node().node_stage_volume(d.stage_request(id, &staging, &cap)).await.map(drop)),
                (
                    "NodeGetVolumeStats",
                    d.node()
                        .node_get_volume_stats(NodeGetVolumeStatsRequest {
                            volume_id: id.clone(),
                            volume_path: path_str(&target),
                            staging_target_path: String::new(),
                        })
                        .await
                        .map(drop),
                ),
                ("NodeExpandVolume", d.node().node_expand_volume(expand_request(id, &staging, "", 128 * MIB, &cap)).await.map(drop)),
            ];
            for (name, r) in calls {
                match r {
                    Err(s) if s.code() == Code::NotFound && s.message().len() < 1024 => {}
                    Err(s) => wrong.push(format!("{name} ({} byte id): {:?}, {} byte message", id.len(), s.code(), s.message().len())),
                    Ok(()) => wrong.push(format!("{name} ({} byte id): OK", id.len())),
                }
            }
        }
        assert!(wrong.is_empty(), "expected NOT_FOUND with a message under 1 KiB:\n  {}", wrong.join("\n  "));
    }

    /// The calls the log tests send a hostile id to.
    async fn send_hostile_id(d: &Driver, id: &str) -> Vec<tonic::Status> {
        let staging = d.staging_dir("hostile-id");
        let mut errs = Vec::new();
        let r = d.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: id.to_owned() }).await;
        errs.extend(r.err());
        let req = NodeUnstageVolumeRequest { volume_id: id.to_owned(), staging_target_path: path_str(&staging) };
        errs.extend(d.node().node_unstage_volume(req).await.err());
        let req =
            NodeGetVolumeStatsRequest { volume_id: id.to_owned(), volume_path: path_str(&staging), staging_target_path: String::new() };
        errs.extend(d.node().node_get_volume_stats(req).await.err());
        errs
    }

    /// Item 8: a volume id carrying a newline and a fake log line is escaped in the text log
    /// (the id is logged, but no line of the log starts with the forged text), and no answer
    /// carries a raw control character.
    #[tokio::test]
    async fn a_newline_in_a_volume_id_cannot_forge_a_text_log_line() {
        let outer = Outer::new();
        let d = file_driver(&outer, "").await;
        let marker = unique("forged");
        let forged = format!("1999-01-01T00:00:00.000000Z ERROR holdfast: {marker} all volumes deleted");
        let id = format!("file:{NODE_ID}:conformance:x\n{forged}\r\x1b[2K");
        let mut wrong = Vec::new();
        for s in send_hostile_id(&d, &id).await {
            if s.message().contains(['\n', '\r', '\x1b']) {
                wrong.push(format!("an answer carries a raw control character: {:?}", s.message()));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = d.log_text();
        if !log.contains(&marker) {
            wrong.push(format!("the driver did not log the calls' volume id at all; log:\n{log}"));
        }
        for line in log.lines() {
            if line.starts_with("1999-01-01") {
                wrong.push(format!("a request forged a log line: {line:?}"));
            }
            if line.contains(['\x1b', '\r']) {
                wrong.push(format!("a raw control character from a request is in the log: {line:?}"));
            }
        }
        assert!(wrong.is_empty(), "a hostile volume id:\n  {}", wrong.join("\n  "));
    }

    /// Item 8: the same with JSON logs: every line is one valid JSON object.
    #[tokio::test]
    async fn a_newline_in_a_volume_id_keeps_json_logs_valid() {
        let outer = Outer::new();
        let cfg = outer.file_config(&outer.path().join("pool"), "");
        let opts = StartOptions { log_format: Some("json".into()), ..Default::default() };
        let d = Setup::with_config(&cfg, "conformance", "file").start_with(opts).await;
        let marker = unique("forged");
        let id = format!("file:{NODE_ID}:conformance:x\n{{\"level\":\"ERROR\",\"message\":\"{marker}\"}}\n\"");
        send_hostile_id(&d, &id).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = d.log_text();
        assert!(log.contains(&marker), "the driver did not log the calls' volume id at all; log:\n{log}");
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line:?}"));
            assert!(v.is_object(), "a log line is not a JSON object: {line:?}");
            assert_ne!(v.get("message").and_then(|m| m.as_str()), Some(marker.as_str()), "a request forged a JSON log record: {line}");
        }
    }

    /// Bullet list: the socket's parent directory, created by the driver under umask 000, is
    /// not world-writable (nor is the socket wider than 0660).
    #[tokio::test]
    async fn socket_directory_is_not_world_writable_under_umask_000() {
        let mut setup = Setup::new();
        let parent = setup.dir().join("run").join("holdfast");
        setup.socket = parent.join("csi.sock");
        let d = setup.start_with(StartOptions { umask: Some(0), ..Default::default() }).await;
        for dir in [parent.clone(), parent.parent().expect("parent").to_path_buf()] {
            let mode = std::fs::metadata(&dir).expect("stat socket dir").permissions().mode() & 0o7777;
            assert_eq!(mode & 0o002, 0, "{} was created world-writable ({mode:o})", dir.display());
        }
        let mode = std::fs::metadata(&d.socket).expect("stat socket").permissions().mode() & 0o777;
        assert_eq!(mode & !0o660, 0, "socket mode {mode:o} is wider than 0660 under umask 000");
    }

    /// Item 9: a grpc-python client with default options (it sends its own `:authority` for a
    /// unix socket) gets answers, for both spellings of a unix target.
    #[tokio::test]
    async fn a_python_grpcio_client_with_default_options_is_answered() {
        let d = Driver::start().await;
        let script = r#"
import sys, grpc
for target in ("unix:" + sys.argv[1], "unix://" + sys.argv[1]):
    ch = grpc.insecure_channel(target)
    info = ch.unary_unary("/csi.v1.Identity/GetPluginInfo")(b"", timeout=10)
    assert b"csi.holdfast.dev" in info, info
    ch.unary_unary("/csi.v1.Identity/Probe")(b"", timeout=10)
    node = ch.unary_unary("/csi.v1.Node/NodeGetInfo")(b"", timeout=10)
    assert sys.argv[2].encode() in node, node
    ch.close()
print("ok")
"#;
        let out = Command::new("python3").arg("-c").arg(script).arg(path_str(&d.socket)).arg(NODE_ID).output().expect("run python3");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
            "the python grpcio client failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Item 2: with `allowed_path_prefixes`, staging and target paths outside them are
    /// INVALID_ARGUMENT (nothing mounted), and a prefix that is itself a symlink works.
    #[tokio::test]
    async fn paths_outside_the_allowed_prefixes_are_invalid() {
        let outer = Outer::new();
        let real = outer.path().join("real-kubelet");
        std::fs::create_dir_all(real.join("plugins")).expect("create prefix dir");
        std::fs::create_dir_all(real.join("pods")).expect("create prefix dir");
        let prefix = outer.path().join("kubelet");
        symlink(&real, &prefix).expect("symlink the prefix");
        let extra = format!("allowed_path_prefixes = [\"{}\"]\n\n", prefix.display());
        let d = file_driver(&outer, &extra).await;
        let cap = ext4_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("prefixes"), 64 * MIB, cap.clone()).await;
        let id = v.volume_id.clone();

        let outside = outer.path().join("elsewhere").join("staging");
        std::fs::create_dir_all(&outside).expect("create dir");
        let r = d.node().node_stage_volume(d.stage_request(&id, &outside, &cap)).await;
        expect_code(r, Code::InvalidArgument, "NodeStageVolume outside the allowed prefixes");
        assert!(!is_mount_point(&outside), "staged outside the allowed prefixes");

        let staging = prefix.join("plugins").join("staging");
        std::fs::create_dir_all(&staging).expect("create staging dir");
        d.stage(&id, &staging, &cap).await;
        assert!(is_mount_point(&real.join("plugins").join("staging")), "not staged under the (symlinked) prefix");
        let target = outer.path().join("elsewhere").join("target");
        let r = d.node().node_publish_volume(d.publish_request(&id, &staging, &target, &cap, false)).await;
        expect_code(r, Code::InvalidArgument, "NodePublishVolume outside the allowed prefixes");
        assert!(!is_mount_point(&target), "published outside the allowed prefixes");
        let target = prefix.join("pods").join("mount");
        d.publish(&id, &staging, &target, &cap, false).await;
        assert!(is_mount_point(&real.join("pods").join("mount")), "not published under the (symlinked) prefix");
        d.unpublish(&id, &target).await;
        d.unstage(&id, &staging).await;
        d.delete(&id).await;
    }

    /// Item 7: a thick (default) volume is fully allocated, and its full-size write succeeds
    /// while another process fills the pool's filesystem; trimming inside the volume does not
    /// give its blocks back to the pool.
    #[tokio::test]
    async fn thick_volume_writes_succeed_while_the_pool_filesystem_fills() {
        let outer = Outer::new();
        let (_lo, _fs, fs_dir) = small_pool_fs(&outer, 192);
        let cfg = outer.file_config(&fs_dir.join("pool"), "");
        let d = Setup::with_config(&cfg, "conformance", "file").start().await;
        let cap = ext4_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("thick"), 64 * MIB, cap.clone()).await;
        let id = v.volume_id.clone();
        let image = file_image(&fs_dir.join("pool"), &id);
        let allocated = |p: &Path| std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
        assert!(
            allocated(&image) >= v.capacity_bytes as u64,
            "a thick volume's image is sparse: {} of {} bytes allocated",
            allocated(&image),
            v.capacity_bytes
        );
        let staging = d.staging_dir("thick");
        let target = d.target_path("thick");
        d.stage(&id, &staging, &cap).await;
        d.publish(&id, &staging, &target, &cap, false).await;

        // Someone else fills the pool's filesystem.
        let filler = fs_dir.join("filler");
        let status = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "status=none"])
            .arg(format!("of={}", filler.display()))
            .stderr(Stdio::null())
            .status()
            .expect("run dd");
        assert!(!status.success(), "dd filled nothing (it should stop at ENOSPC)");

        // The volume's own filesystem, written to its last free block, then read back.
        let free = nix::sys::statvfs::statvfs(&target).map(|s| s.blocks_available() * s.fragment_size()).expect("statvfs");
        let len = free.saturating_sub(1 << 20) as usize;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let path = target.join("full.bin");
        let wrote = std::panic::catch_unwind(|| write_durably(&path, &data));
        assert!(wrote.is_ok(), "a {len} byte write into a thick volume failed once the pool's filesystem was full");
        assert!(run("sh", &["-c", "echo 3 > /proc/sys/vm/drop_caches"]), "drop caches");
        assert!(std::fs::read(&path).map(|r| r == data).unwrap_or(false), "the data read back differs");
        // Trim: the image keeps its blocks (no discard reaches it, or it is re-allocated).
        std::fs::remove_file(&path).expect("remove");
        let _ = Command::new("fstrim").arg(&target).stderr(Stdio::null()).status();
        assert!(
            allocated(&image) >= v.capacity_bytes as u64,
            "trimming inside a thick volume punched holes into its image: {} of {} bytes allocated",
            allocated(&image),
            v.capacity_bytes
        );
        std::fs::remove_file(&filler).expect("remove filler");
        d.unpublish(&id, &target).await;
        d.unstage(&id, &staging).await;
        d.delete(&id).await;
    }

    /// Item 7: a thin volume (`provisioning = thin`) whose pool filesystem is full reports an
    /// abnormal condition.
    #[tokio::test]
    async fn a_thin_volume_on_a_full_pool_filesystem_reports_abnormal() {
        let outer = Outer::new();
        let (_lo, _fs, fs_dir) = small_pool_fs(&outer, 128);
        let cfg = outer.file_config(&fs_dir.join("pool"), "");
        let d = Setup::with_config(&cfg, "conformance", "file").start().await;
        let cap = ext4_cap(Mode::SingleNodeWriter);
        let mut req = d.create_request(&unique("thin"), 64 * MIB, cap.clone());
        req.parameters.insert("provisioning".into(), "thin".into());
        let v = d.create_with(req).await;
        let id = v.volume_id.clone();
        let staging = d.staging_dir("thin");
        let target = d.target_path("thin");
        d.stage(&id, &staging, &cap).await;
        d.publish(&id, &staging, &target, &cap, false).await;
        let healthy = d.stats(&id, &target, &staging).await.volume_condition.expect("no volume_condition");
        assert!(!healthy.abnormal, "abnormal before the pool filled: {}", healthy.message);
        let filler = fs_dir.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "status=none"])
            .arg(format!("of={}", filler.display()))
            .stderr(Stdio::null())
            .status();
        let sick = d.stats(&id, &target, &staging).await.volume_condition.expect("no volume_condition");
        assert!(sick.abnormal, "a thin volume whose pool filesystem is full reports normal: {:?}", sick.message);
        std::fs::remove_file(&filler).expect("remove filler");
        d.unpublish(&id, &target).await;
        d.unstage(&id, &staging).await;
        d.delete(&id).await;
    }

    /// A small ext4 filesystem of the test's own, loop-mounted in `outer`.
    fn small_pool_fs(outer: &Outer, mib: u64) -> (Loop, MountGuard, PathBuf) {
        let image = outer.path().join("poolfs.img");
        std::fs::File::create(&image).and_then(|f| f.set_len(mib << 20)).expect("create pool fs image");
        assert!(run("mkfs.ext4", &["-q", "-F", &path_str(&image)]), "mkfs.ext4");
        let lo = Loop::attach(&image);
        let dir = outer.path().join("poolfs");
        let fs = MountGuard::mount(&lo.dev, &dir, &["-t", "ext4"]);
        (lo, fs, dir)
    }

    /// Item 4: a frozen pool filesystem (a second pool on it, with calls on it hanging) does
    /// not stall Probe, GetPluginInfo or the other pool (each answers within 1 s), and SIGTERM
    /// removes the socket within the grace period even then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frozen_pool_filesystem_stalls_only_its_own_pool() {
        let outer = Outer::new();
        let (_lo, _fs, fs_dir) = small_pool_fs(&outer, 96);
        let frozen_pool = fs_dir.join("pool");
        std::fs::create_dir_all(&frozen_pool).expect("create pool dir");
        let extra = format!("[[pool]]\nname = \"frozen\"\nkind = \"file\"\npath = \"{}\"\n\n", frozen_pool.display());
        // "frozen" first in the file, so the healthy pool is not simply the first one served.
        let cfg = outer.file_config(&outer.path().join("pool"), &extra);
        let mut d = Setup::with_config(&cfg, "conformance", "file").start().await;
        let cap = ext4_cap(Mode::SingleNodeWriter);
        let mut on_frozen = d.create_request(&unique("on-frozen"), 16 * MIB, cap.clone());
        on_frozen.parameters.insert("pool".into(), "frozen".into());
        let victim = d.create_with(on_frozen.clone()).await;

        let freeze = Thaw::freeze(&fs_dir);
        // Calls on the frozen pool that write: creates, deletes, snapshots.
        let mut hung: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        for i in 0..12 {
            let mut c = d.controller();
            let mut req = on_frozen.clone();
            req.name = unique(&format!("stuck-{i}"));
            hung.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(120), c.create_volume(req)).await;
            }));
        }
        for _ in 0..4 {
            let mut c = d.controller();
            let req = DeleteVolumeRequest { volume_id: victim.volume_id.clone(), ..Default::default() };
            hung.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(120), c.delete_volume(req)).await;
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let mut slow = Vec::new();
        for round in 0..3 {
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(5), d.identity().probe(ProbeRequest {})).await;
            check_fast(&mut slow, &format!("Probe #{round}"), t, r.map(|r| r.map(drop)));
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(5), d.identity().get_plugin_info(GetPluginInfoRequest {})).await;
            check_fast(&mut slow, &format!("GetPluginInfo #{round}"), t, r.map(|r| r.map(drop)));
            let t = Instant::now();
            let req = GetCapacityRequest { volume_capabilities: vec![cap.clone()], parameters: d.params(), ..Default::default() };
            let r = tokio::time::timeout(Duration::from_secs(5), d.controller().get_capacity(req)).await;
            check_fast(&mut slow, &format!("GetCapacity of the other pool #{round}"), t, r.map(|r| r.map(drop)));
            let t = Instant::now();
            let req = d.create_request(&unique("healthy"), 16 * MIB, cap.clone());
            let r = tokio::time::timeout(Duration::from_secs(5), d.controller().create_volume(req)).await;
            if let Ok(Ok(resp)) = &r {
                if let Some(v) = &resp.get_ref().volume {
                    d.adopt_leftovers_of(std::slice::from_ref(&v.volume_id), &[]);
                }
            }
            check_fast(&mut slow, &format!("CreateVolume on the other pool #{round}"), t, r.map(|r| r.map(drop)));
        }

        // SIGTERM with the calls still hung: the socket goes within the grace period.
        let pid = d.pid().expect("driver running");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        let grace = holdfast::server::SHUTDOWN_GRACE + Duration::from_secs(2);
        while d.socket.exists() && t.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let socket_left = d.socket.exists();
        drop(freeze);
        let exited = d.terminate(Duration::from_secs(20)).await;
        for h in hung {
            h.abort();
        }
        if socket_left {
            slow.push(format!("SIGTERM: the socket is still there {grace:?} later"));
        }
        if exited.is_none() {
            slow.push("holdfast did not exit after SIGTERM once the pool was thawed".into());
        }
        assert!(slow.is_empty(), "with a pool's filesystem frozen:\n  {}", slow.join("\n  "));
    }

    fn check_fast(slow: &mut Vec<String>, what: &str, started: Instant, r: Result<Result<(), tonic::Status>, tokio::time::error::Elapsed>) {
        let took = started.elapsed();
        match r {
            Err(_) => slow.push(format!("{what}: no answer within 5 s")),
            Ok(Err(s)) => slow.push(format!("{what}: {:?}: {} ({took:?})", s.code(), s.message())),
            Ok(Ok(())) if took > Duration::from_secs(1) => slow.push(format!("{what}: took {took:?}")),
            Ok(Ok(())) => {}
        }
    }

    /// Item 3: kill -9 at one step of CreateSnapshot of a staged volume, then restart on the
    /// same pool and state: the filesystem is not frozen (a write finishes), the volume
    /// reports normal, the retried snapshot succeeds, and unstage still works.
    async fn killed_during_snapshot(step: &str) {
        let outer = Outer::new();
        let bin = outer.path().join("bin");
        let ctl = outer.path().join("ctl");
        std::fs::create_dir_all(&bin).expect("create bin dir");
        std::fs::create_dir_all(&ctl).expect("create ctl dir");
        for tool in ["fsfreeze", "cp"] {
            let real = which(tool);
            let script = format!(
                "#!/bin/sh\n# holdfast hostile test: pauses at a step named in {ctl}/pause until killed\n\
                 step=\"{tool}\"\ncase \"$1\" in --freeze|--unfreeze) step=\"{tool} $1\";; esac\n\
                 pause() {{ if [ -f {ctl}/pause ] && [ \"$(cat {ctl}/pause)\" = \"$1\" ]; then echo $$ > {ctl}/paused.tmp; mv {ctl}/paused.tmp {ctl}/paused; while :; do sleep 1; done; fi; }}\n\
                 pause \"before $step\"\n{real} \"$@\"\nrc=$?\npause \"after $step\"\nexit $rc\n",
                ctl = ctl.display(),
            );
            let path = bin.join(tool);
            std::fs::write(&path, script).expect("write wrapper");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
        }
        let path_env = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let cfg = outer.file_config(&outer.path().join("pool"), "");
        let opts = StartOptions { state_dir: Some(outer.path().join("state")), env: vec![("PATH".into(), path_env)], ..Default::default() };
        let staging = outer.path().join("staging");
        std::fs::create_dir_all(&staging).expect("create staging dir");
        // Declared before the thaw guard, so they are dropped after it (never unmount frozen).
        let mut first: Option<Driver>;
        let second: Option<Driver>;
        let _thaw = Thaw { paths: vec![staging.clone()], paused_pid_file: Some(ctl.join("paused")) };

        first = Some(Setup::with_config(&cfg, "conformance", "file").start_with(opts.clone()).await);
        let d = first.as_ref().expect("driver");
        let cap = ext4_cap(Mode::SingleNodeWriter);
        let v = d.create(&unique("killed-snap"), 64 * MIB, cap.clone()).await;
        let id = v.volume_id.clone();
        d.stage(&id, &staging, &cap).await;
        write_durably(&staging.join("before"), b"written before the snapshot\n");
        std::fs::write(ctl.join("pause"), step).expect("write pause step");
        let name = unique("killed-snap");
        let mut c = d.controller();
        let req = CreateSnapshotRequest { name: name.clone(), source_volume_id: id.clone(), ..Default::default() };
        let call = tokio::spawn(async move { c.create_snapshot(req).await });
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ctl.join("paused").exists() {
            assert!(!call.is_finished(), "CreateSnapshot finished without reaching step {step:?}: {:?}", call.await);
            assert!(Instant::now() < deadline, "CreateSnapshot did not reach step {step:?} within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        first.as_mut().expect("driver").kill9();
        call.abort();
        let paused = std::fs::read_to_string(ctl.join("paused")).unwrap_or_default();
        if let Ok(pid) = paused.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::fs::remove_file(ctl.join("pause")).expect("clear pause step");
        let _ = std::fs::remove_file(ctl.join("paused"));

        second = Some(Setup::with_config(&cfg, "conformance", "file").start_with(opts).await);
        let d = second.as_ref().expect("driver");
        d.adopt_leftovers_of(std::slice::from_ref(&id), &[(id.clone(), staging.clone())]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            write_finishes(&staging.join("after"), Duration::from_secs(10)),
            "killed at {step:?}: the volume's filesystem is still frozen after the restart (a write did not finish in 10 s)"
        );
        let stats = d.stats(&id, &staging, &staging).await;
        let cond = stats.volume_condition.expect("no volume_condition");
        assert!(!cond.abnormal, "killed at {step:?}: the volume reports abnormal after the restart: {}", cond.message);
        let snap = d.snapshot(&name, &id).await;
        assert!(snap.ready_to_use, "killed at {step:?}: the retried snapshot is not ready");
        d.delete_snapshot(&snap.snapshot_id).await;
        d.unstage(&id, &staging).await;
        assert!(!is_mount_point(&staging), "killed at {step:?}: unstage after the restart left the staging path mounted");
        d.delete(&id).await;
        drop(first);
    }

    fn which(tool: &str) -> String {
        let out = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().expect("run sh");
        let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(p.starts_with('/'), "{tool} is not installed");
        p
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_before_the_freeze() {
        killed_during_snapshot("before fsfreeze --freeze").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_right_after_the_freeze() {
        killed_during_snapshot("after fsfreeze --freeze").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_before_the_copy() {
        killed_during_snapshot("before cp").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_after_the_copy_before_the_thaw() {
        killed_during_snapshot("after cp").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_before_the_thaw() {
        killed_during_snapshot("before fsfreeze --unfreeze").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_after_the_thaw() {
        killed_during_snapshot("after fsfreeze --unfreeze").await;
    }
}
