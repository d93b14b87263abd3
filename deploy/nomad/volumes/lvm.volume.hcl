# A thin LV, as a filesystem or (attachment_mode = "block-device") a raw block volume.
# Preferred topology: client-1 first, then any node the controller finds room on.
id        = "db-lvm"
name      = "db-lvm"
type      = "csi"
plugin_id = "holdfast"

capacity_min = "10GiB"
capacity_max = "10GiB"

capability {
  access_mode     = "single-node-writer"
  attachment_mode = "file-system"
}

mount_options {
  fs_type     = "xfs"
  mount_flags = ["noatime"]
}

topology_request {
  preferred {
    topology {
      segments {
        "topology.holdfast.dev/node" = "client-1"
      }
    }
  }
}

parameters {
  pool = "lvm-thin"
}
