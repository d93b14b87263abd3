//! Serving CSI over a Unix socket (or TCP for tests): socket preparation (a stale socket is
//! replaced, a live one is never stolen, anything that is not a socket is never deleted; the
//! socket is never reachable with permissions looser than 0660, its new directories are 0750
//! whatever the umask), any client `:authority` accepted ([`authority`]), a bound on concurrent
//! calls that Identity is exempt from, and a shutdown that removes the socket at once and lets
//! in-flight calls finish for a bounded time.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::codegen::http;
use tonic::transport::Server;

pub mod authority;

use crate::controller::ClusterController;
use crate::csi::{identity::IdentityService, node::NodeService};
use crate::driver::Driver;
use crate::endpoint::Endpoint;
use crate::proto::{
    controller_server::ControllerServer, group_controller_server::GroupControllerServer, identity_server::IdentityServer,
    node_server::NodeServer,
};

/// Which CSI services a process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Services {
    /// Serve the Controller service.
    pub controller: bool,
    /// Serve the Node service.
    pub node: bool,
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Controller and Node calls served at once; more wait for a free slot (their own deadline
    /// still applies). Identity calls (Probe, GetPluginInfo) are never counted nor kept waiting.
    pub max_concurrent_calls: usize,
    /// How long in-flight calls get to finish after the shutdown signal.
    pub grace: Duration,
    /// The runtime that accepts connections, speaks HTTP/2 and answers Identity. When set,
    /// Controller and Node calls run on the runtime [`serve`] is called from, so a call that
    /// blocks its worker threads (a syscall stuck in the kernel that escaped
    /// [`crate::blocking::run`]) can never stall Probe, GetPluginInfo or the shutdown.
    /// `None`: everything on the calling runtime (in-process tests).
    pub serve_on: Option<tokio::runtime::Handle>,
}

/// The default bound on concurrent Controller and Node calls: well above what a node's
/// sidecars and kubelet send at once, well below what would exhaust threads or descriptors.
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 64;

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS, grace: SHUTDOWN_GRACE, serve_on: None }
    }
}

/// Removes a stale socket at `path`, refusing to touch a live socket or a non-socket file.
/// Missing parent directories are created 0750 (the umask can only make them stricter).
pub fn prepare_socket(path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| format!("cannot create socket directory {}: {e}", dir.display()))?;
        remove_stale_bind_dirs(path);
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot inspect {}: {e}", path.display())),
        Ok(m) if !m.file_type().is_socket() => {
            Err(format!("{} exists and is not a socket; refusing to replace it (remove it or choose another --endpoint)", path.display()))
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!("another process is serving on {}; stop it or choose another --endpoint", path.display()));
            }
            std::fs::remove_file(path).map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))
        }
    }
}

/// The private directory [`bind_socket`] binds in: `.NAME.bind-PID-NANOS` beside `path`.
fn bind_dir_prefix(path: &Path) -> Option<String> {
    Some(format!(".{}.bind-", path.file_name()?.to_string_lossy()))
}

/// Removes bind directories a killed driver left beside `path` (a socket inside, nothing else:
/// anything more is not ours and stays).
fn remove_stale_bind_dirs(path: &Path) {
    let (Some(dir), Some(prefix)) = (path.parent(), bind_dir_prefix(path)) else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let ours = e.file_name().to_string_lossy().starts_with(&prefix);
        if !ours || !std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let sock = p.join("csi.sock");
        if std::fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&sock);
        }
        let _ = std::fs::remove_dir(&p);
    }
}

