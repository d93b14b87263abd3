//! Registration with the controller (`agent.proto`'s `Registry` service), from the agent's
//! side. The `--controller` name may resolve to several addresses (a headless Service with two
//! controller replicas): each address gets its own session, so a standby controller knows every
//! agent when it takes over. The name is resolved again every [`RESOLVE_INTERVAL`]; a new
//! address gets a session, one that disappeared loses it.
//!
//! A session registers with the full inventory, then heartbeats at the interval the controller
//! answered (capacities and the last change's sequence number) and sends each change of the
//! agent's feed at once. It registers again when the controller asks (`resync`), when the
//! feed skipped changes (a lagging subscriber), and after any failure, with back-off: never a
//! tight loop. A refusal (wire version, identity, retired node) is logged as one clear line
//! and retried slowly, since an operator's fix (a certificate, the retired list) needs no
//! restart of the agent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tonic::transport::Channel;

use super::AgentOps;
use super::local::LocalAgent;
use super::server::MAX_MESSAGE;
use crate::agent_proto::registry_client::RegistryClient;
use crate::agent_proto::{self as ap, wire_version};
use crate::tls::{self, ClientTls};

/// How often the `--controller` name is resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// The heartbeat interval when the controller names none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// The first pause after a failure; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest pause after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The pause after the controller refused the registration.
pub const REFUSED_RETRY: Duration = Duration::from_secs(60);
/// The pause before registering again on a resync (a controller answering resync at every
/// call must not make a tight loop).
const RESYNC_PAUSE: Duration = Duration::from_millis(250);
/// The longest a registration (a full inventory, taken and sent) may take.
const REGISTER_BUDGET: Duration = Duration::from_secs(60);
/// The longest a heartbeat or a change report may take.
const CALL_BUDGET: Duration = Duration::from_secs(10);
/// The most changes sent in one ReportChanges.
const MAX_BATCH: usize = 512;

/// How an agent registers.
#[derive(Clone)]
pub struct RegisterConfig {
    /// The controller's `host:port`; every address the host resolves to gets the registration.
    pub controller: String,
    /// This node's id.
    pub node_id: String,
    /// Where this agent serves the Agent API, as the controller should dial it.
    pub advertise: String,
    /// The client's TLS identity; `None` only under --insecure.
    pub tls: Option<Arc<ClientTls>>,
    /// The name the controller's certificate must carry.
    pub server_name: String,
}

/// Registers on every address `controller` resolves to (re-resolved now and then), heartbeats,
/// streams changes, re-registers on resync / failure; hands nfs pool definitions to `on_nfs`.
/// Runs until the task is dropped.
pub async fn run(cfg: RegisterConfig, agent: Arc<LocalAgent>, on_nfs: Arc<dyn Fn(Vec<ap::NfsPool>) + Send + Sync>) {
    // issue 11: cluster. Several `host:port`s may be given, comma-separated (controller
    // replicas without a DNS name for them all); each gets the registration.
    let lookup: Lookup = Arc::new(|name| {
        Box::pin(async move {
            let mut all = Vec::new();
            for part in name.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                all.extend(tokio::net::lookup_host(part).await?);
            }
            Ok(all)
        })
    });
    run_with(cfg, agent, on_nfs, lookup, RESOLVE_INTERVAL).await
}

/// Resolves a `host:port` to its addresses.
type Lookup = Arc<dyn Fn(String) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> + Send + Sync>;

/// [`run`] with its name resolution and how often it runs given (tests).
async fn run_with(
    cfg: RegisterConfig,
    agent: Arc<LocalAgent>,
    on_nfs: Arc<dyn Fn(Vec<ap::NfsPool>) + Send + Sync>,
    lookup: Lookup,
    every: Duration,
) {
    // The sessions end with this task (aborted with it).
    struct Sessions(HashMap<SocketAddr, tokio::task::JoinHandle<()>>);
    impl Drop for Sessions {
        fn drop(&mut self) {
            self.0.values().for_each(|t| t.abort());
        }
    }
    let mut sessions = Sessions(HashMap::new());
    let mut failed_before = false;
    loop {
        match lookup(cfg.controller.clone()).await {
            Ok(found) => {
                failed_before = false;
                sessions.0.retain(|addr, task| {
                    let keep = found.contains(addr);
                    if !keep {
                        tracing::info!(controller = %addr, "the controller name no longer resolves to this address; stopped registering there");
                        task.abort();
                    }
                    keep
                });
                for addr in found {
                    sessions.0.entry(addr).or_insert_with(|| {
                        tracing::info!(controller = %addr, "registering with a controller");
                        tokio::spawn(session(cfg.clone(), addr, agent.clone(), on_nfs.clone()))
                    });
                }
            }
            // The sessions on addresses found before go on.
            Err(e) if !failed_before => {
                failed_before = true;
                tracing::warn!(controller = %cfg.controller, error = %e, "cannot resolve the controller's name; retrying");
            }
            Err(_) => {}
        }
        let pause = if sessions.0.is_empty() { every.min(Duration::from_secs(5)) } else { every };
        tokio::time::sleep(pause).await;
    }
}

