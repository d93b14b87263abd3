//! Node calls act only on what is the volume's own, tried against the real `holdfast` binary
//! on this host as a careless or hostile caller would: foreign tmpfs and XFS mounts at request
//! paths, symlinks to a victim directory, one volume staged under several spellings of a path,
//! stages that fail half-way, and paths outside `allowed_path_prefixes`. Each case asserts
//! what an operator would check: the foreign data is untouched and still mounted, the call
//! answered the right code, and nothing was left mounted or attached.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::*;
use tonic::Code;

/// A tmpfs of "someone else" at `path`, holding one file (unmounted by the harness with the
/// driver's temp dir, even when the test fails).
fn foreign_tmpfs(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    assert!(run("mount", &["-t", "tmpfs", "-o", "size=1m", "holdfast-foreign", &path_str(path)]), "mount a tmpfs");
    std::fs::write(path.join("precious"), b"someone else's").unwrap();
}

/// What an operator checks after a call that must have left the tmpfs alone.
fn assert_untouched(path: &Path, what: &str) {
    assert!(is_mount_point(path), "{what}: the foreign tmpfs at {} was unmounted", path.display());
    assert_eq!(std::fs::read(path.join("precious")).ok().as_deref(), Some(&b"someone else's"[..]), "{what}: foreign data changed");
}

/// Loop devices backed by a file of the driver's own file pool (`None` for other pools).
fn pool_loops(d: &Driver) -> Option<Vec<String>> {
    if d.pool.kind != "file" || !d.pool.owned {
        return None;
    }
    let out = std::process::Command::new("losetup").args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"]).output().unwrap();
    let pool = path_str(&d.dir.join("pool"));
    Some(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&pool)).map(str::to_owned).collect())
}

fn unpublish_req(id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: path_str(target) }
}

fn unstage_req(id: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest { volume_id: id.into(), staging_target_path: path_str(staging) }
}

fn stats_req(id: &str, path: &str) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest { volume_id: id.into(), volume_path: path.into(), staging_target_path: String::new() }
}

fn expand_req(id: &str, path: &str) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest { volume_id: id.into(), volume_path: path.into(), ..Default::default() }
}

#[tokio::test]
async fn unpublish_and_unstage_leave_a_foreign_mount_alone() {
    let d = Driver::start().await;
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    // A volume that exists and is in use elsewhere, one that was deleted, and ids that never were.
    let m = d.mounted_volume("foreign-owner", Mode::SingleNodeWriter).await;
    let gone = d.create(&unique("foreign-gone"), d.fs_volume_size(), cap.clone()).await.volume_id;
    d.delete(&gone).await;
    let ids = [m.volume.volume_id.clone(), gone, "no-such-volume".to_owned(), format!("file:{NODE_ID}:{}:nope", d.pool.name)];
    let foreign = d.dir.join("someone-else");
    foreign_tmpfs(&foreign);
    for id in &ids {
        ok(d.node().node_unpublish_volume(unpublish_req(id, &foreign)).await, &format!("NodeUnpublishVolume {id} on a foreign tmpfs"));
        assert_untouched(&foreign, &format!("NodeUnpublishVolume {id}"));
        ok(d.node().node_unstage_volume(unstage_req(id, &foreign)).await, &format!("NodeUnstageVolume {id} on a foreign tmpfs"));
        assert_untouched(&foreign, &format!("NodeUnstageVolume {id}"));
    }
    // The volume's own mounts were not touched either.
    assert!(is_mount_point(&m.target) && is_mount_point(&m.staging), "the real volume lost its mounts");

    // A foreign mount stacked on the volume's own target is left alone as well: the call
    // answers OK, touches nothing, and the volume can be unpublished once it is gone.
    foreign_tmpfs(&m.target);
    d.unpublish(&m.volume.volume_id, &m.target).await;
    assert_untouched(&m.target, "NodeUnpublishVolume under a foreign mount");
    assert!(run("umount", &[&path_str(&m.target)]), "remove the foreign tmpfs");
    assert!(is_mount_point(&m.target), "the volume's bind beneath it was unmounted");
    d.tear_down(&m).await;
    assert!(!m.target.exists() && !is_mount_point(&m.staging));
}

