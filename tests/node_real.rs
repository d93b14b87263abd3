//! The node module against the real kernel and tools, as root: loop devices over sparse image
//! files, real mkfs/blkid/resize/UUID tools, and [`RealMounter`]. Every test cleans up its
//! mounts and loop devices in a Drop guard, even when it fails half-way.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use holdfast::error::Error;
use holdfast::exec::{Cmd, Exec, ExecError, Output, RealExec};
use holdfast::node::mount::{Mounter, RealMounter};
use holdfast::node::mountinfo::MountInfo;
use holdfast::node::safepath::RequestPath;
use holdfast::node::{Node, format, mountinfo};
use holdfast::pool::{Attachment, Condition};

const MIB: u64 = 1 << 20;
/// mkfs.xfs refuses filesystems under 300 MiB.
const IMAGE_SIZE: u64 = 320 * MIB;

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A scratch directory with image files and loop devices. On drop, everything mounted under
/// the directory is unmounted (lazily, so a busy mount cannot keep the loop) and every loop
/// device is detached, before the directory itself is removed.
struct Scratch {
    dir: tempfile::TempDir,
    loops: Vec<String>,
}

impl Scratch {
    fn new() -> Self {
        Scratch { dir: tempfile::Builder::new().prefix("holdfast-node-real").tempdir().unwrap(), loops: Vec::new() }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    /// A sparse image file of `size` bytes.
    fn image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }
    /// A loop device over `file`.
    fn attach(&mut self, file: &Path) -> PathBuf {
        let dev = sh("losetup", &["--find", "--show", file.to_str().unwrap()]);
        self.loops.push(dev.clone());
        PathBuf::from(dev)
    }
    fn node(&self) -> Node {
        let exec: Arc<dyn Exec> = Arc::new(RealExec);
        Node::new(exec.clone(), Arc::new(RealMounter::new(exec)))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let root = self.dir.path().to_owned();
        if let Ok(mounts) = mountinfo::read() {
            for m in mounts.iter().rev().filter(|m| m.mount_point.starts_with(&root)) {
                let _ = Command::new("umount").arg("-l").arg(&m.mount_point).status();
            }
        }
        for dev in &self.loops {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
}

/// A path of the scratch directory as a request path.
fn rp(p: impl AsRef<Path>) -> RequestPath {
    RequestPath::internal(p.as_ref()).unwrap()
}

/// Every mount line counts as the caller's own: these tests mount only their own things.
fn any(_: &MountInfo) -> bool {
    true
}

fn cond(node: &Node, p: &Path, block: bool) -> Condition {
    node.condition(p, block, &mountinfo::read().unwrap())
}

fn stats(node: &Node, p: &Path) -> holdfast::node::Stats {
    node.stats(p, &mountinfo::read().unwrap()).unwrap()
}

/// Runs real commands and remembers which programs ran.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<String>>);

#[async_trait::async_trait]
impl Exec for Recorder {
    async fn run(&self, cmd: Cmd) -> Result<Output, ExecError> {
        self.0.lock().unwrap().push(cmd.program.clone());
        RealExec.run(cmd).await
    }
}

/// Whether this process may resize ext4 online (`CAP_SYS_RESOURCE`, bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    u64::from_str_radix(eff, 16).unwrap() & (1 << 24) != 0
}

fn write_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::create(path)?.write_all(b"holdfast")
}

