//! A benchmark case: closures over prepared weights that draw a fresh input and process it, with
//! the tokens and matmul FLOPs of one call; and the three kinds of case (a dense FFN, an MoE
//! layer, a whole model).

use burn::prelude::*;
use burn::tensor::Distribution;
use moe_core::{MoeLayer, MoeLayerConfig, SwiGluFfn, SwiGluFfnConfig};
use moe_model::ModelConfig;

use crate::sizes::BenchSizes;
use crate::timing::{BenchBudget, Read, input, measure, read_back};

/// A fresh input of a case.
pub enum BenchInput {
    /// Hidden states `[T, d_model]`.
    Hidden(Tensor<2>),
    /// Token ids `[batch, seq]`.
    Tokens(Tensor<2, Int>),
}

/// One benchmark case: closures over prepared weights.
pub struct BenchCase {
    /// Case name, e.g. `moe_top2_fwd`.
    pub name: String,
    /// Tokens per call.
    pub tokens: usize,
    /// Matmul FLOPs per call (forward, or 3x forward for forward+backward).
    pub flops: f64,
    /// Draws a fresh input on the device (not timed).
    pub fresh: Box<dyn Fn() -> BenchInput>,
    /// Processes one input and returns the read-back scalar (timed).
    pub run: Box<dyn Fn(BenchInput) -> Read>,
}

impl BenchCase {
    /// Median seconds per call.
    pub fn measure(&self, budget: &BenchBudget) -> Read<f64> {
        measure(budget, &|| (self.fresh)(), &|x| (self.run)(x))
    }
}

fn hidden(x: BenchInput) -> Tensor<2> {
    match x {
        BenchInput::Hidden(x) => x,
        BenchInput::Tokens(_) => unreachable!("layer cases take hidden states"),
    }
}

/// A case of one layer on `[T, d_model]` hidden states; `backward` adds the backward pass of
/// the output's sum.
fn layer_case(
    name: &str,
    s: &BenchSizes,
    backward: bool,
    device: Device,
    flops_per_token: f64,
    forward: impl Fn(Tensor<2>) -> Tensor<2> + 'static,
) -> BenchCase {
    let (t, d) = (s.tokens, s.d_model);
    let fwd = flops_per_token * t as f64;
    BenchCase {
        name: name.into(),
        tokens: t,
        flops: if backward { 3.0 * fwd } else { fwd },
        fresh: Box::new(move || BenchInput::Hidden(input(t, d, &device))),
        run: Box::new(move |x| {
            let y = forward(hidden(x));
            if backward {
                std::hint::black_box(y.clone().sum().backward());
            }
            read_back(y)
        }),
    }
}

/// The device a case runs on: with autodiff for forward+backward.
fn case_device(device: &Device, backward: bool) -> Device {
    if backward {
        device.clone().autodiff()
    } else {
        device.clone()
    }
}

/// A dense SwiGLU FFN case, forward or forward+backward.
pub fn dense_case(
    name: &str,
    s: &BenchSizes,
    d_ff: usize,
    backward: bool,
    device: &Device,
) -> BenchCase {
    let device = case_device(device, backward);
    let ffn: SwiGluFfn = SwiGluFfnConfig::new(s.d_model, d_ff).init(&device);
    let flops = 2.0 * ffn.num_params() as f64;
    layer_case(name, s, backward, device, flops, move |x| ffn.forward(x))
}

/// An MoE layer case, forward (laid out for inference) or forward+backward.
pub fn moe_case(
    name: &str,
    s: &BenchSizes,
    config: MoeLayerConfig,
    backward: bool,
    device: &Device,
) -> BenchCase {
    let device = case_device(device, backward);
    let flops = config.accounting().flops_per_token as f64;
    let mut layer: MoeLayer = config.init(&device);
    if !backward {
        layer = layer.for_inference();
    }
    layer_case(name, s, backward, device, flops, move |x| {
        layer.forward_tokens(x, None).output
    })
}

/// A whole-model forward case: batches of 16 x 128 tokens through `config`, laid out for
/// inference.
pub fn model_case(name: &str, config: &ModelConfig, device: &Device) -> BenchCase {
    let model = config
        .init(device)
        .expect("benchmark configs are valid")
        .for_inference();
    let (b, s) = (16, 128.min(config.max_seq_len));
    let fwd = config.accounting().total.flops_per_token as f64 * (b * s) as f64;
    let vocab = config.vocab_size;
    let device = device.clone();
    BenchCase {
        name: name.into(),
        tokens: b * s,
        flops: fwd,
        fresh: Box::new(move || {
            let tokens =
                Tensor::<2, Int>::random([b, s], Distribution::Uniform(0.0, vocab as f64), &device);
            let _ = device.sync();
            BenchInput::Tokens(tokens)
        }),
        run: Box::new(move |tokens| {
            let BenchInput::Tokens(tokens) = tokens else {
                unreachable!("model cases take token ids")
            };
            read_back(model.forward(tokens, None).logits)
        }),
    }
}

#[cfg(test)]
mod tests {
    use moe_core::RouterConfig;

    use super::*;

    #[test]
    fn case_flops_follow_the_accounting() {
        let s = BenchSizes::default();
        let device = Device::flex();
        let dense = dense_case("d", &s, 2048, false, &device);
        // 3 projections of 512 x 2048, 2 FLOPs per multiply-add, 2048 tokens.
        assert_eq!(dense.flops, 2.0 * 3.0 * 512.0 * 2048.0 * 2048.0);
        let moe = moe_case(
            "m",
            &s,
            MoeLayerConfig::new(s.d_model, 1024, 8).with_router(RouterConfig::mixtral()),
            true,
            &device,
        );
        // Two experts of 3 x 512 x 1024 plus the 512 x 8 router, forward and backward.
        let active = 2 * 3 * 512 * 1024 + 512 * 8;
        assert_eq!(moe.flops, 3.0 * 2.0 * active as f64 * 2048.0);
    }
}