#[tokio::test]
async fn symlinks_in_request_paths_are_never_followed() {
    let d = Driver::start().await;
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let v = d.create(&unique("symlink"), d.fs_volume_size(), cap.clone()).await;
    let id = v.volume_id.as_str();
    let victim = d.dir.join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("file"), b"victim").unwrap();
    let link = d.dir.join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let victim_file = d.dir.join("victim-file");
    std::fs::write(&victim_file, b"victim").unwrap();
    let file_link = d.dir.join("file-link");
    std::os::unix::fs::symlink(&victim_file, &file_link).unwrap();

    struct Case {
        name: &'static str,
        staging: PathBuf,
        want: Code,
    }
    let cases = [
        Case { name: "staging path is a link", staging: link.clone(), want: Code::FailedPrecondition },
        Case { name: "staging path below a link", staging: link.join("stage"), want: Code::FailedPrecondition },
        Case {
            name: "through /proc/self/root",
            staging: Path::new("/proc/self/root").join(d.dir.strip_prefix("/").unwrap()).join("s"),
            want: Code::InvalidArgument,
        },
        Case { name: "with ..", staging: d.dir.join("x/../victim"), want: Code::InvalidArgument },
    ];
    for c in cases {
        let r = d.node().node_stage_volume(d.stage_request(id, &c.staging, &cap)).await;
        expect_code(r, c.want, c.name);
        assert!(!is_mount_point(&victim) && !victim.join("stage").exists(), "{}: something happened in the victim", c.name);
        assert_eq!(pool_loops(&d).unwrap_or_default(), Vec::<String>::new(), "{}: a loop device stayed attached", c.name);
    }

    // Publish: the target is a link, or below one.
    let staging = d.staging_dir("symlink");
    d.stage(id, &staging, &cap).await;
    for target in [link.clone(), link.join("mount")] {
        let r = d.node().node_publish_volume(d.publish_request(id, &staging, &target, &cap, false)).await;
        expect_code(r, Code::FailedPrecondition, &format!("NodePublishVolume at {}", target.display()));
        assert!(!is_mount_point(&victim) && !victim.join("mount").exists(), "published through {}", target.display());
    }
    assert_eq!(std::fs::read(victim.join("file")).unwrap(), b"victim");
    d.unstage(id, &staging).await;
    d.delete(id).await;

    // A raw block volume is never bound over a file a link points to.
    let bcap = block_cap(Mode::SingleNodeWriter);
    let b = d.create(&unique("symlink-block"), 16 * MIB, bcap.clone()).await;
    let bstaging = d.staging_dir("symlink-block");
    d.stage(&b.volume_id, &bstaging, &bcap).await;
    let r = d.node().node_publish_volume(d.publish_request(&b.volume_id, &bstaging, &file_link, &bcap, false)).await;
    expect_code(r, Code::FailedPrecondition, "block NodePublishVolume on a link");
    assert!(!is_mount_point(&victim_file), "the device was bound over the victim file");
    assert_eq!(std::fs::read(&victim_file).unwrap(), b"victim");
    d.unstage(&b.volume_id, &bstaging).await;
    d.delete(&b.volume_id).await;
}

#[tokio::test]
async fn a_single_node_volume_is_staged_at_one_path_however_it_is_spelled() {
    let d = Driver::start().await;
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let v = d.create(&unique("one-path"), d.fs_volume_size(), cap.clone()).await;
    let id = v.volume_id.as_str();
    let base = d.staging_dir("one-path");
    let dotted = format!("{}/./b", path_str(&base));
    let doubled = format!("{}//b", path_str(&base));
    for p in [&dotted, &doubled] {
        let req = NodeStageVolumeRequest { staging_target_path: p.clone(), ..d.stage_request(id, &base, &cap) };
        ok(d.node().node_stage_volume(req).await, &format!("NodeStageVolume at {p}"));
    }
    let staged = base.join("b");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let here = mounts.lines().filter(|l| l.split(' ').nth(4) == Some(&path_str(&staged))).count();
    assert_eq!(here, 1, "{dotted} and {doubled} are one path: one mount");

    let other = d.staging_dir("one-path-other");
    let err = expect_code(d.node().node_stage_volume(d.stage_request(id, &other, &cap)).await, Code::FailedPrecondition, "second path");
    assert!(err.message().contains(&path_str(&staged)), "the error names the first path: {}", err.message());
    assert!(!is_mount_point(&other));
    d.unstage(id, &staged).await;
    // Once unstaged, the other path is fine.
    d.stage(id, &other, &cap).await;
    d.unstage(id, &other).await;
    d.delete(id).await;
}

