//! Crash points for tests: `HOLDFAST_TEST_CRASH_AT=<step>[@<file>]` makes the process kill
//! itself with SIGKILL when it reaches the named step, so a test can prove that a retry after
//! a crash at exactly that point repairs what was left half-made. With `@<file>` the point is
//! armed only while that file exists, and the crash removes it first: one crash per arming, so
//! the restarted driver (same environment) runs on. Only debug builds (the ones the integration
//! tests run) honour the variable: a release binary ignores it entirely.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The environment variable naming the step to crash at.
pub const CRASH_AT_ENV: &str = "HOLDFAST_TEST_CRASH_AT";

/// The step and arming file the environment names, read once.
fn configured() -> Option<&'static (String, Option<PathBuf>)> {
    static AT: OnceLock<Option<(String, Option<PathBuf>)>> = OnceLock::new();
    AT.get_or_init(|| {
        let v = std::env::var(CRASH_AT_ENV).ok()?;
        Some(match v.split_once('@') {
            Some((step, file)) => (step.to_owned(), Some(PathBuf::from(file))),
            None => (v, None),
        })
    })
    .as_ref()
}

/// Whether this is a debug build and the crash at `step` is armed (for a step that must first
/// set up the state a crash there would leave).
pub fn armed(step: &str) -> bool {
    if !cfg!(debug_assertions) {
        return false;
    }
    configured().is_some_and(|(s, file)| s == step && file.as_ref().is_none_or(|f| f.exists()))
}

/// Kills the process (SIGKILL: no destructor, no clean-up, as `kill -9`) when the crash at
/// `step` is [`armed`].
pub fn point(step: &str) {
    if !armed(step) {
        return;
    }
    if let Some((_, Some(file))) = configured() {
        let _ = std::fs::remove_file(file);
    }
    tracing::error!(step, "{CRASH_AT_ENV}: killing the process here");
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
}
