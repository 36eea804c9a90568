//! The micro-kernel every host kernel builds on.

use pulp::Simd;

/// `out[w][r] = ws[w] · xs[r]`: W weight vectors against R input vectors, all of one length,
/// each vector loaded once for all the products it takes part in. Inline it into a
/// [`pulp::WithSimd`] body; W * R accumulators must fit the registers (W * R <= 8).
#[inline(always)]
pub fn dots<S: Simd, const W: usize, const R: usize>(
    s: S,
    ws: [&[f32]; W],
    xs: [&[f32]; R],
) -> [[f32; R]; W] {
    let len = xs.first().map_or(0, |x| x.len());
    debug_assert!(ws.iter().chain(&xs).all(|v| v.len() == len));
    let ws = ws.map(S::as_simd_f32s);
    let xs = xs.map(S::as_simd_f32s);
    let lanes = xs.first().map_or(0, |x| x.0.len());
    let mut acc = [[s.splat_f32s(0.0); R]; W];
    for i in 0..lanes {
        let x: [S::f32s; R] = core::array::from_fn(|r| xs[r].0[i]);
        for (acc, w) in acc.iter_mut().zip(&ws) {
            let w = w.0[i];
            for (acc, x) in acc.iter_mut().zip(x) {
                *acc = s.mul_add_f32s(w, x, *acc);
            }
        }
    }
    let mut out = [[0.0; R]; W];
    for (w, (out, acc)) in out.iter_mut().zip(acc).enumerate() {
        for (r, (out, acc)) in out.iter_mut().zip(acc).enumerate() {
            let tail: f32 = ws[w].1.iter().zip(xs[r].1).map(|(a, b)| a * b).sum();
            *out = s.reduce_sum_f32s(acc) + tail;
        }
    }
    out
}

/// `put(r, [ws[0] · x_r, ..])` for every row r of `x` (`[n, len]`), rows taken four at a time.
#[inline(always)]
pub(crate) fn against_rows<S: Simd, const W: usize>(
    s: S,
    ws: [&[f32]; W],
    x: &[f32],
    len: usize,
    mut put: impl FnMut(usize, [f32; W]),
) {
    let n = x.len() / len;
    let row = |r: usize| &x[r * len..(r + 1) * len];
    let mut r = 0;
    while r < n {
        let take = (n - r).min(4);
        match take {
            4 => emit(
                dots(s, ws, core::array::from_fn::<_, 4, _>(|k| row(r + k))),
                r,
                &mut put,
            ),
            3 => emit(
                dots(s, ws, core::array::from_fn::<_, 3, _>(|k| row(r + k))),
                r,
                &mut put,
            ),
            2 => emit(
                dots(s, ws, core::array::from_fn::<_, 2, _>(|k| row(r + k))),
                r,
                &mut put,
            ),
            _ => emit(dots(s, ws, [row(r)]), r, &mut put),
        }
        r += take;
    }
}

/// Hands a block of products to `put`, row by row.
#[inline(always)]
fn emit<const W: usize, const R: usize>(
    block: [[f32; R]; W],
    r0: usize,
    put: &mut impl FnMut(usize, [f32; W]),
) {
    (0..R).for_each(|r| put(r0 + r, core::array::from_fn(|w| block[w][r])));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::arch;
    use proptest::prelude::*;

    struct Block<'a, const W: usize, const R: usize>([&'a [f32]; W], [&'a [f32]; R]);

    impl<const W: usize, const R: usize> pulp::WithSimd for Block<'_, W, R> {
        type Output = [[f32; R]; W];
        fn with_simd<S: Simd>(self, s: S) -> Self::Output {
            dots(s, self.0, self.1)
        }
    }

    proptest! {
        /// Every product of a 2 x 3 block equals the plain dot product, for lengths with and
        /// without a tail past the last full register.
        #[test]
        fn dots_are_the_dot_products(
            (len, v) in (0usize..70).prop_flat_map(|len| {
                (Just(len), proptest::collection::vec(-2.0f32..2.0, 5 * len))
            })
        ) {
            let vecs: Vec<&[f32]> = (0..5).map(|i| &v[i * len..(i + 1) * len]).collect();
            let out = arch().dispatch(Block([vecs[0], vecs[1]], [vecs[2], vecs[3], vecs[4]]));
            for w in 0..2 {
                for r in 0..3 {
                    let want: f64 = vecs[w].iter().zip(vecs[2 + r]).map(|(a, b)| *a as f64 * *b as f64).sum();
                    prop_assert!((out[w][r] as f64 - want).abs() <= 1e-5 * (1.0 + len as f64));
                }
            }
        }
    }
}
