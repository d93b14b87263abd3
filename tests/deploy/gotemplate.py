"""A strict renderer for the subset of Go text/template + Helm functions that
deploy/helm/holdfast uses, so the chart can be rendered where helm is not installed.

Strict on purpose: an action, function or field it does not know, a missing map key, or a
value that Go would print oddly (a map, a list, nil) is an error, never text left in the
output. What it implements follows text/template's rules: `{{-` / `-}}` trim all whitespace
beside them, `if`/`with`/`range` test Go truth (false, 0, "", nil, empty list or map),
`range` over a map goes in key order, variables live until the end of their block, `$` is
the top-level data. Helm's helpers: include, toYaml (sorted keys, trailing newline cut),
indent, nindent, quote, default, not, and, or, eq, ne, hasKey, dict, index, fail.
"""

import re

import yaml


class TemplateError(Exception):
    pass


ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:\\.|[^"\\])*")
    | (?P<raw>`[^`]*`)
    | (?P<num>-?\d+)
    | (?P<decl>:=)
    | (?P<punct>[|(),])
    | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.X,
)
KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}


def tokenize(src):
    out, pos = [], 0
    src = src.strip()
    while pos < len(src):
        m = TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot parse {src[pos:]!r} in action {{{{{src}}}}}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def lex(text):
    """Splits a template into ("text", s) and ("action", tokens) items, applying trim markers."""
    items, pos = [], 0
    for m in ACTION.finditer(text):
        chunk = text[pos : m.start()]
        if m.group(1):
            chunk = chunk.rstrip()
        if items and items[-1][0] == "trim-next":
            items.pop()
            chunk = chunk.lstrip()
        items.append(("text", chunk))
        body = m.group(2)
        if not body.strip().startswith("/*"):
            items.append(("action", tokenize(body)))
        elif not body.strip().endswith("*/"):
            raise TemplateError(f"unterminated comment {body!r}")
        if m.group(3):
            items.append(("trim-next", None))
        pos = m.end()
    chunk = text[pos:]
    if items and items[-1][0] == "trim-next":
        items.pop()
        chunk = chunk.lstrip()
    items.append(("text", chunk))
    return items


class Parser:
    """Builds a tree: ("text", s) | ("pipe", decl, cmds) | ("if", [(pipe, body)...], else)
    | ("range", vars, pipe, body, else) | ("with", pipe, body, else)."""

    def __init__(self, items, defines):
        self.items, self.i, self.defines = items, 0, defines

    def parse(self, stop=()):
        nodes = []
        while self.i < len(self.items):
            kind, val = self.items[self.i]
            self.i += 1
            if kind == "text":
                if val:
                    nodes.append(("text", val))
                continue
            word = val[0][1] if val and val[0][0] == "ident" else None
            if word in stop:
                return nodes, word, val
            if word in ("else", "end"):
                raise TemplateError(f"unexpected {{{{{word}}}}}")
            if word == "if":
                nodes.append(self.parse_if(val[1:]))
            elif word == "range":
                decl, pipe = self.split_decl(val[1:], allow_two=True)
                body, end, _ = self.parse(("else", "end"))
                other = self.parse(("end",))[0] if end == "else" else []
                nodes.append(("range", decl, pipe, body, other))
            elif word == "with":
                body, end, _ = self.parse(("else", "end"))
                other = self.parse(("end",))[0] if end == "else" else []
                nodes.append(("with", self.pipeline(val[1:]), body, other))
            elif word == "define":
                if len(val) != 2 or val[1][0] != "str":
                    raise TemplateError("define takes one quoted name")
                body, _, _ = self.parse(("end",))
                self.defines[eval_string(val[1][1])] = body
            elif word in KEYWORDS:
                raise TemplateError(f"{{{{{word}}}}} is not supported by this renderer")
            else:
                decl, pipe = self.split_decl(val, allow_two=False)
                nodes.append(("pipe", decl, pipe))
        if stop:
            raise TemplateError(f"missing {{{{end}}}} (expected one of {stop})")
        return nodes, None, None

    def parse_if(self, toks):
        branches, other = [], []
        cond = self.pipeline(toks)
        while True:
            body, end, val = self.parse(("else", "end"))
            branches.append((cond, body))
            if end == "end":
                break
            if len(val) > 1 and val[1] == ("ident", "if"):
                cond = self.pipeline(val[2:])
                continue
            other = self.parse(("end",))[0]
            break
        return ("if", branches, other)

    def split_decl(self, toks, allow_two):
        for j, t in enumerate(toks):
            if t[0] == "decl":
                names = [v for k, v in toks[:j] if k == "var"]
                commas = [v for k, v in toks[:j] if k == "punct"]
                if not names or len(names) > (2 if allow_two else 1) or len(names) + len(commas) != j:
                    raise TemplateError(f"bad variable declaration {toks[:j]}")
                return names, self.pipeline(toks[j + 1 :])
        return [], self.pipeline(toks)

    def pipeline(self, toks):
        if not toks:
            raise TemplateError("empty pipeline")
        cmds, cur, depth = [], [], 0
        for t in toks:
            if t == ("punct", "(") :
                depth += 1
            elif t == ("punct", ")"):
                depth -= 1
            if t == ("punct", "|") and depth == 0:
                cmds.append(self.command(cur))
                cur = []
            else:
                cur.append(t)
        cmds.append(self.command(cur))
        return cmds

    def command(self, toks):
        if not toks:
            raise TemplateError("empty command in a pipeline")
        args, j = [], 0
        while j < len(toks):
            kind, v = toks[j]
            if (kind, v) == ("punct", "("):
                depth, k = 1, j + 1
                while depth:
                    if k >= len(toks):
                        raise TemplateError("unbalanced (")
                    depth += {"(": 1, ")": -1}.get(toks[k][1], 0) if toks[k][0] == "punct" else 0
                    k += 1
                args.append(("sub", self.pipeline(toks[j + 1 : k - 1])))
                j = k
                continue
            if kind == "punct":
                raise TemplateError(f"unexpected {v!r}")
            if kind == "ident" and v not in ("true", "false", "nil") and v not in FUNCS:
                raise TemplateError(f"function {v!r} is not implemented by this renderer")
            args.append((kind, v))
            j += 1
        return args


def eval_string(s):
    if s.startswith("`"):
        return s[1:-1]
    return bytes(s[1:-1], "utf-8").decode("unicode_escape")


