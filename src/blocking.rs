//! Blocking calls (fsync, statvfs, read_dir, mount-table reads, copies, mount syscalls) run
//! here, never on the async workers: each runs on tokio's blocking pool under a deadline. A call
//! stuck in the kernel (a hung NFS server, a frozen filesystem) makes only its own request fail
//! with DEADLINE_EXCEEDED; Probe and the other pools keep answering.
//!
//! A thread stuck in the kernel cannot be cancelled. So the calls that outlived their deadline
//! are counted per "domain" (a pool, a path): while a domain has [`MAX_STUCK`] of them still
//! running, new calls in it fail at once with UNAVAILABLE instead of taking another thread, so a
//! hung server can never exhaust the blocking pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};

/// How many calls of one domain may still be stuck past their deadline before the domain
/// refuses new calls.
pub const MAX_STUCK: usize = 4;

/// The default deadline of a metadata call (statvfs, fsync of a small file, a directory read).
pub const METADATA_DEADLINE: Duration = Duration::from_secs(10);

fn stuck_table() -> &'static Mutex<HashMap<String, usize>> {
    static T: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// How many calls of `domain` are running past their deadline now.
pub fn stuck(domain: &str) -> usize {
    stuck_table().lock().unwrap_or_else(|p| p.into_inner()).get(domain).copied().unwrap_or(0)
}

/// How many calls of every domain are running past their deadline now.
pub fn stuck_total() -> usize {
    stuck_table().lock().unwrap_or_else(|p| p.into_inner()).values().sum()
}

#[cfg(test)]
thread_local! {
    static HAND_OFFS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Test builds: the [`run`] calls made from this thread so far (a `#[tokio::test]` polls its
/// futures on its own thread, so a test counts its own hand-offs to the blocking pool).
#[cfg(test)]
pub fn hand_offs() -> usize {
    HAND_OFFS.with(|n| n.get())
}

/// Runs `f` on the blocking pool, waiting at most `deadline` for it. `domain` groups calls that
/// hang together (e.g. `"pool:p1"`, or a mount point); `what` says what the call does, for the
/// message ("statvfs of /var/lib/holdfast/p1").
///
/// Past the deadline the answer is `Error::DeadlineExceeded` and the call goes on in the
/// background, counted as stuck in its domain until it returns (its result is dropped).
pub async fn run<T, F>(domain: &str, what: &str, deadline: Duration, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    #[cfg(test)]
    HAND_OFFS.with(|n| n.set(n.get() + 1));
    let now_stuck = stuck(domain);
    if now_stuck >= MAX_STUCK {
        return Err(Error::Unavailable(format!(
            "{what}: {now_stuck} earlier calls on {domain} are still stuck in the kernel; \
             the storage behind it is hung or unreachable (check it, then retry)"
        )));
    }
    // `done` (set by the thread) and `counted` (set by the caller when it gives up) are only
    // touched under the table lock, so a call is uncounted exactly when it was counted.
    let done = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicBool::new(false));
    let (d, c, dom) = (done.clone(), counted.clone(), domain.to_owned());
    let handle = tokio::task::spawn_blocking(move || {
        let out = f();
        let mut t = stuck_table().lock().unwrap_or_else(|p| p.into_inner());
        d.store(true, Ordering::SeqCst);
        if c.load(Ordering::SeqCst) {
            if let Some(n) = t.get_mut(&dom) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    t.remove(&dom);
                }
            }
        }
        out
    });
    tokio::pin!(handle);
    tokio::select! {
        res = &mut handle => res.map_err(|e| Error::Internal(format!("{what}: the blocking task failed: {e}"))),
        () = tokio::time::sleep(deadline) => {
            {
                let mut t = stuck_table().lock().unwrap_or_else(|p| p.into_inner());
                if !done.load(Ordering::SeqCst) {
                    *t.entry(domain.to_owned()).or_default() += 1;
                    counted.store(true, Ordering::SeqCst);
                }
            }
            tracing::warn!(domain, what, deadline = ?deadline, "a blocking call outlived its deadline");
            Err(Error::DeadlineExceeded(format!(
                "{what} did not finish within {deadline:?}: the storage behind {domain} is hung or very slow"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_within_the_deadline_and_bounds_stuck_calls() {
        let v = run("test:fast", "adding", Duration::from_secs(5), || 2 + 2).await.unwrap();
        assert_eq!(v, 4);

        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..MAX_STUCK {
            let rx = rx.clone();
            let err = run("test:hung", "waiting", Duration::from_millis(20), move || {
                let _ = rx.lock().unwrap().recv();
            })
            .await
            .unwrap_err();
            assert!(matches!(err, Error::DeadlineExceeded(_)), "call {i}: {err}");
        }
        assert_eq!(stuck("test:hung"), MAX_STUCK);
        let err = run("test:hung", "waiting", Duration::from_secs(5), || ()).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(ref m) if m.contains("still stuck")), "{err}");
        // Other domains are not affected.
        run("test:other", "adding", Duration::from_secs(5), || ()).await.unwrap();

        drop(tx);
        for _ in 0..200 {
            if stuck("test:hung") == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stuck("test:hung"), 0, "finished calls are no longer counted");
        run("test:hung", "adding", Duration::from_secs(5), || ()).await.unwrap();
    }
}
