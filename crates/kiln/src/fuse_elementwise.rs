//! Elementwise fusion: connected groups of f32 elementwise nodes (Add, Sub, Mul, Div,
//! two-input Max/Min, Clip, Relu, Sigmoid, Tanh, HardSigmoid, HardSwish, Neg, Abs) that
//! all produce the same shape and have one output leaving the group become one
//! `kiln::ElementwiseChain` node, which makes one pass over memory instead of one per op
//! (e.g. hard-swish written out as `x · Clip(x + 3, 0, 6) / 6`, or Add/Mul/Div chains).
//!
//! Grouping runs from the last node to the first: a fusable node joins the group of its
//! consumers when every consumer of its output is a fusable node of that same group (and
//! the output is not a graph output), otherwise it starts a group of its own. Only the
//! group's last node then has an output read outside the group, so the group has one
//! output and placing the fused node at that node's position keeps the order valid.
//! Operands of the group are values of the group's shape or one-element tensors
//! (broadcast); one-element f32 constants become immediates.

use std::collections::HashMap;

use kiln_core::{Attr, BuildCtx, DType, Dim, Graph, Node, OpRegistry, Result, ValueId};
use kiln_cpu::fused::KILN_DOMAIN;
use kiln_cpu::ops::elementwise::chain::{ChainOp, Instr, Program, CHAIN_OP, FAKE_QUANT_PARAMS};

/// An operand of one node's steps, before numbering.
#[derive(Debug, Clone, Copy)]
enum Local {
    /// The node's input at this position.
    Input(usize),
    /// An immediate.
    Const(f32),
    /// An earlier step of the same node.
    Step(usize),
    /// A FakeQuant's parameter block (consecutive immediates).
    Params([f32; FAKE_QUANT_PARAMS]),
}

/// The steps a node computes, when it is a fusable elementwise node.
fn steps_of(node: &Node) -> Option<Vec<(ChainOp, Local, Local)>> {
    let d = &node.desc;
    if d.domain == KILN_DOMAIN && d.op_type == CHAIN_OP {
        return chain_steps(node);
    }
    if !d.domain.is_empty() || node.outputs.len() != 1 {
        return None;
    }
    let n_in = node.inputs.iter().filter(|i| i.is_some()).count();
    let fattr = |name: &str| match d.attrs.get(name) {
        Some(Attr::Float(v)) => Some(*v),
        _ => None,
    };
    let x = Local::Input(0);
    let zero = Local::Const(0.0);
    let unary = |op: ChainOp| (n_in == 1).then(|| vec![(op, x, zero)]);
    let binary =
        |op: ChainOp| (n_in == 2 && node.inputs.len() == 2).then(|| vec![(op, x, Local::Input(1))]);
    match d.op_type.as_str() {
        "Add" => binary(ChainOp::Add),
        "Sub" => binary(ChainOp::Sub),
        "Mul" => binary(ChainOp::Mul),
        "Div" => binary(ChainOp::Div),
        "Max" => binary(ChainOp::Max),
        "Min" => binary(ChainOp::Min),
        "Relu" => unary(ChainOp::Relu),
        "Sigmoid" => unary(ChainOp::Sigmoid),
        "Tanh" => unary(ChainOp::Tanh),
        "HardSwish" => unary(ChainOp::HardSwish),
        "Neg" => unary(ChainOp::Neg),
        "Abs" => unary(ChainOp::Abs),
        "HardSigmoid" if n_in == 1 => {
            let alpha = fattr("alpha").unwrap_or(0.2);
            let beta = fattr("beta").unwrap_or(0.5);
            Some(vec![
                (ChainOp::Mul, x, Local::Const(alpha)),
                (ChainOp::Add, Local::Step(0), Local::Const(beta)),
                (ChainOp::Max, Local::Step(1), zero),
                (ChainOp::Min, Local::Step(2), Local::Const(1.0)),
            ])
        }
        "Clip" => {
            node.inputs.first().copied().flatten()?;
            let (lo, hi) = if d.opset < 11 {
                (
                    fattr("min").map(Local::Const),
                    fattr("max").map(Local::Const),
                )
            } else {
                let bound = |i: usize| {
                    node.inputs
                        .get(i)
                        .copied()
                        .flatten()
                        .map(|_| Local::Input(i))
                };
                (bound(1), bound(2))
            };
            let mut steps = Vec::new();
            let mut cur = x;
            if let Some(lo) = lo {
                steps.push((ChainOp::Max, cur, lo));
                cur = Local::Step(steps.len() - 1);
            }
            if let Some(hi) = hi {
                steps.push((ChainOp::Min, cur, hi));
            }
            if steps.is_empty() {
                // Clip without bounds is the identity: leave it to remove_identities.
                return None;
            }
            Some(steps)
        }
        _ => None,
    }
}

