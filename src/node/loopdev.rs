//! Loop devices for `file` pool volumes, through `losetup` (JSON output): attach a backing file
//! (reusing an existing attachment), find the devices of a file, refresh capacity, detach.
//!
//! Finding a file's devices reads `/sys/block/loop*/loop/` in-process (issue 14: what
//! `losetup --associated` reads, without a process per check): a device is the file's when its
//! backing file, resolved, is the same inode on the same device as the file. When that cannot
//! be decided (sysfs unreadable, a backing file that does not resolve: set up from another mount
//! namespace) `losetup --list --associated` answers, which compares the inode the kernel holds.
//!
//! Direct I/O (`--direct-io=on`) is deliberately not used: it needs a backing filesystem that
//! supports `O_DIRECT` with a matching logical sector size (tmpfs does not), and losetup's
//! fallback when it cannot be enabled differs between util-linux versions. Buffered loop devices
//! are always correct; a flush on the device is a flush of the backing file.

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::blocking::{self, METADATA_DEADLINE};
use crate::error::{Context, Error, Result};
use crate::exec::{Cmd, Exec};

/// Where the loop devices of files are looked up and set up.
#[derive(Clone, Copy)]
pub struct Loops<'a> {
    /// Runs `losetup`.
    pub exec: &'a dyn Exec,
    /// `/sys/block` (a fake tree in tests).
    pub sys_block: &'a Path,
    /// The [`blocking::run`] domain of the backing files' filesystem (the stats run there).
    pub domain: &'a str,
}

/// How long one `losetup` call may take.
const LOSETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`detach_all`] waits for a device that the kernel detaches lazily (it was still
/// open, e.g. by udev probing it) before reporting it as still in use.
const DETACH_SETTLE: Duration = Duration::from_secs(2);
/// The suffix the kernel appends to the backing file name once the file has been unlinked.
const DELETED_SUFFIX: &str = " (deleted)";

/// One loop device as `losetup --list --json` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// The device node, e.g. `/dev/loop3`.
    pub device: PathBuf,
    /// The backing file; `None` for an unbound device.
    pub back_file: Option<PathBuf>,
    /// The backing file was unlinked after it was attached (the kernel's " (deleted)" suffix,
    /// removed from `back_file`).
    pub back_file_deleted: bool,
    /// Offset into the backing file, bytes.
    pub offset: u64,
    /// Size limit, bytes (0: the whole file).
    pub size_limit: u64,
    /// Read-only device.
    pub read_only: bool,
    /// The device detaches itself when last closed (set by a detach of a busy device).
    pub autoclear: bool,
}

impl LoopDevice {
    /// Whether holdfast could have set this device up itself: whole file, read-write, not
    /// being torn down. Only such a device may be handed out again.
    fn is_plain(&self) -> bool {
        self.offset == 0 && self.size_limit == 0 && !self.read_only && !self.autoclear
    }
}

