//! Freeze → copy → thaw: the one place that freezes filesystems, for a consistent snapshot or
//! clone of a mounted volume (the file pool's image copy, a ZFS zvol snapshot, an LVM snapshot
//! of a btrfs volume). Every pool goes through [`Freezer::around`]; nothing else runs `fsfreeze`.
//!
//! The policy, in one place:
//!
//! - **A mounted filesystem that cannot be frozen is not snapshotted.** `fsfreeze --freeze`
//!   failing (no freeze support, already frozen by someone else, the tool missing) fails the
//!   call with FAILED_PRECONDITION naming the mount point: no silent crash-consistent copy.
//! - **Durable first.** Before the freeze, a record naming the pool, the volume and the mount
//!   point is written to `<state dir>/freeze/` (temporary file, fsync, rename, fsync of the
//!   directory); it is removed after the thaw. At start-up, before serving, [`Freezer::recover`]
//!   thaws every filesystem a record names (if it is still the mount the record saw, in this
//!   boot) and logs it, so a driver killed mid-snapshot never leaves writers hanging.
//! - **Thawed on every path.** The freeze, the operation and the thaw run in a task of their
//!   own: an error, the deadline or the caller's request being dropped all end in the thaw.
//! - **One deadline.** A filesystem stays frozen at most [`FROZEN_DEADLINE`] (configurable per
//!   driver, `--freeze-deadline`): the operation is stopped when it expires (its commands are
//!   killed), the filesystem thawed, and the call answers DEADLINE_EXCEEDED. `fsfreeze` itself
//!   (which first writes out dirty data) and the thaw each get [`FSFREEZE_TIMEOUT`] (at most
//!   the deadline). A record older than the deadline plus twice that allowance means a thaw failed or the driver died: the
//!   volume reports abnormal ([`Freezer::stuck_since`]) until a thaw succeeds.
//! - **One freeze per filesystem, shared.** Concurrent operations on one filesystem (two
//!   snapshots of one volume) share its freeze with a reference count: the first freezes, the
//!   last thaws, so none thaws another's freeze mid-copy. Joining never extends the frozen
//!   window past the deadline of the first freeze.
//!
//! Linux has no "is frozen" query, which is why the records exist at all.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::blocking::METADATA_DEADLINE;
use crate::error::{Error, Result};
use crate::exec::{Cmd, Exec, ExecError};
use crate::node::mount::{Mounter, RealMounter};
use crate::node::mountinfo;
use crate::store::{self, Noun, Store};

/// The longest a filesystem stays frozen for one operation (freeze, copy or snapshot, thaw).
/// Writers to the volume block meanwhile, so it is short next to an application's patience,
/// and long enough for a copy without reflink of a few tens of GiB.
pub const FROZEN_DEADLINE: Duration = Duration::from_secs(600);
/// How long one `fsfreeze --freeze` (which flushes dirty data first) or `--unfreeze` may take.
pub const FSFREEZE_TIMEOUT: Duration = Duration::from_secs(60);
/// The subdirectory of the state directory holding the records.
pub const RECORD_DIR: &str = "freeze";

/// What is frozen: the filesystems of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The pool's name.
    pub pool: String,
    /// The volume's local name.
    pub volume: String,
    /// One mount point per filesystem to freeze (bind mounts share a superblock: one is enough).
    pub mount_points: Vec<PathBuf>,
    /// What the freeze is for, for logs and messages ("snapshot s1").
    pub purpose: String,
}

/// A freeze record as stored in `<state dir>/freeze/<hash of the mount point>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The pool of the frozen volume.
    pub pool: String,
    /// The frozen volume's local name.
    pub volume: String,
    /// The mount point `fsfreeze` was given.
    pub mount_point: PathBuf,
    /// `major:minor` of that mount when it was frozen: a different mount there now is not ours.
    pub major_minor: String,
    /// The kernel's boot id: a freeze never survives a reboot.
    pub boot_id: String,
    /// When the freeze began, seconds since the Unix epoch.
    pub started: u64,
    /// What the freeze was for.
    pub purpose: String,
}

/// What [`Freezer::recover`] did with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// The filesystem was frozen: thawed, and the record removed.
    Thawed(PathBuf),
    /// The filesystem was not frozen (the crash came before the freeze or after the thaw):
    /// the record was removed.
    NotFrozen(PathBuf),
    /// The record was from an earlier boot, or its mount is gone: removed, nothing to thaw.
    Dropped(PathBuf),
    /// The thaw failed: the record stays (the volume reports abnormal), the error is logged.
    Failed(PathBuf, String),
}

