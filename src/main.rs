//! The `holdfast` binary: a thin CLI over the library. `all-in-one` serves every CSI service
//! for the pools on this node; `agent` serves a node of a cluster (CSI Node, the Agent API); `ctl` is an operator's CSI client; `bench` measures a running
//! driver; `certs` makes TLS certificates for the Agent API. The only place that uses `anyhow`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use holdfast::config::Config;
use holdfast::driver::Driver;
use holdfast::exec::RealExec;
use holdfast::node::mount::RealMounter;
use holdfast::server::{self, ServeOptions, Services};

#[derive(Parser, Debug)]
#[command(name = "holdfast", version = holdfast::VERSION, about = "CSI storage driver: volumes from LVM, ZFS, NFS and file pools")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve Identity, Controller and Node for this node's pools on one socket.
    AllInOne(ServeArgs),
    /// Serve Identity and Node on the plugin socket and the Agent API for this node's pools on
    /// a TCP address, registered with `holdfast controller`.
    Agent(AgentArgs),
    /// Serve CSI Identity and Controller for a cluster on the socket, and the Registry agents
    /// register with on a TCP address; places volumes and routes calls to the agents.
    Controller(ControllerArgs),
    /// An operator's CSI client: create, stage, publish, list… against any CSI socket.
    Ctl(holdfast::ctl::CtlArgs),
    /// Measure a running driver against the raw tools.
    Bench(holdfast::bench::BenchArgs),
    /// Make a cluster CA and node certificates for the Agent API's mutual TLS.
    Certs(holdfast::certs::CertsArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Where to serve CSI: unix:///path/csi.sock (or tcp://127.0.0.1:PORT for tests).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///run/holdfast/csi.sock")]
    endpoint: String,
    /// This node's id, reported to the orchestrator and part of every volume id (default: the hostname).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// The configuration file (TOML). Without it, one `file` pool named "default" in /var/lib/holdfast/default.
    #[arg(long, env = "HOLDFAST_CONFIG")]
    config: Option<PathBuf>,
    /// The driver's own state (stage and freeze records): created 0700 if missing. Must be on
    /// the node's disk and survive restarts of the driver (in a container: a hostPath).
    #[arg(long, env = "HOLDFAST_STATE_DIR", default_value = "/var/lib/holdfast/state")]
    state_dir: PathBuf,
    /// The longest a filesystem stays frozen for a snapshot or clone (seconds): past it the
    /// copy is stopped, the filesystem thawed and the call fails DEADLINE_EXCEEDED.
    #[arg(long, env = "HOLDFAST_FREEZE_DEADLINE", default_value_t = holdfast::node::freeze::FROZEN_DEADLINE.as_secs())]
    freeze_deadline: u64,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Threads that run calls (the pools' blocking work runs on threads of its own, started
    /// as needed): a node agent needs few; each costs memory (a stack, a malloc arena).
    #[arg(long, env = "HOLDFAST_WORKER_THREADS", default_value_t = NODE_WORKER_THREADS,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    worker_threads: u32,
    /// Controller and Node calls served at once; further calls wait for a free slot (each
    /// within its own deadline). Identity calls (Probe, GetPluginInfo) are never held back.
    #[arg(long, env = "HOLDFAST_MAX_CONCURRENT_CALLS", default_value_t = server::DEFAULT_MAX_CONCURRENT_CALLS as u32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_concurrent_calls: u32,
    #[command(flatten)]
    observe: ObserveArgs,
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Where to serve CSI Identity and Node: unix:///path/csi.sock (or tcp://127.0.0.1:PORT for tests).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///run/holdfast/csi.sock")]
    endpoint: String,
    /// The controller's Registry address (host:port); every address the name resolves to gets
    /// the registration (a headless Service with several controller replicas). Several
    /// addresses may be given, comma-separated.
    #[arg(long, env = "HOLDFAST_CONTROLLER")]
    controller: String,
    /// Where to serve the Agent API (host:port, e.g. 0.0.0.0:9101).
    #[arg(long, env = "HOLDFAST_LISTEN")]
    listen: String,
    /// The address the controller dials (host:port); default: --listen (required when that
    /// is a wildcard such as 0.0.0.0).
    #[arg(long, env = "HOLDFAST_ADVERTISE")]
    advertise: Option<String>,
    /// The configuration file (TOML): this node's pools (`nfs` pools come from the controller).
    #[arg(long, env = "HOLDFAST_CONFIG")]
    config: PathBuf,
    /// This node's id, reported to the orchestrator and part of every volume id.
    #[arg(long, env = "NODE_ID")]
    node_id: String,
    /// This agent's certificate (PEM) for the Agent API and registration.
    #[arg(long, env = "HOLDFAST_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "HOLDFAST_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The cluster CA (PEM) the controller's and callers' certificates must be signed by.
    #[arg(long, env = "HOLDFAST_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// The name the controller's certificate must carry (default: the host of --controller).
    #[arg(long, env = "HOLDFAST_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// Plain text instead of mutual TLS: for tests only, refused unless every address is loopback.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    insecure: bool,
    /// The driver's own state (stage and freeze records, copy records): created 0700 if missing.
    #[arg(long, env = "HOLDFAST_STATE_DIR", default_value = "/var/lib/holdfast/state")]
    state_dir: PathBuf,
    /// The longest a filesystem stays frozen for a snapshot or clone (seconds).
    #[arg(long, env = "HOLDFAST_FREEZE_DEADLINE", default_value_t = holdfast::node::freeze::FROZEN_DEADLINE.as_secs())]
    freeze_deadline: u64,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Threads that run calls (the pools' blocking work runs on threads of its own, started
    /// as needed): a node agent needs few; each costs memory (a stack, a malloc arena).
    #[arg(long, env = "HOLDFAST_WORKER_THREADS", default_value_t = NODE_WORKER_THREADS,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    worker_threads: u32,
    /// Node calls served at once on the plugin socket (Identity is never held back).
    #[arg(long, env = "HOLDFAST_MAX_CONCURRENT_CALLS", default_value_t = server::DEFAULT_MAX_CONCURRENT_CALLS as u32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_concurrent_calls: u32,
    #[command(flatten)]
    observe: ObserveArgs,
}

#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// Where to serve CSI Identity and Controller (and the Admin service of `ctl nodes`):
    /// unix:///path/csi.sock (or tcp://127.0.0.1:PORT for tests).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///run/holdfast/csi.sock")]
    endpoint: String,
    /// Where agents register (host:port, e.g. 0.0.0.0:9100).
    #[arg(long, env = "HOLDFAST_LISTEN")]
    listen: String,
    /// Node ids gone for good, one per line (`#` comments): their volumes can be deleted, nothing
    /// is placed there, their agents are refused. Re-read when it changes (a ConfigMap).
    #[arg(long, env = "HOLDFAST_RETIRED_NODES")]
    retired_nodes: Option<PathBuf>,
    /// The configuration file (TOML) of the `nfs` pools, which the controller serves itself and
    /// hands to the agents; other kinds belong to the agents' configuration.
    #[arg(long, env = "HOLDFAST_CONFIG")]
    config: Option<PathBuf>,
    /// The controller's own state (the copy records of its nfs pools): created 0700 if missing.
    #[arg(long, env = "HOLDFAST_STATE_DIR", default_value = "/var/lib/holdfast/controller-state")]
    state_dir: PathBuf,
    /// The node id of the controller's in-process agent for its nfs pools (never part of an id).
    #[arg(long, env = "NODE_ID", default_value = "holdfast-controller")]
    node_id: String,
    /// The controller's certificate (PEM), served to agents and presented when dialing them.
    #[arg(long, env = "HOLDFAST_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "HOLDFAST_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The cluster CA (PEM) every agent's certificate must be signed by.
    #[arg(long, env = "HOLDFAST_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Each agent has its own certificate (cert-manager, `holdfast certs node`): its name must
    /// be the node id it registers. Without it, one certificate may be shared by every agent.
    #[arg(long, env = "HOLDFAST_TLS_PER_NODE", requires = "tls_cert")]
    tls_per_node: bool,
    /// The name an agent's certificate must carry when the controller dials it (default: the
    /// agent's node id, as with per-node certificates; with a shared certificate, its name).
    #[arg(long, env = "HOLDFAST_AGENT_SERVER_NAME")]
    agent_server_name: Option<String>,
    /// Plain text instead of mutual TLS: for tests only, refused unless --listen is loopback.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    insecure: bool,
    /// The heartbeat interval agents are told to keep (milliseconds).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    heartbeat_ms: u64,
    /// An agent silent this long is down (milliseconds; default three heartbeats and 2 s).
    #[arg(long)]
    down_after_ms: Option<u64>,
    /// After a start, creates answer UNAVAILABLE this long while agents register
    /// (milliseconds; default three heartbeats).
    #[arg(long)]
    startup_grace_ms: Option<u64>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Threads that run calls (default: one per CPU).
    #[arg(long, env = "HOLDFAST_WORKER_THREADS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    worker_threads: Option<u32>,
    /// Controller calls served at once; further calls wait (Identity is never held back).
    #[arg(long, env = "HOLDFAST_MAX_CONCURRENT_CALLS", default_value_t = server::DEFAULT_MAX_CONCURRENT_CALLS as u32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_concurrent_calls: u32,
    #[command(flatten)]
    observe: ObserveArgs,
}

// issue 14: metrics, health endpoints
/// The HTTP endpoints for operators' tools (see `holdfast::observe`).
#[derive(clap::Args, Debug)]
struct ObserveArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port, e.g. 0.0.0.0:9810).
    #[arg(long, env = "HOLDFAST_METRICS_ADDRESS")]
    metrics_address: Option<String>,
    /// Serve /healthz, /readyz and /status at this address (host:port, e.g. 0.0.0.0:9808).
    #[arg(long, env = "HOLDFAST_HEALTH_ADDRESS")]
    health_address: Option<String>,
}

