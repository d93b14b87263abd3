//! CSI Controller: create, delete, list, expand and snapshot volumes. Each handler validates the
//! request, takes the per-name or per-volume lock, then delegates to the pool that owns the
//! object. Placement of new volumes is `crate::placement`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Capability, decode_caps, lock_key, name_keys, require, topology, traced};
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::jobs::{self, Work};
use crate::locks::{LockKey, ObjectKind};
use crate::placement::{self, Candidate, Segments};
use crate::pool::{self, CreateRequest, Pool, SnapshotInfo, Source, VolumeInfo};
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self, rpc};
use crate::proto::volume_content_source::{self, SnapshotSource, VolumeSource};
use crate::proto::*;
use crate::volume_id::{Object, PoolKind, VolumeId, legacy_local_name, local_name, new_uid};

/// Capacity of a volume whose request gives no capacity range.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;

/// Volume context key: the filesystem chosen at creation.
pub const CTX_FS_TYPE: &str = "holdfast.dev/fs-type";
/// Volume context key: the pool.
pub const CTX_POOL: &str = "holdfast.dev/pool";

/// Parameters the CSI layer handles itself.
const PARAM_POOL: &str = "pool";
const PARAM_KIND: &str = "kind";
const PARAM_FS: [&str; 2] = ["csi.storage.k8s.io/fstype", "fsType"];
/// Keys the external-provisioner adds (`--extra-create-metadata`, secrets references).
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

/// The Controller service.
pub struct ControllerService {
    d: Arc<Driver>,
    /// What calls that fan out over every pool last saw of each one: why it is sick, and the
    /// volumes its last good listing had (shown as abnormal while it is sick).
    health: Mutex<BTreeMap<String, PoolHealth>>,
}

/// One pool as the fan-out calls last saw it.
#[derive(Debug, Default)]
struct PoolHealth {
    /// Why the last call failed; `None` while it answers.
    sick: Option<String>,
    /// Its volumes at its last good listing.
    listed: Vec<VolumeInfo>,
}

impl ControllerService {
    /// Serves the controller for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerService { d: driver, health: Mutex::new(BTreeMap::new()) }
    }

    /// Records that `pool` answered; logs when it was sick until now.
    fn answered(&self, pool: &dyn Pool) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(was) = h.entry(pool.name().to_owned()).or_default().sick.take() {
            tracing::info!(pool = pool.name(), was = %was, "pool answers again");
        }
    }

    /// Records that `pool` failed with `e`, so the call goes on without it; logs when it was
    /// healthy until now (one line per change, not one per call).
    fn failed(&self, pool: &dyn Pool, e: &Error) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let entry = h.entry(pool.name().to_owned()).or_default();
        if entry.sick.is_none() {
            tracing::warn!(pool = pool.name(), error = %e, "pool does not answer; calls over all pools go on without it");
        }
        entry.sick = Some(e.to_string());
    }
}

