//! The mutable parameters of zfs volumes (issue 12: ControllerModifyVolume, CreateVolume's
//! `mutable_parameters`): which keys change on a live dataset or zvol, which values `zfs set`
//! takes for each, and the native property each becomes.
//!
//! Keys: the tuning properties `compression`, `recordsize`, `atime`, `logbias`, `sync`,
//! `primarycache`, `secondarycache`, `checksum` (a new value applies to blocks written from then
//! on: ZFS never rewrites what is on disk), and `provisioning` = `thin` | `thick`, which is the
//! volume's `refreservation` (thick: a zvol reserves `auto`, its volsize plus metadata; a dataset
//! reserves its capacity; thin: `none`). `recordsize` and `atime` do not exist on zvols, and a
//! zvol's `volblocksize` is fixed when it is created: asking for them is INVALID_ARGUMENT naming
//! the key, as is any other key. Values are checked against the lists `zfs set` accepts, so a
//! typo is refused before anything changes.

use crate::error::{Error, Result};

/// The mutable keys of zfs volumes.
pub const KEYS: [&str; 9] =
    ["compression", "recordsize", "atime", "logbias", "sync", "primarycache", "secondarycache", "checksum", "provisioning"];

/// The key choosing the reservation.
pub const PROVISIONING: &str = "provisioning";

/// Checks `key=value` for a zvol (`zvol`) or a filesystem dataset; INVALID_ARGUMENT naming the
/// key when it cannot be changed there or `zfs set` would refuse the value.
pub fn check(key: &str, value: &str, zvol: bool) -> Result<()> {
    let bad = |accepted: &str| {
        Err(Error::InvalidArgument(format!(
            "mutable parameter {key}={} is not a value zfs takes ({accepted})",
            crate::error::bounded(value)
        )))
    };
    let one_of = |list: &[&str]| if list.contains(&value) { Ok(()) } else { bad(&format!("one of {}", list.join(", "))) };
    match key {
        "compression" => {
            if compression_ok(value) {
                Ok(())
            } else {
                bad("on, off, lz4, lzjb, zle, gzip, gzip-1..9, zstd, zstd-1..19, zstd-fast, zstd-fast-1..10, 20..100 by 10, 500, 1000")
            }
        }
        "recordsize" | "atime" if zvol => Err(Error::InvalidArgument(format!(
            "mutable parameter {key} does not apply to a zvol (a raw block or ext4/xfs/btrfs volume of a zfs pool); \
             its block size is volblocksize, fixed when the zvol is created"
        ))),
        "recordsize" => match parse_size(value) {
            Some(n) if n.is_power_of_two() && (512..=16 << 20).contains(&n) => Ok(()),
            _ => bad("a power of two from 512 to 16M, e.g. 128K"),
        },
        "atime" => one_of(&["on", "off"]),
        "logbias" => one_of(&["latency", "throughput"]),
        "sync" => one_of(&["standard", "always", "disabled"]),
        "primarycache" | "secondarycache" => one_of(&["all", "none", "metadata"]),
        "checksum" => one_of(&["on", "off", "fletcher2", "fletcher4", "sha256", "sha512", "skein", "edonr", "blake3"]),
        PROVISIONING => one_of(&["thin", "thick"]),
        "volblocksize" => Err(Error::InvalidArgument(
            "mutable parameter volblocksize cannot change: a zvol's volblocksize is fixed when it is created (set it as a \
             StorageClass parameter)"
                .into(),
        )),
        _ => Err(crate::pool::not_mutable(crate::volume_id::PoolKind::Zfs, key, &KEYS)),
    }
}

/// The native property and value `key=value` (checked) sets on a volume of `capacity` bytes.
pub fn native(key: &str, value: &str, zvol: bool, capacity: u64) -> (String, String) {
    match (key, value) {
        (PROVISIONING, "thick") if zvol => ("refreservation".into(), "auto".into()),
        (PROVISIONING, "thick") => ("refreservation".into(), capacity.to_string()),
        (PROVISIONING, _) => ("refreservation".into(), "none".into()),
        _ => (key.to_owned(), value.to_owned()),
    }
}

