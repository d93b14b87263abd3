//! `holdfast bench --ops`: every operation of a volume's life, each beside the same result
//! made with the raw tools by hand ([`super::recipe`]), `--count` times at each concurrency of
//! `--ops-concurrency` (default 1 and 16): p50/p99 and the ratio.
//!
//! | operation | set up first (not timed) | timed |
//! |---|---|---|
//! | create | — | CreateVolume |
//! | ready | — | CreateVolume, NodeStageVolume, NodePublishVolume |
//! | teardown | create, stage, publish | NodeUnpublishVolume, NodeUnstageVolume, DeleteVolume |
//! | snapshot | create | CreateSnapshot |
//! | restore | create, snapshot | CreateVolume from the snapshot |
//! | expand | create, stage, publish | ControllerExpandVolume + NodeExpandVolume to twice the size |
//!
//! Within one series all `--count` volumes are set up, then the timed part runs on all of them
//! (at most the concurrency at once), then everything is taken down. holdfast and by hand take
//! turns going first from series to series, so neither always meets a cold (or warm) cache.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};

use super::recipe::{Hand, Phase, Target, describe, describe_undo, has_steps};
use super::stats::{Memory, Summary, format_duration, ms, ratio};
use super::{Csi, until_not_aborted};
use crate::client::{self, Source, capacity};
use crate::config::format_size;
use crate::ctl::show::status;
use crate::exec::{Exec, RealExec};
use crate::proto::{ControllerExpandVolumeRequest, CreateSnapshotRequest, DeleteSnapshotRequest, NodeExpandVolumeRequest};

/// The operations measured, in the order of a volume's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// CreateVolume.
    Create,
    /// Create + NodeStage + NodePublish.
    Ready,
    /// NodeUnpublish + NodeUnstage + DeleteVolume.
    Teardown,
    /// CreateSnapshot.
    Snapshot,
    /// CreateVolume from a snapshot.
    Restore,
    /// ControllerExpandVolume + NodeExpandVolume.
    Expand,
}

/// Every operation, in report order.
pub const ALL: [Op; 6] = [Op::Create, Op::Ready, Op::Teardown, Op::Snapshot, Op::Restore, Op::Expand];

/// The timed part of an operation.
enum Timed {
    /// These phases.
    Phases(&'static [Phase]),
    /// Undoing everything the set-up made.
    Undo,
}

impl Op {
    /// The name `--ops` takes and the report shows.
    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Ready => "ready",
            Op::Teardown => "teardown",
            Op::Snapshot => "snapshot",
            Op::Restore => "restore",
            Op::Expand => "expand",
        }
    }

    /// Parses one name of `--ops`.
    pub fn parse(s: &str) -> Result<Op, String> {
        ALL.into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| format!("--ops: unknown operation {s:?} (create, ready, teardown, snapshot, restore, expand)"))
    }

    /// What the CSI side calls.
    pub fn calls(self) -> &'static str {
        match self {
            Op::Create => "CreateVolume",
            Op::Ready => "CreateVolume + NodeStage + NodePublish",
            Op::Teardown => "NodeUnpublish + NodeUnstage + DeleteVolume",
            Op::Snapshot => "CreateSnapshot",
            Op::Restore => "CreateVolume from a snapshot",
            Op::Expand => "ControllerExpand + NodeExpand",
        }
    }

    fn setup(self) -> &'static [Phase] {
        match self {
            Op::Create | Op::Ready => &[],
            Op::Teardown | Op::Expand => &[Phase::Create, Phase::Stage, Phase::Publish],
            Op::Snapshot => &[Phase::Create],
            Op::Restore => &[Phase::Create, Phase::Snapshot],
        }
    }

    fn timed(self) -> Timed {
        match self {
            Op::Create => Timed::Phases(&[Phase::Create]),
            Op::Ready => Timed::Phases(&[Phase::Create, Phase::Stage, Phase::Publish]),
            Op::Teardown => Timed::Undo,
            Op::Snapshot => Timed::Phases(&[Phase::Snapshot]),
            Op::Restore => Timed::Phases(&[Phase::Restore]),
            Op::Expand => Timed::Phases(&[Phase::Expand]),
        }
    }

    /// The by-hand commands of the timed part on `target` ("nothing to do" when there are none).
    pub fn by_hand(self, target: &Target) -> String {
        match self.timed() {
            Timed::Phases(p) => describe(target, p),
            Timed::Undo => describe_undo(target, self.setup()),
        }
    }

    /// Whether the timed part has any command by hand on `target`.
    fn has_hand_steps(self, target: &Target) -> bool {
        match self.timed() {
            Timed::Phases(p) => p.iter().any(|&p| has_steps(target, p)),
            Timed::Undo => true,
        }
    }
}

