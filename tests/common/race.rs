//! Helpers of the concurrency tests (tests/concurrency.rs): a seeded random source and round
//! count from the environment, PATH wrappers that log and slow the driver's external tools (to
//! force an interleaving), retries bounded in time, data written and read back through
//! NodeStage + NodePublish, and a guard that thaws a filesystem a failing driver left frozen.
//!
//! Environment: `HOLDFAST_SEED` (default: from the clock; printed when a test fails, so the
//! run can be repeated) and `HOLDFAST_RACE_ROUNDS` (how often each race runs, default 3).

// Not every helper is used by every test.
#![allow(dead_code)]

use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::*;
use holdfast::proto::volume_capability::access_mode::Mode;
use sha2::{Digest, Sha256};
use tonic::{Code, Response, Status};

/// How often each race runs when `HOLDFAST_RACE_ROUNDS` does not say.
pub const DEFAULT_ROUNDS: u32 = 3;

/// The rounds of each race (`HOLDFAST_RACE_ROUNDS`, at least 1).
pub fn rounds() -> u32 {
    std::env::var("HOLDFAST_RACE_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_ROUNDS).max(1)
}

/// A small deterministic random source (splitmix64) seeded from `HOLDFAST_SEED`. Dropping it
/// while the test panics prints the seed, so a failing interleaving can be replayed.
pub struct Seeded {
    /// The seed this test started from.
    pub seed: u64,
    state: u64,
    test: String,
}

impl Seeded {
    /// The test's random source: `HOLDFAST_SEED`, or the clock when unset.
    pub fn new(test: &str) -> Seeded {
        let seed = std::env::var("HOLDFAST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) ^ u64::from(std::process::id())
        });
        eprintln!("{test}: HOLDFAST_SEED={seed} HOLDFAST_RACE_ROUNDS={}", rounds());
        Seeded { seed, state: seed, test: test.to_owned() }
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A duration in `0..max_ms` milliseconds.
    pub fn millis(&mut self, max_ms: u64) -> Duration {
        Duration::from_millis(self.below(max_ms))
    }

    /// `len` random bytes (the data a test writes and checks).
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

impl Drop for Seeded {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{} FAILED with HOLDFAST_SEED={} (rerun with it to replay the same interleavings)", self.test, self.seed);
        }
    }
}

/// The hex SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// One call of a wrapped tool, from its log.
#[derive(Debug, Clone)]
pub struct ToolCall {
    /// Its arguments, as one line.
    pub args: String,
    /// When the wrapper started (seconds since the epoch).
    pub start: f64,
    /// When the real tool exited; `None` while it runs (or when the wrapper was killed).
    pub end: Option<f64>,
}

/// Wrapper scripts, put first in the driver's PATH, that log every call of a tool (start and
/// end times) and sleep before running the real tool when told to (`slow`), so a test can hold
/// the driver inside one step while it sends another call.
pub struct Wrappers {
    /// The directory holding the scripts (first in PATH).
    pub bin: PathBuf,
    /// The directory holding the logs and the delays.
    pub ctl: PathBuf,
}

