//! Attention scores of a group of queries against a block of cached keys.

use pulp::Simd;

use super::against_rows;

/// `len` rows (keys or values) of `width` values, `stride` elements apart.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rows<'a> {
    pub(super) data: &'a [f32],
    pub(super) stride: usize,
    pub(super) len: usize,
    pub(super) width: usize,
}

impl<'a> Rows<'a> {
    /// Row `j`.
    #[inline(always)]
    pub(super) fn row(&self, j: usize) -> &'a [f32] {
        &self.data[j * self.stride..][..self.width]
    }
}

/// `p[i * n + j] = scale * q_i · key_j` for each query row `q_i` of `q` (`[g, keys.width]`)
/// and each key; `p` starts at the block's first column of query row 0, and row `i`'s columns
/// at `i * n`.
///
/// On x86-64 with AVX2 and FMA, and a head width that is a multiple of 8, the keys go 8 at a
/// time: 8 accumulators per query, then their 8 horizontal sums together (`vhaddps`) into one
/// register of 8 scores, instead of a horizontal sum per key and query.
#[inline(always)]
pub(super) fn scores<S: Simd>(s: S, q: &[f32], keys: Rows, scale: f32, p: &mut [f32], n: usize) {
    let done = eight_at_a_time(q, keys, scale, p, n);
    for j in done..keys.len {
        against_rows(s, [keys.row(j)], q, keys.width, |i, [a]| {
            p[i * n + j] = a * scale
        });
    }
}

/// The scores of the first keys, 8 at a time, where this CPU and head width allow; returns how
/// many keys it scored.
#[inline(always)]
fn eight_at_a_time(q: &[f32], keys: Rows, scale: f32, p: &mut [f32], n: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if keys.width.is_multiple_of(8)
        && keys.width > 0
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { x86::scores8(q, keys, scale, p, n) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (q, keys, scale, p, n);
    0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_fmadd_ps, _mm256_hadd_ps, _mm256_loadu_ps, _mm256_mul_ps,
        _mm256_permute2f128_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };

    use super::Rows;

    /// [`super::scores`] for the keys in whole groups of 8; returns how many it scored.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    ///
    /// # Panics
    /// If `keys.width` is not a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores8(
        q: &[f32],
        keys: Rows,
        scale: f32,
        p: &mut [f32],
        n: usize,
    ) -> usize {
        let width = keys.width;
        assert!(width.is_multiple_of(8), "a head width of whole registers");
        let full = keys.len / 8 * 8;
        let scale = _mm256_set1_ps(scale);
        for j0 in (0..full).step_by(8) {
            let key: [&[f32]; 8] = core::array::from_fn(|k| keys.row(j0 + k));
            for (i, q) in q.chunks_exact(width).enumerate() {
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in (0..width).step_by(8) {
                    // SAFETY: c + 8 <= width, the length of `q` and of every key.
                    let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(c)) };
                    for (acc, key) in acc.iter_mut().zip(&key) {
                        // SAFETY: as above.
                        let kv = unsafe { _mm256_loadu_ps(key.as_ptr().add(c)) };
                        *acc = _mm256_fmadd_ps(qv, kv, *acc);
                    }
                }
                let out = &mut p[i * n + j0..][..8];
                // SAFETY: `out` holds 8 floats.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(scale, sum8(acc))) };
            }
        }
        full
    }

    /// `[Σ a[0], Σ a[1], .., Σ a[7]]`, each the sum of one register's 8 lanes.
    #[inline]
    #[target_feature(enable = "avx")]
    fn sum8(a: [__m256; 8]) -> __m256 {
        // [a0 01, a0 23, a1 01, a1 23 | a0 45, a0 67, a1 45, a1 67], and so on.
        let t = [0, 2, 4, 6].map(|k| _mm256_hadd_ps(a[k], a[k + 1]));
        // [a0 0-3, a1 0-3, a2 0-3, a3 0-3 | a0 4-7, a1 4-7, a2 4-7, a3 4-7], and a4-a7.
        let (u0, u1) = (_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::arch;
    use proptest::prelude::*;

    struct Scores<'a>(&'a [f32], Rows<'a>, &'a mut [f32], usize);

    impl pulp::WithSimd for Scores<'_> {
        type Output = ();
        fn with_simd<S: Simd>(self, s: S) {
            scores(s, self.0, self.1, 0.5, self.2, self.3)
        }
    }

    /// The 8-key path takes every whole group of 8 keys where the CPU has AVX2 and FMA, and
    /// nothing for head widths that are not whole registers or on other CPUs.
    #[test]
    fn whole_groups_of_eight_keys_take_the_fast_path() {
        #[cfg(target_arch = "x86_64")]
        let fast = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let fast = false;
        for (width, len, want) in [(64, 21, 16), (8, 8, 8), (64, 7, 0), (12, 21, 0)] {
            let q = vec![1.0; 2 * width];
            let data = vec![1.0; len * width];
            let keys = Rows {
                data: &data,
                stride: width,
                len,
                width,
            };
            let mut p = vec![0.0; 2 * len];
            let done = eight_at_a_time(&q, keys, 1.0, &mut p, len);
            assert_eq!(
                done,
                if fast { want } else { 0 },
                "width {width}, {len} keys"
            );
            assert!(p[..done].iter().all(|&x| x == width as f32));
        }
    }

    proptest! {
        /// Every score equals the plain dot product, for head widths that take the 8-key path
        /// and widths that do not, numbers of keys with and without a remainder past the last
        /// group of 8, and keys with gaps between them.
        #[test]
        fn scores_are_the_scaled_dot_products(
            (g, width, len, gap, v) in (1usize..6, prop_oneof![1usize..20, Just(64), Just(128)], 0usize..40, 0usize..3)
                .prop_flat_map(|(g, width, len, gap)| {
                    (Just(g), Just(width), Just(len), Just(gap),
                     proptest::collection::vec(-2.0f32..2.0, g * width + len * (width + gap)))
                })
        ) {
            let (q, data) = v.split_at(g * width);
            let keys = Rows { data, stride: width + gap, len, width };
            let n = len + 3;
            let mut p = vec![f32::NAN; g * n];
            arch().dispatch(Scores(q, keys, &mut p, n));
            for i in 0..g {
                for j in 0..len {
                    let want: f64 = q[i * width..(i + 1) * width].iter().zip(keys.row(j))
                        .map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * 0.5;
                    let got = p[i * n + j] as f64;
                    prop_assert!((got - want).abs() <= 1e-5 * (1.0 + width as f64), "{got} vs {want}");
                }
                prop_assert!(p[i * n + len..(i + 1) * n].iter().all(|x| x.is_nan()), "wrote past the keys");
            }
        }
    }
}
