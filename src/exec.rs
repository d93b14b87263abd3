//! Every external command holdfast runs goes through [`Exec`]: argv only (never a shell),
//! `LC_ALL=C` so output is parseable, a timeout, and the child killed when the request that
//! started it is dropped. [`FakeExec`] records the calls and answers from a script, for unit tests.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;

/// How long a command may run when the caller does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// One command line to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    /// The program, looked up in `PATH`.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Killed after this long.
    pub timeout: Duration,
    /// Written to the child's stdin, then closed.
    pub stdin: Option<Vec<u8>>,
    /// Given to the child as its stdin instead (e.g. an opened mount target, which the child
    /// then names `/proc/self/fd/0`, so nothing can swap the path under it).
    pub stdin_fd: Option<StdinFd>,
}

/// A descriptor handed to a child as its stdin (shared, so a [`Cmd`] stays cheap to clone).
/// Two are equal when they are the same descriptor.
#[derive(Debug, Clone)]
pub struct StdinFd(pub std::sync::Arc<std::os::fd::OwnedFd>);

impl PartialEq for StdinFd {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for StdinFd {}

impl Cmd {
    /// A command with no arguments and the default timeout.
    pub fn new(program: impl Into<String>) -> Self {
        Cmd { program: program.into(), args: Vec::new(), timeout: DEFAULT_TIMEOUT, stdin: None, stdin_fd: None }
    }
    /// Appends one argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    /// Appends several arguments.
    pub fn args<I, S>(mut self, it: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }
    /// Gives the child `fd` as its stdin.
    pub fn stdin_fd(mut self, fd: std::os::fd::OwnedFd) -> Self {
        self.stdin_fd = Some(StdinFd(std::sync::Arc::new(fd)));
        self
    }
    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// The command line as one string, for messages and logs.
    pub fn display(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
    /// The full argv, program first.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone()).chain(self.args.iter().cloned()).collect()
    }
}

/// What a command that exited 0 printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// Why a command did not succeed. The command line and its stderr are kept for the operator.
#[derive(Debug, Error)]
pub enum ExecError {
    /// The program could not be started (not installed, not executable).
    #[error("cannot run `{cmd}`: {source} (is it installed and in PATH?)")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The program ran longer than its timeout and was killed.
    #[error("`{cmd}` did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The command line.
        cmd: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The program exited non-zero (or was killed by a signal: code -1).
    #[error("`{cmd}` failed with exit code {code}: {}", stderr.trim())]
    Failed {
        /// The command line.
        cmd: String,
        /// The exit code.
        code: i32,
        /// What it wrote to stdout.
        stdout: String,
        /// What it wrote to stderr.
        stderr: String,
    },
}

impl ExecError {
    /// The exit code when the command ran and failed.
    pub fn code(&self) -> Option<i32> {
        match self {
            ExecError::Failed { code, .. } => Some(*code),
            _ => None,
        }
    }
    /// The command's stderr when it ran and failed, else "".
    pub fn stderr(&self) -> &str {
        match self {
            ExecError::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }
}

/// Runs external commands.
#[async_trait]
pub trait Exec: Send + Sync {
    /// Runs `cmd`; `Ok` only when it exits 0.
    async fn run(&self, cmd: Cmd) -> Result<Output, ExecError>;
}

/// Runs real processes with tokio.
#[derive(Debug, Default, Clone)]
pub struct RealExec;

#[async_trait]
impl Exec for RealExec {
    async fn run(&self, cmd: Cmd) -> Result<Output, ExecError> {
        use std::process::Stdio;
        use tokio::io::AsyncWriteExt;
        let line = cmd.display();
        let stdin = match (&cmd.stdin, &cmd.stdin_fd) {
            (Some(_), _) => Stdio::piped(),
            (None, Some(StdinFd(fd))) => Stdio::from(fd.try_clone().map_err(|source| ExecError::Spawn { cmd: line.clone(), source })?),
            (None, None) => Stdio::null(),
        };
        let mut c = tokio::process::Command::new(&cmd.program);
        c.args(&cmd.args)
            .env("LC_ALL", "C")
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // If the gRPC request is cancelled the future is dropped; the child must not outlive it.
            .kill_on_drop(true);
        let mut child = c.spawn().map_err(|source| ExecError::Spawn { cmd: line.clone(), source })?;
        if let (Some(data), Some(mut pipe)) = (cmd.stdin.clone(), child.stdin.take()) {
            // A child that exits early closes its stdin; its exit status tells the real story.
            let _ = pipe.write_all(&data).await;
        }
        let started = tokio::time::timeout(cmd.timeout, child.wait_with_output()).await;
        let out = match started {
            Err(_) => return Err(ExecError::Timeout { cmd: line, timeout: cmd.timeout }),
            Ok(Err(source)) => return Err(ExecError::Spawn { cmd: line, source }),
            Ok(Ok(out)) => out,
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        tracing::debug!(cmd = %line, code = ?out.status.code(), "exec");
        if out.status.success() {
            Ok(Output { stdout, stderr })
        } else {
            Err(ExecError::Failed { cmd: line, code: out.status.code().unwrap_or(-1), stdout, stderr })
        }
    }
}

/// The programs an `lvm` pool runs: the LVM tools and `dmsetup` (LVM's device-mapper
/// companion). In a container they must be the host's (see [`ExecPrefix`]).
pub const LVM_PROGRAMS: &[&str] =
    &["lvm", "lvs", "vgs", "pvs", "lvcreate", "lvremove", "lvextend", "lvchange", "lvrename", "lvconvert", "vgchange", "dmsetup"];

/// The programs a `zfs` pool runs. Their userland must match the loaded kernel module.
pub const ZFS_PROGRAMS: &[&str] = &["zfs", "zpool"];

/// Commands put in front of some programs, per tool family: in a container, `lvs` becomes
/// `nsenter --target=1 --mount … -- lvs`, so the host's LVM (its `lvm.conf`, its metadata
/// locks, its udev) or ZFS (matching the kernel module) does the work while every other
/// program (mkfs, mount, losetup) runs from the image. Programs of no family run unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecPrefix {
    rules: Vec<(&'static [&'static str], Vec<String>)>,
}

impl ExecPrefix {
    /// Puts `prefix` in front of each of `programs` (an empty prefix changes nothing).
    pub fn with(mut self, programs: &'static [&'static str], prefix: Vec<String>) -> Self {
        if !prefix.is_empty() {
            self.rules.push((programs, prefix));
        }
        self
    }