/// Stage, publish rw and ro, write, grow, unpublish and unstage one filesystem through `Node`.
async fn filesystem_life(fs: &str) {
    let mut s = Scratch::new();
    let image = s.image("vol.img", IMAGE_SIZE);
    let dev = s.attach(&image);
    let node = s.node();
    let (stage, rw, ro) = (s.path("stage"), s.path("pods/a/mount"), s.path("pods/b/mount"));
    let att = Attachment::Device(dev.clone());

    node.stage_filesystem(&att, &rp(&stage), fs, &[]).await.unwrap();
    assert_eq!(format::probe(&RealExec, &dev).await.unwrap().unwrap().kind, fs);
    node.stage_filesystem(&att, &rp(&stage), fs, &[]).await.unwrap();
    assert_eq!(mountinfo::find_by_mount_point(&mountinfo::read().unwrap(), &stage).len(), 1, "staged once");
    write_file(&stage.join("hello")).unwrap();

    node.publish_filesystem(&rp(&stage), &rp(&rw), false, &[]).await.unwrap();
    node.publish_filesystem(&rp(&stage), &rp(&ro), true, &["nosuid".into()]).await.unwrap();
    node.publish_filesystem(&rp(&stage), &rp(&ro), true, &["nosuid".into()]).await.unwrap();
    assert_eq!(std::fs::read(ro.join("hello")).unwrap(), b"holdfast");
    write_file(&rw.join("from-rw")).unwrap();
    let err = write_file(&ro.join("from-ro")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = node.publish_filesystem(&rp(&stage), &rp(&rw), true, &[]).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    assert_eq!(cond(&node, &rw, false), Condition::Healthy);
    assert_eq!(cond(&node, &ro, false), Condition::Healthy);

    let before = stats(&node, &rw);
    assert!(before.total_bytes > 200 * MIB && before.used_bytes > 0 && before.available_bytes < before.total_bytes, "{before:?}");
    if fs == "btrfs" {
        assert_eq!(before.total_inodes, None, "btrfs has no fixed inode count");
    } else {
        assert!(before.total_inodes.unwrap() > 0 && before.used_inodes.unwrap() > 0, "{before:?}");
    }

    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(IMAGE_SIZE + 200 * MIB).unwrap();
    sh("losetup", &["-c", dev.to_str().unwrap()]);
    match node.expand_filesystem(&dev, &rp(&stage)).await {
        Ok(capacity) => {
            assert_eq!(capacity, IMAGE_SIZE + 200 * MIB, "NodeExpandVolume reports the device's capacity");
            let after = stats(&node, &rw).total_bytes;
            assert!(
                after > before.total_bytes + 150 * MIB,
                "the published path sees the grown filesystem: {after} after {}",
                before.total_bytes
            );
        }
        // A sandbox without CAP_SYS_RESOURCE cannot resize ext4 online; the error must say so.
        Err(e) if fs == "ext4" && !has_cap_sys_resource() => {
            assert!(e.to_string().contains("CAP_SYS_RESOURCE"), "{e}");
            eprintln!("ext4 online grow not checked: this process lacks CAP_SYS_RESOURCE");
        }
        Err(e) => panic!("growing {fs}: {e}"),
    }

    for target in [&rw, &ro] {
        node.unpublish(&rp(target), &any, true).await.unwrap();
        node.unpublish(&rp(target), &any, true).await.unwrap();
        assert!(!target.exists(), "{}", target.display());
    }
    assert!(matches!(cond(&node, &rw, false), Condition::Abnormal(_)));
    node.unstage(&rp(&stage), &any).await.unwrap();
    node.unstage(&rp(&stage), &any).await.unwrap();
    assert!(!node.is_mounted(&rp(&stage)).await.unwrap());

    // Staged again, the data is still there: nothing was reformatted.
    node.stage_filesystem(&att, &rp(&stage), fs, &[]).await.unwrap();
    assert!(stage.join("from-rw").exists());
    node.unstage(&rp(&stage), &any).await.unwrap();
}

#[tokio::test]
async fn ext4_life() {
    filesystem_life("ext4").await;
}

#[tokio::test]
async fn xfs_life() {
    filesystem_life("xfs").await;
}

#[tokio::test]
async fn btrfs_life() {
    filesystem_life("btrfs").await;
}

#[tokio::test]
async fn a_device_with_a_signature_is_never_formatted() {
    let mut s = Scratch::new();
    let node = s.node();
    struct Case {
        name: &'static str,
        make: &'static [&'static str],
        fs: &'static str,
        want: &'static str,
    }
    let cases = [
        Case { name: "swap", make: &["mkswap"], fs: "ext4", want: "swap" },
        Case { name: "other filesystem", make: &["mkfs.ext4", "-q"], fs: "xfs", want: "ext4" },
        Case { name: "btrfs asked as ext4", make: &["mkfs.btrfs", "-q"], fs: "ext4", want: "btrfs" },
    ];
    for c in cases {
        let image = s.image(&format!("{}.img", c.fs), IMAGE_SIZE);
        let mut argv = c.make.to_vec();
        argv.push(image.to_str().unwrap());
        sh(argv[0], &argv[1..]);
        let uuid = format::probe(&RealExec, &image).await.unwrap().unwrap().uuid;
        let dev = s.attach(&image);
        let stage = s.path(&format!("stage-{}", c.fs));
        let err = node.stage_filesystem(&Attachment::Device(dev.clone()), &rp(&stage), c.fs, &[]).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains(c.want), "{}: {err}", c.name);
        assert!(!node.is_mounted(&rp(&stage)).await.unwrap(), "{}", c.name);
        let after = format::probe(&RealExec, &dev).await.unwrap().unwrap();
        assert_eq!((after.kind.as_str(), after.uuid), (c.want, uuid), "{}: the device is untouched", c.name);
        // And mkfs itself refuses, whatever its caller did.
        let err = format::mkfs(&RealExec, &dev, c.fs).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{}: {err}", c.name);
    }
}

