//! Mutual TLS for the Agent API and registration, from files (`--tls-cert`, `--tls-key`,
//! `--tls-ca`): every connection, in either direction, presents a certificate signed by the
//! cluster CA and checks the other end's. The files are re-read when they change (a rotated
//! Kubernetes Secret, cert-manager renewing), checked at most once a second on a new
//! connection; a bad new file keeps the previous configuration and is logged.
//!
//! [`incoming`] accepts TCP connections and completes the TLS handshake before tonic sees the
//! connection: a client without a valid certificate never reaches a handler. Handlers read
//! the peer's certificate names from [`PeerInfo`] in the request's extensions (a controller
//! binds a per-node certificate to the node id). [`check_insecure`] is the rule for
//! `--insecure`: loopback addresses only.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

/// The longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;
/// How often, at most, a new connection makes us look at the files again.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The longest looking at (and reading) the files may take; past it the old config is used.
const CHECK_DEADLINE: Duration = Duration::from_secs(5);

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the combination (a key that does not match the certificate…).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The files could not be looked at in time.
    #[error("{0}")]
    Blocked(String),
}

/// The three files of a node's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This end's certificate chain (PEM), e.g. `tls.crt`.
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8, PKCS#1 or SEC1), e.g. `tls.key`.
    pub key: PathBuf,
    /// The cluster CA certificates (PEM) peers must be signed by, e.g. `ca.crt`.
    pub ca: PathBuf,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.clone(), source })
}

/// The identity and trust anchors from the files, read once.
struct Material {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

fn material(files: &TlsFiles) -> Result<Material, TlsError> {
    let invalid = |path: &PathBuf, why: String| TlsError::Invalid { path: path.clone(), why };
    let certs = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&files.cert, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(&files.cert, "holds no certificate".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| invalid(&files.key, format!("holds no PEM private key: {e}")))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&files.ca)?) {
        let ca = ca.map_err(|e| invalid(&files.ca, format!("not a PEM certificate: {e}")))?;
        roots.add(ca).map_err(|e| invalid(&files.ca, format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(invalid(&files.ca, "holds no CA certificate".into()));
    }
    Ok(Material { certs, key, roots: Arc::new(roots) })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration that requires a client certificate signed by the CA and speaks
/// HTTP/2 (gRPC).
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let m = material(files)?;
    let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(m.roots, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cfg)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.certs, m.key)
        .map_err(cfg)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client configuration that presents this node's certificate and trusts servers signed by
/// the CA.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, TlsError> {
    let m = material(files)?;
    let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cfg)?
        .with_root_certificates(m.roots)
        .with_client_auth_cert(m.certs, m.key)
        .map_err(cfg)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What identifies a version of the files: a replaced file (a Secret's symlink swapped, a file
/// rewritten) changes its inode, size or modification time.
type Fingerprint = Vec<Option<(u64, u64, u64, i64, i64)>>;

fn fingerprint(files: &TlsFiles) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())))
        .collect()
}

struct State<T> {
    current: Arc<T>,
    seen: Fingerprint,
    checked: Instant,
}

/// A TLS configuration that follows its files: [`Reloading::current`] answers the newest good
/// one.
pub struct Reloading<T> {
    files: TlsFiles,
    build: fn(&TlsFiles) -> Result<T, TlsError>,
    interval: Duration,
    state: Mutex<State<T>>,
    refused: Mutex<(u64, Option<String>)>,
}

/// The server side: [`server_config`] kept current.
pub type ServerTls = Reloading<ServerConfig>;
/// The client side: [`client_config`] kept current.
pub type ClientTls = Reloading<ClientConfig>;

impl ServerTls {
    /// Loads the server configuration; a bad file is an error here (at start-up).
    pub fn server(files: TlsFiles) -> Result<ServerTls, TlsError> {
        Reloading::load(files, server_config)
    }
}

