//! Destroying in the `zfs` pool: what others depend on is hidden (renamed `….deleted-<guid>`)
//! or marked for deferred destruction instead, and swept once nothing depends on it; nothing is
//! ever destroyed with `-r`/`-R`, and what holdfast did not make beneath a volume is refused.

use super::*;

impl ZfsPool {
    /// Why `o` (a volume) cannot be destroyed or renamed now, if it cannot: a mounted dataset
    /// (`zfs destroy` would unmount it under its users) or a zvol held open exclusively (mounted).
    pub(super) fn in_use(o: &Object) -> Option<String> {
        match o.kind {
            Kind::Filesystem if o.mounted => Some(format!("ZFS dataset {} is mounted on this node", o.name)),
            Kind::Volume => {
                use std::os::unix::fs::OpenOptionsExt;
                let device = Self::zvol_device(&o.name);
                match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&device) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        Some(format!("zvol {} is in use (mounted or open)", device.display()))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// What depends on the dataset whose snapshots are `snapshots`: its CSI snapshots and the
    /// clones made from any of its snapshots, in words.
    pub(super) fn dependents(&self, snapshots: &[&Object]) -> Vec<String> {
        let mut out = Vec::new();
        for s in snapshots {
            if let Ok(Some(meta)) = self.live_snapshot(s) {
                out.push(format!("snapshot {:?}", meta.csi_name));
            }
            for c in &s.clones {
                let leaf = c.rsplit_once('/').map_or(c.as_str(), |(_, l)| l);
                out.push(format!("clone {leaf} of {}", s.name));
            }
        }
        out
    }

    pub(super) async fn destroy(&self, name: &str, what: &str) -> Result<()> {
        match self.run(command::destroy(name)).await {
            Ok(_) => {
                tracing::info!(pool = %self.name, dataset = %name, "destroyed {what}");
                Ok(())
            }
            Err(e) if command::is_missing(&e) => Ok(()),
            Err(e) if command::is_busy(&e) => Err(Error::FailedPrecondition(format!(
                "{what} (ZFS {name}) is in use on this node (mounted or open): unpublish and unstage it first"
            ))),
            Err(e) if command::has_children(&e) => Err(Error::FailedPrecondition(format!(
                "{what} (ZFS {name}) has gained a snapshot or child dataset that holdfast did not make; holdfast never destroys \
                 those: move or destroy them by hand, then retry ({})",
                e.stderr().trim().replace('\n', "; ")
            ))),
            Err(e) => Err(Error::exec(format!("destroying ZFS {name} ({what})"), e)),
        }
    }

    /// Splits what lies beneath volume `v` (`below`: its snapshots, child datasets and their
    /// snapshots) into the snapshots holdfast made of it and the names of everything else.
    pub(super) fn classify<'a>(&self, v: &Object, below: &'a [Object]) -> (Vec<&'a Object>, Vec<String>) {
        let (mut own, mut foreign) = (Vec::new(), Vec::new());
        for d in below.iter().filter(|d| d.name != v.name) {
            let is_own = d.kind == Kind::Snapshot
                && d.dataset() == v.name
                && (matches!(self.ours(d, ObjectType::Snapshot), Ok(Some(_)))
                    || matches!(self.ours(d, ObjectType::Intermediate), Ok(Some(_))));
            if is_own {
                own.push(d);
            } else {
                foreign.push(d.name.clone());
            }
        }
        (own, foreign)
    }

    /// Destroys volume `v` that nothing depends on: the snapshots holdfast made of it one by
    /// one, then the dataset or zvol itself, all without `-r`.
    pub(super) async fn destroy_volume(&self, v: &Object, own_snapshots: &[&Object], what: &str) -> Result<()> {
        for s in own_snapshots {
            self.destroy(&s.name, &format!("a snapshot holdfast made of {what}")).await?;
        }
        self.destroy(&v.name, what).await
    }

    /// Destroys the intermediate snapshot `origin` of a destroyed clone, if it is one of ours
    /// and nothing else was cloned from it.
    pub(super) async fn drop_intermediate(&self, origin: &str) {
        let is_intermediate = origin.split_once('@').is_some_and(|(_, s)| s.starts_with(INTERMEDIATE));
        if !is_intermediate {
            return;
        }
        let found = match self.read(origin, command::SNAPSHOTS).await {
            Ok(Some(o)) => o,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(pool = %self.name, snapshot = %origin, "cannot read the intermediate snapshot of a destroyed clone: {e}");
                return;
            }
        };
        if !matches!(self.ours(&found, ObjectType::Intermediate), Ok(Some(_))) || !found.clones.is_empty() {
            return;
        }
        if let Err(e) = self.destroy(origin, "the intermediate snapshot of a destroyed clone").await {
            tracing::warn!(pool = %self.name, snapshot = %origin, "{e}");
        }
    }

    /// Destroys what deletes left hidden once nothing depends on it any more: hidden snapshots
    /// not yet marked for deferred destruction are marked (ZFS destroys them with their last
    /// clone), and hidden volumes without dependents are destroyed, then their origins if those
    /// were intermediate snapshots. Repeats while that frees more (chains of copies).
    pub async fn sweep(&self) -> Result<()> {
        for _ in 0..SWEEP_ROUNDS {
            let all = self.tree(command::ALL, 2).await?;
            let hidden = |leaf: &str| leaf.split_once(HIDDEN).is_some_and(|(l, _)| valid_local_name(l));
            let mut changed = false;
            for s in all.iter().filter(|o| o.kind == Kind::Snapshot && !o.defer_destroy && o.snapshot_name().is_some_and(hidden)) {
                if matches!(self.ours(s, ObjectType::Snapshot), Ok(Some(_))) {
                    self.run(command::destroy_deferred(&s.name)).await.context(|| format!("destroying the deleted snapshot {}", s.name))?;
                    changed |= s.clones.is_empty();
                }
            }
            for v in all.iter().filter(|o| matches!(o.kind, Kind::Filesystem | Kind::Volume) && hidden(o.leaf())) {
                if !matches!(self.ours(v, ObjectType::Volume), Ok(Some(_))) {
                    continue;
                }
                let snapshots: Vec<&Object> = all.iter().filter(|s| s.kind == Kind::Snapshot && s.dataset() == v.name).collect();
                if !self.dependents(&snapshots).is_empty() {
                    continue;
                }
                let below: Vec<Object> =
                    all.iter().filter(|d| d.name.starts_with(&format!("{}/", v.name)) || d.dataset() == v.name).cloned().collect();
                let (own, foreign) = self.classify(v, &below);
                if !foreign.is_empty() {
                    tracing::warn!(pool = %self.name, dataset = %v.name, foreign = ?foreign,
                        "a deleted volume holds what holdfast did not make; it is kept until that is moved or destroyed by hand");
                    continue;
                }
                self.destroy_volume(v, &own, "a deleted volume nothing depends on any more").await?;
                if let Some(origin) = &v.origin {
                    self.drop_intermediate(origin).await;
                }
                changed = true;
            }
            if !changed {
                return Ok(());
            }
        }
        Ok(())
    }
}
