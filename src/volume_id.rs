//! Volume and snapshot identifiers: `<kind>:<node or "-">:<pool>:<local name>`, e.g.
//! `lvm:node-a:vg0:pvc-4f3c`. Anyone can route a request from the id alone. Parsing is strict
//! (closed character set, four fields, length limits), so an id can never smuggle a path.
//! Local names are derived deterministically from the CSI name, so a retried create finds the
//! object its first attempt made.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::Error;

/// The CSI limit on ids and names (spec: "Size Limits", 128 bytes).
pub const MAX_ID_LEN: usize = 128;
/// Longest node id holdfast accepts in an id.
pub const MAX_NODE_LEN: usize = 48;
/// Longest pool name.
pub const MAX_POOL_LEN: usize = 24;
/// Longest local name (derived names are at most this long).
pub const MAX_LOCAL_LEN: usize = 40;
/// How many hex digits of the name's hash a derived local name carries.
const HASH_LEN: usize = 16;

/// The kinds of pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// A directory of sparse files on loop devices.
    File,
    /// An LVM volume group (thick or thin).
    Lvm,
    /// A ZFS parent dataset.
    Zfs,
    /// A subdirectory per volume on an NFS export.
    Nfs,
}

impl PoolKind {
    /// The name used in ids and configs.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::File => "file",
            PoolKind::Lvm => "lvm",
            PoolKind::Zfs => "zfs",
            PoolKind::Nfs => "nfs",
        }
    }
    /// Whether volumes of this kind live on one node.
    pub fn is_node_local(self) -> bool {
        !matches!(self, PoolKind::Nfs)
    }
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PoolKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "file" => Ok(PoolKind::File),
            "lvm" => Ok(PoolKind::Lvm),
            "zfs" => Ok(PoolKind::Zfs),
            "nfs" => Ok(PoolKind::Nfs),
            other => Err(Error::InvalidArgument(format!("unknown pool kind {other:?} (expected file, lvm, zfs or nfs)"))),
        }
    }
}

/// A parsed volume or snapshot id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId {
    /// The pool kind.
    pub kind: PoolKind,
    /// The node that holds the object; `None` for shared pools (`-`).
    pub node: Option<String>,
    /// The pool name.
    pub pool: String,
    /// The object's name inside the pool.
    pub local: String,
}

/// Snapshot ids have the same shape as volume ids.
pub type SnapshotId = VolumeId;

impl VolumeId {
    /// Builds an id; the parts must already be valid.
    pub fn new(kind: PoolKind, node: Option<&str>, pool: &str, local: &str) -> Self {
        VolumeId { kind, node: node.map(str::to_owned), pool: pool.to_owned(), local: local.to_owned() }
    }

    /// Parses an id. Anything that is not exactly a holdfast id is `None`: callers answer
    /// NOT_FOUND (an id we could never have issued names no object).
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() > MAX_ID_LEN {
            return None;
        }
        let mut parts = s.split(':');
        let (kind, node, pool, local) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let kind = PoolKind::from_str(kind).ok()?;
        let node = match node {
            "-" => None,
            n if valid_node_id(n) => Some(n.to_owned()),
            _ => return None,
        };
        if !valid_pool_name(pool) || !valid_local_name(local) {
            return None;
        }
        Some(VolumeId { kind, node, pool: pool.to_owned(), local: local.to_owned() })
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}:{}", self.kind, self.node.as_deref().unwrap_or("-"), self.pool, self.local)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
}

/// Node ids: 1..=48 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn valid_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_LEN
        && !s.starts_with(['.', '-'])
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Pool names: 1..=24 of `[a-z0-9_-]`, starting with a letter or digit.
pub fn valid_pool_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_POOL_LEN && s.starts_with(|c: char| c.is_ascii_alphanumeric()) && s.chars().all(is_name_char)
}

/// Local names: 1..=40 of `[a-z0-9_-]`, starting with a letter or digit.
pub fn valid_local_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_LOCAL_LEN && s.starts_with(|c: char| c.is_ascii_alphanumeric()) && s.chars().all(is_name_char)
}

