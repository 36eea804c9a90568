//! Causal self-attention with rotary positions and grouped-query attention (GQA).

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::rope::Rope;

/// Cached keys and values of one layer, `[batch, kv_heads, seq, head_dim]` each.
#[derive(Debug, Clone)]
pub struct LayerCache {
    /// Keys, already rotated.
    pub k: Tensor<4>,
    /// Values.
    pub v: Tensor<4>,
}

/// Multi-head attention with `n_kv_heads` key/value heads shared by groups of query heads.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection `[d_model, n_heads * head_dim]`.
    pub q_proj: Linear,
    /// Key projection `[d_model, n_kv_heads * head_dim]`.
    pub k_proj: Linear,
    /// Value projection `[d_model, n_kv_heads * head_dim]`.
    pub v_proj: Linear,
    /// Output projection `[n_heads * head_dim, d_model]`.
    pub o_proj: Linear,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of each head.
    pub head_dim: usize,
}

impl Attention {
    /// Builds the projections (no biases, as in Llama/Mixtral).
    pub fn new(
        d_model: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        device: &Device,
    ) -> Self {
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Self {
            q_proj: linear(d_model, n_heads * head_dim),
            k_proj: linear(d_model, n_kv_heads * head_dim),
            v_proj: linear(d_model, n_kv_heads * head_dim),
            o_proj: linear(n_heads * head_dim, d_model),
            n_heads,
            n_kv_heads,
            head_dim,
        }
    }

    /// Attends the new positions `start..start + seq` to every cached and new position.
    ///
    /// x: `[batch, seq, d_model]`; cos/sin: `[seq, head_dim/2]`; key_mask: `[batch, start + seq]`,
    /// true for real tokens. Returns `[batch, seq, d_model]` and the extended cache.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        cache: Option<LayerCache>,
        key_mask: Option<Tensor<2, Bool>>,
    ) -> (Tensor<3>, LayerCache) {
        let [b, s, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |t: Tensor<3>, n| t.reshape([b, s, n, hd]).swap_dims(1, 2); // [b, n, s, hd]
        let q = Rope::apply(heads(self.q_proj.forward(x.clone()), h), cos, sin);
        let k = Rope::apply(heads(self.k_proj.forward(x.clone()), kvh), cos, sin);
        let v = heads(self.v_proj.forward(x), kvh);
        let (k, v) = match cache {
            Some(c) => (Tensor::cat(vec![c.k, k], 2), Tensor::cat(vec![c.v, v], 2)),
            None => (k, v),
        }; // [b, kvh, total, hd]
        let total = k.dims()[2];
        let start = total - s;
        let cache = LayerCache {
            k: k.clone(),
            v: v.clone(),
        };

        // Each group of h / kvh query heads reads the same key/value head.
        let group = |t: Tensor<4>| {
            t.unsqueeze_dim::<5>(2)
                .repeat_dim(2, h / kvh)
                .reshape([b, h, total, hd])
        };
        let scores = q
            .matmul(group(k).swap_dims(2, 3))
            .div_scalar((hd as f64).sqrt()); // [b, h, s, total]

        // Query i (absolute position start + i) sees keys 0..=start + i that are real tokens.
        let device = scores.device();
        let rows = Tensor::<1, Int>::arange(start as i64..total as i64, &device).reshape([s, 1]);
        let cols = Tensor::<1, Int>::arange(0..total as i64, &device).reshape([1, total]);
        let mut blocked = cols
            .greater(rows)
            .reshape([1, 1, s, total])
            .expand([b, 1, s, total]); // [b, 1, s, total]
        if let Some(m) = key_mask {
            blocked = blocked.bool_or(
                m.bool_not()
                    .reshape([b, 1, 1, total])
                    .expand([b, 1, s, total]),
            );
        }
        let scores = scores.mask_fill(blocked.expand([b, h, s, total]), -1e9);
        let out = softmax(scores, 3).matmul(group(v)); // [b, h, s, hd]
        let out = out.swap_dims(1, 2).reshape([b, s, h * hd]);
        (self.o_proj.forward(out), cache)
    }
}
