#!/bin/bash
# issue 12 (VM only): the conformance group section on thick and thin LVM pools (ext4 and btrfs).
set -u
[ -e /run/holdfast-vm ] || exit 2
bin=$1  # the conformance test executable (see README.md)
export LVM_SUPPRESS_FD_WARNINGS=1 HOLDFAST_REQUIRE_REAL=1
pvcreate -q /dev/disk/by-id/virtio-hfthick /dev/disk/by-id/virtio-hfthin
vgcreate -q -s 1M hfthick /dev/disk/by-id/virtio-hfthick
vgcreate -q -s 1M hfthin /dev/disk/by-id/virtio-hfthin
lvcreate -q -y --type thin-pool -L 3G -n tp0 hfthin
rc=0
echo "== thin, ext4"; HOLDFAST_TEST_CONFIG=tests/fixtures/lvm/conformance-thin.toml "$bin" --test-threads=2 group:: || rc=1
echo "== thin, btrfs"; HOLDFAST_TEST_FS=btrfs HOLDFAST_TEST_CONFIG=tests/fixtures/lvm/conformance-thin.toml "$bin" --test-threads=2 group:: || rc=1
echo "== thick, ext4"; HOLDFAST_TEST_CONFIG=tests/fixtures/lvm/conformance-thick.toml "$bin" --test-threads=2 group:: || rc=1
echo "== left behind:"; lvs --noheadings -o lv_name,vg_name -S 'lv_name!=tp0' hfthick hfthin
exit $rc
