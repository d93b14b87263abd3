//! The one atomic JSON record store: small records (a pool's volume metadata, the node's stage
//! and freeze records, copy jobs), one pretty-printed JSON file each, `<dir>/<name>.json`.
//!
//! - **Atomic.** A write goes to `<dir>/.<name>.json.tmp` (created 0600), is fsynced, renamed
//!   over `<name>.json`, and the directory is fsynced: after a crash at any point the record is
//!   the old one or the new one, never a mix, and a write that returned survives power loss.
//!   A store made [`Store::atomic_only`] skips both fsyncs: still atomic against kill -9, not
//!   durable against a power cut (for records a reboot makes moot: the node's).
//! - **Durable removal.** A removal fsyncs the directory before it returns.
//! - **Damage is said.** A record that does not parse is an error naming the file and what the
//!   operator should do (each store says it: "fix or remove it", "move it away"), never a
//!   silent "absent"; a listing skips it with a warning, so one damaged file hides nothing else.
//! - **Off the async workers.** Every [`Store`] call runs through [`crate::blocking::run`] in
//!   the caller's domain and deadline: a hung pool filesystem fails its own calls only.
//!
//! Callers that already run on the blocking pool (one closure doing several steps, as the nfs
//! pool's) use the path-based functions ([`read_file`], [`write_file`], [`remove_durably`],
//! [`list_dir`]) that the [`Store`] methods are made of. Writers of one record serialise
//! themselves (a per-volume lock); the store does not lock.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::blocking;
use crate::error::{Context, Error, Result};

/// The suffix of a record file.
pub const SUFFIX: &str = ".json";
/// The suffix of a record's temporary (`.<name>.json.tmp`; older writers left `<name>.json.tmp`).
pub const TMP_SUFFIX: &str = ".json.tmp";

/// What a record is called in messages, and what to do when one is damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Noun {
    /// "stage record", "metadata"…
    pub what: String,
    /// The operator's way out of a damaged record: "fix or remove it".
    pub if_damaged: String,
}

impl Noun {
    /// A noun with its advice for a damaged record.
    pub fn new(what: impl Into<String>, if_damaged: impl Into<String>) -> Noun {
        Noun { what: what.into(), if_damaged: if_damaged.into() }
    }
}

impl Default for Noun {
    fn default() -> Noun {
        Noun::new("record", "fix or remove it")
    }
}

/// The temporary through which `path` is written: `.<file name>.tmp` beside it.
pub fn temporary_of(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Makes renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| fsync(&d, dir)).context(|| format!("syncing directory {}", dir.display()))
}

/// `f.sync_all()`, for the file (or directory) at `path`: every fsync of the record store and
/// of the file pool goes through here, so tests can count them ([`fsyncs_of`]).
pub fn fsync(f: &File, path: &Path) -> std::io::Result<()> {
    #[cfg(test)]
    test_log::note("fsync", path);
    #[cfg(not(test))]
    let _ = path;
    f.sync_all()
}

/// The fsyncs made so far on `dir` and on the files in it, in order (test builds only; each
/// test has a directory of its own, so parallel tests do not mix).
#[cfg(test)]
pub fn fsyncs_of(dir: &Path) -> Vec<PathBuf> {
    test_log::of("fsync", dir)
}

