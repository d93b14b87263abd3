//! Filesystems on block devices: probe for signatures with `blkid`, create with `mkfs.*` only on
//! a blank device, grow online, give a copy a new UUID.

use std::path::Path;

use crate::error::{Error, Result};
use crate::exec::Exec;

/// Filesystems holdfast creates on block devices.
pub const SUPPORTED_FS: [&str; 3] = ["ext4", "xfs", "btrfs"];

/// What `blkid -p` found on a device or image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// `TYPE` (filesystem, LVM PV, swap…) or `PTTYPE` (partition table) as blkid names it.
    pub kind: String,
    /// The filesystem UUID, when it has one.
    pub uuid: Option<String>,
}

/// Probes `path` (device or image file) for any signature; `None` means blank.
pub async fn probe(exec: &dyn Exec, path: &Path) -> Result<Option<Signature>> {
    let _ = (exec, path);
    Err(Error::Unimplemented("probe".into()))
}

/// Creates `fs_type` on a device that [`probe`] found blank.
pub async fn mkfs(exec: &dyn Exec, device: &Path, fs_type: &str) -> Result<()> {
    let _ = (exec, device, fs_type);
    Err(Error::Unimplemented("mkfs".into()))
}

/// Grows the `fs_type` filesystem on `device`, mounted at `mount_path`, to fill the device.
pub async fn grow(exec: &dyn Exec, fs_type: &str, device: &Path, mount_path: &Path) -> Result<()> {
    let _ = (exec, fs_type, device, mount_path);
    Err(Error::Unimplemented("grow".into()))
}

/// Gives the (unmounted) filesystem on `path` (device or image file) a new random UUID, so a
/// copy can be mounted beside its source. A blank `path` is left alone.
pub async fn regenerate_uuid(exec: &dyn Exec, path: &Path) -> Result<()> {
    let _ = (exec, path);
    Err(Error::Unimplemented("regenerate_uuid".into()))
}
