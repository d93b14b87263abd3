# A ZFS dataset (fs_type zfs) with lz4 compression.
id        = "media"
name      = "media"
type      = "csi"
plugin_id = "holdfast"

capacity_min = "50GiB"
capacity_max = "50GiB"

capability {
  access_mode     = "single-node-writer"
  attachment_mode = "file-system"
}

mount_options {
  fs_type = "zfs"
}

topology_request {
  required {
    topology {
      segments {
        "topology.holdfast.dev/node" = "client-2"
      }
    }
  }
}

parameters {
  pool        = "zfs"
  compression = "lz4"
}
