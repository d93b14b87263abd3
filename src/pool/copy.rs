//! The last part of the create-from-source flow, shared by the block-backed pools: a copy
//! (an LVM thin snapshot, a ZFS clone, a copied image) is grown to the requested size, its
//! filesystem gets a new UUID so it mounts beside its source, and only then is it marked
//! finished. Until that mark a retried create finds it unfinished and runs [`finish`] again,
//! so every step is safe to repeat. What differs per kind (how to grow, where the device is,
//! what the mark is) is the [`Copy`] a pool implements.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::error::Result;
use crate::exec::Exec;

/// A copy made by a pool and not marked finished yet: its kind-specific steps.
#[async_trait]
pub trait Copy: Send + Sync {
    /// Grows it to at least `capacity` bytes (nothing when it already is that large).
    async fn grow_to(&self, capacity: u64) -> Result<()>;
    /// The block device or image holding it, made ready (LVM activates it); `None` when it has
    /// none of its own (a ZFS dataset: its filesystem is ZFS itself). `filesystem` says whether
    /// its filesystem is about to get a new UUID (a pool need not wait for a device that no one
    /// reads now).
    async fn device(&self, filesystem: bool) -> Result<Option<PathBuf>>;
    /// Marks it finished (the pending mark dropped, or the image committed by the caller).
    async fn mark_finished(&self) -> Result<()>;
}

/// Finishes `copy`: grows it to `capacity`, gives the filesystem of a filesystem volume a new
/// UUID (XFS refuses to mount two filesystems with one UUID, and by-uuid links confuse them),
/// then marks it finished. A raw block volume's content is the user's business and is left as
/// copied. Every step is safe to repeat after a crash.
pub async fn finish(exec: &dyn Exec, copy: &dyn Copy, capacity: u64, block: bool) -> Result<()> {
    copy.grow_to(capacity).await?;
    let device = copy.device(!block).await?;
    if let Some(device) = device.filter(|_| !block) {
        crate::node::format::regenerate_uuid(exec, &device).await?;
    }
    copy.mark_finished().await
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::exec::{FakeExec, Reply};

    /// A copy recording the steps run on it.
    struct Recorded {
        steps: Mutex<Vec<String>>,
        device: Option<PathBuf>,
        fail_grow: bool,
    }

    #[async_trait]
    impl Copy for Recorded {
        async fn grow_to(&self, capacity: u64) -> Result<()> {
            self.steps.lock().unwrap().push(format!("grow {capacity}"));
            if self.fail_grow {
                return Err(crate::error::Error::ResourceExhausted("no room to grow".into()));
            }
            Ok(())
        }
        async fn device(&self, filesystem: bool) -> Result<Option<PathBuf>> {
            self.steps.lock().unwrap().push(format!("device {filesystem}"));
            Ok(self.device.clone())
        }
        async fn mark_finished(&self) -> Result<()> {
            self.steps.lock().unwrap().push("finished".into());
            Ok(())
        }
    }

    #[tokio::test]
    async fn grow_then_new_uuid_then_the_mark() {
        struct Case {
            name: &'static str,
            has_device: bool,
            block: bool,
            want_steps: &'static [&'static str],
            want_probe: bool,
        }
        let cases = [
            Case {
                name: "filesystem on a device",
                has_device: true,
                block: false,
                want_steps: &["grow 7", "device true", "finished"],
                want_probe: true,
            },
            Case {
                name: "raw block",
                has_device: true,
                block: true,
                want_steps: &["grow 7", "device false", "finished"],
                want_probe: false,
            },
            Case {
                name: "no device (dataset)",
                has_device: false,
                block: false,
                want_steps: &["grow 7", "device true", "finished"],
                want_probe: false,
            },
        ];
        let image = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(image.path(), vec![0u8; 4096]).unwrap();
        for c in cases {
            let exec = FakeExec::new();
            // Blank: nothing to give a new UUID, but the probe shows the step ran.
            exec.on("blkid", vec![Reply::Fail(2, String::new())]);
            let copy = Recorded { steps: Mutex::default(), device: c.has_device.then(|| image.path().to_owned()), fail_grow: false };
            finish(&exec, &copy, 7, c.block).await.unwrap();
            assert_eq!(*copy.steps.lock().unwrap(), c.want_steps, "{}", c.name);
            let probed = exec.lines().contains(&format!("blkid -p -o export {}", image.path().display()));
            assert_eq!(probed, c.want_probe, "{}: {:?}", c.name, exec.lines());
        }
    }

    #[tokio::test]
    async fn a_failed_step_leaves_the_copy_unfinished() {
        let exec = FakeExec::new();
        let copy = Recorded { steps: Mutex::default(), device: Some("/dev/x".into()), fail_grow: true };
        let err = finish(&exec, &copy, 7, false).await.unwrap_err();
        assert!(matches!(err, crate::error::Error::ResourceExhausted(_)), "{err}");
        assert_eq!(*copy.steps.lock().unwrap(), ["grow 7"], "no UUID change and no mark after a failed grow");
        assert!(exec.lines().is_empty());
    }
}
