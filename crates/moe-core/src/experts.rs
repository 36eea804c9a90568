//! A bank of E SwiGLU experts stored as stacked parameters, so that all experts run as one batched
//! matmul (`[E, C, d] x [E, d, f]`) instead of E small layers.

use std::ops::Range;

use burn::module::Param;
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::DType;

use crate::ffn::gated;
use crate::host::{CallerShare, INLINE_MAX_MACS, map_on_cores, runs_on_host};
use crate::kernels;

/// Rows up to which an expert in [`WeightOrder::OutIn`] multiplies as `(W' x^T)^T`; above it as
/// `x W'^T` (`W'^T` a strided view), which runs within 4% of `[in, out]` there, where the
/// former fell behind by up to 8% (docs/benchmarks.md).
pub const OUT_IN_MAX_ROWS: usize = 128;

/// Elements (`d_model * d_ff`) from which an expert's matrices are laid out `[out, in]` for
/// inference ([`crate::MoeLayer::for_inference`]): smaller ones stay in a core's cache, where
/// `[in, out]` multiplies as fast or faster at every row count (docs/benchmarks.md).
pub const OUT_IN_MIN_ELEMENTS: usize = 1 << 18;

/// Configuration of an [`Experts`] bank.
#[derive(Config, Debug)]
pub struct ExpertsConfig {
    /// Model width.
    pub d_model: usize,
    /// Hidden width of each expert.
    pub d_ff: usize,
    /// Number of experts.
    pub n_experts: usize,
    /// Initialisation of the expert weights; the default matches Burn's `Linear`
    /// (Kaiming-uniform with fan-in of each projection).
    #[config(
        default = "Initializer::KaimingUniform{gain: 1.0 / 3.0f64.sqrt(), fan_out_only: false}"
    )]
    pub initializer: Initializer,
}

/// The order in which an expert keeps its matrices in memory. Both compute the same function;
/// the order decides only which matmuls run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightOrder {
    /// `[in, out]`, as Burn's `Linear`: what training updates.
    #[default]
    InOut,
    /// `[out, in]`, as PyTorch and HF checkpoints: each output is a contiguous dot product, so
    /// the few rows per expert of batched decoding multiply faster on a host CPU (measured in
    /// docs/benchmarks.md). Inference only.
    OutIn,
}

/// One expert's weights, each transposed in [`WeightOrder::OutIn`].
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// Gate projection: `[d_model, d_ff]` in `InOut`, `[d_ff, d_model]` in `OutIn`.
    pub w_gate: Tensor<2>,
    /// Up projection: `[d_model, d_ff]` in `InOut`, `[d_ff, d_model]` in `OutIn`.
    pub w_up: Tensor<2>,
    /// Down projection: `[d_ff, d_model]` in `InOut`, `[d_model, d_ff]` in `OutIn`.
    pub w_down: Tensor<2>,
    /// How the three are laid out.
    pub order: WeightOrder,
}

impl ExpertWeights {
    /// The expert on its rows: `silu(x W_gate) * (x W_up) W_down`. On flex, an expert in
    /// [`WeightOrder::OutIn`] on [`kernels::SWIGLU_MIN_ROWS`] to [`kernels::SWIGLU_MAX_ROWS`]
    /// f32 rows (batched decoding) runs the host kernel [`kernels::swiglu_out_in`]; the rest
    /// run [`kernels::matmul`] (gemm into its output on flex, Burn's matmul elsewhere).
    ///
    /// rows: `[n, d_model]` -> `[n, d_model]`
    pub fn forward(&self, rows: Tensor<2>) -> Tensor<2> {
        if self.order == WeightOrder::OutIn
            && let Some(out) = kernels::swiglu_tensor(&rows, &self.w_gate, &self.w_up, &self.w_down)
        {
            return out;
        }
        let mm = kernels::matmul;
        match self.order {
            WeightOrder::InOut => {
                let gate = mm(rows.clone(), self.w_gate.clone()); // [n, f]
                let up = mm(rows, self.w_up.clone()); // [n, f]
                mm(gated(gate, up), self.w_down.clone()) // [n, d]
            }
            WeightOrder::OutIn if rows.dims()[0] <= OUT_IN_MAX_ROWS => {
                let cols = rows.transpose(); // [d, n]
                let gate = mm(self.w_gate.clone(), cols.clone()); // [f, n]
                let up = mm(self.w_up.clone(), cols); // [f, n]
                mm(self.w_down.clone(), gated(gate, up)).transpose() // [n, d]
            }
            WeightOrder::OutIn => {
                let gate = mm(rows.clone(), self.w_gate.clone().transpose()); // [n, f]
                let up = mm(rows, self.w_up.clone().transpose()); // [n, f]
                mm(gated(gate, up), self.w_down.clone().transpose()) // [n, d]
            }
        }
    }
}

