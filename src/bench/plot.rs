//! `holdfast bench --plot FILE.svg`: charts of the JSON reports, holdfast beside the raw
//! tools (solid: holdfast; dashed: by hand; one colour per operation).
//!
//! - from `--ops`: p50 latency against the number of calls at once (1, 2, 4, 8, 16), one line
//!   per operation and side;
//! - from `--scale`: CreateVolume p50 against the number of volumes in the pool, holdfast and
//!   the by-hand create at each level.
//!
//! The series are taken out of the JSON first ([`series`], pure and tested); plotters only draws.

use plotters::prelude::*;
use serde_json::Value;

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Legend text.
    pub label: String,
    /// Colour index (one per operation).
    pub colour: usize,
    /// By hand (drawn dashed).
    pub by_hand: bool,
    /// (x, milliseconds), x ascending.
    pub points: Vec<(f64, f64)>,
}

/// One chart: a title, the x axis name and its lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Above the chart.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// The lines.
    pub lines: Vec<Line>,
}

/// The charts the reports hold: one per `--ops` report (per pool kind) and one per `--scale`
/// report.
pub fn series(reports: &[Value]) -> Vec<Chart> {
    let mut charts = Vec::new();
    for r in reports {
        if let Some(ops) = r["ops"].as_array() {
            let mut lines: Vec<Line> = Vec::new();
            for o in ops {
                let (Some(op), Some(c)) = (o["op"].as_str(), o["concurrency"].as_f64()) else { continue };
                for (side, by_hand) in [("holdfast", false), ("by_hand", true)] {
                    let Some(p50) = o[side]["p50_ms"].as_f64() else { continue };
                    let label = format!("{op}{}", if by_hand { ", by hand" } else { "" });
                    let colour = colour_of(op);
                    match lines.iter_mut().find(|l| l.label == label) {
                        Some(l) => l.points.push((c, p50)),
                        None => lines.push(Line { label, colour, by_hand, points: vec![(c, p50)] }),
                    }
                }
            }
            for l in &mut lines {
                l.points.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            let kind = r["kind"].as_str().unwrap_or("?");
            charts.push(Chart { title: format!("{kind} pool: p50 latency against calls at once"), x_label: "calls at once".into(), lines });
        }
        if let Some(levels) = r["levels"].as_array() {
            let mut hf = Vec::new();
            let mut hand = Vec::new();
            for l in levels {
                let Some(v) = l["volumes"].as_f64() else { continue };
                if let Some(p) = l["create"]["p50_ms"].as_f64() {
                    hf.push((v, p));
                }
                if let Some(p) = l["by_hand_create"]["p50_ms"].as_f64() {
                    hand.push((v, p));
                }
            }
            let mut lines = vec![Line { label: "CreateVolume".into(), colour: 0, by_hand: false, points: hf }];
            if !hand.is_empty() {
                lines.push(Line { label: "create by hand".into(), colour: 0, by_hand: true, points: hand });
            }
            let kind = r["kind"].as_str().unwrap_or("file");
            charts.push(Chart {
                title: format!("{kind} pool: CreateVolume p50 against volumes in the pool"),
                x_label: "volumes in the pool".into(),
                lines,
            });
        }
    }
    charts.retain(|c| c.lines.iter().any(|l| !l.points.is_empty()));
    charts
}

fn colour_of(op: &str) -> usize {
    ["create", "ready", "teardown", "snapshot", "restore", "expand"].iter().position(|o| *o == op).unwrap_or(6)
}

const PALETTE: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

/// The smallest and largest values, widened a little so no point sits on the frame.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.filter(|v| *v > 0.0).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    (lo <= hi).then(|| (lo / 1.3, hi * 1.3))
}

