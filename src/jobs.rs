//! Copies that outlive the request that started them. A clone, a restore or a copying snapshot
//! can take longer than any client deadline, and tonic drops a handler's future (killing its
//! commands) when the deadline passes: a copy run inside the request would restart from
//! scratch at every retry and never finish. So the copy runs as a detached task here, keyed by
//! the object it makes; the request only waits for it, bounded by its own deadline, and answers
//! ABORTED ("in progress, retry") while it runs. A retry finds the running job and waits on it
//! again (a second copy is never started); once the job is done the retry looks the object up
//! as any create does. A failed job's error goes to the next caller, then is forgotten, so the
//! retry after it starts cleanly.
//!
//! Each job is recorded durably (`<state dir>/copies/<key>.json`, written atomically) before it
//! starts and its record removed when it ends, so a driver killed mid-copy finds the record at
//! start-up: a volume copy runs again at once (the pool removes the half-made temporary
//! first); a snapshot's half-made copy is removed and the snapshot is taken again when its
//! request is retried, since taking it unasked would freeze and lock a volume in use.
//! The job holds the request's operation locks (moved into it) until it ends.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pool::CreateRequest;
use crate::store::Store;

/// How long a request waits for its copy when the client sent no deadline (`grpc-timeout`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest any request waits, whatever deadline it sent: an answer (even ABORTED) keeps
/// the orchestrator's view current.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// The work of one job: what the pool is asked to make, which is also what a restart re-runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// A volume made from a snapshot or another volume.
    Volume {
        /// The pool that makes it (the source's).
        pool: String,
        /// The request the pool gets, exactly.
        request: CreateRequest,
    },
    /// A snapshot of a volume.
    Snapshot {
        /// The pool holding the source.
        pool: String,
        /// The source volume's local name.
        source: String,
        /// The snapshot's CSI name.
        csi_name: String,
        /// The snapshot's local name.
        local: String,
        /// The uid recorded with the snapshot if this job makes it.
        uid: String,
    },
}

impl Work {
    /// The key of the object the job makes (`volume:<local>`, `snapshot:<local>`).
    pub fn key(&self) -> String {
        match self {
            Work::Volume { request, .. } => volume_key(&request.local),
            Work::Snapshot { local, .. } => snapshot_key(local),
        }
    }

    /// The pool that does the work.
    pub fn pool(&self) -> &str {
        match self {
            Work::Volume { pool, .. } | Work::Snapshot { pool, .. } => pool,
        }
    }

    /// The CSI name of the object made.
    pub fn csi_name(&self) -> &str {
        match self {
            Work::Volume { request, .. } => &request.csi_name,
            Work::Snapshot { csi_name, .. } => csi_name,
        }
    }

    /// "volume v" / "snapshot s", for messages.
    pub fn what(&self) -> String {
        match self {
            Work::Volume { request, .. } => format!("volume {}", crate::error::bounded(&request.csi_name)),
            Work::Snapshot { csi_name, .. } => format!("snapshot {}", crate::error::bounded(csi_name)),
        }
    }
}

/// The job key of the volume with local name `local`.
pub fn volume_key(local: &str) -> String {
    format!("volume:{local}")
}

/// The job key of the snapshot with local name `local`.
pub fn snapshot_key(local: &str) -> String {
    format!("snapshot:{local}")
}

/// How far a running copy is, when the pool can tell (`done` of `total` bytes).
pub type Progress = Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Option<(u64, u64)>> + Send>> + Send + Sync>;

/// The longest a progress report may delay an ABORTED answer.
const PROGRESS_WAIT: Duration = Duration::from_millis(100);

/// One job, running or ended with an error nobody has been told yet.
pub struct Job {
    work: Work,
    /// What the request that started it asked (secrets removed), to tell a retry of the same
    /// request from another request for the same name. `None` for a job restarted at start-up.
    asked: Option<Box<dyn std::any::Any + Send + Sync>>,
    started: SystemTime,
    since: Instant,
    progress: Option<Progress>,
    /// `None` while running; then the job's result until someone takes an error.
    outcome: Mutex<Option<Result<()>>>,
    done: tokio::sync::watch::Receiver<bool>,
}

impl Job {
    /// The work this job does.
    pub fn work(&self) -> &Work {
        &self.work
    }

