//! A pure parser for `/proc/self/mountinfo` (proc(5)): one [`MountInfo`] per line, with the
//! octal escapes (`\040` for a space…) in paths decoded.

use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount id.
    pub id: u32,
    /// Parent mount id.
    pub parent: u32,
    /// `major:minor` of the device.
    pub major_minor: String,
    /// The path within the filesystem that is mounted (bind mounts: the subdirectory).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`…).
    pub mount_options: Vec<String>,
    /// Filesystem type (`ext4`, `nfs4`, `zfs`…).
    pub fs_type: String,
    /// Mount source (`/dev/loop3`, `server:/export`, `tank/ds`).
    pub source: String,
    /// Per-superblock options.
    pub super_options: Vec<String>,
}
