//! The `lvm` pool: volumes are logical volumes in one volume group, thick, or thin in a thin
//! pool (`thin_pool`). Everything holdfast knows about an LV is stored in its tags
//! ([`tags`]), so a restarted driver finds every volume and snapshot again, and only LVs
//! carrying the holdfast marker tag of this pool are ever listed, changed or removed.
//!
//! Names: volume `local` is LV `hf-<local>`, snapshot `local` is LV `hfs-<local>`, with `_`
//! written as `.`: every name LVM reserves inside LV names (`_tmeta`, `_rimage`, `_mlog`…)
//! starts with `_`, and local names never contain `.`, so the mapping is one-to-one and always
//! legal. The prefixes keep clear of the reserved `snapshot`/`pvmove` prefixes.
//!
//! Thin pools: a snapshot is a thin snapshot LV (left with LVM's activation-skip flag, never
//! written); a restored or cloned volume is a writable thin snapshot of the snapshot or volume,
//! grown when asked for more, whose filesystem gets a new UUID so that it mounts beside its
//! source. Thin snapshots are independent LVs, so a volume that has snapshots can be deleted and
//! its snapshots stay usable.
//!
//! Thick pools: a snapshot is a copy-on-write snapshot LV (`lvcreate --snapshot --size`) whose
//! COW space is `snapshot_reserve` ([`SnapshotReserve`], default 20% of the origin). Every
//! first write to an origin block while it has snapshots copies the old block into each
//! snapshot's COW space; once the origin has changed more than that space holds, dm-snapshot
//! invalidates the snapshot (lv_attr `I`, 100% used): it is then reported not ready and refused
//! as a source with FAILED_PRECONDITION, never restored. A COW snapshot cannot outlive its
//! origin, so deleting a thick volume that has snapshots is FAILED_PRECONDITION naming them. A
//! restore or clone is a new thick LV filled by a sparse-aware block copy ([`blockcopy`]) of
//! the snapshot, or of a temporary COW snapshot of a cloned volume (`hfc-<new local>`, taken
//! like a snapshot and removed after the copy, so a mounted source is copied consistently
//! without being frozen for the copy's length); its filesystem then gets a new UUID. The new
//! LV carries the pending tag until the copy is done, and a retry or a restarted driver copies
//! again from the start.
//!
//! Consistency: a snapshot or clone of a mounted volume is taken with its filesystem frozen.
//! LVM's device suspend freezes ext4 and XFS itself, but not btrfs (whose superblock is not
//! tied to one block device), so holdfast freezes btrfs around `lvcreate` through
//! [`crate::node::freeze`] (recorded, thawed on every path, FAILED_PRECONDITION when it cannot
//! be frozen). A device left suspended by a killed `lvcreate`/`lvextend` is resumed at start-up
//! ([`dm`]). A btrfs copy taken
//! unfrozen carries an fsync log tree that no longer mounts once the copy gets a new fsid.
//!
//! `detach` leaves the LV active. Deactivating buys nothing on a node that owns its volume
//! group (an active, closed LV holds no resources worth freeing), and would race with a
//! re-attach; `attach` activates whatever is inactive (after a reboot, or for a snapshot copy).
//!
//! Sizes: LVM rounds every LV up to the volume group's extent size (4 MiB by default). The pool
//! reports the real LV size, so with 4 MiB extents a 1 MiB request gets 4 MiB; create the
//! volume group with `vgcreate -s 1M` to give callers exactly the whole MiB they ask for.

pub mod blockcopy;
pub mod command;
pub mod dm;
// issue 12: group snapshots
mod group;
pub mod report;
pub mod tags;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::config::{PoolConfig, format_size};
use crate::error::{Context, Error, Result};
use crate::exec::Exec;
use crate::node::freeze::{Freezer, Target};
use crate::pool::{Attachment, Condition, CreateRequest, MIB, Pool, SnapshotInfo, Source, VolumeInfo};
use crate::volume_id::{PoolKind, valid_local_name};

use report::Lv;
use tags::{Meta, ObjectType};

/// How long `attach` waits for udev to create `/dev/<vg>/<lv>` after activation.
const DEVICE_WAIT: Duration = Duration::from_secs(20);
/// A thin pool whose data or metadata is this full (percent) makes its volumes abnormal.
pub const THIN_POOL_FULL_PERCENT: f64 = 95.0;
/// Overcommit of a thin pool when the config sets no `overprovision_ratio`: none.
pub const DEFAULT_OVERPROVISION_RATIO: f64 = 1.0;

/// `lvcreate` options holdfast sets itself; `lvcreate_options` may not contain them.
const RESERVED_OPTIONS: [&str; 18] = [
    "-n",
    "--name",
    "-L",
    "--size",
    "-l",
    "--extents",
    "-V",
    "--virtualsize",
    "-T",
    "--thin",
    "--thinpool",
    "-s",
    "--snapshot",
    "--addtag",
    "-a",
    "--activate",
    "-k",
    "--setactivationskip",
];

/// The LV of volume `local`.
pub fn volume_lv(local: &str) -> String {
    format!("hf-{}", local.replace('_', "."))
}

/// The LV of snapshot `local`.
pub fn snapshot_lv(local: &str) -> String {
    format!("hfs-{}", local.replace('_', "."))
}

/// The temporary COW snapshot a thick clone into volume `local` copies from.
pub fn copy_source_lv(local: &str) -> String {
    format!("hfc-{}", local.replace('_', "."))
}

/// How long one block copy of a thick restore or clone may run.
const COPY_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// The COW space of a thick pool's snapshots (`snapshot_reserve`): a share of the origin's size,
/// or a fixed size. The origin may change that much while the snapshot exists (and, for a
/// clone's temporary snapshot, while the copy runs) before the snapshot overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotReserve {
    /// Percent of the origin, 1 to 100 (100: the snapshot can never overflow).
    Percent(u32),
    /// Bytes, whatever the origin's size.
    Bytes(u64),
}

/// The largest absolute `snapshot_reserve`: 1 EiB.
const MAX_RESERVE: u64 = 1 << 60;

/// `snapshot_reserve` when the config sets none.
pub const DEFAULT_SNAPSHOT_RESERVE: SnapshotReserve = SnapshotReserve::Percent(20);

impl SnapshotReserve {
    /// `"20%"` or a size (`"1GiB"`, see [`crate::config::parse_size`]); `None` when it is neither.
    pub fn parse(s: &str) -> Option<SnapshotReserve> {
        match s.trim().strip_suffix('%') {
            Some(p) => p.trim().parse::<u32>().ok().filter(|p| (1..=100).contains(p)).map(SnapshotReserve::Percent),
            // More than 1 EiB is more than any volume group holds (and near u64's end).
            None => crate::config::parse_size(s).filter(|b| (MIB..=MAX_RESERVE).contains(b)).map(SnapshotReserve::Bytes),
        }
    }

    /// The COW size for an origin of `origin` bytes: whole MiB, at least 1 MiB. At 100% a
    /// little more than the origin, for dm-snapshot's own metadata (one 4 KiB exception chunk
    /// in every 256, and a header), so that a full rewrite still fits.
    pub fn cow_size(self, origin: u64) -> u64 {
        let bytes = match self {
            SnapshotReserve::Percent(100) => origin + origin / 128 + MIB,
            SnapshotReserve::Percent(p) => (origin as u128 * p as u128).div_ceil(100) as u64,
            SnapshotReserve::Bytes(b) => b,
        };
        crate::pool::round_up_mib(bytes)
    }
}

impl std::fmt::Display for SnapshotReserve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotReserve::Percent(p) => write!(f, "{p}% of the origin"),
            SnapshotReserve::Bytes(b) => write!(f, "{}", format_size(*b)),
        }
    }
}

