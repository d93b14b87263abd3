//! What the CSI Controller of every process shares with the pool operations: capacity ranges,
//! paging, the smallest volume, the volume-context keys. The Controller service itself is
//! `crate::controller::ClusterController` (placement and routing over the registry), in
//! `holdfast controller` and, over one in-process agent, in all-in-one; the pool operations
//! are `crate::agent::local::LocalAgent`.

pub use crate::agent::local::{CTX_FS_TYPE, CTX_POOL, DEFAULT_CAPACITY, capacity_for, list_key, minimum_size, paginate};
