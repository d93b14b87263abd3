//! Prometheus series of one holdfast process (`--metrics-address`), kept with the
//! `prometheus-client` crate: per-RPC latency and outcomes (recorded by the server's call
//! layer, [`Call`]), per-command duration and failures (recorded by [`crate::exec::Prefixed`],
//! labelled by the program name only), frozen filesystems, and the per-pool and per-agent
//! gauges read from a [`crate::observe::Source`] at each scrape.
//!
//! Nothing is kept unless [`install`] ran: a process started without `--metrics-address` pays
//! one atomic load per call. Label values are `&'static str` from fixed lists (methods, codes,
//! pool kinds, programs), so recording allocates nothing beyond the crate's first sight of a
//! label set; only the per-pool and per-node gauges carry names, set at scrape time.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::volume_id::PoolKind;

/// The labels of an RPC series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The CSI method (`CreateVolume`), `other` for a path outside the CSI services.
    pub method: &'static str,
    /// The gRPC code answered (`OK`, `NOT_FOUND`…; `CANCELLED` when the client gave up).
    pub code: &'static str,
    /// The kind of pool the call concerned (`file`, `lvm`, `zfs`, `nfs`), `none` if no volume.
    pub pool_kind: &'static str,
}

/// The labels of a command series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// The program (`lvcreate`, `mkfs.ext4`), never its arguments; `other` outside [`PROGRAMS`].
    pub program: &'static str,
}

/// The labels of a command failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// As [`CommandLabels::program`].
    pub program: &'static str,
    /// `exit` (non-zero status), `timeout` (killed at its timeout) or `spawn` (could not start).
    pub reason: &'static str,
}

/// The labels of a pool gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The node holding the pool (`-` for a shared pool the controller serves).
    pub node: String,
    /// The pool name.
    pub pool: String,
    /// Its kind.
    pub kind: String,
}

/// The labels of a pool's health state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabels {
    /// The node holding the pool.
    pub node: String,
    /// The pool name.
    pub pool: String,
    /// Its kind.
    pub kind: String,
    /// `healthy`, `degraded` or `unavailable`.
    pub state: &'static str,
}

/// The labels of an agent's state on the controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// The node id.
    pub node: String,
    /// `up`, `down` or `retired`.
    pub state: &'static str,
}

/// The labels of the count of agents in one state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `up`, `down` or `retired`.
    pub state: &'static str,
}

/// Every series of the process.
pub struct Metrics {
    registry: Registry,
    rpc_seconds: Family<RpcLabels, Histogram, fn() -> Histogram>,
    rpc_total: Family<RpcLabels, Counter>,
    in_flight: Gauge,
    command_seconds: Family<CommandLabels, Histogram, fn() -> Histogram>,
    command_failures: Family<FailureLabels, Counter>,
    frozen: Gauge,
    /// Filled at each scrape from the process's [`crate::observe::Source`].
    pub(crate) pool_free: Family<PoolLabels, Gauge>,
    pub(crate) pool_used: Family<PoolLabels, Gauge>,
    pub(crate) pool_volumes: Family<PoolLabels, Gauge>,
    pub(crate) pool_health: Family<PoolStateLabels, Gauge>,
    pub(crate) agent_state: Family<NodeLabels, Gauge>,
    pub(crate) agents: Family<StateLabels, Gauge>,
}

fn rpc_histogram() -> Histogram {
    // 0.5 ms … ~75 s: a Probe to an lvcreate under load.
    Histogram::new(exponential_buckets(0.0005, 2.5, 14))
}

