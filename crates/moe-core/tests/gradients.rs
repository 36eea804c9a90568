//! Autodiff through the MoE layer, on every backend.

mod common;

use burn::module::{Module, Param};
use burn::prelude::*;
use common::random_input;
use moe_core::dispatch::{ExpertLayout, TokenDispatch, capacity};
use moe_core::testing::{ints, test_device, values};
use moe_core::{Assignment, MoeLayer, MoeLayerConfig, RouterConfig, RouterKind};
use rstest::rstest;

/// A scalar that depends on every output element and on both auxiliary losses.
fn objective(layer: &MoeLayer, x: Tensor<2>, probe: Tensor<2>) -> Tensor<1> {
    let out = layer.forward_tokens(x, None);
    (out.output * probe).sum() + out.aux.balance.mul_scalar(0.1) + out.aux.z.mul_scalar(0.1)
}

fn probe(t: usize, d: usize, device: &Device) -> Tensor<2> {
    random_input(t, d, 99, device).0
}

#[rstest]
fn router_and_used_experts_get_gradients(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let device = device.autodiff();
    let (d, t) = (8, 12);
    let layer = MoeLayerConfig::new(d, 12, 4)
        .with_n_shared_experts(1)
        .init(&device);
    let (x, _) = random_input(t, d, 1, &device);
    let loss = objective(&layer, x.clone(), probe(t, d, &device));
    let grads = loss.backward();
    let norm = |g: Option<Tensor<3>>| -> Vec<f32> {
        let g = g.expect("expert gradient");
        let [e, _, _] = g.dims();
        values(g.abs().sum_dims_squeeze::<1, _>(&[1, 2]).reshape([e]))
    };
    let router = layer
        .router
        .gate
        .weight
        .grad(&grads)
        .expect("router gradient");
    assert!(
        values(router.abs().sum())[0] > 0.0,
        "router gradient is zero"
    );
    let used = layer.forward_tokens(x, None).stats.summary().load;
    for g in [
        norm(layer.experts.w_gate.grad(&grads)),
        norm(layer.experts.w_up.grad(&grads)),
        norm(layer.experts.w_down.grad(&grads)),
    ] {
        for (e, (g, l)) in g.iter().zip(&used).enumerate() {
            assert_eq!(*g > 0.0, *l > 0.0, "expert {e}: gradient {g} with load {l}");
        }
    }
    let shared = layer
        .shared
        .as_ref()
        .unwrap()
        .w_down
        .weight
        .grad(&grads)
        .unwrap();
    assert!(values(shared.abs().sum())[0] > 0.0);
}

/// Central finite differences on single weights of a tiny layer agree with autodiff. A
/// coordinate whose perturbation moves a token across a top-k boundary (where the objective is
/// not differentiable) is skipped; enough others must be checked.
#[rstest]
fn finite_differences_agree_with_autodiff(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
    #[values("mixtral", "sigmoid", "capacity", "expert_choice")] router: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let (d, f, t) = (4, 6, 5);
    let config = MoeLayerConfig::new(d, f, 3);
    // A capacity of ceil(0.5 * 5 * 2 / 3) = 2 per expert drops some of the 10 assignments.
    let config = match router {
        "mixtral" => config.with_router(RouterConfig::mixtral()),
        "sigmoid" => config.with_router(RouterConfig::deepseek_v3(2)),
        "capacity" => config.with_capacity_factor(Some(0.5)),
        _ => config.with_router(RouterConfig::expert_choice(2)),
    };
    // Built on flex and moved, so every backend checks the same weights; the gate comes from a
    // seed, so which coordinates sit on a top-k boundary is the same on every run.
    let mut seeded = config.init(&Device::flex());
    seeded.router.gate.weight = Param::from_tensor(random_input(d, 3, 11, &Device::flex()).0);
    let record = seeded.into_record();
    let plain = config.init(&device).load_record(record.clone());
    let ad = device.clone().autodiff();
    let layer = config.init(&ad).load_record(record);
    let (x, _) = random_input(t, d, 2, &ad);
    let grads = objective(&layer, x.clone(), probe(t, d, &ad)).backward();
    let analytic_gate = values(layer.router.gate.weight.grad(&grads).unwrap());
    let analytic_up = values(layer.experts.w_up.grad(&grads).unwrap());

    let (x, p) = (x.inner(), probe(t, d, &device));
    // The objective and the routing decision it was computed with.
    let eval = |l: &MoeLayer| {
        let value = f64::from(values(objective(l, x.clone(), p.clone()))[0]);
        // Which experts each token uses, as sets (the order of the k picks does not matter,
        // except under a capacity, where first choices win), or which tokens each expert takes.
        let k = l.router.config.top_k;
        let routing = match l.router.config.kind {
            RouterKind::ExpertChoice => {
                let c = capacity(l.capacity_factor.unwrap_or(1.0), t, k, l.router.n_experts());
                l.router.forward_expert_choice(x.clone(), None, c)
            }
            _ => l.router.forward(x.clone()),
        };
        let (picks, width) = match routing.assignment {
            Assignment::TokenChoice { experts, .. } => (ints(experts), k),
            Assignment::ExpertChoice { tokens, .. } => (ints(tokens.clone()), tokens.dims()[1]),
        };
        let ordered = l.capacity_factor.is_some();
        let routing: Vec<Vec<i64>> = picks
            .chunks(width)
            .map(|c| {
                let mut c = c.to_vec();
                if !ordered {
                    c.sort();
                }
                c
            })
            .collect();
        (value, routing)
    };
    let eps = 2e-3;
    let bump = |w: Tensor<2>, i: usize, delta: f64| {
        let [r, c] = w.dims();
        let mut v = values(w.clone());
        v[i] += delta as f32;
        Tensor::<1>::from_floats(v.as_slice(), &w.device()).reshape([r, c])
    };
    let check = |name: &str, analytic: &[f32], perturbed: &dyn Fn(f64, usize) -> MoeLayer| {
        let mut checked = 0;
        for (i, exact) in analytic.iter().enumerate() {
            let ((plus, route_plus), (minus, route_minus)) =
                (eval(&perturbed(eps, i)), eval(&perturbed(-eps, i)));
            if route_plus != route_minus {
                continue;
            }
            let numeric = (plus - minus) / (2.0 * eps);
            let exact = f64::from(*exact);
            assert!(
                (numeric - exact).abs() < 3e-3 + 0.03 * exact.abs(),
                "{name}[{i}]: fd {numeric} vs autodiff {exact}"
            );
            checked += 1;
        }
        assert!(
            checked >= analytic.len() / 2,
            "{name}: only {checked} smooth coordinates"
        );
    };
    check("gate", &analytic_gate, &|delta, i| {
        let mut l = plain.clone();
        l.router.gate.weight = Param::from_tensor(bump(l.router.gate.weight.val(), i, delta));
        l
    });
    check("w_up", &analytic_up, &|delta, i| {
        let mut l = plain.clone();
        let [e, a, b] = l.experts.w_up.dims();
        let flat = bump(l.experts.w_up.val().reshape([e * a, b]), i, delta);
        l.experts.w_up = Param::from_tensor(flat.reshape([e, a, b]));
        l
    });
}