/// One operation at one concurrency.
#[derive(Debug, Clone)]
pub struct Row {
    /// The operation.
    pub op: Op,
    /// Calls at once.
    pub concurrency: usize,
    /// holdfast's latencies.
    pub holdfast: Option<Summary>,
    /// The same by hand (`None` when there is nothing to do by hand).
    pub by_hand: Option<Summary>,
    /// The commands typed by hand.
    pub by_hand_is: String,
    /// Why a side has no figures, when it failed.
    pub error: Option<String>,
}

/// Everything `--ops` measured.
#[derive(Debug, Clone)]
pub struct OpsReport {
    /// Plugin name and version.
    pub driver: String,
    /// The pool kind of the by-hand side.
    pub kind: String,
    /// Volume size (expand doubles it).
    pub size: u64,
    /// Calls per series.
    pub count: usize,
    /// The driver's memory before the first call and after the last (its VmHWM is the peak).
    pub memory: Option<(Memory, Memory)>,
    /// From the driver's start to its socket accepting (`--startup-ms`, measured by the caller).
    pub startup: Option<Duration>,
    /// The results, by operation then concurrency.
    pub rows: Vec<Row>,
}

/// Runs every operation of `ops` at every concurrency of `levels`: `count` calls per side,
/// in `rounds` turns of holdfast and by hand (which side goes first alternates from turn to
/// turn and from row to row), the turns' samples pooled.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    csi: &Csi,
    target: &Target,
    scratch: PathBuf,
    ops: &[Op],
    levels: &[usize],
    count: usize,
    rounds: usize,
    run_id: &str,
) -> Result<Vec<Row>, String> {
    let hf = Arc::new(Holdfast { csi: csi.clone(), size: csi.size });
    let hand = Arc::new(ByHand { exec: Arc::new(RealExec), target: target.clone(), size: csi.size });
    let mut rows = Vec::new();
    for (n, &op) in ops.iter().enumerate() {
        for (m, &c) in levels.iter().enumerate() {
            let hand_wanted = op.has_hand_steps(target);
            let mut a: Samples = Ok(Vec::new());
            let mut b: Result<Option<Vec<Duration>>, String> = Ok(hand_wanted.then(Vec::new));
            for (round, calls) in turns(count, rounds).into_iter().enumerate() {
                let tag = format!("{run_id}-{}-c{c}-r{round}", op.name());
                let dir = |side: &str| scratch.join(format!("{side}-{}-c{c}-r{round}", op.name()));
                let (hf_prefix, hand_prefix) = (format!("bench-{tag}"), format!("hand-{tag}"));
                let hf_series = || series(&hf, op, c, calls, &hf_prefix, dir("holdfast"));
                let hand_series = async || match hand_wanted {
                    true => series(&hand, op, c, calls, &hand_prefix, dir("hand")).await.map(Some),
                    false => Ok(None),
                };
                // A failed series has taken down what it made: the next ones still run, and the
                // row says what failed.
                let (x, y) = if (n + m + round) % 2 == 0 {
                    let x = hf_series().await;
                    (x, hand_series().await)
                } else {
                    let y = hand_series().await;
                    (hf_series().await, y)
                };
                pool_samples(&mut a, x);
                match (&mut b, y) {
                    (Ok(Some(all)), Ok(Some(more))) => all.extend(more),
                    (Ok(_), Err(e)) => b = Err(e),
                    _ => {}
                }
            }
            let error = [a.as_ref().err(), b.as_ref().err()].into_iter().flatten().cloned().collect::<Vec<_>>();
            rows.push(Row {
                op,
                concurrency: c,
                holdfast: a.ok().as_deref().and_then(Summary::of),
                by_hand: b.ok().flatten().as_deref().and_then(Summary::of),
                by_hand_is: op.by_hand(target),
                error: (!error.is_empty()).then(|| error.join("; ")),
            });
        }
    }
    Ok(rows)
}

