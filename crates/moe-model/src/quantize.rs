//! Quantised routed experts: each expert bank stored in 8 or 4 bits with one f32 scale per
//! block of 32 values (Burn's symmetric per-block quantisation). Everything else keeps its
//! dtype.
//!
//! The stacked bank `[E, a, b]` is quantised along its last dimension, so expert e's values
//! and its scales are each one contiguous run of the stored tensor: the expert store reads and
//! dequantises one expert at a time, never the whole bank. A checkpoint loaded fully resident
//! is dequantised to f32 at load.

use burn::module::Param;
use burn::tensor::TensorData;
use burn::tensor::quantization::{
    BlockSize, QuantScheme, QuantStore, QuantValue, QuantizedBytes, ScaleDtype,
};

use crate::block::Ffn;
use crate::error::{ModelError, Result};
use crate::model::MoeLm;

/// Values per scale.
pub const BLOCK: usize = 32;

/// The precision of quantised experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertQuant {
    /// 8-bit symmetric values.
    Q8,
    /// 4-bit symmetric values, stored one per byte: Burn's flex backend, which quantises
    /// here, keeps the native store, so q4 trades precision for nothing in size over q8 yet.
    Q4,
}

impl ExpertQuant {
    /// `q8` or `q4`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "q8" => Some(Self::Q8),
            "q4" => Some(Self::Q4),
            _ => None,
        }
    }

    /// Burn's scheme for it: symmetric, one f32 scale per block of [`BLOCK`] values.
    pub fn scheme(self) -> QuantScheme {
        let value = match self {
            Self::Q8 => QuantValue::Q8S,
            Self::Q4 => QuantValue::Q4S,
        };
        QuantScheme::default()
            .with_value(value)
            .with_store(QuantStore::Native)
            .per_block([BLOCK as u8], ScaleDtype::F32)
    }
}

/// Values per scale of `scheme` (`n`, all of them, for a per-tensor scale).
fn block_len(scheme: &QuantScheme, n: usize) -> usize {
    scheme.block_size().map_or(n, |b: BlockSize| {
        b.as_slice().iter().map(|&x| x as usize).product()
    })
}

/// Bytes of `n` values under `scheme` as Burn stores them: the values (one `i8` each, the
/// native store every backend here writes), then one f32 scale per block.
pub fn quantized_bytes(scheme: &QuantScheme, n: usize) -> (usize, usize) {
    (n, n.div_ceil(block_len(scheme, n)) * 4)
}

/// Quantised tensor data back to f32 on the host: each value times its block's scale
/// (symmetric, blocks running along the last dimension). Reads the native `i8` store with f32
/// block scales that [`quantize_experts`] writes.
pub fn dequantize(
    data: TensorData,
    scheme: QuantScheme,
) -> std::result::Result<TensorData, String> {
    if scheme.store != QuantStore::Native || scheme.scale_dtype() != ScaleDtype::F32 {
        return Err(format!("{scheme:?} is not a stored form this build reads"));
    }
    let shape = data.shape().clone();
    let block = block_len(&scheme, shape.num_elements());
    let (values, scales) = QuantizedBytes {
        bytes: data.into_bytes(),
        scheme,
        shape: shape.clone(),
    }
    .into_vec_i8();
    let out: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(i, &q)| f32::from(q) * scales.block[i / block])
        .collect();
    Ok(TensorData::new(out, shape))
}

/// `model` with every routed expert bank quantised to `quant`. Refuses banks whose rows are not
/// whole blocks.
pub fn quantize_experts(mut model: MoeLm, quant: ExpertQuant) -> Result<MoeLm> {
    let scheme = quant.scheme();
    for (i, block) in model.blocks.iter_mut().enumerate() {
        let Ffn::Moe(moe) = &mut block.ffn else {
            continue;
        };
        let experts = &mut moe.experts;
        for w in [&mut experts.w_gate, &mut experts.w_up, &mut experts.w_down] {
            let [_, _, cols] = w.lazy_shape().dims();
            if cols % BLOCK != 0 {
                return Err(ModelError::Config(format!(
                    "layer {i}: expert rows of {cols} values are not whole blocks of {BLOCK}"
                )));
            }
            let id = w.id;
            let q = w.val().quantize_dynamic(&scheme);
            *w = Param::initialized(id, q);
        }
    }
    Ok(model)
}
