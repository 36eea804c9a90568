//! Prefill and greedy decode speed of a whole model, one sequence at a time, at several context
//! lengths: the prompt is run in one forward pass, then each new token in its own, with the KV
//! cache, each step ending in the host read of the next token (as generation does).

use std::time::Instant;

use burn::prelude::*;
use moe_model::{KvCache, MoeLm};

/// Speed at one context length.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DecodeCase {
    /// Prompt tokens run before decoding.
    pub context: usize,
    /// Prompt tokens per second of the prefill pass.
    pub prefill_tokens_per_s: f64,
    /// New tokens per second of the decode steps.
    pub decode_tokens_per_s: f64,
    /// New tokens decoded.
    pub new_tokens: usize,
}

/// Measures `model` at each context length in `contexts` (each at most the model's context
/// minus `new_tokens`), decoding `new_tokens` greedily after a prompt of pseudo-random ids.
/// One short untimed run warms the backend up first.
pub fn decode_speed(
    model: &MoeLm,
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
    if let Some(&first) = contexts.first() {
        run_once(model, first.min(4), new_tokens.min(1));
    }
    Ok(contexts
        .iter()
        .map(|&c| run_once(model, c, new_tokens))
        .collect())
}

/// One prefill of `context` ids and `new_tokens` decode steps, timed.
fn run_once(model: &MoeLm, context: usize, new_tokens: usize) -> DecodeCase {
    let device = model.embed.weight.val().device();
    let vocab = model.config.vocab_size as i64;
    let prompt: Vec<i64> = (0..context as i64)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let mut cache = KvCache::default();
    let start = Instant::now();
    let mut next = step(model, &prompt, &mut cache, &device);
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..new_tokens {
        next = step(model, &[next], &mut cache, &device);
    }
    let decode = start.elapsed().as_secs_f64();
    DecodeCase {
        context,
        prefill_tokens_per_s: context as f64 / prefill.max(1e-9),
        decode_tokens_per_s: new_tokens as f64 / decode.max(1e-9),
        new_tokens,
    }
}

/// Runs `ids` after the cached ones and returns the most likely next token (read back).
fn step(model: &MoeLm, ids: &[i64], cache: &mut KvCache, device: &Device) -> i64 {
    let tokens = Tensor::<1, Int>::from_ints(ids, device).reshape([1, ids.len()]);
    let last = model.forward_last(tokens, cache); // [1, vocab]
    last.argmax(1).into_scalar::<i64>()
}
