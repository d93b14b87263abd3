//! One lock per object, and read-only publishes that survive a crash, proven on a `file` pool
//! with the real binary (issue 10 items 1 and 5). Interleavings are forced, not hoped for: a
//! wrapper `cp` first in the driver's PATH holds a snapshot's or clone's copy (the filesystem
//! frozen around it) until the test releases it, and the driver's debug-build crash points
//! (`HOLDFAST_TEST_CRASH_AT`, src/crash.rs) kill it between the steps of a read-only bind.
//!
//! Needs root (loop devices, mounts, FIFREEZE). Each test thaws what may be frozen before any
//! clean-up unmounts, and everything lives under the test's own temp dirs.

mod common;
#[path = "common/hostile.rs"]
mod hostile_guards;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::*;
use hostile_guards::*;
use tonic::Code;

/// How long a test waits for the driver to reach a paused step.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A `cp` wrapper: while `<ctl>/pause-cp` exists, each copy touches `<ctl>/at-cp` and waits
/// (exiting, copying nothing, if its driver dies meanwhile).
struct SlowCopy {
    ctl: PathBuf,
    path: String,
}

impl SlowCopy {
    fn new(dir: &Path) -> SlowCopy {
        let (bin, ctl) = (dir.join("bin"), dir.join("ctl"));
        std::fs::create_dir_all(&bin).expect("create bin dir");
        std::fs::create_dir_all(&ctl).expect("create ctl dir");
        let out = std::process::Command::new("sh").args(["-c", "command -v cp"]).output().expect("run sh");
        let real = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(real.starts_with('/'), "cp is not installed");
        let script = format!(
            "#!/bin/sh\nctl={ctl}\nparent=$PPID\nif [ -e \"$ctl/pause-cp\" ]; then\n  touch \"$ctl/at-cp\"\n  \
             while [ -e \"$ctl/pause-cp\" ]; do kill -0 \"$parent\" 2>/dev/null || exit 1; sleep 0.05; done\nfi\n\
             [ -e \"$ctl/slow-cp\" ] && sleep 1\nexec {real} \"$@\"\n",
            ctl = ctl.display()
        );
        let p = bin.join("cp");
        std::fs::write(&p, script).expect("write cp wrapper");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod cp wrapper");
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        SlowCopy { ctl, path }
    }
    fn set(&self, name: &str) {
        std::fs::write(self.ctl.join(name), b"").expect("write control file");
    }
    fn clear(&self, name: &str) {
        let _ = std::fs::remove_file(self.ctl.join(name));
    }
    /// Waits until a copy is held by the wrapper.
    async fn wait_held(&self) {
        let at = self.ctl.join("at-cp");
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !at.exists() {
            assert!(Instant::now() < deadline, "no copy reached the wrapper within {STEP_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::remove_file(at).expect("clear at-cp");
    }
}

/// Releases a held copy on drop, so a failing test never leaves the driver's copy (and the
/// freeze around it) waiting.
struct Release<'a>(&'a SlowCopy);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.clear("pause-cp");
        self.0.clear("slow-cp");
    }
}

/// A driver on a file pool of the test's own, with the `cp` wrapper first in its PATH and
/// `env` set (kept across restarts).
async fn driver(outer: &Outer, env: &[(&str, String)]) -> (Driver, SlowCopy) {
    let copy = SlowCopy::new(outer.path());
    let cfg = outer.file_config(&outer.path().join("pool"), "");
    let mut setup = Setup::with_own_pool(&cfg, "conformance", "file").env("PATH", &copy.path);
    for (k, v) in env {
        setup = setup.env(k, v);
    }
    (setup.start().await, copy)
}

fn snapshot_request(name: &str, source: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest { name: name.to_owned(), source_volume_id: source.to_owned(), ..Default::default() }
}

fn clone_request(d: &Driver, name: &str, source: &str) -> CreateVolumeRequest {
    let mut req = d.create_request(name, 64 * MIB, ext4_cap(Mode::SingleNodeWriter));
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: source.to_owned() })),
    });
    req
}

