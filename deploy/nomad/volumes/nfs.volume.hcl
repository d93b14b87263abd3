# A directory of the controller's nfs pool, reachable from every node: many writers (a further
# capability block, e.g. multi-node-reader-only, lets claims read only).
id        = "shared-assets"
name      = "shared-assets"
type      = "csi"
plugin_id = "holdfast"

capacity_min = "5GiB"
capacity_max = "5GiB"

capability {
  access_mode     = "multi-node-multi-writer"
  attachment_mode = "file-system"
}

mount_options {
  fs_type = "nfs"
}

parameters {
  pool = "nfs"
  mode = "0777"
}
