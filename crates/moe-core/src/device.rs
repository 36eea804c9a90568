//! One place that turns a device name (`flex`, `ndarray`, `wgpu`, `wgpu:N`, `wgpu:cpu`) into a
//! Burn [`Device`]. Every binary, example, benchmark and test selects its backend through here.
//!
//! Each backend is a Cargo feature of moe-core (`flex`, `ndarray`, `wgpu`, all on by default).
//! Every name parses whatever the features; opening a backend that is not compiled in returns
//! [`DeviceError::NotCompiled`]. The backend-specific code of moe-core lives in this module.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
#[cfg(feature = "wgpu")]
use burn::tensor::{DeviceKind, DeviceType};

use crate::error::DeviceError;

/// Which wgpu adapter to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuAdapter {
    /// The first adapter wgpu lists (a real GPU when there is one).
    Default,
    /// The adapter at this index in wgpu's list.
    Index(usize),
    /// A CPU (software) Vulkan adapter, such as Mesa's lavapipe.
    Cpu,
}

/// A parsed device name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Burn's pure-Rust CPU backend (fastest on CPU).
    Flex,
    /// Burn's ndarray CPU backend.
    NdArray,
    /// A wgpu (Vulkan/Metal/DX12) adapter.
    Wgpu(WgpuAdapter),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || DeviceError::Unknown(s.to_string());
        match s.trim().to_ascii_lowercase().as_str() {
            "flex" => Ok(Self::Flex),
            "ndarray" => Ok(Self::NdArray),
            "wgpu" => Ok(Self::Wgpu(WgpuAdapter::Default)),
            "wgpu:cpu" => Ok(Self::Wgpu(WgpuAdapter::Cpu)),
            other => match other.strip_prefix("wgpu:") {
                Some(n) => n
                    .parse()
                    .map(|i| Self::Wgpu(WgpuAdapter::Index(i)))
                    .map_err(|_| unknown()),
                None => Err(unknown()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flex => f.write_str("flex"),
            Self::NdArray => f.write_str("ndarray"),
            Self::Wgpu(WgpuAdapter::Default) => f.write_str("wgpu"),
            Self::Wgpu(WgpuAdapter::Cpu) => f.write_str("wgpu:cpu"),
            Self::Wgpu(WgpuAdapter::Index(i)) => write!(f, "wgpu:{i}"),
        }
    }
}

impl DeviceSpec {
    /// The moe-core feature that compiles this backend in (`flex`, `ndarray` or `wgpu`).
    pub fn feature(&self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::NdArray => "ndarray",
            Self::Wgpu(_) => "wgpu",
        }
    }

    /// Whether this build of moe-core has this backend (its feature is enabled).
    pub fn is_compiled(&self) -> bool {
        match self {
            Self::Flex => cfg!(feature = "flex"),
            Self::NdArray => cfg!(feature = "ndarray"),
            Self::Wgpu(_) => cfg!(feature = "wgpu"),
        }
    }

    /// The Burn device, after checking that the backend is compiled in and, for wgpu, that an
    /// adapter exists (creating a wgpu device without one would panic on first use).
    pub fn device(&self) -> Result<Device, DeviceError> {
        match self {
            #[cfg(feature = "flex")]
            Self::Flex => Ok(Device::flex()),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)] // ndarray stays a supported backend of this project
            Self::NdArray => Ok(Device::ndarray()),
            #[cfg(feature = "wgpu")]
            Self::Wgpu(adapter) => {
                let adapters = wgpu_adapters();
                let found = adapters.len();
                let no_adapter = || DeviceError::NoAdapter {
                    spec: self.to_string(),
                    found,
                };
                match adapter {
                    WgpuAdapter::Default => adapters.into_iter().next().ok_or_else(no_adapter),
                    WgpuAdapter::Index(i) => adapters.into_iter().nth(*i).ok_or_else(no_adapter),
                    WgpuAdapter::Cpu if adapters.is_empty() => Err(no_adapter()),
                    WgpuAdapter::Cpu => Ok(Device::wgpu(DeviceKind::Cpu)),
                }
            }
            #[allow(unreachable_patterns)] // every backend compiled in
            _ => Err(DeviceError::NotCompiled {
                backend: self.feature(),
            }),
        }
    }
}

