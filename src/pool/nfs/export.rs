//! The nfs pool's working mount: the whole export mounted once under a private directory
//! (`/run/holdfast/nfs/<pool>`), through which the pool creates, copies and removes volume
//! directories. Before it is used, the mount is checked with a `stat --file-system` run as a
//! child process under a deadline, so a server that stopped answering makes the caller fail fast
//! (the child is killed; NFS waits are killable) instead of hanging a thread of the plugin. A
//! mount gone stale (ESTALE: the server re-exported the directory) is lazily unmounted and mounted
//! again. The same probe reports the export's free space.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::exec::{Cmd, Exec, ExecError};
use crate::node::mount::Mounter;
use crate::node::mountinfo::{self, MountInfo};

/// How long mounting the export may take (mount.nfs retries a silent server for minutes).
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// What the probe of a mounted export found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The server answered; this many bytes are free for an unprivileged writer.
    Free(u64),
    /// The server did not answer within the deadline.
    Silent,
    /// The mount's file handle is stale (the export was re-exported or the server's filesystem
    /// replaced): a fresh mount fixes it.
    Stale(String),
    /// Any other failure (EIO on a `soft` mount, EACCES after an unexport…), with stderr.
    Failed(String),
}

/// Parses the output of `stat --file-system --format='%a %S'`: available blocks and the
/// fundamental block size (the unit of the block counts), i.e. statvfs `f_bavail` × `f_frsize`.
pub fn parse_free(out: &str) -> Option<u64> {
    let mut it = out.split_whitespace();
    let blocks: u64 = it.next()?.parse().ok()?;
    let size: u64 = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    blocks.checked_mul(size)
}

/// Whether a command failed because a file handle went stale.
pub fn is_stale(e: &ExecError) -> bool {
    e.stderr().contains("Stale file handle")
}

/// Whether a command failed because the path does not exist.
pub fn is_missing(e: &ExecError) -> bool {
    e.stderr().contains("No such file or directory")
}

/// Asks the server for the filesystem's free space at `path`, killed after `timeout`.
pub async fn probe(exec: &dyn Exec, path: &Path, timeout: Duration) -> Probe {
    let cmd = Cmd::new("stat").args(["--file-system", "--format=%a %S", "--"]).arg(path.to_string_lossy()).timeout(timeout);
    match exec.run(cmd).await {
        Ok(out) => match parse_free(&out.stdout) {
            Some(free) => Probe::Free(free),
            None => Probe::Failed(format!("unexpected output of stat --file-system: {:?}", out.stdout.trim())),
        },
        Err(ExecError::Timeout { .. }) => Probe::Silent,
        Err(e) if is_stale(&e) => Probe::Stale(e.stderr().trim().to_owned()),
        Err(e) => Probe::Failed(e.to_string()),
    }
}

/// The working mount of one export.
#[derive(Clone)]
pub struct Export {
    /// `server:/export`, as `mount` takes it and mountinfo shows it.
    pub source: String,
    /// Where it is mounted.
    pub work: PathBuf,
    /// The pool's mount options.
    pub options: Vec<String>,
    /// The mount table to consult (the driver's [`Mounter`]; a fake in tests).
    pub mounter: Arc<dyn Mounter>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("source", &self.source).field("work", &self.work).field("options", &self.options).finish()
    }
}

/// Whether a mountinfo entry is an NFS mount of `source`.
fn is_our_mount(m: &MountInfo, source: &str) -> bool {
    matches!(m.fs_type.as_str(), "nfs" | "nfs4") && m.source.trim_end_matches('/') == source.trim_end_matches('/')
}

impl Export {
    /// Whether the export is mounted at the working directory: `Ok(false)` when nothing is, an
    /// error when something else is (never mounted over, never unmounted: not ours).
    pub async fn is_mounted(&self) -> Result<bool> {
        let mounts = self.mounter.mounts().await?;
        match mountinfo::top_at(&mounts, &self.work) {
            None => Ok(false),
            Some(m) if is_our_mount(m, &self.source) => Ok(true),
            Some(m) => Err(Error::FailedPrecondition(format!(
                "the nfs pool's working directory {} has {} ({}) mounted on it, not {}; unmount it",
                self.work.display(),
                m.source,
                m.fs_type,
                self.source
            ))),
        }
    }

