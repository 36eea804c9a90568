//! The `moe` command-line tool: argument parsing and printing; the work is done by the library
//! crates.

mod args;
mod bench_cmd;
mod branch_cmds;
mod budget;
mod compare_cmd;
mod inspect;
mod model_cmds;
mod prompt;
mod trace_cmds;
mod train_cmds;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moe_train::RunDir;
use moe_train::run::Latest;

/// Build, train, run and benchmark Mixture-of-Experts language models.
#[derive(Parser, Debug)]
#[command(name = "moe", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (default: the small MoE on the built-in corpus, on the CPU).
    Train(train_cmds::TrainArgs),
    /// Evaluate a checkpoint: per-domain loss and the domain x expert routing table.
    Eval(train_cmds::EvalArgs),
    /// Compare groups of runs (seeds): per-domain loss with 95% intervals and differences.
    Compare(compare_cmd::CompareArgs),
    /// Train copies of a dense base, one per domain, concurrently (Branch-Train-MiX).
    Branch(branch_cmds::BranchArgs),
    /// Merge branches into an MoE: each branch's FFN becomes one expert.
    Merge(branch_cmds::MergeArgs),
    /// Branch-Train-Merge: score each window with the branch its prefix picks.
    Btm(branch_cmds::BtmArgs),
    /// Generate text from a prompt.
    Generate(model_cmds::GenerateArgs),
    /// Print the logits of every prompt position as JSON.
    Logits(model_cmds::LogitsArgs),
    /// Show parameters, active parameters, FLOPs and memory of a checkpoint or config.
    Inspect(inspect::InspectArgs),
    /// Import a Hugging Face Mixtral directory as a checkpoint.
    ImportHf(model_cmds::ImportArgs),
    /// Turn a dense checkpoint into an MoE one (sparse upcycling).
    Upcycle(model_cmds::UpcycleArgs),
    /// Measure MoE against dense feed-forward blocks on a backend.
    Bench(bench_cmd::BenchArgs),
    /// Export a checkpoint's weights as safetensors.
    Export(model_cmds::ExportArgs),
    /// Store a checkpoint's routed experts in 8 or 4 bits with block scales.
    Quantize(model_cmds::QuantizeArgs),
    /// Record which experts each token uses in each MoE layer (JSON lines).
    Trace(trace_cmds::TraceArgs),
    /// Replay a trace through expert caches: hit rates per budget and policy.
    CacheSim(trace_cmds::CacheSimArgs),
}

impl Command {
    /// Whether the command trains, evaluates or runs a model (rather than reading, converting or
    /// writing checkpoints and traces).
    fn runs_a_model(&self) -> bool {
        match self {
            Command::Train(_)
            | Command::Eval(_)
            | Command::Compare(_)
            | Command::Branch(_)
            | Command::Merge(_)
            | Command::Btm(_)
            | Command::Generate(_)
            | Command::Logits(_)
            | Command::Bench(_)
            | Command::Trace(_) => true,
            Command::Inspect(_)
            | Command::ImportHf(_)
            | Command::Upcycle(_)
            | Command::Export(_)
            | Command::Quantize(_)
            | Command::CacheSim(_) => false,
        }
    }
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = moe_train::error::panic_message(info.payload());
        // Backend errors carry multi-line causes; the user gets one line.
        let msg: Vec<&str> = msg
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        eprintln!("error: internal error: {}", msg.join(" / "));
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout as clap prints them.
        Err(e) if !e.use_stderr() => e.exit(),
        // A usage mistake is one line too; `--help` shows the usage.
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("{first} (see --help)");
            return ExitCode::from(2);
        }
    };
    // Imports and conversions, whose peak memory is their target, keep glibc's defaults.
    if cli.command.runs_a_model() {
        moe_core::host::tune_allocator();
    }
    let result = match cli.command {
        Command::Train(a) => train_cmds::train(a),
        Command::Eval(a) => train_cmds::eval(a),
        Command::Compare(a) => compare_cmd::compare(a),
        Command::Branch(a) => branch_cmds::branch(a),
        Command::Merge(a) => branch_cmds::merge(a),
        Command::Btm(a) => branch_cmds::btm(a),
        Command::Generate(a) => model_cmds::generate(a),
        Command::Logits(a) => model_cmds::logits(a),
        Command::Inspect(a) => inspect::inspect(a),
        Command::ImportHf(a) => model_cmds::import_hf(a),
        Command::Upcycle(a) => model_cmds::upcycle(a),
        Command::Bench(a) => bench_cmd::bench(a),
        Command::Export(a) => model_cmds::export(a),
        Command::Quantize(a) => model_cmds::quantize(a),
        Command::Trace(a) => trace_cmds::trace(a),
        Command::CacheSim(a) => trace_cmds::cache_sim(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // An interruption saved its checkpoint: not a failure to report, but not a success.
        Err(e) if matches!(e.downcast_ref(), Some(moe_train::DataError::Interrupted(_))) => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line; a cause already spelled out by the message before it
/// (library errors embed their source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if !line.contains(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line.replace('\n', " ")
}

/// Refuses an output that exists unless `overwrite`, before any work is done (the checkpoint
/// writer checks again when it commits).
pub(crate) fn refuse_existing(out: &std::path::Path, overwrite: bool) -> anyhow::Result<()> {
    if out.exists() && !overwrite {
        anyhow::bail!(
            "{}: already exists (pass --overwrite to replace it)",
            out.display()
        );
    }
    Ok(())
}

/// Opens a device by name, as every command does.
pub(crate) fn device(name: &str) -> anyhow::Result<burn::tensor::Device> {
    Ok(moe_core::parse_device(name)?)
}

/// Parses a list of device names (a comma-separated flag).
pub(crate) fn devices(names: &[String]) -> anyhow::Result<Vec<burn::tensor::Device>> {
    names.iter().map(|d| device(d)).collect()
}

/// A run's checkpoint to continue from; prints a warning when the run's `latest` pointer names a
/// missing or incomplete checkpoint and the newest complete one is taken instead.
pub(crate) fn latest_checkpoint(run: &RunDir) -> anyhow::Result<Option<PathBuf>> {
    Ok(run.find_latest()?.map(announce))
}

/// The directory of `latest`, after printing its warning if it has one.
fn announce(latest: Latest) -> PathBuf {
    if let Some(warning) = latest.warning {
        eprintln!("warning: {warning}");
    }
    latest.dir
}

/// The checkpoint a path names: a checkpoint directory itself, or a run directory's latest
/// checkpoint (with [`latest_checkpoint`]'s warning). A path that is not a directory is
/// returned as it is, for the checkpoint loader to say what is wrong with it (missing, a file).
pub(crate) fn resolve_checkpoint(path: &Path) -> anyhow::Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    Ok(announce(moe_train::train::resolve_latest(path)?))
}

/// The checkpoint a path names ([`resolve_checkpoint`]), loaded fully resident on `device` and
/// laid out for inference; with the directory it was read from.
pub(crate) fn load_for_inference(
    path: &Path,
    device: &burn::prelude::Device,
) -> anyhow::Result<(PathBuf, moe_model::checkpoint::Checkpoint)> {
    let dir = resolve_checkpoint(path)?;
    let ckpt = moe_model::checkpoint::load(&dir, device)?.for_inference();
    Ok((dir, ckpt))
}
