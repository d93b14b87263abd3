//! The conformance suite's modify section (issue 12): ControllerModifyVolume and CreateVolume's
//! `mutable_parameters`, read back from the pool's own tool (`stat` of the file pool's image
//! blocks, `zfs get`, `stat` of the nfs directory); on lvm, which takes no mutable parameters,
//! the documented refusal. One test per run keeps the VM stages short.

use std::os::unix::fs::MetadataExt;

use super::*;

/// The first `[[pool]]` of the config under test, as TOML.
fn pool_table(d: &Driver) -> toml::Table {
    let text = std::fs::read_to_string(&d.pool.config).expect("read the config under test");
    let table: toml::Table = text.parse().expect("parse the config under test");
    table["pool"].as_array().and_then(|a| a.first()).and_then(|p| p.as_table()).cloned().expect("a [[pool]]")
}

/// The local name in a volume id (`<kind>:<node>:<pool>:<local>:v<uid>`).
fn local_of(id: &str) -> String {
    id.split(':').nth(3).expect("a volume id names its local name").to_owned()
}

/// What the pool's tool says about one mutable parameter of a volume now.
fn tool_value(d: &Driver, v: &Volume, name: &str, key: &str) -> String {
    let pool = pool_table(d);
    let get = |k: &str| pool.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
    match d.pool.kind.as_str() {
        "file" => {
            let img = Path::new(&get("path")).join("volumes").join(format!("{}.img", local_of(&v.volume_id)));
            let m = std::fs::metadata(&img).unwrap_or_else(|e| panic!("stat {}: {e}", img.display()));
            assert!(key == "provisioning", "the file pool has no {key}");
            // Every byte of the image allocated: thick; fewer: thin.
            if m.blocks() * 512 >= m.len() { "thick".into() } else { "thin".into() }
        }
        "zfs" => {
            let dataset = format!("{}/{}", get("dataset"), local_of(&v.volume_id));
            let prop = if key == "provisioning" { "refreservation" } else { key };
            let out = std::process::Command::new("zfs").args(["get", "-Hp", "-o", "value", prop, &dataset]).output().expect("run zfs get");
            assert!(out.status.success(), "zfs get {prop} {dataset}: {}", String::from_utf8_lossy(&out.stderr));
            let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            match (key, value.as_str()) {
                ("provisioning", "0" | "none") => "thin".into(),
                ("provisioning", _) => "thick".into(),
                _ => value,
            }
        }
        "nfs" => {
            let export = get("export");
            let dir = Path::new(export.rsplit_once(':').map_or(export.as_str(), |(_, p)| p)).join(name);
            let m = std::fs::metadata(&dir).unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()));
            match key {
                "mode" => format!("{:04o}", m.permissions().mode() & 0o7777),
                "uid" => m.uid().to_string(),
                "gid" => m.gid().to_string(),
                _ => panic!("the nfs pool has no {key}"),
            }
        }
        other => panic!("no tool read-back for kind {other}"),
    }
}

