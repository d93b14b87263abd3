//! Filesystems on block devices: probe for signatures with `blkid`, create with `mkfs.*` only on
//! a blank device, grow online, give a copy a new UUID.
//!
//! Data safety lives here: [`probe`] never reports "blank" unless `blkid` positively said it
//! found nothing, and [`mkfs`] probes again itself, so no caller mistake can format a device
//! that holds anything. The one way around the probe is [`mkfs_zero`], which takes a
//! [`ZeroDevice`]: a proof, made only here from the device itself, that it reads as zeros.

use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Context, Error, Result};
use crate::exec::{Cmd, Exec};

/// Filesystems holdfast creates on block devices.
pub const SUPPORTED_FS: [&str; 3] = ["ext4", "xfs", "btrfs"];

/// The smallest device `mkfs` accepts for `fs_type` (xfsprogs refuses under 300 MiB, btrfs
/// under 114 MiB); volumes are made at least this large so their first stage cannot fail.
pub fn min_size(fs_type: &str) -> u64 {
    match fs_type {
        "xfs" => 300 << 20,
        "btrfs" => 114 << 20,
        _ => 1 << 20,
    }
}

/// `blkid -p` reads a few superblocks; anything slower is a hung device.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// mkfs, fsck, resize and UUID rewrites scale with the device. They get long timeouts because
/// killing one half-way leaves a device that is neither blank nor a usable filesystem.
const LONG_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Mounting an image to replay its XFS log.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);

/// `blkid` exit code: nothing was found (or, with a message on stderr, the device could not be read).
const BLKID_NOTHING: i32 = 2;
/// `blkid` exit code: several signatures were found (ambivalent low-level probe).
const BLKID_AMBIVALENT: i32 = 8;

/// What `blkid -p` found on a device or image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// `TYPE` (filesystem, LVM PV, swap…) or `PTTYPE` (partition table) as blkid names it.
    pub kind: String,
    /// The filesystem UUID, when it has one.
    pub uuid: Option<String>,
}

/// Parses `blkid -p -o export` output (`KEY=value` lines). `TYPE` wins over `PTTYPE`; output
/// that names neither (but blkid still reported a find) is an unknown signature, never blank.
pub fn parse_export(stdout: &str) -> Signature {
    let get = |key: &str| {
        stdout.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('='))).map(str::trim).filter(|v| !v.is_empty())
    };
    let kind = match (get("TYPE"), get("PTTYPE")) {
        (Some(t), _) => t.to_owned(),
        (None, Some(pt)) => format!("{pt} partition table"),
        (None, None) => {
            let keys: Vec<&str> = stdout.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).filter(|k| *k != "DEVNAME").collect();
            format!("unknown signature ({})", keys.join(","))
        }
    };
    Signature { kind, uuid: get("UUID").map(str::to_owned) }
}

/// Size of a block device or regular file in bytes.
pub fn size_of(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).context(|| format!("reading the size of {}", path.display()))?;
    if meta.file_type().is_block_device() {
        // sysfs knows the size in 512-byte sectors without opening the device, so a stats call
        // never holds a published device node open (which would make its unmount busy).
        let rdev = meta.rdev();
        let sys = format!("/sys/dev/block/{}:{}/size", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        if let Some(sectors) = std::fs::read_to_string(sys).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            return Ok(sectors * 512);
        }
        // Without sysfs, seeking to the end of a block device yields its size without an ioctl.
        let mut f = std::fs::File::open(path).context(|| format!("opening block device {}", path.display()))?;
        f.seek(SeekFrom::End(0)).context(|| format!("reading the size of block device {}", path.display()))
    } else {
        Ok(meta.len())
    }
}

