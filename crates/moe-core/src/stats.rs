//! Routing statistics: kept on the device during training (no sync per step), summarised on the
//! host when someone wants to read them.

use burn::prelude::*;

/// Routing statistics of one forward pass, or of many accumulated with [`RoutingStats::merge`].
///
/// Every field is a device tensor; nothing is read back until [`RoutingStats::summary`].
#[derive(Debug, Clone)]
pub struct RoutingStats {
    /// Assignments each expert processed `[E]`.
    pub load: Tensor<1>,
    /// Assignments the router sent to each expert, before any capacity limit `[E]`.
    pub routed: Tensor<1>,
    /// Token choice: token-expert assignments dropped by the capacity limit. Expert choice:
    /// real tokens no expert picked. Scalar `[1]`.
    pub dropped: Tensor<1>,
    /// What `dropped` is a share of: assignments requested (tokens x k) for token choice, real
    /// tokens for expert choice. Scalar `[1]`.
    pub requested: Tensor<1>,
    /// Sum over real tokens of the router entropy (nats). Scalar `[1]`.
    pub entropy_sum: Tensor<1>,
    /// Real (non-padding) tokens routed. Scalar `[1]`.
    pub tokens: Tensor<1>,
    /// Token choice: the experts each token picked `[T, k]` (padding included), for routing
    /// traces. `None` for expert choice and for merged statistics.
    pub choices: Option<Tensor<2, Int>>,
}

/// Host-side view of [`RoutingStats`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoutingSummary {
    /// Assignments each expert processed.
    pub load: Vec<f64>,
    /// Each expert's share of the processed assignments (sums to 1 when anything was processed).
    pub load_share: Vec<f64>,
    /// Dropped assignments (token choice) or unpicked tokens (expert choice).
    pub dropped: f64,
    /// `dropped` as a share of what was requested.
    pub dropped_fraction: f64,
    /// Mean router entropy per token, in nats (ln E for a uniform router).
    pub entropy: f64,
    /// Max-load violation `max_i load_i / mean_load - 1` (0 when perfectly balanced).
    pub max_violation: f64,
    /// Coefficient of variation of the load (std / mean).
    pub load_cv: f64,
    /// Real tokens routed.
    pub tokens: f64,
}

impl RoutingStats {
    /// Adds another pass's statistics (same number of experts).
    pub fn merge(self, other: Self) -> Self {
        Self {
            load: self.load + other.load,
            routed: self.routed + other.routed,
            dropped: self.dropped + other.dropped,
            requested: self.requested + other.requested,
            entropy_sum: self.entropy_sum + other.entropy_sum,
            tokens: self.tokens + other.tokens,
            choices: None,
        }
    }

    /// Detaches every tensor from the autodiff graph (for accumulating across steps).
    pub fn detach(self) -> Self {
        Self {
            load: self.load.detach(),
            routed: self.routed.detach(),
            dropped: self.dropped.detach(),
            requested: self.requested.detach(),
            entropy_sum: self.entropy_sum.detach(),
            tokens: self.tokens.detach(),
            choices: self.choices,
        }
    }

    /// Moves every tensor to `device` (to merge statistics of data-parallel shards).
    pub fn to_device(self, device: &Device) -> Self {
        Self {
            load: self.load.to_device(device),
            routed: self.routed.to_device(device),
            dropped: self.dropped.to_device(device),
            requested: self.requested.to_device(device),
            entropy_sum: self.entropy_sum.to_device(device),
            tokens: self.tokens.to_device(device),
            choices: self.choices.map(|c| c.to_device(device)),
        }
    }

    /// Reads the statistics back and derives the summary figures.
    pub fn summary(&self) -> RoutingSummary {
        let scalar = |t: &Tensor<1>| host_floats(t.clone())[0];
        let load = host_floats(self.load.clone());
        let total: f64 = load.iter().sum();
        let e = load.len().max(1) as f64;
        let mean = total / e;
        let load_share = load
            .iter()
            .map(|l| if total > 0.0 { l / total } else { 0.0 })
            .collect();
        let (max_violation, load_cv) = if mean > 0.0 {
            let max = load.iter().cloned().fold(f64::MIN, f64::max);
            let var = load.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / e;
            (max / mean - 1.0, var.sqrt() / mean)
        } else {
            (0.0, 0.0)
        };
        let (dropped, requested) = (scalar(&self.dropped), scalar(&self.requested));
        let tokens = scalar(&self.tokens);
        RoutingSummary {
            load,
            load_share,
            dropped,
            dropped_fraction: if requested > 0.0 {
                dropped / requested
            } else {
                0.0
            },
            entropy: if tokens > 0.0 {
                scalar(&self.entropy_sum) / tokens
            } else {
                0.0
            },
            max_violation,
            load_cv,
            tokens,
        }
    }
}

/// Reads a small float tensor back to the host.
pub(crate) fn host_floats(t: Tensor<1>) -> Vec<f64> {
    t.into_data()
        .try_into_vec_as::<f64>()
        .expect("float tensor data")
}
