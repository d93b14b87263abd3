//! The file pool's in-memory index: every volume's record and promised bytes, every snapshot's
//! promised bytes, so a creation, GetCapacity and ListVolumes cost the same at 10,000 volumes
//! as at 100 (reading the pool directory on each create made its cost grow with the pool).
//!
//! - **Rebuilt from the pool** when first used (start-up): every record read, every image
//!   stat'ed, the loop devices found in `/sys/block/*/loop/backing_file`. A damaged record is
//!   left out with a warning (as a listing of the directory did); a half-made creation (a
//!   temporary, an image without metadata) is no record, so it is not in the index either.
//! - **Kept true by every change**: the pool's operations update the entry they changed after
//!   the change is durable (create, delete, expand, snapshot, modify, attach, detach).
//! - **Promised bytes** of a volume are its image's holes (apparent size − allocated) and its
//!   `shared` bytes. A detached image changes only through the pool, so its holes are counted
//!   as last measured; an attached one is written through its loop device, so its holes are
//!   measured again each time the room is (one stat per attached volume, not per volume).
//! - **Changes behind our back** (files added or removed by hand) change the pool directories'
//!   mtimes. Each operation of the pool records the mtimes it leaves; a check while no operation
//!   is in progress that finds other mtimes rebuilds the index. A change made while operations
//!   run, or one that rewrites a file in place, is not noticed until the next start.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Kind, SnapshotRecord, VolumeRecord, meta_noun, room};
use crate::error::{Error, Result};
use crate::store;
use crate::volume_id::valid_local_name;

/// One volume as the index knows it.
#[derive(Debug, Clone)]
struct Entry {
    record: VolumeRecord,
    /// The image's holes when last measured.
    holes: u64,
    /// Attached to a loop device (so written behind the pool's back): measured anew each time.
    attached: bool,
}

/// A pool directory's modification time, to notice changes made by hand.
type Stamp = Option<(i64, i64)>;

#[derive(Debug, Default)]
struct State {
    loaded: bool,
    volumes: BTreeMap<String, Entry>,
    /// Snapshots' `shared` bytes (their own holes promise nothing: they are never written).
    snapshots: BTreeMap<String, u64>,
    /// The directories' mtimes the pool's last operation left.
    seen: [Stamp; 2],
    /// Operations of the pool in progress: while any runs, mtimes say nothing.
    busy: usize,
}

/// The index of one file pool (shared with its blocking calls, hence the `Arc`).
#[derive(Debug, Clone)]
pub(super) struct Index {
    root: PathBuf,
    sys_block: PathBuf,
    state: Arc<Mutex<State>>,
}

/// An operation of the pool in progress (see [`Index::begin`]).
pub(super) struct Busy {
    state: Arc<Mutex<State>>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.busy = s.busy.saturating_sub(1);
    }
}

fn stamp(dir: &Path) -> Result<Stamp> {
    match fs::metadata(dir) {
        Ok(m) => Ok(Some((m.mtime(), m.mtime_nsec()))),
        Err(e) => Err(room::dir_error(dir, e)),
    }
}

/// Holes of an image: 0 for one that is missing (condition() reports it).
fn holes_of(img: &Path) -> Result<u64> {
    match fs::metadata(img) {
        Ok(m) => Ok(m.len().saturating_sub(m.blocks() * 512)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io(format!("inspecting {}", img.display()), e)),
    }
}

impl Index {
    /// The index of the pool at `root`, loaded on first use.
    pub(super) fn new(root: &Path, sys_block: &Path) -> Index {
        Index { root: root.to_owned(), sys_block: sys_block.to_owned(), state: Arc::default() }
    }

    /// Where the kernel shows loop devices (tests use a fake tree).
    pub(super) fn set_sys_block(&mut self, sys_block: &Path) {
        self.sys_block = sys_block.to_owned();
    }

    fn img(&self, local: &str) -> PathBuf {
        self.root.join(Kind::Volume.dir()).join(format!("{local}.img"))
    }

    fn stamps(&self) -> Result<[Stamp; 2]> {
        Ok([stamp(&self.root.join(Kind::Volume.dir()))?, stamp(&self.root.join(Kind::Snapshot.dir()))?])
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The index, rebuilt when not loaded yet or when the pool directories changed while no
    /// operation ran. A blocking call (it may read the whole pool).
    fn fresh(&self) -> Result<MutexGuard<'_, State>> {
        let stamps = self.stamps()?;
        let mut s = self.lock();
        if !s.loaded || (s.busy == 0 && s.seen != stamps) {
            if s.loaded {
                tracing::info!(pool = %self.root.display(), "the pool directory changed behind the driver's back: re-reading it");
            }
            self.rebuild(&mut s)?;
            s.seen = stamps;
        }
        Ok(s)
    }

    fn rebuild(&self, s: &mut State) -> Result<()> {
        let attached = self.attached_images();
        let mut volumes = BTreeMap::new();
        let dir = self.root.join(Kind::Volume.dir());
        for (local, r) in self.records::<VolumeRecord>(Kind::Volume)? {
            let Some(mut record) = r else { continue };
            record.info.local = local.clone();
            let img = dir.join(format!("{local}.img"));
            let holes = holes_of(&img)?;
            let attached = attached.as_ref().is_none_or(|a| a.contains(&img));
            volumes.insert(local, Entry { record, holes, attached });
        }
        let snapshots =
            self.records::<SnapshotRecord>(Kind::Snapshot)?.into_iter().filter_map(|(local, r)| r.map(|r| (local, r.shared))).collect();
        s.volumes = volumes;
        s.snapshots = snapshots;
        s.loaded = true;
        Ok(())
    }

