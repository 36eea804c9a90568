//! `moe bench`: MoE against dense feed-forward blocks, or a whole model's prefill and decode, on
//! one backend or several side by side.

use std::path::{Path, PathBuf};

use clap::Args;
use moe_bench::{
    BackendRun, BenchBudget, BenchReport, BenchSizes, Comparison, DecodeCase, case_names,
    decode_model, decode_speed, run_selected,
};

use crate::budget::{BudgetArgs, KvCacheArgs};

/// Arguments of `moe bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Devices: flex, ndarray, wgpu, wgpu:N, wgpu:cpu; several (comma-separated) run the same
    /// cases on each and compare them side by side.
    #[arg(long, value_delimiter = ',', default_value = "flex")]
    device: Vec<String>,
    /// Print one JSON object with every figure.
    #[arg(long)]
    json: bool,
    /// Draw tokens/s per case and backend as a grouped bar chart (SVG).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Fewer timed calls per case (noisier, about four times faster).
    #[arg(long)]
    quick: bool,
    /// Tokens per call (default 2048, the size the targets are stated for).
    #[arg(long)]
    tokens: Option<usize>,
    /// Only these layer cases (comma-separated): a case's full name selects that case alone,
    /// any other text every case whose name contains it, e.g. `moe_top2_fwd,dense_active`;
    /// the ratios of the cases run. Default: every case.
    #[arg(long, value_delimiter = ',', conflicts_with = "decode")]
    cases: Vec<String>,
    /// Instead of the layer cases, prefill and greedy decode speed of a whole model: this
    /// checkpoint, or without one a built-in random MoE (d_model 512, 4 layers, 8 experts of
    /// d_ff 1024, top-2, 53M parameters).
    #[arg(long, value_name = "CKPT", num_args = 0..=1)]
    decode: Option<Option<PathBuf>>,
    /// Prompt lengths for --decode.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "128,1024",
        requires = "decode"
    )]
    context: Vec<usize>,
    /// Sequences decoded together, for --decode.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,4,16",
        requires = "decode"
    )]
    batch: Vec<usize>,
    /// Tokens decoded after each prompt, for --decode.
    #[arg(long, default_value_t = 32, requires = "decode")]
    new_tokens: usize,
    #[command(flatten)]
    budget: BudgetArgs,
    #[command(flatten)]
    kv: KvCacheArgs,
}

impl BenchArgs {
    /// Whether `--cases` selects the layer case `name`, among the case names `names`.
    fn selects(&self, name: &str, names: &[&str]) -> bool {
        self.cases.is_empty() || self.cases.iter().any(|c| selects(c, name, names))
    }
}

/// Whether the `--cases` entry `wanted` selects the layer case `name`, among the case names
/// `names`: a full case name only itself, other text every name containing it.
fn selects(wanted: &str, name: &str, names: &[&str]) -> bool {
    if names.contains(&wanted) {
        wanted == name
    } else {
        name.contains(wanted)
    }
}

/// The project's targets for each ratio (flex, release build, 2 cores).
const TARGETS: [(&str, f64); 3] = [
    ("moe_vs_dense_active_fwd", 0.9),
    ("moe_vs_dense_active_fwd_bwd", 0.8),
    ("moe_vs_dense_total_e64_fwd", 25.0),
];

/// What one backend measured.
enum Measured {
    Layers(BenchReport),
    Decode(DecodeRun),
}

/// A whole model's prefill and decode on one backend.
#[derive(serde::Serialize)]
struct DecodeRun {
    device: String,
    model: String,
    kv_cache: moe_model::KvDtype,
    cases: Vec<DecodeCase>,
    skipped_contexts: Vec<usize>,
    expert_store: Option<moe_model::store::StoreStats>,
}

impl Measured {
    /// (case, tokens/s) pairs for a side-by-side comparison.
    fn tokens_per_s(&self) -> Vec<(String, f64)> {
        match self {
            Self::Layers(r) => r
                .cases
                .iter()
                .map(|c| (c.name.clone(), c.tokens_per_s))
                .collect(),
            Self::Decode(d) => d
                .cases
                .iter()
                .flat_map(|c| {
                    let at = format!("batch {} context {}", c.batch, c.context);
                    [
                        (format!("prefill {at}"), c.prefill_tokens_per_s),
                        (format!("decode {at}"), c.decode_tokens_per_s),
                    ]
                })
                .collect(),
        }
    }

    fn json(&self) -> serde_json::Result<serde_json::Value> {
        match self {
            Self::Layers(r) => serde_json::to_value(r),
            Self::Decode(d) => serde_json::to_value(d),
        }
    }
}

