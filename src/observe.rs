//! What operators' tools read over HTTP: `--metrics-address` serves the Prometheus text of
//! [`crate::metrics`] at `/metrics`; `--health-address` serves `/healthz` (the runtime
//! answers), `/readyz` (started; an agent: registered with a controller) and `/status` (JSON:
//! each pool's health and room, and on the controller each agent's state).
//!
//! Both are answered on the runtime that serves gRPC and Identity, so `/healthz` answers while
//! calls block their own threads; the pool figures behind `/metrics` and `/status` are read on
//! the calls' runtime, within [`SAMPLE_BUDGET`], from a [`Source`].

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use crate::agent_proto as ap;
use crate::metrics::{self, NodeLabels, PoolLabels, PoolStateLabels, StateLabels};
use crate::placement::NodeState;

/// The longest a scrape or `/status` waits for the pools' figures: past it, the gauges keep
/// their last values and `/status` says the figures are missing (a hung pool never hangs a
/// scrape).
pub const SAMPLE_BUDGET: Duration = Duration::from_secs(10);

/// One pool as the process sees it now.
#[derive(Debug, Clone)]
pub struct PoolReport {
    /// The node holding it.
    pub node: String,
    /// Its report (health, capacity), as the Agent API carries it.
    pub pool: ap::Pool,
}

/// One agent as the controller's registry sees it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    /// The node id.
    pub node: String,
    /// `up`, `down` or `retired`.
    pub state: &'static str,
    /// Where its Agent API is reached.
    pub address: String,
    /// Volumes in its inventory.
    pub volumes: usize,
    /// When it was last heard from (seconds since the epoch; 0: never).
    pub last_seen_unix: i64,
}

/// Where the per-pool and per-agent figures come from.
#[async_trait]
pub trait Source: Send + Sync {
    /// Every pool now.
    async fn pools(&self) -> Vec<PoolReport>;
    /// Every agent; `None` where there is no registry of agents (all-in-one, an agent).
    fn nodes(&self) -> Option<Vec<NodeReport>> {
        None
    }
}

/// A node process (all-in-one, agent): its own pools, read now.
#[async_trait]
impl Source for crate::agent::local::LocalAgent {
    async fn pools(&self) -> Vec<PoolReport> {
        let node = self.driver().node_id.clone();
        self.pool_reports().await.into_iter().map(|pool| PoolReport { node: node.clone(), pool }).collect()
    }
}

fn state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Up => "up",
        NodeState::Down => "down",
        NodeState::Retired => "retired",
    }
}

/// The controller: every registered node's pools as last reported, and the agents' states.
#[async_trait]
impl Source for crate::controller::registry::Registry {
    async fn pools(&self) -> Vec<PoolReport> {
        self.nodes_view()
            .into_iter()
            .flat_map(|n| n.pools.into_iter().map(move |pool| PoolReport { node: n.node_id.clone(), pool }))
            .collect()
    }

    fn nodes(&self) -> Option<Vec<NodeReport>> {
        let nodes = self
            .nodes_view()
            .into_iter()
            .filter(|n| !n.in_process)
            .map(|n| NodeReport {
                state: state_name(n.state),
                address: n.address,
                volumes: n.volumes,
                last_seen_unix: n.last_seen_unix,
                node: n.node_id,
            })
            .collect();
        Some(nodes)
    }
}

/// Whether this process is ready (see [`readiness`]).
struct Readiness {
    serving: AtomicBool,
    needs_registration: AtomicBool,
    registered: AtomicBool,
}

static READY: Readiness =
    Readiness { serving: AtomicBool::new(false), needs_registration: AtomicBool::new(false), registered: AtomicBool::new(false) };

/// The CSI socket is bound and answering.
pub fn set_serving() {
    READY.serving.store(true, Ordering::Relaxed);
}

/// This process is an agent: it is ready only once a controller accepted its registration.
pub fn require_registration() {
    READY.needs_registration.store(true, Ordering::Relaxed);
}

/// A controller accepted this agent's registration (it stays ready after: a controller
/// restarting must not make every node look sick).
pub fn set_registered() {
    READY.registered.store(true, Ordering::Relaxed);
}

/// `Ok` when ready, else what it waits for.
pub fn readiness() -> Result<(), &'static str> {
    if !READY.serving.load(Ordering::Relaxed) {
        return Err("the CSI socket is not served yet");
    }
    if READY.needs_registration.load(Ordering::Relaxed) && !READY.registered.load(Ordering::Relaxed) {
        return Err("not registered with a controller yet");
    }
    Ok(())
}

/// What the HTTP endpoints read: the figures' source and the runtime to read them on.
#[derive(Clone)]
pub struct Observed {
    source: Arc<dyn Source>,
    calls: tokio::runtime::Handle,
    /// One scrape refreshes the gauges at a time.
    refresh: Arc<tokio::sync::Mutex<()>>,
}

impl Observed {
    /// Figures from `source`, read on the runtime `calls` (where pool work belongs).
    pub fn new(source: Arc<dyn Source>, calls: tokio::runtime::Handle) -> Observed {
        Observed { source, calls, refresh: Arc::new(tokio::sync::Mutex::new(())) }
    }

