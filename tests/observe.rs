//! What an operator's tools read from the real binary (issue 14): the Prometheus series at
//! `--metrics-address` scraped during a run of creates, errors, stage, expand, snapshot and
//! delete, checked against the calls made; `/healthz`, `/readyz` and `/status` at
//! `--health-address` (an agent is not ready before it registers, and is after; CSI Probe and
//! `/readyz` stay ready while a pool is sick); and one JSON event line per volume change.
//! File pools in a temporary directory only, so this runs on any host (as root: stage uses
//! a loop device).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holdfast::client::{self, Clients};
use holdfast::proto::volume_capability::access_mode::Mode;
use holdfast::proto::*;
use tonic::Code;

const M: i64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);

/// A `holdfast` process, killed when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(args)
            .env("HOLDFAST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A loopback address nobody listens on now.
fn free_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// GET `path` from `address`: (status code, body); `None` while nothing answers.
fn get(address: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(address).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

/// Waits until `path` at `address` answers `want`.
async fn until_code(address: &str, path: &str, want: u16, p: &Proc) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = get(address, path);
        if let Some((code, body)) = &got {
            if *code == want {
                return body.clone();
            }
        }
        assert!(Instant::now() < deadline, "{path} at {address} never answered {want} (last {got:?}); log:\n{}", p.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn connect(endpoint: &str, p: &Proc) -> Clients {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(c) = Clients::connect(endpoint).await {
            if c.identity.clone().probe(ProbeRequest {}).await.is_ok() {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "no CSI socket at {endpoint}; log:\n{}", p.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The samples of a scrape: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?))))
        .collect()
}

fn sample(s: &HashMap<String, f64>, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| panic!("no series {key} in the scrape:\n{}", keys(s)))
}

fn keys(s: &HashMap<String, f64>) -> String {
    let mut k: Vec<&String> = s.keys().filter(|k| !k.contains("_bucket")).collect();
    k.sort();
    k.into_iter().map(|k| format!("{k} {}\n", s[k])).collect()
}

fn file_config(dir: &Path, pool: &str) -> PathBuf {
    let pool_dir = dir.join(pool);
    std::fs::create_dir_all(&pool_dir).unwrap();
    let config = dir.join("holdfast.toml");
    std::fs::write(&config, format!("[[pool]]\nname = \"{pool}\"\nkind = \"file\"\npath = \"{}\"\n", pool_dir.display())).unwrap();
    config
}

/// The JSON event lines of a log: `event` → the lines' fields.
fn events(log: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.as_object().cloned())
        .filter(|o| o.contains_key("event"))
        .collect()
}

fn field<'a>(e: &'a serde_json::Map<String, serde_json::Value>, k: &str) -> &'a str {
    e.get(k).and_then(|v| v.as_str()).unwrap_or_default()
}

fn pvc_params(name: &str) -> HashMap<String, String> {
    HashMap::from([
        ("csi.storage.k8s.io/pvc/name".to_owned(), format!("claim-{name}")),
        ("csi.storage.k8s.io/pvc/namespace".to_owned(), "team-a".to_owned()),
        ("csi.storage.k8s.io/pv/name".to_owned(), name.to_owned()),
    ])
}

/// `holdfast all-in-one` on a `file` pool named `pool` in `dir`, node n1, serving metrics and
/// health on free loopback ports, with `extra` arguments; connected.
struct AllInOne {
    p: Proc,
    c: Clients,
    metrics: String,
    health: String,
}

impl AllInOne {
    async fn start(dir: &Path, pool: &str, extra: &[&str]) -> AllInOne {
        let config = file_config(dir, pool);
        let (metrics, health) = (free_address(), free_address());
        let endpoint = format!("unix://{}", dir.join("csi.sock").display());
        let (config, state) = (config.to_string_lossy().into_owned(), dir.join("state").to_string_lossy().into_owned());
        let mut args = vec!["all-in-one", "--endpoint", &endpoint, "--node-id", "n1", "--config", &config, "--state-dir", &state];
        args.extend_from_slice(extra);
        args.extend(["--metrics-address", metrics.as_str(), "--health-address", health.as_str()]);
        let p = Proc::spawn(dir, "driver", &args);
        let c = connect(&endpoint, &p).await;
        AllInOne { p, c, metrics, health }
    }
}

