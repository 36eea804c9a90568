//! A pre-norm transformer block: `x + attn(norm(x))`, then `x + ffn(norm(x))`.

use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use moe_core::kernels::rms_norm;
use moe_core::{AuxLosses, MoeLayer, RoutingStats, SwiGluFfn, SwiGluFfnConfig};

use crate::attention::{Attention, Positions};
use crate::config::ModelConfig;
use crate::kv_cache::LayerCache;

/// The feed-forward half of a block.
// One per block, built once: the size gap between the variants costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Ffn {
    /// A dense SwiGLU.
    Dense(SwiGluFfn),
    /// A Mixture-of-Experts layer.
    Moe(MoeLayer),
}

/// What an MoE block reports besides its output.
#[derive(Debug, Clone)]
pub struct MoeReport {
    /// Unweighted auxiliary losses.
    pub aux: AuxLosses,
    /// Routing statistics.
    pub stats: RoutingStats,
}

/// A dense expert beside the routed ones, optionally gated per token (Qwen2-MoE's shared
/// expert): `sigmoid(x w_gate) * ffn(x)`.
#[derive(Module, Debug)]
pub struct SharedExpert {
    /// The expert.
    pub ffn: SwiGluFfn,
    /// Gate `[d_model, 1]`.
    pub gate: Option<Linear>,
}

impl SharedExpert {
    /// x: `[batch, seq, d_model]` -> `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match &self.gate {
            Some(gate) => self.ffn.forward(x.clone()) * sigmoid(gate.forward(x)),
            None => self.ffn.forward(x),
        }
    }
}

/// One transformer block.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention.
    pub attn_norm: RmsNorm,
    /// Self-attention.
    pub attn: Attention,
    /// Norm before the feed-forward block.
    pub ffn_norm: RmsNorm,
    /// Dense or MoE feed-forward block.
    pub ffn: Ffn,
    /// A shared expert added to an MoE block's output.
    pub shared_expert: Option<SharedExpert>,
    /// Factor on the attention and feed-forward outputs before they join the residual stream.
    #[module(skip)]
    pub residual_multiplier: Option<f64>,
}

impl Block {
    /// Builds block `layer` of a model.
    pub fn new(config: &ModelConfig, layer: usize, device: &Device) -> Self {
        let norm = || {
            RmsNormConfig::new(config.d_model)
                .with_epsilon(config.rms_eps)
                .init(device)
        };
        let moe = config.is_moe(layer);
        let ffn = if moe {
            Ffn::Moe(config.moe.init(device))
        } else {
            Ffn::Dense(SwiGluFfnConfig::new(config.d_model, config.d_ff).init(device))
        };
        let shared_expert = config
            .shared_expert
            .as_ref()
            .filter(|_| moe)
            .map(|s| SharedExpert {
                ffn: SwiGluFfnConfig::new(config.d_model, s.d_ff).init(device),
                gate: s.gated.then(|| {
                    LinearConfig::new(config.d_model, 1)
                        .with_bias(false)
                        .init(device)
                }),
            });
        Self {
            attn_norm: norm(),
            attn: Attention::new(config, device),
            ffn_norm: norm(),
            ffn,
            shared_expert,
            residual_multiplier: config.residual_multiplier,
        }
    }

    /// A branch's output as it joins the residual stream.
    fn scaled(&self, t: Tensor<3>) -> Tensor<3> {
        match self.residual_multiplier {
            Some(m) => t.mul_scalar(m),
            None => t,
        }
    }

    /// Router look-ahead for a paged MoE block whose expert source reads ahead: applies this
    /// block's router to `x`, the input of the block before it (a guess at this block's input),
    /// and hints the experts it picks to the source, which reads them while the block before
    /// computes. Does nothing for other blocks.
    ///
    /// x: `[batch, seq, d_model]`
    pub fn look_ahead(&self, x: &Tensor<3>) {
        let Ffn::Moe(moe) = &self.ffn else {
            return;
        };
        let Some(source) = moe.experts.source.as_ref().filter(|s| s.prefetches()) else {
            return;
        };
        let [b, s, d] = x.dims();
        let h = rms_norm(&self.ffn_norm, x.clone()).reshape([b * s, d]);
        let routing = moe.router.forward(h);
        let moe_core::Assignment::TokenChoice { experts, .. } = routing.assignment else {
            return;
        };
        let mut picked: Vec<usize> = experts
            .into_data()
            .iter::<i64>()
            .map(|e| e as usize)
            .collect();
        picked.sort_unstable();
        picked.dedup();
        source.prefetch(&picked, &x.device());
    }

    /// Runs the block over the new tokens at `at`, writing their keys and values into `cache`
    /// when there is one. With `report`, an MoE block also returns its losses and statistics;
    /// without, it computes only its output (inference).
    ///
    /// x: `[batch, seq, d_model]` -> `[batch, seq, d_model]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        at: &Positions,
        cache: Option<&mut Option<LayerCache>>,
        report: bool,
    ) -> (Tensor<3>, Option<MoeReport>) {
        let x = self.attend(x, at, cache);
        self.feed(x, at, report)
    }

    /// The attention half: `x + attn(norm(x))`.
    ///
    /// x: `[batch, seq, d_model]` -> `[batch, seq, d_model]`
    pub fn attend(
        &self,
        x: Tensor<3>,
        at: &Positions,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Tensor<3> {
        let attn = self
            .attn
            .forward(rms_norm(&self.attn_norm, x.clone()), at, cache);
        x + self.scaled(attn)
    }

    /// The feed-forward half: `x + ffn(norm(x))`, with an MoE block's report when asked.
    ///
    /// x: `[batch, seq, d_model]` -> `[batch, seq, d_model]`
    pub fn feed(
        &self,
        x: Tensor<3>,
        at: &Positions,
        report: bool,
    ) -> (Tensor<3>, Option<MoeReport>) {
        let h = rms_norm(&self.ffn_norm, x.clone());
        let (y, report) = match &self.ffn {
            Ffn::Dense(ffn) => (ffn.forward(h.clone()), None),
            Ffn::Moe(moe) => {
                let [b, s, _] = h.dims();
                // The FFN sees only the new positions: the last `s` columns of the mask.
                let token_mask = at.key_mask.clone().map(|m| {
                    let total = m.dims()[1];
                    m.slice([0..b, total - s..total])
                });
                if report {
                    let out = moe.forward(h.clone(), token_mask);
                    let report = MoeReport {
                        aux: out.aux,
                        stats: out.stats,
                    };
                    (out.output, Some(report))
                } else {
                    (moe.infer(h.clone(), token_mask), None)
                }
            }
        };
        // Only MoE blocks have a shared expert.
        let y = match &self.shared_expert {
            Some(shared) => y + shared.forward(h),
            None => y,
        };
        (x + self.scaled(y), report)
    }
}
