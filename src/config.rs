//! The configuration file (TOML): which pools this process owns and which topology labels
//! it reports. Mistakes are caught at start-up with the line they are on: unknown keys,
//! missing required keys, keys that do not apply to the pool's kind, duplicate pool names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::volume_id::{PoolKind, valid_pool_name};

/// A configuration error, with its position in the file when known.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Extra topology segments this node reports besides `topology.holdfast.dev/node`,
    /// e.g. `"topology.kubernetes.io/zone" = "zone-a"`.
    #[serde(default)]
    pub topology: BTreeMap<String, String>,
    /// Where request paths (staging, target, volume paths) may point: absolute prefixes such
    /// as the kubelet's or Nomad's roots. Unset: any absolute path but `/proc` and `/sys`.
    /// A top-level key, so it goes before the first `[topology]` / `[[pool]]` table.
    #[serde(default)]
    pub allowed_path_prefixes: Vec<PathBuf>,
    /// The pools.
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// Commands put in front of the LVM / ZFS tools (a `[exec_prefix]` table; in a container,
    /// `nsenter` into the host so its userland does the work).
    #[serde(default)]
    pub exec_prefix: ExecPrefixConfig,
}

/// The `[exec_prefix]` table: an argv to put in front of each tool family's programs, e.g.
/// `lvm = ["nsenter", "--target=1", "--mount", "--uts", "--ipc", "--net", "--"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecPrefixConfig {
    /// In front of the LVM tools and dmsetup ([`crate::exec::LVM_PROGRAMS`]).
    pub lvm: Option<Vec<String>>,
    /// In front of `zfs` and `zpool` ([`crate::exec::ZFS_PROGRAMS`]).
    pub zfs: Option<Vec<String>>,
}

impl ExecPrefixConfig {
    /// The prefix for [`crate::exec::RealExec::with_prefix`].
    pub fn to_prefix(&self) -> crate::exec::ExecPrefix {
        use crate::exec::{ExecPrefix, LVM_PROGRAMS, ZFS_PROGRAMS};
        ExecPrefix::default()
            .with(LVM_PROGRAMS, self.lvm.clone().unwrap_or_default())
            .with(ZFS_PROGRAMS, self.zfs.clone().unwrap_or_default())
    }

    fn check(&self) -> Result<(), String> {
        for (family, prefix) in [("lvm", &self.lvm), ("zfs", &self.zfs)] {
            let Some(prefix) = prefix else { continue };
            if prefix.is_empty() {
                return Err(format!("exec_prefix.{family} is empty: leave it out to run the tools unprefixed"));
            }
            if prefix.iter().any(|a| a.is_empty() || a.contains('\0')) {
                return Err(format!("exec_prefix.{family}: an argument is empty or holds a NUL byte"));
            }
        }
        Ok(())
    }
}

