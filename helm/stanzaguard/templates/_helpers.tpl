{{/*
Names, labels, the image, the settings passed as STANZAGUARD_* variables, and the checks of
combinations that values.schema.json cannot express.
*/}}

{{- define "stanzaguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stanzaguard.fullname" -}}
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

{{- define "stanzaguard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "stanzaguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stanzaguard
{{- end }}

{{/* Selector labels of one component: pass (dict "root" $ "component" "proxy"). */}}
{{- define "stanzaguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stanzaguard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "stanzaguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stanzaguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stanzaguard.image" -}}
{{- $image := .Values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "stanzaguard.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "stanzaguard.fullname" .)) .Values.proxy.tls.secretName }}
{{- end }}

{{/* Where things are inside the containers. */}}
{{- define "stanzaguard.dataDir" -}}/var/lib/stanzaguard{{- end }}
{{- define "stanzaguard.configDir" -}}/etc/stanzaguard/config{{- end }}
{{- define "stanzaguard.tlsDir" -}}/etc/stanzaguard/tls{{- end }}
{{- define "stanzaguard.esCaDir" -}}/etc/stanzaguard/es-ca{{- end }}

{{/* True (non-empty) when the API is served beside the proxy, inside the proxy pod. */}}
{{- define "stanzaguard.apiBesideProxy" -}}
{{- if and .Values.api.enabled (eq .Values.store "sqlite") }}true{{- end }}
{{- end }}

{{/* True (non-empty) when the API runs as a Deployment of its own. */}}
{{- define "stanzaguard.apiDeployment" -}}
{{- if and .Values.api.enabled (eq .Values.store "elasticsearch") }}true{{- end }}
{{- end }}

{{/*
Every setting of stanzaguard.settings.Settings (tests/helm/test_chart.py checks this list
against Settings.model_fields): a key of `settings:` outside it is refused, because the program
ignores environment variables it does not know and a typo would pass unnoticed.
*/}}
{{- define "stanzaguard.knownSettings" -}}
environment domain upstream upstream_tls upstream_ca_file cert key listen listen_tls
allow_plaintext data_dir policy keep_evidence evidence_dir fail_open spool_segment_bytes
spool_max_bytes checkpoint_every chain_name retention_file retention_interval retention_purge store es_url
es_index_prefix es_api_key es_username es_password es_ca_file index_worker indexing counters
index_worker_priority index_worker_boost_backlog index_worker_batch_interval event_loop
redis_url index_task_timeout worker_concurrency upload_hosts attachment_max_bytes
attachment_timeout attachment_retries attachment_allow_http max_stanza_bytes max_depth
max_attributes auth_timeout idle_timeout stanza_timeout tls_buffer_bytes max_sessions
metrics_listen rtbl_jid rtbl_password rtbl_server rtbl_tls rtbl_ca_file rtbl_nodes
blocklist_files model api_listen session_secret session_max_age log_level log_format
listen_websocket listen_bosh web_tls bosh_max_wait bosh_inactivity
audit_checkpoint_interval blocklist_domain_listed_jids blocklist_downloads blocklist_http
blocklist_http_plain_jids blocklist_jid_officer_spam blocklist_jid_report_weight
blocklist_learning blocklist_refresh_interval blocklist_review component_admins
component_chain_name component_jid component_secret component_server ibb_archive_max_bytes
policy_sync retrain_activate retrain_base retrain_folds retrain_interval rtbl_publish_ca_file
rtbl_publish_domain_nodes rtbl_publish_jid rtbl_publish_jid_nodes rtbl_publish_password
rtbl_publish_server rtbl_publish_service rtbl_publish_tls sm_resume_timeout sm_store
seen_ledger seen_ledger_ttl review_queue counters_flush_interval
{{- end }}

{{/* Settings the chart sets itself from its own values (or from the Secret). */}}
{{- define "stanzaguard.managedSettings" -}}
environment domain upstream upstream_tls cert key listen listen_tls data_dir policy
retention_file store es_url es_index_prefix es_api_key es_username es_password es_ca_file
indexing counters redis_url worker_concurrency metrics_listen api_listen session_secret
rtbl_password log_level chain_name listen_websocket listen_bosh
component_secret rtbl_publish_password
component_jid component_server component_admins component_chain_name ibb_archive_max_bytes
blocklist_learning blocklist_review blocklist_http blocklist_http_plain_jids
rtbl_publish_service rtbl_publish_jid rtbl_publish_server rtbl_publish_tls
{{- end }}

{{/* One value of `settings:` as environment text: lists comma-joined, whole numbers exact. */}}
{{- define "stanzaguard.settingText" -}}
{{- $value := . }}
{{- if kindIs "slice" $value }}
{{- $parts := list }}
{{- range $value }}{{ $parts = append $parts (include "stanzaguard.settingText" .) }}{{ end }}
{{- join "," $parts }}
{{- else if kindIs "float64" $value }}
{{- if eq ($value | int64 | float64) $value }}{{ $value | int64 }}{{ else }}{{ $value }}{{ end }}
{{- else if kindIs "invalid" $value }}
{{- else }}
{{- $value }}
{{- end }}
{{- end }}

{{/* A variable from a key of the user's Secret: pass (dict "root" $ "env" NAME "key" KEY). */}}
{{- define "stanzaguard.secretEnv" -}}
{{- if .key }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.secrets.existingSecret | quote }}
      key: {{ .key | quote }}
{{- end }}
{{- end }}

{{/* Settings every component shares: archive store, Redis, logging, data directory. */}}
{{- define "stanzaguard.commonEnv" -}}
{{- $v := .Values }}
- name: STANZAGUARD_ENVIRONMENT
  value: {{ $v.environment | quote }}
- name: STANZAGUARD_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
- name: STANZAGUARD_DATA_DIR
  value: {{ include "stanzaguard.dataDir" . | quote }}
- name: STANZAGUARD_DOMAIN
  value: {{ join "," $v.xmpp.domains | quote }}
- name: STANZAGUARD_STORE
  value: {{ $v.store | quote }}
{{- if eq $v.store "elasticsearch" }}
- name: STANZAGUARD_ES_URL
  value: {{ join "," $v.elasticsearch.urls | quote }}
- name: STANZAGUARD_ES_INDEX_PREFIX
  value: {{ $v.elasticsearch.indexPrefix | quote }}
{{- if $v.elasticsearch.caSecret.name }}
- name: STANZAGUARD_ES_CA_FILE
  value: {{ printf "%s/%s" (include "stanzaguard.esCaDir" .) $v.elasticsearch.caSecret.key | quote }}
{{- end }}
{{- include "stanzaguard.secretEnv" (dict "root" . "env" "STANZAGUARD_ES_API_KEY" "key" $v.secrets.keys.esApiKey) }}
{{- include "stanzaguard.secretEnv" (dict "root" . "env" "STANZAGUARD_ES_USERNAME" "key" $v.secrets.keys.esUsername) }}
{{- include "stanzaguard.secretEnv" (dict "root" . "env" "STANZAGUARD_ES_PASSWORD" "key" $v.secrets.keys.esPassword) }}
{{- end }}
- name: STANZAGUARD_INDEXING
  value: {{ $v.indexing | quote }}
- name: STANZAGUARD_COUNTERS
  value: {{ $v.counters | quote }}
{{- if $v.secrets.keys.redisUrl }}
{{- include "stanzaguard.secretEnv" (dict "root" . "env" "STANZAGUARD_REDIS_URL" "key" $v.secrets.keys.redisUrl) }}
{{- else if $v.redis.url }}
- name: STANZAGUARD_REDIS_URL
  value: {{ $v.redis.url | quote }}
{{- end }}
{{- range $name := keys $v.settings | sortAlpha }}
- name: {{ printf "STANZAGUARD_%s" (upper $name) }}
  value: {{ include "stanzaguard.settingText" (get $v.settings $name) | quote }}
{{- end }}
# Python and its libraries may want a writable home (the root filesystem is read-only).
- name: HOME
  value: /tmp
{{- end }}

{{/* The policy file: the ConfigMap, mounted as a directory so updates show. */}}
{{- define "stanzaguard.configEnv" -}}
{{- if .Values.policy.enabled }}
- name: STANZAGUARD_POLICY
  value: {{ printf "%s/policy.toml" (include "stanzaguard.configDir" .) | quote }}
{{- end }}
{{- end }}

{{/*
Where the retention rounds run, on whichever store: with indexing=celery beat schedules them
and a worker runs each one; otherwise the proxy runs its own retention job. Only there is
retention_file set, so no round runs twice.
*/}}
{{- define "stanzaguard.retentionInCelery" -}}
{{- if and .Values.retention.enabled (eq .Values.indexing "celery") }}true{{- end }}
{{- end }}

{{- define "stanzaguard.retentionInProxy" -}}
{{- if and .Values.retention.enabled (ne .Values.indexing "celery") }}true{{- end }}
{{- end }}

{{/* retention_file from the same ConfigMap. */}}
{{- define "stanzaguard.retentionEnv" }}
- name: STANZAGUARD_RETENTION_FILE
  value: {{ printf "%s/retention.toml" (include "stanzaguard.configDir" .) | quote }}
{{- end }}

{{/* Beat's and the workers' environment: the store, and the retention round's files (its
rules may name the policy's groups). */}}
{{- define "stanzaguard.celeryEnv" -}}
{{- include "stanzaguard.commonEnv" . }}
{{- if include "stanzaguard.retentionInCelery" . }}
{{- include "stanzaguard.configEnv" . }}
{{- include "stanzaguard.retentionEnv" . }}
{{- end }}
{{- end }}

{{- define "stanzaguard.hasConfigMap" -}}
{{- if or .Values.policy.enabled .Values.retention.enabled }}true{{- end }}
{{- end }}

{{/* Volumes every pod has: /tmp, and the Elasticsearch CA when given. */}}
{{- define "stanzaguard.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if and (eq .Values.store "elasticsearch") .Values.elasticsearch.caSecret.name }}
- name: es-ca
  secret:
    secretName: {{ .Values.elasticsearch.caSecret.name | quote }}
{{- end }}
{{- end }}

{{- define "stanzaguard.commonMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and (eq .Values.store "elasticsearch") .Values.elasticsearch.caSecret.name }}
- name: es-ca
  mountPath: {{ include "stanzaguard.esCaDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Combinations the schema cannot check. Each message names the value to change and why, so a
refused install says what to do.
*/}}
{{- define "stanzaguard.validate" -}}
{{- $v := .Values }}
{{- if and (eq $v.indexing "celery") (ne $v.store "elasticsearch") }}
{{- fail "indexing=celery needs store=elasticsearch: Celery workers are stateless and write to a shared archive; with store=sqlite each worker would keep its own file" }}
{{- end }}
{{- if and (eq $v.store "elasticsearch") (not $v.elasticsearch.urls) }}
{{- fail "store=elasticsearch needs elasticsearch.urls (https://HOST:PORT of an existing cluster)" }}
{{- end }}
{{- $redisNeeded := or (eq $v.indexing "celery") (eq $v.counters "redis") }}
{{- $redisGiven := or $v.redis.url $v.secrets.keys.redisUrl }}
{{- if and $redisNeeded (not $redisGiven) }}
{{- fail "indexing=celery and counters=redis need Redis: set redis.url, or secrets.existingSecret and secrets.keys.redisUrl" }}
{{- end }}
{{- range $name := list "sm_store" "seen_ledger" "policy_sync" "review_queue" }}
{{- if and (eq (toString (get $v.settings $name)) "redis") (not $redisGiven) }}
{{- fail (printf "settings.%s=redis needs Redis: set redis.url, or secrets.existingSecret and secrets.keys.redisUrl" $name) }}
{{- end }}
{{- end }}
{{- if and $v.redis.url $v.secrets.keys.redisUrl }}
{{- fail "give the Redis URL once: redis.url or secrets.keys.redisUrl, not both" }}
{{- end }}
{{- if contains "@" $v.redis.url }}
{{- fail "redis.url must not hold a password: put the whole URL in the Secret (secrets.keys.redisUrl)" }}
{{- end }}
{{- $secretKeys := list }}
{{- range $field, $key := $v.secrets.keys }}{{ if $key }}{{ $secretKeys = append $secretKeys $field }}{{ end }}{{ end }}
{{- if and $secretKeys (not $v.secrets.existingSecret) }}
{{- fail (printf "secrets.keys.%s is set but secrets.existingSecret (the Secret's name) is empty" (first (sortAlpha $secretKeys))) }}
{{- end }}
{{- if ne (empty $v.secrets.keys.esUsername) (empty $v.secrets.keys.esPassword) }}
{{- fail "secrets.keys.esUsername and secrets.keys.esPassword: give both or neither" }}
{{- end }}
{{- if and $v.secrets.keys.esApiKey $v.secrets.keys.esUsername }}
{{- fail "secrets.keys.esApiKey and secrets.keys.esUsername: an API key or a user, not both" }}
{{- end }}
{{- if and (gt (int $v.proxy.replicas) 1) (eq $v.store "sqlite") }}
{{- fail "proxy.replicas > 1 needs store=elasticsearch: with store=sqlite every replica would keep a separate archive on its own volume" }}
{{- end }}
{{- if and (gt (int $v.proxy.replicas) 1) $v.proxy.chainName }}
{{- fail "proxy.chainName names one hash chain, and every replica needs its own: leave it empty with proxy.replicas > 1 (each replica's chain is then its pod name)" }}
{{- end }}
{{- if and (include "stanzaguard.retentionInProxy" .) (gt (int $v.proxy.replicas) 1) }}
{{- fail "retention.enabled with proxy.replicas > 1 needs indexing=celery: with indexing=process every proxy replica would run its own retention rounds on the one archive; with indexing=celery beat schedules one round at a time for the workers" }}
{{- end }}
{{- if and $v.retention.enabled (not $v.retention.content) }}
{{- fail "retention.enabled needs retention.content (the [retention] section, docs/retention.md)" }}
{{- end }}
{{- if and $v.policy.enabled (not $v.policy.content) }}
{{- fail "policy.enabled needs policy.content (docs/policy.md), or policy.enabled=false for the built-in allow-all policy" }}
{{- end }}
{{- if $v.component.enabled }}
{{- if not $v.component.jid }}
{{- fail "component.enabled needs component.jid (the component's domain, as in the XMPP server's Component section)" }}
{{- end }}
{{- if not $v.secrets.keys.componentSecret }}
{{- fail "component.enabled needs the component's shared secret: secrets.existingSecret and secrets.keys.componentSecret" }}
{{- end }}
{{- end }}
{{- $pubsub := $v.rtblPublishing.pubsub }}
{{- if and $pubsub.service (not $v.rtblPublishing.enabled) }}
{{- fail "rtblPublishing.pubsub.service needs rtblPublishing.enabled=true (the list is what learning builds)" }}
{{- end }}
{{- if and $pubsub.service (or (not $pubsub.jid) (not $v.secrets.keys.rtblPublishPassword)) }}
{{- fail "rtblPublishing.pubsub.service needs rtblPublishing.pubsub.jid and its password: secrets.existingSecret and secrets.keys.rtblPublishPassword" }}
{{- end }}
{{- if and (eq $pubsub.tls "plain") (ne $v.environment "development") }}
{{- fail "rtblPublishing.pubsub.tls=plain is refused outside environment=development" }}
{{- end }}
{{- if and (eq $v.rtblPublishing.publisher "component") (not $v.component.enabled) }}
{{- fail "rtblPublishing.publisher=component needs component.enabled=true" }}
{{- end }}
{{- if eq $v.image.tag "latest" }}
{{- fail "image.tag=latest is refused: pin a version (or image.digest) so a restarted proxy runs the code it ran before" }}
{{- end }}
{{- $known := splitList " " (include "stanzaguard.knownSettings" . | replace "\n" " ") }}
{{- $managed := splitList " " (include "stanzaguard.managedSettings" . | replace "\n" " ") }}
{{- range $name, $value := $v.settings }}
{{- if not (has $name $known) }}
{{- fail (printf "settings.%s: no such setting (docs/configuration.md lists them)" $name) }}
{{- end }}
{{- if has $name $managed }}
{{- fail (printf "settings.%s: the chart sets this one from its own values (see values.yaml); secrets come from secrets.existingSecret" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The published block list (docs/rtbl-publishing.md): learning, review, the HTTP lists.
Every process that learns from reports or serves the API gets it. */}}
{{- define "stanzaguard.blocklistEnv" -}}
{{- $b := .Values.rtblPublishing }}
- name: STANZAGUARD_BLOCKLIST_LEARNING
  value: {{ $b.enabled | quote }}
{{- if $b.enabled }}
- name: STANZAGUARD_BLOCKLIST_REVIEW
  value: {{ $b.review | quote }}
- name: STANZAGUARD_BLOCKLIST_HTTP
  value: {{ $b.http | quote }}
- name: STANZAGUARD_BLOCKLIST_HTTP_PLAIN_JIDS
  value: {{ $b.httpPlainJids | quote }}
{{- end }}
{{- end }}

{{/* The pubsub publisher's settings: for the one process that publishes
(rtblPublishing.publisher), never two (they would retract each other's items). */}}
{{- define "stanzaguard.publishEnv" -}}
{{- $p := .Values.rtblPublishing.pubsub }}
{{- if and .Values.rtblPublishing.enabled $p.service }}
- name: STANZAGUARD_RTBL_PUBLISH_SERVICE
  value: {{ $p.service | quote }}
- name: STANZAGUARD_RTBL_PUBLISH_JID
  value: {{ $p.jid | quote }}
{{- if $p.server }}
- name: STANZAGUARD_RTBL_PUBLISH_SERVER
  value: {{ $p.server | quote }}
{{- end }}
- name: STANZAGUARD_RTBL_PUBLISH_TLS
  value: {{ $p.tls | quote }}
{{- include "stanzaguard.secretEnv" (dict "root" . "env" "STANZAGUARD_RTBL_PUBLISH_PASSWORD" "key" .Values.secrets.keys.rtblPublishPassword) }}
{{- end }}
{{- end }}

{{/* What the stanza pipeline of the proxy and of the component shares. */}}
{{- define "stanzaguard.pipelineEnv" }}
- name: STANZAGUARD_IBB_ARCHIVE_MAX_BYTES
  value: {{ .Values.ibbArchiveMaxBytes | int64 | quote }}
{{- include "stanzaguard.blocklistEnv" . }}
{{- end }}

{{/* The component's environment (`stanzaguard component`, docs/integrations/component.md). */}}
{{- define "stanzaguard.componentEnv" -}}
{{- $c := .Values.component }}
{{- include "stanzaguard.commonEnv" . }}
{{- include "stanzaguard.configEnv" . }}
{{- include "stanzaguard.pipelineEnv" . }}
- name: STANZAGUARD_COMPONENT_JID
  value: {{ $c.jid | quote }}
- name: STANZAGUARD_COMPONENT_SERVER
  value: {{ $c.server | quote }}
- name: STANZAGUARD_COMPONENT_ADMINS
  value: {{ join "," $c.admins | quote }}
- name: STANZAGUARD_COMPONENT_CHAIN_NAME
  value: {{ $c.chainName | quote }}
- name: STANZAGUARD_METRICS_LISTEN
  value: {{ printf "0.0.0.0:%d" (int $c.metricsPort) | quote }}
{{- include "stanzaguard.secretEnv" (dict "root" . "env" "STANZAGUARD_COMPONENT_SECRET" "key" .Values.secrets.keys.componentSecret) }}
{{- if eq .Values.rtblPublishing.publisher "component" }}
{{- include "stanzaguard.publishEnv" . }}
{{- end }}
{{- end }}

{{/* The proxy's environment. */}}
{{- define "stanzaguard.proxyEnv" -}}
{{- include "stanzaguard.commonEnv" . }}
{{- include "stanzaguard.configEnv" . }}
- name: STANZAGUARD_UPSTREAM
  value: {{ .Values.xmpp.upstream | quote }}
- name: STANZAGUARD_UPSTREAM_TLS
  value: {{ .Values.xmpp.upstreamTls | quote }}
- name: STANZAGUARD_CERT
  value: {{ printf "%s/tls.crt" (include "stanzaguard.tlsDir" .) | quote }}
- name: STANZAGUARD_KEY
  value: {{ printf "%s/tls.key" (include "stanzaguard.tlsDir" .) | quote }}
{{- if include "stanzaguard.retentionInProxy" . }}
{{- include "stanzaguard.retentionEnv" . }}
{{- end }}
- name: STANZAGUARD_LISTEN
  value: {{ printf "0.0.0.0:%d" (int .Values.proxy.ports.c2s) | quote }}
- name: STANZAGUARD_LISTEN_TLS
  value: {{ printf "0.0.0.0:%d" (int .Values.proxy.ports.c2sTls) | quote }}
- name: STANZAGUARD_LISTEN_WEBSOCKET
{{- if .Values.proxy.web.websocket.enabled }}
  value: {{ printf "0.0.0.0:%d" (int .Values.proxy.web.websocket.port) | quote }}
{{- else }}
  value: "off"
{{- end }}
- name: STANZAGUARD_LISTEN_BOSH
{{- if .Values.proxy.web.bosh.enabled }}
  value: {{ printf "0.0.0.0:%d" (int .Values.proxy.web.bosh.port) | quote }}
{{- else }}
  value: "off"
{{- end }}
- name: STANZAGUARD_METRICS_LISTEN
  value: {{ printf "0.0.0.0:%d" (int .Values.proxy.ports.metrics) | quote }}
- name: STANZAGUARD_API_LISTEN
{{- if include "stanzaguard.apiBesideProxy" . }}
  value: {{ printf "0.0.0.0:%d" (int .Values.api.port) | quote }}
{{- else }}
  value: "off"
{{- end }}
{{- /* Each replica's spool is its own hash chain in the shared store: the pod's name
(stable per ordinal, as its volume is) unless one name is pinned for a single replica. */}}
- name: STANZAGUARD_CHAIN_NAME
{{- if .Values.proxy.chainName }}
  value: {{ .Values.proxy.chainName | quote }}
{{- else }}
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
{{- include "stanzaguard.secretEnv" (dict "root" . "env" "STANZAGUARD_SESSION_SECRET" "key" .Values.secrets.keys.sessionSecret) }}
{{- include "stanzaguard.secretEnv" (dict "root" . "env" "STANZAGUARD_RTBL_PASSWORD" "key" .Values.secrets.keys.rtblPassword) }}
{{- include "stanzaguard.pipelineEnv" . }}
{{- if eq .Values.rtblPublishing.publisher "proxy" }}
{{- include "stanzaguard.publishEnv" . }}
{{- end }}
{{- end }}

{{/* The API Deployment's environment (store=elasticsearch: the archive, audit log, tokens and
holds are all in the cluster). */}}
{{- define "stanzaguard.apiEnv" -}}
{{- include "stanzaguard.commonEnv" . }}
{{- include "stanzaguard.configEnv" . }}
- name: STANZAGUARD_API_LISTEN
  value: {{ printf "0.0.0.0:%d" (int .Values.api.port) | quote }}
{{- include "stanzaguard.secretEnv" (dict "root" . "env" "STANZAGUARD_SESSION_SECRET" "key" .Values.secrets.keys.sessionSecret) }}
{{- include "stanzaguard.blocklistEnv" . }}
{{- end }}

{{/* A Celery worker's environment. */}}
{{- define "stanzaguard.workerEnv" -}}
{{- include "stanzaguard.celeryEnv" . }}
- name: STANZAGUARD_WORKER_CONCURRENCY
  value: {{ .Values.worker.concurrency | quote }}
{{- end }}
