//! One SwiGLU expert on a few rows, its weights `[out, in]`.

use super::{HostF32, against_rows, arch, each_chunk, host_tensor, silu};
use burn::prelude::*;
use pulp::{Simd, WithSimd};

/// Rows from which [`swiglu_tensor`] runs an expert. One row is a matrix-vector product, which
/// flex already runs at the memory's speed (its gemv was 10-20% faster than this kernel's
/// single-row path, docs/benchmarks.md); from 2 rows gemm's tiles read each weight several
/// times, and at 2 to 4 rows this kernel took 1.4-2.4x less time.
pub const SWIGLU_MIN_ROWS: usize = 2;

/// Rows up to which [`swiglu_tensor`] runs an expert: each weight row is read once for all rows,
/// which beats gemm while a product is bound by reading the weights. Past 8 rows it becomes
/// bound by arithmetic, where gemm's tiles win (docs/benchmarks.md).
pub const SWIGLU_MAX_ROWS: usize = 8;

/// Weight rows per task: enough to amortise a task, few enough to share 1024 rows across cores.
const CHUNK: usize = 32;

/// `silu(x W_gate^T) * (x W_up^T) W_down^T` on `n` rows, the weights `[out, in]`, each weight row
/// streamed once for all rows, the output rows of each product split across the current rayon
/// pool's threads (unless [`crate::host::alone`]).
///
/// x: `[n, d]`; w_gate, w_up: `[f, d]`; w_down: `[d, f]` -> `[n, d]`
pub fn swiglu_out_in(
    x: &[f32],
    n: usize,
    w_gate: &[f32],
    w_up: &[f32],
    w_down: &[f32],
) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    let d = x.len() / n;
    let f = w_gate.len() / d.max(1);
    assert!(
        x.len() == n * d && w_gate.len() == f * d && w_up.len() == f * d && w_down.len() == d * f,
        "swiglu_out_in: x must be [n, d], w_gate and w_up [f, d], w_down [d, f]"
    );
    // hidden^T: [f, n], filled a chunk of weight rows at a time.
    let mut hidden_t = vec![0.0; f * n];
    each_chunk(&mut hidden_t, CHUNK * n, |c, out| {
        let rows = c * CHUNK..c * CHUNK + out.len() / n;
        let gate = &w_gate[rows.start * d..rows.end * d];
        let up = &w_up[rows.start * d..rows.end * d];
        arch().dispatch(GateUp {
            gate,
            up,
            x,
            d,
            n,
            out,
        });
    });
    let hidden = transposed(&hidden_t, f, n); // [n, f]
    let mut out_t = vec![0.0; d * n];
    each_chunk(&mut out_t, CHUNK * n, |c, out| {
        let rows = c * CHUNK..c * CHUNK + out.len() / n;
        let down = &w_down[rows.start * f..rows.end * f];
        arch().dispatch(Down {
            down,
            hidden: &hidden,
            f,
            n,
            out,
        });
    });
    transposed(&out_t, d, n)
}

/// An expert in [`WeightOrder::OutIn`](crate::WeightOrder) on `rows` with
/// [`swiglu_out_in`], when every tensor is an f32 flex tensor, the weights contiguous, and
/// there are [`SWIGLU_MIN_ROWS`] to [`SWIGLU_MAX_ROWS`] rows; `None` otherwise.
///
/// rows: `[n, d]`; w_gate, w_up: `[f, d]`; w_down: `[d, f]` -> `[n, d]`
pub fn swiglu_tensor(
    rows: &Tensor<2>,
    w_gate: &Tensor<2>,
    w_up: &Tensor<2>,
    w_down: &Tensor<2>,
) -> Option<Tensor<2>> {
    let [n, d] = rows.dims();
    if !(SWIGLU_MIN_ROWS..=SWIGLU_MAX_ROWS).contains(&n) {
        return None;
    }
    let x = HostF32::row_major(rows)?;
    let [g, u, dn] = [w_gate, w_up, w_down].map(HostF32::of);
    let out = swiglu_out_in(
        x.contiguous()?,
        n,
        g?.contiguous()?,
        u?.contiguous()?,
        dn?.contiguous()?,
    );
    Some(host_tensor(out, [n, d]))
}

