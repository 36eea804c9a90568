//! Rotary position embedding in the half-rotation layout of Llama/Mixtral: dimension i is paired
//! with i + head_dim/2 (Burn's `RotaryEncoding` pairs neighbours instead, which would not match
//! imported weights).

use burn::prelude::*;
use moe_core::kernels::rotary_tensor;

/// Rotary embedding frequencies for one head width.
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
        let (cos, sin): (Vec<f32>, Vec<f32>) = (start..start + len)
            .flat_map(|p| self.inv_freq.iter().map(move |f| (p as f64 * f).sin_cos()))
            .map(|(sin, cos)| (cos as f32, sin as f32))
            .unzip();
        let table =
            |v: Vec<f32>| Tensor::<1>::from_floats(v.as_slice(), device).reshape([len, half]);
        (table(cos), table(sin))
    }

    /// Rotates queries or keys, each head's `x1 = x[..half]` and `x2 = x[half..]` to
    /// `[x1 cos - x2 sin, x2 cos + x1 sin]`: in one pass on flex ([`rotary_tensor`]), composed
    /// from Burn's ops elsewhere.
    ///
    /// x: `[batch, seq, heads, head_dim]`; cos, sin: `[batch or 1, seq, head_dim/2]` -> same
    /// shape as x
    pub fn rotate(x: Tensor<4>, cos: &Tensor<3>, sin: &Tensor<3>) -> Tensor<4> {
        if let Some(out) = rotary_tensor(&x, cos, sin) {
            return out;
        }
        let [b, s, h, d] = x.dims();
        let half = d / 2;
        let rows = cos.dims()[0];
        let cos = cos.clone().reshape([rows, s, 1, half]);
        let sin = sin.clone().reshape([rows, s, 1, half]);
        let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..half]);
        let x2 = x.slice([0..b, 0..s, 0..h, half..d]);
        let out1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
        let out2 = x2 * cos + x1 * sin;
        Tensor::cat(vec![out1, out2], 3)
    }
}

/// cos and sin of every position up to a length, on a device, read by index at each step: a
/// cache builds one for the positions it reserved and rebuilds it twice as long when decoding
/// passes it.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl RopeTable {
    /// Tables for positions `0..len`.
    pub fn new(rope: &Rope, len: usize, device: &Device) -> Self {
        let (cos, sin) = rope.tables(0, len, device);
        Self { cos, sin }
    }

    /// Positions covered.
    pub fn len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// cos and sin of positions `start..start + seq`, shared by every row: `[1, seq, half]`.
    pub fn range(&self, start: usize, seq: usize) -> (Tensor<3>, Tensor<3>) {
        let half = self.cos.dims()[1];
        let take = |t: &Tensor<2>| t.clone().slice([start..start + seq, 0..half]).unsqueeze();
        (take(&self.cos), take(&self.sin))
    }

    /// cos and sin of a position per row and column: positions `[batch, seq]` ->
    /// `[batch, seq, half]` each.
    pub fn gather(&self, positions: Tensor<2, Int>) -> (Tensor<3>, Tensor<3>) {
        let [b, s] = positions.dims();
        let half = self.cos.dims()[1];
        let index = positions.reshape([b * s]);
        let take = |t: &Tensor<2>| t.clone().select(0, index.clone()).reshape([b, s, half]);
        (take(&self.cos), take(&self.sin))
    }
}
