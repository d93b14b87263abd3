//! Unit tests of the nfs pool on a local directory standing in for the mounted export: the mount
//! itself is faked (a [`FakeMounter`] table says the directory is an NFS mount; `mount`/`umount` are
//! recorded, not run), every other command (`stat`, `tar`, `cp`, `rm`) runs for real unless a test
//! scripts it to fail or hang. The real NFS behaviour is proven in the VM (`tests/nfs.rs`).

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::*;
use crate::config::Config;
use crate::exec::{Output, RealExec};
use crate::node::mount::FakeMounter;

const MIB: u64 = 1 << 20;

/// What [`TestExec`] does with a command.
#[derive(Debug, Clone)]
enum Do {
    /// Run it for real.
    Real,
    /// Exit 0 with this stdout.
    Ok(&'static str),
    /// Exit with this code and stderr.
    Fail(i32, String),
    /// Never answer: time out after the command's own timeout.
    Hang,
    /// Run the hook first (a workload acting between the pool's checks and the command), then
    /// the command for real.
    Before(Hook),
}

/// Something a test does while the pool is between two steps.
#[derive(Clone)]
struct Hook(Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// Records every command; answers `mount`/`umount` with success and everything else for real,
/// unless scripted (by argv prefix, latest rule first; a rule's answers are used in order and
/// its last one repeats).
#[derive(Default)]
struct TestExec {
    calls: Mutex<Vec<Vec<String>>>,
    rules: Mutex<Vec<(Vec<String>, VecDeque<Do>)>>,
}

impl TestExec {
    fn new() -> Arc<TestExec> {
        let e = TestExec::default();
        e.on("mount", vec![Do::Ok("")]);
        e.on("umount", vec![Do::Ok("")]);
        Arc::new(e)
    }
    fn on(&self, prefix: &str, answers: Vec<Do>) {
        self.on_args(&prefix.split_whitespace().collect::<Vec<_>>(), answers);
    }
    fn on_args(&self, prefix: &[&str], answers: Vec<Do>) {
        self.rules.lock().unwrap().push((prefix.iter().map(|a| a.to_string()).collect(), answers.into()));
    }
    fn lines(&self) -> Vec<String> {
        self.calls.lock().unwrap().iter().map(|c| c.join(" ")).collect()
    }
    fn programs(&self) -> Vec<String> {
        self.calls.lock().unwrap().iter().map(|c| c[0].clone()).collect()
    }
    fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }
}

#[async_trait]
impl Exec for TestExec {
    async fn run(&self, cmd: Cmd) -> std::result::Result<Output, ExecError> {
        let argv = cmd.argv();
        self.calls.lock().unwrap().push(argv.clone());
        let answer = {
            let mut rules = self.rules.lock().unwrap();
            match rules.iter_mut().rev().find(|(p, _)| argv.len() >= p.len() && argv[..p.len()] == p[..]) {
                None => Do::Real,
                Some((_, a)) if a.len() > 1 => a.pop_front().unwrap(),
                Some((_, a)) => a.front().cloned().unwrap_or(Do::Real),
            }
        };
        match answer {
            Do::Real => RealExec.run(cmd).await,
            Do::Before(hook) => {
                (hook.0)();
                RealExec.run(cmd).await
            }
            Do::Ok(out) => Ok(Output { stdout: out.into(), stderr: String::new() }),
            Do::Fail(code, stderr) => Err(ExecError::Failed { cmd: cmd.display(), code, stdout: String::new(), stderr }),
            Do::Hang => {
                tokio::time::sleep(cmd.timeout).await;
                Err(ExecError::Timeout { cmd: cmd.display(), timeout: cmd.timeout })
            }
        }
    }
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nfs").join(name)).unwrap()
}

/// The captured mountinfo line of an NFSv4.2 mount of 127.0.0.1:/srv/export, moved to `at`.
fn nfs_line(at: &Path) -> String {
    let line = fixture("mountinfo.txt").lines().find(|l| l.contains(" /run/holdfast/nfs/v42 ")).unwrap().to_owned();
    line.replace(" /run/holdfast/nfs/v42 ", &format!(" {} ", at.display()))
}

/// One line of a mount table, parsed.
fn parse_line(line: &str) -> crate::node::mountinfo::MountInfo {
    crate::node::mountinfo::parse(line).unwrap().remove(0)
}

struct Rig {
    dir: tempfile::TempDir,
    exec: Arc<TestExec>,
    /// The mount table the pool sees.
    table: Arc<FakeMounter>,
    pool: NfsPool,
}

impl Rig {
    fn work(&self) -> PathBuf {
        self.dir.path().join("export")
    }
    fn meta_dir(&self) -> PathBuf {
        self.work().join(".holdfast/n1")
    }
    /// Everything under the export except holdfast's own directory, as relative paths.
    fn tree(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.work()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(self.work()).unwrap().to_string_lossy().into_owned();
                if rel == ".holdfast" {
                    continue;
                }
                if p.is_dir() && !p.is_symlink() {
                    stack.push(p.clone());
                }
                out.push(rel);
            }
        }
        out.sort();
        out
    }
    /// Another pool `n1` on the same export, with another config (a config change).
    fn with_config(&self, extra: &str) -> NfsPool {
        let src = format!("[[pool]]\nname = \"n1\"\nkind = \"nfs\"\nserver = \"127.0.0.1\"\nexport = \"/srv/export\"\n{extra}");
        let cfg = Config::parse(&src).unwrap().pools.remove(0);
        NfsPool::new(&cfg, self.exec.clone()).unwrap().with_work_dir(self.work()).with_mounter(self.table.clone())
    }
    fn req(&self, csi_name: &str, params: &[(&str, &str)]) -> CreateRequest {
        CreateRequest {
            csi_name: csi_name.into(),
            local: csi_name.into(), // clean names: the pool takes any valid local name
            capacity: 8 * MIB,
            block: false,
            fs_type: Some("nfs".into()),
            source: None,
            parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            limit: 0,
            uid: crate::volume_id::new_uid(),
            source_uid: None,
            mutable: Default::default(),
        }
    }
}

