//! Export of a model as a Hugging Face Mixtral directory: `config.json`, `model.safetensors`
//! under the names import reads (the per-expert layout `block_sparse_moe.experts.N.w1/w2/w3`,
//! router `block_sparse_moe.gate`), every linear transposed back to `[out, in]`, plus any extra
//! files (a checkpoint's tokenizer files).
//!
//! Only what Mixtral's format expresses is exported; anything else is refused with a one-line
//! error naming the config option. The directory is written to a staging sibling and renamed into
//! place at the end: a failure leaves nothing at the target.

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::DType;
use moe_core::RouterKind;
use safetensors::{Dtype, tensor::TensorView};
use serde_json::json;

use crate::block::Ffn;
use crate::config::ModelConfig;
use crate::durable;
use crate::error::{ModelError, Result};
use crate::model::MoeLm;

/// Why `config` cannot be written as a Mixtral checkpoint: the option and its value, or `None`.
pub fn mixtral_refusal(config: &ModelConfig) -> Option<String> {
    let moe = &config.moe;
    let r = &moe.router;
    let refusals = [
        (
            config.n_moe_layers() != config.n_layers,
            format!(
                "ffn_plan = {:?} / dense_layers = {:?}: dense layers mixed in",
                config.ffn_plan, config.dense_layers
            ),
        ),
        (
            moe.n_shared_experts > 0,
            format!(
                "moe.n_shared_experts = {}: shared experts",
                moe.n_shared_experts
            ),
        ),
        (
            config.shared_expert.is_some(),
            "shared_expert is set: a shared expert".into(),
        ),
        (
            config.has_qkv_bias(),
            "qkv_bias = true: attention biases".into(),
        ),
        (
            config.qk_norm.is_some(),
            format!("qk_norm = {:?}: q/k norms", config.qk_norm),
        ),
        (
            config.attn_scale.is_some(),
            format!(
                "attn_scale = {:?}: a non-default attention scale",
                config.attn_scale
            ),
        ),
        (
            config.embed_multiplier.is_some(),
            format!(
                "embed_multiplier = {:?}: multipliers",
                config.embed_multiplier
            ),
        ),
        (
            config.residual_multiplier.is_some(),
            format!(
                "residual_multiplier = {:?}: multipliers",
                config.residual_multiplier
            ),
        ),
        (
            config.logits_multiplier.is_some(),
            format!(
                "logits_multiplier = {:?}: multipliers",
                config.logits_multiplier
            ),
        ),
        (
            r.kind != RouterKind::Softmax,
            format!("moe.router.kind = {:?}: routing other than softmax", r.kind),
        ),
        (
            !r.renormalize,
            "moe.router.renormalize = false: non-renormalised top-k".into(),
        ),
        (
            r.selection_bias,
            "moe.router.selection_bias = true: a selection bias".into(),
        ),
        (
            r.route_scale != 1.0,
            format!(
                "moe.router.route_scale = {}: a routed scaling",
                r.route_scale
            ),
        ),
        (
            moe.capacity_factor.is_some(),
            format!(
                "moe.capacity_factor = {:?}: dropping tokens (Mixtral is dropless)",
                moe.capacity_factor
            ),
        ),
    ];
    refusals
        .into_iter()
        .find(|(refused, _)| *refused)
        .map(|(_, why)| format!("{why} cannot be expressed in the Mixtral format"))
}

/// The Mixtral `config.json` of `config`.
fn mixtral_config(config: &ModelConfig, dtype: &str) -> serde_json::Value {
    json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.moe.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "sliding_window": null,
        "attention_dropout": 0.0,
        "num_local_experts": config.moe.n_experts,
        "num_experts_per_tok": config.moe.router.top_k,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": true,
        "torch_dtype": dtype,
        "dtype": dtype,
    })
}

/// Named tensors in `[out, in]` orientation, in the model's dtypes, collected for one
/// safetensors file.
#[derive(Default)]
struct Tensors(Vec<(String, Vec<usize>, Dtype, Vec<u8>)>);

