//! The by-hand side of `holdfast bench --ops`: what an operator would type to get the same
//! result as each CSI call, per pool kind, as command templates. A [`Hand`] runs the steps of
//! one volume, remembers how to undo each one, and undoes exactly what it did.
//!
//! The commands do the job the pool does (see `src/pool/*`), not a cut-down one:
//!
//! | kind | create | stage | snapshot | restore | expand |
//! |---|---|---|---|---|---|
//! | file | `fallocate` (thick, the default) | `losetup`, `mkfs.ext4`, `mount` | `cp --reflink=auto --sparse=always` | the same copy back | `fallocate`, `losetup -c`, `resize2fs` |
//! | lvm-thin | `lvcreate -V --thinpool` | `mkfs.ext4`, `mount` | `lvcreate -s` | `lvcreate -s -kn -ay` of the snapshot | `lvextend`, `resize2fs` |
//! | lvm-thick | `lvcreate -L -Wy -Zy` | `mkfs.ext4`, `mount` | `lvcreate -s -L` (20% COW) | `lvcreate` + `dd conv=sparse` | `lvextend`, `resize2fs` |
//! | zfs (zvol) | `zfs create -V` | `udevadm settle`, `mkfs.ext4`, `mount` | `zfs snapshot` | `zfs clone` | `zfs set volsize`, `resize2fs` |
//! | zfs-dataset | `zfs create -o mountpoint=legacy -o refquota` | `mount -t zfs` | `zfs snapshot` | `zfs clone` | `zfs set refquota` |
//! | nfs | `mkdir` on the export | `mount -t nfs` | `tar --xattrs --sparse -c` | `mkdir`, `tar -x` | nothing (NFS has no quota) |
//!
//! Publish is `mount --bind` everywhere. Only names this run made are ever removed.

use std::collections::HashMap;
use std::time::Duration;

use crate::exec::{Cmd, Exec};

/// Where the by-hand volumes go: the same place (directory, volume group, dataset, export)
/// as the pool measured, for a fair comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `file:DIR`: image files in DIR (default: the benchmark's work directory).
    File { dir: String },
    /// `lvm-thin:VG/POOL`.
    LvmThin { vg: String, pool: String },
    /// `lvm-thick:VG`.
    LvmThick { vg: String },
    /// `zfs:PARENT`: zvols under the dataset PARENT, formatted ext4.
    Zvol { parent: String },
    /// `zfs-dataset:PARENT`: filesystem datasets under PARENT.
    Dataset { parent: String },
    /// `nfs:LOCAL=SERVER:/EXPORT`: directories made through LOCAL (where the export is mounted
    /// on this machine), mounted from SERVER:/EXPORT.
    Nfs { local: String, remote: String },
}

impl Target {
    /// Parses `KIND:SPEC` (see the variants).
    pub fn parse(s: &str) -> Result<Target, String> {
        let (kind, spec) = s.split_once(':').ok_or_else(|| format!("--by-hand {s:?}: expected KIND:WHERE, e.g. lvm-thin:vg/pool"))?;
        let nonempty = |v: &str, what: &str| {
            if v.is_empty() || v.contains(char::is_whitespace) {
                Err(format!("--by-hand {s:?}: {what} is empty or has a space"))
            } else {
                Ok(v.to_owned())
            }
        };
        match kind {
            "file" => Ok(Target::File { dir: nonempty(spec, "the directory")? }),
            "lvm-thin" => {
                let (vg, pool) = spec.split_once('/').ok_or_else(|| format!("--by-hand {s:?}: expected lvm-thin:VG/THINPOOL"))?;
                Ok(Target::LvmThin { vg: nonempty(vg, "the volume group")?, pool: nonempty(pool, "the thin pool")? })
            }
            "lvm-thick" => Ok(Target::LvmThick { vg: nonempty(spec, "the volume group")? }),
            "zfs" => Ok(Target::Zvol { parent: nonempty(spec, "the parent dataset")? }),
            "zfs-dataset" => Ok(Target::Dataset { parent: nonempty(spec, "the parent dataset")? }),
            "nfs" => {
                let (local, remote) =
                    spec.split_once('=').ok_or_else(|| format!("--by-hand {s:?}: expected nfs:LOCAL_DIR=SERVER:/EXPORT"))?;
                Ok(Target::Nfs { local: nonempty(local, "the local directory")?, remote: nonempty(remote, "the export")? })
            }
            _ => Err(format!("--by-hand {s:?}: unknown kind {kind:?} (file, lvm-thin, lvm-thick, zfs, zfs-dataset, nfs)")),
        }
    }

