//! Rotary position embedding in the half-rotation layout of Llama/Mixtral: dimension i is paired
//! with i + head_dim/2 (Burn's `RotaryEncoding` pairs neighbours instead, which would not match
//! imported weights).

use burn::prelude::*;

/// Rotary embedding tables for one head width.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    /// Frequencies `theta^(-2i/head_dim)` for i in `0..head_dim/2`.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| theta.powf(-(2.0 * i as f64) / head_dim as f64))
            .collect();
        Self { inv_freq }
    }

    /// cos and sin for positions `start..start + len`, each `[len, head_dim/2]`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let half = self.inv_freq.len();
        let angles: Vec<f64> = (start..start + len)
            .flat_map(|p| self.inv_freq.iter().map(move |f| p as f64 * f))
            .collect();
        let table = |f: fn(f64) -> f64| {
            let v: Vec<f32> = angles.iter().map(|a| f(*a) as f32).collect();
            Tensor::<1>::from_floats(v.as_slice(), device).reshape([len, half])
        };
        (table(f64::cos), table(f64::sin))
    }

    /// Rotates queries or keys.
    ///
    /// x: `[batch, heads, seq, head_dim]`; cos, sin: `[seq, head_dim/2]` -> same shape as x
    pub fn apply(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
        let [b, h, s, d] = x.dims();
        let half = d / 2;
        let cos = cos.clone().reshape([1, 1, s, half]);
        let sin = sin.clone().reshape([1, 1, s, half]);
        let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
        let x2 = x.slice([0..b, 0..h, 0..s, half..d]);
        let out1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
        let out2 = x2 * cos + x1 * sin;
        Tensor::cat(vec![out1, out2], 3)
    }
}
