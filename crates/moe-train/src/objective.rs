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

/// Next-token cross-entropy of every position. logits: `[b, s, V]`, targets: `[b, s]`.
/// Returns `[b, s]`.
pub fn token_losses(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [b, s, _] = logits.dims();
    let log_probs = burn::tensor::activation::log_softmax(logits, 2);
    let picked = log_probs.gather(2, targets.reshape([b, s, 1])); // [b, s, 1]
    picked.reshape([b, s]).neg()
}

/// Mean next-token cross-entropy of each row over positions `from..`. logits: `[b, s, V]`,
/// targets: `[b, s]`. Returns `[b]`.
pub fn row_losses(logits: Tensor<3>, targets: Tensor<2, Int>, from: usize) -> Tensor<1> {
    let [b, s, _] = logits.dims();
    let losses = token_losses(logits, targets).slice([0..b, from..s]);
    losses.mean_dim(1).reshape([b])
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
