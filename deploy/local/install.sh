#!/usr/bin/env bash
# Installs what the local stack and the tests need, idempotently: Debian packages
# (Redis, Varnish with its xkey vmod, Java and Maven for the Kafka broker) and the
# project's virtualenv. Safe to run again; does nothing that is already done.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
log() { printf '[setup] %s\n' "$*"; }

need_pkgs=()
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v varnishd >/dev/null || need_pkgs+=(varnish)
ls /usr/lib/*/varnish/vmods/libvmod_xkey.so >/dev/null 2>&1 || need_pkgs+=(varnish-modules)
command -v java >/dev/null || need_pkgs+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_pkgs+=(maven)
command -v openssl >/dev/null || need_pkgs+=(openssl)  # the secure broker's certificates
# The report's test (tests/unit/test_report_page.py) opens the page in headless Chromium.
command -v chromium >/dev/null || need_pkgs+=(chromium)
command -v chromedriver >/dev/null || need_pkgs+=(chromium-driver)
if ((${#need_pkgs[@]})); then
  log "installing Debian packages: ${need_pkgs[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# Debian's varnish package may start a stock service on 6081; ours uses its own port and -n.

PY="${BASE_PYTHON:-python3}"  # the interpreter the venv is made from
VENV="$REPO/.venv"
stamp="$VENV/.installed"
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
if [[ ! -f "$stamp" || "$REPO/pyproject.toml" -nt "$stamp" ]]; then
  log "installing Python packages"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "$REPO[test,dev,bench]"
  touch "$stamp"
fi
log "ready"