    /// Whether no program gets a prefix.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// `cmd` as it is to be run: the prefix's program first, then the prefix's arguments, the
    /// original program and its arguments. Timeout and stdin stay the command's own.
    pub fn apply(&self, mut cmd: Cmd) -> Cmd {
        let Some((_, prefix)) = self.rules.iter().find(|(programs, _)| programs.contains(&cmd.program.as_str())) else {
            return cmd;
        };
        let original = std::mem::replace(&mut cmd.program, prefix[0].clone());
        let mut args = prefix[1..].to_vec();
        args.push(original);
        args.append(&mut cmd.args);
        cmd.args = args;
        cmd
    }
}

/// An [`Exec`] that runs each command through an [`ExecPrefix`] first.
#[derive(Debug, Clone)]
pub struct Prefixed<E> {
    inner: E,
    prefix: ExecPrefix,
}

impl<E> Prefixed<E> {
    /// Runs commands through `prefix`, then `inner`.
    pub fn new(inner: E, prefix: ExecPrefix) -> Self {
        Prefixed { inner, prefix }
    }
}

#[async_trait]
impl<E: Exec> Exec for Prefixed<E> {
    async fn run(&self, cmd: Cmd) -> Result<Output, ExecError> {
        // issue 14: metrics: every real command passes here, named by its own program (not the
        // prefix's nsenter). A dropped call records nothing: it has no outcome.
        let started = std::time::Instant::now();
        let program = crate::metrics::program_label(&cmd.program);
        let res = self.inner.run(self.prefix.apply(cmd)).await;
        let failure = match &res {
            Ok(_) => None,
            Err(ExecError::Failed { .. }) => Some("exit"),
            Err(ExecError::Timeout { .. }) => Some("timeout"),
            Err(ExecError::Spawn { .. }) => Some("spawn"),
        };
        crate::metrics::command(program, started.elapsed(), failure);
        res
    }
}

