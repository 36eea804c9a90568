//! Decode attention: each row's new queries against the keys and values it has cached.

use pulp::{Simd, WithSimd};

use super::host::{Host, HostElement};
use super::scores::{Rows, scores};
use super::{arch, exp};
use crate::host::{CallerShare, map_on_cores};

/// Cached keys (elements, all heads together) from which the heads are shared among the cores
/// ([`map_on_cores`], whose workers stay awake through a decode step: about a microsecond to
/// hand a head over). Below it, at batch 1 under 256 positions (2 heads of 64), a head's work
/// is a few microseconds. (Handed to rayon's pool instead, whose threads sleep between a
/// decode step's matmuls, the heads cost more than they saved even at 1024 positions: the
/// model decoded at 74-77% of its speed at 16 positions with the heads shared, against 90-94%
/// on one thread; docs/benchmarks.md.)
const PARALLEL_MIN_CACHED: usize = 1 << 15;

/// Positions whose keys or values a decode step reads as one block: widened to f32 when the
/// cache holds f16, a block stays in the L1 cache (64 positions of 64 values: 16 KiB).
const KV_BLOCK: usize = 64;

/// Cached keys or values, each position's `head_dim` values contiguous: those of batch row `b`,
/// key/value head `h`, position `t` start at `offset + b * strides[0] + h * strides[1] +
/// t * strides[2]` of `data` (a cache buffer longer than the positions filled, read in place).
/// The elements are f32, or f16 for a cache kept in half precision (decode attention only).
#[derive(Debug, Clone, Copy)]
pub struct KvRows<'a, E = f32> {
    /// The buffer.
    pub data: &'a [E],
    /// Where position 0 of row 0, head 0 starts.
    pub offset: usize,
    /// Elements between batch rows, heads and positions.
    pub strides: [usize; 3],
    /// Values per position.
    pub head_dim: usize,
}

impl<'a, E: HostElement> KvRows<'a, E> {
    /// The positions of `t`, `[batch, kv_heads, positions, head_dim]`, read in place; `None`
    /// unless each position's values are contiguous and the other strides non-negative.
    pub fn of(t: &'a Host<E>, head_dim: usize) -> Option<Self> {
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
    fn run(&self, b: usize, h: usize, ts: std::ops::Range<usize>) -> (&'a [E], usize) {
        let [sb, sh, st] = self.strides;
        let start = self.offset + b * sb + h * sh + ts.start * st;
        let end = self.offset + b * sb + h * sh + (ts.end - 1) * st + self.head_dim;
        (&self.data[start..end], st)
    }

    #[cfg(test)]
    fn at(&self, b: usize, h: usize, t: usize) -> &'a [E] {
        self.run(b, h, t..t + 1).0
    }
}

/// The cached keys and values of batch row `b`, key/value head `h`.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeadKv<'a, E = f32> {
    keys: KvRows<'a, E>,
    values: KvRows<'a, E>,
    b: usize,
    h: usize,
}

impl<'a, E: HostElement> HeadKv<'a, E> {
    pub(super) fn new(keys: KvRows<'a, E>, values: KvRows<'a, E>, b: usize, h: usize) -> Self {
        Self { keys, values, b, h }
    }

    pub(super) fn head_dim(&self) -> usize {
        self.keys.head_dim
    }

    /// Positions `ts` of the keys as one strided run: the buffer from the first position's
    /// values to the last one's, and the elements between positions (see [`KvRows::run`]).
    pub(super) fn key_run(&self, ts: std::ops::Range<usize>) -> (&'a [E], usize) {
        self.keys.run(self.b, self.h, ts)
    }

    /// Positions `ts` of the values, as [`key_run`](Self::key_run).
    pub(super) fn value_run(&self, ts: std::ops::Range<usize>) -> (&'a [E], usize) {
        self.values.run(self.b, self.h, ts)
    }
}

/// Scaled dot-product attention of `g` queries per key/value head (grouped-query attention,
/// query head `h * g + i` reading key/value head `h`), each batch row against its positions
/// `first[b]..total` (the earlier ones are left padding; all from 0 when `first` is `None`).
/// Keys are streamed once for all `g` queries, in blocks of 64 positions that an f16
/// cache widens to f32 on the fly; the softmax exponentials are vectorised, and the
/// `batch * kv_heads` heads shared among the cores once the cache is large enough to pay for
/// it.
///
/// q: `[batch, kv_heads, g, head_dim]` (row-major) -> `[batch, kv_heads, g, head_dim]`
pub fn decode_attention<E: HostElement>(
    q: &[f32],
    [_, kv_heads, g, head_dim]: [usize; 4],
    keys: KvRows<E>,
    values: KvRows<E>,
    total: usize,
    first: Option<&[usize]>,
    scale: f32,
) -> Vec<f32> {
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
    let heads = q.len() / (g * head_dim).max(1);
    if heads * total * head_dim < PARALLEL_MIN_CACHED {
        let mut out = vec![0.0; q.len()];
        out.chunks_mut(g * head_dim).enumerate().for_each(run);
        return out;
    }
    let ids: Vec<usize> = (0..heads).collect();
    map_on_cores(&ids, CallerShare::Inline, |&i| {
        let mut out = vec![0.0; g * head_dim];
        run((i, &mut out));
        out
    })
    .concat()
}