#[rstest]
fn jitter_only_while_training(#[values("flex", "ndarray", "wgpu")] backend: &str) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let config = MoeLayerConfig::new(8, 8, 4).with_router(RouterConfig::mixtral().with_jitter(0.5));
    let layer = config.init(&device.clone().autodiff());
    let (x, _) = random_input(16, 8, 3, &device);
    let inference = layer.valid();
    let a = values(inference.forward_tokens(x.clone(), None).output);
    let b = values(inference.forward_tokens(x.clone(), None).output);
    assert_eq!(a, b, "no jitter in inference");
    let xa = x.autodiff();
    let c = values(layer.forward_tokens(xa.clone(), None).output);
    let e = values(layer.forward_tokens(xa, None).output);
    assert_ne!(c, e, "jitter in training");
}

/// Dropless training with routing collapsed onto one expert takes two tiers of padded blocks
/// (bounded work); its gradients must equal those of blocks padded to the busiest expert.
#[rstest]
fn tiered_blocks_give_the_gradients_of_padded_ones(
    #[values("flex", "ndarray", "wgpu")] backend: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let device = device.autodiff();
    let (d, e, t) = (8, 8, 24);
    let config = MoeLayerConfig::new(d, 6, e);
    let record = config.init(&Device::flex()).into_record();
    let grads = |compute| {
        let mut layer = config
            .clone()
            .with_compute(compute)
            .init(&device)
            .load_record(record.clone());
        // Expert 0 wins every token's first pick: padded to the busiest, 8 x 24 rows.
        let gate = layer.router.gate.weight.val();
        let skew = Tensor::<2>::zeros([d, e], &device)
            .slice_assign([0..d, 0..1], Tensor::full([d, 1], 5.0, &device));
        layer.router.gate.weight = Param::from_tensor((gate + skew).detach());
        let x = random_input(t, d, 4, &device).0.abs().add_scalar(0.5);
        let grads = objective(&layer, x.clone(), probe(t, d, &device)).backward();
        let load = layer.forward_tokens(x.clone(), None).stats.summary().load;
        let Assignment::TokenChoice { experts, .. } = layer.router.forward(x).assignment else {
            panic!("token choice expected");
        };
        let choice = layer.layout_choice(true);
        let layout = TokenDispatch::plan(experts, None, e, choice).layout;
        let g = [
            &layer.experts.w_gate,
            &layer.experts.w_up,
            &layer.experts.w_down,
        ]
        .map(|w| values(w.grad(&grads).expect("expert gradient")));
        (
            g,
            values(layer.router.gate.weight.grad(&grads).unwrap()),
            load,
            layout,
        )
    };
    let (tiered, tiered_gate, load, layout) = grads(moe_core::ExpertCompute::Auto);
    let (padded, padded_gate, _, _) = grads(moe_core::ExpertCompute::Padded);
    assert_eq!(
        load[0], t as f64,
        "expert 0 should take every token: {load:?}"
    );
    assert!(matches!(layout, ExpertLayout::Tiered { .. }), "{layout:?}");
    for (a, b) in tiered
        .iter()
        .chain([&tiered_gate])
        .zip(padded.iter().chain([&padded_gate]))
    {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5 + 1e-4 * y.abs(), "{x} vs {y}");
        }
    }
}
