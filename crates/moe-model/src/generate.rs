//! Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::model::MoeLm;

/// How the next token is picked from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (nucleus).
    pub top_p: Option<f64>,
    /// Seed of the sampler.
    pub seed: u64,
    /// Keep only tokens whose probability is at least this share of the most likely one's.
    pub min_p: Option<f64>,
    /// Penalise tokens already in the prompt or the output (transformers' rule: a positive
    /// logit is divided by it, a negative one multiplied); above 1 discourages repeats.
    pub repetition_penalty: Option<f64>,
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            min_p: None,
            repetition_penalty: None,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Generation(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(ModelError::Generation("top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ModelError::Generation(format!(
                "top-p must be in (0, 1], got {p}"
            )));
        }
        if let Some(p) = self.min_p
            && !(0.0..=1.0).contains(&p)
        {
            return Err(ModelError::Generation(format!(
                "min-p must be in [0, 1], got {p}"
            )));
        }
        if let Some(r) = self.repetition_penalty
            && !(r > 0.0 && r.is_finite())
        {
            return Err(ModelError::Generation(format!(
                "the repetition penalty must be positive, got {r}"
            )));
        }
        Ok(())
    }
}

/// Picks a token from one row of logits.
///
/// A NaN logit is an error (a model that produced one has diverged or was loaded wrongly), as
/// is a row with no finite logit.
pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> Result<u32> {
    if let Some(i) = logits.iter().position(|l| l.is_nan()) {
        return Err(ModelError::Generation(format!(
            "the model produced a NaN logit (token {i}); its weights or inputs are broken"
        )));
    }
    if !logits.iter().any(|l| l.is_finite()) {
        return Err(ModelError::Generation(
            "the model produced no finite logit".into(),
        ));
    }
    Ok(pick(logits, sampling, rng))
}

