//! A bank of E SwiGLU experts stored as stacked parameters, so that all experts run as one batched
//! matmul (`[E, C, d] x [E, d, f]`) instead of E small layers.

use burn::module::Param;
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::activation::silu;

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

/// E SwiGLU experts: expert e computes `silu(x W_gate[e]) * (x W_up[e]) W_down[e]`.
#[derive(Module, Debug)]
pub struct Experts {
    /// Gate projections `[E, d_model, d_ff]`.
    pub w_gate: Param<Tensor<3>>,
    /// Up projections `[E, d_model, d_ff]`.
    pub w_up: Param<Tensor<3>>,
    /// Down projections `[E, d_ff, d_model]`.
    pub w_down: Param<Tensor<3>>,
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
        }
    }

    /// Parameters of the bank.
    pub fn num_params(&self) -> usize {
        3 * self.n_experts * self.d_model * self.d_ff
    }
}

impl Experts {
    /// Number of experts.
    pub fn n_experts(&self) -> usize {
        self.w_gate.shape().dims::<3>()[0]
    }

    /// All experts at once on a padded buffer: expert e processes row block e.
    ///
    /// x: `[E, C, d_model]` -> `[E, C, d_model]`
    pub fn forward_padded(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = silu(x.clone().matmul(self.w_gate.val())); // [E, C, d_ff]
        let up = x.matmul(self.w_up.val()); // [E, C, d_ff]
        (gate * up).matmul(self.w_down.val()) // [E, C, d_model]
    }

    /// Each expert on its own contiguous run of rows, with no padding: rows
    /// `offset_e .. offset_e + counts[e]` go to expert e. Exact work, one matmul chain per
    /// non-empty expert; meant for inference, where slicing the stacked weights costs nothing
    /// in the backward pass.
    ///
    /// x: `[sum(counts), d_model]` -> `[sum(counts), d_model]`
    pub fn forward_segments(&self, x: Tensor<2>, counts: &[usize]) -> Tensor<2> {
        let [e, d, f] = self.w_gate.shape().dims();
        let (w_gate, w_up, w_down) = (self.w_gate.val(), self.w_up.val(), self.w_down.val());
        let mut outputs = Vec::with_capacity(e);
        let mut offset = 0;
        for (i, &count) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
            let rows = x.clone().slice(offset..offset + count); // [count, d]
            let expert = |w: &Tensor<3>, a, b| w.clone().slice(i..i + 1).reshape([a, b]);
            let gate = silu(rows.clone().matmul(expert(&w_gate, d, f))); // [count, f]
            let up = rows.matmul(expert(&w_up, d, f)); // [count, f]
            outputs.push((gate * up).matmul(expert(&w_down, f, d))); // [count, d]
            offset += count;
        }
        match outputs.len() {
            0 => x.zeros_like(),
            _ => Tensor::cat(outputs, 0),
        }
    }
}
