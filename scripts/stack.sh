#!/usr/bin/env bash
# The local stack without Docker: PostgreSQL, Redis, Tansu (a Kafka-compatible broker) and
# MailDev (SMTP sink + web UI), each on loopback, with state under .stack/ (profile "run")
# or .stack-test/ (profile "test", other ports, so both can run at once); profiles "bench"
# and "faults" have their own ports and dirs too, so benchmarks and fault injection never
# disturb (or get disturbed by) the test suite.
#
#   scripts/stack.sh install          install what is missing (idempotent, fast when present)
#   scripts/stack.sh up     [PROFILE] start what is not running and wait until it is ready
#   scripts/stack.sh down   [PROFILE] stop everything this profile started
#   scripts/stack.sh status [PROFILE] show what is running
#   scripts/stack.sh env    [PROFILE] print the HERALD_* variables that point at this stack
#   scripts/stack.sh stop   PROFILE SERVICE   stop one service (postgres, redis or smtp)
#   scripts/stack.sh start  PROFILE SERVICE   start it again (the fault suite injects outages
#                                             with these two)
#   scripts/stack.sh pause  PROFILE kafka     freeze the broker (SIGSTOP): connections stay open
#                                             and nothing answers, as in a long GC pause or a
#                                             network partition
#   scripts/stack.sh resume PROFILE kafka     let it run again (SIGCONT)
#
# docker-compose.yml describes the same stack for Docker users: keep the two in step.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TANSU_VERSION=0.6.0
MAILDEV_VERSION=2
# playwright-core (no browser of its own: it drives Debian's chromium) for the console's
# browser test in make test.
PLAYWRIGHT_VERSION=1.57.0
PLAYWRIGHT_DIR=$ROOT/.tools/playwright
# openapi-spec-validator, which checks the served OpenAPI document in make test.
OPENAPI_VALIDATOR_VERSION=0.7.2
OPENAPI_VALIDATOR_DIR=$ROOT/.tools/openapi
MAILDEV_DIR=$ROOT/.tools/maildev
MAILDEV_BIN=$MAILDEV_DIR/node_modules/maildev/bin/maildev
PG_MAJOR_PREFERRED=15

log() { printf '\033[1m[stack]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[stack] error:\033[0m %s\n' "$*" >&2; exit 1; }

profile() {
    PROFILE=${1:-run}
    case $PROFILE in
        run)
            STACK_DIR=$ROOT/.stack
            PG_PORT=5432 REDIS_PORT=6379 KAFKA_PORT=9092 SMTP_PORT=1025 MAILDEV_WEB_PORT=1080
            ;;
        test)
            STACK_DIR=$ROOT/.stack-test
            PG_PORT=15432 REDIS_PORT=16379 KAFKA_PORT=19092 SMTP_PORT=11025 MAILDEV_WEB_PORT=11080
            ;;
        bench)
            STACK_DIR=$ROOT/.stack-bench
            PG_PORT=25432 REDIS_PORT=26379 KAFKA_PORT=29092 SMTP_PORT=21025 MAILDEV_WEB_PORT=21080
            ;;
        faults)
            STACK_DIR=$ROOT/.stack-faults
            PG_PORT=35432 REDIS_PORT=36379 KAFKA_PORT=39092 SMTP_PORT=31025 MAILDEV_WEB_PORT=31080
            ;;
        *) die "unknown profile '$PROFILE' (expected run, test, bench or faults)" ;;
    esac
    LOG_DIR=$STACK_DIR/logs
}

# --- helpers -------------------------------------------------------------------------------

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.2
    done
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pid NAME PIDFILE: SIGTERM, then SIGKILL after 10 s.
stop_pid() {
    local name=$1 pidfile=$2
    if pid_alive "$pidfile"; then
        local pid
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        if ! wait_for "$name to stop" 10 bash -c "! kill -0 $pid"; then
            log "$name did not stop on SIGTERM; killing it"
            kill -9 "$pid" 2>/dev/null || true
        fi
        log "$name stopped"
    fi
    rm -f "$pidfile"
}

# The port must be free, or already served by this profile's own process.
claim_port() {
    local name=$1 port=$2
    if port_open "$port"; then
        die "port $port (for $name) is in use by another process; stop it first (scripts/stack.sh down, or find it with: ss -ltnp 'sport = :$port')"
    fi
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "installing needs root (or sudo): $*"
    fi
}

APT_UPDATED=
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    if [[ -z $APT_UPDATED ]]; then
        log "apt-get update"
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pg_bin_dir() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x $dir/postgres && -x $dir/initdb ]] && echo "$dir"
    done | sort -V | tail -n 1
}

