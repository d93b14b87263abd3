//! What holdfast stores in LVM tags, and the encoding that fits it into them. The tags are the
//! only record of a volume or snapshot: a restarted driver reads everything back from them.
//!
//! LVM tags allow only `[A-Za-z0-9_+.-/=!:&#]` and at most 1024 characters, so the CSI name
//! (any UTF-8, up to 128 bytes) is stored hex-encoded (at most 256 characters). Local names,
//! numbers, filesystem names and pool names already use allowed characters only. Parameters
//! (any text) are stored hex-encoded, one tag each, beside a tag counting them.

use crate::pool::Source;

/// Every LV holdfast made carries this tag; LVs without it are never listed, touched or removed.
pub const MARKER: &str = "holdfast.managed";
/// Set while a copy (restore or clone) is not finished: the resize and new filesystem UUID are
/// still to be done. A retried create finishes the job.
pub const PENDING: &str = "holdfast.pending";

const POOL: &str = "holdfast.pool=";
const TYPE: &str = "holdfast.type=";
const LOCAL: &str = "holdfast.local=";
const NAME: &str = "holdfast.name=";
const CAPACITY: &str = "holdfast.capacity=";
const BLOCK: &str = "holdfast.block=1";
const FS: &str = "holdfast.fs=";
const SOURCE: &str = "holdfast.source=";
const SIZE: &str = "holdfast.size=";
const CREATED: &str = "holdfast.created=";
const UID: &str = "holdfast.uid=";
const SOURCE_UID: &str = "holdfast.source-uid=";
const PARAMS: &str = "holdfast.params=";
const SCHEMA: &str = "holdfast.schema=";
/// The schema of the records [`encode`] writes: 2 added uids and parameters (records without
/// the tag are schema 1). A record of a newer schema is refused, not half understood.
pub const RECORD_SCHEMA: u32 = 2;
const PARAM: &str = "holdfast.param=";
/// issue 12: a group snapshot member's group, [`crate::pool::GroupMembership::encode`]d.
const GROUP: &str = "holdfast.group=";

/// Longest tag LVM accepts.
pub const MAX_TAG_LEN: usize = 1024;

/// Whether an LV is a volume or a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    /// A volume (thick or thin LV, or a thin snapshot serving as a restored or cloned volume).
    Volume,
    /// A snapshot (a thin snapshot LV, never written).
    Snapshot,
}

/// The holdfast record of one LV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The holdfast pool that owns the LV (several pools may share a volume group).
    pub pool: String,
    /// Volume or snapshot.
    pub object: ObjectType,
    /// The local name.
    pub local: String,
    /// The CSI name it was created with.
    pub csi_name: String,
    /// Volumes: the capacity the create request asked for (bytes). Snapshots: 0.
    pub capacity: u64,
    /// Volumes: raw block.
    pub block: bool,
    /// Volumes: the filesystem chosen at creation.
    pub fs_type: Option<String>,
    /// Volumes: the content source. Snapshots: `Source::Volume(origin)`.
    pub source: Option<Source>,
    /// Snapshots: the size of the source volume when taken.
    pub size: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
    /// A copy that is not finished yet ([`PENDING`]).
    pub pending: bool,
    /// The uid recorded at creation (`None`: made before uids existed).
    pub uid: Option<String>,
    /// The recorded uid of the source (volumes: of their content source; snapshots: of the
    /// volume they were taken of), when it had one.
    pub source_uid: Option<String>,
    /// Volumes: the pool parameters of the create request (`None`: not recorded).
    pub parameters: Option<std::collections::BTreeMap<String, String>>,
    /// Snapshots: the group snapshot it is a member of (issue 12: [`GROUP`]).
    pub group: Option<crate::pool::GroupMembership>,
}

fn tag_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+.-/=!:&#".contains(c)
}

/// Whether `s` can be stored in a tag as it is.
pub fn valid_tag(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TAG_LEN && s.chars().all(tag_char_ok)
}

