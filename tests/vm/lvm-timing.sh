#!/bin/bash
# Times a ready-to-use 1 GiB thin ext4 volume in the test VM: holdfast (CreateVolume +
# NodeStage + NodePublish through `holdfast ctl` against `holdfast all-in-one`) against
# `lvcreate -V 1G --thin + mkfs.ext4 + mount + mount --bind` typed by hand, in the same boot.
# `holdfast ctl` is a new process per call; the cost of one (`ctl info`) is measured and
# subtracted, so the figure is the driver's.   Run: tests/vm/lvm-timing.sh (on the host).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
if [ ! -e /run/holdfast-vm ]; then
  cargo build --locked --quiet
  exec "$here/run" --disk hftime:4G -- bash tests/vm/lvm-timing.sh
fi
rounds=${HOLDFAST_TIMING_ROUNDS:-5}
pvcreate -q /dev/disk/by-id/virtio-hftime
vgcreate -q -s 1M hft /dev/disk/by-id/virtio-hftime
lvcreate -q -y --type thin-pool -L 3G -n tp0 hft >/dev/null
w=$(mktemp -d)
printf '[[pool]]\nname = "t"\nkind = "lvm"\nvolume_group = "hft"\nthin_pool = "tp0"\noverprovision_ratio = 10.0\n' >"$w/c.toml"
hf=target/debug/holdfast
$hf all-in-one --endpoint "unix://$w/csi.sock" --node-id vm --config "$w/c.toml" --state-dir "$w/state" 2>"$w/log" &
for _ in $(seq 50); do [ -S "$w/csi.sock" ] && break; sleep 0.2; done
ctl() { $hf ctl --endpoint "unix://$w/csi.sock" "$@" >/dev/null; }
ms() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for i in $(seq "$rounds"); do
  t0=$(ms); ctl info; t1=$(ms)
  echo $(((t1 - t0) / 1000000)) >>"$w/ctl"
  t0=$(ms)
  # The id carries the volume's uid: taken from the answer, never built by hand.
  id=$($hf ctl --endpoint "unix://$w/csi.sock" create "v$i" --size 1GiB | awk '$1 == "volume" { print $2 }')
  ctl stage "$id" --staging-path "$w/s$i"
  ctl publish "$id" --staging-path "$w/s$i" --target-path "$w/p$i"
  t1=$(ms)
  echo $(((t1 - t0) / 1000000)) >>"$w/hf"
  t0=$(ms)
  lvcreate -q -y -V 1G --thin -n "hand$i" hft/tp0 >/dev/null
  mkfs.ext4 -q "/dev/hft/hand$i"
  mkdir -p "$w/hs$i" "$w/hp$i"
  mount "/dev/hft/hand$i" "$w/hs$i"
  mount --bind "$w/hs$i" "$w/hp$i"
  t1=$(ms)
  echo $(((t1 - t0) / 1000000)) >>"$w/hand"
done
c=$(median <"$w/ctl"); h=$(median <"$w/hf"); b=$(median <"$w/hand")
d=$((h - 3 * c))
echo "lvm thin, 1 GiB ext4, median of $rounds rounds (TCG guest):"
echo "  holdfast create+stage+publish via ctl: ${h} ms; one ctl process alone: ${c} ms"
echo "  holdfast, without the 3 ctl process start-ups: ${d} ms"
echo "  by hand lvcreate+mkfs.ext4+mount+mount --bind: ${b} ms"
awk -v d="$d" -v b="$b" 'BEGIN {printf "  ratio holdfast/by hand: %.2fx\n", d / b}'
