{{/*
What values.schema.json cannot say: each fails the render with the value to set.
Included once, from configmaps.yaml.
*/}}
{{- define "sb.checks" -}}
{{- $_ := required "secrets.signingKey.existingSecret: name the Secret holding the API keys' signing key (key signing-key.pem)" .Values.secrets.signingKey.existingSecret -}}
{{- if eq .Values.database.mode "external" -}}
{{- $_ := required "database.external.existingSecret: name the Secret with the PostgreSQL URLs (keys url, rag-url)" .Values.database.external.existingSecret -}}
{{- else -}}
{{- $_ := required "database.cnpg.ragRoleSecret: name the basic-auth Secret of the switchboard_rag role" .Values.database.cnpg.ragRoleSecret -}}
{{- end -}}
{{- if not .Values.nats.enabled -}}
{{- $_ := required "externalNatsUrl: set it, or nats.enabled: true" .Values.externalNatsUrl -}}
{{- end -}}
{{- if .Values.production -}}
{{- if and .Values.nats.enabled (lt (int .Values.nats.config.cluster.replicas) 3) -}}
{{- fail (printf "production: true needs nats.config.cluster.replicas >= 3 (JetStream streams replicated on 3 nodes), got %v" .Values.nats.config.cluster.replicas) -}}
{{- end -}}
{{- if lt (int .Values.natsStreamReplicas) 3 -}}
{{- fail (printf "production: true needs natsStreamReplicas >= 3 (each stream kept on 3 NATS nodes), got %v" .Values.natsStreamReplicas) -}}
{{- end -}}
{{- if and .Values.nats.enabled (not .Values.nats.config.cluster.enabled) -}}
{{- fail "production: true needs nats.config.cluster.enabled: true" -}}
{{- end -}}
{{- if and (eq .Values.database.mode "cnpg") (lt (int .Values.database.cnpg.instances) 2) -}}
{{- fail (printf "production: true needs database.cnpg.instances >= 2 (a standby to fail over to), got %v" .Values.database.cnpg.instances) -}}
{{- end -}}
{{- range $name, $svc := .Values.services -}}
{{- if lt (int $svc.replicas) 2 -}}
{{- fail (printf "production: true needs services.%s.replicas >= 2, got %v" $name $svc.replicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $mesh := include "sb.mesh" . | fromJson -}}
{{- range $kind := $mesh.kinds -}}
{{- if not (hasKey $.Values.services $kind.name) -}}
{{- fail (printf "services.%s: missing (every kind of the mesh needs its settings)" $kind.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
