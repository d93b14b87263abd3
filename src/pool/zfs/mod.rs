//! The `zfs` pool: volumes are children of one parent dataset (`dataset`, created when missing).
//! A filesystem volume is a dataset with `mountpoint=legacy` and a `refquota` (or `quota`, with
//! `quota_mode = "quota"`) of its capacity, mounted by the node with `mount -t zfs`; a filesystem
//! volume asking for ext4, xfs or btrfs, and every raw block volume, is a zvol
//! (`/dev/zvol/<dataset>/<local>`, sparse with `sparse = true`) that the node formats when blank.
//! Everything holdfast knows about an object is stored in `holdfast:*` user properties
//! ([`report`]), read back with `zfs get -Hp`, so a restarted driver or a retried request finds
//! everything again; only objects carrying this pool's marker are ever listed, changed or
//! destroyed.
//!
//! Names: volume `local` is `<dataset>/<local>`; a snapshot is `<dataset>/<volume>@<local>`; a
//! clone of a volume is made from a hidden snapshot `<dataset>/<volume>@clone.<clone local>`.
//! Local names never contain `.`, so names with a `.` can never be taken for a volume or a
//! snapshot.
//!
//! Snapshots and clones: `zfs snapshot`; restoring a snapshot is a `zfs clone` of it, cloning a
//! volume a `zfs clone` of its hidden intermediate snapshot (destroyed with the clone). A zvol
//! copy is then grown to the requested size and its ext4/xfs/btrfs gets a new UUID, so the copy
//! mounts beside its source; until then it carries `holdfast:pending` and a retried create
//! finishes it. Zvols with mounted filesystems are snapshotted with those filesystems frozen,
//! through [`crate::node::freeze`] and its one policy.
//!
//! Deleting what others depend on: a ZFS clone needs its origin snapshot, and a snapshot its
//! dataset. So a volume that still has CSI snapshots, or snapshots that clones were made from,
//! is not destroyed: DeleteVolume succeeds, and the dataset is renamed to
//! `<dataset>/<local>.deleted-<guid>`, hidden from every listing and lookup (the name is free
//! again at once), until its last dependent is gone. Likewise a snapshot that clones were made
//! from is renamed to `…@<local>.deleted-<guid>` and marked for deferred destruction
//! (`zfs destroy -d`): ZFS destroys it with its last clone. After every delete, hidden volumes
//! that nothing depends on any more are destroyed. Nothing is ever destroyed with `-r` or `-R`:
//! the snapshots holdfast made of a volume are destroyed one by one, then the volume, so data
//! another volume depends on never goes, and a child dataset or snapshot someone made by hand
//! beneath a volume makes DeleteVolume FAILED_PRECONDITION, naming it.
//!
//! A record names its own object (`holdfast:local`): `holdfast:*` properties copied onto another
//! dataset, zvol or snapshot do not make it a second copy of the volume (it is not ours, and
//! left alone).
//!
//! Sizes: capacities are whole MiB; a zvol's `volsize` must be a multiple of its
//! `volblocksize` (at most 128 KiB), so it always is. Datasets are thin (a quota reserves
//! nothing); non-sparse zvols reserve their size (`refreservation`).

pub mod command;
mod copy;
mod destroy;
mod health;
pub mod mutable;
pub mod properties;
pub mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::config::{PoolConfig, format_size};
use crate::error::{Context, Error, Result};
use crate::exec::{Cmd, Exec, ExecError};
use crate::node::freeze::{Freezer, Target};
use crate::pool::{Attachment, Condition, CreateRequest, GroupMember, GroupMembership, MIB, Pool, SnapshotInfo, Source, VolumeInfo};
use crate::volume_id::{PoolKind, legacy_local_name, valid_local_name};

use copy::SnapshotError;
use properties::AppliesTo;
use report::{Kind, Meta, Object, ObjectType};

/// How long `attach` waits for udev to create `/dev/zvol/<dataset>/<local>`.
const DEVICE_WAIT: Duration = Duration::from_secs(20);
/// What to check when a zvol's device node does not appear.
const ZVOL_HINT: &str = "; is udev running (udevadm settle), and is the zvol's volmode dev or full?";
/// How long a zpool health reading is reused (ListVolumes asks once per volume).
const HEALTH_TTL: Duration = Duration::from_secs(5);
/// The infix of hidden (deleted, still depended on) volumes and snapshots.
pub const HIDDEN: &str = ".deleted-";
/// The snapshot-name prefix of the intermediate snapshot a clone of a volume is made from.
pub const INTERMEDIATE: &str = "clone.";
/// Longest parent dataset name: ZFS names hold 255 bytes, and a hidden snapshot of a hidden
/// volume adds up to `/` + 40 + `.deleted-` + 20 digits + `@` + 40 + `.deleted-` + 20 digits.
const MAX_DATASET_LEN: usize = 100;
/// Filesystems of filesystem volumes: `zfs` is a dataset, the others a formatted zvol.
pub const FILESYSTEMS: [&str; 4] = ["zfs", "ext4", "xfs", "btrfs"];
/// How many rounds [`ZfsPool::sweep`] goes (each can free the origin of the previous one's).
const SWEEP_ROUNDS: usize = 8;

/// Which quota holds a dataset volume to its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// `refquota`: the volume's own data; snapshots do not eat into it (the default).
    Refquota,
    /// `quota`: data and snapshots together.
    Quota,
}

impl QuotaMode {
    /// The ZFS property.
    pub fn property(self) -> &'static str {
        match self {
            QuotaMode::Refquota => "refquota",
            QuotaMode::Quota => "quota",
        }
    }
}

/// A ZFS pool.
pub struct ZfsPool {
    name: String,
    dataset: String,
    zpool: String,
    properties: BTreeMap<String, String>,
    quota_mode: QuotaMode,
    sparse: bool,
    default_fs: String,
    exec: Arc<dyn Exec>,
    health: Mutex<Option<(Instant, Option<String>)>>,
    /// Freezes the filesystems on zvols around snapshots (the driver's, shared by its pools).
    freezer: Arc<Freezer>,
}

impl std::fmt::Debug for ZfsPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZfsPool").field("name", &self.name).field("dataset", &self.dataset).finish()
    }
}

/// ZFS dataset names: components of `[A-Za-z0-9_.:-]` separated by `/`, the first (the zpool)
/// starting with a letter, no `.`/`..` components.
pub fn valid_dataset_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_DATASET_LEN
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.split('/').all(|c| {
            !c.is_empty() && c != "." && c != ".." && c.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | ':' | '-'))
        })
}