/// The freezes of one mount point in this process.
#[derive(Default)]
struct Slot {
    holders: usize,
    /// When the current freeze took effect.
    since: Option<Instant>,
}

/// Freezes filesystems around operations (see the module docs). One per driver, shared by its
/// pools, so the reference counts see every operation.
pub struct Freezer {
    exec: Arc<dyn Exec>,
    /// The records in `<state dir>/freeze`; `None` records nothing (unit tests of pools, tools).
    store: Option<Store>,
    deadline: Duration,
    /// The mount table (the driver's [`Mounter`]; a fake in tests).
    mounter: Arc<dyn Mounter>,
    slots: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl Freezer {
    /// A freezer recording in `<state_dir>/freeze` (created 0700).
    pub fn new(state_dir: &Path, exec: Arc<dyn Exec>) -> Result<Freezer> {
        let dir = state_dir.join(RECORD_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(format!("creating the freeze record directory {}", dir.display()), e))?;
        let store = Store::new(dir, "state", METADATA_DEADLINE).described(noun().what, noun().if_damaged).creating_dir();
        Ok(Freezer { store: Some(store), ..Freezer::unrecorded(exec) })
    }

    /// A freezer that keeps no records: nothing thaws its freezes after a crash. Only for
    /// pools used outside a driver (unit tests, benchmarks); the driver always records.
    pub fn unrecorded(exec: Arc<dyn Exec>) -> Freezer {
        Freezer {
            mounter: Arc::new(RealMounter::new(exec.clone())),
            exec,
            store: None,
            deadline: FROZEN_DEADLINE,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Sets the frozen deadline (default [`FROZEN_DEADLINE`]).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Reads the mount table through `mounter` (the driver's; a fake in tests) instead of a
    /// mounter of its own.
    pub fn with_mounter(mut self, mounter: Arc<dyn Mounter>) -> Self {
        self.mounter = mounter;
        self
    }

    /// The mount table this freezer records mounts from: pools find the mount points they
    /// hand to [`Freezer::around`] in the same table, so the fakes of a test drive both.
    pub fn mounter(&self) -> Arc<dyn Mounter> {
        self.mounter.clone()
    }

    /// The frozen deadline.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// How long one `fsfreeze` may run: [`FSFREEZE_TIMEOUT`], less under a shorter deadline.
    fn fsfreeze_timeout(&self) -> Duration {
        FSFREEZE_TIMEOUT.min(self.deadline)
    }

    /// How old a record may legitimately get: the freeze, the frozen window, the thaw.
    fn stuck_after(&self) -> Duration {
        self.deadline + 2 * self.fsfreeze_timeout()
    }

    /// Runs `op` with every filesystem of `target` frozen, and thaws them whatever happens.
    /// No mount point: `op` just runs. The answer is `op`'s output, or FAILED_PRECONDITION (a
    /// filesystem cannot be frozen; `op` did not run), DEADLINE_EXCEEDED (the frozen window
    /// ran out; `op` was stopped), INTERNAL (a thaw failed: the message says what to run).
    pub async fn around<T, Fut>(self: &Arc<Self>, target: Target, op: Fut) -> Result<T>
    where
        T: Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        self.around_all(vec![target], op).await
    }

    // issue 12: group snapshots
    /// [`Freezer::around`] for several volumes at once (a group snapshot): every filesystem of
    /// every target is frozen before `op` runs, all are thawed whatever happens, and the one
    /// deadline runs from the first freeze. A target that fails to freeze fails the call
    /// (FAILED_PRECONDITION naming its volume) with those already frozen thawed.
    pub async fn around_all<T, Fut>(self: &Arc<Self>, targets: Vec<Target>, op: Fut) -> Result<T>
    where
        T: Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        if targets.iter().all(|t| t.mount_points.is_empty()) {
            return Ok(op.await);
        }
        let me = self.clone();
        // A task of its own: dropping the caller's future must never skip the thaw.
        let task = tokio::spawn(async move { me.run(targets, op).await });
        task.await.map_err(|e| Error::Internal(format!("the freeze task failed ({e}); check for frozen filesystems")))?
    }

    async fn run<T, Fut: Future<Output = T>>(&self, targets: Vec<Target>, op: Fut) -> Result<T> {
        let mut points: Vec<(PathBuf, &Target)> =
            targets.iter().flat_map(|t| t.mount_points.iter().map(move |mp| (mp.clone(), t))).collect();
        // One order for everyone, so two operations over the same filesystems cannot deadlock.
        points.sort_by(|a, b| a.0.cmp(&b.0));
        points.dedup_by(|a, b| a.0 == b.0);
        let target = &targets[0];
        let mut entered: Vec<(PathBuf, Instant)> = Vec::new();
        let mut result = Ok(None);
        for (mp, t) in &points {
            match self.enter(t, mp).await {
                Ok(since) => entered.push((mp.clone(), since)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            // The earliest freeze bounds the window (a joined freeze may be older than ours).
            let since = entered.iter().map(|(_, s)| *s).min().unwrap_or_else(Instant::now);
            let left = (since + self.deadline).saturating_duration_since(Instant::now());
            result = match tokio::time::timeout(left, op).await {
                Ok(v) => Ok(Some(v)),
                Err(_) => {
                    tracing::error!(pool = %target.pool, volume = %target.volume, purpose = %target.purpose, deadline = ?self.deadline, "stopped: the filesystem stayed frozen too long");
                    Err(Error::DeadlineExceeded(format!(
                        "{} of volume {:?} did not finish within {:?} with its filesystem frozen; stopped and thawed (retry; a pool filesystem with reflink copies much faster)",
                        target.purpose, target.volume, self.deadline
                    )))
                }
            };
        }
        for (mp, _) in entered.iter().rev() {
            // A filesystem left frozen blocks its application: that outranks any other error.
            if let Err(e) = self.leave(mp).await {
                result = Err(e);
            }
        }
        result.map(|v| v.expect("an operation that ran has an output"))
    }

    /// Joins or makes the freeze of `mp`; returns when the freeze took effect.
    async fn enter(&self, target: &Target, mp: &Path) -> Result<Instant> {
        let slot = self.slots.lock().unwrap_or_else(|p| p.into_inner()).entry(mp.to_owned()).or_default().clone();
        // Held across the fsfreeze: a joiner waits until the freeze is in place.
        let mut s = slot.lock().await;
        if s.holders > 0 {
            s.holders += 1;
            tracing::info!(mount_point = %mp.display(), holders = s.holders, purpose = %target.purpose, "joining a freeze in progress");
            return Ok(s.since.expect("a held freeze has a start"));
        }
        let record = if self.store.is_some() { Some(self.record_for(target, mp).await?) } else { None };
        if let Some(old) = self.read_record(mp).await? {
            // Left by a thaw that failed earlier: the filesystem may still be frozen by us.
            tracing::warn!(mount_point = %mp.display(), since = old.started, "a freeze record is still open; thawing first");
            self.thaw(mp).await?;
        }
        if let Some(r) = &record {
            self.write_record(r).await?;
        }
        let freeze = Cmd::new("fsfreeze").args(["--freeze", &*mp.to_string_lossy()]).timeout(self.fsfreeze_timeout());
        match self.exec.run(freeze).await {
            Ok(_) => {
                tracing::info!(pool = %target.pool, volume = %target.volume, mount_point = %mp.display(), purpose = %target.purpose, "frozen");
                crate::metrics::frozen(1);
                s.holders = 1;
                let now = Instant::now();
                s.since = Some(now);
                Ok(now)
            }
            Err(e) => {
                // A freeze that timed out may still take effect in the kernel: thaw to be sure.
                // One that failed did nothing, and thawing could release someone else's freeze.
                if matches!(e, ExecError::Timeout { .. }) {
                    self.thaw(mp).await?;
                }
                self.remove_record(mp).await?;
                Err(cannot_freeze(target, mp, &e))
            }
        }
    }

    /// Leaves the freeze of `mp`; the last holder thaws it and removes the record.
    async fn leave(&self, mp: &Path) -> Result<()> {
        let slot = self.slots.lock().unwrap_or_else(|p| p.into_inner()).get(mp).cloned();
        let Some(slot) = slot else { return Ok(()) };
        let mut s = slot.lock().await;
        s.holders = s.holders.saturating_sub(1);
        if s.holders > 0 {
            return Ok(());
        }
        s.since = None;
        let thawed = self.thaw(mp).await?;
        // issue 14: metrics: a failed thaw (above) leaves it counted frozen, as it is.
        crate::metrics::frozen(-1);
        if !thawed {
            tracing::warn!(mount_point = %mp.display(), "the filesystem was thawed by something else during the operation");
        }
        self.remove_record(mp).await?;
        tracing::info!(mount_point = %mp.display(), "thawed");
        drop(s);
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // Nobody else waits on it (the map and this function hold the only references).
        if Arc::strong_count(&slot) == 2 {
            slots.remove(mp);
        }
        Ok(())
    }

    /// `fsfreeze --unfreeze`: `true` when it thawed, `false` when the filesystem was not frozen
    /// (EINVAL), which counts as thawed too.
    async fn thaw(&self, mp: &Path) -> Result<bool> {
        let cmd = Cmd::new("fsfreeze").args(["--unfreeze", &*mp.to_string_lossy()]).timeout(self.fsfreeze_timeout());
        match self.exec.run(cmd).await {
            Ok(_) => Ok(true),
            Err(e) if e.stderr().contains("Invalid argument") => Ok(false),
            Err(e) => {
                tracing::error!(mount_point = %mp.display(), error = %e, "THAW FAILED: the filesystem stays frozen");
                Err(Error::Internal(format!(
                    "the filesystem at {} is still frozen: {e}; thaw it now with `fsfreeze --unfreeze {}`",
                    mp.display(),
                    mp.display()
                )))
            }
        }
    }

    async fn record_for(&self, target: &Target, mp: &Path) -> Result<Record> {
        let mounts = self.mounter.mounts().await?;
        let major_minor = mountinfo::top_at(&mounts, mp).map(|m| m.major_minor.clone()).unwrap_or_default();
        Ok(Record {
            pool: target.pool.clone(),
            volume: target.volume.clone(),
            mount_point: mp.to_owned(),
            major_minor,
            boot_id: boot_id(),
            started: unix_now(),
            purpose: target.purpose.clone(),
        })
    }

    async fn read_record(&self, mp: &Path) -> Result<Option<Record>> {
        let Some(store) = &self.store else { return Ok(None) };
        store.read(&record_name(mp)).await
    }

    async fn write_record(&self, record: &Record) -> Result<()> {
        let Some(store) = &self.store else { return Ok(()) };
        store.write(&record_name(&record.mount_point), record).await
    }

    async fn remove_record(&self, mp: &Path) -> Result<()> {
        let Some(store) = &self.store else { return Ok(()) };
        store.remove(&record_name(mp)).await.map(|_| ())
    }

    /// Start-up: thaws every filesystem a record names and removes the records (see the module
    /// docs). Call it before serving. Records of another boot, or whose mount is gone or is
    /// another filesystem now, are removed without a thaw.
    pub async fn recover(&self) -> Result<Vec<Recovered>> {
        let Some(store) = &self.store else { return Ok(Vec::new()) };
        // At start-up no freeze is being recorded: a temporary is a write whose freeze never
        // began (the record is in place before the freeze).
        store.clean_temporaries().await?;
        let records = store.list::<Record>().await?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mounts = self.mounter.mounts().await?;
        let boot = boot_id();
        let mut out = Vec::new();
        for (name, r) in records {
            let mp = r.mount_point.clone();
            let same_mount = mountinfo::top_at(&mounts, &mp).is_some_and(|m| r.major_minor.is_empty() || m.major_minor == r.major_minor);
            let outcome = if r.boot_id != boot || !same_mount {
                tracing::info!(mount_point = %mp.display(), volume = %r.volume, "freeze record of an earlier boot or a mount that is gone: nothing to thaw");
                Recovered::Dropped(mp)
            } else {
                match self.thaw(&mp).await {
                    Ok(true) => {
                        tracing::warn!(mount_point = %mp.display(), pool = %r.pool, volume = %r.volume, purpose = %r.purpose, "thawed a filesystem left frozen by an interrupted operation");
                        Recovered::Thawed(mp)
                    }
                    Ok(false) => {
                        tracing::info!(mount_point = %mp.display(), pool = %r.pool, volume = %r.volume, purpose = %r.purpose, "an interrupted operation's filesystem was not frozen; removed its freeze record");
                        Recovered::NotFrozen(mp)
                    }
                    Err(e) => {
                        out.push(Recovered::Failed(mp, e.to_string()));
                        continue;
                    }
                }
            };
            store.remove(&name).await?;
            out.push(outcome);
        }
        Ok(out)
    }

    /// Since when volume `volume` of `pool` has had a freeze open longer than the deadline
    /// allows (seconds since the Unix epoch), if it has: a thaw failed or an operation hung.
    /// Linux cannot say whether a filesystem is frozen; the records can. Reads the records
    /// under a deadline; `None` when there are none (or they cannot be read).
    pub async fn stuck_since(&self, pool: &str, volume: &str) -> Option<u64> {
        let store = self.store.as_ref()?;
        let limit = self.stuck_after().as_secs();
        let records = store.list::<Record>().await.ok()?;
        let now = unix_now();
        records
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| r.pool == pool && r.volume == volume && now.saturating_sub(r.started) > limit)
            .map(|r| r.started)
            .min()
    }

    /// The abnormal-condition message for a volume with a stuck freeze, if it has one.
    pub async fn stuck_message(&self, pool: &str, volume: &str) -> Option<String> {
        let since = self.stuck_since(pool, volume).await?;
        Some(stuck_text(since))
    }

    // issue 14: flat
    /// [`Freezer::stuck_message`] of every volume of `pool` that has one, by volume: one read
    /// of the records for a page of a listing instead of one per volume.
    pub async fn stuck_messages(&self, pool: &str) -> HashMap<String, String> {
        let Some(store) = self.store.as_ref() else { return HashMap::new() };
        let limit = self.stuck_after().as_secs();
        let Ok(records) = store.list::<Record>().await else { return HashMap::new() };
        let now = unix_now();
        let mut since: HashMap<String, u64> = HashMap::new();
        for (_, r) in records.into_iter().filter(|(_, r)| r.pool == pool && now.saturating_sub(r.started) > limit) {
            let s = since.entry(r.volume).or_insert(r.started);
            *s = (*s).min(r.started);
        }
        since.into_iter().map(|(v, s)| (v, stuck_text(s))).collect()
    }
}

/// The abnormal-condition message of a freeze open since `since` (seconds since the epoch).
fn stuck_text(since: u64) -> String {
    let ago = unix_now().saturating_sub(since);
    format!(
        "the volume's filesystem may be frozen: a freeze began {ago} s ago and was never thawed (writers block); \
         run `fsfreeze --unfreeze` on its staging path, or restart the driver, which thaws it"
    )
}

fn cannot_freeze(target: &Target, mp: &Path, e: &ExecError) -> Error {
    let why = match e {
        ExecError::Failed { stderr, .. } if stderr.contains("Device or resource busy") => {
            "it is already frozen by something else".to_owned()
        }
        ExecError::Failed { stderr, .. } if stderr.contains("Operation not supported") || stderr.contains("Inappropriate ioctl") => {
            "the filesystem does not support freezing".to_owned()
        }
        other => other.to_string(),
    };
    let msg = format!(
        "cannot take {} of volume {:?} consistently: the mounted filesystem at {} cannot be frozen ({why}); \
         a mounted filesystem is only snapshotted frozen: thaw or unstage it and retry",
        target.purpose,
        target.volume,
        mp.display()
    );
    match e {
        ExecError::Timeout { .. } => Error::DeadlineExceeded(msg),
        _ => Error::FailedPrecondition(msg),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// This boot's id; empty when the kernel does not say (then records always look current).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// How freeze records are named in messages, and what to do with a damaged one.
fn noun() -> Noun {
    Noun::new("freeze record", "check the filesystem it names, then remove it")
}

/// The record name of a mount point, `<sha256 of the mount point>` (half of it): any mount
/// point, one fixed-size safe name; the file is `<dir>/<name>.json`.
fn record_name(mp: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let digest = Sha256::digest(mp.as_os_str().as_bytes());
    hex::encode(&digest[..16])
}

/// Writes a record into `dir` outside a [`Freezer`] (tests seed crashed states with it).
#[cfg(test)]
fn write_record(dir: &Path, r: &Record) -> Result<()> {
    store::write_file(&dir.join(format!("{}{}", record_name(&r.mount_point), store::SUFFIX)), r)
}

/// The records in `state_dir` (for tools and tests that inspect a driver's state).
pub fn records(state_dir: &Path) -> Result<Vec<Record>> {
    let dir = state_dir.join(RECORD_DIR);
    let listed = match store::list_dir::<Record>(&dir, &noun()) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r?,
    };
    Ok(listed.into_iter().filter_map(|(_, r)| r.map_err(|e| tracing::error!(error = %e, "skipping a freeze record")).ok()).collect())
}

#[cfg(test)]
mod tests;
