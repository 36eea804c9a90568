//! Autodiff through the MoE layer, on every backend.

mod common;

use burn::module::{Module, Param};
use burn::prelude::*;
use common::random_input;
use moe_core::testing::{ints, test_device, values};
use moe_core::{Assignment, MoeLayer, MoeLayerConfig, RouterConfig};
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
    #[values("mixtral", "sigmoid")] router: &str,
) {
    let Some(device) = test_device(backend) else {
        return;
    };
    let (d, f, t) = (4, 6, 5);
    let router = match router {
        "mixtral" => RouterConfig::mixtral(),
        _ => RouterConfig::deepseek_v3(2),
    };
    // Built on flex and moved, so every backend checks the same weights.
    let config = MoeLayerConfig::new(d, f, 3).with_router(router);
    let record = config.init(&Device::flex()).into_record();
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
        // Which experts each token uses, as sets: the order of the k picks does not matter.
        let k = l.router.config.top_k;
        let routing: Vec<Vec<i64>> = match l.router.forward(x.clone(), None, 1).assignment {
            Assignment::TokenChoice { experts, .. } => ints(experts),
            Assignment::ExpertChoice { tokens, .. } => ints(tokens),
        }
        .chunks(k)
        .map(|c| {
            let mut c = c.to_vec();
            c.sort();
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
