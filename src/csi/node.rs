//! CSI Node: stage (attach, format if blank, mount), publish (bind-mount), unpublish, unstage,
//! stats, expansion and node info. Validates, locks the volume, then delegates to the pool
//! (attach/detach) and to `crate::node` (mounts, filesystems).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::controller::CTX_FS_TYPE;
use super::{decode_cap, require, require_path, topology, traced};
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::pool::{Attachment, Condition, Pool, VolumeInfo};
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{self, rpc};
use crate::proto::*;
use crate::volume_id::VolumeId;

/// The Node service.
pub struct NodeService {
    d: Arc<Driver>,
}

impl NodeService {
    /// Serves the node side for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        NodeService { d: driver }
    }

    /// The pool and local name of an id this node serves; NOT_FOUND otherwise.
    fn resolve(&self, id: &str) -> Result<(Arc<dyn Pool>, String)> {
        let vid = VolumeId::parse(id).ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        let pool = self.d.pool_of(&vid).ok_or_else(|| {
            Error::NotFound(format!(
                "volume {id} is not served by this node ({}): no such pool here or it belongs to another node",
                self.d.node_id
            ))
        })?;
        Ok((pool.clone(), vid.local))
    }

    async fn existing(&self, id: &str) -> Result<(Arc<dyn Pool>, VolumeInfo)> {
        let (pool, local) = self.resolve(id)?;
        let v = pool.get_volume(&local).await?.ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        Ok((pool, v))
    }

    fn lock(&self, id: &str) -> Result<crate::locks::Guard> {
        self.d.locks.try_lock(&format!("vol:{id}"), &format!("volume {id}"))
    }

    async fn stage(&self, r: NodeStageVolumeRequest) -> Result<NodeStageVolumeResponse> {
        require("volume_id", &r.volume_id)?;
        require_path("staging_target_path", &r.staging_target_path)?;
        let cap = decode_cap(r.volume_capability.as_ref())?;
        let _guard = self.lock(&r.volume_id)?;
        let (pool, v) = self.existing(&r.volume_id).await?;
        if cap.block != v.block {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is a {} volume and cannot be staged as {}",
                r.volume_id,
                if v.block { "raw block" } else { "filesystem" },
                if cap.block { "raw block" } else { "a filesystem" }
            )));
        }
        if !cap.supported_by(pool.as_ref()) {
            return Err(Error::FailedPrecondition(format!("access mode {} is not supported", cap.mode.as_str_name())));
        }
        let attachment = pool.attach(&v.local).await?;
        if cap.block {
            // Raw block: attaching is all; publish binds the device node.
            return Ok(NodeStageVolumeResponse {});
        }
        let fs =
            [cap.fs_type.as_str(), r.volume_context.get(CTX_FS_TYPE).map(String::as_str).unwrap_or(""), v.fs_type.as_deref().unwrap_or("")]
                .into_iter()
                .find(|f| !f.is_empty())
                .unwrap_or(pool.default_fs())
                .to_owned();
        self.d.node.stage_filesystem(&attachment, Path::new(&r.staging_target_path), &fs, &cap.mount_flags).await?;
        Ok(NodeStageVolumeResponse {})
    }

    async fn unstage(&self, r: NodeUnstageVolumeRequest) -> Result<NodeUnstageVolumeResponse> {
        require("volume_id", &r.volume_id)?;
        require_path("staging_target_path", &r.staging_target_path)?;
        let _guard = self.lock(&r.volume_id)?;
        let (pool, local) = self.resolve(&r.volume_id)?;
        self.d.node.unstage(Path::new(&r.staging_target_path)).await?;
        pool.detach(&local).await?;
        Ok(NodeUnstageVolumeResponse {})
    }

    async fn publish(&self, r: NodePublishVolumeRequest) -> Result<NodePublishVolumeResponse> {
        require("volume_id", &r.volume_id)?;
        require_path("target_path", &r.target_path)?;
        let cap = decode_cap(r.volume_capability.as_ref())?;
        if r.staging_target_path.is_empty() {
            // The spec's code for this case: STAGE_UNSTAGE_VOLUME is advertised, so publish needs a staged volume.
            return Err(Error::FailedPrecondition("staging_target_path is required: this driver stages volumes before publishing".into()));
        }
        require_path("staging_target_path", &r.staging_target_path)?;
        let _guard = self.lock(&r.volume_id)?;
        let (pool, v) = self.existing(&r.volume_id).await?;
        if cap.block != v.block {
            return Err(Error::FailedPrecondition(format!(
                "volume {} cannot be published with another access type than it was created with",
                r.volume_id
            )));
        }
        if !cap.supported_by(pool.as_ref()) {
            return Err(Error::FailedPrecondition(format!("access mode {} is not supported", cap.mode.as_str_name())));
        }
        let readonly = r.readonly || cap.read_only_mode();
        let target = Path::new(&r.target_path);
        if cap.block {
            let Attachment::Device(dev) = pool.attach(&v.local).await? else {
                return Err(Error::FailedPrecondition(format!("volume {} has no block device", r.volume_id)));
            };
            self.d.node.publish_block(&dev, target, readonly).await?;
        } else {
            let staging = Path::new(&r.staging_target_path);
            self.d.node.publish_filesystem(staging, target, readonly, &cap.mount_flags).await?;
        }
        Ok(NodePublishVolumeResponse {})
    }

    async fn unpublish(&self, r: NodeUnpublishVolumeRequest) -> Result<NodeUnpublishVolumeResponse> {
        require("volume_id", &r.volume_id)?;
        require_path("target_path", &r.target_path)?;
        let _guard = self.lock(&r.volume_id)?;
        self.resolve(&r.volume_id)?;
        self.d.node.unpublish(Path::new(&r.target_path)).await?;
        Ok(NodeUnpublishVolumeResponse {})
    }

    async fn stats(&self, r: NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse> {
        require("volume_id", &r.volume_id)?;
        require_path("volume_path", &r.volume_path)?;
        if !r.staging_target_path.is_empty() {
            require_path("staging_target_path", &r.staging_target_path)?;
        }
        let (pool, v) = self.existing(&r.volume_id).await?;
        let path = PathBuf::from(&r.volume_path);
        // The pool's own check first: it probes remote storage under a deadline. When it says
        // abnormal (an NFS server gone), the volume path is not touched at all: a stat on a dead
        // hard mount would never return.
        let mut condition = match pool.condition(&v.local).await? {
            Condition::Abnormal(m) => Some(m),
            Condition::Healthy => None,
        };
        // Freeze records (crate::node::freeze): Linux has no frozen flag, so a freeze left
        // open past its deadline (a failed thaw) is what says the filesystem may be frozen.
        if condition.is_none() {
            condition = self.d.freezer.stuck_message(pool.name(), &v.local).await;
        }
        let mut usage = Vec::new();
        if condition.is_none() {
            let exists = with_deadline(&r.volume_path, {
                let p = path.clone();
                move || p.exists()
            })
            .await;
            match exists {
                Ok(false) => return Err(Error::NotFound(format!("volume_path {} does not exist on this node", r.volume_path))),
                Ok(true) => {}
                Err(m) => condition = Some(m),
            }
        }
        if condition.is_none() {
            let node = self.d.node.clone();
            let (block, staging) = (v.block, r.staging_target_path.clone());
            let p = path.clone();
            let checked = with_deadline(&r.volume_path, move || {
                if let Condition::Abnormal(m) = node.condition(&p, block) {
                    return Some(m);
                }
                // A bind mount outlives the staging mount it came from: check the staging path too.
                if !block && !staging.is_empty() {
                    if let Condition::Abnormal(m) = node.condition(Path::new(&staging), false) {
                        return Some(format!("staging mount: {m}"));
                    }
                }
                None
            })
            .await;
            condition = checked.unwrap_or_else(Some);
        }
        if condition.is_none() {
            let node = self.d.node.clone();
            let p = path.clone();
            match with_deadline(&r.volume_path, move || node.stats(&p)).await {
                Ok(Ok(s)) => {
                    use volume_usage::Unit;
                    let u = |unit: Unit, total: u64, available: u64, used: u64| VolumeUsage {
                        available: available as i64,
                        total: total as i64,
                        used: used as i64,
                        unit: unit as i32,
                    };
                    usage.push(u(Unit::Bytes, s.total_bytes, s.available_bytes, s.used_bytes));
                    if let (Some(t), Some(f), Some(used)) = (s.total_inodes, s.free_inodes, s.used_inodes) {
                        usage.push(u(Unit::Inodes, t, f, used));
                    }
                }
                Ok(Err(e)) => condition = Some(format!("cannot read usage of {}: {e}", r.volume_path)),
                Err(m) => condition = Some(m),
            }
        }
        let volume_condition = Some(match condition {
            Some(m) => VolumeCondition { abnormal: true, message: m },
            None => VolumeCondition { abnormal: false, message: "volume is healthy".into() },
        });
        Ok(NodeGetVolumeStatsResponse { usage, volume_condition })
    }

    async fn expand(&self, r: NodeExpandVolumeRequest) -> Result<NodeExpandVolumeResponse> {
        require("volume_id", &r.volume_id)?;
        require_path("volume_path", &r.volume_path)?;
        let _guard = self.lock(&r.volume_id)?;
        let (pool, v) = self.existing(&r.volume_id).await?;
        if let Some(range) = &r.capacity_range {
            if range.required_bytes > 0 && v.capacity < range.required_bytes as u64 {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is {} bytes, smaller than the {} requested: expand it on the controller first",
                    r.volume_id, v.capacity, range.required_bytes
                )));
            }
        }
        let is_block = v.block || r.volume_capability.as_ref().and_then(|c| decode_cap(Some(c)).ok()).is_some_and(|c| c.block);
        if is_block {
            return Ok(NodeExpandVolumeResponse { capacity_bytes: v.capacity as i64 });
        }
        let Attachment::Device(dev) = pool.attach(&v.local).await? else {
            // Datasets and shares grow with their quota; nothing to do on the node.
            return Ok(NodeExpandVolumeResponse { capacity_bytes: v.capacity as i64 });
        };
        let path = Path::new(&r.volume_path);
        if !self.d.node.is_mounted(path)? {
            return Err(Error::NotFound(format!("volume {} is not mounted at {}", r.volume_id, r.volume_path)));
        }
        let size = self.d.node.expand_filesystem(&dev, path).await?;
        Ok(NodeExpandVolumeResponse { capacity_bytes: size as i64 })
    }
}

