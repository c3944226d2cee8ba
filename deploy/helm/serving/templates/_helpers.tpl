{{/* Names and labels. */}}
{{- define "serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* At most 40 characters: KubeRay names the RayCluster <name>-<5 chars>, its pods
<cluster>-head-<5>/<cluster>-<group>-worker-<5>, and the Service <name>-serve-svc. */}}
{{- define "serving.fullname" -}}
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

{{- define "serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "serving.labels" -}}
helm.sh/chart: {{ include "serving.chart" . }}
{{ include "serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: serving
{{- end }}

{{- define "serving.serviceName" -}}
{{- default (printf "%s-serve-svc" (include "serving.fullname" .)) .Values.service.name }}
{{- end }}

{{- define "serving.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) }}
{{- end }}

{{/* The models config as YAML, exactly as the ConfigMap ships it. */}}
{{- define "serving.configYaml" -}}
{{- $holder := dict "root" . }}
{{- include "serving.withKeysFile" $holder }}
{{- toYaml $holder.config }}
{{- end }}

{{/* Where the keys Secret is mounted, and whether there is one. */}}
{{- define "serving.keysDir" -}}/etc/serving-keys{{- end }}
{{- define "serving.keysEnabled" -}}
{{- if or .Values.keys.existingSecret .Values.keys.file }}true{{ end }}
{{- end }}

{{/* .Values.serving with router.keys_file pointing at the mounted keys Secret (when there is one).
Call with (dict "root" $); sets "config" in that dict. */}}
{{- define "serving.withKeysFile" -}}
{{- $root := .root }}
{{- $config := deepCopy $root.Values.serving }}
{{- if include "serving.keysEnabled" $root }}
{{- $router := $config.router | default dict }}
{{- $_ := set $router "keys_file" (printf "%s/keys.yaml" (include "serving.keysDir" $root)) }}
{{- $_ := set $config "router" $router }}
{{- end }}
{{- $_ := set . "config" $config }}
{{- end }}

{{/* The models config's router section over its defaults (generated from serving/config.py), as JSON. */}}
{{- define "serving.routerJson" -}}
{{- $defaults := include "serving.configDefaults" . | fromJson }}
{{- merge (deepCopy (.Values.serving.router | default dict)) $defaults.router | toJson }}
{{- end }}

{{/* Seconds a stopping pod drains: the longest graceful_shutdown_timeout_s of any deployment
(a model's own value, else router.request_timeout_s, as serving/config.py resolves it). */}}
{{- define "serving.drainSeconds" -}}
{{- $drain := (include "serving.routerJson" . | fromJson).request_timeout_s | float64 }}
{{- range .Values.serving.models }}
{{- if .graceful_shutdown_timeout_s }}{{ $drain = maxf $drain (float64 .graceful_shutdown_timeout_s) }}{{ end }}
{{- end }}
{{- ceil $drain | int }}
{{- end }}

{{/*
Checks of the chart's own values against the models config. values.schema.json (generated from
serving/config.py) validates each key; checks across keys of the models config (unique names
and aliases, known profiles, replicas min <= max, GPUs >= tensor x pipeline parallel) are
`serving check`'s, which the chart's tests and every pod (provisioning, the Serve application)
run on the same config. Only what needs the worker groups is checked here.
*/}}
{{- define "serving.validate" -}}
{{- $cfg := .Values.serving }}
{{- $profiles := $cfg.profiles | default dict }}
{{- range $i, $m := $cfg.models }}
{{- $profile := $m.profile | default $cfg.default_profile }}
{{- $p := dict }}
{{- if $profile }}{{ $p = get $profiles $profile | default dict }}{{ end }}
{{- $gpus := ($m.resources | default $p.resources | default dict).gpus | default 0 | float64 }}
{{- if gt $gpus 0.0 }}
{{- $best := 0.0 }}
{{- range $.Values.workerGroups }}
{{- $g := include "serving.groupGpus" . | float64 }}
{{- if gt $g $best }}{{ $best = $g }}{{ end }}
{{- end }}
{{- if lt $best $gpus }}
{{- fail (printf "serving.models[%d] (%s): a replica needs %v GPUs but no worker group's pod offers that many (largest: %v); add a worker group with resources.limits[\"nvidia.com/gpu\"] >= %v" $i $m.name $gpus $best $gpus) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $i, $g := .Values.workerGroups }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "workerGroups[%d] (%s): minReplicas (%d) must not exceed maxReplicas (%d)" $i $g.name (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- if and (hasKey $g "replicas") (or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas))) }}
{{- fail (printf "workerGroups[%d] (%s): replicas (%d) must lie between minReplicas (%d) and maxReplicas (%d)" $i $g.name (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* GPUs one pod of a worker group offers: num-gpus in rayStartParams, else its nvidia.com/gpu limit. */}}
{{- define "serving.groupGpus" -}}
{{- $limits := (.resources | default dict).limits | default dict }}
{{- if hasKey (.rayStartParams | default dict) "num-gpus" }}
{{- get .rayStartParams "num-gpus" | float64 }}
{{- else }}
{{- get $limits "nvidia.com/gpu" | default 0 | float64 }}
{{- end }}
{{- end }}

{{/* serveConfigV2: the Ray Serve config KubeRay applies to the cluster. One application per model
(its engine; args: that model's entry without its naming fields, its profile, the engine's router
settings, as serving/config.py `engine_app_args` makes them, tested equal) and one for the routers
(args: the router section; the whole models config is the router's user_config, which Ray Serve
applies in place). Ray Serve versions an application by its args, so a `helm upgrade` rolls only
the models whose engine changed, and names, aliases, tags and routes change without any restart.
Deployment options (replicas, resources, graceful_shutdown_timeout_s) come from the args through
the builders. The field lists come from serving/config.py (templates/_config_defaults.tpl). */}}
{{- define "serving.serveConfig" -}}
{{- $router := include "serving.routerJson" . | fromJson }}
{{- $fields := (include "serving.configDefaults" . | fromJson).fields }}
{{- $holder := dict "root" . }}
{{- include "serving.withKeysFile" $holder }}
{{- $config := $holder.config }}
{{- $routerSection := $config.router | default dict }}
{{- $routerUser := dict "config" $config }}
{{- $routerApp := dict "name" $fields.app_name "import_path" "serving.app:build_router_app" "route_prefix" "/" "args" (dict "router" $routerSection) "deployments" (list (dict "name" $fields.router_deployment "user_config" $routerUser)) }}
{{- $apps := list $routerApp }}
{{- range $m := $config.models }}
{{- $entry := deepCopy $m }}
{{- range $f := $fields.naming }}{{ $_ := unset $entry $f }}{{ end }}
{{- if $entry.adapters }}
{{- $adapters := list }}
{{- range $a := $entry.adapters }}
{{- $copy := deepCopy $a }}
{{- range $f := $fields.adapter_naming }}{{ $_ := unset $copy $f }}{{ end }}
{{- $adapters = append $adapters $copy }}
{{- end }}
{{- $_ := set $entry "adapters" $adapters }}
{{- end }}
{{- $args := dict "models" (list $entry) }}
{{- $profile := $m.profile | default $config.default_profile }}
{{- if $profile }}
{{- $_ := set $entry "profile" $profile }}
{{- $_ := set $args "profiles" (dict $profile (index ($config.profiles | default dict) $profile)) }}
{{- end }}
{{- $picked := dict }}
{{- range $f := $fields.engine_router }}{{ if hasKey $routerSection $f }}{{ $_ := set $picked $f (index $routerSection $f) }}{{ end }}{{ end }}
{{- if $picked }}{{ $_ := set $args "router" $picked }}{{ end }}
{{- $apps = append $apps (dict "name" (printf "%s.%s" $fields.app_name $m.name) "import_path" "serving.app:build_engine_app" "route_prefix" nil "args" $args) }}
{{- end }}
{{- $http := dict "host" "0.0.0.0" "port" (int $router.port) }}
{{- toYaml (dict "proxy_location" .Values.serve.proxyLocation "http_options" $http "applications" $apps) }}
{{- end }}

{{/*
The pod template of a Ray node. Call with (dict "root" $ "group" <head or worker group> "kind" "head"|"worker").
*/}}
{{- define "serving.podTemplate" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- $kind := .kind }}
{{- $v := $root.Values }}
{{- $router := include "serving.routerJson" $root | fromJson }}
{{- $servePort := int $router.port }}
{{- $drain := include "serving.drainSeconds" $root | int }}
{{- $cache := $v.modelCache.mountPath -}}
metadata:
  labels:
    {{- include "serving.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ printf "ray-%s" $kind }}
    {{- if eq $kind "worker" }}
    serving/worker-group: {{ $g.name }}
    {{- end }}
    {{- with $g.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- /* No checksum of the models config here: a models change must stay a serveConfigV2 change,
  applied in place by Ray Serve, not a new cluster. Engines provision models added later themselves. */}}
  {{- with $g.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- /* No API token in the Ray containers (they run models and user code). The head's autoscaler
  sidecar, when on, gets one through its own mount of the sa-token volume (autoscalerOptions). */}}
  automountServiceAccountToken: false
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ add $drain $v.terminationGraceMarginSeconds }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and $g.provisionModels $v.modelCache.provision }}
  initContainers:
    - name: provision-models
      image: {{ include "serving.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command:
        - serving
        - provision
        - /etc/serving/models.yaml
        {{- if $v.huggingface.allowDownload }}
        - --allow-download
        {{- end }}
      env:
        - name: SERVING_CACHE_DIR
          value: {{ $cache | quote }}
        - name: HF_HOME
          value: {{ printf "%s/hf" $cache | quote }}
        - name: HF_HUB_OFFLINE
          value: {{ ternary "0" "1" (and $v.huggingface.allowDownload true) | quote }}
        {{- if $v.huggingface.token.existingSecret }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $v.huggingface.token.existingSecret }}
              key: {{ $v.huggingface.token.key }}
        {{- end }}
        {{- include "serving.writableHomeEnv" $root | nindent 8 }}
      {{- with $v.modelCache.provisionResources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.containerSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: models-config
          mountPath: /etc/serving
          readOnly: true
        - name: model-cache
          mountPath: {{ $cache }}
        - name: tmp
          mountPath: /tmp
  {{- end }}
  containers:
    - name: {{ printf "ray-%s" $kind }}
      image: {{ include "serving.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- /* KubeRay's head Service publishes exactly the head container's ports. The operator finds
      the dashboard there by name; GCS (6379) and Ray Client (10001) are not declared, so the Service
      does not publish them (workers reach GCS by the head's address; the NetworkPolicy decides who may). */}}
      ports:
        {{- if eq $kind "head" }}
        - name: dashboard
          containerPort: 8265
        {{- end }}
        - name: serve
          containerPort: {{ $servePort }}
        - name: metrics
          containerPort: 8080
      env:
        # The pod's own address: head.rayStartParams binds the dashboard to it ($RAY_POD_IP), not 0.0.0.0.
        - name: RAY_POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        {{- include "serving.writableHomeEnv" $root | nindent 8 }}
        - name: SERVING_CACHE_DIR
          value: {{ $cache | quote }}
        - name: HF_HOME
          value: {{ printf "%s/hf" $cache | quote }}
        # Engines provision their model on their own node too (a no-op when the initContainer
        # already did), e.g. for a model added by a later `helm upgrade`.
        - name: HF_HUB_OFFLINE
          value: {{ ternary "0" "1" (and $v.huggingface.allowDownload true) | quote }}
        {{- if $v.huggingface.allowDownload }}
        - name: SERVING_ALLOW_DOWNLOAD
          value: "1"
        {{- end }}
        {{- if $v.huggingface.token.existingSecret }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $v.huggingface.token.existingSecret }}
              key: {{ $v.huggingface.token.key }}
        {{- end }}
        {{- if $v.apiKeys.existingSecret }}
        - name: {{ $router.api_keys_env }}
          valueFrom:
            secretKeyRef:
              name: {{ $v.apiKeys.existingSecret }}
              key: {{ $v.apiKeys.key }}
        {{- end }}
        {{- /* Ray Serve knobs from the models config (router.serve_env): read by every Ray process */}}
        {{- range $name, $value := ($router.serve_env | default dict) }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $g.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- /* KubeRay copies this to the wait-gcs-ready init container it adds to workers. */}}
      {{- with $v.containerSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if eq $kind "worker" }}
      # Ready when the router answers /health through this pod's Serve proxy (200: the router is
      # up and at least one engine is healthy). The head keeps KubeRay's own probes: KubeRay
      # deploys the application only once the head is ready.
      readinessProbe:
        httpGet:
          path: /health
          port: serve
        initialDelaySeconds: 10
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 2
        successThreshold: 1
      {{- end }}
      lifecycle:
        # Drain: while this pod's Serve proxy answers, wait (up to the longest graceful_shutdown_timeout_s
        # of the models config) so requests it
        # already accepted finish before Ray is stopped. Idle pods (no proxy) stop at once.
        preStop:
          exec:
            command:
              - /bin/sh
              - -c
              - >-
                waited=0;
                while [ "$waited" -lt {{ $drain }} ] &&
                python -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:{{ $servePort }}/-/healthz", timeout=2)' >/dev/null 2>&1;
                do sleep 5; waited=$((waited + 5)); done
      volumeMounts:
        - name: models-config
          mountPath: /etc/serving
          readOnly: true
        - name: model-cache
          mountPath: {{ $cache }}
        - name: dshm
          mountPath: /dev/shm
        # Writable scratch on a read-only root: /tmp (and HOME's caches, see serving.writableHomeEnv)
        # and Ray's session dir /tmp/ray, named ray-logs so KubeRay mounts the same one into the autoscaler.
        - name: tmp
          mountPath: /tmp
        - name: ray-logs
          mountPath: /tmp/ray
        {{- if include "serving.keysEnabled" $root }}
        # A directory mount (not subPath), so Secret updates reach the running router.
        - name: api-keys
          mountPath: {{ include "serving.keysDir" $root }}
          readOnly: true
        {{- end }}
  volumes:
    - name: models-config
      configMap:
        name: {{ printf "%s-config" (include "serving.fullname" $root) }}
    - name: model-cache
      {{- if $v.modelCache.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ $v.modelCache.existingClaim }}
      {{- else }}
      emptyDir:
        {{- toYaml ($v.modelCache.emptyDir | default dict) | nindent 8 }}
      {{- end }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $g.shmSize }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $v.scratch.tmpSizeLimit }}
    - name: ray-logs
      emptyDir:
        sizeLimit: {{ $v.scratch.rayLogsSizeLimit }}
    {{- if and (eq $kind "head") $v.autoscaler.enabled }}
    {{- include "serving.saTokenVolume" $root | nindent 4 }}
    {{- end }}
    {{- if include "serving.keysEnabled" $root }}
    - name: api-keys
      secret:
        secretName: {{ $v.keys.existingSecret | default (printf "%s-keys" (include "serving.fullname" $root)) }}
        items:
          - key: {{ ternary $v.keys.key "keys.yaml" (not (empty $v.keys.existingSecret)) }}
            path: keys.yaml
    {{- end }}
{{- end }}

{{/* HOME on the writable /tmp when the root filesystem is read-only: Python tools write caches
under ~ (pip, vLLM's ~/.cache/vllm and ~/.config/vllm, Triton, FlashInfer, CUDA). */}}
{{- define "serving.writableHomeEnv" -}}
{{- if (.Values.containerSecurityContext | default dict).readOnlyRootFilesystem }}
- name: HOME
  value: /tmp
{{- end }}
{{- end }}

{{/* The ServiceAccount token, as Kubernetes would automount it, for the autoscaler sidecar only
(it scales worker pods through the API server); the Ray containers do not mount it. */}}
{{- define "serving.saTokenPath" -}}/var/run/secrets/kubernetes.io/serviceaccount{{- end }}
{{- define "serving.saTokenVolume" -}}
- name: sa-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end }}
