# A new volume restored from a snapshot (nomad volume snapshot create db-lvm db-lvm-snap prints
# the snapshot's id); it is made on the snapshot's node, in the snapshot's pool.
id        = "db-lvm-restored"
name      = "db-lvm-restored"
type      = "csi"
plugin_id = "holdfast"

snapshot_id = "REPLACE-WITH-SNAPSHOT-ID"

capacity_min = "10GiB"
capacity_max = "10GiB"

capability {
  access_mode     = "single-node-writer"
  attachment_mode = "file-system"
}

mount_options {
  fs_type = "xfs"
}

parameters {
  pool = "lvm-thin"
}