impl ClientTls {
    /// Loads the client configuration; a bad file is an error here (at start-up).
    pub fn client(files: TlsFiles) -> Result<ClientTls, TlsError> {
        Reloading::load(files, client_config)
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the first configuration from the files.
    pub fn load(files: TlsFiles, build: fn(&TlsFiles) -> Result<T, TlsError>) -> Result<Reloading<T>, TlsError> {
        let seen = fingerprint(&files);
        let current = Arc::new(build(&files)?);
        Ok(Reloading {
            files,
            build,
            interval: CHECK_INTERVAL,
            state: Mutex::new(State { current, seen, checked: Instant::now() }),
            refused: Mutex::new((0, None)),
        })
    }

    /// Connections refused so far and why the last one was (for operators and tests).
    pub fn refusals(&self) -> (u64, Option<String>) {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn refused(&self, why: &str) {
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        r.0 += 1;
        r.1 = Some(why.to_owned());
    }

    /// Looks at the files at most once per `interval` (default [`CHECK_INTERVAL`]).
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// The files this configuration comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panic elsewhere while holding the lock leaves a usable state (two plain fields).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration for a new connection: re-read first if the files changed since they
    /// were last read. A file that cannot be read or used keeps the previous configuration
    /// (logged once per change of the files), so a half-written rotation never cuts the node
    /// off.
    pub async fn current(&self) -> Arc<T> {
        let seen = {
            let mut st = self.lock();
            if st.checked.elapsed() < self.interval {
                return st.current.clone();
            }
            st.checked = Instant::now();
            st.seen.clone()
        };
        let (files, build) = (self.files.clone(), self.build);
        // The fingerprint is taken before reading: a file replaced during the read shows up
        // as a change on the next check.
        let res = crate::blocking::run("tls-files", "reading the TLS files", CHECK_DEADLINE, move || {
            let now = fingerprint(&files);
            (now != seen).then(|| (build(&files), now))
        })
        .await
        .map_err(|e| TlsError::Blocked(e.to_string()));
        let mut st = self.lock();
        match res {
            Ok(None) => {}
            Ok(Some((Ok(config), fp))) => {
                st.current = Arc::new(config);
                st.seen = fp;
                tracing::info!(cert = %self.files.cert.display(), "TLS files changed: new connections use the new certificates");
            }
            Ok(Some((Err(e), fp))) => {
                st.seen = fp;
                tracing::warn!(error = %e, "TLS files changed but cannot be used: keeping the previous certificates");
            }
            Err(e) => tracing::warn!(error = %e, "cannot look at the TLS files: keeping the previous certificates"),
        }
        st.current.clone()
    }
}

/// The names a peer's certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerNames {
    /// The subject's common name.
    pub common_name: Option<String>,
    /// DNS subject alternative names.
    pub dns: Vec<String>,
    /// IP address subject alternative names.
    pub ips: Vec<IpAddr>,
}

impl PeerNames {
    /// Reads the names off a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<PeerNames, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let mut names = PeerNames {
            common_name: cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned),
            ..PeerNames::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => names.dns.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => names.ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("length checked"))),
                        16 => names.ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("length checked"))),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(names)
    }

    /// Reads the names off the first certificate of a PEM file's contents.
    pub fn from_pem(pem: &str) -> Result<PeerNames, String> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("not a PEM certificate: {e}"))?;
        PeerNames::from_der(&der)
    }

    /// Whether the certificate is issued to `name`: its common name or a DNS name equals it
    /// exactly (node ids are compared as they are, not as case-insensitive host names).
    pub fn names(&self, name: &str) -> bool {
        self.common_name.as_deref() == Some(name) || self.dns.iter().any(|d| d == name)
    }
}

/// Who is on the other end of a TLS connection: in every request's extensions
/// (`request.extensions().get::<PeerInfo>()`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The names in the certificate it presented (verified against the CA).
    pub names: Arc<PeerNames>,
}

/// The peer of a request that came through [`incoming`].
pub fn peer_of<T>(request: &tonic::Request<T>) -> Option<&PeerInfo> {
    request.extensions().get::<PeerInfo>()
}

