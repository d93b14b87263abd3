//! Stage records: what holdfast mounted for each volume on this node, kept durably in the
//! driver's state directory. NodeUnstage, NodeUnpublish, NodeExpandVolume and
//! NodeGetVolumeStats get a volume id and a path but no volume context; the record (what was
//! mounted: a device and its `dev_t`, or a dataset / export) together with the mount table
//! tells whether the path holds this volume, so nothing else is ever unmounted, grown or
//! reported. A record is written (through [`crate::store`]: tmp file, rename) before the mount it
//! describes, so a kill -9 at any point leaves a record the next call can act on.
//!
//! Not fsynced ([`Store::atomic_only`], issue 14): a record describes mounts and loop devices,
//! and a power cut removes them all. After one, a record may be an older version of itself,
//! missing, or unreadable (its rename reached the disk before its data). Every call checks
//! the mount table before it acts on a record, so an older or missing record of a volume that
//! nothing holds any more leads to what a stale record leads to (a fresh stage, an unstage or
//! unpublish with nothing to unmount); an unreadable one written before this boot is removed
//! and read as none ([`Records::load`]). docs/design.md "Node records and power cuts".

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::blocking::METADATA_DEADLINE;
use crate::error::{Error, Result};
use crate::node::mountinfo::MountInfo;
use crate::node::safepath::same_path;
use crate::store::Store;

/// Everything holdfast mounted for one volume on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The CSI volume id.
    pub volume_id: String,
    /// Where it is staged (one path for single-node access modes; several for shared volumes).
    #[serde(default)]
    pub stages: Vec<StageRecord>,
    /// Where it is published.
    #[serde(default)]
    pub publishes: Vec<PublishRecord>,
}

/// One staging of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    /// The normalised staging path.
    pub path: PathBuf,
    /// What holds the volume's data.
    pub backing: Backing,
    /// The filesystem mounted at the staging path (empty: a raw block volume, or not known yet).
    pub fs_type: String,
    /// A raw block volume: nothing is mounted at the staging path.
    pub block: bool,
    /// The staging mount as the kernel showed it once mounted; binds of it show the same.
    #[serde(default)]
    pub mount: Option<MountKey>,
    /// The staged filesystem's `f_fsid` once mounted (block-backed and ZFS stages only): with
    /// `mount`, what lets NodePublish trust this record without asking the pool (issue 14). A
    /// volume deleted and made again under the same name and device number has a new
    /// filesystem UUID (mkfs; copies get a new one too) or dataset guid, so its fsid differs.
    /// `None`: not known (NFS, whose fsid is the export's; records written before), and
    /// NodePublish looks the volume up in its pool as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsid: Option<u64>,
    // issue 14: events
    /// The volume's CSI name, for the `unstaged` event line (empty in records written before).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub csi_name: String,
}

/// What a volume's staging mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backing {
    /// A block device node, and its device number (`None` if it was not a block device).
    Device {
        /// The path the pool handed out.
        path: PathBuf,
        /// Its `st_rdev`.
        dev: Option<u64>,
    },
    /// A mount source (a ZFS dataset, an NFS export subdirectory).
    Source {
        /// The source as given to `mount`.
        source: String,
        /// Its filesystem type (`zfs`, `nfs`).
        fs_type: String,
    },
}

/// How the kernel identifies a mount's content: the device and the root inside the filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountKey {
    /// `major:minor`.
    pub major_minor: String,
    /// The root inside the filesystem.
    pub root: PathBuf,
}

/// One publish of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRecord {
    /// The normalised target path.
    pub target: PathBuf,
    /// The staging path it was published from.
    pub staging: PathBuf,
    /// That staging as it was recorded when publishing: identifies the bind even once the
    /// staging mount is gone (unmounted by hand) or its record dropped.
    pub stage: StageRecord,
    /// The publish asked for a read-only bind: one of the volume's binds found writable there
    /// is a publish cut short (a crash), never a finished one, and a retry redoes it.
    #[serde(default)]
    pub readonly: bool,
}

