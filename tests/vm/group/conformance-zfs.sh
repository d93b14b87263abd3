#!/bin/bash
# issue 12 (VM only): the conformance group section on ZFS datasets and zvols (ext4).
set -u
[ -e /run/holdfast-vm ] || exit 2
bin=$1  # the conformance test executable (see README.md)
export HOLDFAST_REQUIRE_REAL=1
zpool create -f -o ashift=12 -O mountpoint=none hfzfs /dev/disk/by-id/virtio-hfzfs
rc=0
echo "== datasets"; HOLDFAST_TEST_FS=zfs HOLDFAST_TEST_CONFIG=tests/fixtures/zfs/conformance-dataset.toml "$bin" --test-threads=2 group:: || rc=1
echo "== zvols ext4"; HOLDFAST_TEST_FS=ext4 HOLDFAST_TEST_CONFIG=tests/fixtures/zfs/conformance-zvol.toml "$bin" --test-threads=2 group:: || rc=1
echo "== left behind:"; zfs list -r -t all hfzfs
exit $rc
