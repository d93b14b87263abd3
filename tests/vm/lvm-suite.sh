#!/bin/bash
# The LVM pool, proven on real LVM inside the test VM (device-mapper, thin pools):
#
#   tests/vm/lvm-suite.sh            on the host: builds the test binaries here (cargo under
#                                    TCG would take ages), boots the VM with two disks and
#                                    runs this script again inside it
#
# Inside the VM (`--guest LVM_TEST_BIN CONFORMANCE_BIN`) it makes the volume groups on the VM
# disks and runs these stages (tests/vm/suite-lib.sh), timing each:
#   1. tests/lvm.rs (the binary): real LVM tests, each on its own loop-device VG;
#   2. tests/conformance.rs on a thick pool (tests/fixtures/lvm/conformance-thick.toml), all of it
#      (thick pools have COW snapshots and block-copied restores and clones since issue 12);
#   3. tests/conformance.rs on a thin pool (tests/fixtures/lvm/conformance-thin.toml), all of it,
#      against all-in-one;
#   4. the same against `holdfast controller` + one `holdfast agent` (HOLDFAST_TOPOLOGY=split);
#   5. every test binary of `pool_tests` below whose tests/NAME.rs exists, on the thick and the
#      thin pool (HOLDFAST_TEST_CONFIG names the pool's config, as for conformance).
# Every stage runs even when an earlier one failed; the exit status is non-zero if any failed,
# or if the suite's LVs are left behind. HOLDFAST_REQUIRE_REAL=1 is set in the guest, so a test
# binary that cannot use real LVM fails instead of reporting "NOT RUN".
# The guest runs copies of the binaries in its RAM (tests/vm/local-bins.sh): a host rebuild of
# target/debug meanwhile cannot crash the drivers under test.
# Environment: HOLDFAST_LVM_SUITE_TIMEOUT (seconds, default 5400: about 3.5× what the suite takes
# on an idle 2-core CI machine, so a loaded or slower machine still finishes), HOLDFAST_TEST_THREADS
# (conformance threads in the guest, default 2), HOLDFAST_LVM_STAGES (default every stage; "4"
# only stage 4, "-4" all but stage 4: tests/vm/suite-lib.sh); extra arguments after the binaries
# go to every test binary (e.g. a name filter).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"

# Test binaries that drive a pool through HOLDFAST_TEST_CONFIG, run like conformance on every pool
# of this suite when their file exists in the tree.
pool_tests=(hostile concurrency)

if [ "${1:-}" != --guest ]; then
  echo "lvm-suite: building the test binaries on the host"
  present=()
  for t in "${pool_tests[@]}"; do
    if [ -e "tests/$t.rs" ]; then present+=("$t"); else echo "lvm-suite: tests/$t.rs is not in this tree: not run"; fi
  done
  json=$(cargo test --locked --no-run --message-format=json --test lvm --test conformance "${present[@]/#/--test=}")
  exe() {  # exe TARGET: the test executable cargo built for TARGET
    grep '"reason":"compiler-artifact"' <<<"$json" | grep "\"name\":\"$1\",\"src_path\"" | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -n1
  }
  lvm_bin=$(exe lvm)
  conf_bin=$(exe conformance)
  if [ ! -x "$lvm_bin" ] || [ ! -x "$conf_bin" ]; then
    echo "lvm-suite: cannot find the built test binaries ($lvm_bin, $conf_bin)" >&2
    exit 2
  fi
  HOLDFAST_POOL_TEST_BINS=""
  for t in "${present[@]}"; do
    b=$(exe "$t")
    [ -x "$b" ] || { echo "lvm-suite: cannot find the built test binary of tests/$t.rs" >&2; exit 2; }
    HOLDFAST_POOL_TEST_BINS+="$b "
  done
  export HOLDFAST_POOL_TEST_BINS
  hf_bin=$(grep '"reason":"compiler-artifact"' <<<"$json" | grep '"kind":\["bin"\]' | grep -o '"executable":"[^"]*holdfast"' | cut -d'"' -f4 | tail -n1)
  [ -x "$hf_bin" ] || { echo "lvm-suite: cannot find the built holdfast binary" >&2; exit 2; }
  # Run from the guest's RAM (tests/vm/local-bins.sh says why).
  . "$here/local-bins.sh"
  export HOLDFAST_VM_LOCAL_BINS="$hf_bin $lvm_bin $conf_bin $HOLDFAST_POOL_TEST_BINS"
  vm_bins_strip $HOLDFAST_VM_LOCAL_BINS
  exec "$here/run" --disk hfthick:4G --disk hfthin:4G --timeout "${HOLDFAST_LVM_SUITE_TIMEOUT:-5400}" \
    -- bash tests/vm/lvm-suite.sh --guest "$lvm_bin" "$conf_bin" "$@"