#[tokio::test]
async fn probe_tells_blank_from_unreadable() {
    let s = Scratch::new();
    let blank = s.image("blank.img", 16 * MIB);
    assert_eq!(format::probe(&RealExec, &blank).await.unwrap(), None);
    assert!(matches!(format::probe(&RealExec, &s.path("missing.img")).await, Err(Error::NotFound(_))));
    let empty = s.image("empty.img", 0);
    assert!(format::probe(&RealExec, &empty).await.is_err(), "an empty file is not blank");
    // Two filesystems' superblocks at once: blkid is ambivalent, and that is not blank either.
    let two = s.image("two.img", IMAGE_SIZE);
    sh("mkfs.xfs", &["-q", two.to_str().unwrap()]);
    let ext4 = s.image("ext4.img", 16 * MIB);
    sh("mkfs.ext4", &["-q", ext4.to_str().unwrap()]);
    let sb = std::fs::read(&ext4).unwrap()[1024..2048].to_vec();
    let mut f = std::fs::OpenOptions::new().write(true).open(&two).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1024)).unwrap();
    f.write_all(&sb).unwrap();
    drop(f);
    let sig = format::probe(&RealExec, &two).await.unwrap().unwrap();
    assert!(sig.kind.contains("several signatures"), "{sig:?}");
}

#[tokio::test]
async fn raw_block_publish() {
    let mut s = Scratch::new();
    let image = s.image("block.img", 64 * MIB);
    let dev = s.attach(&image);
    let node = s.node();
    let (rw, ro) = (s.path("publish/pvc/pod-rw"), s.path("publish/pvc/pod-ro"));
    node.publish_block(&dev, &rp(&rw), false).await.unwrap();
    node.publish_block(&dev, &rp(&ro), true).await.unwrap();
    node.publish_block(&dev, &rp(&ro), true).await.unwrap();
    for t in [&rw, &ro] {
        assert!(std::fs::metadata(t).unwrap().file_type().is_block_device(), "{}", t.display());
        assert_eq!(stats(&node, t).total_bytes, 64 * MIB);
        assert_eq!(stats(&node, t).total_inodes, None);
        assert_eq!(cond(&node, t, true), Condition::Healthy);
    }
    std::fs::OpenOptions::new().write(true).open(&rw).unwrap().write_all(b"raw").unwrap();
    let mut buf = [0u8; 3];
    std::io::Read::read_exact(&mut std::fs::File::open(&ro).unwrap(), &mut buf).unwrap();
    assert_eq!(&buf, b"raw", "both targets are the same device");
    // The kernel ignores a mount's ro flag for writes through a device node (the container
    // runtime enforces it); the mount table still says what was asked.
    let mounts = mountinfo::read().unwrap();
    assert!(mountinfo::top_at(&mounts, &ro).unwrap().mount_options.iter().any(|o| o == "ro"));
    assert!(mountinfo::top_at(&mounts, &rw).unwrap().mount_options.iter().any(|o| o == "rw"));
    assert!(matches!(node.publish_block(&dev, &rp(&ro), false).await, Err(Error::AlreadyExists(_))));
    for t in [&rw, &ro] {
        node.unpublish(&rp(t), &any, true).await.unwrap();
        node.unpublish(&rp(t), &any, true).await.unwrap();
        assert!(!t.exists());
    }
}

