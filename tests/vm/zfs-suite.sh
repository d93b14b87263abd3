#!/bin/bash
# The ZFS pool, proven on real ZFS inside the test VM (OpenZFS 2.1, zfs-dkms):
#
#   tests/vm/zfs-suite.sh            on the host: builds the test binaries and holdfast here
#                                    (cargo under TCG would take ages), boots the ZFS VM with
#                                    one disk and runs this script again inside it
#
# Inside the VM (`--guest ZFS_TEST_BIN CONFORMANCE_BIN HOLDFAST_BIN`) it creates the zpool
# `hfzfs` on the VM disk and runs these stages (tests/vm/suite-lib.sh), timing each:
#   1. tests/zfs.rs (the binary): real ZFS tests, each in its own parent dataset;
#   2. tests/conformance.rs on datasets (tests/fixtures/zfs/conformance-dataset.toml, fs zfs);
#   3. tests/conformance.rs on zvols formatted ext4 (tests/fixtures/zfs/conformance-zvol.toml);
#   4. the time to a ready-to-use volume: CreateVolume + NodeStage + NodePublish through
#      `holdfast ctl` against `holdfast all-in-one`, against `zfs create` + `mount -t zfs` +
#      `mount --bind` typed by hand, in the same run (HOLDFAST_ZFS_TIMING_ROUNDS, default 5);
#   5. tests/conformance.rs on zvols formatted xfs (same config as 3): only the tests in which
#      the filesystem matters (`fs_tests` below: making, freezing, copying, growing, watching
#      it); the rest is the pool's own behaviour, already run on ext4 zvols;
#   6. every test binary of `pool_tests` below whose tests/NAME.rs exists, on the dataset pool
#      (fs zfs) and the zvol pool (fs ext4), as for conformance (HOLDFAST_TEST_CONFIG);
#   7. tests/conformance.rs on datasets as in 2, against `holdfast controller` + one
#      `holdfast agent` (HOLDFAST_TOPOLOGY=split) instead of all-in-one.
# Every stage runs even when an earlier one failed; the exit status is non-zero if any failed,
# or if datasets are left behind below the conformance parents. HOLDFAST_REQUIRE_REAL=1 is set in
# the guest, so a test binary that cannot use real ZFS fails instead of reporting "NOT RUN".
# Environment: HOLDFAST_ZFS_TARGET (cargo target dir inside the repository, default
# target/zfs-vm), HOLDFAST_ZFS_SUITE_TIMEOUT (seconds, default 5400: about 3.5× what the suite takes on an idle 2-core CI machine), HOLDFAST_TEST_THREADS
# (conformance threads in the guest, default 2), HOLDFAST_ZFS_STAGES (default every stage; "7"
# only stage 7, "-7" all but stage 7: tests/vm/suite-lib.sh); extra arguments after the
# binaries go to every test binary (a name filter).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"

# Test binaries that drive a pool through HOLDFAST_TEST_CONFIG, run like conformance on every pool
# of this suite when their file exists in the tree.
pool_tests=(hostile concurrency)

