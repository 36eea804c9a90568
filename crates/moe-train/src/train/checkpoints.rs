//! A run's checkpoints: saving one (model, tokenizer, optimizer, trainer state, merge record),
//! resuming from the latest, and finding the checkpoint of a run to report on.

use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use moe_model::MoeLm;
use moe_model::checkpoint::{self, CheckpointWriter, TOKENIZER_FILE};

use super::job::TrainJob;
use super::optimizer::optimizer;
use crate::config::TrainConfig;
use crate::error::{DataError, Result};
use crate::hf_tokenizer::{HF_TOKENIZER_DIR, copy_files};
use crate::merge_info::{MERGE_FILE, MergeInfo};
use crate::run::{Latest, OPTIMIZER_FILE, RunDir, STATE_FILE, TrainerState};

/// Saves a checkpoint of the run (model, tokenizer, optimizer, trainer state) atomically and
/// points `latest` at it.
pub(super) fn save_checkpoint(
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
    if let Some(files) = job.tokenizer.files() {
        copy_files(files, &writer.dir().join(HF_TOKENIZER_DIR))?;
    }
    if let Some(info) = merge {
        writer.write_json(MERGE_FILE, info)?;
    }
    let state = TrainerState {
        step,
        domains: job.corpus.names(),
        data: job.data_source.clone(),
        train: Some(job.config.clone()),
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
pub(super) fn resume_from(
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

/// The checkpoint of a run to report on: `dir` itself when it is a checkpoint, else the run's
/// latest.
pub fn resolve_checkpoint(dir: &Path) -> Result<PathBuf> {
    Ok(resolve_latest(dir)?.dir)
}

/// [`resolve_checkpoint`], with the warning of [`RunDir::find_latest`] when a run's `latest`
/// pointer names a missing or incomplete checkpoint (never for a checkpoint itself).
pub fn resolve_latest(dir: &Path) -> Result<Latest> {
    if dir.join(checkpoint::CONFIG_FILE).exists() {
        return Ok(Latest {
            dir: dir.to_path_buf(),
            warning: None,
        });
    }
    RunDir::open(dir)?
        .find_latest()?
        .ok_or_else(|| DataError::run(dir, "is neither a checkpoint nor a run with checkpoints"))
}