/// The steps of an existing chain node (e.g. one made by `fold_qdq_pairs`), so that
/// chains merge with their elementwise neighbours.
fn chain_steps(node: &Node) -> Option<Vec<(ChainOp, Local, Local)>> {
    if node.outputs.len() != 1 || node.inputs.iter().any(|i| i.is_none()) {
        return None;
    }
    let prog = Program::from_desc(&node.desc, &node.name, node.inputs.len()).ok()?;
    let base = prog.inputs + prog.constants.len();
    let local = |o: usize| {
        if o < prog.inputs {
            Local::Input(o)
        } else if o < base {
            Local::Const(prog.constants[o - prog.inputs])
        } else {
            Local::Step(o - base)
        }
    };
    Some(
        prog.instrs
            .iter()
            .map(|ins| {
                let b = if ins.op == ChainOp::FakeQuant {
                    Local::Params(prog.fake_quant_params(ins.b))
                } else if ins.op.is_binary() {
                    local(ins.b)
                } else {
                    Local::Const(0.0)
                };
                (ins.op, local(ins.a), b)
            })
            .collect(),
    )
}

/// The f32 shape of a value with every dim known or symbolic.
fn shape_of(graph: &Graph, v: ValueId) -> Option<&[Dim]> {
    let f = &graph.values[v].fact;
    if f.dtype != Some(DType::F32) {
        return None;
    }
    let s = f.shape.as_deref()?;
    s.iter().all(|d| !matches!(d, Dim::Unknown)).then_some(s)
}

fn is_one_element(s: &[Dim]) -> bool {
    s.iter().all(|d| d.known() == Some(1))
}

/// One node's chain steps (op, first operand, second operand) and its output shape.
type FusableNode = (Vec<(ChainOp, Local, Local)>, Vec<Dim>);

