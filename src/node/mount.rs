//! The [`Mounter`] trait (mount, bind, unmount, list mounts), its real implementation over the
//! `mount`/`umount` binaries through [`crate::exec::Exec`], and a recording fake.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::exec::{Cmd, Exec};
use crate::node::mountinfo::{self, MountInfo};

/// Mount operations.
#[async_trait]
pub trait Mounter: Send + Sync {
    /// `mount -t fs_type -o options source target` (`fs_type` empty: let mount detect).
    async fn mount(&self, source: &str, target: &Path, fs_type: &str, options: &[String]) -> Result<()>;
    /// Bind-mounts `source` onto `target`; when `options` contains `ro`, the bind is made
    /// read-only (bind, then remount `bind,ro`, since the kernel ignores `ro` on the first call).
    /// Only per-mount flags ([`PER_MOUNT_FLAGS`]) apply to a bind; other options are ignored.
    async fn bind(&self, source: &Path, target: &Path, options: &[String]) -> Result<()>;
    /// Unmounts `target` (one layer). When nothing is mounted at `target` the answer is
    /// [`Error::NotFound`], so callers can tell "already gone" from a failure.
    async fn unmount(&self, target: &Path) -> Result<()>;
    /// The current mount table of this process (`/proc/self/mountinfo`).
    fn mounts(&self) -> Result<Vec<MountInfo>>;
}

/// Options that belong to a mount rather than to the filesystem, so a bind mount honours them
/// (through a remount). Filesystem options such as `discard` only mean something at stage time.
pub const PER_MOUNT_FLAGS: [&str; 17] = [
    "ro",
    "rw",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "noatime",
    "atime",
    "nodiratime",
    "diratime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "nosymfollow",
];

/// Mounting can wait on a network server (NFS); a hung mount must not hold the request forever.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);

/// `umount`'s exit code for "mount failure", which includes "not mounted".
const UMOUNT_FAILURE: i32 = 32;

/// The options of `options` that apply to a bind mount.
pub fn bind_flags(options: &[String]) -> Vec<String> {
    options.iter().filter(|o| PER_MOUNT_FLAGS.contains(&o.as_str())).cloned().collect()
}

/// Mounts with the util-linux `mount` and `umount` binaries.
#[derive(Clone)]
pub struct RealMounter {
    /// Runs `mount` and `umount`.
    pub exec: Arc<dyn Exec>,
}

impl RealMounter {
    /// A mounter over `exec`.
    pub fn new(exec: Arc<dyn Exec>) -> Self {
        RealMounter { exec }
    }
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[async_trait]
impl Mounter for RealMounter {
    async fn mount(&self, source: &str, target: &Path, fs_type: &str, options: &[String]) -> Result<()> {
        let mut cmd = Cmd::new("mount");
        if !fs_type.is_empty() {
            cmd = cmd.args(["-t", fs_type]);
        }
        if !options.is_empty() {
            cmd = cmd.arg("-o").arg(options.join(","));
        }
        // `--` so that a source starting with `-` can never be read as an option.
        let cmd = cmd.arg("--").arg(source).arg(path_arg(target)).timeout(MOUNT_TIMEOUT);
        self.exec.run(cmd).await.map_err(|e| Error::exec(format!("mounting {source} at {}", target.display()), e))?;
        Ok(())
    }

    async fn bind(&self, source: &Path, target: &Path, options: &[String]) -> Result<()> {
        let cmd = Cmd::new("mount").args(["--bind", "--"]).arg(path_arg(source)).arg(path_arg(target)).timeout(MOUNT_TIMEOUT);
        self.exec.run(cmd).await.map_err(|e| Error::exec(format!("bind-mounting {} at {}", source.display(), target.display()), e))?;
        let flags = bind_flags(options);
        if flags.is_empty() {
            return Ok(());
        }
        let opts = format!("remount,bind,{}", flags.join(","));
        let cmd = Cmd::new("mount").args(["-o", &opts, "--"]).arg(path_arg(target)).timeout(MOUNT_TIMEOUT);
        if let Err(e) = self.exec.run(cmd).await {
            // A bind left without its flags (rw where ro was asked) must not stay behind.
            if let Err(undo) = self.unmount(target).await {
                tracing::warn!(target = %target.display(), "could not undo a bind whose remount failed: {undo}");
            }
            return Err(Error::exec(format!("applying {} to the bind mount at {}", flags.join(","), target.display()), e));
        }
        Ok(())
    }