fn bad_parameter(key: &str) -> Error {
    Error::InvalidArgument(format!(
        "StorageClass parameter {key:?} is not a ZFS property holdfast lets StorageClasses set (allowed: {})",
        properties::keys(&properties::PARAMETERS)
    ))
}

impl ZfsPool {
    /// A pool over the parent dataset of `cfg`. Checks the names, properties and options;
    /// whether the zpool exists is found out (and said) by the first operation.
    pub fn new(cfg: &PoolConfig, exec: Arc<dyn Exec>) -> Result<ZfsPool> {
        let name = cfg.name().to_owned();
        let bad = |m: String| Error::InvalidArgument(format!("pool {name:?}: {m}"));
        let dataset = cfg.dataset.clone().ok_or_else(|| bad("a zfs pool needs `dataset`".into()))?;
        let dataset = dataset.trim_end_matches('/').to_owned();
        if !valid_dataset_name(&dataset) {
            return Err(bad(format!(
                "dataset {dataset:?} is not a ZFS dataset name (POOL/PATH of A-Z a-z 0-9 _ . : -, at most {MAX_DATASET_LEN} characters)"
            )));
        }
        let zpool = dataset.split('/').next().unwrap_or_default().to_owned();
        let mut props = BTreeMap::new();
        for (k, v) in cfg.properties.clone().unwrap_or_default() {
            if properties::config_property(&k).is_none() {
                return Err(bad(format!(
                    "property {k:?} cannot be set from the config: holdfast sets mountpoint, quotas, volsize and reservations itself; \
                     allowed: {}, {}",
                    properties::keys(&properties::PARAMETERS),
                    properties::keys(&properties::CONFIG_ONLY)
                )));
            }
            properties::check_value(&k, &v).map_err(bad)?;
            props.insert(k, v);
        }
        let quota_mode = match cfg.quota_mode.as_deref() {
            None | Some("refquota") => QuotaMode::Refquota,
            Some("quota") => QuotaMode::Quota,
            Some(other) => return Err(bad(format!("quota_mode {other:?} must be \"refquota\" or \"quota\""))),
        };
        let default_fs = cfg.default_fs.clone().unwrap_or_else(|| "zfs".to_owned());
        if !FILESYSTEMS.contains(&default_fs.as_str()) {
            return Err(bad(format!("default_fs {default_fs:?} must be one of {FILESYSTEMS:?}")));
        }
        Ok(ZfsPool {
            name,
            dataset,
            zpool,
            properties: props,
            quota_mode,
            sparse: cfg.sparse.unwrap_or(false),
            default_fs,
            freezer: Arc::new(Freezer::unrecorded(exec.clone())),
            exec,
            health: Mutex::new(None),
        })
    }

    /// Freezes with `freezer` (the driver's: recorded, shared by its pools); the one made by
    /// `new` keeps no records.
    pub fn with_freezer(mut self, freezer: Arc<Freezer>) -> Self {
        self.freezer = freezer;
        self
    }

    /// The parent dataset.
    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    /// The dataset or zvol of volume `local`.
    pub fn volume_dataset(&self, local: &str) -> String {
        format!("{}/{local}", self.dataset)
    }

    /// The device node of zvol `name` (a full dataset name).
    pub fn zvol_device(name: &str) -> PathBuf {
        PathBuf::from(format!("/dev/zvol/{name}"))
    }

    fn pool_missing(&self) -> Error {
        Error::FailedPrecondition(format!(
            "zpool {:?} of pool {:?} does not exist or is not imported on this node: create or import it (zpool create / zpool import), \
             or fix dataset in the config",
            self.zpool, self.name
        ))
    }

    async fn run(&self, cmd: Cmd) -> std::result::Result<String, ExecError> {
        self.exec.run(cmd).await.map(|o| o.stdout)
    }

    /// One object (depth 0) of `types`; `None` when it does not exist.
    async fn read(&self, target: &str, types: &str) -> Result<Option<Object>> {
        match self.run(command::get(target, types, 0)).await {
            Ok(out) => {
                let objects = report::parse_get(&out).map_err(|e| Error::Internal(format!("reading ZFS {target}: {e}")))?;
                Ok(objects.into_iter().find(|o| o.name == target))
            }
            Err(e) if command::is_missing(&e) => Ok(None),
            Err(e) if command::is_no_pool(&e) => Err(self.pool_missing()),
            Err(e) => Err(Error::exec(format!("reading ZFS {target}"), e)),
        }
    }

    /// The parent dataset and its descendants of `types` down to `depth`; empty when the parent
    /// does not exist yet.
    async fn tree(&self, types: &str, depth: u32) -> Result<Vec<Object>> {
        match self.run(command::get(&self.dataset, types, depth)).await {
            Ok(out) => report::parse_get(&out).map_err(|e| Error::Internal(format!("listing ZFS {}: {e}", self.dataset))),
            Err(e) if command::is_missing(&e) => Ok(Vec::new()),
            Err(e) if command::is_no_pool(&e) => Err(self.pool_missing()),
            Err(e) => Err(Error::exec(format!("listing the datasets under {}", self.dataset), e)),
        }
    }

    /// Whether `o` is a direct child of the parent dataset (or a snapshot of one).
    fn is_child(&self, o: &Object) -> bool {
        o.dataset().strip_prefix(self.dataset.as_str()).and_then(|r| r.strip_prefix('/')).is_some_and(|leaf| !leaf.contains('/'))
    }

    /// This pool's holdfast record of `o` when it is one of this pool's objects of type `object`;
    /// `Err` when it carries this pool's marker but its record is damaged.
    fn ours(&self, o: &Object, object: ObjectType) -> std::result::Result<Option<Meta>, String> {
        if !self.is_child(o) {
            return Ok(None);
        }
        let Some(meta) = report::decode_meta(o)? else {
            return Ok(None);
        };
        if meta.pool != self.name || meta.object != object {
            return Ok(None);
        }
        if !names_itself(o, &meta) {
            tracing::warn!(pool = %self.name, object = %o.name, record_of = %meta.local, csi_name = %meta.csi_name,
                "ZFS object carries a holdfast record of another object (copied properties?); it is not ours, leaving it alone");
            return Ok(None);
        }
        Ok(Some(meta))
    }

    /// The record of a live volume (not hidden): ours, a dataset or zvol, named by a local name.
    fn live_volume(&self, o: &Object) -> std::result::Result<Option<Meta>, String> {
        if !matches!(o.kind, Kind::Filesystem | Kind::Volume) || !valid_local_name(o.leaf()) {
            return Ok(None);
        }
        self.ours(o, ObjectType::Volume)
    }

