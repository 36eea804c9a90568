//! DeepSeek-V3: refused. Its sigmoid routing with a selection bias, routed scaling and dense
//! first layers map onto our router, but its attention is multi-head latent attention (MLA:
//! low-rank q and kv projections with a decoupled RoPE key), which the model does not have.

use super::{Block, Family, HfConfig, HfTensors};
use crate::config::ModelConfig;
use crate::error::Result;

pub(super) struct DeepseekV3;

impl Family for DeepseekV3 {
    fn config(&self, hf: &HfConfig) -> Result<ModelConfig> {
        Err(hf.error(
            "model_type 'deepseek_v3' needs multi-head latent attention (MLA: kv_lora_rank, \
             q_lora_rank, qk_rope_head_dim), which is not implemented",
        ))
    }

    fn load_moe(&self, _: &mut HfTensors, _: &str, _: &mut Block) -> Result<()> {
        unreachable!("a DeepSeek-V3 config is refused before any weight is read")
    }
}
