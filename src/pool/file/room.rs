//! Room accounting of the file pool: what the pool's filesystem can still back, and the claims
//! of creations in progress.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use super::{FilePool, Kind};
use crate::config::format_size;
use crate::error::{Context, Error, Result};
use crate::volume_id::valid_local_name;

/// Bytes claimed from the pool until the object is committed (then its file accounts for them).
pub(super) struct Claim {
    in_flight: Arc<Mutex<u64>>,
    bytes: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *g = g.saturating_sub(self.bytes);
    }
}

/// What the pool can still back: free space minus reserve, promised holes and claims.
pub(super) fn available(free: u64, reserve: u64, promised: u64, in_flight: u64) -> u64 {
    free.saturating_sub(reserve).saturating_sub(promised).saturating_sub(in_flight)
}

impl FilePool {
    /// Bytes the volumes' sparse files have promised but not yet taken.
    pub(super) fn promised(&self) -> Result<u64> {
        let dir = self.root.join(Kind::Volume.dir());
        let mut total = 0u64;
        for entry in fs::read_dir(&dir).context(|| format!("listing {}", dir.display()))? {
            let entry = entry.context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            let Some(local) = name.to_str().and_then(|n| n.strip_suffix(".img")).filter(|l| valid_local_name(l)) else { continue };
            // An image without metadata is a leftover: its holes promise nothing.
            if !dir.join(format!("{local}.json")).exists() {
                continue;
            }
            match entry.metadata() {
                Ok(m) => total = total.saturating_add(m.len().saturating_sub(m.blocks() * 512)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("inspecting {}", entry.path().display()), e)),
            }
        }
        Ok(total)
    }

    /// Free bytes of the pool's filesystem for an unprivileged writer.
    pub(super) fn free(&self) -> Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| Error::io(format!("statvfs of pool directory {}", self.root.display()), e.into()))?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    /// What one new volume could get now.
    pub(super) fn available_now(&self, in_flight: u64) -> Result<u64> {
        Ok(available(self.free()?, self.reserve, self.promised()?, in_flight))
    }

    /// Claims `bytes` for `what`, or answers RESOURCE_EXHAUSTED saying what is free.
    pub(super) fn claim(&self, bytes: u64, what: &str) -> Result<Claim> {
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let avail = self.available_now(*g)?;
        if bytes > avail {
            return Err(Error::ResourceExhausted(format!(
                "file pool {:?} cannot hold {what}: {} requested, {} available ({} of {} kept in reserve)",
                self.name,
                format_size(bytes),
                format_size(avail),
                format_size(self.reserve),
                self.root.display()
            )));
        }
        *g += bytes;
        Ok(Claim { in_flight: self.in_flight.clone(), bytes })
    }
}