/// Probes `path` (device or image file) for any signature; `None` means blank.
///
/// `blkid` exits 2 both when a readable device holds nothing and when it cannot read the path
/// at all, so blank is only concluded for an existing, non-empty device or file with a silent
/// exit 2. Several signatures at once (exit 8) is reported as a signature, never as blank.
pub async fn probe(exec: &dyn Exec, path: &Path) -> Result<Option<Signature>> {
    let meta = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!("cannot probe {} for signatures: it does not exist", path.display())));
        }
        other => other.context(|| format!("probing {} for signatures", path.display()))?,
    };
    if !meta.file_type().is_block_device() && !meta.is_file() {
        return Err(Error::FailedPrecondition(format!("cannot probe {}: it is neither a block device nor an image file", path.display())));
    }
    if size_of(path)? == 0 {
        return Err(Error::FailedPrecondition(format!(
            "cannot probe {}: its size is 0 (a loop device without a backing file?)",
            path.display()
        )));
    }
    let cmd = Cmd::new("blkid").args(["-p", "-o", "export"]).arg(path_arg(path)).timeout(PROBE_TIMEOUT);
    match exec.run(cmd).await {
        Ok(out) => Ok(Some(parse_export(&out.stdout))),
        Err(e) if e.code() == Some(BLKID_NOTHING) && e.stderr().trim().is_empty() => Ok(None),
        Err(e) if e.code() == Some(BLKID_AMBIVALENT) => {
            Ok(Some(Signature { kind: "several signatures (blkid: ambivalent result; see wipefs -n)".into(), uuid: None }))
        }
        Err(e) => Err(Error::exec(format!("probing {} for signatures", path.display()), e)),
    }
}

/// Creates `fs_type` on a device that [`probe`] found blank.
///
/// Probes again first and refuses if anything is there: `mkfs.ext4` overwrites other
/// signatures without asking when it has no terminal. No force flag is ever passed. Discard is
/// skipped (new volumes are already unallocated; discarding a large device can take minutes).
pub async fn mkfs(exec: &dyn Exec, device: &Path, fs_type: &str) -> Result<()> {
    match mkfs_if_blank(exec, device, fs_type).await? {
        None => Ok(()),
        Some(sig) => Err(Error::FailedPrecondition(format!(
            "refusing to create {fs_type} on {}: blkid found {:?} there, and holdfast never formats a device that is not blank",
            device.display(),
            sig.kind
        ))),
    }
}

/// Probes `device` once and creates `fs_type` on it only if it is blank. Returns `None` when
/// it formatted, or the signature it found (and left alone). One probe, before mkfs: that is
/// the safety step (never format a device with a signature). It is not probed again after a
/// successful mkfs (issue 14: a ready-to-use volume costs what the raw tools cost): the mount
/// that follows names the filesystem type (`mount -t TYPE`), and fails if mkfs did not make it.
pub async fn mkfs_if_blank(exec: &dyn Exec, device: &Path, fs_type: &str) -> Result<Option<Signature>> {
    let cmd = mkfs_cmd(device, fs_type)?;
    if let Some(sig) = probe(exec, device).await? {
        return Ok(Some(sig));
    }
    exec.run(cmd).await.context(|| format!("creating {fs_type} on {}", device.display()))?;
    Ok(None)
}

/// A device proven to read as zeros from end to end, so it holds no signature and needs no
/// probe before mkfs. Made only by [`ZeroDevice::of_loop`], which proves it.
#[derive(Debug)]
pub struct ZeroDevice(PathBuf);

impl ZeroDevice {
    /// The loop device `device` when it is backed by `image` and reads as zeros
    /// ([`super::loopdev::reads_as_zeros`]); `None` means "not proven": probe it. Blocking.
    pub fn of_loop(device: &Path, image: &Path) -> Option<ZeroDevice> {
        super::loopdev::reads_as_zeros(device, image).then(|| ZeroDevice(device.to_owned()))
    }
}

/// Creates `fs_type` on a device proven to hold nothing: the same mkfs as [`mkfs_if_blank`],
/// without its probe.
pub async fn mkfs_zero(exec: &dyn Exec, device: ZeroDevice, fs_type: &str) -> Result<()> {
    let cmd = mkfs_cmd(&device.0, fs_type)?;
    exec.run(cmd).await.context(|| format!("creating {fs_type} on {}", device.0.display()))?;
    Ok(())
}

