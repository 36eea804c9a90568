//! The inference path on every backend: batched generation against one prompt at a time, rows
//! that stop on their own, left padding, and the preallocated KV cache (growth, dropped rows, f16
//! storage).

mod common;

use burn::prelude::*;
use common::small_config;
use moe_core::testing::{assert_close, test_device};
use moe_model::generate::{Sampling, generate, generate_batch};
use moe_model::{KvCache, KvDtype, MoeLm};
use rstest::rstest;

/// The shared small model, drawn from a fixed seed.
fn model(device: &Device) -> MoeLm {
    small_config().init_seeded(device, 11).unwrap()
}

/// Prompts of different lengths; the last leaves room for only 3 new tokens in the context.
fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![3, 14, 15],
        vec![9, 26, 5, 35, 8, 9, 7],
        vec![42],
        (0..29).map(|i| (i * 5 + 1) % 64).collect(),
    ]
}

fn ids(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.concat();
    Tensor::<1, Int>::from_ints(flat.as_slice(), device).reshape([b, s])
}

#[rstest]
fn batched_generation_equals_one_prompt_at_a_time(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values(false, true)] sampled: bool,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let model = model(&device);
    let sampling = if sampled {
        Sampling {
            temperature: 0.9,
            top_k: Some(20),
            seed: 5,
            ..Sampling::greedy()
        }
    } else {
        Sampling::greedy()
    };
    let alone: Vec<Vec<u32>> = prompts()
        .iter()
        .map(|p| generate(&model, p, 6, &sampling, &[]).unwrap())
        .collect();
    let batched = generate_batch(&model, &prompts(), 6, &sampling, &[], |_, _| true).unwrap();
    assert_eq!(batched, alone);
    assert_eq!(
        batched.iter().map(Vec::len).collect::<Vec<_>>(),
        [6, 6, 6, 3],
        "each row stops at its own context limit"
    );
}

/// A row that meets an end token, or whose caller says stop, leaves the batch; the others go on
/// as they would alone.
#[rstest]
fn each_row_stops_on_its_own(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let model = model(&device);
    let greedy = Sampling::greedy();
    let free = generate(&model, &prompts()[1], 8, &greedy, &[]).unwrap();
    let eos = [free[2]];
    let alone: Vec<Vec<u32>> = prompts()
        .iter()
        .map(|p| generate(&model, p, 8, &greedy, &eos).unwrap())
        .collect();
    let stop_at = free.iter().position(|&t| t == eos[0]).unwrap() + 1;
    assert_eq!(alone[1].len(), stop_at, "prompt 1 ends at its end token");
    let mut seen = [0usize; 4];
    let batched = generate_batch(&model, &prompts(), 8, &greedy, &eos, |i, _| {
        seen[i] += 1;
        // The caller stops prompt 0 after two tokens.
        !(i == 0 && seen[i] == 2)
    })
    .unwrap();
    let first = &alone[0][..alone[0].len().min(2)];
    assert_eq!(batched[0], first);
    for i in 1..4 {
        assert_eq!(batched[i], alone[i], "prompt {i}");
    }
    let lens: Vec<usize> = batched.iter().map(Vec::len).collect();
    assert_eq!(seen.to_vec(), lens, "every token went to the caller once");
}

/// A row padded on the left gives the logits it gives alone, at the prompt and after it.
#[rstest]
fn left_padding_changes_nothing(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let model = model(&device);
    let short = vec![7i64, 21, 33];
    let long = vec![1i64, 2, 3, 4, 5, 6];
    let mut alone = KvCache::default();
    let first = model.forward_last(ids(std::slice::from_ref(&short), &device), &mut alone);
    let second = model.forward_last(ids(&[vec![40]], &device), &mut alone);

    let padded = [vec![0, 0, 0], short].concat();
    let mut batch = KvCache::left_padded(vec![3, 0], 8);
    let both = model.forward_last(ids(&[padded, long], &device), &mut batch);
    let both_next = model.forward_last(ids(&[vec![40], vec![41]], &device), &mut batch);
    assert_close(both.slice([0..1, 0..64]), first, 1e-4);
    assert_close(both_next.slice([0..1, 0..64]), second, 1e-4);
}

