//! The expert store: a model's routed experts under a memory budget.
//!
//! Every expert of every MoE layer is a unit with a home in the checkpoint's weights file, where
//! the stacked bank `[E, d, f]` keeps expert e's weights contiguous, so one expert is read
//! without the rest. At most `budget` bytes of experts are resident on the compute device, in
//! the dtype the model computes in; a routed expert that is not resident is read from the file
//! and may evict another, by LRU or LFU ([`moe_core::cache`]). Non-expert weights and shared
//! experts stay resident. Counts of hits, misses, bytes read and time spent reading are kept
//! for reports.
//!
//! Layers reach the store through [`moe_core::ExpertSource`]: a paged
//! [`Experts`](moe_core::Experts) bank leaves its parameters lazy and asks its source.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::quantization::QPARAM_ALIGN;
use burn::tensor::{Bytes, DType, TensorData};
use moe_core::cache::replay;
use moe_core::{CachePolicy, ExpertCache, ExpertKey, ExpertSource, ExpertWeights, WeightOrder};

use crate::error::{ModelError, Result};
use crate::quantize::quantized_bytes;
use crate::weights::on_device;

/// How a paged model keeps its experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreConfig {
    /// Bytes of routed-expert weights that may be resident on the compute device.
    pub budget_bytes: usize,
    /// Which resident expert a full budget gives up.
    pub policy: CachePolicy,
    /// Router look-ahead: before layer l runs, layer l+1's router is applied to layer l's input
    /// and the experts it picks are read on a background thread while layer l computes.
    pub prefetch: bool,
}

/// What the store did.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StoreStats {
    /// Expert uses served by a resident expert (prefetched ones included).
    pub hits: u64,
    /// Expert uses that had to read the expert (or wait for a prefetch under way).
    pub misses: u64,
    /// Bytes read from the file, prefetches included.
    pub bytes_fetched: u64,
    /// Seconds the forward pass waited for experts (its own reads and unfinished prefetches).
    pub stall_seconds: f64,
    /// Experts the budget holds.
    pub capacity: usize,
    /// Experts read ahead by the router look-ahead.
    pub prefetched: u64,
    /// Prefetched experts that were then used while still resident.
    pub prefetch_used: u64,
}

impl StoreStats {
    /// Hits over all uses.
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / (self.hits + self.misses).max(1) as f64
    }

    /// Share of prefetched experts that were used.
    pub fn prefetch_precision(&self) -> f64 {
        self.prefetch_used as f64 / self.prefetched.max(1) as f64
    }

    /// Share of the uses that would have missed without prefetching and hit because of it.
    pub fn prefetch_recall(&self) -> f64 {
        self.prefetch_used as f64 / (self.prefetch_used + self.misses).max(1) as f64
    }
}

/// One stacked weight of one layer, still in the file: `[E, rows, cols]` in `dtype`.
#[derive(Debug)]
pub(crate) struct ColdWeight {
    /// File-backed, never read whole: each expert is a window of it (two for quantised banks:
    /// its packed values and its block scales).
    pub bytes: Bytes,
    pub dtype: DType,
    pub experts: usize,
    pub rows: usize,
    pub cols: usize,
}

impl ColdWeight {
    /// Bytes `[start, end)` of the stored tensor, read from the file.
    fn window(&self, start: usize, end: usize) -> Result<Vec<u8>> {
        let view = self
            .bytes
            .view(start, end)
            .map_err(|err| ModelError::Config(format!("expert bytes cannot be read: {err:?}")))?;
        Ok(view.to_vec())
    }

    /// Expert e's stored bytes: its values, and for a quantised bank its block scales after
    /// them (aligned as Burn lays a quantised tensor out).
    fn expert_bytes(&self, e: usize) -> Result<Vec<u8>> {
        let n = self.rows * self.cols;
        let DType::QFloat(scheme) = self.dtype else {
            let size = n * self.dtype.size();
            return self.window(e * size, (e + 1) * size);
        };
        let (values, scales) = quantized_bytes(&scheme, n);
        let scales_start = (self.experts * values).next_multiple_of(QPARAM_ALIGN);
        let mut bytes = self.window(e * values, (e + 1) * values)?;
        bytes.resize(values.next_multiple_of(QPARAM_ALIGN), 0);
        let at = scales_start + e * scales;
        bytes.extend(self.window(at, at + scales)?);
        Ok(bytes)
    }

    /// Expert e's `[rows, cols]` block, read from the file, as `compute` on `device` (a
    /// quantised expert is dequantised on the host first).
    fn read(&self, e: usize, compute: DType, device: &Device) -> Result<(Tensor<2>, usize)> {
        let bytes = self.expert_bytes(e)?;
        let read = bytes.len();
        let data = TensorData::from_bytes_vec(bytes, [self.rows, self.cols], self.dtype);
        let tensor = on_device(data, device, Some(compute)).map_err(ModelError::Config)?;
        Ok((tensor, read))
    }
}

