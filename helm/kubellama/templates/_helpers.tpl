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

{{/* The PriorityClass of training pods: the chart's own, an existing one, or empty. */}}
{{- define "kubellama.priorityClass" -}}
{{- if .Values.priorityClass.create -}}
{{- printf "%s-training" (include "kubellama.fullname" .) -}}
{{- else -}}
{{- .Values.priorityClass.name -}}
{{- end -}}
{{- end -}}

{{/* The upload Job's own account: it needs KFP API rights (multi-user) and no Kubernetes API rights. */}}
{{- define "kubellama.uploadServiceAccountName" -}}
{{- printf "%s-upload" (include "kubellama.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubellama.runtimeName" -}}
{{- printf "%s-torch" (include "kubellama.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "true" when this release writes the kfp-launcher ConfigMap (see kfp.launcherConfig). */}}
{{- define "kubellama.createLauncherConfig" -}}
{{- $lc := toString .Values.kfp.launcherConfig -}}
{{- if or (eq $lc "true") (and (eq $lc "auto") (not .Values.kfp.multiUser)) -}}true{{- end -}}
{{- end -}}

{{/* The Secrets the KFP launcher reads through the API as the runs' account (JSON list): the S3 keys the chart's
kfp-launcher names and, where the chart leaves kfp-launcher to the profile controller, the Secret KFP falls back to
for that ConfigMap's default store (kfp.artifactSecret). */}}
{{- define "kubellama.launcherSecrets" -}}
{{- $names := list -}}
{{- with include "kubellama.s3Secret" . }}{{ $names = append $names . }}{{ end -}}
{{- if and (not (include "kubellama.createLauncherConfig" .)) .Values.kfp.artifactSecret -}}
{{- $names = append $names .Values.kfp.artifactSecret -}}
{{- end -}}
{{- $names | uniq | toJson -}}
{{- end -}}

{{/* The data of the kfp-launcher ConfigMap: artifact store root and the S3 provider (KFP >= 2.3 reads
forcePathStyle; MinIO and Ceph need path-style requests). */}}
{{- define "kubellama.launcherData" -}}
{{- $pathStyle := toString .Values.s3.pathStyle -}}
{{- if eq $pathStyle "auto" }}{{ $pathStyle = ternary "true" "false" (ne .Values.s3.endpoint "") }}{{ end -}}
defaultPipelineRoot: {{ printf "%s/kfp" (include "kubellama.root" .) | quote }}
providers: |
  s3:
    default:
      {{- with .Values.s3.endpoint }}
      endpoint: {{ . | trimPrefix "http://" | trimPrefix "https://" }}
      disableSSL: {{ hasPrefix "http://" . }}
      {{- end }}
      region: {{ .Values.s3.region }}
      forcePathStyle: {{ $pathStyle }}
      credentials:
        {{- with include "kubellama.s3Secret" . }}
        fromEnv: false
        secretRef:
          secretName: {{ . }}
          accessKeyKey: AWS_ACCESS_KEY_ID
          secretKeyKey: AWS_SECRET_ACCESS_KEY
        {{- else }}
        fromEnv: true
        {{- end }}
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
{{- with include "kubellama.priorityClass" . }}
cluster.priority_class={{ . }}
{{- end }}
{{- if .Values.trainingRuntime.create }}
cluster.runtime={{ include "kubellama.runtimeName" . }}
cluster.runtime_kind={{ ternary "ClusterTrainingRuntime" "TrainingRuntime" .Values.trainingRuntime.clusterScoped }}
{{- end }}
{{- if .Values.networkPolicy.enabled }}
cluster.network_policy=true
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
