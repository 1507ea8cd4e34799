#!/bin/sh
# Make sure a Docker daemon answers; start one when none does (CI machines, containers
# without systemd). Ours has no default bridge, touches no iptables rules and leaves the
# host's ip_forward alone: the cluster only uses the internal networks its compose file
# creates, and the image is built without any network.
set -eu
LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
if docker info >/dev/null 2>&1; then
    exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
    echo "start-dockerd: dockerd is not installed (apt-get install docker.io)" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "start-dockerd: no Docker daemon answers and only root can start one" >&2
    exit 1
fi
echo "start-dockerd: starting dockerd (log: $LOG)"
# setsid + nohup: the daemon outlives the make/CI step that started it.
setsid nohup dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    >"$LOG" 2>&1 </dev/null &
i=0
while ! docker info >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -ge 120 ]; then
        echo "start-dockerd: dockerd did not answer within 60 s; last lines of $LOG:" >&2
        tail -n 20 "$LOG" >&2
        exit 1
    fi
    sleep 0.5
done
echo "start-dockerd: dockerd is up"
