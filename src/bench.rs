//! `holdfast bench`: measures a running driver through its CSI socket. The driver's idle
//! memory (`/proc/PID/status`), CreateVolume / DeleteVolume latency over sequential calls (or
//! `--concurrency` at once: then also the throughput and where the volumes were placed, per
//! node), and the time to a ready-to-use ext4 volume (CreateVolume, NodeStage, NodePublish)
//! against the same made by hand with `truncate`, `losetup`, `mkfs.ext4` and `mount` in the same
//! run. Against `holdfast controller` (`--repeat 0`: it serves no Node), `--agent-pid` adds the
//! agents' memory.
//!
//! Everything the benchmark creates is removed again, also after a failure; inside the work
//! directory it only ever removes what it created itself, and directories only when empty.

pub mod by_hand;
pub mod ops;
pub mod plot;
pub mod recipe;
pub mod report;
pub mod scale;
pub mod stats;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::client::{self, Access, Clients, capacity, volume_capability};
use crate::config::format_size;
use crate::ctl::request::{parse_key_value, parse_size_arg, to_map};
use crate::ctl::show::status;
use crate::exec::RealExec;
use crate::proto::controller_client::ControllerClient;
use crate::proto::node_client::NodeClient;
use crate::proto::{DeleteVolumeRequest, GetCapacityRequest, GetPluginInfoRequest, VolumeCapability};
use report::{AgentsMemory, MemoryReport, Report, Series};
use stats::{Memory, Summary, read_memory};

/// `holdfast bench` arguments.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The driver's CSI endpoint (it must serve Identity, Controller and Node: all-in-one).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///run/holdfast/csi.sock")]
    pub endpoint: String,
    /// How many sequential CreateVolume (then DeleteVolume) calls to time; 0 skips them.
    #[arg(long, default_value_t = 200)]
    pub count: usize,
    /// Size of the ready-to-use volumes (holdfast and by hand).
    #[arg(long, value_parser = parse_size_arg, default_value = "1GiB")]
    pub size: u64,
    /// Size of each volume of the CreateVolume series. The pool must hold --count of them at
    /// once (it never overcommits), and a sparse file's creation time does not depend on its size.
    #[arg(long, value_parser = parse_size_arg, default_value = "64MiB")]
    pub create_size: Option<u64>,
    /// How many times to make a ready-to-use volume, with holdfast and by hand; 0 skips it.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Where the by-hand files, staging and target paths go (a fresh subdirectory is made and
    /// removed). Put it on the same filesystem as the pool for a fair comparison.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// The driver's pid: its memory is read from /proc/PID/status.
    #[arg(long)]
    pub driver_pid: Option<u32>,
    /// How many calls of the CreateVolume (and DeleteVolume) series run at once. Above 1 the
    /// report adds the throughput and how many volumes each node got (from each answer's
    /// topology): placement across a cluster's agents.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// The pid of an agent behind the controller measured (repeat for each): the agents'
    /// memory is reported idle and after the creates.
    #[arg(long = "agent-pid", value_name = "PID")]
    pub agent_pids: Vec<u32>,
    /// A CreateVolume parameter (pool=NAME); repeat for several.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub params: Vec<(String, String)>,
    /// The volumes' filesystem (the mount capability's fs_type): ext4, or `nfs` on an nfs
    /// pool, `zfs` on a pool of ZFS datasets.
    #[arg(long, default_value = "ext4")]
    pub fs_type: String,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Instead of the series above: fill the pool to each of these numbers of volumes
    /// (comma-separated, ascending; volumes of --create-size, 16 at a time) and time --count
    /// sequential creates, the full ListVolumes listing at page size 100 and GetCapacity at
    /// each; with --concurrency above 1, also create+delete throughput at the first level.
    /// Pass `--param provisioning=thin` on a file pool so 10,000 volumes need no real space.
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    pub scale: Vec<usize>,
    /// Instead of the series above: these operations (comma-separated, or `all`: create,
    /// ready, teardown, snapshot, restore, expand), each --count times at each concurrency of
    /// --ops-concurrency, beside the same done with the raw tools by hand (--by-hand).
    #[arg(long, value_delimiter = ',', value_name = "OP,OP,...")]
    pub ops: Vec<String>,
    /// The concurrencies of --ops (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "N,N,...", default_value = "1,16")]
    pub ops_concurrency: Vec<usize>,
    /// With --ops: split each series of --count calls into this many rounds, holdfast and by
    /// hand taking turns, so a change in the machine's load during a row weighs on both sides
    /// alike (the rows' samples are pooled; at least one call per round).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub ops_rounds: usize,
    /// Where and how --ops makes its by-hand volumes: file:DIR, lvm-thin:VG/THINPOOL,
    /// lvm-thick:VG, zfs:PARENT (zvols), zfs-dataset:PARENT, nfs:LOCAL_DIR=SERVER:/EXPORT.
    /// Default: file images in the work directory. Use the pool's own place for a fair
    /// comparison.
    #[arg(long, value_name = "KIND:WHERE", value_parser = recipe::Target::parse)]
    pub by_hand: Option<recipe::Target>,
    /// The driver's start-up time to a ready socket, measured by the caller (scripts/bench),
    /// to put in the --ops report.
    #[arg(long, value_name = "MS")]
    pub startup_ms: Option<f64>,
    /// Also draw the results (--ops: latency against concurrency; --scale: against the
    /// number of volumes) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// With --plot: draw these saved `--json` reports (--ops or --scale; repeat for several)
    /// instead of running anything.
    #[arg(long = "plot-from", value_name = "FILE.json")]
    pub plot_from: Vec<PathBuf>,
}

