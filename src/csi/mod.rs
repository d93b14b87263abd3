//! The CSI services (Identity, Controller, Node) over one [`Driver`], and what they share:
//! required-field checks, volume-capability decoding, and the per-call log line.

use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::Arc;
use std::time::Instant;

use tonic::{Response, Status};

use crate::driver::Driver;
use crate::error::{Error, Result, bounded};
use crate::locks::{LockKey, ObjectKind};
use crate::placement::Segments;
use crate::pool::Pool;
use crate::proto;
use crate::proto::volume_capability::access_mode::Mode;

pub mod controller;
pub mod identity;
pub mod node;

/// Access modes a node-local volume supports.
pub const SUPPORTED_MODES: [Mode; 4] =
    [Mode::SingleNodeWriter, Mode::SingleNodeSingleWriter, Mode::SingleNodeMultiWriter, Mode::SingleNodeReaderOnly];

/// Every filesystem type some pool kind serves; which pool serves which is `Pool::filesystems`.
pub const KNOWN_FS: [&str; 5] = ["ext4", "xfs", "btrfs", "zfs", "nfs"];

/// The local object an id names on this driver: its pool and its local name. `None` when the
/// id names nothing here (not an id this driver issues, another node's, an unknown pool). The
/// only place the CSI services turn an id into an object, so a change of the id format changes
/// this function alone; `kind` is what the caller expects the id to name: a volume id never
/// names a snapshot, nor the reverse (legacy ids, without a kind, may name either). Whether the
/// object there is the one the id names (its uid) is for the caller to check on the object.
pub fn object_of(d: &Driver, kind: ObjectKind, id: &str) -> Option<(Arc<dyn Pool>, String)> {
    let vid = crate::volume_id::VolumeId::parse(id)?;
    let fits = match kind {
        ObjectKind::Volume => vid.may_name_volume(),
        ObjectKind::Snapshot => vid.may_name_snapshot(),
    };
    if !fits {
        return None;
    }
    let pool = d.pool_of(&vid)?;
    Some((pool.clone(), vid.local))
}

/// The lock of the object an id names ([`object_of`]); an id that names nothing here is locked
/// by its text, so calls on it (an unstage of a volume whose pool left the config) still
/// serialise.
pub fn lock_key(d: &Driver, kind: ObjectKind, id: &str) -> LockKey {
    match object_of(d, kind, id) {
        Some((pool, local)) => LockKey::new(pool.name(), kind, &local),
        None => LockKey::unresolved(kind, id),
    }
}

/// The locks a create of CSI name `csi_name` takes for its own object: every local name it may
/// find or make ([`crate::volume_id::local_name`]; any other name a retry looks under belongs
/// here too), in every pool, since a retry must find the first attempt wherever it landed.
pub fn name_keys(d: &Driver, kind: ObjectKind, csi_name: &str) -> Vec<LockKey> {
    // A retry may find an object of an earlier version under its legacy local name: held too.
    let locals = [crate::volume_id::local_name(csi_name), crate::volume_id::legacy_local_name(csi_name)];
    d.pools.keys().flat_map(|pool| locals.iter().map(move |local| LockKey::new(pool, kind, local))).collect()
}

/// INVALID_ARGUMENT unless `value` is non-empty.
pub fn require(field: &str, value: &str) -> Result<()> {
    if value.is_empty() { Err(Error::InvalidArgument(format!("{field} is required"))) } else { Ok(()) }
}

/// A request path must be absolute and plain (no `..`, no NUL), so a request can never point
/// the driver somewhere unexpected.
pub fn require_path(field: &str, value: &str) -> Result<()> {
    require(field, value)?;
    let p = Path::new(value);
    if !p.is_absolute() || value.contains('\0') || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(Error::InvalidArgument(format!("{field} {value:?} must be an absolute path without '..'")));
    }
    Ok(())
}

/// A decoded volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// Raw block (true) or mounted filesystem.
    pub block: bool,
    /// Requested filesystem (mount only; empty = the volume's / pool's default).
    pub fs_type: String,
    /// Requested mount flags (mount only).
    pub mount_flags: Vec<String>,
    /// The access mode.
    pub mode: Mode,
}

impl Capability {
    /// Decodes one capability: access type and mode are required.
    pub fn decode(cap: &proto::VolumeCapability) -> Result<Capability> {
        use proto::volume_capability::AccessType;
        let mode = cap
            .access_mode
            .as_ref()
            .and_then(|m| Mode::try_from(m.mode).ok())
            .filter(|m| *m != Mode::Unknown)
            .ok_or_else(|| Error::InvalidArgument("volume_capability.access_mode is required".into()))?;
        match &cap.access_type {
            Some(AccessType::Block(_)) => Ok(Capability { block: true, fs_type: String::new(), mount_flags: vec![], mode }),
            Some(AccessType::Mount(m)) => {
                if !m.fs_type.is_empty() && !KNOWN_FS.contains(&m.fs_type.as_str()) {
                    return Err(Error::InvalidArgument(format!("fs_type {:?} is not supported (one of {KNOWN_FS:?})", m.fs_type)));
                }
                Ok(Capability { block: false, fs_type: m.fs_type.clone(), mount_flags: m.mount_flags.clone(), mode })
            }
            None => Err(Error::InvalidArgument("volume_capability.access_type (block or mount) is required".into())),
        }
    }

    /// Whether a node-local volume can serve this mode.
    pub fn mode_supported(&self) -> bool {
        SUPPORTED_MODES.contains(&self.mode)
    }

