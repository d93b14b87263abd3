#!/bin/bash
# The thin-LVM code that depends on the kernel, on a kernel of today (issue 12): Debian 12 with
# bookworm-backports' Linux 6.12 (`tests/vm/run --kernel backports`), where a group snapshot of
# mounted ext4/XFS thin volumes is taken (LVM's freeze nests in ours from Linux 6.6) instead of
# refused as on the stock 6.1 of tests/vm/lvm-suite.sh.
#
#   tests/vm/lvm-newkernel-suite.sh   on the host: builds the conformance binary here, boots the
#                                     backports VM with one disk and runs this script inside it
#
# Inside the VM (`--guest CONFORMANCE_BIN`), timing each stage (tests/vm/suite-lib.sh):
#   1. tests/vm/group/probe-freeze-then-lvcreate.sh, asserted: for ext4, xfs and btrfs, both
#      lvcreate --snapshot of two frozen mounted thin LVs succeed and the two snapshots hold one
#      point of an ordered writer (B never has a record A lacks, A at most one more);
#   2. tests/vm/group/probe-suspend-then-lvcreate.sh, asserted: holdfast never suspends members
#      itself because an lvcreate of a suspended thin origin fails; the stage fails if that
#      stops being true, so the choice is looked at again;
#   3. tests/conformance.rs on a thin pool, the group and snapshot tests (name filter), with
#      ext4, then the group tests with xfs and btrfs.
# Every stage runs even when an earlier one failed; the exit status is non-zero if any failed,
# or if LVs of the suite's volume group are left behind. HOLDFAST_REQUIRE_REAL=1 is set in the
# guest. About 10 minutes on an idle 2-core machine.
# The guest runs copies of the binaries in its RAM (tests/vm/local-bins.sh).
# Environment: HOLDFAST_LVM_NEWKERNEL_TIMEOUT (seconds, default 2400), HOLDFAST_TEST_THREADS
# (conformance threads in the guest, default 2), HOLDFAST_LVM_NEWKERNEL_STAGES (default every
# stage; "3" only stage 3, "-3" all but 3).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"

if [ "${1:-}" != --guest ]; then
  echo "lvm-newkernel-suite: building the test binaries on the host"
  json=$(cargo test --locked --no-run --message-format=json --test conformance)
  conf_bin=$(grep '"reason":"compiler-artifact"' <<<"$json" | grep '"name":"conformance","src_path"' |
    grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -n1)
  if [ ! -x "$conf_bin" ]; then
    echo "lvm-newkernel-suite: cannot find the built conformance binary ($conf_bin)" >&2
    exit 2
  fi
  hf_bin=$(grep '"reason":"compiler-artifact"' <<<"$json" | grep '"kind":\["bin"\]' | grep -o '"executable":"[^"]*holdfast"' | cut -d'"' -f4 | tail -n1)
  [ -x "$hf_bin" ] || { echo "lvm-newkernel-suite: cannot find the built holdfast binary" >&2; exit 2; }
  # Run from the guest's RAM (tests/vm/local-bins.sh says why).
  . "$here/local-bins.sh"
  export HOLDFAST_VM_LOCAL_BINS="$hf_bin $conf_bin"
  vm_bins_strip $HOLDFAST_VM_LOCAL_BINS
  exec "$here/run" --kernel backports --disk hfthin:4G --timeout "${HOLDFAST_LVM_NEWKERNEL_TIMEOUT:-2400}" \
    -- bash tests/vm/lvm-newkernel-suite.sh --guest "$conf_bin"
fi

conf_bin=$2
if [ ! -e /run/holdfast-vm ]; then
  echo "lvm-newkernel-suite: --guest only runs inside the test VM (it wipes the VM's disks)" >&2
  exit 2
fi
export LVM_SUPPRESS_FD_WARNINGS=1 RUST_BACKTRACE=${RUST_BACKTRACE:-0}
export HOLDFAST_REQUIRE_REAL=1
threads=${HOLDFAST_TEST_THREADS:-2}
. tests/vm/local-bins.sh
. tests/vm/suite-lib.sh
suite_init lvm-newkernel-suite "${HOLDFAST_LVM_NEWKERNEL_STAGES:-}"
vm_bins_local ${HOLDFAST_VM_LOCAL_BINS:-}
echo "== lvm-newkernel-suite: Linux $(uname -r)"
release=$(uname -r)
IFS=.- read -r major minor _ <<<"$release"
if ((major < 6 || (major == 6 && minor < 6))); then
  echo "lvm-newkernel-suite: the VM runs Linux $release, not 6.6 or later: wrong image" >&2
  exit 1
