//! What keeps one CSI name one volume beyond a single controller's own lock: claims on the
//! name taken on the agents before placing (two active controller replicas, whose sidecars
//! elect leaders separately), creates whose outcome is unknown (the answer was lost), and the
//! room of creates answered but not reported by their agent yet.
//!
//! Claims: before a create is placed on one of several candidate nodes, the name is claimed
//! on the first [`CLAIM_NODES`] of those nodes in an order fixed by the name alone (rendezvous
//! hashing), so two controllers that see the same candidates claim on the same agents and at
//! least one agent sees both. All or nothing: when another controller holds the claim on every
//! claim node, this create goes where that one places the name (its agent's retry check then
//! answers both with one volume); any other contention answers ABORTED (retryable) after this
//! controller's own claims are released (waited for, so no release overtakes a new claim). A create on a node is itself a claim there (the agent
//! refuses, ABORTED, a create while another controller's claim places the name elsewhere).
//! Claims live [`CLAIM_TTL`] in the agents' memory only, so a controller killed with -9 leaves
//! nothing that outlives them, and they stay after a successful create so a second controller
//! whose index has not heard of the volume yet is sent to it. One candidate node needs no
//! claim: its agent's lock and retry check already make one volume of one name.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::agent_proto as ap;
use crate::error::{Error, Result, bounded};
use crate::placement::PoolCandidate;

use super::registry::Registry;

/// On how many of a create's candidate nodes the name is claimed: two controllers whose views
/// differ by fewer nodes still share one.
pub const CLAIM_NODES: usize = 3;
/// How long a claim lives on an agent.
pub const CLAIM_TTL: Duration = Duration::from_secs(30);
/// The longest a claim call may take.
const CLAIM_BUDGET: Duration = Duration::from_secs(5);
/// How long a create whose outcome is unknown sends retries of its name to its node.
const UNSETTLED_FOR: Duration = Duration::from_secs(600);
/// The longest the room of an answered create is counted before its agent reports it.
const SETTLE_AT_MOST: Duration = Duration::from_secs(10);

/// The outcome of claiming a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// This controller holds the name (or needs no claim): create where it chose.
    Free,
    /// Another controller places it on (node, pool): create there.
    Elsewhere(String, String),
}

/// A create answered whose room its agent has not reported yet.
struct Settling {
    node: String,
    pool: String,
    bytes: u64,
    /// The node's room reports before the create was sent.
    reports: u64,
    at: Instant,
}

/// The controller's claims, unknown outcomes and settling room.
pub struct Claims {
    id: String,
    unsettled: Mutex<HashMap<String, (String, String, Instant)>>,
    settling: Mutex<Vec<Settling>>,
}

impl Default for Claims {
    fn default() -> Self {
        Claims::new()
    }
}

impl Claims {
    /// A new controller process's: its id names it among controllers (host, pid, start).
    pub fn new() -> Claims {
        let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Claims {
            id: format!("{host}/{}/{nanos:x}", std::process::id()),
            unsettled: Mutex::new(HashMap::new()),
            settling: Mutex::new(Vec::new()),
        }
    }

    /// This controller's id in claims and creates.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The nodes a name is claimed on among `nodes`: the first [`CLAIM_NODES`] by a hash of
    /// the name and the node, the same in every controller; none for a single node.
    pub fn claim_nodes(name: &str, nodes: &[String]) -> Vec<String> {
        if nodes.len() < 2 {
            return Vec::new();
        }
        let mut ranked: Vec<([u8; 32], &String)> = nodes
            .iter()
            .map(|n| {
                let mut h = Sha256::new();
                h.update(name.as_bytes());
                h.update([0]);
                h.update(n.as_bytes());
                (h.finalize().into(), n)
            })
            .collect();
        ranked.sort();
        ranked.into_iter().take(CLAIM_NODES).map(|(_, n)| n.clone()).collect()
    }

