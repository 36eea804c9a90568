//! # moe
//!
//! Mixture-of-Experts transformer language models in Rust on [Burn](https://burn.dev).
//! This root package re-exports the workspace crates so that `cargo run --example` and
//! `cargo bench` work from the repository root:
//!
//! - [`moe_core`]: the MoE layer (routers, dispatch, balancing, accounting);
//! - [`moe_model`]: the transformer language model built from it;
//! - [`moe_train`]: data, training loops and evaluation;
//! - [`moe_bench`]: MoE against dense feed-forward blocks, measured.

pub use moe_bench;
pub use moe_core;
pub use moe_model;
pub use moe_train;
