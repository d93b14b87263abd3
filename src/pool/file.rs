//! The `file` pool: each volume is a sparse file in the pool directory with a JSON metadata file
//! beside it; the node attaches it to a loop device.
//!
//! Layout (everything stays inside the pool directory; local names are validated before any
//! path is built from them):
//!
//! ```text
//! <path>/volumes/<local>.img     the volume's data (sparse)
//! <path>/volumes/<local>.json    VolumeInfo: the volume exists exactly when this file does
//! <path>/snapshots/<local>.img   an independent copy of a volume's image
//! <path>/snapshots/<local>.json  SnapshotInfo
//! <path>/*/.<local>.{img,json}.tmp   half-made files of a creation in progress
//! ```
//!
//! Crash safety: the metadata rename is the single commit point. A creation builds the image as
//! `.<local>.img.tmp`, fsyncs it, renames it to `<local>.img`, then writes the metadata (tmp,
//! fsync, rename, fsync of the directory). Until the metadata is in place nothing is visible;
//! afterwards the volume is complete. Deletion removes the metadata first. So the only leftovers
//! a crash can leave are temporaries and an image without metadata, and a retry of the same
//! name (create or delete) removes them.
//!
//! Room: sparse files promise space they have not taken yet, so what the pool can still back is
//! the free space of its filesystem, minus the configured reserve, minus every volume's holes
//! (apparent size − allocated bytes), minus what creations in progress have claimed. Snapshots
//! are never written after they are taken, so their holes promise nothing and are not counted.
//! (Reflink copies on XFS/btrfs share blocks that a later write unshares; that is not counted.)
//!
//! Snapshots and clones are independent copies of the image, so a volume that has snapshots can
//! be deleted and its snapshots stay usable. A source that is mounted (through its loop device,
//! per this process's mount table) is frozen for the copy through [`crate::node::freeze`] (its
//! policy: recorded first, thawed on every path, FAILED_PRECONDITION when it cannot be frozen);
//! a raw block volume in use has no filesystem to freeze and is copied as it is.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{PoolConfig, format_size, parse_size};
use crate::error::{Context, Error, Result};
use crate::exec::{Cmd, Exec};
use crate::node::freeze::{Freezer, Target};
use crate::node::{format, loopdev, mountinfo};
use crate::pool::{Attachment, Condition, CreateRequest, Pool, SnapshotInfo, Source, VolumeInfo};
use crate::volume_id::{PoolKind, valid_local_name};

/// Filesystem for filesystem volumes when neither the request nor the config names one.
const DEFAULT_FS: &str = "ext4";
/// How long an image copy may take. Generous: without reflink, `cp` reads every allocated
/// byte, and a mounted source stays frozen for the whole copy.
const COPY_TIMEOUT: Duration = Duration::from_secs(2 * 3600);

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
}

/// A `file` pool: sparse image files in a directory, attached to loop devices on this node.
pub struct FilePool {
    name: String,
    root: PathBuf,
    reserve: u64,
    default_fs: String,
    exec: Arc<dyn Exec>,
    /// The mount table consulted to find a mounted source before copying it.
    mountinfo: PathBuf,
    /// Bytes claimed by creations, clones, snapshots and expansions in progress.
    in_flight: Arc<Mutex<u64>>,
    /// Freezes a mounted source around its copy (the driver's, shared by its pools).
    freezer: Arc<Freezer>,
}

/// Bytes claimed from the pool until the object is committed (then its file accounts for them).
struct Claim {
    in_flight: Arc<Mutex<u64>>,
    bytes: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *g = g.saturating_sub(self.bytes);
    }
}

/// What the pool can still back: free space minus reserve, promised holes and claims.
fn available(free: u64, reserve: u64, promised: u64, in_flight: u64) -> u64 {
    free.saturating_sub(reserve).saturating_sub(promised).saturating_sub(in_flight)
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Removes a file; one that is not there is success.
fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::io(format!("removing {}", path.display()), e)),
        _ => Ok(()),
    }
}

/// Makes renames and removals in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).context(|| format!("syncing directory {}", dir.display()))
}

