//! Per-thread scratch memory for kernels that need temporaries (im2col panels, packed tiles,
//! intermediate rows), reused across calls so that steady-state inference does not allocate.
//!
//! Each thread keeps a small stack of buffers. [`with_scratch`] pops one (or makes one the
//! first time), grows it if it is too small, lends it to the closure and pushes it back, so
//! nested calls get distinct buffers and, once warm, no call allocates.

use std::cell::RefCell;

use bytemuck::{Pod, Zeroable};

/// Alignment unit of scratch buffers (64 bytes: one cache line, one AVX-512 vector).
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
struct Line([u8; 64]);

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
    let mut buf = POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    if buf.len() < lines {
        buf.resize(lines, Line([0; 64]));
    }
    let all: &mut [u8] = bytemuck::cast_slice_mut(&mut buf[..lines]);
    let out = f(bytemuck::cast_slice_mut(&mut all[..bytes]));
    POOL.with(|p| p.borrow_mut().push(buf));
    out
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
    fn buffers_are_reused_once_warm() {
        let first = with_scratch::<u8, _>(1000, |a| a.as_ptr() as usize);
        let second = with_scratch::<u8, _>(500, |a| a.as_ptr() as usize);
        assert_eq!(first, second);
    }
}