    /// The record of a live snapshot: ours, named by a local name, not hidden or being destroyed.
    fn live_snapshot(&self, o: &Object) -> std::result::Result<Option<Meta>, String> {
        if o.kind != Kind::Snapshot || o.defer_destroy || !o.snapshot_name().is_some_and(valid_local_name) {
            return Ok(None);
        }
        self.ours(o, ObjectType::Snapshot)
    }

    fn damaged(o: &Object, e: String) -> Error {
        Error::Internal(format!(
            "ZFS {} carries the holdfast marker but its holdfast:* properties are damaged ({e}); fix them (zfs set) or remove it by hand",
            o.name
        ))
    }

    /// Volume `local`; `None` when there is none (a dataset of that name that is not ours
    /// counts as none, with a warning).
    async fn find_volume(&self, local: &str) -> Result<Option<(Object, Meta)>> {
        if !valid_local_name(local) {
            return Ok(None);
        }
        let Some(o) = self.read(&self.volume_dataset(local), command::DATASETS).await? else {
            return Ok(None);
        };
        match self.live_volume(&o) {
            Ok(Some(meta)) => Ok(Some((o, meta))),
            Ok(None) => {
                tracing::warn!(pool = %self.name, dataset = %o.name, "ZFS dataset exists but is not a volume of this pool; leaving it alone");
                Ok(None)
            }
            Err(e) => Err(Self::damaged(&o, e)),
        }
    }

    /// Snapshot `local`, wherever its volume is (also under a hidden volume).
    async fn find_snapshot(&self, local: &str) -> Result<Option<(Object, Meta)>> {
        if !valid_local_name(local) {
            return Ok(None);
        }
        for o in self.tree(command::SNAPSHOTS, 2).await? {
            if o.snapshot_name() != Some(local) {
                continue;
            }
            match self.live_snapshot(&o) {
                Ok(Some(meta)) => return Ok(Some((o, meta))),
                Ok(None) => {}
                Err(e) => return Err(Self::damaged(&o, e)),
            }
        }
        Ok(None)
    }

    fn volume_info(o: &Object, meta: Meta) -> VolumeInfo {
        VolumeInfo {
            local: o.leaf().to_owned(),
            csi_name: meta.csi_name,
            capacity: o.capacity(),
            block: meta.block,
            fs_type: meta.fs_type,
            source: meta.source,
            created: o.creation,
            uid: meta.uid,
            source_uid: meta.source_uid,
            parameters: meta.parameters,
            mutable: meta.mutable,
        }
    }

    fn snapshot_info(o: &Object, meta: Meta) -> SnapshotInfo {
        let source_volume = match meta.source {
            Some(Source::Volume(v)) => v,
            _ => String::new(),
        };
        SnapshotInfo {
            local: o.snapshot_name().unwrap_or_default().to_owned(),
            csi_name: meta.csi_name,
            source_volume,
            size: if meta.size > 0 { meta.size } else { o.volsize },
            created: o.creation,
            ready: true,
            uid: meta.uid,
            source_uid: meta.source_uid,
            group: meta.group,
        }
    }

    /// Whether a request makes a zvol (raw block, or ext4/xfs/btrfs) or a dataset (`zfs`), and
    /// the filesystem recorded for it.
    fn layout(req: &CreateRequest) -> Result<(bool, Option<String>)> {
        if req.block {
            return Ok((true, None));
        }
        match req.fs_type.as_deref() {
            None | Some("zfs") => Ok((false, Some("zfs".to_owned()))),
            Some(fs) if crate::node::format::SUPPORTED_FS.contains(&fs) => Ok((true, Some(fs.to_owned()))),
            Some(fs) => Err(Error::InvalidArgument(format!(
                "filesystem {fs:?} is not served by a zfs pool: use zfs (a dataset) or one of {:?} (a zvol)",
                crate::node::format::SUPPORTED_FS
            ))),
        }
    }

    /// The tuning properties of a new object: the config's, overridden by StorageClass
    /// parameters, those that apply to a zvol (`zvol`) or a dataset; a clone leaves out the
    /// ones it inherits from its origin.
    pub fn tuning(&self, parameters: &BTreeMap<String, String>, zvol: bool, clone: bool) -> Result<Vec<(String, String)>> {
        let mut chosen: BTreeMap<String, (String, AppliesTo)> = BTreeMap::new();
        for (k, v) in &self.properties {
            let applies = properties::config_property(k).unwrap_or(AppliesTo::Both);
            chosen.insert(k.clone(), (v.clone(), applies));
        }
        for (k, v) in parameters {
            let applies = properties::parameter(k).ok_or_else(|| bad_parameter(k))?;
            properties::check_value(k, v).map_err(Error::InvalidArgument)?;
            chosen.insert(k.clone(), (v.clone(), applies));
        }
        Ok(chosen
            .into_iter()
            .filter(|(k, (_, applies))| properties::applies(*applies, zvol) && !(clone && properties::CREATE_ONLY.contains(&k.as_str())))
            .map(|(k, (v, _))| (k, v))
            .collect())
    }

    fn new_meta(&self, req: &CreateRequest, fs_type: Option<String>, pending: bool) -> Meta {
        Meta {
            pool: self.name.clone(),
            object: ObjectType::Volume,
            local: req.local.clone(),
            csi_name: req.csi_name.clone(),
            capacity: req.capacity,
            block: req.block,
            fs_type,
            source: req.source.clone(),
            size: 0,
            pending,
            uid: Some(req.uid.clone()),
            source_uid: req.source_uid.clone(),
            parameters: Some(req.parameters.clone()),
            mutable: req.mutable.clone(),
            group: None,
        }
    }

    /// The properties of a new dataset volume (or dataset clone) of `capacity` bytes.
    fn dataset_properties(&self, capacity: u64, tuning: Vec<(String, String)>, meta: &Meta) -> Vec<(String, String)> {
        let mut p = vec![("mountpoint".to_owned(), "legacy".to_owned()), (self.quota_mode.property().to_owned(), capacity.to_string())];
        p.extend(tuning);
        p.extend(meta.properties());
        p
    }

