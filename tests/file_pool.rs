//! The `file` pool through the real binary: pools that overlap refuse to start, a thick
//! volume's writes succeed while something else fills the pool's filesystem (and a thin one
//! reports it), and a frozen or vanished pool filesystem fails only its own pool's calls.
//!
//! Each test puts its pools on small loop-mounted ext4 filesystems inside the driver's temp
//! dir, which the harness unmounts and detaches afterwards; a frozen filesystem is thawed by a
//! guard that drops before the driver does.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::*;
use tonic::Code;

/// Makes an ext4 filesystem of `mib` MiB in an image under `dir` and loop-mounts it at
/// `dir/<name>` (no reserved blocks, so "full" means full for root too).
fn scratch_fs(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let image = dir.join(format!("{name}.img"));
    std::fs::File::create(&image).and_then(|f| f.set_len(mib << 20)).expect("create fs image");
    assert!(run("mkfs.ext4", &["-q", "-m", "0", &path_str(&image)]), "mkfs.ext4 {}", image.display());
    let mnt = dir.join(name);
    std::fs::create_dir(&mnt).expect("create mount point");
    assert!(run("mount", &["-o", "loop", &path_str(&image), &path_str(&mnt)]), "mount {}", image.display());
    mnt
}

fn file_pool(name: &str, path: &Path, extra: &str) -> String {
    format!("[[pool]]\nname = \"{name}\"\nkind = \"file\"\npath = \"{}\"\n{extra}", path.display())
}

/// The image file of a file-pool volume.
fn image_of(pool_dir: &Path, volume_id: &str) -> PathBuf {
    let local = holdfast::volume_id::VolumeId::parse(volume_id).expect("a holdfast volume id").local;
    pool_dir.join("volumes").join(format!("{local}.img"))
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).blocks() * 512
}

fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    st.blocks_available() * st.fragment_size()
}

/// The kernel log lines after the first `skip` ones.
fn kernel_log_since(skip: usize) -> Vec<String> {
    let out = Command::new("dmesg").output().expect("run dmesg");
    String::from_utf8_lossy(&out.stdout).lines().skip(skip).map(str::to_owned).collect()
}

fn kernel_log_len() -> usize {
    kernel_log_since(0).len()
}

/// Thaws a frozen filesystem when dropped (declare it after the Driver: it drops first).
struct Thaw(PathBuf);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("--unfreeze").arg(&self.0).status();
    }
}

/// The conditions ListVolumes reports, by volume id.
async fn conditions(d: &Driver) -> HashMap<String, VolumeCondition> {
    let resp = ok(d.controller().list_volumes(ListVolumesRequest::default()).await, "ListVolumes");
    resp.entries.into_iter().filter_map(|e| Some((e.volume?.volume_id, e.status?.volume_condition?))).collect()
}

fn request_in(d: &Driver, pool: &str, name: &str, bytes: i64, extra: &[(&str, &str)]) -> CreateVolumeRequest {
    let mut req = d.create_request(name, bytes, d.mount_cap(Mode::SingleNodeWriter));
    req.parameters = HashMap::from([("pool".to_owned(), pool.to_owned())]);
    for (k, v) in extra {
        req.parameters.insert((*k).to_owned(), (*v).to_owned());
    }
    req
}

