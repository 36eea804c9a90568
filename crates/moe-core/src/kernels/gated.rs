//! SwiGLU's gate, `silu(gate) * up`, in one vectorised pass.

use super::{HostF32, arch, each_chunk, exp, host_tensor};
use burn::prelude::*;
use pulp::{Simd, WithSimd};

/// Elements per task: enough to amortise a task, few enough to share a decode step's hidden
/// states across cores.
const CHUNK: usize = 1 << 14;

/// `silu(gate) * up` element by element, split across the current rayon pool's threads
/// (unless [`crate::host::alone`]).
///
/// Burn composes it from three element-wise ops (`sigmoid` through the C library's `expf`, then
/// two products), each a pass over memory and a new tensor; on a `[512, 1024]` expert hidden
/// state that was a sixth of the expert's time on flex (docs/benchmarks.md).
///
/// # Panics
/// If `gate` and `up` differ in length.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: gate and up differ in length"
    );
    let mut out = vec![0.0; gate.len()];
    each_chunk(&mut out, CHUNK, |i, out| {
        let at = i * CHUNK..i * CHUNK + out.len();
        let (gate, up) = (&gate[at.clone()], &up[at]);
        arch().dispatch(SiluMul { gate, up, out })
    });
    out
}

/// [`silu_mul`] on two f32 flex tensors of one shape, both contiguous; `None` otherwise (other
/// backends, dtypes, autodiff, strided views), where Burn's ops run instead.
///
/// gate, up: `[..]` -> `[..]`
pub fn silu_mul_tensor<const D: usize>(gate: &Tensor<D>, up: &Tensor<D>) -> Option<Tensor<D>> {
    if gate.dims() != up.dims() {
        return None;
    }
    let (g, u) = (HostF32::of(gate)?, HostF32::of(up)?);
    let out = silu_mul(g.contiguous()?, u.contiguous()?);
    Some(host_tensor(out, gate.dims()))
}

/// `out = silu(gate) * up` on one chunk; a plain loop that the compiler vectorises under the
/// dispatched instruction set ([`exp`] is arithmetic only).
struct SiluMul<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    out: &'a mut [f32],
}

impl WithSimd for SiluMul<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> Self::Output {
        for ((out, g), u) in self.out.iter_mut().zip(self.gate).zip(self.up) {
            *out = silu(*g) * u;
        }
    }
}

/// `x * sigmoid(x)`, with the inlined [`exp`] rather than a call to the C library's.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any length, across chunk boundaries and vector tails, and arguments far enough out
        /// that `exp` clamps.
        #[test]
        fn silu_mul_matches_f64(
            v in (0usize..40_000).prop_flat_map(|n| proptest::collection::vec((-100.0f32..100.0, -4.0f32..4.0), n))
        ) {
            let (gate, up): (Vec<f32>, Vec<f32>) = v.into_iter().unzip();
            let got = silu_mul(&gate, &up);
            prop_assert_eq!(got.len(), gate.len());
            for ((o, g), u) in got.iter().zip(&gate).zip(&up) {
                let (g, u) = (*g as f64, *u as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                prop_assert!((*o as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{o} vs {want}");
            }
        }
    }
}
