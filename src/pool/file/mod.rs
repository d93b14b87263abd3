//! The `file` pool: each volume is a file in the pool directory with a JSON metadata file
//! beside it; the node attaches it to a loop device.
//!
//! Layout (everything stays inside the pool directory; local names are validated before any
//! path is built from them):
//!
//! ```text
//! <path>/volumes/<local>.img     the volume's data (preallocated, or sparse when thin)
//! <path>/volumes/<local>.json    VolumeRecord: the volume exists exactly when this file does
//! <path>/snapshots/<local>.img   an independent copy of a volume's image
//! <path>/snapshots/<local>.json  SnapshotRecord
//! <path>/*/.<local>.{img,json}.tmp   half-made files of a creation in progress
//! ```
//!
//! Crash safety: the metadata rename is the single commit point. A creation builds the image as
//! `.<local>.img.tmp` and writes the metadata's temporary, fsyncs both (the metadata first, then
//! the image), renames the image to `<local>.img`, then the metadata, then fsyncs the directory
//! ([`crate::store`], [`FilePool::commit`]). Until the metadata is in place nothing is visible;
//! afterwards the volume is complete. Deletion removes the metadata first, then the image, then
//! fsyncs the directory once. So the only leftovers a kill can leave are temporaries and an
//! image without metadata, and a retry of the same
//! name (create or delete) removes them.
//!
//! Provisioning: a `thick` volume (the default) has every block allocated at creation
//! (`fallocate`, instant on ext4/xfs/btrfs), so its writes never fail for lack of pool space:
//! its loop device is attached with discard turned off (a discard would punch holes into the
//! image), the image is re-allocated at every attach (healing holes an older attach let
//! through), btrfs images are NOCOW (`chattr +C` while empty), and a reflink copy of a thick
//! image keeps room for the blocks its sharers' next writes need (see `room`). A `thin` volume
//! is a sparse file that takes blocks as it is written; its promise is counted as room, and it
//! reports an abnormal condition when the pool filesystem can no longer back it.
//!
//! Every filesystem call on the pool directory runs through [`crate::blocking::run`] in the
//! domain `pool:<name>`: a hung or frozen pool filesystem makes this pool's calls fail with
//! DEADLINE_EXCEEDED (then UNAVAILABLE) while other pools keep answering.
//!
//! Snapshots and clones are independent copies of the image, so a volume that has snapshots can
//! be deleted and its snapshots stay usable. A source that is mounted (through its loop device,
//! per this process's mount table) is frozen for the copy through [`crate::node::freeze`] (its
//! policy: recorded first, thawed on every path, FAILED_PRECONDITION when it cannot be frozen);
//! a raw block volume in use has no filesystem to freeze and is copied as it is.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::blocking::{self, METADATA_DEADLINE};
use crate::config::{PoolConfig, format_size, parse_size};
use crate::error::{Context, Error, Result};
use crate::exec::{Cmd, Exec};
use crate::node::freeze::{Freezer, Target};
use crate::node::{loopdev, mountinfo};
use crate::pool::{
    Attachment, Condition, CreateRequest, GroupMember, GroupMembership, Pool, Seen, SnapshotInfo, Source, Survey, VolumeInfo,
};
use crate::store;
use crate::volume_id::{PoolKind, valid_local_name};

mod index;
use index::InDir;
mod room;

/// Filesystem for filesystem volumes when neither the request nor the config names one.
const DEFAULT_FS: &str = "ext4";
/// How long an image copy may take. Generous: without reflink, `cp` reads every allocated
/// byte, and a mounted source stays frozen for the whole copy.
const COPY_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// How long allocating or growing an image may take. `fallocate` only reserves extents on
/// ext4/xfs/btrfs (instant); the margin is for slow disks and filesystems that zero blocks.
const ALLOCATE_DEADLINE: Duration = Duration::from_secs(120);
/// How long `chattr` may take.
const CHATTR_TIMEOUT: Duration = Duration::from_secs(30);
/// The StorageClass parameter (and config key) choosing thick or thin volumes.
pub const PARAM_PROVISIONING: &str = "provisioning";
/// Where the kernel shows block devices' queue limits.
const SYS_BLOCK: &str = "/sys/block";

/// Whether a volume's blocks are allocated when it is created (thick) or when written (thin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provisioning {
    /// Every block allocated at creation: writes never fail for lack of pool space.
    #[default]
    Thick,
    /// A sparse file: blocks are taken as they are written.
    Thin,
}

impl Provisioning {
    /// `thick` or `thin`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Provisioning> {
        match s {
            "thick" => Some(Provisioning::Thick),
            "thin" => Some(Provisioning::Thin),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Provisioning::Thick => "thick",
            Provisioning::Thin => "thin",
        }
    }
}

/// Volumes made before provisioning existed were sparse files.
fn legacy_provisioning() -> Provisioning {
    Provisioning::Thin
}

/// What a volume's metadata file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VolumeRecord {
    /// Shared (issue 14: a listing page shares the index's records instead of copying them).
    #[serde(flatten)]
    info: Arc<VolumeInfo>,
    #[serde(default = "legacy_provisioning")]
    provisioning: Provisioning,
    /// Bytes of pool space kept for this image beyond its own allocation: blocks it shares
    /// with another image (reflink) that the next write to either needs anew.
    #[serde(default)]
    shared: u64,
    /// issue 11: cluster. The record's schema (refused when newer than this build's).
    #[serde(default)]
    schema: crate::pool::schema::RecordSchema,
}

/// What a snapshot's metadata file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotRecord {
    #[serde(flatten)]
    info: SnapshotInfo,
    /// As [`VolumeRecord::shared`]: a reflink snapshot of a thick volume keeps the volume's
    /// size, because the volume's next writes need new blocks.
    #[serde(default)]
    shared: u64,
    /// issue 11: cluster. As [`VolumeRecord::schema`].
    #[serde(default)]
    schema: crate::pool::schema::RecordSchema,
}

/// What the pool's filesystem can do for copies and allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolFs {
    /// btrfs: reflinks, and thick images must be NOCOW (a COW image needs new blocks on every
    /// overwrite, preallocated or not).
    Btrfs,
    /// ext2/3/4, tmpfs: `cp` makes real copies, which take their blocks at once.
    Copies,
    /// Anything else (xfs, bcachefs, nfs 4.2…): copies may share blocks (reflink).
    MayReflink,
}

impl PoolFs {
    fn of(path: &Path) -> Result<PoolFs> {
        use nix::sys::statfs::{BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, TMPFS_MAGIC, statfs};
        let st = statfs(path).map_err(|e| Error::io(format!("statfs of pool directory {}", path.display()), e.into()))?;
        let t = st.filesystem_type();
        Ok(if t == BTRFS_SUPER_MAGIC {
            PoolFs::Btrfs
        } else if t == EXT4_SUPER_MAGIC || t == TMPFS_MAGIC {
            // EXT4_SUPER_MAGIC is ext2's and ext3's too.
            PoolFs::Copies
        } else {
            PoolFs::MayReflink
        })
    }

    fn may_reflink(self) -> bool {
        self != PoolFs::Copies
    }
}

/// Volumes or snapshots: the two directories of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
        }
    }
    fn noun(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
        }
    }
}

/// The files of one volume or snapshot.
#[derive(Debug, Clone)]
struct Files {
    dir: PathBuf,
    img: PathBuf,
    meta: PathBuf,
    tmp_img: PathBuf,
    tmp_meta: PathBuf,
    /// The directory's shared fsync (group commit).
    sync: Arc<store::GroupSync>,
}