/// `major:minor` of a device number, as mountinfo shows it.
pub fn dev_name(rdev: u64) -> String {
    format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev))
}

/// Whether mount source `source` is a name in /dev of the block device numbered `rdev`. btrfs
/// shows as a mount's source whichever name of its device was scanned last: udev scans a
/// device under its kernel name (`/dev/dm-6`) when its content changes, also after the mount
/// (a restore's new fsid), so the source of a volume's own mount can turn from
/// `/dev/vg/lv` into `/dev/dm-6`. The kernel renames a mounted btrfs device only to a path of
/// the same block device, so the same device number is the same device. Only /dev is looked
/// at (devtmpfs: the stat cannot hang on a network filesystem).
fn names_device(source: &str, rdev: u64) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let path = Path::new(source);
    if !source.starts_with("/dev/") || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return false;
    }
    std::fs::metadata(path).is_ok_and(|md| md.file_type().is_block_device() && md.rdev() == rdev)
}

impl StageRecord {
    /// Whether mount `m` shows this staging's data: the staging mount itself or a bind of it.
    pub fn holds(&self, m: &MountInfo) -> bool {
        if let Some(k) = &self.mount {
            if k.major_minor != m.major_minor || k.root != m.root {
                return false;
            }
        }
        match &self.backing {
            Backing::Device { path, dev } => {
                if dev.is_some_and(|d| dev_name(d) == m.major_minor) {
                    return true;
                }
                // btrfs shows an anonymous device number: then the source and the type must
                // both match (anyone can name a tmpfs "/dev/loop3", not make it btrfs).
                let fs_ok = if self.fs_type.is_empty() { m.fs_type != "tmpfs" } else { m.fs_type == self.fs_type };
                fs_ok && (Path::new(&m.source) == path || dev.is_some_and(|d| names_device(&m.source, d)))
            }
            Backing::Source { source, fs_type } => {
                let fs_ok = m.fs_type == *fs_type || (fs_type == "nfs" && m.fs_type.starts_with("nfs"));
                fs_ok && m.source.trim_end_matches('/') == source.trim_end_matches('/')
            }
        }
    }

    /// Whether a block device numbered `rdev` (the node at a published path) is this volume's
    /// device. Without a device number on either side (the test fakes use plain files), the
    /// bind's mount line must name the device.
    pub fn is_device(&self, rdev: Option<u64>, m: &MountInfo) -> bool {
        let Backing::Device { path, dev } = &self.backing else { return false };
        match (dev, rdev) {
            (Some(d), Some(r)) => *d == r,
            _ => m.root == *path || Path::new(&m.source) == path,
        }
    }

    /// The device path, for block-backed volumes.
    pub fn device(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Device { path, .. } => Some(path),
            Backing::Source { .. } => None,
        }
    }
}

impl VolumeRecord {
    /// An empty record for `volume_id`.
    pub fn new(volume_id: &str) -> Self {
        VolumeRecord { volume_id: volume_id.to_owned(), stages: Vec::new(), publishes: Vec::new() }
    }

    /// The staging at `path`, if recorded.
    pub fn stage_at(&self, path: &Path) -> Option<&StageRecord> {
        self.stages.iter().find(|s| same_path(&s.path, path))
    }

    /// The publish at `target`, if recorded.
    pub fn publish_at(&self, target: &Path) -> Option<&PublishRecord> {
        self.publishes.iter().find(|p| same_path(&p.target, target))
    }

    /// Drops the staging at `path`.
    pub fn remove_stage(&mut self, path: &Path) {
        self.stages.retain(|s| !same_path(&s.path, path));
    }

    /// Drops the publish at `target`.
    pub fn remove_publish(&mut self, target: &Path) {
        self.publishes.retain(|p| !same_path(&p.target, target));
    }

    /// Whether nothing is recorded any more.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty() && self.publishes.is_empty()
    }
}

/// When this machine booted (`btime` of /proc/stat); `None` when the kernel does not say.
pub fn boot_time() -> Option<SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_btime(&stat)
}

