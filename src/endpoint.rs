//! CSI endpoints: `unix:///path/csi.sock` (what orchestrators use) or `tcp://127.0.0.1:PORT`
//! (tests); parsing, and a client channel to one.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

/// A parsed endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address `host:port`.
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:///abs/path`, `unix:/abs/path`, a bare absolute path, or `tcp://host:port`.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(rest) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            let p = PathBuf::from(rest);
            if !p.is_absolute() {
                return Err(format!("endpoint {s:?}: the socket path must be absolute (unix:///run/csi/csi.sock)"));
            }
            return Ok(Endpoint::Unix(p));
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            if rest.is_empty() || !rest.contains(':') {
                return Err(format!("endpoint {s:?}: expected tcp://HOST:PORT"));
            }
            return Ok(Endpoint::Tcp(rest.to_owned()));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        Err(format!("endpoint {s:?}: expected unix:///path/to/csi.sock or tcp://127.0.0.1:PORT"))
    }
}

/// Opens a gRPC channel to a CSI endpoint.
pub async fn connect(endpoint: &str) -> Result<Channel, String> {
    match Endpoint::parse(endpoint)? {
        Endpoint::Tcp(addr) => TonicEndpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {endpoint}: {e}")),
        Endpoint::Unix(path) => {
            // The URI is required by tonic but unused: the connector below dials the socket.
            let shown = path.display().to_string();
            TonicEndpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                }))
                .await
                .map_err(|e| format!("cannot connect to unix socket {shown}: {e} (is the driver running?)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(Endpoint::parse("unix:///run/csi.sock"), Ok(Endpoint::Unix("/run/csi.sock".into())));
        assert_eq!(Endpoint::parse("unix:/run/csi.sock"), Ok(Endpoint::Unix("/run/csi.sock".into())));
        assert_eq!(Endpoint::parse("/run/csi.sock"), Ok(Endpoint::Unix("/run/csi.sock".into())));
        assert_eq!(Endpoint::parse("tcp://127.0.0.1:1234"), Ok(Endpoint::Tcp("127.0.0.1:1234".into())));
        assert!(Endpoint::parse("unix://relative.sock").is_err());
        assert!(Endpoint::parse("http://x").is_err());
        assert!(Endpoint::parse("tcp://").is_err());
    }
}