/// An accepted connection whose handshake (with a valid client certificate) is complete.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Completes the server side of one handshake; the client's certificate is verified by the
/// configuration's verifier, so an `Ok` peer is signed by the CA.
async fn handshake(tls: &ServerTls, tcp: TcpStream, remote: SocketAddr) -> Result<TlsConn, String> {
    let config = tls.current().await;
    let _ = tcp.set_nodelay(true);
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Err(_) => return Err(format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
        Ok(Ok(s)) => s,
    };
    let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no client certificate")?;
    let names = PeerNames::from_der(cert)?;
    Ok(TlsConn { stream, info: PeerInfo { remote, names: Arc::new(names) } })
}

/// Accepts connections on `listener` and yields those whose TLS handshake succeeded, for
/// `Router::serve_with_incoming[_shutdown]`. Handshakes run concurrently (a slow client holds
/// up nobody) and a refused one is logged; accepting stops when the stream is dropped.
pub fn incoming(listener: TcpListener, tls: Arc<ServerTls>) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match handshake(&tls, tcp, remote).await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(e) => {
                        tls.refused(&e);
                        tracing::warn!(%remote, error = %e, "refused a connection");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Arc<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    router.serve_with_incoming_shutdown(incoming(listener, tls), shutdown).await.map_err(|e| format!("serving over TLS: {e}"))
}

/// Opens a gRPC channel to `address` (`host:port`) over TLS with a fixed client configuration,
/// checking that the server's certificate names `server_name`.
pub async fn connect_with(address: &str, server_name: &str, config: Arc<ClientConfig>) -> Result<Channel, String> {
    connect_inner(address, server_name, move || {
        let config = config.clone();
        async move { config }
    })
    .await
}

/// [`connect_with`] with the reloading client configuration: every (re)connection uses the
/// newest certificates.
pub async fn connect(address: &str, server_name: &str, tls: Arc<ClientTls>) -> Result<Channel, String> {
    connect_inner(address, server_name, move || {
        let tls = tls.clone();
        async move { tls.current().await }
    })
    .await
}

