//! Causal self-attention with rotary positions and grouped-query attention (GQA).

use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::config::{ModelConfig, QkNorm};
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
    /// RMSNorm on the queries (see [`QkNorm`]).
    pub q_norm: Option<RmsNorm>,
    /// RMSNorm on the keys.
    pub k_norm: Option<RmsNorm>,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of each head.
    pub head_dim: usize,
    /// Where the q/k norms apply.
    #[module(skip)]
    pub qk_norm: Option<QkNorm>,
    /// Softmax scale of the scores.
    #[module(skip)]
    pub scale: f64,
}

impl Attention {
    /// Builds the projections of `config` (no biases unless `qkv_bias`, as in Llama/Mixtral),
    /// and its q/k norms.
    pub fn new(config: &ModelConfig, device: &Device) -> Self {
        let (d, h, kvh, hd) = (
            config.d_model,
            config.n_heads,
            config.n_kv_heads,
            config.head_dim(),
        );
        let bias = config.has_qkv_bias();
        let linear = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        let norm = |width| {
            RmsNormConfig::new(width)
                .with_epsilon(config.rms_eps)
                .init(device)
        };
        let (q_norm, k_norm) = match config.qk_norm {
            None => (None, None),
            Some(QkNorm::PerHead) => (Some(norm(hd)), Some(norm(hd))),
            Some(QkNorm::Full) => (Some(norm(h * hd)), Some(norm(kvh * hd))),
        };
        Self {
            q_proj: linear(d, h * hd, bias),
            k_proj: linear(d, kvh * hd, bias),
            v_proj: linear(d, kvh * hd, bias),
            o_proj: linear(h * hd, d, false),
            q_norm,
            k_norm,
            n_heads: h,
            n_kv_heads: kvh,
            head_dim: hd,
            qk_norm: config.qk_norm,
            scale: config.attn_scale.unwrap_or(1.0 / (hd as f64).sqrt()),
        }
    }

    /// Projects `x` to `n` heads with `proj`, applying `norm` where the config puts it.
    ///
    /// x: `[batch, seq, d_model]` -> `[batch, n, seq, head_dim]`
    fn heads(&self, proj: &Linear, norm: &Option<RmsNorm>, x: Tensor<3>, n: usize) -> Tensor<4> {
        let [b, s, _] = x.dims();
        let mut t = proj.forward(x);
        if let (Some(norm), Some(QkNorm::Full)) = (norm, self.qk_norm) {
            t = norm.forward(t);
        }
        let mut t = t.reshape([b, s, n, self.head_dim]);
        if let (Some(norm), Some(QkNorm::PerHead)) = (norm, self.qk_norm) {
            t = norm.forward(t);
        }
        t.swap_dims(1, 2)
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
        let q = self.heads(&self.q_proj, &self.q_norm, x.clone(), h);
        let k = self.heads(&self.k_proj, &self.k_norm, x.clone(), kvh);
        let q = Rope::apply(q, cos, sin);
        let k = Rope::apply(k, cos, sin);
        let v = self.heads(&self.v_proj, &None, x, kvh);
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
        let scores = q.matmul(group(k).swap_dims(2, 3)).mul_scalar(self.scale); // [b, h, s, total]

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
