//! The language model on every backend: KV-cache decoding, padding, upcycling, checkpoints and
//! the Hugging Face Mixtral import against an independent reference.

mod common;

use std::path::Path;

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::Distribution;
use common::{Mixtral, small_config};
use moe_core::experts::OUT_IN_MIN_ELEMENTS;
use moe_core::testing::{assert_close, test_device, values};
use moe_core::{MoeLayerConfig, RouterConfig, WeightOrder};
use moe_model::block::Ffn;
use moe_model::checkpoint::{self, CONFIG_FILE, WEIGHTS_FILE};
use moe_model::generate::{Sampling, generate};
use moe_model::{FfnPlan, KvCache, MoeLm, hf, merge, upcycle};
use rstest::rstest;

fn tokens(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::<1, Int>::from_ints(ids, device).reshape([1, ids.len()])
}

#[rstest]
fn kv_cache_decoding_equals_full_forward(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values(false, true)] tied: bool,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let model = small_config()
        .with_tie_embeddings(tied)
        .init(&device)
        .unwrap();
    let ids = [3, 14, 15, 9, 26, 5, 35, 8];
    let full = model.forward(tokens(&ids, &device), None).logits; // [1, 8, V]
    // Prefill 3 tokens, then one at a time.
    let mut cache = KvCache::default();
    let mut pieces = vec![
        model
            .forward_cached(tokens(&ids[..3], &device), None, &mut cache)
            .logits,
    ];
    for i in 3..ids.len() {
        pieces.push(
            model
                .forward_cached(tokens(&ids[i..i + 1], &device), None, &mut cache)
                .logits,
        );
    }
    assert_eq!(cache.len(), ids.len());
    assert_close(Tensor::cat(pieces, 1), full, 1e-4);
}

#[rstest]
fn padding_changes_nothing_for_real_tokens(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let model = small_config().init(&device).unwrap();
    let ids = [3, 14, 15, 9, 26];
    let alone = model.forward(tokens(&ids, &device), None);
    // Batch: the same sequence right-padded to 8, next to a full one.
    let batch = Tensor::<2, Int>::from_ints(
        [[3, 14, 15, 9, 26, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]],
        &device,
    );
    let mask = Tensor::<2, Bool>::from_data(
        [
            [true, true, true, true, true, false, false, false],
            [true; 8],
        ],
        &device,
    );
    let padded = model.forward(batch, Some(mask));
    let real = padded.logits.slice([0..1, 0..5]);
    assert_close(real, alone.logits, 1e-4);
    // Padding takes no expert: layer 0's tokens are 5 + 8 real ones.
    let tokens_routed = padded.routing[0].1.summary().tokens;
    assert_eq!(tokens_routed, 13.0);
}

#[rstest]
fn upcycled_model_equals_the_dense_one(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let dense = small_config()
        .with_ffn_plan(FfnPlan::AllDense)
        .init(&device)
        .unwrap();
    let ids = [1, 5, 9, 13, 17, 21];
    let expected = dense.forward(tokens(&ids, &device), None).logits;
    let moe = upcycle::upcycle(
        dense,
        MoeLayerConfig::new(32, 48, 4).with_router(RouterConfig::mixtral()),
        0.0,
        0,
    )
    .unwrap();
    assert_eq!(moe.config.n_moe_layers(), 2);
    let out = moe.forward(tokens(&ids, &device), None);
    assert!(out.aux.is_some());
    assert_close(out.logits, expected, 1e-4);
}

#[test]
fn upcycling_with_noise_changes_experts_but_keeps_the_rest() {
    let device = Device::flex();
    let dense = small_config()
        .with_ffn_plan(FfnPlan::AllDense)
        .init(&device)
        .unwrap();
    let embed = values(dense.embed.weight.val());
    let moe = upcycle::upcycle(dense, MoeLayerConfig::new(32, 48, 4), 0.05, 0).unwrap();
    assert_eq!(values(moe.embed.weight.val()), embed);
    let moe_core_layer = match &moe.blocks[0].ffn {
        moe_model::block::Ffn::Moe(m) => m,
        _ => panic!("MoE expected"),
    };
    let w = moe_core_layer.experts.w_up.val();
    let (a, b) = (values(w.clone().slice(0..1)), values(w.slice(1..2)));
    assert_ne!(a, b, "noise should make the copies differ");
}

