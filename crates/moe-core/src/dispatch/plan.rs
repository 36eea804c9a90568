//! The token-choice dispatch plan, computed on the host by a counting sort.
//!
//! Assignments are taken in k-major order (all first choices, then all second choices), so that
//! under a capacity limit first choices win, as in GShard and Switch. A stable counting sort by
//! expert gives each assignment its rank among those sent to the same expert, in O(T k + E)
//! time and memory. (A one-hot of assignments by experts and its cumulative sum, as many
//! implementations do on the device, costs O(T k E): 67M integers at T = 32k, k = 8, E = 256.)
//! Burn 0.22.1 has no device sort on wgpu either: its sort reads the tensor back and sorts on
//! the host, so planning there costs one read of the T k expert ids whichever way it is done.

use super::layout::{ExpertLayout, LayoutChoice};

/// A plan as host vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct HostPlan {
    /// Buffer row of each assignment, k-major `[A]` (0 where not kept).
    pub read: Vec<i64>,
    /// Whether each assignment is processed (not dropped, not padding) `[A]`.
    pub kept: Vec<bool>,
    /// The token that fills each buffer row `[R]` (token 0 for unused rows).
    pub source: Vec<i64>,
    /// Assignments each expert was sent, before capacity `[E]`.
    pub routed: Vec<usize>,
    /// Assignments each expert processes `[E]`.
    pub load: Vec<usize>,
    /// The buffer layout.
    pub layout: ExpertLayout,
}

/// Plans a token-choice dispatch.
///
/// experts: `[T, k]` row-major chosen experts (each below `n_experts`); valid: `[T]` (padding
/// is never dispatched); `on_host`: the device is a host CPU backend.
pub fn plan_on_host(
    experts: &[i64],
    valid: Option<&[bool]>,
    k: usize,
    n_experts: usize,
    choice: LayoutChoice,
    on_host: bool,
) -> HostPlan {
    let t = experts.len() / k.max(1);
    let real = |i: usize| valid.is_none_or(|v| v[i]);
    // k-major: assignment a = j * t + i is token i's j-th choice.
    let expert_of = |a: usize| experts[(a % t) * k + a / t] as usize;
    let assignments = t * k;
    let mut routed = vec![0usize; n_experts];
    for a in (0..assignments).filter(|&a| real(a % t)) {
        routed[expert_of(a)] += 1;
    }
    let tokens = (0..t).filter(|&i| real(i)).count();
    let layout = choice.layout(&routed, tokens, k, on_host);
    let rows = layout.rows(n_experts);
    let row_of = RowOf::new(&layout, n_experts);

    let mut next = vec![0usize; n_experts];
    let mut read = vec![0i64; assignments];
    let mut kept = vec![false; assignments];
    let mut source = vec![0i64; rows];
    for a in (0..assignments).filter(|&a| real(a % t)) {
        let e = expert_of(a);
        let rank = next[e];
        next[e] += 1;
        if let Some(row) = row_of.row(e, rank) {
            read[a] = row as i64;
            kept[a] = true;
            source[row] = (a % t) as i64;
        }
    }
    let load = match &layout {
        ExpertLayout::Padded { capacity } => routed.iter().map(|&r| r.min(*capacity)).collect(),
        _ => routed.clone(),
    };
    HostPlan {
        read,
        kept,
        source,
        routed,
        load,
        layout,
    }
}

/// Buffer rows of an expert's assignments, by rank, for one layout.
enum RowOf {
    Padded {
        capacity: usize,
    },
    Segments {
        starts: Vec<usize>,
    },
    Tiered {
        capacity: usize,
        first: usize,
        slot: Vec<usize>,
        overflow: usize,
    },
}

impl RowOf {
    fn new(layout: &ExpertLayout, n_experts: usize) -> Self {
        match layout {
            ExpertLayout::Padded { capacity } => Self::Padded {
                capacity: *capacity,
            },
            ExpertLayout::Segments { counts } => Self::Segments {
                starts: counts
                    .iter()
                    .scan(0, |next, &c| {
                        *next += c;
                        Some(*next - c)
                    })
                    .collect(),
            },
            ExpertLayout::Tiered {
                capacity,
                overflow,
                overflow_capacity,
            } => {
                let mut slot = vec![usize::MAX; n_experts];
                for (s, &e) in overflow.iter().enumerate() {
                    slot[e] = s;
                }
                Self::Tiered {
                    capacity: *capacity,
                    first: n_experts * capacity,
                    slot,
                    overflow: *overflow_capacity,
                }
            }
        }
    }

