//! Expert caches: which routed experts stay resident under a budget, by policy, and a replay of
//! recorded routing that gives each policy's hit rate.
//!
//! A key is one expert of one layer. A *step* is the set of experts one layer needs for one
//! token (its top-k); all of them must be resident at once, so a cache holds at least the
//! largest step. On a miss the policy picks a victim among the resident experts the step does
//! not use:
//! - **LRU**: the one used longest ago;
//! - **LFU**: the one used least often since it was loaded (ties: longest ago);
//! - **Belady**: the one whose next use lies farthest ahead (or never comes). It needs the
//!   future, so it only replays traces; it is the upper bound on any policy's hit rate.

use std::collections::{BTreeSet, HashMap};

/// An expert of a layer: `(layer, expert)`.
pub type ExpertKey = (u32, u32);

/// Which resident expert a full cache gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CachePolicy {
    /// Least recently used.
    Lru,
    /// Least frequently used, ties broken by recency.
    Lfu,
    /// Farthest next use (needs the whole trace).
    Belady,
}

impl CachePolicy {
    /// The policy named `lru`, `lfu` or `belady`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "lru" => Some(Self::Lru),
            "lfu" => Some(Self::Lfu),
            "belady" => Some(Self::Belady),
            _ => None,
        }
    }

    /// The policy's name, as [`parse`](Self::parse) reads it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::Lfu => "lfu",
            Self::Belady => "belady",
        }
    }
}

/// Hits and misses of a replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Expert uses served from the cache.
    pub hits: u64,
    /// Expert uses that had to load the expert.
    pub misses: u64,
}

impl CacheStats {
    /// Hits over all uses (0 for an empty trace).
    pub fn hit_rate(&self) -> f64 {
        let all = self.hits + self.misses;
        if all == 0 {
            0.0
        } else {
            self.hits as f64 / all as f64
        }
    }
}

/// An online cache of at most `capacity` experts under LRU or LFU: what an expert store runs.
#[derive(Debug, Clone)]
pub struct ExpertCache {
    policy: CachePolicy,
    capacity: usize,
    /// Resident key -> (last use, uses).
    resident: HashMap<ExpertKey, (u64, u64)>,
    /// Resident keys ordered by the policy's eviction rank (lowest goes first).
    order: BTreeSet<((u64, u64), ExpertKey)>,
    clock: u64,
}

impl ExpertCache {
    /// A cache of `capacity` experts. Belady needs the future: use [`replay`] for it.
    ///
    /// # Panics
    /// If `policy` is [`CachePolicy::Belady`].
    pub fn new(policy: CachePolicy, capacity: usize) -> Self {
        assert!(
            policy != CachePolicy::Belady,
            "Belady's policy needs the future; replay a trace instead"
        );
        Self {
            policy,
            capacity,
            resident: HashMap::new(),
            order: BTreeSet::new(),
            clock: 0,
        }
    }

    fn rank(&self, (last, uses): (u64, u64)) -> (u64, u64) {
        match self.policy {
            CachePolicy::Lfu => (uses, last),
            _ => (last, 0),
        }
    }

    /// Whether `key` is resident.
    pub fn contains(&self, key: ExpertKey) -> bool {
        self.resident.contains_key(&key)
    }

    /// Uses the experts of one step: returns, per key, whether it was a hit, and the keys
    /// evicted to make room. Keys of the step are never evicted by it.
    ///
    /// # Panics
    /// If the step holds more distinct experts than the capacity.
    pub fn access(&mut self, step: &[ExpertKey]) -> (Vec<bool>, Vec<ExpertKey>) {
        let mut hits = Vec::with_capacity(step.len());
        let mut evicted = Vec::new();
        self.clock += 1;
        for &key in step {
            let hit = self.resident.contains_key(&key);
            hits.push(hit);
            if !hit {
                if self.resident.len() >= self.capacity {
                    let victim = self
                        .order
                        .iter()
                        .map(|&(_, k)| k)
                        .find(|k| !step.contains(k))
                        .expect("a step larger than the cache");
                    let entry = self.resident.remove(&victim).expect("resident");
                    self.order.remove(&(self.rank(entry), victim));
                    evicted.push(victim);
                }
                self.resident.insert(key, (self.clock, 0));
                self.order.insert((self.rank((self.clock, 0)), key));
            }
            let entry = self.resident[&key];
            self.order.remove(&(self.rank(entry), key));
            let used = (self.clock, entry.1 + 1);
            self.resident.insert(key, used);
            self.order.insert((self.rank(used), key));
        }
        (hits, evicted)
    }
}

