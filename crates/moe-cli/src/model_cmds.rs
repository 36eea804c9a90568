//! Commands that run or convert a model: generate, logits, import-hf, upcycle, export.

use std::path::PathBuf;

use anyhow::bail;
use burn::prelude::*;
use burn::tensor::DType;
use clap::Args;
use moe_core::{MoeLayerConfig, RouterConfig};
use moe_model::checkpoint::CheckpointWriter;
use moe_model::generate::{Sampling, check_prompt, generate_batch, generate_streaming};
use moe_model::quantize::{ExpertQuant, quantize_experts};
use moe_model::{checkpoint, hf, upcycle as up, weights};
use moe_train::HfTokenizer;
use moe_train::hf_tokenizer::{self, HF_TOKENIZER_DIR};

use crate::budget::{BudgetArgs, KvCacheArgs};
use crate::prompt::{Codec, PromptArgs};

/// Arguments of `moe generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory, or a run directory (its latest checkpoint).
    checkpoint: PathBuf,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Always take the most likely token.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "min_p"])]
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
    /// Sample among the tokens at least this share as likely as the most likely one.
    #[arg(long)]
    min_p: Option<f64>,
    /// Discourage tokens already in the prompt or output (above 1; transformers' rule).
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop once the generated text contains this string (repeatable); the text ends before it.
    #[arg(long)]
    stop: Vec<String>,
    /// Print JSON: {"prompt_tokens", "new_tokens", "text", ...} at the end, instead of
    /// printing the text as it is generated.
    #[arg(long)]
    json: bool,
    /// Device.
    #[arg(long, default_value = "flex")]
    device: String,
    #[command(flatten)]
    budget: BudgetArgs,
    #[command(flatten)]
    kv: KvCacheArgs,
}

/// Generated text as it grows: cut at the first stop string, and printed as it comes when
/// streaming, holding back what could still turn into a stop string or is an unfinished
/// character.
struct TextStream<'a> {
    codec: &'a Codec,
    stops: &'a [String],
    print: bool,
    tokens: Vec<u32>,
    printed: String,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    fn new(codec: &'a Codec, stops: &'a [String], print: bool) -> Self {
        Self {
            codec,
            stops,
            print,
            tokens: Vec::new(),
            printed: String::new(),
            stopped: false,
        }
    }

    /// The text of the tokens so far, cut before the first stop string.
    fn text(&mut self) -> String {
        let text = self.codec.decode(&self.tokens);
        match self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            Some(cut) => {
                self.stopped = true;
                text[..cut].to_string()
            }
            None => text,
        }
    }

    /// Takes a new token; false once a stop string has appeared.
    fn push(&mut self, token: u32) -> bool {
        self.tokens.push(token);
        let text = self.text();
        let hold = if self.stopped {
            0
        } else {
            self.stops
                .iter()
                .map(String::len)
                .max()
                .unwrap_or(1)
                .saturating_sub(1)
        };
        let mut end = text.len().saturating_sub(hold);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let ready = text[..end].trim_end_matches('\u{FFFD}');
        self.emit(ready);
        !self.stopped
    }

    /// Prints what of `ready` has not been printed, if it continues what was.
    fn emit(&mut self, ready: &str) {
        if self.print
            && ready.len() > self.printed.len()
            && let Some(rest) = ready.strip_prefix(self.printed.as_str())
        {
            print!("{rest}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            self.printed = ready.to_string();
        }
    }

    /// The final text, its unprinted end printed.
    fn finish(mut self) -> String {
        let text = self.text();
        self.emit(&text);
        if self.print {
            println!();
        }
        text
    }
}

