//! The pool configurations the deploy files ship are ones the driver accepts: every
//! kustomize fragment alone and all of them together (as the `mixed` overlay puts them
//! together), the controller's configs, and the configs inside the Nomad jobs, each parsed by
//! `holdfast::config::Config::parse` and checked for overlapping pools. The Helm chart's values
//! hold the same text (tests/deploy/check_chart.py proves it).

use std::path::{Path, PathBuf};

use holdfast::config::{Config, check_overlaps};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn accept(what: &str, src: &str) -> Config {
    let cfg = Config::parse(src).unwrap_or_else(|e| panic!("{what} is refused by the driver: {e}\n---\n{src}"));
    check_overlaps(&cfg).unwrap_or_else(|e| panic!("{what}: {e}"));
    cfg
}

/// The agents' pool fragments of the kustomize components, in the order the init container
/// concatenates them (file name order).
fn node_fragments() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(root().join("deploy/kubernetes/components")).unwrap() {
        let dir = dir.unwrap().path();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".toml") && name.as_bytes()[0].is_ascii_digit() {
                out.push((name, std::fs::read_to_string(&f).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn kubernetes_node_configs_are_accepted() {
    let base = read("deploy/kubernetes/base/config/00-base.toml");
    let fragments = node_fragments();
    assert!(fragments.len() >= 4, "the file, lvm-thin, lvm-thick and zfs components each add a fragment: {fragments:?}");
    let cfg = accept("00-base.toml", &base);
    assert!(cfg.allowed_path_prefixes.iter().any(|p| p == Path::new("/var/lib/kubelet")));
    assert!(cfg.pools.is_empty(), "the base names no pool: the components do");
    // The prefix runs the host's tools; mkfs and mount stay the image's.
    let prefix = cfg.exec_prefix.to_prefix();
    let lvs = prefix.apply(holdfast::exec::Cmd::new("lvs")).argv();
    assert_eq!(&lvs[..2], ["nsenter", "--target=1"]);
    assert_eq!(prefix.apply(holdfast::exec::Cmd::new("mkfs.xfs")).argv(), ["mkfs.xfs"]);
    for (name, text) in &fragments {
        let cfg = accept(name, &format!("{base}{text}"));
        assert_eq!(cfg.pools.len(), 1, "{name} adds one pool");
    }
    let all: String = std::iter::once(base.clone()).chain(fragments.iter().map(|(_, t)| t.clone())).collect();
    let cfg = accept("every fragment together", &all);
    let mut names: Vec<&str> = cfg.pools.iter().map(|p| p.name()).collect();
    names.sort();
    assert_eq!(names, ["file", "lvm-thick", "lvm-thin", "zfs"]);
}

#[test]
fn kubernetes_controller_configs_are_accepted() {
    let empty = accept("base/config/controller.toml", &read("deploy/kubernetes/base/config/controller.toml"));
    assert!(empty.pools.is_empty());
    let nfs = accept("components/nfs/config.toml", &read("deploy/kubernetes/components/nfs/config.toml"));
    assert_eq!(nfs.pools.iter().map(|p| p.kind().to_string()).collect::<Vec<_>>(), ["nfs"]);
}

/// The text of each `data = <<-EOT … EOT` heredoc of a template whose destination is a
/// config.toml, de-indented as HCL's `<<-` does.
fn nomad_configs(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = src.lines().peekable();
    let mut dest_is_config = false;
    while let Some(line) = lines.next() {
        if line.trim_start().starts_with("destination") {
            dest_is_config = line.contains("config.toml");
        }
        if dest_is_config && line.trim_end().ends_with("<<-EOT") {
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "EOT").collect();
            let indent = body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
            out.push(body.iter().map(|l| format!("{}\n", l.get(indent..).unwrap_or(""))).collect());
        }
    }
    out
}

#[test]
fn nomad_job_configs_are_accepted() {
    let mut seen = 0;
    for job in ["controller", "node", "monolith"] {
        let rel = format!("deploy/nomad/{job}.nomad.hcl");
        let configs = nomad_configs(&read(&rel));
        assert_eq!(configs.len(), 1, "{rel}: one config.toml template");
        let cfg = accept(&rel, &configs[0]);
        if job != "controller" {
            assert!(cfg.allowed_path_prefixes.iter().any(|p| p == Path::new("/local/csi")), "{rel}: Nomad's stage_publish_base_dir");
            assert!(!cfg.pools.is_empty(), "{rel}: a node needs a pool");
        }
        seen += 1;
    }
    assert_eq!(seen, 3);
}