/// The tags recording `m`, marker first. Fails when a value cannot be stored (a filesystem or
/// pool name with characters LVM forbids in tags).
pub fn encode(m: &Meta) -> Result<Vec<String>, String> {
    let mut tags = vec![
        MARKER.to_owned(),
        format!("{POOL}{}", m.pool),
        format!("{TYPE}{}", if m.object == ObjectType::Volume { "volume" } else { "snapshot" }),
        format!("{LOCAL}{}", m.local),
        format!("{NAME}{}", hex::encode(m.csi_name.as_bytes())),
        format!("{CREATED}{}", m.created),
        format!("{SCHEMA}{RECORD_SCHEMA}"),
    ];
    match m.object {
        ObjectType::Volume => {
            tags.push(format!("{CAPACITY}{}", m.capacity));
            if m.block {
                tags.push(BLOCK.to_owned());
            }
            if let Some(fs) = &m.fs_type {
                tags.push(format!("{FS}{fs}"));
            }
        }
        ObjectType::Snapshot => tags.push(format!("{SIZE}{}", m.size)),
    }
    match &m.source {
        Some(Source::Snapshot(s)) => tags.push(format!("{SOURCE}snapshot:{s}")),
        Some(Source::Volume(v)) => tags.push(format!("{SOURCE}volume:{v}")),
        None => {}
    }
    if m.pending {
        tags.push(PENDING.to_owned());
    }
    if let Some(u) = &m.uid {
        tags.push(format!("{UID}{u}"));
    }
    if let Some(u) = &m.source_uid {
        tags.push(format!("{SOURCE_UID}{u}"));
    }
    if let Some(params) = &m.parameters {
        tags.push(format!("{PARAMS}{}", params.len()));
        for (k, v) in params {
            tags.push(format!("{PARAM}{}={}", hex::encode(k), hex::encode(v)));
        }
    }
    if let Some(g) = &m.group {
        tags.push(format!("{GROUP}{}", g.encode()));
    }
    if let Some(bad) = tags.iter().find(|t| !valid_tag(t)) {
        return Err(format!("cannot store {bad:?} as an LVM tag (allowed: A-Z a-z 0-9 _ + . - / = ! : & #, at most {MAX_TAG_LEN})"));
    }
    Ok(tags)
}

