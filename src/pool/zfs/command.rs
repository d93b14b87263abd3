//! The `zfs` and `zpool` command lines holdfast runs (pure builders, so tests can assert exact
//! argv) and the classification of their failures. Both tools exit 1 for nearly every failure,
//! so each class is recognised by the tool's fixed message (LC_ALL=C), captured from OpenZFS
//! 2.1 in tests/fixtures/zfs/*.err; anything else stays an error with its stderr.

use std::time::Duration;

use crate::exec::{Cmd, ExecError};

use super::report::all_properties;

/// Reads are quick, but wait behind a transaction group sync on a busy pool.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Creates, clones, snapshots, renames and property changes.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(180);
/// Destroying a large dataset frees its blocks before it returns.
pub const DESTROY_TIMEOUT: Duration = Duration::from_secs(600);

/// Object types for `zfs get -t`.
pub const DATASETS: &str = "filesystem,volume";
/// Snapshots only.
pub const SNAPSHOTS: &str = "snapshot";
/// Everything holdfast makes.
pub const ALL: &str = "filesystem,volume,snapshot";

/// `zfs get` of every property holdfast reads, of `target` (`depth` 0) or of it and its
/// descendants down to `depth` levels (a snapshot counts one level below its dataset).
pub fn get(target: &str, types: &str, depth: u32) -> Cmd {
    let mut cmd = Cmd::new("zfs").args(["get", "-H", "-p", "-o", "name,property,value,source"]);
    if depth > 0 {
        cmd = cmd.args(["-r", "-d"]).arg(depth.to_string());
    }
    cmd.args(["-t", types]).arg(all_properties()).arg(target).timeout(READ_TIMEOUT)
}

// issue 14: a ready-to-use volume costs what the raw tools cost
/// `zfs get` of every property holdfast reads, of each of `targets` (depth 0). ZFS reports
/// those that exist and exits 1 with one "cannot open 'T': dataset does not exist" per
/// target that does not ([`missing_targets`]).
pub fn get_each(targets: &[String], types: &str) -> Cmd {
    let cmd = Cmd::new("zfs").args(["get", "-H", "-p", "-o", "name,property,value,source", "-t", types]).arg(all_properties());
    cmd.args(targets.iter().cloned()).timeout(READ_TIMEOUT)
}

/// The targets a failed [`get_each`] names as missing, when that is all its stderr says (and
/// at least one); `None` for any other failure.
pub fn missing_targets(e: &ExecError) -> Option<Vec<String>> {
    let ExecError::Failed { stderr, .. } = e else { return None };
    let missing: Option<Vec<String>> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.strip_prefix("cannot open '")?.strip_suffix("': dataset does not exist").map(str::to_owned))
        .collect();
    missing.filter(|m| !m.is_empty())
}

/// `zfs get` of every property holdfast reads, of `target` and all its descendants of `types`
/// (child datasets and zvols at any depth, and their snapshots).
pub fn get_tree(target: &str, types: &str) -> Cmd {
    Cmd::new("zfs")
        .args(["get", "-H", "-p", "-o", "name,property,value,source", "-r", "-t", types])
        .arg(all_properties())
        .arg(target)
        .timeout(READ_TIMEOUT)
}

/// `zfs get available` of one dataset.
pub fn get_available(dataset: &str) -> Cmd {
    Cmd::new("zfs").args(["get", "-H", "-p", "-o", "value", "available", dataset]).timeout(READ_TIMEOUT)
}

fn with_properties(mut cmd: Cmd, props: &[(String, String)]) -> Cmd {
    for (k, v) in props {
        cmd = cmd.arg("-o").arg(format!("{k}={v}"));
    }
    cmd
}

/// A new filesystem dataset with `props`.
pub fn create_dataset(name: &str, props: &[(String, String)]) -> Cmd {
    with_properties(Cmd::new("zfs").arg("create"), props).arg(name).timeout(CHANGE_TIMEOUT)
}

/// A new zvol of `size` bytes (`sparse`: without a reservation) with `props`.
pub fn create_zvol(name: &str, size: u64, sparse: bool, props: &[(String, String)]) -> Cmd {
    let mut cmd = Cmd::new("zfs").arg("create");
    if sparse {
        cmd = cmd.arg("-s");
    }
    with_properties(cmd.arg("-V").arg(size.to_string()), props).arg(name).timeout(CHANGE_TIMEOUT)
}

/// The parent dataset and any missing ancestors. It is never mounted: volumes are mounted by
/// the node one by one, and nothing should be written beside them.
pub fn create_parent(name: &str) -> Cmd {
    Cmd::new("zfs").args(["create", "-p", "-o", "mountpoint=none"]).arg(name).timeout(CHANGE_TIMEOUT)
}