# Tansu's in-memory storage needs its `dynostore` feature, which is not a default one: a
# plain `cargo install tansu` gives a broker that refuses memory://. cargo records the
# features of an install in ~/.cargo/.crates2.json.
tansu_installed() {
    local tansu
    tansu=$(tansu_bin)
    [[ -n $tansu ]] && "$tansu" --version 2>/dev/null | grep -q "$TANSU_VERSION" \
        && grep -o "\"tansu $TANSU_VERSION [^}]*}" "${CARGO_HOME:-$HOME/.cargo}/.crates2.json" 2>/dev/null | grep -q dynostore
}

tansu_bin() {
    if command -v tansu >/dev/null; then command -v tansu
    elif [[ -x $HOME/.cargo/bin/tansu ]]; then echo "$HOME/.cargo/bin/tansu"
    fi
}

# Commands that PostgreSQL runs: its server binaries refuse to run as root.
as_pg() {
    # From /: the postgres user may not be allowed into the caller's directory.
    if [[ $(id -u) -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# --- install -------------------------------------------------------------------------------

install() {
    # Build tools for the rdkafka crate's bundled librdkafka (OpenSSL for its `ssl`
    # feature: Kafka TLS/SASL), the Redis server, the PostgreSQL client, Node.js for MailDev.
    local packages=(build-essential pkg-config zlib1g-dev libssl-dev redis-server curl)
    command -v psql >/dev/null && command -v pg_isready >/dev/null || packages+=(postgresql-client)
    command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)
    # promtool, for the alert rules' unit tests (make test); Debian ships it with Prometheus.
    command -v promtool >/dev/null || packages+=(prometheus)
    # Chromium, headless, for the test that the docs page renders with no network (make test).
    command -v chromium >/dev/null || packages+=(chromium)
    if [[ -z $(pg_bin_dir) ]]; then
        packages+=("postgresql-$PG_MAJOR_PREFERRED")
    fi
    apt_install "${packages[@]}"
    if [[ -z $(pg_bin_dir) ]]; then
        die "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin"
    fi
    # The Debian package may have created and started its own cluster on 5432; Herald runs
    # its own under .stack/, so stop the packaged one if it is running.
    if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
        log "stopping the system PostgreSQL cluster (Herald runs its own)"
        pg_lsclusters -h | awk '$4 == "online" {print $1, $2}' | while read -r version cluster; do
            as_root pg_ctlcluster "$version" "$cluster" stop || true
        done
    fi

    if ! tansu_installed; then
        log "installing tansu $TANSU_VERSION with cargo (about 8 minutes on 2 cores, once)"
        cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore --force --quiet
    fi

    if [[ ! -f $MAILDEV_BIN ]]; then
        log "installing maildev@$MAILDEV_VERSION into .tools/maildev"
        mkdir -p "$MAILDEV_DIR"
        npm install --prefix "$MAILDEV_DIR" "maildev@$MAILDEV_VERSION" \
            --no-audit --no-fund --loglevel=error >/dev/null
    fi

    if [[ ! -x $OPENAPI_VALIDATOR_DIR/bin/openapi-spec-validator ]]; then
        log "installing openapi-spec-validator==$OPENAPI_VALIDATOR_VERSION into .tools/openapi"
        python3 -m venv "$OPENAPI_VALIDATOR_DIR"
        "$OPENAPI_VALIDATOR_DIR/bin/pip" install --quiet --disable-pip-version-check \
            "openapi-spec-validator==$OPENAPI_VALIDATOR_VERSION"
    fi

    if [[ ! -f $PLAYWRIGHT_DIR/node_modules/playwright-core/package.json ]]; then
        log "installing playwright-core@$PLAYWRIGHT_VERSION into .tools/playwright"
        mkdir -p "$PLAYWRIGHT_DIR"
        PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$PLAYWRIGHT_DIR" \
            "playwright-core@$PLAYWRIGHT_VERSION" --no-audit --no-fund --loglevel=error >/dev/null
    fi
}

# --- PostgreSQL ----------------------------------------------------------------------------

pg_home() {
    # The data directory must be owned by the postgres user, and every directory above it
    # must let that user through. When the checkout lives somewhere it cannot reach (under
    # /root, say), the data goes to /var/tmp instead and .stack/postgres points there.
    local home=$STACK_DIR/postgres
    if [[ -L $home ]]; then readlink "$home"; return; fi
    mkdir -p "$home"
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres: "$home"
        if ! runuser -u postgres -- test -w "$home"; then
            rmdir "$home"
            local elsewhere
            elsewhere=/var/tmp/herald-$(printf '%s' "$STACK_DIR" | cksum | cut -d' ' -f1)/postgres
            mkdir -p "$elsewhere"
            chown postgres: "$elsewhere" "$(dirname "$elsewhere")"
            ln -s "$elsewhere" "$home"
            home=$elsewhere
        fi
    fi
    echo "$home"
}

pg_running() {
    local home=$1
    [[ -f $home/data/postmaster.pid ]] && as_pg "$PG_BIN/pg_ctl" -D "$home/data" status >/dev/null 2>&1
}

postgres_up() {
    PG_BIN=$(pg_bin_dir)
    local home
    home=$(pg_home)
    if pg_running "$home"; then
        log "postgres already running on 127.0.0.1:$PG_PORT"
    else
        claim_port postgres "$PG_PORT"
        if [[ ! -f $home/data/PG_VERSION ]]; then
            log "initialising PostgreSQL in $home/data"
            as_pg "$PG_BIN/initdb" -D "$home/data" -U herald --auth=trust -E UTF8 --no-locale >/dev/null
        fi
        mkdir -p "$home/socket"
        if [[ $(id -u) -eq 0 ]]; then chown postgres: "$home/socket"; fi
        local options="-p $PG_PORT -c listen_addresses=127.0.0.1 -k $home/socket -c max_connections=300"
        if [[ $PROFILE == test || $PROFILE == faults ]]; then
            # Test data is disposable: trade durability for speed. Not for bench: its
            # figures are for a PostgreSQL that keeps what it acknowledged, as in production.
            options+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        elif [[ $PROFILE == bench ]]; then
            # Durable, and sized like a production server for Herald's write-heavy load
            # (BENCHMARKS.md): at the defaults (128 MB of buffers, 1 GB of WAL between
            # checkpoints) a checkpoint started every 13 to 27 s under load, and each one
            # makes the next change to every page write the whole page to the WAL again.
            options+=" -c shared_buffers=2GB -c max_wal_size=8GB -c min_wal_size=1GB"
            options+=" -c checkpoint_timeout=15min"
        fi
        log "starting postgres on 127.0.0.1:$PG_PORT"
        as_pg setsid "$PG_BIN/pg_ctl" -D "$home/data" -l "$home/server.log" -o "$options" -w -t 60 start >/dev/null \
            || die "postgres did not start; see $home/server.log"
    fi
    wait_for postgres 30 "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || die "postgres is not ready; see $home/server.log"
    if ! psql -h 127.0.0.1 -p "$PG_PORT" -U herald -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'herald'" | grep -q 1; then
        psql -h 127.0.0.1 -p "$PG_PORT" -U herald -d postgres -qc 'CREATE DATABASE herald' >/dev/null
    fi
}

postgres_down() {
    PG_BIN=$(pg_bin_dir)
    local home=$STACK_DIR/postgres
    [[ -e $home ]] || return 0
    home=$(cd "$home" && pwd -P)
    if [[ -n $PG_BIN ]] && pg_running "$home"; then
        as_pg "$PG_BIN/pg_ctl" -D "$home/data" -m fast -w stop >/dev/null
        log "postgres stopped"
    fi
}

# --- Redis ---------------------------------------------------------------------------------

redis_up() {
    local pidfile=$STACK_DIR/redis/redis.pid
    if pid_alive "$pidfile"; then
        log "redis already running on 127.0.0.1:$REDIS_PORT"
    else
        claim_port redis "$REDIS_PORT"
        mkdir -p "$STACK_DIR/redis"
        local persistence=(--save "60 1000" --appendonly no)
        [[ $PROFILE != run ]] && persistence=(--save "" --appendonly no)
        log "starting redis on 127.0.0.1:$REDIS_PORT"
        redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
            --pidfile "$pidfile" --logfile "$LOG_DIR/redis.log" --dir "$STACK_DIR/redis" \
            "${persistence[@]}" >/dev/null
    fi
    wait_for redis 15 bash -c "[[ \$(redis-cli -p $REDIS_PORT ping) == PONG ]]" \
        || die "redis is not ready; see $LOG_DIR/redis.log"
}

redis_down() { stop_pid redis "$STACK_DIR/redis/redis.pid"; }

# --- Tansu (Kafka API) ---------------------------------------------------------------------

kafka_up() {
    local pidfile=$STACK_DIR/tansu.pid
    if pid_alive "$pidfile"; then
        log "tansu already running on 127.0.0.1:$KAFKA_PORT"
    else
        claim_port tansu "$KAFKA_PORT"
        local tansu
        tansu=$(tansu_bin)
        [[ -n $tansu ]] || die "tansu is not installed; run scripts/stack.sh install"
        log "starting tansu on 127.0.0.1:$KAFKA_PORT (in-memory storage)"
        # setsid: a Ctrl-C meant for Herald in the foreground must not reach the stack.
        setsid "$tansu" broker \
            --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
            --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
            --storage-engine memory://tansu/ \
            >>"$LOG_DIR/tansu.log" 2>&1 </dev/null &
        echo $! >"$pidfile"
    fi
    wait_for tansu 30 port_open "$KAFKA_PORT" || die "tansu is not listening; see $LOG_DIR/tansu.log"
}

kafka_down() { stop_pid tansu "$STACK_DIR/tansu.pid"; }

# kafka_signal STOP|CONT: freezes or thaws the broker. Tansu keeps its topics in memory, so
# a broker outage is a pause rather than a restart.
kafka_signal() {
    local pidfile=$STACK_DIR/tansu.pid
    pid_alive "$pidfile" || die "tansu of profile '$PROFILE' is not running"
    kill -"$1" "$(cat "$pidfile")"
    log "tansu SIG$1"
}

# --- MailDev -------------------------------------------------------------------------------

maildev_up() {
    local pidfile=$STACK_DIR/maildev.pid
    if pid_alive "$pidfile"; then
        log "maildev already running (SMTP 127.0.0.1:$SMTP_PORT, UI http://127.0.0.1:$MAILDEV_WEB_PORT)"
    else
        claim_port "maildev SMTP" "$SMTP_PORT"
        claim_port "maildev UI" "$MAILDEV_WEB_PORT"
        [[ -f $MAILDEV_BIN ]] || die "maildev is not installed; run scripts/stack.sh install"
        log "starting maildev (SMTP 127.0.0.1:$SMTP_PORT, UI http://127.0.0.1:$MAILDEV_WEB_PORT)"
        # Mails are kept on disk and reloaded at start, so a restart of the sink (the fault
        # suite's SMTP outage) does not forget what it received before.
        setsid node "$MAILDEV_BIN" --ip 127.0.0.1 --smtp "$SMTP_PORT" --web "$MAILDEV_WEB_PORT" \
            --mail-directory "$STACK_DIR/maildev" \
            >>"$LOG_DIR/maildev.log" 2>&1 </dev/null &
        echo $! >"$pidfile"
    fi
    wait_for maildev 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$SMTP_PORT && exec 4<>/dev/tcp/127.0.0.1/$MAILDEV_WEB_PORT" \
        || die "maildev is not listening; see $LOG_DIR/maildev.log"
}

maildev_down() { stop_pid maildev "$STACK_DIR/maildev.pid"; }

# --- commands ------------------------------------------------------------------------------

up() {
    mkdir -p "$LOG_DIR"
    postgres_up
    redis_up
    kafka_up
    maildev_up
    log "stack '$PROFILE' ready"
}

down() {
    maildev_down
    kafka_down
    redis_down
    postgres_down
}

# service up|down SERVICE: starts or stops one service of the profile.
service() {
    case $2 in
        postgres) "postgres_$1" ;;
        redis) "redis_$1" ;;
        smtp | maildev) "maildev_$1" ;;
        # Tansu keeps its topics in memory: a restart empties every topic and forgets every
        # consumer group, as a cluster that lost its data (the fault suite's broker reset).
        kafka | tansu) "kafka_$1" ;;
        *) die "unknown service '$2' (expected postgres, redis, smtp or kafka)" ;;
    esac
}

