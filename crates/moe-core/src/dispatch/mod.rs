//! Dispatch (tokens to expert buffers) and combine (expert outputs back to tokens).
//!
//! A token-choice plan ([`plan`]) ranks the `A = T * k` token-expert assignments per expert by a
//! counting sort on the host and lays the expert buffer out as one of:
//! - [`ExpertLayout::Padded`]: `[E, C, d]`, expert e owns rows `e*C .. e*C + C`, so all experts run
//!   as one batched matmul. With a capacity factor, C is the capacity and overflow assignments are
//!   dropped; dropless, C is the largest expert load.
//! - [`ExpertLayout::Tiered`]: padded blocks at a small capacity plus a second tier for the busy
//!   experts: dropless with bounded padding (training).
//! - [`ExpertLayout::Segments`]: expert e owns a run of exactly its load rows (dropless, no
//!   padding; inference).

mod layout;
pub mod plan;

pub use layout::{ExpertLayout, LayoutChoice, capacity};

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;

use crate::experts::Experts;
use crate::host::runs_on_host;
use plan::plan_on_host;

/// A token-choice dispatch plan, on the device.
#[derive(Debug, Clone)]
pub struct TokenDispatch {
    /// Buffer row holding each assignment's output, k-major `[A]` (row 0 where not kept).
    pub read: Tensor<1, Int>,
    /// True for an assignment that is processed; false for one dropped or belonging to padding
    /// `[A]`.
    pub kept: Tensor<1, Bool>,
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

impl TokenDispatch {
    /// Plans a token-choice dispatch: reads the chosen experts (and the mask) back, ranks them
    /// on the host ([`plan::plan_on_host`]) and uploads the plan.
    ///
    /// experts: `[T, k]` chosen experts; valid: `[T]` (padding is never dispatched).
    pub fn plan(
        experts: Tensor<2, Int>,
        valid: Option<Tensor<1, Bool>>,
        n_experts: usize,
        choice: LayoutChoice,
    ) -> Self {
        let [t, k] = experts.dims();
        let device = experts.device();
        let ids = experts.into_data().try_into_vec_as::<i64>();
        let ids = ids.expect("integer expert ids");
        let valid = valid.map(|v| {
            let v = v.int().into_data().try_into_vec_as::<i64>();
            v.expect("integer mask")
                .into_iter()
                .map(|x| x != 0)
                .collect::<Vec<_>>()
        });
        let host = plan_on_host(
            &ids,
            valid.as_deref(),
            k,
            n_experts,
            choice,
            runs_on_host(&device),
        );
        let ints = |v: &[i64]| Tensor::<1, Int>::from_ints(v, &device);
        let floats = |v: &[usize]| {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Tensor::<1>::from_floats(v.as_slice(), &device)
        };
        Self {
            read: ints(&host.read),
            kept: Tensor::from_data(TensorData::new(host.kept, [t * k]), &device),
            source: ints(&host.source),
            layout: host.layout,
            routed: floats(&host.routed),
            load: floats(&host.load),
        }
    }

    /// Gathers, runs the experts, weights and sums the k outputs of every token.
    ///
    /// x: `[T, d_model]`; weights: `[T, k]` -> `[T, d_model]`
    pub fn apply(&self, experts: &Experts, x: Tensor<2>, weights: Tensor<2>) -> Tensor<2> {
        let buffer = x.select(0, self.source.clone()); // [R, d]
        let y = self.layout.run(experts, buffer); // [R, d]
        self.combine(y, weights)
    }

    /// Weights and sums the k expert outputs of every token. Assignments not kept contribute
    /// exactly zero, by masking: a NaN or infinity in a row they would read (an unused row, a
    /// padding token's) never reaches a real token.
    ///
    /// y: `[R, d_model]` expert outputs; weights: `[T, k]` -> `[T, d_model]`
    pub fn combine(&self, y: Tensor<2>, weights: Tensor<2>) -> Tensor<2> {
        let [t, k] = weights.dims();
        let [_, d] = y.dims();
        let dropped = self.kept.clone().bool_not(); // [A]
        let y = y.select(0, self.read.clone()); // [A, d]
        let y = y.mask_fill(
            dropped.clone().unsqueeze_dim::<2>(1).expand([t * k, d]),
            0.0,
        );
        let w = weights.transpose().reshape([t * k]).mask_fill(dropped, 0.0); // [A]
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

#[cfg(test)]
mod tests {
    use super::*;

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
            layout(LayoutChoice::Capacity(0.5)),
            ExpertLayout::Padded { capacity: 1 }
        );
    }
}
