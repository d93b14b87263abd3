//! Pure parsers of the LVM reports holdfast reads: `lvs` and `vgs` with `--reportformat json
//! --units b --nosuffix`, and the ten-character `lv_attr` field. Tested on output captured from
//! lvm2 2.03.16 (tests/fixtures/lvm/).

use serde::Deserialize;

/// The `lvs` columns holdfast asks for, in the order of `-o`.
///
/// No segment field (`segtype`, `seg_size`…): with one, lvs prints a row per segment, and an
/// LV that was extended into a second free range would be listed twice.
/// `vg_extent_size` (issue 14): a listing of the volume group also tells the unit LVM sizes
/// new LVs in, so a create needs no `vgs` beside it.
pub const LV_FIELDS: &str = "lv_name,vg_name,lv_path,lv_size,lv_attr,lv_tags,pool_lv,origin,data_percent,metadata_percent,vg_extent_size";
/// The `vgs` columns holdfast asks for.
pub const VG_FIELDS: &str = "vg_name,vg_size,vg_free,vg_extent_size,pv_count";

/// One logical volume as `lvs` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lv {
    /// LV name.
    pub name: String,
    /// Its volume group.
    pub vg: String,
    /// `/dev/<vg>/<lv>` (empty for hidden and pool LVs).
    pub path: String,
    /// Size in bytes (virtual size for thin LVs).
    pub size: u64,
    /// The `lv_attr` flags.
    pub attr: LvAttr,
    /// Tags, in LVM's (sorted) order.
    pub tags: Vec<String>,
    /// The thin pool of a thin LV, else empty.
    pub pool_lv: String,
    /// The origin of a snapshot, else empty (also empty once the origin is removed).
    pub origin: String,
    /// Data usage of a thin pool or thin LV, percent (None when not applicable or inactive).
    pub data_percent: Option<f64>,
    /// Metadata usage of a thin pool, percent.
    pub metadata_percent: Option<f64>,
    /// The volume group's extent size in bytes (`None`: not in the report).
    pub extent_size: Option<u64>,
}

/// One volume group as `vgs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vg {
    /// VG name.
    pub name: String,
    /// Total size in bytes.
    pub size: u64,
    /// Unallocated bytes.
    pub free: u64,
    /// Extent size in bytes: every LV size is a multiple of it.
    pub extent_size: u64,
    /// Number of physical volumes.
    pub pv_count: u32,
}

/// The `lv_attr` string (see lvs(8), "lv_attr bits"), e.g. `Vwi-a-tz-k`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvAttr(pub String);

impl LvAttr {
    fn bit(&self, i: usize) -> char {
        self.0.chars().nth(i).unwrap_or('-')
    }
    /// Bit 5: `a` when the LV is active.
    pub fn active(&self) -> bool {
        self.bit(4) == 'a'
    }
    /// Bit 5 spelled out when it is neither active nor plainly inactive.
    pub fn state_problem(&self) -> Option<&'static str> {
        Some(match self.bit(4) {
            'a' | '-' => return None,
            's' => "suspended",
            'I' => "an invalid snapshot",
            'S' => "an invalid suspended snapshot",
            'm' | 'M' => "a snapshot whose merge failed",
            'd' => "mapped without tables",
            'i' => "mapped with an inactive table",
            'c' | 'C' => "a thin pool that needs a check (thin_check)",
            'h' => "historical (removed)",
            _ => "in an unknown state",
        })
    }
    /// Bit 6: `o` when the device is open (mounted or in use).
    pub fn open(&self) -> bool {
        self.bit(5) == 'o'
    }
    /// Bit 9, the volume health, spelled out when it is bad (`w`, write-mostly, is a setting).
    pub fn health_problem(&self) -> Option<&'static str> {
        Some(match self.bit(8) {
            '-' | 'w' => return None,
            'p' => "partial: one of its physical volumes is missing",
            'r' => "a RAID image needs a refresh",
            'm' => "RAID mismatches exist",
            'F' => "failed",
            'D' => "out of data space",
            'M' => "metadata read-only (out of metadata space or damaged)",
            'E' => "in error",
            _ => "in an unknown health state",
        })
    }
    /// Bit 1: `s` (or `S`, invalid) for an old-style copy-on-write snapshot, the kind a thick
    /// pool takes; thin snapshots show `V` like any thin LV.
    pub fn cow_snapshot(&self) -> bool {
        matches!(self.bit(0), 's' | 'S')
    }
    /// Bit 5 `I` / `S`: a copy-on-write snapshot that dm-snapshot invalidated (its COW space
    /// overflowed, or it failed): its content is lost and it must never be read as a source.
    pub fn invalid_snapshot(&self) -> bool {
        matches!(self.bit(4), 'I' | 'S')
    }
    /// Bit 10: `k` when the LV is skipped by normal activation (thin snapshots).
    pub fn activation_skip(&self) -> bool {
        self.bit(9) == 'k'
    }
}

