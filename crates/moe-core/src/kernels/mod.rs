//! Host SIMD kernels for inference on flex: the products of a decode step, and SwiGLU's gate.
//!
//! Decoding multiplies each weight by a few rows and each cached key by one query. gemm, built
//! for large tiles, runs those at a fraction of the memory bandwidth (docs/benchmarks.md); these
//! kernels stream every weight row and cached key once for all rows, on every core. Element-wise
//! work that Burn composes from several ops runs as one pass. All are vectorised for the CPU
//! found at run time (pulp: AVX-512, else AVX2 and FMA on x86-64, NEON on aarch64, scalar
//! elsewhere). They read flex tensors in place ([`HostF32`]) and work on slices; every other
//! backend, dtype and autodiff keeps Burn's ops.
//!
//! - [`swiglu_out_in`]: one expert in [`WeightOrder::OutIn`](crate::WeightOrder) on
//!   [`SWIGLU_MIN_ROWS`] to [`SWIGLU_MAX_ROWS`] rows (batched decoding, short prompts), used by
//!   [`ExpertWeights::forward`](crate::ExpertWeights).
//! - [`decode_attention`]: one new query per row against its row's cached keys and values,
//!   held in f32 or f16 ([`HostElement`]). Its scores take the keys 8 at a time with AVX2
//!   intrinsics where the CPU has them and the head width is a multiple of 8 (`scores`): a
//!   horizontal sum of 8 registers at once, which pulp cannot express.
//! - [`prefill_attention`]: a prompt's queries against the cache, causal, in blocks that skip
//!   the keys above the diagonal.
//! - [`rotate_half`]: rotary position embedding (Llama's half-rotation layout) in one pass, used
//!   by `moe-model`'s attention for queries and keys.
//! - [`silu_mul`]: SwiGLU's gate, `silu(gate) * up`, in one pass (any number of rows), used by
//!   every SwiGLU block through [`gated`](crate::ffn::gated).
//! - [`matmul`] and [`linear_forward`]: gemm's product written straight into its output (flex's
//!   own allocates it twice and copies it once), used by the experts, the dense SwiGLU blocks and
//!   the attention projections; [`linear_on_cores`] splits a decode step's linear layer by its
//!   weight rows among the cores.
//! - [`rms_norm`]: RMSNorm in one pass over each row, used by every norm of `moe-model`'s
//!   transformer.

mod attention;
mod dot;
mod exp;
mod gated;
mod host;
mod linear;
mod norm;
mod prefill;
mod rotary;
mod scores;
mod swiglu;

pub use attention::{KvRows, decode_attention};
use dot::against_rows;
pub use dot::dots;
pub use exp::exp;
use gated::silu;
pub use gated::{silu_mul, silu_mul_tensor};
pub use host::{Host, HostElement, HostF32, host_tensor};
pub use linear::{SPLIT_MIN_WEIGHTS, linear_forward, linear_on_cores, matmul};
pub use norm::{rms_norm, rms_norm_rows};
pub use prefill::{PrefillShape, prefill_attention};
pub use rotary::{rotary_tensor, rotate_half};
pub use swiglu::{SWIGLU_MAX_ROWS, SWIGLU_MIN_ROWS, swiglu_out_in, swiglu_tensor};

use std::sync::OnceLock;

use rayon::prelude::*;

/// The instruction set of this CPU, detected once.
pub fn arch() -> pulp::Arch {
    static ARCH: OnceLock<pulp::Arch> = OnceLock::new();
    *ARCH.get_or_init(pulp::Arch::new)
}

/// `f(i, chunk)` on each `size`-element chunk of `out` (the last may be shorter): split across
/// the current rayon pool's threads, or in turn where this thread's work must stay on it
/// ([`crate::host::alone`]: a share of [`crate::host::map_on_cores`], whose other cores are
/// busy with the other shares).
fn each_chunk<T: Send>(out: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if crate::host::alone() {
        out.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        out.par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}
