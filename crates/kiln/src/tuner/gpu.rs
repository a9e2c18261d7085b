//! The CUDA backend's offer to the tuner: per layer, the implementations this GPU can run
//! it with ([`kiln_cuda::tune`]: cuDNN's algorithms and kiln's own paths for Conv), timed
//! with CUDA events at the layer's real shapes, in the precision the FP16 policy gives the
//! layer. Every float GPU tactic declares FP32/linear as its format: the engine converts
//! between FP32 and FP16 itself (per the policy), so the graph-level choice inserts no
//! reformat layers between them.
//!
//! With `--int8`, calibrated layers with an INT8 form also offer `cuda.int8.<family>` in
//! the INT8 format ([`crate::int8::gpu`]): it is timed as the INT8 layer the engine would
//! run, and the quantize/dequantize reformats an INT8 layer needs next to float neighbours
//! are timed on the GPU as edges, so the selection keeps INT8 only where it pays.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use kiln_core::{DType, Fact, Format, Graph, Node, Precision, Result, Tactic, Tensor};
use kiln_cuda::tune::{device_input_facts, device_node_facts, node_precisions, GpuTuner};

use crate::int8::gpu as gpu8;

use super::timer::LayerTimer;

/// Tactic lister and timer sharing one device tuner.
pub struct GpuTactics {
    tuner: Rc<RefCell<GpuTuner>>,
    lo: HashMap<String, bool>,
    fp16: bool,
    int8: bool,
}

impl GpuTactics {
    /// For `graph` (facts at the build shapes) built with `fp16` / `tf32` / `int8` (calibrated
    /// layers offer INT8 tactics) at `level`.
    pub fn new(graph: &Graph, fp16: bool, tf32: bool, int8: bool, level: u8) -> Result<GpuTactics> {
        let facts: Vec<Fact> = graph.values.iter().map(|v| v.fact.clone()).collect();
        Ok(GpuTactics {
            tuner: Rc::new(RefCell::new(GpuTuner::new(tf32, level)?)),
            lo: node_precisions(graph, &facts, fp16),
            fp16,
            int8,
        })
    }

    /// A second handle on the same device tuner (the tuner needs a lister and a timer).
    pub fn sharing(other: &GpuTactics) -> GpuTactics {
        GpuTactics {
            tuner: other.tuner.clone(),
            lo: other.lo.clone(),
            fp16: other.fp16,
            int8: other.int8,
        }
    }

    fn lo(&self, node: &Node) -> bool {
        self.lo.get(&node.name).copied().unwrap_or(false)
    }

    fn out_facts(node: &Node, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>> {
        node.op.infer(inputs, node.outputs.len())
    }

    /// The tactics of `node` (what the tuner's lister returns).
    pub fn list(&self, node: &Node, inputs: &[Option<&Fact>]) -> Vec<Tactic> {
        let lo = self.lo(node);
        let Ok(outs) = Self::out_facts(node, inputs) else {
            return Vec::new();
        };
        let fin = device_input_facts(node, inputs, lo);
        let outs: Vec<Option<&Fact>> = outs.iter().map(Some).collect();
        let fout = device_node_facts(&outs, lo);
        let t = self.tuner.borrow();
        let float = t
            .tactics(node, &fin, &fout)
            .into_iter()
            .map(|(id, level)| Tactic {
                id,
                format: Format::FP32_LINEAR,
                min_level: level,
            })
            .collect();
        gpu8::offer(node, inputs, float, self.int8, kiln_cuda::lt::available())
    }

    /// The dtype float activations have on the device next to INT8 layers.
    fn float_dtype(&self) -> DType {
        if self.fp16 {
            DType::F16
        } else {
            DType::F32
        }
    }
}

impl LayerTimer for GpuTactics {
    fn time_tactic(
        &mut self,
        node: &Node,
        inputs: &[Option<&Fact>],
        constants: &[Option<&Tensor>],
        tactic: &Tactic,
    ) -> Result<f64> {
        if tactic.format.precision == Precision::Int8 {
            let p = gpu8::probe(node, inputs, constants, &tactic.id)?;
            if gpu8::gpu_attr(&tactic.id).is_some() {
                // A library tactic (IMMA) the product does not fit falls back to the NVRTC
                // kernel at lowering: that is the other candidate, not this one.
                let lowered = kiln_cuda::library::lower(&p.node, &p.inputs, &p.outputs);
                if !matches!(lowered, Some(Ok(_))) {
                    return Err(kiln_core::KilnError::Other(format!(
                        "{}: the product does not fit cuBLASLt's IMMA rules",
                        tactic.id
                    )));
                }
            }
            return self.tuner.borrow_mut().time_node(
                &p.node,
                &p.inputs,
                &p.outputs,
                &p.const_refs(),
            );
        }
        let lo = self.lo(node);
        let outs = Self::out_facts(node, inputs)?;
        let fin = device_input_facts(node, inputs, lo);
        let outs: Vec<Option<&Fact>> = outs.iter().map(Some).collect();
        let fout = device_node_facts(&outs, lo);
        self.tuner
            .borrow_mut()
            .time(node, &fin, &fout, constants, &tactic.id)
    }

    fn time_reformat(&mut self, fact: &Fact, from: Format, to: Format) -> Result<f64> {
        if from == to {
            return Ok(0.0);
        }
        // Quantize / dequantize next to an INT8 layer: the engine's own kernels. (The float
        // side is taken as FP16 in FP16 engines, though the policy keeps a few layers FP32.)
        let p = gpu8::reformat_probe(fact, from, to, self.float_dtype())?;
        self.tuner
            .borrow_mut()
            .time_node(&p.node, &p.inputs, &p.outputs, &p.const_refs())
    }
}
