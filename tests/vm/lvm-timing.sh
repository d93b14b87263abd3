#!/bin/bash
# Times a ready-to-use 1 GiB thin ext4 volume in the test VM: holdfast (CreateVolume +
# NodeStage + NodePublish through `holdfast ctl` against `holdfast all-in-one`) against
# `lvcreate -V 1G --thin + mkfs.ext4 + mount + mount --bind` typed by hand, in the same boot.
# `holdfast ctl` is a new process per call; the cost of one (`ctl info`) is measured and
# subtracted, so the figure is the driver's.   Run: tests/vm/lvm-timing.sh (on the host).
#
# HOLDFAST_TIMING_BINS="PATH..." times each of these driver binaries in turn, in the same boot
# (a before/after: keep a copy of the old one), instead of building target/debug/holdfast. The
# drivers run from the guest's RAM (tests/vm/local-bins.sh) and log every command they run; the
# commands of each driver's last round are printed, with the time each took. Also usable as
# the guest half of tests/vm/ready-timing.sh (LVM_TIMING_DISK names the disk to use).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
. "$here/local-bins.sh"
if [ ! -e /run/holdfast-vm ]; then
  if [ -z "${HOLDFAST_TIMING_BINS:-}" ]; then
    cargo build --locked --quiet
    HOLDFAST_TIMING_BINS=$repo/target/debug/holdfast
  fi
  # shellcheck disable=SC2086 # a list of paths
  vm_bins_strip $HOLDFAST_TIMING_BINS
  export HOLDFAST_TIMING_BINS HOLDFAST_VM_LOCAL_BINS=$HOLDFAST_TIMING_BINS
  exec "$here/run" --disk hftime:4G -- bash tests/vm/lvm-timing.sh
fi
if [ -n "${HOLDFAST_VM_LOCAL_BINS:-}" ] && [ ! -d /tmp/hf-bins ]; then
  # shellcheck disable=SC2086
  vm_bins_local $HOLDFAST_VM_LOCAL_BINS
fi
rounds=${HOLDFAST_TIMING_ROUNDS:-5}
disk=/dev/disk/by-id/virtio-${LVM_TIMING_DISK:-hftime}
pvcreate -q "$disk"
vgcreate -q -s 1M hft "$disk"
lvcreate -q -y --type thin-pool -L 3G -n tp0 hft >/dev/null
ms() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
n=0
for hf in ${HOLDFAST_TIMING_BINS:-target/debug/holdfast}; do
  n=$((n + 1))
  w=$(mktemp -d)
  printf '[[pool]]\nname = "t"\nkind = "lvm"\nvolume_group = "hft"\nthin_pool = "tp0"\noverprovision_ratio = 10.0\n' >"$w/c.toml"
  HOLDFAST_LOG=${HOLDFAST_LOG:-info,holdfast::exec=debug} "$hf" all-in-one --endpoint "unix://$w/csi.sock" --node-id vm \
    --config "$w/c.toml" --state-dir "$w/state" 2>"$w/log" &
  pid=$!
  for _ in $(seq 100); do [ -S "$w/csi.sock" ] && break; sleep 0.2; done
  ctl() { "$hf" ctl --endpoint "unix://$w/csi.sock" "$@" >/dev/null; }
  from=0 to=0
  for i in $(seq "$rounds"); do
    t0=$(ms); ctl info; t1=$(ms)
    echo $(((t1 - t0) / 1000000)) >>"$w/ctl"
    from=$(wc -l <"$w/log")
    t0=$(ms)
    # The id carries the volume's uid: taken from the answer, never built by hand.
    id=$("$hf" ctl --endpoint "unix://$w/csi.sock" create "v$n-$i" --size 1GiB | awk '$1 == "volume" { print $2 }')
    ctl stage "$id" --staging-path "$w/s$i"
    ctl publish "$id" --staging-path "$w/s$i" --target-path "$w/p$i"
    t1=$(ms)
    echo $(((t1 - t0) / 1000000)) >>"$w/hf"
    to=$(wc -l <"$w/log")
    ctl unpublish "$id" --target-path "$w/p$i"
    ctl unstage "$id" --staging-path "$w/s$i"
    ctl delete "$id"
    t0=$(ms)
    lvcreate -q -y -V 1G --thin -n "hand$n-$i" hft/tp0 >/dev/null
    mkfs.ext4 -q "/dev/hft/hand$n-$i"
    mkdir -p "$w/hs$i" "$w/hp$i"
    mount "/dev/hft/hand$n-$i" "$w/hs$i"
    mount --bind "$w/hs$i" "$w/hp$i"
    t1=$(ms)
    echo $(((t1 - t0) / 1000000)) >>"$w/hand"
    umount "$w/hp$i" "$w/hs$i"
    lvremove -q -y "hft/hand$n-$i" >/dev/null
  done
  c=$(median <"$w/ctl"); h=$(median <"$w/hf"); b=$(median <"$w/hand")
  echo "lvm thin, 1 GiB ext4, median of $rounds rounds (TCG guest), driver $hf ($("$hf" --version)):"
  echo "  holdfast create+stage+publish via ctl: ${h} ms (3 ctl processes); one \`ctl info\` alone: ${c} ms"
  echo "  by hand lvcreate+mkfs.ext4+mount+mount --bind: ${b} ms"
  # The driver's own time per call (its log: method=… ms=…), without the ctl processes. (Not
  # `ctl info` subtracted: its GetCapacity runs lvs and vgs in the driver, so it is no measure
  # of a process start.)
  d=0
  for m in CreateVolume NodeStageVolume NodePublishVolume; do
    v=$(grep "method=\"$m\".*ms=" "$w/log" | grep -o 'ms=[0-9.]*' | cut -d= -f2 | median || true)
    echo "  inside the driver: $m median ${v:-?} ms"
    d=$(awk -v d="$d" -v v="${v:-0}" 'BEGIN { print d + v }')
  done
  awk -v d="$d" -v b="$b" 'BEGIN {printf "  ratio holdfast (the three medians inside the driver, %d ms)/by hand: %.2fx\n", d, d / b}'
  echo "  the commands the driver ran in the last round (ms since the log line before):"
  sed -n "$((from + 1)),${to}p" "$w/log" | bash "$here/log-commands.sh"
  kill "$pid"
  wait "$pid" || true
done
vgremove -q -y hft >/dev/null
pvremove -q "$disk" >/dev/null