/// The mkfs command for `fs_type` on `device`. No force flag, ever.
fn mkfs_cmd(device: &Path, fs_type: &str) -> Result<Cmd> {
    let args: &[&str] = match fs_type {
        // No blocks reserved for root: the whole volume belongs to the workload.
        "ext4" => &["-q", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"],
        "xfs" => &["-q", "-K"],
        "btrfs" => &["-q", "-K"],
        other => {
            return Err(Error::InvalidArgument(format!("cannot create filesystem {other:?}: holdfast creates one of {SUPPORTED_FS:?}")));
        }
    };
    Ok(Cmd::new(format!("mkfs.{fs_type}")).args(args.iter().copied()).arg(path_arg(device)).timeout(LONG_TIMEOUT))
}

/// Grows the `fs_type` filesystem on `device`, mounted at `mount_path`, to fill the device.
pub async fn grow(exec: &dyn Exec, fs_type: &str, device: &Path, mount_path: &Path) -> Result<()> {
    let cmd = match fs_type {
        // resize2fs grows a mounted ext4 online through the device.
        "ext4" | "ext3" => Cmd::new("resize2fs").arg(path_arg(device)),
        // xfs and btrfs grow through the mount point only.
        "xfs" => Cmd::new("xfs_growfs").arg("-d").arg(path_arg(mount_path)),
        "btrfs" => Cmd::new("btrfs").args(["filesystem", "resize", "max"]).arg(path_arg(mount_path)),
        other => {
            return Err(Error::Unimplemented(format!("cannot grow {other} on {}: holdfast grows ext4, xfs and btrfs", device.display())));
        }
    };
    let what = || format!("growing {fs_type} on {} (mounted at {})", device.display(), mount_path.display());
    match exec.run(cmd.timeout(LONG_TIMEOUT)).await {
        Ok(_) => Ok(()),
        // The kernel's online ext4 resize demands CAP_SYS_RESOURCE, which a restricted agent lacks.
        Err(e) if e.stderr().contains("Permission denied to resize") => {
            Err(Error::exec(format!("{} (online ext4 resizing needs CAP_SYS_RESOURCE: run the agent privileged)", what()), e))
        }
        Err(e) => Err(Error::exec(what(), e)),
    }
}

/// Size in bytes of the ext2/3/4 filesystem on `device`, from its superblock (`dumpe2fs -h`).
pub async fn ext_fs_bytes(exec: &dyn Exec, device: &Path) -> Result<u64> {
    let out = exec
        .run(Cmd::new("dumpe2fs").arg("-h").arg(path_arg(device)).timeout(PROBE_TIMEOUT))
        .await
        .context(|| format!("reading the ext4 superblock of {}", device.display()))?;
    parse_dumpe2fs_size(&out.stdout)
        .ok_or_else(|| Error::Internal(format!("dumpe2fs -h {} printed no block count and block size", device.display())))
}

/// `Block count` × `Block size` from `dumpe2fs -h` output.
pub fn parse_dumpe2fs_size(stdout: &str) -> Option<u64> {
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim_start().strip_prefix(':')).and_then(|v| v.trim().parse::<u64>().ok()))
    };
    field("Block count")?.checked_mul(field("Block size")?)
}

/// Grows the ext2/3/4 filesystem on an unmounted `device` to fill it: `e2fsck -f -p` (which
/// resize2fs demands before an offline resize), then `resize2fs`. Offline growth needs no
/// special capability, unlike the kernel's online resize. The caller makes sure nothing has
/// the device mounted.
pub async fn grow_offline_ext(exec: &dyn Exec, device: &Path) -> Result<()> {
    fsck_ext(exec, device).await?;
    exec.run(Cmd::new("resize2fs").arg(path_arg(device)).timeout(LONG_TIMEOUT))
        .await
        .context(|| format!("growing the unmounted ext4 filesystem on {}", device.display()))?;
    Ok(())
}

