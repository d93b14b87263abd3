//! The node side of a volume's life, independent of gRPC: format-if-blank and mount at the
//! staging path, bind-mount to the target path, unmount, grow the filesystem, and report usage
//! and health. The CSI node service (`csi/node.rs`) validates and locks, then calls these.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::exec::Exec;
use crate::pool::Attachment;

pub mod format;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;

use mount::Mounter;

/// Usage of a mounted filesystem or a block device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Total bytes.
    pub total_bytes: u64,
    /// Available bytes (free space an unprivileged writer can use).
    pub available_bytes: u64,
    /// Used bytes.
    pub used_bytes: u64,
    /// Inodes in total; `None` for block devices.
    pub total_inodes: Option<u64>,
    /// Free inodes.
    pub free_inodes: Option<u64>,
    /// Used inodes.
    pub used_inodes: Option<u64>,
}

/// Node operations over an [`Exec`] and a [`Mounter`].
#[derive(Clone)]
pub struct Node {
    /// Runs mkfs, blkid, resize tools.
    pub exec: Arc<dyn Exec>,
    /// Mounts and unmounts.
    pub mounter: Arc<dyn Mounter>,
}

/// Where a staged volume's data is, as the node needs to know it later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// The device (block-backed volumes) or mount source.
    pub attachment: Attachment,
    /// The staging path.
    pub staging: PathBuf,
}

impl Node {
    /// A node over the given executors.
    pub fn new(exec: Arc<dyn Exec>, mounter: Arc<dyn Mounter>) -> Self {
        Node { exec, mounter }
    }

    /// Stages a filesystem volume: for a device, formats it with `fs_type` only when `blkid`
    /// finds no signature at all (a device holding anything else is never formatted; a device
    /// holding a different filesystem is FAILED_PRECONDITION), then mounts it at `staging` with
    /// `mount_flags`. For a `Mount` attachment, mounts the source. Idempotent: an existing mount
    /// of the same source at `staging` is success; a different source there is ALREADY_EXISTS...
    pub async fn stage_filesystem(&self, attachment: &Attachment, staging: &Path, fs_type: &str, mount_flags: &[String]) -> Result<()> {
        let _ = (attachment, staging, fs_type, mount_flags);
        Err(crate::error::Error::Unimplemented("stage_filesystem".into()))
    }

    /// Unmounts whatever is mounted at `staging` (idempotent; a path that does not exist or is
    /// not mounted is success).
    pub async fn unstage(&self, staging: &Path) -> Result<()> {
        let _ = staging;
        Err(crate::error::Error::Unimplemented("unstage".into()))
    }

    /// Bind-mounts the staged filesystem at `staging` onto `target` (created as a directory),
    /// read-only when asked, with `mount_flags`. Idempotent.
    pub async fn publish_filesystem(&self, staging: &Path, target: &Path, readonly: bool, mount_flags: &[String]) -> Result<()> {
        let _ = (staging, target, readonly, mount_flags);
        Err(crate::error::Error::Unimplemented("publish_filesystem".into()))
    }

    /// Bind-mounts the device node onto `target` (created as a file), read-only when asked.
    /// Idempotent.
    pub async fn publish_block(&self, device: &Path, target: &Path, readonly: bool) -> Result<()> {
        let _ = (device, target, readonly);
        Err(crate::error::Error::Unimplemented("publish_block".into()))
    }

    /// Unmounts `target` and removes it (idempotent).
    pub async fn unpublish(&self, target: &Path) -> Result<()> {
        let _ = target;
        Err(crate::error::Error::Unimplemented("unpublish".into()))
    }

    /// Grows the filesystem mounted at `mount_path` (on `device`) to fill the device, online.
    /// Returns the new filesystem size in bytes.
    pub async fn expand_filesystem(&self, device: &Path, mount_path: &Path) -> Result<u64> {
        let _ = (device, mount_path);
        Err(crate::error::Error::Unimplemented("expand_filesystem".into()))
    }

    /// Whether `path` is a mount point (per `/proc/self/mountinfo`).
    pub fn is_mounted(&self, path: &Path) -> Result<bool> {
        let _ = path;
        Err(crate::error::Error::Unimplemented("is_mounted".into()))
    }

    /// Usage of the filesystem at `path` (statvfs), or of the block device at `path`.
    pub fn stats(&self, path: &Path) -> Result<Stats> {
        let _ = path;
        Err(crate::error::Error::Unimplemented("stats".into()))
    }
}
