//! Placement: which pool a new volume goes to. Candidates are the pools that match the
//! request's parameters (`pool`, `kind`) and whose topology satisfies the request's
//! `requisite` topologies; they are ordered by `preferred` topologies first, then by free space.
//! Pure functions over plain data, so the rules are tested without any storage.

use std::collections::BTreeMap;

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
}
