//! `holdfast ctl group-snapshot create|delete|get` (issue 12): the GroupController calls,
//! in the style of the other subcommands (request built by a pure function, tested below).

use serde_json::{Value, json};

use super::request::{parse_key_value, to_map};
use super::{Out, failed, show};
use crate::client::Clients;
use crate::proto::{
    CreateVolumeGroupSnapshotRequest, DeleteVolumeGroupSnapshotRequest, GetVolumeGroupSnapshotRequest, VolumeGroupSnapshot,
};

/// `ctl group-snapshot`.
#[derive(clap::Args, Debug)]
pub struct GroupArgs {
    /// What to do with group snapshots.
    #[command(subcommand)]
    pub cmd: GroupCommand,
}

/// The group snapshot subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum GroupCommand {
    /// CreateVolumeGroupSnapshot: one snapshot of each volume, all at one point in time.
    Create(CreateGroupArgs),
    /// DeleteVolumeGroupSnapshot: the group and every member.
    Delete(GroupIdArgs),
    /// GetVolumeGroupSnapshot: the group and its members.
    Get(GroupIdArgs),
}

/// `ctl group-snapshot create`.
#[derive(clap::Args, Debug)]
pub struct CreateGroupArgs {
    /// The group snapshot name (idempotency key).
    pub name: String,
    /// The volumes to snapshot together (all in one pool of one node).
    #[arg(required = true)]
    pub volume_ids: Vec<String>,
    /// A VolumeGroupSnapshotClass-style parameter; repeat for several.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub params: Vec<(String, String)>,
}

/// `ctl group-snapshot delete|get`.
#[derive(clap::Args, Debug)]
pub struct GroupIdArgs {
    /// The group snapshot id.
    pub id: String,
    /// A member snapshot id the caller expects (checked by the driver); repeat for several.
    #[arg(long = "snapshot", value_name = "SNAPSHOT_ID")]
    pub snapshot_ids: Vec<String>,
}

fn create_request(a: &CreateGroupArgs) -> Result<CreateVolumeGroupSnapshotRequest, String> {
    Ok(CreateVolumeGroupSnapshotRequest {
        name: a.name.clone(),
        source_volume_ids: a.volume_ids.clone(),
        parameters: to_map(&a.params, "parameter")?,
        ..Default::default()
    })
}

/// A group snapshot as JSON: its id, time, readiness and members.
fn group_json(g: &VolumeGroupSnapshot) -> Value {
    json!({
        "group_snapshot_id": g.group_snapshot_id,
        "creation_time": g.creation_time.as_ref().map(show::timestamp),
        "ready_to_use": g.ready_to_use,
        "snapshots": g.snapshots.iter().map(show::snapshot_json).collect::<Vec<_>>(),
    })
}

/// A group snapshot for people: its fields, then a table of its members.
fn group_text(g: &VolumeGroupSnapshot) -> String {
    let head = show::fields(&[
        ("group snapshot", g.group_snapshot_id.clone()),
        ("created", g.creation_time.as_ref().map(show::timestamp).unwrap_or_else(|| "-".into())),
        ("ready", show::yes_no(g.ready_to_use).into()),
        ("members", g.snapshots.len().to_string()),
    ]);
    let rows: Vec<_> = g.snapshots.iter().map(show::snapshot_row).collect();
    format!("{head}{}", show::table(&["SNAPSHOT", "SOURCE", "SIZE", "READY", "CREATED"], &rows))
}

/// Runs one `ctl group-snapshot` subcommand.
pub(super) async fn run(mut c: Clients, out: Out, a: GroupArgs) -> Result<(), String> {
    match a.cmd {
        GroupCommand::Create(a) => {
            let resp = c.group.create_volume_group_snapshot(create_request(&a)?).await.map_err(failed)?.into_inner();
            let g = resp.group_snapshot.ok_or("the driver answered CreateVolumeGroupSnapshot without a group snapshot")?;
            out.emit(group_json(&g), || group_text(&g));
        }
        GroupCommand::Delete(a) => {
            let req =
                DeleteVolumeGroupSnapshotRequest { group_snapshot_id: a.id.clone(), snapshot_ids: a.snapshot_ids, ..Default::default() };
            c.group.delete_volume_group_snapshot(req).await.map_err(failed)?;
            out.emit(json!({ "group_snapshot_id": a.id, "deleted": true }), || format!("deleted group snapshot {}\n", a.id));
        }
        GroupCommand::Get(a) => {
            let req = GetVolumeGroupSnapshotRequest { group_snapshot_id: a.id, snapshot_ids: a.snapshot_ids, ..Default::default() };
            let resp = c.group.get_volume_group_snapshot(req).await.map_err(failed)?.into_inner();
            let g = resp.group_snapshot.ok_or("the driver answered GetVolumeGroupSnapshot without a group snapshot")?;
            out.emit(group_json(&g), || group_text(&g));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::proto::Snapshot;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: GroupCommand,
    }

    fn parse(line: &str) -> Result<GroupCommand, String> {
        Cli::try_parse_from(std::iter::once("group-snapshot").chain(line.split_whitespace())).map(|c| c.cmd).map_err(|e| e.to_string())
    }

    #[test]
    fn create_names_the_group_and_every_volume() {
        let GroupCommand::Create(a) = parse("create db file:n1:p:a:v0123456789ab file:n1:p:b:v0123456789ac --param k=v").unwrap() else {
            panic!("not a create")
        };
        let req = create_request(&a).unwrap();
        assert_eq!(req.name, "db");
        assert_eq!(req.source_volume_ids, ["file:n1:p:a:v0123456789ab", "file:n1:p:b:v0123456789ac"]);
        assert_eq!(req.parameters.get("k").map(String::as_str), Some("v"));
        assert!(parse("create db").is_err(), "a group of no volume is refused before any call");
        let GroupCommand::Delete(d) = parse("delete file:n1:p:g:g0123456789ab --snapshot s1 --snapshot s2").unwrap() else {
            panic!("not a delete")
        };
        assert_eq!(d.snapshot_ids, ["s1", "s2"]);
    }

    #[test]
    fn a_group_shows_its_members() {
        let member = Snapshot {
            snapshot_id: "file:n1:p:m:s0123456789ab".into(),
            source_volume_id: "file:n1:p:a:v0123456789ab".into(),
            group_snapshot_id: "file:n1:p:g:g0123456789ab".into(),
            size_bytes: 1 << 20,
            ready_to_use: true,
            ..Default::default()
        };
        let g = VolumeGroupSnapshot {
            group_snapshot_id: "file:n1:p:g:g0123456789ab".into(),
            snapshots: vec![member],
            ready_to_use: true,
            ..Default::default()
        };
        let j = group_json(&g);
        assert_eq!(j["snapshots"][0]["group_snapshot_id"], "file:n1:p:g:g0123456789ab");
        assert_eq!(j["snapshots"][0]["source_volume_id"], "file:n1:p:a:v0123456789ab");
        let t = group_text(&g);
        assert!(t.contains("file:n1:p:g:g0123456789ab") && t.contains("file:n1:p:m:s0123456789ab"), "{t}");
    }
}
