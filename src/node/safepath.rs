//! Paths that come from requests (staging, target and volume paths), checked and resolved so
//! that no request can point the driver anywhere it should not go:
//!
//! - [`PathPolicy::check`] normalises the text (`.`, `//`, a trailing `/`), refuses relative
//!   paths, `..`, NUL, anything under `/proc` or `/sys`, and, when `allowed_path_prefixes` is
//!   configured, anything outside those prefixes (INVALID_ARGUMENT naming the field).
//! - A [`RequestPath`] is then only ever opened beneath its root: the root (the matching
//!   prefix, or `/`) is opened normally — it may itself contain a symlink, as `/var/lib/kubelet`
//!   does on some hosts — and the rest is resolved with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`. A symlink anywhere below the root fails the
//!   call instead of being followed. Callers mount through the opened descriptor
//!   (`/proc/self/fd/N`), so nothing can swap the path between the check and the mount.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

use crate::error::{Error, Result};

/// Where request paths may point.
#[derive(Debug, Clone, Default)]
pub struct PathPolicy {
    /// Normalised absolute prefixes; empty = any absolute path (but `/proc` and `/sys`).
    prefixes: Vec<PathBuf>,
}

/// Trees no request path may enter, whatever the prefixes say.
const FORBIDDEN: [&str; 2] = ["/proc", "/sys"];

/// A checked request path: `root` (opened normally) + `rest` (resolved beneath it, no symlinks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    full: PathBuf,
    root: PathBuf,
    rest: PathBuf,
}

