//! `holdfast certs`: makes a cluster CA and node certificates for the Agent API's mutual TLS,
//! for tests and small clusters (larger ones use cert-manager). A node certificate names its
//! node id as CN and DNS SAN, so a controller can bind a per-node certificate to the node id;
//! one certificate made with a shared name can instead be mounted by every agent.
//!
//! Files use the Kubernetes TLS Secret names (`tls.crt`, `tls.key`, `ca.crt`), keys are created
//! 0600, and nothing existing is overwritten: replacing a CA key by mistake would lock every
//! node out of the cluster.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// The CA certificate's file name (in a CA directory and, copied, in a node directory).
pub const CA_CERT: &str = "ca.crt";
/// The CA key's file name.
pub const CA_KEY: &str = "ca.key";
/// A node certificate's file name.
pub const NODE_CERT: &str = "tls.crt";
/// A node key's file name.
pub const NODE_KEY: &str = "tls.key";

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Pair {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Pair {
    // Never print a private key into a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// The validity window of a new certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start, seconds relative to now (negative: in the past, tolerating clock skew).
    pub from_secs: i64,
    /// End, seconds relative to now.
    pub until_secs: i64,
}

impl Validity {
    /// From an hour ago (clocks of nodes differ) to `days` days from now.
    pub fn days(days: u32) -> Validity {
        Validity { from_secs: -3600, until_secs: i64::from(days) * 86_400 }
    }
}

fn apply(params: &mut CertificateParams, validity: Validity) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(validity.from_secs);
    params.not_after = now + time::Duration::seconds(validity.until_secs);
}

