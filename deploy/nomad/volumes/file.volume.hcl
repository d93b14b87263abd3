# A file-pool volume on node client-1 (nomad volume create deploy/nomad/volumes/file.volume.hcl).
# Node-local: the required topology pins it to one node; without it the controller picks the
# pool with the most free space and Nomad places allocations on that node.
id        = "pg-data"
name      = "pg-data"
type      = "csi"
plugin_id = "holdfast"

capacity_min = "1GiB"
capacity_max = "2GiB"

capability {
  access_mode     = "single-node-writer"
  attachment_mode = "file-system"
}

mount_options {
  fs_type     = "ext4"
  mount_flags = ["noatime"]
}

topology_request {
  required {
    topology {
      segments {
        "topology.holdfast.dev/node" = "client-1"
      }
    }
  }
}

parameters {
  pool = "file"
}
