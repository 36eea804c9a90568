//! Routing invariants over random shapes (proptest), on every backend.

use burn::module::Param;
use burn::prelude::*;
use moe_core::testing::{ints, test_device, values};
use moe_core::{Assignment, MoeLayer, MoeLayerConfig, RouterConfig, RouterKind};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rstest::rstest;

/// A routing case drawn by proptest, so that a failure shrinks and reproduces: the sizes, the
/// router, a permutation of the tokens, the tokens `[T * D]` and the gate weights `[D * E]`.
#[derive(Debug, Clone)]
struct Case {
    t: usize,
    e: usize,
    k: usize,
    kind: usize,
    perm: Vec<usize>,
    x: Vec<f32>,
    gate: Vec<f32>,
}

/// Model width of every case.
const D: usize = 8;

fn cases_strategy() -> impl Strategy<Value = Case> {
    (1usize..24, 1usize..12).prop_flat_map(|(t, e)| {
        (
            1..=e,
            0usize..4,
            Just((0..t).collect::<Vec<_>>()).prop_shuffle(),
            prop::collection::vec(-2.0f32..2.0, t * D),
            prop::collection::vec(-1.0f32..1.0, D * e),
        )
            .prop_map(move |(k, kind, perm, x, gate)| Case {
                t,
                e,
                k,
                kind,
                perm,
                x,
                gate,
            })
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
    let mut runner = TestRunner::new(Config {
        cases: cases(backend),
        ..Config::default()
    });
    runner
        .run(&cases_strategy(), |case| {
            let Case { t, e, k, kind, .. } = case;
            let router = match kind {
                0 => RouterConfig::mixtral().with_top_k(k),
                1 => RouterConfig::deepseek_v3(k),
                2 => RouterConfig::expert_choice(k),
                _ => RouterConfig::mixtral()
                    .with_top_k(k)
                    .with_renormalize(false),
            };
            let mut layer = MoeLayerConfig::new(D, 8, e)
                .with_router(router.clone())
                .init(&device);
            let gate = Tensor::<1>::from_floats(case.gate.as_slice(), &device).reshape([D, e]);
            layer.router.gate.weight = Param::from_tensor(gate);
            let x = Tensor::<1>::from_floats(case.x.as_slice(), &device).reshape([t, D]);

            let out = layer.forward_tokens(x.clone(), None);
            let summary = out.stats.summary();
            let capacity = (t * k).div_ceil(e).clamp(1, t);
            let routing = match router.kind {
                RouterKind::ExpertChoice => {
                    layer
                        .router
                        .forward_expert_choice(x.clone(), None, capacity)
                }
                _ => layer.router.forward(x.clone()),
            };
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
                    return permutation_permutes_output(&layer, x, out.output, &case.perm);
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

            permutation_permutes_output(&layer, x, out.output, &case.perm)
        })
        .unwrap();
}

/// Permuting the tokens permutes the output.
fn permutation_permutes_output(
    layer: &MoeLayer,
    x: Tensor<2>,
    output: Tensor<2>,
    perm: &[usize],
) -> Result<(), TestCaseError> {
    let perm: Vec<i64> = perm.iter().map(|&i| i as i64).collect();
    let idx = Tensor::<1, Int>::from_ints(perm.as_slice(), &x.device());
    let permuted = values(layer.forward_tokens(x.select(0, idx.clone()), None).output);
    let expected = values(output.select(0, idx));
    for (a, b) in permuted.iter().zip(&expected) {
        prop_assert!((a - b).abs() < 1e-5, "permuted output {} vs {}", a, b);
    }
    Ok(())
}