/// A pool named `n1` over a local directory that the (fake) mount table shows as the export.
fn rig(extra: &str) -> Rig {
    rig_mounted(extra, true)
}

fn rig_mounted(extra: &str, mounted: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("export");
    std::fs::create_dir(&work).unwrap();
    let table = Arc::new(FakeMounter::new());
    if mounted {
        table.add_line(parse_line(&nfs_line(&work)));
    }
    let src = format!(
        "[[pool]]\nname = \"n1\"\nkind = \"nfs\"\nserver = \"127.0.0.1\"\nexport = \"/srv/export\"\nmount_options = [\"nfsvers=4.2\"]\n{extra}"
    );
    let cfg = Config::parse(&src).unwrap().pools.remove(0);
    let exec = TestExec::new();
    let pool = NfsPool::new(&cfg, exec.clone())
        .unwrap()
        .with_work_dir(&work)
        .with_mounter(table.clone())
        .with_probe_timeout(Duration::from_millis(300));
    Rig { dir, exec, table, pool }
}

const NESTED: &str = "subdir = \"${pvc.metadata.namespace}/${pvc.metadata.name}\"\n";

fn pvc(ns: &'static str, name: &'static str) -> [(&'static str, &'static str); 2] {
    [(template::PARAM_PVC_NAMESPACE, ns), (template::PARAM_PVC_NAME, name)]
}

#[test]
fn config_mistakes_are_caught_at_start() {
    struct Case {
        extra: &'static str,
        server: &'static str,
        export: &'static str,
        want: &'static str,
    }
    let case = |extra, server, export, want| Case { extra, server, export, want };
    let cases = [
        case("", "nfs.example", "/srv/k8s", ""),
        case("", "[fd00::1]", "/", ""),
        case("", "nfs/x", "/srv", "is not a host name"),
        case("", "a b", "/srv", "is not a host name"),
        case("", "nfs", "srv", "must be an absolute path"),
        case("", "nfs", "/srv/../etc", "must be an absolute path"),
        case("subdir = \"../${csi.name}\"\n", "nfs", "/srv", "\"..\""),
        case("subdir = \"${pvc.name}\"\n", "nfs", "/srv", "unknown variable"),
        case("on_delete = \"shred\"\n", "nfs", "/srv", "on_delete \"shred\""),
        case("mount_options = [\"vers=4.2,soft\"]\n", "nfs", "/srv", "one non-empty option"),
    ];
    for c in cases {
        let src = format!("[[pool]]\nname = \"n1\"\nkind = \"nfs\"\nserver = \"{}\"\nexport = \"{}\"\n{}", c.server, c.export, c.extra);
        let cfg = Config::parse(&src).unwrap().pools.remove(0);
        match (NfsPool::new(&cfg, TestExec::new()), c.want) {
            (Ok(_), "") => {}
            (Err(e), want) if !want.is_empty() => assert!(e.to_string().contains(want), "{src}: {e}"),
            (r, want) => panic!("{src}: got {:?}, want {want:?}", r.map(|_| ())),
        }
    }
}

