//! Criterion benches: MoE layers against dense SwiGLU FFNs (forward, forward+backward, every
//! router kind, dropless and capacity dispatch, fine-grained experts) and the whole model's
//! forward, on flex, ndarray and wgpu (where an adapter exists).
//!
//! ```text
//! cargo bench --workspace --bench moe             # every backend
//! cargo bench --workspace --bench moe -- flex/     # one backend
//! ```
//!
//! The cases are the ones `moe bench` times (`moe_bench::cases`), so both report the same
//! work. Each call reads one scalar back, which synchronises asynchronous backends; inputs are
//! drawn fresh for every call, outside the timer.

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use moe::moe_bench::{BenchSizes, cases};
use moe::moe_core::parse_device;

fn backends(c: &mut Criterion) {
    // As `moe bench` runs: without it, every large output is faulted back in page by page.
    moe::moe_core::host::tune_allocator();
    let sizes = BenchSizes::default();
    for name in ["flex", "ndarray", "wgpu"] {
        let Ok(device) = parse_device(name) else {
            eprintln!("{name}: no device, skipped");
            continue;
        };
        let mut group = c.benchmark_group(name);
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        for case in cases(&sizes, &device) {
            // A case the device cannot run (e.g. a buffer over a software adapter's limit) is
            // reported and left out, not timed failing.
            if let Err(e) = (case.run)((case.fresh)()) {
                eprintln!("{name}/{}: skipped: {e}", case.name);
                continue;
            }
            group.throughput(Throughput::Elements(case.tokens as u64));
            group.bench_function(&case.name, |b| {
                b.iter_batched(
                    || (case.fresh)(),
                    |x| (case.run)(x),
                    BatchSize::PerIteration,
                )
            });
        }
        group.finish();
    }
}

criterion_group!(benches, backends);
criterion_main!(benches);