impl Wrappers {
    /// Wrappers of `tools` in `dir/bin`, with their logs in `dir/ctl`. Tools that are not
    /// installed are not wrapped (a pool that does not use them never calls them).
    pub fn new(dir: &Path, tools: &[&str]) -> Wrappers {
        let bin = dir.join("race-bin");
        let ctl = dir.join("race-ctl");
        std::fs::create_dir_all(&bin).expect("create wrapper dir");
        std::fs::create_dir_all(&ctl).expect("create wrapper control dir");
        for tool in tools {
            let Some(real) = which(tool) else { continue };
            let script = format!(
                "#!/bin/sh\n\
                 # holdfast concurrency test: logs {tool} and sleeps first when {ctl}/{tool}.delay says so\n\
                 # (\"SECONDS [PATTERN]\": only calls whose arguments contain PATTERN, or begin\n\
                 # with it when it starts with ^)\n\
                 delay=0\n\
                 if [ -f {ctl}/{tool}.delay ]; then\n  read d pat < {ctl}/{tool}.delay\n  case \"$pat\" in\n    ^*) case \"$*\" in \"${{pat#^}}\"*) delay=$d;; esac;;\n    *) case \"$*\" in *\"$pat\"*) delay=$d;; esac;;\n  esac\nfi\n\
                 echo \"start $(date +%s.%N) $$ $*\" >> {ctl}/{tool}.log\n\
                 [ \"$delay\" = 0 ] || sleep \"$delay\"\n\
                 {real} \"$@\"\n\
                 rc=$?\n\
                 echo \"end $(date +%s.%N) $$ $*\" >> {ctl}/{tool}.log\n\
                 exit $rc\n",
                ctl = ctl.display(),
            );
            let path = bin.join(tool);
            std::fs::write(&path, script).expect("write wrapper");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
        }
        Wrappers { bin, ctl }
    }

    /// The PATH the driver gets: the wrappers first.
    pub fn path_env(&self) -> String {
        format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()))
    }

    /// Makes calls of `tool` whose arguments contain `pattern` ("" for all; `^p`: that begin
    /// with `p`) sleep `delay`
    /// before the real tool runs; `Duration::ZERO` stops slowing it.
    pub fn slow(&self, tool: &str, delay: Duration, pattern: &str) {
        let path = self.ctl.join(format!("{tool}.delay"));
        if delay.is_zero() {
            let _ = std::fs::remove_file(path);
        } else {
            std::fs::write(path, format!("{:.3} {pattern}\n", delay.as_secs_f64())).expect("write delay");
        }
    }

    /// Every logged call of `tool` so far whose arguments contain `pattern`, in start order.
    pub fn calls(&self, tool: &str, pattern: &str) -> Vec<ToolCall> {
        let text = std::fs::read_to_string(self.ctl.join(format!("{tool}.log"))).unwrap_or_default();
        let mut calls: Vec<(String, ToolCall)> = Vec::new();
        for line in text.lines() {
            let mut f = line.splitn(4, ' ');
            let (Some(kind), Some(time), Some(pid)) = (f.next(), f.next(), f.next()) else { continue };
            let args = f.next().unwrap_or("").to_owned();
            let Ok(time) = time.parse::<f64>() else { continue };
            match kind {
                "start" => calls.push((pid.to_owned(), ToolCall { args, start: time, end: None })),
                "end" => {
                    if let Some((_, c)) = calls.iter_mut().rev().find(|(p, c)| p == pid && c.end.is_none()) {
                        c.end = Some(time);
                    }
                }
                _ => {}
            }
        }
        calls.into_iter().map(|(_, c)| c).filter(|c| matches_pattern(&c.args, pattern)).collect()
    }

    /// Kills (SIGKILL) the wrappers of `tool` still running, with the children they started
    /// (a sleep, the real tool): what a crash of the driver's whole container would take along.
    pub fn kill_running(&self, tool: &str) {
        let text = std::fs::read_to_string(self.ctl.join(format!("{tool}.log"))).unwrap_or_default();
        let mut running: Vec<&str> = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.splitn(4, ' ').collect();
            match f.as_slice() {
                ["start", _, pid, ..] => running.push(pid),
                ["end", _, pid, ..] => running.retain(|p| p != pid),
                _ => {}
            }
        }
        for pid in running.iter().filter_map(|p| p.parse::<i32>().ok()) {
            // The wrapper first (so it starts nothing more), then the children it started.
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            let kill = |p: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            let _ = kill(pid);
            for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
                let _ = kill(child);
            }
        }
    }

    /// Forgets the calls logged so far (between rounds).
    pub fn clear(&self, tool: &str) {
        let _ = std::fs::remove_file(self.ctl.join(format!("{tool}.log")));
    }

    /// Waits until `tool` has been called `n` times with `pattern` (the driver is inside that
    /// step, held there by [`Wrappers::slow`]); false when that did not happen within `bound`.
    pub async fn wait_for_call(&self, tool: &str, pattern: &str, n: usize, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if self.calls(tool, pattern).len() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

/// Whether a call's arguments match a [`Wrappers::slow`] pattern.
fn matches_pattern(args: &str, pattern: &str) -> bool {
    match pattern.strip_prefix('^') {
        Some(p) => args.starts_with(p),
        None => args.contains(pattern),
    }
}

/// The absolute path of an installed tool.
pub fn which(tool: &str) -> Option<String> {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    p.starts_with('/').then_some(p)
}

/// Seconds since the epoch, as the wrappers log them.
pub fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Sends `call` until it answers OK, retrying (after a short pause) on the codes in `retry`
/// (ABORTED: an operation on the object is in progress), for at most `bound`. Fails the test
/// on any other code or when the bound passes; returns the answer and how many calls it took.
pub async fn until_ok<T, F, Fut>(what: &str, retry: &[Code], bound: Duration, call: F) -> (T, u32)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    try_until_ok(what, retry, bound, call).await.unwrap_or_else(|e| panic!("{e}"))
}