/// Test-only: what the store did to which file (fsyncs, record reads), kept under the file and
/// under its directory, so a test can pin an fsync or a read it removed.
#[cfg(test)]
mod test_log {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    type Log = HashMap<(&'static str, PathBuf), Vec<PathBuf>>;
    static LOG: Mutex<Option<Log>> = Mutex::new(None);

    /// Notes `what` done to `path`, under the path and under the directory it is in.
    pub fn note(what: &'static str, path: &Path) {
        let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
        let map = log.get_or_insert_with(HashMap::new);
        for key in [Some(path), path.parent()].into_iter().flatten() {
            map.entry((what, key.to_owned())).or_default().push(path.to_owned());
        }
    }

    /// The paths `what` was done to at or under `dir`, in order.
    pub fn of(what: &'static str, dir: &Path) -> Vec<PathBuf> {
        let log = LOG.lock().unwrap_or_else(|e| e.into_inner());
        log.as_ref().and_then(|m| m.get(&(what, dir.to_owned()))).cloned().unwrap_or_default()
    }
}

/// Removes a file (not durably: see [`remove_durably`]); one that is not there is success.
/// `true` when there was one.
pub fn remove_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

/// Reads the record at `path`; `None` when there is none. A record that does not parse is
/// INTERNAL naming the file and `noun.if_damaged`.
pub fn read_file<T: DeserializeOwned>(path: &Path, noun: &Noun) -> Result<Option<T>> {
    Ok(read_file_stat(path, noun)?.map(|(v, _)| v))
}

/// As [`read_file`], with the file's metadata taken from the open file just before its content
/// was read (the same calls as `fs::read`): a change after the read shows in a later stat.
pub fn read_file_stat<T: DeserializeOwned>(path: &Path, noun: &Noun) -> Result<Option<(T, fs::Metadata)>> {
    use std::io::Read;
    let read = || -> std::io::Result<(Vec<u8>, fs::Metadata)> {
        let mut f = File::open(path)?;
        let meta = f.metadata()?;
        let mut bytes = Vec::with_capacity(meta.len() as usize + 1);
        f.read_to_end(&mut bytes)?;
        Ok((bytes, meta))
    };
    #[cfg(test)]
    test_log::note("read", path);
    let (bytes, meta) = match read() {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        r => r.context(|| format!("reading {} {}", noun.what, path.display()))?,
    };
    serde_json::from_slice(&bytes)
        .map(|v| Some((v, meta)))
        .map_err(|e| Error::Internal(format!("{} {} is unreadable ({e}); {}", noun.what, path.display(), noun.if_damaged)))
}

/// Test-only: how many record reads each directory saw, so a test can pin reads it removed
/// (tests run in parallel, each in its own directory).
#[cfg(test)]
pub mod reads {
    use std::path::Path;

    /// Record reads in `dir` so far.
    pub fn of(dir: &Path) -> usize {
        super::test_log::of("read", dir).len()
    }
}

/// Writes `value` to `path` atomically and durably: [`temporary_of`] (0600), write, fsync,
/// rename, fsync of the directory. The directory must exist.
pub fn write_file<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| Error::Internal(format!("encoding {}: {e}", path.display())))?;
    write_bytes(path, &json)
}

/// As [`write_file`], the directory fsync shared with concurrent writers of the same
/// directory through `group` (group commit): durable when it returns, as [`write_file`].
pub fn write_file_grouped<T: Serialize + ?Sized>(path: &Path, value: &T, group: &GroupSync) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| Error::Internal(format!("encoding {}: {e}", path.display())))?;
    write_bytes_then(path, &json, true, |dir| group.sync(dir))
}

/// As [`write_file_grouped`], for a record that commits other work in its directory (issue 14):
/// the record's temporary is written and fsynced, then `after` (an fsync of that work, made
/// before this call), then `before_rename` (moving that work into place) once both succeeded.
/// Then the record's rename, the commit point, and the shared directory fsync, which makes both
/// renames durable. Nothing is renamed when either fsync fails.
///
/// Both fsyncs run on the calling thread, the record's first: on a journaling filesystem
/// (ext4, xfs) it commits the journal up to the record's changes, which includes the earlier
/// changes of the other work, so the second finds them committed and costs no second commit
/// (one journal commit, as two fsyncs on two threads at once gave, without a thread per call).
pub fn write_file_grouped_with<T: Serialize + ?Sized>(
    path: &Path,
    value: &T,
    group: &GroupSync,
    after: impl FnOnce() -> Result<()>,
    before_rename: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| Error::Internal(format!("encoding {}: {e}", path.display())))?;
    let dir = path.parent().ok_or_else(|| Error::Internal(format!("{} has no directory", path.display())))?;
    let tmp = temporary_of(path);
    write_tmp(&tmp, &json, true)?;
    after()?;
    before_rename()?;
    rename_into_place(&tmp, path)?;
    group.sync(dir)
}

