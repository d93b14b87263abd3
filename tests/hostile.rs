//! Hostile and careless callers (issue 8), on any pool: the real `holdfast all-in-one` binary is
//! asked to unmount, grow, expose or report on things that are not its volumes, to follow
//! symlinks to a victim, and to stage one volume at several paths. Every test asserts what an
//! operator would check afterwards: the foreign data is untouched, the call answered the code
//! the issue requires, and nothing the test did not ask for is left mounted.
//!
//! The pool is the one the environment names (`HOLDFAST_TEST_CONFIG`, as tests/conformance.rs;
//! default a fresh `file` pool), so the VM suites run this binary against lvm, zfs and nfs
//! pools. The host-only cases (frozen and full pool filesystems, overlapping pools, kill -9
//! during snapshots, logs, sockets) are in tests/hostile_host.rs.
//!
//! Every mount and loop device a test makes is undone by a guard (tests/common/hostile.rs), so
//! a failing test leaves nothing behind; tests only ever touch paths under their own temp dirs.

mod common;
#[path = "common/hostile.rs"]
mod hostile_guards;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use holdfast::proto::controller_service_capability::rpc::Type as CtrlCap;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::*;
use hostile_guards::*;
use tonic::Code;

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
    let d = Driver::start().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    if d.pool.kind == "nfs" {
        // An nfs pool serves no raw block volume, so there is nothing to bind over the victim:
        // what must hold there is that it refuses to make one.
        let r = d.controller().create_volume(d.create_request(&unique("symlink-block"), 16 * MIB, cap.clone())).await;
        expect_code(r, Code::InvalidArgument, "CreateVolume of a raw block volume on an nfs pool");
        return;
    }
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
    let req = NodeGetVolumeStatsRequest { volume_id: unknown_volume_id(&d), volume_path: "/".into(), staging_target_path: String::new() };
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
    // Only this driver's paths count: on nfs every mount of the export shares one identity,
    // including the pools' own working mounts (/run/holdfast/nfs/<pool>) of other drivers.
    let ours = first.ancestors().nth(3).expect("the driver's temp dir").to_path_buf();
    let of_ours =
        |identity: &(String, String)| mounts_of(identity).into_iter().filter(|m| Path::new(m).starts_with(&ours)).collect::<Vec<_>>();
    let all = of_ours(&identity);
    assert_eq!(all.len(), 1, "the volume is mounted {} times: {all:?}", all.len());
    d.unstage(&id, &first).await;
    assert!(of_ours(&identity).is_empty(), "mounts of the volume left after unstage: {:?}", of_ours(&identity));
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
    let second = Setup::with_own_pool(&pool.config, &pool.name, &pool.kind).start_with(opts).await;
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

/// issue 14: NodePublish trusts a stage record without asking the pool only while the very
/// filesystem that id staged is mounted there. A record left stale (here: saved, then put back
/// after the volume was unstaged, deleted, made again under the same name and staged at the
/// same path by its new id: same path, and often the same device number) must not let the old
/// id publish the new volume: NOT_FOUND, and nothing is mounted at the target.
#[tokio::test]
async fn a_stale_stage_record_never_publishes_the_volume_made_again() {
    let outer = Outer::new();
    let state = outer.path().join("state");
    let opts = StartOptions { state_dir: Some(state.clone()), ..Default::default() };
    let d = Setup::new().start_with(opts).await;
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let name = unique("stale");
    let old = d.create(&name, d.fs_volume_size(), cap.clone()).await.volume_id;
    let staging = outer.path().join("staging");
    std::fs::create_dir_all(&staging).expect("create staging dir");
    d.stage(&old, &staging, &cap).await;
    let records = state.join("stage");
    let saved: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&records)
        .expect("the stage records")
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    assert_eq!(saved.len(), 1, "one volume staged, one record: {saved:?}");
    d.unstage(&old, &staging).await;
    d.delete(&old).await;
    let new = d.create(&name, d.fs_volume_size(), cap.clone()).await.volume_id;
    assert_ne!(old, new, "a volume made again gets a new id");
    d.stage(&new, &staging, &cap).await;
    for (p, bytes) in &saved {
        std::fs::write(p, bytes).unwrap();
    }
    let target = d.target_path("stale");
    let r = d.node().node_publish_volume(d.publish_request(&old, &staging, &target, &cap, false)).await;
    let published = is_mount_point(&target);
    if published {
        assert!(Command::new("umount").arg(&target).status().unwrap().success());
    }
    expect_code(r, Code::NotFound, "NodePublishVolume of the deleted volume's id from a stale record");
    assert!(!published, "the deleted volume's id published the volume made again");
    for (p, _) in &saved {
        std::fs::remove_file(p).unwrap();
    }
    d.unstage(&new, &staging).await;
    d.delete(&new).await;
}

