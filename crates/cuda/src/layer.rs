//! The contract between kiln's GPU executor and the layers it runs.
//!
//! A [`GpuLayer`] is one node of the optimized graph lowered to the GPU: it names the CUDA C
//! modules it needs (compiled once with NVRTC at build time and stored in the plan, so loading
//! a plan never compiles), the workspace it wants, and how to enqueue itself on a stream.
//! Layers never allocate device memory and never synchronize: the executor owns memory
//! (weights, the activation arena, the workspace) and streams.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaStream};
use kiln_core::{DType, KilnError, Result};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// Shape of a device tensor (row-major, contiguous).
pub type DevShape = SmallVec<[usize; 6]>;

/// A contiguous tensor in device memory, as a layer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevTensor {
    /// Device address of the first element (a `CUdeviceptr`); 0 only for empty tensors.
    pub ptr: u64,
    /// Element type as stored on the device.
    pub dtype: DType,
    /// Dimensions, row-major and contiguous.
    pub shape: DevShape,
}

impl DevTensor {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype.size()
    }
}

/// One CUDA C module a layer needs. `module` names it uniquely *by content* (e.g. the kernel
/// family plus its template parameters), so layers that need the same code share one module.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelSource {
    /// Unique module name, derived from what the code computes.
    pub module: String,
    /// CUDA C source; `extern "C" __global__` entry points.
    pub code: String,
}

/// Compiled modules of one engine, loaded into the device context, looked up by name.
#[derive(Default, Debug)]
pub struct ModuleSet {
    modules: HashMap<String, Arc<CudaModule>>,
}

impl ModuleSet {
    /// Registers a loaded module under its [`KernelSource::module`] name.
    pub fn insert(&mut self, name: String, module: Arc<CudaModule>) {
        self.modules.insert(name, module);
    }

    /// True when the module was loaded.
    pub fn contains(&self, name: &str) -> bool {
        self.modules.contains_key(name)
    }

    /// The entry point `function` of module `module`.
    pub fn function(&self, module: &str, function: &str) -> Result<CudaFunction> {
        let m = self.modules.get(module).ok_or_else(|| {
            KilnError::kernel(
                "cuda",
                format!("module `{module}` was not compiled into this engine"),
            )
        })?;
        m.load_function(function).map_err(|e| {
            KilnError::kernel(
                "cuda",
                format!("module `{module}` has no function `{function}`: {e}"),
            )
        })
    }
}

/// Everything a layer may use while enqueuing.
pub struct LaunchCx<'a> {
    /// The stream every launch of this inference goes to.
    pub stream: &'a Arc<CudaStream>,
    /// The engine's compiled modules.
    pub modules: &'a ModuleSet,
    /// Device address of this layer's scratch space (valid for this enqueue only).
    pub workspace: u64,
    /// Size of the scratch space in bytes (at least what [`GpuLayer::workspace_bytes`] asked).
    pub workspace_bytes: usize,
    /// The context's cuBLAS handle, bound to `stream` (library layers need it).
    pub blas: Option<&'a cudarc::cublas::CudaBlas>,
    /// Allow TF32 tensor-core math for FP32 matrix products.
    pub tf32: bool,
    /// The context's cuDNN handle, bound to `stream` (cuDNN layers need it).
    pub dnn: Option<&'a crate::dnn::DnnHandle>,
}

/// What a layer may use while it is prepared on the device at engine build (and load).
pub struct PrepareCx<'a> {
    /// A cuDNN handle (None where cuDNN cannot be loaded).
    pub dnn: Option<&'a crate::dnn::DnnHandle>,
    /// Allow TF32 tensor-core math for FP32 matrix products.
    pub tf32: bool,
}

/// One node lowered to the GPU.
pub trait GpuLayer: Send + Sync + Debug {
    /// Stable tactic id, e.g. `nvrtc.elementwise.f16` or `cublaslt.matmul`; shown by `kiln inspect`.
    fn tactic(&self) -> String;

    /// CUDA C modules this layer launches (empty for library-only layers).
    fn sources(&self) -> Vec<KernelSource> {
        Vec::new()
    }

    /// Fixes device-dependent choices (a library's algorithm, its workspace) once, on the
    /// build device, before [`workspace_bytes`](Self::workspace_bytes) is asked.
    fn prepare(&self, cx: &PrepareCx<'_>) -> Result<()> {
        let _ = cx;
        Ok(())
    }

    /// True when the layer enqueues cuDNN work (its context needs a cuDNN handle).
    fn uses_dnn(&self) -> bool {
        false
    }

    /// Scratch bytes needed for these input shapes.
    fn workspace_bytes(&self, inputs: &[DevTensor]) -> usize {
        let _ = inputs;
        0
    }

    /// Enqueues the computation on `cx.stream`. Inputs and outputs are already allocated with
    /// the shapes the graph's shape inference gave; outputs never alias inputs.
    fn enqueue(&self, cx: &LaunchCx<'_>, inputs: &[DevTensor], outputs: &[DevTensor])
        -> Result<()>;
}

/// Converts any CUDA-side error into a kernel error naming the layer.
pub fn cuda_err(layer: &str, what: impl std::fmt::Display) -> KilnError {
    KilnError::kernel(layer, format!("CUDA: {what}"))
}

/// The two inputs and the output of a product-like layer (A, B → C), checked against the
/// element counts it was lowered for.
pub fn product_io<'a>(
    layer: &str,
    inputs: &'a [DevTensor],
    outputs: &'a [DevTensor],
    sizes: [usize; 3],
) -> Result<(&'a DevTensor, &'a DevTensor, &'a DevTensor)> {
    let (Some(a), Some(b), Some(o)) = (inputs.first(), inputs.get(1), outputs.first()) else {
        return Err(cuda_err(layer, "expected 2 inputs and 1 output"));
    };
    let found = [a.len(), b.len(), o.len()];
    if found != sizes {
        return Err(cuda_err(
            layer,
            format!("sizes {found:?} differ from the lowered {sizes:?}"),
        ));
    }
    Ok((a, b, o))
}