/// Runs `moe generate`.
pub fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let device = crate::device(&a.device)?;
    let kv_cache = a.kv.on(&device)?;
    let (mut ckpt, store) = a.budget.load(&a.checkpoint, &device)?;
    ckpt.model = ckpt.model.with_kv_cache(kv_cache);
    let vocab_size = ckpt.model.config.vocab_size;
    let codec = Codec::for_checkpoint(&ckpt)?;
    let sampling = Sampling {
        temperature: if a.greedy { 0.0 } else { a.temperature },
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
    };
    let eos = codec.eos(vocab_size);
    let start = std::time::Instant::now();
    let mut out = if a.prompt.prompts.is_some() {
        generate_prompts(&a, &ckpt, &codec, &sampling, &eos)?
    } else {
        let prompt = codec.tokens(&a.prompt, vocab_size, &ckpt.dir)?;
        if !a.json {
            print!("{}", a.prompt.echo());
        }
        let mut stream = TextStream::new(&codec, &a.stop, !a.json);
        let new = generate_streaming(
            &ckpt.model,
            &prompt,
            a.max_new_tokens,
            &sampling,
            &eos,
            |t| stream.push(t),
        )?;
        let total = new.len();
        serde_json::json!({
            "prompt_tokens": prompt,
            "new_tokens": new,
            "text": stream.finish(),
            "total_new_tokens": total,
        })
    };
    if !a.json {
        return Ok(());
    }
    let seconds = start.elapsed().as_secs_f64();
    let total = out["total_new_tokens"].as_f64().unwrap_or(0.0);
    out["seconds"] = seconds.into();
    out["tokens_per_second"] = (total / seconds.max(1e-9)).into();
    out["peak_rss_bytes"] = peak_rss_bytes().into();
    if let Some(store) = &store {
        store.settle();
        let stats = store.stats();
        out["expert_store"] = serde_json::to_value(stats)?;
        out["expert_store"]["hit_rate"] = stats.hit_rate().into();
        out["expert_store"]["prefetch_precision"] = stats.prefetch_precision().into();
        out["expert_store"]["prefetch_recall"] = stats.prefetch_recall().into();
        out["expert_store"]["belady_hit_rate"] = store.belady_hit_rate().into();
    }
    println!("{out}");
    Ok(())
}

/// `moe generate --prompts FILE`: every line continued in one batch, the texts printed in order
/// once all are done (or returned in the JSON object).
fn generate_prompts(
    a: &GenerateArgs,
    ckpt: &checkpoint::Checkpoint,
    codec: &Codec,
    sampling: &Sampling,
    eos: &[u32],
) -> anyhow::Result<serde_json::Value> {
    let vocab_size = ckpt.model.config.vocab_size;
    let prompts = codec.batch(&a.prompt, vocab_size, &ckpt.dir)?;
    let tokens: Vec<Vec<u32>> = prompts.iter().map(|(_, t)| t.clone()).collect();
    let mut streams: Vec<TextStream> = prompts
        .iter()
        .map(|_| TextStream::new(codec, &a.stop, false))
        .collect();
    let news = generate_batch(
        &ckpt.model,
        &tokens,
        a.max_new_tokens,
        sampling,
        eos,
        |i, t| streams[i].push(t),
    )?;
    let results: Vec<serde_json::Value> = prompts
        .iter()
        .zip(news)
        .zip(streams)
        .enumerate()
        .map(|(i, (((echo, prompt), new), stream))| {
            let text = stream.finish();
            if !a.json {
                println!("--- prompt {} ---\n{echo}{text}", i + 1);
            }
            serde_json::json!({"prompt_tokens": prompt, "new_tokens": new, "text": text})
        })
        .collect();
    let total: usize = results
        .iter()
        .map(|r| r["new_tokens"].as_array().map_or(0, Vec::len))
        .sum();
    Ok(serde_json::json!({ "results": results, "total_new_tokens": total }))
}

/// This process's peak resident memory so far (`VmHWM` of `/proc/self/status`), where the
/// system reports it (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Arguments of `moe logits`.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Checkpoint directory, or a run directory (its latest checkpoint).
    checkpoint: PathBuf,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Device.
    #[arg(long, default_value = "flex")]
    device: String,
    #[command(flatten)]
    budget: BudgetArgs,
}