/// Where a paged bank obtains its experts: an expert store that keeps some of them resident
/// under a budget and fetches the others when routed (see `moe-model`'s store). Called once
/// per expert a forward pass routes to, possibly from several threads at once.
pub trait ExpertSource: Send + Sync + std::fmt::Debug {
    /// Expert `e`'s weights on `device`.
    fn expert(&self, e: usize, device: &Device) -> ExpertWeights;

    /// Whether the source reads ahead: a model then predicts this layer's experts early
    /// (router look-ahead) and calls [`prefetch`](Self::prefetch).
    fn prefetches(&self) -> bool {
        false
    }

    /// A hint that `experts` will be asked for soon; a source may start reading them.
    fn prefetch(&self, _experts: &[usize], _device: &Device) {}
}

/// E SwiGLU experts: expert e computes `silu(x W_gate[e]) * (x W_up[e]) W_down[e]`.
///
/// A bank is resident (its stacked parameters hold every expert) or paged: with a
/// [`source`](Self::source), its parameters stay lazy and unallocated, and each forward pass
/// asks the source for the experts it routes to. Paged banks run exact segments, inference only.
#[derive(Module, Debug)]
pub struct Experts {
    /// Gate projections `[E, d_model, d_ff]`.
    pub w_gate: Param<Tensor<3>>,
    /// Up projections `[E, d_model, d_ff]`.
    pub w_up: Param<Tensor<3>>,
    /// Down projections `[E, d_ff, d_model]`.
    pub w_down: Param<Tensor<3>>,
    /// The store a paged bank fetches experts from; `None` for a resident bank.
    #[module(skip)]
    pub source: Option<std::sync::Arc<dyn ExpertSource>>,
    /// How a resident bank's parameters sit in memory: in [`WeightOrder::OutIn`] each is a
    /// transposed view of an `[E, out, in]` buffer (see [`Experts::with_order`]). Their logical
    /// shapes, and so every other use of them, are the same in both orders.
    #[module(skip)]
    order: WeightOrder,
}

impl ExpertsConfig {
    /// Builds the bank.
    pub fn init(&self, device: &Device) -> Experts {
        let (e, d, f) = (self.n_experts, self.d_model, self.d_ff);
        let init = |shape: [usize; 3], fan_in, fan_out| {
            self.initializer
                .init_with(shape, Some(fan_in), Some(fan_out), device)
        };
        Experts {
            w_gate: init([e, d, f], d, f),
            w_up: init([e, d, f], d, f),
            w_down: init([e, f, d], f, d),
            source: None,
            order: WeightOrder::InOut,
        }
    }

    /// Parameters of the bank.
    pub fn num_params(&self) -> usize {
        3 * self.n_experts * self.d_model * self.d_ff
    }
}

impl Experts {
    /// A resident bank of the given stacked weights, in [`WeightOrder::InOut`].
    ///
    /// w_gate, w_up: `[E, d_model, d_ff]`; w_down: `[E, d_ff, d_model]`
    pub fn from_weights(w_gate: Tensor<3>, w_up: Tensor<3>, w_down: Tensor<3>) -> Self {
        Self {
            w_gate: Param::from_tensor(w_gate),
            w_up: Param::from_tensor(w_up),
            w_down: Param::from_tensor(w_down),
            source: None,
            order: WeightOrder::InOut,
        }
    }

    /// Number of experts.
    pub fn n_experts(&self) -> usize {
        self.w_gate.lazy_shape().dims::<3>()[0]
    }

    /// `[n_experts, d_model, d_ff]`, without drawing or fetching a weight.
    pub fn dims(&self) -> [usize; 3] {
        self.w_gate.lazy_shape().dims()
    }

