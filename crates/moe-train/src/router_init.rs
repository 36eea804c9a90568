//! Router initialisation of a merged model from its domains (a Branch-Train-MiX option): the
//! gate of each branch's expert is the direction of the mean FFN input of that branch's domain,
//! so that a token starts out routed to the experts of the domains whose mean it points along
//! (the router has no bias, so the means cannot be centred). A generalist expert (or one whose
//! branch trained on several domains) gets the direction of the mean over the domains.

use burn::module::Param;
use burn::prelude::*;
use moe_model::MoeLm;
use moe_model::block::Ffn;

use crate::data::{Corpus, batch_from_windows, spread_windows};
use crate::error::{DataError, Result};
use crate::merge_info::MergeInfo;

/// The mean FFN input of every block over a sample of domain `d`'s training text: `[L][d_model]`
/// as one `[L, d_model]` tensor.
fn domain_means(
    model: &MoeLm,
    corpus: &Corpus,
    d: usize,
    windows: usize,
    seq_len: usize,
) -> Tensor<2> {
    let device = model.embed.weight.val().device();
    let sample = spread_windows(d, corpus.domains[d].train.len(), windows, seq_len);
    let mut sum: Option<Tensor<2>> = None;
    for chunk in sample.chunks(16) {
        let b = batch_from_windows(corpus, chunk, seq_len, false, &device);
        let per_block: Vec<Tensor<2>> = model
            .ffn_inputs(b.inputs)
            .into_iter()
            .map(|h| {
                let [bs, s, dm] = h.dims();
                h.reshape([bs * s, dm]).sum_dim(0) // [1, d]
            })
            .collect();
        let part = Tensor::cat(per_block, 0); // [L, d]
        sum = Some(match sum {
            Some(acc) => acc + part,
            None => part,
        });
    }
    let tokens = (sample.len() * seq_len) as f64;
    sum.expect("at least one window").div_scalar(tokens)
}

/// Sets the gates of `model`'s MoE layers from the domains of its experts (recorded in `info`)
/// over `windows` training windows of each domain.
pub fn routers_from_domain_means(
    mut model: MoeLm,
    corpus: &Corpus,
    info: &MergeInfo,
    windows: usize,
    seq_len: usize,
) -> Result<MoeLm> {
    let names = corpus.names();
    // The corpus domain of each expert, if it has exactly one.
    let expert_domains: Vec<Option<usize>> = info
        .experts
        .iter()
        .map(|e| match e.domains.as_slice() {
            [one] if !e.generalist => names.iter().position(|n| n == one),
            _ => None,
        })
        .collect();
    if expert_domains.iter().flatten().count() < 2 {
        return Err(DataError::Branch(
            "router initialisation from domain means needs at least two experts whose branch trained on one corpus domain".into(),
        ));
    }
    let valid = model.valid();
    let means: Vec<Option<Tensor<2>>> = expert_domains
        .iter()
        .map(|d| d.map(|d| domain_means(&valid, corpus, d, windows, seq_len)))
        .collect();
    let known: Vec<Tensor<2>> = means.iter().flatten().cloned().collect();
    let centre = Tensor::stack::<3>(known, 0).mean_dim(0).squeeze_dim::<2>(0); // [L, d]
    let unit = |t: Tensor<2>| {
        let norm = t.clone().square().sum_dim(1).sqrt().clamp_min(1e-6);
        t / norm
    };
    // Per expert [L, d]: its domain's mean (or the centre), unit length per layer.
    let rows: Vec<Tensor<2>> = means
        .into_iter()
        .map(|m| unit(m.unwrap_or_else(|| centre.clone())))
        .collect();
    let gates = Tensor::stack::<3>(rows, 2); // [L, d, E]
    for (l, block) in model.blocks.iter_mut().enumerate() {
        if let Ffn::Moe(moe) = &mut block.ffn {
            let w = gates.clone().slice(l..l + 1).squeeze_dim::<2>(0);
            let target = moe.router.gate.weight.val().device();
            moe.router.gate.weight = Param::from_tensor(w.to_device(&target));
        }
    }
    Ok(model)
}
