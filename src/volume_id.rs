//! Volume and snapshot identifiers and local names.
//!
//! An id is `<kind>:<node or "-">:<pool>:<local name>:<v|s><uid>`, e.g.
//! `lvm:node-a:vg0:pvc-4f3c-0123456789abcdef:v3f9a0c1d2e4b`. Anyone can route a request from
//! the id alone. The last field says what the id names (`v` a volume, `s` a snapshot) and
//! carries the object's uid: 12 random hex digits drawn when the object is created and recorded
//! with it. An id only names the object whose recorded uid it carries, so a volume deleted and
//! created again under the same name gets a new id and nothing holding the old one (a PV, a
//! snapshot's source) reaches the new object; a volume id passed where a snapshot id is expected
//! (or the reverse) names nothing.
//!
//! Ids issued before uids existed have four fields (`<kind>:<node>:<pool>:<local>`): they still
//! parse, as *legacy* ids, and name only objects that have no uid recorded (made by those
//! versions). Parsing is strict (closed character set, exact field count, length limits), so an
//! id can never smuggle a path.
//!
//! Local names are derived deterministically from the CSI name, so a retried create finds the
//! object its first attempt made. Every derived name carries a hash of the whole CSI name
//! ([`local_name`]), so two distinct CSI names never share a local object; objects made with
//! the earlier derivation ([`legacy_local_name`]) are still found by their CSI name.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::error::Error;

/// The CSI limit on ids and names (spec: "Size Limits", 128 bytes).
pub const MAX_ID_LEN: usize = 128;
/// Longest node id holdfast accepts in an id.
pub const MAX_NODE_LEN: usize = 48;
/// Longest pool name.
pub const MAX_POOL_LEN: usize = 24;
/// Longest local name a pool stores (legacy derived names are up to this long).
pub const MAX_LOCAL_LEN: usize = 40;
/// Longest local name [`local_name`] derives, and so the longest one in a uid-carrying id: the
/// uid field must fit within [`MAX_ID_LEN`] beside the longest node id and pool name.
pub const MAX_DERIVED_LEN: usize = 34;
/// Hex digits in a uid.
pub const UID_LEN: usize = 12;
/// How many hex digits of the name's hash a derived local name carries.
const HASH_LEN: usize = 16;
/// Mixed into the hash of [`local_name`], so its names differ from the legacy derivation's
/// (a legacy volume whose bare name equals a new derived name would otherwise be taken for it).
const LOCAL_NAME_SALT: &[u8] = b"holdfast local name v2\0";

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

/// What an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Object {
    /// A volume (`v` in the id).
    Volume,
    /// A snapshot (`s` in the id).
    Snapshot,
    /// A group snapshot (`g` in the id; issue 12): `<kind>:<node>:<pool>:<group local>:g<uid>`,
    /// the local name derived from the group's CSI name as for snapshots. The group is not an
    /// object of its own in the pool: its members record it.
    Group,
}

impl Object {
    fn marker(self) -> char {
        match self {
            Object::Volume => 'v',
            Object::Snapshot => 's',
            Object::Group => 'g',
        }
    }
}

/// The last field of a current id: the kind of object and its recorded uid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag {
    /// Volume or snapshot.
    pub object: Object,
    /// The object's uid ([`new_uid`]).
    pub uid: String,
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
    /// What the id names and the uid it carries; `None` for a legacy (four-field) id.
    pub tag: Option<Tag>,
}

/// Snapshot ids have the same shape as volume ids (their tag says `s`).
pub type SnapshotId = VolumeId;

impl VolumeId {
    /// Builds a legacy (four-field) id; the parts must already be valid.
    pub fn new(kind: PoolKind, node: Option<&str>, pool: &str, local: &str) -> Self {
        VolumeId { kind, node: node.map(str::to_owned), pool: pool.to_owned(), local: local.to_owned(), tag: None }
    }

    /// The id of an object whose recorded uid is `uid`: a current id when it has one, the
    /// legacy id of an object made before uids existed otherwise.
    pub fn of(kind: PoolKind, node: Option<&str>, pool: &str, local: &str, object: Object, uid: Option<&str>) -> Self {
        VolumeId { tag: uid.map(|u| Tag { object, uid: u.to_owned() }), ..VolumeId::new(kind, node, pool, local) }
    }

