//! OLMoE: RMSNorm on queries and keys over the whole projection width (before the heads are
//! split), softmax routing whose top-k weights are renormalised only with `norm_topk_prob`
//! (default off), SwiGLU experts `mlp.experts.N.{gate,up,down}_proj` or fused.

use moe_core::{MoeLayerConfig, RouterConfig};

use super::{Family, HfConfig, HfTensors, load_qwen_style_moe};
use crate::block::Block;
use crate::config::{ModelConfig, QkNorm};
use crate::error::Result;

pub(super) struct Olmoe;

impl Family for Olmoe {
    fn config(&self, hf: &HfConfig) -> Result<ModelConfig> {
        let base = hf.base(1e4, 1e-5)?;
        let d_ff = hf.int("intermediate_size")?;
        let router = RouterConfig::mixtral()
            .with_top_k(hf.int("num_experts_per_tok")?)
            .with_renormalize(hf.bool("norm_topk_prob", false)?);
        let moe = MoeLayerConfig::new(
            base.d_model,
            d_ff,
            hf.int_of(&["num_experts", "num_local_experts"])?,
        )
        .with_router(router);
        hf.checked(
            base.with_d_ff(d_ff)
                .with_moe(moe)
                .with_qk_norm(Some(QkNorm::Full)),
        )
    }

    fn load_moe(&self, st: &mut HfTensors, prefix: &str, block: &mut Block) -> Result<()> {
        load_qwen_style_moe(st, prefix, block)
    }
}