    /// Mounts the export at the working directory (created if missing).
    pub async fn mount(&self, exec: &dyn Exec) -> Result<()> {
        std::fs::create_dir_all(&self.work).map_err(|e| Error::io(format!("creating the working directory {}", self.work.display()), e))?;
        let mut cmd = Cmd::new("mount").args(["-t", "nfs"]);
        if !self.options.is_empty() {
            cmd = cmd.arg("-o").arg(self.options.join(","));
        }
        let cmd = cmd.arg("--").arg(&self.source).arg(self.work.to_string_lossy()).timeout(MOUNT_TIMEOUT);
        exec.run(cmd).await.map(|_| ()).map_err(|e| {
            let what = format!("mounting the export {} at {}", self.source, self.work.display());
            match e {
                // No answer is the server's state, not holdfast's failure.
                ExecError::Timeout { .. } => Error::Unavailable(format!("{what}: the server did not answer within {MOUNT_TIMEOUT:?}")),
                e => Error::exec(format!("{what} (check `server`, `export`, `mount_options` and the server's exports)"), e),
            }
        })
    }

    /// Detaches a stale mount (lazily: a stale mount may not answer at all).
    pub async fn unmount_stale(&self, exec: &dyn Exec) -> Result<()> {
        // --no-canonicalize: resolving the path would stat the dead mount.
        let cmd = Cmd::new("umount").args(["--lazy", "--no-canonicalize", "--"]).arg(self.work.to_string_lossy()).timeout(MOUNT_TIMEOUT);
        exec.run(cmd).await.map(|_| ()).map_err(|e| Error::exec(format!("unmounting the stale export at {}", self.work.display()), e))
    }

    /// Makes sure the export is mounted and answering; returns its free bytes. A silent server
    /// is UNAVAILABLE within `timeout`; a stale mount is replaced once.
    pub async fn ensure(&self, exec: &dyn Exec, timeout: Duration) -> Result<u64> {
        if !self.is_mounted().await? {
            tracing::info!(source = %self.source, work = %self.work.display(), "mounting the nfs export");
            self.mount(exec).await?;
        }
        let mut remounted = false;
        loop {
            match probe(exec, &self.work, timeout).await {
                Probe::Free(free) => return Ok(free),
                Probe::Silent => {
                    return Err(Error::Unavailable(format!("the NFS server of {} did not answer within {timeout:?}", self.source)));
                }
                Probe::Stale(msg) if !remounted => {
                    tracing::warn!(source = %self.source, work = %self.work.display(), %msg, "the export's mount is stale; mounting it again");
                    self.unmount_stale(exec).await?;
                    // The server changed under the mount; if it refuses a fresh one, it is the
                    // server's state (unexported, moved), not a holdfast failure.
                    self.mount(exec).await.map_err(|e| match e {
                        Error::Unavailable(m) => Error::Unavailable(m),
                        e => Error::Unavailable(format!("the export {} went stale and cannot be mounted again: {e}", self.source)),
                    })?;
                    remounted = true;
                }
                Probe::Stale(msg) | Probe::Failed(msg) => {
                    return Err(Error::Unavailable(format!("the export {} mounted at {} fails: {msg}", self.source, self.work.display())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_from_stat_output() {
        let captured = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nfs/stat-file-system.txt")).unwrap();
        assert_eq!(parse_free(&captured), Some(4215 * 262144));
        for bad in ["", "12", "a 4096", "1 2 3", "-1 4096"] {
            assert_eq!(parse_free(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_an_nfs_mount_of_the_export_counts() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nfs/mountinfo.txt")).unwrap();
        let mounts = mountinfo::parse(&text).unwrap();
        let at = |p: &str| mountinfo::top_at(&mounts, Path::new(p)).unwrap();
        assert!(is_our_mount(at("/run/holdfast/nfs/v42"), "127.0.0.1:/srv/export"));
        assert!(is_our_mount(at("/run/holdfast/nfs/v3"), "127.0.0.1:/srv/export/"));
        assert!(!is_our_mount(at("/run/holdfast/nfs/v42"), "127.0.0.1:/srv/other"));
        assert!(!is_our_mount(at("/tmp"), "tmpfs"));
    }
}