def truth(v):
    return not (v is None or v is False or v == 0 and not isinstance(v, bool) or v == "" or v == [] or v == {})


def go_quote(s):
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def to_yaml(v):
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True, width=1 << 30).removesuffix("\n")


def indent(n, s):
    pad = " " * n
    return pad + s.replace("\n", "\n" + pad)


def fail(msg):
    raise TemplateError(f"fail: {msg}")


def dict_(*kv):
    if len(kv) % 2:
        raise TemplateError("dict needs key/value pairs")
    return {kv[i]: kv[i + 1] for i in range(0, len(kv), 2)}


def index(m, *keys):
    for k in keys:
        if k not in m:
            raise TemplateError(f"index: no key {k!r}")
        m = m[k]
    return m


FUNCS = {
    "include": None,  # needs the renderer: handled in Renderer.call
    "toYaml": to_yaml,
    "indent": indent,
    "nindent": lambda n, s: "\n" + indent(n, s),
    "quote": lambda *a: " ".join(go_quote(x) for x in a),
    "default": lambda d, v=None: v if truth(v) else d,
    "not": lambda v: not truth(v),
    "and": lambda *a: next((x for x in a if not truth(x)), a[-1]),
    "or": lambda *a: next((x for x in a if truth(x)), a[-1]),
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "hasKey": lambda m, k: k in m,
    "dict": dict_,
    "index": index,
    "fail": fail,
}


