//! Whole-model accounting: total and active parameters, FLOPs per token and weight memory, per
//! layer and in total, from the configuration alone (no weights needed).

use moe_core::Accounting;
use serde::Serialize;

use crate::config::{ModelConfig, QkNorm};

/// One block's share.
#[derive(Debug, Clone, Serialize)]
pub struct LayerAccounting {
    /// Block index.
    pub layer: usize,
    /// "moe" or "dense".
    pub kind: &'static str,
    /// Attention projections and both norms.
    pub attention: Accounting,
    /// The feed-forward block.
    pub ffn: Accounting,
}

/// The model's accounting.
#[derive(Debug, Clone, Serialize)]
pub struct ModelAccounting {
    /// Per block.
    pub layers: Vec<LayerAccounting>,
    /// Embedding, final norm and output projection.
    pub embedding_and_head: Accounting,
    /// Everything.
    pub total: Accounting,
}

/// Parameters that every token uses in full (each an active matmul unless noted).
fn dense_part(matmul: usize, other: usize) -> Accounting {
    Accounting {
        total_params: matmul + other,
        active_params: matmul + other,
        expert_params: 0,
        flops_per_token: 2 * matmul,
    }
}

impl ModelConfig {
    /// Accounts for every parameter of the model this config builds.
    pub fn accounting(&self) -> ModelAccounting {
        let (d, hd) = (self.d_model, self.head_dim());
        let (q, kv) = (self.n_heads * hd, self.n_kv_heads * hd);
        let biases = if self.has_qkv_bias() { q + 2 * kv } else { 0 };
        let qk_norms = match self.qk_norm {
            None => 0,
            Some(QkNorm::PerHead) => 2 * hd,
            Some(QkNorm::Full) => q + kv,
        };
        let attention = dense_part(d * (2 * q + 2 * kv), 2 * d + biases + qk_norms);
        let shared = self
            .shared_expert
            .as_ref()
            .map_or(Accounting::default(), |s| {
                let gate = if s.gated { d } else { 0 };
                dense_part(3 * d * s.d_ff + gate, 0)
            });
        let layers: Vec<LayerAccounting> = (0..self.n_layers)
            .map(|i| {
                let moe = self.is_moe(i);
                LayerAccounting {
                    layer: i,
                    kind: if moe { "moe" } else { "dense" },
                    attention,
                    ffn: if moe {
                        self.moe.accounting() + shared
                    } else {
                        dense_part(3 * d * self.d_ff, 0)
                    },
                }
            })
            .collect();
        // The embedding is a lookup (no FLOPs); the output projection is a matmul, tied or not.
        let head = d * self.vocab_size;
        let embedding_and_head = Accounting {
            total_params: head + d + if self.tie_embeddings { 0 } else { head },
            active_params: head + d + if self.tie_embeddings { 0 } else { head },
            expert_params: 0,
            flops_per_token: 2 * head,
        };
        let total = layers
            .iter()
            .map(|l| l.attention + l.ffn)
            .sum::<Accounting>()
            + embedding_and_head;
        ModelAccounting {
            layers,
            embedding_and_head,
            total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SharedExpertConfig;
    use burn::module::Module;
    use moe_core::{MoeLayerConfig, RouterConfig};

    #[test]
    fn accounting_counts_every_parameter_of_the_module() {
        let device = burn::tensor::Device::flex();
        for config in [
            ModelConfig::new(),
            ModelConfig::new()
                .with_tie_embeddings(false)
                .with_ffn_plan(crate::FfnPlan::EveryNth { n: 2 }),
            ModelConfig::new().dense_equivalent(),
            ModelConfig::new().with_moe(
                MoeLayerConfig::new(128, 64, 16)
                    .with_n_shared_experts(1)
                    .with_router(RouterConfig::deepseek_v3(4)),
            ),
            ModelConfig::new()
                .with_qkv_bias(Some(true))
                .with_qk_norm(Some(QkNorm::Full))
                .with_dense_layers(Some(vec![0]))
                .with_shared_expert(Some(SharedExpertConfig::new(96))),
            ModelConfig::new()
                .with_qk_norm(Some(QkNorm::PerHead))
                .with_shared_expert(Some(SharedExpertConfig::new(96).with_gated(false))),
        ] {
            let model = config.init(&device).unwrap();
            assert_eq!(config.accounting().total.total_params, model.num_params());
        }
    }

    #[test]
    fn mixtral_8x7b_shape_matches_its_published_size() {
        let config = ModelConfig::new()
            .with_vocab_size(32000)
            .with_d_model(4096)
            .with_n_layers(32)
            .with_n_heads(32)
            .with_n_kv_heads(8)
            .with_tie_embeddings(false)
            .with_d_ff(14336)
            .with_moe(MoeLayerConfig::new(4096, 14336, 8));
        let acc = config.accounting().total;
        // Published: 46.7B total, 12.9B active.
        assert!(
            (acc.total_params as f64 / 1e9 - 46.70).abs() < 0.01,
            "{}",
            acc.total_params
        );
        assert!(
            (acc.active_params as f64 / 1e9 - 12.88).abs() < 0.01,
            "{}",
            acc.active_params
        );
    }
}