/// A snapshot `dataset@snap` with `props`.
pub fn snapshot(name: &str, props: &[(String, String)]) -> Cmd {
    with_properties(Cmd::new("zfs").arg("snapshot"), props).arg(name).timeout(CHANGE_TIMEOUT)
}

/// A clone `name` of `origin` (a snapshot) with `props`.
pub fn clone(origin: &str, name: &str, props: &[(String, String)]) -> Cmd {
    with_properties(Cmd::new("zfs").arg("clone"), props).arg(origin).arg(name).timeout(CHANGE_TIMEOUT)
}

/// Sets one property.
pub fn set(name: &str, key: &str, value: &str) -> Cmd {
    Cmd::new("zfs").arg("set").arg(format!("{key}={value}")).arg(name).timeout(CHANGE_TIMEOUT)
}

/// Removes a local (user) property.
pub fn inherit(name: &str, key: &str) -> Cmd {
    Cmd::new("zfs").arg("inherit").arg(key).arg(name).timeout(CHANGE_TIMEOUT)
}

/// Destroys one dataset, zvol or snapshot. Never recursive (`-r` / `-R`): holdfast destroys
/// the snapshots it made one by one first, so whatever someone else made beneath a volume
/// (a child dataset, a snapshot) makes the destroy fail instead of going with it.
pub fn destroy(name: &str) -> Cmd {
    Cmd::new("zfs").arg("destroy").arg(name).timeout(DESTROY_TIMEOUT)
}

/// Destroys a snapshot now, or, while clones depend on it, marks it to be destroyed by ZFS
/// with the last of them.
pub fn destroy_deferred(snapshot: &str) -> Cmd {
    Cmd::new("zfs").args(["destroy", "-d"]).arg(snapshot).timeout(DESTROY_TIMEOUT)
}

/// Renames a dataset, zvol or snapshot.
pub fn rename(from: &str, to: &str) -> Cmd {
    Cmd::new("zfs").arg("rename").arg(from).arg(to).timeout(CHANGE_TIMEOUT)
}

/// The health of one zpool (`ONLINE`, `DEGRADED`, `FAULTED`, …).
pub fn zpool_health(pool: &str) -> Cmd {
    Cmd::new("zpool").args(["list", "-H", "-o", "name,health", pool]).timeout(READ_TIMEOUT)
}

/// What is wrong with one zpool, in words (`-x`: nothing for a healthy pool).
pub fn zpool_status(pool: &str) -> Cmd {
    Cmd::new("zpool").args(["status", "-x", pool]).timeout(READ_TIMEOUT)
}

fn failed_with(e: &ExecError, needles: &[&str]) -> bool {
    e.code() == Some(1) && needles.iter().any(|n| e.stderr().contains(n))
}

/// The object does not exist (`cannot open 'x': dataset does not exist`; `zfs destroy` of a
/// missing snapshot: `could not find any snapshots to destroy`).
pub fn is_missing(e: &ExecError) -> bool {
    failed_with(e, &["dataset does not exist", "could not find any snapshots to destroy"])
}

/// The zpool does not exist or is not imported (`no such pool`).
pub fn is_no_pool(e: &ExecError) -> bool {
    failed_with(e, &["no such pool"])
}

/// The name is taken (`dataset already exists`).
pub fn is_exists(e: &ExecError) -> bool {
    failed_with(e, &["dataset already exists"])
}

/// The parent dataset is missing (`parent does not exist`).
pub fn is_no_parent(e: &ExecError) -> bool {
    failed_with(e, &["parent does not exist"])
}

/// No room (`out of space` on create; `size is greater than available space` on a volsize
/// change).
pub fn is_no_space(e: &ExecError) -> bool {
    failed_with(e, &["out of space", "greater than available space"])
}

/// Mounted or open (`dataset is busy`, `pool or dataset is busy`).
pub fn is_busy(e: &ExecError) -> bool {
    failed_with(e, &["is busy"])
}

/// A dataset or zvol that still has snapshots or children (`filesystem has children`,
/// `volume has children`): something was made beneath it since it was inspected.
pub fn has_children(e: &ExecError) -> bool {
    failed_with(e, &["has children"])
}

/// A snapshot that clones depend on (`snapshot has dependent clones`).
pub fn has_clones(e: &ExecError) -> bool {
    failed_with(e, &["has dependent clones"])
}

/// A property or value zfs refuses: `invalid property 'x'`, `'compression' must be one of …`,
/// `'recordsize' must be power of 2 …`, `bad property value`.
pub fn is_bad_property(e: &ExecError) -> bool {
    failed_with(e, &["invalid property", "' must be ", "bad property value", "property cannot be", "can only be set"])
}