    // issue 12: modify
    /// `tuning` with the native properties of a create's mutable parameters (checked again:
    /// they decide the object), which win over the StorageClass's and the config's.
    pub(super) fn with_mutable(&self, mut tuning: Vec<(String, String)>, req: &CreateRequest, zvol: bool) -> Result<Vec<(String, String)>> {
        let mut extra = Vec::new();
        for (k, v) in &req.mutable {
            mutable::check(k, v, zvol)?;
            extra.push(mutable::native(k, v, zvol, req.capacity));
        }
        mutable::merge(&mut tuning, extra);
        Ok(tuning)
    }

    /// Creates the parent dataset (and missing ancestors) when it is missing.
    async fn ensure_parent(&self) -> Result<()> {
        match self.run(command::create_parent(&self.dataset)).await {
            Ok(_) => {
                tracing::info!(pool = %self.name, dataset = %self.dataset, "created the parent dataset");
                Ok(())
            }
            Err(e) if command::is_exists(&e) => Ok(()),
            Err(e) if command::is_no_pool(&e) => Err(self.pool_missing()),
            Err(e) => Err(Error::exec(format!("creating the parent dataset {} of pool {:?}", self.dataset, self.name), e)),
        }
    }

    /// Runs a create or clone of volume `name`. `Ok(Some)`: it already existed and matches (a
    /// retry that raced); `Ok(None)`: created.
    async fn run_create(&self, cmd: Cmd, name: &str, req: &CreateRequest) -> Result<Option<VolumeInfo>> {
        let mut result = self.run(cmd.clone()).await;
        if matches!(&result, Err(e) if command::is_no_parent(e)) {
            self.ensure_parent().await?;
            result = self.run(cmd).await;
        }
        match result {
            Ok(_) => {
                tracing::info!(pool = %self.name, dataset = %name, csi_name = %req.csi_name, capacity = req.capacity, "created ZFS volume");
                Ok(None)
            }
            Err(e) if command::is_exists(&e) => match self.read(name, command::DATASETS).await? {
                Some(found) => self.existing_volume(req, found).await.map(Some),
                None => Err(Error::Aborted(format!("ZFS {name} was created and destroyed at the same time; retry"))),
            },
            Err(e) if command::is_no_space(&e) => Err(Error::ResourceExhausted(format!(
                "no room for {} in {} of pool {:?}: {}",
                format_size(req.capacity),
                self.dataset,
                self.name,
                e.stderr().trim()
            ))),
            Err(e) if command::is_no_pool(&e) => Err(self.pool_missing()),
            Err(e) if command::is_bad_property(&e) => Err(Error::InvalidArgument(format!(
                "ZFS refused a property of volume {:?} (from the StorageClass parameters or the pool's properties): {}",
                req.csi_name,
                e.stderr().trim()
            ))),
            Err(e) => Err(Error::exec(format!("creating ZFS {name} for volume {:?}", req.csi_name), e)),
        }
    }

    /// A create found an object of the name: the same request (Ok, finishing an interrupted
    /// copy) or a conflict.
    async fn existing_volume(&self, req: &CreateRequest, o: Object) -> Result<VolumeInfo> {
        let meta = match self.live_volume(&o) {
            Ok(Some(m)) => m,
            _ => {
                return Err(Error::AlreadyExists(format!(
                    "ZFS {} already exists and is not a volume of holdfast pool {:?}; rename or destroy it, or use another name",
                    o.name, self.name
                )));
            }
        };
        let (_, fs_type) = Self::layout(req)?;
        // The capacity the volume was requested with is compared (the object may be rounded),
        // and the filesystem as this pool resolves the request's.
        let recorded = VolumeInfo { capacity: meta.capacity, ..Self::volume_info(&o, meta.clone()) };
        let mut differences = recorded.conflicts_with(&CreateRequest { fs_type: fs_type.clone(), ..req.clone() });
        if !req.block && meta.fs_type.is_none() {
            differences.push("its filesystem is not recorded".to_owned());
        }
        if !differences.is_empty() {
            return Err(Error::AlreadyExists(format!(
                "volume {:?} already exists in pool {:?} for another request: {}",
                req.csi_name,
                self.name,
                differences.join("; ")
            )));
        }
        if meta.pending {
            self.finish_copy(&o, req.capacity, req.block).await?;
            return self.read_volume(&o.name).await;
        }
        Ok(Self::volume_info(&o, meta))
    }

    /// Reads back a volume this pool just made.
    /// Attaches volume `local`, found as `o` with record `meta`.
    async fn attach_object(&self, local: &str, o: Object, meta: Meta) -> Result<Attachment> {
        if meta.pending {
            return Err(Error::FailedPrecondition(format!("volume {local:?} is an unfinished copy; retry its creation first")));
        }
        match o.kind {
            Kind::Volume => {
                let device = Self::zvol_device(&o.name);
                crate::pool::wait_for_device(&device, DEVICE_WAIT, ZVOL_HINT).await?;
                Ok(Attachment::Device(device))
            }
            _ => Ok(Attachment::Mount { source: o.name.clone(), fs_type: "zfs".to_owned(), options: Vec::new() }),
        }
    }

    async fn read_volume(&self, name: &str) -> Result<VolumeInfo> {
        let found = self.read(name, command::DATASETS).await?;
        match found.as_ref().map(|o| (o, self.live_volume(o))) {
            Some((o, Ok(Some(meta)))) => Ok(Self::volume_info(o, meta)),
            _ => Err(Error::Internal(format!("ZFS {name} vanished or lost its holdfast properties right after it was made"))),
        }
    }
}

/// The local name an object's own ZFS name gives it for a record of type `object`: a volume's
/// leaf, a snapshot's name, an intermediate snapshot's clone, without a hidden suffix.
fn own_local(o: &Object, object: ObjectType) -> Option<&str> {
    let name = match object {
        ObjectType::Volume => o.leaf(),
        ObjectType::Snapshot => o.snapshot_name()?,
        ObjectType::Intermediate => o.snapshot_name()?.strip_prefix(INTERMEDIATE)?,
    };
    Some(name.split_once(HIDDEN).map_or(name, |(l, _)| l))
}

/// Whether the record `meta` found on `o` is the record of `o` itself, not one copied from
/// another volume or snapshot (`zfs get` + `zfs set` of the `holdfast:*` properties): it names
/// `o`'s local name, and a snapshot's record names the volume `o` is a snapshot of. Records
/// written before the local name was stored are held to the name holdfast derives from their
/// CSI name.
fn names_itself(o: &Object, meta: &Meta) -> bool {
    let Some(own) = own_local(o, meta.object) else {
        return false;
    };
    let named = match (meta.local.as_str(), meta.object) {
        ("", ObjectType::Intermediate) => true,
        ("", _) => legacy_local_name(&meta.csi_name) == own,
        (l, _) => l == own,
    };
    let of_its_volume = match (&meta.object, &meta.source) {
        (ObjectType::Snapshot, Some(Source::Volume(v))) => {
            let leaf = o.leaf();
            v == leaf.split_once(HIDDEN).map_or(leaf, |(l, _)| l)
        }
        _ => true,
    };
    named && of_its_volume
}