/// [`until_ok`], answering why it gave up instead of failing the test (so the caller can add
/// what it saw meanwhile).
pub async fn try_until_ok<T, F, Fut>(what: &str, retry: &[Code], bound: Duration, mut call: F) -> Result<(T, u32), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let deadline = Instant::now() + bound;
    let mut tries = 0;
    let mut last = String::from("nothing");
    loop {
        tries += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let r = match tokio::time::timeout(left.max(Duration::from_millis(1)), call()).await {
            Ok(r) => r,
            Err(_) => return Err(format!("{what}: no OK within {bound:?} ({tries} calls; the last answered {last})")),
        };
        match r {
            Ok(resp) => return Ok((resp.into_inner(), tries)),
            Err(s) if retry.contains(&s.code()) && Instant::now() < deadline => {
                last = format!("{:?}: {}", s.code(), s.message());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) if retry.contains(&s.code()) => {
                return Err(format!("{what}: no OK within {bound:?} ({tries} calls; the last answered {:?}: {})", s.code(), s.message()));
            }
            Err(s) => {
                return Err(format!(
                    "{what}: expected OK (retrying {retry:?} for {bound:?}), got {:?} after {tries} calls: {}",
                    s.code(),
                    s.message()
                ));
            }
        }
    }
}

/// The mount at `path` (the last entry in the mount table): `(major:minor, source, options)`.
pub fn mount_at(path: &Path) -> Option<(String, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path_str(path);
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let dash = f.iter().position(|x| *x == "-")?;
        (f.len() > dash + 2 && f.len() > 5 && crate_unescape(f[4]) == want)
            .then(|| (f[2].to_owned(), crate_unescape(f[dash + 2]), f[5].to_owned()))
    })
}

fn crate_unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// Every mount point in the table showing the filesystem `major_minor`, with its source.
fn mounts_of_device(major_minor: &str) -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            (f.len() > dash + 2 && f.len() > 4 && f[2] == major_minor)
                .then(|| (PathBuf::from(crate_unescape(f[4])), crate_unescape(f[dash + 2])))
        })
        .collect()
}

/// The backing file of loop device `dev`, if it is one.
pub fn loop_backing_file(dev: &str) -> Option<PathBuf> {
    if !dev.starts_with("/dev/loop") {
        return None;
    }
    let out = Command::new("losetup").args(["--noheadings", "--output", "BACK-FILE", dev]).output().ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().trim_end_matches(" (deleted)").to_owned();
    (!p.is_empty()).then(|| PathBuf::from(p))
}

