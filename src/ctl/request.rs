//! Pure helpers that turn command-line values into CSI requests: sizes, `key=value` lists,
//! access modes; the capability and capacity builders are [`crate::client`]'s. No I/O here, so
//! every rule is unit-tested.

use std::collections::HashMap;

pub use crate::client::{Access, capacity, volume_capability};
use crate::config::{format_size, parse_size};
use crate::proto::Topology;
use crate::proto::volume_capability::access_mode::Mode;

/// Parses a size argument (`1GiB`, `512Mi`, `1073741824`) into bytes. Zero is refused: every
/// command that takes `--size` needs a real amount, and CSI carries sizes as `int64`.
pub fn parse_size_arg(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s)
        .ok_or_else(|| format!("invalid size {s:?}: expected bytes or a number with K, M, G or T (1GiB, 512Mi, 1073741824)"))?;
    if bytes == 0 {
        return Err(format!("invalid size {s:?}: must be more than zero"));
    }
    if i64::try_from(bytes).is_err() {
        return Err(format!("invalid size {s:?}: larger than CSI can carry ({})", format_size(i64::MAX as u64)));
    }
    Ok(bytes)
}

/// Parses one `key=value` argument. The value may be empty or contain `=`; the key may not be empty.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Collects `key=value` pairs into a CSI map; a key given twice is a mistake, not an override.
pub fn to_map(pairs: &[(String, String)], what: &str) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        if map.insert(k.clone(), v.clone()).is_some() {
            return Err(format!("{what} {k:?} is given more than once"));
        }
    }
    Ok(map)
}

/// The `--access-mode` spellings: the CSI enum names in kebab case (`single-node-writer`); the
/// CSI spelling (`SINGLE_NODE_WRITER`) is accepted too.
pub fn parse_access_mode(s: &str) -> Result<Mode, String> {
    let wanted = s.trim().to_ascii_uppercase().replace('-', "_");
    access_modes().find(|m| m.as_str_name() == wanted).ok_or_else(|| {
        format!("unknown access mode {s:?}; one of: {}", access_modes().map(access_mode_name).collect::<Vec<_>>().join(", "))
    })
}

/// The kebab-case name of an access mode, as `--access-mode` takes it.
pub fn access_mode_name(m: Mode) -> String {
    m.as_str_name().to_ascii_lowercase().replace('_', "-")
}

/// Every access mode except UNKNOWN, in enum order.
fn access_modes() -> impl Iterator<Item = Mode> {
    (1..).map_while(|i| Mode::try_from(i).ok())
}

/// One topology made of the given segments, or none when there are no segments.
pub fn topology(pairs: &[(String, String)]) -> Result<Option<Topology>, String> {
    if pairs.is_empty() {
        return Ok(None);
    }
    Ok(Some(Topology { segments: to_map(pairs, "topology segment")? }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        struct Case {
            input: &'static str,
            want: Result<u64, &'static str>,
        }
        let cases = [
            Case { input: "1GiB", want: Ok(1 << 30) },
            Case { input: "1G", want: Ok(1 << 30) },
            Case { input: "512Mi", want: Ok(512 << 20) },
            Case { input: "4096", want: Ok(4096) },
            Case { input: "0", want: Err("more than zero") },
            Case { input: "1.5G", want: Err("expected bytes") },
            Case { input: "1XB", want: Err("expected bytes") },
            Case { input: "", want: Err("expected bytes") },
            Case { input: "9000000T", want: Err("larger than CSI can carry") },
        ];
        for c in cases {
            match (parse_size_arg(c.input), c.want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{}", c.input),
                (Err(got), Err(want)) => assert!(got.contains(want), "{}: {got}", c.input),
                (got, want) => panic!("{}: got {got:?}, want {want:?}", c.input),
            }
        }
    }

    #[test]
    fn key_values() {
        assert_eq!(parse_key_value("pool=fast"), Ok(("pool".into(), "fast".into())));
        assert_eq!(parse_key_value("opts=a=b"), Ok(("opts".into(), "a=b".into())));
        assert_eq!(parse_key_value("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=v").is_err());
        let pairs = vec![("a".to_owned(), "1".to_owned()), ("b".to_owned(), "2".to_owned())];
        assert_eq!(to_map(&pairs, "parameter").unwrap().len(), 2);
        let dup = vec![("a".to_owned(), "1".to_owned()), ("a".to_owned(), "2".to_owned())];
        assert_eq!(to_map(&dup, "parameter").unwrap_err(), "parameter \"a\" is given more than once");
    }

    #[test]
    fn access_modes_round_trip() {
        assert_eq!(parse_access_mode("single-node-writer"), Ok(Mode::SingleNodeWriter));
        assert_eq!(parse_access_mode("MULTI_NODE_READER_ONLY"), Ok(Mode::MultiNodeReaderOnly));
        assert_eq!(parse_access_mode("Single-Node-Multi-Writer"), Ok(Mode::SingleNodeMultiWriter));
        let err = parse_access_mode("rwx").unwrap_err();
        assert!(err.contains("multi-node-multi-writer") && !err.contains("unknown,"), "{err}");
        assert!(parse_access_mode("unknown").is_err());
        for m in access_modes() {
            assert_eq!(parse_access_mode(&access_mode_name(m)), Ok(m));
        }
        assert_eq!(access_modes().count(), 7);
    }

    #[test]
    fn capacity_and_topology() {
        assert_eq!(capacity(1 << 30), crate::proto::CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 });
        assert_eq!(topology(&[]), Ok(None));
        let t = topology(&[("topology.holdfast.dev/node".into(), "n1".into())]).unwrap().unwrap();
        assert_eq!(t.segments["topology.holdfast.dev/node"], "n1");
    }
}