/// The capacity to allocate for a range: `required` rounded up to whole MiB (default when no
/// range), which must not exceed `limit`.
pub fn capacity_for(range: Option<&CapacityRange>, default: u64) -> Result<u64> {
    let (required, limit) = range.map(|r| (r.required_bytes, r.limit_bytes)).unwrap_or((0, 0));
    if required < 0 || limit < 0 {
        return Err(Error::InvalidArgument(format!("capacity_range must not be negative (required {required}, limit {limit})")));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && limit < required {
        return Err(Error::OutOfRange(format!("capacity_range limit_bytes {limit} is below required_bytes {required}")));
    }
    let want = if required > 0 {
        pool::round_up_mib(required)
    } else if limit > 0 {
        // Only a ceiling: the default if it fits, else the largest whole MiB under the limit.
        default.min(limit / pool::MIB * pool::MIB)
    } else {
        default
    };
    if want == 0 || (limit != 0 && want > limit) {
        return Err(Error::OutOfRange(format!(
            "no capacity in whole MiB fits required_bytes {required} and limit_bytes {limit}: volumes are allocated in units of 1 MiB"
        )));
    }
    Ok(want)
}

/// Splits a list sorted by key into one page: entries from `token` on (a token is the key of
/// the first entry of the next page), at most `max` of them (0 = all).
pub fn paginate<T>(mut items: Vec<(String, T)>, max: i32, token: &str) -> Result<(Vec<T>, String)> {
    if max < 0 {
        return Err(Error::InvalidArgument(format!("max_entries {max} must not be negative")));
    }
    if !token.is_empty() && VolumeId::parse(token).is_none() {
        return Err(Error::Aborted(format!("starting_token {token:?} is not a token this driver issued; start the listing again")));
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let start = items.partition_point(|(k, _)| k.as_str() < token);
    let mut rest: Vec<(String, T)> = items.into_iter().skip(start).collect();
    let mut next = String::new();
    if max > 0 && rest.len() > max as usize {
        next = rest[max as usize].0.clone();
        rest.truncate(max as usize);
    }
    Ok((rest.into_iter().map(|(_, v)| v).collect(), next))
}

/// The smallest volume a pool allocating in `unit` bytes can make with filesystem `fs` (none:
/// raw block): the filesystem's minimum, rounded up to whole units.
pub fn minimum_size(fs: Option<&str>, unit: u64) -> u64 {
    let unit = unit.max(1);
    let min = fs.map(crate::node::format::min_size).unwrap_or(pool::MIB).max(unit);
    min.div_ceil(unit) * unit
}

fn timestamp(secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: secs, nanos: 0 }
}

impl ControllerService {
    /// The pools a request's parameters select, with the pool-specific parameters checked.
    fn selected_pools(&self, params: &HashMap<String, String>) -> Result<Vec<Arc<dyn Pool>>> {
        let kind = params.get(PARAM_KIND).map(|k| k.parse::<PoolKind>()).transpose()?;
        let name = params.get(PARAM_POOL);
        if let Some(n) = name {
            if !self.d.pools.contains_key(n) {
                return Err(Error::InvalidArgument(format!(
                    "parameter pool={n:?} names no configured pool (configured: {})",
                    self.d.pools.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let pools: Vec<_> =
            self.d.pools.values().filter(|p| name.is_none_or(|n| p.name() == n) && kind.is_none_or(|k| p.kind() == k)).cloned().collect();
        for key in params.keys() {
            let ours = key == PARAM_POOL || key == PARAM_KIND || PARAM_FS.contains(&key.as_str()) || key.starts_with(PROVISIONER_PREFIX);
            if !ours && !pools.iter().any(|p| p.accepts_parameter(key)) {
                return Err(Error::InvalidArgument(format!("unknown parameter {key:?}: check the StorageClass parameters")));
            }
        }
        Ok(pools)
    }

    fn volume_message(&self, pool: &dyn Pool, v: &VolumeInfo) -> Volume {
        let source = v.source.as_ref().map(|s| {
            let t = match s {
                Source::Snapshot(l) => volume_content_source::Type::Snapshot(SnapshotSource {
                    snapshot_id: self.d.object_id(pool, l, Object::Snapshot, v.source_uid.as_deref()).to_string(),
                }),
                Source::Volume(l) => volume_content_source::Type::Volume(VolumeSource {
                    volume_id: self.d.object_id(pool, l, Object::Volume, v.source_uid.as_deref()).to_string(),
                }),
            };
            VolumeContentSource { r#type: Some(t) }
        });
        let mut ctx = HashMap::from([(CTX_POOL.to_owned(), pool.name().to_owned())]);
        if let Some(fs) = &v.fs_type {
            ctx.insert(CTX_FS_TYPE.to_owned(), fs.clone());
        }
        Volume {
            volume_id: self.d.volume_id(pool, v).to_string(),
            capacity_bytes: v.capacity as i64,
            volume_context: ctx,
            content_source: source,
            // No segments: reachable from everywhere, which CSI says with an empty list.
            accessible_topology: Some(self.pool_segments(pool)).filter(|s| !s.is_empty()).iter().map(topology).collect(),
        }
    }

    /// Where a pool's volumes are reachable: its own topology (shared pools) or this node.
    fn pool_segments(&self, pool: &dyn Pool) -> Segments {
        pool.topology().unwrap_or_else(|| self.d.segments.clone())
    }

    fn snapshot_message(&self, pool: &dyn Pool, s: &SnapshotInfo) -> Snapshot {
        Snapshot {
            size_bytes: s.size as i64,
            snapshot_id: self.d.snapshot_id(pool, s).to_string(),
            source_volume_id: self.d.object_id(pool, &s.source_volume, Object::Volume, s.source_uid.as_deref()).to_string(),
            creation_time: Some(timestamp(s.created)),
            ready_to_use: s.ready,
            group_snapshot_id: String::new(),
        }
    }

    /// Resolves a volume id to its pool and volume; NOT_FOUND when either is missing, when the
    /// id is a snapshot's, or when the volume under that name is another one (another uid).
    async fn find_volume(&self, id: &str) -> Result<(Arc<dyn Pool>, VolumeInfo)> {
        let missing = || Error::NotFound(format!("volume {} does not exist", crate::error::bounded(id)));
        let vid = VolumeId::parse(id).filter(VolumeId::may_name_volume).ok_or_else(missing)?;
        let pool = self.d.pool_of(&vid).ok_or_else(missing)?.clone();
        let v = pool.get_volume(&vid.local).await?.filter(|v| vid.names_volume(v.uid.as_deref())).ok_or_else(missing)?;
        Ok((pool, v))
    }

    /// As [`Self::find_volume`], for snapshot ids.
    async fn find_snapshot(&self, id: &str) -> Result<(Arc<dyn Pool>, SnapshotInfo)> {
        let missing = || Error::NotFound(format!("snapshot {} does not exist", crate::error::bounded(id)));
        let sid = VolumeId::parse(id).filter(VolumeId::may_name_snapshot).ok_or_else(missing)?;
        let pool = self.d.pool_of(&sid).ok_or_else(missing)?.clone();
        let s = pool.get_snapshot(&sid.local).await?.filter(|s| sid.names_snapshot(s.uid.as_deref())).ok_or_else(missing)?;
        Ok((pool, s))
    }

    /// The volume a retried create of `csi_name` may find in `pool`: under its local name, or
    /// under the name earlier versions derived when it was made for this very CSI name.
    async fn volume_named(&self, pool: &dyn Pool, csi_name: &str, local: &str) -> Result<Option<VolumeInfo>> {
        if let Some(v) = pool.get_volume(local).await? {
            return Ok(Some(v));
        }
        let legacy = legacy_local_name(csi_name);
        if legacy == local {
            return Ok(None);
        }
        Ok(pool.get_volume(&legacy).await?.filter(|v| v.csi_name == csi_name))
    }

    /// As [`Self::volume_named`], for snapshots.
    async fn snapshot_named(&self, pool: &dyn Pool, csi_name: &str, local: &str) -> Result<Option<SnapshotInfo>> {
        if let Some(s) = pool.get_snapshot(local).await? {
            return Ok(Some(s));
        }
        let legacy = legacy_local_name(csi_name);
        if legacy == local {
            return Ok(None);
        }
        Ok(pool.get_snapshot(&legacy).await?.filter(|s| s.csi_name == csi_name))
    }

    /// CreateVolume, waiting for a copy the default time.
    #[cfg(test)]
    async fn create(&self, req: CreateVolumeRequest) -> Result<CreateVolumeResponse> {
        self.create_within(req, jobs::DEFAULT_WAIT).await
    }

    /// CreateVolume; a copy is waited for at most `budget` (the request's deadline).
    async fn create_within(&self, req: CreateVolumeRequest, budget: Duration) -> Result<CreateVolumeResponse> {
        require("name", &req.name)?;
        let caps = decode_caps(&req.volume_capabilities)?;
        let block = caps[0].block;
        if caps.iter().any(|c| c.block != block) {
            return Err(Error::InvalidArgument("volume_capabilities mix block and mount access types".into()));
        }
        let mut capacity = capacity_for(req.capacity_range.as_ref(), DEFAULT_CAPACITY)?;
        let mut pools = self.selected_pools(&req.parameters)?;
        if let Some(c) = caps.iter().find(|c| !pools.iter().any(|p| c.supported_by(p.as_ref()))) {
            return Err(Error::InvalidArgument(format!(
                "access mode {} is not supported by the selected pools{}",
                c.mode.as_str_name(),
                if c.block { " for raw block volumes" } else { " (multi-node modes need a shared pool such as nfs)" }
            )));
        }
        pools.retain(|p| caps.iter().all(|c| c.supported_by(p.as_ref())));
        let fs_param = PARAM_FS.iter().find_map(|k| req.parameters.get(*k)).cloned();
        let fs_cap = caps.iter().map(|c| c.fs_type.clone()).find(|f| !f.is_empty());
        if let (Some(a), Some(b)) = (&fs_param, &fs_cap) {
            if a != b {
                return Err(Error::InvalidArgument(format!("the fstype parameter {a:?} contradicts the mount capability's fs_type {b:?}")));
            }
        }
        let fs_req = fs_cap.or(fs_param);
        if let Some(fs) = fs_req.as_deref().filter(|_| !block) {
            if !pools.iter().any(|p| p.filesystems().contains(&fs)) {
                return Err(Error::InvalidArgument(format!("fstype {fs:?} is not served by the selected pools")));
            }
            pools.retain(|p| p.filesystems().contains(&fs));
        }

        let local = local_name(&req.name);
        let asked = CreateVolumeRequest { secrets: HashMap::new(), ..req.clone() };
        // A copy an earlier attempt started may still run, detached: wait for it, then answer
        // from what it made, as for any retry.
        if let Some(job) = self.d.jobs.find(&jobs::volume_key(&local)) {
            if job.work().csi_name() == req.name && job.started_for(&asked) {
                self.d.jobs.wait(&job, budget).await?;
            } else if !job.ended() {
                return Err(Error::Aborted(format!(
                    "volume {} is being copied for another request; retry when it has finished",
                    crate::error::bounded(&req.name)
                )));
            }
        }
        // The new volume's local name (in every pool, where a retry looks for it) and the source
        // object: no delete, expand, snapshot or stage of the source runs while it is copied.
        let source_key = match req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            Some(volume_content_source::Type::Snapshot(s)) => Some(lock_key(&self.d, ObjectKind::Snapshot, &s.snapshot_id)),
            Some(volume_content_source::Type::Volume(v)) => Some(lock_key(&self.d, ObjectKind::Volume, &v.volume_id)),
            None => None,
        };
        let guard = self.d.locks.try_lock_all(name_keys(&self.d, ObjectKind::Volume, &req.name).into_iter().chain(source_key))?;

        // The source pins the pool: copies are made inside the pool that holds the source.
        let (source, min_size) = match req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            Some(volume_content_source::Type::Snapshot(s)) => {
                require("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
                let (p, snap) = self.find_snapshot(&s.snapshot_id).await?;
                pools.retain(|c| c.name() == p.name());
                (Some((Source::Snapshot(snap.local), snap.uid)), snap.size)
            }
            Some(volume_content_source::Type::Volume(v)) => {
                require("volume_content_source.volume.volume_id", &v.volume_id)?;
                let (p, vol) = self.find_volume(&v.volume_id).await?;
                if vol.block != block {
                    return Err(Error::InvalidArgument(format!("source volume {} is not of the requested access type", v.volume_id)));
                }
                pools.retain(|c| c.name() == p.name());
                (Some((Source::Volume(vol.local), vol.uid)), vol.capacity)
            }
            None => (None, 0),
        };
        let (source, source_uid) = source.unzip();
        let source_uid = source_uid.flatten();
        if capacity < min_size {
            let required = req.capacity_range.map(|r| r.required_bytes).unwrap_or(0);
            if required > 0 {
                return Err(Error::OutOfRange(format!("requested {capacity} bytes is smaller than the source ({min_size} bytes)")));
            }
            capacity = min_size;
        }

        // A retry must find what the first attempt made, wherever it landed. A pool that cannot
        // be asked is passed over here; whether that may hide the first attempt is decided
        // once the candidates are known.
        let mut unasked: Vec<(String, Error)> = Vec::new();
        for pool in self.d.pools.values() {
            let v = match self.volume_named(pool.as_ref(), &req.name, &local).await {
                Ok(Some(v)) => v,
                Ok(None) => {
                    self.answered(pool.as_ref());
                    continue;
                }
                Err(e) => {
                    self.failed(pool.as_ref(), &e);
                    unasked.push((pool.name().to_owned(), e));
                    continue;
                }
            };
            self.answered(pool.as_ref());
            if v.csi_name != req.name {
                return Err(Error::AlreadyExists(format!(
                    "local name {local} in pool {} is taken by volume {:?}",
                    pool.name(),
                    v.csi_name
                )));
            }
            let limit = req.capacity_range.map(|r| r.limit_bytes as u64).unwrap_or(0);
            let want_fs = if block { None } else { Some(fs_req.clone().unwrap_or_else(|| pool.default_fs().to_owned())) };
            // What this request would ask of that pool; any existing size from `capacity` up to
            // the limit answers it (the pool may have rounded up, or it was expanded since).
            let asked = CreateRequest {
                csi_name: req.name.clone(),
                local: v.local.clone(),
                capacity,
                block,
                fs_type: want_fs,
                source: source.clone(),
                parameters: accepted_parameters(pool.as_ref(), &req.parameters),
                limit: if limit == 0 { u64::MAX } else { limit },
                uid: String::new(),
                source_uid: source_uid.clone(),
            };
            let mut differences = v.conflicts_with(&asked);
            // The pool/kind parameters, the access modes and the filesystem select the pools a
            // volume may live in: one found elsewhere was made for another request.
            if !pools.iter().any(|p| p.name() == pool.name()) {
                differences
                    .push(format!("it lives in pool {}, which this request's parameters and capabilities do not select", pool.name()));
            }
            if !differences.is_empty() {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} already exists and is incompatible with this request: {}",
                    req.name,
                    differences.join("; ")
                )));
            }
            return Ok(CreateVolumeResponse { volume: Some(self.volume_message(pool.as_ref(), &v)) });
        }

        let requisite: Vec<Segments> = req
            .accessibility_requirements
            .as_ref()
            .map(|t| t.requisite.iter().map(|s| s.segments.clone().into_iter().collect()).collect())
            .unwrap_or_default();
        let preferred: Vec<Segments> = req
            .accessibility_requirements
            .as_ref()
            .map(|t| t.preferred.iter().map(|s| s.segments.clone().into_iter().collect()).collect())
            .unwrap_or_default();
        if pools.is_empty() {
            return Err(Error::InvalidArgument("no configured pool matches the pool/kind parameters".into()));
        }
        pools.retain(|p| placement::reachable(&self.pool_segments(p.as_ref()), p.multi_node(), &requisite));
        if pools.is_empty() {
            return Err(Error::ResourceExhausted(format!(
                "no pool of node {} lies inside the requested topology; this driver places volumes only on its own pools",
                self.d.node_id
            )));
        }
        // A candidate that could not be asked for the name may hold the first attempt of this
        // very request: creating elsewhere could make a second volume. Retryable.
        if let Some((name, e)) = unasked.iter().find(|(n, _)| pools.iter().any(|p| p.name() == n)) {
            return Err(Error::Unavailable(format!(
                "pool {name} cannot be asked whether volume {} already exists ({e}); retry when it answers, or select another pool \
                 with the pool parameter",
                crate::error::bounded(&req.name)
            )));
        }
        let mut candidates = Vec::new();
        let mut sick = Vec::new();
        for p in &pools {
            match p.capacity().await {
                Ok(free) => {
                    self.answered(p.as_ref());
                    candidates.push(Candidate { pool: p.name().to_owned(), segments: self.pool_segments(p.as_ref()), free });
                }
                // It answered the lookup, so the volume is not there: placing elsewhere is safe.
                Err(e) => {
                    self.failed(p.as_ref(), &e);
                    sick.push(format!("{}: {e}", p.name()));
                }
            }
        }
        if candidates.is_empty() {
            return Err(Error::Unavailable(format!("no candidate pool can tell its free space: {}", sick.join("; "))));
        }
        let fits: Vec<Candidate> = candidates.iter().filter(|c| c.free >= capacity).cloned().collect();
        let Some(choice) = placement::order(fits, &preferred).into_iter().next() else {
            let best = candidates.iter().map(|c| c.free).max().unwrap_or(0);
            return Err(Error::ResourceExhausted(format!(
                "no pool has room for {} (the most any pool can give is {}); free space in a pool or ask for less",
                crate::config::format_size(capacity),
                crate::config::format_size(best)
            )));
        };
        let pool = self.d.pools[&choice.pool].clone();
        let limit = req.capacity_range.map(|r| r.limit_bytes as u64).unwrap_or(0);
        let fs_type = if block { None } else { Some(fs_req.unwrap_or_else(|| pool.default_fs().to_owned())) };
        // The filesystem's minimum first, then the pool's allocation unit; neither may pass the limit.
        if let Some(fs) = &fs_type {
            let min = crate::node::format::min_size(fs);
            if capacity < min {
                if limit != 0 && limit < min {
                    return Err(Error::OutOfRange(format!(
                        "{fs} needs at least {} but limit_bytes is {limit}; raise the limit or choose ext4",
                        crate::config::format_size(min)
                    )));
                }
                capacity = min;
            }
        }
        let unit = pool.allocation_unit().await?.max(1);
        capacity = capacity.div_ceil(unit) * unit;
        if limit != 0 && capacity > limit {
            return Err(Error::OutOfRange(format!(
                "pool {} allocates in units of {}, so no size fits between required_bytes and limit_bytes {limit}",
                pool.name(),
                crate::config::format_size(unit)
            )));
        }
        let creq = CreateRequest {
            csi_name: req.name.clone(),
            local: local.clone(),
            capacity,
            block,
            fs_type,
            source,
            parameters: accepted_parameters(pool.as_ref(), &req.parameters),
            limit,
            uid: new_uid(),
            source_uid,
        };
        if creq.source.is_none() {
            let v = pool.create_volume(&creq).await?;
            drop(guard);
            return Ok(CreateVolumeResponse { volume: Some(self.volume_message(pool.as_ref(), &v)) });
        }
        // A copy may outlast this request's deadline: it runs detached, holding the lock.
        let work = Work::Volume { pool: pool.name().to_owned(), request: creq };
        let job = self.d.start_copy(pool.clone(), work, Some(Box::new(asked)), guard).await?;
        self.d.jobs.wait(&job, budget).await?;
        let missing = || Error::Internal(format!("the copy {local} vanished right after it was made"));
        let v = pool.get_volume(&local).await?.ok_or_else(missing)?;
        Ok(CreateVolumeResponse { volume: Some(self.volume_message(pool.as_ref(), &v)) })
    }

    async fn delete(&self, req: DeleteVolumeRequest) -> Result<DeleteVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        // An id we could never have issued names nothing: deleting nothing succeeds (spec).
        // A snapshot id names no volume: nothing to delete.
        let Some(vid) = VolumeId::parse(&req.volume_id).filter(VolumeId::may_name_volume) else { return Ok(DeleteVolumeResponse {}) };
        let Some(pool) = self.d.pool_of(&vid).cloned() else {
            if vid.node.as_deref().is_some_and(|n| n != self.d.node_id) && self.d.pools.contains_key(&vid.pool) {
                return Err(Error::Unavailable(format!(
                    "volume {} lives on node {}, and this instance serves node {}; send the request to that node's driver",
                    req.volume_id,
                    vid.node.as_deref().unwrap_or("-"),
                    self.d.node_id
                )));
            }
            return Ok(DeleteVolumeResponse {});
        };
        let _guard = self.d.locks.try_lock(LockKey::new(pool.name(), ObjectKind::Volume, &vid.local))?;
        // The volume under that name may be another one (deleted and created again): left alone.
        // A record that cannot be read stops a current id (its uid cannot be checked); a legacy
        // id is deleted as before, the pool's delete deciding.
        match pool.get_volume(&vid.local).await {
            Ok(Some(v)) if !vid.names_volume(v.uid.as_deref()) => return Ok(DeleteVolumeResponse {}),
            Err(e) if vid.tag.is_some() => return Err(e),
            _ => {}
        }
        pool.delete_volume(&vid.local).await?;
        Ok(DeleteVolumeResponse {})
    }

    async fn validate(&self, req: ValidateVolumeCapabilitiesRequest) -> Result<ValidateVolumeCapabilitiesResponse> {
        require("volume_id", &req.volume_id)?;
        let caps = decode_caps(&req.volume_capabilities)?;
        let (pool, v) = self.find_volume(&req.volume_id).await?;
        let unsupported = caps.iter().find(|c: &&Capability| !c.supported_by(pool.as_ref()) || c.block != v.block);
        if let Some(c) = unsupported {
            let why = if c.block != v.block {
                format!("volume is a {} volume", if v.block { "block" } else { "filesystem" })
            } else {
                format!("access mode {} is not supported", c.mode.as_str_name())
            };
            return Ok(ValidateVolumeCapabilitiesResponse { confirmed: None, message: why });
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    async fn condition_of(&self, pool: &dyn Pool, local: &str) -> Result<VolumeCondition> {
        let condition = pool.condition(local).await?;
        // A freeze left open past its deadline (crate::node::freeze) makes a healthy pool's
        // volume abnormal: its writers may be blocked.
        if condition == pool::Condition::Healthy {
            if let Some(m) = self.d.freezer.stuck_message(pool.name(), local).await {
                return Ok(VolumeCondition { abnormal: true, message: m });
            }
        }
        Ok(match condition {
            pool::Condition::Healthy => VolumeCondition { abnormal: false, message: "volume is healthy".into() },
            pool::Condition::Abnormal(m) => VolumeCondition { abnormal: true, message: m },
        })
    }

    async fn list(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse> {
        let mut items = Vec::new();
        for pool in self.d.pools.values() {
            let volumes = match pool.list_volumes().await {
                Ok(v) => {
                    self.answered(pool.as_ref());
                    self.health.lock().unwrap_or_else(|e| e.into_inner()).entry(pool.name().to_owned()).or_default().listed = v.clone();
                    v
                }
                // A sick pool does not fail the listing: the volumes it had last time are listed
                // as abnormal (none after a restart), the other pools answer as usual.
                Err(e) => {
                    self.failed(pool.as_ref(), &e);
                    let cond = VolumeCondition { abnormal: true, message: format!("pool {} does not answer: {e}", pool.name()) };
                    let listed = self.health.lock().unwrap_or_else(|e| e.into_inner()).get(pool.name()).map(|h| h.listed.clone());
                    for v in listed.unwrap_or_default() {
                        let msg = self.volume_message(pool.as_ref(), &v);
                        items.push((msg.volume_id.clone(), (msg, cond.clone())));
                    }
                    continue;
                }
            };
            for v in volumes {
                let msg = self.volume_message(pool.as_ref(), &v);
                let cond = match self.condition_of(pool.as_ref(), &v.local).await {
                    Ok(c) => c,
                    // Deleted since the pool listed it: it is simply not in this listing.
                    Err(Error::NotFound(_)) => continue,
                    Err(e) => VolumeCondition { abnormal: true, message: format!("the condition cannot be read: {e}") },
                };
                items.push((msg.volume_id.clone(), (msg, cond)));
            }
        }
        let (page, next_token) = paginate(items, req.max_entries, &req.starting_token)?;
        let entries = page
            .into_iter()
            .map(|(volume, cond)| list_volumes_response::Entry {
                volume: Some(volume),
                status: Some(list_volumes_response::VolumeStatus { published_node_ids: vec![], volume_condition: Some(cond) }),
            })
            .collect();
        Ok(ListVolumesResponse { entries, next_token })
    }

    async fn get_volume(&self, req: ControllerGetVolumeRequest) -> Result<ControllerGetVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let (pool, v) = self.find_volume(&req.volume_id).await?;
        let cond = self.condition_of(pool.as_ref(), &v.local).await?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(self.volume_message(pool.as_ref(), &v)),
            status: Some(controller_get_volume_response::VolumeStatus { published_node_ids: vec![], volume_condition: Some(cond) }),
        })
    }

    async fn capacity(&self, req: GetCapacityRequest) -> Result<GetCapacityResponse> {
        let caps = if req.volume_capabilities.is_empty() { vec![] } else { decode_caps(&req.volume_capabilities)? };
        let want: Option<Segments> = req.accessible_topology.as_ref().map(|t| t.segments.clone().into_iter().collect());
        let fs_param = PARAM_FS.iter().find_map(|k| req.parameters.get(*k)).cloned();
        let fs_cap = caps.iter().map(|c| c.fs_type.clone()).find(|f| !f.is_empty());
        let block = caps.iter().any(|c| c.block);
        let mut best = 0u64;
        let mut smallest: Option<u64> = None;
        for p in self.selected_pools(&req.parameters)? {
            let fits_caps = caps.iter().all(|c| c.supported_by(p.as_ref()));
            let fits_topology = want.as_ref().is_none_or(|w| placement::reachable_in(&self.pool_segments(p.as_ref()), p.multi_node(), w));
            // The filesystem a create would make there (none for raw block).
            let fs = (!block).then(|| fs_cap.clone().or(fs_param.clone()).unwrap_or_else(|| p.default_fs().to_owned()));
            let fits_fs = fs.as_deref().is_none_or(|f| p.filesystems().contains(&f));
            if !(fits_caps && fits_topology && fits_fs) {
                continue;
            }
            // A sick pool offers nothing; the others still answer.
            let (free, unit) = match (p.capacity().await, p.allocation_unit().await) {
                (Ok(free), Ok(unit)) => (free, unit.max(1)),
                (Err(e), _) | (_, Err(e)) => {
                    self.failed(p.as_ref(), &e);
                    continue;
                }
            };
            self.answered(p.as_ref());
            best = best.max(free);
            smallest = Some(smallest.unwrap_or(u64::MAX).min(minimum_size(fs.as_deref(), unit)));
        }
        Ok(GetCapacityResponse {
            available_capacity: best as i64,
            maximum_volume_size: Some(best as i64),
            minimum_volume_size: Some(smallest.unwrap_or(pool::MIB) as i64),
        })
    }

    async fn expand(&self, req: ControllerExpandVolumeRequest) -> Result<ControllerExpandVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let range = req.capacity_range.ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
        let _guard = self.d.locks.try_lock(lock_key(&self.d, ObjectKind::Volume, &req.volume_id))?;
        let (pool, v) = self.find_volume(&req.volume_id).await?;
        let want = capacity_for(Some(&range), v.capacity)?;
        let got = pool.expand_volume(&v.local, want).await?;
        Ok(ControllerExpandVolumeResponse { capacity_bytes: got as i64, node_expansion_required: !v.block })
    }

    /// CreateSnapshot, waiting for a copy the default time.
    #[cfg(test)]
    async fn snapshot(&self, req: CreateSnapshotRequest) -> Result<CreateSnapshotResponse> {
        self.snapshot_within(req, jobs::DEFAULT_WAIT).await
    }

    /// CreateSnapshot; a copy is waited for at most `budget` (the request's deadline).
    async fn snapshot_within(&self, req: CreateSnapshotRequest, budget: Duration) -> Result<CreateSnapshotResponse> {
        require("name", &req.name)?;
        require("source_volume_id", &req.source_volume_id)?;
        for key in req.parameters.keys() {
            if !key.starts_with("csi.storage.k8s.io/") {
                return Err(Error::InvalidArgument(format!("unknown snapshot parameter {key:?}")));
            }
        }
        let local = local_name(&req.name);
        let asked = CreateSnapshotRequest { secrets: HashMap::new(), ..req.clone() };
        if let Some(job) = self.d.jobs.find(&jobs::snapshot_key(&local)) {
            if job.work().csi_name() == req.name && job.started_for(&asked) {
                self.d.jobs.wait(&job, budget).await?;
            } else if !job.ended() {
                return Err(Error::Aborted(format!(
                    "snapshot {} is being copied for another request; retry when it has finished",
                    crate::error::bounded(&req.name)
                )));
            }
        }
        // The snapshot's local name (in every pool, where a retry looks for it) and its source
        // volume: no unstage, expand or delete of the volume runs while it is frozen and copied,
        // and a second snapshot of it waits its turn (ABORTED) instead of sharing the freeze.
        let source_key = lock_key(&self.d, ObjectKind::Volume, &req.source_volume_id);
        let guard = self.d.locks.try_lock_all(name_keys(&self.d, ObjectKind::Snapshot, &req.name).into_iter().chain([source_key]))?;
        let (pool, v) = self.find_volume(&req.source_volume_id).await?;
        for p in self.d.pools.values() {
            let found = match self.snapshot_named(p.as_ref(), &req.name, &local).await {
                Ok(found) => found,
                // The snapshot is taken in the source's pool, so only that one must answer.
                Err(e) if p.name() != pool.name() => {
                    self.failed(p.as_ref(), &e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(s) = found {
                // Its source must be this very volume, not an earlier one of the same name.
                if s.csi_name != req.name || p.name() != pool.name() || s.source_volume != v.local || s.source_uid != v.uid {
                    return Err(Error::AlreadyExists(format!(
                        "snapshot {:?} already exists with source {}, not {}",
                        req.name,
                        self.d.object_id(p.as_ref(), &s.source_volume, Object::Volume, s.source_uid.as_deref()),
                        crate::error::bounded(&req.source_volume_id)
                    )));
                }
                return Ok(CreateSnapshotResponse { snapshot: Some(self.snapshot_message(p.as_ref(), &s)) });
            }
        }
        // A snapshot may be a copy that outlasts this request's deadline: detached, holding the lock.
        let work = Work::Snapshot {
            pool: pool.name().to_owned(),
            source: v.local.clone(),
            csi_name: req.name.clone(),
            local: local.clone(),
            uid: new_uid(),
        };
        let job = self.d.start_copy(pool.clone(), work, Some(Box::new(asked)), guard).await?;
        self.d.jobs.wait(&job, budget).await?;
        let missing = || Error::Internal(format!("the snapshot {local} vanished right after it was made"));
        let s = pool.get_snapshot(&local).await?.ok_or_else(missing)?;
        Ok(CreateSnapshotResponse { snapshot: Some(self.snapshot_message(pool.as_ref(), &s)) })
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<DeleteSnapshotResponse> {
        require("snapshot_id", &req.snapshot_id)?;
        // A volume id names no snapshot: nothing to delete.
        let Some(sid) = VolumeId::parse(&req.snapshot_id).filter(VolumeId::may_name_snapshot) else {
            return Ok(DeleteSnapshotResponse {});
        };
        let Some(pool) = self.d.pool_of(&sid).cloned() else { return Ok(DeleteSnapshotResponse {}) };
        let _guard = self.d.locks.try_lock(LockKey::new(pool.name(), ObjectKind::Snapshot, &sid.local))?;
        // The snapshot under that name may be another one (deleted and taken again): left alone;
        // an unreadable record as for volumes.
        match pool.get_snapshot(&sid.local).await {
            Ok(Some(s)) if !sid.names_snapshot(s.uid.as_deref()) => return Ok(DeleteSnapshotResponse {}),
            Err(e) if sid.tag.is_some() => return Err(e),
            _ => {}
        }
        pool.delete_snapshot(&sid.local).await?;
        Ok(DeleteSnapshotResponse {})
    }

    async fn list_snapshots(&self, req: ListSnapshotsRequest) -> Result<ListSnapshotsResponse> {
        let mut items = Vec::new();
        // The pool a filter names must answer (an empty answer would say "no such snapshot").
        let named: Vec<String> =
            [&req.snapshot_id, &req.source_volume_id].iter().filter_map(|id| VolumeId::parse(id)).map(|id| id.pool).collect();
        for pool in self.d.pools.values() {
            let snapshots = match pool.list_snapshots().await {
                Ok(s) => {
                    self.answered(pool.as_ref());
                    s
                }
                Err(e) if !named.iter().any(|n| n == pool.name()) => {
                    self.failed(pool.as_ref(), &e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            for s in snapshots {
                let msg = self.snapshot_message(pool.as_ref(), &s);
                if (!req.snapshot_id.is_empty() && msg.snapshot_id != req.snapshot_id)
                    || (!req.source_volume_id.is_empty() && msg.source_volume_id != req.source_volume_id)
                {
                    continue;
                }
                items.push((msg.snapshot_id.clone(), msg));
            }
        }
        let (page, next_token) = paginate(items, req.max_entries, &req.starting_token)?;
        let entries = page.into_iter().map(|s| list_snapshots_response::Entry { snapshot: Some(s) }).collect();
        Ok(ListSnapshotsResponse { entries, next_token })
    }

    async fn get_snapshot(&self, req: GetSnapshotRequest) -> Result<GetSnapshotResponse> {
        require("snapshot_id", &req.snapshot_id)?;
        let (pool, s) = self.find_snapshot(&req.snapshot_id).await?;
        Ok(GetSnapshotResponse { snapshot: Some(self.snapshot_message(pool.as_ref(), &s)) })
    }
}

/// The request parameters `pool` understands: what a create passes it, and compares on a retry.
fn accepted_parameters(pool: &dyn Pool, parameters: &HashMap<String, String>) -> BTreeMap<String, String> {
    parameters.iter().filter(|(k, _)| pool.accepts_parameter(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, r: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let budget = jobs::wait_budget(r.metadata());
        let r = r.into_inner();
        let name = r.name.clone();
        traced("CreateVolume", &name, self.create_within(r, budget)).await
    }

    async fn delete_volume(&self, r: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("DeleteVolume", &id, self.delete(r)).await
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented("holdfast volumes need no controller publish (attachRequired: false)"))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented("holdfast volumes need no controller unpublish (attachRequired: false)"))
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("ValidateVolumeCapabilities", &id, self.validate(r)).await
    }

    async fn list_volumes(&self, r: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        traced("ListVolumes", "", self.list(r.into_inner())).await
    }

    async fn get_capacity(&self, r: Request<GetCapacityRequest>) -> Result<Response<GetCapacityResponse>, Status> {
        traced("GetCapacity", "", self.capacity(r.into_inner())).await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use rpc::Type as T;
        let caps = [
            T::CreateDeleteVolume,
            T::CreateDeleteSnapshot,
            T::CloneVolume,
            T::ExpandVolume,
            T::ListVolumes,
            T::ListSnapshots,
            T::GetCapacity,
            T::GetVolume,
            T::VolumeCondition,
            T::SingleNodeMultiWriter,
        ];
        Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities: caps.into_iter().map(rpc_cap).collect() }))
    }

    async fn create_snapshot(&self, r: Request<CreateSnapshotRequest>) -> Result<Response<CreateSnapshotResponse>, Status> {
        let budget = jobs::wait_budget(r.metadata());
        let r = r.into_inner();
        let id = r.source_volume_id.clone();
        traced("CreateSnapshot", &id, self.snapshot_within(r, budget)).await
    }

    async fn delete_snapshot(&self, r: Request<DeleteSnapshotRequest>) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = r.into_inner();
        let id = r.snapshot_id.clone();
        traced("DeleteSnapshot", &id, ControllerService::delete_snapshot(self, r)).await
    }

    async fn list_snapshots(&self, r: Request<ListSnapshotsRequest>) -> Result<Response<ListSnapshotsResponse>, Status> {
        traced("ListSnapshots", "", ControllerService::list_snapshots(self, r.into_inner())).await
    }

    async fn get_snapshot(&self, r: Request<GetSnapshotRequest>) -> Result<Response<GetSnapshotResponse>, Status> {
        let r = r.into_inner();
        let id = r.snapshot_id.clone();
        traced("GetSnapshot", &id, ControllerService::get_snapshot(self, r)).await
    }

    async fn controller_expand_volume(
        &self,
        r: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("ControllerExpandVolume", &id, self.expand(r)).await
    }

    async fn controller_get_volume(&self, r: Request<ControllerGetVolumeRequest>) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("ControllerGetVolume", &id, self.get_volume(r)).await
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerModifyVolume is not supported (no mutable parameters)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_ranges() {
        const M: i64 = 1 << 20;
        struct Case {
            name: &'static str,
            range: Option<CapacityRange>,
            want: std::result::Result<u64, ()>,
        }
        let r = |required_bytes, limit_bytes| Some(CapacityRange { required_bytes, limit_bytes });
        let cases = [
            Case { name: "none → default", range: None, want: Ok(DEFAULT_CAPACITY) },
            Case { name: "1 byte → 1 MiB", range: r(1, 0), want: Ok(1 << 20) },
            Case { name: "exact MiB", range: r(5 * M, 5 * M), want: Ok(5 << 20) },
            Case { name: "rounded up within limit", range: r(5 * M + 1, 6 * M), want: Ok(6 << 20) },
            Case { name: "cannot round within limit", range: r(5 * M + 1, 5 * M + 2), want: Err(()) },
            Case { name: "limit below required", range: r(10 * M, 5 * M), want: Err(()) },
            Case { name: "only a small limit", range: r(0, 10 * M), want: Ok(10 << 20) },
            Case { name: "limit under 1 MiB", range: r(0, 1000), want: Err(()) },
        ];
        for c in cases {
            let got = capacity_for(c.range.as_ref(), DEFAULT_CAPACITY);
            match (got, c.want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{}", c.name),
                (Err(e), Err(())) => assert!(matches!(e, Error::OutOfRange(_)), "{}: {e}", c.name),
                (g, w) => panic!("{}: got {g:?}, want {w:?}", c.name),
            }
        }
    }

    #[test]
    fn negative_ranges_are_invalid() {
        let err = capacity_for(Some(&CapacityRange { required_bytes: -1, limit_bytes: 0 }), DEFAULT_CAPACITY).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn pages_cover_everything_once() {
        let ids: Vec<(String, u32)> = (0..5).map(|i| (format!("file:n:p:v{i}"), i)).collect();
        let mut seen = vec![];
        let mut token = String::new();
        loop {
            let (page, next) = paginate(ids.clone(), 2, &token).unwrap();
            assert!(page.len() <= 2);
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert!(matches!(paginate(ids.clone(), 0, "garbage"), Err(Error::Aborted(_))));
        assert!(matches!(paginate(ids, -1, ""), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn minimum_sizes_are_the_filesystems_rounded_to_the_unit() {
        const M: u64 = 1 << 20;
        let cases = [
            (None, M, M),
            (None, 4 * M, 4 * M),
            (Some("ext4"), M, M),
            (Some("xfs"), M, 300 * M),
            (Some("xfs"), 4 * M, 300 * M),
            (Some("btrfs"), 4 * M, 116 * M),
            (Some("nfs"), M, M),
        ];
        for (fs, unit, want) in cases {
            assert_eq!(minimum_size(fs, unit), want, "{fs:?} in units of {unit}");
        }
    }

    #[test]
    fn a_deleted_token_entry_does_not_break_paging() {
        let ids: Vec<(String, u32)> = [1, 3, 4].iter().map(|i| (format!("file:n:p:v{i}"), *i)).collect();
        // The token names v2, which was deleted since the previous page: listing resumes after it.
        let (page, _) = paginate(ids, 0, "file:n:p:v2").unwrap();
        assert_eq!(page, vec![3, 4]);
    }

    mod sick_pools {
        //! One sick pool must not fail the calls that fan out over every pool.

        use std::sync::Mutex;

        use async_trait::async_trait;

        use super::*;
        use crate::exec::FakeExec;
        use crate::node::mount::FakeMounter;
        use crate::pool::{Attachment, Condition};
        use crate::proto::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};

        /// A pool in memory that can be made to fail every call, as a pool whose VG, zpool or
        /// server is gone does.
        struct FakePool {
            name: String,
            free: u64,
            volumes: Mutex<BTreeMap<String, VolumeInfo>>,
            snapshots: Mutex<BTreeMap<String, SnapshotInfo>>,
            sick: Mutex<Option<String>>,
        }

        impl FakePool {
            fn new(name: &str, free: u64) -> Arc<FakePool> {
                Arc::new(FakePool {
                    name: name.into(),
                    free,
                    volumes: Mutex::default(),
                    snapshots: Mutex::default(),
                    sick: Mutex::default(),
                })
            }
            fn check(&self) -> Result<()> {
                match self.sick.lock().unwrap().clone() {
                    Some(m) => Err(Error::Unavailable(m)),
                    None => Ok(()),
                }
            }
            fn fall_ill(&self, why: &str) {
                *self.sick.lock().unwrap() = Some(why.into());
            }
            fn recover(&self) {
                *self.sick.lock().unwrap() = None;
            }
            fn names(&self) -> Vec<String> {
                self.volumes.lock().unwrap().values().map(|v| v.csi_name.clone()).collect()
            }
        }

        #[async_trait]
        impl Pool for FakePool {
            fn name(&self) -> &str {
                &self.name
            }
            fn kind(&self) -> PoolKind {
                PoolKind::File
            }
            fn default_fs(&self) -> &str {
                "ext4"
            }
            async fn create_volume(&self, req: &CreateRequest) -> Result<VolumeInfo> {
                self.check()?;
                let v = VolumeInfo {
                    local: req.local.clone(),
                    csi_name: req.csi_name.clone(),
                    capacity: req.capacity,
                    block: req.block,
                    fs_type: req.fs_type.clone(),
                    source: req.source.clone(),
                    created: 0,
                    uid: Some(req.uid.clone()),
                    source_uid: req.source_uid.clone(),
                    parameters: Some(req.parameters.clone()),
                };
                self.volumes.lock().unwrap().insert(req.local.clone(), v.clone());
                Ok(v)
            }
            async fn delete_volume(&self, local: &str) -> Result<()> {
                self.check()?;
                self.volumes.lock().unwrap().remove(local);
                Ok(())
            }
            async fn get_volume(&self, local: &str) -> Result<Option<VolumeInfo>> {
                self.check()?;
                Ok(self.volumes.lock().unwrap().get(local).cloned())
            }
            async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
                self.check()?;
                Ok(self.volumes.lock().unwrap().values().cloned().collect())
            }
            async fn expand_volume(&self, _local: &str, capacity: u64) -> Result<u64> {
                self.check()?;
                Ok(capacity)
            }
            async fn create_snapshot(&self, source_local: &str, csi_name: &str, local: &str, uid: &str) -> Result<SnapshotInfo> {
                self.check()?;
                let source_uid = self.volumes.lock().unwrap().get(source_local).and_then(|v| v.uid.clone());
                let s = SnapshotInfo {
                    local: local.into(),
                    csi_name: csi_name.into(),
                    source_volume: source_local.into(),
                    size: 1 << 20,
                    created: 0,
                    ready: true,
                    uid: Some(uid.into()),
                    source_uid,
                };
                self.snapshots.lock().unwrap().insert(local.into(), s.clone());
                Ok(s)
            }
            async fn delete_snapshot(&self, local: &str) -> Result<()> {
                self.check()?;
                self.snapshots.lock().unwrap().remove(local);
                Ok(())
            }
            async fn get_snapshot(&self, local: &str) -> Result<Option<SnapshotInfo>> {
                self.check()?;
                Ok(self.snapshots.lock().unwrap().get(local).cloned())
            }
            async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
                self.check()?;
                Ok(self.snapshots.lock().unwrap().values().cloned().collect())
            }
            async fn capacity(&self) -> Result<u64> {
                self.check()?;
                Ok(self.free)
            }
            async fn attach(&self, _local: &str) -> Result<Attachment> {
                Err(Error::Unimplemented("not on this fake".into()))
            }
            async fn detach(&self, _local: &str) -> Result<()> {
                Ok(())
            }
            async fn condition(&self, local: &str) -> Result<Condition> {
                self.check()?;
                match self.volumes.lock().unwrap().contains_key(local) {
                    true => Ok(Condition::Healthy),
                    false => Err(Error::NotFound(local.into())),
                }
            }
        }

        const M: u64 = 1 << 20;

        /// A controller over `fast` (100 MiB free) and `slow` (500 MiB free, so placement
        /// prefers it while it is well).
        fn controller() -> (ControllerService, Arc<FakePool>, Arc<FakePool>) {
            let (fast, slow) = (FakePool::new("fast", 100 * M), FakePool::new("slow", 500 * M));
            let mut pools: BTreeMap<String, Arc<dyn Pool>> = BTreeMap::new();
            pools.insert("fast".into(), fast.clone());
            pools.insert("slow".into(), slow.clone());
            let driver = Driver {
                node_id: "n1".into(),
                segments: Segments::from([(crate::placement::NODE_KEY.to_owned(), "n1".to_owned())]),
                pools,
                node: crate::node::Node::new(Arc::new(FakeExec::new()), Arc::new(FakeMounter::new())),
                locks: crate::locks::Locks::new(),
                state_dir: std::env::temp_dir(),
                paths: crate::node::safepath::PathPolicy::default(),
                records: crate::node::records::Records::new(&std::env::temp_dir()),
                freezer: Arc::new(crate::node::freeze::Freezer::unrecorded(Arc::new(FakeExec::new()))),
                jobs: crate::jobs::Jobs::unrecorded(),
            };
            (ControllerService::new(Arc::new(driver)), fast, slow)
        }

        fn mount_cap(fs: &str) -> VolumeCapability {
            VolumeCapability {
                access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
                access_type: Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() })),
            }
        }

        fn create_req(name: &str, fs: &str, params: &[(&str, &str)]) -> CreateVolumeRequest {
            CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange { required_bytes: 8 * M as i64, limit_bytes: 0 }),
                volume_capabilities: vec![mount_cap(fs)],
                parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            }
        }

        fn code(e: Error) -> tonic::Code {
            tonic::Status::from(e).code()
        }

        #[tokio::test]
        async fn list_volumes_answers_from_the_healthy_pools_and_shows_the_sick_ones_volumes_abnormal() {
            let (c, fast, slow) = controller();
            let on_slow = c.create(create_req("on-slow", "", &[("pool", "slow")])).await.unwrap().volume.unwrap().volume_id;
            let on_fast = c.create(create_req("on-fast", "", &[("pool", "fast")])).await.unwrap().volume.unwrap().volume_id;
            let all = c.list(ListVolumesRequest::default()).await.unwrap();
            assert_eq!(all.entries.len(), 2);

            slow.fall_ill("volume group vg-slow is gone");
            let listed = c.list(ListVolumesRequest::default()).await.expect("a sick pool must not fail ListVolumes");
            let by_id: BTreeMap<String, VolumeCondition> = listed
                .entries
                .iter()
                .map(|e| (e.volume.clone().unwrap().volume_id, e.status.clone().unwrap().volume_condition.unwrap()))
                .collect();
            assert_eq!(by_id.len(), 2, "{by_id:?}");
            let slow_cond = &by_id[&on_slow];
            assert!(slow_cond.abnormal && slow_cond.message.contains("vg-slow is gone"), "{slow_cond:?}");
            assert!(!by_id[&on_fast].abnormal, "{by_id:?}");
            assert_eq!(fast.names(), vec!["on-fast".to_owned()]);

            slow.recover();
            let again = c.list(ListVolumesRequest::default()).await.unwrap();
            assert!(again.entries.iter().all(|e| !e.status.as_ref().unwrap().volume_condition.as_ref().unwrap().abnormal));
        }

        #[tokio::test]
        async fn get_capacity_skips_the_sick_pool() {
            let (c, _fast, slow) = controller();
            let req = GetCapacityRequest { volume_capabilities: vec![mount_cap("")], ..Default::default() };
            assert_eq!(c.capacity(req.clone()).await.unwrap().available_capacity, 500 * M as i64);
            slow.fall_ill("zpool tank is FAULTED");
            let got = c.capacity(req.clone()).await.expect("a sick pool must not fail GetCapacity");
            assert_eq!(got.available_capacity, 100 * M as i64, "only the healthy pool's room counts");
            // Asked only about the sick pool: it offers nothing, and says so without failing.
            let only_slow = GetCapacityRequest { parameters: HashMap::from([("pool".into(), "slow".into())]), ..req };
            assert_eq!(c.capacity(only_slow).await.unwrap().available_capacity, 0);
        }

        #[tokio::test]
        async fn create_is_unavailable_only_when_the_sick_pool_could_hold_the_name() {
            let (c, fast, slow) = controller();
            let made = c.create(create_req("before", "", &[])).await.unwrap();
            assert!(made.volume.unwrap().volume_id.contains(":slow:"), "placement prefers the roomier pool while it is well");
            slow.fall_ill("the NFS server does not answer");

            // The sick pool is a candidate and might hold an earlier attempt: retryable, nothing made.
            let err = c.create(create_req("new", "", &[])).await.unwrap_err();
            assert_eq!(code(err), tonic::Code::Unavailable);
            assert_eq!(fast.names(), Vec::<String>::new(), "a create that could not ask every candidate made a volume");

            // Naming the healthy pool proceeds.
            let v = c.create(create_req("new", "", &[("pool", "fast")])).await.expect("pool=fast must proceed");
            assert!(v.volume.unwrap().volume_id.starts_with("file:n1:fast:"));
            // A name found on a healthy pool is answered, even without a pool parameter.
            let again = c.create(create_req("new", "", &[])).await.expect("a retry found on a healthy pool");
            assert!(again.volume.unwrap().volume_id.starts_with("file:n1:fast:"));
            assert_eq!(fast.names(), vec!["new".to_owned()]);
        }

        #[tokio::test]
        async fn create_snapshot_and_list_snapshots_skip_the_sick_pool() {
            let (c, _fast, slow) = controller();
            let v = c.create(create_req("src", "", &[("pool", "fast")])).await.unwrap().volume.unwrap();
            c.create(create_req("other", "", &[("pool", "slow")])).await.unwrap();
            slow.fall_ill("volume group vg-slow is gone");
            let snap = CreateSnapshotRequest { name: "snap".into(), source_volume_id: v.volume_id.clone(), ..Default::default() };
            let s = c.snapshot(snap.clone()).await.expect("a sick pool must not fail CreateSnapshot elsewhere");
            assert!(s.snapshot.unwrap().snapshot_id.starts_with("file:n1:fast:"));
            assert!(c.snapshot(snap).await.is_ok(), "the retry finds it");
            let listed = c.list_snapshots(ListSnapshotsRequest::default()).await.expect("ListSnapshots skips the sick pool");
            assert_eq!(listed.entries.len(), 1);
            // A filter that names the sick pool's object cannot be answered with "none".
            let named = ListSnapshotsRequest { source_volume_id: "file:n1:slow:other".into(), ..Default::default() };
            assert!(c.list_snapshots(named).await.is_err());
        }

        #[tokio::test]
        async fn create_compares_the_filesystem_and_the_pool() {
            let (c, _fast, _slow) = controller();
            c.create(create_req("fs", "ext4", &[])).await.unwrap();
            c.create(create_req("fs", "ext4", &[])).await.expect("the same request again");
            // No fs_type: the pool's default (ext4) is what the first request got too.
            c.create(create_req("fs", "", &[])).await.expect("the default filesystem is ext4");
            let cases =
                [("another filesystem", create_req("fs", "xfs", &[])), ("another pool", create_req("fs", "ext4", &[("pool", "fast")]))];
            for (what, req) in cases {
                let err = c.create(req).await.unwrap_err();
                assert_eq!(code(err), tonic::Code::AlreadyExists, "{what}");
            }
        }

        /// A volume as earlier versions made it: the legacy local name, no uid, no parameters.
        fn legacy_volume(csi_name: &str, local: &str) -> VolumeInfo {
            VolumeInfo {
                local: local.into(),
                csi_name: csi_name.into(),
                capacity: 8 * M,
                block: false,
                fs_type: Some("ext4".into()),
                source: None,
                created: 0,
                uid: None,
                source_uid: None,
                parameters: None,
            }
        }

        #[tokio::test]
        async fn volumes_of_earlier_versions_are_found_by_their_name_and_keep_their_legacy_id() {
            let (c, _fast, slow) = controller();
            let name = "PVC Data";
            let legacy = crate::volume_id::legacy_local_name(name);
            slow.volumes.lock().unwrap().insert(legacy.clone(), legacy_volume(name, &legacy));
            let v = c.create(create_req(name, "ext4", &[])).await.unwrap().volume.unwrap();
            assert_eq!(v.volume_id, format!("file:n1:slow:{legacy}"), "the retry found the legacy volume");
            assert_eq!(slow.volumes.lock().unwrap().len(), 1, "and made no second one");
            let got = c.get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await.unwrap();
            assert_eq!(got.volume.unwrap().volume_id, v.volume_id, "the legacy id names it");
            // A current id with a uid never names a volume that has none.
            let forged = format!("file:n1:slow:{legacy}:v0123456789ab");
            let err = c.get_volume(ControllerGetVolumeRequest { volume_id: forged.clone() }).await.unwrap_err();
            assert_eq!(code(err), tonic::Code::NotFound);
            c.delete(DeleteVolumeRequest { volume_id: forged, ..Default::default() }).await.unwrap();
            assert_eq!(slow.volumes.lock().unwrap().len(), 1, "a forged current id deleted the legacy volume");
            c.delete(DeleteVolumeRequest { volume_id: v.volume_id, ..Default::default() }).await.unwrap();
            assert!(slow.volumes.lock().unwrap().is_empty(), "the legacy id deletes it");
        }

        #[tokio::test]
        async fn a_legacy_volume_of_another_name_neither_answers_nor_blocks_a_create() {
            let (c, _fast, slow) = controller();
            // The old derivation gave "team-data-<hash>" (a clean name) to itself and the same
            // name to "Team/Data": a legacy volume of the first is not the second's.
            let first = "Team/Data";
            let legacy = crate::volume_id::legacy_local_name(first);
            slow.volumes.lock().unwrap().insert(legacy.clone(), legacy_volume(&legacy, &legacy));
            let v = c.create(create_req(first, "ext4", &[])).await.expect("a fresh name is never refused").volume.unwrap();
            let id = VolumeId::parse(&v.volume_id).unwrap();
            assert_eq!(id.local, crate::volume_id::local_name(first));
            assert!(id.tag.is_some(), "a new volume gets a current id: {}", v.volume_id);
            assert_eq!(slow.volumes.lock().unwrap()[&legacy].csi_name, legacy, "the legacy volume is untouched");
            // The legacy volume's own retry still finds it.
            let own = c.create(create_req(&legacy, "ext4", &[])).await.unwrap().volume.unwrap();
            assert_eq!(own.volume_id, format!("file:n1:slow:{legacy}"));
        }

        #[tokio::test]
        async fn snapshots_list_by_the_source_they_were_taken_of() {
            let (c, _fast, _slow) = controller();
            let first = c.create(create_req("src", "ext4", &[])).await.unwrap().volume.unwrap();
            let snap = CreateSnapshotRequest { name: "snap".into(), source_volume_id: first.volume_id.clone(), ..Default::default() };
            let s = c.snapshot(snap).await.unwrap().snapshot.unwrap();
            assert_eq!(s.source_volume_id, first.volume_id);
            c.delete(DeleteVolumeRequest { volume_id: first.volume_id.clone(), ..Default::default() }).await.unwrap();
            let second = c.create(create_req("src", "ext4", &[])).await.unwrap().volume.unwrap();
            assert_ne!(second.volume_id, first.volume_id);
            let of = |id: &str| ListSnapshotsRequest { source_volume_id: id.into(), ..Default::default() };
            assert!(c.list_snapshots(of(&second.volume_id)).await.unwrap().entries.is_empty());
            assert_eq!(c.list_snapshots(of(&first.volume_id)).await.unwrap().entries.len(), 1);
            // A restore's recorded source is that very snapshot (its id with its uid).
            let restore = CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource {
                    r#type: Some(volume_content_source::Type::Snapshot(SnapshotSource { snapshot_id: s.snapshot_id.clone() })),
                }),
                ..create_req("restored", "ext4", &[])
            };
            let r = c.create(restore.clone()).await.unwrap().volume.unwrap();
            assert_eq!(r.content_source, restore.volume_content_source);
        }

        #[tokio::test]
        async fn get_capacity_reports_the_smallest_volume_the_filesystem_allows() {
            let (c, _fast, _slow) = controller();
            for (fs, want) in [("xfs", 300 * M), ("ext4", M), ("", M)] {
                let req = GetCapacityRequest { volume_capabilities: vec![mount_cap(fs)], ..Default::default() };
                assert_eq!(c.capacity(req).await.unwrap().minimum_volume_size, Some(want as i64), "{fs:?}");
            }
        }
    }
}
