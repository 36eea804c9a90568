//! A Hugging Face `config.json`: typed accessors whose errors name the file and the key, the
//! refusals every family shares, and the settings every family reads alike.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{FAMILIES, Family};
use crate::config::{FfnPlan, ModelConfig};
use crate::error::{ModelError, Result};

/// A Hugging Face `config.json`, with accessors whose errors name the file and the key.
pub(super) struct HfConfig {
    path: PathBuf,
    json: Value,
}

impl HfConfig {
    pub(super) fn read(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            json,
        })
    }

    pub(super) fn family(&self) -> Result<&'static dyn Family> {
        match self.json.get("model_type").and_then(Value::as_str) {
            Some(t) => FAMILIES
                .iter()
                .find(|(name, _)| *name == t)
                .map(|(_, f)| *f)
                .ok_or_else(|| {
                    let known: Vec<&str> = FAMILIES.iter().map(|(n, _)| *n).collect();
                    self.error(format!(
                        "model_type is '{t}', importable: {}",
                        known.join(", ")
                    ))
                }),
            None => Err(self.error("no model_type: not a Hugging Face model config")),
        }
    }

    pub(super) fn error(&self, problem: impl Into<String>) -> ModelError {
        ModelError::checkpoint(&self.path, problem)
    }

    /// A value that is present and not `null`.
    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn int(&self, key: &str) -> Result<usize> {
        self.opt_int(key)?
            .ok_or_else(|| self.error(format!("missing '{key}'")))
    }

    /// The first of `keys` that is set (transformers renames some keys between versions).
    pub(super) fn int_of(&self, keys: &[&str]) -> Result<usize> {
        for key in keys {
            if let Some(v) = self.opt_int(key)? {
                return Ok(v);
            }
        }
        Err(self.error(format!("missing '{}'", keys.join("' or '"))))
    }

    pub(super) fn opt_int(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|v| v as usize)
                    .ok_or_else(|| self.error(format!("'{key}' is {v}, expected an integer")))
            })
            .transpose()
    }

    pub(super) fn float(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.error(format!("'{key}' is {v}, expected a number"))),
        }
    }

    pub(super) fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(format!("'{key}' is {v}, expected true or false"))),
        }
    }

    pub(super) fn ints(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                .ok_or_else(|| self.error(format!("'{key}' is {v}, expected a list of integers"))),
        }
    }

    /// The one-line refusal of a setting this import does not implement.
    pub(super) fn refuse(&self, key: &str, what: &str) -> ModelError {
        let value = self.json.get(key).map_or("?".into(), Value::to_string);
        self.error(format!("'{key}' = {value}: {what} is not implemented"))
    }

    /// Refuses `key` when it is set to anything but `null` or one of `allowed`.
    pub(super) fn only(&self, key: &str, allowed: &[Value], what: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if !allowed.contains(v) => Err(self.refuse(key, what)),
            _ => Ok(()),
        }
    }

    /// What every family shares: sizes, RoPE, norms and the head, with the refusals of settings
    /// that would change those numerics. `rope_theta` and `rms_norm_eps` default to the family's
    /// own defaults. The MoE layer is the family's to fill in.
    pub(super) fn base(&self, default_theta: f64, default_eps: f64) -> Result<ModelConfig> {
        self.only(
            "hidden_act",
            &["silu".into()],
            "an activation other than silu",
        )?;
        self.only("rope_scaling", &[], "RoPE scaling")?;
        if let Some(params) = self.get("rope_parameters") {
            let kind = params.get("rope_type").and_then(Value::as_str);
            if kind.is_some_and(|k| k != "default") {
                return Err(self.error(format!(
                    "'rope_parameters.rope_type' = {}: RoPE scaling is not implemented",
                    params["rope_type"]
                )));
            }
        }
        self.only("attention_bias", &[false.into()], "attention biases")?;
        self.only("mlp_bias", &[false.into()], "MLP biases")?;
        self.only("clip_qkv", &[], "clipping q/k/v")?;
        self.only(
            "partial_rotary_factor",
            &[1.into(), 1.0.into()],
            "partial RoPE",
        )?;
        let max_seq_len = self.int("max_position_embeddings")?;
        // Qwen configs turn the window off with use_sliding_window or per layer in layer_types
        // (and then store 0 or null as the window); Mixtral's is on whenever set.
        let layer_types: Vec<&str> = match self.get("layer_types") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(Value::as_str).collect())
                .ok_or_else(|| self.error(format!("'layer_types' is {v}, expected strings")))?,
        };
        if let Some(t) = layer_types
            .iter()
            .find(|t| !["full_attention", "sliding_attention"].contains(t))
        {
            return Err(self.error(format!(
                "'layer_types' has '{t}': only full and sliding attention are known"
            )));
        }
        let windowed = self.bool("use_sliding_window", true)?
            && (layer_types.is_empty() || layer_types.contains(&"sliding_attention"));
        if windowed
            && let Some(w) = self.opt_int("sliding_window")?
            && w < max_seq_len
        {
            return Err(self.refuse(
                "sliding_window",
                &format!("sliding-window attention (window below the context {max_seq_len})"),
            ));
        }
        let d_model = self.int("hidden_size")?;
        let n_heads = self.int("num_attention_heads")?;
        let head_dim = self.opt_int("head_dim")?;
        let rope_theta = match self.get("rope_theta") {
            Some(_) => self.float("rope_theta", default_theta)?,
            None => self
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or(default_theta),
        };
        Ok(ModelConfig::new()
            .with_vocab_size(self.int("vocab_size")?)
            .with_d_model(d_model)
            .with_n_layers(self.int("num_hidden_layers")?)
            .with_n_heads(n_heads)
            .with_n_kv_heads(self.opt_int("num_key_value_heads")?.unwrap_or(n_heads))
            .with_head_dim(head_dim.filter(|&h| h != d_model / n_heads.max(1)))
            .with_rope_theta(rope_theta)
            .with_rms_eps(self.float("rms_norm_eps", default_eps)?)
            .with_max_seq_len(max_seq_len)
            .with_tie_embeddings(self.bool("tie_word_embeddings", false)?)
            .with_ffn_plan(FfnPlan::AllMoe))
    }

    /// The Qwen placement of MoE layers: layer i is MoE when `(i + 1) % decoder_sparse_step == 0`
    /// and i is not in `mlp_only_layers`.
    pub(super) fn qwen_layers(&self, config: ModelConfig) -> Result<ModelConfig> {
        let step = self.opt_int("decoder_sparse_step")?.unwrap_or(1);
        let plan = match step {
            0 => return Err(self.refuse("decoder_sparse_step", "a step of 0")),
            1 => FfnPlan::AllMoe,
            n => FfnPlan::EveryNth { n },
        };
        let dense = self.ints("mlp_only_layers")?;
        Ok(config
            .with_ffn_plan(plan)
            .with_dense_layers((!dense.is_empty()).then_some(dense)))
    }

    /// Validates a finished config, naming this file on failure.
    pub(super) fn checked(&self, config: ModelConfig) -> Result<ModelConfig> {
        config.validate().map_err(|e| self.error(e.to_string()))?;
        Ok(config)
    }
}
