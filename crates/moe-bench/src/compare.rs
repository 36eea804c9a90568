//! The same cases on several backends side by side: tokens/s per backend and each backend's
//! ratio to the first, as a table, as JSON and as a grouped bar chart. A backend that could not
//! run stays in the comparison with the reason.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

/// What one backend measured: (case, tokens/s) pairs, or why it could not run.
#[derive(Debug, Clone)]
pub struct BackendRun {
    /// The device's name (`flex`, `wgpu:cpu`, ...).
    pub device: String,
    /// Each case's tokens/s, or the error that stopped the backend.
    pub result: Result<Vec<(String, f64)>, String>,
}

/// One case across the backends.
#[derive(Debug, Clone, Serialize)]
pub struct ComparisonRow {
    /// Case name.
    pub case: String,
    /// Tokens/s on each backend, in the order of [`Comparison::devices`] (`None`: not measured).
    pub tokens_per_s: Vec<Option<f64>>,
    /// Each backend's tokens/s divided by the first backend's.
    pub ratio_to_first: Vec<Option<f64>>,
}

/// A backend that could not run.
#[derive(Debug, Clone, Serialize)]
pub struct BackendFailure {
    /// The device's name.
    pub device: String,
    /// Why, one line.
    pub error: String,
}

/// Cases by backend.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Backends in the order given; the first is the ratios' reference.
    pub devices: Vec<String>,
    /// One row per case, in the order the backends measured them.
    pub rows: Vec<ComparisonRow>,
    /// Backends that could not run.
    pub failed: Vec<BackendFailure>,
}

impl Comparison {
    /// Lines up the runs case by case.
    pub fn new(runs: &[BackendRun]) -> Self {
        let mut cases: Vec<String> = Vec::new();
        for (name, _) in runs.iter().filter_map(|r| r.result.as_ref().ok()).flatten() {
            if !cases.contains(name) {
                cases.push(name.clone());
            }
        }
        let value = |run: &BackendRun, case: &str| {
            let found = run.result.as_ref().ok()?.iter().find(|(n, _)| n == case);
            found.map(|(_, v)| *v)
        };
        let rows = cases
            .into_iter()
            .map(|case| {
                let tokens_per_s: Vec<Option<f64>> = runs.iter().map(|r| value(r, &case)).collect();
                let first = tokens_per_s.first().copied().flatten();
                let ratio_to_first = tokens_per_s
                    .iter()
                    .map(|v| Some(v.as_ref()? / first.filter(|f| *f > 0.0)?))
                    .collect();
                ComparisonRow {
                    case,
                    tokens_per_s,
                    ratio_to_first,
                }
            })
            .collect();
        let failed = runs
            .iter()
            .filter_map(|r| {
                let error = r.result.as_ref().err()?;
                Some(BackendFailure {
                    device: r.device.clone(),
                    error: error.clone(),
                })
            })
            .collect();
        Self {
            devices: runs.iter().map(|r| r.device.clone()).collect(),
            rows,
            failed,
        }
    }

    /// The comparison as a text table: tokens/s per backend, then each later backend's ratio to
    /// the first, then a line per backend that failed.
    pub fn table(&self) -> String {
        let first = self.devices.first().map_or("", String::as_str);
        let mut out = format!("{:<32}", "case (tokens/s)");
        for d in &self.devices {
            out += &format!(" {d:>12}");
        }
        for d in self.devices.iter().skip(1) {
            out += &format!(" {:>14}", format!("{d}/{first}"));
        }
        out.push('\n');
        let cell = |v: Option<f64>, width: usize, digits: usize| match v {
            Some(v) => format!(" {v:>width$.digits$}"),
            None => format!(" {:>width$}", "-"),
        };
        for row in &self.rows {
            out += &format!("{:<32}", row.case);
            for v in &row.tokens_per_s {
                out += &cell(*v, 12, 1);
            }
            for r in row.ratio_to_first.iter().skip(1) {
                out += &cell(*r, 14, 3);
            }
            out.push('\n');
        }
        for f in &self.failed {
            out += &format!("{}: could not run: {}\n", f.device, f.error);
        }
        out
    }

