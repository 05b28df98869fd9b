# Sourced by up.sh when CACHESYNC_STACK_EXTRAS names "two-clusters": the production shape
# of deploy/PRODUCTION.md on one machine, for eu-west.
#   - eu-west's own cluster: a KRaft broker (node 2, $STACK/kafka-eu-west) on
#     KAFKA_EU_WEST_PORT, from the same jars as the home broker;
#   - MirrorMaker 2 (connect-mirror and connect-runtime at the brokers' Kafka version,
#     fetched with Maven into $STACK/mm2/lib), run with deploy/mm2/mm2.properties plus the
#     local addresses below: it carries cache.commands.eu-west home -> eu-west and
#     cache.audit (and cache.dlq) eu-west -> home, names kept (IdentityReplicationPolicy).
# eu-west's sinks read eu-west's cluster when KAFKA_BOOTSTRAP_SERVERS_EU_WEST points at it;
# $STACK/two-clusters.env says so.

mm2_jars() {
  local lib="$STACK/mm2/lib" pom="$HERE/../mm2/pom.xml" version want
  version=$(kafka_version)
  want="$version $(sha256sum "$pom" | cut -d' ' -f1)"
  if [[ "$(cat "$lib/.complete" 2>/dev/null)" != "$want" ]]; then
    command -v mvn >/dev/null || die "mvn not found: install Maven (make setup does)"
    log "fetching MirrorMaker 2 (Kafka $version) with Maven into $lib"
    rm -rf "$lib" && mkdir -p "$lib"
    mvn -B -q -f "$pom" -Dkafka.version="$version" dependency:copy-dependencies -DoutputDirectory="$lib" \
      || die "Maven could not fetch MirrorMaker 2 (see output above)"
    echo "$want" > "$lib/.complete"
  fi
}

mm2_running() { pid_alive "$STACK/run/mm2.pid"; }

start_mm2() {
  local dir="$STACK/mm2" pidf="$STACK/run/mm2.pid" logf="$STACK/log/mm2.log"
  if mm2_running; then log "mirrormaker2 already up"; return; fi
  mm2_jars
  # The production file, then what differs here: two clusters on loopback, one broker
  # each, and a short topic refresh (tests make topics and wait for their mirror).
  # java.util.Properties keeps the last value of a key, so these override the file's.
  cat "$HERE/../mm2/mm2.properties" - > "$dir/mm2.properties" <<PROPS

# ---- deploy/local/up.d/two-clusters.sh: the local stack's overrides
clusters = home, eu_west
home.bootstrap.servers = 127.0.0.1:$KAFKA_PORT
eu_west.bootstrap.servers = 127.0.0.1:$KAFKA_EU_WEST_PORT
home->ap_southeast.enabled = false
ap_southeast->home.enabled = false
# The local cluster holds every test run's and benchmark's topics (CACHESYNC_TOPIC_PREFIX):
# only the topology's own names and those of a prefix starting "mm2-" (the two-cluster
# tests') are mirrored, so MirrorMaker 2 does not copy the whole machine's traffic.
home->eu_west.topics = (mm2-[^.]+\\.)?cache\\.commands\\.eu-west
eu_west->home.topics = (mm2-[^.]+\\.)?cache\\.audit, (mm2-[^.]+\\.)?cache\\.dlq
replication.factor = 1
checkpoints.topic.replication.factor = 1
heartbeats.topic.replication.factor = 1
offset-syncs.topic.replication.factor = 1
offset.storage.replication.factor = 1
status.storage.replication.factor = 1
config.storage.replication.factor = 1
refresh.topics.interval.seconds = 5
# Every plugin jar declares itself: no classpath scan at start.
plugin.discovery = service_load
PROPS
  # Properties, not YAML: the Connect runtime's jars bring no YAML parser.
  cat > "$dir/log4j2.properties" <<'L4J'
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger = WARN, STDOUT
logger.mm2.name = org.apache.kafka.connect.mirror.MirrorMaker
logger.mm2.level = INFO
logger.herder.name = org.apache.kafka.connect.runtime.distributed.DistributedHerder
logger.herder.level = INFO
logger.worker.name = org.apache.kafka.connect.runtime.Worker
logger.worker.level = INFO
L4J
  log "starting mirrormaker2 (home :$KAFKA_PORT <-> eu_west :$KAFKA_EU_WEST_PORT)"
  local t0=$SECONDS
  [[ -f "$logf" ]] && mv "$logf" "$logf.1"  # readiness is read from this run's log alone
  setsid java -Xms128m -Xmx"$KAFKA_EXTRA_HEAP_MB"m -XX:+UseG1GC \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -cp "$dir/lib/*" org.apache.kafka.connect.mirror.MirrorMaker "$dir/mm2.properties" \
    >>"$logf" 2>&1 < /dev/null &
  echo $! > "$pidf"
  wait_until 120 "$logf" "mirrormaker2" mm2_started "$logf"
  log "mirrormaker2 ready in $((SECONDS - t0))s"
}

mm2_started() { mm2_running && grep -q "Kafka MirrorMaker started" "$1"; }

start_two_clusters() {
  mkdir -p "$STACK/mm2"
  start_kafka_node kafka-eu-west 2 "$KAFKA_EU_WEST_PORT" "$KAFKA_EU_WEST_CONTROLLER_PORT" \
    "$KAFKA_EXTRA_HEAP_MB" "$(plaintext_listeners "$KAFKA_EU_WEST_PORT" "$KAFKA_EU_WEST_CONTROLLER_PORT")"
  start_mm2
  echo "KAFKA_BOOTSTRAP_SERVERS_EU_WEST=127.0.0.1:$KAFKA_EU_WEST_PORT" > "$STACK/two-clusters.env"
}

if extra_enabled two-clusters; then start_two_clusters; fi
