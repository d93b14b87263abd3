//! The block copy behind thick-pool restores and clones: a new thick LV gets the content of a
//! copy-on-write snapshot LV, block by block. Sparse-aware: a run of zero blocks in the source
//! is not written from userspace but zeroed on the target by the kernel (`fallocate`
//! PUNCH_HOLE, which may unmap the blocks on storage that can, else ZERO_RANGE, else plain
//! zero writes), so an empty volume costs reads, not writes. Everything of the target past the
//! source's size is zeroed too: a thick LV's extents may hold a deleted volume's data, which a
//! copy must never hand out. Blocking: run it off the async workers.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{FallocateFlags, fallocate};

use crate::error::{Context, Error, Result};

/// Bytes read and compared at a time.
const CHUNK: usize = 1 << 20;

/// Test-only (debug builds): milliseconds to sleep after each chunk, so a test can hold a copy
/// running long enough to retry, time out or kill the driver meanwhile. Release builds ignore it.
pub const TEST_DELAY_ENV: &str = "HOLDFAST_TEST_BLOCK_COPY_DELAY_MS";

fn test_delay() -> Option<std::time::Duration> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var(TEST_DELAY_ENV).ok()?.parse::<u64>().ok().map(std::time::Duration::from_millis)
}

/// How far a copy is: bytes of the target done, of its total.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// (bytes done, bytes in all).
    pub fn get(&self) -> (u64, u64) {
        (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }
}

/// What one copy wrote: bytes copied as data and bytes zeroed by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Copied {
    /// Bytes of the source that held data and were written.
    pub written: u64,
    /// Bytes of the target zeroed without writing (zero runs of the source and the tail).
    pub zeroed: u64,
}

fn open_block(path: &Path, write: bool) -> Result<File> {
    let f = OpenOptions::new().read(!write).write(write).open(path).context(|| format!("opening {}", path.display()))?;
    let meta = f.metadata().context(|| format!("inspecting {}", path.display()))?;
    // Only ever block devices (LVs): a path that turned into something else is not written.
    if !meta.file_type().is_block_device() {
        return Err(Error::Internal(format!("{} is not a block device", path.display())));
    }
    Ok(f)
}

fn device_len(f: &File, path: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::End(0)).context(|| format!("sizing {}", path.display()))
}

/// Zeroes `len` bytes of `dst` at `off`: unmapped where the device can, else zeroed in the
/// kernel, else written.
fn zero(dst: &File, path: &Path, off: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (o, l) = (off as i64, len as i64);
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if fallocate(dst, punch, o, l).is_ok() || fallocate(dst, FallocateFlags::FALLOC_FL_ZERO_RANGE, o, l).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; CHUNK];
    let mut at = off;
    while at < off + len {
        let n = (off + len - at).min(CHUNK as u64) as usize;
        dst.write_all_at(&zeros[..n], at).context(|| format!("zeroing {} at {at}", path.display()))?;
        at += n as u64;
    }
    Ok(())
}

/// Copies the whole of block device `src` onto block device `dst` (at least as large), then
/// zeroes the rest of `dst` and flushes it. Safe to run again from the start after a crash.
pub fn copy(src: &Path, dst: &Path, progress: &Progress) -> Result<Copied> {
    let s = open_block(src, false)?;
    let d = open_block(dst, true)?;
    let (src_len, dst_len) = (device_len(&s, src)?, device_len(&d, dst)?);
    if src_len > dst_len {
        return Err(Error::Internal(format!("{} ({src_len} bytes) does not fit on {} ({dst_len} bytes)", src.display(), dst.display())));
    }
    progress.total.store(dst_len, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    let mut buf = vec![0u8; CHUNK];
    let zeros = vec![0u8; CHUNK];
    let delay = test_delay();
    let mut copied = Copied::default();
    // A run of zero chunks not zeroed on the target yet: (offset, length).
    let mut run: Option<(u64, u64)> = None;
    let mut at = 0u64;
    while at < src_len {
        let n = (src_len - at).min(CHUNK as u64) as usize;
        s.read_exact_at(&mut buf[..n], at).context(|| format!("reading {} at {at}", src.display()))?;
        // A slice comparison is a memcmp, fast in debug builds too.
        if buf[..n] == zeros[..n] {
            run = Some(match run {
                Some((o, l)) => (o, l + n as u64),
                None => (at, n as u64),
            });
        } else {
            if let Some((o, l)) = run.take() {
                zero(&d, dst, o, l)?;
                copied.zeroed += l;
            }
            d.write_all_at(&buf[..n], at).context(|| format!("writing {} at {at}", dst.display()))?;
            copied.written += n as u64;
        }
        at += n as u64;
        progress.done.store(at, Ordering::Relaxed);
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
    }
    let (o, l) = match run {
        Some((o, l)) => (o, l + dst_len - src_len),
        None => (src_len, dst_len - src_len),
    };
    zero(&d, dst, o, l)?;
    copied.zeroed += l;
    d.sync_all().context(|| format!("flushing {}", dst.display()))?;
    progress.done.store(dst_len, Ordering::Relaxed);
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_block_devices_are_opened() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"x").unwrap();
        let err = copy(f.path(), f.path(), &Progress::default()).unwrap_err();
        assert!(err.to_string().contains("is not a block device"), "{err}");
        let err = copy(Path::new("/holdfast-no-such-device"), f.path(), &Progress::default()).unwrap_err();
        assert!(err.to_string().contains("/holdfast-no-such-device"), "{err}");
    }
}
