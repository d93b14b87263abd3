//! `holdfast controller`: the CSI Controller service of a cluster, over the [`registry`] of
//! agents: it validates what it must to place, places new volumes (`crate::placement`) and
//! routes every call to the agent that owns the object.

pub mod registry;
