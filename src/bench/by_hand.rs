//! The baseline of `holdfast bench`: a ready-to-use ext4 volume made by hand, the way an
//! operator would type it (`truncate`, `losetup -f --show`, `mkfs.ext4 -q`, `mount`,
//! `mount --bind`), timed step by step and always taken down again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::exec::{Cmd, Exec};

use super::Phases;

/// Where one by-hand volume lives. The directories must exist; the file must not.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The sparse backing file.
    pub file: PathBuf,
    /// Where the filesystem is mounted (the equivalent of NodeStage's staging path).
    pub staging: PathBuf,
    /// Where it is bind-mounted (the equivalent of NodePublish's target path).
    pub target: PathBuf,
}

/// What has been set up so far, so that a failure half-way is undone exactly.
#[derive(Debug, Default)]
struct State {
    file: bool,
    device: Option<String>,
    staged: bool,
    published: bool,
}

/// Makes one volume by hand, then takes it down; every step timed. Whatever was set up is taken
/// down even when a step fails.
pub async fn run(exec: &dyn Exec, paths: &Paths, size: u64) -> Result<Phases, String> {
    let mut state = State::default();
    let made = set_up(exec, paths, size, &mut state).await;
    let started = Instant::now();
    let cleaned = take_down(exec, paths, &state).await;
    let teardown = started.elapsed();
    match (made, cleaned) {
        (Ok((create, stage, publish)), Ok(())) => Ok(Phases { create, stage, publish, teardown }),
        (Ok(_), Err(c)) => Err(format!("by hand: taking the volume down failed: {c}")),
        (Err(e), Ok(())) => Err(format!("by hand: {e}")),
        (Err(e), Err(c)) => Err(format!("by hand: {e}; taking it down failed too: {c}")),
    }
}

fn arg(p: &Path) -> Result<&str, String> {
    p.to_str().ok_or_else(|| format!("path {} is not UTF-8", p.display()))
}

async fn sh(exec: &dyn Exec, cmd: Cmd) -> Result<String, String> {
    exec.run(cmd).await.map(|o| o.stdout).map_err(|e| e.to_string())
}

/// The three timed steps: create (truncate), stage (losetup + mkfs + mount), publish (bind mount).
async fn set_up(exec: &dyn Exec, paths: &Paths, size: u64, state: &mut State) -> Result<(Duration, Duration, Duration), String> {
    let (file, staging, target) = (arg(&paths.file)?, arg(&paths.staging)?, arg(&paths.target)?);
    // Never touch a file that was there before: only what this run creates is removed.
    if paths.file.exists() {
        return Err(format!("{file} already exists; refusing to reuse it"));
    }

    let t = Instant::now();
    state.file = true;
    sh(exec, Cmd::new("truncate").args(["-s", &size.to_string(), file])).await?;
    let create = t.elapsed();

    let t = Instant::now();
    let device = sh(exec, Cmd::new("losetup").args(["-f", "--show", file])).await?.trim().to_owned();
    if !device.starts_with("/dev/loop") {
        return Err(format!("losetup -f --show printed {device:?}, not a loop device"));
    }
    state.device = Some(device.clone());
    // A loop device on a file this run just created: blank, so formatting destroys nothing.
    sh(exec, Cmd::new("mkfs.ext4").args(["-q", &device])).await?;
    sh(exec, Cmd::new("mount").args(["-t", "ext4", &device, staging])).await?;
    state.staged = true;
    let stage = t.elapsed();

    let t = Instant::now();
    sh(exec, Cmd::new("mount").args(["--bind", staging, target])).await?;
    state.published = true;
    let publish = t.elapsed();
    Ok((create, stage, publish))
}

