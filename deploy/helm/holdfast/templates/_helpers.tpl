{{/* The holdfast image. */}}
{{- define "holdfast.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{/* The securityContext of every sidecar. */}}
{{- define "holdfast.sidecarSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* A Role letting a sidecar of the controller pod hold its leader-election lease. */}}
{{- define "holdfast.leaseRule" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "watch", "list", "delete", "update", "create"]
{{- end }}
