//! The joint training loop: AdamW with warm-up and cosine decay, gradient clipping, balancing
//! losses or auxiliary-loss-free bias updates, periodic evaluation and atomic checkpoints, exact
//! resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::lr_scheduler::LrSchedulerConfig;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::prelude::*;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use moe_core::RoutingStats;
use moe_model::block::Ffn;
use moe_model::checkpoint::{self, CheckpointWriter, TOKENIZER_FILE};
use moe_model::model::seed_device;
use moe_model::{ModelConfig, MoeLm};
use serde_json::json;

use crate::branch::{MERGE_FILE, MergeInfo};
use crate::config::{TrainConfig, TrainPart};
use crate::data::{Batch, Corpus, train_windows};
use crate::error::{DataError, Result};
use crate::eval::{domain_losses, merge_routing, routing_line};
use crate::parallel::{StepEngine, StepResult};
use crate::run::{OPTIMIZER_FILE, RunDir, STATE_FILE, TrainerState};
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
    /// [`DataError::Interrupted`]), keeping the whole run's schedule; `--resume` continues.
    pub stop_after: Option<usize>,
}

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
    fn bar(&self, len: u64) -> ProgressBar {
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

    fn shows(&self) -> bool {
        !matches!(self, Self::Hidden)
    }
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

/// Warm-up from lr/100 to lr, then cosine to min_lr, as Burn schedulers.
pub fn lr_schedule(config: &TrainConfig) -> Result<ModuleLrScheduler> {
    let warmup = config.warmup_steps.min(config.steps.saturating_sub(1));
    let decay = (config.steps - warmup).max(1);
    let cosine = LrSchedulerConfig::Cosine(
        CosineAnnealingLrSchedulerConfig::new(config.lr, decay).with_min_lr(config.min_lr),
    );
    let schedule = if warmup == 0 {
        SequentialLrSchedulerConfig::new(vec![cosine], vec![])
    } else {
        SequentialLrSchedulerConfig::new(
            vec![
                LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(
                    config.lr / 100.0,
                    config.lr,
                    warmup,
                )),
                cosine,
            ],
            vec![warmup],
        )
    };
    schedule.init().map_err(DataError::Config)
}

fn optimizer(config: &TrainConfig) -> ModuleOptimizer {
    AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clipping(
            (config.grad_clip > 0.0)
                .then_some(GradientClippingConfig::Norm(config.grad_clip as f32)),
        )
        .init()
}

/// Freezes everything but the routers when only they are trained.
fn trainable(model: MoeLm, part: TrainPart) -> MoeLm {
    match part {
        TrainPart::All => model,
        TrainPart::Router => {
            let mut model = model.no_grad();
            for block in &mut model.blocks {
                if let Ffn::Moe(moe) = &mut block.ffn {
                    moe.router.gate = moe.router.gate.clone().set_require_grad(true);
                }
            }
            model
        }
    }
}

/// Cross-entropy of next-token prediction. logits: `[b, s, V]`, targets: `[b, s]`. Scalar `[1]`.
pub fn lm_loss(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits.reshape([b * s, v]), targets.reshape([b * s]))
}

/// One training step's loss: language model + weighted auxiliary losses (mean over MoE layers).
/// Returns (total, language-model part, routing statistics per MoE layer).
pub fn step_loss(
    model: &MoeLm,
    batch: &Batch,
    config: &TrainConfig,
) -> (Tensor<1>, Tensor<1>, Vec<(usize, RoutingStats)>) {
    let out = model.forward(batch.inputs.clone(), None);
    let lm = lm_loss(out.logits, batch.targets.clone());
    let mut loss = lm.clone();
    if let Some(aux) = out.aux {
        let n = out.routing.len() as f64;
        loss = loss
            + aux.balance.mul_scalar(config.aux_loss_coef / n)
            + aux.z.mul_scalar(config.z_loss_coef / n);
    }
    (loss, lm, out.routing)
}

/// Applies the auxiliary-loss-free bias update to every MoE layer with a selection bias.
fn update_biases(model: &mut MoeLm, routing: &[(usize, RoutingStats)], rate: f64) {
    for (layer, stats) in routing {
        if let Ffn::Moe(moe) = &mut model.blocks[*layer].ffn {
            moe.update_selection_bias(stats.load.clone(), rate);
        }
    }
}

