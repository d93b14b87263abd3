//! Parses `zfs get -H -p -o name,property,value,source` (one row per object and property,
//! tab-separated, exact numbers) into one [`Object`] per dataset, zvol or snapshot, and decodes
//! the `holdfast:*` user properties holdfast stores on them ([`Meta`]).
//!
//! Snapshots inherit their dataset's user properties, so only values set on the object itself
//! (source `local`, or `received` after a `zfs send | zfs receive`) count: a foreign snapshot of
//! a holdfast volume must not pass for a holdfast snapshot.

use std::collections::BTreeMap;

use crate::pool::Source;

/// The native properties holdfast reads, in the order it asks for them.
pub const NATIVE: [&str; 12] =
    ["type", "creation", "guid", "used", "available", "refquota", "quota", "volsize", "origin", "clones", "defer_destroy", "mounted"];

/// Marker: the holdfast pool (config name) the object belongs to.
pub const P_POOL: &str = "holdfast:pool";
/// `volume`, `snapshot` or `intermediate` (the hidden snapshot a clone is made from).
pub const P_TYPE: &str = "holdfast:type";
/// The local name of the object the record belongs to (a volume's, a snapshot's, or for an
/// intermediate snapshot the clone's): a record copied onto another dataset or snapshot names
/// the wrong object there and is not taken for a record of it.
pub const P_LOCAL: &str = "holdfast:local";
/// The CSI name, percent-encoded ([`encode`]).
pub const P_NAME: &str = "holdfast:name";
/// The capacity the volume was requested with (bytes): the idempotency key of a retry.
pub const P_CAPACITY: &str = "holdfast:capacity";
/// `1` for a raw block volume.
pub const P_BLOCK: &str = "holdfast:block";
/// The filesystem of a filesystem volume (`zfs` for a dataset), and of a snapshot's source.
pub const P_FS: &str = "holdfast:fs";
/// `snapshot:<local>` or `volume:<local>`: what a volume was made from, or (snapshots) the
/// volume a snapshot was taken of.
pub const P_SOURCE: &str = "holdfast:source";
/// A snapshot's minimum restore size: the source volume's capacity when it was taken (bytes).
pub const P_SIZE: &str = "holdfast:size";
/// `1` while a copy (restore or clone of a zvol) is not finished: grown, new filesystem UUID.
pub const P_PENDING: &str = "holdfast:pending";

/// The uid recorded when the volume or snapshot was made (absent on objects made before uids).
pub const P_UID: &str = "holdfast:uid";
/// The recorded uid of the source: a volume's content source, or the volume a snapshot was
/// taken of.
pub const P_SOURCE_UID: &str = "holdfast:source-uid";
/// A volume's pool parameters, as a JSON object ([`encode`]d): a retry is compared with them.
pub const P_PARAMS: &str = "holdfast:params";

/// A volume's mutable parameters as they are now (issue 12: modify), a JSON object
/// ([`encode`]d); absent: none ever set. Written after the native property it records.
pub const P_MUTABLE: &str = "holdfast:mutable";

/// The schema of the record ([`RECORD_SCHEMA`]; absent: schema 1).
pub const P_SCHEMA: &str = "holdfast:schema";
/// The schema of the records holdfast writes: 2 added uids and parameters. A record of a newer
/// schema is refused, not half understood.
pub const RECORD_SCHEMA: u32 = 2;

/// issue 12: a group snapshot member's group, [`crate::pool::GroupMembership::encode`]d.
pub const P_GROUP: &str = "holdfast:group";

/// The user properties holdfast reads, in the order it asks for them.
pub const USER: [&str; 16] = [
    P_POOL,
    P_TYPE,
    P_LOCAL,
    P_NAME,
    P_CAPACITY,
    P_BLOCK,
    P_FS,
    P_SOURCE,
    P_SIZE,
    P_PENDING,
    P_UID,
    P_SOURCE_UID,
    P_PARAMS,
    P_SCHEMA,
    P_MUTABLE,
    P_GROUP,
];

/// Every property of [`NATIVE`] and [`USER`], comma-separated, for `zfs get`.
pub fn all_properties() -> String {
    NATIVE.iter().chain(USER.iter()).copied().collect::<Vec<_>>().join(",")
}

/// The kind of a ZFS object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A filesystem dataset.
    Filesystem,
    /// A zvol.
    Volume,
    /// A snapshot of either.
    Snapshot,
    /// Anything else (bookmarks).
    Other,
}

