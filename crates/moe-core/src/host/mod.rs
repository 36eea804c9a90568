//! Independent chains of tensor ops spread over the host CPU's cores.
//!
//! Burn's CPU backends (flex, ndarray) run each op synchronously on the calling thread: a large
//! matmul is split across the rayon pool, element-wise ops run on one thread. A fine-grained
//! expert's matmul (tens of rows) is too small to split well, and its element-wise ops leave the
//! other cores idle. Whole expert chains run side by side instead, one worker per core with every
//! op inside single-threaded: the cores need no synchronisation within a chain, and each chain's
//! intermediates stay in its core's cache.

mod team;

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use burn::prelude::*;
use rayon::ThreadPool;

use team::{Team, one_thread_pool};

/// Whether ops on this device run synchronously on the calling host thread (flex and ndarray
/// without autodiff). Asynchronous devices (wgpu) already overlap queued work, and an autodiff
/// graph is recorded on one thread.
pub fn runs_on_host(device: &Device) -> bool {
    !device.is_autodiff() && crate::device::is_host_backend(device)
}

/// Where the calling thread's share of a [`map_on_cores`] call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerShare {
    /// On the calling thread itself: no hand-off, so it suits chains of small ops (a decode
    /// step's experts). The host kernels ([`crate::kernels`]) it calls stay on that thread
    /// ([`alone`]); an op Burn's CPU backend splits across its rayon pool (a large matmul) would
    /// still be split, competing with the workers for the cores. The workers then stay awake
    /// for [`LINGER`], for the next step's call.
    Inline,
    /// In a one-thread rayon pool of its own, so that every op inside stays on one thread
    /// whatever its size; handing the share over and back costs a wake-up each way (tens of
    /// microseconds), small against chains of large matmuls. The workers then park at once,
    /// leaving the cores to the large ops that follow (a prompt's attention).
    Pooled,
}

/// How long the workers stay awake after an inline call: longer than the gaps between a decode
/// step's expert phases (a layer's attention: 0.1-1.5 ms from batch 1 to 16), short enough not
/// to hold the cores long after generation ends.
pub const LINGER: Duration = Duration::from_millis(2);

thread_local! {
    /// Set while this thread runs its own share of a [`map_on_cores`] call inline, or all its
    /// items because the workers were busy with another thread's call.
    static SHARING: Cell<bool> = const { Cell::new(false) };
}

/// Whether host work started on this thread should stay on it: inside its inline share of a
/// [`map_on_cores`] call (or its items run here while the workers were busy), or in a pool of
/// one thread (a worker's share, or a pooled caller's share).
pub fn alone() -> bool {
    SHARING.get() || rayon::current_num_threads() < 2
}

/// `f` applied to every item, in item order. The items are taken in turn by the caller's share
/// (run as `share` says) and one worker for each other core of the rayon pool; inside `f` a
/// worker's rayon pool has one thread, so Burn's CPU ops do not split further. Within
/// [`LINGER`] of an inline call the workers are awake ([`team`]) and a call costs about a
/// microsecond more than its work; after a pooled call, or longer idle, it costs a wake-up
/// (25-65 µs here, docs/benchmarks.md). Runs on the calling thread alone when there are fewer
/// than two items or one core, when called from inside another `map_on_cores`, or while
/// another thread's call is using the workers (then as an inline share).
pub fn map_on_cores<T: Sync, R: Send>(
    items: &[T],
    share: CallerShare,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let cores = rayon::current_num_threads();
    if items.len() < 2 || alone() {
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
    let (team, caller_pool) = team_of(cores);
    let (caller, linger) = match share {
        CallerShare::Inline => (None, LINGER),
        CallerShare::Pooled => (Some(caller_pool), Duration::ZERO),
    };
    let ran = team.run(
        &work,
        || match caller {
            None => {
                let _sharing = Sharing::start();
                work()
            }
            Some(pool) => pool.install(work),
        },
        linger,
    );
    if ran.is_none() {
        // The workers are busy with another thread's call: the cores are taken, so this one's
        // kernels stay on this thread too.
        let _sharing = Sharing::start();
        return items.iter().map(f).collect();
    }
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// [`SHARING`] set until dropped (also when the share panics).
struct Sharing;

impl Sharing {
    fn start() -> Self {
        SHARING.set(true);
        Self
    }
}

impl Drop for Sharing {
    fn drop(&mut self) {
        SHARING.set(false);
    }
}

/// The workers for `cores` cores (one per core but the caller's), and the one-thread pool of
/// a [`CallerShare::Pooled`] share; built on first use, with the core count of that call.
fn team_of(cores: usize) -> &'static (Team, ThreadPool) {
    static TEAM: OnceLock<(Team, ThreadPool)> = OnceLock::new();
    TEAM.get_or_init(|| {
        let caller = one_thread_pool("moe-core-0".into());
        (Team::new(cores - 1, "moe-core"), caller)
    })
}

/// Multiply-adds of one matmul from which flex splits it across the rayon pool itself
/// (burn-flex's `PARALLEL_THRESHOLD`, 192^3).
pub const INLINE_MAX_MACS: usize = 192 * 192 * 192;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_item_order_and_every_share_stays_on_its_thread() {
        let items: Vec<usize> = (0..100).collect();
        for share in [CallerShare::Inline, CallerShare::Pooled] {
            let out = map_on_cores(&items, share, |&i| (i * i, alone()));
            assert_eq!(
                out.iter().map(|(sq, _)| *sq).collect::<Vec<_>>(),
                items.iter().map(|i| i * i).collect::<Vec<_>>(),
                "{share:?}"
            );
            assert!(out.iter().all(|(_, alone)| *alone), "{share:?}");
            assert!(!SHARING.get(), "{share:?}: the caller's flag is cleared");
            // Nested calls run inline rather than waiting on the workers they occupy.
            let nested = map_on_cores(&[1, 2, 3], share, |&a| {
                map_on_cores(&[10, 20], share, |&b| a * b)
            });
            assert_eq!(nested, vec![vec![10, 20], vec![20, 40], vec![30, 60]]);
        }
    }

    #[test]
    fn a_panic_in_any_share_reaches_the_caller_and_the_workers_carry_on() {
        for share in [CallerShare::Inline, CallerShare::Pooled] {
            for bad in [0, 1, 7] {
                let items: Vec<usize> = (0..8).collect();
                let caught = std::panic::catch_unwind(|| {
                    map_on_cores(&items, share, |&i| {
                        assert_ne!(i, bad, "item {bad} fails");
                        i
                    })
                });
                assert!(caught.is_err(), "{share:?}, item {bad}");
                assert!(!SHARING.get());
                if rayon::current_num_threads() > 1 {
                    // Not left poisoned by the panic passing through the caller's lock.
                    let team = &team_of(rayon::current_num_threads()).0;
                    assert!(!team.is_poisoned());
                }
                assert_eq!(
                    map_on_cores(&items, share, |&i| i + 1),
                    (1..9).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn calls_from_several_threads_at_once_all_complete() {
        let results: Vec<Vec<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    s.spawn(move || {
                        let items: Vec<usize> = (0..50).collect();
                        (0..20)
                            .flat_map(|_| map_on_cores(&items, CallerShare::Inline, |&i| i * t))
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (t, r) in results.iter().enumerate() {
            let want: Vec<usize> = (0..20).flat_map(|_| (0..50).map(move |i| i * t)).collect();
            assert_eq!(r, &want);
        }
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
