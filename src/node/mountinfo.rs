//! A pure parser for `/proc/self/mountinfo` (proc(5)): one [`MountInfo`] per line, with the
//! octal escapes (`\040` for a space…) in paths decoded, plus lookups by mount point and source.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Result};

/// Where the kernel publishes this process's mount table.
pub const PROC_MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount id.
    pub id: u32,
    /// Parent mount id.
    pub parent: u32,
    /// `major:minor` of the device.
    pub major_minor: String,
    /// The path within the filesystem that is mounted (bind mounts: the subdirectory).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`…).
    pub mount_options: Vec<String>,
    /// Filesystem type (`ext4`, `nfs4`, `zfs`…).
    pub fs_type: String,
    /// Mount source (`/dev/loop3`, `server:/export`, `tank/ds`).
    pub source: String,
    /// Per-superblock options.
    pub super_options: Vec<String>,
}

impl MountInfo {
    /// Whether this mount is read-only for its users: either the mount itself (`ro` bind) or
    /// its superblock (a filesystem the kernel remounted read-only after errors, shown as `ro`
    /// or, since Linux 6.x for ext4, `emergency_ro`).
    pub fn is_readonly(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro") || self.super_options.iter().any(|o| o == "ro" || o == "emergency_ro")
    }
}

/// Parses the whole text of a mountinfo file. Blank lines are skipped; any malformed line is an
/// error naming its line number, because a half-understood mount table could make holdfast
/// unmount or format the wrong thing.
pub fn parse(text: &str) -> Result<Vec<MountInfo>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| parse_line(l).map_err(|e| format!("mountinfo line {}: {e}: {l:?}", n + 1)))
        .collect()
}

/// Parses one line: `id parent maj:min root mount_point options [optional…] - fstype source super_options`.
fn parse_line(line: &str) -> Result<MountInfo, String> {
    // The kernel separates fields with single spaces and escapes spaces inside them, so a
    // single-space split is exact (and keeps an empty source as an empty field).
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-").ok_or("no \" - \" separator")?;
    if sep < 6 {
        return Err(format!("{sep} fields before the separator, want at least 6"));
    }
    let tail = &fields[sep + 1..];
    if tail.len() < 2 {
        return Err("fewer than 2 fields after the separator".into());
    }
    let id = fields[0].parse().map_err(|_| format!("bad mount id {:?}", fields[0]))?;
    let parent = fields[1].parse().map_err(|_| format!("bad parent id {:?}", fields[1]))?;
    let major_minor = fields[2];
    if !major_minor.split_once(':').is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok()) {
        return Err(format!("bad major:minor {major_minor:?}"));
    }
    Ok(MountInfo {
        id,
        parent,
        major_minor: major_minor.to_owned(),
        root: PathBuf::from(unescape_os(fields[3])),
        mount_point: PathBuf::from(unescape_os(fields[4])),
        mount_options: split_options(fields[5]),
        fs_type: unescape_string(tail[0]),
        source: unescape_string(tail[1]),
        super_options: tail.get(2).map(|s| split_options(s)).unwrap_or_default(),
    })
}

fn split_options(s: &str) -> Vec<String> {
    s.split(',').filter(|o| !o.is_empty()).map(unescape_string).collect()
}

/// Decodes the kernel's `\ooo` octal escapes (it escapes space, tab, newline and backslash).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn unescape_os(s: &str) -> OsString {
    OsString::from_vec(unescape(s))
}

fn unescape_string(s: &str) -> String {
    String::from_utf8_lossy(&unescape(s)).into_owned()
}

/// Reads and parses this process's mount table. A path that is not valid UTF-8 is decoded
/// lossily: holdfast only ever looks up the paths the CO hands it, which are UTF-8.
pub fn read() -> Result<Vec<MountInfo>> {
    read_from(Path::new(PROC_MOUNTINFO))
}

/// Reads and parses a mountinfo file at `path`.
pub fn read_from(path: &Path) -> Result<Vec<MountInfo>> {
    let bytes = std::fs::read(path).context(|| format!("reading the mount table {}", path.display()))?;
    parse(&String::from_utf8_lossy(&bytes)).map_err(crate::error::Error::Internal)
}

/// Every mount whose mount point is `path`, in table order: when several are stacked on the
/// same point, the last one is the one a lookup of `path` sees. Comparison is by path
/// components, so a trailing `/` does not matter; symlinks are not resolved (pure function).
pub fn find_by_mount_point<'a>(mounts: &'a [MountInfo], path: &Path) -> Vec<&'a MountInfo> {
    mounts.iter().filter(|m| m.mount_point == path).collect()
}

/// The topmost mount at `path` (what a process opening `path` reaches), if any.
pub fn top_at<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    find_by_mount_point(mounts, path).pop()
}

/// Every mount whose source is `source` (a device path, `server:/export`, a dataset), in table
/// order. Trailing slashes are ignored, since NFS sources are shown with or without one.
pub fn find_by_source<'a>(mounts: &'a [MountInfo], source: &str) -> Vec<&'a MountInfo> {
    let want = trim_slash(source);
    mounts.iter().filter(|m| trim_slash(&m.source) == want).collect()
}

