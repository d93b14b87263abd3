//! CSI Controller: create, delete, list, expand and snapshot volumes. Each handler validates the
//! request, takes the per-name or per-volume lock, then delegates to the pool that owns the
//! object. Placement of new volumes is `crate::placement`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Capability, decode_caps, require, topology, traced};
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::placement::{self, Candidate, Segments};
use crate::pool::{self, CreateRequest, Pool, SnapshotInfo, Source, VolumeInfo};
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self, rpc};
use crate::proto::volume_content_source::{self, SnapshotSource, VolumeSource};
use crate::proto::*;
use crate::volume_id::{PoolKind, VolumeId, local_name};

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
}

impl ControllerService {
    /// Serves the controller for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        ControllerService { d: driver }
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
                Source::Snapshot(l) => {
                    volume_content_source::Type::Snapshot(SnapshotSource { snapshot_id: self.d.id_for(pool, l).to_string() })
                }
                Source::Volume(l) => volume_content_source::Type::Volume(VolumeSource { volume_id: self.d.id_for(pool, l).to_string() }),
            };
            VolumeContentSource { r#type: Some(t) }
        });
        let mut ctx = HashMap::from([(CTX_POOL.to_owned(), pool.name().to_owned())]);
        if let Some(fs) = &v.fs_type {
            ctx.insert(CTX_FS_TYPE.to_owned(), fs.clone());
        }
        Volume {
            volume_id: self.d.id_for(pool, &v.local).to_string(),
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
            snapshot_id: self.d.id_for(pool, &s.local).to_string(),
            source_volume_id: self.d.id_for(pool, &s.source_volume).to_string(),
            creation_time: Some(timestamp(s.created)),
            ready_to_use: s.ready,
            group_snapshot_id: String::new(),
        }
    }

    /// Resolves a volume id to its pool and volume; NOT_FOUND when either is missing.
    async fn find_volume(&self, id: &str) -> Result<(Arc<dyn Pool>, VolumeInfo)> {
        let missing = || Error::NotFound(format!("volume {} does not exist", crate::error::bounded(id)));
        let vid = VolumeId::parse(id).ok_or_else(missing)?;
        let pool = self.d.pool_of(&vid).ok_or_else(missing)?.clone();
        let v = pool.get_volume(&vid.local).await?.ok_or_else(missing)?;
        Ok((pool, v))
    }

    async fn find_snapshot(&self, id: &str) -> Result<(Arc<dyn Pool>, SnapshotInfo)> {
        let missing = || Error::NotFound(format!("snapshot {} does not exist", crate::error::bounded(id)));
        let sid = VolumeId::parse(id).ok_or_else(missing)?;
        let pool = self.d.pool_of(&sid).ok_or_else(missing)?.clone();
        let s = pool.get_snapshot(&sid.local).await?.ok_or_else(missing)?;
        Ok((pool, s))
    }

    async fn create(&self, req: CreateVolumeRequest) -> Result<CreateVolumeResponse> {
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
        let _guard = self.d.locks.try_lock(&format!("name:{}", req.name), &format!("volume name {:?}", req.name))?;

        // The source pins the pool: copies are made inside the pool that holds the source.
        let (source, min_size) = match req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            Some(volume_content_source::Type::Snapshot(s)) => {
                require("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
                let (p, snap) = self.find_snapshot(&s.snapshot_id).await?;
                pools.retain(|c| c.name() == p.name());
                (Some(Source::Snapshot(snap.local)), snap.size)
            }
            Some(volume_content_source::Type::Volume(v)) => {
                require("volume_content_source.volume.volume_id", &v.volume_id)?;
                let (p, vol) = self.find_volume(&v.volume_id).await?;
                if vol.block != block {
                    return Err(Error::InvalidArgument(format!("source volume {} is not of the requested access type", v.volume_id)));
                }
                pools.retain(|c| c.name() == p.name());
                (Some(Source::Volume(vol.local)), vol.capacity)
            }
            None => (None, 0),
        };
        if capacity < min_size {
            let required = req.capacity_range.map(|r| r.required_bytes).unwrap_or(0);
            if required > 0 {
                return Err(Error::OutOfRange(format!("requested {capacity} bytes is smaller than the source ({min_size} bytes)")));
            }
            capacity = min_size;
        }

        // A retry must find what the first attempt made, wherever it landed.
        for pool in self.d.pools.values() {
            if let Some(v) = pool.get_volume(&local).await? {
                let limit = req.capacity_range.map(|r| r.limit_bytes as u64).unwrap_or(0);
                let fits = v.capacity >= capacity && (limit == 0 || v.capacity <= limit);
                if v.csi_name != req.name {
                    return Err(Error::AlreadyExists(format!(
                        "local name {local} in pool {} is taken by volume {:?}",
                        pool.name(),
                        v.csi_name
                    )));
                }
                if !fits || v.block != block || v.source != source {
                    return Err(Error::AlreadyExists(format!(
                        "volume {:?} already exists with capacity {} bytes ({}), incompatible with this request",
                        req.name,
                        v.capacity,
                        if v.block { "block" } else { "filesystem" }
                    )));
                }
                return Ok(CreateVolumeResponse { volume: Some(self.volume_message(pool.as_ref(), &v)) });
            }
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
        let mut candidates = Vec::new();
        for p in &pools {
            candidates.push(Candidate { pool: p.name().to_owned(), segments: self.pool_segments(p.as_ref()), free: p.capacity().await? });
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
        let params: BTreeMap<String, String> =
            req.parameters.iter().filter(|(k, _)| pool.accepts_parameter(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        let creq = CreateRequest { csi_name: req.name.clone(), local, capacity, block, fs_type, source, parameters: params };
        let v = pool.create_volume(&creq).await?;
        Ok(CreateVolumeResponse { volume: Some(self.volume_message(pool.as_ref(), &v)) })
    }

    async fn delete(&self, req: DeleteVolumeRequest) -> Result<DeleteVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        // An id we could never have issued names nothing: deleting nothing succeeds (spec).
        let Some(vid) = VolumeId::parse(&req.volume_id) else { return Ok(DeleteVolumeResponse {}) };
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
        let _guard = self.d.locks.try_lock(&format!("vol:{}", req.volume_id), &format!("volume {}", req.volume_id))?;
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
        Ok(match pool.condition(local).await? {
            pool::Condition::Healthy => VolumeCondition { abnormal: false, message: "volume is healthy".into() },
            pool::Condition::Abnormal(m) => VolumeCondition { abnormal: true, message: m },
        })
    }

    async fn list(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse> {
        let mut items = Vec::new();
        for pool in self.d.pools.values() {
            for v in pool.list_volumes().await? {
                let msg = self.volume_message(pool.as_ref(), &v);
                let cond = match self.condition_of(pool.as_ref(), &v.local).await {
                    Ok(c) => c,
                    // Deleted since the pool listed it: it is simply not in this listing.
                    Err(Error::NotFound(_)) => continue,
                    Err(e) => return Err(e),
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
        let mut best = 0u64;
        for p in self.selected_pools(&req.parameters)? {
            let fits_caps = caps.iter().all(|c| c.supported_by(p.as_ref()));
            let fits_topology = want.as_ref().is_none_or(|w| placement::reachable_in(&self.pool_segments(p.as_ref()), p.multi_node(), w));
            if fits_caps && fits_topology {
                best = best.max(p.capacity().await?);
            }
        }
        Ok(GetCapacityResponse {
            available_capacity: best as i64,
            maximum_volume_size: Some(best as i64),
            minimum_volume_size: Some(pool::MIB as i64),
        })
    }

    async fn expand(&self, req: ControllerExpandVolumeRequest) -> Result<ControllerExpandVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let range = req.capacity_range.ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
        let _guard = self.d.locks.try_lock(&format!("vol:{}", req.volume_id), &format!("volume {}", req.volume_id))?;
        let (pool, v) = self.find_volume(&req.volume_id).await?;
        let want = capacity_for(Some(&range), v.capacity)?;
        let got = pool.expand_volume(&v.local, want).await?;
        Ok(ControllerExpandVolumeResponse { capacity_bytes: got as i64, node_expansion_required: !v.block })
    }

    async fn snapshot(&self, req: CreateSnapshotRequest) -> Result<CreateSnapshotResponse> {
        require("name", &req.name)?;
        require("source_volume_id", &req.source_volume_id)?;
        for key in req.parameters.keys() {
            if !key.starts_with("csi.storage.k8s.io/") {
                return Err(Error::InvalidArgument(format!("unknown snapshot parameter {key:?}")));
            }
        }
        let local = local_name(&req.name);
        let _guard = self.d.locks.try_lock(&format!("snap:{}", req.name), &format!("snapshot name {:?}", req.name))?;
        let (pool, v) = self.find_volume(&req.source_volume_id).await?;
        for p in self.d.pools.values() {
            if let Some(s) = p.get_snapshot(&local).await? {
                if s.csi_name != req.name || p.name() != pool.name() || s.source_volume != v.local {
                    return Err(Error::AlreadyExists(format!(
                        "snapshot {:?} already exists with source {}, not {}",
                        req.name,
                        self.d.id_for(p.as_ref(), &s.source_volume),
                        req.source_volume_id
                    )));
                }
                return Ok(CreateSnapshotResponse { snapshot: Some(self.snapshot_message(p.as_ref(), &s)) });
            }
        }
        let s = pool.create_snapshot(&v.local, &req.name, &local).await?;
        Ok(CreateSnapshotResponse { snapshot: Some(self.snapshot_message(pool.as_ref(), &s)) })
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<DeleteSnapshotResponse> {
        require("snapshot_id", &req.snapshot_id)?;
        let Some(sid) = VolumeId::parse(&req.snapshot_id) else { return Ok(DeleteSnapshotResponse {}) };
        let Some(pool) = self.d.pool_of(&sid).cloned() else { return Ok(DeleteSnapshotResponse {}) };
        let _guard = self.d.locks.try_lock(&format!("snapid:{}", req.snapshot_id), &format!("snapshot {}", req.snapshot_id))?;
        pool.delete_snapshot(&sid.local).await?;
        Ok(DeleteSnapshotResponse {})
    }

    async fn list_snapshots(&self, req: ListSnapshotsRequest) -> Result<ListSnapshotsResponse> {
        let mut items = Vec::new();
        for pool in self.d.pools.values() {
            for s in pool.list_snapshots().await? {
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

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, r: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = r.into_inner();
        let name = r.name.clone();
        traced("CreateVolume", &name, self.create(r)).await
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
        let r = r.into_inner();
        let id = r.source_volume_id.clone();
        traced("CreateSnapshot", &id, self.snapshot(r)).await
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
    fn a_deleted_token_entry_does_not_break_paging() {
        let ids: Vec<(String, u32)> = [1, 3, 4].iter().map(|i| (format!("file:n:p:v{i}"), *i)).collect();
        // The token names v2, which was deleted since the previous page: listing resumes after it.
        let (page, _) = paginate(ids, 0, "file:n:p:v2").unwrap();
        assert_eq!(page, vec![3, 4]);
    }
}