/// Runs `moe logits`.
pub fn logits(a: LogitsArgs) -> anyhow::Result<()> {
    let device = crate::device(&a.device)?;
    let (ckpt, _) = a.budget.load(&a.checkpoint, &device)?;
    let config = &ckpt.model.config;
    let tokens = Codec::for_checkpoint(&ckpt)?.tokens(&a.prompt, config.vocab_size, &ckpt.dir)?;
    // Ids past the vocabulary (given, or from a tokenizer larger than the model's) are refused.
    check_prompt(config, &tokens)?;
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
    /// Hugging Face Mixtral directory (config.json plus safetensors, and the tokenizer files when
    /// present).
    hf_dir: PathBuf,
    /// Checkpoint directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing checkpoint at --out.
    #[arg(long)]
    overwrite: bool,
    /// Dtype of the stored weights: f32, f16 or bf16. Default: the dtype the checkpoint stores
    /// most of its weights in. Models run in f32 whatever the stored dtype.
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
}

/// A float dtype as the CLI spells it.
fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(format!("'{s}' is not a weight dtype; use f32, f16 or bf16")),
    }
}

/// Runs `moe import-hf`.
pub fn import_hf(a: ImportArgs) -> anyhow::Result<()> {
    crate::refuse_existing(&a.out, a.overwrite)?;
    let model = hf::import_as(&a.hf_dir, &Device::flex(), a.dtype)?;
    let has_tokenizer = a.hf_dir.join("tokenizer.json").exists();
    if has_tokenizer {
        HfTokenizer::from_dir(&a.hf_dir)?;
    }
    let writer = CheckpointWriter::new(&a.out)?;
    writer.write_model(&model)?;
    if has_tokenizer {
        hf_tokenizer::copy_files(&a.hf_dir, &writer.dir().join(HF_TOKENIZER_DIR))?;
    }
    let dir = writer.commit(a.overwrite)?;
    let acc = model.config.accounting().total;
    let stored: Vec<String> = weights::bytes_by_dtype(&model)
        .iter()
        .map(|(dtype, bytes)| format!("{:.1} MiB {dtype}", *bytes as f64 / (1 << 20) as f64))
        .collect();
    println!(
        "imported {} -> {} ({} parameters, {} active per token, {}, {})",
        a.hf_dir.display(),
        dir.display(),
        acc.total_params,
        acc.active_params,
        stored.join(" + "),
        if has_tokenizer {
            "with its tokenizer"
        } else {
            "no tokenizer: bytes or --ids"
        }
    );
    Ok(())
}

/// Saves `model`, made from the checkpoint in `source`, at `out` with that checkpoint's
/// tokenizer: its description `tokenizer` and any tokenizer files it carries.
fn save_derived(
    out: &std::path::Path,
    model: &moe_model::MoeLm,
    tokenizer: Option<&serde_json::Value>,
    source: &std::path::Path,
    overwrite: bool,
) -> anyhow::Result<PathBuf> {
    let writer = CheckpointWriter::new(out)?;
    writer.write_model(model)?;
    if let Some(spec) = tokenizer {
        writer.write_json(checkpoint::TOKENIZER_FILE, spec)?;
    }
    hf_tokenizer::carry(source, writer.dir())?;
    Ok(writer.commit(overwrite)?)
}

/// Arguments of `moe upcycle`.
#[derive(Args, Debug)]
pub struct UpcycleArgs {
    /// Dense checkpoint directory, or a run directory (its latest checkpoint).
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
    crate::refuse_existing(&a.out, a.overwrite)?;
    if !(a.noise >= 0.0 && a.noise.is_finite()) {
        bail!("--noise must be >= 0, got {}", a.noise);
    }
    let ckpt = checkpoint::load(&crate::resolve_checkpoint(&a.dense)?, &Device::flex())?;
    let d = ckpt.model.config.d_model;
    let moe = MoeLayerConfig::new(d, ckpt.model.config.d_ff, a.experts)
        .with_router(RouterConfig::mixtral().with_top_k(a.top_k));
    let model = up::upcycle(ckpt.model, moe, a.noise, a.seed)?;
    let dir = save_derived(
        &a.out,
        &model,
        ckpt.tokenizer.as_ref(),
        &ckpt.dir,
        a.overwrite,
    )?;
    println!(
        "upcycled {} -> {} ({} experts, top-{})",
        ckpt.dir.display(),
        dir.display(),
        a.experts,
        a.top_k
    );
    Ok(())
}