    /// Draws the comparison as a grouped bar chart (one group per case, one bar per backend, a
    /// logarithmic tokens/s axis) to an SVG file.
    pub fn plot_svg(&self, path: &Path) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
        let values = self
            .rows
            .iter()
            .flat_map(|r| r.tokens_per_s.iter().flatten());
        let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
        if hi <= 0.0 {
            return Err(format!(
                "nothing to draw in {}: no backend measured a case",
                path.display()
            ));
        }
        let (lo, hi) = (lo.max(1e-3) / 2.0, hi * 2.0);
        let groups = self.rows.len();
        let width = (160 + 70 * groups * self.devices.len().max(1)).clamp(640, 4000) as u32;
        let root = SVGBackend::new(path, (width, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("tokens/s by backend", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(120)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..groups as f64, (lo..hi).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("tokens/s")
            .draw()
            .map_err(|e| err(&e))?;
        // Case names under their groups, written downwards.
        let style = ("sans-serif", 11)
            .into_font()
            .transform(FontTransform::Rotate90);
        for (g, row) in self.rows.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(g as f64 + 0.5, lo));
            root.draw(&Text::new(row.case.clone(), (x - 6, y + 8), style.clone()))
                .map_err(|e| err(&e))?;
        }
        let bars = self.devices.len().max(1) as f64;
        for (d, device) in self.devices.iter().enumerate() {
            let colour = Palette99::pick(d).to_rgba();
            let rects = self.rows.iter().enumerate().filter_map(|(g, row)| {
                let v = row.tokens_per_s.get(d).copied().flatten()?;
                let x0 = g as f64 + 0.1 + 0.8 * d as f64 / bars;
                let x1 = x0 + 0.8 / bars;
                Some(Rectangle::new([(x0, lo), (x1, v)], colour.filled()))
            });
            chart
                .draw_series(rects)
                .map_err(|e| err(&e))?
                .label(device.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs() -> Vec<BackendRun> {
        vec![
            BackendRun {
                device: "flex".into(),
                result: Ok(vec![("case-a".into(), 100.0), ("case-b".into(), 50.0)]),
            },
            BackendRun {
                device: "wgpu".into(),
                result: Ok(vec![("case-a".into(), 25.0)]),
            },
            BackendRun {
                device: "ndarray".into(),
                result: Err("no adapter".into()),
            },
        ]
    }

    /// Cases line up by name; a case one backend lacks is a gap, a failed backend a row of gaps
    /// and a line saying why.
    #[test]
    fn lines_up_cases_and_keeps_failures() {
        let c = Comparison::new(&runs());
        assert_eq!(c.devices, ["flex", "wgpu", "ndarray"]);
        assert_eq!(c.rows.len(), 2);
        assert_eq!(c.rows[0].tokens_per_s, [Some(100.0), Some(25.0), None]);
        assert_eq!(c.rows[0].ratio_to_first, [Some(1.0), Some(0.25), None]);
        assert_eq!(c.rows[1].tokens_per_s, [Some(50.0), None, None]);
        assert_eq!(c.failed.len(), 1);
        let table = c.table();
        assert!(table.contains("wgpu/flex"), "{table}");
        assert!(table.contains("0.250"), "{table}");
        assert!(
            table.contains("ndarray: could not run: no adapter"),
            "{table}"
        );
    }

    #[test]
    fn draws_a_bar_per_backend_and_case() {
        let dir = std::env::temp_dir().join(format!("moe-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bars.svg");
        Comparison::new(&runs()).plot_svg(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        // Three measured values, three bars (plus the legend's two swatches and the background).
        assert!(
            svg.contains("flex") && svg.contains("wgpu"),
            "legend names the backends"
        );
        let rects = svg.matches("<rect").count();
        assert!(rects >= 5, "{rects} rectangles");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
