//! `holdfast ctl`: an operator's CSI client (like `csc`). One subcommand per CSI operation,
//! against any CSI socket: human-readable output by default, one JSON object per result with
//! `--json`. Each subcommand is one function: build the request (pure, tested below), call,
//! show. Failed calls read `NOT_FOUND: volume … does not exist`.

// issue 12: group snapshots
pub mod group;
pub mod nodes;
pub mod request;
pub mod show;

use std::collections::HashSet;
use std::future::Future;

use serde_json::{Value, json};

use crate::client::{self, Clients, Source};
use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::{
    ControllerExpandVolumeRequest, ControllerExpandVolumeResponse, ControllerGetCapabilitiesRequest, ControllerGetVolumeRequest,
    ControllerModifyVolumeRequest, CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest,
    GetCapacityRequest, GetPluginCapabilitiesRequest, GetPluginInfoRequest, ListSnapshotsRequest, ListVolumesRequest,
    NodeExpandVolumeRequest, NodeGetCapabilitiesRequest, NodeGetInfoRequest, NodeGetVolumeStatsRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, ProbeRequest, TopologyRequirement,
};
use request::{Access, capacity, parse_access_mode, parse_key_value, parse_size_arg, to_map, topology, volume_capability};

/// `holdfast ctl [--endpoint E] [--json] <command>`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The driver's CSI endpoint: unix:///path/csi.sock or tcp://HOST:PORT.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///run/holdfast/csi.sock", global = true)]
    pub endpoint: String,
    /// Print one JSON object per result (one per line) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub cmd: Command,
}

/// The subcommands, one per CSI operation (plus `info`).
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Plugin name and version, the capabilities of all three services, node id and topology.
    Info,
    /// GetCapacity: what one new volume could get.
    Capacity(CapacityArgs),
    /// CreateVolume.
    Create(CreateArgs),
    /// DeleteVolume.
    Delete(IdArg),
    /// ListVolumes (follows pagination to the end).
    List(ListArgs),
    /// ControllerGetVolume: one volume, where it is published, its condition.
    Get(IdArg),
    /// CreateSnapshot of a volume.
    Snapshot(SnapshotArgs),
    /// ListSnapshots (follows pagination to the end).
    Snapshots(SnapshotsArgs),
    /// DeleteSnapshot.
    DeleteSnapshot(IdArg),
    /// NodeStageVolume: attach, format when blank, mount at the staging path.
    Stage(StageArgs),
    /// NodePublishVolume: bind the staged volume to the target path.
    Publish(PublishArgs),
    /// NodeUnpublishVolume.
    Unpublish(UnpublishArgs),
    /// NodeUnstageVolume.
    Unstage(UnstageArgs),
    /// NodeGetVolumeStats: bytes and inodes used, volume condition.
    Stats(StatsArgs),
    /// ControllerExpandVolume, then NodeExpandVolume when --path is given and the driver asks for it.
    Expand(ExpandArgs),
    /// The nodes a `holdfast controller` knows: up, down or retired, address, pools and free space.
    Nodes,
    // issue 12: group snapshots
    /// Group snapshots (GroupController): create, delete, get.
    GroupSnapshot(group::GroupArgs),
    // issue 12: modify
    /// ControllerModifyVolume: set mutable parameters (KEY=VALUE …), then show the volume with
    /// its current values (volume_context holdfast.dev/KEY).
    Modify(ModifyArgs),
}

/// `ctl modify`.
#[derive(clap::Args, Debug)]
pub struct ModifyArgs {
    /// The volume.
    pub id: String,
    /// The mutable parameters to set, e.g. compression=zstd provisioning=thick.
    #[arg(required = true, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub params: Vec<(String, String)>,
}

/// A volume or snapshot id.
#[derive(clap::Args, Debug)]
pub struct IdArg {
    /// The id.
    pub id: String,
}

/// How the volume is accessed: becomes the request's `VolumeCapability`.
#[derive(clap::Args, Debug, Clone)]
pub struct AccessArgs {
    /// A raw block volume instead of a filesystem.
    #[arg(long, conflicts_with_all = ["fs", "mount_flags"])]
    pub block: bool,
    /// Filesystem type (ext4, xfs, btrfs); the driver's default when omitted.
    #[arg(long)]
    pub fs: Option<String>,
    /// A mount option; repeat for several.
    #[arg(long = "mount-flag", value_name = "FLAG")]
    pub mount_flags: Vec<String>,
    /// single-node-writer, single-node-reader-only, multi-node-reader-only, multi-node-single-writer,
    /// multi-node-multi-writer, single-node-single-writer or single-node-multi-writer.
    #[arg(long, value_parser = parse_access_mode, default_value = "single-node-writer")]
    pub access_mode: Mode,
}