    /// The kind, as `--by-hand` spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::File { .. } => "file",
            Target::LvmThin { .. } => "lvm-thin",
            Target::LvmThick { .. } => "lvm-thick",
            Target::Zvol { .. } => "zfs",
            Target::Dataset { .. } => "zfs-dataset",
            Target::Nfs { .. } => "nfs",
        }
    }
}

/// A step of making or changing a volume, in the order a volume's life goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// CreateVolume.
    Create,
    /// NodeStageVolume.
    Stage,
    /// NodePublishVolume.
    Publish,
    /// CreateSnapshot.
    Snapshot,
    /// CreateVolume from the snapshot.
    Restore,
    /// ControllerExpandVolume + NodeExpandVolume (to twice the size).
    Expand,
}

/// One command: its argv (with `{var}` placeholders), the variable its trimmed stdout sets, and
/// the command that undoes it.
#[derive(Debug, Clone, Copy)]
struct Step {
    argv: &'static [&'static str],
    capture: Option<&'static str>,
    undo: Option<&'static [&'static str]>,
}

const fn run(argv: &'static [&'static str]) -> Step {
    Step { argv, capture: None, undo: None }
}

const fn undone(argv: &'static [&'static str], undo: &'static [&'static str]) -> Step {
    Step { argv, capture: None, undo: Some(undo) }
}

const MOUNT: Step = undone(&["mount", "-t", "ext4", "{dev}", "{staging}"], &["umount", "{staging}"]);
const PUBLISH: Step = undone(&["mount", "--bind", "{staging}", "{target}"], &["umount", "{target}"]);
const MKFS: Step = run(&["mkfs.ext4", "-q", "{dev}"]);
const RESIZE: Step = run(&["resize2fs", "{dev}"]);