/// A `file` pool: image files in a directory, attached to loop devices on this node.
pub struct FilePool {
    name: String,
    root: PathBuf,
    reserve: u64,
    default_fs: String,
    /// Provisioning of volumes whose request does not choose.
    provisioning: Provisioning,
    exec: Arc<dyn Exec>,
    /// Where loop devices' queue limits are set (`/sys/block`; a fake tree in tests).
    sys_block: PathBuf,
    /// The [`blocking::run`] domain of this pool's filesystem calls.
    domain: String,
    /// Bytes claimed by creations, clones, snapshots and expansions in progress.
    in_flight: Arc<Mutex<u64>>,
    /// Serialises claims, so two creations never both count the same free space.
    claiming: Arc<tokio::sync::Mutex<()>>,
    /// Freezes a mounted source around its copy (the driver's, shared by its pools).
    freezer: Arc<Freezer>,
    /// Volumes and promised bytes in memory (issue 14: creation cost flat in the pool's size).
    index: index::Index,
    /// The volumes' and the snapshots' directory fsyncs, shared by concurrent writers.
    syncs: [Arc<store::GroupSync>; 2],
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Removes a file; one that is not there is success.
fn remove_if_exists(path: &Path) -> Result<()> {
    store::remove_if_exists(path).map(|_| ())
}

/// Removes an object's files, metadata first (from then on the object is gone, and what a kill
/// leaves is a leftover that a retry removes), then fsyncs the directory once (shared):
/// durable when it returns.
///
/// One fsync, after every removal (issue 14; there was one more, between the metadata and the
/// image): before it returns, nothing is promised, and a power cut may leave any of the
/// removals undone. The delete has not answered, so the orchestrator retries it, and each state
/// is one a retry finishes: the object whole (deleted again), an image without metadata (a
/// leftover, removed by the retry as by a create of the name), metadata without its image (a
/// journaling filesystem keeps the order, others may not: listed as abnormal, "backing file
/// … is missing", until the retry removes the record; nothing of it can be attached). The
/// earlier fsync ordered the removals across a power cut and nothing more.
/// Test: `tests::a_delete_fsyncs_the_directory_once_after_every_removal`.
fn remove_files(f: &Files) -> Result<()> {
    remove_if_exists(&f.meta)?;
    remove_if_exists(&f.tmp_meta)?;
    remove_if_exists(&f.img)?;
    remove_if_exists(&f.tmp_img)?;
    f.sync.sync(&f.dir)
}

/// How the pool's metadata files are named in messages, and what to do with a damaged one.
fn meta_noun() -> store::Noun {
    store::Noun::new("metadata", "fix or remove it (the image beside it holds the data)")
}

/// Reads a metadata file; `None` when it does not exist.
fn read_meta<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    store::read_file(path, &meta_noun())
}

/// Writes a metadata file atomically: temporary file, fsync, rename, fsync of the directory
/// (shared with concurrent writers: group commit).
fn write_meta<T: Serialize>(files: &Files, value: &T) -> Result<()> {
    store::write_file_grouped(&files.meta, value, &files.sync)
}

/// Flushes a file's data to disk.
fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| store::fsync(&f, path)).context(|| format!("syncing {}", path.display()))
}

/// [`FilePool::commit`] on the calling (blocking) thread; `image`: the temporary image, open.
fn commit_now<T: Serialize>(f: &Files, meta: &T, image: Option<&File>) -> Result<()> {
    let r = store::write_file_grouped_with(
        &f.meta,
        meta,
        &f.sync,
        || match image {
            Some(img) => store::fsync(img, &f.tmp_img).context(|| format!("syncing {}", f.tmp_img.display())),
            None => sync_file(&f.tmp_img),
        },
        || fs::rename(&f.tmp_img, &f.img).context(|| format!("renaming {} to {}", f.tmp_img.display(), f.img.display())),
    );
    if r.is_err() && !f.meta.exists() {
        let _ = remove_if_exists(&f.img);
        let _ = remove_if_exists(&f.tmp_img);
        let _ = remove_if_exists(&f.tmp_meta);
    }
    r
}

/// A leftover image (no metadata) that a loop device still holds: never removed.
fn leftover_attached(img: &Path, dev: &Path) -> Error {
    Error::FailedPrecondition(format!(
        "{} (a leftover without metadata) is attached to {}; detach it with `losetup -d {}`",
        img.display(),
        dev.display(),
        dev.display()
    ))
}

/// A volume to delete that a loop device still holds.
fn volume_attached(local: &str, dev: &Path) -> Error {
    Error::FailedPrecondition(format!("volume {local} is still attached to {}: unstage it on this node first", dev.display()))
}

/// Apparent size and allocated bytes of a file.
fn sizes(path: &Path) -> Result<(u64, u64)> {
    let m = fs::metadata(path).context(|| format!("inspecting {}", path.display()))?;
    Ok((m.len(), m.blocks() * 512))
}

/// Allocates every block of `path` up to `len` bytes (filling holes, growing the file when
/// shorter) and flushes it. No space is RESOURCE_EXHAUSTED; a filesystem that cannot
/// preallocate is FAILED_PRECONDITION (thin provisioning is the way out).
fn allocate(path: &Path, len: u64) -> Result<()> {
    allocate_then(path, len, true)
}

/// [`allocate`], flushed only when `sync` (a new image is flushed at its commit).
fn allocate_then(path: &Path, len: u64, sync: bool) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path).context(|| format!("opening {}", path.display()))?;
    allocate_file(&f, path, len, sync)
}

/// [`allocate_then`] through the open file `f` (at `path`).
fn allocate_file(f: &File, path: &Path, len: u64, sync: bool) -> Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let end = i64::try_from(len).map_err(|_| Error::OutOfRange(format!("{len} bytes is too large for a file")))?;
    match fallocate(f, FallocateFlags::empty(), 0, end) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOSPC) => {
            return Err(Error::ResourceExhausted(format!(
                "the filesystem of {} has no room to allocate {}",
                path.display(),
                format_size(len)
            )));
        }
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            return Err(Error::FailedPrecondition(format!(
                "the filesystem of {} cannot preallocate files; use provisioning = \"thin\" for this pool",
                path.display()
            )));
        }
        Err(e) => return Err(Error::io(format!("allocating {} bytes of {}", len, path.display()), e.into())),
    }
    if !sync {
        return Ok(());
    }
    store::fsync(f, path).context(|| format!("syncing {}", path.display()))
}

/// Gives `path` its own copy of every block it shares with another file (reflink) up to `len`,
/// so later writes need no new blocks; a filesystem that cannot share blocks has nothing to do.
fn unshare(path: &Path, len: u64) -> Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let f = OpenOptions::new().write(true).open(path).context(|| format!("opening {}", path.display()))?;
    let end = i64::try_from(len).map_err(|_| Error::OutOfRange(format!("{len} bytes is too large for a file")))?;
    match fallocate(&f, FallocateFlags::FALLOC_FL_UNSHARE_RANGE, 0, end) {
        Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::EINVAL) => Ok(()),
        Err(nix::errno::Errno::ENOSPC) => {
            Err(Error::ResourceExhausted(format!("the filesystem of {} has no room to unshare {}", path.display(), format_size(len))))
        }
        Err(e) => Err(Error::io(format!("unsharing the blocks of {}", path.display()), e.into())),
    }
}

/// Grows `path` to `len` bytes (sparse) and flushes it; never shrinks.
fn grow_and_sync(path: &Path, len: u64) -> Result<()> {
    let f = grow(path, len)?;
    store::fsync(&f, path).context(|| format!("syncing {}", path.display()))
}

/// Grows `path` to `len` bytes (sparse), not flushed; never shrinks.
fn grow(path: &Path, len: u64) -> Result<File> {
    let f = OpenOptions::new().write(true).open(path).context(|| format!("opening {}", path.display()))?;
    let cur = f.metadata().context(|| format!("inspecting {}", path.display()))?.len();
    if cur < len {
        f.set_len(len).context(|| format!("growing {} to {len} bytes", path.display()))?;
    }
    Ok(f)
}

/// The mount points to freeze for a consistent copy of `src`: one per loop device of `src`
/// that is mounted (one superblock, however many mount points: freezing one freezes it).
/// The mount table is the freezer's (the driver's [`Mounter`](crate::node::mount::Mounter)).
async fn mounted_from(loops: loopdev::Loops<'_>, freezer: &Freezer, src: &Path) -> Result<Vec<PathBuf>> {
    let devices = loopdev::find(loops, src).await?;
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let mounts = freezer.mounter().mounts().await?;
    Ok(devices
        .iter()
        .filter_map(|d| mountinfo::find_by_source(&mounts, &d.to_string_lossy()).first().map(|m| m.mount_point.clone()))
        .collect())
}