/// A conformance-style run against all-in-one, scraped at the end: every counter equals the
/// calls made, the pool gauges equal what the pool holds, the commands of a stage are
/// counted by program, each volume change is one JSON event line, and /status agrees.
#[tokio::test]
async fn a_scrape_counts_the_calls_and_the_log_has_one_event_per_change() {
    let tmp = tempfile::Builder::new().prefix("holdfast-observe-").tempdir().unwrap();
    let dir = tmp.path();
    let AllInOne { p, c, metrics, health } = AllInOne::start(dir, "p", &["--log-format", "json"]).await;
    assert_eq!(until_code(&health, "/healthz", 200, &p).await, "ok\n");
    assert_eq!(until_code(&health, "/readyz", 200, &p).await, "ready\n");

    let cap = client::mount_capability("ext4", &[], Mode::SingleNodeWriter);
    let mut ctl = c.controller.clone();
    let create = |name: &str, size: i64| client::create_volume_request(name, client::capacity(size as u64), cap.clone(), pvc_params(name));
    let mut ids = Vec::new();
    for name in ["obs-a", "obs-b", "obs-c"] {
        ids.push(ctl.create_volume(create(name, 16 * M)).await.unwrap().into_inner().volume.unwrap().volume_id);
    }
    // A retry of the same create: OK again, the same volume, no new event.
    let again = ctl.create_volume(create("obs-a", 16 * M)).await.unwrap().into_inner().volume.unwrap().volume_id;
    assert_eq!(again, ids[0]);
    // Two refusals, counted under their codes.
    let no_name = ctl.create_volume(create("", 16 * M)).await.unwrap_err();
    assert_eq!(no_name.code(), Code::InvalidArgument);
    let other_size = ctl.create_volume(create("obs-a", 32 * M)).await.unwrap_err();
    assert_eq!(other_size.code(), Code::AlreadyExists);

    // Stage and unstage one volume: losetup, mkfs.ext4, mount, umount run.
    let staging = dir.join("staging");
    let mut node = c.node.clone();
    node.node_stage_volume(client::stage_request(&ids[1], &staging.to_string_lossy(), cap.clone())).await.unwrap();
    let unstaged = node
        .node_unstage_volume(NodeUnstageVolumeRequest { volume_id: ids[1].clone(), staging_target_path: staging.to_string_lossy().into() })
        .await;
    unstaged.unwrap();

    let expand = ControllerExpandVolumeRequest {
        volume_id: ids[2].clone(),
        capacity_range: Some(client::capacity(32 << 20)),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    ctl.controller_expand_volume(expand).await.unwrap();
    let snap = ctl
        .create_snapshot(CreateSnapshotRequest { source_volume_id: ids[2].clone(), name: "obs-snap".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    ctl.delete_snapshot(DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() }).await.unwrap();
    ctl.delete_volume(DeleteVolumeRequest { volume_id: ids[0].clone(), ..Default::default() }).await.unwrap();

    // obs-b's backing file goes missing: abnormal (logged once, however often it is read),
    // then back: healthy again.
    let local = ids[1].split(':').nth(3).unwrap().to_owned();
    let image = dir.join("p/volumes").join(format!("{local}.img"));
    std::fs::rename(&image, image.with_extension("moved")).unwrap();
    let condition = |id: String| {
        let mut ctl = ctl.clone();
        async move {
            let got = ctl.controller_get_volume(ControllerGetVolumeRequest { volume_id: id }).await.unwrap().into_inner();
            got.status.unwrap().volume_condition.unwrap()
        }
    };
    for _ in 0..2 {
        assert!(condition(ids[1].clone()).await.abnormal);
    }
    std::fs::rename(image.with_extension("moved"), &image).unwrap();
    assert!(!condition(ids[1].clone()).await.abnormal);
    assert!(!condition(ids[1].clone()).await.abnormal);

    let listed = ctl.list_volumes(ListVolumesRequest::default()).await.unwrap().into_inner().entries.len();
    assert_eq!(listed, 2);
    let scrape = until_code(&metrics, "/metrics", 200, &p).await;
    let s = samples(&scrape);
    let rpc =
        |method: &str, code: &str, kind: &str| format!("holdfast_rpc_total{{method=\"{method}\",code=\"{code}\",pool_kind=\"{kind}\"}}");
    assert_eq!(sample(&s, &rpc("CreateVolume", "OK", "file")), 4.0, "3 creates and 1 retry");
    assert_eq!(sample(&s, &rpc("CreateVolume", "INVALID_ARGUMENT", "none")), 1.0);
    // Refused before any id was made: no pool kind.
    assert_eq!(sample(&s, &rpc("CreateVolume", "ALREADY_EXISTS", "none")), 1.0);
    assert_eq!(sample(&s, &rpc("NodeStageVolume", "OK", "file")), 1.0);
    assert_eq!(sample(&s, &rpc("DeleteVolume", "OK", "file")), 1.0);
    assert_eq!(sample(&s, &rpc("CreateSnapshot", "OK", "file")), 1.0);
    let latency = "holdfast_rpc_duration_seconds_count{method=\"CreateVolume\",code=\"OK\",pool_kind=\"file\"}";
    assert_eq!(sample(&s, latency), 4.0);
    let inf = "holdfast_rpc_duration_seconds_bucket{le=\"+Inf\",method=\"CreateVolume\",code=\"OK\",pool_kind=\"file\"}";
    assert_eq!(sample(&s, inf), 4.0);
    assert_eq!(sample(&s, "holdfast_pool_volumes{node=\"n1\",pool=\"p\",kind=\"file\"}"), listed as f64);
    assert_eq!(sample(&s, "holdfast_pool_used_bytes{node=\"n1\",pool=\"p\",kind=\"file\"}"), (16 * M + 32 * M) as f64);
    assert!(sample(&s, "holdfast_pool_free_bytes{node=\"n1\",pool=\"p\",kind=\"file\"}") > 0.0);
    assert_eq!(sample(&s, "holdfast_pool_health{node=\"n1\",pool=\"p\",kind=\"file\",state=\"healthy\"}"), 1.0);
    assert_eq!(sample(&s, "holdfast_pool_health{node=\"n1\",pool=\"p\",kind=\"file\",state=\"unavailable\"}"), 0.0);
    for program in ["losetup", "mkfs.ext4", "mount"] {
        let k = format!("holdfast_command_duration_seconds_count{{program=\"{program}\"}}");
        assert!(sample(&s, &k) >= 1.0, "{k}");
    }
    assert!(!scrape.contains("obs-a") && !scrape.contains(&*dir.to_string_lossy()), "no names or paths in labels");
    assert_eq!(sample(&s, "holdfast_rpc_in_flight"), 0.0);
    assert_eq!(sample(&s, "holdfast_frozen_filesystems"), 0.0);
    assert!(!s.keys().any(|k| k.starts_with("holdfast_agents")), "no registry of agents in all-in-one");

    let status: serde_json::Value = serde_json::from_str(&until_code(&health, "/status", 200, &p).await).unwrap();
    assert_eq!(status["ready"], true);
    assert_eq!(status["pools"][0]["name"], "p");
    assert_eq!(status["pools"][0]["health"], "healthy");
    assert_eq!(status["pools"][0]["volumes"], listed);

    // One event line per change, with the ids and the PVC the provisioner passed.
    let log = p.log_text();
    let ev = events(&log);
    let of = |event: &str, name: &str| ev.iter().filter(|e| field(e, "event") == event && field(e, "csi_name") == name).count();
    for (i, name) in ["obs-a", "obs-b", "obs-c"].iter().enumerate() {
        assert_eq!(of("created", name), 1, "{name}: one created line; log:\n{log}");
        let e = ev.iter().find(|e| field(e, "event") == "created" && field(e, "csi_name") == *name).unwrap();
        assert_eq!(field(e, "volume_id"), ids[i]);
        assert_eq!(field(e, "pvc_name"), format!("claim-{name}"));
        assert_eq!(field(e, "pvc_namespace"), "team-a");
    }
    assert_eq!(of("deleted", "obs-a"), 1, "{log}");
    let deleted = ev.iter().find(|e| field(e, "event") == "deleted").unwrap();
    assert_eq!(field(deleted, "volume_id"), ids[0]);
    assert_eq!(field(deleted, "pvc_name"), "claim-obs-a");
    assert_eq!(of("expanded", "obs-c"), 1, "{log}");
    assert_eq!(of("snapshotted", "obs-snap"), 1, "{log}");
    let snapped = ev.iter().find(|e| field(e, "event") == "snapshotted").unwrap();
    assert_eq!(field(snapped, "volume_id"), ids[2]);
    assert_eq!(field(snapped, "snapshot_id"), snap.snapshot_id);
    assert_eq!(of("snapshot deleted", "obs-snap"), 1, "{log}");
    assert_eq!(of("staged", "obs-b"), 1, "{log}");
    assert_eq!(of("unstaged", "obs-b"), 1, "{log}");
    assert_eq!(of("abnormal", "obs-b"), 1, "{log}");
    let abnormal = ev.iter().find(|e| field(e, "event") == "abnormal").unwrap();
    assert_eq!(field(abnormal, "volume_id"), ids[1]);
    assert_eq!(field(abnormal, "pvc_name"), "claim-obs-b");
    assert!(field(abnormal, "message").contains("missing"), "{abnormal:?}");
    assert_eq!(of("healthy", "obs-b"), 1, "{log}");
    assert_eq!(ev.len(), 11, "no other events: {ev:?}");

    for id in &ids[1..] {
        ctl.delete_volume(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.unwrap();
    }
}

/// A sick pool (its directory gone) is reported by /status and the pool health gauge, while
/// CSI Probe and /readyz stay ready (a liveness probe must not restart the plugin for it).
#[tokio::test]
async fn probe_and_readyz_stay_ready_while_a_pool_is_sick() {
    let tmp = tempfile::Builder::new().prefix("holdfast-observe-").tempdir().unwrap();
    let dir = tmp.path();
    let AllInOne { p, c, metrics, health } = AllInOne::start(dir, "sick", &[]).await;
    until_code(&health, "/readyz", 200, &p).await;
    std::fs::rename(dir.join("sick"), dir.join("sick-moved")).unwrap();

    let probe = c.identity.clone().probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true), "Probe stays ready with a sick pool");
    assert_eq!(until_code(&health, "/readyz", 200, &p).await, "ready\n");
    assert_eq!(until_code(&health, "/healthz", 200, &p).await, "ok\n");
    let status: serde_json::Value = serde_json::from_str(&until_code(&health, "/status", 200, &p).await).unwrap();
    assert_eq!(status["pools"][0]["health"], "unavailable", "{status}");
    assert!(status["pools"][0]["message"].as_str().unwrap().contains("missing"), "{status}");
    let s = samples(&until_code(&metrics, "/metrics", 200, &p).await);
    assert_eq!(sample(&s, "holdfast_pool_health{node=\"n1\",pool=\"sick\",kind=\"file\",state=\"unavailable\"}"), 1.0);
    assert_eq!(sample(&s, "holdfast_pool_health{node=\"n1\",pool=\"sick\",kind=\"file\",state=\"healthy\"}"), 0.0);

    // Back: healthy again, and still ready throughout.
    std::fs::rename(dir.join("sick-moved"), dir.join("sick")).unwrap();
    let status: serde_json::Value = serde_json::from_str(&until_code(&health, "/status", 200, &p).await).unwrap();
    assert_eq!(status["pools"][0]["health"], "healthy", "{status}");
    let probe = c.identity.clone().probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
}

/// `holdfast agent` answers /readyz 503 until a controller accepted its registration, then
/// 200; the controller's scrape and /status show the agent up.
#[tokio::test]
async fn an_agent_is_ready_once_registered_and_the_controller_counts_it() {
    let tmp = tempfile::Builder::new().prefix("holdfast-observe-").tempdir().unwrap();
    let dir = tmp.path();
    let config = file_config(dir, "local");
    let (registry, agent_api, agent_health) = (free_address(), free_address(), free_address());
    let endpoint = format!("unix://{}", dir.join("agent.sock").display());
    let agent = Proc::spawn(
        dir,
        "agent",
        &[
            "agent",
            "--endpoint",
            &endpoint,
            "--node-id",
            "n1",
            "--config",
            &config.to_string_lossy(),
            "--state-dir",
            &dir.join("agent-state").to_string_lossy(),
            "--controller",
            &registry,
            "--listen",
            &agent_api,
            "--insecure",
            "--health-address",
            &agent_health,
        ],
    );
    connect(&endpoint, &agent).await;
    assert_eq!(until_code(&agent_health, "/healthz", 200, &agent).await, "ok\n");
    let body = until_code(&agent_health, "/readyz", 503, &agent).await;
    assert!(body.contains("not registered"), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&agent_health, "/readyz").map(|(c, _)| c), Some(503), "still no controller");

    let (metrics, health) = (free_address(), free_address());
    let ctl_endpoint = format!("unix://{}", dir.join("controller.sock").display());
    let controller = Proc::spawn(
        dir,
        "controller",
        &[
            "controller",
            "--endpoint",
            &ctl_endpoint,
            "--listen",
            &registry,
            "--insecure",
            "--state-dir",
            &dir.join("controller-state").to_string_lossy(),
            "--heartbeat-ms",
            "200",
            "--metrics-address",
            &metrics,
            "--health-address",
            &health,
        ],
    );
    connect(&ctl_endpoint, &controller).await;
    assert_eq!(until_code(&agent_health, "/readyz", 200, &agent).await, "ready\n");
    assert_eq!(until_code(&health, "/readyz", 200, &controller).await, "ready\n");
    let deadline = Instant::now() + WAIT;
    let s = loop {
        let s = samples(&until_code(&metrics, "/metrics", 200, &controller).await);
        if s.get("holdfast_agents{state=\"up\"}") == Some(&1.0) || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sample(&s, "holdfast_agents{state=\"up\"}"), 1.0);
    assert_eq!(sample(&s, "holdfast_agents{state=\"down\"}"), 0.0);
    assert_eq!(sample(&s, "holdfast_agent_state{node=\"n1\",state=\"up\"}"), 1.0);
    assert_eq!(sample(&s, "holdfast_agent_state{node=\"n1\",state=\"down\"}"), 0.0);
    assert_eq!(sample(&s, "holdfast_pool_health{node=\"n1\",pool=\"local\",kind=\"file\",state=\"healthy\"}"), 1.0);
    let status: serde_json::Value = serde_json::from_str(&until_code(&health, "/status", 200, &controller).await).unwrap();
    assert_eq!(status["agents"][0]["node"], "n1", "{status}");
    assert_eq!(status["agents"][0]["state"], "up", "{status}");
}
