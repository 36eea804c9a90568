//! The streaming import: weights kept in the checkpoint's dtype, sharded checkpoints, the bf16
//! path through our checkpoints and export, and damaged directories refused in one line.

use std::fs;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use moe_core::testing::{test_device, values};
use moe_model::{MoeLm, checkpoint, hf, weights};
use rstest::rstest;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/mixtral")
}

/// The fixture's tensors: (name, dtype, shape, bytes), in name order.
type Stored = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn stored(dir: &Path) -> Stored {
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Stored = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// f32 bytes rounded to bf16.
fn to_bf16(bytes: &[u8]) -> Vec<u8> {
    bytes
        .chunks_exact(4)
        .flat_map(|b| {
            half::bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes()
        })
        .collect()
}

fn write_shard(path: &Path, tensors: &[&(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()));
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A copy of the Mixtral fixture: its config, and its tensors as `tensors` gives them, in
/// `shards` files with an index when `shards > 1`.
fn hf_dir(root: &Path, name: &str, tensors: &Stored, shards: usize) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    if shards == 1 {
        write_shard(
            &dir.join("model.safetensors"),
            &tensors.iter().collect::<Vec<_>>(),
        );
        return dir;
    }
    let mut map = serde_json::Map::new();
    let per = tensors.len().div_ceil(shards);
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        write_shard(&dir.join(&file), &chunk.iter().collect::<Vec<_>>());
        for t in chunk {
            map.insert(t.0.clone(), file.clone().into());
        }
    }
    let index = json!({"metadata": {}, "weight_map": map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    dir
}

fn bf16_tensors() -> Stored {
    stored(&fixture())
        .into_iter()
        .map(|(n, _, s, b)| (n, Dtype::BF16, s, to_bf16(&b)))
        .collect()
}

/// Asserts two logit vectors agree within 1e-5: the same weights laid out differently in memory
/// (a transposed view against a contiguous copy) may sum in another order.
fn assert_close(got: &[f32], expected: &[f32], what: &str) {
    assert_eq!(got.len(), expected.len());
    let diff = got
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-5, "{what}: max |diff| {diff}");
}

fn logits(model: &MoeLm) -> Vec<f32> {
    let device = model.embed.weight.val().device();
    let ids = Tensor::<2, Int>::from_ints([[1, 7, 42, 200, 3]], &device);
    values(model.forward(ids, None).logits)
}

/// A bf16 checkpoint imported as stored keeps every weight's bits; imported as f32 (to run),
/// sharded or not, it gives the same logits on every backend.
#[rstest]
fn bf16_checkpoints_import_as_stored_or_as_f32(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let tensors = bf16_tensors();
    let single = hf_dir(tmp.path(), "single", &tensors, 1);
    let sharded = hf_dir(tmp.path(), "sharded", &tensors, 3);

    let f32_model = hf::import(&single, &device).unwrap();
    assert_eq!(weights::bytes_by_dtype(&f32_model).len(), 1, "all f32");
    let expected = logits(&f32_model);
    assert!(
        logits(&hf::import(&sharded, &device).unwrap()) == expected,
        "sharded and single files give the same model"
    );

    if backend == "flex" {
        let kept = hf::import_as(&sharded, &device, None).unwrap();
        let sizes = weights::bytes_by_dtype(&kept);
        assert_eq!(sizes.len(), 1, "{sizes:?}");
        assert_eq!(sizes[0].0, "bf16");
        let embed = &tensors
            .iter()
            .find(|t| t.0 == "model.embed_tokens.weight")
            .unwrap()
            .3;
        let got = kept.embed.weight.val().into_data().into_bytes().to_vec();
        assert_eq!(&got, embed, "the stored bits, untouched");
        let ran = weights::cast_floats(kept, DType::F32);
        assert_close(&logits(&ran), &expected, "bf16 kept, then cast");
    }
}

/// A bf16 import saved as our checkpoint stays bf16 on disk (half the f32 size), loads to run in
/// f32 with the import's logits, and exports back to bf16 safetensors that import identically.
#[test]
fn bf16_imports_stay_bf16_through_checkpoints_and_export() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_dir(tmp.path(), "bf16", &bf16_tensors(), 1);
    let f32_dir = hf_dir(tmp.path(), "f32", &stored(&fixture()), 1);
    let expected = logits(&hf::import(&dir, &device).unwrap());

    let save = |model: &MoeLm, name: &str| {
        let path = tmp.path().join(name);
        checkpoint::save(&path, model, None, false).unwrap();
        path
    };
    let half = save(&hf::import_as(&dir, &device, None).unwrap(), "ckpt-bf16");
    let full = save(&hf::import_as(&f32_dir, &device, None).unwrap(), "ckpt-f32");
    let size = |p: &Path| {
        fs::metadata(p.join(checkpoint::WEIGHTS_FILE))
            .unwrap()
            .len()
    };
    let ratio = size(&half) as f64 / size(&full) as f64;
    assert!((0.49..0.52).contains(&ratio), "bf16/f32 file size {ratio}");

    let run = checkpoint::load(&half, &device).unwrap().model;
    assert_eq!(weights::bytes_by_dtype(&run)[0].0, "f32");
    assert_close(&logits(&run), &expected, "bf16 checkpoint loaded");
    let stored_model = checkpoint::load_as(&half, &device, None).unwrap().model;
    assert_eq!(weights::bytes_by_dtype(&stored_model)[0].0, "bf16");

    let exported = tmp.path().join("exported");
    hf::export_mixtral(&stored_model, &exported, None).unwrap();
    let config: Value =
        serde_json::from_str(&fs::read_to_string(exported.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert!(stored(&exported).iter().all(|t| t.1 == Dtype::BF16));
    assert_close(
        &logits(&hf::import(&exported, &device).unwrap()),
        &expected,
        "exported",
    );
}

/// Converting on import: f32 stored, f16 and bf16 asked for.
#[test]
fn imports_convert_to_the_dtype_asked_for() {
    let device = Device::flex();
    for (dtype, name) in [(DType::F16, "f16"), (DType::BF16, "bf16")] {
        let model = hf::import_as(&fixture(), &device, Some(dtype)).unwrap();
        let sizes = weights::bytes_by_dtype(&model);
        assert_eq!(sizes.len(), 1);
        assert_eq!(sizes[0].0, name);
    }
}

/// Damaged directories: each refused in one line naming the file and the problem.
#[test]
fn damaged_directories_are_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors = stored(&fixture());
    let device = Device::flex();
    let check = |dir: &Path, expected: &str| {
        let err = hf::import(dir, &device).expect_err(expected).to_string();
        assert!(err.contains(expected), "{expected}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    };

    let missing = hf_dir(tmp.path(), "missing-shard", &tensors, 2);
    fs::remove_file(missing.join("model-00002-of-00002.safetensors")).unwrap();
    check(
        &missing,
        "model-00002-of-00002.safetensors: shard missing (named by the index)",
    );

    let misplaced = hf_dir(tmp.path(), "misplaced", &tensors, 2);
    let index = misplaced.join("model.safetensors.index.json");
    let mut json: Value = serde_json::from_str(&fs::read_to_string(&index).unwrap()).unwrap();
    json["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors".into();
    fs::write(&index, json.to_string()).unwrap();
    check(
        &misplaced,
        "does not hold 'model.norm.weight', which the index places there",
    );

    let mut ints = tensors.clone();
    let norm = ints
        .iter_mut()
        .find(|t| t.0 == "model.norm.weight")
        .unwrap();
    norm.1 = Dtype::I32;
    check(
        &hf_dir(tmp.path(), "ints", &ints, 1),
        "tensor 'model.norm.weight' is stored as I32; weights must be F32, F16 or BF16",
    );

    let mut wrong = tensors.clone();
    let norm = wrong
        .iter_mut()
        .find(|t| t.0 == "model.norm.weight")
        .unwrap();
    norm.2 = vec![norm.2[0] / 2, 2];
    check(
        &hf_dir(tmp.path(), "shape", &wrong, 1),
        "tensor 'model.norm.weight' has shape [32, 2], the config needs [64]",
    );

    let absent: Stored = tensors
        .iter()
        .filter(|t| t.0 != "model.layers.1.self_attn.k_proj.weight")
        .cloned()
        .collect();
    check(
        &hf_dir(tmp.path(), "absent", &absent, 1),
        "model.layers.1.self_attn.k_proj.weight: tensor missing from the checkpoint",
    );

    let truncated = hf_dir(tmp.path(), "truncated", &tensors, 1);
    let file = truncated.join("model.safetensors");
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    check(&truncated, "model.safetensors: not a safetensors file");
}
