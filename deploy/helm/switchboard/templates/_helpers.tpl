{{/* The mesh's catalogue, generated from services/launcher (files/mesh.yaml). */}}
{{- define "sb.mesh" -}}
{{- .Files.Get "files/mesh.yaml" | fromYaml | toJson -}}
{{- end -}}

{{- define "sb.labels" -}}
app.kubernetes.io/name: switchboard
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/part-of: switchboard
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "sb.selector" -}}
app.kubernetes.io/name: switchboard
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given */}}
{{- define "sb.image" -}}
{{- if .digest -}}{{ .repository }}@{{ .digest }}{{- else -}}{{ .repository }}:{{ .tag }}{{- end -}}
{{- end -}}

{{/* a generated Envoy bootstrap with the release's namespace and cluster domain */}}
{{- define "sb.envoyConfig" -}}
{{- $mesh := include "sb.mesh" .root | fromJson -}}
{{- .root.Files.Get .file | replace (printf ".%s.svc.%s" $mesh.tokens.namespace $mesh.tokens.clusterDomain) (printf ".%s.svc.%s" .root.Release.Namespace .root.Values.clusterDomain) -}}
{{- end -}}

{{- define "sb.containerSecurity" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "sb.topologySpread" -}}
{{- if .root.Values.topologySpread.enabled }}
topologySpreadConstraints:
  {{- range $key := list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
  - maxSkew: 1
    topologyKey: {{ $key }}
    whenUnsatisfiable: {{ $.root.Values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "sb.selector" $ | nindent 8 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* The Triton replicas inference routes to (stable StatefulSet names), gRPC port. */}}
{{- define "sb.tritonUrls" -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.triton.replicas) -}}
{{- $urls = append $urls (printf "switchboard-triton-%d.switchboard-triton.%s.svc.%s:8001" $i $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{- define "sb.natsUrl" -}}
{{- if .Values.nats.enabled -}}
nats://switchboard-nats.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:4222
{{- else -}}
{{- .Values.externalNatsUrl -}}
{{- end -}}
{{- end -}}

{{/* The database URLs every PostgreSQL-backed process gets. */}}
{{- define "sb.databaseEnv" -}}
{{- if eq .Values.database.mode "cnpg" }}
- name: SWITCHBOARD_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: switchboard-postgres-app, key: uri}
- name: SWITCHBOARD_RAG_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.database.cnpg.ragRoleSecret }}, key: password}
- name: SWITCHBOARD_RAG_DATABASE_URL
  value: "postgresql://switchboard_rag:$(SWITCHBOARD_RAG_PASSWORD)@switchboard-postgres-rw.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:5432/switchboard"
{{- else }}
- name: SWITCHBOARD_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.database.external.existingSecret }}, key: url}
- name: SWITCHBOARD_RAG_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.database.external.existingSecret }}, key: rag-url}
{{- end }}
{{- end -}}
