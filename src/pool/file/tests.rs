//! Unit tests of the file pool: recording fakes for the command flows, real files and real
//! `losetup` for the data paths.

use super::room::available;
use super::*;
use crate::config::Config;
use crate::exec::{ExecError, FakeExec, Output, RealExec, Reply};
use crate::node::mount::FakeMounter;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};

const MIB: u64 = 1 << 20;

fn config(dir: &Path, extra: &str) -> PoolConfig {
    let src = format!("[[pool]]\nname = \"p1\"\nkind = \"file\"\npath = \"{}\"\n{extra}", dir.display());
    Config::parse(&src).unwrap().pools.remove(0)
}

/// A pool whose loop-device queue limits live in a fake `/sys/block` under `dir` (fake loop
/// devices must never reach the real ones).
fn pool(dir: &Path, exec: Arc<dyn Exec>) -> FilePool {
    FilePool::new(&config(dir, ""), exec).unwrap().with_sys_block(dir.join("fake-sys-block"))
}

/// A pool on real loop devices.
fn real_pool(dir: &Path) -> FilePool {
    FilePool::new(&config(dir, ""), Arc::new(RealExec)).unwrap()
}

/// The same request, for a thin volume.
fn thin(r: CreateRequest) -> CreateRequest {
    let mut r = r;
    r.parameters.insert(PARAM_PROVISIONING.into(), "thin".into());
    r
}

/// A fake loop device's discard limit, as the kernel shows it.
fn fake_discard_knob(dir: &Path, dev: &str) -> PathBuf {
    let queue = dir.join("fake-sys-block").join(dev).join("queue");
    fs::create_dir_all(&queue).unwrap();
    let knob = queue.join("discard_max_bytes");
    fs::write(&knob, "4294966784\n").unwrap();
    knob
}

fn req(name: &str, capacity: u64, block: bool, source: Option<Source>) -> CreateRequest {
    CreateRequest {
        csi_name: format!("csi-{name}"),
        local: name.to_owned(),
        capacity,
        block,
        fs_type: None,
        source,
        parameters: BTreeMap::new(),
        limit: 0,
        uid: crate::volume_id::new_uid(),
        source_uid: None,
        mutable: Default::default(),
    }
}

fn img(dir: &Path, kind: &str, local: &str) -> PathBuf {
    dir.join(kind).join(format!("{local}.img"))
}

/// Records every command in a [`FakeExec`] (which answers them), but really runs `cp`, so
/// a copy leaves a real file behind for the rest of the flow.
struct RealCp(FakeExec);

#[async_trait]
impl Exec for RealCp {
    async fn run(&self, cmd: Cmd) -> std::result::Result<Output, ExecError> {
        let faked = self.0.run(cmd.clone()).await;
        if cmd.program == "cp" && faked.is_ok() { RealExec.run(cmd).await } else { faked }
    }
}

/// Unmounts and detaches whatever a real test set up under its directory, even on panic.
struct Cleanup {
    mounts: Vec<PathBuf>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = std::process::Command::new("umount").arg(m).status();
        }
        let script = "losetup -n -O NAME,BACK-FILE | while read -r d f; do case \"$f\" in \"$1\"/*) losetup -d \"$d\";; esac; done";
        let _ = std::process::Command::new("sh").args(["-c", script, "-", &self.dir.to_string_lossy()]).status();
    }
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn available_subtracts_reserve_promises_and_claims() {
    struct Case {
        name: &'static str,
        free: u64,
        reserve: u64,
        promised: u64,
        in_flight: u64,
        want: u64,
    }
    let cases = [
        Case { name: "all free", free: 100, reserve: 0, promised: 0, in_flight: 0, want: 100 },
        Case { name: "everything subtracted", free: 100, reserve: 10, promised: 20, in_flight: 30, want: 40 },
        Case { name: "overcommitted is zero, not negative", free: 100, reserve: 50, promised: 80, in_flight: 0, want: 0 },
        Case { name: "reserve above free", free: 10, reserve: 50, promised: 0, in_flight: 0, want: 0 },
    ];
    for c in cases {
        assert_eq!(available(c.free, c.reserve, c.promised, c.in_flight), c.want, "{}", c.name);
    }
}

#[test]
fn new_creates_a_private_tree_and_reads_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("a/b");
    let p = FilePool::new(&config(&root, "reserve = \"1GiB\"\ndefault_fs = \"xfs\"\n"), Arc::new(FakeExec::new())).unwrap();
    for sub in ["volumes", "snapshots"] {
        assert_eq!(fs::metadata(root.join(sub)).unwrap().permissions().mode() & 0o777, 0o700, "{sub}");
    }
    assert_eq!(p.reserve, 1 << 30);
    assert_eq!(p.default_fs(), "xfs");
    assert_eq!(p.kind(), PoolKind::File);
    assert_eq!(pool(&root, Arc::new(FakeExec::new())).default_fs(), "ext4");
}

#[tokio::test]
async fn open_refuses_invalid_configs() {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(FakeExec::new());
    let freezer = Arc::new(Freezer::unrecorded(exec.clone()));
    let p = crate::pool::open(&config(dir.path(), ""), exec.clone(), freezer.clone()).unwrap();
    assert_eq!(p.name(), "p1");
    let zfs = Config::parse("[[pool]]\nname = \"z\"\nkind = \"zfs\"\ndataset = \"tank/../hf\"\n").unwrap().pools.remove(0);
    let err = crate::pool::open(&zfs, exec, freezer).err().unwrap();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[tokio::test]
async fn names_never_become_paths_outside_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(FakeExec::new()));
    for bad in ["../x", "a/b", "", ".hidden", "UPPER", "a\0b"] {
        let err = p.create_volume(&req(bad, MIB, false, None)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
        assert!(matches!(p.delete_volume(bad).await, Err(Error::InvalidArgument(_))), "{bad:?}");
        assert!(matches!(p.create_snapshot("v", "s", bad, &crate::volume_id::new_uid()).await, Err(Error::InvalidArgument(_))), "{bad:?}");
    }
}

#[tokio::test]
async fn attach_reuses_the_existing_device_and_detach_detaches_it() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeExec::new());
    let p = pool(dir.path(), fake.clone());
    p.create_volume(&req("v1", MIB, true, None)).await.unwrap();
    let image = img(dir.path(), "volumes", "v1");
    let sys = dir.path().join("fake-sys-block");
    let knob = fake_discard_knob(dir.path(), "loop3");
    crate::node::loopdev::tests::fake_loop(&sys, 3, Some(&image.display().to_string()), false, false, 0);
    assert_eq!(p.attach("v1").await.unwrap(), Attachment::Loop { device: "/dev/loop3".into(), image: image.clone() });
    assert_eq!(fs::read_to_string(&knob).unwrap(), "0", "a thick volume's device passes no discard");
    // The kernel unbinds the device a moment after `losetup --detach`.
    let unbind = tokio::spawn({
        let bound = sys.join("loop3/loop");
        async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            fs::remove_dir_all(bound).unwrap();
        }
    });
    p.detach("v1").await.unwrap();
    unbind.await.unwrap();
    // issue 14: the devices of the image are read from sysfs: no `losetup --list` process.
    assert_eq!(fake.lines(), ["losetup --detach /dev/loop3"]);
    assert!(matches!(p.attach("nope").await, Err(Error::NotFound(_))));
}