/// Why snapshot LV `lv` may not be read as a source, if it may not: a thick pool's COW
/// snapshot that overflowed (invalidated, or its COW space full).
pub fn snapshot_problem(lv: &Lv) -> Option<String> {
    let full = lv.attr.cow_snapshot() && lv.data_percent.is_some_and(|p| p >= 100.0);
    (lv.attr.invalid_snapshot() || full).then(|| {
        format!(
            "its copy-on-write space overflowed (LV {}/{}: attr {}, {}% used): the origin changed more than snapshot_reserve \
             after it was taken, so its content is lost; delete it (and raise snapshot_reserve for new snapshots)",
            lv.vg,
            lv.name,
            lv.attr.0,
            lv.data_percent.map(|p| format!("{p:.1}")).unwrap_or_else(|| "?".into())
        )
    })
}

/// VG and LV names: `[A-Za-z0-9+_.-]`, at most 127 characters, not starting with `-`.
fn valid_lvm_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 127
        && !s.starts_with('-')
        && s != "."
        && s != ".."
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c))
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The largest new thin LV: the pool may promise `size × ratio` in all, and back at most
/// `free × ratio` more; never negative. Whole MiB.
pub fn thin_available(pool_size: u64, data_percent: Option<f64>, promised: u64, ratio: f64) -> u64 {
    // An inactive pool reports no usage; its promises still bound it.
    let used = data_percent.unwrap_or(0.0).clamp(0.0, 100.0) / 100.0;
    let free = pool_size as f64 * (1.0 - used);
    let by_promises = pool_size as f64 * ratio - promised as f64;
    let avail = by_promises.min(free * ratio).max(0.0);
    (avail as u64) / MIB * MIB
}

/// The share of free extents a new thick LV can use with `options` (numerator, denominator):
/// mirrors keep `m + 1` copies, RAID 4/5/6 spend one or two stripes of every `stripes + parity`
/// on parity, RAID 10 keeps two copies. An estimate: where LVM places the extents (one
/// stripe or image per PV) is not modelled, and a create that does not fit still fails with
/// RESOURCE_EXHAUSTED.
pub fn thick_share(options: &[String]) -> (u64, u64) {
    let value = |long: &str, short: &str| -> Option<String> {
        let mut it = options.iter();
        while let Some(o) = it.next() {
            if o == long || (!short.is_empty() && o == short) {
                return it.next().cloned();
            }
            if let Some(v) = o.strip_prefix(&format!("{long}=")) {
                return Some(v.to_owned());
            }
            if !short.is_empty() && o.len() > short.len() && o.starts_with(short) {
                return Some(o[short.len()..].to_owned());
            }
        }
        None
    };
    let number = |long: &str, short: &str| value(long, short).and_then(|v| v.parse::<u64>().ok());
    let segtype = value("--type", "");
    let mirrors = number("--mirrors", "-m");
    let stripes = number("--stripes", "-i");
    match segtype.as_deref() {
        Some("raid1") | Some("mirror") => (1, mirrors.unwrap_or(1) + 1),
        Some("raid10") => (1, mirrors.unwrap_or(1) + 1),
        Some(t) if t.starts_with("raid6") => {
            let s = stripes.unwrap_or(3).max(1);
            (s, s + 2)
        }
        Some(t) if t.starts_with("raid5") || t.starts_with("raid4") => {
            let s = stripes.unwrap_or(2).max(1);
            (s, s + 1)
        }
        _ => match mirrors {
            Some(m) if m > 0 => (1, m + 1),
            _ => (1, 1),
        },
    }
}

/// An LVM pool.
pub struct LvmPool {
    name: String,
    vg: String,
    thin_pool: Option<String>,
    overprovision_ratio: f64,
    lvcreate_options: Vec<String>,
    /// Thick pools: the COW space of each snapshot.
    snapshot_reserve: SnapshotReserve,
    /// The block copies running now, by the local name of the volume they fill.
    copies: std::sync::Mutex<std::collections::HashMap<String, Arc<blockcopy::Progress>>>,
    default_fs: String,
    exec: Arc<dyn Exec>,
    /// Freezes btrfs volumes around snapshots (the driver's, shared by its pools).
    freezer: Arc<Freezer>,
}

impl std::fmt::Debug for LvmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LvmPool").field("name", &self.name).field("vg", &self.vg).field("thin_pool", &self.thin_pool).finish()
    }
}

impl LvmPool {
    /// A pool over the volume group (and thin pool) of `cfg`. Checks the names and options;
    /// whether the volume group exists is found out (and said) by the first operation.
    pub fn new(cfg: &PoolConfig, exec: Arc<dyn Exec>) -> Result<LvmPool> {
        let name = cfg.name().to_owned();
        let bad = |m: String| Error::InvalidArgument(format!("pool {name:?}: {m}"));
        let vg = cfg.volume_group.clone().ok_or_else(|| bad("an lvm pool needs `volume_group`".into()))?;
        if !valid_lvm_name(&vg) {
            return Err(bad(format!("volume_group {vg:?} is not a valid LVM name (A-Z a-z 0-9 + _ . -)")));
        }
        if let Some(tp) = &cfg.thin_pool {
            if !valid_lvm_name(tp) {
                return Err(bad(format!("thin_pool {tp:?} is not a valid LVM name (A-Z a-z 0-9 + _ . -)")));
            }
        }
        let ratio = cfg.overprovision_ratio.unwrap_or(DEFAULT_OVERPROVISION_RATIO);
        if cfg.thin_pool.is_none() && cfg.overprovision_ratio.is_some() {
            return Err(bad("overprovision_ratio applies to thin pools only: set thin_pool or remove it".into()));
        }
        if !(ratio.is_finite() && ratio >= 1.0) {
            return Err(bad(format!("overprovision_ratio {ratio} must be a number >= 1.0")));
        }
        let options = cfg.lvcreate_options.clone().unwrap_or_default();
        for o in &options {
            let flag = o.split('=').next().unwrap_or(o);
            let short_with_value =
                RESERVED_OPTIONS.iter().any(|r| r.len() == 2 && flag.len() > 2 && !flag.starts_with("--") && flag.starts_with(r));
            if RESERVED_OPTIONS.contains(&flag) || short_with_value {
                return Err(bad(format!(
                    "lvcreate_options may not contain {o:?}: holdfast sets name, size, pool, tags and activation itself"
                )));
            }
        }
        let snapshot_reserve = match &cfg.snapshot_reserve {
            None => DEFAULT_SNAPSHOT_RESERVE,
            Some(_) if cfg.thin_pool.is_some() => {
                return Err(bad("snapshot_reserve applies to thick pools only (thin snapshots need no reserve): remove it".into()));
            }
            Some(r) => SnapshotReserve::parse(r).ok_or_else(|| {
                bad(format!("snapshot_reserve {r:?} is neither a share of the origin from 1% to 100% nor a size from 1 MiB to 1 EiB (\"20%\", \"1GiB\")"))
            })?,
        };
        let default_fs = cfg.default_fs.clone().unwrap_or_else(|| "ext4".to_owned());
        // Replaced by the driver's own (`with_freezer`); this one keeps no records.
        let freezer = Arc::new(Freezer::unrecorded(exec.clone()));
        Ok(LvmPool {
            name,
            vg,
            thin_pool: cfg.thin_pool.clone(),
            overprovision_ratio: ratio,
            lvcreate_options: options,
            snapshot_reserve,
            copies: Default::default(),
            default_fs,
            exec,
            freezer,
        })
    }

    /// Freezes with `freezer` (the driver's: recorded, shared by its pools).
    pub fn with_freezer(mut self, freezer: Arc<Freezer>) -> Self {
        self.freezer = freezer;
        self
    }

    /// Resumes the device-mapper devices of this pool's volume group left suspended (by a
    /// killed `lvcreate --snapshot` or `lvextend`); returns their names. See [`dm`].
    pub async fn resume_suspended(&self) -> Result<Vec<String>> {
        let out = self.exec.run(dm::info()).await.map_err(|e| Error::exec("listing device-mapper devices", e))?;
        let names = dm::suspended(&self.vg, &out.stdout);
        for name in &names {
            self.exec.run(dm::resume(name)).await.map_err(|e| Error::exec(format!("resuming device-mapper device {name}"), e))?;
            tracing::warn!(pool = %self.name, device = %name, "resumed a device-mapper device left suspended by an interrupted LVM command");
        }
        Ok(names)
    }

