//! The [`Pool`] trait: what every kind of storage (file, lvm, zfs, nfs) offers the CSI layer.
//! A pool speaks in local names and bytes, never in gRPC types; the CSI services translate.
//! Every method is idempotent: creating what exists (compatibly) returns it, deleting what is
//! gone succeeds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::volume_id::PoolKind;

pub mod copy;
pub mod file;
pub mod lvm;
pub mod nfs;
// issue 11: cluster
pub mod schema;
pub mod zfs;

/// 1 MiB: every capacity is rounded up to a multiple of this.
pub const MIB: u64 = 1 << 20;

/// Rounds `bytes` up to a whole MiB (at least 1 MiB).
pub fn round_up_mib(bytes: u64) -> u64 {
    bytes.max(1).div_ceil(MIB).saturating_mul(MIB)
}

/// Opens the pool a `[[pool]]` table describes; block-backed pools freeze with `freezer`, and
/// every pool reads the mount table through its mounter (the driver's).
pub fn open(
    cfg: &crate::config::PoolConfig,
    exec: std::sync::Arc<dyn crate::exec::Exec>,
    freezer: std::sync::Arc<crate::node::freeze::Freezer>,
) -> Result<std::sync::Arc<dyn Pool>> {
    match cfg.kind() {
        PoolKind::File => Ok(std::sync::Arc::new(file::FilePool::new(cfg, exec)?.with_freezer(freezer))),
        PoolKind::Lvm => Ok(std::sync::Arc::new(lvm::LvmPool::new(cfg, exec)?.with_freezer(freezer))),
        // The driver's mount table, which its freezer holds.
        PoolKind::Nfs => Ok(std::sync::Arc::new(nfs::NfsPool::new(cfg, exec)?.with_mounter(freezer.mounter()))),
        PoolKind::Zfs => Ok(std::sync::Arc::new(zfs::ZfsPool::new(cfg, exec)?.with_freezer(freezer))),
    }
}

// issue 14: a ready-to-use volume costs what the raw tools cost
/// What a pool's tool answered when [`Pool::look_up_volume`] found a volume, handed by the
/// caller to the [`Pool::attach_found`] that follows in the same call (NodeStage), so the
/// attach does not run `lvs` or `zfs get` a second time. It lives as long as the caller keeps
/// it: one call.
#[derive(Debug, Clone)]
pub enum Found {
    /// Nothing beyond the volume (the attach looks up itself).
    Nothing,
    /// An LVM volume: its LV and record.
    Lvm(Box<(lvm::report::Lv, lvm::tags::Meta)>),
    /// A ZFS volume: its dataset or zvol and record.
    Zfs(Box<(zfs::report::Object, zfs::report::Meta)>),
}

// issue 14: a ready-to-use volume costs what the raw tools cost
/// What a create learns of one pool before it places a volume ([`Pool::survey`]), from as few
/// looks at the pool as its kind allows, handed explicitly to the calls that follow in the same
/// create (the room check, [`Pool::create_surveyed`]) so they need not look again.
#[derive(Debug, Clone, Default)]
pub struct Survey {
    /// The first of the names asked for under which a volume exists: its index among the
    /// names, and the volume.
    pub found: Option<(usize, VolumeInfo)>,
    /// The pool's free room as [`Pool::capacity`] answers it, when the same look told it.
    pub free: Option<u64>,
    /// The pool's allocation unit as [`Pool::allocation_unit`] answers it, when the same look
    /// told it.
    pub unit: Option<u64>,
    /// What the look saw, for [`Pool::create_surveyed`].
    pub seen: Seen,
}

/// The pool-kind part of a [`Survey`].
#[derive(Debug, Clone, Default)]
pub enum Seen {
    /// Nothing beyond the volumes found.
    #[default]
    Nothing,
    /// A thin LVM pool: the listing of the volume group (`lvs VG`).
    Lvm(Vec<lvm::report::Lv>),
}

/// [`Pool::survey`] by one [`Pool::get_volume`] per name, stopping at the first found.
pub async fn survey_by_lookups(pool: &(impl Pool + ?Sized), names: &[&str]) -> Result<Survey> {
    for (i, name) in names.iter().enumerate() {
        if let Some(v) = pool.get_volume(name).await? {
            return Ok(Survey { found: Some((i, v)), ..Survey::default() });
        }
    }
    Ok(Survey::default())
}

