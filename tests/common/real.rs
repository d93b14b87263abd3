//! The harness of the real-storage test binaries (tests/lvm.rs, tests/zfs.rs, tests/nfs.rs, all
//! `harness = false`). They need device-mapper, ZFS or an NFS server, which only the test VM
//! has, so a run that cannot use them must say so instead of reporting tests as passed:
//!
//! - where the tests must run (the VM's `/run/holdfast-vm`, the binary's own switch, or
//!   `HOLDFAST_REQUIRE_REAL=1`, which the VM suites set), anything missing is a failure, and so
//!   is a selection of zero tests;
//! - elsewhere the binary prints "NOT RUN" with the reason and exits 0 (a developer's plain
//!   `cargo test`), counting nothing as passed.
//!
//! The command line is libtest's, as far as these binaries need it: name filters (substrings, or
//! whole names with `--exact`), `--skip` (repeatable, same matching), `--list`,
//! `--test-threads`; capture and format options are accepted and have no effect (output is never
//! captured). Each test runs on its own thread with its own tokio runtime, so a panicking test
//! takes nothing else down.
//!
//! A file using this harness lists its tests in a table, not with `#[test]` attributes (those
//! would be compiled out without a word under `harness = false`); [`has_test_attribute`] lets it
//! refuse to compile when one creeps in.

#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One test: its future, built fresh for the run.
pub type TestFn = fn() -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a test binary needs and how it is meant to run, for the messages of [`main`].
pub struct Suite {
    /// The source file, as people name it: `tests/lvm.rs`.
    pub file: &'static str,
    /// What the tests need that a plain machine lacks: "device-mapper (thin pools, LV activation)".
    pub needs: &'static str,
    /// How to run them for real: "tests/vm/lvm-suite.sh".
    pub how: &'static str,
    /// Whether this binary insists on running by itself (the test VM, or its own switch such as
    /// `HOLDFAST_VM=1`); `HOLDFAST_REQUIRE_REAL` is added by [`main`].
    pub required: bool,
    /// Whether tests may run at the same time (`--test-threads`); `false` runs them one by one
    /// whatever the command line says (they share a zpool, or measure time).
    pub parallel: bool,
}

/// Whether `HOLDFAST_REQUIRE_REAL` asks for a real run (set, non-empty, not `0`).
pub fn require_real() -> bool {
    std::env::var_os("HOLDFAST_REQUIRE_REAL").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether `source` marks a test with a libtest attribute (`#[test]`, `#[tokio::test]`), which
/// `harness = false` would silently drop. Usable in a `const` assertion over
/// `include_str!` of the file itself (the patterns are built here, so that file never contains
/// them by naming them).
pub const fn has_test_attribute(source: &str) -> bool {
    contains(source.as_bytes(), b"#[test]") || contains(source.as_bytes(), b"#[tokio::test")
}

const fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        let mut j = 0;
        while j < needle.len() && hay[i + j] == needle[j] {
            j += 1;
        }
        if j == needle.len() {
            return true;
        }
        i += 1;
    }
    false
}

/// The parsed command line.
#[derive(Debug, Default, PartialEq)]
struct Args {
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    list: bool,
    ignored: bool,
    threads: Option<usize>,
}