/// One `[[pool]]` table. Keys that do not apply to the pool's `kind` are rejected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Unique name; part of every volume id.
    pub name: Spanned<String>,
    /// `file`, `lvm`, `zfs` or `nfs`.
    pub kind: Spanned<PoolKind>,
    /// file: the directory holding the volume files.
    pub path: Option<PathBuf>,
    /// file: space kept free on the pool's filesystem (`"1GiB"`).
    pub reserve: Option<String>,
    /// file: `thick` (default: every volume's blocks allocated at creation) or `thin` (sparse
    /// images; a StorageClass may choose per volume with the `provisioning` parameter).
    pub provisioning: Option<String>,
    /// Filesystem for new filesystem volumes when the request names none (`ext4`, `xfs`, `btrfs`).
    pub default_fs: Option<String>,
    /// lvm: the volume group.
    pub volume_group: Option<String>,
    /// lvm: a thin pool in the volume group; thin LVs when set, thick LVs otherwise.
    pub thin_pool: Option<String>,
    /// lvm thin: how far the pool may be overcommitted (2.0 = twice its size).
    pub overprovision_ratio: Option<f64>,
    /// lvm: extra `lvcreate` arguments (RAID, stripes).
    pub lvcreate_options: Option<Vec<String>>,
    /// lvm thick: the copy-on-write space of a snapshot, a share of its origin (`"20%"`, the
    /// default) or a size (`"1GiB"`); see [`crate::pool::lvm::SnapshotReserve`].
    pub snapshot_reserve: Option<String>,
    /// zfs: the parent dataset.
    pub dataset: Option<String>,
    /// zfs: default properties of new datasets and zvols.
    pub properties: Option<BTreeMap<String, String>>,
    /// zfs: `refquota` (default) or `quota`.
    pub quota_mode: Option<String>,
    /// zfs: sparse zvols.
    pub sparse: Option<bool>,
    /// nfs: the server.
    pub server: Option<String>,
    /// nfs: the exported path.
    pub export: Option<String>,
    /// nfs: mount options.
    pub mount_options: Option<Vec<String>>,
    /// nfs: naming template of the per-volume subdirectory.
    pub subdir: Option<String>,
    /// nfs: `delete`, `retain` or `archive`.
    pub on_delete: Option<String>,
    /// Topology segments where a shared pool is reachable (default: everywhere).
    pub pool_topology: Option<BTreeMap<String, String>>,
    /// Any kind: labels a StorageClass's `poolSelector` matches (`tier = "fast"`), reported
    /// to the controller in the agent's inventory.
    pub labels: Option<BTreeMap<String, String>>,
}

impl PoolConfig {
    /// The pool's name.
    pub fn name(&self) -> &str {
        self.name.get_ref()
    }
    /// The pool's kind.
    pub fn kind(&self) -> PoolKind {
        *self.kind.get_ref()
    }
}

/// Parses a size: plain bytes, or a number with `K`/`M`/`G`/`T` (powers of 1024, with or
/// without `i`/`B`: `1GiB`, `1G`, `512Mi`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().trim_end_matches('B').trim_end_matches('i') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Formats bytes for people: `1 GiB`, `512 MiB`, `4096 B`.
pub fn format_size(b: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (u, shift) in UNITS {
        let unit = 1u64 << shift;
        if b >= unit {
            return if b % unit == 0 { format!("{} {u}", b / unit) } else { format!("{:.2} {u}", b as f64 / unit as f64) };
        }
    }
    format!("{b} B")
}

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].matches('\n').count() + 1
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        Config::parse(&src).map_err(|ConfigError(m)| ConfigError(format!("{}: {m}", path.display())))
    }

    /// Parses and checks config text.
    pub fn parse(src: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(src).map_err(|e| {
            let at = e.span().map(|s| format!("line {}: ", line_of(src, s.start))).unwrap_or_default();
            ConfigError(format!("{at}{}", e.message()))
        })?;
        if let Err(e) = crate::node::safepath::PathPolicy::new(&cfg.allowed_path_prefixes) {
            return Err(ConfigError(format!("allowed_path_prefixes: {e}")));
        }
        cfg.exec_prefix.check().map_err(ConfigError)?;
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &cfg.pools {
            let line = line_of(src, p.name.span().start);
            let fail = |m: String| ConfigError(format!("line {line}: pool {:?}: {m}", p.name()));
            if !valid_pool_name(p.name()) {
                return Err(fail("pool names are 1 to 24 characters of a-z, 0-9, '-' and '_'".into()));
            }
            if let Some(first) = seen.insert(p.name(), line) {
                return Err(fail(format!("duplicate pool name (first defined on line {first})")));
            }
            p.check_keys().map_err(fail)?;
        }
        Ok(cfg)
    }

    /// Finds a pool by name.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name() == name)
    }
}