/// One dataset, zvol or snapshot as `zfs get` reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// The full name, e.g. `tank/holdfast/v1` or `tank/holdfast/v1@s1`.
    pub name: String,
    /// Its kind.
    pub kind: Kind,
    /// Creation time, seconds since the Unix epoch.
    pub creation: i64,
    /// ZFS's unique id of the object.
    pub guid: u64,
    /// Bytes used (with descendants and snapshots).
    pub used: u64,
    /// Bytes available to it (0 for snapshots).
    pub available: u64,
    /// `refquota` (0: none).
    pub refquota: u64,
    /// `quota` (0: none).
    pub quota: u64,
    /// `volsize` of a zvol or zvol snapshot (0 otherwise).
    pub volsize: u64,
    /// The snapshot a clone was made from.
    pub origin: Option<String>,
    /// The clones made from a snapshot.
    pub clones: Vec<String>,
    /// A snapshot marked for deferred destruction (`zfs destroy -d`).
    pub defer_destroy: bool,
    /// A filesystem that is mounted.
    pub mounted: bool,
    /// `holdfast:*` properties set on the object itself, raw (not decoded).
    pub user: BTreeMap<String, String>,
}

impl Object {
    fn new(name: &str) -> Object {
        Object {
            name: name.to_owned(),
            kind: Kind::Other,
            creation: 0,
            guid: 0,
            used: 0,
            available: 0,
            refquota: 0,
            quota: 0,
            volsize: 0,
            origin: None,
            clones: Vec::new(),
            defer_destroy: false,
            mounted: false,
            user: BTreeMap::new(),
        }
    }

    /// The dataset part of the name (before `@`).
    pub fn dataset(&self) -> &str {
        self.name.split_once('@').map_or(self.name.as_str(), |(d, _)| d)
    }

    /// The snapshot part of the name (after `@`), for snapshots.
    pub fn snapshot_name(&self) -> Option<&str> {
        self.name.split_once('@').map(|(_, s)| s)
    }

    /// The last component of the dataset part.
    pub fn leaf(&self) -> &str {
        let d = self.dataset();
        d.rsplit_once('/').map_or(d, |(_, l)| l)
    }

    /// The capacity a filesystem dataset or zvol offers: `volsize` for a zvol, otherwise the
    /// refquota or quota (whichever is set; the smaller when both are).
    pub fn capacity(&self) -> u64 {
        match (self.kind, self.refquota, self.quota) {
            (Kind::Volume | Kind::Snapshot, _, _) if self.volsize > 0 => self.volsize,
            (_, 0, q) => q,
            (_, r, 0) => r,
            (_, r, q) => r.min(q),
        }
    }
}

