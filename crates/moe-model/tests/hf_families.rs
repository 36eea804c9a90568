//! Every importable Hugging Face family against transformers itself: tiny random checkpoints
//! saved by transformers 5 (`scripts/hf_fixtures.py`, run by hand) with the logits of a prompt
//! and 24 greedy tokens, imported and run here on every backend.

use std::fs;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use moe_core::testing::{test_device, values};
use moe_model::generate::{Sampling, generate};
use moe_model::{checkpoint, hf};
use rstest::rstest;
use serde_json::Value;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(family)
}

/// What transformers computed: (prompt, logits per prompt position, greedy tokens).
fn reference(dir: &Path) -> (Vec<u32>, Vec<Vec<f32>>, Vec<u32>) {
    let text = fs::read_to_string(dir.join("reference.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let field = |key: &str| json[key].clone();
    (
        serde_json::from_value(field("prompt")).unwrap(),
        serde_json::from_value(field("logits")).unwrap(),
        serde_json::from_value(field("tokens")).unwrap(),
    )
}

fn max_logit_diff(model: &moe_model::MoeLm, prompt: &[u32], expected: &[Vec<f32>]) -> f32 {
    let device = model.embed.weight.val().device();
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let ids = Tensor::<1, Int>::from_ints(ids.as_slice(), &device).reshape([1, prompt.len()]);
    let got = values(model.forward(ids, None).logits);
    let expected: Vec<f32> = expected.iter().flatten().copied().collect();
    assert_eq!(got.len(), expected.len());
    got.iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[rstest]
fn imports_match_transformers(
    #[values(
        "mixtral",
        "mixtral-fused",
        "olmoe",
        "qwen3_moe",
        "qwen2_moe",
        "granitemoe"
    )]
    family: &str,
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let dir = fixture(family);
    let (prompt, logits, tokens) = reference(&dir);
    let model = hf::import(&dir, &device).unwrap();
    let diff = max_logit_diff(&model, &prompt, &logits);
    let greedy = generate(&model, &prompt, tokens.len(), &Sampling::greedy(), &[]).unwrap();
    eprintln!(
        "{family} on {backend}: max |logit diff| {diff:.2e}, greedy tokens equal: {}",
        greedy == tokens
    );
    assert!(
        diff < 1e-4,
        "{family} on {backend}: max |logit diff| {diff}"
    );
    assert_eq!(greedy, tokens, "{family} on {backend}");
}

/// An imported model saved as our checkpoint (the variant fields in its config.json, the
/// optional modules in its weights) loads back to the same logits.
#[test]
fn imported_families_round_trip_through_checkpoints() {
    let device = Device::flex();
    for family in ["qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"] {
        let dir = fixture(family);
        let (prompt, logits, _) = reference(&dir);
        let model = hf::import(&dir, &device).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("ckpt");
        checkpoint::save(&ckpt, &model, None, false).unwrap();
        let back = checkpoint::load(&ckpt, &device).unwrap().model;
        assert_eq!(back.config, model.config, "{family}");
        assert!(max_logit_diff(&back, &prompt, &logits) < 1e-4, "{family}");
    }
}

/// Every config value that would change the numerics and is not implemented is refused in one
/// line that names the key.
#[test]
fn unimplemented_settings_are_refused_by_name() {
    let cases: [(&str, &str, Value, &str); 10] = [
        ("mixtral", "hidden_act", "gelu".into(), "hidden_act"),
        (
            "mixtral",
            "rope_scaling",
            serde_json::json!({"rope_type": "linear", "factor": 2.0}),
            "rope_scaling",
        ),
        (
            "mixtral",
            "rope_parameters",
            serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
            "rope_type",
        ),
        ("mixtral", "sliding_window", 64.into(), "sliding_window"),
        ("olmoe", "attention_bias", true.into(), "attention_bias"),
        ("olmoe", "clip_qkv", 8.0.into(), "clip_qkv"),
        ("qwen3_moe", "mlp_bias", true.into(), "mlp_bias"),
        (
            "qwen3_moe",
            "use_sliding_window",
            true.into(),
            "sliding_window",
        ),
        ("granitemoe", "model_type", "deepseek_v3".into(), "MLA"),
        ("mixtral", "model_type", "llama".into(), "llama"),
    ];
    for (family, key, value, expected) in cases {
        let text = fs::read_to_string(fixture(family).join("config.json")).unwrap();
        let mut json: Value = serde_json::from_str(&text).unwrap();
        json[key] = value;
        if key == "use_sliding_window" {
            json["sliding_window"] = 64.into();
        }
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.json");
        fs::write(&path, json.to_string()).unwrap();
        let err = hf::config_from_hf(&path).unwrap_err().to_string();
        assert!(err.contains(expected), "{family} {key}: {err}");
        assert!(err.contains("config.json"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
    // A window as long as the context changes nothing.
    let text = fs::read_to_string(fixture("mixtral").join("config.json")).unwrap();
    let mut json: Value = serde_json::from_str(&text).unwrap();
    json["sliding_window"] = 128.into();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    fs::write(&path, json.to_string()).unwrap();
    hf::config_from_hf(&path).unwrap();
}
