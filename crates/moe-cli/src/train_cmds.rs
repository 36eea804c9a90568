//! `moe train` and `moe eval`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use moe_core::{MoeLayerConfig, RouterConfig};
use moe_model::{ModelConfig, checkpoint};
use moe_train::report::{samples, write_figures};
use moe_train::run::write_atomic;
use moe_train::train::resolve_checkpoint;
use moe_train::{
    ByteTokenizer, Corpus, RunDir, Start, Tokenizer, TrainConfig, TrainJob, TrainPart, evaluate,
    train as run_train,
};

/// Which parameters `--train` updates.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Part {
    All,
    Router,
}

/// Routing presets for `--router`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Router {
    Mixtral,
    Switch,
    Deepseek,
    ExpertChoice,
}

/// Arguments of `moe train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run directory (default: runs/moe, or runs/dense with --dense).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps (default 600).
    #[arg(long)]
    steps: Option<usize>,
    /// Training config JSON (the fields of train.json); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model config JSON (the fields of a checkpoint's config.json).
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Corpus directory: one sub-directory or file of UTF-8 text per domain (default: built-in).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Device: flex, ndarray, wgpu, wgpu:N, wgpu:cpu.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Train the dense model with the same active parameters per token instead.
    #[arg(long)]
    dense: bool,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long, conflicts_with_all = ["overwrite", "from", "model_config", "dense"])]
    resume: bool,
    /// Replace an existing run directory.
    #[arg(long)]
    overwrite: bool,
    /// Start from this checkpoint instead of a fresh model.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Which parameters to train.
    #[arg(long, value_enum, default_value_t = Part::All)]
    train: Part,
    /// Routing preset of a fresh MoE model.
    #[arg(long, value_enum)]
    router: Option<Router>,
    /// Experts per MoE layer of a fresh model.
    #[arg(long)]
    experts: Option<usize>,
    /// Experts per token of a fresh model.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sequences per batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Steps between evaluation lines.
    #[arg(long)]
    eval_every: Option<usize>,
    /// Steps between checkpoints.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Stop after this many steps in total, checkpointed as if interrupted, keeping the whole
    /// run's learning-rate schedule (for time-limited jobs); continue with --resume.
    #[arg(long)]
    stop_after: Option<usize>,
    /// No progress bar, evaluation lines or final report.
    #[arg(long)]
    quiet: bool,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| format!("{}: malformed JSON", path.display()))
}

