#!/bin/sh
# Build the ctsync image (default tag ctsync:local) from this checkout, with no registry
# and no network inside the build:
#
#   1. the base image: deploy/docker/build-base.sh (debootstrap + docker import, cached);
#   2. a build context in a temp dir: ctsync's wheel, built from a copy of the sources
#      (the checkout is not written to), and its dependencies' wheels for the image's
#      Python (pip download, kept in a cache dir so later builds need no network at all);
#   3. docker build --network none (deploy/docker/Dockerfile).
#
#   deploy/docker/build-image.sh                 CTSYNC_IMAGE=ctsync:dev deploy/docker/build-image.sh
#   BASE=debian:bookworm-slim deploy/docker/build-image.sh   (a registry's base instead:
#                                                 the Dockerfile installs the packages)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
IMAGE=${CTSYNC_IMAGE:-ctsync:local}
PYTHON=${PYTHON:-$root/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
CACHE=${CTSYNC_WHEEL_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/ctsync-docker}

if [ -n "${BASE:-}" ]; then
    base=$BASE
    network=default # the Dockerfile installs the packages with apt
else
    base=$("$here/build-base.sh" | tail -n 1)
    network=none
fi
pyver=$(docker image inspect -f '{{ index .Config.Labels "org.ctsync.python" }}' "$base" \
    2>/dev/null || true)
case "$pyver" in
    3.*) ;;
    *) pyver=3.11 ;; # bookworm's
esac

ctx=$(mktemp -d /var/tmp/ctsync-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT INT TERM
mkdir -p "$ctx/src" "$ctx/wheels" "$CACHE"

# Dependencies: binary wheels for the image's interpreter, cached per requirement set.
"$PYTHON" - "$root/pyproject.toml" >"$ctx/requirements.txt" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    print("\n".join(sorted(tomllib.load(f)["project"]["dependencies"])))
PY
arch=$(uname -m)
key=$( (echo "$pyver $arch"; cat "$ctx/requirements.txt") | sha256sum | cut -c1-16)
deps="$CACHE/deps-$key"
if [ ! -f "$deps/.complete" ]; then
    echo "build-image: downloading dependency wheels for Python $pyver ($arch)" >&2
    rm -rf "$deps"
    "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: \
        --python-version "$pyver" --implementation cp \
        --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" \
        --platform "manylinux_2_28_$arch" --platform "linux_$arch" \
        -d "$deps" -r "$ctx/requirements.txt"
    touch "$deps/.complete"
fi
cp "$deps"/*.whl "$ctx/wheels/"
mkdir "$ctx/deps"
mv "$ctx/wheels"/*.whl "$ctx/deps/"

# ctsync itself, from a snapshot of the sources.
cp -p "$root/pyproject.toml" "$root/README.md" "$ctx/src/"
cp -pR "$root/ctsync" "$ctx/src/ctsync"
find "$ctx/src" -name __pycache__ -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$ctx/wheels" "$ctx/src" >&2
rm -rf "$ctx/src"

cp "$here/Dockerfile" "$here/entrypoint.py" "$here/flows.py" "$ctx/"
echo "build-image: docker build $IMAGE from $base" >&2
docker build -q --network "$network" --build-arg "BASE=$base" -t "$IMAGE" "$ctx" >&2
# The images this tag pointed to before (untagged now); the label keeps it to ours.
docker image prune -f --filter "label=org.ctsync.packages" >/dev/null
echo "$IMAGE"
