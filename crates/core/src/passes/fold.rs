//! Constant folding: nodes whose inputs are all constants are evaluated at build time, and
//! values that shape inference already computed (shape subgraphs once input shapes are
//! known) become constants.

use crate::error::Result;
use crate::graph::Graph;
use crate::value::Value;

/// Evaluates every deterministic node whose inputs are all constants and replaces its
/// outputs by constants. Nodes with subgraphs or non-tensor outputs are left alone.
pub fn fold_constants(graph: &mut Graph) -> Result<usize> {
    let mut folded = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let n = &graph.nodes[i];
        let foldable = n.op.is_deterministic()
            && n.op.subgraphs().is_empty()
            && !n.inputs.is_empty()
            && n.inputs
                .iter()
                .flatten()
                .all(|v| graph.constants.contains_key(v));
        if foldable {
            let vals: Vec<Option<Value>> = n
                .inputs
                .iter()
                .map(|v| v.map(|v| Value::Tensor(graph.constants[&v].clone())))
                .collect();
            let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
            // A failure here is not fatal: the node runs at inference time and reports then.
            if let Ok(outs) = n.op.eval(&refs) {
                if outs.iter().all(|o| matches!(o, Value::Tensor(_)))
                    && outs.len() >= n.outputs.len()
                {
                    let outputs = n.outputs.clone();
                    for (slot, v) in outputs.iter().zip(outs) {
                        if let (Some(id), Value::Tensor(t)) = (slot, v) {
                            graph.values[*id].fact = crate::fact::Fact::constant(t.clone());
                            graph.constants.insert(*id, t);
                        }
                    }
                    graph.nodes.remove(i);
                    folded += 1;
                    continue;
                }
            }
        }
        i += 1;
    }
    Ok(folded)
}

/// Turns values whose facts carry a constant (computed during shape inference) into graph
/// constants, and removes nodes all of whose outputs became constants.
pub fn fold_known_values(graph: &mut Graph) -> Result<usize> {
    let mut folded = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let n = &graph.nodes[i];
        let all_known = n.op.is_deterministic()
            && !n.outputs.is_empty()
            && n.outputs
                .iter()
                .flatten()
                .all(|o| graph.values[*o].fact.konst.is_some());
        if all_known {
            let outputs = n.outputs.clone();
            for id in outputs.iter().flatten() {
                let t = graph.values[*id].fact.konst.clone().expect("checked above");
                graph.constants.insert(*id, t);
            }
            graph.nodes.remove(i);
            folded += 1;
            continue;
        }
        i += 1;
    }
    Ok(folded)
}