/// Item 1: while a snapshot of a staged volume holds its filesystem frozen, every other call
/// on the volume (unstage, publish, expand, delete, another snapshot, a clone) answers
/// ABORTED instead of interleaving; once the snapshot is done, nothing is left frozen and the
/// unstage detaches the loop device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_a_volume_being_snapshotted_are_aborted_and_nothing_stays_frozen() {
    let outer = Outer::new();
    let (d, copy) = driver(&outer, &[]).await;
    let cap = ext4_cap(Mode::SingleNodeWriter);
    let v = d.create(&unique("snapped"), 64 * MIB, cap.clone()).await;
    let id = v.volume_id.clone();
    let image = file_image(&outer.path().join("pool"), &id);
    let staging = d.staging_dir("snapped");
    d.stage(&id, &staging, &cap).await;
    let _thaw = Thaw { paths: vec![staging.clone()], paused_pid_file: None };
    let _release = Release(&copy);
    write_durably(&staging.join("before"), b"written before the snapshot\n");

    copy.set("pause-cp");
    let name = unique("snap-held");
    let mut c = d.controller();
    let req = snapshot_request(&name, &id);
    let first = tokio::spawn(async move { c.create_snapshot(req).await });
    copy.wait_held().await;

    let r = d.node().node_unstage_volume(NodeUnstageVolumeRequest { volume_id: id.clone(), staging_target_path: path_str(&staging) }).await;
    let s = expect_code(r, Code::Aborted, "NodeUnstageVolume during the snapshot");
    assert!(s.message().contains("in progress"), "the message says why: {}", s.message());
    let target = d.target_path("snapped");
    let r = d.node().node_publish_volume(d.publish_request(&id, &staging, &target, &cap, false)).await;
    expect_code(r, Code::Aborted, "NodePublishVolume during the snapshot");
    let r = d.controller().delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await;
    expect_code(r, Code::Aborted, "DeleteVolume during the snapshot");
    let grow = ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    expect_code(d.controller().controller_expand_volume(grow).await, Code::Aborted, "ControllerExpandVolume during the snapshot");
    let second = unique("snap-second");
    let r = d.controller().create_snapshot(snapshot_request(&second, &id)).await;
    expect_code(r, Code::Aborted, "a second CreateSnapshot of the volume during the first");
    let r = d.controller().create_volume(clone_request(&d, &unique("clone-during"), &id)).await;
    expect_code(r, Code::Aborted, "a clone of the volume during its snapshot");
    assert!(is_mount_point(&staging), "the staging mount is still there");

    copy.clear("pause-cp");
    let snap = ok(first.await.expect("join"), "the held CreateSnapshot").snapshot.expect("a snapshot");
    d.remember_snapshot(&snap.snapshot_id);
    assert!(snap.ready_to_use);
    assert!(write_finishes(&staging.join("after"), Duration::from_secs(10)), "the filesystem is still frozen after the snapshot");
    // The second snapshot, refused while the first ran, succeeds now.
    let later = d.snapshot(&second, &id).await;
    assert!(later.ready_to_use);
    assert!(write_finishes(&staging.join("after-second"), Duration::from_secs(10)), "frozen after the second snapshot");

    d.unstage(&id, &staging).await;
    assert!(!is_mount_point(&staging), "unstage left the staging path mounted");
    assert_eq!(loops_of(&image), "", "a loop device is still attached after the unstage");
    d.delete_snapshot(&later.snapshot_id).await;
    d.delete_snapshot(&snap.snapshot_id).await;
    d.delete(&id).await;
}

