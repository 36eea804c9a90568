//! Import of Hugging Face MoE checkpoints: a directory with `config.json` and `model.safetensors`
//! or a sharded `model.safetensors.index.json`.
//!
//! The `model_type` in `config.json` picks a family, one file each (`mixtral`, `olmoe`,
//! `qwen2_moe`, `qwen3_moe`, `granitemoe`; `deepseek_v3` is refused). A family reads its config
//! into our [`ModelConfig`], whose fields switch the numerics it needs (q/k norms, biases,
//! multipliers, a shared expert, renormalised top-k or not), and refuses with a one-line error
//! naming the key any setting that would change the numerics and is not implemented. The
//! Llama-style parts (embedding, attention, norms, dense MLPs, head) have the same names in
//! every family and load here; each family loads its MoE blocks.
//!
//! Hugging Face linears are stored `[out, in]`; ours are `[in, out]`, so every projection is
//! transposed, and per-expert matrices are stacked into the expert bank `[E, ...]`.
//!
//! Export ([`export_mixtral`]) writes the `mixtral` family back, for models that format can
//! express.

mod config;
mod deepseek_v3;
mod export;
mod granitemoe;
mod load;
mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;
mod tensors;

use std::fs;
use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::DType;

pub use self::export::{export_mixtral, mixtral_refusal};

use self::config::HfConfig;
use self::load::{ExpertLayout, load_qwen_style_moe, moe_of};
use self::tensors::HfTensors;
use crate::block::{Block, Ffn};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::MoeLm;
use crate::weights::{StoredBytes, unset_params};

/// One model family: how its config reads and where its MoE weights live.
trait Family: Sync {
    /// Reads `config.json` into our config, refusing what this import cannot honour.
    fn config(&self, hf: &HfConfig) -> Result<ModelConfig>;

    /// Loads the MoE feed-forward block of layer `prefix` (`model.layers.N`) into `block`:
    /// router, routed experts and any shared expert.
    fn load_moe(&self, st: &mut HfTensors, prefix: &str, block: &mut Block) -> Result<()>;
}

/// The families, by `model_type`.
const FAMILIES: &[(&str, &dyn Family)] = &[
    ("mixtral", &mixtral::Mixtral),
    ("olmoe", &olmoe::Olmoe),
    ("qwen2_moe", &qwen2_moe::Qwen2Moe),
    ("qwen3_moe", &qwen3_moe::Qwen3Moe),
    ("granitemoe", &granitemoe::GraniteMoe),
    ("deepseek_v3", &deepseek_v3::DeepseekV3),
];

/// Reads a Hugging Face `config.json` of a supported family into our [`ModelConfig`].
pub fn config_from_hf(path: &Path) -> Result<ModelConfig> {
    let hf = HfConfig::read(path)?;
    hf.family()?.config(&hf)
}

/// What the safetensors of a Hugging Face directory store, by dtype, read from their headers.
pub fn stored_weights(dir: &Path) -> Result<Vec<StoredBytes>> {
    Ok(HfTensors::open(dir, Some(DType::F32))?.stored())
}

/// Loads a Hugging Face directory of a supported family onto `device`, with its weights in f32,
/// the dtype the model computes in.
pub fn import(dir: &Path, device: &Device) -> Result<MoeLm> {
    import_as(dir, device, Some(DType::F32))
}

/// Loads a Hugging Face directory of a supported family onto `device`, with its weights in
/// `dtype`, or with `None` in the dtype the checkpoint stores (its source dtype, for
/// converting without a round trip through f32).
///
/// The shards are memory-mapped and every parameter is built straight from its stored tensor:
/// nothing is drawn at random first, and a shard's pages leave memory once read. Peak memory
/// is the model in `dtype` plus about one tensor.
pub fn import_as(dir: &Path, device: &Device, dtype: Option<DType>) -> Result<MoeLm> {
    let meta = fs::metadata(dir).map_err(|e| ModelError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(ModelError::checkpoint(
            dir,
            "is a file, expected a Hugging Face model directory",
        ));
    }
    let hf = HfConfig::read(&dir.join("config.json"))?;
    let family = hf.family()?;
    let config = family.config(&hf)?;
    let mut model = config.skeleton(device)?;
    let mut st = HfTensors::open(dir, dtype)?;
    let (d, v) = (config.d_model, config.vocab_size);

    model.embed.weight =
        Param::from_tensor(st.tensor("model.embed_tokens.weight", [v, d], device)?);
    for (i, block) in model.blocks.iter_mut().enumerate() {
        let p = format!("model.layers.{i}");
        st.load_attention(&format!("{p}.self_attn"), block)?;
        st.load_norm(&format!("{p}.input_layernorm"), &mut block.attn_norm)?;
        st.load_norm(
            &format!("{p}.post_attention_layernorm"),
            &mut block.ffn_norm,
        )?;
        match &mut block.ffn {
            Ffn::Dense(ffn) => st.load_swiglu(&format!("{p}.mlp"), ffn)?,
            Ffn::Moe(_) => family.load_moe(&mut st, &p, block)?,
        }
    }
    st.load_norm("model.norm", &mut model.norm)?;
    // A tied model reads its output projection from the embedding; a stored lm_head is ignored.
    if let Some(head) = &mut model.lm_head {
        st.load_linear("lm_head", head)?;
    }
    if let Some(name) = unset_params(&model).first() {
        return Err(ModelError::checkpoint(
            dir,
            format!("the import set no value for the model's '{name}'"),
        ));
    }
    Ok(model)
}