/// The times to one ready-to-use volume, step by step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Phases {
    /// CreateVolume, or `truncate`.
    pub create: Duration,
    /// NodeStageVolume, or `losetup` + `mkfs.ext4` + `mount`.
    pub stage: Duration,
    /// NodePublishVolume, or `mount --bind`.
    pub publish: Duration,
    /// Unpublish + unstage + delete, or `umount` ×2 + `losetup -d` + `rm`.
    pub teardown: Duration,
}

impl Phases {
    /// From nothing to a volume a container can use.
    pub fn ready(&self) -> Duration {
        self.create + self.stage + self.publish
    }
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    if !args.plot_from.is_empty() {
        let plot = args.plot.as_deref().ok_or("--plot-from needs --plot FILE.svg")?;
        let reports = args
            .plot_from
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                serde_json::from_str(&text).map_err(|e| format!("{} is not a `holdfast bench --json` report: {e}", p.display()))
            })
            .collect::<Result<Vec<serde_json::Value>, String>>()?;
        return plot::draw(&plot::series(&reports), plot);
    }
    let ops = parse_ops(&args.ops)?;
    let clients = Clients::connect(&args.endpoint).await?;
    let plugin = clients.identity.clone().get_plugin_info(GetPluginInfoRequest {}).await.map_err(|s| status(&s))?.into_inner();
    let csi = Csi::new(clients, &args)?;
    let scratch = Scratch::create(args.workdir.as_deref())?;
    // Distinct names across runs, so a run never meets the leftovers of an interrupted one.
    let run_id =
        format!("{:x}{:x}", std::process::id(), SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs());
    let memory = |pid: Option<u32>| pid.map(read_memory).transpose();
    if !args.scale.is_empty() {
        let mut levels = args.scale.clone();
        levels.sort_unstable();
        let (levels, throughput) = scale::run(&csi, &levels, args.count, args.create_size.unwrap_or(args.size), &run_id)
            .await
            .map_err(|e| scratch.finish::<()>(Err(e)).unwrap_err())?;
        scratch.finish(Ok(()))?;
        let json = scale::json(&levels, throughput);
        if args.json {
            println!("{json}");
        } else {
            print!("{}", scale::text(&levels, throughput));
        }
        return args.plot.as_deref().map_or(Ok(()), |p| plot::draw(&plot::series(&[json]), p));
    }
    if !ops.is_empty() {
        let target = args.by_hand.clone().unwrap_or(recipe::Target::File { dir: String::new() });
        let idle = memory(args.driver_pid)?;
        let levels: Vec<usize> = args.ops_concurrency.iter().map(|&c| c.max(1)).collect();
        let rounds = args.ops_rounds.clamp(1, args.count.max(1));
        let rows = ops::run(&csi, &target, scratch.dir.clone(), &ops, &levels, args.count, rounds, &run_id).await;
        let rows = scratch.finish(rows)?;
        let report = ops::OpsReport {
            driver: format!("{} {}", plugin.name, plugin.vendor_version),
            kind: target.kind().to_owned(),
            size: args.size,
            count: args.count,
            memory: idle.zip(memory(args.driver_pid)?),
            startup: args.startup_ms.map(|m| Duration::from_secs_f64(m.max(0.0) / 1000.0)),
            rows,
        };
        let json = report.json();
        if args.json {
            println!("{json}");
        } else {
            print!("{}", report.text());
        }
        return args.plot.as_deref().map_or(Ok(()), |p| plot::draw(&plot::series(&[json]), p));
    }

    let idle = memory(args.driver_pid)?;
    let agents_idle = agents_memory(&args.agent_pids)?;
    let latency = create_delete_latency(&csi, args.count, args.create_size.unwrap_or(args.size), &run_id).await;
    let after_creates = memory(args.driver_pid)?;
    let (series, after_creates, agents_after) = match latency {
        Ok(s) => {
            let (m, a) = (s.driver_after_creates, s.agents_after_creates.clone());
            (s, m.or(after_creates), a)
        }
        Err(e) => return scratch.finish(Err(e)),
    };
    let rounds = compare_ready(&csi, &scratch, args.repeat, &run_id).await;
    let rounds = scratch.finish(rounds)?;
    let end = memory(args.driver_pid)?;

    let report = Report {
        driver: format!("{} {}", plugin.name, plugin.vendor_version),
        endpoint: args.endpoint.clone(),
        memory: match (args.driver_pid, idle, after_creates, end) {
            (Some(pid), Some(idle), Some(after_creates), Some(end)) => Some(MemoryReport { pid, idle, after_creates, end }),
            _ => None,
        },
        size: args.size,
        create_size: args.create_size.unwrap_or(args.size),
        create: series.create,
        delete: series.delete,
        series: Series { concurrency: series.concurrency, wall: series.wall, placement: series.placement },
        agents: match (agents_idle, agents_after) {
            (Some(idle), Some(after_creates)) => Some(AgentsMemory { idle, after_creates }),
            _ => None,
        },
        rounds,
    };
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// `--ops create,ready` or `--ops all`.
fn parse_ops(names: &[String]) -> Result<Vec<ops::Op>, String> {
    if names.iter().any(|n| n == "all") {
        return Ok(ops::ALL.to_vec());
    }
    names.iter().map(|n| ops::Op::parse(n.trim())).collect()
}