/// Normalises an absolute path textually: drops `.` components, repeated and trailing `/`.
/// `None` when it is not absolute or has `..` or a NUL byte.
pub fn normalise(path: &str) -> Option<PathBuf> {
    if path.is_empty() || path.as_bytes().contains(&0) {
        return None;
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

impl PathPolicy {
    /// A policy allowing the given prefixes (each absolute; normalised here). Empty: any path.
    pub fn new(prefixes: &[PathBuf]) -> Result<PathPolicy> {
        let mut out = Vec::new();
        for p in prefixes {
            let n = normalise(&p.to_string_lossy())
                .ok_or_else(|| Error::InvalidArgument(format!("allowed path prefix {} must be absolute, without '..'", p.display())))?;
            out.push(n);
        }
        Ok(PathPolicy { prefixes: out })
    }

    /// The configured prefixes (normalised).
    pub fn prefixes(&self) -> &[PathBuf] {
        &self.prefixes
    }

    /// Checks request field `field` holding `path` (see the module docs).
    pub fn check(&self, field: &str, path: &str) -> Result<RequestPath> {
        if path.is_empty() {
            return Err(Error::InvalidArgument(format!("{field} is required")));
        }
        let shown = crate::error::bounded(path);
        let full =
            normalise(path).ok_or_else(|| Error::InvalidArgument(format!("{field} {shown} must be an absolute path without '..'")))?;
        if FORBIDDEN.iter().any(|f| full.starts_with(f)) {
            return Err(Error::InvalidArgument(format!("{field} {shown} lies under /proc or /sys, where no volume can be")));
        }
        if full == Path::new("/") {
            return Err(Error::InvalidArgument(format!("{field} must not be the root directory")));
        }
        let root = if self.prefixes.is_empty() {
            PathBuf::from("/")
        } else {
            // The longest prefix that contains the path (a prefix itself is not a volume path).
            self.prefixes.iter().filter(|p| full.starts_with(p) && full != **p).max_by_key(|p| p.as_os_str().len()).cloned().ok_or_else(
                || {
                    Error::InvalidArgument(format!(
                        "{field} {shown} is outside the allowed path prefixes ({})",
                        self.prefixes.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                    ))
                },
            )?
        };
        let rest = full.strip_prefix(&root).map(Path::to_path_buf).unwrap_or_default();
        Ok(RequestPath { full, root, rest })
    }
}

impl RequestPath {
    /// A path the driver chose itself (its state directory, a pool's mount point): resolved
    /// beneath `/` with the same no-symlink rule. `path` must be absolute and plain.
    pub fn internal(path: &Path) -> Result<RequestPath> {
        let full = normalise(&path.to_string_lossy())
            .ok_or_else(|| Error::Internal(format!("internal path {} is not absolute and plain", path.display())))?;
        let rest = full.strip_prefix("/").map(Path::to_path_buf).unwrap_or_default();
        Ok(RequestPath { full, root: PathBuf::from("/"), rest })
    }

    /// The normalised path.
    pub fn as_path(&self) -> &Path {
        &self.full
    }

    /// The root it is resolved beneath.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The parent, as a request path beneath the same root (`None` for a path equal to its root).
    pub fn parent(&self) -> Option<RequestPath> {
        if self.rest.as_os_str().is_empty() {
            return None;
        }
        let rest = self.rest.parent().map(Path::to_path_buf).unwrap_or_default();
        Some(RequestPath { full: self.root.join(&rest), root: self.root.clone(), rest })
    }

    /// The last component.
    pub fn file_name(&self) -> Option<&OsStr> {
        self.rest.file_name()
    }

    fn open_root(&self) -> Result<OwnedFd> {
        rustix::fs::open(&self.root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Error::io(format!("opening {}", self.root.display()), e.into()))
    }

    /// Opens the path with `flags` (O_CLOEXEC is added) beneath its root,
    /// following no symlink. `Ok(None)` when it does not exist; a symlink on the way is
    /// FAILED_PRECONDITION.
    pub fn open(&self, flags: OFlags) -> Result<Option<OwnedFd>> {
        let root = self.open_root()?;
        if self.rest.as_os_str().is_empty() {
            return Ok(Some(root));
        }
        self.open_at(&root, &self.rest, flags)
    }

    fn open_at(&self, root: &OwnedFd, rel: &Path, flags: OFlags) -> Result<Option<OwnedFd>> {
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(root.as_fd(), rel, flags | OFlags::CLOEXEC, Mode::empty(), how) {
            Ok(fd) => Ok(Some(fd)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::XDEV) => Err(self.symlink_error()),
            Err(e) => Err(Error::io(format!("opening {}", self.full.display()), e.into())),
        }
    }

    fn symlink_error(&self) -> Error {
        Error::FailedPrecondition(format!(
            "{} has a symbolic link below {}; holdfast never follows links in request paths",
            self.full.display(),
            self.root.display()
        ))
    }

    /// Opens the path as an `O_PATH` descriptor (any file type), following no symlink.
    pub fn open_path(&self) -> Result<Option<OwnedFd>> {
        self.open(OFlags::PATH)
    }

    /// Creates the directory and its missing parents (mode 0750) beneath the root, following no
    /// symlink, and returns it opened (`O_PATH | O_DIRECTORY`).
    pub fn create_dir_all(&self) -> Result<OwnedFd> {
        let root = self.open_root()?;
        let mut dir = root;
        let mut so_far = PathBuf::new();
        for c in self.rest.components() {
            let Component::Normal(name) = c else { continue };
            so_far.push(name);
            let flags = OFlags::PATH | OFlags::DIRECTORY;
            match rustix::fs::mkdirat(dir.as_fd(), name, Mode::from_raw_mode(0o750)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(Error::io(format!("creating directory {}", self.root.join(&so_far).display()), e.into())),
            }
            dir = match self.open_at(&dir, Path::new(name), flags | OFlags::DIRECTORY) {
                Ok(Some(fd)) => fd,
                Ok(None) => return Err(Error::Internal(format!("{} vanished while it was created", self.root.join(&so_far).display()))),
                Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Err(Error::FailedPrecondition(format!("{} exists and is not a directory", self.root.join(&so_far).display())));
                }
                Err(e) => return Err(e),
            };
        }
        Ok(dir)
    }

    /// Creates the path as an empty regular file (mode 0640; an existing file is kept, never
    /// truncated), its parents as directories, all beneath the root with no symlink followed.
    /// Returns it opened `O_PATH`.
    pub fn create_file(&self) -> Result<OwnedFd> {
        let (Some(parent), Some(name)) = (self.parent(), self.file_name()) else {
            return Err(Error::InvalidArgument(format!("{} cannot be a file", self.full.display())));
        };
        let dir = parent.create_dir_all()?;
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        let flags = OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC;
        let dir = rustix::fs::openat(dir.as_fd(), ".", OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Error::io(format!("opening {}", parent.as_path().display()), e.into()))?;
        match rustix::fs::openat2(dir.as_fd(), name, flags, Mode::from_raw_mode(0o640), how) {
            Ok(_) => {}
            Err(rustix::io::Errno::LOOP) => return Err(self.symlink_error()),
            Err(e) => return Err(Error::io(format!("creating file {}", self.full.display()), e.into())),
        }
        self.open_path()?.ok_or_else(|| Error::Internal(format!("{} vanished while it was created", self.full.display())))
    }

    /// Removes the path (an empty directory or a non-directory) without following a symlink;
    /// `Ok(false)` when it was not there. A directory that is not empty is FAILED_PRECONDITION.
    pub fn remove(&self) -> Result<bool> {
        let (Some(parent), Some(name)) = (self.parent(), self.file_name()) else {
            return Err(Error::InvalidArgument(format!("{} cannot be removed", self.full.display())));
        };
        let Some(dir) = parent.open(OFlags::DIRECTORY | OFlags::RDONLY)? else { return Ok(false) };
        let st = match rustix::fs::statat(dir.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(Error::io(format!("inspecting {}", self.full.display()), e.into())),
        };
        let is_dir = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
        let flags = if is_dir { AtFlags::REMOVEDIR } else { AtFlags::empty() };
        match rustix::fs::unlinkat(dir.as_fd(), name, flags) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(rustix::io::Errno::NOTEMPTY) | Err(rustix::io::Errno::EXIST) => Err(Error::FailedPrecondition(format!(
                "{} is not empty; holdfast does not delete its content (check what wrote there)",
                self.full.display()
            ))),
            Err(e) => Err(Error::io(format!("removing {}", self.full.display()), e.into())),
        }
    }
}