    /// The records of one directory; a damaged one is `None` (warned about).
    fn records<T: serde::de::DeserializeOwned>(&self, kind: Kind) -> Result<Vec<(String, Option<T>)>> {
        let dir = self.root.join(kind.dir());
        let listed = match store::list_dir::<T>(&dir, &meta_noun()) {
            Err(Error::Io { source, .. }) if source.kind() == ErrorKind::NotFound => return Err(room::dir_error(&dir, source)),
            r => r?,
        };
        Ok(listed
            .into_iter()
            .filter(|(local, _)| valid_local_name(local))
            .map(|(local, r)| match r {
                Ok(v) => (local, Some(v)),
                Err(e) => {
                    // One damaged file must not hide every other object; condition() reports it.
                    tracing::warn!(pool = %self.root.display(), local, error = %e, "skipping unreadable {}", kind.noun());
                    (local, None)
                }
            })
            .collect())
    }

    /// The images of this pool that loop devices are attached to, from the kernel's
    /// `backing_file` of each; `None` (treat every image as attached) when that cannot be read.
    fn attached_images(&self) -> Option<HashSet<PathBuf>> {
        let dir = self.root.join(Kind::Volume.dir());
        // The kernel shows the resolved path.
        let real = fs::canonicalize(&dir).unwrap_or(dir.clone());
        let entries = match fs::read_dir(&self.sys_block) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Some(HashSet::new()),
            Err(e) => {
                tracing::warn!(path = %self.sys_block.display(), error = %e, "cannot list loop devices; measuring every image each time");
                return None;
            }
        };
        let mut out = HashSet::new();
        for e in entries.flatten() {
            let Ok(file) = fs::read_to_string(e.path().join("loop/backing_file")) else { continue };
            let file = PathBuf::from(file.trim_end_matches('\n').trim_end_matches(" (deleted)"));
            if let Ok(rest) = file.strip_prefix(&real) {
                out.insert(dir.join(rest));
            }
        }
        Some(out)
    }

    /// Marks an operation in progress; call [`Index::done`] when it ends (a dropped guard
    /// without `done` only makes the next check re-read the pool).
    pub(super) fn begin(&self) -> Result<Busy> {
        drop(self.fresh()?);
        self.lock().busy += 1;
        Ok(Busy { state: self.state.clone() })
    }

    /// Ends an operation: the mtimes it leaves are the pool's own (a blocking call).
    pub(super) fn done(&self, busy: Busy) {
        if let Ok(stamps) = self.stamps() {
            self.lock().seen = stamps;
        }
        drop(busy);
    }

    /// Every volume record, in name order (a blocking call: it may rebuild).
    pub(super) fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        Ok(self.fresh()?.volumes.values().map(|e| e.record.clone()).collect())
    }

    /// Bytes promised but not held (a blocking call: one stat per attached volume).
    pub(super) fn promised(&self) -> Result<u64> {
        let s = self.fresh()?;
        let mut total = s.snapshots.values().fold(0u64, |t, b| t.saturating_add(*b));
        for (local, e) in &s.volumes {
            let holes = if e.attached { holes_of(&self.img(local))? } else { e.holes };
            total = total.saturating_add(holes).saturating_add(e.record.shared);
        }
        Ok(total)
    }

    /// Records a volume as committed now (a blocking call: its image is measured).
    /// An image that cannot be measured makes the next use re-read the pool.
    pub(super) fn put_volume(&self, record: VolumeRecord) {
        let holes = holes_of(&self.img(&record.info.local));
        let mut s = self.lock();
        let Ok(holes) = holes else {
            s.loaded = false;
            return;
        };
        let attached = s.volumes.get(&record.info.local).is_some_and(|e| e.attached);
        s.volumes.insert(record.info.local.clone(), Entry { record, holes, attached });
    }

    /// Forgets a deleted volume.
    pub(super) fn remove_volume(&self, local: &str) {
        self.lock().volumes.remove(local);
    }

    /// Records a committed snapshot's promised bytes.
    pub(super) fn put_snapshot(&self, local: &str, shared: u64) {
        self.lock().snapshots.insert(local.to_owned(), shared);
    }

    /// Forgets a deleted snapshot.
    pub(super) fn remove_snapshot(&self, local: &str) {
        self.lock().snapshots.remove(local);
    }

    /// A volume is attached (before the device is set up, so its writes are never missed) or
    /// detached (measured once more: what it wrote while attached).
    pub(super) fn set_attached(&self, local: &str, attached: bool) -> Result<()> {
        let holes = if attached { None } else { Some(holes_of(&self.img(local))?) };
        let mut s = self.fresh()?;
        if let Some(e) = s.volumes.get_mut(local) {
            e.attached = attached;
            if let Some(h) = holes {
                e.holes = h;
            }
        }
        Ok(())
    }
}
