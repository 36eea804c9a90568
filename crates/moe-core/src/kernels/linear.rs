//! Matrix products of flex f32 tensors written by gemm straight into their output, and linear
//! layers built on them.
//!
//! flex's own matmul allocates its output as zeroed bytes, which Burn's `Bytes` then copies once
//! more into a 16-byte-aligned buffer (`Bytes::from_bytes_vec` on a `Vec<u8>`): each product
//! allocates its output twice and writes it three times, and the second allocation of a large
//! output faults its pages in afresh. In 16 prompts of 1024 tokens that was 15% of the time
//! (docs/benchmarks.md, session 20). [`matmul`] makes the same gemm call on the operands in place
//! (any strides: a transposed weight is a view) into an output it hands over without a copy.

use burn::nn::Linear;
use burn::prelude::*;

use super::{HostF32, host_tensor};
use crate::host::{CallerShare, INLINE_MAX_MACS, alone, map_on_cores, runs_on_host};

/// `lhs · rhs`: on flex in f32 outside autodiff with gemm into a fresh output, as flex would
/// (split across the current rayon pool's threads from [`INLINE_MAX_MACS`] multiply-adds, unless
/// this thread's work must stay on it, [`alone`]); elsewhere Burn's `matmul`.
///
/// lhs: `[m, k]`, rhs: `[k, n]` -> `[m, n]`
pub fn matmul(lhs: Tensor<2>, rhs: Tensor<2>) -> Tensor<2> {
    host_matmul(&lhs, &rhs).unwrap_or_else(|| lhs.matmul(rhs))
}

/// [`matmul`] on flex f32 tensors; `None` for other tensors, and for views with negative
/// strides.
fn host_matmul(lhs: &Tensor<2>, rhs: &Tensor<2>) -> Option<Tensor<2>> {
    let ([m, k], [k_rhs, n]) = (lhs.dims(), rhs.dims());
    assert_eq!(k, k_rhs, "matmul of [{m}, {k}] by [{k_rhs}, {n}]");
    let (a, b) = (HostF32::of(lhs)?, HostF32::of(rhs)?);
    let (a, [a_rs, a_cs]) = operand(&a, [m, k])?;
    let (b, [b_rs, b_cs]) = operand(&b, [k, n])?;
    let parallelism = if m * n * k >= INLINE_MAX_MACS && !alone() {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: `operand` checked that every element of both views lies in its buffer; `out` has
    // room for m * n values, written row-major. With `read_dst` false gemm never reads `out`
    // and writes each of its m * n values (zeros when k is 0), so all are set before `set_len`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(m * n);
    }
    Some(host_tensor(out, [m, n]))
}

/// A 2D view's buffer from its first element on, and its row and column strides, when every
/// element of `shape` lies in the buffer at non-negative strides.
fn operand(t: &HostF32, [rows, cols]: [usize; 2]) -> Option<(&[f32], [isize; 2])> {
    let (data, offset, strides) = t.strided();
    let [rs, cs] = [strides[0], strides[1]];
    if rs < 0 || cs < 0 {
        return None;
    }
    let view = data.get(offset..)?;
    if rows * cols == 0 {
        return Some((view, [rs, cs]));
    }
    let last = (rows - 1) * rs as usize + (cols - 1) * cs as usize;
    (last < view.len()).then_some((view, [rs, cs]))
}

/// `linear.forward(x)` with its product run by [`matmul`] (every leading dimension of `x` one
/// row of it) where both are flex f32 tensors; else `linear.forward(x)`.
///
/// x: `[.., in]` -> `[.., out]`
pub fn linear_forward<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    let w = linear.weight.val(); // [in, out]
    let [d_in, d_out] = w.dims();
    let mut dims = x.dims();
    if dims[D - 1] != d_in || HostF32::of(&x).is_none() || HostF32::of(&w).is_none() {
        return linear.forward(x);
    }
    let rows = dims[..D - 1].iter().product();
    let y = matmul(x.reshape([rows, d_in]), w);
    dims[D - 1] = d_out;
    biased(linear, y).reshape(dims)
}

/// `y` plus `linear`'s bias, if it has one, on every row.
///
/// y: `[rows, out]` -> `[rows, out]`
fn biased(linear: &Linear, y: Tensor<2>) -> Tensor<2> {
    match &linear.bias {
        Some(b) => y + b.val().unsqueeze_dim(0),
        None => y,
    }
}