/// The three stacked weights of one layer's bank.
#[derive(Debug)]
pub(crate) struct ColdLayer {
    pub w_gate: ColdWeight,
    pub w_up: ColdWeight,
    pub w_down: ColdWeight,
}

#[derive(Debug)]
struct State {
    cache: ExpertCache,
    resident: HashMap<ExpertKey, ExpertWeights>,
    /// Resident experts a prefetch brought in and nobody has used yet.
    unused_prefetch: HashSet<ExpertKey>,
    /// Experts being read right now (by the forward pass or the prefetcher).
    loading: HashSet<ExpertKey>,
    /// Every expert the forward pass asked for, in order (the trace Belady replays).
    asked: Vec<ExpertKey>,
    stats: StoreStats,
}

/// What the store's threads share.
#[derive(Debug)]
struct Shared {
    layers: Vec<ColdLayer>,
    compute: DType,
    state: Mutex<State>,
    loaded: Condvar,
}

/// A message to the prefetch thread.
enum Request {
    /// Read expert `e` of layer `layer` onto `device`.
    Load(usize, usize, Device),
    /// Reply once every earlier request is done.
    Settle(Sender<()>),
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Load(layer, e, _) => write!(f, "Load({layer}, {e})"),
            Self::Settle(_) => write!(f, "Settle"),
        }
    }
}

/// The routed experts of a paged model, shared by its layers.
#[derive(Debug)]
pub struct ExpertStore {
    shared: Arc<Shared>,
    /// Requests to the prefetch thread; `None` without prefetching.
    prefetcher: Option<Mutex<Sender<Request>>>,
}