    async fn unmount(&self, target: &Path) -> Result<()> {
        let cmd = Cmd::new("umount").arg(path_arg(target)).timeout(MOUNT_TIMEOUT);
        match self.exec.run(cmd).await {
            Ok(_) => Ok(()),
            // umount says "not mounted" or "no mount point specified" with the generic exit 32;
            // the mount table, not the message, decides whether that means "already gone".
            Err(e) if e.code() == Some(UMOUNT_FAILURE) && mountinfo::top_at(&self.mounts()?, target).is_none() => {
                Err(Error::NotFound(format!("nothing is mounted at {}", target.display())))
            }
            Err(e) => Err(Error::exec(format!("unmounting {}", target.display()), e)),
        }
    }

    fn mounts(&self) -> Result<Vec<MountInfo>> {
        mountinfo::read()
    }
}

/// What a [`FakeMounter`] was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountCall {
    /// [`Mounter::mount`].
    Mount {
        /// The source.
        source: String,
        /// The target.
        target: PathBuf,
        /// The filesystem type.
        fs_type: String,
        /// The options.
        options: Vec<String>,
    },
    /// [`Mounter::bind`].
    Bind {
        /// The source.
        source: PathBuf,
        /// The target.
        target: PathBuf,
        /// The options.
        options: Vec<String>,
    },
    /// [`Mounter::unmount`].
    Unmount {
        /// The target.
        target: PathBuf,
    },
}

#[derive(Debug, Default)]
struct FakeState {
    calls: Vec<MountCall>,
    table: Vec<MountInfo>,
    next_id: u32,
    fail: Vec<(String, String)>,
}

/// A recording fake with a simulated mount table: mounts and binds add lines that
/// [`Mounter::mounts`] then returns, unmounts remove the topmost line at the target. Binds copy
/// the device, source and type of the mount holding the source, as the kernel shows them.
#[derive(Debug, Default)]
pub struct FakeMounter {
    state: Mutex<FakeState>,
}

impl FakeMounter {
    /// A fake with an empty table.
    pub fn new() -> Self {
        Self::default()
    }
    /// Every call so far, in order (failed ones included).
    pub fn calls(&self) -> Vec<MountCall> {
        self.state.lock().unwrap().calls.clone()
    }
    /// Adds a line to the simulated table, as if something else had mounted it.
    pub fn add_mount(&self, source: &str, target: &Path, fs_type: &str, options: &[&str]) {
        let mut s = self.state.lock().unwrap();
        let id = s.alloc_id();
        s.table.push(MountInfo {
            id,
            parent: 1,
            major_minor: format!("0:{id}"),
            root: "/".into(),
            mount_point: target.to_owned(),
            mount_options: options.iter().map(|o| o.to_string()).collect(),
            fs_type: fs_type.to_owned(),
            source: source.to_owned(),
            super_options: vec!["rw".into()],
        });
    }
    /// Adds a complete line to the simulated table (to model odd states: read-only
    /// superblocks, foreign mounts).
    pub fn add_line(&self, line: MountInfo) {
        self.state.lock().unwrap().table.push(line);
    }
    /// Makes the next call of `op` (`"mount"`, `"bind"`, `"unmount"`) fail as a command that
    /// exited 32 with `message` on stderr. Several calls queue several failures.
    pub fn fail_next(&self, op: &str, message: &str) {
        self.state.lock().unwrap().fail.push((op.to_owned(), message.to_owned()));
    }
}

impl FakeState {
    fn alloc_id(&mut self) -> u32 {
        self.next_id += 1;
        100 + self.next_id
    }
    /// A queued failure of `op`, shaped like the real mounter's: the command failed with exit 32.
    fn take_failure(&mut self, op: &str) -> Option<Error> {
        let i = self.fail.iter().position(|(o, _)| o == op)?;
        let stderr = self.fail.remove(i).1;
        Some(Error::exec(format!("fake {op}"), crate::exec::ExecError::Failed { cmd: op.into(), code: 32, stdout: String::new(), stderr }))
    }
}

