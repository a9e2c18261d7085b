//! The graph IR: values (edges) with facts, nodes in topological order, constants.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::attr::OpDesc;
use crate::error::{KilnError, Result};
use crate::fact::Fact;
use crate::op::Op;
use crate::tensor::Tensor;

/// Constants larger than this many elements are not evaluated during inference (the
/// constant-folding pass handles them).
pub const CONST_EVAL_LIMIT: usize = 1 << 16;

/// Index of a value in [`Graph::values`].
pub type ValueId = usize;

/// A graph edge: its name and what is known about it.
#[derive(Debug, Clone)]
pub struct ValueInfo {
    /// The name from the model (unique within a graph).
    pub name: String,
    /// Build-time knowledge.
    pub fact: Fact,
}

/// A layer: one op applied to some values, producing others.
#[derive(Debug, Clone)]
pub struct Node {
    /// Node name (from the model, or synthesised `<op>_<index>` when empty).
    pub name: String,
    /// How to rebuild the op (stored in plans).
    pub desc: OpDesc,
    /// The op itself.
    pub op: Arc<dyn Op>,
    /// Inputs; `None` for an omitted optional input.
    pub inputs: Vec<Option<ValueId>>,
    /// Outputs; `None` for an omitted optional output.
    pub outputs: Vec<Option<ValueId>>,
    /// Names of the source nodes fused into this one (itself included).
    pub fused_from: Vec<String>,
}

/// A computation graph. Nodes are kept in a valid execution (topological) order.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Graph name.
    pub name: String,
    /// All values.
    pub values: Vec<ValueInfo>,
    /// Nodes in execution order.
    pub nodes: Vec<Node>,
    /// Graph inputs fed by the caller.
    pub inputs: Vec<ValueId>,
    /// Graph outputs.
    pub outputs: Vec<ValueId>,
    /// Constant values (initializers and folded results).
    pub constants: BTreeMap<ValueId, Tensor>,
    /// For subgraphs: values of enclosing graphs read by name; their runtime values are
    /// passed by the owning node after its formal inputs, in this order.
    pub captures: Vec<ValueId>,
}

impl Graph {
    /// Adds a value and returns its id.
    pub fn add_value(&mut self, name: impl Into<String>, fact: Fact) -> ValueId {
        self.values.push(ValueInfo {
            name: name.into(),
            fact,
        });
        self.values.len() - 1
    }

    /// The id of a value by name.
    pub fn value_by_name(&self, name: &str) -> Option<ValueId> {
        self.values.iter().position(|v| v.name == name)
    }

    /// A value's name.
    pub fn name_of(&self, id: ValueId) -> &str {
        &self.values[id].name
    }

    /// For each value, the index of the node producing it (None for inputs/constants).
    pub fn producers(&self) -> Vec<Option<usize>> {
        let mut p = vec![None; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for o in n.outputs.iter().flatten() {
                p[*o] = Some(i);
            }
        }
        p
    }