#[test]
fn overlapping_pools_refuse_to_start_naming_both() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("real/sub")).unwrap();
    std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
    struct Case {
        name: &'static str,
        first: PathBuf,
        second: PathBuf,
    }
    let cases = [
        Case { name: "same directory", first: d.join("p"), second: d.join("p") },
        Case { name: "nested", first: d.join("p"), second: d.join("p/inner") },
        Case { name: "a symlink to the same directory", first: d.join("real"), second: d.join("link") },
        Case { name: "dot-dot", first: d.join("real/sub/.."), second: d.join("real") },
        Case { name: "nested through a symlink", first: d.join("link/sub"), second: d.join("real") },
    ];
    for (i, c) in cases.iter().enumerate() {
        let config = d.join(format!("case-{i}.toml"));
        std::fs::write(&config, file_pool("first", &c.first, "") + &file_pool("second", &c.second, "")).unwrap();
        let socket = d.join(format!("case-{i}.sock"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .arg("all-in-one")
            .args(["--endpoint", &format!("unix://{}", socket.display()), "--node-id", NODE_ID, "--log-format", "text"])
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(d.join(format!("state-{i}")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn holdfast");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for holdfast") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{}: holdfast kept running with overlapping pools", c.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().expect("holdfast output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!status.success(), "{}: exited {status}", c.name);
        assert!(stderr.contains("\"first\"") && stderr.contains("\"second\"") && stderr.contains("occupy"), "{}: {stderr}", c.name);
        assert!(!socket.exists(), "{}: no socket is served", c.name);
    }
    // Refused before any pool was opened: the nested pool's directories were never made.
    assert!(!d.join("p").exists(), "no pool directory was created");
}

/// A thick volume staged and mounted keeps its blocks: a trim inside does not give them back,
/// and after another process fills the pool's filesystem a write of the volume's whole free
/// space succeeds and syncs, with no error in the kernel log. A thin volume on the same full
/// filesystem reports an abnormal condition.
#[tokio::test]
async fn a_thick_volume_writes_while_the_pool_filesystem_is_full() {
    let setup = Setup::with_config(|dir| {
        let fs = scratch_fs(dir, "poolfs", 320);
        file_pool("thick", &fs.join("thick"), "") + &file_pool("thin", &fs.join("thin"), "provisioning = \"thin\"\n")
    });
    let poolfs = setup.dir().join("poolfs");
    let d = setup.start().await;
    let m = d.mounted_volume("thick", Mode::SingleNodeWriter).await;
    let image = image_of(&poolfs.join("thick"), &m.volume.volume_id);
    let size = m.volume.capacity_bytes as u64;
    assert!(allocated(&image) >= size, "a thick image is allocated at once: {} of {size}", allocated(&image));

    // Its loop device passes no discard, so a trim inside the volume cannot punch holes.
    let out = Command::new("losetup").args(["-n", "-O", "NAME", "-j"]).arg(&image).output().expect("losetup -j");
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dev_name = dev.strip_prefix("/dev/").unwrap_or_else(|| panic!("{image:?} is attached to {dev:?}"));
    let knob = std::fs::read_to_string(format!("/sys/block/{dev_name}/queue/discard_max_bytes")).expect("read discard limit");
    assert_eq!(knob.trim(), "0", "discard is off on {dev}");
    // A trim inside the volume must not punch holes into its image.
    let _ = Command::new("fstrim").arg("-v").arg(&m.target).status();
    assert!(run("sync", &["-f", &path_str(&m.target)]));
    assert!(allocated(&image) >= size, "fstrim gave blocks back: {} of {size} allocated", allocated(&image));

    let thin = d.create_with(request_in(&d, "thin", &unique("thin"), 32 * MIB, &[])).await;
    let thin_image = image_of(&poolfs.join("thin"), &thin.volume_id);
    assert!(allocated(&thin_image) < (1 << 20), "a thin image is sparse");
    let before = conditions(&d).await;
    assert!(!before[&thin.volume_id].abnormal, "{:?}", before[&thin.volume_id]);

    // Something else fills the pool's filesystem.
    let log_mark = kernel_log_len();
    let filler = poolfs.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=1M", "status=none"])
        .stderr(Stdio::null())
        .status();
    assert!(run("sync", &["-f", &path_str(&poolfs)]));
    assert!(free_bytes(&poolfs) < (1 << 20), "the pool filesystem is full: {} bytes free", free_bytes(&poolfs));

    let after = conditions(&d).await;
    let thin_cond = &after[&thin.volume_id];
    assert!(thin_cond.abnormal && thin_cond.message.contains("thin volume"), "{thin_cond:?}");
    assert!(!after[&m.volume.volume_id].abnormal, "the thick volume is still backed: {:?}", after[&m.volume.volume_id]);

    // The volume's whole free space, written and synced.
    let room = free_bytes(&m.target) >> 20;
    assert!(room > 32, "the volume has room to write: {room} MiB");
    let data = m.target.join("data");
    let dd = Command::new("dd")
        .args(["if=/dev/urandom", &format!("of={}", data.display()), "bs=1M", &format!("count={room}"), "conv=fsync", "status=none"])
        .output()
        .expect("run dd");
    assert!(dd.status.success(), "a write inside the thick volume failed: {}", String::from_utf8_lossy(&dd.stderr));
    assert!(run("sync", &["-f", &path_str(&m.target)]), "sync inside the thick volume failed");
    assert_eq!(std::fs::metadata(&data).unwrap().len(), room << 20);

    // No I/O error, no "potential data loss", on the volume's device or the pool's. A write
    // of zeroes the volume's device refuses (it has no discard, so no hole punching) falls back
    // to writing zero pages; the block layer logs the refusal, which loses nothing.
    let pool_dev = {
        let out = Command::new("findmnt").args(["-n", "-o", "SOURCE", "--target"]).arg(&poolfs).output().expect("findmnt");
        String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("/dev/").to_owned()
    };
    assert!(pool_dev.starts_with("loop"), "the pool filesystem is on {pool_dev:?}");
    let ours = |l: &str| {
        [dev_name, pool_dev.as_str()].iter().any(|d| {
            [format!("{d}:"), format!("dev {d},"), format!("({d})"), format!("device {d})"), format!("device {d}:")]
                .iter()
                .any(|p| l.contains(p.as_str()))
        })
    };
    let errors: Vec<String> = kernel_log_since(log_mark)
        .into_iter()
        .filter(|l| ours(l) && !(l.contains("operation not supported error") && l.contains("WRITE_ZEROES")))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("error") || l.contains("data loss") || l.contains("lost") || l.contains("warning")
        })
        .collect();
    assert!(errors.is_empty(), "the kernel logged errors: {errors:#?}");

    std::fs::remove_file(&filler).unwrap();
    d.tear_down(&m).await;
}