    /// Runs `snapshot` (an `lvcreate --snapshot` of `origin`, for snapshot or clone `purpose`)
    /// with the filesystems LVM's suspend does not freeze frozen by the [`Freezer`] (its
    /// policy: recorded, thawed on every path, FAILED_PRECONDITION when it cannot freeze).
    async fn snapshot_frozen(
        &self,
        origin: &Lv,
        origin_local: &str,
        purpose: String,
        snapshot: crate::exec::Cmd,
    ) -> Result<(), SnapshotError> {
        let device = self.device_path(origin);
        let mounts = self.freezer.mounter().mounts().await.map_err(SnapshotError::Freeze)?;
        // Resolving the device and the mount sources are filesystem calls: off the workers.
        let mount_points =
            crate::blocking::run("mountinfo", "finding the mounts of a device", crate::blocking::METADATA_DEADLINE, move || {
                mounted_filesystems(&device, &mounts)
            })
            .await
            .map_err(SnapshotError::Freeze)?;
        let target = Target { pool: self.name.clone(), volume: origin_local.to_owned(), mount_points, purpose };
        let exec = self.exec.clone();
        let result = self.freezer.around(target, async move { exec.run(snapshot).await.map(|_| ()) }).await;
        // A killed lvcreate can leave the origin suspended, and its writers hanging.
        if matches!(result, Err(Error::DeadlineExceeded(_)) | Ok(Err(crate::exec::ExecError::Timeout { .. }))) {
            match self.resume_suspended().await {
                Ok(n) if !n.is_empty() => tracing::warn!(pool = %self.name, devices = ?n, "resumed after a killed snapshot command"),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(pool = %self.name, error = %e, "cannot check for suspended devices after a killed snapshot command")
                }
            }
        }
        result.map_err(SnapshotError::Freeze)?.map_err(SnapshotError::Lvm)
    }

    /// The volume group.
    pub fn volume_group(&self) -> &str {
        &self.vg
    }

    /// The thin pool, when volumes are thin.
    pub fn thin_pool(&self) -> Option<&str> {
        self.thin_pool.as_deref()
    }

    /// The volume group's size, free space and extent size (`vgs`).
    async fn vg_info(&self) -> Result<report::Vg> {
        let out = match self.exec.run(command::vgs(&self.vg)).await {
            Ok(out) => out,
            Err(e) if command::is_vg_not_found(&e) => return Err(Error::FailedPrecondition(self.vg_missing())),
            Err(e) => return Err(Error::exec(format!("reading volume group {}", self.vg), e)),
        };
        let vgs = report::parse_vgs(&out.stdout).map_err(|e| Error::Internal(format!("reading volume group {}: {e}", self.vg)))?;
        vgs.into_iter().find(|v| v.name == self.vg).ok_or_else(|| Error::FailedPrecondition(self.vg_missing()))
    }

    fn vg_missing(&self) -> String {
        format!(
            "volume group {:?} of pool {:?} does not exist on this node: create it (vgcreate) or fix volume_group in the config",
            self.vg, self.name
        )
    }

    /// One LV by name; `None` when it does not exist.
    async fn lookup(&self, lv: &str) -> Result<Option<Lv>> {
        let target = format!("{}/{lv}", self.vg);
        match self.exec.run(command::lvs(&target)).await {
            Ok(out) => {
                let lvs = report::parse_lvs(&out.stdout).map_err(|e| Error::Internal(format!("reading LV {target}: {e}")))?;
                Ok(lvs.into_iter().find(|l| l.name == lv))
            }
            Err(e) if command::is_lv_not_found(&e) => Ok(None),
            Err(e) if command::is_vg_not_found(&e) => Err(Error::FailedPrecondition(self.vg_missing())),
            Err(e) => Err(Error::exec(format!("looking up LV {target}"), e)),
        }
    }

    /// Every LV of the volume group.
    async fn list_lvs(&self) -> Result<Vec<Lv>> {
        match self.exec.run(command::lvs(&self.vg)).await {
            Ok(out) => report::parse_lvs(&out.stdout).map_err(|e| Error::Internal(format!("listing LVs of {}: {e}", self.vg))),
            Err(e) if command::is_vg_not_found(&e) => Err(Error::FailedPrecondition(self.vg_missing())),
            Err(e) => Err(Error::exec(format!("listing LVs of volume group {}", self.vg), e)),
        }
    }

    /// The holdfast record of `lv` when it is an object of type `object` of this pool.
    /// `Err` when it carries the marker but its tags are damaged.
    fn ours(&self, lv: &Lv, object: ObjectType) -> Result<Option<Meta>, String> {
        let Some(meta) = tags::decode(&lv.tags)? else {
            return Ok(None);
        };
        let expected = match object {
            ObjectType::Volume => volume_lv(&meta.local),
            ObjectType::Snapshot => snapshot_lv(&meta.local),
        };
        Ok((meta.pool == self.name && meta.object == object && expected == lv.name).then_some(meta))
    }

    /// The LV and record of this pool's volume or snapshot `local`; `None` when there is none
    /// (an LV of that name that is not ours counts as none, with a warning).
    async fn find(&self, local: &str, object: ObjectType) -> Result<Option<(Lv, Meta)>> {
        if !valid_local_name(local) {
            return Ok(None);
        }
        let name = match object {
            ObjectType::Volume => volume_lv(local),
            ObjectType::Snapshot => snapshot_lv(local),
        };
        let Some(lv) = self.lookup(&name).await? else {
            return Ok(None);
        };
        self.classify(lv, object)
    }

    /// The record of `lv`, an LV named for one of this pool's objects of type `object`, when it
    /// is one; `None` (with a warning) when it is not ours.
    fn classify(&self, lv: Lv, object: ObjectType) -> Result<Option<(Lv, Meta)>> {
        match self.ours(&lv, object) {
            Ok(Some(meta)) => Ok(Some((lv, meta))),
            Ok(None) => {
                tracing::warn!(pool = %self.name, lv = %format!("{}/{}", self.vg, lv.name), "LV exists but is not a {object:?} of this pool; leaving it alone");
                Ok(None)
            }
            Err(e) => Err(Error::Internal(format!(
                "LV {}/{} carries the holdfast marker but its tags are damaged ({e}); fix the tags or remove the LV by hand",
                self.vg, lv.name
            ))),
        }
    }

    fn volume_info(lv: &Lv, meta: Meta) -> VolumeInfo {
        Self::volume_of(meta, lv.size)
    }

    /// The volume a record describes, of `size` bytes.
    fn volume_of(meta: Meta, size: u64) -> VolumeInfo {
        VolumeInfo {
            local: meta.local,
            csi_name: meta.csi_name,
            capacity: size,
            block: meta.block,
            fs_type: meta.fs_type,
            source: meta.source,
            created: meta.created,
            uid: meta.uid,
            source_uid: meta.source_uid,
            parameters: meta.parameters,
            // LVM volumes take no mutable parameters (issue 12: modify; docs/operations.md).
            mutable: Default::default(),
        }
    }

    fn snapshot_info(lv: &Lv, meta: Meta) -> SnapshotInfo {
        let source_volume = match meta.source {
            Some(Source::Volume(v)) => v,
            _ => String::new(),
        };
        SnapshotInfo {
            local: meta.local,
            csi_name: meta.csi_name,
            source_volume,
            size: if meta.size > 0 { meta.size } else { lv.size },
            created: meta.created,
            ready: snapshot_problem(lv).is_none(),
            uid: meta.uid,
            source_uid: meta.source_uid,
            group: meta.group,
        }
    }

    /// `/dev/<vg>/<lv>` (present only while the LV is active).
    fn device_path(&self, lv: &Lv) -> PathBuf {
        if lv.path.is_empty() { PathBuf::from(format!("/dev/{}/{}", self.vg, lv.name)) } else { PathBuf::from(&lv.path) }
    }

    /// The device of `lv`, activated (also when activation-skipped) and present.
    async fn activate(&self, lv: &Lv) -> Result<PathBuf> {
        let target = format!("{}/{}", self.vg, lv.name);
        if !lv.attr.active() {
            self.exec.run(command::lvchange_activate(&self.vg, &lv.name)).await.context(|| format!("activating LV {target}"))?;
        }
        let path = self.device_path(lv);
        crate::pool::wait_for_device(&path, DEVICE_WAIT, " of activating the LV; is udev running (udevadm settle)?").await?;
        Ok(path)
    }

    /// The largest new thin LV, from a listing of the volume group.
    fn thin_available_in(&self, pool: &str, lvs: &[Lv]) -> Result<u64> {
        let Some(tp) = lvs.iter().find(|l| l.name == pool) else {
            return Err(Error::FailedPrecondition(format!(
                "thin pool {}/{pool} of pool {:?} does not exist: create it (lvcreate --type thin-pool) or fix thin_pool in the config",
                self.vg, self.name
            )));
        };
        // Snapshots are never written, so they promise nothing; every other thin LV of the
        // pool (holdfast's or not) may grow to its virtual size.
        let promised: u64 = lvs
            .iter()
            .filter(|l| l.pool_lv == pool)
            .filter(|l| !matches!(tags::decode(&l.tags), Ok(Some(Meta { object: ObjectType::Snapshot, .. }))))
            .map(|l| l.size)
            .sum();
        Ok(thin_available(tp.size, tp.data_percent, promised, self.overprovision_ratio))
    }

    /// Refuses to promise more than the thin pool may give (LVM itself only warns).
    async fn check_thin_room(&self, pool: &str, extra: u64, what: &str) -> Result<()> {
        self.check_thin_room_in(pool, &self.list_lvs().await?, extra, what)
    }

    /// [`LvmPool::check_thin_room`] against a listing of the volume group just read.
    fn check_thin_room_in(&self, pool: &str, lvs: &[Lv], extra: u64, what: &str) -> Result<()> {
        let avail = self.thin_available_in(pool, lvs)?;
        if extra > avail {
            return Err(Error::ResourceExhausted(format!(
                "{what} needs {} more in thin pool {}/{pool}, which can promise only {} more (overprovision_ratio {}); free space or extend the thin pool",
                format_size(extra),
                self.vg,
                format_size(avail),
                self.overprovision_ratio
            )));
        }
        Ok(())
    }

    /// A create found an LV of the name: the same request (Ok, finishing an interrupted
    /// copy) or a conflict.
    async fn existing_volume(&self, req: &CreateRequest, lv: Lv) -> Result<VolumeInfo> {
        let meta = match self.ours(&lv, ObjectType::Volume) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => {
                return Err(Error::AlreadyExists(format!(
                    "LV {}/{} already exists and is not a volume of holdfast pool {:?}; rename or remove it, or use another name",
                    self.vg, lv.name, self.name
                )));
            }
        };
        // The capacity the volume was requested with is compared (the LV is rounded to extents).
        let recorded = VolumeInfo { capacity: meta.capacity, ..Self::volume_info(&lv, meta.clone()) };
        let differences = recorded.conflicts_with(req);
        if !differences.is_empty() {
            return Err(Error::AlreadyExists(format!(
                "volume {:?} already exists in pool {:?} for another request: {}",
                req.csi_name,
                self.name,
                differences.join("; ")
            )));
        }
        if meta.pending {
            self.finish_copy(&lv, req.capacity, req.block, meta.source.as_ref().map(|s| (s, meta.csi_name.as_str()))).await?;
            return self.read_volume(&lv.name).await;
        }
        Ok(Self::volume_info(&lv, meta))
    }

    /// A new thin volume (no source) in thin pool `pool`, against `lvs`, a listing of the volume group read in the
    /// same create: an LV of the name there answers as a retry; otherwise the thin pool's room
    /// is checked and the LV made.
    async fn create_thin(&self, req: &CreateRequest, pool: &str, lvs: &[Lv]) -> Result<VolumeInfo> {
        let lv_name = volume_lv(&req.local);
        if let Some(lv) = lvs.iter().find(|l| l.name == lv_name) {
            return self.existing_volume(req, lv.clone()).await;
        }
        self.check_thin_room_in(pool, lvs, req.capacity, &format!("volume {:?}", req.csi_name))?;
        let meta = self.new_meta(req, false);
        let tags = tags::encode(&meta).map_err(Error::InvalidArgument)?;
        let cmd = command::lvcreate_thin(&self.vg, pool, &lv_name, req.capacity, &tags, &self.lvcreate_options);
        if let Some(existing) = self.run_create(cmd, &lv_name, req, None).await? {
            return Ok(existing);
        }
        // issue 14: no read-back when the size is known. `lvcreate --virtualsize` makes a thin LV
        // of whole extents of the volume group, rounding up, so a capacity that is a whole
        // number of extents is made exactly; the record is the tags lvcreate was given. Extra
        // `lvcreate_options` could change what is made: then it is read back.
        match lvs.iter().find_map(|l| l.extent_size) {
            Some(e) if req.capacity % e == 0 && self.lvcreate_options.is_empty() => Ok(Self::volume_of(meta, req.capacity)),
            _ => self.read_volume(&lv_name).await,
        }
    }

    /// Attaches volume `local`, found as `lv` with record `meta`.
    async fn attach_lv(&self, local: &str, lv: Lv, meta: Meta) -> Result<Attachment> {
        if meta.pending {
            return Err(Error::FailedPrecondition(format!("volume {local:?} is an unfinished copy; retry its creation first")));
        }
        Ok(Attachment::Device(self.activate(&lv).await?))
    }

    /// Reads back a volume this pool just made.
    async fn read_volume(&self, lv: &str) -> Result<VolumeInfo> {
        let found = self.lookup(lv).await?;
        let got = found.as_ref().map(|l| (l, self.ours(l, ObjectType::Volume)));
        match got {
            Some((l, Ok(Some(meta)))) => Ok(Self::volume_info(l, meta)),
            _ => Err(Error::Internal(format!("LV {}/{lv} vanished or lost its tags right after it was made", self.vg))),
        }
    }

    /// Ends a restore or clone with the shared flow ([`crate::pool::copy::finish`]): grow to
    /// the requested size, give the filesystem a new UUID, drop the pending tag. A thick copy
    /// (its `source` and CSI name given) is filled by block copy first, from the start.
    async fn finish_copy(&self, lv: &Lv, capacity: u64, block: bool, thick: Option<(&Source, &str)>) -> Result<()> {
        if let (None, Some((source, csi_name))) = (&self.thin_pool, thick) {
            match self.fill_thick(lv, source, csi_name).await {
                Ok(()) => {}
                // The source cannot give it (overflowed, gone): the unfinished copy goes, so a
                // failed create leaves nothing behind.
                Err(e @ (Error::FailedPrecondition(_) | Error::NotFound(_))) => {
                    if let Err(r) = self.remove(&lv.name, &format!("unfinished copy for {csi_name:?}")).await {
                        tracing::warn!(pool = %self.name, lv = %lv.name, error = %r, "cannot remove an unfinished copy");
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        crate::pool::copy::finish(self.exec.as_ref(), &LvCopy { pool: self, lv }, capacity, block).await
    }

    async fn create_copy(&self, req: &CreateRequest, source: &Source, lv_name: &str) -> Result<VolumeInfo> {
        let origin = match source {
            Source::Snapshot(s) => {
                let found = self
                    .find(s, ObjectType::Snapshot)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("snapshot {s:?} not found in pool {:?}", self.name)))?;
                if let Some(p) = snapshot_problem(&found.0) {
                    return Err(Error::FailedPrecondition(format!("snapshot {:?} cannot be restored: {p}", found.1.csi_name)));
                }
                found
            }
            Source::Volume(v) => {
                let found = self
                    .find(v, ObjectType::Volume)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("volume {v:?} not found in pool {:?}", self.name)))?;
                if found.1.pending {
                    return Err(Error::FailedPrecondition(format!("volume {v:?} is itself an unfinished copy; retry its creation first")));
                }
                found
            }
        };
        let (origin_lv, _) = origin;
        if req.capacity < origin_lv.size {
            return Err(Error::OutOfRange(format!(
                "the copy needs at least {} (the size of its source), not {}",
                format_size(origin_lv.size),
                format_size(req.capacity)
            )));
        }
        let Some(pool) = self.thin_pool.as_deref() else {
            return self.create_thick_copy(req, lv_name).await;
        };
        self.check_thin_room(pool, req.capacity, &format!("volume {:?}", req.csi_name)).await?;
        let meta = self.new_meta(req, true);
        let tags = tags::encode(&meta).map_err(Error::InvalidArgument)?;
        let cmd = command::lvcreate_snapshot(&self.vg, &origin_lv.name, lv_name, &tags, true);
        // A clone copies a volume that may be mounted and written: freeze it. A snapshot is
        // never mounted.
        let freeze = match source {
            Source::Volume(v) => Some((&origin_lv, v.as_str())),
            Source::Snapshot(_) => None,
        };
        if let Some(existing) = self.run_create(cmd, lv_name, req, freeze).await? {
            return Ok(existing);
        }
        let lv = self
            .lookup(lv_name)
            .await?
            .ok_or_else(|| Error::Internal(format!("LV {}/{lv_name} vanished right after it was made", self.vg)))?;
        self.finish_copy(&lv, req.capacity, req.block, None).await?;
        self.read_volume(lv_name).await
    }

    fn new_meta(&self, req: &CreateRequest, pending: bool) -> Meta {
        Meta {
            pool: self.name.clone(),
            object: ObjectType::Volume,
            local: req.local.clone(),
            csi_name: req.csi_name.clone(),
            capacity: req.capacity,
            block: req.block,
            fs_type: if req.block { None } else { req.fs_type.clone() },
            source: req.source.clone(),
            size: 0,
            created: now(),
            pending,
            uid: Some(req.uid.clone()),
            source_uid: req.source_uid.clone(),
            parameters: Some(req.parameters.clone()),
            group: None,
        }
    }

    /// A thick restore or clone: a new thick LV, tagged pending, then filled by block copy
    /// ([`LvmPool::finish_copy`]). A retry that finds it pending fills it again.
    async fn create_thick_copy(&self, req: &CreateRequest, lv_name: &str) -> Result<VolumeInfo> {
        let tags = tags::encode(&self.new_meta(req, true)).map_err(Error::InvalidArgument)?;
        let cmd = command::lvcreate_thick(&self.vg, lv_name, req.capacity, &tags, &self.lvcreate_options);
        if let Some(existing) = self.run_create(cmd, lv_name, req, None).await? {
            return Ok(existing);
        }
        let lv = self
            .lookup(lv_name)
            .await?
            .ok_or_else(|| Error::Internal(format!("LV {}/{lv_name} vanished right after it was made", self.vg)))?;
        let source = req.source.as_ref().ok_or_else(|| Error::Internal("a thick copy without a source".into()))?;
        self.finish_copy(&lv, req.capacity, req.block, Some((source, &req.csi_name))).await?;
        self.read_volume(lv_name).await
    }

    /// Fills the thick LV `target` with the content of `source`: a snapshot is read as it is
    /// (and checked again after the copy: an overflow meanwhile spoils what was read); a volume
    /// through a temporary COW snapshot taken for the copy (frozen like a snapshot, so a mounted
    /// source is copied consistently) and removed after it.
    async fn fill_thick(&self, target: &Lv, source: &Source, csi_name: &str) -> Result<()> {
        let dst = self.activate(target).await?;
        let target_local = tags::decode(&target.tags).ok().flatten().map(|m| m.local).unwrap_or_default();
        match source {
            Source::Snapshot(s) => {
                let (snap, meta) = self
                    .find(s, ObjectType::Snapshot)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("snapshot {s:?} not found in pool {:?}", self.name)))?;
                let unusable = |p: String| Error::FailedPrecondition(format!("snapshot {:?} cannot be restored: {p}", meta.csi_name));
                if let Some(p) = snapshot_problem(&snap) {
                    return Err(unusable(p));
                }
                let src = self.activate(&snap).await?;
                self.block_copy(&src, &dst, &target_local).await?;
                match self.lookup(&snap.name).await? {
                    Some(after) => snapshot_problem(&after).map_or(Ok(()), |p| Err(unusable(p))),
                    None => Err(Error::NotFound(format!("snapshot {s:?} was removed during the copy"))),
                }
            }
            Source::Volume(v) => {
                let (origin, _) = self
                    .find(v, ObjectType::Volume)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("volume {v:?} not found in pool {:?}", self.name)))?;
                let tmp = copy_source_lv(&target_local);
                // What a killed attempt left: it may have overflowed since, so it is not reused.
                self.remove_copy_source(&tmp).await?;
                let meta = Meta {
                    pool: self.name.clone(),
                    object: ObjectType::Snapshot,
                    local: target_local.clone(),
                    csi_name: csi_name.to_owned(),
                    capacity: 0,
                    block: false,
                    fs_type: None,
                    source: Some(Source::Volume(v.clone())),
                    size: origin.size,
                    created: now(),
                    pending: true,
                    uid: None,
                    source_uid: None,
                    parameters: None,
                    group: None,
                };
                let tags = tags::encode(&meta).map_err(Error::InvalidArgument)?;
                let cow = self.snapshot_reserve.cow_size(origin.size);
                let cmd = command::lvcreate_cow_snapshot(&self.vg, &origin.name, &tmp, cow, &tags);
                match self.snapshot_frozen(&origin, v, format!("clone {csi_name:?}"), cmd).await {
                    Ok(()) => {}
                    Err(SnapshotError::Freeze(e)) => return Err(e),
                    Err(SnapshotError::Lvm(e)) if command::is_no_space(&e) => {
                        return Err(Error::ResourceExhausted(format!(
                            "no room in volume group {} for the {} temporary snapshot a clone of volume {v:?} copies from: {}",
                            self.vg,
                            format_size(cow),
                            e.stderr().trim()
                        )));
                    }
                    Err(SnapshotError::Lvm(e)) => {
                        return Err(Error::exec(format!("snapshotting LV {}/{} as {tmp}", self.vg, origin.name), e));
                    }
                }
                let copied = async {
                    let lv = self.lookup(&tmp).await?.ok_or_else(|| Error::Internal(format!("LV {}/{tmp} vanished", self.vg)))?;
                    let src = self.activate(&lv).await?;
                    self.block_copy(&src, &dst, &target_local).await?;
                    match self.lookup(&tmp).await?.as_ref().and_then(snapshot_problem) {
                        // Retryable: a quieter moment, or a larger reserve, lets it through.
                        Some(_) => Err(Error::Aborted(format!(
                            "volume {v:?} changed by more than snapshot_reserve ({}) while it was copied; retry, or raise \
                             snapshot_reserve",
                            self.snapshot_reserve
                        ))),
                        None => Ok(()),
                    }
                }
                .await;
                let removed = self.remove_copy_source(&tmp).await;
                copied?;
                removed
            }
        }
    }

    /// Removes the temporary snapshot `lv` of a thick clone when it is there and ours.
    async fn remove_copy_source(&self, lv: &str) -> Result<()> {
        let Some(found) = self.lookup(lv).await? else { return Ok(()) };
        let ours = tags::decode(&found.tags).ok().flatten().is_some_and(|m| {
            m.pool == self.name && m.object == ObjectType::Snapshot && m.pending && copy_source_lv(&m.local) == found.name
        });
        if !ours {
            return Err(Error::FailedPrecondition(format!(
                "LV {}/{lv} exists and is not a temporary copy source of holdfast pool {:?}; rename or remove it",
                self.vg, self.name
            )));
        }
        self.remove(lv, &format!("temporary copy source {lv}")).await
    }

    /// Copies block device `src` onto `dst` (the device of volume `local`) off the workers,
    /// counting progress for [`Pool::copy_progress`].
    async fn block_copy(&self, src: &Path, dst: &Path, local: &str) -> Result<()> {
        let progress = Arc::new(blockcopy::Progress::default());
        self.copies.lock().unwrap_or_else(|p| p.into_inner()).insert(local.to_owned(), progress.clone());
        let (s, d) = (src.to_owned(), dst.to_owned());
        let what = format!("copying {} to {}", src.display(), dst.display());
        let domain = format!("lvm:{}", self.vg);
        let copied = crate::blocking::run(&domain, &what, COPY_TIMEOUT, move || blockcopy::copy(&s, &d, &progress)).await;
        self.copies.lock().unwrap_or_else(|p| p.into_inner()).remove(local);
        let copied = copied??;
        tracing::info!(pool = %self.name, src = %src.display(), dst = %dst.display(), written = copied.written, zeroed = copied.zeroed, "block copy done");
        Ok(())
    }

    /// Grows thick volume `lv`, the origin of COW snapshots, which LVM does only while it is
    /// inactive (found on the VM's LVM 2.03: "Snapshot origin volumes can be resized only while
    /// inactive"). A volume in use (mounted, or a raw block volume open) cannot be deactivated:
    /// FAILED_PRECONDITION naming the snapshots, so a retry once it is unstaged grows it (the
    /// resizer retries, and NodeExpandVolume grows the filesystem at the next stage). Otherwise
    /// it is deactivated with its snapshots, extended, and activated again whatever happened;
    /// a driver killed in between leaves it inactive, and the next attach activates it.
    async fn extend_inactive(
        &self,
        lv: &Lv,
        local: &str,
        capacity: u64,
    ) -> Result<std::result::Result<crate::exec::Output, crate::exec::ExecError>> {
        let snapshots = || async {
            let mut names = Vec::new();
            for child in self.list_lvs().await?.into_iter().filter(|c| c.origin == lv.name) {
                match self.ours(&child, ObjectType::Snapshot) {
                    Ok(Some(meta)) => names.push(format!("{:?}", meta.csi_name)),
                    _ => names.push(format!("LV {}/{}", self.vg, child.name)),
                }
            }
            Ok::<_, Error>(names.join(", "))
        };
        let in_use = |names: String| {
            Error::FailedPrecondition(format!(
                "volume {local:?} has snapshots ({names}), and LVM grows the origin of thick snapshots only while it is inactive, \
                 which it cannot be while it is in use: unstage the volume (stop what uses it) and retry, or delete the snapshots"
            ))
        };
        if self.open_count(&lv.name).await? > 0 {
            return Err(in_use(snapshots().await?));
        }
        match self.exec.run(command::lvchange_deactivate(&self.vg, &lv.name)).await {
            Ok(_) => {}
            // Opened meanwhile, or one of its snapshots is (a restore copying from it).
            Err(e) if command::is_in_use(&e) => return Err(in_use(snapshots().await?)),
            Err(e) => return Err(Error::exec(format!("deactivating LV {}/{} to grow it", self.vg, lv.name), e)),
        }
        let extended = self.exec.run(command::lvextend(&self.vg, &lv.name, capacity)).await;
        self.exec
            .run(command::lvchange_activate(&self.vg, &lv.name))
            .await
            .map_err(|e| Error::exec(format!("activating LV {}/{} again after growing it", self.vg, lv.name), e))?;
        tracing::info!(pool = %self.name, lv = %lv.name, ok = extended.is_ok(), "extended a thick snapshot origin while inactive");
        Ok(extended)
    }

    /// A thick volume's COW snapshots die with it: its deletion is refused while it has any
    /// (naming them). A clone's temporary snapshot left by a killed copy is removed.
    async fn refuse_if_snapshotted(&self, lv: &Lv, local: &str) -> Result<()> {
        let mut names = Vec::new();
        for child in self.list_lvs().await?.into_iter().filter(|c| c.origin == lv.name) {
            match self.ours(&child, ObjectType::Snapshot) {
                Ok(Some(meta)) => names.push(format!("{:?}", meta.csi_name)),
                _ if child.name.starts_with("hfc-") => self.remove_copy_source(&child.name).await?,
                // Not ours: lvremove would take it along with its origin.
                _ => names.push(format!("LV {}/{} (not holdfast's)", self.vg, child.name)),
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "volume {local:?} has snapshots: {}; a thick LVM snapshot is a copy-on-write LV that cannot outlive its origin, \
             so delete the snapshots first",
            names.join(", ")
        )))
    }

    /// Runs an `lvcreate` of volume `lv` (a snapshot of `origin`, frozen, for a clone).
    /// `Ok(Some)`: the LV already existed and matches (a retry that raced); `Ok(None)`: created.
    async fn run_create(
        &self,
        cmd: crate::exec::Cmd,
        lv: &str,
        req: &CreateRequest,
        origin: Option<(&Lv, &str)>,
    ) -> Result<Option<VolumeInfo>> {
        let result = match origin {
            Some((o, local)) => match self.snapshot_frozen(o, local, format!("clone {:?}", req.csi_name), cmd).await {
                Ok(()) => Ok(()),
                Err(SnapshotError::Lvm(e)) => Err(e),
                Err(SnapshotError::Freeze(e)) => return Err(e),
            },
            None => self.exec.run(cmd).await.map(|_| ()),
        };
        match result {
            Ok(()) => {
                tracing::info!(pool = %self.name, lv = %format!("{}/{lv}", self.vg), csi_name = %req.csi_name, capacity = req.capacity, "created LV");
                Ok(None)
            }
            Err(e) if command::is_lv_exists(&e) => match self.lookup(lv).await? {
                Some(found) => self.existing_volume(req, found).await.map(Some),
                None => Err(Error::Aborted(format!("LV {}/{lv} was created and removed at the same time; retry", self.vg))),
            },
            Err(e) if command::is_no_space(&e) => Err(Error::ResourceExhausted(format!(
                "no room for {} in volume group {} of pool {:?}: {}",
                format_size(req.capacity),
                self.vg,
                self.name,
                e.stderr().trim()
            ))),
            Err(e) if command::is_vg_not_found(&e) => Err(Error::FailedPrecondition(self.vg_missing())),
            Err(e) => Err(Error::exec(format!("creating LV {}/{lv} for volume {:?}", self.vg, req.csi_name), e)),
        }
    }

    async fn remove(&self, lv: &str, what: &str) -> Result<()> {
        match self.exec.run(command::lvremove(&self.vg, lv)).await {
            Ok(_) => {
                tracing::info!(pool = %self.name, lv = %format!("{}/{lv}", self.vg), "removed LV");
                Ok(())
            }
            Err(e) if command::is_lv_not_found(&e) => Ok(()),
            Err(e) if command::is_in_use(&e) => Err(Error::FailedPrecondition(format!(
                "{what} (LV {}/{lv}) is in use on this node (mounted or open): unpublish and unstage it first",
                self.vg
            ))),
            Err(e) => Err(Error::exec(format!("removing LV {}/{lv} ({what})", self.vg), e)),
        }
    }

    /// Why a thin pool makes its volumes abnormal, if it does.
    fn thin_pool_problem(pool: &Lv) -> Option<String> {
        let id = format!("{}/{}", pool.vg, pool.name);
        if let Some(h) = pool.attr.health_problem() {
            return Some(format!("thin pool {id} is {h}"));
        }
        if let Some(s) = pool.attr.state_problem() {
            return Some(format!("thin pool {id} is {s}"));
        }
        for (what, pct) in [("data", pool.data_percent), ("metadata", pool.metadata_percent)] {
            if let Some(p) = pct.filter(|p| *p >= THIN_POOL_FULL_PERCENT) {
                return Some(format!("thin pool {id} is {p:.1}% full ({what}); writes will fail when it is full: extend it (lvextend)"));
            }
        }
        None
    }
}