#[test]
fn parameters_and_topology() {
    let r = rig("pool_topology = { \"topology.kubernetes.io/zone\" = \"z1\" }\n");
    for key in ["mode", "uid", "gid", "csi.storage.k8s.io/pvc/name", "csi.storage.k8s.io/pvc/namespace", "csi.storage.k8s.io/pv/name"] {
        assert!(r.pool.accepts_parameter(key), "{key}");
    }
    assert!(!r.pool.accepts_parameter("fsType") && !r.pool.accepts_parameter("modes"));
    assert!(r.pool.multi_node());
    assert_eq!(r.pool.topology(), Some(Segments::from([("topology.kubernetes.io/zone".to_owned(), "z1".to_owned())])));
    assert_eq!(rig("").pool.topology(), Some(Segments::new()), "no pool_topology: reachable everywhere");

    struct Case {
        params: &'static [(&'static str, &'static str)],
        want: Option<DirAttributes>,
    }
    let attrs = |mode, uid, gid| Some(DirAttributes { mode, uid, gid });
    let cases = [
        Case { params: &[], want: attrs(None, None, None) },
        Case { params: &[("mode", "0777")], want: attrs(Some(0o777), None, None) },
        Case { params: &[("mode", "2770"), ("uid", "1000"), ("gid", "2000")], want: attrs(Some(0o2770), Some(1000), Some(2000)) },
        Case { params: &[("mode", "755")], want: attrs(Some(0o755), None, None) },
        Case { params: &[("mode", "0o750")], want: attrs(Some(0o750), None, None) },
        Case { params: &[("mode", "0999")], want: None },
        Case { params: &[("mode", "17777")], want: None },
        Case { params: &[("mode", "7")], want: None },
        Case { params: &[("mode", "rwx")], want: None },
        Case { params: &[("uid", "-1")], want: None },
        Case { params: &[("gid", "root")], want: None },
    ];
    for c in cases {
        let params: BTreeMap<String, String> = c.params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match (DirAttributes::from_parameters(&params), c.want) {
            (Ok(got), Some(want)) => assert_eq!(got, want, "{:?}", c.params),
            (Err(e), None) => assert!(matches!(e, Error::InvalidArgument(_)), "{:?}: {e:?}", c.params),
            (got, want) => panic!("{:?}: got {got:?}, want {want:?}", c.params),
        }
    }
}

#[tokio::test]
async fn mounts_the_export_once_and_probes_it() {
    let r = rig_mounted("", false);
    let free = r.pool.capacity().await.unwrap();
    assert!(free > 0);
    let work = r.work().display().to_string();
    assert_eq!(
        r.exec.lines(),
        [format!("mount -t nfs -o nfsvers=4.2 -- 127.0.0.1:/srv/export {work}"), format!("stat --file-system --format=%a %S -- {work}"),]
    );
    // A fresh answer is reused: a burst of calls probes once.
    r.pool.capacity().await.unwrap();
    assert_eq!(r.exec.lines().len(), 2);

    // Already mounted: only the probe.
    let r = rig("");
    r.pool.capacity().await.unwrap();
    assert_eq!(r.exec.programs(), ["stat"]);
}

#[tokio::test]
async fn a_foreign_mount_on_the_working_directory_is_refused() {
    let r = rig_mounted("", false);
    let line =
        fixture("mountinfo.txt").lines().find(|l| l.contains(" /tmp ")).unwrap().replace(" /tmp ", &format!(" {} ", r.work().display()));
    r.table.add_line(parse_line(&line));
    let err = r.pool.capacity().await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("tmpfs"), "{err}");
    assert!(r.exec.lines().is_empty(), "nothing is mounted over it: {:?}", r.exec.lines());
}

#[tokio::test]
async fn a_stale_mount_is_mounted_again() {
    let r = rig("");
    r.exec.on("stat --file-system", vec![Do::Fail(1, fixture("stat-stale.stderr")), Do::Real]);
    r.pool.capacity().await.unwrap();
    let work = r.work().display().to_string();
    assert_eq!(
        r.exec.lines(),
        [
            format!("stat --file-system --format=%a %S -- {work}"),
            format!("umount --lazy --no-canonicalize -- {work}"),
            format!("mount -t nfs -o nfsvers=4.2 -- 127.0.0.1:/srv/export {work}"),
            format!("stat --file-system --format=%a %S -- {work}"),
        ]
    );
    // Still stale after a fresh mount: unavailable, and no remount loop.
    let r = rig("");
    r.exec.on("stat --file-system", vec![Do::Fail(1, fixture("stat-stale.stderr"))]);
    let err = r.pool.capacity().await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)) && err.to_string().contains("Stale file handle"), "{err}");
    assert_eq!(r.exec.programs(), ["stat", "umount", "mount", "stat"]);
}