/// Draws `charts` one above the other into an SVG at `path`.
pub fn draw(charts: &[Chart], path: &std::path::Path) -> Result<(), String> {
    if charts.is_empty() {
        return Err("nothing to plot: the reports hold neither --ops nor --scale results".into());
    }
    let height = 480 * charts.len() as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    for (chart, area) in charts.iter().zip(root.split_evenly((charts.len(), 1))) {
        let points = || chart.lines.iter().flat_map(|l| l.points.iter());
        let (Some((x0, x1)), Some((y0, y1))) = (bounds(points().map(|p| p.0)), bounds(points().map(|p| p.1))) else { continue };
        let mut c = ChartBuilder::on(&area)
            .caption(&chart.title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(|e| err(&e))?;
        c.configure_mesh()
            .x_desc(chart.x_label.as_str())
            .y_desc("p50, ms")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| if *y < 10.0 { format!("{y:.1}") } else { format!("{y:.0}") })
            .draw()
            .map_err(|e| err(&e))?;
        for l in &chart.lines {
            let colour = PALETTE[l.colour % PALETTE.len()];
            let style = colour.stroke_width(2);
            if l.by_hand {
                c.draw_series(DashedLineSeries::new(l.points.iter().copied(), 6, 4, style)).map_err(|e| err(&e))?;
            } else {
                c.draw_series(LineSeries::new(l.points.iter().copied(), style)).map_err(|e| err(&e))?;
            }
            c.draw_series(l.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| err(&e))?
                .label(l.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ops_report() -> Value {
        let sum = |p50: f64| json!({ "count": 3, "p50_ms": p50, "p99_ms": p50 * 2.0, "max_ms": p50 * 3.0 });
        json!({
            "kind": "lvm-thin",
            "ops": [
                { "op": "create", "concurrency": 16, "holdfast": sum(40.0), "by_hand": sum(30.0) },
                { "op": "create", "concurrency": 1, "holdfast": sum(4.0), "by_hand": sum(3.0) },
                { "op": "expand", "concurrency": 1, "holdfast": sum(9.0), "by_hand": null },
            ],
        })
    }

    #[test]
    fn series_from_the_reports() {
        let scale = json!({ "levels": [
            { "volumes": 100, "create": { "p50_ms": 2.0 }, "by_hand_create": { "p50_ms": 1.0 } },
            { "volumes": 1000, "create": { "p50_ms": 3.0 }, "by_hand_create": { "p50_ms": 1.1 } },
        ]});
        let charts = series(&[ops_report(), scale]);
        assert_eq!(charts.len(), 2);
        assert_eq!(charts[0].title, "lvm-thin pool: p50 latency against calls at once");
        let labels: Vec<&str> = charts[0].lines.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(labels, ["create", "create, by hand", "expand"]);
        assert_eq!(charts[0].lines[0].points, [(1.0, 4.0), (16.0, 40.0)], "sorted by concurrency");
        assert!(charts[0].lines[1].by_hand && !charts[0].lines[2].by_hand);
        assert_eq!(charts[0].lines[2].colour, 5);
        assert_eq!(charts[1].lines[1].points, [(100.0, 1.0), (1000.0, 1.1)]);
        assert!(series(&[json!({ "driver": "x" })]).is_empty());
    }

    #[test]
    fn draws_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        draw(&series(&[ops_report()]), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for text in ["lvm-thin pool: p50 latency against calls at once", "create, by hand", "calls at once"] {
            assert!(svg.contains(text), "no {text:?} in the SVG");
        }
        assert!(svg.contains("stroke-dasharray") || svg.matches("<polyline").count() + svg.matches("<line").count() > 3);
        assert!(draw(&[], &path).unwrap_err().contains("nothing to plot"));
    }

    #[test]
    fn bounds_leave_a_margin_and_ignore_zeros() {
        let (lo, hi) = bounds([0.0, 2.0, 10.0].into_iter()).unwrap();
        assert!((lo - 2.0 / 1.3).abs() < 1e-9 && (hi - 13.0).abs() < 1e-9);
        assert_eq!(bounds([0.0].into_iter()), None);
    }
}