/// Starts the endpoints `args` asks for on `serve_on` (the gRPC runtime, so they answer while
/// calls block theirs), with the figures of `source` read on the current (calls') runtime.
fn observe(args: &ObserveArgs, source: Arc<dyn holdfast::observe::Source>, serve_on: &tokio::runtime::Handle) -> anyhow::Result<()> {
    use holdfast::observe::{Endpoints, Observed};
    let observed = Observed::new(source, tokio::runtime::Handle::current());
    for (address, flag, which) in
        [(&args.metrics_address, "--metrics-address", Endpoints::Metrics), (&args.health_address, "--health-address", Endpoints::Health)]
    {
        let Some(address) = address else { continue };
        if which == Endpoints::Metrics {
            // From now on, so the start-up's commands are counted too.
            holdfast::metrics::install();
        }
        // Bound here so a taken port fails the start; registered with the gRPC runtime.
        let std = std::net::TcpListener::bind(address).with_context(|| format!("cannot listen on {flag} {address}"))?;
        std.set_nonblocking(true)?;
        let observed = observed.clone();
        serve_on.spawn(async move {
            match tokio::net::TcpListener::from_std(std) {
                Ok(l) => holdfast::observe::serve(l, which, observed).await,
                Err(e) => tracing::error!(error = %e, "cannot serve {flag}"),
            }
        });
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Writes each log event as exactly one line: a newline or carriage return inside an event (a
/// request's name formatted into a message, a tool's multi-line stderr) is written escaped, so
/// no request can forge a log line, whichever code logged it. The formatter hands over one
/// whole event per `write_all`.
struct OneLine<W>(W);

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(b) => (b, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        if !body.iter().any(|b| matches!(b, b'\n' | b'\r')) {
            return self.0.write_all(buf);
        }
        let mut line = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => line.extend_from_slice(b"\\n"),
                b'\r' => line.extend_from_slice(b"\\r"),
                b => line.push(b),
            }
        }
        line.extend_from_slice(end);
        self.0.write_all(&line)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `HOLDFAST_LOG` as comma-separated `LEVEL` and `TARGET=LEVEL` directives (`debug`,
/// `info,holdfast::exec=debug`); unset, empty or unreadable: `info`. A `Targets` filter rather than
/// `EnvFilter`: the same directives without span and field matching, which no one used and
/// which linked a regex engine into every binary (issue 14: idle memory is mostly code).
fn log_filter(var: Option<&str>) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::Targets;
    var.filter(|v| !v.trim().is_empty())
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO))
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = log_filter(std::env::var("HOLDFAST_LOG").ok().as_deref());
    let layer = tracing_subscriber::fmt::layer().with_writer(|| OneLine(std::io::stderr())).with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Text => registry.with(layer.with_filter(filter)).init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true).with_filter(filter)).init(),
    }
}

