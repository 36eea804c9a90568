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

/// What a case measures, before anything is allocated.
enum CaseSpec {
    /// A dense SwiGLU FFN of this width; forward+backward when `backward`.
    Dense { d_ff: usize, backward: bool },
    /// An MoE layer; forward+backward when `backward`.
    Moe {
        config: MoeLayerConfig,
        backward: bool,
    },
    /// A whole model's forward pass.
    Model(Box<ModelConfig>),
}

impl CaseSpec {
    fn build(self, name: &str, s: &BenchSizes, device: &Device) -> BenchCase {
        match self {
            Self::Dense { d_ff, backward } => dense_case(name, s, d_ff, backward, device),
            Self::Moe { config, backward } => moe_case(name, s, config, backward, device),
            Self::Model(config) => model_case(name, &config, device),
        }
    }
}

/// Every case of a `moe bench` run, in reporting order, by name.
fn specs(s: &BenchSizes) -> Vec<(&'static str, CaseSpec)> {
    let dense_active = s.expert_d_ff * 2;
    let dense_total = s.fine_d_ff * s.fine_experts;
    let e8 = |router: RouterConfig| moe_config(s, s.experts, s.expert_d_ff, router);
    let e64 = moe_config(s, s.fine_experts, s.fine_d_ff, RouterConfig::mixtral());
    let dense = |d_ff, backward| CaseSpec::Dense { d_ff, backward };
    let fwd = |config| CaseSpec::Moe {
        config,
        backward: false,
    };
    let model = ModelConfig::new();
    vec![
        ("dense_active_fwd", dense(dense_active, false)),
        ("moe_top2_fwd", fwd(e8(RouterConfig::mixtral()))),
        (
            "moe_top2_segments_fwd",
            fwd(e8(RouterConfig::mixtral()).with_compute(ExpertCompute::Segments)),
        ),
        (
            "moe_top2_padded_fwd",
            fwd(e8(RouterConfig::mixtral()).with_compute(ExpertCompute::Padded)),
        ),
        (
            "moe_top2_capacity1.25_fwd",
            fwd(e8(RouterConfig::mixtral()).with_capacity_factor(Some(1.25))),
        ),
        (
            "moe_switch_top1_fwd",
            fwd(moe_config(
                s,
                s.experts,
                dense_active,
                RouterConfig::switch(),
            )),
        ),
        (
            "moe_deepseek_top2_fwd",
            fwd(e8(RouterConfig::deepseek_v3(2))),
        ),
        (
            "moe_expert_choice_fwd",
            fwd(e8(RouterConfig::expert_choice(2))),
        ),
        ("dense_active_fwd_bwd", dense(dense_active, true)),
        (
            "moe_top2_fwd_bwd",
            CaseSpec::Moe {
                config: e8(RouterConfig::mixtral()),
                backward: true,
            },
        ),
        ("dense_total_e64_fwd", dense(dense_total, false)),
        ("moe_e64_top2_fwd", fwd(e64.clone())),
        (
            "moe_e64_top2_segments_fwd",
            fwd(e64.with_compute(ExpertCompute::Segments)),
        ),
        ("model_moe_fwd", CaseSpec::Model(Box::new(model.clone()))),
        (
            "model_dense_fwd",
            CaseSpec::Model(Box::new(
                model.dense_equivalent().with_ffn_plan(FfnPlan::AllDense),
            )),
        ),
    ]
}

/// The names of every case, in reporting order (nothing is built).
pub fn case_names() -> Vec<&'static str> {
    specs(&BenchSizes::default())
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// Every case of a `moe bench` run, in reporting order.
pub fn cases(s: &BenchSizes, device: &Device) -> Vec<BenchCase> {
    selected_cases(s, device, &|_| true)
}

/// The cases whose names `select` accepts, in reporting order; the others are never built.
pub fn selected_cases(
    s: &BenchSizes,
    device: &Device,
    select: &dyn Fn(&str) -> bool,
) -> Vec<BenchCase> {
    specs(s)
        .into_iter()
        .filter(|(name, _)| select(name))
        .map(|(name, spec)| spec.build(name, s, device))
        .collect()
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
