//! Measured speed of MoE against dense feed-forward blocks on one backend: the cases behind
//! `moe bench` and the criterion benches, the ratios the project's targets are stated in, and a
//! breakdown of where an MoE layer's forward time goes.
//!
//! Every timed call ends by reading one scalar back from the device (the sum of the output), so
//! asynchronous backends (wgpu) are timed to completion and lazily fused work cannot be skipped;
//! inputs are drawn fresh, outside the timer, for every call.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::Distribution;
use moe_core::dispatch::TokenDispatch;
use moe_core::router::Assignment;
use moe_core::{ExpertCompute, MoeLayer, MoeLayerConfig, RouterConfig, SwiGluFfn, SwiGluFfnConfig};
use moe_model::{FfnPlan, ModelConfig};
use serde::Serialize;

/// Layer sizes of the benchmark. The defaults are the ones the targets are stated for.
#[derive(Debug, Clone, Copy)]
pub struct BenchSizes {
    /// Tokens per call. Default 2048.
    pub tokens: usize,
    /// Model width. Default 512.
    pub d_model: usize,
    /// Experts of the routing-overhead cases. Default 8.
    pub experts: usize,
    /// Expert width of those cases (top-2: twice this is the dense width). Default 1024.
    pub expert_d_ff: usize,
    /// Experts of the fine-grained case. Default 64.
    pub fine_experts: usize,
    /// Expert width of the fine-grained case. Default 512.
    pub fine_d_ff: usize,
}

impl Default for BenchSizes {
    fn default() -> Self {
        Self {
            tokens: 2048,
            d_model: 512,
            experts: 8,
            expert_d_ff: 1024,
            fine_experts: 64,
            fine_d_ff: 512,
        }
    }
}

/// How long to measure each case.
#[derive(Debug, Clone, Copy)]
pub struct BenchBudget {
    /// Timed calls at least (after one untimed warm-up call).
    pub min_iters: usize,
    /// Keep timing while under this much time per case (and under `max_iters`).
    pub min_time: Duration,
    /// Timed calls at most.
    pub max_iters: usize,
}

impl BenchBudget {
    /// A thorough run (a few seconds per case).
    pub fn full() -> Self {
        Self {
            min_iters: 5,
            min_time: Duration::from_secs(2),
            max_iters: 50,
        }
    }

    /// A quick run (noisier).
    pub fn quick() -> Self {
        Self {
            min_iters: 2,
            min_time: Duration::from_millis(300),
            max_iters: 10,
        }
    }
}

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

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Achieved GFLOP/s (matmul FLOPs of the active parameters).
    pub gflops: f64,
    /// Median milliseconds per call.
    pub ms: f64,
    /// Share of the backend's plain matmul GFLOP/s.
    pub matmul_share: f64,
}

/// Where an MoE layer's forward time goes, in milliseconds per call.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    /// The case measured.
    pub case: String,
    /// (stage, milliseconds) in execution order.
    pub stages: Vec<(String, f64)>,
}

/// Everything one `moe bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The device's name.
    pub device: String,
    /// Plain matmul throughput `[T, d] x [d, 4d]` on this device, GFLOP/s.
    pub matmul_gflops: f64,
    /// Every case.
    pub cases: Vec<CaseResult>,
    /// MoE tokens/s divided by dense tokens/s, by comparison name.
    pub ratios: BTreeMap<String, f64>,
    /// Time per stage of MoE forward passes.
    pub breakdown: Vec<Breakdown>,
    /// Cases the device could not run, with why (e.g. a buffer over the adapter's limit).
    pub failed: Vec<FailedCase>,
}

/// A case the device could not run.
#[derive(Debug, Clone, Serialize)]
pub struct FailedCase {
    /// Case name.
    pub name: String,
    /// The device's error, one line.
    pub error: String,
}

/// A value read back from the device, or why the device could not produce it (e.g. a buffer
/// larger than the adapter allows), as one line.
pub type Read<T = f32> = Result<T, String>;