    /// Whether the job started for a request equal to `asked` (a job restarted at start-up
    /// matches any request: the create that follows checks compatibility).
    pub fn started_for<T: PartialEq + 'static>(&self, asked: &T) -> bool {
        match &self.asked {
            None => true,
            Some(a) => a.downcast_ref::<T>().is_some_and(|a| a == asked),
        }
    }

    /// Whether the job has ended.
    pub fn ended(&self) -> bool {
        *self.done.borrow()
    }

    /// Resolves when the job has ended, whatever its outcome (which stays for its waiters).
    pub async fn finished(&self) {
        let mut done = self.done.clone();
        let _ = done.wait_for(|d| *d).await;
    }

    /// "copy of volume "v" in progress (40% of 1.0 GiB, running for 12 s since 1764600000), retry".
    fn in_progress(&self) -> Error {
        self.in_progress_at(None)
    }

    /// [`Job::in_progress`] with what the pool said of its progress.
    fn in_progress_at(&self, progress: Option<(u64, u64)>) -> Error {
        let pct = progress
            .filter(|(_, total)| *total > 0)
            .map(|(done, total)| format!("{}% of {}, ", (done.min(total) * 100) / total, crate::config::format_size(total)))
            .unwrap_or_default();
        let at = self.started.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Error::Aborted(format!(
            "copy of {} in progress ({pct}running for {} s, since {at} s after the epoch); retry the same request to wait for it",
            self.work.what(),
            self.since.elapsed().as_secs()
        ))
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("work", &self.work).field("started", &self.started).field("ended", &self.ended()).finish()
    }
}

/// The registry of copy jobs of one driver.
#[derive(Clone)]
pub struct Jobs {
    /// The records in `<state dir>/copies`; `None` keeps none (unit tests).
    store: Option<Store>,
    table: Arc<Mutex<HashMap<String, Arc<Job>>>>,
}

impl Jobs {
    /// A registry recording its jobs in `<state_dir>/copies` (made 0700).
    pub fn new(state_dir: &Path) -> Result<Jobs> {
        let store = Store::new(state_dir.join("copies"), "state-dir", crate::blocking::METADATA_DEADLINE)
            .described("copy record", "move it away: the copy's request, when retried, starts it afresh")
            .creating_dir();
        Ok(Jobs { store: Some(store), table: Arc::default() })
    }