/// `m` (`[a, b]`, row-major) transposed to `[b, a]`.
fn transposed(m: &[f32], a: usize, b: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for (i, row) in m.chunks_exact(b).enumerate() {
        for (j, v) in row.iter().enumerate() {
            t[j * a + i] = *v;
        }
    }
    t
}

/// `out[j, r] = silu(gate_j · x_r) * (up_j · x_r)` for a chunk of weight rows j.
struct GateUp<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    x: &'a [f32],
    d: usize,
    n: usize,
    out: &'a mut [f32],
}

impl WithSimd for GateUp<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> Self::Output {
        let (d, n) = (self.d, self.n);
        // The products first, then the gate in one pass that the compiler vectorises (per
        // product, `silu` was a scalar exponential after each pair of dot products).
        let mut ups = vec![0.0; self.out.len()];
        let pairs = self.gate.chunks_exact(d).zip(self.up.chunks_exact(d));
        let outs = self.out.chunks_exact_mut(n).zip(ups.chunks_exact_mut(n));
        for ((g, u), (out, up)) in pairs.zip(outs) {
            against_rows(s, [g, u], self.x, d, |r, [g, u]| {
                out[r] = g;
                up[r] = u;
            });
        }
        for (out, u) in self.out.iter_mut().zip(&ups) {
            *out = silu(*out) * u;
        }
    }
}

/// `out[o, r] = down_o · hidden_r` for a chunk of weight rows o, two at a time.
struct Down<'a> {
    down: &'a [f32],
    hidden: &'a [f32],
    f: usize,
    n: usize,
    out: &'a mut [f32],
}

impl WithSimd for Down<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> Self::Output {
        let (f, n) = (self.f, self.n);
        let mut pairs = self.down.chunks_exact(2 * f);
        let mut outs = self.out.chunks_exact_mut(2 * n);
        for (w, out) in (&mut pairs).zip(&mut outs) {
            let (a, b) = w.split_at(f);
            against_rows(s, [a, b], self.hidden, f, |r, [a, b]| {
                out[r] = a;
                out[n + r] = b;
            });
        }
        for (w, out) in pairs
            .remainder()
            .chunks_exact(f)
            .zip(outs.into_remainder().chunks_exact_mut(n))
        {
            against_rows(s, [w], self.hidden, f, |r, [v]| out[r] = v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The expert computed in f64, one product at a time.
    fn reference(x: &[f32], n: usize, g: &[f32], u: &[f32], dn: &[f32]) -> Vec<f64> {
        let d = x.len() / n;
        let f = g.len() / d;
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
        };
        let mut out = vec![0.0; n * d];
        for r in 0..n {
            let xr = &x[r * d..(r + 1) * d];
            let h: Vec<f32> = (0..f)
                .map(|j| {
                    let a = dot(&g[j * d..(j + 1) * d], xr);
                    (a / (1.0 + (-a).exp()) * dot(&u[j * d..(j + 1) * d], xr)) as f32
                })
                .collect();
            for o in 0..d {
                out[r * d + o] = dot(&dn[o * f..(o + 1) * f], &h);
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any row count, widths with and without register tails, odd output counts (the
        /// single-row remainder of the down projection), chunks that split unevenly.
        #[test]
        fn the_kernel_computes_the_expert(
            (n, d, f, v) in (1usize..11, 1usize..40, 1usize..80).prop_flat_map(|(n, d, f)| {
                (Just(n), Just(d), Just(f), proptest::collection::vec(-1.0f32..1.0, n * d + 3 * d * f))
            })
        ) {
            let (x, w) = v.split_at(n * d);
            let (g, w) = w.split_at(f * d);
            let (u, dn) = w.split_at(f * d);
            let got = swiglu_out_in(x, n, g, u, dn);
            let want = reference(x, n, g, u, dn);
            for (a, b) in got.iter().zip(&want) {
                prop_assert!((*a as f64 - b).abs() <= 1e-5 * (1.0 + (d * f) as f64).sqrt(), "{a} vs {b}");
            }
        }
    }
}
