//! Operation locks on local objects. Two CSI calls that touch the same volume or snapshot of a
//! pool must not interleave (a NodeUnstage must not unmount a filesystem a snapshot has frozen);
//! a call that finds its object busy answers ABORTED at once, as the spec asks, and the
//! orchestrator retries later.
//!
//! A lock names the *local object* (pool, kind, local name), never a CSI name or an id string:
//! two CSI names, or two spellings of one id, that reach one object take one lock. Keys come
//! from [`LockKey::new`] only. A call that touches several objects (a clone: its target and its
//! source) takes them all at once with [`Locks::try_lock_all`], all or nothing, in one fixed
//! (sorted) order. Guards are owned and `'static`, so a job that outlives its request (a copy
//! running detached) can carry them and keep its objects locked until it ends.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::error::Error;

/// What kind of local object a lock names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// A volume.
    Volume,
    /// A snapshot.
    Snapshot,
}

/// The key of one local object: built only by [`LockKey::new`] (or, for an id that names no
/// object of this driver, [`LockKey::unresolved`]), so every call site spells it the same way.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey {
    pool: String,
    kind: ObjectKind,
    local: String,
}

impl LockKey {
    /// The key of object `local` of `kind` in pool `pool`.
    pub fn new(pool: &str, kind: ObjectKind, local: &str) -> Self {
        LockKey { pool: pool.to_owned(), kind, local: local.to_owned() }
    }

    /// The key of an id that resolves to no object here (its pool is gone from the config),
    /// but that node records may still name: calls on that very id text still serialise. The
    /// empty pool name is never a real pool's, so this cannot collide with [`LockKey::new`].
    pub fn unresolved(kind: ObjectKind, id: &str) -> Self {
        LockKey { pool: String::new(), kind, local: id.to_owned() }
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ObjectKind::Volume => "volume",
            ObjectKind::Snapshot => "snapshot",
        };
        if self.pool.is_empty() {
            write!(f, "{kind} {}", crate::error::bounded(&self.local))
        } else {
            write!(f, "{kind} {} in pool {}", self.local, self.pool)
        }
    }
}

/// The set of held keys, shared by every service of one driver.
#[derive(Debug, Default, Clone)]
pub struct Locks {
    held: Arc<Mutex<BTreeSet<LockKey>>>,
}

/// Holds its keys until dropped. Owned and `Send + 'static`: it may be moved into a spawned task.
#[derive(Debug)]
#[must_use = "the lock is released when the guard is dropped"]
pub struct Guard {
    held: Arc<Mutex<BTreeSet<LockKey>>>,
    keys: Vec<LockKey>,
}

impl Locks {
    /// An empty lock set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `key`, or answers ABORTED naming the object when another operation holds it.
    pub fn try_lock(&self, key: LockKey) -> Result<Guard, Error> {
        self.try_lock_all([key])
    }

    /// Takes every key, or none: ABORTED naming the first busy object (in key order) when any
    /// is held. Duplicate keys count once (a clone of a volume onto itself is refused elsewhere;
    /// here it must not abort against itself). Checked and taken under one mutex, in sorted
    /// order, so two callers can never each hold a part of the other's set.
    pub fn try_lock_all(&self, keys: impl IntoIterator<Item = LockKey>) -> Result<Guard, Error> {
        let keys: Vec<LockKey> = keys.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(busy) = keys.iter().find(|k| held.contains(*k)) {
            return Err(Error::Aborted(format!("an operation on {busy} is already in progress; retry when it has finished")));
        }
        held.extend(keys.iter().cloned());
        Ok(Guard { held: self.held.clone(), keys })
    }

    /// Whether some operation holds `key` now (for reports and tests; taking a lock is
    /// [`Locks::try_lock`], never a check followed by a take).
    pub fn is_held(&self, key: &LockKey) -> bool {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).contains(key)
    }
}