impl ExpertStore {
    /// A store over `layers` (one per MoE layer, in order) keeping at most `config.budget_bytes`
    /// of experts in `compute`. Refuses a budget below `top_k` experts: one token needs that
    /// many at once.
    pub(crate) fn new(
        layers: Vec<ColdLayer>,
        config: StoreConfig,
        compute: DType,
        top_k: usize,
    ) -> Result<Self> {
        let first = layers
            .first()
            .ok_or_else(|| ModelError::Config("the model has no MoE layer to page".into()))?;
        let expert_bytes = (2 * first.w_gate.rows * first.w_gate.cols
            + first.w_down.rows * first.w_down.cols)
            * compute.size();
        let capacity = config.budget_bytes / expert_bytes;
        if capacity < top_k {
            return Err(ModelError::Config(format!(
                "an expert budget of {} bytes holds {capacity} experts of {expert_bytes} bytes; \
                 one token needs its top-{top_k} at once, so the budget must be at least {} bytes",
                config.budget_bytes,
                top_k * expert_bytes
            )));
        }
        if config.policy == CachePolicy::Belady {
            return Err(ModelError::Config(
                "Belady's policy needs the future: use it in `moe cache-sim`, not to run".into(),
            ));
        }
        let shared = Arc::new(Shared {
            layers,
            compute,
            state: Mutex::new(State {
                cache: ExpertCache::new(config.policy, capacity),
                resident: HashMap::new(),
                unused_prefetch: HashSet::new(),
                loading: HashSet::new(),
                asked: Vec::new(),
                stats: StoreStats {
                    capacity,
                    ..StoreStats::default()
                },
            }),
            loaded: Condvar::new(),
        });
        let prefetcher = config.prefetch.then(|| {
            let (tx, rx) = channel::<Request>();
            let worker = shared.clone();
            // Ends when the store (the only sender) is dropped.
            std::thread::spawn(move || {
                for request in rx {
                    match request {
                        Request::Load(layer, e, device) => worker.prefetch(layer, e, &device),
                        Request::Settle(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
            Mutex::new(tx)
        });
        Ok(Self { shared, prefetcher })
    }

    /// Waits until the prefetches asked for so far are done (at once without prefetching).
    pub fn settle(&self) {
        if let Some(tx) = &self.prefetcher {
            let (done, wait) = channel();
            let sent = tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(Request::Settle(done));
            if sent.is_ok() {
                let _ = wait.recv();
            }
        }
    }

    /// What the store has done so far.
    pub fn stats(&self) -> StoreStats {
        self.shared.lock().stats
    }

    /// The hit rate Belady's optimal eviction would have reached on the experts asked for so
    /// far, with the same capacity and no prefetching: the upper bound to read
    /// [`StoreStats::hit_rate`] against.
    pub fn belady_hit_rate(&self) -> f64 {
        let state = self.shared.lock();
        let steps: Vec<Vec<ExpertKey>> = state.asked.iter().map(|&k| vec![k]).collect();
        replay(&steps, state.stats.capacity, CachePolicy::Belady).hit_rate()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Expert `e` of layer `layer`, read from the file (no lock held).
    fn read(&self, layer: usize, e: usize, device: &Device) -> (ExpertWeights, u64) {
        let cold = &self.layers[layer];
        let read = |w: &ColdWeight| {
            w.read(e, self.compute, device)
                .unwrap_or_else(|err| panic!("layer {layer}: {err}"))
        };
        let (w_gate, a) = read(&cold.w_gate);
        let (w_up, b) = read(&cold.w_up);
        let (w_down, c) = read(&cold.w_down);
        // The file's order: transposing each fetch would cost more than it saves on a miss.
        let weights = ExpertWeights {
            w_gate,
            w_up,
            w_down,
            order: WeightOrder::InOut,
        };
        (weights, (a + b + c) as u64)
    }

    /// Makes `key` resident: a use by the cache's policy, evicting what it says.
    fn admit(state: &mut State, key: ExpertKey) -> bool {
        let (hits, evicted) = state.cache.access(&[key]);
        for old in evicted {
            state.resident.remove(&old);
            state.unused_prefetch.remove(&old);
        }
        hits[0]
    }

    /// Expert `e` of MoE layer `layer` on `device` for the forward pass: resident, being
    /// prefetched (waited for), or read now.
    fn get(&self, layer: usize, e: usize, device: &Device) -> ExpertWeights {
        let key = (layer as u32, e as u32);
        let start = Instant::now();
        let mut state = self.lock();
        state.asked.push(key);
        let mut waited = false;
        while state.loading.contains(&key) {
            waited = true;
            state = self.loaded.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let hit = Self::admit(&mut state, key);
        if hit && let Some(w) = state.resident.get(&key).cloned() {
            if state.unused_prefetch.remove(&key) && !waited {
                state.stats.prefetch_used += 1;
            }
            if waited {
                state.stats.misses += 1;
                state.stats.stall_seconds += start.elapsed().as_secs_f64();
            } else {
                state.stats.hits += 1;
            }
            return w;
        }
        state.loading.insert(key);
        drop(state);
        let (weights, bytes) = self.read(layer, e, device);
        let mut state = self.lock();
        state.loading.remove(&key);
        state.stats.misses += 1;
        state.stats.bytes_fetched += bytes;
        state.stats.stall_seconds += start.elapsed().as_secs_f64();
        if state.cache.contains(key) {
            state.resident.insert(key, weights.clone());
        }
        self.loaded.notify_all();
        weights
    }

    /// Reads expert `e` of `layer` ahead of its use, unless it is resident or being read.
    fn prefetch(&self, layer: usize, e: usize, device: &Device) {
        let key = (layer as u32, e as u32);
        let mut state = self.lock();
        if state.cache.contains(key) || state.loading.contains(&key) {
            return;
        }
        state.loading.insert(key);
        drop(state);
        let (weights, bytes) = self.read(layer, e, device);
        let mut state = self.lock();
        state.loading.remove(&key);
        Self::admit(&mut state, key);
        state.resident.insert(key, weights);
        state.unused_prefetch.insert(key);
        state.stats.prefetched += 1;
        state.stats.bytes_fetched += bytes;
        self.loaded.notify_all();
    }
}

/// One layer's view of the store.
#[derive(Debug)]
pub(crate) struct LayerSource {
    pub store: Arc<ExpertStore>,
    pub layer: usize,
}

impl ExpertSource for LayerSource {
    fn expert(&self, e: usize, device: &Device) -> ExpertWeights {
        self.store.shared.get(self.layer, e, device)
    }

    fn prefetches(&self) -> bool {
        self.store.prefetcher.is_some()
    }

    fn prefetch(&self, experts: &[usize], device: &Device) {
        if let Some(tx) = &self.store.prefetcher {
            let tx = tx.lock().unwrap_or_else(|p| p.into_inner());
            for &e in experts {
                // A send fails only once the worker is gone, with the store: nothing to do.
                let _ = tx.send(Request::Load(self.layer, e, device.clone()));
            }
        }
    }
}

/// Parses a size: bytes, or with a unit `KiB`, `MiB`, `GiB` (powers of 1024) or `KB`, `MB`,
/// `GB` (powers of 1000), e.g. `512MiB`.
pub fn parse_size(text: &str) -> std::result::Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => {
            return Err(format!(
                "'{text}': unknown size unit '{unit}' (use KiB, MiB, GiB)"
            ));
        }
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a size such as 512MiB"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("'{text}' is not a size such as 512MiB"));
    }
    Ok((value * scale) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("-1MiB").is_err());
    }
}
