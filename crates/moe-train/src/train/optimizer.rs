//! The optimizer side of a run: AdamW (routers without weight decay), the learning-rate
//! schedule, which parameters train, and the auxiliary-loss-free bias update between optimizer
//! steps. Gradients are clipped by their global norm before the step (`clip.rs`).

use burn::lr_scheduler::LrSchedulerConfig;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::{ModuleLrScheduler, ModuleLrSchedulerConfig};
use burn::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::module::{Module, ParamGroup};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use moe_core::RoutingStats;
use moe_model::MoeLm;
use moe_model::block::Ffn;

use crate::config::{TrainConfig, TrainPart};
use crate::error::{DataError, Result};

/// Warm-up from lr/100 to lr, then cosine to min_lr, as Burn schedulers; the routers' gates
/// ([`no_decay_group`]) follow the same curve scaled by `router_lr_scale`.
pub fn lr_schedule(config: &TrainConfig) -> Result<ModuleLrScheduler> {
    ModuleLrSchedulerConfig::new(warmup_cosine(config, 1.0).into())
        .with_group(
            no_decay_group(),
            warmup_cosine(config, config.router_lr_scale),
        )
        .init()
        .map_err(DataError::Config)
}

/// The run's warm-up and cosine decay, every learning rate multiplied by `scale`.
fn warmup_cosine(config: &TrainConfig, scale: f64) -> SequentialLrSchedulerConfig {
    let (lr, min_lr) = (config.lr * scale, config.min_lr * scale);
    let warmup = config.warmup_steps.min(config.steps.saturating_sub(1));
    let decay = (config.steps - warmup).max(1);
    let cosine = LrSchedulerConfig::Cosine(
        CosineAnnealingLrSchedulerConfig::new(lr, decay).with_min_lr(min_lr),
    );
    if warmup == 0 {
        SequentialLrSchedulerConfig::new(vec![cosine], vec![])
    } else {
        SequentialLrSchedulerConfig::new(
            vec![
                LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(lr / 100.0, lr, warmup)),
                cosine,
            ],
            vec![warmup],
        )
    }
}

/// The parameters that take no weight decay: the routers' gates. Decay would pull the gate
/// logits toward uniform routing, against what the router learns (as biases and norms, which
/// decay exempts in most recipes; the gates are this model's only such parameters).
/// The same group takes `router_lr_scale` times the learning rate ([`lr_schedule`]).
pub fn no_decay_group() -> ParamGroup {
    ParamGroup::from_predicate(".router.")
}

/// AdamW with the run's weight decay, none for [`no_decay_group`], fresh state. Gradient
/// clipping is not Burn's (per tensor) but by the global norm, in the training step.
pub(super) fn optimizer(config: &TrainConfig) -> ModuleOptimizer {
    AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .init()
        .with_group(
            no_decay_group(),
            AdamWConfig::new().with_weight_decay(0.0).build(),
            None,
        )
}

/// The parameters of the feed-forward blocks: dense FFNs, experts, routers, shared experts.
pub fn ffn_group() -> ParamGroup {
    ParamGroup::from_any_predicates(vec![".ffn.", ".shared_expert."])
}

/// Freezes everything but the part of the model that trains.
pub(super) fn trainable(model: MoeLm, part: TrainPart) -> MoeLm {
    match part {
        TrainPart::All => model,
        TrainPart::Ffn => model.no_grad().set_require_grad_group(ffn_group(), true),
        TrainPart::Router => {
            let mut model = model.no_grad();
            for block in &mut model.blocks {
                if let Ffn::Moe(moe) = &mut block.ffn {
                    moe.router.gate = moe.router.gate.clone().set_require_grad(true);
                }
            }
            model
        }
    }
}