// issue 14: no losetup process per delete
/// Deleting a volume checks in sysfs that its image is not attached: refused while it is,
/// and neither answer starts a process.
#[tokio::test]
async fn delete_checks_the_attachment_in_sysfs_without_a_process() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeExec::new());
    let p = pool(dir.path(), fake.clone());
    let sys = dir.path().join("fake-sys-block");
    fs::create_dir_all(&sys).unwrap();
    p.create_volume(&thin(req("v1", MIB, false, None))).await.unwrap();
    p.create_volume(&thin(req("v2", MIB, false, None))).await.unwrap();
    crate::node::loopdev::tests::fake_loop(&sys, 7, Some(&img(dir.path(), "volumes", "v1").display().to_string()), false, false, 0);
    let err = p.delete_volume("v1").await.unwrap_err();
    assert_eq!(err.to_string(), "volume v1 is still attached to /dev/loop7: unstage it on this node first");
    assert!(p.get_volume("v1").await.unwrap().is_some());
    p.delete_volume("v2").await.unwrap();
    assert!(p.get_volume("v2").await.unwrap().is_none());
    assert!(fake.lines().is_empty(), "{:?}", fake.lines());
}

#[tokio::test]
async fn delete_refuses_an_attached_volume() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeExec::new());
    let p = pool(dir.path(), fake.clone());
    p.create_volume(&req("v1", MIB, false, None)).await.unwrap();
    fake.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[{"name":"/dev/loop7","back-file":"/x"}]}"#.into())]);
    let err = p.delete_volume("v1").await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    assert_eq!(err.to_string(), "volume v1 is still attached to /dev/loop7: unstage it on this node first");
    assert!(p.get_volume("v1").await.unwrap().is_some());
}

#[tokio::test]
async fn expand_refreshes_every_attached_device() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeExec::new());
    let p = pool(dir.path(), fake.clone());
    p.create_volume(&req("v1", MIB, false, None)).await.unwrap();
    fake.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[{"name":"/dev/loop7","back-file":"/x"}]}"#.into())]);
    assert_eq!(p.expand_volume("v1", 3 * MIB).await.unwrap(), 3 * MIB);
    assert_eq!(fake.lines().last().unwrap(), "losetup --set-capacity /dev/loop7");
    assert_eq!(fs::metadata(img(dir.path(), "volumes", "v1")).unwrap().len(), 3 * MIB);
    assert_eq!(p.get_volume("v1").await.unwrap().unwrap().capacity, 3 * MIB);
    let calls = fake.lines().len();
    assert_eq!(p.expand_volume("v1", 2 * MIB).await.unwrap(), 3 * MIB, "never shrinks");
    assert_eq!(fake.lines().len(), calls, "nothing to do");
    assert!(matches!(p.expand_volume("nope", MIB).await, Err(Error::NotFound(_))));
}

/// A volume on /dev/loop3 mounted at /mnt/vol, per a fake mount table.
fn mounted_source(dir: &Path) -> (Arc<RealCp>, FilePool) {
    let fake = Arc::new(RealCp(FakeExec::new()));
    let table = Arc::new(FakeMounter::new());
    let text = "22 1 0:21 / /proc rw - proc proc rw\n36 22 7:3 / /mnt/vol rw,relatime shared:1 - ext4 /dev/loop3 rw\n";
    for line in crate::node::mountinfo::parse(text).unwrap() {
        table.add_line(line);
    }
    let freezer = Arc::new(Freezer::unrecorded(fake.clone()).with_mounter(table));
    let p = pool(&dir.join("pool"), fake.clone()).with_freezer(freezer);
    (fake, p)
}

#[tokio::test]
async fn snapshot_freezes_a_mounted_source_around_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, p) = mounted_source(dir.path());
    p.create_volume(&req("v1", MIB, false, None)).await.unwrap();
    fake.0.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[{"name":"/dev/loop3","back-file":"/x"}]}"#.into())]);
    let s = p.create_snapshot("v1", "snap-1", "s1", &crate::volume_id::new_uid()).await.unwrap();
    assert_eq!((s.size, s.source_volume.as_str(), s.ready), (MIB, "v1", true));
    let src = img(&dir.path().join("pool"), "volumes", "v1");
    assert_eq!(
        fake.0.lines(),
        [
            format!("losetup --list --json --associated {}", src.display()),
            "fsfreeze --freeze /mnt/vol".into(),
            // Written through a descriptor of the temporary, never by path (issue 10 item 4).
            format!("cp --reflink=auto --sparse=always {} /proc/self/fd/0", src.display()),
            "fsfreeze --unfreeze /mnt/vol".into(),
        ]
    );
    assert!(img(&dir.path().join("pool"), "snapshots", "s1").exists());
    assert_eq!(p.create_snapshot("v1", "snap-1", "s1", &crate::volume_id::new_uid()).await.unwrap(), s, "idempotent");
}

#[tokio::test]
async fn a_failed_copy_still_thaws_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, p) = mounted_source(dir.path());
    p.create_volume(&req("v1", MIB, false, None)).await.unwrap();
    fake.0.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[{"name":"/dev/loop3","back-file":"/x"}]}"#.into())]);
    fake.0.on("cp", vec![Reply::Fail(1, "cp: No space left on device".into())]);
    let err = p.create_snapshot("v1", "snap-1", "s1", &crate::volume_id::new_uid()).await.unwrap_err();
    assert!(err.to_string().contains("No space left on device"), "{err}");
    let lines = fake.0.lines();
    let programs: Vec<&str> = lines.iter().map(|l| l.split(' ').take(2).last().unwrap()).collect();
    assert_eq!(programs, ["--list", "--freeze", "--reflink=auto", "--unfreeze"]);
    assert!(p.get_snapshot("s1").await.unwrap().is_none());
    assert_eq!(fs::read_dir(dir.path().join("pool/snapshots")).unwrap().count(), 0, "no leftovers");
}

#[tokio::test]
async fn a_failed_freeze_skips_the_copy_and_a_failed_thaw_is_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, p) = mounted_source(dir.path());
    p.create_volume(&req("v1", MIB, false, None)).await.unwrap();
    fake.0.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[{"name":"/dev/loop3","back-file":"/x"}]}"#.into())]);
    fake.0.on("fsfreeze --freeze", vec![Reply::Fail(1, "fsfreeze: /mnt/vol: freeze failed: Operation not supported".into())]);
    let err = p.create_snapshot("v1", "snap-1", "s1", &crate::volume_id::new_uid()).await.unwrap_err();
    // The one freeze policy (issue 9): a mounted filesystem that cannot be frozen is
    // FAILED_PRECONDITION saying so (it was INTERNAL "freezing /mnt/vol" before).
    assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains("/mnt/vol cannot be frozen")), "{err}");
    assert!(!fake.0.lines().iter().any(|l| l.starts_with("cp ")), "no unfrozen copy");

    fake.0.on("fsfreeze --freeze", vec![Reply::Ok(String::new())]);
    fake.0.on("fsfreeze --unfreeze", vec![Reply::Fail(1, "fsfreeze: /mnt/vol: unfreeze failed".into())]);
    let err = p.create_snapshot("v1", "snap-1", "s1", &crate::volume_id::new_uid()).await.unwrap_err();
    assert!(err.to_string().contains("fsfreeze --unfreeze /mnt/vol"), "{err}");
    assert!(p.get_snapshot("s1").await.unwrap().is_none());
}

