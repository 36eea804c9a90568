//! # moe-core
//!
//! A Mixture-of-Experts feed-forward layer for [Burn](https://burn.dev): routers (top-k softmax,
//! Switch top-1, DeepSeek-V3 sigmoid with a balancing bias, expert choice), dropless or
//! capacity-limited dispatch, shared and fine-grained experts, balancing losses, routing
//! statistics, and parameter/FLOP accounting. No model, no I/O. An expert bank can be paged:
//! it then obtains each routed expert's weights through an [`ExpertSource`] (an expert store
//! keeping some experts resident under a budget), and [`cache`] holds the eviction policies
//! (LRU, LFU, and Belady's optimum for replays).
//!
//! ```no_run
//! use burn::prelude::*;
//! use moe_core::{MoeLayerConfig, RouterConfig, parse_device};
//!
//! let device = parse_device("flex").unwrap();
//! let config = MoeLayerConfig::new(64, 128, 8).with_router(RouterConfig::mixtral());
//! let layer = config.init(&device);
//! let x = Tensor::<3>::random([2, 16, 64], burn::tensor::Distribution::Default, &device);
//! let out = layer.forward(x, None);
//! assert_eq!(out.output.dims(), [2, 16, 64]);
//! let loss_extra = out.aux.balance.mul_scalar(0.01) + out.aux.z.mul_scalar(0.001);
//! println!("{:?}", out.stats.summary());
//! println!("active/total: {:?}", config.accounting());
//! # let _ = loss_extra;
//! ```
#![warn(missing_docs)]

pub mod accounting;
pub mod cache;
pub mod device;
pub mod dispatch;
pub mod error;
pub mod experts;
pub mod ffn;
pub mod host;
pub mod kernels;
pub mod layer;
pub mod loss;
pub mod router;
pub mod stats;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use accounting::{Accounting, WeightDType};
pub use cache::{CachePolicy, CacheStats, ExpertCache, ExpertKey};
pub use device::{DeviceSpec, WgpuAdapter, parse_device};
pub use error::{ConfigError, DeviceError};
pub use experts::{ExpertSource, ExpertWeights, Experts, ExpertsConfig, WeightOrder};
pub use ffn::{SwiGluFfn, SwiGluFfnConfig};
pub use layer::{AuxLosses, ExpertCompute, MoeLayer, MoeLayerConfig, MoeOutput};
pub use router::{Assignment, Router, RouterConfig, RouterKind, Routing};
pub use stats::{RoutingStats, RoutingSummary};
