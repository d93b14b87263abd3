//! Placement: which pool a new volume goes to. Candidates are the pools that match the
//! request's parameters (`pool`, `kind`, `poolSelector` on pool labels) and whose topology
//! satisfies the request's `requisite` topologies; they are ordered by `preferred` topologies
//! first, then by a policy (`most-free` by default, `least-used`, `spread`). [`place`] does it
//! over every pool of every node and says, when nothing fits, why each pool was refused.
//! Pure functions over plain data, so the rules are tested without any storage.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{Error, bounded};

/// Topology segments: key → value.
pub type Segments = BTreeMap<String, String>;

/// The topology key every node reports.
pub const NODE_KEY: &str = "topology.holdfast.dev/node";

/// Whether a place with `have` segments lies inside `want` (every key of `want` present with
/// the same value).
pub fn satisfies(have: &Segments, want: &Segments) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// Whether `have` is allowed by a list of requisite topologies (empty list: anywhere).
pub fn allowed(have: &Segments, requisite: &[Segments]) -> bool {
    requisite.is_empty() || requisite.iter().any(|t| satisfies(have, t))
}

/// Whether a pool whose volumes are reachable in `reach` lies inside the requested topology
/// `want`. A node-local pool is reachable on its node: the node's segments must satisfy
/// `want`. A shared pool is reachable wherever its own (possibly empty) segments hold, so it
/// fits any `want` that lies inside them: `{}` (everywhere) fits every requested topology.
pub fn reachable_in(reach: &Segments, shared: bool, want: &Segments) -> bool {
    if shared { satisfies(want, reach) } else { satisfies(reach, want) }
}

/// [`reachable_in`] for a list of requisite topologies (empty list: anywhere).
pub fn reachable(reach: &Segments, shared: bool, requisite: &[Segments]) -> bool {
    requisite.is_empty() || requisite.iter().any(|t| reachable_in(reach, shared, t))
}

/// Rank of `have` among preferred topologies: the index of the first it satisfies, or
/// `preferred.len()` when it satisfies none (lower is better).
pub fn preference_rank(have: &Segments, preferred: &[Segments]) -> usize {
    preferred.iter().position(|t| satisfies(have, t)).unwrap_or(preferred.len())
}

/// A pool that could take the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Pool name.
    pub pool: String,
    /// Where it is.
    pub segments: Segments,
    /// What one new volume could get there (bytes).
    pub free: u64,
}

/// Orders candidates: preferred topology first, then most free space, then name (stable).
pub fn order(mut candidates: Vec<Candidate>, preferred: &[Segments]) -> Vec<Candidate> {
    candidates.sort_by(|a, b| {
        preference_rank(&a.segments, preferred)
            .cmp(&preference_rank(&b.segments, preferred))
            .then(b.free.cmp(&a.free))
            .then(a.pool.cmp(&b.pool))
    });
    candidates
}

/// The request parameter naming one pool.
pub const PARAM_POOL: &str = "pool";
/// The request parameter naming a pool kind.
pub const PARAM_KIND: &str = "kind";
/// The request parameter selecting pools by label: `key=value,key!=value,key,!key`.
pub const PARAM_POOL_SELECTOR: &str = "poolSelector";
/// The request parameter naming the placement [`Policy`].
pub const PARAM_POLICY: &str = "placementPolicy";

/// How candidates in the same preference rank are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The pool with the most free bytes first: volumes go where the room is.
    #[default]
    MostFree,
    /// The pool with the fewest bytes in use first: wear and load go to the emptiest pool.
    LeastUsed,
    /// The node with the fewest volumes first (then the pool with the fewest): volumes spread
    /// over the nodes whatever their sizes.
    Spread,
}

impl Policy {
    /// Parses the `placementPolicy` parameter.
    pub fn parse(s: &str) -> Result<Policy, Error> {
        match s {
            "most-free" => Ok(Policy::MostFree),
            "least-used" => Ok(Policy::LeastUsed),
            "spread" => Ok(Policy::Spread),
            other => Err(Error::InvalidArgument(format!(
                "parameter {PARAM_POLICY}: unknown policy {} (most-free, least-used or spread)",
                bounded(other)
            ))),
        }
    }
}

/// One term of a pool selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// `key=value`: the label is present with this value.
    Equals(String, String),
    /// `key!=value`: the label is absent or has another value.
    NotEquals(String, String),
    /// `key`: the label is present.
    Exists(String),
    /// `!key`: the label is absent.
    Absent(String),
}

/// A pool label selector (the `poolSelector` parameter): every term must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(pub Vec<Term>);

