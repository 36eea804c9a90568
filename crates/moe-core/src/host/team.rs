//! Worker threads that stay awake between jobs, so that handing a job to another core costs
//! about a microsecond instead of a wake-up.
//!
//! A sleeping thread takes 40-50 µs to wake on the 2-core guests this project is measured on
//! (a rayon `join` from outside the pool: 14 µs back to back, 54 µs after a 300 µs pause;
//! docs/benchmarks.md), about a fifth of one expert's matrix-vector products in a decode step.
//! Each worker here spins for a while after its last job, as long as the job's caller asked
//! (yielding its core to any other runnable thread after [`SPIN_ALONE`]), then parks until the
//! next.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use rayon::{ThreadPool, ThreadPoolBuilder};

/// How long a worker (or a caller waiting for workers) spins without yielding its core.
const SPIN_ALONE: Duration = Duration::from_micros(50);

/// Spin iterations between two looks at the clock.
const SPINS_PER_CHECK: u32 = 64;

/// A job: the caller's closure, its lifetime erased. Valid until every worker has finished it,
/// which [`Team::run`] waits for before it returns or unwinds.
#[derive(Clone, Copy)]
struct JobRef(*const (dyn Fn() + Sync));

// SAFETY: the closure is `Sync`, and `Team::run` keeps it alive while any worker may call it.
unsafe impl Send for JobRef {}

/// What the caller and the workers share.
struct Shared {
    /// Bumped by the caller for each job.
    epoch: AtomicU64,
    /// The current job.
    job: Mutex<Option<JobRef>>,
    /// Workers yet to finish the current job.
    running: AtomicUsize,
    /// How long, in nanoseconds, the workers spin for the next job after the current one.
    linger: AtomicU64,
    /// The first panic of a worker in the current job.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Each worker: whether it is parked (or about to), and its thread, to unpark it.
    parked: Vec<(AtomicBool, OnceLock<Thread>)>,
}

/// `n` awake workers, each the only thread of its own rayon pool, so that rayon's parallel
/// operations inside a job run on that worker alone.
pub(super) struct Team {
    shared: Arc<Shared>,
    /// One caller at a time.
    busy: Mutex<()>,
}

impl Team {
    /// Starts `n` workers, named `{name}-1` to `{name}-n`.
    pub(super) fn new(n: usize, name: &'static str) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            running: AtomicUsize::new(0),
            linger: AtomicU64::new(0),
            panic: Mutex::new(None),
            parked: (0..n)
                .map(|_| (AtomicBool::new(false), OnceLock::new()))
                .collect(),
        });
        for i in 0..n {
            let pool = one_thread_pool(format!("{name}-{}", i + 1));
            let shared = shared.clone();
            pool.spawn(move || work(&shared, i));
            // The pool's thread runs `work` for the life of the process.
            std::mem::forget(pool);
        }
        Self {
            shared,
            busy: Mutex::new(()),
        }
    }

    /// Runs `job` on every worker and on the calling thread (`caller`), and returns once all
    /// have finished; a panic in any of them is resumed here, after all have finished. Then the
    /// workers spin for the next job for `linger` before they park. `None`, without running
    /// anything, while another call is using the team (another thread's, or one this thread
    /// is inside).
    pub(super) fn run(
        &self,
        job: &(dyn Fn() + Sync),
        caller: impl FnOnce(),
        linger: Duration,
    ) -> Option<()> {
        let one = match self.busy.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased; the workers call the job before `running`
        // reaches 0, which is waited for below, on every path out of this function.
        let erased: *const (dyn Fn() + Sync + 'static) = unsafe { std::mem::transmute(job) };
        *lock(&s.job) = Some(JobRef(erased));
        let nanos = u64::try_from(linger.as_nanos()).unwrap_or(u64::MAX);
        s.linger.store(nanos, Ordering::Relaxed);
        s.running.store(s.parked.len(), Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        for (parked, thread) in &s.parked {
            if parked.load(Ordering::SeqCst)
                && let Some(t) = thread.get()
            {
                t.unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(caller));
        spin_until(|| s.running.load(Ordering::Acquire) == 0, None);
        *lock(&s.job) = None;
        // Taken before the next caller can post a job whose panics would share the slot.
        let theirs = lock(&s.panic).take();
        drop(one);
        if let Some(p) = theirs {
            resume_unwind(p);
        }
        if let Err(p) = mine {
            resume_unwind(p);
        }
        Some(())
    }
}

/// A rayon pool of one thread named `name`: rayon's parallel operations started on it run on
/// that thread alone.
pub(super) fn one_thread_pool(name: String) -> ThreadPool {
    ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(move |_| name.clone())
        .build()
        .expect("a one-thread rayon pool")
}

/// Worker `i`'s loop: wait for a job, run it, report it done.
fn work(s: &Shared, i: usize) {
    let (parked, thread) = &s.parked[i];
    let _ = thread.set(std::thread::current());
    let mut seen = 0;
    loop {
        let fresh = || s.epoch.load(Ordering::Acquire) != seen;
        let linger = Duration::from_nanos(s.linger.load(Ordering::Relaxed));
        if !spin_until(fresh, Some(linger)) {
            parked.store(true, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen {
                std::thread::park();
            }
            parked.store(false, Ordering::SeqCst);
        }
        seen = s.epoch.load(Ordering::Acquire);
        let job = (*lock(&s.job)).expect("a job is posted before its epoch");
        // SAFETY: the caller keeps the job alive until `running` reaches 0 (`Team::run`).
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)() })) {
            lock(&s.panic).get_or_insert(p);
        }
        s.running.fetch_sub(1, Ordering::Release);
    }
}

