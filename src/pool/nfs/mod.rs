//! The `nfs` pool: each volume is a subdirectory of an NFS export, reachable from every node
//! (or from the pool's configured topology segments), so it supports every access mode,
//! including MULTI_NODE_MULTI_WRITER.
//!
//! - **Working mount.** The pool mounts the whole export once at `/run/holdfast/nfs/<pool>`
//!   (see [`export`]) and does all its work there: it is checked with a `stat` under a deadline
//!   before use, and mounted again if it went stale.
//! - **Naming.** A volume's directory is the `subdir` template expanded for the request
//!   (default `${csi.name}`; see [`template`]); its id carries the usual local name, and the
//!   mapping from local name to directory is stored in the pool's metadata (see [`store`]).
//! - **Creation** builds the directory under a temporary name (empty, extracted from a snapshot
//!   archive, or copied from a volume with `cp --archive --sparse=always`, which keeps owners,
//!   modes, xattrs and holes), writes an *intent*, moves the directory into place with one
//!   rename, and commits by writing the metadata. A directory that is already there and belongs
//!   to no volume (retained or archived data, an operator's directory) is never taken over.
//! - **Mode.** New (empty) directories get the `mode` parameter (octal, default 0755: root
//!   writes, everyone reads) and, when given, the `uid` / `gid` parameters. Pods that do not run
//!   as root need `mode: "0777"` or a matching `uid`/`gid`; 0777 is never the default because
//!   the export is shared by everyone who can mount it. Copies keep their source's attributes
//!   unless these parameters are given.
//! - **Capacity** is recorded, not enforced: NFS has no per-directory quota, so a volume can
//!   grow until the export is full. Expansion records the new capacity. GetCapacity is the
//!   export's free space.
//! - **Snapshots** are tar archives (`--xattrs --sparse --numeric-owner`) in the pool's metadata
//!   directory; NFS cannot freeze a directory, so a snapshot of a volume being written is not
//!   point-in-time consistent (files changing during the archive are taken as they are read).
//! - **Deletion** follows `on_delete`: `delete` moves the directory to the pool's trash and
//!   removes it, `retain` forgets the volume and leaves its directory, `archive` renames it to
//!   `archived-<name>-<UTC time>` beside where it was.
//! - **Node side.** `attach` hands the node `server:/export/<subdir>` to mount with the pool's
//!   mount options; there is nothing to detach. The server resolves that path itself and
//!   follows symlinks, so `attach` first checks on the working mount that the directory is
//!   still a plain directory (no symlink in its place or above it) and refuses otherwise.
//! - **No symlink is followed.** Every use of a volume's data (archive, copy, move to the trash
//!   or the archive name) opens its directory beneath the export one component at a time
//!   without following symlinks ([`store::open_dir`]) and works through the opened descriptor,
//!   so a workload swapping the directory for a link cannot redirect it.
//! - **Health.** `condition` checks the server and the directory with child processes under a
//!   deadline, so a dead server is reported within seconds and never hangs the plugin.
//!
//! The controller needs root on the export (`no_root_squash`): it creates, chowns and copies
//! directories owned by the workloads' users.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::config::{PoolConfig, format_size};
use crate::error::{Context, Error, Result};
use crate::exec::{Cmd, Exec, ExecError};
use crate::node::mount::{Mounter, RealMounter};
use crate::placement::Segments;
use crate::pool::{Attachment, Condition, CreateRequest, Pool, SnapshotInfo, Source, VolumeInfo};
use crate::volume_id::PoolKind;

pub mod export;
pub mod store;
pub mod template;
#[cfg(test)]
mod tests;

use export::Export;
use store::{Entry, Layout, SnapshotMeta, VolumeMeta, check_local};
use template::Template;

/// Where the working mounts of nfs pools live: `<this>/<pool>`.
pub const WORK_ROOT: &str = "/run/holdfast/nfs";
/// How long the server gets to answer a health probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a probe result is trusted, so a burst of calls probes once.
const PROBE_TTL: Duration = Duration::from_secs(2);
/// How old a probe result a health check accepts (a ListVolumes still probes about once).
const CONDITION_PROBE_AGE: Duration = Duration::from_millis(500);
/// How long a batch of file operations on the export may take before the server is declared
/// unavailable (the blocked thread is abandoned; the call answers).
const FS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a copy, archive, extraction or removal of a volume's data may take.
const DATA_TIMEOUT: Duration = Duration::from_secs(4 * 3600);
/// Mode of a new empty volume directory unless the `mode` parameter says otherwise.
pub const DEFAULT_MODE: u32 = 0o755;

/// StorageClass parameter: octal mode of a new volume directory (`"0770"`, `"2775"`).
pub const PARAM_MODE: &str = "mode";
/// StorageClass parameter: owner uid of a new volume directory.
pub const PARAM_UID: &str = "uid";
/// StorageClass parameter: owner gid of a new volume directory.
pub const PARAM_GID: &str = "gid";

/// What deleting a volume does to its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    /// Remove it.
    Delete,
    /// Leave it where it is; only holdfast forgets the volume.
    Retain,
    /// Rename it to `archived-<name>-<UTC time>` beside where it was.
    Archive,
}

impl OnDelete {
    /// Parses the config value.
    pub fn parse(s: &str) -> Result<OnDelete> {
        match s {
            "delete" => Ok(OnDelete::Delete),
            "retain" => Ok(OnDelete::Retain),
            "archive" => Ok(OnDelete::Archive),
            other => Err(Error::InvalidArgument(format!("on_delete {other:?} is not one of \"delete\", \"retain\", \"archive\""))),
        }
    }
}

