//! Errors of the MoE layer's configuration and of device selection.

use thiserror::Error;

/// A configuration that cannot build a working MoE layer.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ConfigError {
    /// A size that must be positive is zero.
    #[error("{name} must be at least 1, got 0")]
    Zero {
        /// The offending field.
        name: &'static str,
    },
    /// More experts selected per token than exist.
    #[error("top_k ({top_k}) must be between 1 and n_experts ({n_experts})")]
    TopK {
        /// Experts selected per token.
        top_k: usize,
        /// Experts in the layer.
        n_experts: usize,
    },
    /// A real-valued setting outside its valid range.
    #[error("{name} must be {expected}, got {value}")]
    OutOfRange {
        /// The offending field.
        name: &'static str,
        /// The valid range, in words.
        expected: &'static str,
        /// The value given.
        value: f64,
    },

    /// Exact per-expert segments asked for on an autodiff (training) device.
    #[error(
        "expert segments are inference-only: in training, slicing each expert out of the stacked weights costs a full-bank gradient per expert; use compute Auto (bounded padding) or Padded"
    )]
    SegmentsInTraining,
}

/// A device name that does not parse, or names a device this machine lacks.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeviceError {
    /// The name is not one of the accepted forms.
    #[error("unknown device '{0}': expected flex, ndarray, wgpu, wgpu:N or wgpu:cpu")]
    Unknown(String),
    /// The wgpu adapter asked for does not exist here.
    #[error(
        "no wgpu adapter for '{spec}' ({found} adapter(s) found); install a Vulkan driver (e.g. mesa-vulkan-drivers) or pick flex"
    )]
    NoAdapter {
        /// The device name as given.
        spec: String,
        /// How many wgpu adapters were found.
        found: usize,
    },
    /// The backend's moe-core feature is off in this build.
    #[error("backend `{backend}` is not compiled in: enable moe-core's `{backend}` feature")]
    NotCompiled {
        /// The backend, also the name of its feature: `flex`, `ndarray` or `wgpu`.
        backend: &'static str,
    },
}