// --- issue 12: hostile inputs for the group snapshot and modify fields ---------------------

/// A refusal's message must stay within the driver's cap (docs: error messages are bounded).
fn assert_bounded(s: &tonic::Status, what: &str) {
    assert!(s.message().len() <= 1024, "{what}: a {}-byte message", s.message().len());
    assert!(!s.message().chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "{what}: raw control characters: {:?}", s.message());
}

/// Every snapshot id of the pool (members of groups included).
async fn all_snapshot_ids(d: &Driver) -> std::collections::BTreeSet<String> {
    d.list_snapshots(ListSnapshotsRequest::default()).await.into_iter().map(|s| s.snapshot_id).collect()
}

/// The snapshots of one volume: in a VM pool shared by tests running at once, the other tests'
/// snapshots come and go in the pool's full listing.
async fn snapshot_ids_of(d: &Driver, volume_id: &str) -> std::collections::BTreeSet<String> {
    let req = ListSnapshotsRequest { source_volume_id: volume_id.to_owned(), ..Default::default() };
    d.list_snapshots(req).await.into_iter().map(|s| s.snapshot_id).collect()
}

/// issue 12 (hostile inputs): CreateVolumeGroupSnapshot with source_volume_ids that are empty,
/// duplicated, a thousand long, of other kinds, pools or nodes, or garbage, and names that are
/// empty, 10 KB long or hold control characters: each answers its precise code with a bounded
/// message, and no snapshot is made (ListSnapshots is unchanged, the volume is intact).
#[tokio::test]
async fn hostile_group_snapshot_requests_make_nothing() {
    let d = Driver::start().await;
    let v = d.create(&unique("hostile-grp"), d.fs_volume_size(), d.mount_cap(Mode::SingleNodeWriter)).await;
    let id = v.volume_id.as_str();
    // Only this volume is real: a group that was taken would have snapshotted it.
    let before = snapshot_ids_of(&d, id).await;
    let other_node = {
        let mut f: Vec<&str> = id.split(':').collect();
        f[1] = "some-other-node";
        f.join(":")
    };
    let other_kind = id.replacen(&format!("{}:", d.pool.kind), if d.pool.kind == "zfs" { "lvm:" } else { "zfs:" }, 1);
    let thousand: Vec<String> = std::iter::once(id.to_owned()).chain((1..1000).map(|i| format!("{}-{i}", unknown_volume_id(&d)))).collect();
    let good = unique("hostile-grp");
    struct Case {
        what: &'static str,
        name: String,
        ids: Vec<String>,
        want: &'static [Code],
    }
    let cases = [
        Case { what: "no source volumes", name: good.clone(), ids: vec![], want: &[Code::InvalidArgument] },
        Case { what: "one volume twice", name: good.clone(), ids: vec![id.into(), id.into()], want: &[Code::InvalidArgument] },
        Case { what: "the same volume 1000 times", name: good.clone(), ids: vec![id.to_owned(); 1000], want: &[Code::InvalidArgument] },
        Case { what: "1000 ids, all but one unknown", name: good.clone(), ids: thousand, want: &[Code::NotFound] },
        Case { what: "a volume of another node", name: good.clone(), ids: vec![id.into(), other_node], want: &[Code::InvalidArgument] },
        Case { what: "a volume of another kind", name: good.clone(), ids: vec![id.into(), other_kind], want: &[Code::InvalidArgument] },
        Case { what: "a garbage id", name: good.clone(), ids: vec![id.into(), "\u{1b}[31m;rm -rf /".into()], want: &[Code::NotFound] },
        Case { what: "a 10 KB id", name: good.clone(), ids: vec![id.into(), "x".repeat(10 << 10)], want: &[Code::NotFound] },
        Case {
            what: "an empty id",
            name: good.clone(),
            ids: vec![id.into(), String::new()],
            want: &[Code::NotFound, Code::InvalidArgument],
        },
        Case { what: "an empty name", name: String::new(), ids: vec![id.into()], want: &[Code::InvalidArgument] },
        Case { what: "a 10 KB name", name: "g".repeat(10 << 10), ids: vec![id.into()], want: &[Code::InvalidArgument] },
        Case {
            what: "a name with control characters",
            name: "grp\n\u{7}\u{1b}[2J".into(),
            ids: vec![id.into()],
            want: &[Code::InvalidArgument],
        },
    ];
    for c in cases {
        let req = CreateVolumeGroupSnapshotRequest { name: c.name, source_volume_ids: c.ids, ..Default::default() };
        let started = std::time::Instant::now();
        let s = expect_one_of(d.group().create_volume_group_snapshot(req).await, c.want, c.what);
        assert_bounded(&s, c.what);
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "{}: took {:?}", c.what, started.elapsed());
        assert_eq!(snapshot_ids_of(&d, id).await, before, "{}: snapshots were made", c.what);
    }
    // The volume is still there, unharmed.
    ok(d.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: id.to_owned() }).await, "ControllerGetVolume");
    d.delete(id).await;
}

