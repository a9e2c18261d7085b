//! INT8 in GPU engines: every calibrated Conv/MatMul/Gemm that has an INT8 form is lowered
//! to it (`kiln.Int8Conv` / `kiln.Int8Matmul` with the tactic `cuda.int8.<family>`, run by
//! the CUDA backend's `nvrtc.int8.*` kernels), and quantize/dequantize reformats go between
//! the INT8 layers and their FP32/FP16 neighbours.
//!
//! Unlike the CPU, where the tuner times INT8 against FP32 per layer and weighs the
//! reformats, the GPU's INT8 pool is not timed yet: a calibrated layer that can run in INT8
//! does. Layers without an INT8 form (depthwise, fewer than 4 channels per group, …) stay in
//! the engine's float precision.

use std::collections::HashMap;

use kiln_core::{Fact, Format, Graph, Layout, Precision, Result};
use kiln_cpu::ops::int8 as k8;

use super::lower::{lower_node, X_SCALE_ATTR};

/// The GPU INT8 tactic id of a layer family (`conv` or `matmul`).
pub fn tactic_id(family: &str) -> String {
    format!("cuda.int8.{family}")
}

/// Lowers every annotated layer with an INT8 form and inserts the reformats; returns how
/// many layers now run in INT8.
pub fn lower_all(graph: &mut Graph) -> Result<usize> {
    let mut formats: HashMap<usize, Format> = HashMap::new();
    for ni in 0..graph.nodes.len() {
        let node = &graph.nodes[ni];
        if !node.desc.attrs.contains_key(X_SCALE_ATTR) {
            continue;
        }
        let facts: Vec<Option<&Fact>> = node
            .inputs
            .iter()
            .map(|i| i.map(|v| &graph.values[v].fact))
            .collect();
        if k8::tactics_for(&node.desc, &facts).is_empty() {
            continue;
        }
        let family = if node.desc.op_type == "Conv" {
            "conv"
        } else {
            "matmul"
        };
        lower_node(graph, ni, &tactic_id(family))?;
        formats.insert(
            ni,
            Format {
                precision: Precision::Int8,
                layout: Layout::Linear,
            },
        );
    }
    crate::tuner::reformat::insert(graph, &formats)?;
    Ok(formats.len())
}
