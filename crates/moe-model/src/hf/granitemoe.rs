//! Granite-MoE: the token embeddings times `embedding_multiplier`, each block's attention and
//! feed-forward outputs times `residual_multiplier` before they join the residual stream,
//! attention scores scaled by `attention_multiplier` (instead of `1/sqrt(head_dim)`), logits
//! divided by `logits_scaling`. Routing: softmax over the top-k logits, which is the softmax
//! over all experts renormalised over the top k. Experts stacked: `input_linear` `[E, 2F, D]`
//! (gate rows first), `output_linear` `[E, D, F]`, router `router.layer`.

use super::mixtral::mixtral_moe_layer;
use super::{ExpertLayout, Family, HfConfig, HfTensors, moe_of};
use crate::block::Block;
use crate::config::ModelConfig;
use crate::error::Result;

pub(super) struct GraniteMoe;

impl Family for GraniteMoe {
    fn config(&self, hf: &HfConfig) -> Result<ModelConfig> {
        let base = hf.base(1e4, 1e-6)?;
        let d_ff = hf.int("intermediate_size")?;
        let moe = mixtral_moe_layer(hf, base.d_model, d_ff)?;
        let logits_scaling = hf.float("logits_scaling", 1.0)?;
        let config = base
            .with_d_ff(d_ff)
            .with_moe(moe)
            .with_embed_multiplier(Some(hf.float("embedding_multiplier", 1.0)?))
            .with_residual_multiplier(Some(hf.float("residual_multiplier", 1.0)?))
            .with_attn_scale(Some(hf.float("attention_multiplier", 1.0)?))
            .with_logits_multiplier(Some(1.0 / logits_scaling));
        hf.checked(config)
    }

    fn load_moe(&self, st: &mut HfTensors, prefix: &str, block: &mut Block) -> Result<()> {
        let m = format!("{prefix}.block_sparse_moe");
        let layout = ExpertLayout::Stacked {
            gate_up: "input_linear.weight",
            down: "output_linear.weight",
        };
        st.load_moe(&format!("{m}.router.layer"), &m, layout, moe_of(block))
    }
}
