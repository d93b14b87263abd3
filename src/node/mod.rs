//! The node side of a volume's life, independent of gRPC: format-if-blank and mount at the
//! staging path, bind-mount to the target path, unmount, grow the filesystem, and report usage
//! and health. The CSI node service (`csi/node.rs`) validates and locks, then calls these.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Context, Error, Result};
use crate::exec::Exec;
use crate::pool::{Attachment, Condition};

pub mod format;
pub mod freeze;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;
pub mod records;
pub mod safepath;

use mount::{BindSource, Mounter};
use mountinfo::MountInfo;
use records::dev_name;
use safepath::RequestPath;

/// Mounts stacked on one path are peeled one by one; more than this means something keeps
/// mounting there, and looping on would never end.
const MAX_LAYERS: usize = 32;
/// How often, and how far apart, an unmount that found the mount busy is tried again.
const BUSY_RETRIES: usize = 3;
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// Usage of a mounted filesystem or a block device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Total bytes.
    pub total_bytes: u64,
    /// Available bytes (free space an unprivileged writer can use).
    pub available_bytes: u64,
    /// Used bytes.
    pub used_bytes: u64,
    /// Inodes in total; `None` for block devices.
    pub total_inodes: Option<u64>,
    /// Free inodes.
    pub free_inodes: Option<u64>,
    /// Used inodes.
    pub used_inodes: Option<u64>,
}

/// Node operations over an [`Exec`] and a [`Mounter`].
#[derive(Clone)]
pub struct Node {
    /// Runs mkfs, blkid, resize tools.
    pub exec: Arc<dyn Exec>,
    /// Mounts and unmounts.
    pub mounter: Arc<dyn Mounter>,
}

/// Where a staged volume's data is, as the node needs to know it later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// The device (block-backed volumes) or mount source.
    pub attachment: Attachment,
    /// The staging path.
    pub staging: PathBuf,
}

impl Node {
    /// A node over the given executors.
    pub fn new(exec: Arc<dyn Exec>, mounter: Arc<dyn Mounter>) -> Self {
        Node { exec, mounter }
    }

    /// Stages a filesystem volume: for a device, formats it with `fs_type` only when `blkid`
    /// finds no signature at all (a device holding anything else is never formatted; a device
    /// holding a different filesystem is FAILED_PRECONDITION), then mounts it at `staging` with
    /// `mount_flags`. For a `Mount` attachment, mounts the source. Idempotent: an existing mount
    /// of the same source at `staging` is success; a different source there is ALREADY_EXISTS.
    /// Returns the filesystem type mounted.
    ///
    /// An empty `fs_type` accepts whatever supported filesystem the device holds (and is
    /// INVALID_ARGUMENT on a blank device). XFS is mounted with `nouuid`, because snapshots and
    /// clones of a volume carry its UUID and may be mounted beside it.
    pub async fn stage_filesystem(
        &self,
        attachment: &Attachment,
        staging: &RequestPath,
        fs_type: &str,
        mount_flags: &[String],
    ) -> Result<String> {
        let top = self.mounter.mount_at(staging).await?;
        let shown = staging.as_path().display();
        match attachment {
            Attachment::Device(device) | Attachment::Loop { device, .. } => {
                let image = match attachment {
                    Attachment::Loop { image, .. } => Some(image.as_path()),
                    _ => None,
                };
                let id = DeviceId::of(device).await?;
                if let Some(top) = top {
                    if id.is(&top) {
                        return Ok(top.fs_type);
                    }
                    return Err(Error::AlreadyExists(format!(
                        "staging path {shown} already has {} mounted, not {}",
                        top.source,
                        device.display()
                    )));
                }
                let (fs, fresh) = self.ensure_filesystem(device, image, fs_type).await?;
                // Resize on stage: a volume expanded while it was not staged gets its filesystem
                // grown here, so it never comes back smaller than its capacity. ext4 grows
                // offline before the mount; xfs and btrfs can only grow mounted (a no-op when full).
                // By device identity, not path: /dev/zvol/… and /dev/<vg>/<lv> are links to /dev/zd0, /dev/dm-3.
                // The mount table is read only when the answer matters (issue 14: no redundant reads).
                if !fresh && fs == "ext4" && !self.mounter.mounts().await?.iter().any(|m| id.is(m)) {
                    let fs_bytes = format::ext_fs_bytes(self.exec.as_ref(), device).await?;
                    let dev_bytes = size_of(device).await?;
                    if fs_bytes + (1 << 20) <= dev_bytes {
                        tracing::info!(device = %device.display(), fs_bytes, dev_bytes, "growing ext4 to the volume's size before mounting");
                        format::grow_offline_ext(self.exec.as_ref(), device).await?;
                    }
                }
                let mut options = mount_flags.to_vec();
                if fs == "xfs" && !options.iter().any(|o| o == "nouuid") {
                    options.push("nouuid".into());
                }
                create_dir(staging).await?;
                self.mounter.mount(&device.to_string_lossy(), staging, &fs, &options).await?;
                if !fresh && fs != "ext4" {
                    format::grow(self.exec.as_ref(), &fs, device, staging.as_path()).await?;
                }
                Ok(fs)
            }
            Attachment::Mount { source, fs_type: mount_fs, options } => {
                if let Some(top) = top {
                    if same_source(&top.source, source) {
                        return Ok(mount_fs.clone());
                    }
                    return Err(Error::AlreadyExists(format!("staging path {shown} already has {} mounted, not {source}", top.source)));
                }
                let mut all = options.clone();
                all.extend(mount_flags.iter().filter(|f| !options.contains(f)).cloned());
                create_dir(staging).await?;
                self.mounter.mount(source, staging, mount_fs, &all).await?;
                Ok(mount_fs.clone())
            }
        }
    }

