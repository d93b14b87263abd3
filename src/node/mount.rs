//! The [`Mounter`] trait (mount, bind, unmount, read the mount table), its real implementation
//! and a recording fake. Every target is a [`RequestPath`]: the real mounter opens it beneath
//! its root without following a symlink and mounts through that descriptor (`mount` is given
//! the opened directory as its stdin and told `/proc/self/fd/0`; binds are made in-process
//! with `open_tree` + `move_mount`), so nothing can swap the path between check and mount.
//! Every blocking syscall runs through [`crate::blocking::run`].

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rustix::fs::{AtFlags, CWD, OFlags, StatxAttributes, StatxFlags};
use rustix::mount::{MountFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags};

use crate::blocking::{self, METADATA_DEADLINE};
use crate::error::{Error, Result};
use crate::exec::{Cmd, Exec};
use crate::node::mountinfo::{self, MountInfo};
use crate::node::safepath::RequestPath;

/// What a bind mount makes visible at its target.
#[derive(Debug, Clone, Copy)]
pub enum BindSource<'a> {
    /// The root of the mount at a (staging) path, opened beneath its root with no symlink followed.
    Mount(&'a RequestPath),
    /// A device node the pool handed out (`/dev/loop3`, `/dev/vg/lv`): trusted, not a request path.
    Device(&'a Path),
}

/// Mount operations.
#[async_trait]
pub trait Mounter: Send + Sync {
    /// `mount -t fs_type -o options source target` (`fs_type` empty: let mount detect), through
    /// the opened target directory.
    async fn mount(&self, source: &str, target: &RequestPath, fs_type: &str, options: &[String]) -> Result<()>;
    /// Bind-mounts `source` onto `target`. Only per-mount flags ([`PER_MOUNT_FLAGS`]) apply to
    /// a bind; other options are ignored. With flags (`ro`), the bind is made and given its
    /// flags in a private holding directory first and only then attached at `target`, so a
    /// read-only bind is never visible read-write there.
    async fn bind(&self, source: BindSource<'_>, target: &RequestPath, options: &[String]) -> Result<()>;
    /// Unmounts the topmost mount at `target`, and only if it is still mount `mount_id` (as
    /// [`Mounter::mount_at`] found it). Nothing mounted there is [`Error::NotFound`]; a busy
    /// mount is an error whose message says "busy".
    async fn unmount(&self, target: &RequestPath, mount_id: u32) -> Result<()>;
    /// The current mount table of this process (`/proc/self/mountinfo`), read off the async workers.
    async fn mounts(&self) -> Result<Vec<MountInfo>>;
    /// The topmost mount whose mount point is `path` (what opening `path` reaches), if `path`
    /// is a mount point. Found through the opened path, so a symlink in the allowed prefix
    /// (the kernel shows canonical paths) does not matter and no symlink below it is followed.
    async fn mount_at(&self, path: &RequestPath) -> Result<Option<MountInfo>>;
}

/// Options that belong to a mount rather than to the filesystem, so a bind mount honours them.
/// Filesystem options such as `discard` only mean something at stage time.
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

/// Where the real mounter makes read-only (or otherwise flagged) binds before attaching them.
pub const DEFAULT_HOLD_DIR: &str = "/run/holdfast/binds";

/// The options of `options` that apply to a bind mount.
pub fn bind_flags(options: &[String]) -> Vec<String> {
    options.iter().filter(|o| PER_MOUNT_FLAGS.contains(&o.as_str())).cloned().collect()
}

/// The `mount(2)` flags of a bind remount with `flags` (from [`bind_flags`]).
fn remount_flags(flags: &[String]) -> MountFlags {
    let mut out = MountFlags::BIND;
    for f in flags {
        out |= match f.as_str() {
            "ro" => MountFlags::RDONLY,
            "nosuid" => MountFlags::NOSUID,
            "nodev" => MountFlags::NODEV,
            "noexec" => MountFlags::NOEXEC,
            "noatime" => MountFlags::NOATIME,
            "nodiratime" => MountFlags::NODIRATIME,
            "relatime" => MountFlags::RELATIME,
            "strictatime" => MountFlags::STRICTATIME,
            "nosymfollow" => MountFlags::NOSYMFOLLOW,
            // The positive forms are the defaults of a fresh bind.
            _ => MountFlags::empty(),
        };
    }
    out
}

/// Mounts with the util-linux `mount` binary (filesystems) and the kernel's mount API (binds).
#[derive(Clone)]
pub struct RealMounter {
    /// Runs `mount`.
    pub exec: Arc<dyn Exec>,
    /// A directory only holdfast uses, where flagged binds are prepared ([`DEFAULT_HOLD_DIR`]).
    pub hold_dir: PathBuf,
}

impl RealMounter {
    /// A mounter over `exec`, preparing flagged binds in [`DEFAULT_HOLD_DIR`].
    pub fn new(exec: Arc<dyn Exec>) -> Self {
        RealMounter { exec, hold_dir: PathBuf::from(DEFAULT_HOLD_DIR) }
    }
    /// The same, preparing flagged binds in `dir` (created 0700 when missing).
    pub fn with_hold_dir(exec: Arc<dyn Exec>, dir: &Path) -> Self {
        RealMounter { exec, hold_dir: dir.to_owned() }
    }

    /// Start-up repair: detaches the holding binds that killed drivers left (each pins its
    /// volume's filesystem, so that volume's device could not be detached until the next
    /// flagged bind swept it). Failures are logged; the driver serves anyway.
    pub async fn recover(&self) {
        let dir = self.hold_dir.clone();
        if !dir.exists() {
            return;
        }
        let what = format!("sweeping {}", dir.display());
        if let Err(e) = blocking::run("hold-dir", &what, METADATA_DEADLINE, move || sweep_hold_dir(&dir)).await {
            tracing::warn!(error = %e, "could not sweep the holding directory");
        }
    }
}

fn domain(p: &RequestPath) -> String {
    format!("path:{}", p.as_path().display())
}

fn sys(what: impl FnOnce() -> String) -> impl FnOnce(rustix::io::Errno) -> Error {
    move |e| Error::io(what(), e.into())
}

/// The mount id of what `fd` is, and whether it is the root of that mount (a mount point).
/// `AT_STATX_DONT_SYNC`: never asks a (possibly hung) NFS server.
/// A filesystem that has shut down (XFS after an error) answers statx with EIO; the kernel's
/// own view of the descriptor (`fdinfo`'s `mnt_id`, and its path compared with the mount
/// table) still tells, without asking the filesystem.
fn mount_id_of(fd: &OwnedFd) -> Result<(u64, bool)> {
    match rustix::fs::statx(fd.as_fd(), "", AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC, StatxFlags::MNT_ID) {
        Ok(st) => {
            let root =
                st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) && st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
            Ok((st.stx_mnt_id, root))
        }
        Err(_) => {
            use std::os::fd::AsRawFd;
            let raw = fd.as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))
                .map_err(|e| Error::io(format!("reading /proc/self/fdinfo/{raw}"), e))?;
            let id: u64 = info
                .lines()
                .find_map(|l| l.strip_prefix("mnt_id:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Error::Internal(format!("no mnt_id in /proc/self/fdinfo/{raw}")))?;
            let at = std::fs::read_link(crate::node::safepath::fd_path(fd))
                .map_err(|e| Error::io(format!("reading the path of descriptor {raw}"), e))?;
            let table = mountinfo::read()?;
            let root = table.iter().any(|m| u64::from(m.id) == id && m.mount_point == at);
            Ok((id, root))
        }
    }
}

fn mount_at_blocking(path: &RequestPath) -> Result<Option<MountInfo>> {
    let Some(fd) = path.open_path()? else { return Ok(None) };
    let (id, is_root) = mount_id_of(&fd)?;
    if !is_root {
        return Ok(None);
    }
    let table = mountinfo::read()?;
    Ok(table.into_iter().find(|m| u64::from(m.id) == id))
}

static HOLD_SEQ: AtomicU64 = AtomicU64::new(0);

/// The kernel's start time of process `pid` (clock ticks since boot, field 22 of
/// `/proc/<pid>/stat`): with the pid, it names one process for good, even across pid reuse (a
/// driver that is pid 1 of its container every time it starts).
fn start_time(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its closing one.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19).map(str::to_owned)
}