/// Fuses elementwise groups of two or more nodes; returns the number of groups made.
pub fn fuse_elementwise(graph: &mut Graph, registry: &OpRegistry) -> Result<usize> {
    let consumers = graph.consumers();
    let n = graph.nodes.len();
    // Per node: its steps and output shape when fusable.
    let info: Vec<Option<FusableNode>> = graph
        .nodes
        .iter()
        .map(|node| {
            let steps = steps_of(node)?;
            let y = node.outputs[0]?;
            let shape = shape_of(graph, y)?.to_vec();
            if is_one_element(&shape) {
                // Scalar arithmetic is not worth a chain (and its rank could not be
                // recovered from one-element operands).
                return None;
            }
            for i in node.inputs.iter() {
                let s = shape_of(graph, (*i)?)?;
                if s != shape.as_slice() && !(is_one_element(s) && s.len() <= shape.len()) {
                    return None;
                }
            }
            Some((steps, shape))
        })
        .collect();
    // Group by walking backwards.
    let mut group: Vec<Option<usize>> = vec![None; n];
    for i in (0..n).rev() {
        let Some((_, shape)) = &info[i] else { continue };
        let Some(y) = graph.nodes[i].outputs[0] else {
            continue;
        };
        let cs = &consumers[y];
        let joined = if graph.is_output(y) || cs.is_empty() {
            None
        } else {
            let g = group[cs[0]];
            let same = g.is_some()
                && cs.iter().all(|&c| group[c] == g)
                && info[g.unwrap_or(0)]
                    .as_ref()
                    .is_some_and(|(_, s)| s == shape);
            if same {
                g
            } else {
                None
            }
        };
        group[i] = Some(joined.unwrap_or(i));
    }
    let mut members: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, g) in group.iter().enumerate() {
        if let Some(g) = g {
            members.entry(*g).or_default().push(i);
        }
    }
    let mut roots: Vec<usize> = members
        .iter()
        .filter(|(_, m)| m.len() >= 2)
        .map(|(&r, _)| r)
        .collect();
    roots.sort_unstable();
    let mut remove = Vec::new();
    for &root in &roots {
        let mem = &members[&root];
        let mut inputs: Vec<ValueId> = Vec::new();
        let mut constants: Vec<f32> = Vec::new();
        // Operands are numbered after all inputs and constants are known: collect first
        // with placeholders, then renumber.
        enum Ref {
            In(usize),
            Const(usize),
            Res(usize),
        }
        let mut made: HashMap<ValueId, usize> = HashMap::new();
        let mut code: Vec<(ChainOp, Ref, Ref)> = Vec::new();
        for &m in mem {
            let node = &graph.nodes[m];
            let (steps, _) = info[m].as_ref().expect("members are fusable");
            let first = code.len();
            for &(op, a, b) in steps {
                let mut resolve = |l: Local| -> Ref {
                    match l {
                        Local::Const(c) => {
                            constants.push(c);
                            Ref::Const(constants.len() - 1)
                        }
                        Local::Params(p) => {
                            constants.extend_from_slice(&p);
                            Ref::Const(constants.len() - p.len())
                        }
                        Local::Step(s) => Ref::Res(first + s),
                        Local::Input(k) => {
                            let v = node.inputs[k].expect("fusable inputs are present");
                            if let Some(&r) = made.get(&v) {
                                return Ref::Res(r);
                            }
                            if let Some(t) = graph.constants.get(&v) {
                                if t.len() == 1 {
                                    if let Ok(s) = t.as_slice::<f32>() {
                                        constants.push(s[0]);
                                        return Ref::Const(constants.len() - 1);
                                    }
                                }
                            }
                            let pos = inputs.iter().position(|&x| x == v).unwrap_or_else(|| {
                                inputs.push(v);
                                inputs.len() - 1
                            });
                            Ref::In(pos)
                        }
                    }
                };
                let (ra, rb) = (resolve(a), resolve(b));
                code.push((op, ra, rb));
            }
            if let Some(y) = node.outputs[0] {
                made.insert(y, code.len() - 1);
            }
        }
        let (ni, nc) = (inputs.len(), constants.len());
        let num = |r: &Ref| match *r {
            Ref::In(i) => i,
            Ref::Const(c) => ni + c,
            Ref::Res(t) => ni + nc + t,
        };
        let prog = Program {
            inputs: ni,
            constants,
            instrs: code
                .iter()
                .map(|(op, a, b)| Instr {
                    op: *op,
                    a: num(a),
                    b: num(b),
                })
                .collect(),
        };
        prog.validate()?;
        let desc = prog.to_desc();
        let root_node = &graph.nodes[root];
        let name = format!("{}.chain", root_node.name);
        let op = registry.build(&BuildCtx {
            node: &name,
            desc: &desc,
            n_inputs: ni,
            n_outputs: 1,
        })?;
        let fused_from: Vec<String> = mem
            .iter()
            .flat_map(|&m| graph.nodes[m].fused_from.iter().cloned())
            .collect();
        let out = root_node.outputs[0];
        graph.nodes[root] = Node {
            name,
            desc,
            op,
            inputs: inputs.into_iter().map(Some).collect(),
            outputs: vec![out],
            fused_from,
        };
        remove.extend(mem.iter().copied().filter(|&m| m != root));
    }
    remove.sort_unstable_by(|a, b| b.cmp(a));
    for i in remove {
        graph.nodes.remove(i);
    }
    Ok(roots.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Fact, Tensor, Value};

    fn node(
        graph: &mut Graph,
        reg: &OpRegistry,
        op_type: &str,
        inputs: &[ValueId],
        out: &str,
    ) -> ValueId {
        crate::test_graph::add_node(graph, reg, 13, op_type, inputs, &[], out)
    }

    fn scalar(graph: &mut Graph, name: &str, v: f32) -> ValueId {
        crate::test_graph::add_constant(graph, name, Tensor::from_vec(&[], vec![v]).unwrap())
    }

    /// hard-swish written out, a residual Add, a Sigmoid·x gate, a one-element runtime
    /// operand, a per-channel (broadcast) constant that must stay outside, and an
    /// intermediate that is also a graph output.
    fn sample(reg: &OpRegistry) -> Graph {
        let mut g = Graph::default();
        let shape = [2, 3, 5, 7];
        let x = g.add_value("x", Fact::concrete(DType::F32, &shape));
        let r = g.add_value("r", Fact::concrete(DType::F32, &shape));
        let s = g.add_value("s", Fact::concrete(DType::F32, &[1]));
        g.inputs = vec![x, r, s];
        let three = scalar(&mut g, "three", 3.0);
        let zero = scalar(&mut g, "zero", 0.0);
        let six = scalar(&mut g, "six", 6.0);
        let chan = g.add_value("chan", Fact::concrete(DType::F32, &[3, 1, 1]));
        g.constants.insert(
            chan,
            Tensor::from_vec(&[3, 1, 1], vec![0.5f32, -1.0, 2.0]).unwrap(),
        );
        let a = node(&mut g, reg, "Add", &[x, three], "a");
        let c = node(&mut g, reg, "Clip", &[a, zero, six], "c");
        let m = node(&mut g, reg, "Mul", &[x, c], "m");
        let hs = node(&mut g, reg, "Div", &[m, six], "hs");
        let res = node(&mut g, reg, "Add", &[hs, r], "res");
        let sg = node(&mut g, reg, "Sigmoid", &[res], "sg");
        let gate = node(&mut g, reg, "Mul", &[res, sg], "gate");
        let sc = node(&mut g, reg, "Mul", &[gate, s], "sc");
        let pc = node(&mut g, reg, "Mul", &[sc, chan], "pc");
        let t = node(&mut g, reg, "Tanh", &[pc], "t");
        let out = node(&mut g, reg, "Sub", &[t, sc], "out");
        g.outputs = vec![out, res];
        g.infer_facts().unwrap();
        g
    }

    #[test]
    fn fused_graph_computes_what_the_unfused_graph_does() {
        let reg = kiln_cpu::registry();
        let plain = sample(&reg);
        let mut fused = plain.clone();
        let groups = fuse_elementwise(&mut fused, &reg).unwrap();
        fused.infer_facts().unwrap();
        // {a, c, m, hs, res} stops at `res` (a graph output); {sg, gate, sc} stops at sc
        // (read by pc and out); pc (broadcast constant) is alone; {t, out}.
        assert_eq!(
            groups,
            3,
            "{:#?}",
            fused.nodes.iter().map(|n| &n.name).collect::<Vec<_>>()
        );
        assert_eq!(fused.nodes.len(), 4);
        let mut lcg = 12345u64;
        let mut vals = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    lcg = lcg
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((lcg >> 40) as f32 / (1u64 << 24) as f32) * 10.0 - 5.0
                })
                .collect()
        };
        let inputs = vec![
            Value::from(Tensor::from_vec(&[2, 3, 5, 7], vals(210)).unwrap()),
            Value::from(Tensor::from_vec(&[2, 3, 5, 7], vals(210)).unwrap()),
            Value::from(Tensor::from_vec(&[1], vals(1)).unwrap()),
        ];
        let want = kiln_core::exec::run_graph(&plain, &inputs, &[]).unwrap();
        let got = kiln_core::exec::run_graph(&fused, &inputs, &[]).unwrap();
        for (w, g) in want.iter().zip(&got) {
            let (w, g) = (w.as_tensor().unwrap(), g.as_tensor().unwrap());
            assert_eq!(w.shape(), g.shape());
            for (a, b) in w
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .zip(g.as_slice::<f32>().unwrap())
            {
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
    }
}