/// `/dev/loopN`, nothing else: a device name from losetup's output is later passed back to
/// `losetup --detach`, so it must never be anything but a loop device.
fn valid_loop_device(s: &str) -> bool {
    s.strip_prefix("/dev/loop").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A number that util-linux prints as a JSON number (2.35 and later) or as a string (older),
/// or `null` for an unbound device.
fn json_u64(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A flag that util-linux prints as a JSON boolean (2.35 and later) or as `"0"`/`"1"` (older).
fn json_bool(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.trim() == "1",
        Some(Value::Number(n)) => n.as_u64() == Some(1),
        _ => false,
    }
}

/// Parses the output of `losetup --list --json` (with or without `--associated`).
pub fn parse_list(json: &str) -> Result<Vec<LoopDevice>> {
    let bad = |why: String| Error::Internal(format!("cannot parse `losetup --list --json` output: {why}"));
    let doc: Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let entries = doc.get("loopdevices").and_then(Value::as_array).ok_or_else(|| bad("no \"loopdevices\" array".into()))?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let name = e.get("name").and_then(Value::as_str).ok_or_else(|| bad(format!("entry without a name: {e}")))?;
        if !valid_loop_device(name) {
            return Err(bad(format!("{name:?} is not a loop device name")));
        }
        let (back_file, back_file_deleted) = match e.get("back-file").and_then(Value::as_str) {
            None | Some("") => (None, false),
            Some(f) => match f.strip_suffix(DELETED_SUFFIX) {
                Some(f) => (Some(PathBuf::from(f)), true),
                None => (Some(PathBuf::from(f)), false),
            },
        };
        out.push(LoopDevice {
            device: PathBuf::from(name),
            back_file,
            back_file_deleted,
            offset: json_u64(e.get("offset")).unwrap_or(0),
            size_limit: json_u64(e.get("sizelimit")).unwrap_or(0),
            read_only: json_bool(e.get("ro")),
            autoclear: json_bool(e.get("autoclear")),
        });
    }
    Ok(out)
}

/// Parses the output of `losetup --find --show FILE`: the device it set up.
pub fn parse_show(stdout: &str) -> Result<PathBuf> {
    let dev = stdout.trim();
    if valid_loop_device(dev) {
        Ok(PathBuf::from(dev))
    } else {
        Err(Error::Internal(format!("`losetup --find --show` printed {dev:?}, not a loop device name")))
    }
}

/// The loop devices backed by `file`, from `sys_block` (see the module docs); `None` when that
/// cannot be decided there. A device is `file`'s when its backing file resolves to the same
/// inode of the same device, so another name of the file (a symlinked directory) is found too.
/// A backing file the kernel marks deleted is another inode (the pool never hard-links an
/// image), and a device torn down while it is read makes the answer `None`.
pub fn associated_in_sysfs(sys_block: &Path, file: &Path) -> Option<Vec<LoopDevice>> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    let want = match std::fs::metadata(file) {
        Ok(m) => (m.dev(), m.ino()),
        // Nothing can be attached to a file that is not there.
        Err(e) if e.kind() == ErrorKind::NotFound => return Some(Vec::new()),
        Err(_) => return None,
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.ok()?;
        let device = format!("/dev/{}", entry.file_name().to_str()?);
        if !valid_loop_device(&device) {
            continue;
        }
        let dir = entry.path().join("loop");
        let Some((back, id)) = backing_in_sysfs(&dir).ok()? else { continue };
        if id != want {
            continue;
        }
        let number = |p: PathBuf| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
        out.push(LoopDevice {
            device: PathBuf::from(device),
            back_file: Some(PathBuf::from(back)),
            back_file_deleted: false,
            offset: number(dir.join("offset"))?,
            size_limit: number(dir.join("sizelimit"))?,
            read_only: number(entry.path().join("ro"))? == 1,
            autoclear: number(dir.join("autoclear"))? == 1,
        });
    }
    out.sort_by_key(|d| d.device.to_string_lossy().trim_start_matches("/dev/loop").parse::<u64>().unwrap_or(u64::MAX));
    Some(out)
}

/// A loop device's backing file as sysfs names it, and its (device, inode).
type Backing = (String, (u64, u64));

/// The backing file of the loop device whose sysfs `loop` directory is `dir`, with its
/// (device, inode): `Ok(None)` when the device is bound to no file or to a deleted one (the
/// kernel's suffix; another inode than any file there now), `Err` when that cannot be read.
fn backing_in_sysfs(dir: &Path) -> std::result::Result<Option<Backing>, ()> {
    let back = match std::fs::read_to_string(dir.join("backing_file")) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(_) => return Err(()),
    };
    let back = back.strip_suffix('\n').unwrap_or(&back);
    if back.ends_with(DELETED_SUFFIX) {
        return Ok(None);
    }
    let m = std::fs::metadata(back).map_err(drop)?;
    Ok(Some((back.to_owned(), (m.dev(), m.ino()))))
}