async fn connect_inner<F, Fut>(address: &str, server_name: &str, config: F) -> Result<Channel, String>
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Arc<ClientConfig>> + Send,
{
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| format!("server name {server_name:?}: {e}"))?;
    let addr = address.to_owned();
    // The URI is required by tonic but unused: the connector dials `address` itself.
    let endpoint = Endpoint::from_shared(format!("http://{address}")).map_err(|e| format!("address {address:?}: {e}"))?;
    endpoint
        .connect_timeout(HANDSHAKE_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_| {
            let (addr, name, config) = (addr.clone(), name.clone(), config.clone());
            async move {
                let tcp = TcpStream::connect(&addr).await?;
                let _ = tcp.set_nodelay(true);
                let stream = tokio_rustls::TlsConnector::from(config().await).connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("cannot connect to {address} over TLS: {}", chain(&e)))
}

/// An error with its causes, so "transport error" says what failed underneath.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Whether `--insecure` may be used with these addresses (listen, advertise, controller): only
/// when every one is loopback (`127.0.0.0/8`, `::1`, `localhost`) or a unix socket, so plain
/// text never leaves the machine. The error names the first address that is not.
pub fn check_insecure(addresses: &[&str]) -> Result<(), String> {
    for &a in addresses {
        if !is_loopback(a) {
            return Err(format!(
                "--insecure is only for tests on one machine, and {} is not a loopback address; \
                 use --tls-cert, --tls-key and --tls-ca",
                crate::error::bounded(a)
            ));
        }
    }
    Ok(())
}

fn is_loopback(address: &str) -> bool {
    let a = address.trim();
    if a.starts_with("unix:") || a.starts_with('/') {
        return true;
    }
    let a = ["tcp://", "http://", "https://"].iter().find_map(|s| a.strip_prefix(s)).unwrap_or(a);
    let a = a.strip_suffix('/').unwrap_or(a);
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return sa.ip().is_loopback();
    }
    if let Ok(ip) = a.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return ip.is_loopback();
    }
    let host = match a.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => a,
    };
    host.eq_ignore_ascii_case("localhost")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_proto::registry_server::{Registry, RegistryServer};
    use crate::agent_proto::*;
    use crate::certs::{Pair, Validity, make_ca, make_node};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn insecure_only_on_loopback() {
        struct Case {
            addresses: &'static [&'static str],
            want: bool,
        }
        let cases = [
            Case { addresses: &[], want: true },
            Case { addresses: &["127.0.0.1:9000", "[::1]:9000", "localhost:9000", "tcp://127.0.0.2:1"], want: true },
            Case { addresses: &["unix:///run/holdfast/csi.sock", "/run/x.sock", "http://127.0.0.1:9/"], want: true },
            Case { addresses: &["127.0.0.1:9000", "10.0.0.1:9000"], want: false },
            Case { addresses: &["0.0.0.0:9000"], want: false },
            Case { addresses: &["[::]:9000"], want: false },
            Case { addresses: &["controller.holdfast.svc:9000"], want: false },
            Case { addresses: &["localhost.evil.example:9000"], want: false },
            Case { addresses: &["127.0.0.1.nip.io:9000"], want: false },
        ];
        for c in cases {
            assert_eq!(check_insecure(c.addresses).is_ok(), c.want, "{:?}", c.addresses);
        }
        let err = check_insecure(&["127.0.0.1:1", "10.1.2.3:4"]).unwrap_err();
        assert!(err.contains("\"10.1.2.3:4\" is not a loopback address"), "{err}");
    }

    /// A Registry whose Heartbeat succeeds only for the node its caller's certificate names,
    /// and counts every call that reached it.
    #[derive(Clone, Default)]
    struct Counting(Arc<AtomicUsize>);

    #[tonic::async_trait]
    impl Registry for Counting {
        async fn register(&self, _: tonic::Request<RegisterRequest>) -> Result<tonic::Response<RegisterResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }

        async fn heartbeat(&self, req: tonic::Request<HeartbeatRequest>) -> Result<tonic::Response<HeartbeatResponse>, tonic::Status> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let peer = peer_of(&req).ok_or_else(|| tonic::Status::internal("no peer info"))?.clone();
            if !peer.names.names(&req.get_ref().node_id) {
                return Err(tonic::Status::permission_denied(format!("certificate {:?} is not node's", peer.names.common_name)));
            }
            Ok(tonic::Response::new(HeartbeatResponse { resync: false }))
        }

        async fn report_changes(
            &self,
            _: tonic::Request<ReportChangesRequest>,
        ) -> Result<tonic::Response<ReportChangesResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }

    /// Writes a file the way a Secret update does: a new inode renamed over the old.
    fn replace(path: &std::path::Path, contents: &str) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn write_identity(dir: &std::path::Path, name: &str, pair: &Pair, ca_pem: &str) -> TlsFiles {
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.crt")),
        };
        replace(&files.cert, &pair.cert_pem);
        replace(&files.key, &pair.key_pem);
        replace(&files.ca, ca_pem);
        files
    }

    struct Server {
        addr: String,
        calls: Arc<AtomicUsize>,
        tls: Arc<ServerTls>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), String>>,
    }

    impl Server {
        async fn start(files: TlsFiles) -> Server {
            let tls = Arc::new(ServerTls::server(files).unwrap().with_check_interval(Duration::ZERO));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let calls = Counting::default();
            let router = tonic::transport::Server::builder().add_service(RegistryServer::new(calls.clone()));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(serve(router, listener, tls.clone(), async move {
                let _ = stopped.await;
            }));
            Server { addr, calls: calls.0, tls, stop: Some(stop), task }
        }

        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            self.task.await.unwrap().unwrap();
        }
    }

    /// Why the server last refused a handshake, waiting up to a second for one.
    async fn refused(srv: &Server) -> String {
        for _ in 0..50 {
            if let (1.., Some(why)) = srv.tls.refusals() {
                return why;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        "nothing refused".into()
    }

    /// One heartbeat as `node_id` with `config`, to a server that must be named `server_name`.
    async fn heartbeat(addr: &str, server_name: &str, config: Arc<ClientConfig>, node_id: &str) -> Result<(), String> {
        let call = async {
            let channel = connect_with(addr, server_name, config).await?;
            let mut client = crate::agent_proto::registry_client::RegistryClient::new(channel);
            let req = HeartbeatRequest { version: Some(WIRE_VERSION), node_id: node_id.into(), ..HeartbeatRequest::default() };
            client.heartbeat(req).await.map(|_| ()).map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        };
        tokio::time::timeout(Duration::from_secs(20), call).await.unwrap_or_else(|_| Err("timed out".into()))
    }

    fn no_cert_client(ca_pem: &str) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"h2".to_vec()];
        c
    }

    const WIRE_VERSION: WireVersion = crate::agent_proto::WIRE_VERSION;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_clients_with_a_valid_certificate_reach_a_handler() {
        let tmp = tempfile::tempdir().unwrap();
        let day = Validity::days(1);
        let ca = make_ca("cluster CA", day).unwrap();
        // Same name as the cluster's own (two clusters made with the default name), and not.
        let other_ca = make_ca("cluster CA", day).unwrap();
        let named_other = make_ca("another cluster CA", day).unwrap();
        let server = make_node(&ca, "controller", &["127.0.0.1".into()], day).unwrap();
        let server_files = write_identity(tmp.path(), "server", &server, &ca.cert_pem);

        let client = |pair: &Pair, name: &str| Arc::new(client_config(&write_identity(tmp.path(), name, pair, &ca.cert_pem)).unwrap());
        let n1 = client(&make_node(&ca, "n1", &[], day).unwrap(), "n1");
        let foreign = client(&make_node(&other_ca, "n1", &[], day).unwrap(), "foreign");
        let foreign_named = client(&make_node(&named_other, "n1", &[], day).unwrap(), "foreign-named");
        let expired = client(&make_node(&ca, "n1", &[], Validity { from_secs: -2 * 86_400, until_secs: -86_400 }).unwrap(), "expired");
        let not_yet = client(&make_node(&ca, "n1", &[], Validity { from_secs: 86_400, until_secs: 2 * 86_400 }).unwrap(), "future");
        let no_cert = Arc::new(no_cert_client(&ca.cert_pem));

        struct Case {
            name: &'static str,
            config: Arc<ClientConfig>,
            server_name: &'static str,
            node: &'static str,
            want: Result<(), &'static str>,
            reached: usize,
            /// Why the server refused the handshake (None: the client gave up first; "": not refused).
            refused: Option<&'static str>,
        }
        let cases = [
            Case {
                name: "valid certificate",
                config: n1.clone(),
                server_name: "controller",
                node: "n1",
                want: Ok(()),
                reached: 1,
                refused: Some(""),
            },
            Case {
                name: "valid certificate claiming another node",
                config: n1.clone(),
                server_name: "controller",
                node: "n2",
                want: Err("PermissionDenied"),
                reached: 1,
                refused: Some(""),
            },
            Case {
                name: "no certificate",
                config: no_cert,
                server_name: "controller",
                node: "n1",
                want: Err(""),
                reached: 0,
                refused: Some("peer sent no certificates"),
            },
            Case {
                name: "another CA",
                config: foreign,
                server_name: "controller",
                node: "n1",
                want: Err(""),
                reached: 0,
                refused: Some("BadSignature"),
            },
            Case {
                name: "another CA with another name",
                config: foreign_named,
                server_name: "controller",
                node: "n1",
                want: Err(""),
                reached: 0,
                refused: Some("UnknownIssuer"),
            },
            Case {
                name: "expired",
                config: expired,
                server_name: "controller",
                node: "n1",
                want: Err(""),
                reached: 0,
                refused: Some("certificate expired"),
            },
            Case {
                name: "not yet valid",
                config: not_yet,
                server_name: "controller",
                node: "n1",
                want: Err(""),
                reached: 0,
                refused: Some("not valid yet"),
            },
            Case {
                name: "server not named as expected",
                config: n1.clone(),
                server_name: "other",
                node: "n1",
                want: Err("certificate not valid for name"),
                reached: 0,
                refused: None,
            },
        ];
        for c in cases {
            // A server per case: a client's late redial cannot count against the next case.
            let srv = Server::start(server_files.clone()).await;
            let got = heartbeat(&srv.addr, c.server_name, c.config, c.node).await;
            match (&got, c.want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(want)) => assert!(e.contains(want), "{}: {e}", c.name),
                _ => panic!("{}: got {got:?}, want {:?}", c.name, c.want),
            }
            assert_eq!(srv.calls.load(Ordering::SeqCst), c.reached, "{}: handler calls", c.name);
            match c.refused {
                None => {}
                Some("") => assert_eq!(srv.tls.refusals().0, 0, "{}: the handshake is accepted", c.name),
                Some(reason) => {
                    // The client may see the connection close before the server counts it.
                    let why = refused(&srv).await;
                    assert!(why.contains(reason), "{}: refused because {why}", c.name);
                }
            }
            srv.stop().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replaced_files_are_used_for_new_connections_and_bad_ones_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let day = Validity::days(1);
        let (old_ca, new_ca) = (make_ca("old CA", day).unwrap(), make_ca("new CA", day).unwrap());
        let both = format!("{}{}", old_ca.cert_pem, new_ca.cert_pem);
        let files = write_identity(tmp.path(), "server", &make_node(&old_ca, "controller", &[], day).unwrap(), &old_ca.cert_pem);
        let srv = Server::start(files.clone()).await;
        // The client trusts both CAs for the server; its own certificate is from the new one.
        let new_client =
            Arc::new(client_config(&write_identity(tmp.path(), "n1", &make_node(&new_ca, "n1", &[], day).unwrap(), &both)).unwrap());
        // What the client sees varies (a refused handshake, a cancelled call); the server's
        // reason is checked below.
        heartbeat(&srv.addr, "controller", new_client.clone(), "n1").await.unwrap_err();
        let why = refused(&srv).await;
        assert!(why.contains("UnknownIssuer"), "refused for the unknown CA, not {why:?}");

        // The CA rotates: the server now trusts both.
        replace(&files.ca, &both);
        heartbeat(&srv.addr, "controller", new_client.clone(), "n1").await.expect("the new CA is trusted after the reload");

        // A broken CA file, then a key that does not match the certificate: both ignored.
        replace(&files.ca, "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n");
        heartbeat(&srv.addr, "controller", new_client.clone(), "n1").await.expect("a broken CA file keeps the previous config");
        replace(&files.key, &make_node(&new_ca, "controller", &[], day).unwrap().key_pem);
        heartbeat(&srv.addr, "controller", new_client.clone(), "n1").await.expect("a mismatched key keeps the previous config");
        assert_eq!(srv.calls.load(Ordering::SeqCst), 3);

        // The server's own certificate rotates to the new CA, and the CA file is fixed: the new
        // certificate is served (a client trusting only the new CA now accepts the server).
        let pair = make_node(&new_ca, "controller", &[], day).unwrap();
        replace(&files.cert, &pair.cert_pem);
        replace(&files.key, &pair.key_pem);
        replace(&files.ca, &new_ca.cert_pem);
        let only_new = Arc::new(
            client_config(&write_identity(tmp.path(), "n2", &make_node(&new_ca, "n2", &[], day).unwrap(), &new_ca.cert_pem)).unwrap(),
        );
        heartbeat(&srv.addr, "controller", only_new, "n2").await.expect("served with the new certificate");
        srv.stop().await;
    }

    #[tokio::test]
    async fn reloading_client_config_follows_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        let day = Validity::days(1);
        let ca = make_ca("CA", day).unwrap();
        let files = write_identity(tmp.path(), "c", &make_node(&ca, "n1", &[], day).unwrap(), &ca.cert_pem);
        let tls = ClientTls::client(files.clone()).unwrap().with_check_interval(Duration::ZERO);
        let first = tls.current().await;
        assert!(Arc::ptr_eq(&first, &tls.current().await), "unchanged files: the same config");
        let pair = make_node(&ca, "n1", &[], day).unwrap();
        replace(&files.cert, &pair.cert_pem);
        replace(&files.key, &pair.key_pem);
        assert!(!Arc::ptr_eq(&first, &tls.current().await), "replaced files: a new config");
        assert!(ClientTls::client(TlsFiles { ca: tmp.path().join("missing"), ..files }).is_err(), "a missing file is an error at start-up");
    }
}
