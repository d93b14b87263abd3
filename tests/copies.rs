//! Copies finish (issue 10 items 4 and 6), on the host with the real binary and a `file` pool:
//! a clone whose copy outlives the client's deadline keeps running detached, a retry waits on
//! it (never a second copy) and gets the volume with the source's data; a driver killed
//! mid-copy runs it again at start-up and leaves no temporary; a clone records the size of
//! what it really copied. The copy is slowed by a wrapper `cp`, first in the driver's PATH.
//!
//! Needs root (loop devices, mounts).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::*;
use sha2::{Digest, Sha256};
use tonic::Code;

/// How long a test waits for something the driver does in the background.
const WAIT: Duration = Duration::from_secs(60);

/// The wrapper `cp` and its control directory: each call appends `cp-start` to `ctl/log`,
/// then sleeps `ctl/delay` seconds (when that file exists) before running the real `cp`. It
/// keeps going when its driver is killed, as an orphaned `cp` would.
struct SlowCp {
    ctl: PathBuf,
    path: String,
}

fn slow_cp(dir: &Path) -> SlowCp {
    let (bin, ctl) = (dir.join("bin"), dir.join("ctl"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&ctl).unwrap();
    let out = std::process::Command::new("sh").args(["-c", "command -v cp"]).output().expect("sh");
    let real = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(real.starts_with('/'), "cp is not installed");
    let script = format!(
        "#!/bin/sh\nctl={}\necho cp-start >> \"$ctl/log\"\n[ -e \"$ctl/delay\" ] && sleep \"$(cat \"$ctl/delay\")\"\nexec {real} \"$@\"\n",
        ctl.display()
    );
    let p = bin.join("cp");
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    SlowCp { ctl, path: format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()) }
}

impl SlowCp {
    fn delay(&self, secs: u32) {
        std::fs::write(self.ctl.join("delay"), secs.to_string()).unwrap();
    }
    fn no_delay(&self) {
        let _ = std::fs::remove_file(self.ctl.join("delay"));
    }
    /// How many copies were started.
    fn started(&self) -> usize {
        std::fs::read_to_string(self.ctl.join("log")).unwrap_or_default().lines().filter(|l| *l == "cp-start").count()
    }
    async fn wait_started(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.started() < n {
            assert!(Instant::now() < deadline, "copy {n} never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Temporaries anywhere in the pool (`.<local>.img.tmp` and the like).
fn pool_temporaries(d: &Driver) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["volumes", "snapshots"] {
        let Ok(entries) = std::fs::read_dir(d.dir.join("pool").join(sub)) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().ends_with(".tmp") {
                out.push(p);
            }
        }
    }
    out
}

/// The backing image of a volume of the test's pool: the file the loop device serves.
fn image_of(d: &Driver, volume_id: &str) -> PathBuf {
    // The id names the local name among its fields (docs/design.md); whichever has an image.
    let dir = d.dir.join("pool/volumes");
    let found = volume_id.split(':').map(|f| dir.join(format!("{f}.img"))).find(|p| p.exists());
    found.unwrap_or_else(|| panic!("no image in {} for volume {volume_id}", dir.display()))
}

/// A driver with the slow `cp` first in its PATH, and a filesystem volume holding one file
/// (unstaged again, so the copy needs no freeze). Returns the file's checksum.
async fn driver_with_source() -> (Driver, SlowCp, Volume, String) {
    let setup = Setup::new();
    let cp = slow_cp(setup.dir());
    let d = setup.env("PATH", &cp.path).start().await;
    let m = d.mounted_volume("source", Mode::SingleNodeWriter).await;
    let data: Vec<u8> = unique("source data").into_bytes().into_iter().cycle().take(512 * 1024).collect();
    write_durably(&m.target.join("data"), &data);
    d.unpublish(&m.volume.volume_id, &m.target).await;
    d.unstage(&m.volume.volume_id, &m.staging).await;
    (d, cp, m.volume, sha(&data))
}

fn clone_request(d: &Driver, name: &str, source: &Volume) -> CreateVolumeRequest {
    let mut req = d.create_request(name, source.capacity_bytes, d.mount_cap(Mode::SingleNodeWriter));
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: source.volume_id.clone() })),
    });
    req
}

/// CreateVolume with a client deadline of `deadline`.
async fn create_within(d: &Driver, req: &CreateVolumeRequest, deadline: Duration) -> Result<Volume, tonic::Status> {
    let mut r = tonic::Request::new(req.clone());
    r.set_timeout(deadline);
    let v = d.controller().create_volume(r).await?.into_inner().volume.expect("CreateVolume answered no volume");
    d.adopt_leftovers_of(std::slice::from_ref(&v.volume_id), &[]);
    Ok(v)
}

/// The checksum of the file `data` in volume `v`, as a user checks it: stage it, read it.
async fn checksum_in(d: &Driver, v: &Volume, name: &str) -> String {
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let staging = d.staging_dir(name);
    d.stage(&v.volume_id, &staging, &cap).await;
    let data = std::fs::read(staging.join("data")).unwrap_or_else(|e| panic!("reading the copied file: {e}"));
    d.unstage(&v.volume_id, &staging).await;
    sha(&data)
}

