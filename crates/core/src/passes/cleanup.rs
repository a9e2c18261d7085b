//! Dead-node and identity removal.

use std::collections::HashSet;

use crate::error::Result;
use crate::graph::Graph;
use crate::passes::replace_uses;

/// Removes nodes none of whose outputs are read (by nodes or as graph outputs).
/// Non-deterministic nodes are removed too: an unread random value has no effect.
pub fn remove_dead_nodes(graph: &mut Graph) -> Result<usize> {
    let mut removed = 0;
    loop {
        let mut used: HashSet<usize> = graph.outputs.iter().copied().collect();
        for n in &graph.nodes {
            used.extend(n.inputs.iter().flatten().copied());
        }
        let before = graph.nodes.len();
        graph
            .nodes
            .retain(|n| n.outputs.iter().flatten().any(|o| used.contains(o)));
        let now = before - graph.nodes.len();
        if now == 0 {
            break;
        }
        removed += now;
    }
    // Constants nobody reads any more.
    let mut used: HashSet<usize> = graph.outputs.iter().copied().collect();
    for n in &graph.nodes {
        used.extend(n.inputs.iter().flatten().copied());
    }
    graph.constants.retain(|id, _| used.contains(id));
    Ok(removed)
}

/// Op types that pass their first input through unchanged at inference time (when only
/// their first output is read).
const IDENTITY_OPS: &[&str] = &["Identity", "Dropout"];

/// Bypasses identity-like nodes: their readers read the node's input directly.
/// A node whose output is a graph output is kept (the output keeps its name).
pub fn remove_identities(graph: &mut Graph) -> Result<usize> {
    let mut removed = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let n = &graph.nodes[i];
        let is_identity = IDENTITY_OPS.contains(&n.desc.op_type.as_str())
            && n.desc.domain.is_empty()
            && n.outputs.iter().skip(1).all(|o| o.is_none());
        let single_in = n
            .inputs
            .first()
            .copied()
            .flatten()
            .filter(|_| n.inputs.iter().skip(1).all(|x| x.is_none()));
        let out = n.outputs.first().copied().flatten();
        // Dropout in training mode (a training_mode input) is not an identity.
        if let (true, Some(src), Some(out)) = (is_identity, single_in, out) {
            let is_kind_tensor = graph.values[src].fact.kind == crate::fact::ValueKind::Tensor;
            if !graph.is_output(out) && is_kind_tensor {
                replace_uses(graph, out, src);
                graph.nodes.remove(i);
                removed += 1;
                continue;
            }
        }
        i += 1;
    }
    Ok(removed)
}