if [ "${1:-}" != --guest ]; then
  # A target directory of its own: others building in the shared target/ would rewrite
  # target/debug/holdfast under the running VM, whose drivers then die with SIGSEGV.
  export CARGO_TARGET_DIR=${HOLDFAST_ZFS_TARGET:-$repo/target/zfs-vm}
  echo "zfs-suite: building the test binaries on the host (in $CARGO_TARGET_DIR)"
  present=()
  for t in "${pool_tests[@]}"; do
    if [ -e "tests/$t.rs" ]; then present+=("$t"); else echo "zfs-suite: tests/$t.rs is not in this tree: not run"; fi
  done
  json=$(cargo test --locked --no-run --message-format=json --test zfs --test conformance "${present[@]/#/--test=}")
  exe() {  # exe TARGET: the test executable cargo built for TARGET
    grep '"reason":"compiler-artifact"' <<<"$json" | grep "\"name\":\"$1\",\"src_path\"" | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -n1
  }
  zfs_bin=$(exe zfs)
  conf_bin=$(exe conformance)
  hf_bin=$(grep '"reason":"compiler-artifact"' <<<"$json" | grep '"kind":\["bin"\]' | grep -o '"executable":"[^"]*holdfast"' | cut -d'"' -f4 | tail -n1)
  if [ ! -x "$zfs_bin" ] || [ ! -x "$conf_bin" ] || [ ! -x "$hf_bin" ]; then
    echo "zfs-suite: cannot find the built binaries ($zfs_bin, $conf_bin, $hf_bin)" >&2
    exit 2
  fi
  HOLDFAST_POOL_TEST_BINS=""
  for t in "${present[@]}"; do
    b=$(exe "$t")
    [ -x "$b" ] || { echo "zfs-suite: cannot find the built test binary of tests/$t.rs" >&2; exit 2; }
    HOLDFAST_POOL_TEST_BINS+="$b "
  done
  export HOLDFAST_POOL_TEST_BINS
  # Run from the guest's RAM (tests/vm/local-bins.sh says why).
  . "$here/local-bins.sh"
  export HOLDFAST_VM_LOCAL_BINS="$hf_bin $zfs_bin $conf_bin $HOLDFAST_POOL_TEST_BINS"
  vm_bins_strip $HOLDFAST_VM_LOCAL_BINS
  exec "$here/run" --zfs --disk hfzfs:6G --timeout "${HOLDFAST_ZFS_SUITE_TIMEOUT:-5400}" \
    -- bash tests/vm/zfs-suite.sh --guest "$zfs_bin" "$conf_bin" "$hf_bin" "$@"
fi

shift
zfs_bin=$1
conf_bin=$2
hf_bin=$3
shift 3
if [ ! -e /run/holdfast-vm ]; then
  echo "zfs-suite: --guest only runs inside the test VM (it wipes the VM's disk)" >&2
  exit 2
fi
export RUST_BACKTRACE=${RUST_BACKTRACE:-0}
# The test binaries must run here: anything missing is a failure, never "NOT RUN".
export HOLDFAST_REQUIRE_REAL=1
threads=${HOLDFAST_TEST_THREADS:-2}

. tests/vm/local-bins.sh
. tests/vm/suite-lib.sh
suite_init zfs-suite "${HOLDFAST_ZFS_STAGES:-}"
start=$SECONDS
vm_bins_local ${HOLDFAST_VM_LOCAL_BINS:-}
echo "== zfs-suite: zpool hfzfs on the VM disk ($(zfs version | head -n1))"
zpool create -f -o ashift=12 -O mountpoint=none hfzfs /dev/disk/by-id/virtio-hfzfs
zpool list -o name,size,free,health hfzfs
echo "   ($((SECONDS - start))s)"