/// The cache grows past its first allocation without changing a logit, and dropping a row leaves
/// the other as it would be alone.
#[rstest]
fn kv_cache_grows_and_drops_rows(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let model = model(&device);
    let a = vec![3i64, 14, 15, 9];
    let b = vec![26i64, 5, 35, 8];
    let mut reserved = KvCache::with_capacity(16);
    let mut growing = KvCache::default();
    let mut pair = KvCache::default();
    model.forward_last(ids(std::slice::from_ref(&b), &device), &mut reserved);
    model.forward_last(ids(std::slice::from_ref(&b), &device), &mut growing);
    model.forward_last(ids(&[a, b], &device), &mut pair);
    assert_eq!((reserved.capacity(), growing.capacity()), (16, 4));
    pair.retain_rows(&[1]);
    for step in 0..6 {
        let next = [vec![(step * 7 + 1) % 64]];
        let r = model.forward_last(ids(&next, &device), &mut reserved);
        let g = model.forward_last(ids(&next, &device), &mut growing);
        let p = model.forward_last(ids(&next, &device), &mut pair);
        assert_close(g, r.clone(), 1e-4);
        assert_close(p, r, 1e-4);
    }
    assert_eq!(growing.len(), 10);
    assert_eq!(growing.capacity(), 16, "4 doubled to 8, then to 16");
    assert_eq!(reserved.capacity(), 16, "never grew");
}

/// A cache in f16 holds half the bytes and gives the f32 cache's logits to within its rounding,
/// for a padded batch (prompt, then decode steps) and for generation through the model's
/// setting. Flex holds f16; a backend without it says so (ndarray, and wgpu on an adapter
/// without `shader-f16`), and `moe` refuses `--kv-cache f16` there.
#[rstest]
fn an_f16_kv_cache_halves_memory_and_keeps_the_logits(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    if !device.supports_dtype(KvDtype::F16.float_dtype()) {
        assert_ne!(backend, "flex", "flex holds f16");
        return;
    }
    let model = model(&device);
    let half = model.clone().with_kv_cache(KvDtype::F16);
    let mut full = model.new_cache(vec![2, 0], 24);
    let mut narrow = half.new_cache(vec![2, 0], 24);
    assert_eq!((full.dtype(), narrow.dtype()), (KvDtype::F32, KvDtype::F16));
    let prompt = [vec![0i64, 0, 3, 14, 15], vec![9, 26, 5, 35, 8]];
    let f = model.forward_last(ids(&prompt, &device), &mut full);
    let h = model.forward_last(ids(&prompt, &device), &mut narrow);
    assert_close(h, f, 1e-2);
    for step in 0..5 {
        let next = [vec![(step * 7 + 1) % 64], vec![(step * 3 + 2) % 64]];
        let f = model.forward_last(ids(&next, &device), &mut full);
        let h = model.forward_last(ids(&next, &device), &mut narrow);
        assert_close(h, f, 1e-2);
    }
    assert_eq!(narrow.bytes() * 2, full.bytes());
    assert!(full.bytes() > 0);
    let greedy = Sampling::greedy();
    let tokens = generate_batch(&half, &prompts(), 6, &greedy, &[], |_, _| true).unwrap();
    let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
    assert_eq!(lengths, [6, 6, 6, 3]);
}

/// The same weights give the same greedy tokens on wgpu as on flex, batched and alone.
#[test]
fn wgpu_generates_the_tokens_flex_does() {
    let Some(wgpu) = test_device("wgpu") else {
        return;
    };
    let flex = model(&Device::flex());
    let moved = flex.clone().to_device(&wgpu);
    let greedy = Sampling::greedy();
    let on_flex = generate_batch(&flex, &prompts(), 8, &greedy, &[], |_, _| true).unwrap();
    let on_wgpu = generate_batch(&moved, &prompts(), 8, &greedy, &[], |_, _| true).unwrap();
    assert_eq!(on_wgpu, on_flex);
    assert_eq!(
        generate(&moved, &prompts()[1], 8, &greedy, &[]).unwrap(),
        on_flex[1]
    );
}