fn default_config() -> Config {
    Config::parse("[[pool]]\nname = \"default\"\nkind = \"file\"\npath = \"/var/lib/holdfast/default\"\n")
        .expect("built-in config is valid")
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the driver with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down: finishing in-flight calls");
}

async fn all_in_one(args: ServeArgs, serve_on: tokio::runtime::Handle) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => default_config(),
    };
    let node_id = match args.node_id {
        Some(n) => n,
        None => hostname::get().context("cannot read the hostname; pass --node-id")?.to_string_lossy().into_owned(),
    };
    if cfg.pools.is_empty() {
        bail!("the configuration names no pool: add a [[pool]] table");
    }
    let exec = Arc::new(RealExec::with_prefix(cfg.exec_prefix.to_prefix()));
    let mounter = Arc::new(RealMounter::new(exec.clone()));
    let freeze_deadline = std::time::Duration::from_secs(args.freeze_deadline.max(1));
    let driver = Arc::new(Driver::with_freeze_deadline(&node_id, &cfg, &args.state_dir, exec, mounter.clone(), freeze_deadline)?);
    // Before serving: nothing a killed predecessor froze or suspended stays so, and no
    // holding bind of a killed publish pins a volume.
    driver.recover().await;
    mounter.recover().await;
    // The controller of a cluster with one in-process agent holding every pool: the same
    // placement and routing as `holdfast controller`, no second implementation.
    let agent = holdfast::agent::local::LocalAgent::new(driver.clone());
    observe(&args.observe, agent.clone(), &serve_on)?;
    let options =
        ServeOptions { max_concurrent_calls: args.max_concurrent_calls as usize, serve_on: Some(serve_on), ..ServeOptions::default() };
    let controller = holdfast::controller::ClusterController::over_agent(agent).await.map_err(anyhow::Error::msg)?;
    server::serve_cluster(&args.endpoint, driver, controller, true, options, shutdown_signal()).await.map_err(anyhow::Error::msg)?;
    tracing::info!("stopped");
    Ok(())
}