/// Median seconds per call of `run` on inputs from `fresh` (drawn outside the timer), after a
/// warm-up call.
pub fn measure<I>(
    budget: &BenchBudget,
    fresh: &dyn Fn() -> I,
    run: &dyn Fn(I) -> Read,
) -> Read<f64> {
    run(fresh())?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < budget.min_iters
        || (start.elapsed() < budget.min_time && times.len() < budget.max_iters)
    {
        let x = fresh();
        let t = Instant::now();
        std::hint::black_box(run(x)?);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Random hidden states `[tokens, d]`, complete on the device before any timer starts.
fn input(tokens: usize, d: usize, device: &Device) -> Tensor<2> {
    let x = Tensor::<2>::random([tokens, d], Distribution::Normal(0.0, 1.0), device);
    let _ = device.sync();
    x
}

fn read_back<const D: usize>(t: Tensor<D>) -> Read {
    t.sum().try_into_scalar::<f32>().map_err(|e| {
        format!("{e:?}")
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string()
    })
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

/// An MoE layer case, forward or forward+backward.
pub fn moe_case(
    name: &str,
    s: &BenchSizes,
    config: MoeLayerConfig,
    backward: bool,
    device: &Device,
) -> BenchCase {
    let device = case_device(device, backward);
    let flops = config.accounting().flops_per_token as f64;
    let layer: MoeLayer = config.init(&device);
    layer_case(name, s, backward, device, flops, move |x| {
        layer.forward_tokens(x, None).output
    })
}

/// A whole-model forward case: batches of 16 x 128 tokens through `config`.
pub fn model_case(name: &str, config: &ModelConfig, device: &Device) -> BenchCase {
    let model = config.init(device).expect("benchmark configs are valid");
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

fn moe_config(s: &BenchSizes, experts: usize, d_ff: usize, router: RouterConfig) -> MoeLayerConfig {
    MoeLayerConfig::new(s.d_model, d_ff, experts).with_router(router)
}

/// Every case of a `moe bench` run, in reporting order.
pub fn cases(s: &BenchSizes, device: &Device) -> Vec<BenchCase> {
    let dense_active = s.expert_d_ff * 2;
    let dense_total = s.fine_d_ff * s.fine_experts;
    let e8 = |router: RouterConfig| moe_config(s, s.experts, s.expert_d_ff, router);
    let e64 = moe_config(s, s.fine_experts, s.fine_d_ff, RouterConfig::mixtral());
    let model = ModelConfig::new();
    vec![
        dense_case("dense_active_fwd", s, dense_active, false, device),
        moe_case(
            "moe_top2_fwd",
            s,
            e8(RouterConfig::mixtral()),
            false,
            device,
        ),
        moe_case(
            "moe_top2_segments_fwd",
            s,
            e8(RouterConfig::mixtral()).with_compute(ExpertCompute::Segments),
            false,
            device,
        ),
        moe_case(
            "moe_top2_capacity1.25_fwd",
            s,
            e8(RouterConfig::mixtral()).with_capacity_factor(Some(1.25)),
            false,
            device,
        ),
        moe_case(
            "moe_switch_top1_fwd",
            s,
            moe_config(s, s.experts, dense_active, RouterConfig::switch()),
            false,
            device,
        ),
        moe_case(
            "moe_deepseek_top2_fwd",
            s,
            e8(RouterConfig::deepseek_v3(2)),
            false,
            device,
        ),
        moe_case(
            "moe_expert_choice_fwd",
            s,
            e8(RouterConfig::expert_choice(2)),
            false,
            device,
        ),
        dense_case("dense_active_fwd_bwd", s, dense_active, true, device),
        moe_case(
            "moe_top2_fwd_bwd",
            s,
            e8(RouterConfig::mixtral()),
            true,
            device,
        ),
        dense_case("dense_total_e64_fwd", s, dense_total, false, device),
        moe_case("moe_e64_top2_fwd", s, e64.clone(), false, device),
        moe_case(
            "moe_e64_top2_segments_fwd",
            s,
            e64.with_compute(ExpertCompute::Segments),
            false,
            device,
        ),
        model_case("model_moe_fwd", &model, device),
        model_case(
            "model_dense_fwd",
            &model.dense_equivalent().with_ffn_plan(FfnPlan::AllDense),
            device,
        ),
    ]
}

/// The ratios the targets are stated in: (name, MoE case, dense case).
pub const RATIOS: [(&str, &str, &str); 4] = [
    (
        "moe_vs_dense_active_fwd",
        "moe_top2_fwd",
        "dense_active_fwd",
    ),
    (
        "moe_vs_dense_active_fwd_bwd",
        "moe_top2_fwd_bwd",
        "dense_active_fwd_bwd",
    ),
    (
        "moe_vs_dense_total_e64_fwd",
        "moe_e64_top2_fwd",
        "dense_total_e64_fwd",
    ),
    ("model_moe_vs_dense_fwd", "model_moe_fwd", "model_dense_fwd"),
];

/// Plain matmul GFLOP/s: `[T, d] x [d, 4d]`, the dense FFN's first projection.
pub fn matmul_gflops(s: &BenchSizes, budget: &BenchBudget, device: &Device) -> Read<f64> {
    let (t, d) = (s.tokens, s.d_model);
    let w = Tensor::<2>::random([d, 4 * d], Distribution::Normal(0.0, 1.0), device);
    let secs = measure(budget, &|| input(t, d, device), &|x| {
        read_back(x.matmul(w.clone()))
    })?;
    Ok(2.0 * (t * d * 4 * d) as f64 / secs / 1e9)
}

/// Times the stages of an MoE forward pass separately (each stage ends with a read-back, so
/// the stages sum to a little more than the whole).
pub fn breakdown(
    name: &str,
    s: &BenchSizes,
    config: MoeLayerConfig,
    budget: &BenchBudget,
    device: &Device,
) -> Read<Breakdown> {
    let layer = config.init(device);
    let (t, d, e) = (s.tokens, s.d_model, config.n_experts);
    let x = input(t, d, device);
    let routing = layer.router.forward(x.clone());
    let Assignment::TokenChoice { experts, weights } = routing.assignment else {
        unreachable!("the breakdown is of token-choice routing")
    };
    let choice = layer.layout_choice(false);
    let plan = TokenDispatch::plan(experts.clone(), None, e, choice);
    let buffer = x.clone().select(0, plan.source.clone());
    let y = plan.layout.run(&layer.experts, buffer.clone());
    // Each stage is timed on the same prepared input; fresh inputs matter for whole passes only.
    let ms = |f: &dyn Fn(()) -> Read| measure(budget, &|| (), f).map(|s| 1e3 * s);
    let stages = vec![
        (
            "router (gate matmul, softmax, top-k)".to_string(),
            ms(&|()| {
                let r = layer.router.forward(x.clone());
                read_back(r.probs)
            }),
        ),
        (
            "dispatch plan (counts, ranks, rows)".to_string(),
            ms(&|()| {
                let p = TokenDispatch::plan(experts.clone(), None, e, choice);
                read_back(p.source.float())
            }),
        ),
        (
            "gather tokens into expert buffer".to_string(),
            ms(&|()| read_back(x.clone().select(0, plan.source.clone()))),
        ),
        (
            "expert matmuls".to_string(),
            ms(&|()| read_back(plan.layout.run(&layer.experts, buffer.clone()))),
        ),
        (
            "combine (gather back, weight, sum over k)".to_string(),
            ms(&|()| read_back(plan.combine(y.clone(), weights.clone()))),
        ),
        (
            "whole layer forward".to_string(),
            ms(&|()| read_back(layer.forward_tokens(x.clone(), None).output)),
        ),
    ];
    Ok(Breakdown {
        case: name.into(),
        stages: stages
            .into_iter()
            .map(|(stage, ms)| ms.map(|ms| (stage, ms)))
            .collect::<Read<_>>()?,
    })
}

/// Runs every case and computes the ratios and breakdowns. A case the device cannot run is
/// listed in `failed` (its ratios are left out); only a failing plain matmul fails the run.
pub fn run(
    device: &Device,
    device_name: &str,
    sizes: &BenchSizes,
    budget: &BenchBudget,
) -> Read<BenchReport> {
    let matmul = matmul_gflops(sizes, budget, device)?;
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for case in cases(sizes, device) {
        let secs = match case.measure(budget) {
            Ok(secs) => secs,
            Err(error) => {
                failed.push(FailedCase {
                    name: case.name,
                    error,
                });
                continue;
            }
        };
        let gflops = case.flops / secs / 1e9;
        results.push(CaseResult {
            name: case.name,
            tokens_per_s: case.tokens as f64 / secs,
            gflops,
            ms: secs * 1e3,
            matmul_share: gflops / matmul,
        });
    }
    let tps = |name: &str| {
        results
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.tokens_per_s)
    };
    let ratios = RATIOS
        .iter()
        .filter_map(|(ratio, moe, dense)| Some((ratio.to_string(), tps(moe)? / tps(dense)?)))
        .collect();
    let mut breakdowns = Vec::new();
    for (name, experts, d_ff) in [
        ("moe_top2_fwd", sizes.experts, sizes.expert_d_ff),
        ("moe_e64_top2_fwd", sizes.fine_experts, sizes.fine_d_ff),
    ] {
        let config = moe_config(sizes, experts, d_ff, RouterConfig::mixtral());
        match breakdown(name, sizes, config, budget, device) {
            Ok(b) => breakdowns.push(b),
            Err(error) => failed.push(FailedCase {
                name: format!("breakdown of {name}"),
                error,
            }),
        }
    }
    Ok(BenchReport {
        device: device_name.into(),
        matmul_gflops: matmul,
        cases: results,
        ratios,
        breakdown: breakdowns,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_measures_every_case_and_ratio() {
        let sizes = BenchSizes {
            tokens: 32,
            d_model: 16,
            experts: 4,
            expert_d_ff: 8,
            fine_experts: 8,
            fine_d_ff: 4,
        };
        let budget = BenchBudget {
            min_iters: 1,
            min_time: Duration::ZERO,
            max_iters: 1,
        };
        let report = run(&Device::flex(), "flex", &sizes, &budget).unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(report.cases.len(), 14);
        for c in &report.cases {
            assert!(c.tokens_per_s.is_finite() && c.tokens_per_s > 0.0, "{c:?}");
            assert!(c.gflops > 0.0, "{c:?}");
        }
        assert_eq!(report.ratios.len(), RATIOS.len());
        assert!(report.ratios.values().all(|r| r.is_finite() && *r > 0.0));
        assert_eq!(report.breakdown.len(), 2);
        assert_eq!(report.breakdown[0].stages.len(), 6);
    }

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
            moe_config(&s, 8, 1024, RouterConfig::mixtral()),
            true,
            &device,
        );
        // Two experts of 3 x 512 x 1024 plus the 512 x 8 router, forward and backward.
        let active = 2 * 3 * 512 * 1024 + 512 * 8;
        assert_eq!(moe.flops, 3.0 * 2.0 * active as f64 * 2048.0);
    }
}