impl Args {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut out = Args::default();
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (a.clone(), None),
            };
            let mut value = |name: &str| inline.clone().or_else(|| args.next()).ok_or(format!("{name} needs a value"));
            match flag.as_str() {
                "--list" => out.list = true,
                "--exact" => out.exact = true,
                "--skip" => out.skips.push(value("--skip")?),
                "--test-threads" => {
                    let v = value("--test-threads")?;
                    out.threads = Some(v.parse().ok().filter(|n| *n > 0).ok_or(format!("--test-threads {v}: not a positive number"))?);
                }
                // There are no ignored tests: `--ignored` selects none, `--include-ignored` changes nothing.
                "--ignored" => out.ignored = true,
                "--include-ignored" => {}
                // Output is never captured, and the report has one format.
                "--nocapture" | "--no-capture" | "--show-output" | "-q" | "--quiet" | "--test" | "--bench" => {}
                "--format" | "--color" | "-Z" => {
                    value(&flag)?;
                }
                f if f.starts_with('-') => return Err(format!("unknown option {a}")),
                _ => out.filters.push(a),
            }
        }
        Ok(out)
    }

    fn matches(&self, pattern: &str, name: &str) -> bool {
        if self.exact { name == pattern } else { name.contains(pattern) }
    }

    /// The tests this command line selects, in table order.
    fn select<'a, T>(&self, tests: &'a [(&'static str, T)]) -> Vec<&'a (&'static str, T)> {
        tests
            .iter()
            .filter(|_| !self.ignored)
            .filter(|(n, _)| self.filters.is_empty() || self.filters.iter().any(|f| self.matches(f, n)))
            .filter(|(n, _)| !self.skips.iter().any(|s| self.matches(s, n)))
            .collect()
    }
}

/// Runs the selected `tests` of `suite` (the binary's `main`): see the module documentation.
/// `problem` says why the tests cannot run here, if they cannot (checked only where they must run).
pub fn main(suite: &Suite, tests: &[(&'static str, TestFn)], problem: impl FnOnce() -> Option<String>) -> ExitCode {
    let file = suite.file;
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{file}: {e} (options: FILTER... --exact --skip PATTERN --list --test-threads N)");
            return ExitCode::from(2);
        }
    };
    match plan(suite, tests, &args, require_real(), problem) {
        Plan::List(selected) => {
            for (n, _) in selected {
                println!("{n}: test");
            }
            ExitCode::SUCCESS
        }
        Plan::NotRun(message) => {
            println!("{file}: NOT RUN {message}");
            ExitCode::SUCCESS
        }
        Plan::Fail(message) => {
            println!("{file}: FAILED {message}");
            ExitCode::FAILURE
        }
        Plan::Run(selected, threads) => {
            let summary = run(&selected, threads);
            println!(
                "\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s",
                if summary.ok() { "ok" } else { "FAILED" },
                summary.passed,
                summary.failed.len(),
                tests.len() - selected.len(),
                summary.secs
            );
            if summary.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
    }
}

/// What [`main`] does with a command line.
#[derive(Debug)]
enum Plan<'a> {
    /// `--list`: print these names.
    List(Vec<&'a (&'static str, TestFn)>),
    /// Not required here and not run: exit 0 after saying so (the message says why).
    NotRun(String),
    /// A failure before any test ran.
    Fail(String),
    /// Run these, this many at a time.
    Run(Vec<&'a (&'static str, TestFn)>, usize),
}

fn plan<'a>(
    suite: &Suite,
    tests: &'a [(&'static str, TestFn)],
    args: &Args,
    require_real: bool,
    problem: impl FnOnce() -> Option<String>,
) -> Plan<'a> {
    let selected = args.select(tests);
    if args.list {
        return Plan::List(selected);
    }
    if selected.is_empty() {
        // A filter that matches nothing (a renamed test) must not pass for a run.
        return Plan::Fail(format!(
            "no test selected (filters {:?}, skips {:?}{}; {} tests exist, `--list` names them)",
            args.filters,
            args.skips,
            if args.exact { ", exact" } else { "" },
            tests.len()
        ));
    }
    if !suite.required && !require_real {
        return Plan::NotRun(format!(
            "({} tests): they need {}, which only the test VM has.\n\
             Run them with {} (HOLDFAST_REQUIRE_REAL=1 turns this notice into a failure).",
            selected.len(),
            suite.needs,
            suite.how
        ));
    }
    if let Some(problem) = problem() {
        let why = if suite.required { "they must run here" } else { "HOLDFAST_REQUIRE_REAL is set" };
        return Plan::Fail(format!("before any test ({} selected): {why}, but {problem}", selected.len()));
    }
    let threads = if suite.parallel {
        args.threads
            .or_else(|| std::env::var("RUST_TEST_THREADS").ok().and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    } else {
        1
    };
    Plan::Run(selected, threads)
}

