//! kiln's CUDA backend.
//!
//! cudarc loads libcuda, NVRTC, cuBLAS and cuDNN dynamically, so the same `kiln` binary runs
//! on machines without a GPU (where [`driver_present`] is false and the CPU backend is used).

pub mod compile;
pub mod convt;
pub mod device;
pub mod dnn;
pub mod exec;
pub mod kernels;
pub mod layer;
pub mod library;
pub mod lt;
pub mod mem;
pub mod monitor;
pub mod precision;
pub mod rnn;
pub mod tune;

pub use device::{no_driver_error, GpuInfo};
pub use exec::{GpuContext, GpuEngine, GpuOptions, GpuTiming, LayerPlacement, ModuleImages};
pub use layer::{DevShape, DevTensor, GpuLayer, KernelSource, LaunchCx, ModuleSet, PrepareCx};

/// True when the CUDA driver library (libcuda) can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}