/// Arguments of `moe quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Checkpoint directory, or a run directory (its latest checkpoint).
    checkpoint: PathBuf,
    /// Precision of the routed experts: q8 or q4 (symmetric, one f32 scale per 32 values).
    #[arg(long, value_parser = parse_quant)]
    experts: ExpertQuant,
    /// Checkpoint directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing checkpoint at --out.
    #[arg(long)]
    overwrite: bool,
}

fn parse_quant(s: &str) -> Result<ExpertQuant, String> {
    ExpertQuant::parse(s).ok_or_else(|| format!("'{s}' is not an expert precision; use q8 or q4"))
}

/// Runs `moe quantize`.
pub fn quantize(a: QuantizeArgs) -> anyhow::Result<()> {
    crate::refuse_existing(&a.out, a.overwrite)?;
    let ckpt = checkpoint::load(&crate::resolve_checkpoint(&a.checkpoint)?, &Device::flex())?;
    if ckpt.model.config.n_moe_layers() == 0 {
        bail!(
            "{}: a dense model has no experts to quantise",
            ckpt.dir.display()
        );
    }
    let model = quantize_experts(ckpt.model, a.experts)?;
    let dir = save_derived(
        &a.out,
        &model,
        ckpt.tokenizer.as_ref(),
        &ckpt.dir,
        a.overwrite,
    )?;
    let size = |d: &std::path::Path| -> anyhow::Result<Vec<weights::StoredBytes>> {
        Ok(weights::stored_in_burnpack(
            &d.join(checkpoint::WEIGHTS_FILE),
        )?)
    };
    let experts = |s: &[weights::StoredBytes]| s.iter().map(|b| b.experts).sum::<usize>();
    let (before, after) = (experts(&size(&ckpt.dir)?), experts(&size(&dir)?));
    println!(
        "quantised the experts of {} -> {}: {:.1} MiB -> {:.1} MiB of expert weights",
        ckpt.dir.display(),
        dir.display(),
        before as f64 / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Arguments of `moe export`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["out", "hf"])))]
pub struct ExportArgs {
    /// Checkpoint directory, or a run directory (its latest checkpoint).
    checkpoint: PathBuf,
    /// The safetensors file to write (our parameter names and layout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A Hugging Face Mixtral directory to write (new or empty): config.json, model.safetensors
    /// and the checkpoint's tokenizer files.
    #[arg(long)]
    hf: Option<PathBuf>,
}

/// Runs `moe export`.
pub fn export(a: ExportArgs) -> anyhow::Result<()> {
    // In the dtype the checkpoint stores.
    let ckpt = checkpoint::load_as(
        &crate::resolve_checkpoint(&a.checkpoint)?,
        &Device::flex(),
        None,
    )?;
    if let Some(dir) = &a.hf {
        let tokenizer = ckpt.dir.join(HF_TOKENIZER_DIR);
        let has_tokenizer = tokenizer.is_dir();
        hf::export_mixtral(
            &ckpt.model,
            dir,
            has_tokenizer.then_some(tokenizer.as_path()),
        )?;
        println!(
            "wrote {} (mixtral, {})",
            dir.display(),
            if has_tokenizer {
                "with its tokenizer"
            } else {
                "no tokenizer"
            }
        );
    } else if let Some(out) = &a.out {
        checkpoint::export_safetensors(&ckpt.model, out)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
