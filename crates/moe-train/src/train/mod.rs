//! The joint training loop: AdamW with warm-up and cosine decay, gradient clipping, balancing
//! losses or auxiliary-loss-free bias updates, periodic evaluation and atomic checkpoints, exact
//! resume.
//!
//! [`train`] runs in named steps: `prepare` loads or initialises the model and replays the
//! schedule to the starting step, `step_loop` runs the steps (each a `forward_backward` and an
//! optimizer step), with `evaluate_window` and `save_checkpoint` on their schedules.

mod checkpoints;
mod clip;
mod job;
mod optimizer;
mod progress;
mod tally;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use indicatif::ProgressBar;
use moe_model::MoeLm;
use moe_model::checkpoint;
use moe_model::model::seed_device;
use serde_json::json;

pub use checkpoints::{resolve_checkpoint, resolve_latest};
pub use clip::{clip_global_norm, global_norm};
pub use job::{Start, TrainJob, TrainOutcome};
pub use optimizer::lr_schedule;
pub use progress::{Progress, format_eval_line};

use self::checkpoints::{resume_from, save_checkpoint};
use self::optimizer::{optimizer, trainable, update_biases};
use self::tally::Tally;
use crate::data::train_windows;
use crate::error::{DataError, Result};
use crate::eval::domain_losses;
use crate::merge_info::MergeInfo;
use crate::parallel::{StepEngine, StepResult};
use crate::routing::routing_line;

/// Runs (or resumes) a training job.
pub fn train(job: TrainJob) -> Result<TrainOutcome> {
    let config = &job.config;
    config.validate()?;
    job.corpus.check_window(config.seq_len + 1)?;
    let engine = StepEngine::new(&job.devices, config.batch_size)?;
    let prepared = prepare(&job, engine.main_device())?;
    step_loop(&job, &engine, prepared)
}

/// A run ready for its first step.
struct Prepared {
    /// The model, with only the parts being trained requiring gradients.
    model: MoeLm,
    /// The optimizer, fresh or resumed.
    optim: ModuleOptimizer,
    /// The learning-rate schedule, replayed to `start_step`.
    schedule: ModuleLrScheduler,
    /// Steps already done.
    start_step: usize,
    /// The record of a merged model's experts, carried into every checkpoint.
    merge: Option<MergeInfo>,
}

/// Loads or initialises the model and optimizer, checks they fit the job, and brings the
/// metrics and the schedule to the starting step.
fn prepare(job: &TrainJob, device: &Device) -> Result<Prepared> {
    let config = &job.config;
    let (model, optim, start_step, source) = load_start(job, device)?;
    check_start(job, &model, start_step)?;
    // A merged model keeps the record of its experts' origins through fine-tuning.
    let merge = match &source {
        Some(dir) => MergeInfo::read(dir)?,
        None => None,
    };
    job.run.truncate_metrics(start_step)?;
    let model = trainable(model, config.train);
    let mut schedule = lr_schedule(config)?;
    for _ in 0..start_step {
        schedule.step();
    }
    Ok(Prepared {
        model,
        optim,
        schedule,
        start_step,
        merge,
    })
}

/// The model and optimizer the job starts from, the steps already done, and the checkpoint the
/// model comes from, if any.
fn load_start(
    job: &TrainJob,
    device: &Device,
) -> Result<(MoeLm, ModuleOptimizer, usize, Option<PathBuf>)> {
    let config = &job.config;
    Ok(match &job.start {
        Start::Fresh(model_config) => {
            let mut model_config = model_config.clone();
            if model_config.max_seq_len < config.seq_len {
                model_config.max_seq_len = config.seq_len;
            }
            (
                model_config.init_seeded(device, config.seed)?,
                optimizer(config),
                0,
                None,
            )
        }
        Start::From(path) => (
            checkpoint::load(path, device)?.model,
            optimizer(config),
            0,
            Some(path.clone()),
        ),
        Start::Resume => {
            job.run.remove_stale()?;
            let (model, optim, step, dir) = resume_from(&job.run, config, device)?;
            (model, optim, step, Some(dir))
        }
    })
}