/// Mount points of the filesystems on `device` that LVM's suspend cannot freeze, one per
/// filesystem (bind mounts share the superblock, so freezing one freezes all). ext4 and XFS
/// are bound to the device (mountinfo shows its number): the device-mapper suspend of
/// `lvcreate --snapshot` freezes them itself, and freezing them first would make that suspend
/// fail with EBUSY. btrfs shows an anonymous device number and is matched by its source.
fn mounted_filesystems(device: &Path, mounts: &[crate::node::mountinfo::MountInfo]) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let Ok(real) = std::fs::canonicalize(device) else {
        return Vec::new();
    };
    let dev_id = std::fs::metadata(&real).map(|m| format!("{}:{}", nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev()))).ok();
    let mut seen = Vec::new();
    let mut points = Vec::new();
    for m in mounts {
        let by_number = dev_id.as_deref() == Some(m.major_minor.as_str());
        let by_source = m.source.starts_with("/dev/") && std::fs::canonicalize(&m.source).is_ok_and(|s| s == real);
        if by_source && !by_number && !seen.contains(&m.major_minor) {
            seen.push(m.major_minor.clone());
            points.push(m.mount_point.clone());
        }
    }
    points
}

/// Why [`LvmPool::snapshot_frozen`] failed.
enum SnapshotError {
    /// lvcreate failed (to be classified).
    Lvm(crate::exec::ExecError),
    /// The freeze policy refused or a thaw failed (already the answer).
    Freeze(Error),
}

