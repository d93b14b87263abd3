#!/usr/bin/env python3
"""Every error message the driver can return has an entry in docs/troubleshooting.md.

What counts as a message (read from src/**/*.rs; `#[cfg(test)]` items, the test modules they
name and the recording fakes (`impl … Fake…`) left out):

- the text given to a gRPC-coded error: `Error::InvalidArgument / NotFound / AlreadyExists /
  FailedPrecondition / ResourceExhausted / OutOfRange / Aborted / Unimplemented / Unavailable /
  DeadlineExceeded / Internal (…)` and `Status::invalid_argument / … / permission_denied (…)`,
  however many lines the call takes; a pattern (`Err(Error::NotFound(_)) =>`) is no message;
- the message of an abnormal volume condition (`Condition::Abnormal(…)`, `VolumeCondition {
  abnormal: true, message: … }`), which users see as VolumeConditionAbnormal events: listed
  under the pseudo-code VOLUME_CONDITION;
- the context of a failed command or file-system call (`Error::exec(ctx, e)`, `Error::io(ctx, e)`,
  `.context(|| ctx)`): the operator sees "ctx: `cmd` failed with exit code N: stderr" under
  INTERNAL (DEADLINE_EXCEEDED when the command timed out);
- where the text is not written at the call, the checker follows it: a local `let` (each text of
  its expression: a literal, a format!, each arm of an if/match, `…` for an arm that passes on
  another text), a constant, a function of ours returning a String (`self.vg_missing()`), a
  parameter of the enclosing function (what each caller passes), the parameter of a local closure
  (`let bad = |m| Error::X(format!("pool {name}: {m}"))`: each `bad(…)` call), a placeholder
  naming a helper's parameter that its callers fill with at most 8 literals or constants
  (`non_empty(PARAM_POOL)`), or `.map_err(Error::X)` over a function whose `Err(…)` texts are
  then taken.

- start-up refusals, under the pseudo-code STARTUP (what `holdfast` prints before it exits, when it
  will not start: a bad config, a socket in use, TLS files missing or not matching): in the
  files of STARTUP_FILES (main.rs, config.rs and the serving code), `bail!(…)`, `anyhow!(…)`,
  `eprintln!(…)`, `ConfigError(…)` (and `.map_err(ConfigError)` over a function of the same
  file), every other `Err(…)` (`Err(format!(…))` of a function answering a String), the closures
  of `.map_err(|e| …)` / `.ok_or_else(|| …)`, `#[error("…")]` attributes, and in main.rs
  `.context(…)` / `.with_context(…)` (anyhow's: there they are start-up messages, elsewhere
  error.rs's INTERNAL contexts). A text given to a gRPC-coded error there keeps its code.

Each text is reduced to its static part: a `{…}` placeholder, or a value the checker cannot see,
becomes `…`. A text with no letter of its own (`{}`, `{peer}: {m}`) relays another message, which
has its entry where it is made. A message is covered by a catalogue entry when both have the same
code and the same text, compared after turning each run of `…` into one and each run of blanks
into one space: no partial or pattern match, so a new or changed text needs its own entry. The
catalogue's entries are the table rows whose first cell opens with a code span (the message),
under a heading that starts with the gRPC code (or a deeper heading below one).

Exit status 1, listing each missing message as `file:line: CODE text` (the line of the text),
when any is not covered; also when a text cannot be found at all (a binding or parameter that
leads nowhere): those are listed so that the checker, not a reviewer, is taught about them
(RELAYS below). Entries that match no message any more are counted, without failing
(`--stale` lists them: rows to delete, or rows written ahead for a branch not merged yet).
`--list` prints every message found; `--root DIR` reads DIR/src instead (a branch's export)
against this tree's catalogue; `--self-test` runs the checker on a made-up source and
catalogue (a missing entry, a wrong code and a partial entry must fail).
"""
import os
import re
import sys

CODES = {
    "InvalidArgument": "INVALID_ARGUMENT",
    "NotFound": "NOT_FOUND",
    "AlreadyExists": "ALREADY_EXISTS",
    "FailedPrecondition": "FAILED_PRECONDITION",
    "ResourceExhausted": "RESOURCE_EXHAUSTED",
    "OutOfRange": "OUT_OF_RANGE",
    "Aborted": "ABORTED",
    "Unimplemented": "UNIMPLEMENTED",
    "Unavailable": "UNAVAILABLE",
    "DeadlineExceeded": "DEADLINE_EXCEEDED",
    "PermissionDenied": "PERMISSION_DENIED",
    "Internal": "INTERNAL",
}
STATUS_CODES = {
    "invalid_argument": "INVALID_ARGUMENT",
    "not_found": "NOT_FOUND",
    "already_exists": "ALREADY_EXISTS",
    "failed_precondition": "FAILED_PRECONDITION",
    "resource_exhausted": "RESOURCE_EXHAUSTED",
    "out_of_range": "OUT_OF_RANGE",
    "aborted": "ABORTED",
    "unimplemented": "UNIMPLEMENTED",
    "unavailable": "UNAVAILABLE",
    "deadline_exceeded": "DEADLINE_EXCEEDED",
    "permission_denied": "PERMISSION_DENIED",
    "internal": "INTERNAL",
    "unauthenticated": "UNAUTHENTICATED",
}
# Not a gRPC code: the message of an abnormal volume condition (ListVolumes, NodeGetVolumeStats),
# which reaches users as a VolumeConditionAbnormal event.
CONDITION = "VOLUME_CONDITION"
# Not a gRPC code either: what `holdfast` prints when it refuses to start (read from these files).
STARTUP = "STARTUP"
STARTUP_FILES = ("src/main.rs", "src/config.rs", "src/server.rs", "src/tls.rs")
# Error types whose construction in STARTUP_FILES is a coded message (read by the main pass) or
# another type's plumbing, not a start-up text of its own.
CODED = {"Error", "Status", "tonic", "TlsError", "ConfigError", "Self", "e", "err"}
ALL_CODES = set(CODES.values()) | set(STATUS_CODES.values()) | {CONDITION, STARTUP}
WILD = "…"


# ---------------------------------------------------------------------------------------------
# A small Rust lexer: enough to find calls, their arguments and string literals, with comments
# dropped and the line of each token kept.


class Tok:
    __slots__ = ("kind", "text", "line", "value")

    def __init__(self, kind, text, line, value=None):
        self.kind, self.text, self.line, self.value = kind, text, line, value

    def __repr__(self):
        return f"{self.kind}:{self.text!r}@{self.line}"


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"'}


