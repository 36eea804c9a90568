//! `moe branch` and `moe merge`: Branch-Train-MiX from the command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use indicatif::MultiProgress;
use moe_core::MoeLayerConfig;
use moe_model::{ModelConfig, checkpoint};
use moe_train::branch::{Branch, BranchJob, merge_checkpoints, save_merged, train_branches};
use moe_train::{ByteTokenizer, Start, Tokenizer};

use crate::args::{RouterKind, TrainFlags, over_defaults};
use crate::resolve_checkpoint;
use crate::train_cmds::{corpus, stop_flag};

/// Arguments of `moe branch`.
#[derive(Args, Debug)]
pub struct BranchArgs {
    /// Dense base checkpoint (or a run directory: its latest checkpoint).
    #[arg(long, conflicts_with = "config")]
    base: Option<PathBuf>,
    /// Dense model config JSON for a fresh base (default: the dense model with the default MoE's
    /// active parameters). Every branch starts from the same seeded weights.
    #[arg(long, visible_alias = "model-config")]
    config: Option<PathBuf>,
    /// Training config JSON (the fields of train.json), the same for every branch; flags
    /// override it.
    #[arg(long)]
    train_config: Option<PathBuf>,
    /// Corpus directory, or `builtin` (the default).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory: branch `d` is written to DIR/d as an ordinary run.
    #[arg(long)]
    out: PathBuf,
    /// Domains to branch on, comma-separated (default: every domain of the corpus). One domain
    /// trains one branch alone, e.g. as one job of a scheduler.
    #[arg(long, value_delimiter = ',')]
    domains: Vec<String>,
    /// Devices, comma-separated; branch i trains on device i mod N (several may share one).
    #[arg(long, value_delimiter = ',', default_value = "flex")]
    devices: Vec<String>,
    #[command(flatten)]
    flags: TrainFlags,
    /// Train the branches one after another instead of concurrently.
    #[arg(long)]
    sequential: bool,
    /// Replace existing branch run directories.
    #[arg(long)]
    overwrite: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// Runs `moe branch`.
pub fn branch(a: BranchArgs) -> anyhow::Result<()> {
    let tokenizer = ByteTokenizer;
    let config = a.flags.resolve(a.train_config.as_deref(), None)?;
    config.validate()?;
    let base = match (&a.base, &a.config) {
        (Some(ckpt), _) => Start::From(resolve_checkpoint(ckpt)?),
        (None, config_path) => {
            let defaults = ModelConfig::new()
                .with_vocab_size(tokenizer.vocab_size())
                .dense_equivalent();
            let mut m = match config_path {
                Some(p) => over_defaults(&defaults, p)?,
                None => defaults,
            };
            m.max_seq_len = m.max_seq_len.max(config.seq_len);
            m.validate()?;
            Start::Fresh(m)
        }
    };
    let devices = crate::devices(&a.devices)?;
    let (corpus, source) = corpus(a.data.as_deref(), &config, &tokenizer)?;
    let domains = if a.domains.is_empty() {
        corpus.names()
    } else {
        a.domains.clone()
    };
    let branches: Vec<Branch> = domains
        .iter()
        .enumerate()
        .map(|(i, d)| Branch {
            domain: d.clone(),
            device: devices[i % devices.len()].clone(),
        })
        .collect();
    if !a.quiet {
        println!(
            "training {} branch{} ({}) {}, {} steps each, into {}",
            branches.len(),
            if branches.len() == 1 { "" } else { "es" },
            domains.join(", "),
            if a.sequential {
                "one after another"
            } else {
                "concurrently"
            },
            config.steps,
            a.out.display()
        );
    }
    let started = Instant::now();
    let outcomes = train_branches(BranchJob {
        base,
        config,
        corpus: &corpus,
        data_source: source,
        tokenizer: &tokenizer,
        out: a.out.clone(),
        branches,
        overwrite: a.overwrite,
        parallel: !a.sequential,
        progress: (!a.quiet).then(MultiProgress::new),
        stop: stop_flag(),
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let mut failed = Vec::new();
    for o in &outcomes {
        match &o.result {
            Ok(t) => println!(
                "branch {:<12} {} steps in {:.1}s, train loss {:.3} -> {:.3}, checkpoint {}",
                o.domain,
                t.steps,
                t.seconds,
                t.first_train_loss,
                t.final_train_loss,
                t.checkpoint.display()
            ),
            Err(e) => {
                eprintln!("branch {:<12} failed: {e}", o.domain);
                failed.push(o.domain.clone());
            }
        }
    }
    println!("all branches: {seconds:.1}s wall clock");
    if !failed.is_empty() {
        bail!(
            "{} of {} branches failed ({}); the others' checkpoints are intact",
            failed.len(),
            outcomes.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Arguments of `moe merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Branch checkpoints or branch run directories (their latest checkpoint); expert i is the
    /// i-th branch's FFN.
    #[arg(required = true, num_args = 2..)]
    branches: Vec<PathBuf>,
    /// The merged checkpoint directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Router of the merged MoE.
    #[arg(long, value_enum, default_value_t = RouterKind::Mixtral)]
    router: RouterKind,
    /// Seed of the routers' initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace an existing checkpoint at --out.
    #[arg(long)]
    overwrite: bool,
}

/// Runs `moe merge`.
pub fn merge(a: MergeArgs) -> anyhow::Result<()> {
    crate::refuse_existing(&a.out, a.overwrite)?;
    let branches = a
        .branches
        .iter()
        .map(|p| resolve_checkpoint(p))
        .collect::<Result<Vec<_>, _>>()?;
    let d = checkpoint::load_config(&branches[0])?.d_model;
    let moe = MoeLayerConfig::new(d, d, branches.len()).with_router(a.router.config(Some(a.top_k)));
    let device = burn::tensor::Device::flex();
    let (model, tokenizer, info) = merge_checkpoints(&branches, moe, a.seed, &device)?;
    let dir = save_merged(&a.out, &model, tokenizer.as_ref(), &info, a.overwrite)?;
    println!("merged {} branches into {}", branches.len(), dir.display());
    for (i, e) in info.experts.iter().enumerate() {
        println!(
            "  expert {i}: {} ({})",
            e.checkpoint.display(),
            if e.domains.is_empty() {
                "no domain recorded".into()
            } else {
                e.domains.join(", ")
            }
        );
    }
    let acc = model.config.accounting().total;
    println!(
        "{} parameters, {} active per token ({:.2}x); fine-tune the router with: moe train --from {} --train router --out RUN",
        acc.total_params,
        acc.active_params,
        acc.sparsity_ratio(),
        dir.display()
    );
    Ok(())
}
