//! Causal self-attention with rotary positions and grouped-query attention (GQA).

use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::module::{attention, attention_fallback};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, f16};
use moe_core::host::runs_on_host;
use moe_core::kernels::{
    Host, HostF32, KvRows, PrefillShape, decode_attention, host_tensor, linear_on_cores,
    prefill_attention, rms_norm,
};

use crate::config::{ModelConfig, QkNorm};
use crate::kv_cache::{KvDtype, LayerCache};
use crate::rope::Rope;

/// Where the new tokens of a forward pass sit, shared by every layer.
#[derive(Debug, Clone)]
pub struct Positions {
    /// Rotary cos of the new tokens, `[batch or 1, seq, head_dim/2]`.
    pub cos: Tensor<3>,
    /// Rotary sin, the same shape.
    pub sin: Tensor<3>,
    /// The first new column (the columns before it are cached).
    pub start: usize,
    /// Which columns, cached and new, hold real tokens: `[batch, start + seq]`; `None` when all do.
    pub key_mask: Option<Tensor<2, Bool>>,
    /// Positions a layer's cache allocates for at least.
    pub reserve: usize,
    /// How a layer's cache stores keys and values.
    pub cache_dtype: KvDtype,
    /// Each row's left padding when the key mask is the cache's padding (what the host decode
    /// kernel reads instead of the mask); `None` when no row is padded or the mask came from
    /// the caller.
    pub pads: Option<Vec<usize>>,
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

    /// Projects `x` to `n` heads with `proj`, applying `norm` where the config puts it, then the
    /// rotary embedding of positions `at` when given (queries and keys).
    ///
    /// x: `[batch, seq, d_model]` -> `[batch, n, seq, head_dim]`
    fn heads(
        &self,
        proj: &Linear,
        norm: &Option<RmsNorm>,
        x: Tensor<3>,
        n: usize,
        at: Option<&Positions>,
    ) -> Tensor<4> {
        let [b, s, _] = x.dims();
        let mut t = linear_on_cores(proj, x);
        if let (Some(norm), Some(QkNorm::Full)) = (norm, self.qk_norm) {
            t = rms_norm(norm, t);
        }
        let mut t = t.reshape([b, s, n, self.head_dim]);
        if let (Some(norm), Some(QkNorm::PerHead)) = (norm, self.qk_norm) {
            t = rms_norm(norm, t);
        }
        if let Some(at) = at {
            t = Rope::rotate(t, &at.cos, &at.sin);
        }
        t.swap_dims(1, 2)
    }

    /// Attends the new tokens to every cached and new real token before or at their column,
    /// writing their keys and values into `cache` when there is one.
    ///
    /// x: `[batch, seq, d_model]` -> `[batch, seq, d_model]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        at: &Positions,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = self.heads(&self.q_proj, &self.q_norm, x.clone(), h, Some(at));
        let k = self.heads(&self.k_proj, &self.k_norm, x.clone(), kvh, Some(at));
        let v = self.heads(&self.v_proj, &None, x, kvh, None);
        let (k, v) = match cache {
            Some(slot) => LayerCache::append(slot, k, v, at.start, at.reserve, at.cache_dtype),
            None => (k, v),
        }; // [b, kvh, total, hd]
        let out = self.grouped(q, k, v, at); // [b, h, s, hd]
        let out = out.swap_dims(1, 2).reshape([b, s, h * hd]);
        linear_on_cores(&self.o_proj, out)
    }

    /// Scaled dot-product attention with each key/value head read by its group of `h / kvh`
    /// query heads, without copying keys or values per query head: the group's queries are
    /// folded into the rows of one attention over the shared head.
    ///
    /// On flex in f32 the host kernels run it, reading the cache's buffers in place:
    /// [`decode_attention`] for one new token, [`prefill_attention`] for several (causal, in
    /// blocks that skip the keys above the diagonal). Elsewhere Burn's fused attention runs it
    /// (the other backends compose it from matmuls), except for one new token on ndarray, whose
    /// matmul composition reads the cache's strided views in place. All compute the same
    /// thing (in the tensors' dtype; models run in f32).
    ///
    /// q: `[batch, h, seq, hd]`; k, v: `[batch, kvh, total, hd]` -> `[batch, h, seq, hd]`
    fn grouped(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, at: &Positions) -> Tensor<4> {
        let [b, h, s, hd] = q.dims();
        let [_, kvh, total, _] = k.dims();
        let g = h / kvh;
        // Query head j * g + i reads key/value head j: row i * s + p of the folded queries.
        let q = q.reshape([b, kvh, g * s, hd]);
        let unmasked = at.key_mask.is_none() || at.pads.is_some();
        if unmasked
            && let Some(out) = host_attention(&q, &k, &v, s, at.pads.as_deref(), self.scale as f32)
        {
            return out.reshape([b, h, s, hd]);
        }
        // Burn's attention computes in the queries' dtype (a no-op unless the cache is f16).
        let (k, v) = (k.cast(q.dtype()), v.cast(q.dtype()));
        let mask = blocked(at, b, g, s, total).map(|m| m.expand([b, kvh, g * s, total]));
        let options = AttentionModuleOptions {
            scale: Some(self.scale),
            ..Default::default()
        };
        let out = if s == 1 && runs_on_host(&q.device()) {
            attention_fallback(q, k, v, mask, None, options)
        } else {
            attention(q, k, v, mask, None, options)
        };
        out.reshape([b, h, s, hd])
    }
}