/// Upcycling draws its routers and its noise from the seed: the same seed gives the same model,
/// another seed other routers (before the seed, each call drew from the device's generator as it
/// stood, so two upcycles of one model differed).
#[rstest]
fn upcycling_is_seeded(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let dense = small_config()
        .with_ffn_plan(FfnPlan::AllDense)
        .init_seeded(&device, 3)
        .unwrap();
    let up = |seed| {
        let moe = upcycle::upcycle(dense.clone(), MoeLayerConfig::new(32, 48, 4), 0.05, seed);
        let mut all = Vec::new();
        for block in &moe.unwrap().blocks {
            let moe_model::block::Ffn::Moe(l) = &block.ffn else {
                panic!("MoE expected");
            };
            all.push(values(l.router.gate.weight.val()));
            all.push(values(l.experts.w_up.val()));
        }
        all
    };
    let (a, b, c) = (up(5), up(5), up(6));
    assert_eq!(a, b, "same seed, same weights");
    assert_ne!(a[0], c[0], "another seed, another router");
    assert_ne!(a[1], c[1], "another seed, other noise");
}

/// Fresh routers replace every MoE layer's router, reproducibly from the seed, and nothing else.
#[rstest]
fn fresh_routers_replace_only_the_routers(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let model = small_config()
        .with_n_layers(4)
        .with_ffn_plan(FfnPlan::EveryNth { n: 2 })
        .init_seeded(&device, 1)
        .unwrap();
    let gates = |m: &MoeLm| -> Vec<Vec<f32>> {
        m.blocks
            .iter()
            .filter_map(|b| match &b.ffn {
                moe_model::block::Ffn::Moe(l) => Some(values(l.router.gate.weight.val())),
                moe_model::block::Ffn::Dense(_) => None,
            })
            .collect()
    };
    let rest = |m: &MoeLm| -> Vec<f32> {
        let mut all = values(m.embed.weight.val());
        for b in &m.blocks {
            match &b.ffn {
                moe_model::block::Ffn::Moe(l) => all.extend(values(l.experts.w_down.val())),
                moe_model::block::Ffn::Dense(f) => all.extend(values(f.w_down.weight.val())),
            }
        }
        all
    };
    let (a, b) = (
        model.clone().with_fresh_routers(7).unwrap(),
        model.clone().with_fresh_routers(7).unwrap(),
    );
    assert_eq!(gates(&model).len(), 2, "two MoE layers of four");
    assert_eq!(gates(&a), gates(&b), "same seed, same routers");
    for (old, new) in gates(&model).iter().zip(gates(&a)) {
        assert_ne!(old, &new, "every MoE router is redrawn");
    }
    assert_eq!(rest(&a), rest(&model));
}

#[rstest]
fn merging_identical_branches_equals_upcycling(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let dense_config = small_config().with_ffn_plan(FfnPlan::AllDense);
    let branch = || dense_config.init_seeded(&device, 7).unwrap();
    let ids = [1, 5, 9, 13, 17, 21];
    let routing = MoeLayerConfig::new(32, 48, 3).with_router(RouterConfig::mixtral());
    let upcycled = upcycle::upcycle(branch(), routing.clone(), 0.0, 1).unwrap();
    let merged = merge::merge(vec![branch(), branch(), branch()], None, routing, 1).unwrap();
    assert_eq!(merged.config, upcycled.config);
    assert_close(
        merged.forward(tokens(&ids, &device), None).logits,
        upcycled.forward(tokens(&ids, &device), None).logits,
        1e-4,
    );
}