    /// The row of expert `e`'s assignment of this rank, or `None` when it is dropped.
    fn row(&self, e: usize, rank: usize) -> Option<usize> {
        match self {
            Self::Padded { capacity } => (rank < *capacity).then(|| e * capacity + rank),
            Self::Segments { starts } => Some(starts[e] + rank),
            Self::Tiered {
                capacity,
                first,
                slot,
                overflow,
            } => Some(match rank < *capacity {
                true => e * capacity + rank,
                false => first + slot[e] * overflow + rank - capacity,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Random routings: tokens, experts, k, each token's k distinct experts, a mask, a layout.
    fn routings() -> impl Strategy<Value = (Vec<i64>, Option<Vec<bool>>, usize, usize, LayoutChoice)>
    {
        (0usize..40, 1usize..10).prop_flat_map(|(t, e)| {
            let k = 1..=e.min(4);
            (Just(t), Just(e), k).prop_flat_map(move |(t, e, k)| {
                let token = Just((0..e as i64).collect::<Vec<_>>())
                    .prop_shuffle()
                    .prop_map(move |v| v[..k].to_vec());
                let choice = prop_oneof![
                    (0.1f64..3.0).prop_map(LayoutChoice::Capacity),
                    Just(LayoutChoice::DroplessPadded),
                    Just(LayoutChoice::DroplessTiered),
                    Just(LayoutChoice::DroplessSegments),
                    Just(LayoutChoice::DroplessAuto),
                ];
                (
                    prop::collection::vec(token, t).prop_map(|v| v.concat()),
                    prop::option::of(prop::collection::vec(any::<bool>(), t)),
                    Just(k),
                    Just(e),
                    choice,
                )
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Against a plain reference: every expert takes its assignments in k-major order;
        /// the kept ones (all of them, dropless; the first C, under a capacity) sit in distinct
        /// rows inside the buffer, in their expert's block or run, in rank order, and the row
        /// is filled from their token.
        #[test]
        fn plans_match_a_reference((experts, valid, k, e, choice) in routings(), host in any::<bool>()) {
            let t = experts.len() / k;
            let plan = plan_on_host(&experts, valid.as_deref(), k, e, choice, host);
            let rows = plan.layout.rows(e);
            prop_assert_eq!(plan.source.len(), rows);
            let real = |i: usize| valid.as_ref().is_none_or(|v| v[i]);
            let mut queue: Vec<Vec<usize>> = vec![vec![]; e];
            for j in 0..k {
                for i in (0..t).filter(|&i| real(i)) {
                    queue[experts[i * k + j] as usize].push(j * t + i);
                }
            }
            let cap = match (choice, &plan.layout) {
                (LayoutChoice::Capacity(_), ExpertLayout::Padded { capacity }) => *capacity,
                (LayoutChoice::Capacity(_), other) => panic!("capacity gave {other:?}"),
                _ => usize::MAX,
            };
            let mut used = vec![false; rows];
            for (ex, q) in queue.iter().enumerate() {
                prop_assert_eq!(plan.routed[ex], q.len());
                prop_assert_eq!(plan.load[ex], q.len().min(cap));
                let mut last = None;
                for (rank, &a) in q.iter().enumerate() {
                    prop_assert_eq!(plan.kept[a], rank < cap);
                    if rank >= cap {
                        continue;
                    }
                    let row = plan.read[a] as usize;
                    prop_assert!(row < rows && !used[row], "row {} reused or outside {}", row, rows);
                    used[row] = true;
                    prop_assert_eq!(plan.source[row] as usize, a % t);
                    prop_assert!(last.is_none_or(|l| l < row), "rank order within expert");
                    last = Some(row);
                    prop_assert_eq!(block_owner(&plan.layout, e, row), ex);
                }
            }
            // Padding and drops are never kept.
            for a in 0..t * k {
                if !real(a % t) {
                    prop_assert!(!plan.kept[a]);
                }
            }
            if !matches!(choice, LayoutChoice::Capacity(_)) {
                let total: usize = plan.routed.iter().sum();
                let busiest = plan.routed.iter().copied().max().unwrap_or(0).max(1);
                prop_assert!(rows <= e * busiest, "{} rows for loads {:?}", rows, plan.routed);
                if let ExpertLayout::Segments { .. } = plan.layout {
                    prop_assert_eq!(rows, total);
                }
            }
        }
    }

    /// The expert whose block or run holds this row.
    fn block_owner(layout: &ExpertLayout, e: usize, row: usize) -> usize {
        match layout {
            ExpertLayout::Padded { capacity } => row / capacity,
            ExpertLayout::Segments { counts } => {
                let mut end = 0;
                counts
                    .iter()
                    .position(|c| {
                        end += c;
                        row < end
                    })
                    .expect("row inside the runs")
            }
            ExpertLayout::Tiered {
                capacity,
                overflow,
                overflow_capacity,
            } => match row < e * capacity {
                true => row / capacity,
                false => overflow[(row - e * capacity) / overflow_capacity],
            },
        }
    }
}