/// Weights (`in * out`) from which [`linear_on_cores`] splits a product among the cores: a
/// quarter of a megabyte of f32, read in about 10 µs, against about a microsecond to hand half
/// of it to another core.
pub const SPLIT_MIN_WEIGHTS: usize = 1 << 16;

/// Rows from which [`linear_on_cores`] splits a product: one on flex; two on ndarray, whose
/// one-row product splits itself across rayon's threads, which the shares then compete for
/// (batch-1 decode on ndarray fell from 135 to 87-91 tokens/s with one-row splits).
fn split_min_rows(device: &Device) -> usize {
    if crate::device::is_flex(device) { 1 } else { 2 }
}

/// `linear` applied to `x`, its weights' input rows split among the cores ([`map_on_cores`])
/// where flex would run the product on one thread: on a host device outside autodiff, from
/// [`split_min_rows`] rows, with at least [`SPLIT_MIN_WEIGHTS`] weights and fewer multiply-adds
/// than [`INLINE_MAX_MACS`] (a decode step's projections). Each core multiplies its slice of
/// `x`'s columns by its block of weight rows, which it reads front to back, and the partial
/// products are summed: a decode step's products are bound by reading the weights, which one
/// core alone reads at 20-26 GB/s here. Otherwise [`linear_forward`].
///
/// (Splitting the output columns instead had each core read half of every weight row: at one
/// row it was no faster than one core; from 2 to 16 rows it measured the same as this.)
///
/// x: `[.., in]` -> `[.., out]`
pub fn linear_on_cores<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    let w = linear.weight.val(); // [in, out]
    let [d_in, d_out] = w.dims();
    let rows = x.shape().num_elements() / d_in.max(1);
    let cores = rayon::current_num_threads();
    let small = x.dims()[D - 1] == d_in
        && rows >= split_min_rows(&x.device())
        && rows * d_in * d_out < INLINE_MAX_MACS
        && d_in * d_out >= SPLIT_MIN_WEIGHTS;
    // `alone` also covers a pool of one thread, where there is no other core to split with.
    if !small || alone() || !runs_on_host(&x.device()) {
        return linear_forward(linear, x);
    }
    let mut dims = x.dims();
    let x = x.reshape([rows, d_in]);
    // On many cores, each share keeps at least half of SPLIT_MIN_WEIGHTS: the partial products
    // are summed one after another on this thread.
    let shares = cores.min(d_in * d_out / (SPLIT_MIN_WEIGHTS / 2));
    let parts: Vec<_> = (0..shares)
        .map(|c| c * d_in / shares..(c + 1) * d_in / shares)
        .filter(|r| !r.is_empty())
        .collect();
    let partials = map_on_cores(&parts, CallerShare::Inline, |ins| {
        let w = w.clone().slice([ins.clone(), 0..d_out]);
        matmul(x.clone().slice([0..rows, ins.clone()]), w)
    });
    let y = partials
        .into_iter()
        .reduce(|a, b| a + b)
        .expect("at least one core"); // [rows, out]
    dims[D - 1] = d_out;
    biased(linear, y).reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use proptest::prelude::*;

    /// How an operand's values sit in memory.
    #[derive(Debug, Clone, Copy)]
    enum Layout {
        RowMajor,
        /// A transposed view of the row-major transpose.
        Transposed,
        /// Columns `pad..pad + cols` of a wider row-major matrix.
        Sliced(usize),
    }

    /// The `[rows, cols]` matrix whose row-major values are `v`, laid out as `layout`.
    fn laid_out(v: &[f32], [rows, cols]: [usize; 2], layout: Layout, device: &Device) -> Tensor<2> {
        let tensor = |values: Vec<f32>, shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(values, shape), device)
        };
        match layout {
            Layout::RowMajor => tensor(v.to_vec(), [rows, cols]),
            Layout::Transposed => {
                let t = (0..cols * rows).map(|i| v[(i % rows) * cols + i / rows]);
                tensor(t.collect(), [cols, rows]).transpose()
            }
            Layout::Sliced(pad) => {
                let width = cols + 2 * pad;
                let w = (0..rows * width).map(|i| match i % width {
                    c if (pad..pad + cols).contains(&c) => v[(i / width) * cols + c - pad],
                    _ => f32::NAN,
                });
                tensor(w.collect(), [rows, width]).slice([0..rows, pad..pad + cols])
            }
        }
    }

    /// `got` against `a · b` computed in f64 (`a`: `[m, k]`, `b`: `[k, n]`, row-major), each
    /// value within 1e-5 of the sum of its terms' magnitudes.
    fn assert_product(got: Tensor<2>, a: &[f32], b: &[f32], [m, k, n]: [usize; 3]) {
        assert_eq!(got.dims(), [m, n]);
        let got = crate::testing::values(got);
        for (idx, g) in got.iter().enumerate() {
            let (i, j) = (idx / n, idx % n);
            let terms = (0..k).map(|l| a[i * k + l] as f64 * b[l * n + j] as f64);
            let (want, size) = terms.fold((0.0, 0.0), |(s, z), t| (s + t, z + t.abs()));
            let tol = 1e-5 * (1.0 + size);
            assert!((*g as f64 - want).abs() <= tol, "[{i}, {j}]: {g} vs {want}");
        }
    }

    fn layouts() -> impl Strategy<Value = Layout> {
        prop_oneof![
            Just(Layout::RowMajor),
            Just(Layout::Transposed),
            (1usize..3).prop_map(Layout::Sliced),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// On flex, operands in any layout (row-major, transposed views, column slices whose
        /// neighbours are NaN) and of any size down to empty go through gemm in place and give
        /// the product.
        #[test]
        fn host_products_of_any_layout_are_the_product(
            (m, k, n) in (0usize..20, 0usize..20, 0usize..20),
            values in proptest::collection::vec(-1.0f32..1.0, 800),
            (la, lb) in (layouts(), layouts()),
        ) {
            let device = Device::flex();
            let (a, b) = (&values[..m * k], &values[400..400 + k * n]);
            let (ta, tb) = (laid_out(a, [m, k], la, &device), laid_out(b, [k, n], lb, &device));
            let direct = host_matmul(&ta, &tb);
            prop_assert!(direct.is_some(), "flex f32 operands take gemm in place");
            assert_product(direct.unwrap(), a, b, [m, k, n]);
        }
    }

    /// Every backend, a small and a split product (600 x 256 x 384 is past
    /// `INLINE_MAX_MACS`), transposed and sliced operands: the product.
    #[rstest::rstest]
    fn matmul_is_the_product_on_every_backend(
        #[values("flex", "ndarray", "wgpu")] backend: &str,
        #[values([5, 7, 3], [600, 256, 384])] dims: [usize; 3],
    ) {
        let [m, k, n] = dims;
        let Some(device) = crate::testing::test_device(backend) else {
            return;
        };
        let value = |i: usize| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5;
        let a: Vec<f32> = (0..m * k).map(value).collect();
        let b: Vec<f32> = (0..k * n).map(|i| value(i + 17)).collect();
        for (la, lb) in [
            (Layout::RowMajor, Layout::RowMajor),
            (Layout::Transposed, Layout::Sliced(2)),
        ] {
            let (ta, tb) = (
                laid_out(&a, [m, k], la, &device),
                laid_out(&b, [k, n], lb, &device),
            );
            assert_product(matmul(ta, tb), &a, &b, [m, k, n]);
        }
    }

    /// Split or not (1 row, split on flex; 3 and 16 rows, split on the host backends; 600 rows,
    /// past `INLINE_MAX_MACS`), with and without a bias, for 2D and 3D inputs: the same as
    /// `Linear::forward`, up to the order of the sums.
    #[rstest::rstest]
    fn linear_on_cores_equals_forward(
        #[values("flex", "ndarray", "wgpu")] backend: &str,
        #[values(1, 3, 16, 600)] rows: usize,
        #[values(true, false)] bias: bool,
    ) {
        use burn::nn::LinearConfig;
        use burn::tensor::Distribution;

        let Some(device) = crate::testing::test_device(backend) else {
            return;
        };
        let (d_in, d_out) = (256, 384);
        assert!(d_in * d_out >= SPLIT_MIN_WEIGHTS && 16 * d_in * d_out < INLINE_MAX_MACS);
        assert!(600 * d_in * d_out >= INLINE_MAX_MACS);
        let linear = LinearConfig::new(d_in, d_out).with_bias(bias).init(&device);
        let x = Tensor::<3>::random([1, rows, d_in], Distribution::Default, &device);
        let close = |a: Tensor<3>, b: Tensor<3>| {
            let (a, b) = (crate::testing::values(a), crate::testing::values(b));
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        };
        close(
            linear_on_cores(&linear, x.clone()),
            linear.forward(x.clone()),
        );
        close(
            linear_forward(&linear, x.clone()),
            linear.forward(x.clone()),
        );
        let x2 = x.reshape([rows, d_in]);
        let split: Tensor<2> = linear_on_cores(&linear, x2.clone());
        close(split.unsqueeze(), linear.forward(x2).unsqueeze());
    }
}