/// Puts `extra` into `props`, replacing a property of the same name (`zfs create` refuses a
/// property given twice).
pub fn merge(props: &mut Vec<(String, String)>, extra: Vec<(String, String)>) {
    for (k, v) in extra {
        props.retain(|(have, _)| *have != k);
        props.push((k, v));
    }
}

fn compression_ok(v: &str) -> bool {
    let level = |s: &str, range: std::ops::RangeInclusive<u32>| s.parse::<u32>().is_ok_and(|n| range.contains(&n));
    match v {
        "on" | "off" | "lz4" | "lzjb" | "zle" | "gzip" | "zstd" | "zstd-fast" => true,
        _ => {
            if let Some(n) = v.strip_prefix("gzip-") {
                level(n, 1..=9)
            } else if let Some(n) = v.strip_prefix("zstd-fast-") {
                level(n, 1..=10) || ["20", "30", "40", "50", "60", "70", "80", "90", "100", "500", "1000"].contains(&n)
            } else if let Some(n) = v.strip_prefix("zstd-") {
                level(n, 1..=19)
            } else {
                false
            }
        }
    }
}

/// `131072`, `128K`, `128k`, `1M`: bytes, as zfs reads sizes (no fractions).
fn parse_size(v: &str) -> Option<u64> {
    let (digits, mult) = match v.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (v, 1),
        Some((i, _)) => {
            let m = match &v[i..] {
                "K" | "k" | "KB" | "KiB" => 1 << 10,
                "M" | "m" | "MB" | "MiB" => 1 << 20,
                _ => return None,
            };
            (&v[..i], m)
        }
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_as_zfs_set_would() {
        struct Case {
            key: &'static str,
            value: &'static str,
            zvol: bool,
            ok: bool,
        }
        let c = |key, value, zvol, ok| Case { key, value, zvol, ok };
        let cases = [
            c("compression", "lz4", false, true),
            c("compression", "zstd-19", true, true),
            c("compression", "zstd-20", false, false),
            c("compression", "zstd-fast-500", false, true),
            c("compression", "gzip-0", false, false),
            c("compression", "LZ4", false, false),
            c("recordsize", "128K", false, true),
            c("recordsize", "1M", false, true),
            c("recordsize", "4096", false, true),
            c("recordsize", "100K", false, false),
            c("recordsize", "256", false, false),
            c("recordsize", "128K", true, false),
            c("atime", "off", false, true),
            c("atime", "off", true, false),
            c("logbias", "throughput", true, true),
            c("sync", "disabled", false, true),
            c("sync", "never", false, false),
            c("primarycache", "metadata", true, true),
            c("secondarycache", "some", false, false),
            c("checksum", "sha256", false, true),
            c("checksum", "md5", false, false),
            c("provisioning", "thick", true, true),
            c("provisioning", "fat", false, false),
            c("volblocksize", "16K", true, false),
            c("dedup", "on", false, false),
            c("quota", "1G", false, false),
        ];
        for c in cases {
            let got = check(c.key, c.value, c.zvol);
            assert_eq!(got.is_ok(), c.ok, "{}={} zvol={}: {got:?}", c.key, c.value, c.zvol);
            if let Err(e) = got {
                assert!(matches!(&e, Error::InvalidArgument(m) if m.contains(c.key)), "{e}");
            }
        }
    }

    #[test]
    fn provisioning_is_the_reservation() {
        assert_eq!(native("provisioning", "thick", true, 1 << 30), ("refreservation".into(), "auto".into()));
        assert_eq!(native("provisioning", "thick", false, 1 << 30), ("refreservation".into(), (1u64 << 30).to_string()));
        assert_eq!(native("provisioning", "thin", false, 1 << 30), ("refreservation".into(), "none".into()));
        assert_eq!(native("compression", "lz4", false, 1), ("compression".into(), "lz4".into()));
        let mut p = vec![("refreservation".to_owned(), "auto".to_owned()), ("atime".to_owned(), "on".to_owned())];
        merge(&mut p, vec![("refreservation".into(), "none".into())]);
        assert_eq!(p, vec![("atime".to_owned(), "on".to_owned()), ("refreservation".to_owned(), "none".to_owned())]);
    }
}
