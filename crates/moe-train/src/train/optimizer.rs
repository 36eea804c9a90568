//! The optimizer side of a run: AdamW (routers without weight decay), the learning-rate
//! schedule, which parameters train, and the auxiliary-loss-free bias update between optimizer
//! steps. Gradients are clipped by their global norm before the step (`clip.rs`).

use burn::lr_scheduler::LrSchedulerConfig;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::module::{Module, ParamGroup};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use moe_core::RoutingStats;
use moe_model::MoeLm;
use moe_model::block::Ffn;

use crate::config::{TrainConfig, TrainPart};
use crate::error::{DataError, Result};

/// Warm-up from lr/100 to lr, then cosine to min_lr, as Burn schedulers.
pub fn lr_schedule(config: &TrainConfig) -> Result<ModuleLrScheduler> {
    let warmup = config.warmup_steps.min(config.steps.saturating_sub(1));
    let decay = (config.steps - warmup).max(1);
    let cosine = LrSchedulerConfig::Cosine(
        CosineAnnealingLrSchedulerConfig::new(config.lr, decay).with_min_lr(config.min_lr),
    );
    let schedule = if warmup == 0 {
        SequentialLrSchedulerConfig::new(vec![cosine], vec![])
    } else {
        SequentialLrSchedulerConfig::new(
            vec![
                LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(
                    config.lr / 100.0,
                    config.lr,
                    warmup,
                )),
                cosine,
            ],
            vec![warmup],
        )
    };
    schedule.init().map_err(DataError::Config)
}

/// The parameters that take no weight decay: the routers' gates. Decay would pull the gate
/// logits toward uniform routing, against what the router learns (as biases and norms, which
/// decay exempts in most recipes; the gates are this model's only such parameters).
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

    /// A zero gradient for every float parameter.
    struct Zeros(GradientsParams);

    impl ModuleVisitor for Zeros {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.register(param.id, param.val().inner().zeros_like());
        }
    }

    #[test]
    fn weight_decay_spares_the_routers_only() {
        let device = Device::flex().autodiff();
        let model = ModelConfig::new()
            .with_vocab_size(16)
            .with_n_layers(1)
            .init_seeded(&device, 1)
            .unwrap();
        let Ffn::Moe(moe) = &model.blocks[0].ffn else {
            panic!("the default model is an MoE")
        };
        let gate = values(moe.router.gate.weight.val());
        let embed = values(model.embed.weight.val());
        let mut zeros = Zeros(GradientsParams::new());
        model.visit(&mut zeros);
        let config = TrainConfig::new().with_weight_decay(0.5);
        let model = optimizer(&config).step(0.1, model, zeros.0);
        let Ffn::Moe(moe) = &model.blocks[0].ffn else {
            unreachable!()
        };
        // With zero gradients AdamW only decays: w <- w (1 - lr wd).
        assert_eq!(values(moe.router.gate.weight.val()), gate);
        for (after, before) in values(model.embed.weight.val()).iter().zip(&embed) {
            assert!((after - before * 0.95).abs() < 1e-6, "{after} vs {before}");
        }
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