/// Two file pools, one on a frozen filesystem: the other pool, listing, capacity, snapshots,
/// Probe answer at once; a create on the frozen pool answers DEADLINE_EXCEEDED or UNAVAILABLE
/// within its deadline; after the thaw it works again.
#[tokio::test]
async fn a_frozen_pool_filesystem_fails_only_its_own_pool() {
    let setup = Setup::with_config(|dir| {
        let fs = scratch_fs(dir, "frozenfs", 64);
        file_pool("well", &dir.join("well"), "") + &file_pool("sick", &fs.join("sick"), "")
    });
    let frozenfs = setup.dir().join("frozenfs");
    let d = setup.start().await;
    let well = d.create_with(request_in(&d, "well", &unique("well"), 16 * MIB, &[])).await;
    let sick = d.create_with(request_in(&d, "sick", &unique("sick"), 16 * MIB, &[])).await;

    assert!(run("fsfreeze", &["--freeze", &path_str(&frozenfs)]));
    let _thaw = Thaw(frozenfs.clone());
    let prompt = Duration::from_secs(5);
    let timed = |what: &str, started: Instant| {
        let took = started.elapsed();
        assert!(took < prompt, "{what} took {took:?} with another pool's filesystem frozen");
    };

    let t = Instant::now();
    ok(d.identity().probe(ProbeRequest {}).await, "Probe");
    ok(d.identity().get_plugin_info(GetPluginInfoRequest {}).await, "GetPluginInfo");
    timed("Probe", t);

    let t = Instant::now();
    let other = d.create_with(request_in(&d, "well", &unique("well2"), 16 * MIB, &[])).await;
    timed("CreateVolume on the healthy pool", t);

    let t = Instant::now();
    let listed = conditions(&d).await;
    timed("ListVolumes", t);
    for id in [&well.volume_id, &sick.volume_id, &other.volume_id] {
        assert!(listed.contains_key(id), "ListVolumes lists {id}");
    }

    let t = Instant::now();
    for params in [HashMap::new(), HashMap::from([("pool".to_owned(), "well".to_owned())])] {
        let cap = ok(d.controller().get_capacity(GetCapacityRequest { parameters: params, ..Default::default() }).await, "GetCapacity");
        assert!(cap.available_capacity > 0, "{cap:?}");
    }
    timed("GetCapacity", t);

    let t = Instant::now();
    let snap = d.snapshot(&unique("snap"), &well.volume_id).await;
    timed("CreateSnapshot on the healthy pool", t);
    d.delete_snapshot(&snap.snapshot_id).await;

    // The frozen pool's own create fails, precisely and within its deadline.
    let name = unique("frozen");
    let t = Instant::now();
    let res = d.controller().create_volume(request_in(&d, "sick", &name, 16 * MIB, &[])).await;
    let took = t.elapsed();
    let code = code_of(&res);
    assert!(matches!(code, Code::DeadlineExceeded | Code::Unavailable), "a create on the frozen pool answered {code:?}: {res:?}");
    assert!(took < Duration::from_secs(20), "a create on the frozen pool took {took:?}");
    if let Err(s) = &res {
        assert!(s.message().contains("pool:sick"), "the error names the hung pool: {}", s.message());
    }
    // Still prompt for everyone else while that call is stuck in the kernel.
    let t = Instant::now();
    ok(d.identity().probe(ProbeRequest {}).await, "Probe");
    conditions(&d).await;
    timed("Probe and ListVolumes after a stuck call", t);

    drop(_thaw);
    // The stuck call finishes once thawed; a retry of the same create then succeeds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let made = loop {
        match d.controller().create_volume(request_in(&d, "sick", &name, 16 * MIB, &[])).await {
            Ok(r) => break r.into_inner().volume.expect("a volume"),
            Err(s) if Instant::now() < deadline => {
                eprintln!("retry after thaw: {:?} {}", s.code(), s.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => panic!("create after thaw still fails: {:?} {}", s.code(), s.message()),
        }
    };
    d.delete(&made.volume_id).await;
}

/// Two file pools, one whose directory has vanished (its filesystem unmounted, say): creates on
/// the other pool keep working, and a create on the vanished one answers UNAVAILABLE at once,
/// naming the missing directory.
#[tokio::test]
async fn a_vanished_pool_directory_is_unavailable_and_the_other_pool_works() {
    let setup = Setup::with_config(|dir| file_pool("well", &dir.join("well"), "") + &file_pool("gone", &dir.join("gone"), ""));
    let gone = setup.dir().join("gone");
    let d = setup.start().await;
    std::fs::rename(&gone, setup_sibling(&gone)).expect("move the pool directory away");

    let t = Instant::now();
    let res = d.controller().create_volume(request_in(&d, "gone", &unique("gone"), 16 * MIB, &[])).await;
    let status = expect_code(res, Code::Unavailable, "CreateVolume on a vanished pool");
    assert!(status.message().contains("is missing"), "{}", status.message());
    let v = d.create_with(request_in(&d, "well", &unique("well"), 16 * MIB, &[])).await;
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    d.delete(&v.volume_id).await;
}

fn setup_sibling(p: &Path) -> PathBuf {
    p.with_file_name(format!("{}-moved", p.file_name().unwrap().to_string_lossy()))
}

/// The `provisioning` StorageClass parameter: `thin` makes a sparse image, `thick` (or nothing,
/// on a default pool) an allocated one, anything else is INVALID_ARGUMENT naming it.
#[tokio::test]
async fn the_provisioning_parameter_chooses_and_is_checked() {
    let setup = Setup::with_config(|dir| file_pool("p", &dir.join("p"), ""));
    let pool_dir = setup.dir().join("p");
    let d = setup.start().await;
    let thick = d.create_with(request_in(&d, "p", &unique("thick"), 16 * MIB, &[("provisioning", "thick")])).await;
    let default = d.create_with(request_in(&d, "p", &unique("default"), 16 * MIB, &[])).await;
    let thin = d.create_with(request_in(&d, "p", &unique("thin"), 16 * MIB, &[("provisioning", "thin")])).await;
    assert!(allocated(&image_of(&pool_dir, &thick.volume_id)) >= 16 << 20);
    assert!(allocated(&image_of(&pool_dir, &default.volume_id)) >= 16 << 20, "thick by default");
    assert!(allocated(&image_of(&pool_dir, &thin.volume_id)) < 1 << 20, "thin is sparse");
    let res = d.controller().create_volume(request_in(&d, "p", &unique("bad"), 16 * MIB, &[("provisioning", "lazy")])).await;
    let status = expect_code(res, Code::InvalidArgument, "provisioning=lazy");
    assert!(status.message().contains("provisioning=\"lazy\""), "{}", status.message());
    for v in [thick, default, thin] {
        d.delete(&v.volume_id).await;
    }
}

/// GetCapacity offers only what a create can take: volumes are made in whole MiB, so the
/// capacity answered is a whole number of MiB even when the free space of the pool's
/// filesystem is not, and a thick volume of exactly that size is made (the scheduler places a
/// claim of "all of it" on the strength of that answer).
#[tokio::test]
async fn the_capacity_answered_can_be_taken_whole() {
    let setup = Setup::with_config(|dir| {
        let fs = scratch_fs(dir, "poolfs", 96);
        // A filler that leaves the free space off a MiB boundary.
        let filler = fs.join("filler");
        std::fs::write(&filler, vec![7u8; (3 << 20) + 12 * 1024]).expect("write the filler");
        std::fs::File::open(&filler).and_then(|f| f.sync_all()).expect("sync the filler");
        file_pool("whole", &fs.join("pool"), "")
    });
    let d = setup.start().await;
    let params = HashMap::from([("pool".to_owned(), "whole".to_owned())]);
    let cap = ok(d.controller().get_capacity(GetCapacityRequest { parameters: params.clone(), ..Default::default() }).await, "GetCapacity");
    let room = cap.available_capacity;
    assert!(room > 0, "the pool offers nothing: {cap:?}");
    assert_eq!(room % (1 << 20), 0, "GetCapacity answered {room} bytes, not a whole number of MiB");
    let v = d.create_with(request_in(&d, "whole", &unique("all-of-it"), room, &[])).await;
    assert_eq!(v.capacity_bytes, room, "a volume of all the room offered");
    let after = ok(d.controller().get_capacity(GetCapacityRequest { parameters: params, ..Default::default() }).await, "GetCapacity");
    assert!(after.available_capacity < (1 << 20), "after taking all the room, {} bytes are still offered", after.available_capacity);
    d.delete(&v.volume_id).await;
}

// issue 12: group snapshots
/// Removes one member snapshot's files from a file pool, as a driver killed in the middle of
/// DeleteVolumeGroupSnapshot leaves the group: the other members are still there.
fn drop_member(pool_dir: &Path, snapshot_id: &str) {
    let local = holdfast::volume_id::VolumeId::parse(snapshot_id).expect("a holdfast snapshot id").local;
    for ext in ["json", "img"] {
        std::fs::remove_file(pool_dir.join("snapshots").join(format!("{local}.{ext}"))).expect("remove a member's file");
    }
}

#[tokio::test]
async fn a_half_deleted_group_is_retaken_by_a_retry_and_deleted_by_a_delete() {
    let mut d = Setup::with_config(|dir| file_pool("grp", &dir.join("grp"), "")).start().await;
    let pool_dir = d.dir.join("grp");
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let a = d.create(&unique("ga"), 16 * MIB, cap.clone()).await;
    let b = d.create(&unique("gb"), 16 * MIB, cap.clone()).await;
    let req = CreateVolumeGroupSnapshotRequest {
        name: unique("g"),
        source_volume_ids: vec![a.volume_id.clone(), b.volume_id.clone()],
        ..Default::default()
    };
    let take = |d: &Driver| {
        let (mut c, r) = (d.group(), req.clone());
        async move { ok(c.create_volume_group_snapshot(r).await, "CreateVolumeGroupSnapshot").group_snapshot.expect("no group") }
    };
    let get = |id: &str| GetVolumeGroupSnapshotRequest { group_snapshot_id: id.to_owned(), ..Default::default() };
    let first = take(&d).await;
    d.remember_group(&first.group_snapshot_id);
    assert_eq!(first.snapshots.len(), 2);

    // Cut short: one member gone. Not answered as a complete group any more.
    drop_member(&pool_dir, &first.snapshots[0].snapshot_id);
    let half =
        ok(d.group().get_volume_group_snapshot(get(&first.group_snapshot_id)).await, "GetVolumeGroupSnapshot").group_snapshot.unwrap();
    assert_eq!(half.snapshots.len(), 1);
    assert!(!half.ready_to_use, "a group missing a member is not ready");
    // A create retry takes the group again, whole, at a new point in time (and a new id).
    let again = take(&d).await;
    d.remember_group(&again.group_snapshot_id);
    assert_ne!(again.group_snapshot_id, first.group_snapshot_id);
    assert_eq!(again.snapshots.len(), 2);
    assert!(again.ready_to_use);
    expect_code(d.group().get_volume_group_snapshot(get(&first.group_snapshot_id)).await, Code::NotFound, "the half group is gone");

    // Killed in the middle of a delete, then restarted: the rest is still deletable.
    drop_member(&pool_dir, &again.snapshots[1].snapshot_id);
    d.kill();
    d.restart().await;
    let listed: Vec<String> = again.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
    let del =
        DeleteVolumeGroupSnapshotRequest { group_snapshot_id: again.group_snapshot_id.clone(), snapshot_ids: listed, ..Default::default() };
    ok(d.group().delete_volume_group_snapshot(del).await, "DeleteVolumeGroupSnapshot of a half-deleted group");
    d.delete_group(&first.group_snapshot_id).await;
    expect_code(d.group().get_volume_group_snapshot(get(&again.group_snapshot_id)).await, Code::NotFound, "a deleted group");
    let left = d.list_snapshots(ListSnapshotsRequest::default()).await;
    assert!(left.is_empty(), "snapshots left: {left:?}");
    d.delete(&a.volume_id).await;
    d.delete(&b.volume_id).await;
}
