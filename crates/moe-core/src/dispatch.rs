//! Dispatch (tokens to expert buffers) and combine (expert outputs back to tokens).
//!
//! Token choice works on the `A = T * k` token-expert assignments in k-major order (all first
//! choices, then all second choices), so that under a capacity limit first choices win, as in
//! GShard and Switch. Each assignment gets a row in the expert buffer from a cumulative count of
//! earlier assignments to the same expert; no sort is needed and all of it runs on the device.
//! Two buffer layouts:
//! - [`ExpertLayout::Padded`]: `[E, C, d]`, expert e owns rows `e*C .. e*C + C`, so all experts run
//!   as one batched matmul. With a capacity factor, C is the capacity and overflow assignments are
//!   dropped; dropless, C is the largest expert load (one scalar read back).
//! - [`ExpertLayout::Segments`]: expert e owns a run of exactly its load rows (dropless, no
//!   padding); the E loads are read back to cut the runs.

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;

use crate::experts::Experts;
use crate::host::runs_on_host;

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
}

impl ExpertLayout {
    /// Runs the experts on the buffer.
    ///
    /// buffer: `[R, d_model]` -> `[R, d_model]`
    pub fn run(&self, experts: &Experts, buffer: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Padded { capacity } => {
                let [rows, d] = buffer.dims();
                let e = rows / capacity;
                experts
                    .forward_padded(buffer.reshape([e, *capacity, d])) // [E, C, d]
                    .reshape([rows, d])
            }
            Self::Segments { counts } => experts.forward_segments(buffer, counts),
        }
    }
}

/// A token-choice dispatch plan.
#[derive(Debug, Clone)]
pub struct TokenDispatch {
    /// Buffer row holding each assignment's output `[A]` (row 0 for dropped ones).
    pub read: Tensor<1, Int>,
    /// 1 for an assignment that is processed, 0 for one dropped or belonging to padding `[A]`.
    pub keep: Tensor<1>,
    /// The token that fills each buffer row `[R]` (token 0 for unused padded rows, whose output
    /// is never read).
    pub source: Tensor<1, Int>,
    /// The buffer layout.
    pub layout: ExpertLayout,
    /// Assignments each expert was sent, before capacity `[E]`.
    pub routed: Tensor<1>,
    /// Assignments each expert processes `[E]`.
    pub load: Tensor<1>,
}

/// Which layout a token-choice plan should use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayoutChoice {
    /// Padded blocks of a fixed capacity; overflow is dropped.
    Capacity(usize),
    /// Padded blocks sized to the busiest expert; nothing dropped.
    DroplessPadded,
    /// Exact runs per expert; nothing dropped.
    DroplessSegments,
    /// Exact runs on a host CPU backend, or elsewhere when experts get many rows each (or
    /// padding would more than double the rows); padded blocks otherwise. Nothing dropped.
    DroplessAuto,
}

/// Mean rows per busy expert from which [`LayoutChoice::DroplessAuto`] cuts exact runs on an
/// asynchronous device (wgpu): one matmul per expert is then efficient and padding is pure
/// waste. Below it (fine-grained experts), one batched matmul beats many small ones there. On a
/// host CPU backend exact runs always win, because their chains run side by side on the cores
/// ([`crate::host::map_on_cores`]); docs/benchmarks.md has the measurements.
pub const SEGMENT_MIN_ROWS: usize = 128;

/// Whether [`LayoutChoice::DroplessAuto`] cuts exact runs for these expert loads.
fn auto_cuts_runs(counts: &[usize], on_host: bool) -> bool {
    let total: usize = counts.iter().sum();
    let busiest = counts.iter().copied().max().unwrap_or(0);
    let busy = counts.iter().filter(|&&c| c > 0).count().max(1);
    total > 0 && (on_host || total >= SEGMENT_MIN_ROWS * busy || counts.len() * busiest > 2 * total)
}

