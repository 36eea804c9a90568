//! `moe bench`: MoE against dense feed-forward blocks on one backend, measured.

use clap::Args;
use moe_bench::{BenchBudget, BenchSizes, decode_speed, run};

use crate::budget::BudgetArgs;

/// Arguments of `moe bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Device: flex, ndarray, wgpu, wgpu:N, wgpu:cpu.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Print one JSON object with every figure.
    #[arg(long)]
    json: bool,
    /// Fewer timed calls per case (noisier, about four times faster).
    #[arg(long)]
    quick: bool,
    /// Tokens per call (default 2048, the size the targets are stated for).
    #[arg(long)]
    tokens: Option<usize>,
    /// Instead of the layer cases, prefill and greedy decode speed of this checkpoint, one
    /// sequence at a time.
    #[arg(long, value_name = "CKPT")]
    decode: Option<std::path::PathBuf>,
    /// Prompt lengths for --decode.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "128,1024",
        requires = "decode"
    )]
    context: Vec<usize>,
    /// Tokens decoded after each prompt, for --decode.
    #[arg(long, default_value_t = 32, requires = "decode")]
    new_tokens: usize,
    #[command(flatten)]
    budget: BudgetArgs,
}

/// The project's targets for each ratio (flex, release build, 2 cores).
const TARGETS: [(&str, f64); 3] = [
    ("moe_vs_dense_active_fwd", 0.9),
    ("moe_vs_dense_active_fwd_bwd", 0.8),
    ("moe_vs_dense_total_e64_fwd", 25.0),
];

/// Runs `moe bench --decode CKPT`.
fn bench_decode(a: &BenchArgs, ckpt: &std::path::Path) -> anyhow::Result<()> {
    crate::tune_allocator_for_inference();
    let device = crate::device(&a.device)?;
    let dir = crate::resolve_checkpoint(ckpt)?;
    let (ckpt, store) = a.budget.load(&dir, &device)?;
    let max = ckpt.model.config.max_seq_len;
    // Contexts the model cannot hold are left out, and said so.
    let (fit, skipped): (Vec<usize>, Vec<usize>) = a
        .context
        .iter()
        .partition(|&&c| c > 0 && c + a.new_tokens <= max);
    anyhow::ensure!(
        !fit.is_empty(),
        "no --context fits the model's context of {max} with {} new tokens",
        a.new_tokens
    );
    let cases = decode_speed(&ckpt.model, &fit, a.new_tokens).map_err(anyhow::Error::msg)?;
    let stats = store.as_ref().map(|s| {
        s.settle();
        s.stats()
    });
    if a.json {
        let out = serde_json::json!({
            "device": a.device, "checkpoint": dir, "cases": cases,
            "skipped_contexts": skipped, "expert_store": stats,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{} on {} (batch 1, greedy)", dir.display(), a.device);
    println!(
        "{:>8} {:>16} {:>16}",
        "context", "prefill tok/s", "decode tok/s"
    );
    for c in &cases {
        println!(
            "{:>8} {:>16.1} {:>16.2}",
            c.context, c.prefill_tokens_per_s, c.decode_tokens_per_s
        );
    }
    for c in skipped {
        println!(
            "{c:>8}   skipped: {c} + {} exceeds the context of {max}",
            a.new_tokens
        );
    }
    if let Some(s) = stats {
        println!(
            "expert store: {} experts resident at most, hit rate {:.1}%, {:.0} MiB read",
            s.capacity,
            100.0 * s.hit_rate(),
            s.bytes_fetched as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

/// Runs `moe bench`.
pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(ckpt) = a.decode.clone() {
        return bench_decode(&a, &ckpt);
    }
    anyhow::ensure!(
        !a.budget.is_set(),
        "--expert-budget applies to a checkpoint: use it with --decode CKPT"
    );
    let device = crate::device(&a.device)?;
    let mut sizes = BenchSizes::default();
    if let Some(t) = a.tokens {
        anyhow::ensure!(t > 0, "--tokens must be at least 1");
        sizes.tokens = t;
    }
    let budget = if a.quick {
        BenchBudget::quick()
    } else {
        BenchBudget::full()
    };
    if !a.json {
        eprintln!(
            "measuring on {} ({} tokens per call, d_model {}); this takes a minute or two",
            a.device, sizes.tokens, sizes.d_model
        );
    }
    let report = run(&device, &a.device, &sizes, &budget)
        .map_err(|e| anyhow::anyhow!("{}: the device failed: {e}", a.device))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "device {}: plain matmul {:.1} GFLOP/s\n",
        report.device, report.matmul_gflops
    );
    println!(
        "{:<28} {:>12} {:>9} {:>9} {:>10}",
        "case", "tokens/s", "GFLOP/s", "% matmul", "ms/call"
    );
    for c in &report.cases {
        println!(
            "{:<28} {:>12.0} {:>9.1} {:>8.0}% {:>10.2}",
            c.name,
            c.tokens_per_s,
            c.gflops,
            100.0 * c.matmul_share,
            c.ms
        );
    }
    println!("\n{:<30} {:>8}  target", "ratio (MoE / dense tokens/s)", "");
    for (name, value) in &report.ratios {
        let target = TARGETS.iter().find(|(n, _)| n == name).map(|(_, t)| *t);
        let verdict = match target {
            Some(t) if *value >= t => format!(">= {t} met"),
            Some(t) => format!(">= {t} NOT met"),
            None => String::new(),
        };
        println!("{name:<30} {value:>8.2}  {verdict}");
    }
    for f in &report.failed {
        println!(
            "\n{} could not run on {}: {}",
            f.name, report.device, f.error
        );
    }
    for b in &report.breakdown {
        println!("\nwhere {} spends its time (ms per call):", b.case);
        for (stage, ms) in &b.stages {
            println!("  {stage:<44} {ms:>8.2}");
        }
    }
    Ok(())
}
