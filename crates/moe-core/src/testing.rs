//! Running one test on every backend (enabled by the `testing` feature; used by this workspace's
//! tests).
//!
//! Tests take the backend name as an `rstest` case and open it with [`test_device`]. wgpu runs
//! where an adapter exists; with `MOE_REQUIRE_WGPU=1` (set by CI) a missing adapter fails the test
//! instead of skipping it. A backend whose moe-core feature is off skips the same way (wgpu's
//! too, unless `MOE_REQUIRE_WGPU=1`).

use burn::prelude::*;
use burn::tensor::{TensorData, Tolerance};

use crate::device::parse_device;
use crate::error::DeviceError;

/// Opens the backend under test, or returns `None` (after saying so on stderr) when this build
/// leaves the backend out, or when it is wgpu and this machine has no adapter, and
/// `MOE_REQUIRE_WGPU` is not set.
///
/// # Panics
/// When the backend is wgpu, it is not compiled in or no adapter exists, and
/// `MOE_REQUIRE_WGPU=1`; on any other error.
pub fn test_device(backend: &str) -> Option<Device> {
    match parse_device(backend) {
        Ok(device) => Some(device),
        Err(e) if backend.starts_with("wgpu") => {
            if std::env::var("MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("MOE_REQUIRE_WGPU=1 but {e}");
            }
            eprintln!("SKIPPED on {backend}: {e}");
            None
        }
        Err(e @ DeviceError::NotCompiled { .. }) => {
            eprintln!("SKIPPED on {backend}: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Asserts two tensors agree element-wise within an absolute tolerance.
#[track_caller]
pub fn assert_close<const D: usize>(actual: Tensor<D>, expected: Tensor<D>, tol: f32) {
    let expected = expected.to_device(&actual.device());
    assert_data_close(actual.into_data(), expected.into_data(), tol);
}

/// Asserts two tensor datas agree element-wise within an absolute tolerance.
#[track_caller]
pub fn assert_data_close(actual: TensorData, expected: TensorData, tol: f32) {
    actual.assert_approx_eq::<f32>(&expected, Tolerance::absolute(tol));
}

/// A tensor's values as `f32`.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().expect("float data")
}

/// A tensor's values as `i64`.
pub fn ints<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data().try_into_vec_as::<i64>().expect("int data")
}
