//! Where an MoE layer's forward time goes: each stage of a forward pass timed on its own.

use burn::prelude::*;
use moe_core::MoeLayerConfig;
use moe_core::dispatch::TokenDispatch;
use moe_core::router::Assignment;
use serde::Serialize;

use crate::sizes::BenchSizes;
use crate::timing::{BenchBudget, Read, input, measure, read_back};

/// Where an MoE layer's forward time goes, in milliseconds per call.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    /// The case measured.
    pub case: String,
    /// (stage, milliseconds) in execution order.
    pub stages: Vec<(String, f64)>,
}

/// Times the stages of an MoE forward pass separately (each stage ends with a read-back, so
/// the stages sum to a little more than the whole).
pub fn breakdown(
    name: &str,
    s: &BenchSizes,
    config: MoeLayerConfig,
    budget: &BenchBudget,
    device: &Device,
) -> Read<Breakdown> {
    let layer = config.init(device);
    let (t, d, e) = (s.tokens, s.d_model, config.n_experts);
    let x = input(t, d, device);
    let routing = layer.router.forward(x.clone());
    let Assignment::TokenChoice { experts, weights } = routing.assignment else {
        unreachable!("the breakdown is of token-choice routing")
    };
    // Materialised, so that the plan stage times the plan, not the router's top-k recomputed.
    let experts = Tensor::<2, Int>::from_data(experts.into_data(), device);
    let choice = layer.layout_choice(false);
    let plan = TokenDispatch::plan(experts.clone(), None, e, choice);
    let buffer = x.clone().select(0, plan.source.clone());
    let y = plan.layout.run(&layer.experts, buffer.clone());
    // Each stage is timed on the same prepared input; fresh inputs matter for whole passes only.
    let ms = |f: &dyn Fn(()) -> Read| measure(budget, &|| (), f).map(|s| 1e3 * s);
    let stages = vec![
        (
            "router (gate matmul, softmax, top-k)".to_string(),
            ms(&|()| {
                // The chosen experts depend on every router op, top-k included.
                let r = layer.router.forward(x.clone());
                let Assignment::TokenChoice { experts, .. } = r.assignment else {
                    unreachable!("the breakdown is of token-choice routing")
                };
                read_back(experts.float())
            }),
        ),
        (
            "dispatch plan (counts, ranks, rows)".to_string(),
            ms(&|()| {
                let p = TokenDispatch::plan(experts.clone(), None, e, choice);
                read_back(p.source.float())
            }),
        ),
        (
            "gather tokens into expert buffer".to_string(),
            ms(&|()| read_back(x.clone().select(0, plan.source.clone()))),
        ),
        (
            "expert matmuls".to_string(),
            ms(&|()| read_back(plan.layout.run(&layer.experts, buffer.clone()))),
        ),
        (
            "combine (gather back, weight, sum over k)".to_string(),
            ms(&|()| read_back(plan.combine(y.clone(), weights.clone()))),
        ),
        (
            "whole layer forward".to_string(),
            ms(&|()| read_back(layer.forward_tokens(x.clone(), None).output)),
        ),
    ];
    Ok(Breakdown {
        case: name.into(),
        stages: stages
            .into_iter()
            .map(|(stage, ms)| ms.map(|ms| (stage, ms)))
            .collect::<Read<_>>()?,
    })
}