impl Tensors {
    fn push<const D: usize>(&mut self, name: String, t: Tensor<D>) -> Result<()> {
        let shape = t.dims().to_vec();
        let data = t.into_data();
        let dtype = match data.dtype() {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            other => {
                return Err(ModelError::Config(format!(
                    "{name}: {other:?} weights cannot be exported"
                )));
            }
        };
        self.0
            .push((name, shape, dtype, data.into_bytes().to_vec()));
        Ok(())
    }

    /// The `torch_dtype` of the file: that of most of its bytes.
    fn torch_dtype(&self) -> &'static str {
        let bytes =
            |d: Dtype| -> usize { self.0.iter().filter(|t| t.2 == d).map(|t| t.3.len()).sum() };
        [
            (Dtype::F32, "float32"),
            (Dtype::BF16, "bfloat16"),
            (Dtype::F16, "float16"),
        ]
        .into_iter()
        .max_by_key(|(d, _)| bytes(*d))
        .map_or("float32", |(_, name)| name)
    }

    /// Our linear `[in, out]` as `{prefix}.weight` `[out, in]`; a bias is refused.
    fn linear(&mut self, prefix: &str, linear: &Linear) -> Result<()> {
        if linear.bias.is_some() {
            return Err(ModelError::Config(format!(
                "{prefix} has a bias, which the Mixtral format cannot express"
            )));
        }
        self.push(format!("{prefix}.weight"), linear.weight.val().transpose())
    }

    fn vector(&mut self, name: String, p: &Param<Tensor<1>>) -> Result<()> {
        self.push(name, p.val())
    }

    fn serialize(&self, path: &Path) -> Result<Vec<u8>> {
        let views = self
            .0
            .iter()
            .map(|(name, shape, dtype, bytes)| {
                TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| ModelError::checkpoint(path, format!("tensor '{name}': {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize(views, Some(meta))
            .map_err(|e| ModelError::checkpoint(path, format!("cannot write safetensors: {e}")))
    }
}

/// The weights of `model` under Mixtral's names.
fn mixtral_tensors(model: &MoeLm) -> Result<Tensors> {
    let mut t = Tensors::default();
    t.push("model.embed_tokens.weight".into(), model.embed.weight.val())?;
    for (i, block) in model.blocks.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &block.attn;
        if a.q_norm.is_some() || a.k_norm.is_some() {
            return Err(ModelError::Config(format!(
                "{p} has q/k norms, which the Mixtral format cannot express"
            )));
        }
        if block.shared_expert.is_some() || block.residual_multiplier.is_some() {
            return Err(ModelError::Config(format!(
                "{p} has a shared expert or a residual multiplier, which the Mixtral format \
                 cannot express"
            )));
        }
        t.linear(&format!("{p}.self_attn.q_proj"), &a.q_proj)?;
        t.linear(&format!("{p}.self_attn.k_proj"), &a.k_proj)?;
        t.linear(&format!("{p}.self_attn.v_proj"), &a.v_proj)?;
        t.linear(&format!("{p}.self_attn.o_proj"), &a.o_proj)?;
        t.vector(
            format!("{p}.input_layernorm.weight"),
            &block.attn_norm.gamma,
        )?;
        t.vector(
            format!("{p}.post_attention_layernorm.weight"),
            &block.ffn_norm.gamma,
        )?;
        let Ffn::Moe(moe) = &block.ffn else {
            return Err(ModelError::Config(format!(
                "{p} is dense, which the Mixtral format cannot express"
            )));
        };
        if moe.shared.is_some() || moe.router.bias.is_some() {
            return Err(ModelError::Config(format!(
                "{p} has shared experts or a router bias, which the Mixtral format cannot express"
            )));
        }
        let m = format!("{p}.block_sparse_moe");
        t.linear(&format!("{m}.gate"), &moe.router.gate)?;
        let ex = &moe.experts;
        let [e, _, _] = ex.w_gate.shape().dims();
        // Ours: gate/up [E, d, f], down [E, f, d]; Mixtral: w1/w3 [f, d], w2 [d, f] per expert.
        for (w, bank) in [("w1", &ex.w_gate), ("w3", &ex.w_up), ("w2", &ex.w_down)] {
            let bank = bank.val();
            let [_, rows, cols] = bank.dims();
            for j in 0..e {
                let one: Tensor<2> = bank.clone().slice(j..j + 1).reshape([rows, cols]);
                t.push(format!("{m}.experts.{j}.{w}.weight"), one.transpose())?;
            }
        }
    }
    t.vector("model.norm.weight".into(), &model.norm.gamma)?;
    if let Some(head) = &model.lm_head {
        t.linear("lm_head", head)?;
    }
    Ok(t)
}

/// Refuses a target that exists and is anything but an empty directory.
fn check_target(dir: &Path) -> Result<bool> {
    match fs::symlink_metadata(dir) {
        Err(_) => Ok(false),
        Ok(m) if !m.is_dir() => Err(ModelError::checkpoint(
            dir,
            "already exists and is not a directory",
        )),
        Ok(_) => {
            let mut entries = fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
            if entries.next().is_some() {
                return Err(ModelError::checkpoint(
                    dir,
                    "already exists and is not empty: give a new or empty directory",
                ));
            }
            Ok(true)
        }
    }
}

/// Removes the staging directory unless the export finished.
struct Staging(PathBuf, bool);

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.1 {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Writes `model` as a Hugging Face Mixtral directory at `dir` (new, or an empty directory),
/// with the regular files of `extra` (a checkpoint's tokenizer files) beside the weights. Refuses
/// with a one-line error a model the Mixtral format cannot express. Returns the directory.
pub fn export_mixtral(model: &MoeLm, dir: &Path, extra: Option<&Path>) -> Result<PathBuf> {
    if let Some(why) = mixtral_refusal(&model.config) {
        return Err(ModelError::Config(why));
    }
    let replace_empty = check_target(dir)?;
    let parent = durable::parent_dir(dir);
    fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
    let name = dir
        .file_name()
        .ok_or_else(|| ModelError::checkpoint(dir, "has no directory name"))?
        .to_string_lossy()
        .into_owned();
    let staging = parent.join(format!(".{name}.export-{}", durable::unique_suffix()));
    fs::create_dir(&staging).map_err(|e| ModelError::io(&staging, e))?;
    let mut guard = Staging(staging.clone(), false);

    let weights = staging.join("model.safetensors");
    let tensors = mixtral_tensors(model)?;
    let dtype = tensors.torch_dtype();
    let bytes = tensors.serialize(&weights)?;
    drop(tensors);
    fs::write(&weights, bytes).map_err(|e| ModelError::io(&weights, e))?;
    let config = staging.join("config.json");
    let text = serde_json::to_string_pretty(&mixtral_config(&model.config, dtype))
        .expect("JSON values serialise");
    fs::write(&config, text).map_err(|e| ModelError::io(&config, e))?;
    if let Some(extra) = extra.filter(|p| p.is_dir()) {
        for entry in fs::read_dir(extra).map_err(|e| ModelError::io(extra, e))? {
            let entry = entry.map_err(|e| ModelError::io(extra, e))?;
            let file = entry.file_name();
            let to = staging.join(&file);
            if entry.path().is_file() && !to.exists() {
                fs::copy(entry.path(), &to).map_err(|e| ModelError::io(entry.path(), e))?;
            }
        }
    }
    durable::sync_tree(&staging)?;
    if replace_empty {
        // Only an empty directory: remove_dir fails on anything else.
        fs::remove_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    }
    durable::rename(&staging, dir)?;
    guard.1 = true;
    Ok(dir.to_path_buf())
}
