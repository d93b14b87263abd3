# A clone of the volume "media" (zfs clone of a snapshot taken for it), on the same node.
id        = "media-copy"
name      = "media-copy"
type      = "csi"
plugin_id = "holdfast"

clone_id = "REPLACE-WITH-THE-EXTERNAL-ID-OF-media"

capacity_min = "50GiB"
capacity_max = "50GiB"

capability {
  access_mode     = "single-node-writer"
  attachment_mode = "file-system"
}

mount_options {
  fs_type = "zfs"
}

parameters {
  pool = "zfs"
}
