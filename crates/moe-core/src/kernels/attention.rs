//! Decode attention: each row's new queries against the keys and values it has cached.

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::{HostF32, against_rows, arch, exp};

/// Cached keys (elements, all heads together) from which the heads are shared among threads:
/// below it waking a second thread costs more than the whole step (about 15 us against 3 at 16
/// positions of 2 heads; docs/benchmarks.md).
const PARALLEL_MIN_CACHED: usize = 1 << 15;

/// Cached keys or values, each position's `head_dim` values contiguous: those of batch row `b`,
/// key/value head `h`, position `t` start at `offset + b * strides[0] + h * strides[1] +
/// t * strides[2]` of `data` (a cache buffer longer than the positions filled, read in place).
#[derive(Debug, Clone, Copy)]
pub struct KvRows<'a> {
    /// The buffer.
    pub data: &'a [f32],
    /// Where position 0 of row 0, head 0 starts.
    pub offset: usize,
    /// Elements between batch rows, heads and positions.
    pub strides: [usize; 3],
    /// Values per position.
    pub head_dim: usize,
}

impl<'a> KvRows<'a> {
    /// The positions of `t`, `[batch, kv_heads, positions, head_dim]`, read in place; `None`
    /// unless each position's values are contiguous and the other strides non-negative.
    pub fn of(t: &'a HostF32, head_dim: usize) -> Option<Self> {
        let (data, offset, strides) = t.strided();
        let &[sb, sh, st, sd] = strides else {
            return None;
        };
        if sd != 1 && head_dim > 1 {
            return None;
        }
        let [Ok(sb), Ok(sh), Ok(st)] = [sb, sh, st].map(usize::try_from) else {
            return None;
        };
        let strides = [sb, sh, st];
        Some(Self {
            data,
            offset,
            strides,
            head_dim,
        })
    }

    /// Positions `ts` of batch row `b`, head `h`: the buffer from the first position's values
    /// to the last one's, and the elements between positions.
    ///
    /// # Panics
    /// If `ts` is empty or does not lie in the buffer.
    fn run(&self, b: usize, h: usize, ts: std::ops::Range<usize>) -> (&[f32], usize) {
        let [sb, sh, st] = self.strides;
        let start = self.offset + b * sb + h * sh + ts.start * st;
        let end = self.offset + b * sb + h * sh + (ts.end - 1) * st + self.head_dim;
        (&self.data[start..end], st)
    }

    fn at(&self, b: usize, h: usize, t: usize) -> &[f32] {
        self.run(b, h, t..t + 1).0
    }
}

/// The cached keys and values of batch row `b`, key/value head `h`.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeadKv<'a> {
    keys: KvRows<'a>,
    values: KvRows<'a>,
    b: usize,
    h: usize,
}

impl<'a> HeadKv<'a> {
    pub(super) fn new(keys: KvRows<'a>, values: KvRows<'a>, b: usize, h: usize) -> Self {
        Self { keys, values, b, h }
    }

    pub(super) fn head_dim(&self) -> usize {
        self.keys.head_dim
    }

    fn key(&self, t: usize) -> &[f32] {
        self.keys.at(self.b, self.h, t)
    }

    fn value(&self, t: usize) -> &[f32] {
        self.values.at(self.b, self.h, t)
    }

    /// Positions `ts` of the keys as one strided run: the buffer from the first position's
    /// values to the last one's, and the elements between positions (see [`KvRows::run`]).
    pub(super) fn key_run(&self, ts: std::ops::Range<usize>) -> (&[f32], usize) {
        self.keys.run(self.b, self.h, ts)
    }

    /// Positions `ts` of the values, as [`key_run`](Self::key_run).
    pub(super) fn value_run(&self, ts: std::ops::Range<usize>) -> (&[f32], usize) {
        self.values.run(self.b, self.h, ts)
    }
}

/// Scaled dot-product attention of `g` queries per key/value head (grouped-query attention,
/// query head `h * g + i` reading key/value head `h`), each batch row against its positions
/// `first[b]..total` (the earlier ones are left padding; all from 0 when `first` is `None`).
/// Keys are streamed once for all `g` queries, the softmax exponentials vectorised, and the
/// `batch * kv_heads` heads shared among the current rayon pool's threads once the cache is
/// large enough to pay for it.
///
/// q: `[batch, kv_heads, g, head_dim]` (row-major) -> `[batch, kv_heads, g, head_dim]`
pub fn decode_attention(
    q: &[f32],
    [_, kv_heads, g, head_dim]: [usize; 4],
    keys: KvRows,
    values: KvRows,
    total: usize,
    first: Option<&[usize]>,
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![0.0; q.len()];
    let run = |(i, out): (usize, &mut [f32])| {
        let (b, h) = (i / kv_heads, i % kv_heads);
        let start = first.map_or(0, |f| f[b]).min(total);
        let q = &q[i * g * head_dim..(i + 1) * g * head_dim];
        let head = Head {
            q,
            kv: HeadKv::new(keys, values, b, h),
            positions: start..total,
            g,
            scale,
            out,
        };
        arch().dispatch(head);
    };
    let cached = (q.len() / (g * head_dim).max(1)) * total * head_dim;
    if cached < PARALLEL_MIN_CACHED {
        out.chunks_mut(g * head_dim).enumerate().for_each(run);
    } else {
        out.par_chunks_mut(g * head_dim).enumerate().for_each(run);
    }
    out
}