/// The boot time in the text of /proc/stat.
fn parse_btime(stat: &str) -> Option<SystemTime> {
    let secs = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse::<u64>().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// The stage records: one JSON file per volume under `<state_dir>/stage`, kept in the
/// [`crate::store`] record store.
#[derive(Debug, Clone)]
pub struct Records {
    store: Store,
}

impl Records {
    /// The store in `state_dir` (its `stage` directory is created on first write, 0700).
    pub fn new(state_dir: &Path) -> Self {
        let store = Store::new(state_dir.join("stage"), "state-dir", METADATA_DEADLINE)
            .described("stage record", "move it away to start afresh")
            .creating_dir()
            .atomic_only();
        Records { store }
    }

    /// The record name of `volume_id`: a hash, since ids may be long and hold any allowed character.
    fn name(volume_id: &str) -> String {
        hex::encode(Sha256::digest(volume_id.as_bytes()))
    }

    /// The record of `volume_id`, if any. One that does not parse is an error naming it, unless
    /// it was written before this boot: then a power cut tore it, what it described is gone,
    /// and it is removed and read as none.
    pub async fn load(&self, volume_id: &str) -> Result<Option<VolumeRecord>> {
        let name = Self::name(volume_id);
        let rec = self.store.read_unless_torn_before::<VolumeRecord, _>(&name, boot_time).await?;
        if rec.as_ref().is_some_and(|r| r.volume_id != volume_id) {
            return Err(Error::Internal(format!("stage record {} names another volume", self.store.file(&name)?.display())));
        }
        Ok(rec)
    }

    /// Start-up, before serving: removes the temporaries of record writes a crash
    /// interrupted (the record they were for is the one still in place). Returns what it removed.
    pub async fn clean_temporaries(&self) -> Result<Vec<PathBuf>> {
        self.store.clean_temporaries().await
    }

    /// Writes `rec` durably (an empty record removes the file).
    pub async fn save(&self, rec: &VolumeRecord) -> Result<()> {
        let name = Self::name(&rec.volume_id);
        if rec.is_empty() { self.store.remove(&name).await.map(|_| ()) } else { self.store.write(&name, rec).await }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(mm: &str, root: &str, fs: &str, source: &str) -> MountInfo {
        MountInfo {
            id: 1,
            parent: 1,
            major_minor: mm.into(),
            root: root.into(),
            mount_point: "/x".into(),
            mount_options: vec!["rw".into()],
            fs_type: fs.into(),
            source: source.into(),
            super_options: vec!["rw".into()],
        }
    }

    fn device_stage(fs: &str, mount: Option<(&str, &str)>) -> StageRecord {
        StageRecord {
            path: "/stage".into(),
            backing: Backing::Device { path: "/dev/loop3".into(), dev: Some(rustix::fs::makedev(7, 3)) },
            fs_type: fs.into(),
            block: false,
            mount: mount.map(|(mm, root)| MountKey { major_minor: mm.into(), root: root.into() }),
            fsid: None,
            csi_name: String::new(),
        }
    }

    #[test]
    fn holds_only_the_volumes_own_mounts() {
        let nfs = StageRecord {
            path: "/stage".into(),
            backing: Backing::Source { source: "srv:/export/v1".into(), fs_type: "nfs".into() },
            fs_type: "nfs".into(),
            block: false,
            mount: None,
            fsid: None,
            csi_name: String::new(),
        };
        struct Case {
            name: &'static str,
            stage: StageRecord,
            mount: MountInfo,
            want: bool,
        }
        let cases = [
            Case {
                name: "ext4 on the device",
                stage: device_stage("ext4", None),
                mount: line("7:3", "/", "ext4", "/dev/loop3"),
                want: true,
            },
            Case { name: "a foreign tmpfs", stage: device_stage("ext4", None), mount: line("0:55", "/", "tmpfs", "tmpfs"), want: false },
            Case {
                name: "a tmpfs named like the device",
                stage: device_stage("", None),
                mount: line("0:55", "/", "tmpfs", "/dev/loop3"),
                want: false,
            },
            Case { name: "another device", stage: device_stage("ext4", None), mount: line("7:4", "/", "ext4", "/dev/loop4"), want: false },
            Case {
                name: "btrfs: anonymous number, recorded",
                stage: device_stage("btrfs", Some(("0:77", "/"))),
                mount: line("0:77", "/", "btrfs", "/dev/loop3"),
                want: true,
            },
            Case {
                name: "btrfs: another anonymous number",
                stage: device_stage("btrfs", Some(("0:77", "/"))),
                mount: line("0:78", "/", "btrfs", "/dev/loop3"),
                want: false,
            },
            Case {
                name: "a bind of a subdirectory is not the staging mount",
                stage: device_stage("ext4", Some(("7:3", "/"))),
                mount: line("7:3", "/sub", "ext4", "/dev/loop3"),
                want: false,
            },
            Case { name: "nfs4 of the export", stage: nfs.clone(), mount: line("0:60", "/", "nfs4", "srv:/export/v1/"), want: true },
            Case { name: "another export", stage: nfs.clone(), mount: line("0:60", "/", "nfs4", "srv:/export/v2"), want: false },
            Case { name: "not nfs", stage: nfs, mount: line("0:60", "/", "tmpfs", "srv:/export/v1"), want: false },
        ];
        for c in cases {
            assert_eq!(c.stage.holds(&c.mount), c.want, "{}", c.name);
        }
    }

    /// A block device node of this machine and its number, to stand in for a volume's device.
    fn some_block_device() -> (PathBuf, u64) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        std::fs::read_dir("/dev")
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find_map(|p| std::fs::symlink_metadata(&p).ok().filter(|m| m.file_type().is_block_device()).map(|m| (p, m.rdev())))
            .expect("no block device in /dev")
    }

    /// issue 12: a btrfs mount's source is whichever name of its device udev scanned last
    /// (`/dev/dm-6` for `/dev/vg/lv`): another name of the very device is the volume's own,
    /// anything else (another device, a name outside /dev, a tmpfs) still is not.
    #[test]
    fn btrfs_shows_any_name_of_the_volumes_device() {
        let (node, rdev) = some_block_device();
        let stage = StageRecord {
            backing: Backing::Device { path: "/dev/vg/holdfast-no-such-lv".into(), dev: Some(rdev) },
            ..device_stage("btrfs", Some(("0:77", "/")))
        };
        let node = node.to_str().unwrap();
        assert!(stage.holds(&line("0:77", "/", "btrfs", node)), "{node} is the volume's device");
        assert!(!stage.holds(&line("0:77", "/", "tmpfs", node)), "a tmpfs named like the device");
        assert!(!stage.holds(&line("0:77", "/", "btrfs", "/dev/null")), "/dev/null is a character device");
        let elsewhere = format!("/dev/../dev/{}", node.trim_start_matches("/dev/"));
        assert!(!stage.holds(&line("0:77", "/", "btrfs", &elsewhere)), "a name leaving /dev");
        let other = StageRecord { backing: Backing::Device { path: "/dev/vg/lv".into(), dev: Some(rdev + 1) }, ..stage.clone() };
        assert!(!other.holds(&line("0:77", "/", "btrfs", node)), "another device's name");
    }

    #[tokio::test]
    async fn records_survive_and_vanish_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Records::new(dir.path());
        assert_eq!(store.load("file:n:p:v1").await.unwrap(), None);
        let mut rec = VolumeRecord::new("file:n:p:v1");
        rec.stages.push(device_stage("ext4", None));
        rec.publishes.push(PublishRecord {
            target: "/t".into(),
            staging: "/stage".into(),
            stage: device_stage("ext4", None),
            readonly: false,
        });
        store.save(&rec).await.unwrap();
        let again = Records::new(dir.path());
        assert_eq!(again.load("file:n:p:v1").await.unwrap().as_ref(), Some(&rec));
        assert_eq!(again.load("file:n:p:v2").await.unwrap(), None);
        assert!(rec.stage_at(Path::new("/stage")).is_some() && rec.publish_at(Path::new("/t")).is_some());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join("stage")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700);

        rec.remove_publish(Path::new("/t"));
        rec.remove_stage(Path::new("/stage"));
        store.save(&rec).await.unwrap();
        assert_eq!(store.load("file:n:p:v1").await.unwrap(), None);
        assert_eq!(std::fs::read_dir(dir.path().join("stage")).unwrap().count(), 0, "no file, no temporary left");
    }

    #[test]
    fn the_boot_time_is_btime_of_proc_stat() {
        let stat = "cpu  10 0 5 100 0 0 0 0 0 0\nintr 1 2\nctxt 99\nbtime 1764662400\nprocesses 7\n";
        assert_eq!(parse_btime(stat), Some(UNIX_EPOCH + Duration::from_secs(1_764_662_400)));
        assert_eq!(parse_btime("cpu 1 2 3\n"), None);
        assert_eq!(parse_btime("btime soon\n"), None);
        let booted = boot_time().expect("this kernel's /proc/stat has btime");
        assert!(booted <= SystemTime::now());
    }

    /// issue 14: a record that does not parse reads as none (and is removed) only when it was
    /// written before this boot, which is when a power cut can have torn it.
    #[tokio::test]
    async fn an_unreadable_record_from_before_the_boot_is_none_and_one_since_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Records::new(dir.path());
        let mut rec = VolumeRecord::new("file:n:p:v1");
        rec.stages.push(device_stage("ext4", None));
        store.save(&rec).await.unwrap();
        let file = dir.path().join("stage").join(format!("{}.json", Records::name("file:n:p:v1")));
        let booted = boot_time().unwrap();
        struct Case {
            name: &'static str,
            content: &'static [u8],
            written: SystemTime,
            want_none: bool,
        }
        let cases = [
            Case { name: "empty, before the boot", content: b"", written: booted - Duration::from_secs(5), want_none: true },
            Case {
                name: "half, before the boot",
                content: b"{\"volume_id\": \"fi",
                written: booted - Duration::from_secs(86400),
                want_none: true,
            },
            Case { name: "empty, since the boot", content: b"", written: SystemTime::now(), want_none: false },
            Case { name: "half, since the boot", content: b"{\"volume_id\"", written: booted + Duration::from_secs(1), want_none: false },
        ];
        for c in cases {
            std::fs::write(&file, c.content).unwrap();
            std::fs::File::options().write(true).open(&file).unwrap().set_modified(c.written).unwrap();
            let got = store.load("file:n:p:v1").await;
            if c.want_none {
                assert_eq!(got.unwrap(), None, "{}", c.name);
                assert!(!file.exists(), "{}: the torn record is removed", c.name);
            } else {
                let err = got.unwrap_err();
                assert!(matches!(err, Error::Internal(ref m) if m.contains("move it away")), "{}: {err}", c.name);
                assert!(file.exists(), "{}: kept for the operator", c.name);
            }
        }
        // A readable record from before the boot is read as it is (the mount table judges it).
        store.save(&rec).await.unwrap();
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(booted - Duration::from_secs(5)).unwrap();
        assert_eq!(store.load("file:n:p:v1").await.unwrap(), Some(rec));
    }

    #[tokio::test]
    async fn start_up_removes_interrupted_writes_and_keeps_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Records::new(dir.path());
        assert!(store.clean_temporaries().await.unwrap().is_empty(), "no directory yet: nothing to clean");
        let mut rec = VolumeRecord::new("file:n:p:v1");
        rec.stages.push(device_stage("ext4", None));
        store.save(&rec).await.unwrap();
        let stage = dir.path().join("stage");
        let name = Records::name("file:n:p:v1");
        // A crash mid-write, in the naming of this store and of the writer before it.
        for tmp in [format!(".{name}.json.tmp"), format!("{name}.json.tmp")] {
            std::fs::write(stage.join(&tmp), b"{\"volume_id\": ").unwrap();
        }
        assert_eq!(store.clean_temporaries().await.unwrap().len(), 2);
        assert_eq!(store.load("file:n:p:v1").await.unwrap(), Some(rec));
        assert_eq!(std::fs::read_dir(&stage).unwrap().count(), 1, "only the record is left");
    }
}
