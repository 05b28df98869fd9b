#!/usr/bin/env bash
# Brings up the local stack idempotently: a KRaft Kafka broker from Maven Central
# jars and one Redis per region plus the state Redis. A service already answering
# is left alone; one that does not come up fails with its log tail.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"
STACK="$CACHESYNC_STACK_DIR"
mkdir -p "$STACK/run" "$STACK/log"

log() { printf '[stack] %s\n' "$*"; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_until() { # wait_until SECONDS LOGFILE DESCRIPTION CMD...
  local timeout=$1 logfile=$2 what=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then
      printf '[stack] ERROR: %s did not become ready within %ss. Last lines of %s:\n' "$what" "$timeout" "$logfile" >&2
      tail -n 30 "$logfile" >&2 || true
      exit 1
    fi
    sleep 0.3
  done
}

# ---------------------------------------------------------------- Kafka (KRaft)
kafka_jars() {
  local lib="$STACK/kafka/lib"
  if [[ ! -f "$lib/.complete" ]]; then
    command -v mvn >/dev/null || die "mvn not found: install Maven (make setup does)"
    log "fetching Kafka jars with Maven into $lib"
    mkdir -p "$lib"
    mvn -B -q -f "$HERE/../kafka/pom.xml" dependency:copy-dependencies -DoutputDirectory="$lib" \
      || die "Maven could not fetch the Kafka jars (see output above)"
    touch "$lib/.complete"
  fi
}

start_kafka() {
  local dir="$STACK/kafka" pidf="$STACK/run/kafka.pid" logf="$STACK/log/kafka.log"
  if pid_alive "$pidf" && port_open "$KAFKA_PORT"; then log "kafka already up on 127.0.0.1:$KAFKA_PORT"; return; fi
  if port_open "$KAFKA_PORT"; then die "port $KAFKA_PORT is taken by another process; set KAFKA_PORT"; fi
  kafka_jars
  mkdir -p "$dir/data"
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
message.max.bytes=2097152
log.retention.hours=168
PROPS
  cat > "$dir/log4j2.yaml" <<'L4J'
Configuration:
  Appenders:
    Console: {name: STDOUT, PatternLayout: {Pattern: "[%d] %p %m (%c)%n"}}
  Loggers:
    Root: {level: WARN, AppenderRef: [{ref: STDOUT}]}
    Logger: [{name: kafka.server.KafkaServer, level: INFO}, {name: kafka.server.KafkaRaftServer, level: INFO}]
L4J
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    log "formatting KRaft storage in $dir/data"
    local cid; cid=$(java -cp "$dir/lib/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    java -cp "$dir/lib/*" kafka.tools.StorageTool format -t "$cid" -c "$dir/server.properties" --standalone >>"$logf" 2>&1 \
      || java -cp "$dir/lib/*" kafka.tools.StorageTool format -t "$cid" -c "$dir/server.properties" >>"$logf" 2>&1 \
      || { tail -n 20 "$logf" >&2; die "kafka storage format failed"; }
  fi
  log "starting kafka on 127.0.0.1:$KAFKA_PORT"
  local t0=$SECONDS
  # setsid: the broker must outlive the shell that started it (make, CI step).
  setsid java -Xms256m -Xmx"${KAFKA_HEAP_MB}"m -XX:+UseG1GC \
    -Dlog4j2.configurationFile="$dir/log4j2.yaml" \
    -cp "$dir/lib/*" kafka.Kafka "$dir/server.properties" >>"$logf" 2>&1 < /dev/null &
  echo $! > "$pidf"
  wait_until 120 "$logf" "kafka" kafka_answers
  log "kafka ready in $((SECONDS - t0))s"
}

kafka_answers() {
  pid_alive "$STACK/run/kafka.pid" || return 1
  port_open "$KAFKA_PORT" || return 1
  # A real admin round trip: metadata answers only once the controller has elected itself.
  "$PYTHON" - "$KAFKA_PORT" <<'PY'
import socket, struct, sys
# ApiVersions v0 request: the broker answers it only once its request handlers run.
port = int(sys.argv[1])
req = struct.pack(">hhih", 18, 0, 1, 0)
s = socket.create_connection(("127.0.0.1", port), timeout=2)
s.sendall(struct.pack(">i", len(req)) + req)
size = struct.unpack(">i", s.recv(4))[0]
data = b""
while len(data) < size:
    chunk = s.recv(size - len(data))
    if not chunk:
        sys.exit(1)
    data += chunk
corr, err = struct.unpack(">ih", data[:6])
sys.exit(0 if corr == 1 and err == 0 else 1)
PY
}

# ---------------------------------------------------------------- Redis
start_redis() { # start_redis NAME PORT
  local name=$1 port=$2 pidf="$STACK/run/redis-$1.pid" logf="$STACK/log/redis-$1.log"
  if pid_alive "$pidf" && redis-cli -p "$port" ping >/dev/null 2>&1; then log "redis $name already up on :$port"; return; fi
  command -v redis-server >/dev/null || die "redis-server not found: make setup installs Debian's redis-server"
  if port_open "$port"; then die "port $port for redis $name is taken by another process; set REDIS_PORT_*"; fi
  mkdir -p "$STACK/redis-$name"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir "$STACK/redis-$name" --pidfile "$pidf" --logfile "$logf" --protected-mode yes >/dev/null
  wait_until 20 "$logf" "redis $name" redis-cli -p "$port" ping
  log "redis $name ready on 127.0.0.1:$port"
}

PYTHON="${PYTHON:-python3}"
start_kafka
for inst in $REDIS_INSTANCES; do start_redis "${inst%%:*}" "${inst##*:}"; done
for extra in "$HERE"/up.d/*.sh; do [[ -e "$extra" ]] && source "$extra"; done
log "stack up (state in $STACK)"