/// Gives the (unmounted) filesystem on `path` (device or image file) a new random UUID, so a
/// copy can be mounted beside its source. A blank `path` is left alone.
///
/// Copies of a mounted filesystem are dirty: ext4 needs `e2fsck` (which replays the journal)
/// before `tune2fs -U`, and XFS needs its log replayed by a mount before `xfs_admin -U`, which
/// otherwise prints an error but exits 0. So the result is checked by probing again.
pub async fn regenerate_uuid(exec: &dyn Exec, path: &Path) -> Result<()> {
    let Some(before) = probe(exec, path).await? else {
        return Ok(());
    };
    let what = || format!("giving the {} filesystem on {} a new UUID", before.kind, path.display());
    match before.kind.as_str() {
        "ext2" | "ext3" | "ext4" => {
            let tune = || Cmd::new("tune2fs").args(["-U", "random"]).arg(path_arg(path)).timeout(LONG_TIMEOUT);
            if let Err(first) = exec.run(tune()).await {
                // tune2fs asks for a freshly checked filesystem (always with metadata_csum, and
                // after it replayed a journal); e2fsck -p fixes only what is safe to fix.
                tracing::debug!(path = %path.display(), "tune2fs -U failed, checking the filesystem first: {first}");
                fsck_ext(exec, path).await?;
                exec.run(tune()).await.context(what)?;
            }
        }
        "xfs" => {
            let admin = || Cmd::new("xfs_admin").args(["-U", "generate"]).arg(path_arg(path)).timeout(LONG_TIMEOUT);
            exec.run(admin()).await.context(what)?;
            if uuid_of(exec, path).await? == before.uuid {
                replay_xfs_log(exec, path).await?;
                exec.run(admin()).await.context(what)?;
            }
        }
        // -f confirms the fsid rewrite instead of asking on a terminal; it overrides no signature.
        "btrfs" => {
            exec.run(Cmd::new("btrfstune").args(["-f", "-u"]).arg(path_arg(path)).timeout(LONG_TIMEOUT)).await.context(what)?;
        }
        other => {
            return Err(Error::FailedPrecondition(format!(
                "cannot give {} a new UUID: it holds {other:?}, and holdfast only handles ext4, xfs and btrfs",
                path.display()
            )));
        }
    }
    let after = uuid_of(exec, path).await?;
    if after.is_none() || after == before.uuid {
        return Err(Error::Internal(format!(
            "{} still has UUID {:?} after {}; the copy cannot be mounted beside its source",
            path.display(),
            after,
            what()
        )));
    }
    Ok(())
}

async fn uuid_of(exec: &dyn Exec, path: &Path) -> Result<Option<String>> {
    Ok(probe(exec, path).await?.and_then(|s| s.uuid))
}

/// `e2fsck -f -p`: exit 0 (clean) and 1 (errors fixed) are fine; anything else needs a human.
async fn fsck_ext(exec: &dyn Exec, path: &Path) -> Result<()> {
    match exec.run(Cmd::new("e2fsck").args(["-f", "-p"]).arg(path_arg(path)).timeout(LONG_TIMEOUT)).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(1) => Ok(()),
        Err(e) => Err(Error::exec(format!("checking the filesystem on {} (run e2fsck -f on it by hand)", path.display()), e)),
    }
}

/// Replays a dirty XFS log by mounting and unmounting once (`nouuid`: the source with the same
/// UUID may be mounted). `mount` attaches an image file to a loop device by itself and detaches
/// it on unmount.
async fn replay_xfs_log(exec: &dyn Exec, path: &Path) -> Result<()> {
    let dir = replay_dir();
    std::fs::create_dir(&dir).context(|| format!("creating {} to replay the XFS log of {}", dir.display(), path.display()))?;
    let mounted = exec
        .run(Cmd::new("mount").args(["-t", "xfs", "-o", "nouuid"]).arg(path_arg(path)).arg(path_arg(&dir)).timeout(MOUNT_TIMEOUT))
        .await
        .context(|| format!("mounting {} to replay its XFS log", path.display()));
    let unmounted = match mounted {
        Ok(_) => exec
            .run(Cmd::new("umount").arg(path_arg(&dir)).timeout(MOUNT_TIMEOUT))
            .await
            .context(|| format!("unmounting {} after replaying the XFS log of {}", dir.display(), path.display())),
        Err(e) => Err(e),
    };
    // Only an empty directory is removed; a failed unmount leaves it (and says so above).
    let _ = std::fs::remove_dir(&dir);
    unmounted.map(|_| ())
}

fn replay_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    std::env::temp_dir().join(format!("holdfast-xfs-replay-{}-{nanos}", std::process::id()))
}

