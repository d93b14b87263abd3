//! Where an nfs pool keeps things on its export, and the plain file operations on them. These
//! functions block (they are file-system calls on a network mount); the pool runs them on the
//! blocking thread pool under a deadline.
//!
//! ```text
//! <export>/<subdir>                               a volume's data (the subdir template's path)
//! <export>/.holdfast/<pool>/volumes/<local>.json  the volume: CSI name, capacity, source, subdir
//! <export>/.holdfast/<pool>/paths/<hash>.json     which volume owns a subdirectory (by its SHA-256)
//! <export>/.holdfast/<pool>/snapshots/<local>.tar the snapshot: a tar archive of the volume
//! <export>/.holdfast/<pool>/snapshots/<local>.json its metadata
//! <export>/.holdfast/<pool>/tmp/                  volumes and archives being built, intents
//! <export>/.holdfast/<pool>/trash/<local>         a deleted volume's data being removed
//! ```
//!
//! The JSON records are kept with the [`crate::store`] record store's atomic writes.
//!
//! The metadata lives beside the data, not inside it: a volume's directory is exactly what the
//! workload sees, and the workload can neither read nor rewrite what holdfast knows about it.
//! Every path is built from a [`valid_local_name`] or a subdirectory that passed
//! [`validate_subdir`], and walking to a subdirectory refuses symlinks, so nothing outside the
//! export is ever reached.

use std::fs;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::template::validate_subdir;
use crate::error::{Context, Error, Result};
use crate::pool::{SnapshotInfo, VolumeInfo};
use crate::volume_id::valid_local_name;

/// A volume as stored in `volumes/<local>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// What the pool trait reports.
    #[serde(flatten)]
    pub info: VolumeInfo,
    /// The data directory, relative to the export root.
    pub subdir: String,
    /// issue 11: cluster. The record's schema (refused when newer than this build's).
    #[serde(default)]
    pub schema: crate::pool::schema::RecordSchema,
}

/// A snapshot as stored in `snapshots/<local>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// What the pool trait reports.
    #[serde(flatten)]
    pub info: SnapshotInfo,
    /// Size of the archive file in bytes.
    pub archive_bytes: u64,
    /// issue 11: cluster. As [`VolumeMeta::schema`].
    #[serde(default)]
    pub schema: crate::pool::schema::RecordSchema,
    /// The subdirectory it was taken from (for operators).
    pub subdir: String,
}

/// The owner of a subdirectory, stored under the subdirectory's hash, so that whether a path or
/// any of its parents is a volume takes one lookup per component instead of a scan of all volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathOwner {
    /// The volume's local name.
    pub local: String,
    /// The subdirectory (to tell a hash collision from an owner).
    pub subdir: String,
}

/// The paths of one pool on its mounted export.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The export's root (the working mount).
    pub root: PathBuf,
    /// `<root>/.holdfast/<pool>`.
    pub meta: PathBuf,
}

/// INVALID_ARGUMENT unless `local` is a local name: the one gate between names and paths.
pub fn check_local(local: &str) -> Result<&str> {
    if valid_local_name(local) {
        Ok(local)
    } else {
        Err(Error::InvalidArgument(format!("{local:?} is not a valid nfs volume or snapshot name")))
    }
}