/// What a pool occupies, for the overlap check: two pools that occupy the same or nested
/// storage could see, change or delete each other's volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Occupies {
    /// A directory (file pools), canonicalised where it exists.
    Dir(PathBuf),
    /// A volume group and its thin pool, if any (lvm pools).
    Vg(String, Option<String>),
    /// A dataset, as its components (zfs pools).
    Dataset(Vec<String>),
    /// An NFS server and the components of its export path (nfs pools).
    Export(String, Vec<String>),
}

impl Occupies {
    /// Whether two pools occupying `self` and `other` overlap: the same thing, or one nested in
    /// the other.
    fn overlaps(&self, other: &Occupies) -> bool {
        fn nested<T: PartialEq>(a: &[T], b: &[T]) -> bool {
            a.starts_with(b) || b.starts_with(a)
        }
        match (self, other) {
            (Occupies::Dir(a), Occupies::Dir(b)) => a.starts_with(b) || b.starts_with(a),
            // LVs of pools with different thin pools (or a thick and a thin pool) of one VG
            // are told apart by their pool's marker tag; one VG + one thin pool twice is not.
            (Occupies::Vg(a, ta), Occupies::Vg(b, tb)) => a == b && ta == tb,
            (Occupies::Dataset(a), Occupies::Dataset(b)) => nested(a, b),
            (Occupies::Export(sa, a), Occupies::Export(sb, b)) => sa == sb && nested(a, b),
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Occupies::Dir(p) => format!("directory {}", p.display()),
            Occupies::Vg(vg, None) => format!("volume group {vg}"),
            Occupies::Vg(vg, Some(tp)) => format!("thin pool {vg}/{tp}"),
            Occupies::Dataset(d) => format!("dataset {}", d.join("/")),
            Occupies::Export(s, e) => format!("export {s}:/{}", e.join("/")),
        }
    }
}

/// `path` made comparable: the longest existing ancestor resolved by `canon` (symlinks,
/// `..`), the rest normalised by hand (it does not exist, so it holds no symlink).
fn comparable_path(path: &Path, canon: &dyn Fn(&Path) -> Option<PathBuf>) -> PathBuf {
    use std::path::Component;
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    let mut base = loop {
        if let Some(c) = canon(&existing) {
            break c;
        }
        match (existing.file_name().map(|n| n.to_owned()), existing.parent().map(Path::to_path_buf)) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent;
            }
            // Nothing of it exists (or `..` ends it): normalise the whole path by hand.
            _ => {
                rest.clear();
                break PathBuf::new();
            }
        }
    };
    let tail: Vec<std::ffi::OsString> = if base.as_os_str().is_empty() {
        path.components().filter(|c| matches!(c, Component::Normal(_) | Component::ParentDir)).map(|c| c.as_os_str().to_owned()).collect()
    } else {
        rest.into_iter().rev().collect()
    };
    if base.as_os_str().is_empty() {
        base.push("/");
    }
    for part in tail {
        if part == ".." {
            base.pop();
        } else if part != "." {
            base.push(part);
        }
    }
    base
}

fn components(s: &str) -> Vec<String> {
    s.split('/').filter(|c| !c.is_empty() && *c != ".").map(str::to_owned).collect()
}

impl PoolConfig {
    fn occupies(&self, canon: &dyn Fn(&Path) -> Option<PathBuf>) -> Option<Occupies> {
        match self.kind() {
            PoolKind::File => self.path.as_deref().map(|p| Occupies::Dir(comparable_path(p, canon))),
            PoolKind::Lvm => self.volume_group.clone().map(|vg| Occupies::Vg(vg, self.thin_pool.clone())),
            PoolKind::Zfs => self.dataset.as_deref().map(|d| Occupies::Dataset(components(d))),
            PoolKind::Nfs => {
                let server = self.server.as_deref()?.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
                Some(Occupies::Export(server, components(self.export.as_deref()?)))
            }
        }
    }
}