#[async_trait]
impl Pool for ZfsPool {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> PoolKind {
        PoolKind::Zfs
    }

    fn default_fs(&self) -> &str {
        &self.default_fs
    }

    fn accepts_parameter(&self, key: &str) -> bool {
        properties::parameter(key).is_some()
    }

    fn filesystems(&self) -> &'static [&'static str] {
        &FILESYSTEMS
    }

    async fn create_volume(&self, req: &CreateRequest) -> Result<VolumeInfo> {
        if !valid_local_name(&req.local) {
            return Err(Error::InvalidArgument(format!("{:?} is not a valid local volume name", req.local)));
        }
        let (zvol, fs_type) = Self::layout(req)?;
        // Parameters are checked before anything is looked up or made.
        let tuning = self.tuning(&req.parameters, zvol, req.source.is_some())?;
        let name = self.volume_dataset(&req.local);
        if let Some(source) = &req.source {
            if let Some(o) = self.read(&name, command::DATASETS).await? {
                return self.existing_volume(req, o).await;
            }
            return self.create_copy(req, source, zvol, fs_type).await;
        }
        // issue 14: a new volume is not looked up before `zfs create`: ZFS refuses a name that
        // exists ("dataset already exists", before it makes anything), and `run_create` then
        // reads what is there and answers as a lookup would have (the same volume, or
        // ALREADY_EXISTS for anything else). One `zfs get` fewer per create.
        let meta = self.new_meta(req, fs_type, false);
        let tuning = self.with_mutable(tuning, req, zvol)?;
        let cmd = if zvol {
            let mut props = tuning;
            props.extend(meta.properties());
            command::create_zvol(&name, req.capacity, self.sparse, &props)
        } else {
            command::create_dataset(&name, &self.dataset_properties(req.capacity, tuning, &meta))
        };
        if let Some(existing) = self.run_create(cmd, &name, req).await? {
            return Ok(existing);
        }
        self.read_volume(&name).await
    }

    async fn delete_volume(&self, local: &str) -> Result<()> {
        let Some((o, meta)) = self.find_volume(local).await? else {
            return Ok(());
        };
        if let Some(why) = Self::in_use(&o) {
            return Err(Error::FailedPrecondition(format!(
                "volume {:?} cannot be deleted: {why}; unpublish and unstage it first",
                meta.csi_name
            )));
        }
        let below = match self.run(command::get_tree(&o.name, command::ALL)).await {
            Ok(out) => report::parse_get(&out).map_err(|e| Error::Internal(format!("listing what lies beneath ZFS {}: {e}", o.name)))?,
            Err(e) if command::is_missing(&e) => return Ok(()),
            Err(e) => return Err(Error::exec(format!("listing what lies beneath ZFS {}", o.name), e)),
        };
        // Hiding or destroying the volume would take what someone else made beneath it along.
        let (own, foreign) = self.classify(&o, &below);
        if !foreign.is_empty() {
            const SHOWN: usize = 5;
            let more = if foreign.len() > SHOWN { format!(" and {} more", foreign.len() - SHOWN) } else { String::new() };
            return Err(Error::FailedPrecondition(format!(
                "volume {} cannot be deleted: ZFS {} holds {}{more}, which holdfast did not make and never destroys; \
                 move (zfs rename) or destroy them by hand, then retry",
                crate::error::bounded(&meta.csi_name),
                o.name,
                foreign.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let snapshots: Vec<&Object> = below.iter().filter(|s| s.kind == Kind::Snapshot && s.dataset() == o.name).collect();
        let dependents = self.dependents(&snapshots);
        if dependents.is_empty() {
            self.destroy_volume(&o, &own, &format!("volume {:?}", meta.csi_name)).await?;
            if let Some(origin) = &o.origin {
                self.drop_intermediate(origin).await;
            }
        } else {
            let hidden = format!("{}{HIDDEN}{}", o.name, o.guid);
            match self.run(command::rename(&o.name, &hidden)).await {
                Ok(_) => {}
                Err(e) if command::is_missing(&e) => return Ok(()),
                Err(e) => return Err(Error::exec(format!("hiding the deleted volume {:?} (ZFS {})", meta.csi_name, o.name), e)),
            }
            tracing::info!(pool = %self.name, dataset = %o.name, hidden = %hidden, dependents = ?dependents,
                "volume deleted; its data is kept (hidden) until its dependents are gone");
        }
        if let Err(e) = self.sweep().await {
            tracing::warn!(pool = %self.name, "cleaning up deleted volumes: {e}");
        }
        Ok(())
    }

    async fn survey(&self, names: &[&str]) -> Result<crate::pool::Survey> {
        // issue 14: one `zfs get` of the parent and of the dataset under each name answers a
        // create's retry check for every name and its placement (the parent's `available`,
        // as `capacity` reads it), where one `zfs get` per name and one of `available` ran.
        let wanted: Vec<(usize, String)> =
            names.iter().enumerate().filter(|(_, l)| valid_local_name(l)).map(|(i, l)| (i, self.volume_dataset(l))).collect();
        let mut targets = vec![self.dataset.clone()];
        targets.extend(wanted.iter().map(|(_, d)| d.clone()));
        let (out, missing) = match self.exec.run(command::get_each(&targets, command::DATASETS)).await {
            Ok(out) => (out.stdout, Vec::new()),
            Err(e) if command::is_no_pool(&e) => return Err(self.pool_missing()),
            Err(e) => match (command::missing_targets(&e), e) {
                (Some(missing), crate::exec::ExecError::Failed { stdout, .. }) => (stdout, missing),
                _ => return crate::pool::survey_by_lookups(self, names).await,
            },
        };
        let objects = report::parse_get(&out).map_err(|e| Error::Internal(format!("reading ZFS {}: {e}", targets.join(" "))))?;
        // Every target is either reported or said to be missing; anything else (another zfs
        // than the one this was written against) is asked one name at a time, as before.
        if !targets.iter().all(|t| objects.iter().any(|o| o.name == *t) ^ missing.contains(t)) {
            tracing::warn!(pool = %self.name, "zfs get of several datasets answered unexpectedly; looking them up one by one");
            return crate::pool::survey_by_lookups(self, names).await;
        }
        let mut found = None;
        for (i, dataset) in &wanted {
            let Some(o) = objects.iter().find(|o| o.name == *dataset) else { continue };
            match self.live_volume(o) {
                Ok(Some(meta)) => {
                    found = Some((*i, Self::volume_info(o, meta)));
                    break;
                }
                Ok(None) => {
                    tracing::warn!(pool = %self.name, dataset = %o.name, "ZFS dataset exists but is not a volume of this pool; leaving it alone")
                }
                Err(e) => return Err(Self::damaged(o, e)),
            }
        }
        // A parent not made yet (the first create makes it): `capacity` asks its ancestors.
        let free = objects.iter().find(|o| o.name == self.dataset).map(|o| o.available / MIB * MIB);
        Ok(crate::pool::Survey { found, free, ..Default::default() })
    }

    async fn get_volume(&self, local: &str) -> Result<Option<VolumeInfo>> {
        Ok(self.find_volume(local).await?.map(|(o, meta)| Self::volume_info(&o, meta)))
    }

    async fn look_up_volume(&self, local: &str) -> Result<Option<(VolumeInfo, crate::pool::Found)>> {
        // NodeStage attaches right after this lookup: it need not run `zfs get` again.
        Ok(self
            .find_volume(local)
            .await?
            .map(|(o, meta)| (Self::volume_info(&o, meta.clone()), crate::pool::Found::Zfs(Box::new((o, meta))))))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for o in self.tree(command::DATASETS, 1).await? {
            match self.live_volume(&o) {
                Ok(Some(meta)) => out.push(Self::volume_info(&o, meta)),
                Ok(None) => {}
                Err(e) => tracing::warn!(pool = %self.name, dataset = %o.name, "skipping a dataset with damaged holdfast properties: {e}"),
            }
        }
        Ok(out)
    }

    async fn expand_volume(&self, local: &str, capacity: u64) -> Result<u64> {
        let (o, meta) =
            self.find_volume(local).await?.ok_or_else(|| Error::NotFound(format!("volume {local:?} not found in pool {:?}", self.name)))?;
        if o.capacity() >= capacity {
            return Ok(o.capacity());
        }
        if meta.pending {
            return Err(Error::FailedPrecondition(format!("volume {local:?} is an unfinished copy; retry its creation first")));
        }
        if o.kind == Kind::Volume {
            self.set_volsize(&o.name, capacity).await?;
        } else {
            // Raise whichever quota holds the volume (the config's quota_mode may have changed since).
            let mut quotas: Vec<&str> =
                [("refquota", o.refquota), ("quota", o.quota)].iter().filter(|(_, v)| *v > 0).map(|(k, _)| *k).collect();
            if quotas.is_empty() {
                quotas.push(self.quota_mode.property());
            }
            for q in quotas {
                self.run(command::set(&o.name, q, &capacity.to_string()))
                    .await
                    .context(|| format!("raising the {q} of ZFS {} to {capacity} bytes", o.name))?;
            }
            // A thick dataset reserves its capacity (issue 12: modify); a zvol's `auto` follows.
            if meta.mutable.get(mutable::PROVISIONING).map(String::as_str) == Some("thick") {
                self.run(command::set(&o.name, "refreservation", &capacity.to_string()))
                    .await
                    .context(|| format!("raising the refreservation of ZFS {} to {capacity} bytes", o.name))?;
            }
        }
        tracing::info!(pool = %self.name, dataset = %o.name, capacity, "expanded ZFS volume");
        Ok(self.read_volume(&o.name).await?.capacity)
    }

    async fn create_snapshot(&self, source_local: &str, csi_name: &str, local: &str, uid: &str) -> Result<SnapshotInfo> {
        if !valid_local_name(local) {
            return Err(Error::InvalidArgument(format!("{local:?} is not a valid local snapshot name")));
        }
        let existing = |o: &Object, meta: Meta| -> Result<SnapshotInfo> {
            if meta.csi_name == csi_name && meta.source == Some(Source::Volume(source_local.to_owned())) {
                Ok(Self::snapshot_info(o, meta))
            } else {
                Err(Error::AlreadyExists(format!(
                    "snapshot {:?} already exists in pool {:?} with source {:?}, not volume {source_local:?}",
                    meta.csi_name, self.name, meta.source
                )))
            }
        };
        if let Some((o, meta)) = self.find_snapshot(local).await? {
            return existing(&o, meta);
        }
        let (v, vmeta) = self
            .find_volume(source_local)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {source_local:?} not found in pool {:?}", self.name)))?;
        if vmeta.pending {
            return Err(Error::FailedPrecondition(format!("volume {source_local:?} is an unfinished copy; retry its creation first")));
        }
        let meta = Meta {
            pool: self.name.clone(),
            object: ObjectType::Snapshot,
            local: local.to_owned(),
            csi_name: csi_name.to_owned(),
            capacity: 0,
            block: vmeta.block,
            fs_type: vmeta.fs_type,
            source: Some(Source::Volume(source_local.to_owned())),
            size: v.capacity(),
            pending: false,
            uid: Some(uid.to_owned()),
            source_uid: vmeta.uid.clone(),
            parameters: None,
            mutable: Default::default(),
            group: None,
        };
        let name = format!("{}@{local}", v.name);
        match self.snapshot_frozen(&v.name, format!("snapshot {csi_name:?}"), command::snapshot(&name, &meta.properties())).await {
            Ok(()) => tracing::info!(pool = %self.name, snapshot = %name, "took ZFS snapshot"),
            Err(SnapshotError::Freeze(e)) => return Err(e),
            Err(SnapshotError::Zfs(e)) if command::is_exists(&e) => {}
            Err(SnapshotError::Zfs(e)) if command::is_no_space(&e) => {
                return Err(Error::ResourceExhausted(format!(
                    "no room for snapshot {csi_name:?} in pool {:?}: {}",
                    self.name,
                    e.stderr().trim()
                )));
            }
            Err(SnapshotError::Zfs(e)) => return Err(Error::exec(format!("taking ZFS snapshot {name}"), e)),
        }
        let o = self
            .read(&name, command::SNAPSHOTS)
            .await?
            .ok_or_else(|| Error::Aborted(format!("ZFS snapshot {name} came and went; retry")))?;
        match self.live_snapshot(&o) {
            Ok(Some(meta)) => existing(&o, meta),
            Ok(None) => Err(Error::AlreadyExists(format!(
                "ZFS snapshot {name} already exists and is not a snapshot of holdfast pool {:?}; rename or destroy it, or use another name",
                self.name
            ))),
            Err(e) => Err(Self::damaged(&o, e)),
        }
    }

    async fn delete_snapshot(&self, local: &str) -> Result<()> {
        let Some((s, meta)) = self.find_snapshot(local).await? else {
            return Ok(());
        };
        let what = format!("snapshot {:?}", meta.csi_name);
        let mut has_clones = !s.clones.is_empty();
        if !has_clones {
            match self.run(command::destroy(&s.name)).await {
                Ok(_) => tracing::info!(pool = %self.name, snapshot = %s.name, "destroyed {what}"),
                Err(e) if command::is_missing(&e) => {}
                Err(e) if command::has_clones(&e) => has_clones = true,
                Err(e) => return Err(Error::exec(format!("destroying ZFS {} ({what})", s.name), e)),
            }
        }
        if has_clones {
            // Clones need it: hide it (freeing the name) and let ZFS destroy it with its last clone.
            let hidden = format!("{}{HIDDEN}{}", s.name, s.guid);
            match self.run(command::rename(&s.name, &hidden)).await {
                Ok(_) => {}
                Err(e) if command::is_missing(&e) => return Ok(()),
                Err(e) => return Err(Error::exec(format!("hiding the deleted {what} (ZFS {})", s.name), e)),
            }
            self.run(command::destroy_deferred(&hidden))
                .await
                .context(|| format!("marking the deleted {what} ({hidden}) for destruction"))?;
            tracing::info!(pool = %self.name, snapshot = %hidden, clones = ?s.clones, "{what} deleted; ZFS destroys it with its last clone");
        }
        if let Err(e) = self.sweep().await {
            tracing::warn!(pool = %self.name, "cleaning up deleted volumes: {e}");
        }
        Ok(())
    }

    async fn get_snapshot(&self, local: &str) -> Result<Option<SnapshotInfo>> {
        Ok(self.find_snapshot(local).await?.map(|(o, meta)| Self::snapshot_info(&o, meta)))
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for o in self.tree(command::SNAPSHOTS, 2).await? {
            match self.live_snapshot(&o) {
                Ok(Some(meta)) => out.push(Self::snapshot_info(&o, meta)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(pool = %self.name, snapshot = %o.name, "skipping a snapshot with damaged holdfast properties: {e}")
                }
            }
        }
        Ok(out)
    }

    async fn capacity(&self) -> Result<u64> {
        // The parent is made by the first create; until then its nearest ancestor tells.
        let mut target = self.dataset.as_str();
        loop {
            match self.run(command::get_available(target)).await {
                Ok(out) => {
                    let bytes: u64 = out.trim().parse().map_err(|_| {
                        Error::Internal(format!("zfs get available {target} answered {:?}, not a number of bytes", out.trim()))
                    })?;
                    return Ok(bytes / MIB * MIB);
                }
                Err(e) if command::is_missing(&e) => match target.rsplit_once('/') {
                    Some((parent, _)) => target = parent,
                    None => return Err(self.pool_missing()),
                },
                Err(e) if command::is_no_pool(&e) => return Err(self.pool_missing()),
                Err(e) => return Err(Error::exec(format!("reading the free space of {target}"), e)),
            }
        }
    }

    async fn attach(&self, local: &str) -> Result<Attachment> {
        let found = self.find_volume(local).await?;
        let (o, meta) = found.ok_or_else(|| Error::NotFound(format!("volume {local:?} not found in pool {:?}", self.name)))?;
        self.attach_object(local, o, meta).await
    }

    async fn attach_found(&self, local: &str, found: crate::pool::Found) -> Result<Attachment> {
        match found {
            crate::pool::Found::Zfs(f) if f.0.name == self.volume_dataset(local) => self.attach_object(local, f.0, f.1).await,
            _ => self.attach(local).await,
        }
    }

    async fn detach(&self, _local: &str) -> Result<()> {
        // Nothing to undo: a dataset is mounted by name, a zvol's device is always there.
        Ok(())
    }

    async fn condition(&self, local: &str) -> Result<Condition> {
        let Some((o, meta)) = self.find_volume(local).await? else {
            return Ok(Condition::Abnormal(format!("ZFS dataset or zvol {} of volume {local:?} is gone", self.volume_dataset(local))));
        };
        if meta.pending {
            return Ok(Condition::Abnormal(format!("ZFS {} is an unfinished copy", o.name)));
        }
        if o.kind == Kind::Volume && !Self::zvol_device(&o.name).exists() {
            return Ok(Condition::Abnormal(format!(
                "the device {} of zvol {} is missing (udev, or the zvol's volmode?)",
                Self::zvol_device(&o.name).display(),
                o.name
            )));
        }
        Ok(match self.pool_problem().await {
            Some(p) => Condition::Abnormal(p),
            None => Condition::Healthy,
        })
    }

    // issue 12: modify
    fn mutable_keys(&self) -> &'static [&'static str] {
        &mutable::KEYS
    }

    fn check_mutable(&self, block: bool, fs_type: Option<&str>, key: &str, value: &str) -> Result<()> {
        mutable::check(key, value, block || fs_type.is_some_and(|f| f != "zfs"))
    }

    async fn modify_volume(&self, local: &str, key: &str, value: &str) -> Result<()> {
        let (o, meta) =
            self.find_volume(local).await?.ok_or_else(|| Error::NotFound(format!("volume {local:?} not found in pool {:?}", self.name)))?;
        let zvol = o.kind == Kind::Volume;
        mutable::check(key, value, zvol)?;
        let (prop, val) = mutable::native(key, value, zvol, o.capacity());
        match self.run(command::set(&o.name, &prop, &val)).await {
            Ok(_) => {}
            Err(e) if command::is_bad_property(&e) => {
                return Err(Error::InvalidArgument(format!(
                    "zfs refused mutable parameter {key}={value} on ZFS {}: {}",
                    o.name,
                    e.stderr().trim()
                )));
            }
            Err(e) if command::is_no_space(&e) => {
                return Err(Error::ResourceExhausted(format!(
                    "no room to reserve {} for ZFS {} ({key}={value}): {}",
                    format_size(o.capacity()),
                    o.name,
                    e.stderr().trim()
                )));
            }
            Err(e) => return Err(Error::exec(format!("setting {prop}={val} on ZFS {}", o.name), e)),
        }
        // Recorded only once applied: the record never claims a value the volume lacks.
        let mut now = meta.mutable;
        now.insert(key.to_owned(), value.to_owned());
        self.run(command::set(&o.name, report::P_MUTABLE, &report::mutable_value(&now)))
            .await
            .context(|| format!("recording {key}={value} on ZFS {}", o.name))?;
        tracing::info!(pool = %self.name, dataset = %o.name, key, value, "modified ZFS volume");
        Ok(())
    }

    // issue 12: group snapshots
    /// ONE `zfs snapshot` naming every member (ZFS takes them in one transaction group: one
    /// point in time), with the filesystems on member zvols frozen first. The command sets what
    /// all members share (marked pending); each member's own record follows with `zfs set`.
    /// A member left pending by a crash is not taken for a snapshot (its record does not name
    /// it); a retry of the group removes it before taking the group again.
    async fn create_group_snapshot(self: Arc<Self>, group: GroupMembership, members: Vec<GroupMember>) -> Result<Vec<SnapshotInfo>> {
        let mut sources = Vec::new();
        for m in &members {
            if !valid_local_name(&m.local) {
                return Err(Error::InvalidArgument(format!("{:?} is not a valid local snapshot name", m.local)));
            }
            let (v, vmeta) = self
                .find_volume(&m.source)
                .await?
                .ok_or_else(|| Error::NotFound(format!("volume {:?} not found in pool {:?}", m.source, self.name)))?;
            if vmeta.pending {
                return Err(crate::pool::no_group_snapshots(
                    &self.name,
                    PoolKind::Zfs,
                    &m.source,
                    "holds it as an unfinished copy; retry its creation first",
                ));
            }
            sources.push((v, vmeta));
        }
        // Leftovers of an earlier attempt at this group cut short between the two steps.
        for o in self.tree(command::SNAPSHOTS, 2).await? {
            let left = o.user.get(report::P_GROUP).and_then(|g| GroupMembership::decode(g)).is_some_and(|g| g.name == group.name);
            if left
                && self.is_child(&o)
                && o.user.get(report::P_PENDING).map(String::as_str) == Some("1")
                && o.user.get(report::P_POOL) == Some(&self.name)
            {
                tracing::warn!(pool = %self.name, snapshot = %o.name, "destroying an unfinished member of group snapshot {:?}", group.name);
                self.destroy(&o.name, "an unfinished group snapshot member").await?;
            }
        }
        let names: Vec<String> = members.iter().zip(&sources).map(|(m, (v, _))| format!("{}@{}", v.name, m.local)).collect();
        let shared = vec![
            (report::P_POOL.to_owned(), self.name.clone()),
            (report::P_TYPE.to_owned(), ObjectType::Snapshot.as_str().to_owned()),
            (report::P_NAME.to_owned(), report::encode(&group.name)),
            (report::P_PENDING.to_owned(), "1".to_owned()),
            (report::P_GROUP.to_owned(), group.encode()),
        ];
        let mut snapshot = Cmd::new("zfs").arg("snapshot");
        for (k, v) in &shared {
            snapshot = snapshot.arg("-o").arg(format!("{k}={v}"));
        }
        let snapshot = snapshot.args(names.iter().map(String::as_str)).timeout(command::CHANGE_TIMEOUT);
        // The filesystems on member zvols write out their caches first, all frozen together.
        let mounts = self.freezer.mounter().mounts().await?;
        let mut targets = Vec::new();
        for (v, _) in &sources {
            let device = Self::zvol_device(&v.name);
            let mounts = mounts.clone();
            let mount_points = if v.kind == Kind::Volume {
                crate::blocking::run("mountinfo", "finding the mounts of a device", crate::blocking::METADATA_DEADLINE, move || {
                    if device.exists() { copy::mounted_filesystems(&device, &mounts) } else { Vec::new() }
                })
                .await?
            } else {
                Vec::new()
            };
            let volume = v.leaf().to_owned();
            targets.push(Target { pool: self.name.clone(), volume, mount_points, purpose: format!("group snapshot {:?}", group.name) });
        }
        let exec = self.exec.clone();
        match self.freezer.around_all(targets, async move { exec.run(snapshot).await.map(|_| ()) }).await? {
            Ok(()) => tracing::info!(pool = %self.name, snapshots = ?names, "took ZFS group snapshot in one command"),
            Err(e) if command::is_no_space(&e) => {
                return Err(Error::ResourceExhausted(format!(
                    "no room for group snapshot {:?} in pool {:?}: {}",
                    group.name,
                    self.name,
                    e.stderr().trim()
                )));
            }
            Err(e) => return Err(Error::exec(format!("taking ZFS group snapshot {:?} ({})", group.name, names.join(" ")), e)),
        }
        let mut taken = Vec::new();
        let mut failed = None;
        for ((m, (v, vmeta)), name) in members.iter().zip(&sources).zip(&names) {
            let meta = Meta {
                pool: self.name.clone(),
                object: ObjectType::Snapshot,
                local: m.local.clone(),
                csi_name: m.csi_name.clone(),
                capacity: 0,
                block: vmeta.block,
                fs_type: vmeta.fs_type.clone(),
                source: Some(Source::Volume(m.source.clone())),
                size: v.capacity(),
                pending: false,
                uid: Some(m.uid.clone()),
                source_uid: vmeta.uid.clone(),
                parameters: None,
                group: Some(group.clone()),
                mutable: Default::default(),
            };
            let mut set = Cmd::new("zfs").arg("set");
            for (k, val) in meta.properties() {
                set = set.arg(format!("{k}={val}"));
            }
            // `pending` is not among a finished record's properties: cleared explicitly.
            let set = set.arg(format!("{}=0", report::P_PENDING)).arg(name.as_str()).timeout(command::CHANGE_TIMEOUT);
            if let Err(e) = self.run(set).await {
                failed = Some(Error::exec(format!("recording group snapshot member {name}"), e));
                break;
            }
            match self.read(name, command::SNAPSHOTS).await? {
                Some(o) => taken.push(Self::snapshot_info(&o, meta)),
                None => {
                    failed = Some(Error::Aborted(format!("ZFS snapshot {name} came and went; retry")));
                    break;
                }
            }
        }
        if let Some(e) = failed {
            for name in &names {
                if let Err(d) = self.destroy(name, "a member of a failed group snapshot").await {
                    tracing::error!(pool = %self.name, snapshot = %name, error = %d, "cannot destroy a member of a failed group snapshot");
                }
            }
            return Err(e);
        }
        Ok(taken)
    }
}

#[cfg(test)]
pub(crate) mod tests;
