//! How `holdfast ctl` shows results: aligned text for people, one JSON object per result for
//! scripts, and gRPC errors as `CODE: message`. Pure functions returning strings and values.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::config::format_size;
use crate::proto::{
    ControllerServiceCapability, GetPluginInfoResponse, NodeGetInfoResponse, NodeServiceCapability, PluginCapability, Snapshot, Topology,
    Volume, VolumeCondition, VolumeContentSource, VolumeUsage, volume_content_source, volume_usage,
};

/// The canonical gRPC name of a status code (`NOT_FOUND`), as the CSI spec and `grpcurl` write it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A failed call as the operator sees it: `NOT_FOUND: volume … does not exist`.
pub fn status(s: &tonic::Status) -> String {
    let msg = s.message().trim();
    if msg.is_empty() { code_name(s.code()).to_owned() } else { format!("{}: {msg}", code_name(s.code())) }
}

/// A CSI map with its keys sorted (protobuf maps have no order), for stable output.
pub fn sorted(map: &HashMap<String, String>) -> BTreeMap<&str, &str> {
    map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// `k=v,k2=v2` with sorted keys; `-` when empty.
pub fn pairs(map: &HashMap<String, String>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    sorted(map).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Several topologies, `;`-separated (a shared volume may be reachable from several).
pub fn topologies(ts: &[Topology]) -> String {
    if ts.is_empty() {
        return "-".into();
    }
    ts.iter().map(|t| pairs(&t.segments)).collect::<Vec<_>>().join("; ")
}

/// A byte count from CSI (`int64`, 0 meaning unknown) for people.
pub fn bytes(n: i64) -> String {
    if n <= 0 { "unknown".into() } else { format_size(n as u64) }
}

/// A protobuf timestamp as RFC 3339 UTC (`2024-05-01T12:00:00Z`), computed without a date crate.
pub fn timestamp(ts: &prost_types::Timestamp) -> String {
    let days = ts.seconds.div_euclid(86_400);
    let secs = ts.seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Left-aligned `key  value` lines.
pub fn fields(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:width$}  {v}\n")).collect()
}

/// A table with a header row; columns are as wide as their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:w$}")).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Where a volume's content came from, or `None` for an empty volume.
pub fn source(src: &Option<VolumeContentSource>) -> Option<(&'static str, &str)> {
    match src.as_ref()?.r#type.as_ref()? {
        volume_content_source::Type::Snapshot(s) => Some(("snapshot", &s.snapshot_id)),
        volume_content_source::Type::Volume(v) => Some(("volume", &v.volume_id)),
    }
}

/// A volume as JSON; `published_on` and `condition` come from ListVolumes/ControllerGetVolume status.
pub fn volume_json(v: &Volume, published_on: Option<&[String]>, condition: Option<&VolumeCondition>) -> Value {
    let mut o = json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": sorted(&v.volume_context),
        "accessible_topology": v.accessible_topology.iter().map(|t| sorted(&t.segments)).collect::<Vec<_>>(),
    });
    if let Some((kind, id)) = source(&v.content_source) {
        o["content_source"] = json!({ kind: id });
    }
    if let Some(nodes) = published_on {
        o["published_node_ids"] = json!(nodes);
    }
    if let Some(c) = condition {
        o["condition"] = condition_json(c);
    }
    o
}

/// A volume for people, one field a line.
pub fn volume_text(v: &Volume, published_on: Option<&[String]>, condition: Option<&VolumeCondition>) -> String {
    let mut rows =
        vec![("volume", v.volume_id.clone()), ("capacity", bytes(v.capacity_bytes)), ("topology", topologies(&v.accessible_topology))];
    if let Some((kind, id)) = source(&v.content_source) {
        rows.push(("source", format!("{kind} {id}")));
    }
    if !v.volume_context.is_empty() {
        rows.push(("context", pairs(&v.volume_context)));
    }
    if let Some(nodes) = published_on {
        rows.push(("published on", if nodes.is_empty() { "-".into() } else { nodes.join(",") }));
    }
    if let Some(c) = condition {
        rows.push(("condition", condition_text(c)));
    }
    fields(&rows)
}

/// A volume condition as JSON.
pub fn condition_json(c: &VolumeCondition) -> Value {
    json!({ "abnormal": c.abnormal, "message": c.message })
}