impl Selector {
    /// Parses `key=value,key!=value,key,!key` (spaces around terms are ignored). Keys and values
    /// take the characters of Kubernetes labels, so a typo is refused instead of matching nothing.
    pub fn parse(s: &str) -> Result<Selector, Error> {
        let bad = |term: &str, why: &str| Error::InvalidArgument(format!("parameter {PARAM_POOL_SELECTOR}: term {} {why}", bounded(term)));
        let word = |w: &str| !w.is_empty() && w.len() <= 253 && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        let mut terms = Vec::new();
        for raw in s.split(',').map(str::trim) {
            if raw.is_empty() {
                return Err(bad(raw, "is empty (a stray comma?)"));
            }
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEquals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = raw.split_once('=') {
                Term::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::Absent(k.trim().to_owned())
            } else {
                Term::Exists(raw.to_owned())
            };
            let ok = match &term {
                Term::Equals(k, v) | Term::NotEquals(k, v) => word(k) && (v.is_empty() || word(v)),
                Term::Exists(k) | Term::Absent(k) => word(k),
            };
            if !ok {
                return Err(bad(raw, "is not key=value, key!=value, key or !key with label characters"));
            }
            terms.push(term);
        }
        Ok(Selector(terms))
    }

    /// Whether pool labels satisfy every term.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::Absent(k) => !labels.contains_key(k),
        })
    }
}

/// Whether a node can take new volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Its agent heartbeats.
    Up,
    /// Its agent has been silent past the timeout: it may come back (and may hold the volume).
    Down,
    /// Listed as gone for good: never placed on.
    Retired,
}

/// Health of a pool as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// All is well.
    Healthy,
    /// Works, but needs attention: placed on only after every healthy pool of the same rank.
    Degraded(String),
    /// Cannot take new volumes.
    Unavailable(String),
}

/// One pool of one node, as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCandidate {
    /// The node holding it (for a shared pool served by the controller: the controller's name
    /// for it, which nothing routes on).
    pub node: String,
    /// Pool name (unique on its node).
    pub pool: String,
    /// Pool kind: `file`, `lvm`, `zfs`, `nfs`.
    pub kind: String,
    /// The pool's labels, for `poolSelector`.
    pub labels: BTreeMap<String, String>,
    /// Where its volumes are reachable (a node-local pool: its node's segments).
    pub segments: Segments,
    /// Reachable from many nodes (see [`reachable_in`]).
    pub shared: bool,
    /// Health of the pool.
    pub health: Health,
    /// Whether its node can take volumes.
    pub node_state: NodeState,
    /// The largest single volume it can take now (bytes).
    pub largest_volume: u64,
    /// Bytes in use (the `least-used` policy).
    pub used: u64,
    /// Bytes free (the `most-free` policy).
    pub free: u64,
    /// Volumes in the pool (the `spread` policy).
    pub volumes: u64,
}

/// What one CreateVolume asks of placement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlacementRequest {
    /// The `pool` parameter.
    pub pool: Option<String>,
    /// The `kind` parameter.
    pub kind: Option<String>,
    /// The `poolSelector` parameter.
    pub selector: Selector,
    /// Bytes the volume needs.
    pub capacity: u64,
    /// `accessibility_requirements.requisite` (empty: anywhere).
    pub requisite: Vec<Segments>,
    /// `accessibility_requirements.preferred`, in order.
    pub preferred: Vec<Segments>,
    /// The `placementPolicy` parameter.
    pub policy: Policy,
}

impl PlacementRequest {
    /// Reads the placement parameters from a request's parameters (other keys are left to the
    /// pools); INVALID_ARGUMENT naming the parameter when one is malformed.
    pub fn from_parameters(
        parameters: &BTreeMap<String, String>,
        capacity: u64,
        requisite: Vec<Segments>,
        preferred: Vec<Segments>,
    ) -> Result<PlacementRequest, Error> {
        let non_empty = |key: &str| -> Result<Option<String>, Error> {
            match parameters.get(key).map(|v| v.trim()) {
                None => Ok(None),
                Some("") => Err(Error::InvalidArgument(format!("parameter {key} is empty: leave it out or name one"))),
                Some(v) => Ok(Some(v.to_owned())),
            }
        };
        Ok(PlacementRequest {
            pool: non_empty(PARAM_POOL)?,
            kind: non_empty(PARAM_KIND)?,
            selector: non_empty(PARAM_POOL_SELECTOR)?.map(|s| Selector::parse(&s)).transpose()?.unwrap_or_default(),
            capacity,
            requisite,
            preferred,
            policy: non_empty(PARAM_POLICY)?.map(|s| Policy::parse(&s)).transpose()?.unwrap_or_default(),
        })
    }
}

/// Why a pool was not chosen, in the order the rules are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request names another pool.
    OtherPool,
    /// The request asks for another kind.
    OtherKind,
    /// Its labels fail `poolSelector`.
    Labels,
    /// Its segments are outside every requisite topology.
    Topology,
    /// Its node is listed as retired.
    NodeRetired,
    /// Its node's agent is silent.
    NodeDown,
    /// The pool reports itself unable to take volumes.
    Unhealthy(String),
    /// The largest volume it can take now is smaller than the request.
    NoRoom {
        /// The largest volume it can take (bytes).
        largest: u64,
    },
}