#[derive(Deserialize)]
struct Report<T> {
    report: Vec<T>,
}

#[derive(Deserialize)]
struct LvSection {
    #[serde(default)]
    lv: Vec<RawLv>,
}

#[derive(Deserialize)]
struct VgSection {
    #[serde(default)]
    vg: Vec<RawVg>,
}

#[derive(Deserialize)]
struct RawLv {
    lv_name: String,
    vg_name: String,
    #[serde(default)]
    lv_path: String,
    lv_size: String,
    lv_attr: String,
    #[serde(default)]
    lv_tags: String,
    #[serde(default)]
    pool_lv: String,
    #[serde(default)]
    origin: String,
    #[serde(default)]
    data_percent: String,
    #[serde(default)]
    metadata_percent: String,
    #[serde(default)]
    vg_extent_size: String,
}

#[derive(Deserialize)]
struct RawVg {
    vg_name: String,
    vg_size: String,
    vg_free: String,
    vg_extent_size: String,
    pv_count: String,
}

fn bytes(field: &str, v: &str) -> Result<u64, String> {
    v.trim().parse().map_err(|_| format!("{field} {v:?} is not a number of bytes (were --units b --nosuffix given?)"))
}

fn percent(v: &str) -> Option<f64> {
    v.trim().parse().ok()
}

/// Parses `lvs --reportformat json --units b --nosuffix -o` [`LV_FIELDS`]. One entry per LV,
/// even if a report has a row per segment.
pub fn parse_lvs(json: &str) -> Result<Vec<Lv>, String> {
    let r: Report<LvSection> = serde_json::from_str(json).map_err(|e| format!("unexpected lvs JSON: {e}"))?;
    let mut out: Vec<Lv> = Vec::new();
    for raw in r.report.into_iter().flat_map(|s| s.lv) {
        if out.iter().any(|l| l.name == raw.lv_name && l.vg == raw.vg_name) {
            continue;
        }
        out.push(Lv {
            size: bytes("lv_size", &raw.lv_size)?,
            tags: raw.lv_tags.split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect(),
            data_percent: percent(&raw.data_percent),
            metadata_percent: percent(&raw.metadata_percent),
            extent_size: raw.vg_extent_size.trim().parse().ok().filter(|e| *e > 0),
            name: raw.lv_name,
            vg: raw.vg_name,
            path: raw.lv_path,
            attr: LvAttr(raw.lv_attr),
            pool_lv: raw.pool_lv,
            origin: raw.origin,
        });
    }
    Ok(out)
}