/// The `/proc/self/fd/N` path of an open descriptor: the kernel resolves it to the very object
/// that was opened, whatever has happened to its path since.
pub fn fd_path(fd: &impl AsFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

/// Whether `a` names the same path as `b` after normalisation.
pub fn same_path(a: &Path, b: &Path) -> bool {
    match (normalise(&a.to_string_lossy()), normalise(&b.to_string_lossy())) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The bytes of a path, for messages that must not be confused by odd characters.
pub fn display_bytes(p: &Path) -> String {
    crate::error::bounded(&String::from_utf8_lossy(p.as_os_str().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses() {
        let policy = PathPolicy::default();
        struct Case {
            path: &'static str,
            want: Option<&'static str>,
        }
        let cases = [
            Case { path: "/a/./b", want: Some("/a/b") },
            Case { path: "/a//b/", want: Some("/a/b") },
            Case { path: "/stage", want: Some("/stage") },
            Case { path: "relative/x", want: None },
            Case { path: "/a/../etc", want: None },
            Case { path: "/proc/self/root/etc", want: None },
            Case { path: "/sys/fs/x", want: None },
            Case { path: "/", want: None },
            Case { path: "/a\0b", want: None },
        ];
        for c in cases {
            match (policy.check("target_path", c.path), c.want) {
                (Ok(p), Some(w)) => assert_eq!(p.as_path(), Path::new(w), "{:?}", c.path),
                (Err(e), None) => assert!(matches!(e, Error::InvalidArgument(_)), "{:?}: {e}", c.path),
                (got, want) => panic!("{:?}: got {got:?}, want {want:?}", c.path),
            }
        }
    }

    #[test]
    fn prefixes_bound_and_root_the_path() {
        let policy = PathPolicy::new(&["/var/lib/kubelet".into(), "/var/lib/kubelet/plugins".into()]).unwrap();
        let p = policy.check("staging_target_path", "/var/lib/kubelet/plugins/x/globalmount").unwrap();
        assert_eq!(p.root(), Path::new("/var/lib/kubelet/plugins"), "the longest prefix");
        assert!(policy.check("target_path", "/tmp/x").is_err());
        assert!(policy.check("target_path", "/var/lib/kubelet").is_err(), "a prefix itself is no volume path");
        assert!(policy.check("target_path", "/var/lib/kubeletx/y").is_err(), "prefixes match whole components");
    }

    #[test]
    fn symlinks_below_the_root_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("link")).unwrap();
        let policy = PathPolicy::new(&[dir.path().to_path_buf()]).unwrap();

        let through = policy.check("target_path", &format!("{}/link/mount", dir.path().display())).unwrap();
        assert!(matches!(through.create_dir_all(), Err(Error::FailedPrecondition(_))));
        assert!(!victim.join("mount").exists(), "nothing was created through the link");
        let at_link = policy.check("target_path", &format!("{}/link", dir.path().display())).unwrap();
        assert!(matches!(at_link.open_path(), Err(Error::FailedPrecondition(_))));
        assert!(matches!(at_link.create_file(), Err(Error::FailedPrecondition(_))));
        // Removing the link removes the link itself, never its target.
        assert!(at_link.remove().unwrap());
        assert!(victim.is_dir());

        let plain = policy.check("target_path", &format!("{}/pods/p1/mount", dir.path().display())).unwrap();
        plain.create_dir_all().unwrap();
        assert!(dir.path().join("pods/p1/mount").is_dir());
        let file = policy.check("target_path", &format!("{}/pods/p1/dev", dir.path().display())).unwrap();
        file.create_file().unwrap();
        std::fs::write(dir.path().join("pods/p1/dev"), b"kept").unwrap();
        file.create_file().unwrap();
        assert_eq!(std::fs::read(dir.path().join("pods/p1/dev")).unwrap(), b"kept", "never truncated");
        std::fs::write(dir.path().join("pods/p1/mount/data"), b"x").unwrap();
        assert!(matches!(plain.remove(), Err(Error::FailedPrecondition(_))), "content is never deleted");
        assert!(file.remove().unwrap());
        assert!(!file.remove().unwrap());
    }
}
