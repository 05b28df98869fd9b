#!/usr/bin/env bash
# Tears the local stack down by its PID files (never by process name, so nothing
# else on the machine is touched). Data stays in $CACHESYNC_STACK_DIR unless --wipe.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"
RUN="$CACHESYNC_STACK_DIR/run"
shopt -s nullglob
# MirrorMaker 2 first: it waits on its brokers to stop cleanly.
for pidf in "$RUN"/mm2.pid "$RUN"/*.pid; do
  pid=$(cat "$pidf" 2>/dev/null || true)
  name=$(basename "$pidf" .pid)
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null; echo "[stack] $name killed"; else echo "[stack] $name stopped"; fi
  fi
  rm -f "$pidf"
done
if [[ "${1:-}" == "--wipe" ]]; then rm -rf "$CACHESYNC_STACK_DIR"/kafka/data "$CACHESYNC_STACK_DIR"/kafka-*/data "$CACHESYNC_STACK_DIR"/redis-*; echo "[stack] data wiped"; fi