#[async_trait]
impl Pool for LvmPool {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> PoolKind {
        PoolKind::Lvm
    }

    fn default_fs(&self) -> &str {
        &self.default_fs
    }

    async fn create_volume(&self, req: &CreateRequest) -> Result<VolumeInfo> {
        if !valid_local_name(&req.local) {
            return Err(Error::InvalidArgument(format!("{:?} is not a valid local volume name", req.local)));
        }
        let lv_name = volume_lv(&req.local);
        // issue 14: a new thin volume costs one `lvs` before lvcreate, not two: the listing of
        // the volume group that the room check reads also says whether the LV exists already.
        if let (Some(pool), None) = (self.thin_pool.as_deref(), &req.source) {
            return self.create_thin(req, pool, &self.list_lvs().await?).await;
        }
        if let Some(lv) = self.lookup(&lv_name).await? {
            return self.existing_volume(req, lv).await;
        }
        if let Some(source) = &req.source {
            return self.create_copy(req, source, &lv_name).await;
        }
        let tags = tags::encode(&self.new_meta(req, false)).map_err(Error::InvalidArgument)?;
        let cmd = command::lvcreate_thick(&self.vg, &lv_name, req.capacity, &tags, &self.lvcreate_options);
        if let Some(existing) = self.run_create(cmd, &lv_name, req, None).await? {
            return Ok(existing);
        }
        self.read_volume(&lv_name).await
    }