#[tokio::test]
async fn a_clone_copies_the_source_image() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(RealCp(FakeExec::new()));
    fake.0.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[]}"#.into())]);
    let p = pool(dir.path(), fake.clone());
    p.create_volume(&req("v1", MIB, true, None)).await.unwrap();
    let src = img(dir.path(), "volumes", "v1");
    write_at(&src, 4096, b"hello");
    let v = p.create_volume(&req("v2", 2 * MIB, true, Some(Source::Volume("v1".into())))).await.unwrap();
    assert_eq!(v.source, Some(Source::Volume("v1".into())));
    let lines = fake.0.lines();
    // Written through a descriptor of the temporary, never by path (issue 10 item 4).
    assert_eq!(lines.last().unwrap(), &format!("cp --reflink=auto --sparse=always {} /proc/self/fd/0", src.display()));
    let copy = img(dir.path(), "volumes", "v2");
    assert_eq!(read_at(&copy, 4096, 5), b"hello");
    assert_eq!(fs::metadata(&copy).unwrap().len(), 2 * MIB);
}

#[tokio::test]
async fn a_clone_records_the_size_it_really_copied() {
    // The source's image is larger than its record says: an expansion grew the file and has
    // not written the record yet (running, or killed in between). The clone copies the larger
    // image, so it must say so: a record smaller than the device would hide data (issue 10 item 6).
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(RealCp(FakeExec::new()));
    fake.0.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[]}"#.into())]);
    let p = pool(dir.path(), fake.clone());
    p.create_volume(&req("v1", MIB, true, None)).await.unwrap();
    let src = img(dir.path(), "volumes", "v1");
    write_at(&src, 3 * MIB - 5, b"tail!");
    let v = p.create_volume(&req("v2", 2 * MIB, true, Some(Source::Volume("v1".into())))).await.unwrap();
    let copy = img(dir.path(), "volumes", "v2");
    assert_eq!(fs::metadata(&copy).unwrap().len(), 3 * MIB);
    assert_eq!(v.capacity, 3 * MIB, "the capacity of what was copied, not the 2 MiB asked");
    assert_eq!(p.get_volume("v2").await.unwrap().unwrap().capacity, 3 * MIB, "and so says the record");
    assert_eq!(read_at(&copy, 3 * MIB - 5, 5), b"tail!");
    // A retry of the same request finds it (more than asked is what a copy may have).
    let again = p.create_volume(&req("v2", 2 * MIB, true, Some(Source::Volume("v1".into())))).await.unwrap();
    assert_eq!(again, v);
    // A copy of a source that did not grow keeps the size asked when larger.
    let big = p.create_volume(&req("v3", 4 * MIB, true, Some(Source::Volume("v1".into())))).await.unwrap();
    assert_eq!(big.capacity, 4 * MIB);
}

#[tokio::test]
async fn condition_reports_missing_and_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(FakeExec::new()));
    for v in ["ok", "gone", "damaged", "short"] {
        p.create_volume(&req(v, 2 * MIB, false, None)).await.unwrap();
    }
    fs::remove_file(img(dir.path(), "volumes", "gone")).unwrap();
    fs::write(dir.path().join("volumes/damaged.json"), "{not json").unwrap();
    OpenOptions::new().write(true).open(img(dir.path(), "volumes", "short")).unwrap().set_len(MIB).unwrap();
    struct Case {
        local: &'static str,
        want: &'static str,
    }
    let cases = [
        Case { local: "ok", want: "" },
        Case { local: "gone", want: "gone.img is missing" },
        Case { local: "damaged", want: "damaged.json is unreadable" },
        Case { local: "short", want: "smaller than the volume's" },
    ];
    for c in cases {
        match p.condition(c.local).await.unwrap() {
            Condition::Healthy => assert_eq!(c.want, "", "{}", c.local),
            Condition::Abnormal(m) => assert!(!c.want.is_empty() && m.contains(c.want), "{}: {m}", c.local),
        }
    }
    assert!(matches!(p.condition("nope").await, Err(Error::NotFound(_))));
    let mut names: Vec<String> = p.list_volumes().await.unwrap().into_iter().map(|v| v.local).collect();
    names.sort();
    assert_eq!(names, ["gone", "ok", "short"], "a damaged entry is skipped, not fatal");
}

/// Real files, real losetup: the whole life of a volume.
#[tokio::test]
async fn real_volume_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Cleanup { mounts: vec![], dir: dir.path().to_owned() };
    let p = real_pool(dir.path());
    let r = req("v1", 64 * MIB, false, None);
    let v = p.create_volume(&r).await.unwrap();
    assert_eq!((v.local.as_str(), v.csi_name.as_str(), v.capacity, v.fs_type.as_deref()), ("v1", "csi-v1", 64 * MIB, Some("ext4")));
    assert_eq!(p.create_volume(&r).await.unwrap(), v, "idempotent");
    assert_eq!(p.get_volume("v1").await.unwrap(), Some(v.clone()));
    assert_eq!(p.list_volumes().await.unwrap(), vec![v.clone()]);
    // Thick by default: every block is allocated, nothing more is promised.
    assert!(fs::metadata(img(dir.path(), "volumes", "v1")).unwrap().blocks() * 512 >= 64 * MIB, "thick is allocated");
    assert_eq!(p.promised().unwrap(), 0, "a thick volume holds what it was promised");
    let t = p.create_volume(&thin(req("t1", 32 * MIB, false, None))).await.unwrap();
    assert_eq!(p.promised().unwrap(), 32 * MIB, "a fresh thin volume promises all of it");
    assert!(matches!(p.create_volume(&thin(r.clone())).await, Err(Error::AlreadyExists(_))), "provisioning is compared");
    let mut bad = r.clone();
    bad.parameters.insert(PARAM_PROVISIONING.into(), "lazy".into());
    let err = p.create_volume(&bad).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("provisioning=\"lazy\""), "{err}");
    p.delete_volume(&t.local).await.unwrap();

    struct Case {
        name: &'static str,
        req: CreateRequest,
    }
    let cases = [
        Case { name: "capacity", req: CreateRequest { capacity: 128 * MIB, ..r.clone() } },
        Case { name: "csi name", req: CreateRequest { csi_name: "other".into(), ..r.clone() } },
        Case { name: "block", req: CreateRequest { block: true, ..r.clone() } },
        Case { name: "source", req: CreateRequest { source: Some(Source::Snapshot("s".into())), ..r.clone() } },
    ];
    for c in cases {
        let err = p.create_volume(&c.req).await.unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{}: {err}", c.name);
    }

    let attached = p.attach("v1").await.unwrap();
    let Attachment::Loop { device: dev, image } = attached.clone() else { panic!("{attached:?}") };
    assert_eq!(image, img(dir.path(), "volumes", "v1"), "the device's image is the volume's");
    assert_eq!(p.attach("v1").await.unwrap(), attached, "attach twice, one device");
    assert!(matches!(p.delete_volume("v1").await, Err(Error::FailedPrecondition(_))));
    assert_eq!(p.expand_volume("v1", 96 * MIB).await.unwrap(), 96 * MIB);
    assert!(fs::metadata(img(dir.path(), "volumes", "v1")).unwrap().blocks() * 512 >= 96 * MIB, "expansion allocates the new space");
    let sectors = fs::read_to_string(format!("/sys/class/block/{}/size", dev.file_name().unwrap().to_string_lossy())).unwrap();
    assert_eq!(sectors.trim().parse::<u64>().unwrap() * 512, 96 * MIB, "the loop device sees the growth");
    p.detach("v1").await.unwrap();
    p.detach("v1").await.unwrap();
    assert!(
        loopdev::find(
            loopdev::Loops { exec: &RealExec, sys_block: Path::new("/sys/block"), domain: "test" },
            &img(dir.path(), "volumes", "v1")
        )
        .await
        .unwrap()
        .is_empty()
    );

    p.delete_volume("v1").await.unwrap();
    p.delete_volume("v1").await.unwrap();
    assert_eq!(p.get_volume("v1").await.unwrap(), None);
    assert_eq!(fs::read_dir(dir.path().join("volumes")).unwrap().count(), 0);
}