/// One key/value head with its group of queries.
struct Head<'a, E> {
    q: &'a [f32],
    kv: HeadKv<'a, E>,
    positions: std::ops::Range<usize>,
    g: usize,
    scale: f32,
    out: &'a mut [f32],
}

impl<E: HostElement> Head<'_, E> {
    /// The positions in blocks of [`KV_BLOCK`], each with the column of its first position.
    fn blocks(&self) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + use<E> {
        let ps = self.positions.clone();
        (ps.start..ps.end)
            .step_by(KV_BLOCK)
            .map(move |t| (t - ps.start, t..(t + KV_BLOCK).min(ps.end)))
    }
}

impl<E: HostElement> WithSimd for Head<'_, E> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> Self::Output {
        let (g, hd, n) = (self.g, self.kv.head_dim(), self.positions.len());
        let mut wide = Vec::new();
        // Scores, then probabilities, [g, n].
        let mut p = vec![0.0f32; g * n];
        for (col0, ts) in self.blocks() {
            let keys = widened(self.kv.key_run(ts.clone()), ts.len(), hd, &mut wide);
            scores(s, self.q, keys, self.scale, &mut p[col0..], n);
        }
        let mut norm = vec![0.0f32; g];
        for (row, norm) in p.chunks_exact_mut(n.max(1)).zip(&mut norm) {
            *norm = shifted_exp(s, row);
        }
        self.out.fill(0.0);
        for (col0, ts) in self.blocks() {
            let values = widened(self.kv.value_run(ts.clone()), ts.len(), hd, &mut wide);
            for (i, out) in self.out.chunks_exact_mut(hd).enumerate() {
                weighted_sum(s, &p[i * n + col0..][..ts.len()], values, out);
            }
        }
        for (out, norm) in self.out.chunks_exact_mut(hd).zip(norm) {
            out.iter_mut().for_each(|x| *x *= norm);
        }
    }
}