    /// Claims `name` for (`node`, `pool`) on its claim nodes among `candidates`: see the module
    /// documentation. A claim node that cannot answer makes the create UNAVAILABLE.
    pub async fn claim(&self, reg: &Registry, candidates: &[String], name: &str, node: &str, pool: &str) -> Result<Claimed> {
        let on = Self::claim_nodes(name, candidates);
        if on.is_empty() {
            return Ok(Claimed::Free);
        }
        let req = ap::ClaimNameRequest {
            csi_name: name.to_owned(),
            controller: self.id.clone(),
            node: node.to_owned(),
            pool: pool.to_owned(),
            ttl_ms: CLAIM_TTL.as_millis() as u32,
            release: false,
        };
        let mut set = tokio::task::JoinSet::new();
        for n in &on {
            let agent = reg.node(n).and_then(|v| v.agent);
            let (n, req) = (n.clone(), req.clone());
            set.spawn(async move {
                let res = match agent {
                    Some(a) => a.claim_name(req, CLAIM_BUDGET).await,
                    None => Err(Error::Unavailable(format!("node {n} left the registry"))),
                };
                (n, res)
            });
        }
        let (mut granted, mut held, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(joined) = set.join_next().await {
            let Ok((n, res)) = joined else { continue };
            match res {
                Ok(r) if r.granted => granted.push(n),
                Ok(r) => held.push((n, r.node, r.pool)),
                // An agent one minor version older knows no claims: it cannot take part, and
                // its own create lock still answers for itself.
                Err(Error::Unimplemented(_)) => granted.push(n),
                Err(e) => failed.push(format!("node {n}: {e}")),
            }
        }
        if failed.is_empty() && held.is_empty() {
            return Ok(Claimed::Free);
        }
        self.release_on(reg, &granted, name).await;
        if !failed.is_empty() {
            return Err(Error::Unavailable(format!("cannot claim volume name {} ({}); retry", bounded(name), failed.join("; "))));
        }
        // Sent elsewhere only when the other holds every claim node for one place: with some
        // granted here, the other may be sent here just as well (each to the other's choice).
        let (first_node, first_pool) = (held[0].1.clone(), held[0].2.clone());
        if granted.is_empty() && held.iter().all(|(_, n, p)| *n == first_node && *p == first_pool) && !first_node.is_empty() {
            return Ok(Claimed::Elsewhere(first_node, first_pool));
        }
        Err(Error::Aborted(format!(
            "another controller is placing volume {} at the same moment (claims held on node {}); retry",
            bounded(name),
            held.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        )))
    }

    /// Drops this controller's claims on `name` (its create was refused: the name is free).
    pub async fn release(&self, reg: &Registry, candidates: &[String], name: &str) {
        self.release_on(reg, &Self::claim_nodes(name, candidates), name).await;
    }

    /// Waited for, so a release never arrives after this controller's next claim of the name
    /// (which it would drop). Best effort: a claim not released expires.
    async fn release_on(&self, reg: &Registry, nodes: &[String], name: &str) {
        let mut set = tokio::task::JoinSet::new();
        for n in nodes {
            let Some(agent) = reg.node(n).and_then(|v| v.agent) else { continue };
            let req = ap::ClaimNameRequest { csi_name: name.to_owned(), controller: self.id.clone(), release: true, ..Default::default() };
            set.spawn(async move {
                let _ = agent.claim_name(req, CLAIM_BUDGET).await;
            });
        }
        while set.join_next().await.is_some() {}
    }

    /// A create of `name` goes to (`node`, `pool`): until its outcome is known, retries go there.
    pub fn dispatched(&self, name: &str, node: &str, pool: &str) {
        let mut u = self.unsettled.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        u.retain(|_, (_, _, at)| now.duration_since(*at) < UNSETTLED_FOR);
        u.insert(name.to_owned(), (node.to_owned(), pool.to_owned(), now));
    }

    /// Where an earlier create of `name` went whose outcome is unknown.
    pub fn unsettled(&self, name: &str) -> Option<(String, String)> {
        let u = self.unsettled.lock().unwrap_or_else(|e| e.into_inner());
        u.get(name).filter(|(_, _, at)| at.elapsed() < UNSETTLED_FOR).map(|(n, p, _)| (n.clone(), p.clone()))
    }

    /// The index holds `name`: nothing about it is unknown.
    pub fn settled(&self, name: &str) {
        self.unsettled.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// Whether an answer says for sure that no volume was made (a refusal), so a retry may be
    /// placed anew.
    pub fn definitive<T>(&self, res: &Result<T>) -> bool {
        matches!(
            res,
            Err(Error::InvalidArgument(_)
                | Error::NotFound(_)
                | Error::AlreadyExists(_)
                | Error::ResourceExhausted(_)
                | Error::OutOfRange(_)
                | Error::FailedPrecondition(_)
                | Error::Unimplemented(_))
        )
    }

    /// What the create sent to (`node`, `pool`) answered: a volume or a refusal settles the
    /// name; anything else (unreachable, deadline, in progress) leaves it unsettled.
    pub fn outcome<T>(&self, name: &str, node: &str, pool: &str, res: &Result<T>) {
        if res.is_ok() || self.definitive(res) {
            let mut u = self.unsettled.lock().unwrap_or_else(|e| e.into_inner());
            if u.get(name).is_some_and(|(n, p, _)| n == node && p == pool) {
                u.remove(name);
            }
        } else {
            self.dispatched(name, node, pool);
        }
    }

    /// A create of `bytes` in (`node`, `pool`) was answered: its room counts against the pool
    /// until the node reports its room again (the agent does right after the create), unless
    /// it already has since the create was sent.
    pub fn settle(&self, reg: &Registry, node: &str, pool: &str, bytes: u64, reports: u64) {
        if reg.room_reports(node) != reports {
            return;
        }
        let mut s = self.settling.lock().unwrap_or_else(|e| e.into_inner());
        s.push(Settling { node: node.to_owned(), pool: pool.to_owned(), bytes, reports, at: Instant::now() });
    }

    /// Counts the room of answered creates not reported yet against their pools.
    pub fn count_settling(&self, reg: &Registry, all: &mut [PoolCandidate]) {
        let mut s = self.settling.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|x| x.at.elapsed() < SETTLE_AT_MOST && reg.room_reports(&x.node) == x.reports);
        for x in s.iter() {
            if let Some(c) = all.iter_mut().find(|c| c.node == x.node && c.pool == x.pool) {
                c.largest_volume = c.largest_volume.saturating_sub(x.bytes);
                c.free = c.free.saturating_sub(x.bytes);
                c.used += x.bytes;
                c.volumes += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_nodes_depend_on_the_name_only_and_overlap_across_views() {
        let nodes: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
        assert!(Claims::claim_nodes("v", &nodes[..1]).is_empty(), "one candidate needs no claim");
        let all = Claims::claim_nodes("pvc-1", &nodes);
        assert_eq!(all.len(), CLAIM_NODES);
        let mut shuffled = nodes.clone();
        shuffled.reverse();
        assert_eq!(Claims::claim_nodes("pvc-1", &shuffled), all, "the order of the candidates does not matter");
        // A controller that does not see one of the nodes still shares claim nodes.
        for gone in &nodes {
            let fewer: Vec<String> = nodes.iter().filter(|n| *n != gone).cloned().collect();
            let theirs = Claims::claim_nodes("pvc-1", &fewer);
            assert!(theirs.iter().any(|n| all.contains(n)), "without {gone}: {theirs:?} vs {all:?}");
        }
        assert_ne!(Claims::claim_nodes("pvc-2", &nodes), all, "names spread their claims");
    }

    #[test]
    fn refusals_settle_a_name_other_failures_keep_it_unsettled() {
        let c = Claims::new();
        c.dispatched("a", "n1", "p");
        c.outcome::<()>("a", "n1", "p", &Err(Error::DeadlineExceeded("slow".into())));
        assert_eq!(c.unsettled("a"), Some(("n1".into(), "p".into())));
        c.outcome::<()>("a", "n1", "p", &Err(Error::ResourceExhausted("full".into())));
        assert_eq!(c.unsettled("a"), None);
        c.dispatched("b", "n1", "p");
        c.outcome::<()>("b", "n1", "p", &Ok(()));
        assert_eq!(c.unsettled("b"), None);
    }
}
