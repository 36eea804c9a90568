//! The optimizer side of a run: AdamW with gradient clipping, the learning-rate schedule, which
//! parameters train, and the auxiliary-loss-free bias update between optimizer steps.

use burn::grad_clipping::GradientClippingConfig;
use burn::lr_scheduler::LrSchedulerConfig;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::module::Module;
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

/// AdamW with the run's weight decay and gradient clipping, fresh state.
pub(super) fn optimizer(config: &TrainConfig) -> ModuleOptimizer {
    AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clipping(
            (config.grad_clip > 0.0)
                .then_some(GradientClippingConfig::Norm(config.grad_clip as f32)),
        )
        .init()
}

/// Freezes everything but the routers when only they are trained.
pub(super) fn trainable(model: MoeLm, part: TrainPart) -> MoeLm {
    match part {
        TrainPart::All => model,
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
