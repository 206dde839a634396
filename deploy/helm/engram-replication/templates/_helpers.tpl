{{/*
Names, labels and small shared fragments. Every name is truncated to 63 characters (the DNS
label limit most Kubernetes names obey).
*/}}

{{/* The chart's name, or nameOverride. */}}
{{- define "engram-replication.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The release's base name: fullnameOverride, else the release name when it already contains the
chart's name, else "<release>-<chart>".
*/}}
{{- define "engram-replication.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "engram-replication.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "engram-replication.labels" -}}
helm.sh/chart: {{ include "engram-replication.chart" . }}
{{ include "engram-replication.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: engram-replication
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select this release's objects (stable across upgrades: never add to these). */}}
{{- define "engram-replication.selectorLabels" -}}
app.kubernetes.io/name: {{ include "engram-replication.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of the operator pods / the node pods. */}}
{{- define "engram-replication.operatorSelectorLabels" -}}
{{ include "engram-replication.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "engram-replication.nodeSelectorLabels" -}}
{{ include "engram-replication.selectorLabels" . }}
app.kubernetes.io/component: node
{{- end -}}

{{/*
The node StatefulSet's name. Its pods' names are the node names that MemorySpace status, events
and metrics show (engram-0, engram-1, ...), so it is short and not prefixed by the release.
*/}}
{{- define "engram-replication.nodesName" -}}
{{- .Values.nodes.name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* The nodes' headless Service (stable DNS: <pod>.<this>.<namespace>.svc). */}}
{{- define "engram-replication.nodesServiceName" -}}
{{- printf "%s-nodes" (include "engram-replication.nodesName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "engram-replication.operatorName" -}}
{{- printf "%s-operator" (include "engram-replication.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "engram-replication.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "engram-replication.operatorName" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "engram-replication.nodeServiceAccountName" -}}
{{- if .Values.nodes.serviceAccount.create -}}
{{- default (printf "%s-node" (include "engram-replication.fullname" .) | trunc 63 | trimSuffix "-") .Values.nodes.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.nodes.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The kopf peering object the operator replicas meet in (one per release). */}}
{{- define "engram-replication.peeringName" -}}
{{- default (include "engram-replication.fullname" .) .Values.operator.peering.name -}}
{{- end -}}

{{/* The Secret holding the replication shared secret, and the key in it. */}}
{{- define "engram-replication.secretName" -}}
{{- if .Values.replication.existingSecret -}}
{{- .Values.replication.existingSecret -}}
{{- else -}}
{{- printf "%s-secret" (include "engram-replication.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "engram-replication.secretKey" -}}
{{- if .Values.replication.existingSecret -}}
{{- .Values.replication.existingSecretKey -}}
{{- else -}}
shared-secret
{{- end -}}
{{- end -}}

{{/* image: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "engram-replication.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
A sidecar setting's value as an environment variable string. Helm reads values.yaml numbers as
float64, and a float64 prints as 6.7108864e+07; whole numbers are printed as integers instead,
lists (backoff_steps) as the comma-separated form the sidecar reads from the environment.
*/}}
{{- define "engram-replication.envValue" -}}
{{- if kindIs "slice" . -}}
{{- $parts := list -}}
{{- range . -}}
{{- $parts = append $parts (include "engram-replication.envValue" .) -}}
{{- end -}}
{{- join "," $parts -}}
{{- else if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}
