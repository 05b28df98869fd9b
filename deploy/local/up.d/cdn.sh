# Sourced by up.sh: stand-ins for the Cloudflare API (the contract stub) and CloudFront
# (moto in server mode), so `make run` drives every sink. They need the project's
# virtualenv (uvicorn, starlette, moto); without it they are skipped with a note:
# the tests start their own. CLOUDFLARE_STUB_PORT / MOTO_PORT override the ports.
export CLOUDFLARE_STUB_PORT="${CLOUDFLARE_STUB_PORT:-16095}"
export MOTO_PORT="${MOTO_PORT:-16096}"

start_cdn_standins() {
  local venv_python="$REPO_ROOT/.venv/bin/python"
  local pidf="$STACK/run/cdn-standins.pid" logf="$STACK/log/cdn-standins.log" envf="$STACK/cdn.env"
  if [[ ! -x "$venv_python" ]] || ! "$venv_python" -c "import moto, uvicorn" 2>/dev/null; then
    log "CDN stand-ins skipped (no virtualenv with moto yet: make setup)"
    return
  fi
  if pid_alive "$pidf" && [[ -f "$envf" ]] && port_open "$CLOUDFLARE_STUB_PORT"; then
    log "CDN stand-ins already up (Cloudflare stub :$CLOUDFLARE_STUB_PORT, moto :$MOTO_PORT)"
    return
  fi
  for port in "$CLOUDFLARE_STUB_PORT" "$MOTO_PORT"; do
    if port_open "$port"; then die "port $port for the CDN stand-ins is taken; set CLOUDFLARE_STUB_PORT / MOTO_PORT"; fi
  done
  rm -f "$envf"
  # A module of the repository (deploy.local.cdn_standins), so it runs from the root.
  (cd "$REPO_ROOT" && exec setsid "$venv_python" -m deploy.local.cdn_standins \
    "$CLOUDFLARE_STUB_PORT" "$MOTO_PORT" "$envf") >>"$logf" 2>&1 < /dev/null &
  echo $! > "$pidf"
  wait_until 60 "$logf" "CDN stand-ins" bash -c "[[ -f '$envf' ]] && (exec 3<>/dev/tcp/127.0.0.1/$CLOUDFLARE_STUB_PORT)"
  log "CDN stand-ins ready: Cloudflare stub :$CLOUDFLARE_STUB_PORT, moto CloudFront :$MOTO_PORT ($envf)"
}

start_cdn_standins
