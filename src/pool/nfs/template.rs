//! Naming of an nfs volume's subdirectory: the `subdir` template of the pool config
//! (`${pvc.metadata.namespace}/${pvc.metadata.name}`), its expansion from the CreateVolume
//! request, and the one check every subdirectory path passes before it reaches the filesystem.
//!
//! A subdirectory is a relative path of 1 to [`MAX_DEPTH`] components under the export. Each
//! component is 1 to 255 bytes of `[A-Za-z0-9._+@=~[]-]`, does not start with `.` (names starting
//! with a dot are holdfast's own, e.g. `.holdfast`), and is never `.` or `..`. A `/` can only come
//! from the template text itself: a value substituted into it (a PVC name…) must be a single
//! component, so no request can choose how deep, or where, its directory lands.

use std::collections::BTreeMap;

/// Longest subdirectory path (bytes).
pub const MAX_SUBDIR_LEN: usize = 1024;
/// Longest component (bytes; the usual NAME_MAX).
pub const MAX_COMPONENT_LEN: usize = 255;
/// Most components a subdirectory may have.
pub const MAX_DEPTH: usize = 8;

/// Request parameter the external-provisioner sets to the PVC's name (`--extra-create-metadata`).
pub const PARAM_PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
/// Request parameter holding the PVC's namespace.
pub const PARAM_PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// Request parameter holding the PV's name.
pub const PARAM_PV_NAME: &str = "csi.storage.k8s.io/pv/name";

/// The template used when the config sets none: the CSI name of the volume.
pub const DEFAULT_TEMPLATE: &str = "${csi.name}";

/// A variable a template can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    /// `${csi.name}`: the CreateVolume name.
    CsiName,
    /// `${pvc.metadata.name}`.
    PvcName,
    /// `${pvc.metadata.namespace}`.
    PvcNamespace,
    /// `${pv.metadata.name}`.
    PvName,
}

impl Var {
    const ALL: [Var; 4] = [Var::CsiName, Var::PvcName, Var::PvcNamespace, Var::PvName];

    /// The name written between `${` and `}`.
    pub fn name(self) -> &'static str {
        match self {
            Var::CsiName => "csi.name",
            Var::PvcName => "pvc.metadata.name",
            Var::PvcNamespace => "pvc.metadata.namespace",
            Var::PvName => "pv.metadata.name",
        }
    }

    /// The request parameter the value comes from (`None`: the CSI name itself).
    pub fn parameter(self) -> Option<&'static str> {
        match self {
            Var::CsiName => None,
            Var::PvcName => Some(PARAM_PVC_NAME),
            Var::PvcNamespace => Some(PARAM_PVC_NAMESPACE),
            Var::PvName => Some(PARAM_PV_NAME),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

/// A parsed `subdir` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// Whether `c` may appear in a subdirectory component.
fn component_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '@' | '=' | '~' | '[' | ']')
}

/// Checks a subdirectory path (see the module doc). The error says what is wrong, for messages.
pub fn validate_subdir(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the subdirectory is empty".into());
    }
    if path.len() > MAX_SUBDIR_LEN {
        return Err(format!("the subdirectory is {} bytes long, more than {MAX_SUBDIR_LEN}", path.len()));
    }
    if path.starts_with('/') {
        return Err(format!("{path:?} is absolute; subdirectories are relative to the export"));
    }
    let components: Vec<&str> = path.split('/').collect();
    if components.len() > MAX_DEPTH {
        return Err(format!("{path:?} has {} components, more than {MAX_DEPTH}", components.len()));
    }
    for c in components {
        if c.is_empty() {
            return Err(format!("{path:?} has an empty component (`//` or a trailing `/`)"));
        }
        if c == "." || c == ".." {
            return Err(format!("{path:?} contains {c:?}"));
        }
        if c.starts_with('.') {
            return Err(format!("component {c:?} of {path:?} starts with '.' (reserved for holdfast's own files)"));
        }
        if c.len() > MAX_COMPONENT_LEN {
            return Err(format!("a component of {path:?} is {} bytes long, more than {MAX_COMPONENT_LEN}", c.len()));
        }
        if let Some(bad) = c.chars().find(|ch| !component_char(*ch)) {
            return Err(format!("{path:?} contains {bad:?}; allowed are A-Z a-z 0-9 and . _ - + @ = ~ [ ]"));
        }
    }
    Ok(())
}