impl AccessArgs {
    fn access(&self) -> Access {
        Access { block: self.block, fs: self.fs.clone(), mount_flags: self.mount_flags.clone(), mode: self.access_mode }
    }
}

/// `ctl capacity`.
#[derive(clap::Args, Debug)]
pub struct CapacityArgs {
    /// A StorageClass-style parameter (pool=NAME, kind=file); repeat for several.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub params: Vec<(String, String)>,
    /// A topology segment the capacity is asked for (topology.holdfast.dev/node=NODE).
    #[arg(long = "segment", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub segments: Vec<(String, String)>,
}

/// `ctl create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The volume name (idempotency key: creating the same name twice returns the same volume).
    pub name: String,
    /// Requested capacity: 1GiB, 512Mi, or bytes.
    #[arg(long, value_parser = parse_size_arg)]
    pub size: u64,
    /// How the volume will be used.
    #[command(flatten)]
    pub access: AccessArgs,
    /// A StorageClass-style parameter (pool=NAME, kind=file); repeat for several.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub params: Vec<(String, String)>,
    /// Restore this snapshot into the new volume.
    #[arg(long, value_name = "SNAPSHOT_ID", conflicts_with = "from_volume")]
    pub from_snapshot: Option<String>,
    /// Clone this volume into the new volume.
    #[arg(long, value_name = "VOLUME_ID")]
    pub from_volume: Option<String>,
    /// Required topology segment (topology.holdfast.dev/node=NODE); repeat for several keys.
    #[arg(long = "topology", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub topology: Vec<(String, String)>,
    /// A mutable parameter applied at creation (as a VolumeAttributesClass's); repeat for several.
    #[arg(long = "mutable", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub mutable: Vec<(String, String)>,
}

/// `ctl list`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Entries per ListVolumes call (0: the driver decides).
    #[arg(long, default_value_t = 0)]
    pub page_size: i32,
}

/// `ctl snapshot`.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// The volume to snapshot.
    pub source_id: String,
    /// The snapshot name (idempotency key).
    pub name: String,
    /// A VolumeSnapshotClass-style parameter; repeat for several.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub params: Vec<(String, String)>,
}

/// `ctl snapshots`.
#[derive(clap::Args, Debug)]
pub struct SnapshotsArgs {
    /// Only snapshots of this volume.
    #[arg(long, value_name = "VOLUME_ID")]
    pub source: Option<String>,
    /// Entries per ListSnapshots call (0: the driver decides).
    #[arg(long, default_value_t = 0)]
    pub page_size: i32,
}

/// `ctl stage`.
#[derive(clap::Args, Debug)]
pub struct StageArgs {
    /// The volume.
    pub id: String,
    /// Where to mount the volume on this node (must exist).
    #[arg(long)]
    pub staging_path: String,
    /// How the volume is used.
    #[command(flatten)]
    pub access: AccessArgs,
    /// A volume_context entry, as CreateVolume returned it; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub context: Vec<(String, String)>,
}

/// `ctl publish`.
#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    /// The volume.
    pub id: String,
    /// Where the volume was staged.
    #[arg(long)]
    pub staging_path: String,
    /// Where to make it available (the container's mount point, or a file for a block volume).
    #[arg(long)]
    pub target_path: String,
    /// Publish read-only.
    #[arg(long)]
    pub readonly: bool,
    /// How the volume is used.
    #[command(flatten)]
    pub access: AccessArgs,
    /// A volume_context entry, as CreateVolume returned it; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub context: Vec<(String, String)>,
}

/// `ctl unpublish`.
#[derive(clap::Args, Debug)]
pub struct UnpublishArgs {
    /// The volume.
    pub id: String,
    /// The path it was published at.
    #[arg(long)]
    pub target_path: String,
}

/// `ctl unstage`.
#[derive(clap::Args, Debug)]
pub struct UnstageArgs {
    /// The volume.
    pub id: String,
    /// The path it was staged at.
    #[arg(long)]
    pub staging_path: String,
}

/// `ctl stats`.
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// The volume.
    pub id: String,
    /// A path where the volume is published or staged.
    #[arg(long)]
    pub path: String,
    /// The staging path, when known.
    #[arg(long)]
    pub staging_path: Option<String>,
}

/// `ctl expand`.
#[derive(clap::Args, Debug)]
pub struct ExpandArgs {
    /// The volume.
    pub id: String,
    /// The new capacity: 2GiB, or bytes.
    #[arg(long, value_parser = parse_size_arg)]
    pub size: u64,
    /// Where the volume is published or staged on this node: grow its filesystem there too.
    #[arg(long)]
    pub path: Option<String>,
    /// The staging path, when known.
    #[arg(long)]
    pub staging_path: Option<String>,
    /// The volume is a raw block volume.
    #[arg(long)]
    pub block: bool,
}

