//! The dense SwiGLU feed-forward block: `w_down(silu(w_gate x) * w_up x)`.
//!
//! Used for shared experts, for dense transformer blocks and as the reference an MoE layer with one
//! expert must reproduce.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;

use crate::kernels;

/// Configuration of a [`SwiGluFfn`].
#[derive(Config, Debug)]
pub struct SwiGluFfnConfig {
    /// Model width.
    pub d_model: usize,
    /// Hidden width of the gated projection.
    pub d_ff: usize,
}

/// A dense SwiGLU feed-forward block without biases (Llama/Mixtral style).
#[derive(Module, Debug)]
pub struct SwiGluFfn {
    /// Gate projection `[d_model, d_ff]`, passed through SiLU.
    pub w_gate: Linear,
    /// Up projection `[d_model, d_ff]`.
    pub w_up: Linear,
    /// Down projection `[d_ff, d_model]`.
    pub w_down: Linear,
}

impl SwiGluFfnConfig {
    /// Builds the block with Burn's default (Kaiming-uniform) initialisation.
    pub fn init(&self, device: &Device) -> SwiGluFfn {
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        SwiGluFfn {
            w_gate: linear(self.d_model, self.d_ff),
            w_up: linear(self.d_model, self.d_ff),
            w_down: linear(self.d_ff, self.d_model),
        }
    }

    /// Parameters of the block.
    pub fn num_params(&self) -> usize {
        3 * self.d_model * self.d_ff
    }
}

impl SwiGluFfn {
    /// Each projection runs [`kernels::linear_forward`] (gemm into its output on flex).
    ///
    /// x: `[..., d_model]` -> `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gate = kernels::linear_forward(&self.w_gate, x.clone()); // [..., d_ff]
        let up = kernels::linear_forward(&self.w_up, x); // [..., d_ff]
        kernels::linear_forward(&self.w_down, gated(gate, up))
    }
}

/// SwiGLU's hidden state, `silu(gate) * up`: one vectorised pass on flex f32 tensors outside
/// autodiff ([`kernels::silu_mul`]), Burn's ops everywhere else.
///
/// gate, up: `[..., d_ff]` -> `[..., d_ff]`
pub fn gated<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    kernels::silu_mul_tensor(&gate, &up).unwrap_or_else(|| silu(gate) * up)
}
