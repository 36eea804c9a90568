//! Where each expert's rows sit in the expert buffer, and which layout a plan should take.

use burn::prelude::*;

use crate::experts::Experts;

/// Where each expert's rows sit in the expert buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertLayout {
    /// `E` blocks of `capacity` rows each.
    Padded {
        /// Rows per expert.
        capacity: usize,
    },
    /// Expert e owns `counts[e]` consecutive rows.
    Segments {
        /// Rows per expert.
        counts: Vec<usize>,
    },
    /// Dropless with bounded padding: `E` blocks of `capacity` rows (every expert's first
    /// `capacity` assignments), then one block of `overflow_capacity` rows for each expert in
    /// `overflow` (its assignments past `capacity`). Where one expert takes most tokens, blocks
    /// padded to the busiest expert ([`ExpertLayout::Padded`]) hold up to E times the
    /// assignments; two tiers hold at most `2 sqrt(E)` times as many. Both tiers are batched
    /// matmuls over stacked weights, so the backward pass stays cheap.
    Tiered {
        /// Rows per expert in the first tier.
        capacity: usize,
        /// Experts with more than `capacity` assignments, in expert order.
        overflow: Vec<usize>,
        /// Rows per overflowing expert in the second tier.
        overflow_capacity: usize,
    },
}

impl ExpertLayout {
    /// Rows of the expert buffer.
    pub fn rows(&self, n_experts: usize) -> usize {
        match self {
            Self::Padded { capacity } => n_experts * capacity,
            Self::Segments { counts } => counts.iter().sum(),
            Self::Tiered {
                capacity,
                overflow,
                overflow_capacity,
            } => n_experts * capacity + overflow.len() * overflow_capacity,
        }
    }

    /// Runs the experts on the buffer.
    ///
    /// buffer: `[R, d_model]` -> `[R, d_model]`
    pub fn run(&self, experts: &Experts, buffer: Tensor<2>) -> Tensor<2> {
        let [rows, d] = buffer.dims();
        match self {
            Self::Padded { capacity } => {
                let e = rows / capacity;
                experts
                    .forward_padded(buffer.reshape([e, *capacity, d])) // [E, C, d]
                    .reshape([rows, d])
            }
            Self::Segments { counts } => experts.forward_segments(buffer, counts),
            Self::Tiered {
                capacity,
                overflow,
                overflow_capacity,
            } => {
                let e = experts.n_experts();
                let first = e * capacity;
                let main = buffer.clone().slice(0..first).reshape([e, *capacity, d]);
                let over =
                    buffer
                        .slice(first..rows)
                        .reshape([overflow.len(), *overflow_capacity, d]);
                let ids: Vec<i64> = overflow.iter().map(|&i| i as i64).collect();
                let ids = Tensor::<1, Int>::from_ints(ids.as_slice(), &over.device());
                let main = experts.forward_padded(main).reshape([first, d]);
                let over = experts.forward_subset(over, ids).reshape([rows - first, d]);
                Tensor::cat(vec![main, over], 0)
            }
        }
    }
}

/// Which layout a token-choice plan should use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayoutChoice {
    /// Padded blocks of `ceil(factor * real_tokens * k / E)` rows (at least 1, at most the real
    /// tokens); overflow is dropped.
    Capacity(f64),
    /// Padded blocks sized to the busiest expert; nothing dropped.
    DroplessPadded,
    /// Padded blocks sized to the mean load plus a second tier for the busier experts
    /// ([`ExpertLayout::Tiered`]) when that holds at most half the rows, otherwise padded to
    /// the busiest (at most `4 sqrt(E)` times the assignments either way); nothing dropped. Training's default: the work stays bounded when routing
    /// collapses.
    DroplessTiered,
    /// Exact runs per expert; nothing dropped. Inference only.
    DroplessSegments,
    /// Exact runs on a host CPU backend, where their chains run side by side on the cores
    /// ([`crate::host::map_on_cores`]). Elsewhere (wgpu) padded blocks, one batched matmul,
    /// unless padding would more than double the rows: on a GPU one matmul per expert leaves
    /// most of it idle (on an H200, 8 experts of 512 rows ran 2.6-2.7x slower as runs than as
    /// padded blocks; docs/benchmarks.md). Nothing dropped. Inference only.
    DroplessAuto,
}

/// Per-expert capacity `ceil(factor * tokens * k / E)`, at least 1 and at most `max(tokens, 1)`.
/// `tokens` counts real tokens only, so padding never changes what real tokens get.
pub fn capacity(factor: f64, tokens: usize, k: usize, n_experts: usize) -> usize {
    let c = (factor * (tokens * k) as f64 / n_experts as f64).ceil() as usize;
    c.clamp(1, tokens.max(1))
}