#[tokio::test]
async fn a_silent_server_is_reported_quickly_and_known_volumes_stay_visible() {
    let r = rig("");
    let v = r.pool.create_volume(&r.req("pvc-silent", &[])).await.unwrap();
    assert_eq!(r.pool.condition(&v.local).await.unwrap(), Condition::Healthy);
    r.exec.on("stat", vec![Do::Hang]);
    tokio::time::sleep(PROBE_TTL).await;
    let started = Instant::now();
    let err = r.pool.capacity().await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)) && err.to_string().contains("did not answer"), "{err}");
    // NodeGetVolumeStats needs the volume (from memory) and its condition (abnormal), fast.
    assert_eq!(r.pool.get_volume(&v.local).await.unwrap().map(|g| g.local), Some(v.local.clone()));
    match r.pool.condition(&v.local).await.unwrap() {
        Condition::Abnormal(m) => assert!(m.contains("did not answer"), "{m}"),
        Condition::Healthy => panic!("a silent server is healthy"),
    }
    // Staging is refused: the volume's directory cannot be checked (no symlink in its place)
    // while the server does not answer. (It used to be answered from memory.)
    assert!(matches!(r.pool.attach(&v.local).await, Err(Error::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    // A volume never seen cannot be vouched for.
    assert!(matches!(r.pool.get_volume("pvc-other").await, Err(Error::Unavailable(_))));
}

#[tokio::test]
async fn create_makes_the_templated_directory_with_metadata_beside_it() {
    let r = rig(NESTED);
    let req = r.req("pvc-123", &pvc("team-a", "db"));
    let v = r.pool.create_volume(&req).await.unwrap();
    assert_eq!((v.local.as_str(), v.capacity, v.block, v.fs_type.as_deref()), ("pvc-123", 8 * MIB, false, Some("nfs")));
    assert_eq!(r.tree(), ["team-a", "team-a/db"]);
    let dir = std::fs::metadata(r.work().join("team-a/db")).unwrap();
    assert_eq!(dir.permissions().mode() & 0o7777, DEFAULT_MODE);
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(r.meta_dir().join("volumes/pvc-123.json")).unwrap()).unwrap();
    assert_eq!(meta["subdir"], "team-a/db");
    assert_eq!(meta["csi_name"], "pvc-123");
    assert_eq!(meta["capacity"], 8 * MIB);
    // Idempotent; the same name with another size is ALREADY_EXISTS.
    assert_eq!(r.pool.create_volume(&req).await.unwrap(), v);
    let bigger = CreateRequest { capacity: 16 * MIB, ..req.clone() };
    assert!(matches!(r.pool.create_volume(&bigger).await, Err(Error::AlreadyExists(_))));
    assert_eq!(r.pool.list_volumes().await.unwrap(), std::slice::from_ref(&v));
    assert_eq!(
        r.pool.attach("pvc-123").await.unwrap(),
        Attachment::Mount { source: "127.0.0.1:/srv/export/team-a/db".into(), fs_type: "nfs".into(), options: vec!["nfsvers=4.2".into()] }
    );
    r.pool.detach("pvc-123").await.unwrap();
    // Nothing is left in the pool's temporary directory.
    assert_eq!(std::fs::read_dir(r.meta_dir().join("tmp")).unwrap().count(), 0);

    // Attributes from the parameters.
    let req = r.req("pvc-shared", &[("mode", "2770"), ("uid", "1234"), ("gid", "5678")]);
    r.pool.create_volume(&req).await.unwrap_err(); // the nested template needs the PVC keys
    let mut params = req.parameters.clone();
    params.extend(pvc("team-a", "shared").iter().map(|(k, v)| (k.to_string(), v.to_string())));
    r.pool.create_volume(&CreateRequest { parameters: params, ..req }).await.unwrap();
    let m = std::fs::metadata(r.work().join("team-a/shared")).unwrap();
    assert_eq!((m.permissions().mode() & 0o7777, m.uid(), m.gid()), (0o2770, 1234, 5678));
}

#[tokio::test]
async fn block_volumes_and_bad_parameters_are_refused() {
    let r = rig("");
    let block = CreateRequest { block: true, fs_type: None, ..r.req("pvc-block", &[]) };
    let err = r.pool.create_volume(&block).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("filesystem volumes only"), "{err}");
    let ext4 = CreateRequest { fs_type: Some("ext4".into()), ..r.req("pvc-ext4", &[]) };
    assert!(matches!(r.pool.create_volume(&ext4).await, Err(Error::InvalidArgument(_))));
    assert_eq!(r.pool.filesystems(), ["nfs"]);
    let err = r.pool.create_volume(&r.req("pvc-mode", &[("mode", "999")])).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(r.tree().is_empty());
}

