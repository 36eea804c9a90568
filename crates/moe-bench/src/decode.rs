//! Prefill and greedy decode speed of a whole model at several batch sizes and context lengths:
//! the prompts are run in one forward pass, then each new token in its own, with the KV cache,
//! each step ending in the host read of the next tokens (as generation does).

use std::time::Instant;

use burn::prelude::*;
use moe_core::MoeLayerConfig;
use moe_model::{KvCache, ModelConfig, MoeLm};

/// Speed at one batch size and context length.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DecodeCase {
    /// Sequences decoded together.
    pub batch: usize,
    /// Prompt tokens run before decoding.
    pub context: usize,
    /// Prompt tokens per second of the prefill pass (the case's second: see [`decode_speed`]).
    pub prefill_tokens_per_s: f64,
    /// The same, the first time this process ran the case's shapes: on wgpu it includes
    /// compiling their kernels, which a fresh `moe generate` pays before its first token.
    pub first_prefill_tokens_per_s: f64,
    /// New tokens per second of the decode steps.
    pub decode_tokens_per_s: f64,
    /// New tokens decoded per sequence.
    pub new_tokens: usize,
}

/// The built-in shape `moe bench --decode` measures without a checkpoint: a Mixtral-style MoE
/// of 53.2M parameters (15.5M active): d_model 512, 4 layers, 8 query and 2 key/value heads, 8
/// experts of d_ff 1024 with top-2 routing, a 256-token vocabulary and a 2048-token context.
pub fn decode_model() -> ModelConfig {
    ModelConfig::new()
        .with_vocab_size(256)
        .with_d_model(512)
        .with_n_layers(4)
        .with_n_heads(8)
        .with_n_kv_heads(2)
        .with_max_seq_len(2048)
        .with_moe(MoeLayerConfig::new(512, 1024, 8))
}

/// Measures `model` at each batch size in `batches` and context length in `contexts` (each at
/// most the model's context minus `new_tokens`), decoding `new_tokens` greedily after prompts of
/// pseudo-random ids. Prefill and decode tokens/s count every sequence of the batch.
///
/// An untimed run warms the backend up first, with one prompt of [`WARM_UP_TOKENS`]: a
/// checkpoint's weights are read from its file on first use, and so many tokens reach every
/// expert of a routed layer (unless its routing has collapsed), so no timed run pays for those
/// reads. Under an expert budget the timed runs still read the experts they evict and route to
/// again: that is what such a run measures. Then each case runs untimed once with its own
/// shapes (its prefill and [`WARM_UP_STEPS`] decode steps) before it is timed: what a backend
/// does once per shape (wgpu compiles its kernels: on an H200 a case's first prefill at batch
/// 1 ran 40-140 times slower than its second; every backend first touches its buffers' memory)
/// is not what a prefill or a decode step costs, and the peers it is compared with are timed
/// warm.
pub fn decode_speed(
    model: &MoeLm,
    batches: &[usize],
    contexts: &[usize],
    new_tokens: usize,
) -> Result<Vec<DecodeCase>, String> {
    let max = model.config.max_seq_len;
    if let Some(c) = contexts.iter().find(|&&c| c == 0 || c + new_tokens > max) {
        return Err(format!(
            "a context of {c} plus {new_tokens} new tokens does not fit the model's context of \
             {max} (and a context must be at least 1)"
        ));
    }
    if batches.contains(&0) {
        return Err("a batch must hold at least 1 sequence".into());
    }
    if max > 1 {
        run_once(model, 1, WARM_UP_TOKENS.min(max - 1), 1, 1);
    }
    Ok(batches
        .iter()
        .flat_map(|&b| contexts.iter().map(move |&c| (b, c)))
        .map(|(b, c)| {
            let first = run_once(model, b, c, WARM_UP_STEPS.min(new_tokens), new_tokens);
            DecodeCase {
                first_prefill_tokens_per_s: first.prefill_tokens_per_s,
                ..run_once(model, b, c, new_tokens, new_tokens)
            }
        })
        .collect())
}

/// Prompt length of the untimed warm-up run.
pub const WARM_UP_TOKENS: usize = 256;

/// Decode steps of each case's untimed run.
pub const WARM_UP_STEPS: usize = 2;

/// One prefill of `batch` prompts of `context` ids and `new_tokens` decode steps, timed, with a
/// cache for `reserve` new tokens.
fn run_once(
    model: &MoeLm,
    batch: usize,
    context: usize,
    new_tokens: usize,
    reserve: usize,
) -> DecodeCase {
    let device = model.embed.weight.val().device();
    let vocab = model.config.vocab_size as i64;
    let prompt: Vec<i64> = (0..batch as i64)
        .flat_map(|r| (0..context as i64).map(move |i| (i * 7919 + 13 + r * 104_729) % vocab))
        .collect();
    let mut cache = model.new_cache(Vec::new(), context + reserve);
    let start = Instant::now();
    let mut next = step(model, &prompt, batch, &mut cache, &device);
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..new_tokens {
        next = step(model, &next, batch, &mut cache, &device);
    }
    let decode = start.elapsed().as_secs_f64();
    let prefill_tokens_per_s = (batch * context) as f64 / prefill.max(1e-9);
    DecodeCase {
        batch,
        context,
        prefill_tokens_per_s,
        // This run's own prefill; `decode_speed` replaces it with the case's untimed first run.
        first_prefill_tokens_per_s: prefill_tokens_per_s,
        decode_tokens_per_s: (batch * new_tokens) as f64 / decode.max(1e-9),
        new_tokens,
    }
}

/// Runs `batch` equal rows of `ids` after the cached ones and returns each row's most likely
/// next token (read back).
fn step(
    model: &MoeLm,
    ids: &[i64],
    batch: usize,
    cache: &mut KvCache,
    device: &Device,
) -> Vec<i64> {
    let tokens = Tensor::<1, Int>::from_ints(ids, device).reshape([batch, ids.len() / batch]);
    let last = model.forward_last(tokens, cache); // [batch, vocab]
    last.argmax(1).into_data().iter::<i64>().collect()
}