/// Refuses pools that occupy the same or nested storage: file pools on equal or nested
/// directories (compared after resolving symlinks and `..` where the directories exist), lvm
/// pools on the same volume group and thin pool, zfs pools on the same or nested datasets, nfs
/// pools on the same server with the same or nested exports. The error names both pools.
pub fn check_overlaps(cfg: &Config) -> Result<(), ConfigError> {
    check_overlaps_with(&cfg.pools, &|p: &Path| std::fs::canonicalize(p).ok())
}

fn check_overlaps_with(pools: &[PoolConfig], canon: &dyn Fn(&Path) -> Option<PathBuf>) -> Result<(), ConfigError> {
    let occupied: Vec<(&PoolConfig, Occupies)> = pools.iter().filter_map(|p| Some((p, p.occupies(canon)?))).collect();
    for (i, (a, oa)) in occupied.iter().enumerate() {
        for (b, ob) in &occupied[i + 1..] {
            if oa.overlaps(ob) {
                let what = if oa == ob { "the same storage" } else { "nested storage" };
                return Err(ConfigError(format!(
                    "pools {:?} ({}) and {:?} ({}) occupy {what}: one pool could see, change or delete the other's volumes; \
                     give each pool storage of its own",
                    a.name(),
                    oa.describe(),
                    b.name(),
                    ob.describe()
                )));
            }
        }
    }
    Ok(())
}

