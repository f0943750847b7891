//! A fixed pool of worker threads with a low-latency parallel-for.
//!
//! The decode loop runs a parallel-for a few hundred times per token, so dispatch and join must
//! cost microseconds: workers spin on a generation counter for a while after each job (the next
//! one usually follows within microseconds) and only then park. The calling thread takes tasks
//! too, so a pool of `n` threads starts `n - 1` workers.
//!
//! A job is open from its publication until the caller has finished its share of tasks; a worker
//! that arrives after that (descheduled, or still parked) skips the job instead of being waited
//! for. The caller returns only when every worker that joined has left, which is what makes it
//! sound for tasks to borrow the caller's stack.
//!
//! Panics in tasks: the other tasks still run, the pool stays usable, and the first panic is
//! resumed on the caller once the job is over. `run` called from inside a task, or from two
//! threads at once, runs the inner (or second) job on the calling thread alone instead of
//! deadlocking.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking, by default.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

// `state` packs: bits 0..24 workers inside the job, bit 24 closed, bits 25.. generation.
const COUNT_MASK: u64 = (1 << 24) - 1;
const CLOSED: u64 = 1 << 24;
const GEN_ONE: u64 = 1 << 25;

type Payload = Box<dyn Any + Send + 'static>;

/// One published job. Lives on the caller's stack for the duration of `run`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n_tasks: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Payload>>,
}

impl Job<'_> {
    /// Takes tasks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n_tasks {
                return;
            }
            if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| (self.f)(i))) {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
        }
    }
}

struct Shared {
    state: AtomicU64,
    job: AtomicPtr<Job<'static>>,
    shutdown: AtomicBool,
    /// Set by [`ThreadPool::rest`]: idle workers park now instead of spinning.
    rest: AtomicBool,
    sleeping: Vec<AtomicBool>,
    spin: Duration,
}

/// A fixed set of worker threads plus the caller. See the module docs.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<(JoinHandle<()>, Thread)>,
    busy: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool").field("n_threads", &self.n_threads()).finish()
    }
}

impl ThreadPool {
    /// A pool running jobs on `n_threads` threads (the caller and `n_threads - 1` workers);
    /// 0 is taken as 1.
    pub fn new(n_threads: usize) -> ThreadPool {
        ThreadPool::with_spin(n_threads, DEFAULT_SPIN)
    }

