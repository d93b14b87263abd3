//! The driver as a process, seen from outside: clients other than tonic's (grpcio for Python
//! with default options), the socket's permissions under a careless umask, bounded and
//! escaped output for hostile ids, and a hung pool that must not stall Identity, the other
//! pools or the shutdown. Each test starts the real `holdfast all-in-one` with its own config.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holdfast::proto::controller_client::ControllerClient;
use holdfast::proto::identity_client::IdentityClient;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use holdfast::proto::*;
use tonic::Code;
use tonic::transport::Channel;

/// A `holdfast all-in-one` started by a test, stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Proc {
    /// Starts the driver on `socket` with `config`, under `umask` (through the shell, as an
    /// init script would), with extra arguments.
    fn start(dir: &Path, socket: &Path, config: &Path, umask: &str, extra: &[&str]) -> Proc {
        let log = dir.join("driver.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("umask {umask} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_holdfast"))
            .arg("all-in-one")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "runtime-node", "--config"])
            .arg(config)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .env("HOLDFAST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd.spawn().expect("spawn holdfast");
        Proc { child: Some(child), socket: socket.to_owned(), log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the socket exists and accepts a connection.
    async fn connect(&mut self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("holdfast exited with {status}; its log:\n{}", self.log_text());
            }
            if self.socket.exists() {
                if let Ok(ch) = holdfast::endpoint::connect(&format!("unix://{}", self.socket.display())).await {
                    return ch;
                }
            }
            assert!(Instant::now() < deadline, "holdfast did not listen within 15 s; its log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn sigterm(&self) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.sigterm();
        if self.wait_exit(Duration::from_secs(15)).is_none() {
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
            }
            // Never block forever on a process stuck in the kernel.
            let _ = self.wait_exit(Duration::from_secs(15));
        }
        if std::thread::panicking() {
            eprintln!("----- holdfast log -----\n{}----- end -----", self.log_text());
        }
    }
}

fn file_pools_config(dir: &Path, pools: &[(&str, &Path)]) -> PathBuf {
    let mut text = String::new();
    for (name, path) in pools {
        text.push_str(&format!("[[pool]]\nname = \"{name}\"\nkind = \"file\"\npath = \"{}\"\n\n", path.display()));
    }
    let config = dir.join("holdfast.toml");
    std::fs::write(&config, text).unwrap();
    config
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("holdfast-runtime-").tempdir().unwrap()
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

fn create_request(name: &str, pool: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: 64 << 20, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap()],
        parameters: [("pool".to_owned(), pool.to_owned())].into(),
        ..Default::default()
    }
}