/// Parses `zfs get -H -p -o name,property,value,source` output. Objects come out in the order
/// zfs listed them. A row that does not have four fields is an error (a value holding a tab or
/// newline would be one; holdfast encodes the values it writes so that this cannot happen).
pub fn parse_get(stdout: &str) -> Result<Vec<Object>, String> {
    let mut out: Vec<Object> = Vec::new();
    for (n, line) in stdout.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let [name, prop, value, source] = fields[..] else {
            return Err(format!("line {}: expected 4 tab-separated fields, got {}: {line:?}", n + 1, fields.len()));
        };
        if out.last().is_none_or(|o| o.name != name) {
            out.push(Object::new(name));
        }
        let o = out.last_mut().expect("just pushed");
        let num = |v: &str| -> Result<u64, String> {
            match v {
                "-" | "none" => Ok(0),
                v => v.parse().map_err(|_| format!("line {}: {prop} of {name} is not a number: {v:?}", n + 1)),
            }
        };
        match prop {
            "type" => {
                o.kind = match value {
                    "filesystem" => Kind::Filesystem,
                    "volume" => Kind::Volume,
                    "snapshot" => Kind::Snapshot,
                    _ => Kind::Other,
                }
            }
            "creation" => o.creation = num(value)? as i64,
            "guid" => o.guid = num(value)?,
            "used" => o.used = num(value)?,
            "available" => o.available = num(value)?,
            "refquota" => o.refquota = num(value)?,
            "quota" => o.quota = num(value)?,
            "volsize" => o.volsize = num(value)?,
            "origin" => o.origin = (value != "-").then(|| value.to_owned()),
            "clones" => {
                o.clones = if value == "-" || value.is_empty() { Vec::new() } else { value.split(',').map(str::to_owned).collect() }
            }
            "defer_destroy" => o.defer_destroy = value == "on",
            "mounted" => o.mounted = value == "yes",
            p if p.starts_with("holdfast:") => {
                if matches!(source, "local" | "received") {
                    o.user.insert(p.to_owned(), value.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// What a holdfast object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    /// A volume (dataset or zvol).
    Volume,
    /// A CSI snapshot.
    Snapshot,
    /// The hidden snapshot a clone of a volume is made from.
    Intermediate,
}

impl ObjectType {
    /// The value of `holdfast:type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectType::Volume => "volume",
            ObjectType::Snapshot => "snapshot",
            ObjectType::Intermediate => "intermediate",
        }
    }
}

/// The holdfast record of an object, decoded from its `holdfast:*` properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The holdfast pool it belongs to.
    pub pool: String,
    /// What it is.
    pub object: ObjectType,
    /// The local name of the object it belongs to ([`P_LOCAL`]); empty in records written
    /// before holdfast stored it.
    pub local: String,
    /// The CSI name (volumes and snapshots).
    pub csi_name: String,
    /// The requested capacity (volumes).
    pub capacity: u64,
    /// Raw block volume (or a snapshot of one).
    pub block: bool,
    /// Filesystem of a filesystem volume (`zfs` for datasets), or of a snapshot's source.
    pub fs_type: Option<String>,
    /// Volume: what it was made from. Snapshot: `Source::Volume` of the volume it was taken of.
    pub source: Option<Source>,
    /// Snapshot: its minimum restore size.
    pub size: u64,
    /// A copy that is not finished.
    pub pending: bool,
    /// The uid recorded at creation (`None`: made before uids existed).
    pub uid: Option<String>,
    /// The recorded uid of the source ([`P_SOURCE_UID`]), when it had one.
    pub source_uid: Option<String>,
    /// Volumes: the pool parameters of the create request (`None`: not recorded).
    pub parameters: Option<BTreeMap<String, String>>,
    /// Volumes: the mutable parameters as they are now ([`P_MUTABLE`]).
    pub mutable: BTreeMap<String, String>,
    /// Snapshots: the group snapshot it is a member of (issue 12: [`P_GROUP`]).
    pub group: Option<crate::pool::GroupMembership>,
}

impl Meta {
    /// The properties to set (`-o key=value`) to store this record.
    pub fn properties(&self) -> Vec<(String, String)> {
        let mut p = vec![(P_POOL.to_owned(), self.pool.clone()), (P_TYPE.to_owned(), self.object.as_str().to_owned())];
        if !self.local.is_empty() {
            p.push((P_LOCAL.to_owned(), self.local.clone()));
        }
        if self.object == ObjectType::Intermediate {
            return p;
        }
        p.push((P_NAME.to_owned(), encode(&self.csi_name)));
        if self.capacity > 0 {
            p.push((P_CAPACITY.to_owned(), self.capacity.to_string()));
        }
        if self.block {
            p.push((P_BLOCK.to_owned(), "1".to_owned()));
        }
        if let Some(fs) = &self.fs_type {
            p.push((P_FS.to_owned(), fs.clone()));
        }
        if let Some(s) = &self.source {
            p.push((P_SOURCE.to_owned(), source_value(s)));
        }
        if self.size > 0 {
            p.push((P_SIZE.to_owned(), self.size.to_string()));
        }
        if self.pending {
            p.push((P_PENDING.to_owned(), "1".to_owned()));
        }
        if let Some(u) = &self.uid {
            p.push((P_UID.to_owned(), u.clone()));
        }
        if let Some(u) = &self.source_uid {
            p.push((P_SOURCE_UID.to_owned(), u.clone()));
        }
        if let Some(params) = &self.parameters {
            p.push((P_PARAMS.to_owned(), encode(&serde_json::to_string(params).unwrap_or_default())));
        }
        if !self.mutable.is_empty() {
            p.push((P_MUTABLE.to_owned(), mutable_value(&self.mutable)));
        }
        if let Some(g) = &self.group {
            p.push((P_GROUP.to_owned(), g.encode()));
        }
        p.push((P_SCHEMA.to_owned(), RECORD_SCHEMA.to_string()));
        p
    }
}

/// The value of [`P_MUTABLE`] for `mutable`.
pub fn mutable_value(mutable: &BTreeMap<String, String>) -> String {
    encode(&serde_json::to_string(mutable).unwrap_or_default())
}

/// `snapshot:<local>` / `volume:<local>`.
pub fn source_value(s: &Source) -> String {
    match s {
        Source::Snapshot(l) => format!("snapshot:{l}"),
        Source::Volume(l) => format!("volume:{l}"),
    }
}

/// The holdfast record of `o`: `Ok(None)` when it carries no holdfast marker (not ours),
/// `Err` when it carries the marker but the record is damaged.
pub fn decode_meta(o: &Object) -> Result<Option<Meta>, String> {
    let Some(pool) = o.user.get(P_POOL) else {
        return Ok(None);
    };
    let get = |k: &str| o.user.get(k).map(String::as_str);
    let object = match get(P_TYPE) {
        Some("volume") => ObjectType::Volume,
        Some("snapshot") => ObjectType::Snapshot,
        Some("intermediate") => ObjectType::Intermediate,
        other => return Err(format!("{P_TYPE} is {other:?}, not volume, snapshot or intermediate")),
    };
    let number = |k: &str| -> Result<u64, String> {
        get(k).map(|v| v.parse::<u64>().map_err(|_| format!("{k} is not a number: {v:?}"))).transpose().map(Option::unwrap_or_default)
    };
    let csi_name = match (object, get(P_NAME)) {
        (ObjectType::Intermediate, _) => String::new(),
        (_, Some(n)) => decode(n).ok_or_else(|| format!("{P_NAME} is not validly encoded: {n:?}"))?,
        (_, None) => return Err(format!("{P_NAME} is missing")),
    };
    let source = match get(P_SOURCE) {
        None => None,
        Some(v) => Some(match v.split_once(':') {
            Some(("snapshot", l)) if !l.is_empty() => Source::Snapshot(l.to_owned()),
            Some(("volume", l)) if !l.is_empty() => Source::Volume(l.to_owned()),
            _ => return Err(format!("{P_SOURCE} is not snapshot:NAME or volume:NAME: {v:?}")),
        }),
    };
    match get(P_SCHEMA).map(|v| v.parse::<u32>()) {
        None => {}
        Some(Ok(n)) if n <= RECORD_SCHEMA => {}
        Some(_) => {
            return Err(format!("{P_SCHEMA} is not a schema this holdfast reads (it reads up to {RECORD_SCHEMA}): upgrade holdfast"));
        }
    }
    let uid = |k: &str| -> Result<Option<String>, String> {
        match get(k) {
            Some(u) if crate::volume_id::valid_uid(u) => Ok(Some(u.to_owned())),
            Some(u) => Err(format!("{k} is not a uid: {u:?}")),
            None => Ok(None),
        }
    };
    let parameters = match get(P_PARAMS) {
        None => None,
        Some(v) => Some(
            decode(v)
                .and_then(|j| serde_json::from_str::<BTreeMap<String, String>>(&j).ok())
                .ok_or_else(|| format!("{P_PARAMS} is not an encoded JSON object of strings: {v:?}"))?,
        ),
    };
    let mutable = match get(P_MUTABLE) {
        None => BTreeMap::new(),
        Some(v) => decode(v)
            .and_then(|j| serde_json::from_str::<BTreeMap<String, String>>(&j).ok())
            .ok_or_else(|| format!("{P_MUTABLE} is not an encoded JSON object of strings: {v:?}"))?,
    };
    Ok(Some(Meta {
        pool: pool.clone(),
        object,
        local: get(P_LOCAL).unwrap_or_default().to_owned(),
        csi_name,
        capacity: number(P_CAPACITY)?,
        block: get(P_BLOCK) == Some("1"),
        fs_type: get(P_FS).map(str::to_owned),
        source,
        size: number(P_SIZE)?,
        pending: get(P_PENDING) == Some("1"),
        uid: uid(P_UID)?,
        source_uid: uid(P_SOURCE_UID)?,
        parameters,
        mutable,
        group: match get(P_GROUP) {
            None => None,
            Some(g) => Some(crate::pool::GroupMembership::decode(g).ok_or_else(|| format!("{P_GROUP} is not a group record: {g:?}"))?),
        },
    }))
}

/// Makes a CSI name safe as a user property value that `zfs get -H` prints on one line:
/// `%`, control characters and DEL become `%XX`; everything else (UTF-8 included) stays, so
/// `zfs get holdfast:name` shows the name as the operator knows it.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '%' || c.is_ascii_control() {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The inverse of [`encode`]; `None` for a malformed escape.
pub fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The first value of `name` in `zpool list -H -o name,health` output.
pub fn parse_health(stdout: &str, pool: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        let (n, h) = l.split_once('\t')?;
        (n == pool).then(|| h.trim().to_owned())
    })
}

/// The `state:` and `status:` paragraphs of `zpool status -x POOL`, on one line, for a message.
/// A healthy pool (`pool 'x' is healthy`) gives `None`.
pub fn parse_status_reason(stdout: &str) -> Option<String> {
    let mut parts = Vec::new();
    let mut current: Option<String> = None;
    for line in stdout.lines() {
        let t = line.trim();
        // Paragraphs start with a right-aligned `key:`; their continuation lines with a tab.
        let key_line = t.split_once(':').filter(|(k, _)| !line.starts_with('\t') && !k.is_empty() && !k.contains(' '));
        if let Some((key, rest)) = key_line {
            if let Some(c) = current.take() {
                parts.push(c);
            }
            if matches!(key, "state" | "status") {
                current = Some(format!("{key}: {}", rest.trim()));
            }
        } else if let Some(c) = current.as_mut() {
            if !t.is_empty() {
                c.push(' ');
                c.push_str(t);
            }
        }
    }
    if let Some(c) = current {
        parts.push(c);
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}
