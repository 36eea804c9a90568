//! A paged model (routed experts in the weights file, at most a budget of them resident) gives
//! bit-identical logits and tokens to the fully resident model running exact segments, at every
//! budget and policy, on every backend.

use burn::prelude::*;
use moe_core::testing::{test_device, values};
use moe_core::{CachePolicy, ExpertCompute, MoeLayerConfig, RouterConfig, WeightOrder};
use moe_model::block::Ffn;
use moe_model::generate::{Sampling, generate};
use moe_model::quantize::{ExpertQuant, quantize_experts};
use moe_model::store::{StoreConfig, StoreStats};
use moe_model::{ModelConfig, MoeLm, checkpoint, weights};
use rstest::rstest;

const EXPERTS: usize = 8;
const LAYERS: usize = 3;
const D: usize = 32;
const F: usize = 24;

fn config() -> ModelConfig {
    ModelConfig::new()
        .with_vocab_size(64)
        .with_d_model(D)
        .with_n_layers(LAYERS)
        .with_n_heads(4)
        .with_n_kv_heads(2)
        .with_d_ff(64)
        .with_max_seq_len(64)
        .with_moe(
            MoeLayerConfig::new(D, F, EXPERTS).with_router(RouterConfig::mixtral().with_top_k(2)),
        )
}

/// Bytes of one expert in f32.
const EXPERT_BYTES: usize = 3 * D * F * 4;

fn resident_segments(mut model: MoeLm) -> MoeLm {
    for block in &mut model.blocks {
        if let Ffn::Moe(moe) = &mut block.ffn {
            moe.compute = ExpertCompute::Segments;
        }
    }
    model
}

fn run(model: &MoeLm) -> (Vec<f32>, Vec<u32>) {
    let device = model.embed.weight.val().device();
    let prompt: Vec<i64> = (0..12).map(|i| (i * 7 + 3) % 64).collect();
    let ids = Tensor::<1, Int>::from_ints(prompt.as_slice(), &device).reshape([1, prompt.len()]);
    let logits = values(model.forward(ids, None).logits);
    let prompt: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
    let tokens = generate(model, &prompt, 16, &Sampling::greedy(), &[]).unwrap();
    (logits, tokens)
}

#[rstest]
fn paged_models_match_the_resident_model_bit_for_bit(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let model = config().init_seeded(&Device::flex(), 7).unwrap();
    checkpoint::save(&dir, &model, None, false).unwrap();
    let resident = resident_segments(checkpoint::load(&dir, &device).unwrap().model);
    let expected = run(&resident);

    let all = EXPERTS * LAYERS;
    for (experts, policy, prefetch) in [
        (2, CachePolicy::Lru, false),
        (5, CachePolicy::Lru, false),
        (5, CachePolicy::Lfu, false),
        (5, CachePolicy::Lru, true),
        (2, CachePolicy::Lfu, true),
        (all, CachePolicy::Lru, false),
    ] {
        let config = StoreConfig {
            budget_bytes: experts * EXPERT_BYTES + EXPERT_BYTES / 2,
            policy,
            prefetch,
        };
        let (ckpt, store) = checkpoint::load_paged(&dir, &device, config).unwrap();
        let unset = weights::unset_params(&ckpt.model);
        assert_eq!(unset.len(), 3 * LAYERS, "only the routed experts stay out");
        assert!(unset.iter().all(|n| n.contains("experts.w_")), "{unset:?}");
        // Relaying a paged bank out is a no-op that leaves its parameters lazy.
        let mut relaid = ckpt.model.clone();
        for block in &mut relaid.blocks {
            if let Ffn::Moe(moe) = &mut block.ffn {
                moe.experts = moe.experts.clone().with_order(WeightOrder::OutIn);
                assert_eq!(moe.experts.order(), WeightOrder::InOut);
            }
        }
        assert_eq!(
            weights::unset_params(&relaid),
            unset,
            "a paged bank stays lazy"
        );
        let got = run(&ckpt.model);
        store.settle();
        let what = format!("{backend}, {experts} experts, {policy:?}, prefetch {prefetch}");
        assert!(got.0 == expected.0, "{what}: logits differ");
        assert_eq!(got.1, expected.1, "{what}");

        let StoreStats {
            hits,
            misses,
            bytes_fetched,
            capacity,
            prefetched,
            prefetch_used,
            ..
        } = store.stats();
        assert_eq!(capacity, experts);
        let belady = store.belady_hit_rate();
        if !prefetch {
            // Nothing beats the optimum on the same requests.
            assert!(
                store.stats().hit_rate() <= belady + 1e-12,
                "{what}: {belady}"
            );
        }
        if prefetch {
            assert!(prefetched > 0 && prefetch_used <= prefetched, "{what}");
            assert!(bytes_fetched <= (misses + prefetched) * EXPERT_BYTES as u64);
        } else {
            assert_eq!(prefetched, 0);
            assert_eq!(bytes_fetched, misses * EXPERT_BYTES as u64);
        }
        assert!(misses >= 1 && hits + misses > 0);
        if experts == all {
            assert!(misses <= all as u64, "each expert read once: {misses}");
        } else if !prefetch {
            // With prefetching, a use may wait for its expert's read still in flight (a miss):
            // whether any use finds its expert already in depends on timing.
            assert!(hits > 0 || experts == 2, "{experts}: no hits");
        }
    }
}

