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
//!   run, or one that rewrites a file in place, is not noticed by the index until the next start.
//! - **A page's records without reading them**: each volume remembers the [`Stamp`] of its
//!   record file when it was read or written (device, inode, size, mtime, ctime). A listing
//!   page stats each record and re-reads only one whose stat differs, so a record damaged or
//!   changed in place (which changes its ctime, which no one can set back) is still reported,
//!   and 100 unchanged records cost 100 stats, not 100 reads. A stamp taken within
//!   [`RACY`] of the file's ctime is not trusted (a second write in the same clock tick
//!   could keep every field), so such a record is read until its stamp is old enough.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use super::{Kind, SnapshotRecord, VolumeRecord, meta_noun, room};
use crate::error::{Error, Result};
use crate::store;
use crate::volume_id::valid_local_name;

/// How much older than the stat a record file's ctime must be for its stamp to be trusted:
/// more than the coarsest timestamp granularity of a Linux filesystem (2 s, FAT), so a later
/// write cannot carry the same ctime.
const RACY: Duration = Duration::from_secs(2);

/// What a record file's stat said when its content was read or written: a write to it, in
/// place or by a rename over it, changes at least its ctime (or its inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        Stamp { dev: m.dev(), ino: m.ino(), size: m.size(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()) }
    }

    /// The stamp of `m`, stat'ed no earlier than `taken`, when it can be trusted: its ctime is
    /// at least `racy` before `taken` (see [`RACY`]).
    fn trusted(m: &fs::Metadata, taken: SystemTime, racy: Duration) -> Option<Stamp> {
        let stamp = Stamp::of(m);
        let ctime = Duration::new(u64::try_from(stamp.ctime.0).ok()?, u32::try_from(stamp.ctime.1).ok()?);
        let taken = taken.duration_since(SystemTime::UNIX_EPOCH).ok()?;
        (ctime + racy <= taken).then_some(stamp)
    }
}

/// The paths of files in one directory, built in one buffer: a page formats no path per
/// volume (issue 14).
pub(super) struct InDir {
    buf: Vec<u8>,
    base: usize,
}

impl InDir {
    pub(super) fn new(dir: &Path) -> InDir {
        let mut buf = dir.as_os_str().as_bytes().to_vec();
        buf.push(b'/');
        InDir { base: buf.len(), buf }
    }

    /// `dir/<name><suffix>`, until the next call.
    pub(super) fn at(&mut self, name: &str, suffix: &str) -> &Path {
        self.buf.truncate(self.base);
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(suffix.as_bytes());
        Path::new(OsStr::from_bytes(&self.buf))
    }
}

/// One volume as the index knows it.
#[derive(Debug, Clone)]
struct Entry {
    record: VolumeRecord,
    /// Its record file's stamp when `record` was read or written; `None`: read it again.
    stamp: Option<Stamp>,
    /// The image's holes when last measured.
    holes: u64,
    /// Attached to a loop device (so written behind the pool's back): measured anew each time.
    attached: bool,
}

impl Entry {
    /// What this volume promises that needs no measuring: its `shared` bytes, and its holes
    /// while detached (an attached image's holes are measured at each room check).
    fn fixed(&self) -> u64 {
        self.record.shared.saturating_add(if self.attached { 0 } else { self.holes })
    }
}

/// A record and its file's metadata when it was read.
type Stated<T> = (T, fs::Metadata);

/// A pool directory's modification time, to notice changes made by hand.
type DirTime = Option<(i64, i64)>;

#[derive(Debug, Default)]
struct State {
    loaded: bool,
    /// Only through [`State::put`] and [`State::take`], which keep `fixed` and `attached` true.
    volumes: BTreeMap<String, Entry>,
    /// Snapshots' `shared` bytes (their own holes promise nothing: they are never written).
    /// Only through [`State::put_snapshot`] and [`State::take_snapshot`].
    snapshots: BTreeMap<String, u64>,
    /// The running total of every volume's [`Entry::fixed`] and every snapshot's `shared`
    /// bytes (modular sums: every change subtracts exactly what it added), so a room check
    /// costs the attached volumes, not the pool.
    fixed: u64,
    /// The volumes attached to a loop device.
    attached: BTreeSet<String>,
    /// The directories' mtimes the pool's last operation left.
    seen: [DirTime; 2],
    /// Operations of the pool in progress: while any runs, mtimes say nothing.
    busy: usize,
}