fn trim_slash(s: &str) -> &str {
    let t = s.trim_end_matches('/');
    if t.is_empty() { s } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mountinfo").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_captured_and_handwritten_tables() {
        struct Case {
            name: &'static str,
            file: &'static str,
            mount_point: &'static str,
            want: MountInfo,
        }
        let mi = |id, parent, mm: &str, root: &str, mp: &str, mo: &[&str], fs: &str, src: &str, so: &[&str]| MountInfo {
            id,
            parent,
            major_minor: mm.into(),
            root: root.into(),
            mount_point: mp.into(),
            mount_options: strings(mo),
            fs_type: fs.into(),
            source: src.into(),
            super_options: strings(so),
        };
        let cases = [
            Case {
                name: "root of the host",
                file: "host-debian12.txt",
                mount_point: "/",
                want: mi(
                    27,
                    1,
                    "254:0",
                    "/",
                    "/",
                    &["rw", "relatime"],
                    "ext4",
                    "/dev/vda",
                    &["rw", "discard", "resv_strict", "resuid=65534", "resgid=65534"],
                ),
            },
            Case {
                name: "space escaped in a real mount point",
                file: "host-debian12.txt",
                mount_point: "/tmp/hf fixture/stage dir",
                want: mi(42, 27, "7:0", "/", "/tmp/hf fixture/stage dir", &["rw", "relatime"], "ext4", "/dev/loop0", &["rw"]),
            },
            Case {
                name: "real bind of a subdirectory, tab in the target",
                file: "host-debian12.txt",
                mount_point: "/tmp/hf fixture/pub\ttab",
                want: mi(43, 27, "7:0", "/sub", "/tmp/hf fixture/pub\ttab", &["rw", "relatime"], "ext4", "/dev/loop0", &["rw"]),
            },
            Case {
                name: "real read-only bind",
                file: "host-debian12.txt",
                mount_point: "/tmp/hf-fixture-ro",
                want: mi(44, 27, "7:0", "/", "/tmp/hf-fixture-ro", &["ro", "nosuid", "relatime"], "ext4", "/dev/loop0", &["rw"]),
            },
            Case {
                name: "real bind of a device node onto a file",
                file: "host-debian12.txt",
                mount_point: "/tmp/hf-fixture-blk",
                want: mi(
                    45,
                    27,
                    "0:6",
                    "/loop0",
                    "/tmp/hf-fixture-blk",
                    &["rw", "relatime"],
                    "devtmpfs",
                    "devtmpfs",
                    &["rw", "size=12334460k", "nr_inodes=3083615", "mode=755"],
                ),
            },
            Case {
                name: "real backslash",
                file: "host-debian12.txt",
                mount_point: "/tmp/hf fixture/back\\slash",
                want: mi(46, 27, "0:39", "/", "/tmp/hf fixture/back\\slash", &["rw", "relatime"], "tmpfs", "tmpfs", &["rw", "size=1024k"]),
            },
            Case {
                name: "real optional field shared:N",
                file: "unshare-shared.txt",
                mount_point: "/tmp/hfb",
                want: mi(72, 47, "0:42", "/", "/tmp/hfb", &["rw", "relatime"], "tmpfs", "tmpfs", &["rw"]),
            },
            Case {
                name: "nfs4 with two optional fields",
                file: "handwritten.txt",
                mount_point: "/var/lib/kubelet/pods/ab12/volumes/kubernetes.io~csi/pvc-1/mount",
                want: mi(
                    101,
                    25,
                    "0:52",
                    "/",
                    "/var/lib/kubelet/pods/ab12/volumes/kubernetes.io~csi/pvc-1/mount",
                    &["rw", "relatime"],
                    "nfs4",
                    "10.0.0.5:/export/holdfast/pvc-1",
                    &["rw", "vers=4.2", "addr=10.0.0.5"],
                ),
            },
            Case {
                name: "zfs dataset bound read-only from a subdirectory",
                file: "handwritten.txt",
                mount_point: "/var/lib/kubelet/pods/cd34/volumes/kubernetes.io~csi/pvc-2/mount",
                want: mi(
                    111,
                    25,
                    "0:61",
                    "/data",
                    "/var/lib/kubelet/pods/cd34/volumes/kubernetes.io~csi/pvc-2/mount",
                    &["ro", "nosuid", "nodev", "noatime"],
                    "zfs",
                    "tank/holdfast/pvc-2",
                    &["rw", "xattr", "noacl"],
                ),
            },
            Case {
                name: "newline and backslash escapes, several optional fields",
                file: "handwritten.txt",
                mount_point: "/mnt/new\nline\\back",
                want: mi(
                    121,
                    1,
                    "7:3",
                    "/sub dir",
                    "/mnt/new\nline\\back",
                    &["rw", "relatime"],
                    "xfs",
                    "/dev/loop3",
                    &["rw", "attr2", "inode64"],
                ),
            },
            Case {
                name: "a deleted mount point keeps the kernel's suffix",
                file: "handwritten.txt",
                mount_point: "/mnt/gone (deleted)",
                want: mi(141, 1, "0:81", "/", "/mnt/gone (deleted)", &["rw", "relatime"], "tmpfs", "none", &["rw"]),
            },
        ];
        for c in cases {
            let mounts = parse(&fixture(c.file)).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            let got = top_at(&mounts, Path::new(c.mount_point)).unwrap_or_else(|| panic!("{}: {} not found", c.name, c.mount_point));
            assert_eq!(got, &c.want, "{}", c.name);
        }
    }

    #[test]
    fn every_fixture_parses_completely() {
        for (file, lines) in [("host-debian12.txt", 0), ("unshare-shared.txt", 0), ("handwritten.txt", 13)] {
            let text = fixture(file);
            let mounts = parse(&text).unwrap();
            assert_eq!(mounts.len(), text.lines().count(), "{file}");
            if lines > 0 {
                assert_eq!(mounts.len(), lines, "{file}");
            }
        }
    }

    #[test]
    fn rejects_malformed_lines() {
        struct Case {
            name: &'static str,
            line: &'static str,
            want: &'static str,
        }
        let cases = [
            Case { name: "no separator", line: "1 0 8:1 / / rw ext4 /dev/sda1 rw", want: "separator" },
            Case { name: "too few fields before separator", line: "1 0 8:1 / - ext4 /dev/sda1 rw", want: "fields before" },
            Case { name: "nothing after separator", line: "1 0 8:1 / / rw - ext4", want: "after the separator" },
            Case { name: "bad id", line: "x 0 8:1 / / rw - ext4 /dev/sda1 rw", want: "mount id" },
            Case { name: "bad parent", line: "1 y 8:1 / / rw - ext4 /dev/sda1 rw", want: "parent id" },
            Case { name: "bad major:minor", line: "1 0 8-1 / / rw - ext4 /dev/sda1 rw", want: "major:minor" },
        ];
        for c in cases {
            let err = parse(&format!("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n{}\n", c.line)).unwrap_err();
            assert!(err.contains(c.want) && err.contains("line 2"), "{}: {err}", c.name);
        }
    }

    #[test]
    fn unescape_leaves_non_escapes_alone() {
        struct Case {
            input: &'static str,
            want: &'static [u8],
        }
        let cases = [
            Case { input: r"a\040b", want: b"a b" },
            Case { input: r"\011\012\134", want: b"\t\n\\" },
            Case { input: r"trailing\04", want: br"trailing\04" },
            Case { input: r"not\08octal", want: br"not\08octal" },
            Case { input: r"\777", want: br"\777" },
            Case { input: r"\303\251", want: "é".as_bytes() },
        ];
        for c in cases {
            assert_eq!(unescape(c.input), c.want, "{}", c.input);
        }
    }

    #[test]
    fn lookups() {
        let mounts = parse(&fixture("handwritten.txt")).unwrap();
        let stacked = find_by_mount_point(&mounts, Path::new("/mnt/stacked/"));
        assert_eq!(stacked.iter().map(|m| m.id).collect::<Vec<_>>(), [131, 132]);
        assert_eq!(top_at(&mounts, Path::new("/mnt/stacked")).unwrap().id, 132);
        assert!(top_at(&mounts, Path::new("/mnt")).is_none());
        let nfs = find_by_source(&mounts, "10.0.0.5:/export/holdfast/pvc-1/");
        assert_eq!(nfs.iter().map(|m| m.id).collect::<Vec<_>>(), [100, 101]);
        assert_eq!(find_by_source(&mounts, "/dev/loop3").len(), 2);
        assert_eq!(find_by_source(&mounts, "/").len(), 0);
        assert!(find_by_source(&mounts, "tank/holdfast/pvc-2").iter().all(|m| m.fs_type == "zfs"));
    }

    #[test]
    fn readonly_from_mount_or_superblock() {
        let mounts = parse(&fixture("handwritten.txt")).unwrap();
        let by_id = |id| mounts.iter().find(|m| m.id == id).unwrap();
        assert!(by_id(111).is_readonly());
        assert!(!by_id(110).is_readonly());
        let sb_ro = parse("5 1 8:1 / /x rw - ext4 /dev/sda1 ro,errors=remount-ro").unwrap();
        assert!(sb_ro[0].is_readonly());
        let emergency = parse("42 27 7:0 / /x rw,relatime - ext4 /dev/loop0 rw,errors=remount-ro,emergency_ro").unwrap();
        assert!(emergency[0].is_readonly());
    }

    #[test]
    fn reads_this_process_table() {
        let mounts = read().unwrap();
        assert!(top_at(&mounts, Path::new("/")).is_some(), "no root mount in {PROC_MOUNTINFO}");
        assert!(read_from(Path::new("/nonexistent/mountinfo")).unwrap_err().to_string().contains("/nonexistent/mountinfo"));
    }
}