/// The host part of `host:port` (`[::1]:9` → `::1`).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map(|(h, _)| h).unwrap_or(address);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Whether `address` listens on every interface (nobody can dial that).
fn is_wildcard(address: &str) -> bool {
    host_of(address).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified())
}

async fn agent(args: AgentArgs, serve_on: tokio::runtime::Handle) -> anyhow::Result<()> {
    use holdfast::agent::{local::LocalAgent, register, server::agent_service};
    use holdfast::tls::{ClientTls, ServerTls, TlsFiles};

    init_logging(args.log_format);
    let cfg = Config::load(&args.config)?;
    if let Some(p) = cfg.pools.iter().find(|p| p.kind() == holdfast::volume_id::PoolKind::Nfs) {
        bail!(
            "pool {:?} is an nfs pool: nfs pools are defined in the controller's configuration and sent to the agents when \
             they register; remove it from {}",
            p.name(),
            args.config.display()
        );
    }
    let advertise = match &args.advertise {
        Some(a) => a.clone(),
        None if is_wildcard(&args.listen) => {
            bail!("--listen {} is every interface, which the controller cannot dial: set --advertise to this node's address", args.listen)
        }
        None => args.listen.clone(),
    };
    let files = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() }),
        _ if args.insecure => {
            holdfast::tls::check_insecure(&[&args.listen, &advertise, &args.controller]).map_err(anyhow::Error::msg)?;
            None
        }
        _ => bail!("the Agent API needs --tls-cert, --tls-key and --tls-ca (or --insecure, for tests on loopback addresses only)"),
    };
    let server_tls = files.clone().map(ServerTls::server).transpose().context("the agent's TLS files")?.map(Arc::new);
    let client_tls = files.map(ClientTls::client).transpose().context("the agent's TLS files")?.map(Arc::new);

    let exec = Arc::new(RealExec::with_prefix(cfg.exec_prefix.to_prefix()));
    let mounter = Arc::new(RealMounter::new(exec.clone()));
    let freeze_deadline = Duration::from_secs(args.freeze_deadline.max(1));
    let driver = Arc::new(Driver::with_freeze_deadline(&args.node_id, &cfg, &args.state_dir, exec, mounter.clone(), freeze_deadline)?);
    // As all-in-one: nothing a killed predecessor froze or suspended stays so.
    driver.recover().await;
    mounter.recover().await;
    let local = LocalAgent::new(driver.clone());
    holdfast::observe::require_registration();
    observe(&args.observe, local.clone(), &serve_on)?;

    let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // The controller bounds its own calls; this bounds what one connection can make us run.
    let router = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(args.max_concurrent_calls as usize)
        .add_service(agent_service(local.clone()));
    tracing::info!(listen = %args.listen, advertise = %advertise, tls = server_tls.is_some(), "serving the Agent API");
    let api = {
        let shutdown = until_stopped(stopped.clone());
        async move {
            match server_tls {
                Some(tls) => holdfast::tls::serve(router, listener, tls, shutdown).await,
                None => router
                    // No Nagle: a reply must not wait for a delayed ACK (~40 ms a call), as on the TLS path.
                    .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
                    .await
                    .map_err(|e| format!("serving the Agent API: {e}")),
            }
        }
    };

    let server_name =
        args.tls_server_name.clone().unwrap_or_else(|| host_of(args.controller.split(',').next().unwrap_or_default().trim()).to_owned());
    let reg = register::RegisterConfig {
        controller: args.controller.clone(),
        node_id: args.node_id.clone(),
        advertise,
        tls: client_tls,
        server_name,
    };
    let learnt = driver.clone();
    let on_nfs: Arc<dyn Fn(Vec<holdfast::agent_proto::NfsPool>) + Send + Sync> =
        Arc::new(move |defs| register::learn_nfs_pools(&learnt, defs));
    let registration = tokio::spawn(register::run(reg, local.clone(), on_nfs));

    let options =
        ServeOptions { max_concurrent_calls: args.max_concurrent_calls as usize, serve_on: Some(serve_on), ..ServeOptions::default() };
    let csi = server::serve(&args.endpoint, driver, Services { controller: false, node: true }, options, until_stopped(stopped));
    let res = tokio::try_join!(csi, api);
    registration.abort();
    res.map_err(anyhow::Error::msg)?;
    tracing::info!("stopped");
    Ok(())
}

