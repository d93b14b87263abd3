//! `holdfast bench --scale 100,10000`: how the driver's cost grows with the number of volumes
//! in the pool. At each level the pool is filled (16 creates at a time, not timed) up to that
//! many volumes of the benchmark's own, then timed: `--count` sequential CreateVolume calls
//! (each deleted again, so the level stays), the full ListVolumes listing at page size 100
//! right after those writes and again once they are settled (see [`SETTLE`]), and GetCapacity. Create+delete throughput at `--concurrency` is timed at the first level.
//! Everything it made is deleted at the end, also after a failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::stats::{Summary, format_duration, ms};
use super::{Csi, delete_all, timed_at_once, with_leftovers};
use crate::ctl::show::status;
use crate::proto::{GetCapacityRequest, ListVolumesRequest};

/// How many fill calls run at once.
const FILL_CONCURRENCY: usize = 16;
/// How many GetCapacity calls are timed per level.
const CAPACITY_CALLS: usize = 20;
/// The ListVolumes page size of the timed listing.
const PAGE: i32 = 100;
/// How long after the last write the settled listing starts: longer than the 2 s within which
/// the file pool does not trust a record file's stat (so it reads the record again), plus a
/// margin. One untimed listing then renews the stamps, and the timed one is what every later
/// listing of an unchanged pool costs.
const SETTLE: Duration = Duration::from_millis(2_200);

/// What one level measured.
#[derive(Debug, Clone)]
pub struct Level {
    /// Volumes in the pool (the benchmark's) while timing.
    pub volumes: usize,
    /// Sequential CreateVolume.
    pub create: Option<Summary>,
    /// The whole paginated listing right after the level's writes, and how many pages and
    /// entries it took.
    pub list: Duration,
    /// The same listing once the writes are settled: the steady state of an unchanged pool.
    pub list_settled: Duration,
    /// Pages of the listing.
    pub pages: usize,
    /// Entries the listing returned.
    pub listed: usize,
    /// GetCapacity.
    pub capacity: Option<Summary>,
}

/// Create+delete throughput at some concurrency.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Calls at once.
    pub concurrency: usize,
    /// Pairs (one create, one delete) timed.
    pub pairs: usize,
    /// Wall time of all of them.
    pub wall: Duration,
}

