#!/usr/bin/env bash
# Build the local base image fashion-gan-base:bookworm (Debian bookworm minbase with python3 3.11,
# venv and pip) with debootstrap, for machines whose Docker engine cannot pull python:3.11-slim.
#
# Use it with: docker build --build-arg BASE_IMAGE=fashion-gan-base:bookworm .
# The script does nothing when the image already exists. Needs root, debootstrap and a Debian mirror
# ($DEBIAN_MIRROR) reachable from this machine.
set -euo pipefail

BASE_IMAGE_TAG="${BASE_IMAGE_TAG:-fashion-gan-base:bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SUITE=bookworm

if docker image inspect "$BASE_IMAGE_TAG" >/dev/null 2>&1; then
    echo "base image $BASE_IMAGE_TAG already exists"
    exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "debootstrap not found: install it (apt-get install debootstrap)" >&2
    exit 1
fi

rootfs_dir="$(mktemp -d /tmp/fashion-gan-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs_dir"' EXIT

echo "debootstrapping $DEBIAN_SUITE into $rootfs_dir from $DEBIAN_MIRROR"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    "$DEBIAN_SUITE" "$rootfs_dir" "$DEBIAN_MIRROR"

# The package lists and the .deb cache are not needed at run time, so they stay out of the image.
rm -rf "$rootfs_dir"/var/cache/apt/archives/*.deb "$rootfs_dir"/var/lib/apt/lists/*

echo "importing $rootfs_dir as $BASE_IMAGE_TAG"
tar -C "$rootfs_dir" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$BASE_IMAGE_TAG"
echo "base image $BASE_IMAGE_TAG built"
