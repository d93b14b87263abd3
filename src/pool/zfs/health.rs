//! Health of the zpool under a `zfs` pool: read at most every [`HEALTH_TTL`], so listing many
//! volumes asks once.

use std::time::Instant;

use super::*;

impl ZfsPool {
    /// Why the zpool makes every volume abnormal, if it does (read at most every [`HEALTH_TTL`]).
    pub(super) async fn pool_problem(&self) -> Option<String> {
        if let Some((at, problem)) = self.health.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            if at.elapsed() < HEALTH_TTL {
                return problem;
            }
        }
        let problem = match self.run(command::zpool_health(&self.zpool)).await {
            Ok(out) => match report::parse_health(&out, &self.zpool).as_deref() {
                Some("ONLINE") => None,
                health => {
                    let health = health.unwrap_or("unknown");
                    let why = match self.run(command::zpool_status(&self.zpool)).await {
                        Ok(out) => report::parse_status_reason(&out).map(|r| format!(" ({r})")).unwrap_or_default(),
                        Err(_) => String::new(),
                    };
                    Some(format!("zpool {} is {health}{why}; see zpool status {}", self.zpool, self.zpool))
                }
            },
            Err(e) if command::is_no_pool(&e) => Some(format!("zpool {} is not imported on this node", self.zpool)),
            Err(e) => Some(format!("cannot read the health of zpool {}: {e}", self.zpool)),
        };
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), problem.clone()));
        problem
    }
}