impl Refusal {
    /// Refused by the request's parameters (not by the state of the cluster).
    fn by_parameters(&self) -> bool {
        matches!(self, Refusal::OtherPool | Refusal::OtherKind | Refusal::Labels)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::OtherPool => f.write_str("not the requested pool"),
            Refusal::OtherKind => f.write_str("another kind"),
            Refusal::Labels => f.write_str("labels do not match poolSelector"),
            Refusal::Topology => f.write_str("outside the requisite topology"),
            Refusal::NodeRetired => f.write_str("node retired"),
            Refusal::NodeDown => f.write_str("node unreachable"),
            Refusal::Unhealthy(why) => write!(f, "unhealthy: {}", bounded(why)),
            Refusal::NoRoom { largest } => write!(f, "no room (largest volume {})", crate::config::format_size(*largest)),
        }
    }
}

/// One pool that placement looked at and refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Considered {
    /// Node of the pool.
    pub node: String,
    /// Pool name.
    pub pool: String,
    /// Why it was refused.
    pub refusal: Refusal,
}

/// The outcome of [`place`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// Pools that can take the volume, best first.
    pub ordered: Vec<PoolCandidate>,
    /// Every other pool, with the reason.
    pub refused: Vec<Considered>,
}

/// The most refusals a message lists one by one; the rest are counted.
const MAX_LISTED: usize = 12;

impl Placement {
    /// Nodes that are down but hold a pool that matches the request's parameters and
    /// topology: the volume may already exist there (a retry), so a create must wait for them
    /// (UNAVAILABLE) before placing elsewhere.
    pub fn down_nodes(&self) -> Vec<&str> {
        let mut nodes: Vec<&str> = self.refused.iter().filter(|c| c.refusal == Refusal::NodeDown).map(|c| c.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }

    /// The best pool, or the error to answer: INVALID_ARGUMENT when no pool matches the
    /// parameters at all (a typo in a StorageClass), UNAVAILABLE when a pool that would match
    /// is on a node that is down, only unhealthy pools (none short of room) could take it, or
    /// no pool is known at all (retry), RESOURCE_EXHAUSTED
    /// otherwise (the orchestrator reschedules). The message names every pool considered and why it was refused, bounded.
    pub fn choice(&self, req: &PlacementRequest) -> Result<&PoolCandidate, Error> {
        if let Some(best) = self.ordered.first() {
            return Ok(best);
        }
        let what = format!("no pool can take a volume of {}", crate::config::format_size(req.capacity));
        // No pool at all: no agent has registered (yet); not the request's fault.
        if self.refused.is_empty() {
            return Err(Error::Unavailable(format!("{what}: no pool is registered; retry when the nodes' agents have registered")));
        }
        if self.refused.iter().all(|c| c.refusal.by_parameters()) {
            return Err(Error::InvalidArgument(format!(
                "{what}: no pool matches the parameters {}{}",
                describe_parameters(req),
                self.listing()
            )));
        }
        let listing = self.listing();
        if !self.down_nodes().is_empty() {
            return Err(Error::Unavailable(format!("{what} now; retry when the node is back{listing}")));
        }
        // Only sick pools could have taken it (none lacked room): retry, do not reschedule.
        let sick = self.refused.iter().any(|c| matches!(c.refusal, Refusal::Unhealthy(_)));
        if sick && !self.refused.iter().any(|c| matches!(c.refusal, Refusal::NoRoom { .. })) {
            return Err(Error::Unavailable(format!("{what} now; retry when the pool is healthy again{listing}")));
        }
        Err(Error::ResourceExhausted(format!("{what}{listing}")))
    }

    /// `: pool p on node n: why; …`, at most [`MAX_LISTED`] pools, refusals by parameters
    /// last (they say least), then a count of the rest.
    fn listing(&self) -> String {
        let mut refused: Vec<&Considered> = self.refused.iter().collect();
        refused.sort_by_key(|c| c.refusal.by_parameters());
        let mut out = String::from(": ");
        for (i, c) in refused.iter().take(MAX_LISTED).enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            out.push_str(&format!("pool {} on node {}: {}", bounded(&c.pool), bounded(&c.node), c.refusal));
        }
        if refused.len() > MAX_LISTED {
            out.push_str(&format!("; and {} more", refused.len() - MAX_LISTED));
        }
        out
    }
}

fn describe_parameters(req: &PlacementRequest) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &req.pool {
        parts.push(format!("{PARAM_POOL}={}", bounded(p)));
    }
    if let Some(k) = &req.kind {
        parts.push(format!("{PARAM_KIND}={}", bounded(k)));
    }
    if !req.selector.0.is_empty() {
        parts.push(format!("{PARAM_POOL_SELECTOR} with {} terms", req.selector.0.len()));
    }
    if parts.is_empty() { "(none)".to_owned() } else { parts.join(", ") }
}