/// Applies the auxiliary-loss-free bias update to every MoE layer with a selection bias.
pub(super) fn update_biases(model: &mut MoeLm, routing: &[(usize, RoutingStats)], rate: f64) {
    for (layer, stats) in routing {
        if let Ffn::Moe(moe) = &mut model.blocks[*layer].ffn {
            moe.update_selection_bias(stats, rate);
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::module::{ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use burn::prelude::*;
    use moe_model::ModelConfig;

    use super::*;
    use moe_core::testing::values;

    /// The same gradient `.1` for every element of every float parameter.
    struct Filled(GradientsParams, f32);

    impl ModuleVisitor for Filled {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let grad = param.val().inner().ones_like().mul_scalar(self.1);
            self.0.register(param.id, grad);
        }
    }

    /// The default MoE with one layer over a vocabulary of 16, and a gradient of `grad`.
    fn one_layer(grad: f32) -> (MoeLm, GradientsParams) {
        let device = Device::flex().autodiff();
        let model = ModelConfig::new()
            .with_vocab_size(16)
            .with_n_layers(1)
            .init_seeded(&device, 1)
            .unwrap();
        let mut filled = Filled(GradientsParams::new(), grad);
        model.visit(&mut filled);
        (model, filled.0)
    }

    fn gate(model: &MoeLm) -> Vec<f32> {
        let Ffn::Moe(moe) = &model.blocks[0].ffn else {
            panic!("the default model is an MoE")
        };
        values(moe.router.gate.weight.val())
    }

    #[test]
    fn weight_decay_spares_the_routers_only() {
        let (model, zeros) = one_layer(0.0);
        let (gate_before, embed) = (gate(&model), values(model.embed.weight.val()));
        let config = TrainConfig::new().with_weight_decay(0.5);
        let model = optimizer(&config).step(0.1, model, zeros);
        // With zero gradients AdamW only decays: w <- w (1 - lr wd).
        assert_eq!(gate(&model), gate_before);
        for (after, before) in values(model.embed.weight.val()).iter().zip(&embed) {
            assert!((after - before * 0.95).abs() < 1e-6, "{after} vs {before}");
        }
    }

    #[rstest::rstest]
    #[case::same(1.0)]
    #[case::tenfold(10.0)]
    fn the_routers_step_by_their_scaled_rate(#[case] scale: f64) {
        let (model, ones) = one_layer(1.0);
        let (gate_before, embed) = (gate(&model), values(model.embed.weight.val()));
        let config = TrainConfig::new()
            .with_weight_decay(0.0)
            .with_router_lr_scale(scale);
        let mut schedule = lr_schedule(&config).unwrap();
        for _ in 0..config.warmup_steps {
            schedule.step();
        }
        let lr = schedule.step();
        assert_eq!(lr.base(), config.lr);
        let model = optimizer(&config).step(lr, model, ones);
        // Adam's first step moves every weight by its learning rate against a constant gradient.
        let moved = |after: Vec<f32>, before: &[f32]| {
            let steps: Vec<f64> = after
                .iter()
                .zip(before)
                .map(|(a, b)| (b - a) as f64)
                .collect();
            steps.iter().sum::<f64>() / steps.len() as f64
        };
        let router = moved(gate(&model), &gate_before);
        let rest = moved(values(model.embed.weight.val()), &embed);
        assert!((rest - config.lr).abs() < 1e-3 * config.lr, "{rest}");
        assert!(
            (router - scale * config.lr).abs() < 1e-3 * scale * config.lr,
            "{router}"
        );
    }

    #[test]
    fn the_ffn_part_trains_the_feed_forward_blocks_only() {
        let device = Device::flex().autodiff();
        let model = ModelConfig::new()
            .with_vocab_size(16)
            .with_n_layers(1)
            .dense_equivalent()
            .init_seeded(&device, 1)
            .unwrap();
        let model = trainable(model, TrainPart::Ffn);
        let Ffn::Dense(ffn) = &model.blocks[0].ffn else {
            panic!("a dense model")
        };
        assert!(ffn.w_up.weight.val().is_require_grad());
        assert!(!model.embed.weight.val().is_require_grad());
        assert!(!model.blocks[0].attn_norm.gamma.val().is_require_grad());
    }
}
