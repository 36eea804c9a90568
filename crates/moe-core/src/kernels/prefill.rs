//! Causal attention of a prompt (several new tokens per row) against the keys and values cached
//! so far, in blocks of queries that skip the keys above the diagonal.

use rayon::prelude::*;

use pulp::{Simd, WithSimd};

use super::attention::{HeadKv, shifted_exp};
use super::{KvRows, arch};

/// Query positions per block: each block multiplies against the keys up to its last position
/// only, so the work above the diagonal is skipped to within one block.
const BLOCK: usize = 64;

/// The shape of a prompt's attention: `batch` rows, `kv_heads` key/value heads each read by `g`
/// query heads, `new` new positions per row (columns `total - new .. total` of the cache) of
/// `head_dim` values.
#[derive(Debug, Clone, Copy)]
pub struct PrefillShape {
    /// Batch rows.
    pub batch: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Query heads per key/value head.
    pub g: usize,
    /// New positions per row.
    pub new: usize,
    /// Values per position.
    pub head_dim: usize,
    /// Positions cached, the new ones included.
    pub total: usize,
}

/// Scaled dot-product attention of each row's `new` positions (the cache's last columns), each
/// seeing the columns from `first[b]` (the row's left padding; 0 when `first` is `None`) up to
/// and including its own. Query head `h * g + i` reads key/value head `h`; its rows are folded
/// as `i * new + p`. Blocks of 64 positions (`BLOCK`) are shared among the current rayon pool's
/// threads; each multiplies its queries by the keys it may see (gemm, single-threaded, reading
/// the cache in place), takes a vectorised softmax and multiplies by the values. A position
/// that sees no column (padding) gets zeros.
///
/// q: `[batch, kv_heads, g * new, head_dim]` (row-major) -> the same
pub fn prefill_attention(
    q: &[f32],
    shape: PrefillShape,
    keys: KvRows,
    values: KvRows,
    first: Option<&[usize]>,
    scale: f32,
) -> Vec<f32> {
    let PrefillShape {
        g,
        new,
        head_dim: hd,
        total,
        kv_heads,
        ..
    } = shape;
    assert_eq!(q.len(), shape.batch * kv_heads * g * new * hd, "q");
    assert!(new <= total, "more new positions than cached");
    let mut out = vec![0.0; q.len()];
    if new == 0 || hd == 0 {
        return out;
    }
    let blocks = out
        .par_chunks_mut(new * hd)
        .enumerate()
        .flat_map(|(j, out)| {
            out.par_chunks_mut(BLOCK * hd)
                .enumerate()
                .map(move |(blk, out)| (j, blk, out))
        });
    blocks.for_each(|(j, blk, out)| {
        let head = j / g; // b * kv_heads + h
        let (b, h) = (head / kv_heads, head % kv_heads);
        let p0 = blk * BLOCK;
        let rows = out.len() / hd;
        let q = &q[(j * new + p0) * hd..(j * new + p0 + rows) * hd];
        let block = Block {
            q,
            kv: HeadKv::new(keys, values, b, h),
            // Column of the block's first position, and the first column any row sees.
            col0: total - new + p0,
            lo: first.map_or(0, |f| f[b]),
            scale,
            out,
        };
        block.run();
    });
    out
}

/// One block of consecutive query positions of one query head.
struct Block<'a> {
    q: &'a [f32],
    kv: HeadKv<'a>,
    col0: usize,
    lo: usize,
    scale: f32,
    out: &'a mut [f32],
}

