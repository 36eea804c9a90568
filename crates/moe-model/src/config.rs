//! The model configuration, saved as `config.json` in every checkpoint.

use std::path::Path;

use burn::prelude::*;
use moe_core::{MoeLayerConfig, RouterConfig, RouterKind};

use crate::error::ModelError;

/// Which layers get an MoE feed-forward block and which a dense one.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum FfnPlan {
    /// Every layer is MoE.
    AllMoe,
    /// Every layer is dense (a plain transformer).
    AllDense,
    /// Every n-th layer is MoE (layers n-1, 2n-1, ...), as in GShard and Switch.
    EveryNth {
        /// The period.
        n: usize,
    },
    /// The first k layers are dense and the rest MoE, as in DeepSeekMoE.
    FirstDense {
        /// Dense layers at the bottom.
        k: usize,
    },
}

impl FfnPlan {
    /// Whether layer `i` is MoE.
    pub fn is_moe(&self, i: usize) -> bool {
        match *self {
            Self::AllMoe => true,
            Self::AllDense => false,
            Self::EveryNth { n } => n > 0 && (i + 1).is_multiple_of(n),
            Self::FirstDense { k } => i >= k,
        }
    }
}

/// Where the RMSNorm on queries and keys applies (before RoPE).
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum QkNorm {
    /// Per head, over `head_dim`, with one gain vector shared by the heads (Qwen3-MoE).
    PerHead,
    /// Over the whole projection: `n_heads * head_dim` for queries, `n_kv_heads * head_dim` for
    /// keys (OLMoE).
    Full,
}

/// A dense SwiGLU expert beside the routed ones, of its own width, optionally scaled per token by
/// `sigmoid(x w)` (Qwen2-MoE). Unlike `moe.n_shared_experts` its width need not be a multiple
/// of the routed experts' width.
#[derive(Config, Debug, PartialEq)]
pub struct SharedExpertConfig {
    /// Hidden width.
    pub d_ff: usize,
    /// Scale the output by `sigmoid(x w)`, with `w: [d_model, 1]`. Default: true.
    #[config(default = true)]
    pub gated: bool,
}

/// A decoder-only transformer language model with dense or MoE feed-forward blocks.
///
/// The `Option` fields after `moe` select variants of the numerics that imported model families
/// use; `None` (also what an older `config.json` without them reads as) is the plain model.
#[derive(Config, Debug, PartialEq)]
pub struct ModelConfig {
    /// Vocabulary size. Default: 256 (byte-level).
    #[config(default = 256)]
    pub vocab_size: usize,
    /// Model width. Default: 128.
    #[config(default = 128)]
    pub d_model: usize,
    /// Transformer blocks. Default: 4.
    #[config(default = 4)]
    pub n_layers: usize,
    /// Query heads. Default: 4.
    #[config(default = 4)]
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention; must divide `n_heads`). Default: 2.
    #[config(default = 2)]
    pub n_kv_heads: usize,
    /// Width of each head. Default: `None`, meaning `d_model / n_heads`.
    #[config(default = "None")]
    pub head_dim: Option<usize>,
    /// RoPE base frequency. Default: 10000.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// RMSNorm epsilon. Default: 1e-5.
    #[config(default = 1e-5)]
    pub rms_eps: f64,
    /// Longest sequence (prompt plus generated tokens). Default: 256.
    #[config(default = 256)]
    pub max_seq_len: usize,
    /// Share the output projection with the token embedding. Default: true.
    #[config(default = true)]
    pub tie_embeddings: bool,
    /// Hidden width of the dense SwiGLU blocks. Default: 256.
    #[config(default = 256)]
    pub d_ff: usize,
    /// Which layers are MoE. Default: [`FfnPlan::AllMoe`].
    #[config(default = "FfnPlan::AllMoe")]
    pub ffn_plan: FfnPlan,
    /// The MoE layer (its `d_model` must equal the model's). Default: 8 experts of width 128,
    /// Mixtral routing (top-2), dropless.
    #[config(default = "MoeLayerConfig::new(128, 128, 8).with_router(RouterConfig::mixtral())")]
    pub moe: MoeLayerConfig,
    /// Layers that stay dense whatever `ffn_plan` says (Qwen's `mlp_only_layers`). Default: none.
    #[config(default = "None")]
    pub dense_layers: Option<Vec<usize>>,
    /// Biases on the query, key and value projections (Qwen2-MoE). Default: none.
    #[config(default = "None")]
    pub qkv_bias: Option<bool>,
    /// RMSNorm on queries and keys (Qwen3-MoE, OLMoE). Default: none.
    #[config(default = "None")]
    pub qk_norm: Option<QkNorm>,
    /// Softmax scale of the attention scores. Default: `1 / sqrt(head_dim)`.
    #[config(default = "None")]
    pub attn_scale: Option<f64>,
    /// Factor on the token embeddings (Granite). Default: 1.
    #[config(default = "None")]
    pub embed_multiplier: Option<f64>,
    /// Factor on each block's attention and feed-forward outputs before they join the residual
    /// stream (Granite). Default: 1.
    #[config(default = "None")]
    pub residual_multiplier: Option<f64>,
    /// Factor on the output logits (Granite divides by `logits_scaling`). Default: 1.
    #[config(default = "None")]
    pub logits_multiplier: Option<f64>,
    /// A shared expert in every MoE layer, beside the routed experts (Qwen2-MoE). Default: none.
    #[config(default = "None")]
    pub shared_expert: Option<SharedExpertConfig>,
}