status() {
    local name port
    for name in postgres:$PG_PORT redis:$REDIS_PORT tansu:$KAFKA_PORT maildev-smtp:$SMTP_PORT maildev-ui:$MAILDEV_WEB_PORT; do
        port=${name#*:}
        if port_open "$port"; then echo "${name%%:*} up (127.0.0.1:$port)"; else echo "${name%%:*} down (127.0.0.1:$port)"; fi
    done
}

env_vars() {
    cat <<EOF
HERALD_DATABASE_URL=postgres://herald@127.0.0.1:$PG_PORT/herald
HERALD_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
HERALD_REDIS_URL=redis://127.0.0.1:$REDIS_PORT
HERALD_SMTP_URL=smtp://127.0.0.1:$SMTP_PORT
MAILDEV_URL=http://127.0.0.1:$MAILDEV_WEB_PORT
EOF
}

command=${1:-}
profile "${2:-run}"
case $command in
    install) install ;;
    up) up ;;
    down) down ;;
    status) status ;;
    env) env_vars ;;
    stop) service down "${3:-}" ;;
    pause | resume)
        [[ ${3:-} == kafka ]] || die "only kafka can be paused"
        if [[ $command == pause ]]; then kafka_signal STOP; else kafka_signal CONT; fi
        ;;
    start)
        mkdir -p "$LOG_DIR"
        service up "${3:-}"
        ;;
    *) die "usage: scripts/stack.sh {install|up|down|status|env} [run|test|bench|faults], {stop|start} PROFILE {postgres|redis|smtp|kafka}, or {pause|resume} PROFILE kafka" ;;
esac