/// The steps of `phase` on `target`.
fn steps(target: &Target, phase: Phase) -> Vec<Step> {
    use Phase::*;
    match (target, phase) {
        (_, Publish) => vec![PUBLISH],
        (Target::File { .. }, Create) => vec![undone(&["fallocate", "-l", "{size}", "{img}"], &["rm", "-f", "{img}"])],
        (Target::File { .. }, Stage) => vec![
            Step { argv: &["losetup", "-f", "--show", "{img}"], capture: Some("dev"), undo: Some(&["losetup", "-d", "{dev}"]) },
            MKFS,
            MOUNT,
        ],
        (Target::File { .. }, Snapshot) => {
            vec![undone(&["cp", "--reflink=auto", "--sparse=always", "{img}", "{snap_img}"], &["rm", "-f", "{snap_img}"])]
        }
        (Target::File { .. }, Restore) => {
            vec![undone(&["cp", "--reflink=auto", "--sparse=always", "{snap_img}", "{clone_img}"], &["rm", "-f", "{clone_img}"])]
        }
        (Target::File { .. }, Expand) => vec![run(&["fallocate", "-l", "{new_size}", "{img}"]), run(&["losetup", "-c", "{dev}"]), RESIZE],
        (Target::LvmThin { .. }, Create) => vec![undone(
            &["lvcreate", "-y", "-n", "{name}", "-V", "{size}b", "--thinpool", "{vg}/{pool}"],
            &["lvremove", "-y", "{vg}/{name}"],
        )],
        (Target::LvmThick { .. }, Create) => {
            vec![undone(&["lvcreate", "-y", "-Wy", "-Zy", "-n", "{name}", "-L", "{size}b", "{vg}"], &["lvremove", "-y", "{vg}/{name}"])]
        }
        (Target::LvmThin { .. } | Target::LvmThick { .. } | Target::Zvol { .. }, Stage) => vec![MKFS, MOUNT],
        (Target::LvmThin { .. }, Snapshot) => {
            vec![undone(&["lvcreate", "-y", "-s", "-n", "{snap}", "{vg}/{name}"], &["lvremove", "-y", "{vg}/{snap}"])]
        }
        (Target::LvmThick { .. }, Snapshot) => {
            vec![undone(&["lvcreate", "-y", "-s", "-n", "{snap}", "-L", "{cow}b", "{vg}/{name}"], &["lvremove", "-y", "{vg}/{snap}"])]
        }
        (Target::LvmThin { .. }, Restore) => {
            vec![undone(&["lvcreate", "-y", "-s", "-kn", "-ay", "-n", "{clone}", "{vg}/{snap}"], &["lvremove", "-y", "{vg}/{clone}"])]
        }
        (Target::LvmThick { .. }, Restore) => vec![
            undone(&["lvcreate", "-y", "-Wy", "-Zy", "-n", "{clone}", "-L", "{size}b", "{vg}"], &["lvremove", "-y", "{vg}/{clone}"]),
            run(&["dd", "if=/dev/{vg}/{snap}", "of=/dev/{vg}/{clone}", "bs=1M", "conv=sparse,fsync", "status=none"]),
        ],
        (Target::LvmThin { .. } | Target::LvmThick { .. }, Expand) => vec![run(&["lvextend", "-L", "{new_size}b", "{vg}/{name}"]), RESIZE],
        (Target::Zvol { .. }, Create) => {
            vec![undone(&["zfs", "create", "-V", "{size}", "{parent}/{name}"], &["zfs", "destroy", "{parent}/{name}"])]
        }
        (Target::Dataset { .. }, Create) => vec![undone(
            &["zfs", "create", "-o", "mountpoint=legacy", "-o", "refquota={size}", "{parent}/{name}"],
            &["zfs", "destroy", "{parent}/{name}"],
        )],
        (Target::Dataset { .. }, Stage) => vec![undone(&["mount", "-t", "zfs", "{parent}/{name}", "{staging}"], &["umount", "{staging}"])],
        (Target::Zvol { .. } | Target::Dataset { .. }, Snapshot) => {
            vec![undone(&["zfs", "snapshot", "{parent}/{name}@{snap}"], &["zfs", "destroy", "{parent}/{name}@{snap}"])]
        }
        (Target::Zvol { .. } | Target::Dataset { .. }, Restore) => {
            vec![undone(&["zfs", "clone", "{parent}/{name}@{snap}", "{parent}/{clone}"], &["zfs", "destroy", "{parent}/{clone}"])]
        }
        (Target::Zvol { .. }, Expand) => vec![run(&["zfs", "set", "volsize={new_size}", "{parent}/{name}"]), RESIZE],
        (Target::Dataset { .. }, Expand) => vec![run(&["zfs", "set", "refquota={new_size}", "{parent}/{name}"])],
        (Target::Nfs { .. }, Create) => {
            vec![undone(&["mkdir", "-m", "0755", "{local}/{name}"], &["rm", "-rf", "--one-file-system", "{local}/{name}"])]
        }
        (Target::Nfs { .. }, Stage) => vec![undone(&["mount", "-t", "nfs", "{remote}/{name}", "{staging}"], &["umount", "{staging}"])],
        (Target::Nfs { .. }, Snapshot) => vec![undone(
            &["tar", "--xattrs", "--sparse", "--numeric-owner", "-cf", "{local}/{snap}.tar", "-C", "{local}/{name}", "."],
            &["rm", "-f", "{local}/{snap}.tar"],
        )],
        (Target::Nfs { .. }, Restore) => vec![
            undone(&["mkdir", "{local}/{clone}"], &["rm", "-rf", "--one-file-system", "{local}/{clone}"]),
            run(&["tar", "--xattrs", "--sparse", "--numeric-owner", "-xf", "{local}/{snap}.tar", "-C", "{local}/{clone}"]),
        ],
        (Target::Nfs { .. }, Expand) => vec![],
    }
}

/// Whether `phase` has anything to do by hand on `target` (expand on nfs has not).
pub fn has_steps(target: &Target, phase: Phase) -> bool {
    !steps(target, phase).is_empty()
}

