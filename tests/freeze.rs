//! Nothing stays frozen: snapshots of a staged `file` pool volume with real `fsfreeze`, driven
//! through the real binary. The interleavings are forced without hooks in the driver: wrapper
//! scripts for `fsfreeze` and `cp`, first in the driver's PATH, log each call and can pause
//! before or after the real command, so a test can kill -9 the driver at that step.
//!
//! Needs root (loop devices, mounts, FIFREEZE); every test thaws what it froze before its
//! clean-up, even when it fails, so no unmount ever waits on a frozen filesystem.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::*;
use sha2::{Digest, Sha256};
use tonic::Code;

/// How long a test waits for the driver to reach a step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The wrapper scripts and their control directory.
struct Wrappers {
    ctl: PathBuf,
    path: String,
}

fn real_program(name: &str) -> String {
    let out = std::process::Command::new("sh").args(["-c", &format!("command -v {name}")]).output().expect("sh");
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(p.starts_with('/'), "{name} is not installed");
    p
}

/// Writes `bin/fsfreeze` and `bin/cp` under `dir`. Control files in `dir/ctl`:
/// `pause-<step>` holds the command at that step (`before-freeze`, `after-freeze`,
/// `before-unfreeze`, `after-unfreeze`, `cp`: half-way through the copy) and the wrapper
/// touches `at-<step>` when it gets there; `fail-unfreeze` makes the thaw fail without thawing;
/// `slow-cp` makes each copy take a second. While paused, a wrapper whose driver died exits
/// without running the real command (as a child killed with its driver would).
fn wrappers(dir: &Path) -> Wrappers {
    let (bin, ctl) = (dir.join("bin"), dir.join("ctl"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&ctl).unwrap();
    let pause = format!(
        r#"ctl={ctl}
parent=$PPID
pause() {{
  [ -e "$ctl/pause-$1" ] || return 0
  touch "$ctl/at-$1"
  while [ -e "$ctl/pause-$1" ]; do
    kill -0 "$parent" 2>/dev/null || exit 1
    sleep 0.05
  done
  kill -0 "$parent" 2>/dev/null || exit 1
}}
"#,
        ctl = ctl.display()
    );
    let fsfreeze = format!(
        r#"#!/bin/sh
{pause}
step=${{1#--}}
echo "$step $2" >> "$ctl/log"
pause "before-$step"
if [ "$step" = unfreeze ] && [ -e "$ctl/fail-unfreeze" ]; then
  echo "fsfreeze: $2: unfreeze failed: Input/output error" >&2
  exit 1
fi
{real} "$@"
rc=$?
pause "after-$step"
exit $rc
"#,
        real = real_program("fsfreeze")
    );
    let cp = format!(
        r#"#!/bin/sh
{pause}
echo "cp-start" >> "$ctl/log"
if [ -e "$ctl/pause-cp" ]; then
  # What a copy killed half-way leaves: the first MiB of the image.
  head -c 1048576 "$3" > "$4"
  pause cp
fi
[ -e "$ctl/slow-cp" ] && sleep 1
{real} "$@"
rc=$?
echo "cp-end" >> "$ctl/log"
exit $rc
"#,
        real = real_program("cp")
    );
    for (name, text) in [("fsfreeze", fsfreeze), ("cp", cp)] {
        let p = bin.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    Wrappers { ctl, path }
}

impl Wrappers {
    fn set(&self, name: &str) {
        std::fs::write(self.ctl.join(name), b"").unwrap();
    }
    fn clear(&self, name: &str) {
        let _ = std::fs::remove_file(self.ctl.join(name));
    }
    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.ctl.join("log")).unwrap_or_default().lines().map(str::to_owned).collect()
    }
    fn clear_log(&self) {
        let _ = std::fs::remove_file(self.ctl.join("log"));
    }
    /// Waits until a wrapper reached `step` (paused there).
    async fn wait_at(&self, step: &str) {
        let at = self.ctl.join(format!("at-{step}"));
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !at.exists() {
            assert!(Instant::now() < deadline, "the driver never reached {step}; wrapper log: {:?}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::remove_file(at).unwrap();
    }
}

/// Thaws `mount_point` with the real fsfreeze when dropped: a failed test must never leave its
/// clean-up (an unmount) waiting on a frozen filesystem.
struct ThawOnDrop(PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new(real_program("fsfreeze")).arg("--unfreeze").arg(&self.0).output();
    }
}

/// Whether a new file can be written and fsynced in `dir` within `timeout` (a frozen
/// filesystem blocks the writer). A writer still blocked is left behind; the caller's
/// [`ThawOnDrop`] releases it.
fn writable_within(dir: &Path, timeout: Duration) -> bool {
    let path = dir.join(unique("writer"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        write_durably(&path, b"written after the restart");
        let _ = tx.send(());
    });
    rx.recv_timeout(timeout).is_ok()
}

fn freeze_records(d: &Driver) -> Vec<PathBuf> {
    match std::fs::read_dir(d.dir.join("state/freeze")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Temporaries anywhere in the pool (`.<local>.img.tmp` and the like).
fn pool_temporaries(d: &Driver) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["volumes", "snapshots"] {
        for e in std::fs::read_dir(d.dir.join("pool").join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().ends_with(".tmp") {
                out.push(p);
            }
        }
    }
    out
}

fn snapshot_request(name: &str, volume_id: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest { name: name.to_owned(), source_volume_id: volume_id.to_owned(), ..Default::default() }
}

/// CreateSnapshot, retried while it answers ABORTED (another operation on the volume holds
/// its lock: a correct answer to a concurrent call, which a CO retries).
async fn snapshot_retrying(d: &Driver, name: &str, volume_id: &str) -> Snapshot {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match d.controller().create_snapshot(snapshot_request(name, volume_id)).await {
            Ok(r) => {
                let s = r.into_inner().snapshot.expect("CreateSnapshot answered no snapshot");
                d.remember_snapshot(&s.snapshot_id);
                return s;
            }
            Err(s) if s.code() == Code::Aborted && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(s) => panic!("CreateSnapshot {name}: {:?} {}", s.code(), s.message()),
        }
    }
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The checksum of `file` in snapshot `snapshot_id`, as a user checks it: restore the snapshot
/// to a new volume, stage it, read the file.
async fn checksum_in_snapshot(d: &Driver, snapshot_id: &str, file: &str) -> String {
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let mut req = d.create_request(&unique("restore"), d.fs_volume_size(), cap.clone());
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: snapshot_id.to_owned() })),
    });
    let v = d.create_with(req).await;
    let staging = d.staging_dir(&unique("restored"));
    d.stage(&v.volume_id, &staging, &cap).await;
    let data = std::fs::read(staging.join(file)).unwrap_or_else(|e| panic!("reading {file} from the restored snapshot: {e}"));
    d.unstage(&v.volume_id, &staging).await;
    d.delete(&v.volume_id).await;
    sha(&data)
}

