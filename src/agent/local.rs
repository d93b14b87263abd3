//! The in-process agent: CSI's controller operations on the pools of this process's own
//! [`Driver`] (create, delete, list, expand and snapshot volumes), behind [`AgentOps`]. Each
//! operation validates the request, takes the per-name or per-volume lock, then delegates to
//! the pool that owns the object. `holdfast agent` serves it over the Agent API
//! ([`super::server`]); all-in-one and the controller's own `nfs` pools use it in-process.
//!
//! It also keeps the node's change feed ([`LocalAgent::subscribe`]): every object that
//! appears, changes or disappears, with consecutive sequence numbers, so the controller's index
//! follows without listing. Operations report what they did at once; a detached copy reports
//! when it finishes (even after its request gave up); a periodic pass over the pools reports
//! what nothing else did (a copy restarted at start-up, a pool's health or free space).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::AgentOps;
use crate::agent_proto as ap;
use crate::csi::{decode_caps, lock_key, name_keys, require, topology};
use crate::driver::Driver;
use crate::error::{Error, Result, cut};
use crate::jobs::{self, Work};
use crate::locks::{LockKey, ObjectKind};
use crate::placement::{self, Candidate, Segments};
use crate::pool::{self, CreateRequest, Pool, SnapshotInfo, Source, Survey, VolumeInfo};
use crate::proto::volume_content_source::{self, SnapshotSource, VolumeSource};
use crate::proto::*;
use crate::volume_id::{Object, PoolKind, VolumeId, legacy_local_name, local_name, new_uid};

// issue 12: group snapshots
pub mod group;

/// Capacity of a volume whose request gives no capacity range.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;

/// Volume context key: the filesystem chosen at creation.
pub const CTX_FS_TYPE: &str = "holdfast.dev/fs-type";
/// Volume context key: the pool.
pub const CTX_POOL: &str = "holdfast.dev/pool";
/// Volume context keys of the mutable parameters (issue 12: modify): `holdfast.dev/<key>` with
/// the value the volume has now, e.g. `holdfast.dev/compression=zstd`.
pub const CTX_MUTABLE_PREFIX: &str = "holdfast.dev/";

/// Parameters the CSI layer handles itself.
const PARAM_POOL: &str = "pool";
const PARAM_KIND: &str = "kind";
const PARAM_FS: [&str; 2] = ["csi.storage.k8s.io/fstype", "fsType"];
/// Keys the external-provisioner adds (`--extra-create-metadata`, secrets references).
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

/// The agent of this process's own pools.
pub struct LocalAgent {
    d: Arc<Driver>,
    /// What calls that fan out over every pool last saw of each one: why it is sick, and the
    /// volumes its last good listing had (shown as abnormal while it is sick).
    health: Mutex<BTreeMap<String, PoolHealth>>,
    /// The change feed.
    feed: Feed,
    /// This agent, for the tasks it spawns (a copy's watcher, the periodic pass).
    me: Weak<LocalAgent>,
    /// When this process started (seconds since the epoch), sent in the inventory.
    started_unix: i64,
    // issue 11: cluster
    /// Live claims on CSI names by controllers (see `ClaimNameRequest`), by name.
    claims: Mutex<HashMap<String, NameClaim>>,
    /// Pools whose room is being read to report it (value: it moved again meanwhile).
    room: Mutex<HashMap<String, bool>>,
}

/// One pool as the fan-out calls last saw it.
#[derive(Debug, Default)]
struct PoolHealth {
    /// Why the last call failed; `None` while it answers.
    sick: Option<String>,
    /// Its volumes as its good listings last showed them, by local name: each page replaces
    /// the range it covered (so a page costs the page), an inventory the whole. Shared with
    /// the page being answered (an `Arc`: keeping a page is no copy of its volumes).
    listed: BTreeMap<String, Arc<Known>>,
}

// issue 14: flat
/// A volume of a pool's last-known listing, and its Agent API entry once built: a page of a
/// volume that did not change (the pool answered the same `info`, an `Arc` its index shares)
/// builds no message, it copies the one built before. A change is a new `info`, so a new
/// `Known`, whose entry is built anew.
#[derive(Debug)]
struct Known {
    info: Arc<VolumeInfo>,
    /// [`LocalAgent::volume_entry`] of `info` without a condition.
    entry: std::sync::OnceLock<ap::Volume>,
}

impl Known {
    fn new(info: Arc<VolumeInfo>) -> Arc<Known> {
        Arc::new(Known { info, entry: std::sync::OnceLock::new() })
    }
}

impl PoolHealth {
    /// A good listing answered `got` (in name order) for at most `asked` volumes from `from`
    /// on: that range of the last-known listing is now exactly `got` (to the end of the pool
    /// when fewer came). Answers `got` as known volumes: an entry that is the same `info` as
    /// before is kept (with its built entry), nothing allocated for it.
    fn saw_range(&mut self, from: &str, asked: usize, got: Vec<Arc<VolumeInfo>>) -> Vec<Arc<Known>> {
        use std::ops::Bound::{Included, Unbounded};
        debug_assert!(got.windows(2).all(|w| w[0].local < w[1].local), "a page is in name order");
        let last = got.last().cloned();
        let end = match &last {
            Some(v) if got.len() >= asked => Included(v.local.as_str()),
            _ => Unbounded,
        };
        // One walk over the range and the page together (both in name order), no look-up per volume.
        let (mut out, mut stale, mut new) = (Vec::with_capacity(got.len()), Vec::new(), Vec::new());
        let mut got = got.into_iter().peekable();
        for (k, known) in self.listed.range_mut::<str, _>((Included(from), end)) {
            while let Some(v) = got.next_if(|v| v.local.as_str() < k.as_str()) {
                new.push(Known::new(v));
            }
            match got.next_if(|v| v.local == *k) {
                Some(v) => {
                    if !Arc::ptr_eq(&known.info, &v) {
                        *known = Known::new(v);
                    }
                    out.push(known.clone());
                }
                None => stale.push(k.clone()),
            }
        }
        new.extend(got.map(Known::new));
        for k in stale {
            self.listed.remove(&k);
        }
        for k in &new {
            self.listed.insert(k.info.local.clone(), k.clone());
        }
        if !new.is_empty() {
            out.extend(new);
            out.sort_by(|a, b| a.info.local.cmp(&b.info.local));
        }
        out
    }

