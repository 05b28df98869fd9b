{{/* Names, labels and the list of workloads every other template iterates. */}}

{{- define "cachesync.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cachesync.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "cachesync.releaseLabels" . }}
{{- end -}}

{{/* What a workload's objects add to its selector labels. */}}
{{- define "cachesync.releaseLabels" -}}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cachesync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cachesync.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The topology, parsed; rendering fails when it was not passed or does not parse. */}}
{{- define "cachesync.topology" -}}
{{- if not .Values.topology -}}
{{- fail "topology is empty: pass the topology file with --set-file topology=topology/topology.yaml" -}}
{{- end -}}
{{- $topology := fromYaml .Values.topology -}}
{{- if hasKey $topology "Error" -}}
{{- fail (printf "topology does not parse: %s" $topology.Error) -}}
{{- end -}}
{{- toYaml $topology -}}
{{- end -}}

{{/* An environment variable name for a region's setting: REDIS_URL_ + eu-west -> REDIS_URL_EU_WEST
     (consumers/settings.py region_var). */}}
{{- define "cachesync.regionVar" -}}
{{- printf "%s%s" (index . 0) (index . 1 | replace "-" "_" | upper) -}}
{{- end -}}

{{/*
Every workload: the mapper and one per (region, sink kind), as YAML {items: [...]}, each
with its name, role, region, sink, CLI arguments, Kafka cluster, consumer group (as
Settings.group_id names it), the topics that group reads, and its replica bounds, the
maximum capped at the partition count of those topics (a consumer beyond it would idle).
*/}}
{{- define "cachesync.workloads" -}}
{{- $topology := include "cachesync.topology" . | fromYaml -}}
{{- $fullname := include "cachesync.fullname" . -}}
{{- $prefix := .Values.topicPrefix | default "" -}}
{{- $kinds := list "redis" "cloudflare" "cloudfront" "http_purge" "warmer" -}}
{{- $items := list -}}
{{- if .Values.mapper.enabled -}}
{{- $topics := list -}}
{{- $partitions := 0 -}}
{{- range $topology.topics.content -}}
{{- $topics = append $topics (printf "%s%s" $prefix .name) -}}
{{- $partitions = max $partitions (int .partitions) -}}
{{- end -}}
{{- $max := int (.Values.mapper.maxReplicas | default 0) -}}
{{- if or (le $max 0) (gt $max $partitions) -}}{{- $max = $partitions -}}{{- end -}}
{{- $items = append $items (dict
    "name" (printf "%s-mapper" $fullname)
    "role" "mapper" "region" "" "sink" ""
    "args" (list "run" "mapper")
    "bootstrapServers" .Values.kafka.bootstrapServers
    "group" (printf "%s.mapper" .Values.groupPrefix)
    "topics" $topics
    "minReplicas" (int .Values.mapper.minReplicas)
    "maxReplicas" $max
    "lagThreshold" (int .Values.mapper.lagThreshold)
    "resources" .Values.mapper.resources) -}}
{{- end -}}
{{- $commands := $topology.topics.commands -}}
{{- range $region := .Values.regions -}}
{{- if not (hasKey $topology.regions $region.name) -}}
{{- fail (printf "regions: %q is not a region of the topology (it has %s)" $region.name (keys $topology.regions | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $spec := get $topology.regions $region.name -}}
{{- range $kind := $region.sinks -}}
{{- if not (has $kind $kinds) -}}
{{- fail (printf "regions.%s.sinks: unknown sink %q (known: %s)" $region.name $kind (join ", " $kinds)) -}}
{{- end -}}
{{- if and (eq $kind "cloudflare") (not (or $region.cloudflareZone $spec.cloudflare_zone)) -}}
{{- fail (printf "regions.%s: the cloudflare sink needs cloudflareZone (or cloudflare_zone in the topology)" $region.name) -}}
{{- end -}}
{{- if and (eq $kind "cloudfront") (not (or $region.cloudfrontDistribution $spec.cloudfront_distribution)) -}}
{{- fail (printf "regions.%s: the cloudfront sink needs cloudfrontDistribution (or cloudfront_distribution in the topology)" $region.name) -}}
{{- end -}}
{{- $partitions := int $commands.partitions -}}
{{- $max := int ($region.maxReplicas | default $.Values.sinkDefaults.maxReplicas | default 0) -}}
{{- if or (le $max 0) (gt $max $partitions) -}}{{- $max = $partitions -}}{{- end -}}
{{- $items = append $items (dict
    "name" (printf "%s-sink-%s-%s" $fullname $region.name ($kind | replace "_" "-"))
    "role" "sink" "region" $region.name "sink" $kind
    "args" (list "run" "sink" "--region" $region.name "--sink" $kind)
    "bootstrapServers" ($region.kafkaBootstrapServers | default $.Values.kafka.bootstrapServers)
    "group" (printf "%s.sink.%s.%s" $.Values.groupPrefix $region.name $kind)
    "topics" (list (printf "%s%s" $prefix (replace "{region}" $region.name $commands.name)))
    "minReplicas" (int ($region.minReplicas | default $.Values.sinkDefaults.minReplicas))
    "maxReplicas" $max
    "lagThreshold" (int ($region.lagThreshold | default $.Values.sinkDefaults.lagThreshold))
    "resources" ($region.resources | default $.Values.sinkDefaults.resources)
    "regionValues" $region) -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "items" $items) -}}
{{- end -}}

{{- define "cachesync.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .workload.role }}
{{- if .workload.region }}
cachesync/region: {{ .workload.region }}
cachesync/sink: {{ .workload.sink | replace "_" "-" }}
{{- end }}
{{- end -}}
