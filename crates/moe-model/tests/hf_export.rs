//! `export_mixtral` writes a Hugging Face Mixtral directory that `hf::import` reads back to the
//! same model: a seeded native model and an imported transformers fixture round-trip to identical
//! logits; models the Mixtral format cannot express, and occupied targets, are refused with one
//! line and nothing written.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use moe_core::testing::{test_device, values};
use moe_core::{MoeLayerConfig, RouterConfig};
use moe_model::{FfnPlan, ModelConfig, MoeLm, QkNorm, SharedExpertConfig, hf};
use rstest::rstest;
use safetensors::SafeTensors;

/// A small native model of Mixtral's shape (untied head unless `tied`).
fn native_config(tied: bool) -> ModelConfig {
    ModelConfig::new()
        .with_vocab_size(64)
        .with_d_model(32)
        .with_n_layers(2)
        .with_n_heads(4)
        .with_n_kv_heads(2)
        .with_d_ff(48)
        .with_max_seq_len(32)
        .with_tie_embeddings(tied)
        .with_moe(MoeLayerConfig::new(32, 24, 4).with_router(RouterConfig::mixtral()))
}

fn logits(model: &MoeLm, ids: &[i64]) -> Vec<f32> {
    let device = model.embed.weight.val().device();
    let input = Tensor::<1, Int>::from_ints(ids, &device).reshape([1, ids.len()]);
    values(model.forward(input, None).logits)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every tensor of a safetensors file as (shape, raw bytes), by name.
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.shape().to_vec(), view.data().to_vec())))
        .collect()
}

fn mixtral_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/mixtral")
}

#[rstest]
fn native_model_round_trips_through_the_mixtral_format(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values(false, true)] tied: bool,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let model = native_config(tied).init_seeded(&device, 7).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    hf::export_mixtral(&model, &dir, None).unwrap();
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
    let written = tensors(&dir.join("model.safetensors"));
    assert_eq!(
        written["model.layers.1.block_sparse_moe.gate.weight"].0,
        [4, 32]
    );
    assert_eq!(
        written["model.layers.0.self_attn.k_proj.weight"].0,
        [16, 32]
    );
    assert_eq!(
        written["model.layers.0.block_sparse_moe.experts.3.w1.weight"].0,
        [24, 32]
    );
    assert_eq!(
        written["model.layers.0.block_sparse_moe.experts.3.w2.weight"].0,
        [32, 24]
    );
    assert_eq!(written.contains_key("lm_head.weight"), !tied);

    let back = hf::import(&dir, &device).unwrap();
    assert_eq!(back.config.tie_embeddings, tied);
    let ids = [1, 5, 9, 63, 0, 17, 42, 8];
    let diff = max_diff(&logits(&model, &ids), &logits(&back, &ids));
    assert!(diff <= 1e-6, "{backend} tied={tied}: max |diff| {diff}");
}

#[rstest]
fn imported_fixture_exports_to_the_same_tensors_and_logits(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let fixture = mixtral_fixture();
    let model = hf::import(&fixture, &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("again");
    hf::export_mixtral(&model, &dir, None).unwrap();
    assert_eq!(
        tensors(&dir.join("model.safetensors")),
        tensors(&fixture.join("model.safetensors")),
        "same names, shapes and bytes as the transformers checkpoint"
    );
    let back = hf::import(&dir, &device).unwrap();
    assert_eq!(back.config, model.config);
    let ids = [3, 200, 17, 255, 0, 64];
    let diff = max_diff(&logits(&model, &ids), &logits(&back, &ids));
    assert!(diff <= 1e-6, "{backend}: max |diff| {diff}");
}

#[test]
fn extra_files_are_copied_beside_the_weights() {
    let device = Device::flex();
    let model = native_config(true).init_seeded(&device, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("hf-tokenizer");
    fs::create_dir(&tok).unwrap();
    fs::write(tok.join("tokenizer.json"), "{}").unwrap();
    fs::write(tok.join("tokenizer_config.json"), "{\"x\": 1}").unwrap();
    // An empty target directory is taken.
    let dir = tmp.path().join("out");
    fs::create_dir(&dir).unwrap();
    hf::export_mixtral(&model, &dir, Some(&tok)).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("tokenizer.json")).unwrap(),
        "{}"
    );
    assert_eq!(
        fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        "{\"x\": 1}"
    );
}

#[test]
fn occupied_targets_are_refused_and_left_alone() {
    let device = Device::flex();
    let model = native_config(true).init_seeded(&device, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("keep.txt"), "mine").unwrap();
    let file = tmp.path().join("file");
    fs::write(&file, "mine").unwrap();
    for target in [&full, &file] {
        let err = hf::export_mixtral(&model, target, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert_eq!(fs::read_to_string(full.join("keep.txt")).unwrap(), "mine");
    assert_eq!(fs::read_dir(&full).unwrap().count(), 1);
    assert_eq!(fs::read_to_string(&file).unwrap(), "mine");
    let mut left: Vec<String> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["file", "full"], "no staging directory left behind");
}

#[test]
fn what_mixtral_cannot_express_is_refused_naming_the_option() {
    let device = Device::flex();
    let base = native_config(true);
    let moe = || MoeLayerConfig::new(32, 24, 4);
    let cases: Vec<(&str, ModelConfig)> = vec![
        (
            "moe.n_shared_experts",
            base.clone().with_moe(moe().with_n_shared_experts(1)),
        ),
        (
            "shared_expert",
            base.clone()
                .with_shared_expert(Some(SharedExpertConfig::new(16))),
        ),
        ("qkv_bias", base.clone().with_qkv_bias(Some(true))),
        ("qk_norm", base.clone().with_qk_norm(Some(QkNorm::PerHead))),
        ("attn_scale", base.clone().with_attn_scale(Some(0.5))),
        (
            "embed_multiplier",
            base.clone().with_embed_multiplier(Some(2.0)),
        ),
        (
            "residual_multiplier",
            base.clone().with_residual_multiplier(Some(0.5)),
        ),
        (
            "logits_multiplier",
            base.clone().with_logits_multiplier(Some(0.5)),
        ),
        (
            "ffn_plan",
            base.clone().with_ffn_plan(FfnPlan::EveryNth { n: 2 }),
        ),
        (
            "dense_layers",
            base.clone().with_dense_layers(Some(vec![0])),
        ),
        (
            "moe.router.kind",
            base.clone()
                .with_moe(moe().with_router(RouterConfig::deepseek_v3(2))),
        ),
        (
            "moe.router.renormalize",
            base.clone()
                .with_moe(moe().with_router(RouterConfig::mixtral().with_renormalize(false))),
        ),
        (
            "moe.capacity_factor",
            base.clone()
                .with_moe(moe().with_capacity_factor(Some(1.25))),
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (option, config) in cases {
        let model = config.init_seeded(&device, 3).unwrap();
        let dir = tmp.path().join("out");
        let err = hf::export_mixtral(&model, &dir, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(option), "{option}: {err}");
        assert!(err.contains("Mixtral"), "{option}: {err}");
        assert_eq!(err.lines().count(), 1, "{option}: {err}");
        assert!(!dir.exists(), "{option}: nothing written");
    }
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}
