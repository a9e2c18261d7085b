//! Graph optimisation passes that need no knowledge of particular ops' internals.
//!
//! Each pass is a function `fn(&mut Graph) -> Result<usize>` returning how many rewrites it
//! made; [`run_to_fixpoint`] repeats a list of them until nothing changes. Op-specific
//! fusions (BatchNorm into Conv, activations into Conv/Gemm/MatMul) live with the backend
//! that implements the fused kernels.

mod cleanup;
mod fold;

pub use cleanup::{remove_dead_nodes, remove_identities};
pub use fold::{fold_constants, fold_known_values};

use crate::error::Result;
use crate::graph::Graph;

/// A graph rewrite returning the number of changes it made.
pub type Pass = fn(&mut Graph) -> Result<usize>;

/// Runs `passes` in order, repeatedly, until a full round changes nothing (at most 16
/// rounds). Returns the total number of rewrites.
pub fn run_to_fixpoint(graph: &mut Graph, passes: &[(&str, Pass)]) -> Result<usize> {
    let mut total = 0;
    for _ in 0..16 {
        let mut round = 0;
        for (name, pass) in passes {
            let n = pass(graph)?;
            if n > 0 {
                tracing::debug!(pass = name, rewrites = n, "pass applied");
            }
            round += n;
        }
        total += round;
        if round == 0 {
            break;
        }
    }
    Ok(total)
}

/// Replaces every use of value `from` by `to` in node inputs (graph outputs untouched).
pub fn replace_uses(graph: &mut Graph, from: crate::ValueId, to: crate::ValueId) {
    for n in &mut graph.nodes {
        for i in n.inputs.iter_mut().flatten() {
            if *i == from {
                *i = to;
            }
        }
    }
}