/// Attributes of a new volume directory, from the request parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirAttributes {
    /// `mode` (permission bits, with set-gid / sticky).
    pub mode: Option<u32>,
    /// `uid`.
    pub uid: Option<u32>,
    /// `gid`.
    pub gid: Option<u32>,
}

impl DirAttributes {
    /// Reads `mode`, `uid` and `gid` from the parameters (INVALID_ARGUMENT naming a bad one).
    pub fn from_parameters(params: &BTreeMap<String, String>) -> Result<DirAttributes> {
        let mode = params
            .get(PARAM_MODE)
            .map(|m| {
                let digits = m.strip_prefix("0o").unwrap_or(m);
                u32::from_str_radix(digits, 8).ok().filter(|v| *v <= 0o7777 && (3..=5).contains(&digits.len())).ok_or_else(|| {
                    Error::InvalidArgument(format!("parameter mode={m:?} is not an octal mode such as \"0755\" or \"2770\""))
                })
            })
            .transpose()?;
        let id = |key: &str| {
            params
                .get(key)
                .map(|v| v.parse::<u32>().map_err(|_| Error::InvalidArgument(format!("parameter {key}={v:?} is not a numeric id"))))
                .transpose()
        };
        Ok(DirAttributes { mode, uid: id(PARAM_UID)?, gid: id(PARAM_GID)? })
    }

    fn is_empty(&self) -> bool {
        *self == DirAttributes::default()
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// An `nfs` pool.
pub struct NfsPool {
    name: String,
    server: String,
    /// The exported path, without a trailing `/` (empty for `/`).
    export_path: String,
    template: Template,
    on_delete: OnDelete,
    topology: Segments,
    export: Export,
    exec: Arc<dyn Exec>,
    probe_timeout: Duration,
    /// The last probe: when, and the free bytes or why it failed.
    health: tokio::sync::Mutex<Option<(Instant, std::result::Result<u64, String>)>>,
    /// Whether the pool's own directories exist on the export.
    initialised: tokio::sync::OnceCell<()>,
    /// The last metadata read of each volume, answered when the server does not answer, so the
    /// node can still report a dead server as the volume's condition.
    known: Mutex<HashMap<String, VolumeMeta>>,
    /// Subdirectories claimed by creations in progress.
    claimed: Mutex<BTreeSet<String>>,
    /// Serialises the short steps that move directories into and out of the export's tree
    /// (claim checks, renames, removal of empty parents).
    tree: tokio::sync::Mutex<()>,
}

/// A subdirectory claimed by a creation in progress; released on drop.
struct Claim<'a> {
    pool: &'a NfsPool,
    subdir: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.pool.claimed.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.subdir);
    }
}

/// Whether two subdirectories are the same or one contains the other.
fn overlaps(a: &str, b: &str) -> bool {
    a == b || b.starts_with(&format!("{a}/")) || a.starts_with(&format!("{b}/"))
}

/// What a new volume is filled from, resolved to paths.
enum Fill {
    Empty,
    Archive(PathBuf),
    /// The source directory, opened without following symlinks, and its path for messages.
    Copy(std::os::fd::OwnedFd, PathBuf),
}

impl NfsPool {
    /// Opens the pool a `[[pool]]` table of kind `nfs` describes. Nothing is mounted yet: the
    /// export is mounted on first use, so a server that is down does not stop the plugin.
    pub fn new(cfg: &PoolConfig, exec: Arc<dyn Exec>) -> Result<NfsPool> {
        let name = cfg.name().to_owned();
        let bad = |m: String| Error::InvalidArgument(format!("nfs pool {name:?}: {m}"));
        let server = cfg.server.clone().ok_or_else(|| bad("`server` is required".into()))?;
        if server.is_empty() || server.contains(|c: char| c.is_whitespace() || matches!(c, '/' | ',' | '\0')) {
            return Err(bad(format!("server {server:?} is not a host name or address")));
        }
        let export = cfg.export.clone().ok_or_else(|| bad("`export` is required".into()))?;
        let export_path = export.trim_end_matches('/').to_owned();
        if !export.starts_with('/') || export.contains(['\0', ',']) || export.split('/').any(|c| c == ".." || c == ".") {
            return Err(bad(format!("export {export:?} must be an absolute path without '.' or '..' components")));
        }
        let options = cfg.mount_options.clone().unwrap_or_default();
        if let Some(o) = options.iter().find(|o| o.is_empty() || o.contains(',')) {
            return Err(bad(format!("mount option {o:?} must be one non-empty option (one list element per option)")));
        }
        let template = Template::parse(cfg.subdir.as_deref().unwrap_or(template::DEFAULT_TEMPLATE)).map_err(bad)?;
        let on_delete = OnDelete::parse(cfg.on_delete.as_deref().unwrap_or("delete")).map_err(|e| bad(e.to_string()))?;
        let source = format!("{server}:{}", if export_path.is_empty() { "/" } else { &export_path });
        Ok(NfsPool {
            export: Export {
                source,
                work: Path::new(WORK_ROOT).join(&name),
                options,
                // Replaced by the driver's (`with_mounter`).
                mounter: Arc::new(RealMounter::new(exec.clone())),
            },
            name,
            server,
            export_path,
            template,
            on_delete,
            topology: cfg.pool_topology.clone().unwrap_or_default(),
            exec,
            probe_timeout: PROBE_TIMEOUT,
            health: tokio::sync::Mutex::new(None),
            initialised: tokio::sync::OnceCell::new(),
            known: Mutex::new(HashMap::new()),
            claimed: Mutex::new(BTreeSet::new()),
            tree: tokio::sync::Mutex::new(()),
        })
    }