/// Runs one `ctl` subcommand against the endpoint.
pub async fn run(args: CtlArgs) -> Result<(), String> {
    let clients = Clients::connect(&args.endpoint).await?;
    let out = Out { json: args.json };
    match args.cmd {
        Command::Info => info(clients, out).await,
        Command::Capacity(a) => get_capacity(clients, out, a).await,
        Command::Create(a) => create(clients, out, a).await,
        Command::Delete(a) => delete(clients, out, a).await,
        Command::List(a) => list(clients, out, a).await,
        Command::Get(a) => get(clients, out, a).await,
        Command::Snapshot(a) => snapshot(clients, out, a).await,
        Command::Snapshots(a) => snapshots(clients, out, a).await,
        Command::DeleteSnapshot(a) => delete_snapshot(clients, out, a).await,
        Command::Stage(a) => stage(clients, out, a).await,
        Command::Publish(a) => publish(clients, out, a).await,
        Command::Unpublish(a) => unpublish(clients, out, a).await,
        Command::Unstage(a) => unstage(clients, out, a).await,
        Command::Stats(a) => stats(clients, out, a).await,
        Command::Expand(a) => expand(clients, out, a).await,
        Command::Nodes => list_nodes(&args.endpoint, out).await,
        Command::Modify(a) => modify(clients, out, a).await,
        Command::GroupSnapshot(a) => group::run(clients, out, a).await,
    }
}

/// Where results go: text or JSON lines on stdout.
#[derive(Debug, Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    /// Prints one result.
    fn emit(&self, value: Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            print!("{}", text());
        }
    }
}

async fn list_nodes(endpoint: &str, out: Out) -> Result<(), String> {
    let list = nodes::list(endpoint).await?;
    if list.is_empty() && !out.json {
        print!("{}", nodes::nodes_text(&[]));
    }
    for n in list {
        out.emit(nodes::node_json(&n), || nodes::nodes_text(std::slice::from_ref(&n)));
    }
    Ok(())
}

/// Turns a failed call into the message `main` prints.
fn failed(s: tonic::Status) -> String {
    show::status(&s)
}

async fn info(c: Clients, out: Out) -> Result<(), String> {
    let Clients { mut identity, mut controller, mut node, .. } = c;
    // Only GetPluginInfo is required of every endpoint; the rest are shown as unavailable.
    let plugin = identity.get_plugin_info(GetPluginInfoRequest {}).await.map_err(failed)?.into_inner();
    let info = show::Info {
        plugin,
        ready: identity.probe(ProbeRequest {}).await.map(|r| r.into_inner().ready.unwrap_or(true)).map_err(failed),
        plugin_caps: identity
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .map(|r| show::plugin_capability_names(&r.into_inner().capabilities))
            .map_err(failed),
        controller_caps: controller
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await
            .map(|r| show::controller_capability_names(&r.into_inner().capabilities))
            .map_err(failed),
        node_caps: node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .map(|r| show::node_capability_names(&r.into_inner().capabilities))
            .map_err(failed),
        node: node.node_get_info(NodeGetInfoRequest {}).await.map(|r| r.into_inner()).map_err(failed),
    };
    out.emit(show::info_json(&info), || show::info_text(&info));
    Ok(())
}

fn capacity_request(a: &CapacityArgs) -> Result<GetCapacityRequest, String> {
    Ok(GetCapacityRequest {
        volume_capabilities: Vec::new(),
        parameters: to_map(&a.params, "parameter")?,
        accessible_topology: topology(&a.segments)?,
    })
}

async fn get_capacity(mut c: Clients, out: Out, a: CapacityArgs) -> Result<(), String> {
    let resp = c.controller.get_capacity(capacity_request(&a)?).await.map_err(failed)?.into_inner();
    out.emit(
        json!({
            "available_capacity": resp.available_capacity,
            "maximum_volume_size": resp.maximum_volume_size,
            "minimum_volume_size": resp.minimum_volume_size,
        }),
        || {
            let mut rows = vec![("available", show::bytes(resp.available_capacity))];
            if let Some(max) = resp.maximum_volume_size {
                rows.push(("largest volume", show::bytes(max)));
            }
            if let Some(min) = resp.minimum_volume_size {
                rows.push(("smallest volume", show::bytes(min)));
            }
            show::fields(&rows)
        },
    );
    Ok(())
}

fn create_request(a: &CreateArgs) -> Result<CreateVolumeRequest, String> {
    let source = match (&a.from_snapshot, &a.from_volume) {
        (Some(id), _) => Some(Source::Snapshot(id)),
        (None, Some(id)) => Some(Source::Volume(id)),
        (None, None) => None,
    };
    // The segments are both required and preferred: an operator naming a node means that node.
    let accessibility_requirements = topology(&a.topology)?.map(|t| TopologyRequirement { requisite: vec![t.clone()], preferred: vec![t] });
    let capability = volume_capability(&a.access.access())?;
    Ok(CreateVolumeRequest {
        volume_content_source: source.map(client::content_source),
        accessibility_requirements,
        mutable_parameters: to_map(&a.mutable, "mutable parameter")?,
        ..client::create_volume_request(&a.name, capacity(a.size), capability, to_map(&a.params, "parameter")?)
    })
}

