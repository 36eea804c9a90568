//! A whole `moe bench` run: every case measured against the plain matmul, the MoE / dense
//! ratios, the breakdowns, and the cases the device could not run.

use std::collections::BTreeMap;

use burn::prelude::*;
use moe_core::RouterConfig;
use serde::Serialize;

use crate::breakdown::{Breakdown, breakdown};
use crate::sizes::BenchSizes;
use crate::suite::{RATIOS, moe_config, selected_cases};
use crate::timing::{BenchBudget, Read, matmul_gflops};

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Achieved GFLOP/s (matmul FLOPs of the active parameters).
    pub gflops: f64,
    /// Median milliseconds per call.
    pub ms: f64,
    /// Share of the backend's plain matmul GFLOP/s.
    pub matmul_share: f64,
}

/// Everything one `moe bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The device's name.
    pub device: String,
    /// Plain matmul throughput `[T, d] x [d, 4d]` on this device, GFLOP/s.
    pub matmul_gflops: f64,
    /// Every case.
    pub cases: Vec<CaseResult>,
    /// MoE tokens/s divided by dense tokens/s, by comparison name.
    pub ratios: BTreeMap<String, f64>,
    /// Time per stage of MoE forward passes.
    pub breakdown: Vec<Breakdown>,
    /// Cases the device could not run, with why (e.g. a buffer over the adapter's limit).
    pub failed: Vec<FailedCase>,
}

/// A case the device could not run.
#[derive(Debug, Clone, Serialize)]
pub struct FailedCase {
    /// Case name.
    pub name: String,
    /// The device's error, one line.
    pub error: String,
}

/// Runs every case and computes the ratios and breakdowns. A case the device cannot run is
/// listed in `failed` (its ratios are left out); only a failing plain matmul fails the run.
pub fn run(
    device: &Device,
    device_name: &str,
    sizes: &BenchSizes,
    budget: &BenchBudget,
) -> Read<BenchReport> {
    run_selected(device, device_name, sizes, budget, &|_| true)
}

/// [`run`] for the cases whose names `select` accepts (and the breakdowns of those cases); the
/// ratios are those whose two cases both ran.
pub fn run_selected(
    device: &Device,
    device_name: &str,
    sizes: &BenchSizes,
    budget: &BenchBudget,
    select: &dyn Fn(&str) -> bool,
) -> Read<BenchReport> {
    let matmul = matmul_gflops(sizes, budget, device)?;
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for case in selected_cases(sizes, device, select) {
        let secs = match case.measure(budget) {
            Ok(secs) => secs,
            Err(error) => {
                failed.push(FailedCase {
                    name: case.name,
                    error,
                });
                continue;
            }
        };
        let gflops = case.flops / secs / 1e9;
        results.push(CaseResult {
            name: case.name,
            tokens_per_s: case.tokens as f64 / secs,
            gflops,
            ms: secs * 1e3,
            matmul_share: gflops / matmul,
        });
    }
    let tps = |name: &str| {
        results
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.tokens_per_s)
    };
    let ratios = RATIOS
        .iter()
        .filter_map(|(ratio, moe, dense)| Some((ratio.to_string(), tps(moe)? / tps(dense)?)))
        .collect();
    let mut breakdowns = Vec::new();
    for (name, experts, d_ff) in [
        ("moe_top2_fwd", sizes.experts, sizes.expert_d_ff),
        ("moe_e64_top2_fwd", sizes.fine_experts, sizes.fine_d_ff),
    ]
    .into_iter()
    .filter(|(name, ..)| select(name))
    {
        let config = moe_config(sizes, experts, d_ff, RouterConfig::mixtral());
        match breakdown(name, sizes, config, budget, device) {
            Ok(b) => breakdowns.push(b),
            Err(error) => failed.push(FailedCase {
                name: format!("breakdown of {name}"),
                error,
            }),
        }
    }
    Ok(BenchReport {
        device: device_name.into(),
        matmul_gflops: matmul,
        cases: results,
        ratios,
        breakdown: breakdowns,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_tiny_run_measures_every_case_and_ratio() {
        let sizes = BenchSizes {
            tokens: 32,
            d_model: 16,
            experts: 4,
            expert_d_ff: 8,
            fine_experts: 8,
            fine_d_ff: 4,
        };
        let budget = BenchBudget {
            min_iters: 1,
            min_time: Duration::ZERO,
            max_iters: 1,
        };
        let report = run(&Device::flex(), "flex", &sizes, &budget).unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(report.cases.len(), 15);
        for c in &report.cases {
            assert!(c.tokens_per_s.is_finite() && c.tokens_per_s > 0.0, "{c:?}");
            assert!(c.gflops > 0.0, "{c:?}");
        }
        assert_eq!(report.ratios.len(), RATIOS.len());
        assert!(report.ratios.values().all(|r| r.is_finite() && *r > 0.0));
        assert_eq!(report.breakdown.len(), 2);
        assert_eq!(report.breakdown[0].stages.len(), 6);
    }

    #[test]
    fn a_selected_run_measures_only_the_selected_cases_and_their_ratios() {
        let sizes = BenchSizes {
            tokens: 16,
            d_model: 8,
            experts: 4,
            expert_d_ff: 4,
            fine_experts: 8,
            fine_d_ff: 2,
        };
        let budget = BenchBudget {
            min_iters: 1,
            min_time: Duration::ZERO,
            max_iters: 1,
        };
        let select = |name: &str| name.ends_with("active_fwd") || name == "moe_top2_fwd";
        let report = run_selected(&Device::flex(), "flex", &sizes, &budget, &select).unwrap();
        let names: Vec<_> = report.cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["dense_active_fwd", "moe_top2_fwd"]);
        let ratios: Vec<_> = report.ratios.keys().map(String::as_str).collect();
        assert_eq!(ratios, ["moe_vs_dense_active_fwd"]);
        assert_eq!(report.breakdown.len(), 1);
        assert_eq!(report.breakdown[0].case, "moe_top2_fwd");
    }
}
