//! The MoE layer against the naive host reference, on every backend.

mod common;

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::{DType, Distribution};
use common::{HostMoe, random_input};
use moe_core::experts::OUT_IN_MAX_ROWS;
use moe_core::ffn::gated;
use moe_core::host::INLINE_MAX_MACS;
use moe_core::kernels::{
    HostF32, SWIGLU_MAX_ROWS, SWIGLU_MIN_ROWS, silu_mul_tensor, swiglu_tensor,
};
use moe_core::testing::{assert_close, ints, test_device, values};
use moe_core::{
    ExpertCompute, Experts, ExpertsConfig, MoeLayer, MoeLayerConfig, RouterConfig, RouterKind,
    SwiGluFfnConfig, WeightOrder,
};
use rstest::rstest;

const D: usize = 16;
const F: usize = 24;

fn host_tensor(v: &[f64], shape: [usize; 2], device: &Device) -> Tensor<2> {
    let data: Vec<f32> = v.iter().map(|x| *x as f32).collect();
    Tensor::<1>::from_floats(data.as_slice(), device).reshape(shape)
}

fn check_against_reference(layer: &MoeLayer, t: usize, seed: u64, device: &Device) {
    let [_, d, _] = layer.experts.w_gate.dims();
    let (x, host_x) = random_input(t, d, seed, device);
    let out = layer.forward_tokens(x, None);
    let reference = HostMoe::from_layer(layer).forward(&host_x);
    assert_close(
        out.output,
        host_tensor(&reference.output, [t, d], device),
        1e-4,
    );
    let summary = out.stats.summary();
    let load: Vec<f64> = reference.load.iter().map(|l| *l as f64).collect();
    assert_eq!(summary.load, load, "load per expert");
    assert_eq!(summary.dropped, reference.dropped as f64, "dropped");
}

#[rstest]
fn dropless_matches_naive_reference(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values("top1", "top2", "shared", "sigmoid_bias", "fine_grained")] case: &str,
    #[values(ExpertCompute::Padded, ExpertCompute::Segments)] compute: ExpertCompute,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let config = match case {
        "top1" => MoeLayerConfig::new(D, F, 4).with_router(RouterConfig::switch()),
        "top2" => MoeLayerConfig::new(D, F, 4).with_router(RouterConfig::mixtral()),
        "shared" => MoeLayerConfig::new(D, F, 4).with_n_shared_experts(2),
        "sigmoid_bias" => MoeLayerConfig::new(D, F, 6).with_router(RouterConfig::deepseek_v3(3)),
        "fine_grained" => {
            MoeLayerConfig::new(D, 4, 32).with_router(RouterConfig::mixtral().with_top_k(4))
        }
        _ => unreachable!(),
    };
    let mut layer = config.with_compute(compute).init(&device);
    if let Some(bias) = layer.router.bias.take() {
        // A non-zero bias must change selection only, never the weights.
        let b = Tensor::<1>::from_floats([0.3, -0.2, 0.1, 0.0, -0.4, 0.25], &device);
        layer.router.bias = Some(bias.map(|_| b));
    }
    check_against_reference(&layer, 37, 1, &device);
}

#[rstest]
fn expert_choice_matches_naive_reference(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let layer = MoeLayerConfig::new(D, F, 4)
        .with_router(RouterConfig::expert_choice(2))
        .init(&device);
    check_against_reference(&layer, 29, 2, &device);
}

/// On flex and ndarray the expert chains run side by side on the cores, the caller's share
/// inline where every matmul is small (64 tokens: even one expert taking them all stays below
/// `INLINE_MAX_MACS`) and in a pool of its own where they are large (1024 tokens: the mean
/// expert, and so the busiest, is above it).
#[rstest]
fn chains_on_cores_match_naive_reference(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values("top2", "expert_choice")] case: &str,
    #[values(64, 1024)] t: usize,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let (d, f, e) = (128, 256, 8);
    match t {
        64 => assert!(t * d * f < INLINE_MAX_MACS),
        _ => assert!(t * 2 / e * d * f >= INLINE_MAX_MACS),
    }
    let router = match case {
        "top2" => RouterConfig::mixtral(),
        _ => RouterConfig::expert_choice(2),
    };
    let layer = MoeLayerConfig::new(d, f, e)
        .with_router(router)
        .with_compute(ExpertCompute::Segments)
        .init(&device);
    check_against_reference(&layer, t, 5, &device);
}

