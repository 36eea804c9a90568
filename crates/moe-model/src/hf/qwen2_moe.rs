//! Qwen2-MoE: biases on the query, key and value projections; softmax routing renormalised with
//! `norm_topk_prob`; a shared expert of width `shared_expert_intermediate_size` beside the
//! routed ones, scaled per token by `sigmoid(shared_expert_gate(x))`; MoE layers placed by
//! `decoder_sparse_step` and `mlp_only_layers`.

use super::qwen3_moe::qwen_moe_layer;
use super::{Family, HfConfig, HfTensors, load_qwen_style_moe};
use crate::block::Block;
use crate::config::{ModelConfig, SharedExpertConfig};
use crate::error::{ModelError, Result};

pub(super) struct Qwen2Moe;

impl Family for Qwen2Moe {
    fn config(&self, hf: &HfConfig) -> Result<ModelConfig> {
        let base = hf.base(1e4, 1e-6)?;
        let moe = qwen_moe_layer(hf, base.d_model)?;
        let shared = hf.int("shared_expert_intermediate_size")?;
        let config = base
            .with_d_ff(hf.int("intermediate_size")?)
            .with_moe(moe)
            .with_qkv_bias(Some(hf.bool("qkv_bias", true)?))
            .with_shared_expert((shared > 0).then(|| SharedExpertConfig::new(shared)));
        hf.checked(hf.qwen_layers(config)?)
    }

    fn load_moe(&self, st: &mut HfTensors, prefix: &str, block: &mut Block) -> Result<()> {
        load_qwen_style_moe(st, prefix, block)?;
        let m = format!("{prefix}.mlp");
        if let Some(shared) = &mut block.shared_expert {
            st.load_swiglu(&format!("{m}.shared_expert"), &mut shared.ffn)?;
            let gate = shared
                .gate
                .as_mut()
                .ok_or_else(|| ModelError::Config("a Qwen2-MoE shared expert is gated".into()))?;
            st.load_linear(&format!("{m}.shared_expert_gate"), gate)?;
        }
        Ok(())
    }
}
