//! Data-parallel training steps on several devices, run by burn-train's multi-device engine.
//!
//! Each step's batch is split into one shard per device; every device runs forward and backward
//! on its shard with its own copy of the model, and the gradients are summed on the first device,
//! where the optimizer steps. The per-device work runs on [`MultiDevicesTrainStep`], the engine
//! burn-train's `ExecutionStrategy::MultiDevice(devices, MultiDeviceOptim::OptimMainDevice)` runs
//! each iteration (one worker thread per device, the model forked onto each, [`TrainStep`] there),
//! and the gradients are gathered with Burn's `GradientsParams::to_device` and
//! [`GradientsAccumulator`]: nothing here moves or reduces tensors by hand. The training loop
//! stays ours rather than burn-train's epoch-based `Learner`, because a run resumes at any step
//! with the same data order and applies the auxiliary-loss-free bias update between optimizer
//! steps, which the `Learner` has no place for.
//!
//! Each shard's loss is weighted by its share of the batch, so the summed gradient is that of the
//! whole batch's mean language-model loss; the balancing losses are computed per shard (as in any
//! data-parallel MoE training) and weighted the same way.

use burn::data::dataloader::{DataLoaderIterator, Progress};
use burn::data::dataset::DatasetError;
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::ExecutionError;
use burn::train::train::{MultiDeviceStepError, MultiDevicesTrainStep};
use burn::train::{InferenceStep, ItemLazy, TrainOutput, TrainStep};
use moe_core::RoutingStats;
use moe_model::MoeLm;

use crate::config::TrainConfig;
use crate::data::{Batch, Corpus, batch_from_windows};
use crate::error::{DataError, Result};
use crate::objective::step_loss;
use crate::routing::merge_routing;

/// One device's share of a step.
pub struct Shard {
    /// The shard's windows, on the device that processes them.
    pub batch: Batch,
    /// The shard's share of the step's windows; its loss is scaled by it.
    pub weight: f64,
    /// Position of the shard in the step, to sum gradients in a fixed order.
    pub index: usize,
}

/// What a device reports for its shard; gradients travel beside it in [`TrainOutput`].
pub struct ShardOutput {
    /// Weighted training loss (language model + balancing), detached. Scalar `[1]`.
    pub loss: Tensor<1>,
    /// Weighted language-model loss, detached. Scalar `[1]`.
    pub lm: Tensor<1>,
    /// Routing statistics per MoE layer, detached.
    pub routing: Vec<(usize, RoutingStats)>,
    /// The shard's position in the step.
    pub index: usize,
}

impl ShardOutput {
    /// A shard's figures, cut from the autodiff graph.
    fn detached(
        loss: Tensor<1>,
        lm: Tensor<1>,
        routing: Vec<(usize, RoutingStats)>,
        index: usize,
    ) -> Self {
        Self {
            loss: loss.detach(),
            lm: lm.detach(),
            routing: routing.into_iter().map(|(l, s)| (l, s.detach())).collect(),
            index,
        }
    }
}

impl ItemLazy for ShardOutput {
    fn sync(self) -> std::result::Result<Self, ExecutionError> {
        // Dispatch the shard's queued work so that whoever reads the scalars does not wait on it.
        self.loss.device().flush()?;
        Ok(self)
    }
}

/// The model as burn-train's engine sees it: a step is forward + backward of one shard.
#[derive(Module, Debug)]
pub struct LmStep {
    /// The language model.
    pub model: MoeLm,
    /// Loss coefficients (and the rest of the run's hyper-parameters).
    #[module(skip)]
    pub config: TrainConfig,
}

impl LmStep {
    /// Forward of a shard: (weighted total loss, weighted LM loss, routing), still attached.
    fn losses(
        &self,
        batch: &Batch,
        weight: f64,
    ) -> (Tensor<1>, Tensor<1>, Vec<(usize, RoutingStats)>) {
        let (loss, lm, routing) = step_loss(&self.model, batch, &self.config);
        (loss.mul_scalar(weight), lm.mul_scalar(weight), routing)
    }