impl FilePool {
    /// Copies `src` (the image of `volume`, or of a snapshot) to `dst` with `cp` (reflink when
    /// the filesystem can, holes kept). A mounted source is frozen around the copy by the
    /// driver's [`Freezer`](crate::node::freeze::Freezer), whose policy applies: a mounted
    /// filesystem that cannot be frozen is FAILED_PRECONDITION, the copy runs in a task of its
    /// own and the filesystem is thawed on every path. A raw block volume in use has no
    /// filesystem to freeze and is copied as it is.
    ///
    /// `cp` writes through a descriptor of `dst` opened here (`/proc/self/fd/0`), never by its
    /// path: a `cp` orphaned by a killed driver keeps writing into the file it had, which the
    /// restarted driver has unlinked, and can never create or fill a later attempt's file.
    async fn copy_image(&self, volume: &str, purpose: String, src: &Path, dst: &Path) -> Result<()> {
        let mount_points = mounted_from(self.loops(), &self.freezer, src).await?;
        let (s, d) = (src.to_string_lossy().into_owned(), dst.to_string_lossy().into_owned());
        let target = dst.to_owned();
        let fd = self
            .blocking(format!("opening {d}"), METADATA_DEADLINE, move || {
                let f = OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&target);
                f.map(std::os::fd::OwnedFd::from).context(|| format!("opening {}", target.display()))
            })
            .await?;
        let cmd =
            Cmd::new("cp").args(["--reflink=auto", "--sparse=always", s.as_str(), "/proc/self/fd/0"]).stdin_fd(fd).timeout(COPY_TIMEOUT);
        let exec = self.exec.clone();
        let target = Target { pool: self.name.clone(), volume: volume.to_owned(), mount_points, purpose };
        let copied = self.freezer.around(target, async move { exec.run(cmd).await }).await?;
        copied.context(|| format!("copying {s} to {d}")).map(|_| ())
    }
}

/// What [`FilePool::create_empty`]'s blocking call found or made.
enum Made {
    /// The name's record, already there.
    Found(VolumeRecord),
    /// The new volume, committed (shared with the index).
    New(Arc<VolumeInfo>),
}

impl FilePool {
    /// Opens the pool at `cfg.path`, creating its directory tree (0700) if missing.
    pub fn new(cfg: &PoolConfig, exec: Arc<dyn Exec>) -> Result<FilePool> {
        let name = cfg.name().to_owned();
        let root = cfg.path.clone().ok_or_else(|| Error::InvalidArgument(format!("file pool {name:?} needs `path`")))?;
        if !root.is_absolute() {
            return Err(Error::InvalidArgument(format!("file pool {name:?}: path {} must be absolute", root.display())));
        }
        let reserve = match &cfg.reserve {
            None => 0,
            Some(r) => parse_size(r).ok_or_else(|| Error::InvalidArgument(format!("file pool {name:?}: reserve {r:?} is not a size")))?,
        };
        let provisioning = match &cfg.provisioning {
            None => Provisioning::default(),
            Some(p) => Provisioning::parse(p).ok_or_else(|| {
                Error::InvalidArgument(format!("file pool {name:?}: provisioning {p:?} is neither \"thick\" nor \"thin\""))
            })?,
        };
        for kind in [Kind::Volume, Kind::Snapshot] {
            let dir = root.join(kind.dir());
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .context(|| format!("creating pool directory {}", dir.display()))?;
        }
        // Replaced by the driver's own (`with_freezer`); this one keeps no records.
        let freezer = Arc::new(Freezer::unrecorded(exec.clone()));
        Ok(FilePool {
            index: index::Index::new(&root, Path::new(SYS_BLOCK)),
            syncs: Default::default(),
            domain: format!("pool:{name}"),
            name,
            root,
            reserve,
            default_fs: cfg.default_fs.clone().unwrap_or_else(|| DEFAULT_FS.to_owned()),
            provisioning,
            exec,
            sys_block: PathBuf::from(SYS_BLOCK),
            in_flight: Arc::new(Mutex::new(0)),
            claiming: Arc::default(),
            freezer,
        })
    }

    /// Freezes mounted sources with `freezer` (the driver's: recorded, shared by its pools),
    /// and finds them in its mount table.
    pub fn with_freezer(mut self, freezer: Arc<Freezer>) -> Self {
        self.freezer = freezer;
        self
    }

    /// Sets loop devices' queue limits under `path` instead of `/sys/block` (tests).
    pub fn with_sys_block(mut self, path: impl Into<PathBuf>) -> Self {
        self.sys_block = path.into();
        self.index.set_sys_block(&self.sys_block);
        self
    }