/// issue 12 (hostile inputs): Delete/GetVolumeGroupSnapshot of malformed group ids (empty,
/// garbage, 10 KB, control characters, and ids of a volume and of a snapshot): Get answers
/// NOT_FOUND (INVALID_ARGUMENT when empty), Delete answers OK for what names no group (the
/// spec) and never deletes the volume or the snapshot its id names.
#[tokio::test]
async fn hostile_group_snapshot_ids_touch_nothing() {
    let d = Driver::start().await;
    d.require_controller(&[CtrlCap::CreateDeleteSnapshot]).await;
    let v = d.create(&unique("hostile-gid"), d.fs_volume_size(), d.mount_cap(Mode::SingleNodeWriter)).await;
    let snap = d.snapshot(&unique("hostile-gid"), &v.volume_id).await;
    let group_like = |id: &str| {
        // The snapshot's id with its object letter turned into a group's ('s' -> 'g').
        let (head, last) = id.rsplit_once(':').unwrap();
        format!("{head}:g{}", &last[1..])
    };
    let ids = [
        "garbage".to_owned(),
        "x".repeat(10 << 10),
        "g:\n\u{1b}[2J:\0".to_owned(),
        v.volume_id.clone(),
        snap.snapshot_id.clone(),
        group_like(&snap.snapshot_id),
        unknown_volume_id(&d),
    ];
    for gid in &ids {
        let what = format!("GetVolumeGroupSnapshot {}", &gid[..gid.len().min(40)]);
        let s = expect_code(
            d.group()
                .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest { group_snapshot_id: gid.clone(), ..Default::default() })
                .await,
            Code::NotFound,
            &what,
        );
        assert_bounded(&s, &what);
        let what = format!("DeleteVolumeGroupSnapshot {}", &gid[..gid.len().min(40)]);
        let r = d
            .group()
            .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest { group_snapshot_id: gid.clone(), ..Default::default() })
            .await;
        ok(r, &what);
        // A group id naming a snapshot's member list must list it; a stray snapshot_ids entry is refused.
        let r = d
            .group()
            .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: gid.clone(),
                snapshot_ids: vec![snap.snapshot_id.clone()],
                ..Default::default()
            })
            .await;
        if let Err(s) = &r {
            assert_bounded(s, &what);
        }
    }
    for (what, r) in [
        (
            "GetVolumeGroupSnapshot of an empty id",
            d.group().get_volume_group_snapshot(GetVolumeGroupSnapshotRequest::default()).await.map(|_| ()),
        ),
        (
            "DeleteVolumeGroupSnapshot of an empty id",
            d.group().delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest::default()).await.map(|_| ()),
        ),
    ] {
        let s = expect_code(r.map(tonic::Response::new), Code::InvalidArgument, what);
        assert_bounded(&s, what);
    }
    // Neither the volume nor the snapshot went anywhere.
    ok(d.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await, "ControllerGetVolume");
    assert!(all_snapshot_ids(&d).await.contains(&snap.snapshot_id), "a DeleteVolumeGroupSnapshot deleted snapshot {}", snap.snapshot_id);
    d.delete_snapshot(&snap.snapshot_id).await;
    d.delete(&v.volume_id).await;
}

/// The key a pool kind really can change (docs/design.md, ControllerModifyVolume), and a value
/// it accepts; LVM has none.
fn a_mutable_key(d: &Driver) -> Option<(&'static str, &'static str)> {
    match d.pool.kind.as_str() {
        "file" => Some(("provisioning", "thin")),
        "zfs" => Some(("compression", "lz4")),
        "nfs" => Some(("mode", "0750")),
        _ => None,
    }
}