#[tokio::test]
async fn stats_expand_and_publish_act_only_on_the_volumes_paths() {
    let d = Driver::start().await;
    let m = d.mounted_volume("paths", Mode::SingleNodeWriter).await;
    let id = m.volume.volume_id.clone();
    let foreign = d.dir.join("foreign-tmpfs");
    foreign_tmpfs(&foreign);

    // A foreign XFS, to grow: its size must not change.
    let img = d.dir.join("foreign-xfs.img");
    std::fs::File::create(&img).unwrap().set_len(320 * MIB as u64).unwrap();
    assert!(run("mkfs.xfs", &["-q", &path_str(&img)]));
    let xfs = d.dir.join("foreign-xfs");
    std::fs::create_dir_all(&xfs).unwrap();
    assert!(run("mount", &["-o", "loop", &path_str(&img), &path_str(&xfs)]));
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(640 * MIB as u64).unwrap();
    let loop_dev = String::from_utf8(std::process::Command::new("losetup").args(["-j", &path_str(&img)]).output().unwrap().stdout).unwrap();
    let loop_dev = loop_dev.split(':').next().unwrap().to_owned();
    assert!(run("losetup", &["-c", &loop_dev]));
    let xfs_size = fs_total_bytes(&xfs);

    let gone = format!("file:{NODE_ID}:{}:nope", d.pool.name);
    struct Case {
        name: &'static str,
        id: String,
        path: String,
    }
    let cases = [
        Case { name: "the host root", id: id.clone(), path: "/".into() },
        Case { name: "a relative path", id: id.clone(), path: "relative/mount".into() },
        Case { name: "a foreign tmpfs", id: id.clone(), path: path_str(&foreign) },
        Case { name: "a foreign xfs", id: id.clone(), path: path_str(&xfs) },
        Case { name: "an empty directory", id: id.clone(), path: path_str(&d.staging_dir("paths-empty")) },
        Case { name: "/proc", id: id.clone(), path: "/proc/self/root".into() },
        Case { name: "unknown id, relative path", id: gone.clone(), path: "relative".into() },
        Case { name: "unknown id, missing path", id: gone.clone(), path: "/holdfast-no-such-path".into() },
        Case { name: "unknown id, its real path", id: gone, path: path_str(&m.target) },
    ];
    for c in &cases {
        expect_code(d.node().node_get_volume_stats(stats_req(&c.id, &c.path)).await, Code::NotFound, &format!("stats of {}", c.name));
        expect_code(d.node().node_expand_volume(expand_req(&c.id, &c.path)).await, Code::NotFound, &format!("expand of {}", c.name));
    }
    assert_eq!(fs_total_bytes(&xfs), xfs_size, "the foreign xfs was grown");
    assert_untouched(&foreign, "stats and expand");
    // The volume's own paths still answer.
    for p in [&m.target, &m.staging] {
        let s = ok(d.node().node_get_volume_stats(stats_req(&id, &path_str(p))).await, "stats of the volume");
        assert!(!s.volume_condition.unwrap().abnormal);
    }

    // Publishing "from" a foreign mount exposes nothing.
    let target = d.target_path("paths-from-foreign");
    let r = d.node().node_publish_volume(d.publish_request(&id, &foreign, &target, &m.cap, false)).await;
    expect_code(r, Code::NotFound, "NodePublishVolume from a foreign staging mount");
    assert!(!is_mount_point(&target), "the foreign mount was exposed at the target");
    assert!(run("umount", &[&path_str(&xfs)]));
    d.tear_down(&m).await;
}

