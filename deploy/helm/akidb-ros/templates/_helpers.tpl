{{/* Names and labels. */}}
{{- define "akidb-ros.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "akidb-ros.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "akidb-ros.selectorLabels" -}}
app.kubernetes.io/name: {{ include "akidb-ros.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "akidb-ros.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "akidb-ros.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: akidb-ros
{{- end -}}

{{- define "akidb-ros.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "akidb-ros.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "akidb-ros.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{- define "akidb-ros.modelsClaim" -}}
{{- default (printf "%s-models" (include "akidb-ros.fullname" .)) .Values.persistence.models.existingClaim -}}
{{- end -}}

{{- define "akidb-ros.cacheClaim" -}}
{{- default (printf "%s-trt-cache" (include "akidb-ros.fullname" .)) .Values.persistence.tensorrtCache.existingClaim -}}
{{- end -}}

{{/* A number as a YAML double, exactly as set (the node's double parameters refuse an
integer): 0.25 -> 0.25, 12.75 -> 12.75, 5 -> 5.0, 1e-07 -> 1.0e-07 (shortest form that reads
back as the same float64; a mantissa without a point gets ".0", which YAML 1.1 needs). */}}
{{- define "akidb-ros.double" -}}
{{- $s := toJson (float64 .) -}}
{{- if contains "e" $s -}}
{{- regexReplaceAll "^(-?[0-9]+)e" $s "${1}.0e" -}}
{{- else if contains "." $s -}}
{{- $s -}}
{{- else -}}
{{- printf "%s.0" $s -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by the node and the bridge. */}}
{{- define "akidb-ros.commonEnv" -}}
- name: AKIDB_DEVICE
  value: {{ .Values.device | quote }}
- name: AKIDB_DEFAULT_MODEL
  value: {{ .Values.defaultModel | quote }}
- name: AKIDB_MODELS_DIR
  value: {{ .Values.persistence.models.mountPath | quote }}
- name: AKIDB_TENSORRT_CACHE
  value: {{ printf "%s/trt" .Values.persistence.tensorrtCache.mountPath | quote }}
- name: AKIDB_LOG_LEVEL
  value: {{ .Values.logLevel | upper | quote }}
- name: AKIDB_LOG_FORMAT
  value: json
- name: AKIDB_SECURITY_CONFIG
  value: /etc/akidb/config/security.yaml
- name: ROS_DOMAIN_ID
  value: "0"
- name: ROS_LOG_DIR
  value: /tmp/ros_log
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME)"
{{- end }}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}

{{- define "akidb-ros.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
