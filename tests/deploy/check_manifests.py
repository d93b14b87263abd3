"""Offline checks of every deploy file (no cluster, no Nomad, no helm):

1. every kustomize overlay (and the example) renders with `kubectl kustomize`, and so does the
   Helm chart for the cases of check_chart.py;
2. every rendered object validates strictly (kubernetes-validate --strict semantics) against
   Kubernetes 1.30 and the newest bundled schema; kinds that exist only in newer releases
   (VolumeAttributesClass v1, 1.34) against the newest only; CRD kinds against the schemas in
   tests/fixtures/crd-schemas; an object of a kind with no schema fails;
3. what must agree agrees: driver name and plugin id, socket paths, kubelet paths, node id
   source, topology keys (with src/), the controller's address, port and certificate names
   (the names each end checks in the other's certificate: the Certificates of the cert-manager
   component, or the `holdfast certs` commands of docs/operations.md),
   the pools StorageClasses name, image names and tags (with Cargo.toml), and every flag the
   files give `holdfast` is one `holdfast <subcommand> --help` lists (the real binary);
4. the Nomad job files parse as HCL2 (python-hcl2) and the volume specs as HCL1 (pyhcl), with
   the fields `nomad` needs.
Prints one line per check; exits non-zero on the first failing group after reporting it all."""

import glob
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib

import hcl
import hcl2
import jsonschema
import kubernetes_validate
import yaml

sys.path.insert(0, os.path.dirname(__file__))
import check_chart  # noqa: E402
import gotemplate  # noqa: E402

ROOT = check_chart.ROOT
K8S = os.path.join(ROOT, "deploy", "kubernetes")
OLDEST = "1.30.0"
NEWEST = kubernetes_validate.latest_version()
NEWER_ONLY = {("storage.k8s.io/v1", "VolumeAttributesClass"): "1.34"}
CRD_DIR = os.path.join(ROOT, "tests", "fixtures", "crd-schemas")
KUBELET = "/var/lib/kubelet"

problems = []


def fail(msg):
    problems.append(msg)
    print("FAIL " + msg)


def rust_const(path, name):
    m = re.search(rf'pub const {name}: &str = "([^"]+)"', open(os.path.join(ROOT, path)).read())
    if not m:
        raise SystemExit(f"check_manifests: no {name} in {path}")
    return m.group(1)


DRIVER = rust_const("src/driver.rs", "DRIVER_NAME")
NODE_KEY = rust_const("src/placement.rs", "NODE_KEY")
VERSION = re.search(r'^version = "([^"]+)"', open(os.path.join(ROOT, "Cargo.toml")).read(), re.M).group(1)
SOCKET = f"{KUBELET}/plugins/{DRIVER}/csi.sock"


HELP_TEXT = {}


def holdfast_help():
    """{subcommand: set of long flags} from the real binary's --help."""
    binary = os.environ.get("HOLDFAST_BIN", os.path.join(ROOT, "target", "debug", "holdfast"))
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"check_manifests: {binary} is missing: cargo build first (or set HOLDFAST_BIN)")
    flags = {}
    for sub in ["agent", "controller", "all-in-one"]:
        p = subprocess.run([binary, sub, "--help"], capture_output=True, text=True)
        if p.returncode != 0:
            flags[sub] = None
            continue
        flags[sub] = set(re.findall(r"(--[a-z][a-z0-9-]*)", p.stdout))
        HELP_TEXT[sub] = p.stdout
    return flags


HELP = holdfast_help()


def check_flags(where, argv):
    sub, rest = argv[0], argv[1:]
    known = HELP.get(sub)
    if known is None:
        fail(f"{where}: `holdfast {sub}` does not exist in this binary (`holdfast {sub} --help` failed)")
        return
    for a in rest:
        flag = a.split("=", 1)[0]
        if not flag.startswith("--") or flag not in known:
            fail(f"{where}: `holdfast {sub}` has no flag {flag!r} (see `holdfast {sub} --help`)")


def schemas():
    out = {}
    for f in glob.glob(os.path.join(CRD_DIR, "*.json")):
        group, version, kind = os.path.basename(f)[:-5].split("_")
        out[(f"{group}/{version}", kind)] = json.load(open(f))
    return out


CRDS = schemas()


