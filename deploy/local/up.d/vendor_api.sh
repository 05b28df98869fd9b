# Sourced by up.sh: a stand-in for the external vendor APIs (deploy/local/standins/vendor_api.py),
# so that `cachesync vendor-api get ...` answers locally: the topology's vendor_apis point at
# it. It needs the project's virtualenv (uvicorn, starlette); without it it is skipped with
# a note. Its port follows ORIGIN_PORT, so a stack on offset ports (bench/chaos, +1000)
# gets one of its own; VENDOR_API_PORT overrides (the topology names 16098).
export VENDOR_API_PORT="${VENDOR_API_PORT:-$(( ${ORIGIN_PORT:-16090} + 8 ))}"

vendor_api_answers() {
  "$1" - "$VENDOR_API_PORT" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/_health", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

start_vendor_api() {
  local venv_python="$REPO_ROOT/.venv/bin/python"
  local pidf="$STACK/run/vendor-api.pid" logf="$STACK/log/vendor-api.log"
  if [[ ! -x "$venv_python" ]] || ! "$venv_python" -c "import starlette, uvicorn" 2>/dev/null; then
    log "vendor API stand-in skipped (no virtualenv with uvicorn yet: make setup)"
    return
  fi
  if pid_alive "$pidf" && vendor_api_answers "$venv_python"; then
    log "vendor API stand-in already up on :$VENDOR_API_PORT"
    return
  fi
  if port_open "$VENDOR_API_PORT"; then die "port $VENDOR_API_PORT for the vendor API stand-in is taken; set VENDOR_API_PORT"; fi
  # A module of the repository (deploy.local.standins.vendor_api), so it runs from the root.
  (cd "$REPO_ROOT" && exec setsid "$venv_python" -m deploy.local.standins.vendor_api "$VENDOR_API_PORT") \
    >>"$logf" 2>&1 < /dev/null &
  echo $! > "$pidf"
  wait_until 30 "$logf" "vendor API stand-in" vendor_api_answers "$venv_python"
  log "vendor API stand-in ready on 127.0.0.1:$VENDOR_API_PORT"
}

start_vendor_api
