//! Group snapshots on a thin LVM pool (issue 12): thin snapshots of several volumes at one
//! point in time. What the real kernel allows (probed on Linux 6.1 in the test VM, see
//! docs/design.md "Group snapshots"):
//!
//! - `lvcreate --snapshot` suspends its origin itself, with the filesystem frozen through the
//!   device (`lockfs`). An origin suspended beforehand (`dmsetup suspend`, to hold every
//!   member at once) breaks it: LVM miscounts the suspend, its pool message is lost, and the
//!   thin pool's transaction id falls behind its metadata, after which the pool refuses every
//!   new thin LV. So the members are never suspended by holdfast.
//! - What holds every member's writes at one point is a filesystem freeze (`fsfreeze`) of all
//!   of them, through [`crate::node::freeze`]; each `lvcreate` then runs with its origin
//!   frozen. LVM's own `lockfs` freeze of an origin frozen that way nests on Linux 6.6 and
//!   later (kernel and user freezes are counted apart) but fails with EBUSY before, for
//!   filesystems bound to the LV (ext4, XFS). btrfs is not bound to the device and nests on
//!   every kernel.
//! - The kernel release is only the first guess: a kernel that answers EBUSY to LVM's freeze
//!   of a frozen ext4/XFS member anyway (a 6.6+ release without the change, or a vendor
//!   kernel) is remembered for the life of the process ([`observed_no_nesting`]), and its later
//!   groups with such members are refused up front, as before 6.6.
//! - A member nobody has open (not staged, not published as a block device) cannot be
//!   written, so it needs no freeze. A member open by anything but its mounts (a raw block
//!   volume in use) cannot be held: refused, FAILED_PRECONDITION naming it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{LvmPool, command, now, snapshot_lv, tags};
use crate::error::{Error, Result};
use crate::node::freeze::Target;
use crate::pool::{GroupMember, GroupMembership, SnapshotInfo, Source, no_group_snapshots};
use crate::volume_id::PoolKind;
use tags::{Meta, ObjectType};

/// Whether LVM's `lockfs` freeze nests in a user's `fsfreeze` on kernel `release` (e.g.
/// `6.1.0-13-amd64`): Linux 6.6 counts kernel and user freezes apart.
pub fn nested_freeze(release: &str) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
    (major, minor) >= (6, 6)
}

/// Set once an `lvcreate` of a member whose ext4/XFS filesystem was frozen failed with EBUSY:
/// the running kernel does not nest the freezes, whatever its release says.
static NO_NESTING_SEEN: AtomicBool = AtomicBool::new(false);

/// Whether this process has seen the running kernel refuse LVM's freeze of a frozen ext4/XFS
/// member (see the module docs).
pub fn observed_no_nesting() -> bool {
    NO_NESTING_SEEN.load(Ordering::Relaxed)
}

/// The running kernel's release.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// The filesystems mounted from `device`: one mount point per superblock, and whether it is
/// bound to the device (its number in mountinfo: ext4, XFS) or not (btrfs: anonymous).
fn mounted_from(device: &Path, mounts: &[crate::node::mountinfo::MountInfo]) -> Vec<(PathBuf, bool)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(real) = std::fs::canonicalize(device) else {
        return Vec::new();
    };
    let dev_id = std::fs::metadata(&real).map(|m| format!("{}:{}", nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev()))).ok();
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for m in mounts {
        let bound = dev_id.as_deref() == Some(m.major_minor.as_str());
        let by_source = m.source.starts_with("/dev/") && std::fs::canonicalize(&m.source).is_ok_and(|s| s == real);
        if (bound || by_source) && !seen.contains(&m.major_minor) {
            seen.push(m.major_minor.clone());
            out.push((m.mount_point.clone(), bound));
        }
    }
    out
}

/// device-mapper's name of `vg/lv` (each `-` doubled).
fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