    /// Parses an id. Anything that is not exactly a holdfast id is `None`: callers answer
    /// NOT_FOUND (an id we could never have issued names no object).
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() > MAX_ID_LEN {
            return None;
        }
        let mut parts = s.split(':');
        let (kind, node, pool, local) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let tag = match parts.next() {
            None => None,
            Some(t) => {
                let object = match t.chars().next()? {
                    'v' => Object::Volume,
                    's' => Object::Snapshot,
                    'g' => Object::Group,
                    _ => return None,
                };
                let uid = &t[1..];
                // Only derived names are this short in current ids; a longer one was never issued.
                if !valid_uid(uid) || local.len() > MAX_DERIVED_LEN {
                    return None;
                }
                Some(Tag { object, uid: uid.to_owned() })
            }
        };
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
        // issue 14: metrics: the call that named this id concerns a pool of this kind.
        crate::metrics::note_pool_kind(kind);
        Some(VolumeId { kind, node, pool: pool.to_owned(), local: local.to_owned(), tag })
    }

    /// Whether this id names the volume whose recorded uid is `uid`: a current volume id with
    /// that uid, or a legacy id for a volume without one. A snapshot id never does.
    pub fn names_volume(&self, uid: Option<&str>) -> bool {
        self.names(Object::Volume, uid)
    }

    /// Whether this id names the snapshot whose recorded uid is `uid` (as [`Self::names_volume`]).
    pub fn names_snapshot(&self, uid: Option<&str>) -> bool {
        self.names(Object::Snapshot, uid)
    }

    /// Whether this id can name a volume at all (current volume ids and legacy ids).
    pub fn may_name_volume(&self) -> bool {
        self.tag.as_ref().is_none_or(|t| t.object == Object::Volume)
    }

    /// Whether this id can name a snapshot at all (current snapshot ids and legacy ids).
    pub fn may_name_snapshot(&self) -> bool {
        self.tag.as_ref().is_none_or(|t| t.object == Object::Snapshot)
    }

    /// Whether this is a group snapshot id (only current ids: groups came after uids).
    pub fn is_group(&self) -> bool {
        self.tag.as_ref().is_some_and(|t| t.object == Object::Group)
    }

    fn names(&self, object: Object, uid: Option<&str>) -> bool {
        match (&self.tag, uid) {
            (None, None) => true,
            (Some(t), Some(u)) => t.object == object && t.uid == u,
            _ => false,
        }
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // issue 14: metrics: an id made for an answer (CreateVolume) names the call's pool kind.
        crate::metrics::note_pool_kind(self.kind);
        write!(f, "{}:{}:{}:{}", self.kind, self.node.as_deref().unwrap_or("-"), self.pool, self.local)?;
        if let Some(t) = &self.tag {
            write!(f, ":{}{}", t.object.marker(), t.uid)?;
        }
        Ok(())
    }
}

/// A fresh uid: [`UID_LEN`] hex digits, unpredictable and unique in practice. Drawn from the
/// process's random hash keys (seeded by the OS), the clock, the pid and a counter, so no
/// syscall that could block is needed.
pub fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut keyed = std::collections::hash_map::RandomState::new().build_hasher();
    keyed.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut h = Sha256::new();
    h.update(keyed.finish().to_le_bytes());
    h.update(nanos.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hex::encode(h.finalize())[..UID_LEN].to_owned()
}