    /// The pool directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// How this pool finds and sets up loop devices.
    fn loops(&self) -> loopdev::Loops<'_> {
        loopdev::Loops { exec: self.exec.as_ref(), sys_block: &self.sys_block, domain: &self.domain }
    }

    /// Runs `f` (filesystem calls on the pool) off the async workers, within `deadline`.
    async fn blocking<T, F>(&self, what: String, deadline: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        blocking::run(&self.domain, &what, deadline, f).await?
    }

    /// Marks an operation that changes the pool (see [`index::Index::begin`]).
    async fn begin(&self) -> Result<index::Busy> {
        let ix = self.index.clone();
        self.blocking(format!("reading the index of {}", self.root.display()), METADATA_DEADLINE, move || ix.begin()).await
    }

    /// Ends an operation begun with [`FilePool::begin`].
    async fn done(&self, busy: index::Busy) {
        let ix = self.index.clone();
        let _ = self
            .blocking(format!("reading the index of {}", self.root.display()), METADATA_DEADLINE, move || {
                ix.done(busy);
                Ok(())
            })
            .await;
    }

    /// Tells the index whether a volume's image is attached (see [`index::Index::set_attached`]).
    async fn set_attached(&self, local: &str, attached: bool) -> Result<()> {
        let (ix, l) = (self.index.clone(), local.to_owned());
        self.blocking(format!("indexing volume {local}"), METADATA_DEADLINE, move || ix.set_attached(&l, attached)).await
    }

    /// Records a committed volume in the index.
    async fn index_volume(&self, record: VolumeRecord) -> Result<()> {
        let ix = self.index.clone();
        self.blocking(format!("indexing volume {}", record.info.local), METADATA_DEADLINE, move || {
            ix.put_volume(record);
            Ok(())
        })
        .await
    }

    fn files(&self, kind: Kind, local: &str) -> Result<Files> {
        self.check_name(kind, local)?;
        let dir = self.root.join(kind.dir());
        let meta = dir.join(format!("{local}.json"));
        Ok(Files {
            img: dir.join(format!("{local}.img")),
            // `.<local>.json.tmp`: the record store's temporary of the metadata.
            tmp_meta: store::temporary_of(&meta),
            meta,
            tmp_img: dir.join(format!(".{local}.img.tmp")),
            sync: self.syncs[kind as usize].clone(),
            dir,
        })
    }

    /// The one gate between a name and a path: nothing but [a-z0-9_-] reaches the filesystem.
    fn check_name(&self, kind: Kind, local: &str) -> Result<()> {
        if !valid_local_name(local) {
            return Err(Error::InvalidArgument(format!("{local:?} is not a valid {} name in file pool {:?}", kind.noun(), self.name)));
        }
        Ok(())
    }

    /// The provisioning a request asks for (its `provisioning` mutable parameter, else its
    /// parameter), or the pool's.
    fn provisioning_of(&self, req: &CreateRequest) -> Result<Provisioning> {
        match req.mutable.get(PARAM_PROVISIONING).or(req.parameters.get(PARAM_PROVISIONING)) {
            None => Ok(self.provisioning),
            Some(p) => Provisioning::parse(p).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "parameter {PARAM_PROVISIONING}={} is neither \"thick\" nor \"thin\"",
                    crate::error::bounded(p)
                ))
            }),
        }
    }

    async fn pool_fs(&self) -> Result<PoolFs> {
        let root = self.root.clone();
        self.blocking(format!("statfs of pool directory {}", root.display()), METADATA_DEADLINE, move || PoolFs::of(&root)).await
    }

    /// Removes the half-made leftovers of `local`: temporaries, and an image without metadata.
    async fn clean_leftovers(&self, kind: Kind, f: &Files) -> Result<()> {
        let ff = f.clone();
        let orphan = self
            .blocking(format!("removing leftovers in {}", f.dir.display()), METADATA_DEADLINE, move || {
                remove_if_exists(&ff.tmp_img)?;
                remove_if_exists(&ff.tmp_meta)?;
                Ok(!ff.meta.exists() && ff.img.exists())
            })
            .await?;
        if orphan {
            if kind == Kind::Volume {
                if let Some(dev) = loopdev::find(self.loops(), &f.img).await?.first() {
                    return Err(leftover_attached(&f.img, dev));
                }
            }
            let img = f.img.clone();
            self.blocking(format!("removing {}", img.display()), METADATA_DEADLINE, move || remove_if_exists(&img)).await?;
        }
        Ok(())
    }

    /// Removes a half-made temporary image after a failure (best effort: the failure is what
    /// the caller reports, and a retry removes what is left).
    async fn discard_tmp(&self, f: &Files) {
        let tmp = f.tmp_img.clone();
        let _ = self.blocking(format!("removing {}", tmp.display()), METADATA_DEADLINE, move || remove_if_exists(&tmp)).await;
    }

    /// Moves a finished temporary image into place and commits its metadata: the metadata's
    /// temporary is written and fsynced, then the image (whose changes came first, so a
    /// journaling filesystem has committed them already: one journal commit for both, on one
    /// thread), then the image is renamed into place, then the metadata (the commit point), then
    /// the directory is fsynced (shared). A crash between any two steps leaves temporaries or an image without
    /// metadata, which a retry removes. On failure the image is removed again, so nothing
    /// half-made stays visible.
    async fn commit<T: Serialize + Send + 'static>(&self, f: &Files, meta: T) -> Result<()> {
        let ff = f.clone();
        self.blocking(format!("committing {}", f.meta.display()), METADATA_DEADLINE, move || commit_now(&ff, &meta, None)).await
    }

    async fn read_record<T: DeserializeOwned + Send + 'static>(&self, f: &Files) -> Result<Option<T>> {
        let meta = f.meta.clone();
        self.blocking(format!("reading {}", meta.display()), METADATA_DEADLINE, move || read_meta::<T>(&meta)).await
    }

    async fn read_volume(&self, f: &Files, local: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.read_record::<VolumeRecord>(f).await?.map(|mut r| {
            Arc::make_mut(&mut r.info).local = local.to_owned();
            r
        }))
    }

    async fn read_snapshot(&self, f: &Files, local: &str) -> Result<Option<SnapshotRecord>> {
        Ok(self.read_record::<SnapshotRecord>(f).await?.map(|mut r| {
            r.info.local = local.to_owned();
            r
        }))
    }

    async fn list<T: DeserializeOwned + Send + 'static>(&self, kind: Kind) -> Result<Vec<T>> {
        let dir = self.root.join(kind.dir());
        let pool = self.name.clone();
        self.blocking(format!("listing {}", dir.display()), METADATA_DEADLINE, move || {
            let listed = match store::list_dir::<T>(&dir, &meta_noun()) {
                Err(Error::Io { source, .. }) if source.kind() == ErrorKind::NotFound => return Err(room::dir_error(&dir, source)),
                r => r?,
            };
            let mut out = Vec::new();
            for (local, r) in listed {
                // Only local names are ours (the store already left temporaries out).
                if !valid_local_name(&local) {
                    continue;
                }
                match r {
                    Ok(v) => out.push(v),
                    // One damaged file must not hide every other object; condition() reports it.
                    Err(e) => tracing::warn!(pool = %pool, local, error = %e, "skipping unreadable {}", kind.noun()),
                }
            }
            Ok(out)
        })
        .await
    }

    /// Creates an empty temporary image (0600); on btrfs a thick one is made NOCOW while it is
    /// still empty (the flag does not apply to data already written).
    async fn create_tmp(&self, f: &Files, nocow: bool) -> Result<()> {
        let tmp = f.tmp_img.clone();
        self.blocking(format!("creating {}", tmp.display()), METADATA_DEADLINE, move || {
            OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).context(|| format!("creating {}", tmp.display()))?;
            Ok(())
        })
        .await?;
        if nocow {
            let path = f.tmp_img.to_string_lossy();
            let cmd = Cmd::new("chattr").args(["+C", path.as_ref()]).timeout(CHATTR_TIMEOUT);
            self.exec.run(cmd).await.context(|| format!("making {path} NOCOW (chattr +C) so its preallocated blocks stay its own"))?;
        }
        Ok(())
    }

    /// Sizes a temporary image to `capacity`: allocated (thick) or sparse (thin). Not flushed:
    /// [`FilePool::commit`] fsyncs it beside the metadata.
    async fn size_tmp(&self, f: &Files, capacity: u64, provisioning: Provisioning) -> Result<()> {
        let tmp = f.tmp_img.clone();
        let what = format!(
            "{} {} for {}",
            if provisioning == Provisioning::Thick { "allocating" } else { "sizing" },
            format_size(capacity),
            tmp.display()
        );
        self.blocking(what, ALLOCATE_DEADLINE, move || {
            grow(&tmp, capacity)?;
            if provisioning == Provisioning::Thick {
                // Also fills the holes a sparse copy left.
                allocate_then(&tmp, capacity, false)?;
            }
            Ok(())
        })
        .await
    }

    /// Builds the temporary image of a new volume: an empty file of `capacity`, or a copy of
    /// `source` grown to `capacity` with a new filesystem UUID.
    async fn build_image(
        &self,
        req: &CreateRequest,
        f: &Files,
        source: Option<PathBuf>,
        provisioning: Provisioning,
        fs: PoolFs,
    ) -> Result<()> {
        let nocow = fs == PoolFs::Btrfs && provisioning == Provisioning::Thick;
        match source {
            None => {
                self.create_tmp(f, nocow).await?;
                self.size_tmp(f, req.capacity, provisioning).await
            }
            Some(src) => {
                if nocow {
                    // `cp` writes into the existing (NOCOW) file.
                    self.create_tmp(f, true).await?;
                }
                let volume = match &req.source {
                    Some(Source::Volume(v)) => v.as_str(),
                    _ => "",
                };
                self.copy_image(volume, format!("clone {:?}", req.csi_name), &src, &f.tmp_img).await?;
                // The shared flow: sized, a new filesystem UUID; the commit that follows is the mark.
                let copy = ImageCopy { pool: self, files: f, provisioning };
                crate::pool::copy::finish(self.exec.as_ref(), &copy, req.capacity, req.block).await
            }
        }
    }

    /// The image to copy a new volume from and its size, after checking it exists and fits.
    async fn source_image(&self, req: &CreateRequest) -> Result<Option<(PathBuf, u64)>> {
        let (kind, local, min) = match &req.source {
            None => return Ok(None),
            Some(Source::Snapshot(s)) => {
                let f = self.files(Kind::Snapshot, s)?;
                let snap = self.read_snapshot(&f, s).await?;
                let snap = snap.ok_or_else(|| Error::NotFound(format!("snapshot {s} does not exist in file pool {:?}", self.name)))?;
                (Kind::Snapshot, s, snap.info.size)
            }
            Some(Source::Volume(v)) => {
                let f = self.files(Kind::Volume, v)?;
                let vol = self.read_volume(&f, v).await?;
                let vol = vol.ok_or_else(|| Error::NotFound(format!("source volume {v} does not exist in file pool {:?}", self.name)))?;
                (Kind::Volume, v, vol.info.capacity)
            }
        };
        if req.capacity < min {
            return Err(Error::OutOfRange(format!(
                "volume {} cannot be {} when its source {} {local} holds {}: request at least the source's size",
                req.local,
                format_size(req.capacity),
                kind.noun(),
                format_size(min)
            )));
        }
        Ok(Some((self.files(kind, local)?.img, min)))
    }

    /// Turns discard off on a thick volume's loop device: the loop driver implements discard
    /// (fstrim, `-o discard`, mkfs) by punching holes into the image, which would give back the
    /// blocks the volume was promised. Writes of zeroes then fall back to writing zero pages.
    ///
    /// The limit outlives the attachment (the kernel keeps a user-set discard limit on the
    /// device and refuses to raise it again once discard is off), so a loop device that served
    /// a thick volume serves later ones without discard too.
    async fn turn_off_discard(&self, dev: &Path) -> Result<()> {
        let name = dev.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let knob = self.sys_block.join(&name).join("queue/discard_max_bytes");
        let d = dev.to_path_buf();
        self.blocking(format!("turning off discard on {}", dev.display()), METADATA_DEADLINE, move || {
            let refuse = |e: std::io::Error| {
                Error::FailedPrecondition(format!(
                    "cannot turn off discard on {} ({}: {e}), so a trim inside the volume would free its preallocated blocks; \
                     make /sys writable for the driver, or use provisioning = \"thin\"",
                    d.display(),
                    knob.display()
                ))
            };
            let now = fs::read_to_string(&knob).map_err(refuse)?;
            if now.trim() != "0" {
                fs::write(&knob, "0").map_err(refuse)?;
            }
            Ok(())
        })
        .await
    }
}