    /// Makes sure `device` holds a filesystem holdfast can mount, creating `fs_type` only on a
    /// blank device. Returns the filesystem found or made. A loop device whose `image` proves
    /// it reads as zeros ([`format::ZeroDevice`]) is formatted without a `blkid` process.
    async fn ensure_filesystem(&self, device: &Path, image: Option<&Path>, fs_type: &str) -> Result<(String, bool)> {
        let zero = match image {
            Some(image) if !fs_type.is_empty() => {
                let (d, i) = (device.to_owned(), image.to_owned());
                run_path(image, "looking for data in", move || Ok(format::ZeroDevice::of_loop(&d, &i))).await?
            }
            _ => None,
        };
        let found = if let Some(zero) = zero {
            format::mkfs_zero(self.exec.as_ref(), zero, fs_type).await?;
            None
        } else if fs_type.is_empty() {
            match format::probe(self.exec.as_ref(), device).await? {
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "{} is blank and no filesystem type was requested; set fs_type (one of {:?})",
                        device.display(),
                        format::SUPPORTED_FS
                    )));
                }
                found => found,
            }
        } else {
            // Probes, and formats only when blkid found nothing at all.
            format::mkfs_if_blank(self.exec.as_ref(), device, fs_type).await?
        };
        match found {
            None => {
                tracing::info!(device = %device.display(), fs_type, "created a filesystem on a blank device");
                Ok((fs_type.to_owned(), true))
            }
            Some(sig) if format::SUPPORTED_FS.contains(&sig.kind.as_str()) && (fs_type.is_empty() || sig.kind == fs_type) => {
                Ok((sig.kind, false))
            }
            Some(sig) => Err(Error::FailedPrecondition(format!(
                "{} holds {:?} (found by blkid -p), not {}; holdfast never formats a device that is not blank: \
                 request the filesystem it holds, or wipe the device by hand if its content is not needed",
                device.display(),
                sig.kind,
                if fs_type.is_empty() { "a filesystem holdfast mounts" } else { fs_type }
            ))),
        }
    }

    /// Unmounts the volume's mounts at `staging` (`is_own` tells which are), layer by layer,
    /// and stops at anything else, which is left alone. The directory itself is left: the CO
    /// owns it.
    pub async fn unstage(&self, staging: &RequestPath, is_own: &(dyn Fn(&MountInfo) -> bool + Sync)) -> Result<Peeled> {
        self.unmount_own(staging, is_own).await
    }

    /// Bind-mounts the staged filesystem at `staging` onto `target` (created as a directory),
    /// read-only when asked, with `mount_flags`. Idempotent: the same publish again is success;
    /// `target` holding something else, or the same volume with the other read-only mode, is
    /// ALREADY_EXISTS. Nothing mounted at `staging` is FAILED_PRECONDITION.
    pub async fn publish_filesystem(
        &self,
        staging: &RequestPath,
        target: &RequestPath,
        readonly: bool,
        mount_flags: &[String],
    ) -> Result<()> {
        let Some(staged) = self.mounter.mount_at(staging).await? else {
            return Err(Error::FailedPrecondition(format!("volume is not staged: nothing is mounted at {}", staging.as_path().display())));
        };
        if let Some(top) = self.mounter.mount_at(target).await? {
            // A bind shows the same device and the same root inside the filesystem as its source.
            if top.major_minor != staged.major_minor || top.root != staged.root {
                return Err(Error::AlreadyExists(format!(
                    "target path {} already has {} ({}) mounted, not the volume staged at {}",
                    target.as_path().display(),
                    top.source,
                    top.root.display(),
                    staging.as_path().display()
                )));
            }
            return check_readonly(&top, readonly, staged.mount_options.iter().any(|o| o == "ro"), target.as_path());
        }
        create_dir(target).await?;
        let mut options = mount_flags.to_vec();
        if readonly && !options.iter().any(|o| o == "ro") {
            options.push("ro".into());
        }
        self.mounter.bind(BindSource::Mount(staging), target, &options).await
    }

    /// Bind-mounts the device node onto `target` (created as a file), read-only when asked.
    /// Idempotent, like [`Node::publish_filesystem`].
    ///
    /// The kernel does not apply a mount's `ro` flag to writes through a device node, so a
    /// read-only block publish is marked `ro` in the mount table but is enforced by the
    /// container runtime (the kubelet grants the container read access to the device only).
    pub async fn publish_block(&self, device: &Path, target: &RequestPath, readonly: bool) -> Result<()> {
        let d = device.to_owned();
        let exists = run_path(device, "checking the device", move || match std::fs::metadata(&d) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            other => other.map(|_| true).context(|| format!("checking device {}", d.display())),
        })
        .await?;
        if !exists {
            return Err(Error::NotFound(format!("device {} of the volume does not exist on this node", device.display())));
        }
        let shown = target.as_path().display();
        if let Some(top) = self.mounter.mount_at(target).await? {
            let rdev = rdev_at(target).await?;
            if !same_block_bind(&top, rdev, device).await {
                return Err(Error::AlreadyExists(format!(
                    "target path {shown} already has {} mounted, not device {}",
                    top.root.display(),
                    device.display()
                )));
            }
            return check_readonly(&top, readonly, false, target.as_path());
        }
        let t = target.clone();
        run_path(target.as_path(), "creating the target file", move || {
            if let Some(fd) = t.open_path()? {
                let st = rustix::fs::fstat(&fd).map_err(|e| Error::io(format!("inspecting {}", t.as_path().display()), e.into()))?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
                    return Err(Error::FailedPrecondition(format!(
                        "target path {} is a directory; a raw block volume is published on a file",
                        t.as_path().display()
                    )));
                }
                return Ok(());
            }
            // Never truncates: a file that appeared meanwhile is reused, never emptied.
            t.create_file().map(drop)
        })
        .await?;
        let options: Vec<String> = if readonly { vec!["ro".into()] } else { vec![] };
        self.mounter.bind(BindSource::Device(device), target, &options).await
    }

    /// Unmounts the volume's mounts at `target` (`is_own` tells which are) and, when `remove`
    /// (holdfast created the path) and nothing else is mounted there, removes it. Only an empty
    /// directory or a file is removed: a directory that still has content after the unmounts
    /// is FAILED_PRECONDITION, since deleting it would delete data.
    pub async fn unpublish(&self, target: &RequestPath, is_own: &(dyn Fn(&MountInfo) -> bool + Sync), remove: bool) -> Result<Peeled> {
        let peeled = self.unmount_own(target, is_own).await?;
        if matches!(peeled, Peeled::Foreign(_)) || !remove {
            return Ok(peeled);
        }
        let t = target.clone();
        run_path(target.as_path(), "removing the target path", move || t.remove()).await?;
        Ok(peeled)
    }

    /// Unmounts every layer at `path` that `is_own`; stops at the first that is not.
    async fn unmount_own(&self, path: &RequestPath, is_own: &(dyn Fn(&MountInfo) -> bool + Sync)) -> Result<Peeled> {
        let mut busy_retries = BUSY_RETRIES;
        let mut peeled = Peeled::Nothing;
        for _ in 0..MAX_LAYERS + BUSY_RETRIES {
            let Some(top) = self.mounter.mount_at(path).await? else {
                return Ok(peeled);
            };
            if !is_own(&top) {
                return Ok(Peeled::Foreign(top));
            }
            match self.mounter.unmount(path, top.id).await {
                Ok(()) => peeled = Peeled::Unmounted,
                Err(Error::NotFound(_)) | Err(Error::Aborted(_)) => {}
                // A file descriptor inherited by a child between fork and exec, or a process
                // that is just exiting, keeps a mount busy for a moment; a real user does not
                // go away, and the error then says what is busy.
                Err(e) if is_busy(&e) && busy_retries > 0 => {
                    busy_retries -= 1;
                    tracing::debug!(path = %path.as_path().display(), "unmount busy, retrying: {e}");
                    tokio::time::sleep(BUSY_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Internal(format!("{} is still mounted after {MAX_LAYERS} unmounts", path.as_path().display())))
    }

    /// Grows the filesystem mounted at `mount_path` (on `device`) to fill the device, online.
    /// Returns the new filesystem size in bytes.
    pub async fn expand_filesystem(&self, device: &Path, mount_path: &RequestPath) -> Result<u64> {
        let Some(top) = self.mounter.mount_at(mount_path).await? else {
            return Err(Error::FailedPrecondition(format!(
                "cannot grow the filesystem: nothing is mounted at {}",
                mount_path.as_path().display()
            )));
        };
        let Some(sig) = format::probe(self.exec.as_ref(), device).await? else {
            return Err(Error::FailedPrecondition(format!("cannot grow the filesystem: {} holds none", device.display())));
        };
        format::grow(self.exec.as_ref(), &sig.kind, device, &top.mount_point).await?;
        // CSI wants the volume's capacity, not the filesystem's usable size.
        size_of(device).await
    }

    /// Whether `path` is a mount point (per `/proc/self/mountinfo`).
    pub async fn is_mounted(&self, path: &RequestPath) -> Result<bool> {
        Ok(self.mounter.mount_at(path).await?.is_some())
    }

    /// Health of a staged or published volume at `path`: [`Condition::Abnormal`] when nothing
    /// is mounted there any more, when the filesystem turned read-only under a read-write mount
    /// (the kernel does that after I/O errors), when `path` is no longer the block device it
    /// should be (`expect_block`: a published raw block volume), or when the device behind the
    /// mount is gone (removed, or a loop device whose backing file was deleted). A mount table
    /// that cannot be read is reported as abnormal too, with the reason. `mounts` is the mount
    /// table ([`Mounter::mounts`]); this runs on the blocking pool (it stats `path`).
    pub fn condition(&self, path: &Path, expect_block: bool, mounts: &[MountInfo]) -> Condition {
        match self.check(path, expect_block, mounts) {
            Ok(None) => Condition::Healthy,
            Ok(Some(why)) => Condition::Abnormal(why),
            Err(e) => Condition::Abnormal(format!("cannot check {}: {e}", path.display())),
        }
    }

    fn check(&self, path: &Path, expect_block: bool, mounts: &[MountInfo]) -> Result<Option<String>> {
        let Some(top) = top_at(mounts, path) else {
            return Ok(Some(format!("nothing is mounted at {} any more", path.display())));
        };
        if expect_block {
            let meta = match std::fs::metadata(path) {
                Ok(m) => m,
                Err(e) => return Ok(Some(format!("cannot reach the device at {}: {e}", path.display()))),
            };
            if !meta.file_type().is_block_device() {
                return Ok(Some(format!("{} is not a block device any more", path.display())));
            }
            return Ok(device_health(meta.rdev(), &path.display().to_string()));
        }
        // A filesystem the kernel gave up on: ext4 shows `emergency_ro`/`shutdown` (Linux 6.x)
        // or `ro` on the superblock while the mount itself stays `rw`.
        let mount_rw = top.mount_options.iter().any(|o| o == "rw");
        let sb = |opt: &str| top.super_options.iter().any(|o| o == opt);
        if sb("shutdown") {
            return Ok(Some(format!("the {} filesystem at {} was shut down after errors (see dmesg)", top.fs_type, path.display())));
        }
        if mount_rw && (sb("ro") || sb("emergency_ro")) {
            return Ok(Some(format!(
                "the {} filesystem at {} has become read-only although it is mounted read-write \
                 (the kernel does this after I/O errors; see dmesg)",
                top.fs_type,
                path.display()
            )));
        }
        // XFS after a forced shutdown answers every stat with EIO and shows nothing in mountinfo.
        if let Err(e) = std::fs::metadata(path) {
            return Ok(Some(format!("cannot stat {}: {e} (the filesystem may have been shut down after errors)", path.display())));
        }
        if top.source.starts_with("/dev/") {
            return Ok(match std::fs::metadata(&top.source) {
                Ok(m) if m.file_type().is_block_device() => device_health(m.rdev(), &top.source),
                Ok(_) => Some(format!("{} behind {} is not a block device any more", top.source, path.display())),
                Err(e) => Some(format!("device {} behind {} is gone: {e}", top.source, path.display())),
            });
        }
        Ok(None)
    }

    /// The `f_fsid` of the filesystem mounted at `path` (opened beneath its root, no symlink
    /// followed); `None` when nothing is there or the filesystem reports 0. Off the workers.
    pub async fn fsid_at(&self, path: &RequestPath) -> Result<Option<u64>> {
        let p = path.clone();
        run_path(path.as_path(), "reading the filesystem id of", move || {
            let Some(fd) = p.open_path()? else { return Ok(None) };
            let st = rustix::fs::fstatvfs(&fd).map_err(|e| Error::io(format!("statvfs {}", p.as_path().display()), e.into()))?;
            Ok((st.f_fsid != 0).then_some(st.f_fsid))
        })
        .await
    }

    /// Usage of the filesystem at `path` (statvfs), or of the block device at `path`. For a
    /// block device only `total_bytes` is known (used and available are 0, inodes `None`).
    /// A filesystem path with nothing mounted is NOT_FOUND: statvfs would describe whatever
    /// filesystem holds the empty directory, not the volume. Runs on the blocking pool.
    pub fn stats(&self, path: &Path, mounts: &[MountInfo]) -> Result<Stats> {
        let meta = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!("volume path {} does not exist", path.display())));
            }
            other => other.context(|| format!("checking volume path {}", path.display()))?,
        };
        if meta.file_type().is_block_device() {
            return Ok(Stats { total_bytes: format::size_of(path)?, ..Stats::default() });
        }
        if top_at(mounts, path).is_none() {
            return Err(Error::NotFound(format!("nothing is mounted at volume path {}", path.display())));
        }
        let st = nix::sys::statvfs::statvfs(path).map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?;
        let frsize: u64 = st.fragment_size();
        let (blocks, bfree, bavail): (u64, u64, u64) = (st.blocks(), st.blocks_free(), st.blocks_available());
        let (files, ffree): (u64, u64) = (st.files(), st.files_free());
        // btrfs allocates inodes dynamically and reports 0 of them: unknown, not "none left".
        let inodes = |v: u64| (files > 0).then_some(v);
        Ok(Stats {
            total_bytes: blocks * frsize,
            available_bytes: bavail * frsize,
            used_bytes: blocks.saturating_sub(bfree) * frsize,
            total_inodes: inodes(files),
            free_inodes: inodes(ffree),
            used_inodes: inodes(files.saturating_sub(ffree)),
        })
    }
}

