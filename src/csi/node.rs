//! CSI Node: stage (attach, format if blank, mount), publish (bind-mount), unpublish, unstage,
//! stats, expansion and node info. Validates, locks the volume, then delegates to the pool
//! (attach/detach) and to `crate::node` (mounts, filesystems). Stage and publish records
//! (`crate::node::records`) plus the mount table decide what a path holds: a call acts only on
//! the volume's own mounts and leaves anything else alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::controller::CTX_FS_TYPE;
use super::{decode_cap, lock_key, object_of, require, topology, traced};
use crate::driver::Driver;
use crate::error::{Error, Result, bounded, cut};
use crate::locks::ObjectKind;
use crate::node::mountinfo::MountInfo;
use crate::node::records::{Backing, MountKey, PublishRecord, StageRecord, VolumeRecord};
use crate::node::safepath::{RequestPath, same_path};
use crate::node::{Peeled, device_number, rdev_at};
use crate::pool::{Attachment, Condition, Pool, VolumeInfo};
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{self, rpc};
use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::*;
use crate::volume_id::VolumeId;

/// The Node service.
pub struct NodeService {
    d: Arc<Driver>,
}

impl NodeService {
    /// Serves the node side for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        NodeService { d: driver }
    }

    /// The pool and local name of an id this node serves; NOT_FOUND otherwise.
    fn resolve(&self, id: &str) -> Result<(Arc<dyn Pool>, String)> {
        // Not an id, or a snapshot's: no volume.
        if !VolumeId::parse(id).is_some_and(|v| v.may_name_volume()) {
            return Err(Error::NotFound(format!("volume {} does not exist", bounded(id))));
        }
        object_of(&self.d, ObjectKind::Volume, id).ok_or_else(|| {
            Error::NotFound(format!(
                "volume {} is not served by this node ({}): no such pool here or it belongs to another node",
                bounded(id),
                self.d.node_id
            ))
        })
    }

    /// The volume an id names: NOT_FOUND also when the object under its local name is another
    /// one (deleted and created again: another uid), so an old PV never reaches a new volume.
    async fn existing(&self, id: &str) -> Result<(Arc<dyn Pool>, VolumeInfo)> {
        let (pool, local) = self.resolve(id)?;
        let missing = || Error::NotFound(format!("volume {} does not exist", bounded(id)));
        let v = pool.get_volume(&local).await?.ok_or_else(missing)?;
        if !VolumeId::parse(id).is_some_and(|vid| vid.names_volume(v.uid.as_deref())) {
            return Err(missing());
        }
        Ok((pool, v))
    }

    /// As [`Self::existing`], with what the pool found, for an attach in the same call.
    async fn existing_found(&self, id: &str) -> Result<(Arc<dyn Pool>, VolumeInfo, crate::pool::Found)> {
        let (pool, local) = self.resolve(id)?;
        let missing = || Error::NotFound(format!("volume {} does not exist", bounded(id)));
        let (v, found) = pool.look_up_volume(&local).await?.ok_or_else(missing)?;
        if !VolumeId::parse(id).is_some_and(|vid| vid.names_volume(v.uid.as_deref())) {
            return Err(missing());
        }
        Ok((pool, v, found))
    }

    /// The lock of the volume `id` names (the same one the controller takes for it).
    fn lock(&self, id: &str) -> Result<crate::locks::Guard> {
        self.d.locks.try_lock(lock_key(&self.d, ObjectKind::Volume, id))
    }

    /// A request path, checked against the path policy (INVALID_ARGUMENT otherwise).
    fn path(&self, field: &str, value: &str) -> Result<RequestPath> {
        self.d.paths.check(field, value)
    }

    /// A path taken from a record: checked again (the policy may have changed since), or,
    /// failing that, resolved beneath `/` with the same no-symlink rule.
    fn recorded(&self, p: &Path) -> Result<RequestPath> {
        self.d.paths.check("recorded path", &p.to_string_lossy()).or_else(|_| RequestPath::internal(p))
    }

    /// Whether the recorded staging `s` still holds the volume (a raw block staging mounts
    /// nothing, so it holds as long as it is recorded).
    async fn still_staged(&self, s: &StageRecord) -> Result<bool> {
        if s.block {
            return Ok(true);
        }
        let at = self.recorded(&s.path)?;
        Ok(self.d.node.mounter.mount_at(&at).await?.is_some_and(|m| s.holds(&m)))
    }

    /// Whether the recorded publish `p` still holds the volume at its target.
    async fn still_published(&self, p: &PublishRecord) -> Result<bool> {
        let at = self.recorded(&p.target)?;
        let Some(m) = self.d.node.mounter.mount_at(&at).await? else { return Ok(false) };
        self.owns(&p.stage, &at, &m).await
    }

    /// Whether mount `m` at `at` is the volume of staging `s`: its staging mount or a bind of it,
    /// or (raw block) its device node bound there.
    async fn owns(&self, s: &StageRecord, at: &RequestPath, m: &MountInfo) -> Result<bool> {
        if s.block { Ok(s.is_device(rdev_at(at).await?, m)) } else { Ok(s.holds(m)) }
    }

    /// The shared tail of unstage and unpublish: runs `peel` (the node operation that unmounts
    /// the volume's own layers at `path`) and answers whether the path is now free of the
    /// volume, so its record entry may go. Something else mounted on top is left alone and
    /// logged; the call then answers OK (the volume is not reachable there) and keeps its
    /// record, since the volume's own layers may lie beneath.
    async fn peeled(&self, call: &str, id: &str, path: &RequestPath, peel: impl Future<Output = Result<Peeled>>) -> Result<bool> {
        let Peeled::Foreign(m) = peel.await? else { return Ok(true) };
        tracing::warn!(
            volume = id,
            path = %path.as_path().display(),
            found = %m.source,
            "{call}: something else is mounted at the path; left alone"
        );
        Ok(false)
    }

    /// NodeStageVolume, in which the pool looks the volume up once: what the lookup that checks
    /// it is the volume the id names found is handed to the attach (issue 14; [`Pool::attach_found`]).
    async fn stage(&self, r: NodeStageVolumeRequest) -> Result<NodeStageVolumeResponse> {
        require("volume_id", &r.volume_id)?;
        let staging = self.path("staging_target_path", &r.staging_target_path)?;
        let cap = decode_cap(r.volume_capability.as_ref())?;
        let _guard = self.lock(&r.volume_id)?;
        let (pool, v, found) = self.existing_found(&r.volume_id).await?;
        if cap.block != v.block {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is a {} volume and cannot be staged as {}",
                r.volume_id,
                if v.block { "raw block" } else { "filesystem" },
                if cap.block { "raw block" } else { "a filesystem" }
            )));
        }
        if !cap.supported_by(pool.as_ref()) {
            return Err(Error::FailedPrecondition(format!("access mode {} is not supported", cap.mode.as_str_name())));
        }
        let mut rec = self.d.records.load(&r.volume_id).await?.unwrap_or_else(|| VolumeRecord::new(&r.volume_id));
        // Single-node access modes: one staging path at a time. A recorded staging whose mount is
        // gone (a reboot, an unmount by hand) no longer counts.
        let mut stale = Vec::new();
        for s in rec.stages.iter().filter(|s| !same_path(&s.path, staging.as_path())) {
            // A bind published from it outlives a staging mount unmounted by hand: still in use.
            let mut in_use = self.still_staged(s).await?;
            for p in rec.publishes.iter().filter(|p| same_path(&p.staging, &s.path)) {
                if !in_use {
                    in_use = self.still_published(p).await?;
                }
            }
            if !in_use {
                stale.push(s.path.clone());
            } else if cap.mode_supported() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is already staged at {}; a volume with a single-node access mode is staged at one path \
                     at a time (unstage it there first)",
                    r.volume_id,
                    s.path.display()
                )));
            }
        }
        for p in stale {
            tracing::warn!(volume = r.volume_id, staging = %p.display(), "dropping a stage record whose mount is gone");
            rec.remove_stage(&p);
        }
        let in_use = !rec.stages.is_empty();
        let was_staged = rec.stage_at(staging.as_path()).is_some();
        let attachment = pool.attach_found(&v.local, found).await?;
        let before = rec.clone();
        let res = self.stage_attached(&r, &cap, pool.as_ref(), &v, &staging, &attachment, &mut rec).await;
        if res.is_ok() && !was_staged {
            // issue 14: events: one line when the volume becomes staged here, not per retry.
            tracing::info!(event = "staged", volume_id = cut(&r.volume_id), csi_name = cut(&v.csi_name), pool = pool.name(), staging = %staging.as_path().display(), "volume staged");
        }
        if let Err(e) = &res {
            // Leave nothing behind that this call made: its record entry and, unless the volume
            // is in use here already, its attachment (a loop device).
            if rec != before {
                if let Err(undo) = self.d.records.save(&before).await {
                    tracing::warn!(volume = r.volume_id, "could not drop the stage record of a failed stage: {undo}");
                }
            }
            if !in_use {
                if let Err(undo) = pool.detach(&v.local).await {
                    tracing::warn!(volume = r.volume_id, "could not detach after a failed stage ({e}): {undo}");
                }
            }
        }
        res
    }

    /// The part of NodeStage after the attach: record, then mount.
    #[allow(clippy::too_many_arguments)]
    async fn stage_attached(
        &self,
        r: &NodeStageVolumeRequest,
        cap: &super::Capability,
        pool: &dyn Pool,
        v: &VolumeInfo,
        staging: &RequestPath,
        attachment: &Attachment,
        rec: &mut VolumeRecord,
    ) -> Result<NodeStageVolumeResponse> {
        let fs = if cap.block {
            String::new()
        } else {
            [cap.fs_type.as_str(), r.volume_context.get(CTX_FS_TYPE).map(String::as_str).unwrap_or(""), v.fs_type.as_deref().unwrap_or("")]
                .into_iter()
                .find(|f| !f.is_empty())
                .unwrap_or(pool.default_fs())
                .to_owned()
        };
        let backing = match attachment {
            Attachment::Device(p) | Attachment::Loop { device: p, .. } => Backing::Device { path: p.clone(), dev: device_number(p).await },
            Attachment::Mount { source, fs_type, .. } => Backing::Source { source: source.clone(), fs_type: fs_type.clone() },
        };
        let entry = StageRecord {
            path: staging.as_path().to_owned(),
            backing,
            fs_type: fs.clone(),
            block: cap.block,
            mount: None,
            fsid: None,
            csi_name: v.csi_name.clone(),
        };
        if rec.stage_at(staging.as_path()) != Some(&entry) {
            rec.remove_stage(staging.as_path());
            rec.stages.push(entry);
            // Durable before the mount: a crash from here on leaves a record unstage can act on.
            self.d.records.save(rec).await?;
        }
        if cap.block {
            // Raw block: attaching is all; publish binds the device node.
            return Ok(NodeStageVolumeResponse {});
        }
        let used = self.d.node.stage_filesystem(attachment, staging, &fs, &cap.mount_flags).await?;
        let key = self.d.node.mounter.mount_at(staging).await?.map(|m| MountKey { major_minor: m.major_minor, root: m.root });
        // An NFS export's subdirectories share the export's fsid: it identifies no volume there.
        let own_fsid = match attachment {
            Attachment::Mount { fs_type, .. } => fs_type == "zfs",
            _ => true,
        };
        let fsid = if key.is_some() && own_fsid { self.d.node.fsid_at(staging).await? } else { None };
        if let Some(s) = rec.stages.iter_mut().find(|s| same_path(&s.path, staging.as_path())) {
            if s.fs_type != used || s.mount != key || s.fsid != fsid {
                s.fs_type = used;
                s.mount = key;
                s.fsid = fsid;
                self.d.records.save(rec).await?;
            }
        }
        Ok(NodeStageVolumeResponse {})
    }

    async fn unstage(&self, r: NodeUnstageVolumeRequest) -> Result<NodeUnstageVolumeResponse> {
        require("volume_id", &r.volume_id)?;
        let staging = self.path("staging_target_path", &r.staging_target_path)?;
        let _guard = self.lock(&r.volume_id)?;
        let mut rec = self.d.records.load(&r.volume_id).await?.unwrap_or_else(|| VolumeRecord::new(&r.volume_id));
        let shown = staging.as_path().display();
        let Some(entry) = rec.stage_at(staging.as_path()).cloned() else {
            tracing::warn!(volume = r.volume_id, staging = %shown, "NodeUnstageVolume: the volume is not staged there; nothing unmounted");
            // Nothing of it is staged anywhere: an attachment left by a stage that crashed
            // before writing its record is the only thing to undo.
            if rec.stages.is_empty() {
                if let Ok((pool, v)) = self.existing(&r.volume_id).await {
                    pool.detach(&v.local).await?;
                }
            }
            return Ok(NodeUnstageVolumeResponse {});
        };
        if !entry.block
            && !self.peeled("NodeUnstageVolume", &r.volume_id, &staging, self.d.node.unstage(&staging, &|m| entry.holds(m))).await?
        {
            return Ok(NodeUnstageVolumeResponse {});
        }
        rec.remove_stage(staging.as_path());
        if rec.stages.is_empty() {
            // Only the volume this id names is detached, never one created again under its name.
            match self.existing(&r.volume_id).await {
                Ok((pool, v)) => match pool.detach(&v.local).await {
                    Ok(()) | Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                },
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.d.records.save(&rec).await?;
        // issue 14: events
        tracing::info!(event = "unstaged", volume_id = cut(&r.volume_id), csi_name = cut(&entry.csi_name), staging = %shown, "volume unstaged");
        Ok(NodeUnstageVolumeResponse {})
    }

    async fn publish(&self, r: NodePublishVolumeRequest) -> Result<NodePublishVolumeResponse> {
        require("volume_id", &r.volume_id)?;
        let target = self.path("target_path", &r.target_path)?;
        let cap = decode_cap(r.volume_capability.as_ref())?;
        if r.staging_target_path.is_empty() {
            // The spec's code for this case: STAGE_UNSTAGE_VOLUME is advertised, so publish needs a staged volume.
            return Err(Error::FailedPrecondition("staging_target_path is required: this driver stages volumes before publishing".into()));
        }
        let staging = self.path("staging_target_path", &r.staging_target_path)?;
        let _guard = self.lock(&r.volume_id)?;
        let mut rec = self.d.records.load(&r.volume_id).await?.unwrap_or_else(|| VolumeRecord::new(&r.volume_id));
        let found = if cap.block { None } else { self.d.node.mounter.mount_at(&staging).await? };
        let (pool, block) = match self.staged_here(&rec, &staging, found.as_ref()).await? {
            // The filesystem this id staged is mounted there, so the volume exists and is this
            // id's: no pool lookup (issue 14: one `lvs` / `zfs get` per ready volume).
            true => (self.resolve(&r.volume_id)?.0, false),
            false => {
                let (pool, v) = self.existing(&r.volume_id).await?;
                (pool, v.block)
            }
        };
        if cap.block != block {
            return Err(Error::FailedPrecondition(format!(
                "volume {} cannot be published with another access type than it was created with",
                r.volume_id
            )));
        }
        if !cap.supported_by(pool.as_ref()) {
            return Err(Error::FailedPrecondition(format!("access mode {} is not supported", cap.mode.as_str_name())));
        }
        let shown = staging.as_path().display();
        let stage = match rec.stage_at(staging.as_path()).cloned() {
            Some(s) if s.block || found.as_ref().is_some_and(|m| s.holds(m)) => s,
            _ => {
                return Err(match found {
                    Some(m) => Error::NotFound(format!(
                        "staging_target_path {shown} holds {} ({}), not volume {}",
                        m.source, m.fs_type, r.volume_id
                    )),
                    None => Error::FailedPrecondition(format!(
                        "volume {} is not staged at {shown}: NodeStageVolume it there first",
                        r.volume_id
                    )),
                });
            }
        };
        if cap.mode == Mode::SingleNodeSingleWriter {
            for p in rec.publishes.iter().filter(|p| !same_path(&p.target, target.as_path())) {
                if self.still_published(p).await? {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} is already published at {}; SINGLE_NODE_SINGLE_WRITER allows one target at a time",
                        r.volume_id,
                        p.target.display()
                    )));
                }
            }
        }
        let readonly = r.readonly || cap.read_only_mode();
        if readonly {
            self.repair_readonly(&r.volume_id, &rec, &stage, &target).await?;
        }
        let before = rec.clone();
        if rec.publish_at(target.as_path()).is_none_or(|p| p.stage != stage || p.readonly != readonly) {
            rec.remove_publish(target.as_path());
            rec.publishes.push(PublishRecord {
                target: target.as_path().to_owned(),
                staging: staging.as_path().to_owned(),
                stage: stage.clone(),
                readonly,
            });
            // Durable before the bind, so unpublish knows the bind after any crash.
            self.d.records.save(&rec).await?;
        }
        let res = if cap.block {
            match stage.device() {
                Some(dev) => self.d.node.publish_block(dev, &target, readonly).await,
                None => Err(Error::FailedPrecondition(format!("volume {} has no block device", r.volume_id))),
            }
        } else {
            self.d.node.publish_filesystem(&staging, &target, readonly, &cap.mount_flags).await
        };
        if res.is_err() && rec != before {
            // A refused publish never rewrites an earlier one's entry (a read-write publish must
            // not come to look like a half-made read-only one); a new entry stays only if its
            // bind is there after all.
            let earlier = before.publish_at(target.as_path()).is_some();
            if earlier || !self.still_published(rec.publish_at(target.as_path()).expect("just recorded")).await? {
                self.d.records.save(&before).await?;
            }
        }
        res.map(|()| NodePublishVolumeResponse {})
    }

    /// Whether `rec` (this id's node record) staged a filesystem at `staging` that is mounted
    /// there now (`found`): the mount's device and root are the recorded ones and its `f_fsid`
    /// is the one recorded after this id's own NodeStage mounted it. Then the volume exists
    /// (a staged volume cannot be deleted) and is the one the id names: a record left stale (a
    /// reboot, an unmount by hand) with the volume made again under the same name, device
    /// number and staging path has a new filesystem, so a new fsid. Anything less is `false`
    /// and the pool is asked, as before.
    async fn staged_here(&self, rec: &VolumeRecord, staging: &RequestPath, found: Option<&MountInfo>) -> Result<bool> {
        let Some(s) = rec.stage_at(staging.as_path()) else { return Ok(false) };
        let (Some(want), Some(_), Some(m)) = (s.fsid, &s.mount, found) else { return Ok(false) };
        if s.block || !s.holds(m) {
            return Ok(false);
        }
        Ok(self.d.node.fsid_at(staging).await? == Some(want))
    }

    /// Before a read-only publish at `target`: a bind of the volume found writable there while
    /// the record says a read-only publish was made at that target is that publish cut short
    /// (a driver killed between its bind and its read-only remount). It never was a finished
    /// publish, so it is unmounted and the publish made again, rather than refused as
    /// ALREADY_EXISTS forever. A writable publish recorded as such stays ALREADY_EXISTS (spec).
    async fn repair_readonly(&self, id: &str, rec: &VolumeRecord, stage: &StageRecord, target: &RequestPath) -> Result<()> {
        if !rec.publish_at(target.as_path()).is_some_and(|p| p.readonly && p.stage == *stage) {
            return Ok(());
        }
        let Some(top) = self.d.node.mounter.mount_at(target).await? else { return Ok(()) };
        if top.mount_options.iter().any(|o| o == "ro") || !self.owns(stage, target, &top).await? {
            return Ok(());
        }
        tracing::warn!(volume = id, target = %target.as_path().display(), "a read-only publish was cut short and left a writable bind; redoing it");
        let rdev = if stage.block { rdev_at(target).await? } else { None };
        let is_own = |m: &MountInfo| {
            let own = if stage.block { stage.is_device(rdev, m) } else { stage.holds(m) };
            own && !m.mount_options.iter().any(|o| o == "ro")
        };
        self.d.node.unpublish(target, &is_own, false).await?;
        Ok(())
    }

    async fn unpublish(&self, r: NodeUnpublishVolumeRequest) -> Result<NodeUnpublishVolumeResponse> {
        require("volume_id", &r.volume_id)?;
        let target = self.path("target_path", &r.target_path)?;
        let _guard = self.lock(&r.volume_id)?;
        let shown = target.as_path().display();
        let mut rec = self.d.records.load(&r.volume_id).await?.unwrap_or_else(|| VolumeRecord::new(&r.volume_id));
        let Some(entry) = rec.publish_at(target.as_path()).cloned() else {
            tracing::warn!(volume = r.volume_id, target = %shown, "NodeUnpublishVolume: the volume is not published there; nothing unmounted");
            return Ok(NodeUnpublishVolumeResponse {});
        };
        let rdev = if entry.stage.block { rdev_at(&target).await? } else { None };
        let is_own = |m: &MountInfo| if entry.stage.block { entry.stage.is_device(rdev, m) } else { entry.stage.holds(m) };
        if !self.peeled("NodeUnpublishVolume", &r.volume_id, &target, self.d.node.unpublish(&target, &is_own, true)).await? {
            return Ok(NodeUnpublishVolumeResponse {});
        }
        rec.remove_publish(target.as_path());
        self.d.records.save(&rec).await?;
        Ok(NodeUnpublishVolumeResponse {})
    }

    /// The staging of the volume that `path` belongs to, with the path checked to be the
    /// volume's staging path or one of its publish paths with the volume mounted there
    /// (NOT_FOUND otherwise: a relative path, `/`, a foreign mount, nothing mounted).
    /// `Err(Ok(message))`: the path could not be checked in time (a hung mount).
    async fn volume_path(&self, id: &str, volume_path: &str) -> Result<(RequestPath, StageRecord, MountInfo)> {
        let not_found =
            || Error::NotFound(format!("volume_path {} is not a path of volume {} on this node", bounded(volume_path), bounded(id)));
        let path = self.d.paths.check("volume_path", volume_path).map_err(|_| not_found())?;
        let rec = self.d.records.load(id).await?.ok_or_else(not_found)?;
        let stage = match (rec.stage_at(path.as_path()), rec.publish_at(path.as_path())) {
            (Some(s), _) if !s.block => s.clone(),
            (_, Some(p)) => p.stage.clone(),
            _ => return Err(not_found()),
        };
        let m = self.d.node.mounter.mount_at(&path).await?.ok_or_else(not_found)?;
        if !self.owns(&stage, &path, &m).await? {
            return Err(not_found());
        }
        Ok((path, stage, m))
    }

    async fn stats(&self, r: NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse> {
        require("volume_id", &r.volume_id)?;
        require("volume_path", &r.volume_path)?;
        // The volume first: an unknown volume is NOT_FOUND whatever the path looks like.
        let (pool, v) = self.existing(&r.volume_id).await?;
        // The pool's own check next: it probes remote storage under a deadline. When it says
        // abnormal (an NFS server gone), the volume path is not touched at all: a stat on a dead
        // hard mount would never return.
        let mut condition = match pool.condition(&v.local).await? {
            Condition::Abnormal(m) => Some(m),
            Condition::Healthy => None,
        };
        // Freeze records (crate::node::freeze): Linux has no frozen flag, so a freeze left
        // open past its deadline (a failed thaw) is what says the filesystem may be frozen.
        if condition.is_none() {
            condition = self.d.freezer.stuck_message(pool.name(), &v.local).await;
        }
        let mut usage = Vec::new();
        if condition.is_some() {
            let path = self.d.paths.check("volume_path", &r.volume_path).map_err(|_| {
                Error::NotFound(format!("volume_path {} is not a path of volume {} on this node", bounded(&r.volume_path), r.volume_id))
            })?;
            let rec = self.d.records.load(&r.volume_id).await?;
            if !rec.is_some_and(|rec| rec.stage_at(path.as_path()).is_some() || rec.publish_at(path.as_path()).is_some()) {
                return Err(Error::NotFound(format!(
                    "volume_path {} is not a path of volume {} on this node",
                    path.as_path().display(),
                    r.volume_id
                )));
            }
        } else {
            let (path, _stage, _m) = match self.volume_path(&r.volume_id, &r.volume_path).await {
                Ok(found) => found,
                Err(Error::DeadlineExceeded(m)) | Err(Error::Unavailable(m)) => {
                    return Ok(NodeGetVolumeStatsResponse {
                        usage,
                        volume_condition: Some(VolumeCondition { abnormal: true, message: m }),
                    });
                }
                Err(e) => return Err(e),
            };
            let mounts = self.d.node.mounter.mounts().await?;
            let node = self.d.node.clone();
            let block = v.block;
            // A bind mount outlives the staging mount it came from: check the staging path too.
            let staging = if block || r.staging_target_path.is_empty() {
                None
            } else {
                self.d.paths.check("staging_target_path", &r.staging_target_path).ok().map(|p| p.as_path().to_owned())
            };
            let p = path.as_path().to_owned();
            let checked = with_deadline(path.as_path(), move || {
                if let Condition::Abnormal(m) = node.condition(&p, block, &mounts) {
                    return (Some(m), None);
                }
                if let Some(staging) = staging {
                    if let Condition::Abnormal(m) = node.condition(&staging, false, &mounts) {
                        return (Some(format!("staging mount: {m}")), None);
                    }
                }
                (None, Some(node.stats(&p, &mounts)))
            })
            .await;
            match checked {
                Ok((Some(m), _)) => condition = Some(m),
                Ok((None, Some(Ok(s)))) => {
                    use volume_usage::Unit;
                    let u = |unit: Unit, total: u64, available: u64, used: u64| VolumeUsage {
                        available: available as i64,
                        total: total as i64,
                        used: used as i64,
                        unit: unit as i32,
                    };
                    usage.push(u(Unit::Bytes, s.total_bytes, s.available_bytes, s.used_bytes));
                    if let (Some(t), Some(f), Some(used)) = (s.total_inodes, s.free_inodes, s.used_inodes) {
                        usage.push(u(Unit::Inodes, t, f, used));
                    }
                }
                Ok((None, Some(Err(e)))) => condition = Some(format!("cannot read usage of {}: {e}", path.as_path().display())),
                Ok((None, None)) => {}
                Err(m) => condition = Some(m),
            }
        }
        let volume_condition = Some(match condition {
            Some(m) => VolumeCondition { abnormal: true, message: m },
            None => VolumeCondition { abnormal: false, message: "volume is healthy".into() },
        });
        Ok(NodeGetVolumeStatsResponse { usage, volume_condition })
    }

    async fn expand(&self, r: NodeExpandVolumeRequest) -> Result<NodeExpandVolumeResponse> {
        require("volume_id", &r.volume_id)?;
        require("volume_path", &r.volume_path)?;
        let _guard = self.lock(&r.volume_id)?;
        // The volume first: an unknown volume is NOT_FOUND whatever the path looks like.
        let (_pool, v) = self.existing(&r.volume_id).await?;
        if let Some(range) = &r.capacity_range {
            if range.required_bytes > 0 && v.capacity < range.required_bytes as u64 {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is {} bytes, smaller than the {} requested: expand it on the controller first",
                    r.volume_id, v.capacity, range.required_bytes
                )));
            }
        }
        let is_block = v.block || r.volume_capability.as_ref().and_then(|c| decode_cap(Some(c)).ok()).is_some_and(|c| c.block);
        if is_block {
            // Nothing to grow on the node; the path must still be one of the volume's: a
            // recorded staging or publish path, or a node of the volume's own device (the
            // kubelet may name the device path it was given).
            let path = self.d.paths.check("volume_path", &r.volume_path).ok();
            let rec = self.d.records.load(&r.volume_id).await?;
            let mut known = false;
            if let (Some(p), Some(rec)) = (path, rec) {
                known = rec.stage_at(p.as_path()).is_some() || rec.publish_at(p.as_path()).is_some();
                if !known {
                    let rdev = rdev_at(&p).await.ok().flatten();
                    known = rdev.is_some() && rec.stages.iter().any(|s| matches!(s.backing, Backing::Device { dev, .. } if dev == rdev));
                }
            }
            if !known {
                return Err(Error::NotFound(format!(
                    "volume_path {} is not a path of volume {} on this node",
                    bounded(&r.volume_path),
                    r.volume_id
                )));
            }
            return Ok(NodeExpandVolumeResponse { capacity_bytes: v.capacity as i64 });
        }
        // Only a staged or published path of the volume is grown, through the device it was
        // staged from: an unstaged volume is not attached just for this (nothing to detach after).
        let (path, stage, _m) = self.volume_path(&r.volume_id, &r.volume_path).await?;
        let Some(dev) = stage.device() else {
            // Datasets and shares grow with their quota; nothing to do on the node.
            return Ok(NodeExpandVolumeResponse { capacity_bytes: v.capacity as i64 });
        };
        let size = self.d.node.expand_filesystem(dev, &path).await?;
        Ok(NodeExpandVolumeResponse { capacity_bytes: size as i64 })
    }
}