/// Whether loop device `device` is backed by `image` and reads as zeros from end to end: the
/// image holds no data at all (every byte a hole or an unwritten extent, `SEEK_DATA` finds
/// nothing) once the device's own cached writes were flushed into it. Such a device holds no
/// signature of any kind, which is what `blkid` would have been asked to rule out (issue 14: a
/// fresh `file` volume is formatted without a probe process). Any doubt is `false` and the
/// caller probes as before: an image with any data (a formatted volume, a restored copy, zeros
/// written by hand), a device backed by another file or by a deleted one, a filesystem without
/// `SEEK_DATA` (it reports everything as data), or an error on the way. A write racing the
/// check is the same race as one between `blkid` and `mkfs`. Blocking: run it off the workers.
pub fn reads_as_zeros(device: &Path, image: &Path) -> bool {
    let proven = || -> Option<bool> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let img = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(image).ok()?;
        let im = img.metadata().ok()?;
        if !im.is_file() || im.len() == 0 || has_data(&img)? {
            return Some(false);
        }
        let dm = std::fs::metadata(device).ok()?;
        if !dm.file_type().is_block_device() {
            return Some(false);
        }
        let (major, minor) = (nix::sys::stat::major(dm.rdev()), nix::sys::stat::minor(dm.rdev()));
        let Some((_, id)) = backing_in_sysfs(Path::new(&format!("/sys/dev/block/{major}:{minor}/loop"))).ok()? else {
            return Some(false);
        };
        if id != (im.dev(), im.ino()) {
            return Some(false);
        }
        // Writes made through the device may still sit in its page cache: fsync pushes them
        // into the image (a flush of a buffered loop device is an fsync of its backing file), so
        // the second look at the image sees them. Read-only open: nothing is written, and udev
        // sees no close-after-write.
        std::fs::File::open(device).ok()?.sync_all().ok()?;
        Some(!has_data(&img)?)
    };
    proven().unwrap_or(false)
}

/// Whether `f` holds any data extent (`SEEK_DATA` from 0); `None` when the filesystem cannot say.
fn has_data(f: &std::fs::File) -> Option<bool> {
    match nix::unistd::lseek(f, 0, nix::unistd::Whence::SeekData) {
        Ok(_) => Some(true),
        Err(nix::errno::Errno::ENXIO) => Some(false),
        Err(_) => None,
    }
}

/// Every loop device backed by `file`: read from sysfs ([`associated_in_sysfs`]), else from
/// `losetup --associated`, which matches by inode and device number too. A file that no longer
/// exists has no devices it can name.
pub async fn list_associated(loops: Loops<'_>, file: &Path) -> Result<Vec<LoopDevice>> {
    let (sys, f) = (loops.sys_block.to_owned(), file.to_owned());
    let what = format!("listing the loop devices of {}", file.display());
    if let Some(found) = blocking::run(loops.domain, &what, METADATA_DEADLINE, move || associated_in_sysfs(&sys, &f)).await? {
        return Ok(found);
    }
    losetup_associated(loops.exec, file).await
}

/// `losetup --list --json --associated FILE`.
async fn losetup_associated(exec: &dyn Exec, file: &Path) -> Result<Vec<LoopDevice>> {
    let path = file.to_string_lossy();
    let cmd = Cmd::new("losetup").args(["--list", "--json", "--associated", path.as_ref()]).timeout(LOSETUP_TIMEOUT);
    match exec.run(cmd).await {
        Ok(out) => parse_list(&out.stdout),
        // util-linux 2.38 answers an empty list for a missing file; older releases fail on
        // the stat. Either way nothing can be attached to a file that is not there.
        Err(_) if !file.exists() => Ok(Vec::new()),
        Err(e) => Err(Error::exec(format!("listing the loop devices of {}", file.display()), e)),
    }
}

