{{/* Names, labels, the NATS URL and the environment every llama-mesh container shares. */}}

{{- define "llama-mesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: fullname-COMPONENT. */}}
{{- define "llama-mesh.component" -}}
{{- printf "%s-%s" (include "llama-mesh.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llama-mesh.labels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "llama-mesh.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "llama-mesh.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* The NATS chart's own naming (its fullname), to reach its pods. */}}
{{- define "llama-mesh.natsFullname" -}}
{{- if .Values.nats.fullnameOverride -}}
{{- .Values.nats.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "nats" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-nats" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The NATS URLs, comma-separated, with the user and password when natsAuth has them:
every pod of the bundled cluster by its stable name, or natsUrl. */}}
{{- define "llama-mesh.natsUrl" -}}
{{- $urls := list -}}
{{- if .Values.nats.enabled -}}
{{- if .Values.natsUrl -}}
{{- fail "natsUrl is set while nats.enabled is true: set nats.enabled=false to use that NATS, or drop natsUrl" -}}
{{- end -}}
{{- $name := include "llama-mesh.natsFullname" . -}}
{{- if gt (int .Values.natsReplicas) (int .Values.nats.config.cluster.replicas) -}}
{{- fail (printf "natsReplicas: %d copies of each stream need as many NATS nodes; nats.config.cluster.replicas is %d" (int .Values.natsReplicas) (int .Values.nats.config.cluster.replicas)) -}}
{{- end -}}
{{- range $i := until (int .Values.nats.config.cluster.replicas) -}}
{{- $urls = append $urls (printf "nats://%s-%d.%s-headless:4222" $name $i $name) -}}
{{- end -}}
{{- else -}}
{{- $urls = splitList "," (required "nats.enabled is false: set natsUrl to the NATS URLs (nats://HOST:PORT, comma-separated)" .Values.natsUrl) -}}
{{- end -}}
{{- $login := "" -}}
{{- if .Values.natsAuth.user -}}
{{- $login = printf "%s:%s@" (urlquery .Values.natsAuth.user) (urlquery (required "natsAuth.user is set: set natsAuth.password too" .Values.natsAuth.password)) -}}
{{- end -}}
{{- $out := list -}}
{{- range $urls -}}
{{- $url := trim . -}}
{{- if not (hasPrefix "nats://" $url) -}}
{{- fail (printf "natsUrl: %q is not a nats://HOST:PORT URL" $url) -}}
{{- end -}}
{{- $out = append $out (printf "nats://%s%s" $login (trimPrefix "nats://" $url)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* The Secret with the API keys (api-keys, admin-keys), or nothing without keys. */}}
{{- define "llama-mesh.authSecret" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else if not .Values.auth.insecureNoAuth -}}
{{- if not (or .Values.auth.apiKeys .Values.auth.adminKeys) -}}
{{- fail "auth: set auth.apiKeys and auth.adminKeys (or auth.existingSecret): llama-mesh listens on the pod network, where without keys anyone could deploy code (auth.insecureNoAuth=true allows it on a throwaway cluster)" -}}
{{- end -}}
{{- include "llama-mesh.component" (dict "root" . "name" "auth") -}}
{{- end -}}
{{- end -}}

{{/* Environment of every llama-mesh container: the NATS URL and login, the API keys. */}}
{{- define "llama-mesh.env" -}}
- name: LLAMA_MESH_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "llama-mesh.component" (dict "root" . "name" "nats") }}
      key: url
{{- if .Values.natsAuth.creds }}
- name: LLAMA_MESH_NATS_CREDS
  value: /etc/llama-mesh/nats/user.creds
{{- end }}
{{- with include "llama-mesh.authSecret" . }}
- name: LLAMA_MESH_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: api-keys
- name: LLAMA_MESH_ADMIN_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: admin-keys
{{- end }}
{{- end -}}

{{/* The NATS credentials file's volume and mount, when natsAuth.creds is set. */}}
{{- define "llama-mesh.credsVolume" -}}
{{- if .Values.natsAuth.creds }}
- name: nats-creds
  secret:
    secretName: {{ include "llama-mesh.component" (dict "root" . "name" "nats") }}
    items:
      - key: user.creds
        path: user.creds
{{- end }}
{{- end -}}

{{- define "llama-mesh.credsMount" -}}
{{- if .Values.natsAuth.creds }}
- name: nats-creds
  mountPath: /etc/llama-mesh/nats
  readOnly: true
{{- end }}
{{- end -}}

{{/* Pod annotations that roll the pods when a Secret they read changes. */}}
{{- define "llama-mesh.checksums" -}}
checksum/secrets: {{ include (print .Template.BasePath "/secrets.yaml") . | sha256sum }}
{{- end -}}

{{/* `serve` options shared by the API server and supervisor roles. */}}
{{- define "llama-mesh.serveArgs" -}}
- --nats-replicas
- {{ .Values.natsReplicas | quote }}
- --data-dir
- /data
{{- if .Values.auth.insecureNoAuth }}
- --insecure-no-auth
{{- end }}
{{- end -}}
