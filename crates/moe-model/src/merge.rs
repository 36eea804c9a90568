//! Branch-Train-MiX merging (Sukhbaatar et al., 2024): dense branches trained independently from one
//! base, each on its own domain, become one MoE model. Branch `i`'s FFN in every layer becomes
//! expert `i` of that layer's MoE; every other parameter (embeddings, attention, norms, head) is the
//! mean over the branches; each layer gets a fresh router.
//!
//! Router initialisation: the router preset's own initialisation (Burn's default for a linear
//! layer, as in a fresh MoE layer), drawn from `seed`. The merged model is meant to be fine-tuned on
//! the mixture (`moe train --from CKPT --train router`), which learns which expert fits which token.

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use moe_core::{Experts, MoeLayer, MoeLayerConfig, SwiGluFfn};

use crate::block::Ffn;
use crate::config::{FfnPlan, ModelConfig};
use crate::error::{ModelError, Result};
use crate::model::{MoeLm, seeded_routers};

/// Why a branch's config cannot be merged with the first branch's, or `None` when the two
/// share an architecture. Branches must be dense; the (unused) MoE section is not compared.
pub fn architecture_mismatch(first: &ModelConfig, other: &ModelConfig) -> Option<String> {
    if other.n_moe_layers() > 0 {
        return Some("is not dense (it has MoE layers); branches are dense models".into());
    }
    let fields = |c: &ModelConfig| match serde_json::to_value(c) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.remove("moe");
            m
        }
        _ => serde_json::Map::new(),
    };
    let (a, b) = (fields(first), fields(other));
    a.iter().find(|(k, v)| b.get(*k) != Some(*v)).map(|(k, v)| {
        let theirs = b.get(k).map_or("missing".into(), ToString::to_string);
        format!("has {k} = {theirs}, the first branch {v}: branches must share an architecture")
    })
}

/// Every float parameter, flattened, in visiting order (the same for equal architectures).
struct Collect(Vec<Tensor<1>>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.0.push(t.reshape([n]));
    }
}

/// Replaces every float parameter, in visiting order, by the next tensor of a list.
struct Replace(std::vec::IntoIter<Tensor<1>>);

impl ModuleMapper for Replace {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let next = self
            .0
            .next()
            .expect("equal architectures have equal parameter lists");
        param.map(|t| next.reshape(t.dims()))
    }
}

/// Stacks one dense FFN per branch into an expert bank `[E, ...]`.
fn stack_ffns(ffns: &[&SwiGluFfn]) -> Experts {
    let stack = |w: &dyn Fn(&SwiGluFfn) -> Tensor<2>| {
        Tensor::stack::<3>(ffns.iter().map(|f| w(f)).collect(), 0)
    };
    Experts::from_weights(
        stack(&|f| f.w_gate.weight.val()),
        stack(&|f| f.w_up.weight.val()),
        stack(&|f| f.w_down.weight.val()),
    )
}

/// Merges dense branches into one MoE model with one expert per branch (in the given order),
/// and, with a `generalist` (the branches' seed model, say), its FFN as one more expert, last;
/// the generalist takes no part in the mean of the other weights. `moe` gives the routing
/// (`top_k`, router kind, capacity); its sizes are taken from the branches. Shared experts are
/// not supported.
pub fn merge(
    branches: Vec<MoeLm>,
    generalist: Option<&MoeLm>,
    moe: MoeLayerConfig,
    seed: u64,
) -> Result<MoeLm> {
    if branches.len() < 2 {
        return Err(ModelError::Config(format!(
            "merging needs at least 2 branches, got {}",
            branches.len()
        )));
    }
    if moe.n_shared_experts > 0 {
        return Err(ModelError::Config(
            "merged experts are the branches' FFNs; n_shared_experts must be 0".into(),
        ));
    }
    let first = &branches[0].config;
    for (i, b) in branches.iter().enumerate() {
        if let Some(problem) = architecture_mismatch(first, &b.config) {
            return Err(ModelError::Config(format!("branch {i} {problem}")));
        }
    }
    if let Some(problem) = generalist.and_then(|g| architecture_mismatch(first, &g.config)) {
        return Err(ModelError::Config(format!("the generalist {problem}")));
    }
    let mut moe = moe;
    moe.d_model = first.d_model;
    moe.d_ff = first.d_ff;
    moe.n_experts = branches.len() + usize::from(generalist.is_some());
    let config = first
        .clone()
        .with_ffn_plan(FfnPlan::AllMoe)
        .with_moe(moe.clone());
    config.validate()?;
    let device = branches[0].embed.weight.val().device();

    // Mean of every parameter over the branches (FFN means are computed too, then replaced).
    let mut sums: Option<Vec<Tensor<1>>> = None;
    for b in &branches {
        let mut collect = Collect(Vec::new());
        b.visit(&mut collect);
        sums = Some(match sums {
            None => collect.0,
            Some(acc) => acc.into_iter().zip(collect.0).map(|(a, x)| a + x).collect(),
        });
    }
    let n = branches.len() as f64;
    let means: Vec<Tensor<1>> = sums
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.div_scalar(n))
        .collect();

    let experts: Vec<Experts> = (0..first.n_layers)
        .map(|layer| {
            let ffns: Vec<&SwiGluFfn> = branches
                .iter()
                .chain(generalist)
                .map(|b| match &b.blocks[layer].ffn {
                    Ffn::Dense(f) => f,
                    Ffn::Moe(_) => unreachable!("branches were checked to be dense"),
                })
                .collect();
            stack_ffns(&ffns)
        })
        .collect();
    let routers = seeded_routers(&moe, first.n_layers, &device, seed)?;

    let mut model = branches
        .into_iter()
        .next()
        .expect("at least two branches")
        .map(&mut Replace(means.into_iter()));
    for ((block, experts), router) in model.blocks.iter_mut().zip(experts).zip(routers) {
        block.ffn = Ffn::Moe(MoeLayer {
            router,
            experts,
            shared: None,
            capacity_factor: moe.capacity_factor,
            compute: moe.compute,
        });
    }
    model.config = config;
    Ok(model)
}