/// The loop devices `file` is attached to (usually zero or one).
pub async fn find(loops: Loops<'_>, file: &Path) -> Result<Vec<PathBuf>> {
    Ok(list_associated(loops, file).await?.into_iter().map(|d| d.device).collect())
}

/// Attaches `file` to a loop device, or returns the device it is already attached to.
///
/// A device that holdfast would not have set up (read-only, with an offset or size limit, or
/// being detached) is never reused, and no second device is added beside it either: two devices
/// on one file invite two mounts of one filesystem. That case is FAILED_PRECONDITION.
pub async fn attach(loops: Loops<'_>, file: &Path) -> Result<PathBuf> {
    let existing = list_associated(loops, file).await?;
    if let Some(d) = existing.iter().find(|d| d.is_plain()) {
        return Ok(d.device.clone());
    }
    if let Some(d) = existing.first() {
        let why = if d.autoclear {
            "is being detached but is still open (mounted or in use); retry once it is released"
        } else {
            "was set up by someone else (read-only, offset or size limit); detach it with `losetup -d` first"
        };
        return Err(Error::FailedPrecondition(format!("{} is attached to {}, which {why}", file.display(), d.device.display())));
    }
    let path = file.to_string_lossy();
    // --nooverlap makes losetup itself reuse a device that appeared since the listing above.
    let cmd = Cmd::new("losetup").args(["--find", "--show", "--nooverlap", path.as_ref()]).timeout(LOSETUP_TIMEOUT);
    let out = loops.exec.run(cmd).await.context(|| format!("attaching {} to a loop device", file.display()))?;
    parse_show(&out.stdout)
}

/// Makes the loop device pick up its backing file's new size.
pub async fn refresh_capacity(exec: &dyn Exec, device: &Path) -> Result<()> {
    let dev = device.to_string_lossy();
    let cmd = Cmd::new("losetup").args(["--set-capacity", dev.as_ref()]).timeout(LOSETUP_TIMEOUT);
    exec.run(cmd).await.context(|| format!("refreshing the capacity of {dev} after growing its backing file"))?;
    Ok(())
}