/// Parses `vgs --reportformat json --units b --nosuffix -o` [`VG_FIELDS`].
pub fn parse_vgs(json: &str) -> Result<Vec<Vg>, String> {
    let r: Report<VgSection> = serde_json::from_str(json).map_err(|e| format!("unexpected vgs JSON: {e}"))?;
    r.report
        .into_iter()
        .flat_map(|s| s.vg)
        .map(|raw| {
            Ok(Vg {
                size: bytes("vg_size", &raw.vg_size)?,
                free: bytes("vg_free", &raw.vg_free)?,
                extent_size: bytes("vg_extent_size", &raw.vg_extent_size)?,
                pv_count: raw.pv_count.trim().parse().map_err(|_| format!("pv_count {:?} is not a number", raw.pv_count))?,
                name: raw.vg_name,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LVS_VG: &str = include_str!("../../../tests/fixtures/lvm/lvs-vg.json");
    const LVS_ACTIVE: &str = include_str!("../../../tests/fixtures/lvm/lvs-after-activate.json");
    const LVS_NONE: &str = include_str!("../../../tests/fixtures/lvm/lvs-select-none.json");
    const LVS_POOL: &str = include_str!("../../../tests/fixtures/lvm/lvs-pool.json");
    const VGS: &str = include_str!("../../../tests/fixtures/lvm/vgs.json");

    #[test]
    fn parses_a_whole_volume_group() {
        let lvs = parse_lvs(LVS_VG).unwrap();
        let names: Vec<&str> = lvs.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["foreign", "gap", "hf-restored", "hf-seg", "hf-thick1", "hf-thin1", "hfs-snap1", "tp0"]);
        let by_name = |n: &str| lvs.iter().find(|l| l.name == n).unwrap();
        let thin = by_name("hf-thin1");
        assert_eq!(thin.vg, "cap");
        assert_eq!(thin.path, "/dev/cap/hf-thin1");
        assert_eq!(thin.size, 64 << 20);
        assert_eq!(thin.pool_lv, "tp0");
        assert_eq!(thin.data_percent, Some(12.5));
        assert!(thin.tags.contains(&"holdfast.managed".to_owned()));
        assert!(thin.tags.contains(&"holdfast.pool=thin".to_owned()));
        assert!(thin.attr.active());
        assert!(!thin.attr.activation_skip());
        let snap = by_name("hfs-snap1");
        assert_eq!(snap.origin, "hf-thin1");
        assert!(!snap.attr.active(), "thin snapshots are created inactive");
        assert!(snap.attr.activation_skip());
        assert_eq!(snap.data_percent, None, "an inactive thin LV reports no usage");
        // The 128-character CSI name written by lvcreate comes back intact.
        let meta = crate::pool::lvm::tags::decode(&by_name("hf-thick1").tags).unwrap().unwrap();
        assert_eq!(meta.csi_name, format!("pvc-{:0124}", 7));
        assert_eq!(meta.csi_name.len(), 128);
        let pool = by_name("tp0");
        assert_eq!(pool.path, "");
        assert_eq!((pool.data_percent, pool.metadata_percent), (Some(3.12), Some(11.91)));
        assert_eq!(by_name("foreign").tags, ["backup"]);
        assert_eq!(by_name("hf-seg").size, 8 << 20);
    }

    // issue 14: the listing also tells the extent size
    #[test]
    fn an_lv_row_carries_the_extent_size_of_its_volume_group() {
        // The capture predates the column: added as lvs prints a VG field of an LV's row, in
        // the same "lv" section (`vgcreate -s 1M` in capture.sh).
        let with = LVS_POOL.replace("\"metadata_percent\":", "\"vg_extent_size\":\"1048576\", \"metadata_percent\":");
        assert_ne!(with, LVS_POOL);
        let lvs = parse_lvs(&with).unwrap();
        assert!(!lvs.is_empty() && lvs.iter().all(|l| l.extent_size == Some(1 << 20)), "{lvs:?}");
    }

    #[test]
    fn an_lv_of_several_segments_is_one_lv() {
        let lvs = parse_lvs(include_str!("../../../tests/fixtures/lvm/lvs-segments.json")).unwrap();
        assert_eq!(lvs.len(), 1, "{lvs:?}");
        assert_eq!(lvs[0].size, 8 << 20);
    }

    #[test]
    fn parses_activation_and_removed_origins() {
        let lvs = parse_lvs(LVS_ACTIVE).unwrap();
        let snap = lvs.iter().find(|l| l.name == "hfs-snap1").unwrap();
        assert!(snap.attr.active() && snap.attr.activation_skip());
        let after = parse_lvs(include_str!("../../../tests/fixtures/lvm/lvs-origin-removed.json")).unwrap();
        let snap = after.iter().find(|l| l.name == "hfs-snap1").unwrap();
        assert_eq!(snap.origin, "", "a thin snapshot outlives its origin");
    }

    #[test]
    fn parses_empty_and_single_reports() {
        assert!(parse_lvs(LVS_NONE).unwrap().is_empty());
        let pool = parse_lvs(LVS_POOL).unwrap();
        assert_eq!(pool.len(), 1);
        assert_eq!(pool[0].size, 256 << 20);
    }

    #[test]
    fn parses_vgs() {
        let vgs = parse_vgs(VGS).unwrap();
        assert_eq!(vgs, [Vg { name: "cap".into(), size: 1072693248, free: 727 << 20, extent_size: 1 << 20, pv_count: 1 }]);
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        assert!(parse_lvs("").unwrap_err().contains("unexpected lvs JSON"));
        let human = r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_size":"1.00g","lv_attr":"-wi-a-----"}]}]}"#;
        assert!(parse_lvs(human).unwrap_err().contains("--units b --nosuffix"));
    }

    #[test]
    fn attr_bits() {
        struct Case {
            attr: &'static str,
            active: bool,
            state: Option<&'static str>,
            health: Option<&'static str>,
        }
        let cases = [
            Case { attr: "-wi-a-----", active: true, state: None, health: None },
            Case { attr: "-wi-------", active: false, state: None, health: None },
            Case { attr: "twi-aotzD-", active: true, state: None, health: Some("out of data space") },
            Case { attr: "twi-aotzM-", active: true, state: None, health: Some("metadata read-only (out of metadata space or damaged)") },
            Case { attr: "Vwi-a-tzF-", active: true, state: None, health: Some("failed") },
            Case { attr: "-wi-a---p-", active: true, state: None, health: Some("partial: one of its physical volumes is missing") },
            Case { attr: "rwi-a-r-w-", active: true, state: None, health: None },
            Case { attr: "-wi-s-----", active: false, state: Some("suspended"), health: None },
            Case { attr: "", active: false, state: None, health: None },
        ];
        for c in cases {
            let a = LvAttr(c.attr.into());
            assert_eq!(a.active(), c.active, "{}", c.attr);
            assert_eq!(a.state_problem(), c.state, "{}", c.attr);
            assert_eq!(a.health_problem(), c.health, "{}", c.attr);
        }
    }
}