impl TokenDispatch {
    /// Plans a token-choice dispatch.
    ///
    /// experts: `[T, k]` chosen experts; valid: `[T]` (padding is never dispatched).
    pub fn plan(
        experts: Tensor<2, Int>,
        valid: Option<Tensor<1, Bool>>,
        n_experts: usize,
        choice: LayoutChoice,
    ) -> Self {
        let [t, k] = experts.dims();
        let a = t * k;
        let device = experts.device();
        let flat = experts.transpose().reshape([a]); // [A], k-major
        let valid = valid.map(|v| v.int().unsqueeze_dim::<2>(0).repeat_dim(0, k).reshape([a]));
        // One-hot by comparison: device-only, and valid for a single expert (Tensor::one_hot
        // wants at least 2 classes and checks its input on the host).
        let experts_row =
            Tensor::<1, Int>::arange(0..n_experts as i64, &device).reshape([1, n_experts]);
        let mut one_hot = flat.clone().reshape([a, 1]).equal(experts_row).int(); // [A, E]
        if let Some(v) = &valid {
            one_hot = one_hot * v.clone().unsqueeze_dim(1);
        }
        let routed = one_hot.clone().sum_dim(0).reshape([n_experts]); // [E]
        // Rank of each assignment among those sent to the same expert.
        let rank = one_hot
            .cumsum(0)
            .gather(1, flat.clone().unsqueeze_dim(1))
            .reshape([a])
            .sub_scalar(1); // [A]

        // Dropless layouts read the E loads back (E integers, never the scores).
        let (segments, busiest) = match choice {
            LayoutChoice::Capacity(_) => (None, None),
            LayoutChoice::DroplessPadded => (
                None,
                Some(routed.clone().max().into_scalar::<i64>() as usize),
            ),
            LayoutChoice::DroplessSegments | LayoutChoice::DroplessAuto => {
                let counts = host_ints(routed.clone());
                let busiest = counts.iter().copied().max().unwrap_or(0);
                let segments = match choice {
                    LayoutChoice::DroplessSegments => busiest > 0,
                    _ => auto_cuts_runs(&counts, runs_on_host(&device)),
                };
                (segments.then_some(counts), Some(busiest))
            }
        };
        let (row, keep, layout, load) = match segments {
            Some(counts) => {
                let offsets: Vec<i64> = counts
                    .iter()
                    .scan(0i64, |acc, &c| {
                        let start = *acc;
                        *acc += c as i64;
                        Some(start)
                    })
                    .collect();
                let offsets = Tensor::<1, Int>::from_ints(offsets.as_slice(), &device);
                let row = offsets.select(0, flat) + rank; // [A]
                let keep = valid.unwrap_or_else(|| Tensor::ones([a], &device));
                (row, keep, ExpertLayout::Segments { counts }, routed.clone())
            }
            // Padded; also the dropless fallback when no valid token is left to cut runs for.
            None => {
                let capacity = match choice {
                    LayoutChoice::Capacity(c) => c,
                    _ => busiest.unwrap_or(0),
                }
                .max(1);
                let row = flat.mul_scalar(capacity as i64) + rank.clone();
                let mut keep = rank.lower_elem(capacity as i64).int(); // [A]
                if let Some(v) = valid {
                    keep = keep * v;
                }
                let load = routed.clone().clamp_max(capacity as i64);
                (row, keep, ExpertLayout::Padded { capacity }, load)
            }
        };
        let rows = match &layout {
            ExpertLayout::Padded { capacity } => n_experts * capacity,
            ExpertLayout::Segments { counts } => counts.iter().sum(),
        };
        // Dropped assignments write to a spare row `rows`, cut off afterwards.
        let read = row * keep.clone(); // [A]
        let write = read.clone() + keep.clone().neg().add_scalar(1).mul_scalar(rows as i64);
        let tokens = Tensor::<1, Int>::arange(0..a as i64, &device).remainder_scalar(t as i64);
        let source = Tensor::<1, Int>::zeros([rows + 1], &device)
            .select_assign(0, write, tokens, IndexingUpdateOp::Assign)
            .slice(0..rows); // [R]
        Self {
            read,
            keep: keep.float(),
            source,
            layout,
            routed: routed.float(),
            load: load.float(),
        }
    }