    /// Whether the experts come from a [`source`](Self::source) rather than the parameters.
    pub fn is_paged(&self) -> bool {
        self.source.is_some()
    }

    /// All experts at once on a padded buffer: expert e processes row block e.
    ///
    /// x: `[E, C, d_model]` -> `[E, C, d_model]`
    pub fn forward_padded(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = x.clone().matmul(self.w_gate.val()); // [E, C, d_ff]
        let up = x.matmul(self.w_up.val()); // [E, C, d_ff]
        gated(gate, up).matmul(self.w_down.val()) // [E, C, d_model]
    }

    /// Some experts on padded blocks: block i goes to expert `ids[i]`. The weights are picked by
    /// `select`, whose backward pass is one scatter into a bank-sized gradient, not one per
    /// expert.
    ///
    /// x: `[n, C, d_model]`; ids: `[n]` -> `[n, C, d_model]`
    pub fn forward_subset(&self, x: Tensor<3>, ids: Tensor<1, Int>) -> Tensor<3> {
        let pick = |w: &Param<Tensor<3>>| w.val().select(0, ids.clone());
        let gate = x.clone().matmul(pick(&self.w_gate)); // [n, C, d_ff]
        let up = x.matmul(pick(&self.w_up)); // [n, C, d_ff]
        gated(gate, up).matmul(pick(&self.w_down)) // [n, C, d_model]
    }

    /// Each expert on its own contiguous run of rows, with no padding: rows
    /// `offset_e .. offset_e + counts[e]` go to expert e. Exact work, one matmul chain per
    /// non-empty expert; meant for inference, where slicing the stacked weights costs nothing
    /// in the backward pass. On a host CPU backend outside autodiff, the chains run side by
    /// side, one core each ([`map_on_cores`]).
    ///
    /// x: `[sum(counts), d_model]` -> `[sum(counts), d_model]`
    ///
    /// # Panics
    /// On an autodiff device: slicing one expert out of the stacked weights costs a bank-sized
    /// gradient per expert in the backward pass (`O(E^2 d f)`); training uses
    /// [`ExpertLayout::Tiered`](crate::dispatch::ExpertLayout::Tiered) instead.
    pub fn forward_segments(&self, x: Tensor<2>, counts: &[usize]) -> Tensor<2> {
        assert!(
            !x.device().is_autodiff(),
            "expert segments are inference-only: on an autodiff device use ExpertCompute::Auto \
             or Padded"
        );
        let [_, d, f] = self.dims();
        if self.source.is_none() {
            // Lazily initialised weights are drawn here, once, rather than by several chains
            // at the same time (each would draw its own).
            for w in [&self.w_gate, &self.w_up, &self.w_down] {
                let _ = w.val();
            }
        }
        let starts = counts.iter().scan(0, |next, &c| {
            *next += c;
            Some(*next - c)
        });
        let runs: Vec<(usize, Range<usize>)> = starts
            .zip(counts)
            .enumerate()
            .filter(|(_, (_, c))| **c > 0)
            .map(|(i, (start, c))| (i, start..start + c))
            .collect();

        let chain =
            |(i, rows): &(usize, Range<usize>)| self.chain(*i, x.clone().slice(rows.clone()));
        // Chains whose matmuls all stay below flex's own threshold for splitting one (a decode
        // step's rows) run the calling thread's share inline; larger ones hand it to a pool of
        // one thread, so that its matmuls do not compete with the other cores' chains.
        let most = runs.iter().map(|(_, rows)| rows.len()).max().unwrap_or(0);
        let share = if most * d * f < INLINE_MAX_MACS {
            CallerShare::Inline
        } else {
            CallerShare::Pooled
        };
        let outputs: Vec<Tensor<2>> = if runs_on_host(&x.device()) {
            longest_first(&runs, |runs| map_on_cores(runs, share, chain))
        } else {
            runs.iter().map(chain).collect()
        };
        match outputs.len() {
            0 => x.zeros_like(),
            _ => Tensor::cat(outputs, 0),
        }
    }

    /// Expert i on its rows.
    ///
    /// rows: `[n, d_model]` -> `[n, d_model]`
    fn chain(&self, i: usize, rows: Tensor<2>) -> Tensor<2> {
        self.expert(i, &rows.device()).forward(rows)
    }

