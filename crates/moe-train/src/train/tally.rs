//! The running figures of a run: its first loss, the last 20 losses, and the current
//! evaluation window's loss, routing and start time.

use std::path::PathBuf;
use std::time::Instant;

use moe_core::RoutingStats;
use moe_model::MoeLm;

use super::job::TrainOutcome;
use crate::routing::merge_routing;

/// Losses and routing statistics gathered step by step.
pub(super) struct Tally {
    /// The first step's language-model loss (of this invocation).
    first: Option<f32>,
    /// The last 20 language-model losses.
    recent: Vec<f32>,
    /// Sum and count of the evaluation window's language-model losses.
    pub window_loss: (f64, usize),
    /// The evaluation window's routing statistics per MoE layer.
    pub window_stats: Vec<(usize, RoutingStats)>,
    /// When the evaluation window began.
    pub window_start: Instant,
}

impl Tally {
    /// Nothing recorded, the window starting now.
    pub fn new() -> Self {
        Self {
            first: None,
            recent: Vec::new(),
            window_loss: (0.0, 0),
            window_stats: Vec::new(),
            window_start: Instant::now(),
        }
    }

    /// Records one step's language-model loss and routing statistics.
    pub fn record(&mut self, lm: f32, routing: Vec<(usize, RoutingStats)>) {
        self.first.get_or_insert(lm);
        self.recent.push(lm);
        if self.recent.len() > 20 {
            self.recent.remove(0);
        }
        self.window_loss = (self.window_loss.0 + f64::from(lm), self.window_loss.1 + 1);
        self.window_stats = merge_routing(std::mem::take(&mut self.window_stats), routing);
    }

    /// Starts a new evaluation window.
    pub fn new_window(&mut self) {
        self.window_loss = (0.0, 0);
        self.window_stats.clear();
        self.window_start = Instant::now();
    }

    /// The outcome of a finished run that started at `started`.
    pub fn outcome(
        &self,
        model: MoeLm,
        steps: usize,
        checkpoint: PathBuf,
        started: Instant,
    ) -> TrainOutcome {
        TrainOutcome {
            model,
            steps,
            checkpoint,
            final_train_loss: self.recent.iter().sum::<f32>() / self.recent.len().max(1) as f32,
            first_train_loss: self.first.unwrap_or(f32::NAN),
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}
