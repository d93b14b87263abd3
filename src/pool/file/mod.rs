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
//! per this process's mount table) is frozen with `fsfreeze` for the copy; a raw block volume in
//! use cannot be frozen and is copied as it is.

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
use crate::node::{format, loopdev, mountinfo};
use crate::pool::{Attachment, Condition, CreateRequest, Pool, SnapshotInfo, Source, VolumeInfo};
use crate::volume_id::{PoolKind, valid_local_name};

mod room;

/// Filesystem for filesystem volumes when neither the request nor the config names one.
const DEFAULT_FS: &str = "ext4";
/// How long an image copy may take. Generous: without reflink, `cp` reads every allocated
/// byte, and a mounted source stays frozen for the whole copy.
const COPY_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// How long `fsfreeze` may take (freezing flushes the filesystem's dirty data).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(120);

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

/// Copies `src` to `dst` with `cp` (reflink when the filesystem can, holes kept). When `src` is
/// attached to a loop device that is mounted, the filesystem is frozen around the copy so the
/// copy is consistent, and thawed afterwards whatever happened.
///
/// Runs as its own task: if the caller's request is cancelled mid-copy, the task still thaws
/// the filesystem (a frozen filesystem would block the application's writes forever).
async fn copy_image(exec: Arc<dyn Exec>, mountinfo_path: PathBuf, src: PathBuf, dst: PathBuf) -> Result<()> {
    let task = tokio::spawn(async move {
        let devices = loopdev::find(exec.as_ref(), &src).await?;
        let mut freeze_at: Vec<PathBuf> = Vec::new();
        if !devices.is_empty() {
            let mounts = mountinfo::read_from(&mountinfo_path)?;
            for d in &devices {
                // One superblock, however many mount points (binds): freezing one freezes it.
                if let Some(m) = mountinfo::find_by_source(&mounts, &d.to_string_lossy()).first() {
                    freeze_at.push(m.mount_point.clone());
                }
            }
        }
        let mut frozen: Vec<&Path> = Vec::new();
        let mut failed_freeze: Option<&Path> = None;
        let mut result = Ok(());
        for mp in &freeze_at {
            let cmd = Cmd::new("fsfreeze").args(["--freeze", &*mp.to_string_lossy()]).timeout(FREEZE_TIMEOUT);
            // Thawed afterwards even if the freeze fails: one that timed out may still take effect.
            frozen.push(mp);
            if let Err(e) = exec.run(cmd).await {
                failed_freeze = Some(mp);
                result = Err(Error::exec(format!("freezing {} for a consistent copy of {}", mp.display(), src.display()), e));
                break;
            }
        }
        if result.is_ok() {
            let (s, d) = (src.to_string_lossy(), dst.to_string_lossy());
            let cmd = Cmd::new("cp").args(["--reflink=auto", "--sparse=always", s.as_ref(), d.as_ref()]).timeout(COPY_TIMEOUT);
            result = exec.run(cmd).await.context(|| format!("copying {s} to {d}")).map(|_| ());
        }
        for mp in frozen.into_iter().rev() {
            let cmd = Cmd::new("fsfreeze").args(["--unfreeze", &*mp.to_string_lossy()]).timeout(FREEZE_TIMEOUT);
            match exec.run(cmd).await {
                Ok(_) => {}
                // Thawing what never froze fails too, and says nothing new.
                Err(_) if failed_freeze == Some(mp) => {}
                // A filesystem left frozen blocks its application: that outranks any other error.
                Err(e) => {
                    tracing::error!(mount_point = %mp.display(), error = %e, "cannot thaw a filesystem frozen for a copy");
                    result = Err(Error::exec(
                        format!(
                            "thawing {} after copying {} (run `fsfreeze --unfreeze {}` now)",
                            mp.display(),
                            src.display(),
                            mp.display()
                        ),
                        e,
                    ));
                }
            }
        }
        result
    });
    task.await.map_err(|e| Error::Internal(format!("image copy task failed: {e}")))?
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
        Ok(FilePool {
            name,
            root,
            reserve,
            default_fs: cfg.default_fs.clone().unwrap_or_else(|| DEFAULT_FS.to_owned()),
            exec,
            mountinfo: PathBuf::from(mountinfo::PROC_MOUNTINFO),
            in_flight: Arc::new(Mutex::new(0)),
        })
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
                copy_image(self.exec.clone(), self.mountinfo.clone(), src, f.tmp_img.clone()).await?;
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
            copy_image(self.exec.clone(), self.mountinfo.clone(), src.img.clone(), f.tmp_img.clone()).await?;
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
mod tests;
