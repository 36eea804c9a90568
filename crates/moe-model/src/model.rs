//! The decoder-only MoE language model.

use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
};
use std::sync::Mutex;

use burn::module::{ModuleVisitor, Param};
use burn::prelude::*;
use moe_core::kernels::{linear_on_cores, matmul, rms_norm};
use moe_core::{AuxLosses, MoeLayerConfig, Router, RoutingStats};

use crate::attention::Positions;
use crate::block::{Block, Ffn, MoeReport};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, KvDtype};
use crate::rope::{Rope, RopeTable};

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// Next-token logits `[batch, seq, vocab]`.
    pub logits: Tensor<3>,
    /// Auxiliary losses summed over MoE layers (`None` for a dense model).
    pub aux: Option<AuxLosses>,
    /// Routing statistics of each MoE layer, as (layer index, statistics).
    pub routing: Vec<(usize, RoutingStats)>,
}

/// A decoder-only transformer with dense or MoE feed-forward blocks.
#[derive(Module, Debug)]
pub struct MoeLm {
    /// Token embedding `[vocab, d_model]`.
    pub embed: Embedding,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output projection `[d_model, vocab]`; `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    /// The configuration this model was built from.
    #[module(skip)]
    pub config: ModelConfig,
    /// How [`generate`](crate::generate) caches keys and values (f32 unless
    /// [`with_kv_cache`](Self::with_kv_cache) says otherwise).
    #[module(skip)]
    pub kv_cache: KvDtype,
}

/// Touches every parameter, which draws the lazily initialised ones.
struct DrawParams;

impl ModuleVisitor for DrawParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

/// Held while seeding a device and drawing initial weights: Burn's random generators are shared
/// per backend, so without it two models initialised at once (parallel branches, tests) would
/// interleave their draws and neither seed would be reproducible.
static SEEDED_INIT: Mutex<()> = Mutex::new(());

/// Seeds `device`'s random generator under the lock that seeded initialisation holds, so a
/// concurrent [`ModelConfig::init_seeded`] (another branch, another test) stays reproducible.
pub fn seed_device(device: &Device, seed: u64) {
    let _guard = lock_generators();
    device.seed(seed);
}

/// Holds [`SEEDED_INIT`]; a panic elsewhere while it was held leaves nothing to repair.
fn lock_generators() -> std::sync::MutexGuard<'static, ()> {
    SEEDED_INIT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Builds a module with weights drawn reproducibly from `seed` on `device`.
pub(crate) fn init_seeded<M: Module>(
    device: &Device,
    seed: u64,
    init: impl FnOnce() -> Result<M>,
) -> Result<M> {
    init_drawn(device, Some(seed), init)
}

/// Builds a module and draws all its weights under the generator lock, after seeding the
/// generator when a seed is given. Unseeded builds take the lock too, so that their draws never
/// land between another thread's seeding and its draws.
fn init_drawn<M: Module>(
    device: &Device,
    seed: Option<u64>,
    init: impl FnOnce() -> Result<M>,
) -> Result<M> {
    let _guard = lock_generators();
    if let Some(seed) = seed {
        device.seed(seed);
    }
    let module = init()?;
    // Parameters initialise lazily, on first use; draw them all now, under the lock, and wait
    // for the draws to run: asynchronous backends (wgpu) read the generator's state when the
    // kernels execute, and another thread may reseed it as soon as the lock is released.
    module.visit(&mut DrawParams);
    device
        .sync()
        .map_err(|e| ModelError::Config(format!("device failed while initialising: {e:?}")))?;
    Ok(module)
}

/// `count` routers of the `moe` layer config, drawn reproducibly from `seed`.
pub(crate) fn seeded_routers(
    moe: &MoeLayerConfig,
    count: usize,
    device: &Device,
    seed: u64,
) -> Result<Vec<Router>> {
    init_seeded(device, seed, || {
        Ok((0..count)
            .map(|_| moe.router.init(moe.d_model, moe.n_experts, device))
            .collect())
    })
}

impl ModelConfig {
    /// Builds the model with weights drawn reproducibly from `seed`.
    pub fn init_seeded(&self, device: &Device, seed: u64) -> Result<MoeLm> {
        init_seeded(device, seed, || self.build(device))
    }

    /// Builds the model after validating the configuration, with weights drawn from the device's
    /// generator as it stands.
    pub fn init(&self, device: &Device) -> Result<MoeLm> {
        init_drawn(device, None, || self.build(device))
    }

    /// Builds the model after validating the configuration, with every parameter left lazy:
    /// nothing is drawn or allocated until a parameter is set or first used. Loaders
    /// ([`checkpoint::load`](crate::checkpoint::load), [`hf::import`](crate::hf::import)) fill
    /// it straight from the stored tensors; [`unset_params`](crate::weights::unset_params)
    /// names what they missed.
    pub fn skeleton(&self, device: &Device) -> Result<MoeLm> {
        self.build(device)
    }

    fn build(&self, device: &Device) -> Result<MoeLm> {
        self.validate()?;
        let embed = EmbeddingConfig::new(self.vocab_size, self.d_model)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            })
            .init(device);
        Ok(MoeLm {
            embed,
            blocks: (0..self.n_layers)
                .map(|i| Block::new(self, i, device))
                .collect(),
            norm: RmsNormConfig::new(self.d_model)
                .with_epsilon(self.rms_eps)
                .init(device),
            lm_head: (!self.tie_embeddings).then(|| {
                LinearConfig::new(self.d_model, self.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
            config: self.clone(),
            kv_cache: KvDtype::F32,
        })
    }
}

impl MoeLm {
    /// The same model with every MoE layer's router replaced by a freshly initialised one (the
    /// router preset's own initialisation, drawn from `seed`): for merged models, and as the
    /// random-router control of a trained model's routing.
    pub fn with_fresh_routers(mut self, seed: u64) -> Result<Self> {
        let count = self
            .blocks
            .iter()
            .filter(|b| matches!(b.ffn, Ffn::Moe(_)))
            .count();
        let device = self.embed.weight.val().device();
        let routers = seeded_routers(&self.config.moe, count, &device, seed)?;
        let layers = self.blocks.iter_mut().filter_map(|b| match &mut b.ffn {
            Ffn::Moe(layer) => Some(layer),
            Ffn::Dense(_) => None,
        });
        for (layer, router) in layers.zip(routers) {
            layer.router = router;
        }
        Ok(self)
    }

    /// The same model, generating with its keys and values cached as `kv_cache`.
    pub fn with_kv_cache(self, kv_cache: KvDtype) -> Self {
        Self { kv_cache, ..self }
    }

    /// An empty cache for prompts of `positions` positions at most, row `r` starting with
    /// `pads[r]` padding columns (no padding when `pads` is empty), storing keys and values as
    /// [`kv_cache`](Self::kv_cache) says.
    pub fn new_cache(&self, pads: Vec<usize>, positions: usize) -> KvCache {
        KvCache::left_padded(pads, positions).with_dtype(self.kv_cache)
    }

    /// The same model laid out for inference on its device: every MoE layer as
    /// [`moe_core::MoeLayer::for_inference`] gives it (large routed experts `[out, in]` on a
    /// host CPU backend, which speeds up batched decoding; nothing changes elsewhere). The
    /// outputs are the same up to float rounding, and the model still saves as before. Do not
    /// train it.
    pub fn for_inference(mut self) -> Self {
        for block in &mut self.blocks {
            if let Ffn::Moe(layer) = &mut block.ffn {
                *layer = layer.clone().for_inference();
            }
        }
        self
    }

    /// Full forward pass.
    ///
    /// tokens: `[batch, seq]`; mask: `[batch, seq]`, true for real tokens (padding neither
    /// attends nor is attended to, nor counts in the balancing losses).
    pub fn forward(&self, tokens: Tensor<2, Int>, mask: Option<Tensor<2, Bool>>) -> ModelOutput {
        let at = self.full_positions(&tokens, mask);
        let (x, aux, routing) = self.blocks(tokens, &at, None, true);
        ModelOutput {
            logits: self.head(x),
            aux,
            routing,
        }
    }

    /// The input of every block's feed-forward part (after its norm): what a router sees.
    ///
    /// tokens: `[batch, seq]` -> one `[batch, seq, d_model]` per block
    pub fn ffn_inputs(&self, tokens: Tensor<2, Int>) -> Vec<Tensor<3>> {
        let at = self.full_positions(&tokens, None);
        let mut x = self.embedded(tokens);
        let mut inputs = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let attended = block.attend(x, &at, None);
            inputs.push(rms_norm(&block.ffn_norm, attended.clone()));
            x = block.feed(attended, &at, false).0;
        }
        inputs
    }

    /// Forward pass over new tokens that continue the cached ones; extends the cache. Returns the
    /// logits of every new position with the losses and routing statistics.
    ///
    /// tokens: `[batch, seq]`; mask: `[batch, cached + seq]` covering cached and new positions
    /// (`None`: the cache's own padding, if any).
    pub fn forward_cached(
        &self,
        tokens: Tensor<2, Int>,
        mask: Option<Tensor<2, Bool>>,
        cache: &mut KvCache,
    ) -> ModelOutput {
        let at = self.positions(&tokens, mask, cache);
        let (x, aux, routing) = self.blocks(tokens, &at, Some(cache), true);
        ModelOutput {
            logits: self.head(x),
            aux,
            routing,
        }
    }

    /// The next-token logits of the last position only, for generation: the blocks run over
    /// every new token (extending the cache) without losses or statistics, the output head over
    /// the last one.
    ///
    /// tokens: `[batch, seq]` -> `[batch, vocab]`
    pub fn forward_last(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<2> {
        let at = self.positions(&tokens, None, cache);
        let (x, _, _) = self.blocks(tokens, &at, Some(cache), false);
        let [b, s, d] = x.dims();
        let logits = self.head(x.slice([0..b, s - 1..s, 0..d])); // [b, 1, vocab]
        let v = logits.dims()[2];
        logits.reshape([b, v])
    }

    /// The positions of uncached `tokens`, from 0, with their rotary angles.
    fn full_positions(&self, tokens: &Tensor<2, Int>, mask: Option<Tensor<2, Bool>>) -> Positions {
        let [_, s] = tokens.dims();
        let (cos, sin) = Rope::new(self.config.head_dim(), self.config.rope_theta).tables(
            0,
            s,
            &tokens.device(),
        );
        Positions {
            cos: cos.unsqueeze(),
            sin: sin.unsqueeze(),
            start: 0,
            key_mask: mask,
            reserve: 0,
            cache_dtype: KvDtype::F32,
            pads: None,
        }
    }

    /// The token embeddings, scaled by the embedding multiplier.
    ///
    /// tokens: `[batch, seq]` -> `[batch, seq, d_model]`
    fn embedded(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let x = self.embed.forward(tokens);
        match self.config.embed_multiplier {
            Some(m) => x.mul_scalar(m),
            None => x,
        }
    }

    /// Where `tokens` go after the cached columns: their rotary angles, read from the cache's
    /// table (each row's positions count from its first real token), and the key mask (`mask`,
    /// or the cache's padding).
    fn positions(
        &self,
        tokens: &Tensor<2, Int>,
        mask: Option<Tensor<2, Bool>>,
        cache: &mut KvCache,
    ) -> Positions {
        let [b, s] = tokens.dims();
        let start = cache.len();
        let device = tokens.device();
        let needed = start + s;
        let held = cache.rope.as_ref().map_or(0, RopeTable::len);
        if held < needed {
            // The positions the generation reserved, else twice what was held (as the cache's
            // buffers grow): a prompt pays only for the positions it can reach.
            let len = needed.max(cache.reserve()).max(2 * held);
            let rope = Rope::new(self.config.head_dim(), self.config.rope_theta);
            cache.rope = Some(RopeTable::new(&rope, len, &device));
        }
        let table = cache.rope.as_ref().expect("built above");
        let (cos, sin) = match cache.pads() {
            None => table.range(start, s),
            Some(pads) => {
                let ids: Vec<i64> = pads
                    .iter()
                    .flat_map(|&p| (start..start + s).map(move |c| c.saturating_sub(p) as i64))
                    .collect();
                let ids = Tensor::<1, Int>::from_ints(ids.as_slice(), &device).reshape([b, s]);
                table.gather(ids)
            }
        };
        let pads = match mask {
            None => cache.pads().map(<[usize]>::to_vec),
            Some(_) => None,
        };
        Positions {
            cos,
            sin,
            start,
            key_mask: mask.or_else(|| cache.key_mask(start + s, &device)),
            reserve: cache.reserve(),
            cache_dtype: cache.dtype(),
            pads,
        }
    }

    /// The blocks over the new tokens at `at`, writing into `cache` when there is one: the
    /// final hidden states `[batch, seq, d_model]`, and with `report` the summed auxiliary
    /// losses and each MoE layer's statistics.
    fn blocks(
        &self,
        tokens: Tensor<2, Int>,
        at: &Positions,
        mut cache: Option<&mut KvCache>,
        report: bool,
    ) -> (Tensor<3>, Option<AuxLosses>, Vec<(usize, RoutingStats)>) {
        let [_, s] = tokens.dims();
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(self.blocks.len(), None);
        }
        let mut x = self.embedded(tokens); // [b, s, d]
        let mut aux: Option<AuxLosses> = None;
        let mut routing = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            if let Some(next) = self.blocks.get(i + 1) {
                next.look_ahead(&x);
            }
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let (out, r) = block.forward(x, at, slot, report);
            x = out;
            if let Some(MoeReport { aux: a, stats }) = r {
                aux = Some(match aux {
                    Some(acc) => acc.merge(a),
                    None => a,
                });
                routing.push((i, stats));
            }
        }
        if let Some(c) = cache {
            c.advance(s);
        }
        (x, aux, routing)
    }

    /// Final norm, output projection and logits multiplier.
    ///
    /// x: `[batch, seq, d_model]` -> `[batch, seq, vocab]`
    fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let x = rms_norm(&self.norm, x);
        let logits = match &self.lm_head {
            Some(head) => linear_on_cores(head, x),
            None => {
                // The embedding read in place as the head's transposed operand (Burn's matmul
                // would copy it transposed first: 5-8% of a batch-1 decode step's time).
                let [b, s, d] = x.dims();
                let weight = self.embed.weight.val(); // [vocab, d_model]
                let vocab = weight.dims()[0];
                matmul(x.reshape([b * s, d]), weight.transpose()).reshape([b, s, vocab])
            }
        };
        match self.config.logits_multiplier {
            Some(m) => logits.mul_scalar(m),
            None => logits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_core::testing::test_device;

    /// A cache's rotary table covers the positions its generation reserved, not the model's
    /// whole context (computing all 2048 of them cost a 16-token prompt's prefill a fifth of
    /// its time), and doubles when decoding passes it.
    #[test]
    fn rope_tables_cover_the_reserved_positions() {
        let device = test_device("flex").expect("flex is built in");
        let model = ModelConfig::new()
            .with_vocab_size(16)
            .with_d_model(16)
            .with_n_layers(1)
            .with_n_heads(2)
            .with_n_kv_heads(1)
            .with_max_seq_len(4096)
            .with_moe(MoeLayerConfig::new(16, 8, 2))
            .init_seeded(&device, 1)
            .unwrap();
        let tokens = |n: usize| Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, n]);
        let table = |cache: &KvCache| cache.rope.as_ref().map(RopeTable::len);
        let mut reserved = model.new_cache(Vec::new(), 10);
        model.forward_last(tokens(6), &mut reserved);
        assert_eq!(table(&reserved), Some(10));
        let mut growing = KvCache::default();
        model.forward_last(tokens(6), &mut growing);
        assert_eq!(table(&growing), Some(6));
        model.forward_last(tokens(1), &mut growing);
        assert_eq!(table(&growing), Some(12));
    }
}
