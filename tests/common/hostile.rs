//! Guards and helpers of the hostile-input tests (tests/hostile.rs, tests/hostile_host.rs):
//! foreign mounts, loop devices, mounts and freezes the tests make and always undo (thaw
//! first, then unmount, then detach), victims to check after a refused call, and small
//! mount-table and request helpers.

// Each of the two binaries uses a different subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use holdfast::proto::*;
use tonic::Code;

/// A tmpfs of "someone else's" with a file in it, mounted by the test; unmounted on drop.
pub struct ForeignMount {
    pub path: PathBuf,
    pub file: PathBuf,
    pub content: Vec<u8>,
}

impl ForeignMount {
    pub fn tmpfs(path: &Path) -> ForeignMount {
        std::fs::create_dir_all(path).expect("create foreign mount point");
        assert!(run("mount", &["-t", "tmpfs", "-o", "size=4m,mode=0755", "hostile-foreign", &path_str(path)]), "mount a tmpfs");
        let file = path.join("precious.txt");
        let content = format!("someone else's data {}\n", unique("f")).into_bytes();
        write_durably(&file, &content);
        ForeignMount { path: path.to_path_buf(), file, content }
    }

    /// Fails unless the tmpfs is still mounted there, alone, with its file intact.
    pub fn assert_untouched(&self, what: &str) {
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
pub struct Loop {
    pub dev: String,
}

impl Loop {
    pub fn attach(image: &Path) -> Loop {
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
pub struct MountGuard {
    pub path: PathBuf,
}

impl MountGuard {
    pub fn mount(source: &str, path: &Path, args: &[&str]) -> MountGuard {
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
pub struct Thaw {
    pub paths: Vec<PathBuf>,
    pub paused_pid_file: Option<PathBuf>,
}

impl Thaw {
    pub fn freeze(path: &Path) -> Thaw {
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
pub struct Outer {
    pub tmp: Option<tempfile::TempDir>,
}

impl Outer {
    pub fn new() -> Outer {
        Outer { tmp: Some(tempfile::Builder::new().prefix("holdfast-hostile-").tempdir().expect("create temp dir")) }
    }
    pub fn path(&self) -> &Path {
        self.tmp.as_ref().expect("temp dir").path()
    }
    /// A `file` pool named `conformance` at `pool_dir`, plus `extra` TOML; returns the config.
    pub fn file_config(&self, pool_dir: &Path, extra: &str) -> PathBuf {
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
pub async fn file_driver(outer: &Outer, extra_config: &str) -> Driver {
    let cfg = outer.file_config(&outer.path().join("pool"), extra_config);
    Setup::with_own_pool(&cfg, "conformance", "file").start().await
}

/// How many mounts are stacked at `path`.
pub fn mounts_at(path: &Path) -> usize {
    all_mount_points().iter().filter(|m| m.as_path() == path).count()
}

/// The mount points under `dir` (a snapshot to compare before and after a refused call).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = all_mount_points().into_iter().filter(|m| m.starts_with(dir)).collect();
    v.sort();
    v
}

/// `major:minor` and root of the mount at `path` (its superblock and the subtree it shows):
/// two mount entries with the same pair show the same thing.
pub fn mount_identity(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path_str(path);
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && unescape(f[4]) == want).then(|| (f[2].to_owned(), f[3].to_owned()))
    })
}

/// Every mount in the table showing the same superblock and subtree.
pub fn mounts_of(identity: &(String, String)) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 4 && f[2] == identity.0 && f[3] == identity.1).then(|| unescape(f[4]))
        })
        .collect()
}

pub fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// An id of the pool under test that names no volume.
pub fn unknown_volume_id(d: &Driver) -> String {
    let node = if d.pool.kind == "nfs" { "-" } else { NODE_ID };
    format!("{}:{}:{}:{}", d.pool.kind, node, d.pool.name, unique("no-such-volume"))
}

/// Fails unless the call failed with one of `want`; returns the status.
pub fn expect_one_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, want: &[Code], what: &str) -> tonic::Status {
    match r {
        Ok(resp) => panic!("{what}: expected one of {want:?}, got OK: {:?}", resp.into_inner()),
        Err(s) if want.contains(&s.code()) => s,
        Err(s) => panic!("{what}: expected one of {want:?}, got {:?}: {}", s.code(), s.message()),
    }
}

/// A victim directory with a file in it, checked after a refused call.
pub struct Victim {
    pub dir: PathBuf,
    pub file: PathBuf,
    pub content: Vec<u8>,
}

impl Victim {
    pub fn new(dir: &Path) -> Victim {
        std::fs::create_dir_all(dir).expect("create victim dir");
        let file = dir.join("victim.txt");
        let content = format!("the victim's data {}\n", unique("v")).into_bytes();
        write_durably(&file, &content);
        Victim { dir: dir.to_path_buf(), file, content }
    }
    pub fn assert_untouched(&self, what: &str) {
        assert!(!is_mount_point(&self.dir), "{what}: something was mounted over the victim dir {}", self.dir.display());
        assert_eq!(std::fs::read(&self.file).ok().as_deref(), Some(&self.content[..]), "{what}: the victim file changed");
    }
}

/// NodeExpandVolume request.
pub fn expand_request(id: &str, volume_path: &Path, staging: &str, bytes: i64, cap: &VolumeCapability) -> NodeExpandVolumeRequest {
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
pub async fn expand_controller(d: &Driver, id: &str, bytes: i64, cap: &VolumeCapability) -> i64 {
    let req = ControllerExpandVolumeRequest {
        volume_id: id.to_owned(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    ok(d.controller().controller_expand_volume(req).await, "ControllerExpandVolume").capacity_bytes
}

/// An ext4 filesystem capability (tests that size things themselves).
pub fn ext4_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })),
    }
}

/// The image of a `file` pool volume (`<pool path>/volumes/<local>.img`).
pub fn file_image(pool_dir: &Path, volume_id: &str) -> PathBuf {
    let local = holdfast::volume_id::VolumeId::parse(volume_id).expect("a holdfast volume id").local;
    pool_dir.join("volumes").join(format!("{local}.img"))
}

/// The loop devices backed by `image` (`losetup -j`).
pub fn loops_of(image: &Path) -> String {
    let out = Command::new("losetup").arg("-j").arg(image).output().expect("run losetup -j");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Writes and fsyncs a small file from a child process; false if that did not finish within
/// `timeout` (the filesystem is frozen). The writer is left to finish when the test thaws.
pub fn write_finishes(path: &Path, timeout: Duration) -> bool {
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
