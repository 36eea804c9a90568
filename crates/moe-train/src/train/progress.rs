//! What a run shows while it trains: its progress bar and the one-line evaluation summaries.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Where a run shows its progress bar and evaluation lines.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Nothing is shown.
    Hidden,
    /// A progress bar of its own on the terminal.
    Terminal,
    /// One labelled bar among others (parallel branches), evaluation lines prefixed by the label.
    Shared {
        /// The bars of all runs.
        bars: MultiProgress,
        /// This run's label.
        label: String,
    },
}

impl Progress {
    pub(super) fn bar(&self, len: u64) -> ProgressBar {
        let (bar, label) = match self {
            Self::Hidden => return ProgressBar::hidden(),
            Self::Terminal => (ProgressBar::new(len), ""),
            Self::Shared { bars, label } => (bars.add(ProgressBar::new(len)), label.as_str()),
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix}{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("valid template"),
        );
        if !label.is_empty() {
            bar.set_prefix(format!("{label:<12} "));
        }
        bar
    }

    pub(super) fn shows(&self) -> bool {
        !matches!(self, Self::Hidden)
    }
}

/// The one-line evaluation summary printed during training.
pub fn format_eval_line(line: &serde_json::Value) -> String {
    let valid: Vec<String> = line["valid_loss"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or(f64::NAN)))
                .collect()
        })
        .unwrap_or_default();
    let mut s = format!(
        "step {:>5}  train {:.3}  valid [{}]",
        line["step"],
        line["train_loss"].as_f64().unwrap_or(f64::NAN),
        valid.join(", ")
    );
    if let Some(r) = line.get("routing") {
        s += &format!(
            "  load share {:.2}-{:.2} cv {:.2}  dropped {:.3}  entropy {:.2}",
            r["min_share"].as_f64().unwrap_or(0.0),
            r["max_share"].as_f64().unwrap_or(0.0),
            r["load_cv"].as_f64().unwrap_or(0.0),
            r["dropped_fraction"].as_f64().unwrap_or(0.0),
            r["entropy"].as_f64().unwrap_or(0.0)
        );
    }
    s
}