def unescape(body):
    """The value of a (non-raw) Rust string literal's body: `\\` + newline skips the newline and
    the blanks after it, as rustc does."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        n = body[i + 1] if i + 1 < len(body) else ""
        if n == "\n":
            i += 2
            while i < len(body) and body[i] in " \t\n\r":
                i += 1
        elif n == "u":
            j = body.index("}", i)
            out.append(chr(int(body[i + 3 : j], 16)))
            i = j + 1
        elif n == "x":
            out.append(chr(int(body[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(ESCAPES.get(n, n))
            i += 2
    return "".join(out)


PUNCT3 = ("..=", "...", "<<=", ">>=")
PUNCT2 = ("::", "=>", "->", "==", "!=", "<=", ">=", "&&", "||", "..", "+=", "-=", "|=", "&=")


def lex(src):
    toks, i, line, n = [], 0, 1, len(src)
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            line += src.count("\n", i, j)
            i = j
        elif c == '"' or (c in "bc" and src.startswith('"', i + 1)):
            start = i
            i = i + 1 if c == '"' else i + 2
            j = i
            while src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            toks.append(Tok("str", src[start : j + 1], line, unescape(src[i:j])))
            line += src.count("\n", start, j)
            i = j + 1
        elif re.match(r'(br|cr|r)#*"', src[i : i + 40]):
            m = re.match(r'(br|cr|r)(#*)"', src[i:])
            close = '"' + m.group(2)
            j = src.index(close, i + m.end())
            toks.append(Tok("str", src[i : j + len(close)], line, src[i + m.end() : j]))
            line += src.count("\n", i, j)
            i = j + len(close)
        elif c == "'":
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|\\.|[^\\'])'", src[i:])
            if m:  # a char literal; otherwise a lifetime or label
                toks.append(Tok("char", m.group(0), line))
                i += m.end()
            else:
                m = re.match(r"'[A-Za-z_][A-Za-z0-9_]*", src[i:])
                toks.append(Tok("lifetime", m.group(0), line))
                i += m.end()
        elif c.isalpha() or c == "_":
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", src[i:])
            toks.append(Tok("ident", m.group(0), line))
            i += m.end()
        elif c.isdigit():
            m = re.match(r"[0-9][0-9a-zA-Z_]*(\.[0-9][0-9a-zA-Z_]*)?", src[i:])
            toks.append(Tok("num", m.group(0), line))
            i += m.end()
        else:
            for p in PUNCT3 + PUNCT2:
                if src.startswith(p, i):
                    toks.append(Tok("punct", p, line))
                    i += len(p)
                    break
            else:
                toks.append(Tok("punct", c, line))
                i += 1
    return toks


OPEN = {"(": ")", "[": "]", "{": "}"}


def matching(toks, i):
    """Index of the bracket closing the one at `i`."""
    depth = 0
    for j in range(i, len(toks)):
        t = toks[j].text if toks[j].kind == "punct" else None
        if t in OPEN:
            depth += 1
        elif t in (")", "]", "}"):
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced bracket at line {toks[i].line}")


def split_args(toks, lo, hi):
    """The comma-separated arguments between the brackets at `lo` and `hi`, as (start, end)."""
    args, start, j = [], lo + 1, lo + 1
    while j < hi:
        t = toks[j]
        if t.kind == "punct" and t.text in OPEN:
            j = matching(toks, j) + 1
            continue
        if t.kind == "punct" and t.text == ",":
            args.append((start, j))
            start = j + 1
        j += 1
    if start < hi:
        args.append((start, hi))
    return args


def is_p(t, text):
    return t.kind == "punct" and t.text == text


def is_i(t, text):
    return t.kind == "ident" and t.text == text


def skip_item(toks, j):
    """Index of the last token of the item starting at `j` (its `;` or closing brace)."""
    while j < len(toks):
        t = toks[j]
        if is_p(t, ";"):
            return j
        if t.kind == "punct" and t.text in ("(", "["):
            j = matching(toks, j) + 1
            continue
        if is_p(t, "{"):
            return matching(toks, j)
        j += 1
    return j


def strip_test_code(toks):
    """The tokens without `#[cfg(test)]` items and the recording fakes (`impl … Fake… {…}`: what
    tests drive, never the driver); also the names of `#[cfg(test)] mod x;` files."""
    out, test_mods, i = [], [], 0
    while i < len(toks):
        if is_i(toks[i], "impl"):
            j = i + 1
            while j < len(toks) and not is_p(toks[j], "{") and not is_p(toks[j], ";"):
                if toks[j].kind == "ident" and toks[j].text.startswith("Fake"):
                    break
                j += 1
            if j < len(toks) and toks[j].kind == "ident":
                i = skip_item(toks, i) + 1
                continue
        if (
            is_p(toks[i], "#")
            and i + 6 < len(toks)
            and is_p(toks[i + 1], "[")
            and is_i(toks[i + 2], "cfg")
            and is_p(toks[i + 3], "(")
            and is_i(toks[i + 4], "test")
            and is_p(toks[i + 5], ")")
        ):
            j = matching(toks, i + 1) + 1
            while j < len(toks) and is_p(toks[j], "#"):  # further attributes
                j = matching(toks, j + 1) + 1
            if is_i(toks[j], "pub"):  # a visibility: `pub`, `pub(crate)`
                j += 1
                if is_p(toks[j], "("):
                    j = matching(toks, j) + 1
            if is_i(toks[j], "mod") and is_p(toks[j + 2], ";"):
                test_mods.append(toks[j + 1].text)
            i = skip_item(toks, j) + 1
            continue
        out.append(toks[i])
        i += 1
    return out, test_mods


# ---------------------------------------------------------------------------------------------
# Reading the text of a message argument.


class Text(str):
    """A message text and where it is written (`where`: (path, line)), when that is known."""

    where = None


def text_at(value, path, tok):
    t = Text(value)
    t.where = (path, tok.line)
    return t


CONVERSIONS = ("into", "to_string", "to_owned", "clone", "as_str", "as_ref")
# The plumbing of src/error.rs: these build an error from a context their callers give, and the
# callers (`.context(…)`, `Error::exec(…)`, `Error::from_status`) are read where they are.
PLUMBING = {("src/error.rs", "io"), ("src/error.rs", "exec"), ("src/error.rs", "context"), ("src/error.rs", "from_status")}
# Texts relayed from a cache of an earlier answer whose messages are read where they were made:
# (file, function) -> why.
RELAYS = {
    ("src/pool/nfs/mod.rs", "ensure_within"): "the remembered answer of the NFS server probe (export.rs)",
    ("src/agent/local.rs", "noted_condition"): "a pool's Condition::Abnormal or a stuck freeze's message (node/freeze.rs), each read where it is made",
}


class Reader:
    """Turns an argument expression into its possible texts (static parts, `…` for the rest)."""

    def __init__(self, files):
        self.files = files  # path -> tokens
        self.functions = {}  # name -> [(path, fn token index, body open, body close)]
        for path, toks in files.items():
            for k, t in enumerate(toks):
                if is_i(t, "fn") and k + 1 < len(toks) and toks[k + 1].kind == "ident":
                    j = k
                    while j < len(toks) and not is_p(toks[j], "{") and not is_p(toks[j], ";"):
                        if toks[j].kind == "punct" and toks[j].text in ("(", "["):
                            j = matching(toks, j)
                        j += 1
                    if j < len(toks) and is_p(toks[j], "{"):
                        self.functions.setdefault(toks[k + 1].text, []).append((path, k, j, matching(toks, j)))
        self.consts = {}  # name -> value of each `const NAME: &str = "…";`
        for toks in files.values():
            for k in range(len(toks) - 6):
                if is_i(toks[k], "const") and toks[k + 1].kind == "ident":
                    j = k + 2
                    while j < len(toks) and not is_p(toks[j], "=") and not is_p(toks[j], ";"):
                        j += 1
                    if j + 2 < len(toks) and is_p(toks[j], "=") and toks[j + 1].kind == "str" and is_p(toks[j + 2], ";"):
                        self.consts[toks[k + 1].text] = toks[j + 1].value
        self.unread = []  # (path, line, why)

    def enclosing_fn(self, path, at):
        """(name, fn index, body open, body close) of the innermost function holding token `at`."""
        if not hasattr(self, "by_file"):
            self.by_file = {}
            for name, defs in self.functions.items():
                for p, k, lo, hi in defs:
                    self.by_file.setdefault(p, []).append((name, k, lo, hi))
        best = None
        for name, k, lo, hi in self.by_file.get(path, []):
            if lo < at < hi and (best is None or lo > best[2]):
                best = (name, k, lo, hi)
        return best

    def texts(self, path, toks, lo, hi, depth=0):
        """Possible texts of the expression toks[lo:hi]."""
        while lo < hi and (is_p(toks[lo], "&") or is_p(toks[lo], "*")):
            lo += 1
        if lo >= hi or depth > 8:
            return [WILD]
        while hi - lo >= 4 and is_p(toks[hi - 1], ")") and is_p(toks[hi - 2], "(") and toks[hi - 3].text in CONVERSIONS and is_p(toks[hi - 4], "."):
            hi -= 4
        t = toks[lo]
        if t.kind == "str" and hi == lo + 1:
            return [text_at(t.value, path, t)]
        if is_i(t, "format") and is_p(toks[lo + 1], "!") and matching(toks, lo + 2) == hi - 1:
            return self.format_texts(path, toks, lo, hi, depth)
        if is_i(t, "String") and is_p(toks[lo + 1], "::") and toks[lo + 2].text in ("from", "new"):
            if toks[lo + 2].text == "new":
                return [""]
            return self.texts(path, toks, lo + 4, matching(toks, lo + 3), depth)
        if is_i(t, "move") or is_p(t, "|") or is_p(t, "||"):  # a closure: its body
            j = lo + 1 if not is_i(t, "move") else lo + 2
            if is_p(toks[j - 1], "|"):
                while not is_p(toks[j], "|"):
                    j += 1
                j += 1
            return self.texts(path, toks, j, hi, depth + 1)
        if is_p(t, "{") and matching(toks, lo) == hi - 1:  # a block: its templates
            return self.templates_in(path, toks, lo + 1, hi - 1, depth) or [WILD]
        if t.kind == "ident" and hi == lo + 1 and t.text in self.consts:  # a constant
            return [text_at(self.consts[t.text], path, t)]
        if t.kind == "ident" and hi == lo + 1 and t.text[0].isupper():  # `None`, another constant
            return [] if t.text == "None" else [WILD]
        if t.kind == "ident" and hi == lo + 1:  # a variable or parameter
            return self.follow_name(path, toks, lo, t.text, depth)
        if t.kind == "ident" and hi == lo + 3 and is_p(toks[lo + 1], "(") and is_p(toks[lo + 2], ")"):
            # `what()`: a closure parameter called
            return self.follow_name(path, toks, lo, t.text, depth)
        called = self.called_fn(toks, lo, hi, path)
        if called is not None:
            return called
        if is_i(t, "if") or is_i(t, "match"):  # each branch's texts (`…` for one that is none)
            found = []
            for blo, bhi in self.branches(toks, lo, hi):
                found += self.texts(path, toks, blo, bhi, depth + 1) or [WILD]
            return found or [WILD]
        if any(tk.kind == "str" or is_i(tk, "format") for tk in toks[lo:hi]):
            return self.templates_in(path, toks, lo, hi, depth) or [WILD]
        return [WILD]

    def branches(self, toks, lo, hi):
        """(start, end) of the value of each branch of the `if … else …` or `match … {…}` at lo."""
        out = []
        if is_i(toks[lo], "if"):
            j = lo
            while j < hi and is_i(toks[j], "if"):
                while j < hi and not is_p(toks[j], "{"):
                    j = matching(toks, j) + 1 if toks[j].kind == "punct" and toks[j].text in ("(", "[") else j + 1
                close = matching(toks, j)
                out.append((j + 1, close))
                j = close + 1
                if j < hi and is_i(toks[j], "else"):
                    j += 1
                    if j < hi and is_p(toks[j], "{"):
                        close = matching(toks, j)
                        out.append((j + 1, close))
                        j = close + 1
                else:
                    break
            return out
        j = lo
        while j < hi and not is_p(toks[j], "{"):
            j = matching(toks, j) + 1 if toks[j].kind == "punct" and toks[j].text in ("(", "[") else j + 1
        end = matching(toks, j)
        j += 1
        while j < end:
            if toks[j].kind == "punct" and toks[j].text in ("(", "["):
                j = matching(toks, j) + 1
                continue
            if is_p(toks[j], "=>"):
                b = j + 1
                if is_p(toks[b], "{"):
                    close = matching(toks, b)
                    out.append((b + 1, close))
                    j = close + 1
                    continue
                e = b
                while e < end and not is_p(toks[e], ","):
                    e = matching(toks, e) + 1 if toks[e].kind == "punct" and toks[e].text in OPEN else e + 1
                out.append((b, e))
                j = e
            j += 1
        return out

    def called_fn(self, toks, lo, hi, path=None):
        """Texts of `f(…)` / `self.f(…)` / `a::f(…)` when f is one of ours returning a text (a
        definition in the caller's file first: names repeat across modules)."""
        while hi - lo > 2 and (is_p(toks[hi - 1], "?") or (is_i(toks[hi - 1], "await") and is_p(toks[hi - 2], "."))):
            hi -= 1 if is_p(toks[hi - 1], "?") else 2
        if not is_p(toks[hi - 1], ")"):
            return None
        open_ = None
        depth = 0
        for k in range(hi - 1, lo - 1, -1):
            if is_p(toks[k], ")"):
                depth += 1
            elif is_p(toks[k], "("):
                depth -= 1
                if depth == 0:
                    open_ = k
                    break
        if open_ is None or open_ - 1 < lo or toks[open_ - 1].kind != "ident":
            return None
        j = open_ - 2
        while j >= lo and (is_p(toks[j], ".") or is_p(toks[j], "::") or toks[j].kind == "ident"):
            j -= 1
        if j >= lo:  # more than a path before the call
            return None
        name = toks[open_ - 1].text
        defs = self.functions.get(name, [])
        if any(p == path for p, _, _, _ in defs):
            defs = [d for d in defs if d[0] == path]
        elif open_ - 3 >= lo and is_p(toks[open_ - 2], "::"):  # `module::f`: that module's
            module = toks[open_ - 3].text
            defs = [d for d in defs if module in d[0].split(os.sep)[-1] or module in d[0].split(os.sep)[-2:-1]] or defs
        found = []
        for p, _, blo, bhi in defs:
            ftoks = self.files[p]
            # only functions that return a text: their signature says String
            sig = ftoks[blo - 6 : blo]
            if any(is_i(x, "String") for x in sig):
                found += self.templates_in(p, ftoks, blo + 1, bhi, 1, made_only=True)
        return found or None

    def format_texts(self, path, toks, lo, hi, depth):
        """The template of format!(…) at lo, each placeholder `…` unless it names a local `let`
        holding a single template (`let what = format!(…)` then `format!("{what}: …")`)."""
        args = split_args(toks, lo + 2, hi - 1)
        first = toks[args[0][0]]
        if first.kind != "str":
            return [WILD]
        positional = [a for a in args[1:] if not (a[1] - a[0] >= 2 and toks[a[0]].kind == "ident" and is_p(toks[a[0] + 1], "="))]
        named = {toks[a[0]].text: a for a in args[1:] if a not in positional}
        template = first.value.replace("{{", "\0").replace("}}", "\1")
        outs, pos = [""], 0
        for piece in re.split(r"(\{[^{}]*\})", template):
            if not (piece.startswith("{") and piece.endswith("}")):
                outs = [o + piece.replace("\0", "{").replace("\1", "}") for o in outs]
                continue
            key = piece[1:-1].split(":")[0]
            name = None
            if key == "":
                arg = positional[pos] if pos < len(positional) else None
                pos += 1
            elif key.isdigit():
                arg = positional[int(key)] if int(key) < len(positional) else None
            elif key in named:
                a = named[key]
                arg = (a[0] + 2, a[1])
            else:
                arg, name = None, key
            if arg is not None and arg[1] - arg[0] == 1 and toks[arg[0]].kind == "ident":
                name = toks[arg[0]].text
            sub = [WILD]
            if name and self.local_let(path, toks, lo, name) is None:
                got = self.param_texts(path, toks, lo, name, depth)
                if got:
                    sub = got
            local = self.local_let(path, toks, lo, name) if name else None
            # only a local that is itself a text (a literal, a format!, an if or match over those)
            if local is not None and (toks[local[0]].kind == "str" or toks[local[0]].text in ("format", "if", "match")):
                got = self.texts(path, toks, local[0], local[1], depth + 1)
                if 1 <= len(got) <= 4:  # a local's few variants each make a message
                    sub = got
            outs = [o + x for o in outs for x in sub]
        return [text_at(o, path, toks[lo]) for o in outs]

    def param_texts(self, path, toks, at, name, depth):
        """Texts a helper's callers give its parameter `name` used at `at` in a placeholder: of a
        closure bound by `let bad = |m: String| …` (each `bad(…)` call in the function), or of a
        function (each call passing a plain literal, such as `require("volume_id", …)`). None
        when a caller passes something else or the variants would be too many."""
        if depth > 4:
            return None
        fn = self.enclosing_fn(path, at)
        if not fn:
            return None
        lo, hi = fn[2], fn[3]
        # a closure around `at` with `name` among its parameters
        for k in range(at - 1, lo, -1):
            if not (is_p(toks[k], "|") and is_p(toks[k - 1], "=") and is_i(toks[k - 3], "let")):
                continue
            close = k + 1
            while not is_p(toks[close], "|"):
                close += 1
            params = split_args(toks, k, close)
            index = next((n for n, (s, _) in enumerate(params) if is_i(toks[s], name)), None)
            end = close + 1
            while end < hi and not is_p(toks[end], ";"):
                if toks[end].kind == "punct" and toks[end].text in OPEN:
                    end = matching(toks, end)
                end += 1
            if index is None or not (close < at < end):
                continue
            clos = toks[k - 2].text
            found = []
            for j in range(end, hi):
                if is_i(toks[j], clos) and is_p(toks[j + 1], "("):
                    args = split_args(toks, j + 1, matching(toks, j + 1))
                    if index >= len(args):
                        return None
                    got = self.texts(path, toks, args[index][0], args[index][1], depth + 1)
                    if not got or all(g == WILD for g in got):
                        return None
                    found += got
            return found if 0 < len(found) <= 32 else None
        # a parameter of the function: callers passing literals
        open_ = fn[1] + 2
        while not is_p(toks[open_], "("):
            open_ += 1
        params = split_args(toks, open_, matching(toks, open_))
        index, pos = None, 0
        for s, e in params:
            if any(is_i(x, "self") for x in toks[s:e]) and e - s <= 4:
                continue
            if is_i(toks[s], name):
                index = pos
            pos += 1
        if index is None:
            return None
        found = []
        for p, ftoks in self.files.items():
            for j in range(1, len(ftoks) - 1):
                if is_i(ftoks[j], fn[0]) and is_p(ftoks[j + 1], "(") and not is_i(ftoks[j - 1], "fn"):
                    args = split_args(ftoks, j + 1, matching(ftoks, j + 1))
                    if index >= len(args):
                        return None
                    s, e = args[index]
                    while s < e and is_p(ftoks[s], "&"):
                        s += 1
                    if e - s == 1 and ftoks[s].kind == "str":
                        found.append(text_at(ftoks[s].value, p, ftoks[s]))
                    elif e - s == 1 and ftoks[s].text in self.consts:
                        found.append(text_at(self.consts[ftoks[s].text], p, ftoks[s]))
                    elif e - s == 1 and ftoks[s].kind == "ident":  # passed on by another helper
                        got = self.param_texts(p, ftoks, s, ftoks[s].text, depth + 1)
                        if not got:
                            return None
                        found += got
                    else:
                        return None
        found = list(dict.fromkeys(found))
        # a few (a noun, a field) make distinct messages; many are steps of one message
        return found if 0 < len(found) <= 8 else None

    def local_let(self, path, toks, at, name):
        """(start, end) of the expression of the `let name = …;` before `at` in its function."""
        fn = self.enclosing_fn(path, at)
        lo = fn[2] if fn else 0
        for k in range(at - 1, lo, -1):
            if is_i(toks[k], "let") and (is_i(toks[k + 1], name) or (is_i(toks[k + 1], "mut") and is_i(toks[k + 2], name))):
                j = k + 1
                while not is_p(toks[j], "="):
                    j += 1
                end = j + 1
                while not is_p(toks[end], ";"):
                    if toks[end].kind == "punct" and toks[end].text in OPEN:
                        end = matching(toks, end)
                    end += 1
                return (j + 1, end)
        return None

    def templates_in(self, path, toks, lo, hi, depth, made_only=False):
        """Every format!/literal text in toks[lo:hi] (the branches of an if/match, a block);
        `made_only`: in the body of a function returning a String, only the literals made into
        one (`"…".into()`, `.to_string()`, `String::from("…")`), not those it compares with."""
        found, j = [], lo
        while j < hi:
            t = toks[j]
            if is_i(t, "format") and j + 2 < hi and is_p(toks[j + 1], "!"):
                close = matching(toks, j + 2)
                found += self.format_texts(path, toks, j, close + 1, depth)
                j = close + 1
                continue
            if t.kind == "str" and made_only:
                made = (j + 3 < hi and is_p(toks[j + 1], ".") and toks[j + 2].text in CONVERSIONS) or (
                    is_p(toks[j - 1], "(") and toks[j - 2].text == "from" and toks[j - 4].text == "String"
                )
                if made:
                    found.append(text_at(t.value, path, t))
            elif t.kind == "str":
                prev = toks[j - 1]
                # a literal compared or searched for is not a text of the message
                if not (prev.kind == "punct" and prev.text in ("==", "!=")) and not (
                    is_p(prev, "(") and toks[j - 2].text in ("starts_with", "ends_with", "contains", "find", "strip_prefix", "get", "join", "split", "replace")
                ):
                    found.append(text_at(t.value, path, t))
            j += 1
        return found

    def follow_name(self, path, toks, at, name, depth):
        """Texts of the variable `name` used at token `at`: its `let`; a binding of a pattern
        (a relay of a text made elsewhere: `…`), or of a `match` over one of our functions
        (that function's texts); or a parameter (what each caller passes in its place)."""
        local = self.local_let(path, toks, at, name)
        fn = self.enclosing_fn(path, at)
        lo = fn[2] if fn else 0
        if local is not None:
            return self.texts(path, toks, local[0], local[1], depth + 1) or [WILD]
        if fn and (path, fn[0]) in RELAYS:
            return [WILD]
        for k in range(at - 1, lo, -1):
            if is_i(toks[k], name) and is_p(toks[k + 1], "=>"):  # `other => …`: the arm's own value
                return [WILD]
            if is_i(toks[k], name) and (is_p(toks[k + 1], ")") or is_p(toks[k + 1], "|") or is_p(toks[k + 1], ",")):
                # a binding: `Error::X(m) =>`, `Some(t) =>`, `|e|`, `Err(m) =>`
                owner = toks[k - 2] if k >= 2 else None
                if is_p(toks[k + 1], "|") or (
                    owner is not None and owner.kind == "ident" and (owner.text in CODES or owner.text in ("Err", "Ok", "Abnormal"))
                ):
                    return [WILD]
                if owner is not None and is_i(owner, "Some"):
                    scrut = self.scrutinee(toks, k, lo)
                    if scrut is not None:
                        got = self.called_fn(toks, scrut[0], scrut[1], path)
                        if got:
                            return got
        if not fn:
            self.unread.append((path, toks[at].line, f"cannot find where `{name}` gets its text"))
            return []
        # a parameter: what each caller passes in its place
        k, open_ = fn[1], fn[1] + 2
        while not is_p(toks[open_], "("):
            open_ += 1
        params = split_args(toks, open_, matching(toks, open_))
        index, pos = None, 0
        for s, e in params:
            if any(is_i(x, "self") for x in toks[s:e]) and e - s <= 4:
                continue
            if is_i(toks[s], name) or (is_i(toks[s], "mut") and is_i(toks[s + 1], name)):
                index = pos
            pos += 1
        if index is None:
            self.unread.append((path, toks[at].line, f"cannot find where `{name}` gets its text"))
            return []
        fname = fn[0]
        if (path, fname) in PLUMBING:
            return []
        found, callers = [], 0
        for p, ftoks in self.files.items():
            for j in range(1, len(ftoks) - 1):
                if is_i(ftoks[j], fname) and is_p(ftoks[j + 1], "(") and not is_i(ftoks[j - 1], "fn"):
                    args = split_args(ftoks, j + 1, matching(ftoks, j + 1))
                    if index < len(args):
                        callers += 1
                        found += self.texts(p, ftoks, args[index][0], args[index][1], depth + 1)
        if not callers:
            self.unread.append((path, toks[at].line, f"no caller of {fname} gives `{name}` a text"))
        return found

    def scrutinee(self, toks, at, lo):
        """(start, end) of the expression of the `match … {` whose arm binds at `at`, or of the
        `if let Some(x) = … {` / `let Some(x) = … else` that binds it."""
        if is_i(toks[at - 3], "let") and is_p(toks[at + 2], "="):
            end = at + 3
            while end < len(toks) and not is_p(toks[end], "{") and not is_i(toks[end], "else") and not is_p(toks[end], ";"):
                if toks[end].kind == "punct" and toks[end].text in ("(", "["):
                    end = matching(toks, end)
                end += 1
            return (at + 3, end)
        depth = 0
        for k in range(at, lo, -1):
            if is_p(toks[k], "}"):
                depth += 1
            elif is_p(toks[k], "{"):
                if depth == 0:
                    for m in range(k - 1, lo, -1):
                        if is_i(toks[m], "match"):
                            return (m + 1, k)
                        if is_p(toks[m], ";") or is_p(toks[m], "}"):
                            return None
                    return None
                depth -= 1
        return None

    def err_texts_of(self, path, toks, at, depth, same_file=False):
        """Texts of `Err(…)` in the function called just before `.map_err(` at `at` (with
        same_file, only a function of that name in the caller's file)."""
        j = at - 1  # the `.` before map_err
        fn = self.enclosing_fn(path, at)
        if fn and (path, fn[0]) in RELAYS:
            return [WILD]
        if not is_p(toks[j - 1], ")"):
            return None
        depth_, name = 0, None
        for k in range(j - 1, -1, -1):
            if is_p(toks[k], ")"):
                depth_ += 1
            elif is_p(toks[k], "("):
                depth_ -= 1
                if depth_ == 0:
                    name = toks[k - 1].text
                    break
        found = []
        for p, _, lo, hi in self.functions.get(name, []):
            if same_file and p != path:
                continue
            ftoks = self.files[p]
            for m in range(lo, hi):
                if is_i(ftoks[m], "Err") and is_p(ftoks[m + 1], "("):
                    close = matching(ftoks, m + 1)
                    found += self.texts(p, ftoks, m + 2, close, depth + 1)
                if ftoks[m].text in ("ok_or_else", "ok_or") and is_p(ftoks[m + 1], "("):
                    close = matching(ftoks, m + 1)
                    found += self.texts(p, ftoks, m + 2, close, depth + 1)
        return found or None


def in_pattern(toks, close):
    """Whether the call closing at `close` is part of a pattern: followed (through the closing
    brackets of `Err(…)`, `Some(…)`) by `=>`, `|`, a match guard, or the `=` of a `let`."""
    j = close + 1
    while j < len(toks) and is_p(toks[j], ")"):
        j += 1
    if j >= len(toks):
        return False
    t = toks[j]
    return is_p(t, "=>") or is_p(t, "|") or is_i(t, "if") or (is_p(t, "=") and any(is_i(x, "let") for x in toks[max(0, close - 12) : close]))


def messages(files):
    """Every message found: (path, line, code, text), and the calls whose text was not found."""
    reader = Reader(files)
    found = []
    for path, toks in files.items():
        n = len(toks)
        for i in range(2, n - 3):
            try:
                t = toks[i]
                code = None
                if t.kind == "ident" and is_p(toks[i - 1], "::"):
                    owner = toks[i - 2].text
                    if owner == "Error" and t.text in CODES:
                        code = CODES[t.text]
                    elif owner == "Error" and t.text in ("exec", "io"):
                        code = "INTERNAL"
                    elif owner == "Status" and t.text in STATUS_CODES:
                        code = STATUS_CODES[t.text]
                elif is_p(t, ".") and is_i(toks[i + 1], "context") and is_p(toks[i + 2], "("):
                    code, i = ("INTERNAL" if path != "src/main.rs" else STARTUP), i + 1
                if t.kind == "ident" and t.text == "Abnormal" and is_p(toks[i - 1], "::") and toks[i - 2].text == "Condition":
                    code = CONDITION
                elif is_i(t, "VolumeCondition") and is_p(toks[i + 1], "{"):
                    # `VolumeCondition { abnormal: true, message: … }`: the message field's expression
                    close = matching(toks, i + 1)
                    fields = {toks[a].text: (a + 2, b) for a, b in split_args(toks, i + 1, close) if b - a > 2}
                    if "message" in fields and "abnormal" in fields and is_i(toks[fields["abnormal"][0]], "true"):
                        s_, e_ = fields["message"]
                        for text in dict.fromkeys(reader.texts(path, toks, s_, e_)):
                            where = getattr(text, "where", None) or (path, t.line)
                            found.append((where[0], where[1], CONDITION, str(text)))
                    continue
                if code is None:
                    continue
                fn = reader.enclosing_fn(path, i)
                if fn and (path, fn[0]) in PLUMBING:
                    continue
                nxt = toks[i + 1]
                if is_p(nxt, "("):
                    close = matching(toks, i + 1)
                    args = split_args(toks, i + 1, close)
                    if not args or in_pattern(toks, close):
                        continue
                    s, e = args[0]
                    if e - s == 1 and toks[s].text in ("_", ".."):
                        continue
                    texts = reader.texts(path, toks, s, e)
                    for text in dict.fromkeys(texts):
                        if text != "":  # an empty text is a placeholder replaced before anyone sees it
                            where = getattr(text, "where", None) or (path, toks[i].line)
                            found.append((where[0], where[1], code, str(text)))
                elif is_p(toks[i - 3], "(") and is_i(toks[i - 4], "map_err") and is_p(nxt, ")"):
                    # `.map_err(Error::X)`: the texts are the Err(…) of the function called before
                    texts = reader.err_texts_of(path, toks, i - 4, 0)
                    if texts is None:
                        reader.unread.append((path, t.line, f"cannot find the texts that .map_err({toks[i-2].text}::{t.text}) wraps"))
                        continue
                    for text in dict.fromkeys(texts):
                        where = getattr(text, "where", None) or (path, t.line)
                        found.append((where[0], where[1], code, str(text)))
            except (ValueError, IndexError, KeyError, AttributeError) as e:
                # new syntax the checker does not know: a failure to look at, not a pass
                reader.unread.append((path, toks[i].line, f"the checker cannot read this call ({e!r})"))
    for path in STARTUP_FILES:
        if path in files:
            found += startup_messages(reader, path, files[path])
    return found, reader.unread


def startup_messages(reader, path, toks):
    """(path, line, STARTUP, text) of each start-up refusal in one of STARTUP_FILES."""
    found = []

    def add(texts, tok):
        for text in dict.fromkeys(texts):
            if text != "":
                where = getattr(text, "where", None) or (path, tok.line)
                found.append((where[0], where[1], STARTUP, str(text)))

    n = len(toks)
    for i in range(1, n - 3):
        t = toks[i]
        try:
            if t.kind != "ident" and not is_p(t, "#"):
                continue
            if t.text in ("bail", "anyhow", "eprintln") and is_p(toks[i + 1], "!") and is_p(toks[i + 2], "("):
                add(reader.format_texts(path, toks, i, matching(toks, i + 2) + 1, 0), t)
            elif is_p(t, "#") and is_p(toks[i + 1], "[") and is_i(toks[i + 2], "error") and is_p(toks[i + 3], "("):
                lit = toks[i + 4]
                if lit.kind == "str":  # `#[error("cannot read {path}: {source}")]`
                    add([text_at(re.sub(r"\{[^{}]*\}", WILD, lit.value), path, lit)], lit)
            elif path == "src/main.rs" and t.text == "with_context" and is_p(toks[i - 1], ".") and is_p(toks[i + 1], "("):
                close = matching(toks, i + 1)
                add(reader.texts(path, toks, i + 2, close), t)
            elif t.text in ("ConfigError", "Err") and is_p(toks[i + 1], "(") and not is_i(toks[i - 1], "struct"):
                close = matching(toks, i + 1)
                args = split_args(toks, i + 1, close)
                if not args or in_pattern(toks, close):
                    continue
                s_, e_ = args[0]
                first = toks[s_]
                if first.kind == "ident" and (first.text in CODED or first.text in CODES) and e_ - s_ > 1:
                    continue  # Err(Error::X(…)), Err(ConfigError(…)): read where they are made
                if e_ - s_ == 1 and first.kind == "ident" and first.text not in reader.consts:
                    continue  # Err(e): a relay of a value made elsewhere (read there)
                add(reader.texts(path, toks, s_, e_), t)
            elif t.text in ("map_err", "ok_or_else") and is_p(toks[i - 1], ".") and is_p(toks[i + 1], "("):
                close = matching(toks, i + 1)
                if is_i(toks[i + 2], "ConfigError") and close == i + 3:
                    # `.map_err(ConfigError)`: the Err(…) texts of the function called before, in this file
                    texts = reader.err_texts_of(path, toks, i, 0, same_file=True)
                    if texts is None:
                        reader.unread.append((path, t.line, "cannot find the texts that .map_err(ConfigError) wraps"))
                    else:
                        add(texts, t)
                    continue
                if not (is_p(toks[i + 2], "|") or is_p(toks[i + 2], "||")):
                    continue  # `.map_err(Error::X)` is the main pass's; `.map_err(f)` passes a value on
                j = i + 3
                if is_p(toks[i + 2], "|"):
                    while not is_p(toks[j], "|"):
                        j += 1
                    j += 1
                if any(x.kind == "ident" and x.text in ("Error", "Status", "TlsError", "ConfigError") for x in toks[j:close]):
                    continue  # the closure builds a coded error or a ConfigError: read where it does
                add(reader.texts(path, toks, j, close), t)
        except (ValueError, IndexError, KeyError, AttributeError) as e:
            reader.unread.append((path, t.line, f"the checker cannot read this start-up message ({e!r})"))
    return found


LEX_ERRORS = []  # (path, line, why) of files the lexer could not read


def load_sources(root):
    """path -> tokens of every .rs file under root/src, test code left out."""
    files, test_files = {}, set()
    for dirpath, _, names in os.walk(os.path.join(root, "src")):
        for name in sorted(names):
            if not name.endswith(".rs"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                src = f.read()
            try:
                toks, test_mods = strip_test_code(lex(src))
            except (ValueError, IndexError) as e:
                LEX_ERRORS.append((os.path.relpath(path, root), 1, f"the checker cannot read this file ({e!r})"))
                toks, test_mods = [], []
            files[path] = toks
            stem = name[:-3]
            base = dirpath if stem in ("mod", "lib", "main") else os.path.join(dirpath, stem)
            for m in test_mods:
                test_files.add(os.path.join(base, m + ".rs"))
                test_files.add(os.path.join(base, m, "mod.rs"))
    for p in test_files:
        files.pop(p, None)
    return {os.path.relpath(p, root): t for p, t in sorted(files.items())}


# ---------------------------------------------------------------------------------------------
# The catalogue and the matching rule.


def normalize(text):
    text = re.sub(r"\s+", " ", text.replace("...", WILD)).strip()
    text = re.sub(WILD + r"(\s*" + WILD + ")+", WILD, text)
    return text


def catalogue(md):
    """(code, normalized text) of each entry of the catalogue's by-message tables: rows whose
    first cell opens with a code span, under a heading that starts with the code (or a deeper
    heading below it)."""
    entries, code, level = set(), None, 0
    for line in md.splitlines():
        h = re.match(r"(#+)\s+`?([A-Z_]*)", line)
        if h:
            if h.group(2) in ALL_CODES:
                code, level = h.group(2), len(h.group(1))
            elif len(h.group(1)) <= level:
                code, level = None, 0
            continue
        m = re.match(r"\|\s*(`+)(.*?)\1", line)
        if m and code:
            text = m.group(2)
            if len(m.group(1)) > 1:  # ``a `b` c``: the spaces padding a double-backtick span
                text = text.strip()
            entries.add((code, normalize(text)))
    return entries


def is_relay(text):
    """A text with no word of its own (`{}`, `{peer}: {m}`): another message passed on, which
    has its entry where it is made."""
    return not re.search(r"[A-Za-z]", text)


def missing(found, entries):
    return [f for f in found if not is_relay(f[3]) and (f[2], normalize(f[3])) not in entries]


def run(root, doc, show_all=False, show_stale=False):
    files = load_sources(root)
    found, unread = messages(files)
    unread = LEX_ERRORS + unread
    with open(doc, encoding="utf-8") as f:
        entries = catalogue(f.read())
    if show_all:
        for path, line, code, text in found:
            print(f"{path}:{line}: {code} {normalize(text)}")
    lack = missing(found, entries)
    distinct = {(c, normalize(t)) for _, _, c, t in found if not is_relay(t)}
    known = {(c, normalize(t)) for _, _, c, t in found} & entries
    stale = sorted(entries - distinct)
    for path, line, code, text in lack:
        print(f"{path}:{line}: {code} `{normalize(text)}`: no entry in {os.path.relpath(doc)}")
    for path, line, why in unread:
        print(f"{path}:{line}: {why}: teach tests/deploy/check_messages.py where it comes from")
    print(
        f"check_messages: {len(found)} messages at {len({(p, l) for p, l, _, _ in found})} places, "
        f"{len(distinct)} distinct (and {sum(1 for f in found if is_relay(f[3]))} relays of other messages), {len(known)} in the catalogue, {len(lack)} missing, "
        f"{len(unread)} unread; catalogue entries matching no message: {len(stale)}"
    )
    if stale and not show_stale:
        print("  (tests/deploy/check_messages.py --stale lists the entries matching no message)")
    for code, text in stale if show_stale else []:
        print(f"  (no message has it any more: {code} `{text}`)")
    return 1 if lack or unread else 0


SELF_TEST_SRC = r'''
//! made up
use crate::error::Error;
fn open(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidArgument("volume_id is required".into()));
    }
    match thing() {
        Err(Error::NotFound(_)) => {}
        Err(Error::Aborted(m)) | Err(Error::Unavailable(m)) => return Err(Error::Internal(m)),
        _ => {}
    }
    let why = if id.len() > 3 { format!("volume {} is too long", bounded(id)) } else { "short".to_string() };
    fail(why)?;
    run().context(|| format!("creating {id}"))?;
    Err(Error::NotFound(format!(
        "volume {} does not exist \
         on this node",
        bounded(id),
    )))
}
fn fail(msg: String) -> Result<()> {
    Err(Error::FailedPrecondition(msg))
}
fn check(v: &str) -> Result<(), String> {
    if v == "x" { return Err(format!("value {v:?} is not allowed")); }
    Ok(())
}
fn user(v: &str) -> Result<()> {
    check(v).map_err(Error::InvalidArgument)?;
    let what = format!("no pool can take {}", v);
    if v.is_empty() { return Err(Error::Unavailable(format!("{what}; retry"))); }
    if v.len() > 9 { return Err(Error::FailedPrecondition(self.gone())); }
    Err(tonic::Status::permission_denied(format!("certificate {} is not node {}'s", a, b)).into())
}
fn gone(&self) -> String {
    format!("pool {} is gone", self.name)
}
fn orphan(text: String) -> Error {
    Error::Aborted(text)
}
fn conf(name: &str) -> Result<()> {
    let bad = |m: String| Error::InvalidArgument(format!("pool {name:?}: {m}"));
    if name.is_empty() {
        return Err(bad("a pool needs `path`".into()));
    }
    Err(bad(format!("name {} is too long", name.len())))
}
const PARAM_POOL: &str = "pool";
fn need(key: &str) -> Error {
    Error::InvalidArgument(format!("parameter {key} is empty"))
}
fn callers() -> Vec<Error> {
    vec![need(PARAM_POOL), need("kind")]
}
fn freeze(e: &ExecError) -> Error {
    let why = match e {
        ExecError::Failed { .. } => "it is busy".to_owned(),
        other => other.to_string(),
    };
    Error::Aborted(format!("cannot freeze ({why})"))
}
async fn health(&self) -> Result<VolumeCondition> {
    if let Some(m) = self.stuck().await {
        return Ok(VolumeCondition { abnormal: true, message: m });
    }
    Ok(match self.probe() {
        Ok(()) => VolumeCondition { abnormal: false, message: "volume is healthy".into() },
        Err(e) => Condition::Abnormal(format!("pool {} does not answer: {e}", self.name)),
    })
}
async fn stuck(&self) -> Option<String> {
    Some(format!("a freeze began {} s ago", 3))
}
impl Mounter for FakeMounter {
    fn mount(&self) -> Result<()> { Err(Error::Internal("a fake's failure".into())) }
}
#[cfg(test)]
mod tests {
    fn t() { let _ = Error::Unimplemented("only in a test".into()); }
}
'''

# src/main.rs and src/config.rs of the made-up tree: start-up refusals.
SELF_TEST_MAIN = r'''
//! made up
fn start(args: Args) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config)?;
    if cfg.pools.is_empty() {
        bail!("the configuration names no pool in {}", args.config.display());
    }
    let id = hostname::get().context("cannot read the hostname")?;
    let l = bind(&args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    check(&args.listen).map_err(anyhow::Error::msg)?;
    Ok(())
}
'''
SELF_TEST_CONFIG = r'''
//! made up
#[derive(thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);
fn load(path: &Path) -> Result<Config, ConfigError> {
    let src = read(path).map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
    parse(&src).map_err(|ConfigError(m)| ConfigError(format!("{}: {m}", path.display())))?;
    prefix().map_err(ConfigError)?;
    Err(ConfigError("no pool".into()))
}
fn prefix() -> Result<(), String> {
    Err(format!("exec_prefix.{} is empty", 1))
}
'''

SELF_TEST_DOC = '''
# Troubleshooting
## By message
### INVALID_ARGUMENT: parameters
| message | meaning | what to do |
|---|---|---|
| `volume_id is required` | x | y |
| `value … is not allowed` | x | y |
| ``pool …: a pool needs `path` `` | x | y |
| `pool …: name … is too long` | x | y |
| `parameter pool is empty` | x | y |
| `parameter kind is empty` | x | y |
### VOLUME_CONDITION
| `a freeze began … s ago` | x | y |
| `pool … does not answer: …` | x | y |
### ABORTED
| `cannot freeze (it is busy)` | x | y |
| `cannot freeze (…)` | x | y |
### NOT_FOUND: ids
| `volume … does not exist on this node` | x | y |
### FAILED_PRECONDITION
| `volume … is too long` | x | y |
| `short` | x | y |
| `pool … is gone` | x | y |
### INTERNAL
| `creating …` | x | y |
### UNAVAILABLE
| `no pool can take …; retry` | x | y |
### PERMISSION_DENIED
| `certificate … is not node …'s` | x | y |
### STARTUP: refusals
| `the configuration names no pool in …` | x | y |
| `cannot read the hostname` | x | y |
| `cannot listen on …` | x | y |
| `cannot read config …: …` | x | y |
| `exec_prefix.… is empty` | x | y |
| `no pool` | x | y |
'''


def self_test():
    import contextlib
    import io
    import tempfile

    want = {
        ("INVALID_ARGUMENT", "volume_id is required"),
        ("INVALID_ARGUMENT", "value … is not allowed"),
        # a local closure's callers, a helper's literal (or constant) arguments, a match's arms
        ("INVALID_ARGUMENT", "pool …: a pool needs `path`"),
        ("INVALID_ARGUMENT", "pool …: name … is too long"),
        ("INVALID_ARGUMENT", "parameter pool is empty"),
        ("INVALID_ARGUMENT", "parameter kind is empty"),
        ("ABORTED", "cannot freeze (it is busy)"),
        ("ABORTED", "cannot freeze (…)"),
        # volume conditions; a healthy one is no message; an `if let Some(m) = f().await` binding
        ("VOLUME_CONDITION", "a freeze began … s ago"),
        ("VOLUME_CONDITION", "pool … does not answer: …"),
        ("NOT_FOUND", "volume … does not exist on this node"),
        ("FAILED_PRECONDITION", "volume … is too long"),
        ("FAILED_PRECONDITION", "short"),
        ("FAILED_PRECONDITION", "pool … is gone"),
        ("INTERNAL", "creating …"),
        ("INTERNAL", "…"),  # Error::Internal(m) of a matched binding: a relay
        ("UNAVAILABLE", "no pool can take …; retry"),
        ("PERMISSION_DENIED", "certificate … is not node …'s"),
        # start-up refusals (src/main.rs and src/config.rs): bail!, anyhow's contexts,
        # ConfigError(…) and .map_err(ConfigError) over a function answering String errors;
        # `{}: {m}` and `#[error("{0}")]` relay
        ("STARTUP", "the configuration names no pool in …"),
        ("STARTUP", "cannot read the hostname"),
        ("STARTUP", "cannot listen on …"),
        ("STARTUP", "cannot read config …: …"),
        ("STARTUP", "exec_prefix.… is empty"),
        ("STARTUP", "no pool"),
        ("STARTUP", "…"),
        ("STARTUP", "…: …"),
    }
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "src"))
        with open(os.path.join(root, "src", "lib.rs"), "w") as f:
            f.write(SELF_TEST_SRC)
        with open(os.path.join(root, "src", "main.rs"), "w") as f:
            f.write(SELF_TEST_MAIN)
        with open(os.path.join(root, "src", "config.rs"), "w") as f:
            f.write(SELF_TEST_CONFIG)
        found, unread = messages(load_sources(root))
        got = {(c, normalize(t)) for _, _, c, t in found}
        assert not any("only in a test" in t or "fake" in t for _, t in got), "test code or a fake counted"
        assert got == want, f"found {sorted(got)}"
        # a text the checker cannot trace is reported, not guessed
        assert [why for _, _, why in unread] == ["no caller of orphan gives `text` a text"], unread
        lines = {normalize(t): l for _, l, _, t in found}
        assert lines["volume … does not exist on this node"] == 16, lines
        entries = catalogue(SELF_TEST_DOC)
        assert not missing(found, entries), missing(found, entries)
        # a message without its entry fails, named with its line
        doc = os.path.join(root, "t.md")
        with open(doc, "w") as f:
            f.write(SELF_TEST_DOC.replace("| `short` | x | y |\n", ""))
        lack = missing(found, catalogue(open(doc).read()))
        assert [(l, c, t) for _, l, c, t in lack] == [(13, "FAILED_PRECONDITION", "short")], lack
        # a start-up refusal without its entry fails too, and an INTERNAL row is not one for it
        nostart = SELF_TEST_DOC.replace("| `cannot read the hostname` | x | y |\n", "")
        assert [(c, t) for _, _, c, t in missing(found, catalogue(nostart))] == [("STARTUP", "cannot read the hostname")]
        assert len(missing(found, catalogue(nostart + "### INTERNAL\n| `cannot read the hostname` | x | y |\n"))) == 1
        # the same text under another code is not an entry for it
        wrong = SELF_TEST_DOC.replace("### INTERNAL\n", "### ABORTED\n")
        assert [t for _, _, _, t in missing(found, catalogue(wrong))] == ["creating …"]
        # an entry must be the whole text, not a part of it, nor a wider pattern
        part = SELF_TEST_DOC.replace("`volume … does not exist on this node`", "`volume … does not exist`")
        assert len(missing(found, catalogue(part))) == 1
        wide = SELF_TEST_DOC.replace("`volume … does not exist on this node`", "`…`")
        assert len(missing(found, catalogue(wide))) == 1
        # and the whole run fails on it (and on the unread text even when all are catalogued)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert run(root, doc) == 1
        assert "src/lib.rs:13: FAILED_PRECONDITION `short`: no entry" in out.getvalue(), out.getvalue()
        with open(doc, "w") as f:
            f.write(SELF_TEST_DOC)
        with contextlib.redirect_stdout(out):
            assert run(root, doc) == 1
        with open(os.path.join(root, "src", "lib.rs"), "w") as f:
            f.write(SELF_TEST_SRC.replace("fn orphan(text: String) -> Error {\n    Error::Aborted(text)\n}\n", ""))
        with contextlib.redirect_stdout(out):
            assert run(root, doc) == 0
    print("check_messages: self-test passed")


def main():
    here = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    args = sys.argv[1:]
    if "--self-test" in args:
        self_test()
        return 0
    # --root DIR: read DIR/src (another checkout, say a branch about to be merged) against this
    # tree's catalogue
    root = os.path.abspath(args[args.index("--root") + 1]) if "--root" in args else here
    return run(root, os.path.join(here, "docs", "troubleshooting.md"), "--list" in args, "--stale" in args)


if __name__ == "__main__":
    sys.exit(main())
