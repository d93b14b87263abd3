//! Room accounting of the file pool: what the pool's filesystem can still back, and the claims
//! of creations in progress.
//!
//! What the pool can still give is the free space of its filesystem, minus the configured
//! reserve, minus what its objects were promised but do not hold yet, minus what creations in
//! progress have claimed. Promised: every volume's holes (apparent size − allocated bytes; all
//! of a fresh thin volume, nothing of a thick one), plus the `shared` bytes of reflink copies of
//! thick volumes (blocks two images share, which the next write to either needs anew).
//! Snapshots are never written after they are taken, so their own holes promise nothing.

use std::io::ErrorKind;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::FilePool;
use crate::blocking::METADATA_DEADLINE;
use crate::config::format_size;
use crate::error::{Error, Result};

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

/// A pool directory that cannot be read: missing means the pool's filesystem is not there
/// (not mounted?), which is UNAVAILABLE for this pool, not an internal error.
pub(super) fn dir_error(dir: &Path, e: std::io::Error) -> Error {
    if e.kind() == ErrorKind::NotFound {
        Error::Unavailable(format!("pool directory {} is missing: is the pool's filesystem mounted?", dir.display()))
    } else {
        Error::io(format!("listing {}", dir.display()), e)
    }
}

/// Free bytes of the filesystem holding `root`, for an unprivileged writer.
pub(super) fn free_bytes(root: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(root).map_err(|e| {
        let e: std::io::Error = e.into();
        if e.kind() == ErrorKind::NotFound {
            dir_error(root, e)
        } else {
            Error::io(format!("statvfs of pool directory {}", root.display()), e)
        }
    })?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

impl FilePool {
    /// Bytes the pool's objects were promised but do not hold (a blocking call).
    #[cfg(test)]
    pub(super) fn promised(&self) -> Result<u64> {
        disk::promised_under(&self.root)
    }

    /// Free space and promises, measured off the async workers.
    async fn measure(&self) -> Result<(u64, u64)> {
        let ledger = self.ledger();
        self.blocking(format!("measuring the room in {}", self.root.display()), METADATA_DEADLINE, move || ledger.measure()).await
    }

    /// What one new volume could get now.
    pub(super) async fn room(&self) -> Result<u64> {
        let ledger = self.ledger();
        self.blocking(format!("measuring the room in {}", self.root.display()), METADATA_DEADLINE, move || ledger.room()).await
    }

    /// Claims `bytes` for `what`, or answers RESOURCE_EXHAUSTED saying what is free.
    pub(super) async fn claim(&self, bytes: u64, what: &str) -> Result<Claim> {
        // Claims are serialised (an async lock: the measurement is a blocking call), so two
        // creations never both count the same free bytes.
        let _one_at_a_time = self.claiming.lock().await;
        let (free, promised) = self.measure().await?;
        self.ledger().grant(free, promised, bytes, what)
    }

    /// What a blocking call needs to claim room ([`Ledger::claim_blocking`]).
    pub(super) fn ledger(&self) -> Ledger {
        Ledger {
            pool: self.name.clone(),
            root: self.root.clone(),
            reserve: self.reserve,
            in_flight: self.in_flight.clone(),
            claiming: self.claiming.clone(),
            index: self.index.clone(),
        }
    }
}

/// The pool's room accounting, for a blocking call that claims room itself (issue 14: a create
/// in one blocking call, [`FilePool::create_surveyed`]): the same lock, measure and claims as
/// [`FilePool::claim`].
#[derive(Clone)]
pub(super) struct Ledger {
    pool: String,
    root: std::path::PathBuf,
    reserve: u64,
    in_flight: Arc<Mutex<u64>>,
    claiming: Arc<tokio::sync::Mutex<()>>,
    index: super::index::Index,
}

impl Ledger {
    /// Free bytes and what is promised, measured now (a blocking call).
    pub(super) fn measure(&self) -> Result<(u64, u64)> {
        Ok((free_bytes(&self.root)?, self.index.promised()?))
    }

    /// What one new volume could get now (a blocking call), as [`FilePool::room`].
    pub(super) fn room(&self) -> Result<u64> {
        let (free, promised) = self.measure()?;
        let in_flight = *self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        Ok(available(free, self.reserve, promised, in_flight))
    }

    /// As [`FilePool::claim`], on a blocking thread: it waits for the claim lock itself.
    pub(super) fn claim_blocking(&self, bytes: u64, what: &str) -> Result<Claim> {
        let _one_at_a_time = self.claiming.blocking_lock();
        let (free, promised) = self.measure()?;
        self.grant(free, promised, bytes, what)
    }

    /// Claims `bytes` against the room measured (under the claim lock).
    fn grant(&self, free: u64, promised: u64, bytes: u64, what: &str) -> Result<Claim> {
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let avail = available(free, self.reserve, promised, *g);
        if bytes > avail {
            return Err(Error::ResourceExhausted(format!(
                "file pool {:?} cannot hold {what}: {} requested, {} available ({} of {} kept in reserve)",
                self.pool,
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

/// The promises as the files say them: the truth the index keeps in memory (tests compare).
#[cfg(test)]
pub(super) mod disk {
    use std::fs;
    use std::io::ErrorKind;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use super::super::{Kind, SnapshotRecord, VolumeRecord, read_meta};
    use super::dir_error;
    use crate::error::{Context, Error, Result};
    use crate::volume_id::valid_local_name;

    /// Bytes the pool's objects under `root` were promised but do not hold (see the module doc), as
    /// the files say: the truth the index ([`super::index`]) keeps in memory.
    pub(in crate::pool::file) fn promised_under(root: &Path) -> Result<u64> {
        let mut total = 0u64;
        for kind in [Kind::Volume, Kind::Snapshot] {
            let dir = root.join(kind.dir());
            for entry in fs::read_dir(&dir).map_err(|e| dir_error(&dir, e))? {
                let entry = entry.context(|| format!("listing {}", dir.display()))?;
                let name = entry.file_name();
                let Some(local) = name.to_str().and_then(|n| n.strip_suffix(".json")).filter(|l| valid_local_name(l)) else { continue };
                // An image without metadata is a leftover: it promises nothing.
                let shared = match kind {
                    Kind::Volume => read_meta::<VolumeRecord>(&entry.path()).ok().flatten().map(|r| r.shared),
                    Kind::Snapshot => read_meta::<SnapshotRecord>(&entry.path()).ok().flatten().map(|r| r.shared),
                };
                total = total.saturating_add(shared.unwrap_or(0));
                if kind == Kind::Snapshot {
                    continue;
                }
                let img = dir.join(format!("{local}.img"));
                match fs::metadata(&img) {
                    Ok(m) => total = total.saturating_add(m.len().saturating_sub(m.blocks() * 512)),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(format!("inspecting {}", img.display()), e)),
                }
            }
        }
        Ok(total)
    }
}
