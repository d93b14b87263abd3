# holdfast's controller plugin: CSI Identity + Controller, the registry of agents, placement.
# Nomad sends CreateVolume and the other controller calls to one healthy controller instance,
# whichever node it runs on; the controller routes each call to the agent that owns the pool.
# Two instances: agents register with both (every address the controller name resolves to).
# nomad job run deploy/nomad/controller.nomad.hcl
variable "image" {
  type    = string
  default = "holdfast/holdfast:0.1.0"
}

job "holdfast-controller" {
  type = "service"

  group "controller" {
    count = 2

    # One instance per client node.
    constraint {
      distinct_hosts = true
    }

    network {
      port "registration" {
        static = 9750
      }
      port "metrics" {
        static = 9810
      }
      port "health" {
        static = 9811
      }
    }

    # Agents find the controllers through this name (Consul DNS:
    # holdfast-controller.service.consul), which resolves to every instance.
    service {
      name     = "holdfast-controller"
      port     = "registration"
      provider = "consul"
      check {
        type     = "http"
        port     = "health"
        path     = "/readyz"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "controller" {
      driver = "docker"

      config {
        image = var.image
        args = [
          "controller",
          "--endpoint=${CSI_ENDPOINT}",
          "--listen=0.0.0.0:9750",
          "--retired-nodes=${NOMAD_TASK_DIR}/retired-nodes",
          "--config=${NOMAD_TASK_DIR}/config.toml",
          "--tls-cert=${NOMAD_SECRETS_DIR}/tls.crt",
          "--tls-key=${NOMAD_SECRETS_DIR}/tls.key",
          "--tls-ca=${NOMAD_SECRETS_DIR}/ca.crt",
          # Every agent presents the one shared certificate (holdfast certs node --node-id
          # holdfast-agent): the name checked when dialling an agent, not its node id.
          "--agent-server-name=holdfast-agent",
          # Prometheus metrics and /healthz, /readyz, /status (docs/observability.md).
          "--metrics-address=0.0.0.0:9810",
          "--health-address=0.0.0.0:9811",
        ]
        ports = ["registration", "metrics", "health"]
        # The controller mounts the exports of nfs pools to make volume directories.
        privileged = true
      }

      csi_plugin {
        id             = "holdfast"
        type           = "controller"
        mount_dir      = "/csi"
        health_timeout = "2m"
      }

      # The controller's own pools: nfs only (node-local pools belong to the agents).
      template {
        destination = "local/config.toml"
        change_mode = "restart"
        data        = <<-EOT
          # [[pool]]
          # name = "nfs"
          # kind = "nfs"
          # server = "nfs.example.internal"
          # export = "/srv/holdfast"
          # mount_options = ["nfsvers=4.2", "hard"]
        EOT
      }

      # Node ids retired for good, one a line; re-read on change (docs/operations.md).
      template {
        destination = "local/retired-nodes"
        change_mode = "noop"
        data        = "# node ids retired for good, one a line\n"
      }

      # The controller's certificate (docs/operations.md: holdfast certs, or Vault).
      template {
        destination = "secrets/tls.crt"
        change_mode = "noop"
        data        = "{{ with nomadVar \"nomad/jobs/holdfast-controller\" }}{{ .tls_crt }}{{ end }}"
      }
      template {
        destination = "secrets/tls.key"
        change_mode = "noop"
        perms       = "0600"
        data        = "{{ with nomadVar \"nomad/jobs/holdfast-controller\" }}{{ .tls_key }}{{ end }}"
      }
      template {
        destination = "secrets/ca.crt"
        change_mode = "noop"
        data        = "{{ with nomadVar \"nomad/jobs/holdfast-controller\" }}{{ .ca_crt }}{{ end }}"
      }

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
