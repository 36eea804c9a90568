//! `moe train` and `moe eval`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::bail;
use clap::{Args, ValueEnum};
use moe_core::MoeLayerConfig;
use moe_model::{ModelConfig, checkpoint};
use moe_train::compare::{group_runs, seed_dir};
use moe_train::eval::random_router_controls;
use moe_train::merge_info::MergeInfo;
use moe_train::parallel::check_split;
use moe_train::report::{samples, write_figures};
use moe_train::run::{TrainerState, write_atomic};
use moe_train::{
    ByteTokenizer, Corpus, Progress, RunDir, Start, Tokenizer, TrainConfig, TrainJob, TrainPart,
    evaluate, train as run_train,
};

use crate::args::{RouterKind, TrainFlags, over_defaults};
use crate::resolve_checkpoint;

/// Which parameters `--train` updates.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Part {
    /// Every parameter.
    All,
    /// Only the routers.
    Router,
    /// Only the feed-forward blocks (FFNs, experts, routers).
    Ffn,
}

/// Arguments of `moe train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Run directory (default: runs/moe, or runs/dense with --dense).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Training config JSON (the fields of train.json); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: TrainFlags,
    /// Model config JSON (the fields of a checkpoint's config.json).
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Corpus directory: one sub-directory or file of UTF-8 text per domain (default: built-in).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Device: flex, ndarray, wgpu, wgpu:N, wgpu:cpu. Several, comma-separated (wgpu:0,wgpu:1),
    /// train data-parallel: each step's batch is split across them.
    #[arg(long, value_delimiter = ',', default_value = "flex")]
    device: Vec<String>,
    /// Train the dense model with the same active parameters per token instead.
    #[arg(long)]
    dense: bool,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long, conflicts_with_all = ["overwrite", "from", "model_config", "dense"])]
    resume: bool,
    /// Replace an existing run directory.
    #[arg(long)]
    overwrite: bool,
    /// Start from this checkpoint (or a run's latest) instead of a fresh model.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Which parameters to train.
    #[arg(long, value_enum, default_value_t = Part::All)]
    train: Part,
    /// Routing preset of a fresh MoE model.
    #[arg(long, value_enum)]
    router: Option<RouterKind>,
    /// Experts per MoE layer of a fresh model.
    #[arg(long)]
    experts: Option<usize>,
    /// Experts per token of a fresh model.
    #[arg(long)]
    top_k: Option<usize>,
    /// Stop after this many steps in total, checkpointed as if interrupted, keeping the whole
    /// run's learning-rate schedule (for time-limited jobs); continue with --resume.
    #[arg(long)]
    stop_after: Option<usize>,
    /// No progress bar, evaluation lines or final report.
    #[arg(long)]
    quiet: bool,
    /// Train this many runs with consecutive seeds (from --seed), each in OUT/seed-N, and
    /// summarise their validation losses with 95% intervals (compare groups with `moe compare`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
}

/// The run's training config (`saved` when resuming), checked, including that its batches can
/// be split across the `--device` list.
fn train_config(a: &TrainArgs, saved: Option<TrainConfig>) -> anyhow::Result<TrainConfig> {
    let mut c = a.flags.resolve(a.config.as_deref(), saved)?;
    c.train = match a.train {
        Part::All => TrainPart::All,
        Part::Router => TrainPart::Router,
        Part::Ffn => TrainPart::Ffn,
    };
    c.validate()?;
    check_split(a.device.len(), c.batch_size)?;
    Ok(c)
}

fn model_config(
    a: &TrainArgs,
    tokenizer: &dyn Tokenizer,
    seq_len: usize,
) -> anyhow::Result<ModelConfig> {
    let defaults = ModelConfig::new().with_vocab_size(tokenizer.vocab_size());
    let mut m = match &a.model_config {
        Some(p) => over_defaults(&defaults, p)?,
        None => defaults,
    };
    let mut moe: MoeLayerConfig = m.moe.clone();
    if let Some(r) = a.router {
        moe.router = r.config(a.top_k);
    } else if let Some(k) = a.top_k {
        moe.router.top_k = k;
    }
    if let Some(e) = a.experts {
        moe.n_experts = e;
    }
    m.moe = moe;
    m.max_seq_len = m.max_seq_len.max(seq_len);
    if a.dense {
        m = m.dense_equivalent();
    }
    m.validate()?;
    Ok(m)
}