/// The size in bytes of the block device `dev` (`blockdev --getsize64`).
pub fn device_size(dev: &str) -> Option<u64> {
    let out = Command::new("blockdev").args(["--getsize64", dev]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The device (or dataset) a volume is staged from and what identifies its filesystem.
#[derive(Debug, Clone)]
pub struct Staged {
    /// `major:minor` of the filesystem (the same for every mount of it).
    pub major_minor: String,
    /// The mount source: `/dev/loopN`, `/dev/mapper/…`, `/dev/zd…`, or a ZFS dataset.
    pub source: String,
    /// For a `file` pool volume, the image behind the loop device.
    pub image: Option<PathBuf>,
}

impl Staged {
    /// What is mounted at `staging` (the volume just staged there).
    pub fn at(staging: &Path) -> Staged {
        let (major_minor, source, _) = mount_at(staging).unwrap_or_else(|| panic!("nothing is mounted at {}", staging.display()));
        let image = loop_backing_file(&source);
        Staged { major_minor, source, image }
    }

    /// The mount points of this volume's filesystem now. A `major:minor` alone does not name
    /// it once it is unmounted: a ZFS dataset's anonymous device number and a detached loop
    /// device are reused at once by whatever another test mounts next. So a dataset's mounts
    /// must also show its name as their source, and a loop device must still have this
    /// volume's image behind it.
    pub fn mounts(&self) -> Vec<PathBuf> {
        if !still_ours(self) {
            return Vec::new();
        }
        let by_device = self.source.starts_with("/dev/");
        mounts_of_device(&self.major_minor).into_iter().filter(|(_, source)| by_device || *source == self.source).map(|(p, _)| p).collect()
    }

    /// Fails unless no mount of the volume's filesystem is left anywhere and (file pool) no
    /// loop device is attached to its image: nothing holds the volume after its unstage.
    pub fn assert_released(&self, what: &str) {
        let left = self.mounts();
        assert!(left.is_empty(), "{what}: the volume's filesystem ({}) is still mounted at {left:?}", self.source);
        if let Some(img) = &self.image {
            let deadline = Instant::now() + Duration::from_secs(5);
            // A loop device's release after the last unmount may take a moment.
            while !loops_of_image(img).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let loops = loops_of_image(img);
            assert!(loops.is_empty(), "{what}: the image {} is still attached: {loops}", img.display());
        }
    }
}

/// Thaws, on drop, a filesystem a test's driver may have left frozen, even when the driver
/// unmounted it while frozen (it then lives on, frozen, with no mount point): mounts its device
/// again at a private path, thaws it, unmounts it. Also unmounts the volume's mounts the driver
/// left in its holding directory (`/run/holdfast`). Declare it after the [`Driver`], so it runs
/// before the driver's clean-up unmounts and detaches.
pub struct FrozenRescue {
    staged: Vec<Staged>,
    dir: PathBuf,
}

impl FrozenRescue {
    /// A rescue using `dir` (the test's own temp dir) for its mount points.
    pub fn new(dir: &Path) -> FrozenRescue {
        FrozenRescue { staged: Vec::new(), dir: dir.join("rescue") }
    }

    /// Watches this staged volume too.
    pub fn watch(&mut self, s: &Staged) {
        self.staged.push(s.clone());
    }
}

impl Drop for FrozenRescue {
    fn drop(&mut self) {
        for (i, s) in self.staged.iter().enumerate() {
            // Loop device numbers are reused at once: once this test's image is detached, the
            // same major:minor may be another test's volume, frozen by its own driver for a
            // snapshot. Thawing (or unmounting) that would break the other test's copy.
            if !still_ours(s) {
                continue;
            }
            let mounted = s.mounts();
            for m in &mounted {
                // Fails harmlessly when it is not frozen.
                quiet("fsfreeze", &["--unfreeze", &path_str(m)]);
                if m.starts_with("/run/holdfast") {
                    quiet("umount", &["--lazy", &path_str(m)]);
                }
            }
            if mounted.is_empty() && s.source.starts_with("/dev/") && Path::new(&s.source).exists() {
                // Only a live device that this test's volume was staged from.
                let at = self.dir.join(i.to_string());
                let _ = std::fs::create_dir_all(&at);
                if quiet("mount", &[&s.source, &path_str(&at)]) {
                    if quiet("fsfreeze", &["--unfreeze", &path_str(&at)]) {
                        eprintln!("rescue: {} was left frozen with no mount point; thawed it", s.source);
                    }
                    quiet("umount", &[&path_str(&at)]);
                }
            }
        }
    }
}

/// Whether `s`'s device is still this test's: for a `file` pool volume, the loop device still
/// has the test's image behind it (read from sysfs); other sources are never reused by another
/// test (their names are unique per test).
fn still_ours(s: &Staged) -> bool {
    let Some(image) = &s.image else { return true };
    let backing = std::fs::read_to_string(format!("/sys/dev/block/{}/loop/backing_file", s.major_minor));
    match (backing, std::fs::canonicalize(image)) {
        (Ok(b), Ok(img)) => Path::new(b.trim_end()) == img,
        (Ok(b), Err(_)) => Path::new(b.trim_end()) == image.as_path(),
        (Err(_), _) => false,
    }
}

fn quiet(program: &str, args: &[&str]) -> bool {
    let run = Command::new(program).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    // Bounded: a thaw of a filesystem that is not frozen returns at once.
    run.map(|s| s.success()).unwrap_or(false)
}

/// The name of the data file the tests write into volumes.
pub const DATA_FILE: &str = "race-data.bin";

/// Stages and publishes (rw) volume `id` at paths named `name`, writes `data` to a file in it
/// durably, then unpublishes and unstages. Returns what was staged (to check its release).
pub async fn write_volume(d: &Driver, id: &str, name: &str, data: &[u8]) -> Staged {
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let staging = d.staging_dir(name);
    let target = d.target_path(name);
    d.stage(id, &staging, &cap).await;
    let staged = Staged::at(&staging);
    d.publish(id, &staging, &target, &cap, false).await;
    write_durably(&target.join(DATA_FILE), data);
    d.unpublish(id, &target).await;
    d.unstage(id, &staging).await;
    staged
}

/// Stages and publishes volume `id` at paths named `name`, reads the data file (`None` when it
/// is absent), then unpublishes and unstages.
pub async fn read_volume(d: &Driver, id: &str, name: &str) -> Option<Vec<u8>> {
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let staging = d.staging_dir(name);
    let target = d.target_path(name);
    d.stage(id, &staging, &cap).await;
    d.publish(id, &staging, &target, &cap, false).await;
    let data = std::fs::read(target.join(DATA_FILE)).ok();
    d.unpublish(id, &target).await;
    d.unstage(id, &staging).await;
    data
}

/// The first pool's `path` in a `file` pool config (the pool directory).
pub fn file_pool_dir(d: &Driver) -> Option<PathBuf> {
    if d.pool.kind != "file" {
        return None;
    }
    let text = std::fs::read_to_string(&d.pool.config).ok()?;
    let table: toml::Table = text.parse().ok()?;
    let first = table.get("pool")?.as_array()?.first()?;
    first.get("path")?.as_str().map(PathBuf::from)
}

/// Files in the pool directory (recursively) whose names end in `.tmp`: half-made copies.
pub fn temp_files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(p),
                _ if p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".tmp")) => out.push(p),
                _ => {}
            }
        }
    }
    out
}

/// The step of CreateSnapshot (and of a clone) that takes the time, per pool kind: the tool
/// and an argument pattern for [`Wrappers::slow`]. On a `file` pool it is the image copy (run
/// while a mounted source is frozen).
pub fn copy_step(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "lvm" => ("lvcreate", "--snapshot"),
        "zfs" => ("zfs", "^snapshot"),
        _ => ("cp", ""),
    }
}

/// The inode's size of a file.
pub fn file_len(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.size())
}

/// The loop devices attached to `image` (`losetup -j`), as one line each.
pub fn loops_of_image(image: &Path) -> String {
    let out = Command::new("losetup").arg("-j").arg(image).output().expect("run losetup -j");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