#[test]
fn merging_stacks_ffns_and_averages_the_rest() {
    let device = Device::flex();
    let dense_config = small_config().with_ffn_plan(FfnPlan::AllDense);
    let (a, b) = (
        dense_config.init_seeded(&device, 1).unwrap(),
        dense_config.init_seeded(&device, 2).unwrap(),
    );
    let mean_embed: Vec<f32> = values(a.embed.weight.val())
        .iter()
        .zip(values(b.embed.weight.val()))
        .map(|(x, y)| (x + y) / 2.0)
        .collect();
    let ffn_up = |m: &MoeLm| match &m.blocks[1].ffn {
        moe_model::block::Ffn::Dense(f) => values(f.w_up.weight.val()),
        moe_model::block::Ffn::Moe(_) => panic!("dense expected"),
    };
    let (up_a, up_b) = (ffn_up(&a), ffn_up(&b));
    let generalist = dense_config.init_seeded(&device, 3).unwrap();
    let up_g = ffn_up(&generalist);
    let routing = MoeLayerConfig::new(32, 48, 2);
    let merged = merge::merge(vec![a, b], Some(&generalist), routing, 3).unwrap();
    // The generalist adds an expert but takes no part in the mean.
    for (x, y) in values(merged.embed.weight.val()).iter().zip(&mean_embed) {
        assert!((x - y).abs() < 1e-6);
    }
    let moe_model::block::Ffn::Moe(layer) = &merged.blocks[1].ffn else {
        panic!("MoE expected");
    };
    let bank = layer.experts.w_up.val(); // [3, d, f]
    assert_eq!(values(bank.clone().slice(0..1)), up_a);
    assert_eq!(values(bank.clone().slice(1..2)), up_b);
    assert_eq!(values(bank.slice(2..3)), up_g);
    assert_eq!(merged.config.moe.n_experts, 3);
    assert_eq!(merged.config.moe.d_ff, 48);
}