impl Block<'_> {
    fn run(self) {
        let hd = self.kv.head_dim();
        let rows = self.q.len() / hd;
        // Columns lo..hi: the last row's view, the widest.
        let hi = self.col0 + rows;
        if hi <= self.lo {
            return; // every row is padding
        }
        let n = hi - self.lo;
        let (k, k_stride) = self.kv.key_run(self.lo..hi);
        let (v, v_stride) = self.kv.value_run(self.lo..hi);
        let mut p = vec![0.0f32; rows * n];
        // p = q k^T: [rows, hd] x [hd, n], k^T read through the cache's strides.
        // SAFETY: `key_run` checked that positions lo..hi of this head lie in the buffer,
        // and the other operands are slices of exactly the sizes given.
        unsafe {
            gemm::gemm(
                rows,
                n,
                hd,
                p.as_mut_ptr(),
                1,
                n as isize,
                false,
                self.q.as_ptr(),
                1,
                hd as isize,
                k.as_ptr(),
                k_stride as isize,
                1,
                0.0,
                self.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (r, row) in p.chunks_exact_mut(n).enumerate() {
            // Row r sees columns lo..=col0 + r.
            let seen = (self.col0 + r + 1).saturating_sub(self.lo).min(n);
            arch().dispatch(Softmax { row, seen });
        }
        // out = p v: [rows, n] x [n, hd].
        // SAFETY: as above.
        unsafe {
            gemm::gemm(
                rows,
                hd,
                n,
                self.out.as_mut_ptr(),
                1,
                hd as isize,
                false,
                p.as_ptr(),
                1,
                n as isize,
                v.as_ptr(),
                1,
                v_stride as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// `row[..seen]` replaced by its softmax, `row[seen..]` by zeros (all zeros when `seen` is 0).
struct Softmax<'a> {
    row: &'a mut [f32],
    seen: usize,
}

impl WithSimd for Softmax<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> Self::Output {
        let (seen, hidden) = self.row.split_at_mut(self.seen);
        hidden.fill(0.0);
        let norm = shifted_exp(s, seen);
        seen.iter_mut().for_each(|x| *x *= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Attention in f64, one query at a time; keys and values `[batch, kv_heads, cap, hd]`.
    fn reference(
        q: &[f32],
        s: PrefillShape,
        kv: (&[f32], &[f32]),
        cap: usize,
        first: &[usize],
        scale: f32,
    ) -> Vec<f64> {
        let PrefillShape {
            kv_heads,
            g,
            new,
            head_dim: hd,
            total,
            ..
        } = s;
        let at = |t: &[f32], b: usize, h: usize, c: usize| -> Vec<f64> {
            let o = ((b * kv_heads + h) * cap + c) * hd;
            t[o..o + hd].iter().map(|x| *x as f64).collect()
        };
        let mut out = vec![0.0; q.len()];
        for (b, &lo) in first.iter().enumerate() {
            for h in 0..kv_heads {
                for i in 0..g {
                    for p in 0..new {
                        let row = (((b * kv_heads + h) * g + i) * new + p) * hd;
                        let cols: Vec<usize> = (lo..=total - new + p).collect();
                        if cols.is_empty() {
                            continue;
                        }
                        let scores: Vec<f64> = cols
                            .iter()
                            .map(|&c| {
                                let k = at(kv.0, b, h, c);
                                q[row..row + hd]
                                    .iter()
                                    .zip(&k)
                                    .map(|(a, b)| *a as f64 * b)
                                    .sum::<f64>()
                                    * scale as f64
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for (c, w) in cols.iter().zip(&e) {
                            for (o, v) in out[row..row + hd].iter_mut().zip(at(kv.1, b, h, *c)) {
                                *o += w / z * v;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any group size and head width, prompts shorter and longer than a block, new tokens
        /// after cached ones, spare positions in the buffer (strided reads), left padding that
        /// hides some rows' first positions or whole rows.
        #[test]
        fn prefill_attention_matches_f64(
            (batch, kv_heads, g, hd) in (1usize..3, 1usize..3, 1usize..4, 1usize..20),
            (new, old, spare) in (1usize..150, 0usize..40, 0usize..5),
            pads in proptest::collection::vec(0usize..200, 2),
            seed in any::<u64>(),
        ) {
            let total = old + new;
            let cap = total + spare;
            let first: Vec<usize> = pads[..batch].iter().map(|p| p % (total + 1)).collect();
            let mut state = seed | 1;
            let mut draw = |n: usize| -> Vec<f32> {
                (0..n).map(|_| {
                    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                    (state % 2001) as f32 / 1000.0 - 1.0
                }).collect()
            };
            let q = draw(batch * kv_heads * g * new * hd);
            let (k, v) = (draw(batch * kv_heads * cap * hd), draw(batch * kv_heads * cap * hd));
            let rows = |data| KvRows { data, offset: 0, strides: [kv_heads * cap * hd, cap * hd, hd], head_dim: hd };
            let shape = PrefillShape { batch, kv_heads, g, new, head_dim: hd, total };
            let scale = 1.0 / (hd as f32).sqrt();
            let got = prefill_attention(&q, shape, rows(&k), rows(&v), Some(&first), scale);
            let want = reference(&q, shape, (&k, &v), cap, &first, scale);
            for (a, b) in got.iter().zip(&want) {
                prop_assert!((*a as f64 - b).abs() <= 1e-5, "{a} vs {b}");
            }
        }
    }
}