/// A started driver with the wrappers first in its PATH, and one staged volume.
async fn driver_with_staged_volume(extra_args: &[&str]) -> (Driver, Wrappers, Volume, PathBuf) {
    let setup = Setup::new();
    let w = wrappers(setup.dir());
    let mut setup = setup.env("PATH", &w.path);
    for a in extra_args {
        setup = setup.arg(a);
    }
    let d = setup.start().await;
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let v = d.create(&unique("frozen"), d.fs_volume_size(), cap.clone()).await;
    let staging = d.staging_dir("vol");
    d.stage(&v.volume_id, &staging, &cap).await;
    (d, w, v, staging)
}

/// Writes a file with fresh content into the volume, durably; returns its checksum.
fn write_data(staging: &Path, name: &str) -> String {
    let data: Vec<u8> = format!("{name} {}", unique("data")).into_bytes().into_iter().cycle().take(256 * 1024).collect();
    write_durably(&staging.join(name), &data);
    sha(&data)
}

#[tokio::test]
async fn a_snapshot_killed_at_any_step_is_thawed_at_restart_and_retried_cleanly() {
    let (mut d, w, v, staging) = driver_with_staged_volume(&[]).await;
    let _thaw = ThawOnDrop(staging.clone());
    // (where the driver is killed, whether the filesystem is frozen then)
    let steps = [("before-freeze", false), ("after-freeze", true), ("cp", true), ("after-unfreeze", false)];
    for (i, (step, frozen)) in steps.into_iter().enumerate() {
        let file = format!("data-{i}");
        let want = write_data(&staging, &file);
        let name = unique(&format!("snap-{step}"));
        w.set(&format!("pause-{step}"));
        let mut ctrl = d.controller();
        let req = snapshot_request(&name, &v.volume_id);
        let call = tokio::spawn(async move { ctrl.create_snapshot(req).await });
        w.wait_at(step).await;
        // The freeze is on record before it happens, and stays on record until after the thaw.
        assert_eq!(freeze_records(&d).len(), 1, "{step}: one freeze record while the snapshot is at this step");
        d.kill();
        w.clear(&format!("pause-{step}"));
        assert!(call.await.unwrap().is_err(), "{step}: the call cannot have succeeded, its driver was killed");

        d.restart().await;
        assert!(freeze_records(&d).is_empty(), "{step}: the restarted driver resolved the freeze record");
        let log = d.log_text();
        if frozen {
            assert!(log.contains("thawed a filesystem left frozen by an interrupted operation"), "{step}: no thaw logged");
        }
        assert!(writable_within(&staging, Duration::from_secs(10)), "{step}: writers to the volume hang after the restart");

        let s = snapshot_retrying(&d, &name, &v.volume_id).await;
        assert!(s.ready_to_use, "{step}");
        assert!(pool_temporaries(&d).is_empty(), "{step}: temporaries left: {:?}", pool_temporaries(&d));
        assert!(freeze_records(&d).is_empty(), "{step}: a freeze record outlived the snapshot");
        assert!(writable_within(&staging, Duration::from_secs(10)), "{step}: writers hang after the retried snapshot");
        assert_eq!(checksum_in_snapshot(&d, &s.snapshot_id, &file).await, want, "{step}: the snapshot's data");
    }
    d.unstage(&v.volume_id, &staging).await;
}