/// Reads a metadata file; `None` when it does not exist.
fn read_meta<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        r => r.context(|| format!("reading metadata {}", path.display()))?,
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::Internal(format!("metadata {} is unreadable: {e}; fix or remove it (the image beside it holds the data)", path.display()))
    })
}

/// Writes a metadata file atomically: temporary file, fsync, rename, fsync of the directory.
fn write_meta<T: Serialize>(files: &Files, value: &T) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| Error::Internal(format!("encoding metadata: {e}")))?;
    let tmp = &files.tmp_meta;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&json).and_then(|_| f.sync_all()).context(|| format!("writing {}", tmp.display()))?;
    fs::rename(tmp, &files.meta).context(|| format!("renaming {} to {}", tmp.display(), files.meta.display()))?;
    sync_dir(&files.dir)
}

/// Flushes a file's data to disk.
fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).context(|| format!("syncing {}", path.display()))
}

/// Apparent size and allocated bytes of a file.
fn sizes(path: &Path) -> Result<(u64, u64)> {
    let m = fs::metadata(path).context(|| format!("inspecting {}", path.display()))?;
    Ok((m.len(), m.blocks() * 512))
}

/// Grows `path` to `len` bytes (sparse) and flushes it; never shrinks.
fn grow_and_sync(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path).context(|| format!("opening {}", path.display()))?;
    let cur = f.metadata().context(|| format!("inspecting {}", path.display()))?.len();
    if cur < len {
        f.set_len(len).context(|| format!("growing {} to {len} bytes", path.display()))?;
    }
    f.sync_all().context(|| format!("syncing {}", path.display()))
}

