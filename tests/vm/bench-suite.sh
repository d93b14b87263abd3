#!/bin/bash
# Benchmarks every operation against the raw tools on the VM's real pools, in one boot:
# `holdfast bench --ops all` against lvm thin, lvm thick, zfs (zvols), zfs datasets and nfs,
# each against the same commands typed by hand in the same volume group, zpool or export
# (src/bench/recipe.rs says which). A bench command, not a test: it is not in scripts/test.
#
#   tests/vm/bench-suite.sh [KIND...]      # on the host; default: all five kinds
#
# KIND: lvm-thin lvm-thick zfs zfs-dataset nfs. Environment: HOLDFAST_BENCH_COUNT (calls per
# series, default 16), HOLDFAST_BENCH_CONCURRENCY (default 1,16), HOLDFAST_BENCH_SIZE (default
# 64MiB), HOLDFAST_BENCH_BIN (default target/release/holdfast: build it first with
# /work/wt/cargo-rel or `cargo build --release`), HOLDFAST_BENCH_OUT (default
# target/bench-vm: one KIND.json and KIND.svg per kind, written as each finishes, and
# machine.txt), HOLDFAST_VM_TIMEOUT (seconds, default 3600).
# Then: holdfast bench --plot docs/bench-vm.svg --plot-from target/bench-vm/KIND.json ...
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
kinds_all=(lvm-thin lvm-thick zfs zfs-dataset nfs)

if [ ! -e /run/holdfast-vm ]; then
  cd "$repo"
  bin=${HOLDFAST_BENCH_BIN:-$repo/target/release/holdfast}
  [ -x "$bin" ] || { echo "bench-suite: no $bin: build the release binary first" >&2; exit 1; }
  out=${HOLDFAST_BENCH_OUT:-$repo/target/bench-vm}
  mkdir -p "$out"
  { echo "host: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
    echo "host load before the VM: $(uptime)"
    echo "binary: $bin"; } >"$out/machine.txt"
  export HOLDFAST_BENCH_BIN=$bin HOLDFAST_BENCH_OUT=$out
  . "$here/local-bins.sh"
  export HOLDFAST_VM_LOCAL_BINS="$bin"
  vm_bins_strip "$bin"
  exec "$here/run" -v --zfs --disk hfblvm:8G --disk hfbzfs:6G --timeout "${HOLDFAST_VM_TIMEOUT:-3600}" \
    -- "$here/bench-suite.sh" "$@"
fi

# --- guest side ------------------------------------------------------------------------------
[ "${1:-}" = "--" ] && shift
kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=("${kinds_all[@]}")
. "$here/local-bins.sh"
vm_bins_local ${HOLDFAST_VM_LOCAL_BINS:-}
bin=$HOLDFAST_BENCH_BIN out=$HOLDFAST_BENCH_OUT
count=${HOLDFAST_BENCH_COUNT:-16} conc=${HOLDFAST_BENCH_CONCURRENCY:-1,16} size=${HOLDFAST_BENCH_SIZE:-64MiB}
{ echo "guest: $(nproc) CPUs (qemu TCG), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
  echo "guest load at the start: $(uptime)"; } >>"$out/machine.txt"

set -e
pvcreate -q /dev/disk/by-id/virtio-hfblvm
vgcreate -q -s 1M hfb /dev/disk/by-id/virtio-hfblvm
lvcreate -q -y --type thin-pool -L 3G -n tp0 hfb >/dev/null
zpool create -f -o ashift=12 -O mountpoint=none hfbz /dev/disk/by-id/virtio-hfbzfs
for d in hf-zvol hf-ds hand-zvol hand-ds; do zfs create -o mountpoint=none "hfbz/$d"; done
export_dir=/srv/hfb-nfs
mkdir -p "$export_dir" /mnt/hfb-nfs
holdfast-vm-nfs-start >/dev/null
exportfs -o rw,no_root_squash,insecure,no_subtree_check,sync "127.0.0.1:$export_dir"
mkdir -p "$export_dir/hand"
mount -t nfs -o nfsvers=4.2 "127.0.0.1:$export_dir/hand" /mnt/hfb-nfs
set +e

