//! issue 12: the GroupController section of the conformance suite (spec "Group Controller
//! Service RPC"). It runs against every pool kind of the suites: where a kind cannot take
//! group snapshots (nfs, thick LVM; a thin LVM pool with mounted ext4/XFS members on Linux
//! before 6.6), it asserts the documented refusal, FAILED_PRECONDITION naming the volume.

use super::*;
use holdfast::proto::group_controller_service_capability::{Type as GroupCapType, rpc::Type as GroupCap};

/// Why this pool refuses groups of unmounted volumes, if it does (docs/design.md).
fn refuses_groups(d: &Driver) -> Option<&'static str> {
    match d.pool.kind.as_str() {
        "nfs" => Some("nfs"),
        "lvm" if snapshots_die_with_their_volume(d) => Some("thick LVM"),
        _ => None,
    }
}

/// Why this pool refuses groups of mounted volumes, if it does.
fn refuses_mounted_groups(d: &Driver) -> Option<&'static str> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release.trim().split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    let nested = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 6);
    match refuses_groups(d) {
        Some(why) => Some(why),
        None if d.pool.kind == "lvm" && d.fs_type != "btrfs" && !nested => Some("thin LVM with a mounted ext4/XFS member before Linux 6.6"),
        None => None,
    }
}

/// The local name (fourth field) of an id, as refusals name volumes.
fn local_of(id: &str) -> &str {
    id.split(':').nth(3).unwrap_or(id)
}

fn group_request(name: &str, volumes: &[&str]) -> CreateVolumeGroupSnapshotRequest {
    CreateVolumeGroupSnapshotRequest {
        name: name.to_owned(),
        source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    }
}