/// The CSI clients and the request parts every call of the benchmark shares (clones share
/// the connection).
#[derive(Clone)]
struct Csi {
    controller: ControllerClient<tonic::transport::Channel>,
    node: NodeClient<tonic::transport::Channel>,
    size: u64,
    params: HashMap<String, String>,
    capability: VolumeCapability,
    driver_pid: Option<u32>,
    concurrency: usize,
    agent_pids: Vec<u32>,
}

impl Csi {
    fn new(clients: Clients, args: &BenchArgs) -> Result<Csi, String> {
        Ok(Csi {
            controller: clients.controller,
            node: clients.node,
            size: args.size,
            params: to_map(&args.params, "parameter")?,
            capability: volume_capability(&Access { fs: Some(args.fs_type.clone()), ..Access::default() })?,
            driver_pid: args.driver_pid,
            concurrency: args.concurrency.max(1) as usize,
            agent_pids: args.agent_pids.clone(),
        })
    }

    async fn create(&self, name: &str, size: u64) -> Result<String, String> {
        self.create_placed(name, size).await.map(|(id, _)| id)
    }

    /// CreateVolume; the id and the node the answer's topology names (empty if none).
    async fn create_placed(&self, name: &str, size: u64) -> Result<(String, String), String> {
        let req = client::create_volume_request(name, capacity(size), self.capability.clone(), self.params.clone());
        let resp = self.controller.clone().create_volume(req).await.map_err(|s| format!("CreateVolume {name}: {}", status(&s)))?;
        let v = resp.into_inner().volume.ok_or_else(|| format!("CreateVolume {name}: the answer has no volume"))?;
        let node = v.accessible_topology.iter().find_map(|t| t.segments.get(crate::placement::NODE_KEY)).cloned().unwrap_or_default();
        Ok((v.volume_id, node))
    }

