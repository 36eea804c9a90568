//! `moe branch` and `moe merge`: Branch-Train-MiX from the command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::{Args, ValueEnum};
use indicatif::MultiProgress;
use moe_core::MoeLayerConfig;
use moe_model::{ModelConfig, checkpoint};
use moe_train::branch::{Branch, BranchJob, merge_checkpoints, save_merged, train_branches};
use moe_train::btm::{BtmBranch, btm_evaluate};
use moe_train::eval::{Windows, domain_evals};
use moe_train::router_init::routers_from_domain_means;
use moe_train::run::TrainerState;
use moe_train::{ByteTokenizer, Start, Tokenizer};

use crate::args::{RouterKind, TrainFlags, over_defaults};
use crate::train_cmds::{corpus, run_corpus, stop_flag};
use crate::{load_for_inference, resolve_checkpoint};

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
    /// Train only the feed-forward blocks of each branch (embeddings, attention, norms and head
    /// stay the base's), so that merging averages nothing: the merged model is the base with
    /// the branches' FFNs as experts.
    #[arg(long)]
    freeze_body: bool,
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
    let mut config = a.flags.resolve(a.train_config.as_deref(), None)?;
    if a.freeze_body {
        config.train = moe_train::TrainPart::Ffn;
    }
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

/// How a merged model's routers start.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum RouterInit {
    /// The router preset's initialisation (small random gates).
    Fresh,
    /// From each domain's mean hidden state.
    DomainMeans,
}

/// Training windows per domain the domain means are taken over.
const DOMAIN_MEAN_WINDOWS: usize = 64;

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
    /// A dense checkpoint (the branches' base, say) whose FFN becomes one more expert, last: a
    /// generalist beside the domain experts.
    #[arg(long)]
    generalist: Option<PathBuf>,
    /// How the routers start: `fresh` (random, small) or `domain-means` (each expert's gate
    /// points at its branch's domain's mean hidden state, computed on the training text).
    #[arg(long, value_enum, default_value_t = RouterInit::Fresh)]
    router_init: RouterInit,
    /// Corpus directory for `--router-init domain-means` (default: the corpus the first branch
    /// recorded).
    #[arg(long)]
    data: Option<PathBuf>,
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
    let generalist = a
        .generalist
        .as_deref()
        .map(resolve_checkpoint)
        .transpose()?;
    let (model, tokenizer, info) =
        merge_checkpoints(&branches, generalist.as_deref(), moe, a.seed, &device)?;
    let model = match a.router_init {
        RouterInit::Fresh => model,
        RouterInit::DomainMeans => {
            let tok = moe_train::hf_tokenizer::for_checkpoint(&branches[0], tokenizer.as_ref())?;
            let (corpus, run) = run_corpus(&branches[0], a.data.as_deref(), tok.as_ref())?;
            routers_from_domain_means(model, &corpus, &info, DOMAIN_MEAN_WINDOWS, run.seq_len)?
        }
    };
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
        "{} parameters, {} active per token ({:.2}x); fine-tune it on the mixture with: moe train --from {} --out RUN",
        acc.total_params,
        acc.active_params,
        acc.sparsity_ratio(),
        dir.display()
    );
    Ok(())
}

/// Arguments of `moe btm`.
#[derive(Args, Debug)]
pub struct BtmArgs {
    /// Branch checkpoints or branch run directories.
    #[arg(required = true, num_args = 2..)]
    branches: Vec<PathBuf>,
    /// Tokens at the start of each window that choose its branch; the rest are scored.
    #[arg(long, default_value_t = 32)]
    prefix: usize,
    /// Checkpoints (or run directories) to score on the same positions, comma-separated.
    #[arg(long, value_delimiter = ',')]
    against: Vec<PathBuf>,
    /// Corpus directory (default: the corpus the first branch recorded).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Validation windows per domain, or `all` (default: the first branch's `report_windows`).
    #[arg(long, value_parser = crate::train_cmds::parse_windows)]
    windows: Option<usize>,
    /// Device.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `moe btm`: Branch-Train-Merge inference (one branch per window, chosen by its prefix)
/// against other models on the same positions.
pub fn btm(a: BtmArgs) -> anyhow::Result<()> {
    let device = crate::device(&a.device)?;
    let load = |p: &PathBuf| load_for_inference(p, &device);
    let branches = a
        .branches
        .iter()
        .map(load)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (first, first_ckpt) = &branches[0];
    let tokenizer = moe_train::hf_tokenizer::for_checkpoint(first, first_ckpt.tokenizer.as_ref())?;
    let (corpus, run) = run_corpus(first, a.data.as_deref(), tokenizer.as_ref())?;
    if a.prefix == 0 || a.prefix >= run.seq_len {
        bail!("--prefix must be in 1..{} (the window length)", run.seq_len);
    }
    corpus.check_window(run.seq_len + 1)?;
    let w = Windows {
        per_domain: a.windows.unwrap_or(run.report_windows),
        seq_len: run.seq_len,
        batch: run.batch_size,
        from: a.prefix,
    };
    let btm_branches: Vec<BtmBranch> = branches
        .iter()
        .map(|(dir, ckpt)| BtmBranch {
            model: &ckpt.model,
            domains: TrainerState::read(dir)
                .map(|s| s.domains)
                .unwrap_or_default(),
        })
        .collect();
    let report = btm_evaluate(&btm_branches, &corpus, w);
    let against = a
        .against
        .iter()
        .map(|p| {
            let (dir, ckpt) = load(p)?;
            Ok((dir, domain_evals(&ckpt.model, &corpus, w)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if a.json {
        let json = serde_json::json!({
            "btm": report,
            "against": against.iter().map(|(dir, evals)| serde_json::json!({
                "checkpoint": dir, "losses": evals,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!(
        "loss over positions {}..{} of {} windows per domain (± standard error); BTM picks one branch per window by its first {} tokens",
        a.prefix,
        run.seq_len,
        w.per_domain.min(report.losses[0].windows),
        a.prefix
    );
    for (i, path) in a.against.iter().enumerate() {
        println!("[{}] {}", i + 1, path.display());
    }
    print!("{:<12} {:>18} {:>10}", "domain", "BTM", "own branch");
    for i in 0..against.len() {
        print!(" {:>18}", format!("[{}]", i + 1));
    }
    println!();
    for (d, l) in report.losses.iter().enumerate() {
        let own = report.own_branch[d].map_or("-".into(), |s| format!("{s:.2}"));
        print!(
            "{:<12} {:>9.4} ± {:.4} {:>10}",
            l.domain, l.loss, l.stderr, own
        );
        for (_, evals) in &against {
            print!(" {:>9.4} ± {:.4}", evals[d].loss, evals[d].stderr);
        }
        println!();
    }
    Ok(())
}
