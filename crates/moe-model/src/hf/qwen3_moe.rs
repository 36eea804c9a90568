//! Qwen3-MoE: RMSNorm on each query and key head (before RoPE), softmax routing renormalised
//! with `norm_topk_prob`, MoE layers placed by `decoder_sparse_step` and `mlp_only_layers`
//! (dense layers of width `intermediate_size`, experts of width `moe_intermediate_size`).

use moe_core::{MoeLayerConfig, RouterConfig};

use super::{Family, HfConfig, HfTensors, load_qwen_style_moe};
use crate::block::Block;
use crate::config::{ModelConfig, QkNorm};
use crate::error::Result;

/// The routed experts of the Qwen MoE families: softmax top-k, renormalised if
/// `norm_topk_prob`, experts of width `moe_intermediate_size`.
pub(super) fn qwen_moe_layer(hf: &HfConfig, d_model: usize) -> Result<MoeLayerConfig> {
    let router = RouterConfig::mixtral()
        .with_top_k(hf.int("num_experts_per_tok")?)
        .with_renormalize(hf.bool("norm_topk_prob", false)?);
    Ok(MoeLayerConfig::new(
        d_model,
        hf.int("moe_intermediate_size")?,
        hf.int_of(&["num_experts", "num_local_experts"])?,
    )
    .with_router(router))
}

pub(super) struct Qwen3Moe;

impl Family for Qwen3Moe {
    fn config(&self, hf: &HfConfig) -> Result<ModelConfig> {
        let base = hf.base(1e4, 1e-6)?;
        let moe = qwen_moe_layer(hf, base.d_model)?;
        let config = base
            .with_d_ff(hf.int("intermediate_size")?)
            .with_moe(moe)
            .with_qk_norm(Some(QkNorm::PerHead));
        hf.checked(hf.qwen_layers(config)?)
    }

    fn load_moe(&self, st: &mut HfTensors, prefix: &str, block: &mut Block) -> Result<()> {
        load_qwen_style_moe(st, prefix, block)
    }
}