/// How long a file-system call on a volume path may take before the volume counts as abnormal.
const PATH_DEADLINE: Duration = Duration::from_secs(5);

/// Runs a blocking file-system call on a volume path off the async workers, with a deadline:
/// on a hung mount (an unreachable NFS server with `hard`) the call may never return, and it
/// must not take a worker thread or the caller with it. `Err` is the abnormal-condition message.
async fn with_deadline<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    let domain = format!("path:{}", path.display());
    crate::blocking::run(&domain, &format!("checking {}", path.display()), PATH_DEADLINE, f).await.map_err(|e| e.to_string())
}

fn rpc_cap(t: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability { r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc { r#type: t as i32 })) }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(&self, r: Request<NodeStageVolumeRequest>) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodeStageVolume", &id, self.stage(r)).await
    }

    async fn node_unstage_volume(&self, r: Request<NodeUnstageVolumeRequest>) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodeUnstageVolume", &id, self.unstage(r)).await
    }

    async fn node_publish_volume(&self, r: Request<NodePublishVolumeRequest>) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodePublishVolume", &id, self.publish(r)).await
    }

    async fn node_unpublish_volume(&self, r: Request<NodeUnpublishVolumeRequest>) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodeUnpublishVolume", &id, self.unpublish(r)).await
    }

    async fn node_get_volume_stats(&self, r: Request<NodeGetVolumeStatsRequest>) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodeGetVolumeStats", &id, self.stats(r)).await
    }

    async fn node_expand_volume(&self, r: Request<NodeExpandVolumeRequest>) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodeExpandVolume", &id, self.expand(r)).await
    }

    async fn node_get_capabilities(&self, _: Request<NodeGetCapabilitiesRequest>) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use rpc::Type as T;
        let caps = [T::StageUnstageVolume, T::GetVolumeStats, T::ExpandVolume, T::VolumeCondition, T::SingleNodeMultiWriter];
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities: caps.into_iter().map(rpc_cap).collect() }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.d.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(topology(&self.d.segments)),
        }))
    }
}