def validate(where, obj):
    key = (obj.get("apiVersion"), obj.get("kind"))
    name = f"{where}: {key[1]} {obj.get('metadata', {}).get('name')}"
    if key in CRDS:
        try:
            jsonschema.validate(obj, CRDS[key])
        except jsonschema.ValidationError as e:
            fail(f"{name}: {e.message} at {list(e.absolute_path)}")
        return
    versions = [NEWEST] if key in NEWER_ONLY else [OLDEST, NEWEST]
    for v in versions:
        try:
            kubernetes_validate.validate(obj, v, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            fail(f"{name}: no schema for {key[0]} {key[1]} in Kubernetes {v}")
        except kubernetes_validate.ValidationError as e:
            fail(f"{name}: invalid for Kubernetes {v}: {e.message} at {list(e.path)}")


def containers(obj):
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def arg(c, flag):
    for a in c.get("args", []):
        if a == flag or a.startswith(flag + "="):
            return a.split("=", 1)[1] if "=" in a else True
    return None


def check_set(where, objs):
    """Cross-checks one rendered set of objects."""
    by = {}
    for o in objs:
        by.setdefault(o["kind"], []).append(o)
    one = lambda kind: by.get(kind, [None])[0]  # noqa: E731
    drv = one("CSIDriver")
    if not drv or drv["metadata"]["name"] != DRIVER:
        fail(f"{where}: no CSIDriver named {DRIVER}")
    cms = {o["metadata"]["name"]: o.get("data", {}) for o in by.get("ConfigMap", [])}
    node_cfg = "".join(cms["holdfast-node-config"][k] for k in sorted(cms["holdfast-node-config"]))
    ctrl_cfg = cms["holdfast-controller-config"]["config.toml"]
    try:
        node_toml, ctrl_toml = tomllib.loads(node_cfg), tomllib.loads(ctrl_cfg)
    except tomllib.TOMLDecodeError as e:
        fail(f"{where}: a config does not parse as TOML: {e}")
        return
    pools = {p["name"]: p["kind"] for p in node_toml.get("pool", []) + ctrl_toml.get("pool", [])}
    if any(p["kind"] == "nfs" for p in node_toml.get("pool", [])):
        fail(f"{where}: an nfs pool in the agents' config (the controller serves nfs pools)")
    if any(p["kind"] != "nfs" for p in ctrl_toml.get("pool", [])):
        fail(f"{where}: a node-local pool in the controller's config")
    has_nfs = "nfs" in pools.values()
    if drv and drv["spec"]["seLinuxMount"] == has_nfs:
        fail(f"{where}: CSIDriver seLinuxMount is {drv['spec']['seLinuxMount']} with nfs pools {has_nfs}")
    for prefix in node_toml.get("allowed_path_prefixes", []):
        pass
    if KUBELET not in node_toml.get("allowed_path_prefixes", []):
        fail(f"{where}: allowed_path_prefixes does not hold the kubelet's root {KUBELET}")
    for sc in by.get("StorageClass", []):
        n = sc["metadata"]["name"]
        if sc["provisioner"] != DRIVER:
            fail(f"{where}: StorageClass {n} provisioner {sc['provisioner']}")
        if sc["parameters"].get("pool") not in pools:
            fail(f"{where}: StorageClass {n} names pool {sc['parameters'].get('pool')!r}, not one of {sorted(pools)}")
        if sc.get("volumeBindingMode") != "WaitForFirstConsumer" or sc.get("allowVolumeExpansion") is not True:
            fail(f"{where}: StorageClass {n} is not WaitForFirstConsumer with expansion")
    for kind, field in [("VolumeSnapshotClass", "driver"), ("VolumeGroupSnapshotClass", "driver"), ("VolumeAttributesClass", "driverName")]:
        for o in by.get(kind, []):
            if o[field] != DRIVER:
                fail(f"{where}: {kind} {o['metadata']['name']} names driver {o[field]}")
    svc, dep, ds = one("Service"), one("Deployment"), one("DaemonSet")
    ns = dep["metadata"]["namespace"]
    image = f"holdfast/holdfast:{VERSION}"
    if svc["spec"].get("clusterIP") != "None" or not svc["spec"].get("publishNotReadyAddresses"):
        fail(f"{where}: the controller Service is not headless with publishNotReadyAddresses")
    if dep["spec"]["replicas"] < 2:
        fail(f"{where}: fewer than two controller replicas")
    port = svc["spec"]["ports"][0]["port"]
    for c in containers(dep) + containers(ds):
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        if c["image"].split(":")[0].endswith("holdfast") or c["image"] == image:
            if c["image"] != image:
                fail(f"{where}: container {c['name']} runs {c['image']}, not {image} (Cargo.toml's version)")
            if c.get("args"):
                check_flags(f"{where}: {c['name']}", c["args"])
            else:
                continue
            if arg(c, "--endpoint") != "unix:///csi/csi.sock" or "/csi" not in mounts:
                fail(f"{where}: {c['name']} does not serve unix:///csi/csi.sock on the socket volume")
        elif c["name"] != "config":
            if arg(c, "--csi-address") != "/csi/csi.sock" or "/csi" not in mounts:
                fail(f"{where}: sidecar {c['name']} does not reach /csi/csi.sock")
    ctrl = containers(dep)[0]
    listen = arg(ctrl, "--listen")
    if not listen or not listen.endswith(f":{port}"):
        fail(f"{where}: the controller listens on {listen}, the Service's port is {port}")
    agent = [c for c in containers(ds) if c["name"] == "holdfast"][0]
    want = f"{svc['metadata']['name']}.{ns}.svc:{port}"
    if arg(agent, "--controller") != want:
        fail(f"{where}: agents dial {arg(agent, '--controller')}, the headless Service is {want}")
    env = {e["name"]: e for e in agent.get("env", [])}
    if arg(agent, "--node-id") != "$(NODE_ID)" or env.get("NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        fail(f"{where}: the agent's node id does not come from spec.nodeName")
    prov = {c["name"]: c for c in containers(dep)}
    for name, flags in {
        "csi-provisioner": ["--strict-topology", "--immediate-topology=false", "--enable-capacity", "--capacity-ownerref-level=2", "--extra-create-metadata", "--leader-election"],
        "csi-resizer": ["--leader-election"],
        "csi-snapshotter": ["--leader-election"],
        "csi-external-health-monitor-controller": ["--leader-election"],
    }.items():
        missing = [f for f in flags if f not in prov.get(name, {}).get("args", [])]
        if missing:
            fail(f"{where}: {name} lacks {missing}")
    # Group snapshots exactly where the set installs a VolumeGroupSnapshotClass (the sidecar's
    # gate without the CRDs makes it fail), with the snapshotter's RBAC for them.
    groups = bool(by.get("VolumeGroupSnapshotClass"))
    gate = "--feature-gates=CSIVolumeGroupSnapshot=true" in prov.get("csi-snapshotter", {}).get("args", [])
    if groups != gate:
        fail(f"{where}: a VolumeGroupSnapshotClass is {'' if groups else 'not '}installed but the csi-snapshotter's CSIVolumeGroupSnapshot gate is {'off' if groups else 'on'}")
    roles = {r["metadata"]["name"]: r for r in by.get("ClusterRole", [])}
    group_rules = [r for r in roles.get("holdfast-snapshotter", {}).get("rules", []) if "groupsnapshot.storage.k8s.io" in r.get("apiGroups", [])]
    if groups and not any("volumegroupsnapshotcontents" in r.get("resources", []) and "update" in r.get("verbs", []) for r in group_rules):
        fail(f"{where}: group snapshots on, but the snapshotter's ClusterRole cannot update VolumeGroupSnapshotContents")
    pod = ds["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    for p in [f"{KUBELET}/pods", f"{KUBELET}/plugins"]:
        if mounts.get(p, {}).get("mountPropagation") != "Bidirectional":
            fail(f"{where}: the agent does not mount {p} Bidirectional")
    if not agent.get("securityContext", {}).get("privileged") or "/dev" not in mounts:
        fail(f"{where}: the agent is not privileged with /dev")
    vols = {v["name"]: v for v in pod["volumes"]}
    sock_vol = [m["name"] for m in agent["volumeMounts"] if m["mountPath"] == "/csi"][0]
    if vols[sock_vol].get("hostPath", {}).get("path") != os.path.dirname(SOCKET):
        fail(f"{where}: the agent's socket directory is not {os.path.dirname(SOCKET)}")
    reg = [c for c in containers(ds) if "registrar" in c["name"]][0]
    if arg(reg, "--kubelet-registration-path") != SOCKET:
        fail(f"{where}: the registrar registers {arg(reg, '--kubelet-registration-path')}, not {SOCKET}")
    # The agent's state (stage and freeze records) must outlive the pod: on a hostPath.
    state = arg(agent, "--state-dir")
    if state is None:
        m = re.search(r"--state-dir\b[^\n]*(?:\n(?!\s*-)[^\n]*)*?\[default: ([^\]]+)\]", HELP_TEXT.get("agent", ""))
        state = m.group(1) if m else None
    if state is not None and not any(state.startswith(p.rstrip("/") + "/") for p, m in mounts.items() if "hostPath" in vols.get(m["name"], {})):
        fail(f"{where}: the agent's state dir {state} is on no hostPath mount")
    prefixes = node_toml.get("exec_prefix", {})
    if any("--target=1" in p for p in prefixes.values()) and not pod.get("hostPID"):
        fail(f"{where}: exec_prefix enters PID 1's namespaces but the pod has no hostPID")
    secret_names = {v["secret"]["secretName"] for v in list(vols.values()) + dep["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    certs = {o["spec"]["secretName"]: o for o in by.get("Certificate", [])}
    # The names each end checks in the other's certificate: the agent the controller's (the host
    # it dials, or --tls-server-name), the controller every agent's (--agent-server-name; without
    # it the node id, which a certificate shared by every agent of a DaemonSet cannot carry).
    ctrl_name = arg(agent, "--tls-server-name") or want.rsplit(":", 1)[0]
    agent_name = arg(ctrl, "--agent-server-name")
    if agent_name is None and not arg(ctrl, "--tls-per-node"):
        fail(f"{where}: the agents share one certificate but the controller has no --agent-server-name: it would check each agent's certificate for its node id")
    if certs:
        if not secret_names <= set(certs):
            fail(f"{where}: Secrets {sorted(secret_names - set(certs))} are mounted but no Certificate makes them")
        ctrl_secret = [v for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v][0]["secret"]["secretName"]
        if ctrl_name not in certs[ctrl_secret]["spec"].get("dnsNames", []):
            fail(f"{where}: the controller's certificate does not name {ctrl_name}")
        agent_secret = vols.get("tls", {}).get("secret", {}).get("secretName")
        if agent_name and agent_secret in certs and agent_name not in certs[agent_secret]["spec"].get("dnsNames", []):
            fail(f"{where}: the controller checks agents for {agent_name}, their certificate names {certs[agent_secret]['spec'].get('dnsNames')}")
    else:
        # Secrets made by hand as docs/operations.md says (`holdfast certs node …`).
        documented = doc_cert_names()
        if ctrl_name not in documented.get("controller", []):
            fail(f"{where}: agents check the controller's certificate for {ctrl_name}; docs/operations.md makes it for {documented.get('controller')}")
        if agent_name and agent_name not in documented.get("agent", []):
            fail(f"{where}: the controller checks agents for {agent_name}; docs/operations.md makes their certificate for {documented.get('agent')}")


def doc_cert_names():
    """Names of the certificates docs/operations.md makes with `holdfast certs node … --out ./X`:
    {X: [--node-id, --san…]}."""
    text = open(os.path.join(ROOT, "docs", "operations.md")).read().replace("\\\n", " ")
    out = {}
    for m in re.finditer(r"holdfast certs node --ca \S+ --node-id (\S+)((?:\s+--san \S+)*)\s+--out \./(\w+)", text):
        out[m.group(3)] = [m.group(1)] + re.findall(r"--san (\S+)", m.group(2))
    return out


def kustomize(d):
    p = subprocess.run(["kubectl", "kustomize", d], capture_output=True, text=True)
    if p.returncode != 0:
        fail(f"kubectl kustomize {os.path.relpath(d, ROOT)}: {p.stderr.strip()}")
        return []
    return [o for o in yaml.safe_load_all(p.stdout) if o]


def main():
    sets = {}
    for d in sorted(glob.glob(os.path.join(K8S, "overlays", "*"))):
        sets[os.path.relpath(d, ROOT)] = kustomize(d)
    defaults = yaml.safe_load(open(os.path.join(check_chart.CHART, "values.yaml")))
    for name, over, _, _ in check_chart.CASES:
        text = check_chart.render(check_chart.merge(defaults, over))
        sets[f"chart ({name})"] = [o for o in yaml.safe_load_all(text) if o]
    example = kustomize(os.path.join(K8S, "examples", "postgres"))
    n = 0
    for where, objs in list(sets.items()) + [("examples/postgres", example)]:
        for o in objs:
            validate(where, o)
            n += 1
    print(f"check_manifests: {n} objects validated (Kubernetes {OLDEST} and {NEWEST}, CRDs from tests/fixtures/crd-schemas)")
    for where, objs in sets.items():
        check_set(where, objs)
    print(f"check_manifests: {len(sets)} object sets cross-checked against src/ ({DRIVER}, {NODE_KEY}), Cargo.toml and `holdfast --help`")
    sc_classes = {o["metadata"]["name"] for o in sets[os.path.relpath(os.path.join(K8S, "overlays", "mixed"), ROOT)] if o["kind"] == "StorageClass"}
    for o in example:
        if o["kind"] == "StatefulSet":
            for t in o["spec"]["volumeClaimTemplates"]:
                if t["spec"]["storageClassName"] not in sc_classes:
                    fail(f"examples/postgres: StorageClass {t['spec']['storageClassName']} is not one the overlays make")
    check_nomad()
    check_image()
    return 1 if problems else 0


def check_image():
    """The Dockerfile and the offline build make the same image: same package list, same LVM
    settings, the binary at the entrypoint both name."""
    d = os.path.join(ROOT, "deploy", "image")
    docker = open(os.path.join(d, "Dockerfile")).read()
    offline = open(os.path.join(d, "build-oci")).read() + open(os.path.join(d, "oci-archive.py")).read()
    for what, present in [
        ("the Dockerfile installs packages.txt", "deploy/image/packages.txt" in docker and "xargs apt-get install" in docker),
        ("build-oci installs packages.txt", "packages.txt" in offline and "--include=" in offline),
        ("both install lvmlocal.conf", "deploy/image/lvmlocal.conf /etc/lvm/lvmlocal.conf" in docker and "lvmlocal.conf' /etc/lvm" in offline),
        ("both run /usr/local/bin/holdfast", 'ENTRYPOINT ["/usr/local/bin/holdfast"]' in docker and '"Entrypoint": ["/usr/local/bin/holdfast"]' in offline),
    ]:
        if not present:
            fail(f"deploy/image: not so: {what}")
    pkgs = [l.strip() for l in open(os.path.join(d, "packages.txt")) if l.strip() and not l.startswith("#")]
    needed = {"lvm2", "thin-provisioning-tools", "zfsutils-linux", "nfs-common", "e2fsprogs", "xfsprogs", "btrfs-progs", "util-linux"}
    if not needed <= set(pkgs):
        fail(f"deploy/image/packages.txt lacks {sorted(needed - set(pkgs))}")
    print(f"check_manifests: the Dockerfile and build-oci install the same {len(pkgs)} packages and LVM settings")


def unquote(v, variables):
    """python-hcl2 keeps string literals quoted and expressions as ${...}: plain values back,
    with var.NAME references resolved from the variables' defaults."""
    if isinstance(v, dict):
        return {unquote(k, variables): unquote(x, variables) for k, x in v.items() if k != "__is_block__"}
    if isinstance(v, list):
        return [unquote(x, variables) for x in v]
    if isinstance(v, str):
        if len(v) >= 2 and v[0] == v[-1] == '"':
            v = v[1:-1].replace('\\"', '"').replace("\\n", "\n")
        h = re.fullmatch(r"<<(-?)([A-Z]+)\n(.*)\n\s*\2", v, re.S)
        if h:
            # A heredoc; <<- strips the common indentation, as HCL does.
            return textwrap.dedent(h.group(3)) + "\n" if h.group(1) else h.group(3) + "\n"
        m = re.fullmatch(r"\$\{var\.([A-Za-z_]+)\}", v)
        if m and m.group(1) in variables:
            return variables[m.group(1)]
        return re.sub(r"\$\{var\.([A-Za-z_]+)\}", lambda m: str(variables.get(m.group(1), m.group(0))), v)
    return v


def check_nomad():
    d = os.path.join(ROOT, "deploy", "nomad")
    jobs = sorted(glob.glob(os.path.join(d, "*.nomad.hcl")))
    ids = set()
    for f in jobs:
        rel = os.path.relpath(f, ROOT)
        try:
            raw = hcl2.load(open(f))
        except Exception as e:  # the parser raises several types
            fail(f"{rel}: not HCL2: {e}")
            continue
        variables = {}
        for block in unquote(raw.get("variable", []), {}):
            (vname, vbody), = block.items()
            variables[vname] = vbody.get("default")
        doc = unquote(raw, variables)
        for job in doc["job"]:
            (jname, jbody), = job.items()
            for group in jbody["group"]:
                (_, gbody), = group.items()
                for task in gbody["task"]:
                    (tname, tbody), = task.items()
                    plugin = tbody["csi_plugin"][0]
                    ids.add(plugin["id"])
                    cfg = tbody["config"][0]
                    if cfg["image"] != f"holdfast/holdfast:{VERSION}":
                        fail(f"{rel}: task {tname} runs {cfg['image']}, not holdfast/holdfast:{VERSION}")
                    args = cfg["args"]
                    check_flags(f"{rel}: task {tname}", args)
                    # The certificates' names (made as docs/operations.md says) each end checks.
                    flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
                    documented = doc_cert_names()
                    if args[0] == "controller" and "--tls-cert" in flags and flags.get("--agent-server-name") not in documented.get("agent", []):
                        fail(f"{rel}: the controller checks agents for {flags.get('--agent-server-name')} (the node id if unset); docs/operations.md makes their certificate for {documented.get('agent')}")
                    if args[0] == "agent" and "--tls-cert" in flags:
                        name = flags.get("--tls-server-name") or flags.get("--controller", "").rsplit(":", 1)[0]
                        if name not in documented.get("controller", []):
                            fail(f"{rel}: the agent checks the controller's certificate for {name}; docs/operations.md makes it for {documented.get('controller')}")
                    if plugin["type"] in ("node", "monolith"):
                        if jbody.get("type") != "system" or not cfg.get("privileged"):
                            fail(f"{rel}: the {plugin['type']} plugin is not a privileged system job")
                        if "--endpoint=${CSI_ENDPOINT}" not in args:
                            fail(f"{rel}: the plugin does not serve Nomad's CSI_ENDPOINT")
                        for t in tbody.get("template", []):
                            if t["destination"].endswith("config.toml"):
                                toml = tomllib.loads(t["data"])
                                base = plugin.get("stage_publish_base_dir", "/local/csi")
                                if base not in toml.get("allowed_path_prefixes", []):
                                    fail(f"{rel}: allowed_path_prefixes does not hold {base}")
    print(f"check_manifests: {len(jobs)} Nomad jobs parse as HCL2 (plugin ids {sorted(ids)})")
    if ids != {"holdfast"}:
        fail(f"deploy/nomad: plugin ids {sorted(ids)}, want one: holdfast")
    vols = sorted(glob.glob(os.path.join(d, "volumes", "*.hcl")))
    modes = {"single-node-reader-only", "single-node-writer", "multi-node-reader-only", "multi-node-single-writer", "multi-node-multi-writer"}
    for f in vols:
        rel = os.path.relpath(f, ROOT)
        try:
            v = hcl.load(open(f))
        except Exception as e:
            fail(f"{rel}: not HCL1: {e}")
            continue
        for k in ["id", "name", "type", "plugin_id", "capability"]:
            if k not in v:
                fail(f"{rel}: no {k}")
        if v.get("plugin_id") not in ids or v.get("type") != "csi":
            fail(f"{rel}: plugin_id {v.get('plugin_id')} / type {v.get('type')}")
        caps = v.get("capability", [])
        for c in caps if isinstance(caps, list) else [caps]:
            if c.get("access_mode") not in modes or c.get("attachment_mode") not in ("file-system", "block-device"):
                fail(f"{rel}: capability {c}")
        for kind in ("required", "preferred"):
            topo = v.get("topology_request", {}).get(kind, {}).get("topology", {})
            for t in topo if isinstance(topo, list) else [topo]:
                for key in t.get("segments", {}):
                    if key != NODE_KEY:
                        fail(f"{rel}: topology key {key!r}; the agents report {NODE_KEY}")
    print(f"check_manifests: {len(vols)} Nomad volume specs parse as HCL1")


if __name__ == "__main__":
    sys.exit(main())
