//! One CSI client: the Identity, Controller and Node clients of an endpoint over one
//! connection, and the request builders that `ctl`, `bench` and the integration tests share
//! (capabilities, capacity, CreateVolume with its source, stage / publish / unpublish /
//! unstage). Pure builders, no policy: a caller that needs an unusual request (a test sending a
//! hostile field) starts from one of these and changes the field.

use std::collections::HashMap;

use tonic::transport::Channel;

use crate::proto::controller_client::ControllerClient;
use crate::proto::identity_client::IdentityClient;
use crate::proto::node_client::NodeClient;
use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use crate::proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use crate::proto::{
    CapacityRange, CreateVolumeRequest, NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, VolumeCapability, VolumeContentSource,
};

/// The three CSI services of one endpoint, sharing one connection (clones share it too).
#[derive(Debug, Clone)]
pub struct Clients {
    /// Identity: plugin info, capabilities, Probe.
    pub identity: IdentityClient<Channel>,
    /// Controller: volumes, snapshots, capacity.
    pub controller: ControllerClient<Channel>,
    /// Node: stage, publish, stats, expansion.
    pub node: NodeClient<Channel>,
    /// issue 12: GroupController: group snapshots.
    pub group: crate::proto::group_controller_client::GroupControllerClient<Channel>,
}

impl Clients {
    /// The clients of an open channel.
    pub fn new(channel: Channel) -> Clients {
        Clients {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            group: crate::proto::group_controller_client::GroupControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }

    /// Connects to `endpoint` (`unix:///path/csi.sock`, `tcp://HOST:PORT`; see
    /// [`crate::endpoint`]).
    pub async fn connect(endpoint: &str) -> Result<Clients, String> {
        Ok(Clients::new(crate::endpoint::connect(endpoint).await?))
    }
}

/// How a volume is to be accessed: the parts of a `VolumeCapability` callers choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// A raw block device instead of a mounted filesystem.
    pub block: bool,
    /// Filesystem type of a mount volume; empty lets the driver choose.
    pub fs: Option<String>,
    /// Extra mount options of a mount volume.
    pub mount_flags: Vec<String>,
    /// The access mode.
    pub mode: Mode,
}

impl Default for Access {
    fn default() -> Self {
        Access { block: false, fs: None, mount_flags: Vec::new(), mode: Mode::SingleNodeWriter }
    }
}

/// Builds the `VolumeCapability` for an [`Access`]. A block volume cannot have a filesystem or
/// mount flags; saying so here beats an INVALID_ARGUMENT from the driver.
pub fn volume_capability(a: &Access) -> Result<VolumeCapability, String> {
    if a.block {
        if a.fs.is_some() || !a.mount_flags.is_empty() {
            return Err("a block volume has no filesystem: drop --fs and --mount-flag, or drop --block".into());
        }
        return Ok(block_capability(a.mode));
    }
    Ok(mount_capability(a.fs.as_deref().unwrap_or_default(), &a.mount_flags, a.mode))
}

/// A filesystem capability: `fs_type` (empty: the driver's default) mounted with `mount_flags`.
pub fn mount_capability(fs_type: &str, mount_flags: &[String], mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_owned(),
            mount_flags: mount_flags.to_vec(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// A raw block capability.
pub fn block_capability(mode: Mode) -> VolumeCapability {
    VolumeCapability { access_type: Some(AccessType::Block(BlockVolume {})), access_mode: Some(AccessMode { mode: mode as i32 }) }
}

/// A capacity range asking for `bytes` at least (no limit: the driver may round up). CSI
/// carries `int64`: larger sizes are sent as `i64::MAX` (callers refuse them before).
pub fn capacity(bytes: u64) -> CapacityRange {
    CapacityRange { required_bytes: i64::try_from(bytes).unwrap_or(i64::MAX), limit_bytes: 0 }
}

/// What a new volume is filled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    /// Restore this snapshot id.
    Snapshot(&'a str),
    /// Clone this volume id.
    Volume(&'a str),
}

/// The `volume_content_source` of a request filled from `source`.
pub fn content_source(source: Source<'_>) -> VolumeContentSource {
    let t = match source {
        Source::Snapshot(id) => SourceType::Snapshot(SnapshotSource { snapshot_id: id.to_owned() }),
        Source::Volume(id) => SourceType::Volume(VolumeSource { volume_id: id.to_owned() }),
    };
    VolumeContentSource { r#type: Some(t) }
}

/// CreateVolume of `name` with `capacity_range`, one capability and `parameters` (no source,
/// no topology: set `volume_content_source` / `accessibility_requirements` on the result).
pub fn create_volume_request(
    name: &str,
    capacity_range: CapacityRange,
    capability: VolumeCapability,
    parameters: HashMap<String, String>,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(capacity_range),
        volume_capabilities: vec![capability],
        parameters,
        ..Default::default()
    }
}

/// NodeStageVolume of `volume_id` at `staging`.
pub fn stage_request(volume_id: &str, staging: &str, capability: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume_id.to_owned(),
        staging_target_path: staging.to_owned(),
        volume_capability: Some(capability),
        ..Default::default()
    }
}

/// NodePublishVolume of `volume_id` staged at `staging` onto `target`.
pub fn publish_request(
    volume_id: &str,
    staging: &str,
    target: &str,
    capability: VolumeCapability,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        staging_target_path: staging.to_owned(),
        target_path: target.to_owned(),
        volume_capability: Some(capability),
        readonly,
        ..Default::default()
    }
}

/// NodeUnpublishVolume of `volume_id` at `target`.
pub fn unpublish_request(volume_id: &str, target: &str) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest { volume_id: volume_id.to_owned(), target_path: target.to_owned() }
}

