//! The training configuration, saved as `train.json` in every run directory.

use burn::prelude::*;

use crate::error::DataError;

/// Which parameters a run trains.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum TrainPart {
    /// Every parameter.
    All,
    /// Only the routers (everything else frozen): fine-tuning a merged model's gates.
    Router,
    /// Only the feed-forward blocks (dense FFNs, experts, routers and shared experts; the
    /// embeddings, attention, norms and head frozen): branches that differ only in what
    /// becomes their expert, so merging them averages nothing.
    Ffn,
}

/// Hyper-parameters of a training run. Defaults train the default small MoE on the built-in
/// corpus in about 5 minutes on 2 CPU cores (release build).
#[derive(Config, Debug, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps. Default: 1000 (the default MoE leads the dense model on every domain of
    /// the built-in corpus from about 400 steps on, and the gap grows; see docs/results.md).
    #[config(default = 1000)]
    pub steps: usize,
    /// Sequences per batch. Default: 16.
    #[config(default = 16)]
    pub batch_size: usize,
    /// Tokens per sequence. Default: 128.
    #[config(default = 128)]
    pub seq_len: usize,
    /// Peak learning rate (AdamW). Default: 3e-3.
    #[config(default = 3e-3)]
    pub lr: f64,
    /// Learning rate at the end of the cosine decay. Default: 3e-4.
    #[config(default = 3e-4)]
    pub min_lr: f64,
    /// Linear warm-up steps. Default: 30.
    #[config(default = 30)]
    pub warmup_steps: usize,
    /// The routers' learning rate as a multiple of `lr` (and of `min_lr`), through warm-up and
    /// decay. Default: 1.
    #[config(default = 1.0)]
    pub router_lr_scale: f64,
    /// AdamW weight decay. Default: 0.01.
    #[config(default = 0.01)]
    pub weight_decay: f64,
    /// Gradient clipping by global norm. Default: 1.0.
    #[config(default = 1.0)]
    pub grad_clip: f64,
    /// Weight of the Switch balancing loss (mean over MoE layers). Default: 0.01.
    #[config(default = 0.01)]
    pub aux_loss_coef: f64,
    /// Weight of the router z-loss (mean over MoE layers). Default: 0.001.
    #[config(default = 0.001)]
    pub z_loss_coef: f64,
    /// Step of the auxiliary-loss-free bias update, for routers with a selection bias.
    /// Default: 0.001.
    #[config(default = 0.001)]
    pub bias_update_rate: f64,
    /// Steps between evaluation lines. Default: 100.
    #[config(default = 100)]
    pub eval_every: usize,
    /// Validation windows per domain at each evaluation during training. Default: 32.
    #[config(default = 32)]
    pub eval_windows: usize,
    /// Validation windows per domain of the final report (and of `moe eval` and `moe compare`
    /// on the run), spread evenly over the validation text. Default: 256.
    #[config(default = 256)]
    pub report_windows: usize,
    /// Steps between checkpoints (one is always written at the end). Default: 200.
    #[config(default = 200)]
    pub checkpoint_every: usize,
    /// Checkpoints kept in the run directory (older ones are removed). Default: 2.
    #[config(default = 2)]
    pub keep_checkpoints: usize,
    /// Seed of initialisation, data order and router jitter. Default: 42.
    #[config(default = 42)]
    pub seed: u64,
    /// Bytes of built-in training text per domain (validation text: a tenth of it).
    /// Default: 3000000.
    #[config(default = 3_000_000)]
    pub corpus_bytes: usize,
    /// Seed of the built-in corpus: its facts, vocabularies and text. Independent of `seed`, so
    /// runs with different seeds train and validate on the same text. Default: 0.
    #[config(default = 0)]
    pub corpus_seed: u64,
    /// Which parameters to train. Default: all.
    #[config(default = "TrainPart::All")]
    pub train: TrainPart,
}

impl TrainConfig {
    /// Checks every value.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(DataError::Config(m));
        for (name, v) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
            ("eval_every", self.eval_every),
            ("eval_windows", self.eval_windows),
            ("report_windows", self.report_windows),
            ("checkpoint_every", self.checkpoint_every),
            ("keep_checkpoints", self.keep_checkpoints),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if !(self.lr > 0.0 && self.lr <= 1.0) {
            return bad(format!("lr must be in (0, 1], got {}", self.lr));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(format!("min_lr must be in [0, lr], got {}", self.min_lr));
        }
        if !(self.router_lr_scale > 0.0 && self.router_lr_scale.is_finite()) {
            return bad(format!(
                "router_lr_scale must be > 0, got {}",
                self.router_lr_scale
            ));
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
            ("aux_loss_coef", self.aux_loss_coef),
            ("z_loss_coef", self.z_loss_coef),
            ("bias_update_rate", self.bias_update_rate),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!("{name} must be >= 0, got {v}"));
            }
        }
        Ok(())
    }
}