/// Reads the record back. `Ok(None)`: the LV is not holdfast's (no marker). `Err`: it carries the
/// marker but the record is damaged (someone edited the tags), said in the message.
pub fn decode(tags: &[String]) -> Result<Option<Meta>, String> {
    if !tags.iter().any(|t| t == MARKER) {
        return Ok(None);
    }
    let get = |prefix: &str| tags.iter().find_map(|t| t.strip_prefix(prefix));
    let need = |prefix: &str| get(prefix).ok_or_else(|| format!("tag {prefix}… is missing"));
    let number = |prefix: &str| -> Result<Option<i64>, String> {
        get(prefix).map(|v| v.parse::<i64>().map_err(|_| format!("tag {prefix}{v} is not a number"))).transpose()
    };
    let object = match need(TYPE)? {
        "volume" => ObjectType::Volume,
        "snapshot" => ObjectType::Snapshot,
        other => return Err(format!("tag {TYPE}{other} names no object type")),
    };
    let name_hex = need(NAME)?;
    let csi_name = hex::decode(name_hex)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| format!("tag {NAME}{name_hex} is not hex-encoded UTF-8"))?;
    let source = match get(SOURCE) {
        None => None,
        Some(v) => Some(match v.split_once(':') {
            Some(("snapshot", s)) => Source::Snapshot(s.to_owned()),
            Some(("volume", s)) => Source::Volume(s.to_owned()),
            _ => return Err(format!("tag {SOURCE}{v} names no source")),
        }),
    };
    match get(SCHEMA).map(|v| v.parse::<u32>()) {
        None => {}
        Some(Ok(n)) if n <= RECORD_SCHEMA => {}
        Some(_) => {
            return Err(format!("tag {SCHEMA}… is not a schema this holdfast reads (it reads up to {RECORD_SCHEMA}): upgrade holdfast"));
        }
    }
    let uid = |prefix: &str| -> Result<Option<String>, String> {
        match get(prefix) {
            Some(u) if crate::volume_id::valid_uid(u) => Ok(Some(u.to_owned())),
            Some(u) => Err(format!("tag {prefix}{u} is not a uid")),
            None => Ok(None),
        }
    };
    let parameters = match get(PARAMS) {
        None => None,
        Some(n) => {
            let mut params = std::collections::BTreeMap::new();
            for t in tags.iter().filter_map(|t| t.strip_prefix(PARAM)) {
                let text = |h: &str| hex::decode(h).ok().and_then(|b| String::from_utf8(b).ok());
                let (k, v) = t
                    .split_once('=')
                    .and_then(|(k, v)| Some((text(k)?, text(v)?)))
                    .ok_or_else(|| format!("tag {PARAM}{t} is not a hex-encoded key=value"))?;
                params.insert(k, v);
            }
            if n.parse::<usize>().ok() != Some(params.len()) {
                return Err(format!("tag {PARAMS}{n} does not count the {} parameter tags", params.len()));
            }
            Some(params)
        }
    };
    let unsigned = |prefix: &str| -> Result<u64, String> {
        Ok(number(prefix)?.map(|n| u64::try_from(n).map_err(|_| format!("tag {prefix}{n} is negative"))).transpose()?.unwrap_or(0))
    };
    Ok(Some(Meta {
        pool: need(POOL)?.to_owned(),
        object,
        local: need(LOCAL)?.to_owned(),
        csi_name,
        capacity: unsigned(CAPACITY)?,
        block: tags.iter().any(|t| t == BLOCK),
        fs_type: get(FS).map(str::to_owned),
        source,
        size: unsigned(SIZE)?,
        created: number(CREATED)?.unwrap_or(0),
        pending: tags.iter().any(|t| t == PENDING),
        uid: uid(UID)?,
        source_uid: uid(SOURCE_UID)?,
        parameters,
        group: match get(GROUP) {
            None => None,
            Some(g) => Some(crate::pool::GroupMembership::decode(g).ok_or_else(|| format!("tag {GROUP}{g} is not a group record"))?),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> Meta {
        Meta {
            pool: "thin".into(),
            object: ObjectType::Volume,
            local: "pvc-1_a".into(),
            csi_name: "pvc-1".into(),
            capacity: 64 << 20,
            block: false,
            fs_type: Some("xfs".into()),
            source: None,
            size: 0,
            created: 1_700_000_000,
            pending: false,
            uid: Some("0123456789ab".into()),
            source_uid: None,
            parameters: Some(Default::default()),
            group: None,
        }
    }

    #[test]
    fn round_trips() {
        let long_ascii = "x".repeat(128);
        // 128 bytes of multi-byte UTF-8 and every character LVM would refuse.
        let long_utf8 = "名".repeat(42) + "ab";
        let hostile = " ,;\"'\\$*?[]{}()<>|`~%^@\n\t".to_owned();
        struct Case {
            name: &'static str,
            meta: Meta,
        }
        let cases = [
            Case { name: "plain volume", meta: volume() },
            Case { name: "128 ASCII characters", meta: Meta { csi_name: long_ascii, ..volume() } },
            Case { name: "128 bytes of UTF-8", meta: Meta { csi_name: long_utf8, ..volume() } },
            Case { name: "forbidden characters", meta: Meta { csi_name: hostile, ..volume() } },
            Case { name: "block", meta: Meta { block: true, fs_type: None, ..volume() } },
            Case { name: "restored", meta: Meta { source: Some(Source::Snapshot("s1".into())), pending: true, ..volume() } },
            Case {
                name: "clone",
                meta: Meta { source: Some(Source::Volume("v-2".into())), source_uid: Some("ba9876543210".into()), ..volume() },
            },
            Case { name: "legacy (no uid, no parameters)", meta: Meta { uid: None, parameters: None, ..volume() } },
            Case {
                name: "parameters",
                meta: Meta {
                    parameters: Some([("k".to_owned(), "v =,x".to_owned()), ("名".to_owned(), String::new())].into()),
                    ..volume()
                },
            },
            Case {
                name: "snapshot",
                meta: Meta {
                    object: ObjectType::Snapshot,
                    capacity: 0,
                    fs_type: None,
                    size: 1 << 30,
                    source: Some(Source::Volume("v1".into())),
                    ..volume()
                },
            },
        ];
        for c in cases {
            let tags = encode(&c.meta).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert_eq!(tags[0], MARKER, "{}", c.name);
            for t in &tags {
                assert!(valid_tag(t), "{}: {t:?}", c.name);
            }
            // LVM hands tags back sorted; order must not matter.
            let mut sorted = tags.clone();
            sorted.sort();
            assert_eq!(decode(&sorted).unwrap(), Some(c.meta), "{}", c.name);
        }
        assert_eq!(encode(&Meta { csi_name: "x".repeat(128), ..volume() }).unwrap()[4].len(), "holdfast.name=".len() + 256);
    }

    #[test]
    fn foreign_and_damaged_records() {
        assert_eq!(decode(&[]).unwrap(), None);
        assert_eq!(decode(&["holdfast.pool=thin".into(), "backup".into()]).unwrap(), None, "no marker, not ours");
        let good = encode(&volume()).unwrap();
        struct Case {
            name: &'static str,
            drop: &'static str,
            add: &'static str,
            want: &'static str,
        }
        let cases = [
            Case { name: "no type", drop: "holdfast.type=", add: "", want: "holdfast.type=… is missing" },
            Case { name: "bad type", drop: "holdfast.type=", add: "holdfast.type=disk", want: "names no object type" },
            Case { name: "bad name", drop: "holdfast.name=", add: "holdfast.name=zz", want: "not hex-encoded" },
            Case { name: "bad number", drop: "holdfast.capacity=", add: "holdfast.capacity=lots", want: "not a number" },
            Case { name: "negative", drop: "holdfast.capacity=", add: "holdfast.capacity=-1", want: "negative" },
            Case { name: "bad source", drop: "", add: "holdfast.source=tape:1", want: "names no source" },
            Case { name: "bad uid", drop: "holdfast.uid=", add: "holdfast.uid=../x", want: "not a uid" },
            Case { name: "newer schema", drop: "holdfast.schema=", add: "holdfast.schema=3", want: "upgrade holdfast" },
            Case { name: "uncounted parameter", drop: "", add: "holdfast.param=6b=76", want: "does not count" },
            Case { name: "bad parameter", drop: "", add: "holdfast.param=zz", want: "not a hex-encoded" },
        ];
        for c in cases {
            let mut tags: Vec<String> = good.iter().filter(|t| c.drop.is_empty() || !t.starts_with(c.drop)).cloned().collect();
            if !c.add.is_empty() {
                tags.push(c.add.into());
            }
            let err = decode(&tags).unwrap_err();
            assert!(err.contains(c.want), "{}: {err}", c.name);
        }
    }

    #[test]
    fn decodes_tags_written_by_lvm() {
        // From tests/fixtures/lvm/lvs-vg.json (hf-thin1).
        let tags: Vec<String> = "holdfast.block=1,holdfast.capacity=67108864,holdfast.created=1700000001,holdfast.local=thin1,holdfast.managed,holdfast.name=7468696e31,holdfast.pool=thin,holdfast.type=volume"
            .split(',')
            .map(str::to_owned)
            .collect();
        let m = decode(&tags).unwrap().unwrap();
        assert_eq!((m.csi_name.as_str(), m.local.as_str(), m.capacity, m.block), ("thin1", "thin1", 64 << 20, true));
    }

    #[test]
    fn refuses_values_lvm_would_refuse() {
        let err = encode(&Meta { fs_type: Some("ext 4".into()), ..volume() }).unwrap_err();
        assert!(err.contains("holdfast.fs=ext 4"), "{err}");
    }
}
