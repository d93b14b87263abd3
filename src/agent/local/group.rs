//! Group snapshots on this node's pools (issue 12): CreateVolumeGroupSnapshot,
//! DeleteVolumeGroupSnapshot and GetVolumeGroupSnapshot of [`LocalAgent`].
//!
//! A group lives in one pool. It is not stored apart: each member is an ordinary snapshot of
//! that pool that records the group ([`GroupMembership`]: its CSI name, local name, uid and
//! member count), so the group is found again after a restart by listing the pool's snapshots.
//! The group id is `<kind>:<node>:<pool>:<group local>:g<uid>` ([`Object::Group`]).
//! Fewer members found than the count says means a create or delete was cut short: a create
//! retry removes them and takes the group again (a half-taken group is not one point in time),
//! a delete removes what is left.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{LocalAgent, timestamp};
use crate::csi::{lock_key, require};
use crate::error::{Error, Result, bounded};
use crate::locks::{LockKey, ObjectKind};
use crate::pool::{GroupMember, GroupMembership, Pool, SnapshotInfo};
use crate::proto::*;
use crate::volume_id::{Object, VolumeId, local_name, new_uid};

/// The lock of group `local` in `pool` (beside its members' own snapshot locks).
fn group_key(pool: &str, local: &str) -> LockKey {
    LockKey::new(pool, ObjectKind::Snapshot, &format!("group:{local}"))
}

/// The longest group snapshot name taken, in bytes. Kubernetes names groups
/// `groupsnapshot-<uid>` (50 bytes); each member records the name (hex-encoded in an LVM tag of
/// at most 1024 characters, beside its source's local name), so a longer one could be taken
/// on one pool kind and not on another.
pub const MAX_GROUP_NAME: usize = 256;

