//! Per-thread scratch memory for kernels that need temporaries (im2col panels, packed tiles,
//! intermediate rows), reused across calls so that steady-state inference does not allocate.
//!
//! Each thread keeps a small set of buffers. [`with_scratch`] takes the smallest one that is
//! large enough (or, when none is, the largest, grown; or a new one the first time), lends it
//! to the closure and puts it back, so nested calls get distinct buffers and, once warm, no
//! call allocates. Best fit matters under work stealing: a job stolen by another pool thread
//! may run at a different nesting depth there than on the thread that usually runs it, and
//! taking the buffer that fits (rather than the top of a stack) keeps that from growing one.
//! For the same reason a buffer that has to grow (or be made) is sized to the largest
//! request any thread has made so far (up to [`HIGH_WATER_CAP`]), not just to this one: once
//! every size has been requested somewhere, a thread only allocates when work stealing
//! nests its calls one level deeper than ever before.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytemuck::{Pod, Zeroable};

/// Alignment unit of scratch buffers (64 bytes: one cache line, one AVX-512 vector).
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Largest request (in 64-byte lines) seen on any thread, capped at [`HIGH_WATER_CAP`].
static HIGH_WATER: AtomicUsize = AtomicUsize::new(0);

/// Requests up to this many lines (16 MiB) raise the shared high-water mark; larger ones
/// are sized exactly, so one huge temporary does not make every thread's buffers huge.
pub const HIGH_WATER_CAP: usize = (16 << 20) / 64;

thread_local! {
    static POOL: RefCell<Vec<Vec<Line>>> = const { RefCell::new(Vec::new()) };
}

/// Lends `f` a 64-byte aligned, thread-local slice of `len` elements of `T`.
///
/// The contents are unspecified (left over from earlier use, zero the first time): callers
/// must write before they read.
pub fn with_scratch<T: Pod, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let bytes = len * std::mem::size_of::<T>();
    let lines = bytes.div_ceil(64);
    let mut buf = POOL.with(|p| take_best_fit(&mut p.borrow_mut(), lines));
    if buf.len() < lines {
        let target = if lines <= HIGH_WATER_CAP {
            HIGH_WATER.fetch_max(lines, Ordering::Relaxed).max(lines)
        } else {
            lines
        };
        buf.resize(target, Line([0; 64]));
    }
    let all: &mut [u8] = bytemuck::cast_slice_mut(&mut buf[..lines]);
    let out = f(bytemuck::cast_slice_mut(&mut all[..bytes]));
    POOL.with(|p| p.borrow_mut().push(buf));
    out
}

/// Removes and returns the smallest buffer of at least `lines` lines, else the largest one
/// (to be grown), else a new empty one.
fn take_best_fit(pool: &mut Vec<Vec<Line>>, lines: usize) -> Vec<Line> {
    let fitting = pool
        .iter()
        .enumerate()
        .filter(|(_, b)| b.len() >= lines)
        .min_by_key(|(_, b)| b.len())
        .map(|(i, _)| i);
    let pick = fitting.or_else(|| {
        pool.iter()
            .enumerate()
            .max_by_key(|(_, b)| b.len())
            .map(|(i, _)| i)
    });
    match pick {
        Some(i) => pool.swap_remove(i),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_calls_get_distinct_aligned_buffers() {
        with_scratch::<f32, _>(37, |a| {
            assert_eq!(a.len(), 37);
            assert_eq!(a.as_ptr() as usize % 64, 0);
            a.fill(1.5);
            with_scratch::<f32, _>(11, |b| {
                assert_ne!(a.as_ptr(), b.as_ptr());
                b.fill(-2.0);
            });
            assert!(a.iter().all(|&x| x == 1.5));
        });
    }

    #[test]
    fn warm_buffers_serve_any_nesting_order() {
        // Two buffers on this thread, made by a nested pair of requests.
        let (inner, outer) = with_scratch::<u8, _>(4096, |a| {
            let inner = with_scratch::<u8, _>(64, |b| b.as_ptr() as usize);
            (inner, a.as_ptr() as usize)
        });
        // The reverse nesting (small outside, large inside) reuses the same two buffers.
        let (outer2, inner2) = with_scratch::<u8, _>(10, |a| {
            let inner2 = with_scratch::<u8, _>(4000, |b| b.as_ptr() as usize);
            (a.as_ptr() as usize, inner2)
        });
        let mut before = [inner, outer];
        let mut after = [outer2, inner2];
        before.sort();
        after.sort();
        assert_eq!(before, after);
        assert_ne!(outer2, inner2);
    }

    #[test]
    fn buffers_are_reused_once_warm() {
        let first = with_scratch::<u8, _>(1000, |a| a.as_ptr() as usize);
        let second = with_scratch::<u8, _>(500, |a| a.as_ptr() as usize);
        assert_eq!(first, second);
    }
}
