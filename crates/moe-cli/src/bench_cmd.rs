//! `moe bench`: MoE against dense feed-forward blocks on one backend, measured.

use clap::Args;
use moe_bench::{BenchBudget, BenchSizes, run};

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
}

/// The project's targets for each ratio (flex, release build, 2 cores).
const TARGETS: [(&str, f64); 3] = [
    ("moe_vs_dense_active_fwd", 0.9),
    ("moe_vs_dense_active_fwd_bwd", 0.8),
    ("moe_vs_dense_total_e64_fwd", 25.0),
];

/// Runs `moe bench`.
pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
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