async fn create(mut c: Clients, out: Out, a: CreateArgs) -> Result<(), String> {
    let resp = c.controller.create_volume(create_request(&a)?).await.map_err(failed)?.into_inner();
    let v = resp.volume.ok_or("the driver answered CreateVolume without a volume")?;
    out.emit(show::volume_json(&v, None, None), || show::volume_text(&v, None, None));
    Ok(())
}

async fn delete(mut c: Clients, out: Out, a: IdArg) -> Result<(), String> {
    let req = DeleteVolumeRequest { volume_id: a.id.clone(), ..Default::default() };
    c.controller.delete_volume(req).await.map_err(failed)?;
    out.emit(json!({ "volume_id": a.id, "deleted": true }), || format!("deleted volume {}\n", a.id));
    Ok(())
}

/// Calls a paginated List* until the driver returns no `next_token`. `fetch` gets the token
/// and returns one page and the next token. A token seen twice is an error, not an endless loop.
async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, String>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), String>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    let mut seen = HashSet::new();
    loop {
        let (page, next) = fetch(token).await?;
        items.extend(page);
        if next.is_empty() {
            return Ok(items);
        }
        if !seen.insert(next.clone()) {
            return Err(format!("the driver returned next_token {next:?} twice; stopping instead of listing forever"));
        }
        token = next;
    }
}