    /// At most `max` volumes of the last-known listing from `from` on, in name order.
    fn listed_from(&self, from: &str, max: usize) -> Vec<Arc<Known>> {
        self.listed
            .range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
            .take(max)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl LocalAgent {
    /// The agent of `driver`'s pools. Inside a tokio runtime it also starts the periodic pass
    /// over the pools ([`WATCH_INTERVAL`]), which ends when the agent is dropped.
    pub fn new(driver: Arc<Driver>) -> Arc<LocalAgent> {
        let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let agent = Arc::new_cyclic(|me| LocalAgent {
            d: driver,
            health: Mutex::new(BTreeMap::new()),
            feed: Feed::new(),
            me: me.clone(),
            started_unix,
            claims: Mutex::new(HashMap::new()),
            room: Mutex::new(HashMap::new()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(watch(Arc::downgrade(&agent)));
        }
        agent
    }

    /// The driver whose pools this agent serves.
    pub fn driver(&self) -> &Arc<Driver> {
        &self.d
    }

    /// The changes from now on (see [`ap::Change`]): consecutive sequence numbers, continuing
    /// from the `sequence` of any inventory taken after subscribing. A receiver that lags
    /// (more than [`FEED_CAPACITY`] behind) gets `RecvError::Lagged` and should take a full
    /// inventory again.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ap::Change> {
        self.feed.tx.subscribe()
    }

    /// The sequence number of the last change.
    pub fn sequence(&self) -> u64 {
        self.feed.lock().sequence
    }

    /// When this process started (seconds since the epoch), as the inventory says.
    pub fn started_unix(&self) -> i64 {
        self.started_unix
    }

    /// Records that `pool` answered; logs when it was sick until now.
    fn answered(&self, pool: &dyn Pool) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(was) = h.entry(pool.name().to_owned()).or_default().sick.take() {
            tracing::info!(pool = pool.name(), was = %was, "pool answers again");
            drop(h);
            self.room_moved(pool.name());
        }
    }

    /// Records that `pool` failed with `e`, so the call goes on without it; logs when it was
    /// healthy until now (one line per change, not one per call).
    fn failed(&self, pool: &dyn Pool, e: &Error) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let entry = h.entry(pool.name().to_owned()).or_default();
        let was_well = entry.sick.is_none();
        if was_well {
            tracing::warn!(pool = pool.name(), error = %e, "pool does not answer; calls over all pools go on without it");
        }
        entry.sick = Some(e.to_string());
        drop(h);
        if was_well {
            // Its health changed: the controller hears it now, not at the next periodic pass.
            self.room_moved(pool.name());
        }
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

/// Where an object sorts in a listing: its id without the tag, `kind:node:pool:local`. Within
/// one pool that is the order of local names, so a pool's ordered index gives a page as a
/// range; a token is the key of the first entry of the next page (a four-field id).
pub fn list_key(id: &str) -> &str {
    // Bytes, not a char pattern: a page sorts by this key (issue 14: a pattern search per call
    // was a tenth of a listing).
    match id.bytes().enumerate().filter(|&(_, b)| b == b':').nth(3) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

/// Checks a listing's bounds: `max` not negative, `token` empty or one this driver issues.
pub fn check_page(max: i32, token: &str) -> Result<()> {
    if max < 0 {
        return Err(Error::InvalidArgument(format!("max_entries {max} must not be negative")));
    }
    if !token.is_empty() && VolumeId::parse(token).is_none() {
        return Err(Error::Aborted(format!("starting_token {token:?} is not a token this driver issued; start the listing again")));
    }
    Ok(())
}

/// Splits a list keyed by id into one page in [`list_key`] order: entries from `token` on, at
/// most `max` of them (0 = all), and the token of the next page (empty: none).
pub fn paginate<T>(items: Vec<(String, T)>, max: i32, token: &str) -> Result<(Vec<T>, String)> {
    check_page(max, token)?;
    let token = list_key(token);
    // Each key's length in listing order found once, not at every comparison of the sort.
    let mut items: Vec<(usize, String, T)> =
        items.into_iter().map(|(k, v)| (list_key(&k).len(), k, v)).filter(|(n, k, _)| &k[..*n] >= token).collect();
    items.sort_by(|a, b| a.1[..a.0].cmp(&b.1[..b.0]));
    let mut next = String::new();
    if max > 0 && items.len() > max as usize {
        let (n, k, _) = &items[max as usize];
        next = k[..*n].to_owned();
        items.truncate(max as usize);
    }
    Ok((items.into_iter().map(|(_, _, v)| v).collect(), next))
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

#[cfg(test)]
thread_local! {
    /// How many volume entries ([`LocalAgent::volume_entry`]) this thread built.
    static ENTRIES_BUILT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A volume listed by its pool, with the condition already known (a sick pool's) or not.
type Listed = (Arc<dyn Pool>, Arc<Known>, Option<VolumeCondition>);
/// A volume of a listing page with its condition, when already known (read for the page otherwise).
type PageEntry = (Arc<Known>, Option<VolumeCondition>);

impl LocalAgent {
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
        for (k, value) in &v.mutable {
            ctx.insert(format!("{CTX_MUTABLE_PREFIX}{k}"), value.clone());
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
            group_snapshot_id: self.group_id(pool, s).map(|g| g.to_string()).unwrap_or_default(),
        }
    }

    /// Resolves a volume id to its pool and volume; NOT_FOUND when either is missing, when the
    /// id is a snapshot's, or when the volume under that name is another one (another uid).
    async fn find_volume(&self, id: &str) -> Result<(Arc<dyn Pool>, VolumeInfo)> {
        let missing = || Error::NotFound(format!("volume {} does not exist", crate::error::bounded(id)));
        let vid = VolumeId::parse(id).filter(VolumeId::may_name_volume).ok_or_else(missing)?;
        let pool = self.d.own_pool_of(&vid).ok_or_else(missing)?;
        let v = pool.get_volume(&vid.local).await?.filter(|v| vid.names_volume(v.uid.as_deref())).ok_or_else(missing)?;
        Ok((pool, v))
    }

    /// As [`Self::find_volume`], for snapshot ids.
    async fn find_snapshot(&self, id: &str) -> Result<(Arc<dyn Pool>, SnapshotInfo)> {
        let missing = || Error::NotFound(format!("snapshot {} does not exist", crate::error::bounded(id)));
        let sid = VolumeId::parse(id).filter(VolumeId::may_name_snapshot).ok_or_else(missing)?;
        let pool = self.d.own_pool_of(&sid).ok_or_else(missing)?;
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

    // issue 14: a ready-to-use volume costs what the raw tools cost
    /// As [`Self::volume_named`], for a create about to place a volume: both names asked in
    /// one [`Pool::survey`] (one `lvs` of a thin pool's volume group answers both, and the
    /// placement and create after it), whose `found` is what `volume_named` would answer.
    async fn surveyed(&self, pool: &dyn Pool, csi_name: &str, local: &str) -> Result<Survey> {
        let legacy = legacy_local_name(csi_name);
        let names: Vec<&str> = if legacy == local { vec![local] } else { vec![local, &legacy] };
        let mut survey = pool.survey(&names).await?;
        // The legacy name answers only when its volume was made for this very CSI name.
        survey.found = survey.found.filter(|(i, v)| *i == 0 || v.csi_name == csi_name);
        Ok(survey)
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

    /// CreateVolume placed among this node's pools, waiting for a copy the default time.
    #[cfg(test)]
    async fn create(&self, req: CreateVolumeRequest) -> Result<CreateVolumeResponse> {
        self.create_within("", req, jobs::DEFAULT_WAIT).await
    }

    /// CreateVolume; a copy is waited for at most `budget` (the request's deadline). `pinned`
    /// names the pool to create in (the controller placed it there); empty: placed among this
    /// node's pools. Either way a retry finds the volume in any pool of the node.
    pub async fn create_within(&self, pinned: &str, req: CreateVolumeRequest, budget: Duration) -> Result<CreateVolumeResponse> {
        let budget = jobs::copy_wait(budget);
        // issue 14: events: the PVC the provisioner names (--extra-create-metadata) goes into
        // the volume's event lines; kept while the volume lives in this process.
        let name = req.name.clone();
        let pvc = pvc_of(&req.parameters);
        if let Some(p) = &pvc {
            self.feed.lock().pvc.insert(name.clone(), p.clone());
        }
        let res = self.create_unlogged(pinned, req, budget).await;
        if res.is_err() && pvc.is_some() {
            let mut st = self.feed.lock();
            if !st.volumes.values().any(|s| s.now.as_ref().is_some_and(|v| v.csi_name == name)) {
                st.pvc.remove(&name);
            }
        }
        res
    }

    async fn create_unlogged(&self, pinned: &str, req: CreateVolumeRequest, budget: Duration) -> Result<CreateVolumeResponse> {
        // The budget runs from the call's start: the look-ups before the wait spend it too.
        let deadline = Instant::now() + budget;
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
        // issue 12: modify. The mutable parameters select the pools that can apply them all.
        let mutable: BTreeMap<String, String> = req.mutable_parameters.clone().into_iter().collect();
        if !mutable.is_empty() && !pools.is_empty() {
            let check = |p: &Arc<dyn Pool>| {
                let fs = if block { None } else { Some(fs_req.clone().unwrap_or_else(|| p.default_fs().to_owned())) };
                mutable.iter().try_for_each(|(k, v)| p.check_mutable(block, fs.as_deref(), k, v))
            };
            let first = check(&pools[0]);
            pools.retain(|p| check(p).is_ok());
            if let (true, Err(e)) = (pools.is_empty(), first) {
                return Err(e);
            }
        }

        let local = local_name(&req.name);
        let asked = CreateVolumeRequest { secrets: HashMap::new(), ..req.clone() };
        // A copy an earlier attempt started may still run, detached: wait for it, then answer
        // from what it made, as for any retry.
        if let Some(job) = self.d.jobs.find(&jobs::volume_key(&local)) {
            if job.work().csi_name() == req.name && job.started_for(&asked) {
                self.d.jobs.wait(&job, crate::jobs::left(deadline)).await?;
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
        let (required, limit) = req.capacity_range.map(|r| (r.required_bytes, r.limit_bytes)).unwrap_or((0, 0));
        // What a volume this request made earlier must hold: the size asked for; a copy made
        // with no size asked for was its source's size then, which may have grown since.
        let asked_capacity = if required == 0 && source.is_some() { 0 } else { capacity };
        // Refused only once no earlier attempt is found: a retry of a copy whose source grew
        // meanwhile is answered with the volume that attempt made.
        let too_small = (capacity < min_size && required > 0).then_some(capacity);
        if capacity < min_size {
            capacity = min_size;
        } else if source.is_some() && required == 0 && limit == 0 {
            // A copy with no size asked for (Nomad sends none) is its source's size, not the
            // default size of a new volume.
            capacity = min_size;
        }

        // A retry must find what the first attempt made, wherever it landed. A pool that cannot
        // be asked is passed over here; whether that may hide the first attempt is decided
        // once the candidates are known.
        let mut unasked: Vec<(String, Error)> = Vec::new();
        // What each pool's look told beyond the names (its room, its unit, its listing), for
        // the placement and the create below.
        let mut surveys: HashMap<String, Survey> = HashMap::new();
        for pool in self.d.pools.values() {
            let v = match self.surveyed(pool.as_ref(), &req.name, &local).await {
                Ok(mut survey) => {
                    let found = survey.found.take();
                    surveys.insert(pool.name().to_owned(), survey);
                    match found {
                        Some((_, v)) => v,
                        None => {
                            self.answered(pool.as_ref());
                            continue;
                        }
                    }
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
                capacity: asked_capacity,
                block,
                fs_type: want_fs,
                source: source.clone(),
                parameters: accepted_parameters(pool.as_ref(), &req.parameters),
                limit: if limit == 0 { u64::MAX } else { limit },
                uid: String::new(),
                source_uid: source_uid.clone(),
                mutable: mutable.clone(),
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
            self.note_volume(pool.as_ref(), &v);
            return Ok(CreateVolumeResponse { volume: Some(self.volume_message(pool.as_ref(), &v)) });
        }
        if let Some(asked) = too_small {
            return Err(Error::OutOfRange(format!("requested {asked} bytes is smaller than the source ({min_size} bytes)")));
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
        if !pinned.is_empty() {
            if !self.d.pools.contains_key(pinned) {
                return Err(Error::InvalidArgument(format!(
                    "pool {} is not a pool of node {}",
                    crate::error::bounded(pinned),
                    self.d.node_id
                )));
            }
            pools.retain(|p| p.name() == pinned);
            if pools.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "pool {pinned} of node {} cannot hold this volume: its parameters, capabilities, filesystem, source or \
                     topology select other pools",
                    self.d.node_id
                )));
            }
        }
        let mut candidates = Vec::new();
        let mut sick = Vec::new();
        for p in &pools {
            let free = match surveys.get(p.name()).and_then(|s| s.free) {
                Some(free) => Ok(free),
                None => p.capacity().await,
            };
            match free {
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
        let unit = match surveys.get(pool.name()).and_then(|s| s.unit) {
            Some(unit) => unit,
            None => pool.allocation_unit().await?,
        }
        .max(1);
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
            mutable,
        };
        if creq.source.is_none() {
            let v = match surveys.get(pool.name()) {
                Some(survey) => pool.create_surveyed(&creq, survey).await?,
                None => pool.create_volume(&creq).await?,
            };
            self.note_volume(pool.as_ref(), &v);
            drop(guard);
            return Ok(CreateVolumeResponse { volume: Some(self.volume_message(pool.as_ref(), &v)) });
        }
        // A copy may outlast this request's deadline: it runs detached, holding the lock.
        let work = Work::Volume { pool: pool.name().to_owned(), request: creq };
        let job = self.d.start_copy(pool.clone(), work, Some(Box::new(asked)), guard).await?;
        self.watch_copy(job.clone(), pool.clone(), false, local.clone());
        self.d.jobs.wait(&job, crate::jobs::left(deadline)).await?;
        let missing = || Error::Internal(format!("the copy {local} vanished right after it was made"));
        let v = pool.get_volume(&local).await?.ok_or_else(missing)?;
        self.note_volume(pool.as_ref(), &v);
        Ok(CreateVolumeResponse { volume: Some(self.volume_message(pool.as_ref(), &v)) })
    }

    /// DeleteVolume: an id naming nothing here succeeds.
    pub async fn delete(&self, req: DeleteVolumeRequest) -> Result<DeleteVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        // An id we could never have issued names nothing: deleting nothing succeeds (spec).
        // A snapshot id names no volume: nothing to delete.
        let Some(vid) = VolumeId::parse(&req.volume_id).filter(VolumeId::may_name_volume) else { return Ok(DeleteVolumeResponse {}) };
        let Some(pool) = self.d.own_pool_of(&vid) else {
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
        let csi_name = match pool.get_volume(&vid.local).await {
            Ok(Some(v)) if !vid.names_volume(v.uid.as_deref()) => return Ok(DeleteVolumeResponse {}),
            Err(e) if vid.tag.is_some() => return Err(e),
            Ok(v) => v.map(|v| v.csi_name),
            Err(_) => None,
        };
        pool.delete_volume(&vid.local).await?;
        self.note_volume_gone(pool.as_ref(), &vid.local, csi_name);
        Ok(DeleteVolumeResponse {})
    }

    async fn condition_of(&self, pool: &dyn Pool, local: &str) -> Result<VolumeCondition> {
        let condition = pool.condition(local).await?;
        // A freeze left open past its deadline (crate::node::freeze) makes a healthy pool's
        // volume abnormal: its writers may be blocked.
        let stuck = match condition {
            pool::Condition::Healthy => self.d.freezer.stuck_message(pool.name(), local).await,
            pool::Condition::Abnormal(_) => None,
        };
        Ok(self.noted_condition(pool, local, condition, stuck))
    }

    /// The condition reported for `local`, given its pool's condition and the message of a
    /// freeze stuck on it; a change since the last report is logged.
    fn noted_condition(&self, pool: &dyn Pool, local: &str, condition: pool::Condition, stuck: Option<String>) -> VolumeCondition {
        let c = match (condition, stuck) {
            (pool::Condition::Healthy, Some(m)) => VolumeCondition { abnormal: true, message: m },
            (pool::Condition::Healthy, None) => VolumeCondition { abnormal: false, message: "volume is healthy".into() },
            (pool::Condition::Abnormal(m), _) => VolumeCondition { abnormal: true, message: m },
        };
        self.feed.lock().note_condition(pool.name(), local, &c);
        c
    }

    // issue 14: flat
    /// The conditions of one page's volumes of `pool`, as [`LocalAgent::condition_of`] of each,
    /// read in one pass ([`Pool::conditions`]) with one read of the freeze records.
    async fn conditions_of(&self, pool: &dyn Pool, locals: &[String]) -> Vec<Result<VolumeCondition>> {
        let read = pool.conditions(locals).await;
        let stuck = if read.iter().any(|c| matches!(c, Ok(pool::Condition::Healthy))) {
            self.d.freezer.stuck_messages(pool.name()).await
        } else {
            HashMap::new()
        };
        locals
            .iter()
            .zip(read)
            .map(|(local, c)| {
                let c = c?;
                let stuck = matches!(c, pool::Condition::Healthy).then(|| stuck.get(local).cloned()).flatten();
                Ok(self.noted_condition(pool, local, c, stuck))
            })
            .collect()
    }

    /// One page of this node's volumes in [`list_key`] order, from `token` on, at most `max`
    /// (0: all), with their conditions and the next page's token. Each pool is asked for the
    /// page's range only ([`Pool::list_volumes_from`]) and only the page's volumes have their
    /// condition read: a page costs the page, not the pool.
    async fn volume_page(&self, max: i32, token: &str) -> Result<(Vec<ap::Volume>, String)> {
        check_page(max, token)?;
        let key = list_key(token);
        // One more than the page tells whether a next page exists, and where it starts.
        let want = if max == 0 { usize::MAX } else { max as usize + 1 };
        // Pools in the order of their ids' prefix (`kind:node:pool:`), which is the listing's.
        let mut pools: Vec<(String, &Arc<dyn Pool>)> =
            self.d.pools.values().map(|p| (self.d.object_id(p.as_ref(), "", Object::Volume, None).to_string(), p)).collect();
        pools.sort_by(|a, b| a.0.cmp(&b.0));
        // Each volume with the index of its pool's prefix: only the next page's token is an id.
        let mut items: Vec<(usize, Listed)> = Vec::new();
        for (at, &(ref prefix, pool)) in pools.iter().enumerate() {
            let left = want - items.len();
            if left == 0 {
                break;
            }
            // The token's pool from its local name on; pools before it are done, pools after it from their start.
            let from = match key.strip_prefix(prefix.as_str()) {
                Some(local) if !token.is_empty() => local,
                _ if key > prefix.as_str() => continue,
                _ => "",
            };
            let (volumes, cond) = match pool.list_volumes_from(from, left).await {
                Ok(vs) => {
                    self.answered(pool.as_ref());
                    let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
                    (h.entry(pool.name().to_owned()).or_default().saw_range(from, left, vs), None)
                }
                // A sick pool does not fail the listing: the volumes it had when last listed are
                // listed as abnormal (none after a restart), the other pools answer as usual.
                Err(e) => {
                    self.failed(pool.as_ref(), &e);
                    let cond = VolumeCondition { abnormal: true, message: format!("pool {} does not answer: {e}", pool.name()) };
                    let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
                    let listed = h.get(pool.name()).map(|h| h.listed_from(from, left)).unwrap_or_default();
                    (listed, Some(cond))
                }
            };
            for v in volumes {
                items.push((at, (pool.clone(), v, cond.clone())));
            }
        }
        let mut next = String::new();
        if max > 0 && items.len() > max as usize {
            let (at, (_, v, _)) = &items[max as usize];
            next = format!("{}{}", pools[*at].0, v.info.local);
            items.truncate(max as usize);
        }
        let mut out = Vec::with_capacity(items.len());
        // The page is in pool order: the conditions of each pool's run are read together.
        let mut runs: Vec<(Arc<dyn Pool>, Vec<PageEntry>)> = Vec::new();
        for (_, (pool, v, cond)) in items {
            match runs.last_mut() {
                Some((p, run)) if Arc::ptr_eq(p, &pool) => run.push((v, cond)),
                _ => runs.push((pool, vec![(v, cond)])),
            }
        }
        for (pool, run) in runs {
            let unread: Vec<String> = run.iter().filter(|(_, c)| c.is_none()).map(|(v, _)| v.info.local.clone()).collect();
            let mut read = self.conditions_of(pool.as_ref(), &unread).await.into_iter();
            for (v, cond) in run {
                let cond = match cond.map(Ok).or_else(|| read.next()) {
                    Some(Ok(c)) => c,
                    // Deleted since the pool listed it: it is simply not in this listing.
                    Some(Err(Error::NotFound(_))) => continue,
                    Some(Err(e)) => VolumeCondition { abnormal: true, message: format!("the condition cannot be read: {e}") },
                    None => VolumeCondition { abnormal: true, message: "the condition was not read".into() },
                };
                let mut entry = v.entry.get_or_init(|| self.volume_entry(pool.as_ref(), &v.info, None)).clone();
                entry.condition = Some(cond);
                out.push(entry);
            }
        }
        Ok((out, next))
    }

    /// ListVolumes over this node's pools: a sick pool's volumes are listed abnormal.
    pub async fn list(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse> {
        let (page, next_token) = self.volume_page(req.max_entries, &req.starting_token).await?;
        let entries = page
            .into_iter()
            .map(|e| list_volumes_response::Entry {
                volume: e.volume,
                status: Some(list_volumes_response::VolumeStatus { published_node_ids: vec![], volume_condition: e.condition }),
            })
            .collect();
        Ok(ListVolumesResponse { entries, next_token })
    }

    /// ControllerGetVolume, with the volume's condition.
    pub async fn get_volume(&self, req: ControllerGetVolumeRequest) -> Result<ControllerGetVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let (pool, v) = self.find_volume(&req.volume_id).await?;
        let cond = self.condition_of(pool.as_ref(), &v.local).await?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(self.volume_message(pool.as_ref(), &v)),
            status: Some(controller_get_volume_response::VolumeStatus { published_node_ids: vec![], volume_condition: Some(cond) }),
        })
    }

    /// CSI GetCapacity over this node's pools: the largest volume one matching pool can take.
    pub async fn capacity(&self, req: GetCapacityRequest) -> Result<GetCapacityResponse> {
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

    /// ControllerExpandVolume.
    pub async fn expand(&self, req: ControllerExpandVolumeRequest) -> Result<ControllerExpandVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let range = req.capacity_range.ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
        let _guard = self.d.locks.try_lock(lock_key(&self.d, ObjectKind::Volume, &req.volume_id))?;
        let (pool, v) = self.find_volume(&req.volume_id).await?;
        let want = capacity_for(Some(&range), v.capacity)?;
        let got = pool.expand_volume(&v.local, want).await?;
        match pool.get_volume(&v.local).await {
            Ok(Some(now)) => self.note_volume(pool.as_ref(), &now),
            // Reported by the periodic pass instead.
            _ => tracing::debug!(volume = %v.local, "cannot read the expanded volume back for the change feed"),
        }
        Ok(ControllerExpandVolumeResponse { capacity_bytes: got as i64, node_expansion_required: !v.block })
    }

    // issue 12: modify
    /// ControllerModifyVolume: every key is checked against the volume's pool first (nothing
    /// changes when one is refused), then each key whose value differs is applied in key order
    /// under the volume's lock; a failure part-way leaves the volume's record with the keys
    /// applied so far, and a retry completes the rest.
    pub async fn modify(&self, req: ControllerModifyVolumeRequest) -> Result<ControllerModifyVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        if req.mutable_parameters.is_empty() {
            return Err(Error::InvalidArgument("mutable_parameters is required: the parameters to change".into()));
        }
        let _guard = self.d.locks.try_lock(lock_key(&self.d, ObjectKind::Volume, &req.volume_id))?;
        let (pool, v) = self.find_volume(&req.volume_id).await?;
        let wanted: BTreeMap<String, String> = req.mutable_parameters.into_iter().collect();
        for (k, value) in &wanted {
            pool.check_mutable(v.block, v.fs_type.as_deref(), k, value)?;
        }
        let mut applied = Ok(());
        for (k, value) in wanted.iter().filter(|(k, value)| v.mutable.get(*k) != Some(*value)) {
            if let Err(e) = pool.modify_volume(&v.local, k, value).await {
                applied = Err(e);
                break;
            }
        }
        match pool.get_volume(&v.local).await {
            Ok(Some(now)) => self.note_volume(pool.as_ref(), &now),
            _ => tracing::debug!(volume = %v.local, "cannot read the modified volume back for the change feed"),
        }
        applied.map(|()| ControllerModifyVolumeResponse {})
    }

    /// CreateSnapshot, waiting for a copy the default time.
    #[cfg(test)]
    async fn snapshot(&self, req: CreateSnapshotRequest) -> Result<CreateSnapshotResponse> {
        self.snapshot_within(req, jobs::DEFAULT_WAIT).await
    }

    /// CreateSnapshot; a copy is waited for at most `budget` (the request's deadline).
    pub async fn snapshot_within(&self, req: CreateSnapshotRequest, budget: Duration) -> Result<CreateSnapshotResponse> {
        let deadline = Instant::now() + jobs::copy_wait(budget);
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
                self.d.jobs.wait(&job, crate::jobs::left(deadline)).await?;
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
                self.note_snapshot(p.as_ref(), &s);
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
        self.watch_copy(job.clone(), pool.clone(), true, local.clone());
        self.d.jobs.wait(&job, crate::jobs::left(deadline)).await?;
        let missing = || Error::Internal(format!("the snapshot {local} vanished right after it was made"));
        let s = pool.get_snapshot(&local).await?.ok_or_else(missing)?;
        self.note_snapshot(pool.as_ref(), &s);
        Ok(CreateSnapshotResponse { snapshot: Some(self.snapshot_message(pool.as_ref(), &s)) })
    }

    /// DeleteSnapshot: an id naming nothing here succeeds.
    pub async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<DeleteSnapshotResponse> {
        require("snapshot_id", &req.snapshot_id)?;
        // A volume id names no snapshot: nothing to delete.
        let Some(sid) = VolumeId::parse(&req.snapshot_id).filter(VolumeId::may_name_snapshot) else {
            return Ok(DeleteSnapshotResponse {});
        };
        let Some(pool) = self.d.own_pool_of(&sid) else { return Ok(DeleteSnapshotResponse {}) };
        let _guard = self.d.locks.try_lock(LockKey::new(pool.name(), ObjectKind::Snapshot, &sid.local))?;
        // The snapshot under that name may be another one (deleted and taken again): left alone;
        // an unreadable record as for volumes.
        let csi_name = match pool.get_snapshot(&sid.local).await {
            Ok(Some(s)) if !sid.names_snapshot(s.uid.as_deref()) => return Ok(DeleteSnapshotResponse {}),
            // issue 12: the spec's error table: a member goes with its group only.
            Ok(Some(s)) if s.group.is_some() => {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {} is a member of group snapshot {}: it cannot be deleted alone; delete the group (DeleteVolumeGroupSnapshot)",
                    crate::error::bounded(&req.snapshot_id),
                    self.group_id(pool.as_ref(), &s).map(|g| g.to_string()).unwrap_or_default()
                )));
            }
            Err(e) if sid.tag.is_some() => return Err(e),
            Ok(s) => s.map(|s| s.csi_name),
            Err(_) => None,
        };
        pool.delete_snapshot(&sid.local).await?;
        self.note_snapshot_gone(pool.as_ref(), &sid.local, csi_name);
        Ok(DeleteSnapshotResponse {})
    }

    /// ListSnapshots over this node's pools, filtered as the request asks.
    pub async fn list_snapshots(&self, req: ListSnapshotsRequest) -> Result<ListSnapshotsResponse> {
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

    /// GetSnapshot.
    pub async fn get_snapshot(&self, req: GetSnapshotRequest) -> Result<GetSnapshotResponse> {
        require("snapshot_id", &req.snapshot_id)?;
        let (pool, s) = self.find_snapshot(&req.snapshot_id).await?;
        Ok(GetSnapshotResponse { snapshot: Some(self.snapshot_message(pool.as_ref(), &s)) })
    }
}

/// The request parameters `pool` understands: what a create passes it, and compares on a retry.
fn accepted_parameters(pool: &dyn Pool, parameters: &HashMap<String, String>) -> BTreeMap<String, String> {
    parameters.iter().filter(|(k, _)| pool.accepts_parameter(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// How many changes a subscriber may fall behind before it is told it lagged (and takes a
/// full inventory again).
pub const FEED_CAPACITY: usize = 4096;
/// How often the periodic pass looks at every pool's health and free space.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(15);
/// Every how many passes it also lists every volume and snapshot, reporting what no
/// operation did (a copy restarted at start-up, a volume removed by hand).
const FULL_PASS_EVERY: u32 = 4;
/// A pool's largest allocatable volume moved "noticeably" when it changed by at least this
/// fraction of what was reported last (1/16), or went to or from zero.
const NOTICEABLE: u64 = 16;
/// Page size of the Agent API's listings when the caller asks for none.
const DEFAULT_PAGE: u32 = 1000;

/// The StorageClass parameters some pool kind understands, for the inventory (each pool
/// reports those its `accepts_parameter` takes).
fn known_parameters() -> impl Iterator<Item = &'static str> {
    let nfs = [crate::pool::nfs::PARAM_MODE, crate::pool::nfs::PARAM_UID, crate::pool::nfs::PARAM_GID];
    let zfs = crate::pool::zfs::properties::PARAMETERS.into_iter().map(|(k, _)| k);
    ["provisioning"].into_iter().chain(nfs).chain(zfs)
}

/// A pool and the local name of one of its objects.
type Key = (String, String);

// issue 14: events
/// The PVC name and namespace in CreateVolume's parameters (`--extra-create-metadata`).
fn pvc_of(parameters: &HashMap<String, String>) -> Option<(String, String)> {
    let name = parameters.get(crate::pool::nfs::template::PARAM_PVC_NAME)?;
    let namespace = parameters.get(crate::pool::nfs::template::PARAM_PVC_NAMESPACE).cloned().unwrap_or_default();
    Some((cut(name).to_owned(), cut(&namespace).to_owned()))
}

/// Logs one volume event: exactly one line per change the feed reports (see
/// [`FeedState::send`]), with the ids an operator searches by.
fn volume_event(event: &str, v: &ap::Volume, pvc: Option<&(String, String)>, capacity: i64) {
    let id = v.volume.as_ref().map(|x| x.volume_id.as_str()).unwrap_or_default();
    let (pvc_name, pvc_namespace) = pvc.map(|(n, ns)| (n.as_str(), ns.as_str())).unwrap_or_default();
    tracing::info!(event, volume_id = id, csi_name = cut(&v.csi_name), pool = %v.pool, pvc_name, pvc_namespace, capacity_bytes = capacity, "volume {event}");
}

/// What the feed last reported of one object: the sequence number of that report and the
/// object (`None`: reported gone).
#[derive(Debug, Clone)]
struct Seen<T> {
    sequence: u64,
    now: Option<T>,
}

/// The change feed: what was last reported of every object and pool, and the channel.
struct Feed {
    state: Mutex<FeedState>,
    tx: tokio::sync::broadcast::Sender<ap::Change>,
}

#[derive(Default)]
struct FeedState {
    sequence: u64,
    /// Whether a full pass has run: before it, the feed knows only what operations reported,
    /// and the first pass records what it finds without reporting it (it is in the inventory).
    initialised: bool,
    /// Only through [`FeedState::record_volume`], which keeps `usage` true.
    volumes: HashMap<Key, Seen<ap::Volume>>,
    snapshots: HashMap<Key, Seen<ap::Snapshot>>,
    pools: HashMap<String, ap::Pool>,
    // issue 14: flat
    /// Per pool, the capacity bytes and number of the volumes in `volumes` that are not gone:
    /// running totals, so reporting a pool's room after a create costs no walk of the pool.
    usage: HashMap<String, (u64, u32)>,
    // issue 14: events
    /// The PVC (name, namespace) of each volume created by CSI name, for its event lines.
    pvc: HashMap<String, (String, String)>,
    /// The volumes last seen abnormal (their condition), so each change is logged once.
    abnormal: std::collections::HashSet<Key>,
}

impl Feed {
    fn new() -> Feed {
        let (tx, _) = tokio::sync::broadcast::channel(FEED_CAPACITY);
        Feed { state: Mutex::new(FeedState::default()), tx }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FeedState {
    /// Numbers, records and sends one change (under the lock, so numbers go out in order).
    fn send(&mut self, tx: &tokio::sync::broadcast::Sender<ap::Change>, change: ap::change::Change) {
        use ap::change::Change as C;
        self.sequence += 1;
        let sequence = self.sequence;
        self.log_event(&change);
        match &change {
            C::VolumeCreated(v) | C::VolumeUpdated(v) => {
                self.record_volume((v.pool.clone(), v.local_name.clone()), Seen { sequence, now: Some(v.clone()) });
            }
            C::VolumeDeleted(r) => {
                self.record_volume((r.pool.clone(), r.local_name.clone()), Seen { sequence, now: None });
            }
            C::SnapshotCreated(s) => {
                self.snapshots.insert((s.pool.clone(), s.local_name.clone()), Seen { sequence, now: Some(s.clone()) });
            }
            C::SnapshotDeleted(r) => {
                self.snapshots.insert((r.pool.clone(), r.local_name.clone()), Seen { sequence, now: None });
            }
            C::PoolUpdated(p) => {
                self.pools.insert(p.name.clone(), p.clone());
            }
            C::PoolCapacity(c) => {
                if let Some(p) = self.pools.get_mut(&c.pool) {
                    p.capacity = Some(c.clone());
                }
            }
        }
        // No subscriber is no error: the next registration sends the inventory.
        let _ = tx.send(ap::Change { sequence, change: Some(change) });
    }

    // issue 14: flat
    /// Records what the feed now knows of volume `key`, moving its pool's running totals by
    /// the difference between the old and the new volume.
    fn record_volume(&mut self, key: Key, seen: Seen<ap::Volume>) {
        let bytes = |v: &ap::Volume| v.volume.as_ref().map(|v| v.capacity_bytes.max(0) as u64).unwrap_or(0);
        let pool = key.0.clone();
        let new = seen.now.as_ref().map(bytes);
        let old = self.volumes.insert(key, seen).and_then(|s| s.now.as_ref().map(bytes));
        let (used, count) = self.usage.entry(pool).or_default();
        if let Some(b) = old {
            *used = used.wrapping_sub(b);
            *count = count.wrapping_sub(1);
        }
        if let Some(b) = new {
            *used = used.wrapping_add(b);
            *count = count.wrapping_add(1);
        }
    }

    // issue 14: events
    /// Logs `local`'s condition when it changed since last read: found abnormal, or healthy again.
    fn note_condition(&mut self, pool: &str, local: &str, c: &VolumeCondition) {
        // Healthy, and no volume known abnormal (every page of a healthy pool): no key is made.
        if !c.abnormal && self.abnormal.is_empty() {
            return;
        }
        let key = (pool.to_owned(), local.to_owned());
        let changed = if c.abnormal { self.abnormal.insert(key.clone()) } else { self.abnormal.remove(&key) };
        if !changed {
            return;
        }
        let v = self.volumes.get(&key).and_then(|s| s.now.as_ref());
        let csi_name = v.map(|v| cut(&v.csi_name)).unwrap_or_default();
        let volume_id = v.and_then(|v| v.volume.as_ref()).map(|x| x.volume_id.as_str()).unwrap_or_default();
        let (pvc_name, pvc_namespace) =
            v.and_then(|v| self.pvc.get(&v.csi_name)).map(|(n, ns)| (n.as_str(), ns.as_str())).unwrap_or_default();
        let message = cut(&c.message);
        if c.abnormal {
            tracing::warn!(
                event = "abnormal",
                volume_id,
                csi_name,
                pool,
                local_name = local,
                pvc_name,
                pvc_namespace,
                message,
                "volume found abnormal"
            );
        } else {
            tracing::info!(
                event = "healthy",
                volume_id,
                csi_name,
                pool,
                local_name = local,
                pvc_name,
                pvc_namespace,
                "volume healthy again"
            );
        }
    }

    /// The event line of `change` (before it is recorded: the old state is still here).
    fn log_event(&mut self, change: &ap::change::Change) {
        use ap::change::Change as C;
        let cap = |v: &ap::Volume| v.volume.as_ref().map(|x| x.capacity_bytes).unwrap_or(0);
        match change {
            C::VolumeCreated(v) => volume_event("created", v, self.pvc.get(&v.csi_name), cap(v)),
            C::VolumeUpdated(v) => {
                let was = self.volumes.get(&(v.pool.clone(), v.local_name.clone())).and_then(|s| s.now.as_ref()).map(cap);
                let event = if was.is_some_and(|w| w < cap(v)) { "expanded" } else { "changed" };
                volume_event(event, v, self.pvc.get(&v.csi_name), cap(v));
            }
            C::VolumeDeleted(r) => {
                let id =
                    self.volumes.get(&(r.pool.clone(), r.local_name.clone())).and_then(|s| s.now.as_ref()).and_then(|v| v.volume.clone());
                let pvc = self.pvc.remove(&r.csi_name);
                self.abnormal.remove(&(r.pool.clone(), r.local_name.clone()));
                let (pvc_name, pvc_namespace) = pvc.as_ref().map(|(n, ns)| (n.as_str(), ns.as_str())).unwrap_or_default();
                let volume_id = id.as_ref().map(|v| v.volume_id.as_str()).unwrap_or_default();
                tracing::info!(event = "deleted", volume_id, csi_name = cut(&r.csi_name), pool = %r.pool, local_name = %r.local_name, pvc_name, pvc_namespace, "volume deleted");
            }
            C::SnapshotCreated(s) => {
                let (id, source) = s.snapshot.as_ref().map(|x| (x.snapshot_id.as_str(), x.source_volume_id.as_str())).unwrap_or_default();
                tracing::info!(event = "snapshotted", snapshot_id = id, volume_id = source, csi_name = cut(&s.csi_name), pool = %s.pool, "volume snapshotted");
            }
            C::SnapshotDeleted(r) => {
                tracing::info!(event = "snapshot deleted", csi_name = cut(&r.csi_name), pool = %r.pool, local_name = %r.local_name, "snapshot deleted");
            }
            C::PoolUpdated(_) | C::PoolCapacity(_) => {}
        }
    }

    /// Reports `v` unless the feed last said exactly that.
    fn volume(&mut self, tx: &tokio::sync::broadcast::Sender<ap::Change>, v: ap::Volume) {
        use ap::change::Change as C;
        let key = (v.pool.clone(), v.local_name.clone());
        let change = match self.volumes.get(&key).and_then(|s| s.now.as_ref()) {
            Some(old) if old.volume == v.volume && old.csi_name == v.csi_name => return,
            // The same volume, changed (expanded); another id is another volume.
            Some(old) if old.volume.as_ref().map(|o| &o.volume_id) == v.volume.as_ref().map(|n| &n.volume_id) => C::VolumeUpdated(v),
            _ => C::VolumeCreated(v),
        };
        self.send(tx, change);
    }

    /// Reports the volume `key` gone unless the feed already did.
    fn volume_gone(&mut self, tx: &tokio::sync::broadcast::Sender<ap::Change>, key: Key, csi_name: Option<String>) {
        let known = self.volumes.get(&key).map(|s| s.now.as_ref().map(|v| v.csi_name.clone()));
        let csi_name = match known {
            Some(None) => return,
            Some(Some(n)) => n,
            None => csi_name.unwrap_or_default(),
        };
        self.send(tx, ap::change::Change::VolumeDeleted(ap::VolumeRef { pool: key.0, local_name: key.1, csi_name }));
    }

    /// Reports `s` unless the feed last said exactly that.
    fn snapshot(&mut self, tx: &tokio::sync::broadcast::Sender<ap::Change>, s: ap::Snapshot) {
        let key = (s.pool.clone(), s.local_name.clone());
        if let Some(old) = self.snapshots.get(&key).and_then(|x| x.now.as_ref()) {
            if old.snapshot == s.snapshot && old.csi_name == s.csi_name {
                return;
            }
        }
        self.send(tx, ap::change::Change::SnapshotCreated(s));
    }

    /// Reports the snapshot `key` gone unless the feed already did.
    fn snapshot_gone(&mut self, tx: &tokio::sync::broadcast::Sender<ap::Change>, key: Key, csi_name: Option<String>) {
        let known = self.snapshots.get(&key).map(|s| s.now.as_ref().map(|v| v.csi_name.clone()));
        let csi_name = match known {
            Some(None) => return,
            Some(Some(n)) => n,
            None => csi_name.unwrap_or_default(),
        };
        self.send(tx, ap::change::Change::SnapshotDeleted(ap::SnapshotRef { pool: key.0, local_name: key.1, csi_name }));
    }

    /// Reports `p` when its health changed or its room moved noticeably since the last report.
    fn pool(&mut self, tx: &tokio::sync::broadcast::Sender<ap::Change>, p: ap::Pool) {
        let Some(old) = self.pools.get(&p.name) else {
            // First sight: in the inventory, not a change.
            self.pools.insert(p.name.clone(), p);
            return;
        };
        let largest = |p: &ap::Pool| p.capacity.as_ref().map(|c| c.largest_volume_bytes).unwrap_or(0);
        let (was, now) = (largest(old), largest(&p));
        let moved = (was == 0) != (now == 0) || was.abs_diff(now) >= was / NOTICEABLE;
        if old.health != p.health || old.health_message != p.health_message || (moved && was != now) {
            self.send(tx, ap::change::Change::PoolUpdated(p));
        }
    }
}

/// The periodic pass over the pools of `agent`, until the agent is dropped.
async fn watch(agent: Weak<LocalAgent>) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut n, mut seen_before) = (0u32, 0u64);
    loop {
        tick.tick().await;
        let Some(agent) = agent.upgrade() else { return };
        // Nobody follows the feed (all-in-one, before registering): nothing to report, and
        // whoever subscribes later starts from an inventory. What was reported gone a tick
        // ago is forgotten (the full pass does that otherwise), so churn costs no memory.
        if agent.feed.tx.receiver_count() == 0 {
            let mut st = agent.feed.lock();
            st.volumes.retain(|_, s| s.now.is_some() || s.sequence > seen_before);
            st.snapshots.retain(|_, s| s.now.is_some() || s.sequence > seen_before);
            seen_before = st.sequence;
            continue;
        }
        n = n.wrapping_add(1);
        if n % FULL_PASS_EVERY == 1 {
            agent.take_inventory().await;
        } else {
            agent.pass_over_pools().await;
        }
    }
}

impl LocalAgent {
    /// A volume as the Agent API reports it.
    fn volume_entry(&self, pool: &dyn Pool, v: &VolumeInfo, condition: Option<VolumeCondition>) -> ap::Volume {
        #[cfg(test)]
        ENTRIES_BUILT.with(|n| n.set(n.get() + 1));
        ap::Volume {
            pool: pool.name().to_owned(),
            local_name: v.local.clone(),
            csi_name: v.csi_name.clone(),
            volume: Some(self.volume_message(pool, v)),
            condition,
            // issue 11: perf11. The schema this pool writes its records in (an older record
            // is rewritten in it on its next change).
            record_schema: crate::pool::schema::record_schema(pool.kind()),
        }
    }

    /// A snapshot as the Agent API reports it.
    fn snapshot_entry(&self, pool: &dyn Pool, s: &SnapshotInfo) -> ap::Snapshot {
        ap::Snapshot {
            pool: pool.name().to_owned(),
            local_name: s.local.clone(),
            csi_name: s.csi_name.clone(),
            snapshot: Some(self.snapshot_message(pool, s)),
            record_schema: crate::pool::schema::record_schema(pool.kind()),
        }
    }

    /// Reports a volume made or changed. The pool's last-known listing takes it too, so a pool
    /// that falls sick before its next listing still shows it (abnormal) in ListVolumes.
    fn note_volume(&self, pool: &dyn Pool, v: &VolumeInfo) {
        let entry = self.volume_entry(pool, v, None);
        self.feed.lock().volume(&self.feed.tx, entry);
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.entry(pool.name().to_owned()).or_default().listed.insert(v.local.clone(), Known::new(Arc::new(v.clone())));
    }

    /// Reports a volume deleted (and takes it out of the pool's last-known listing).
    fn note_volume_gone(&self, pool: &dyn Pool, local: &str, csi_name: Option<String>) {
        self.feed.lock().volume_gone(&self.feed.tx, (pool.name().to_owned(), local.to_owned()), csi_name);
        if let Some(h) = self.health.lock().unwrap_or_else(|e| e.into_inner()).get_mut(pool.name()) {
            h.listed.remove(local);
        }
    }

    /// Reports a snapshot taken.
    fn note_snapshot(&self, pool: &dyn Pool, s: &SnapshotInfo) {
        let entry = self.snapshot_entry(pool, s);
        self.feed.lock().snapshot(&self.feed.tx, entry);
    }

    /// Reports a snapshot deleted.
    fn note_snapshot_gone(&self, pool: &dyn Pool, local: &str, csi_name: Option<String>) {
        self.feed.lock().snapshot_gone(&self.feed.tx, (pool.name().to_owned(), local.to_owned()), csi_name);
    }

    /// Reports the object of a detached copy when it is done, even if no request waits for
    /// it any more (its request gave up, the retry comes later or never).
    fn watch_copy(&self, job: Arc<jobs::Job>, pool: Arc<dyn Pool>, snapshot: bool, local: String) {
        let me = self.me.clone();
        // A report of the object after this point (the retry that waited, a delete that
        // followed at once) is newer than what the watcher reads: it then reports nothing.
        let since = self.feed.lock().sequence;
        tokio::spawn(async move {
            job.finished().await;
            let Some(agent) = me.upgrade() else { return };
            let key = (pool.name().to_owned(), local.clone());
            // A failed copy left nothing to report; what it left is the pool's to clean.
            if snapshot {
                if let Ok(Some(s)) = pool.get_snapshot(&local).await {
                    let entry = agent.snapshot_entry(pool.as_ref(), &s);
                    let mut st = agent.feed.lock();
                    if st.snapshots.get(&key).is_none_or(|x| x.sequence <= since) {
                        st.snapshot(&agent.feed.tx, entry);
                    }
                }
            } else if let Ok(Some(v)) = pool.get_volume(&local).await {
                let entry = agent.volume_entry(pool.as_ref(), &v, None);
                let mut st = agent.feed.lock();
                if st.volumes.get(&key).is_none_or(|x| x.sequence <= since) {
                    st.volume(&agent.feed.tx, entry);
                }
            }
        });
    }

    /// Used bytes and volume count of `pool`: the feed's running totals once a full pass ran
    /// (no walk of the pool's volumes), the pool's listing before.
    async fn usage(&self, pool: &dyn Pool) -> Result<(u64, u32)> {
        {
            let st = self.feed.lock();
            if st.initialised {
                return Ok(st.usage.get(pool.name()).copied().unwrap_or_default());
            }
        }
        let all = pool.list_volumes().await?;
        Ok((all.iter().map(|v| v.capacity).sum(), all.len() as u32))
    }

    /// One pool's capacity now.
    async fn pool_capacity(&self, pool: &dyn Pool) -> Result<ap::PoolCapacity> {
        // issue 14: what one look at the pool tells (a thin LVM pool's room and extent size
        // from one `lvs`); the rest asked apart.
        let survey = pool.survey(&[]).await?;
        let largest = match survey.free {
            Some(free) => free,
            None => pool.capacity().await?,
        };
        let unit = match survey.unit {
            Some(unit) => unit,
            None => pool.allocation_unit().await?,
        }
        .max(1);
        let (used, count) = self.usage(pool).await?;
        Ok(ap::PoolCapacity {
            pool: pool.name().to_owned(),
            largest_volume_bytes: largest,
            used_bytes: used,
            free_bytes: largest,
            volume_count: count,
            // Raw block; a filesystem may need more (crate::node::format::min_size).
            minimum_volume_bytes: minimum_size(None, unit),
        })
    }

    // issue 14: metrics
    /// Every pool as the inventory describes it, health and capacity read now (for the
    /// metrics and `/status` of this process).
    pub async fn pool_reports(&self) -> Vec<ap::Pool> {
        let mut out = Vec::with_capacity(self.d.pools.len());
        for pool in self.d.pools.values() {
            out.push(self.pool_entry(pool.as_ref()).await);
        }
        out
    }

    /// One pool as the inventory describes it, health and capacity read now.
    async fn pool_entry(&self, pool: &dyn Pool) -> ap::Pool {
        let (health, message, capacity) = match self.pool_capacity(pool).await {
            Ok(c) => {
                self.answered(pool);
                (ap::PoolHealth::Healthy, String::new(), c)
            }
            Err(e) => {
                self.failed(pool, &e);
                let empty = ap::PoolCapacity { pool: pool.name().to_owned(), ..Default::default() };
                (ap::PoolHealth::Unavailable, crate::error::status_message(&e.to_string()), empty)
            }
        };
        ap::Pool {
            name: pool.name().to_owned(),
            kind: pool.kind().as_str().to_owned(),
            labels: self.d.labels.get(pool.name()).map(|l| l.clone().into_iter().collect()).unwrap_or_default(),
            health: health as i32,
            health_message: message,
            capacity: Some(capacity),
            filesystems: pool.filesystems().iter().map(|f| f.to_string()).collect(),
            default_fs: pool.default_fs().to_owned(),
            // Shared pools serve filesystems only (Capability::supported_by).
            block: pool.kind() != PoolKind::Nfs,
            multi_node: pool.multi_node(),
            parameters: known_parameters().filter(|k| pool.accepts_parameter(k)).map(str::to_owned).collect(),
            segments: pool.topology().unwrap_or_default().into_iter().collect(),
        }
    }

    /// Reads every pool's health and room and reports those that moved.
    async fn pass_over_pools(&self) {
        for pool in self.d.pools.values() {
            let entry = self.pool_entry(pool.as_ref()).await;
            self.feed.lock().pool(&self.feed.tx, entry);
        }
    }

    /// Lists every pool, reports what differs from what the feed last said (objects no
    /// operation reported), and answers the inventory as of its `sequence`. An object an
    /// operation reported while the pools were being listed keeps that report (it is newer
    /// than the listing); a pool that cannot be listed keeps what was known of it.
    async fn take_inventory(&self) -> ap::Inventory {
        let start = self.feed.lock().sequence;
        let (mut volumes, mut snapshots) = (HashMap::new(), HashMap::new());
        let (mut unlisted_volumes, mut unlisted_snapshots) = (Vec::new(), Vec::new());
        let mut pools = Vec::new();
        for pool in self.d.pools.values() {
            match pool.list_volumes().await {
                Ok(vs) => {
                    for v in &vs {
                        volumes.insert((pool.name().to_owned(), v.local.clone()), self.volume_entry(pool.as_ref(), v, None));
                    }
                    self.health.lock().unwrap_or_else(|e| e.into_inner()).entry(pool.name().to_owned()).or_default().listed =
                        vs.into_iter().map(|v| (v.local.clone(), Known::new(Arc::new(v)))).collect();
                }
                Err(e) => {
                    self.failed(pool.as_ref(), &e);
                    unlisted_volumes.push(pool.name().to_owned());
                }
            }
            match pool.list_snapshots().await {
                Ok(ss) => {
                    for s in &ss {
                        snapshots.insert((pool.name().to_owned(), s.local.clone()), self.snapshot_entry(pool.as_ref(), s));
                    }
                }
                Err(e) => {
                    self.failed(pool.as_ref(), &e);
                    unlisted_snapshots.push(pool.name().to_owned());
                }
            }
            pools.push(self.pool_entry(pool.as_ref()).await);
        }
        let tx = &self.feed.tx;
        let mut st = self.feed.lock();
        let first = !st.initialised;
        let keys: std::collections::BTreeSet<Key> = volumes.keys().chain(st.volumes.keys()).cloned().collect();
        for key in keys {
            if unlisted_volumes.contains(&key.0) || st.volumes.get(&key).is_some_and(|s| s.sequence > start) {
                continue;
            }
            match (volumes.remove(&key), first) {
                (Some(v), false) => st.volume(tx, v),
                (None, false) => st.volume_gone(tx, key, None),
                (now, true) => st.record_volume(key, Seen { sequence: 0, now }),
            }
        }
        let keys: std::collections::BTreeSet<Key> = snapshots.keys().chain(st.snapshots.keys()).cloned().collect();
        for key in keys {
            if unlisted_snapshots.contains(&key.0) || st.snapshots.get(&key).is_some_and(|s| s.sequence > start) {
                continue;
            }
            match (snapshots.remove(&key), first) {
                (Some(s), false) => st.snapshot(tx, s),
                (None, false) => st.snapshot_gone(tx, key, None),
                (now, true) => {
                    st.snapshots.insert(key, Seen { sequence: 0, now });
                }
            }
        }
        for p in &pools {
            st.pool(tx, p.clone());
        }
        st.initialised = true;
        // What is reported gone needs remembering only while a listing may still show it.
        st.volumes.retain(|_, s| s.now.is_some() || s.sequence > start);
        st.snapshots.retain(|_, s| s.now.is_some() || s.sequence > start);
        let mut inventory = ap::Inventory {
            node_id: self.d.node_id.clone(),
            advertised_address: String::new(),
            segments: self.d.segments.clone().into_iter().collect(),
            pools,
            volumes: st.volumes.values().filter_map(|s| s.now.clone()).collect(),
            snapshots: st.snapshots.values().filter_map(|s| s.now.clone()).collect(),
            sequence: st.sequence,
            agent_started_unix: self.started_unix,
            agent_release: env!("CARGO_PKG_VERSION").to_owned(),
        };
        drop(st);
        inventory.volumes.sort_by(|a, b| (&a.pool, &a.local_name).cmp(&(&b.pool, &b.local_name)));
        inventory.snapshots.sort_by(|a, b| (&a.pool, &a.local_name).cmp(&(&b.pool, &b.local_name)));
        inventory
    }

    /// Every snapshot of this node, keyed by id; a pool that cannot be listed is left out.
    async fn snapshot_entries(&self) -> Vec<(String, ap::Snapshot)> {
        let mut items = Vec::new();
        for pool in self.d.pools.values() {
            match pool.list_snapshots().await {
                Ok(ss) => {
                    self.answered(pool.as_ref());
                    for s in ss {
                        items.push((self.d.snapshot_id(pool.as_ref(), &s).to_string(), self.snapshot_entry(pool.as_ref(), &s)));
                    }
                }
                Err(e) => self.failed(pool.as_ref(), &e),
            }
        }
        items
    }
}

/// Page bounds of the Agent API (unsigned, 0 = the default page) as the CSI helper takes them.
fn page_size(max: u32) -> i32 {
    let max = if max == 0 { DEFAULT_PAGE } else { max };
    i32::try_from(max).unwrap_or(i32::MAX)
}

#[tonic::async_trait]
impl AgentOps for LocalAgent {
    fn node_id(&self) -> &str {
        &self.d.node_id
    }

    async fn create_volume(&self, req: ap::CreateVolumeRequest, budget: Duration) -> Result<CreateVolumeResponse> {
        let csi = req.request.ok_or_else(|| Error::InvalidArgument("request is required".into()))?;
        if !req.controller.is_empty() {
            self.claim_for_create(&csi.name, &req.controller, &req.pool)?;
        }
        let res = self.create_within(&req.pool, csi, budget).await;
        if let Some(id) = res.as_ref().ok().and_then(|r| r.volume.as_ref()).and_then(|v| VolumeId::parse(&v.volume_id)) {
            self.room_moved(&id.pool);
        }
        res
    }

    async fn delete_volume(&self, req: DeleteVolumeRequest, _budget: Duration) -> Result<DeleteVolumeResponse> {
        let pool = VolumeId::parse(&req.volume_id).map(|i| i.pool);
        let res = self.delete(req).await;
        if let (Ok(_), Some(p)) = (&res, pool) {
            self.room_moved(&p);
        }
        res
    }

    async fn expand_volume(&self, req: ControllerExpandVolumeRequest, _budget: Duration) -> Result<ControllerExpandVolumeResponse> {
        let pool = VolumeId::parse(&req.volume_id).map(|i| i.pool);
        let res = self.expand(req).await;
        if let (Ok(_), Some(p)) = (&res, pool) {
            self.room_moved(&p);
        }
        res
    }

    async fn create_snapshot(&self, req: CreateSnapshotRequest, budget: Duration) -> Result<CreateSnapshotResponse> {
        self.snapshot_within(req, budget).await
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest, _budget: Duration) -> Result<DeleteSnapshotResponse> {
        LocalAgent::delete_snapshot(self, req).await
    }

    async fn get_volume(&self, req: ap::GetVolumeRequest, _budget: Duration) -> Result<ap::GetVolumeResponse> {
        use ap::get_volume_request::Key;
        let found = match req.key {
            Some(Key::VolumeId(id)) => match self.find_volume(&id).await {
                Ok(found) => Some(found),
                Err(Error::NotFound(_)) => None,
                Err(e) => return Err(e),
            },
            Some(Key::CsiName(name)) => {
                require("csi_name", &name)?;
                let local = local_name(&name);
                let mut found = None;
                // Every pool that matters must answer: "none" from a candidate that was not
                // asked could make a second volume of this name elsewhere. A pool the create
                // could not use anyway is passed over (one sick pool stays one sick pool).
                let matters = |p: &str| req.pools.is_empty() || req.pools.iter().any(|c| c == p);
                for pool in self.d.pools.values() {
                    match self.volume_named(pool.as_ref(), &name, &local).await {
                        Ok(Some(v)) if v.csi_name == name => {
                            found = Some((pool.clone(), v));
                            break;
                        }
                        Ok(_) => self.answered(pool.as_ref()),
                        Err(e) if !matters(pool.name()) => self.failed(pool.as_ref(), &e),
                        Err(e) => {
                            self.failed(pool.as_ref(), &e);
                            return Err(Error::Unavailable(format!(
                                "pool {} of node {} cannot be asked whether volume {} exists: {e}",
                                pool.name(),
                                self.d.node_id,
                                crate::error::bounded(&name)
                            )));
                        }
                    }
                }
                found
            }
            None => return Err(Error::InvalidArgument("volume_id or csi_name is required".into())),
        };
        let Some((pool, v)) = found else { return Ok(ap::GetVolumeResponse { volume: None }) };
        let condition = match self.condition_of(pool.as_ref(), &v.local).await {
            Ok(c) => c,
            Err(e) => VolumeCondition { abnormal: true, message: format!("the condition cannot be read: {e}") },
        };
        Ok(ap::GetVolumeResponse { volume: Some(self.volume_entry(pool.as_ref(), &v, Some(condition))) })
    }

    async fn list_volumes(&self, req: ap::ListVolumesRequest, _budget: Duration) -> Result<ap::ListVolumesResponse> {
        let (volumes, next_token) = self.volume_page(page_size(req.max_entries), &req.starting_token).await?;
        Ok(ap::ListVolumesResponse { volumes, next_token })
    }

    async fn get_snapshot(&self, req: ap::GetSnapshotRequest, _budget: Duration) -> Result<ap::GetSnapshotResponse> {
        use ap::get_snapshot_request::Key;
        let found = match req.key {
            Some(Key::SnapshotId(id)) => match self.find_snapshot(&id).await {
                Ok(found) => Some(found),
                Err(Error::NotFound(_)) => None,
                Err(e) => return Err(e),
            },
            Some(Key::CsiName(name)) => {
                require("csi_name", &name)?;
                let local = local_name(&name);
                let mut found = None;
                for pool in self.d.pools.values() {
                    match self.snapshot_named(pool.as_ref(), &name, &local).await {
                        Ok(Some(s)) if s.csi_name == name => {
                            found = Some((pool.clone(), s));
                            break;
                        }
                        Ok(_) => self.answered(pool.as_ref()),
                        Err(e) => {
                            self.failed(pool.as_ref(), &e);
                            return Err(Error::Unavailable(format!(
                                "pool {} of node {} cannot be asked whether snapshot {} exists: {e}",
                                pool.name(),
                                self.d.node_id,
                                crate::error::bounded(&name)
                            )));
                        }
                    }
                }
                found
            }
            None => return Err(Error::InvalidArgument("snapshot_id or csi_name is required".into())),
        };
        Ok(ap::GetSnapshotResponse { snapshot: found.map(|(pool, s)| self.snapshot_entry(pool.as_ref(), &s)) })
    }

    async fn list_snapshots(&self, req: ap::ListSnapshotsRequest, _budget: Duration) -> Result<ap::ListSnapshotsResponse> {
        let (snapshots, next_token) = paginate(self.snapshot_entries().await, page_size(req.max_entries), &req.starting_token)?;
        Ok(ap::ListSnapshotsResponse { snapshots, next_token })
    }

    async fn get_capacity(&self, req: ap::GetCapacityRequest, _budget: Duration) -> Result<ap::GetCapacityResponse> {
        if !req.pool.is_empty() && !self.d.pools.contains_key(&req.pool) {
            return Err(Error::NotFound(format!("pool {} is not a pool of node {}", crate::error::bounded(&req.pool), self.d.node_id)));
        }
        let mut pools = Vec::new();
        for pool in self.d.pools.values().filter(|p| req.pool.is_empty() || p.name() == req.pool) {
            // A sick pool offers nothing (placement skips it); the others still answer.
            let c = match self.pool_capacity(pool.as_ref()).await {
                Ok(c) => {
                    self.answered(pool.as_ref());
                    c
                }
                Err(e) => {
                    self.failed(pool.as_ref(), &e);
                    ap::PoolCapacity { pool: pool.name().to_owned(), ..Default::default() }
                }
            };
            pools.push(c);
        }
        Ok(ap::GetCapacityResponse { pools })
    }

    async fn get_inventory(&self, _budget: Duration) -> Result<ap::Inventory> {
        Ok(self.take_inventory().await)
    }

    // issue 12: modify
    async fn modify_volume(&self, req: ControllerModifyVolumeRequest, _budget: Duration) -> Result<ControllerModifyVolumeResponse> {
        self.modify(req).await
    }

    // issue 12: group snapshots
    async fn create_group_snapshot(
        &self,
        req: CreateVolumeGroupSnapshotRequest,
        _budget: Duration,
    ) -> Result<CreateVolumeGroupSnapshotResponse> {
        self.create_group_snapshot_here(req).await
    }

    async fn delete_group_snapshot(
        &self,
        req: DeleteVolumeGroupSnapshotRequest,
        _budget: Duration,
    ) -> Result<DeleteVolumeGroupSnapshotResponse> {
        self.delete_group_snapshot_here(req).await
    }

    async fn get_group_snapshot(&self, req: GetVolumeGroupSnapshotRequest, _budget: Duration) -> Result<GetVolumeGroupSnapshotResponse> {
        self.get_group_snapshot_here(req).await
    }

    // issue 11: cluster
    async fn claim_name(&self, req: ap::ClaimNameRequest, _budget: Duration) -> Result<ap::ClaimNameResponse> {
        require("csi_name", &req.csi_name)?;
        require("controller", &req.controller)?;
        let now = Instant::now();
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        claims.retain(|_, c| c.until > now);
        if req.release {
            if claims.get(&req.csi_name).is_some_and(|c| c.controller == req.controller) {
                claims.remove(&req.csi_name);
            }
            return Ok(ap::ClaimNameResponse { granted: true, ..Default::default() });
        }
        match claims.get(&req.csi_name) {
            Some(c) if c.controller != req.controller => {
                Ok(ap::ClaimNameResponse { granted: false, holder: c.controller.clone(), node: c.node.clone(), pool: c.pool.clone() })
            }
            _ => {
                let ttl = Duration::from_millis(u64::from(req.ttl_ms)).clamp(Duration::from_millis(100), MAX_CLAIM);
                claims.insert(req.csi_name, NameClaim { controller: req.controller, node: req.node, pool: req.pool, until: now + ttl });
                Ok(ap::ClaimNameResponse { granted: true, ..Default::default() })
            }
        }
    }
}

// issue 11: cluster
/// The longest a claim on a name lives without being asked again.
const MAX_CLAIM: Duration = Duration::from_secs(120);
/// How long a create here keeps its name claimed for this node (longer than a change takes
/// to reach every controller's index).
pub const CREATE_CLAIM: Duration = Duration::from_secs(30);

/// A controller's claim on a CSI name: where it places the volume, until when.
#[derive(Debug, Clone)]
struct NameClaim {
    controller: String,
    node: String,
    pool: String,
    until: Instant,
}

impl LocalAgent {
    /// A create from `controller` of `name` in `pool` here: refused (ABORTED) while another
    /// controller's live claim places the name on another node; otherwise the name is claimed
    /// for this node (a controller placing it elsewhere is sent here instead).
    fn claim_for_create(&self, name: &str, controller: &str, pool: &str) -> Result<()> {
        let now = Instant::now();
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        claims.retain(|_, c| c.until > now);
        if let Some(c) = claims.get(name) {
            if c.controller != controller && c.node != self.d.node_id {
                return Err(Error::Aborted(format!(
                    "another controller is placing volume {} on node {}; retry",
                    crate::error::bounded(name),
                    crate::error::bounded(&c.node)
                )));
            }
        }
        let node = self.d.node_id.clone();
        claims.insert(
            name.to_owned(),
            NameClaim { controller: controller.to_owned(), node, pool: pool.to_owned(), until: now + CREATE_CLAIM },
        );
        Ok(())
    }

    /// The room of `pool` moved (a volume made, deleted, grown) or its health changed: it is
    /// read again and reported as a change, off the caller's path; moves while it is read
    /// make one more read, so a burst of creates costs a few reads, not one each.
    fn room_moved(&self, pool: &str) {
        // issue 14: nobody follows the feed (an agent not registered yet; all-in-one's own
        // in-process controller does follow it): the read
        // would report to no one, competing with the calls for the CPUs; whoever subscribes
        // later starts from an inventory, which reads every pool (as the periodic pass skips).
        if !self.d.pools.contains_key(pool) || self.feed.tx.receiver_count() == 0 {
            return;
        }
        {
            let mut r = self.room.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(again) = r.get_mut(pool) {
                *again = true;
                return;
            }
            r.insert(pool.to_owned(), false);
        }
        let (me, name) = (self.me.clone(), pool.to_owned());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.room.lock().unwrap_or_else(|e| e.into_inner()).remove(pool);
            return;
        };
        rt.spawn(async move {
            loop {
                let Some(agent) = me.upgrade() else { return };
                let Some(pool) = agent.d.pools.get(&name).cloned() else { return };
                let entry = agent.pool_entry(pool.as_ref()).await;
                {
                    let mut st = agent.feed.lock();
                    let healthy = entry.health == ap::PoolHealth::Healthy as i32;
                    let known = st.pools.get(&name).map(|p| (p.health, p.health_message.clone()));
                    if known.as_ref().is_some_and(|(h, m)| *h != entry.health || *m != entry.health_message) {
                        st.pool(&agent.feed.tx, entry);
                    } else if healthy {
                        let told = st.pools.get(&name).and_then(|p| p.capacity.as_ref());
                        if let Some(c) = entry.capacity.clone().filter(|c| told != Some(c)) {
                            st.send(&agent.feed.tx, ap::change::Change::PoolCapacity(c));
                        }
                    }
                }
                let mut r = agent.room.lock().unwrap_or_else(|e| e.into_inner());
                match r.get_mut(&name) {
                    Some(again) if *again => *again = false,
                    _ => {
                        r.remove(&name);
                        return;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver on node `n1` of `pools` with their `labels`, the node side on fakes.
    fn test_driver(pools: BTreeMap<String, Arc<dyn Pool>>, labels: BTreeMap<String, BTreeMap<String, String>>) -> Driver {
        use crate::exec::FakeExec;
        use crate::node::mount::FakeMounter;
        Driver {
            node_id: "n1".into(),
            segments: Segments::from([(crate::placement::NODE_KEY.to_owned(), "n1".to_owned())]),
            pools,
            labels,
            shared: std::sync::RwLock::default(),
            node: crate::node::Node::new(Arc::new(FakeExec::new()), Arc::new(FakeMounter::new())),
            locks: crate::locks::Locks::new(),
            state_dir: std::env::temp_dir(),
            paths: crate::node::safepath::PathPolicy::default(),
            records: crate::node::records::Records::new(&std::env::temp_dir()),
            freezer: Arc::new(crate::node::freeze::Freezer::unrecorded(Arc::new(FakeExec::new()))),
            jobs: crate::jobs::Jobs::unrecorded(),
        }
    }

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

    // issue 14: flat
    #[test]
    fn the_listing_orders_by_pool_then_local_name_not_by_the_whole_id() {
        assert_eq!(list_key("file:n:p:a:v0123456789ab"), "file:n:p:a");
        assert_eq!(list_key("file:n:p:a"), "file:n:p:a");
        // By whole ids "a-b:v…" < "a:v…"; by name "a" < "a-b" < "a1": what a pool's index pages by.
        let ids: Vec<(String, &str)> = [("a1:v0123456789ab", "a1"), ("a-b:v0123456789ab", "a-b"), ("a", "legacy a")]
            .iter()
            .map(|(id, what)| (format!("file:n:p:{id}"), *what))
            .collect();
        let (mut seen, mut token) = (vec![], String::new());
        loop {
            let (page, next) = paginate(ids.clone(), 1, &token).unwrap();
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            assert!(VolumeId::parse(&next).is_some(), "a token is an id this driver parses: {next}");
            token = next;
        }
        assert_eq!(seen, ["legacy a", "a-b", "a1"]);
        let tagged = vec![("file:n:p:a:v0123456789ab".to_owned(), "a"), ("file:n:p:a1:v0123456789ab".to_owned(), "a1")];
        let (page, _) = paginate(tagged, 0, "file:n:p:a-b").unwrap();
        assert_eq!(page, ["a1"], "a name before the token's is not listed again, whatever its whole id");
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
            /// Copies (volumes made from a source) wait while a test holds this for writing.
            copy_gate: tokio::sync::RwLock<()>,
            /// The next modify of this mutable key fails (issue 12: modify).
            fail_key: Mutex<Option<String>>,
            // issue 14: flat
            /// How many times the whole pool was listed.
            full_listings: std::sync::atomic::AtomicUsize,
            /// The pages asked for: (from, max).
            pages: Mutex<Vec<(String, usize)>>,
            /// What the pages answered, shared while unchanged.
            shared: Mutex<BTreeMap<String, Arc<VolumeInfo>>>,
        }

        impl FakePool {
            fn new(name: &str, free: u64) -> Arc<FakePool> {
                Arc::new(FakePool {
                    name: name.into(),
                    free,
                    volumes: Mutex::default(),
                    snapshots: Mutex::default(),
                    sick: Mutex::default(),
                    copy_gate: tokio::sync::RwLock::new(()),
                    fail_key: Mutex::new(None),
                    full_listings: Default::default(),
                    pages: Mutex::default(),
                    shared: Mutex::default(),
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
                if req.source.is_some() {
                    let _held = self.copy_gate.read().await;
                }
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
                    mutable: req.mutable.clone(),
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
                self.full_listings.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(self.volumes.lock().unwrap().values().cloned().collect())
            }
            async fn list_volumes_from(&self, from: &str, max: usize) -> Result<Vec<Arc<VolumeInfo>>> {
                self.check()?;
                self.pages.lock().unwrap().push((from.to_owned(), max));
                // As the file pool's index: a volume that did not change is the same `Arc` on every page.
                let (volumes, mut shared) = (self.volumes.lock().unwrap(), self.shared.lock().unwrap());
                let page = volumes.range(from.to_owned()..).take(max).map(|(k, v)| match shared.get(k) {
                    Some(a) if **a == *v => a.clone(),
                    _ => {
                        let a = Arc::new(v.clone());
                        shared.insert(k.clone(), a.clone());
                        a
                    }
                });
                Ok(page.collect())
            }
            async fn expand_volume(&self, local: &str, capacity: u64) -> Result<u64> {
                self.check()?;
                if let Some(v) = self.volumes.lock().unwrap().get_mut(local) {
                    v.capacity = v.capacity.max(capacity);
                }
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
                    group: None,
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
            // issue 12: modify
            fn mutable_keys(&self) -> &'static [&'static str] {
                &["a", "b", "c"]
            }
            fn check_mutable(&self, _block: bool, _fs: Option<&str>, key: &str, value: &str) -> Result<()> {
                match (self.mutable_keys().contains(&key), value) {
                    (true, "bad") => Err(Error::InvalidArgument(format!("{key}: bad value"))),
                    (true, _) => Ok(()),
                    _ => Err(pool::not_mutable(self.kind(), key, self.mutable_keys())),
                }
            }
            async fn modify_volume(&self, local: &str, key: &str, value: &str) -> Result<()> {
                if self.fail_key.lock().unwrap().take_if(|k| k == key).is_some() {
                    return Err(Error::Internal(format!("applying {key} failed")));
                }
                let mut vols = self.volumes.lock().unwrap();
                let v = vols.get_mut(local).ok_or_else(|| Error::NotFound(local.into()))?;
                v.mutable.insert(key.into(), value.into());
                Ok(())
            }
        }

        const M: u64 = 1 << 20;

        /// A controller over `fast` (100 MiB free) and `slow` (500 MiB free, so placement
        /// prefers it while it is well).
        fn controller() -> (Arc<LocalAgent>, Arc<FakePool>, Arc<FakePool>) {
            let (fast, slow) = (FakePool::new("fast", 100 * M), FakePool::new("slow", 500 * M));
            let mut pools: BTreeMap<String, Arc<dyn Pool>> = BTreeMap::new();
            pools.insert("fast".into(), fast.clone());
            pools.insert("slow".into(), slow.clone());
            let labels = BTreeMap::from([("fast".to_owned(), BTreeMap::from([("tier".to_owned(), "fast".to_owned())]))]);
            (LocalAgent::new(Arc::new(test_driver(pools, labels))), fast, slow)
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

        // issue 12: modify
        #[tokio::test]
        async fn modify_checks_every_key_first_and_a_retry_completes_what_a_failure_left() {
            let (a, fast, _slow) = controller();
            let mut req = create_req("m1", "ext4", &[("pool", "fast")]);
            req.mutable_parameters.insert("a".into(), "1".into());
            let v = a.create(req.clone()).await.unwrap().volume.unwrap();
            assert_eq!(v.volume_context.get("holdfast.dev/a").map(String::as_str), Some("1"), "{:?}", v.volume_context);
            let mut other = req.clone();
            other.mutable_parameters.insert("a".into(), "2".into());
            let err = a.create(other).await.unwrap_err();
            assert!(matches!(&err, Error::AlreadyExists(m) if m.contains("mutable parameter a")), "{err}");
            let mut unknown = create_req("m2", "ext4", &[("pool", "fast")]);
            unknown.mutable_parameters.insert("zz".into(), "1".into());
            assert!(matches!(a.create(unknown).await.unwrap_err(), Error::InvalidArgument(m) if m.contains("zz")));

            let modify = |pairs: &[(&str, &str)]| ControllerModifyVolumeRequest {
                volume_id: v.volume_id.clone(),
                mutable_parameters: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            };
            let stored = || fast.volumes.lock().unwrap().values().next().unwrap().mutable.clone();
            let pairs = |p: &[(&str, &str)]| p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
            for (what, req) in [("unknown key", modify(&[("a", "2"), ("zz", "1")])), ("bad value", modify(&[("a", "2"), ("b", "bad")]))] {
                let err = a.modify(req).await.unwrap_err();
                assert!(matches!(&err, Error::InvalidArgument(_)), "{what}: {err}");
                assert_eq!(stored(), pairs(&[("a", "1")]), "{what}: nothing applied");
            }
            *fast.fail_key.lock().unwrap() = Some("b".into());
            let all = [("a", "2"), ("b", "2"), ("c", "2")];
            assert!(matches!(a.modify(modify(&all)).await.unwrap_err(), Error::Internal(_)));
            assert_eq!(stored(), pairs(&[("a", "2")]), "the record holds what was applied before the failure");
            a.modify(modify(&all)).await.unwrap();
            assert_eq!(stored(), pairs(&all), "the retry completed");
            a.modify(modify(&all)).await.unwrap();
            let got = a.get_volume(ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await.unwrap().volume.unwrap();
            assert_eq!(got.volume_context.get("holdfast.dev/c").map(String::as_str), Some("2"));
            let gone = ControllerModifyVolumeRequest { volume_id: format!("{}x", v.volume_id), ..modify(&all) };
            assert!(matches!(a.modify(gone).await.unwrap_err(), Error::NotFound(_)));
            assert!(matches!(a.modify(modify(&[])).await.unwrap_err(), Error::InvalidArgument(_)));
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
        async fn a_sick_pools_volumes_include_what_was_made_and_exclude_what_was_deleted_since_its_last_listing() {
            let (c, _fast, slow) = controller();
            let id = |r: CreateVolumeResponse| r.volume.unwrap().volume_id;
            let listed = id(c.create(create_req("listed", "", &[("pool", "slow")])).await.unwrap());
            let deleted = id(c.create(create_req("deleted", "", &[("pool", "slow")])).await.unwrap());
            c.list(ListVolumesRequest::default()).await.unwrap();
            let made_after = id(c.create(create_req("made-after", "", &[("pool", "slow")])).await.unwrap());
            c.delete(DeleteVolumeRequest { volume_id: deleted.clone(), ..Default::default() }).await.unwrap();

            slow.fall_ill("volume group vg-slow is gone");
            let got = c.list(ListVolumesRequest::default()).await.expect("a sick pool must not fail ListVolumes");
            let by_id: BTreeMap<String, bool> = got
                .entries
                .iter()
                .map(|e| (e.volume.clone().unwrap().volume_id, e.status.clone().unwrap().volume_condition.unwrap().abnormal))
                .collect();
            let mut want = vec![listed, made_after];
            want.sort();
            assert_eq!(by_id.keys().cloned().collect::<Vec<_>>(), want, "{by_id:?}");
            assert!(by_id.values().all(|abnormal| *abnormal), "the sick pool's volumes are abnormal: {by_id:?}");
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
                mutable: Default::default(),
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

        mod agent_ops {
            //! The Agent API of the in-process agent, over the same fakes.

            use super::*;
            use crate::agent::AgentOps;
            use crate::agent_proto as ap;
            use ap::change::Change as C;

            const BUDGET: Duration = Duration::from_secs(5);

            /// The Agent API of `a` (its inherent CSI methods share some names).
            fn ops(a: &LocalAgent) -> &dyn AgentOps {
                a
            }

            fn pinned(pool: &str, req: CreateVolumeRequest) -> ap::CreateVolumeRequest {
                ap::CreateVolumeRequest { pool: pool.into(), request: Some(req), ..Default::default() }
            }

            fn by_name(name: &str) -> ap::GetVolumeRequest {
                ap::GetVolumeRequest { key: Some(ap::get_volume_request::Key::CsiName(name.into())), pools: vec![] }
            }

            /// The changes received so far, without waiting.
            fn drain(rx: &mut tokio::sync::broadcast::Receiver<ap::Change>) -> Vec<ap::Change> {
                std::iter::from_fn(|| rx.try_recv().ok()).collect()
            }

            #[tokio::test]
            async fn a_pinned_create_lands_in_its_pool_and_a_retry_finds_it_in_any_pool() {
                let (a, fast, slow) = controller();
                // Placement alone would choose the roomier `slow`: the pin decides.
                let v = a.create_volume(pinned("fast", create_req("pv1", "", &[])), BUDGET).await.unwrap().volume.unwrap();
                assert!(v.volume_id.starts_with("file:n1:fast:"), "{}", v.volume_id);
                // A retry placed elsewhere (a controller whose index lagged) finds the first one.
                let again = a.create_volume(pinned("slow", create_req("pv1", "", &[])), BUDGET).await.unwrap().volume.unwrap();
                assert_eq!(again.volume_id, v.volume_id);
                assert_eq!((fast.names(), slow.names()), (vec!["pv1".to_owned()], vec![]));

                let cases = [
                    ("an unknown pool", pinned("nope", create_req("pv2", "", &[])), "not a pool of node n1"),
                    ("a pool the parameters exclude", pinned("fast", create_req("pv2", "", &[("pool", "slow")])), "cannot hold"),
                    (
                        "no request",
                        ap::CreateVolumeRequest { pool: "fast".into(), request: None, ..Default::default() },
                        "request is required",
                    ),
                ];
                for (what, req, want) in cases {
                    let err = a.create_volume(req, BUDGET).await.unwrap_err();
                    let msg = err.to_string();
                    assert_eq!(code(err), tonic::Code::InvalidArgument, "{what}");
                    assert!(msg.contains(want), "{what}: {msg}");
                }
                assert!(slow.names().is_empty() && fast.names().len() == 1, "a refused create made a volume");
            }

            #[tokio::test]
            async fn volumes_are_found_by_id_and_by_csi_name_legacy_ones_included() {
                let (a, fast, slow) = controller();
                let v = a.create_volume(pinned("fast", create_req("pv1", "", &[])), BUDGET).await.unwrap().volume.unwrap();
                let by_id = ap::GetVolumeRequest { key: Some(ap::get_volume_request::Key::VolumeId(v.volume_id.clone())), pools: vec![] };
                let got = ops(&a).get_volume(by_id, BUDGET).await.unwrap().volume.expect("found by id");
                assert_eq!((got.pool.as_str(), got.csi_name.as_str()), ("fast", "pv1"));
                assert_eq!(got.volume.unwrap().volume_id, v.volume_id);
                assert!(!got.condition.unwrap().abnormal);
                let got = ops(&a).get_volume(by_name("pv1"), BUDGET).await.unwrap().volume.expect("found by name");
                assert_eq!(got.local_name, crate::volume_id::local_name("pv1"));

                let legacy = crate::volume_id::legacy_local_name("Old Data");
                slow.volumes.lock().unwrap().insert(legacy.clone(), legacy_volume("Old Data", &legacy));
                let got = ops(&a).get_volume(by_name("Old Data"), BUDGET).await.unwrap().volume.expect("a legacy volume by its name");
                assert_eq!(got.volume.unwrap().volume_id, format!("file:n1:slow:{legacy}"));

                assert!(ops(&a).get_volume(by_name("never"), BUDGET).await.unwrap().volume.is_none());
                let forged = ap::GetVolumeRequest {
                    key: Some(ap::get_volume_request::Key::VolumeId("file:n1:fast:x:v0123456789ab".into())),
                    pools: vec![],
                };
                assert!(ops(&a).get_volume(forged, BUDGET).await.unwrap().volume.is_none(), "a miss is no error");
                // A pool that cannot be asked cannot say "none".
                fast.fall_ill("disk gone");
                let err = ops(&a).get_volume(by_name("never"), BUDGET).await.unwrap_err();
                assert_eq!(code(err), tonic::Code::Unavailable);
                assert!(ops(&a).get_volume(ap::GetVolumeRequest { key: None, pools: vec![] }, BUDGET).await.is_err());
            }

            #[tokio::test]
            async fn listings_page_through_every_volume_and_snapshot_once() {
                let (a, _fast, _slow) = controller();
                for i in 0..5 {
                    let pool = if i % 2 == 0 { "fast" } else { "slow" };
                    a.create_volume(pinned(pool, create_req(&format!("pv{i}"), "", &[])), BUDGET).await.unwrap();
                }
                let (mut seen, mut token) = (Vec::new(), String::new());
                loop {
                    let page = a.list_volumes(ap::ListVolumesRequest { max_entries: 2, starting_token: token }, BUDGET).await.unwrap();
                    assert!(page.volumes.len() <= 2);
                    seen.extend(page.volumes.iter().map(|v| v.csi_name.clone()));
                    assert!(page.volumes.iter().all(|v| v.condition.as_ref().is_some_and(|c| !c.abnormal)));
                    if page.next_token.is_empty() {
                        break;
                    }
                    token = page.next_token;
                }
                seen.sort();
                assert_eq!(seen, (0..5).map(|i| format!("pv{i}")).collect::<Vec<_>>());

                let src = ops(&a).get_volume(by_name("pv0"), BUDGET).await.unwrap().volume.unwrap().volume.unwrap();
                let snap = CreateSnapshotRequest { name: "snap".into(), source_volume_id: src.volume_id, ..Default::default() };
                let s = a.create_snapshot(snap, BUDGET).await.unwrap().snapshot.unwrap();
                let listed = ops(&a).list_snapshots(ap::ListSnapshotsRequest::default(), BUDGET).await.unwrap();
                assert_eq!(listed.snapshots.len(), 1);
                assert_eq!(listed.snapshots[0].snapshot.as_ref().unwrap().snapshot_id, s.snapshot_id);
                let key = |k| ap::GetSnapshotRequest { key: Some(k) };
                use ap::get_snapshot_request::Key;
                for k in [Key::SnapshotId(s.snapshot_id.clone()), Key::CsiName("snap".into())] {
                    let got = ops(&a).get_snapshot(key(k), BUDGET).await.unwrap().snapshot.expect("found");
                    assert_eq!((got.pool.as_str(), got.csi_name.as_str()), ("fast", "snap"));
                }
                assert!(ops(&a).get_snapshot(key(Key::CsiName("other".into())), BUDGET).await.unwrap().snapshot.is_none());
            }

            // issue 14: flat
            /// A listing builds each volume's entry once per change of what its pool answers (the
            /// same `Arc` while the volume is unchanged), not once per page; a change shows at once.
            #[tokio::test]
            async fn a_listing_builds_each_volumes_entry_once_per_change() {
                let (a, fast, _slow) = controller();
                for i in 0..5 {
                    a.create_volume(pinned("fast", create_req(&format!("pv{i}"), "", &[])), BUDGET).await.unwrap();
                }
                let built = || ENTRIES_BUILT.with(|n| n.get());
                let start = built();
                let first = pages_of(&a, 2, |_| {}).await;
                assert_eq!(built() - start, 5, "one entry per volume listed");
                let start = built();
                let again = pages_of(&a, 2, |_| {}).await;
                assert_eq!(built() - start, 0, "an unchanged volume's entry was built again");
                assert_eq!(format!("{first:?}"), format!("{again:?}"));
                // Grown behind the agent's back: only that volume is built again, and it shows.
                let grown = {
                    let mut vs = fast.volumes.lock().unwrap();
                    let v = vs.values_mut().find(|v| v.csi_name == "pv3").unwrap();
                    v.capacity *= 2;
                    v.capacity as i64
                };
                let start = built();
                let after = pages_of(&a, 2, |_| {}).await;
                assert_eq!(built() - start, 1);
                let capacity = |pages: &[Vec<ap::Volume>], name: &str| {
                    pages.iter().flatten().find(|v| v.csi_name == name).and_then(|v| v.volume.as_ref()).map(|v| v.capacity_bytes)
                };
                assert_eq!(capacity(&after, "pv3"), Some(grown));
                assert_eq!(capacity(&after, "pv2"), capacity(&first, "pv2"));
            }

            // issue 14: flat
            /// Every page of a listing, through `a`'s Agent API, from the start.
            async fn pages_of(a: &LocalAgent, max: u32, mut between: impl FnMut(usize)) -> Vec<Vec<ap::Volume>> {
                let (mut pages, mut token) = (Vec::new(), String::new());
                loop {
                    let page = a.list_volumes(ap::ListVolumesRequest { max_entries: max, starting_token: token }, BUDGET).await.unwrap();
                    pages.push(page.volumes);
                    if page.next_token.is_empty() {
                        return pages;
                    }
                    between(pages.len());
                    token = page.next_token;
                }
            }

            #[tokio::test]
            async fn a_page_asks_each_pool_for_the_page_only() {
                let (a, fast, slow) = controller();
                for i in 0..40 {
                    let pool = if i % 4 == 0 { "slow" } else { "fast" };
                    a.create_volume(pinned(pool, create_req(&format!("pv{i}"), "", &[])), BUDGET).await.unwrap();
                }
                let pages = pages_of(&a, 7, |_| {}).await;
                assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [7, 7, 7, 7, 7, 5]);
                let mut names: Vec<String> = pages.iter().flatten().map(|v| v.csi_name.clone()).collect();
                names.sort();
                let mut want: Vec<String> = (0..40).map(|i| format!("pv{i}")).collect();
                want.sort();
                assert_eq!(names, want, "every volume once");
                // Neither pool was listed whole, and no pool was asked for more than a page and one.
                for p in [&fast, &slow] {
                    assert_eq!(p.full_listings.load(std::sync::atomic::Ordering::Relaxed), 0, "pool {} listed whole", p.name);
                    let asked = p.pages.lock().unwrap().clone();
                    assert!(!asked.is_empty() && asked.iter().all(|(_, max)| *max <= 8), "pool {}: {asked:?}", p.name);
                }
            }

            #[tokio::test]
            async fn a_listing_returns_each_volume_once_while_volumes_come_and_go() {
                let (a, fast, slow) = controller();
                // Local names that are prefixes of one another ("a" < "a-b" < "a.b" < "a1"), tagged
                // and not: their ids sort otherwise ("a-b:" < "a:v"), the listing by name must not.
                let names = ["a", "a-b", "a.b", "a1", "a1-x", "b", "b0", "c", "c-c", "d"];
                for (i, local) in names.iter().enumerate() {
                    let mut v = legacy_volume(&format!("csi-{local}"), local);
                    if i % 2 == 0 {
                        v.uid = Some(format!("{i:012x}"));
                    }
                    let pool = if i % 3 == 0 { &slow } else { &fast };
                    pool.volumes.lock().unwrap().insert(local.to_string(), v);
                }
                let (fast2, slow2) = (fast.clone(), slow.clone());
                // Between pages: one volume already listed and one not listed yet are deleted, and
                // two new ones appear, before and after the position of the listing.
                let pages = pages_of(&a, 3, move |n| {
                    if n == 1 {
                        // The first page is fast's "a-b", "a.b", "a1-x" (pools in id order, then names).
                        fast2.volumes.lock().unwrap().remove("a-b");
                        slow2.volumes.lock().unwrap().remove("a1");
                        fast2.volumes.lock().unwrap().insert("a0".into(), legacy_volume("csi-a0", "a0"));
                        slow2.volumes.lock().unwrap().insert("zz".into(), legacy_volume("csi-zz", "zz"));
                    }
                })
                .await;
                let listed: Vec<String> = pages.iter().flatten().map(|v| v.local_name.clone()).collect();
                let mut unique = listed.clone();
                unique.sort();
                unique.dedup();
                assert_eq!(unique.len(), listed.len(), "a volume listed twice: {listed:?}");
                assert_eq!(pages[0].iter().map(|v| v.local_name.as_str()).collect::<Vec<_>>(), ["a-b", "a.b", "a1-x"]);
                for always in ["a", "a.b", "a1-x", "b", "b0", "c", "c-c", "d"] {
                    assert!(listed.iter().any(|l| l == always), "{always} existed throughout and is missing: {listed:?}");
                }
                assert!(!listed.iter().any(|l| l == "a1"), "a1 was deleted before its page: {listed:?}");
                assert!(listed.iter().any(|l| l == "zz"), "zz, created ahead of the listing, is missing: {listed:?}");
                // A page is in the listing's order, and so is the whole listing.
                let keys: Vec<String> =
                    pages.iter().flatten().map(|v| list_key(&v.volume.as_ref().unwrap().volume_id).to_owned()).collect();
                assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
                assert_eq!(fast.full_listings.load(std::sync::atomic::Ordering::Relaxed), 0);
            }

            #[tokio::test]
            async fn a_token_of_a_sick_pool_pages_through_its_last_known_volumes() {
                let (a, fast, _slow) = controller();
                for i in 0..6 {
                    a.create_volume(pinned("fast", create_req(&format!("pv{i}"), "", &[])), BUDGET).await.unwrap();
                }
                let healthy: Vec<String> = pages_of(&a, 2, |_| {}).await.iter().flatten().map(|v| v.local_name.clone()).collect();
                fast.fall_ill("disk gone");
                let sick = pages_of(&a, 2, |_| {}).await;
                let listed: Vec<String> = sick.iter().flatten().map(|v| v.local_name.clone()).collect();
                assert_eq!(listed, healthy, "the sick pool's volumes, as last listed, once each");
                assert!(sick.iter().flatten().all(|v| v.condition.as_ref().is_some_and(|c| c.abnormal)));
            }

            #[tokio::test]
            async fn a_pools_room_counts_are_running_totals() {
                let (a, fast, slow) = controller();
                // Made behind the agent's back: the inventory (the feed's rebuild) counts it.
                fast.volumes.lock().unwrap().insert("old".into(), legacy_volume("csi-old", "old"));
                ops(&a).get_inventory(BUDGET).await.unwrap();
                let listings = |p: &FakePool| p.full_listings.load(std::sync::atomic::Ordering::Relaxed);
                let before = (listings(&fast), listings(&slow));
                let mut ids = Vec::new();
                for i in 0..5 {
                    let v = a.create_volume(pinned("fast", create_req(&format!("pv{i}"), "", &[])), BUDGET).await.unwrap();
                    ids.push(v.volume.unwrap().volume_id);
                }
                let grow = ControllerExpandVolumeRequest {
                    volume_id: ids[0].clone(),
                    capacity_range: Some(CapacityRange { required_bytes: (20 * M) as i64, limit_bytes: 0 }),
                    ..Default::default()
                };
                a.expand(grow).await.unwrap();
                a.delete(DeleteVolumeRequest { volume_id: ids[1].clone(), ..Default::default() }).await.unwrap();
                let caps = a.get_capacity(ap::GetCapacityRequest::default(), BUDGET).await.unwrap().pools;
                let by: BTreeMap<_, _> = caps.iter().map(|c| (c.pool.as_str(), c)).collect();
                // old 8 MiB + pv0 grown to 20 MiB + pv2..pv4 8 MiB each.
                assert_eq!((by["fast"].used_bytes, by["fast"].volume_count), (52 * M, 5));
                assert_eq!((by["slow"].used_bytes, by["slow"].volume_count), (0, 0));
                assert_eq!((listings(&fast), listings(&slow)), before, "a create, expand or delete listed a pool to count its room");
                // A full pass that finds a volume removed by hand corrects the totals.
                fast.volumes.lock().unwrap().remove("old");
                ops(&a).get_inventory(BUDGET).await.unwrap();
                let caps = a.get_capacity(ap::GetCapacityRequest::default(), BUDGET).await.unwrap().pools;
                let fast_cap = caps.iter().find(|c| c.pool == "fast").unwrap();
                assert_eq!((fast_cap.used_bytes, fast_cap.volume_count), (44 * M, 4));
            }

            #[tokio::test]
            async fn capacity_is_reported_per_pool() {
                let (a, _fast, slow) = controller();
                a.create_volume(pinned("fast", create_req("pv1", "", &[])), BUDGET).await.unwrap();
                let all = a.get_capacity(ap::GetCapacityRequest::default(), BUDGET).await.unwrap().pools;
                let by: BTreeMap<_, _> = all.iter().map(|c| (c.pool.as_str(), c)).collect();
                assert_eq!(by.len(), 2);
                assert_eq!(by["fast"].largest_volume_bytes, 100 * M);
                assert_eq!((by["fast"].used_bytes, by["fast"].volume_count), (8 * M, 1));
                assert_eq!((by["slow"].largest_volume_bytes, by["slow"].volume_count), (500 * M, 0));
                assert_eq!(by["slow"].minimum_volume_bytes, M);
                let one = a.get_capacity(ap::GetCapacityRequest { pool: "slow".into() }, BUDGET).await.unwrap().pools;
                assert_eq!(one.len(), 1);
                let err = a.get_capacity(ap::GetCapacityRequest { pool: "nope".into() }, BUDGET).await.unwrap_err();
                assert_eq!(code(err), tonic::Code::NotFound);
                slow.fall_ill("vg gone");
                let one = a.get_capacity(ap::GetCapacityRequest { pool: "slow".into() }, BUDGET).await.unwrap().pools;
                assert_eq!(one[0].largest_volume_bytes, 0, "a sick pool offers nothing");
            }

            #[tokio::test]
            async fn the_inventory_holds_every_pool_volume_and_snapshot() {
                let (a, _fast, slow) = controller();
                let v = a.create_volume(pinned("fast", create_req("pv1", "ext4", &[])), BUDGET).await.unwrap().volume.unwrap();
                let snap = CreateSnapshotRequest { name: "s1".into(), source_volume_id: v.volume_id.clone(), ..Default::default() };
                a.create_snapshot(snap, BUDGET).await.unwrap();
                slow.fall_ill("zpool FAULTED");
                let inv = a.get_inventory(BUDGET).await.unwrap();
                assert_eq!(inv.node_id, "n1");
                assert_eq!(inv.segments.get(crate::placement::NODE_KEY).map(String::as_str), Some("n1"));
                assert_eq!(inv.sequence, a.sequence(), "the inventory is as of the last change");
                assert!(inv.agent_started_unix > 0 && !inv.agent_release.is_empty());
                let pools: BTreeMap<_, _> = inv.pools.iter().map(|p| (p.name.as_str(), p)).collect();
                let fast = pools["fast"];
                assert_eq!((fast.kind.as_str(), fast.health), ("file", ap::PoolHealth::Healthy as i32));
                assert_eq!(fast.labels.get("tier").map(String::as_str), Some("fast"));
                assert_eq!(fast.default_fs, "ext4");
                assert!(fast.block && !fast.multi_node && fast.filesystems.contains(&"xfs".to_owned()));
                assert_eq!(fast.capacity.as_ref().unwrap().volume_count, 1);
                let sick = pools["slow"];
                assert_eq!(sick.health, ap::PoolHealth::Unavailable as i32);
                assert!(sick.health_message.contains("FAULTED"), "{}", sick.health_message);
                assert!(sick.labels.is_empty());
                assert_eq!(inv.volumes.len(), 1);
                assert_eq!(inv.volumes[0].volume.as_ref().unwrap().volume_id, v.volume_id);
                assert_eq!((inv.snapshots.len(), inv.snapshots[0].csi_name.as_str()), (1, "s1"));
                // The schema of the records a file pool writes, as the controller compares it.
                let schema = crate::pool::schema::JSON_RECORD_SCHEMA;
                assert_eq!((inv.volumes[0].record_schema, inv.snapshots[0].record_schema), (schema, schema));
            }

            #[tokio::test]
            async fn every_change_is_reported_once_with_consecutive_numbers() {
                let (a, fast, _slow) = controller();
                let inv = a.get_inventory(BUDGET).await.unwrap();
                let mut rx = a.subscribe();
                let v = a.create_volume(pinned("fast", create_req("pv1", "", &[])), BUDGET).await.unwrap().volume.unwrap();
                a.create_volume(pinned("fast", create_req("pv1", "", &[])), BUDGET).await.unwrap();
                let grow = ControllerExpandVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    capacity_range: Some(CapacityRange { required_bytes: 16 * M as i64, limit_bytes: 0 }),
                    ..Default::default()
                };
                a.expand_volume(grow, BUDGET).await.unwrap();
                let snap = CreateSnapshotRequest { name: "s1".into(), source_volume_id: v.volume_id.clone(), ..Default::default() };
                let s = a.create_snapshot(snap, BUDGET).await.unwrap().snapshot.unwrap();
                ops(&a).delete_snapshot(DeleteSnapshotRequest { snapshot_id: s.snapshot_id, ..Default::default() }, BUDGET).await.unwrap();
                a.delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }, BUDGET).await.unwrap();
                a.delete_volume(DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() }, BUDGET).await.unwrap();
                let got = drain(&mut rx);
                let seqs: Vec<u64> = got.iter().map(|c| c.sequence).collect();
                assert_eq!(seqs, (inv.sequence + 1..=inv.sequence + got.len() as u64).collect::<Vec<_>>(), "{got:?}");
                // The pool's room after the changes is reported too (issue 11: cluster), between
                // them as the reads finish; the objects' changes are these, in this order.
                let got: Vec<ap::Change> = got.into_iter().filter(|c| !matches!(c.change, Some(C::PoolCapacity(_)))).collect();
                let kinds: Vec<&str> = got
                    .iter()
                    .map(|c| match c.change.as_ref().unwrap() {
                        C::VolumeCreated(_) => "volume created",
                        C::VolumeUpdated(_) => "volume updated",
                        C::VolumeDeleted(_) => "volume deleted",
                        C::SnapshotCreated(_) => "snapshot created",
                        C::SnapshotDeleted(_) => "snapshot deleted",
                        C::PoolUpdated(_) => "pool updated",
                        C::PoolCapacity(_) => "pool capacity",
                    })
                    .collect();
                assert_eq!(kinds, ["volume created", "volume updated", "snapshot created", "snapshot deleted", "volume deleted"]);
                let Some(C::VolumeUpdated(up)) = &got[1].change else { unreachable!() };
                assert_eq!(up.volume.as_ref().unwrap().capacity_bytes, 16 * M as i64);
                let Some(C::VolumeDeleted(gone)) = &got[4].change else { unreachable!() };
                assert_eq!((gone.pool.as_str(), gone.csi_name.as_str()), ("fast", "pv1"));

                // What no operation made (here: put in the pool behind the agent's back) is
                // reported by the next full pass, which then answers as of that change.
                let legacy = crate::volume_id::legacy_local_name("by hand");
                fast.volumes.lock().unwrap().insert(legacy.clone(), legacy_volume("by hand", &legacy));
                let inv = a.get_inventory(BUDGET).await.unwrap();
                let got = drain(&mut rx);
                assert_eq!(got.len(), 1, "{got:?}");
                assert!(matches!(&got[0].change, Some(C::VolumeCreated(v)) if v.csi_name == "by hand"));
                assert_eq!(inv.sequence, got[0].sequence);
                a.get_inventory(BUDGET).await.unwrap();
                assert!(drain(&mut rx).is_empty(), "a pass that finds nothing new reports nothing");
            }

            #[tokio::test]
            async fn a_copy_that_finishes_after_its_request_gave_up_is_reported() {
                let (a, fast, _slow) = controller();
                let src = a.create_volume(pinned("fast", create_req("src", "", &[])), BUDGET).await.unwrap().volume.unwrap();
                let mut rx = a.subscribe();
                let held = fast.copy_gate.write().await;
                let clone = CreateVolumeRequest {
                    volume_content_source: Some(VolumeContentSource {
                        r#type: Some(volume_content_source::Type::Volume(VolumeSource { volume_id: src.volume_id.clone() })),
                    }),
                    ..create_req("clone", "", &[])
                };
                let err = a.create_volume(pinned("fast", clone), Duration::from_millis(50)).await.unwrap_err();
                assert_eq!(code(err), tonic::Code::Aborted, "the copy is still running");
                // (The source's pool room, read after its create, may be reported meanwhile.)
                assert!(drain(&mut rx).iter().all(|c| matches!(c.change, Some(C::PoolCapacity(_)))), "nothing is made yet");
                drop(held);
                let change = loop {
                    let c = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("reported in time").unwrap();
                    if !matches!(c.change, Some(C::PoolCapacity(_))) {
                        break c;
                    }
                };
                assert!(matches!(&change.change, Some(C::VolumeCreated(v)) if v.csi_name == "clone"), "{change:?}");
                assert_eq!(change.sequence, a.sequence());
            }

            #[tokio::test]
            async fn a_pool_whose_health_moves_is_reported() {
                let (a, _fast, slow) = controller();
                a.get_inventory(BUDGET).await.unwrap();
                let mut rx = a.subscribe();
                a.pass_over_pools().await;
                assert!(drain(&mut rx).is_empty(), "nothing moved");
                slow.fall_ill("vg gone");
                a.pass_over_pools().await;
                let got = drain(&mut rx);
                assert_eq!(got.len(), 1, "{got:?}");
                assert!(
                    matches!(&got[0].change, Some(C::PoolUpdated(p)) if p.name == "slow" && p.health == ap::PoolHealth::Unavailable as i32)
                );
            }
        }
    }

    // issue 14: a ready-to-use volume costs what the raw tools cost
    /// CreateVolume on a thin LVM pool, counted in the commands the real pool runs (the
    /// recording `FakeExec`): each process is a cost under the VM's emulation, and one that
    /// comes back fails these tests.
    mod lookups {
        use std::collections::BTreeMap;

        use super::*;
        use crate::config::Config;
        use crate::exec::{FakeExec, Reply};
        use crate::pool::lvm::tags::{self, Meta};

        const M: u64 = 1 << 20;

        /// An agent over one thin LVM pool `thin` (VG `vg0`, thin pool `tp0`) on `fake`.
        fn agent(fake: Arc<FakeExec>) -> Arc<LocalAgent> {
            let src = "[[pool]]\nname = \"thin\"\nkind = \"lvm\"\nvolume_group = \"vg0\"\nthin_pool = \"tp0\"\n";
            let cfg = Config::parse(src).unwrap().pools.remove(0);
            agent_over(Arc::new(crate::pool::lvm::LvmPool::new(&cfg, fake).unwrap()))
        }

        fn agent_over(pool: Arc<dyn Pool>) -> Arc<LocalAgent> {
            LocalAgent::new(Arc::new(test_driver(BTreeMap::from([(pool.name().to_owned(), pool)]), BTreeMap::new())))
        }

        /// `lvs vg0` listing the thin pool (1 GiB, 4 MiB extents) and a volume under each of `locals`.
        fn listing(volumes: &[(&str, &str)]) -> String {
            let row = |name: &str, path: &str, size: u64, attr: &str, tags: &[String], pool: &str, data: &str| {
                serde_json::json!({
                    "lv_name": name, "vg_name": "vg0", "lv_path": path, "lv_size": size.to_string(), "lv_attr": attr,
                    "lv_tags": tags.join(","), "pool_lv": pool, "origin": "", "data_percent": data, "metadata_percent": "",
                    "vg_extent_size": (4 * M).to_string(),
                })
            };
            let mut rows = vec![row("tp0", "", 1 << 30, "twi-aotz--", &[], "", "0.00")];
            for (local, csi_name) in volumes {
                let meta = Meta { pool: "thin".into(), csi_name: (*csi_name).into(), ..crate::pool::lvm::tests::vol_meta(local, 8 * M) };
                let lv = crate::pool::lvm::volume_lv(local);
                rows.push(row(&lv, &format!("/dev/vg0/{lv}"), 8 * M, "Vwi-a-tz--", &tags::encode(&meta).unwrap(), "tp0", "0.00"));
            }
            serde_json::json!({ "report": [{ "lv": rows }] }).to_string()
        }

        fn request(name: &str) -> CreateVolumeRequest {
            CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange { required_bytes: 8 * M as i64, limit_bytes: 0 }),
                volume_capabilities: vec![VolumeCapability {
                    access_mode: Some(crate::proto::volume_capability::AccessMode {
                        mode: crate::proto::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                    }),
                    access_type: Some(crate::proto::volume_capability::AccessType::Mount(Default::default())),
                }],
                ..Default::default()
            }
        }

        fn programs(fake: &FakeExec) -> Vec<String> {
            fake.calls().iter().map(|c| c[0].clone()).collect()
        }

        /// Before: `lvs` of the new name and of the legacy name (the retry check), `lvs` of the
        /// VG (placement), `vgs` (the extent size), `lvs` of the VG (the room check), lvcreate,
        /// `lvs` of the new LV (read back): 7. Now one listing and the lvcreate.
        #[tokio::test]
        async fn a_new_thin_volume_costs_one_listing_and_the_lvcreate() {
            let fake = Arc::new(FakeExec::new());
            fake.on("lvs", vec![Reply::Ok(listing(&[]))]);
            let a = agent(fake.clone());
            let name = "Team/Data";
            let v = a.create(request(name)).await.unwrap().volume.unwrap();
            assert_eq!(programs(&fake), ["lvs", "lvcreate"], "{:?}", fake.lines());
            assert_eq!(fake.lines()[0], crate::pool::lvm::command::lvs("vg0").display(), "the listing of the volume group");
            let lv = crate::pool::lvm::volume_lv(&local_name(name));
            assert!(fake.lines()[1].contains(&format!("--name {lv} --virtualsize {}b", 8 * M)), "{:?}", fake.lines());
            assert_eq!(v.capacity_bytes, 8 * M as i64, "the size the create asked for, a whole number of extents");
            assert!(v.volume_id.starts_with(&format!("lvm:n1:thin:{}:v", local_name(name))), "{}", v.volume_id);
        }

        /// On ZFS datasets: before, `zfs get` of the new and of the legacy name, `zfs get
        /// available` (placement), `zfs create`, `zfs get` (read back): 5. Now one `zfs get` of
        /// the parent and both names, the create and the read-back.
        #[tokio::test]
        async fn a_new_zfs_dataset_costs_one_get_the_create_and_the_read_back() {
            let src = "[[pool]]\nname = \"z\"\nkind = \"zfs\"\ndataset = \"tank/hf\"\n";
            let cfg = Config::parse(src).unwrap().pools.remove(0);
            let fake = Arc::new(FakeExec::new());
            let name = "Team/Data";
            let gone = |l: String| format!("cannot open 'tank/hf/{l}': dataset does not exist\n");
            let parent = format!("tank/hf\ttype\tfilesystem\t-\ntank/hf\tavailable\t{}\t-\n", 1u64 << 30);
            let cap = (8 * M).to_string();
            let made = crate::pool::zfs::tests::rows(
                &format!("tank/hf/{}", local_name(name)),
                "filesystem",
                &[("refquota", &cap), ("mounted", "no")],
                &[
                    ("holdfast:pool", "z"),
                    ("holdfast:type", "volume"),
                    ("holdfast:name", name),
                    ("holdfast:capacity", &cap),
                    ("holdfast:fs", "zfs"),
                ],
            );
            let survey = Reply::Partial(1, parent, gone(local_name(name)) + &gone(legacy_local_name(name)));
            fake.on("zfs get", vec![survey, Reply::Ok(made)]);
            let a = agent_over(Arc::new(crate::pool::zfs::ZfsPool::new(&cfg, fake.clone()).unwrap()));
            let v = a.create(request(name)).await.unwrap().volume.unwrap();
            let progs: Vec<String> = fake.calls().iter().map(|c| c[..2].join(" ")).collect();
            // The read-back stays: the create's answer is what ZFS then shows (its creation time too).
            assert_eq!(progs, ["zfs get", "zfs create", "zfs get"], "{:?}", fake.lines());
            assert_eq!(v.capacity_bytes, 8 * M as i64);
        }

        /// After a create or delete the pool's room is read again only for someone following
        /// the feed (an agent's controller), and then from one `lvs` (before: `lvs`, `vgs` and
        /// a listing, after every create and delete, competing with the calls for the CPUs).
        #[tokio::test]
        async fn the_room_is_read_again_only_for_a_follower_and_from_one_listing() {
            let fake = Arc::new(FakeExec::new());
            fake.on("lvs", vec![Reply::Ok(listing(&[]))]);
            let a = agent(fake.clone());
            let create = |name: &str| ap::CreateVolumeRequest { request: Some(request(name)), ..Default::default() };
            AgentOps::create_volume(a.as_ref(), create("v1"), Duration::from_secs(30)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(programs(&fake), ["lvs", "lvcreate"], "nobody follows the feed: nobody to tell: {:?}", fake.lines());

            // A registered agent (or all-in-one): a controller follows the feed from an inventory.
            let _rx = a.subscribe();
            a.get_inventory(Duration::from_secs(30)).await.unwrap();
            let before = fake.calls().len();
            AgentOps::create_volume(a.as_ref(), create("v2"), Duration::from_secs(30)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let after: Vec<String> = programs(&fake).split_off(before);
            assert_eq!(after, ["lvs", "lvcreate", "lvs"], "the create, then one read of the room: {:?}", fake.lines());
        }

        /// The same listing finds a retry under either name: the new local name, or the name
        /// earlier versions derived when it was made for this very CSI name; nothing is made.
        #[tokio::test]
        async fn a_retry_is_found_under_either_name_in_the_one_listing() {
            let name = "Team/Data";
            for (local, why) in [(local_name(name), "the new name"), (legacy_local_name(name), "the legacy name")] {
                let fake = Arc::new(FakeExec::new());
                fake.on("lvs", vec![Reply::Ok(listing(&[(&local, name)]))]);
                let v = agent(fake.clone()).create(request(name)).await.unwrap().volume.unwrap();
                assert_eq!(programs(&fake), ["lvs"], "{why}: {:?}", fake.lines());
                assert!(v.volume_id.starts_with(&format!("lvm:n1:thin:{local}")), "{why}: {}", v.volume_id);
            }
            // A volume under the legacy name made for another CSI name is not this one's.
            let fake = Arc::new(FakeExec::new());
            fake.on("lvs", vec![Reply::Ok(listing(&[(&legacy_local_name(name), "someone else")]))]);
            agent(fake.clone()).create(request(name)).await.unwrap();
            assert_eq!(programs(&fake), ["lvs", "lvcreate"], "{:?}", fake.lines());
        }
    }
}