    async fn survey(&self, names: &[&str]) -> Result<crate::pool::Survey> {
        let Some(pool) = self.thin_pool.as_deref() else {
            return crate::pool::survey_by_lookups(self, names).await;
        };
        // issue 14: one `lvs` of the volume group answers a create's retry check for every name,
        // the thin pool's room (placement), the extent size (the allocation unit), and the
        // create's own check that the LV is not there ([`Pool::create_surveyed`]).
        let lvs = self.list_lvs().await?;
        let mut found = None;
        for (i, local) in names.iter().enumerate().filter(|(_, l)| valid_local_name(l)) {
            let name = volume_lv(local);
            let Some(lv) = lvs.iter().find(|l| l.name == name) else { continue };
            if let Some((lv, meta)) = self.classify(lv.clone(), ObjectType::Volume)? {
                found = Some((i, Self::volume_info(&lv, meta)));
                break;
            }
        }
        Ok(crate::pool::Survey {
            found,
            // A missing thin pool is left to `capacity`, which says so.
            free: self.thin_available_in(pool, &lvs).ok(),
            unit: lvs.iter().find_map(|l| l.extent_size).map(|e| e.max(MIB)),
            seen: crate::pool::Seen::Lvm(lvs),
        })
    }

    async fn create_surveyed(&self, req: &CreateRequest, survey: &crate::pool::Survey) -> Result<VolumeInfo> {
        match (&survey.seen, self.thin_pool.as_deref()) {
            (crate::pool::Seen::Lvm(lvs), Some(pool)) if req.source.is_none() && valid_local_name(&req.local) => {
                self.create_thin(req, pool, lvs).await
            }
            _ => self.create_volume(req).await,
        }
    }