/// Why a session ended.
enum Ended {
    /// Register again at once (a resync, a gap in the feed).
    Resync(String),
    /// Register again after a pause (the controller unreachable, a call failed).
    Failed(String),
    /// The controller refused this agent: retry slowly.
    Refused(String),
}

/// The registration with one controller address, for ever.
async fn session(cfg: RegisterConfig, addr: SocketAddr, agent: Arc<LocalAgent>, on_nfs: Arc<dyn Fn(Vec<ap::NfsPool>) + Send + Sync>) {
    let mut backoff = FIRST_BACKOFF;
    let mut channel: Option<Channel> = None;
    loop {
        let began = std::time::Instant::now();
        let ended = once(&cfg, addr, &agent, &on_nfs, &mut channel).await;
        // A session that ran a while was a success: the back-off starts over.
        if began.elapsed() > MAX_BACKOFF {
            backoff = FIRST_BACKOFF;
        }
        let pause = match ended {
            Ended::Resync(why) => {
                tracing::info!(controller = %addr, why = %why, "registering again");
                RESYNC_PAUSE
            }
            Ended::Failed(why) => {
                tracing::warn!(controller = %addr, error = %why, retry_in = ?backoff, "cannot reach the controller; registering again");
                channel = None;
                let p = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                p
            }
            Ended::Refused(why) => {
                tracing::error!(controller = %addr, node = %cfg.node_id, reason = %why, retry_in = ?REFUSED_RETRY, "the controller refused this agent's registration");
                backoff = FIRST_BACKOFF;
                REFUSED_RETRY
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// Whether a failed Register is the controller's refusal (as opposed to a failure to reach it).
fn is_refusal(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated | Code::AlreadyExists | Code::InvalidArgument
    )
}

async fn connect(cfg: &RegisterConfig, addr: SocketAddr) -> Result<Channel, String> {
    let address = addr.to_string();
    match &cfg.tls {
        Some(t) => tls::connect(&address, &cfg.server_name, t.clone()).await,
        None => tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("address {address}: {e}"))?
            .connect_timeout(tls::HANDSHAKE_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {address}: {}", with_causes(&e))),
    }
}

/// An error with its causes ("transport error: tcp connect error: Connection refused").
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn request<T>(msg: T, budget: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(budget);
    r
}

/// One registration and what follows it, until it must be done again.
async fn once(
    cfg: &RegisterConfig,
    addr: SocketAddr,
    agent: &Arc<LocalAgent>,
    on_nfs: &Arc<dyn Fn(Vec<ap::NfsPool>) + Send + Sync>,
    channel: &mut Option<Channel>,
) -> Ended {
    let ch = match channel {
        Some(c) => c.clone(),
        None => match connect(cfg, addr).await {
            Ok(c) => channel.insert(c).clone(),
            Err(e) => return Ended::Failed(e),
        },
    };
    let mut client = RegistryClient::new(ch).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
    // Subscribed before the inventory is taken: every change after it is received.
    let mut feed = agent.subscribe();
    let mut inventory = match agent.get_inventory(REGISTER_BUDGET).await {
        Ok(i) => i,
        Err(e) => return Ended::Failed(format!("cannot take the inventory: {e}")),
    };
    inventory.advertised_address = cfg.advertise.clone();
    let mut last = inventory.sequence;
    let (volumes, pools) = (inventory.volumes.len(), inventory.pools.len());
    let reg = ap::RegisterRequest { version: Some(wire_version()), inventory: Some(inventory) };
    let answer = match client.register(request(reg, REGISTER_BUDGET)).await {
        Ok(a) => a.into_inner(),
        Err(s) if is_refusal(&s) => return Ended::Refused(format!("{:?}: {}", s.code(), s.message())),
        Err(s) => return Ended::Failed(format!("Register: {:?}: {}", s.code(), s.message())),
    };
    let ours = wire_version();
    if let Some(v) = answer.version.filter(|v| *v != ours) {
        tracing::info!(controller = %addr, controller_version = %format!("{}.{}", v.major, v.minor), agent_version = %format!("{}.{}", ours.major, ours.minor), "the controller speaks another wire version; it accepted this agent");
    }
    on_nfs(answer.nfs_pools);
    let every = match answer.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    tracing::info!(controller = %addr, pools, volumes, sequence = last, heartbeat = ?every, "registered");
    // issue 14: health: an agent is ready (/readyz) once a controller took it.
    crate::observe::set_registered();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let pools = match agent.get_capacity(ap::GetCapacityRequest::default(), CALL_BUDGET).await {
                    Ok(c) => c.pools,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the pools' capacities for the heartbeat");
                        Vec::new()
                    }
                };
                let hb = ap::HeartbeatRequest {
                    version: Some(wire_version()),
                    node_id: cfg.node_id.clone(),
                    sequence: last,
                    pools,
                    agent_started_unix: agent.started_unix(),
                };
                match client.heartbeat(request(hb, CALL_BUDGET)).await {
                    Ok(a) if a.get_ref().resync => return Ended::Resync("the controller asked for the inventory".into()),
                    Ok(_) => {}
                    Err(s) => return Ended::Failed(format!("Heartbeat: {:?}: {}", s.code(), s.message())),
                }
            }
            got = feed.recv() => {
                let first = match got {
                    Ok(c) => c,
                    Err(RecvError::Lagged(n)) => return Ended::Resync(format!("{n} changes were missed")),
                    Err(RecvError::Closed) => return Ended::Failed("the agent's change feed closed".into()),
                };
                // Whatever else is already there goes in the same report.
                let mut changes = vec![first];
                while changes.len() < MAX_BATCH {
                    match feed.try_recv() {
                        Ok(c) => changes.push(c),
                        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                            return Ended::Resync(format!("{n} changes were missed"));
                        }
                        Err(_) => break,
                    }
                }
                // Changes the inventory already held were taken before it.
                changes.retain(|c| c.sequence > last);
                let Some(end) = changes.last().map(|c| c.sequence) else { continue };
                if changes.first().map(|c| c.sequence) != Some(last + 1) {
                    return Ended::Resync(format!("the change feed skipped from {last} to {}", changes[0].sequence));
                }
                let report = ap::ReportChangesRequest { version: Some(wire_version()), node_id: cfg.node_id.clone(), changes };
                match client.report_changes(request(report, CALL_BUDGET)).await {
                    Ok(a) if a.get_ref().resync => return Ended::Resync("the controller lost track of the changes".into()),
                    Ok(_) => last = end,
                    // Resent by the registration that follows (it holds the full inventory).
                    Err(s) => return Ended::Failed(format!("ReportChanges: {:?}: {}", s.code(), s.message())),
                }
            }
        }
    }
}