w=$(mktemp -d /var/tmp/hfb.XXXXXX)
config() {  # config KIND: the pool of that kind
  case $1 in
    lvm-thin) printf '[[pool]]\nname = "b"\nkind = "lvm"\nvolume_group = "hfb"\nthin_pool = "tp0"\noverprovision_ratio = 10.0\n' ;;
    lvm-thick) printf '[[pool]]\nname = "b"\nkind = "lvm"\nvolume_group = "hfb"\n' ;;
    zfs) printf '[[pool]]\nname = "b"\nkind = "zfs"\ndataset = "hfbz/hf-zvol"\ndefault_fs = "ext4"\n' ;;
    zfs-dataset) printf '[[pool]]\nname = "b"\nkind = "zfs"\ndataset = "hfbz/hf-ds"\n' ;;
    nfs) printf '[[pool]]\nname = "b"\nkind = "nfs"\nserver = "127.0.0.1"\nexport = "%s"\nmount_options = ["nfsvers=4.2"]\n' "$export_dir" ;;
  esac
}
by_hand() {
  case $1 in
    lvm-thin) echo lvm-thin:hfb/tp0 ;;
    lvm-thick) echo lvm-thick:hfb ;;
    zfs) echo zfs:hfbz/hand-zvol ;;
    zfs-dataset) echo zfs-dataset:hfbz/hand-ds ;;
    nfs) echo "nfs:/mnt/hfb-nfs=127.0.0.1:$export_dir/hand" ;;
  esac
}
fs_of() { case $1 in nfs) echo nfs ;; zfs-dataset) echo zfs ;; *) echo ext4 ;; esac; }

failed=0
for k in "${kinds[@]}"; do
  d=$w/$k
  mkdir -p "$d/work"
  config "$k" >"$d/config.toml"
  t0=$(date +%s%N)
  "$bin" all-in-one --endpoint "unix://$d/csi.sock" --node-id vm --config "$d/config.toml" --state-dir "$d/state" 2>"$d/driver.log" &
  pid=$!
  ready=
  for _ in $(seq 3000); do
    if [ -S "$d/csi.sock" ]; then ready=$((($(date +%s%N) - t0) / 1000000)); break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.01
  done
  if [ -z "$ready" ]; then
    echo "== $k: the driver did not serve its socket; its log:" && tail -n 20 "$d/driver.log"
    failed=1
    continue
  fi
  sleep 2 # idle memory means idle
  echo "== $k: $(uptime)"
  t=$SECONDS
  "$bin" bench --endpoint "unix://$d/csi.sock" --driver-pid "$pid" --workdir "$d/work" --startup-ms "$ready" \
    --ops all --count "$count" --ops-concurrency "$conc" --size "$size" --fs-type "$(fs_of "$k")" \
    --by-hand "$(by_hand "$k")" --json >"$out/$k.json" 2>"$d/bench.err"
  rc=$?
  kill -TERM "$pid"; wait "$pid"
  if [ $rc -ne 0 ]; then
    echo "== $k: holdfast bench failed ($rc):"; cat "$d/bench.err"; tail -n 20 "$d/driver.log"
    failed=1
    continue
  fi
  "$bin" bench --plot "$out/$k.svg" --plot-from "$out/$k.json" || failed=1
  echo "== $k: done in $((SECONDS - t))s"
  cat "$out/$k.json"; echo
done
echo "guest load at the end: $(uptime)" >>"$out/machine.txt"
# Anything the benchmark left behind is a bug of the benchmark: say so.
left=$(lvs --noheadings -o lv_name hfb | grep -v -w tp0 | wc -l)
left_zfs=$(zfs list -H -r -t all -o name hfbz | grep -c -E '/(hf|hand)-[a-z]+/')
[ "$left" = 0 ] && [ "$left_zfs" = 0 ] || { echo "== left behind: $left LVs, $left_zfs datasets"; lvs hfb; zfs list -r -t all hfbz; failed=1; }
exit $failed
