//! The copy flow of the `zfs` pool: a restore or clone is a `zfs clone` (of the snapshot, or of
//! a hidden intermediate snapshot of the source volume), then finished (grown, new filesystem
//! UUID, pending mark dropped); snapshots of zvols with mounted filesystems are taken frozen.

use std::path::{Path, PathBuf};

use super::*;

impl ZfsPool {
    /// Ends a restore or clone with the shared flow ([`crate::pool::copy::finish`]): grow a
    /// zvol to the requested size, give its filesystem a new UUID, drop the pending mark.
    pub(super) async fn finish_copy(&self, o: &Object, capacity: u64, block: bool) -> Result<()> {
        crate::pool::copy::finish(self.exec.as_ref(), &ZfsCopy { pool: self, o }, capacity, block).await
    }

    pub(super) async fn set_volsize(&self, name: &str, capacity: u64) -> Result<()> {
        match self.run(command::set(name, "volsize", &capacity.to_string())).await {
            Ok(_) => Ok(()),
            // Space may be freed later, so this is worth retrying: not OUT_OF_RANGE.
            Err(e) if command::is_no_space(&e) => Err(Error::ResourceExhausted(format!(
                "cannot grow zvol {name} to {}: the zpool has no room for it ({})",
                format_size(capacity),
                e.stderr().trim()
            ))),
            Err(e) => Err(Error::exec(format!("growing zvol {name} to {capacity} bytes"), e)),
        }
    }

    pub(super) async fn create_copy(
        &self,
        req: &CreateRequest,
        source: &Source,
        zvol: bool,
        fs_type: Option<String>,
    ) -> Result<VolumeInfo> {
        let name = self.volume_dataset(&req.local);
        let kind_of = |z: bool| if z { "a zvol (raw block, ext4, xfs or btrfs)" } else { "a ZFS dataset (filesystem zfs)" };
        let (origin, source_zvol, source_fs, min) = match source {
            Source::Snapshot(s) => {
                let (o, m) = self
                    .find_snapshot(s)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("snapshot {s:?} not found in pool {:?}", self.name)))?;
                let min = m.size.max(o.volsize);
                (o.name.clone(), o.volsize > 0, m.fs_type, min)
            }
            Source::Volume(v) => {
                let (o, m) =
                    self.find_volume(v).await?.ok_or_else(|| Error::NotFound(format!("volume {v:?} not found in pool {:?}", self.name)))?;
                if m.pending {
                    return Err(Error::FailedPrecondition(format!("volume {v:?} is itself an unfinished copy; retry its creation first")));
                }
                (self.intermediate_name(&o, &req.local), o.kind == Kind::Volume, m.fs_type, o.capacity())
            }
        };
        if source_zvol != zvol {
            return Err(Error::InvalidArgument(format!(
                "the source of volume {:?} is {}, and a copy of it is one too; this request asks for {}",
                req.csi_name,
                kind_of(source_zvol),
                kind_of(zvol)
            )));
        }
        if zvol && !req.block {
            if let (Some(have), Some(want)) = (&source_fs, &fs_type) {
                if have != want {
                    return Err(Error::InvalidArgument(format!(
                        "the source of volume {:?} holds {have}, not {want}: request fs_type {have}",
                        req.csi_name
                    )));
                }
            }
        }
        if req.capacity < min {
            return Err(Error::OutOfRange(format!(
                "the copy needs at least {} (the size of its source), not {}",
                format_size(min),
                format_size(req.capacity)
            )));
        }
        if let Source::Volume(v) = source {
            self.ensure_intermediate(&origin, v).await?;
        }
        let tuning = self.tuning(&req.parameters, zvol, true)?;
        // A zvol copy is grown and gets a new filesystem UUID after the clone; a dataset clone
        // is complete as it is made.
        let meta = self.new_meta(req, fs_type, zvol);
        let props = if zvol {
            let mut p = tuning;
            if !self.sparse {
                // A clone starts without a reservation; `auto` reserves its volsize, and follows it.
                p.push(("refreservation".to_owned(), "auto".to_owned()));
            }
            let mut p = self.with_mutable(p, req, zvol)?;
            p.extend(meta.properties());
            p
        } else {
            self.dataset_properties(req.capacity, self.with_mutable(tuning, req, zvol)?, &meta)
        };
        if let Some(existing) = self.run_create(command::clone(&origin, &name, &props), &name, req).await? {
            return Ok(existing);
        }
        if zvol {
            let o = self
                .read(&name, command::DATASETS)
                .await?
                .ok_or_else(|| Error::Internal(format!("ZFS {name} vanished right after it was made")))?;
            self.finish_copy(&o, req.capacity, req.block).await?;
        }
        self.read_volume(&name).await
    }

    /// `<volume>@clone.<clone local>`.
    pub(super) fn intermediate_name(&self, source: &Object, clone_local: &str) -> String {
        format!("{}@{INTERMEDIATE}{clone_local}", source.name)
    }

    /// Takes the hidden snapshot a clone of volume `source_local` is made from (kept when a
    /// retry finds it already taken).
    pub(super) async fn ensure_intermediate(&self, snapshot: &str, source_local: &str) -> Result<()> {
        let meta = Meta {
            pool: self.name.clone(),
            object: ObjectType::Intermediate,
            local: snapshot.split_once(&format!("@{INTERMEDIATE}")).map(|(_, l)| l.to_owned()).unwrap_or_default(),
            csi_name: String::new(),
            capacity: 0,
            block: false,
            fs_type: None,
            source: None,
            size: 0,
            pending: false,
            uid: None,
            source_uid: None,
            parameters: None,
            mutable: Default::default(),
            group: None,
        };
        let dataset = snapshot.split_once('@').map_or(snapshot, |(d, _)| d);
        match self
            .snapshot_frozen(dataset, format!("clone of volume {source_local:?}"), command::snapshot(snapshot, &meta.properties()))
            .await
        {
            Ok(()) => {
                tracing::info!(pool = %self.name, snapshot = %snapshot, source = %source_local, "took the intermediate snapshot of a clone");
                Ok(())
            }
            Err(SnapshotError::Zfs(e)) if command::is_exists(&e) => Ok(()),
            Err(SnapshotError::Zfs(e)) if command::is_no_space(&e) => {
                Err(Error::ResourceExhausted(format!("no room to snapshot volume {source_local:?} for a clone: {}", e.stderr().trim())))
            }
            Err(SnapshotError::Zfs(e)) => Err(Error::exec(format!("snapshotting {dataset} for a clone"), e)),
            Err(SnapshotError::Freeze(e)) => Err(e),
        }
    }

    /// Runs `snapshot` of `dataset`; for a zvol, with the filesystems mounted from it frozen by
    /// the [`Freezer`] (its policy: recorded, thawed on every path, FAILED_PRECONDITION when a
    /// mounted filesystem cannot be frozen).
    pub(super) async fn snapshot_frozen(&self, dataset: &str, purpose: String, snapshot: Cmd) -> Result<(), SnapshotError> {
        let device = Self::zvol_device(dataset);
        // A dataset's snapshot is consistent by itself (it includes everything written through
        // the filesystem); a zvol's needs the filesystem on it to write out its cache first.
        let mounts = self.freezer.mounter().mounts().await.map_err(SnapshotError::Freeze)?;
        let mount_points =
            crate::blocking::run("mountinfo", "finding the mounts of a device", crate::blocking::METADATA_DEADLINE, move || {
                if device.exists() { mounted_filesystems(&device, &mounts) } else { Vec::new() }
            })
            .await
            .map_err(SnapshotError::Freeze)?;
        let volume = dataset.rsplit('/').next().unwrap_or(dataset).to_owned();
        let target = Target { pool: self.name.clone(), volume, mount_points, purpose };
        let exec = self.exec.clone();
        let done = self.freezer.around(target, async move { exec.run(snapshot).await.map(|_| ()) }).await;
        done.map_err(SnapshotError::Freeze)?.map_err(SnapshotError::Zfs)
    }
}