impl ModelConfig {
    /// Width of each attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Whether layer `i` is MoE.
    pub fn is_moe(&self, i: usize) -> bool {
        self.ffn_plan.is_moe(i) && !self.dense_layers.as_ref().is_some_and(|d| d.contains(&i))
    }

    /// Whether the query, key and value projections have biases.
    pub fn has_qkv_bias(&self) -> bool {
        self.qkv_bias == Some(true)
    }

    /// Checks every size and rate; the error names the field.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |msg: String| Err(ModelError::Config(msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("max_seq_len", self.max_seq_len),
            ("d_ff", self.d_ff),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.head_dim.is_none() && !self.d_model.is_multiple_of(self.n_heads) {
            return bad(format!(
                "d_model ({}) must be divisible by n_heads ({})",
                self.d_model, self.n_heads
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "n_heads ({}) must be a multiple of n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even and positive (RoPE rotates pairs)",
                self.head_dim()
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!(
                "rope_theta must be positive, got {}",
                self.rope_theta
            ));
        }
        if !(self.rms_eps > 0.0 && self.rms_eps.is_finite()) {
            return bad(format!("rms_eps must be positive, got {}", self.rms_eps));
        }
        for (name, v) in [
            ("attn_scale", self.attn_scale),
            ("embed_multiplier", self.embed_multiplier),
            ("residual_multiplier", self.residual_multiplier),
            ("logits_multiplier", self.logits_multiplier),
        ] {
            if v.is_some_and(|v| !(v.is_finite() && v != 0.0)) {
                return bad(format!("{name} must be finite and non-zero, got {v:?}"));
            }
        }
        if let Some(&layer) = self
            .dense_layers
            .iter()
            .flatten()
            .find(|&&l| l >= self.n_layers)
        {
            return bad(format!(
                "dense_layers names layer {layer}, the model has {}",
                self.n_layers
            ));
        }
        if self.shared_expert.as_ref().is_some_and(|s| s.d_ff == 0) {
            return bad("shared_expert.d_ff must be at least 1".into());
        }
        if let FfnPlan::EveryNth { n: 0 } = self.ffn_plan {
            return bad("ffn_plan every_nth needs n >= 1".into());
        }
        if self.n_moe_layers() > 0 {
            if self.moe.d_model != self.d_model {
                return bad(format!(
                    "moe.d_model ({}) must equal d_model ({})",
                    self.moe.d_model, self.d_model
                ));
            }
            self.moe.validate()?;
            if self.moe.router.kind == RouterKind::ExpertChoice {
                return bad(
                    "expert-choice routing is not causal (a token's experts depend on \
                     later tokens of its sequence, and decoding one token makes every expert \
                     take it): use a token-choice router in a language model"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// Number of MoE layers.
    pub fn n_moe_layers(&self) -> usize {
        (0..self.n_layers).filter(|&i| self.is_moe(i)).count()
    }

    /// The dense model with the same active parameters per token: every FFN dense, of width
    /// `k * expert_d_ff` plus the shared experts' width (a shared expert's gate aside).
    pub fn dense_equivalent(&self) -> Self {
        let width = (self.moe.experts_per_token() * self.moe.d_ff as f64).round() as usize
            + self.moe.n_shared_experts * self.moe.d_ff
            + self.shared_expert.as_ref().map_or(0, |s| s.d_ff);
        self.clone()
            .with_ffn_plan(FfnPlan::AllDense)
            .with_shared_expert(None)
            .with_d_ff(width)
    }

    /// Reads and validates a `config.json`. Fields added to the config after the file was
    /// written take their defaults ([`fill_defaults`]).
    pub fn load_json(path: &Path) -> crate::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let json = |source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        };
        let mut found: serde_json::Value = serde_json::from_str(&text).map_err(json)?;
        let defaults = serde_json::to_value(Self::new()).expect("a config always serialises");
        fill_defaults(&mut found, &defaults);
        let config: Self = serde_json::from_value(found).map_err(json)?;
        config
            .validate()
            .map_err(|e| ModelError::checkpoint(path, e.to_string()))?;
        Ok(config)
    }

    /// The config as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serialises")
    }
}

/// Copies into `found` every key of `defaults` it lacks, recursing into objects both have.
///
/// Burn's `Config` derive gives a missing JSON field no default, so a field added to a config
/// would make every file written before it unreadable. Readers of saved configs fill the file's
/// gaps from the serialised defaults first: an old checkpoint keeps loading, and the new field
/// takes its documented default. Hence the rule for adding a field: its default must reproduce
/// what files without it meant.
///
/// Limits: the files are written whole by this program, so a gap is a field added since; a key
/// missing from a hand-edited file takes the enclosing default's value even where the config
/// has no default of its own (a weights file of other shapes then fails to load). An optional
/// sub-config whose default is `None` (`null`) is not filled inside: give such a config's new
/// fields `Option` types.
pub fn fill_defaults(found: &mut serde_json::Value, defaults: &serde_json::Value) {
    let (Some(found), Some(defaults)) = (found.as_object_mut(), defaults.as_object()) else {
        return;
    };
    for (key, default) in defaults {
        match found.get_mut(key) {
            Some(value) => fill_defaults(value, default),
            None => {
                found.insert(key.clone(), default.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint written before `RouterConfig::init_std` existed still loads, with the
    /// default; a value the file gives is kept, and a file that is not a config is refused.
    #[test]
    fn configs_written_before_a_field_existed_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let config = ModelConfig::new().with_n_layers(3);
        let mut old = serde_json::to_value(&config).unwrap();
        let router = old["moe"]["router"].as_object_mut().unwrap();
        assert!(router.remove("init_std").is_some());
        router.insert("top_k".into(), 1.into());
        std::fs::write(&path, old.to_string()).unwrap();
        let loaded = ModelConfig::load_json(&path).unwrap();
        assert_eq!(loaded.moe.router.init_std, 0.02);
        assert_eq!((loaded.n_layers, loaded.moe.router.top_k), (3, 1));
        std::fs::write(&path, "[1, 2]").unwrap();
        assert!(ModelConfig::load_json(&path).is_err());
    }

    #[test]
    fn plans_place_moe_layers() {
        let layers = |plan: FfnPlan| (0..6).filter(|&i| plan.is_moe(i)).collect::<Vec<_>>();
        assert_eq!(layers(FfnPlan::AllMoe), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(layers(FfnPlan::AllDense), Vec::<usize>::new());
        assert_eq!(layers(FfnPlan::EveryNth { n: 2 }), vec![1, 3, 5]);
        assert_eq!(layers(FfnPlan::FirstDense { k: 1 }), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn default_config_is_valid_and_round_trips_json() {
        let config = ModelConfig::new();
        config.validate().unwrap();
        let back: ModelConfig = serde_json::from_str(&config.to_json()).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn configs_without_the_variant_fields_still_load() {
        let mut json: serde_json::Value =
            serde_json::from_str(&ModelConfig::new().to_json()).unwrap();
        let object = json.as_object_mut().unwrap();
        for key in [
            "dense_layers",
            "qkv_bias",
            "qk_norm",
            "attn_scale",
            "embed_multiplier",
            "residual_multiplier",
            "logits_multiplier",
            "shared_expert",
        ] {
            assert!(object.remove(key).is_some(), "{key}");
        }
        let back: ModelConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, ModelConfig::new());
    }

    #[test]
    fn dense_layers_override_the_plan() {
        let config = ModelConfig::new().with_dense_layers(Some(vec![0, 2]));
        let moe: Vec<usize> = (0..4).filter(|&i| config.is_moe(i)).collect();
        assert_eq!(moe, vec![1, 3]);
        assert!(config.with_dense_layers(Some(vec![4])).validate().is_err());
    }

    #[test]
    fn impossible_configs_name_the_problem() {
        let cases = [
            (ModelConfig::new().with_n_heads(3), "divisible by n_heads"),
            (
                ModelConfig::new().with_n_kv_heads(3),
                "multiple of n_kv_heads",
            ),
            (ModelConfig::new().with_n_layers(0), "n_layers"),
            (ModelConfig::new().with_rope_theta(-1.0), "rope_theta"),
            (ModelConfig::new().with_head_dim(Some(7)), "head_dim"),
            (
                ModelConfig::new().with_moe(MoeLayerConfig::new(64, 128, 8)),
                "moe.d_model",
            ),
            (
                ModelConfig::new().with_moe(
                    MoeLayerConfig::new(128, 128, 2).with_router(RouterConfig::new().with_top_k(3)),
                ),
                "top_k",
            ),
            (
                ModelConfig::new().with_moe(
                    MoeLayerConfig::new(128, 128, 8).with_router(RouterConfig::expert_choice(2)),
                ),
                "not causal",
            ),
        ];
        for (config, expected) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }

    #[test]
    fn dense_equivalent_matches_active_width() {
        let config = ModelConfig::new();
        let dense = config.dense_equivalent();
        assert_eq!(dense.d_ff, 2 * 128);
        assert_eq!(dense.n_moe_layers(), 0);
    }
}