/// This process's prefix for its holding paths: `<pid>-<start time>`.
fn hold_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| {
        let pid = std::process::id().to_string();
        let start = start_time("self").unwrap_or_else(|| "0".into());
        format!("{pid}-{start}")
    })
}

/// Makes the holding directory (0700) and, while it is empty and no mount yet (its first use
/// since boot), a private mount of its own, so a
/// bind attached there for a moment never propagates to other mount namespaces (a host `/run`
/// is usually shared). Then clears what killed drivers left there.
fn prepare_hold_dir(hold_dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(hold_dir)
        .map_err(|e| Error::io(format!("creating {}", hold_dir.display()), e))?;
    let is_mount = std::fs::File::open(hold_dir)
        .ok()
        .and_then(|f| rustix::fs::statx(&f, "", AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC, StatxFlags::empty()).ok())
        .is_some_and(|st| {
            st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) && st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
        });
    let empty = std::fs::read_dir(hold_dir).map(|mut d| d.next().is_none()).unwrap_or(false);
    // Only while empty: binding over a directory that holds another driver's holding mount
    // would hide that mount from its owner.
    if !is_mount && empty {
        let made = rustix::mount::mount_bind(hold_dir, hold_dir)
            .and_then(|()| rustix::mount::mount_change(hold_dir, rustix::mount::MountPropagationFlags::PRIVATE));
        if let Err(e) = made {
            tracing::warn!(hold = %hold_dir.display(), "could not make the holding directory a private mount: {e}");
        }
    }
    sweep_hold_dir(hold_dir);
    Ok(())
}

