//! What `holdfast bench` prints: the measurements as tables for people, or as one JSON object.
//! Medians are taken per step; the "ready" row is the median of each round's total, not the
//! sum of the step medians.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::Phases;
use super::stats::{Memory, Summary, format_duration, median, ms, ratio};
use crate::config::format_size;
use crate::ctl::show::{fields, table};

/// Every measurement of one run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Plugin name and version, as GetPluginInfo said.
    pub driver: String,
    /// The endpoint measured.
    pub endpoint: String,
    /// The driver's memory, when its pid was given.
    pub memory: Option<MemoryReport>,
    /// The size of the ready-to-use volumes.
    pub size: u64,
    /// The size of each volume of the CreateVolume series.
    pub create_size: u64,
    /// CreateVolume latencies (`None` when `--count 0`).
    pub create: Option<Summary>,
    /// DeleteVolume latencies.
    pub delete: Option<Summary>,
    /// How the series ran: concurrency, wall time, placement.
    pub series: Series,
    /// The agents' memory, when their pids were given.
    pub agents: Option<AgentsMemory>,
    /// One (holdfast, by hand) pair per round of the ready-volume comparison.
    pub rounds: Vec<(Phases, Phases)>,
}

/// The driver's memory at three moments.
#[derive(Debug, Clone, Copy)]
pub struct MemoryReport {
    /// The driver's pid.
    pub pid: u32,
    /// Before the benchmark sent anything but GetPluginInfo.
    pub idle: Memory,
    /// Right after the CreateVolume series, before the deletes.
    pub after_creates: Memory,
    /// At the end; its `hwm` is the peak over the driver's life.
    pub end: Memory,
}

/// How the CreateVolume series ran.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Calls at once (1: sequential).
    pub concurrency: usize,
    /// From the first create sent to the last one answered.
    pub wall: Option<Duration>,
    /// Volumes per node id, from the answers' topology ("" when an answer named none).
    pub placement: BTreeMap<String, usize>,
}

/// The memory of every agent, idle and after the creates.
#[derive(Debug, Clone)]
pub struct AgentsMemory {
    /// Before the series (one per agent).
    pub idle: Vec<Memory>,
    /// After the creates, before the deletes.
    pub after_creates: Vec<Memory>,
}

/// (min, median, max) of the RSS of several processes.
fn rss_spread(m: &[Memory]) -> Option<(u64, u64, u64)> {
    let mut rss: Vec<u64> = m.iter().map(|m| m.rss).collect();
    rss.sort_unstable();
    Some((*rss.first()?, rss[rss.len() / 2], *rss.last()?))
}

fn rss_text(m: &[Memory]) -> String {
    match rss_spread(m) {
        Some((min, med, max)) => format!("RSS min {}, median {}, max {}", format_size(min), format_size(med), format_size(max)),
        None => "-".into(),
    }
}

/// Volumes per node: (nodes, fewest, most).
fn spread(placement: &BTreeMap<String, usize>) -> Option<(usize, usize, usize)> {
    Some((placement.len(), *placement.values().min()?, *placement.values().max()?))
}

/// One row of the comparison: a step and how to get its time out of [`Phases`].
struct Step {
    name: &'static str,
    by_hand: &'static str,
    time: fn(&Phases) -> Duration,
}

const STEPS: [Step; 5] = [
    Step { name: "create", by_hand: "truncate", time: |p| p.create },
    Step { name: "stage", by_hand: "losetup, mkfs.ext4, mount", time: |p| p.stage },
    Step { name: "publish", by_hand: "mount --bind", time: |p| p.publish },
    Step { name: "ready", by_hand: "create + stage + publish", time: Phases::ready },
    Step { name: "teardown", by_hand: "umount x2, losetup -d, rm", time: |p| p.teardown },
];

/// The median of one step over the rounds: (holdfast, by hand).
fn step_medians(rounds: &[(Phases, Phases)], time: fn(&Phases) -> Duration) -> Option<(Duration, Duration)> {
    let hf: Vec<_> = rounds.iter().map(|(h, _)| time(h)).collect();
    let hand: Vec<_> = rounds.iter().map(|(_, b)| time(b)).collect();
    Some((median(&hf)?, median(&hand)?))
}