/// Item 1: two snapshots of one mounted volume started together are serialised: never both
/// failing, a refused one ABORTED (retryable) and OK on retry, and the volume writable after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_snapshots_of_one_volume_never_both_fail() {
    let outer = Outer::new();
    let (d, copy) = driver(&outer, &[]).await;
    let cap = ext4_cap(Mode::SingleNodeWriter);
    let v = d.create(&unique("twice"), 64 * MIB, cap.clone()).await;
    let staging = d.staging_dir("twice");
    d.stage(&v.volume_id, &staging, &cap).await;
    let _thaw = Thaw { paths: vec![staging.clone()], paused_pid_file: None };
    let _release = Release(&copy);
    write_durably(&staging.join("data"), b"some data\n");
    // Each copy takes a second, so the two calls overlap.
    copy.set("slow-cp");
    for round in 0..3 {
        let (a, b) = (unique(&format!("snap-a{round}")), unique(&format!("snap-b{round}")));
        let (mut ca, mut cb) = (d.controller(), d.controller());
        let (ra, rb) =
            tokio::join!(ca.create_snapshot(snapshot_request(&a, &v.volume_id)), cb.create_snapshot(snapshot_request(&b, &v.volume_id)));
        let codes = [code_of(&ra), code_of(&rb)];
        assert!(codes.contains(&Code::Ok), "round {round}: both snapshots failed: {ra:?} / {rb:?}");
        for (name, r) in [(&a, ra), (&b, rb)] {
            let snap = match r {
                Ok(resp) => resp.into_inner().snapshot.expect("a snapshot"),
                Err(s) => {
                    assert_eq!(s.code(), Code::Aborted, "round {round}: a refused snapshot must be ABORTED: {}", s.message());
                    d.snapshot(name, &v.volume_id).await
                }
            };
            d.remember_snapshot(&snap.snapshot_id);
            assert!(snap.ready_to_use, "round {round}: {name}");
        }
        assert!(write_finishes(&staging.join(format!("after-{round}")), Duration::from_secs(10)), "round {round}: left frozen");
    }
    copy.clear("slow-cp");
    d.unstage(&v.volume_id, &staging).await;
    assert_eq!(loops_of(&file_image(&outer.path().join("pool"), &v.volume_id)), "", "a loop device outlived the unstage");
}

/// Item 1: a CSI name equal to the local name derived from another (`Team/Data…` and
/// `team-data-<hash>`) reaches, or once derivations differ at least competes for, one local
/// object: while the first is being created (its clone copy held), the second is never
/// answered OK with the first's volume; retried afterwards, it never gets the first's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_names_for_one_local_object_take_one_lock() {
    let outer = Outer::new();
    let (d, copy) = driver(&outer, &[]).await;
    let _release = Release(&copy);
    let cap = ext4_cap(Mode::SingleNodeWriter);
    let src = d.create(&unique("source"), 64 * MIB, cap.clone()).await;
    let first_name = unique("Team/Data");
    let second_name = holdfast::volume_id::local_name(&first_name);
    assert_ne!(first_name, second_name);

    copy.set("pause-cp");
    let mut c = d.controller();
    let req = clone_request(&d, &first_name, &src.volume_id);
    let first = tokio::spawn(async move { c.create_volume(req).await });
    copy.wait_held().await;
    let during = d.controller().create_volume(d.create_request(&second_name, 64 * MIB, cap.clone())).await;
    copy.clear("pause-cp");
    let first = ok(first.await.expect("join"), "the first create").volume.expect("a volume");
    d.adopt_leftovers_of(std::slice::from_ref(&first.volume_id), &[]);
    match during {
        Err(s) => assert_eq!(s.code(), Code::Aborted, "the second name during the first's create: {}", s.message()),
        Ok(resp) => {
            let v = resp.into_inner().volume.expect("a volume");
            d.adopt_leftovers_of(std::slice::from_ref(&v.volume_id), &[]);
            assert_ne!(v.volume_id, first.volume_id, "two CSI names were answered with one volume");
        }
    }
    // Retried once the first is done: never the first's volume.
    if let Ok(resp) = d.controller().create_volume(d.create_request(&second_name, 64 * MIB, cap)).await {
        let v = resp.into_inner().volume.expect("a volume");
        d.adopt_leftovers_of(std::slice::from_ref(&v.volume_id), &[]);
        assert_ne!(v.volume_id, first.volume_id, "the retried second name got the first name's volume");
    }
}