    /// Uses `dir` as the working mount point instead of `/run/holdfast/nfs/<pool>`.
    pub fn with_work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.export.work = dir.into();
        self
    }

    /// Reads the mount table through `mounter` (the driver's; a fake in tests).
    pub fn with_mounter(mut self, mounter: Arc<dyn Mounter>) -> Self {
        self.export.mounter = mounter;
        self
    }

    /// Gives the server `t` to answer a probe (tests).
    pub fn with_probe_timeout(mut self, t: Duration) -> Self {
        self.probe_timeout = t;
        self
    }

    /// The working mount point.
    pub fn work_dir(&self) -> &Path {
        &self.export.work
    }

    /// The mount source of a volume directory: `server:/export/<subdir>`.
    pub fn mount_source(&self, subdir: &str) -> String {
        format!("{}:{}/{subdir}", self.server, self.export_path)
    }

    fn missing(&self, local: &str) -> Error {
        Error::NotFound(format!("volume {local} does not exist in nfs pool {:?}", self.name))
    }

    /// Makes sure the export is mounted and answering (an answer from the last
    /// [`PROBE_TTL`] is reused, so a burst of calls probes once); returns its free bytes.
    async fn ensure(&self) -> Result<u64> {
        self.ensure_within(PROBE_TTL).await
    }

    /// [`NfsPool::ensure`], reusing only an answer younger than `max_age`.
    async fn ensure_within(&self, max_age: Duration) -> Result<u64> {
        let mut last = self.health.lock().await;
        if let Some((at, r)) = last.as_ref() {
            // A server that did not answer within the probe timeout is not asked again within
            // PROBE_TTL, whatever age the caller accepts: it would cost another whole timeout
            // and tell nothing new (a ControllerGetVolume on a dead hard mount read the
            // metadata, then probed again for the condition: 8-12 s instead of 4).
            let age = if r.is_err() { max_age.max(PROBE_TTL) } else { max_age };
            if at.elapsed() < age {
                return r.clone().map_err(Error::Unavailable);
            }
        }
        let r = self.export.ensure(self.exec.as_ref(), self.probe_timeout).await;
        // Only answers of the server are remembered; a local failure (bad config) is not news.
        match &r {
            Ok(free) => *last = Some((Instant::now(), Ok(*free))),
            Err(Error::Unavailable(m)) => *last = Some((Instant::now(), Err(m.clone()))),
            Err(_) => *last = None,
        }
        r
    }

    /// The export, mounted, answering, with the pool's directories in place.
    async fn ready(&self) -> Result<Layout> {
        self.ensure().await?;
        let layout = Layout::new(&self.export.work, &self.name);
        self.initialised
            .get_or_try_init(|| {
                let l = layout.clone();
                self.fs("creating the pool's directories on the export", move || l.init())
            })
            .await?;
        Ok(layout)
    }

    /// Runs blocking file operations on the export on the blocking pool, under a deadline: a
    /// server that stops answering mid-way makes this UNAVAILABLE instead of hanging the call
    /// (the blocked thread is left to finish when the server returns).
    async fn fs<T: Send + 'static>(&self, what: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        self.fs_within(what, FS_TIMEOUT, f).await
    }

    /// [`NfsPool::fs`] with its own deadline. A deadline that passes is remembered as the
    /// server's state, so the calls that follow answer at once instead of waiting again.
    async fn fs_within<T: Send + 'static>(
        &self,
        what: &str,
        deadline: Duration,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        match tokio::time::timeout(deadline, tokio::task::spawn_blocking(f)).await {
            Err(_) => {
                let m = format!("{what}: the NFS server of {} did not answer within {deadline:?}", self.export.source);
                *self.health.lock().await = Some((Instant::now(), Err(m.clone())));
                Err(Error::Unavailable(m))
            }
            Ok(Err(e)) => Err(Error::Internal(format!("{what}: the file operation task failed: {e}"))),
            Ok(Ok(r)) => r,
        }
    }

    /// Runs a command that works on volume data (tar, cp, rm).
    async fn run_data(&self, what: String, cmd: Cmd) -> Result<()> {
        self.exec.run(cmd.timeout(DATA_TIMEOUT)).await.map(|_| ()).context(|| what)
    }

    async fn read_volume(&self, layout: &Layout, local: &str) -> Result<Option<VolumeMeta>> {
        let path = layout.volume_meta(local);
        // A small file: a server that cannot give it within a probe's time is as good as down,
        // and the caller may answer from memory (NodeGetVolumeStats must not wait a minute).
        let meta = self.fs_within("reading volume metadata", self.probe_timeout, move || store::read_json::<VolumeMeta>(&path)).await?;
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        match &meta {
            Some(m) => known.insert(local.to_owned(), m.clone()),
            None => known.remove(local),
        };
        Ok(meta)
    }

    /// The volume's metadata; when the export cannot be read (server down, unexported), the
    /// last one read, so the node can still report such a volume as abnormal.
    async fn volume(&self, local: &str) -> Result<Option<VolumeMeta>> {
        check_local(local)?;
        let read = async {
            let layout = self.ready().await?;
            self.read_volume(&layout, local).await
        };
        match read.await {
            Err(e) => match self.known.lock().unwrap_or_else(|e| e.into_inner()).get(local) {
                Some(v) => {
                    tracing::debug!(pool = %self.name, local, "cannot read the export ({e}); answering from memory");
                    Ok(Some(v.clone()))
                }
                None => Err(e),
            },
            r => r,
        }
    }

    async fn read_snapshot(&self, layout: &Layout, local: &str) -> Result<Option<SnapshotMeta>> {
        let path = layout.snapshot_meta(local);
        self.fs("reading snapshot metadata", move || store::read_json::<SnapshotMeta>(&path)).await
    }

    async fn list_volume_metas(&self, layout: &Layout) -> Result<Vec<VolumeMeta>> {
        let dir = layout.volumes();
        self.fs("listing volumes", move || store::list_json::<VolumeMeta>(&dir)).await
    }

    /// Claims `subdir` for volume `local`, after checking that no other volume, creation in
    /// progress, or foreign directory occupies it or overlaps it. An existing directory that the
    /// intent of an earlier attempt of this volume names is that attempt's work: it is returned
    /// (with that intent) for the caller to commit or discard.
    ///
    /// Overlaps: a volume at the same place or above it is found through the owner records; a
    /// volume below it means the directory exists, which is refused unless it is ours.
    async fn claim(&self, layout: &Layout, local: &str, subdir: &str) -> Result<(Claim<'_>, Option<VolumeMeta>)> {
        let (l, sd, lo) = (layout.clone(), subdir.to_owned(), local.to_owned());
        if let Some(owner) = self.fs("looking up the owners of the volume's place", move || store::owner_above(&l, &sd, &lo)).await? {
            return Err(Error::AlreadyExists(format!(
                "directory {subdir:?} on the export of nfs pool {:?} overlaps {:?} of volume {}; \
                 the subdir template {:?} gives two volumes the same place",
                self.name,
                owner.subdir,
                owner.local,
                self.template.source()
            )));
        }
        {
            let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = claimed.iter().find(|c| overlaps(c, subdir)) {
                return Err(Error::Aborted(format!(
                    "directory {c:?} of nfs pool {:?} is being created by another request; retry",
                    self.name
                )));
            }
            claimed.insert(subdir.to_owned());
        }
        let claim = Claim { pool: self, subdir: subdir.to_owned() };
        let (data, intent) = (layout.data(subdir)?, layout.intent(local));
        let found =
            self.fs("inspecting the volume's place", move || Ok((store::entry(&data)?, store::read_json::<VolumeMeta>(&intent)?))).await?;
        match found {
            (Entry::Missing, _) => Ok((claim, None)),
            (_, Some(intent)) if intent.subdir == subdir => Ok((claim, Some(intent))),
            _ => Err(Error::FailedPrecondition(format!(
                "{} already exists on the export of nfs pool {:?} and belongs to no volume (data retained or archived \
                 from an earlier volume, or made by someone else); holdfast never takes it over: move it away, or change \
                 the subdir template",
                layout.root.join(subdir).display(),
                self.name
            ))),
        }
    }

    /// Resolves the request's source to what to fill the new directory from.
    async fn fill_of(&self, layout: &Layout, req: &CreateRequest) -> Result<Fill> {
        match &req.source {
            None => Ok(Fill::Empty),
            Some(Source::Snapshot(s)) => {
                check_local(s)?;
                let snap = self
                    .read_snapshot(layout, s)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("snapshot {s} does not exist in nfs pool {:?}", self.name)))?;
                self.check_fits(req, "snapshot", s, snap.info.size)?;
                Ok(Fill::Archive(layout.snapshot_archive(s)))
            }
            Some(Source::Volume(v)) => {
                let src = self.read_volume(layout, check_local(v)?).await?.ok_or_else(|| self.missing(v))?;
                self.check_fits(req, "volume", v, src.info.capacity)?;
                let (root, subdir) = (layout.root.clone(), src.subdir.clone());
                let shown = layout.root.join(&src.subdir);
                let fd = self.fs("opening the source volume", move || store::open_dir(&root, &subdir)).await?.ok_or_else(|| {
                    Error::FailedPrecondition(format!("the directory {} of source volume {v} is gone from the export", shown.display()))
                })?;
                Ok(Fill::Copy(fd, layout.root.join(&src.subdir)))
            }
        }
    }

    fn check_fits(&self, req: &CreateRequest, noun: &str, local: &str, min: u64) -> Result<()> {
        if req.capacity < min {
            return Err(Error::OutOfRange(format!(
                "volume {} cannot be {} when its source {noun} {local} holds {}: request at least the source's size",
                req.local,
                format_size(req.capacity),
                format_size(min)
            )));
        }
        Ok(())
    }

    /// Builds the new volume's directory at its temporary place.
    async fn build(&self, layout: &Layout, local: &str, fill: Fill, attrs: DirAttributes) -> Result<()> {
        let tmp = layout.tmp_volume(local);
        let t = tmp.clone();
        if self.fs("inspecting a leftover", move || store::entry(&t)).await? != Entry::Missing {
            self.remove_tree(&tmp).await?;
        }
        let tmp_s = tmp.to_string_lossy().into_owned();
        match fill {
            Fill::Empty => {
                let t = tmp.clone();
                let attrs = DirAttributes { mode: Some(attrs.mode.unwrap_or(DEFAULT_MODE)), ..attrs };
                return self
                    .fs("creating the volume directory", move || {
                        std::fs::create_dir(&t).context(|| format!("creating {}", t.display()))?;
                        store::set_attributes(&t, attrs.mode, attrs.uid, attrs.gid)
                    })
                    .await;
            }
            Fill::Archive(archive) => {
                let t = tmp.clone();
                self.fs("creating the volume directory", move || std::fs::create_dir(&t).context(|| format!("creating {}", t.display())))
                    .await?;
                // The archive's "." entry carries the source directory's mode and owner.
                let cmd = Cmd::new("tar")
                    .args(["--extract", "--file"])
                    .arg(archive.to_string_lossy())
                    .args(["--directory", &tmp_s])
                    .args(["--numeric-owner", "--same-owner", "--preserve-permissions", "--xattrs"]);
                self.run_data(format!("restoring snapshot archive {} into {tmp_s}", archive.display()), cmd).await?;
            }
            Fill::Copy(fd, shown) => {
                // Through the opened directory (`<fd>/.`: the directory itself, not the magic
                // link), so a source swapped for a symlink since it was opened redirects nothing.
                let src = format!("{}/.", store::child_path(&fd));
                let cmd = Cmd::new("cp").args(["--archive", "--sparse=always", "--no-target-directory", "--", &src, &tmp_s]);
                self.run_data(format!("copying volume directory {} to {tmp_s}", shown.display()), cmd).await?;
                drop(fd);
            }
        }
        if !attrs.is_empty() {
            let t = tmp.clone();
            self.fs("setting the volume directory's attributes", move || store::set_attributes(&t, attrs.mode, attrs.uid, attrs.gid))
                .await?;
        }
        Ok(())
    }

    /// Removes a directory tree that holdfast made (temporary or trash), staying on the export.
    async fn remove_tree(&self, path: &Path) -> Result<()> {
        let p = path.to_string_lossy().into_owned();
        let cmd = Cmd::new("rm").args(["--recursive", "--force", "--one-file-system", "--", &p]);
        self.run_data(format!("removing {p}"), cmd).await
    }

    /// Moves the built directory into place and commits the volume.
    async fn commit(&self, layout: &Layout, meta: &VolumeMeta) -> Result<()> {
        let _tree = self.tree.lock().await;
        let (l, m) = (layout.clone(), meta.clone());
        self.fs("committing the volume", move || {
            let local = &m.info.local;
            let intent = l.intent(local);
            store::write_json(&intent, &m)?;
            let data = l.data(&m.subdir)?;
            if store::entry(&data)? == Entry::Missing {
                store::make_parents(&l.root, &m.subdir)?;
                let tmp = l.tmp_volume(local);
                std::fs::rename(&tmp, &data).context(|| format!("moving {} to {}", tmp.display(), data.display()))?;
                store::sync_dir(data.parent().unwrap_or(&l.root))?;
            }
            // Where it landed must be a real directory inside the export, nothing else.
            store::check_inside(&l.root, &m.subdir)?;
            store::write_json(&l.path_owner(&m.subdir), &store::PathOwner { local: local.clone(), subdir: m.subdir.clone() })?;
            store::write_json(&l.volume_meta(local), &m)?;
            store::remove_file(&intent)
        })
        .await?;
        self.known.lock().unwrap_or_else(|e| e.into_inner()).insert(meta.info.local.clone(), meta.clone());
        Ok(())
    }

    /// Removes the temporary leftovers of a volume that is not being created.
    async fn clean_leftovers(&self, layout: &Layout, local: &str) -> Result<()> {
        let (tmp, trash, intent) = (layout.tmp_volume(local), layout.trash(local), layout.intent(local));
        let (t, tr) = (tmp.clone(), trash.clone());
        let (tmp_there, trash_there) = self.fs("inspecting leftovers", move || Ok((store::entry(&t)?, store::entry(&tr)?))).await?;
        if tmp_there != Entry::Missing {
            self.remove_tree(&tmp).await?;
        }
        if trash_there != Entry::Missing {
            self.remove_tree(&trash).await?;
        }
        self.fs("removing a leftover intent", move || store::remove_file(&intent)).await
    }
}