/// Directory fsyncs shared by the concurrent writers of one directory (group commit): a writer
/// whose rename was done before a running fsync began waits for that fsync, and one fsync
/// started after it serves every writer waiting by then. Each writer returns only once an
/// fsync that began after its own change succeeded; a failed fsync is retried by each writer
/// it served, so every writer gets its own answer. A blocking call (run on the blocking pool).
#[derive(Debug, Default)]
pub struct GroupSync {
    state: std::sync::Mutex<GroupState>,
    turn: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    /// Tickets handed out: one per writer whose change is done and awaits an fsync.
    taken: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// An fsync is running.
    running: bool,
}

impl GroupSync {
    /// Makes the changes done so far in `dir` durable, sharing the fsync with other writers.
    pub fn sync(&self, dir: &Path) -> Result<()> {
        self.sync_by(|| sync_dir(dir))
    }

    /// [`GroupSync::sync`] with `fsync` doing the fsync (tests count them).
    fn sync_by(&self, fsync: impl Fn() -> Result<()>) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.taken += 1;
        let ticket = s.taken;
        loop {
            if s.durable >= ticket {
                return Ok(());
            }
            if !s.running {
                s.running = true;
                let upto = s.taken;
                drop(s);
                let r = fsync();
                s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                s.running = false;
                if r.is_ok() {
                    s.durable = s.durable.max(upto);
                }
                self.turn.notify_all();
                r?;
                continue;
            }
            s = self.turn.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn write_bytes(path: &Path, json: &[u8]) -> Result<()> {
    write_bytes_then(path, json, true, sync_dir)
}

/// Writes `json` to `path` through its temporary (fsynced when `sync_tmp`), then runs `sync`
/// on the directory after the rename.
fn write_bytes_then(path: &Path, json: &[u8], sync_tmp: bool, sync: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().ok_or_else(|| Error::Internal(format!("{} has no directory", path.display())))?;
    let tmp = temporary_of(path);
    write_tmp(&tmp, json, sync_tmp)?;
    rename_into_place(&tmp, path)?;
    sync(dir)
}

/// Writes the temporary `tmp` (0600), fsynced when `sync_tmp`.
fn write_tmp(tmp: &Path, json: &[u8], sync_tmp: bool) -> Result<()> {
    // Not create_new: a temporary left by a crash is simply overwritten.
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .context(|| format!("creating {}", tmp.display()))?;
    f.write_all(json).and_then(|_| if sync_tmp { fsync(&f, tmp) } else { Ok(()) }).context(|| format!("writing {}", tmp.display()))
}

/// Renames the temporary over the record (removing the temporary when that fails).
fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    fs::rename(tmp, path).map_err(|e| {
        let _ = fs::remove_file(tmp);
        Error::io(format!("renaming {} to {}", tmp.display(), path.display()), e)
    })
}

/// Removes the record at `path` and its temporary, durably (the directory is fsynced).
/// `true` when the record was there.
pub fn remove_durably(path: &Path) -> Result<bool> {
    remove_durably_then(path, sync_dir)
}

fn remove_durably_then(path: &Path, sync: impl FnOnce(&Path) -> Result<()>) -> Result<bool> {
    let was = remove_if_exists(path)?;
    let tmp = remove_if_exists(&temporary_of(path))?;
    if was || tmp {
        if let Some(dir) = path.parent() {
            sync(dir)?;
        }
    }
    Ok(was)
}

/// The record name of a directory entry: `<name>.json` with a valid name; temporaries and
/// anything else are not records.
fn record_name(file: &OsStr) -> Option<&str> {
    file.to_str().and_then(|n| n.strip_suffix(SUFFIX)).filter(|n| valid_name(n))
}

/// Whether `name` may name a record: 1 to 200 bytes of `[A-Za-z0-9_.:-]`, not starting with a
/// dot (temporaries do), so a name can never leave its directory or pass for a temporary.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Every record in `dir`: its name and the record, or the error that reading it gave. A
/// missing directory is an `Error::Io` whose source is `NotFound` (callers decide what that means).
pub fn list_dir<T: DeserializeOwned>(dir: &Path, noun: &Noun) -> Result<Vec<(String, Result<T>)>> {
    Ok(list_dir_stat(dir, noun)?.into_iter().map(|(name, r)| (name, r.map(|(v, _)| v))).collect())
}

/// Each record of a directory by name, with its file's metadata or the error reading it gave.
pub type StatListing<T> = Vec<(String, Result<(T, fs::Metadata)>)>;

/// As [`list_dir`], each record with its file's metadata ([`read_file_stat`]).
pub fn list_dir_stat<T: DeserializeOwned>(dir: &Path, noun: &Noun) -> Result<StatListing<T>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).context(|| format!("listing {}", dir.display()))? {
        let entry = entry.context(|| format!("listing {}", dir.display()))?;
        let file = entry.file_name();
        let Some(name) = record_name(&file) else { continue };
        match read_file_stat::<T>(&entry.path(), noun) {
            Ok(Some(v)) => out.push((name.to_owned(), Ok(v))),
            // Removed between the listing and the read.
            Ok(None) => {}
            Err(e) => out.push((name.to_owned(), Err(e))),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Removes the record temporaries in `dir` (`.<name>.json.tmp`, and the older
/// `<name>.json.tmp`), durably; returns what it removed. Only while no record of `dir` is being
/// written (start-up): a temporary is the half of a write that never committed, nothing else.
pub fn clean_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(removed),
        r => r.context(|| format!("listing {}", dir.display()))?,
    };
    for entry in entries {
        let entry = entry.context(|| format!("listing {}", dir.display()))?;
        let file = entry.file_name();
        let Some(n) = file.to_str().and_then(|n| n.strip_suffix(TMP_SUFFIX)) else { continue };
        if valid_name(n.strip_prefix('.').unwrap_or(n)) && remove_if_exists(&entry.path())? {
            removed.push(entry.path());
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    removed.sort();
    Ok(removed)
}

/// A directory of records, each call run off the async workers in one domain under one deadline.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    domain: String,
    deadline: Duration,
    noun: Noun,
    /// The directory is made (0700) on the first write, and a missing one lists as empty.
    lazy_dir: bool,
    /// Writes and removals are fsynced (survive a power cut); else only atomic (survive kill -9).
    durable: bool,
}

impl Store {
    /// The records in `dir`; calls run in [`blocking::run`] domain `domain` within `deadline`.
    /// The directory must exist (see [`Store::creating_dir`]).
    pub fn new(dir: impl Into<PathBuf>, domain: impl Into<String>, deadline: Duration) -> Store {
        Store { dir: dir.into(), domain: domain.into(), deadline, noun: Noun::default(), lazy_dir: false, durable: true }
    }

    /// Names the records in messages, with the advice for a damaged one.
    pub fn described(mut self, what: impl Into<String>, if_damaged: impl Into<String>) -> Store {
        self.noun = Noun::new(what, if_damaged);
        self
    }

    /// Makes the directory (0700, with its parents) on the first write; a missing directory
    /// then holds no records. For state directories; never for a pool's directory, where a
    /// missing one means the pool's filesystem is not mounted.
    pub fn creating_dir(mut self) -> Store {
        self.lazy_dir = true;
        self
    }

    /// Writes and removals stay atomic (temporary, rename: after a kill -9 a record is the old
    /// or the new one) but are not fsynced: after a power cut a record may be an older version,
    /// missing, or unreadable (a rename that reached the disk before its data). Only for records
    /// that describe what a reboot undoes anyway (the node's mounts, loop devices, freezes),
    /// and whose readers cope with those three outcomes; never for what the orchestrator relies
    /// on after a power cut (a pool's volumes and snapshots).
    pub fn atomic_only(mut self) -> Store {
        self.durable = false;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How records are named in messages.
    pub fn noun(&self) -> &Noun {
        &self.noun
    }

    /// The file of record `name`: INTERNAL when `name` is not [`valid_name`] (names come from
    /// code, which validated or hashed what a request gave).
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        if !valid_name(name) {
            return Err(Error::Internal(format!(
                "{:?} cannot name a {} in {}",
                crate::error::bounded(name),
                self.noun.what,
                self.dir.display()
            )));
        }
        Ok(self.dir.join(format!("{name}{SUFFIX}")))
    }

    async fn run<T, F>(&self, what: String, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        blocking::run(&self.domain, &what, self.deadline, f).await?
    }

    /// Record `name`; `None` when there is none; a damaged one is INTERNAL naming its file.
    pub async fn read<T: DeserializeOwned + Send + 'static>(&self, name: &str) -> Result<Option<T>> {
        let (file, noun) = (self.file(name)?, self.noun.clone());
        self.run(format!("reading {} {}", noun.what, file.display()), move || read_file(&file, &noun)).await
    }

    /// As [`Store::read`], except that a record that does not parse and was last written before
    /// `since()` (asked only then) is removed and read as `None`, with a warning: for an
    /// [`Store::atomic_only`] store whose records a reboot makes moot, `since` being the boot, so
    /// a record a power cut tore is not an error forever. A damaged record written since is the
    /// error [`Store::read`] gives.
    pub async fn read_unless_torn_before<T, F>(&self, name: &str, since: F) -> Result<Option<T>>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnOnce() -> Option<std::time::SystemTime> + Send + 'static,
    {
        let (file, noun) = (self.file(name)?, self.noun.clone());
        self.run(format!("reading {} {}", noun.what, file.display()), move || match read_file(&file, &noun) {
            Err(Error::Internal(e)) => {
                let written = fs::metadata(&file).and_then(|m| m.modified()).ok();
                match (written, since()) {
                    (Some(w), Some(s)) if w < s => {
                        tracing::warn!(file = %file.display(), error = %e, "removing a {} written before the last boot that does not parse (a power cut tore it)", noun.what);
                        remove_if_exists(&file)?;
                        Ok(None)
                    }
                    _ => Err(Error::Internal(e)),
                }
            }
            r => r,
        })
        .await
    }

    /// Writes record `name` atomically and durably (see the module docs).
    pub async fn write<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<()> {
        let file = self.file(name)?;
        // Encoded here, so the value need not be sent to the blocking pool.
        let json = serde_json::to_vec_pretty(value).map_err(|e| Error::Internal(format!("encoding {}: {e}", file.display())))?;
        let (dir, lazy, durable) = (self.dir.clone(), self.lazy_dir, self.durable);
        self.run(format!("writing {} {}", self.noun.what, file.display()), move || {
            if lazy {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).context(|| format!("creating {}", dir.display()))?;
            }
            if durable { write_bytes(&file, &json) } else { write_bytes_then(&file, &json, false, |_| Ok(())) }
        })
        .await
    }

    /// Removes record `name` (and its temporary), durably unless [`Store::atomic_only`]; `true`
    /// when it was there.
    pub async fn remove(&self, name: &str) -> Result<bool> {
        let file = self.file(name)?;
        let (lazy, durable) = (self.lazy_dir, self.durable);
        let remove = move |f: &Path| if durable { remove_durably(f) } else { remove_durably_then(f, |_| Ok(())) };
        self.run(format!("removing {} {}", self.noun.what, file.display()), move || match remove(&file) {
            Err(Error::Io { source, .. }) if lazy && source.kind() == ErrorKind::NotFound => Ok(false),
            r => r,
        })
        .await
    }

    /// Every readable record, by name. A damaged one is skipped with a warning naming its file
    /// and the way out, so it cannot hide the others.
    pub async fn list<T: DeserializeOwned + Send + 'static>(&self) -> Result<Vec<(String, T)>> {
        let (dir, noun, lazy) = (self.dir.clone(), self.noun.clone(), self.lazy_dir);
        let all = self
            .run(format!("listing {}", dir.display()), move || match list_dir::<T>(&dir, &noun) {
                Err(Error::Io { source, .. }) if lazy && source.kind() == ErrorKind::NotFound => Ok(Vec::new()),
                r => r,
            })
            .await?;
        Ok(all
            .into_iter()
            .filter_map(|(name, r)| match r {
                Ok(v) => Some((name, v)),
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), name, error = %e, "skipping a damaged {}", self.noun.what);
                    None
                }
            })
            .collect())
    }

    /// Removes the temporaries of interrupted writes (see [`clean_dir`]: only when nothing of
    /// this store is being written, e.g. at start-up); returns what it removed.
    pub async fn clean_temporaries(&self) -> Result<Vec<PathBuf>> {
        let dir = self.dir.clone();
        self.run(format!("removing temporaries in {}", dir.display()), move || clean_dir(&dir)).await
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use serde::Deserialize;

    use super::*;

    // issue 14: group commit
    /// Concurrent writers share fsyncs (fewer fsyncs than writers), every writer returns only
    /// after an fsync that began after it asked, and a failed fsync fails the writers it served
    /// until a later one succeeds for them.
    #[test]
    fn concurrent_writers_share_directory_fsyncs() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Barrier};
        let group = Arc::new(GroupSync::default());
        let fsyncs = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (group, fsyncs, barrier) = (group.clone(), fsyncs.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    group.sync_by(|| {
                        fsyncs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(30));
                        Ok(())
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let n = fsyncs.load(Ordering::SeqCst);
        assert!((1..16).contains(&n), "16 writers made {n} fsyncs");
        assert_eq!(group.state.lock().unwrap().durable, 16);

        // A failure answers its writer, and the next writer gets an fsync of its own.
        let failed = group.sync_by(|| Err(Error::Internal("disk gone".into())));
        assert!(failed.is_err());
        let before = fsyncs.load(Ordering::SeqCst);
        group
            .sync_by(|| {
                fsyncs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        assert_eq!(fsyncs.load(Ordering::SeqCst), before + 1);
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct Rec {
        name: String,
        size: u64,
    }

    fn rec(name: &str, size: u64) -> Rec {
        Rec { name: name.into(), size }
    }

    fn store(dir: &Path) -> Store {
        Store::new(dir, "test:store", blocking::METADATA_DEADLINE).described("test record", "move it away")
    }

    #[tokio::test]
    async fn writes_reads_lists_and_removes_records() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        assert_eq!(s.read::<Rec>("a").await.unwrap(), None);
        s.write("a", &rec("a", 1)).await.unwrap();
        s.write("b", &rec("b", 2)).await.unwrap();
        s.write("a", &rec("a", 3)).await.unwrap();
        assert_eq!(s.read::<Rec>("a").await.unwrap(), Some(rec("a", 3)), "a rewrite replaces the record");
        let mode = fs::metadata(tmp.path().join("a.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The on-disk format is plain pretty JSON, readable by the writers that came before.
        let text = fs::read_to_string(tmp.path().join("b.json")).unwrap();
        assert_eq!(serde_json::from_str::<Rec>(&text).unwrap(), rec("b", 2));
        assert!(text.contains('\n'), "pretty-printed: {text}");

        let listed = s.list::<Rec>().await.unwrap();
        assert_eq!(listed, vec![("a".to_owned(), rec("a", 3)), ("b".to_owned(), rec("b", 2))]);

        assert!(s.remove("a").await.unwrap());
        assert!(!s.remove("a").await.unwrap(), "removing twice is success");
        assert_eq!(s.read::<Rec>("a").await.unwrap(), None);
        let names: Vec<String> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, vec!["b.json".to_owned()], "no temporary is left behind");
    }

    #[tokio::test]
    async fn a_damaged_record_is_an_error_naming_the_file_and_hides_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        s.write("good", &rec("good", 1)).await.unwrap();
        fs::write(tmp.path().join("bad.json"), b"{\"name\": ").unwrap();
        let err = s.read::<Rec>("bad").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Internal(_)), "{err:?}");
        assert!(msg.contains(&tmp.path().join("bad.json").display().to_string()), "{msg}");
        assert!(msg.contains("test record") && msg.contains("unreadable") && msg.contains("move it away"), "{msg}");
        assert_eq!(s.list::<Rec>().await.unwrap(), vec![("good".to_owned(), rec("good", 1))]);
        let all = list_dir::<Rec>(tmp.path(), s.noun()).unwrap();
        assert_eq!(all.len(), 2);
        assert!(all[0].0 == "bad" && all[0].1.is_err());
    }

    #[tokio::test]
    async fn temporaries_are_not_records_and_are_cleaned() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        s.write("kept", &rec("kept", 1)).await.unwrap();
        // A crash between the write of a temporary and its rename (both namings ever used),
        // and files that are not records at all.
        for f in [".half.json.tmp", "old.json.tmp", ".kept.json.tmp", "data.img", ".data.img.tmp", "notes.txt"] {
            fs::write(tmp.path().join(f), b"{\"name\": \"x\", \"size\": 9}").unwrap();
        }
        assert_eq!(s.list::<Rec>().await.unwrap(), vec![("kept".to_owned(), rec("kept", 1))]);
        let removed = s.clean_temporaries().await.unwrap();
        let want: Vec<PathBuf> = [".half.json.tmp", ".kept.json.tmp", "old.json.tmp"].iter().map(|f| tmp.path().join(f)).collect();
        assert_eq!(removed, want);
        for f in ["kept.json", "data.img", ".data.img.tmp", "notes.txt"] {
            assert!(tmp.path().join(f).exists(), "{f} is not a record temporary and stays");
        }
        assert_eq!(s.read::<Rec>("kept").await.unwrap(), Some(rec("kept", 1)), "a leftover temporary never replaces a record");
        assert!(s.clean_temporaries().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn names_cannot_leave_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        for bad in ["", "../x", "a/b", ".hidden", "x\0y", &"n".repeat(201)] {
            let err = s.write(bad, &rec("x", 1)).await.unwrap_err();
            assert!(matches!(err, Error::Internal(_)), "{bad:?}: {err}");
        }
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
        assert!(valid_name("0123abcdef") && valid_name("file:n:p:v1") && valid_name("job-1.copy"));
    }

    #[tokio::test]
    async fn a_lazy_directory_is_made_0700_on_first_write_and_lists_empty_before() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state/stage");
        let lazy = store(&dir).creating_dir();
        assert!(lazy.list::<Rec>().await.unwrap().is_empty());
        assert!(!lazy.remove("x").await.unwrap());
        assert!(!dir.exists(), "reading makes nothing");
        lazy.write("x", &rec("x", 1)).await.unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);

        // Without creating_dir a missing directory is an error: a pool directory that vanished
        // is not an empty pool, and nothing is written where it was.
        let strict = store(&tmp.path().join("gone"));
        let err = strict.list::<Rec>().await.unwrap_err();
        assert!(matches!(err, Error::Io { ref source, .. } if source.kind() == ErrorKind::NotFound), "{err:?}");
        assert!(strict.write("x", &rec("x", 1)).await.is_err());
        assert!(!tmp.path().join("gone").exists());
    }

    #[tokio::test]
    async fn a_hung_filesystem_fails_only_its_own_calls() {
        // The store's calls are blocking::run calls of its domain: when that domain is stuck,
        // the store answers UNAVAILABLE at once instead of taking another thread.
        let tmp = tempfile::tempdir().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for _ in 0..blocking::MAX_STUCK {
            let rx = rx.clone();
            let _ = blocking::run("test:store-hung", "hanging", Duration::from_millis(10), move || {
                let _ = rx.lock().unwrap().recv();
            })
            .await;
        }
        let hung = Store::new(tmp.path(), "test:store-hung", Duration::from_secs(5));
        let err = hung.write("x", &rec("x", 1)).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err}");
        store(tmp.path()).write("x", &rec("x", 1)).await.unwrap();
        drop(tx);
    }
}