impl Guard {
    /// The keys this guard holds, in the order they were taken.
    pub fn keys(&self) -> &[LockKey] {
        &self.keys
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            held.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(pool: &str, local: &str) -> LockKey {
        LockKey::new(pool, ObjectKind::Volume, local)
    }

    #[test]
    fn second_holder_is_aborted_until_release() {
        let locks = Locks::new();
        let g = locks.try_lock(vol("p", "v1")).unwrap();
        let err = locks.try_lock(vol("p", "v1")).unwrap_err();
        assert!(matches!(err, Error::Aborted(ref m) if m.contains("volume v1 in pool p")), "{err}");
        assert!(locks.try_lock(vol("p", "v2")).is_ok(), "other objects are free");
        assert!(locks.try_lock(vol("q", "v1")).is_ok(), "the same local name in another pool is another object");
        assert!(locks.try_lock(LockKey::new("p", ObjectKind::Snapshot, "v1")).is_ok(), "a snapshot is another object");
        drop(g);
        assert!(locks.try_lock(vol("p", "v1")).is_ok());
    }

    #[test]
    fn one_object_one_key_however_it_was_reached() {
        // Two requests that resolve to the same (pool, kind, local) must build equal keys.
        let locks = Locks::new();
        let _g = locks.try_lock(LockKey::new("p1", ObjectKind::Volume, "team-data")).unwrap();
        assert!(locks.is_held(&vol("p1", "team-data")));
        assert!(locks.try_lock(vol("p1", "team-data")).is_err());
        // An unresolved id never takes a real object's key, even if its text looks like a local name.
        assert!(locks.try_lock(LockKey::unresolved(ObjectKind::Volume, "team-data")).is_ok());
    }

    #[test]
    fn try_lock_all_is_all_or_nothing() {
        let locks = Locks::new();
        let busy = locks.try_lock(vol("p", "b")).unwrap();
        let err = locks.try_lock_all([vol("p", "a"), vol("p", "b"), vol("p", "c")]).unwrap_err();
        assert!(matches!(err, Error::Aborted(ref m) if m.contains("volume b in pool p")), "{err}");
        assert!(!locks.is_held(&vol("p", "a")) && !locks.is_held(&vol("p", "c")), "nothing taken on failure");
        drop(busy);
        let all = locks.try_lock_all([vol("p", "c"), vol("p", "a"), vol("p", "b")]).unwrap();
        assert!(["a", "b", "c"].iter().all(|l| locks.is_held(&vol("p", l))));
        drop(all);
        assert!(["a", "b", "c"].iter().all(|l| !locks.is_held(&vol("p", l))), "all released together");
    }

    #[test]
    fn keys_are_taken_in_one_sorted_order_and_duplicates_once() {
        let locks = Locks::new();
        let g = locks.try_lock_all([vol("z", "x"), LockKey::new("a", ObjectKind::Snapshot, "s"), vol("a", "v"), vol("z", "x")]).unwrap();
        assert_eq!(g.keys(), &[vol("a", "v"), LockKey::new("a", ObjectKind::Snapshot, "s"), vol("z", "x")]);
        drop(g);
        assert!(!locks.is_held(&vol("z", "x")), "a duplicated key is released too");
    }

    #[tokio::test]
    async fn a_guard_moved_into_a_spawned_task_holds_until_the_task_ends() {
        let locks = Locks::new();
        let guard = locks.try_lock_all([vol("p", "target"), LockKey::new("p", ObjectKind::Snapshot, "src")]).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let job = tokio::spawn(async move {
            let _held = guard;
            let _ = rx.await;
        });
        tokio::task::yield_now().await;
        assert!(locks.try_lock(vol("p", "target")).is_err(), "the detached job still holds its target");
        assert!(locks.try_lock(LockKey::new("p", ObjectKind::Snapshot, "src")).is_err(), "and its source");
        tx.send(()).unwrap();
        job.await.unwrap();
        assert!(locks.try_lock(vol("p", "target")).is_ok(), "released when the job ends");
    }
}
