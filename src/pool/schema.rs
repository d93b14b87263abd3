//! The schema version of the JSON records the `file` and `nfs` pools keep beside each volume
//! and snapshot (LVM tags and ZFS properties carry their own, see `lvm::tags` and
//! `zfs::report`). A record is written with [`JSON_RECORD_SCHEMA`]; one written by a newer
//! holdfast (a higher schema) is refused with a message saying so, never half understood; a
//! record without the field (written before schemas existed) reads as schema 0.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The schema of the JSON records this build writes and the newest it reads.
pub const JSON_RECORD_SCHEMA: u32 = 1;

/// The schema of the records a pool of `kind` writes with each volume and snapshot in this
/// build, which is also the newest this build reads: what the Agent API reports as
/// `record_schema`, and what the controller compares an agent's reports with.
pub fn record_schema(kind: crate::volume_id::PoolKind) -> u32 {
    use crate::volume_id::PoolKind;
    match kind {
        PoolKind::File | PoolKind::Nfs => JSON_RECORD_SCHEMA,
        PoolKind::Lvm => crate::pool::lvm::tags::RECORD_SCHEMA,
        PoolKind::Zfs => crate::pool::zfs::report::RECORD_SCHEMA,
    }
}

/// A record's `schema` field: written as [`JSON_RECORD_SCHEMA`], read back as what the file
/// says (refused when newer than this build).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordSchema(pub u32);

impl Serialize for RecordSchema {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Whatever was read, what is written now is this build's schema.
        s.serialize_u32(JSON_RECORD_SCHEMA)
    }
}

impl<'de> Deserialize<'de> for RecordSchema {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        if n > JSON_RECORD_SCHEMA {
            return Err(serde::de::Error::custom(format!(
                "record schema {n} was written by a newer holdfast (this one reads schemas up to {JSON_RECORD_SCHEMA}): upgrade holdfast"
            )));
        }
        Ok(RecordSchema(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    struct Rec {
        name: String,
        #[serde(default)]
        schema: RecordSchema,
    }

    #[test]
    fn written_with_the_schema_read_back_old_ones_read_newer_ones_refused() {
        let json = serde_json::to_string(&Rec { name: "a".into(), schema: RecordSchema(0) }).unwrap();
        assert_eq!(json, r#"{"name":"a","schema":1}"#);
        assert_eq!(serde_json::from_str::<Rec>(&json).unwrap().schema, RecordSchema(1));
        assert_eq!(serde_json::from_str::<Rec>(r#"{"name":"old"}"#).unwrap().schema, RecordSchema(0), "no field: schema 0");
        let err = serde_json::from_str::<Rec>(r#"{"name":"new","schema":2}"#).unwrap_err().to_string();
        assert!(err.contains("record schema 2") && err.contains("upgrade holdfast"), "{err}");
    }
}