/// `len` positions of a run (see [`KvRows::run`]) as f32 rows of `width` values: the run
/// itself for f32, else widened into `scratch`.
#[inline(always)]
fn widened<'s, E: HostElement>(
    (run, stride): (&'s [E], usize),
    len: usize,
    width: usize,
    scratch: &'s mut Vec<f32>,
) -> Rows<'s> {
    let (data, stride) = E::widen(run, stride, [len, width], scratch);
    Rows {
        data,
        stride,
        len,
        width,
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

/// Output registers one pass of [`weighted_sum`] keeps at most: 64 floats on AVX2, a whole
/// head of 64; on AVX-512 the head takes half of them.
const SUM_REGISTERS: usize = 8;

/// `out += Σ_j weights[j] * values[j]`, weights `[len]`, values `[len, width]` (rows
/// `values.stride` apart), out `[width]`. The output stays in registers over all the values,
/// each of which is read once per pass, front to back, instead of being read and written
/// through memory once per value: passes of [`SUM_REGISTERS`] registers, then 4, 2 and 1 for
/// what is left (a head of 64 floats is one pass of 8 AVX2 or 4 AVX-512 registers); only the
/// last `width % lanes` columns go through memory.
#[inline(always)]
fn weighted_sum<S: Simd>(s: S, weights: &[f32], values: Rows, out: &mut [f32]) {
    let mut d = sum_tiles::<S, SUM_REGISTERS>(s, weights, values, out, 0);
    d = sum_tiles::<S, 4>(s, weights, values, out, d);
    d = sum_tiles::<S, 2>(s, weights, values, out, d);
    d = sum_tiles::<S, 1>(s, weights, values, out, d);
    let width = out.len();
    if d < width {
        for (&w, j) in weights.iter().zip(0..values.len) {
            axpy(s, w, &values.row(j)[d..width], &mut out[d..]);
        }
    }
}

/// [`weighted_sum`]'s columns from `d` in tiles of `R` registers, while a whole tile fits;
/// returns the first column it left.
#[inline(always)]
fn sum_tiles<S: Simd, const R: usize>(
    s: S,
    weights: &[f32],
    values: Rows,
    out: &mut [f32],
    mut d: usize,
) -> usize {
    let tile = R * core::mem::size_of::<S::f32s>() / core::mem::size_of::<f32>();
    while d + tile <= out.len() {
        let (acc, _) = S::as_mut_simd_f32s(&mut out[d..d + tile]);
        let mut regs: [S::f32s; R] = core::array::from_fn(|r| acc[r]);
        for (&w, j) in weights.iter().zip(0..values.len) {
            let (v, _) = S::as_simd_f32s(&values.row(j)[d..d + tile]);
            let w = s.splat_f32s(w);
            for (r, v) in regs.iter_mut().zip(v) {
                *r = s.mul_add_f32s(w, *v, *r);
            }
        }
        acc.copy_from_slice(&regs);
        d += tile;
    }
    d
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

    /// The kernel on `q` and cached keys and values `kd`, `vd` (`cap` positions of `stride`
    /// elements per row and head) held as `E`, against the f64 reference on the same values.
    fn check<E: HostElement>(
        [b, kvh, g, hd]: [usize; 4],
        [total, cap, stride]: [usize; 3],
        (q, kd, vd): (&[f32], &[f32], &[f32]),
        first: &[usize],
        tolerance: f64,
    ) -> Result<(), TestCaseError> {
        let narrow = |d: &[f32]| d.iter().map(|x| E::from_elem(*x)).collect::<Vec<E>>();
        let (kn, vn) = (narrow(kd), narrow(vd));
        let wide = |d: &[E]| d.iter().map(|x| x.elem::<f32>()).collect::<Vec<f32>>();
        let (kw, vw) = (wide(&kn), wide(&vn));
        let strides = [kvh * cap * stride, cap * stride, stride];
        fn rows<T>(data: &[T], strides: [usize; 3], head_dim: usize) -> KvRows<'_, T> {
            KvRows {
                data,
                offset: 0,
                strides,
                head_dim,
            }
        }
        let dims = [b, kvh, g, hd];
        let scale = 1.0 / (hd as f32).sqrt();
        let (k, v) = (rows(&kn, strides, hd), rows(&vn, strides, hd));
        let got = decode_attention(q, dims, k, v, total, Some(first), scale);
        let (k, v) = (rows(&kw, strides, hd), rows(&vw, strides, hd));
        let want = reference(q, dims, k, v, total, first, scale);
        for (a, b) in got.iter().zip(&want) {
            prop_assert!((*a as f64 - b).abs() <= tolerance, "{a} vs {b}");
        }
        Ok(())
    }

    /// A cache large enough that the heads are shared among the cores: each head's output
    /// lands in its own place, with left padding per row.
    #[test]
    fn heads_shared_among_cores_match_the_reference() {
        let (b, kvh, g, hd, total) = (3, 2, 4, 64, 300);
        assert!(b * kvh * total * hd >= PARALLEL_MIN_CACHED);
        let n = b * kvh * g * hd + 2 * b * kvh * total * hd;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 997) as f32 / 498.5) - 1.0)
            .collect();
        let (q, kv) = v.split_at(b * kvh * g * hd);
        let (kd, vd) = kv.split_at(b * kvh * total * hd);
        let dims = [b, kvh, g, hd];
        for first in [[0, 0, 0], [0, 17, 299]] {
            check::<f32>(dims, [total, total, hd], (q, kd, vd), &first, 1e-5).unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Keys and values read through a cache buffer with spare capacity and gaps between
        /// positions, held in f32 or f16, any group size, head widths below and above one
        /// pass of output registers (64 floats on AVX2, 128 on AVX-512) and between passes,
        /// left padding per row, and more positions than one block.
        #[test]
        fn the_kernel_computes_attention(
            (b, kvh, g, hd, total, spare, gap, v, first) in (1usize..4, 1usize..3, 1usize..7, prop_oneof![1usize..20, 60usize..140, prop::sample::select(vec![64usize, 72, 128])], 1usize..150, 0usize..5, 0usize..3)
                .prop_flat_map(|(b, kvh, g, hd, total, spare, gap)| {
                    let len = b * kvh * (total + spare) * (hd + gap);
                    (Just(b), Just(kvh), Just(g), Just(hd), Just(total), Just(spare), Just(gap),
                     proptest::collection::vec(-2.0f32..2.0, b * kvh * g * hd + 2 * len),
                     proptest::collection::vec(0..total, b))
                })
        ) {
            let (cap, stride) = (total + spare, hd + gap);
            let (q, kv) = v.split_at(b * kvh * g * hd);
            let (kd, vd) = kv.split_at(b * kvh * cap * stride);
            let dims = [b, kvh, g, hd];
            check::<f32>(dims, [total, cap, stride], (q, kd, vd), &first, 1e-5)?;
            // The widened f16 values are exact, so only the f32 arithmetic differs.
            check::<half::f16>(dims, [total, cap, stride], (q, kd, vd), &first, 1e-5)?;
        }
    }
}