    async fn delete(&self, id: &str) -> Result<(), String> {
        let req = DeleteVolumeRequest { volume_id: id.to_owned(), ..Default::default() };
        until_not_aborted(|| {
            let (mut c, r) = (self.controller.clone(), req.clone());
            async move { c.delete_volume(r).await }
        })
        .await
        .map(drop)
        .map_err(|s| format!("DeleteVolume {id}: {}", status(&s)))
    }

    async fn stage(&self, id: &str, staging: &str) -> Result<(), String> {
        let req = client::stage_request(id, staging, self.capability.clone());
        self.node.clone().node_stage_volume(req).await.map(drop).map_err(|s| format!("NodeStageVolume {id}: {}", status(&s)))
    }

    async fn publish(&self, id: &str, staging: &str, target: &str) -> Result<(), String> {
        let req = client::publish_request(id, staging, target, self.capability.clone(), false);
        self.node.clone().node_publish_volume(req).await.map(drop).map_err(|s| format!("NodePublishVolume {id}: {}", status(&s)))
    }

    async fn unpublish(&self, id: &str, target: &str) -> Result<(), String> {
        let req = client::unpublish_request(id, target);
        self.node.clone().node_unpublish_volume(req).await.map(drop).map_err(|s| format!("NodeUnpublishVolume {id}: {}", status(&s)))
    }

    async fn unstage(&self, id: &str, staging: &str) -> Result<(), String> {
        let req = client::unstage_request(id, staging);
        self.node.clone().node_unstage_volume(req).await.map(drop).map_err(|s| format!("NodeUnstageVolume {id}: {}", status(&s)))
    }
}

/// What the CreateVolume / DeleteVolume series measured.
struct SeriesResult {
    create: Option<Summary>,
    delete: Option<Summary>,
    concurrency: usize,
    /// From the first create sent to the last answered.
    wall: Option<Duration>,
    /// Volumes per node, from the answers' topology.
    placement: BTreeMap<String, usize>,
    driver_after_creates: Option<Memory>,
    agents_after_creates: Option<Vec<Memory>>,
}

/// The memory of every agent (`None` when no agent pid was given).
fn agents_memory(pids: &[u32]) -> Result<Option<Vec<Memory>>, String> {
    if pids.is_empty() {
        return Ok(None);
    }
    pids.iter().map(|&p| read_memory(p)).collect::<Result<Vec<_>, _>>().map(Some)
}

/// Runs `op` for `0..count`, at most `concurrency` at once; each result with its latency, in
/// index order.
async fn timed_at_once<T, F, Fut>(count: usize, concurrency: usize, op: F) -> Vec<(Duration, Result<T, String>)>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let call = op(i);
        tasks.spawn(async move {
            let t = Instant::now();
            let r = call.await;
            drop(slot);
            (i, t.elapsed(), r)
        });
    }
    let mut out: Vec<Option<(Duration, Result<T, String>)>> = (0..count).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((i, d, r)) => out[i] = Some((d, r)),
            Err(e) => return vec![(Duration::ZERO, Err(format!("a benchmark task failed: {e}")))],
        }
    }
    out.into_iter().flatten().collect()
}

