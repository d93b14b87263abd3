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

impl PoolConfig {
    /// Checks that the keys present are the ones the kind needs and understands.
    fn check_keys(&self) -> Result<(), String> {
        let present: Vec<(&str, bool)> = vec![
            ("path", self.path.is_some()),
            ("reserve", self.reserve.is_some()),
            ("volume_group", self.volume_group.is_some()),
            ("thin_pool", self.thin_pool.is_some()),
            ("overprovision_ratio", self.overprovision_ratio.is_some()),
            ("lvcreate_options", self.lvcreate_options.is_some()),
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
            PoolKind::File => (&["path"], &["path", "reserve"]),
            PoolKind::Lvm => (&["volume_group"], &["volume_group", "thin_pool", "overprovision_ratio", "lvcreate_options"]),
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