    async fn delete_volume(&self, local: &str) -> Result<()> {
        let Some((lv, _)) = self.find(local, ObjectType::Volume).await? else { return Ok(()) };
        if self.thin_pool.is_none() {
            self.refuse_if_snapshotted(&lv, local).await?;
        }
        self.remove(&lv.name, &format!("volume {local:?}")).await
    }

    async fn get_volume(&self, local: &str) -> Result<Option<VolumeInfo>> {
        Ok(self.find(local, ObjectType::Volume).await?.map(|(lv, meta)| Self::volume_info(&lv, meta)))
    }

    async fn look_up_volume(&self, local: &str) -> Result<Option<(VolumeInfo, crate::pool::Found)>> {
        // NodeStage attaches right after this lookup: it need not run `lvs` again.
        Ok(self
            .find(local, ObjectType::Volume)
            .await?
            .map(|(lv, meta)| (Self::volume_info(&lv, meta.clone()), crate::pool::Found::Lvm(Box::new((lv, meta))))))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for lv in self.list_lvs().await? {
            match self.ours(&lv, ObjectType::Volume) {
                Ok(Some(meta)) => out.push(Self::volume_info(&lv, meta)),
                Ok(None) => {}
                Err(e) => tracing::warn!(pool = %self.name, lv = %lv.name, "skipping an LV with damaged holdfast tags: {e}"),
            }
        }
        Ok(out)
    }

    async fn expand_volume(&self, local: &str, capacity: u64) -> Result<u64> {
        let (lv, meta) = self
            .find(local, ObjectType::Volume)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {local:?} not found in pool {:?}", self.name)))?;
        if lv.size >= capacity {
            return Ok(lv.size);
        }
        if meta.pending {
            return Err(Error::FailedPrecondition(format!("volume {local:?} is an unfinished copy; retry its creation first")));
        }
        if let Some(pool) = self.thin_pool.as_deref() {
            self.check_thin_room(pool, capacity - lv.size, &format!("growing volume {local:?}")).await?;
        }
        let mut extended = self.exec.run(command::lvextend(&self.vg, &lv.name, capacity)).await;
        if matches!(&extended, Err(e) if command::is_active_origin(e)) {
            extended = self.extend_inactive(&lv, local, capacity).await?;
        }
        match extended {
            Ok(_) => {}
            // Space may be freed later, so this is worth retrying: not OUT_OF_RANGE.
            Err(e) if command::is_no_space(&e) => {
                return Err(Error::ResourceExhausted(format!(
                    "cannot grow volume {local:?} to {}: volume group {} has no room ({})",
                    format_size(capacity),
                    self.vg,
                    e.stderr().trim()
                )));
            }
            Err(e) => return Err(Error::exec(format!("growing LV {}/{} to {capacity} bytes", self.vg, lv.name), e)),
        }
        tracing::info!(pool = %self.name, lv = %lv.name, capacity, "extended LV");
        Ok(self.read_volume(&lv.name).await?.capacity)
    }