#[async_trait]
impl Pool for NfsPool {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> PoolKind {
        PoolKind::Nfs
    }

    fn default_fs(&self) -> &str {
        "nfs"
    }

    fn filesystems(&self) -> &'static [&'static str] {
        &["nfs"]
    }

    fn accepts_parameter(&self, key: &str) -> bool {
        matches!(
            key,
            PARAM_MODE | PARAM_UID | PARAM_GID | template::PARAM_PVC_NAME | template::PARAM_PVC_NAMESPACE | template::PARAM_PV_NAME
        )
    }

    fn multi_node(&self) -> bool {
        true
    }

    fn topology(&self) -> Option<Segments> {
        // Empty: reachable from everywhere.
        Some(self.topology.clone())
    }

    async fn create_volume(&self, req: &CreateRequest) -> Result<VolumeInfo> {
        let local = check_local(&req.local)?;
        if req.block {
            return Err(Error::InvalidArgument(format!(
                "nfs pool {:?} holds filesystem volumes only; a raw block volume needs a file, lvm or zfs pool",
                self.name
            )));
        }
        if let Some(fs) = req.fs_type.as_deref().filter(|f| *f != "nfs") {
            return Err(Error::InvalidArgument(format!("nfs pool {:?} serves nfs filesystems, not {fs:?}", self.name)));
        }
        // The mutable parameters (issue 12: modify) win over the StorageClass's.
        let mut dir_params = req.parameters.clone();
        dir_params.extend(req.mutable.clone());
        let attrs = DirAttributes::from_parameters(&dir_params)?;
        let subdir = self
            .template
            .expand(&req.csi_name, &req.parameters)
            .map_err(|e| Error::InvalidArgument(format!("volume {:?}: {e}", req.csi_name)))?;
        let layout = self.ready().await?;
        let info = VolumeInfo {
            local: local.to_owned(),
            csi_name: req.csi_name.clone(),
            capacity: req.capacity,
            block: false,
            fs_type: Some("nfs".into()),
            source: req.source.clone(),
            created: now(),
            uid: Some(req.uid.clone()),
            source_uid: req.source_uid.clone(),
            parameters: Some(req.parameters.clone()),
            mutable: req.mutable.clone(),
        };
        let same = |m: &VolumeMeta| m.info.conflicts_with(req).is_empty();
        if let Some(m) = self.read_volume(&layout, local).await? {
            let differences = m.info.conflicts_with(req);
            if differences.is_empty() {
                return Ok(m.info);
            }
            return Err(Error::AlreadyExists(format!(
                "volume {local} in nfs pool {:?} (directory {:?}) already exists for another request: {}",
                self.name,
                m.subdir,
                differences.join("; ")
            )));
        }
        let fill = self.fill_of(&layout, req).await?;
        let (_claim, earlier) = {
            let _tree = self.tree.lock().await;
            self.claim(&layout, local, &subdir).await?
        };
        if let Some(earlier) = earlier {
            // A previous attempt moved its directory into place and stopped before committing.
            if same(&earlier) {
                self.commit(&layout, &earlier).await?;
                return Ok(earlier.info);
            }
            let _tree = self.tree.lock().await;
            let (l, sd) = (layout.clone(), subdir.clone());
            let trash = layout.trash(local);
            let t = trash.clone();
            self.fs("discarding an uncommitted directory", move || {
                std::fs::rename(l.data(&sd)?, &t).context(|| format!("moving an uncommitted {sd:?} to {}", t.display()))
            })
            .await?;
            self.remove_tree(&trash).await?;
        }
        let meta = VolumeMeta { info, subdir, schema: Default::default() };
        let built = async {
            self.build(&layout, local, fill, attrs).await?;
            self.commit(&layout, &meta).await
        };
        if let Err(e) = built.await {
            if !matches!(e, Error::Unavailable(_)) {
                let _ = self.clean_leftovers(&layout, local).await;
            }
            return Err(e);
        }
        tracing::info!(pool = %self.name, local, subdir = %meta.subdir, capacity = meta.info.capacity, "created volume");
        Ok(meta.info)
    }

    async fn delete_volume(&self, local: &str) -> Result<()> {
        check_local(local)?;
        let layout = self.ready().await?;
        let Some(meta) = self.read_volume(&layout, local).await? else {
            return self.clean_leftovers(&layout, local).await;
        };
        let on_delete = self.on_delete;
        let (l, m) = (layout.clone(), meta.clone());
        let t = layout.trash(local);
        {
            let _tree = self.tree.lock().await;
            self.fs("deleting the volume", move || {
                let data = l.data(&m.subdir)?;
                // The directory is moved without following a symlink (one that replaced it is
                // refused); gone already (an earlier attempt moved it) leaves only the metadata.
                match on_delete {
                    OnDelete::Retain => {}
                    OnDelete::Delete => {
                        store::move_dir(&l.root, &m.subdir, &t)?;
                    }
                    OnDelete::Archive => {
                        let to = data.with_file_name(store::archived_name(&m.subdir, now()));
                        if store::move_dir(&l.root, &m.subdir, &to)? {
                            tracing::info!(from = %data.display(), to = %to.display(), "archived volume directory");
                        }
                    }
                }
                // The metadata goes last but before the slow removal: from here the volume is gone.
                store::remove_file(&l.volume_meta(&m.info.local))?;
                store::sync_dir(&l.volumes())?;
                let owner = l.path_owner(&m.subdir);
                if store::read_json::<store::PathOwner>(&owner)?.is_some_and(|o| o.local == m.info.local) {
                    store::remove_file(&owner)?;
                }
                if on_delete != OnDelete::Retain {
                    store::remove_empty_parents(&l.root, &m.subdir);
                }
                Ok(())
            })
            .await?;
        }
        self.known.lock().unwrap_or_else(|e| e.into_inner()).remove(local);
        self.clean_leftovers(&layout, local).await?;
        tracing::info!(pool = %self.name, local, subdir = %meta.subdir, on_delete = ?on_delete, "deleted volume");
        Ok(())
    }

    async fn get_volume(&self, local: &str) -> Result<Option<VolumeInfo>> {
        Ok(self.volume(local).await?.map(|m| m.info))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let layout = self.ready().await?;
        Ok(self.list_volume_metas(&layout).await?.into_iter().map(|m| m.info).collect())
    }

    async fn expand_volume(&self, local: &str, capacity: u64) -> Result<u64> {
        check_local(local)?;
        let layout = self.ready().await?;
        let mut meta = self.read_volume(&layout, local).await?.ok_or_else(|| self.missing(local))?;
        if capacity <= meta.info.capacity {
            return Ok(meta.info.capacity);
        }
        // Recorded only: NFS has no per-directory quota to raise.
        meta.info.capacity = capacity;
        let (path, m) = (layout.volume_meta(local), meta.clone());
        self.fs("recording the new capacity", move || store::write_json(&path, &m)).await?;
        self.known.lock().unwrap_or_else(|e| e.into_inner()).insert(local.to_owned(), meta);
        tracing::info!(pool = %self.name, local, capacity, "expanded volume (recorded; NFS enforces no quota)");
        Ok(capacity)
    }

    async fn create_snapshot(&self, source_local: &str, csi_name: &str, local: &str, uid: &str) -> Result<SnapshotInfo> {
        check_local(local)?;
        check_local(source_local)?;
        let layout = self.ready().await?;
        if let Some(s) = self.read_snapshot(&layout, local).await? {
            if s.info.csi_name == csi_name && s.info.source_volume == source_local {
                return Ok(s.info);
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot {local} in nfs pool {:?} already exists as {:?} of volume {}; this request asks for {csi_name:?} of volume {source_local}",
                self.name, s.info.csi_name, s.info.source_volume
            )));
        }
        let src = self.read_volume(&layout, source_local).await?.ok_or_else(|| self.missing(source_local))?;
        let (root, sd) = (layout.root.clone(), src.subdir.clone());
        let data = layout.root.join(&src.subdir);
        let shown = data.clone();
        // tar works in the directory opened here without following symlinks: swapping it for a
        // link afterwards cannot make the archive take anything else.
        let dir = self.fs("opening the source volume", move || store::open_dir(&root, &sd)).await?.ok_or_else(|| {
            Error::FailedPrecondition(format!("the directory {} of volume {source_local} is gone from the export", shown.display()))
        })?;
        let tmp = layout.tmp_archive(local);
        let tmp_s = tmp.to_string_lossy().into_owned();
        let cmd = Cmd::new("tar")
            .args(["--create", "--file", &tmp_s, "--directory"])
            .arg(store::child_path(&dir))
            .args(["--numeric-owner", "--xattrs", "--sparse", "--one-file-system", "."])
            .timeout(DATA_TIMEOUT);
        let archived = self.exec.run(cmd).await;
        drop(dir);
        match archived {
            Ok(_) => {}
            // GNU tar exits 1 when a file changed while it was read: the archive is complete, the
            // file as it was read (a live volume cannot be frozen on NFS).
            Err(ExecError::Failed { code: 1, stderr, .. }) => {
                tracing::warn!(pool = %self.name, local, source = source_local, stderr = %stderr.trim(), "files changed while being archived");
            }
            Err(e) => {
                let t = tmp.clone();
                let _ = self.fs("removing a partial archive", move || store::remove_file(&t)).await;
                return Err(Error::exec(format!("archiving volume {source_local} ({}) for snapshot {local}", data.display()), e));
            }
        }
        let info = SnapshotInfo {
            local: local.to_owned(),
            csi_name: csi_name.to_owned(),
            source_volume: source_local.to_owned(),
            size: src.info.capacity,
            created: now(),
            ready: true,
            uid: Some(uid.to_owned()),
            source_uid: src.info.uid.clone(),
            group: None,
        };
        let l = layout.clone();
        let (info2, subdir) = (info.clone(), src.subdir.clone());
        self.fs("committing the snapshot", move || {
            let archive = l.snapshot_archive(&info2.local);
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).context(|| format!("syncing {}", tmp.display()))?;
            let archive_bytes = std::fs::metadata(&tmp).context(|| format!("inspecting {}", tmp.display()))?.len();
            std::fs::rename(&tmp, &archive).context(|| format!("moving {} to {}", tmp.display(), archive.display()))?;
            store::write_json(
                &l.snapshot_meta(&info2.local),
                &SnapshotMeta { info: info2, archive_bytes, subdir, schema: Default::default() },
            )
        })
        .await?;
        tracing::info!(pool = %self.name, local, source = source_local, "created snapshot");
        Ok(info)
    }

    async fn delete_snapshot(&self, local: &str) -> Result<()> {
        check_local(local)?;
        let layout = self.ready().await?;
        let l = layout.clone();
        let local = local.to_owned();
        self.fs("deleting the snapshot", move || {
            store::remove_file(&l.snapshot_meta(&local))?;
            store::sync_dir(&l.snapshots())?;
            store::remove_file(&l.snapshot_archive(&local))?;
            store::remove_file(&l.tmp_archive(&local))
        })
        .await
    }

    async fn get_snapshot(&self, local: &str) -> Result<Option<SnapshotInfo>> {
        check_local(local)?;
        let layout = self.ready().await?;
        Ok(self.read_snapshot(&layout, local).await?.map(|s| s.info))
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let layout = self.ready().await?;
        let dir = layout.snapshots();
        Ok(self.fs("listing snapshots", move || store::list_json::<SnapshotMeta>(&dir)).await?.into_iter().map(|s| s.info).collect())
    }

    async fn capacity(&self) -> Result<u64> {
        self.ensure().await
    }

    async fn attach(&self, local: &str) -> Result<Attachment> {
        let meta = self.volume(local).await?.ok_or_else(|| self.missing(local))?;
        // The server resolves the mount path itself, following symlinks, so a volume directory
        // a workload replaced by a link to another directory would mount that one. Checked on
        // the working mount first, without following anything: such a volume is not staged.
        let layout = self.ready().await?;
        let (root, subdir) = (layout.root.clone(), meta.subdir.clone());
        let found = self.fs_within("checking the volume's directory", self.probe_timeout, move || store::open_dir(&root, &subdir)).await?;
        if found.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "the directory {} of volume {local} is gone from the export {}",
                meta.subdir, self.export.source
            )));
        }
        Ok(Attachment::Mount { source: self.mount_source(&meta.subdir), fs_type: "nfs".into(), options: self.export.options.clone() })
    }

    async fn detach(&self, _local: &str) -> Result<()> {
        Ok(())
    }

    async fn condition(&self, local: &str) -> Result<Condition> {
        let meta = self.volume(local).await?.ok_or_else(|| self.missing(local))?;
        // A health check wants a fresh answer: the server may have gone since the last probe.
        if let Err(e) = self.ensure_within(CONDITION_PROBE_AGE).await {
            return Ok(Condition::Abnormal(e.to_string()));
        }
        // In children under a deadline, since the server may stop answering at any moment:
        // lstat for the type (attributes may come from the client's cache), then statfs on the
        // directory itself, which always asks the server with the volume's own file handle (so
        // an unexported or re-exported directory shows, as it would on the node's mount).
        let path = self.export.work.join(&meta.subdir).to_string_lossy().into_owned();
        let problem = |e: ExecError| match e {
            ExecError::Timeout { .. } => format!("the NFS server of {} did not answer within {:?}", self.export.source, self.probe_timeout),
            e if export::is_missing(&e) => format!("the volume's directory {} is gone from the export {}", meta.subdir, self.export.source),
            e => format!("cannot inspect the volume's directory {} on {}: {e}", meta.subdir, self.export.source),
        };
        let kind = Cmd::new("stat").args(["--format=%F", "--", &path]).timeout(self.probe_timeout);
        match self.exec.run(kind).await {
            Ok(out) if out.stdout.trim() == "directory" => {}
            Ok(out) => {
                return Ok(Condition::Abnormal(format!("{} on the export is a {}, not a directory", meta.subdir, out.stdout.trim())));
            }
            Err(e) => return Ok(Condition::Abnormal(problem(e))),
        }
        let fresh = Cmd::new("stat").args(["--file-system", "--format=%a %S", "--", &path]).timeout(self.probe_timeout);
        if let Err(e) = self.exec.run(fresh).await {
            return Ok(Condition::Abnormal(problem(e)));
        }
        // `stat` follows symlinks above the directory; this does not (the server answered just now).
        let (root, subdir) = (self.export.work.clone(), meta.subdir.clone());
        Ok(match self.fs_within("checking the volume's directory", self.probe_timeout, move || store::open_dir(&root, &subdir)).await {
            Ok(Some(_)) => Condition::Healthy,
            Ok(None) => {
                Condition::Abnormal(format!("the volume's directory {} is gone from the export {}", meta.subdir, self.export.source))
            }
            Err(e) => Condition::Abnormal(e.to_string()),
        })
    }

    // issue 12: modify
    fn mutable_keys(&self) -> &'static [&'static str] {
        &[PARAM_MODE, PARAM_UID, PARAM_GID]
    }

    fn check_mutable(&self, _block: bool, _fs_type: Option<&str>, key: &str, value: &str) -> Result<()> {
        if !self.mutable_keys().contains(&key) {
            return Err(crate::pool::not_mutable(PoolKind::Nfs, key, self.mutable_keys()));
        }
        DirAttributes::from_parameters(&[(key.to_owned(), value.to_owned())].into()).map(|_| ())
    }

    /// `mode`, `uid`, `gid` of the volume's directory (itself, not what it holds), set through
    /// a descriptor opened beneath the export without following symlinks; a change of owner
    /// keeps the directory's mode (set-gid included).
    async fn modify_volume(&self, local: &str, key: &str, value: &str) -> Result<()> {
        check_local(local)?;
        self.check_mutable(false, None, key, value)?;
        let attrs = DirAttributes::from_parameters(&[(key.to_owned(), value.to_owned())].into())?;
        let layout = self.ready().await?;
        let mut meta = self.read_volume(&layout, local).await?.ok_or_else(|| self.missing(local))?;
        let (root, subdir) = (layout.root.clone(), meta.subdir.clone());
        self.fs("changing the volume directory's attributes", move || {
            use std::os::unix::fs::PermissionsExt;
            let fd = store::open_dir(&root, &subdir)?.ok_or_else(|| {
                Error::FailedPrecondition(format!("the directory {} of the volume is missing on the export", root.join(&subdir).display()))
            })?;
            let dir = std::fs::File::from(fd);
            let shown = root.join(&subdir);
            let mode = dir.metadata().context(|| format!("inspecting {}", shown.display()))?.permissions().mode() & 0o7777;
            if attrs.uid.is_some() || attrs.gid.is_some() {
                std::os::unix::fs::fchown(&dir, attrs.uid, attrs.gid).context(|| format!("changing the owner of {}", shown.display()))?;
            }
            let mode = attrs.mode.unwrap_or(mode);
            dir.set_permissions(std::fs::Permissions::from_mode(mode)).context(|| format!("setting mode {mode:o} on {}", shown.display()))
        })
        .await?;
        // Recorded once applied.
        meta.info.mutable.insert(key.to_owned(), value.to_owned());
        let (path, m) = (layout.volume_meta(local), meta.clone());
        {
            let _tree = self.tree.lock().await;
            self.fs("recording the volume's mutable parameters", move || store::write_json(&path, &m)).await?;
        }
        self.known.lock().unwrap_or_else(|e| e.into_inner()).insert(local.to_owned(), meta);
        tracing::info!(pool = %self.name, local, key, value, "modified volume directory");
        Ok(())
    }
}