/// Every wgpu adapter on this machine, GPUs first, as Burn lists them.
#[cfg(feature = "wgpu")]
pub fn wgpu_adapters() -> Vec<Device> {
    Device::enumerate(DeviceType::Wgpu).into_iter().collect()
}

/// Every wgpu adapter on this machine: none, as the `wgpu` feature is off.
#[cfg(not(feature = "wgpu"))]
pub fn wgpu_adapters() -> Vec<Device> {
    Vec::new()
}

/// Whether `device` is one of the host CPU backends (flex, ndarray), with or without autodiff.
/// Each has a single device, and `Device` equality ignores autodiff.
pub(crate) fn is_host_backend(device: &Device) -> bool {
    if is_flex(device) {
        return true;
    }
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)] // ndarray stays a supported backend of this project
    if *device == Device::ndarray() {
        return true;
    }
    false
}

/// Whether `device` is flex, with or without autodiff.
pub(crate) fn is_flex(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    return *device == Device::flex();
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// Parses a device name and opens it: `parse_device("flex")`, `parse_device("wgpu:cpu")`.
pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    name.parse::<DeviceSpec>()?.device()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_form() {
        assert_eq!("flex".parse(), Ok(DeviceSpec::Flex));
        assert_eq!("NdArray".parse(), Ok(DeviceSpec::NdArray));
        assert_eq!("wgpu".parse(), Ok(DeviceSpec::Wgpu(WgpuAdapter::Default)));
        assert_eq!("wgpu:cpu".parse(), Ok(DeviceSpec::Wgpu(WgpuAdapter::Cpu)));
        assert_eq!(
            "wgpu:2".parse(),
            Ok(DeviceSpec::Wgpu(WgpuAdapter::Index(2)))
        );
        for spec in ["flex", "ndarray", "wgpu", "wgpu:cpu", "wgpu:3"] {
            assert_eq!(spec.parse::<DeviceSpec>().unwrap().to_string(), spec);
        }
    }

    #[test]
    fn rejects_unknown_names_with_a_clear_error() {
        for bad in ["", "cuda", "wgpu:", "wgpu:x", "flexx", "wgpu:-1"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert_eq!(err, DeviceError::Unknown(bad.to_string()));
            assert!(err.to_string().contains("expected flex, ndarray"));
        }
    }

    #[test]
    fn a_backend_left_out_of_the_build_is_a_clear_error() {
        let err = DeviceError::NotCompiled { backend: "ndarray" };
        assert_eq!(
            err.to_string(),
            "backend `ndarray` is not compiled in: enable moe-core's `ndarray` feature"
        );
        for name in ["flex", "ndarray", "wgpu", "wgpu:cpu", "wgpu:1"] {
            let spec: DeviceSpec = name.parse().unwrap();
            let result = spec.device();
            if spec.is_compiled() {
                assert!(
                    !matches!(result, Err(DeviceError::NotCompiled { .. })),
                    "{name}"
                );
            } else {
                let backend = spec.feature();
                assert_eq!(result.unwrap_err(), DeviceError::NotCompiled { backend });
            }
        }
        assert_eq!(DeviceSpec::Flex.is_compiled(), cfg!(feature = "flex"));
        assert_eq!(DeviceSpec::NdArray.is_compiled(), cfg!(feature = "ndarray"));
        assert_eq!(
            DeviceSpec::Wgpu(WgpuAdapter::Cpu).is_compiled(),
            cfg!(feature = "wgpu")
        );
    }

    #[cfg(feature = "wgpu")]
    #[test]
    fn an_adapter_index_past_the_list_is_an_error() {
        let found = wgpu_adapters().len();
        let err = parse_device("wgpu:999").unwrap_err();
        assert_eq!(
            err,
            DeviceError::NoAdapter {
                spec: "wgpu:999".into(),
                found
            }
        );
    }
}