/// The mount points to freeze for a consistent copy of `src`: one per loop device of `src`
/// that is mounted (one superblock, however many mount points: freezing one freezes it).
async fn mounted_from(exec: &dyn Exec, mountinfo_path: &Path, src: &Path) -> Result<Vec<PathBuf>> {
    let devices = loopdev::find(exec, src).await?;
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let path = mountinfo_path.to_owned();
    let mounts = crate::blocking::run("mountinfo", "reading the mount table", crate::blocking::METADATA_DEADLINE, move || {
        mountinfo::read_from(&path)
    })
    .await??;
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
    async fn copy_image(&self, volume: &str, purpose: String, src: &Path, dst: &Path) -> Result<()> {
        let mount_points = mounted_from(self.exec.as_ref(), &self.mountinfo, src).await?;
        let (s, d) = (src.to_string_lossy().into_owned(), dst.to_string_lossy().into_owned());
        let cmd = Cmd::new("cp").args(["--reflink=auto", "--sparse=always", s.as_str(), d.as_str()]).timeout(COPY_TIMEOUT);
        let exec = self.exec.clone();
        let target = Target { pool: self.name.clone(), volume: volume.to_owned(), mount_points, purpose };
        let copied = self.freezer.around(target, async move { exec.run(cmd).await }).await?;
        copied.context(|| format!("copying {s} to {d}")).map(|_| ())
    }
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
            name,
            root,
            reserve,
            default_fs: cfg.default_fs.clone().unwrap_or_else(|| DEFAULT_FS.to_owned()),
            exec,
            mountinfo: PathBuf::from(mountinfo::PROC_MOUNTINFO),
            in_flight: Arc::new(Mutex::new(0)),
            freezer,
        })
    }

    /// Freezes mounted sources with `freezer` (the driver's: recorded, shared by its pools).
    pub fn with_freezer(mut self, freezer: Arc<Freezer>) -> Self {
        self.freezer = freezer;
        self
    }

    /// Reads the mount table from `path` instead of `/proc/self/mountinfo` (tests).
    pub fn with_mountinfo(mut self, path: impl Into<PathBuf>) -> Self {
        self.mountinfo = path.into();
        self
    }

    /// The pool directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn files(&self, kind: Kind, local: &str) -> Result<Files> {
        // The one gate between a name and a path: nothing but [a-z0-9_-] reaches the filesystem.
        if !valid_local_name(local) {
            return Err(Error::InvalidArgument(format!("{local:?} is not a valid {} name in file pool {:?}", kind.noun(), self.name)));
        }
        let dir = self.root.join(kind.dir());
        Ok(Files {
            img: dir.join(format!("{local}.img")),
            meta: dir.join(format!("{local}.json")),
            tmp_img: dir.join(format!(".{local}.img.tmp")),
            tmp_meta: dir.join(format!(".{local}.json.tmp")),
            dir,
        })
    }

    /// Bytes the volumes' sparse files have promised but not yet taken.
    fn promised(&self) -> Result<u64> {
        let dir = self.root.join(Kind::Volume.dir());
        let mut total = 0u64;
        for entry in fs::read_dir(&dir).context(|| format!("listing {}", dir.display()))? {
            let entry = entry.context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            let Some(local) = name.to_str().and_then(|n| n.strip_suffix(".img")).filter(|l| valid_local_name(l)) else { continue };
            // An image without metadata is a leftover: its holes promise nothing.
            if !dir.join(format!("{local}.json")).exists() {
                continue;
            }
            match entry.metadata() {
                Ok(m) => total = total.saturating_add(m.len().saturating_sub(m.blocks() * 512)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("inspecting {}", entry.path().display()), e)),
            }
        }
        Ok(total)
    }

    /// Free bytes of the pool's filesystem for an unprivileged writer.
    fn free(&self) -> Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| Error::io(format!("statvfs of pool directory {}", self.root.display()), e.into()))?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    /// What one new volume could get now.
    fn available_now(&self, in_flight: u64) -> Result<u64> {
        Ok(available(self.free()?, self.reserve, self.promised()?, in_flight))
    }

    /// Claims `bytes` for `what`, or answers RESOURCE_EXHAUSTED saying what is free.
    fn claim(&self, bytes: u64, what: &str) -> Result<Claim> {
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let avail = self.available_now(*g)?;
        if bytes > avail {
            return Err(Error::ResourceExhausted(format!(
                "file pool {:?} cannot hold {what}: {} requested, {} available ({} of {} kept in reserve)",
                self.name,
                format_size(bytes),
                format_size(avail),
                format_size(self.reserve),
                self.root.display()
            )));
        }
        *g += bytes;
        Ok(Claim { in_flight: self.in_flight.clone(), bytes })
    }

    /// Removes the half-made leftovers of `local`: temporaries, and an image without metadata.
    async fn clean_leftovers(&self, kind: Kind, f: &Files) -> Result<()> {
        remove_if_exists(&f.tmp_img)?;
        remove_if_exists(&f.tmp_meta)?;
        if !f.meta.exists() && f.img.exists() {
            if kind == Kind::Volume {
                if let Some(dev) = loopdev::find(self.exec.as_ref(), &f.img).await?.first() {
                    return Err(Error::FailedPrecondition(format!(
                        "{} (a leftover without metadata) is attached to {}; detach it with `losetup -d {}`",
                        f.img.display(),
                        dev.display(),
                        dev.display()
                    )));
                }
            }
            remove_if_exists(&f.img)?;
        }
        Ok(())
    }

    /// Moves a finished temporary image into place and commits its metadata. On failure the
    /// image is removed again, so nothing half-made stays visible.
    fn commit<T: Serialize>(&self, f: &Files, meta: &T) -> Result<()> {
        let r = fs::rename(&f.tmp_img, &f.img)
            .context(|| format!("renaming {} to {}", f.tmp_img.display(), f.img.display()))
            .and_then(|_| write_meta(f, meta));
        if r.is_err() && !f.meta.exists() {
            let _ = remove_if_exists(&f.img);
            let _ = remove_if_exists(&f.tmp_meta);
        }
        r
    }

    fn read_volume(&self, f: &Files, local: &str) -> Result<Option<VolumeInfo>> {
        Ok(read_meta::<VolumeInfo>(&f.meta)?.map(|v| VolumeInfo { local: local.to_owned(), ..v }))
    }

    fn read_snapshot(&self, f: &Files, local: &str) -> Result<Option<SnapshotInfo>> {
        Ok(read_meta::<SnapshotInfo>(&f.meta)?.map(|s| SnapshotInfo { local: local.to_owned(), ..s }))
    }

    fn list<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<T>> {
        let dir = self.root.join(kind.dir());
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).context(|| format!("listing {}", dir.display()))? {
            let entry = entry.context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            // Temporaries start with '.', which no local name does.
            let Some(local) = name.to_str().and_then(|n| n.strip_suffix(".json")).filter(|l| valid_local_name(l)) else { continue };
            match read_meta::<T>(&entry.path()) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => {}
                // One damaged file must not hide every other object; condition() reports it.
                Err(e) => tracing::warn!(pool = %self.name, local, error = %e, "skipping unreadable {}", kind.noun()),
            }
        }
        Ok(out)
    }

    /// Builds the temporary image of a new volume: a sparse file, or a copy of `source`
    /// grown to `capacity` with a new filesystem UUID.
    async fn build_image(&self, req: &CreateRequest, f: &Files, source: Option<PathBuf>) -> Result<()> {
        match source {
            None => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&f.tmp_img)
                    .context(|| format!("creating {}", f.tmp_img.display()))?;
                file.set_len(req.capacity).context(|| format!("sizing {} to {} bytes", f.tmp_img.display(), req.capacity))?;
                file.sync_all().context(|| format!("syncing {}", f.tmp_img.display()))
            }
            Some(src) => {
                let volume = match &req.source {
                    Some(Source::Volume(v)) => v.as_str(),
                    _ => "",
                };
                self.copy_image(volume, format!("clone {:?}", req.csi_name), &src, &f.tmp_img).await?;
                grow_and_sync(&f.tmp_img, req.capacity)?;
                if !req.block {
                    // The copy carries its source's filesystem UUID; XFS refuses to mount two
                    // filesystems with one UUID, and others confuse them (by-uuid links).
                    format::regenerate_uuid(self.exec.as_ref(), &f.tmp_img).await?;
                }
                Ok(())
            }
        }
    }

    /// The image to copy a new volume from, after checking it exists and fits.
    fn source_image(&self, req: &CreateRequest) -> Result<Option<PathBuf>> {
        let (kind, local, min) = match &req.source {
            None => return Ok(None),
            Some(Source::Snapshot(s)) => {
                let f = self.files(Kind::Snapshot, s)?;
                let snap = self.read_snapshot(&f, s)?;
                let snap = snap.ok_or_else(|| Error::NotFound(format!("snapshot {s} does not exist in file pool {:?}", self.name)))?;
                (Kind::Snapshot, s, snap.size)
            }
            Some(Source::Volume(v)) => {
                let f = self.files(Kind::Volume, v)?;
                let vol = self.read_volume(&f, v)?;
                let vol = vol.ok_or_else(|| Error::NotFound(format!("source volume {v} does not exist in file pool {:?}", self.name)))?;
                (Kind::Volume, v, vol.capacity)
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
        Ok(Some(self.files(kind, local)?.img))
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

    async fn create_volume(&self, req: &CreateRequest) -> Result<VolumeInfo> {
        let f = self.files(Kind::Volume, &req.local)?;
        if let Some(v) = self.read_volume(&f, &req.local)? {
            if v.csi_name == req.csi_name && v.capacity == req.capacity && v.block == req.block && v.source == req.source {
                return Ok(v);
            }
            return Err(Error::AlreadyExists(format!(
                "volume {} in file pool {:?} already exists for another request (name {:?}, {}, {}, source {:?}); \
                 this request asks for name {:?}, {}, {}, source {:?}",
                req.local,
                self.name,
                v.csi_name,
                format_size(v.capacity),
                if v.block { "block" } else { "filesystem" },
                v.source,
                req.csi_name,
                format_size(req.capacity),
                if req.block { "block" } else { "filesystem" },
                req.source,
            )));
        }
        let source = self.source_image(req)?;
        self.clean_leftovers(Kind::Volume, &f).await?;
        let _claim = self.claim(req.capacity, &format!("volume {} ({})", req.local, req.csi_name))?;
        if let Err(e) = self.build_image(req, &f, source).await {
            let _ = remove_if_exists(&f.tmp_img);
            return Err(e);
        }
        let info = VolumeInfo {
            local: req.local.clone(),
            csi_name: req.csi_name.clone(),
            capacity: req.capacity,
            block: req.block,
            fs_type: if req.block { None } else { Some(req.fs_type.clone().unwrap_or_else(|| self.default_fs.clone())) },
            source: req.source.clone(),
            created: now(),
        };
        self.commit(&f, &info)?;
        tracing::info!(pool = %self.name, local = %info.local, capacity = info.capacity, "created volume");
        Ok(info)
    }

    async fn delete_volume(&self, local: &str) -> Result<()> {
        let f = self.files(Kind::Volume, local)?;
        if f.img.exists() {
            if let Some(dev) = loopdev::find(self.exec.as_ref(), &f.img).await?.first() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {local} is still attached to {}: unstage it on this node first",
                    dev.display()
                )));
            }
        }
        // Metadata first: from here on the volume is gone, and what remains is a leftover.
        remove_if_exists(&f.meta)?;
        sync_dir(&f.dir)?;
        remove_if_exists(&f.img)?;
        remove_if_exists(&f.tmp_img)?;
        remove_if_exists(&f.tmp_meta)?;
        sync_dir(&f.dir)
    }

    async fn get_volume(&self, local: &str) -> Result<Option<VolumeInfo>> {
        let f = self.files(Kind::Volume, local)?;
        self.read_volume(&f, local)
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        self.list(Kind::Volume)
    }

    async fn expand_volume(&self, local: &str, capacity: u64) -> Result<u64> {
        let f = self.files(Kind::Volume, local)?;
        let v = self
            .read_volume(&f, local)?
            .ok_or_else(|| Error::NotFound(format!("volume {local} does not exist in file pool {:?}", self.name)))?;
        if capacity <= v.capacity {
            return Ok(v.capacity);
        }
        let (len, _) = sizes(&f.img)?;
        // After a crash between growing the file and updating the metadata, the file is
        // already (partly) grown: only the rest needs room.
        let _claim =
            self.claim(capacity.saturating_sub(len.max(v.capacity)), &format!("growing volume {local} to {}", format_size(capacity)))?;
        grow_and_sync(&f.img, capacity)?;
        for dev in loopdev::find(self.exec.as_ref(), &f.img).await? {
            loopdev::refresh_capacity(self.exec.as_ref(), &dev).await?;
        }
        write_meta(&f, &VolumeInfo { capacity, ..v })?;
        tracing::info!(pool = %self.name, local, capacity, "expanded volume");
        Ok(capacity)
    }

    async fn create_snapshot(&self, source_local: &str, csi_name: &str, local: &str) -> Result<SnapshotInfo> {
        let f = self.files(Kind::Snapshot, local)?;
        let src = self.files(Kind::Volume, source_local)?;
        if let Some(s) = self.read_snapshot(&f, local)? {
            if s.csi_name == csi_name && s.source_volume == source_local {
                return Ok(s);
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot {local} in file pool {:?} already exists as {:?} of volume {}; this request asks for {csi_name:?} of volume {source_local}",
                self.name, s.csi_name, s.source_volume
            )));
        }
        if self.read_volume(&src, source_local)?.is_none() {
            return Err(Error::NotFound(format!("volume {source_local} does not exist in file pool {:?}", self.name)));
        }
        self.clean_leftovers(Kind::Snapshot, &f).await?;
        // The copy keeps holes, so it takes what the source has allocated.
        let (_, allocated) = sizes(&src.img)?;
        let _claim = self.claim(allocated, &format!("snapshot {local} of volume {source_local}"))?;
        let copied = async {
            self.copy_image(source_local, format!("snapshot {csi_name:?}"), &src.img, &f.tmp_img).await?;
            sync_file(&f.tmp_img)?;
            sizes(&f.tmp_img)
        }
        .await;
        let size = match copied {
            Ok((len, _)) => len,
            Err(e) => {
                let _ = remove_if_exists(&f.tmp_img);
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
        };
        self.commit(&f, &info)?;
        tracing::info!(pool = %self.name, local, source = source_local, size, "created snapshot");
        Ok(info)
    }

    async fn delete_snapshot(&self, local: &str) -> Result<()> {
        let f = self.files(Kind::Snapshot, local)?;
        remove_if_exists(&f.meta)?;
        sync_dir(&f.dir)?;
        remove_if_exists(&f.img)?;
        remove_if_exists(&f.tmp_img)?;
        remove_if_exists(&f.tmp_meta)?;
        sync_dir(&f.dir)
    }

    async fn get_snapshot(&self, local: &str) -> Result<Option<SnapshotInfo>> {
        let f = self.files(Kind::Snapshot, local)?;
        self.read_snapshot(&f, local)
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.list(Kind::Snapshot)
    }

    async fn capacity(&self) -> Result<u64> {
        let in_flight = *self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        self.available_now(in_flight)
    }

    async fn attach(&self, local: &str) -> Result<Attachment> {
        let f = self.files(Kind::Volume, local)?;
        if self.read_volume(&f, local)?.is_none() {
            return Err(Error::NotFound(format!("volume {local} does not exist in file pool {:?}", self.name)));
        }
        if !f.img.exists() {
            return Err(Error::FailedPrecondition(format!("backing file {} of volume {local} is missing", f.img.display())));
        }
        Ok(Attachment::Device(loopdev::attach(self.exec.as_ref(), &f.img).await?))
    }

    async fn detach(&self, local: &str) -> Result<()> {
        let f = self.files(Kind::Volume, local)?;
        loopdev::detach_all(self.exec.as_ref(), &f.img).await
    }

    async fn condition(&self, local: &str) -> Result<Condition> {
        let f = self.files(Kind::Volume, local)?;
        let v = match self.read_volume(&f, local) {
            Ok(Some(v)) => v,
            Ok(None) => return Err(Error::NotFound(format!("volume {local} does not exist in file pool {:?}", self.name))),
            Err(e) => return Ok(Condition::Abnormal(e.to_string())),
        };
        match fs::metadata(&f.img) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Condition::Abnormal(format!("backing file {} is missing", f.img.display()))),
            Err(e) => Ok(Condition::Abnormal(format!("backing file {} cannot be inspected: {e}", f.img.display()))),
            Ok(m) if m.len() < v.capacity => Ok(Condition::Abnormal(format!(
                "backing file {} is {} bytes, smaller than the volume's {} bytes",
                f.img.display(),
                m.len(),
                v.capacity
            ))),
            Ok(_) => Ok(Condition::Healthy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::exec::{ExecError, FakeExec, Output, RealExec, Reply};
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileExt, PermissionsExt};

    const MIB: u64 = 1 << 20;

    fn config(dir: &Path, extra: &str) -> PoolConfig {
        let src = format!("[[pool]]\nname = \"p1\"\nkind = \"file\"\npath = \"{}\"\n{extra}", dir.display());
        Config::parse(&src).unwrap().pools.remove(0)
    }

    fn pool(dir: &Path, exec: Arc<dyn Exec>) -> FilePool {
        FilePool::new(&config(dir, ""), exec).unwrap()
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
            assert!(matches!(p.create_snapshot("v", "s", bad).await, Err(Error::InvalidArgument(_))), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn attach_reuses_the_existing_device_and_detach_detaches_it() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeExec::new());
        let p = pool(dir.path(), fake.clone());
        p.create_volume(&req("v1", MIB, true, None)).await.unwrap();
        let image = img(dir.path(), "volumes", "v1");
        let listed = format!(
            r#"{{"loopdevices":[{{"name":"/dev/loop3","back-file":"{}","offset":0,"sizelimit":0,"ro":false,"autoclear":false}}]}}"#,
            image.display()
        );
        fake.on("losetup --list", vec![Reply::Ok(listed.clone()), Reply::Ok(listed), Reply::Ok(r#"{"loopdevices":[]}"#.into())]);
        assert_eq!(p.attach("v1").await.unwrap(), Attachment::Device("/dev/loop3".into()));
        p.detach("v1").await.unwrap();
        let assoc = format!("losetup --list --json --associated {}", image.display());
        assert_eq!(fake.lines(), [assoc.clone(), assoc.clone(), "losetup --detach /dev/loop3".into(), assoc]);
        assert!(matches!(p.attach("nope").await, Err(Error::NotFound(_))));
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
        let table = dir.join("mountinfo");
        fs::write(&table, "22 1 0:21 / /proc rw - proc proc rw\n36 22 7:3 / /mnt/vol rw,relatime shared:1 - ext4 /dev/loop3 rw\n").unwrap();
        let p = pool(&dir.join("pool"), fake.clone()).with_mountinfo(table);
        (fake, p)
    }

    #[tokio::test]
    async fn snapshot_freezes_a_mounted_source_around_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, p) = mounted_source(dir.path());
        p.create_volume(&req("v1", MIB, false, None)).await.unwrap();
        fake.0.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[{"name":"/dev/loop3","back-file":"/x"}]}"#.into())]);
        let s = p.create_snapshot("v1", "snap-1", "s1").await.unwrap();
        assert_eq!((s.size, s.source_volume.as_str(), s.ready), (MIB, "v1", true));
        let (src, tmp) = (img(&dir.path().join("pool"), "volumes", "v1"), dir.path().join("pool/snapshots/.s1.img.tmp"));
        assert_eq!(
            fake.0.lines(),
            [
                format!("losetup --list --json --associated {}", src.display()),
                "fsfreeze --freeze /mnt/vol".into(),
                format!("cp --reflink=auto --sparse=always {} {}", src.display(), tmp.display()),
                "fsfreeze --unfreeze /mnt/vol".into(),
            ]
        );
        assert!(img(&dir.path().join("pool"), "snapshots", "s1").exists());
        assert_eq!(p.create_snapshot("v1", "snap-1", "s1").await.unwrap(), s, "idempotent");
    }

    #[tokio::test]
    async fn a_failed_copy_still_thaws_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, p) = mounted_source(dir.path());
        p.create_volume(&req("v1", MIB, false, None)).await.unwrap();
        fake.0.on("losetup --list", vec![Reply::Ok(r#"{"loopdevices":[{"name":"/dev/loop3","back-file":"/x"}]}"#.into())]);
        fake.0.on("cp", vec![Reply::Fail(1, "cp: No space left on device".into())]);
        let err = p.create_snapshot("v1", "snap-1", "s1").await.unwrap_err();
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
        let err = p.create_snapshot("v1", "snap-1", "s1").await.unwrap_err();
        // The one freeze policy (issue 9): a mounted filesystem that cannot be frozen is
        // FAILED_PRECONDITION saying so (it was INTERNAL "freezing /mnt/vol" before).
        assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains("/mnt/vol cannot be frozen")), "{err}");
        assert!(!fake.0.lines().iter().any(|l| l.starts_with("cp ")), "no unfrozen copy");

        fake.0.on("fsfreeze --freeze", vec![Reply::Ok(String::new())]);
        fake.0.on("fsfreeze --unfreeze", vec![Reply::Fail(1, "fsfreeze: /mnt/vol: unfreeze failed".into())]);
        let err = p.create_snapshot("v1", "snap-1", "s1").await.unwrap_err();
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
        let tmp = dir.path().join("volumes/.v2.img.tmp");
        assert_eq!(lines.last().unwrap(), &format!("cp --reflink=auto --sparse=always {} {}", src.display(), tmp.display()));
        let copy = img(dir.path(), "volumes", "v2");
        assert_eq!(read_at(&copy, 4096, 5), b"hello");
        assert_eq!(fs::metadata(&copy).unwrap().len(), 2 * MIB);
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
        let p = pool(dir.path(), Arc::new(RealExec));
        let r = req("v1", 64 * MIB, false, None);
        let v = p.create_volume(&r).await.unwrap();
        assert_eq!((v.local.as_str(), v.csi_name.as_str(), v.capacity, v.fs_type.as_deref()), ("v1", "csi-v1", 64 * MIB, Some("ext4")));
        assert_eq!(p.create_volume(&r).await.unwrap(), v, "idempotent");
        assert_eq!(p.get_volume("v1").await.unwrap(), Some(v.clone()));
        assert_eq!(p.list_volumes().await.unwrap(), vec![v.clone()]);
        assert_eq!(p.promised().unwrap(), 64 * MIB, "a fresh sparse file promises all of it");

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

        let dev = match p.attach("v1").await.unwrap() {
            Attachment::Device(d) => d,
            other => panic!("{other:?}"),
        };
        assert_eq!(p.attach("v1").await.unwrap(), Attachment::Device(dev.clone()), "attach twice, one device");
        assert!(matches!(p.delete_volume("v1").await, Err(Error::FailedPrecondition(_))));
        assert_eq!(p.expand_volume("v1", 96 * MIB).await.unwrap(), 96 * MIB);
        let sectors = fs::read_to_string(format!("/sys/class/block/{}/size", dev.file_name().unwrap().to_string_lossy())).unwrap();
        assert_eq!(sectors.trim().parse::<u64>().unwrap() * 512, 96 * MIB, "the loop device sees the growth");
        p.detach("v1").await.unwrap();
        p.detach("v1").await.unwrap();
        assert!(loopdev::find(&RealExec, &img(dir.path(), "volumes", "v1")).await.unwrap().is_empty());

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
        let p = pool(dir.path(), Arc::new(RealExec));
        p.create_volume(&req("v1", 8 * MIB, true, None)).await.unwrap();
        let v1 = img(dir.path(), "volumes", "v1");
        write_at(&v1, 0, b"first block");
        write_at(&v1, 5 * MIB, b"far away");

        let s = p.create_snapshot("v1", "snap-1", "s1").await.unwrap();
        assert_eq!((s.size, s.csi_name.as_str()), (8 * MIB, "snap-1"));
        assert_eq!(p.create_snapshot("v1", "snap-1", "s1").await.unwrap(), s, "idempotent");
        assert_eq!(p.list_snapshots().await.unwrap(), vec![s.clone()]);
        p.create_volume(&req("v9", MIB, true, None)).await.unwrap();
        assert!(matches!(p.create_snapshot("v9", "snap-1", "s1").await, Err(Error::AlreadyExists(_))), "other source");
        assert!(matches!(p.create_snapshot("nope", "snap-2", "s2").await, Err(Error::NotFound(_))));
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
        assert!(fs::metadata(&r1).unwrap().blocks() * 512 < 2 * MIB, "holes stay holes");

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
        let p = pool(&dir.path().join("pool"), Arc::new(RealExec));
        p.create_volume(&req("v1", 32 * MIB, false, None)).await.unwrap();
        let Attachment::Device(dev) = p.attach("v1").await.unwrap() else { panic!("not a device") };
        let run = |argv: &[&str]| {
            let st = std::process::Command::new(argv[0]).args(&argv[1..]).output().unwrap();
            assert!(st.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&st.stderr));
        };
        let (dev_s, mnt_s) = (dev.to_string_lossy().into_owned(), mnt.to_string_lossy().into_owned());
        run(&["mkfs.ext4", "-q", &dev_s]);
        run(&["mount", &dev_s, &mnt_s]);
        fs::write(mnt.join("data"), b"written before the snapshot").unwrap();

        p.create_snapshot("v1", "snap-1", "s1").await.unwrap();
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
            let out =
                std::process::Command::new("blkid").args(["-p", "-s", "UUID", "-o", "value", &image.to_string_lossy()]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let (before, after) = (uuid(&img(&dir.path().join("pool"), "volumes", "v1")), uuid(&r1));
        assert!(!before.is_empty() && before != after, "{before:?} vs {after:?}");
        assert_eq!(fs::metadata(&r1).unwrap().len(), 48 * MIB);
    }
}
