//! The state one holdfast process serves from: its node id and topology, its pools, the node
//! operations and the operation locks. The CSI services share one `Driver`.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::exec::Exec;
use crate::jobs::{Job, Jobs, Work};
use crate::locks::{LockKey, Locks, ObjectKind};
use crate::node::Node;
use crate::node::freeze::Freezer;
use crate::node::mount::Mounter;
use crate::node::records::Records;
use crate::node::safepath::PathPolicy;
use crate::placement::{NODE_KEY, Segments};
use crate::pool::{self, Pool, Source};
use crate::volume_id::{Object, VolumeId, valid_node_id};

/// Driver name registered with orchestrators.
pub const DRIVER_NAME: &str = "csi.holdfast.dev";

/// Everything the CSI services need.
pub struct Driver {
    /// This node's id.
    pub node_id: String,
    /// The segments this node reports (always includes [`NODE_KEY`]).
    pub segments: Segments,
    /// Pools by name.
    pub pools: BTreeMap<String, Arc<dyn Pool>>,
    /// The configured labels of each pool that has any (`labels` in its `[[pool]]` table).
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Shared (`nfs`) pools defined elsewhere and learnt at run time (an agent's, from the
    /// controller): only the node side uses them, so a node mounts exports of known pools only.
    pub shared: RwLock<BTreeMap<String, Arc<dyn Pool>>>,
    /// Node operations.
    pub node: Node,
    /// Operation locks.
    pub locks: Locks,
    /// The driver's own durable state (stage and freeze records), 0700.
    pub state_dir: PathBuf,
    /// Where request paths may point (`allowed_path_prefixes`).
    pub paths: PathPolicy,
    /// What this node staged and published for each volume (in `state_dir`).
    pub records: Records,
    /// Freezes filesystems around snapshots and clones, for every pool ([`crate::node::freeze`]).
    pub freezer: Arc<Freezer>,
    /// Copies (clones, restores, snapshots) running detached from their requests.
    pub jobs: Jobs,
}

impl Driver {
    /// Opens every configured pool, freezing with the default deadline.
    pub fn new(node_id: &str, cfg: &Config, state_dir: &Path, exec: Arc<dyn Exec>, mounter: Arc<dyn Mounter>) -> Result<Driver> {
        Self::with_freeze_deadline(node_id, cfg, state_dir, exec, mounter, crate::node::freeze::FROZEN_DEADLINE)
    }

    /// Opens every configured pool; a filesystem stays frozen at most `freeze_deadline`.
    pub fn with_freeze_deadline(
        node_id: &str,
        cfg: &Config,
        state_dir: &Path,
        exec: Arc<dyn Exec>,
        mounter: Arc<dyn Mounter>,
        freeze_deadline: std::time::Duration,
    ) -> Result<Driver> {
        if !valid_node_id(node_id) {
            return Err(Error::InvalidArgument(format!(
                "node id {node_id:?} is not usable: 1 to 48 characters of A-Z, a-z, 0-9, '.', '_' and '-' (set --node-id)"
            )));
        }
        if !state_dir.is_absolute() {
            return Err(Error::InvalidArgument(format!("state directory {} must be an absolute path", state_dir.display())));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| Error::io(format!("creating state directory {}", state_dir.display()), e))?;
        let mut segments = cfg.topology.clone();
        segments.insert(NODE_KEY.to_owned(), node_id.to_owned());
        // Before any pool is opened (opening creates directories): overlapping pools could
        // delete each other's volumes.
        crate::config::check_overlaps(cfg).map_err(|e| Error::InvalidArgument(format!("configuration: {e}")))?;
        // The pools read the mount table through the freezer's mounter: the driver's.
        let freezer = Arc::new(Freezer::new(state_dir, exec.clone())?.with_deadline(freeze_deadline).with_mounter(mounter.clone()));
        let mut pools = BTreeMap::new();
        for pc in &cfg.pools {
            pools.insert(pc.name().to_owned(), pool::open(pc, exec.clone(), freezer.clone())?);
        }
        Ok(Driver {
            node_id: node_id.to_owned(),
            segments,
            pools,
            labels: cfg.pools.iter().filter_map(|p| Some((p.name().to_owned(), p.labels.clone()?))).collect(),
            shared: RwLock::new(BTreeMap::new()),
            node: Node::new(exec, mounter),
            locks: Locks::new(),
            state_dir: state_dir.to_owned(),
            paths: PathPolicy::new(&cfg.allowed_path_prefixes)?,
            records: Records::new(state_dir),
            freezer,
            jobs: Jobs::new(state_dir)?,
        })
    }

