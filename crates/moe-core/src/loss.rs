//! Auxiliary router losses. Padding tokens are excluded from every mean (masked out, so that
//! whatever a padding row holds, NaN included, never reaches the loss).

use burn::prelude::*;

/// Switch Transformer load-balancing loss `E * sum_i f_i * P_i`.
///
/// `f_i` is the share of assignments routed to expert i (not differentiable) and `P_i` the mean
/// router probability of expert i over real tokens (differentiable). It is 1 for perfectly uniform
/// routing and E when every token goes to one expert with probability 1.
///
/// routed: `[E]` assignments per expert; probs: `[T, E]`; valid: `[T]` (1 real, 0 padding).
/// Returns a scalar `[1]`.
pub fn load_balancing_loss(
    routed: Tensor<1>,
    probs: Tensor<2>,
    valid: Option<Tensor<1>>,
) -> Tensor<1> {
    let [_, e] = probs.dims();
    let f = routed.clone() / routed.sum().clamp_min(1.0); // [E]
    let p = masked_mean_rows(probs, valid); // [E]
    (f * p).sum().mul_scalar(e as f64)
}

/// Router z-loss `mean(logsumexp(logits)^2)` (ST-MoE): keeps gate logits small and stable.
///
/// logits: `[T, E]`; valid: `[T]`. Returns a scalar `[1]`.
pub fn router_z_loss(logits: Tensor<2>, valid: Option<Tensor<1>>) -> Tensor<1> {
    let lse = log_sum_exp(logits); // [T, 1]
    masked_mean_rows(lse.powi_scalar(2), valid) // [1]
}

/// Sum over real tokens of the router entropy `-sum_i p_i ln p_i` (divide by the token count for
/// the mean; kept as a sum so batches accumulate). probs: `[T, E]`. Returns a scalar `[1]`.
pub fn entropy_sum(probs: Tensor<2>, valid: Option<Tensor<1>>) -> Tensor<1> {
    let [t, _] = probs.dims();
    let h = (probs.clone() * probs.clamp_min(1e-20).log())
        .sum_dim(1)
        .neg()
        .reshape([t]); // [T]
    match valid {
        Some(v) => h.mask_fill(v.equal_elem(0.0), 0.0).sum(),
        None => h.sum(),
    }
}

/// `log(sum(exp(x)))` along dim 1, computed stably. x: `[T, E]` -> `[T, 1]`
pub fn log_sum_exp(x: Tensor<2>) -> Tensor<2> {
    let max = x.clone().max_dim(1).detach(); // [T, 1]
    (x - max.clone()).exp().sum_dim(1).log() + max
}

/// Mean over the rows of x, counting only valid rows. x: `[T, N]` -> `[N]`
fn masked_mean_rows(x: Tensor<2>, valid: Option<Tensor<1>>) -> Tensor<1> {
    let [t, n] = x.dims();
    match valid {
        Some(v) => {
            let count = v.clone().sum().clamp_min(1.0); // [1]
            // Masked, not multiplied by 0: a NaN in a padding row must not leak into the mean.
            let padding = v.equal_elem(0.0).unsqueeze_dim::<2>(1).expand([t, n]);
            x.mask_fill(padding, 0.0).sum_dim(0).reshape([n]) / count
        }
        None => x.sum_dim(0).reshape([n]).div_scalar(t as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{test_device, values};
    use rstest::rstest;

    fn scalar(t: Tensor<1>) -> f32 {
        values(t)[0]
    }

    #[rstest]
    fn balance_loss_hand_computed(#[values("flex", "ndarray", "wgpu")] backend: &str) {
        let Some(device) = test_device(backend) else {
            return;
        };
        let e = 4;
        // Uniform: f_i = P_i = 1/E -> E * E * (1/E^2) = 1, its minimum.
        let uniform = load_balancing_loss(
            Tensor::from_floats([5.0, 5.0, 5.0, 5.0], &device),
            Tensor::full([8, e], 0.25, &device),
            None,
        );
        assert!((scalar(uniform) - 1.0).abs() < 1e-6);
        // Collapse: every token to expert 0 with probability 1 -> E.
        let collapsed = load_balancing_loss(
            Tensor::from_floats([8.0, 0.0, 0.0, 0.0], &device),
            Tensor::<1>::from_floats([1.0, 0.0, 0.0, 0.0], &device)
                .unsqueeze_dim(0)
                .repeat_dim(0, 8),
            None,
        );
        assert!((scalar(collapsed) - e as f32).abs() < 1e-6);
        // E = 2, f = (3/4, 1/4), P = (0.7, 0.3): 2 * (0.525 + 0.075) = 1.2.
        let mixed = load_balancing_loss(
            Tensor::from_floats([3.0, 1.0], &device),
            Tensor::from_floats([[0.6, 0.4], [0.8, 0.2]], &device),
            None,
        );
        assert!((scalar(mixed) - 1.2).abs() < 1e-6);
        // A padding row is ignored: P stays (0.7, 0.3).
        let masked = load_balancing_loss(
            Tensor::from_floats([3.0, 1.0], &device),
            Tensor::from_floats([[0.6, 0.4], [0.8, 0.2], [0.0, 1.0]], &device),
            Some(Tensor::from_floats([1.0, 1.0, 0.0], &device)),
        );
        assert!((scalar(masked) - 1.2).abs() < 1e-6);
    }

    #[rstest]
    fn z_loss_and_entropy_hand_computed(#[values("flex", "ndarray", "wgpu")] backend: &str) {
        let Some(device) = test_device(backend) else {
            return;
        };
        // logsumexp([0, 0]) = ln 2; logsumexp([1000, 1000]) = 1000 + ln 2 (no overflow).
        let z = router_z_loss(Tensor::from_floats([[0.0, 0.0]], &device), None);
        assert!((scalar(z) - 2f32.ln().powi(2)).abs() < 1e-6);
        let big = router_z_loss(Tensor::from_floats([[1000.0, 1000.0]], &device), None);
        assert!((scalar(big) / (1000.0 + 2f32.ln()).powi(2) - 1.0).abs() < 1e-5);
        let h = entropy_sum(Tensor::from_floats([[0.5, 0.5], [1.0, 0.0]], &device), None);
        assert!((scalar(h) - 2f32.ln()).abs() < 1e-6);
    }
}
