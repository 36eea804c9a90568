//! Branch training and merging (Branch-Train-MiX, Sukhbaatar et al., 2024): copies of one dense
//! base model are trained independently, each on its own domain, then merged into one MoE whose
//! experts are the branches' FFNs.
//!
//! Branches never communicate: [`train_branches`] runs them as threads of one process (each on
//! its own device from a list, several may share one), and a single branch is an ordinary run,
//! so branches can just as well run as separate processes on separate machines and be merged
//! later with [`merge_checkpoints`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::prelude::*;
use indicatif::MultiProgress;
use moe_core::MoeLayerConfig;
use moe_model::checkpoint::{self, CheckpointWriter, TOKENIZER_FILE};
use moe_model::merge::{architecture_mismatch, merge};
use moe_model::{ModelConfig, MoeLm};

use crate::config::TrainConfig;
use crate::data::Corpus;
use crate::error::{DataError, Result, panic_message};
use crate::hf_tokenizer::carry;
use crate::merge_info::{ExpertSource, MERGE_FILE, MergeInfo};
use crate::run::{RunDir, TrainerState};
use crate::tokenizer::Tokenizer;
use crate::train::{Progress, Start, TrainJob, TrainOutcome, train};

/// One branch: a domain and the device it trains on.
#[derive(Debug, Clone)]
pub struct Branch {
    /// The domain (a corpus domain name); also the branch's run directory under `out`.
    pub domain: String,
    /// The device.
    pub device: Device,
}

/// Everything a set of branches needs.
pub struct BranchJob<'a> {
    /// The base every branch starts from: a fresh dense model from a config (the same seed
    /// gives every branch the same weights) or a dense checkpoint.
    pub base: Start,
    /// Hyper-parameters, the same for every branch.
    pub config: TrainConfig,
    /// The corpus holding every branch's domain.
    pub corpus: &'a Corpus,
    /// "builtin" or the data directory, recorded in checkpoints.
    pub data_source: String,
    /// The tokenizer.
    pub tokenizer: &'a dyn Tokenizer,
    /// Branch `d` is written to `out/d` as an ordinary run directory.
    pub out: PathBuf,
    /// The branches.
    pub branches: Vec<Branch>,
    /// Replace existing branch run directories.
    pub overwrite: bool,
    /// Train the branches concurrently (threads) rather than one after another.
    pub parallel: bool,
    /// Progress bars (one per branch), or `None` for silence.
    pub progress: Option<MultiProgress>,
    /// Set from a signal handler: every branch finishes its step, checkpoints and stops.
    pub stop: Arc<AtomicBool>,
}

/// How one branch ended.
#[derive(Debug)]
pub struct BranchOutcome {
    /// The branch's domain.
    pub domain: String,
    /// Its run directory.
    pub run: PathBuf,
    /// The finished run, or why it failed (the other branches are unaffected).
    pub result: Result<TrainOutcome>,
}