/// A path as a command argument. Paths reach here from pools and validated requests, so they
/// are UTF-8; a lossy conversion cannot name a different existing file in practice.
fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumpe2fs_size() {
        let out = "Filesystem volume name:   <none>\nBlock count:              163840\nReserved block count:     0\nBlock size:               4096\n";
        assert_eq!(parse_dumpe2fs_size(out), Some(163840 * 4096));
        assert_eq!(parse_dumpe2fs_size("Block size: 4096\n"), None);
    }
    use crate::exec::{FakeExec, Reply};

    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blkid").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A non-empty regular file, so `probe`'s own checks pass and the fake answers for blkid.
    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        f
    }

    #[test]
    fn parses_captured_blkid_output() {
        struct Case {
            file: &'static str,
            kind: &'static str,
            uuid: Option<&'static str>,
        }
        let cases = [
            Case { file: "ext4.export", kind: "ext4", uuid: Some("d5e865a0-a2b7-45b6-821b-2a5b29c6c43f") },
            Case { file: "xfs.export", kind: "xfs", uuid: Some("c3f8bbad-8f84-4c5f-b3b4-2b875a0d237f") },
            Case { file: "btrfs.export", kind: "btrfs", uuid: Some("b6b8902f-9cc7-4717-b4fb-c331d918cc41") },
            Case { file: "swap.export", kind: "swap", uuid: Some("e990a2c3-59c6-4396-882a-07799502c4c5") },
            Case { file: "dos.export", kind: "dos partition table", uuid: None },
        ];
        for c in cases {
            let got = parse_export(&fixture(c.file));
            assert_eq!(got, Signature { kind: c.kind.into(), uuid: c.uuid.map(Into::into) }, "{}", c.file);
        }
        assert!(parse_export("DEVNAME=/dev/sda1\nPART_ENTRY_SCHEME=gpt\n").kind.starts_with("unknown signature (PART_ENTRY_SCHEME"));
    }

    #[tokio::test]
    async fn probe_classifies_blkid_exit_codes() {
        struct Case {
            name: &'static str,
            reply: Reply,
            want: std::result::Result<Option<&'static str>, &'static str>,
        }
        let cases = [
            Case { name: "filesystem", reply: Reply::Ok(fixture("xfs.export")), want: Ok(Some("xfs")) },
            Case { name: "blank", reply: Reply::Fail(2, fixture("blank.export")), want: Ok(None) },
            Case {
                name: "exit 2 with an error is not blank",
                reply: Reply::Fail(2, "blkid: error: /x: Permission denied\n".into()),
                want: Err("Permission denied"),
            },
            Case {
                name: "ambivalent is a signature",
                reply: Reply::Fail(8, fixture("ambivalent.stderr")),
                want: Ok(Some("several signatures (blkid: ambivalent result; see wipefs -n)")),
            },
            Case { name: "usage error", reply: Reply::Fail(4, "bad usage".into()), want: Err("bad usage") },
        ];
        let img = image();
        for c in cases {
            let exec = FakeExec::new();
            exec.on("blkid", vec![c.reply]);
            let got = probe(&exec, img.path()).await;
            match (got, c.want) {
                (Ok(sig), Ok(want)) => assert_eq!(sig.map(|s| s.kind).as_deref(), want, "{}", c.name),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{}: {e}", c.name),
                (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
            }
            assert_eq!(exec.lines(), [format!("blkid -p -o export {}", img.path().display())], "{}", c.name);
        }
    }

    #[tokio::test]
    async fn probe_refuses_paths_blkid_cannot_judge() {
        let exec = FakeExec::new();
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.img");
        std::fs::File::create(&empty).unwrap();
        assert!(matches!(probe(&exec, &dir.path().join("missing")).await, Err(Error::NotFound(_))));
        assert!(matches!(probe(&exec, dir.path()).await, Err(Error::FailedPrecondition(_))));
        assert!(matches!(probe(&exec, &empty).await, Err(Error::FailedPrecondition(_))));
        assert!(exec.calls().is_empty(), "blkid must not be asked about {:?}", exec.lines());
    }

    #[tokio::test]
    async fn mkfs_argv_and_refusal() {
        struct Case {
            fs: &'static str,
            want: &'static str,
        }
        let cases = [
            Case { fs: "ext4", want: "mkfs.ext4 -q -m 0 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard" },
            Case { fs: "xfs", want: "mkfs.xfs -q -K" },
            Case { fs: "btrfs", want: "mkfs.btrfs -q -K" },
        ];
        let img = image();
        let p = img.path().display().to_string();
        for c in cases {
            let exec = FakeExec::new();
            exec.on("blkid", vec![Reply::Fail(2, String::new())]);
            mkfs(&exec, img.path(), c.fs).await.unwrap();
            let lines = exec.lines();
            // One probe, then mkfs, and nothing after it (the mount that follows checks the type).
            assert_eq!(lines.len(), 2, "{lines:?}");
            assert_eq!(lines[1], format!("{} {p}", c.want), "{}", c.fs);
            assert!(!lines[1].contains(" -f") && !lines[1].contains(" -F"), "no force flag: {}", lines[1]);

            // A signature appearing between the caller's probe and mkfs stops it.
            let exec = FakeExec::new();
            exec.on("blkid", vec![Reply::Ok("TYPE=LVM2_member\n".into())]);
            let err = mkfs(&exec, img.path(), c.fs).await.unwrap_err();
            assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("LVM2_member"), "{err}");
            assert!(exec.lines().iter().all(|l| !l.starts_with("mkfs")), "{:?}", exec.lines());
        }
        let err = mkfs(&FakeExec::new(), img.path(), "vfat").await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[tokio::test]
    async fn grow_argv() {
        struct Case {
            fs: &'static str,
            want: &'static str,
        }
        let cases = [
            Case { fs: "ext4", want: "resize2fs /dev/loop3" },
            Case { fs: "xfs", want: "xfs_growfs -d /mnt/v" },
            Case { fs: "btrfs", want: "btrfs filesystem resize max /mnt/v" },
        ];
        for c in cases {
            let exec = FakeExec::new();
            grow(&exec, c.fs, Path::new("/dev/loop3"), Path::new("/mnt/v")).await.unwrap();
            assert_eq!(exec.lines(), [c.want], "{}", c.fs);
        }
        assert!(matches!(grow(&FakeExec::new(), "vfat", Path::new("/d"), Path::new("/m")).await, Err(Error::Unimplemented(_))));
    }

    #[tokio::test]
    async fn regenerate_uuid_retries_after_fsck_and_checks_the_result() {
        let img = image();
        let p = img.path().display().to_string();
        let exec = FakeExec::new();
        exec.on("blkid", vec![Reply::Ok("TYPE=ext4\nUUID=old\n".into()), Reply::Ok("TYPE=ext4\nUUID=new\n".into())]);
        exec.on("tune2fs", vec![Reply::Fail(1, "Please run e2fsck -f on the filesystem.".into()), Reply::Ok(String::new())]);
        exec.on("e2fsck", vec![Reply::Fail(1, String::new())]);
        regenerate_uuid(&exec, img.path()).await.unwrap();
        let want: Vec<String> = ["blkid -p -o export", "tune2fs -U random", "e2fsck -f -p", "tune2fs -U random", "blkid -p -o export"]
            .iter()
            .map(|c| format!("{c} {p}"))
            .collect();
        assert_eq!(exec.lines(), want);

        // A tool that exits 0 without changing anything is caught.
        let exec = FakeExec::new();
        exec.on("blkid", vec![Reply::Ok("TYPE=btrfs\nUUID=same\n".into())]);
        let err = regenerate_uuid(&exec, img.path()).await.unwrap_err();
        assert!(err.to_string().contains("still has UUID"), "{err}");

        // Blank: nothing to do; unknown kinds are refused.
        let exec = FakeExec::new();
        exec.on("blkid", vec![Reply::Fail(2, String::new())]);
        regenerate_uuid(&exec, img.path()).await.unwrap();
        assert_eq!(exec.calls().len(), 1);
        let exec = FakeExec::new();
        exec.on("blkid", vec![Reply::Ok("TYPE=swap\nUUID=x\n".into())]);
        assert!(matches!(regenerate_uuid(&exec, img.path()).await, Err(Error::FailedPrecondition(_))));
    }

    #[tokio::test]
    async fn regenerate_uuid_replays_a_dirty_xfs_log() {
        let img = image();
        let exec = FakeExec::new();
        exec.on(
            "blkid",
            vec![
                Reply::Ok("TYPE=xfs\nUUID=old\n".into()),
                Reply::Ok("TYPE=xfs\nUUID=old\n".into()),
                Reply::Ok("TYPE=xfs\nUUID=new\n".into()),
            ],
        );
        regenerate_uuid(&exec, img.path()).await.unwrap();
        let progs: Vec<String> = exec.calls().iter().map(|c| c[0].clone()).collect();
        assert_eq!(progs, ["blkid", "xfs_admin", "blkid", "mount", "umount", "xfs_admin", "blkid"]);
        assert!(exec.lines()[3].contains("-t xfs -o nouuid"), "{}", exec.lines()[3]);
    }
}