/// The calls of each of `rounds` turns: `count` spread over them, the first ones one more.
fn turns(count: usize, rounds: usize) -> Vec<usize> {
    let rounds = rounds.max(1);
    (0..rounds).map(|r| count / rounds + usize::from(r < count % rounds)).collect()
}

/// One side's times of a row, or what failed.
type Samples = Result<Vec<Duration>, String>;

/// Adds one turn's samples to a side's: the first error stays the side's answer.
fn pool_samples(all: &mut Samples, turn: Samples) {
    match (all.as_mut(), turn) {
        (Ok(v), Ok(more)) => v.extend(more),
        (Ok(_), Err(e)) => *all = Err(e),
        (Err(_), _) => {}
    }
}

/// One side of the comparison: makes the phases of one volume, and undoes them.
#[async_trait]
trait Side: Send + Sync + 'static {
    type Item: Send + 'static;
    fn item(&self, name: String, dir: &std::path::Path) -> Self::Item;
    async fn run(&self, item: &mut Self::Item, phases: &[Phase]) -> Result<(), String>;
    async fn undo(&self, item: &mut Self::Item) -> Result<(), String>;
}

/// One series: `count` volumes set up, timed, taken down. The work directory `dir` gets one
/// subdirectory per volume (staging and target paths), removed at the end when empty.
async fn series<S: Side>(side: &Arc<S>, op: Op, c: usize, count: usize, prefix: &str, dir: PathBuf) -> Result<Vec<Duration>, String> {
    let dirs = make_dirs(&dir, count)?;
    let items: Vec<S::Item> = dirs.iter().enumerate().map(|(i, d)| side.item(format!("{prefix}-{i}"), d)).collect();
    let result = set_up_and_time(side, op, c, items).await;
    let (items, timed) = match result {
        Ok(v) => (v.0, Ok(v.1)),
        Err((items, e)) => (items, Err(e)),
    };
    let undone = each_at_once(items, c, {
        let side = side.clone();
        move |mut it| {
            let side = side.clone();
            async move {
                let r = side.undo(&mut it).await;
                (it, r)
            }
        }
    })
    .await;
    let undo_errors: Vec<String> = undone.into_iter().filter_map(|(_, r)| r.err()).collect();
    let removed = remove_dirs(&dir, &dirs);
    match (timed, undo_errors.is_empty()) {
        (Ok(t), true) => removed.map(|()| t),
        (Ok(_), false) => Err(format!("{}: taking down failed: {}", op.name(), undo_errors.join("; "))),
        (Err(e), true) => Err(e),
        (Err(e), false) => Err(format!("{e}; taking down failed too: {}", undo_errors.join("; "))),
    }
}

/// The items back with the values, or with the first error (the items are still to undo).
type Split<I, T> = Result<(Vec<I>, Vec<T>), (Vec<I>, String)>;

async fn set_up_and_time<S: Side>(side: &Arc<S>, op: Op, c: usize, items: Vec<S::Item>) -> Split<S::Item, Duration> {
    let setup = op.setup();
    let items = if setup.is_empty() {
        items
    } else {
        let done = each_at_once(items, c, {
            let side = side.clone();
            move |mut it| {
                let side = side.clone();
                async move {
                    let r = side.run(&mut it, setup).await;
                    (it, r)
                }
            }
        })
        .await;
        first_error(done, |e| format!("{}: setting up: {e}", op.name()))?.0
    };
    let done = each_at_once(items, c, {
        let side = side.clone();
        move |mut it| {
            let side = side.clone();
            async move {
                let t = Instant::now();
                let r = match op.timed() {
                    Timed::Phases(p) => side.run(&mut it, p).await,
                    Timed::Undo => side.undo(&mut it).await,
                };
                (it, r.map(|()| t.elapsed()))
            }
        }
    })
    .await;
    first_error(done, |e| format!("{} at concurrency {c}: {e}", op.name()))
}

