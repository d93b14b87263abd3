#!/bin/bash
# The time to a ready-to-use volume (CreateVolume + NodeStage + NodePublish) against the raw
# tools by hand, on every VM pool kind, for one or more driver binaries, all in ONE boot of the
# ZFS image (one VM slot; the same guest for every figure):
#
#   tests/vm/ready-timing.sh [DRIVER...]     default DRIVER: target/debug/holdfast (built)
#
#   1. thin LVM: tests/vm/lvm-timing.sh (lvcreate + mkfs.ext4 + mount + mount --bind by hand);
#   2. ZFS datasets: stage 4 of tests/vm/zfs-suite.sh (zfs create + mount + mount --bind);
#   3. nfs: tests/nfs.rs's timing test (mkdir + mount + mount --bind), with each DRIVER in turn
#      bind-mounted over the driver the test binary starts (target/debug/holdfast).
# Each prints the commands each driver ran in its last round (tests/vm/log-commands.sh).
# A before/after: `objcopy --strip-debug target/debug/holdfast /tmp/old` before the change,
# then `tests/vm/ready-timing.sh /tmp/old target/debug/holdfast` after building it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
. "$here/local-bins.sh"
main=$repo/target/debug/holdfast

if [ ! -e /run/holdfast-vm ]; then
  # HOLDFAST_NFS_BIN: a tests/nfs.rs binary built already (it only drives the driver it starts).
  nfs_bin=${HOLDFAST_NFS_BIN:-}
  if [ -z "$nfs_bin" ]; then
    json=$(cargo test --locked --no-run --message-format=json --test nfs)
    nfs_bin=$(grep '"reason":"compiler-artifact"' <<<"$json" | grep '"name":"nfs","src_path"' | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -n1)
  fi
  [ -x "$nfs_bin" ] || { echo "ready-timing: cannot find the built tests/nfs.rs binary" >&2; exit 2; }
  bins=()
  for b in "${@:-$main}"; do bins+=("$(realpath "$b")"); done
  # The test binary starts $main: it must be in the list so that the guest has a copy there.
  case " ${bins[*]} " in *" $main "*) extra=() ;; *) extra=("$main") ;; esac
  vm_bins_strip "${bins[@]}" "${extra[@]}" "$nfs_bin"
  export HOLDFAST_TIMING_BINS="${bins[*]}" HOLDFAST_NFS_BIN=$nfs_bin
  export HOLDFAST_VM_LOCAL_BINS="${bins[*]} ${extra[*]} $nfs_bin"
  exec "$here/run" --zfs --disk hftime:4G --disk hfzfs:6G --timeout "${HOLDFAST_VM_TIMEOUT:-3600}" -- bash tests/vm/ready-timing.sh
fi

# shellcheck disable=SC2086 # lists of paths
vm_bins_local $HOLDFAST_VM_LOCAL_BINS
export HOLDFAST_LOG=${HOLDFAST_LOG:-info,holdfast::exec=debug}
echo "== ready-timing: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg) in the guest"
rc=0
echo "== thin LVM"
LVM_TIMING_DISK=hftime bash tests/vm/lvm-timing.sh || rc=1
echo
echo "== ZFS datasets"
HOLDFAST_ZFS_STAGES=4 HOLDFAST_VM_LOCAL_BINS="" bash tests/vm/zfs-suite.sh --guest /bin/true /bin/true "$main" || rc=1
echo
echo "== nfs"
export HOLDFAST_NFS_TEST=1 HOLDFAST_REQUIRE_REAL=1
for b in $HOLDFAST_TIMING_BINS; do
  echo "-- driver $b ($("$b" --version))"
  logs=/tmp/nfs-logs-$(basename "$b")-$RANDOM
  [ "$b" = "$main" ] || mount --bind "$b" "$main"
  HOLDFAST_NFS_LOG_DIR=$logs "$HOLDFAST_NFS_BIN" --exact timing_create_stage_publish_versus_mkdir_and_mount_by_hand || rc=1
  [ "$b" = "$main" ] || umount "$main"
  for f in "$logs"/*; do
    [ -f "$f" ] || continue
    # The last of the test's 5 rounds: after the 4th NodePublishVolume, up to the 5th.
    echo "   the commands of the last timed round ($f):"
    awk '/method="NodePublishVolume"/ { p++; if (p == 5) { print; exit } } p == 4' "$f" | bash tests/vm/log-commands.sh || true
  done
done
exit $rc
