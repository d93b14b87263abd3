//! The freeze policy against a recording [`FakeExec`]: the order of record, freeze, operation,
//! thaw; every failure path thaws (or rightly does not); shared freezes; start-up recovery.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::exec::{FakeExec, Reply};
use crate::node::mount::FakeMounter;

/// A fake mount table with `/mnt/vol` (7:0) on it.
const MOUNTINFO: &str = "22 1 7:0 / /mnt/vol rw,relatime shared:1 - ext4 /dev/loop0 rw\n";

struct Fixture {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    fake: Arc<FakeExec>,
    freezer: Arc<Freezer>,
}

fn fixture(deadline: Duration) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let table = Arc::new(FakeMounter::new());
    for line in mountinfo::parse(MOUNTINFO).unwrap() {
        table.add_line(line);
    }
    let fake = Arc::new(FakeExec::new());
    let freezer = Arc::new(Freezer::new(&state, fake.clone()).unwrap().with_deadline(deadline).with_mounter(table));
    Fixture { _tmp: tmp, state, fake, freezer }
}

fn target(points: &[&str]) -> Target {
    Target {
        pool: "p1".into(),
        volume: "v1".into(),
        mount_points: points.iter().map(PathBuf::from).collect(),
        purpose: "snapshot s1".into(),
    }
}

fn fsfreeze_lines(fake: &FakeExec) -> Vec<String> {
    fake.lines().into_iter().filter(|l| l.starts_with("fsfreeze")).collect()
}

#[tokio::test]
async fn records_freezes_runs_thaws_and_removes_the_record() {
    let f = fixture(FROZEN_DEADLINE);
    let (state, fake) = (f.state.clone(), f.fake.clone());
    let seen = f
        .freezer
        .around(target(&["/mnt/vol"]), async move {
            // Inside the window: frozen, and the record is durable already.
            (fsfreeze_lines(&fake), records(&state).unwrap())
        })
        .await
        .unwrap();
    assert_eq!(seen.0, ["fsfreeze --freeze /mnt/vol"]);
    assert_eq!(seen.1.len(), 1);
    let r = &seen.1[0];
    assert_eq!((r.pool.as_str(), r.volume.as_str(), r.major_minor.as_str()), ("p1", "v1", "7:0"));
    assert_eq!(r.mount_point, Path::new("/mnt/vol"));
    assert_eq!(fsfreeze_lines(&f.fake), ["fsfreeze --freeze /mnt/vol", "fsfreeze --unfreeze /mnt/vol"]);
    assert!(records(&f.state).unwrap().is_empty(), "the record is removed after the thaw");
}

#[tokio::test]
async fn nothing_mounted_runs_the_operation_without_freezing() {
    let f = fixture(FROZEN_DEADLINE);
    assert_eq!(f.freezer.around(target(&[]), async { 7 }).await.unwrap(), 7);
    assert!(f.fake.lines().is_empty());
}

#[tokio::test]
async fn a_filesystem_that_cannot_be_frozen_is_failed_precondition_and_not_copied() {
    struct Case {
        name: &'static str,
        stderr: &'static str,
        want: &'static str,
    }
    let cases = [
        Case {
            name: "already frozen",
            stderr: "fsfreeze: /mnt/vol: freeze failed: Device or resource busy",
            want: "already frozen by something else",
        },
        Case {
            name: "no freeze support",
            stderr: "fsfreeze: /mnt/vol: freeze failed: Operation not supported",
            want: "does not support freezing",
        },
    ];
    for c in cases {
        let f = fixture(FROZEN_DEADLINE);
        f.fake.on("fsfreeze --freeze", vec![Reply::Fail(1, c.stderr.into())]);
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        let err =
            f.freezer.around(target(&["/mnt/vol"]), async move { r.store(true, std::sync::atomic::Ordering::SeqCst) }).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(ref m) if m.contains(c.want) && m.contains("/mnt/vol")), "{}: {err}", c.name);
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "{}: the copy ran unfrozen", c.name);
        // A failed freeze froze nothing: thawing could release someone else's freeze.
        assert_eq!(fsfreeze_lines(&f.fake), ["fsfreeze --freeze /mnt/vol"], "{}", c.name);
        assert!(records(&f.state).unwrap().is_empty(), "{}", c.name);
    }
}

#[tokio::test]
async fn an_operation_past_the_deadline_is_stopped_and_thawed() {
    let f = fixture(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let err = f.freezer.around(target(&["/mnt/vol"]), tokio::time::sleep(Duration::from_secs(30))).await.unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded(ref m) if m.contains("frozen")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "stopped at the deadline, not at the end of the operation");
    assert_eq!(fsfreeze_lines(&f.fake), ["fsfreeze --freeze /mnt/vol", "fsfreeze --unfreeze /mnt/vol"]);
    assert!(records(&f.state).unwrap().is_empty());
}