/// Restores `snap` into a new volume, stages and publishes it; answers it and its target.
async fn restore(d: &Driver, snap: &Snapshot, cap: &VolumeCapability, name: &str) -> Mounted {
    let source = Some(VolumeContentSource { r#type: Some(Source::Snapshot(SnapshotSource { snapshot_id: snap.snapshot_id.clone() })) });
    let req = CreateVolumeRequest { volume_content_source: source, ..d.create_request(&unique(name), snap.size_bytes, cap.clone()) };
    let volume = d.create_with(req).await;
    let (staging, target) = (d.staging_dir(name), d.target_path(name));
    d.stage(&volume.volume_id, &staging, cap).await;
    d.publish(&volume.volume_id, &staging, &target, cap, false).await;
    Mounted { volume, cap: cap.clone(), staging, target }
}

#[tokio::test]
async fn group_snapshot_takes_every_member_and_restores_them() {
    let d = Driver::start().await;
    // Served and advertised (spec GetPluginCapabilities, GroupControllerGetCapabilities).
    let caps = ok(d.identity().get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await, "GetPluginCapabilities");
    let group_service = caps
        .capabilities
        .iter()
        .any(|c| matches!(c.r#type, Some(plugin_capability::Type::Service(s)) if s.r#type == PluginService::GroupControllerService as i32));
    assert!(group_service, "GetPluginCapabilities lacks GROUP_CONTROLLER_SERVICE: {caps:?}");
    let gcaps =
        ok(d.group().group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {}).await, "GroupControllerGetCapabilities");
    let rpcs: Vec<i32> = gcaps
        .capabilities
        .iter()
        .filter_map(|c| match c.r#type {
            Some(GroupCapType::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    assert!(rpcs.contains(&(GroupCap::CreateDeleteGetVolumeGroupSnapshot as i32)), "GroupControllerGetCapabilities: {rpcs:?}");

    let a = d.mounted_volume("grp-a", Mode::SingleNodeWriter).await;
    let b = d.mounted_volume("grp-b", Mode::SingleNodeWriter).await;
    write_durably(&a.target.join("data"), b"written to a before the group snapshot\n");
    write_durably(&b.target.join("data"), b"written to b before the group snapshot\n");
    // Unmounted now, so every kind that takes groups at all takes this one.
    for m in [&a, &b] {
        d.unpublish(&m.volume.volume_id, &m.target).await;
        d.unstage(&m.volume.volume_id, &m.staging).await;
    }
    let (a_id, b_id) = (a.volume.volume_id.as_str(), b.volume.volume_id.as_str());
    let name = unique("grp");
    if let Some(why) = refuses_groups(&d) {
        let s =
            expect_code(d.group().create_volume_group_snapshot(group_request(&name, &[a_id, b_id])).await, Code::FailedPrecondition, why);
        assert!(s.message().contains(local_of(a_id)), "the refusal does not name the volume: {}", s.message());
        d.delete(a_id).await;
        d.delete(b_id).await;
        return;
    }
    // Spec: a group of several pools or nodes cannot be one point in time (ARCH12 decision).
    let other_pool = a_id.replacen(&format!(":{}:", d.pool.name), ":elsewhere:", 1);
    let s = expect_code(
        d.group().create_volume_group_snapshot(group_request(&name, &[a_id, &other_pool])).await,
        Code::InvalidArgument,
        "a group spanning two pools",
    );
    assert!(s.message().contains(&other_pool), "the refusal does not name the volume of the other pool: {}", s.message());
    expect_code(d.group().create_volume_group_snapshot(group_request(&name, &[])).await, Code::InvalidArgument, "no source volumes");

    let g = ok(d.group().create_volume_group_snapshot(group_request(&name, &[a_id, b_id])).await, "CreateVolumeGroupSnapshot")
        .group_snapshot
        .expect("CreateVolumeGroupSnapshot answered no group_snapshot");
    d.remember_group(&g.group_snapshot_id);
    assert!(!g.group_snapshot_id.is_empty() && g.ready_to_use && g.creation_time.is_some(), "group: {g:?}");
    let sources: BTreeSet<&str> = g.snapshots.iter().map(|s| s.source_volume_id.as_str()).collect();
    assert_eq!(sources, BTreeSet::from([a_id, b_id]), "one member per source volume");
    for s in &g.snapshots {
        assert_eq!(s.group_snapshot_id, g.group_snapshot_id, "a member does not name its group");
        assert!(s.ready_to_use);
    }
    // Idempotent on the name with the same sources (any order); another set is ALREADY_EXISTS.
    let again = ok(d.group().create_volume_group_snapshot(group_request(&name, &[b_id, a_id])).await, "CreateVolumeGroupSnapshot again")
        .group_snapshot
        .expect("no group_snapshot");
    assert_eq!(again.group_snapshot_id, g.group_snapshot_id, "a repeated create made another group");
    let ids = |g: &VolumeGroupSnapshot| g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect::<BTreeSet<_>>();
    assert_eq!(ids(&again), ids(&g));
    expect_code(
        d.group().create_volume_group_snapshot(group_request(&name, &[a_id])).await,
        Code::AlreadyExists,
        "same name, other volumes",
    );

    // Each member is an ordinary snapshot, which cannot be deleted alone (spec DeleteSnapshot errors).
    let member = &g.snapshots[0];
    let listed = d.list_snapshots(ListSnapshotsRequest { snapshot_id: member.snapshot_id.clone(), ..Default::default() }).await;
    assert_eq!(listed.len(), 1, "ListSnapshots by a member's id: {listed:?}");
    assert_eq!(listed[0].group_snapshot_id, g.group_snapshot_id);
    let alone = DeleteSnapshotRequest { snapshot_id: member.snapshot_id.clone(), ..Default::default() };
    expect_code(d.controller().delete_snapshot(alone).await, Code::InvalidArgument, "DeleteSnapshot of a group member");

    // Both restored, both hold what was written before.
    for (i, s) in g.snapshots.iter().enumerate() {
        let r = restore(&d, s, &a.cap, &format!("grp-restore-{i}")).await;
        let want: &[u8] = if s.source_volume_id == a_id {
            b"written to a before the group snapshot\n"
        } else {
            b"written to b before the group snapshot\n"
        };
        assert_eq!(std::fs::read(r.target.join("data")).expect("read the restored file"), want);
        d.tear_down(&r).await;
    }

    // Kept in the pool itself: a restarted driver still knows the group.
    let mut d = d;
    d.kill();
    d.restart().await;
    let get = GetVolumeGroupSnapshotRequest { group_snapshot_id: g.group_snapshot_id.clone(), ..Default::default() };
    let got = ok(d.group().get_volume_group_snapshot(get.clone()).await, "GetVolumeGroupSnapshot after a restart")
        .group_snapshot
        .expect("no group");
    assert_eq!(ids(&got), ids(&g), "the group's members after a restart");

    // Deleting the group deletes its members; again is OK; then it is gone.
    d.delete_group(&g.group_snapshot_id).await;
    d.delete_group(&g.group_snapshot_id).await;
    expect_code(d.group().get_volume_group_snapshot(get).await, Code::NotFound, "GetVolumeGroupSnapshot of a deleted group");
    let left = d.list_snapshots(ListSnapshotsRequest { source_volume_id: a_id.to_owned(), ..Default::default() }).await;
    assert!(left.is_empty(), "members left after DeleteVolumeGroupSnapshot: {left:?}");
    d.delete(a_id).await;
    d.delete(b_id).await;
}

/// The records `0..n` a log holds, checked to be exactly that sequence.
fn records(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut n = 0;
    for line in text.lines() {
        assert_eq!(line, n.to_string(), "{} is not a sequence of records 0, 1, …: {text:?}", path.display());
        n += 1;
    }
    n
}

#[tokio::test]
async fn group_snapshot_of_racing_ordered_writes_holds_a_consistent_prefix() {
    let d = Driver::start().await;
    let a = d.mounted_volume("race-a", Mode::SingleNodeWriter).await;
    let b = d.mounted_volume("race-b", Mode::SingleNodeWriter).await;
    // Record i to A, then record i to B, each fsync'd: B never holds a record A lacks.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (pa, pb, halt) = (a.target.join("log"), b.target.join("log"), stop.clone());
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let open = |p: &Path| std::fs::OpenOptions::new().create(true).append(true).open(p).expect("open a log");
        let (mut fa, mut fb) = (open(&pa), open(&pb));
        let mut i = 0u64;
        while !halt.load(std::sync::atomic::Ordering::Relaxed) {
            for f in [&mut fa, &mut fb] {
                f.write_all(format!("{i}\n").as_bytes()).expect("write a record");
                f.sync_all().expect("fsync a record");
            }
            i += 1;
        }
        i
    });
    while records(&b.target.join("log")) < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a_id, b_id) = (a.volume.volume_id.clone(), b.volume.volume_id.clone());
    let taken = d.group().create_volume_group_snapshot(group_request(&unique("race"), &[&a_id, &b_id])).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("the writer");
    if let Some(why) = refuses_mounted_groups(&d) {
        let s = expect_code(taken, Code::FailedPrecondition, why);
        assert!(
            s.message().contains(local_of(&a_id)) || s.message().contains(local_of(&b_id)),
            "the refusal names no volume: {}",
            s.message()
        );
    } else {
        let g = ok(taken, "CreateVolumeGroupSnapshot while writes race it").group_snapshot.expect("no group");
        d.remember_group(&g.group_snapshot_id);
        let mut counts = HashMap::new();
        for (i, s) in g.snapshots.iter().enumerate() {
            let r = restore(&d, s, &a.cap, &format!("race-restore-{i}")).await;
            counts.insert(s.source_volume_id.clone(), records(&r.target.join("log")));
            d.tear_down(&r).await;
        }
        let (na, nb) = (counts[&a_id], counts[&b_id]);
        assert!(
            nb >= 3 && nb <= na && na <= nb + 1,
            "restored A holds records 0..{na}, B 0..{nb} (of {written} written): not one point in time"
        );
        d.delete_group(&g.group_snapshot_id).await;
    }
    d.tear_down(&a).await;
    d.tear_down(&b).await;
}