impl Layout {
    /// The layout of pool `pool` on the export mounted at `root`.
    pub fn new(root: &Path, pool: &str) -> Layout {
        Layout { root: root.to_path_buf(), meta: root.join(".holdfast").join(pool) }
    }
    /// Directory of volume metadata.
    pub fn volumes(&self) -> PathBuf {
        self.meta.join("volumes")
    }
    /// Directory of snapshots.
    pub fn snapshots(&self) -> PathBuf {
        self.meta.join("snapshots")
    }
    /// Directory of things being built.
    pub fn tmp(&self) -> PathBuf {
        self.meta.join("tmp")
    }
    /// Metadata file of a volume.
    pub fn volume_meta(&self, local: &str) -> PathBuf {
        self.volumes().join(format!("{local}.json"))
    }
    /// Metadata file of a snapshot.
    pub fn snapshot_meta(&self, local: &str) -> PathBuf {
        self.snapshots().join(format!("{local}.json"))
    }
    /// Archive of a snapshot.
    pub fn snapshot_archive(&self, local: &str) -> PathBuf {
        self.snapshots().join(format!("{local}.tar"))
    }
    /// Archive of a snapshot being written.
    pub fn tmp_archive(&self, local: &str) -> PathBuf {
        self.tmp().join(format!("{local}.tar"))
    }
    /// Data directory of a volume being built.
    pub fn tmp_volume(&self, local: &str) -> PathBuf {
        self.tmp().join(format!("{local}.d"))
    }
    /// The intent of a creation in progress: the metadata it will commit, written before its
    /// directory is moved into place, so a retry after a crash recognises the directory as its own.
    pub fn intent(&self, local: &str) -> PathBuf {
        self.tmp().join(format!("{local}.json"))
    }
    /// The owner record of a subdirectory.
    pub fn path_owner(&self, subdir: &str) -> PathBuf {
        let digest = hex::encode(Sha256::digest(subdir.as_bytes()));
        self.meta.join("paths").join(format!("{}.json", &digest[..32]))
    }
    /// Where a deleted volume's data waits to be removed.
    pub fn trash(&self, local: &str) -> PathBuf {
        self.meta.join("trash").join(local)
    }
    /// A volume's data directory (the subdirectory is checked again: metadata is input too).
    pub fn data(&self, subdir: &str) -> Result<PathBuf> {
        validate_subdir(subdir).map_err(|e| Error::Internal(format!("refusing subdirectory {subdir:?}: {e}")))?;
        Ok(self.root.join(subdir))
    }

    /// Creates the pool's own directories (mode 0700: for holdfast only).
    pub fn init(&self) -> Result<()> {
        for d in [self.volumes(), self.snapshots(), self.tmp(), self.meta.join("trash"), self.meta.join("paths")] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&d).context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }
}

/// How the nfs pool's records are named in messages, and what to do with a damaged one.
fn noun() -> crate::store::Noun {
    crate::store::Noun::new("metadata", "fix or remove it")
}

/// Makes renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    crate::store::sync_dir(dir)
}

/// Reads a JSON file; `None` when it does not exist (the [`crate::store`] record store).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    crate::store::read_file(path, &noun())
}

/// Writes a JSON file atomically: temporary file, fsync, rename, fsync of the directory (the
/// [`crate::store`] record store).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    crate::store::write_file(path, value)
}

/// Removes a file; one that is not there is success.
pub fn remove_file(path: &Path) -> Result<()> {
    crate::store::remove_if_exists(path).map(|_| ())
}

/// Every `*.json` in `dir` whose stem is a local name, parsed. An unreadable file is logged and
/// skipped, so one damaged file does not hide every other object.
pub fn list_json<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (local, r) in crate::store::list_dir::<T>(dir, &noun())? {
        // Only local names are the pool's (the store already left temporaries out).
        if !valid_local_name(&local) {
            continue;
        }
        match r {
            Ok(v) => out.push(v),
            Err(e) => tracing::warn!(local, error = %e, "skipping unreadable nfs metadata"),
        }
    }
    Ok(out)
}

/// The volume (other than `local`) that owns `subdir` or one of its parents, if any. An owner
/// record whose volume is gone (a crash between the two removals of a deletion) is ignored.
pub fn owner_above(layout: &Layout, subdir: &str, local: &str) -> Result<Option<PathOwner>> {
    let components: Vec<&str> = subdir.split('/').collect();
    for n in 1..=components.len() {
        let prefix = components[..n].join("/");
        let Some(owner) = read_json::<PathOwner>(&layout.path_owner(&prefix))? else { continue };
        if owner.subdir != prefix || owner.local == local || !valid_local_name(&owner.local) {
            continue;
        }
        match read_json::<VolumeMeta>(&layout.volume_meta(&owner.local))? {
            Some(m) if m.subdir == prefix => return Ok(Some(owner)),
            _ => {}
        }
    }
    Ok(None)
}

/// What is at a path, without following a symlink there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Nothing.
    Missing,
    /// A directory.
    Dir,
    /// Anything else (file, symlink, device…).
    Other,
}

/// What is at `path` (`lstat`).
pub fn entry(path: &Path) -> Result<Entry> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Entry::Missing),
        Err(e) => Err(Error::io(format!("inspecting {}", path.display()), e)),
        Ok(m) if m.file_type().is_dir() => Ok(Entry::Dir),
        Ok(_) => Ok(Entry::Other),
    }
}

