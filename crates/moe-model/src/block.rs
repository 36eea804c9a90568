//! A pre-norm transformer block: `x + attn(norm(x))`, then `x + ffn(norm(x))`.

use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;
use moe_core::{AuxLosses, MoeLayer, RoutingStats, SwiGluFfn, SwiGluFfnConfig};

use crate::attention::{Attention, LayerCache};
use crate::config::ModelConfig;

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
}

impl Block {
    /// Builds block `layer` of a model.
    pub fn new(config: &ModelConfig, layer: usize, device: &Device) -> Self {
        let norm = || {
            RmsNormConfig::new(config.d_model)
                .with_epsilon(config.rms_eps)
                .init(device)
        };
        let ffn = if config.is_moe(layer) {
            Ffn::Moe(config.moe.init(device))
        } else {
            Ffn::Dense(SwiGluFfnConfig::new(config.d_model, config.d_ff).init(device))
        };
        Self {
            attn_norm: norm(),
            attn: Attention::new(
                config.d_model,
                config.n_heads,
                config.n_kv_heads,
                config.head_dim(),
                device,
            ),
            ffn_norm: norm(),
            ffn,
        }
    }

    /// x: `[batch, seq, d_model]`; mask: `[batch, start + seq]` (true for real tokens).
    /// Returns the output `[batch, seq, d_model]`, the extended cache and, for an MoE block,
    /// its losses and statistics.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        cache: Option<LayerCache>,
        mask: Option<Tensor<2, Bool>>,
    ) -> (Tensor<3>, LayerCache, Option<MoeReport>) {
        let (attn, cache) = self.attn.forward(
            self.attn_norm.forward(x.clone()),
            cos,
            sin,
            cache,
            mask.clone(),
        );
        let x = x + attn;
        let h = self.ffn_norm.forward(x.clone());
        match &self.ffn {
            Ffn::Dense(ffn) => (x + ffn.forward(h), cache, None),
            Ffn::Moe(moe) => {
                let [b, s, _] = h.dims();
                // The FFN sees only the new positions: the last `s` columns of the mask.
                let token_mask = mask.map(|m| {
                    let total = m.dims()[1];
                    m.slice([0..b, total - s..total])
                });
                let out = moe.forward(h, token_mask);
                let report = MoeReport {
                    aux: out.aux,
                    stats: out.stats,
                };
                (x + out.output, cache, Some(report))
            }
        }
    }
}