    /// Expert i's weights: from the source of a paged bank, else sliced out of the stacked
    /// parameters (views, in the bank's order).
    pub fn expert(&self, i: usize, device: &Device) -> ExpertWeights {
        if let Some(source) = &self.source {
            return source.expert(i, device);
        }
        let slice = |w: &Param<Tensor<3>>| {
            let w = match self.order {
                WeightOrder::InOut => w.val(),
                WeightOrder::OutIn => w.val().swap_dims(1, 2),
            };
            let [_, a, b] = w.dims();
            w.slice(i..i + 1).reshape([a, b])
        };
        ExpertWeights {
            w_gate: slice(&self.w_gate),
            w_up: slice(&self.w_up),
            w_down: slice(&self.w_down),
            order: self.order,
        }
    }

    /// How the bank's parameters sit in memory.
    pub fn order(&self) -> WeightOrder {
        self.order
    }

    /// The bank with its parameters copied into `order`, keeping their ids, dtype and logical
    /// shapes: the function is unchanged, and the bank saves and loads as before.
    /// [`WeightOrder::OutIn`] speeds up inference with large experts (see
    /// [`OUT_IN_MIN_ELEMENTS`]) on a host CPU; training and autodiff devices
    /// keep [`WeightOrder::InOut`] (an optimizer step writes `[in, out]` tensors again, which
    /// stays correct, only slower). Returned as it is: a paged bank, and a bank whose dtype
    /// `gemm` does not read through strides (bf16, which flex copies to contiguous on every
    /// matmul, and quantised banks, whose blocks run along the last dimension).
    pub fn with_order(mut self, order: WeightOrder) -> Self {
        // A paged bank's parameters stay lazy: reading one would allocate the whole bank.
        if self.source.is_some() {
            return self;
        }
        let strided = matches!(
            self.w_gate.val().dtype(),
            DType::F32 | DType::F64 | DType::F16
        );
        if !strided {
            return self;
        }
        let relay = |w: Param<Tensor<3>>| w.map(|value| relaid(value, order));
        self.w_gate = relay(self.w_gate);
        self.w_up = relay(self.w_up);
        self.w_down = relay(self.w_down);
        self.order = order;
        self
    }
}

/// A copy of `value` laid out in `order`: `[E, a, b]` contiguous, or a transposed view of a
/// contiguous `[E, b, a]` buffer; same dtype, device and logical shape.
fn relaid(value: Tensor<3>, order: WeightOrder) -> Tensor<3> {
    let options = (&value.device(), value.dtype());
    match order {
        WeightOrder::InOut => Tensor::from_data(value.into_data(), options),
        WeightOrder::OutIn => {
            Tensor::<3>::from_data(value.swap_dims(1, 2).into_data(), options).swap_dims(1, 2)
        }
    }
}

/// `run` over `runs` taken longest first, its results back in the order of `runs`. The cores
/// take the chains in turn, so the longest going first leaves the short ones to even out the
/// cores' finishing times (longest processing time first), where in the experts' order a long
/// chain taken last keeps one core busy while the others wait.
fn longest_first<R>(
    runs: &[(usize, Range<usize>)],
    run: impl FnOnce(&[(usize, Range<usize>)]) -> Vec<R>,
) -> Vec<R> {
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by_key(|&j| std::cmp::Reverse(runs[j].1.len()));
    let sorted: Vec<_> = order.iter().map(|&j| runs[j].clone()).collect();
    let mut out: Vec<(usize, R)> = order.into_iter().zip(run(&sorted)).collect();
    out.sort_unstable_by_key(|(j, _)| *j);
    out.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The runs reach `run` longest first, and its results come back in the runs' order.
        #[test]
        fn longest_first_restores_the_order(lens in proptest::collection::vec(1usize..50, 0..12)) {
            let runs: Vec<(usize, Range<usize>)> =
                lens.iter().enumerate().map(|(i, &n)| (i, 0..n)).collect();
            let mut seen = Vec::new();
            let out = longest_first(&runs, |sorted| {
                seen = sorted.iter().map(|(_, r)| r.len()).collect();
                sorted.iter().map(|(i, _)| *i).collect()
            });
            prop_assert!(seen.windows(2).all(|w| w[0] >= w[1]), "{seen:?}");
            prop_assert_eq!(out, (0..runs.len()).collect::<Vec<_>>());
        }
    }
}
