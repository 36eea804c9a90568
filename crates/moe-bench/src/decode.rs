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
///
/// The decode steps of one batch size's contexts are taken in turn, one step of each, so that
/// the machine's drift in speed (10-50% between runs of a few seconds on a shared host) falls
/// on every context alike and their ratios (position 1000 against position 16) measure the
/// positions rather than the moment.
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
        let mut warm = Sequences::prefilled(model, 1, WARM_UP_TOKENS.min(max - 1), 1);
        warm.decode(model, 1);
    }
    Ok(batches
        .iter()
        .flat_map(|&b| batch_cases(model, b, contexts, new_tokens))
        .collect())
}

/// Prompt length of the untimed warm-up run.
pub const WARM_UP_TOKENS: usize = 256;

/// Decode steps of each case's untimed run.
pub const WARM_UP_STEPS: usize = 2;

/// The cases of batch size `batch`: each context's untimed run, then its timed prefill, then
/// the timed decode steps of every context in turn.
fn batch_cases(
    model: &MoeLm,
    batch: usize,
    contexts: &[usize],
    new_tokens: usize,
) -> Vec<DecodeCase> {
    let mut runs: Vec<_> = contexts
        .iter()
        .map(|&context| {
            let mut first = Sequences::prefilled(model, batch, context, new_tokens);
            first.decode(model, WARM_UP_STEPS.min(new_tokens));
            let first_prefill = first.prefill_s;
            drop(first);
            (
                Sequences::prefilled(model, batch, context, new_tokens),
                first_prefill,
            )
        })
        .collect();
    for _ in 0..new_tokens {
        for (run, _) in &mut runs {
            run.decode(model, 1);
        }
    }
    runs.into_iter()
        .map(|(run, first_prefill)| {
            let prompt_tokens = (batch * run.context) as f64;
            DecodeCase {
                batch,
                context: run.context,
                prefill_tokens_per_s: prompt_tokens / run.prefill_s.max(1e-9),
                first_prefill_tokens_per_s: prompt_tokens / first_prefill.max(1e-9),
                decode_tokens_per_s: (batch * new_tokens) as f64 / run.decode_s.max(1e-9),
                new_tokens,
            }
        })
        .collect()
}

/// `batch` sequences after their prompts of `context` pseudo-random ids: the cache, each row's
/// next token, and how long the prefill and the decode steps so far took.
struct Sequences {
    cache: KvCache,
    next: Vec<i64>,
    device: Device,
    batch: usize,
    context: usize,
    prefill_s: f64,
    decode_s: f64,
}

impl Sequences {
    /// Runs the prompts in one timed forward pass, with a cache for `reserve` new tokens.
    fn prefilled(model: &MoeLm, batch: usize, context: usize, reserve: usize) -> Self {
        let device = model.embed.weight.val().device();
        let vocab = model.config.vocab_size as i64;
        let prompt: Vec<i64> = (0..batch as i64)
            .flat_map(|r| (0..context as i64).map(move |i| (i * 7919 + 13 + r * 104_729) % vocab))
            .collect();
        let mut cache = model.new_cache(Vec::new(), context + reserve);
        let start = Instant::now();
        let next = step(model, &prompt, batch, &mut cache, &device);
        let prefill_s = start.elapsed().as_secs_f64();
        Self {
            cache,
            next,
            device,
            batch,
            context,
            prefill_s,
            decode_s: 0.0,
        }
    }

    /// Takes `steps` greedy decode steps, adding the time they took to `decode_s`.
    fn decode(&mut self, model: &MoeLm, steps: usize) {
        let start = Instant::now();
        for _ in 0..steps {
            self.next = step(model, &self.next, self.batch, &mut self.cache, &self.device);
        }
        self.decode_s += start.elapsed().as_secs_f64();
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
