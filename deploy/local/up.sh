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
  # The jars are fetched again when the pom changes (its hash is kept in .complete).
  local lib="$STACK/kafka/lib" pom="$HERE/../kafka/pom.xml" want
  want=$(sha256sum "$pom" | cut -d' ' -f1)
  if [[ "$(cat "$lib/.complete" 2>/dev/null)" != "$want" ]]; then
    command -v mvn >/dev/null || die "mvn not found: install Maven (make setup does)"
    log "fetching Kafka jars with Maven into $lib"
    mkdir -p "$lib"
    # Through a fresh folder, adding only jars not there yet: a running broker's jars are
    # never rewritten under it.
    local fetched="$STACK/kafka/lib.fetch"
    rm -rf "$fetched"
    mvn -B -q -f "$pom" dependency:copy-dependencies -DoutputDirectory="$fetched" \
      || die "Maven could not fetch the Kafka jars (see output above)"
    cp -n "$fetched"/*.jar "$lib"/
    rm -rf "$fetched"
    echo "$want" > "$lib/.complete"
  fi
}

# The Kafka version the broker's pom fetches; MirrorMaker 2 is fetched at the same one.
kafka_version() { sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/../kafka/pom.xml"; }

# start_kafka_node NAME NODE_ID PORT CONTROLLER_PORT HEAP_MB LISTENERS [FORMAT_ARG...]
# A single-node KRaft cluster (broker and controller in one JVM) in $STACK/NAME: its
# properties, data in data/, its PID in run/NAME.pid and its log in log/NAME.log.
# LISTENERS holds its listener properties (the CONTROLLER listener on CONTROLLER_PORT is
# added); FORMAT_ARGs go to the storage format (SCRAM users). With KAFKA_NODE_CAFILE set,
# PORT speaks TLS and readiness is checked through it.
start_kafka_node() {
  local name=$1 node_id=$2 port=$3 cport=$4 heap=$5 listeners=$6; shift 6
  local dir="$STACK/$name" pidf="$STACK/run/$name.pid" logf="$STACK/log/$name.log"
  local cafile="${KAFKA_NODE_CAFILE:-}"
  kafka_jars  # also when the node is up: a pom that gained a tool (kafka-tools) fetches it
  if pid_alive "$pidf" && port_open "$port"; then log "$name already up on 127.0.0.1:$port"; return; fi
  if port_open "$port"; then die "port $port for $name is taken by another process; set its *_PORT"; fi
  local lib="$STACK/kafka/lib"
  mkdir -p "$dir/data"
  # Readable by its owner only: a secure node's listeners carry its passwords.
  (umask 077; cat > "$dir/server.properties") <<PROPS
process.roles=broker,controller
node.id=$node_id
controller.quorum.voters=$node_id@127.0.0.1:$cport
$listeners
controller.listener.names=CONTROLLER
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
    local cid; cid=$(java -cp "$lib/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    java -cp "$lib/*" kafka.tools.StorageTool format -t "$cid" -c "$dir/server.properties" --standalone "$@" >>"$logf" 2>&1 \
      || java -cp "$lib/*" kafka.tools.StorageTool format -t "$cid" -c "$dir/server.properties" "$@" >>"$logf" 2>&1 \
      || { tail -n 20 "$logf" >&2; die "$name storage format failed"; }
  fi
  log "starting $name on 127.0.0.1:$port"
  local t0=$SECONDS
  # setsid: the broker must outlive the shell that started it (make, CI step).
  setsid java -Xms"$((heap < 256 ? heap : 256))"m -Xmx"$heap"m -XX:+UseG1GC \
    -Dlog4j2.configurationFile="$dir/log4j2.yaml" \
    -cp "$lib/*" kafka.Kafka "$dir/server.properties" >>"$logf" 2>&1 < /dev/null &
  echo $! > "$pidf"
  wait_until 120 "$logf" "$name" kafka_answers "$pidf" "$port" "$cafile"
  log "$name ready in $((SECONDS - t0))s"
}

start_kafka() {
  start_kafka_node kafka 1 "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_HEAP_MB" "$(plaintext_listeners "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT")"
}

plaintext_listeners() { # plaintext_listeners PORT CONTROLLER_PORT
  cat <<PROPS
listeners=PLAINTEXT://127.0.0.1:$1,CONTROLLER://127.0.0.1:$2
advertised.listeners=PLAINTEXT://127.0.0.1:$1
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
PROPS
}

kafka_answers() { # kafka_answers PIDFILE PORT [CAFILE]
  pid_alive "$1" || return 1
  port_open "$2" || return 1
  # A real admin round trip: metadata answers only once the controller has elected itself.
  # ApiVersions needs no login, so a SASL_SSL listener answers it too (through TLS).
  "$PYTHON" - "$2" "${3:-}" <<'PY'
import socket, ssl, struct, sys
# ApiVersions v0 request: the broker answers it only once its request handlers run.
port, cafile = int(sys.argv[1]), sys.argv[2]
req = struct.pack(">hhih", 18, 0, 1, 0)
s = socket.create_connection(("127.0.0.1", port), timeout=2)
if cafile:
    s = ssl.create_default_context(cafile=cafile).wrap_socket(s, server_hostname="127.0.0.1")
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

# The extras named in CACHESYNC_STACK_EXTRAS (space- or comma-separated) start; the rest
# are left off, so `make run` stays light. `make test` names them all.
extra_enabled() { [[ " ${CACHESYNC_STACK_EXTRAS//,/ } " == *" $1 "* ]]; }

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
