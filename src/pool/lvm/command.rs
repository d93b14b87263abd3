//! The LVM command lines holdfast runs (pure builders, so tests can assert exact argv) and the
//! classification of their failures. lvm2 exits 5 (ECMD_FAILED) for nearly every failure, so
//! each class is the exit code *and* lvm2's fixed message (LC_ALL=C), captured in
//! tests/fixtures/lvm/*.err; anything else stays an error with its stderr.

use std::time::Duration;

use crate::exec::{Cmd, ExecError};

use super::report::{LV_FIELDS, VG_FIELDS};

/// Reports are quick, but wait behind another command's VG lock.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// Changes (create, extend, remove, activate) also wait for udev and may discard blocks.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(180);

/// lvm2's exit code for a failed command (ECMD_FAILED).
const ECMD_FAILED: i32 = 5;

/// `lvs` of one LV (`vg/lv`) or of a whole VG (`vg`), as JSON in bytes.
pub fn lvs(target: &str) -> Cmd {
    Cmd::new("lvs").args(["--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS, target]).timeout(REPORT_TIMEOUT)
}

/// `vgs` of one VG, as JSON in bytes.
pub fn vgs(vg: &str) -> Cmd {
    Cmd::new("vgs").args(["--reportformat", "json", "--units", "b", "--nosuffix", "-o", VG_FIELDS, vg]).timeout(REPORT_TIMEOUT)
}

fn add_tags(mut cmd: Cmd, tags: &[String]) -> Cmd {
    for t in tags {
        cmd = cmd.arg("--addtag").arg(t.as_str());
    }
    cmd
}

/// A new thick LV of `size` bytes. `--wipesignatures y --zero y`: the extents may have held a
/// deleted volume, and the node formats only a device without any signature.
pub fn lvcreate_thick(vg: &str, lv: &str, size: u64, tags: &[String], extra: &[String]) -> Cmd {
    let cmd = Cmd::new("lvcreate").args(["--yes", "--wipesignatures", "y", "--zero", "y", "--activate", "y", "--name", lv]);
    let cmd = add_tags(cmd.arg("--size").arg(format!("{size}b")), tags);
    cmd.args(extra.iter().cloned()).arg(vg).timeout(CHANGE_TIMEOUT)
}

/// A new thin LV of virtual `size` bytes in `vg/pool` (unprovisioned blocks read as zeros).
pub fn lvcreate_thin(vg: &str, pool: &str, lv: &str, size: u64, tags: &[String], extra: &[String]) -> Cmd {
    let cmd = Cmd::new("lvcreate").args(["--yes", "--activate", "y", "--name", lv]);
    let cmd = cmd.arg("--virtualsize").arg(format!("{size}b")).arg("--thinpool").arg(format!("{vg}/{pool}"));
    add_tags(cmd, tags).args(extra.iter().cloned()).timeout(CHANGE_TIMEOUT)
}

/// A thin snapshot `lv` of the thin LV `vg/origin`. A snapshot is left with LVM's activation
/// skip flag (never activated, never written); a restored or cloned volume (`writable`) clears
/// it and is activated at once.
pub fn lvcreate_snapshot(vg: &str, origin: &str, lv: &str, tags: &[String], writable: bool) -> Cmd {
    let mut cmd = Cmd::new("lvcreate").args(["--yes", "--snapshot", "--name", lv]);
    if writable {
        cmd = cmd.args(["--setactivationskip", "n", "--activate", "y"]);
    }
    add_tags(cmd, tags).arg(format!("{vg}/{origin}")).timeout(CHANGE_TIMEOUT)
}

/// A copy-on-write snapshot `lv` of the thick LV `vg/origin` with `cow` bytes of COW space
/// (what the origin may change before the snapshot overflows and is invalidated). Active with
/// its origin: dm-snapshot must see every origin write to keep the snapshot's content.
pub fn lvcreate_cow_snapshot(vg: &str, origin: &str, lv: &str, cow: u64, tags: &[String]) -> Cmd {
    let cmd = Cmd::new("lvcreate").args(["--yes", "--snapshot", "--name", lv, "--size"]).arg(format!("{cow}b"));
    add_tags(cmd, tags).arg(format!("{vg}/{origin}")).timeout(CHANGE_TIMEOUT)
}

/// Grows `vg/lv` to `size` bytes (the filesystem is grown by the node).
pub fn lvextend(vg: &str, lv: &str, size: u64) -> Cmd {
    Cmd::new("lvextend").args(["--yes", "--size"]).arg(format!("{size}b")).arg(format!("{vg}/{lv}")).timeout(CHANGE_TIMEOUT)
}

/// Removes `vg/lv`.
pub fn lvremove(vg: &str, lv: &str) -> Cmd {
    Cmd::new("lvremove").args(["--yes"]).arg(format!("{vg}/{lv}")).timeout(CHANGE_TIMEOUT)
}

/// Activates `vg/lv`, also when it carries the activation skip flag (`-K`).
pub fn lvchange_activate(vg: &str, lv: &str) -> Cmd {
    Cmd::new("lvchange").args(["--activate", "y", "--ignoreactivationskip"]).arg(format!("{vg}/{lv}")).timeout(CHANGE_TIMEOUT)
}

/// Deactivates `vg/lv` (a thick origin: with its COW snapshots).
pub fn lvchange_deactivate(vg: &str, lv: &str) -> Cmd {
    Cmd::new("lvchange").args(["--activate", "n"]).arg(format!("{vg}/{lv}")).timeout(CHANGE_TIMEOUT)
}

/// Whether `lvextend` refused because its LV is the origin of active COW snapshots (LVM grows
/// a snapshot origin only while it is inactive).
pub fn is_active_origin(e: &ExecError) -> bool {
    failed_with(e, &["only while inactive"])
}

/// Removes one tag from `vg/lv`.
pub fn lvchange_deltag(vg: &str, lv: &str, tag: &str) -> Cmd {
    Cmd::new("lvchange").args(["--deltag", tag]).arg(format!("{vg}/{lv}")).timeout(CHANGE_TIMEOUT)
}

fn failed_with(e: &ExecError, needles: &[&str]) -> bool {
    let stderr = e.stderr().to_ascii_lowercase();
    e.code() == Some(ECMD_FAILED) && needles.iter().any(|n| stderr.contains(n))
}

/// `lvs vg/lv`, `lvremove vg/lv`…: the LV does not exist (the VG does).
pub fn is_lv_not_found(e: &ExecError) -> bool {
    failed_with(e, &["failed to find logical volume"])
}

/// The volume group itself does not exist.
pub fn is_vg_not_found(e: &ExecError) -> bool {
    e.code() == Some(ECMD_FAILED) && e.stderr().lines().map(str::trim).any(|l| l.starts_with("Volume group \"") && l.ends_with("not found"))
}

/// `lvcreate`: an LV of that name exists.
pub fn is_lv_exists(e: &ExecError) -> bool {
    failed_with(e, &["already exists in volume group"])
}

/// `lvcreate` / `lvextend`: not enough free extents, or a thin pool past its threshold.
pub fn is_no_space(e: &ExecError) -> bool {
    failed_with(e, &["insufficient free space", "free space in thin pool", "has insufficient"])
}

/// `lvremove`: the LV is open (mounted, or held by another device).
pub fn is_in_use(e: &ExecError) -> bool {
    failed_with(e, &["in use"])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A captured failure: first line the exit code, then stderr.
    fn captured(text: &str) -> ExecError {
        let (code, stderr) = text.split_once('\n').unwrap();
        ExecError::Failed { cmd: "lvm".into(), code: code.trim().parse().unwrap(), stdout: String::new(), stderr: stderr.into() }
    }

    macro_rules! fixture {
        ($name:literal) => {
            captured(include_str!(concat!("../../../tests/fixtures/lvm/", $name, ".err")))
        };
    }

    #[test]
    fn builds_exact_command_lines() {
        struct Case {
            name: &'static str,
            cmd: Cmd,
            want: &'static str,
        }
        let tags = vec!["holdfast.managed".to_owned(), "holdfast.pool=p".to_owned()];
        let raid = vec!["--type".to_owned(), "raid1".to_owned(), "--mirrors".to_owned(), "1".to_owned()];
        let cases = [
            Case {
                name: "lvs of one LV",
                cmd: lvs("vg0/hf-a"),
                want: "lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_path,lv_size,lv_attr,lv_tags,pool_lv,origin,data_percent,metadata_percent,vg_extent_size vg0/hf-a",
            },
            Case {
                name: "vgs",
                cmd: vgs("vg0"),
                want: "vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free,vg_extent_size,pv_count vg0",
            },
            Case {
                name: "thick",
                cmd: lvcreate_thick("vg0", "hf-a", 1 << 30, &tags, &[]),
                want: "lvcreate --yes --wipesignatures y --zero y --activate y --name hf-a --size 1073741824b --addtag holdfast.managed --addtag holdfast.pool=p vg0",
            },
            Case {
                name: "thick with RAID options",
                cmd: lvcreate_thick("vg0", "hf-a", 1 << 20, &tags[..1], &raid),
                want: "lvcreate --yes --wipesignatures y --zero y --activate y --name hf-a --size 1048576b --addtag holdfast.managed --type raid1 --mirrors 1 vg0",
            },
            Case {
                name: "thin",
                cmd: lvcreate_thin("vg0", "tp0", "hf-a", 1 << 30, &tags, &[]),
                want: "lvcreate --yes --activate y --name hf-a --virtualsize 1073741824b --thinpool vg0/tp0 --addtag holdfast.managed --addtag holdfast.pool=p",
            },
            Case {
                name: "thin with options",
                cmd: lvcreate_thin("vg0", "tp0", "hf-a", 1 << 20, &[], &["--errorwhenfull".into(), "y".into()]),
                want: "lvcreate --yes --activate y --name hf-a --virtualsize 1048576b --thinpool vg0/tp0 --errorwhenfull y",
            },
            Case {
                name: "snapshot",
                cmd: lvcreate_snapshot("vg0", "hf-a", "hfs-s", &tags[..1], false),
                want: "lvcreate --yes --snapshot --name hfs-s --addtag holdfast.managed vg0/hf-a",
            },
            Case {
                name: "restore",
                cmd: lvcreate_snapshot("vg0", "hfs-s", "hf-b", &tags[..1], true),
                want: "lvcreate --yes --snapshot --name hf-b --setactivationskip n --activate y --addtag holdfast.managed vg0/hfs-s",
            },
            Case {
                name: "thick snapshot",
                cmd: lvcreate_cow_snapshot("vg0", "hf-a", "hfs-s", 4 << 20, &tags[..1]),
                want: "lvcreate --yes --snapshot --name hfs-s --size 4194304b --addtag holdfast.managed vg0/hf-a",
            },
            Case { name: "extend", cmd: lvextend("vg0", "hf-a", 2 << 30), want: "lvextend --yes --size 2147483648b vg0/hf-a" },
            Case { name: "remove", cmd: lvremove("vg0", "hf-a"), want: "lvremove --yes vg0/hf-a" },
            Case { name: "activate", cmd: lvchange_activate("vg0", "hf-a"), want: "lvchange --activate y --ignoreactivationskip vg0/hf-a" },
            Case {
                name: "deltag",
                cmd: lvchange_deltag("vg0", "hf-a", "holdfast.pending"),
                want: "lvchange --deltag holdfast.pending vg0/hf-a",
            },
        ];
        for c in cases {
            assert_eq!(c.cmd.display(), c.want, "{}", c.name);
            assert!(c.cmd.timeout >= REPORT_TIMEOUT, "{}", c.name);
        }
    }

    #[test]
    fn classifies_captured_failures() {
        struct Case {
            name: &'static str,
            err: ExecError,
            lv_not_found: bool,
            vg_not_found: bool,
            exists: bool,
            no_space: bool,
            in_use: bool,
        }
        let no = false;
        let cases = [
            Case {
                name: "lvs missing LV",
                err: fixture!("lvs-missing-lv"),
                lv_not_found: true,
                vg_not_found: no,
                exists: no,
                no_space: no,
                in_use: no,
            },
            Case {
                name: "lvs missing VG",
                err: fixture!("lvs-missing-vg"),
                lv_not_found: no,
                vg_not_found: true,
                exists: no,
                no_space: no,
                in_use: no,
            },
            Case {
                name: "lvs VG list",
                err: fixture!("lvs-missing-vg-list"),
                lv_not_found: no,
                vg_not_found: true,
                exists: no,
                no_space: no,
                in_use: no,
            },
            Case {
                name: "lvremove missing",
                err: fixture!("lvremove-missing"),
                lv_not_found: true,
                vg_not_found: no,
                exists: no,
                no_space: no,
                in_use: no,
            },
            Case {
                name: "lvcreate exists",
                err: fixture!("lvcreate-exists"),
                lv_not_found: no,
                vg_not_found: no,
                exists: true,
                no_space: no,
                in_use: no,
            },
            Case {
                name: "thin exists",
                err: fixture!("lvcreate-exists-thin"),
                lv_not_found: no,
                vg_not_found: no,
                exists: true,
                no_space: no,
                in_use: no,
            },
            Case {
                name: "no space",
                err: fixture!("lvcreate-no-space"),
                lv_not_found: no,
                vg_not_found: no,
                exists: no,
                no_space: true,
                in_use: no,
            },
            Case {
                name: "extend no space",
                err: fixture!("lvextend-no-space"),
                lv_not_found: no,
                vg_not_found: no,
                exists: no,
                no_space: true,
                in_use: no,
            },
            Case {
                name: "remove open",
                err: fixture!("lvremove-open"),
                lv_not_found: no,
                vg_not_found: no,
                exists: no,
                no_space: no,
                in_use: true,
            },
            Case {
                name: "extend smaller",
                err: fixture!("lvextend-smaller"),
                lv_not_found: no,
                vg_not_found: no,
                exists: no,
                no_space: no,
                in_use: no,
            },
            Case {
                name: "same text, other exit code",
                err: ExecError::Failed {
                    cmd: "lvs".into(),
                    code: 3,
                    stdout: String::new(),
                    stderr: "Failed to find logical volume \"a/b\"".into(),
                },
                lv_not_found: no,
                vg_not_found: no,
                exists: no,
                no_space: no,
                in_use: no,
            },
            Case {
                name: "timeout",
                err: ExecError::Timeout { cmd: "lvs".into(), timeout: REPORT_TIMEOUT },
                lv_not_found: no,
                vg_not_found: no,
                exists: no,
                no_space: no,
                in_use: no,
            },
        ];
        for c in cases {
            let got = (is_lv_not_found(&c.err), is_vg_not_found(&c.err), is_lv_exists(&c.err), is_no_space(&c.err), is_in_use(&c.err));
            assert_eq!(got, (c.lv_not_found, c.vg_not_found, c.exists, c.no_space, c.in_use), "{}", c.name);
        }
    }
}
