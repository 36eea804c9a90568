//! Gradient clipping by the global norm: all gradients scaled by one factor so that their joint
//! L2 norm is at most the limit (as in PyTorch's `clip_grad_norm_`). Burn's
//! `GradientClipping::Norm` clips each tensor by its own norm, which changes the gradient's
//! direction; this keeps it.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;

/// Sums the squared gradients of a module's float parameters.
struct SquaredSum<'a> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredSum<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.sum = Some(match self.sum.take() {
                Some(acc) => acc + s,
                None => s,
            });
        }
    }
}

/// Multiplies the gradients of a module's float parameters by one factor.
struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The global L2 norm of `grads` over `module`'s parameters.
pub fn global_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut visitor = SquaredSum { grads, sum: None };
    module.visit(&mut visitor);
    visitor
        .sum
        .map_or(0.0, |s| f64::from(s.into_scalar::<f32>()).sqrt())
}

/// Scales `grads` so that their global norm is at most `max_norm` (0 turns clipping off).
/// Returns the gradients and their norm before clipping.
pub fn clip_global_norm<M: Module>(
    module: &M,
    mut grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, f64) {
    let norm = global_norm(module, &grads);
    if max_norm > 0.0 && norm > max_norm {
        let mut visitor = Scale {
            grads: &mut grads,
            factor: max_norm / (norm + 1e-6),
        };
        module.visit(&mut visitor);
    }
    (grads, norm)
}

#[cfg(test)]
mod tests {
    use burn::nn::{Linear, LinearConfig};
    use rstest::rstest;

    use super::*;
    use moe_core::testing::values;

    #[derive(Module, Debug)]
    struct Two {
        a: Linear,
        b: Linear,
    }

    /// Gradients of 3 (for `a.weight`, 2 x 2) and 4 (for `b.weight`, 1 x 1) per element: norms
    /// 6 and 4, global norm sqrt(52).
    fn setup(device: &Device) -> (Two, GradientsParams) {
        let m = Two {
            a: LinearConfig::new(2, 2).with_bias(false).init(device),
            b: LinearConfig::new(1, 1).with_bias(false).init(device),
        };
        let mut grads = GradientsParams::new();
        grads.register(m.a.weight.id, Tensor::<2>::full([2, 2], 3.0, device));
        grads.register(m.b.weight.id, Tensor::<2>::full([1, 1], 4.0, device));
        (m, grads)
    }

    #[rstest]
    fn one_factor_scales_every_gradient(#[values("flex", "ndarray", "wgpu")] backend: &str) {
        let Some(device) = moe_core::testing::test_device(backend) else {
            return;
        };
        let (m, grads) = setup(&device);
        let (clipped, norm) = clip_global_norm(&m, grads, 1.0);
        assert!((norm - 52f64.sqrt()).abs() < 1e-4, "{norm}");
        let factor = 1.0 / 52f32.sqrt();
        for v in values(clipped.get::<2>(m.a.weight.id).unwrap()) {
            assert!((v - 3.0 * factor).abs() < 1e-5, "{v}");
        }
        let b = values(clipped.get::<2>(m.b.weight.id).unwrap())[0];
        assert!((b - 4.0 * factor).abs() < 1e-5, "{b}");
        assert!((global_norm(&m, &clipped) - 1.0).abs() < 1e-4);
        // Under the limit, or with clipping off, nothing changes.
        let (m, grads) = setup(&device);
        let (kept, _) = clip_global_norm(&m, grads, 100.0);
        assert_eq!(values(kept.get::<2>(m.b.weight.id).unwrap()), [4.0]);
        let (m, grads) = setup(&device);
        let (kept, _) = clip_global_norm(&m, grads, 0.0);
        assert_eq!(values(kept.get::<2>(m.b.weight.id).unwrap()), [4.0]);
    }
}