#[cfg(test)]
mod tests {
    //! The node service over a real file pool driven by [`FakeExec`] and a [`FakeMounter`]:
    //! what is recorded and what is unmounted, with nothing real mounted.

    use std::path::PathBuf;

    use super::*;
    use crate::config::Config;
    use crate::exec::{FakeExec, Reply};
    use crate::node::mount::{BindSource, FakeMounter, MountCall, Mounter};
    use crate::proto::volume_capability::{AccessMode, AccessType, MountVolume};

    struct Rig {
        dir: tempfile::TempDir,
        exec: Arc<FakeExec>,
        mounter: Arc<FakeMounter>,
        pool: Arc<OneVolume>,
        svc: NodeService,
        id: String,
    }

    fn cap(mode: Mode, fs: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() })),
        }
    }

    /// A pool of one filesystem volume `v1` on a "device" that is a plain file (its signature
    /// comes from the scripted blkid), counting detaches.
    struct OneVolume {
        device: PathBuf,
        detached: std::sync::Mutex<Vec<String>>,
        /// How often the pool was asked for a volume.
        lookups: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Pool for OneVolume {
        fn name(&self) -> &str {
            "p"
        }
        fn kind(&self) -> crate::volume_id::PoolKind {
            crate::volume_id::PoolKind::File
        }
        fn default_fs(&self) -> &str {
            "xfs"
        }
        async fn get_volume(&self, local: &str) -> Result<Option<VolumeInfo>> {
            self.lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok((local == "v1").then(|| VolumeInfo {
                local: "v1".into(),
                csi_name: "csi-v1".into(),
                capacity: 1 << 20,
                block: false,
                fs_type: Some("xfs".into()),
                source: None,
                created: 0,
                uid: None,
                source_uid: None,
                parameters: None,
                mutable: Default::default(),
            }))
        }
        async fn attach(&self, local: &str) -> Result<Attachment> {
            assert_eq!(local, "v1");
            Ok(Attachment::Device(self.device.clone()))
        }
        async fn detach(&self, local: &str) -> Result<()> {
            self.detached.lock().unwrap().push(local.to_owned());
            Ok(())
        }
        async fn condition(&self, _local: &str) -> Result<Condition> {
            Ok(Condition::Healthy)
        }
        // The node service calls nothing else.
        async fn create_volume(&self, _: &crate::pool::CreateRequest) -> Result<VolumeInfo> {
            Err(Error::Unimplemented("not in this fake".into()))
        }
        async fn delete_volume(&self, _: &str) -> Result<()> {
            Err(Error::Unimplemented("not in this fake".into()))
        }
        async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
            Err(Error::Unimplemented("not in this fake".into()))
        }
        async fn expand_volume(&self, _: &str, _: u64) -> Result<u64> {
            Err(Error::Unimplemented("not in this fake".into()))
        }
        async fn create_snapshot(&self, _: &str, _: &str, _: &str, _: &str) -> Result<crate::pool::SnapshotInfo> {
            Err(Error::Unimplemented("not in this fake".into()))
        }
        async fn delete_snapshot(&self, _: &str) -> Result<()> {
            Err(Error::Unimplemented("not in this fake".into()))
        }
        async fn get_snapshot(&self, _: &str) -> Result<Option<crate::pool::SnapshotInfo>> {
            Err(Error::Unimplemented("not in this fake".into()))
        }
        async fn list_snapshots(&self) -> Result<Vec<crate::pool::SnapshotInfo>> {
            Err(Error::Unimplemented("not in this fake".into()))
        }
        async fn capacity(&self) -> Result<u64> {
            Err(Error::Unimplemented("not in this fake".into()))
        }
    }

    fn driver(dir: &Path, exec: Arc<FakeExec>, mounter: Arc<FakeMounter>, pool: Arc<OneVolume>) -> Arc<Driver> {
        let mut d = Driver::new("n1", &Config::parse("").unwrap(), &dir.join("state"), exec, mounter).unwrap();
        d.pools.insert("p".into(), pool);
        Arc::new(d)
    }

    async fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let (exec, mounter) = (Arc::new(FakeExec::new()), Arc::new(FakeMounter::new()));
        let device = dir.path().join("dev-loop9");
        std::fs::File::create(&device).unwrap().set_len(1 << 20).unwrap();
        let pool = Arc::new(OneVolume { device, detached: Default::default(), lookups: Default::default() });
        exec.on("blkid", vec![Reply::Ok("DEVNAME=/dev/loop9\nUUID=u-1\nTYPE=xfs\n".into())]);
        let d = driver(dir.path(), exec.clone(), mounter.clone(), pool.clone());
        let id = d.id_for(pool.as_ref(), "v1").to_string();
        Rig { dir, exec, mounter, pool, svc: NodeService::new(d), id }
    }

    impl Rig {
        fn path(&self, p: &str) -> String {
            self.dir.path().join(p).display().to_string()
        }
        async fn stage_at(&self, p: &str, c: VolumeCapability) -> Result<NodeStageVolumeResponse> {
            let r = NodeStageVolumeRequest {
                volume_id: self.id.clone(),
                staging_target_path: p.into(),
                volume_capability: Some(c),
                ..Default::default()
            };
            self.svc.stage(r).await
        }
        async fn publish_at(&self, staging: &str, target: &str, mode: Mode) -> Result<NodePublishVolumeResponse> {
            let r = NodePublishVolumeRequest {
                volume_id: self.id.clone(),
                staging_target_path: staging.into(),
                target_path: target.into(),
                volume_capability: Some(cap(mode, "xfs")),
                ..Default::default()
            };
            self.svc.publish(r).await
        }
        fn unmounts(&self) -> Vec<PathBuf> {
            self.mounter
                .calls()
                .into_iter()
                .filter_map(|c| match c {
                    MountCall::Unmount { target } => Some(target),
                    _ => None,
                })
                .collect()
        }
        /// How often `v1` was detached.
        fn detaches(&self) -> usize {
            self.pool.detached.lock().unwrap().iter().filter(|l| *l == "v1").count()
        }
        /// How often the pool was asked for a volume.
        fn lookups(&self) -> usize {
            self.pool.lookups.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// issue 14: NodePublish trusts this id's own stage record while the filesystem it staged
    /// is mounted there (device, root and `f_fsid` as recorded), without asking the pool; a
    /// record whose fsid is not the mounted filesystem's (the volume made again and staged
    /// there under the same name: a new filesystem) or that has none (written before) asks the
    /// pool, as does a publish of an id with no stage record at all (NOT_FOUND).
    #[tokio::test]
    async fn a_publish_of_what_this_id_staged_asks_the_pool_nothing() {
        let r = rig().await;
        let stage = r.path("stage");
        r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
        let rec = r.svc.d.records.load(&r.id).await.unwrap().unwrap();
        let want = nix::sys::statvfs::statvfs(Path::new(&stage)).unwrap().filesystem_id();
        assert_eq!(rec.stages[0].fsid, Some(want), "the stage records the mounted filesystem's fsid");
        let before = r.lookups();
        r.publish_at(&stage, &r.path("pods/p1/mount"), Mode::SingleNodeWriter).await.unwrap();
        assert_eq!(r.lookups(), before, "a publish of a staged filesystem needs no pool lookup");

        for (name, fsid) in [("another filesystem's fsid", Some(want ^ 1)), ("no fsid recorded", None)] {
            let mut rec = r.svc.d.records.load(&r.id).await.unwrap().unwrap();
            rec.stages[0].fsid = fsid;
            r.svc.d.records.save(&rec).await.unwrap();
            let before = r.lookups();
            r.publish_at(&stage, &r.path("pods/p2/mount"), Mode::SingleNodeMultiWriter).await.unwrap();
            assert_eq!(r.lookups(), before + 1, "{name}: the pool is asked");
        }

        let other = NodePublishVolumeRequest {
            volume_id: "file:n1:p:nope".into(),
            staging_target_path: stage.clone(),
            target_path: r.path("pods/p3/mount"),
            volume_capability: Some(cap(Mode::SingleNodeWriter, "xfs")),
            ..Default::default()
        };
        let err = r.svc.publish(other).await.unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    }

    #[tokio::test]
    async fn unpublish_and_unstage_touch_only_the_volumes_mounts() {
        let r = rig().await;
        let (stage, target) = (r.path("stage"), r.path("pods/p1/mount"));
        r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
        r.publish_at(&stage, &target, Mode::SingleNodeWriter).await.unwrap();
        let foreign = r.dir.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        r.mounter.add_mount("tmpfs", &foreign, "tmpfs", &["rw"]);
        struct Case {
            name: &'static str,
            id: String,
        }
        let cases = [
            Case { name: "the volume", id: r.id.clone() },
            Case { name: "a volume that does not exist", id: "file:n1:p:nope".into() },
            Case { name: "a malformed id", id: "no-such-volume".into() },
            Case { name: "another node's id", id: "file:n2:p:v1".into() },
        ];
        for c in &cases {
            let path = foreign.display().to_string();
            let un = NodeUnpublishVolumeRequest { volume_id: c.id.clone(), target_path: path.clone() };
            r.svc.unpublish(un).await.unwrap_or_else(|e| panic!("{}: unpublish: {e}", c.name));
            let us = NodeUnstageVolumeRequest { volume_id: c.id.clone(), staging_target_path: path };
            r.svc.unstage(us).await.unwrap_or_else(|e| panic!("{}: unstage: {e}", c.name));
            assert!(r.unmounts().is_empty(), "{}: unmounted {:?}", c.name, r.unmounts());
            assert!(foreign.is_dir(), "{}", c.name);
        }
        assert_eq!(r.detaches(), 0, "the volume is staged: never detached by a call on another path");

        // Its own paths: the bind, then the staging mount, then the loop device.
        let un = NodeUnpublishVolumeRequest { volume_id: r.id.clone(), target_path: target.clone() };
        r.svc.unpublish(un).await.unwrap();
        let us = NodeUnstageVolumeRequest { volume_id: r.id.clone(), staging_target_path: format!("{stage}/./") };
        r.svc.unstage(us).await.unwrap();
        assert_eq!(r.unmounts(), [PathBuf::from(&target), PathBuf::from(&stage)]);
        assert_eq!(r.detaches(), 1);
        assert!(!Path::new(&target).exists() && Path::new(&stage).is_dir());
        assert_eq!(r.svc.d.records.load(&r.id).await.unwrap(), None, "an unstaged volume has no record left");
    }

    #[tokio::test]
    async fn a_read_only_publish_left_writable_is_redone_and_a_finished_writable_one_is_not() {
        let r = rig().await;
        let (stage, target) = (r.path("stage"), r.path("pods/p1/mount"));
        r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
        let publish = |readonly: bool| NodePublishVolumeRequest {
            volume_id: r.id.clone(),
            staging_target_path: stage.clone(),
            target_path: target.clone(),
            volume_capability: Some(cap(Mode::SingleNodeWriter, "xfs")),
            readonly,
            ..Default::default()
        };
        r.svc.publish(publish(true)).await.unwrap();
        // What a driver killed between a bind and its read-only remount left: the record of a
        // read-only publish, a writable bind of the volume at the target.
        let at = RequestPath::internal(Path::new(&target)).unwrap();
        let bound = r.mounter.mount_at(&at).await.unwrap().unwrap();
        r.mounter.unmount(&at, bound.id).await.unwrap();
        r.mounter.bind(BindSource::Mount(&RequestPath::internal(Path::new(&stage)).unwrap()), &at, &[]).await.unwrap();
        let before = r.mounter.calls().len();
        r.svc.publish(publish(true)).await.unwrap();
        let calls = r.mounter.calls()[before..].to_vec();
        assert!(
            matches!(&calls[..], [MountCall::Unmount { target: t }, MountCall::Bind { options, .. }] if t.as_path() == Path::new(&target) && options.iter().any(|o| o == "ro")),
            "the writable bind is unmounted and bound again read-only: {calls:?}"
        );
        let top = r.mounter.mount_at(&at).await.unwrap().unwrap();
        assert!(top.mount_options.iter().any(|o| o == "ro"), "{top:?}");

        // A finished read-write publish asked read-only, twice: refused both times, untouched.
        r.svc.unpublish(NodeUnpublishVolumeRequest { volume_id: r.id.clone(), target_path: target.clone() }).await.unwrap();
        r.svc.publish(publish(false)).await.unwrap();
        let before = r.mounter.calls().len();
        for _ in 0..2 {
            assert!(matches!(r.svc.publish(publish(true)).await, Err(Error::AlreadyExists(_))));
        }
        assert_eq!(r.mounter.calls().len(), before, "nothing unmounted or bound");
        assert!(!r.svc.d.records.load(&r.id).await.unwrap().unwrap().publish_at(Path::new(&target)).unwrap().readonly);
    }

    #[tokio::test]
    async fn node_calls_take_the_lock_the_controller_takes_for_the_volume() {
        let r = rig().await;
        let stage = r.path("stage");
        // What CreateSnapshot of this volume holds while it freezes and copies.
        let held = r.svc.d.locks.try_lock(crate::locks::LockKey::new("p", ObjectKind::Volume, "v1")).unwrap();
        let aborted = |e: Error| matches!(e, Error::Aborted(ref m) if m.contains("volume v1 in pool p"));
        assert!(aborted(r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap_err()));
        let us = NodeUnstageVolumeRequest { volume_id: r.id.clone(), staging_target_path: stage.clone() };
        assert!(aborted(r.svc.unstage(us.clone()).await.unwrap_err()));
        let un = NodeUnpublishVolumeRequest { volume_id: r.id.clone(), target_path: r.path("t") };
        assert!(aborted(r.svc.unpublish(un).await.unwrap_err()));
        assert!(aborted(r.publish_at(&stage, &r.path("t"), Mode::SingleNodeWriter).await.unwrap_err()));
        let ex = NodeExpandVolumeRequest { volume_id: r.id.clone(), volume_path: stage.clone(), ..Default::default() };
        assert!(aborted(r.svc.expand(ex).await.unwrap_err()));
        assert!(r.mounter.calls().is_empty() && r.detaches() == 0, "nothing done under another call's lock");
        drop(held);
        r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
        r.svc.unstage(us).await.unwrap();
    }

    #[tokio::test]
    async fn records_outlive_the_process() {
        let r = rig().await;
        let (stage, target) = (r.path("stage"), r.path("pods/p1/mount"));
        r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
        r.publish_at(&stage, &target, Mode::SingleNodeWriter).await.unwrap();
        // A new driver on the same state directory (the mounts stay, as they do across a restart).
        let again = NodeService::new(driver(r.dir.path(), r.exec.clone(), r.mounter.clone(), r.pool.clone()));
        let other = r.path("stage-2");
        let stage2 = NodeStageVolumeRequest {
            volume_id: r.id.clone(),
            staging_target_path: other,
            volume_capability: Some(cap(Mode::SingleNodeWriter, "xfs")),
            ..Default::default()
        };
        let err = again.stage(stage2).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains(&stage), "{err}");
        again.unpublish(NodeUnpublishVolumeRequest { volume_id: r.id.clone(), target_path: target.clone() }).await.unwrap();
        again.unstage(NodeUnstageVolumeRequest { volume_id: r.id.clone(), staging_target_path: stage.clone() }).await.unwrap();
        assert_eq!(r.unmounts(), [PathBuf::from(&target), PathBuf::from(&stage)]);
    }

    #[tokio::test]
    async fn paths_that_are_not_the_volumes_are_not_found() {
        let r = rig().await;
        let (stage, target) = (r.path("stage"), r.path("pods/p1/mount"));
        r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
        r.publish_at(&stage, &target, Mode::SingleNodeWriter).await.unwrap();
        let foreign = r.dir.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        r.mounter.add_mount("/dev/sdq", &foreign, "xfs", &["rw"]);
        let empty = r.path("empty");
        std::fs::create_dir(&empty).unwrap();
        struct Case {
            name: &'static str,
            id: String,
            path: String,
        }
        let cases = [
            Case { name: "host root", id: r.id.clone(), path: "/".into() },
            Case { name: "relative", id: r.id.clone(), path: "pods/p1/mount".into() },
            Case { name: "foreign xfs", id: r.id.clone(), path: foreign.display().to_string() },
            Case { name: "unmounted directory", id: r.id.clone(), path: empty },
            Case { name: "under /proc", id: r.id.clone(), path: format!("/proc/self/root{target}") },
            Case { name: "unknown id, relative", id: "file:n1:p:nope".into(), path: "x".into() },
            Case { name: "unknown id, the volume's path", id: "file:n1:p:nope".into(), path: target.clone() },
        ];
        for c in &cases {
            let st = NodeGetVolumeStatsRequest { volume_id: c.id.clone(), volume_path: c.path.clone(), staging_target_path: String::new() };
            assert!(matches!(r.svc.stats(st).await, Err(Error::NotFound(_))), "stats: {}", c.name);
            let ex = NodeExpandVolumeRequest { volume_id: c.id.clone(), volume_path: c.path.clone(), ..Default::default() };
            assert!(matches!(r.svc.expand(ex).await, Err(Error::NotFound(_))), "expand: {}", c.name);
        }
        let grows = || r.exec.lines().iter().filter(|l| l.starts_with("xfs_growfs")).count();
        assert_eq!(grows(), 1, "only the stage grew (a no-op on a full-size filesystem)");
        // Publishing from the foreign mount exposes nothing.
        let err = r.publish_at(&foreign.display().to_string(), &r.path("pods/p2/mount"), Mode::SingleNodeWriter).await.unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        // A single writer gets one target.
        let err = r.publish_at(&stage, &r.path("pods/p3/mount"), Mode::SingleNodeSingleWriter).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains(&target), "{err}");
        let binds = r.mounter.calls().into_iter().filter(|c| matches!(c, MountCall::Bind { .. })).count();
        assert_eq!(binds, 1, "only the first publish bound anything");
    }

    #[tokio::test]
    async fn a_staging_whose_mount_is_gone_still_counts_while_a_publish_lives() {
        let r = rig().await;
        let (stage, target) = (r.path("stage"), r.path("pods/p1/mount"));
        r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
        r.publish_at(&stage, &target, Mode::SingleNodeWriter).await.unwrap();
        // Someone unmounts the staging path by hand; the bind lives on.
        let staged = r.mounter.mount_at(&RequestPath::internal(Path::new(&stage)).unwrap()).await.unwrap().unwrap();
        r.mounter.unmount(&RequestPath::internal(Path::new(&stage)).unwrap(), staged.id).await.unwrap();
        let err = r.stage_at(&r.path("stage-2"), cap(Mode::SingleNodeWriter, "xfs")).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        // Once the publish is gone too, the stale staging no longer holds the volume back.
        r.svc.unpublish(NodeUnpublishVolumeRequest { volume_id: r.id.clone(), target_path: target }).await.unwrap();
        r.stage_at(&r.path("stage-2"), cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
    }

    // issue 14: no redundant probes on stage
    /// Staging a volume that holds a filesystem probes it once (one blkid) and reads the mount
    /// table twice: once for what is at the staging path, once for the mount it made (its
    /// identity for the record). A second probe or read coming back fails this test.
    #[tokio::test]
    async fn a_stage_probes_once_and_reads_the_mount_table_twice() {
        let r = rig().await;
        let stage = r.path("stage");
        r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
        let blkids = r.exec.lines().iter().filter(|l| l.starts_with("blkid")).count();
        assert_eq!(blkids, 1, "{:?}", r.exec.lines());
        assert_eq!(r.mounter.table_reads(), 2);
    }

    /// The one stage record file in the rig's state directory.
    fn record_file(r: &Rig) -> PathBuf {
        let dir = r.dir.path().join("state/stage");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files.pop().unwrap()
    }

    // issue 14: the node's records are not fsynced
    /// Stage, publish, unpublish and unstage make no fsync in the stage record directory
    /// (their records describe what a reboot undoes; docs/design.md "Node records and power
    /// cuts"). An fsync coming back there fails this test.
    #[tokio::test]
    async fn a_ready_volume_and_its_teardown_fsync_no_node_record() {
        let r = rig().await;
        let (stage, target) = (r.path("stage"), r.path("pods/p1/mount"));
        r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
        r.publish_at(&stage, &target, Mode::SingleNodeWriter).await.unwrap();
        let rec = r.svc.d.records.load(&r.id).await.unwrap().unwrap();
        assert!(rec.stage_at(Path::new(&stage)).is_some() && rec.publish_at(Path::new(&target)).is_some(), "{rec:?}");
        r.svc.unpublish(NodeUnpublishVolumeRequest { volume_id: r.id.clone(), target_path: target }).await.unwrap();
        r.svc.unstage(NodeUnstageVolumeRequest { volume_id: r.id.clone(), staging_target_path: stage }).await.unwrap();
        assert_eq!(crate::store::fsyncs_of(&r.dir.path().join("state/stage")), Vec::<PathBuf>::new());
    }

    /// What a power cut can leave of a record that was not fsynced (an older version, none, or
    /// an unreadable file written before the boot), with nothing mounted any more (a reboot):
    /// unpublish and unstage answer OK without unmounting anything, and the volume stages and
    /// publishes afresh. A record damaged since the boot is still the error that names it.
    #[tokio::test]
    async fn what_a_power_cut_leaves_of_a_record_blocks_nothing_once_nothing_is_mounted() {
        enum Left {
            Older,
            Missing,
            Torn(&'static [u8]),
        }
        struct Case {
            name: &'static str,
            left: Left,
        }
        let cases = [
            Case { name: "the version before the publish", left: Left::Older },
            Case { name: "no record", left: Left::Missing },
            Case { name: "an empty file", left: Left::Torn(b"") },
            Case { name: "half the JSON", left: Left::Torn(b"{\"volume_id\": \"file:n1:p:v1\", \"stages\": [{\"pa") },
            Case { name: "zeroes", left: Left::Torn(&[0; 64]) },
        ];
        let before_boot = crate::node::records::boot_time().unwrap() - Duration::from_secs(60);
        for c in cases {
            let r = rig().await;
            let (stage, target) = (r.path("stage"), r.path("pods/p1/mount"));
            r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
            let file = record_file(&r);
            let staged = std::fs::read(&file).unwrap();
            r.publish_at(&stage, &target, Mode::SingleNodeWriter).await.unwrap();
            match c.left {
                Left::Older => std::fs::write(&file, &staged).unwrap(),
                Left::Missing => std::fs::remove_file(&file).unwrap(),
                Left::Torn(bytes) => std::fs::write(&file, bytes).unwrap(),
            }
            if file.exists() {
                std::fs::File::options().write(true).open(&file).unwrap().set_modified(before_boot).unwrap();
            }
            // The reboot: nothing mounted, a new driver on the same state directory.
            let mounter = Arc::new(FakeMounter::new());
            let svc = NodeService::new(driver(r.dir.path(), r.exec.clone(), mounter.clone(), r.pool.clone()));
            let un = NodeUnpublishVolumeRequest { volume_id: r.id.clone(), target_path: target.clone() };
            svc.unpublish(un).await.unwrap_or_else(|e| panic!("{}: unpublish: {e}", c.name));
            let us = NodeUnstageVolumeRequest { volume_id: r.id.clone(), staging_target_path: stage.clone() };
            svc.unstage(us).await.unwrap_or_else(|e| panic!("{}: unstage: {e}", c.name));
            assert!(mounter.calls().iter().all(|m| !matches!(m, MountCall::Unmount { .. })), "{}: {:?}", c.name, mounter.calls());
            let st = NodeStageVolumeRequest {
                volume_id: r.id.clone(),
                staging_target_path: stage.clone(),
                volume_capability: Some(cap(Mode::SingleNodeWriter, "xfs")),
                ..Default::default()
            };
            svc.stage(st).await.unwrap_or_else(|e| panic!("{}: stage: {e}", c.name));
            let pb = NodePublishVolumeRequest {
                volume_id: r.id.clone(),
                staging_target_path: stage.clone(),
                target_path: target.clone(),
                volume_capability: Some(cap(Mode::SingleNodeWriter, "xfs")),
                ..Default::default()
            };
            svc.publish(pb).await.unwrap_or_else(|e| panic!("{}: publish: {e}", c.name));
            let at = |p: &str| RequestPath::internal(Path::new(p)).unwrap();
            assert!(mounter.mount_at(&at(&stage)).await.unwrap().is_some(), "{}: staged again", c.name);
            assert!(mounter.mount_at(&at(&target)).await.unwrap().is_some(), "{}: published again", c.name);
            let rec = svc.d.records.load(&r.id).await.unwrap().unwrap();
            assert!(rec.stage_at(Path::new(&stage)).is_some() && rec.publish_at(Path::new(&target)).is_some(), "{}: {rec:?}", c.name);
        }

        // Damaged in this boot: not a power cut's doing, so the error that says what to do.
        let r = rig().await;
        let stage = r.path("stage");
        r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap();
        std::fs::write(record_file(&r), b"{").unwrap();
        let err = r.svc.unstage(NodeUnstageVolumeRequest { volume_id: r.id.clone(), staging_target_path: stage }).await.unwrap_err();
        assert!(matches!(err, Error::Internal(ref m) if m.contains("move it away")), "{err}");
    }

    #[tokio::test]
    async fn a_failed_stage_leaves_nothing_attached_or_recorded() {
        let r = rig().await;
        let stage = r.path("stage");
        // The device holds xfs; ext4 is asked for.
        let err = r.stage_at(&stage, cap(Mode::SingleNodeWriter, "ext4")).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert_eq!(r.detaches(), 1, "the loop device attached for it is detached again: {:?}", r.exec.lines());
        assert_eq!(r.svc.d.records.load(&r.id).await.unwrap(), None);
        // A foreign mount at the staging path: refused, nothing attached, nothing unmounted.
        r.mounter.add_mount("tmpfs", Path::new(&stage), "tmpfs", &["rw"]);
        let err = r.stage_at(&stage, cap(Mode::SingleNodeWriter, "xfs")).await.unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        assert_eq!(r.detaches(), 2);
        assert!(r.unmounts().is_empty());
        assert_eq!(r.mounter.mounts().await.unwrap().len(), 1, "the foreign mount is still there");
    }
}
