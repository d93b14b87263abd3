//! The pieces of the Agent API that exist before the agent and controller do: `holdfast certs`
//! (the real binary) makes files that `holdfast::tls` serves and dials with, binding a per-node
//! certificate to its node id; and the wire format evolves as `agent.proto` promises (unknown
//! fields ignored, absent fields zero).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use holdfast::agent_proto::registry_client::RegistryClient;
use holdfast::agent_proto::registry_server::{Registry, RegistryServer};
use holdfast::agent_proto::*;
use holdfast::tls::{self, ClientTls, ServerTls, TlsFiles};
use prost::Message;
use tonic::{Request, Response, Status};

fn certs(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("certs").args(args).output().expect("run holdfast certs")
}

fn ok(args: &[&str]) {
    let out = certs(args);
    assert!(out.status.success(), "holdfast certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn files(dir: &Path) -> TlsFiles {
    TlsFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key"), ca: dir.join("ca.crt") }
}

/// Heartbeat answers only a caller whose certificate names the node id it sends.
#[derive(Clone, Default)]
struct BindsNodeId(Arc<AtomicUsize>);

#[tonic::async_trait]
impl Registry for BindsNodeId {
    async fn register(&self, _: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        let peer = tls::peer_of(&req).ok_or_else(|| Status::internal("no peer"))?;
        if !peer.names.names(&req.get_ref().node_id) {
            return Err(Status::permission_denied("the certificate names another node"));
        }
        Ok(Response::new(HeartbeatResponse { resync: false }))
    }

    async fn report_changes(&self, _: Request<ReportChangesRequest>) -> Result<Response<ReportChangesResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
}

async fn heartbeat(addr: &str, client: &TlsFiles, node_id: &str) -> Result<(), String> {
    let call = async {
        let tls = Arc::new(ClientTls::client(client.clone()).map_err(|e| e.to_string())?);
        let mut c = RegistryClient::new(tls::connect(addr, "holdfast-controller", tls).await?);
        let req = HeartbeatRequest { version: Some(WIRE_VERSION), node_id: node_id.into(), ..Default::default() };
        c.heartbeat(req).await.map(|_| ()).map_err(|s| format!("{:?}", s.code()))
    };
    tokio::time::timeout(Duration::from_secs(30), call).await.unwrap_or_else(|_| Err("timed out".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_holdfast_certs_secure_the_agent_api() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_str().unwrap().to_owned();
    ok(&["ca", "--out", &p("ca")]);
    ok(&["node", "--ca", &p("ca"), "--node-id", "holdfast-controller", "--san", "127.0.0.1", "--out", &p("controller")]);
    ok(&["node", "--ca", &p("ca"), "--node-id", "node-a", "--out", &p("a")]);
    ok(&["ca", "--out", &p("other-ca")]);
    ok(&["node", "--ca", &p("other-ca"), "--node-id", "node-a", "--out", &p("impostor")]);
    assert_eq!(mode(&tmp.path().join("ca/ca.key")), 0o600);
    assert_eq!(mode(&tmp.path().join("a/tls.key")), 0o600);
    assert_eq!(mode(&tmp.path().join("a")), 0o700);

    // Nothing is ever overwritten, least of all the CA key.
    let key = std::fs::read(tmp.path().join("ca/ca.key")).unwrap();
    let again = certs(&["ca", "--out", &p("ca")]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists; not overwriting it"), "{again:?}");
    assert_eq!(std::fs::read(tmp.path().join("ca/ca.key")).unwrap(), key);
    let again = certs(&["node", "--ca", &p("ca"), "--node-id", "node-b", "--out", &p("a")]);
    assert!(!again.status.success(), "a node directory is not overwritten either");

    let server_tls = Arc::new(ServerTls::server(files(&tmp.path().join("controller"))).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let calls = BindsNodeId::default();
    let router = tonic::transport::Server::builder().add_service(RegistryServer::new(calls.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tls::serve(router, listener, server_tls.clone(), async move {
        let _ = stopped.await;
    }));

    let a = files(&tmp.path().join("a"));
    heartbeat(&addr, &a, "node-a").await.expect("node-a with its own certificate");
    assert_eq!(heartbeat(&addr, &a, "node-b").await, Err("PermissionDenied".into()), "node-a's certificate claiming node-b");
    assert_eq!(calls.0.load(Ordering::SeqCst), 2);
    // The impostor's certificate names node-a but comes from another CA: the client trusts
    // this cluster's CA for the server, and the server refuses the certificate.
    let impostor = TlsFiles { ca: tmp.path().join("ca/ca.crt"), ..files(&tmp.path().join("impostor")) };
    assert!(heartbeat(&addr, &impostor, "node-a").await.is_err());
    assert_eq!(calls.0.load(Ordering::SeqCst), 2, "the impostor reached no handler");
    // The client sees the handshake fail as soon as the server's alert arrives; the server
    // counts the refusal after sending it, so under load the count can come a moment later.
    let counted = async {
        while server_tls.refusals().0 < 1 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    assert!(tokio::time::timeout(std::time::Duration::from_secs(10), counted).await.is_ok(), "the server refused the handshake");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[test]
fn the_wire_format_tolerates_other_versions() {
    let newer = RegisterRequest {
        version: Some(WireVersion { major: 1, minor: 1 }),
        inventory: Some(Inventory {
            node_id: "node-a".into(),
            advertised_address: "10.0.0.1:7443".into(),
            segments: [("topology.holdfast.dev/node".to_owned(), "node-a".to_owned())].into(),
            volumes: vec![Volume { pool: "p".into(), local_name: "v".into(), csi_name: "pvc-1".into(), ..Default::default() }],
            sequence: 7,
            ..Default::default()
        }),
    };
    let mut bytes = newer.encode_to_vec();
    // A field a later minor version added (number 1000, varint 42): an older peer skips it.
    prost::encoding::encode_key(1000, prost::encoding::WireType::Varint, &mut bytes);
    prost::encoding::encode_varint(42, &mut bytes);
    assert_eq!(RegisterRequest::decode(bytes.as_slice()).unwrap(), newer);

    // An agent that sends no version at all is seen as such (and can be refused by name).
    let bare = RegisterRequest::decode(&[][..]).unwrap();
    assert_eq!(bare.version, None);
    assert_eq!(WIRE_VERSION, WireVersion { major: 1, minor: 0 });
}