/// Saves a checkpoint of the run (model, tokenizer, optimizer, trainer state) atomically and
/// points `latest` at it.
fn save_checkpoint(
    job: &TrainJob,
    model: &MoeLm,
    optim: &ModuleOptimizer,
    step: usize,
    merge: Option<&MergeInfo>,
) -> Result<PathBuf> {
    let target = job.run.checkpoint_dir(step);
    let writer = CheckpointWriter::new(&target)?;
    writer.write_model(&model.valid())?;
    writer.write_json(TOKENIZER_FILE, &job.tokenizer.spec())?;
    if let Some(info) = merge {
        writer.write_json(MERGE_FILE, info)?;
    }
    let state = TrainerState {
        step,
        domains: job.corpus.names(),
        data: job.data_source.clone(),
    };
    writer.write_json(STATE_FILE, &state)?;
    let path = writer.dir().join(OPTIMIZER_FILE);
    optim
        .save(&path)
        .map_err(|e| DataError::run(&path, format!("cannot write optimizer state: {e}")))?;
    let dir = writer.commit(true)?;
    job.run.set_latest(&dir, job.config.keep_checkpoints)?;
    Ok(dir)
}

/// Loads the model and optimizer of a run's latest checkpoint; returns them with the step and
/// the checkpoint's directory.
fn resume_from(
    run: &RunDir,
    config: &TrainConfig,
    device: &Device,
) -> Result<(MoeLm, ModuleOptimizer, usize, PathBuf)> {
    let dir = run
        .latest()?
        .ok_or_else(|| DataError::run(&run.path, "has no checkpoint to resume from"))?;
    let ckpt = checkpoint::load(&dir, device)?;
    let state = TrainerState::read(&dir)?;
    let optim_path = dir.join(OPTIMIZER_FILE);
    let optim = optimizer(config)
        .load(&optim_path)
        .map_err(|e| DataError::run(&optim_path, format!("unreadable optimizer state: {e}")))?;
    Ok((ckpt.model, optim, state.step, dir))
}