impl FilePool {
    /// [`Pool::create_snapshot`], recording `group` when it is a member of a group snapshot.
    async fn snapshot_of(
        &self,
        source_local: &str,
        csi_name: &str,
        local: &str,
        uid: &str,
        group: Option<GroupMembership>,
    ) -> Result<SnapshotInfo> {
        self.changing(self.snapshot_of_now(source_local, csi_name, local, uid, group)).await
    }

    async fn snapshot_of_now(
        &self,
        source_local: &str,
        csi_name: &str,
        local: &str,
        uid: &str,
        group: Option<GroupMembership>,
    ) -> Result<SnapshotInfo> {
        let f = self.files(Kind::Snapshot, local)?;
        let src = self.files(Kind::Volume, source_local)?;
        if let Some(s) = self.read_snapshot(&f, local).await? {
            if s.info.csi_name == csi_name && s.info.source_volume == source_local {
                return Ok(s.info);
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot {local} in file pool {:?} already exists as {:?} of volume {}; this request asks for {csi_name:?} of volume {source_local}",
                self.name, s.info.csi_name, s.info.source_volume
            )));
        }
        self.clean_leftovers(Kind::Snapshot, &f).await?;
        let Some(source) = self.read_volume(&src, source_local).await? else {
            return Err(Error::NotFound(format!("volume {source_local} does not exist in file pool {:?}", self.name)));
        };
        let fs = self.pool_fs().await?;
        let img = src.img.clone();
        let (len, allocated) = self.blocking(format!("inspecting {}", img.display()), METADATA_DEADLINE, move || sizes(&img)).await?;
        let thick = source.provisioning == Provisioning::Thick;
        // A real copy keeps holes, so it takes what the source has allocated. A reflink copy
        // of a thick volume takes nothing now, but the volume's next writes need new blocks:
        // the pool keeps the volume's size for them until the snapshot is deleted.
        let shared = if thick && fs.may_reflink() { len } else { 0 };
        let claim = if shared > 0 { shared } else { allocated };
        let _claim = self.claim(claim, &format!("snapshot {local} of volume {source_local}")).await?;
        let copied = async {
            if fs == PoolFs::Btrfs && thick {
                // btrfs reflinks only between files of one kind (NOCOW or not).
                self.create_tmp(&f, true).await?;
            }
            self.copy_image(source_local, format!("snapshot {csi_name:?}"), &src.img, &f.tmp_img).await?;
            let tmp = f.tmp_img.clone();
            // Flushed at the commit, beside the metadata.
            self.blocking(format!("inspecting {}", tmp.display()), ALLOCATE_DEADLINE, move || sizes(&tmp)).await
        }
        .await;
        let size = match copied {
            Ok((len, _)) => len,
            Err(e) => {
                self.discard_tmp(&f).await;
                return Err(e);
            }
        };
        let info = SnapshotInfo {
            local: local.to_owned(),
            csi_name: csi_name.to_owned(),
            source_volume: source_local.to_owned(),
            size,
            created: now(),
            ready: true,
            uid: Some(uid.to_owned()),
            source_uid: source.info.uid.clone(),
            group,
        };
        self.commit(&f, SnapshotRecord { info: info.clone(), shared, schema: Default::default() }).await?;
        self.index.put_snapshot(local, shared);
        tracing::info!(pool = %self.name, local, source = source_local, size, shared, "created snapshot");
        Ok(info)
    }
}

