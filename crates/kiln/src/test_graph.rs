//! Graph-building helpers for the unit tests of the graph passes.

use kiln_core::{Attr, BuildCtx, Fact, Graph, Node, OpDesc, OpRegistry, Tensor, ValueId};

/// Appends a default-domain node `op_type` (opset `opset`, attributes `attrs`) reading
/// `inputs`, with one output value named `out`, and returns that value.
pub fn add_node(
    graph: &mut Graph,
    reg: &OpRegistry,
    opset: i64,
    op_type: &str,
    inputs: &[ValueId],
    attrs: &[(&str, Attr)],
    out: &str,
) -> ValueId {
    let mut desc = OpDesc::new("", op_type, opset);
    for (k, v) in attrs {
        desc.attrs.insert(k.to_string(), v.clone());
    }
    let op = reg
        .build(&BuildCtx {
            node: out,
            desc: &desc,
            n_inputs: inputs.len(),
            n_outputs: 1,
        })
        .unwrap();
    let y = graph.add_value(out, Fact::unknown());
    graph.nodes.push(Node {
        name: out.into(),
        desc,
        op,
        inputs: inputs.iter().map(|&i| Some(i)).collect(),
        outputs: vec![Some(y)],
        fused_from: vec![out.into()],
    });
    y
}

/// Adds constant `t` as a value named `name` and returns it.
pub fn add_constant(graph: &mut Graph, name: &str, t: Tensor) -> ValueId {
    let id = graph.add_value(name, Fact::concrete(t.dtype(), t.shape()));
    graph.constants.insert(id, t);
    id
}