    /// Forward and backward of one shard on the calling thread.
    pub fn run(&self, shard: Shard) -> (ShardOutput, GradientsParams) {
        let (loss, lm, routing) = self.losses(&shard.batch, shard.weight);
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        (ShardOutput::detached(loss, lm, routing, shard.index), grads)
    }
}

impl TrainStep for LmStep {
    type Input = Shard;
    type Output = ShardOutput;

    fn step(&self, shard: Shard) -> TrainOutput<ShardOutput> {
        let (item, grads) = self.run(shard);
        TrainOutput { grads, item }
    }
}

impl InferenceStep for LmStep {
    type Input = Batch;
    type Output = ShardOutput;

    /// The unweighted losses of a batch, without gradients.
    fn step(&self, batch: Batch) -> ShardOutput {
        let (loss, lm, routing) = self.losses(&batch, 1.0);
        ShardOutput::detached(loss, lm, routing, 0)
    }
}

/// Splits `windows` into `parts` consecutive shards whose sizes differ by at most one, each with
/// its share of the windows as weight (the weights sum to 1).
pub fn shard_windows<T>(windows: &[T], parts: usize) -> Vec<(&[T], f64)> {
    let (base, extra) = (windows.len() / parts, windows.len() % parts);
    let mut rest = windows;
    (0..parts)
        .map(|i| {
            let (shard, tail) = rest.split_at(base + usize::from(i < extra));
            rest = tail;
            (shard, shard.len() as f64 / windows.len() as f64)
        })
        .collect()
}

/// Checks that `devices` devices can share batches of `batch_size` windows, each getting one.
pub fn check_split(devices: usize, batch_size: usize) -> Result<()> {
    match devices {
        0 => Err(DataError::Config("no device to train on".into())),
        n if batch_size < n => Err(DataError::Config(format!(
            "batch_size {batch_size} cannot be split across {n} devices; use at least {n}"
        ))),
        _ => Ok(()),
    }
}

/// A step's results, gathered on the main device.
pub struct StepResult {
    /// Training loss of the whole batch (language model + balancing).
    pub loss: f32,
    /// Language-model loss of the whole batch.
    pub lm: f32,
    /// Gradients of `loss`, on the main device.
    pub grads: GradientsParams,
    /// Routing statistics per MoE layer over the whole batch, on the main device.
    pub routing: Vec<(usize, RoutingStats)>,
}

/// Where a run's steps execute: on one device, or split across several.
pub enum StepEngine {
    /// Forward and backward on the calling thread.
    Single(Device),
    /// One shard per device on burn-train's multi-device engine; the first device is the main one.
    Parallel {
        /// The devices, autodiff enabled; gradients are summed on the first.
        devices: Vec<Device>,
        /// burn-train's worker threads, one per device.
        engine: MultiDevicesTrainStep<LmStep>,
    },
}

impl StepEngine {
    /// An engine for `devices` (autodiff is enabled on them here). Refuses an empty list and a
    /// batch too small to give every device a window.
    pub fn new(devices: &[Device], batch_size: usize) -> Result<Self> {
        check_split(devices.len(), batch_size)?;
        let devices: Vec<Device> = devices.iter().map(|d| d.clone().autodiff()).collect();
        Ok(if devices.len() == 1 {
            Self::Single(devices[0].clone())
        } else {
            Self::Parallel {
                engine: MultiDevicesTrainStep::new(&devices),
                devices,
            }
        })
    }

    /// The main device: where the model, the optimizer and the gathered gradients live.
    pub fn main_device(&self) -> &Device {
        match self {
            Self::Single(device) => device,
            Self::Parallel { devices, .. } => &devices[0],
        }
    }