/// Experts laid out `[out, in]` hold the same values and compute the same layer, in every
/// expert layout, in a small pass and in one whose chains run on the cores with more rows per
/// expert than `OUT_IN_MAX_ROWS`; so they do back in `[in, out]`.
#[rstest]
fn out_in_order_matches_naive_reference(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values(ExpertCompute::Padded, ExpertCompute::Segments)] compute: ExpertCompute,
    #[values(37, 1024)] t: usize,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    // 1024 tokens: about 256 rows per expert, past `OUT_IN_MAX_ROWS`.
    let (d, f) = (64, 96);
    let mut layer = MoeLayerConfig::new(d, f, 8)
        .with_compute(compute)
        .init(&device);
    let bank = |e: &Experts| [&e.w_gate, &e.w_up, &e.w_down].map(|w| values(w.val()));
    let original = bank(&layer.experts);
    layer.experts = layer.experts.clone().with_order(WeightOrder::OutIn);
    assert_eq!(layer.experts.order(), WeightOrder::OutIn);
    assert_eq!(layer.experts.dims(), [8, d, f]);
    assert_eq!(bank(&layer.experts), original);
    check_against_reference(&layer, t, 3, &device);
    // With segments both products of an `[out, in]` expert run: up to `OUT_IN_MAX_ROWS` rows
    // and above.
    let (x, _) = random_input(t, d, 3, &device);
    let load = layer.forward_tokens(x, None).stats.summary().load;
    let busiest = load.iter().cloned().fold(0.0, f64::max);
    assert_eq!(busiest > OUT_IN_MAX_ROWS as f64, t > 100, "{load:?}");

    layer.experts = layer.experts.with_order(WeightOrder::InOut);
    assert_eq!(layer.experts.order(), WeightOrder::InOut);
    assert_eq!(bank(&layer.experts), original);
    check_against_reference(&layer, t, 3, &device);
}

/// A few rows of an `[out, in]` expert run the host kernel on flex (Burn's matmuls on the other
/// backends, for one row and past `SWIGLU_MAX_ROWS` rows) and compute what the `[in, out]`
/// expert computes.
#[rstest]
fn few_rows_of_an_out_in_expert_run_the_host_kernel_on_flex(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let bank = ExpertsConfig::new(48, 80, 3).init(&device);
    let relaid = bank.clone().with_order(WeightOrder::OutIn);
    let expert = relaid.expert(2, &device);
    for rows in [1, 3, SWIGLU_MAX_ROWS, SWIGLU_MAX_ROWS + 1] {
        let x = Tensor::<2>::random([rows, 48], Distribution::Default, &device);
        let kernel = swiglu_tensor(&x, &expert.w_gate, &expert.w_up, &expert.w_down);
        assert_eq!(
            kernel.is_some(),
            backend == "flex" && (SWIGLU_MIN_ROWS..=SWIGLU_MAX_ROWS).contains(&rows),
            "{rows} rows"
        );
        let reference = bank.expert(2, &device).forward(x.clone());
        assert_close(expert.forward(x), reference, 1e-5);
    }
    // Autodiff tensors keep Burn's ops.
    let x = Tensor::<2>::random([2, 48], Distribution::Default, &device.clone().autodiff());
    assert!(HostF32::of(&x).is_none());
}

/// SwiGLU's gate runs the one-pass host kernel on contiguous flex tensors and Burn's ops
/// elsewhere (other backends, strided views, autodiff), with the same values; under autodiff
/// the gradient still flows.
#[rstest]
fn the_gate_runs_one_pass_on_flex_and_burns_ops_elsewhere(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let draw = |s: [usize; 3]| Tensor::<3>::random(s, Distribution::Normal(0.0, 3.0), &device);
    let (gate, up) = (draw([2, 37, 70]), draw([2, 37, 70]));
    let reference = silu(gate.clone()) * up.clone();
    let kernel = silu_mul_tensor(&gate, &up);
    assert_eq!(kernel.is_some(), backend == "flex");
    assert_close(gated(gate.clone(), up.clone()), reference.clone(), 1e-5);
    // A strided view is left to Burn.
    let (gate_t, up_t) = (gate.clone().swap_dims(1, 2), up.clone().swap_dims(1, 2));
    assert!(silu_mul_tensor(&gate_t, &up_t).is_none());
    assert_close(gated(gate_t, up_t), reference.swap_dims(1, 2), 1e-5);

    let ad = device.clone().autodiff();
    let gate = Tensor::<3>::from_data(gate.into_data(), &ad).require_grad();
    let up = Tensor::<3>::from_data(up.into_data(), &ad);
    assert!(silu_mul_tensor(&gate, &up).is_none());
    let grads = gated(gate.clone(), up).sum().backward();
    assert!(gate.grad(&grads).is_some());
}

