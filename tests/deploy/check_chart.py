"""The Helm chart renders the same objects as kustomize for the same choices.

For each case, the chart (deploy/helm/holdfast) is rendered with tests/deploy/gotemplate.py for
a set of values and compared, object by object and field by field, with `kubectl kustomize` of
the matching overlay. Empty lists and maps count as absent (Kubernetes reads them so). Every key
of values.yaml has its row in the README's values reference."""

import copy
import os
import re
import subprocess
import sys

import yaml

sys.path.insert(0, os.path.dirname(__file__))
import gotemplate  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "deploy", "helm", "holdfast")
NAMESPACE = "holdfast"


def merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# (name, values over the chart's defaults, overlay, kinds the chart leaves out in that case)
CASES = [
    ("default values", {}, "overlays/file", {"Namespace"}),
    (
        "lvm-thin, snapshots, cert-manager",
        {
            "createNamespace": True,
            "pools": {"file": {"enabled": False}, "lvmThin": {"enabled": True}},
            "snapshots": {"enabled": True},
            "tls": {"source": "cert-manager"},
        },
        "overlays/lvm-thin",
        set(),
    ),
    (
        "every pool kind and class",
        {
            "createNamespace": True,
            "pools": {k: {"enabled": True} for k in ["file", "lvmThin", "lvmThick", "zfs", "nfs"]},
            "snapshots": {"enabled": True},
            "groupSnapshots": {"enabled": True},
            "volumeAttributesClass": {"enabled": True},
            "tls": {"source": "cert-manager"},
        },
        "overlays/mixed",
        set(),
    ),
]


def prune(v):
    if isinstance(v, dict):
        out = {k: prune(x) for k, x in v.items()}
        return {k: x for k, x in out.items() if x not in (None, [], {})}
    if isinstance(v, list):
        return [prune(x) for x in v]
    return v


def key(obj):
    m = obj.get("metadata", {})
    return (obj.get("kind"), m.get("namespace", ""), m.get("name"))


def objects(text):
    return {key(o): prune(o) for o in yaml.safe_load_all(text) if o}


def diff(a, b, path=""):
    if type(a) is not type(b):
        return [f"{path}: chart {a!r} != kustomize {b!r}"]
    if isinstance(a, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{path}.{k}: only in kustomize: {b[k]!r}"[:300])
            elif k not in b:
                out.append(f"{path}.{k}: only in the chart: {a[k]!r}"[:300])
            else:
                out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: chart has {len(a)} items, kustomize {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: chart {a!r} != kustomize {b!r}"[:300]]


def render(values):
    files = gotemplate.render_chart(CHART, values, NAMESPACE)
    return "\n---\n".join(files.values())


def self_test():
    """The renderer refuses what it does not implement, so nothing unrendered can pass."""
    r = gotemplate.Renderer()
    top = {"Values": {"a": {"b": "x"}}}
    bad = [
        "{{ .Values.a.b | upper }}",  # a function it lacks
        "{{ .Values.a.c }}",  # a missing key
        "{{ .Values.a }}",  # a map printed as text
        "{{ if .Values.a.b }}unclosed",  # a block without end
        "{{ tpl .Values.a.b . }}",
    ]
    for t in bad:
        try:
            r.render(r.load("self-test", t), top, top)
        except gotemplate.TemplateError:
            continue
        raise SystemExit(f"check_chart: the renderer accepted {t!r}")
    got = r.render(r.load("self-test", "a:\n  {{- if .Values.a.b }}\n  b: {{ .Values.a.b | quote }}\n  {{- end }}\n"), top, top)
    assert got == 'a:\n  b: "x"\n', repr(got)


# Maps that are values as a whole (the README documents the key, not what the map may hold).
WHOLE = ("resources", "Resources", "nodeSelector")


def undocumented(values, readme):
    """Keys of `values` (dot paths, down to its leaves or a WHOLE map) that no row of the
    README's values table names: as written, `pools.<kind>.…` for any pool, `a.b.*` for what
    lies below a.b, or `a.b.image` / `.tag` for a sibling."""
    names = []
    for line in readme.splitlines():
        m = re.match(r"\|\s*(.+?)\s*\|", line)
        for k in re.findall(r"`([^`]+)`", m.group(1)) if m else []:
            names.append(names[-1].rsplit(".", 1)[0] + k if k.startswith(".") and names else k)

    def covered(path):
        for n in names:
            pat = re.escape(n).replace(re.escape("<kind>"), r"[A-Za-z]+")
            if n.endswith(".*"):
                pat = pat[: -len(re.escape("*"))] + r".+"
            if re.fullmatch(pat, path):
                return True
        return False

    def leaves(d, pre=""):
        for k, v in d.items():
            if isinstance(v, dict) and v and not k.endswith(WHOLE):
                yield from leaves(v, pre + k + ".")
            else:
                yield pre + k

    return [p for p in leaves(values) if not covered(p)]


def main():
    self_test()
    assert undocumented({"a": {"b": 1, "c": 2}, "pools": {"x": {"on": 1}}}, "| `a.b` | 1 |\n| `pools.<kind>.on` | 1 |") == ["a.c"]
    defaults = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))
    failed = 0
    for name, over, overlay, absent in CASES:
        chart = objects(render(merge(defaults, over)))
        kust_text = subprocess.run(
            ["kubectl", "kustomize", os.path.join(ROOT, "deploy", "kubernetes", overlay)], check=True, capture_output=True, text=True
        ).stdout
        kust = {k: v for k, v in objects(kust_text).items() if k[0] not in absent}
        problems = []
        for k in sorted(set(chart) | set(kust), key=str):
            if k not in chart:
                problems.append(f"{k}: only in kustomize")
            elif k not in kust:
                problems.append(f"{k}: only in the chart")
            else:
                problems += [f"{k}{d}" for d in diff(chart[k], kust[k])]
        if problems:
            failed += 1
            print(f"check_chart: {name} (vs {overlay}): {len(problems)} differences")
            for p in problems[:40]:
                print("  " + p)
        else:
            print(f"check_chart: {name}: the chart's {len(chart)} objects equal {overlay}'s")
    # Retired nodes from values land in the ConfigMap, one a line.
    cm = objects(render(merge(defaults, {"retiredNodes": ["node-a", "node-b"]})))[("ConfigMap", NAMESPACE, "holdfast-retired-nodes")]
    lines = [l for l in cm["data"]["retired-nodes"].splitlines() if not l.startswith("#")]
    if lines != ["node-a", "node-b"]:
        failed += 1
        print(f"check_chart: retiredNodes rendered as {lines!r}")
    missing = undocumented(defaults, open(os.path.join(CHART, "README.md")).read())
    if missing:
        failed += 1
        print(f"check_chart: values.yaml keys without a row in deploy/helm/holdfast/README.md: {missing}")
    else:
        print("check_chart: every key of values.yaml has its row in the chart's README")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