#[tokio::test]
async fn real_room_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(RealExec));
    let free = p.capacity().await.unwrap();
    assert!(free > 0);
    let err = p.create_volume(&req("huge", 1 << 60, false, None)).await.unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("file pool \"p1\"") && msg.contains("volume huge") && msg.contains("1048576 TiB requested"), "{msg}");
    assert_eq!(fs::read_dir(dir.path().join("volumes")).unwrap().count(), 0, "nothing left behind");

    // The reserve is kept free: with all free space reserved, nothing fits.
    let reserved = FilePool::new(&config(dir.path(), &format!("reserve = \"{}\"\n", free + (1 << 30))), Arc::new(RealExec)).unwrap();
    assert_eq!(reserved.capacity().await.unwrap(), 0);
    assert!(matches!(reserved.create_volume(&req("v", MIB, false, None)).await, Err(Error::ResourceExhausted(_))));
}

#[tokio::test]
async fn real_leftovers_are_invisible_and_cleaned_by_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(RealExec));
    let vols = dir.path().join("volumes");
    // A crash before the commit: a temporary image, a temporary metadata file, and an
    // image already renamed into place without its metadata.
    fs::write(vols.join(".v1.img.tmp"), b"half").unwrap();
    fs::write(vols.join(".v1.json.tmp"), b"{").unwrap();
    fs::write(vols.join("v1.img"), b"stale data").unwrap();
    assert_eq!(p.get_volume("v1").await.unwrap(), None);
    assert!(p.list_volumes().await.unwrap().is_empty());
    assert_eq!(p.promised().unwrap(), 0);
    p.create_volume(&req("v1", MIB, true, None)).await.unwrap();
    let mut names: Vec<String> = fs::read_dir(&vols).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["v1.img", "v1.json"]);
    assert_eq!(read_at(&vols.join("v1.img"), 0, 10), vec![0; 10], "a fresh image, not the stale one");

    // A crash in the middle of a delete: metadata gone, image still there.
    fs::remove_file(vols.join("v1.json")).unwrap();
    p.delete_volume("v1").await.unwrap();
    assert_eq!(fs::read_dir(&vols).unwrap().count(), 0);
}

/// Snapshot, change the volume, restore: the restore holds the snapshot's bytes.
#[tokio::test]
async fn real_snapshot_and_restore_keep_content() {
    let dir = tempfile::tempdir().unwrap();
    let p = real_pool(dir.path());
    p.create_volume(&req("v1", 8 * MIB, true, None)).await.unwrap();
    let v1 = img(dir.path(), "volumes", "v1");
    write_at(&v1, 0, b"first block");
    write_at(&v1, 5 * MIB, b"far away");

    let s = p.create_snapshot("v1", "snap-1", "s1", &crate::volume_id::new_uid()).await.unwrap();
    assert_eq!((s.size, s.csi_name.as_str()), (8 * MIB, "snap-1"));
    assert_eq!(p.create_snapshot("v1", "snap-1", "s1", &crate::volume_id::new_uid()).await.unwrap(), s, "idempotent");
    assert_eq!(p.list_snapshots().await.unwrap(), vec![s.clone()]);
    p.create_volume(&req("v9", MIB, true, None)).await.unwrap();
    assert!(
        matches!(p.create_snapshot("v9", "snap-1", "s1", &crate::volume_id::new_uid()).await, Err(Error::AlreadyExists(_))),
        "other source"
    );
    assert!(matches!(p.create_snapshot("nope", "snap-2", "s2", &crate::volume_id::new_uid()).await, Err(Error::NotFound(_))));
    write_at(&v1, 0, b"CHANGED!!!!");

    let restore = |name: &str, capacity| req(name, capacity, true, Some(Source::Snapshot("s1".into())));
    assert!(matches!(p.create_volume(&restore("r0", 4 * MIB)).await, Err(Error::OutOfRange(_))));
    assert!(matches!(p.create_volume(&req("r0", 8 * MIB, true, Some(Source::Snapshot("nope".into())))).await, Err(Error::NotFound(_))));
    assert!(matches!(p.create_volume(&req("r0", 8 * MIB, true, Some(Source::Volume("nope".into())))).await, Err(Error::NotFound(_))));
    assert_eq!(p.get_volume("r0").await.unwrap(), None);

    // Snapshots are independent copies: the source can go first.
    p.delete_volume("v1").await.unwrap();
    p.create_volume(&restore("r1", 16 * MIB)).await.unwrap();
    let r1 = img(dir.path(), "volumes", "r1");
    assert_eq!(read_at(&r1, 0, 11), b"first block");
    assert_eq!(read_at(&r1, 5 * MIB, 8), b"far away");
    assert_eq!(fs::metadata(&r1).unwrap().len(), 16 * MIB);
    assert!(fs::metadata(&r1).unwrap().blocks() * 512 >= 16 * MIB, "a thick restore is allocated, holes and growth");
    p.create_volume(&thin(restore("r2", 16 * MIB))).await.unwrap();
    let r2 = img(dir.path(), "volumes", "r2");
    assert_eq!(read_at(&r2, 5 * MIB, 8), b"far away");
    assert!(fs::metadata(&r2).unwrap().blocks() * 512 < 2 * MIB, "a thin restore keeps holes");

    p.delete_snapshot("s1").await.unwrap();
    p.delete_snapshot("s1").await.unwrap();
    assert_eq!(p.get_snapshot("s1").await.unwrap(), None);
}

