//! Per-shape execution plans: which layers write straight into the activation arena, at
//! which offsets, and when each value can be dropped.

use kiln_core::planner::{self, Request};
use std::sync::Arc;

use kiln_core::{DType, Fact, Graph, KilnError, Result, Shape, ValueKind};

/// Input dtypes and shapes, one per graph input (`None` for a non-tensor input): the key
/// of a memory plan.
pub type InputSignature = Vec<Option<(DType, Vec<usize>)>>;

/// Where a value's bytes go when its producer runs.
#[derive(Debug, Clone)]
pub enum Placement {
    /// Not planned: the producing kernel allocates (dynamic shapes, sequences, strings).
    Dynamic,
    /// A slot of the context's arena.
    Arena {
        /// Byte offset.
        offset: usize,
        /// Element type.
        dtype: DType,
        /// Shape.
        shape: Shape,
    },
}

/// The execution plan of a graph for one set of input shapes.
#[derive(Debug, Clone)]
pub struct ShapePlan {
    /// Placement of each value.
    pub placements: Vec<Placement>,
    /// For each node: true when all its outputs are planned and it runs `eval_into`.
    pub writes_in_place: Vec<bool>,
    /// For each value: the index of the last node reading it (`usize::MAX`: keep to the end).
    pub last_use: Vec<usize>,
    /// Arena bytes needed.
    pub arena_size: usize,
    /// Largest total of planned tensors alive at one time.
    pub lower_bound: usize,
    /// Value facts inferred for these shapes.
    pub facts: Vec<Fact>,
    /// The graph specialised to these shapes, when it differs from the engine's: an `If`
    /// whose condition became constant is replaced by the branch it takes, so the branch's
    /// layers are planned into the arena instead of running through the interpreter. Node
    /// and value indices of this plan refer to this graph when it is present.
    pub graph: Option<Arc<Graph>>,
}

impl ShapePlan {
    /// Number of values kept in the arena.
    pub fn arena_values(&self) -> usize {
        self.placements
            .iter()
            .filter(|p| matches!(p, Placement::Arena { .. }))
            .count()
    }
}

fn static_shape(f: &Fact) -> Option<(DType, Shape)> {
    if f.kind != ValueKind::Tensor {
        return None;
    }
    let dtype = f.dtype.filter(|d| *d != DType::String)?;
    let shape = f.concrete_shape()?;
    Some((dtype, shape.into_iter().collect()))
}

/// Plans `graph` for concrete input types and shapes (one per graph input, in order;
/// `None` for an input that is not a tensor, whose declared fact is kept).
pub fn plan_for_inputs(graph: &Graph, inputs: &[Option<(DType, Vec<usize>)>]) -> Result<ShapePlan> {
    if inputs.len() != graph.inputs.len() {
        return Err(KilnError::Other(format!(
            "expected {} inputs, got {}",
            graph.inputs.len(),
            inputs.len()
        )));
    }
    let mut g = graph.clone();
    // Forget what build-time inference derived for node outputs: shapes may differ now.
    for n in &g.nodes {
        for o in n.outputs.iter().flatten() {
            let kind = graph.values[*o].fact.kind;
            g.values[*o].fact = Fact {
                kind,
                ..Fact::unknown()
            };
        }
    }
    for (id, input) in g.inputs.clone().iter().zip(inputs) {
        if let Some((dtype, shape)) = input {
            g.values[*id].fact = Fact::concrete(*dtype, shape);
        }
    }
    g.infer_facts_with(true)?;
    // Conditions that these shapes decide (`If(Equal(Shape(x)[1], 512))`): inline the
    // branch taken, repeatedly for nested ones.
    let mut specialised = false;
    if g.nodes.iter().any(|n| !n.op.subgraphs().is_empty()) {
        for _ in 0..8 {
            let inlined = crate::optimize::inline_constant_ifs(&mut g, crate::engine::registry())?;
            if inlined == 0 {
                break;
            }
            specialised = true;
            g.infer_facts_with(true)?;
        }
        if specialised {
            // The condition's computation has no reader left.
            kiln_core::passes::remove_dead_nodes(&mut g)?;
        }
    }

    let n_values = g.values.len();
    let mut last_use = vec![0usize; n_values];
    let mut producer = vec![usize::MAX; n_values];
    for (i, n) in g.nodes.iter().enumerate() {
        for v in n.inputs.iter().flatten() {
            last_use[*v] = last_use[*v].max(i);
        }
        for o in n.outputs.iter().flatten() {
            producer[*o] = i;
            last_use[*o] = last_use[*o].max(i);
        }
    }
    for o in &g.outputs {
        last_use[*o] = usize::MAX;
    }
    for c in g.constants.keys() {
        last_use[*c] = usize::MAX;
    }

    let mut placements = vec![Placement::Dynamic; n_values];
    let mut writes_in_place = vec![false; g.nodes.len()];
    let mut requests = Vec::new();
    let mut request_values = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let statics: Option<Vec<(DType, Shape)>> = n
            .outputs
            .iter()
            .map(|o| o.and_then(|o| static_shape(&g.values[o].fact)))
            .collect();
        let Some(statics) = statics else { continue };
        if n.outputs.is_empty() || !n.op.subgraphs().is_empty() {
            continue;
        }
        writes_in_place[i] = true;
        for (o, (dtype, shape)) in n.outputs.iter().flatten().zip(statics) {
            // Graph outputs live in the arena too (to the end of the run): `execute` copies
            // them out, `execute_into` into the caller's buffers.
            let size = kiln_core::numel(&shape) * dtype.size();
            requests.push(Request {
                size,
                first: i,
                // `usize::MAX` (kept to the end) is the step after the last node.
                last: last_use[*o].min(g.nodes.len()).max(i),
            });
            request_values.push(*o);
            placements[*o] = Placement::Arena {
                offset: 0,
                dtype,
                shape,
            };
        }
    }
    let mem = planner::plan(&requests);
    for (v, off) in request_values.iter().zip(&mem.offsets) {
        if let Placement::Arena { offset, .. } = &mut placements[*v] {
            *offset = *off;
        }
    }
    Ok(ShapePlan {
        placements,
        writes_in_place,
        last_use,
        arena_size: mem.arena_size,
        lower_bound: mem.lower_bound,
        facts: g.values.iter().map(|v| v.fact.clone()).collect(),
        graph: specialised.then(|| Arc::new(g)),
    })
}