/// Polls for the device node `path` (udev creates `/dev/<vg>/<lv>` and `/dev/zvol/...` shortly
/// after an LV is activated or a zvol appears); past `timeout` the error says so, with the
/// pool's `hint` of what to check appended.
pub async fn wait_for_device(path: &std::path::Path, timeout: std::time::Duration, hint: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !path.exists() {
        if std::time::Instant::now() > deadline {
            return Err(crate::error::Error::Internal(format!("{} did not appear within {timeout:?}{hint}", path.display())));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}

/// What a new volume is filled from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A snapshot in the same pool (its local name).
    Snapshot(String),
    /// A volume in the same pool (its local name).
    Volume(String),
}

/// A request to create a volume (serialisable: a copy job records it, [`crate::jobs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRequest {
    /// The CSI name (idempotency key), up to 128 characters.
    pub csi_name: String,
    /// The local name derived from it ([`crate::volume_id::local_name`]).
    pub local: String,
    /// Bytes, already rounded to whole MiB.
    pub capacity: u64,
    /// Raw block volume (true) or filesystem volume (false).
    pub block: bool,
    /// Filesystem to create on first stage (filesystem volumes only).
    pub fs_type: Option<String>,
    /// Content source, if any.
    pub source: Option<Source>,
    /// StorageClass / request parameters, for pool kinds that understand some.
    pub parameters: BTreeMap<String, String>,
    /// The request's `limit_bytes` (0: none). An existing volume answers a retry when its
    /// capacity lies in `capacity..=limit`, or is exactly `capacity` when there is no limit
    /// (the pool never made it bigger than asked, so a bigger one was made by another request).
    pub limit: u64,
    /// A fresh uid ([`crate::volume_id::new_uid`]): recorded only if this request creates the
    /// volume; an existing compatible volume answers with the uid it has.
    pub uid: String,
    /// The recorded uid of the source object, when there is a source and it has one.
    pub source_uid: Option<String>,
    /// The request's `mutable_parameters` (issue 12: modify), each already checked with
    /// [`Pool::check_mutable`]: applied at creation and recorded as [`VolumeInfo::mutable`].
    #[serde(default)]
    pub mutable: BTreeMap<String, String>,
}

/// A volume as the pool stores it (the pool is the source of truth).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Local name in the pool.
    pub local: String,
    /// The CSI name it was created with.
    pub csi_name: String,
    /// Current capacity in bytes.
    pub capacity: u64,
    /// Raw block volume.
    pub block: bool,
    /// Filesystem chosen at creation (filesystem volumes).
    pub fs_type: Option<String>,
    /// What it was created from.
    pub source: Option<Source>,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
    /// The uid recorded at creation (`None`: made before uids existed); part of its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The recorded uid of the source object when it was made, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_uid: Option<String>,
    /// The pool parameters it was created with (`None`: not recorded, made before they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<BTreeMap<String, String>>,
    /// The mutable parameters applied to it (issue 12: modify): at creation
    /// (`mutable_parameters`) and by every ControllerModifyVolume since, each key with the value
    /// it has now. Stored in the pool's own record of the volume; empty: none ever set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mutable: BTreeMap<String, String>,
}

