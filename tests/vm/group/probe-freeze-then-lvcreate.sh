#!/bin/bash
# issue 12 probe (VM only): fsfreeze of two mounted thin LVs, then lvcreate --snapshot of each,
# for ext4, xfs and btrfs, while a writer appends record i to A then to B (each synced).
# Linux 6.1: EBUSY on ext4 and xfs, works on btrfs; Linux >= 6.6: works on all three.
# One line per filesystem for tests/vm/lvm-newkernel-suite.sh to assert on:
#   result FS lvcreate_a=RC lvcreate_b=RC lines_a=N lines_b=N
# (both lvcreate 0 and lines_b <= lines_a <= lines_b + 1: one point in time for both).
set -u
[ -e /run/holdfast-vm ] || exit 2
uname -r
lvm version | head -3
truncate -s 1500M /tmp/pv.img
pv=$(losetup -f --show /tmp/pv.img)
vgcreate -q gp "$pv" >/dev/null
lvcreate -q -L 1300M -T gp/tp >/dev/null 2>&1
for fs in ext4 xfs btrfs; do
  echo "=== $fs"
  for n in a b; do
    lvcreate -q -V 300M -T gp/tp -n "$fs$n" >/dev/null 2>&1
    mkfs.$fs -q /dev/gp/$fs$n >/dev/null 2>&1 || mkfs.$fs /dev/gp/$fs$n >/dev/null 2>&1
    mkdir -p /mnt/$fs$n && mount /dev/gp/$fs$n /mnt/$fs$n
  done
  ( i=0; while [ $i -lt 300 ]; do echo $i >> /mnt/${fs}a/log; sync /mnt/${fs}a/log; echo $i >> /mnt/${fs}b/log; sync /mnt/${fs}b/log; i=$((i+1)); done ) &
  w=$!
  sleep 2
  fsfreeze -f /mnt/${fs}a; echo "freeze a rc=$?"
  fsfreeze -f /mnt/${fs}b; echo "freeze b rc=$?"
  declare -A rc=()
  for n in a b; do
    timeout 60 lvcreate -q -s -kn -n s$fs$n gp/$fs$n; rc[$n]=$?; echo "lvcreate $n rc=${rc[$n]}"
  done
  dmsetup info -c -o name,attr | grep "gp-"
  fsfreeze -u /mnt/${fs}a; echo "thaw a rc=$?"
  fsfreeze -u /mnt/${fs}b; echo "thaw b rc=$?"
  wait $w
  declare -A lines=([a]=- [b]=-)
  for n in a b; do
    [ -e /dev/gp/s$fs$n ] || { echo "no s$fs$n"; continue; }
    mkdir -p /mnt/s$fs$n
    opt=""; [ $fs = xfs ] && opt="-o nouuid"
    [ $fs = btrfs ] && btrfstune -f -u /dev/gp/s$fs$n >/dev/null 2>&1
    # shellcheck disable=SC2086  # opt is empty or one option pair
    mount -o ro $opt /dev/gp/s$fs$n /mnt/s$fs$n || { echo "mount s$fs$n failed"; continue; }
    lines[$n]=$(wc -l < /mnt/s$fs$n/log)
    echo "$n: ${lines[$n]} lines, last $(tail -n1 /mnt/s$fs$n/log)"
    umount /mnt/s$fs$n
  done
  echo "result $fs lvcreate_a=${rc[a]} lvcreate_b=${rc[b]} lines_a=${lines[a]} lines_b=${lines[b]}"
  umount /mnt/${fs}a /mnt/${fs}b
done
echo "=== unmounted, no freeze"
lvcreate -q -s -kn -n sx gp/ext4a; echo "lvcreate unmounted rc=$?"
dmsetup info -c -o name,open gp-ext4a
lvs gp