fi

# The probes make volume group gp on a loop device in /tmp: removed after each.
drop_probe_vg() {
  local pv
  pv=$(pvs --noheadings -o pv_name -S vg_name=gp 2>/dev/null | tr -d ' ')
  vgremove -q -ff -y gp >/dev/null 2>&1 || true
  [ -z "$pv" ] || losetup -d "$pv" || true
  rm -f /tmp/pv.img
}

# probe SCRIPT CHECK: runs the probe, then CHECK (an awk program over its "result" lines that
# prints what is wrong, if anything).
probe() {
  local out bad
  out=$(bash "$1" 2>&1) || true
  drop_probe_vg
  echo "$out"
  bad=$(grep '^result ' <<<"$out" | awk "$2")
  local n
  n=$(grep -c '^result ' <<<"$out" || true)
  [ "$n" = 3 ] || bad+=$'\n'"$n result lines, not 3 (ext4, xfs, btrfs)"
  if [ -n "${bad//[[:space:]]/}" ]; then
    echo "lvm-newkernel-suite: unexpected:$bad"
    return 1
  fi
}

# "result FS lvcreate_a=RC lvcreate_b=RC lines_a=N lines_b=N": both taken, one point in time.
freeze_check='{ split($3, a, "="); split($4, b, "="); split($5, la, "="); split($6, lb, "=");
  if (a[2] != 0 || b[2] != 0) print " " $2 ": lvcreate of a frozen member failed (" $3 " " $4 ")";
  else if (la[2] == "-" || lb[2] == "-" || lb[2] + 0 > la[2] + 0 || la[2] + 0 > lb[2] + 1)
    print " " $2 ": the snapshots are not one point in time (" $5 " " $6 ")" }'
# "result FS lvcreate_a=RC lvcreate_b=RC new_thin_lv=RC": an lvcreate of a suspended origin fails.
suspend_check='{ split($3, a, "="); split($4, b, "=");
  if (a[2] == 0 && b[2] == 0) print " " $2 ": lvcreate of suspended thin origins now works: look at src/pool/lvm/group.rs again" }'

stage 1 "probe: fsfreeze, then lvcreate (must work)" probe tests/vm/group/probe-freeze-then-lvcreate.sh "$freeze_check"
stage 2 "probe: dmsetup suspend, then lvcreate (must fail)" probe tests/vm/group/probe-suspend-then-lvcreate.sh "$suspend_check"

echo
echo "== lvm-newkernel-suite: volume group on the VM disk"
pvcreate -q /dev/disk/by-id/virtio-hfthin
vgcreate -q -s 1M hfthin /dev/disk/by-id/virtio-hfthin
lvcreate -q -y --type thin-pool -L 3G -n tp0 hfthin
config=tests/fixtures/lvm/conformance-thin.toml
stage 3 "conformance, thin, ext4: groups and snapshots" env HOLDFAST_TEST_CONFIG=$config \
  "$conf_bin" --test-threads="$threads" group:: snapshot
stage 3 "conformance, thin, xfs: groups" env HOLDFAST_TEST_FS=xfs HOLDFAST_TEST_CONFIG=$config \
  "$conf_bin" --test-threads="$threads" group::
stage 3 "conformance, thin, btrfs: groups and restores" env HOLDFAST_TEST_FS=btrfs HOLDFAST_TEST_CONFIG=$config \
  "$conf_bin" --test-threads="$threads" group:: snapshot_restores

suite_summary
if ! left=$(lvs --noheadings -o lv_name,vg_name -S 'lv_name!=tp0' hfthin); then
  failed+=("listing the LVs left behind")
elif [ -n "${left//[[:space:]]/}" ]; then
  echo "   left behind in the volume group (should be none):"
  echo "$left" | sed 's/^/     /'
  failed+=("LVs left behind")
else
  echo "   left behind in the volume group: nothing"
fi
suite_end
