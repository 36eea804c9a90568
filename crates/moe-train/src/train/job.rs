//! What a training run is given and what it returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::prelude::*;
use moe_model::{ModelConfig, MoeLm};

use super::progress::Progress;
use crate::config::TrainConfig;
use crate::data::Corpus;
use crate::run::RunDir;
use crate::tokenizer::Tokenizer;

/// Where a run's model comes from.
// One per run: the config's size (its Hugging Face variant fields) costs nothing worth boxing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Start {
    /// A fresh model from a config.
    Fresh(ModelConfig),
    /// Fine-tune a checkpoint (optimizer state starts fresh).
    From(PathBuf),
    /// Continue the run in the run directory from its latest checkpoint.
    Resume,
}

/// Everything a training run needs.
pub struct TrainJob<'a> {
    /// Hyper-parameters.
    pub config: TrainConfig,
    /// Where the model comes from.
    pub start: Start,
    /// The data.
    pub corpus: &'a Corpus,
    /// "builtin" or the data directory, recorded in checkpoints.
    pub data_source: String,
    /// The tokenizer.
    pub tokenizer: &'a dyn Tokenizer,
    /// The run directory.
    pub run: RunDir,
    /// The devices (autodiff is enabled on them here). One device trains alone; with several,
    /// each step's batch is split across them (data parallel, see [`crate::parallel`]) and the
    /// model and optimizer live on the first.
    pub devices: Vec<Device>,
    /// Where progress goes.
    pub progress: Progress,
    /// Set from a signal handler: finish the step, checkpoint, stop.
    pub stop: Arc<AtomicBool>,
    /// Stop after this many steps in total, as an interruption would (checkpoint, then
    /// [`DataError::Interrupted`](crate::DataError::Interrupted)), keeping the whole run's
    /// schedule; `--resume` continues.
    pub stop_after: Option<usize>,
}

/// What a finished run returns.
#[derive(Debug)]
pub struct TrainOutcome {
    /// The trained model (inference copy).
    pub model: MoeLm,
    /// Steps completed in total.
    pub steps: usize,
    /// The final checkpoint.
    pub checkpoint: PathBuf,
    /// Mean training loss over the last 20 steps.
    pub final_train_loss: f32,
    /// The first step's training loss (of this invocation).
    pub first_train_loss: f32,
    /// Wall-clock seconds of this invocation.
    pub seconds: f64,
}