/// The index of one file pool (shared with its blocking calls, hence the `Arc`).
#[derive(Debug, Clone)]
pub(super) struct Index {
    root: PathBuf,
    sys_block: PathBuf,
    /// [`RACY`] (tests shorten it).
    racy: Duration,
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

impl State {
    /// Records `entry` for `local`, keeping the totals.
    fn put(&mut self, local: String, entry: Entry) {
        self.fixed = self.fixed.wrapping_add(entry.fixed());
        if entry.attached {
            self.attached.insert(local.clone());
        } else {
            self.attached.remove(&local);
        }
        if let Some(old) = self.volumes.insert(local, entry) {
            self.fixed = self.fixed.wrapping_sub(old.fixed());
        }
    }

    /// Forgets `local`, keeping the totals.
    fn take(&mut self, local: &str) -> Option<Entry> {
        let old = self.volumes.remove(local)?;
        self.fixed = self.fixed.wrapping_sub(old.fixed());
        self.attached.remove(local);
        Some(old)
    }

    fn put_snapshot(&mut self, local: String, shared: u64) {
        self.fixed = self.fixed.wrapping_add(shared);
        if let Some(old) = self.snapshots.insert(local, shared) {
            self.fixed = self.fixed.wrapping_sub(old);
        }
    }

    fn take_snapshot(&mut self, local: &str) {
        if let Some(old) = self.snapshots.remove(local) {
            self.fixed = self.fixed.wrapping_sub(old);
        }
    }
}

fn dir_time(dir: &Path) -> Result<DirTime> {
    match fs::metadata(dir) {
        Ok(m) => Ok(Some((m.mtime(), m.mtime_nsec()))),
        Err(e) => Err(room::dir_error(dir, e)),
    }
}

/// The same record, whatever schema each says (a record is written with this build's, and
/// the index keeps what was written).
fn same(a: &VolumeRecord, b: &VolumeRecord) -> bool {
    a.info == b.info && a.provisioning == b.provisioning && a.shared == b.shared
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
        Index { root: root.to_owned(), sys_block: sys_block.to_owned(), racy: RACY, state: Arc::default() }
    }

    /// Trusts record stamps `racy` after their file's ctime (tests: 0, to count reads at once).
    #[cfg(test)]
    pub(super) fn set_racy(&mut self, racy: Duration) {
        self.racy = racy;
    }

    /// Where the kernel shows loop devices (tests use a fake tree).
    pub(super) fn set_sys_block(&mut self, sys_block: &Path) {
        self.sys_block = sys_block.to_owned();
    }

    fn img(&self, local: &str) -> PathBuf {
        self.root.join(Kind::Volume.dir()).join(format!("{local}.img"))
    }

    fn meta(&self, local: &str) -> PathBuf {
        self.root.join(Kind::Volume.dir()).join(format!("{local}{}", store::SUFFIX))
    }

    fn stamps(&self) -> Result<[DirTime; 2]> {
        Ok([dir_time(&self.root.join(Kind::Volume.dir()))?, dir_time(&self.root.join(Kind::Snapshot.dir()))?])
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
        let mut fresh = State::default();
        let dir = self.root.join(Kind::Volume.dir());
        let taken = SystemTime::now();
        for (local, r) in self.records::<VolumeRecord>(Kind::Volume)? {
            let Some((mut record, meta)) = r else { continue };
            Arc::make_mut(&mut record.info).local = local.clone();
            let img = dir.join(format!("{local}.img"));
            let holes = holes_of(&img)?;
            let attached = attached.as_ref().is_none_or(|a| a.contains(&img));
            let stamp = Stamp::trusted(&meta, taken, self.racy);
            fresh.put(local, Entry { record, stamp, holes, attached });
        }
        for (local, r) in self.records::<SnapshotRecord>(Kind::Snapshot)? {
            if let Some((r, _)) = r {
                fresh.put_snapshot(local, r.shared);
            }
        }
        s.volumes = fresh.volumes;
        s.snapshots = fresh.snapshots;
        s.fixed = fresh.fixed;
        s.attached = fresh.attached;
        s.loaded = true;
        Ok(())
    }