/// How long a file-system call on a volume path may take before the volume counts as abnormal.
const PATH_DEADLINE: Duration = Duration::from_secs(5);

/// Runs a blocking file-system call on a volume path off the async workers, with a deadline:
/// on a hung mount (an unreachable NFS server with `hard`) the call may never return, and it
/// must not take a worker thread or the caller with it. `Err` is the abnormal-condition message.
async fn with_deadline<T: Send + 'static>(path: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    match tokio::time::timeout(PATH_DEADLINE, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("checking {path} failed: {e}")),
        Err(_) => Err(format!("{path} did not answer within {PATH_DEADLINE:?}: the storage behind it is hung or unreachable")),
    }
}

fn rpc_cap(t: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability { r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc { r#type: t as i32 })) }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(&self, r: Request<NodeStageVolumeRequest>) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodeStageVolume", &id, self.stage(r)).await
    }

    async fn node_unstage_volume(&self, r: Request<NodeUnstageVolumeRequest>) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodeUnstageVolume", &id, self.unstage(r)).await
    }

    async fn node_publish_volume(&self, r: Request<NodePublishVolumeRequest>) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodePublishVolume", &id, self.publish(r)).await
    }

    async fn node_unpublish_volume(&self, r: Request<NodeUnpublishVolumeRequest>) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodeUnpublishVolume", &id, self.unpublish(r)).await
    }

    async fn node_get_volume_stats(&self, r: Request<NodeGetVolumeStatsRequest>) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodeGetVolumeStats", &id, self.stats(r)).await
    }

    async fn node_expand_volume(&self, r: Request<NodeExpandVolumeRequest>) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        traced("NodeExpandVolume", &id, self.expand(r)).await
    }

    async fn node_get_capabilities(&self, _: Request<NodeGetCapabilitiesRequest>) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use rpc::Type as T;
        let caps = [T::StageUnstageVolume, T::GetVolumeStats, T::ExpandVolume, T::VolumeCondition, T::SingleNodeMultiWriter];
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities: caps.into_iter().map(rpc_cap).collect() }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.d.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(topology(&self.d.segments)),
        }))
    }
}
