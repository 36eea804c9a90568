//! Mixtral: softmax over all experts, top-k, renormalised; SwiGLU experts.
//!
//! Two key layouts: the original per-expert `block_sparse_moe.experts.N.w1/w3/w2` (gate, up,
//! down) with the router `block_sparse_moe.gate`, and transformers 5's fused
//! `mlp.experts.gate_up_proj` `[E, 2F, D]` / `mlp.experts.down_proj` `[E, D, F]` with the router
//! `mlp.gate`.

use moe_core::{MoeLayerConfig, RouterConfig};

use super::{ExpertLayout, Family, HfConfig, HfTensors, moe_of};
use crate::block::Block;
use crate::config::ModelConfig;
use crate::error::Result;

/// Mixtral-style routed experts (also Granite-MoE's): softmax top-k renormalised, `E` experts
/// of width `d_ff` from `num_local_experts` (or `num_experts`).
pub(super) fn mixtral_moe_layer(
    hf: &HfConfig,
    d_model: usize,
    d_ff: usize,
) -> Result<MoeLayerConfig> {
    let router = RouterConfig::mixtral().with_top_k(hf.int("num_experts_per_tok")?);
    Ok(MoeLayerConfig::new(
        d_model,
        d_ff,
        hf.int_of(&["num_local_experts", "num_experts"])?,
    )
    .with_router(router))
}

pub(super) struct Mixtral;

impl Family for Mixtral {
    fn config(&self, hf: &HfConfig) -> Result<ModelConfig> {
        let base = hf.base(1e6, 1e-5)?;
        let d_ff = hf.int("intermediate_size")?;
        let moe = mixtral_moe_layer(hf, base.d_model, d_ff)?;
        hf.checked(base.with_d_ff(d_ff).with_moe(moe))
    }

    fn load_moe(&self, st: &mut HfTensors, prefix: &str, block: &mut Block) -> Result<()> {
        let legacy = format!("{prefix}.block_sparse_moe");
        if st.has(&format!("{legacy}.gate.weight")) {
            let layout = ExpertLayout::PerExpert {
                gate: "w1",
                up: "w3",
                down: "w2",
            };
            let experts = format!("{legacy}.experts");
            st.load_moe(&format!("{legacy}.gate"), &experts, layout, moe_of(block))
        } else {
            let m = format!("{prefix}.mlp");
            let layout = ExpertLayout::Stacked {
                gate_up: "gate_up_proj",
                down: "down_proj",
            };
            st.load_moe(
                &format!("{m}.gate"),
                &format!("{m}.experts"),
                layout,
                moe_of(block),
            )
        }
    }
}