/// The mounts under the shared holding directory whose names start with `prefix`.
fn holding_mounts(prefix: &str) -> Vec<PathBuf> {
    let hold = Path::new(holdfast::node::mount::DEFAULT_HOLD_DIR);
    all_mount_points()
        .into_iter()
        .filter(|m| m.parent() == Some(hold) && m.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .collect()
}

fn is_readonly_mount(path: &Path) -> Option<bool> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path_str(path);
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 5 && unescape(f[4]) == want).then(|| f[5].split(',').any(|o| o == "ro"))
    })
}

/// Item 5: a driver killed at each step of a read-only publish (bind held in the holding
/// directory; bind attached at the target; and what a two-step bind left, a writable bind at
/// the target) is repaired: the restarted driver detaches the dead one's holding binds, and the
/// retried publish answers OK with one read-only mount at the target, writes refused. A finished
/// read-write publish asked again read-only stays ALREADY_EXISTS (spec).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_publish_killed_at_any_step_is_repaired_by_its_retry() {
    let outer = Outer::new();
    let arm = outer.path().join("crash-armed");
    let steps = [holdfast::node::mount::CRASH_HELD, holdfast::node::mount::CRASH_ATTACHED, holdfast::node::mount::CRASH_WRITABLE_AT_TARGET];
    let env_value = |step: &str| format!("{step}@{}", arm.display());
    // Filesystem volumes at every step; raw block ones (a device node bound on a file) where
    // the repair differs: the held bind, and a writable bind left at the target.
    let cases = steps.iter().map(|s| (*s, false)).chain([(steps[0], true), (steps[2], true)]);
    for (step, block) in cases {
        let (mut d, _copy) = driver(&outer, &[(holdfast::crash::CRASH_AT_ENV, env_value(step))]).await;
        let cap = if block { block_cap(Mode::SingleNodeWriter) } else { ext4_cap(Mode::SingleNodeWriter) };
        let raw = step;
        let step = format!("{step}{}", if block { " (block)" } else { "" });
        let step = step.as_str();
        let v = d.create(&unique("ro"), 64 * MIB, cap.clone()).await;
        let id = v.volume_id.clone();
        let staging = d.staging_dir("ro");
        d.stage(&id, &staging, &cap).await;
        let target = d.target_path("ro");
        let pid = d.pid().expect("driver pid");

        std::fs::write(&arm, b"").expect("arm the crash");
        let r = d.node().node_publish_volume(d.publish_request(&id, &staging, &target, &cap, true)).await;
        assert!(r.is_err(), "{step}: the publish answered although its driver was killed: {r:?}");
        assert!(!arm.exists(), "{step}: the driver never reached the crash point");
        d.kill();
        let hold_prefix = format!("{pid}-");
        match raw {
            s if s == holdfast::node::mount::CRASH_HELD => {
                assert_eq!(holding_mounts(&hold_prefix).len(), 1, "{step}: the killed driver left its holding bind");
                assert!(!is_mount_point(&target), "{step}: nothing reached the target");
            }
            s if s == holdfast::node::mount::CRASH_WRITABLE_AT_TARGET => {
                assert_eq!(is_readonly_mount(&target), Some(false), "{step}: the crash left a writable bind at the target");
            }
            _ => assert_eq!(is_readonly_mount(&target), Some(true), "{step}: the bind at the target is read-only"),
        }

        d.restart().await;
        assert!(
            holding_mounts(&hold_prefix).is_empty(),
            "{step}: the restarted driver left the killed one's holding binds: {:?}",
            holding_mounts(&hold_prefix)
        );
        d.publish(&id, &staging, &target, &cap, true).await;
        assert_eq!(mounts_at(&target), 1, "{step}: one mount at the target after the retry");
        assert_eq!(is_readonly_mount(&target), Some(true), "{step}: the retried publish is read-only");
        if !block {
            // (A device node ignores its mount's ro flag: the container runtime enforces that.)
            let err = std::fs::write(target.join("probe"), b"x").expect_err("a write through a read-only publish");
            assert_eq!(err.raw_os_error(), Some(30), "{step}: EROFS expected, got {err}");
        }
        assert!(
            holding_mounts(&hold_prefix).is_empty(),
            "{step}: holding binds of the killed driver remain: {:?}",
            holding_mounts(&hold_prefix)
        );

        d.unpublish(&id, &target).await;
        if raw == holdfast::node::mount::CRASH_ATTACHED {
            // A finished read-write publish is not a half-made read-only one.
            d.publish(&id, &staging, &target, &cap, false).await;
            for attempt in 0..2 {
                let r = d.node().node_publish_volume(d.publish_request(&id, &staging, &target, &cap, true)).await;
                expect_code(r, Code::AlreadyExists, &format!("read-only publish {attempt} over a finished read-write one"));
                assert_eq!(is_readonly_mount(&target), Some(false), "the read-write publish is left as it was");
                assert_eq!(mounts_at(&target), 1);
            }
            d.unpublish(&id, &target).await;
        }
        d.unstage(&id, &staging).await;
        assert_eq!(loops_of(&file_image(&outer.path().join("pool"), &id)), "", "{step}: a loop device outlived the unstage");
        d.delete(&id).await;
    }
}