/// A snapshot of a mounted ext4 volume: really frozen and thawed, and the copy is clean.
#[tokio::test]
async fn real_snapshot_of_a_mounted_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let _cleanup = Cleanup { mounts: vec![mnt.clone()], dir: dir.path().to_owned() };
    let p = real_pool(&dir.path().join("pool"));
    p.create_volume(&req("v1", 32 * MIB, false, None)).await.unwrap();
    let Attachment::Loop { device: dev, .. } = p.attach("v1").await.unwrap() else { panic!("not a loop device") };
    let run = |argv: &[&str]| {
        let st = std::process::Command::new(argv[0]).args(&argv[1..]).output().unwrap();
        assert!(st.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&st.stderr));
    };
    let (dev_s, mnt_s) = (dev.to_string_lossy().into_owned(), mnt.to_string_lossy().into_owned());
    run(&["mkfs.ext4", "-q", &dev_s]);
    run(&["mount", &dev_s, &mnt_s]);
    fs::write(mnt.join("data"), b"written before the snapshot").unwrap();

    p.create_snapshot("v1", "snap-1", "s1", &crate::volume_id::new_uid()).await.unwrap();
    // Thawed: the application can write again.
    fs::write(mnt.join("after"), b"x").unwrap();
    run(&["umount", &mnt_s]);
    p.detach("v1").await.unwrap();

    let snap = img(&dir.path().join("pool"), "snapshots", "s1");
    run(&["e2fsck", "-fn", &snap.to_string_lossy()]);
    let cat = |image: &Path| {
        let out = std::process::Command::new("debugfs").args(["-R", "cat /data", &image.to_string_lossy()]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(cat(&snap), "written before the snapshot");

    // A filesystem restore gets its own UUID, so it can be mounted beside its source.
    p.create_volume(&req("r1", 48 * MIB, false, Some(Source::Snapshot("s1".into())))).await.unwrap();
    let r1 = img(&dir.path().join("pool"), "volumes", "r1");
    assert_eq!(cat(&r1), "written before the snapshot");
    let uuid = |image: &Path| {
        let out = std::process::Command::new("blkid").args(["-p", "-s", "UUID", "-o", "value", &image.to_string_lossy()]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (before, after) = (uuid(&img(&dir.path().join("pool"), "volumes", "v1")), uuid(&r1));
    assert!(!before.is_empty() && before != after, "{before:?} vs {after:?}");
    assert_eq!(fs::metadata(&r1).unwrap().len(), 48 * MIB);
}

/// Mounts `args` (e.g. a tmpfs, or a loop image) at `dir/mnt` for a real test.
fn mount_at(dir: &Path, args: &[&str]) -> PathBuf {
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let st = std::process::Command::new("mount").args(args).arg(&mnt).output().unwrap();
    assert!(st.status.success(), "mount {args:?}: {}", String::from_utf8_lossy(&st.stderr));
    mnt
}

/// Fills the filesystem holding `dir` with a file of zeroes, up to ENOSPC.
fn fill(dir: &Path) {
    let mut f = File::create(dir.join("filler")).unwrap();
    let chunk = vec![0u8; MIB as usize];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test]
async fn real_thin_volumes_on_a_full_filesystem_are_abnormal_and_thick_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = mount_at(dir.path(), &["-t", "tmpfs", "-o", "size=16m", "tmpfs"]);
    let _cleanup = Cleanup { mounts: vec![mnt.clone()], dir: dir.path().to_owned() };
    let p = FilePool::new(&config(&mnt.join("pool"), "provisioning = \"thin\"\n"), Arc::new(RealExec)).unwrap();
    p.create_volume(&req("t", 4 * MIB, true, None)).await.unwrap();
    let mut thick = req("k", 4 * MIB, true, None);
    thick.parameters.insert(PARAM_PROVISIONING.into(), "thick".into());
    p.create_volume(&thick).await.unwrap();
    assert!(fs::metadata(img(&mnt.join("pool"), "volumes", "t")).unwrap().blocks() * 512 < MIB, "the pool's default is thin");
    assert_eq!(p.condition("t").await.unwrap(), Condition::Healthy);
    assert_eq!(p.condition("k").await.unwrap(), Condition::Healthy);
    fill(&mnt);
    match p.condition("t").await.unwrap() {
        Condition::Abnormal(m) => assert!(m.contains("thin volume") && m.contains("may still write"), "{m}"),
        Condition::Healthy => panic!("a thin volume the full pool cannot back is healthy"),
    }
    assert_eq!(p.condition("k").await.unwrap(), Condition::Healthy, "a thick volume holds its blocks");
    assert_eq!(p.capacity().await.unwrap(), 0);
}

#[tokio::test]
async fn real_btrfs_thick_images_are_nocow_and_reflink_snapshots_keep_their_size() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("btrfs.img");
    File::create(&image).unwrap().set_len(256 * MIB).unwrap();
    let st = std::process::Command::new("mkfs.btrfs").arg("-q").arg(&image).output().unwrap();
    assert!(st.status.success(), "mkfs.btrfs: {}", String::from_utf8_lossy(&st.stderr));
    let mnt = mount_at(dir.path(), &["-o", "loop", &image.to_string_lossy()]);
    let _cleanup = Cleanup { mounts: vec![mnt.clone()], dir: dir.path().to_owned() };
    let root = mnt.join("pool");
    let p = real_pool(&root);
    let nocow = |path: &Path| {
        let out = std::process::Command::new("lsattr").arg(path).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").contains('C')
    };
    p.create_volume(&req("v1", 32 * MIB, true, None)).await.unwrap();
    assert!(nocow(&img(&root, "volumes", "v1")), "a thick image on btrfs is NOCOW");
    assert_eq!(p.promised().unwrap(), 0);
    p.create_volume(&thin(req("t1", 8 * MIB, true, None))).await.unwrap();
    assert!(!nocow(&img(&root, "volumes", "t1")), "a thin image keeps copy-on-write (and compression)");
    p.delete_volume("t1").await.unwrap();

    let before = p.capacity().await.unwrap();
    p.create_snapshot("v1", "snap-1", "s1", &crate::volume_id::new_uid()).await.unwrap();
    assert!(nocow(&img(&root, "snapshots", "s1")), "a snapshot of a NOCOW image is NOCOW, so it can share its blocks");
    assert_eq!(p.promised().unwrap(), 32 * MIB, "the volume's next writes need its size again");
    let after = p.capacity().await.unwrap();
    assert!(after + 31 * MIB <= before, "capacity keeps room for the shared blocks: {before} -> {after}");

    p.create_volume(&req("r1", 32 * MIB, true, Some(Source::Snapshot("s1".into())))).await.unwrap();
    assert_eq!(p.promised().unwrap(), 64 * MIB, "a thick clone shares its source's blocks too");
    p.delete_snapshot("s1").await.unwrap();
    assert_eq!(p.promised().unwrap(), 32 * MIB);
    p.delete_volume("r1").await.unwrap();
    assert_eq!(p.promised().unwrap(), 0);
}

#[test]
fn records_written_before_provisioning_existed_read_as_thin() {
    // A volume's metadata as earlier releases wrote it (a sparse image, no provisioning).
    let old = r#"{"local":"v1","csi_name":"pvc-1","capacity":1048576,"block":false,"fs_type":"ext4","source":null,"created":1700000000}"#;
    let r: VolumeRecord = serde_json::from_str(old).unwrap();
    assert_eq!((r.provisioning, r.shared, r.info.capacity, r.info.csi_name.as_str()), (Provisioning::Thin, 0, MIB, "pvc-1"));
    let snap = r#"{"local":"s1","csi_name":"snap-1","source_volume":"v1","size":1048576,"created":1700000000,"ready":true}"#;
    let s: SnapshotRecord = serde_json::from_str(snap).unwrap();
    assert_eq!((s.shared, s.info.size), (0, MIB));
    // What is written now round-trips, and says what it is.
    let json = serde_json::to_string(&VolumeRecord { provisioning: Provisioning::Thick, shared: 7, ..r }).unwrap();
    assert!(json.contains(r#""provisioning":"thick""#) && json.contains(r#""shared":7"#), "{json}");
    let back: VolumeRecord = serde_json::from_str(&json).unwrap();
    assert_eq!((back.provisioning, back.shared), (Provisioning::Thick, 7));
    // issue 11: cluster. Records carry their schema; an old one reads as schema 0.
    assert_eq!(r.schema.0, 0);
    assert!(json.contains(r#""schema":1"#), "{json}");
    assert_eq!(back.schema.0, 1);
}

// issue 11: cluster
#[tokio::test]
async fn a_record_of_a_newer_schema_is_refused_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(FakeExec::new()));
    p.create_volume(&req("v1", MIB, false, None)).await.unwrap();
    let meta = dir.path().join("volumes/v1.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["schema"], 1, "{text}");
    v["schema"] = 7.into();
    std::fs::write(&meta, v.to_string()).unwrap();
    let err = p.get_volume("v1").await.unwrap_err().to_string();
    assert!(err.contains("record schema 7") && err.contains("upgrade holdfast"), "{err}");
}

#[tokio::test]
async fn a_thick_attach_that_cannot_turn_off_discard_fails_and_detaches() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeExec::new());
    let p = pool(dir.path(), fake.clone());
    p.create_volume(&req("v1", MIB, false, None)).await.unwrap();
    let image = img(dir.path(), "volumes", "v1");
    let on_loop9 = format!(r#"{{"loopdevices":[{{"name":"/dev/loop9","back-file":"{}"}}]}}"#, image.display());
    let none = r#"{"loopdevices":[]}"#.to_owned();
    fake.on("losetup --list", vec![Reply::Ok(none.clone()), Reply::Ok(on_loop9), Reply::Ok(none)]);
    fake.on("losetup --find", vec![Reply::Ok("/dev/loop9\n".into())]);
    // No fake knob for loop9: the limit cannot be read, as on a read-only /sys.
    let err = p.attach("v1").await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("cannot turn off discard on /dev/loop9"), "{err}");
    assert!(fake.lines().contains(&"losetup --detach /dev/loop9".to_owned()), "{:?}", fake.lines());
}

#[tokio::test]
async fn a_thin_attach_leaves_discard_alone() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeExec::new());
    let p = pool(dir.path(), fake.clone());
    p.create_volume(&thin(req("v1", MIB, false, None))).await.unwrap();
    fake.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[]}"#.into())]);
    fake.on("losetup --find", vec![Reply::Ok("/dev/loop4\n".into())]);
    let knob = fake_discard_knob(dir.path(), "loop4");
    assert_eq!(p.attach("v1").await.unwrap(), Attachment::Loop { device: "/dev/loop4".into(), image: img(dir.path(), "volumes", "v1") });
    assert_eq!(fs::read_to_string(&knob).unwrap(), "4294966784\n", "a thin volume's trims give space back");
}

