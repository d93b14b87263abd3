//! Which ZFS properties holdfast lets the config (`properties`) and StorageClass parameters set
//! on new volumes, and which kind of object each applies to.
//!
//! StorageClass parameters are the properties of [`PARAMETERS`]: tuning that is safe to leave
//! to whoever writes StorageClasses. The config (the node operator) may also set those of
//! [`CONFIG_ONLY`], which cost the whole pool (dedup needs its table in RAM; copies multiplies
//! space) or fix a dataset's behaviour for good. Properties holdfast manages itself (mountpoint,
//! quotas, volsize, reservations, `holdfast:*`) are refused in both, as is anything unknown,
//! naming the key. Values are checked for shape only; zfs judges them (INVALID_ARGUMENT with its
//! message).

/// Which objects a property applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppliesTo {
    /// Datasets and zvols.
    Both,
    /// Filesystem datasets only.
    Filesystem,
    /// Zvols only.
    Volume,
}

/// Properties a StorageClass may set (parameters with these keys).
pub const PARAMETERS: [(&str, AppliesTo); 9] = [
    ("compression", AppliesTo::Both),
    ("recordsize", AppliesTo::Filesystem),
    ("atime", AppliesTo::Filesystem),
    ("volblocksize", AppliesTo::Volume),
    ("checksum", AppliesTo::Both),
    ("logbias", AppliesTo::Both),
    ("sync", AppliesTo::Both),
    ("primarycache", AppliesTo::Both),
    ("secondarycache", AppliesTo::Both),
];

/// Properties only the config may set (besides [`PARAMETERS`]).
pub const CONFIG_ONLY: [(&str, AppliesTo); 8] = [
    ("dedup", AppliesTo::Both),
    ("copies", AppliesTo::Both),
    ("redundant_metadata", AppliesTo::Both),
    ("relatime", AppliesTo::Filesystem),
    ("xattr", AppliesTo::Filesystem),
    ("acltype", AppliesTo::Filesystem),
    ("dnodesize", AppliesTo::Filesystem),
    ("special_small_blocks", AppliesTo::Filesystem),
];

/// Properties that can only be set when a zvol is created (a clone inherits them).
pub const CREATE_ONLY: [&str; 1] = ["volblocksize"];

/// Where a property applies, if StorageClass parameters may set it.
pub fn parameter(key: &str) -> Option<AppliesTo> {
    PARAMETERS.iter().find(|(k, _)| *k == key).map(|(_, a)| *a)
}

/// Where a property applies, if the config may set it.
pub fn config_property(key: &str) -> Option<AppliesTo> {
    parameter(key).or_else(|| CONFIG_ONLY.iter().find(|(k, _)| *k == key).map(|(_, a)| *a))
}

/// Whether a property with `applies` goes on a zvol (`zvol`) or on a filesystem dataset.
pub fn applies(applies: AppliesTo, zvol: bool) -> bool {
    match applies {
        AppliesTo::Both => true,
        AppliesTo::Filesystem => !zvol,
        AppliesTo::Volume => zvol,
    }
}

/// Checks the shape of a value: 1 to 64 of `[A-Za-z0-9._-]` (every value of the allowed
/// properties looks like that: `lz4`, `zstd-3`, `128K`, `on`, `sha256`, `throughput`).
pub fn check_value(key: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty() && value.len() <= 64 && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok { Ok(()) } else { Err(format!("the value {value:?} of ZFS property {key:?} is not a plain word (1-64 of A-Z a-z 0-9 . _ -)")) }
}

/// The keys of a list, for messages.
pub fn keys(list: &[(&str, AppliesTo)]) -> String {
    list.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}