/// The layout keeps a bank's dtype; banks `gemm` cannot read through strides (bf16) keep
/// theirs. Dtypes are the host backend's business: flex has all three.
#[test]
fn out_in_order_keeps_the_dtype() {
    let device = Device::flex();
    let layer = MoeLayerConfig::new(32, 64, 4).init(&device);
    for (dtype, order) in [
        (DType::F16, WeightOrder::OutIn),
        (DType::BF16, WeightOrder::InOut),
    ] {
        let w = |p: &Param<Tensor<3>>| p.val().cast(dtype);
        let e = &layer.experts;
        let bank = Experts::from_weights(w(&e.w_gate), w(&e.w_up), w(&e.w_down));
        let original = values(bank.w_up.val());
        let relaid = bank.clone().with_order(WeightOrder::OutIn);
        assert_eq!(relaid.order(), order, "{dtype:?}");
        assert_eq!(relaid.w_up.val().dtype(), dtype);
        assert_eq!(values(relaid.w_up.val()), original);
        // A few rows, and more than `OUT_IN_MAX_ROWS`: both products.
        for rows in [5, 2 * OUT_IN_MAX_ROWS] {
            let x = Tensor::<2>::random([rows, 32], Distribution::Default, &device).cast(dtype);
            let reference = bank.expert(1, &device).forward(x.clone());
            let out = relaid.expert(1, &device).forward(x);
            assert_eq!(out.dtype(), dtype);
            assert_close(out.cast(DType::F32), reference.cast(DType::F32), 0.05);
        }
    }
}

#[rstest]
fn one_expert_top1_equals_dense_swiglu(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let layer = MoeLayerConfig::new(D, F, 1)
        .with_router(RouterConfig::new().with_top_k(1))
        .init(&device);
    let mut dense = SwiGluFfnConfig::new(D, F).init(&device);
    let first =
        |w: &Param<Tensor<3>>, a, b| Param::from_tensor(w.val().slice(0..1).reshape([a, b]));
    dense.w_gate.weight = first(&layer.experts.w_gate, D, F);
    dense.w_up.weight = first(&layer.experts.w_up, D, F);
    dense.w_down.weight = first(&layer.experts.w_down, F, D);
    let x = Tensor::<3>::random([2, 5, D], burn::tensor::Distribution::Default, &device);
    let moe = layer.forward(x.clone(), None);
    assert_close(moe.output, dense.forward(x), 1e-5);
}

#[rstest]
fn capacity_limits_load_and_counts_drops(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values(0.5, 1.0, 1.25)] capacity_factor: f64,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let layer = MoeLayerConfig::new(D, F, 4)
        .with_capacity_factor(Some(capacity_factor))
        .init(&device);
    let t = 41;
    let (x, host_x) = random_input(t, D, 3, &device);
    let reference = HostMoe::from_layer(&layer);
    let capacity = reference.capacity(t) as f64;
    let expected = reference.forward(&host_x);
    let out = layer.forward_tokens(x, None);
    let summary = out.stats.summary();
    assert!(
        summary.load.iter().all(|l| *l <= capacity),
        "{:?} > {capacity}",
        summary.load
    );
    assert_eq!(summary.dropped, expected.dropped as f64);
    assert_eq!(
        summary.load.iter().sum::<f64>() + summary.dropped,
        (2 * t) as f64
    );
    assert_close(
        out.output,
        host_tensor(&expected.output, [t, D], &device),
        1e-4,
    );
    if capacity_factor < 1.0 {
        assert!(
            summary.dropped > 0.0,
            "a tight capacity must drop something"
        );
    }
}