    /// For each value, the indices of the nodes consuming it.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut c = vec![Vec::new(); self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                if !c[*v].contains(&i) {
                    c[*v].push(i);
                }
            }
        }
        c
    }

    /// True when the value is a graph output.
    pub fn is_output(&self, id: ValueId) -> bool {
        self.outputs.contains(&id)
    }

    /// Re-orders nodes topologically (stable with respect to the current order). Fails on
    /// cycles or on a node reading a value nothing produces.
    pub fn toposort(&mut self) -> Result<()> {
        let mut available = vec![false; self.values.len()];
        for &i in self.inputs.iter().chain(self.captures.iter()) {
            available[i] = true;
        }
        for &c in self.constants.keys() {
            available[c] = true;
        }
        let producers = self.producers();
        let mut done = vec![false; self.nodes.len()];
        let mut order = Vec::with_capacity(self.nodes.len());
        let mut progress = true;
        while order.len() < self.nodes.len() && progress {
            progress = false;
            for (i, n) in self.nodes.iter().enumerate() {
                if done[i] {
                    continue;
                }
                if n.inputs.iter().flatten().all(|v| available[*v]) {
                    done[i] = true;
                    order.push(i);
                    for o in n.outputs.iter().flatten() {
                        available[*o] = true;
                    }
                    progress = true;
                }
            }
        }
        if order.len() < self.nodes.len() {
            let stuck = self
                .nodes
                .iter()
                .enumerate()
                .find(|(i, _)| !done[*i])
                .map(|(_, n)| n);
            if let Some(n) = stuck {
                let missing: Vec<&str> = n
                    .inputs
                    .iter()
                    .flatten()
                    .filter(|v| !available[**v])
                    .map(|v| self.values[*v].name.as_str())
                    .collect();
                let why = if missing
                    .iter()
                    .any(|m| producers[self.value_by_name(m).unwrap_or(0)].is_none())
                {
                    "reads values that nothing produces"
                } else {
                    "is part of a cycle"
                };
                return Err(KilnError::InvalidModel(format!(
                    "node {} ({}) {why}: {}",
                    n.name,
                    n.desc.op_type,
                    missing.join(", ")
                )));
            }
        }
        let mut old: Vec<Option<Node>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Some)
            .collect();
        self.nodes = order
            .into_iter()
            .map(|i| old[i].take().expect("each node once"))
            .collect();
        Ok(())
    }

    /// Runs shape and type inference over all nodes in order, refining value facts.
    /// Facts already declared (model `value_info`) are kept where inference knows less.
    pub fn infer_facts(&mut self) -> Result<()> {
        self.infer_facts_with(false)
    }

    /// Like [`Graph::infer_facts`]; when `lenient`, a node whose inference fails gets unknown
    /// output facts instead of failing the whole graph (its kernel reports at run time).
    pub fn infer_facts_with(&mut self, lenient: bool) -> Result<()> {
        for (id, t) in &self.constants {
            self.values[*id].fact = Fact::constant(t.clone());
        }
        for ni in 0..self.nodes.len() {
            let node = &self.nodes[ni];
            let in_facts: Vec<Option<&Fact>> = node
                .inputs
                .iter()
                .map(|i| i.map(|i| &self.values[i].fact))
                .collect();
            let inferred = node.op.infer(&in_facts, node.outputs.len());
            let inferred = match inferred {
                Err(e) if lenient => {
                    tracing::debug!(node = %node.name, error = %e, "shape inference failed; outputs left unknown");
                    Ok(vec![Fact::unknown(); node.outputs.len()])
                }
                other => other,
            };
            let out = inferred.map_err(|e| match e {
                KilnError::Inference { msg, .. }
                | KilnError::Kernel { msg, .. }
                | KilnError::Other(msg) => KilnError::Inference {
                    node: node.name.clone(),
                    op: node.desc.op_type.clone(),
                    msg,
                },
                other => other.at_node(&node.name),
            })?;
            let mut out = out;
            // Constant propagation at the fact level: an op whose inputs are all known
            // constants is evaluated now (this folds shape subgraphs once shapes are known).
            let all_const = node.op.is_deterministic()
                && !node.inputs.is_empty()
                && in_facts.iter().all(|f| f.is_none_or(|f| f.konst.is_some()))
                && in_facts
                    .iter()
                    .flatten()
                    .map(|f| f.konst.as_ref().map_or(0, |t| t.len()))
                    .sum::<usize>()
                    <= CONST_EVAL_LIMIT;
            if all_const && node.op.subgraphs().is_empty() {
                let vals: Vec<Option<crate::value::Value>> = in_facts
                    .iter()
                    .map(|f| {
                        f.and_then(|f| f.konst.clone())
                            .map(crate::value::Value::Tensor)
                    })
                    .collect();
                let refs: Vec<Option<&crate::value::Value>> =
                    vals.iter().map(|v| v.as_ref()).collect();
                if let Ok(values) = node.op.eval(&refs) {
                    for (f, v) in out.iter_mut().zip(values) {
                        if let crate::value::Value::Tensor(t) = v {
                            *f = Fact::constant(t);
                        }
                    }
                }
            }
            let outputs = node.outputs.clone();
            for (slot, fact) in outputs.iter().zip(out) {
                if let Some(id) = slot {
                    merge_fact(&mut self.values[*id].fact, fact);
                }
            }
        }
        Ok(())
    }

    /// Total number of nodes, subgraphs included.
    pub fn node_count_deep(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| {
                1 + n
                    .op
                    .subgraphs()
                    .iter()
                    .map(|g| g.node_count_deep())
                    .sum::<usize>()
            })
            .sum()
    }

    /// A map from value name to id.
    pub fn name_map(&self) -> HashMap<String, ValueId> {
        self.values
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect()
    }
}

/// Combines an inferred fact into an existing one, keeping the more precise knowledge.
pub fn merge_fact(existing: &mut Fact, inferred: Fact) {
    existing.kind = inferred.kind;
    if inferred.dtype.is_some() {
        existing.dtype = inferred.dtype;
    }
    match (&existing.shape, inferred.shape) {
        (_, None) => {}
        (None, Some(s)) => existing.shape = Some(s),
        (Some(old), Some(new)) => {
            if old.len() == new.len() {
                let merged = old
                    .iter()
                    .zip(new)
                    .map(|(o, n)| match (o, n) {
                        (_, crate::fact::Dim::Known(k)) => crate::fact::Dim::Known(k),
                        (crate::fact::Dim::Known(k), _) => crate::fact::Dim::Known(*k),
                        (crate::fact::Dim::Sym(s), crate::fact::Dim::Unknown) => {
                            crate::fact::Dim::Sym(s.clone())
                        }
                        (_, n) => n,
                    })
                    .collect();
                existing.shape = Some(merged);
            } else {
                existing.shape = Some(new);
            }
        }
    }
    if inferred.konst.is_some() {
        existing.konst = inferred.konst;
    }
}