/// Times `count` CreateVolume calls (`csi.concurrency` at once), then the DeleteVolume of
/// each. Also returns the driver's and agents' memory between the two series. On a failure
/// the volumes made so far are deleted.
async fn create_delete_latency(csi: &Csi, count: usize, size: u64, run_id: &str) -> Result<SeriesResult, String> {
    check_room(csi, count, size).await?;
    let shared = Arc::new(csi.clone());
    let started = Instant::now();
    let results = timed_at_once(count, csi.concurrency, |i| {
        let (csi, name) = (shared.clone(), format!("bench-{run_id}-{i}"));
        async move { csi.create_placed(&name, size).await }
    })
    .await;
    let wall = (count > 0).then(|| started.elapsed());
    let mut ids = Vec::with_capacity(count);
    let mut creates = Vec::with_capacity(count);
    let mut placement = BTreeMap::new();
    let mut failure = None;
    for (d, r) in results {
        match r {
            Ok((id, node)) => {
                ids.push(id);
                creates.push(d);
                *placement.entry(node).or_insert(0) += 1;
            }
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        let leftovers = delete_all(csi, &ids).await;
        return Err(with_leftovers(format!("after {} volumes: {e}", ids.len()), leftovers));
    }
    let memory = csi.driver_pid.map(read_memory).transpose()?;
    let agents = agents_memory(&csi.agent_pids)?;
    let ids = Arc::new(ids);
    let results = timed_at_once(ids.len(), csi.concurrency, |i| {
        let (csi, ids) = (shared.clone(), ids.clone());
        async move { csi.delete(&ids[i]).await }
    })
    .await;
    let mut deletes = Vec::with_capacity(count);
    let mut left = Vec::new();
    let mut failure = None;
    for (i, (d, r)) in results.into_iter().enumerate() {
        match r {
            Ok(()) => deletes.push(d),
            Err(e) => {
                failure = failure.or(Some(e));
                left.push(ids[i].clone());
            }
        }
    }
    if let Some(e) = failure {
        let leftovers = delete_all(csi, &left).await;
        return Err(with_leftovers(e, leftovers));
    }
    Ok(SeriesResult {
        create: Summary::of(&creates),
        delete: Summary::of(&deletes),
        concurrency: csi.concurrency,
        wall,
        placement,
        driver_after_creates: memory,
        agents_after_creates: agents,
    })
}

/// Fails early, with advice, when the pool cannot hold all the volumes of the series at once
/// (rather than after filling it). A driver without GetCapacity is not checked.
async fn check_room(csi: &Csi, count: usize, size: u64) -> Result<(), String> {
    let req =
        GetCapacityRequest { volume_capabilities: vec![csi.capability.clone()], parameters: csi.params.clone(), accessible_topology: None };
    let available = match csi.controller.clone().get_capacity(req).await {
        Ok(r) => r.into_inner().available_capacity,
        Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(()),
        Err(s) => return Err(format!("GetCapacity: {}", status(&s))),
    };
    match series_fits(count, size, available) {
        Ok(()) => Ok(()),
        Err(need) => Err(format!(
            "the pool has {} free but {count} volumes of {} need {}: pass a smaller --create-size or --count",
            format_size(u64::try_from(available).unwrap_or(0)),
            format_size(size),
            format_size(need)
        )),
    }
}

/// Whether `count` volumes of `size` fit in `available` bytes; the bytes needed when not.
/// An `available` of 0 means the driver does not know, which is not a reason to stop.
fn series_fits(count: usize, size: u64, available: i64) -> Result<(), u64> {
    let need = size.saturating_mul(count as u64);
    match u64::try_from(available) {
        Ok(a) if a > 0 && need > a => Err(need),
        _ => Ok(()),
    }
}

/// Deletes volumes after a failure, best effort; returns the ids that could not be deleted.
async fn delete_all(csi: &Csi, ids: &[String]) -> Vec<String> {
    let mut left = Vec::new();
    for id in ids {
        if csi.delete(id).await.is_err() {
            left.push(id.clone());
        }
    }
    left
}

/// How long the bench calls again a request answered ABORTED.
const ABORTED_PATIENCE: Duration = Duration::from_secs(600);

/// Makes the call `f` makes again while it answers ABORTED (an operation on the same object,
/// or a copy it waits for, still in progress), as the CO's sidecars do, for at most
/// [`ABORTED_PATIENCE`]; the waiting counts as the call's time.
pub(crate) async fn until_not_aborted<T, F, Fut>(mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match f().await {
            Err(s) if s.code() == tonic::Code::Aborted && start.elapsed() < ABORTED_PATIENCE => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

fn with_leftovers(err: String, left: Vec<String>) -> String {
    if left.is_empty() { err } else { format!("{err}; these volumes could not be deleted, delete them by hand: {}", left.join(", ")) }
}

/// Makes a ready-to-use volume `repeat` times with holdfast and by hand, alternating which
/// goes first so that neither always meets a cold (or warm) page cache.
async fn compare_ready(csi: &Csi, scratch: &Scratch, repeat: usize, run_id: &str) -> Result<Vec<(Phases, Phases)>, String> {
    let mut rounds = Vec::with_capacity(repeat);
    for i in 0..repeat {
        let name = format!("bench-{run_id}-ready-{i}");
        let (hf, hand) = if i % 2 == 0 {
            let hf = scratch.with_dirs(&format!("holdfast-{i}"), async |p| holdfast_ready(csi, &name, p).await).await?;
            (hf, scratch.with_dirs(&format!("hand-{i}"), async |p| by_hand::run(&RealExec, p, csi.size).await).await?)
        } else {
            let hand = scratch.with_dirs(&format!("hand-{i}"), async |p| by_hand::run(&RealExec, p, csi.size).await).await?;
            (scratch.with_dirs(&format!("holdfast-{i}"), async |p| holdfast_ready(csi, &name, p).await).await?, hand)
        };
        rounds.push((hf, hand));
    }
    Ok(rounds)
}

/// What the holdfast side has set up so far, so that a failure half-way is undone exactly.
#[derive(Debug, Default)]
struct Made {
    volume: Option<String>,
    staged: bool,
    published: bool,
}

/// CreateVolume + NodeStage + NodePublish, timed, then taken down (timed too).
async fn holdfast_ready(csi: &Csi, name: &str, paths: &by_hand::Paths) -> Result<Phases, String> {
    let (staging, target) = (utf8(&paths.staging)?, utf8(&paths.target)?);
    let mut made = Made::default();
    let set_up = async {
        let t = Instant::now();
        let id = csi.create(name, csi.size).await?;
        made.volume = Some(id.clone());
        let create = t.elapsed();
        let t = Instant::now();
        csi.stage(&id, staging).await?;
        made.staged = true;
        let stage = t.elapsed();
        let t = Instant::now();
        csi.publish(&id, staging, target).await?;
        made.published = true;
        Ok::<_, String>((create, stage, t.elapsed()))
    }
    .await;
    let t = Instant::now();
    let taken_down = holdfast_take_down(csi, &made, staging, target).await;
    let teardown = t.elapsed();
    match (set_up, taken_down) {
        (Ok((create, stage, publish)), Ok(())) => Ok(Phases { create, stage, publish, teardown }),
        (Ok(_), Err(e)) => Err(format!("holdfast: taking the volume down failed: {e}")),
        (Err(e), Ok(())) => Err(format!("holdfast: {e}")),
        (Err(e), Err(c)) => Err(format!("holdfast: {e}; taking it down failed too: {c}")),
    }
}

/// Unpublish, unstage, delete: whatever `made` says was done, in reverse order. Stops at the
/// first failure: deleting a volume that is still mounted would be refused anyway.
async fn holdfast_take_down(csi: &Csi, made: &Made, staging: &str, target: &str) -> Result<(), String> {
    let Some(id) = &made.volume else { return Ok(()) };
    if made.published {
        csi.unpublish(id, target).await?;
    }
    if made.staged {
        csi.unstage(id, staging).await?;
    }
    csi.delete(id).await
}

fn utf8(p: &Path) -> Result<&str, String> {
    p.to_str().ok_or_else(|| format!("path {} is not UTF-8", p.display()))
}

/// The benchmark's own directory: made fresh, and removed at the end only when empty (a
/// directory that is not empty still holds something that was not cleaned up, maybe a mount).
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn create(parent: Option<&Path>) -> Result<Scratch, String> {
        let parent = parent.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
        let dir = parent.join(format!("holdfast-bench-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create the work directory {}: {e}", dir.display()))?;
        Ok(Scratch { dir })
    }

    /// Runs `f` with fresh staging and target directories under `name`, removed afterwards.
    async fn with_dirs<T>(&self, name: &str, f: impl AsyncFnOnce(&by_hand::Paths) -> Result<T, String>) -> Result<T, String> {
        let base = self.dir.join(name);
        let paths = by_hand::Paths { file: base.join("volume.img"), staging: base.join("staging"), target: base.join("target") };
        for d in [&base, &paths.staging, &paths.target] {
            std::fs::create_dir(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        let result = f(&paths).await;
        // remove_dir, never remove_dir_all: a directory still holding a mount must stay. A
        // driver may remove the target path itself on unpublish (the spec lets it).
        let removed = [&paths.target, &paths.staging, &base].iter().try_for_each(|d| match std::fs::remove_dir(d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("cannot remove {}: {e} (is something still mounted there?)", d.display()))
            }
            _ => Ok(()),
        });
        let value = result?;
        removed.map(|()| value)
    }

    /// Removes the directory and passes `result` on; a failure to remove is reported with it.
    fn finish<T>(&self, result: Result<T, String>) -> Result<T, String> {
        let removed = std::fs::remove_dir(&self.dir).map_err(|e| format!("cannot remove the work directory {}: {e}", self.dir.display()));
        match (result, removed) {
            (Ok(v), Ok(())) => Ok(v),
            (Ok(_), Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(r)) => Err(format!("{e}; {r}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call answered ABORTED is made again, as a CO does; any other answer is final.
    #[tokio::test]
    async fn aborted_calls_are_made_again_and_other_errors_are_not() {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let r = until_not_aborted(|| {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { if n < 2 { Err(tonic::Status::aborted("copy in progress")) } else { Ok(n) } }
        })
        .await;
        assert_eq!(r.unwrap(), 2, "two ABORTED answers, then the answer");
        calls.store(0, std::sync::atomic::Ordering::SeqCst);
        let r: Result<(), _> = until_not_aborted(|| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Err(tonic::Status::failed_precondition("in use")) }
        })
        .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::FailedPrecondition);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "no retry of another code");
    }

    #[test]
    fn phases_add_up() {
        let p = Phases {
            create: Duration::from_millis(1),
            stage: Duration::from_millis(2),
            publish: Duration::from_millis(3),
            teardown: Duration::from_secs(9),
        };
        assert_eq!(p.ready(), Duration::from_millis(6));
    }

    #[tokio::test]
    async fn scratch_directories_are_fresh_and_removed() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(Some(parent.path())).unwrap();
        assert!(Scratch::create(Some(parent.path())).is_err(), "a second run must not share the directory");
        let seen = scratch.with_dirs("a", async |p| Ok((p.staging.is_dir(), p.target.is_dir(), p.file.exists()))).await.unwrap();
        assert_eq!(seen, (true, true, false));
        // A driver that removed the target path itself is fine.
        scratch.with_dirs("gone", async |p| std::fs::remove_dir(&p.target).map_err(|e| e.to_string())).await.unwrap();
        // Something left inside is never deleted: the error says so and the data stays.
        let err =
            scratch.with_dirs("b", async |p| std::fs::write(p.target.join("data"), b"x").map_err(|e| e.to_string())).await.unwrap_err();
        assert!(err.contains("still mounted"), "{err}");
        assert!(scratch.dir.join("b/target/data").exists());
        assert!(scratch.finish(Ok(())).is_err());
        std::fs::remove_dir_all(scratch.dir.join("b")).unwrap();
        scratch.finish(Ok(())).unwrap();
        assert!(!scratch.dir.exists());
    }

    #[test]
    fn room_for_the_series() {
        assert_eq!(series_fits(200, 1 << 30, 300 << 30), Ok(()));
        assert_eq!(series_fits(200, 1 << 30, 100 << 30), Err(200 << 30));
        assert_eq!(series_fits(200, 1 << 30, 0), Ok(()), "unknown capacity");
        assert_eq!(series_fits(0, 1 << 30, 1), Ok(()));
    }

    #[test]
    fn ops_by_name() {
        assert_eq!(parse_ops(&["all".into()]).unwrap().len(), 6);
        assert_eq!(parse_ops(&["create".into(), " expand".into()]).unwrap(), [ops::Op::Create, ops::Op::Expand]);
        assert!(parse_ops(&["grow".into()]).is_err());
        assert!(parse_ops(&[]).unwrap().is_empty());
    }

    #[test]
    fn leftovers_are_named() {
        assert_eq!(with_leftovers("boom".into(), vec![]), "boom");
        assert!(with_leftovers("boom".into(), vec!["a".into(), "b".into()]).ends_with("delete them by hand: a, b"));
    }
}
