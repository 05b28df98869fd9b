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