/// The corpus of `--data DIR` (`builtin` or no flag: the built-in one) and how to name its source.
pub(crate) fn corpus(
    data: Option<&Path>,
    config: &TrainConfig,
    tokenizer: &dyn Tokenizer,
) -> anyhow::Result<(Corpus, String)> {
    Ok(match data.filter(|d| *d != Path::new("builtin")) {
        Some(dir) => (
            Corpus::from_dir(dir, 0.1, tokenizer)?,
            dir.display().to_string(),
        ),
        None => (
            Corpus::builtin(config.corpus_seed, config.corpus_bytes, tokenizer),
            "builtin".into(),
        ),
    })
}

/// A flag set by the first Ctrl-C (runs finish their step, checkpoint and stop); a second
/// Ctrl-C ends the process at once.
pub(crate) fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // Ignore a failure to install (e.g. a handler already set): Ctrl-C then ends the process,
    // and the last checkpoint still stands.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to quit now)"
        );
    });
    stop
}

/// The run directory of `moe train` (default: runs/moe, or runs/dense with --dense).
fn out_dir(a: &TrainArgs) -> PathBuf {
    a.out
        .clone()
        .unwrap_or_else(|| PathBuf::from(if a.dense { "runs/dense" } else { "runs/moe" }))
}

/// Runs `moe train`: one run, or `--seeds N` runs and their summary.
pub fn train(a: TrainArgs) -> anyhow::Result<()> {
    if a.seeds == 1 {
        return train_one(a);
    }
    let out = out_dir(&a);
    let seeds: Vec<u64> = if a.resume {
        let found: Vec<u64> = group_runs(&out)?
            .into_iter()
            .filter_map(|(_, s)| s)
            .collect();
        if found.is_empty() {
            bail!("{}: has no seed-N runs to resume", out.display());
        }
        found
    } else {
        let first = a.flags.resolve(a.config.as_deref(), None)?.seed;
        (first..first + a.seeds).collect()
    };
    for &seed in &seeds {
        let mut run = a.clone();
        run.seeds = 1;
        run.out = Some(seed_dir(&out, seed));
        run.flags.seed = Some(seed);
        if !a.quiet {
            println!(
                "
== seed {seed} =="
            );
        }
        train_one(run)?;
    }
    if !a.quiet {
        println!();
        crate::compare_cmd::print_comparison(&[out], None, None, &a.device[0], false)?;
    }
    Ok(())
}