/// Replays `steps` (each the experts of one layer for one token, in execution order) through a
/// cache of `capacity` experts under `policy`.
///
/// # Panics
/// If a step holds more distinct experts than `capacity`.
pub fn replay(steps: &[Vec<ExpertKey>], capacity: usize, policy: CachePolicy) -> CacheStats {
    let mut stats = CacheStats::default();
    match policy {
        CachePolicy::Belady => belady(steps, capacity, &mut stats),
        _ => {
            let mut cache = ExpertCache::new(policy, capacity);
            for step in steps {
                for hit in cache.access(step).0 {
                    if hit {
                        stats.hits += 1;
                    } else {
                        stats.misses += 1;
                    }
                }
            }
        }
    }
    stats
}

/// Belady's optimal eviction: the victim is the resident expert used again farthest ahead.
fn belady(steps: &[Vec<ExpertKey>], capacity: usize, stats: &mut CacheStats) {
    // next[i][j]: the step where steps[i][j] is used next after step i (usize::MAX: never).
    let mut next_use: HashMap<ExpertKey, usize> = HashMap::new();
    let mut next = vec![Vec::new(); steps.len()];
    for (i, step) in steps.iter().enumerate().rev() {
        next[i] = step
            .iter()
            .map(|k| next_use.get(k).copied().unwrap_or(usize::MAX))
            .collect();
        for &k in step {
            next_use.insert(k, i);
        }
    }
    // Resident keys by their next use, farthest last.
    let mut resident: HashMap<ExpertKey, usize> = HashMap::new();
    let mut by_next: BTreeSet<(usize, ExpertKey)> = BTreeSet::new();
    for (i, step) in steps.iter().enumerate() {
        for (j, &key) in step.iter().enumerate() {
            if let Some(old) = resident.remove(&key) {
                by_next.remove(&(old, key));
                stats.hits += 1;
            } else {
                stats.misses += 1;
                if resident.len() >= capacity {
                    let &(when, victim) = by_next
                        .iter()
                        .rev()
                        .find(|(_, k)| !step.contains(k))
                        .expect("a step larger than the cache");
                    by_next.remove(&(when, victim));
                    resident.remove(&victim);
                }
            }
            resident.insert(key, next[i][j]);
            by_next.insert((next[i][j], key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn steps(ids: &[&[u32]]) -> Vec<Vec<ExpertKey>> {
        ids.iter()
            .map(|s| s.iter().map(|&e| (0, e)).collect())
            .collect()
    }

    /// The textbook sequence 1 2 3 4 1 2 5 1 2 3 4 5 with 3 slots: LRU 2 hits, Belady 5.
    #[test]
    fn textbook_sequence() {
        let seq: Vec<&[u32]> = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
            .iter()
            .map(std::slice::from_ref)
            .collect();
        let s = steps(&seq);
        assert_eq!(replay(&s, 3, CachePolicy::Lru).hits, 2);
        assert_eq!(replay(&s, 3, CachePolicy::Belady).hits, 5);
        assert_eq!(replay(&s, 4, CachePolicy::Belady).hits, 6);
        // LFU counts uses while resident: 1 and 2 reach two uses only once 5 has arrived.
        assert_eq!(replay(&s, 3, CachePolicy::Lfu).hits, 2);
    }

    /// A step's own experts are never its victims: with room for exactly one step, a repeated
    /// step always hits.
    #[test]
    fn a_step_never_evicts_its_own_experts() {
        let s = steps(&[&[1, 2], &[3, 1], &[3, 1], &[2, 4]]);
        for policy in [CachePolicy::Lru, CachePolicy::Lfu, CachePolicy::Belady] {
            let stats = replay(&s, 2, policy);
            assert_eq!(stats.hits, 3, "{policy:?}"); // 1 in step 2, 3 and 1 in step 3
            assert_eq!(stats.misses, 5, "{policy:?}");
        }
    }

    fn trace() -> impl Strategy<Value = Vec<Vec<ExpertKey>>> {
        prop::collection::vec(
            (0u32..3, prop::collection::btree_set(0u32..8, 1..=2)),
            1..120,
        )
        .prop_map(|s| {
            s.into_iter()
                .map(|(layer, set)| set.into_iter().map(|e| (layer, e)).collect())
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Belady is the upper bound; every use is a hit or a miss; a cache that holds every
        /// expert misses each only once.
        #[test]
        fn belady_bounds_the_online_policies(steps in trace(), capacity in 2usize..12) {
            let uses: u64 = steps.iter().map(|s| s.len() as u64).sum();
            let best = replay(&steps, capacity, CachePolicy::Belady);
            for policy in [CachePolicy::Lru, CachePolicy::Lfu] {
                let s = replay(&steps, capacity, policy);
                prop_assert_eq!(s.hits + s.misses, uses);
                prop_assert!(s.hits <= best.hits, "{:?} {} > belady {}", policy, s.hits, best.hits);
            }
            let distinct = steps.iter().flatten().collect::<std::collections::HashSet<_>>().len();
            for policy in [CachePolicy::Lru, CachePolicy::Lfu, CachePolicy::Belady] {
                let all = replay(&steps, distinct.max(2), policy);
                prop_assert_eq!(all.misses, distinct as u64);
            }
        }
    }
}