/// `s` new tokens per row on flex: the host kernels read the cache's buffers in place, skipping
/// each row's first `first[r]` (padding) columns. A cache in f16 is read in place by decode
/// attention; a prompt, which reads every key many times, widens it to f32 once. `None` when a
/// tensor is not a flex tensor of f32 (or f16 keys and values), is under autodiff, or its
/// positions are not contiguous rows.
///
/// q: `[batch, kvh, g * s, hd]`; k, v: `[batch, kvh, total, hd]` -> `[batch, kvh, g * s, hd]`
fn host_attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    s: usize,
    first: Option<&[usize]>,
    scale: f32,
) -> Option<Tensor<4>> {
    if k.dtype() == DType::F16 && s > 1 {
        let (k, v) = (k.clone().cast(DType::F32), v.clone().cast(DType::F32));
        return host_attention(q, &k, &v, s, first, scale);
    }
    let dims = q.dims();
    let [batch, kv_heads, rows, head_dim] = dims;
    let total = k.dims()[2];
    let host_q = HostF32::row_major(q)?;
    let queries = host_q.contiguous()?;
    let out = if k.dtype() == DType::F16 {
        let (keys, values) = (Host::<f16>::of(k)?, Host::<f16>::of(v)?);
        let [keys, values] = [&keys, &values].map(|t| KvRows::of(t, head_dim));
        decode_attention(queries, dims, keys?, values?, total, first, scale)
    } else {
        let (keys, values) = (HostF32::of(k)?, HostF32::of(v)?);
        let [keys, values] = [&keys, &values].map(|t| KvRows::of(t, head_dim));
        let (keys, values) = (keys?, values?);
        if s == 1 {
            decode_attention(queries, dims, keys, values, total, first, scale)
        } else {
            let shape = PrefillShape {
                batch,
                kv_heads,
                g: rows / s,
                new: s,
                head_dim,
                total,
            };
            prefill_attention(queries, shape, keys, values, first, scale)
        }
    };
    Some(host_tensor(out, dims))
}

/// The keys each folded query row may not see, `[batch or 1, 1, g * seq, total]`: later columns
/// (causal, when more than one token is new) and padding; `None` when nothing is blocked.
fn blocked(at: &Positions, b: usize, g: usize, s: usize, total: usize) -> Option<Tensor<4, Bool>> {
    let device = at.cos.device();
    // Query p (column start + p) sees columns 0..=start + p.
    let causal = (s > 1).then(|| {
        let rows = Tensor::<1, Int>::arange(at.start as i64..total as i64, &device).reshape([s, 1]);
        let cols = Tensor::<1, Int>::arange(0..total as i64, &device).reshape([1, total]);
        cols.expand([s, total])
            .greater(rows.expand([s, total]))
            .reshape([1, s, total])
    });
    let padding = at
        .key_mask
        .clone()
        .map(|m| m.bool_not().reshape([b, 1, total]).expand([b, s, total]));
    let blocked = match (causal, padding) {
        (Some(c), Some(p)) => p.bool_or(c.expand([b, s, total])),
        (c, p) => c.or(p)?,
    };
    let rows = blocked.dims()[0];
    Some(
        blocked
            .reshape([rows, 1, 1, s, total])
            .expand([rows, 1, g, s, total])
            .reshape([rows, 1, g * s, total]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_core::testing::{assert_close, test_device};
    use rstest::rstest;

    /// On flex the host kernels run one new token per row (decode) and several (a prompt,
    /// causal) against a cache buffer with spare positions (a strided view) and left padding,
    /// and equal Burn's attention with the padding and the causal order as a mask; other
    /// backends leave it to Burn.
    #[rstest]
    fn host_attention_reads_the_cache_in_place_on_flex(
        #[values("flex", "ndarray", "wgpu")] backend: &str,
        #[values(1, 5)] s: usize,
    ) {
        let Some(device) = test_device(backend) else {
            return;
        };
        let (b, kvh, g, hd, total, cap) = (3, 2, 4, 16, 11, 16);
        let random = |shape: [usize; 4]| {
            Tensor::<4>::random(shape, burn::tensor::Distribution::Default, &device)
        };
        let q = random([b, kvh, g * s, hd]);
        let view = |t: Tensor<4>| t.slice([0..b, 0..kvh, 0..total, 0..hd]);
        let (k, v) = (
            view(random([b, kvh, cap, hd])),
            view(random([b, kvh, cap, hd])),
        );
        // Every row's first new position sees at least its own column.
        let col0 = total - s;
        let pads = [0, 3, col0];
        let scale = 0.3;
        let got = host_attention(&q, &k, &v, s, Some(&pads), scale);
        assert_eq!(got.is_some(), backend == "flex");
        let Some(got) = got else {
            return;
        };
        let blocked: Vec<bool> = (0..b)
            .flat_map(|r| {
                (0..g * s)
                    .flat_map(move |row| (0..total).map(move |c| c < pads[r] || c > col0 + row % s))
            })
            .collect();
        let mask = Tensor::<1, Bool>::from_data(blocked.as_slice(), &device)
            .reshape([b, 1, g * s, total])
            .expand([b, kvh, g * s, total]);
        let options = AttentionModuleOptions {
            scale: Some(scale as f64),
            ..Default::default()
        };
        assert_close(
            got,
            attention_fallback(q, k, v, Some(mask), None, options),
            1e-5,
        );
    }
}