    /// As [`ThreadPool::new`], with idle workers spinning for `spin` before parking.
    pub fn with_spin(n_threads: usize, spin: Duration) -> ThreadPool {
        let n_workers = n_threads.max(1) - 1;
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            shutdown: AtomicBool::new(false),
            rest: AtomicBool::new(false),
            sleeping: (0..n_workers).map(|_| AtomicBool::new(false)).collect(),
            spin,
        });
        let workers = (0..n_workers)
            .map(|i| {
                let s = Arc::clone(&shared);
                let h = thread::Builder::new()
                    .name(format!("unicorn-kernel-{}", i + 1))
                    .spawn(move || worker(&s, i))
                    .expect("spawning a kernel worker thread");
                let t = h.thread().clone();
                (h, t)
            })
            .collect();
        ThreadPool { shared, workers, busy: Mutex::new(()) }
    }

    /// A pool of [`default_threads`] threads.
    pub fn with_default_threads() -> ThreadPool {
        ThreadPool::new(default_threads())
    }

    /// Threads that run a job, the caller included.
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0) .. f(n_tasks - 1)` across the pool and returns when all have finished.
    /// Tasks are handed out dynamically in index order, so uneven tasks balance.
    ///
    /// # Panics
    ///
    /// Resumes the first panic of any task, after all tasks have run.
    pub fn run<F: Fn(usize) + Sync>(&self, n_tasks: usize, f: F) {
        if n_tasks == 0 {
            return;
        }
        let guard = if n_tasks == 1 || self.workers.is_empty() {
            None
        } else {
            match self.busy.try_lock() {
                Ok(g) => Some(g),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            }
        };
        let Some(guard) = guard else {
            // One task, no workers, a nested call or a concurrent one: run here.
            for i in 0..n_tasks {
                f(i);
            }
            return;
        };
        let job = Job { f: &f, n_tasks, next: AtomicUsize::new(0), panic: Mutex::new(None) };
        let sh = &*self.shared;
        sh.rest.store(false, Ordering::Relaxed);
        let ptr: *const Job<'_> = &job;
        sh.job.store(ptr.cast_mut().cast(), Ordering::Release);
        // Open the next generation with nobody inside.
        let gen = (sh.state.load(Ordering::Relaxed) & !(COUNT_MASK | CLOSED)) + GEN_ONE;
        sh.state.store(gen, Ordering::SeqCst);
        for (i, (_, t)) in self.workers.iter().enumerate() {
            // Pairs with the worker's SeqCst store of `sleeping` then load of `state`: either it
            // sees the new generation, or we see it asleep and wake it.
            if sh.sleeping[i].load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        job.work();
        // Close the job to latecomers, then wait for those inside to leave.
        let mut s = sh.state.fetch_or(CLOSED, Ordering::AcqRel) | CLOSED;
        let start = Instant::now();
        while s & COUNT_MASK != 0 {
            if start.elapsed() < Duration::from_micros(50) {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
            s = sh.state.load(Ordering::Acquire);
        }
        sh.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        drop(guard);
        let p = job.panic.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = p {
            panic::resume_unwind(p);
        }
    }

    /// Tells idle workers to park now rather than spin for the next job: for a caller that
    /// knows the next job is far off (the daemon between steps, waiting for its clients), so
    /// that spinning workers do not take the cores those clients need. The next [`run`] wakes
    /// them as usual.
    ///
    /// [`run`]: ThreadPool::run
    pub fn rest(&self) {
        self.shared.rest.store(true, Ordering::Relaxed);
    }

    /// Splits `0..n` into at most `n_chunks` contiguous ranges of near-equal size and runs
    /// `f(range)` for each across the pool.
    pub fn run_chunks<F: Fn(std::ops::Range<usize>) + Sync>(
        &self,
        n: usize,
        n_chunks: usize,
        f: F,
    ) {
        let n_chunks = n_chunks.clamp(1, n.max(1));
        let (q, rem) = (n / n_chunks, n % n_chunks);
        let start = |i: usize| i * q + i.min(rem);
        self.run(n_chunks, |i| {
            let r = start(i)..start(i + 1);
            if !r.is_empty() {
                f(r)
            }
        });
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let sh = &*self.shared;
        sh.shutdown.store(true, Ordering::SeqCst);
        let gen = (sh.state.load(Ordering::Relaxed) & !(COUNT_MASK | CLOSED)) + GEN_ONE;
        sh.state.store(gen | CLOSED, Ordering::SeqCst);
        for (_, t) in &self.workers {
            t.unpark();
        }
        for (h, _) in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(sh: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for a generation we have not seen.
        let mut spun_since = Instant::now();
        let mut polls = 0u32;
        let s = loop {
            let s = sh.state.load(Ordering::Acquire);
            if s & !(COUNT_MASK | CLOSED) != seen {
                break s;
            }
            polls = polls.wrapping_add(1);
            let resting = sh.rest.load(Ordering::Relaxed);
            if !polls.is_multiple_of(64) || (!resting && spun_since.elapsed() < sh.spin) {
                std::hint::spin_loop();
                continue;
            }
            sh.sleeping[index].store(true, Ordering::SeqCst);
            if sh.state.load(Ordering::SeqCst) & !(COUNT_MASK | CLOSED) == seen {
                thread::park();
            }
            sh.sleeping[index].store(false, Ordering::Relaxed);
            spun_since = Instant::now();
        };
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        let gen = s & !(COUNT_MASK | CLOSED);
        seen = gen;
        // Join unless the job is already closed (or superseded).
        let mut cur = s;
        let joined = loop {
            if cur & !(COUNT_MASK | CLOSED) != gen || cur & CLOSED != 0 {
                break false;
            }
            match sh.state.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break true,
                Err(now) => cur = now,
            }
        };
        if !joined {
            continue;
        }
        let ptr = sh.job.load(Ordering::Acquire);
        // SAFETY: we are counted inside the open generation `gen`, whose job pointer was stored
        // before the generation was published; the caller keeps the job alive until the count
        // drops to zero, which happens only after our last use below.
        let job = unsafe { &*ptr };
        job.work();
        sh.state.fetch_sub(1, Ordering::Release);
    }
}

/// The default thread count: the number of physical cores this process may run on.
///
/// Counts distinct `core_cpus_list` (or `thread_siblings_list`) entries under
/// `/sys/devices/system/cpu`, capped by [`std::thread::available_parallelism`] (which honours
/// affinity masks and cgroup quotas); falls back to the latter where sysfs is unreadable.
pub fn default_threads() -> usize {
    let logical = thread::available_parallelism().map_or(1, |n| n.get());
    physical_cores().map_or(logical, |p| p.min(logical)).max(1)
}

fn physical_cores() -> Option<usize> {
    let mut cores = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir("/sys/devices/system/cpu").ok()? {
        let entry = entry.ok()?;
        let name = entry.file_name();
        let name = name.to_str()?;
        let Some(num) = name.strip_prefix("cpu") else {
            continue;
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let topo = entry.path().join("topology");
        let list = std::fs::read_to_string(topo.join("core_cpus_list"))
            .or_else(|_| std::fs::read_to_string(topo.join("thread_siblings_list")));
        if let Ok(list) = list {
            cores.insert(list.trim().to_string());
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn runs_every_task_once() {
        for n_threads in [1, 2, 3, 5] {
            let pool = ThreadPool::new(n_threads);
            assert_eq!(pool.n_threads(), n_threads);
            for n in [0, 1, 2, 7, 100] {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                pool.run(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn stress_many_short_jobs() {
        let pool = ThreadPool::new(3);
        let total = AtomicUsize::new(0);
        for round in 0..20_000usize {
            let n = 1 + round % 5;
            pool.run(n, |i| {
                total.fetch_add(i + 1, Ordering::Relaxed);
            });
        }
        let want: usize = (0..20_000usize).map(|r| (1..=1 + r % 5).sum::<usize>()).sum();
        assert_eq!(total.load(Ordering::Relaxed), want);
    }

    #[test]
    fn stress_with_parked_workers() {
        // A zero spin parks workers after every job, exercising the wake-up path.
        let pool = ThreadPool::with_spin(3, Duration::ZERO);
        let total = AtomicUsize::new(0);
        for _ in 0..2_000 {
            pool.run(4, |_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
            if total.load(Ordering::Relaxed).is_multiple_of(400) {
                thread::sleep(Duration::from_micros(200));
            }
        }
        assert_eq!(total.load(Ordering::Relaxed), 8_000);
    }

    #[test]
    fn rest_parks_spinning_workers_and_the_next_job_wakes_them() {
        // Workers that would spin for an hour park at once after `rest`.
        let pool = ThreadPool::with_spin(3, Duration::from_secs(3600));
        let count = AtomicU32::new(0);
        pool.run(8, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        let all_asleep = || pool.shared.sleeping.iter().all(|s| s.load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!all_asleep(), "workers parked without rest");
        pool.rest();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_asleep() {
            assert!(Instant::now() < deadline, "workers still spinning after rest");
            std::thread::sleep(Duration::from_millis(1));
        }
        let busy = std::sync::Mutex::new(std::collections::HashSet::new());
        pool.run(64, |_| {
            busy.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(Duration::from_millis(1));
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 72);
        assert!(busy.lock().unwrap().len() > 1, "the parked workers did not take tasks");
    }

    #[test]
    fn tasks_borrow_the_callers_stack_and_write_disjoint_chunks() {
        let pool = ThreadPool::new(2);
        let mut out = vec![0usize; 1000];
        let chunks: Vec<Mutex<&mut [usize]>> = out.chunks_mut(64).map(Mutex::new).collect();
        pool.run(chunks.len(), |i| {
            for (j, v) in chunks[i].lock().unwrap().iter_mut().enumerate() {
                *v = i * 64 + j;
            }
        });
        drop(chunks);
        assert!(out.iter().enumerate().all(|(i, &v)| i == v));
    }

    #[test]
    fn panics_propagate_after_all_tasks_and_pool_survives() {
        let pool = ThreadPool::new(3);
        let ran = AtomicUsize::new(0);
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(50, |i| {
                ran.fetch_add(1, Ordering::Relaxed);
                if i == 7 {
                    panic!("task seven");
                }
            })
        }));
        let msg = r.unwrap_err().downcast::<&str>().unwrap();
        assert_eq!(*msg, "task seven");
        assert_eq!(ran.load(Ordering::Relaxed), 50);
        let again = AtomicUsize::new(0);
        pool.run(10, |_| {
            again.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(again.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn nested_and_concurrent_runs_complete() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        pool.run(4, |_| {
            pool.run(3, |_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
        thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..500 {
                        pool.run(3, |_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 12 + 3000);
    }

    #[test]
    fn run_chunks_covers_the_range_exactly() {
        let pool = ThreadPool::new(2);
        for (n, k) in [(10, 3), (3, 10), (0, 4), (1000, 7)] {
            let seen: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            let calls = AtomicUsize::new(0);
            pool.run_chunks(n, k, |r| {
                calls.fetch_add(1, Ordering::Relaxed);
                assert!(r.len() >= n / k && r.len() <= n / k + 1);
                for i in r {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
            assert!(calls.load(Ordering::Relaxed) <= k);
        }
    }

    #[test]
    fn default_threads_is_sane() {
        let n = default_threads();
        let logical = thread::available_parallelism().map_or(1, |n| n.get());
        assert!(n >= 1 && n <= logical, "{n} of {logical}");
    }
}