impl PoolConfig {
    /// Checks that the keys present are the ones the kind needs and understands.
    fn check_keys(&self) -> Result<(), String> {
        let present: Vec<(&str, bool)> = vec![
            ("path", self.path.is_some()),
            ("reserve", self.reserve.is_some()),
            ("provisioning", self.provisioning.is_some()),
            ("volume_group", self.volume_group.is_some()),
            ("thin_pool", self.thin_pool.is_some()),
            ("overprovision_ratio", self.overprovision_ratio.is_some()),
            ("lvcreate_options", self.lvcreate_options.is_some()),
            ("snapshot_reserve", self.snapshot_reserve.is_some()),
            ("dataset", self.dataset.is_some()),
            ("properties", self.properties.is_some()),
            ("quota_mode", self.quota_mode.is_some()),
            ("sparse", self.sparse.is_some()),
            ("server", self.server.is_some()),
            ("export", self.export.is_some()),
            ("mount_options", self.mount_options.is_some()),
            ("subdir", self.subdir.is_some()),
            ("on_delete", self.on_delete.is_some()),
            ("pool_topology", self.pool_topology.is_some()),
        ];
        let (required, allowed): (&[&str], &[&str]) = match self.kind() {
            PoolKind::File => (&["path"], &["path", "reserve", "provisioning"]),
            PoolKind::Lvm => {
                (&["volume_group"], &["volume_group", "thin_pool", "overprovision_ratio", "lvcreate_options", "snapshot_reserve"])
            }
            PoolKind::Zfs => (&["dataset"], &["dataset", "properties", "quota_mode", "sparse"]),
            PoolKind::Nfs => (&["server", "export"], &["server", "export", "mount_options", "subdir", "on_delete", "pool_topology"]),
        };
        let kind = self.kind();
        for (key, set) in &present {
            if *set && !allowed.contains(key) {
                return Err(format!("key `{key}` does not apply to a {kind} pool"));
            }
        }
        for key in required {
            if !present.iter().any(|(k, set)| k == key && *set) {
                return Err(format!("a {kind} pool needs `{key}`"));
            }
        }
        if let Some(r) = &self.reserve {
            parse_size(r).ok_or_else(|| format!("reserve {r:?} is not a size (examples: \"1GiB\", \"500MiB\")"))?;
        }
        if let Some(p) = &self.provisioning {
            if p != "thick" && p != "thin" {
                return Err(format!("provisioning {p:?} is neither \"thick\" nor \"thin\""));
            }
        }
        if let Some(fs) = &self.default_fs {
            let allowed: &[&str] = match self.kind() {
                PoolKind::Zfs => &["zfs", "ext4", "xfs", "btrfs"],
                PoolKind::Nfs => &["nfs"],
                _ => &crate::node::format::SUPPORTED_FS,
            };
            if !allowed.contains(&fs.as_str()) {
                return Err(format!("default_fs {fs:?} is not supported by a {} pool (one of {allowed:?})", self.kind()));
            }
        }
        if let Some(p) = &self.path {
            if !p.is_absolute() {
                return Err(format!("path {} must be absolute", p.display()));
            }
        }
        if let Some(r) = self.overprovision_ratio {
            if !(r >= 1.0 && r.is_finite()) {
                return Err(format!("overprovision_ratio {r} must be a number >= 1.0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_file_pool() {
        let cfg = Config::parse(
            r#"
[topology]
"topology.kubernetes.io/zone" = "z1"

[[pool]]
name = "p1"
kind = "file"
path = "/var/lib/holdfast/p1"
reserve = "1GiB"
default_fs = "xfs"
"#,
        )
        .unwrap();
        assert_eq!(cfg.pools.len(), 1);
        assert_eq!(cfg.pools[0].name(), "p1");
        assert_eq!(cfg.pools[0].kind(), PoolKind::File);
        assert_eq!(cfg.topology["topology.kubernetes.io/zone"], "z1");
    }

    #[test]
    fn mistakes_name_their_line() {
        struct Case {
            name: &'static str,
            src: &'static str,
            want: &'static str,
        }
        let cases = [
            Case { name: "unknown key", src: "[[pool]]\nname = \"p\"\nkind = \"file\"\npath = \"/x\"\ncolour = 1\n", want: "line 5" },
            Case {
                name: "missing path",
                src: "[[pool]]\nname = \"p\"\nkind = \"file\"\n",
                want: "line 2: pool \"p\": a file pool needs `path`",
            },
            Case {
                name: "duplicate",
                src: "[[pool]]\nname = \"p\"\nkind = \"file\"\npath = \"/a\"\n[[pool]]\nname = \"p\"\nkind = \"file\"\npath = \"/b\"\n",
                want: "line 6: pool \"p\": duplicate pool name (first defined on line 2)",
            },
            Case { name: "bad kind", src: "[[pool]]\nname = \"p\"\nkind = \"disk\"\npath = \"/a\"\n", want: "line 3" },
            Case {
                name: "foreign key",
                src: "[[pool]]\nname = \"p\"\nkind = \"file\"\npath = \"/a\"\nvolume_group = \"vg\"\n",
                want: "`volume_group` does not apply to a file pool",
            },
            Case {
                name: "bad reserve",
                src: "[[pool]]\nname = \"p\"\nkind = \"file\"\npath = \"/a\"\nreserve = \"lots\"\n",
                want: "reserve \"lots\" is not a size",
            },
            Case { name: "relative path", src: "[[pool]]\nname = \"p\"\nkind = \"file\"\npath = \"a\"\n", want: "must be absolute" },
            Case {
                name: "bad fs",
                src: "[[pool]]\nname = \"p\"\nkind = \"file\"\npath = \"/a\"\ndefault_fs = \"ntfs\"\n",
                want: "default_fs \"ntfs\" is not supported",
            },
            Case { name: "bad name", src: "[[pool]]\nname = \"P/1\"\nkind = \"file\"\npath = \"/a\"\n", want: "pool names are" },
        ];
        for c in cases {
            let err = Config::parse(c.src).unwrap_err().to_string();
            assert!(err.contains(c.want), "{}: {err:?} does not contain {:?}", c.name, c.want);
        }
    }

    fn pools(src: &str) -> Vec<PoolConfig> {
        Config::parse(src).unwrap().pools
    }

    fn file(name: &str, path: &str) -> String {
        format!("[[pool]]\nname = \"{name}\"\nkind = \"file\"\npath = \"{path}\"\n")
    }

    #[test]
    fn overlapping_pools_are_refused_naming_both() {
        struct Case {
            name: &'static str,
            src: String,
            want: Option<&'static str>,
        }
        let lvm = |n: &str, vg: &str, tp: Option<&str>| {
            let tp = tp.map(|t| format!("thin_pool = \"{t}\"\n")).unwrap_or_default();
            format!("[[pool]]\nname = \"{n}\"\nkind = \"lvm\"\nvolume_group = \"{vg}\"\n{tp}")
        };
        let zfs = |n: &str, d: &str| format!("[[pool]]\nname = \"{n}\"\nkind = \"zfs\"\ndataset = \"{d}\"\n");
        let nfs = |n: &str, s: &str, e: &str| format!("[[pool]]\nname = \"{n}\"\nkind = \"nfs\"\nserver = \"{s}\"\nexport = \"{e}\"\n");
        let cases = [
            Case {
                name: "file equal",
                src: file("a", "/p/x") + &file("b", "/p/x"),
                want: Some("\"a\" (directory /p/x) and \"b\" (directory /p/x) occupy the same"),
            },
            Case { name: "file trailing slash", src: file("a", "/p/x/") + &file("b", "/p/x"), want: Some("the same storage") },
            Case { name: "file dot-dot", src: file("a", "/p/x/../x") + &file("b", "/p/x"), want: Some("the same storage") },
            Case { name: "file nested", src: file("a", "/p") + &file("b", "/p/x/y"), want: Some("nested storage") },
            Case {
                name: "file nested, inner first",
                src: file("a", "/p/x/y") + &file("b", "/p"),
                want: Some("\"a\" (directory /p/x/y) and \"b\""),
            },
            Case { name: "file siblings", src: file("a", "/p/x") + &file("b", "/p/xy"), want: None },
            Case { name: "lvm same vg", src: lvm("a", "vg0", None) + &lvm("b", "vg0", None), want: Some("volume group vg0") },
            Case {
                name: "lvm same thin pool",
                src: lvm("a", "vg0", Some("tp")) + &lvm("b", "vg0", Some("tp")),
                want: Some("thin pool vg0/tp"),
            },
            Case { name: "lvm two thin pools of one vg", src: lvm("a", "vg0", Some("tp")) + &lvm("b", "vg0", Some("tq")), want: None },
            Case { name: "lvm thick and thin of one vg", src: lvm("a", "vg0", None) + &lvm("b", "vg0", Some("tp")), want: None },
            Case { name: "lvm other vg", src: lvm("a", "vg0", None) + &lvm("b", "vg1", None), want: None },
            Case { name: "zfs equal", src: zfs("a", "tank/hf") + &zfs("b", "tank/hf"), want: Some("dataset tank/hf") },
            Case { name: "zfs nested", src: zfs("a", "tank/hf") + &zfs("b", "tank/hf/fast"), want: Some("nested storage") },
            Case { name: "zfs prefix of a name is not nesting", src: zfs("a", "tank/hf") + &zfs("b", "tank/hf2"), want: None },
            Case { name: "nfs equal", src: nfs("a", "srv", "/export") + &nfs("b", "SRV", "/export/"), want: Some("export srv:/export") },
            Case { name: "nfs nested", src: nfs("a", "srv", "/export") + &nfs("b", "srv", "/export/k8s"), want: Some("nested storage") },
            Case { name: "nfs root export", src: nfs("a", "srv", "/") + &nfs("b", "srv", "/export"), want: Some("nested storage") },
            Case { name: "nfs other server", src: nfs("a", "srv", "/export") + &nfs("b", "srv2", "/export"), want: None },
            Case {
                name: "nfs ipv6 brackets",
                src: nfs("a", "[fd00::1]", "/e") + &nfs("b", "fd00::1", "/e"),
                want: Some("the same storage"),
            },
            Case { name: "different kinds", src: file("a", "/tank/hf") + &zfs("b", "tank/hf"), want: None },
            Case {
                name: "third pool overlaps the first",
                src: file("a", "/p") + &file("b", "/q") + &file("c", "/p/c"),
                want: Some("\"a\""),
            },
        ];
        // Nothing of these paths exists: the check must not depend on the host.
        let canon = |_: &Path| None;
        for c in cases {
            let got = check_overlaps_with(&pools(&c.src), &canon);
            match (c.want, got) {
                (None, Ok(())) => {}
                (Some(w), Err(ConfigError(m))) => assert!(m.contains(w), "{}: {m:?} does not contain {w:?}", c.name),
                (w, g) => panic!("{}: want {w:?}, got {g:?}", c.name),
            }
        }
    }

    #[test]
    fn overlap_check_resolves_symlinks_and_dot_dot_of_existing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir_all(real.join("sub")).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let d = dir.path().display();
        struct Case {
            name: &'static str,
            a: String,
            b: String,
            overlap: bool,
        }
        let cases = [
            Case { name: "symlink to the same dir", a: format!("{d}/real"), b: format!("{d}/link"), overlap: true },
            Case { name: "missing child under a symlink", a: format!("{d}/real/new"), b: format!("{d}/link/new"), overlap: true },
            Case { name: "nested through a symlink", a: format!("{d}/link/sub"), b: format!("{d}/real"), overlap: true },
            Case { name: "dot-dot through an existing dir", a: format!("{d}/real/sub/.."), b: format!("{d}/link"), overlap: true },
            Case { name: "separate dirs", a: format!("{d}/real/sub"), b: format!("{d}/other"), overlap: false },
        ];
        for c in cases {
            let cfg = Config::parse(&(file("a", &c.a) + &file("b", &c.b))).unwrap();
            assert_eq!(check_overlaps(&cfg).is_err(), c.overlap, "{}", c.name);
        }
    }

    #[test]
    fn allowed_path_prefixes_are_absolute() {
        let cfg = Config::parse("allowed_path_prefixes = [\"/var/lib/kubelet\", \"/var/lib/nomad//\"]\n").unwrap();
        assert_eq!(cfg.allowed_path_prefixes, [PathBuf::from("/var/lib/kubelet"), PathBuf::from("/var/lib/nomad//")]);
        assert!(Config::parse("").unwrap().allowed_path_prefixes.is_empty());
        for bad in ["allowed_path_prefixes = [\"var/lib\"]\n", "allowed_path_prefixes = [\"/a/../b\"]\n"] {
            let err = Config::parse(bad).unwrap_err().to_string();
            assert!(err.contains("allowed_path_prefixes") && err.contains("absolute"), "{bad}: {err}");
        }
    }

    #[test]
    fn exec_prefix_reaches_the_lvm_and_zfs_tools_only() {
        let cfg = Config::parse(
            "[[pool]]\nname = \"p\"\nkind = \"file\"\npath = \"/a\"\n\
             [exec_prefix]\nlvm = [\"nsenter\", \"--target=1\", \"--mount\", \"--\"]\n",
        )
        .unwrap();
        let prefix = cfg.exec_prefix.to_prefix();
        let run = |p: &str| prefix.apply(crate::exec::Cmd::new(p).arg("x")).argv().join(" ");
        assert_eq!(run("lvcreate"), "nsenter --target=1 --mount -- lvcreate x");
        assert_eq!(run("zfs"), "zfs x");
        assert_eq!(run("mkfs.xfs"), "mkfs.xfs x");
        assert!(Config::parse("").unwrap().exec_prefix.to_prefix().is_empty());
        for (bad, want) in [
            ("[exec_prefix]\nlvm = []\n", "exec_prefix.lvm is empty"),
            ("[exec_prefix]\nzfs = [\"nsenter\", \"\"]\n", "exec_prefix.zfs: an argument is empty"),
            ("[exec_prefix]\nnfs = [\"x\"]\n", "unknown field `nfs`"),
        ] {
            let err = Config::parse(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("512Mi"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("x"), None);
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1536 << 20), "1.50 GiB");
        assert_eq!(format_size(100), "100 B");
    }
}