/// The commands of `phases` for the table's "by hand is" column: program names, in order,
/// each once.
pub fn describe(target: &Target, phases: &[Phase]) -> String {
    let mut names: Vec<String> = Vec::new();
    for p in phases {
        for s in steps(target, *p) {
            let name = match s.argv {
                ["mount", "--bind", ..] => "mount --bind".to_owned(),
                ["zfs", sub, ..] => format!("zfs {sub}"),
                ["lvcreate", rest @ ..] if rest.contains(&"-s") => "lvcreate -s".to_owned(),
                [prog, ..] => (*prog).to_owned(),
                [] => continue,
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    if names.is_empty() { "nothing to do".into() } else { names.join(", ") }
}

/// The commands that undo everything `phases` made, for the teardown row.
pub fn describe_undo(target: &Target, phases: &[Phase]) -> String {
    let mut names: Vec<String> = Vec::new();
    for p in phases.iter().rev() {
        for s in steps(target, *p).iter().rev() {
            if let Some(u) = s.undo {
                let name = u.iter().take(1).map(|p| (*p).to_owned()).collect::<String>();
                let name = if u.first() == Some(&"zfs") { "zfs destroy".into() } else { name };
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    names.join(", ")
}

/// One by-hand volume: its variables and the undo commands of what was done, newest last.
#[derive(Debug)]
pub struct Hand {
    vars: HashMap<&'static str, String>,
    undo: Vec<Vec<String>>,
    target: Target,
}

impl Hand {
    /// A volume named `name` (unique to this run) of `size` bytes, grown to `2 * size` by
    /// expand; its files, if any, and its staging and target paths under `dir` (which exists).
    pub fn new(target: &Target, name: &str, dir: &str, size: u64) -> Hand {
        let mut vars: HashMap<&'static str, String> = HashMap::from([
            ("name", name.to_owned()),
            ("snap", format!("{name}-snap")),
            ("clone", format!("{name}-restored")),
            ("size", size.to_string()),
            ("new_size", (2 * size).to_string()),
            ("cow", crate::pool::round_up_mib(size.div_ceil(5)).to_string()),
            ("staging", format!("{dir}/staging")),
            ("target", format!("{dir}/target")),
        ]);
        match target {
            Target::File { dir: pool } => {
                vars.insert("img", format!("{pool}/{name}.img"));
                vars.insert("snap_img", format!("{pool}/{name}-snap.img"));
                vars.insert("clone_img", format!("{pool}/{name}-restored.img"));
            }
            Target::LvmThin { vg, pool } => {
                vars.insert("vg", vg.clone());
                vars.insert("pool", pool.clone());
                vars.insert("dev", format!("/dev/{vg}/{name}"));
            }
            Target::LvmThick { vg } => {
                vars.insert("vg", vg.clone());
                vars.insert("dev", format!("/dev/{vg}/{name}"));
            }
            Target::Zvol { parent } => {
                vars.insert("parent", parent.clone());
                vars.insert("dev", format!("/dev/zvol/{parent}/{name}"));
            }
            Target::Dataset { parent } => {
                vars.insert("parent", parent.clone());
            }
            Target::Nfs { local, remote } => {
                vars.insert("local", local.clone());
                vars.insert("remote", remote.clone());
            }
        }
        if let Target::Zvol { .. } = target {
            // The zvol's device node appears through udev, after `zfs create` returns.
            vars.insert("settle", "1".into());
        }
        Hand { vars, undo: Vec::new(), target: target.clone() }
    }

    fn fill(&self, argv: &[&str]) -> Result<Vec<String>, String> {
        argv.iter().map(|a| expand(a, &self.vars)).collect()
    }

    /// Runs the steps of `phases`, in order; stops at the first failure (what was done stays
    /// recorded for [`Hand::undo`]).
    pub async fn run(&mut self, exec: &dyn Exec, phases: &[Phase]) -> Result<(), String> {
        for &phase in phases {
            if phase == Phase::Stage && self.vars.contains_key("settle") {
                sh(exec, vec!["udevadm".into(), "settle".into()]).await?;
            }
            for step in steps(&self.target, phase) {
                let argv = self.fill(step.argv)?;
                let out = sh(exec, argv).await?;
                if let Some(var) = step.capture {
                    let v = out.trim().to_owned();
                    if var == "dev" && !v.starts_with("/dev/loop") {
                        return Err(format!("losetup printed {v:?}, not a loop device"));
                    }
                    self.vars.insert(var, v);
                }
                if let Some(u) = step.undo {
                    let u = self.fill(u)?;
                    self.undo.push(u);
                }
            }
        }
        Ok(())
    }

    /// Undoes everything done, newest first. Keeps going after a failure so that as much as
    /// possible is released, and reports every failure.
    pub async fn undo(&mut self, exec: &dyn Exec) -> Result<(), String> {
        let mut errors = Vec::new();
        while let Some(argv) = self.undo.pop() {
            if let Err(e) = sh(exec, argv).await {
                errors.push(e);
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }
}

/// Replaces every `{var}` in `template`; an unknown variable is an error (a bug in a recipe).
fn expand(template: &str, vars: &HashMap<&'static str, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out += &rest[..start];
        let end = rest[start..].find('}').ok_or_else(|| format!("unclosed {{ in {template:?}"))? + start;
        let key = &rest[start + 1..end];
        out += vars.get(key).ok_or_else(|| format!("no value for {{{key}}} in {template:?}"))?;
        rest = &rest[end + 1..];
    }
    Ok(out + rest)
}

async fn sh(exec: &dyn Exec, argv: Vec<String>) -> Result<String, String> {
    let cmd = Cmd::new(argv[0].clone()).args(argv[1..].iter().cloned()).timeout(STEP_TIMEOUT);
    exec.run(cmd).await.map(|o| o.stdout).map_err(|e| e.to_string())
}

/// Generous: a thick `dd` copy reads the whole snapshot.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{FakeExec, Reply};

    const ALL: [Phase; 6] = [Phase::Create, Phase::Stage, Phase::Publish, Phase::Snapshot, Phase::Restore, Phase::Expand];

    #[test]
    fn targets_parse() {
        struct Case {
            arg: &'static str,
            want: Result<Target, &'static str>,
        }
        let s = |v: &str| v.to_owned();
        let cases = [
            Case { arg: "file:/var/tmp/x", want: Ok(Target::File { dir: s("/var/tmp/x") }) },
            Case { arg: "lvm-thin:vg0/tp", want: Ok(Target::LvmThin { vg: s("vg0"), pool: s("tp") }) },
            Case { arg: "lvm-thick:vg0", want: Ok(Target::LvmThick { vg: s("vg0") }) },
            Case { arg: "zfs:tank/hand", want: Ok(Target::Zvol { parent: s("tank/hand") }) },
            Case { arg: "zfs-dataset:tank/hand", want: Ok(Target::Dataset { parent: s("tank/hand") }) },
            Case { arg: "nfs:/mnt/e=127.0.0.1:/srv/e", want: Ok(Target::Nfs { local: s("/mnt/e"), remote: s("127.0.0.1:/srv/e") }) },
            Case { arg: "lvm-thin:vg0", want: Err("VG/THINPOOL") },
            Case { arg: "lvm-thick:", want: Err("is empty") },
            Case { arg: "btrfs:/x", want: Err("unknown kind") },
            Case { arg: "file", want: Err("KIND:WHERE") },
            Case { arg: "nfs:/mnt/e", want: Err("LOCAL_DIR=SERVER") },
        ];
        for c in cases {
            match (Target::parse(c.arg), c.want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{}", c.arg),
                (Err(e), Err(want)) => assert!(e.contains(want), "{}: {e}", c.arg),
                (got, want) => panic!("{}: got {got:?}, want {want:?}", c.arg),
            }
        }
    }

    /// Every phase of every kind expands (no unknown placeholder) and runs to the end with
    /// the commands an operator types; then everything is undone, newest first.
    #[tokio::test]
    async fn each_kind_runs_its_commands_and_undoes_them() {
        struct Case {
            target: &'static str,
            want: &'static [&'static str],
        }
        let cases = [
            Case {
                target: "file:/p",
                want: &[
                    "fallocate -l 1048576 /p/v.img",
                    "losetup -f --show /p/v.img",
                    "mkfs.ext4 -q /dev/loop3",
                    "mount -t ext4 /dev/loop3 /w/staging",
                    "mount --bind /w/staging /w/target",
                    "cp --reflink=auto --sparse=always /p/v.img /p/v-snap.img",
                    "cp --reflink=auto --sparse=always /p/v-snap.img /p/v-restored.img",
                    "fallocate -l 2097152 /p/v.img",
                    "losetup -c /dev/loop3",
                    "resize2fs /dev/loop3",
                    "rm -f /p/v-restored.img",
                    "rm -f /p/v-snap.img",
                    "umount /w/target",
                    "umount /w/staging",
                    "losetup -d /dev/loop3",
                    "rm -f /p/v.img",
                ],
            },
            Case {
                target: "lvm-thin:vg/tp",
                want: &[
                    "lvcreate -y -n v -V 1048576b --thinpool vg/tp",
                    "mkfs.ext4 -q /dev/vg/v",
                    "mount -t ext4 /dev/vg/v /w/staging",
                    "mount --bind /w/staging /w/target",
                    "lvcreate -y -s -n v-snap vg/v",
                    "lvcreate -y -s -kn -ay -n v-restored vg/v-snap",
                    "lvextend -L 2097152b vg/v",
                    "resize2fs /dev/vg/v",
                    "lvremove -y vg/v-restored",
                    "lvremove -y vg/v-snap",
                    "umount /w/target",
                    "umount /w/staging",
                    "lvremove -y vg/v",
                ],
            },
            Case {
                target: "lvm-thick:vg",
                want: &[
                    "lvcreate -y -Wy -Zy -n v -L 1048576b vg",
                    "mkfs.ext4 -q /dev/vg/v",
                    "mount -t ext4 /dev/vg/v /w/staging",
                    "mount --bind /w/staging /w/target",
                    "lvcreate -y -s -n v-snap -L 1048576b vg/v",
                    "lvcreate -y -Wy -Zy -n v-restored -L 1048576b vg",
                    "dd if=/dev/vg/v-snap of=/dev/vg/v-restored bs=1M conv=sparse,fsync status=none",
                    "lvextend -L 2097152b vg/v",
                    "resize2fs /dev/vg/v",
                    "lvremove -y vg/v-restored",
                    "lvremove -y vg/v-snap",
                    "umount /w/target",
                    "umount /w/staging",
                    "lvremove -y vg/v",
                ],
            },
            Case {
                target: "zfs:tank/h",
                want: &[
                    "zfs create -V 1048576 tank/h/v",
                    "udevadm settle",
                    "mkfs.ext4 -q /dev/zvol/tank/h/v",
                    "mount -t ext4 /dev/zvol/tank/h/v /w/staging",
                    "mount --bind /w/staging /w/target",
                    "zfs snapshot tank/h/v@v-snap",
                    "zfs clone tank/h/v@v-snap tank/h/v-restored",
                    "zfs set volsize=2097152 tank/h/v",
                    "resize2fs /dev/zvol/tank/h/v",
                    "zfs destroy tank/h/v-restored",
                    "zfs destroy tank/h/v@v-snap",
                    "umount /w/target",
                    "umount /w/staging",
                    "zfs destroy tank/h/v",
                ],
            },
            Case {
                target: "zfs-dataset:tank/h",
                want: &[
                    "zfs create -o mountpoint=legacy -o refquota=1048576 tank/h/v",
                    "mount -t zfs tank/h/v /w/staging",
                    "mount --bind /w/staging /w/target",
                    "zfs snapshot tank/h/v@v-snap",
                    "zfs clone tank/h/v@v-snap tank/h/v-restored",
                    "zfs set refquota=2097152 tank/h/v",
                    "zfs destroy tank/h/v-restored",
                    "zfs destroy tank/h/v@v-snap",
                    "umount /w/target",
                    "umount /w/staging",
                    "zfs destroy tank/h/v",
                ],
            },
            Case {
                target: "nfs:/e=srv:/export",
                want: &[
                    "mkdir -m 0755 /e/v",
                    "mount -t nfs srv:/export/v /w/staging",
                    "mount --bind /w/staging /w/target",
                    "tar --xattrs --sparse --numeric-owner -cf /e/v-snap.tar -C /e/v .",
                    "mkdir /e/v-restored",
                    "tar --xattrs --sparse --numeric-owner -xf /e/v-snap.tar -C /e/v-restored",
                    "rm -rf --one-file-system /e/v-restored",
                    "rm -f /e/v-snap.tar",
                    "umount /w/target",
                    "umount /w/staging",
                    "rm -rf --one-file-system /e/v",
                ],
            },
        ];
        for c in cases {
            let target = Target::parse(c.target).unwrap();
            let exec = FakeExec::new();
            exec.on("losetup -f --show", vec![Reply::Ok("/dev/loop3\n".into())]);
            let mut hand = Hand::new(&target, "v", "/w", 1 << 20);
            hand.run(&exec, &ALL).await.unwrap();
            hand.undo(&exec).await.unwrap();
            assert_eq!(exec.lines(), c.want, "{}", c.target);
        }
    }

    #[tokio::test]
    async fn a_failed_step_undoes_only_what_was_done() {
        let target = Target::parse("lvm-thin:vg/tp").unwrap();
        let exec = FakeExec::new();
        exec.on("mount -t", vec![Reply::Fail(32, "boom".into())]);
        let mut hand = Hand::new(&target, "v", "/w", 1 << 20);
        let err = hand.run(&exec, &[Phase::Create, Phase::Stage, Phase::Publish]).await.unwrap_err();
        assert!(err.contains("boom"), "{err}");
        hand.undo(&exec).await.unwrap();
        let lines = exec.lines();
        assert_eq!(lines[lines.len() - 1], "lvremove -y vg/v", "{lines:?}");
        assert!(!lines.iter().any(|l| l.starts_with("umount")), "nothing was mounted: {lines:?}");
        // A second undo has nothing left to do.
        hand.undo(&exec).await.unwrap();
        assert_eq!(exec.lines().len(), lines.len());
    }

    #[tokio::test]
    async fn an_undo_that_fails_is_reported_and_the_rest_still_runs() {
        let target = Target::parse("file:/p").unwrap();
        let exec = FakeExec::new();
        exec.on("losetup -f --show", vec![Reply::Ok("/dev/loop3\n".into())]);
        exec.on("umount", vec![Reply::Fail(32, "target is busy".into())]);
        let mut hand = Hand::new(&target, "v", "/w", 1 << 20);
        hand.run(&exec, &[Phase::Create, Phase::Stage]).await.unwrap();
        let err = hand.undo(&exec).await.unwrap_err();
        assert!(err.contains("target is busy"), "{err}");
        assert!(exec.lines().ends_with(&["umount /w/staging".into(), "losetup -d /dev/loop3".into(), "rm -f /p/v.img".into()]));
    }

    #[tokio::test]
    async fn losetup_must_print_a_loop_device() {
        let exec = FakeExec::new();
        exec.on("losetup -f --show", vec![Reply::Ok("/dev/sda\n".into())]);
        let mut hand = Hand::new(&Target::parse("file:/p").unwrap(), "v", "/w", 1 << 20);
        assert!(hand.run(&exec, &[Phase::Create, Phase::Stage]).await.unwrap_err().contains("not a loop device"));
        assert!(!exec.lines().iter().any(|l| l.starts_with("mkfs")));
    }

    #[test]
    fn descriptions() {
        let file = Target::parse("file:/p").unwrap();
        assert_eq!(describe(&file, &[Phase::Create, Phase::Stage, Phase::Publish]), "fallocate, losetup, mkfs.ext4, mount, mount --bind");
        assert_eq!(describe_undo(&file, &[Phase::Create, Phase::Stage, Phase::Publish]), "umount, losetup, rm");
        let zfs = Target::parse("zfs:t/h").unwrap();
        assert_eq!(describe(&zfs, &[Phase::Snapshot]), "zfs snapshot");
        assert_eq!(describe(&Target::parse("lvm-thin:v/p").unwrap(), &[Phase::Restore]), "lvcreate -s");
        let nfs = Target::parse("nfs:/e=s:/e").unwrap();
        assert_eq!(describe(&nfs, &[Phase::Expand]), "nothing to do");
        assert!(!has_steps(&nfs, Phase::Expand) && has_steps(&nfs, Phase::Snapshot));
        assert!(expand("{nope}", &HashMap::new()).unwrap_err().contains("no value for {nope}"));
    }
}