/// The topmost mount at `path`, matched as given and, failing that, with symlinks resolved
/// (the kernel shows canonical paths). The plain match comes first so a dead NFS mount named
/// exactly is found without touching it.
fn top_at<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    mountinfo::top_at(mounts, path).or_else(|| {
        let canonical = std::fs::canonicalize(path).ok()?;
        (canonical != path).then(|| mountinfo::top_at(mounts, &canonical)).flatten()
    })
}

/// A device as the pool named it, resolved once (off the async workers): its canonical path
/// and device number, so a mount line can be matched by either.
struct DeviceId {
    path: PathBuf,
    canonical: Option<PathBuf>,
    rdev: Option<u64>,
}

impl DeviceId {
    async fn of(device: &Path) -> Result<DeviceId> {
        let d = device.to_owned();
        run_path(device, "resolving the device", move || {
            let canonical = std::fs::canonicalize(&d).ok();
            let rdev = std::fs::metadata(&d).ok().filter(|m| m.file_type().is_block_device()).map(|m| m.rdev());
            Ok(DeviceId { path: d, canonical, rdev })
        })
        .await
    }

    /// Whether mount `m` is of this device: the same path (as given or resolved, e.g.
    /// `/dev/vg/lv` → `/dev/dm-3`) or the same device number (btrfs shows an anonymous one, so
    /// the number only backs up the path checks).
    fn is(&self, m: &MountInfo) -> bool {
        let src = Path::new(&m.source);
        src == self.path || self.canonical.as_deref() == Some(src) || self.rdev.is_some_and(|r| dev_name(r) == m.major_minor)
    }
}