impl VolumeInfo {
    /// The one compatibility check of a create retry: what about this volume differs from what
    /// `req` asks for, each said in a few words (empty: the volume answers the request). Every
    /// pool's `create_volume` and the controller's look-up use it; a pool adds only what it
    /// alone records (the file pool's default provisioning). What a record does not hold (an
    /// old volume without a filesystem or parameters recorded) is not compared.
    pub fn conflicts_with(&self, req: &CreateRequest) -> Vec<String> {
        let mut d = Vec::new();
        if self.csi_name != req.csi_name {
            d.push(format!("it belongs to CSI name {}", crate::error::bounded(&self.csi_name)));
        }
        let fits = if req.limit == 0 { self.capacity == req.capacity } else { (req.capacity..=req.limit).contains(&self.capacity) };
        if !fits {
            d.push(format!("its capacity is {} bytes", self.capacity));
        }
        if self.block != req.block {
            d.push(format!("it is a {} volume", if self.block { "raw block" } else { "filesystem" }));
        }
        if let (false, Some(have), Some(want)) = (req.block, &self.fs_type, &req.fs_type) {
            if have != want {
                d.push(format!("its filesystem is {have}"));
            }
        }
        if self.source != req.source {
            d.push(format!("its content source is {:?}", self.source));
        } else if let (Some(have), Some(want)) = (&self.source_uid, &req.source_uid) {
            if have != want {
                d.push("its content source was another object of the same name (since deleted)".to_owned());
            }
        }
        if let Some(have) = &self.parameters {
            let keys: std::collections::BTreeSet<&String> = have.keys().chain(req.parameters.keys()).collect();
            for k in keys {
                match (have.get(k), req.parameters.get(k)) {
                    (a, b) if a == b => {}
                    (Some(a), _) => d.push(format!("its parameter {k} is {}", crate::error::bounded(a))),
                    (None, _) => d.push(format!("it was made without parameter {k}")),
                }
            }
        }
        // The mutable parameters it has now (a create retried after a modify changed them is
        // another request: CSI compares with the volume as it is).
        let keys: std::collections::BTreeSet<&String> = self.mutable.keys().chain(req.mutable.keys()).collect();
        for k in keys {
            match (self.mutable.get(k), req.mutable.get(k)) {
                (a, b) if a == b => {}
                (Some(a), _) => d.push(format!("its mutable parameter {k} is {}", crate::error::bounded(a))),
                (None, _) => d.push(format!("it has no mutable parameter {k}")),
            }
        }
        d
    }
}

/// A snapshot as the pool stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Local name in the pool.
    pub local: String,
    /// The CSI name it was created with.
    pub csi_name: String,
    /// Local name of the volume it was taken from.
    pub source_volume: String,
    /// Size of the source volume when taken (bytes): the minimum size of a restore.
    pub size: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
    /// Whether it can be used as a source.
    pub ready: bool,
    /// The uid recorded at creation (`None`: made before uids existed); part of its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The recorded uid of the source volume when it was taken (`None`: unknown or legacy):
    /// ListSnapshots by source id lists only snapshots of that very volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_uid: Option<String>,
    /// The group snapshot it is a member of (issue 12), recorded with the snapshot itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupMembership>,
}

/// What every member of a group snapshot records of its group: the group is not stored apart,
/// so these are what finds, checks and deletes it (after a restart too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMembership {
    /// The group's CSI name.
    pub name: String,
    /// The group's local name (the fourth field of its id).
    pub local: String,
    /// The group's uid (the last field of its id, after `g`).
    pub uid: String,
    /// How many members the group has: fewer found means an unfinished create or delete.
    pub members: u32,
}

impl GroupMembership {
    /// One word of `[0-9a-z_:-]` for an LVM tag or a ZFS user property:
    /// `<local>:<uid>:<members>:<hex of the name>`.
    pub fn encode(&self) -> String {
        format!("{}:{}:{}:{}", self.local, self.uid, self.members, hex::encode(self.name.as_bytes()))
    }

    /// Reads [`GroupMembership::encode`] back; `None` when damaged.
    pub fn decode(s: &str) -> Option<GroupMembership> {
        let mut f = s.split(':');
        let (local, uid, members, name) = (f.next()?, f.next()?, f.next()?, f.next()?);
        if f.next().is_some() || !crate::volume_id::valid_local_name(local) || !crate::volume_id::valid_uid(uid) {
            return None;
        }
        let name = String::from_utf8(hex::decode(name).ok()?).ok()?;
        Some(GroupMembership { name, local: local.to_owned(), uid: uid.to_owned(), members: members.parse().ok().filter(|n| *n > 0)? })
    }
}

/// One member of a group snapshot to take: what [`Pool::create_snapshot`] takes for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The source volume's local name.
    pub source: String,
    /// The member snapshot's CSI name.
    pub csi_name: String,
    /// The member snapshot's local name.
    pub local: String,
    /// The member snapshot's fresh uid.
    pub uid: String,
}