/// Refuses a model whose vocabulary is smaller than the tokenizer's, and a run that has no
/// steps left.
fn check_start(job: &TrainJob, model: &MoeLm, start_step: usize) -> Result<()> {
    if model.config.vocab_size < job.tokenizer.vocab_size() {
        return Err(DataError::Config(format!(
            "the model's vocabulary ({}) is smaller than the tokenizer's ({})",
            model.config.vocab_size,
            job.tokenizer.vocab_size()
        )));
    }
    if start_step >= job.config.steps {
        return Err(DataError::run(
            &job.run.path,
            format!(
                "already trained {start_step} of {} steps; pass --steps N with a larger N to continue",
                job.config.steps
            ),
        ));
    }
    Ok(())
}

/// Runs the remaining steps, evaluating and checkpointing on schedule, and stopping early (after
/// a checkpoint) when asked to.
fn step_loop(job: &TrainJob, engine: &StepEngine, prepared: Prepared) -> Result<TrainOutcome> {
    let config = &job.config;
    let Prepared {
        mut model,
        mut optim,
        mut schedule,
        start_step,
        merge,
    } = prepared;
    let bar = job.progress.bar(config.steps as u64);
    bar.set_position(start_step as u64);
    let started = Instant::now();
    let tokens_per_step = (config.batch_size * config.seq_len) as f64;
    let mut tally = Tally::new();
    // Set by the checkpoint every run writes at its last step.
    let mut last_checkpoint = PathBuf::new();

    for step in start_step..config.steps {
        let StepResult {
            loss,
            lm,
            grads,
            routing,
        } = forward_backward(job, engine, &model, step)?;
        if !loss.is_finite() {
            bar.abandon();
            return Err(DataError::NonFinite {
                step: step + 1,
                value: loss,
            });
        }
        let (grads, _) = clip_global_norm(&model, grads, config.grad_clip);
        let lr = schedule.step();
        let lr_value = lr.base();
        model = optim.step(lr, model, grads);
        if config.bias_update_rate > 0.0 {
            update_biases(&mut model, &routing, config.bias_update_rate);
        }
        tally.record(lm, routing);
        let done = step + 1;
        let elapsed = started.elapsed().as_secs_f64();
        bar.set_position(done as u64);
        bar.set_message(format!(
            "loss {lm:.3} lr {lr_value:.1e} {:.0} tok/s",
            tokens_per_step * (done - start_step) as f64 / elapsed
        ));

        if done % config.eval_every == 0 || done == config.steps {
            evaluate_window(job, &model, &mut tally, done, lr_value, &bar)?;
        }
        let stop = job.stop.load(Ordering::SeqCst) || job.stop_after == Some(done);
        if done % config.checkpoint_every == 0 || done == config.steps || stop {
            last_checkpoint = save_checkpoint(job, &model, &optim, done, merge.as_ref())?;
        }
        if stop && done < config.steps {
            bar.abandon();
            return Err(DataError::Interrupted(done));
        }
    }
    bar.finish_and_clear();
    Ok(tally.outcome(model.valid(), config.steps, last_checkpoint, started))
}

/// Forward and backward of step `step`: reseeds the devices for the step and runs its batch.
fn forward_backward(
    job: &TrainJob,
    engine: &StepEngine,
    model: &MoeLm,
    step: usize,
) -> Result<StepResult> {
    let config = &job.config;
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
    engine.step(model, config, job.corpus, &windows)
}

/// Evaluates every domain after step `done`, appends the evaluation window's figures to
/// `metrics.jsonl`, shows them, and starts a new window.
fn evaluate_window(
    job: &TrainJob,
    model: &MoeLm,
    tally: &mut Tally,
    done: usize,
    lr: f64,
    bar: &ProgressBar,
) -> Result<()> {
    let config = &job.config;
    let tokens_per_step = (config.batch_size * config.seq_len) as f64;
    let inference = model.valid();
    let valid = domain_losses(
        &inference,
        job.corpus,
        config.eval_windows,
        config.seq_len,
        config.batch_size,
    );
    let seconds = tally.window_start.elapsed().as_secs_f64();
    let (loss_sum, steps) = tally.window_loss;
    let mut line = json!({
        "step": done,
        "train_loss": loss_sum / steps.max(1) as f64,
        "lr": lr,
        "tokens_per_s": tokens_per_step * steps as f64 / seconds,
        "valid_loss": job.corpus.names().into_iter().zip(valid.iter().map(|v| json!(v))).collect::<serde_json::Map<_, _>>(),
    });
    if !tally.window_stats.is_empty() {
        let summaries: Vec<_> = tally
            .window_stats
            .iter()
            .map(|(_, s)| s.summary())
            .collect();
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
    tally.new_window();
    Ok(())
}