/// Creates the parent directories of `root/subdir` (mode 0755), refusing to pass through
/// anything that is not a real directory: a symlink planted on the export can never redirect a
/// volume outside it.
pub fn make_parents(root: &Path, subdir: &str) -> Result<()> {
    let components: Vec<&str> = subdir.split('/').collect();
    let mut at = root.to_path_buf();
    for c in &components[..components.len() - 1] {
        at.push(c);
        match entry(&at)? {
            Entry::Dir => {}
            Entry::Missing => match fs::DirBuilder::new().mode(0o755).create(&at) {
                Ok(()) => {}
                // Someone else made it meanwhile: check what it is on the next round.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    if entry(&at)? != Entry::Dir {
                        return Err(not_a_dir(&at, subdir));
                    }
                }
                Err(e) => return Err(Error::io(format!("creating {}", at.display()), e)),
            },
            Entry::Other => return Err(not_a_dir(&at, subdir)),
        }
    }
    Ok(())
}

fn not_a_dir(at: &Path, subdir: &str) -> Error {
    Error::FailedPrecondition(format!(
        "{} is not a plain directory (a symlink or a file), so the volume directory {subdir:?} cannot be placed under it; \
         move it away on the export",
        at.display()
    ))
}

/// Checks that `path` is a real directory under `root` whose every component is a real
/// directory (no symlink anywhere between the export root and the volume).
pub fn check_inside(root: &Path, subdir: &str) -> Result<PathBuf> {
    let mut at = root.to_path_buf();
    for c in subdir.split('/') {
        at.push(c);
        if entry(&at)? != Entry::Dir {
            return Err(not_a_dir(&at, subdir));
        }
    }
    Ok(at)
}

/// Opens `root/<subdir>` as a directory, resolving beneath `root` without following any
/// symlink (`openat2` with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): a volume directory that a
/// workload replaced by a symlink, or a symlink planted above it, is FAILED_PRECONDITION, never
/// followed. `None` when it does not exist. Work on the volume's data then goes through the
/// descriptor ([`child_path`]), so swapping the directory afterwards redirects nothing.
pub fn open_dir(root: &Path, subdir: &str) -> Result<Option<OwnedFd>> {
    validate_subdir(subdir).map_err(|e| Error::Internal(format!("refusing subdirectory {subdir:?}: {e}")))?;
    open_beneath(root, subdir)
}

fn open_root(root: &Path) -> Result<OwnedFd> {
    rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::io(format!("opening {}", root.display()), e.into()))
}

/// [`open_dir`] of any relative path (holdfast's own directories included); `""` is the root.
///
/// One component at a time, each opened for reading from its parent's descriptor: every open
/// makes the NFS client check the directory with the server (close-to-open consistency), so
/// a directory replaced on the server moments ago is seen as replaced, not as the client's
/// cached entry of the old one.
fn open_beneath(root: &Path, rel: &str) -> Result<Option<OwnedFd>> {
    let mut fd = open_root(root)?;
    if rel.is_empty() {
        return Ok(Some(fd));
    }
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for component in rel.split('/') {
        fd = match rustix::fs::openat2(&fd, component, flags, Mode::empty(), how) {
            Ok(next) => next,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            // ELOOP: a symlink on the way; ENOTDIR: a file; EXDEV: an escape from the root.
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR | rustix::io::Errno::XDEV) => {
                return Err(Error::FailedPrecondition(format!(
                    "{} is not a plain directory on the export (a symlink or a file replaced it, or a directory above it); \
                     holdfast never follows it: put the volume's directory back, or remove what replaced it",
                    root.join(rel).display()
                )));
            }
            Err(e) => return Err(Error::io(format!("opening {}", root.join(rel).display()), e.into())),
        };
    }
    Ok(Some(fd))
}

/// A path through which a child process (tar, cp) reaches the directory `fd` holds open, and
/// nothing else: this process's `/proc/<pid>/fd/<n>`, which the kernel resolves to the opened
/// directory itself, whatever its path names by then. (A child's own `/proc/self/fd` would need
/// the descriptor inherited; this way it stays close-on-exec.) Keep `fd` open while the child runs.
pub fn child_path(fd: &OwnedFd) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())
}