/// Item 1: a copy holds its source. While a clone of a volume copies (held), the source cannot
/// be deleted, expanded or staged; while a restore from a snapshot copies, the snapshot cannot
/// be deleted. Each answers ABORTED and succeeds once the copy is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_holds_its_source_until_it_is_done() {
    let outer = Outer::new();
    let (d, copy) = driver(&outer, &[]).await;
    let _release = Release(&copy);
    let cap = ext4_cap(Mode::SingleNodeWriter);
    let src = d.create(&unique("copied"), 64 * MIB, cap.clone()).await;
    let snap = d.snapshot(&unique("copied-snap"), &src.volume_id).await;

    copy.set("pause-cp");
    let mut c = d.controller();
    let req = clone_request(&d, &unique("clone"), &src.volume_id);
    let clone = tokio::spawn(async move { c.create_volume(req).await });
    copy.wait_held().await;
    let r = d.controller().delete_volume(DeleteVolumeRequest { volume_id: src.volume_id.clone(), ..Default::default() }).await;
    expect_code(r, Code::Aborted, "DeleteVolume of a clone's source during the copy");
    let grow = ControllerExpandVolumeRequest {
        volume_id: src.volume_id.clone(),
        capacity_range: Some(CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    expect_code(d.controller().controller_expand_volume(grow).await, Code::Aborted, "ControllerExpandVolume of a clone's source");
    let staging = d.staging_dir("copied");
    let r = d.node().node_stage_volume(d.stage_request(&src.volume_id, &staging, &cap)).await;
    expect_code(r, Code::Aborted, "NodeStageVolume of a clone's source during the copy");
    copy.clear("pause-cp");
    let clone = ok(clone.await.expect("join"), "the held clone").volume.expect("a volume");
    d.adopt_leftovers_of(std::slice::from_ref(&clone.volume_id), &[]);

    copy.set("pause-cp");
    let mut c = d.controller();
    let mut req = d.create_request(&unique("restore"), 64 * MIB, cap.clone());
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let restore = tokio::spawn(async move { c.create_volume(req).await });
    copy.wait_held().await;
    let r = d.controller().delete_snapshot(DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() }).await;
    expect_code(r, Code::Aborted, "DeleteSnapshot of a restore's source during the copy");
    copy.clear("pause-cp");
    let restored = ok(restore.await.expect("join"), "the held restore").volume.expect("a volume");
    d.adopt_leftovers_of(std::slice::from_ref(&restored.volume_id), &[]);

    // Done: every refused call goes through now.
    d.delete(&restored.volume_id).await;
    d.delete(&clone.volume_id).await;
    d.delete_snapshot(&snap.snapshot_id).await;
    d.stage(&src.volume_id, &staging, &cap).await;
    d.unstage(&src.volume_id, &staging).await;
    d.delete(&src.volume_id).await;
}
