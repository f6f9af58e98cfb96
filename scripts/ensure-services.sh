#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis that the test suite talks to answer on 127.0.0.1.
# Idempotent: a service that answers is left alone; one that is installed but down is started.
# Nothing is ever stopped or restarted (the servers may be shared with other work).
set -euo pipefail

# The ports can be overridden (PG_PORT=…, REDIS_PORT=…) to try the script out on a spare port.
PG_HOST=127.0.0.1 PG_PORT=${PG_PORT:-5432}
REDIS_HOST=127.0.0.1 REDIS_PORT=${REDIS_PORT:-6379}

have() { command -v "$1" >/dev/null 2>&1; }

# A bare TCP connect: used when the client tools are missing, so a server reachable on the
# port (say, started some other way) still counts.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

pg_ready() {
    if have pg_isready; then pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; else port_open "$PG_HOST" "$PG_PORT"; fi
}

redis_ready() {
    if have redis-cli; then
        [[ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
    else
        port_open "$REDIS_HOST" "$REDIS_PORT"
    fi
}

# wait_for NAME CHECK SECONDS
wait_for() {
    local name=$1 check=$2 seconds=$3 i
    for ((i = 0; i < seconds * 2; i++)); do
        if "$check"; then echo "$name: ready"; return 0; fi
        sleep 0.5
    done
    echo "$name: started but still not answering after ${seconds}s" >&2
    return 1
}

ensure_postgres() {
    if pg_ready; then echo "PostgreSQL: ready on $PG_HOST:$PG_PORT"; return 0; fi
    if ! have pg_ctlcluster; then
        echo "PostgreSQL: nothing answers on $PG_HOST:$PG_PORT and it is not installed here" \
             "(no pg_ctlcluster). Install it (apt-get install postgresql) or start one there." >&2
        return 1
    fi
    # The cluster that listens on our port; otherwise the first version's 'main' cluster.
    local version cluster
    read -r version cluster < <(pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p {print $1, $2; exit}') || true
    if [[ -z "${version:-}" ]]; then
        version=$(ls /etc/postgresql | head -1) cluster=main
    fi
    echo "PostgreSQL: not answering; starting cluster $version/$cluster"
    # "already running" (a cluster still starting up) is not an error: the wait below decides.
    pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start || true
    wait_for PostgreSQL pg_ready 30
}

ensure_redis() {
    if redis_ready; then echo "Redis: ready on $REDIS_HOST:$REDIS_PORT"; return 0; fi
    if ! have redis-server; then
        echo "Redis: nothing answers on $REDIS_HOST:$REDIS_PORT and it is not installed here" \
             "(no redis-server). Install it (apt-get install redis-server) or start one there." >&2
        return 1
    fi
    echo "Redis: not answering; starting redis-server"
    # A throwaway test server: loopback only ('-::1' = IPv6 if available), nothing on disk.
    local extra=()
    [[ -d /var/log/redis && -w /var/log/redis ]] && extra+=(--logfile /var/log/redis/ensure-services.log)
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no "${extra[@]}"
    wait_for Redis redis_ready 10
}

status=0
ensure_postgres || status=1
ensure_redis || status=1
exit "$status"
