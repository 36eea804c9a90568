//! Criterion benches of the host kernels a decode step runs on flex:
//! - decode attention over a cache of 16 to 4096 positions, held in f32 or f16, with the cache
//!   warm (back-to-back calls) and cold (a 64 MiB buffer read between calls, as a decode step's
//!   weights evict the cache between one layer's attention and the next token's);
//! - handing work to another core (`fork`): `map_on_cores`, whose workers stay awake between
//!   calls, against a rayon `join` from outside the pool, whose threads sleep;
//! - one `[out, in]` SwiGLU expert (`swiglu_out_in`) on the 2 to 8 rows a batched decode step
//!   gives it, warm and cold (as in a decode step, which reads each expert once); throughput in
//!   bytes of weights, so the figure reads against the machine's read bandwidth: `cold/read`
//!   and `cold/read_parallel` only read the same weights, on one thread and on every thread.
//!
//! ```text
//! cargo bench --workspace --bench kernels
//! cargo bench --workspace --bench kernels -- decode_attention/f32   # one cache type
//! cargo bench --workspace --bench kernels -- swiglu_out_in
//! ```
//!
//! The shapes are the Mixtral of docs/benchmarks.md: at batch 1, 2 key/value heads of 8 query
//! heads (groups of 4), head width 64; experts of d_model 512 and d_ff 1024.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use moe::moe_core::host::{CallerShare, map_on_cores};
use moe::moe_core::kernels::{HostElement, KvRows, decode_attention, swiglu_out_in};
use rayon::prelude::*;

const KV_HEADS: usize = 2;
const GROUP: usize = 4;
const HEAD_DIM: usize = 64;

/// Values in [-1, 1) from a fixed linear congruential sequence.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Reads `buf` through, evicting what the caches held.
fn evict(buf: &[u64]) -> u64 {
    buf.iter().step_by(8).fold(0, |a, x| a ^ x)
}

fn bench_cache<E: HostElement>(c: &mut Criterion, name: &str, narrow: fn(f32) -> E) {
    let mut group = c.benchmark_group(format!("decode_attention/{name}"));
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let flush = vec![1u64; 8 << 20];
    for positions in [16, 1024, 4096] {
        let q = values(KV_HEADS * GROUP * HEAD_DIM, 1);
        let cache = |seed| -> Vec<E> {
            let v = values(KV_HEADS * positions * HEAD_DIM, seed);
            v.into_iter().map(narrow).collect()
        };
        let (k, v) = (cache(2), cache(3));
        let rows = |data| KvRows {
            data,
            offset: 0,
            strides: [
                KV_HEADS * positions * HEAD_DIM,
                positions * HEAD_DIM,
                HEAD_DIM,
            ],
            head_dim: HEAD_DIM,
        };
        let dims = [1, KV_HEADS, GROUP, HEAD_DIM];
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        let call = || decode_attention(&q, dims, rows(&k), rows(&v), positions, None, scale);
        group.throughput(Throughput::Elements(positions as u64));
        group.bench_function(format!("warm/{positions}"), |b| {
            b.iter(|| black_box(call()))
        });
        group.bench_function(format!("cold/{positions}"), |b| {
            b.iter_batched(
                || black_box(evict(&flush)),
                |_| black_box(call()),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// Reads every value of `w` (16 lanes of sums, which the compiler vectorises).
fn read(w: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = w.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`read`] split across the rayon pool's threads, 64 KiB a task.
fn read_parallel(w: &[f32]) -> f32 {
    w.par_chunks(16 << 10).map(read).sum()
}

/// One expert of d_model 512 and d_ff 1024, its weights `[out, in]`, on 2, 4 and 8 rows, warm
/// and cold.
fn bench_swiglu(c: &mut Criterion) {
    const D: usize = 512;
    const F: usize = 1024;
    let mut group = c.benchmark_group("swiglu_out_in");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Bytes((3 * D * F * 4) as u64));
    let flush = vec![1u64; 8 << 20];
    let (gate, up, down) = (values(F * D, 4), values(F * D, 5), values(D * F, 6));
    // The floors: the same weights only read, on one thread and on the pool's threads.
    for (name, reader) in [
        ("read", read as fn(&[f32]) -> f32),
        ("read_parallel", read_parallel),
    ] {
        group.bench_function(format!("cold/{name}"), |b| {
            b.iter_batched(
                || black_box(evict(&flush)),
                |_| black_box([&gate, &up, &down].map(|w| reader(black_box(w)))),
                BatchSize::PerIteration,
            )
        });
    }
    for rows in [2, 4, 8] {
        let x = values(rows * D, 7);
        group.bench_function(format!("warm/{rows}"), |b| {
            b.iter(|| black_box(swiglu_out_in(&x, rows, &gate, &up, &down)))
        });
        group.bench_function(format!("cold/{rows}"), |b| {
            b.iter_batched(
                || black_box(evict(&flush)),
                |_| black_box(swiglu_out_in(&x, rows, &gate, &up, &down)),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn kernels(c: &mut Criterion) {
    bench_cache::<f32>(c, "f32", |x| x);
    bench_cache::<f16>(c, "f16", f16::from_f32);
    bench_swiglu(c);
    bench_fork(c);
}

criterion_group!(benches, kernels);
criterion_main!(benches);

/// Handing work to another core: `map_on_cores` with two items (each share of the calling
/// thread's kind) against a rayon `join` from outside the pool, back to back and after a 300 µs
/// pause (the gap between a decode step's expert phases), beside the pause alone.
fn bench_fork(c: &mut Criterion) {
    let mut group = c.benchmark_group("fork");
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(2));
    let items = [0usize, 1];
    let pause = || {
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_micros(300) {}
    };
    for (name, share) in [
        ("inline", CallerShare::Inline),
        ("pooled", CallerShare::Pooled),
    ] {
        group.bench_function(format!("map_on_cores/{name}"), |b| {
            b.iter(|| black_box(map_on_cores(&items, share, |&i| i + 1)))
        });
        group.bench_function(format!("map_on_cores/{name}/after_300us"), |b| {
            b.iter(|| {
                pause();
                black_box(map_on_cores(&items, share, |&i| i + 1))
            })
        });
    }
    group.bench_function("rayon_join", |b| {
        b.iter(|| black_box(rayon::join(|| 1, || 2)))
    });
    group.bench_function("rayon_join/after_300us", |b| {
        b.iter(|| {
            pause();
            black_box(rayon::join(|| 1, || 2))
        })
    });
    group.bench_function("pause_300us", |b| b.iter(pause));
    group.finish();
}