fn command_histogram() -> Histogram {
    // 1 ms … ~60 s: `true` to a mkfs of a large device.
    Histogram::new(exponential_buckets(0.001, 2.5, 13))
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("holdfast"),
            rpc_seconds: Family::new_with_constructor(rpc_histogram as fn() -> Histogram),
            rpc_total: Family::default(),
            in_flight: Gauge::default(),
            command_seconds: Family::new_with_constructor(command_histogram as fn() -> Histogram),
            command_failures: Family::default(),
            frozen: Gauge::default(),
            pool_free: Family::default(),
            pool_used: Family::default(),
            pool_volumes: Family::default(),
            pool_health: Family::default(),
            agent_state: Family::default(),
            agents: Family::default(),
        };
        let registry = &mut m.registry;
        registry.register("rpc_duration_seconds", "CSI calls served: time to the answer", m.rpc_seconds.clone());
        registry.register("rpc", "CSI calls answered, by method, gRPC code and pool kind", m.rpc_total.clone());
        registry.register("rpc_in_flight", "Controller and Node calls being served now (or waiting for a slot)", m.in_flight.clone());
        registry.register("command_duration_seconds", "External commands run, by program", m.command_seconds.clone());
        registry.register("command_failures", "External commands that failed, by program and reason", m.command_failures.clone());
        registry.register("frozen_filesystems", "Filesystems frozen now for a snapshot or clone", m.frozen.clone());
        registry.register("pool_free_bytes", "The largest volume the pool can take now", m.pool_free.clone());
        registry.register("pool_used_bytes", "Bytes promised to the pool's volumes", m.pool_used.clone());
        registry.register("pool_volumes", "Volumes in the pool", m.pool_volumes.clone());
        registry.register("pool_health", "1 for the pool's health state now, 0 for the others", m.pool_health.clone());
        registry.register("agent_state", "Controller: 1 for each agent's state now, 0 for the others", m.agent_state.clone());
        registry.register("agents", "Controller: agents in each state", m.agents.clone());
        m
    }

    /// The Prometheus (OpenMetrics) text of every series now.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Starts keeping the series (once per process; later calls return the same).
pub fn install() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// The series, when [`install`] ran.
pub fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

/// The CSI methods, so a label is a `&'static str` from a fixed list.
const METHODS: &[&str] = &[
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "GetCapacity",
    "ControllerGetCapabilities",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "GetSnapshot",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "ControllerModifyVolume",
    "GroupControllerGetCapabilities",
    "CreateVolumeGroupSnapshot",
    "DeleteVolumeGroupSnapshot",
    "GetVolumeGroupSnapshot",
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeExpandVolume",
    "NodeGetCapabilities",
    "NodeGetInfo",
    "ListNodes",
];

/// The method label of a gRPC path (`/csi.v1.Controller/CreateVolume` → `CreateVolume`).
pub fn method_of(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or_default();
    METHODS.iter().find(|m| **m == name).copied().unwrap_or("other")
}

/// The label of a gRPC code number.
pub fn code_name(code: i32) -> &'static str {
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn kind_code(kind: PoolKind) -> u8 {
    match kind {
        PoolKind::File => 1,
        PoolKind::Lvm => 2,
        PoolKind::Zfs => 3,
        PoolKind::Nfs => 4,
    }
}

fn kind_label(code: u8) -> &'static str {
    match code {
        1 => "file",
        2 => "lvm",
        3 => "zfs",
        4 => "nfs",
        _ => "none",
    }
}

tokio::task_local! {
    /// The pool kind of the call the task serves (0: none yet), set by [`note_pool_kind`].
    static CALL_KIND: Cell<u8>;
}

/// Notes that the call this task serves concerns a pool of `kind` (the first noted wins: the
/// volume a call names is parsed before any it lists). Outside a call, nothing happens.
pub fn note_pool_kind(kind: PoolKind) {
    let _ = CALL_KIND.try_with(|k| {
        if k.get() == 0 {
            k.set(kind_code(kind));
        }
    });
}

/// Runs `fut` as one call's work and answers its output with the pool kind it noted.
pub async fn with_pool_kind<F: std::future::Future>(fut: F) -> (F::Output, &'static str) {
    CALL_KIND
        .scope(Cell::new(0), async move {
            let out = fut.await;
            (out, kind_label(CALL_KIND.with(Cell::get)))
        })
        .await
}

/// One RPC being served: recorded when [`Call::done`] names its outcome, or as `CANCELLED`
/// when dropped first (the client gave up). Counted in flight meanwhile when `counted`.
pub struct Call {
    metrics: &'static Metrics,
    method: &'static str,
    started: Instant,
    counted: bool,
    done: bool,
}

impl Call {
    /// Starts recording a call to `path`, `None` when no metrics are kept.
    pub fn start(path: &str, counted: bool) -> Option<Call> {
        let metrics = get()?;
        if counted {
            metrics.in_flight.inc();
        }
        Some(Call { metrics, method: method_of(path), started: Instant::now(), counted, done: false })
    }

    /// Records the call's answer.
    pub fn done(mut self, code: i32, pool_kind: &'static str) {
        self.record(code_name(code), pool_kind);
    }