#[async_trait]
impl Mounter for FakeMounter {
    async fn mount(&self, source: &str, target: &Path, fs_type: &str, options: &[String]) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(MountCall::Mount { source: source.into(), target: target.into(), fs_type: fs_type.into(), options: options.to_vec() });
        if let Some(e) = s.take_failure("mount") {
            return Err(e);
        }
        let id = s.alloc_id();
        let ro = options.iter().any(|o| o == "ro");
        s.table.push(MountInfo {
            id,
            parent: 1,
            major_minor: format!("0:{id}"),
            root: "/".into(),
            mount_point: target.into(),
            mount_options: vec![if ro { "ro" } else { "rw" }.into()],
            fs_type: fs_type.into(),
            source: source.into(),
            super_options: vec![if ro { "ro" } else { "rw" }.into()],
        });
        Ok(())
    }

    async fn bind(&self, source: &Path, target: &Path, options: &[String]) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(MountCall::Bind { source: source.into(), target: target.into(), options: options.to_vec() });
        if let Some(e) = s.take_failure("bind") {
            return Err(e);
        }
        // The mount that holds `source`: the longest mount point that is a prefix of it.
        let holder = s.table.iter().filter(|m| source.starts_with(&m.mount_point)).max_by_key(|m| m.mount_point.as_os_str().len()).cloned();
        let id = s.alloc_id();
        let mut line = match holder {
            Some(h) => {
                let rel = source.strip_prefix(&h.mount_point).unwrap_or(Path::new(""));
                MountInfo { id, root: h.root.join(rel), mount_point: target.into(), ..h }
            }
            None => MountInfo {
                id,
                parent: 1,
                major_minor: "0:6".into(),
                root: source.into(),
                mount_point: target.into(),
                mount_options: vec![],
                fs_type: "none".into(),
                source: source.to_string_lossy().into_owned(),
                super_options: vec!["rw".into()],
            },
        };
        let flags = bind_flags(options);
        let ro = flags.iter().any(|o| o == "ro");
        line.mount_options =
            std::iter::once(if ro { "ro" } else { "rw" }.to_owned()).chain(flags.into_iter().filter(|f| f != "ro" && f != "rw")).collect();
        s.table.push(line);
        Ok(())
    }

    async fn unmount(&self, target: &Path) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(MountCall::Unmount { target: target.into() });
        if let Some(e) = s.take_failure("unmount") {
            return Err(e);
        }
        match s.table.iter().rposition(|m| m.mount_point == target) {
            Some(i) => {
                s.table.remove(i);
                Ok(())
            }
            None => Err(Error::NotFound(format!("nothing is mounted at {}", target.display()))),
        }
    }

    fn mounts(&self) -> Result<Vec<MountInfo>> {
        Ok(self.state.lock().unwrap().table.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{FakeExec, Reply};

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn real_mounter_argv() {
        struct Case {
            name: &'static str,
            source: &'static str,
            fs_type: &'static str,
            options: &'static [&'static str],
            want: &'static str,
        }
        let cases = [
            Case {
                name: "typed with options",
                source: "/dev/loop3",
                fs_type: "ext4",
                options: &["noatime", "discard"],
                want: "mount -t ext4 -o noatime,discard -- /dev/loop3 /t",
            },
            Case { name: "no type, no options", source: "tank/v", fs_type: "", options: &[], want: "mount -- tank/v /t" },
            Case {
                name: "nfs",
                source: "srv:/export/v",
                fs_type: "nfs",
                options: &["vers=4.2"],
                want: "mount -t nfs -o vers=4.2 -- srv:/export/v /t",
            },
        ];
        for c in cases {
            let exec = Arc::new(FakeExec::new());
            RealMounter::new(exec.clone()).mount(c.source, Path::new("/t"), c.fs_type, &strings(c.options)).await.unwrap();
            assert_eq!(exec.lines(), [c.want], "{}", c.name);
        }
    }

    #[tokio::test]
    async fn real_bind_remounts_only_for_per_mount_flags() {
        struct Case {
            name: &'static str,
            options: &'static [&'static str],
            want: &'static [&'static str],
        }
        let cases = [
            Case { name: "plain", options: &[], want: &["mount --bind -- /s /t"] },
            Case { name: "fs options only", options: &["discard"], want: &["mount --bind -- /s /t"] },
            Case { name: "read-only", options: &["ro"], want: &["mount --bind -- /s /t", "mount -o remount,bind,ro -- /t"] },
            Case {
                name: "ro and flags",
                options: &["nosuid", "discard", "ro", "noexec"],
                want: &["mount --bind -- /s /t", "mount -o remount,bind,nosuid,ro,noexec -- /t"],
            },
        ];
        for c in cases {
            let exec = Arc::new(FakeExec::new());
            RealMounter::new(exec.clone()).bind(Path::new("/s"), Path::new("/t"), &strings(c.options)).await.unwrap();
            assert_eq!(exec.lines(), c.want, "{}", c.name);
        }
    }

    #[tokio::test]
    async fn real_bind_undoes_the_bind_when_remount_fails() {
        let exec = Arc::new(FakeExec::new());
        exec.on("mount -o", vec![Reply::Fail(32, "mount: /t: permission denied.".into())]);
        let err = RealMounter::new(exec.clone()).bind(Path::new("/s"), Path::new("/t"), &strings(&["ro"])).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{err}");
        assert_eq!(exec.lines(), ["mount --bind -- /s /t", "mount -o remount,bind,ro -- /t", "umount /t"]);
    }

    #[tokio::test]
    async fn real_unmount_classifies_not_mounted() {
        let exec = Arc::new(FakeExec::new());
        exec.on("umount", vec![Reply::Fail(32, "umount: /holdfast-not-mounted: not mounted.".into())]);
        let err = RealMounter::new(exec.clone()).unmount(Path::new("/holdfast-not-mounted")).await.unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        // "/" is mounted, so a failure there is a real failure, whatever its message.
        let err = RealMounter::new(exec.clone()).unmount(Path::new("/")).await.unwrap_err();
        assert!(matches!(err, Error::Exec { .. }), "{err}");
        exec.on("umount", vec![Reply::Fail(16, "cannot write".into())]);
        let err = RealMounter::new(exec.clone()).unmount(Path::new("/holdfast-not-mounted")).await.unwrap_err();
        assert!(matches!(err, Error::Exec { .. }), "{err}");
    }

    #[tokio::test]
    async fn fake_simulates_the_table() {
        let m = FakeMounter::new();
        m.mount("/dev/loop3", Path::new("/stage"), "ext4", &[]).await.unwrap();
        m.bind(Path::new("/stage/sub"), Path::new("/pub"), &strings(&["ro", "discard"])).await.unwrap();
        m.bind(Path::new("/dev/loop4"), Path::new("/blk"), &[]).await.unwrap();
        let t = m.mounts().unwrap();
        let pubm = mountinfo::top_at(&t, Path::new("/pub")).unwrap();
        assert_eq!((pubm.source.as_str(), pubm.fs_type.as_str(), pubm.root.as_path()), ("/dev/loop3", "ext4", Path::new("/sub")));
        assert_eq!(pubm.mount_options, ["ro"]);
        assert_eq!(pubm.major_minor, mountinfo::top_at(&t, Path::new("/stage")).unwrap().major_minor);
        assert_eq!(mountinfo::top_at(&t, Path::new("/blk")).unwrap().root, Path::new("/dev/loop4"));

        m.unmount(Path::new("/pub")).await.unwrap();
        assert!(matches!(m.unmount(Path::new("/pub")).await, Err(Error::NotFound(_))));
        m.fail_next("mount", "boom");
        assert!(m.mount("x", Path::new("/y"), "", &[]).await.is_err());
        assert!(m.mount("x", Path::new("/y"), "", &[]).await.is_ok());
        assert_eq!(m.calls().len(), 7);
        assert_eq!(m.calls()[3], MountCall::Unmount { target: "/pub".into() });
    }
}