/// Detaches every loop device of `file` (none attached is success).
///
/// The kernel does not refuse to detach a device that is open: it marks it to detach itself on
/// last close. So the devices are listed again afterwards; one that is still there after a
/// short wait is still in use (mounted?) and that is FAILED_PRECONDITION, not success.
pub async fn detach_all(loops: Loops<'_>, file: &Path) -> Result<()> {
    let devices = list_associated(loops, file).await?;
    if devices.is_empty() {
        return Ok(());
    }
    for d in &devices {
        let dev = d.device.to_string_lossy();
        let cmd = Cmd::new("losetup").args(["--detach", dev.as_ref()]).timeout(LOSETUP_TIMEOUT);
        if let Err(e) = loops.exec.run(cmd).await {
            // losetup exits 1 for every failure; whether the device still backs the file is
            // the only reliable test of "already detached by someone else".
            let still = list_associated(loops, file).await?;
            if still.iter().any(|s| s.device == d.device) {
                return Err(Error::exec(format!("detaching {dev} from {}", file.display()), e));
            }
        }
    }
    let deadline = tokio::time::Instant::now() + DETACH_SETTLE;
    loop {
        let left = list_associated(loops, file).await?;
        let Some(d) = left.first() else { return Ok(()) };
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::FailedPrecondition(format!(
                "{} is still attached to {}: it is open (mounted or in use); unmount it first, it detaches itself once released",
                file.display(),
                d.device.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::exec::{FakeExec, RealExec, Reply};

    const LIST_ALL: &str = include_str!("../../tests/fixtures/losetup/list-all.json");
    const LIST_EMPTY: &str = include_str!("../../tests/fixtures/losetup/list-empty.json");
    const LIST_UNBOUND: &str = include_str!("../../tests/fixtures/losetup/list-unbound-device.json");
    const ASSOC_ONE: &str = include_str!("../../tests/fixtures/losetup/associated-one.json");
    const ASSOC_TWO: &str = include_str!("../../tests/fixtures/losetup/associated-two.json");
    const ASSOC_NONE: &str = include_str!("../../tests/fixtures/losetup/associated-none.json");

    fn dev(n: &str, file: &str) -> LoopDevice {
        LoopDevice {
            device: PathBuf::from(n),
            back_file: Some(PathBuf::from(file)),
            back_file_deleted: false,
            offset: 0,
            size_limit: 0,
            read_only: false,
            autoclear: false,
        }
    }

    #[test]
    fn parses_captured_listings() {
        struct Case {
            name: &'static str,
            json: &'static str,
            want: Vec<LoopDevice>,
        }
        let b = "/tmp/lofix/b with space.img";
        let cases = [
            Case { name: "empty", json: LIST_EMPTY, want: vec![] },
            Case { name: "associated none", json: ASSOC_NONE, want: vec![] },
            Case { name: "associated one", json: ASSOC_ONE, want: vec![dev("/dev/loop0", "/tmp/lofix/a.img")] },
            Case {
                name: "associated two, one read-only",
                json: ASSOC_TWO,
                want: vec![dev("/dev/loop1", b), LoopDevice { read_only: true, ..dev("/dev/loop2", b) }],
            },
            Case {
                name: "all: autoclear and deleted",
                json: LIST_ALL,
                want: vec![
                    dev("/dev/loop1", b),
                    LoopDevice { autoclear: true, ..dev("/dev/loop4", "/tmp/lofix/d.img") },
                    LoopDevice { read_only: true, ..dev("/dev/loop2", b) },
                    dev("/dev/loop0", "/tmp/lofix/a.img"),
                    LoopDevice { back_file_deleted: true, ..dev("/dev/loop3", "/tmp/lofix/c.img") },
                ],
            },
            Case { name: "unbound device", json: LIST_UNBOUND, want: vec![LoopDevice { back_file: None, ..dev("/dev/loop5", "") }] },
            Case {
                // util-linux before 2.35 printed every value as a string (written by hand).
                name: "old string-typed output",
                json: r#"{"loopdevices": [{"name":"/dev/loop7", "sizelimit":"0", "offset":"512", "autoclear":"1", "ro":"0", "back-file":"/p/v.img"}]}"#,
                want: vec![LoopDevice { offset: 512, autoclear: true, ..dev("/dev/loop7", "/p/v.img") }],
            },
        ];
        for c in cases {
            assert_eq!(parse_list(c.json).unwrap(), c.want, "{}", c.name);
        }
    }

    #[test]
    fn rejects_malformed_listings() {
        for bad in ["", "{}", r#"{"loopdevices": [{"name": "/etc/passwd"}]}"#, r#"{"loopdevices": [{"back-file": "/x"}]}"#] {
            assert!(parse_list(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn parses_show_output() {
        assert_eq!(parse_show("/dev/loop12\n").unwrap(), PathBuf::from("/dev/loop12"));
        for bad in ["", "/dev/loop", "/dev/sda", "/dev/loop1 /dev/loop2", "losetup: cannot find an unused loop device"] {
            assert!(parse_show(bad).is_err(), "{bad:?}");
        }
    }

    /// Loops whose sysfs cannot be read: every lookup is `losetup --associated`.
    fn fallback(exec: &FakeExec) -> Loops<'_> {
        Loops { exec, sys_block: Path::new("/nonexistent/sys/block"), domain: "test:loopdev" }
    }

    /// The machine's loop devices.
    fn real(exec: &RealExec) -> Loops<'_> {
        Loops { exec, sys_block: Path::new("/sys/block"), domain: "test:loopdev" }
    }

    fn assoc(devices: &[(&str, bool)]) -> String {
        let entries: Vec<String> = devices
            .iter()
            .map(|(d, autoclear)| {
                format!(r#"{{"name":"{d}","back-file":"/p/v.img","offset":0,"sizelimit":0,"ro":false,"autoclear":{autoclear}}}"#)
            })
            .collect();
        format!(r#"{{"loopdevices":[{}]}}"#, entries.join(","))
    }

    #[tokio::test]
    async fn attach_reuses_an_existing_device() {
        let f = FakeExec::new();
        f.on("losetup --list --json --associated", vec![Reply::Ok(assoc(&[("/dev/loop3", false)]))]);
        assert_eq!(attach(fallback(&f), Path::new("/p/v.img")).await.unwrap(), PathBuf::from("/dev/loop3"));
        assert_eq!(f.lines(), ["losetup --list --json --associated /p/v.img"]);
    }

    #[tokio::test]
    async fn attach_sets_up_a_new_device() {
        let f = FakeExec::new();
        f.on("losetup --list --json --associated", vec![Reply::Ok(LIST_EMPTY.into())]);
        f.on("losetup --find", vec![Reply::Ok("/dev/loop4\n".into())]);
        assert_eq!(attach(fallback(&f), Path::new("/p/v.img")).await.unwrap(), PathBuf::from("/dev/loop4"));
        assert_eq!(f.lines(), ["losetup --list --json --associated /p/v.img", "losetup --find --show --nooverlap /p/v.img"]);
    }

    #[tokio::test]
    async fn attach_refuses_a_device_it_did_not_make() {
        let f = FakeExec::new();
        f.on("losetup --list --json --associated", vec![Reply::Ok(assoc(&[("/dev/loop3", true)]))]);
        let err = attach(fallback(&f), Path::new("/p/v.img")).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert!(err.to_string().contains("/dev/loop3"), "{err}");
        assert_eq!(f.lines().len(), 1, "no second device is set up");
    }

    #[tokio::test]
    async fn detach_all_detaches_each_device() {
        let f = FakeExec::new();
        f.on(
            "losetup --list --json --associated",
            vec![Reply::Ok(assoc(&[("/dev/loop3", false), ("/dev/loop5", false)])), Reply::Ok(LIST_EMPTY.into())],
        );
        detach_all(fallback(&f), Path::new("/p/v.img")).await.unwrap();
        assert_eq!(
            f.lines(),
            [
                "losetup --list --json --associated /p/v.img",
                "losetup --detach /dev/loop3",
                "losetup --detach /dev/loop5",
                "losetup --list --json --associated /p/v.img",
            ]
        );
    }

    #[tokio::test]
    async fn detach_all_of_nothing_is_success() {
        let f = FakeExec::new();
        f.on("losetup --list --json --associated", vec![Reply::Ok(LIST_EMPTY.into())]);
        detach_all(fallback(&f), Path::new("/p/v.img")).await.unwrap();
        assert_eq!(f.lines().len(), 1);
    }

    #[tokio::test]
    async fn detach_all_tolerates_a_device_detached_meanwhile() {
        let f = FakeExec::new();
        f.on("losetup --list --json --associated", vec![Reply::Ok(assoc(&[("/dev/loop3", false)])), Reply::Ok(LIST_EMPTY.into())]);
        f.on("losetup --detach", vec![Reply::Fail(1, "losetup: /dev/loop3: detach failed: No such device or address".into())]);
        detach_all(fallback(&f), Path::new("/p/v.img")).await.unwrap();
    }

    #[tokio::test]
    async fn detach_all_reports_a_device_still_in_use() {
        let f = FakeExec::new();
        f.on(
            "losetup --list --json --associated",
            vec![Reply::Ok(assoc(&[("/dev/loop3", false)])), Reply::Ok(assoc(&[("/dev/loop3", true)]))],
        );
        let err = detach_all(fallback(&f), Path::new("/p/v.img")).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert!(err.to_string().contains("still attached to /dev/loop3"), "{err}");
    }

    #[tokio::test]
    async fn refresh_runs_set_capacity() {
        let f = FakeExec::new();
        refresh_capacity(&f, Path::new("/dev/loop3")).await.unwrap();
        assert_eq!(f.lines(), ["losetup --set-capacity /dev/loop3"]);
    }

    /// A fake `/sys/block/loopN`: bound to `back` (None: unbound), with its flags.
    pub(crate) fn fake_loop(sys: &Path, n: u32, back: Option<&str>, ro: bool, autoclear: bool, offset: u64) {
        let dev = sys.join(format!("loop{n}"));
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("ro"), format!("{}\n", ro as u8)).unwrap();
        if let Some(back) = back {
            let l = dev.join("loop");
            std::fs::create_dir_all(&l).unwrap();
            std::fs::write(l.join("backing_file"), format!("{back}\n")).unwrap();
            std::fs::write(l.join("offset"), format!("{offset}\n")).unwrap();
            std::fs::write(l.join("sizelimit"), "0\n").unwrap();
            std::fs::write(l.join("autoclear"), format!("{}\n", autoclear as u8)).unwrap();
        }
    }

    // issue 14: no losetup process per check
    /// The devices of a file are read from sysfs and matched by inode: another name of the file
    /// is found, another file of the same name is not, nor a deleted backing file; flags are
    /// read. What sysfs cannot decide (a backing file that does not resolve) is `None`, which
    /// sends the lookup to losetup.
    #[test]
    fn finds_a_files_devices_in_sysfs_by_inode() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("link")).unwrap();
        let (a_s, b_s) = (a.display().to_string(), b.display().to_string());
        let via_link = dir.path().join("link/a.img").display().to_string();
        let sys = dir.path().join("sys");
        fake_loop(&sys, 0, Some(&b_s), false, false, 0);
        fake_loop(&sys, 1, None, false, false, 0);
        fake_loop(&sys, 2, Some(&format!("{a_s} (deleted)")), false, false, 0);
        fake_loop(&sys, 10, Some(&via_link), true, false, 512);
        fake_loop(&sys, 3, Some(&a_s), false, true, 0);
        std::fs::create_dir_all(sys.join("sda")).unwrap();
        let found = associated_in_sysfs(&sys, &a).unwrap();
        let want = vec![
            LoopDevice { autoclear: true, ..dev("/dev/loop3", &a_s) },
            LoopDevice { read_only: true, offset: 512, ..dev("/dev/loop10", &via_link) },
        ];
        assert_eq!(found, want);
        assert_eq!(associated_in_sysfs(&sys, &b).unwrap(), vec![dev("/dev/loop0", &b_s)]);
        assert_eq!(associated_in_sysfs(&sys, &dir.path().join("gone.img")).unwrap(), vec![], "a missing file has no device");
        // Undecidable: a backing file that does not resolve here; sysfs not readable.
        fake_loop(&sys, 4, Some("/elsewhere/in/another/namespace.img"), false, false, 0);
        assert_eq!(associated_in_sysfs(&sys, &a), None);
        assert_eq!(associated_in_sysfs(&dir.path().join("no-sys"), &a), None);
    }

    /// With sysfs readable, finding, attaching to an existing device and detaching a file that
    /// has none run no `losetup --list` process.
    #[tokio::test]
    async fn lookups_read_sysfs_and_start_no_process() {
        let dir = tempfile::tempdir().unwrap();
        let (img, other) = (dir.path().join("v.img"), dir.path().join("w.img"));
        std::fs::write(&img, b"").unwrap();
        std::fs::write(&other, b"").unwrap();
        let sys = dir.path().join("sys");
        fake_loop(&sys, 3, Some(&img.display().to_string()), false, false, 0);
        let f = FakeExec::new();
        let loops = Loops { exec: &f, sys_block: &sys, domain: "test:loopdev" };
        assert_eq!(find(loops, &img).await.unwrap(), vec![PathBuf::from("/dev/loop3")]);
        assert_eq!(attach(loops, &img).await.unwrap(), PathBuf::from("/dev/loop3"));
        detach_all(loops, &other).await.unwrap();
        assert!(f.lines().is_empty(), "{:?}", f.lines());
        f.on("losetup --find", vec![Reply::Ok("/dev/loop4\n".into())]);
        assert_eq!(attach(loops, &other).await.unwrap(), PathBuf::from("/dev/loop4"));
        assert_eq!(f.lines(), [format!("losetup --find --show --nooverlap {}", other.display())]);
    }

    /// Real losetup: attach twice gives one device, refresh sees growth, detach leaves none.
    #[tokio::test]
    async fn real_attach_refresh_detach() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("v.img");
        std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
        let guard = DetachOnDrop(img.clone());
        let exec = RealExec;
        let d1 = attach(real(&exec), &img).await.unwrap();
        let d2 = attach(real(&exec), &img).await.unwrap();
        assert_eq!(d1, d2);
        assert_eq!(find(real(&exec), &img).await.unwrap(), vec![d1.clone()]);
        std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(16 << 20).unwrap();
        refresh_capacity(&exec, &d1).await.unwrap();
        let size = std::fs::read_to_string(format!("/sys/class/block/{}/size", d1.file_name().unwrap().to_string_lossy())).unwrap();
        assert_eq!(size.trim().parse::<u64>().unwrap() * 512, 16 << 20);
        detach_all(real(&exec), &img).await.unwrap();
        assert!(find(real(&exec), &img).await.unwrap().is_empty());
        detach_all(real(&exec), &img).await.unwrap();
        drop(guard);
    }

    /// A fresh image reads as zeros through its device; anything written (through the device
    /// and still in its page cache, or into the image), another image, or a device that is not
    /// a loop device of the image is not proven, so the caller probes with blkid.
    #[tokio::test]
    async fn only_a_never_written_image_reads_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("v.img");
        let other = dir.path().join("o.img");
        for f in [&img, &other] {
            std::fs::File::create(f).unwrap().set_len(8 << 20).unwrap();
        }
        let _guard = DetachOnDrop(img.clone());
        let exec = RealExec;
        let dev = attach(real(&exec), &img).await.unwrap();
        assert!(reads_as_zeros(&dev, &img), "a fresh sparse image holds nothing");
        assert!(!reads_as_zeros(&dev, &other), "another image proves nothing about {}", dev.display());
        assert!(!reads_as_zeros(&img, &img), "a file is not a loop device");
        // Two bytes written through the device, not synced, the writer still open (a last
        // close would flush them): only the device's page cache has them.
        let mut writer = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        {
            use std::io::{Seek, SeekFrom, Write};
            writer.seek(SeekFrom::Start(1 << 20)).unwrap();
            writer.write_all(b"\x53\xef").unwrap();
        }
        assert!(!reads_as_zeros(&dev, &img), "a write through the device is data");
        drop(writer);
        detach_all(real(&exec), &img).await.unwrap();
        // Data written into the image itself, at its end.
        let dev = attach(real(&exec), &other).await.unwrap();
        {
            use std::os::unix::fs::FileExt;
            std::fs::OpenOptions::new().write(true).open(&other).unwrap().write_all_at(b"x", (8 << 20) - 1).unwrap();
        }
        assert!(!reads_as_zeros(&dev, &other), "a byte in the image is data");
        detach_all(real(&exec), &other).await.unwrap();
    }

    /// Detaches whatever a test attached, even when it panics.
    struct DetachOnDrop(PathBuf);

    impl Drop for DetachOnDrop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("sh")
                .args(["-c", "for d in $(losetup -n -O NAME -j \"$1\"); do losetup -d \"$d\"; done", "-", &self.0.to_string_lossy()])
                .status();
        }
    }
}
