# Sourced by up.sh: the local HTTP edge, Varnish 7.1 with vmod xkey, in front of a tiny
# origin (deploy/local/standins/origin.py) whose pages carry surrogate keys. Its own -n and
# port, so a stock varnish service on 6081 is never touched; PID files in run/ so
# down.sh stops both. VARNISH_PORT / ORIGIN_PORT override the ports.
export VARNISH_PORT="${VARNISH_PORT:-16081}"
export ORIGIN_PORT="${ORIGIN_PORT:-16090}"

http_ok() { # http_ok PORT PATH: a real HTTP answer, not just an open port
  "$PYTHON" - "$1" "$2" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

start_origin() {
  local pidf="$STACK/run/origin.pid" logf="$STACK/log/origin.log"
  if pid_alive "$pidf" && http_ok "$ORIGIN_PORT" /_health; then log "origin already up on :$ORIGIN_PORT"; return; fi
  if port_open "$ORIGIN_PORT"; then die "port $ORIGIN_PORT for the origin is taken by another process; set ORIGIN_PORT"; fi
  # A module of the repository (deploy.local.standins.origin), so it runs from the root.
  (cd "$REPO_ROOT" && exec setsid "$PYTHON" -m deploy.local.standins.origin "$ORIGIN_PORT") \
    >>"$logf" 2>&1 < /dev/null &
  echo $! > "$pidf"
  wait_until 20 "$logf" "origin" http_ok "$ORIGIN_PORT" /_health
  log "origin ready on 127.0.0.1:$ORIGIN_PORT"
}

render_vcl() { # the repository's VCL, its backend on ORIGIN_PORT
  sed "s/\.port = \"[0-9]*\";/.port = \"$ORIGIN_PORT\";/" "$HERE/../varnish/default.vcl"
}

reload_vcl() { # a running varnish takes the repository's VCL if it changed, without a restart
  local dir="$STACK/varnish" logf="$STACK/log/varnish.log" new name old
  new="$(mktemp "$dir/default.vcl.XXXXXX")"
  render_vcl > "$new"
  if cmp -s "$new" "$dir/default.vcl"; then rm -f "$new"; return; fi
  # A name of its own per load; the cache (and the objects' keys) outlive the switch.
  name="cachesync_$(date +%Y%m%d_%H%M%S)_$$"
  if ! varnishadm -n "$dir/work" vcl.load "$name" "$new" >>"$logf" 2>&1 \
     || ! varnishadm -n "$dir/work" vcl.use "$name" >>"$logf" 2>&1; then
    rm -f "$new"
    die "varnish on :$VARNISH_PORT did not take the changed deploy/varnish/default.vcl (see $logf)"
  fi
  mv "$new" "$dir/default.vcl"
  # The VCLs it replaced hold nothing: discard them rather than let them pile up.
  for old in $(varnishadm -n "$dir/work" vcl.list 2>/dev/null | awk '$1 == "available" {print $NF}'); do
    varnishadm -n "$dir/work" vcl.discard "$old" >>"$logf" 2>&1 || true
  done
  log "varnish on :$VARNISH_PORT reloaded with the changed VCL ($name)"
}

start_varnish() {
  local dir="$STACK/varnish" pidf="$STACK/run/varnish.pid" logf="$STACK/log/varnish.log"
  if pid_alive "$pidf" && http_ok "$VARNISH_PORT" /_health; then
    log "varnish already up on :$VARNISH_PORT"
    reload_vcl
    return
  fi
  command -v varnishd >/dev/null || die "varnishd not found: make setup installs Debian's varnish and varnish-modules"
  if port_open "$VARNISH_PORT"; then die "port $VARNISH_PORT for varnish is taken by another process; set VARNISH_PORT"; fi
  mkdir -p "$dir/work"
  render_vcl > "$dir/default.vcl"
  setsid varnishd -j none -F -n "$dir/work" -a "127.0.0.1:$VARNISH_PORT" -T 127.0.0.1:0 \
    -f "$dir/default.vcl" -s malloc,64m >>"$logf" 2>&1 < /dev/null &
  echo $! > "$pidf"
  wait_until 30 "$logf" "varnish" http_ok "$VARNISH_PORT" /_health
  log "varnish ready on 127.0.0.1:$VARNISH_PORT (origin :$ORIGIN_PORT)"
}

start_origin
start_varnish