/// Uids: exactly [`UID_LEN`] lowercase hex digits. Pools check recorded uids with it too, so a
/// damaged record never yields an id that would not parse.
pub fn valid_uid(s: &str) -> bool {
    s.len() == UID_LEN && s.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
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

/// A readable prefix of a CSI name: lowercased, runs of other characters as one `-`, at most
/// `max` characters, no `-` at either end.
fn sanitised_prefix(csi_name: &str, max: usize) -> String {
    let mut prefix = String::new();
    for c in csi_name.chars().flat_map(char::to_lowercase) {
        let c = if is_name_char(c) && c != '_' { c } else { '-' };
        if c == '-' && (prefix.is_empty() || prefix.ends_with('-')) {
            continue;
        }
        prefix.push(c);
        if prefix.len() >= max {
            break;
        }
    }
    prefix.trim_end_matches('-').to_owned()
}

fn with_hash(prefix: &str, hash: &str) -> String {
    if prefix.is_empty() { format!("h{hash}") } else { format!("{prefix}-{hash}") }
}

/// The local name for a CSI name: a sanitised prefix of it plus 16 hex digits of a (salted)
/// SHA-256 of the whole name, at most [`MAX_DERIVED_LEN`] characters. Every name carries the
/// hash, never the bare CSI name, so distinct CSI names share a local name only by a 64-bit
/// hash collision (`Team/Data` and `team-data-<hash>` get different objects). Deterministic,
/// so a retried create lands on the same object; the CSI name is stored with the object and
/// compared, so even a collision is detected, never silently shared.
pub fn local_name(csi_name: &str) -> String {
    let prefix = sanitised_prefix(csi_name, MAX_DERIVED_LEN - HASH_LEN - 1);
    let mut h = Sha256::new();
    h.update(LOCAL_NAME_SALT);
    h.update(csi_name.as_bytes());
    with_hash(&prefix, &hex::encode(h.finalize())[..HASH_LEN])
}

/// The local name earlier versions derived: the CSI name itself when it was already a short,
/// clean local name, otherwise a prefix plus 16 hex digits of its SHA-256. A retried create
/// looks here after [`local_name`], and accepts what it finds only when the object's recorded
/// CSI name is the request's.
pub fn legacy_local_name(csi_name: &str) -> String {
    if valid_local_name(csi_name) {
        return csi_name.to_owned();
    }
    let prefix = sanitised_prefix(csi_name, MAX_LOCAL_LEN - HASH_LEN - 1);
    with_hash(&prefix, &hex::encode(Sha256::digest(csi_name.as_bytes()))[..HASH_LEN])
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0123456789ab";

    // issue 12: group snapshots
    #[test]
    fn group_ids_name_groups_only() {
        let id = VolumeId::of(PoolKind::Zfs, Some("n1"), "tank", "db-0123456789abcdef", Object::Group, Some("0123456789ab"));
        let text = id.to_string();
        assert_eq!(text, "zfs:n1:tank:db-0123456789abcdef:g0123456789ab");
        let back = VolumeId::parse(&text).unwrap();
        assert!(back.is_group() && !back.may_name_volume() && !back.may_name_snapshot());
        assert!(!VolumeId::parse("zfs:n1:tank:db:s0123456789ab").unwrap().is_group());
        assert!(!VolumeId::parse("zfs:n1:tank:db").unwrap().is_group(), "a legacy id is never a group's");
    }

    #[test]
    fn ids_round_trip() {
        let id = VolumeId::of(PoolKind::Lvm, Some("node-a"), "vg0", "pvc-4f3c", Object::Volume, Some(UID));
        assert_eq!(id.to_string(), "lvm:node-a:vg0:pvc-4f3c:v0123456789ab");
        assert_eq!(VolumeId::parse("lvm:node-a:vg0:pvc-4f3c:v0123456789ab"), Some(id));
        let snap = VolumeId::of(PoolKind::Nfs, None, "share", "s1", Object::Snapshot, Some(UID));
        assert_eq!(snap.to_string(), "nfs:-:share:s1:s0123456789ab");
        assert_eq!(VolumeId::parse(&snap.to_string()), Some(snap));
        let shared = VolumeId::parse("nfs:-:share:v1").unwrap();
        assert_eq!((shared.node.as_deref(), shared.tag.as_ref()), (None, None), "a legacy id");
        assert_eq!(shared.to_string(), "nfs:-:share:v1");
        assert_eq!(VolumeId::of(PoolKind::Nfs, None, "share", "v1", Object::Volume, None), shared, "no uid: the legacy id");
    }

    #[test]
    fn malformed_ids_are_rejected() {
        let long = format!("file:n:p:{}", "a".repeat(200));
        let long_local = format!("file:n:p:{}:v{UID}", "a".repeat(MAX_DERIVED_LEN + 1));
        let bad = [
            "",
            "file",
            "file:n:p",
            "file:n:p:v:v0123456789ab:extra",
            "file:n:p:v:",
            "file:n:p:v:v",
            "file:n:p:v:x0123456789ab",
            "file:n:p:v:V0123456789ab",
            "file:n:p:v:v0123456789abc",
            "file:n:p:v:v0123456789a",
            "file:n:p:v:v0123456789AB",
            "file:n:p:v:v0123456789ag",
            "file:n:p:v:v../../etc/pa",
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
            long_local.as_str(),
        ];
        for s in bad {
            assert_eq!(VolumeId::parse(s), None, "{s:?} must not parse");
        }
    }

    #[test]
    fn an_id_names_only_its_kind_of_object_with_its_uid() {
        struct Case {
            name: &'static str,
            id: &'static str,
            uid: Option<&'static str>,
            volume: bool,
            snapshot: bool,
        }
        let cases = [
            Case { name: "volume id, its volume", id: "file:n:p:x:v0123456789ab", uid: Some(UID), volume: true, snapshot: false },
            Case { name: "snapshot id, its snapshot", id: "file:n:p:x:s0123456789ab", uid: Some(UID), volume: false, snapshot: true },
            Case { name: "re-created object", id: "file:n:p:x:v0123456789ab", uid: Some("ba9876543210"), volume: false, snapshot: false },
            Case { name: "current id, legacy object", id: "file:n:p:x:v0123456789ab", uid: None, volume: false, snapshot: false },
            Case { name: "legacy id, legacy object", id: "file:n:p:x", uid: None, volume: true, snapshot: true },
            Case { name: "legacy id, object with a uid", id: "file:n:p:x", uid: Some(UID), volume: false, snapshot: false },
        ];
        for c in cases {
            let id = VolumeId::parse(c.id).unwrap();
            assert_eq!(id.names_volume(c.uid), c.volume, "{}: names_volume", c.name);
            assert_eq!(id.names_snapshot(c.uid), c.snapshot, "{}: names_snapshot", c.name);
        }
        let v = VolumeId::parse("file:n:p:x:v0123456789ab").unwrap();
        let s = VolumeId::parse("file:n:p:x:s0123456789ab").unwrap();
        let legacy = VolumeId::parse("file:n:p:x").unwrap();
        assert!(v.may_name_volume() && !v.may_name_snapshot());
        assert!(!s.may_name_volume() && s.may_name_snapshot());
        assert!(legacy.may_name_volume() && legacy.may_name_snapshot());
    }

    #[test]
    fn uids_are_valid_and_fresh() {
        let uids: std::collections::BTreeSet<String> = (0..1000).map(|_| new_uid()).collect();
        assert_eq!(uids.len(), 1000, "no uid repeats");
        assert!(uids.iter().all(|u| valid_uid(u)), "{uids:?}");
    }

    #[test]
    fn local_names_are_deterministic_short_and_clean() {
        let names =
            ["pvc-4f3c", "data_1", "PVC-Upper", "../../etc/passwd", "名前", "a-very-long-name-that-exceeds-the-forty-character-limit", ""];
        for name in names {
            let got = local_name(name);
            assert!(valid_local_name(&got) && got.len() <= MAX_DERIVED_LEN, "{name:?} -> {got:?} is not a valid derived name");
            assert_eq!(got, local_name(name), "deterministic");
            assert_ne!(got, name, "never the bare CSI name");
            assert_ne!(got, legacy_local_name(name), "never the legacy derivation's name");
        }
        assert!(local_name("pvc-4f3c").starts_with("pvc-4f3c-"), "readable prefix");
        assert!(local_name("../../etc/passwd").starts_with("etc-passwd-"));
        assert!(local_name("名前").starts_with('h'));
        let max = "x".repeat(128);
        assert_ne!(local_name(&"x".repeat(127)), local_name(&max), "different names, different hashes");
    }

    #[test]
    fn a_name_equal_to_another_names_local_name_gets_its_own() {
        // issue 10: `Team/Data` and the local name derived from it are two CSI names.
        for first in ["Team/Data", "pvc-1", "a b c"] {
            let second = local_name(first);
            assert_ne!(local_name(first), local_name(&second), "{first:?} and {second:?}");
            let legacy = legacy_local_name(first);
            if legacy != first {
                assert_ne!(local_name(first), local_name(&legacy), "{first:?} and {legacy:?}");
            }
            assert_ne!(local_name(&legacy), legacy, "the legacy name as a CSI name does not land on the legacy object");
        }
    }

    #[test]
    fn legacy_local_names_are_what_earlier_versions_derived() {
        // Values computed by the derivation of earlier versions, which existing objects carry.
        assert_eq!(legacy_local_name("pvc-4f3c"), "pvc-4f3c");
        assert_eq!(legacy_local_name("data_1"), "data_1");
        let digest = hex::encode(Sha256::digest(b"../../etc/passwd"));
        assert_eq!(legacy_local_name("../../etc/passwd"), format!("etc-passwd-{}", &digest[..16]));
        let long = "a-very-long-name-that-exceeds-the-forty-character-limit";
        let digest = hex::encode(Sha256::digest(long.as_bytes()));
        assert_eq!(legacy_local_name(long), format!("a-very-long-name-that-e-{}", &digest[..16]));
        assert!(legacy_local_name("名前").starts_with('h'));
    }

    #[test]
    fn longest_ids_fit_the_csi_limit() {
        let (node, pool) = ("n".repeat(MAX_NODE_LEN), "p".repeat(MAX_POOL_LEN));
        let legacy = VolumeId::new(PoolKind::File, Some(&node), &pool, &"l".repeat(MAX_LOCAL_LEN));
        assert!(legacy.to_string().len() <= MAX_ID_LEN);
        assert_eq!(VolumeId::parse(&legacy.to_string()), Some(legacy));
        let local = local_name(&"x".repeat(128));
        assert_eq!(local.len(), MAX_DERIVED_LEN);
        for object in [Object::Volume, Object::Snapshot] {
            let id = VolumeId::of(PoolKind::File, Some(&node), &pool, &local, object, Some(UID));
            assert!(id.to_string().len() <= MAX_ID_LEN, "{} bytes", id.to_string().len());
            assert_eq!(VolumeId::parse(&id.to_string()), Some(id));
        }
    }
}