    /// The records of one directory with their files' metadata; a damaged one is `None`
    /// (warned about).
    fn records<T: serde::de::DeserializeOwned>(&self, kind: Kind) -> Result<Vec<(String, Option<Stated<T>>)>> {
        let dir = self.root.join(kind.dir());
        let listed = match store::list_dir_stat::<T>(&dir, &meta_noun()) {
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

    /// At most `max` volume records from local name `from` on, in name order: one page of
    /// the listing, which clones the page and nothing else (a blocking call: it may rebuild).
    pub(super) fn volumes_from(&self, from: &str, max: usize) -> Result<Vec<VolumeRecord>> {
        let s = self.fresh()?;
        Ok(s.volumes
            .range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
            .take(max)
            .map(|(_, e)| e.record.clone())
            .collect())
    }

    /// Bytes promised but not held: the running total, plus the holes of each attached image
    /// measured now (a blocking call: one stat per attached volume, none per other volume).
    pub(super) fn promised(&self) -> Result<u64> {
        let s = self.fresh()?;
        let mut total = s.fixed;
        for local in &s.attached {
            total = total.saturating_add(holes_of(&self.img(local))?);
        }
        Ok(total)
    }

    /// Records a volume as committed now (a blocking call: its image is measured, its record
    /// file stamped). An image that cannot be measured makes the next use re-read the pool.
    pub(super) fn put_volume(&self, record: VolumeRecord) {
        let taken = SystemTime::now();
        let stamp = fs::metadata(self.meta(&record.info.local)).ok().and_then(|m| Stamp::trusted(&m, taken, self.racy));
        let holes = holes_of(&self.img(&record.info.local));
        let mut s = self.lock();
        let Ok(holes) = holes else {
            s.loaded = false;
            return;
        };
        let attached = s.volumes.get(&record.info.local).is_some_and(|e| e.attached);
        s.put(record.info.local.clone(), Entry { record, stamp, holes, attached });
    }

    /// The records of `locals` as their files hold them now (`None`: no such file), for one
    /// page's conditions (a blocking call): one stat per record whose stamp the index trusts,
    /// and a read only of a record that is not indexed, not stamped, or whose stat differs
    /// (changed in place or replaced behind the driver's back), which reports what it finds.
    /// A read that finds the indexed record again renews its stamp.
    pub(super) fn records_now(&self, locals: &[String]) -> Vec<Result<Option<VolumeRecord>>> {
        // An index that cannot be read (the pool directory) leaves every record to be read.
        let known: Vec<Option<(VolumeRecord, Option<Stamp>)>> = match self.fresh() {
            Ok(s) => locals.iter().map(|l| s.volumes.get(l).map(|e| (e.record.clone(), e.stamp))).collect(),
            Err(_) => locals.iter().map(|_| None).collect(),
        };
        let mut renewed = Vec::new();
        let mut metas = InDir::new(&self.root.join(Kind::Volume.dir()));
        let out = locals
            .iter()
            .zip(known)
            .map(|(local, known)| {
                let path = metas.at(local, store::SUFFIX);
                let known = match known {
                    Some((record, Some(stamp))) => match fs::metadata(path) {
                        Ok(m) if Stamp::of(&m) == stamp => return Ok(Some(record)),
                        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                        _ => Some(record),
                    },
                    other => other.map(|(record, _)| record),
                };
                let taken = SystemTime::now();
                let Some((mut read, meta)) = store::read_file_stat::<VolumeRecord>(path, &meta_noun())? else { return Ok(None) };
                Arc::make_mut(&mut read.info).local = local.clone();
                if let (Some(record), Some(stamp)) = (&known, Stamp::trusted(&meta, taken, self.racy)) {
                    if same(record, &read) {
                        renewed.push((local.clone(), read.clone(), stamp));
                    }
                }
                Ok(Some(read))
            })
            .collect();
        if !renewed.is_empty() {
            let mut s = self.lock();
            for (local, read, stamp) in renewed {
                // Only while the index still holds what was read (an operation may have changed it).
                if let Some(e) = s.volumes.get_mut(&local).filter(|e| same(&e.record, &read)) {
                    e.stamp = Some(stamp);
                }
            }
        }
        out
    }

    /// Forgets a deleted volume.
    pub(super) fn remove_volume(&self, local: &str) {
        self.lock().take(local);
    }

    /// Records a committed snapshot's promised bytes.
    pub(super) fn put_snapshot(&self, local: &str, shared: u64) {
        self.lock().put_snapshot(local.to_owned(), shared);
    }

    /// Forgets a deleted snapshot.
    pub(super) fn remove_snapshot(&self, local: &str) {
        self.lock().take_snapshot(local);
    }

    /// A volume is attached (before the device is set up, so its writes are never missed) or
    /// detached (measured once more: what it wrote while attached).
    pub(super) fn set_attached(&self, local: &str, attached: bool) -> Result<()> {
        let holes = if attached { None } else { Some(holes_of(&self.img(local))?) };
        let mut s = self.fresh()?;
        if let Some(mut e) = s.take(local) {
            e.attached = attached;
            if let Some(h) = holes {
                e.holes = h;
            }
            s.put(local.to_owned(), e);
        }
        Ok(())
    }
}