/// The refusal of a pool kind that cannot take group snapshots, naming a member's volume.
pub fn no_group_snapshots(pool: &str, kind: PoolKind, volume: &str, why: &str) -> crate::error::Error {
    crate::error::Error::FailedPrecondition(format!("volume {volume:?} cannot be part of a group snapshot: pool {pool:?} ({kind}) {why}"))
}

/// How the node reaches a volume's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// A block device node (LV, zvol).
    Device(PathBuf),
    /// A loop device over the pool's image file (`file` pools). The node may prove a fresh
    /// device blank from the image's holes instead of probing it (`node::format::ZeroDevice`).
    Loop {
        /// The device node, e.g. `/dev/loop3`.
        device: PathBuf,
        /// Its backing file, the volume's image.
        image: PathBuf,
    },
    /// Something `mount` takes directly (ZFS dataset, NFS export subdirectory).
    Mount {
        /// The mount source, e.g. `tank/holdfast/v1` or `server:/export/v1`.
        source: String,
        /// The filesystem type, e.g. `zfs`, `nfs`.
        fs_type: String,
        /// Options the pool requires.
        options: Vec<String>,
    },
}

/// Health of the volume's backing storage, as the pool sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// All is well.
    Healthy,
    /// Something is wrong; the message says what.
    Abnormal(String),
}

