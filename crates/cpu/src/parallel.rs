//! Intra-op parallelism: how many threads a kernel may split its work over.
//!
//! Kernels split large work with rayon. A rayon parallel call made outside a rayon pool is
//! handed to the global pool's threads and the caller sleeps until they finish: two thread
//! wake-ups, which on a virtual machine cost 50–200 µs per inference — as much as a whole
//! small model. An execution context limited to one thread therefore runs its layers on
//! the caller's thread inside [`serial`], and every kernel asks [`threads`] (never
//! `rayon::current_num_threads` directly) whether it may split its work.

use std::cell::Cell;

thread_local! {
    /// True while this thread runs inside [`serial`].
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// The number of threads a kernel running on this thread may split its work over: 1 inside
/// [`serial`], otherwise the size of the rayon pool the thread runs in (the global pool
/// outside any pool).
pub fn threads() -> usize {
    if SERIAL.with(Cell::get) {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Whether a kernel on this thread may split its work ([`threads`] > 1).
pub fn enabled() -> bool {
    threads() > 1
}

/// Runs `f` on the calling thread with intra-op parallelism off: every kernel called from
/// `f` (on this thread) runs serially and enters no rayon pool. Nests; restores the previous
/// state when `f` returns or unwinds.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SERIAL.with(|s| s.replace(true)));
    f()
}

/// Runs `f` in `pool` with the pool's other threads kept awake until `f` returns.
///
/// rayon parks an idle worker after a few dozen empty polls; waking it for the next
/// layer's parallel loop costs a futex wake-up, which on a virtual machine with idle
/// vCPUs is 50–100 µs — longer than many layers. So while `f` runs, every other worker
/// runs a job that polls for work ([`rayon::yield_now`], yielding the CPU between empty
/// polls) instead of parking, as ONNX Runtime's spinning threads do; the polls stop when
/// `f` returns. The pollers are `join` halves (on the stack): nothing is allocated.
pub fn install_spinning<R: Send>(pool: &rayon::ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::AtomicBool;
    pool.install(|| {
        let done = AtomicBool::new(false);
        let owner = rayon::current_thread_index();
        let (r, ()) = rayon::join(
            || {
                let r = f();
                done.store(true, std::sync::atomic::Ordering::Release);
                r
            },
            || pollers(rayon::current_num_threads() - 1, &done, owner),
        );
        r
    })
}

/// `n` polling jobs (see [`install_spinning`]): this thread polls, the rest are offered to
/// the pool's other threads.
fn pollers(n: usize, done: &std::sync::atomic::AtomicBool, owner: Option<usize>) {
    use std::sync::atomic::Ordering;
    if n == 0 {
        return;
    }
    rayon::join(
        || {
            // The thread running `f` may take a poller back while it waits inside a
            // parallel loop: it must not poll there (`done` would never be set).
            if rayon::current_thread_index() == owner {
                return;
            }
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::thread::yield_now();
                }
            }
        },
        || pollers(n - 1, done, owner),
    );
}

/// Calls `f(i)` for every `i` in `0..n`: as rayon tasks when [`enabled`], else in order on
/// this thread.
pub fn for_each_index(n: usize, f: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    if n > 1 && enabled() {
        (0..n).into_par_iter().for_each(f);
    } else {
        (0..n).for_each(f);
    }
}

/// Calls `f(index, chunk)` for `dst` cut into `chunk`-long pieces (the last may be
/// shorter), stopping at the first error: as rayon tasks when [`enabled`], else in order on
/// this thread.
pub fn try_for_each_chunk_mut<T: Send, E: Send>(
    dst: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) -> Result<(), E> + Sync + Send,
) -> Result<(), E> {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    if dst.len() > chunk && enabled() {
        dst.par_chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(i, c)| f(i, c))
    } else {
        dst.chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(i, c)| f(i, c))
    }
}

/// Calls `f(dst_chunk, src_chunk)` over `dst` and `src` cut into `chunk`-long pieces (the
/// last may be shorter): as rayon tasks when [`enabled`], else in order on this thread.
pub fn for_each_chunk_pair<D: Send, S: Sync>(
    dst: &mut [D],
    src: &[S],
    chunk: usize,
    f: impl Fn(&mut [D], &[S]) + Sync + Send,
) {
    for_each_chunk_pair_indexed(dst, src, chunk, |_, d, s| f(d, s))
}

/// [`for_each_chunk_pair`] with the chunk's index: `f(i, dst chunk i, src chunk i)`.
pub fn for_each_chunk_pair_indexed<D: Send, S: Sync>(
    dst: &mut [D],
    src: &[S],
    chunk: usize,
    f: impl Fn(usize, &mut [D], &[S]) + Sync + Send,
) {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    if dst.len() > chunk && enabled() {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .enumerate()
            .for_each(|(i, (d, s))| f(i, d, s));
    } else {
        dst.chunks_mut(chunk)
            .zip(src.chunks(chunk))
            .enumerate()
            .for_each(|(i, (d, s))| f(i, d, s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_reports_one_thread_and_restores() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            assert_eq!(threads(), 3);
            assert!(enabled());
            serial(|| {
                assert_eq!(threads(), 1);
                serial(|| assert!(!enabled()));
                assert_eq!(threads(), 1);
            });
            assert_eq!(threads(), 3);
            let caught = std::panic::catch_unwind(|| serial(|| panic!("unwinds")));
            assert!(caught.is_err());
            assert_eq!(threads(), 3);
        });
    }

    /// Work inside [`install_spinning`] runs on all of the pool's threads, nested parallel
    /// loops finish, and the pollers stop when the closure returns.
    #[test]
    fn install_spinning_runs_parallel_work_and_returns() {
        use rayon::prelude::*;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for round in 0..50u64 {
            let sum = install_spinning(&pool, || {
                (0..1000u64)
                    .into_par_iter()
                    .map(|i| {
                        (0..10u64)
                            .into_par_iter()
                            .map(|j| i * j + round)
                            .sum::<u64>()
                    })
                    .sum::<u64>()
            });
            let want: u64 = (0..1000u64)
                .map(|i| (0..10u64).map(|j| i * j + round).sum::<u64>())
                .sum();
            assert_eq!(sum, want);
        }
    }

    /// The helpers visit every index / chunk once, split or serial.
    #[test]
    fn helpers_cover_everything_in_both_modes() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for split in [true, false] {
            let run = || {
                let hits: Vec<std::sync::atomic::AtomicUsize> =
                    (0..37).map(|_| Default::default()).collect();
                for_each_index(37, |i| {
                    hits[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                });
                assert!(hits
                    .iter()
                    .all(|h| h.load(std::sync::atomic::Ordering::Relaxed) == 1));
                let src: Vec<u32> = (0..1001).collect();
                let mut dst = vec![0u32; 1001];
                for_each_chunk_pair(&mut dst, &src, 64, |d, s| {
                    d.iter_mut().zip(s).for_each(|(d, &s)| *d = s * 3 + 1)
                });
                assert!(dst.iter().zip(&src).all(|(&d, &s)| d == s * 3 + 1));
            };
            pool.install(|| if split { run() } else { serial(run) });
        }
    }
}