/// Mount points of the filesystems mounted from `device`, one per filesystem (bind mounts of
/// the same filesystem share its superblock, so freezing one freezes all).
pub(super) fn mounted_filesystems(device: &Path, mounts: &[crate::node::mountinfo::MountInfo]) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let Ok(real) = std::fs::canonicalize(device) else {
        return Vec::new();
    };
    let dev_id = std::fs::metadata(&real).map(|m| format!("{}:{}", nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev()))).ok();
    let mut seen = Vec::new();
    let mut points = Vec::new();
    for m in mounts {
        // ext4 and XFS show the device number; btrfs an anonymous one, so the source path
        // (/dev/zd0 or a /dev/zvol link) is resolved too.
        let by_number = dev_id.as_deref() == Some(m.major_minor.as_str());
        let by_source = m.source.starts_with("/dev/") && std::fs::canonicalize(&m.source).is_ok_and(|s| s == real);
        if (by_number || by_source) && !seen.contains(&m.major_minor) {
            seen.push(m.major_minor.clone());
            points.push(m.mount_point.clone());
        }
    }
    points
}

/// Why [`ZfsPool::snapshot_frozen`] failed.
pub(super) enum SnapshotError {
    /// `zfs snapshot` failed (to be classified).
    Zfs(ExecError),
    /// The freeze policy refused or a thaw failed (already the answer).
    Freeze(Error),
}

/// A ZFS copy (a clone) being finished: the kind-specific steps of the shared flow. A dataset
/// has no device and its quota was set at the clone; only a zvol is grown and re-UUIDed.
struct ZfsCopy<'a> {
    pool: &'a ZfsPool,
    o: &'a Object,
}

#[async_trait]
impl crate::pool::copy::Copy for ZfsCopy<'_> {
    async fn grow_to(&self, capacity: u64) -> Result<()> {
        if self.o.kind == Kind::Volume && self.o.volsize < capacity {
            self.pool.set_volsize(&self.o.name, capacity).await?;
        }
        Ok(())
    }

    async fn device(&self, filesystem: bool) -> Result<Option<PathBuf>> {
        if self.o.kind != Kind::Volume || !filesystem {
            return Ok(None);
        }
        let device = ZfsPool::zvol_device(&self.o.name);
        crate::pool::wait_for_device(&device, DEVICE_WAIT, ZVOL_HINT).await?;
        Ok(Some(device))
    }

    async fn mark_finished(&self) -> Result<()> {
        self.pool
            .run(command::inherit(&self.o.name, report::P_PENDING))
            .await
            .context(|| format!("marking the copy {} finished", self.o.name))?;
        Ok(())
    }
}
