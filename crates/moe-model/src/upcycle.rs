//! Sparse upcycling (Komatsuzaki et al., 2022): every dense FFN becomes E copies of itself behind a
//! fresh router; attention, norms and embeddings are carried over. With renormalised routing the
//! k selected weights sum to 1 over identical experts, so the upcycled model computes exactly what
//! the dense one did until training moves the copies apart (or noise is added).

use burn::prelude::*;
use burn::tensor::Distribution;
use moe_core::{Experts, MoeLayer, MoeLayerConfig, SwiGluFfn};

use crate::block::Ffn;
use crate::config::FfnPlan;
use crate::error::{ModelError, Result};
use crate::model::{MoeLm, init_seeded};

/// Stacks E copies of a dense SwiGLU into an expert bank; `noise` > 0 perturbs each copy by a
/// relative Gaussian `w * (1 + noise * N(0, 1))` so the experts can diverge.
pub fn replicate(ffn: &SwiGluFfn, n_experts: usize, noise: f64) -> Experts {
    let copies = |w: Tensor<2>| {
        let bank = w.unsqueeze_dim::<3>(0).repeat_dim(0, n_experts); // [E, a, b]
        if noise > 0.0 {
            let jitter = bank
                .random_like(Distribution::Normal(0.0, noise))
                .add_scalar(1.0);
            bank * jitter
        } else {
            bank
        }
    };
    Experts::from_weights(
        copies(ffn.w_gate.weight.val()),
        copies(ffn.w_up.weight.val()),
        copies(ffn.w_down.weight.val()),
    )
}

/// Turns every dense FFN layer of `dense` into an MoE layer. `moe` gives the number of experts
/// and the routing; its widths are taken from the dense model. Shared experts are not supported
/// (they would change the output). The routers and the noise are drawn from `seed`: the same
/// dense model, config and seed give the same weights.
pub fn upcycle(dense: MoeLm, moe: MoeLayerConfig, noise: f64, seed: u64) -> Result<MoeLm> {
    if moe.n_shared_experts > 0 {
        return Err(ModelError::Config(
            "upcycling copies the dense FFN into routed experts; n_shared_experts must be 0".into(),
        ));
    }
    if dense.config.n_moe_layers() > 0 {
        return Err(ModelError::Config(
            "the model to upcycle already has MoE layers".into(),
        ));
    }
    let mut moe = moe;
    moe.d_model = dense.config.d_model;
    moe.d_ff = dense.config.d_ff;
    let config = dense
        .config
        .clone()
        .with_ffn_plan(FfnPlan::AllMoe)
        .with_moe(moe.clone());
    config.validate()?;
    let device = dense.embed.weight.val().device();
    let mut model = dense;
    let layers = init_seeded(&device, seed, || {
        Ok(model
            .blocks
            .iter()
            .filter_map(|block| match &block.ffn {
                Ffn::Dense(ffn) => Some(MoeLayer {
                    router: moe.router.init(moe.d_model, moe.n_experts, &device),
                    experts: replicate(ffn, moe.n_experts, noise),
                    shared: None,
                    capacity_factor: moe.capacity_factor,
                    compute: moe.compute,
                }),
                Ffn::Moe(_) => None,
            })
            .collect::<Vec<_>>())
    })?;
    for (block, layer) in model.blocks.iter_mut().zip(layers) {
        block.ffn = Ffn::Moe(layer);
    }
    model.config = config;
    Ok(model)
}
