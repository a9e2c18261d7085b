//! Weights packed at build time: after tuning, every CPU Conv whose chosen GEMM tactic
//! reads its constant f32 weights through the packed product gets them re-ordered once
//! into the packed-A layout of `kiln_cpu::ops::linalg::sgemm` (for this CPU's kernel
//! family) and stored that way in the plan, so inference packs no weights. The node
//! carries `kiln_weight_layout = packed_a.<isa>`; the weights keep their shape and size.
//! A Conv tuned to a Winograd tactic gets its filters transformed (`G g Gᵀ`) and packed
//! instead (`winograd_<f23|f43>.<isa>`, stored as M × C/group × α × α).

use kiln_core::{Attr, BuildCtx, DType, Fact, Graph, OpRegistry, Result, Tensor};
use kiln_cpu::ops::conv::{Conv, WEIGHT_LAYOUT_ATTR};

/// Packs the weights of every Conv that benefits; returns how many were packed.
pub fn pack_conv_weights(graph: &mut Graph, registry: &OpRegistry) -> Result<usize> {
    let mut packed = 0;
    let mut replaced = Vec::new();
    for ni in 0..graph.nodes.len() {
        let node = &graph.nodes[ni];
        let Some(conv) = node.op.as_any().downcast_ref::<Conv>() else {
            continue;
        };
        let (Some(&Some(x)), Some(&Some(w_id))) = (node.inputs.first(), node.inputs.get(1)) else {
            continue;
        };
        let xf = &graph.values[x].fact;
        let (Some(xs), Some(DType::F32)) = (xf.concrete_shape(), xf.dtype) else {
            continue;
        };
        let Some(w) = graph.constants.get(&w_id) else {
            continue;
        };
        if w.dtype() != DType::F32 {
            continue;
        }
        let Some(isa) = conv.weight_packing(&xs, w.shape()) else {
            continue;
        };
        let (data, shape) = conv.packed_weights(w.as_slice::<f32>()?, w.shape(), isa)?;
        let layout = conv.weight_layout(isa);
        let name = format!("{}.packed_{}", graph.name_of(w_id), isa.name());
        let id = graph.add_value(name, Fact::concrete(DType::F32, &shape));
        graph.constants.insert(id, Tensor::from_vec(&shape, data)?);
        replaced.push(w_id);
        let node = &mut graph.nodes[ni];
        node.inputs[1] = Some(id);
        node.desc
            .attrs
            .insert(WEIGHT_LAYOUT_ATTR.into(), Attr::String(layout));
        let n = &graph.nodes[ni];
        let op = registry.build(&BuildCtx {
            node: &n.name,
            desc: &n.desc,
            n_inputs: n.inputs.len(),
            n_outputs: n.outputs.len(),
        })?;
        graph.nodes[ni].op = op;
        packed += 1;
    }
    // Drop the unpacked originals no node (or output) reads any more.
    for w_id in replaced {
        let used = graph.outputs.contains(&w_id)
            || graph.inputs.contains(&w_id)
            || graph.nodes.iter().any(|n| n.inputs.contains(&Some(w_id)));
        if !used {
            graph.constants.remove(&w_id);
        }
    }
    Ok(packed)
}
