//! Hostile and careless callers (issue 8), host-only cases: each test builds `file` pools of
//! its own (often on a small loop-mounted filesystem of its own, to fill or freeze it) and
//! needs loop devices, mkfs, fsfreeze and python3 with grpcio on the host. A frozen pool
//! filesystem, overlapping pools, kill -9 at each step of a snapshot, failed stages and
//! expansions that must not leave loop devices, thick provisioning under a full pool
//! filesystem, huge and multi-line ids, the socket directory's mode, a python client with
//! default options, and allowed path prefixes. The cases that hold on any pool kind are in
//! tests/hostile.rs.
//!
//! Every mount, loop device and freeze a test makes is undone by a guard (tests/common/
//! hostile.rs: thaw first, then unmount, then detach), so a failing test leaves nothing behind;
//! tests only ever touch paths under their own temp dirs.

mod common;
#[path = "common/hostile.rs"]
mod hostile_guards;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::*;
use hostile_guards::*;
use tonic::Code;

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
                    .create_snapshot(CreateSnapshotRequest { name: unique("long-id"), source_volume_id: id.clone(), ..Default::default() })
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
async fn send_hostile_id(d: &Driver, id: &str) -> Vec<(&'static str, tonic::Status)> {
    let staging = d.staging_dir("hostile-id");
    let mut errs = Vec::new();
    let r = d.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: id.to_owned() }).await;
    errs.extend(r.err().map(|s| ("ControllerGetVolume", s)));
    let req = NodeUnstageVolumeRequest { volume_id: id.to_owned(), staging_target_path: path_str(&staging) };
    errs.extend(d.node().node_unstage_volume(req).await.err().map(|s| ("NodeUnstageVolume", s)));
    let req = NodeGetVolumeStatsRequest { volume_id: id.to_owned(), volume_path: path_str(&staging), staging_target_path: String::new() };
    errs.extend(d.node().node_get_volume_stats(req).await.err().map(|s| ("NodeGetVolumeStats", s)));
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
    for (call, s) in send_hostile_id(&d, &id).await {
        if s.message().contains(['\n', '\r', '\x1b']) {
            wrong.push(format!("the answer to {call} carries a raw control character: {:?}", s.message()));
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
    let d = Setup::with_own_pool(&cfg, "conformance", "file").start_with(opts).await;
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
    let parent = setup.temp_dir().join("run").join("holdfast");
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
    let out = Command::new(common::python()).arg("-c").arg(script).arg(path_str(&d.socket)).arg(NODE_ID).output().expect("run python3");
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
    let d = Setup::with_own_pool(&cfg, "conformance", "file").start().await;
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
    let d = Setup::with_own_pool(&cfg, "conformance", "file").start().await;
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
    let mut d = Setup::with_own_pool(&cfg, "conformance", "file").start().await;
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

    first = Some(Setup::with_own_pool(&cfg, "conformance", "file").start_with(opts.clone()).await);
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

    second = Some(Setup::with_own_pool(&cfg, "conformance", "file").start_with(opts).await);
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
