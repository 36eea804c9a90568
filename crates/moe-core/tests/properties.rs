//! Routing invariants over random shapes (proptest), on every backend.

use burn::prelude::*;
use moe_core::testing::{assert_close, ints, test_device, values};
use moe_core::{Assignment, MoeLayer, MoeLayerConfig, RouterConfig};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rstest::rstest;

/// (tokens, experts, k, router, permutation of the tokens)
fn shapes() -> impl Strategy<Value = (usize, usize, usize, usize, Vec<usize>)> {
    (1usize..24, 1usize..12).prop_flat_map(|(t, e)| {
        (
            Just(t),
            Just(e),
            1..=e,
            0usize..4,
            Just((0..t).collect::<Vec<_>>()).prop_shuffle(),
        )
    })
}

fn cases(backend: &str) -> u32 {
    // Each new shape compiles fresh kernels on wgpu: fewer cases there.
    if backend.starts_with("wgpu") { 8 } else { 48 }
}

#[rstest]
fn routing_invariants_hold_for_random_shapes(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let d = 8;
    let mut runner = TestRunner::new(Config {
        cases: cases(backend),
        ..Config::default()
    });
    runner
        .run(&shapes(), |(t, e, k, kind, perm)| {
            let router = match kind {
                0 => RouterConfig::mixtral().with_top_k(k),
                1 => RouterConfig::deepseek_v3(k),
                2 => RouterConfig::expert_choice(k),
                _ => RouterConfig::mixtral()
                    .with_top_k(k)
                    .with_renormalize(false),
            };
            let layer = MoeLayerConfig::new(d, 8, e)
                .with_router(router.clone())
                .init(&device);
            let x = Tensor::<2>::random([t, d], burn::tensor::Distribution::Default, &device);

            let out = layer.forward_tokens(x.clone(), None);
            let summary = out.stats.summary();
            let capacity = (t * k).div_ceil(e).clamp(1, t);
            let routing = layer.router.forward(x.clone(), None, capacity);
            let (experts, weights) = match routing.assignment {
                Assignment::TokenChoice { experts, weights } => (experts, weights),
                Assignment::ExpertChoice { tokens, .. } => {
                    // Each expert picks exactly C distinct tokens.
                    let picked = ints(tokens);
                    for row in picked.chunks(capacity) {
                        let mut r = row.to_vec();
                        r.sort();
                        r.dedup();
                        prop_assert_eq!(r.len(), capacity);
                        prop_assert!(r.iter().all(|&i| (0..t as i64).contains(&i)));
                    }
                    prop_assert!(summary.load.iter().all(|&l| l == capacity as f64));
                    permutation_permutes_output(&layer, x, out.output, &perm, &device);
                    return Ok(());
                }
            };
            // Exactly k distinct experts per token; renormalised weights sum to 1.
            let chosen = ints(experts);
            prop_assert_eq!(chosen.len(), t * k);
            for row in chosen.chunks(k) {
                let mut r = row.to_vec();
                r.sort();
                r.dedup();
                prop_assert_eq!(r.len(), k);
                prop_assert!(r.iter().all(|&i| (0..e as i64).contains(&i)));
            }
            if router.renormalize {
                for s in values(weights.sum_dim(1)) {
                    prop_assert!((s - 1.0).abs() < 1e-5, "weights sum to {}", s);
                }
            }

            // Dropless: every assignment processed.
            prop_assert_eq!(summary.load.iter().sum::<f64>(), (t * k) as f64);
            prop_assert_eq!(summary.dropped, 0.0);

            permutation_permutes_output(&layer, x, out.output, &perm, &device);
            Ok(())
        })
        .unwrap();
}

/// Permuting the tokens permutes the output.
fn permutation_permutes_output(
    layer: &MoeLayer,
    x: Tensor<2>,
    output: Tensor<2>,
    perm: &[usize],
    device: &Device,
) {
    let idx = Tensor::<1, Int>::from_ints(
        perm.iter()
            .map(|&i| i as i64)
            .collect::<Vec<_>>()
            .as_slice(),
        device,
    );
    let permuted = layer.forward_tokens(x.select(0, idx.clone()), None).output;
    assert_close(permuted, output.select(0, idx), 1e-5);
}
