//! Flex tensors read in place, and results handed back as tensors.

#[cfg(feature = "flex")]
use burn::backend::{Flex, flex::FlexTensor};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

/// An f32 tensor of the flex backend (not autodiff), whose memory the host kernels read in
/// place: a clone of the tensor's handle, no copy.
#[derive(Debug, Clone)]
pub struct HostF32 {
    #[cfg(feature = "flex")]
    tensor: FlexTensor,
}

impl HostF32 {
    /// `t`'s memory, when it is an f32 tensor on flex outside autodiff; `None` otherwise (other
    /// backends, dtypes and autodiff keep Burn's ops).
    pub fn of<const D: usize>(t: &Tensor<D>) -> Option<Self> {
        if t.dtype() != DType::F32 {
            return None;
        }
        #[cfg(feature = "flex")]
        {
            let tensor = t.clone().try_into_primitive::<Flex>().ok()?;
            Some(Self { tensor })
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
        let values = t.clone().into_data().try_into_vec::<f32>().ok()?;
        Self::of(&host_tensor(values, t.dims()))
    }

    /// The elements in row-major order, when they sit so without gaps.
    pub fn contiguous(&self) -> Option<&[f32]> {
        #[cfg(feature = "flex")]
        return self.tensor.as_slice();
        #[cfg(not(feature = "flex"))]
        unreachable!("no HostF32 without flex")
    }

    /// The whole buffer the tensor views, with the view's start and strides (in elements): the
    /// element at `idx` is `storage()[offset + sum(idx[i] * strides[i])]`.
    pub fn strided(&self) -> (&[f32], usize, &[isize]) {
        #[cfg(feature = "flex")]
        return (
            self.tensor.storage(),
            self.tensor.layout().start_offset(),
            self.tensor.layout().strides(),
        );
        #[cfg(not(feature = "flex"))]
        unreachable!("no HostF32 without flex")
    }
}

/// A flex tensor of `shape` holding `values` (row-major), moved, not copied.
pub fn host_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
    let data = TensorData::new(values, shape);
    #[cfg(feature = "flex")]
    return Tensor::from_primitive::<Flex>(FlexTensor::from_data(data));
    #[cfg(not(feature = "flex"))]
    unreachable!("no host kernel runs without flex: {data:?}")
}
