//! The [`Mounter`] trait (mount, bind, unmount, list mounts), its real implementation over the
//! `mount`/`umount` binaries through [`crate::exec::Exec`], and a recording fake.

use std::path::Path;

use async_trait::async_trait;

use crate::error::Result;
use crate::node::mountinfo::MountInfo;

/// Mount operations.
#[async_trait]
pub trait Mounter: Send + Sync {
    /// `mount -t fs_type -o options source target` (`fs_type` empty: let mount detect).
    async fn mount(&self, source: &str, target: &Path, fs_type: &str, options: &[String]) -> Result<()>;
    /// Bind-mounts `source` onto `target`; when `options` contains `ro`, the bind is made
    /// read-only (bind, then remount `bind,ro`, since the kernel ignores `ro` on the first call).
    async fn bind(&self, source: &Path, target: &Path, options: &[String]) -> Result<()>;
    /// Unmounts `target` (one layer).
    async fn unmount(&self, target: &Path) -> Result<()>;
    /// The current mount table of this process (`/proc/self/mountinfo`).
    fn mounts(&self) -> Result<Vec<MountInfo>>;
}