/// The bodies of the pool's changing operations; [`Pool`]'s methods run each as one
/// operation of the index ([`FilePool::changing`]).
impl FilePool {
    /// Runs `op` as one change of the pool: the index knows the directory mtimes it leaves.
    /// The condition of volume `r` from its image's metadata and the pool's free bytes.
    fn judge(
        &self,
        img: &Path,
        r: &VolumeRecord,
        meta: std::io::Result<fs::Metadata>,
        free: std::result::Result<u64, String>,
    ) -> Condition {
        let m = match meta {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Condition::Abnormal(format!("backing file {} is missing", img.display()));
            }
            Err(e) => return Condition::Abnormal(format!("backing file {} cannot be inspected: {e}", img.display())),
            Ok(m) => m,
        };
        if m.len() < r.info.capacity {
            return Condition::Abnormal(format!(
                "backing file {} is {} bytes, smaller than the volume's {} bytes",
                img.display(),
                m.len(),
                r.info.capacity
            ));
        }
        // Blocks the volume may still write but does not hold: all of a thin volume's unwritten
        // space, none of a thick one's (unless something punched holes into it).
        let holes = m.len().saturating_sub(m.blocks() * 512);
        let free = match free {
            Ok(free) => free,
            Err(e) => return Condition::Abnormal(e),
        };
        if holes > free {
            let what = match r.provisioning {
                Provisioning::Thin => "this thin volume",
                Provisioning::Thick => "this thick volume (its image lost preallocated blocks)",
            };
            return Condition::Abnormal(format!(
                "the filesystem of file pool {:?} has {} free, less than the {} {what} may still write: \
                 writes inside the volume can fail; free space in {}",
                self.name,
                format_size(free),
                format_size(holes),
                self.root.display()
            ));
        }
        Condition::Healthy
    }

    async fn changing<T>(&self, op: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let busy = self.begin().await?;
        let r = op.await;
        self.done(busy).await;
        r
    }

    /// What a new volume made for `req` records, at `capacity` bytes, created now.
    fn new_info(&self, req: &CreateRequest, capacity: u64) -> VolumeInfo {
        VolumeInfo {
            local: req.local.clone(),
            csi_name: req.csi_name.clone(),
            capacity,
            block: req.block,
            fs_type: if req.block { None } else { Some(req.fs_type.clone().unwrap_or_else(|| self.default_fs.clone())) },
            source: req.source.clone(),
            created: now(),
            uid: Some(req.uid.clone()),
            source_uid: req.source_uid.clone(),
            parameters: Some(req.parameters.clone()),
            mutable: req.mutable.clone(),
        }
    }

    /// The answer to a create whose name is taken by `r`: `r` when it was made by the same
    /// request, else ALREADY_EXISTS naming the differences.
    fn answer_existing(&self, req: &CreateRequest, r: VolumeRecord, provisioning: Provisioning) -> Result<VolumeInfo> {
        // A copy records what it really copied, which may be more than was asked: without a
        // limit, a larger copy answers its own request.
        let larger_copy = r.info.source.is_some() && req.limit == 0 && r.info.capacity > req.capacity;
        let asked = CreateRequest { capacity: if larger_copy { r.info.capacity } else { req.capacity }, ..req.clone() };
        let mut differences = r.info.conflicts_with(&asked);
        // The provisioning default comes from the pool's config, so it is compared here.
        if r.provisioning != provisioning {
            differences.push(format!("it is {} provisioned", r.provisioning.as_str()));
        }
        if differences.is_empty() {
            return Ok(Arc::unwrap_or_clone(r.info));
        }
        Err(Error::AlreadyExists(format!(
            "volume {} in file pool {:?} already exists for another request: {}",
            req.local,
            self.name,
            differences.join("; ")
        )))
    }

    async fn create_volume_now(&self, req: &CreateRequest) -> Result<VolumeInfo> {
        let provisioning = self.provisioning_of(req)?;
        let f = self.files(Kind::Volume, &req.local)?;
        if let Some(r) = self.read_volume(&f, &req.local).await? {
            return self.answer_existing(req, r, provisioning);
        }
        // First, so a copy restarted after a kill removes its temporaries even when it then
        // fails (its source gone).
        self.clean_leftovers(Kind::Volume, &f).await?;
        let source = self.source_image(req).await?;
        let _claim = self.claim(req.capacity, &format!("volume {} ({})", req.local, req.csi_name)).await?;
        let fs = self.pool_fs().await?;
        let tmp = f.tmp_img.clone();
        let built = async {
            self.build_image(req, &f, source.as_ref().map(|s| s.0.clone()), provisioning, fs).await?;
            self.blocking(format!("inspecting {}", tmp.display()), METADATA_DEADLINE, move || sizes(&tmp)).await
        };
        // A copy is as large as what was really copied (its source may have grown meanwhile).
        let capacity = match built.await {
            Ok((len, _)) => len.max(req.capacity),
            Err(e) => {
                self.discard_tmp(&f).await;
                return Err(e);
            }
        };
        // A reflinked thick clone shares its source's blocks: writes to either need new ones.
        let shared = match &source {
            Some((_, size)) if provisioning == Provisioning::Thick && fs.may_reflink() => (*size).min(capacity),
            _ => 0,
        };
        let info = self.new_info(req, capacity);
        let record = VolumeRecord { info: Arc::new(info.clone()), provisioning, shared, schema: Default::default() };
        self.commit(&f, record.clone()).await?;
        self.index_volume(record).await?;
        tracing::info!(pool = %self.name, local = %info.local, capacity = info.capacity, provisioning = provisioning.as_str(), "created volume");
        Ok(info)
    }

    // issue 14: one hand-off per create
    /// A new empty thin volume (no source) in one blocking call, right after a survey of this pool
    /// found no volume under its name (under the name lock, so none can appear): the steps of
    /// [`FilePool::create_volume_now`] in the same order (leftovers of an earlier attempt
    /// removed, room claimed, the temporary image made and sized, committed, indexed), on one
    /// blocking thread instead of one hand-off each. `None` for a thick volume (below) and when a
    /// leftover image's loop devices cannot be told from sysfs (`losetup` is asked): the caller
    /// then takes the general path. `look`:
    /// first read the name's record, as a create not surveyed must (a record there is answered
    /// as [`FilePool::answer_existing`] says).
    async fn create_empty(&self, req: &CreateRequest, look: bool) -> Result<Option<VolumeInfo>> {
        let provisioning = self.provisioning_of(req)?;
        // A thick image is allocated under its own, longer deadline (ALLOCATE_DEADLINE), which
        // must not become the deadline of the metadata steps around it (a frozen pool answers
        // within METADATA_DEADLINE): the general path.
        if provisioning == Provisioning::Thick {
            return Ok(None);
        }
        let f = self.files(Kind::Volume, &req.local)?;
        let info = self.new_info(req, req.capacity);
        let (ix, ledger, sys_block) = (self.index.clone(), self.ledger(), self.sys_block.clone());
        let claim_for = format!("volume {} ({})", req.local, req.csi_name);
        let what = format!("creating volume {} in {}", req.local, f.dir.display());
        let made = self
            .blocking(what, METADATA_DEADLINE, move || {
                let busy = ix.begin()?;
                let made = (|| {
                    if look {
                        if let Some(mut r) = read_meta::<VolumeRecord>(&f.meta)? {
                            Arc::make_mut(&mut r.info).local = info.local.clone();
                            return Ok(Some(Made::Found(r)));
                        }
                    }
                    // The leftovers of an earlier attempt (as `clean_leftovers`).
                    remove_if_exists(&f.tmp_img)?;
                    remove_if_exists(&f.tmp_meta)?;
                    if !f.meta.exists() && f.img.exists() {
                        match loopdev::associated_in_sysfs(&sys_block, &f.img) {
                            None => return Ok(None),
                            Some(devs) if !devs.is_empty() => return Err(leftover_attached(&f.img, &devs[0].device)),
                            Some(_) => remove_if_exists(&f.img)?,
                        }
                    }
                    let _claim = ledger.claim_blocking(info.capacity, &claim_for)?;
                    // One descriptor for the new image: sized (sparse), fsynced at the commit.
                    let built = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&f.tmp_img)
                        .context(|| format!("creating {}", f.tmp_img.display()))
                        .and_then(|img| {
                            img.set_len(info.capacity).context(|| format!("growing {} to {} bytes", f.tmp_img.display(), info.capacity))?;
                            Ok(img)
                        });
                    let img = match built {
                        Ok(img) => img,
                        Err(e) => {
                            let _ = remove_if_exists(&f.tmp_img);
                            return Err(e);
                        }
                    };
                    let record = VolumeRecord { info: Arc::new(info), provisioning, shared: 0, schema: Default::default() };
                    commit_now(&f, &record, Some(&img))?;
                    let info = record.info.clone();
                    ix.put_volume(record);
                    Ok(Some(Made::New(info)))
                })();
                ix.done(busy);
                made
            })
            .await?;
        match made {
            None => Ok(None),
            Some(Made::Found(r)) => self.answer_existing(req, r, provisioning).map(Some),
            Some(Made::New(info)) => {
                tracing::info!(pool = %self.name, local = %info.local, capacity = info.capacity, provisioning = provisioning.as_str(), "created volume");
                Ok(Some(Arc::unwrap_or_clone(info)))
            }
        }
    }

    // issue 14: one hand-off per delete
    /// [`FilePool::delete_volume_now`] in one blocking call: the loop devices read from sysfs,
    /// the files removed, the index told. `false` when sysfs cannot tell the loop devices
    /// (nothing was done: the caller takes the general path, which asks `losetup`).
    async fn delete_in_one(&self, local: &str) -> Result<bool> {
        let f = self.files(Kind::Volume, local)?;
        let (ix, sys_block, l) = (self.index.clone(), self.sys_block.clone(), local.to_owned());
        self.blocking(format!("deleting volume {local} in {}", f.dir.display()), METADATA_DEADLINE, move || {
            let busy = ix.begin()?;
            let done = (|| {
                // Nothing can be attached to an image that is not there (an empty answer).
                let Some(devs) = loopdev::associated_in_sysfs(&sys_block, &f.img) else { return Ok(false) };
                if let Some(d) = devs.first() {
                    return Err(volume_attached(&l, &d.device));
                }
                remove_files(&f)?;
                ix.remove_volume(&l);
                Ok(true)
            })();
            ix.done(busy);
            done
        })
        .await
    }

    async fn delete_volume_now(&self, local: &str) -> Result<()> {
        let f = self.files(Kind::Volume, local)?;
        let img = f.img.clone();
        if self.blocking(format!("inspecting {}", img.display()), METADATA_DEADLINE, move || Ok(img.exists())).await? {
            if let Some(dev) = loopdev::find(self.loops(), &f.img).await?.first() {
                return Err(volume_attached(local, dev));
            }
        }
        let ff = f.clone();
        self.blocking(format!("deleting volume {local} in {}", f.dir.display()), METADATA_DEADLINE, move || remove_files(&ff)).await?;
        self.index.remove_volume(local);
        Ok(())
    }

    async fn expand_volume_now(&self, local: &str, capacity: u64) -> Result<u64> {
        let f = self.files(Kind::Volume, local)?;
        let r = self
            .read_volume(&f, local)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {local} does not exist in file pool {:?}", self.name)))?;
        if capacity <= r.info.capacity {
            return Ok(r.info.capacity);
        }
        let img = f.img.clone();
        let (len, _) = self.blocking(format!("inspecting {}", img.display()), METADATA_DEADLINE, move || sizes(&img)).await?;
        // After a crash between growing the file and updating the metadata, the file is
        // already (partly) grown: only the rest needs room.
        let _claim = self
            .claim(capacity.saturating_sub(len.max(r.info.capacity)), &format!("growing volume {local} to {}", format_size(capacity)))
            .await?;
        let (img, provisioning) = (f.img.clone(), r.provisioning);
        self.blocking(format!("growing {} to {}", f.img.display(), format_size(capacity)), ALLOCATE_DEADLINE, move || {
            grow_and_sync(&img, capacity)?;
            if provisioning == Provisioning::Thick {
                allocate(&img, capacity)?;
            }
            Ok(())
        })
        .await?;
        for dev in loopdev::find(self.loops(), &f.img).await? {
            loopdev::refresh_capacity(self.exec.as_ref(), &dev).await?;
        }
        let ff = f.clone();
        let record = VolumeRecord { info: Arc::new(VolumeInfo { capacity, ..Arc::unwrap_or_clone(r.info) }), ..r };
        let indexed = record.clone();
        self.blocking(format!("writing {}", f.meta.display()), METADATA_DEADLINE, move || write_meta(&ff, &record)).await?;
        self.index_volume(indexed).await?;
        tracing::info!(pool = %self.name, local, capacity, "expanded volume");
        Ok(capacity)
    }

    async fn delete_snapshot_now(&self, local: &str) -> Result<()> {
        let f = self.files(Kind::Snapshot, local)?;
        let ff = f.clone();
        self.blocking(format!("deleting snapshot {local} in {}", f.dir.display()), METADATA_DEADLINE, move || remove_files(&ff)).await?;
        self.index.remove_snapshot(local);
        Ok(())
    }

    async fn discard_unfinished_now(&self, snapshot: bool, local: &str) -> Result<()> {
        let kind = if snapshot { Kind::Snapshot } else { Kind::Volume };
        let f = self.files(kind, local)?;
        self.clean_leftovers(kind, &f).await
    }

    async fn modify_volume_now(&self, local: &str, key: &str, value: &str) -> Result<()> {
        self.check_mutable(false, None, key, value)?;
        let want = Provisioning::parse(value).expect("checked");
        let f = self.files(Kind::Volume, local)?;
        let r = self
            .read_volume(&f, local)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {local} does not exist in file pool {:?}", self.name)))?;
        if want == Provisioning::Thick {
            let fs = self.pool_fs().await?;
            if fs == PoolFs::Btrfs && r.provisioning != Provisioning::Thick {
                return Err(Error::FailedPrecondition(format!(
                    "volume {local} of file pool {:?} cannot become thick: on btrfs a thick image must be NOCOW, which only an \
                     empty file can become (create a thick volume and copy the data instead)",
                    self.name
                )));
            }
            let img = f.img.clone();
            let len = r.info.capacity;
            self.blocking(format!("allocating {}", f.img.display()), ALLOCATE_DEADLINE, move || {
                if fs.may_reflink() {
                    unshare(&img, len)?;
                }
                allocate(&img, len)
            })
            .await?;
            for dev in loopdev::find(self.loops(), &f.img).await? {
                self.turn_off_discard(&dev).await?;
            }
        }
        let mut info = r.info;
        Arc::make_mut(&mut info).mutable.insert(key.to_owned(), value.to_owned());
        // Unshared (thick) or promised only its holes (thin, as a thin copy is): nothing shared counts.
        let record = VolumeRecord { info, provisioning: want, shared: 0, schema: Default::default() };
        let (ff, indexed) = (f.clone(), record.clone());
        self.blocking(format!("writing {}", f.meta.display()), METADATA_DEADLINE, move || write_meta(&ff, &record)).await?;
        self.index_volume(indexed).await?;
        tracing::info!(pool = %self.name, local, provisioning = want.as_str(), "modified volume");
        Ok(())
    }
}

