# holdfast on a one-node cluster: one process serving Identity, Controller and Node for that
# node's pools (holdfast all-in-one), registered as a `monolith` plugin. No controller, no
# agents, no certificates.
# nomad job run deploy/nomad/monolith.nomad.hcl
variable "image" {
  type    = string
  default = "holdfast/holdfast:0.1.0"
}

job "holdfast" {
  type = "system"

  group "monolith" {
    network {
      port "metrics" {
        static = 9755
      }
      port "health" {
        static = 9756
      }
    }

    service {
      name     = "holdfast"
      port     = "metrics"
      provider = "consul"
      tags     = ["metrics"]
      check {
        type     = "http"
        port     = "health"
        path     = "/readyz"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "plugin" {
      driver = "docker"

      config {
        image        = var.image
        network_mode = "host"
        pid_mode     = "host"
        privileged   = true
        args = [
          "all-in-one",
          "--endpoint=${CSI_ENDPOINT}",
          "--node-id=${node.unique.name}",
          "--config=${NOMAD_TASK_DIR}/config.toml",
          "--state-dir=/var/lib/holdfast/state",
          # Prometheus metrics and /healthz, /readyz, /status (docs/observability.md).
          "--metrics-address=0.0.0.0:9755",
          "--health-address=0.0.0.0:9756",
        ]
        mount {
          type   = "bind"
          source = "/dev"
          target = "/dev"
        }
        mount {
          type   = "bind"
          source = "/var/lib/holdfast"
          target = "/var/lib/holdfast"
          bind_options {
            propagation = "rshared"
          }
        }
      }

      csi_plugin {
        id                     = "holdfast"
        type                   = "monolith"
        mount_dir              = "/csi"
        stage_publish_base_dir = "/local/csi"
        health_timeout         = "2m"
      }

      template {
        destination = "local/config.toml"
        change_mode = "restart"
        data        = <<-EOT
          allowed_path_prefixes = ["/local/csi"]

          [exec_prefix]
          lvm = ["nsenter", "--target=1", "--mount", "--uts", "--ipc", "--net", "--"]
          zfs = ["nsenter", "--target=1", "--mount", "--uts", "--ipc", "--net", "--"]

          [[pool]]
          name = "file"
          kind = "file"
          path = "/var/lib/holdfast/pools/file"
          reserve = "1GiB"
        EOT
      }

      resources {
        cpu    = 100
        memory = 256
      }
    }
  }
}