/// The device number of the block device a pool handed out (links such as `/dev/vg/lv`
/// followed: the pool's own path, not a request path); `None` when it is not a block device.
pub async fn device_number(device: &Path) -> Option<u64> {
    DeviceId::of(device).await.ok().and_then(|d| d.rdev)
}

/// Whether `m`, the mount at a target whose node has device number `target_rdev`, is `device`
/// bound onto it. (The recording fake binds nothing real, so the mount's root names the source.)
async fn same_block_bind(m: &MountInfo, target_rdev: Option<u64>, device: &Path) -> bool {
    let dev = DeviceId::of(device).await.ok().and_then(|d| d.rdev);
    match (target_rdev, dev) {
        (Some(t), Some(d)) => t == d,
        _ => m.root == device || Path::new(&m.source) == device,
    }
}

/// The device number of the block device node at `path` (opened without following a
/// symlink), `None` when it is something else or missing.
pub async fn rdev_at(path: &RequestPath) -> Result<Option<u64>> {
    let p = path.clone();
    run_path(path.as_path(), "inspecting the path", move || {
        let Some(fd) = p.open_path()? else { return Ok(None) };
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::io(format!("inspecting {}", p.as_path().display()), e.into()))?;
        Ok((rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::BlockDevice).then_some(st.st_rdev))
    })
    .await
}

/// Whether two mount sources name the same thing (NFS sources differ only by a trailing `/`).
fn same_source(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// An existing publish is only the same publish when its read-only mode is the requested one.
/// A read-write request on a volume staged read-only inherits `ro`; that is still a match.
fn check_readonly(existing: &MountInfo, readonly: bool, staged_ro: bool, target: &Path) -> Result<()> {
    let is_ro = existing.mount_options.iter().any(|o| o == "ro");
    if is_ro == readonly || (is_ro && staged_ro) {
        return Ok(());
    }
    let mode = |ro: bool| if ro { "read-only" } else { "read-write" };
    Err(Error::AlreadyExists(format!(
        "the volume is already published {} at {}; this request asks for {}",
        mode(is_ro),
        target.display(),
        mode(readonly)
    )))
}

/// What is wrong with block device `rdev` (named `name` in messages), per sysfs: gone, or a
/// loop device whose backing file was detached or deleted.
fn device_health(rdev: u64, name: &str) -> Option<String> {
    let sys = PathBuf::from("/sys/dev/block").join(dev_name(rdev));
    if !sys.exists() {
        return Some(format!("device {name} ({}) is gone", dev_name(rdev)));
    }
    if std::fs::read_to_string(sys.join("size")).is_ok_and(|s| s.trim() == "0") {
        return Some(format!("device {name} has size 0 (a loop device detached from its file?)"));
    }
    if sys.join("loop").exists() {
        return match std::fs::read_to_string(sys.join("loop/backing_file")) {
            Ok(f) if f.trim_end().ends_with("(deleted)") => {
                Some(format!("the backing file of loop device {name} was deleted ({})", f.trim_end()))
            }
            Ok(_) => None,
            Err(_) => Some(format!("loop device {name} has no backing file any more")),
        };
    }
    None
}

/// What [`Node::unstage`] and [`Node::unpublish`] found at the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeled {
    /// Nothing was mounted there.
    Nothing,
    /// The volume's mounts were unmounted; nothing is mounted there now.
    Unmounted,
    /// Something that is not the volume's is mounted there (on top); it was left alone.
    Foreign(MountInfo),
}