/// NodeUnstageVolume of `volume_id` at `staging`.
pub fn unstage_request(volume_id: &str, staging: &str) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest { volume_id: volume_id.to_owned(), staging_target_path: staging.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities() {
        struct Case {
            name: &'static str,
            access: Access,
            want: Result<VolumeCapability, &'static str>,
        }
        let mount = |fs: &str, flags: &[&str], mode: Mode| VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                volume_mount_group: String::new(),
            })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        };
        let cases = [
            Case { name: "default", access: Access::default(), want: Ok(mount("", &[], Mode::SingleNodeWriter)) },
            Case {
                name: "ext4 with flags",
                access: Access { fs: Some("ext4".into()), mount_flags: vec!["noatime".into()], ..Access::default() },
                want: Ok(mount("ext4", &["noatime"], Mode::SingleNodeWriter)),
            },
            Case {
                name: "block read-only many",
                access: Access { block: true, mode: Mode::MultiNodeReaderOnly, ..Access::default() },
                want: Ok(VolumeCapability {
                    access_type: Some(AccessType::Block(BlockVolume {})),
                    access_mode: Some(AccessMode { mode: Mode::MultiNodeReaderOnly as i32 }),
                }),
            },
            Case {
                name: "block with fs",
                access: Access { block: true, fs: Some("xfs".into()), ..Access::default() },
                want: Err("no filesystem"),
            },
            Case {
                name: "block with flags",
                access: Access { block: true, mount_flags: vec!["ro".into()], ..Access::default() },
                want: Err("no filesystem"),
            },
        ];
        for c in cases {
            match (volume_capability(&c.access), c.want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{}", c.name),
                (Err(got), Err(want)) => assert!(got.contains(want), "{}: {got}", c.name),
                (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
            }
        }
    }

    #[test]
    fn requests() {
        assert_eq!(capacity(1 << 30), CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 });
        assert_eq!(capacity(u64::MAX).required_bytes, i64::MAX);
        let cap = mount_capability("ext4", &[], Mode::SingleNodeWriter);
        let params = HashMap::from([("pool".to_owned(), "p1".to_owned())]);
        let mut req = create_volume_request("v1", capacity(1 << 20), cap.clone(), params.clone());
        req.volume_content_source = Some(content_source(Source::Snapshot("snap-1")));
        assert_eq!(req.name, "v1");
        assert_eq!(req.capacity_range.unwrap().required_bytes, 1 << 20);
        assert_eq!((req.volume_capabilities, req.parameters), (vec![cap.clone()], params));
        assert_eq!(req.volume_content_source.unwrap().r#type, Some(SourceType::Snapshot(SnapshotSource { snapshot_id: "snap-1".into() })));
        assert_eq!(content_source(Source::Volume("v0")).r#type, Some(SourceType::Volume(VolumeSource { volume_id: "v0".into() })));

        let stage = stage_request("v1", "/s", cap.clone());
        assert_eq!((stage.volume_id.as_str(), stage.staging_target_path.as_str()), ("v1", "/s"));
        assert_eq!(stage.volume_capability, Some(cap.clone()));
        let publish = publish_request("v1", "/s", "/t", cap.clone(), true);
        assert_eq!((publish.staging_target_path.as_str(), publish.target_path.as_str(), publish.readonly), ("/s", "/t", true));
        assert_eq!(unpublish_request("v1", "/t"), NodeUnpublishVolumeRequest { volume_id: "v1".into(), target_path: "/t".into() });
        assert_eq!(unstage_request("v1", "/s"), NodeUnstageVolumeRequest { volume_id: "v1".into(), staging_target_path: "/s".into() });
    }
}