#[test]
fn budgets_too_small_and_runs_it_cannot_serve_are_refused() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    checkpoint::save(
        &dir,
        &config().init_seeded(&device, 1).unwrap(),
        None,
        false,
    )
    .unwrap();
    let small = StoreConfig {
        budget_bytes: EXPERT_BYTES + 10,
        policy: CachePolicy::Lru,
        prefetch: false,
    };
    let err = checkpoint::load_paged(&dir, &device, small)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds 1 experts") && err.contains("top-2"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);

    let belady = StoreConfig {
        budget_bytes: 100 * EXPERT_BYTES,
        policy: CachePolicy::Belady,
        prefetch: false,
    };
    let err = checkpoint::load_paged(&dir, &device, belady)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Belady"), "{err}");

    let capped = tmp.path().join("capped");
    let model = config()
        .with_moe(MoeLayerConfig::new(D, F, EXPERTS).with_capacity_factor(Some(1.25)))
        .init_seeded(&device, 1)
        .unwrap();
    checkpoint::save(&capped, &model, None, false).unwrap();
    let ok = StoreConfig {
        budget_bytes: 100 * EXPERT_BYTES,
        policy: CachePolicy::Lru,
        prefetch: true,
    };
    let err = checkpoint::load_paged(&capped, &device, ok)
        .unwrap_err()
        .to_string();
    assert!(err.contains("capacity factor"), "{err}");
}

/// Quantised experts: stored in 8 or 4 bits with block scales; a paged model dequantises only
/// the experts it reads and matches the resident model (dequantised at load) bit for bit; both
/// stay close to the f32 model, q8 closer than q4.
#[rstest]
fn quantized_experts_page_like_resident_ones(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = config().with_moe(
        MoeLayerConfig::new(D, 32, EXPERTS).with_router(RouterConfig::mixtral().with_top_k(2)),
    );
    let model = config.init_seeded(&Device::flex(), 11).unwrap();
    let full = tmp.path().join("f32");
    checkpoint::save(&full, &model, None, false).unwrap();
    let reference = run(&resident_segments(
        checkpoint::load(&full, &device).unwrap().model,
    ))
    .0;
    let mut errors = Vec::new();
    for (quant, name) in [(ExpertQuant::Q8, "q8"), (ExpertQuant::Q4, "q4")] {
        let dir = tmp.path().join(name);
        let q = quantize_experts(model.clone(), quant).unwrap();
        checkpoint::save(&dir, &q, None, false).unwrap();
        let stored = weights::stored_in_burnpack(&dir.join(checkpoint::WEIGHTS_FILE)).unwrap();
        let experts = stored.iter().find(|s| s.dtype == name).unwrap().experts;
        let f32_experts = 3 * LAYERS * EXPERTS * D * 32 * 4;
        // One byte per value (Burn's native store, q4 too) and one f32 scale per 32 values.
        let expected = f32_experts / 4 + f32_experts / 32;
        assert_eq!(
            experts, expected,
            "{name}: values plus one f32 scale per 32"
        );

        let resident = run(&resident_segments(
            checkpoint::load(&dir, &device).unwrap().model,
        ));
        let budget = StoreConfig {
            budget_bytes: 3 * 3 * D * 32 * 4,
            policy: CachePolicy::Lru,
            prefetch: true,
        };
        let (paged, store) = checkpoint::load_paged(&dir, &device, budget).unwrap();
        let got = run(&paged.model);
        assert!(got.0 == resident.0, "{backend} {name}: paged logits differ");
        assert_eq!(got.1, resident.1, "{backend} {name}");
        assert!(store.stats().misses > 0);
        let err = resident
            .0
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        errors.push(err);
    }
    assert!(
        errors[0] < errors[1],
        "q8 {} vs q4 {}",
        errors[0],
        errors[1]
    );
    assert!(errors[0] < 0.05 && errors[1] < 0.5, "{errors:?}");
}
