#!/bin/bash
# issue 12 probe (VM only): dmsetup suspend of two thin LVs, then lvcreate --snapshot of each: fails and leaves the thin pool transaction id behind (never do this).
# One line per filesystem for tests/vm/lvm-newkernel-suite.sh:
#   result FS lvcreate_a=RC lvcreate_b=RC new_thin_lv=RC   (new_thin_lv: a thin LV made afterwards)
set -u
[ -e /run/holdfast-vm ] || exit 2
truncate -s 1G /tmp/pv.img
pv=$(losetup -f --show /tmp/pv.img)
vgcreate -q gp "$pv" >/dev/null
lvcreate -q -L 600M -T gp/tp >/dev/null
for fs in ext4 xfs btrfs; do
  echo "=== $fs"
  for n in a b; do
    lvcreate -q -V 300M -T gp/tp -n "$fs$n" >/dev/null
    mkfs.$fs -q /dev/gp/$fs$n >/dev/null 2>&1 || mkfs.$fs /dev/gp/$fs$n >/dev/null 2>&1
    mkdir -p /mnt/$fs$n && mount /dev/gp/$fs$n /mnt/$fs$n
  done
  ( i=0; while [ $i -lt 400 ]; do echo $i >> /mnt/${fs}a/log; sync /mnt/${fs}a/log; echo $i >> /mnt/${fs}b/log; sync /mnt/${fs}b/log; i=$((i+1)); done ) &
  w=$!
  sleep 1
  if [ $fs = btrfs ]; then
    fsfreeze -f /mnt/${fs}a; fsfreeze -f /mnt/${fs}b
    echo "fsfreeze rc"
  fi
  t0=$(date +%s.%N)
  timeout 30 dmsetup suspend gp-${fs}a; echo "suspend a rc=$?"
  timeout 30 dmsetup suspend gp-${fs}b; echo "suspend b rc=$?"
  dmsetup info -c -o name,attr | grep gp-
  for n in a b; do
    timeout 60 lvcreate -q -s -kn -n s$fs$n gp/$fs$n; r=$?; echo "lvcreate $n rc=$r"; eval "rc_$n=$r"
    dmsetup info -c -o name,attr | grep "gp-$fs"
  done
  for n in a b; do timeout 30 dmsetup resume gp-$fs$n; echo "resume $n rc=$?"; done
  [ $fs = btrfs ] && { fsfreeze -u /mnt/${fs}a; fsfreeze -u /mnt/${fs}b; }
  echo "window $(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null)"
  wait $w
  lvs gp
  for n in a b; do
    mkdir -p /mnt/s$fs$n
    opt=""; [ $fs = xfs ] && opt="-o nouuid"
    [ $fs = btrfs ] && btrfstune -f -u /dev/gp/s$fs$n 2>/dev/null
    mount $opt /dev/gp/s$fs$n /mnt/s$fs$n || echo "mount s$fs$n failed"
    echo "$n: $(wc -l < /mnt/s$fs$n/log) lines, last $(tail -n1 /mnt/s$fs$n/log)"
    umount /mnt/s$fs$n
  done
  umount /mnt/${fs}a /mnt/${fs}b
  lvcreate -q -V 16M -T gp/tp -n after$fs >/dev/null 2>&1; new=$?
  echo "result $fs lvcreate_a=$rc_a lvcreate_b=$rc_b new_thin_lv=$new"
done