impl LvmPool {
    /// How many openers the device of `lv` has (0 when it is not active).
    pub(super) async fn open_count(&self, lv: &str) -> Result<u32> {
        let name = dm_name(&self.vg, lv);
        let cmd =
            crate::exec::Cmd::new("dmsetup").args(["info", "-c", "--noheadings", "-o", "open", &name]).timeout(command::CHANGE_TIMEOUT);
        match self.exec.run(cmd).await {
            Ok(out) => Ok(out.stdout.trim().parse().unwrap_or(0)),
            // Not active: nobody can write it.
            Err(e) if e.stderr().contains("No such device") || e.stderr().contains("not found") => Ok(0),
            Err(e) => Err(Error::exec(format!("asking device-mapper who has {name} open"), e)),
        }
    }

    /// See the module docs.
    pub(super) async fn group_snapshot(self: Arc<Self>, group: GroupMembership, members: Vec<GroupMember>) -> Result<Vec<SnapshotInfo>> {
        let first = members.first().map(|m| m.source.clone()).unwrap_or_default();
        if self.thin_pool.is_none() {
            return Err(no_group_snapshots(
                &self.name,
                PoolKind::Lvm,
                &first,
                "is a thick LVM pool: its snapshots suspend one origin at a time and cannot be taken at one point for several volumes; use a thin pool",
            ));
        }
        let release = kernel_release();
        let nested = nested_freeze(&release) && !observed_no_nesting();
        let mounts = self.freezer.mounter().mounts().await?;
        let mut targets = Vec::new();
        let mut origins = Vec::new();
        for m in &members {
            let (lv, meta) = self
                .find(&m.source, ObjectType::Volume)
                .await?
                .ok_or_else(|| Error::NotFound(format!("volume {:?} not found in pool {:?}", m.source, self.name)))?;
            if meta.pending {
                return Err(no_group_snapshots(
                    &self.name,
                    PoolKind::Lvm,
                    &m.source,
                    "holds it as an unfinished copy; retry its creation first",
                ));
            }
            let device = self.device_path(&lv);
            let all = mounts.clone();
            let mounted =
                crate::blocking::run("mountinfo", "finding the mounts of a device", crate::blocking::METADATA_DEADLINE, move || {
                    mounted_from(&device, &all)
                })
                .await?;
            let open = self.open_count(&lv.name).await?;
            if open as usize > mounted.len() {
                return Err(no_group_snapshots(
                    &self.name,
                    PoolKind::Lvm,
                    &m.source,
                    "has it open other than through its mounts (a raw block volume in use?): its writes cannot be held at one point with the others; unpublish it first",
                ));
            }
            let bound = mounted.iter().any(|(_, bound)| *bound);
            if bound && !nested {
                let why = if observed_no_nesting() {
                    format!(
                        "has its ext4/XFS filesystem mounted, and this kernel (Linux {release}) answered EBUSY to LVM's snapshot of such a volume with the group frozen \
                         (its own freeze does not nest in ours): unstage the volumes first"
                    )
                } else {
                    format!(
                        "has its ext4/XFS filesystem mounted, and on Linux {release} LVM's snapshot cannot run with the filesystems of the group frozen together \
                         (its own freeze fails with EBUSY; Linux 6.6 and later nest them): unstage the volumes first, or run Linux 6.6 or later"
                    )
                };
                return Err(no_group_snapshots(&self.name, PoolKind::Lvm, &m.source, &why));
            }
            let mount_points = mounted.into_iter().map(|(p, _)| p).collect();
            targets.push(Target {
                pool: self.name.clone(),
                volume: m.source.clone(),
                mount_points,
                purpose: format!("group snapshot {:?}", group.name),
            });
            origins.push((lv, meta, bound));
        }
        let me = self.clone();
        let group_name = group.name.clone();
        let result = self
            .freezer
            .around_all(targets, async move {
                let mut made: Vec<String> = Vec::new();
                for (m, (lv, meta, bound)) in members.iter().zip(&origins) {
                    let record = Meta {
                        pool: me.name.clone(),
                        object: ObjectType::Snapshot,
                        local: m.local.clone(),
                        csi_name: m.csi_name.clone(),
                        capacity: 0,
                        block: false,
                        fs_type: None,
                        source: Some(Source::Volume(m.source.clone())),
                        size: lv.size,
                        created: now(),
                        pending: false,
                        uid: Some(m.uid.clone()),
                        source_uid: meta.uid.clone(),
                        parameters: None,
                        group: Some(group.clone()),
                    };
                    let name = snapshot_lv(&m.local);
                    let taken = match tags::encode(&record) {
                        Ok(tags) => me.exec.run(command::lvcreate_snapshot(&me.vg, &lv.name, &name, &tags, false)).await.map_err(|e| {
                            if command::is_no_space(&e) {
                                Error::ResourceExhausted(format!("no room for group snapshot {:?} in pool {:?}: {}", group.name, me.name, e.stderr().trim()))
                            } else if e.stderr().contains("Device or resource busy") {
                                if *bound {
                                    // The release promised nesting; the kernel does not keep it.
                                    NO_NESTING_SEEN.store(true, Ordering::Relaxed);
                                    tracing::warn!(pool = %me.name, lv = %lv.name, "LVM's freeze of a frozen ext4/XFS volume failed with EBUSY: groups of mounted ext4/XFS volumes are refused from now on");
                                }
                                no_group_snapshots(&me.name, PoolKind::Lvm, &m.source, &format!("could not be suspended by LVM with the group frozen: {}", e.stderr().trim()))
                            } else {
                                Error::exec(format!("snapshotting LV {}/{} as {name} for group snapshot {:?}", me.vg, lv.name, group.name), e)
                            }
                        }),
                        Err(e) => Err(Error::InvalidArgument(e)),
                    };
                    if let Err(e) = taken {
                        // A killed or failed lvcreate can leave its origin suspended.
                        let _ = me.resume_suspended().await;
                        for done in &made {
                            if let Err(d) = me.remove(done, "a member of a failed group snapshot").await {
                                tracing::error!(pool = %me.name, lv = %done, error = %d, "cannot remove a member of a failed group snapshot");
                            }
                        }
                        return Err(e);
                    }
                    made.push(name);
                }
                Ok(made)
            })
            .await;
        if matches!(result, Err(Error::DeadlineExceeded(_))) {
            // Stopped mid-lvcreate by the frozen deadline: its origin may be left suspended.
            let _ = self.resume_suspended().await;
        }
        let made = result??;
        let mut out = Vec::new();
        for name in made {
            let lv = self
                .lookup(&name)
                .await?
                .ok_or_else(|| Error::Internal(format!("snapshot LV {}/{name} vanished right after it was made", self.vg)))?;
            match self.ours(&lv, ObjectType::Snapshot) {
                Ok(Some(meta)) => out.push(Self::snapshot_info(&lv, meta)),
                _ => return Err(Error::Internal(format!("snapshot LV {}/{name} does not carry the record it was made with", self.vg))),
            }
        }
        tracing::info!(pool = %self.name, group = %group_name, members = out.len(), "took thin group snapshot");
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvm_freezes_nest_in_user_freezes_from_linux_6_6() {
        struct Case {
            release: &'static str,
            want: bool,
        }
        let cases = [
            Case { release: "6.1.0-13-amd64", want: false },
            Case { release: "5.15.0-91-generic", want: false },
            Case { release: "6.5.13", want: false },
            Case { release: "6.6.0", want: true },
            Case { release: "6.12.4-arch1-1", want: true },
            Case { release: "7.0", want: true },
            Case { release: "", want: false },
        ];
        for c in cases {
            assert_eq!(nested_freeze(c.release), c.want, "{}", c.release);
        }
    }

    #[test]
    fn device_mapper_names_double_dashes() {
        assert_eq!(dm_name("hf-vg", "hf-a_b"), "hf--vg-hf--a_b");
    }
}
