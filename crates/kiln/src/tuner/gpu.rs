//! The CUDA backend's offer to the tuner: per layer, the implementations this GPU can run
//! it with ([`kiln_cuda::tune`]: cuDNN's algorithms and kiln's own paths for Conv), timed
//! with CUDA events at the layer's real shapes, in the precision the FP16 policy gives the
//! layer. Every GPU tactic declares FP32/linear as its format: the engine converts between
//! precisions itself (per the policy), so the graph-level choice never inserts reformat
//! layers for GPU tactics.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use kiln_core::{Fact, Format, Graph, KilnError, Node, Result, Tactic, Tensor};
use kiln_cuda::tune::{device_node_facts, node_precisions, GpuTuner};

use super::timer::LayerTimer;

/// Tactic lister and timer sharing one device tuner.
pub struct GpuTactics {
    tuner: Rc<RefCell<GpuTuner>>,
    lo: HashMap<String, bool>,
}

impl GpuTactics {
    /// For `graph` (facts at the build shapes) built with `fp16` / `tf32` at `level`.
    pub fn new(graph: &Graph, fp16: bool, tf32: bool, level: u8) -> Result<GpuTactics> {
        let facts: Vec<Fact> = graph.values.iter().map(|v| v.fact.clone()).collect();
        Ok(GpuTactics {
            tuner: Rc::new(RefCell::new(GpuTuner::new(tf32, level)?)),
            lo: node_precisions(graph, &facts, fp16),
        })
    }

    /// A second handle on the same device tuner (the tuner needs a lister and a timer).
    pub fn sharing(other: &GpuTactics) -> GpuTactics {
        GpuTactics {
            tuner: other.tuner.clone(),
            lo: other.lo.clone(),
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
        let fin = device_node_facts(inputs, lo);
        let outs: Vec<Option<&Fact>> = outs.iter().map(Some).collect();
        let fout = device_node_facts(&outs, lo);
        let t = self.tuner.borrow();
        let offered = t.tactics(node, &fin, &fout);
        if offered.len() < 2 {
            return Vec::new();
        }
        offered
            .into_iter()
            .map(|(id, level)| Tactic {
                id,
                format: Format::FP32_LINEAR,
                min_level: level,
            })
            .collect()
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
        let lo = self.lo(node);
        let outs = Self::out_facts(node, inputs)?;
        let fin = device_node_facts(inputs, lo);
        let outs: Vec<Option<&Fact>> = outs.iter().map(Some).collect();
        let fout = device_node_facts(&outs, lo);
        self.tuner
            .borrow_mut()
            .time(node, &fin, &fout, constants, &tactic.id)
    }

    fn time_reformat(&mut self, _fact: &Fact, from: Format, to: Format) -> Result<f64> {
        if from == to {
            return Ok(0.0);
        }
        Err(KilnError::Other(
            "GPU tactics are all FP32/linear at graph level; no reformat to time".into(),
        ))
    }
}
