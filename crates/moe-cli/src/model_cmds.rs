//! Commands that run or convert a model: generate, logits, import-hf, upcycle, export.

use std::path::PathBuf;

use anyhow::bail;
use burn::prelude::*;
use clap::Args;
use moe_core::{MoeLayerConfig, RouterConfig};
use moe_model::generate::{Sampling, check_prompt, generate as run_generate};
use moe_model::{checkpoint, hf, upcycle as up};
use moe_train::tokenizer::from_spec;

/// Arguments of `moe generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory.
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Always take the most likely token.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,
    /// Softmax temperature.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample from the smallest set of tokens with probability at least p.
    #[arg(long)]
    top_p: Option<f64>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON: {"prompt_tokens", "new_tokens", "text"}.
    #[arg(long)]
    json: bool,
    /// Device.
    #[arg(long, default_value = "flex")]
    device: String,
}

/// Runs `moe generate`.
pub fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let device = crate::device(&a.device)?;
    let ckpt = checkpoint::load(&a.checkpoint, &device)?;
    let tokenizer = from_spec(ckpt.tokenizer.as_ref())?;
    let prompt = tokenizer.encode(&a.prompt);
    let sampling = if a.greedy {
        Sampling::greedy()
    } else {
        Sampling {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        }
    };
    let eos = (tokenizer.eos() as usize) < ckpt.model.config.vocab_size;
    let new = run_generate(
        &ckpt.model,
        &prompt,
        a.max_new_tokens,
        &sampling,
        eos.then(|| tokenizer.eos()),
    )?;
    let text = tokenizer.decode(&new);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"prompt_tokens": prompt, "new_tokens": new, "text": text})
        );
    } else {
        println!("{}{}", a.prompt, text);
    }
    Ok(())
}

/// Arguments of `moe logits`.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Checkpoint directory.
    checkpoint: PathBuf,
    /// Text whose positions to score (through the checkpoint's tokenizer).
    #[arg(long, required_unless_present = "ids", conflicts_with = "ids")]
    prompt: Option<String>,
    /// Token ids to score, comma-separated (e.g. the ids another framework's tokenizer gave).
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// Device.
    #[arg(long, default_value = "flex")]
    device: String,
}

/// Runs `moe logits`.
pub fn logits(a: LogitsArgs) -> anyhow::Result<()> {
    let device = crate::device(&a.device)?;
    let ckpt = checkpoint::load(&a.checkpoint, &device)?;
    let tokens = match (a.ids, a.prompt) {
        (Some(ids), _) => ids,
        (None, Some(prompt)) => from_spec(ckpt.tokenizer.as_ref())?.encode(&prompt),
        (None, None) => bail!("give --prompt or --ids"),
    };
    // Ids past the vocabulary (given, or from a tokenizer larger than the model's) are refused.
    check_prompt(&ckpt.model.config, &tokens)?;
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let input = Tensor::<1, Int>::from_ints(ids.as_slice(), &device).reshape([1, ids.len()]);
    let out = ckpt.model.forward(input, None).logits; // [1, s, V]
    let [_, s, v] = out.dims();
    let flat: Vec<f32> = out
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let rows: Vec<&[f32]> = flat.chunks(v).take(s).collect();
    println!("{}", serde_json::json!({"tokens": tokens, "logits": rows}));
    Ok(())
}

/// Arguments of `moe import-hf`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Hugging Face Mixtral directory (config.json plus safetensors).
    hf_dir: PathBuf,
    /// Checkpoint directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing checkpoint at --out.
    #[arg(long)]
    overwrite: bool,
}

/// Runs `moe import-hf`.
pub fn import_hf(a: ImportArgs) -> anyhow::Result<()> {
    if a.out.exists() && !a.overwrite {
        bail!(
            "{}: already exists (pass --overwrite to replace it)",
            a.out.display()
        );
    }
    let model = hf::import(&a.hf_dir, &Device::flex())?;
    let dir = checkpoint::save(&a.out, &model, None, a.overwrite)?;
    let acc = model.config.accounting().total;
    println!(
        "imported {} -> {} ({} parameters, {} active per token)",
        a.hf_dir.display(),
        dir.display(),
        acc.total_params,
        acc.active_params
    );
    Ok(())
}

/// Arguments of `moe upcycle`.
#[derive(Args, Debug)]
pub struct UpcycleArgs {
    /// Dense checkpoint directory.
    dense: PathBuf,
    /// MoE checkpoint directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Experts per layer.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Relative noise added to each expert copy (0: exact copies).
    #[arg(long, default_value_t = 0.0)]
    noise: f64,
    /// Seed of the routers and the noise: the same seed gives the same checkpoint.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace an existing checkpoint at --out.
    #[arg(long)]
    overwrite: bool,
}

/// Runs `moe upcycle`.
pub fn upcycle(a: UpcycleArgs) -> anyhow::Result<()> {
    if a.out.exists() && !a.overwrite {
        bail!(
            "{}: already exists (pass --overwrite to replace it)",
            a.out.display()
        );
    }
    if !(a.noise >= 0.0 && a.noise.is_finite()) {
        bail!("--noise must be >= 0, got {}", a.noise);
    }
    let ckpt = checkpoint::load(&a.dense, &Device::flex())?;
    let d = ckpt.model.config.d_model;
    let moe = MoeLayerConfig::new(d, ckpt.model.config.d_ff, a.experts)
        .with_router(RouterConfig::mixtral().with_top_k(a.top_k));
    let model = up::upcycle(ckpt.model, moe, a.noise, a.seed)?;
    let dir = checkpoint::save(&a.out, &model, ckpt.tokenizer.as_ref(), a.overwrite)?;
    println!(
        "upcycled {} -> {} ({} experts, top-{})",
        a.dense.display(),
        dir.display(),
        a.experts,
        a.top_k
    );
    Ok(())
}

/// Arguments of `moe export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint directory.
    checkpoint: PathBuf,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `moe export`.
pub fn export(a: ExportArgs) -> anyhow::Result<()> {
    let ckpt = checkpoint::load(&a.checkpoint, &Device::flex())?;
    checkpoint::export_safetensors(&ckpt.model, &a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