/// One key/value head with its group of queries.
struct Head<'a> {
    q: &'a [f32],
    kv: HeadKv<'a>,
    positions: std::ops::Range<usize>,
    g: usize,
    scale: f32,
    out: &'a mut [f32],
}

impl WithSimd for Head<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> Self::Output {
        let (g, hd, n) = (self.g, self.kv.head_dim(), self.positions.len());
        // Scores, then probabilities, [g, n].
        let mut p = vec![0.0f32; g * n];
        for (col, t) in self.positions.clone().enumerate() {
            let key = self.kv.key(t);
            against_rows(s, [key], self.q, hd, |i, [v]| {
                p[i * n + col] = v * self.scale
            });
        }
        let mut norm = vec![0.0f32; g];
        for (row, norm) in p.chunks_exact_mut(n.max(1)).zip(&mut norm) {
            *norm = shifted_exp(s, row);
        }
        self.out.fill(0.0);
        for (col, t) in self.positions.clone().enumerate() {
            let value = self.kv.value(t);
            for (i, out) in self.out.chunks_exact_mut(hd).enumerate() {
                axpy(s, p[i * n + col], value, out);
            }
        }
        for (out, norm) in self.out.chunks_exact_mut(hd).zip(norm) {
            out.iter_mut().for_each(|x| *x *= norm);
        }
    }
}

/// `row` replaced by `e^(x - max(row))`, the softmax before its normalisation; returns
/// `1 / sum`, by which the caller scales the row or what the row weighs.
#[inline(always)]
pub(super) fn shifted_exp<S: Simd>(s: S, row: &mut [f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    1.0 / sum(s, row)
}

/// The sum of `xs`.
#[inline(always)]
fn sum<S: Simd>(s: S, xs: &[f32]) -> f32 {
    let (head, tail) = S::as_simd_f32s(xs);
    let acc = head
        .iter()
        .fold(s.splat_f32s(0.0), |acc, x| s.add_f32s(acc, *x));
    s.reduce_sum_f32s(acc) + tail.iter().sum::<f32>()
}

/// `out += a * x`.
#[inline(always)]
fn axpy<S: Simd>(s: S, a: f32, x: &[f32], out: &mut [f32]) {
    let (out_head, out_tail) = S::as_mut_simd_f32s(out);
    let (x_head, x_tail) = S::as_simd_f32s(x);
    let a_s = s.splat_f32s(a);
    for (o, x) in out_head.iter_mut().zip(x_head) {
        *o = s.mul_add_f32s(a_s, *x, *o);
    }
    for (o, x) in out_tail.iter_mut().zip(x_tail) {
        *o += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Attention in f64, one query at a time.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        dims: [usize; 4],
        k: KvRows,
        v: KvRows,
        total: usize,
        first: &[usize],
        scale: f32,
    ) -> Vec<f64> {
        let [_, kvh, g, hd] = dims;
        let mut out = vec![0.0; q.len()];
        for (bi, &start) in first.iter().enumerate() {
            for h in 0..kvh {
                for i in 0..g {
                    let at = ((bi * kvh + h) * g + i) * hd;
                    let qi = &q[at..at + hd];
                    let cols = start..total;
                    let scores: Vec<f64> = cols
                        .clone()
                        .map(|t| {
                            k.at(bi, h, t)
                                .iter()
                                .zip(qi)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = w.iter().sum();
                    for (t, w) in cols.zip(&w) {
                        for (o, x) in out[at..at + hd].iter_mut().zip(v.at(bi, h, t)) {
                            *o += w / z * *x as f64;
                        }
                    }
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Keys and values read through a cache buffer with spare capacity, any group size and
        /// head width, and left padding per row.
        #[test]
        fn the_kernel_computes_attention(
            (b, kvh, g, hd, total, spare, v, first) in (1usize..4, 1usize..3, 1usize..7, 1usize..20, 1usize..40, 0usize..5)
                .prop_flat_map(|(b, kvh, g, hd, total, spare)| {
                    let cap = total + spare;
                    (Just(b), Just(kvh), Just(g), Just(hd), Just(total), Just(spare),
                     proptest::collection::vec(-2.0f32..2.0, b * kvh * g * hd + 2 * b * kvh * cap * hd),
                     proptest::collection::vec(0..total, b))
                })
        ) {
            let cap = total + spare;
            let (q, kv) = v.split_at(b * kvh * g * hd);
            let (kd, vd) = kv.split_at(b * kvh * cap * hd);
            let rows = |data| KvRows { data, offset: 0, strides: [kvh * cap * hd, cap * hd, hd], head_dim: hd };
            let dims = [b, kvh, g, hd];
            let scale = 1.0 / (hd as f32).sqrt();
            let got = decode_attention(q, dims, rows(kd), rows(vd), total, Some(&first), scale);
            let want = reference(q, dims, rows(kd), rows(vd), total, &first, scale);
            for (a, b) in got.iter().zip(&want) {
                prop_assert!((*a as f64 - b).abs() <= 1e-5, "{a} vs {b}");
            }
        }
    }
}
