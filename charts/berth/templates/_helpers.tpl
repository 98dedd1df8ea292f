{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "berth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, unless it already says "berth". */}}
{{- define "berth.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "berth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels on every object. */}}
{{- define "berth.labels" -}}
helm.sh/chart: {{ include "berth.chart" . }}
{{ include "berth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: berth
{{- end }}

{{/* Selector labels: stable across upgrades (Deployment selectors are immutable). */}}
{{- define "berth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "berth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "berth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "berth.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "berth.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Port ranges checked beyond what the schema's pattern can say: every bound in
1-65535 and start <= end. Returns the comma-separated list for the operator.
Call with (dict "key" "defaultPool" "ranges" .Values.defaultPool).
*/}}
{{- define "berth.ranges" -}}
{{- $out := list }}
{{- range .ranges }}
{{- $parts := splitList "-" (toString .) }}
{{- $start := index $parts 0 | atoi }}
{{- $end := $start }}
{{- if eq (len $parts) 2 }}{{ $end = index $parts 1 | atoi }}{{ end }}
{{- if or (lt $start 1) (gt $end 65535) }}
{{- fail (printf "%s: %q is outside 1-65535" $.key (toString .)) }}
{{- end }}
{{- if gt $start $end }}
{{- fail (printf "%s: %q starts after it ends (write START-END with START <= END)" $.key (toString .)) }}
{{- end }}
{{- $out = append $out (toString .) }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{/* The username the API server gives the operator's ServiceAccount token. */}}
{{- define "berth.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "berth.serviceAccountName" .) }}
{{- end }}

{{/*
Port ranges as a CEL list of [start, end] pairs, e.g. [[20000, 29999]].
Call with (dict "key" "defaultPool" "ranges" .Values.defaultPool).
*/}}
{{- define "berth.celRanges" -}}
{{- $pairs := list }}
{{- range splitList "," (include "berth.ranges" .) }}
{{- if . }}
{{- $parts := splitList "-" . }}
{{- $pairs = append $pairs (printf "[%s, %s]" (first $parts) (last $parts)) }}
{{- end }}
{{- end }}
{{- printf "[%s]" (join ", " $pairs) }}
{{- end }}