/// A volume condition for people: `ok` or `ABNORMAL: message`.
pub fn condition_text(c: &VolumeCondition) -> String {
    match (c.abnormal, c.message.is_empty()) {
        (false, true) => "ok".into(),
        (false, false) => format!("ok ({})", c.message),
        (true, _) => format!("ABNORMAL: {}", c.message),
    }
}

/// A snapshot as JSON.
pub fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": s.creation_time.as_ref().map(timestamp),
        "ready_to_use": s.ready_to_use,
        // issue 12: the group snapshot it is a member of ("" when none).
        "group_snapshot_id": s.group_snapshot_id,
    })
}

/// A snapshot for people, one field a line.
pub fn snapshot_text(s: &Snapshot) -> String {
    fields(&[
        ("snapshot", s.snapshot_id.clone()),
        ("source", s.source_volume_id.clone()),
        ("size", bytes(s.size_bytes)),
        ("created", s.creation_time.as_ref().map(timestamp).unwrap_or_else(|| "-".into())),
        ("ready", yes_no(s.ready_to_use).into()),
    ])
}

/// One row of the `snapshots` table.
pub fn snapshot_row(s: &Snapshot) -> Vec<String> {
    vec![
        s.snapshot_id.clone(),
        s.source_volume_id.clone(),
        bytes(s.size_bytes),
        yes_no(s.ready_to_use).into(),
        s.creation_time.as_ref().map(timestamp).unwrap_or_else(|| "-".into()),
    ]
}

/// `yes` / `no`.
pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The name of a usage unit (`bytes`, `inodes`).
pub fn unit_name(u: &VolumeUsage) -> String {
    volume_usage::Unit::try_from(u.unit).map(|u| u.as_str_name().to_ascii_lowercase()).unwrap_or_else(|_| format!("unit {}", u.unit))
}

/// One row of the `stats` table: unit, total, used, available, use%.
pub fn usage_row(u: &VolumeUsage) -> Vec<String> {
    let is_bytes = u.unit == volume_usage::Unit::Bytes as i32;
    let n = |v: i64| if is_bytes { bytes(v) } else { v.to_string() };
    let pct = if u.total > 0 { format!("{:.0}%", u.used as f64 * 100.0 / u.total as f64) } else { "-".into() };
    vec![unit_name(u), n(u.total), n(u.used), n(u.available), pct]
}

/// What `ctl info` gathered. Each part is fetched separately: a controller-only or node-only
/// endpoint answers UNIMPLEMENTED for the other service, which is shown, not fatal.
#[derive(Debug)]
pub struct Info {
    /// GetPluginInfo.
    pub plugin: GetPluginInfoResponse,
    /// Probe: `ready` (absent means ready, per the spec).
    pub ready: Result<bool, String>,
    /// GetPluginCapabilities, as names.
    pub plugin_caps: Result<Vec<String>, String>,
    /// ControllerGetCapabilities, as names.
    pub controller_caps: Result<Vec<String>, String>,
    /// NodeGetCapabilities, as names.
    pub node_caps: Result<Vec<String>, String>,
    /// NodeGetInfo.
    pub node: Result<NodeGetInfoResponse, String>,
}

