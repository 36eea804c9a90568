//! Branch-Train-MiX on the built-in corpus, start to finish, in about six minutes on 2 CPU cores.
//!
//! ```text
//! cargo run --release --example branch_train_mix -- [OUT_DIR] [DEVICE]
//! ```
//!
//! 1. trains a small dense base model briefly on the mixture of all four domains;
//! 2. branches it: one copy per domain (code, arithmetic, English, Spanish), trained concurrently,
//!    each on its own domain only;
//! 3. merges the branches into one MoE (each branch's FFN becomes an expert, the rest is averaged,
//!    routers are fresh) and fine-tunes only the routers on the mixture;
//! 4. trains a dense model on the mixture with the same total token budget, for comparison;
//! 5. prints every model's per-domain validation loss and where the merged model routes each
//!    domain's tokens.
//!
//! At this budget (seconds per stage) the dense baseline wins clearly; docs/results.md has a
//! longer run, the figures, and why averaging the branches' shared weights costs so much here.
//!
//! The same flow from the command line: `moe train --dense`, `moe branch`, `moe merge`,
//! `moe train --from MERGED --train router` (see docs/results.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use burn::prelude::*;
use moe::moe_core::{MoeLayerConfig, RouterConfig, parse_device};
use moe::moe_model::{ModelConfig, checkpoint};
use moe::moe_train::branch::{Branch, BranchJob, merge_checkpoints, save_merged, train_branches};
use moe::moe_train::{
    ByteTokenizer, Corpus, Progress, RunDir, Start, Tokenizer, TrainConfig, TrainJob, TrainPart,
    evaluate, train,
};

const BASE_STEPS: usize = 120;
const BRANCH_STEPS: usize = 80;
const ROUTER_STEPS: usize = 40;
/// Branches learn gently: averaging their non-FFN weights at the merge hurts less the closer
/// they stay to the base (docs/results.md).
const BRANCH_LR: f64 = 1e-3;

fn run(
    out: &Path,
    name: &str,
    start: Start,
    config: TrainConfig,
    corpus: &Corpus,
    device: &Device,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let outcome = train(TrainJob {
        config,
        start,
        corpus,
        data_source: "builtin".into(),
        tokenizer: &ByteTokenizer,
        run: RunDir::create(&out.join(name), true)?,
        devices: vec![device.clone()],
        progress: Progress::Terminal,
        stop: Arc::new(AtomicBool::new(false)),
        stop_after: None,
    })?;
    println!(
        "{name}: {} steps in {:.1}s",
        outcome.steps,
        t.elapsed().as_secs_f64()
    );
    Ok(outcome.checkpoint)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "runs/btx-example".into()));
    let device = parse_device(&args.next().unwrap_or_else(|| "flex".into()))?;
    let train_config = |steps: usize| {
        TrainConfig::new()
            .with_steps(steps)
            .with_warmup_steps(10)
            .with_eval_every(steps)
            .with_checkpoint_every(steps)
    };
    let corpus = Corpus::builtin(42, TrainConfig::new().corpus_bytes, &ByteTokenizer);
    let dense = ModelConfig::new()
        .with_vocab_size(ByteTokenizer.vocab_size())
        .dense_equivalent();

    // 1. The seed model, on the mixture.
    let base = run(
        &out,
        "base",
        Start::Fresh(dense.clone()),
        train_config(BASE_STEPS),
        &corpus,
        &device,
    )?;

    // 2. One branch per domain, concurrently, no communication between them.
    let t = Instant::now();
    let outcomes = train_branches(BranchJob {
        base: Start::From(base.clone()),
        config: train_config(BRANCH_STEPS).with_lr(BRANCH_LR),
        corpus: &corpus,
        data_source: "builtin".into(),
        tokenizer: &ByteTokenizer,
        out: out.join("branches"),
        branches: corpus
            .names()
            .into_iter()
            .map(|domain| Branch {
                domain,
                device: device.clone(),
            })
            .collect(),
        overwrite: true,
        parallel: true,
        progress: Some(indicatif::MultiProgress::new()),
        stop: Arc::new(AtomicBool::new(false)),
    })?;
    println!(
        "branches: {} x {BRANCH_STEPS} steps in {:.1}s",
        outcomes.len(),
        t.elapsed().as_secs_f64()
    );
    let branches = outcomes
        .into_iter()
        .map(|o| o.result.map(|r| r.checkpoint))
        .collect::<Result<Vec<_>, _>>()?;

    // 3. Merge, then fine-tune only the routers on the mixture.
    let routing = MoeLayerConfig::new(dense.d_model, dense.d_ff, branches.len())
        .with_router(RouterConfig::mixtral());
    let (model, tokenizer, info) = merge_checkpoints(&branches, None, routing, 0, &device)?;
    let merged = out.join("merged");
    save_merged(&merged, &model, tokenizer.as_ref(), &info, true)?;
    let tuned = run(
        &out,
        "merged-router",
        Start::From(merged),
        train_config(ROUTER_STEPS).with_train(TrainPart::Router),
        &corpus,
        &device,
    )?;

    // 4. Dense on the mixture with the same number of training tokens in all.
    let budget = BASE_STEPS + corpus.domains.len() * BRANCH_STEPS + ROUTER_STEPS;
    let joint = run(
        &out,
        "dense-joint",
        Start::Fresh(dense),
        train_config(budget),
        &corpus,
        &device,
    )?;

    // 5. Compare.
    let losses = |ckpt: &Path| -> Result<Vec<f64>, Box<dyn std::error::Error>> {
        let model = checkpoint::load(ckpt, &device)?.model;
        Ok(evaluate(&model, &corpus, 16, 128, 16)
            .losses
            .iter()
            .map(|l| l.loss)
            .collect())
    };
    let names = corpus.names();
    println!("\nvalidation loss   {}", names.join("  "));
    let row = |label: &str, v: &[f64]| {
        let cells: Vec<String> = v.iter().map(|x| format!("{x:>8.4}")).collect();
        println!("{label:<17} {}", cells.join(" "));
    };
    row("base", &losses(&base)?);
    let own: Vec<f64> = branches
        .iter()
        .enumerate()
        .map(|(d, b)| losses(b).map(|l| l[d]))
        .collect::<Result<_, _>>()?;
    row("branch (own)", &own);
    row("merged + router", &losses(&tuned)?);
    row("dense, joint", &losses(&joint)?);

    let model = checkpoint::load(&tuned, &device)?.model;
    let report = evaluate(&model, &corpus, 16, 128, 16);
    println!(
        "\nshare of each domain's routing assignments sent to its own expert (top-2: at most 0.5)"
    );
    for (domain, share) in info.own_expert_shares(&report) {
        println!("{domain:<12} {share:.3}");
    }
    println!("\n{report}");
    Ok(())
}