/// Whether an unmount failed because the mount is in use.
fn is_busy(e: &Error) -> bool {
    match e {
        Error::Exec { source, .. } => source.stderr().contains("busy"),
        Error::Io { source, .. } => source.raw_os_error() == Some(libc::EBUSY),
        _ => false,
    }
}

/// Runs a blocking call on `path` through [`crate::blocking::run`].
async fn run_path<T: Send + 'static>(path: &Path, what: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let what = format!("{what} {}", path.display());
    crate::blocking::run(&format!("path:{}", path.display()), &what, crate::blocking::METADATA_DEADLINE, f).await?
}

/// The size of a device or file, off the async workers.
async fn size_of(device: &Path) -> Result<u64> {
    let d = device.to_owned();
    run_path(device, "reading the size of", move || format::size_of(&d)).await
}

/// Creates a directory target beneath its root, no symlink followed.
async fn create_dir(path: &RequestPath) -> Result<()> {
    let p = path.clone();
    run_path(path.as_path(), "creating directory", move || p.create_dir_all().map(drop)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{FakeExec, Reply};
    use mount::{FakeMounter, MountCall};

    /// A node over fakes, a scratch directory, and a non-empty "device" file that `probe`
    /// accepts (its signature comes from the scripted blkid answer).
    struct Rig {
        exec: Arc<FakeExec>,
        mounter: Arc<FakeMounter>,
        node: Node,
        dir: tempfile::TempDir,
        device: PathBuf,
    }

    fn rig(blkid: Vec<Reply>) -> Rig {
        let exec = Arc::new(FakeExec::new());
        exec.on("blkid", blkid);
        // The 1 MiB fake device holds a filesystem of exactly its size unless a test says otherwise.
        exec.on("dumpe2fs -h", vec![Reply::Ok("Block count:              256\nBlock size:               4096\n".into())]);
        let mounter = Arc::new(FakeMounter::new());
        let node = Node::new(exec.clone(), mounter.clone());
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("dev-loop9");
        std::fs::File::create(&device).unwrap().set_len(1 << 20).unwrap();
        Rig { exec, mounter, node, dir, device }
    }

    impl Rig {
        fn path(&self, p: &str) -> PathBuf {
            self.dir.path().join(p)
        }
        fn rp(&self, p: &str) -> RequestPath {
            RequestPath::internal(&self.path(p)).unwrap()
        }
        /// Whatever of mount lines is an own mount: the unit tests below only mount their own.
        fn anything(_: &MountInfo) -> bool {
            true
        }
        fn progs(&self) -> Vec<String> {
            self.exec.calls().iter().map(|c| c[0].clone()).collect()
        }
        fn mounts(&self) -> Vec<MountCall> {
            self.mounter.calls().into_iter().filter(|c| !matches!(c, MountCall::Unmount { .. })).collect()
        }
        async fn stage(&self, fs: &str) -> Result<()> {
            self.node.stage_filesystem(&Attachment::Device(self.device.clone()), &self.rp("stage"), fs, &["noatime".into()]).await.map(drop)
        }
    }

    const BLANK: fn() -> Reply = || Reply::Fail(2, String::new());
    fn found(kind: &str) -> Reply {
        Reply::Ok(format!("DEVNAME=/dev/loop9\nUUID=u-1\nTYPE={kind}\n"))
    }

    #[tokio::test]
    async fn stage_formats_only_blank_devices() {
        struct Case {
            name: &'static str,
            blkid: Vec<Reply>,
            fs: &'static str,
            want_progs: &'static [&'static str],
            want_mount: Option<(&'static str, &'static [&'static str])>,
            want_err: Option<&'static str>,
        }
        let cases = [
            Case {
                name: "blank device gets the requested filesystem",
                blkid: vec![BLANK()],
                fs: "ext4",
                // One probe (the safety step), no second one after mkfs (issue 14).
                want_progs: &["blkid", "mkfs.ext4"],
                want_mount: Some(("ext4", &["noatime"])),
                want_err: None,
            },
            Case {
                name: "existing xfs is mounted with nouuid, then grown to the device (a no-op when full)",
                blkid: vec![found("xfs")],
                fs: "xfs",
                want_progs: &["blkid", "xfs_growfs"],
                want_mount: Some(("xfs", &["noatime", "nouuid"])),
                want_err: None,
            },
            Case {
                name: "no fs_type accepts the filesystem found",
                blkid: vec![found("btrfs")],
                fs: "",
                want_progs: &["blkid", "btrfs"],
                want_mount: Some(("btrfs", &["noatime"])),
                want_err: None,
            },
            Case {
                name: "another filesystem is refused",
                blkid: vec![found("ext4")],
                fs: "xfs",
                want_progs: &["blkid"],
                want_mount: None,
                want_err: Some("holds \"ext4\""),
            },
            Case {
                name: "a non-filesystem signature is refused",
                blkid: vec![found("LVM2_member")],
                fs: "ext4",
                want_progs: &["blkid"],
                want_mount: None,
                want_err: Some("never formats a device that is not blank"),
            },
            Case {
                name: "a partition table is refused",
                blkid: vec![Reply::Ok("DEVNAME=/dev/loop9\nPTTYPE=gpt\n".into())],
                fs: "ext4",
                want_progs: &["blkid"],
                want_mount: None,
                want_err: Some("gpt partition table"),
            },
            Case {
                name: "several signatures are refused",
                blkid: vec![Reply::Fail(8, "ambivalent result".into())],
                fs: "ext4",
                want_progs: &["blkid"],
                want_mount: None,
                want_err: Some("several signatures"),
            },
            Case {
                name: "a probe failure is not blank",
                blkid: vec![Reply::Fail(2, "blkid: error: /dev/loop9: Input/output error".into())],
                fs: "ext4",
                want_progs: &["blkid"],
                want_mount: None,
                want_err: Some("Input/output error"),
            },
            Case {
                name: "blank without fs_type",
                blkid: vec![BLANK()],
                fs: "",
                want_progs: &["blkid"],
                want_mount: None,
                want_err: Some("no filesystem type was requested"),
            },
        ];
        for c in cases {
            let r = rig(c.blkid);
            let got = r.stage(c.fs).await;
            assert_eq!(r.progs(), c.want_progs, "{}", c.name);
            match (got, c.want_err) {
                (Ok(()), None) => {}
                (Err(e), Some(want)) => {
                    assert!(e.to_string().contains(want), "{}: {e}", c.name);
                    if want != "Input/output error" && want != "no filesystem type was requested" {
                        assert!(matches!(e, Error::FailedPrecondition(_)), "{}: {e:?}", c.name);
                    }
                }
                (got, want) => panic!("{}: got {got:?}, want error {want:?}", c.name),
            }
            let want_mounts: Vec<MountCall> = c
                .want_mount
                .map(|(fs, opts)| MountCall::Mount {
                    source: r.device.display().to_string(),
                    target: r.path("stage"),
                    fs_type: fs.into(),
                    options: opts.iter().map(|o| o.to_string()).collect(),
                })
                .into_iter()
                .collect();
            assert_eq!(r.mounts(), want_mounts, "{}", c.name);
            assert_eq!(r.path("stage").is_dir(), c.want_mount.is_some(), "{}: staging dir", c.name);
        }
    }

    #[tokio::test]
    async fn stage_is_idempotent_and_guards_the_staging_path() {
        let r = rig(vec![BLANK(), found("ext4")]);
        r.stage("ext4").await.unwrap();
        r.stage("ext4").await.unwrap();
        assert_eq!(r.progs().iter().filter(|p| *p == "mkfs.ext4").count(), 1);
        assert_eq!(r.mounts().len(), 1, "second stage must not mount again");

        let r = rig(vec![found("ext4")]);
        r.mounter.add_mount("/dev/sdz", &r.path("stage"), "ext4", &["rw"]);
        let err = r.stage("ext4").await.unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)) && err.to_string().contains("/dev/sdz"), "{err}");
        assert!(r.exec.calls().is_empty(), "nothing probed or formatted: {:?}", r.exec.lines());
    }

    /// A file pool's fresh loop device is formatted without a probe process (its image's holes
    /// prove it blank); once its image holds anything, the stage probes with blkid first, and a
    /// signature blkid reports is never formatted over. Real loop devices, fake mkfs and mounts.
    #[tokio::test]
    async fn a_fresh_loop_device_is_formatted_without_a_probe_and_a_written_one_is_probed() {
        struct Detach(PathBuf);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
            }
        }
        let attach = |img: &Path| {
            let out = std::process::Command::new("losetup").args(["--find", "--show"]).arg(img).output().unwrap();
            assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        };
        let r = rig(vec![found("LVM2_member")]);
        let img = r.path("v.img");
        std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
        let device = attach(&img);
        let _detach = Detach(device.clone());
        let loop_att = Attachment::Loop { device: device.clone(), image: img.clone() };
        r.node.stage_filesystem(&loop_att, &r.rp("stage"), "ext4", &[]).await.unwrap();
        assert_eq!(r.progs(), ["mkfs.ext4"], "a never-written image needs no blkid");

        // The same device once the image holds data: probed, and the signature found is refused.
        let r = rig(vec![found("LVM2_member")]);
        {
            use std::os::unix::fs::FileExt;
            std::fs::OpenOptions::new().write(true).open(&img).unwrap().write_all_at(b"LABELONE", 512).unwrap();
        }
        let err = r.node.stage_filesystem(&loop_att, &r.rp("stage"), "ext4", &[]).await.unwrap_err();
        assert!(err.to_string().contains("LVM2_member"), "{err}");
        assert_eq!(r.progs(), ["blkid"], "a written image is probed and never formatted over");
        assert!(r.mounts().is_empty());

        // A blank image named beside another file's device proves nothing about that device.
        let r = rig(vec![found("xfs")]);
        let other = r.path("o.img");
        std::fs::File::create(&other).unwrap().set_len(8 << 20).unwrap();
        let wrong = Attachment::Loop { device: device.clone(), image: other };
        let err = r.node.stage_filesystem(&wrong, &r.rp("stage"), "ext4", &[]).await.unwrap_err();
        assert!(err.to_string().contains("\"xfs\""), "{err}");
        assert_eq!(r.progs(), ["blkid"]);
    }

    #[tokio::test]
    async fn stage_mount_attachment() {
        let r = rig(vec![]);
        let att = Attachment::Mount { source: "srv:/export/v1".into(), fs_type: "nfs".into(), options: vec!["vers=4.2".into()] };
        let flags = vec!["noatime".to_string(), "vers=4.2".to_string()];
        r.node.stage_filesystem(&att, &r.rp("stage"), "ext4", &flags).await.unwrap();
        r.node.stage_filesystem(&att, &r.rp("stage"), "ext4", &flags).await.unwrap();
        assert_eq!(
            r.mounts(),
            [MountCall::Mount {
                source: "srv:/export/v1".into(),
                target: r.path("stage"),
                fs_type: "nfs".into(),
                options: vec!["vers=4.2".into(), "noatime".into()]
            }]
        );
        assert!(r.exec.calls().is_empty(), "a mount attachment is never probed");
        let other = Attachment::Mount { source: "srv:/export/v2".into(), fs_type: "nfs".into(), options: vec![] };
        assert!(matches!(r.node.stage_filesystem(&other, &r.rp("stage"), "", &[]).await, Err(Error::AlreadyExists(_))));
    }

    #[tokio::test]
    async fn stage_grows_an_ext4_smaller_than_its_device_before_mounting() {
        let r = rig(vec![found("ext4")]);
        std::fs::File::options().write(true).open(&r.device).unwrap().set_len(8 << 20).unwrap();
        r.stage("ext4").await.unwrap();
        assert_eq!(r.progs(), ["blkid", "dumpe2fs", "e2fsck", "resize2fs"]);
        assert_eq!(r.mounts().len(), 1, "mounted after the offline resize");

        let full = rig(vec![found("ext4")]);
        full.stage("ext4").await.unwrap();
        assert_eq!(full.progs(), ["blkid", "dumpe2fs"], "a full-size ext4 is mounted as is");
    }

    #[tokio::test]
    async fn stage_never_checks_a_filesystem_mounted_elsewhere_under_another_name() {
        // The pool hands out a link (/dev/zvol/…, /dev/<vg>/<lv>); mountinfo names the node it points to.
        let r = rig(vec![found("ext4")]);
        std::fs::File::options().write(true).open(&r.device).unwrap().set_len(8 << 20).unwrap();
        let link = r.path("dev-link");
        std::os::unix::fs::symlink(&r.device, &link).unwrap();
        r.mounter.add_mount(&r.device.to_string_lossy(), &r.path("elsewhere"), "ext4", &["rw"]);
        r.node.stage_filesystem(&Attachment::Device(link), &r.rp("stage"), "ext4", &[]).await.unwrap();
        assert_eq!(r.progs(), ["blkid"], "no e2fsck/resize2fs while the device is mounted elsewhere");
    }

    #[tokio::test]
    async fn stage_creates_no_directory_through_a_symlink() {
        let r = rig(vec![found("ext4")]);
        let victim = r.path("victim");
        std::fs::create_dir(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, r.path("link")).unwrap();
        let through = RequestPath::internal(&r.path("link/stage")).unwrap();
        let err = r.node.stage_filesystem(&Attachment::Device(r.device.clone()), &through, "ext4", &[]).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("symbolic link"), "{err}");
        assert!(!victim.join("stage").exists() && r.mounts().is_empty(), "nothing created or mounted through the link");
    }

    #[tokio::test]
    async fn publish_filesystem_binds_once_with_the_requested_mode() {
        let r = rig(vec![found("ext4")]);
        let (stage, target) = (r.rp("stage"), r.rp("pods/p1/mount"));
        let err = r.node.publish_filesystem(&stage, &target, false, &[]).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("volume is not staged"), "{err}");

        r.stage("ext4").await.unwrap();
        let flags = vec!["nosuid".to_string()];
        r.node.publish_filesystem(&stage, &target, true, &flags).await.unwrap();
        r.node.publish_filesystem(&stage, &target, true, &flags).await.unwrap();
        assert!(r.path("pods/p1/mount").is_dir());
        let binds: Vec<MountCall> = r.mounts().into_iter().filter(|c| matches!(c, MountCall::Bind { .. })).collect();
        assert_eq!(
            binds,
            [MountCall::Bind { source: r.path("stage"), target: r.path("pods/p1/mount"), options: vec!["nosuid".into(), "ro".into()] }]
        );
        assert!(r.node.is_mounted(&target).await.unwrap());

        let err = r.node.publish_filesystem(&stage, &target, false, &[]).await.unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)) && err.to_string().contains("read-only"), "{err}");

        let foreign = r.rp("pods/p2/mount");
        r.mounter.add_mount("tmpfs", foreign.as_path(), "tmpfs", &["rw"]);
        assert!(matches!(r.node.publish_filesystem(&stage, &foreign, false, &[]).await, Err(Error::AlreadyExists(_))));
    }

    #[tokio::test]
    async fn publish_block_creates_a_file_and_binds_the_device() {
        let r = rig(vec![]);
        let target = r.rp("publish/pvc-1/pod-1");
        r.node.publish_block(&r.device, &target, true).await.unwrap();
        r.node.publish_block(&r.device, &target, true).await.unwrap();
        assert!(std::fs::metadata(target.as_path()).unwrap().is_file());
        assert_eq!(
            r.mounts(),
            [MountCall::Bind { source: r.device.clone(), target: target.as_path().to_owned(), options: vec!["ro".into()] }]
        );
        assert!(matches!(r.node.publish_block(&r.device, &target, false).await, Err(Error::AlreadyExists(_))));
        assert!(matches!(r.node.publish_block(&r.path("no-such-dev"), &r.rp("t2"), false).await, Err(Error::NotFound(_))));
        std::fs::create_dir(r.path("a-dir")).unwrap();
        assert!(matches!(r.node.publish_block(&r.device, &r.rp("a-dir"), false).await, Err(Error::FailedPrecondition(_))));

        r.node.unpublish(&target, &Rig::anything, true).await.unwrap();
        assert!(!target.as_path().exists());
        assert!(!r.node.is_mounted(&target).await.unwrap());
    }

    #[tokio::test]
    async fn unpublish_and_unstage_unmount_only_their_own_layers() {
        let r = rig(vec![found("xfs")]);
        let (stage, target) = (r.rp("stage"), r.rp("target"));
        // Missing paths are success, and nothing is unmounted.
        assert_eq!(r.node.unpublish(&target, &Rig::anything, true).await.unwrap(), Peeled::Nothing);
        assert_eq!(r.node.unstage(&stage, &Rig::anything).await.unwrap(), Peeled::Nothing);
        assert!(r.mounter.calls().is_empty());

        r.stage("xfs").await.unwrap();
        r.node.publish_filesystem(&stage, &target, false, &[]).await.unwrap();
        let mounts = r.mounter.mounts().await.unwrap();
        let own_mm = mountinfo::top_at(&mounts, stage.as_path()).unwrap().major_minor.clone();
        let own = move |m: &MountInfo| m.major_minor == own_mm;
        // Someone else's tmpfs on top of the bind is left alone, and so is the bind beneath it.
        r.mounter.add_mount("tmpfs", target.as_path(), "tmpfs", &["rw"]);
        assert!(matches!(r.node.unpublish(&target, &own, true).await.unwrap(), Peeled::Foreign(m) if m.fs_type == "tmpfs"));
        assert!(target.as_path().is_dir(), "the path of a foreign mount is not removed");
        let unmounts = || r.mounter.calls().into_iter().filter(|c| matches!(c, MountCall::Unmount { .. })).count();
        assert_eq!(unmounts(), 0);
        // Without it, the bind goes and the target with it.
        let tmpfs = r.mounter.mount_at(&target).await.unwrap().unwrap();
        r.mounter.unmount(&target, tmpfs.id).await.unwrap();
        assert_eq!(r.node.unpublish(&target, &own, true).await.unwrap(), Peeled::Unmounted);
        assert_eq!(r.node.unpublish(&target, &own, true).await.unwrap(), Peeled::Nothing);
        assert!(!target.as_path().exists() && !r.node.is_mounted(&target).await.unwrap());
        assert_eq!(r.node.unstage(&stage, &own).await.unwrap(), Peeled::Unmounted);
        assert_eq!(r.node.unstage(&stage, &own).await.unwrap(), Peeled::Nothing);
        assert!(!r.node.is_mounted(&stage).await.unwrap());
        assert!(stage.as_path().is_dir(), "the staging directory belongs to the CO");
    }

    #[tokio::test]
    async fn unpublish_never_deletes_content() {
        let r = rig(vec![]);
        let target = r.rp("target");
        std::fs::create_dir(target.as_path()).unwrap();
        std::fs::write(target.as_path().join("data"), b"precious").unwrap();
        let err = r.node.unpublish(&target, &Rig::anything, true).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert_eq!(std::fs::read(target.as_path().join("data")).unwrap(), b"precious");
        r.node.unpublish(&target, &Rig::anything, false).await.unwrap();
        assert!(target.as_path().is_dir(), "a path holdfast did not create is never removed");
    }

    #[tokio::test]
    async fn unstage_retries_a_moment_of_busy_then_reports_it() {
        let r = rig(vec![found("ext4")]);
        let stage = r.rp("stage");
        r.stage("ext4").await.unwrap();
        r.mounter.fail_next("unmount", "umount: /stage: target is busy.");
        r.node.unstage(&stage, &Rig::anything).await.unwrap();
        assert!(!r.node.is_mounted(&stage).await.unwrap());

        r.stage("ext4").await.unwrap();
        for _ in 0..=BUSY_RETRIES {
            r.mounter.fail_next("unmount", "umount: /stage: target is busy.");
        }
        let err = r.node.unstage(&stage, &Rig::anything).await.unwrap_err();
        assert!(err.to_string().contains("busy"), "{err}");
        assert!(r.node.is_mounted(&stage).await.unwrap());

        r.mounter.fail_next("unmount", "umount: /stage: permission denied");
        let err = r.node.unstage(&stage, &Rig::anything).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "not retried: {err}");
    }

    #[tokio::test]
    async fn expand_grows_the_filesystem_found_on_the_device() {
        let r = rig(vec![found("xfs")]);
        let err = r.node.expand_filesystem(&r.device, &r.rp("stage")).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        // The fake mount is not real, so statvfs fails after the grow; the argv is what matters here.
        r.stage("xfs").await.unwrap();
        let _ = r.node.expand_filesystem(&r.device, &r.rp("stage")).await;
        assert_eq!(r.exec.lines().last().unwrap(), &format!("xfs_growfs -d {}", r.path("stage").display()));
    }

    #[tokio::test]
    async fn condition_reports_lost_and_read_only_mounts() {
        let r = rig(vec![]);
        let line = |mp: &str, mount: &str, sb: &str, source: &str| MountInfo {
            id: 1,
            parent: 1,
            major_minor: "0:99".into(),
            root: "/".into(),
            mount_point: r.path(mp),
            mount_options: vec![mount.into()],
            fs_type: "ext4".into(),
            source: source.into(),
            super_options: vec![sb.into()],
        };
        for d in ["healthy", "published-ro", "errors", "gone"] {
            std::fs::create_dir(r.path(d)).unwrap();
        }
        r.mounter.add_line(line("healthy", "rw", "rw", "tank/v"));
        r.mounter.add_line(line("published-ro", "ro", "rw", "tank/v"));
        r.mounter.add_line(line("errors", "rw", "ro", "tank/v"));
        r.mounter.add_line(line("gone", "rw", "rw", "/dev/holdfast-no-such-device"));
        r.mounter.add_line(line("unmounted-but-listed", "rw", "rw", "tank/v"));
        struct Case {
            path: &'static str,
            block: bool,
            want: Option<&'static str>,
        }
        let cases = [
            Case { path: "healthy", block: false, want: None },
            Case { path: "published-ro", block: false, want: None },
            Case { path: "errors", block: false, want: Some("read-only") },
            Case { path: "gone", block: false, want: Some("is gone") },
            Case { path: "unmounted", block: false, want: Some("nothing is mounted") },
            Case { path: "healthy", block: true, want: Some("not a block device") },
            Case { path: "unmounted-but-listed", block: false, want: Some("cannot stat") },
        ];
        let mounts = r.mounter.mounts().await.unwrap();
        for c in cases {
            match (r.node.condition(&r.path(c.path), c.block, &mounts), c.want) {
                (Condition::Healthy, None) => {}
                (Condition::Abnormal(m), Some(want)) => assert!(m.contains(want), "{}: {m}", c.path),
                (got, want) => panic!("{}: got {got:?}, want {want:?}", c.path),
            }
        }
    }

    #[test]
    fn stats_refuses_an_unmounted_directory() {
        let r = rig(vec![]);
        std::fs::create_dir(r.path("empty")).unwrap();
        assert!(matches!(r.node.stats(&r.path("empty"), &[]), Err(Error::NotFound(_))));
        assert!(matches!(r.node.stats(&r.path("missing"), &[]), Err(Error::NotFound(_))));
    }
}