#[tokio::test]
async fn a_dropped_caller_still_thaws() {
    let f = fixture(FROZEN_DEADLINE);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (in_tx, in_rx) = tokio::sync::oneshot::channel::<()>();
    let freezer = f.freezer.clone();
    let call = tokio::spawn(async move {
        freezer
            .around(target(&["/mnt/vol"]), async move {
                let _ = in_tx.send(());
                let _ = rx.await;
            })
            .await
    });
    in_rx.await.unwrap();
    call.abort(); // the gRPC request is cancelled mid-copy
    assert!(call.await.unwrap_err().is_cancelled());
    assert_eq!(fsfreeze_lines(&f.fake), ["fsfreeze --freeze /mnt/vol"], "still frozen while the copy runs");
    tx.send(()).unwrap();
    for _ in 0..200 {
        if fsfreeze_lines(&f.fake).len() == 2 && records(&f.state).unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fsfreeze_lines(&f.fake), ["fsfreeze --freeze /mnt/vol", "fsfreeze --unfreeze /mnt/vol"]);
    assert!(records(&f.state).unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_thaw_is_the_error_and_keeps_the_record_until_a_retry_thaws() {
    let f = fixture(FROZEN_DEADLINE);
    f.fake.on(
        "fsfreeze --unfreeze",
        vec![Reply::Fail(1, "fsfreeze: /mnt/vol: unfreeze failed: Input/output error".into()), Reply::Ok(String::new())],
    );
    let err = f.freezer.around(target(&["/mnt/vol"]), async { Ok::<(), String>(()) }).await.unwrap_err();
    assert!(matches!(err, Error::Internal(ref m) if m.contains("fsfreeze --unfreeze /mnt/vol")), "{err}");
    assert_eq!(records(&f.state).unwrap().len(), 1, "the filesystem may be frozen: the record stays");
    // Not past the deadline yet: not reported as stuck.
    assert_eq!(f.freezer.stuck_since("p1", "v1").await, None);
    // The retry thaws what the record names first, then freezes anew.
    f.freezer.around(target(&["/mnt/vol"]), async {}).await.unwrap();
    assert_eq!(
        fsfreeze_lines(&f.fake),
        [
            "fsfreeze --freeze /mnt/vol",
            "fsfreeze --unfreeze /mnt/vol",
            "fsfreeze --unfreeze /mnt/vol",
            "fsfreeze --freeze /mnt/vol",
            "fsfreeze --unfreeze /mnt/vol"
        ]
    );
    assert!(records(&f.state).unwrap().is_empty());
}

#[tokio::test]
async fn concurrent_operations_share_one_freeze() {
    let f = fixture(FROZEN_DEADLINE);
    let (tx1, rx1) = tokio::sync::oneshot::channel::<()>();
    let (tx2, rx2) = tokio::sync::oneshot::channel::<()>();
    let (a, b) = (f.freezer.clone(), f.freezer.clone());
    let first = tokio::spawn(async move { a.around(target(&["/mnt/vol"]), async move { rx1.await.is_ok() }).await });
    while fsfreeze_lines(&f.fake).is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = tokio::spawn(async move { b.around(target(&["/mnt/vol"]), async move { rx2.await.is_ok() }).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx1.send(()).unwrap();
    assert!(first.await.unwrap().unwrap());
    // The first is done, the second still copies: it must still be frozen.
    assert_eq!(fsfreeze_lines(&f.fake), ["fsfreeze --freeze /mnt/vol"]);
    assert_eq!(records(&f.state).unwrap().len(), 1);
    tx2.send(()).unwrap();
    assert!(second.await.unwrap().unwrap());
    assert_eq!(fsfreeze_lines(&f.fake), ["fsfreeze --freeze /mnt/vol", "fsfreeze --unfreeze /mnt/vol"]);
    assert!(records(&f.state).unwrap().is_empty());
}

#[tokio::test]
async fn recovery_thaws_what_records_name_and_drops_what_is_gone() {
    let f = fixture(FROZEN_DEADLINE);
    let dir = f.state.join(RECORD_DIR);
    let rec = |mp: &str, mm: &str, boot: String| Record {
        pool: "p1".into(),
        volume: "v1".into(),
        mount_point: mp.into(),
        major_minor: mm.into(),
        boot_id: boot,
        started: 1,
        purpose: "snapshot s1".into(),
    };
    write_record(&dir, &rec("/mnt/vol", "7:0", boot_id())).unwrap();
    write_record(&dir, &rec("/mnt/gone", "7:1", boot_id())).unwrap();
    write_record(&dir, &rec("/mnt/other-boot", "7:2", "another-boot".into())).unwrap();
    // Half-written: its freeze never began.
    std::fs::write(dir.join("0123.json.tmp"), b"{").unwrap();
    // A frozen volume's record older than the deadline: abnormal.
    assert_eq!(f.freezer.stuck_since("p1", "v1").await, Some(1));
    assert_eq!(f.freezer.stuck_since("p1", "v2").await, None);
    let mut got = f.freezer.recover().await.unwrap();
    got.sort_by_key(|r| format!("{r:?}"));
    assert_eq!(
        got,
        [Recovered::Dropped("/mnt/gone".into()), Recovered::Dropped("/mnt/other-boot".into()), Recovered::Thawed("/mnt/vol".into())]
    );
    assert_eq!(fsfreeze_lines(&f.fake), ["fsfreeze --unfreeze /mnt/vol"], "only the mount still there is thawed");
    assert!(records(&f.state).unwrap().is_empty());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no temporaries left");
    assert_eq!(f.freezer.stuck_since("p1", "v1").await, None);
}

#[tokio::test]
async fn recovery_keeps_the_record_when_the_thaw_fails() {
    let f = fixture(FROZEN_DEADLINE);
    let r = Record {
        pool: "p1".into(),
        volume: "v1".into(),
        mount_point: "/mnt/vol".into(),
        major_minor: "7:0".into(),
        boot_id: boot_id(),
        started: unix_now(),
        purpose: "snapshot s1".into(),
    };
    write_record(&f.state.join(RECORD_DIR), &r).unwrap();
    f.fake.on("fsfreeze --unfreeze", vec![Reply::Fail(1, "fsfreeze: /mnt/vol: unfreeze failed: Input/output error".into())]);
    let got = f.freezer.recover().await.unwrap();
    assert!(matches!(&got[..], [Recovered::Failed(p, m)] if p == Path::new("/mnt/vol") && m.contains("still frozen")), "{got:?}");
    assert_eq!(records(&f.state).unwrap(), [r]);
}

#[tokio::test]
async fn a_thaw_of_a_filesystem_that_is_not_frozen_counts_as_thawed() {
    let f = fixture(FROZEN_DEADLINE);
    f.fake.on("fsfreeze --unfreeze", vec![Reply::Fail(1, "fsfreeze: /mnt/vol: unfreeze failed: Invalid argument".into())]);
    f.freezer.around(target(&["/mnt/vol"]), async {}).await.unwrap();
    assert!(records(&f.state).unwrap().is_empty());
}

// issue 12: group snapshots
fn target_of(volume: &str, points: &[&str]) -> Target {
    Target { volume: volume.into(), purpose: "group snapshot g1".into(), ..target(points) }
}

#[tokio::test]
async fn a_group_freezes_every_member_before_the_operation_and_thaws_them_all() {
    let f = fixture(FROZEN_DEADLINE);
    let fake = f.fake.clone();
    let targets = vec![target_of("v2", &["/mnt/b"]), target_of("v1", &["/mnt/a", "/mnt/vol"]), target_of("v3", &[])];
    let inside = f.freezer.around_all(targets, async move { fsfreeze_lines(&fake) }).await.unwrap();
    assert_eq!(inside, ["fsfreeze --freeze /mnt/a", "fsfreeze --freeze /mnt/b", "fsfreeze --freeze /mnt/vol"], "all frozen, in one order");
    let all = fsfreeze_lines(&f.fake);
    assert_eq!(&all[3..], ["fsfreeze --unfreeze /mnt/vol", "fsfreeze --unfreeze /mnt/b", "fsfreeze --unfreeze /mnt/a"]);
    assert!(records(&f.state).unwrap().is_empty());
}

#[tokio::test]
async fn a_member_that_cannot_be_frozen_fails_the_group_with_the_others_thawed() {
    let f = fixture(FROZEN_DEADLINE);
    f.fake.on("fsfreeze --freeze /mnt/b", vec![Reply::Fail(1, "fsfreeze: /mnt/b: freeze failed: Operation not supported".into())]);
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = ran.clone();
    let targets = vec![target_of("v1", &["/mnt/a"]), target_of("v2", &["/mnt/b"])];
    let err = f.freezer.around_all(targets, async move { r.store(true, std::sync::atomic::Ordering::SeqCst) }).await.unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("\"v2\"") && m.contains("/mnt/b")), "{err}");
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "the operation ran with a member not frozen");
    assert_eq!(fsfreeze_lines(&f.fake), ["fsfreeze --freeze /mnt/a", "fsfreeze --freeze /mnt/b", "fsfreeze --unfreeze /mnt/a"]);
    assert!(records(&f.state).unwrap().is_empty());
}