#[async_trait]
impl Pool for FilePool {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> PoolKind {
        PoolKind::File
    }

    fn default_fs(&self) -> &str {
        &self.default_fs
    }

    fn accepts_parameter(&self, key: &str) -> bool {
        key == PARAM_PROVISIONING
    }

    async fn create_volume(&self, req: &CreateRequest) -> Result<VolumeInfo> {
        if req.source.is_none() {
            if let Some(v) = self.create_empty(req, true).await? {
                return Ok(v);
            }
        }
        self.changing(self.create_volume_now(req)).await
    }

    async fn delete_volume(&self, local: &str) -> Result<()> {
        if self.delete_in_one(local).await? {
            return Ok(());
        }
        self.changing(self.delete_volume_now(local)).await
    }

    // issue 14: one hand-off per look
    /// One blocking call reads each name's record and, when none is there, measures the room
    /// (as [`Pool::capacity`] answers it): the create's retry check and its placement.
    async fn survey(&self, names: &[&str]) -> Result<Survey> {
        let mut metas = Vec::with_capacity(names.len());
        for name in names {
            metas.push((name.to_string(), self.files(Kind::Volume, name)?.meta));
        }
        let ledger = self.ledger();
        let what = match names.first() {
            Some(name) => format!("looking up volume {name} in {}", self.root.display()),
            None => format!("measuring the room in {}", self.root.display()),
        };
        let (found, room) = self
            .blocking(what, METADATA_DEADLINE, move || {
                for (i, (local, meta)) in metas.into_iter().enumerate() {
                    if let Some(r) = read_meta::<VolumeRecord>(&meta)? {
                        let mut info = Arc::unwrap_or_clone(r.info);
                        info.local = local;
                        return Ok((Some((i, info)), None));
                    }
                }
                // A room that cannot be measured is left to `capacity`, which says why.
                Ok((None, ledger.room().ok()))
            })
            .await?;
        Ok(Survey { found, free: room.map(|r| r / super::MIB * super::MIB), unit: Some(super::MIB), seen: Seen::Nothing })
    }

    async fn create_surveyed(&self, req: &CreateRequest, _survey: &Survey) -> Result<VolumeInfo> {
        if req.source.is_none() {
            if let Some(v) = self.create_empty(req, false).await? {
                return Ok(v);
            }
        }
        self.changing(self.create_volume_now(req)).await
    }

    async fn get_volume(&self, local: &str) -> Result<Option<VolumeInfo>> {
        let f = self.files(Kind::Volume, local)?;
        Ok(self.read_volume(&f, local).await?.map(|r| Arc::unwrap_or_clone(r.info)))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let ix = self.index.clone();
        let records = self.blocking(format!("listing {}", self.root.display()), METADATA_DEADLINE, move || ix.volumes()).await?;
        Ok(records.into_iter().map(|r| Arc::unwrap_or_clone(r.info)).collect())
    }

    // issue 14: flat
    /// The index's own records, shared: a page of an unchanged pool copies no record.
    async fn list_volumes_from(&self, from: &str, max: usize) -> Result<Vec<Arc<VolumeInfo>>> {
        let (ix, from) = (self.index.clone(), from.to_owned());
        let records =
            self.blocking(format!("listing {}", self.root.display()), METADATA_DEADLINE, move || ix.volumes_from(&from, max)).await?;
        Ok(records.into_iter().map(|r| r.info).collect())
    }

    async fn expand_volume(&self, local: &str, capacity: u64) -> Result<u64> {
        self.changing(self.expand_volume_now(local, capacity)).await
    }

    async fn create_snapshot(&self, source_local: &str, csi_name: &str, local: &str, uid: &str) -> Result<SnapshotInfo> {
        self.snapshot_of(source_local, csi_name, local, uid, None).await
    }

    async fn copy_progress(&self, snapshot: bool, local: &str, source: &Source, deadline: Duration) -> Option<(u64, u64)> {
        let target = self.files(if snapshot { Kind::Snapshot } else { Kind::Volume }, local).ok()?;
        let source = match source {
            Source::Snapshot(s) => self.files(Kind::Snapshot, s).ok()?,
            Source::Volume(v) => self.files(Kind::Volume, v).ok()?,
        };
        // The blocks written so far into the temporary, of the source's allocated blocks.
        let (tmp, img) = (target.tmp_img, source.img);
        let sizes = self.blocking(format!("inspecting {}", tmp.display()), deadline, move || Ok((sizes(&tmp)?.1, sizes(&img)?.1))).await;
        sizes.ok()
    }

    async fn discard_unfinished(&self, snapshot: bool, local: &str) -> Result<()> {
        self.changing(self.discard_unfinished_now(snapshot, local)).await
    }

    async fn delete_snapshot(&self, local: &str) -> Result<()> {
        self.changing(self.delete_snapshot_now(local)).await
    }

