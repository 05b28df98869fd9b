#!/usr/bin/env bash
# Installs the helm binary the chart's tests render with, idempotently: built from the Go
# module proxy (`go install`, a few minutes the first time) into .stack/bin/, git-ignored.
# Does nothing when .stack/bin/helm already reports the pinned version.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
BIN="$REPO/.stack/bin"
log() { printf '[helm] %s\n' "$*"; }

if [[ -x "$BIN/helm" ]] && "$BIN/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  exit 0
fi
if ! command -v go >/dev/null; then
  for candidate in /usr/local/go/bin/go /usr/lib/go/bin/go; do
    [[ -x "$candidate" ]] && PATH="$(dirname "$candidate"):$PATH" && break
  done
fi
if ! command -v go >/dev/null; then
  log "installing Debian's golang-go"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends golang-go >/dev/null
fi
mkdir -p "$BIN"
log "building helm $HELM_VERSION into $BIN (go install, a few minutes the first time)"
# The version is stamped as helm's own release builds do, so that `helm version` (and the
# check above) reads it; -s -w drops the debug tables (a third of the binary).
GOBIN="$BIN" CGO_ENABLED=0 go install \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
"$BIN/helm" version --template '{{.Version}}' | grep -qx "$HELM_VERSION"
log "ready: $BIN/helm"