impl LayoutChoice {
    /// The layout for these per-expert loads (assignments after routing, padding excluded).
    /// `tokens`: real tokens; `k`: experts per token; `on_host`: a host CPU backend.
    pub fn layout(self, counts: &[usize], tokens: usize, k: usize, on_host: bool) -> ExpertLayout {
        let busiest = counts.iter().copied().max().unwrap_or(0).max(1);
        let padded = |capacity| ExpertLayout::Padded { capacity };
        match self {
            Self::Capacity(factor) => padded(capacity(factor, tokens, k, counts.len())),
            Self::DroplessPadded => padded(busiest),
            Self::DroplessTiered => tiered(counts).unwrap_or_else(|| padded(busiest)),
            Self::DroplessSegments if counts.iter().any(|&c| c > 0) => ExpertLayout::Segments {
                counts: counts.to_vec(),
            },
            Self::DroplessAuto if auto_cuts_runs(counts, on_host) => ExpertLayout::Segments {
                counts: counts.to_vec(),
            },
            Self::DroplessSegments | Self::DroplessAuto => padded(busiest),
        }
    }
}

/// The two-tier layout with the fewest rows for these loads, when it holds at most half the rows
/// of blocks padded to the busiest expert (short of that, one batched matmul is cheaper than two
/// plus the scatter of the second tier's weight gradient: measured on wgpu).
///
/// With first-tier capacity C, the rows are `E C + n_over(C) (busiest - C)`, linear in C between
/// two loads, so the best C is 1 or one of the loads. Since `n_over(C) <= total / C`, the best
/// is at most `2 sqrt(E)` times the assignments (`E` times when padded to the busiest), and
/// close to the assignments themselves when one expert takes nearly everything.
fn tiered(counts: &[usize]) -> Option<ExpertLayout> {
    let e = counts.len();
    let busiest = counts.iter().copied().max().unwrap_or(0);
    let layout = |capacity: usize| ExpertLayout::Tiered {
        capacity,
        overflow: (0..e).filter(|&i| counts[i] > capacity).collect(),
        overflow_capacity: busiest.saturating_sub(capacity),
    };
    let best = std::iter::once(1)
        .chain(counts.iter().copied().filter(|&c| c > 1))
        .map(layout)
        .min_by_key(|l| l.rows(e))?;
    (2 * best.rows(e) <= e * busiest).then_some(best)
}

/// Whether [`LayoutChoice::DroplessAuto`] cuts exact runs for these expert loads.
fn auto_cuts_runs(counts: &[usize], on_host: bool) -> bool {
    let total: usize = counts.iter().sum();
    let busiest = counts.iter().copied().max().unwrap_or(0);
    total > 0 && (on_host || counts.len() * busiest > 2 * total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pads_off_host_unless_padding_more_than_doubles_the_rows() {
        // 8 experts, 8 assignments. Even: 4 experts take 2 each, padding to 2 rows each makes
        // 16 rows, exactly double: padded off the host. Skewed: expert 0 takes 4, padding would
        // make 32 rows for 8: runs. Many rows each, evenly: padded (one batched matmul).
        let even = [2, 2, 2, 2, 0, 0, 0, 0];
        let skewed = [4, 2, 1, 1, 0, 0, 0, 0];
        let many = [512, 530, 498, 512, 505, 520, 511, 508];
        assert!(!auto_cuts_runs(&even, false));
        assert!(auto_cuts_runs(&skewed, false));
        assert!(!auto_cuts_runs(&many, false));
        assert!(auto_cuts_runs(&many, true));
        // On the host, chains run side by side: always runs, unless nothing was routed.
        assert!(auto_cuts_runs(&even, true));
        assert!(!auto_cuts_runs(&[0; 8], true));
    }

    #[test]
    fn tiers_bound_the_rows_of_collapsed_routing() {
        // Everything on expert 0: padding to the busiest makes 8 x 64 rows for 64; one row per
        // expert plus 63 for expert 0 makes 71.
        let collapsed = [64, 0, 0, 0, 0, 0, 0, 0];
        let layout = LayoutChoice::DroplessTiered.layout(&collapsed, 32, 2, false);
        let expected = ExpertLayout::Tiered {
            capacity: 1,
            overflow: vec![0],
            overflow_capacity: 63,
        };
        assert_eq!(layout, expected);
        assert_eq!(layout.rows(8), 71);
        // One busy expert among modest ones: 8 rows each, then 22 more for expert 0.
        let skewed = [30, 9, 9, 9, 7, 0, 0, 0];
        let layout = LayoutChoice::DroplessTiered.layout(&skewed, 32, 2, false);
        assert_eq!(layout.rows(8), 72 + 21);
        // Balanced loads keep one padded block per expert.
        let even = [8, 8, 8, 9, 7, 8, 8, 8];
        assert_eq!(
            LayoutChoice::DroplessTiered.layout(&even, 32, 2, false),
            ExpertLayout::Padded { capacity: 9 }
        );
    }

    #[test]
    fn capacity_counts_real_tokens_and_stays_in_range() {
        assert_eq!(capacity(1.0, 10, 2, 4), 5);
        assert_eq!(capacity(1.25, 10, 2, 4), 7);
        assert_eq!(capacity(100.0, 10, 2, 4), 10);
        assert_eq!(capacity(1.0, 0, 2, 4), 1);
    }
}
