//! A plain graph interpreter: runs nodes in order with heap-allocated values. It is the
//! oracle the planned executors are checked against, and it runs subgraphs (`If`, `Loop`,
//! `Scan`) and constant folding.

use crate::error::{KilnError, Result};
use crate::graph::Graph;
use crate::value::Value;

/// Runs `graph` on `inputs` (one per graph input, in order) and `captures` (one per
/// captured outer value, in order) and returns the graph outputs.
pub fn run_graph(graph: &Graph, inputs: &[Value], captures: &[Value]) -> Result<Vec<Value>> {
    if inputs.len() != graph.inputs.len() {
        return Err(KilnError::Other(format!(
            "graph {} takes {} inputs, got {}",
            graph.name,
            graph.inputs.len(),
            inputs.len()
        )));
    }
    if captures.len() != graph.captures.len() {
        return Err(KilnError::Other(format!(
            "graph {} captures {} outer values, got {}",
            graph.name,
            graph.captures.len(),
            captures.len()
        )));
    }
    let mut slots: Vec<Option<Value>> = vec![None; graph.values.len()];
    for (id, t) in &graph.constants {
        slots[*id] = Some(Value::Tensor(t.clone()));
    }
    for (id, v) in graph.inputs.iter().zip(inputs) {
        slots[*id] = Some(v.clone());
    }
    for (id, v) in graph.captures.iter().zip(captures) {
        slots[*id] = Some(v.clone());
    }
    // Free each value after its last reader (outputs and constants stay).
    let mut last_use = vec![usize::MAX; graph.values.len()];
    for (i, n) in graph.nodes.iter().enumerate() {
        for v in n.inputs.iter().flatten() {
            last_use[*v] = i;
        }
    }
    for o in &graph.outputs {
        last_use[*o] = usize::MAX;
    }
    for (ni, node) in graph.nodes.iter().enumerate() {
        let outs = {
            let mut args: Vec<Option<&Value>> = Vec::with_capacity(node.inputs.len());
            for i in &node.inputs {
                match i {
                    None => args.push(None),
                    Some(id) => match &slots[*id] {
                        Some(v) => args.push(Some(v)),
                        None => {
                            return Err(KilnError::Kernel {
                                node: node.name.clone(),
                                op: node.desc.op_type.clone(),
                                msg: format!("input {} has no value", graph.values[*id].name),
                            })
                        }
                    },
                }
            }
            node.op.eval(&args).map_err(|e| e.at_node(&node.name))?
        };
        let n_needed = node
            .outputs
            .iter()
            .rposition(|o| o.is_some())
            .map_or(0, |p| p + 1);
        if outs.len() < n_needed {
            return Err(KilnError::Kernel {
                node: node.name.clone(),
                op: node.desc.op_type.clone(),
                msg: format!("produced {} outputs, {} expected", outs.len(), n_needed),
            });
        }
        for (slot, v) in node.outputs.iter().zip(outs) {
            if let Some(id) = slot {
                slots[*id] = Some(v);
            }
        }
        for v in node.inputs.iter().flatten() {
            if last_use[*v] == ni && !graph.constants.contains_key(v) {
                slots[*v] = None;
            }
        }
    }
    graph
        .outputs
        .iter()
        .map(|o| {
            slots[*o].clone().ok_or_else(|| {
                KilnError::Other(format!(
                    "graph output {} was not computed",
                    graph.values[*o].name
                ))
            })
        })
        .collect()
}
