//! RMSNorm, `x / sqrt(mean(x²) + ε) * γ` for each row, in one pass.

use burn::nn::RmsNorm;
use burn::prelude::*;
use pulp::{Simd, WithSimd};

use super::{HostF32, arch, dots, each_chunk, host_tensor};

/// Elements per task (whole rows, at least one): enough to amortise a task, few enough to share
/// a decode step's rows across cores.
const CHUNK: usize = 1 << 14;

/// `norm.forward(x)`: on a contiguous f32 flex tensor outside autodiff one pass over each row
/// ([`rms_norm_rows`]); elsewhere Burn's composition, a square, a mean, a division and a
/// product, each a pass over memory and a new tensor (4-5% of the time of
/// 16 prompts of 1024 tokens on flex, docs/benchmarks.md).
///
/// x: `[.., d]` -> `[.., d]`
pub fn rms_norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    let gamma = norm.gamma.val();
    let fused = || {
        let (h, g) = (HostF32::of(&x)?, HostF32::of(&gamma)?);
        let (h, g) = (h.contiguous()?, g.contiguous()?);
        (x.dims()[D - 1] == g.len() && !g.is_empty())
            .then(|| host_tensor(rms_norm_rows(h, g, norm.epsilon), x.dims()))
    };
    fused().unwrap_or_else(|| norm.forward(x))
}

/// Each row of `x` (rows of `gamma.len()` values) divided by its root mean square plus
/// `epsilon` under the root, times `gamma`; split across the current rayon pool's threads
/// (unless [`crate::host::alone`]).
///
/// # Panics
/// If `gamma` is empty or `x` is not whole rows of it.
pub fn rms_norm_rows(x: &[f32], gamma: &[f32], epsilon: f64) -> Vec<f32> {
    let d = gamma.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "rms_norm_rows: {} values are not rows of {d}",
        x.len()
    );
    let (rows, epsilon) = ((CHUNK / d).max(1), epsilon as f32);
    let mut out = vec![0.0; x.len()];
    each_chunk(&mut out, rows * d, |i, out| {
        let x = &x[i * rows * d..][..out.len()];
        arch().dispatch(Rms {
            x,
            gamma,
            epsilon,
            out,
        })
    });
    out
}

/// [`rms_norm_rows`] on whole rows.
struct Rms<'a> {
    x: &'a [f32],
    gamma: &'a [f32],
    epsilon: f32,
    out: &'a mut [f32],
}

impl WithSimd for Rms<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> Self::Output {
        let d = self.gamma.len();
        for (x, out) in self.x.chunks_exact(d).zip(self.out.chunks_exact_mut(d)) {
            let [[squares]] = dots(s, [x], [x]);
            let scale = 1.0 / (squares / d as f32 + self.epsilon).sqrt();
            for ((out, x), g) in out.iter_mut().zip(x).zip(self.gamma) {
                *out = x * scale * g;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::RmsNormConfig;
    use burn::tensor::{Distribution, TensorData};
    use proptest::prelude::*;

    proptest! {
        /// Any row width and count, across task boundaries and vector tails: the f64 norm.
        #[test]
        fn rms_norm_rows_matches_f64(
            (d, x, gamma) in (1usize..300, 0usize..80).prop_flat_map(|(d, n)| (
                Just(d),
                proptest::collection::vec(-10.0f32..10.0, n * d),
                proptest::collection::vec(-2.0f32..2.0, d),
            )),
            epsilon in prop_oneof![Just(1e-5), Just(1e-6), 0.0f64..1.0],
        ) {
            let got = rms_norm_rows(&x, &gamma, epsilon);
            prop_assert_eq!(got.len(), x.len());
            for (r, row) in x.chunks_exact(d).enumerate() {
                let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
                let scale = 1.0 / (ms + epsilon).sqrt();
                for (j, v) in row.iter().enumerate() {
                    let want = *v as f64 * scale * gamma[j] as f64;
                    let o = got[r * d + j] as f64;
                    prop_assert!((o - want).abs() <= 1e-5 * (1.0 + want.abs()), "{o} vs {want}");
                }
            }
        }
    }

    /// Every backend, 3D input, a trained-looking gamma: the same as `RmsNorm::forward`.
    #[rstest::rstest]
    fn rms_norm_equals_forward(#[values("flex", "ndarray", "wgpu")] backend: &str) {
        let Some(device) = crate::testing::test_device(backend) else {
            return;
        };
        let mut norm = RmsNormConfig::new(96).with_epsilon(1e-5).init(&device);
        let gamma = (0..96).map(|i| 0.5 + i as f32 / 96.0).collect::<Vec<_>>();
        norm.gamma = norm
            .gamma
            .map(|_| Tensor::from_data(TensorData::new(gamma, [96]), &device));
        let x = Tensor::<3>::random([2, 37, 96], Distribution::Normal(0.0, 3.0), &device);
        let (got, want) = (rms_norm(&norm, x.clone()), norm.forward(x));
        let (got, want) = (crate::testing::values(got), crate::testing::values(want));
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
}
