//! Arguments and config-file handling shared by several commands.

use std::path::Path;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use moe_core::RouterConfig;
use moe_train::TrainConfig;

/// Training hyper-parameter flags (`moe train`, `moe branch`).
#[derive(Args, Debug, Clone)]
pub struct TrainFlags {
    /// Optimizer steps (default 1000).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Sequences per batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps between evaluation lines.
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Steps between checkpoints.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
}

impl TrainFlags {
    /// The training config: the JSON file `file` over the defaults (or `saved` when resuming),
    /// then these flags.
    pub fn resolve(
        &self,
        file: Option<&Path>,
        saved: Option<TrainConfig>,
    ) -> anyhow::Result<TrainConfig> {
        let mut c = match (file, saved) {
            (Some(p), _) => over_defaults(&TrainConfig::new(), p)?,
            (None, Some(saved)) => saved,
            (None, None) => TrainConfig::new(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { c.$field = v; })* };
        }
        set!(
            steps,
            batch_size,
            seq_len,
            lr,
            seed,
            eval_every,
            checkpoint_every
        );
        Ok(c)
    }
}

/// Routing presets for `--router`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RouterKind {
    /// Softmax over all experts, top-k renormalised.
    Mixtral,
    /// Top-1 softmax.
    Switch,
    /// Sigmoid scores with a balancing selection bias.
    Deepseek,
}

impl RouterKind {
    /// The preset's router config with `top_k` experts per token (`None`: the preset's).
    pub fn config(self, top_k: Option<usize>) -> RouterConfig {
        let k = top_k.unwrap_or(2);
        let router = match self {
            Self::Mixtral => RouterConfig::mixtral(),
            Self::Switch => RouterConfig::switch(),
            Self::Deepseek => RouterConfig::deepseek_v3(k),
        };
        match top_k {
            Some(k) => router.with_top_k(k),
            None => router,
        }
    }
}

/// Reads a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| format!("{}: malformed JSON", path.display()))
}

/// Reads a JSON config file whose fields override the defaults (nested objects too), so a file
/// names only what it changes.
pub fn over_defaults<T: serde::Serialize + serde::de::DeserializeOwned>(
    defaults: &T,
    path: &Path,
) -> anyhow::Result<T> {
    let mut user: serde_json::Value = read_json(path)?;
    if !user.is_object() {
        bail!(
            "{}: expected a JSON object of config fields",
            path.display()
        );
    }
    moe_model::fill_defaults(&mut user, &serde_json::to_value(defaults)?);
    serde_json::from_value(user).with_context(|| format!("{}: invalid config", path.display()))
}