    async fn create_snapshot(&self, source_local: &str, csi_name: &str, local: &str, uid: &str) -> Result<SnapshotInfo> {
        if !valid_local_name(local) {
            return Err(Error::InvalidArgument(format!("{local:?} is not a valid local snapshot name")));
        }
        let lv_name = snapshot_lv(local);
        let existing = |lv: Lv| -> Result<SnapshotInfo> {
            match self.ours(&lv, ObjectType::Snapshot) {
                Ok(Some(meta)) if meta.csi_name == csi_name && meta.source == Some(Source::Volume(source_local.to_owned())) => {
                    Ok(Self::snapshot_info(&lv, meta))
                }
                Ok(Some(meta)) => Err(Error::AlreadyExists(format!(
                    "snapshot {:?} already exists in pool {:?} with source {:?}, not volume {source_local:?}",
                    meta.csi_name, self.name, meta.source
                ))),
                _ => Err(Error::AlreadyExists(format!(
                    "LV {}/{} already exists and is not a snapshot of holdfast pool {:?}; rename or remove it, or use another name",
                    self.vg, lv.name, self.name
                ))),
            }
        };
        if let Some(lv) = self.lookup(&lv_name).await? {
            return existing(lv);
        }
        let (source, source_meta) = self
            .find(source_local, ObjectType::Volume)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {source_local:?} not found in pool {:?}", self.name)))?;
        if source_meta.pending {
            return Err(Error::FailedPrecondition(format!("volume {source_local:?} is an unfinished copy; retry its creation first")));
        }
        let meta = Meta {
            pool: self.name.clone(),
            object: ObjectType::Snapshot,
            local: local.to_owned(),
            csi_name: csi_name.to_owned(),
            capacity: 0,
            block: false,
            fs_type: None,
            source: Some(Source::Volume(source_local.to_owned())),
            size: source.size,
            created: now(),
            pending: false,
            uid: Some(uid.to_owned()),
            source_uid: source_meta.uid.clone(),
            parameters: None,
            group: None,
        };
        let tags = tags::encode(&meta).map_err(Error::InvalidArgument)?;
        let cmd = match self.thin_pool {
            Some(_) => command::lvcreate_snapshot(&self.vg, &source.name, &lv_name, &tags, false),
            None => command::lvcreate_cow_snapshot(&self.vg, &source.name, &lv_name, self.snapshot_reserve.cow_size(source.size), &tags),
        };
        match self.snapshot_frozen(&source, source_local, format!("snapshot {csi_name:?}"), cmd).await {
            Ok(()) => {
                tracing::info!(pool = %self.name, lv = %lv_name, source = %source.name, thin = self.thin_pool.is_some(), "created snapshot")
            }
            Err(SnapshotError::Freeze(e)) => return Err(e),
            Err(SnapshotError::Lvm(e)) if command::is_lv_exists(&e) => {
                let lv =
                    self.lookup(&lv_name).await?.ok_or_else(|| Error::Aborted(format!("snapshot LV {lv_name} came and went; retry")))?;
                return existing(lv);
            }
            Err(SnapshotError::Lvm(e)) if command::is_no_space(&e) => {
                return Err(Error::ResourceExhausted(format!(
                    "no room for snapshot {csi_name:?} in pool {:?}: {}",
                    self.name,
                    e.stderr().trim()
                )));
            }
            Err(SnapshotError::Lvm(e)) => return Err(Error::exec(format!("snapshotting LV {}/{} as {lv_name}", self.vg, source.name), e)),
        }
        let lv = self
            .lookup(&lv_name)
            .await?
            .ok_or_else(|| Error::Internal(format!("snapshot LV {}/{lv_name} vanished right after it was made", self.vg)))?;
        existing(lv)
    }

    async fn delete_snapshot(&self, local: &str) -> Result<()> {
        match self.find(local, ObjectType::Snapshot).await? {
            Some((lv, _)) => self.remove(&lv.name, &format!("snapshot {local:?}")).await,
            None => Ok(()),
        }
    }

    async fn get_snapshot(&self, local: &str) -> Result<Option<SnapshotInfo>> {
        Ok(self.find(local, ObjectType::Snapshot).await?.map(|(lv, meta)| Self::snapshot_info(&lv, meta)))
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for lv in self.list_lvs().await? {
            match self.ours(&lv, ObjectType::Snapshot) {
                Ok(Some(meta)) => out.push(Self::snapshot_info(&lv, meta)),
                Ok(None) => {}
                Err(e) => tracing::warn!(pool = %self.name, lv = %lv.name, "skipping an LV with damaged holdfast tags: {e}"),
            }
        }
        Ok(out)
    }

    async fn allocation_unit(&self) -> Result<u64> {
        Ok(self.vg_info().await?.extent_size.max(MIB))
    }

    async fn capacity(&self) -> Result<u64> {
        match self.thin_pool.as_deref() {
            Some(pool) => self.thin_available_in(pool, &self.list_lvs().await?),
            None => {
                let vg = self.vg_info().await?;
                let (num, den) = thick_share(&self.lvcreate_options);
                let extent = vg.extent_size.max(1);
                // Whole extents and whole MiB: a request of that size fits without rounding up.
                let share = (vg.free as u128 * num as u128 / den as u128) as u64;
                Ok(share / extent * extent / MIB * MIB)
            }
        }
    }

    async fn attach(&self, local: &str) -> Result<Attachment> {
        let found = self.find(local, ObjectType::Volume).await?;
        let (lv, meta) = found.ok_or_else(|| Error::NotFound(format!("volume {local:?} not found in pool {:?}", self.name)))?;
        self.attach_lv(local, lv, meta).await
    }

    async fn attach_found(&self, local: &str, found: crate::pool::Found) -> Result<Attachment> {
        match found {
            crate::pool::Found::Lvm(f) if volume_lv(local) == f.0.name => self.attach_lv(local, f.0, f.1).await,
            _ => self.attach(local).await,
        }
    }

    async fn detach(&self, _local: &str) -> Result<()> {
        // LVs stay active: see the module documentation.
        Ok(())
    }

    async fn recover(&self) -> Result<()> {
        self.resume_suspended().await.map(|_| ())
    }

    async fn copy_progress(&self, snapshot: bool, local: &str, _source: &Source, _deadline: Duration) -> Option<(u64, u64)> {
        // Thin copies are instant; a thick block copy counts what it has done.
        let copies = self.copies.lock().unwrap_or_else(|p| p.into_inner());
        copies.get(local).filter(|_| !snapshot).map(|p| p.get())
    }

    async fn condition(&self, local: &str) -> Result<Condition> {
        let Some((lv, meta)) = self.find(local, ObjectType::Volume).await? else {
            return Ok(Condition::Abnormal(format!("LV {}/{} of volume {local:?} is gone", self.vg, volume_lv(local))));
        };
        let id = format!("{}/{}", self.vg, lv.name);
        if meta.pending {
            return Ok(Condition::Abnormal(format!("LV {id} is an unfinished copy")));
        }
        if let Some(s) = lv.attr.state_problem() {
            return Ok(Condition::Abnormal(format!("LV {id} is {s}")));
        }
        if let Some(h) = lv.attr.health_problem() {
            return Ok(Condition::Abnormal(format!("LV {id} is {h}")));
        }
        if !lv.attr.active() {
            return Ok(Condition::Abnormal(format!("LV {id} is not active (lvchange -ay {id}, or stage the volume again)")));
        }
        if !lv.pool_lv.is_empty() {
            match self.lookup(&lv.pool_lv).await? {
                None => return Ok(Condition::Abnormal(format!("the thin pool {}/{} of LV {id} is gone", self.vg, lv.pool_lv))),
                Some(pool) => {
                    if let Some(p) = Self::thin_pool_problem(&pool) {
                        return Ok(Condition::Abnormal(p));
                    }
                }
            }
        }
        Ok(Condition::Healthy)
    }

    // issue 12: group snapshots
    async fn create_group_snapshot(
        self: Arc<Self>,
        group: crate::pool::GroupMembership,
        members: Vec<crate::pool::GroupMember>,
    ) -> Result<Vec<SnapshotInfo>> {
        self.group_snapshot(group, members).await
    }
}

/// An LVM copy (a thin snapshot LV) being finished: the kind-specific steps of the shared flow.
struct LvCopy<'a> {
    pool: &'a LvmPool,
    lv: &'a Lv,
}

#[async_trait]
impl crate::pool::copy::Copy for LvCopy<'_> {
    async fn grow_to(&self, capacity: u64) -> Result<()> {
        if self.lv.size < capacity {
            let target = format!("{}/{}", self.pool.vg, self.lv.name);
            self.pool
                .exec
                .run(command::lvextend(&self.pool.vg, &self.lv.name, capacity))
                .await
                .context(|| format!("growing the copy {target}"))?;
        }
        Ok(())
    }

    async fn device(&self, _filesystem: bool) -> Result<Option<PathBuf>> {
        // Active whatever it holds: the copy is handed out usable.
        self.pool.activate(self.lv).await.map(Some)
    }

    async fn mark_finished(&self) -> Result<()> {
        let target = format!("{}/{}", self.pool.vg, self.lv.name);
        self.pool
            .exec
            .run(command::lvchange_deltag(&self.pool.vg, &self.lv.name, tags::PENDING))
            .await
            .context(|| format!("marking the copy {target} finished"))?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