/// Makes the Python stubs from proto/csi.proto into `out` (grpcio-tools, installed by
/// scripts/install-deps); a missing grpcio is a failure, not a skip.
fn python_stubs(out: &Path) {
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let res = Command::new(common::python())
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.display()))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg(proto.join("csi.proto"))
        .output()
        .expect("run python3 (install it with scripts/install-deps)");
    assert!(
        res.status.success(),
        "generating Python stubs failed (run scripts/install-deps to get grpcio-tools): {}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_client_with_default_options_is_answered() {
    let tmp = tempdir();
    let pool = tmp.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    let config = file_pools_config(tmp.path(), &[("py", &pool)]);
    let socket = tmp.path().join("plugin").join("csi.sock");
    let mut driver = Proc::start(tmp.path(), &socket, &config, "022", &[]);
    driver.connect().await;
    python_stubs(tmp.path());

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/csi_client.py");
    let name = common::unique("py");
    let out = Command::new(common::python()).arg(&script).arg(tmp.path()).arg(&socket).args(["py", &name]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the client failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let answers: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let answer = |call: &str| answers.iter().find(|a| a["call"] == call).unwrap_or_else(|| panic!("no answer to {call}: {stdout}"));

    assert_eq!(answer("Probe")["code"], "OK", "{stdout}");
    assert_eq!(answer("Probe")["value"], true);
    assert_eq!(answer("GetPluginInfo")["code"], "OK");
    assert_eq!(answer("GetPluginInfo")["value"], "csi.holdfast.dev");
    let created = answer("CreateVolume");
    assert_eq!(created["code"], "OK", "{stdout}");
    let id = created["value"].as_str().unwrap();
    assert!(id.starts_with("file:runtime-node:py:"), "{id}");
    assert_eq!(answer("DeleteVolume")["code"], "OK", "{stdout}");
    let long = answer("ValidateVolumeCapabilities(10 KB id)");
    assert_eq!(long["code"], "NOT_FOUND", "{stdout}");
    let details = long["details"].as_str().unwrap();
    assert!(details.len() < 1024, "{} bytes", details.len());
    assert!(details.contains("10247 bytes in all"), "the full length is noted: {details}");

    // The volume is really gone, as seen from the Rust client too.
    let ch = driver.connect().await;
    let r = ControllerClient::new(ch)
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_and_its_new_directory_are_private_under_umask_000() {
    let tmp = tempdir();
    let pool = tmp.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    let config = file_pools_config(tmp.path(), &[("p", &pool)]);
    let parent = tmp.path().join("run").join("holdfast");
    let socket = parent.join("csi.sock");
    let mut driver = Proc::start(tmp.path(), &socket, &config, "000", &[]);

    // Watch the directories as the driver creates and binds: every socket that ever appears
    // in them must already be 0660 or stricter, every directory 0750 or stricter.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket within 15 s: {}", driver.log_text());
        for dir in [tmp.path().join("run"), parent.clone()] {
            seen.extend(looser_than_allowed(&dir));
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        seen.extend(looser_than_allowed(&e.path()));
                    }
                }
            }
        }
    }
    let ch = driver.connect().await;
    assert!(seen.is_empty(), "reachable with loose permissions: {seen:?}");
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&socket), 0o660);
    assert_eq!(mode(&parent), 0o750, "created 0750 whatever the umask");
    assert_eq!(mode(&tmp.path().join("run")), 0o750);
    let left: Vec<_> = std::fs::read_dir(&parent).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("csi.sock")], "the private bind directory is gone");
    let r = IdentityClient::new(ch).probe(ProbeRequest {}).await.unwrap();
    assert_eq!(r.into_inner().ready, Some(true));
}

/// Entries of `dir` (and `dir` itself) reachable with looser permissions than allowed:
/// sockets beyond 0660, directories beyond 0750.
fn looser_than_allowed(dir: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let check = |p: &Path, bad: &mut Vec<String>| {
        let Ok(m) = std::fs::symlink_metadata(p) else { return };
        let mode = m.permissions().mode() & 0o777;
        if m.file_type().is_socket() && mode & !0o660 != 0 {
            bad.push(format!("socket {} {mode:o}", p.display()));
        }
        if m.is_dir() && mode & !0o750 != 0 {
            bad.push(format!("directory {} {mode:o}", p.display()));
        }
    };
    check(dir, &mut bad);
    // What lies in a directory only its owner may search (the driver's 0700 bind directory)
    // is reachable by nobody else, whatever its own mode: the socket is 0777 there for an
    // instant between bind and chmod, by design.
    let searchable = std::fs::symlink_metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o011 != 0);
    if !searchable {
        return bad;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            check(&e.path(), &mut bad);
        }
    }
    bad
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_ids_give_short_answers_and_single_line_logs() {
    for format in ["text", "json"] {
        let tmp = tempdir();
        let pool = tmp.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let config = file_pools_config(tmp.path(), &[("p", &pool)]);
        let socket = tmp.path().join("csi.sock");
        let mut driver = Proc::start(tmp.path(), &socket, &config, "022", &["--log-format", format]);
        let mut controller = ControllerClient::new(driver.connect().await);

        let forged = "file:runtime-node:p:x\n2026-01-01T00:00:00Z  INFO holdfast: FORGED line\r\n";
        let huge = format!("file:runtime-node:p:{}", "y\n".repeat(5 * 1024));
        for id in [forged.to_owned(), huge.clone()] {
            let r = controller
                .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                    volume_id: id.clone(),
                    volume_capabilities: vec![mount_cap()],
                    ..Default::default()
                })
                .await;
            let s = r.unwrap_err();
            assert_eq!(s.code(), Code::NotFound, "{format}: {}", s.message());
            assert!(s.message().len() < 1024, "{format}: a {}-byte message for a {}-byte id", s.message().len(), id.len());
            assert!(!s.message().contains('\n'), "{format}: the id's newlines are escaped: {:?}", s.message());
        }
        // A name is echoed in logs and messages too.
        match controller.create_volume(create_request(&"n\n".repeat(600), "p")).await {
            Err(s) => assert!(s.message().len() < 1024, "{format}: a {}-byte message", s.message().len()),
            Ok(r) => {
                let id = r.into_inner().volume.unwrap().volume_id;
                controller.delete_volume(DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
            }
        }

        // Give the log a moment to be written, then stop the driver so the file is complete.
        driver.sigterm();
        assert!(driver.wait_exit(Duration::from_secs(15)).is_some(), "driver did not stop");
        let log = driver.log_text();
        assert!(log.contains("ValidateVolumeCapabilities"), "the calls are logged: {log}");
        assert!(!log.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")), "{format}: a forged line: {log}");
        assert!(log.contains("FORGED line"), "{format}: the id is logged (escaped): {log}");
        for line in log.lines() {
            assert!(line.len() < 4096, "{format}: a {}-byte log line", line.len());
            match format {
                "json" => {
                    serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                }
                _ => assert!(line.starts_with("20"), "every text line is the driver's own (timestamp first): {line:?}"),
            }
        }
    }
}

