//! Many nodes on one machine: one `holdfast controller` and three `holdfast agent` processes.

#[path = "common/netns.rs"]
mod netns;
