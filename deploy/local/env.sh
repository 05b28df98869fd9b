# Shared defaults for the local stack. Sourced by up.sh, down.sh and the Makefile's
# recipes; every value can be overridden from the environment. Ports sit away from
# the stock services (9092, 6379, 6081) so a machine's own daemons never collide.
REPO_ROOT="${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
export CACHESYNC_STACK_DIR="${CACHESYNC_STACK_DIR:-$REPO_ROOT/.stack}"
export KAFKA_PORT="${KAFKA_PORT:-19092}"
export KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-19093}"
export KAFKA_HEAP_MB="${KAFKA_HEAP_MB:-768}"
# region name -> Redis port; the state Redis holds the mapper's relationship index.
export REDIS_PORT_US_EAST="${REDIS_PORT_US_EAST:-16379}"
export REDIS_PORT_EU_WEST="${REDIS_PORT_EU_WEST:-16380}"
export REDIS_PORT_AP_SOUTHEAST="${REDIS_PORT_AP_SOUTHEAST:-16381}"
export REDIS_PORT_STATE="${REDIS_PORT_STATE:-16382}"
export REDIS_INSTANCES="${REDIS_INSTANCES:-us-east:$REDIS_PORT_US_EAST eu-west:$REDIS_PORT_EU_WEST ap-southeast:$REDIS_PORT_AP_SOUTHEAST state:$REDIS_PORT_STATE}"
# Extras, started only when named in CACHESYNC_STACK_EXTRAS (`make test` names both;
# `make run` none): "secure", a SASL_SSL broker of its own (up.d/secure.sh), and
# "two-clusters", eu-west's own KRaft broker and MirrorMaker 2 (up.d/two-clusters.sh).
export CACHESYNC_STACK_EXTRAS="${CACHESYNC_STACK_EXTRAS:-}"
export KAFKA_EXTRA_HEAP_MB="${KAFKA_EXTRA_HEAP_MB:-256}"
export KAFKA_SECURE_PORT="${KAFKA_SECURE_PORT:-19094}"            # SASL_SSL (PLAIN, SCRAM-SHA-256/512)
export KAFKA_SECURE_CONTROLLER_PORT="${KAFKA_SECURE_CONTROLLER_PORT:-19095}"
export KAFKA_SECURE_MTLS_PORT="${KAFKA_SECURE_MTLS_PORT:-19096}"  # SSL with client certificates
export KAFKA_EU_WEST_PORT="${KAFKA_EU_WEST_PORT:-19192}"
export KAFKA_EU_WEST_CONTROLLER_PORT="${KAFKA_EU_WEST_CONTROLLER_PORT:-19193}"