/// A small ext4 filesystem on a loop device, mounted under a test's temp dir, that the test
/// can freeze. Dropping it thaws it first, whatever happened, then unmounts it.
struct FreezableFs {
    mnt: PathBuf,
}

impl FreezableFs {
    fn new(dir: &Path) -> FreezableFs {
        let img = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&img).unwrap().set_len(256 << 20).unwrap();
        assert!(common::run("mkfs.ext4", &["-q", "-F", &common::path_str(&img)]), "mkfs.ext4");
        assert!(common::run("mount", &["-o", "loop", &common::path_str(&img), &common::path_str(&mnt)]), "mount -o loop");
        FreezableFs { mnt }
    }

    fn freeze(&self) {
        assert!(common::run("fsfreeze", &["--freeze", &common::path_str(&self.mnt)]), "fsfreeze --freeze");
    }

    fn thaw(&self) {
        // Fails harmlessly when not frozen.
        let _ = Command::new("fsfreeze").args(["--unfreeze"]).arg(&self.mnt).stderr(Stdio::null()).status();
    }
}

impl Drop for FreezableFs {
    fn drop(&mut self) {
        self.thaw();
        // The loop device was set up by mount -o loop with autoclear: unmounting detaches it.
        if !common::run("umount", &[&common::path_str(&self.mnt)]) {
            common::run("umount", &["--lazy", &common::path_str(&self.mnt)]);
        }
    }
}

/// Thaws before the driver is stopped (a process stuck in the kernel on a frozen filesystem
/// cannot exit), then stops the driver, then unmounts.
struct HungPool {
    driver: Option<Proc>,
    fs: Option<FreezableFs>,
}

impl Drop for HungPool {
    fn drop(&mut self) {
        if let Some(fs) = &self.fs {
            fs.thaw();
        }
        drop(self.driver.take());
        drop(self.fs.take());
    }
}