#[tokio::test]
async fn concurrent_snapshots_of_one_volume_share_one_freeze() {
    let (d, w, v, staging) = driver_with_staged_volume(&[]).await;
    let _thaw = ThawOnDrop(staging.clone());
    let want = write_data(&staging, "data");
    w.set("slow-cp");
    w.clear_log();
    let (a, b) = (unique("snap-a"), unique("snap-b"));
    let (sa, sb) = tokio::join!(snapshot_retrying(&d, &a, &v.volume_id), snapshot_retrying(&d, &b, &v.volume_id));
    w.clear("slow-cp");
    let log = w.log();
    // Never one thawing the other's freeze mid-copy: every copy runs between a freeze and the
    // thaw that follows it (shared: one freeze, two copies, one thaw; or one pair per copy).
    let mut frozen = false;
    let mut copying = 0;
    for line in &log {
        match line.split(' ').next().unwrap() {
            "freeze" => {
                assert!(!frozen, "frozen twice: {log:?}");
                frozen = true;
            }
            "unfreeze" => {
                assert!(frozen && copying == 0, "thawed while a copy ran: {log:?}");
                frozen = false;
            }
            "cp-start" => {
                assert!(frozen, "a copy ran unfrozen: {log:?}");
                copying += 1;
            }
            "cp-end" => copying -= 1,
            other => panic!("unexpected wrapper line {other:?}"),
        }
    }
    assert!(!frozen, "left frozen: {log:?}");
    assert_eq!(log.iter().filter(|l| l.starts_with("cp-start")).count(), 2, "{log:?}");
    assert!(freeze_records(&d).is_empty());
    assert!(writable_within(&staging, Duration::from_secs(10)), "writers hang after the snapshots");
    assert_eq!(checksum_in_snapshot(&d, &sa.snapshot_id, "data").await, want);
    assert_eq!(checksum_in_snapshot(&d, &sb.snapshot_id, "data").await, want);
    d.unstage(&v.volume_id, &staging).await;
}

