# holdfast's node plugin on every client: CSI Identity + Node, the node's pools and the Agent
# API. A system job, privileged, on the host's network (NFS mounts outlive the task's network
# namespace) and pid namespace (the host's LVM/ZFS tools run through nsenter --target=1).
# nomad job run deploy/nomad/node.nomad.hcl
variable "image" {
  type    = string
  default = "holdfast/holdfast:0.1.0"
}

variable "controller" {
  type        = string
  description = "The controllers' registration address: a name resolving to every instance."
  default     = "holdfast-controller.service.consul:9750"
}

job "holdfast-node" {
  type = "system"

  group "node" {
    network {
      port "metrics" {
        static = 9755
      }
      port "health" {
        static = 9756
      }
    }

    # Ready once registered with a controller; metrics scraped from the same service.
    service {
      name     = "holdfast-node"
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

    task "node" {
      driver = "docker"

      config {
        image        = var.image
        network_mode = "host"
        pid_mode     = "host"
        privileged   = true
        args = [
          "agent",
          "--endpoint=${CSI_ENDPOINT}",
          "--controller=${var.controller}",
          "--listen=0.0.0.0:9751",
          "--advertise=${attr.unique.network.ip-address}:9751",
          "--config=${NOMAD_TASK_DIR}/config.toml",
          # The Nomad node's name: stable across restarts, part of every volume id.
          "--node-id=${node.unique.name}",
          "--tls-cert=${NOMAD_SECRETS_DIR}/tls.crt",
          "--tls-key=${NOMAD_SECRETS_DIR}/tls.key",
          "--tls-ca=${NOMAD_SECRETS_DIR}/ca.crt",
          # The controller's certificate names holdfast-controller, not the Consul name dialled.
          "--tls-server-name=holdfast-controller",
          # Prometheus metrics and /healthz, /readyz, /status (docs/observability.md).
          "--metrics-address=0.0.0.0:9755",
          "--health-address=0.0.0.0:9756",
        ]
        mount {
          type   = "bind"
          source = "/dev"
          target = "/dev"
        }
        # State (stage and freeze records) and file pools: on the host, kept across restarts.
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
        type                   = "node"
        mount_dir              = "/csi"
        stage_publish_base_dir = "/local/csi"
        health_timeout         = "2m"
      }

      # The pools of this node (the same file on every node of the job; see
      # docs/operations.md for nodes that differ).
      template {
        destination = "local/config.toml"
        change_mode = "restart"
        data        = <<-EOT
          # Nomad gives node calls paths under stage_publish_base_dir.
          allowed_path_prefixes = ["/local/csi"]

          [exec_prefix]
          lvm = ["nsenter", "--target=1", "--mount", "--uts", "--ipc", "--net", "--"]
          zfs = ["nsenter", "--target=1", "--mount", "--uts", "--ipc", "--net", "--"]

          [[pool]]
          name = "file"
          kind = "file"
          path = "/var/lib/holdfast/pools/file"
          reserve = "1GiB"

          # [[pool]]
          # name = "lvm-thin"
          # kind = "lvm"
          # volume_group = "holdfast"
          # thin_pool = "thin"

          # [[pool]]
          # name = "zfs"
          # kind = "zfs"
          # dataset = "tank/holdfast"
        EOT
      }

      template {
        destination = "secrets/tls.crt"
        change_mode = "noop"
        data        = "{{ with nomadVar \"nomad/jobs/holdfast-node\" }}{{ .tls_crt }}{{ end }}"
      }
      template {
        destination = "secrets/tls.key"
        change_mode = "noop"
        perms       = "0600"
        data        = "{{ with nomadVar \"nomad/jobs/holdfast-node\" }}{{ .tls_key }}{{ end }}"
      }
      template {
        destination = "secrets/ca.crt"
        change_mode = "noop"
        data        = "{{ with nomadVar \"nomad/jobs/holdfast-node\" }}{{ .ca_crt }}{{ end }}"
      }

      resources {
        cpu    = 100
        memory = 256
      }
    }
  }
}