/// Detaches and removes the holding paths of processes that are gone: a driver killed while a
/// bind sat there leaves a mount that pins the volume's filesystem (its device could never be
/// detached). Another live process's paths are its work in flight and stay.
fn sweep_hold_dir(hold_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(hold_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // `<pid>-<start>-<seq>`; drivers before the start time named them `<pid>-<seq>`.
        let parts: Vec<&str> = name.splitn(3, '-').collect();
        let live = match parts[..] {
            [pid, start, _] => start_time(pid).as_deref() == Some(start),
            [pid, _] => start_time(pid).is_some(),
            _ => true,
        };
        if live || !parts[0].chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let path = entry.path();
        // Holding binds are single layers; a few tries cover a bind stacked by a racing sweep.
        for _ in 0..4 {
            if rustix::mount::unmount(&path, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW).is_err() {
                break;
            }
            tracing::warn!(hold = %path.display(), "detached a holding bind left by a driver that was killed");
        }
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) { std::fs::remove_dir(&path) } else { std::fs::remove_file(&path) };
        if let Err(e) = removed {
            tracing::warn!(hold = %path.display(), "could not remove a holding path left by a killed driver: {e}");
        }
    }
}

/// Binds `source` at `target` (see [`Mounter::bind`]); runs on the blocking pool.
fn bind_blocking(source: &BindSourceOwned, target: &RequestPath, flags: &[String], hold_dir: &Path) -> Result<()> {
    let shown = || target.as_path().display().to_string();
    let Some(tfd) = target.open_path()? else {
        return Err(Error::NotFound(format!("bind target {} does not exist", shown())));
    };
    let clone_flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    let (clone, is_file) = match source {
        BindSourceOwned::Mount(rp) => {
            let Some(sfd) = rp.open_path()? else {
                return Err(Error::NotFound(format!("bind source {} does not exist", rp.as_path().display())));
            };
            let t = rustix::mount::open_tree(sfd.as_fd(), "", clone_flags | OpenTreeFlags::AT_EMPTY_PATH)
                .map_err(sys(|| format!("cloning the mount at {}", rp.as_path().display())))?;
            (t, false)
        }
        BindSourceOwned::Device(dev) => {
            let t = rustix::mount::open_tree(CWD, dev.as_path(), clone_flags).map_err(sys(|| format!("cloning {}", dev.display())))?;
            (t, true)
        }
    };
    if !flags.is_empty() && crate::crash::armed(CRASH_WRITABLE_AT_TARGET) {
        // Test only: leave what a driver that bound first and remounted read-only after left
        // when it was killed in between, a writable bind at the target.
        let _ = rustix::mount::move_mount(
            clone.as_fd(),
            "",
            tfd.as_fd(),
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        );
        crate::crash::point(CRASH_WRITABLE_AT_TARGET);
    }
    let attach = if flags.is_empty() { clone } else { flagged(clone, is_file, flags, hold_dir)? };
    rustix::mount::move_mount(
        attach.as_fd(),
        "",
        tfd.as_fd(),
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(sys(|| format!("attaching the bind mount at {}", shown())))?;
    crate::crash::point(CRASH_ATTACHED);
    Ok(())
}

/// Crash point (tests, [`crate::crash`]): a flagged bind attached in the holding directory, not
/// flagged yet.
pub const CRASH_HELD: &str = "bind-held";
/// Crash point: a bind attached at its target, before the call answers.
pub const CRASH_ATTACHED: &str = "bind-attached";
/// Crash point that first leaves a writable bind at the target (what a two-step bind left).
pub const CRASH_WRITABLE_AT_TARGET: &str = "bind-writable-at-target";

/// Gives a detached bind its per-mount flags before anyone can see it: attaches it in a
/// private holding directory, remounts it there with the flags, clones that (a clone keeps the
/// flags) and detaches the holding mount. Returns the flagged, detached clone.
///
/// The kernel's one-step way, `mount_setattr(MOUNT_ATTR_RDONLY)` on the detached clone, has no
/// safe binding in rustix (and this crate forbids `unsafe`), hence the holding directory. A
/// driver killed half-way leaves at most a holding bind there, never anything at the target;
/// the next flagged bind detaches it ([`sweep_hold_dir`]).
fn flagged(clone: OwnedFd, is_file: bool, flags: &[String], hold_dir: &Path) -> Result<OwnedFd> {
    prepare_hold_dir(hold_dir)?;
    let hold = hold_dir.join(format!("{}-{}", hold_prefix(), HOLD_SEQ.fetch_add(1, Ordering::Relaxed)));
    if is_file { std::fs::File::create(&hold).map(drop) } else { std::fs::create_dir(&hold) }
        .map_err(|e| Error::io(format!("creating {}", hold.display()), e))?;
    let result = (|| {
        rustix::mount::move_mount(clone.as_fd(), "", CWD, &hold, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
            .map_err(sys(|| format!("attaching a bind at {}", hold.display())))?;
        crate::crash::point(CRASH_HELD);
        let done = rustix::mount::mount_remount(&hold, remount_flags(flags), "")
            .map_err(sys(|| format!("applying {} to a bind at {}", flags.join(","), hold.display())))
            .and_then(|()| {
                rustix::mount::open_tree(CWD, &hold, OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC)
                    .map_err(sys(|| format!("cloning the bind at {}", hold.display())))
            });
        // Nobody uses the holding mount: detaching it cannot lose anything.
        if let Err(e) = rustix::mount::unmount(&hold, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
            tracing::warn!(hold = %hold.display(), "could not detach a holding bind: {e}");
        }
        done
    })();
    let removed = if is_file { std::fs::remove_file(&hold) } else { std::fs::remove_dir(&hold) };
    if let Err(e) = removed {
        tracing::warn!(hold = %hold.display(), "could not remove a holding path: {e}");
    }
    result
}

/// [`BindSource`] owned, to move into a blocking task.
enum BindSourceOwned {
    Mount(RequestPath),
    Device(PathBuf),
}

#[async_trait]
impl Mounter for RealMounter {
    async fn mount(&self, source: &str, target: &RequestPath, fs_type: &str, options: &[String]) -> Result<()> {
        let t = target.clone();
        let fd = blocking::run(&domain(target), &format!("opening {}", target.as_path().display()), METADATA_DEADLINE, move || {
            t.open(OFlags::PATH | OFlags::DIRECTORY)
        })
        .await??
        .ok_or_else(|| Error::NotFound(format!("mount target {} does not exist", target.as_path().display())))?;
        // --no-canonicalize: mount must not resolve /proc/self/fd/0 back into a path.
        let mut cmd = Cmd::new("mount").arg("--no-canonicalize");
        if !fs_type.is_empty() {
            cmd = cmd.args(["-t", fs_type]);
        }
        if !options.is_empty() {
            cmd = cmd.arg("-o").arg(options.join(","));
        }
        // `--` so that a source starting with `-` can never be read as an option.
        let cmd = cmd.arg("--").arg(source).arg("/proc/self/fd/0").stdin_fd(fd).timeout(MOUNT_TIMEOUT);
        self.exec.run(cmd).await.map_err(|e| Error::exec(format!("mounting {source} at {}", target.as_path().display()), e))?;
        Ok(())
    }

    async fn bind(&self, source: BindSource<'_>, target: &RequestPath, options: &[String]) -> Result<()> {
        let owned = match source {
            BindSource::Mount(p) => BindSourceOwned::Mount(p.clone()),
            BindSource::Device(d) => BindSourceOwned::Device(d.to_owned()),
        };
        let (t, flags, hold) = (target.clone(), bind_flags(options), self.hold_dir.clone());
        let what = format!("bind-mounting at {}", target.as_path().display());
        blocking::run(&domain(target), &what, MOUNT_TIMEOUT, move || bind_blocking(&owned, &t, &flags, &hold)).await?
    }

    async fn unmount(&self, target: &RequestPath, mount_id: u32) -> Result<()> {
        let t = target.clone();
        let what = format!("unmounting {}", target.as_path().display());
        blocking::run(&domain(target), &what, MOUNT_TIMEOUT, move || {
            let shown = t.as_path().display().to_string();
            let Some(fd) = t.open_path()? else { return Err(Error::NotFound(format!("nothing is mounted at {shown}"))) };
            let (id, is_root) = mount_id_of(&fd)?;
            if !is_root {
                return Err(Error::NotFound(format!("nothing is mounted at {shown}")));
            }
            if id != u64::from(mount_id) {
                return Err(Error::Aborted(format!("the mount at {shown} changed while holdfast was unmounting it; retry")));
            }
            // An open descriptor would keep the mount busy; the path was just checked to have no
            // symlink below its root, and NOFOLLOW keeps the last component from becoming one.
            drop(fd);
            rustix::mount::unmount(t.as_path(), UnmountFlags::NOFOLLOW).map_err(|e| Error::io(format!("unmounting {shown}"), e.into()))
        })
        .await?
    }

    async fn mounts(&self) -> Result<Vec<MountInfo>> {
        blocking::run("mount-table", "reading the mount table", METADATA_DEADLINE, mountinfo::read).await?
    }

    async fn mount_at(&self, path: &RequestPath) -> Result<Option<MountInfo>> {
        let p = path.clone();
        let what = format!("looking up the mount at {}", path.as_path().display());
        blocking::run(&domain(path), &what, METADATA_DEADLINE, move || mount_at_blocking(&p)).await?
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
    /// Reads of the table ([`Mounter::mounts`], [`Mounter::mount_at`]).
    reads: usize,
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
    /// How many times the table was read ([`Mounter::mounts`] and [`Mounter::mount_at`]: each
    /// is one read of `/proc/self/mountinfo` in the real one).
    pub fn table_reads(&self) -> usize {
        self.state.lock().unwrap().reads
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
    async fn mount(&self, source: &str, target: &RequestPath, fs_type: &str, options: &[String]) -> Result<()> {
        let target = target.as_path();
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

    async fn bind(&self, source: BindSource<'_>, target: &RequestPath, options: &[String]) -> Result<()> {
        let source = match source {
            BindSource::Mount(p) => p.as_path(),
            BindSource::Device(d) => d,
        };
        let target = target.as_path();
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

    async fn unmount(&self, target: &RequestPath, mount_id: u32) -> Result<()> {
        let target = target.as_path();
        let mut s = self.state.lock().unwrap();
        s.calls.push(MountCall::Unmount { target: target.into() });
        if let Some(e) = s.take_failure("unmount") {
            return Err(e);
        }
        match s.table.iter().rposition(|m| m.mount_point == target) {
            Some(i) if s.table[i].id == mount_id => {
                s.table.remove(i);
                Ok(())
            }
            Some(_) => Err(Error::Aborted(format!("the mount at {} changed while holdfast was unmounting it; retry", target.display()))),
            None => Err(Error::NotFound(format!("nothing is mounted at {}", target.display()))),
        }
    }

    async fn mounts(&self) -> Result<Vec<MountInfo>> {
        let mut s = self.state.lock().unwrap();
        s.reads += 1;
        Ok(s.table.clone())
    }

    async fn mount_at(&self, path: &RequestPath) -> Result<Option<MountInfo>> {
        let mut s = self.state.lock().unwrap();
        s.reads += 1;
        Ok(mountinfo::top_at(&s.table, path.as_path()).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn rp(p: &str) -> RequestPath {
        RequestPath::internal(Path::new(p)).unwrap()
    }

    #[tokio::test]
    async fn real_mounter_mounts_through_the_opened_target() {
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
                want: "mount --no-canonicalize -t ext4 -o noatime,discard -- /dev/loop3 /proc/self/fd/0",
            },
            Case {
                name: "no type, no options",
                source: "tank/v",
                fs_type: "",
                options: &[],
                want: "mount --no-canonicalize -- tank/v /proc/self/fd/0",
            },
            Case {
                name: "nfs",
                source: "srv:/export/v",
                fs_type: "nfs",
                options: &["vers=4.2"],
                want: "mount --no-canonicalize -t nfs -o vers=4.2 -- srv:/export/v /proc/self/fd/0",
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let target = rp(&dir.path().display().to_string());
        for c in cases {
            let exec = Arc::new(crate::exec::FakeExec::new());
            RealMounter::new(exec.clone()).mount(c.source, &target, c.fs_type, &strings(c.options)).await.unwrap();
            assert_eq!(exec.lines(), [c.want], "{}", c.name);
        }
        let exec = Arc::new(crate::exec::FakeExec::new());
        let missing = rp(&dir.path().join("missing").display().to_string());
        let err = RealMounter::new(exec.clone()).mount("x", &missing, "", &[]).await.unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        assert!(exec.calls().is_empty());
    }

    #[test]
    fn bind_flags_map_to_remount_flags() {
        let f = remount_flags(&bind_flags(&strings(&["nosuid", "discard", "ro", "noexec", "rw"])));
        assert_eq!(f, MountFlags::BIND | MountFlags::NOSUID | MountFlags::RDONLY | MountFlags::NOEXEC);
        assert_eq!(remount_flags(&[]), MountFlags::BIND);
    }

    #[tokio::test]
    async fn fake_simulates_the_table() {
        let m = FakeMounter::new();
        m.mount("/dev/loop3", &rp("/stage"), "ext4", &[]).await.unwrap();
        m.bind(BindSource::Mount(&rp("/stage/sub")), &rp("/pub"), &strings(&["ro", "discard"])).await.unwrap();
        m.bind(BindSource::Device(Path::new("/dev/loop4")), &rp("/blk"), &[]).await.unwrap();
        let t = m.mounts().await.unwrap();
        let pubm = mountinfo::top_at(&t, Path::new("/pub")).unwrap();
        assert_eq!((pubm.source.as_str(), pubm.fs_type.as_str(), pubm.root.as_path()), ("/dev/loop3", "ext4", Path::new("/sub")));
        assert_eq!(pubm.mount_options, ["ro"]);
        assert_eq!(pubm.major_minor, mountinfo::top_at(&t, Path::new("/stage")).unwrap().major_minor);
        assert_eq!(mountinfo::top_at(&t, Path::new("/blk")).unwrap().root, Path::new("/dev/loop4"));
        assert_eq!(m.mount_at(&rp("/pub")).await.unwrap().map(|m| m.id), Some(pubm.id));
        assert_eq!(m.mount_at(&rp("/nothing")).await.unwrap(), None);

        let id = pubm.id;
        assert!(matches!(m.unmount(&rp("/pub"), id + 100).await, Err(Error::Aborted(_))), "another mount id is not unmounted");
        m.unmount(&rp("/pub"), id).await.unwrap();
        assert!(matches!(m.unmount(&rp("/pub"), id).await, Err(Error::NotFound(_))));
        m.fail_next("mount", "boom");
        assert!(m.mount("x", &rp("/y"), "", &[]).await.is_err());
        assert!(m.mount("x", &rp("/y"), "", &[]).await.is_ok());
        assert_eq!(m.calls().len(), 8);
        assert_eq!(m.calls()[4], MountCall::Unmount { target: "/pub".into() });
    }
}