    async fn sample(&self) -> Option<Vec<PoolReport>> {
        let source = self.source.clone();
        let task = self.calls.spawn(async move { source.pools().await });
        let abort = task.abort_handle();
        match tokio::time::timeout(SAMPLE_BUDGET, task).await {
            Ok(Ok(p)) => Some(p),
            _ => {
                abort.abort();
                None
            }
        }
    }

    async fn metrics_text(&self) -> String {
        let m = metrics::install();
        let _one = self.refresh.lock().await;
        if let Some(pools) = self.sample().await {
            fill_pools(m, &pools);
        } else {
            tracing::warn!(budget = ?SAMPLE_BUDGET, "the pools' figures took too long; the scrape shows their last values");
        }
        if let Some(nodes) = self.source.nodes() {
            fill_nodes(m, &nodes);
        }
        m.encode()
    }

    async fn status_json(&self) -> String {
        #[derive(Serialize)]
        struct Pool {
            node: String,
            name: String,
            kind: String,
            health: &'static str,
            message: String,
            free_bytes: u64,
            used_bytes: u64,
            volumes: u32,
        }
        #[derive(Serialize)]
        struct Status {
            ready: bool,
            waiting_for: Option<&'static str>,
            version: &'static str,
            pools: Option<Vec<Pool>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            agents: Option<Vec<NodeReport>>,
        }
        let pools = self.sample().await.map(|ps| {
            ps.into_iter()
                .map(|r| {
                    let c = r.pool.capacity.clone().unwrap_or_default();
                    Pool {
                        health: health_name(r.pool.health),
                        node: r.node,
                        name: r.pool.name,
                        kind: r.pool.kind,
                        message: r.pool.health_message,
                        free_bytes: c.largest_volume_bytes,
                        used_bytes: c.used_bytes,
                        volumes: c.volume_count,
                    }
                })
                .collect()
        });
        let ready = readiness();
        let s = Status { ready: ready.is_ok(), waiting_for: ready.err(), version: crate::VERSION, pools, agents: self.source.nodes() };
        serde_json::to_string_pretty(&s).unwrap_or_default() + "\n"
    }
}

fn health_name(h: i32) -> &'static str {
    match ap::PoolHealth::try_from(h) {
        Ok(ap::PoolHealth::Healthy) => "healthy",
        Ok(ap::PoolHealth::Degraded) => "degraded",
        Ok(ap::PoolHealth::Unavailable) => "unavailable",
        _ => "unknown",
    }
}

fn fill_pools(m: &metrics::Metrics, pools: &[PoolReport]) {
    // Cleared first: a pool gone from the configuration leaves no stale series.
    m.pool_free.clear();
    m.pool_used.clear();
    m.pool_volumes.clear();
    m.pool_health.clear();
    for r in pools {
        let l = PoolLabels { node: r.node.clone(), pool: r.pool.name.clone(), kind: r.pool.kind.clone() };
        let c = r.pool.capacity.clone().unwrap_or_default();
        m.pool_free.get_or_create(&l).set(c.largest_volume_bytes.min(i64::MAX as u64) as i64);
        m.pool_used.get_or_create(&l).set(c.used_bytes.min(i64::MAX as u64) as i64);
        m.pool_volumes.get_or_create(&l).set(i64::from(c.volume_count));
        let now = health_name(r.pool.health);
        for state in ["healthy", "degraded", "unavailable"] {
            let sl = PoolStateLabels { node: l.node.clone(), pool: l.pool.clone(), kind: l.kind.clone(), state };
            m.pool_health.get_or_create(&sl).set(i64::from(state == now));
        }
    }
}

fn fill_nodes(m: &metrics::Metrics, nodes: &[NodeReport]) {
    m.agent_state.clear();
    m.agents.clear();
    let states = ["up", "down", "retired"];
    let mut counts = [0i64; 3];
    for n in nodes {
        for (i, state) in states.iter().enumerate() {
            let on = n.state == *state;
            counts[i] += i64::from(on);
            m.agent_state.get_or_create(&NodeLabels { node: n.node.clone(), state }).set(i64::from(on));
        }
    }
    for (state, count) in states.into_iter().zip(counts) {
        m.agents.get_or_create(&StateLabels { state }).set(count);
    }
}

/// Which endpoints one listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// `/metrics`.
    Metrics,
    /// `/healthz`, `/readyz`, `/status`.
    Health,
}

fn reply(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

async fn answer(which: Endpoints, observed: Observed, req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let r = match (which, req.uri().path()) {
        (Endpoints::Metrics, "/metrics") => {
            reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", observed.metrics_text().await)
        }
        (Endpoints::Health, "/healthz") => reply(StatusCode::OK, TEXT, "ok\n".into()),
        (Endpoints::Health, "/readyz") => match readiness() {
            Ok(()) => reply(StatusCode::OK, TEXT, "ready\n".into()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("not ready: {why}\n")),
        },
        (Endpoints::Health, "/status") => reply(StatusCode::OK, "application/json", observed.status_json().await),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    };
    Ok(r)
}

/// Serves `which` on `listener` until the process ends: HTTP/1.1, one task per connection.
pub async fn serve(listener: tokio::net::TcpListener, which: Endpoints, observed: Observed) {
    if which == Endpoints::Metrics {
        metrics::install();
    }
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(address = %local, endpoints = ?which, "serving HTTP");
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let observed = observed.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(which, observed.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        });
    }
}