/// Spins until `done()` holds (true) or `limit` has passed (false), yielding the core between
/// looks once [`SPIN_ALONE`] has passed.
fn spin_until(done: impl Fn() -> bool, limit: Option<Duration>) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..SPINS_PER_CHECK {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        let waited = start.elapsed();
        if limit.is_some_and(|l| waited > l) {
            return false;
        }
        if waited > SPIN_ALONE {
            std::thread::yield_now();
        }
    }
}

/// The mutex's value, also after a panic elsewhere poisoned it (the team catches every panic).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
impl Team {
    /// Whether a panic left the caller's lock poisoned.
    pub(super) fn is_poisoned(&self) -> bool {
        self.busy.is_poisoned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the threads that ran `job` once, the caller's share running it too.
    fn threads(team: &Team, linger: Duration) -> Vec<String> {
        let seen = Mutex::new(Vec::new());
        let job = || {
            let name = std::thread::current().name().unwrap_or("").to_string();
            lock(&seen).push(name);
        };
        team.run(&job, job, linger).expect("a free team");
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        seen
    }

    /// Every worker runs each job once, awake (back to back) or parked (after its linger).
    #[test]
    fn every_worker_runs_each_job_once() {
        let team = Team::new(2, "t-once");
        let me = std::thread::current().name().unwrap_or("").to_string();
        let mut want = vec![me, "t-once-1".to_string(), "t-once-2".to_string()];
        want.sort();
        for linger in [Duration::from_millis(50), Duration::ZERO] {
            for _ in 0..20 {
                assert_eq!(threads(&team, linger), want);
            }
            // Long enough for the workers to park.
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(threads(&team, linger), want);
        }
    }

    /// A panic on a worker, or in the caller's share, reaches the caller after every worker
    /// has finished, and the next job runs on the workers again.
    #[test]
    fn panics_reach_the_caller_and_the_team_carries_on() {
        let team = Team::new(1, "t-panic");
        let finished = AtomicUsize::new(0);
        let on_worker = || {
            let worker = std::thread::current().name() == Some("t-panic-1");
            assert!(!worker, "the worker's share fails");
            finished.fetch_add(1, Ordering::SeqCst);
        };
        let caught = catch_unwind(AssertUnwindSafe(|| team.run(&on_worker, || (), ZERO)));
        assert!(caught.is_err(), "a worker's panic is resumed in the caller");
        let slow = || std::thread::sleep(Duration::from_millis(20));
        let caught = catch_unwind(AssertUnwindSafe(|| {
            team.run(
                &|| {
                    slow();
                    finished.fetch_add(1, Ordering::SeqCst);
                },
                || panic!("the caller's share fails"),
                ZERO,
            )
        }));
        assert!(caught.is_err(), "the caller's panic is resumed");
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "the slow worker finished first"
        );
        assert!(!team.is_poisoned());
        let mut want = vec![
            std::thread::current().name().unwrap_or("").to_string(),
            "t-panic-1".to_string(),
        ];
        want.sort();
        assert_eq!(threads(&team, ZERO), want);
    }

    /// While one call is under way, another finds the team busy and runs nothing.
    #[test]
    fn a_second_caller_finds_the_team_busy() {
        let team = Team::new(1, "t-busy");
        let inner = std::cell::Cell::new(None);
        team.run(
            &|| (),
            || inner.set(Some(team.run(&|| (), || (), ZERO))),
            ZERO,
        )
        .expect("a free team");
        assert_eq!(inner.get(), Some(None));
    }

    const ZERO: Duration = Duration::ZERO;
}