#[tokio::test]
async fn a_filesystem_that_cannot_be_frozen_is_not_snapshotted() {
    let (d, w, v, staging) = driver_with_staged_volume(&[]).await;
    let thaw = ThawOnDrop(staging.clone());
    // Frozen by someone else (a backup tool): the driver's freeze fails with EBUSY.
    assert!(run(&real_program("fsfreeze"), &["--freeze", &path_str(&staging)]));
    let name = unique("snap");
    let r = d.controller().create_snapshot(snapshot_request(&name, &v.volume_id)).await;
    let st = expect_code(r, Code::FailedPrecondition, "CreateSnapshot of a filesystem that cannot be frozen");
    assert!(st.message().contains("cannot be frozen") && st.message().contains("already frozen"), "{}", st.message());
    assert!(!w.log().iter().any(|l| l.starts_with("cp-start")), "copied unfrozen: {:?}", w.log());
    assert!(!w.log().iter().any(|l| l.starts_with("unfreeze")), "thawed someone else's freeze: {:?}", w.log());
    assert!(freeze_records(&d).is_empty());
    assert!(pool_temporaries(&d).is_empty());
    drop(thaw);
    let want = write_data(&staging, "data");
    let s = snapshot_retrying(&d, &name, &v.volume_id).await;
    assert_eq!(checksum_in_snapshot(&d, &s.snapshot_id, "data").await, want);
    d.unstage(&v.volume_id, &staging).await;
}

#[tokio::test]
async fn a_freeze_left_open_past_the_deadline_reports_abnormal_until_a_thaw() {
    // A 2 s deadline: a record is overdue after 2 + 2 × 2 s (freeze, window, thaw).
    let (d, w, v, staging) = driver_with_staged_volume(&["--freeze-deadline", "2"]).await;
    let _thaw = ThawOnDrop(staging.clone());
    w.set("fail-unfreeze");
    let name = unique("snap");
    let r = d.controller().create_snapshot(snapshot_request(&name, &v.volume_id)).await;
    let st = expect_code(r, Code::Internal, "CreateSnapshot whose thaw fails");
    assert!(st.message().contains("still frozen") && st.message().contains("fsfreeze --unfreeze"), "{}", st.message());
    assert_eq!(freeze_records(&d).len(), 1, "the record stays while the filesystem may be frozen");
    let healthy = d.stats(&v.volume_id, &staging, &staging).await.volume_condition.expect("a condition");
    assert!(!healthy.abnormal, "not overdue yet: {healthy:?}");

    tokio::time::sleep(Duration::from_secs(7)).await;
    let c = d.stats(&v.volume_id, &staging, &staging).await.volume_condition.expect("a condition");
    assert!(c.abnormal && c.message.contains("frozen"), "NodeGetVolumeStats: {c:?}");
    let got = d.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await;
    let c = ok(got, "ControllerGetVolume").status.and_then(|s| s.volume_condition).expect("a condition");
    assert!(c.abnormal && c.message.contains("frozen"), "ControllerGetVolume: {c:?}");

    // The retry thaws what the record names, then snapshots normally.
    w.clear("fail-unfreeze");
    let s = snapshot_retrying(&d, &name, &v.volume_id).await;
    assert!(s.ready_to_use);
    assert!(freeze_records(&d).is_empty());
    let c = d.stats(&v.volume_id, &staging, &staging).await.volume_condition.expect("a condition");
    assert!(!c.abnormal, "after the thaw: {c:?}");
    assert!(writable_within(&staging, Duration::from_secs(10)), "writers hang after the thaw");
    d.unstage(&v.volume_id, &staging).await;
}
