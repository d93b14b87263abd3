#!/bin/bash
# issue 12 probe (VM only): fsfreeze of two mounted thin LVs, then lvcreate --snapshot of each (ext4: EBUSY on Linux 6.1; btrfs: works, consistent).
set -u
[ -e /run/holdfast-vm ] || exit 2
uname -r
lvm version | head -3
echo "--- lockfs strings"; strings "$(command -v lvm)" | grep -i -E "lockfs|nolockfs" | head -20
lvmconfig --type default 2>/dev/null | grep -i -E "lockfs|freeze" | head
truncate -s 1G /tmp/pv.img
pv=$(losetup -f --show /tmp/pv.img)
vgcreate -q gp "$pv" >/dev/null
lvcreate -q -L 800M -T gp/tp >/dev/null 2>&1
for fs in ext4 btrfs; do
  echo "=== $fs"
  for n in a b; do
    lvcreate -q -V 200M -T gp/tp -n "$fs$n" >/dev/null 2>&1
    mkfs.$fs -q /dev/gp/$fs$n >/dev/null 2>&1
    mkdir -p /mnt/$fs$n && mount /dev/gp/$fs$n /mnt/$fs$n
  done
  ( i=0; while [ $i -lt 300 ]; do echo $i >> /mnt/${fs}a/log; sync /mnt/${fs}a/log; echo $i >> /mnt/${fs}b/log; sync /mnt/${fs}b/log; i=$((i+1)); done ) &
  w=$!
  sleep 2
  fsfreeze -f /mnt/${fs}a; echo "freeze a rc=$?"
  fsfreeze -f /mnt/${fs}b; echo "freeze b rc=$?"
  for n in a b; do
    timeout 60 lvcreate -q -s -kn -n s$fs$n gp/$fs$n; echo "lvcreate $n rc=$?"
  done
  dmsetup info -c -o name,attr | grep "gp-"
  fsfreeze -u /mnt/${fs}a; echo "thaw a rc=$?"
  fsfreeze -u /mnt/${fs}b; echo "thaw b rc=$?"
  wait $w
  for n in a b; do
    [ -e /dev/gp/s$fs$n ] || { echo "no s$fs$n"; continue; }
    mkdir -p /mnt/s$fs$n
    [ $fs = btrfs ] && btrfstune -f -u /dev/gp/s$fs$n >/dev/null 2>&1
    mount -o ro /dev/gp/s$fs$n /mnt/s$fs$n || { echo "mount s$fs$n failed"; continue; }
    echo "$n: $(wc -l < /mnt/s$fs$n/log) lines, last $(tail -n1 /mnt/s$fs$n/log)"
    umount /mnt/s$fs$n
  done
  umount /mnt/${fs}a /mnt/${fs}b
done
echo "=== unmounted, no freeze"
lvcreate -q -s -kn -n sx gp/ext4a; echo "lvcreate unmounted rc=$?"
dmsetup info -c -o name,open gp-ext4a
lvs gp