#[rstest]
fn ample_capacity_equals_dropless(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let dropless = MoeLayerConfig::new(D, F, 4).init(&device);
    let mut capped = dropless.clone();
    capped.capacity_factor = Some(4.0); // capacity = T * k: nothing can overflow
    let (x, _) = random_input(33, D, 4, &device);
    let a = dropless.forward_tokens(x.clone(), None);
    let b = capped.forward_tokens(x, None);
    assert_eq!(b.stats.summary().dropped, 0.0);
    assert_close(a.output, b.output, 1e-5);
}

/// Padding takes no expert, no capacity and no loss: real tokens get the same outputs, losses
/// and statistics with padding as alone. The capacity comes from the 7 real tokens
/// (ceil(7 * 2 / 4) = 4 per expert), not from all 10 (which would give 5).
#[rstest]
fn padding_changes_nothing_for_real_tokens(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values("capacity", "expert_choice")] case: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let config = MoeLayerConfig::new(D, F, 4).with_capacity_factor(Some(1.0));
    let config = match case {
        "capacity" => config,
        _ => config.with_router(RouterConfig::expert_choice(2)),
    };
    let layer = config.init(&device);
    let (x, _) = random_input(10, D, 5, &device);
    let x = x.reshape([2, 5, D]);
    // The first sequence is whole; the second has 2 real tokens and 3 padding.
    let mask =
        Tensor::<2, Bool>::from_data([[true; 5], [true, true, false, false, false]], &device);
    let masked = layer.forward(x.clone(), Some(mask));
    let real_rows = |t: Tensor<3>| {
        Tensor::cat(
            vec![
                t.clone().slice([0..1, 0..5]).reshape([5, D]),
                t.slice([1..2, 0..2]).reshape([2, D]),
            ],
            0,
        )
    };
    let alone = layer.forward_tokens(real_rows(x), None);
    assert_close(real_rows(masked.output), alone.output, 1e-5);
    let (s, a) = (masked.stats.summary(), alone.stats.summary());
    assert_eq!(s.tokens, 7.0);
    assert_eq!(s.load, a.load);
    assert_eq!(s.dropped, a.dropped);
    assert!((s.entropy - a.entropy).abs() < 1e-5);
    assert_close(masked.aux.z, alone.aux.z, 1e-5);
    assert_close(masked.aux.balance, alone.aux.balance, 1e-5);
}

/// A NaN in a padding token (or anywhere a dropped assignment would read) must not reach real
/// tokens: dropped and padding rows are masked, not multiplied by 0.
#[rstest]
fn a_nan_in_padding_stays_in_padding(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values(None, Some(0.5))] capacity_factor: Option<f64>,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let layer = MoeLayerConfig::new(D, F, 4)
        .with_capacity_factor(capacity_factor)
        .with_compute(ExpertCompute::Padded)
        .init(&device);
    let (x, _) = random_input(6, D, 8, &device);
    // Token 0 is padding, and NaN; unused padded rows are filled from token 0 too.
    let x = x.slice_assign([0..1, 0..D], Tensor::full([1, D], f32::NAN, &device));
    let valid = Tensor::<1, Bool>::from_data([false, true, true, true, true, true], &device);
    let out = layer.forward_tokens(x, Some(valid));
    let real = values(out.output.slice([1..6, 0..D]));
    assert!(real.iter().all(|v| v.is_finite()), "{real:?}");
    let s = out.stats.summary();
    assert!(s.entropy.is_finite() && values(out.aux.balance)[0].is_finite());
    assert!(values(out.aux.z)[0].is_finite());
}

#[rstest]
fn same_output_on_every_backend(#[values("ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let flex = Device::flex();
    for config in [
        MoeLayerConfig::new(D, F, 8),
        MoeLayerConfig::new(D, F, 8).with_capacity_factor(Some(1.0)),
        MoeLayerConfig::new(D, F, 8).with_router(RouterConfig::expert_choice(2)),
        MoeLayerConfig::new(D, F, 8)
            .with_router(RouterConfig::deepseek_v3(2))
            .with_n_shared_experts(1),
    ] {
        let layer = config.init(&flex);
        let (x, _) = random_input(24, D, 6, &flex);
        let expected = layer.forward_tokens(x.clone(), None);
        let other = layer.clone().to_device(&device);
        let actual = other.forward_tokens(x.to_device(&device), None);
        assert_close(actual.output, expected.output.to_device(&device), 1e-4);
        assert_eq!(actual.stats.summary().load, expected.stats.summary().load);
    }
}