/// Moves the volume directory `root/<subdir>` to `to` (in holdfast's own tree on the export, or
/// beside it for an archive) without following a symlink: the parent is opened as by
/// [`open_dir`], the last component checked to be a directory and renamed from there. A
/// directory swapped for a symlink after the check is moved as the link, never through it.
/// `Ok(false)` when it is not there.
pub fn move_dir(root: &Path, subdir: &str, to: &Path) -> Result<bool> {
    validate_subdir(subdir).map_err(|e| Error::Internal(format!("refusing subdirectory {subdir:?}: {e}")))?;
    let (parent_rel, last) = subdir.rsplit_once('/').unwrap_or(("", subdir));
    let Some(parent) = open_beneath(root, parent_rel)? else { return Ok(false) };
    match rustix::fs::statat(&parent, last, AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => return Ok(false),
        Err(e) => return Err(Error::io(format!("inspecting {}", root.join(subdir).display()), e.into())),
        Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {
            return Err(Error::FailedPrecondition(format!(
                "{} is not the volume's directory any more (a symlink or a file replaced it); holdfast neither follows nor \
                 removes it: put the directory back or remove what replaced it, then retry",
                root.join(subdir).display()
            )));
        }
        Ok(_) => {}
    }
    let (Some(to_dir), Some(to_name)) = (to.parent(), to.file_name()) else {
        return Err(Error::Internal(format!("{} is not a path to move a directory to", to.display())));
    };
    let to_rel = to_dir
        .strip_prefix(root)
        .map_err(|_| Error::Internal(format!("{} is outside the export {}", to.display(), root.display())))?
        .to_string_lossy()
        .into_owned();
    let to_fd = open_beneath(root, &to_rel)?.ok_or_else(|| Error::Internal(format!("{} is missing", to_dir.display())))?;
    rustix::fs::renameat(&parent, last, &to_fd, to_name)
        .map_err(|e| Error::io(format!("moving {} to {}", root.join(subdir).display(), to.display()), e.into()))?;
    Ok(true)
}

/// Removes the empty parent directories of `subdir` (made by [`make_parents`]), deepest first,
/// stopping at the first one that is not empty.
pub fn remove_empty_parents(root: &Path, subdir: &str) {
    let components: Vec<&str> = subdir.split('/').collect();
    for n in (1..components.len()).rev() {
        let dir = root.join(components[..n].join("/"));
        if fs::remove_dir(&dir).is_err() {
            break;
        }
    }
}

/// Sets mode and ownership of a new volume directory; `None` leaves that attribute alone.
pub fn set_attributes(dir: &Path, mode: Option<u32>, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(dir, uid, gid).context(|| format!("changing the owner of {}", dir.display()))?;
    }
    // After chown: changing the owner clears the set-gid bit.
    if let Some(mode) = mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).context(|| format!("setting mode {mode:o} on {}", dir.display()))?;
    }
    Ok(())
}

/// The name an archived volume directory gets: `archived-<last component>-<UTC time>`, cut to
/// fit one component.
pub fn archived_name(subdir: &str, unix_secs: i64) -> String {
    let last = subdir.rsplit('/').next().unwrap_or(subdir);
    let stamp = utc_stamp(unix_secs);
    let room = super::template::MAX_COMPONENT_LEN - "archived-".len() - 1 - stamp.len();
    let cut = &last[..last.len().min(room)];
    format!("archived-{cut}-{stamp}")
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time (proleptic Gregorian calendar, UTC).
pub fn utc_stamp(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_700_000_000), "20231114T221320Z");
        assert_eq!(utc_stamp(4_102_444_799), "20991231T235959Z");
    }

    #[test]
    fn archived_names_fit_one_component() {
        assert_eq!(archived_name("ns/db", 0), "archived-db-19700101T000000Z");
        assert_eq!(archived_name("pvc-1", 0), "archived-pvc-1-19700101T000000Z");
        let long = archived_name(&"x".repeat(255), 0);
        assert_eq!(long.len(), 255);
        assert!(validate_subdir(&long).is_ok());
    }

    #[test]
    fn walking_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("ns")).unwrap();
        let err = make_parents(root, "ns/pvc").unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        fs::write(root.join("file"), b"x").unwrap();
        assert!(make_parents(root, "file/pvc").is_err());
        make_parents(root, "a/b/c").unwrap();
        assert!(root.join("a/b").is_dir() && !root.join("a/b/c").exists());
        fs::create_dir(root.join("a/b/c")).unwrap();
        assert_eq!(check_inside(root, "a/b/c").unwrap(), root.join("a/b/c"));
        assert!(check_inside(root, "ns").is_err(), "a symlink is not inside");
        fs::remove_dir(root.join("a/b/c")).unwrap();
        remove_empty_parents(root, "a/b/c");
        assert!(!root.join("a").exists());
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0, "nothing was made outside");
    }
}