fi

shift
lvm_bin=$1
conf_bin=$2
shift 2
if [ ! -e /run/holdfast-vm ]; then
  echo "lvm-suite: --guest only runs inside the test VM (it wipes the VM's disks)" >&2
  exit 2
fi
export LVM_SUPPRESS_FD_WARNINGS=1 RUST_BACKTRACE=${RUST_BACKTRACE:-0}
# The test binaries must run here: anything missing is a failure, never "NOT RUN".
export HOLDFAST_REQUIRE_REAL=1
threads=${HOLDFAST_TEST_THREADS:-2}

. tests/vm/local-bins.sh
. tests/vm/suite-lib.sh
suite_init lvm-suite "${HOLDFAST_LVM_STAGES:-}"
start=$SECONDS
vm_bins_local ${HOLDFAST_VM_LOCAL_BINS:-}
echo "== lvm-suite: volume groups on the VM disks"
pvcreate -q /dev/disk/by-id/virtio-hfthick /dev/disk/by-id/virtio-hfthin
vgcreate -q -s 1M hfthick /dev/disk/by-id/virtio-hfthick
vgcreate -q -s 1M hfthin /dev/disk/by-id/virtio-hfthin
lvcreate -q -y --type thin-pool -L 3G -n tp0 hfthin
vgs -o vg_name,vg_size,vg_free hfthick hfthin
lvs -o lv_name,vg_name,lv_size,lv_attr hfthin
echo "   ($((SECONDS - start))s)"

stage 1 "tests/lvm.rs (real LVM)" "$lvm_bin" "$@"
stage 2 "conformance, thick LVM pool" env HOLDFAST_TEST_CONFIG=tests/fixtures/lvm/conformance-thick.toml \
  "$conf_bin" --test-threads="$threads" "$@"
stage 3 "conformance, thin LVM pool" env HOLDFAST_TEST_CONFIG=tests/fixtures/lvm/conformance-thin.toml \
  "$conf_bin" --test-threads="$threads" "$@"
stage 4 "conformance, thin LVM pool, controller + agent" env HOLDFAST_TOPOLOGY=split \
  HOLDFAST_TEST_CONFIG=tests/fixtures/lvm/conformance-thin.toml "$conf_bin" --test-threads="$threads" "$@"
# On the thick pool, tests/hostile.rs runs only its group tests: thick LVM refuses groups and has
# snapshots of its own (COW LVs), which those tests call on. Its other tests are the node's
# (mounts, symlinks, stage records: the same code for an ext4 thick LV as for an ext4 thin LV,
# run on the thin pool) and ControllerModifyVolume's (no mutable key on either kind of LVM pool).
thick_filter() {  # thick_filter NAME: the name filter of tests/NAME.rs on the thick pool, if any
  case $1 in hostile) echo hostile_group_ ;; esac
}
thick_pool_test() {  # thick_pool_test BIN FILTER ARG...
  local bin=$1 filter=$2
  shift 2
  if [ -n "$filter" ]; then
    [ "$("$bin" --list --format terse "$filter" | grep -c ': test$')" -ge 2 ] || {
      echo "lvm-suite: the thick filter $filter names fewer than the 2 group tests of $(basename "$bin")" >&2
      return 1
    }
  fi
  pool_test HOLDFAST_TEST_CONFIG=tests/fixtures/lvm/conformance-thick.toml "$bin" --test-threads="$threads" $filter "$@"
}
for bin in ${HOLDFAST_POOL_TEST_BINS:-}; do
  t=$(basename "$bin")
  t=${t%-*}
  filter=$(thick_filter "$t")
  stage 5 "tests/$t.rs, thick LVM pool${filter:+ (only $filter*)}" thick_pool_test "$bin" "$filter" "$@"
  stage 5 "tests/$t.rs, thin LVM pool" pool_test HOLDFAST_TEST_CONFIG=tests/fixtures/lvm/conformance-thin.toml \
    "$bin" --test-threads="$threads" "$@"
done

suite_summary
# Every test deletes what it made: an LV left behind is a failure too.
if ! left=$(lvs --noheadings -o lv_name,vg_name -S 'lv_name!=tp0' hfthick hfthin); then
  failed+=("listing the LVs left behind")
elif [ -n "${left//[[:space:]]/}" ]; then
  echo "   left behind in the volume groups (should be none):"
  echo "$left" | sed 's/^/     /'
  failed+=("LVs left behind")
else
  echo "   left behind in the volume groups: nothing"
fi
suite_end