/// Reads a JSON config file whose fields override the defaults (nested objects too), so a file
/// names only what it changes.
fn over_defaults<T: serde::Serialize + serde::de::DeserializeOwned>(
    defaults: &T,
    path: &Path,
) -> anyhow::Result<T> {
    fn merge(base: &mut serde_json::Value, user: serde_json::Value) {
        match (base, user) {
            (serde_json::Value::Object(b), serde_json::Value::Object(u)) => {
                for (k, v) in u {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, u) => *b = u,
        }
    }
    let user: serde_json::Value = read_json(path)?;
    if !user.is_object() {
        bail!(
            "{}: expected a JSON object of config fields",
            path.display()
        );
    }
    let mut merged = serde_json::to_value(defaults)?;
    merge(&mut merged, user);
    serde_json::from_value(merged).with_context(|| format!("{}: invalid config", path.display()))
}

fn train_config(a: &TrainArgs, saved: Option<TrainConfig>) -> anyhow::Result<TrainConfig> {
    let mut c = match (&a.config, saved) {
        (Some(p), _) => over_defaults(&TrainConfig::new(), p)?,
        (None, Some(saved)) => saved,
        (None, None) => TrainConfig::new(),
    };
    macro_rules! set {
        ($($field:ident),*) => { $(if let Some(v) = a.$field { c.$field = v; })* };
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
    c.train = match a.train {
        Part::All => TrainPart::All,
        Part::Router => TrainPart::Router,
    };
    c.validate()?;
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
        moe.router = match r {
            Router::Mixtral => RouterConfig::mixtral(),
            Router::Switch => RouterConfig::switch(),
            Router::Deepseek => RouterConfig::deepseek_v3(2),
            Router::ExpertChoice => RouterConfig::expert_choice(2),
        };
    }
    if let Some(e) = a.experts {
        moe.n_experts = e;
    }
    if let Some(k) = a.top_k {
        moe.router.top_k = k;
    }
    m.moe = moe;
    m.max_seq_len = m.max_seq_len.max(seq_len);
    if a.dense {
        m = m.dense_equivalent();
    }
    m.validate()?;
    Ok(m)
}

fn corpus(
    data: Option<&Path>,
    config: &TrainConfig,
    tokenizer: &dyn Tokenizer,
) -> anyhow::Result<(Corpus, String)> {
    Ok(match data {
        Some(dir) => (
            Corpus::from_dir(dir, 0.1, tokenizer)?,
            dir.display().to_string(),
        ),
        None => (
            Corpus::builtin(config.seed, config.corpus_bytes, tokenizer),
            "builtin".into(),
        ),
    })
}

/// Runs `moe train`.
pub fn train(a: TrainArgs) -> anyhow::Result<()> {
    let tokenizer = ByteTokenizer;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(if a.dense { "runs/dense" } else { "runs/moe" }));
    let device = crate::device(&a.device)?;
    // Every input is read and checked before the run directory is created or touched.
    let (run, config, start, corpus, source) = if a.resume {
        let run = RunDir::open(&out)?;
        let saved: TrainConfig = read_json(&run.path.join("train.json"))?;
        let config = train_config(&a, Some(saved))?;
        let data = match (&a.data, run.latest()?) {
            (Some(d), _) => Some(d.clone()),
            (None, Some(ckpt)) => {
                let state: moe_train::run::TrainerState =
                    read_json(&ckpt.join(moe_train::run::STATE_FILE))?;
                (state.data != "builtin").then(|| PathBuf::from(state.data))
            }
            (None, None) => bail!("{}: has no checkpoint to resume from", out.display()),
        };
        let (corpus, source) = corpus(data.as_deref(), &config, &tokenizer)?;
        (run, config, Start::Resume, corpus, source)
    } else {
        let config = train_config(&a, None)?;
        let start = match &a.from {
            Some(ckpt) => {
                checkpoint::load_config(ckpt)?;
                Start::From(ckpt.clone())
            }
            None => Start::Fresh(model_config(&a, &tokenizer, config.seq_len)?),
        };
        let (corpus, source) = corpus(a.data.as_deref(), &config, &tokenizer)?;
        corpus.check_window(config.seq_len + 1)?;
        let run = RunDir::create(&out, a.overwrite)?;
        (run, config, start, corpus, source)
    };
    write_atomic(
        &run.path.join("train.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;

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
    let verbose = !a.quiet;
    if verbose {
        println!(
            "training on {} ({}), {} steps, run directory {}",
            a.device,
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
        tokenizer: &tokenizer,
        run: run.clone(),
        device,
        verbose,
        stop,
        stop_after: a.stop_after,
    })?;
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
    report(&outcome.model, &corpus, &tokenizer, &config, &run)
}

/// The end-of-training report: evaluation, figures, samples, compute summary.
fn report(
    model: &moe_model::MoeLm,
    corpus: &Corpus,
    tokenizer: &dyn Tokenizer,
    config: &TrainConfig,
    run: &RunDir,
) -> anyhow::Result<()> {
    let eval = evaluate(
        model,
        corpus,
        config.eval_windows * 2,
        config.seq_len,
        config.batch_size,
    );
    println!("\n{eval}");
    if !eval.tables.is_empty() {
        // The same architecture with untrained weights: what a random router's NMI looks like.
        let untrained = model.config.init(&burn::tensor::Device::flex())?;
        let baseline = evaluate(
            &untrained,
            corpus,
            config.eval_windows * 2,
            config.seq_len,
            config.batch_size,
        );
        println!(
            "untrained (random) router, same data: mean NMI {:.3}",
            baseline.mean_nmi
        );
    }
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
    /// Validation windows per domain.
    #[arg(long, default_value_t = 16)]
    windows: usize,
}

/// Runs `moe eval`.
pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = crate::device(&a.device)?;
    let dir = resolve_checkpoint(&a.checkpoint)?;
    let ckpt = checkpoint::load(&dir, &device)?;
    let tokenizer = moe_train::tokenizer::from_spec(ckpt.tokenizer.as_ref())?;
    let defaults = TrainConfig::new();
    let (corpus, _) = corpus(a.data.as_deref(), &defaults, tokenizer.as_ref())?;
    let seq_len = defaults.seq_len.min(ckpt.model.config.max_seq_len);
    corpus.check_window(seq_len + 1)?;
    let report = evaluate(
        &ckpt.model,
        &corpus,
        a.windows,
        seq_len,
        defaults.batch_size,
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
