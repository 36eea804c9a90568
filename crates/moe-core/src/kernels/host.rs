//! Flex tensors read in place, and results handed back as tensors.

use std::marker::PhantomData;

#[cfg(feature = "flex")]
use burn::backend::{Flex, flex::FlexTensor};
use burn::prelude::*;
use burn::tensor::{DType, Element, TensorData};
use half::f16;

/// An element type the host kernels read in place: f32 (every kernel) and f16 (cached keys and
/// values stored in half precision, see [`KvRows`](super::KvRows)).
pub trait HostElement: Element + bytemuck::Pod {
    /// The tensor dtype holding this element.
    const DTYPE: DType;

    /// `n` rows of `width` elements, `stride` apart from the start of `run`, as f32 rows and
    /// their stride: `run` itself for f32 (no copy), else widened into `scratch`.
    fn widen<'s>(
        run: &'s [Self],
        stride: usize,
        shape: [usize; 2],
        scratch: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize);
}

impl HostElement for f32 {
    const DTYPE: DType = DType::F32;

    fn widen<'s>(
        run: &'s [Self],
        stride: usize,
        _: [usize; 2],
        _: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize) {
        (run, stride)
    }
}

impl HostElement for f16 {
    const DTYPE: DType = DType::F16;

    /// Converts with F16C (x86-64) or FP16 (aarch64) where the CPU has it.
    fn widen<'s>(
        run: &'s [Self],
        stride: usize,
        [n, width]: [usize; 2],
        scratch: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize) {
        scratch.resize(n * width, 0.0);
        if stride == width {
            widen_f16(&run[..n * width], scratch);
        } else {
            for (r, out) in scratch.chunks_exact_mut(width.max(1)).enumerate() {
                widen_f16(&run[r * stride..r * stride + width], out);
            }
        }
        (scratch, width)
    }
}

/// `dst = src` widened to f32: eight values per instruction with F16C on x86-64, else `half`'s
/// conversion (FP16 instructions on aarch64 where present).
fn widen_f16(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has both features, checked just above.
        unsafe { widen_f16c(src, dst) };
        return;
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// [`widen_f16`] with F16C: `vcvtph2ps` on eight values at a time.
///
/// # Safety
/// The CPU must have F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    assert_eq!(src.len(), dst.len());
    let s8 = src.chunks_exact(8);
    let s_tail = s8.remainder();
    let mut d8 = dst.chunks_exact_mut(8);
    for (s, d) in s8.zip(&mut d8) {
        // SAFETY: `s` holds 8 f16 (16 bytes) and `d` 8 f32, both read and written unaligned.
        unsafe {
            let h = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    for (s, d) in s_tail.iter().zip(d8.into_remainder()) {
        *d = s.to_f32();
    }
}

/// A tensor of the flex backend (not autodiff) holding elements `E`, whose memory the host
/// kernels read in place: a clone of the tensor's handle, no copy.
#[derive(Debug, Clone)]
pub struct Host<E> {
    #[cfg(feature = "flex")]
    tensor: FlexTensor,
    element: PhantomData<E>,
}

/// An f32 flex tensor read in place.
pub type HostF32 = Host<f32>;

impl<E: HostElement> Host<E> {
    /// `t`'s memory, when it is a tensor of `E` on flex outside autodiff; `None` otherwise
    /// (other backends, dtypes and autodiff keep Burn's ops).
    pub fn of<const D: usize>(t: &Tensor<D>) -> Option<Self> {
        if t.dtype() != E::DTYPE {
            return None;
        }
        #[cfg(feature = "flex")]
        {
            let tensor = t.clone().try_into_primitive::<Flex>().ok()?;
            Some(Self {
                tensor,
                element: PhantomData,
            })
        }
        #[cfg(not(feature = "flex"))]
        None
    }

    /// `t` as [`of`](Self::of) reads it, copied to row-major order first when it is a view with
    /// gaps or another order, so that [`contiguous`](Self::contiguous) gives its elements.
    pub fn row_major<const D: usize>(t: &Tensor<D>) -> Option<Self> {
        let host = Self::of(t)?;
        if host.contiguous().is_some() {
            return Some(host);
        }
        let values = t.clone().into_data().try_into_vec::<E>().ok()?;
        Self::of(&host_tensor(values, t.dims()))
    }

    /// The elements in row-major order, when they sit so without gaps.
    pub fn contiguous(&self) -> Option<&[E]> {
        #[cfg(feature = "flex")]
        return self.tensor.as_slice();
        #[cfg(not(feature = "flex"))]
        unreachable!("no Host without flex")
    }

    /// The whole buffer the tensor views, with the view's start and strides (in elements): the
    /// element at `idx` is `storage()[offset + sum(idx[i] * strides[i])]`.
    pub fn strided(&self) -> (&[E], usize, &[isize]) {
        #[cfg(feature = "flex")]
        return (
            self.tensor.storage(),
            self.tensor.layout().start_offset(),
            self.tensor.layout().strides(),
        );
        #[cfg(not(feature = "flex"))]
        unreachable!("no Host without flex")
    }
}

/// A flex tensor of `shape` holding `values` (row-major), moved, not copied.
pub fn host_tensor<E: HostElement, const D: usize>(values: Vec<E>, shape: [usize; D]) -> Tensor<D> {
    let data = TensorData::new(values, shape);
    #[cfg(feature = "flex")]
    return Tensor::from_primitive::<Flex>(FlexTensor::from_data(data));
    #[cfg(not(feature = "flex"))]
    unreachable!("no host kernel runs without flex: {data:?}")
}