/// Why `c` cannot take the volume, or `None` when it can. The rules, in order: parameters
/// (pool, kind, labels), topology, node state, health, room.
pub fn refusal(c: &PoolCandidate, req: &PlacementRequest) -> Option<Refusal> {
    if req.pool.as_ref().is_some_and(|p| *p != c.pool) {
        return Some(Refusal::OtherPool);
    }
    if req.kind.as_ref().is_some_and(|k| *k != c.kind) {
        return Some(Refusal::OtherKind);
    }
    if !req.selector.matches(&c.labels) {
        return Some(Refusal::Labels);
    }
    if !reachable(&c.segments, c.shared, &req.requisite) {
        return Some(Refusal::Topology);
    }
    match c.node_state {
        NodeState::Up => {}
        NodeState::Down => return Some(Refusal::NodeDown),
        NodeState::Retired => return Some(Refusal::NodeRetired),
    }
    if let Health::Unavailable(why) = &c.health {
        return Some(Refusal::Unhealthy(why.clone()));
    }
    if c.largest_volume < req.capacity {
        return Some(Refusal::NoRoom { largest: c.largest_volume });
    }
    None
}

/// Places one volume: every pool of every node is either a candidate (ordered best first) or
/// refused with a reason. The order: the first `preferred` topology a pool lies in (pools in
/// none last), healthy before degraded, then the policy, then node and pool name so the same
/// inputs always give the same answer.
pub fn place(pools: &[PoolCandidate], req: &PlacementRequest) -> Placement {
    // The spread policy counts every volume of a node, in pools refused or not.
    let mut per_node: BTreeMap<&str, u64> = BTreeMap::new();
    for p in pools {
        *per_node.entry(p.node.as_str()).or_default() += p.volumes;
    }
    let mut out = Placement::default();
    for p in pools {
        match refusal(p, req) {
            None => out.ordered.push(p.clone()),
            Some(refusal) => out.refused.push(Considered { node: p.node.clone(), pool: p.pool.clone(), refusal }),
        }
    }
    // A shared pool is preferred where it reaches, like `requisite` (see `reachable_in`).
    let rank = |c: &PoolCandidate| {
        let preferred = req.preferred.iter().position(|t| reachable_in(&c.segments, c.shared, t)).unwrap_or(req.preferred.len());
        (preferred, matches!(c.health, Health::Degraded(_)))
    };
    out.ordered.sort_by(|a, b| {
        let by_policy = match req.policy {
            Policy::MostFree => b.free.cmp(&a.free),
            Policy::LeastUsed => a.used.cmp(&b.used).then(b.free.cmp(&a.free)),
            Policy::Spread => {
                per_node[a.node.as_str()].cmp(&per_node[b.node.as_str()]).then(a.volumes.cmp(&b.volumes)).then(b.free.cmp(&a.free))
            }
        };
        rank(a).cmp(&rank(b)).then(by_policy).then(a.node.cmp(&b.node)).then(a.pool.cmp(&b.pool))
    });
    out
}

