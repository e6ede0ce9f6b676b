{{- define "kubellama.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubellama.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubellama.serviceAccountName" -}}
{{- default (include "kubellama.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; empty under IRSA. */}}
{{- define "kubellama.s3Secret" -}}
{{- $c := .Values.s3.credentials -}}
{{- if eq $c.mode "create" -}}
{{- printf "%s-s3" (include "kubellama.fullname" .) -}}
{{- else if eq $c.mode "existingSecret" -}}
{{- required "s3.credentials.existingSecret is required when mode is existingSecret" $c.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "kubellama.root" -}}
{{- printf "s3://%s/%s" .Values.s3.bucket (trimAll "/" .Values.s3.prefix) | trimSuffix "/" -}}
{{- end -}}

{{- define "kubellama.priorityClass" -}}
{{- printf "%s-training" (include "kubellama.fullname" .) -}}
{{- end -}}

{{/* Hydra overrides of the uploaded pipeline: the chart's facts first, the user's after (theirs win). */}}
{{- define "kubellama.overrides" -}}
run.root={{ include "kubellama.root" . }}
cluster.namespace={{ .Release.Namespace }}
cluster.service_account={{ include "kubellama.serviceAccountName" . }}
{{- with include "kubellama.s3Secret" . }}
cluster.s3_secret={{ . }}
{{- end }}
{{- with .Values.s3.endpoint }}
cluster.s3_endpoint={{ . }}
{{- end }}
{{- if .Values.priorityClass.create }}
cluster.priority_class={{ include "kubellama.priorityClass" . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
cluster.image_pull_secrets=[{{ join "," . }}]
{{- end }}
{{- if .Values.kfp.multiUser }}
pipeline.namespace={{ .Release.Namespace }}
{{- end }}
{{- range .Values.pipeline.overrides }}
{{ . }}
{{- end }}
{{- end -}}