/// The volume's `holdfast.dev/<key>` as ControllerGetVolume shows it (and ListVolumes, checked
/// to agree, when `listed`: a listing costs a pool-wide look-up, so it is asked once).
async fn shown(d: &Driver, id: &str, key: &str, listed: bool) -> Option<String> {
    let got =
        ok(d.controller().controller_get_volume(ControllerGetVolumeRequest { volume_id: id.to_owned() }).await, "ControllerGetVolume");
    let ctx_key = format!("holdfast.dev/{key}");
    let here = got.volume.expect("a volume").volume_context.get(&ctx_key).cloned();
    if !listed {
        return here;
    }
    let mut listed = None;
    let mut token = String::new();
    loop {
        let page = ok(d.controller().list_volumes(ListVolumesRequest { max_entries: 0, starting_token: token }).await, "ListVolumes");
        for e in page.entries {
            if let Some(v) = e.volume.filter(|v| v.volume_id == id) {
                listed = v.volume_context.get(&ctx_key).cloned();
            }
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(here, listed, "ControllerGetVolume and ListVolumes show {ctx_key} differently");
    here
}

fn modify_request(id: &str, pairs: &[(&str, &str)]) -> ControllerModifyVolumeRequest {
    ControllerModifyVolumeRequest {
        volume_id: id.to_owned(),
        mutable_parameters: pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn modify_volume_changes_what_the_pools_tool_shows_and_survives_a_restart() {
    let mut d = Driver::start().await;
    d.require_controller(&[CtrlCap::ModifyVolume]).await;
    let cap = d.mount_cap(Mode::SingleNodeWriter);
    let zvol = d.pool.kind == "zfs" && d.fs_type != "zfs";
    // Per kind: (key, value at creation, value after the modify), a second key changed in the
    // same call, a key the kind refuses, and a bad value of a key it takes.
    let (key, first, then, second, refused, bad) = match d.pool.kind.as_str() {
        "file" => ("provisioning", "thin", "thick", None, "compression", ("provisioning", "fat")),
        "zfs" if zvol => ("compression", "lz4", "zstd", Some(("provisioning", "thin", "thick")), "recordsize", ("sync", "never")),
        "zfs" => ("compression", "lz4", "zstd", Some(("atime", "on", "off")), "volblocksize", ("recordsize", "100K")),
        "nfs" => ("mode", "0750", "2770", Some(("uid", "0", "1234")), "provisioning", ("mode", "9999")),
        _ => {
            // lvm: no mutable parameters (docs/operations.md); provisioning is fixed by the pool.
            let v = d.create(&unique("modify"), d.fs_volume_size(), cap.clone()).await;
            for k in ["provisioning", "readahead"] {
                let s = expect_code(
                    d.controller().controller_modify_volume(modify_request(&v.volume_id, &[(k, "thick")])).await,
                    Code::InvalidArgument,
                    k,
                );
                assert!(s.message().contains(k), "the refusal does not name {k}: {}", s.message());
            }
            let mut req = d.create_request(&unique("modify"), d.fs_volume_size(), cap.clone());
            req.mutable_parameters.insert("provisioning".into(), "thin".into());
            let s = expect_code(d.controller().create_volume(req).await, Code::InvalidArgument, "mutable_parameters at CreateVolume");
            assert!(s.message().contains("provisioning"), "{}", s.message());
            d.delete(&v.volume_id).await;
            return;
        }
    };
    let name = unique("modify");
    let mut req = d.create_request(&name, d.fs_volume_size(), cap.clone());
    req.mutable_parameters.insert(key.into(), first.into());
    if let Some((k, v, _)) = second {
        req.mutable_parameters.insert(k.into(), v.into());
    }
    let v = d.create_with(req.clone()).await;
    let id = v.volume_id.clone();
    assert_eq!(v.volume_context.get(&format!("holdfast.dev/{key}")).map(String::as_str), Some(first), "context: {:?}", v.volume_context);
    assert_eq!(tool_value(&d, &v, &name, key), first, "{key} at creation");
    // The same name with other mutable parameters is another request.
    let mut other = req.clone();
    other.mutable_parameters.insert(key.into(), then.into());
    let s = expect_code(d.controller().create_volume(other).await, Code::AlreadyExists, "a create retry with another mutable value");
    assert!(s.message().contains(key), "{}", s.message());
    assert_eq!(d.create_with(req).await.volume_id, id, "the same request found another volume");

    // Refused keys and values change nothing, though a valid key comes with them.
    for (what, pairs) in [("a key the pool refuses", [(key, then), (refused, "on")]), ("a bad value", [(key, then), bad])] {
        let s = expect_code(d.controller().controller_modify_volume(modify_request(&id, &pairs)).await, Code::InvalidArgument, what);
        assert!(s.message().contains(pairs[1].0), "{what}: the refusal does not name {}: {}", pairs[1].0, s.message());
        assert_eq!(tool_value(&d, &v, &name, key), first, "{what} changed {key}");
        assert_eq!(shown(&d, &id, key, false).await.as_deref(), Some(first), "{what}: the record changed");
    }
    let gone = format!("{}:v000000000000", id.rsplit_once(':').unwrap().0);
    expect_code(d.controller().controller_modify_volume(modify_request(&gone, &[(key, then)])).await, Code::NotFound, "an unknown id");
    expect_code(d.controller().controller_modify_volume(modify_request(&id, &[])).await, Code::InvalidArgument, "no parameters");

    let mut pairs = vec![(key, then)];
    if let Some((k, _, after)) = second {
        pairs.push((k, after));
    }
    ok(d.controller().controller_modify_volume(modify_request(&id, &pairs)).await, "ControllerModifyVolume");
    ok(d.controller().controller_modify_volume(modify_request(&id, &pairs)).await, "ControllerModifyVolume again (idempotent)");
    for (k, want) in &pairs {
        assert_eq!(tool_value(&d, &v, &name, k), *want, "{k} after the modify");
        assert_eq!(shown(&d, &id, k, *k == key).await.as_deref(), Some(*want), "{k} as the driver shows it");
    }
    if d.pool.kind == "file" {
        // Thick: the image's holes were allocated, so the room they promised is no longer promised twice.
        let m = std::fs::metadata(
            Path::new(&pool_table(&d)["path"].as_str().unwrap().to_owned()).join("volumes").join(format!("{}.img", local_of(&id))),
        )
        .unwrap();
        assert!(m.blocks() * 512 >= m.len(), "a thick image has every block allocated");
    }

    // The values live in the pool's own records: a restarted driver shows them.
    d.kill();
    d.restart().await;
    for (k, want) in &pairs {
        assert_eq!(shown(&d, &id, k, false).await.as_deref(), Some(*want), "{k} after a restart");
    }
    d.delete(&id).await;
}