// issue 14: the index
/// The index's promises equal what the files say after every kind of change, an attached
/// image is measured anew (its writes are not the pool's), a change made by hand is noticed,
/// and a restarted pool rebuilds the same index, finding attached images in the kernel's list.
#[tokio::test]
async fn the_index_promises_what_the_files_say() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(RealExec));
    let same = |p: &FilePool, what: &str| {
        let disk = p.promised().unwrap();
        assert_eq!(p.index.promised().unwrap(), disk, "{what}: index and files differ");
        disk
    };
    p.create_volume(&req("v1", 4 * MIB, false, None)).await.unwrap();
    assert_eq!(same(&p, "thick"), 0);
    p.create_volume(&thin(req("t1", 8 * MIB, false, None))).await.unwrap();
    assert_eq!(same(&p, "thin"), 8 * MIB);
    p.expand_volume("t1", 12 * MIB).await.unwrap();
    assert_eq!(same(&p, "thin expanded"), 12 * MIB);
    p.modify_volume("t1", PARAM_PROVISIONING, "thick").await.unwrap();
    assert_eq!(same(&p, "made thick"), 0);
    p.create_volume(&thin(req("t2", 8 * MIB, false, None))).await.unwrap();
    p.create_snapshot("t2", "s", "s1", "uid").await.unwrap();
    same(&p, "snapshot");

    // Written while attached: measured anew, then kept as detached.
    p.index.set_attached("t2", true).unwrap();
    write_at(&img(dir.path(), "volumes", "t2"), 0, &vec![1u8; 2 * MIB as usize]);
    assert_eq!(same(&p, "written while attached"), 6 * MIB);
    p.index.set_attached("t2", false).unwrap();
    assert_eq!(same(&p, "detached"), 6 * MIB);
    p.delete_snapshot("s1").await.unwrap();
    p.delete_volume("v1").await.unwrap();
    same(&p, "deleted");
    let names = |p: &FilePool| {
        let ix = p.index.volumes().unwrap();
        ix.into_iter().map(|r| r.info.local.clone()).collect::<Vec<_>>()
    };
    assert_eq!(names(&p), ["t1", "t2"]);

    // By hand: a volume's files removed while the driver is idle.
    fs::remove_file(dir.path().join("volumes/t1.json")).unwrap();
    assert_eq!(names(&p), ["t2"], "a change behind the pool's back is noticed");
    let listed: Vec<String> = p.list_volumes().await.unwrap().into_iter().map(|v| v.local).collect();
    assert_eq!(listed, ["t2"]);

    // A restart: t2 attached (as the kernel shows it) is measured anew after it is written.
    let back = dir.path().join("fake-sys-block/loop7/loop");
    fs::create_dir_all(&back).unwrap();
    fs::write(back.join("backing_file"), format!("{}\n", img(dir.path(), "volumes", "t2").display())).unwrap();
    let q = pool(dir.path(), Arc::new(FakeExec::new()));
    assert_eq!(names(&q), ["t2"]);
    write_at(&img(dir.path(), "volumes", "t2"), 4 * MIB, &vec![1u8; MIB as usize]);
    assert_eq!(same(&q, "restarted, attached"), 5 * MIB);
}

/// A creation reads no other volume's files: the index answers for them, so its cost does not
/// grow with the pool (issue 14). Every other volume's metadata is made unreadable (in place,
/// which the directory's mtime does not show): a create that read them would skip them and
/// count less, one that listed them would fail nothing but differ in what it promises.
#[tokio::test]
async fn a_create_reads_no_other_volumes_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(FakeExec::new()));
    for i in 0..20 {
        p.create_volume(&thin(req(&format!("t{i}"), MIB, false, None))).await.unwrap();
    }
    for i in 0..20 {
        fs::write(dir.path().join(format!("volumes/t{i}.json")), "{damaged").unwrap();
    }
    let before = p.capacity().await.unwrap();
    p.create_volume(&req("v", MIB, false, None)).await.unwrap();
    assert_eq!(p.index.volumes().unwrap().len(), 21, "the damaged records were not re-read");
    // The 20 thin volumes still promise their 20 MiB: the room fell by the new volume only.
    assert!(before - p.capacity().await.unwrap() <= 2 * MIB, "room before {before}");
}