/// A shared [`Exec`] runs as the one it points to (so a test keeps a handle on its fake).
#[async_trait]
impl<E: Exec + ?Sized> Exec for std::sync::Arc<E> {
    async fn run(&self, cmd: Cmd) -> Result<Output, ExecError> {
        (**self).run(cmd).await
    }
}

impl RealExec {
    /// Real processes, with `prefix` applied (the configuration's `exec_prefix`).
    pub fn with_prefix(prefix: ExecPrefix) -> Prefixed<RealExec> {
        Prefixed::new(RealExec, prefix)
    }
}

/// A scripted answer of [`FakeExec`].
#[derive(Debug, Clone)]
pub enum Reply {
    /// Exit 0 with this stdout.
    Ok(String),
    /// Exit with this code and stderr.
    Fail(i32, String),
    /// Exit with this code, stdout and stderr (a command that did part of its work).
    Partial(i32, String, String),
}

#[derive(Debug)]
struct Rule {
    prefix: Vec<String>,
    replies: VecDeque<Reply>,
}

/// A recording fake: every call is kept; answers come from rules matched on an argv prefix
/// (the most recently added matching rule wins; a rule's replies are used in order and its last
/// one repeats). Unmatched commands succeed with empty output.
#[derive(Debug, Default)]
pub struct FakeExec {
    calls: Mutex<Vec<Vec<String>>>,
    rules: Mutex<Vec<Rule>>,
}

impl FakeExec {
    /// A fake with no rules.
    pub fn new() -> Self {
        Self::default()
    }
    /// Answers commands whose argv starts with `prefix` (space-separated) with `replies`.
    pub fn on(&self, prefix: &str, replies: Vec<Reply>) -> &Self {
        let prefix = prefix.split_whitespace().map(str::to_owned).collect();
        self.rules.lock().unwrap().push(Rule { prefix, replies: replies.into() });
        self
    }
    /// Every argv run so far, in order.
    pub fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap().clone()
    }
    /// Every command line run so far, joined with spaces.
    pub fn lines(&self) -> Vec<String> {
        self.calls().into_iter().map(|c| c.join(" ")).collect()
    }
}

