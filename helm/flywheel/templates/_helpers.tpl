{{/* ===================================== Names and labels ===================================== */}}

{{- define "flywheel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource-name prefix. Truncated to 40 so that "<prefix>-generator-headless" fits in 63. */}}
{{- define "flywheel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flywheel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flywheel.labels" -}}
helm.sh/chart: {{ include "flywheel.chart" . }}
{{ include "flywheel.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flywheel
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "flywheel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flywheel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component. Call with (dict "root" $ "component" "generator"). */}}
{{- define "flywheel.componentLabels" -}}
{{ include "flywheel.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "flywheel.componentSelectorLabels" -}}
{{ include "flywheel.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "flywheel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flywheel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ======================================= Resource names ======================================= */}}

{{- define "flywheel.generator.headlessService" -}}
{{ include "flywheel.fullname" . }}-generator-headless
{{- end }}

{{/* Secret with internal-token and api-keys (generated, or the user's). */}}
{{- define "flywheel.authSecretName" -}}
{{- default (printf "%s-auth" (include "flywheel.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Secret with the plaintext API key; only exists when the chart manages the keys. */}}
{{- define "flywheel.apiKeySecretName" -}}
{{ include "flywheel.fullname" . }}-api-key
{{- end }}

{{/* Secret whose key "redis-url" the services read (the chart's own unless externalUrlSecret). */}}
{{- define "flywheel.redisUrlSecretName" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.externalUrlSecret.name }}
{{- .Values.redis.externalUrlSecret.name }}
{{- else }}
{{- include "flywheel.fullname" . }}-redis
{{- end }}
{{- end }}

{{- define "flywheel.redisUrlSecretKey" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.externalUrlSecret.name }}
{{- .Values.redis.externalUrlSecret.key }}
{{- else -}}
redis-url
{{- end }}
{{- end }}

{{- define "flywheel.redisHost" -}}
{{ include "flywheel.fullname" . }}-redis
{{- end }}

{{/* ========================================== Images ========================================== */}}

{{/* Flywheel image. Call with (dict "root" $ "flavor" "cpu"). */}}
{{- define "flywheel.image" -}}
{{- $img := index .root.Values.image .flavor }}
{{- $registry := default .root.Values.image.registry .root.Values.global.imageRegistry }}
{{- $ref := printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) }}
{{- if $img.digest }}
{{- $ref = printf "%s@%s" $img.repository $img.digest }}
{{- end }}
{{- if $registry }}
{{- printf "%s/%s" $registry $ref }}
{{- else }}
{{- $ref }}
{{- end }}
{{- end }}

{{- define "flywheel.redisImage" -}}
{{- $img := .Values.redis.image }}
{{- $registry := default $img.registry .Values.global.imageRegistry }}
{{- $ref := ternary (printf "%s@%s" $img.repository $img.digest) (printf "%s:%s" $img.repository $img.tag) (not (empty $img.digest)) }}
{{- if $registry }}
{{- printf "%s/%s" $registry $ref }}
{{- else }}
{{- $ref }}
{{- end }}
{{- end }}

{{/* ========================================== Models ========================================== */}}

{{/* The generator's model as the services see it: a hub id or an absolute path. */}}
{{- define "flywheel.generator.model" -}}
{{- $m := .Values.generator.model }}
{{- if eq $m.source "hub" }}
{{- $m.hubId }}
{{- else if eq $m.source "path" }}
{{- $m.path }}
{{- else }}
{{- if $m.pvc.subPath }}
{{- printf "%s/%s" (trimSuffix "/" $m.pvc.mountPath) (trimPrefix "/" $m.pvc.subPath) }}
{{- else }}
{{- $m.pvc.mountPath }}
{{- end }}
{{- end }}
{{- end }}

{{/* True ("true") when the learner trains the generator's model from the generator's PVC. */}}
{{- define "flywheel.learner.sharesModelPvc" -}}
{{- if and (not .Values.learner.policyModel) (eq .Values.generator.model.source "pvc") }}true{{ end }}
{{- end }}

{{/* ====================================== Service configs ====================================== */}}
{{/* Each returns the YAML written to /etc/flywheel/<service>.yaml. Secrets are never part of
     it: redis_url and internal_token come from Secrets as environment variables. */}}

{{/* Sets the fields every service shares into .cfg (a dict, mutated in place). */}}
{{- define "flywheel.config.setShared" -}}
{{- $c := .root.Values.config }}
{{- $_ := mergeOverwrite .cfg (dict
      "host" "0.0.0.0"
      "port" .values.service.port
      "metrics_port" .values.service.metricsPort
      "log_level" $c.logLevel
      "log_format" $c.logFormat
      "max_message_bytes" $c.maxMessageBytes
      "grace_seconds" .values.graceSeconds) }}
{{- end }}

{{- define "flywheel.config.generator" -}}
{{- $v := .Values.generator }}
{{- $cfg := dict }}
{{- include "flywheel.config.setShared" (dict "root" . "values" $v "cfg" $cfg) }}
{{- $_ := mergeOverwrite $cfg (dict
      "model" (include "flywheel.generator.model" .)
      "engine" $v.engine
      "dtype" $v.dtype
      "device" $v.device
      "max_batch_size" $v.maxBatchSize
      "max_wait_ms" $v.maxWaitMs
      "completion_ttl_seconds" $v.completionTtlSeconds
      "gpu_memory_utilization" $v.gpuMemoryUtilization
      "api_keys_file" "/etc/flywheel-secrets/api-keys") }}
{{- mergeOverwrite $cfg (deepCopy $v.extraConfig) | toYaml }}
{{- end }}

{{- define "flywheel.config.reward" -}}
{{- $v := .Values.reward }}
{{- $cfg := dict }}
{{- include "flywheel.config.setShared" (dict "root" . "values" $v "cfg" $cfg) }}
{{- /* model is always written: "" means rule scorers only, not the service's default. */}}
{{- $_ := mergeOverwrite $cfg (dict
      "model" $v.model
      "device" $v.device
      "dtype" $v.dtype
      "max_batch_size" $v.maxBatchSize) }}
{{- if $v.scorers }}{{ $_ := set $cfg "scorers" (deepCopy $v.scorers) }}{{ end }}
{{- mergeOverwrite $cfg (deepCopy $v.extraConfig) | toYaml }}
{{- end }}

{{- define "flywheel.config.feedback" -}}
{{- $v := .Values.feedback }}
{{- $cfg := dict }}
{{- include "flywheel.config.setShared" (dict "root" . "values" $v "cfg" $cfg) }}
{{- $_ := mergeOverwrite $cfg (dict
      "rate_limit_per_second" $v.rateLimitPerSecond
      "rate_limit_burst" $v.rateLimitBurst
      "max_batch_events" $v.maxBatchEvents
      "durability" $v.durability
      "idempotency_ttl_seconds" $v.idempotencyTtlSeconds
      "api_keys_file" "/etc/flywheel-secrets/api-keys") }}
{{- mergeOverwrite $cfg (deepCopy $v.extraConfig) | toYaml }}
{{- end }}

{{- define "flywheel.config.learner" -}}
{{- $v := .Values.learner }}
{{- $fullname := include "flywheel.fullname" . }}
{{- $generatorTargets := $v.generatorTargets }}
{{- if not $generatorTargets }}
{{- $generatorTargets = printf "dns:///%s.%s.svc.%s:%v" (include "flywheel.generator.headlessService" .) .Release.Namespace .Values.clusterDomain .Values.generator.service.port }}
{{- end }}
{{- $cfg := dict }}
{{- include "flywheel.config.setShared" (dict "root" . "values" $v "cfg" $cfg) }}
{{- $_ := mergeOverwrite $cfg (dict
      "policy_model" (default (include "flywheel.generator.model" .) $v.policyModel)
      "algorithm" $v.algorithm
      "autostart" $v.autostart
      "prompt_stream" $v.promptStream
      "prompts_file" $v.promptsFile
      "reward_target" (default (printf "%s-reward:%v" $fullname .Values.reward.service.port) $v.rewardTarget)
      "generator_targets" $generatorTargets
      "checkpoint_dir" "/var/lib/flywheel/checkpoints"
      "run_dir" "/var/lib/flywheel/runs") }}
{{- mergeOverwrite $cfg (deepCopy $v.extraConfig) | toYaml }}
{{- end }}

{{/* =================================== Pod building blocks =================================== */}}
{{/* The helpers below take (dict "root" $ "component" "<name>" "values" .Values.<name>). */}}

{{/* Environment of every Flywheel container. Options (bool): "internalToken", "hfToken". */}}
{{- define "flywheel.env" -}}
- name: FLYWHEEL_HOST
  value: "0.0.0.0"
- name: FLYWHEEL_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.redisUrlSecretName" .root }}
      key: {{ include "flywheel.redisUrlSecretKey" .root }}
{{- if .internalToken }}
- name: FLYWHEEL_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.authSecretName" .root }}
      key: internal-token
{{- end }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- /* The root filesystem is read-only: every cache goes to the /cache emptyDir. */}}
- name: HOME
  value: /tmp
- name: TMPDIR
  value: /tmp
- name: XDG_CACHE_HOME
  value: /cache
- name: HF_HOME
  value: /cache/huggingface
- name: TRITON_CACHE_DIR
  value: /cache/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /cache/torchinductor
{{- if .hfToken }}
{{- with .root.Values.generator.model.hfTokenSecret }}
{{- if .name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- end }}
{{- with .values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "flywheel.commonVolumeMounts" -}}
- name: config
  mountPath: /etc/flywheel
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
- name: shm
  mountPath: /dev/shm
{{- end }}

{{- define "flywheel.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "flywheel.fullname" .root }}-config
    items:
      - key: {{ .component }}.yaml
        path: {{ .component }}.yaml
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
- name: cache
  emptyDir:
    sizeLimit: {{ .values.cacheSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .values.shmSizeLimit }}
{{- end }}

{{- define "flywheel.apiKeysVolume" -}}
- name: api-keys
  secret:
    secretName: {{ include "flywheel.authSecretName" . }}
    defaultMode: 0440
    items:
      - key: api-keys
        path: api-keys
{{- end }}

{{- define "flywheel.apiKeysVolumeMount" -}}
- name: api-keys
  mountPath: /etc/flywheel-secrets
  readOnly: true
{{- end }}

{{/* Container ports, probes, resources and securityContext. */}}
{{- define "flywheel.containerCommon" -}}
{{- $v := .values -}}
image: {{ include "flywheel.image" (dict "root" .root "flavor" $v.imageFlavor) }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
command: ["flywheel"]
args: ["serve", {{ .component | quote }}, "--config", "/etc/flywheel/{{ .component }}.yaml"]
ports:
  - name: grpc
    containerPort: {{ $v.service.port }}
    protocol: TCP
  - name: metrics
    containerPort: {{ $v.service.metricsPort }}
    protocol: TCP
{{- /* Native gRPC probes on grpc.health.v1 with service "". The server reports NOT_SERVING
       until its model is loaded, so the startup probe carries the long model-load budget. */}}
startupProbe:
  grpc:
    port: {{ $v.service.port }}
  {{- toYaml $v.startupProbe | nindent 2 }}
livenessProbe:
  grpc:
    port: {{ $v.service.port }}
  {{- toYaml $v.livenessProbe | nindent 2 }}
readinessProbe:
  grpc:
    port: {{ $v.service.port }}
  {{- toYaml $v.readinessProbe | nindent 2 }}
resources:
  {{- include "flywheel.resources" . | nindent 2 }}
securityContext:
  {{- toYaml .root.Values.securityContext | nindent 2 }}
{{- end }}

{{/* values.resources plus gpu.count GPUs (limits; Kubernetes copies them to requests). */}}
{{- define "flywheel.resources" -}}
{{- $res := deepCopy (default (dict) .values.resources) }}
{{- if and .values.gpu (gt (int .values.gpu.count) 0) }}
{{- $limits := default (dict) $res.limits }}
{{- $_ := set $limits .values.gpu.resourceName (int .values.gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Pod-level settings every Flywheel pod shares. */}}
{{- define "flywheel.podCommon" -}}
{{- $v := .values -}}
serviceAccountName: {{ include "flywheel.serviceAccountName" .root }}
automountServiceAccountToken: {{ .root.Values.serviceAccount.automountServiceAccountToken }}
{{- with .root.Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- /* Above grace_seconds so the drain finishes before SIGKILL. */}}
terminationGracePeriodSeconds: {{ add $v.graceSeconds 15 }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod template metadata with config/secret checksums, so edits roll the pods. */}}
{{- define "flywheel.podMetadata" -}}
labels:
  {{- include "flywheel.componentSelectorLabels" . | nindent 2 }}
  {{- with .values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include (printf "flywheel.config.%s" .component) .root | sha256sum }}
  checksum/secrets: {{ include "flywheel.secretInputsChecksum" .root }}
  {{- with .values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Checksum of the user-given secret inputs. Generated values are deliberately left out:
     they are random at render time but stable in the cluster (lookup on upgrade). */}}
{{- define "flywheel.secretInputsChecksum" -}}
{{- list .Values.auth .Values.redis.auth .Values.redis.database .Values.redis.externalUrl .Values.redis.externalUrlSecret | toJson | sha256sum }}
{{- end }}

{{/* PodDisruptionBudget of one component. */}}
{{- define "flywheel.pdb" -}}
{{- if .values.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "flywheel.fullname" .root }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "flywheel.componentLabels" . | nindent 4 }}
spec:
  {{- if not (kindIs "string" .values.pdb.minAvailable) }}
  minAvailable: {{ .values.pdb.minAvailable }}
  {{- else if .values.pdb.minAvailable }}
  minAvailable: {{ .values.pdb.minAvailable | quote }}
  {{- else }}
  maxUnavailable: {{ .values.pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "flywheel.componentSelectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/* ClusterIP Service (grpc + metrics) of one component. */}}
{{- define "flywheel.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "flywheel.fullname" .root }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "flywheel.componentLabels" . | nindent 4 }}
  {{- with .values.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ default "ClusterIP" .values.service.type }}
  {{- with .values.service.loadBalancerSourceRanges }}
  loadBalancerSourceRanges:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: grpc
      port: {{ .values.service.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ .values.service.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
  selector:
    {{- include "flywheel.componentSelectorLabels" . | nindent 4 }}
{{- end }}

{{/* ======================================= Validation ======================================= */}}
{{/* Cross-field checks JSON schema cannot express (everything else is in values.schema.json).
     Note: `helm lint` reports a template `fail` only as INFO; `helm template/install` stop. */}}
{{- define "flywheel.validate" -}}
{{- with .Values.feedback.autoscaling }}
{{- if and .enabled (gt (int .minReplicas) (int .maxReplicas)) }}
{{- fail "feedback.autoscaling.minReplicas must not exceed feedback.autoscaling.maxReplicas" }}
{{- end }}
{{- end }}
{{- with .Values.feedback }}
{{- if and (gt (float64 .rateLimitPerSecond) 0.0) (lt (int .rateLimitBurst) (int .maxBatchEvents)) }}
{{- fail "feedback.rateLimitBurst must be at least feedback.maxBatchEvents (or set rateLimitPerSecond=0)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* storageClassName line: "" omits it (cluster default), "-" disables dynamic provisioning. */}}
{{- define "flywheel.storageClass" -}}
{{- if eq . "-" }}
storageClassName: ""
{{- else if . }}
storageClassName: {{ . | quote }}
{{- end }}
{{- end }}
