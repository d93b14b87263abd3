//! Tests of the copy job registry: a retry waits on the running job (never a second copy),
//! ABORTED while it runs, an error told once, the locks held for the job's life, and the
//! durable record a restarted driver finds.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::locks::Locks;

fn work(local: &str) -> Work {
    Work::Volume {
        pool: "p1".into(),
        request: CreateRequest {
            csi_name: format!("csi-{local}"),
            local: local.into(),
            capacity: 1 << 20,
            block: false,
            fs_type: Some("ext4".into()),
            source: Some(crate::pool::Source::Volume("src".into())),
            parameters: Default::default(),
            limit: 0,
            uid: "u".into(),
            source_uid: None,
            mutable: Default::default(),
        },
    }
}

/// A copy that runs until `gate` opens, counting how many were started.
fn gated(
    gate: &Arc<tokio::sync::Notify>,
    started: &Arc<AtomicUsize>,
    answer: Result<()>,
) -> impl Future<Output = Result<()>> + Send + 'static {
    let (gate, started) = (gate.clone(), started.clone());
    async move {
        started.fetch_add(1, Ordering::SeqCst);
        gate.notified().await;
        answer
    }
}

#[tokio::test]
async fn a_retry_waits_on_the_running_copy_and_never_starts_a_second() {
    let jobs = Jobs::unrecorded();
    let (gate, started) = (Arc::new(tokio::sync::Notify::new()), Arc::new(AtomicUsize::new(0)));
    let job = jobs.start(work("v1"), None, None, (), gated(&gate, &started, Ok(()))).await.unwrap();
    let err = jobs.wait(&job, Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(&err, Error::Aborted(m) if m.contains("in progress") && m.contains("csi-v1")), "{err}");

    // A retry finds the job; starting it again is refused, not a second copy.
    let found = jobs.find(&volume_key("v1")).expect("the running job is found");
    assert!(Arc::ptr_eq(&found, &job) && !found.ended());
    assert!(jobs.running(&volume_key("v1")));
    let again = jobs.start(work("v1"), None, None, (), gated(&gate, &started, Ok(()))).await.unwrap_err();
    assert!(matches!(again, Error::Aborted(_)), "{again}");

    let waiter = {
        let (jobs, found) = (jobs.clone(), found.clone());
        tokio::spawn(async move { jobs.wait(&found, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.notify_waiters();
    waiter.await.unwrap().expect("the waiting retry sees the copy finish");
    assert_eq!(started.load(Ordering::SeqCst), 1, "exactly one copy ran");
    assert!(jobs.find(&volume_key("v1")).is_none(), "a finished job is forgotten: the create finds the volume itself");
}

#[tokio::test]
async fn an_error_is_told_to_the_next_retry_once_then_forgotten() {
    let jobs = Jobs::unrecorded();
    let (gate, started) = (Arc::new(tokio::sync::Notify::new()), Arc::new(AtomicUsize::new(0)));
    let failing = gated(&gate, &started, Err(Error::ResourceExhausted("no room for the copy".into())));
    let job = jobs.start(work("v2"), None, None, (), failing).await.unwrap();
    // Nobody waits when it fails (the request's deadline passed).
    assert!(jobs.wait(&job, Duration::from_millis(20)).await.is_err());
    gate.notify_waiters();
    while !job.ended() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let kept = jobs.find(&volume_key("v2")).expect("the failed job waits for the next retry");
    let err = jobs.wait(&kept, Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(&err, Error::ResourceExhausted(m) if m == "no room for the copy"), "{err}");
    assert!(jobs.find(&volume_key("v2")).is_none(), "told once, then forgotten");
    // So the retry after it starts a fresh copy.
    let fresh = jobs.start(work("v2"), None, None, (), async { Ok(()) }).await.unwrap();
    jobs.wait(&fresh, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn the_answer_while_it_runs_says_how_far_the_copy_is() {
    let jobs = Jobs::unrecorded();
    let progress: Progress = Arc::new(|| Box::pin(async { Some((1 << 20, 4 << 20)) }));
    let job = jobs.start(work("v7"), None, Some(progress), (), std::future::pending()).await.unwrap();
    let err = jobs.wait(&job, Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(&err, Error::Aborted(m) if m.contains("25% of 4 MiB")), "{err}");
    // A pool that cannot tell in time does not delay the answer past its budget.
    let stuck: Progress = Arc::new(|| Box::pin(std::future::pending()));
    let job = jobs.start(work("v8"), None, Some(stuck), (), std::future::pending()).await.unwrap();
    let asked = Instant::now();
    let err = jobs.wait(&job, Duration::from_millis(200)).await.unwrap_err();
    assert!(asked.elapsed() < Duration::from_millis(400), "{:?}", asked.elapsed());
    assert!(matches!(&err, Error::Aborted(m) if m.contains("in progress") && !m.contains('%')), "{err}");
}

#[tokio::test]
async fn a_new_request_replaces_a_failed_job_nobody_was_told_of() {
    let jobs = Jobs::unrecorded();
    let job = jobs.start(work("v3"), None, None, (), async { Err(Error::Internal("cp failed".into())) }).await.unwrap();
    while !job.ended() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let next = jobs.start(work("v3"), None, None, (), async { Ok(()) }).await.expect("an ended job does not block a new one");
    jobs.wait(&next, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn the_job_holds_its_locks_until_it_ends() {
    let (jobs, locks) = (Jobs::unrecorded(), Locks::new());
    let key = || crate::locks::LockKey::new("p1", crate::locks::ObjectKind::Volume, "v4");
    let guard = locks.try_lock(key()).unwrap();
    let (gate, started) = (Arc::new(tokio::sync::Notify::new()), Arc::new(AtomicUsize::new(0)));
    let job = jobs.start(work("v4"), None, None, guard, gated(&gate, &started, Ok(()))).await.unwrap();
    while started.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(locks.try_lock(key()).is_err(), "the running copy holds the name's lock");
    gate.notify_waiters();
    jobs.wait(&job, Duration::from_secs(5)).await.unwrap();
    assert!(locks.try_lock(key()).is_ok(), "released when the copy ended");
}

#[tokio::test]
async fn a_request_tells_its_own_job_from_another_requests() {
    let jobs = Jobs::unrecorded();
    let asked = String::from("request one");
    let job = jobs.start(work("v5"), Some(Box::new(asked.clone())), None, (), std::future::pending()).await.unwrap();
    assert!(job.started_for(&asked));
    assert!(!job.started_for(&String::from("request two")));
    let restarted = jobs.start(work("v6"), None, None, (), std::future::pending()).await.unwrap();
    assert!(restarted.started_for(&asked), "a job restarted at start-up matches: the create after it checks compatibility");
}

#[tokio::test]
async fn a_killed_drivers_jobs_are_found_in_their_records_until_they_end() {
    let state = tempfile::tempdir().unwrap();
    let first = Jobs::new(state.path()).unwrap();
    first.start(work("k1"), None, None, (), std::future::pending()).await.unwrap();
    let snap = Work::Snapshot { pool: "p1".into(), source: "k1".into(), csi_name: "s".into(), local: "s1".into(), uid: "u1".into() };
    first.start(snap.clone(), None, None, (), std::future::pending()).await.unwrap();
    // A half-written record of a job that never started, and a damaged one.
    let copies = state.path().join("copies");
    std::fs::write(copies.join(".volume:k9.json.tmp"), b"{").unwrap();
    std::fs::write(copies.join("volume:k8.json"), b"not json").unwrap();

    // "Killed": a new registry on the same state directory.
    let second = Jobs::new(state.path()).unwrap();
    assert_eq!(second.recorded().await.unwrap(), vec![snap.clone(), work("k1")], "the damaged record is skipped");
    assert!(!copies.join(".volume:k9.json.tmp").exists(), "the half-written record is removed");

    // Run again, the job's record goes when it ends.
    let job = second.start(work("k1"), None, None, (), async { Ok(()) }).await.unwrap();
    second.wait(&job, Duration::from_secs(5)).await.unwrap();
    assert_eq!(second.recorded().await.unwrap(), vec![snap]);
}

#[test]
fn grpc_timeouts_parse_and_leave_a_margin() {
    struct Case {
        header: Option<&'static str>,
        want: Duration,
    }
    let cases = [
        Case { header: None, want: DEFAULT_WAIT },
        Case { header: Some("10S"), want: Duration::from_secs(9) },
        Case { header: Some("2000m"), want: Duration::from_millis(1800) },
        Case { header: Some("100m"), want: Duration::from_millis(50) },
        Case { header: Some("1H"), want: MAX_WAIT },
        Case { header: Some("5000000u"), want: Duration::from_millis(4500) },
        Case { header: Some("garbage"), want: DEFAULT_WAIT },
        Case { header: Some("123456789S"), want: DEFAULT_WAIT },
    ];
    for c in cases {
        let mut meta = tonic::metadata::MetadataMap::new();
        if let Some(h) = c.header {
            meta.insert("grpc-timeout", h.parse().unwrap());
        }
        assert_eq!(wait_budget(&meta), c.want, "{:?}", c.header);
    }
    assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
    assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
    assert_eq!(parse_grpc_timeout("S"), None);
    assert_eq!(parse_grpc_timeout("5x"), None);
}

#[test]
fn a_call_without_a_deadline_runs_to_its_end_and_waits_for_a_copy_the_default_time() {
    let mut meta = tonic::metadata::MetadataMap::new();
    let unbounded = call_budget(&meta);
    assert!(is_unbounded(unbounded));
    // What is left of it after a call's first steps is still no deadline.
    assert!(is_unbounded(unbounded - Duration::from_secs(3600)));
    assert_eq!(copy_wait(unbounded), DEFAULT_WAIT);
    meta.insert("grpc-timeout", "10S".parse().unwrap());
    let bounded = call_budget(&meta);
    assert_eq!(bounded, Duration::from_secs(9));
    assert!(!is_unbounded(bounded) && !is_unbounded(MAX_WAIT));
    assert_eq!(copy_wait(bounded), bounded);
    // Garbage is no deadline, as for wait_budget.
    meta.insert("grpc-timeout", "garbage".parse().unwrap());
    assert!(is_unbounded(call_budget(&meta)));
    let _ = std::time::Instant::now() + NO_DEADLINE;
}