/// Binds a listening socket at `path` that is never reachable with permissions looser than
/// 0660: it is bound in a fresh 0700 directory next to `path`, given 0660 there, then renamed
/// into place (the umask of the process plays no part).
pub fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, String> {
    let dir = path.parent().ok_or_else(|| format!("{} has no parent directory", path.display()))?;
    let prefix = bind_dir_prefix(path).ok_or_else(|| format!("{} names no file", path.display()))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let private = dir.join(format!("{prefix}{}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(|e| format!("cannot create {}: {e}", private.display()))?;
    let staged = private.join("csi.sock");
    let bound = (|| {
        let listener = tokio::net::UnixListener::bind(&staged).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| format!("cannot set permissions of {}: {e}", path.display()))?;
        std::fs::rename(&staged, path).map_err(|e| format!("cannot move the socket into place at {}: {e}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// How long in-flight calls get to finish after a shutdown signal. Orchestrators keep their
/// connections open, so without a bound a stop could wait for them forever.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Removes the socket at `path` if it is still the one this process bound (`ino`): a driver
/// started meanwhile at the same path keeps its socket.
fn remove_own_socket(path: &Path, ino: Option<(u64, u64)>) {
    let now = std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
    if now.is_some() && now == ino {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove the socket");
        }
    }
}

/// Relays one accepted connection through [`authority::relay`] and hands tonic the other end.
fn relayed(conn: tokio::net::UnixStream) -> tokio::io::DuplexStream {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (from_client, mut to_client) = conn.into_split();
        let (mut from_server, to_server) = tokio::io::split(ours);
        let up = async move {
            if let Err(e) = authority::relay(from_client, to_server).await {
                tracing::debug!(error = %e, "client connection ended");
            }
            std::future::pending::<()>().await
        };
        let down = async move {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
            let _ = to_client.shutdown().await;
        };
        // The connection is over when the server side is: the relay up is dropped with it.
        tokio::select! {
            () = down => {}
            () = up => {}
        }
    });
    theirs
}

/// The tower layer that sends Controller and Node calls to their own runtime (when there is
/// one) and bounds how many run at once; Identity calls pass straight through. See
/// [`ServeOptions`].
#[derive(Clone)]
struct Calls {
    slots: Arc<tokio::sync::Semaphore>,
    runtime: Option<tokio::runtime::Handle>,
}

impl<S> tower::Layer<S> for Calls {
    type Service = CallsService<S>;
    fn layer(&self, inner: S) -> CallsService<S> {
        CallsService { inner, calls: self.clone() }
    }
}

/// A service behind [`Calls`].
#[derive(Clone)]
struct CallsService<S> {
    inner: S,
    calls: Calls,
}

/// Cancels a call's task when the client gives up on it (the future is dropped), as if it ran
/// inline: its external commands are killed, its locks released.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<S, B> tower::Service<http::Request<B>> for CallsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let identity = req.uri().path().starts_with("/csi.v1.Identity/");
        // issue 14: metrics: every call's latency and outcome, recorded here once for all.
        let call = crate::metrics::Call::start(req.uri().path(), !identity);
        if identity {
            let Some(call) = call else { return Box::pin(inner.call(req)) };
            return Box::pin(async move {
                let res = inner.call(req).await;
                call.done(res.as_ref().map(grpc_code).unwrap_or(2), "none");
                res
            });
        }
        let calls = self.calls.clone();
        Box::pin(async move {
            // Waiting here costs no thread; the client's deadline still cuts the wait short.
            let _slot = calls.slots.acquire_owned().await.ok();
            let work = crate::metrics::with_pool_kind(inner.call(req));
            let (res, kind) = match calls.runtime {
                None => work.await,
                Some(rt) => {
                    let task = rt.spawn(work);
                    let _abort = AbortOnDrop(task.abort_handle());
                    match task.await {
                        Ok(done) => done,
                        Err(e) => (Ok(tonic::Status::internal(format!("the call failed: {e}")).into_http()), "none"),
                    }
                }
            };
            if let Some(call) = call {
                call.done(res.as_ref().map(grpc_code).unwrap_or(2), kind);
            }
            res
        })
    }
}

/// The gRPC code of an answer: in its headers when it failed at once (tonic's trailers-only
/// answer); a unary answer with a body succeeded (its trailers say OK).
fn grpc_code<B>(res: &http::Response<B>) -> i32 {
    res.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Runs a server future until it ends, or until `grace` after the shutdown signal fired.
async fn with_grace<F>(server: F, fired: tokio::sync::oneshot::Receiver<()>, grace: Duration) -> Result<(), String>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    let deadline = async {
        match fired.await {
            Ok(()) => tokio::time::sleep(grace).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        res = server => res.map_err(|e| format!("server failed: {e}")),
        () = deadline => {
            tracing::warn!(grace = ?grace, "calls still in flight after the grace period; stopping anyway");
            Ok(())
        }
    }
}

/// Serves the chosen services on `endpoint` until `shutdown` completes; then stops accepting
/// calls, removes the socket at once and lets in-flight calls finish for at most
/// `options.grace`.
pub async fn serve(
    endpoint: &str,
    driver: Arc<Driver>,
    services: Services,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    serve_inner(endpoint, driver, services, None, options, shutdown).await
}

/// [`serve`] with the cluster's Controller ([`ClusterController`]) instead of the one over the
/// driver's pools, and the `Admin` service (`holdfast ctl nodes`) beside it: `holdfast
/// controller` (`node` false) and all-in-one (`node` true). Identity answers for `driver`.
pub async fn serve_cluster(
    endpoint: &str,
    driver: Arc<Driver>,
    controller: ClusterController,
    node: bool,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    serve_inner(endpoint, driver, Services { controller: true, node }, Some(controller), options, shutdown).await
}

async fn serve_inner(
    endpoint: &str,
    driver: Arc<Driver>,
    services: Services,
    mut cluster: Option<ClusterController>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    if services.controller && cluster.is_none() {
        // This process's pools alone: the cluster's Controller over one in-process agent.
        cluster = Some(ClusterController::over_driver(driver.clone()).await.map_err(|e| e.to_string())?);
    }
    let Some(server_rt) = options.serve_on.clone() else {
        return serve_here(endpoint.to_owned(), driver, services, cluster, options, None, shutdown).await;
    };
    let calls = tokio::runtime::Handle::current();
    let task = server_rt.spawn(serve_here(endpoint.to_owned(), driver, services, cluster, options, Some(calls), shutdown));
    task.await.map_err(|e| format!("server failed: {e}"))?
}

async fn serve_here(
    endpoint: String,
    driver: Arc<Driver>,
    services: Services,
    cluster: Option<ClusterController>,
    options: ServeOptions,
    calls_on: Option<tokio::runtime::Handle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let endpoint = endpoint.as_str();
    let (fire, fired) = tokio::sync::oneshot::channel();
    let cluster = cluster.map(Arc::new);
    let calls = Calls { slots: Arc::new(tokio::sync::Semaphore::new(options.max_concurrent_calls.max(1))), runtime: calls_on };
    let router = Server::builder()
        .layer(calls)
        .add_service(IdentityServer::new(
            IdentityService::new(driver.clone()).with_controller(cluster.is_some()).with_group_controller(cluster.is_some()),
        ))
        .add_optional_service(cluster.as_ref().map(|c| crate::controller::admin::admin_service(c.registry().clone())))
        // issue 12: group snapshots: served wherever the Controller is.
        .add_optional_service(cluster.as_ref().map(|c| GroupControllerServer::new(crate::controller::group::GroupService(c.clone()))))
        .add_optional_service(cluster.map(ControllerServer::from_arc))
        .add_optional_service(services.node.then(|| NodeServer::new(NodeService::new(driver.clone()))));
    match Endpoint::parse(endpoint)? {
        Endpoint::Unix(path) => {
            prepare_socket(&path)?;
            let listener = bind_socket(&path)?;
            let ino = std::fs::symlink_metadata(&path).ok().map(|m| (m.dev(), m.ino()));
            let own = path.clone();
            let shutdown = async move {
                shutdown.await;
                // Gone from the file system at once: nothing new connects while calls finish.
                remove_own_socket(&own, ino);
                let _ = fire.send(());
            };
            tracing::info!(endpoint, node = %driver.node_id, pools = driver.pools.len(), max_concurrent_calls = options.max_concurrent_calls, "serving CSI");
            let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(relayed));
            // issue 14: health: /readyz answers ready from here on (an agent: once registered too).
            crate::observe::set_serving();
            let res = with_grace(router.serve_with_incoming_shutdown(incoming, shutdown), fired, options.grace).await;
            remove_own_socket(&path, ino);
            res
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let shutdown = async move {
                shutdown.await;
                let _ = fire.send(());
            };
            tracing::info!(endpoint, node = %driver.node_id, pools = driver.pools.len(), max_concurrent_calls = options.max_concurrent_calls, "serving CSI");
            crate::observe::set_serving();
            with_grace(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown), fired, options.grace).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_sockets_are_replaced_and_other_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        prepare_socket(&sock).unwrap();
        assert!(!sock.exists(), "a socket nobody listens on is stale and removed");

        let live = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(prepare_socket(&sock).unwrap_err().contains("another process"));
        drop(live);

        // A bind directory left by a killed driver goes; one holding anything else stays.
        let stale = dir.path().join(".csi.sock.bind-1-2");
        std::fs::create_dir(&stale).unwrap();
        drop(std::os::unix::net::UnixListener::bind(stale.join("csi.sock")).unwrap());
        let foreign = dir.path().join(".csi.sock.bind-3-4");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("keep"), b"x").unwrap();
        prepare_socket(&sock).unwrap();
        assert!(!stale.exists());
        assert!(foreign.join("keep").exists());
        let listener = bind_socket(&sock).unwrap();
        assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o660);
        drop(listener);

        let file = dir.path().join("data");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(prepare_socket(&file).unwrap_err().contains("not a socket"));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
}
