//! The training objective: next-token cross-entropy, plus the weighted balancing losses of the
//! MoE layers for a training step.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use moe_core::RoutingStats;
use moe_model::MoeLm;

use crate::config::TrainConfig;
use crate::data::Batch;

/// Cross-entropy of next-token prediction. logits: `[b, s, V]`, targets: `[b, s]`. Scalar `[1]`.
pub fn lm_loss(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits.reshape([b * s, v]), targets.reshape([b * s]))
}

/// One training step's loss: language model + weighted auxiliary losses (mean over MoE layers).
/// Returns (total, language-model part, routing statistics per MoE layer).
pub fn step_loss(
    model: &MoeLm,
    batch: &Batch,
    config: &TrainConfig,
) -> (Tensor<1>, Tensor<1>, Vec<(usize, RoutingStats)>) {
    let out = model.forward(batch.inputs.clone(), None);
    let lm = lm_loss(out.logits, batch.targets.clone());
    let mut loss = lm.clone();
    if let Some(aux) = out.aux {
        let n = out.routing.len() as f64;
        loss = loss
            + aux.balance.mul_scalar(config.aux_loss_coef / n)
            + aux.z.mul_scalar(config.z_loss_coef / n);
    }
    (loss, lm, out.routing)
}