/// Splits results into the items and the values; the first error, with every item, if any.
fn first_error<I, T>(done: Vec<(I, Result<T, String>)>, what: impl Fn(&str) -> String) -> Split<I, T> {
    let mut items = Vec::with_capacity(done.len());
    let mut values = Vec::with_capacity(done.len());
    let mut error = None;
    for (it, r) in done {
        items.push(it);
        match r {
            Ok(v) => values.push(v),
            Err(e) => error = error.or(Some(e)),
        }
    }
    match error {
        None => Ok((items, values)),
        Some(e) => Err((items, what(&e))),
    }
}

/// Runs `f` on every item, at most `c` at once; the results in the items' order.
async fn each_at_once<I, R, F, Fut>(items: Vec<I>, c: usize, f: F) -> Vec<(I, R)>
where
    I: Send + 'static,
    R: Send + 'static,
    F: Fn(I) -> Fut,
    Fut: Future<Output = (I, R)> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(c.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let n = items.len();
    for (i, it) in items.into_iter().enumerate() {
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let call = f(it);
        tasks.spawn(async move {
            let out = call.await;
            drop(slot);
            (i, out)
        });
    }
    let mut out: Vec<Option<(I, R)>> = (0..n).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        // A task panics only on a bug; its item is lost (and reported by the missing count).
        if let Ok((i, r)) = done {
            out[i] = Some(r);
        }
    }
    out.into_iter().flatten().collect()
}

fn make_dirs(dir: &std::path::Path, count: usize) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut made = Vec::with_capacity(count);
    for i in 0..count {
        let d = dir.join(i.to_string());
        for p in [d.clone(), d.join("staging"), d.join("target")] {
            std::fs::create_dir(&p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
        }
        made.push(d);
    }
    Ok(made)
}