/// [`sample`] on finite logits.
fn pick(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if sampling.temperature == 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Most likely first, ties by token id: the order a stable sort by logit gives.
    let rank = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if let Some(k) = sampling.top_k.filter(|&k| k < order.len()) {
        // Partial selection: the k best, then only those sorted.
        order.select_nth_unstable_by(k - 1, rank);
        order.truncate(k);
    }
    order.sort_unstable_by(rank);
    let max = f64::from(logits[order[0]]);
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((f64::from(logits[i]) - max) / sampling.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(min_p) = sampling.min_p {
        // probs[0] is the most likely token's; probabilities fall along `order`.
        let keep = probs.iter().take_while(|&&p| p >= min_p * probs[0]).count();
        probs.truncate(keep.max(1));
        order.truncate(keep.max(1));
    }
    if let Some(top_p) = sampling.top_p {
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                mass += p;
                mass >= top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (p, &i) in probs.iter().zip(&order) {
        u -= p;
        if u <= 0.0 {
            return i as u32;
        }
    }
    order[order.len() - 1] as u32
}

/// Applies a repetition penalty to the logits of every token in `seen` (each once):
/// transformers' rule, a positive logit divided by `penalty`, a negative one multiplied.
pub fn penalize_repeats<'a>(logits: &mut [f32], seen: impl Iterator<Item = &'a u32>, penalty: f64) {
    let mut done = std::collections::HashSet::new();
    for &t in seen {
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if done.insert(t) {
            let p = penalty as f32;
            *l = if *l > 0.0 { *l / p } else { *l * p };
        }
    }
}

/// Checks that a model can take `prompt`: not empty, within its context, and every token id
/// inside its vocabulary (an id past it would index outside the embedding).
pub fn check_prompt(config: &ModelConfig, prompt: &[u32]) -> Result<()> {
    if prompt.is_empty() {
        return Err(ModelError::Generation("the prompt is empty".into()));
    }
    if prompt.len() > config.max_seq_len {
        return Err(ModelError::Generation(format!(
            "the prompt has {} tokens but the model's context is {}",
            prompt.len(),
            config.max_seq_len
        )));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(ModelError::Generation(format!(
            "prompt token {bad} is outside the vocabulary of {}",
            config.vocab_size
        )));
    }
    Ok(())
}

/// Continues `prompt` by up to `max_new_tokens` tokens, stopping early at any of the `eos` ids
/// (kept as the last new token) or at the model's context length. Returns the new tokens only.
pub fn generate(
    model: &MoeLm,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &Sampling,
    eos: &[u32],
) -> Result<Vec<u32>> {
    generate_streaming(model, prompt, max_new_tokens, sampling, eos, |_| true)
}

/// [`generate`], handing each new token to `on_token` as soon as it is sampled; generation
/// stops after a token for which `on_token` returns false (a stop string, a closed output).
pub fn generate_streaming(
    model: &MoeLm,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &Sampling,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    let prompts = [prompt.to_vec()];
    let mut out = generate_batch(model, &prompts, max_new_tokens, sampling, eos, |_, t| {
        on_token(t)
    })?;
    Ok(out.remove(0))
}

/// Continues several prompts at once, each as [`generate`] would on its own (its own sampler
/// seeded with `sampling.seed`, its own stop and context limit); `on_token(i, token)` gets each
/// new token of prompt `i` as it is sampled and stops that prompt by returning false. Returns
/// each prompt's new tokens, in order.
///
/// The prompts run as one batch, aligned on the right with padding on the left that no token
/// attends to; each row's positions count from its first real token. A row that ends leaves the
/// batch (its cache rows are dropped). Each step runs only the new tokens through the blocks (the
/// KV cache, allocated once, holds the rest), the output head only at the last position, and
/// no losses or routing statistics.
pub fn generate_batch(
    model: &MoeLm,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    sampling: &Sampling,
    eos: &[u32],
    mut on_token: impl FnMut(usize, u32) -> bool,
) -> Result<Vec<Vec<u32>>> {
    sampling.validate()?;
    let config = &model.config;
    for p in prompts {
        check_prompt(config, p)?;
    }
    let device = model.embed.weight.val().device();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let budgets: Vec<usize> = prompts
        .iter()
        .map(|p| max_new_tokens.min(config.max_seq_len - p.len()))
        .collect();
    let steps = budgets.iter().copied().max().unwrap_or(0);
    let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut cache = model.new_cache(pads.clone(), longest + steps);
    let mut rngs: Vec<StdRng> = prompts
        .iter()
        .map(|_| StdRng::seed_from_u64(sampling.seed))
        .collect();
    let mut outs: Vec<Vec<u32>> = budgets.iter().map(|&b| Vec::with_capacity(b)).collect();
    // Rows of the batch, as prompt indices; the first step runs the padded prompts.
    let mut active: Vec<usize> = (0..prompts.len()).filter(|&i| budgets[i] > 0).collect();
    if active.len() < prompts.len() {
        cache.retain_rows(&active);
    }
    let mut next: Vec<Vec<u32>> = active
        .iter()
        .map(|&i| [vec![0; pads[i]], prompts[i].clone()].concat())
        .collect();
    while !active.is_empty() {
        let logits = step_logits(model, &next, &mut cache, &device);
        let vocab = config.vocab_size;
        let mut keep = Vec::with_capacity(active.len());
        for (row, &i) in active.iter().enumerate() {
            let mut last = logits[row * vocab..(row + 1) * vocab].to_vec();
            if let Some(penalty) = sampling.repetition_penalty {
                penalize_repeats(&mut last, prompts[i].iter().chain(&outs[i]), penalty);
            }
            let token = sample(&last, sampling, &mut rngs[i])?;
            outs[i].push(token);
            let more = on_token(i, token) && !eos.contains(&token) && outs[i].len() < budgets[i];
            if more {
                keep.push(row);
            }
        }
        if keep.len() < active.len() {
            cache.retain_rows(&keep);
        }
        active = keep.iter().map(|&row| active[row]).collect();
        next = active
            .iter()
            .map(|&i| vec![outs[i][outs[i].len() - 1]])
            .collect();
    }
    Ok(outs)
}

/// One forward pass of equal-length rows of tokens after the cached ones: the next-token logits
/// of each row's last position, read back as `[rows * vocab]`.
fn step_logits(model: &MoeLm, rows: &[Vec<u32>], cache: &mut KvCache, device: &Device) -> Vec<f32> {
    let (b, s) = (rows.len(), rows[0].len());
    let ids: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
    let tokens = Tensor::<1, Int>::from_ints(ids.as_slice(), device).reshape([b, s]);
    model
        .forward_last(tokens, cache) // [b, vocab]
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("float logits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(
            sample(&[0.1, 3.0, -1.0, 2.9], &Sampling::greedy(), &mut rng).unwrap(),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits = [0.0, 5.0, 4.9, -3.0];
        let mut rng = StdRng::seed_from_u64(7);
        let top1 = Sampling {
            temperature: 1.0,
            top_k: Some(1),
            top_p: None,
            seed: 7,
            ..Sampling::greedy()
        };
        for _ in 0..50 {
            assert_eq!(sample(&logits, &top1, &mut rng).unwrap(), 1);
        }
        // Tokens 1 and 2 carry almost all the mass; p = 0.9 never reaches 0 or 3.
        let nucleus = Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.9),
            seed: 7,
            ..Sampling::greedy()
        };
        let picks: Vec<u32> = (0..200)
            .map(|_| sample(&logits, &nucleus, &mut rng).unwrap())
            .collect();
        assert!(picks.iter().all(|t| *t == 1 || *t == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Sampling {
            temperature: 0.8,
            top_k: Some(10),
            top_p: Some(0.95),
            seed: 3,
            ..Sampling::greedy()
        };
        let draw = || {
            let mut rng = StdRng::seed_from_u64(s.seed);
            (0..20)
                .map(|_| sample(&logits, &s, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(), draw());
    }

    /// A NaN logit used to be skipped over silently (the last token came out).
    #[test]
    fn nan_logits_are_an_error() {
        let mut rng = StdRng::seed_from_u64(0);
        let warm = Sampling {
            temperature: 1.0,
            ..Sampling::greedy()
        };
        for s in [Sampling::greedy(), warm] {
            let err = sample(&[0.5, f32::NAN, 1.0], &s, &mut rng).unwrap_err();
            assert!(err.to_string().contains("NaN logit"), "{err}");
            let all_inf = sample(&[f32::NEG_INFINITY; 3], &s, &mut rng).unwrap_err();
            assert!(all_inf.to_string().contains("no finite logit"), "{all_inf}");
        }
    }

    #[test]
    fn a_prompt_must_fit_the_context_and_the_vocabulary() {
        let config = ModelConfig::new().with_vocab_size(10).with_max_seq_len(3);
        assert!(check_prompt(&config, &[0, 9]).is_ok());
        for (prompt, problem) in [
            (&[][..], "the prompt is empty"),
            (
                &[1, 2, 3, 4][..],
                "the prompt has 4 tokens but the model's context is 3",
            ),
            (
                &[1, 10][..],
                "prompt token 10 is outside the vocabulary of 10",
            ),
        ] {
            let err = check_prompt(&config, prompt).unwrap_err().to_string();
            assert_eq!(err, problem);
        }
    }

    /// min-p keeps the tokens within a share of the best one; the repetition penalty follows
    /// transformers' rule, once per token.
    #[test]
    fn min_p_and_repetition_penalty() {
        let logits = [0.0, 5.0, 4.9, 2.0];
        let s = Sampling {
            temperature: 1.0,
            min_p: Some(0.5),
            ..Sampling::greedy()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let picks: Vec<u32> = (0..200)
            .map(|_| sample(&logits, &s, &mut rng).unwrap())
            .collect();
        assert!(
            picks.iter().all(|t| *t == 1 || *t == 2),
            "token 3 is below 0.5 x the best"
        );
        let mut penalized = [2.0, -2.0, 1.0];
        penalize_repeats(&mut penalized, [0u32, 1, 0, 7].iter(), 2.0);
        assert_eq!(penalized, [1.0, -4.0, 1.0]);
    }

    /// Partial selection for top-k picks what a full sort would, ties included.
    #[test]
    fn top_k_by_partial_selection_matches_a_full_sort() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 11) as f32).collect();
        for k in [1, 3, 7, 20, 64, 100] {
            let s = Sampling {
                temperature: 0.7,
                top_k: Some(k),
                seed: 9,
                ..Sampling::greedy()
            };
            let mut full: Vec<usize> = (0..logits.len()).collect();
            full.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            full.truncate(k);
            let mut rng = StdRng::seed_from_u64(9);
            for _ in 0..50 {
                let t = sample(&logits, &s, &mut rng).unwrap() as usize;
                assert!(full.contains(&t), "k {k}: {t} is outside the top-k");
            }
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        for s in [
            Sampling {
                temperature: -1.0,
                ..Sampling::greedy()
            },
            Sampling {
                top_k: Some(0),
                ..Sampling::greedy()
            },
            Sampling {
                top_p: Some(0.0),
                ..Sampling::greedy()
            },
            Sampling {
                top_p: Some(1.5),
                ..Sampling::greedy()
            },
            Sampling {
                min_p: Some(1.5),
                ..Sampling::greedy()
            },
            Sampling {
                repetition_penalty: Some(0.0),
                ..Sampling::greedy()
            },
        ] {
            assert!(s.validate().is_err());
        }
    }
}