/// The local name for a CSI name: the name itself when it is already a short, clean local
/// name; otherwise a sanitised prefix plus 16 hex digits of its SHA-256. Deterministic, so a
/// retried create lands on the same object; the full CSI name is stored with the object, so
/// a hash collision is detected, never silently shared.
pub fn local_name(csi_name: &str) -> String {
    if valid_local_name(csi_name) {
        return csi_name.to_owned();
    }
    let mut prefix = String::new();
    for c in csi_name.chars().flat_map(char::to_lowercase) {
        let c = if is_name_char(c) && c != '_' { c } else { '-' };
        if c == '-' && (prefix.is_empty() || prefix.ends_with('-')) {
            continue;
        }
        prefix.push(c);
        if prefix.len() >= MAX_LOCAL_LEN - HASH_LEN - 1 {
            break;
        }
    }
    let prefix = prefix.trim_end_matches('-');
    let digest = hex::encode(Sha256::digest(csi_name.as_bytes()));
    let hash = &digest[..HASH_LEN];
    if prefix.is_empty() { format!("h{hash}") } else { format!("{prefix}-{hash}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        let id = VolumeId::new(PoolKind::Lvm, Some("node-a"), "vg0", "pvc-4f3c");
        assert_eq!(id.to_string(), "lvm:node-a:vg0:pvc-4f3c");
        assert_eq!(VolumeId::parse("lvm:node-a:vg0:pvc-4f3c"), Some(id));
        let shared = VolumeId::parse("nfs:-:share:v1").unwrap();
        assert_eq!(shared.node, None);
        assert_eq!(shared.to_string(), "nfs:-:share:v1");
    }

    #[test]
    fn malformed_ids_are_rejected() {
        let long = format!("file:n:p:{}", "a".repeat(200));
        let bad = [
            "",
            "file",
            "file:n:p",
            "file:n:p:v:extra",
            "disk:n:p:v",
            "file:n:p:../../etc",
            "file:n:p:a/b",
            "file:n:p:-v",
            "file:n:P:v",
            "file::p:v",
            "file:n::v",
            "file:n:p:",
            "file:n:p:v\0",
            "file:.n:p:v",
            long.as_str(),
        ];
        for s in bad {
            assert_eq!(VolumeId::parse(s), None, "{s:?} must not parse");
        }
    }

    #[test]
    fn local_names_are_deterministic_short_and_clean() {
        struct Case {
            name: &'static str,
            want: Option<&'static str>,
        }
        let cases = [
            Case { name: "pvc-4f3c", want: Some("pvc-4f3c") },
            Case { name: "data_1", want: Some("data_1") },
            Case { name: "PVC-Upper", want: None },
            Case { name: "../../etc/passwd", want: None },
            Case { name: "名前", want: None },
            Case { name: "a-very-long-name-that-exceeds-the-forty-character-limit", want: None },
        ];
        for c in cases {
            let got = local_name(c.name);
            assert!(valid_local_name(&got), "{:?} -> {got:?} is not a valid local name", c.name);
            assert_eq!(got, local_name(c.name), "deterministic");
            if let Some(w) = c.want {
                assert_eq!(got, w);
            } else {
                assert_ne!(got, c.name);
            }
        }
        assert_eq!(local_name("../../etc/passwd").len(), "etc-passwd-".len() + 16);
        assert!(local_name("名前").starts_with('h'));
        let max = "x".repeat(128);
        assert!(local_name(&max).len() <= MAX_LOCAL_LEN);
        assert_ne!(local_name(&"x".repeat(127)), local_name(&max), "different names, different hashes");
    }

    #[test]
    fn longest_id_fits_the_csi_limit() {
        let id = VolumeId::new(PoolKind::File, Some(&"n".repeat(MAX_NODE_LEN)), &"p".repeat(MAX_POOL_LEN), &"l".repeat(MAX_LOCAL_LEN));
        assert!(id.to_string().len() <= MAX_ID_LEN);
        assert_eq!(VolumeId::parse(&id.to_string()), Some(id));
    }
}