impl Template {
    /// Parses a template: text with `${variable}` references (variables: `csi.name`,
    /// `pvc.metadata.name`, `pvc.metadata.namespace`, `pv.metadata.name`). The text must yield a
    /// valid subdirectory whatever the (valid) values are: no `..`, no leading `/`, no empty
    /// component, and every component must contain a variable or be plain text.
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while !rest.is_empty() {
            match rest.find('$') {
                None => {
                    parts.push(Part::Text(rest.to_owned()));
                    break;
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Text(rest[..i].to_owned()));
                    }
                    let after = &rest[i + 1..];
                    let Some(body) = after.strip_prefix('{') else {
                        return Err(format!("template {source:?}: `$` must start a `${{variable}}`"));
                    };
                    let end = body.find('}').ok_or_else(|| format!("template {source:?}: `${{` without a closing `}}`"))?;
                    let name = &body[..end];
                    let var = Var::ALL.iter().copied().find(|v| v.name() == name).ok_or_else(|| {
                        let known: Vec<&str> = Var::ALL.iter().map(|v| v.name()).collect();
                        format!("template {source:?}: unknown variable ${{{name}}} (known: {})", known.join(", "))
                    })?;
                    parts.push(Part::Var(var));
                    rest = &body[end + 1..];
                }
            }
        }
        if parts.is_empty() {
            return Err("the subdir template is empty".into());
        }
        let t = Template { source: source.to_owned(), parts };
        // Sample values are valid single components, so anything wrong now is the text's fault.
        let sample = t.render(|_| "x").map_err(|e| format!("template {source:?}: {e}"))?;
        validate_subdir(&sample).map_err(|e| format!("template {source:?} cannot give a valid subdirectory: {e}"))?;
        Ok(t)
    }

    /// The template as written in the config.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The variables the template uses.
    pub fn vars(&self) -> impl Iterator<Item = Var> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(*v),
            Part::Text(_) => None,
        })
    }

    fn render<'a>(&self, value: impl Fn(Var) -> &'a str) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Var(v) => out.push_str(value(*v)),
            }
        }
        Ok(out)
    }

    /// Expands the template for a volume named `csi_name` created with `parameters`. Every value
    /// must be a single non-empty component; the result passes [`validate_subdir`]. A missing
    /// parameter says how to get it (the provisioner's `--extra-create-metadata`).
    pub fn expand(&self, csi_name: &str, parameters: &BTreeMap<String, String>) -> Result<String, String> {
        let mut values: BTreeMap<&'static str, &str> = BTreeMap::new();
        for var in self.vars() {
            let value = match var.parameter() {
                None => csi_name,
                Some(key) => parameters.get(key).map(String::as_str).ok_or_else(|| {
                    format!(
                        "the subdir template {:?} uses ${{{}}}, but the request has no {key:?} parameter \
                         (run the external-provisioner with --extra-create-metadata, or change the template)",
                        self.source,
                        var.name()
                    )
                })?,
            };
            if value.is_empty() || value.contains('/') || value.contains('\0') {
                return Err(format!("${{{}}} = {value:?} is not a single path component", var.name()));
            }
            values.insert(var.name(), value);
        }
        let path = self.render(|v| values.get(v.name()).copied().unwrap_or(""))?;
        validate_subdir(&path).map_err(|e| format!("subdir template {:?} gives an unusable path: {e}", self.source))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdir_paths_stay_inside_the_export() {
        struct Case {
            path: String,
            ok: bool,
        }
        let case = |path: &str, ok: bool| Case { path: path.to_owned(), ok };
        let cases = [
            case("pvc-1", true),
            case("ns/pvc-1", true),
            case("a/b/c/d/e/f/g/h", true),
            case("mysql[0]", true),
            case("v1.2_x+y@z=w~", true),
            case("", false),
            case("/etc", false),
            case("..", false),
            case(".", false),
            case("../../etc", false),
            case("a/../../etc", false),
            case("a/./b", false),
            case("a//b", false),
            case("a/", false),
            case(".holdfast", false),
            case("a/.hidden", false),
            case("a\0b", false),
            case("a\nb", false),
            case("a b", false),
            case("a:b", false),
            case("a,b", false),
            case("a\\b", false),
            case("é", false),
            case("a/b/c/d/e/f/g/h/i", false),
            Case { path: "x".repeat(255), ok: true },
            Case { path: "x".repeat(256), ok: false },
            Case {
                path: format!("{}/{}/{}/{}/{}", "a".repeat(250), "b".repeat(250), "c".repeat(250), "d".repeat(250), "e".repeat(30)),
                ok: false,
            },
        ];
        for c in cases {
            assert_eq!(validate_subdir(&c.path).is_ok(), c.ok, "{:?}: {:?}", c.path, validate_subdir(&c.path));
        }
    }

    #[test]
    fn templates_parse_or_say_why_not() {
        struct Case {
            template: &'static str,
            want: Result<(), &'static str>,
        }
        let cases = [
            Case { template: "${csi.name}", want: Ok(()) },
            Case { template: "${pvc.metadata.namespace}/${pvc.metadata.name}", want: Ok(()) },
            Case { template: "k8s/${pvc.metadata.namespace}-${pvc.metadata.name}", want: Ok(()) },
            Case { template: "static", want: Ok(()) },
            Case { template: "", want: Err("empty") },
            Case { template: "${nope}", want: Err("unknown variable ${nope}") },
            Case { template: "${csi.name", want: Err("without a closing") },
            Case { template: "$csi.name", want: Err("must start a") },
            Case { template: "../${csi.name}", want: Err("\"..\"") },
            Case { template: "/abs/${csi.name}", want: Err("absolute") },
            Case { template: "a//${csi.name}", want: Err("empty component") },
            Case { template: "${csi.name}/", want: Err("empty component") },
            Case { template: ".${csi.name}", want: Err("starts with '.'") },
            Case { template: "a b/${csi.name}", want: Err("contains ' '") },
        ];
        for c in cases {
            match (Template::parse(c.template), c.want) {
                (Ok(_), Ok(())) => {}
                (Err(e), Err(want)) => assert!(e.contains(want), "{:?}: {e:?} lacks {want:?}", c.template),
                (got, want) => panic!("{:?}: got {got:?}, want {want:?}", c.template),
            }
        }
    }

    #[test]
    fn expansion_rejects_hostile_values() {
        const NESTED: &str = "${pvc.metadata.namespace}/${pvc.metadata.name}";
        struct Case {
            name: &'static str,
            template: &'static str,
            csi_name: String,
            params: &'static [(&'static str, &'static str)],
            want: Result<&'static str, &'static str>,
        }
        let case = |name, template, csi_name: &str, params, want| Case { name, template, csi_name: csi_name.to_owned(), params, want };
        let cases = [
            case("csi name", DEFAULT_TEMPLATE, "pvc-123", &[], Ok("pvc-123")),
            case("namespace/name", NESTED, "pvc-1", &[(PARAM_PVC_NAMESPACE, "team-a"), (PARAM_PVC_NAME, "db")], Ok("team-a/db")),
            case("dotdot csi name", DEFAULT_TEMPLATE, "..", &[], Err("\"..\"")),
            case("slashed csi name", DEFAULT_TEMPLATE, "../../etc", &[], Err("single path component")),
            case(
                "slashed pvc name",
                NESTED,
                "pvc-1",
                &[(PARAM_PVC_NAMESPACE, "a"), (PARAM_PVC_NAME, "../../etc")],
                Err("single path component"),
            ),
            case("dotdot namespace", NESTED, "pvc-1", &[(PARAM_PVC_NAMESPACE, ".."), (PARAM_PVC_NAME, "x")], Err("\"..\"")),
            case("NUL", DEFAULT_TEMPLATE, "a\0b", &[], Err("single path component")),
            case("dot file", DEFAULT_TEMPLATE, ".holdfast", &[], Err("starts with '.'")),
            case("missing namespace", NESTED, "pvc-1", &[(PARAM_PVC_NAME, "x")], Err("--extra-create-metadata")),
            case("empty value", NESTED, "pvc-1", &[(PARAM_PVC_NAMESPACE, ""), (PARAM_PVC_NAME, "x")], Err("single path component")),
            case("over-long", DEFAULT_TEMPLATE, &"x".repeat(256), &[], Err("255")),
        ];
        for c in cases {
            let params: BTreeMap<String, String> = c.params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            match (Template::parse(c.template).unwrap().expand(&c.csi_name, &params), c.want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{}", c.name),
                (Err(e), Err(want)) => assert!(e.contains(want), "{}: {e:?} lacks {want:?}", c.name),
                (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
            }
        }
    }
}