/// remove_dir, never remove_dir_all: a directory still holding a mount must stay. A driver
/// may remove the target path itself on unpublish (the spec lets it).
fn remove_dirs(dir: &std::path::Path, dirs: &[PathBuf]) -> Result<(), String> {
    let mut all: Vec<PathBuf> = dirs.iter().flat_map(|d| [d.join("target"), d.join("staging"), d.clone()]).collect();
    all.push(dir.to_path_buf());
    for d in all {
        match std::fs::remove_dir(&d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("cannot remove {}: {e} (is something still mounted there?)", d.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

struct Holdfast {
    csi: Csi,
    size: u64,
}

/// What the holdfast side made of one volume, so that it is undone exactly.
struct HfItem {
    name: String,
    staging: String,
    target: String,
    volume: Option<String>,
    staged: bool,
    published: bool,
    snapshot: Option<String>,
    restored: Option<String>,
}

#[async_trait]
impl Side for Holdfast {
    type Item = HfItem;

    fn item(&self, name: String, dir: &std::path::Path) -> HfItem {
        HfItem {
            name,
            staging: dir.join("staging").to_string_lossy().into_owned(),
            target: dir.join("target").to_string_lossy().into_owned(),
            volume: None,
            staged: false,
            published: false,
            snapshot: None,
            restored: None,
        }
    }

    async fn run(&self, it: &mut HfItem, phases: &[Phase]) -> Result<(), String> {
        let csi = &self.csi;
        for phase in phases {
            let volume = || it.volume.clone().ok_or_else(|| "no volume made yet".to_owned());
            match phase {
                Phase::Create => it.volume = Some(csi.create(&it.name, self.size).await?),
                Phase::Stage => {
                    csi.stage(&volume()?, &it.staging).await?;
                    it.staged = true;
                }
                Phase::Publish => {
                    csi.publish(&volume()?, &it.staging, &it.target).await?;
                    it.published = true;
                }
                Phase::Snapshot => {
                    let req = CreateSnapshotRequest {
                        source_volume_id: volume()?,
                        name: format!("{}-snap", it.name),
                        parameters: csi.params.clone(),
                        ..Default::default()
                    };
                    let r = until_not_aborted(|| {
                        let (mut c, r) = (csi.controller.clone(), req.clone());
                        async move { c.create_snapshot(r).await }
                    })
                    .await
                    .map_err(|s| format!("CreateSnapshot: {}", status(&s)))?;
                    let s = r.into_inner().snapshot.ok_or("CreateSnapshot: the answer has no snapshot")?;
                    it.snapshot = Some(s.snapshot_id);
                }
                Phase::Restore => {
                    let snap = it.snapshot.clone().ok_or("no snapshot made yet")?;
                    let name = format!("{}-restored", it.name);
                    let mut req = client::create_volume_request(&name, capacity(self.size), csi.capability.clone(), csi.params.clone());
                    req.volume_content_source = Some(client::content_source(Source::Snapshot(&snap)));
                    let r = until_not_aborted(|| {
                        let (mut c, r) = (csi.controller.clone(), req.clone());
                        async move { c.create_volume(r).await }
                    })
                    .await
                    .map_err(|s| format!("CreateVolume {name}: {}", status(&s)))?;
                    it.restored = Some(r.into_inner().volume.ok_or("CreateVolume: the answer has no volume")?.volume_id);
                }
                Phase::Expand => {
                    let id = volume()?;
                    let req = ControllerExpandVolumeRequest {
                        volume_id: id.clone(),
                        capacity_range: Some(capacity(2 * self.size)),
                        volume_capability: Some(csi.capability.clone()),
                        ..Default::default()
                    };
                    let r = csi
                        .controller
                        .clone()
                        .controller_expand_volume(req)
                        .await
                        .map_err(|s| format!("ControllerExpandVolume: {}", status(&s)))?
                        .into_inner();
                    if r.node_expansion_required {
                        let req = NodeExpandVolumeRequest {
                            volume_id: id,
                            volume_path: it.target.clone(),
                            staging_target_path: it.staging.clone(),
                            capacity_range: Some(capacity(2 * self.size)),
                            volume_capability: Some(csi.capability.clone()),
                            ..Default::default()
                        };
                        csi.node.clone().node_expand_volume(req).await.map_err(|s| format!("NodeExpandVolume: {}", status(&s)))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Newest first; stops at the first failure (deleting a volume still mounted would be
    /// refused anyway).
    async fn undo(&self, it: &mut HfItem) -> Result<(), String> {
        let csi = &self.csi;
        if let Some(id) = &it.restored {
            csi.delete(id).await?;
            it.restored = None;
        }
        if let Some(id) = &it.snapshot {
            let req = DeleteSnapshotRequest { snapshot_id: id.clone(), ..Default::default() };
            until_not_aborted(|| {
                let (mut c, r) = (csi.controller.clone(), req.clone());
                async move { c.delete_snapshot(r).await }
            })
            .await
            .map_err(|s| format!("DeleteSnapshot {id}: {}", status(&s)))?;
            it.snapshot = None;
        }
        let Some(id) = it.volume.clone() else { return Ok(()) };
        if it.published {
            csi.unpublish(&id, &it.target).await?;
            it.published = false;
        }
        if it.staged {
            csi.unstage(&id, &it.staging).await?;
            it.staged = false;
        }
        csi.delete(&id).await?;
        it.volume = None;
        Ok(())
    }
}

struct ByHand {
    exec: Arc<RealExec>,
    target: Target,
    size: u64,
}

#[async_trait]
impl Side for ByHand {
    type Item = Hand;

    fn item(&self, name: String, dir: &std::path::Path) -> Hand {
        let work = dir.to_string_lossy().into_owned();
        let target = match &self.target {
            // The by-hand images sit in the volume's own work directory unless told otherwise.
            Target::File { dir: d } if d.is_empty() => Target::File { dir: work.clone() },
            t => t.clone(),
        };
        Hand::new(&target, &name, &work, self.size)
    }

    async fn run(&self, it: &mut Hand, phases: &[Phase]) -> Result<(), String> {
        it.run(self.exec.as_ref() as &dyn Exec, phases).await.map_err(|e| format!("by hand: {e}"))
    }

    async fn undo(&self, it: &mut Hand) -> Result<(), String> {
        it.undo(self.exec.as_ref() as &dyn Exec).await.map_err(|e| format!("by hand: {e}"))
    }
}

impl OpsReport {
    /// The markdown table.
    pub fn text(&self) -> String {
        let mut out = format!(
            "holdfast bench --ops: {} against the raw tools on a {} pool, {} volumes, {} calls per series\n\n",
            self.driver,
            self.kind,
            format_size(self.size),
            self.count
        );
        if let Some(s) = self.startup {
            out += &format!("start-up to a ready socket: {}\n", format_duration(s));
        }
        if let Some((idle, end)) = &self.memory {
            out += &format!(
                "driver memory: idle VmRSS {} (VmHWM {}); at the end VmRSS {}, peak VmHWM {}\n",
                format_size(idle.rss),
                format_size(idle.hwm),
                format_size(end.rss),
                format_size(end.hwm)
            );
        }
        out += "\n| operation | at once | holdfast p50 | holdfast p99 | by hand p50 | by hand p99 | ratio p50 | ratio p99 | by hand is |\n";
        out += "|---|---:|---:|---:|---:|---:|---:|---:|---|\n";
        let d = |s: Option<Summary>, f: fn(&Summary) -> Duration| s.map(|s| format_duration(f(&s))).unwrap_or_else(|| "-".into());
        let r = |a: Option<Summary>, b: Option<Summary>, f: fn(&Summary) -> Duration| {
            a.zip(b).and_then(|(a, b)| ratio(f(&a), f(&b))).map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
        };
        for row in &self.rows {
            let (h, b) = (row.holdfast, row.by_hand);
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.op.name(),
                row.concurrency,
                d(h, |s| s.p50),
                d(h, |s| s.p99),
                d(b, |s| s.p50),
                d(b, |s| s.p99),
                r(h, b, |s| s.p50),
                r(h, b, |s| s.p99),
                row.by_hand_is
            );
        }
        for row in self.rows.iter().filter(|r| r.error.is_some()) {
            out += &format!("\n{} at {} at once failed: {}\n", row.op.name(), row.concurrency, row.error.as_deref().unwrap_or_default());
        }
        out
    }

    /// The same as one JSON object (milliseconds, bytes).
    pub fn json(&self) -> Value {
        let sum =
            |s: Option<Summary>| s.map(|s| json!({ "count": s.count, "p50_ms": ms(s.p50), "p99_ms": ms(s.p99), "max_ms": ms(s.max) }));
        let round = |r: Option<f64>| r.map(|r| (r * 1000.0).round() / 1000.0);
        let mem = |m: &Memory| json!({ "rss_bytes": m.rss, "hwm_bytes": m.hwm });
        json!({
            "driver": self.driver,
            "kind": self.kind,
            "size_bytes": self.size,
            "count": self.count,
            "startup_ms": self.startup.map(ms),
            "memory": self.memory.as_ref().map(|(i, e)| json!({ "idle": mem(i), "end": mem(e) })),
            "ops": self.rows.iter().map(|r| json!({
                "op": r.op.name(),
                "calls": r.op.calls(),
                "concurrency": r.concurrency,
                "holdfast": sum(r.holdfast),
                "by_hand": sum(r.by_hand),
                "ratio_p50": round(r.holdfast.zip(r.by_hand).and_then(|(a, b)| ratio(a.p50, b.p50))),
                "ratio_p99": round(r.holdfast.zip(r.by_hand).and_then(|(a, b)| ratio(a.p99, b.p99))),
                "by_hand_is": r.by_hand_is,
                "error": r.error,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_parse_and_name_their_steps() {
        assert_eq!(Op::parse("restore"), Ok(Op::Restore));
        assert!(Op::parse("resize").unwrap_err().contains("unknown operation"));
        let file = Target::parse("file:/p").unwrap();
        assert_eq!(Op::Teardown.by_hand(&file), "umount, losetup, rm");
        assert_eq!(Op::Expand.by_hand(&file), "fallocate, losetup, resize2fs");
        let nfs = Target::parse("nfs:/e=s:/e").unwrap();
        assert!(!Op::Expand.has_hand_steps(&nfs));
        assert!(Op::Teardown.has_hand_steps(&nfs));
    }

    #[tokio::test]
    async fn at_once_keeps_the_order_and_the_limit() {
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let out = each_at_once((0..20).collect(), 4, |i: usize| {
            let (running, most) = (running.clone(), most.clone());
            async move {
                let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                (i, i * 10)
            }
        })
        .await;
        assert_eq!(out.iter().map(|(i, r)| (*i, *r)).collect::<Vec<_>>(), (0..20).map(|i| (i, i * 10)).collect::<Vec<_>>());
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[test]
    fn rounds_split_the_calls_and_pool_the_samples() {
        assert_eq!(turns(40, 4), [10, 10, 10, 10]);
        assert_eq!(turns(10, 4), [3, 3, 2, 2]);
        assert_eq!(turns(16, 1), [16]);
        assert_eq!(turns(5, 0), [5], "no rounds is one round");
        let ms = |v: &[u64]| v.iter().map(|&m| Duration::from_millis(m)).collect::<Vec<_>>();
        let mut all = Ok(ms(&[1, 2]));
        pool_samples(&mut all, Ok(ms(&[3])));
        assert_eq!(all, Ok(ms(&[1, 2, 3])));
        pool_samples(&mut all, Err("round 2 failed".into()));
        pool_samples(&mut all, Ok(ms(&[4])));
        assert_eq!(all, Err("round 2 failed".into()), "the first error stays");
    }

    #[test]
    fn the_first_error_keeps_every_item() {
        let done = vec![(1, Ok(10)), (2, Err("boom".to_owned())), (3, Ok(30)), (4, Err("later".to_owned()))];
        let (items, e) = first_error(done, |e| format!("op: {e}")).unwrap_err();
        assert_eq!((items, e.as_str()), (vec![1, 2, 3, 4], "op: boom"));
        assert_eq!(first_error(vec![(1, Ok::<_, String>(5))], |e| e.to_owned()).unwrap(), (vec![1], vec![5]));
    }

    fn report() -> OpsReport {
        let s = |p50, p99| Summary::of(&[Duration::from_millis(p50), Duration::from_millis(p99)]);
        let file = Target::parse("file:/p").unwrap();
        OpsReport {
            driver: "csi.holdfast.dev 0.1.0".into(),
            kind: "file".into(),
            size: 64 << 20,
            count: 2,
            memory: Some((Memory { rss: 5 << 20, hwm: 6 << 20 }, Memory { rss: 7 << 20, hwm: 9 << 20 })),
            startup: Some(Duration::from_millis(40)),
            rows: vec![
                Row {
                    op: Op::Create,
                    concurrency: 1,
                    holdfast: s(2, 4),
                    by_hand: s(1, 2),
                    by_hand_is: Op::Create.by_hand(&file),
                    error: None,
                },
                Row {
                    op: Op::Expand,
                    concurrency: 16,
                    holdfast: s(30, 90),
                    by_hand: None,
                    by_hand_is: "nothing to do".into(),
                    error: None,
                },
                Row {
                    op: Op::Restore,
                    concurrency: 1,
                    holdfast: None,
                    by_hand: s(5, 6),
                    by_hand_is: Op::Restore.by_hand(&file),
                    error: Some("restore at concurrency 1: boom".into()),
                },
            ],
        }
    }

    #[test]
    fn the_table_and_the_json() {
        let t = report().text();
        assert!(t.contains("start-up to a ready socket: 40.0 ms\n"), "{t}");
        assert!(t.contains("idle VmRSS 5 MiB (VmHWM 6 MiB); at the end VmRSS 7 MiB, peak VmHWM 9 MiB"), "{t}");
        assert!(t.contains("| create | 1 | 2.00 ms | 4.00 ms | 1.00 ms | 2.00 ms | 2.00x | 2.00x | fallocate |\n"), "{t}");
        assert!(t.contains("| expand | 16 | 30.0 ms | 90.0 ms | - | - | - | - | nothing to do |\n"), "{t}");
        let j = report().json();
        assert_eq!(j["ops"][0]["ratio_p50"], 2.0);
        assert_eq!(j["ops"][0]["by_hand"]["p99_ms"], 2.0);
        assert_eq!(j["ops"][1]["by_hand"], Value::Null);
        assert!(t.contains("| restore | 1 | - | - | 5.00 ms | 6.00 ms | - | - | cp |\n"), "{t}");
        assert!(t.ends_with("\nrestore at 1 at once failed: restore at concurrency 1: boom\n"), "{t}");
        assert_eq!(j["ops"][2]["error"], "restore at concurrency 1: boom");
        assert_eq!(j["startup_ms"], 40.0);
        assert_eq!(j["memory"]["end"]["hwm_bytes"], 9 << 20);
    }
}
