//! Independent chains of tensor ops spread over the host CPU's cores.
//!
//! Burn's CPU backends (flex, ndarray) run each op synchronously on the calling thread: a large
//! matmul is split across the rayon pool, element-wise ops run on one thread. A fine-grained
//! expert's matmul (tens of rows) is too small to split well, and its element-wise ops leave the
//! other cores idle. Whole expert chains run side by side instead, one worker per core with every
//! op inside single-threaded: the cores need no synchronisation within a chain, and each chain's
//! intermediates stay in its core's cache.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use burn::prelude::Device;
use rayon::{ThreadPool, ThreadPoolBuilder};

/// Whether ops on this device run synchronously on the calling host thread (flex and ndarray
/// without autodiff). Asynchronous devices (wgpu) already overlap queued work, and an autodiff
/// graph is recorded on one thread.
pub fn runs_on_host(device: &Device) -> bool {
    !device.is_autodiff() && crate::device::is_host_backend(device)
}

/// `f` applied to every item, in item order. The items are taken in turn by one worker per core
/// of the rayon pool; inside `f` the current rayon pool has one thread, so Burn's CPU ops do not
/// split further. Runs on the calling thread alone when there is one item or one core, or when
/// called from inside another `map_on_cores`.
pub fn map_on_cores<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let cores = rayon::current_num_threads();
    let pools = match cores {
        2.. => core_pools(cores),
        _ => &[],
    };
    let pools = &pools[..pools.len().min(items.len())];
    if pools.len() < 2 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(items.len()));
    let work = || {
        let mut mine = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            mine.push((i, f(item)));
        }
        done.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
    };
    std::thread::scope(|s| {
        for pool in &pools[1..] {
            s.spawn(|| pool.install(work));
        }
        pools[0].install(work);
    });
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Keeps glibc's allocator from returning memory to the system between steps; a no-op on other
/// platforms. Call it once at the start of a program that runs models on a host backend.
///
/// With glibc's defaults every large buffer a step frees (a `[2048, 2048]` matmul output, an
/// expert's hidden state, a decode step's KV views) is unmapped or trimmed and faulted back in,
/// page by page, at the next step:
/// - at a 1024-token context a 890M-parameter MoE decoded at 10 tokens/s instead of 25-29,
///   depending on what had run before;
/// - a `[2048, 512] x [512, 2048]` matmul on flex took 36 ms instead of 25 (8,200 page faults a
///   call), and 100 training steps of the default model took 8% longer (docs/benchmarks.md).
///
/// Allocations below 64 MiB then come from the heap, and up to 128 MiB of freed heap is kept
/// (1 GiB kept decode as fast but raised the peak memory under an expert budget by 12%). The
/// `moe` binary calls it for every command that runs a model.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

/// Single-thread pools, one per core, built on first use (with the core count of that call).
fn core_pools(cores: usize) -> &'static [ThreadPool] {
    static POOLS: OnceLock<Vec<ThreadPool>> = OnceLock::new();
    POOLS.get_or_init(|| {
        (0..cores)
            .map(|i| {
                ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("moe-core-{i}"))
                    .build()
                    .expect("a one-thread rayon pool")
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_item_order_and_workers_are_single_threaded() {
        let items: Vec<usize> = (0..100).collect();
        let out = map_on_cores(&items, |&i| (i * i, rayon::current_num_threads()));
        assert_eq!(
            out.iter().map(|(sq, _)| *sq).collect::<Vec<_>>(),
            items.iter().map(|i| i * i).collect::<Vec<_>>()
        );
        if rayon::current_num_threads() > 1 {
            assert!(out.iter().all(|(_, threads)| *threads == 1));
        }
        // Nested calls run inline rather than waiting on the pools they occupy.
        let nested = map_on_cores(&[1, 2, 3], |&a| map_on_cores(&[10, 20], |&b| a * b));
        assert_eq!(nested, vec![vec![10, 20], vec![20, 40], vec![30, 60]]);
    }

    #[test]
    fn only_synchronous_host_devices_run_chains_on_cores() {
        assert!(runs_on_host(&Device::flex()));
        assert!(!runs_on_host(&Device::flex().autodiff()));
        #[allow(deprecated)] // ndarray stays a supported backend of this project
        let ndarray = Device::ndarray();
        assert!(runs_on_host(&ndarray));
        assert!(!runs_on_host(&ndarray.autodiff()));
        if let Some(wgpu) = crate::device::wgpu_adapters().into_iter().next() {
            assert!(!runs_on_host(&wgpu));
        }
    }
}