/// Measures a whole model's prefill and decode on `name`.
fn bench_decode(a: &BenchArgs, name: &str, ckpt: Option<&Path>) -> anyhow::Result<DecodeRun> {
    let device = crate::device(name)?;
    let kv_cache = a.kv.on(&device)?;
    let (model, store, label) = match ckpt {
        Some(path) => {
            let (ckpt, store) = a.budget.load(path, &device)?;
            (ckpt.model, store, ckpt.dir.display().to_string())
        }
        None => {
            anyhow::ensure!(
                !a.budget.is_set(),
                "--expert-budget applies to a checkpoint: give one to --decode"
            );
            let model = decode_model().init_seeded(&device, 0)?.for_inference();
            (
                model,
                None,
                "built-in MoE (53.2M parameters, 15.5M active)".into(),
            )
        }
    };
    let max = model.config.max_seq_len;
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
    let model = model.with_kv_cache(kv_cache);
    let cases = decode_speed(&model, &a.batch, &fit, a.new_tokens).map_err(anyhow::Error::msg)?;
    let expert_store = store.as_ref().map(|s| {
        s.settle();
        s.stats()
    });
    Ok(DecodeRun {
        device: name.into(),
        model: label,
        kv_cache,
        cases,
        skipped_contexts: skipped,
        expert_store,
    })
}

/// Prints one backend's decode figures.
fn print_decode(d: &DecodeRun, new_tokens: usize) {
    println!(
        "{} on {} (greedy, {} KV cache)",
        d.model, d.device, d.kv_cache
    );
    println!(
        "{:>6} {:>8} {:>16} {:>16} {:>20}",
        "batch", "context", "prefill tok/s", "decode tok/s", "first prefill tok/s"
    );
    for c in &d.cases {
        println!(
            "{:>6} {:>8} {:>16.1} {:>16.2} {:>20.1}",
            c.batch,
            c.context,
            c.prefill_tokens_per_s,
            c.decode_tokens_per_s,
            c.first_prefill_tokens_per_s
        );
    }
    for c in &d.skipped_contexts {
        println!(
            "{:>6} {c:>8}   skipped: {c} + {new_tokens} exceeds the model's context",
            ""
        );
    }
    if let Some(s) = &d.expert_store {
        println!(
            "expert store: {} experts resident at most, hit rate {:.1}%, {:.0} MiB read",
            s.capacity,
            100.0 * s.hit_rate(),
            s.bytes_fetched as f64 / (1 << 20) as f64
        );
    }
}

/// Measures the layer cases on `name`.
fn bench_layers(a: &BenchArgs, name: &str) -> anyhow::Result<BenchReport> {
    let device = crate::device(name)?;
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
            "measuring on {name} ({} tokens per call, d_model {}); this takes a minute or two",
            sizes.tokens, sizes.d_model
        );
    }
    let names = case_names();
    run_selected(&device, name, &sizes, &budget, &|case| {
        a.selects(case, &names)
    })
    .map_err(|e| anyhow::anyhow!("the device failed: {e}"))
}

/// Runs the cases on one backend; a panic inside the backend is an error like any other.
fn measure(a: &BenchArgs, name: &str) -> anyhow::Result<Measured> {
    let run = std::panic::AssertUnwindSafe(|| match &a.decode {
        Some(ckpt) => bench_decode(a, name, ckpt.as_deref()).map(Measured::Decode),
        None => bench_layers(a, name).map(Measured::Layers),
    });
    match std::panic::catch_unwind(run) {
        Ok(result) => result,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            anyhow::bail!("{}", why.lines().next().unwrap_or(why))
        }
    }
}

/// Runs `moe bench`.
pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.decode.is_some() || !a.budget.is_set(),
        "--expert-budget applies to a checkpoint: use it with --decode CKPT"
    );
    // Bad names fail before anything is measured.
    for name in &a.device {
        name.parse::<moe_core::DeviceSpec>()?;
    }
    let names = case_names();
    let matches_none = |c: &&String| c.is_empty() || !names.iter().any(|n| selects(c, n, &names));
    if let Some(c) = a.cases.iter().find(matches_none) {
        anyhow::bail!(
            "--cases: '{c}' matches no case; the cases are {}",
            names.join(", ")
        );
    }
    if let [name] = &a.device[..] {
        let measured = measure(&a, name).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        if let Some(plot) = &a.plot {
            let runs = [BackendRun {
                device: name.clone(),
                result: Ok(measured.tokens_per_s()),
            }];
            Comparison::new(&runs)
                .plot_svg(plot)
                .map_err(anyhow::Error::msg)?;
        }
        if a.json {
            println!("{}", serde_json::to_string_pretty(&measured.json()?)?);
            return Ok(());
        }
        match &measured {
            Measured::Layers(r) => print_layers(r),
            Measured::Decode(d) => print_decode(d, a.new_tokens),
        }
        return Ok(());
    }
    let mut runs = Vec::new();
    let mut details = Vec::new();
    for name in &a.device {
        let measured = measure(&a, name);
        runs.push(BackendRun {
            device: name.clone(),
            result: measured
                .as_ref()
                .map(Measured::tokens_per_s)
                .map_err(|e| e.to_string()),
        });
        details.push(match measured {
            Ok(m) => m.json()?,
            Err(e) => serde_json::json!({ "device": name, "error": e.to_string() }),
        });
    }
    let comparison = Comparison::new(&runs);
    if let Some(plot) = &a.plot {
        comparison.plot_svg(plot).map_err(anyhow::Error::msg)?;
    }
    if a.json {
        let out = serde_json::json!({ "comparison": comparison, "runs": details });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", comparison.table());
    }
    Ok(())
}

/// Prints one backend's layer cases, ratios, failures and breakdowns.
fn print_layers(report: &BenchReport) {
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
}