/// A group snapshot name must be given, at most [`MAX_GROUP_NAME`] bytes, and free of control
/// characters (it is echoed in logs, `holdfast ctl` output and every member's record).
pub fn check_group_name(name: &str) -> Result<()> {
    require("name", name)?;
    if name.len() > MAX_GROUP_NAME {
        return Err(Error::InvalidArgument(format!(
            "group snapshot name {} is {} bytes long: at most {MAX_GROUP_NAME}",
            bounded(name),
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!("group snapshot name {} holds control characters", bounded(name))));
    }
    Ok(())
}

/// The CSI name of the member of group `group` taken of volume `source` (local name).
pub fn member_name(group: &str, source: &str) -> String {
    format!("{group}/{source}")
}

impl LocalAgent {
    /// The group id of a member's group, if it is one.
    pub(super) fn group_id(&self, pool: &dyn Pool, s: &SnapshotInfo) -> Option<VolumeId> {
        s.group.as_ref().map(|g| self.d.object_id(pool, &g.local, Object::Group, Some(&g.uid)))
    }

    /// The members of the group `local`/`uid` (by uid, the group's identity) still in `pool`.
    async fn members(&self, pool: &dyn Pool, local: &str, uid: &str) -> Result<Vec<SnapshotInfo>> {
        let all = pool.list_snapshots().await?;
        Ok(all.into_iter().filter(|s| s.group.as_ref().is_some_and(|g| g.local == local && g.uid == uid)).collect())
    }

    /// The CSI message of a group from its members.
    fn group_message(&self, pool: &dyn Pool, members: &[SnapshotInfo]) -> VolumeGroupSnapshot {
        let g = members.first().and_then(|s| s.group.clone());
        let id = g.as_ref().map(|g| self.d.object_id(pool, &g.local, Object::Group, Some(&g.uid)).to_string()).unwrap_or_default();
        let complete = g.as_ref().is_some_and(|g| g.members as usize == members.len());
        VolumeGroupSnapshot {
            group_snapshot_id: id,
            snapshots: members.iter().map(|s| self.snapshot_message(pool, s)).collect(),
            creation_time: members.iter().map(|s| s.created).min().map(timestamp),
            ready_to_use: complete && members.iter().all(|s| s.ready),
        }
    }

    /// Removes members (a failed or cut-short create, a delete); every one is tried.
    async fn remove_members(&self, pool: &dyn Pool, members: &[SnapshotInfo]) -> Result<()> {
        let mut first_error = None;
        for s in members {
            match pool.delete_snapshot(&s.local).await {
                Ok(()) => self.note_snapshot_gone(pool, &s.local, Some(s.csi_name.clone())),
                Err(e) => {
                    tracing::error!(pool = %pool.name(), snapshot = %s.local, error = %e, "cannot remove a group snapshot member");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// CreateVolumeGroupSnapshot: validate, lock the group and its volumes, find the group
    /// (a retry) or take it.
    pub async fn create_group_snapshot_here(&self, req: CreateVolumeGroupSnapshotRequest) -> Result<CreateVolumeGroupSnapshotResponse> {
        check_group_name(&req.name)?;
        if req.source_volume_ids.is_empty() {
            return Err(Error::InvalidArgument("source_volume_ids is required".into()));
        }
        if let Some(key) = req.parameters.keys().find(|k| !k.starts_with("csi.storage.k8s.io/")) {
            return Err(Error::InvalidArgument(format!("unknown group snapshot parameter {}", bounded(key))));
        }
        let mut seen = BTreeSet::new();
        if let Some(dup) = req.source_volume_ids.iter().find(|id| !seen.insert(id.as_str())) {
            return Err(Error::InvalidArgument(format!("source_volume_ids names volume {} twice", bounded(dup))));
        }
        let local = local_name(&req.name);
        let keys = self.d.pools.keys().map(|p| group_key(p, &local));
        let volume_keys = req.source_volume_ids.iter().map(|id| lock_key(&self.d, ObjectKind::Volume, id));
        let _guard = self.d.locks.try_lock_all(keys.chain(volume_keys).collect::<Vec<_>>())?;

        let mut volumes = Vec::new();
        for id in &req.source_volume_ids {
            volumes.push(self.find_volume(id).await?);
        }
        let pool = volumes[0].0.clone();
        if let Some((i, (p, _))) = volumes.iter().enumerate().find(|(_, (p, _))| p.name() != pool.name()) {
            return Err(Error::InvalidArgument(format!(
                "volume {} is in pool {:?}, not in pool {:?} of volume {}: a group snapshot is of volumes of one pool",
                bounded(&req.source_volume_ids[i]),
                p.name(),
                pool.name(),
                bounded(&req.source_volume_ids[0])
            )));
        }
        // The sources as the members record them: local name and uid.
        let wanted: BTreeSet<(String, Option<String>)> = volumes.iter().map(|(_, v)| (v.local.clone(), v.uid.clone())).collect();

        // A group of that name in any pool of this node is this request's retry or a conflict.
        for p in self.d.pools.values() {
            let found: Vec<SnapshotInfo> = match p.list_snapshots().await {
                Ok(all) => all.into_iter().filter(|s| s.group.as_ref().is_some_and(|g| g.name == req.name)).collect(),
                Err(e) if p.name() != pool.name() => {
                    self.failed(p.as_ref(), &e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(g) = found.first().and_then(|s| s.group.clone()) else { continue };
            let have: BTreeSet<(String, Option<String>)> = found.iter().map(|s| (s.source_volume.clone(), s.source_uid.clone())).collect();
            let complete = g.members as usize == found.len();
            if p.name() == pool.name() && have == wanted && complete {
                for s in &found {
                    self.note_snapshot(p.as_ref(), s);
                }
                return Ok(CreateVolumeGroupSnapshotResponse { group_snapshot: Some(self.group_message(p.as_ref(), &found)) });
            }
            if !complete {
                // Cut short (a killed driver): never answered as a group, and not one point in
                // time any more: removed, and taken again below.
                tracing::warn!(pool = %p.name(), group = %bounded(&req.name), found = found.len(), of = g.members, "removing an unfinished group snapshot before taking it again");
                self.remove_members(p.as_ref(), &found).await?;
                continue;
            }
            let sources: Vec<String> = found
                .iter()
                .map(|s| self.d.object_id(p.as_ref(), &s.source_volume, Object::Volume, s.source_uid.as_deref()).to_string())
                .collect();
            return Err(Error::AlreadyExists(format!(
                "group snapshot {} already exists of volumes {}, not of the volumes this request names",
                bounded(&req.name),
                sources.join(", ")
            )));
        }

        let group = GroupMembership { name: req.name.clone(), local: local.clone(), uid: new_uid(), members: volumes.len() as u32 };
        let members: Vec<GroupMember> = volumes
            .iter()
            .map(|(_, v)| {
                let csi_name = member_name(&req.name, &v.local);
                GroupMember { source: v.local.clone(), local: local_name(&csi_name), csi_name, uid: new_uid() }
            })
            .collect();
        let member_keys: Vec<LockKey> = members.iter().map(|m| LockKey::new(pool.name(), ObjectKind::Snapshot, &m.local)).collect();
        let _members_guard = self.d.locks.try_lock_all(member_keys)?;
        // A member's local name taken by something else is a conflict the pool would answer
        // for one member only, after the others were taken.
        for m in &members {
            if let Some(s) = pool.get_snapshot(&m.local).await? {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {} (local name {}) is in the way of group snapshot {}; delete it or use another group name",
                    bounded(&s.csi_name),
                    m.local,
                    bounded(&req.name)
                )));
            }
        }
        let (g_local, g_uid) = (group.local.clone(), group.uid.clone());
        match pool.clone().create_group_snapshot(group, members).await {
            Ok(taken) => {
                for s in &taken {
                    self.note_snapshot(pool.as_ref(), s);
                }
                tracing::info!(pool = %pool.name(), group = %bounded(&req.name), members = taken.len(), "took group snapshot");
                Ok(CreateVolumeGroupSnapshotResponse { group_snapshot: Some(self.group_message(pool.as_ref(), &taken)) })
            }
            Err(e) => {
                // Nothing of a failed group is left (a pool cut short by a deadline may have
                // committed some members).
                if let Ok(left) = self.members(pool.as_ref(), &g_local, &g_uid).await {
                    let _ = self.remove_members(pool.as_ref(), &left).await;
                }
                Err(e)
            }
        }
    }

    /// The pool and the id of a group id this node serves; `None` when it names nothing here.
    fn group_of(&self, id: &str) -> Option<(Arc<dyn Pool>, VolumeId)> {
        let gid = VolumeId::parse(id).filter(VolumeId::is_group)?;
        Some((self.d.own_pool_of(&gid)?, gid))
    }

    /// INVALID_ARGUMENT when `snapshot_ids` (if given) does not list every member still there,
    /// or names a snapshot of this node that is not a member.
    fn check_listed(&self, pool: &dyn Pool, members: &[SnapshotInfo], snapshot_ids: &[String]) -> Result<()> {
        if snapshot_ids.is_empty() {
            return Ok(());
        }
        let ids: BTreeSet<String> = members.iter().map(|s| self.d.snapshot_id(pool, s).to_string()).collect();
        if let Some(missing) = ids.iter().find(|id| !snapshot_ids.contains(id)) {
            return Err(Error::InvalidArgument(format!("snapshot_ids does not list member {missing} of the group snapshot")));
        }
        if let Some(other) = snapshot_ids.iter().find(|id| !ids.contains(*id) && VolumeId::parse(id).is_some_and(|s| s.pool == pool.name()))
        {
            // An id of a member already deleted (a delete cut short) is fine: it is not here.
            let here = VolumeId::parse(other).is_some_and(|s| members.iter().all(|m| m.local != s.local));
            if !here {
                return Err(Error::InvalidArgument(format!("snapshot {} is not a member of the group snapshot", bounded(other))));
            }
        }
        Ok(())
    }

    /// DeleteVolumeGroupSnapshot: deletes every member still there; an id naming nothing: OK.
    pub async fn delete_group_snapshot_here(&self, req: DeleteVolumeGroupSnapshotRequest) -> Result<DeleteVolumeGroupSnapshotResponse> {
        require("group_snapshot_id", &req.group_snapshot_id)?;
        let Some((pool, gid)) = self.group_of(&req.group_snapshot_id) else { return Ok(DeleteVolumeGroupSnapshotResponse {}) };
        let uid = gid.tag.as_ref().map(|t| t.uid.clone()).unwrap_or_default();
        let _guard = self.d.locks.try_lock(group_key(pool.name(), &gid.local))?;
        let members = self.members(pool.as_ref(), &gid.local, &uid).await?;
        self.check_listed(pool.as_ref(), &members, &req.snapshot_ids)?;
        let keys: Vec<LockKey> = members.iter().map(|s| LockKey::new(pool.name(), ObjectKind::Snapshot, &s.local)).collect();
        let _members = self.d.locks.try_lock_all(keys)?;
        self.remove_members(pool.as_ref(), &members).await?;
        tracing::info!(pool = %pool.name(), group = %gid, members = members.len(), "deleted group snapshot");
        Ok(DeleteVolumeGroupSnapshotResponse {})
    }

    /// GetVolumeGroupSnapshot: NOT_FOUND when no member is left.
    pub async fn get_group_snapshot_here(&self, req: GetVolumeGroupSnapshotRequest) -> Result<GetVolumeGroupSnapshotResponse> {
        require("group_snapshot_id", &req.group_snapshot_id)?;
        let missing = || Error::NotFound(format!("group snapshot {} does not exist", bounded(&req.group_snapshot_id)));
        let (pool, gid) = self.group_of(&req.group_snapshot_id).ok_or_else(missing)?;
        let uid = gid.tag.as_ref().map(|t| t.uid.clone()).unwrap_or_default();
        let members = self.members(pool.as_ref(), &gid.local, &uid).await?;
        if members.is_empty() {
            return Err(missing());
        }
        self.check_listed(pool.as_ref(), &members, &req.snapshot_ids)?;
        Ok(GetVolumeGroupSnapshotResponse { group_snapshot: Some(self.group_message(pool.as_ref(), &members)) })
    }
}