/// A zero gate makes every score equal: ties must still give k distinct experts with equal
/// weights (token choice) or C distinct tokens (expert choice), for one token or many.
#[rstest]
fn all_equal_scores_still_route_correctly(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values(1, 5)] tokens: usize,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    for router in [RouterConfig::mixtral(), RouterConfig::expert_choice(2)] {
        let mut layer = MoeLayerConfig::new(D, F, 4)
            .with_router(router)
            .init(&device);
        let gate = layer.router.gate.weight.val();
        layer.router.gate.weight = Param::from_tensor(gate.zeros_like());
        let (x, _) = random_input(tokens, D, 3, &device);
        let out = layer.forward_tokens(x.clone(), None);
        assert!(values(out.output.clone()).iter().all(|v| v.is_finite()));
        let routing = match layer.router.config.kind {
            RouterKind::ExpertChoice => layer.router.forward_expert_choice(x, None, tokens),
            _ => layer.router.forward(x),
        };
        match routing.assignment {
            moe_core::Assignment::TokenChoice { experts, weights } => {
                let ex = ints(experts);
                assert_ne!(ex[0], ex[1], "distinct experts under ties: {ex:?}");
                assert!(values(weights).iter().all(|w| (w - 0.5).abs() < 1e-6));
                // Ties go to the lowest index, as in the reference.
                check_against_reference(&layer, tokens, 3, &device);
            }
            moe_core::Assignment::ExpertChoice { tokens: picks, .. } => {
                for row in ints(picks).chunks(tokens) {
                    let mut r = row.to_vec();
                    r.sort();
                    r.dedup();
                    assert_eq!(r.len(), tokens, "distinct tokens per expert: {row:?}");
                }
            }
        }
    }
}

#[rstest]
fn routing_picks_k_distinct_experts_with_unit_weights(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let layer = MoeLayerConfig::new(D, F, 8)
        .with_router(RouterConfig::mixtral().with_top_k(3))
        .init(&device);
    let (x, _) = random_input(20, D, 7, &device);
    let routing = layer.router.forward(x);
    let moe_core::Assignment::TokenChoice { experts, weights } = routing.assignment else {
        panic!("token choice expected")
    };
    let ex = ints(experts);
    for row in ex.chunks(3) {
        let mut r = row.to_vec();
        r.dedup();
        r.sort();
        r.dedup();
        assert_eq!(r.len(), 3, "distinct experts: {row:?}");
    }
    for w in values(weights.sum_dim(1)) {
        assert!((w - 1.0).abs() < 1e-5);
    }
}

#[test]
fn accounting_matches_the_module() {
    let device = Device::flex();
    for config in [
        MoeLayerConfig::new(32, 64, 8),
        MoeLayerConfig::new(32, 16, 64).with_n_shared_experts(2),
        MoeLayerConfig::new(32, 64, 8).with_router(RouterConfig::deepseek_v3(2)),
    ] {
        let acc = config.accounting();
        assert_eq!(acc.total_params, config.init(&device).num_params());
        assert_eq!(acc.expert_params, 3 * 32 * config.d_ff * config.n_experts);
    }
    // Mixtral-like: 8 experts, top-2 -> active experts are a quarter of all experts.
    let acc = MoeLayerConfig::new(4096, 14336, 8).accounting();
    let expert = 3 * 4096 * 14336;
    assert_eq!(acc.total_params, 8 * expert + 4096 * 8);
    assert_eq!(acc.active_params, 2 * expert + 4096 * 8);
    assert_eq!(acc.flops_per_token, 2 * acc.active_params);
}

#[test]
fn invalid_configs_are_refused() {
    let device = Device::flex();
    let bad = [
        MoeLayerConfig::new(16, 16, 0),
        MoeLayerConfig::new(0, 16, 4),
        MoeLayerConfig::new(16, 16, 4).with_router(RouterConfig::new().with_top_k(5)),
        MoeLayerConfig::new(16, 16, 4).with_router(RouterConfig::new().with_top_k(0)),
        MoeLayerConfig::new(16, 16, 4).with_capacity_factor(Some(0.0)),
        MoeLayerConfig::new(16, 16, 4).with_capacity_factor(Some(-1.0)),
        MoeLayerConfig::new(16, 16, 4).with_router(RouterConfig::new().with_jitter(-0.1)),
    ];
    for config in bad {
        let err = config.try_init(&device).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
}