    fn record(&mut self, code: &'static str, pool_kind: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let labels = RpcLabels { method: self.method, code, pool_kind };
        self.metrics.rpc_seconds.get_or_create(&labels).observe(self.started.elapsed().as_secs_f64());
        self.metrics.rpc_total.get_or_create(&labels).inc();
        if self.counted {
            self.metrics.in_flight.dec();
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.record("CANCELLED", "none");
    }
}

/// The programs holdfast runs, for the `program` label (anything else is `other`).
pub const PROGRAMS: &[&str] = &[
    "lvm",
    "lvs",
    "vgs",
    "pvs",
    "lvcreate",
    "lvremove",
    "lvextend",
    "lvchange",
    "lvrename",
    "lvconvert",
    "vgchange",
    "dmsetup",
    "zfs",
    "zpool",
    "losetup",
    "mount",
    "umount",
    "blkid",
    "fsfreeze",
    "mkfs.ext4",
    "mkfs.ext3",
    "mkfs.xfs",
    "mkfs.btrfs",
    "mkfs.vfat",
    "resize2fs",
    "xfs_growfs",
    "xfs_admin",
    "btrfs",
    "btrfstune",
    "tune2fs",
    "e2fsck",
    "dumpe2fs",
    "truncate",
    "fallocate",
    "stat",
    "tar",
    "cp",
    "rm",
    "chattr",
    "nsenter",
];

/// The `program` label of a command's program (a path is reduced to its file name).
pub fn program_label(program: &str) -> &'static str {
    let name = program.rsplit('/').next().unwrap_or(program);
    PROGRAMS.iter().find(|p| **p == name).copied().unwrap_or("other")
}

/// Records one command run: its program, how long it took and, if it failed, why.
pub fn command(program: &str, elapsed: Duration, failure: Option<&'static str>) {
    let Some(m) = get() else { return };
    let program = program_label(program);
    m.command_seconds.get_or_create(&CommandLabels { program }).observe(elapsed.as_secs_f64());
    if let Some(reason) = failure {
        m.command_failures.get_or_create(&FailureLabels { program, reason }).inc();
    }
}

/// Records that a filesystem was frozen (`+1`) or thawed (`-1`).
pub fn frozen(delta: i64) {
    if let Some(m) = get() {
        m.frozen.inc_by(delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_fixed_lists() {
        assert_eq!(method_of("/csi.v1.Controller/CreateVolume"), "CreateVolume");
        assert_eq!(method_of("/csi.v1.Node/NodeStageVolume"), "NodeStageVolume");
        assert_eq!(method_of("/x.Y/Anything"), "other");
        assert_eq!(program_label("/sbin/lvs"), "lvs");
        assert_eq!(program_label("mkfs.ext4"), "mkfs.ext4");
        assert_eq!(program_label("rm -rf /"), "other");
        assert_eq!(code_name(5), "NOT_FOUND");
        assert_eq!(code_name(99), "UNKNOWN");
    }

    #[tokio::test]
    async fn a_call_records_the_first_pool_kind_it_noted() {
        let ((), kind) = with_pool_kind(async {
            note_pool_kind(PoolKind::Lvm);
            note_pool_kind(PoolKind::File);
        })
        .await;
        assert_eq!(kind, "lvm");
        let ((), kind) = with_pool_kind(async {}).await;
        assert_eq!(kind, "none");
        // Outside a call: no effect, no panic.
        note_pool_kind(PoolKind::Zfs);
    }

    #[test]
    fn series_are_encoded_with_their_labels() {
        let m = install();
        Call::start("/csi.v1.Controller/CreateVolume", true).unwrap().done(6, "file");
        drop(Call::start("/csi.v1.Controller/DeleteVolume", true).unwrap());
        command("lvcreate", Duration::from_millis(3), Some("exit"));
        let text = m.encode();
        assert!(text.contains(r#"holdfast_rpc_total{method="CreateVolume",code="ALREADY_EXISTS",pool_kind="file"} 1"#), "{text}");
        assert!(text.contains(r#"holdfast_rpc_total{method="DeleteVolume",code="CANCELLED",pool_kind="none"} 1"#), "{text}");
        assert!(text.contains(r#"holdfast_command_failures_total{program="lvcreate",reason="exit"} 1"#), "{text}");
        assert!(text.contains(r#"holdfast_command_duration_seconds_count{program="lvcreate"} 1"#), "{text}");
        assert!(text.contains("holdfast_rpc_in_flight 0"), "{text}");
    }
}
