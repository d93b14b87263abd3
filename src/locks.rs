//! Per-key operation locks. CSI calls on the same volume (or the same CSI name) must not run
//! at once; a second call while one is in flight answers ABORTED at once, as the spec asks,
//! and the orchestrator retries later.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::Error;

/// A set of held keys.
#[derive(Debug, Default, Clone)]
pub struct Locks {
    held: Arc<Mutex<HashSet<String>>>,
}

/// Holds a key until dropped.
#[derive(Debug)]
pub struct Guard {
    held: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Locks {
    /// An empty lock set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `key`, or answers ABORTED when another operation holds it. `what` names the
    /// object for the message ("volume file:n:p:v").
    pub fn try_lock(&self, key: &str, what: &str) -> Result<Guard, Error> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !held.insert(key.to_owned()) {
            return Err(Error::Aborted(format!("an operation on {what} is already in progress; retry when it has finished")));
        }
        Ok(Guard { held: self.held.clone(), key: key.to_owned() })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_aborted_until_release() {
        let locks = Locks::new();
        let g = locks.try_lock("v1", "volume v1").unwrap();
        let err = locks.try_lock("v1", "volume v1").unwrap_err();
        assert!(matches!(err, Error::Aborted(ref m) if m.contains("volume v1")), "{err}");
        assert!(locks.try_lock("v2", "volume v2").is_ok(), "other keys are free");
        drop(g);
        assert!(locks.try_lock("v1", "volume v1").is_ok());
    }
}