/// Checks the base is dense, the domains are distinct and exist, and each has room for a window.
fn check_job(job: &BranchJob) -> Result<()> {
    let base: ModelConfig = match &job.base {
        Start::Fresh(config) => config.clone(),
        Start::From(path) => checkpoint::load_config(path)?,
        Start::Resume => {
            return Err(DataError::Branch(
                "branches start from a base; resume a branch with `moe train --resume --out DIR/<domain>`".into(),
            ));
        }
    };
    if base.n_moe_layers() > 0 {
        return Err(DataError::Branch(
            "the base must be a dense model (its FFNs become the experts)".into(),
        ));
    }
    if job.branches.is_empty() {
        return Err(DataError::Branch("no domains to train".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for b in &job.branches {
        if !seen.insert(&b.domain) {
            return Err(DataError::Branch(format!(
                "domain '{}' is listed twice",
                b.domain
            )));
        }
    }
    let domains: Vec<String> = job.branches.iter().map(|b| b.domain.clone()).collect();
    job.corpus
        .select(&domains)?
        .check_window(job.config.seq_len + 1)
}

/// Trains one branch: its own run directory, its own domain's data.
fn train_one(job: &BranchJob, branch: &Branch) -> Result<TrainOutcome> {
    let corpus = job.corpus.select(std::slice::from_ref(&branch.domain))?;
    let run = RunDir::create(&job.out.join(&branch.domain), job.overwrite)?;
    run.write_config(&job.config)?;
    train(TrainJob {
        config: job.config.clone(),
        start: job.base.clone(),
        corpus: &corpus,
        data_source: job.data_source.clone(),
        tokenizer: job.tokenizer,
        run,
        devices: vec![branch.device.clone()],
        progress: match &job.progress {
            Some(bars) => Progress::Shared {
                bars: bars.clone(),
                label: branch.domain.clone(),
            },
            None => Progress::Hidden,
        },
        stop: job.stop.clone(),
        stop_after: None,
    })
}

/// Trains every branch, concurrently or one after another. An error before any branch starts
/// (a base that is not dense, an unknown domain) is returned as such; a failing branch is
/// reported in its outcome and leaves the others running and their checkpoints intact.
pub fn train_branches(job: BranchJob) -> Result<Vec<BranchOutcome>> {
    check_job(&job)?;
    let outcome = |branch: &Branch, result| BranchOutcome {
        domain: branch.domain.clone(),
        run: job.out.join(&branch.domain),
        result,
    };
    if !job.parallel {
        return Ok(job
            .branches
            .iter()
            .map(|b| outcome(b, train_one(&job, b)))
            .collect());
    }
    Ok(std::thread::scope(|scope| {
        let handles: Vec<_> = job
            .branches
            .iter()
            .map(|b| scope.spawn(|| train_one(&job, b)))
            .collect();
        handles
            .into_iter()
            .zip(&job.branches)
            .map(|(h, b)| {
                let result = h.join().unwrap_or_else(|panic| {
                    Err(DataError::Internal(panic_message(&*panic).into()))
                });
                outcome(b, result)
            })
            .collect()
    }))
}

/// Merges branch checkpoints into an MoE model (expert `i` from `branches[i]`) on `device`.
/// Architectures and tokenizers must match; errors name the offending checkpoint.
/// Returns the model, the shared tokenizer description and the merge description.
/// With a `generalist` checkpoint (the branches' dense seed, say), its FFN becomes one more
/// expert, last, which takes no part in the mean of the other weights.
pub fn merge_checkpoints(
    branches: &[PathBuf],
    generalist: Option<&Path>,
    moe: MoeLayerConfig,
    seed: u64,
    device: &Device,
) -> Result<(MoeLm, Option<serde_json::Value>, MergeInfo)> {
    let configs = branches
        .iter()
        .map(|p| checkpoint::load_config(p))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    for (path, config) in branches.iter().zip(&configs) {
        if let Some(problem) = architecture_mismatch(&configs[0], config) {
            return Err(DataError::run(path, problem));
        }
    }
    let mut models = Vec::new();
    let mut tokenizer = None;
    let mut experts = Vec::new();
    for (i, path) in branches.iter().enumerate() {
        let ckpt = checkpoint::load(path, device)?;
        if i > 0 && ckpt.tokenizer != tokenizer {
            return Err(DataError::run(
                path,
                "has a different tokenizer from the first branch",
            ));
        }
        tokenizer = ckpt.tokenizer;
        let domains = match TrainerState::read(path) {
            Ok(state) => state.domains,
            Err(_) => Vec::new(),
        };
        experts.push(ExpertSource {
            checkpoint: path.clone(),
            domains,
            generalist: false,
        });
        models.push(ckpt.model);
    }
    let generalist = match generalist {
        Some(path) => {
            let ckpt = checkpoint::load(path, device)?;
            if let Some(problem) = architecture_mismatch(&configs[0], &ckpt.model.config) {
                return Err(DataError::run(path, problem));
            }
            experts.push(ExpertSource {
                checkpoint: path.to_path_buf(),
                domains: Vec::new(),
                generalist: true,
            });
            Some(ckpt.model)
        }
        None => None,
    };
    let model = merge(models, generalist.as_ref(), moe, seed)?;
    Ok((model, tokenizer, MergeInfo { experts, seed }))
}

/// Writes a merged model as a checkpoint with its tokenizer (the description and any files the
/// first branch carries) and `merge.json`, atomically.
pub fn save_merged(
    dir: &Path,
    model: &MoeLm,
    tokenizer: Option<&serde_json::Value>,
    info: &MergeInfo,
    overwrite: bool,
) -> Result<PathBuf> {
    let writer = CheckpointWriter::new(dir)?;
    writer.write_model(model)?;
    if let Some(spec) = tokenizer {
        writer.write_json(TOKENIZER_FILE, spec)?;
    }
    writer.write_json(MERGE_FILE, info)?;
    if let Some(first) = info.experts.first() {
        carry(&first.checkpoint, writer.dir())?;
    }
    Ok(writer.commit(overwrite)?)
}
