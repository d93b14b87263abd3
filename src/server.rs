//! Serving CSI over a Unix socket (or TCP for tests): socket preparation (a stale socket is
//! replaced, a live one is never stolen, anything that is not a socket is never deleted),
//! permissions 0660, and graceful shutdown that lets in-flight calls finish.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;

use crate::csi::{controller::ControllerService, identity::IdentityService, node::NodeService};
use crate::driver::Driver;
use crate::endpoint::Endpoint;
use crate::proto::{controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer};

/// Which CSI services a process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Services {
    /// Serve the Controller service.
    pub controller: bool,
    /// Serve the Node service.
    pub node: bool,
}

/// Removes a stale socket at `path`, refusing to touch a live socket or a non-socket file.
pub fn prepare_socket(path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create socket directory {}: {e}", dir.display()))?;
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

/// How long in-flight calls get to finish after a shutdown signal. Orchestrators keep their
/// connections open, so without a bound a stop could wait for them forever.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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

/// Serves the chosen services on `endpoint` until `shutdown` completes, then lets in-flight
/// calls finish (for at most [`SHUTDOWN_GRACE`]) and removes the socket.
pub async fn serve(endpoint: &str, driver: Arc<Driver>, services: Services, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let (fire, fired) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        shutdown.await;
        let _ = fire.send(());
    };
    let router = Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(driver.clone())))
        .add_optional_service(services.controller.then(|| ControllerServer::new(ControllerService::new(driver.clone()))))
        .add_optional_service(services.node.then(|| NodeServer::new(NodeService::new(driver.clone()))));
    match Endpoint::parse(endpoint)? {
        Endpoint::Unix(path) => {
            prepare_socket(&path)?;
            let listener = tokio::net::UnixListener::bind(&path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
                .map_err(|e| format!("cannot set permissions of {}: {e}", path.display()))?;
            tracing::info!(endpoint, node = %driver.node_id, pools = driver.pools.len(), "serving CSI");
            let res =
                with_grace(router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown), fired, SHUTDOWN_GRACE).await;
            let _ = std::fs::remove_file(&path);
            res
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            tracing::info!(endpoint, node = %driver.node_id, pools = driver.pools.len(), "serving CSI");
            with_grace(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown), fired, SHUTDOWN_GRACE).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sockets_are_replaced_and_other_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        prepare_socket(&sock).unwrap();
        assert!(!sock.exists(), "a socket nobody listens on is stale and removed");

        let live = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(prepare_socket(&sock).unwrap_err().contains("another process"));
        drop(live);

        let file = dir.path().join("data");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(prepare_socket(&file).unwrap_err().contains("not a socket"));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
}
