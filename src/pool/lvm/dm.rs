//! Device-mapper devices of one volume group left suspended. `lvcreate --snapshot` and
//! `lvextend` suspend the origin's device while they change the table; killed in between (the
//! driver killed, or the command's timeout), they leave it suspended and every writer to it
//! hangs. The driver resumes them at start-up (and after a snapshot command that was killed).
//! Only `dmsetup` is used: it asks the kernel by ioctl, where `lvs` would scan devices and
//! could itself hang on the suspended one.

use crate::exec::Cmd;

/// `dmsetup info` of every device: name, uuid and attributes, one line each.
pub fn info() -> Cmd {
    Cmd::new("dmsetup").args(["info", "-c", "--noheadings", "--separator", "|", "-o", "name,uuid,attr"])
}

/// `dmsetup resume NAME`.
pub fn resume(name: &str) -> Cmd {
    Cmd::new("dmsetup").args(["resume", name])
}

/// The names of the suspended LVM devices of volume group `vg` in `dmsetup info` output.
/// A device belongs to `vg` when its name is `<vg>-<lv>` with every `-` in the VG name doubled
/// (device-mapper's escaping), so VG `a` never claims `a--b-lv` of VG `a-b`, and its uuid is
/// an LVM one. attr is `L`ive/`I`nactive, then `s` when suspended, e.g. `L-sw`.
///
/// Lower layers come first (a thin pool's `-tpool` and hidden `_tdata`/`_tmeta` LVs, a thick
/// snapshot's `-real`/`-cow`): a device is resumed only once what it sits on is live again.
pub fn suspended(vg: &str, info_output: &str) -> Vec<String> {
    let prefix = format!("{}-", vg.replace('-', "--"));
    let mut names: Vec<String> = info_output
        .lines()
        .filter_map(|line| {
            let mut f = line.trim().split('|');
            let (name, uuid, attr) = (f.next()?, f.next()?, f.next()?);
            let rest = name.strip_prefix(&prefix)?;
            let ours = !rest.is_empty() && !rest.starts_with('-') && uuid.starts_with("LVM-");
            (ours && attr.chars().nth(2) == Some('s')).then(|| name.to_owned())
        })
        .collect();
    let layer = |n: &str| {
        let lv = n.strip_prefix(&prefix).unwrap_or(n);
        ["-tpool", "-real", "-cow"].iter().any(|s| lv.ends_with(s)) || lv.contains('_')
    };
    names.sort_by_key(|n| !layer(n));
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_the_suspended_devices_of_its_own_volume_group() {
        // Captured from `dmsetup info -c --noheadings --separator '|' -o name,uuid,attr` with
        // hf-a suspended by `dmsetup suspend`, beside another VG whose name extends ours.
        let out = "\
hf--vg-hf--a|LVM-0fNqM2w3bKZ3JkW0aqvZfzqZp1Wb3h4h3mK1oV3X8r1Yb6C9nSdO2Q7eUjmHbQ5z|L-sw
hf--vg-hf--b|LVM-0fNqM2w3bKZ3JkW0aqvZfzqZp1Wb3h4hAAAAoV3X8r1Yb6C9nSdO2Q7eUjmHbQ5z|L--w
hf--vg-tp-tpool|LVM-0fNqM2w3bKZ3JkW0aqvZfzqZp1Wb3h4hBBBBoV3X8r1Yb6C9nSdO2Q7eUjmHbQ5z-tpool|L-sw
hf--vg--x-hf--a|LVM-1fNqM2w3bKZ3JkW0aqvZfzqZp1Wb3h4h3mK1oV3X8r1Yb6C9nSdO2Q7eUjmHbQ5z|L-sw
hf--vg-crypt|CRYPT-LUKS2-0123|L-sw
";
        assert_eq!(suspended("hf-vg", out), ["hf--vg-tp-tpool", "hf--vg-hf--a"], "the pool before the thin LV on it");
        assert_eq!(suspended("hf-vg-x", out), ["hf--vg--x-hf--a"]);
        assert!(suspended("other", out).is_empty());
        assert!(suspended("hf-vg", "No devices found\n").is_empty());
    }

    #[tokio::test]
    async fn the_pool_resumes_only_its_own_suspended_devices() {
        use crate::exec::{FakeExec, Reply};
        use crate::pool::Pool;
        let fake = std::sync::Arc::new(FakeExec::new());
        fake.on("dmsetup info", vec![Reply::Ok("vg0-hf-a|LVM-abc|L-sw\nvg0-hf-b|LVM-abd|L--w\nvg1-hf-a|LVM-abe|L-sw\n".into())]);
        let cfg = crate::config::Config::parse("[[pool]]\nname = \"p\"\nkind = \"lvm\"\nvolume_group = \"vg0\"\n").unwrap().pools.remove(0);
        let pool = crate::pool::lvm::LvmPool::new(&cfg, fake.clone()).unwrap();
        pool.recover().await.unwrap();
        assert_eq!(fake.lines(), ["dmsetup info -c --noheadings --separator | -o name,uuid,attr", "dmsetup resume vg0-hf-a"]);
    }
}
