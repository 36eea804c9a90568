//! Keys and values of every layer for incremental decoding: buffers allocated once for the
//! positions a generation will reach and written in place, a row per sequence, rows that may start
//! with left padding (batched prompts of different lengths), and rows that can be dropped when
//! their sequence ends. They hold f32, or f16 for half the memory ([`KvDtype`]).

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

use crate::rope::RopeTable;

/// How a [`KvCache`] stores keys and values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// Single precision, as the model computes them: generation is exactly the model's.
    #[default]
    F32,
    /// Half precision (as llama.cpp's default cache): half the memory, and half the bytes each
    /// decode step reads at long contexts. Keys and values are rounded to 11 significant bits;
    /// attention still computes in f32.
    F16,
}

impl KvDtype {
    /// The tensor dtype of the buffers.
    pub fn float_dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::F16 => FloatDType::F16,
        }
    }
}

impl FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            _ => Err(format!("unknown KV cache type `{s}`: expected f32 or f16")),
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        })
    }
}

/// One layer's keys and values, `[batch, kv_heads, capacity, head_dim]` each; the first
/// [`KvCache::len`] positions are filled.
#[derive(Debug, Clone)]
pub struct LayerCache {
    /// Keys, already rotated.
    k: Tensor<4>,
    /// Values.
    v: Tensor<4>,
}

impl LayerCache {
    /// Writes `k` and `v` (`[batch, kv_heads, seq, head_dim]`) at positions `start..start + seq`
    /// of the layer's buffers, allocating them (for at least `reserve` positions, holding
    /// `dtype`) or doubling them when full, and returns the keys and values of positions
    /// `0..start + seq` (in the buffers' dtype).
    ///
    /// The buffers are written in place: the views returned last time are gone by then, so each
    /// buffer is held once and a backend can assign into it without a copy.
    pub(crate) fn append(
        slot: &mut Option<Self>,
        k: Tensor<4>,
        v: Tensor<4>,
        start: usize,
        reserve: usize,
        dtype: KvDtype,
    ) -> (Tensor<4>, Tensor<4>) {
        let [b, kvh, s, hd] = k.dims();
        let (k, v) = (k.cast(dtype.float_dtype()), v.cast(dtype.float_dtype()));
        let end = start + s;
        let (mut kb, mut vb) = match slot.take() {
            Some(c) if c.k.dims()[2] >= end => (c.k, c.v),
            Some(c) => {
                let cap = end.max(2 * c.k.dims()[2]);
                (grow(c.k, start, cap), grow(c.v, start, cap))
            }
            None => {
                let cap = end.max(reserve);
                let zeros = || Tensor::<4>::zeros([b, kvh, cap, hd], (&k.device(), k.dtype()));
                (zeros(), zeros())
            }
        };
        kb = kb.slice_assign([0..b, 0..kvh, start..end, 0..hd], k);
        vb = vb.slice_assign([0..b, 0..kvh, start..end, 0..hd], v);
        let view = |t: &Tensor<4>| t.clone().slice([0..b, 0..kvh, 0..end, 0..hd]);
        let out = (view(&kb), view(&vb));
        *slot = Some(Self { k: kb, v: vb });
        out
    }
}

/// `t` with its first `filled` positions copied into a buffer of `cap` positions.
fn grow(t: Tensor<4>, filled: usize, cap: usize) -> Tensor<4> {
    let [b, kvh, _, hd] = t.dims();
    let bigger = Tensor::<4>::zeros([b, kvh, cap, hd], (&t.device(), t.dtype()));
    bigger.slice_assign(
        [0..b, 0..kvh, 0..filled, 0..hd],
        t.slice([0..b, 0..kvh, 0..filled, 0..hd]),
    )
}

/// Keys and values of every layer, the positions they hold, and each row's left padding.
///
/// `KvCache::default()` allocates exactly what the first forward pass needs and doubles from
/// there; [`KvCache::with_capacity`] allocates the positions a generation will reach at once.
/// Both hold f32 unless [`with_dtype`](Self::with_dtype) says otherwise.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerCache>>,
    len: usize,
    reserve: usize,
    dtype: KvDtype,
    pads: Vec<usize>,
    pub(crate) rope: Option<RopeTable>,
}

impl KvCache {
    /// An empty cache whose buffers will hold `positions` positions without growing.
    pub fn with_capacity(positions: usize) -> Self {
        Self {
            reserve: positions,
            ..Self::default()
        }
    }

    /// An empty cache for a batch whose row `r` starts with `pads[r]` padding columns (prompts
    /// of different lengths, aligned on the right): those columns are never attended to, and each
    /// row's positions count from its first real token.
    pub fn left_padded(pads: Vec<usize>, positions: usize) -> Self {
        Self {
            pads,
            ..Self::with_capacity(positions)
        }
    }

    /// The cache storing keys and values as `dtype` (before its first forward pass).
    pub fn with_dtype(self, dtype: KvDtype) -> Self {
        Self { dtype, ..self }
    }

    /// How the buffers store keys and values.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Bytes the buffers of every layer hold (their capacity, not only the positions filled).
    pub fn bytes(&self) -> usize {
        let bytes = |t: &Tensor<4>| t.shape().num_elements() * t.dtype().size();
        let layer = |c: &LayerCache| bytes(&c.k) + bytes(&c.v);
        self.layers.iter().flatten().map(layer).sum()
    }

    /// Columns already cached (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold before they must grow (0 before the first forward pass).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map_or(0, |c| c.k.dims()[2])
    }

    /// Keeps only the rows in `rows` (indices of the current rows, in the order given): a batch
    /// drops the sequences that have ended.
    pub fn retain_rows(&mut self, rows: &[usize]) {
        if !self.pads.is_empty() {
            self.pads = rows.iter().map(|&r| self.pads[r]).collect();
        }
        let Some(device) = self.layers.iter().flatten().next().map(|c| c.k.device()) else {
            return;
        };
        let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let index = Tensor::<1, Int>::from_ints(ids.as_slice(), &device);
        for c in self.layers.iter_mut().flatten() {
            c.k = c.k.clone().select(0, index.clone());
            c.v = c.v.clone().select(0, index.clone());
        }
    }

    /// Marks `seq` more columns as cached.
    pub(crate) fn advance(&mut self, seq: usize) {
        self.len += seq;
    }

    /// Positions to allocate for at least.
    pub(crate) fn reserve(&self) -> usize {
        self.reserve
    }

    /// Each row's left padding, when any row has some.
    pub(crate) fn pads(&self) -> Option<&[usize]> {
        self.pads.iter().any(|&p| p > 0).then_some(&self.pads[..])
    }

    /// Which of the first `total` columns hold real tokens, `[batch, total]`, when any row is
    /// padded.
    pub(crate) fn key_mask(&self, total: usize, device: &Device) -> Option<Tensor<2, Bool>> {
        let pads = self.pads()?;
        let pads: Vec<i64> = pads.iter().map(|&p| p as i64).collect();
        let b = pads.len();
        let pads = Tensor::<1, Int>::from_ints(pads.as_slice(), device).reshape([b, 1]);
        let cols = Tensor::<1, Int>::arange(0..total as i64, device).reshape([1, total]);
        Some(
            cols.expand([b, total])
                .greater_equal(pads.expand([b, total])),
        )
    }
}