async fn controller(args: ControllerArgs, serve_on: tokio::runtime::Handle) -> anyhow::Result<()> {
    use holdfast::agent::{AgentOps, local::LocalAgent, remote::RemoteAgent};
    use holdfast::controller::{ClusterController, nfs_pool_definitions, registry};
    use holdfast::tls::{ClientTls, ServerTls, TlsFiles};

    init_logging(args.log_format);
    let cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(p) = cfg.pools.iter().find(|p| p.kind() != holdfast::volume_id::PoolKind::Nfs) {
        bail!(
            "pool {:?} is a {} pool: the controller serves only nfs pools; node-local pools belong in the configuration of \
             `holdfast agent` on their node",
            p.name(),
            p.kind().as_str()
        );
    }
    let files = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() }),
        _ if args.insecure => {
            holdfast::tls::check_insecure(&[&args.listen]).map_err(anyhow::Error::msg)?;
            None
        }
        _ => bail!(
            "the Registry and Agent API need --tls-cert, --tls-key and --tls-ca (or --insecure, for tests on loopback addresses only)"
        ),
    };
    let server_tls = files.clone().map(ServerTls::server).transpose().context("the controller's TLS files")?.map(Arc::new);
    let client_tls = files.map(ClientTls::client).transpose().context("the controller's TLS files")?.map(Arc::new);

    let server_name = args.agent_server_name.clone();
    let connector: registry::Connector = Arc::new(move |node: &str, address: &str| {
        let name = server_name.clone().unwrap_or_else(|| node.to_owned());
        Arc::new(RemoteAgent::new(node, address, &name, client_tls.clone())) as Arc<dyn AgentOps>
    });
    let heartbeat = Duration::from_millis(args.heartbeat_ms);
    let opts = registry::RegistryOptions {
        heartbeat,
        down_after: args.down_after_ms.map(Duration::from_millis).unwrap_or_else(|| registry::default_down_after(heartbeat)),
        grace: args.startup_grace_ms.map(Duration::from_millis).unwrap_or(heartbeat * 3),
        retired_file: args.retired_nodes.clone(),
        per_node_certs: args.tls_per_node,
        insecure: args.insecure,
        nfs_pools: nfs_pool_definitions(&cfg),
        ..registry::RegistryOptions::new(connector)
    };
    let reg = registry::Registry::new(opts);

    // The nfs pools: served in this process, by the same agent code as every node's pools.
    let exec = Arc::new(RealExec::with_prefix(cfg.exec_prefix.to_prefix()));
    let mounter = Arc::new(RealMounter::new(exec.clone()));
    let driver = Arc::new(Driver::new(&args.node_id, &cfg, &args.state_dir, exec, mounter.clone())?);
    driver.recover().await;
    if !driver.pools.is_empty() {
        reg.add_local(LocalAgent::new(driver.clone())).await.map_err(anyhow::Error::msg)?;
    }

    let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    observe(&args.observe, reg.clone(), &serve_on)?;
    let router = tonic::transport::Server::builder().add_service(reg.service());
    tracing::info!(listen = %args.listen, tls = server_tls.is_some(), per_node_certs = args.tls_per_node, nfs_pools = driver.pools.len(), "serving the Registry");
    let registry_api = {
        let shutdown = until_stopped(stopped.clone());
        async move {
            match server_tls {
                Some(tls) => holdfast::tls::serve(router, listener, tls, shutdown).await,
                None => router
                    // No Nagle: a reply must not wait for a delayed ACK (~40 ms a call), as on the TLS path.
                    .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
                    .await
                    .map_err(|e| format!("serving the Registry: {e}")),
            }
        }
    };
    let options =
        ServeOptions { max_concurrent_calls: args.max_concurrent_calls as usize, serve_on: Some(serve_on), ..ServeOptions::default() };
    let csi = server::serve_cluster(&args.endpoint, driver, ClusterController::new(reg), false, options, until_stopped(stopped));
    tokio::try_join!(csi, registry_api).map_err(anyhow::Error::msg)?;
    tracing::info!("stopped");
    Ok(())
}