/// Makes the `nfs` pools the controller defined the only ones `driver`'s node side serves
/// (besides its configured pools): a volume id naming another nfs pool is NOT_FOUND there, so
/// a hand-made PV cannot point the node at an arbitrary server. A definition that does not
/// make a valid pool is left out, logged.
pub fn learn_nfs_pools(driver: &crate::driver::Driver, defs: Vec<ap::NfsPool>) {
    let mut pools = Vec::new();
    for def in defs {
        let made = nfs_pool_config(&def)
            .and_then(|pc| crate::pool::open(&pc, driver.node.exec.clone(), driver.freezer.clone()).map_err(|e| e.to_string()));
        match made {
            Ok(p) => pools.push(p),
            Err(e) => {
                tracing::error!(pool = %crate::error::bounded(&def.name), error = %e, "the controller's nfs pool definition is not usable; its volumes cannot be staged here")
            }
        }
    }
    let names: Vec<String> = pools.iter().map(|p| p.name().to_owned()).collect();
    let before: Vec<String> = driver.shared.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
    driver.set_shared_pools(pools);
    if before != names {
        tracing::info!(pools = ?names, "nfs pools from the controller");
    }
}

/// The pool configuration of a controller's nfs pool definition, checked as a `[[pool]]`
/// table of a configuration file would be.
pub fn nfs_pool_config(def: &ap::NfsPool) -> Result<crate::config::PoolConfig, String> {
    use toml::Value;
    let mut t = toml::Table::new();
    t.insert("name".into(), Value::String(def.name.clone()));
    t.insert("kind".into(), Value::String("nfs".into()));
    t.insert("server".into(), Value::String(def.server.clone()));
    t.insert("export".into(), Value::String(def.export.clone()));
    if !def.mount_options.is_empty() {
        t.insert("mount_options".into(), Value::Array(def.mount_options.iter().cloned().map(Value::String).collect()));
    }
    if !def.segments.is_empty() {
        let seg: toml::Table = def.segments.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        t.insert("pool_topology".into(), Value::Table(seg));
    }
    let doc = toml::Table::from_iter([("pool".to_owned(), Value::Array(vec![Value::Table(t)]))]);
    let src = toml::to_string(&doc).map_err(|e| e.to_string())?;
    let mut cfg = crate::config::Config::parse(&src).map_err(|e| e.to_string())?;
    cfg.pools.pop().ok_or_else(|| "no pool".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_proto::registry_server::{Registry, RegistryServer};
    use std::sync::Mutex;
    use tonic::{Request, Response, Status};

    /// What a test controller saw, and how it answers.
    #[derive(Default)]
    struct Seen {
        registrations: usize,
        heartbeats: usize,
        refuse: bool,
        resync_first_heartbeat: bool,
    }

    #[derive(Clone, Default)]
    struct FakeRegistry(Arc<Mutex<Seen>>);

    #[tonic::async_trait]
    impl Registry for FakeRegistry {
        async fn register(&self, _: Request<ap::RegisterRequest>) -> Result<Response<ap::RegisterResponse>, Status> {
            let mut s = self.0.lock().unwrap();
            s.registrations += 1;
            if s.refuse {
                return Err(Status::failed_precondition("agent wire version 1.0 is not accepted by controller 3.0"));
            }
            Ok(Response::new(ap::RegisterResponse { version: Some(WIRE_V), heartbeat_interval_ms: 50, nfs_pools: vec![] }))
        }
        async fn heartbeat(&self, _: Request<ap::HeartbeatRequest>) -> Result<Response<ap::HeartbeatResponse>, Status> {
            let mut s = self.0.lock().unwrap();
            s.heartbeats += 1;
            Ok(Response::new(ap::HeartbeatResponse { resync: s.resync_first_heartbeat && s.heartbeats == 1 }))
        }
        async fn report_changes(&self, _: Request<ap::ReportChangesRequest>) -> Result<Response<ap::ReportChangesResponse>, Status> {
            Ok(Response::new(ap::ReportChangesResponse { resync: false }))
        }
    }

    const WIRE_V: ap::WireVersion = crate::agent_proto::WIRE_VERSION;

    impl FakeRegistry {
        async fn serve(&self) -> SocketAddr {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let svc = RegistryServer::new(self.clone());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            addr
        }
        fn get(&self, f: impl Fn(&Seen) -> usize) -> usize {
            f(&self.0.lock().unwrap())
        }
        async fn wait(&self, what: &str, f: impl Fn(&Seen) -> bool) {
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while !f(&self.0.lock().unwrap()) {
                assert!(std::time::Instant::now() < until, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// An agent with no pools, registering through `lookup`'s answers (changed by the test).
    fn start(tmp: &std::path::Path, addresses: Arc<Mutex<Vec<SocketAddr>>>) -> tokio::task::JoinHandle<()> {
        let exec = Arc::new(crate::exec::FakeExec::new());
        let mounter = Arc::new(crate::node::mount::FakeMounter::new());
        let driver = crate::driver::Driver::new("n1", &crate::config::Config::default(), tmp, exec, mounter).unwrap();
        let agent = LocalAgent::new(Arc::new(driver));
        let cfg = RegisterConfig {
            controller: "controller.test:9100".into(),
            node_id: "n1".into(),
            advertise: "127.0.0.1:1".into(),
            tls: None,
            server_name: String::new(),
        };
        let lookup: Lookup = Arc::new(move |_| {
            let found = addresses.lock().unwrap().clone();
            Box::pin(async move { Ok(found) })
        });
        tokio::spawn(run_with(cfg, agent, Arc::new(|_| {}), lookup, Duration::from_millis(100)))
    }

    #[tokio::test]
    async fn every_address_of_the_controller_name_gets_the_registration_and_follows_its_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (FakeRegistry::default(), FakeRegistry::default(), FakeRegistry::default());
        let (aa, ba, ca) = (a.serve().await, b.serve().await, c.serve().await);
        let addresses = Arc::new(Mutex::new(vec![aa, ba]));
        let task = start(tmp.path(), addresses.clone());
        for (what, r) in [("first replica", &a), ("second replica", &b)] {
            r.wait(what, |s| s.registrations == 1 && s.heartbeats >= 2).await;
        }
        assert_eq!(c.get(|s| s.registrations), 0);
        // A replica added behind the name gets it at the next resolution; one removed stops.
        *addresses.lock().unwrap() = vec![ba, ca];
        c.wait("the new replica", |s| s.registrations == 1 && s.heartbeats >= 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopped = a.get(|s| s.heartbeats);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(a.get(|s| s.heartbeats), stopped, "the removed address still gets heartbeats");
        assert_eq!(b.get(|s| s.registrations), 1, "the kept address was not registered again");
        task.abort();
    }

    #[tokio::test]
    async fn a_resync_registers_again_and_a_refusal_is_retried_slowly() {
        let tmp = tempfile::tempdir().unwrap();
        let resync = FakeRegistry::default();
        resync.0.lock().unwrap().resync_first_heartbeat = true;
        let refusing = FakeRegistry::default();
        refusing.0.lock().unwrap().refuse = true;
        let addresses = Arc::new(Mutex::new(vec![resync.serve().await, refusing.serve().await]));
        let task = start(tmp.path(), addresses);
        resync.wait("a second registration after the resync", |s| s.registrations == 2 && s.heartbeats >= 3).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(refusing.get(|s| s.registrations), 1, "a refused agent must not retry in a tight loop");
        assert_eq!(refusing.get(|s| s.heartbeats), 0, "a refused agent heartbeats");
        assert_eq!(resync.get(|s| s.registrations), 2, "one resync, one registration");
        task.abort();
    }

    #[test]
    fn a_node_serves_only_the_nfs_pools_the_controller_defined() {
        use crate::volume_id::{PoolKind, VolumeId};
        let tmp = tempfile::tempdir().unwrap();
        let exec = Arc::new(crate::exec::FakeExec::new());
        let mounter = Arc::new(crate::node::mount::FakeMounter::new());
        let driver = crate::driver::Driver::new("n1", &crate::config::Config::default(), tmp.path(), exec, mounter).unwrap();
        let id = |pool: &str| VolumeId::new(PoolKind::Nfs, None, pool, "pvc-1");
        assert!(driver.pool_of(&id("shared")).is_none(), "no nfs pool before the controller names one");
        let def = ap::NfsPool { name: "shared".into(), server: "nfs.example".into(), export: "/exports/k8s".into(), ..Default::default() };
        learn_nfs_pools(&driver, vec![def, ap::NfsPool { name: "Bad Name".into(), ..Default::default() }]);
        let pool = driver.pool_of(&id("shared")).expect("a defined pool is served");
        assert_eq!((pool.name(), pool.kind()), ("shared", PoolKind::Nfs));
        assert!(driver.pool_of(&id("elsewhere")).is_none(), "an id naming an undefined pool names nothing here");
        assert!(driver.pool_of(&VolumeId::new(PoolKind::File, None, "shared", "pvc-1")).is_none(), "another kind");
        assert!(driver.own_pool_of(&id("shared")).is_none(), "the controller operations never act on it");
        assert!(crate::csi::object_of(&driver, crate::locks::ObjectKind::Volume, &id("elsewhere").to_string()).is_none());
        // A definition the controller withdraws is no longer served.
        learn_nfs_pools(&driver, vec![]);
        assert!(driver.pool_of(&id("shared")).is_none());
    }

    #[test]
    fn wire_versions_parse_as_major_dot_minor() {
        let v = |major, minor| Some(ap::WireVersion { major, minor });
        let cases = [("1.0", v(1, 0)), (" 2.13 ", v(2, 13)), ("1", None), ("1.x", None), ("", None), ("-1.0", None)];
        for (text, want) in cases {
            assert_eq!(ap::parse_wire_version(text), want, "{text:?}");
        }
    }

    #[test]
    fn nfs_definitions_become_checked_pool_configs() {
        let def = ap::NfsPool {
            name: "shared".into(),
            server: "nfs.example".into(),
            export: "/exports/k8s".into(),
            mount_options: vec!["nfsvers=4.2".into()],
            segments: [("topology.kubernetes.io/zone".to_owned(), "a".to_owned())].into(),
        };
        let pc = nfs_pool_config(&def).unwrap();
        assert_eq!((pc.name(), pc.kind()), ("shared", crate::volume_id::PoolKind::Nfs));
        assert_eq!(pc.server.as_deref(), Some("nfs.example"));
        assert_eq!(pc.mount_options, Some(vec!["nfsvers=4.2".to_owned()]));
        assert_eq!(pc.pool_topology.unwrap()["topology.kubernetes.io/zone"], "a");
        // A definition a config file could not hold is refused, not half used: text that would
        // close the table and open another is a name like any other (and not a valid one).
        let forged = ap::NfsPool { name: "x\"\n[[pool]]\nname = \"y".into(), ..def };
        let err = nfs_pool_config(&forged).unwrap_err();
        assert!(err.contains("pool names are"), "{err}");
    }
}
