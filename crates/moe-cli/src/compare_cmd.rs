//! `moe compare`: groups of runs that differ in their seed, side by side with 95% intervals.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use moe_train::compare::{Comparison, GroupLosses, group_runs};
use moe_train::eval::domain_losses;

use crate::load_for_inference;
use crate::train_cmds::{parse_windows, run_corpus};

/// Arguments of `moe compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Groups of runs: a directory of `seed-N` runs (`moe train --seeds N --out DIR`), a run
    /// directory or a checkpoint. Differences are taken from the first.
    #[arg(required = true, num_args = 1..)]
    groups: Vec<PathBuf>,
    /// Corpus directory (default: the corpus each run recorded).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Validation windows per domain, or `all` (default: each run's `report_windows`, 256).
    #[arg(long, value_parser = parse_windows)]
    windows: Option<usize>,
    /// Device.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Print the comparison as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `moe compare`.
pub fn compare(a: CompareArgs) -> anyhow::Result<()> {
    print_comparison(&a.groups, a.data.as_deref(), a.windows, &a.device, a.json)
}

/// Evaluates every run of every group and prints the comparison.
pub fn print_comparison(
    groups: &[PathBuf],
    data: Option<&Path>,
    windows: Option<usize>,
    device: &str,
    json: bool,
) -> anyhow::Result<()> {
    let device = crate::device(device)?;
    // Every group is found before anything is evaluated.
    let runs = groups
        .iter()
        .map(|g| group_runs(g))
        .collect::<Result<Vec<_>, _>>()?;
    // A progress bar on a terminal; nothing otherwise.
    let bar = ProgressBar::new(runs.iter().map(Vec::len).sum::<usize>() as u64);
    bar.set_style(ProgressStyle::with_template(
        "evaluating {pos}/{len} {msg}",
    )?);
    let mut domains: Option<Vec<String>> = None;
    let mut evaluated = Vec::new();
    for (group, runs) in groups.iter().zip(runs) {
        let mut g = GroupLosses {
            name: group.display().to_string(),
            seeds: Vec::new(),
            losses: Vec::new(),
        };
        for (dir, seed) in runs {
            bar.set_message(dir.display().to_string());
            let (names, losses, run_seed) = evaluate_run(&dir, data, windows, &device)?;
            bar.inc(1);
            match &domains {
                Some(d) if *d != names => bail!(
                    "{}: evaluated on domains {} but the first run on {}",
                    dir.display(),
                    names.join(", "),
                    d.join(", ")
                ),
                _ => domains = Some(names),
            }
            g.seeds.push(seed.or(run_seed));
            g.losses.push(losses);
        }
        evaluated.push(g);
    }
    bar.finish_and_clear();
    let comparison = Comparison::new(domains.unwrap_or_default(), &evaluated);
    if json {
        println!("{}", serde_json::to_string_pretty(&comparison)?);
    } else {
        print!("{comparison}");
    }
    Ok(())
}

/// One run's domains and validation losses on the corpus it recorded, and its seed if known.
fn evaluate_run(
    dir: &Path,
    data: Option<&Path>,
    windows: Option<usize>,
    device: &burn::prelude::Device,
) -> anyhow::Result<(Vec<String>, Vec<f64>, Option<u64>)> {
    let (ckpt_dir, ckpt) = load_for_inference(dir, device)?;
    let tokenizer = moe_train::hf_tokenizer::for_checkpoint(&ckpt_dir, ckpt.tokenizer.as_ref())?;
    let (corpus, run) = run_corpus(&ckpt_dir, data, tokenizer.as_ref())?;
    let seq_len = run.seq_len.min(ckpt.model.config.max_seq_len);
    corpus.check_window(seq_len + 1)?;
    let windows = windows.unwrap_or(run.report_windows);
    let losses = domain_losses(&ckpt.model, &corpus, windows, seq_len, run.batch_size);
    let recorded = moe_train::run::TrainerState::read(&ckpt_dir)
        .ok()
        .and_then(|s| s.train)
        .map(|t| t.seed);
    Ok((corpus.names(), losses, recorded))
}
