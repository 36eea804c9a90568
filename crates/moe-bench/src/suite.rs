//! The cases of a `moe bench` run, in reporting order, and the MoE / dense ratios the project's
//! targets are stated in.

use burn::prelude::*;
use moe_core::{ExpertCompute, MoeLayerConfig, RouterConfig};
use moe_model::{FfnPlan, ModelConfig};

use crate::case::{BenchCase, dense_case, model_case, moe_case};
use crate::sizes::BenchSizes;

/// An MoE layer of the benchmark's width with `experts` experts of width `d_ff`.
pub(crate) fn moe_config(
    s: &BenchSizes,
    experts: usize,
    d_ff: usize,
    router: RouterConfig,
) -> MoeLayerConfig {
    MoeLayerConfig::new(s.d_model, d_ff, experts).with_router(router)
}

/// Every case of a `moe bench` run, in reporting order.
pub fn cases(s: &BenchSizes, device: &Device) -> Vec<BenchCase> {
    let dense_active = s.expert_d_ff * 2;
    let dense_total = s.fine_d_ff * s.fine_experts;
    let e8 = |router: RouterConfig| moe_config(s, s.experts, s.expert_d_ff, router);
    let e64 = moe_config(s, s.fine_experts, s.fine_d_ff, RouterConfig::mixtral());
    let model = ModelConfig::new();
    vec![
        dense_case("dense_active_fwd", s, dense_active, false, device),
        moe_case(
            "moe_top2_fwd",
            s,
            e8(RouterConfig::mixtral()),
            false,
            device,
        ),
        moe_case(
            "moe_top2_segments_fwd",
            s,
            e8(RouterConfig::mixtral()).with_compute(ExpertCompute::Segments),
            false,
            device,
        ),
        moe_case(
            "moe_top2_capacity1.25_fwd",
            s,
            e8(RouterConfig::mixtral()).with_capacity_factor(Some(1.25)),
            false,
            device,
        ),
        moe_case(
            "moe_switch_top1_fwd",
            s,
            moe_config(s, s.experts, dense_active, RouterConfig::switch()),
            false,
            device,
        ),
        moe_case(
            "moe_deepseek_top2_fwd",
            s,
            e8(RouterConfig::deepseek_v3(2)),
            false,
            device,
        ),
        moe_case(
            "moe_expert_choice_fwd",
            s,
            e8(RouterConfig::expert_choice(2)),
            false,
            device,
        ),
        dense_case("dense_active_fwd_bwd", s, dense_active, true, device),
        moe_case(
            "moe_top2_fwd_bwd",
            s,
            e8(RouterConfig::mixtral()),
            true,
            device,
        ),
        dense_case("dense_total_e64_fwd", s, dense_total, false, device),
        moe_case("moe_e64_top2_fwd", s, e64.clone(), false, device),
        moe_case(
            "moe_e64_top2_segments_fwd",
            s,
            e64.with_compute(ExpertCompute::Segments),
            false,
            device,
        ),
        model_case("model_moe_fwd", &model, device),
        model_case(
            "model_dense_fwd",
            &model.dense_equivalent().with_ffn_plan(FfnPlan::AllDense),
            device,
        ),
    ]
}

/// The ratios the targets are stated in: (name, MoE case, dense case).
pub const RATIOS: [(&str, &str, &str); 4] = [
    (
        "moe_vs_dense_active_fwd",
        "moe_top2_fwd",
        "dense_active_fwd",
    ),
    (
        "moe_vs_dense_active_fwd_bwd",
        "moe_top2_fwd_bwd",
        "dense_active_fwd_bwd",
    ),
    (
        "moe_vs_dense_total_e64_fwd",
        "moe_e64_top2_fwd",
        "dense_total_e64_fwd",
    ),
    ("model_moe_vs_dense_fwd", "model_moe_fwd", "model_dense_fwd"),
];