#[test]
fn mismatched_or_sparse_branches_are_refused() {
    let device = Device::flex();
    let dense = small_config().with_ffn_plan(FfnPlan::AllDense);
    let routing = MoeLayerConfig::new(32, 48, 2);
    let wider = dense.clone().with_d_ff(64).init(&device).unwrap();
    let err = merge::merge(
        vec![dense.init(&device).unwrap(), wider],
        None,
        routing.clone(),
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("branch 1 has d_ff = 64"), "{err}");
    let sparse = small_config().init(&device).unwrap();
    let err = merge::merge(
        vec![dense.init(&device).unwrap(), sparse],
        None,
        routing.clone(),
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not dense"), "{err}");
    let err = merge::merge(vec![dense.init(&device).unwrap()], None, routing, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 2 branches"), "{err}");
}

fn save_and_load_round_trip(model: &MoeLm, dir: &Path, device: &Device) {
    checkpoint::save(
        dir,
        model,
        Some(&serde_json::json!({"kind": "bytes"})),
        false,
    )
    .unwrap();
    let loaded = checkpoint::load(dir, device).unwrap();
    assert_eq!(loaded.model.config, model.config);
    assert_eq!(loaded.tokenizer.unwrap()["kind"], "bytes");
    let ids = tokens(&[4, 8, 15, 16, 23, 42], device);
    assert_close(
        loaded.model.forward(ids.clone(), None).logits,
        model.forward(ids, None).logits,
        1e-6,
    );
}

#[rstest]
fn checkpoints_round_trip(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = small_config()
        .with_moe(MoeLayerConfig::new(32, 24, 4).with_router(RouterConfig::deepseek_v3(2)))
        .init(&device)
        .unwrap();
    save_and_load_round_trip(&model, &tmp.path().join("ckpt"), &device);
}

/// Each MoE layer's expert order.
fn orders(m: &MoeLm) -> Vec<WeightOrder> {
    m.blocks
        .iter()
        .filter_map(|b| match &b.ffn {
            Ffn::Moe(layer) => Some(layer.experts.order()),
            Ffn::Dense(_) => None,
        })
        .collect()
}

/// The inference layout (routed experts `[out, in]` on host backends, for experts large enough)
/// gives the same logits, with and without the KV cache, for few rows per expert and for many,
/// and saves the same weights file; on an autodiff device, and for small experts, it changes
/// nothing.
#[rstest]
fn inference_layout_changes_nothing(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let small = small_config().init(&device).unwrap().for_inference();
    assert_eq!(orders(&small), vec![WeightOrder::InOut; 2]);
    let config = small_config()
        .with_moe(MoeLayerConfig::new(32, OUT_IN_MIN_ELEMENTS / 32, 4).with_n_shared_experts(1));
    let autodiff = config.init(&device.clone().autodiff()).unwrap();
    assert_eq!(
        orders(&autodiff.for_inference()),
        vec![WeightOrder::InOut; 2]
    );
    let model = config.init(&device).unwrap();
    let fast = model.clone().for_inference();
    let expected = match backend {
        "wgpu" => WeightOrder::InOut,
        _ => WeightOrder::OutIn,
    };
    assert_eq!(orders(&fast), vec![expected; 2]);

    // 8 tokens: a few rows per expert; 16 x 32: about 256, past `OUT_IN_MAX_ROWS`.
    let ids = [3, 14, 15, 9, 26, 5, 35, 8];
    let logits = model.forward(tokens(&ids, &device), None).logits;
    assert_close(
        fast.forward(tokens(&ids, &device), None).logits,
        logits.clone(),
        1e-5,
    );
    let many = Tensor::<2, Int>::random([16, 32], Distribution::Uniform(0.0, 64.0), &device);
    assert_close(
        fast.forward(many.clone(), None).logits,
        model.forward(many, None).logits,
        1e-5,
    );
    let mut cache = KvCache::default();
    let last = fast.forward_last(tokens(&ids[..5], &device), &mut cache);
    let step = fast.forward_last(tokens(&ids[5..6], &device), &mut cache);
    let [_, _, v] = logits.dims();
    let at = |i: usize| logits.clone().slice([0..1, i..i + 1, 0..v]).reshape([1, v]);
    assert_close(last, at(4), 1e-4);
    assert_close(step, at(5), 1e-4);

    let tmp = tempfile::tempdir().unwrap();
    let weights = |m: &MoeLm, name: &str| {
        let dir = tmp.path().join(name);
        checkpoint::save(&dir, m, None, false).unwrap();
        std::fs::read(dir.join(WEIGHTS_FILE)).unwrap()
    };
    assert!(weights(&fast, "fast") == weights(&model, "model"));
    save_and_load_round_trip(&fast, &tmp.path().join("ckpt"), &device);
}

#[test]
fn checkpoint_save_is_atomic_and_refuses_to_overwrite() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let model = small_config().init(&device).unwrap();
    checkpoint::save(&dir, &model, None, false).unwrap();
    let before = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let other = small_config().init(&device).unwrap();
    let err = checkpoint::save(&dir, &other, None, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(),
        before,
        "refused save changed nothing"
    );
    checkpoint::save(&dir, &other, None, true).unwrap();
    assert_ne!(std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(), before);
    // No staging directories are left behind.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["ckpt".to_string()]);
}

#[test]
fn damaged_checkpoints_give_errors_naming_the_file() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    let model = small_config().init(&device).unwrap();
    checkpoint::save(&good, &model, None, false).unwrap();
    let weights = std::fs::read(good.join(WEIGHTS_FILE)).unwrap();
    let config = std::fs::read_to_string(good.join(CONFIG_FILE)).unwrap();

    let case = |name: &str, file: &str, bytes: &[u8]| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), &config).unwrap();
        std::fs::write(dir.join(WEIGHTS_FILE), &weights).unwrap();
        std::fs::write(dir.join(file), bytes).unwrap();
        checkpoint::load(&dir, &device).unwrap_err().to_string()
    };
    let damaged: [(&str, &[u8]); 3] = [
        ("truncated", &weights[..weights.len() / 2]),
        ("empty", b""),
        ("foreign", b"PK\x03\x04 a zip, not burnpack"),
    ];
    for (name, bytes) in damaged {
        let err = case(name, WEIGHTS_FILE, bytes);
        assert!(err.contains(&format!("{name}/{WEIGHTS_FILE}")), "{err}");
    }
    let err = case("bad_json", CONFIG_FILE, b"{\"d_model\": 32,");
    assert!(
        err.contains(&format!("bad_json/{CONFIG_FILE}")) && err.contains("malformed JSON"),
        "{err}"
    );
    // A config that does not match the weights: the error names the weights file, the config
    // and the first mismatched tensor, on one short line.
    for (name, from, to) in [
        ("width", "\"d_model\": 32", "\"d_model\": 64"),
        ("layers", "\"n_layers\": 2", "\"n_layers\": 3"),
    ] {
        let err = case(name, CONFIG_FILE, config.replace(from, to).as_bytes());
        assert!(
            err.contains(&format!("{name}/{WEIGHTS_FILE}"))
                && err.contains("do not fit config.json"),
            "{err}"
        );
        assert!(err.len() < 400, "{err}");
    }

    let missing = checkpoint::load(&tmp.path().join("nope"), &device)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope"));
    let file = good.join(CONFIG_FILE);
    let not_dir = checkpoint::load(&file, &device).unwrap_err().to_string();
    assert!(
        not_dir.contains("expected a checkpoint directory"),
        "{not_dir}"
    );
}