/// What GetCapacity (and `maximum_volume_size`) answers for `segment` (None: anywhere): the
/// largest single volume that one pool matching the request's parameters, inside the segment,
/// on a node that is up, could take now; 0 when there is none. Not a sum over pools: a
/// scheduler told "10 GiB" must be able to place one 10 GiB volume there.
pub fn capacity(pools: &[PoolCandidate], req: &PlacementRequest, segment: Option<&Segments>) -> u64 {
    let req = PlacementRequest { capacity: 0, requisite: segment.into_iter().cloned().collect(), preferred: vec![], ..req.clone() };
    pools.iter().filter(|p| refusal(p, &req).is_none()).map(|p| p.largest_volume).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(pairs: &[(&str, &str)]) -> Segments {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn requisite_topologies() {
        let here = seg(&[(NODE_KEY, "a"), ("zone", "z1")]);
        struct Case {
            name: &'static str,
            requisite: Vec<Segments>,
            want: bool,
        }
        let cases = [
            Case { name: "none", requisite: vec![], want: true },
            Case { name: "this node", requisite: vec![seg(&[(NODE_KEY, "a")])], want: true },
            Case { name: "other node", requisite: vec![seg(&[(NODE_KEY, "b")])], want: false },
            Case { name: "one of several", requisite: vec![seg(&[(NODE_KEY, "b")]), seg(&[("zone", "z1")])], want: true },
            Case { name: "unknown key", requisite: vec![seg(&[("rack", "r1")])], want: false },
            Case { name: "all keys must match", requisite: vec![seg(&[(NODE_KEY, "a"), ("zone", "z2")])], want: false },
        ];
        for c in cases {
            assert_eq!(allowed(&here, &c.requisite), c.want, "{}", c.name);
        }
    }

    #[test]
    fn shared_pools_are_reachable_inside_their_segments() {
        let everywhere = Segments::new();
        let zone = seg(&[("zone", "z1")]);
        let node_a = seg(&[(NODE_KEY, "a"), ("zone", "z1")]);
        assert!(reachable(&everywhere, true, &[seg(&[(NODE_KEY, "a")])]), "an everywhere pool serves any node");
        assert!(reachable(&zone, true, std::slice::from_ref(&node_a)), "a zone pool serves a node in its zone");
        assert!(!reachable(&zone, true, &[seg(&[(NODE_KEY, "b"), ("zone", "z2")])]), "not a node of another zone");
        assert!(!reachable(&seg(&[(NODE_KEY, "a")]), false, &[seg(&[(NODE_KEY, "b")])]), "node-local pools stay on their node");
        assert!(reachable(&node_a, false, &[zone]), "a node in the requested zone");
    }

    #[test]
    fn preferred_first_then_most_free() {
        let c = |pool: &str, node: &str, free| Candidate { pool: pool.into(), segments: seg(&[(NODE_KEY, node)]), free };
        let got = order(vec![c("small", "a", 10), c("big", "a", 100), c("pref", "b", 1)], &[seg(&[(NODE_KEY, "b")])]);
        let names: Vec<_> = got.iter().map(|c| c.pool.as_str()).collect();
        assert_eq!(names, ["pref", "big", "small"]);
    }

    /// A pool on node `node` with `free` bytes (the largest volume too), 10 bytes used per
    /// volume, healthy, node up; labelled `tier=<pool name>`.
    fn pool(node: &str, name: &str, free: u64) -> PoolCandidate {
        PoolCandidate {
            node: node.into(),
            pool: name.into(),
            kind: "file".into(),
            labels: BTreeMap::from([("tier".to_owned(), name.to_owned())]),
            segments: seg(&[(NODE_KEY, node), ("zone", if node < "c" { "z1" } else { "z2" })]),
            shared: false,
            health: Health::Healthy,
            node_state: NodeState::Up,
            largest_volume: free,
            used: 0,
            free,
            volumes: 0,
        }
    }

    fn with(mut p: PoolCandidate, f: impl FnOnce(&mut PoolCandidate)) -> PoolCandidate {
        f(&mut p);
        p
    }

    fn names(p: &Placement) -> Vec<String> {
        p.ordered.iter().map(|c| format!("{}/{}", c.node, c.pool)).collect()
    }

    fn refusals(p: &Placement) -> Vec<String> {
        let mut r: Vec<String> = p.refused.iter().map(|c| format!("{}/{}: {}", c.node, c.pool, c.refusal)).collect();
        r.sort();
        r
    }

    #[test]
    fn place_applies_each_rule() {
        struct Case {
            name: &'static str,
            pools: Vec<PoolCandidate>,
            req: PlacementRequest,
            want: &'static [&'static str],
            refused: &'static [&'static str],
        }
        let gib = 1 << 30;
        let base = PlacementRequest { capacity: gib, ..PlacementRequest::default() };
        let three = || vec![pool("a", "fast", 5 * gib), pool("b", "slow", 9 * gib), pool("c", "bulk", 2 * gib)];
        let cases = [
            Case {
                name: "no parameters: most free first",
                pools: three(),
                req: base.clone(),
                want: &["b/slow", "a/fast", "c/bulk"],
                refused: &[],
            },
            Case {
                name: "pool parameter",
                pools: three(),
                req: PlacementRequest { pool: Some("fast".into()), ..base.clone() },
                want: &["a/fast"],
                refused: &["b/slow: not the requested pool", "c/bulk: not the requested pool"],
            },
            Case {
                name: "kind parameter",
                pools: vec![pool("a", "fast", gib), with(pool("b", "vg", gib), |p| p.kind = "lvm".into())],
                req: PlacementRequest { kind: Some("lvm".into()), ..base.clone() },
                want: &["b/vg"],
                refused: &["a/fast: another kind"],
            },
            Case {
                name: "selector equals",
                pools: three(),
                req: PlacementRequest { selector: Selector::parse("tier=bulk").unwrap(), ..base.clone() },
                want: &["c/bulk"],
                refused: &["a/fast: labels do not match poolSelector", "b/slow: labels do not match poolSelector"],
            },
            Case {
                name: "selector not-equals, exists and absent",
                pools: vec![
                    pool("a", "fast", gib),
                    with(pool("b", "ssd", gib), |p| {
                        p.labels.insert("ssd".into(), "".into());
                    }),
                ],
                req: PlacementRequest { selector: Selector::parse("tier!=fast, !ssd").unwrap(), ..base.clone() },
                want: &[],
                refused: &["a/fast: labels do not match poolSelector", "b/ssd: labels do not match poolSelector"],
            },
            Case {
                name: "selector exists",
                pools: vec![
                    pool("a", "fast", gib),
                    with(pool("b", "ssd", gib), |p| {
                        p.labels.insert("ssd".into(), "".into());
                    }),
                ],
                req: PlacementRequest { selector: Selector::parse("ssd").unwrap(), ..base.clone() },
                want: &["b/ssd"],
                refused: &["a/fast: labels do not match poolSelector"],
            },
            Case {
                name: "requisite keeps one zone",
                pools: three(),
                req: PlacementRequest { requisite: vec![seg(&[("zone", "z2")])], ..base.clone() },
                want: &["c/bulk"],
                refused: &["a/fast: outside the requisite topology", "b/slow: outside the requisite topology"],
            },
            Case {
                name: "preferred in order beats free space",
                pools: three(),
                req: PlacementRequest { preferred: vec![seg(&[(NODE_KEY, "c")]), seg(&[(NODE_KEY, "a")])], ..base.clone() },
                want: &["c/bulk", "a/fast", "b/slow"],
                refused: &[],
            },
            Case {
                name: "a full pool is skipped",
                pools: three(),
                req: PlacementRequest { capacity: 6 * gib, ..base.clone() },
                want: &["b/slow"],
                refused: &["a/fast: no room (largest volume 5 GiB)", "c/bulk: no room (largest volume 2 GiB)"],
            },
            Case {
                name: "room is the largest single volume, not free bytes",
                pools: vec![with(pool("a", "thin", 9 * gib), |p| p.largest_volume = gib / 2), pool("b", "slow", 2 * gib)],
                req: base.clone(),
                want: &["b/slow"],
                refused: &["a/thin: no room (largest volume 512 MiB)"],
            },
            Case {
                name: "down and retired nodes are refused",
                pools: vec![
                    with(pool("a", "fast", 9 * gib), |p| p.node_state = NodeState::Down),
                    with(pool("b", "slow", 9 * gib), |p| p.node_state = NodeState::Retired),
                    pool("c", "bulk", 2 * gib),
                ],
                req: base.clone(),
                want: &["c/bulk"],
                refused: &["a/fast: node unreachable", "b/slow: node retired"],
            },
            Case {
                name: "unhealthy refused, degraded after healthy",
                pools: vec![
                    with(pool("a", "fast", 9 * gib), |p| p.health = Health::Unavailable("volume group missing".into())),
                    with(pool("b", "slow", 9 * gib), |p| p.health = Health::Degraded("zpool degraded".into())),
                    pool("c", "bulk", 2 * gib),
                ],
                req: base.clone(),
                want: &["c/bulk", "b/slow"],
                refused: &["a/fast: unhealthy: \"volume group missing\""],
            },
            Case {
                name: "least-used",
                pools: vec![
                    with(pool("a", "fast", 9 * gib), |p| p.used = 3 * gib),
                    with(pool("b", "slow", 2 * gib), |p| p.used = gib),
                    with(pool("c", "bulk", 5 * gib), |p| p.used = 3 * gib),
                ],
                req: PlacementRequest { policy: Policy::LeastUsed, ..base.clone() },
                want: &["b/slow", "a/fast", "c/bulk"],
                refused: &[],
            },
            Case {
                name: "spread counts every volume of a node",
                pools: vec![
                    with(pool("a", "fast", 9 * gib), |p| p.volumes = 1),
                    with(pool("a", "full", 0), |p| p.volumes = 5),
                    with(pool("b", "slow", 2 * gib), |p| p.volumes = 3),
                    with(pool("c", "bulk", 5 * gib), |p| p.volumes = 4),
                ],
                req: PlacementRequest { policy: Policy::Spread, ..base.clone() },
                want: &["b/slow", "c/bulk", "a/fast"],
                refused: &["a/full: no room (largest volume 0 B)"],
            },
            Case {
                name: "ties break by node then pool",
                pools: vec![pool("b", "y", gib), pool("a", "z", gib), pool("a", "x", gib)],
                req: base.clone(),
                want: &["a/x", "a/z", "b/y"],
                refused: &[],
            },
            Case {
                name: "a shared pool reaches a preferred node inside its segments",
                pools: vec![
                    pool("a", "local", 9 * gib),
                    with(pool("nfs", "share", gib), |p| {
                        p.shared = true;
                        p.segments = seg(&[("zone", "z2")]);
                    }),
                ],
                req: PlacementRequest { preferred: vec![seg(&[(NODE_KEY, "c"), ("zone", "z2")])], ..base.clone() },
                want: &["nfs/share", "a/local"],
                refused: &[],
            },
        ];
        for c in cases {
            let got = place(&c.pools, &c.req);
            assert_eq!(names(&got), c.want, "{}: order", c.name);
            assert_eq!(refusals(&got), c.refused, "{}: refusals", c.name);
        }
    }

    #[test]
    fn refusal_answers_the_right_code() {
        use crate::error::Error as E;
        let gib = 1 << 30;
        let req = |capacity| PlacementRequest { capacity, ..PlacementRequest::default() };
        let code = |pools: Vec<PoolCandidate>, req: PlacementRequest| match place(&pools, &req).choice(&req) {
            Ok(c) => format!("ok {}", c.pool),
            Err(E::InvalidArgument(m)) => format!("invalid: {m}"),
            Err(E::ResourceExhausted(m)) => format!("exhausted: {m}"),
            Err(E::Unavailable(m)) => format!("unavailable: {m}"),
            Err(e) => format!("other: {e}"),
        };
        struct Case {
            name: &'static str,
            got: String,
            want: &'static str,
        }
        let cases = [
            Case { name: "a fit", got: code(vec![pool("a", "fast", gib)], req(gib)), want: "ok fast" },
            Case {
                name: "nothing matches the parameters",
                got: code(vec![pool("a", "fast", gib)], PlacementRequest { pool: Some("fsat".into()), ..req(gib) }),
                want: "invalid: no pool can take a volume of 1 GiB: no pool matches the parameters pool=\"fsat\": \
                       pool \"fast\" on node \"a\": not the requested pool",
            },
            Case {
                name: "no room anywhere",
                got: code(vec![pool("a", "fast", gib), pool("b", "slow", 0)], req(2 * gib)),
                want: "exhausted: no pool can take a volume of 2 GiB: pool \"fast\" on node \"a\": no room (largest volume 1 GiB); \
                       pool \"slow\" on node \"b\": no room (largest volume 0 B)",
            },
            Case {
                name: "the only match is down: retry",
                got: code(vec![with(pool("a", "fast", gib), |p| p.node_state = NodeState::Down), pool("b", "slow", 0)], req(gib)),
                want: "unavailable: no pool can take a volume of 1 GiB now; retry when the node is back: pool \"fast\" on node \"a\": \
                       node unreachable; pool \"slow\" on node \"b\": no room (largest volume 0 B)",
            },
            Case {
                name: "only a sick pool could take it: retry",
                got: code(
                    vec![
                        with(pool("a", "fast", gib), |p| p.health = Health::Unavailable("directory /p is missing".into())),
                        pool("b", "slow", 9 * gib),
                    ],
                    PlacementRequest { pool: Some("fast".into()), ..req(gib) },
                ),
                want: "unavailable: no pool can take a volume of 1 GiB now; retry when the pool is healthy again: pool \"fast\" on node \"a\": \
                       unhealthy: \"directory /p is missing\"; pool \"slow\" on node \"b\": not the requested pool",
            },
            Case {
                name: "retired is not retryable",
                got: code(vec![with(pool("a", "fast", gib), |p| p.node_state = NodeState::Retired)], req(gib)),
                want: "exhausted: no pool can take a volume of 1 GiB: pool \"fast\" on node \"a\": node retired",
            },
            Case {
                name: "outside the topology",
                got: code(vec![pool("a", "fast", gib)], PlacementRequest { requisite: vec![seg(&[(NODE_KEY, "b")])], ..req(gib) }),
                want: "exhausted: no pool can take a volume of 1 GiB: pool \"fast\" on node \"a\": outside the requisite topology",
            },
            Case {
                name: "no pool at all",
                got: code(vec![], req(gib)),
                want: "unavailable: no pool can take a volume of 1 GiB: no pool is registered; retry when the nodes' agents have registered",
            },
        ];
        for c in cases {
            assert_eq!(c.got, c.want, "{}", c.name);
        }
    }

    #[test]
    fn refusal_message_is_bounded() {
        let long = "n".repeat(1000);
        let pools: Vec<PoolCandidate> = (0..500).map(|i| pool(&long, &format!("p{i}"), 0)).collect();
        let req = PlacementRequest { capacity: 1, ..PlacementRequest::default() };
        let Err(Error::ResourceExhausted(m)) = place(&pools, &req).choice(&req) else { panic!("want RESOURCE_EXHAUSTED") };
        assert!(m.ends_with("; and 488 more"), "{m}");
        assert!(m.len() < 4096, "{} bytes", m.len());
    }

    #[test]
    fn down_nodes_are_those_that_could_hold_the_volume() {
        let down = |p: PoolCandidate| with(p, |p| p.node_state = NodeState::Down);
        let pools = vec![down(pool("a", "fast", 0)), down(pool("a", "slow", 0)), down(pool("c", "bulk", 0)), pool("b", "x", 9)];
        let req = PlacementRequest { requisite: vec![seg(&[("zone", "z1")])], ..PlacementRequest::default() };
        let got = place(&pools, &req);
        assert_eq!(got.down_nodes(), ["a"], "node c is outside the requisite zone, so it cannot hold the volume");
        assert_eq!(names(&got), ["b/x"]);
    }

    #[test]
    fn parameters() {
        let params =
            |pairs: &[(&str, &str)]| -> BTreeMap<String, String> { pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        /// pool, kind, selector terms, policy.
        type Parsed = (Option<&'static str>, Option<&'static str>, Vec<Term>, Policy);
        struct Case {
            name: &'static str,
            params: BTreeMap<String, String>,
            want: Result<Parsed, &'static str>,
        }
        let eq = |k: &str, v: &str| Term::Equals(k.into(), v.into());
        let cases = [
            Case { name: "none", params: params(&[]), want: Ok((None, None, vec![], Policy::MostFree)) },
            Case {
                name: "every parameter",
                params: params(&[
                    ("pool", "fast"),
                    ("kind", "lvm"),
                    ("poolSelector", "tier=ssd, rack!=r1,zone,!old"),
                    ("placementPolicy", "spread"),
                    ("fsType", "xfs"),
                ]),
                want: Ok((
                    Some("fast"),
                    Some("lvm"),
                    vec![
                        eq("tier", "ssd"),
                        Term::NotEquals("rack".into(), "r1".into()),
                        Term::Exists("zone".into()),
                        Term::Absent("old".into()),
                    ],
                    Policy::Spread,
                )),
            },
            Case {
                name: "least-used",
                params: params(&[("placementPolicy", "least-used")]),
                want: Ok((None, None, vec![], Policy::LeastUsed)),
            },
            Case {
                name: "label value may be empty",
                params: params(&[("poolSelector", "ssd=")]),
                want: Ok((None, None, vec![eq("ssd", "")], Policy::MostFree)),
            },
            Case {
                name: "unknown policy",
                params: params(&[("placementPolicy", "random")]),
                want: Err("parameter placementPolicy: unknown policy \"random\" (most-free, least-used or spread)"),
            },
            Case { name: "empty pool", params: params(&[("pool", " ")]), want: Err("parameter pool is empty: leave it out or name one") },
            Case {
                name: "stray comma",
                params: params(&[("poolSelector", "a=b,")]),
                want: Err("parameter poolSelector: term \"\" is empty (a stray comma?)"),
            },
            Case {
                name: "bad characters",
                params: params(&[("poolSelector", "a b=c")]),
                want: Err("parameter poolSelector: term \"a b=c\" is not key=value, key!=value, key or !key with label characters"),
            },
            Case {
                name: "no key",
                params: params(&[("poolSelector", "=c")]),
                want: Err("parameter poolSelector: term \"=c\" is not key=value, key!=value, key or !key with label characters"),
            },
        ];
        for c in cases {
            let got = PlacementRequest::from_parameters(&c.params, 1, vec![], vec![]);
            match (got, c.want) {
                (Ok(r), Ok((pool, kind, terms, policy))) => {
                    assert_eq!(r.pool.as_deref(), pool, "{}", c.name);
                    assert_eq!(r.kind.as_deref(), kind, "{}", c.name);
                    assert_eq!(r.selector.0, terms, "{}", c.name);
                    assert_eq!(r.policy, policy, "{}", c.name);
                }
                (Err(Error::InvalidArgument(m)), Err(want)) => assert_eq!(m, want, "{}", c.name),
                (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
            }
        }
    }

    #[test]
    fn capacity_is_the_largest_single_volume_per_segment() {
        let gib = 1 << 30;
        let pools = vec![
            pool("a", "fast", 5 * gib),
            with(pool("a", "vg", 7 * gib), |p| p.kind = "lvm".into()),
            pool("b", "slow", 9 * gib),
            with(pool("c", "bulk", 20 * gib), |p| p.node_state = NodeState::Down),
            pool("d", "small", gib),
        ];
        struct Case {
            name: &'static str,
            req: PlacementRequest,
            segment: Option<Segments>,
            want: u64,
        }
        let any = PlacementRequest::default();
        let cases = [
            Case { name: "anywhere: the biggest pool, not the sum", req: any.clone(), segment: None, want: 9 * gib },
            Case { name: "node a", req: any.clone(), segment: Some(seg(&[(NODE_KEY, "a")])), want: 7 * gib },
            Case { name: "zone z1 (nodes a, b)", req: any.clone(), segment: Some(seg(&[("zone", "z1")])), want: 9 * gib },
            Case { name: "zone z2: node c is down", req: any.clone(), segment: Some(seg(&[("zone", "z2")])), want: gib },
            Case { name: "node c is down", req: any.clone(), segment: Some(seg(&[(NODE_KEY, "c")])), want: 0 },
            Case {
                name: "kind parameter on node a",
                req: PlacementRequest { kind: Some("file".into()), ..any.clone() },
                segment: Some(seg(&[(NODE_KEY, "a")])),
                want: 5 * gib,
            },
            Case { name: "unknown node", req: any.clone(), segment: Some(seg(&[(NODE_KEY, "x")])), want: 0 },
        ];
        for c in cases {
            assert_eq!(capacity(&pools, &c.req, c.segment.as_ref()), c.want, "{}", c.name);
        }
    }
}