#[tokio::test]
async fn a_clone_slower_than_the_client_deadline_finishes_and_a_retry_gets_it() {
    let (d, cp, source, want) = driver_with_source().await;
    cp.delay(4);
    let req = clone_request(&d, &unique("slow-clone"), &source);

    // The client gives up after 1 s; the copy goes on.
    let first = create_within(&d, &req, Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(first.code(), Code::Aborted | Code::DeadlineExceeded), "{:?} {}", first.code(), first.message());
    cp.wait_started(1).await;
    // A retry while it runs finds it: ABORTED saying so, and no second copy.
    let retry = create_within(&d, &req, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(retry.code(), Code::Aborted, "{}", retry.message());
    assert!(retry.message().contains("in progress") && retry.message().contains("% of"), "{}", retry.message());
    // Another request for the same name while it runs: ABORTED too, not a second copy.
    let mut other = req.clone();
    other.capacity_range = Some(CapacityRange { required_bytes: source.capacity_bytes + 16 * MIB, limit_bytes: 0 });
    let busy = create_within(&d, &other, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{}", busy.message());
    assert!(!pool_temporaries(&d).is_empty(), "the copy runs into a temporary");

    // A retry with time enough waits for the copy and gets the volume.
    let v = create_within(&d, &req, Duration::from_secs(30)).await.expect("the retry gets the finished copy");
    assert_eq!(cp.started(), 1, "exactly one copy ran for three requests");
    assert!(pool_temporaries(&d).is_empty(), "temporaries outlived the copy: {:?}", pool_temporaries(&d));
    let again = create_within(&d, &req, Duration::from_secs(5)).await.expect("a retry after it is done");
    assert_eq!(again.volume_id, v.volume_id);
    assert_eq!(cp.started(), 1);
    cp.no_delay();
    assert_eq!(checksum_in(&d, &v, "clone").await, want, "the clone holds the source's data");
}

#[tokio::test]
async fn a_clone_killed_mid_copy_runs_again_at_start_up_and_leaves_no_temporary() {
    let (mut d, cp, source, want) = driver_with_source().await;
    cp.delay(3);
    let req = clone_request(&d, &unique("killed-clone"), &source);
    let first = create_within(&d, &req, Duration::from_millis(500)).await.unwrap_err();
    assert!(matches!(first.code(), Code::Aborted | Code::DeadlineExceeded), "{:?} {}", first.code(), first.message());
    cp.wait_started(1).await;
    assert!(!pool_temporaries(&d).is_empty(), "the copy runs into a temporary");
    assert_eq!(std::fs::read_dir(d.dir.join("state/copies")).unwrap().count(), 1, "the running copy is on record");

    d.kill9();
    d.restart().await;
    // Started again by the driver itself, before any retry.
    cp.wait_started(2).await;
    assert!(d.log_text().contains("restarted a copy left unfinished by a killed driver"), "{}", d.log_text());
    let v = create_within(&d, &req, Duration::from_secs(30)).await.expect("the retry gets the restarted copy");
    assert_eq!(cp.started(), 2, "the restart ran the copy once more, the retry waited on it");
    assert_eq!(std::fs::read_dir(d.dir.join("state/copies")).unwrap().count(), 0, "the record goes with the copy");
    // The killed driver's orphaned cp wrote into its own, unlinked, temporary: once it is done
    // too, nothing is left.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(pool_temporaries(&d).is_empty(), "temporaries left: {:?}", pool_temporaries(&d));
    cp.no_delay();
    assert_eq!(checksum_in(&d, &v, "clone").await, want, "the clone holds the source's data");
}

#[tokio::test]
async fn a_clone_of_a_source_being_expanded_records_the_size_it_copied() {
    let (d, cp, source, _) = driver_with_source().await;
    cp.delay(2);
    let req = clone_request(&d, &unique("grown-clone"), &source);
    let clone = {
        let (d2, req2) = (d.controller(), req.clone());
        tokio::spawn(async move {
            let mut c = d2;
            let mut r = tonic::Request::new(req2);
            r.set_timeout(Duration::from_secs(30));
            c.create_volume(r).await
        })
    };
    cp.wait_started(1).await;
    let grow = ControllerExpandVolumeRequest {
        volume_id: source.volume_id.clone(),
        capacity_range: Some(CapacityRange { required_bytes: source.capacity_bytes + 32 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    let grown = d.controller().controller_expand_volume(grow).await;
    // Serialised with the copy (ABORTED), or run beside it: either way the record must match.
    assert!(grown.is_ok() || code_of(&grown) == Code::Aborted, "{grown:?}");
    let v = clone.await.unwrap().expect("the clone").into_inner().volume.unwrap();
    d.adopt_leftovers_of(std::slice::from_ref(&v.volume_id), &[]);
    let image = std::fs::metadata(image_of(&d, &v.volume_id)).unwrap().len();
    assert_eq!(v.capacity_bytes as u64, image, "the clone's capacity is the size of its device");
    assert!(v.capacity_bytes >= source.capacity_bytes);
    let listed = d.list_volume_ids(0).await;
    assert!(listed.contains(&v.volume_id));
    let got = d.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await;
    if let Ok(got) = got {
        assert_eq!(got.into_inner().volume.unwrap().capacity_bytes, v.capacity_bytes, "the record says the same");
    }
}

#[tokio::test]
async fn deleting_a_volume_while_it_is_being_copied_is_aborted() {
    let (d, cp, source, want) = driver_with_source().await;
    // A first clone, to learn the id the copy of this name gets.
    let req = clone_request(&d, &unique("deleted-clone"), &source);
    let v = create_within(&d, &req, Duration::from_secs(30)).await.unwrap();
    d.delete(&v.volume_id).await;
    cp.delay(3);
    let first = create_within(&d, &req, Duration::from_millis(500)).await.unwrap_err();
    assert!(matches!(first.code(), Code::Aborted | Code::DeadlineExceeded), "{:?} {}", first.code(), first.message());
    cp.wait_started(2).await;
    // Whatever id the new copy gets, deleting the old one's id must not remove its half-copy,
    // and a delete of the copy's own id is refused while it runs.
    let deleted = d.controller().delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }).await;
    let again = create_within(&d, &req, Duration::from_secs(30)).await.expect("the copy finishes");
    if again.volume_id == v.volume_id {
        assert_eq!(code_of(&deleted), Code::Aborted, "a delete of the volume being copied: {deleted:?}");
    }
    assert!(pool_temporaries(&d).is_empty(), "temporaries left: {:?}", pool_temporaries(&d));
    cp.no_delay();
    assert_eq!(checksum_in(&d, &again, "clone").await, want, "the clone is whole");
}

#[tokio::test]
async fn a_snapshot_slower_than_the_client_deadline_finishes_and_a_retry_gets_it() {
    let (d, cp, source, want) = driver_with_source().await;
    cp.delay(3);
    let req = CreateSnapshotRequest { name: unique("slow-snap"), source_volume_id: source.volume_id.clone(), ..Default::default() };
    let snapshot_within = |deadline: Duration| {
        let (mut c, req) = (d.controller(), req.clone());
        async move {
            let mut r = tonic::Request::new(req);
            r.set_timeout(deadline);
            c.create_snapshot(r).await.map(|r| r.into_inner().snapshot.expect("CreateSnapshot answered no snapshot"))
        }
    };
    let first = snapshot_within(Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(first.code(), Code::Aborted | Code::DeadlineExceeded), "{:?} {}", first.code(), first.message());
    cp.wait_started(1).await;
    let retry = snapshot_within(Duration::from_millis(500)).await.unwrap_err();
    assert_eq!(retry.code(), Code::Aborted, "{}", retry.message());
    assert!(retry.message().contains("in progress"), "{}", retry.message());
    let s = snapshot_within(Duration::from_secs(30)).await.expect("the retry gets the finished snapshot");
    d.remember_snapshot(&s.snapshot_id);
    assert!(s.ready_to_use);
    assert_eq!(cp.started(), 1, "exactly one copy ran for three requests");
    assert!(pool_temporaries(&d).is_empty(), "temporaries outlived the copy: {:?}", pool_temporaries(&d));

    // Its content, as a user checks it: restored to a new volume.
    cp.no_delay();
    let mut restore = d.create_request(&unique("restored"), source.capacity_bytes, d.mount_cap(Mode::SingleNodeWriter));
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: s.snapshot_id.clone() })),
    });
    let v = create_within(&d, &restore, Duration::from_secs(30)).await.expect("restore");
    assert_eq!(checksum_in(&d, &v, "restored").await, want, "the snapshot holds the source's data");
}

/// The harness retries a copy still running (`until_copied`) whichever topology answers: through
/// the controller, the agent's answer comes with its node first. Found in the VM: under load a
/// thin LVM snapshot outlasted the call's wait, and three conformance tests against controller +
/// agent failed on "agent of node conformance-node: copy of snapshot … in progress", which
/// all-in-one answers without the prefix (and the harness retried).
#[test]
fn a_copy_in_progress_is_recognised_from_either_topology() {
    let theirs =
        "copy of snapshot \"s-1\" in progress (running for 7 s, since 1796197664 s after the epoch); retry the same request to wait for it";
    assert!(copy_in_progress(&tonic::Status::aborted(theirs)), "all-in-one's answer");
    assert!(copy_in_progress(&tonic::Status::aborted(format!("agent of node conformance-node: {theirs}"))), "the controller's answer");
    assert!(!copy_in_progress(&tonic::Status::unavailable(theirs)), "another code");
    let other = "snapshot s-1 is being copied for another request; retry when it has finished";
    assert!(!copy_in_progress(&tonic::Status::aborted(other)), "another request's copy");
    assert!(!copy_in_progress(&tonic::Status::aborted(format!("agent of node n: {other}"))), "another request's copy, routed");
}