async fn list(c: Clients, out: Out, a: ListArgs) -> Result<(), String> {
    let client = c.controller;
    let entries = all_pages(|token| {
        let mut c = client.clone();
        async move {
            let req = ListVolumesRequest { max_entries: a.page_size, starting_token: token };
            let resp = c.list_volumes(req).await.map_err(failed)?.into_inner();
            Ok((resp.entries, resp.next_token))
        }
    })
    .await?;
    if out.json {
        for e in &entries {
            let Some(v) = &e.volume else { continue };
            let status = e.status.as_ref();
            println!(
                "{}",
                show::volume_json(v, status.map(|s| s.published_node_ids.as_slice()), status.and_then(|s| s.volume_condition.as_ref()))
            );
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .filter_map(|e| {
            let v = e.volume.as_ref()?;
            let nodes = e.status.as_ref().map(|s| s.published_node_ids.join(",")).filter(|n| !n.is_empty()).unwrap_or_else(|| "-".into());
            Some(vec![v.volume_id.clone(), show::bytes(v.capacity_bytes), show::topologies(&v.accessible_topology), nodes])
        })
        .collect();
    if rows.is_empty() {
        println!("no volumes");
    } else {
        print!("{}", show::table(&["VOLUME", "CAPACITY", "TOPOLOGY", "PUBLISHED ON"], &rows));
    }
    Ok(())
}

async fn get(mut c: Clients, out: Out, a: IdArg) -> Result<(), String> {
    let resp = c.controller.controller_get_volume(ControllerGetVolumeRequest { volume_id: a.id }).await.map_err(failed)?.into_inner();
    let v = resp.volume.ok_or("the driver answered ControllerGetVolume without a volume")?;
    let status = resp.status.as_ref();
    let nodes = status.map(|s| s.published_node_ids.as_slice());
    let condition = status.and_then(|s| s.volume_condition.as_ref());
    out.emit(show::volume_json(&v, nodes, condition), || show::volume_text(&v, nodes, condition));
    Ok(())
}

fn snapshot_request(a: &SnapshotArgs) -> Result<CreateSnapshotRequest, String> {
    Ok(CreateSnapshotRequest {
        source_volume_id: a.source_id.clone(),
        name: a.name.clone(),
        parameters: to_map(&a.params, "parameter")?,
        ..Default::default()
    })
}

async fn snapshot(mut c: Clients, out: Out, a: SnapshotArgs) -> Result<(), String> {
    let resp = c.controller.create_snapshot(snapshot_request(&a)?).await.map_err(failed)?.into_inner();
    let s = resp.snapshot.ok_or("the driver answered CreateSnapshot without a snapshot")?;
    out.emit(show::snapshot_json(&s), || show::snapshot_text(&s));
    Ok(())
}

async fn snapshots(c: Clients, out: Out, a: SnapshotsArgs) -> Result<(), String> {
    let client = c.controller;
    let source = a.source.unwrap_or_default();
    let entries = all_pages(|token| {
        let mut c = client.clone();
        let req = ListSnapshotsRequest {
            max_entries: a.page_size,
            starting_token: token,
            source_volume_id: source.clone(),
            ..Default::default()
        };
        async move {
            let resp = c.list_snapshots(req).await.map_err(failed)?.into_inner();
            Ok((resp.entries, resp.next_token))
        }
    })
    .await?;
    let snaps: Vec<_> = entries.into_iter().filter_map(|e| e.snapshot).collect();
    if out.json {
        for s in &snaps {
            println!("{}", show::snapshot_json(s));
        }
    } else {
        if snaps.is_empty() {
            println!("no snapshots");
        } else {
            let rows: Vec<_> = snaps.iter().map(show::snapshot_row).collect();
            print!("{}", show::table(&["SNAPSHOT", "SOURCE", "SIZE", "READY", "CREATED"], &rows));
        }
    }
    Ok(())
}

async fn delete_snapshot(mut c: Clients, out: Out, a: IdArg) -> Result<(), String> {
    let req = DeleteSnapshotRequest { snapshot_id: a.id.clone(), ..Default::default() };
    c.controller.delete_snapshot(req).await.map_err(failed)?;
    out.emit(json!({ "snapshot_id": a.id, "deleted": true }), || format!("deleted snapshot {}\n", a.id));
    Ok(())
}

fn stage_request(a: &StageArgs) -> Result<NodeStageVolumeRequest, String> {
    let capability = volume_capability(&a.access.access())?;
    Ok(NodeStageVolumeRequest {
        volume_context: to_map(&a.context, "context key")?,
        ..client::stage_request(&a.id, &a.staging_path, capability)
    })
}

async fn stage(mut c: Clients, out: Out, a: StageArgs) -> Result<(), String> {
    c.node.node_stage_volume(stage_request(&a)?).await.map_err(failed)?;
    out.emit(json!({ "volume_id": a.id, "staging_path": a.staging_path }), || format!("staged {} at {}\n", a.id, a.staging_path));
    Ok(())
}

fn publish_request(a: &PublishArgs) -> Result<NodePublishVolumeRequest, String> {
    let capability = volume_capability(&a.access.access())?;
    Ok(NodePublishVolumeRequest {
        volume_context: to_map(&a.context, "context key")?,
        ..client::publish_request(&a.id, &a.staging_path, &a.target_path, capability, a.readonly)
    })
}

async fn publish(mut c: Clients, out: Out, a: PublishArgs) -> Result<(), String> {
    c.node.node_publish_volume(publish_request(&a)?).await.map_err(failed)?;
    let ro = if a.readonly { " (read-only)" } else { "" };
    out.emit(json!({ "volume_id": a.id, "target_path": a.target_path, "readonly": a.readonly }), || {
        format!("published {} at {}{ro}\n", a.id, a.target_path)
    });
    Ok(())
}

async fn unpublish(mut c: Clients, out: Out, a: UnpublishArgs) -> Result<(), String> {
    let req = client::unpublish_request(&a.id, &a.target_path);
    c.node.node_unpublish_volume(req).await.map_err(failed)?;
    out.emit(json!({ "volume_id": a.id, "unpublished": a.target_path }), || format!("unpublished {} from {}\n", a.id, a.target_path));
    Ok(())
}

async fn unstage(mut c: Clients, out: Out, a: UnstageArgs) -> Result<(), String> {
    let req = client::unstage_request(&a.id, &a.staging_path);
    c.node.node_unstage_volume(req).await.map_err(failed)?;
    out.emit(json!({ "volume_id": a.id, "unstaged": a.staging_path }), || format!("unstaged {} from {}\n", a.id, a.staging_path));
    Ok(())
}

async fn stats(mut c: Clients, out: Out, a: StatsArgs) -> Result<(), String> {
    let req = NodeGetVolumeStatsRequest {
        volume_id: a.id.clone(),
        volume_path: a.path.clone(),
        staging_target_path: a.staging_path.unwrap_or_default(),
    };
    let resp = c.node.node_get_volume_stats(req).await.map_err(failed)?.into_inner();
    let usage: Vec<Value> = resp
        .usage
        .iter()
        .map(|u| json!({ "unit": show::unit_name(u), "total": u.total, "used": u.used, "available": u.available }))
        .collect();
    let mut value = json!({ "volume_id": a.id, "usage": usage });
    if let Some(c) = &resp.volume_condition {
        value["condition"] = show::condition_json(c);
    }
    out.emit(value, || {
        let rows: Vec<_> = resp.usage.iter().map(show::usage_row).collect();
        let mut text = show::table(&["UNIT", "TOTAL", "USED", "AVAILABLE", "USE%"], &rows);
        if let Some(c) = &resp.volume_condition {
            text += &format!("condition: {}\n", show::condition_text(c));
        }
        text
    });
    Ok(())
}

fn expand_capability(a: &ExpandArgs) -> Result<crate::proto::VolumeCapability, String> {
    volume_capability(&Access { block: a.block, ..Access::default() })
}

fn controller_expand_request(a: &ExpandArgs) -> Result<ControllerExpandVolumeRequest, String> {
    Ok(ControllerExpandVolumeRequest {
        volume_id: a.id.clone(),
        capacity_range: Some(capacity(a.size)),
        volume_capability: Some(expand_capability(a)?),
        ..Default::default()
    })
}

/// The NodeExpandVolume to send after the controller answered, if any: only when the
/// controller asks for node expansion and the operator said where the volume is mounted.
fn node_expand_request(a: &ExpandArgs, done: &ControllerExpandVolumeResponse) -> Result<Option<NodeExpandVolumeRequest>, String> {
    let Some(path) = &a.path else { return Ok(None) };
    if !done.node_expansion_required {
        return Ok(None);
    }
    // Ask the node for what the controller actually gave, which may be more than requested.
    let bytes = u64::try_from(done.capacity_bytes).ok().filter(|b| *b > 0).unwrap_or(a.size);
    Ok(Some(NodeExpandVolumeRequest {
        volume_id: a.id.clone(),
        volume_path: path.clone(),
        capacity_range: Some(capacity(bytes)),
        staging_target_path: a.staging_path.clone().unwrap_or_default(),
        volume_capability: Some(expand_capability(a)?),
        ..Default::default()
    }))
}

async fn expand(mut c: Clients, out: Out, a: ExpandArgs) -> Result<(), String> {
    let done = c
        .controller
        .clone()
        .controller_expand_volume(controller_expand_request(&a)?)
        .await
        .map_err(|s| format!("ControllerExpandVolume: {}", failed(s)))?
        .into_inner();
    let mut value = json!({
        "volume_id": a.id,
        "capacity_bytes": done.capacity_bytes,
        "node_expansion_required": done.node_expansion_required,
    });
    let mut text = format!("expanded {} to {}\n", a.id, show::bytes(done.capacity_bytes));
    match node_expand_request(&a, &done)? {
        Some(req) => {
            let grown = c
                .node
                .node_expand_volume(req)
                .await
                .map_err(|s| format!("the volume grew to {} but NodeExpandVolume failed: {}", show::bytes(done.capacity_bytes), failed(s)))?
                .into_inner();
            value["node_capacity_bytes"] = json!(grown.capacity_bytes);
            text += &format!("grew the filesystem at {} to {}\n", a.path.as_deref().unwrap_or_default(), show::bytes(grown.capacity_bytes));
        }
        None if done.node_expansion_required => {
            text += "the filesystem still has to grow: run this again with --path on the node where the volume is mounted\n";
        }
        None => {}
    }
    out.emit(value, || text);
    Ok(())
}

// issue 12: modify
fn modify_request(a: &ModifyArgs) -> Result<ControllerModifyVolumeRequest, String> {
    Ok(ControllerModifyVolumeRequest {
        volume_id: a.id.clone(),
        mutable_parameters: to_map(&a.params, "mutable parameter")?,
        ..Default::default()
    })
}

async fn modify(mut c: Clients, out: Out, a: ModifyArgs) -> Result<(), String> {
    c.controller.controller_modify_volume(modify_request(&a)?).await.map_err(|s| format!("ControllerModifyVolume: {}", failed(s)))?;
    get(c, out, IdArg { id: a.id }).await
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use clap::Parser;

    use super::*;
    use crate::proto::volume_capability::{AccessType, MountVolume};
    use crate::proto::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(line: &str) -> Result<CtlArgs, String> {
        Cli::try_parse_from(std::iter::once("ctl").chain(line.split_whitespace())).map(|c| c.ctl).map_err(|e| e.to_string())
    }

    fn mount(req: &Option<crate::proto::VolumeCapability>) -> MountVolume {
        match req.as_ref().and_then(|c| c.access_type.clone()) {
            Some(AccessType::Mount(m)) => m,
            other => panic!("want a mount capability, got {other:?}"),
        }
    }

    #[test]
    fn global_flags() {
        let a = parse("--endpoint tcp://127.0.0.1:9 list --json").unwrap();
        assert_eq!(a.endpoint, "tcp://127.0.0.1:9");
        assert!(a.json);
        assert!(matches!(a.cmd, Command::List(ListArgs { page_size: 0 })));
    }

    #[test]
    fn create_requests() {
        struct Case {
            name: &'static str,
            line: &'static str,
            check: fn(Result<CreateVolumeRequest, String>),
        }
        let cases = [
            Case {
                name: "defaults",
                line: "create pvc-1 --size 1GiB",
                check: |r| {
                    let r = r.unwrap();
                    assert_eq!(r.name, "pvc-1");
                    assert_eq!(r.capacity_range.unwrap().required_bytes, 1 << 30);
                    assert_eq!(r.volume_capabilities.len(), 1);
                    assert_eq!(r.volume_capabilities[0].access_mode.unwrap().mode, Mode::SingleNodeWriter as i32);
                    assert_eq!(mount(&r.volume_capabilities.first().cloned()).fs_type, "");
                    assert!(r.parameters.is_empty() && r.volume_content_source.is_none() && r.accessibility_requirements.is_none());
                },
            },
            Case {
                name: "everything",
                line: "create v --size 512Mi --fs xfs --mount-flag noatime --param pool=fast --param kind=file \
                       --from-snapshot snap-1 --access-mode multi-node-reader-only --topology topology.holdfast.dev/node=n2",
                check: |r| {
                    let r = r.unwrap();
                    let m = mount(&r.volume_capabilities.first().cloned());
                    assert_eq!((m.fs_type.as_str(), m.mount_flags), ("xfs", vec!["noatime".to_owned()]));
                    assert_eq!(r.volume_capabilities[0].access_mode.unwrap().mode, Mode::MultiNodeReaderOnly as i32);
                    assert_eq!(r.parameters.len(), 2);
                    assert_eq!(r.parameters["pool"], "fast");
                    let src = r.volume_content_source.unwrap().r#type.unwrap();
                    assert_eq!(src, SourceType::Snapshot(SnapshotSource { snapshot_id: "snap-1".into() }));
                    let topo = r.accessibility_requirements.unwrap();
                    assert_eq!(topo.requisite, topo.preferred);
                    assert_eq!(topo.requisite[0].segments["topology.holdfast.dev/node"], "n2");
                },
            },
            Case {
                name: "clone as block",
                line: "create v --size 1G --block --from-volume file:n1:p:a",
                check: |r| {
                    let r = r.unwrap();
                    assert!(matches!(r.volume_capabilities[0].access_type, Some(AccessType::Block(_))));
                    let src = r.volume_content_source.unwrap().r#type.unwrap();
                    assert_eq!(src, SourceType::Volume(VolumeSource { volume_id: "file:n1:p:a".into() }));
                },
            },
            Case {
                name: "duplicate parameter",
                line: "create v --size 1G --param pool=a --param pool=b",
                check: |r| assert_eq!(r.unwrap_err(), "parameter \"pool\" is given more than once"),
            },
        ];
        for c in cases {
            let args = parse(c.line).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            let Command::Create(a) = args.cmd else { panic!("{}: not create", c.name) };
            (c.check)(create_request(&a));
        }
    }

    #[test]
    fn rejected_command_lines() {
        struct Case {
            line: &'static str,
            want: &'static str,
        }
        let cases = [
            Case { line: "create v", want: "--size" },
            Case { line: "create v --size 0", want: "more than zero" },
            Case { line: "create v --size 1G --block --fs ext4", want: "cannot be used with" },
            Case { line: "create v --size 1G --from-snapshot s --from-volume v", want: "cannot be used with" },
            Case { line: "create v --size 1G --access-mode rwx", want: "unknown access mode" },
            Case { line: "create v --size 1G --param pool", want: "KEY=VALUE" },
            Case { line: "stage v", want: "--staging-path" },
            Case { line: "publish v --staging-path /s", want: "--target-path" },
            Case { line: "expand v", want: "--size" },
        ];
        for c in cases {
            let err = parse(c.line).unwrap_err();
            assert!(err.contains(c.want), "{}: {err}", c.line);
        }
    }

    #[test]
    fn node_requests() {
        let Command::Stage(a) = parse("stage v1 --staging-path /s --fs ext4 --mount-flag discard --context k=v").unwrap().cmd else {
            panic!()
        };
        let r = stage_request(&a).unwrap();
        assert_eq!((r.volume_id.as_str(), r.staging_target_path.as_str()), ("v1", "/s"));
        assert_eq!(mount(&r.volume_capability).mount_flags, ["discard"]);
        assert_eq!(r.volume_context["k"], "v");

        let Command::Publish(a) = parse("publish v1 --staging-path /s --target-path /t --block --readonly").unwrap().cmd else { panic!() };
        let r = publish_request(&a).unwrap();
        assert_eq!((r.staging_target_path.as_str(), r.target_path.as_str(), r.readonly), ("/s", "/t", true));
        assert!(matches!(r.volume_capability.unwrap().access_type, Some(AccessType::Block(_))));

        let Command::Capacity(a) = parse("capacity --param pool=p --segment topology.holdfast.dev/node=n1").unwrap().cmd else { panic!() };
        let r = capacity_request(&a).unwrap();
        assert_eq!(r.parameters["pool"], "p");
        assert_eq!(r.accessible_topology.unwrap().segments["topology.holdfast.dev/node"], "n1");

        let Command::Snapshot(a) = parse("snapshot file:n1:p:v nightly").unwrap().cmd else { panic!() };
        let r = snapshot_request(&a).unwrap();
        assert_eq!((r.source_volume_id.as_str(), r.name.as_str()), ("file:n1:p:v", "nightly"));
    }

    #[test]
    fn expansion_steps() {
        struct Case {
            name: &'static str,
            line: &'static str,
            controller: ControllerExpandVolumeResponse,
            want_node_bytes: Option<i64>,
        }
        let resp = |bytes, node| ControllerExpandVolumeResponse { capacity_bytes: bytes, node_expansion_required: node };
        let cases = [
            Case { name: "no path", line: "expand v --size 2GiB", controller: resp(2 << 30, true), want_node_bytes: None },
            Case { name: "not required", line: "expand v --size 2GiB --path /t", controller: resp(2 << 30, false), want_node_bytes: None },
            Case {
                name: "required",
                line: "expand v --size 2GiB --path /t",
                controller: resp(2 << 30, true),
                want_node_bytes: Some(2 << 30),
            },
            Case {
                name: "rounded up by the driver",
                line: "expand v --size 2000000000 --path /t",
                controller: resp(2 << 30, true),
                want_node_bytes: Some(2 << 30),
            },
            Case {
                name: "capacity unknown",
                line: "expand v --size 3GiB --path /t",
                controller: resp(0, true),
                want_node_bytes: Some(3 << 30),
            },
        ];
        for c in cases {
            let Command::Expand(a) = parse(c.line).unwrap().cmd else { panic!() };
            let ctrl = controller_expand_request(&a).unwrap();
            assert_eq!(ctrl.capacity_range.unwrap().required_bytes, a.size as i64, "{}", c.name);
            let node = node_expand_request(&a, &c.controller).unwrap();
            assert_eq!(node.as_ref().map(|n| n.capacity_range.unwrap().required_bytes), c.want_node_bytes, "{}", c.name);
            if let Some(n) = node {
                assert_eq!(n.volume_path, "/t", "{}", c.name);
            }
        }
    }

    /// One scripted page: its items and the next token.
    type Page = (Vec<u32>, &'static str);

    /// Serves scripted pages and records the tokens asked for.
    fn pager(pages: Vec<Page>) -> (Mutex<VecDeque<Page>>, Mutex<Vec<String>>) {
        (Mutex::new(pages.into()), Mutex::new(Vec::new()))
    }

    #[tokio::test]
    async fn pagination() {
        let (pages, asked) = pager(vec![(vec![1, 2], "t1"), (vec![3], "t2"), (vec![], "")]);
        let got = all_pages(|token| {
            asked.lock().unwrap().push(token);
            let page = pages.lock().unwrap().pop_front().unwrap();
            async move { Ok((page.0, page.1.to_owned())) }
        })
        .await;
        assert_eq!(got, Ok(vec![1, 2, 3]));
        assert_eq!(*asked.lock().unwrap(), ["", "t1", "t2"]);

        let (pages, _) = pager(vec![(vec![1], "same"), (vec![2], "same")]);
        let got: Result<Vec<u32>, String> = all_pages(|_| {
            let page = pages.lock().unwrap().pop_front().unwrap();
            async move { Ok((page.0, page.1.to_owned())) }
        })
        .await;
        assert!(got.unwrap_err().contains("twice"));

        let got: Result<Vec<u32>, String> = all_pages(|_| async { Err("ABORTED: stale token".to_owned()) }).await;
        assert_eq!(got.unwrap_err(), "ABORTED: stale token");
    }

    // issue 12: modify
    #[test]
    fn modify_requests() {
        let a = parse("modify file:n1:p:v1:vabc compression=zstd provisioning=thick").unwrap();
        let Command::Modify(m) = a.cmd else { panic!("not modify: {:?}", a.cmd) };
        let r = modify_request(&m).unwrap();
        assert_eq!(r.volume_id, "file:n1:p:v1:vabc");
        assert_eq!(r.mutable_parameters.len(), 2);
        assert_eq!(r.mutable_parameters["compression"], "zstd");
        assert!(parse("modify v1").is_err(), "at least one KEY=VALUE");
        assert!(parse("modify v1 compression").is_err(), "KEY=VALUE");
        let m = match parse("modify v1 a=1 a=2").unwrap().cmd {
            Command::Modify(m) => m,
            _ => unreachable!(),
        };
        assert!(modify_request(&m).is_err(), "a key given twice");
        let c = match parse("create pvc-1 --size 1GiB --mutable provisioning=thin").unwrap().cmd {
            Command::Create(c) => c,
            _ => unreachable!(),
        };
        assert_eq!(create_request(&c).unwrap().mutable_parameters["provisioning"], "thin");
    }
}
