//! kiln's own CUDA C kernels (compiled with NVRTC) for every op that cuBLASLt and cuDNN do not
//! cover: elementwise chains, reductions, softmax, normalizations, pooling, resize and data
//! movement (concat, slice, transpose, gather, pad, ...).
//!
//! Entry point: [`lower`], which the GPU executor calls for each node it does not hand to a
//! library; `None` means "no GPU kernel for this node", and the executor runs it on the CPU.

use kiln_core::{Fact, Node, Result};

use crate::layer::GpuLayer;

/// Lowers `node` to a GPU layer, given the *concrete* facts (dtype and fully known shape) of
/// its inputs and outputs as they will be on the device (float tensors may be F16 in an FP16
/// engine). Returns `None` when this module has no kernel for the node.
pub fn lower(node: &Node, inputs: &[Fact], outputs: &[Fact]) -> Option<Result<Box<dyn GpuLayer>>> {
    let _ = (node, inputs, outputs);
    None
}
