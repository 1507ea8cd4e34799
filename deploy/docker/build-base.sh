#!/bin/sh
# Build the Debian base image of the ctsync image without any container registry:
# debootstrap a minimal Debian (the host's suite when the host runs Debian, else bookworm)
# with the packages the firewall image needs, and `docker import` it as ctsync-base:<suite>.
# Does nothing when that image exists and was built from the same package list.
#
#   deploy/docker/build-base.sh            prints the image name on its last line
#   SUITE=trixie MIRROR=http://deb.debian.org/debian deploy/docker/build-base.sh
#
# Where a registry is reachable, `FROM debian:<suite>-slim` does the same job
# (deploy/docker/Dockerfile installs the packages then).
set -eu

if [ -z "${SUITE:-}" ]; then
    SUITE=bookworm
    if [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091
        . /etc/os-release
        if [ "${ID:-}" = debian ] && [ -n "${VERSION_CODENAME:-}" ]; then
            SUITE=$VERSION_CODENAME
        fi
    fi
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
IMAGE=${BASE_IMAGE:-ctsync-base:$SUITE}
CACHE=${DEBOOTSTRAP_CACHE:-/var/cache/ctsync-debootstrap/$SUITE}
# What the firewall, client and server containers run (Dockerfile: PACKAGES, same list).
# systemd is not started by those containers (their entrypoint is ctsync's):
# tests/e2e/test_systemd_unit.py boots the same image with systemd as PID 1 to run
# deploy/systemd/ctsync.service (as root, systemctl needs no D-Bus daemon).
PACKAGES="nftables,conntrack,iproute2,procps,python3,python3-venv,iputils-ping,ca-certificates,systemd"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    have=$(docker image inspect -f '{{ index .Config.Labels "org.ctsync.packages" }}' "$IMAGE")
    py=$(docker image inspect -f '{{ index .Config.Labels "org.ctsync.python" }}' "$IMAGE")
    if [ "$have" = "$PACKAGES" ] && [ -n "$py" ]; then
        echo "$IMAGE"
        exit 0
    fi
    echo "build-base: $IMAGE has another package list, rebuilding" >&2
fi
command -v debootstrap >/dev/null 2>&1 || {
    echo "build-base: debootstrap is not installed (apt-get install debootstrap)" >&2
    exit 1
}

root=$(mktemp -d /var/tmp/ctsync-base.XXXXXX)
trap 'rm -rf "$root"' EXIT INT TERM
mkdir -p "$CACHE"
echo "build-base: debootstrap $SUITE from $MIRROR (cache $CACHE)" >&2
debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE" \
    "$SUITE" "$root" "$MIRROR" >&2
# A smaller image: no package lists, no downloaded .debs, no docs.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/var/cache/debconf/*-old "$root"/var/log/*.log
# The image's Python version: build-image.sh fetches dependency wheels for it.
pyver=$(chroot "$root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
tar --numeric-owner -C "$root" -c . | docker import \
    --change "LABEL org.ctsync.packages=$PACKAGES" \
    --change "LABEL org.ctsync.python=$pyver" \
    --change "ENV LANG=C.UTF-8" \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE" >&2
echo "$IMAGE"
