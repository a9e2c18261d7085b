//! Owned device and pinned host allocations (freed on drop) and checked copies.

use std::sync::Arc;

use cudarc::driver::{result, CudaContext, CudaStream};
use kiln_core::{KilnError, Result};

fn err(what: &str, e: impl std::fmt::Display) -> KilnError {
    KilnError::Other(format!("CUDA: {what}: {e}"))
}

/// A device allocation of `len` bytes (at least one byte is allocated).
#[derive(Debug)]
pub struct DevBuf {
    ptr: u64,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: a device address is plain data; the allocation is only freed in `drop`, once.
unsafe impl Send for DevBuf {}
// SAFETY: shared access only reads the address; writes go through CUDA calls on streams.
unsafe impl Sync for DevBuf {}

impl DevBuf {
    /// Allocates `len` bytes on the context's device.
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<DevBuf> {
        ctx.bind_to_thread().map_err(|e| err("bind context", e))?;
        // SAFETY: plain allocation; the pointer is owned by the returned value.
        let ptr = unsafe { result::malloc_sync(len.max(256)) }
            .map_err(|e| err(&format!("cannot allocate {len} bytes of GPU memory"), e))?;
        Ok(DevBuf {
            ptr,
            len,
            ctx: ctx.clone(),
        })
    }

    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when zero bytes were asked for.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from malloc_sync and is freed once; every stream using it was
        // synchronized by its owner before the owner is dropped.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// Page-locked host memory (fast, asynchronous copies).
#[derive(Debug)]
pub struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: owned host memory; only accessed through &self / &mut self.
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    /// Allocates `len` bytes of pinned host memory.
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<PinnedBuf> {
        ctx.bind_to_thread().map_err(|e| err("bind context", e))?;
        // SAFETY: plain allocation owned by the returned value.
        let p = unsafe { result::malloc_host(len.max(64), 0) }
            .map_err(|e| err(&format!("cannot allocate {len} bytes of pinned memory"), e))?;
        Ok(PinnedBuf {
            ptr: p as *mut u8,
            len,
            ctx: ctx.clone(),
        })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` (+ padding) owned bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_host, freed once.
        let _ = unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}

/// Enqueues a host-to-device copy of `src` to `dst` on `stream`. The caller keeps `src`
/// alive and unchanged until the stream is synchronized.
pub fn htod(stream: &CudaStream, dst: u64, src: &[u8]) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: `dst` addresses at least `src.len()` bytes the caller allocated.
    unsafe { result::memcpy_htod_async(dst, src, stream.cu_stream()) }
        .map_err(|e| err("host-to-device copy", e))
}

/// Enqueues a device-to-host copy into `dst` on `stream`; read `dst` after synchronizing.
pub fn dtoh(stream: &CudaStream, dst: &mut [u8], src: u64) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: `src` addresses at least `dst.len()` bytes.
    unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }
        .map_err(|e| err("device-to-host copy", e))
}

/// Waits for every operation enqueued on `stream`.
pub fn sync(stream: &CudaStream) -> Result<()> {
    stream
        .synchronize()
        .map_err(|e| err("stream synchronize (an earlier kernel failed?)", e))
}