#[test]
fn safetensors_export_holds_every_parameter() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let model = small_config().init(&device).unwrap();
    let path = tmp.path().join("model.safetensors");
    checkpoint::export_safetensors(&model, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let total: usize = st
        .tensors()
        .iter()
        .map(|(_, v)| v.shape().iter().product::<usize>())
        .sum();
    assert_eq!(total, model.num_params());
    assert!(
        st.names().iter().any(|n| n.contains("experts.w_gate")),
        "{:?}",
        st.names()
    );
}

#[rstest]
fn hf_mixtral_import_matches_the_reference(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values((1, false, false), (3, true, true))] layout: (usize, bool, bool),
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let (shards, bf16, rope_nested) = layout;
    let m = Mixtral::tiny();
    let weights = m.random_weights(11);
    let tmp = tempfile::tempdir().unwrap();
    m.write_dir(tmp.path(), &weights, shards, bf16, rope_nested);
    let model = hf::import(tmp.path(), &device).unwrap();
    let ids = [1usize, 7, 3, 49, 0, 12, 33];
    let expected = m.reference_logits(&weights, &ids, bf16);
    let flat: Vec<f32> = expected.iter().flatten().map(|v| *v as f32).collect();
    let expected =
        Tensor::<1>::from_floats(flat.as_slice(), &device).reshape([1, ids.len(), m.vocab]);
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let logits = model.forward(tokens(&ids, &device), None).logits;
    assert_close(logits, expected.clone(), 1e-4);
    let logits = model
        .for_inference()
        .forward(tokens(&ids, &device), None)
        .logits;
    assert_close(logits, expected, 1e-4);
}

#[test]
fn hf_import_refuses_other_models_and_bad_directories() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let m = Mixtral::tiny();
    m.write_dir(tmp.path(), &m.random_weights(1), 1, false, false);
    let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"mixtral\"", "\"llama\""),
    )
    .unwrap();
    let err = hf::import(tmp.path(), &device).unwrap_err().to_string();
    assert!(
        err.contains("llama") && err.contains("config.json"),
        "{err}"
    );
    std::fs::write(tmp.path().join("config.json"), &cfg).unwrap();
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let err = hf::import(tmp.path(), &device).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[rstest]
fn generation_is_reproducible_and_bounded(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let model = small_config().init(&device).unwrap();
    let greedy = generate(&model, &[1, 2, 3], 6, &Sampling::greedy(), &[]).unwrap();
    assert_eq!(greedy.len(), 6);
    assert_eq!(
        greedy,
        generate(&model, &[1, 2, 3], 6, &Sampling::greedy(), &[]).unwrap()
    );
    // Greedy decoding with the cache picks the argmax of the full forward at every step.
    let mut seq: Vec<i64> = vec![1, 2, 3];
    for &t in &greedy {
        let logits = model.forward(tokens(&seq, &device), None).logits;
        let [_, s, v] = logits.dims();
        let last = values(logits.slice([0..1, s - 1..s, 0..v]));
        let argmax = last
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(argmax as u32, t);
        seq.push(i64::from(t));
    }
    // Stops at the first token of the EOS set, which it keeps.
    let stop = greedy.iter().position(|t| *t == greedy[2]).unwrap();
    assert_eq!(
        generate(
            &model,
            &[1, 2, 3],
            6,
            &Sampling::greedy(),
            &[u32::MAX, greedy[2]]
        )
        .unwrap(),
        greedy[..=stop]
    );
    let s = Sampling {
        temperature: 0.9,
        top_k: Some(8),
        top_p: Some(0.9),
        seed: 5,
        ..Sampling::greedy()
    };
    assert_eq!(
        generate(&model, &[4], 10, &s, &[]).unwrap(),
        generate(&model, &[4], 10, &s, &[]).unwrap()
    );
    // Stops at the context length; refuses a prompt longer than it.
    assert_eq!(
        generate(&model, &[1; 30], 10, &Sampling::greedy(), &[])
            .unwrap()
            .len(),
        2
    );
    let err = generate(&model, &[1; 33], 1, &Sampling::greedy(), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("context"), "{err}");
}
