//! # moe-model
//!
//! A decoder-only transformer language model built on `moe-core`'s MoE layer: pre-norm blocks with
//! RMSNorm, causal grouped-query attention with rotary positions, and dense or MoE SwiGLU
//! feed-forward blocks; generation with a KV cache; atomic checkpoints; Hugging Face MoE import
//! (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, Granite-MoE), streamed from memory-mapped shards in
//! their own dtype; an expert store that runs a model with only a budget of its routed experts
//! resident ([`store`], [`checkpoint::load_paged`]); quantised experts; upcycling a dense model
//! into an MoE; merging independently trained branches.
//!
//! ```no_run
//! use burn::prelude::*;
//! use moe_model::{ModelConfig, generate::{generate, Sampling}};
//!
//! let device = Device::flex();
//! let model = ModelConfig::new().init(&device).unwrap();
//! let tokens = Tensor::<2, Int>::from_ints([[72, 105, 33]], &device);
//! let out = model.forward(tokens, None);
//! assert_eq!(out.logits.dims(), [1, 3, 256]);
//! // For inference only: large routed experts laid out [out, in] on host CPUs (faster decode).
//! let model = model.for_inference();
//! let new_tokens = generate(&model, &[72, 105], 8, &Sampling::greedy(), &[]).unwrap();
//! ```
#![warn(missing_docs)]

pub mod accounting;
pub mod attention;
pub mod block;
pub mod checkpoint;
pub mod config;
pub mod durable;
pub mod error;
pub mod generate;
pub mod hf;
pub mod kv_cache;
pub mod merge;
pub mod model;
pub mod quantize;
pub mod rope;
pub mod store;
pub mod upcycle;
pub mod weights;

pub use config::{FfnPlan, ModelConfig, QkNorm, SharedExpertConfig, fill_defaults};
pub use error::{ModelError, Result};
pub use kv_cache::{KvCache, KvDtype};
pub use model::{ModelOutput, MoeLm};
