{{/*
Helpers of the Octopus chart. Kept to plain Go-template/Sprig calls that every Helm 3
release has.
*/}}

{{/* The chart's name (nameOverride wins). */}}
{{- define "octopus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: fullnameOverride, else RELEASE-octopus (or RELEASE when it
already contains the chart name). */}}
{{- define "octopus.fullname" -}}
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

{{- define "octopus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "octopus.labels" -}}
helm.sh/chart: {{ include "octopus.chart" . }}
{{ include "octopus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the gateway's pods. */}}
{{- define "octopus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "octopus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "octopus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "octopus.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret whose keys become the gateway's environment variables. */}}
{{- define "octopus.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "octopus.fullname" . }}
{{- end }}
{{- end }}

{{/* "true" when config.discovery uses the kubernetes backend (alone or in backends). */}}
{{- define "octopus.kubernetesDiscovery" -}}
{{- $discovery := .Values.config.discovery | default dict }}
{{- $uses := eq (toString (get $discovery "backend")) "kubernetes" }}
{{- range (get $discovery "backends" | default list) }}
{{- if eq (toString (get . "backend")) "kubernetes" }}
{{- $uses = true }}
{{- end }}
{{- end }}
{{- if $uses }}true{{ end }}
{{- end }}
