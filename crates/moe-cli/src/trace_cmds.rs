//! `moe trace` records which experts each token uses; `moe cache-sim` replays such a trace
//! through expert caches of several budgets and policies.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use moe_core::CachePolicy;
use moe_core::cache::replay;
use moe_model::store::parse_size;
use moe_train::TrainConfig;
use moe_train::trace::Trace;

use crate::load_for_inference;
use crate::train_cmds::corpus;

/// Arguments of `moe trace`.
#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Checkpoint directory (or a run, for its latest checkpoint).
    checkpoint: PathBuf,
    /// Corpus directory (one subdirectory per domain); default: the built-in corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Validation tokens per domain to record.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Tokens per forward pass (capped at the model's context).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// The trace file to write (JSON lines).
    #[arg(long)]
    out: PathBuf,
    /// Device.
    #[arg(long, default_value = "flex")]
    device: String,
}

/// Runs `moe trace`.
pub fn trace(a: TraceArgs) -> anyhow::Result<()> {
    if a.tokens == 0 || a.seq_len == 0 {
        bail!("--tokens and --seq-len must be at least 1");
    }
    let device = crate::device(&a.device)?;
    let (dir, ckpt) = load_for_inference(&a.checkpoint, &device)?;
    if ckpt.model.config.n_moe_layers() == 0 {
        bail!("{}: a dense model has no experts to trace", dir.display());
    }
    let tokenizer = moe_train::hf_tokenizer::for_checkpoint(&dir, ckpt.tokenizer.as_ref())?;
    let (corpus, source) = corpus(a.data.as_deref(), &TrainConfig::new(), tokenizer.as_ref())?;
    let seq_len = a.seq_len.min(ckpt.model.config.max_seq_len);
    let trace = Trace::record(&ckpt.model, &corpus, a.tokens, seq_len);
    trace.write(&a.out)?;
    println!(
        "traced {} tokens of {source} through {} MoE layers -> {}",
        trace.tokens.len(),
        trace.header.moe_layers.len(),
        a.out.display()
    );
    Ok(())
}

/// Arguments of `moe cache-sim`.
#[derive(Args, Debug)]
pub struct CacheSimArgs {
    /// A trace written by `moe trace`.
    trace: PathBuf,
    /// Budgets of resident expert weights, e.g. 64MiB,256MiB.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, required = true)]
    budget: Vec<usize>,
    /// Policies to compare: lru, lfu, belady (the optimum, which needs the future).
    #[arg(long, value_delimiter = ',', default_value = "lru,lfu,belady", value_parser = parse_policy)]
    policy: Vec<CachePolicy>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_policy(s: &str) -> Result<CachePolicy, String> {
    CachePolicy::parse(s).ok_or_else(|| format!("'{s}' is not a policy; use lru, lfu or belady"))
}

/// Runs `moe cache-sim`.
pub fn cache_sim(a: CacheSimArgs) -> anyhow::Result<()> {
    let trace = Trace::read(&a.trace)?;
    let uses = trace.uses();
    let mut rows = Vec::new();
    for &budget in &a.budget {
        let Some(capacity) = trace.capacity(budget) else {
            bail!(
                "a budget of {budget} bytes holds fewer than the top-{} experts of {} bytes \
                 one token needs",
                trace.header.top_k,
                trace.header.expert_bytes
            );
        };
        let belady = replay(&uses, capacity, CachePolicy::Belady);
        let best = belady.hit_rate();
        for &policy in &a.policy {
            let stats = match policy {
                CachePolicy::Belady => belady,
                _ => replay(&uses, capacity, policy),
            };
            rows.push(serde_json::json!({
                "budget_bytes": budget,
                "capacity": capacity,
                "policy": policy.name(),
                "hits": stats.hits,
                "misses": stats.misses,
                "hit_rate": stats.hit_rate(),
                "of_belady": if best > 0.0 { stats.hit_rate() / best } else { 0.0 },
            }));
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"header": trace.header, "results": rows})
        );
        return Ok(());
    }
    let h = &trace.header;
    let all = h.moe_layers.len() * h.experts;
    println!(
        "{} tokens, {} MoE layers x {} experts (top-{}), {} experts of {} bytes in all",
        trace.tokens.len(),
        h.moe_layers.len(),
        h.experts,
        h.top_k,
        all,
        h.expert_bytes
    );
    println!(
        "{:>12} {:>9} {:>8} {:>9} {:>10}",
        "budget", "experts", "policy", "hit rate", "of belady"
    );
    for r in rows {
        let mib = r["budget_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
        println!(
            "{:>12} {:>9} {:>8} {:>8.1}% {:>9.1}%",
            format!("{mib:.0} MiB"),
            r["capacity"].as_u64().unwrap_or(0),
            r["policy"].as_str().unwrap_or(""),
            100.0 * r["hit_rate"].as_f64().unwrap_or(0.0),
            100.0 * r["of_belady"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