/// The hostile values of a mutable parameter: empty, 10 KB, and ones that would inject more
/// arguments or properties into `zfs set`, `lvchange` or a shell.
fn hostile_values(good: &str) -> Vec<String> {
    vec![
        String::new(),
        " ".into(),
        "v".repeat(10 << 10),
        format!("{good} -o mountpoint=/"),
        format!("{good} atime=off"),
        format!("{good}\nreadonly=on"),
        format!("{good}="),
        format!("={good}"),
        format!("-o{good}"),
        format!("{good};touch /tmp/holdfast-pwned"),
        format!(" {good}"),
        format!("{good}\0"),
    ]
}

/// issue 12 (hostile inputs): ControllerModifyVolume with unknown keys, 10 KB keys and values,
/// values with spaces, `=`, newlines or `-o` (which would inject into `zfs set` or `lvchange`),
/// and empty values: INVALID_ARGUMENT with a bounded message, and the volume's recorded values
/// (ControllerGetVolume's volume_context) unchanged — nothing half-applied.
#[tokio::test]
async fn hostile_mutable_parameters_change_nothing() {
    let d = Driver::start().await;
    d.require_controller(&[CtrlCap::ModifyVolume]).await;
    let v = d.create(&unique("hostile-mod"), d.fs_volume_size(), d.mount_cap(Mode::SingleNodeWriter)).await;
    let context = || async {
        ok(d.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await, "ControllerGetVolume")
            .volume
            .map(|v| v.volume_context)
            .unwrap_or_default()
    };
    let before = context().await;
    let mut cases: Vec<(String, std::collections::HashMap<String, String>)> = vec![
        ("an unknown key".into(), [("holdfast-no-such-key".to_owned(), "1".to_owned())].into()),
        ("a 10 KB key".into(), [("k".repeat(10 << 10), "1".to_owned())].into()),
        ("an empty key".into(), [(String::new(), "1".to_owned())].into()),
        ("a key with -o".into(), [("-o mountpoint".to_owned(), "/".to_owned())].into()),
        ("a key with a newline".into(), [("compression\nreadonly".to_owned(), "on".to_owned())].into()),
    ];
    if let Some((key, good)) = a_mutable_key(&d) {
        for value in hostile_values(good) {
            let what = format!("{key}={:?}", &value[..value.len().min(30)]);
            cases.push((what.clone(), [(key.to_owned(), value.clone())].into()));
            // With a valid key beside it, the valid one must not be applied either.
            cases.push((
                format!("{what} beside a valid key"),
                [(key.to_owned(), value), ("holdfast-no-such-key".to_owned(), "1".to_owned())].into(),
            ));
        }
    }
    for (what, params) in cases {
        let req = ControllerModifyVolumeRequest { volume_id: v.volume_id.clone(), mutable_parameters: params, ..Default::default() };
        let s = expect_code(d.controller().controller_modify_volume(req).await, Code::InvalidArgument, &what);
        assert_bounded(&s, &what);
        assert_eq!(context().await, before, "{what}: the volume's recorded values changed");
    }
    assert!(!Path::new("/tmp/holdfast-pwned").exists(), "a mutable value ran a command");
    d.delete(&v.volume_id).await;
}

/// issue 12 (hostile inputs): CreateVolume with the same hostile mutable_parameters answers
/// INVALID_ARGUMENT and makes no volume.
#[tokio::test]
async fn hostile_mutable_parameters_at_create_make_no_volume() {
    let d = Driver::start().await;
    d.require_controller(&[CtrlCap::ModifyVolume]).await;
    let before: std::collections::BTreeSet<String> = d.list_volume_ids(0).await.into_iter().collect();
    let (key, good) = a_mutable_key(&d).unwrap_or(("provisioning", "thin"));
    let mut values = hostile_values(good);
    values.push("k".repeat(10 << 10));
    for (i, value) in values.into_iter().enumerate() {
        let what = format!("CreateVolume with {key}={:?}", &value[..value.len().min(30)]);
        let mut req = d.create_request(&unique("hostile-modc"), d.fs_volume_size(), d.mount_cap(Mode::SingleNodeWriter));
        if i % 2 == 0 {
            req.mutable_parameters.insert(key.to_owned(), value);
        } else {
            req.mutable_parameters.insert(value, good.to_owned());
        }
        let s = expect_code(d.controller().create_volume(req).await, Code::InvalidArgument, &what);
        assert_bounded(&s, &what);
    }
    // Other tests make volumes in a shared VM pool meanwhile: only this test's names count (a
    // volume id holds the start of its CSI name).
    let after: std::collections::BTreeSet<String> = d.list_volume_ids(0).await.into_iter().collect();
    let made: Vec<&String> = after.difference(&before).filter(|id| id.contains("hostile-modc")).collect();
    assert!(made.is_empty(), "CreateVolume with hostile mutable_parameters made volumes: {made:?}");
}