/// Undoes what `state` says was done, in reverse order; keeps going after a failure so that as
/// much as possible is released, and reports every failure.
async fn take_down(exec: &dyn Exec, paths: &Paths, state: &State) -> Result<(), String> {
    let mut errors = Vec::new();
    if state.published {
        errors.extend(sh(exec, Cmd::new("umount").arg(arg(&paths.target)?)).await.err());
    }
    if state.staged {
        errors.extend(sh(exec, Cmd::new("umount").arg(arg(&paths.staging)?)).await.err());
    }
    if let Some(device) = &state.device {
        errors.extend(sh(exec, Cmd::new("losetup").args(["-d", device])).await.err());
    }
    if state.file {
        match std::fs::remove_file(&paths.file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => errors.push(format!("removing {}: {e}", paths.file.display())),
            _ => {}
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{FakeExec, RealExec, Reply};

    fn paths(dir: &Path) -> Paths {
        Paths { file: dir.join("f"), staging: dir.join("staging"), target: dir.join("target") }
    }

    #[tokio::test]
    async fn runs_the_steps_and_undoes_them_in_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let d = dir.path().display();
        let exec = FakeExec::new();
        exec.on("losetup -f --show", vec![Reply::Ok("/dev/loop7\n".into())]);
        run(&exec, &p, 1 << 30).await.unwrap();
        assert_eq!(
            exec.lines(),
            [
                format!("truncate -s 1073741824 {d}/f"),
                format!("losetup -f --show {d}/f"),
                "mkfs.ext4 -q /dev/loop7".into(),
                format!("mount -t ext4 /dev/loop7 {d}/staging"),
                format!("mount --bind {d}/staging {d}/target"),
                format!("umount {d}/target"),
                format!("umount {d}/staging"),
                "losetup -d /dev/loop7".into(),
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_step_undoes_only_what_was_done() {
        struct Case {
            name: &'static str,
            fail: &'static str,
            want_undo: &'static [&'static str],
        }
        let cases = [
            Case { name: "truncate", fail: "truncate", want_undo: &[] },
            Case { name: "mkfs", fail: "mkfs.ext4", want_undo: &["losetup -d /dev/loop7"] },
            Case { name: "mount", fail: "mount -t", want_undo: &["losetup -d /dev/loop7"] },
            Case { name: "bind", fail: "mount --bind", want_undo: &["umount", "losetup -d /dev/loop7"] },
        ];
        for c in cases {
            let dir = tempfile::tempdir().unwrap();
            let exec = FakeExec::new();
            exec.on("losetup -f --show", vec![Reply::Ok("/dev/loop7\n".into())]);
            exec.on(c.fail, vec![Reply::Fail(32, "boom".into())]);
            let err = run(&exec, &paths(dir.path()), 1 << 20).await.unwrap_err();
            assert!(err.contains("boom"), "{}: {err}", c.name);
            let lines = exec.lines();
            let failed_at = lines.iter().position(|l| l.starts_with(c.fail)).unwrap();
            let undo: Vec<&str> = lines[failed_at + 1..].iter().map(|l| l.as_str()).collect();
            assert_eq!(undo.len(), c.want_undo.len(), "{}: {undo:?}", c.name);
            for (got, want) in undo.iter().zip(c.want_undo) {
                assert!(got.starts_with(want), "{}: {got} is not {want}", c.name);
            }
        }
    }

    #[tokio::test]
    async fn refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        std::fs::write(&p.file, b"keep me").unwrap();
        let exec = FakeExec::new();
        assert!(run(&exec, &p, 1 << 20).await.unwrap_err().contains("already exists"));
        assert!(exec.calls().is_empty());
        assert_eq!(std::fs::read(&p.file).unwrap(), b"keep me");
    }

    /// Unmounts and detaches whatever the real test left behind, even when it panics. Drop cannot
    /// await, so this one guard runs the commands synchronously.
    struct Cleanup(Paths);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for p in [&self.0.target, &self.0.staging] {
                let _ = std::process::Command::new("umount").arg(p).stderr(std::process::Stdio::null()).status();
            }
            let _ = std::process::Command::new("sh")
                .args(["-c", "for d in $(losetup -n -O NAME -j \"$1\"); do losetup -d \"$d\"; done", "-", &self.0.file.to_string_lossy()])
                .status();
        }
    }

    #[tokio::test]
    async fn real_tools() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        std::fs::create_dir(&p.staging).unwrap();
        std::fs::create_dir(&p.target).unwrap();
        let _guard = Cleanup(p.clone());
        let phases = run(&RealExec, &p, 64 << 20).await.unwrap();
        assert!(phases.stage > Duration::ZERO && phases.teardown > Duration::ZERO);
        assert!(!p.file.exists());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(dir.path().to_str().unwrap()), "still mounted: {mountinfo}");
        // The directories are left for the caller, empty.
        assert_eq!(std::fs::read_dir(&p.target).unwrap().count(), 0);
    }
}