now() { date +%s.%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%d", (b - a) * 1000 }'; }

# The time to a ready-to-use dataset volume, through holdfast and by hand, ROUNDS times each,
# interleaved so that both see the same machine load.
timing() {
  local rounds=${HOLDFAST_ZFS_TIMING_ROUNDS:-5} dir=/tmp/hf-timing i t0 t1 t2 t3 id from=0 to=0
  mkdir -p "$dir"
  local sock=$dir/csi.sock ep="unix://$dir/csi.sock"
  rm -f "$sock"  # an earlier timing's driver's: not this one's socket
  # Every command the driver runs is logged: the last round's are printed below.
  HOLDFAST_LOG=${HOLDFAST_LOG:-info,holdfast::exec=debug} "$hf_bin" all-in-one --endpoint "$ep" --node-id timing --config tests/fixtures/zfs/conformance-dataset.toml >"$dir/driver.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || { echo "timing: the driver did not open $sock within 10 s:"; cat "$dir/driver.log"; return 1; }
  local ctl=("$hf_bin" ctl --endpoint "$ep")
  local hf=() hand=()
  for i in $(seq "$rounds"); do
    mkdir -p "$dir/s$i" "$dir/t$i" "$dir/hs$i" "$dir/ht$i"
    from=$(wc -l <"$dir/driver.log")
    t0=$(now)
    # The id carries the volume's uid: taken from the answer, never built by hand.
    id=$("${ctl[@]}" create "timing-$i" --size 64MiB --fs zfs --param pool=zfs-ds | awk '$1 == "volume" { print $2 }')
    t1=$(now)
    [ -n "$id" ] || { echo "timing: ctl create printed no volume id"; return 1; }
    "${ctl[@]}" stage "$id" --staging-path "$dir/s$i" >/dev/null
    t2=$(now)
    "${ctl[@]}" publish "$id" --staging-path "$dir/s$i" --target-path "$dir/t$i" >/dev/null
    t3=$(now)
    hf+=("$(ms "$t0" "$t1") $(ms "$t1" "$t2") $(ms "$t2" "$t3") $(ms "$t0" "$t3")")
    to=$(wc -l <"$dir/driver.log")
    "${ctl[@]}" unpublish "$id" --target-path "$dir/t$i" >/dev/null
    "${ctl[@]}" unstage "$id" --staging-path "$dir/s$i" >/dev/null
    "${ctl[@]}" delete "$id" >/dev/null

    t0=$(now)
    zfs create -o mountpoint=legacy -o refquota=64M -o compression=lz4 "hfzfs/byhand-$i"
    t1=$(now)
    mount -t zfs "hfzfs/byhand-$i" "$dir/hs$i"
    t2=$(now)
    mount --bind "$dir/hs$i" "$dir/ht$i"
    t3=$(now)
    hand+=("$(ms "$t0" "$t1") $(ms "$t1" "$t2") $(ms "$t2" "$t3") $(ms "$t0" "$t3")")
    umount "$dir/ht$i" "$dir/hs$i"
    zfs destroy "hfzfs/byhand-$i"
  done
  report() {  # report LABEL "create stage publish total"...
    local label=$1
    shift
    printf '%s\n' "$@" | sort -n -k4 | awk -v label="$label" '
      { c[NR] = $1; s[NR] = $2; p[NR] = $3; t[NR] = $4 }
      END { m = int((NR + 1) / 2)
            printf "   %-34s median total %5d ms (create %d, stage %d, publish %d); min %d, max %d ms over %d rounds\n",
                   label, t[m], c[m], s[m], p[m], t[1], t[NR], NR }'
  }
  echo "   time to a ready-to-use 64 MiB dataset volume (medians by total; steps of that round):"
  report "holdfast ctl (CSI, all-in-one)" "${hf[@]}"
  report "by hand (zfs create, mount ×2)" "${hand[@]}"
  echo "   (each holdfast step is one \`holdfast ctl\` process: start, connect, one RPC; by hand each"
  echo "    step is one zfs/mount process)"
  # The same calls as the driver timed them (its log: method=… ms=…), without the ctl process.
  for m in CreateVolume NodeStageVolume NodePublishVolume; do
    grep -q "method=\"$m\".*ms=" "$dir/driver.log" || { echo "timing: the driver logged no timed $m call"; return 1; }
    grep "method=\"$m\"" "$dir/driver.log" | grep -o 'ms=[0-9.]*' | cut -d= -f2 | sort -n |
      awk -v m="$m" '{ v[NR] = $1 } END { if (NR) printf "   inside the driver: %-18s median %6.1f ms (min %.1f, max %.1f, %d calls)\n", m, v[int((NR + 1) / 2)], v[1], v[NR], NR }'
  done
  echo "   the commands the driver ran in the last round (ms since the log line before):"
  sed -n "$((from + 1)),${to}p" "$dir/driver.log" | bash tests/vm/log-commands.sh
  t0=$(now)
  for i in $(seq "$rounds"); do "${ctl[@]}" info >/dev/null; done
  t1=$(now)
  echo "   one \`holdfast ctl info\` (process start + connect + 4 cheap RPCs): $(( $(ms "$t0" "$t1") / rounds )) ms"
  kill "$pid"
  local st=0
  wait "$pid" || st=$?
  # 143: it was still handling SIGTERM's default action; anything else is a driver that failed.
  [ "$st" = 0 ] || [ "$st" = 143 ] || { echo "timing: the driver exited with status $st on SIGTERM"; return 1; }
}

# The capacity test compares GetCapacity before and after a create, so it runs alone, once
# ZFS has finished freeing what the other tests destroyed (it frees asynchronously, and on a thin
# pool that shared growth is larger than what a create takes).
capacity_test=get_capacity_is_positive_and_does_not_grow_after_create
conformance() {  # conformance CONFIG FS
  local rc=0
  HOLDFAST_TEST_CONFIG=$1 HOLDFAST_TEST_FS=$2 "$conf_bin" --test-threads="$threads" --skip "$capacity_test" "${extra[@]}" || rc=$?
  for _ in $(seq 120); do [ "$(zpool get -H -p -o value freeing hfzfs)" = 0 ] && break; sleep 0.5; done
  HOLDFAST_TEST_CONFIG=$1 HOLDFAST_TEST_FS=$2 "$conf_bin" --exact "$capacity_test" || rc=$?
  return $rc
}

# The conformance tests whose outcome depends on the filesystem (stage 5 runs only these on a
# second filesystem): a test added to tests/conformance.rs that formats, freezes, copies,
# grows or watches a filesystem belongs here.
fs_tests=(
  filesystem_volume_full_lifecycle_is_idempotent
  get_capacity_minimum_volume_size_is_the_smallest_volume_that_can_be_made
  create_volume_with_another_fs_type_is_already_exists
  read_only_publish_rejects_writes
  snapshot_restores_the_written_data
  clone_copies_the_source_volume
  expansion_grows_the_mounted_filesystem
  offline_expansion_grows_the_filesystem_at_next_stage
  unmounted_staging_path_reports_abnormal_condition
  stats_and_expand_answer_not_found_for_paths_that_are_not_the_volumes
)
fs_conformance() {  # fs_conformance CONFIG FS
  # A renamed test would silently drop out of the filter: every name must still exist.
  local listed t
  listed=$("$conf_bin" --list --format terse)
  for t in "${fs_tests[@]}"; do
    grep -qx "$t: test" <<<"$listed" || { echo "zfs-suite: fs_tests names $t, which tests/conformance.rs no longer has" >&2; return 1; }
  done
  HOLDFAST_TEST_CONFIG=$1 HOLDFAST_TEST_FS=$2 "$conf_bin" --test-threads="$threads" --exact "${fs_tests[@]}" "${extra[@]}"
}

# The same against controller + agent (`stage` runs it in a subshell: the export stays there).
split_conformance() {
  export HOLDFAST_TOPOLOGY=split
  conformance "$@"
}

extra=("$@")
stage 1 "tests/zfs.rs (real ZFS)" "$zfs_bin" "${extra[@]}"
stage 2 "conformance, ZFS datasets (fs zfs)" conformance tests/fixtures/zfs/conformance-dataset.toml zfs
stage 3 "conformance, zvols (fs ext4)" conformance tests/fixtures/zfs/conformance-zvol.toml ext4
# HOLDFAST_TIMING_BINS="PATH...": each of these drivers in turn (a before/after in one boot).
for b in ${HOLDFAST_TIMING_BINS:-$hf_bin}; do
  hf_bin=$b stage 4 "timing: ready-to-use volume${HOLDFAST_TIMING_BINS:+ ($b)}" timing
done
stage 5 "conformance, zvols (fs xfs), filesystem tests" fs_conformance tests/fixtures/zfs/conformance-zvol.toml xfs
for bin in ${HOLDFAST_POOL_TEST_BINS:-}; do
  t=$(basename "$bin")
  t=${t%-*}
  stage 6 "tests/$t.rs, ZFS datasets (fs zfs)" pool_test HOLDFAST_TEST_CONFIG=tests/fixtures/zfs/conformance-dataset.toml \
    HOLDFAST_TEST_FS=zfs "$bin" --test-threads="$threads" "${extra[@]}"
  stage 6 "tests/$t.rs, zvols (fs ext4)" pool_test HOLDFAST_TEST_CONFIG=tests/fixtures/zfs/conformance-zvol.toml \
    HOLDFAST_TEST_FS=ext4 "$bin" --test-threads="$threads" "${extra[@]}"
done
stage 7 "conformance, ZFS datasets, controller + agent" split_conformance tests/fixtures/zfs/conformance-dataset.toml zfs

suite_summary
# Every test destroys what it made: only the zpool and the conformance parents may remain.
if ! left=$(zfs list -H -r -t all -o name hfzfs); then
  failed+=("listing the datasets left behind")
elif left=$(grep -v -x -e hfzfs -e hfzfs/conformance-ds -e hfzfs/conformance-zvol <<<"$left"); then
  echo "   left behind in hfzfs (should be nothing below the conformance parents):"
  echo "$left" | sed 's/^/     /'
  failed+=("datasets left behind")
else
  echo "   left behind in hfzfs: nothing below the conformance parents"
fi
suite_end