    /// Start-up repair, before serving: thaws every filesystem a freeze record names (a
    /// driver killed mid-snapshot), removes the temporaries of interrupted stage-record writes,
    /// and lets each pool undo what it left half-done (LVM resumes device-mapper devices left
    /// suspended). What it does is logged; a failure is logged and the driver serves anyway
    /// (the volumes concerned report abnormal), since refusing to start would leave even the
    /// healthy ones unusable.
    pub async fn recover(&self) {
        match self.freezer.recover().await {
            Ok(done) => {
                for r in done {
                    if let crate::node::freeze::Recovered::Failed(mp, e) = r {
                        tracing::error!(mount_point = %mp.display(), error = %e, "cannot thaw a filesystem left frozen");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the freeze records; filesystems may be left frozen"),
        }
        match self.records.clean_temporaries().await {
            Ok(gone) if !gone.is_empty() => tracing::info!(files = ?gone, "removed the temporaries of interrupted stage-record writes"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot clean the stage records' temporaries"),
        }
        for (name, pool) in &self.pools {
            if let Err(e) = pool.recover().await {
                tracing::error!(pool = %name, error = %e, "start-up repair of the pool failed");
            }
        }
        // After the pools' repair, which removed the killed copies' temporaries.
        self.restart_copies().await;
    }

    /// Runs again every volume copy a killed predecessor recorded and did not finish, as
    /// detached jobs holding their locks, so a retry of the request finds them running; removes
    /// what an unfinished snapshot copy left (its retry takes it again).
    async fn restart_copies(&self) {
        let recorded = match self.jobs.recorded().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the copy records; unfinished copies restart when their requests are retried");
                return;
            }
        };
        for work in recorded {
            let Some(pool) = self.pools.get(work.pool()).cloned() else {
                tracing::error!(job = %work.key(), pool = %work.pool(), "a recorded copy names a pool that is no longer configured; its request fails until retried elsewhere");
                continue;
            };
            if let Work::Snapshot { local, .. } = &work {
                // Not taken again unasked (it would freeze and lock a volume in use): its
                // half-made copy goes, and the retry of its request takes it afresh.
                let discarded = pool.discard_unfinished(true, local).await;
                let discarded = match discarded {
                    Ok(()) => self.jobs.discard_record(&work.key()).await,
                    e => e,
                };
                match discarded {
                    Ok(()) => {
                        tracing::info!(job = %work.key(), "removed a snapshot copy left unfinished by a killed driver; its retry takes it again")
                    }
                    Err(e) => {
                        tracing::error!(job = %work.key(), error = %e, "cannot remove a snapshot copy left unfinished by a killed driver")
                    }
                }
                continue;
            }
            let started = match self.locks.try_lock_all(self.copy_locks(&work)) {
                Ok(guard) => self.start_copy(pool, work.clone(), None, guard).await,
                Err(e) => Err(e),
            };
            match started {
                Ok(_) => tracing::info!(job = %work.key(), "restarted a copy left unfinished by a killed driver"),
                Err(e) => tracing::error!(job = %work.key(), error = %e, "cannot restart a recorded copy"),
            }
        }
    }

    /// The locks the request of `work` takes (and a restarted job takes again): the new
    /// object's local name in every pool, and the source object.
    fn copy_locks(&self, work: &Work) -> Vec<LockKey> {
        match work {
            Work::Volume { pool, request } => {
                let source = request.source.as_ref().map(|s| match s {
                    Source::Snapshot(l) => LockKey::new(pool, ObjectKind::Snapshot, l),
                    Source::Volume(l) => LockKey::new(pool, ObjectKind::Volume, l),
                });
                crate::csi::name_keys(self, ObjectKind::Volume, &request.csi_name).into_iter().chain(source).collect()
            }
            Work::Snapshot { pool, source, csi_name, .. } => crate::csi::name_keys(self, ObjectKind::Snapshot, csi_name)
                .into_iter()
                .chain([LockKey::new(pool, ObjectKind::Volume, source)])
                .collect(),
        }
    }

    /// Starts `work` in `pool` as a detached job ([`crate::jobs`]) holding `locks` until it
    /// ends. The job is done when the pool has made the object and reads it back complete.
    pub async fn start_copy<L: Send + 'static>(
        &self,
        pool: Arc<dyn Pool>,
        work: Work,
        asked: Option<Box<dyn std::any::Any + Send + Sync>>,
        locks: L,
    ) -> Result<Arc<Job>> {
        let (w, progress_pool) = (work.clone(), pool.clone());
        let run = async move {
            match w {
                Work::Volume { request, .. } => {
                    pool.create_volume(&request).await?;
                    // Verified from the committed record, not from what create answered.
                    match pool.get_volume(&request.local).await? {
                        Some(v) if v.capacity >= request.capacity => Ok(()),
                        Some(v) => Err(Error::Internal(format!(
                            "the copy {} was made with {} bytes, less than the {} asked",
                            request.local, v.capacity, request.capacity
                        ))),
                        None => Err(Error::Internal(format!("the copy {} vanished right after it was made", request.local))),
                    }
                }
                Work::Snapshot { source, csi_name, local, uid, .. } => {
                    pool.create_snapshot(&source, &csi_name, &local, &uid).await?;
                    match pool.get_snapshot(&local).await? {
                        Some(s) if s.ready => Ok(()),
                        Some(_) => Err(Error::Internal(format!("the snapshot {local} is not ready right after it was made"))),
                        None => Err(Error::Internal(format!("the snapshot {local} vanished right after it was made"))),
                    }
                }
            }
        };
        let (snapshot, local, source) = match &work {
            Work::Volume { request, .. } => (false, request.local.clone(), request.source.clone()),
            Work::Snapshot { local, source, .. } => (true, local.clone(), Some(Source::Volume(source.clone()))),
        };
        let progress = source.map(|source| -> crate::jobs::Progress {
            let pool = progress_pool;
            Arc::new(move || {
                let (pool, local, source) = (pool.clone(), local.clone(), source.clone());
                Box::pin(async move { pool.copy_progress(snapshot, &local, &source, std::time::Duration::from_millis(100)).await })
            })
        });
        self.jobs.start(work, asked, progress, locks, run).await
    }

    /// The pool a (parsed) id names, if it is one of ours or a shared pool learnt at run time
    /// ([`Driver::shared`]): what the node side may stage and publish. Ids of another node, an
    /// unknown pool or a pool of another kind resolve to `None` (the object is not here).
    pub fn pool_of(&self, id: &VolumeId) -> Option<Arc<dyn Pool>> {
        if let Some(p) = self.own_pool_of(id) {
            return Some(p);
        }
        if id.kind.is_node_local() || self.pools.contains_key(&id.pool) {
            return None;
        }
        let pool = self.shared.read().unwrap_or_else(|p| p.into_inner()).get(&id.pool)?.clone();
        (pool.kind() == id.kind).then_some(pool)
    }

    /// As [`Driver::pool_of`], among the configured pools only: what the controller
    /// operations act on (a shared pool learnt at run time is another process's to manage).
    pub fn own_pool_of(&self, id: &VolumeId) -> Option<Arc<dyn Pool>> {
        let pool = self.pools.get(&id.pool)?.clone();
        if pool.kind() != id.kind {
            return None;
        }
        if id.kind.is_node_local() && id.node.as_deref() != Some(self.node_id.as_str()) {
            return None;
        }
        Some(pool)
    }

    /// Replaces the shared pools learnt at run time (a pool of the configuration keeps its
    /// name: a definition under the same name is ignored, logged).
    pub fn set_shared_pools(&self, pools: Vec<Arc<dyn Pool>>) {
        let mut map = BTreeMap::new();
        for p in pools {
            if self.pools.contains_key(p.name()) {
                tracing::warn!(pool = p.name(), "a shared pool of this name is configured locally; the local one is used");
                continue;
            }
            map.insert(p.name().to_owned(), p);
        }
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// The legacy (uid-less) id of a local object of `pool`: right only for objects made
    /// before uids existed; use [`Driver::object_id`] for any object read from a pool.
    pub fn id_for(&self, pool: &dyn Pool, local: &str) -> VolumeId {
        let node = pool.kind().is_node_local().then_some(self.node_id.as_str());
        VolumeId::new(pool.kind(), node, pool.name(), local)
    }

    /// The id of the volume or snapshot `local` of `pool` whose recorded uid is `uid` (a
    /// legacy id when it has none, see [`crate::volume_id`]).
    pub fn object_id(&self, pool: &dyn Pool, local: &str, object: Object, uid: Option<&str>) -> VolumeId {
        let node = pool.kind().is_node_local().then_some(self.node_id.as_str());
        VolumeId::of(pool.kind(), node, pool.name(), local, object, uid)
    }

    /// The id of a volume as its pool reports it.
    pub fn volume_id(&self, pool: &dyn Pool, v: &crate::pool::VolumeInfo) -> VolumeId {
        self.object_id(pool, &v.local, Object::Volume, v.uid.as_deref())
    }

    /// The id of a snapshot as its pool reports it.
    pub fn snapshot_id(&self, pool: &dyn Pool, s: &crate::pool::SnapshotInfo) -> VolumeId {
        self.object_id(pool, &s.local, Object::Snapshot, s.uid.as_deref())
    }
}