#[tokio::test]
async fn hostile_names_never_leave_the_export() {
    struct Case {
        name: &'static str,
        template: &'static str,
        csi_name: &'static str,
        params: &'static [(&'static str, &'static str)],
    }
    let cases = [
        Case { name: "dotdot csi name", template: "", csi_name: "..", params: &[] },
        Case { name: "path csi name", template: "", csi_name: "../../etc", params: &[] },
        Case { name: "absolute csi name", template: "", csi_name: "/etc", params: &[] },
        Case { name: "NUL", template: "", csi_name: "a\0b", params: &[] },
        Case { name: "newline", template: "", csi_name: "a\nb", params: &[] },
        Case { name: "dot name", template: "", csi_name: ".holdfast", params: &[] },
        Case {
            name: "pvc name path",
            template: NESTED,
            csi_name: "pvc-1",
            params: &[("csi.storage.k8s.io/pvc/namespace", "a"), ("csi.storage.k8s.io/pvc/name", "../../etc")],
        },
        Case {
            name: "pvc namespace dotdot",
            template: NESTED,
            csi_name: "pvc-2",
            params: &[("csi.storage.k8s.io/pvc/namespace", ".."), ("csi.storage.k8s.io/pvc/name", "etc")],
        },
        Case {
            name: "pv name",
            template: "subdir = \"${pv.metadata.name}\"\n",
            csi_name: "pvc-3",
            params: &[("csi.storage.k8s.io/pv/name", "..")],
        },
    ];
    for c in cases {
        let r = rig(c.template);
        let err = r.pool.create_volume(&r.req(c.csi_name, c.params)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{}: {err:?}", c.name);
        assert!(r.tree().is_empty(), "{}: {:?}", c.name, r.tree());
        // The rig's directory holds the export only (the mount table is a fake now, not a file).
        let beside: Vec<_> = std::fs::read_dir(r.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(beside, ["export"], "{}: something appeared beside the export", c.name);
    }
    // A symlink planted on the export (by a workload of a shared export, or anyone) is not followed.
    let r = rig(NESTED);
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), r.work().join("evil")).unwrap();
    let err = r.pool.create_volume(&r.req("pvc-evil", &pvc("evil", "x"))).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("not a plain directory"), "{err}");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "something was made through the symlink");
    assert_eq!(std::fs::read_dir(r.meta_dir().join("tmp")).unwrap().count(), 0, "the half-made volume was cleaned up");
    // Ids that are not local names never become paths.
    for bad in ["../x", "a/b", "", "UPPER"] {
        assert!(matches!(r.pool.get_volume(bad).await, Err(Error::InvalidArgument(_))), "{bad:?}");
        assert!(matches!(r.pool.delete_volume(bad).await, Err(Error::InvalidArgument(_))), "{bad:?}");
    }
}

#[tokio::test]
async fn directories_that_belong_to_no_volume_or_to_another_are_not_taken_over() {
    let r = rig(NESTED);
    std::fs::create_dir_all(r.work().join("team-a/db")).unwrap();
    std::fs::write(r.work().join("team-a/db/precious"), b"x").unwrap();
    let err = r.pool.create_volume(&r.req("pvc-1", &pvc("team-a", "db"))).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("belongs to no volume"), "{err}");
    assert_eq!(std::fs::read(r.work().join("team-a/db/precious")).unwrap(), b"x");
    // Two claims that map to the same directory: the second is refused.
    r.pool.create_volume(&r.req("pvc-2", &pvc("team-b", "db"))).await.unwrap();
    let err = r.pool.create_volume(&r.req("pvc-3", &pvc("team-b", "db"))).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)) && err.to_string().contains("pvc-2"), "{err}");

    // The template changed to a deeper one: a new volume inside an existing volume's data is
    // refused; the old volume's deletion frees the place.
    let deeper = r.with_config("subdir = \"${pvc.metadata.namespace}/${pvc.metadata.name}/data\"\n");
    let err = deeper.create_volume(&r.req("pvc-4", &pvc("team-b", "db"))).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)) && err.to_string().contains("pvc-2"), "{err}");
    assert!(!r.work().join("team-b/db/data").exists());
    r.pool.delete_volume("pvc-2").await.unwrap();
    deeper.create_volume(&r.req("pvc-4", &pvc("team-b", "db"))).await.unwrap();
    assert!(r.work().join("team-b/db/data").is_dir());
}

#[tokio::test]
async fn on_delete_does_what_it_promises() {
    struct Case {
        on_delete: &'static str,
        want_tree: fn(&str) -> bool,
    }
    let cases = [
        Case { on_delete: "delete", want_tree: |t| t.is_empty() },
        Case { on_delete: "retain", want_tree: |t| t == "team-a,team-a/db,team-a/db/data" },
        Case {
            on_delete: "archive",
            want_tree: |t| {
                let parts: Vec<&str> = t.split(',').collect();
                parts.len() == 3 && parts[0] == "team-a" && parts[1].starts_with("team-a/archived-db-20") && parts[2].ends_with("Z/data")
            },
        },
    ];
    for c in cases {
        let r = rig(&format!("{NESTED}on_delete = \"{}\"\n", c.on_delete));
        let v = r.pool.create_volume(&r.req("pvc-del", &pvc("team-a", "db"))).await.unwrap();
        std::fs::write(r.work().join("team-a/db/data"), b"payload").unwrap();
        r.pool.delete_volume(&v.local).await.unwrap();
        let tree = r.tree().join(",");
        assert!((c.want_tree)(&tree), "on_delete={}: {tree}", c.on_delete);
        assert_eq!(r.pool.get_volume(&v.local).await.unwrap(), None, "{}", c.on_delete);
        r.pool.delete_volume(&v.local).await.unwrap();
        assert_eq!(std::fs::read_dir(r.meta_dir().join("trash")).unwrap().count(), 0, "{}: trash left", c.on_delete);
    }
}

