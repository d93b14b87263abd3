//! Loop devices for `file` pool volumes, through `losetup` (JSON output): attach a backing file
//! (reusing an existing attachment), find the devices of a file, refresh capacity, detach.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::exec::Exec;

/// Attaches `file` to a loop device, or returns the device it is already attached to.
pub async fn attach(exec: &dyn Exec, file: &Path) -> Result<PathBuf> {
    let _ = (exec, file);
    Err(Error::Unimplemented("loop attach".into()))
}

/// The loop devices `file` is attached to (usually zero or one).
pub async fn find(exec: &dyn Exec, file: &Path) -> Result<Vec<PathBuf>> {
    let _ = (exec, file);
    Err(Error::Unimplemented("loop find".into()))
}

/// Makes the loop device pick up its backing file's new size.
pub async fn refresh_capacity(exec: &dyn Exec, device: &Path) -> Result<()> {
    let _ = (exec, device);
    Err(Error::Unimplemented("loop refresh".into()))
}

/// Detaches every loop device of `file` (none attached is success).
pub async fn detach_all(exec: &dyn Exec, file: &Path) -> Result<()> {
    let _ = (exec, file);
    Err(Error::Unimplemented("loop detach".into()))
}
