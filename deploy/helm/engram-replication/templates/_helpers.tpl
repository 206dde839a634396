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

{{/*
The ClusterRole (and its binding) that lets the node sidecars `get` Kubernetes Nodes, to copy
their zone and rack labels onto the node Leases. Cluster-scoped, so its name carries the release
namespace too: two releases of the same name in two namespaces don't share it.
*/}}
{{- define "engram-replication.nodeClusterRoleName" -}}
{{- printf "%s-%s-node" (include "engram-replication.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The sidecar's drain_timeout (seconds): nodes.sidecar.config.drain_timeout when set, else the
pod's terminationGracePeriodSeconds less 5 s (less half of it, when it is under 10 s), so the
kubelet never SIGKILLs a node that is still handing its spaces over. A drain_timeout that
doesn't fit in the grace period is refused.
*/}}
{{- define "engram-replication.drainTimeout" -}}
{{- $grace := int .Values.nodes.terminationGracePeriodSeconds -}}
{{- $config := .Values.nodes.sidecar.config -}}
{{- if hasKey $config "drain_timeout" -}}
{{- $set := float64 (index $config "drain_timeout") -}}
{{- if and (gt $grace 0) (ge $set (float64 $grace)) -}}
{{- fail (printf "nodes.sidecar.config.drain_timeout (%v s) must be below nodes.terminationGracePeriodSeconds (%d s): the kubelet kills the pod at the end of the grace period, in the middle of its drain. Lower drain_timeout, or leave it unset: the chart then derives it from the grace period" $set $grace) -}}
{{- end -}}
{{- include "engram-replication.envValue" (index $config "drain_timeout") -}}
{{- else -}}
{{- sub $grace (min 5 (div $grace 2)) -}}
{{- end -}}
{{- end -}}

{{/*
Fields of the node StatefulSet that Kubernetes refuses to change once it exists. A change would
make the upgrade fail half-way with "Forbidden: updates to statefulset spec for fields other
than ..."; this stops it before anything is applied, and says what to do instead. Only where
the chart can see the cluster (helm install/upgrade; `helm template` has no cluster to read).
*/}}
{{- define "engram-replication.guardImmutable" -}}
{{- $n := .Values.nodes -}}
{{- $name := include "engram-replication.nodesName" . -}}
{{- $live := lookup "apps/v1" "StatefulSet" .Release.Namespace $name -}}
{{- if $live -}}
{{- $owner := index ($live.metadata.annotations | default dict) "meta.helm.sh/release-name" | default "" -}}
{{- if and $owner (ne $owner .Release.Name) -}}
{{- fail (printf "StatefulSet %s in namespace %s belongs to release %s: give this release nodes of its own (--set nodes.name=<another name>), since the pod names are the node names" $name .Release.Namespace $owner) -}}
{{- end -}}
{{- if ne $live.spec.podManagementPolicy $n.podManagementPolicy -}}
{{- fail (printf "nodes.podManagementPolicy can't change from %s to %s on the existing StatefulSet %s (Kubernetes refuses it). Keep %s, or delete the StatefulSet with `kubectl delete statefulset %s --cascade=orphan` (the pods and their volumes stay) and upgrade again" $live.spec.podManagementPolicy $n.podManagementPolicy $name $live.spec.podManagementPolicy $name) -}}
{{- end -}}
{{- $claims := $live.spec.volumeClaimTemplates | default list -}}
{{- if and $claims (not $n.persistence.enabled) -}}
{{- fail (printf "nodes.persistence.enabled can't be turned off on the existing StatefulSet %s: its volumeClaimTemplates are immutable (and each node's WALs are on those volumes)" $name) -}}
{{- end -}}
{{- if and (not $claims) $n.persistence.enabled -}}
{{- fail (printf "nodes.persistence.enabled can't be turned on for the existing StatefulSet %s: its volumeClaimTemplates are immutable. Delete it with --cascade=orphan first (docs/install.md)" $name) -}}
{{- end -}}
{{- range $claims -}}
{{- if eq .metadata.name "data" -}}
{{- $size := .spec.resources.requests.storage -}}
{{- if ne (toString $size) (toString $n.persistence.size) -}}
{{- fail (printf "nodes.persistence.size can't change from %s to %s on the existing StatefulSet %s: volumeClaimTemplates are immutable. To grow the volumes, patch each PersistentVolumeClaim data-%s-<i> (its StorageClass must allow expansion), then `kubectl delete statefulset %s --cascade=orphan` and upgrade with the new size (docs/install.md)" $size $n.persistence.size $name $name $name) -}}
{{- end -}}
{{- $class := .spec.storageClassName | default "" -}}
{{- $want := $n.persistence.storageClassName -}}
{{- if and $want (ne $want "-") (ne $class $want) -}}
{{- fail (printf "nodes.persistence.storageClassName can't change from %q to %q on the existing StatefulSet %s: volumeClaimTemplates are immutable" $class $want $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
prometheus-operator's kinds are rendered only where the cluster serves them (or `helm template
--api-versions monitoring.coreos.com/v1` says it does); else NOTES.txt says they were skipped.
*/}}
{{- define "engram-replication.hasMonitoring" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}