    /// Every device of the engine.
    pub fn devices(&self) -> &[Device] {
        match self {
            Self::Single(device) => std::slice::from_ref(device),
            Self::Parallel { devices, .. } => devices,
        }
    }

    /// Forward and backward of one step over `windows`.
    pub fn step(
        &self,
        model: &MoeLm,
        config: &TrainConfig,
        corpus: &Corpus,
        windows: &[(usize, usize)],
    ) -> Result<StepResult> {
        let step = LmStep {
            model: model.clone(),
            config: config.clone(),
        };
        let main = self.main_device();
        let batch = |windows: &[(usize, usize)], device: &Device| {
            batch_from_windows(corpus, windows, config.seq_len, false, device)
        };
        let mut outputs = match self {
            Self::Single(device) => {
                let shard = Shard {
                    batch: batch(windows, device),
                    weight: 1.0,
                    index: 0,
                };
                vec![step.run(shard)]
            }
            Self::Parallel { devices, engine } => {
                let mut loaders: Vec<Box<dyn DataLoaderIterator<Shard>>> =
                    shard_windows(windows, devices.len())
                        .into_iter()
                        .zip(devices)
                        .enumerate()
                        .map(|(index, ((part, weight), device))| {
                            let shard = Shard {
                                batch: batch(part, device),
                                weight,
                                index,
                            };
                            Box::new(OneShard(Some(shard))) as Box<dyn DataLoaderIterator<Shard>>
                        })
                        .collect();
                let (items, _) = engine.step(&mut loaders, &step).map_err(parallel_error)?;
                items
                    .into_iter()
                    .map(|out| {
                        let grads = out.output.grads.to_device(main, model);
                        (out.output.item, grads)
                    })
                    .collect()
            }
        };
        // Workers answer in any order; summing in shard order keeps runs reproducible.
        outputs.sort_by_key(|(item, _)| item.index);
        let mut accumulator = GradientsAccumulator::new();
        let (mut loss, mut lm, mut routing) = (0.0, 0.0, Vec::new());
        for (item, grads) in outputs {
            accumulator.accumulate(model, grads);
            loss += item.loss.into_scalar::<f32>();
            lm += item.lm.into_scalar::<f32>();
            let on_main = item
                .routing
                .into_iter()
                .map(|(l, s)| (l, s.to_device(main)))
                .collect();
            routing = merge_routing(routing, on_main);
        }
        Ok(StepResult {
            loss,
            lm,
            grads: accumulator.grads(),
            routing,
        })
    }
}

fn parallel_error(e: MultiDeviceStepError) -> DataError {
    DataError::Device(e.to_string())
}

/// Hands one prepared shard to a worker: the engine takes its inputs from data-loader iterators.
struct OneShard(Option<Shard>);

impl Iterator for OneShard {
    type Item = std::result::Result<Shard, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.take().map(Ok)
    }
}

impl DataLoaderIterator<Shard> for OneShard {
    fn progress(&self) -> Progress {
        Progress::new(usize::from(self.0.is_none()), 1, Some("shards".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_windows_in_order_with_weights_summing_to_one() {
        let windows: Vec<usize> = (0..10).collect();
        let shards = shard_windows(&windows, 3);
        let sizes: Vec<usize> = shards.iter().map(|(s, _)| s.len()).collect();
        assert_eq!(sizes, [4, 3, 3]);
        let joined: Vec<usize> = shards.iter().flat_map(|(s, _)| s.iter().copied()).collect();
        assert_eq!(joined, windows);
        let total: f64 = shards.iter().map(|(_, w)| w).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert_eq!(shards[0].1, 0.4);
    }

    #[test]
    fn a_batch_smaller_than_the_device_count_is_refused() {
        let devices = vec![Device::flex(); 3];
        let err = StepEngine::new(&devices, 2).err().expect("refused");
        assert!(err.to_string().contains("across 3 devices"), "{err}");
        assert!(StepEngine::new(&[], 2).is_err());
    }
}