/// Plugin capabilities as names: `CONTROLLER_SERVICE`, `VOLUME_EXPANSION_ONLINE`.
pub fn plugin_capability_names(caps: &[PluginCapability]) -> Vec<String> {
    use crate::proto::plugin_capability::{Type, service, volume_expansion};
    caps.iter()
        .map(|c| match &c.r#type {
            Some(Type::Service(s)) => {
                service::Type::try_from(s.r#type).map(|t| t.as_str_name().to_owned()).unwrap_or_else(|_| format!("SERVICE_{}", s.r#type))
            }
            Some(Type::VolumeExpansion(e)) => format!(
                "VOLUME_EXPANSION_{}",
                volume_expansion::Type::try_from(e.r#type).map(|t| t.as_str_name().to_owned()).unwrap_or_else(|_| e.r#type.to_string())
            ),
            None => "UNKNOWN".into(),
        })
        .collect()
}

/// Controller capabilities as names: `CREATE_DELETE_VOLUME`, …
pub fn controller_capability_names(caps: &[ControllerServiceCapability]) -> Vec<String> {
    use crate::proto::controller_service_capability::{Type, rpc};
    caps.iter()
        .map(|c| match &c.r#type {
            Some(Type::Rpc(r)) => {
                rpc::Type::try_from(r.r#type).map(|t| t.as_str_name().to_owned()).unwrap_or_else(|_| format!("RPC_{}", r.r#type))
            }
            None => "UNKNOWN".into(),
        })
        .collect()
}

/// Node capabilities as names: `STAGE_UNSTAGE_VOLUME`, …
pub fn node_capability_names(caps: &[NodeServiceCapability]) -> Vec<String> {
    use crate::proto::node_service_capability::{Type, rpc};
    caps.iter()
        .map(|c| match &c.r#type {
            Some(Type::Rpc(r)) => {
                rpc::Type::try_from(r.r#type).map(|t| t.as_str_name().to_owned()).unwrap_or_else(|_| format!("RPC_{}", r.r#type))
            }
            None => "UNKNOWN".into(),
        })
        .collect()
}

fn result_json<T>(r: &Result<T, String>, f: impl FnOnce(&T) -> Value) -> Value {
    match r {
        Ok(v) => f(v),
        Err(e) => json!({ "error": e }),
    }
}

fn result_text<T>(r: &Result<T, String>, f: impl FnOnce(&T) -> String) -> String {
    match r {
        Ok(v) => f(v),
        Err(e) => format!("not available ({e})"),
    }
}

fn max_volumes(n: i64) -> String {
    if n <= 0 { "unlimited".into() } else { n.to_string() }
}

/// `ctl info` as JSON.
pub fn info_json(i: &Info) -> Value {
    json!({
        "name": i.plugin.name,
        "vendor_version": i.plugin.vendor_version,
        "manifest": sorted(&i.plugin.manifest),
        "ready": result_json(&i.ready, |r| json!(r)),
        "plugin_capabilities": result_json(&i.plugin_caps, |c| json!(c)),
        "controller_capabilities": result_json(&i.controller_caps, |c| json!(c)),
        "node_capabilities": result_json(&i.node_caps, |c| json!(c)),
        "node": result_json(&i.node, |n| json!({
            "node_id": n.node_id,
            "max_volumes_per_node": n.max_volumes_per_node,
            "accessible_topology": n.accessible_topology.as_ref().map(|t| sorted(&t.segments)),
        })),
    })
}

/// `ctl info` for people.
pub fn info_text(i: &Info) -> String {
    let list = |c: &Vec<String>| if c.is_empty() { "none".to_owned() } else { c.join(", ") };
    let mut rows = vec![
        ("plugin", format!("{} {}", i.plugin.name, i.plugin.vendor_version)),
        ("ready", result_text(&i.ready, |r| yes_no(*r).into())),
        ("plugin capabilities", result_text(&i.plugin_caps, list)),
        ("controller capabilities", result_text(&i.controller_caps, list)),
        ("node capabilities", result_text(&i.node_caps, list)),
    ];
    match &i.node {
        Ok(n) => {
            rows.push(("node id", n.node_id.clone()));
            rows.push(("max volumes", max_volumes(n.max_volumes_per_node)));
            rows.push(("node topology", n.accessible_topology.as_ref().map(|t| pairs(&t.segments)).unwrap_or_else(|| "-".into())));
        }
        Err(e) => rows.push(("node", format!("not available ({e})"))),
    }
    fields(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::volume_content_source::{SnapshotSource, Type};

    #[test]
    fn status_text() {
        let s = tonic::Status::not_found("volume file:n1:p:x does not exist");
        assert_eq!(status(&s), "NOT_FOUND: volume file:n1:p:x does not exist");
        assert_eq!(status(&tonic::Status::unimplemented("")), "UNIMPLEMENTED");
        assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
    }

    #[test]
    fn timestamps() {
        struct Case {
            seconds: i64,
            want: &'static str,
        }
        let cases = [
            Case { seconds: 0, want: "1970-01-01T00:00:00Z" },
            Case { seconds: 951_782_400, want: "2000-02-29T00:00:00Z" },
            Case { seconds: 1_714_564_800 + 3661, want: "2024-05-01T13:01:01Z" },
            Case { seconds: -1, want: "1969-12-31T23:59:59Z" },
        ];
        for c in cases {
            assert_eq!(timestamp(&prost_types::Timestamp { seconds: c.seconds, nanos: 0 }), c.want);
        }
    }

    #[test]
    fn tables_align() {
        let t = table(&["ID", "SIZE"], &[vec!["a".into(), "1 GiB".into()], vec!["longer-id".into(), "-".into()]]);
        assert_eq!(t, "ID         SIZE\na          1 GiB\nlonger-id  -\n");
        assert_eq!(fields(&[("a", "1".into()), ("long", "2".into())]), "a     1\nlong  2\n");
    }

    fn volume() -> Volume {
        Volume {
            capacity_bytes: 1 << 30,
            volume_id: "file:n1:bench:v1".into(),
            volume_context: HashMap::new(),
            content_source: Some(VolumeContentSource { r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: "s1".into() })) }),
            accessible_topology: vec![Topology {
                segments: [("topology.holdfast.dev/node".to_owned(), "n1".to_owned()), ("zone".to_owned(), "a".to_owned())].into(),
            }],
        }
    }

    #[test]
    fn volumes() {
        let v = volume();
        assert_eq!(
            volume_text(&v, None, None),
            "volume    file:n1:bench:v1\ncapacity  1 GiB\ntopology  topology.holdfast.dev/node=n1,zone=a\nsource    snapshot s1\n"
        );
        let cond = VolumeCondition { abnormal: true, message: "device gone".into() };
        let j = volume_json(&v, Some(&["n1".to_owned()]), Some(&cond));
        assert_eq!(j["capacity_bytes"], 1 << 30);
        assert_eq!(j["content_source"]["snapshot"], "s1");
        assert_eq!(j["accessible_topology"][0]["zone"], "a");
        assert_eq!(j["published_node_ids"][0], "n1");
        assert_eq!(j["condition"]["abnormal"], true);
        assert_eq!(condition_text(&cond), "ABNORMAL: device gone");
    }

    #[test]
    fn info() {
        use crate::proto::plugin_capability::{Service, Type, VolumeExpansion, service, volume_expansion};
        let caps = [
            PluginCapability { r#type: Some(Type::Service(Service { r#type: service::Type::ControllerService as i32 })) },
            PluginCapability { r#type: Some(Type::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 })) },
        ];
        let i = Info {
            plugin: GetPluginInfoResponse { name: "csi.holdfast.dev".into(), vendor_version: "0.1.0".into(), manifest: HashMap::new() },
            ready: Ok(true),
            plugin_caps: Ok(plugin_capability_names(&caps)),
            controller_caps: Err("UNIMPLEMENTED: no controller here".into()),
            node_caps: Ok(vec![]),
            node: Ok(NodeGetInfoResponse {
                node_id: "n1".into(),
                max_volumes_per_node: 0,
                accessible_topology: Some(Topology { segments: [("topology.holdfast.dev/node".to_owned(), "n1".to_owned())].into() }),
            }),
        };
        assert_eq!(
            info_text(&i),
            "\
plugin                   csi.holdfast.dev 0.1.0
ready                    yes
plugin capabilities      CONTROLLER_SERVICE, VOLUME_EXPANSION_ONLINE
controller capabilities  not available (UNIMPLEMENTED: no controller here)
node capabilities        none
node id                  n1
max volumes              unlimited
node topology            topology.holdfast.dev/node=n1
"
        );
        let j = info_json(&i);
        assert_eq!(j["controller_capabilities"]["error"], "UNIMPLEMENTED: no controller here");
        assert_eq!(j["plugin_capabilities"][1], "VOLUME_EXPANSION_ONLINE");
        assert_eq!(j["node"]["accessible_topology"]["topology.holdfast.dev/node"], "n1");
    }

    #[test]
    fn usage_rows() {
        let u = VolumeUsage { available: 3 << 30, total: 4 << 30, used: 1 << 30, unit: volume_usage::Unit::Bytes as i32 };
        assert_eq!(usage_row(&u), ["bytes", "4 GiB", "1 GiB", "3 GiB", "25%"]);
        let i = VolumeUsage { available: 90, total: 100, used: 10, unit: volume_usage::Unit::Inodes as i32 };
        assert_eq!(usage_row(&i), ["inodes", "100", "10", "90", "10%"]);
    }
}
