//! Routing statistics over several passes: per MoE layer sums of the statistics of each pass,
//! and the summary of a training window written to `metrics.jsonl`.

use moe_core::{RoutingStats, RoutingSummary};
use serde_json::json;

/// Adds one pass's per-layer routing statistics to an accumulator (empty at first).
pub fn merge_routing(
    acc: Vec<(usize, RoutingStats)>,
    pass: Vec<(usize, RoutingStats)>,
) -> Vec<(usize, RoutingStats)> {
    if acc.is_empty() {
        return pass;
    }
    acc.into_iter()
        .zip(pass)
        .map(|((layer, a), (_, b))| (layer, a.merge(b)))
        .collect()
}

/// Routing figures of a training window, summed over MoE layers, for `metrics.jsonl`.
pub fn routing_line(layers: &[RoutingSummary]) -> serde_json::Value {
    let n = layers.len().max(1) as f64;
    let mean = |f: &dyn Fn(&RoutingSummary) -> f64| layers.iter().map(f).sum::<f64>() / n;
    let min_share = mean(&|s| s.load_share.iter().cloned().fold(f64::INFINITY, f64::min));
    let max_share = mean(&|s| s.load_share.iter().cloned().fold(0.0, f64::max));
    json!({
        "min_share": min_share,
        "max_share": max_share,
        "load_cv": mean(&|s| s.load_cv),
        "dropped_fraction": mean(&|s| s.dropped_fraction),
        "entropy": mean(&|s| s.entropy),
        "max_violation": mean(&|s| s.max_violation),
    })
}