    async fn get_snapshot(&self, local: &str) -> Result<Option<SnapshotInfo>> {
        let f = self.files(Kind::Snapshot, local)?;
        Ok(self.read_snapshot(&f, local).await?.map(|r| r.info))
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self.list::<SnapshotRecord>(Kind::Snapshot).await?.into_iter().map(|r| r.info).collect())
    }

    async fn capacity(&self) -> Result<u64> {
        // Volumes are made in whole MiB: room that is not a whole MiB cannot be asked for (a
        // create of the exact byte count is rounded up and would not fit).
        Ok(self.room().await? / super::MIB * super::MIB)
    }

    async fn attach(&self, local: &str) -> Result<Attachment> {
        let f = self.files(Kind::Volume, local)?;
        let Some(r) = self.read_volume(&f, local).await? else {
            return Err(Error::NotFound(format!("volume {local} does not exist in file pool {:?}", self.name)));
        };
        let img = f.img.clone();
        let len = match self.blocking(format!("inspecting {}", img.display()), METADATA_DEADLINE, move || Ok(fs::metadata(&img))).await? {
            Ok(m) => m.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::FailedPrecondition(format!("backing file {} of volume {local} is missing", f.img.display())));
            }
            Err(e) => return Err(Error::io(format!("inspecting {}", f.img.display()), e)),
        };
        let thick = r.provisioning == Provisioning::Thick;
        if thick {
            // Heals holes that a discard passed through before (an older attach): cheap when
            // every block is already allocated. A failure leaves the volume usable; its
            // condition says what is missing.
            let img = f.img.clone();
            if let Err(e) = self.blocking(format!("re-allocating {}", img.display()), ALLOCATE_DEADLINE, move || allocate(&img, len)).await
            {
                tracing::warn!(pool = %self.name, local, error = %e, "cannot re-allocate a thick volume's image");
            }
        }
        // Before the device exists: from then on the image is written behind the pool's back.
        self.set_attached(local, true).await?;
        let dev = loopdev::attach(self.loops(), &f.img).await?;
        if thick {
            if let Err(e) = self.turn_off_discard(&dev).await {
                // A thick volume's device always had discard turned off when it was set up,
                // so this is a fresh device, unused yet: take it down again.
                if let Err(d) = loopdev::detach_all(self.loops(), &f.img).await {
                    tracing::warn!(pool = %self.name, local, error = %d, "cannot detach after a failed attach");
                }
                return Err(e);
            }
        }
        Ok(Attachment::Loop { device: dev, image: f.img })
    }

    async fn detach(&self, local: &str) -> Result<()> {
        let f = self.files(Kind::Volume, local)?;
        loopdev::detach_all(self.loops(), &f.img).await?;
        self.set_attached(local, false).await
    }

    async fn condition(&self, local: &str) -> Result<Condition> {
        let f = self.files(Kind::Volume, local)?;
        let r = match self.read_volume(&f, local).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Error::NotFound(format!("volume {local} does not exist in file pool {:?}", self.name))),
            // Unreadable metadata, or a hung pool filesystem: the volume is listed, but not well.
            Err(e) => return Ok(Condition::Abnormal(e.to_string())),
        };
        let (img, root) = (f.img.clone(), self.root.clone());
        let inspected = self
            .blocking(format!("inspecting {}", img.display()), METADATA_DEADLINE, move || Ok((fs::metadata(&img), room::free_bytes(&root))))
            .await;
        match inspected {
            Ok((meta, free)) => Ok(self.judge(&f.img, &r, meta, free.map_err(|e| e.to_string()))),
            Err(e) => Ok(Condition::Abnormal(e.to_string())),
        }
    }

    // issue 14: flat
    async fn conditions(&self, locals: &[String]) -> Vec<Result<Condition>> {
        // One blocking call and one statvfs for the page, not two calls per volume; each record
        // from the index unless its file's stat changed (`Index::records_now`), each image stat'ed.
        // The paths are built in one buffer each (`InDir`), not one per volume.
        let checked: Vec<Result<()>> = locals.iter().map(|l| self.check_name(Kind::Volume, l)).collect();
        let valid: Vec<String> = locals.iter().zip(&checked).filter(|(_, c)| c.is_ok()).map(|(l, _)| l.clone()).collect();
        let (ix, root) = (self.index.clone(), self.root.clone());
        let dir = self.root.join(Kind::Volume.dir());
        let images = dir.clone();
        let read = self
            .blocking(format!("inspecting {} volumes in {}", locals.len(), self.root.display()), METADATA_DEADLINE, move || {
                let free = room::free_bytes(&root).map_err(|e| e.to_string());
                let records = ix.records_now(&valid);
                let mut imgs = InDir::new(&images);
                let each = records.into_iter().zip(&valid).map(|(r, l)| (r, fs::metadata(imgs.at(l, ".img")))).collect::<Vec<_>>();
                Ok((free, each))
            })
            .await;
        let (free, each) = match read {
            Ok(r) => r,
            Err(e) => return locals.iter().map(|_| Ok(Condition::Abnormal(e.to_string()))).collect(),
        };
        let mut each = each.into_iter();
        let mut imgs = InDir::new(&dir);
        let mut out = Vec::with_capacity(locals.len());
        for (local, checked) in locals.iter().zip(checked) {
            if let Err(e) = checked {
                out.push(Err(e));
                continue;
            }
            let Some((record, meta)) = each.next() else { unreachable!("a record is read for every valid name") };
            out.push(match record {
                Ok(Some(r)) => Ok(self.judge(imgs.at(local, ".img"), &r, meta, free.clone())),
                Ok(None) => Err(Error::NotFound(format!("volume {local} does not exist in file pool {:?}", self.name))),
                Err(e) => Ok(Condition::Abnormal(e.to_string())),
            });
        }
        out
    }

    // issue 12: modify
    fn mutable_keys(&self) -> &'static [&'static str] {
        &[PARAM_PROVISIONING]
    }

    fn check_mutable(&self, _block: bool, _fs_type: Option<&str>, key: &str, value: &str) -> Result<()> {
        if key != PARAM_PROVISIONING {
            return Err(crate::pool::not_mutable(PoolKind::File, key, self.mutable_keys()));
        }
        Provisioning::parse(value).map(|_| ()).ok_or_else(|| {
            Error::InvalidArgument(format!("mutable parameter {key}={} is neither \"thick\" nor \"thin\"", crate::error::bounded(value)))
        })
    }

    /// `provisioning`: to thick, every hole of the image is allocated (and shared reflinked
    /// blocks unshared), then attached loop devices stop passing discards on; to thin, only the
    /// record changes: nothing that holds data is punched, the blocks the image holds stay
    /// allocated until the filesystem inside discards them, which its next attach lets through.
    async fn modify_volume(&self, local: &str, key: &str, value: &str) -> Result<()> {
        self.changing(self.modify_volume_now(local, key, value)).await
    }

    // issue 12: group snapshots
    /// Every mounted member frozen (one [`Freezer::around_all`]), every image copied (each
    /// copy joins the freeze its volume is in), then all thawed. A raw block member that is
    /// attached has no filesystem to freeze, so its writes could not be held: refused.
    async fn create_group_snapshot(self: Arc<Self>, group: GroupMembership, members: Vec<GroupMember>) -> Result<Vec<SnapshotInfo>> {
        let purpose = format!("group snapshot {:?}", group.name);
        let mut targets = Vec::new();
        for m in &members {
            let f = self.files(Kind::Volume, &m.source)?;
            let v = self.read_volume(&f, &m.source).await?;
            let v = v.ok_or_else(|| Error::NotFound(format!("volume {} does not exist in file pool {:?}", m.source, self.name)))?;
            let mount_points = mounted_from(self.loops(), &self.freezer, &f.img).await?;
            if v.info.block && !loopdev::find(self.loops(), &f.img).await?.is_empty() {
                return Err(crate::pool::no_group_snapshots(
                    &self.name,
                    PoolKind::File,
                    &m.source,
                    "holds it as a raw block device in use, whose writes cannot be held at one point (unpublish it first)",
                ));
            }
            targets.push(Target { pool: self.name.clone(), volume: m.source.clone(), mount_points, purpose: purpose.clone() });
        }
        let me = self.clone();
        let taken = self
            .freezer
            .around_all(targets, async move {
                let mut done: Vec<SnapshotInfo> = Vec::new();
                for m in &members {
                    match me.snapshot_of(&m.source, &m.csi_name, &m.local, &m.uid, Some(group.clone())).await {
                        Ok(s) => done.push(s),
                        Err(e) => {
                            // Nothing of a failed group is left behind.
                            for s in &done {
                                if let Err(d) = me.delete_snapshot(&s.local).await {
                                    tracing::error!(pool = %me.name, snapshot = %s.local, error = %d, "cannot remove a member of a failed group snapshot");
                                }
                            }
                            return Err(e);
                        }
                    }
                }
                Ok(done)
            })
            .await;
        taken?
    }
}

/// A copied image being finished: the kind-specific steps of the shared flow
/// ([`crate::pool::copy`]). The copy is the temporary image, whose commit (rename and
/// metadata, by the caller) marks it finished.
struct ImageCopy<'a> {
    pool: &'a FilePool,
    files: &'a Files,
    provisioning: Provisioning,
}

#[async_trait]
impl crate::pool::copy::Copy for ImageCopy<'_> {
    async fn grow_to(&self, capacity: u64) -> Result<()> {
        // Also allocates a thick copy's holes, even when it needs no growing.
        self.pool.size_tmp(self.files, capacity, self.provisioning).await
    }

    async fn device(&self, _filesystem: bool) -> Result<Option<PathBuf>> {
        Ok(Some(self.files.tmp_img.clone()))
    }

    async fn mark_finished(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