/// issue 11: perf11. The call threads of `all-in-one` and `agent` unless told otherwise: what
/// they run waits on the pools' blocking threads and on the network, so two serve a node
/// whatever its CPU count (a runtime sized by CPUs starts one thread per core, each with its
/// stack and malloc arena, on a 64-core node as on a small one).
const NODE_WORKER_THREADS: u32 = 2;

/// How long, once serving has stopped, the exit waits for blocking calls still running.
const EXIT_WAIT: Duration = Duration::from_millis(500);

fn main() {
    let cli = Cli::parse();
    let runtime = |name: &str, threads: Option<usize>| {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.thread_name(name).enable_all();
        if let Some(n) = threads {
            b.worker_threads(n);
        }
        b.build().unwrap_or_else(|e| {
            eprintln!("holdfast: cannot start the async runtime: {e}");
            std::process::exit(1);
        })
    };
    // The pools and every Controller/Node call run on `calls`; connections and Identity on
    // `grpc`, which nothing else uses, so Probe answers even when calls block their threads.
    let threads = match &cli.cmd {
        Command::AllInOne(a) => Some(a.worker_threads as usize),
        Command::Agent(a) => Some(a.worker_threads as usize),
        Command::Controller(a) => a.worker_threads.map(|n| n as usize),
        _ => None,
    };
    let calls = runtime("holdfast-call", threads);
    let mut grpc = None;
    let res = match cli.cmd {
        Command::AllInOne(a) => {
            let handle = grpc.insert(runtime("holdfast-grpc", Some(2))).handle().clone();
            calls.block_on(all_in_one(a, handle))
        }
        Command::Agent(a) => {
            let handle = grpc.insert(runtime("holdfast-grpc", Some(2))).handle().clone();
            calls.block_on(agent(a, handle))
        }
        Command::Controller(a) => {
            let handle = grpc.insert(runtime("holdfast-grpc", Some(2))).handle().clone();
            calls.block_on(controller(a, handle))
        }
        Command::Ctl(a) => calls.block_on(holdfast::ctl::run(a)).map_err(anyhow::Error::msg),
        Command::Bench(a) => calls.block_on(holdfast::bench::run(a)).map_err(anyhow::Error::msg),
        Command::Certs(a) => holdfast::certs::run(a).map_err(anyhow::Error::msg),
    };
    // Dropping a runtime would wait for every blocking call, and one stuck in the kernel (a
    // frozen pool filesystem, a hung NFS server) never returns: stop waiting after a moment.
    if let Some(g) = grpc {
        g.shutdown_timeout(EXIT_WAIT);
    }
    calls.shutdown_timeout(EXIT_WAIT);
    if let Err(e) = res {
        eprintln!("holdfast: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn each_log_event_is_one_line() {
        let mut out = OneLine(Vec::new());
        out.write_all(b"INFO created name=a\nINFO forged\r\n").unwrap();
        out.write_all(b"INFO plain\n").unwrap();
        assert_eq!(String::from_utf8(out.0).unwrap(), "INFO created name=a\\nINFO forged\\r\nINFO plain\n");
    }

    #[test]
    fn holdfast_log_reads_levels_and_per_target_levels() {
        use tracing::Level;
        struct Case {
            var: Option<&'static str>,
            target: &'static str,
            level: Level,
            want: bool,
        }
        let cases = [
            Case { var: None, target: "holdfast::exec", level: Level::INFO, want: true },
            Case { var: None, target: "holdfast::exec", level: Level::DEBUG, want: false },
            Case { var: Some("debug"), target: "holdfast::exec", level: Level::DEBUG, want: true },
            Case { var: Some("debug"), target: "h2", level: Level::TRACE, want: false },
            Case { var: Some("warn,holdfast::exec=debug"), target: "holdfast::exec", level: Level::DEBUG, want: true },
            Case { var: Some("warn,holdfast::exec=debug"), target: "holdfast::server", level: Level::INFO, want: false },
            Case { var: Some("warn,holdfast::exec=debug"), target: "rustls", level: Level::WARN, want: true },
            Case { var: Some("off"), target: "holdfast", level: Level::ERROR, want: false },
            // Empty or unreadable: the default, not silence.
            Case { var: Some(""), target: "holdfast", level: Level::INFO, want: true },
            Case { var: Some("holdfast=loud"), target: "holdfast", level: Level::INFO, want: true },
            Case { var: Some("holdfast=loud"), target: "holdfast", level: Level::DEBUG, want: false },
        ];
        for c in cases {
            let got = log_filter(c.var).would_enable(c.target, &c.level);
            assert_eq!(got, c.want, "HOLDFAST_LOG={:?}: {} at {}", c.var, c.target, c.level);
        }
    }
}