    /// Whether a volume of `pool` can serve this mode: every mode on shared pools (filesystem
    /// volumes only), single-node modes elsewhere.
    pub fn supported_by(&self, pool: &dyn crate::pool::Pool) -> bool {
        self.mode_supported() || (pool.multi_node() && !self.block)
    }

    /// Whether the mode only allows reading.
    pub fn read_only_mode(&self) -> bool {
        matches!(self.mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    }
}

/// Decodes a required, non-empty list of capabilities.
pub fn decode_caps(caps: &[proto::VolumeCapability]) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument("volume_capabilities is required".into()));
    }
    caps.iter().map(Capability::decode).collect()
}

/// Decodes the one required capability of node calls.
pub fn decode_cap(cap: Option<&proto::VolumeCapability>) -> Result<Capability> {
    Capability::decode(cap.ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?)
}

/// Topology in the wire form.
pub fn topology(segments: &Segments) -> proto::Topology {
    proto::Topology { segments: segments.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<HashMap<_, _>>() }
}

/// Runs one call and logs it (method, volume id, duration, status code). The id comes from
/// the request, so it is logged [`bounded`]: no forged lines, no 10 KB log lines; the message
/// is logged escaped (Debug), so a newline from a request or a tool's stderr stays on one line.
pub async fn traced<T>(method: &'static str, id: &str, fut: impl Future<Output = Result<T>>) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let res = fut.await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let volume = bounded(id);
    match res {
        Ok(v) => {
            tracing::info!(method, volume = %volume, ms = format_args!("{ms:.1}"), status = "OK");
            Ok(Response::new(v))
        }
        Err(e) => {
            let status = Status::from(e);
            let code = format!("{:?}", status.code());
            let message = status.message();
            if matches!(status.code(), tonic::Code::Internal | tonic::Code::DeadlineExceeded | tonic::Code::Unknown) {
                tracing::error!(method, volume = %volume, ms = format_args!("{ms:.1}"), status = code, message = ?message);
            } else {
                tracing::warn!(method, volume = %volume, ms = format_args!("{ms:.1}"), status = code, message = ?message);
            }
            Err(status)
        }
    }
}

/// Remembers each pool's last known health and logs a line when it changes (not on every
/// check): the liveness probe never sees pool health (Probe answers ready once the pools are
/// open), operators see it here and in volume conditions. Pools call [`HealthLog::note`]
/// wherever they learn their health (a zpool status, a VG lookup, an NFS export check).
#[derive(Default)]
pub struct HealthLog {
    last: std::sync::Mutex<HashMap<String, Option<String>>>,
}

impl HealthLog {
    /// Records `problem` (None = healthy) for `pool`; logs and answers true when it differs
    /// from the last one recorded (the first record of a healthy pool is not a change).
    pub fn note(&self, pool: &str, problem: Option<&str>) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let before = last.get(pool).cloned().flatten();
        let changed = before.as_deref() != problem;
        if changed {
            last.insert(pool.to_owned(), problem.map(str::to_owned));
        }
        drop(last);
        match (changed, problem) {
            (false, _) => {}
            (true, Some(p)) => tracing::warn!(pool, problem = ?p, "pool is unhealthy: its volumes report an abnormal condition"),
            (true, None) => tracing::info!(pool, was = ?before.unwrap_or_default(), "pool is healthy again"),
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};

    fn cap(access: Option<AccessType>, mode: Mode) -> proto::VolumeCapability {
        proto::VolumeCapability { access_type: access, access_mode: Some(AccessMode { mode: mode as i32 }) }
    }

    #[test]
    fn capabilities_decode_or_name_the_missing_part() {
        let mount = |fs: &str| Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }));
        struct Case {
            name: &'static str,
            cap: proto::VolumeCapability,
            want: std::result::Result<bool, &'static str>,
        }
        let cases = [
            Case { name: "block", cap: cap(Some(AccessType::Block(BlockVolume {})), Mode::SingleNodeWriter), want: Ok(true) },
            Case { name: "mount", cap: cap(mount("xfs"), Mode::SingleNodeWriter), want: Ok(false) },
            Case { name: "no type", cap: cap(None, Mode::SingleNodeWriter), want: Err("access_type") },
            Case { name: "no mode", cap: proto::VolumeCapability { access_type: mount(""), access_mode: None }, want: Err("access_mode") },
            Case { name: "unknown mode", cap: cap(mount(""), Mode::Unknown), want: Err("access_mode") },
            Case { name: "bad fs", cap: cap(mount("ntfs"), Mode::SingleNodeWriter), want: Err("ntfs") },
        ];
        for c in cases {
            match (Capability::decode(&c.cap), c.want) {
                (Ok(got), Ok(block)) => assert_eq!(got.block, block, "{}", c.name),
                (Err(e), Err(part)) => assert!(e.to_string().contains(part), "{}: {e}", c.name),
                (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
            }
        }
    }

    #[test]
    fn pool_health_is_logged_once_per_change() {
        let log = HealthLog::default();
        assert!(!log.note("p1", None), "a healthy first check is no change");
        assert!(log.note("p1", Some("zpool tank is DEGRADED")));
        assert!(!log.note("p1", Some("zpool tank is DEGRADED")), "the same problem again is not logged again");
        assert!(log.note("p1", Some("zpool tank is FAULTED")));
        assert!(log.note("p1", None));
        assert!(!log.note("p2", None), "pools are tracked apart");
    }

    #[test]
    fn request_paths_must_be_absolute_and_plain() {
        assert!(require_path("target_path", "/var/lib/kubelet/pods/x").is_ok());
        for bad in ["", "relative/dir", "/a/../etc", "/a/\0b"] {
            assert!(require_path("target_path", bad).is_err(), "{bad:?}");
        }
    }
}
