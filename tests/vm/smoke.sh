#!/bin/bash
# Self-check of the test VM, run inside the guest.  It proves the pieces the
# real-storage tests rely on: the extra disks are visible under
# /dev/disk/by-id, LVM thin provisioning works end to end (pool, thin LV,
# udev link, ext4, mount, data, thin snapshot), the in-guest NFS server comes
# up with holdfast-vm-nfs-start, and, on the ZFS image, a zpool with a
# dataset and a zvol can be created.  Exits non-zero at the first failure.
#
#   tests/vm/run --disk d1:2G -- bash tests/vm/smoke.sh
#   tests/vm/run --zfs --disk d1:2G --disk z1:1G -- bash tests/vm/smoke.sh
#
# LVM uses the first extra disk, ZFS the second one (or a sparse file when
# there is only one).  HOLDFAST_SMOKE_NFS=0 skips the NFS part.
set -euo pipefail

if [ ! -e /run/holdfast-vm ]; then
  echo "smoke.sh: refusing to run outside the holdfast test VM (it wipes disks)" >&2
  exit 2
fi
trap 'echo "smoke.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
start=$SECONDS
step_start=$SECONDS
begin() { echo "== $*"; step_start=$SECONDS; }
end() { echo "   ok ($((SECONDS - step_start))s)"; }
check_file() {  # check_file PATH EXPECTED_CONTENT
  local got
  got=$(cat "$1")
  if [ "$got" != "$2" ]; then
    echo "smoke.sh: $1 contains '$got', expected '$2'" >&2
    return 1
  fi
}
export LVM_SUPPRESS_FD_WARNINGS=1

begin "block devices"
lsblk -o NAME,SIZE,TYPE,SERIAL,MOUNTPOINTS
shopt -s nullglob
disks=(/dev/disk/by-id/virtio-*)
shopt -u nullglob
if [ ${#disks[@]} -eq 0 ]; then
  echo "smoke.sh: no extra disk; run with --disk NAME:SIZE" >&2
  exit 1
fi
printf '%s\n' "${disks[@]}"
end

begin "LVM thin pool on ${disks[0]}"
pvcreate -q "${disks[0]}"
vgcreate -q smoke "${disks[0]}"
lvcreate -q -y --type thin-pool -L 512M -n pool smoke
lvcreate -q -y -V 1G --thinpool smoke/pool -n thin1
[ -b /dev/smoke/thin1 ] || { echo "smoke.sh: udev did not create /dev/smoke/thin1" >&2; exit 1; }
mkfs.ext4 -q /dev/smoke/thin1
mkdir -p /mnt/thin1
mount /dev/smoke/thin1 /mnt/thin1
echo "hello thin" >/mnt/thin1/file
sync
umount /mnt/thin1
mount /dev/smoke/thin1 /mnt/thin1
check_file /mnt/thin1/file "hello thin"
end

begin "thin snapshot"
lvcreate -q -y -s -n snap1 smoke/thin1
lvchange -q -ay -K smoke/snap1   # thin snapshots are created activation-skipped
echo "changed" >/mnt/thin1/file
mkdir -p /mnt/snap1
mount -o ro /dev/smoke/snap1 /mnt/snap1
check_file /mnt/snap1/file "hello thin"
check_file /mnt/thin1/file "changed"
lvs -o lv_name,lv_attr,lv_size,pool_lv,origin,data_percent smoke
umount /mnt/snap1 /mnt/thin1
vgremove -q -y smoke
pvremove -q "${disks[0]}"
end

if [ "${HOLDFAST_SMOKE_NFS:-1}" != 0 ]; then
  begin "NFS server and client over 127.0.0.1"
  mkdir -p /srv/smoke-export /mnt/nfs
  echo "/srv/smoke-export 127.0.0.1(rw,sync,no_root_squash,no_subtree_check)" >>/etc/exports
  holdfast-vm-nfs-start
  mount -t nfs -o nfsvers=4.2 127.0.0.1:/srv/smoke-export /mnt/nfs
  echo "hello nfs" >/mnt/nfs/file
  check_file /srv/smoke-export/file "hello nfs"
  umount /mnt/nfs
  end
fi

if command -v zpool >/dev/null; then
  if [ ${#disks[@]} -ge 2 ]; then
    vdev=${disks[1]}
  else
    vdev=/var/tmp/smoke-zpool.img
    truncate -s 1G "$vdev"
  fi
  begin "ZFS pool on $vdev"
  zpool create -f -o ashift=12 -O compression=lz4 -O mountpoint=/smoke-zpool smokepool "$vdev"
  zfs create -o refquota=100M smokepool/ds
  echo "hello zfs" >/smoke-zpool/ds/file
  check_file /smoke-zpool/ds/file "hello zfs"
  zfs snapshot smokepool/ds@s1
  zfs create -V 64M smokepool/vol1
  udevadm settle
  [ -b /dev/zvol/smokepool/vol1 ] || { echo "smoke.sh: no /dev/zvol/smokepool/vol1" >&2; exit 1; }
  zfs list -o name,used,refquota,volsize -r smokepool
  zpool destroy smokepool
  end
else
  echo "== ZFS: no zpool command (base image), skipped"
fi

echo "smoke.sh: all OK in $((SECONDS - start))s"
