#!/usr/bin/env bash
# `make test`: the same provisioning as `make run` on the test stack's own ports and data
# directories (so it can run while `make run` is up), then the whole test suite, then the
# fault suite (scripts/faults.sh) on the faults stack.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
started=$SECONDS

scripts/stack.sh install
scripts/stack.sh up test
if [[ ${CI:-} == true ]]; then
    # CI leaves no process behind; locally the stack stays up to make the next run fast.
    trap 'scripts/stack.sh down test' EXIT
fi

# The tests talk only to the test stack: nothing from the caller's environment (a real
# Slack webhook, say) may leak in.
while IFS= read -r name; do unset "$name"; done < <(compgen -e | grep '^HERALD_' || true)
while IFS='=' read -r name value; do export "$name=$value"; done < <(scripts/stack.sh env test)

# Each test makes its own database; drop the ones earlier runs left behind.
psql "$HERALD_DATABASE_URL" -qtAc \
    "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE);', datname) FROM pg_database WHERE datname LIKE 'herald_test_%'" \
    | psql "$HERALD_DATABASE_URL" -q >/dev/null

# And the emails they sent: a MailDev holding tens of thousands is slow to read.
curl -fsS -X DELETE "$MAILDEV_URL/email/all" >/dev/null || echo "[test] could not empty MailDev" >&2

echo "[test] provisioning took $((SECONDS - started)) s" >&2
if (($# == 0)); then
    # The alert rules: valid, and each firing (and staying quiet) on the series it should.
    promtool check rules dashboards/alerts.yml
    promtool test rules dashboards/alerts.test.yml
fi
cargo test "$@"
if (($# == 0)); then
    # The whole suite includes the fault suite (about 5 minutes, on its own stack); a
    # filtered run (`make test ARGS`, `scripts/test.sh NAME`) does not.
    scripts/faults.sh
fi
echo "[test] done in $((SECONDS - started)) s" >&2