class Renderer:
    def __init__(self):
        self.defines = {}

    def load(self, name, text):
        try:
            nodes, _, _ = Parser(lex(text), self.defines).parse()
        except TemplateError as e:
            raise TemplateError(f"{name}: {e}") from None
        return nodes

    def render(self, nodes, dot, top):
        out = []
        self.run(nodes, dot, [{"$": top}], out)
        return "".join(out)

    def run(self, nodes, dot, scopes, out):
        scopes = scopes + [{}]
        for n in nodes:
            kind = n[0]
            if kind == "text":
                out.append(n[1])
            elif kind == "pipe":
                v = self.pipe(n[2], dot, scopes)
                if n[1]:
                    scopes[-1][n[1][0]] = v
                else:
                    out.append(self.show(v))
            elif kind == "if":
                for cond, body in n[1]:
                    if truth(self.pipe(cond, dot, scopes)):
                        self.run(body, dot, scopes, out)
                        break
                else:
                    self.run(n[2], dot, scopes, out)
            elif kind == "with":
                v = self.pipe(n[1], dot, scopes)
                self.run(n[2] if truth(v) else n[3], v if truth(v) else dot, scopes, out)
            elif kind == "range":
                v = self.pipe(n[2], dot, scopes)
                if isinstance(v, dict):
                    pairs = [(k, v[k]) for k in sorted(v)]
                elif isinstance(v, list):
                    pairs = list(enumerate(v))
                elif v is None:
                    pairs = []
                else:
                    raise TemplateError(f"range over {type(v).__name__}")
                if not pairs:
                    self.run(n[4], dot, scopes, out)
                for k, item in pairs:
                    inner = {}
                    if len(n[1]) == 1:
                        inner[n[1][0]] = item
                    elif len(n[1]) == 2:
                        inner[n[1][0]], inner[n[1][1]] = k, item
                    self.run(n[3], item, scopes + [inner], out)

    def show(self, v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, str)):
            return str(v)
        raise TemplateError(f"refusing to print {v!r} (Go would print {type(v).__name__} its own way; use toYaml)")

    def pipe(self, cmds, dot, scopes):
        val, have = None, False
        for cmd in cmds:
            val = self.command(cmd, dot, scopes, val if have else None, have)
            have = True
        return val

    def command(self, cmd, dot, scopes, piped, have):
        head = cmd[0]
        if head[0] == "ident" and head[1] not in ("true", "false", "nil"):
            args = [self.operand(a, dot, scopes) for a in cmd[1:]]
            if have:
                args.append(piped)
            return self.call(head[1], args, dot)
        if len(cmd) != 1 or have:
            raise TemplateError(f"{head[1]!r} is not a function")
        return self.operand(head, dot, scopes)

    def call(self, name, args, dot):
        if name == "include":
            if len(args) != 2 or args[0] not in self.defines:
                raise TemplateError(f"include {args[:1]}: no such template")
            return self.render(self.defines[args[0]], args[1], self.top)
        try:
            return FUNCS[name](*args)
        except TypeError as e:
            raise TemplateError(f"{name}: {e}") from None

    def operand(self, tok, dot, scopes):
        kind, v = tok
        if kind == "sub":
            return self.pipe(v, dot, scopes)
        if kind in ("str", "raw"):
            return eval_string(v)
        if kind == "num":
            return int(v)
        if kind == "ident":
            return {"true": True, "false": False, "nil": None}[v]
        if kind == "field":
            return self.fields(dot, v.split(".")[1:] if v != "." else [], v)
        if kind == "var":
            name, *path = v.split(".")
            for s in reversed(scopes):
                if name in s:
                    return self.fields(s[name], path, v)
            raise TemplateError(f"undefined variable {name}")
        raise TemplateError(f"unexpected {v!r}")

    def fields(self, v, path, whole):
        for p in path:
            if not isinstance(v, dict) or p not in v:
                raise TemplateError(f"{whole}: no field {p!r} (a missing value would render as nothing)")
            v = v[p]
        return v


def render_chart(chart_dir, values, namespace, release="holdfast"):
    """Renders every template of a chart as `helm template` would: returns {file: text}."""
    import os

    r = Renderer()
    chart = yaml.safe_load(open(os.path.join(chart_dir, "Chart.yaml")))
    r.top = {
        "Values": values,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart.get("appVersion", "")},
    }
    tdir = os.path.join(chart_dir, "templates")
    parsed = {}
    for f in sorted(os.listdir(tdir)):
        parsed[f] = r.load(f, open(os.path.join(tdir, f)).read())
    out = {}
    for f, nodes in parsed.items():
        if f.startswith("_"):
            continue
        try:
            out[f] = r.render(nodes, r.top, r.top)
        except TemplateError as e:
            raise TemplateError(f"{f}: {e}") from None
    return out