/// Runs (or resumes) a training job.
pub fn train(job: TrainJob) -> Result<TrainOutcome> {
    let config = &job.config;
    config.validate()?;
    job.corpus.check_window(config.seq_len + 1)?;
    let engine = StepEngine::new(&job.devices, config.batch_size)?;
    let device = engine.main_device().clone();
    // `source`: the checkpoint the model comes from, if any.
    let (model, mut optim, start_step, source) = match &job.start {
        Start::Fresh(model_config) => {
            let mut model_config = model_config.clone();
            if model_config.max_seq_len < config.seq_len {
                model_config.max_seq_len = config.seq_len;
            }
            (
                model_config.init_seeded(&device, config.seed)?,
                optimizer(config),
                0,
                None,
            )
        }
        Start::From(path) => (
            checkpoint::load(path, &device)?.model,
            optimizer(config),
            0,
            Some(path.clone()),
        ),
        Start::Resume => {
            job.run.remove_stale()?;
            let (model, optim, step, dir) = resume_from(&job.run, config, &device)?;
            (model, optim, step, Some(dir))
        }
    };
    if model.config.vocab_size < job.tokenizer.vocab_size() {
        return Err(DataError::Config(format!(
            "the model's vocabulary ({}) is smaller than the tokenizer's ({})",
            model.config.vocab_size,
            job.tokenizer.vocab_size()
        )));
    }
    if start_step >= config.steps {
        return Err(DataError::run(
            &job.run.path,
            format!(
                "already trained {start_step} of {} steps; pass --steps N with a larger N to continue",
                config.steps
            ),
        ));
    }
    // A merged model keeps the record of its experts' origins through fine-tuning.
    let merge = match &source {
        Some(dir) => MergeInfo::read(dir)?,
        None => None,
    };
    job.run.truncate_metrics(start_step)?;
    let mut model = trainable(model, config.train);
    let mut schedule = lr_schedule(config)?;
    for _ in 0..start_step {
        schedule.step();
    }

    let bar = job.progress.bar(config.steps as u64);
    bar.set_position(start_step as u64);
    let started = Instant::now();
    let tokens_per_step = (config.batch_size * config.seq_len) as f64;
    let (mut first_loss, mut recent) = (None, Vec::new());
    let mut window_loss = (0.0f64, 0usize);
    let mut window_stats: Vec<(usize, RoutingStats)> = Vec::new();
    let mut window_start = Instant::now();
    // Set by the checkpoint every run writes at its last step.
    let mut last_checkpoint = PathBuf::new();

    for step in start_step..config.steps {
        // Router jitter draws from the device generators; under the initialisation lock, so
        // that concurrent runs (branches) initialise reproducibly.
        for (i, d) in engine.devices().iter().enumerate() {
            seed_device(
                d,
                config
                    .seed
                    .wrapping_add(step as u64 + 1 + ((i as u64) << 32)),
            );
        }
        let windows = train_windows(
            job.corpus,
            config.seed,
            step,
            config.batch_size,
            config.seq_len,
        );
        let StepResult {
            loss: value,
            lm: lm_value,
            grads,
            routing,
        } = engine.step(&model, config, job.corpus, &windows)?;
        if !value.is_finite() {
            bar.abandon();
            return Err(DataError::NonFinite {
                step: step + 1,
                value,
            });
        }
        let lr = schedule.step();
        let lr_value = lr.base();
        model = optim.step(lr, model, grads);
        if config.bias_update_rate > 0.0 {
            update_biases(&mut model, &routing, config.bias_update_rate);
        }

        first_loss.get_or_insert(lm_value);
        recent.push(lm_value);
        if recent.len() > 20 {
            recent.remove(0);
        }
        window_loss = (window_loss.0 + f64::from(lm_value), window_loss.1 + 1);
        window_stats = merge_routing(window_stats, routing);
        let done = step + 1;
        let elapsed = started.elapsed().as_secs_f64();
        bar.set_position(done as u64);
        bar.set_message(format!(
            "loss {lm_value:.3} lr {lr_value:.1e} {:.0} tok/s",
            tokens_per_step * (done - start_step) as f64 / elapsed
        ));

        if done % config.eval_every == 0 || done == config.steps {
            let inference = model.valid();
            let valid = domain_losses(
                &inference,
                job.corpus,
                config.eval_windows,
                config.seq_len,
                config.batch_size,
            );
            let seconds = window_start.elapsed().as_secs_f64();
            let mut line = json!({
                "step": done,
                "train_loss": window_loss.0 / window_loss.1.max(1) as f64,
                "lr": lr_value,
                "tokens_per_s": tokens_per_step * window_loss.1 as f64 / seconds,
                "valid_loss": job.corpus.names().into_iter().zip(valid.iter().map(|v| json!(v))).collect::<serde_json::Map<_, _>>(),
            });
            if !window_stats.is_empty() {
                let summaries: Vec<_> = window_stats.iter().map(|(_, s)| s.summary()).collect();
                line["routing"] = routing_line(&summaries);
            }
            job.run.append_metrics(&line)?;
            if job.progress.shows() {
                let text = format!("{}{}", bar.prefix(), format_eval_line(&line));
                // Without a terminal (a log file) the bar is hidden and would swallow the line.
                if bar.is_hidden() {
                    println!("{text}");
                } else {
                    bar.println(text);
                }
            }
            window_loss = (0.0, 0);
            window_stats.clear();
            window_start = Instant::now();
        }
        let stop = job.stop.load(Ordering::SeqCst) || job.stop_after == Some(done);
        if done % config.checkpoint_every == 0 || done == config.steps || stop {
            last_checkpoint = save_checkpoint(&job, &model, &optim, done, merge.as_ref())?;
        }
        if stop && done < config.steps {
            bar.abandon();
            return Err(DataError::Interrupted(done));
        }
    }
    bar.finish_and_clear();
    Ok(TrainOutcome {
        model: model.valid(),
        steps: config.steps,
        checkpoint: last_checkpoint,
        final_train_loss: recent.iter().sum::<f32>() / recent.len().max(1) as f32,
        first_train_loss: first_loss.unwrap_or(f32::NAN),
        seconds: started.elapsed().as_secs_f64(),
    })
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

/// The checkpoint of a run to report on: `dir` itself when it is a checkpoint, else the run's
/// latest.
pub fn resolve_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join(checkpoint::CONFIG_FILE).exists() {
        return Ok(dir.to_path_buf());
    }
    RunDir::open(dir)?
        .latest()?
        .ok_or_else(|| DataError::run(dir, "is neither a checkpoint nor a run with checkpoints"))
}
