//! `--expert-budget`, `--expert-cache` and `--kv-cache`: what a checkpoint holds in memory for
//! inference (its routed experts paged, its keys and values in half precision).

use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;
use clap::Args;
use moe_core::CachePolicy;
use moe_model::KvDtype;
use moe_model::checkpoint::{self, Checkpoint};
use moe_model::store::{ExpertStore, StoreConfig, parse_size};

/// How much of a model's routed experts stays resident.
#[derive(Args, Debug, Clone)]
pub struct BudgetArgs {
    /// Keep at most SIZE of routed-expert weights resident (e.g. 512MiB, 2GiB); the others are
    /// read from the checkpoint's weights file when routed. Default: every expert resident.
    #[arg(long, value_parser = parse_size)]
    expert_budget: Option<usize>,
    /// Which resident expert a full budget gives up: lru or lfu.
    #[arg(long, default_value = "lru", value_parser = parse_policy, requires = "expert_budget")]
    expert_cache: CachePolicy,
    /// Router look-ahead: read the experts the next layer's router picks on a background
    /// thread while the current layer computes.
    #[arg(long, requires = "expert_budget")]
    prefetch: bool,
}

/// How generation caches keys and values.
#[derive(Args, Debug, Clone)]
pub struct KvCacheArgs {
    /// How generation caches keys and values: f32 (exactly the model's), or f16 (half the
    /// memory; values rounded to 11 significant bits, attention still in f32).
    #[arg(long, default_value = "f32")]
    kv_cache: KvDtype,
}

impl KvCacheArgs {
    /// The KV cache type asked for, once `device` is known to hold it.
    pub fn on(&self, device: &Device) -> anyhow::Result<KvDtype> {
        anyhow::ensure!(
            device.supports_dtype(self.kv_cache.float_dtype()),
            "this device cannot store keys and values as {}; use --kv-cache f32",
            self.kv_cache
        );
        Ok(self.kv_cache)
    }
}

fn parse_policy(s: &str) -> Result<CachePolicy, String> {
    match CachePolicy::parse(s) {
        Some(CachePolicy::Belady) => {
            Err("belady needs the future; it is for `moe cache-sim`".into())
        }
        Some(policy) => Ok(policy),
        None => Err(format!("'{s}' is not a cache policy; use lru or lfu")),
    }
}

impl BudgetArgs {
    /// Whether a budget was asked for.
    pub fn is_set(&self) -> bool {
        self.expert_budget.is_some()
    }

    /// Loads checkpoint `dir` (or a run directory's latest checkpoint) on `device` for
    /// inference (`Checkpoint::for_inference`): fully resident, or paged under the budget.
    pub fn load(
        &self,
        dir: &Path,
        device: &Device,
    ) -> anyhow::Result<(Checkpoint, Option<Arc<ExpertStore>>)> {
        let dir = &crate::resolve_checkpoint(dir)?;
        let (ckpt, store) = match self.expert_budget {
            None => (checkpoint::load(dir, device)?, None),
            Some(budget_bytes) => {
                let config = StoreConfig {
                    budget_bytes,
                    policy: self.expert_cache,
                    prefetch: self.prefetch,
                };
                let (ckpt, store) = checkpoint::load_paged(dir, device, config)?;
                (ckpt, Some(store))
            }
        };
        Ok((ckpt.for_inference(), store))
    }
}