impl Throughput {
    /// Operations (creates and deletes) per second.
    pub fn ops_per_second(&self) -> f64 {
        (2 * self.pairs) as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Runs the levels (ascending); the filled volumes are deleted at the end.
pub(super) async fn run(
    csi: &Csi,
    levels: &[usize],
    count: usize,
    size: u64,
    run_id: &str,
) -> Result<(Vec<Level>, Option<Throughput>), String> {
    let mut filled: Vec<String> = Vec::new();
    let r = measure(csi, levels, count, size, run_id, &mut filled).await;
    let left = delete_all_at_once(csi, &filled).await;
    match r {
        Ok(v) if left.is_empty() => Ok(v),
        Ok(_) => Err(with_leftovers("the benchmark's volumes could not all be deleted".into(), left)),
        Err(e) => Err(with_leftovers(e, left)),
    }
}

async fn measure(
    csi: &Csi,
    levels: &[usize],
    count: usize,
    size: u64,
    run_id: &str,
    filled: &mut Vec<String>,
) -> Result<(Vec<Level>, Option<Throughput>), String> {
    let shared = Arc::new(csi.clone());
    let mut out = Vec::new();
    let mut throughput = None;
    for &level in levels {
        let start = filled.len();
        if level > start {
            let made = timed_at_once(level - start, FILL_CONCURRENCY, |i| {
                let (csi, name) = (shared.clone(), format!("fill-{run_id}-{}", start + i));
                async move { csi.create(&name, size).await }
            })
            .await;
            let mut failure = None;
            for (_, r) in made {
                match r {
                    Ok(id) => filled.push(id),
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            if let Some(e) = failure {
                return Err(format!("filling the pool to {level} volumes: {e}"));
            }
        }
        let mut creates = Vec::with_capacity(count);
        let mut written = Instant::now();
        for i in 0..count {
            let name = format!("scale-{run_id}-{level}-{i}");
            let t = Instant::now();
            let id = csi.create(&name, size).await?;
            creates.push(t.elapsed());
            csi.delete(&id).await?;
            written = Instant::now();
        }
        let t = Instant::now();
        let (pages, listed) = list_all(csi).await?;
        let list = t.elapsed();
        let mut capacity = Vec::with_capacity(CAPACITY_CALLS);
        for _ in 0..CAPACITY_CALLS {
            let req = GetCapacityRequest { parameters: csi.params.clone(), ..Default::default() };
            let t = Instant::now();
            csi.controller.clone().get_capacity(req).await.map_err(|s| format!("GetCapacity: {}", status(&s)))?;
            capacity.push(t.elapsed());
        }
        tokio::time::sleep(SETTLE.saturating_sub(written.elapsed())).await;
        list_all(csi).await?;
        let t = Instant::now();
        list_all(csi).await?;
        let list_settled = t.elapsed();
        if throughput.is_none() && csi.concurrency > 1 && count > 0 {
            throughput = Some(create_delete_throughput(&shared, count.max(200), size, run_id).await?);
        }
        let create = Summary::of(&creates);
        out.push(Level { volumes: filled.len(), create, list, list_settled, pages, listed, capacity: Summary::of(&capacity) });
    }
    Ok((out, throughput))
}

/// `pairs` creates and their deletes, `csi.concurrency` at once, each create followed by its
/// delete in the same task.
async fn create_delete_throughput(csi: &Arc<Csi>, pairs: usize, size: u64, run_id: &str) -> Result<Throughput, String> {
    let t = Instant::now();
    let results = timed_at_once(pairs, csi.concurrency, |i| {
        let (csi, name) = (csi.clone(), format!("tput-{run_id}-{i}"));
        async move {
            let id = csi.create(&name, size).await?;
            csi.delete(&id).await
        }
    })
    .await;
    let wall = t.elapsed();
    if let Some(e) = results.into_iter().find_map(|(_, r)| r.err()) {
        return Err(format!("create+delete at concurrency {}: {e}", csi.concurrency));
    }
    Ok(Throughput { concurrency: csi.concurrency, pairs, wall })
}

/// The whole listing, page by page: (pages, entries).
async fn list_all(csi: &Csi) -> Result<(usize, usize), String> {
    let (mut token, mut pages, mut listed) = (String::new(), 0, 0);
    loop {
        let req = ListVolumesRequest { max_entries: PAGE, starting_token: token };
        let page = csi.controller.clone().list_volumes(req).await.map_err(|s| format!("ListVolumes: {}", status(&s)))?.into_inner();
        pages += 1;
        listed += page.entries.len();
        if page.next_token.is_empty() {
            return Ok((pages, listed));
        }
        token = page.next_token;
    }
}

async fn delete_all_at_once(csi: &Csi, ids: &[String]) -> Vec<String> {
    let shared = Arc::new(csi.clone());
    let ids_arc = Arc::new(ids.to_vec());
    let results = timed_at_once(ids.len(), FILL_CONCURRENCY, |i| {
        let (csi, ids) = (shared.clone(), ids_arc.clone());
        async move { csi.delete(&ids[i]).await }
    })
    .await;
    let failed: Vec<String> = results.iter().zip(ids).filter(|((_, r), _)| r.is_err()).map(|(_, id)| id.clone()).collect();
    // One more, sequential try for those.
    delete_all(csi, &failed).await
}

/// The levels as a markdown table.
pub fn text(levels: &[Level], throughput: Option<Throughput>) -> String {
    let opt = |s: Option<Summary>, f: fn(&Summary) -> Duration| s.map(|s| format_duration(f(&s))).unwrap_or_else(|| "-".into());
    let mut t = String::from("\n## Cost against the number of volumes in the pool\n\n");
    t += "| volumes | CreateVolume p50 | CreateVolume p99 | ListVolumes, all pages of 100 | settled | pages | GetCapacity p50 |\n";
    t += "|---:|---:|---:|---:|---:|---:|---:|\n";
    for l in levels {
        t += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            l.volumes,
            opt(l.create, |s| s.p50),
            opt(l.create, |s| s.p99),
            format_duration(l.list),
            format_duration(l.list_settled),
            l.pages,
            opt(l.capacity, |s| s.p50)
        );
    }
    if let (Some(first), Some(last)) = (levels.first(), levels.last()) {
        if let (Some(a), Some(b)) = (first.create, last.create) {
            t += &format!(
                "\nCreateVolume p50 at {} volumes is {:.2}x its p50 at {}.\n",
                last.volumes,
                ms(b.p50) / ms(a.p50).max(1e-9),
                first.volumes
            );
        }
    }
    if let Some(tp) = throughput {
        t += &format!(
            "\nCreate+delete at concurrency {}: {} pairs in {}: {:.0} ops/s.\n",
            tp.concurrency,
            tp.pairs,
            format_duration(tp.wall),
            tp.ops_per_second()
        );
    }
    t
}

/// The levels as JSON (milliseconds).
pub fn json(levels: &[Level], throughput: Option<Throughput>) -> Value {
    let sum = |s: Option<Summary>| s.map(|s| json!({"count": s.count, "p50_ms": ms(s.p50), "p99_ms": ms(s.p99), "max_ms": ms(s.max)}));
    json!({
        "levels": levels.iter().map(|l| json!({
            "volumes": l.volumes,
            "create": sum(l.create),
            "list_all_ms": ms(l.list),
            "list_all_settled_ms": ms(l.list_settled),
            "list_pages": l.pages,
            "listed": l.listed,
            "capacity": sum(l.capacity),
        })).collect::<Vec<_>>(),
        "create_delete_throughput": throughput.map(|t| json!({
            "concurrency": t.concurrency,
            "pairs": t.pairs,
            "wall_ms": ms(t.wall),
            "ops_per_second": t.ops_per_second(),
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_counts_both_calls_of_a_pair() {
        let t = Throughput { concurrency: 16, pairs: 500, wall: Duration::from_secs(1) };
        assert_eq!(t.ops_per_second(), 1000.0);
    }

    #[test]
    fn the_table_names_the_growth_of_create() {
        let s = |ms| Summary::of(&[Duration::from_millis(ms)]);
        let ms = Duration::from_millis;
        let levels = [
            Level { volumes: 100, create: s(2), list: ms(5), list_settled: ms(4), pages: 1, listed: 100, capacity: s(1) },
            Level { volumes: 10_000, create: s(3), list: ms(90), list_settled: ms(60), pages: 100, listed: 10_000, capacity: s(1) },
        ];
        let t = text(&levels, None);
        assert!(t.contains("CreateVolume p50 at 10000 volumes is 1.50x its p50 at 100."), "{t}");
        assert!(t.contains("| 10000 | 3.00 ms | 3.00 ms | 90.0 ms | 60.0 ms | 100 |"), "{t}");
        assert_eq!(json(&levels, None)["levels"][1]["list_pages"], 100);
        assert_eq!(json(&levels, None)["levels"][1]["list_all_settled_ms"], 60.0);
    }
}
