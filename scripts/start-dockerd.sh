#!/usr/bin/env bash
# Start a local Docker engine for the docker backend and its tests, unless one already responds.
#
# The engine uses the overlay2 storage driver, host networking only (no bridge, no iptables rules,
# so it never changes the host's firewall) and logs to $DOCKERD_LOG. The script polls `docker info`
# for at most $DOCKERD_START_TIMEOUT_S seconds and exits non-zero with the log tail if it never responds.
# Running it again while the engine responds does nothing.
set -euo pipefail

DOCKERD_LOG="${DOCKERD_LOG:-/tmp/fashion-gan-dockerd.log}"
DOCKERD_START_TIMEOUT_S="${DOCKERD_START_TIMEOUT_S:-60}"
DOCKERD_DATA_ROOT="${DOCKERD_DATA_ROOT:-/var/lib/docker}"

if docker info >/dev/null 2>&1; then
    echo "docker engine already running"
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
    echo "dockerd not found: install the docker.io package (apt-get install docker.io)" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "starting dockerd needs root; run this script as root or start the engine yourself" >&2
    exit 1
fi

# A pid file left by a dockerd that died stops a new one from starting.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
fi

echo "starting dockerd (log: $DOCKERD_LOG)"
nohup dockerd \
    --storage-driver=overlay2 \
    --iptables=false \
    --ip6tables=false \
    --bridge=none \
    --data-root="$DOCKERD_DATA_ROOT" \
    >>"$DOCKERD_LOG" 2>&1 </dev/null &
dockerd_pid=$!

deadline=$((SECONDS + DOCKERD_START_TIMEOUT_S))
until docker info >/dev/null 2>&1; do
    if ! kill -0 "$dockerd_pid" 2>/dev/null; then
        echo "dockerd exited during start-up; last lines of $DOCKERD_LOG:" >&2
        tail -n 20 "$DOCKERD_LOG" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "dockerd did not respond within ${DOCKERD_START_TIMEOUT_S} s; last lines of $DOCKERD_LOG:" >&2
        tail -n 20 "$DOCKERD_LOG" >&2
        exit 1
    fi
    sleep 1
done
echo "docker engine running (pid $dockerd_pid)"