#[tokio::test]
async fn a_crash_between_rename_and_commit_is_finished_or_discarded_by_the_retry() {
    let r = rig(NESTED);
    let req = r.req("pvc-crash", &pvc("team-a", "db"));
    r.pool.ready().await.unwrap();
    // What an attempt leaves when it dies after moving its directory into place.
    let meta = VolumeMeta {
        info: VolumeInfo {
            local: req.local.clone(),
            csi_name: req.csi_name.clone(),
            capacity: req.capacity,
            block: false,
            fs_type: Some("nfs".into()),
            source: None,
            created: 1,
            uid: Some("0123456789ab".into()),
            source_uid: None,
            parameters: Some(req.parameters.clone()),
            mutable: Default::default(),
        },
        subdir: "team-a/db".into(),
        schema: Default::default(),
    };
    store::write_json(&r.meta_dir().join("tmp/pvc-crash.json"), &meta).unwrap();
    std::fs::create_dir_all(r.work().join("team-a/db")).unwrap();
    std::fs::write(r.work().join("team-a/db/marker"), b"first attempt").unwrap();
    let v = r.pool.create_volume(&req).await.unwrap();
    assert_eq!(v.created, 1, "the first attempt's volume was committed");
    assert!(r.work().join("team-a/db/marker").exists());
    assert!(!r.meta_dir().join("tmp/pvc-crash.json").exists());

    // The same leftover from an attempt with another request is discarded and rebuilt.
    let r = rig(NESTED);
    r.pool.ready().await.unwrap();
    let old = VolumeMeta { info: VolumeInfo { capacity: 99 * MIB, ..meta.info.clone() }, ..meta.clone() };
    store::write_json(&r.meta_dir().join("tmp/pvc-crash.json"), &old).unwrap();
    std::fs::create_dir_all(r.work().join("team-a/db")).unwrap();
    std::fs::write(r.work().join("team-a/db/marker"), b"first attempt").unwrap();
    let v = r.pool.create_volume(&req).await.unwrap();
    assert_eq!(v.capacity, 8 * MIB);
    assert!(!r.work().join("team-a/db/marker").exists(), "the uncommitted directory was replaced");
}

#[tokio::test]
async fn expansion_is_recorded_and_never_shrinks() {
    let r = rig("");
    let v = r.pool.create_volume(&r.req("pvc-grow", &[])).await.unwrap();
    assert_eq!(r.pool.expand_volume(&v.local, 4 * MIB).await.unwrap(), 8 * MIB);
    assert_eq!(r.pool.expand_volume(&v.local, 32 * MIB).await.unwrap(), 32 * MIB);
    assert_eq!(r.pool.get_volume(&v.local).await.unwrap().unwrap().capacity, 32 * MIB);
    assert!(matches!(r.pool.expand_volume("pvc-none", 32 * MIB).await, Err(Error::NotFound(_))));
}

#[tokio::test]
async fn condition_reports_a_vanished_directory() {
    let r = rig("");
    let v = r.pool.create_volume(&r.req("pvc-cond", &[])).await.unwrap();
    assert_eq!(r.pool.condition(&v.local).await.unwrap(), Condition::Healthy);
    std::fs::remove_dir(r.work().join("pvc-cond")).unwrap();
    match r.pool.condition(&v.local).await.unwrap() {
        Condition::Abnormal(m) => assert!(m.contains("is gone"), "{m}"),
        Condition::Healthy => panic!("healthy without its directory"),
    }
    assert!(matches!(r.pool.condition("pvc-none").await, Err(Error::NotFound(_))));
    // Unexported: the directory's attributes may still be cached, but the server refuses it.
    let v2 = r.pool.create_volume(&r.req("pvc-unexported", &[])).await.unwrap();
    let dir = r.work().join("pvc-unexported").display().to_string();
    let refused = "stat: cannot read file system information for 'x': Permission denied".to_owned();
    r.exec.on_args(&["stat", "--file-system", "--format=%a %S", "--", &dir], vec![Do::Fail(1, refused)]);
    match r.pool.condition(&v2.local).await.unwrap() {
        Condition::Abnormal(m) => assert!(m.contains("Permission denied"), "{m}"),
        Condition::Healthy => panic!("healthy although the server refuses the directory"),
    }
    // Deleting a volume whose directory vanished still works.
    r.pool.delete_volume(&v.local).await.unwrap();
}

fn xattr(path: &Path) -> Option<Vec<u8>> {
    let mut buf = [0u8; 64];
    rustix::fs::getxattr(path, "user.holdfast-test", &mut buf[..]).ok().map(|n| buf[..n].to_vec())
}

