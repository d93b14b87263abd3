//! The arithmetic of `holdfast bench`: percentiles and medians of timings, the memory lines of
//! `/proc/PID/status`, and durations for people. Pure, tested on captured `/proc` output.

use std::time::Duration;

/// p50 / p99 / max of a series of timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// How many timings.
    pub count: usize,
    /// Median (nearest rank).
    pub p50: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
    /// The slowest.
    pub max: Duration,
}

impl Summary {
    /// Summarises timings; `None` when there are none.
    pub fn of(timings: &[Duration]) -> Option<Summary> {
        let mut sorted = timings.to_vec();
        sorted.sort_unstable();
        Some(Summary { count: sorted.len(), p50: percentile(&sorted, 50.0)?, p99: percentile(&sorted, 99.0)?, max: *sorted.last()? })
    }
}

/// The nearest-rank percentile of sorted values: the smallest value with at least `p`% of the
/// values at or below it. No interpolation, so the answer is always a timing that happened.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median: the middle value, or the mean of the two middle values.
pub fn median(values: &[Duration]) -> Option<Duration> {
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2),
    }
}

/// The memory of a process from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now (`VmRSS`), bytes.
    pub rss: u64,
    /// The highest resident set size so far (`VmHWM`), bytes.
    pub hwm: u64,
}

/// Parses `VmRSS` and `VmHWM` out of `/proc/PID/status`. Kernel threads have neither.
pub fn parse_status(text: &str) -> Result<Memory, String> {
    let field = |name: &str| -> Result<u64, String> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .ok_or_else(|| format!("no {name} line (a kernel thread, or not Linux?)"))?;
        let kib = line.trim().strip_suffix("kB").ok_or_else(|| format!("{name}: expected a value in kB, got {:?}", line.trim()))?;
        kib.trim().parse::<u64>().map(|k| k * 1024).map_err(|e| format!("{name}: {e}"))
    };
    Ok(Memory { rss: field("VmRSS")?, hwm: field("VmHWM")? })
}

/// Reads the memory of a running process.
pub fn read_memory(pid: u32) -> Result<Memory, String> {
    let path = format!("/proc/{pid}/status");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e} (is the driver still running as pid {pid}?)"))?;
    parse_status(&text).map_err(|e| format!("{path}: {e}"))
}

/// A duration for a table: `0.42 ms`, `12.3 ms`, `1.25 s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    match ms {
        _ if ms < 10.0 => format!("{ms:.2} ms"),
        _ if ms < 1000.0 => format!("{ms:.1} ms"),
        _ => format!("{:.2} s", ms / 1000.0),
    }
}

/// Milliseconds as a float, for JSON.
pub fn ms(d: Duration) -> f64 {
    // Rounded to microseconds: more digits would only be noise.
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// `holdfast / by hand`; `None` when the by-hand time is zero.
pub fn ratio(holdfast: Duration, by_hand: Duration) -> Option<f64> {
    (!by_hand.is_zero()).then(|| holdfast.as_secs_f64() / by_hand.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_list(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn percentiles() {
        struct Case {
            name: &'static str,
            values: Vec<u64>,
            p: f64,
            want: Option<u64>,
        }
        let hundred: Vec<u64> = (1..=100).collect();
        let two_hundred: Vec<u64> = (1..=200).collect();
        let cases = [
            Case { name: "empty", values: vec![], p: 50.0, want: None },
            Case { name: "one", values: vec![7], p: 99.0, want: Some(7) },
            Case { name: "p50 of 1..=100", values: hundred.clone(), p: 50.0, want: Some(50) },
            Case { name: "p99 of 1..=100", values: hundred.clone(), p: 99.0, want: Some(99) },
            Case { name: "p100", values: hundred, p: 100.0, want: Some(100) },
            Case { name: "p99 of 1..=200", values: two_hundred, p: 99.0, want: Some(198) },
            Case { name: "p0 is the minimum", values: vec![3, 4], p: 0.0, want: Some(3) },
        ];
        for c in cases {
            assert_eq!(percentile(&ms_list(&c.values), c.p), c.want.map(Duration::from_millis), "{}", c.name);
        }
    }

    #[test]
    fn summaries_and_medians() {
        let s = Summary::of(&ms_list(&[5, 1, 3, 2, 4])).unwrap();
        assert_eq!(s, Summary { count: 5, p50: Duration::from_millis(3), p99: Duration::from_millis(5), max: Duration::from_millis(5) });
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(median(&ms_list(&[9, 1, 5])), Some(Duration::from_millis(5)));
        assert_eq!(median(&ms_list(&[4, 1, 2, 3])), Some(Duration::from_micros(2500)));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn proc_status() {
        let m = parse_status(include_str!("../../tests/fixtures/proc/status-debian12.txt")).unwrap();
        assert_eq!(m, Memory { rss: 1624 * 1024, hwm: 1624 * 1024 });
        let err = parse_status(include_str!("../../tests/fixtures/proc/status-kthread.txt")).unwrap_err();
        assert!(err.contains("no VmRSS"), "{err}");
        assert!(parse_status("VmRSS:\t12 MB\nVmHWM:\t1 kB\n").unwrap_err().contains("expected a value in kB"));
        let own = read_memory(std::process::id()).unwrap();
        assert!(own.rss > 0 && own.hwm >= own.rss);
    }

    #[test]
    fn formatting() {
        assert_eq!(format_duration(Duration::from_micros(420)), "0.42 ms");
        assert_eq!(format_duration(Duration::from_micros(12_340)), "12.3 ms");
        assert_eq!(format_duration(Duration::from_millis(1250)), "1.25 s");
        assert_eq!(ms(Duration::from_nanos(1_234_567)), 1.235);
        assert_eq!(ratio(Duration::from_millis(3), Duration::from_millis(2)), Some(1.5));
        assert_eq!(ratio(Duration::from_millis(3), Duration::ZERO), None);
    }
}
