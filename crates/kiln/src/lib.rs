//! kiln: build optimised inference engines from ONNX models and run them.
//!
//! The flow follows TensorRT's:
//!
//! ```no_run
//! use kiln::{Builder, BuilderConfig, Runtime};
//! # fn main() -> kiln::Result<()> {
//! let engine = Builder::new().build_onnx_file("model.onnx".as_ref(), &BuilderConfig::default())?;
//! engine.save("model.plan".as_ref())?;
//! let engine = Runtime::load("model.plan".as_ref())?;   // Send + Sync, share it
//! let mut ctx = engine.create_context();                 // one per thread
//! # let x = kiln::Tensor::zeros(kiln::DType::F32, &[1, 3, 224, 224]);
//! let outputs = ctx.execute_tensors(&[("x", x)])?;
//! # Ok(()) }
//! ```

pub mod builder;
pub mod config;
pub mod context;
pub mod engine;
pub mod fingerprint;
pub mod fold_affine;
pub mod fuse_elementwise;
pub mod fuse_residual;
pub mod int8;
pub mod memory;
pub mod npy;
pub mod optimize;
pub mod pack_weights;
pub mod plan;
pub mod profile;
#[cfg(test)]
mod test_graph;
pub mod tuner;

pub use builder::Builder;
pub use config::{parse_layer_precision, parse_shapes, BuilderConfig, DeviceKind};
pub use context::{CpuLayerTime, ExecutionContext, IoInfo};
pub use engine::{registry, Engine, LayerInfo, MemoryReport, Runtime};
pub use fingerprint::Fingerprint;
pub use kiln_core::{DType, Dim, KilnError, Result, Tensor, TensorMut, Value};
pub use profile::{OptimizationProfile, ProfileBound};
pub use tuner::{TimingCache, TuneReport};
/// kiln's version (`X.Y.Z`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

// The runtime's thread-safety rules, checked at compile time: an engine is shared by
// every thread; a context may move to another thread but is never shared (not `Sync`,
// proven by the compile-fail test tests/ui/context_not_sync.rs).
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<Engine>();
    send::<ExecutionContext>();
};