#[async_trait]
impl Exec for FakeExec {
    async fn run(&self, cmd: Cmd) -> Result<Output, ExecError> {
        let argv = cmd.argv();
        self.calls.lock().unwrap().push(argv.clone());
        let mut rules = self.rules.lock().unwrap();
        let rule = rules.iter_mut().rev().find(|r| argv.len() >= r.prefix.len() && argv[..r.prefix.len()] == r.prefix[..]);
        let reply = match rule {
            None => Reply::Ok(String::new()),
            Some(r) if r.replies.len() > 1 => r.replies.pop_front().unwrap(),
            Some(r) => r.replies.front().cloned().unwrap_or(Reply::Ok(String::new())),
        };
        match reply {
            Reply::Ok(stdout) => Ok(Output { stdout, stderr: String::new() }),
            Reply::Fail(code, stderr) => Err(ExecError::Failed { cmd: cmd.display(), code, stdout: String::new(), stderr }),
            Reply::Partial(code, stdout, stderr) => Err(ExecError::Failed { cmd: cmd.display(), code, stdout, stderr }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn real_exec_reports_exit_code_and_stderr() {
        let err = RealExec.run(Cmd::new("sh").args(["-c", "echo oops >&2; exit 3"])).await.unwrap_err();
        assert_eq!(err.code(), Some(3));
        assert_eq!(err.stderr().trim(), "oops");
        assert!(err.to_string().contains("exit code 3"), "{err}");
    }

    #[tokio::test]
    async fn real_exec_runs_with_c_locale_and_times_out() {
        let out = RealExec.run(Cmd::new("sh").args(["-c", "echo $LC_ALL"])).await.unwrap();
        assert_eq!(out.stdout.trim(), "C");
        let err = RealExec.run(Cmd::new("sleep").arg("5").timeout(Duration::from_millis(100))).await.unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn real_exec_hands_a_descriptor_as_stdin() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"through the fd").unwrap();
        let fd: std::os::fd::OwnedFd = std::fs::File::open(dir.path().join("f")).unwrap().into();
        let out = RealExec.run(Cmd::new("cat").stdin_fd(fd)).await.unwrap();
        assert_eq!(out.stdout, "through the fd");
    }

    #[tokio::test]
    async fn real_exec_names_a_missing_program() {
        let err = RealExec.run(Cmd::new("holdfast-no-such-program")).await.unwrap_err();
        assert!(err.to_string().contains("holdfast-no-such-program"), "{err}");
    }

    /// The prefix the Kubernetes and Nomad deploy files give the LVM and ZFS tools.
    fn nsenter() -> Vec<String> {
        ["nsenter", "--target=1", "--mount", "--uts", "--ipc", "--net", "--"].map(String::from).to_vec()
    }

    #[tokio::test]
    async fn prefix_applies_to_its_family_only() {
        struct Case {
            name: &'static str,
            cmd: Cmd,
            want: &'static str,
        }
        let prefix = ExecPrefix::default().with(LVM_PROGRAMS, nsenter()).with(ZFS_PROGRAMS, vec!["chroot".into(), "/host".into()]);
        let cases = [
            Case {
                name: "lvm tool",
                cmd: Cmd::new("lvs").args(["--reportformat", "json", "vg0"]),
                want: "nsenter --target=1 --mount --uts --ipc --net -- lvs --reportformat json vg0",
            },
            Case {
                name: "dmsetup",
                cmd: Cmd::new("dmsetup").args(["resume", "x"]),
                want: "nsenter --target=1 --mount --uts --ipc --net -- dmsetup resume x",
            },
            Case { name: "zfs has its own prefix", cmd: Cmd::new("zfs").args(["list", "-Hp"]), want: "chroot /host zfs list -Hp" },
            Case { name: "zpool", cmd: Cmd::new("zpool").arg("status"), want: "chroot /host zpool status" },
            Case { name: "mount runs from the image", cmd: Cmd::new("mount").args(["-t", "xfs"]), want: "mount -t xfs" },
            Case { name: "mkfs runs from the image", cmd: Cmd::new("mkfs.ext4").arg("/dev/loop3"), want: "mkfs.ext4 /dev/loop3" },
            Case { name: "a path is not a family name", cmd: Cmd::new("/sbin/lvs"), want: "/sbin/lvs" },
        ];
        for c in cases {
            let fake = std::sync::Arc::new(FakeExec::new());
            let exec = Prefixed::new(fake.clone(), prefix.clone());
            exec.run(c.cmd).await.unwrap();
            assert_eq!(fake.lines(), [c.want], "{}", c.name);
        }
    }

    #[tokio::test]
    async fn prefixed_command_keeps_timeout_stdin_and_answers() {
        let fake = std::sync::Arc::new(FakeExec::new());
        fake.on("nsenter --target=1 --mount --uts --ipc --net -- lvs", vec![Reply::Fail(5, "  Volume group \"vg9\" not found".into())]);
        let exec = Prefixed::new(fake.clone(), ExecPrefix::default().with(LVM_PROGRAMS, nsenter()));
        let err = exec.run(Cmd::new("lvs").arg("vg9")).await.unwrap_err();
        // The pool classifies "not found" by exit code and stderr: both come through unchanged.
        assert_eq!(err.code(), Some(5));
        assert!(err.stderr().contains("not found"));
        let cmd = ExecPrefix::default().with(LVM_PROGRAMS, nsenter()).apply(Cmd::new("lvcreate").timeout(Duration::from_secs(7)));
        assert_eq!(cmd.timeout, Duration::from_secs(7));
        assert_eq!(cmd.program, "nsenter");
        assert!(ExecPrefix::default().with(LVM_PROGRAMS, vec![]).is_empty(), "an empty prefix changes nothing");
    }

    #[tokio::test]
    async fn real_exec_runs_the_prefix() {
        // `env` stands in for nsenter: it runs the program it is given, like any prefix must.
        let exec = RealExec::with_prefix(ExecPrefix::default().with(
            ZFS_PROGRAMS,
            vec!["env".into(), "HOLDFAST_PREFIXED=yes".into(), "sh".into(), "-c".into(), "echo $HOLDFAST_PREFIXED $0 $1".into()],
        ));
        let out = exec.run(Cmd::new("zfs").arg("list")).await.unwrap();
        assert_eq!(out.stdout.trim(), "yes zfs list");
        let out = exec.run(Cmd::new("echo").arg("plain")).await.unwrap();
        assert_eq!(out.stdout.trim(), "plain");
    }

    /// Processes whose command line is exactly `argv`.
    fn processes_running(argv: &[&str]) -> Vec<u32> {
        let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain(std::iter::once(0))).collect();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
            .collect()
    }

    #[tokio::test]
    async fn a_timeout_kills_the_tool_behind_the_nsenter_prefix() {
        // The deploy files' prefix leaves out --pid so that nsenter execs the tool in its own
        // place: killing the timed-out child kills the tool. With --pid nsenter forks and waits,
        // and the kill would leave the tool running; both are shown here. Entering this test's
        // own namespaces changes nothing but needs root, as the driver does.
        let me = std::process::id().to_string();
        let seconds = format!("4000.{me}");
        for (extra, survives) in [(None, false), (Some("--pid"), true)] {
            let mut prefix: Vec<String> = vec!["nsenter".into(), format!("--target={me}"), "--mount".into(), "--ipc".into()];
            prefix.extend(extra.map(String::from));
            prefix.push("--".into());
            let exec = RealExec::with_prefix(ExecPrefix::default().with(&["sleep"], prefix));
            let err = exec.run(Cmd::new("sleep").arg(&seconds).timeout(Duration::from_millis(300))).await.unwrap_err();
            assert!(matches!(err, ExecError::Timeout { .. }), "nsenter {extra:?}: {err} (the test needs root, as nsenter does)");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let left = processes_running(&["sleep", &seconds]);
            for pid in &left {
                let _ = RealExec.run(Cmd::new("kill").arg(pid.to_string())).await;
            }
            assert_eq!(!left.is_empty(), survives, "nsenter {extra:?}: tool processes left after the timeout: {left:?}");
        }
    }

    #[tokio::test]
    async fn fake_exec_records_and_scripts() {
        let f = FakeExec::new();
        f.on("losetup -j", vec![Reply::Ok("a".into()), Reply::Fail(1, "no".into())]);
        assert_eq!(f.run(Cmd::new("losetup").args(["-j", "/x"])).await.unwrap().stdout, "a");
        assert_eq!(f.run(Cmd::new("losetup").args(["-j", "/x"])).await.unwrap_err().code(), Some(1));
        assert_eq!(f.run(Cmd::new("losetup").args(["-j", "/x"])).await.unwrap_err().code(), Some(1));
        assert!(f.run(Cmd::new("true")).await.is_ok());
        assert_eq!(f.lines()[3], "true");
    }
}