fn ratio_text(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

impl Report {
    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = format!("holdfast bench: {} at {}\n\n", self.driver, self.endpoint);
        if let Some(m) = &self.memory {
            out += &format!("driver memory (pid {})\n", m.pid);
            out += &fields(&[
                ("  idle", format!("RSS {}  (VmHWM {})", format_size(m.idle.rss), format_size(m.idle.hwm))),
                ("  after the creates", format!("RSS {}", format_size(m.after_creates.rss))),
                ("  at the end", format!("RSS {}  (VmHWM {})", format_size(m.end.rss), format_size(m.end.hwm))),
            ]);
            out += "\n";
        }
        if let Some(a) = &self.agents {
            out += &format!("agents' memory ({} agents)\n", a.idle.len());
            out += &fields(&[("  idle", rss_text(&a.idle)), ("  after the creates", rss_text(&a.after_creates))]);
            out += "\n";
        }
        if let (Some(c), Some(d)) = (&self.create, &self.delete) {
            let how = match self.series.concurrency {
                0 | 1 => "sequential calls".to_owned(),
                n => format!("calls, {n} at a time"),
            };
            out += &format!("CreateVolume / DeleteVolume: {} {how}, {} each\n", c.count, format_size(self.create_size));
            let row = |op: &str, s: &Summary| vec![op.to_owned(), format_duration(s.p50), format_duration(s.p99), format_duration(s.max)];
            out += &table(&["OP", "P50", "P99", "MAX"], &[row("create", c), row("delete", d)]);
            if self.series.concurrency > 1
                && let Some(w) = self.series.wall
            {
                out += &format!(
                    "  {} creates in {} ({:.0} per second)\n",
                    c.count,
                    format_duration(w),
                    c.count as f64 / w.as_secs_f64().max(1e-9)
                );
            }
            if let Some((nodes, min, max)) = spread(&self.series.placement).filter(|&(n, ..)| n > 1) {
                out += &format!("  placed on {nodes} nodes: {min} to {max} volumes each\n");
            }
            out += "\n";
        }
        if !self.rounds.is_empty() {
            out += &format!("a {} ext4 volume, ready to use: median of {} runs\n", format_size(self.size), self.rounds.len());
            let rows: Vec<Vec<String>> = STEPS
                .iter()
                .filter_map(|s| {
                    let (hf, hand) = step_medians(&self.rounds, s.time)?;
                    Some(vec![s.name.into(), format_duration(hf), format_duration(hand), ratio_text(ratio(hf, hand)), s.by_hand.into()])
                })
                .collect();
            out += &table(&["STEP", "HOLDFAST", "BY HAND", "RATIO", "BY HAND IS"], &rows);
        }
        out
    }

    /// The report as one JSON object (times in milliseconds, sizes in bytes).
    pub fn json(&self) -> Value {
        let summary = |s: &Option<Summary>| s.map(|s| json!({ "count": s.count, "p50": ms(s.p50), "p99": ms(s.p99), "max": ms(s.max) }));
        let mem = |m: &Memory| json!({ "rss_bytes": m.rss, "hwm_bytes": m.hwm });
        let phases = |p: &Phases| json!({ "create": ms(p.create), "stage": ms(p.stage), "publish": ms(p.publish), "ready": ms(p.ready()), "teardown": ms(p.teardown) });
        let steps: Vec<Value> = STEPS
            .iter()
            .filter_map(|s| {
                let (hf, hand) = step_medians(&self.rounds, s.time)?;
                Some(json!({ "step": s.name, "holdfast_ms": ms(hf), "by_hand_ms": ms(hand), "ratio": ratio(hf, hand).map(|r| (r * 1000.0).round() / 1000.0), "by_hand_is": s.by_hand }))
            })
            .collect();
        json!({
            "driver": self.driver,
            "endpoint": self.endpoint,
            "memory": self.memory.map(|m| json!({
                "pid": m.pid,
                "idle": mem(&m.idle),
                "after_creates": mem(&m.after_creates),
                "end": mem(&m.end),
            })),
            "agents": self.agents.as_ref().map(|a| json!({
                "count": a.idle.len(),
                "idle": a.idle.iter().map(mem).collect::<Vec<_>>(),
                "after_creates": a.after_creates.iter().map(mem).collect::<Vec<_>>(),
            })),
            "create_volume_ms": summary(&self.create),
            "concurrency": self.series.concurrency,
            "create_series_wall_ms": self.series.wall.map(ms),
            "placement": self.series.placement,
            "create_volume_size_bytes": self.create_size,
            "delete_volume_ms": summary(&self.delete),
            "ready_volume": {
                "size_bytes": self.size,
                "runs": self.rounds.len(),
                "median": steps,
                "rounds": self.rounds.iter().map(|(h, b)| json!({ "holdfast": phases(h), "by_hand": phases(b) })).collect::<Vec<_>>(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phases(create: u64, stage: u64, publish: u64, teardown: u64) -> Phases {
        let d = Duration::from_millis;
        Phases { create: d(create), stage: d(stage), publish: d(publish), teardown: d(teardown) }
    }

    fn report() -> Report {
        let s = |p50, p99, max| Summary {
            count: 3,
            p50: Duration::from_millis(p50),
            p99: Duration::from_millis(p99),
            max: Duration::from_millis(max),
        };
        let mem = |mib: u64| Memory { rss: mib << 20, hwm: (mib + 1) << 20 };
        Report {
            driver: "csi.holdfast.dev 0.1.0".into(),
            endpoint: "unix:///tmp/b/csi.sock".into(),
            memory: Some(MemoryReport { pid: 42, idle: mem(6), after_creates: mem(7), end: mem(8) }),
            size: 1 << 30,
            create_size: 256 << 20,
            create: Some(s(2, 5, 9)),
            delete: Some(s(1, 3, 4)),
            series: Series { concurrency: 1, wall: Some(Duration::from_millis(9)), placement: BTreeMap::from([(String::from("n1"), 3)]) },
            agents: None,
            rounds: vec![
                (phases(2, 100, 4, 50), phases(1, 80, 2, 40)),
                (phases(4, 300, 4, 60), phases(1, 90, 2, 40)),
                (phases(2, 120, 6, 70), phases(1, 100, 2, 40)),
            ],
        }
    }

    #[test]
    fn text() {
        let want = "\
holdfast bench: csi.holdfast.dev 0.1.0 at unix:///tmp/b/csi.sock

driver memory (pid 42)
  idle               RSS 6 MiB  (VmHWM 7 MiB)
  after the creates  RSS 7 MiB
  at the end         RSS 8 MiB  (VmHWM 9 MiB)

CreateVolume / DeleteVolume: 3 sequential calls, 256 MiB each
OP      P50      P99      MAX
create  2.00 ms  5.00 ms  9.00 ms
delete  1.00 ms  3.00 ms  4.00 ms

a 1 GiB ext4 volume, ready to use: median of 3 runs
STEP      HOLDFAST  BY HAND  RATIO  BY HAND IS
create    2.00 ms   1.00 ms  2.00x  truncate
stage     120.0 ms  90.0 ms  1.33x  losetup, mkfs.ext4, mount
publish   4.00 ms   2.00 ms  2.00x  mount --bind
ready     128.0 ms  93.0 ms  1.38x  create + stage + publish
teardown  60.0 ms   40.0 ms  1.50x  umount x2, losetup -d, rm
";
        assert_eq!(report().text(), want);
    }

    #[test]
    fn json() {
        let j = report().json();
        assert_eq!(j["memory"]["idle"]["rss_bytes"], 6 << 20);
        assert_eq!(j["create_volume_ms"]["p99"], 5.0);
        assert_eq!(j["ready_volume"]["runs"], 3);
        assert_eq!(j["ready_volume"]["median"][3]["step"], "ready");
        assert_eq!(j["ready_volume"]["median"][3]["holdfast_ms"], 128.0);
        assert_eq!(j["ready_volume"]["median"][3]["ratio"], 1.376);
        assert_eq!(j["ready_volume"]["rounds"][1]["holdfast"]["ready"], 308.0);
    }

    #[test]
    fn a_concurrent_series_across_agents() {
        let mem = |mib: u64| Memory { rss: mib << 20, hwm: mib << 20 };
        let placement = BTreeMap::from([("a".to_owned(), 400), ("b".to_owned(), 350), ("c".to_owned(), 250)]);
        let r = Report {
            memory: None,
            rounds: vec![],
            series: Series { concurrency: 16, wall: Some(Duration::from_secs(2)), placement },
            agents: Some(AgentsMemory { idle: vec![mem(4), mem(3), mem(5)], after_creates: vec![mem(6), mem(5), mem(7)] }),
            ..report()
        };
        let text = r.text();
        assert!(text.contains("agents' memory (3 agents)\n  idle               RSS min 3 MiB, median 4 MiB, max 5 MiB\n"), "{text}");
        assert!(text.contains("3 calls, 16 at a time, 256 MiB each"), "{text}");
        assert!(text.contains("  3 creates in 2.00 s (2 per second)\n  placed on 3 nodes: 250 to 400 volumes each\n"), "{text}");
        let j = r.json();
        assert_eq!(j["concurrency"], 16);
        assert_eq!(j["placement"]["b"], 350);
        assert_eq!(j["agents"]["count"], 3);
        assert_eq!(j["agents"]["after_creates"][2]["rss_bytes"], 7 << 20);
    }

    #[test]
    fn skipped_parts_are_left_out() {
        let r = Report { memory: None, create: None, delete: None, rounds: vec![], ..report() };
        assert_eq!(r.text(), "holdfast bench: csi.holdfast.dev 0.1.0 at unix:///tmp/b/csi.sock\n\n");
        assert_eq!(r.json()["memory"], Value::Null);
    }
}
