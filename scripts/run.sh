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

# secret VARIABLE FILE: keeps VARIABLE as set, or else the random secret kept in FILE (made
# on first use, readable by this user only).
secret() {
    local variable=$1 file=$2
    if [[ -z ${!variable:-} ]]; then
        if [[ ! -s $file ]]; then
            (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$file")
        fi
        export "$variable=$(cat "$file")"
    fi
}
secret HERALD_ADMIN_TOKEN .stack/admin-token
secret HERALD_USER_TOKEN_SECRET .stack/user-token-secret
# Provider receipts are signed the Standard Webhooks way (whsec_ and base64); locally one
# secret serves every channel's receipts.
if [[ ! -s .stack/receipt-secret ]]; then
    (umask 077 && printf 'whsec_%s' "$(head -c 32 /dev/urandom | base64 -w0)" >.stack/receipt-secret)
fi
for variable in HERALD_SMS_RECEIPT_SECRET HERALD_KAKAOTALK_RECEIPT_SECRET \
    HERALD_PUSH_RECEIPT_SECRET HERALD_EMAIL_BOUNCE_SECRET; do
    [[ -n ${!variable:-} ]] || export "$variable=$(cat .stack/receipt-secret)"
done

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
    Console        $api/console   (sign in with the admin token or an operator's API key)
    Event types    $api/api/v1/event-types   (the data each event type needs; schemas/ in the repo)
    Metrics        $api/metrics
    MailDev UI     $MAILDEV_URL
    Admin token    $HERALD_ADMIN_TOKEN   (kept in .stack/admin-token; holds every scope)

  Every call under /api/v1 needs a credential, for example:
    curl -H "Authorization: Bearer \$(cat .stack/admin-token)" $api/api/v1/dashboard/delivery/channels
  Make API keys with narrower scopes, and user tokens for a user's own routes:
    $HERALD keys create --name my-service --scopes notifications:write
    HERALD_USER_TOKEN_SECRET=\$(cat .stack/user-token-secret) $HERALD users token 42

  Providers post receipts to $api/api/v1/receipts/{sms,kakaotalk,push,email}, signed
  the Standard Webhooks way with the secret in .stack/receipt-secret (README: Receipts).
  Webhooks (POST $api/api/v1/webhooks) to addresses on this machine or a private network
  are refused unless Herald runs with HERALD_WEBHOOKS_ALLOW_PRIVATE=true.

  Publish the sample events from another terminal:
    make demo      (or: $HERALD demo)

BANNER
exec "$HERALD" serve