#[tokio::test]
async fn condition_sees_a_deleted_backing_file_and_a_filesystem_gone_read_only() {
    let mut s = Scratch::new();
    let image = s.image("vol.img", 64 * MIB);
    let dev = s.attach(&image);
    let node = s.node();
    let stage = s.path("stage");
    node.stage_filesystem(&Attachment::Device(dev.clone()), &rp(&stage), "ext4", &["errors=remount-ro".into()]).await.unwrap();
    assert_eq!(cond(&node, &stage, false), Condition::Healthy);

    // ext4 can be told to act as if it hit an error; with errors=remount-ro the kernel then
    // turns the superblock read-only under the read-write mount.
    let name = dev.file_name().unwrap().to_str().unwrap();
    let trigger = PathBuf::from("/sys/fs/ext4").join(name).join("trigger_fs_error");
    assert!(trigger.exists(), "{} is missing", trigger.display());
    std::fs::write(&trigger, "holdfast test").unwrap();
    match cond(&node, &stage, false) {
        Condition::Abnormal(m) => assert!(m.contains("read-only"), "{m}"),
        Condition::Healthy => panic!("a filesystem remounted read-only after an error must be abnormal"),
    }
    node.unstage(&rp(&stage), &any).await.unwrap();

    // A loop device whose backing file was deleted under a mount.
    let image = s.image("other.img", 64 * MIB);
    let dev = s.attach(&image);
    node.stage_filesystem(&Attachment::Device(dev.clone()), &rp(&stage), "ext4", &[]).await.unwrap();
    assert_eq!(cond(&node, &stage, false), Condition::Healthy);
    std::fs::remove_file(&image).unwrap();
    match cond(&node, &stage, false) {
        Condition::Abnormal(m) => assert!(m.contains("deleted"), "{m}"),
        Condition::Healthy => panic!("a deleted backing file must be abnormal"),
    }
    node.unstage(&rp(&stage), &any).await.unwrap();
}

#[tokio::test]
async fn condition_sees_an_xfs_shutdown() {
    let mut s = Scratch::new();
    let image = s.image("vol.img", IMAGE_SIZE);
    let dev = s.attach(&image);
    let node = s.node();
    let stage = s.path("stage");
    node.stage_filesystem(&Attachment::Device(dev), &rp(&stage), "xfs", &[]).await.unwrap();
    assert_eq!(cond(&node, &stage, false), Condition::Healthy);
    sh("xfs_io", &["-x", "-c", "shutdown", stage.to_str().unwrap()]);
    match cond(&node, &stage, false) {
        Condition::Abnormal(m) => assert!(m.contains("Input/output error"), "{m}"),
        Condition::Healthy => panic!("a shut-down XFS must be abnormal"),
    }
    node.unstage(&rp(&stage), &any).await.unwrap();
}

#[tokio::test]
async fn unmount_of_nothing_is_classified() {
    let s = Scratch::new();
    let m = RealMounter::new(Arc::new(RealExec));
    std::fs::create_dir(s.path("empty")).unwrap();
    assert!(matches!(m.unmount(&rp(s.path("empty")), 1).await, Err(Error::NotFound(_))));
    assert!(matches!(m.unmount(&rp(s.path("missing")), 1).await, Err(Error::NotFound(_))));
    let node = s.node();
    node.unstage(&rp(s.path("missing")), &any).await.unwrap();
    node.unpublish(&rp(s.path("missing")), &any, true).await.unwrap();
    let err = node.publish_filesystem(&rp(s.path("empty")), &rp(s.path("target")), false, &[]).await.unwrap_err();
    assert!(err.to_string().contains("volume is not staged"), "{err}");
}