    /// Gathers, runs the experts, weights and sums the k outputs of every token.
    ///
    /// x: `[T, d_model]`; weights: `[T, k]` -> `[T, d_model]`
    pub fn apply(&self, experts: &Experts, x: Tensor<2>, weights: Tensor<2>) -> Tensor<2> {
        let [t, d] = x.dims();
        let [_, k] = weights.dims();
        let buffer = x.select(0, self.source.clone()); // [R, d]
        let y = self.layout.run(experts, buffer); // [R, d]
        let y = y.select(0, self.read.clone()); // [A, d]
        let w = weights.transpose().reshape([t * k]) * self.keep.clone(); // [A]
        (y * w.unsqueeze_dim(1))
            .reshape([k, t, d])
            .sum_dim(0)
            .reshape([t, d])
    }

    /// Assignments dropped by the capacity limit (scalar `[1]`).
    pub fn dropped(&self) -> Tensor<1> {
        (self.routed.clone() - self.load.clone()).sum()
    }
}

/// An expert-choice dispatch: expert e processes tokens `tokens[e]`.
///
/// x: `[T, d_model]`; tokens, weights: `[E, C]` -> `[T, d_model]`
pub fn expert_choice_apply(
    experts: &Experts,
    x: Tensor<2>,
    tokens: Tensor<2, Int>,
    weights: Tensor<2>,
) -> Tensor<2> {
    let [t, d] = x.dims();
    let [e, c] = tokens.dims();
    let source = tokens.reshape([e * c]); // [E*C]
    let device = x.device();
    let buffer = x.select(0, source.clone()); // [E*C, d]
    // Every expert has exactly C rows: no padding either way, but on the host the chains run
    // side by side, which beats one batched matmul there.
    let layout = match runs_on_host(&device) {
        true => ExpertLayout::Segments { counts: vec![c; e] },
        false => ExpertLayout::Padded { capacity: c },
    };
    let y = layout.run(experts, buffer); // [E*C, d]
    let y = y * weights.reshape([e * c, 1]);
    Tensor::zeros([t, d], &device).select_assign(0, source, y, IndexingUpdateOp::Add)
}

/// Reads a small integer tensor back to the host.
fn host_ints(t: Tensor<1, Int>) -> Vec<usize> {
    t.into_data()
        .try_into_vec_as::<i64>()
        .expect("integer tensor data")
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pads_small_even_loads_off_host_and_cuts_runs_otherwise() {
        // 8 experts, 8 assignments. Even: 4 experts take 2 each, padding to 2 rows each makes
        // 16 rows, exactly double: padded off the host. Skewed: expert 0 takes 4, padding would
        // make 32 rows for 8: runs.
        let even = [2, 2, 2, 2, 0, 0, 0, 0];
        let skewed = [4, 2, 1, 1, 0, 0, 0, 0];
        let many = [SEGMENT_MIN_ROWS, SEGMENT_MIN_ROWS, 0, 0, 0, 0, 0, 0];
        assert!(!auto_cuts_runs(&even, false));
        assert!(auto_cuts_runs(&skewed, false));
        assert!(auto_cuts_runs(&many, false));
        // On the host, chains run side by side: always runs, unless nothing was routed.
        assert!(auto_cuts_runs(&even, true));
        assert!(!auto_cuts_runs(&[0; 8], true));
    }

    #[test]
    fn plans_take_the_layout_they_are_asked_for() {
        let layout = |choice| {
            let device = Device::flex();
            let experts =
                Tensor::<1, Int>::from_ints([0, 1, 2, 3, 1, 0, 3, 2], &device).reshape([4, 2]);
            TokenDispatch::plan(experts, None, 8, choice).layout
        };
        let runs = ExpertLayout::Segments {
            counts: vec![2, 2, 2, 2, 0, 0, 0, 0],
        };
        assert_eq!(layout(LayoutChoice::DroplessSegments), runs);
        assert_eq!(layout(LayoutChoice::DroplessAuto), runs);
        assert_eq!(
            layout(LayoutChoice::DroplessPadded),
            ExpertLayout::Padded { capacity: 2 }
        );
        assert_eq!(
            layout(LayoutChoice::Capacity(1)),
            ExpertLayout::Padded { capacity: 1 }
        );
    }
}