/// Runs one training run.
fn train_one(a: TrainArgs) -> anyhow::Result<()> {
    let out = out_dir(&a);
    let devices = crate::devices(&a.device)?;
    // Every input is read and checked before the run directory is created or touched.
    let tokenizer: Box<dyn Tokenizer>;
    let (run, config, start, corpus, source) = if a.resume {
        let run = RunDir::open(&out)?;
        let config = train_config(&a, Some(run.read_config()?))?;
        let Some(ckpt) = crate::latest_checkpoint(&run)? else {
            bail!("{}: has no checkpoint to resume from", out.display());
        };
        tokenizer = checkpoint_tokenizer(&ckpt)?;
        let tokenizer = tokenizer.as_ref();
        let state = TrainerState::read(&ckpt)?;
        let data = a
            .data
            .clone()
            .or_else(|| (state.data != "builtin").then(|| PathBuf::from(&state.data)));
        let (corpus, source) = corpus(data.as_deref(), &config, tokenizer)?;
        // The domains the run trained on (a branch trains on one).
        let corpus = corpus.select(&state.domains)?;
        (run, config, Start::Resume, corpus, source)
    } else {
        let config = train_config(&a, None)?;
        let start = match &a.from {
            Some(ckpt) => {
                let ckpt = resolve_checkpoint(ckpt)?;
                checkpoint::load_config(&ckpt)?;
                // A model trains on with the tokenizer it was made with.
                tokenizer = checkpoint_tokenizer(&ckpt)?;
                Start::From(ckpt)
            }
            None => {
                tokenizer = Box::new(ByteTokenizer);
                Start::Fresh(model_config(&a, tokenizer.as_ref(), config.seq_len)?)
            }
        };
        let tokenizer = tokenizer.as_ref();
        let (corpus, source) = corpus(a.data.as_deref(), &config, tokenizer)?;
        corpus.check_window(config.seq_len + 1)?;
        let run = RunDir::create(&out, a.overwrite)?;
        (run, config, start, corpus, source)
    };
    run.write_config(&config)?;

    let stop = stop_flag();
    let verbose = !a.quiet;
    if verbose {
        println!(
            "training on {} ({}), {} steps, run directory {}",
            a.device.join(","),
            source,
            config.steps,
            run.path.display()
        );
    }
    let outcome = run_train(TrainJob {
        config: config.clone(),
        start,
        corpus: &corpus,
        data_source: source,
        tokenizer: tokenizer.as_ref(),
        run: run.clone(),
        devices,
        progress: if verbose {
            Progress::Terminal
        } else {
            Progress::Hidden
        },
        stop,
        stop_after: a.stop_after,
    });
    let outcome = match outcome {
        // Stopping where asked is success; a Ctrl-C is reported by main (exit 130).
        Err(moe_train::DataError::Interrupted(step)) if a.stop_after == Some(step) => {
            println!("stopped after {step} steps as asked; continue with --resume");
            return Ok(());
        }
        other => other?,
    };
    if !verbose {
        println!(
            "trained {} steps in {:.1}s; checkpoint {}",
            outcome.steps,
            outcome.seconds,
            outcome.checkpoint.display()
        );
        return Ok(());
    }
    println!(
        "trained {} steps in {:.1}s; train loss {:.3} -> {:.3}; checkpoint {}",
        outcome.steps,
        outcome.seconds,
        outcome.first_train_loss,
        outcome.final_train_loss,
        outcome.checkpoint.display()
    );
    report(&outcome.model, &corpus, tokenizer.as_ref(), &config, &run)
}

/// The tokenizer checkpoint `dir` was saved with (a Hugging Face one it carries, its own
/// description, or bytes).
fn checkpoint_tokenizer(dir: &Path) -> anyhow::Result<Box<dyn Tokenizer>> {
    let spec = checkpoint::load_tokenizer_spec(dir)?;
    Ok(moe_train::hf_tokenizer::for_checkpoint(dir, spec.as_ref())?)
}

/// Random draws of each random-router control in the end-of-training report.
const CONTROL_DRAWS: u64 = 4;

/// The end-of-training report: evaluation, figures, samples, compute summary.
fn report(
    model: &moe_model::MoeLm,
    corpus: &Corpus,
    tokenizer: &dyn Tokenizer,
    config: &TrainConfig,
    run: &RunDir,
) -> anyhow::Result<()> {
    let (windows, seq_len, batch) = (config.report_windows, config.seq_len, config.batch_size);
    let mut eval = evaluate(model, corpus, windows, seq_len, batch);
    if !eval.tables.is_empty() {
        eval.controls = random_router_controls(
            model,
            corpus,
            windows,
            seq_len,
            batch,
            config.seed,
            CONTROL_DRAWS,
        )?;
    }
    println!("\n{eval}");
    let figures = write_figures(&run.path, &eval, &run.metrics()?)?;
    for f in &figures {
        println!("wrote {}", f.display());
    }
    write_atomic(
        &run.path.join("report.json"),
        serde_json::to_string_pretty(&eval)?.as_bytes(),
    )?;
    println!("\nsamples (prompt | continuation):");
    for s in samples(model, corpus, tokenizer, 24, 64, config.seed)? {
        println!(
            "[{}] {} | {}",
            s.domain,
            s.prompt.replace('\n', "\\n"),
            s.text.replace('\n', "\\n")
        );
    }
    let acc = model.config.accounting().total;
    println!(
        "\ncompute: {} parameters, {} active per token ({:.2}x), {} forward FLOPs per token",
        acc.total_params,
        acc.active_params,
        acc.sparsity_ratio(),
        acc.flops_per_token
    );
    Ok(())
}