/// A copy of a mounted filesystem (as the file pool makes for snapshots and clones) gets a new
/// UUID and then mounts beside its source.
async fn copy_gets_a_new_uuid(fs: &str) {
    let mut s = Scratch::new();
    let image = s.image("src.img", IMAGE_SIZE);
    let dev = s.attach(&image);
    let node = s.node();
    let stage = s.path("stage");
    node.stage_filesystem(&Attachment::Device(dev.clone()), &rp(&stage), fs, &[]).await.unwrap();
    write_file(&stage.join("data")).unwrap();
    // Copy while mounted and dirty: a journal/log to replay, like a live snapshot.
    sh("sync", &[]);
    let copy = s.path("copy.img");
    sh("cp", &["--sparse=always", image.to_str().unwrap(), copy.to_str().unwrap()]);
    let old = format::probe(&RealExec, &copy).await.unwrap().unwrap().uuid;

    let recorder = Recorder::default();
    format::regenerate_uuid(&recorder, &copy).await.unwrap();
    let progs = recorder.0.lock().unwrap().clone();
    // The copy of a mounted filesystem is dirty: the repair step must have run.
    match fs {
        "ext4" => assert!(progs.iter().any(|p| p == "e2fsck"), "{progs:?}"),
        "xfs" => assert!(progs.iter().any(|p| p == "mount"), "{progs:?}"),
        _ => {}
    }
    let new = format::probe(&RealExec, &copy).await.unwrap().unwrap();
    assert_eq!(new.kind, fs);
    assert!(new.uuid.is_some() && new.uuid != old, "{fs}: {old:?} -> {:?}", new.uuid);
    assert_eq!(format::probe(&RealExec, &dev).await.unwrap().unwrap().uuid, old, "the source keeps its UUID");

    // The copy mounts beside its source (btrfs refuses a second device with the same fsid).
    let copy_dev = s.attach(&copy);
    let copy_stage = s.path("copy-stage");
    node.stage_filesystem(&Attachment::Device(copy_dev), &rp(&copy_stage), fs, &[]).await.unwrap();
    assert_eq!(std::fs::read(copy_stage.join("data")).unwrap(), b"holdfast");
    node.unstage(&rp(&copy_stage), &any).await.unwrap();
    node.unstage(&rp(&stage), &any).await.unwrap();

    // Blank images are left alone.
    let blank = s.image("blank.img", 16 * MIB);
    format::regenerate_uuid(&RealExec, &blank).await.unwrap();
    assert_eq!(format::probe(&RealExec, &blank).await.unwrap(), None);
}

#[tokio::test]
async fn ext4_copy_gets_a_new_uuid() {
    copy_gets_a_new_uuid("ext4").await;
}

#[tokio::test]
async fn xfs_copy_gets_a_new_uuid() {
    copy_gets_a_new_uuid("xfs").await;
}

#[tokio::test]
async fn btrfs_copy_gets_a_new_uuid() {
    copy_gets_a_new_uuid("btrfs").await;
}

#[tokio::test]
async fn regenerate_uuid_on_a_loop_device() {
    let mut s = Scratch::new();
    let image = s.image("vol.img", IMAGE_SIZE);
    sh("mkfs.xfs", &["-q", image.to_str().unwrap()]);
    let dev = s.attach(&image);
    let old = format::probe(&RealExec, &dev).await.unwrap().unwrap().uuid;
    format::regenerate_uuid(&RealExec, &dev).await.unwrap();
    assert_ne!(format::probe(&RealExec, &dev).await.unwrap().unwrap().uuid, old);
}