// issue 14: flat
/// A page of the listing is a range of the index in name order: from the token's name, as
/// many as asked, no file read (every record is damaged in place, which a read would show).
#[tokio::test]
async fn a_page_of_the_listing_is_a_range_of_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(FakeExec::new()));
    for i in [3, 0, 9, 1, 7, 2, 8, 4, 6, 5] {
        p.create_volume(&thin(req(&format!("v{i}"), MIB, false, None))).await.unwrap();
    }
    for i in 0..10 {
        fs::write(dir.path().join(format!("volumes/v{i}.json")), "{damaged").unwrap();
    }
    let names = |vs: Vec<Arc<VolumeInfo>>| vs.into_iter().map(|v| v.local.clone()).collect::<Vec<_>>();
    assert_eq!(names(p.list_volumes_from("v3", 3).await.unwrap()), ["v3", "v4", "v5"]);
    assert_eq!(names(p.list_volumes_from("v35", 2).await.unwrap()), ["v4", "v5"], "from a name that is gone");
    assert_eq!(names(p.list_volumes_from("v8", 5).await.unwrap()), ["v8", "v9"], "the end of the pool");
    assert_eq!(p.list_volumes_from("", usize::MAX).await.unwrap().len(), 10);
}

/// The conditions of a page, read in one pass, are what `condition` says of each volume.
#[tokio::test]
async fn a_pages_conditions_are_each_volumes_condition() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(FakeExec::new()));
    for name in ["ok", "noimg", "damaged", "short"] {
        p.create_volume(&thin(req(name, MIB, false, None))).await.unwrap();
    }
    fs::remove_file(dir.path().join("volumes/noimg.img")).unwrap();
    fs::write(dir.path().join("volumes/damaged.json"), "{damaged").unwrap();
    fs::File::options().write(true).open(dir.path().join("volumes/short.img")).unwrap().set_len(MIB / 2).unwrap();
    let locals: Vec<String> = ["ok", "noimg", "damaged", "short", "gone"].iter().map(|s| s.to_string()).collect();
    let batch = p.conditions(&locals).await;
    assert_eq!(batch.len(), locals.len());
    for (local, got) in locals.iter().zip(batch) {
        let want = p.condition(local).await;
        match (got, want) {
            (Ok(g), Ok(w)) => assert_eq!(g, w, "{local}"),
            (Err(Error::NotFound(_)), Err(Error::NotFound(_))) => assert_eq!(local, "gone"),
            (g, w) => panic!("{local}: batch {g:?}, alone {w:?}"),
        }
    }
    assert_eq!(p.condition("ok").await.unwrap(), Condition::Healthy);
    for abnormal in ["noimg", "damaged", "short"] {
        assert!(matches!(p.condition(abnormal).await.unwrap(), Condition::Abnormal(_)), "{abnormal}");
    }
}

// issue 14: the create's fsyncs on one thread
/// A new volume's metadata and image are both fsynced before either is renamed into place,
/// the metadata first (its journal commit covers the image's earlier changes), then the
/// directory once after the renames: one fsync each, in this order every time (both from the
/// calling thread: no thread is started per create), the directory (which makes the renames
/// durable) last. Thin and thick alike.
#[tokio::test]
async fn a_create_fsyncs_the_metadata_then_the_image_then_the_directory() {
    for provisioning in ["thin", "thick"] {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path(), Arc::new(FakeExec::new()));
        let mut r = req("v1", MIB, false, None);
        r.parameters.insert(PARAM_PROVISIONING.into(), provisioning.into());
        p.create_volume(&r).await.unwrap();
        let volumes = dir.path().join("volumes");
        let fsyncs = crate::store::fsyncs_of(&volumes);
        assert_eq!(fsyncs, [volumes.join(".v1.json.tmp"), volumes.join(".v1.img.tmp"), volumes.clone()], "{provisioning}");
        assert!(volumes.join("v1.img").exists() && volumes.join("v1.json").exists());
        assert_eq!(fs::metadata(volumes.join("v1.img")).unwrap().len(), MIB);
    }
}

// issue 14: flat
/// A page's conditions read no record that did not change: each record file is stat'ed and
/// compared with the stamp the index took when it read or wrote it (reads counted by the
/// store). What a read would show is still shown: a missing image, a record damaged in place
/// with its mtime set back (its ctime moved), a record replaced, a record changed in place.
#[tokio::test]
async fn a_page_reads_only_the_records_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(dir.path(), Arc::new(FakeExec::new()));
    p.index.set_racy(Duration::ZERO);
    let locals: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
    for l in &locals {
        p.create_volume(&thin(req(l, MIB, false, None))).await.unwrap();
    }
    let vols = dir.path().join("volumes");
    let reads = || store::reads::of(&vols);
    let abnormal = |c: &Result<Condition>| match c {
        Ok(Condition::Abnormal(m)) => m.clone(),
        other => panic!("not abnormal: {other:?}"),
    };
    let start = reads();
    let page = p.conditions(&locals).await;
    assert!(page.iter().all(|c| matches!(c, Ok(Condition::Healthy))), "{page:?}");
    assert_eq!(reads() - start, 0, "no record of an unchanged volume is read");

    // In place: same inode, same size, the mtime set back; only the ctime tells.
    let meta = vols.join("v2.json");
    let mtime = fs::metadata(&meta).unwrap().modified().unwrap();
    let f = OpenOptions::new().write(true).open(&meta).unwrap();
    f.write_all_at(b"#", 0).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(mtime)).unwrap();
    drop(f);
    // Changed in place, still valid: what it says now is judged.
    let text = fs::read_to_string(vols.join("v4.json")).unwrap();
    let bigger = text.replace(&format!("\"capacity\": {MIB}"), &format!("\"capacity\": {}", 4 * MIB));
    assert_ne!(text, bigger, "{text}");
    fs::write(vols.join("v4.json"), bigger).unwrap();
    for round in 0..2 {
        let start = reads();
        let page = p.conditions(&locals).await;
        assert_eq!(reads() - start, 2, "round {round}: v2 and v4 are read (each time: they differ from the index)");
        assert!(abnormal(&page[2]).contains("v2.json is unreadable"), "{}", abnormal(&page[2]));
        assert!(abnormal(&page[4]).contains("smaller than the volume's"));
        for (i, c) in page.iter().enumerate().filter(|(i, _)| ![2, 4].contains(i)) {
            assert_eq!(c.as_ref().unwrap(), &Condition::Healthy, "v{i}");
        }
    }
    // Files removed or renamed change the directory: the index is read again (module doc).
    fs::remove_file(vols.join("v1.img")).unwrap();
    fs::copy(vols.join("v3.json"), vols.join("v3.copy")).unwrap();
    fs::rename(vols.join("v3.copy"), vols.join("v3.json")).unwrap();
    let page = p.conditions(&locals).await;
    assert!(abnormal(&page[1]).contains("v1.img is missing"));
    assert!(abnormal(&page[2]).contains("v2.json is unreadable"));
    assert_eq!(page[3].as_ref().unwrap(), &Condition::Healthy);
    assert!(abnormal(&page[4]).contains("smaller than the volume's"));
    let start = reads();
    let again = p.conditions(&locals).await;
    assert_eq!(reads() - start, 1, "only the damaged record (which the index cannot hold) is read");
    assert_eq!(format!("{page:?}"), format!("{again:?}"));
}