/// A driver with two file pools, `hung` on a [`FreezableFs`] (frozen on return, with
/// `stuck` CreateVolume calls on it in flight) and `ok` on the plain temp dir.
async fn driver_with_a_frozen_pool(tmp: &Path, stuck: usize, extra: &[&str]) -> (HungPool, Channel, Vec<StuckCall>) {
    let mut fixture = HungPool { driver: None, fs: Some(FreezableFs::new(tmp)) };
    let hung_dir = fixture.fs.as_ref().unwrap().mnt.join("pool");
    let ok_dir = tmp.join("ok");
    std::fs::create_dir(&hung_dir).unwrap();
    std::fs::create_dir(&ok_dir).unwrap();
    let config = file_pools_config(tmp, &[("hung", &hung_dir), ("ok", &ok_dir)]);
    let socket = tmp.join("csi.sock");
    let driver = fixture.driver.insert(Proc::start(tmp, &socket, &config, "022", extra));
    let ch = driver.connect().await;
    fixture.fs.as_ref().unwrap().freeze();
    let mut calls = Vec::new();
    for i in 0..stuck {
        let mut c = ControllerClient::new(ch.clone());
        let req = create_request(&format!("{}-{i}", common::unique("frozen")), "hung");
        calls.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(req);
            req.set_timeout(Duration::from_secs(120));
            c.create_volume(req).await.map(drop)
        }));
    }
    // Let them reach the kernel.
    tokio::time::sleep(Duration::from_millis(500)).await;
    (fixture, ch, calls)
}

type StuckCall = tokio::task::JoinHandle<Result<(), tonic::Status>>;

