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

use std::collections::HashMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

pub use self::export::{export_mixtral, mixtral_refusal};

use self::config::HfConfig;
use self::load::{ExpertLayout, load_qwen_style_moe, moe_of};
use crate::block::{Block, Ffn};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::MoeLm;

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

/// Whether a shard name from an index file is a plain relative path that stays inside the model
/// directory: only normal components (no `..`, `.`, root or drive prefix), not empty.
fn stays_inside(file: &str) -> bool {
    let path = Path::new(file);
    !file.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// The tensors of a safetensors checkpoint, possibly sharded, read file by file.
struct HfTensors {
    /// Tensor name -> file holding it.
    index: HashMap<String, PathBuf>,
    /// Files read so far.
    files: HashMap<PathBuf, Vec<u8>>,
}

impl HfTensors {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let sharded = dir.join("model.safetensors.index.json");
        let mut index = HashMap::new();
        if sharded.exists() {
            let text = fs::read_to_string(&sharded).map_err(|e| ModelError::io(&sharded, e))?;
            let json: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: sharded.clone(),
                source,
            })?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| ModelError::checkpoint(&sharded, "no 'weight_map' object"))?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ModelError::checkpoint(
                        &sharded,
                        format!("shard of '{name}' is not a file name"),
                    )
                })?;
                if !stays_inside(file) {
                    return Err(ModelError::checkpoint(
                        &sharded,
                        format!(
                            "shard '{file}' of '{name}' is outside the model directory; \
                             shards must be relative paths inside it"
                        ),
                    ));
                }
                index.insert(name.clone(), dir.join(file));
            }
        } else if single.exists() {
            let bytes = fs::read(&single).map_err(|e| ModelError::io(&single, e))?;
            let names = SafeTensors::deserialize(&bytes)
                .map_err(|e| {
                    ModelError::checkpoint(&single, format!("not a safetensors file ({e})"))
                })?
                .names()
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>();
            for name in names {
                index.insert(name, single.clone());
            }
            return Ok(Self {
                index,
                files: HashMap::from([(single, bytes)]),
            });
        } else {
            return Err(ModelError::checkpoint(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        }
        Ok(Self {
            index,
            files: HashMap::new(),
        })
    }

    /// A tensor as f32 values, checked against the expected shape.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let file = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::Checkpoint {
                path: PathBuf::from(name),
                problem: "tensor missing from the checkpoint".into(),
            })?
            .clone();
        if !self.files.contains_key(&file) {
            let bytes = fs::read(&file).map_err(|e| ModelError::io(&file, e))?;
            self.files.insert(file.clone(), bytes);
        }
        let st = SafeTensors::deserialize(&self.files[&file])
            .map_err(|e| ModelError::checkpoint(&file, format!("not a safetensors file ({e})")))?;
        let view = st
            .tensor(name)
            .map_err(|e| ModelError::checkpoint(&file, format!("tensor '{name}': {e}")))?;
        if view.shape() != shape {
            return Err(ModelError::checkpoint(
                &file,
                format!(
                    "tensor '{name}' has shape {:?}, the config needs {shape:?}",
                    view.shape()
                ),
            ));
        }
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::checkpoint(
                    &file,
                    format!("tensor '{name}' has unsupported dtype {other:?}"),
                ));
            }
        };
        Ok(values)
    }

    /// A 2-D tensor `[rows, cols]`.
    fn matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        device: &Device,
    ) -> Result<Tensor<2>> {
        let v = self.get(name, &[rows, cols])?;
        Ok(Tensor::<1>::from_floats(v.as_slice(), device).reshape([rows, cols]))
    }

    /// A Hugging Face linear `[out, in]` as our `[in, out]`.
    fn linear(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Result<Param<Tensor<2>>> {
        Ok(Param::from_tensor(
            self.matrix(name, d_out, d_in, device)?.transpose(),
        ))
    }

    fn vector(&mut self, name: &str, n: usize, device: &Device) -> Result<Param<Tensor<1>>> {
        let v = self.get(name, &[n])?;
        Ok(Param::from_tensor(Tensor::from_floats(
            v.as_slice(),
            device,
        )))
    }
}

/// Loads a Hugging Face directory of a supported family onto `device`.
pub fn import(dir: &Path, device: &Device) -> Result<MoeLm> {
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
    let mut model = config.init(device)?;
    let mut st = HfTensors::open(dir)?;
    let (d, v) = (config.d_model, config.vocab_size);

    model.embed.weight =
        Param::from_tensor(st.matrix("model.embed_tokens.weight", v, d, device)?);
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
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index whose shard names leave the directory is refused before any shard is read.
    #[test]
    fn shards_outside_the_directory_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = if cfg!(windows) {
            "C:\\x.safetensors"
        } else {
            "/etc/passwd"
        };
        for file in [
            "../secret.safetensors",
            "a/../../b.safetensors",
            outside,
            "",
            "./",
        ] {
            let index = serde_json::json!({"weight_map": {"model.norm.weight": file}});
            fs::write(
                tmp.path().join("model.safetensors.index.json"),
                index.to_string(),
            )
            .unwrap();
            let err = HfTensors::open(tmp.path()).err().expect(file).to_string();
            assert!(err.contains("outside the model directory"), "{file}: {err}");
            assert_eq!(err.lines().count(), 1);
        }
        for file in [
            "model-00001-of-00002.safetensors",
            "shards/model-1.safetensors",
        ] {
            let index = serde_json::json!({"weight_map": {"model.norm.weight": file}});
            fs::write(
                tmp.path().join("model.safetensors.index.json"),
                index.to_string(),
            )
            .unwrap();
            let st = HfTensors::open(tmp.path()).unwrap();
            assert_eq!(st.index["model.norm.weight"], tmp.path().join(file));
        }
    }
}