// issue 14: flat
/// A page of an unchanged pool shares the index's records: the same allocation on every page
/// (no copy per volume per page), until the volume changes, which a page then shows.
#[tokio::test]
async fn pages_of_an_unchanged_pool_share_the_indexs_records() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeExec::new());
    let p = pool(dir.path(), fake.clone());
    for i in 0..3 {
        p.create_volume(&thin(req(&format!("v{i}"), MIB, false, None))).await.unwrap();
    }
    fake.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[]}"#.into())]);
    let first = p.list_volumes_from("", 10).await.unwrap();
    let again = p.list_volumes_from("v0", 10).await.unwrap();
    assert_eq!(first.len(), 3);
    for (a, b) in first.iter().zip(&again) {
        assert!(Arc::ptr_eq(a, b), "{} was copied for the second page", a.local);
    }
    p.expand_volume("v1", 2 * MIB).await.unwrap();
    let after = p.list_volumes_from("", 10).await.unwrap();
    assert_eq!(after[1].capacity, 2 * MIB, "the change shows");
    assert!(!Arc::ptr_eq(&first[1], &after[1]));
    assert!(Arc::ptr_eq(&first[0], &after[0]) && Arc::ptr_eq(&first[2], &after[2]), "the others are still shared");
}

// issue 14: flat
/// A record whose ctime is within the timestamps' granularity of its stamp is read again each
/// time: a second write in the same clock tick could leave every field of its stat the same.
#[tokio::test]
async fn a_record_written_just_now_is_read_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(FakeExec::new()));
    p.create_volume(&thin(req("v", MIB, false, None))).await.unwrap();
    let vols = dir.path().join("volumes");
    let start = store::reads::of(&vols);
    for _ in 0..2 {
        assert_eq!(p.conditions(&["v".to_owned()]).await[0].as_ref().unwrap(), &Condition::Healthy);
    }
    assert_eq!(store::reads::of(&vols) - start, 2);
}

// issue 14: one hand-off per create and per delete
/// A create of an empty thin volume hands one call to the blocking pool (the retry check, leftovers,
/// room, image, commit and index on one thread), a survey one (records of both names and the
/// room), a delete one (sysfs, removals, index): before, about ten per create. No process.
#[tokio::test]
async fn an_empty_volume_is_made_and_deleted_in_one_blocking_call_each() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeExec::new());
    let p = pool(dir.path(), fake.clone());
    fs::create_dir_all(dir.path().join("fake-sys-block")).unwrap();
    let counted = |before: usize| crate::blocking::hand_offs() - before;

    let start = crate::blocking::hand_offs();
    let survey = p.survey(&["v1", "v1legacy"]).await.unwrap();
    assert_eq!(counted(start), 1, "the survey");
    assert!(survey.found.is_none());
    assert_eq!(survey.free, Some(p.capacity().await.unwrap()), "the room as capacity() says it");
    assert_eq!(survey.unit, Some(MIB));

    // Thick volumes take the general path (their allocation has a deadline of its own).
    for provisioning in ["thin"] {
        let local = format!("v-{provisioning}");
        let mut r = req(&local, MIB, false, None);
        r.parameters.insert(PARAM_PROVISIONING.into(), provisioning.into());
        let start = crate::blocking::hand_offs();
        let made = p.create_surveyed(&r, &Survey::default()).await.unwrap();
        assert_eq!(counted(start), 1, "{provisioning}: a surveyed create");
        assert_eq!(made.capacity, MIB);
        let start = crate::blocking::hand_offs();
        assert_eq!(p.create_volume(&r).await.unwrap(), made, "a retry answers the volume");
        assert_eq!(counted(start), 1, "{provisioning}: a create that looks first");
        let start = crate::blocking::hand_offs();
        p.delete_volume(&local).await.unwrap();
        assert_eq!(counted(start), 1, "{provisioning}: a delete");
    }
    let start = crate::blocking::hand_offs();
    p.create_volume(&thin(req("v2", MIB, false, None))).await.unwrap();
    assert_eq!(counted(start), 1, "a create not surveyed");
    let found = p.survey(&["v9", "v2"]).await.unwrap().found;
    assert_eq!(found.map(|(i, v)| (i, v.local)), Some((1, "v2".to_owned())));
    assert!(fake.lines().is_empty(), "{:?}", fake.lines());
    assert_eq!(p.promised().unwrap(), p.index.promised().unwrap(), "the index is true");
}

// issue 14: one fsync per delete
/// A delete removes the metadata, then the image and the temporaries, then fsyncs the
/// directory once: durable when it answers. A retry that finds nothing fsyncs again (the
/// attempt before may have been killed before its fsync). What a power cut before that fsync
/// can leave (any of the removals undone) is finished by the retry the orchestrator makes:
/// metadata without its image is listed as abnormal and cannot be attached meanwhile.
#[tokio::test]
async fn a_delete_fsyncs_the_directory_once_after_every_removal() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool(dir.path(), Arc::new(FakeExec::new()));
    fs::create_dir_all(dir.path().join("fake-sys-block")).unwrap();
    let vols = dir.path().join("volumes");
    let fsyncs_since = |n: usize| crate::store::fsyncs_of(&vols)[n..].to_vec();
    p.create_volume(&thin(req("v1", MIB, false, None))).await.unwrap();
    fs::write(vols.join(".v1.img.tmp"), b"a leftover").unwrap();
    let n = crate::store::fsyncs_of(&vols).len();
    p.delete_volume("v1").await.unwrap();
    assert_eq!(fsyncs_since(n), std::slice::from_ref(&vols), "one fsync, of the directory");
    assert_eq!(fs::read_dir(&vols).unwrap().count(), 0, "every file removed");
    let n = crate::store::fsyncs_of(&vols).len();
    p.delete_volume("v1").await.unwrap();
    assert_eq!(fsyncs_since(n), std::slice::from_ref(&vols), "a retry that finds nothing makes it durable too");

    // A power cut before the fsync undid the image's removal only: a leftover the retry removes.
    p.create_volume(&thin(req("v2", MIB, false, None))).await.unwrap();
    fs::remove_file(vols.join("v2.json")).unwrap();
    assert_eq!(p.get_volume("v2").await.unwrap(), None);
    p.delete_volume("v2").await.unwrap();
    assert_eq!(fs::read_dir(&vols).unwrap().count(), 0);
    // ... or the metadata's only (a filesystem that does not keep the order): abnormal, not
    // attachable, and the retry removes it.
    p.create_volume(&thin(req("v3", MIB, false, None))).await.unwrap();
    fs::remove_file(vols.join("v3.img")).unwrap();
    let listed: Vec<String> = p.list_volumes().await.unwrap().into_iter().map(|v| v.local).collect();
    assert_eq!(listed, ["v3"]);
    match p.condition("v3").await.unwrap() {
        Condition::Abnormal(m) => assert!(m.contains("v3.img is missing"), "{m}"),
        c => panic!("{c:?}"),
    }
    assert!(matches!(p.attach("v3").await, Err(Error::FailedPrecondition(_))));
    p.delete_volume("v3").await.unwrap();
    assert_eq!(p.get_volume("v3").await.unwrap(), None);
    assert_eq!(fs::read_dir(&vols).unwrap().count(), 0);
}
