//! Timing on a device: how long to measure, the median time per call, and the plain matmul
//! throughput every case is read against.
//!
//! Every timed call ends by reading one scalar back from the device (the sum of the output), so
//! asynchronous backends (wgpu) are timed to completion and lazily fused work cannot be skipped;
//! inputs are drawn fresh, outside the timer, for every call.

use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::Distribution;

use crate::sizes::BenchSizes;

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
pub(crate) fn input(tokens: usize, d: usize, device: &Device) -> Tensor<2> {
    let x = Tensor::<2>::random([tokens, d], Distribution::Normal(0.0, 1.0), device);
    let _ = device.sync();
    x
}

/// Reads the sum of `t` back from the device: the end of every timed call.
pub(crate) fn read_back<const D: usize>(t: Tensor<D>) -> Read {
    t.sum().try_into_scalar::<f32>().map_err(|e| {
        format!("{e:?}")
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string()
    })
}

/// Plain matmul GFLOP/s: `[T, d] x [d, 4d]`, the dense FFN's first projection.
pub fn matmul_gflops(s: &BenchSizes, budget: &BenchBudget, device: &Device) -> Read<f64> {
    let (t, d) = (s.tokens, s.d_model);
    let w = Tensor::<2>::random([d, 4 * d], Distribution::Normal(0.0, 1.0), device);
    let secs = measure(budget, &|| input(t, d, device), &|x| {
        read_back(x.matmul(w.clone()))
    })?;
    Ok(2.0 * (t * d * 4 * d) as f64 / secs / 1e9)
}
