//! `holdfast ctl nodes`: the controller's registry (Admin ListNodes on its CSI socket), one
//! line per node, or one JSON object per node with `--json`.

use serde_json::{Value, json};

use crate::agent_proto::admin_client::AdminClient;
use crate::agent_proto::{ListNodesRequest, NodeStatus, PoolHealth};
use crate::config::format_size;
use crate::controller::registry::utc;

/// Asks the controller at `endpoint` for its nodes.
pub async fn list(endpoint: &str) -> Result<Vec<NodeStatus>, String> {
    let channel = crate::endpoint::connect(endpoint).await?;
    let resp = AdminClient::new(channel).list_nodes(ListNodesRequest {}).await.map_err(|s| {
        if s.code() == tonic::Code::Unimplemented {
            format!("{endpoint} serves no Admin service: `ctl nodes` asks a `holdfast controller` (or all-in-one) socket")
        } else {
            super::show::status(&s)
        }
    })?;
    Ok(resp.into_inner().nodes)
}

fn health(h: i32) -> &'static str {
    match PoolHealth::try_from(h).unwrap_or(PoolHealth::Unspecified) {
        PoolHealth::Healthy | PoolHealth::Unspecified => "healthy",
        PoolHealth::Degraded => "degraded",
        PoolHealth::Unavailable => "unavailable",
    }
}

/// One node as JSON.
pub fn node_json(n: &NodeStatus) -> Value {
    let pools: Vec<Value> = n
        .pools
        .iter()
        .map(|p| {
            let c = p.capacity.clone().unwrap_or_default();
            json!({
                "name": p.name, "kind": p.kind, "health": health(p.health), "health_message": p.health_message,
                "largest_volume_bytes": c.largest_volume_bytes, "free_bytes": c.free_bytes, "used_bytes": c.used_bytes,
                "volumes": c.volume_count,
            })
        })
        .collect();
    json!({
        "node_id": n.node_id, "state": n.state, "address": n.address, "in_process": n.in_process,
        "pools": pools, "volumes": n.volumes, "snapshots": n.snapshots, "release": n.agent_release,
        "version": n.version.map(|v| format!("{}.{}", v.major, v.minor)),
        "last_seen_unix": n.last_seen_unix, "segments": n.segments,
    })
}

/// The nodes as a table: node, state, address, volumes, then each pool with its free space.
pub fn nodes_text(nodes: &[NodeStatus]) -> String {
    if nodes.is_empty() {
        return "no node has registered\n".to_owned();
    }
    let mut out = String::new();
    for n in nodes {
        let addr = if n.in_process {
            "(in process)".to_owned()
        } else if n.address.is_empty() {
            "-".to_owned()
        } else {
            n.address.clone()
        };
        let seen = if n.state == "down" { format!("  last seen {}", utc(n.last_seen_unix)) } else { String::new() };
        out.push_str(&format!("{}  {}  {}  {} volumes, {} snapshots{seen}\n", n.node_id, n.state, addr, n.volumes, n.snapshots));
        for p in &n.pools {
            let c = p.capacity.clone().unwrap_or_default();
            let why = if p.health_message.is_empty() { String::new() } else { format!(" ({})", p.health_message) };
            out.push_str(&format!(
                "  pool {} ({}): {}{why}, {} free, largest new volume {}, {} volumes\n",
                p.name,
                p.kind,
                health(p.health),
                format_size(c.free_bytes),
                format_size(c.largest_volume_bytes),
                c.volume_count
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_proto::{Pool, PoolCapacity};

    #[test]
    fn text_shows_state_and_free_space() {
        let nodes = [
            NodeStatus {
                node_id: "n1".into(),
                state: "up".into(),
                address: "10.0.0.1:7000".into(),
                volumes: 2,
                pools: vec![Pool {
                    name: "fast".into(),
                    kind: "lvm".into(),
                    health: PoolHealth::Healthy as i32,
                    capacity: Some(PoolCapacity {
                        free_bytes: 5 << 30,
                        largest_volume_bytes: 4 << 30,
                        volume_count: 2,
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            },
            NodeStatus {
                node_id: "n2".into(),
                state: "down".into(),
                address: "10.0.0.2:7000".into(),
                last_seen_unix: 0,
                ..Default::default()
            },
            NodeStatus { node_id: "n3".into(), state: "retired".into(), ..Default::default() },
        ];
        assert_eq!(
            nodes_text(&nodes),
            "n1  up  10.0.0.1:7000  2 volumes, 0 snapshots\n  pool fast (lvm): healthy, 5 GiB free, largest new volume 4 GiB, 2 volumes\n\
             n2  down  10.0.0.2:7000  0 volumes, 0 snapshots  last seen 1970-01-01T00:00:00Z\n\
             n3  retired  -  0 volumes, 0 snapshots\n"
        );
        assert_eq!(node_json(&nodes[0])["pools"][0]["free_bytes"], 5u64 << 30);
    }
}