#[tokio::test]
async fn snapshots_and_clones_keep_owners_modes_xattrs_and_holes() {
    let r = rig("");
    let src = r.pool.create_volume(&r.req("pvc-src", &[("mode", "2770"), ("uid", "1000")])).await.unwrap();
    let dir = r.work().join("pvc-src");
    std::fs::write(dir.join("f"), b"hello").unwrap();
    std::os::unix::fs::chown(dir.join("f"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(dir.join("f"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let has_xattrs = rustix::fs::setxattr(dir.join("f"), "user.holdfast-test", b"v1", rustix::fs::XattrFlags::empty()).is_ok();
    std::fs::File::create(dir.join("sparse")).unwrap().set_len(64 * MIB).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::os::unix::fs::symlink("f", dir.join("sub/link")).unwrap();

    let snap = r.pool.create_snapshot(&src.local, "snap-1", "snap-1", &crate::volume_id::new_uid()).await.unwrap();
    assert!(snap.ready && snap.size == src.capacity && snap.source_volume == src.local);
    assert_eq!(r.pool.create_snapshot(&src.local, "snap-1", "snap-1", &crate::volume_id::new_uid()).await.unwrap(), snap);
    assert!(matches!(
        r.pool.create_snapshot("pvc-other", "snap-1", "snap-1", &crate::volume_id::new_uid()).await,
        Err(Error::AlreadyExists(_))
    ));
    assert!(r.meta_dir().join("snapshots/snap-1.tar").is_file());
    assert_eq!(r.pool.list_snapshots().await.unwrap(), std::slice::from_ref(&snap));
    std::fs::write(dir.join("after"), b"later").unwrap();

    let restore = CreateRequest { source: Some(Source::Snapshot("snap-1".into())), ..r.req("pvc-restore", &[]) };
    let small = CreateRequest { capacity: MIB, ..restore.clone() };
    assert!(matches!(r.pool.create_volume(&small).await, Err(Error::OutOfRange(_))));
    r.pool.create_volume(&restore).await.unwrap();
    let clone = CreateRequest { source: Some(Source::Volume(src.local.clone())), ..r.req("pvc-clone", &[]) };
    r.pool.create_volume(&clone).await.unwrap();

    for (name, has_after) in [("pvc-restore", false), ("pvc-clone", true)] {
        let d = r.work().join(name);
        let root = std::fs::metadata(&d).unwrap();
        assert_eq!((root.permissions().mode() & 0o7777, root.uid()), (0o2770, 1000), "{name}: root dir attributes");
        let f = std::fs::metadata(d.join("f")).unwrap();
        assert_eq!((f.uid(), f.gid(), f.permissions().mode() & 0o7777), (1234, 5678, 0o640), "{name}: file attributes");
        assert_eq!(std::fs::read(d.join("f")).unwrap(), b"hello");
        let sparse = std::fs::metadata(d.join("sparse")).unwrap();
        assert_eq!(sparse.len(), 64 * MIB, "{name}");
        assert!(sparse.blocks() * 512 < MIB, "{name}: the hole was filled ({} bytes allocated)", sparse.blocks() * 512);
        assert_eq!(std::fs::read_link(d.join("sub/link")).unwrap(), Path::new("f"), "{name}: symlink");
        assert_eq!(d.join("after").exists(), has_after, "{name}");
        if has_xattrs {
            assert_eq!(xattr(&d.join("f")).as_deref(), Some(&b"v1"[..]), "{name}: xattr");
        }
    }
    r.pool.delete_snapshot("snap-1").await.unwrap();
    r.pool.delete_snapshot("snap-1").await.unwrap();
    assert_eq!(r.pool.get_snapshot("snap-1").await.unwrap(), None);
    assert!(!r.meta_dir().join("snapshots/snap-1.tar").exists());
    // The restore does not depend on the snapshot.
    assert_eq!(std::fs::read(r.work().join("pvc-restore/f")).unwrap(), b"hello");
    let missing = CreateRequest { source: Some(Source::Snapshot("snap-1".into())), ..r.req("pvc-restore-2", &[]) };
    assert!(matches!(r.pool.create_volume(&missing).await, Err(Error::NotFound(_))));
}

#[tokio::test]
async fn a_failed_copy_leaves_nothing_behind() {
    let r = rig("");
    let src = r.pool.create_volume(&r.req("pvc-src", &[])).await.unwrap();
    r.exec.on("cp", vec![Do::Fail(1, "cp: error writing: No space left on device".into())]);
    let clone = CreateRequest { source: Some(Source::Volume(src.local.clone())), ..r.req("pvc-clone", &[]) };
    let err = r.pool.create_volume(&clone).await.unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    assert_eq!(r.tree(), ["pvc-src"]);
    assert_eq!(r.pool.get_volume("pvc-clone").await.unwrap(), None);
    r.exec.clear();
    r.exec.on("cp", vec![Do::Real]);
    r.pool.create_volume(&clone).await.unwrap();
    assert!(r.exec.lines().iter().any(|l| l.starts_with("cp --archive --sparse=always --no-target-directory -- ")), "{:?}", r.exec.lines());
}

#[tokio::test]
async fn a_volume_directory_replaced_by_a_symlink_is_never_followed() {
    let r = rig("");
    let victim = r.dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("secret"), b"not the volume's").unwrap();
    let v = r.pool.create_volume(&r.req("pvc-sym", &[])).await.unwrap();
    let dir = r.work().join("pvc-sym");
    std::fs::write(dir.join("mine"), b"the volume's").unwrap();
    let moved = r.work().join("moved-away");
    let (d, m, vi) = (dir.clone(), moved.clone(), victim.clone());
    let swap = Hook(Arc::new(move || {
        std::fs::rename(&d, &m).unwrap();
        std::os::unix::fs::symlink(&vi, &d).unwrap();
    }));
    let (d, m) = (dir.clone(), moved.clone());
    let unswap = move || {
        std::fs::remove_file(&d).unwrap();
        std::fs::rename(&m, &d).unwrap();
    };
    let holds = |p: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };

    // Swapped between the pool's check and the archive / copy: they still read the volume.
    r.exec.on("tar --create", vec![Do::Before(swap.clone())]);
    let snap = r.pool.create_snapshot(&v.local, "snap-race", "snap-race", &crate::volume_id::new_uid()).await.unwrap();
    unswap();
    let restore = CreateRequest { source: Some(Source::Snapshot(snap.local.clone())), ..r.req("pvc-restored", &[]) };
    r.pool.create_volume(&restore).await.unwrap();
    assert_eq!(holds(&r.work().join("pvc-restored")), ["mine"], "the archive went through the link");
    r.exec.on("cp", vec![Do::Before(swap.clone())]);
    let clone = CreateRequest { source: Some(Source::Volume(v.local.clone())), ..r.req("pvc-cloned", &[]) };
    r.pool.create_volume(&clone).await.unwrap();
    unswap();
    assert_eq!(holds(&r.work().join("pvc-cloned")), ["mine"], "the copy went through the link");
    r.exec.on("cp", vec![Do::Real]);

    // Replaced for good: nothing goes through the link, and the node is refused the volume.
    std::fs::rename(&dir, &moved).unwrap();
    std::os::unix::fs::symlink(&victim, &dir).unwrap();
    let refused = |what: &str, e: Error| assert!(matches!(e, Error::FailedPrecondition(_)), "{what}: {e}");
    refused("snapshot", r.pool.create_snapshot(&v.local, "snap-link", "snap-link", &crate::volume_id::new_uid()).await.unwrap_err());
    let clone = CreateRequest { source: Some(Source::Volume(v.local.clone())), ..r.req("pvc-cloned-2", &[]) };
    refused("clone", r.pool.create_volume(&clone).await.unwrap_err());
    refused("attach", r.pool.attach(&v.local).await.unwrap_err());
    assert!(matches!(r.pool.condition(&v.local).await.unwrap(), Condition::Abnormal(_)));
    refused("delete", r.pool.delete_volume(&v.local).await.unwrap_err());
    let archive = r.with_config("on_delete = \"archive\"\n");
    refused("archive", archive.delete_volume(&v.local).await.unwrap_err());
    assert_eq!(holds(&victim), ["secret"], "the victim directory was touched");
    assert!(dir.is_symlink(), "the link was moved or removed");
    assert!(r.pool.get_volume(&v.local).await.unwrap().is_some(), "a refused delete forgot the volume");
    unswap();
    r.pool.delete_volume(&v.local).await.unwrap();
    assert!(!dir.exists() && holds(&victim) == ["secret"]);
}

// issue 12: modify
#[tokio::test]
async fn modify_changes_the_volume_directory_and_records_it() {
    let r = rig("");
    let mut req = r.req("pvc-mod", &[("mode", "0750")]);
    req.mutable.insert("uid".into(), "1000".into());
    let v = r.pool.create_volume(&req).await.unwrap();
    let dir = r.work().join("pvc-mod");
    let stat = || {
        let m = std::fs::metadata(&dir).unwrap();
        (m.permissions().mode() & 0o7777, m.uid(), m.gid())
    };
    assert_eq!(stat().0, 0o750);
    assert_eq!(stat().1, 1000, "the mutable uid applied at creation");
    r.pool.modify_volume(&v.local, "mode", "2770").await.unwrap();
    r.pool.modify_volume(&v.local, "gid", "5678").await.unwrap();
    assert_eq!(stat(), (0o2770, 1000, 5678), "a new owner keeps the set-gid mode");
    let got = r.pool.get_volume(&v.local).await.unwrap().unwrap();
    assert_eq!(got.mutable, [("gid", "5678"), ("mode", "2770"), ("uid", "1000")].map(|(k, v)| (k.to_owned(), v.to_owned())).into());
    for (k, value) in [("mode", "999"), ("uid", "x"), ("provisioning", "thin")] {
        let err = r.pool.check_mutable(false, None, k, value).unwrap_err();
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains(k)), "{k}: {err}");
    }
    // A directory replaced by a symlink is not followed.
    std::fs::rename(&dir, r.work().join("moved")).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::set_permissions(elsewhere.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), &dir).unwrap();
    assert!(matches!(r.pool.modify_volume(&v.local, "mode", "0777").await, Err(Error::FailedPrecondition(_))));
    assert_eq!(std::fs::metadata(elsewhere.path()).unwrap().permissions().mode() & 0o7777, 0o700, "the symlink was followed");
}
