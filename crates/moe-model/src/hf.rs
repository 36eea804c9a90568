//! Import of Hugging Face Mixtral checkpoints (`config.json` with `model_type: mixtral` and
//! `model.safetensors` or a sharded `model.safetensors.index.json`).
//!
//! Numerics follow the reference Mixtral: softmax over all experts, then top-k, then
//! renormalisation; SwiGLU experts `w2(silu(w1 x) * w3 x)`; RoPE in the half-rotation layout.
//! Hugging Face linears are stored `[out, in]`; ours are `[in, out]`, so every projection is
//! transposed, and the per-expert `w1`/`w3`/`w2` are stacked into the expert bank.

use std::collections::HashMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use moe_core::{MoeLayerConfig, RouterConfig};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::block::Ffn;
use crate::config::{FfnPlan, ModelConfig};
use crate::error::{ModelError, Result};
use crate::model::MoeLm;

/// Reads a Hugging Face Mixtral `config.json` into our [`ModelConfig`].
pub fn config_from_hf(path: &Path) -> Result<ModelConfig> {
    let text = fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |problem: String| ModelError::checkpoint(path, problem);
    match json.get("model_type").and_then(Value::as_str) {
        Some("mixtral") => {}
        Some(other) => {
            return Err(bad(format!(
                "model_type is '{other}', only 'mixtral' can be imported"
            )));
        }
        None => return Err(bad("no model_type: not a Hugging Face model config".into())),
    }
    let int = |key: &str| -> Result<usize> {
        json.get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("missing or non-integer '{key}'")))
    };
    let float = |v: Option<&Value>| v.and_then(Value::as_f64);
    let d_model = int("hidden_size")?;
    let n_heads = int("num_attention_heads")?;
    let d_ff = int("intermediate_size")?;
    let rope_theta = float(json.get("rope_theta"))
        .or_else(|| {
            float(
                json.get("rope_parameters")
                    .and_then(|p| p.get("rope_theta")),
            )
        })
        .unwrap_or(1e6);
    let head_dim = json
        .get("head_dim")
        .and_then(Value::as_u64)
        .map(|v| v as usize);
    let top_k = int("num_experts_per_tok")?;
    let config = ModelConfig::new()
        .with_vocab_size(int("vocab_size")?)
        .with_d_model(d_model)
        .with_n_layers(int("num_hidden_layers")?)
        .with_n_heads(n_heads)
        .with_n_kv_heads(
            json.get("num_key_value_heads")
                .and_then(Value::as_u64)
                .map_or(n_heads, |v| v as usize),
        )
        .with_head_dim(head_dim.filter(|&h| h != d_model / n_heads.max(1)))
        .with_rope_theta(rope_theta)
        .with_rms_eps(float(json.get("rms_norm_eps")).unwrap_or(1e-5))
        .with_max_seq_len(int("max_position_embeddings")?)
        .with_tie_embeddings(
            json.get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        )
        .with_d_ff(d_ff)
        .with_ffn_plan(FfnPlan::AllMoe)
        .with_moe(
            MoeLayerConfig::new(d_model, d_ff, int("num_local_experts")?)
                .with_router(RouterConfig::mixtral().with_top_k(top_k)),
        );
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
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

/// Loads a Hugging Face Mixtral directory onto `device`.
pub fn import(dir: &Path, device: &Device) -> Result<MoeLm> {
    let meta = fs::metadata(dir).map_err(|e| ModelError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(ModelError::checkpoint(
            dir,
            "is a file, expected a Hugging Face model directory",
        ));
    }
    let config = config_from_hf(&dir.join("config.json"))?;
    let mut model = config.init(device)?;
    let mut st = HfTensors::open(dir)?;
    let (d, v, hd) = (config.d_model, config.vocab_size, config.head_dim());
    let (h, kvh, e, f) = (
        config.n_heads,
        config.n_kv_heads,
        config.moe.n_experts,
        config.moe.d_ff,
    );

    model.embed.weight =
        Param::from_tensor(st.matrix("model.embed_tokens.weight", v, d, device)?);
    for (i, block) in model.blocks.iter_mut().enumerate() {
        let p = format!("model.layers.{i}");
        block.attn.q_proj.weight =
            st.linear(&format!("{p}.self_attn.q_proj.weight"), d, h * hd, device)?;
        block.attn.k_proj.weight =
            st.linear(&format!("{p}.self_attn.k_proj.weight"), d, kvh * hd, device)?;
        block.attn.v_proj.weight =
            st.linear(&format!("{p}.self_attn.v_proj.weight"), d, kvh * hd, device)?;
        block.attn.o_proj.weight =
            st.linear(&format!("{p}.self_attn.o_proj.weight"), h * hd, d, device)?;
        block.attn_norm.gamma = st.vector(&format!("{p}.input_layernorm.weight"), d, device)?;
        block.ffn_norm.gamma =
            st.vector(&format!("{p}.post_attention_layernorm.weight"), d, device)?;
        let Ffn::Moe(moe) = &mut block.ffn else {
            unreachable!("an imported Mixtral is MoE in every layer")
        };
        let m = format!("{p}.block_sparse_moe");
        moe.router.gate.weight = st.linear(&format!("{m}.gate.weight"), d, e, device)?;
        // w1 (gate) and w3 (up) are [f, d]: transposed to [d, f]; w2 (down) is [d, f] -> [f, d].
        let mut bank = |w: &str, rows: usize, cols: usize| -> Result<Param<Tensor<3>>> {
            let experts = (0..e)
                .map(|j| {
                    Ok(st
                        .matrix(&format!("{m}.experts.{j}.{w}.weight"), rows, cols, device)?
                        .transpose()
                        .unsqueeze_dim(0))
                })
                .collect::<Result<Vec<Tensor<3>>>>()?;
            Ok(Param::from_tensor(Tensor::cat(experts, 0)))
        };
        moe.experts.w_gate = bank("w1", f, d)?;
        moe.experts.w_up = bank("w3", f, d)?;
        moe.experts.w_down = bank("w2", d, f)?;
    }
    model.norm.gamma = st.vector("model.norm.weight", d, device)?;
    // A tied model reads its output projection from the embedding; a stored lm_head is ignored.
    if let Some(head) = &mut model.lm_head {
        head.weight = st.linear("lm_head.weight", d, v, device)?;
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