/// Arguments of `moe eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory, or a run directory (its latest checkpoint).
    checkpoint: PathBuf,
    /// Corpus directory (default: the built-in corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Device.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Validation windows per domain, or `all` (default: the run's `report_windows`, 256).
    #[arg(long, value_parser = parse_windows)]
    windows: Option<usize>,
    /// Also measure random-router controls of the routing NMI (routers redrawn; the model
    /// untrained), this many random draws each.
    #[arg(long, default_value_t = 0)]
    controls: u64,
    #[command(flatten)]
    budget: crate::budget::BudgetArgs,
}

/// `--windows N` or `--windows all`.
pub(crate) fn parse_windows(s: &str) -> Result<usize, String> {
    match s {
        "all" => Ok(usize::MAX),
        n => match n.parse::<usize>() {
            Ok(0) | Err(_) => Err(format!("expected a positive number or `all`, got `{s}`")),
            Ok(n) => Ok(n),
        },
    }
}

/// The corpus a checkpoint was trained on, rebuilt from the settings it records (its
/// `trainer.json`: data source, corpus seed and size), with the run's training configuration;
/// `data` overrides the source. A checkpoint without that record (a merged model, an import)
/// gets the default built-in corpus and configuration.
pub(crate) fn run_corpus(
    checkpoint: &Path,
    data: Option<&Path>,
    tokenizer: &dyn Tokenizer,
) -> anyhow::Result<(Corpus, TrainConfig)> {
    let state = TrainerState::read(checkpoint).ok();
    let config = state
        .as_ref()
        .and_then(|s| s.train.clone())
        .unwrap_or_else(TrainConfig::new);
    let recorded = state
        .filter(|s| s.data != "builtin")
        .map(|s| PathBuf::from(s.data));
    let (corpus, _) = corpus(data.or(recorded.as_deref()), &config, tokenizer)?;
    Ok((corpus, config))
}

/// Runs `moe eval`.
pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = crate::device(&a.device)?;
    let (ckpt, _) = a.budget.load(&a.checkpoint, &device)?;
    let dir = ckpt.dir.clone();
    let tokenizer = moe_train::hf_tokenizer::for_checkpoint(&dir, ckpt.tokenizer.as_ref())?;
    let (corpus, run) = run_corpus(&dir, a.data.as_deref(), tokenizer.as_ref())?;
    let seq_len = run.seq_len.min(ckpt.model.config.max_seq_len);
    corpus.check_window(seq_len + 1)?;
    let (batch, windows) = (run.batch_size, a.windows.unwrap_or(run.report_windows));
    let mut report = evaluate(&ckpt.model, &corpus, windows, seq_len, batch);
    if a.controls > 0 && !report.tables.is_empty() {
        report.controls = random_router_controls(
            &ckpt.model,
            &corpus,
            windows,
            seq_len,
            batch,
            run.seed,
            a.controls,
        )?;
    }
    let own = MergeInfo::read(&dir)?.map(|info| info.own_expert_shares(&report));
    if a.json {
        let mut json = serde_json::to_value(&report)?;
        if let Some(own) = own {
            json["own_expert_share"] = own
                .into_iter()
                .map(|(d, s)| (d, s.into()))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!("{report}");
        if let Some(own) = own {
            println!(
                "\nmerged experts: share of each domain's routing assignments to its own expert (at most 1/top-k)"
            );
            for (domain, share) in own {
                println!("{domain:<14} {share:.3}");
            }
        }
    }
    Ok(())
}