/// How a run went.
struct Summary {
    passed: usize,
    failed: Vec<&'static str>,
    secs: f64,
}

impl Summary {
    fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Runs `selected` on `threads` workers and prints libtest's line for each test as it ends.
fn run(selected: &[&(&'static str, TestFn)], threads: usize) -> Summary {
    println!("\nrunning {} tests{}", selected.len(), if threads > 1 { format!(" ({threads} at a time)") } else { String::new() });
    let started = Instant::now();
    // Popped from the end: reversed, so tests start in table order.
    let queue: Arc<Mutex<Vec<(&'static str, TestFn)>>> = Arc::new(Mutex::new(selected.iter().rev().map(|(n, t)| (*n, *t)).collect()));
    let (tx, rx) = mpsc::channel();
    let workers: Vec<_> = (0..threads.min(selected.len()))
        .map(|_| {
            let (queue, tx) = (queue.clone(), tx.clone());
            std::thread::spawn(move || {
                loop {
                    let Some((name, test)) = queue.lock().expect("queue").pop() else { return };
                    let t = Instant::now();
                    let outcome = run_one(name, test);
                    if tx.send((name, outcome, t.elapsed().as_secs_f64())).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut summary = Summary { passed: 0, failed: Vec::new(), secs: 0.0 };
    for (name, outcome, secs) in rx {
        match outcome {
            Ok(()) => {
                summary.passed += 1;
                println!("test {name} ... ok ({secs:.1}s)");
            }
            Err(why) => {
                println!("test {name} ... FAILED ({secs:.1}s): {why}");
                summary.failed.push(name);
            }
        }
    }
    for w in workers {
        let _ = w.join();
    }
    // A worker that died without reporting would leave tests neither passed nor failed.
    let unreported = selected.len() - summary.passed - summary.failed.len();
    if unreported > 0 {
        println!("{unreported} tests did not report an outcome");
        summary.failed.push("(unreported tests)");
    }
    if !summary.failed.is_empty() {
        println!("\nfailures:\n    {}", summary.failed.join("\n    "));
    }
    summary.secs = started.elapsed().as_secs_f64();
    summary
}

/// Runs one test on a thread of its own with a fresh runtime; `Err` carries its panic message.
fn run_one(name: &'static str, test: TestFn) -> Result<(), String> {
    let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
        rt.block_on(test());
    });
    let joined = match thread {
        Ok(t) => t.join(),
        Err(e) => return Err(format!("cannot start its thread: {e}")),
    };
    joined.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Args, String> {
        Args::parse(a.iter().map(|s| s.to_string()))
    }

    fn pass() -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async {})
    }

    fn boom() -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async {
            tokio::task::yield_now().await;
            panic!("the disk is gone");
        })
    }

    const TESTS: &[(&str, TestFn)] = &[("thick_lifecycle", pass), ("thin_lifecycle", pass), ("thin_snapshots", pass)];

    fn suite(required: bool, parallel: bool) -> Suite {
        Suite { file: "tests/x.rs", needs: "device-mapper", how: "tests/vm/x-suite.sh", required, parallel }
    }

    fn names(p: &[&(&'static str, TestFn)]) -> Vec<&'static str> {
        p.iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn command_lines_parse_like_libtest() {
        let a =
            args(&["thin", "--exact", "--skip", "a", "--skip=b", "--test-threads=3", "--nocapture", "--format", "pretty", "-q"]).unwrap();
        assert_eq!(
            a,
            Args { filters: vec!["thin".into()], skips: vec!["a".into(), "b".into()], exact: true, threads: Some(3), ..Args::default() }
        );
        assert_eq!(args(&["--test-threads", "2", "--list"]).unwrap(), Args { list: true, threads: Some(2), ..Args::default() });
        for bad in [&["--frobnicate"][..], &["--skip"], &["--test-threads", "0"], &["--test-threads=x"], &["-x"]] {
            assert!(args(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn filters_skips_and_exact_select_like_libtest() {
        let cases: &[(&[&str], &[&str])] = &[
            (&[], &["thick_lifecycle", "thin_lifecycle", "thin_snapshots"]),
            (&["thin"], &["thin_lifecycle", "thin_snapshots"]),
            (&["thick", "snap"], &["thick_lifecycle", "thin_snapshots"]),
            (&["--skip", "lifecycle"], &["thin_snapshots"]),
            (&["thin", "--skip", "snap"], &["thin_lifecycle"]),
            (&["--exact", "thin"], &[]),
            (&["--exact", "thin_lifecycle"], &["thin_lifecycle"]),
            // With --exact, a skip names a whole test too.
            (&["--exact", "--skip", "thin"], &["thick_lifecycle", "thin_lifecycle", "thin_snapshots"]),
            (&["--exact", "--skip", "thin_snapshots"], &["thick_lifecycle", "thin_lifecycle"]),
            (&["--ignored"], &[]),
            (&["--include-ignored", "thick"], &["thick_lifecycle"]),
        ];
        for (line, want) in cases {
            assert_eq!(names(&args(line).unwrap().select(TESTS)), *want, "{line:?}");
        }
    }

    #[test]
    fn nothing_passes_without_running() {
        let a = args(&[]).unwrap();
        let ok = || None;
        // Not required: a notice, exit 0, nothing counted.
        assert!(matches!(plan(&suite(false, false), TESTS, &a, false, ok), Plan::NotRun(m) if m.contains("(3 tests)")));
        // Required by the VM or by HOLDFAST_REQUIRE_REAL: what is missing fails.
        let missing = || Some("/dev/mapper/control is missing".to_string());
        assert!(matches!(plan(&suite(true, false), TESTS, &a, false, missing), Plan::Fail(m) if m.contains("/dev/mapper/control")));
        assert!(matches!(plan(&suite(false, false), TESTS, &a, true, missing), Plan::Fail(m) if m.contains("HOLDFAST_REQUIRE_REAL")));
        assert!(matches!(plan(&suite(false, false), TESTS, &a, true, ok), Plan::Run(s, 1) if s.len() == 3));
        // Zero selected fails, required or not.
        let none = args(&["no_such_test"]).unwrap();
        for (required, real) in [(false, false), (true, false), (false, true)] {
            assert!(matches!(plan(&suite(required, false), TESTS, &none, real, ok), Plan::Fail(m) if m.contains("no test selected")));
        }
        // Listing is not a run.
        assert!(matches!(plan(&suite(false, false), TESTS, &args(&["--list", "thin"]).unwrap(), false, ok), Plan::List(s) if s.len() == 2));
    }

    #[test]
    fn threads_only_where_the_suite_allows_them() {
        let a = args(&["--test-threads", "3"]).unwrap();
        assert!(matches!(plan(&suite(true, false), TESTS, &a, false, || None), Plan::Run(_, 1)));
        assert!(matches!(plan(&suite(true, true), TESTS, &a, false, || None), Plan::Run(_, 3)));
    }

    #[test]
    fn a_panicking_test_fails_alone() {
        let tests: &[(&str, TestFn)] = &[("first", pass), ("breaks", boom), ("last", pass)];
        for threads in [1, 2] {
            let selected: Vec<_> = tests.iter().collect();
            let s = run(&selected, threads);
            assert_eq!((s.passed, s.failed.clone()), (2, vec!["breaks"]), "{threads} threads");
            assert!(!s.ok());
        }
        assert_eq!(run_one("breaks", boom), Err("the disk is gone".into()));
        assert!(run(&tests[..1].iter().collect::<Vec<_>>(), 1).ok());
    }

    #[test]
    fn test_attributes_are_found() {
        assert!(has_test_attribute("fn a() {}\n#[tokio::test]\nasync fn b() {}"));
        assert!(has_test_attribute("#[test]\nfn c() {}"));
        assert!(!has_test_attribute("const TESTS: &[(&str, TestFn)] = &[];\n#[tokio::main]\nfn main() {}"));
    }
}