    /// A registry that records nothing (a restart forgets its jobs): for unit tests.
    pub fn unrecorded() -> Jobs {
        Jobs { store: None, table: Arc::default() }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job making the object `key`, running or ended with an untold error.
    pub fn find(&self, key: &str) -> Option<Arc<Job>> {
        self.table().get(key).cloned()
    }

    /// Whether a job is making `key` now (a delete of it must wait).
    pub fn running(&self, key: &str) -> bool {
        self.find(key).is_some_and(|j| !j.ended())
    }

    /// Starts `run` as a detached job for `work`: records it, then spawns it holding `locks`
    /// until it ends. `asked` is the request it started for (see [`Job::started_for`]).
    /// A job already known for the same object is an ABORTED answer, never a second copy.
    pub async fn start<F, L>(
        &self,
        work: Work,
        asked: Option<Box<dyn std::any::Any + Send + Sync>>,
        progress: Option<Progress>,
        locks: L,
        run: F,
    ) -> Result<Arc<Job>>
    where
        F: Future<Output = Result<()>> + Send + 'static,
        L: Send + 'static,
    {
        let key = work.key();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let job = Arc::new(Job {
            work: work.clone(),
            asked,
            started: SystemTime::now(),
            since: Instant::now(),
            progress,
            outcome: Mutex::new(None),
            done: rx,
        });
        {
            let mut table = self.table();
            // An ended job left here holds an error nobody asked for: this request replaces it.
            if let Some(other) = table.get(&key).filter(|j| !j.ended()) {
                return Err(other.in_progress());
            }
            table.insert(key.clone(), job.clone());
        }
        // Durable before the copy starts: a kill from here on is found at start-up.
        if let Some(store) = &self.store {
            if let Err(e) = store.write(&key, &work).await {
                self.table().remove(&key);
                return Err(e);
            }
        }
        let (jobs, job2) = (self.clone(), job.clone());
        tokio::spawn(async move {
            let result = run.await;
            match &result {
                Ok(()) => tracing::info!(job = %key, "copy finished"),
                Err(e) => tracing::warn!(job = %key, error = %e, "copy failed; the next retry gets the error"),
            }
            if let Some(store) = &jobs.store {
                if let Err(e) = store.remove(&key).await {
                    // Harmless: a restart re-runs an idempotent create that finds the object.
                    tracing::warn!(job = %key, error = %e, "cannot remove the copy record");
                }
            }
            let failed = result.is_err();
            *job2.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            if !failed {
                // Done: from now on a create finds the object itself.
                let mut table = jobs.table();
                if table.get(&key).is_some_and(|j| Arc::ptr_eq(j, &job2)) {
                    table.remove(&key);
                }
            }
            // The locks go before the waiters wake, so the create they go on to can take them.
            drop(locks);
            let _ = tx.send(true);
        });
        Ok(job)
    }

    /// Waits up to `within` for `job`: `Ok(())` once it has finished (look the object up),
    /// its error once it failed (told once: the entry is then forgotten), ABORTED with its
    /// progress while it still runs.
    pub async fn wait(&self, job: &Arc<Job>, within: Duration) -> Result<()> {
        let mut done = job.done.clone();
        // A moment at the end of the wait is kept for asking the pool how far the copy is.
        let ask = if job.progress.is_some() { (within / 10).min(PROGRESS_WAIT) } else { Duration::ZERO };
        if tokio::time::timeout(within.saturating_sub(ask), done.wait_for(|d| *d)).await.is_err() {
            let progress = match &job.progress {
                Some(p) => tokio::time::timeout(ask, p()).await.ok().flatten(),
                None => None,
            };
            return Err(job.in_progress_at(progress));
        }
        let taken = {
            let mut outcome = job.outcome.lock().unwrap_or_else(|p| p.into_inner());
            match outcome.as_ref() {
                Some(Ok(())) => return Ok(()),
                Some(Err(_)) => outcome.take(),
                None => None,
            }
        };
        let mut table = self.table();
        let key = job.work.key();
        if table.get(&key).is_some_and(|j| Arc::ptr_eq(j, job)) {
            table.remove(&key);
        }
        match taken {
            Some(Err(e)) => Err(e),
            // Another waiter took the error: the next retry starts afresh.
            _ => Err(Error::Aborted(format!("the copy of {} failed (reported to another request); retry", job.work.what()))),
        }
    }

    /// Forgets the record of a job that is not run again (see [`crate::driver::Driver::recover`]).
    pub async fn discard_record(&self, key: &str) -> Result<()> {
        match &self.store {
            Some(store) => store.remove(key).await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// The jobs a killed predecessor recorded and never finished, to run again at start-up
    /// (before any job starts: half-written records are removed; a damaged one is skipped
    /// with a warning, and its create is retried by the orchestrator).
    pub async fn recorded(&self) -> Result<Vec<Work>> {
        let Some(store) = &self.store else { return Ok(Vec::new()) };
        store.clean_temporaries().await?;
        let mut out: Vec<Work> = store.list::<Work>().await?.into_iter().map(|(_, w)| w).collect();
        out.sort_by_key(|w| w.key());
        Ok(out)
    }
}

/// The budget of a call whose client sent no deadline (`grpc-timeout`): it runs to its end, as
/// the client asked. Far beyond any real deadline, and small enough that adding it to an
/// `Instant` cannot overflow; [`is_unbounded`] recognises it (and what is left of it).
pub const NO_DEADLINE: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Whether `budget` is [`NO_DEADLINE`] or what is left of it after a call's first steps.
pub fn is_unbounded(budget: Duration) -> bool {
    budget > Duration::from_secs(365 * 86_400)
}

/// The budget of a call routed by the controller: the client's deadline less a margin, as
/// [`wait_budget`], or [`NO_DEADLINE`] when it sent none (a copy is still waited for only
/// [`DEFAULT_WAIT`]: [`copy_wait`]).
pub fn call_budget(meta: &tonic::metadata::MetadataMap) -> Duration {
    client_deadline(meta).map_or(NO_DEADLINE, less_margin)
}

/// How long a call with `budget` waits for a copy job before answering ABORTED.
pub fn copy_wait(budget: Duration) -> Duration {
    if is_unbounded(budget) { DEFAULT_WAIT } else { budget }
}

/// What is left of a budget that ends at `deadline` (zero once it has passed).
pub fn left(deadline: std::time::Instant) -> Duration {
    deadline.saturating_duration_since(std::time::Instant::now())
}

/// How long a request may wait for its copy: a little less than the deadline the client sent
/// (`grpc-timeout`), so the answer arrives before the client gives up; [`DEFAULT_WAIT`] when
/// it sent none; never more than [`MAX_WAIT`].
pub fn wait_budget(meta: &tonic::metadata::MetadataMap) -> Duration {
    client_deadline(meta).map_or(DEFAULT_WAIT, less_margin)
}

/// The deadline the client sent (`grpc-timeout`), if it sent a valid one.
fn client_deadline(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    meta.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout)
}

/// A client's deadline less a tenth (at least 50 ms, at most 2 s) for the answer to travel,
/// never more than [`MAX_WAIT`].
fn less_margin(t: Duration) -> Duration {
    let margin = (t / 10).clamp(Duration::from_millis(50), Duration::from_secs(2));
    t.saturating_sub(margin).min(MAX_WAIT)
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