fn rcgen_err(what: &str) -> impl FnOnce(rcgen::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Makes a self-signed CA named `name`.
pub fn make_ca(name: &str, validity: Validity) -> Result<Pair, String> {
    let key = KeyPair::generate().map_err(rcgen_err("cannot generate the CA key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    apply(&mut params, validity);
    let cert = params.self_signed(&key).map_err(rcgen_err("cannot make the CA certificate"))?;
    Ok(Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Makes a certificate for `node_id` (CN and DNS SAN), with `extra_names` as further SANs (an
/// IP address is added as an IP SAN), signed by `ca`. Good for both ends of a connection: an
/// agent serves the Agent API and dials the controller with the same certificate.
pub fn make_node(ca: &Pair, node_id: &str, extra_names: &[String], validity: Validity) -> Result<Pair, String> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(rcgen_err("cannot read the CA key"))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca.cert_pem).map_err(rcgen_err("cannot read the CA certificate"))?;
    // rcgen signs with an issuer certificate object; rebuilt from the CA's own subject and
    // key, it yields the same issuer name and key identifier as the original.
    let issuer = ca_params.self_signed(&ca_key).map_err(rcgen_err("cannot use the CA"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node_id);
    for name in std::iter::once(&node_id.to_owned()).chain(extra_names) {
        let san = match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if dns_like(name) => {
                SanType::DnsName(name.clone().try_into().map_err(|_| format!("{name:?} cannot be a DNS name in a certificate"))?)
            }
            Err(_) => return Err(format!("{name:?} cannot be a DNS name in a certificate (letters, digits, '-', '_', '.')")),
        };
        params.subject_alt_names.push(san);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    apply(&mut params, validity);
    let key = KeyPair::generate().map_err(rcgen_err("cannot generate the key"))?;
    let cert = params.signed_by(&key, &issuer, &ca_key).map_err(rcgen_err("cannot sign the certificate"))?;
    Ok(Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Whether `name` can be a DNS SAN that TLS clients match: letters, digits, `-`, `_`, `.`.
fn dns_like(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Writes `contents` to a new file with `mode`; an existing file is an error.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), String> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!("{} exists; not overwriting it (remove it first to replace it)", path.display())
        } else {
            format!("cannot create {}: {e}", path.display())
        }
    })?;
    f.write_all(contents.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn refuse_existing(paths: &[PathBuf]) -> Result<(), String> {
    match paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(p) => Err(format!("{} exists; not overwriting it (remove it first to replace it)", p.display())),
        None => Ok(()),
    }
}

/// Writes a new CA into `dir` (created 0700 if missing): `ca.crt` (0644), `ca.key` (0600).
pub fn write_ca(dir: &Path, name: &str, validity: Validity) -> Result<(), String> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(&[cert.clone(), key.clone()])?;
    let ca = make_ca(name, validity)?;
    // The key first: a directory with a certificate but no key is harmless to retry.
    write_new(&key, &ca.key_pem, 0o600)?;
    write_new(&cert, &ca.cert_pem, 0o644)
}

/// Writes a node certificate signed by the CA in `ca_dir` into `dir`: `tls.crt`, `tls.key`
/// (0600) and a copy of `ca.crt`, so `--tls-cert/--tls-key/--tls-ca` all point into `dir`.
pub fn write_node(ca_dir: &Path, node_id: &str, extra_names: &[String], dir: &Path, validity: Validity) -> Result<(), String> {
    let ca = Pair { cert_pem: read(&ca_dir.join(CA_CERT))?, key_pem: read(&ca_dir.join(CA_KEY))? };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (cert, key, ca_copy) = (dir.join(NODE_CERT), dir.join(NODE_KEY), dir.join(CA_CERT));
    refuse_existing(&[cert.clone(), key.clone(), ca_copy.clone()])?;
    let pair = make_node(&ca, node_id, extra_names, validity)?;
    write_new(&key, &pair.key_pem, 0o600)?;
    write_new(&cert, &pair.cert_pem, 0o644)?;
    write_new(&ca_copy, &ca.cert_pem, 0o644)
}

/// `holdfast certs` arguments.
#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    #[command(subcommand)]
    cmd: CertsCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CertsCommand {
    /// Make a cluster CA: DIR/ca.crt and DIR/ca.key (0600). Keep ca.key off the nodes.
    Ca {
        /// Directory to write into (created 0700); existing files are never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "holdfast cluster CA")]
        name: String,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Make a certificate for one node (or, with a shared name, for every agent): DIR/tls.crt,
    /// DIR/tls.key (0600) and DIR/ca.crt.
    Node {
        /// Directory holding ca.crt and ca.key (from `holdfast certs ca`).
        #[arg(long)]
        ca: PathBuf,
        /// The node id the certificate names (CN and DNS SAN); with per-node certificates the
        /// controller requires it to equal the agent's --node-id.
        #[arg(long)]
        node_id: String,
        /// Further names or IP addresses the certificate is valid for (repeatable): the
        /// controller's Service name, an agent's advertised address.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Directory to write into (created 0700); existing files are never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// Runs `holdfast certs`.
pub fn run(args: CertsArgs) -> Result<(), String> {
    match args.cmd {
        CertsCommand::Ca { out, name, days } => {
            write_ca(&out, &name, Validity::days(days))?;
            println!("wrote {} and {} (keep the key off the nodes)", out.join(CA_CERT).display(), out.join(CA_KEY).display());
        }
        CertsCommand::Node { ca, node_id, sans, out, days } => {
            write_node(&ca, &node_id, &sans, &out, Validity::days(days))?;
            println!("wrote {}, {} and {}", out.join(NODE_CERT).display(), out.join(NODE_KEY).display(), out.join(CA_CERT).display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_ca_and_node_files_with_private_keys_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca_dir, node_dir) = (tmp.path().join("ca"), tmp.path().join("n1"));
        write_ca(&ca_dir, "test CA", Validity::days(1)).unwrap();
        write_node(&ca_dir, "node-1", &["10.0.0.7".into(), "holdfast-controller".into()], &node_dir, Validity::days(1)).unwrap();
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(ca_dir.join(CA_KEY)), 0o600);
        assert_eq!(mode(node_dir.join(NODE_KEY)), 0o600);
        assert_eq!(mode(node_dir.join(NODE_CERT)), 0o644);
        assert_eq!(std::fs::read(ca_dir.join(CA_CERT)).unwrap(), std::fs::read(node_dir.join(CA_CERT)).unwrap());
        let pem = std::fs::read_to_string(node_dir.join(NODE_CERT)).unwrap();
        let names = crate::tls::PeerNames::from_pem(&pem).unwrap();
        assert_eq!(names.common_name.as_deref(), Some("node-1"));
        assert_eq!(names.dns, ["node-1", "holdfast-controller"]);
        assert_eq!(names.ips, ["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]);
    }

    #[test]
    fn never_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        write_ca(tmp.path(), "test CA", Validity::days(1)).unwrap();
        let key = std::fs::read(tmp.path().join(CA_KEY)).unwrap();
        let err = write_ca(tmp.path(), "test CA", Validity::days(1)).unwrap_err();
        assert!(err.contains("ca.crt exists; not overwriting it"), "{err}");
        assert_eq!(std::fs::read(tmp.path().join(CA_KEY)).unwrap(), key, "the CA key is untouched");
        let node = tmp.path().join("n");
        write_node(tmp.path(), "n1", &[], &node, Validity::days(1)).unwrap();
        let err = write_node(tmp.path(), "n2", &[], &node, Validity::days(1)).unwrap_err();
        assert!(err.contains("tls.crt exists"), "{err}");
    }

    #[test]
    fn refuses_a_name_no_certificate_can_hold() {
        let ca = make_ca("test CA", Validity::days(1)).unwrap();
        let err = make_node(&ca, "node 1\n", &[], Validity::days(1)).unwrap_err();
        assert!(err.contains("cannot be a DNS name"), "{err}");
    }
}