/// Probe and GetPluginInfo, each answered within a second.
async fn identity_answers_at_once(ch: &Channel) {
    let mut identity = IdentityClient::new(ch.clone());
    let t = Instant::now();
    let probe = tokio::time::timeout(Duration::from_secs(5), identity.probe(ProbeRequest {})).await;
    let probe_time = t.elapsed();
    assert_eq!(probe.expect("Probe answered").unwrap().into_inner().ready, Some(true), "a sick pool never makes Probe not ready");
    assert!(probe_time < Duration::from_secs(1), "Probe took {probe_time:?}");
    let t = Instant::now();
    let info = tokio::time::timeout(Duration::from_secs(5), identity.get_plugin_info(GetPluginInfoRequest {})).await;
    let info_time = t.elapsed();
    assert_eq!(info.expect("GetPluginInfo answered").unwrap().into_inner().name, "csi.holdfast.dev");
    assert!(info_time < Duration::from_secs(1), "GetPluginInfo took {info_time:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_pool_stalls_neither_identity_nor_the_shutdown() {
    let tmp = tempdir();
    let (mut fixture, ch, stuck) = driver_with_a_frozen_pool(tmp.path(), 3, &[]).await;
    identity_answers_at_once(&ch).await;

    // SIGTERM: the socket goes at once, well within the grace period, although calls are stuck.
    let driver = fixture.driver.as_mut().unwrap();
    let socket = driver.socket.clone();
    let t = Instant::now();
    driver.sigterm();
    while socket.exists() {
        assert!(t.elapsed() < holdfast::server::SHUTDOWN_GRACE, "the socket is still there {:?} after SIGTERM", t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let removed = t.elapsed();
    assert!(removed < Duration::from_secs(2), "socket removed only {removed:?} after SIGTERM");
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err(), "nothing new connects once the shutdown began");

    // Past the grace period the serving stops even with the calls still stuck: their clients
    // get an answer or see the connection end; the process itself ends once the filesystem
    // thaws (a thread in the kernel holds the exit until then).
    for s in stuck {
        let left = (holdfast::server::SHUTDOWN_GRACE + Duration::from_secs(5)).saturating_sub(t.elapsed());
        let r = tokio::time::timeout(left, s).await;
        assert!(r.is_ok(), "a stuck call's client still waits {:?} after SIGTERM", t.elapsed());
    }
    fixture.fs.as_ref().unwrap().thaw();
    let driver = fixture.driver.as_mut().unwrap();
    let status = driver.wait_exit(Duration::from_secs(10));
    assert!(status.is_some(), "the driver did not exit {:?} after SIGTERM (thawed); log:\n{}", t.elapsed(), driver.log_text());
    // The stuck calls end either by their own deadline (the pool's blocking calls are
    // bounded) or by the cut at the end of the grace period, which is then logged.
    let log = driver.log_text();
    let timed_out = log.matches("status=\"DeadlineExceeded\"").count() + log.matches("status=\"Unavailable\"").count();
    assert!(log.contains("stopping anyway") || timed_out >= 3, "the stuck calls were neither cut nor timed out: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_pool_stalls_no_other_pool_and_its_own_calls_time_out() {
    let tmp = tempdir();
    let (fixture, ch, stuck) = driver_with_a_frozen_pool(tmp.path(), 3, &[]).await;
    identity_answers_at_once(&ch).await;
    let mut c = ControllerClient::new(ch.clone());
    let t = Instant::now();
    let other = tokio::time::timeout(Duration::from_secs(10), c.create_volume(create_request(&common::unique("ok"), "ok"))).await;
    let other_time = t.elapsed();
    let other = other.expect("CreateVolume on the healthy pool answered").expect("CreateVolume on the healthy pool");
    assert!(other_time < Duration::from_secs(2), "CreateVolume on the healthy pool took {other_time:?}");
    let ok_id = other.into_inner().volume.unwrap().volume_id;
    c.delete_volume(DeleteVolumeRequest { volume_id: ok_id, ..Default::default() }).await.expect("delete on the healthy pool");

    // The frozen pool's own calls answer DEADLINE_EXCEEDED (or UNAVAILABLE once too many of
    // its calls are stuck) while the filesystem is still frozen.
    for s in stuck {
        let r = tokio::time::timeout(Duration::from_secs(60), s).await.expect("a stuck call answered within 60 s").unwrap();
        let code = r.expect_err("a create on a frozen pool cannot succeed while frozen").code();
        assert!(matches!(code, Code::DeadlineExceeded | Code::Unavailable), "{code:?}");
    }
    identity_answers_at_once(&ch).await;
    drop(fixture);
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_beyond_the_concurrency_limit_queue_and_identity_is_never_held_back() {
    let tmp = tempdir();
    let (fixture, ch, stuck) = driver_with_a_frozen_pool(tmp.path(), 1, &["--max-concurrent-calls", "1"]).await;
    // The one slot is taken by the stuck create: a call on the healthy pool waits for it…
    let mut c = ControllerClient::new(ch.clone());
    let name = common::unique("queued");
    let queued = tokio::spawn(async move {
        let r = c.create_volume(create_request(&name, "ok")).await;
        (Instant::now(), r)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!queued.is_finished(), "a call beyond --max-concurrent-calls 1 was served at once");
    // …while Identity answers at once.
    identity_answers_at_once(&ch).await;

    // Once the stuck call is done the queued one is served.
    let thawed = Instant::now();
    fixture.fs.as_ref().unwrap().thaw();
    for s in stuck {
        let _ = tokio::time::timeout(Duration::from_secs(30), s).await.expect("the stuck call ended after the thaw");
    }
    let (at, r) = tokio::time::timeout(Duration::from_secs(30), queued).await.expect("the queued call answered").unwrap();
    let id = r.expect("the queued create succeeded").into_inner().volume.unwrap().volume_id;
    assert!(at > thawed, "served only after the slot was free");
    let mut c = ControllerClient::new(ch);
    c.delete_volume(DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
    drop(fixture);
}

/// `holdfast --version` names the version and the commit of the checkout it was built from, so
/// an operator's bug report says exactly which code ran.
#[test]
fn version_names_the_crate_version_and_the_git_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("--version").output().expect("run holdfast --version");
    assert!(out.status.success(), "holdfast --version failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("holdfast {} (commit ", env!("CARGO_PKG_VERSION"))), "holdfast --version printed {text:?}");
    let head = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(env!("CARGO_MANIFEST_DIR")).output();
    match head {
        // In a checkout (CI's clean clone): exactly its HEAD.
        Ok(h) if h.status.success() => {
            let head = String::from_utf8_lossy(&h.stdout).trim().to_owned();
            assert!(text.contains(&format!("(commit {head})")), "holdfast --version printed {text:?}, the checkout is at {head}");
        }
        _ => assert!(text.contains("(commit unknown)"), "outside a checkout the commit is unknown: {text:?}"),
    }
}