/// One kind of storage.
#[async_trait]
pub trait Pool: Send + Sync {
    /// The configured pool name.
    fn name(&self) -> &str;
    /// The kind.
    fn kind(&self) -> PoolKind;
    /// The filesystem for filesystem volumes whose request names none.
    fn default_fs(&self) -> &str;
    /// Whether this pool understands the StorageClass parameter `key` (beyond the ones the CSI
    /// layer itself handles). Unknown keys are rejected so a typo never goes unnoticed.
    fn accepts_parameter(&self, _key: &str) -> bool {
        false
    }
    /// The filesystem types this pool's filesystem volumes can have (a request naming another
    /// is INVALID_ARGUMENT). Block-backed pools make ext4, xfs or btrfs on their devices.
    fn filesystems(&self) -> &'static [&'static str] {
        &crate::node::format::SUPPORTED_FS
    }
    /// The unit this pool allocates in (bytes): capacities are rounded up to it before the
    /// request's `limit_bytes` is checked, so a pool never hands out more than the limit.
    async fn allocation_unit(&self) -> Result<u64> {
        Ok(MIB)
    }
    /// Whether volumes of this pool can be used from several nodes at once (MULTI_NODE_*
    /// access modes). Node-local pools cannot.
    fn multi_node(&self) -> bool {
        false
    }
    /// Where the pool's volumes are reachable, for shared pools (`None`: only on this node).
    fn topology(&self) -> Option<crate::placement::Segments> {
        None
    }

    /// Creates a volume, or returns the existing one when it was made by the same request
    /// ([`VolumeInfo::conflicts_with`] finds nothing; it keeps its own uid). Otherwise
    /// `AlreadyExists` naming the differences. No room → `ResourceExhausted`.
    async fn create_volume(&self, req: &CreateRequest) -> Result<VolumeInfo>;
    /// Deletes a volume; succeeds when it is already gone.
    async fn delete_volume(&self, local: &str) -> Result<()>;
    /// The first of `names` under which a volume exists, with what else the same look at the
    /// pool told (its room, its allocation unit), for a create about to place a volume. By
    /// default one [`Pool::get_volume`] per name and nothing else.
    async fn survey(&self, names: &[&str]) -> Result<Survey> {
        survey_by_lookups(self, names).await
    }
    /// [`Pool::create_volume`] right after a [`Pool::survey`] of this pool in the same create
    /// (under the name lock), which found no volume under `req.local`: a pool may act on what
    /// the survey saw instead of looking again. By default exactly `create_volume`.
    async fn create_surveyed(&self, req: &CreateRequest, _survey: &Survey) -> Result<VolumeInfo> {
        self.create_volume(req).await
    }

    /// Looks up a volume.
    async fn get_volume(&self, local: &str) -> Result<Option<VolumeInfo>>;
    /// All volumes, in no particular order.
    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>>;
    /// One page of the listing (issue 14: a page costs the page): at most `max` volumes whose
    /// local names are `from` or later, in name order. A pool with an ordered index of its
    /// volumes answers from it, sharing what it holds (an `Arc`: a volume that did not change
    /// is the same allocation on every page); the others list everything and cut.
    async fn list_volumes_from(&self, from: &str, max: usize) -> Result<Vec<std::sync::Arc<VolumeInfo>>> {
        let mut all = self.list_volumes().await?;
        all.retain(|v| v.local.as_str() >= from);
        all.sort_by(|a, b| a.local.cmp(&b.local));
        all.truncate(max);
        Ok(all.into_iter().map(std::sync::Arc::new).collect())
    }
    /// Grows a volume to at least `capacity` bytes; returns the new capacity. Never shrinks.
    async fn expand_volume(&self, local: &str, capacity: u64) -> Result<u64>;
    /// Takes a snapshot of a volume (idempotent on `csi_name` + source). `uid` is recorded only
    /// if this call takes it (with the source volume's uid); an existing one keeps its own.
    async fn create_snapshot(&self, source_local: &str, csi_name: &str, local: &str, uid: &str) -> Result<SnapshotInfo>;
    /// Deletes a snapshot; succeeds when it is already gone.
    async fn delete_snapshot(&self, local: &str) -> Result<()>;
    /// Looks up a snapshot.
    async fn get_snapshot(&self, local: &str) -> Result<Option<SnapshotInfo>>;
    /// All snapshots.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>>;
    /// The largest single new volume this pool could hold now, in bytes.
    async fn capacity(&self) -> Result<u64>;

    /// [`Pool::get_volume`], with what the pool's tool answered, for an
    /// [`Pool::attach_found`] in the same call.
    async fn look_up_volume(&self, local: &str) -> Result<Option<(VolumeInfo, Found)>> {
        Ok(self.get_volume(local).await?.map(|v| (v, Found::Nothing)))
    }
    /// Makes the volume's data reachable on this node (idempotent).
    async fn attach(&self, local: &str) -> Result<Attachment>;
    /// [`Pool::attach`] right after [`Pool::look_up_volume`] of `local` in the same call found
    /// `found`: a pool may attach what it found instead of looking again.
    async fn attach_found(&self, local: &str, _found: Found) -> Result<Attachment> {
        self.attach(local).await
    }
    /// Undoes [`Pool::attach`] (idempotent).
    async fn detach(&self, local: &str) -> Result<()>;
    /// Health of the backing storage of an existing volume.
    async fn condition(&self, local: &str) -> Result<Condition>;
    /// The conditions of the volumes of one page of a listing, in order, each as
    /// [`Pool::condition`] answers it; a pool may read them in one pass (issue 14).
    async fn conditions(&self, locals: &[String]) -> Vec<Result<Condition>> {
        let mut out = Vec::with_capacity(locals.len());
        for local in locals {
            out.push(self.condition(local).await);
        }
        out
    }

    /// Start-up repair, before serving: undoes what a killed driver left half-done in the
    /// pool's storage itself (LVM: device-mapper devices left suspended). Frozen filesystems
    /// are the [`Freezer`](crate::node::freeze::Freezer)'s, not the pool's.
    async fn recover(&self) -> Result<()> {
        Ok(())
    }
    /// Removes what an unfinished creation of `local` (a snapshot when `snapshot`) left: its
    /// temporaries, never a finished object. Called at start-up for a copy a killed driver
    /// recorded and that is not run again before its request is retried ([`crate::jobs`]).
    async fn discard_unfinished(&self, _snapshot: bool, _local: &str) -> Result<()> {
        Ok(())
    }
    /// How far a running copy into `local` (a snapshot when `snapshot`) from `source` is:
    /// bytes written and bytes to write, when this pool can tell within `deadline`.
    async fn copy_progress(&self, _snapshot: bool, _local: &str, _source: &Source, _deadline: std::time::Duration) -> Option<(u64, u64)> {
        None
    }

    // issue 12: group snapshots
    /// Takes every member of a group snapshot at one point in time (write-order consistent
    /// across the members, or refused: FAILED_PRECONDITION naming a volume). Each member is an
    /// ordinary snapshot recording `group`. On failure nothing of the group is left. Members
    /// that exist already are the caller's to check first ([`Pool::list_snapshots`]).
    async fn create_group_snapshot(
        self: std::sync::Arc<Self>,
        _group: GroupMembership,
        members: Vec<GroupMember>,
    ) -> Result<Vec<SnapshotInfo>> {
        let volume = members.first().map(|m| m.source.clone()).unwrap_or_default();
        Err(no_group_snapshots(self.name(), self.kind(), &volume, "cannot take snapshots of several volumes at one point in time"))
    }
    // issue 12: modify
    /// The mutable parameters (ControllerModifyVolume, CreateVolume's `mutable_parameters`)
    /// this pool's volumes take; empty: none.
    fn mutable_keys(&self) -> &'static [&'static str] {
        &[]
    }
    /// Checks one mutable parameter for a volume of this shape (raw block or not, its
    /// filesystem) before anything is applied: INVALID_ARGUMENT naming the key when the pool
    /// does not know it, cannot change it on such a volume, or its tool would refuse the value.
    fn check_mutable(&self, _block: bool, _fs_type: Option<&str>, key: &str, _value: &str) -> Result<()> {
        Err(not_mutable(self.kind(), key, self.mutable_keys()))
    }
    /// Applies one mutable parameter (already checked) to an existing volume and records it in
    /// the volume's own record ([`VolumeInfo::mutable`]), in that order, so the record never
    /// claims what was not applied; applying a value the volume has is harmless (retries).
    async fn modify_volume(&self, _local: &str, key: &str, _value: &str) -> Result<()> {
        Err(not_mutable(self.kind(), key, self.mutable_keys()))
    }
}