#[tokio::test]
async fn failed_stages_and_unstaged_expansion_leave_no_loop_device() {
    let d = Driver::start().await;
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let v = d.create(&unique("no-loop"), d.fs_volume_size(), cap.clone()).await;
    let id = v.volume_id.as_str();
    let staging = d.staging_dir("no-loop");
    // Formatted once as ext4, then asked for as xfs: FAILED_PRECONDITION, and nothing attached.
    d.stage(id, &staging, &cap).await;
    assert_eq!(pool_loops(&d).map(|l| l.len()), Some(1), "a staged file volume is on one loop device");
    d.unstage(id, &staging).await;
    assert_eq!(pool_loops(&d), Some(vec![]), "unstage detaches");
    let other_fs = if d.fs_type == "xfs" { "ext4" } else { "xfs" };
    let xcap = VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: other_fs.into(),
            ..Default::default()
        })),
        ..cap.clone()
    };
    let r = d.node().node_stage_volume(d.stage_request(id, &staging, &xcap)).await;
    expect_code(r, Code::FailedPrecondition, "stage as another filesystem");
    assert_eq!(pool_loops(&d), Some(vec![]), "a failed stage left a loop device attached");
    // A foreign mount at the staging path: ALREADY_EXISTS, nothing attached, tmpfs intact.
    foreign_tmpfs(&staging);
    let r = d.node().node_stage_volume(d.stage_request(id, &staging, &cap)).await;
    expect_code(r, Code::AlreadyExists, "stage over a foreign mount");
    assert_eq!(pool_loops(&d), Some(vec![]), "a stage refused for a foreign mount left a loop device");
    assert_untouched(&staging, "a refused stage");
    assert!(run("umount", &[&path_str(&staging)]));

    // NodeExpandVolume of the unstaged volume attaches nothing.
    let r = d.node().node_expand_volume(expand_req(id, &path_str(&staging))).await;
    expect_code(r, Code::NotFound, "expand of an unstaged volume");
    assert_eq!(pool_loops(&d), Some(vec![]), "expansion of an unstaged volume left a loop device");
    d.delete(id).await;
}

#[tokio::test]
async fn paths_outside_the_allowed_prefixes_are_refused() {
    if std::env::var_os("HOLDFAST_TEST_CONFIG").is_some() {
        // The prefix is written into the harness's own config; with a given config the other
        // tests of this file cover the pool.
        eprintln!("allowed_path_prefixes is checked with the default file pool only");
        return;
    }
    let setup = Setup::new();
    let dir = setup.socket.parent().unwrap().to_owned();
    let config = dir.join("holdfast.toml");
    let allowed = dir.join("allowed");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("allowed_path_prefixes = [\"{}\"]\n{text}", path_str(&allowed))).unwrap();
    let d = setup.start().await;
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let v = d.create(&unique("prefix"), d.fs_volume_size(), cap.clone()).await;
    let outside = d.staging_dir("prefix-outside");
    let err =
        expect_code(d.node().node_stage_volume(d.stage_request(&v.volume_id, &outside, &cap)).await, Code::InvalidArgument, "outside");
    assert!(err.message().contains("allowed path prefixes"), "{}", err.message());
    let inside = allowed.join("staging/prefix");
    std::fs::create_dir_all(&inside).unwrap();
    d.stage(&v.volume_id, &inside, &cap).await;
    let target = d.target_path("prefix");
    let r = d.node().node_publish_volume(d.publish_request(&v.volume_id, &inside, &target, &cap, false)).await;
    expect_code(r, Code::InvalidArgument, "publish outside the prefixes");
    let ok_target = allowed.join("pods/p/mount");
    d.publish(&v.volume_id, &inside, &ok_target, &cap, false).await;
    d.unpublish(&v.volume_id, &ok_target).await;
    d.unstage(&v.volume_id, &inside).await;
    d.delete(&v.volume_id).await;
}
