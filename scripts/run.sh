#!/usr/bin/env bash
# `make run`: install what is missing, start the local stack on its fixed ports, migrate,
# create the topics, and run Herald in the foreground. HERALD_* variables already set in the
# environment win over the local defaults (point Slack at a real webhook, say).
#
#   scripts/run.sh        the whole of `make run`
#   scripts/run.sh demo   `make demo`: publish the sample events to the running stack
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

scripts/stack.sh install
scripts/stack.sh up run

while IFS='=' read -r name value; do
    [[ -n ${!name:-} ]] || export "$name=$value"
done < <(scripts/stack.sh env run)
: "${HERALD_HTTP_ADDR:=127.0.0.1:8080}"
export HERALD_HTTP_ADDR

if [[ -z ${HERALD_ADMIN_TOKEN:-} ]]; then
    if [[ ! -s .stack/admin-token ]]; then
        (umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >.stack/admin-token)
    fi
    HERALD_ADMIN_TOKEN=$(cat .stack/admin-token)
    export HERALD_ADMIN_TOKEN
fi

echo "[run] building herald" >&2
cargo build --quiet --bin herald
HERALD=$ROOT/target/debug/herald
if [[ ${1:-} == demo ]]; then
    exec "$HERALD" demo
fi
"$HERALD" migrate
"$HERALD" topics create

api="http://$HERALD_HTTP_ADDR"
cat <<BANNER

  Herald is starting (Ctrl-C stops it; \`make stop\` stops the stack).

    API            $api/api/v1
    Health         $api/health/ready
    API docs       $api/docs
    Metrics        $api/metrics
    MailDev UI     $MAILDEV_URL
    Admin token    $HERALD_ADMIN_TOKEN   (Authorization: Bearer ...; kept in .stack/admin-token)

  Publish the sample events from another terminal:
    make demo      (or: $HERALD demo)

BANNER
exec "$HERALD" serve