// issue 12: modify
/// INVALID_ARGUMENT for a mutable parameter a pool of `kind` does not take, naming the key and
/// the ones it does.
pub fn not_mutable(kind: PoolKind, key: &str, keys: &[&str]) -> crate::error::Error {
    let takes = if keys.is_empty() { "none".to_owned() } else { keys.join(", ") };
    crate::error::Error::InvalidArgument(format!(
        "mutable parameter {} cannot be set on a volume of a {kind} pool (mutable parameters there: {takes})",
        crate::error::bounded(key)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CreateRequest {
        CreateRequest {
            csi_name: "pvc-1".into(),
            local: "pvc-1-0123456789abcdef".into(),
            capacity: 64 * MIB,
            block: false,
            fs_type: Some("ext4".into()),
            source: Some(Source::Snapshot("s1".into())),
            parameters: [("compression".to_owned(), "lz4".to_owned())].into(),
            limit: 0,
            uid: "0123456789ab".into(),
            source_uid: Some("ba9876543210".into()),
            mutable: [("atime".to_owned(), "off".to_owned())].into(),
        }
    }

    fn made_by(r: &CreateRequest) -> VolumeInfo {
        VolumeInfo {
            local: r.local.clone(),
            csi_name: r.csi_name.clone(),
            capacity: r.capacity,
            block: r.block,
            fs_type: r.fs_type.clone(),
            source: r.source.clone(),
            created: 1,
            uid: Some(r.uid.clone()),
            source_uid: r.source_uid.clone(),
            parameters: Some(r.parameters.clone()),
            mutable: r.mutable.clone(),
        }
    }

    #[test]
    fn a_retry_is_compared_with_everything_the_record_holds() {
        struct Case {
            name: &'static str,
            req: CreateRequest,
            want: &'static [&'static str],
        }
        let r = request();
        let v = made_by(&r);
        let cases = [
            Case {
                name: "the same request (another fresh uid)",
                req: CreateRequest { uid: "ffffffffffff".into(), ..r.clone() },
                want: &[],
            },
            Case { name: "other csi name", req: CreateRequest { csi_name: "pvc-2".into(), ..r.clone() }, want: &["CSI name"] },
            Case { name: "smaller, no limit", req: CreateRequest { capacity: 32 * MIB, ..r.clone() }, want: &["capacity"] },
            Case { name: "bigger", req: CreateRequest { capacity: 128 * MIB, limit: 256 * MIB, ..r.clone() }, want: &["capacity"] },
            Case { name: "within the limit", req: CreateRequest { capacity: 32 * MIB, limit: 64 * MIB, ..r.clone() }, want: &[] },
            Case { name: "above the limit", req: CreateRequest { capacity: 32 * MIB, limit: 48 * MIB, ..r.clone() }, want: &["capacity"] },
            Case { name: "block", req: CreateRequest { block: true, fs_type: None, ..r.clone() }, want: &["filesystem volume"] },
            Case { name: "fs type", req: CreateRequest { fs_type: Some("xfs".into()), ..r.clone() }, want: &["filesystem is ext4"] },
            Case { name: "fs type left to the pool", req: CreateRequest { fs_type: None, ..r.clone() }, want: &[] },
            Case { name: "no source", req: CreateRequest { source: None, source_uid: None, ..r.clone() }, want: &["content source"] },
            Case {
                name: "a source of the same name made again",
                req: CreateRequest { source_uid: Some("000000000000".into()), ..r.clone() },
                want: &["another object of the same name"],
            },
            Case {
                name: "another parameter value",
                req: CreateRequest { parameters: [("compression".to_owned(), "off".to_owned())].into(), ..r.clone() },
                want: &["parameter compression is \"lz4\""],
            },
            Case {
                name: "parameter left out",
                req: CreateRequest { parameters: BTreeMap::new(), ..r.clone() },
                want: &["parameter compression"],
            },
            Case {
                name: "parameter added",
                req: CreateRequest {
                    parameters: [("compression".to_owned(), "lz4".to_owned()), ("atime".to_owned(), "off".to_owned())].into(),
                    ..r.clone()
                },
                want: &["without parameter atime"],
            },
            Case {
                name: "another mutable value",
                req: CreateRequest { mutable: [("atime".to_owned(), "on".to_owned())].into(), ..r.clone() },
                want: &["mutable parameter atime is \"off\""],
            },
            Case {
                name: "mutable left out",
                req: CreateRequest { mutable: BTreeMap::new(), ..r.clone() },
                want: &["mutable parameter atime"],
            },
            Case {
                name: "two differences",
                req: CreateRequest { capacity: 128 * MIB, block: true, fs_type: None, ..r.clone() },
                want: &["capacity", "filesystem volume"],
            },
        ];
        for c in cases {
            let got = v.conflicts_with(&c.req);
            assert_eq!(got.len(), c.want.len(), "{}: {got:?}", c.name);
            for (g, w) in got.iter().zip(c.want) {
                assert!(g.contains(w), "{}: {g:?} does not say {w:?}", c.name);
            }
        }
    }

    // issue 12: group snapshots
    #[test]
    fn a_group_record_round_trips_and_a_damaged_one_is_refused() {
        let g = GroupMembership {
            name: "db backup/1 名".into(),
            local: "db-backup-0123456789abcdef".into(),
            uid: "0123456789ab".into(),
            members: 2,
        };
        let word = g.encode();
        assert!(word.chars().all(|c| c.is_ascii_alphanumeric() || "-_:".contains(c)), "{word}");
        assert_eq!(GroupMembership::decode(&word), Some(g));
        for bad in [
            "",
            "a:0123456789ab:2",
            "a:0123456789ab:0:61",
            "a:xyz:2:61",
            "A:0123456789ab:2:61",
            "a:0123456789ab:2:6",
            "a:0123456789ab:2:61:x",
        ] {
            assert_eq!(GroupMembership::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn what_an_old_record_does_not_hold_is_not_compared() {
        let r = request();
        let old = VolumeInfo { parameters: None, fs_type: None, source_uid: None, uid: None, ..made_by(&r) };
        let other = CreateRequest { parameters: BTreeMap::new(), fs_type: Some("xfs".into()), source_uid: None, ..r.clone() };
        assert_eq!(old.conflicts_with(&other), Vec::<String>::new());
        assert_eq!(old.conflicts_with(&r), Vec::<String>::new());
    }
}
