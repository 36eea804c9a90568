//! Files a run leaves for people: an SVG heatmap of each MoE layer's domain x expert routing
//! table, an SVG loss curve, and generated samples per domain.

use std::path::Path;

use moe_model::MoeLm;
use moe_model::generate::{Sampling, generate};
use plotters::prelude::*;

use crate::data::Corpus;
use crate::error::{DataError, Result};
use crate::eval::{EvalReport, RoutingTable};
use crate::tokenizer::Tokenizer;

fn plot_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::run(path, format!("cannot draw: {e}"))
}

/// Writes one layer's routing table as an SVG heatmap (domains as rows, experts as columns).
pub fn write_heatmap(path: &Path, domains: &[String], table: &RoutingTable) -> Result<()> {
    let experts = table.shares.first().map_or(0, Vec::len);
    let (w, h) = (120 + 52 * experts as u32, 90 + 40 * domains.len() as u32);
    let root = SVGBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let title = format!(
        "layer {} routing: share of each domain's tokens (NMI {:.3})",
        table.layer, table.nmi
    );
    root.draw(&Text::new(title, (10, 10), ("sans-serif", 14)))
        .map_err(|e| plot_err(path, e))?;
    let max = table.shares.iter().flatten().cloned().fold(1e-9, f64::max);
    for (d, (name, row)) in domains.iter().zip(&table.shares).enumerate() {
        let y = 50 + 40 * d as i32;
        root.draw(&Text::new(name.clone(), (10, y + 12), ("sans-serif", 13)))
            .map_err(|e| plot_err(path, e))?;
        for (e, share) in row.iter().enumerate() {
            let x = 110 + 52 * e as i32;
            let t = share / max;
            let colour = RGBColor(255 - (t * 200.0) as u8, 255 - (t * 120.0) as u8, 255);
            root.draw(&Rectangle::new([(x, y), (x + 50, y + 38)], colour.filled()))
                .map_err(|e| plot_err(path, e))?;
            root.draw(&Text::new(
                format!("{share:.2}"),
                (x + 10, y + 12),
                ("sans-serif", 12),
            ))
            .map_err(|e| plot_err(path, e))?;
        }
    }
    for e in 0..experts {
        let x = 110 + 52 * e as i32;
        root.draw(&Text::new(
            format!("e{e}"),
            (x + 16, 60 + 40 * domains.len() as i32),
            ("sans-serif", 12),
        ))
        .map_err(|e| plot_err(path, e))?;
    }
    root.present().map_err(|e| plot_err(path, e))
}

/// Writes the training and validation loss curves from `metrics.jsonl` lines as an SVG.
pub fn write_loss_curve(path: &Path, metrics: &[serde_json::Value]) -> Result<()> {
    let points = |key: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter_map(|m| Some((m["step"].as_f64()?, key(m)?)))
            .collect()
    };
    let mut series = vec![("train".to_string(), points(&|m| m["train_loss"].as_f64()))];
    if let Some(domains) = metrics.first().and_then(|m| m["valid_loss"].as_object()) {
        for name in domains.keys() {
            let n = name.clone();
            series.push((
                format!("valid {name}"),
                points(&move |m| m["valid_loss"][&n].as_f64()),
            ));
        }
    }
    let (max_step, max_loss) = series
        .iter()
        .flat_map(|s| s.1.iter())
        .fold((1.0f64, 0.1f64), |(s, l), p| (s.max(p.0), l.max(p.1)));
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss (nats per token)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(40)
        .build_cartesian_2d(0.0..max_step, 0.0..max_loss * 1.05)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .draw()
        .map_err(|e| plot_err(path, e))?;
    for (i, (name, pts)) in series.into_iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
            .map_err(|e| plot_err(path, e))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}

/// Writes `loss.svg` and one `routing-layer-N.svg` per MoE layer into `dir`.
pub fn write_figures(
    dir: &Path,
    report: &EvalReport,
    metrics: &[serde_json::Value],
) -> Result<Vec<std::path::PathBuf>> {
    let mut written = Vec::new();
    if !metrics.is_empty() {
        let p = dir.join("loss.svg");
        write_loss_curve(&p, metrics)?;
        written.push(p);
    }
    for t in &report.tables {
        let p = dir.join(format!("routing-layer-{}.svg", t.layer));
        write_heatmap(&p, &report.domains, t)?;
        written.push(p);
    }
    Ok(written)
}

/// One generated sample.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Domain the prompt came from.
    pub domain: String,
    /// The prompt (the start of a validation document).
    pub prompt: String,
    /// The continuation.
    pub text: String,
}

/// Continues the start of each domain's first validation document.
pub fn samples(
    model: &MoeLm,
    corpus: &Corpus,
    tokenizer: &dyn Tokenizer,
    prompt_len: usize,
    new_tokens: usize,
    seed: u64,
) -> Result<Vec<Sample>> {
    let sampling = Sampling {
        temperature: 0.7,
        top_k: Some(20),
        top_p: Some(0.95),
        seed,
        ..Sampling::greedy()
    };
    corpus
        .domains
        .iter()
        .map(|d| {
            let prompt: Vec<u32> = d
                .valid
                .iter()
                .copied()
                .take_while(|&t| t != tokenizer.eos())
                .take(prompt_len)
                .collect();
            let text = generate(model, &prompt, new_tokens, &sampling, &tokenizer.eos_ids())?;
            Ok(Sample {
                domain: d.name.clone(),
                prompt: tokenizer.decode(&prompt),
                text: tokenizer.decode(&text),
            })
        })
        .collect()
}
