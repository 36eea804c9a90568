//! `moe inspect`: what the sparsity buys and what memory all experts need.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use moe_core::WeightDType;
use moe_model::accounting::ModelAccounting;
use moe_model::weights::{self, StoredBytes};
use moe_model::{ModelConfig, checkpoint, hf};

/// Arguments of `moe inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A checkpoint directory, a run directory (its latest checkpoint), a Hugging Face
    /// directory, or either's `config.json`.
    path: PathBuf,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// The configuration of a directory (its `config.json`) or of a config file: ours, or a Hugging
/// Face one (which names its `model_type`).
fn load_config(path: &Path) -> anyhow::Result<ModelConfig> {
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    let file = if path.is_dir() {
        path.join(checkpoint::CONFIG_FILE)
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", file.display()))?;
    if json.get("model_type").is_some() {
        Ok(hf::config_from_hf(&file)?)
    } else {
        Ok(ModelConfig::load_json(&file)?)
    }
}

fn gib(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

fn human(n: usize) -> String {
    let f = n as f64;
    match f {
        f if f >= 1e9 => format!("{:.2}B", f / 1e9),
        f if f >= 1e6 => format!("{:.2}M", f / 1e6),
        f if f >= 1e3 => format!("{:.1}K", f / 1e3),
        _ => n.to_string(),
    }
}

fn print_tables(config: &ModelConfig, acc: &ModelAccounting) {
    let t = acc.total;
    println!(
        "model: {} layers ({} MoE), d_model {}, {} heads / {} KV heads, vocab {}",
        config.n_layers,
        config.n_moe_layers(),
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.vocab_size
    );
    if config.n_moe_layers() > 0 {
        let m = &config.moe;
        println!(
            "MoE: {} experts of d_ff {}, top-{} ({:?} router), {} shared, capacity {}",
            m.n_experts,
            m.d_ff,
            m.router.top_k,
            m.router.kind,
            m.n_shared_experts,
            m.capacity_factor
                .map_or("dropless".to_string(), |c| format!("factor {c}"))
        );
    }
    println!();
    println!(
        "{:<10} {:>12} {:>12} {:>14}",
        "layer", "total", "active", "FLOPs/token"
    );
    for l in &acc.layers {
        let sum = l.attention + l.ffn;
        println!(
            "{:<10} {:>12} {:>12} {:>14}",
            format!("{} {}", l.layer, l.kind),
            human(sum.total_params),
            human(sum.active_params),
            human(sum.flops_per_token)
        );
    }
    let e = acc.embedding_and_head;
    println!(
        "{:<10} {:>12} {:>12} {:>14}",
        "emb+head",
        human(e.total_params),
        human(e.active_params),
        human(e.flops_per_token)
    );
    println!();
    println!(
        "total parameters      {} ({})",
        human(t.total_params),
        t.total_params
    );
    println!(
        "active per token      {} ({})",
        human(t.active_params),
        t.active_params
    );
    println!("total / active        {:.2}x", t.sparsity_ratio());
    println!(
        "forward FLOPs/token   {} (2 x active matmul parameters, attention scores excluded)",
        human(t.flops_per_token)
    );
    println!(
        "routed expert params  {} ({:.1}% of all)",
        human(t.expert_params),
        100.0 * t.expert_params as f64 / t.total_params.max(1) as f64
    );
    println!();
    println!(
        "{:<6} {:>14} {:>16}",
        "dtype", "all weights", "routed experts"
    );
    for d in WeightDType::ALL {
        println!(
            "{:<6} {:>14} {:>16}",
            d.to_string(),
            gib(t.weight_bytes(d)),
            gib(t.expert_bytes(d))
        );
    }
}

/// What the weights files of a directory store, by dtype: a checkpoint's `model.bpk` or a
/// Hugging Face directory's safetensors, read from their headers. Empty for a config file or a
/// directory without weights.
fn stored(path: &Path) -> anyhow::Result<Vec<StoredBytes>> {
    let hf_weights = ["model.safetensors", "model.safetensors.index.json"];
    Ok(if path.join(checkpoint::WEIGHTS_FILE).is_file() {
        weights::stored_in_burnpack(&path.join(checkpoint::WEIGHTS_FILE))?
    } else if hf_weights.iter().any(|f| path.join(f).is_file()) {
        hf::stored_weights(path)?
    } else {
        Vec::new()
    })
}

fn print_stored(stored: &[StoredBytes]) {
    if stored.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<6} {:>14} {:>16} {:>14}   (as stored)",
        "dtype", "all weights", "routed experts", "the rest"
    );
    for s in stored {
        println!(
            "{:<6} {:>14} {:>16} {:>14}",
            s.dtype,
            gib(s.experts + s.other),
            gib(s.experts),
            gib(s.other)
        );
    }
}

/// Runs `moe inspect`.
pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    // A run directory (no config.json, a `latest` pointer) stands for its latest checkpoint.
    let path = if args.path.join("latest").is_file()
        && !args.path.join(checkpoint::CONFIG_FILE).exists()
    {
        crate::resolve_checkpoint(&args.path)?
    } else {
        args.path.clone()
    };
    let config = load_config(&path)?;
    let stored = stored(&path)?;
    let acc = config.accounting();
    if args.json {
        let memory: serde_json::Map<String, serde_json::Value> = WeightDType::ALL
            .iter()
            .map(|d| (d.to_string(), serde_json::json!({"all_weights_bytes": acc.total.weight_bytes(*d), "expert_bytes": acc.total.expert_bytes(*d)})))
            .collect();
        let out = serde_json::json!({
            "config": config,
            "total_params": acc.total.total_params,
            "active_params": acc.total.active_params,
            "expert_params": acc.total.expert_params,
            "flops_per_token": acc.total.flops_per_token,
            "total_over_active": acc.total.sparsity_ratio(),
            "memory": memory,
            "stored": stored.iter().map(|s| serde_json::json!({
                "dtype": s.dtype, "expert_bytes": s.experts, "other_bytes": s.other,
            })).collect::<Vec<_>>(),
            "layers": acc.layers,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_tables(&config, &acc);
        print_stored(&stored);
    }
    Ok(())
}
