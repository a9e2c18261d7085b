//! Residual additions fused into the convolution that feeds them:
//! `Y = act?(Add(Conv(X, W, B), R))` (either Add input order) becomes one `kiln.Conv` that
//! reads R as its residual input ([`kiln_cpu::ops::conv::RESIDUAL_INPUT`]) and adds it in
//! the GEMM store (or the tail pass of the direct and Winograd kernels) before the
//! activation, which [`crate::optimize::fuse_activations`] then fuses as usual. The Conv's
//! output is never written to memory on its own and the Add's pass over three tensors
//! disappears.
//!
//! CPU engines only (the builder runs it next to the elementwise fusion): the GPU lowering
//! has no residual epilogue and leaves such a layer to the CPU.
//!
//! Conditions, all general: the Conv has no fused activation yet (ONNX order is conv → add
//! → act: `act(conv) + R` cannot take the residual) and no residual yet; its output is f32,
//! of a known static shape, read by the Add alone and not a graph output; the Add's other
//! input R is f32 of exactly the output's shape (no broadcasting) and is not the Conv's own
//! output. The fused layer takes the Add's place in the node order, so R may be computed
//! after the Conv.

use kiln_core::{Attr, DType, Graph, OpRegistry, Result};
use kiln_cpu::fused::{ACTIVATION_ATTR, KILN_DOMAIN};
use kiln_cpu::ops::conv::RESIDUAL_INPUT;

use crate::optimize::{is_plain, rebuild, sole_consumer};

/// Whether node `ci` is a Conv that may take a residual: default domain, or kiln's fused
/// Conv with no activation (or `None`) and no residual yet.
fn takes_residual(graph: &Graph, ci: usize) -> bool {
    let n = &graph.nodes[ci];
    let d = &n.desc;
    if d.op_type != "Conv" || n.outputs.len() != 1 || n.inputs.len() > RESIDUAL_INPUT {
        return false;
    }
    if d.domain.is_empty() {
        return true;
    }
    d.domain == KILN_DOMAIN
        && match d.attrs.get(ACTIVATION_ATTR) {
            None => true,
            Some(Attr::String(s)) => s == "None",
            Some(_) => false,
        }
}

/// One fusable `(conv, add, residual)` triple, if the graph has one.
fn find(graph: &Graph) -> Option<(usize, usize, usize)> {
    let consumers = graph.consumers();
    for ci in 0..graph.nodes.len() {
        if !takes_residual(graph, ci) {
            continue;
        }
        let Some(y) = graph.nodes[ci].outputs[0] else {
            continue;
        };
        let yf = &graph.values[y].fact;
        let Some(shape) = yf.concrete_shape() else {
            continue;
        };
        if yf.dtype != Some(DType::F32) {
            continue;
        }
        // Read once (an Add(y, y) reads it twice), by one node, not a graph output.
        let Some(ai) = sole_consumer(graph, &consumers, y) else {
            continue;
        };
        let add = &graph.nodes[ai];
        if !is_plain(graph, ai, "Add") || add.inputs.len() != 2 || add.outputs.len() != 1 {
            continue;
        }
        let r = match (add.inputs[0], add.inputs[1]) {
            (Some(a), Some(r)) if a == y => r,
            (Some(r), Some(b)) if b == y => r,
            _ => continue,
        };
        let rf = &graph.values[r].fact;
        if r == y || rf.dtype != Some(DType::F32) || rf.concrete_shape() != Some(shape.clone()) {
            continue;
        }
        let Some(out) = add.outputs[0] else { continue };
        if graph.values[out].fact.dtype != Some(DType::F32) {
            continue;
        }
        return Some((ci, ai, r));
    }
    None
}

/// Fuses every `Conv → Add(same-shape f32 tensor)` into the Conv (see the module doc), then
/// the activations that follow; returns how many Adds were fused.
pub fn fuse_residual_adds(graph: &mut Graph, registry: &OpRegistry) -> Result<usize> {
    let mut fused = 0;
    while let Some((ci, ai, r)) = find(graph) {
        let mut conv = graph.nodes[ci].clone();
        let add = &graph.nodes[ai];
        conv.inputs.resize(RESIDUAL_INPUT, None);
        conv.inputs.push(Some(r));
        conv.outputs[0] = add.outputs[0];
        conv.fused_from.extend(add.fused_from.iter().cloned());
        conv.desc.domain = KILN_DOMAIN.to_string();
        // The fused layer runs where the Add ran: R may be produced after the Conv.
        graph.nodes[ai] = conv;
        rebuild(graph, ai, registry)?;
        graph.nodes.remove(ci);
        fused += 1;
    }
    if fused > 0 {
        graph.infer_facts()?;
        crate::optimize::fuse_activations(graph, registry)?;
    }
    Ok(fused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_graph::{add_constant, add_node};
    use kiln_core::{Fact, Tensor, Value, ValueId};

    /// Values in [-1, 1), never all zero.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn constant(g: &mut Graph, name: &str, shape: &[usize], seed: u64) -> ValueId {
        let n = shape.iter().product();
        add_constant(g, name, Tensor::from_vec(shape, values(n, seed)).unwrap())
    }

    /// A convolution's input shape, weight shape, group and other attributes.
    type Geometry<'a> = (&'a [usize], &'a [usize], usize, Vec<(&'a str, Attr)>);

    /// How the residual reaches the Add.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Residual {
        /// Another convolution of the input, computed before the Conv.
        Before,
        /// The same, computed after the Conv (the fused layer must run at the Add).
        After,
        /// The graph's second input.
        Input,
        /// A second input that broadcasts (1 × M × 1 × 1): must not fuse.
        Broadcast,
    }

    /// `x → Conv(geometry) → Add(R) [→ act]`, with R as `res` says and the Add's inputs in
    /// order `swap`. Returns the graph and its inputs.
    fn graph(
        reg: &OpRegistry,
        (xs, ws, group, attrs): Geometry<'_>,
        res: Residual,
        swap: bool,
        act: Option<&str>,
        seed: u64,
    ) -> (Graph, Vec<Value>) {
        let mut g = Graph::default();
        let x = g.add_value("x", Fact::concrete(DType::F32, xs));
        g.inputs = vec![x];
        let w = constant(&mut g, "w", ws, seed);
        let b = constant(&mut g, "b", &[ws[0]], seed + 1);
        let mut attrs = attrs;
        attrs.push(("group", Attr::Int(group as i64)));
        let mut inputs = vec![Value::from(
            Tensor::from_vec(xs, values(xs.iter().product(), seed + 2)).unwrap(),
        )];
        // The residual branch: a conv of the same geometry (other weights), before or after.
        let w2 = constant(&mut g, "w2", ws, seed + 3);
        let side = |g: &mut Graph| add_node(g, reg, 13, "Conv", &[x, w2], &attrs, "side");
        let mut r = None;
        if res == Residual::Before {
            r = Some(side(&mut g));
        }
        let y = add_node(&mut g, reg, 13, "Conv", &[x, w, b], &attrs, "y");
        g.infer_facts().unwrap();
        let ys = g.values[y].fact.concrete_shape().unwrap();
        let r = match res {
            Residual::Before => r.unwrap(),
            Residual::After => side(&mut g),
            Residual::Input | Residual::Broadcast => {
                let rs: Vec<usize> = if res == Residual::Input {
                    ys.to_vec()
                } else {
                    vec![1, ys[1], 1, 1]
                };
                let r = g.add_value("r", Fact::concrete(DType::F32, &rs));
                g.inputs.push(r);
                inputs.push(Value::from(
                    Tensor::from_vec(&rs, values(rs.iter().product(), seed + 4)).unwrap(),
                ));
                r
            }
        };
        let ins = if swap { [r, y] } else { [y, r] };
        let mut out = add_node(&mut g, reg, 13, "Add", &ins, &[], "sum");
        if let Some(op) = act {
            let mut ins = vec![out];
            if op == "Clip" {
                let lo = add_constant(&mut g, "lo", Tensor::from_vec(&[], vec![-0.5f32]).unwrap());
                let hi = add_constant(&mut g, "hi", Tensor::from_vec(&[], vec![0.75f32]).unwrap());
                ins.extend([lo, hi]);
            }
            out = add_node(&mut g, reg, 13, op, &ins, &[], "out");
        }
        g.outputs = vec![out];
        g.infer_facts().unwrap();
        (g, inputs)
    }

    fn run(g: &Graph, inputs: &[Value]) -> Vec<f32> {
        let out = kiln_core::exec::run_graph(g, inputs, &[]).unwrap();
        out[0]
            .as_tensor()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    fn ints(v: &[i64]) -> Attr {
        Attr::Ints(v.to_vec())
    }

    /// Fused and unfused graphs agree for 1-D/2-D/3-D, grouped, depthwise, strided,
    /// dilated and pointwise convolutions, with the residual from before or after the
    /// Conv or from a graph input, either Add order, and no / Relu / Clip / HardSwish /
    /// Sigmoid after; the Add and the activation disappear into the Conv.
    #[test]
    fn fused_graph_matches_the_unfused_one() {
        let reg = kiln_cpu::registry();
        let geometries: Vec<Geometry<'_>> = vec![
            (
                &[1, 3, 7, 9],
                &[5, 3, 3, 3],
                1,
                vec![("pads", ints(&[1, 1, 1, 1]))],
            ),
            (
                &[2, 6, 9, 8],
                &[6, 1, 3, 3],
                6,
                vec![("pads", ints(&[1, 0, 1, 2]))],
            ),
            (
                &[1, 4, 11, 10],
                &[6, 2, 3, 3],
                2,
                vec![("strides", ints(&[2, 2])), ("pads", ints(&[1, 1, 1, 1]))],
            ),
            (&[1, 5, 6, 7], &[7, 5, 1, 1], 1, vec![]),
            (
                &[1, 3, 17],
                &[4, 3, 5],
                1,
                vec![("dilations", ints(&[2])), ("pads", ints(&[4, 4]))],
            ),
            (
                &[1, 2, 4, 5, 6],
                &[3, 2, 3, 3, 3],
                1,
                vec![("pads", ints(&[1, 1, 1, 1, 1, 1]))],
            ),
            (
                &[3, 5, 3, 4],
                &[9, 5, 3, 3],
                1,
                vec![("pads", ints(&[1, 1, 1, 1]))],
            ),
            (
                &[1, 32, 9, 11],
                &[33, 32, 3, 3],
                1,
                vec![("pads", ints(&[1, 1, 1, 1]))],
            ),
        ];
        let acts = [
            None,
            Some("Relu"),
            Some("Clip"),
            Some("HardSwish"),
            Some("Sigmoid"),
        ];
        let residuals = [Residual::Before, Residual::After, Residual::Input];
        for (gi, geo) in geometries.into_iter().enumerate() {
            for (k, res) in residuals.into_iter().enumerate() {
                for (ai, act) in acts.into_iter().enumerate() {
                    let seed = (gi * 100 + k * 10 + ai) as u64;
                    let swap = (gi + k + ai) % 2 == 1;
                    let (mut g, inputs) = graph(&reg, geo.clone(), res, swap, act, seed);
                    let want = run(&g, &inputs);
                    let nodes = g.nodes.len();
                    let what = format!("geometry {gi}, {res:?}, {act:?}, swap {swap}");
                    assert_eq!(fuse_residual_adds(&mut g, &reg).unwrap(), 1, "{what}");
                    let gone = 1 + usize::from(act.is_some());
                    assert_eq!(g.nodes.len(), nodes - gone, "{what}");
                    let fused = g.nodes.iter().find(|n| n.inputs.len() > RESIDUAL_INPUT);
                    let fused = fused.expect("a Conv with a residual");
                    assert_eq!(fused.desc.domain, KILN_DOMAIN);
                    assert_eq!(fused.outputs[0], g.outputs.first().copied(), "{what}");
                    let got = run(&g, &inputs);
                    assert!(want.iter().any(|&v| v != 0.0));
                    let scale = want.iter().fold(1.0f32, |a, &v| a.max(v.abs()));
                    for (p, q) in want.iter().zip(&got) {
                        assert!((p - q).abs() <= 1e-4 * scale, "{what}: {p} vs {q}");
                    }
                }
            }
        }
    }

    /// No fusion: a broadcast residual, a Conv output read twice or that is a graph
    /// output, an Add of the Conv output with itself, a Conv that already has an activation.
    #[test]
    fn fusion_declines() {
        let reg = kiln_cpu::registry();
        let geo = || -> Geometry<'_> {
            (
                &[1, 3, 7, 9],
                &[5, 3, 3, 3],
                1,
                vec![("pads", ints(&[1, 1, 1, 1]))],
            )
        };
        // Broadcast R.
        let (mut g, _) = graph(&reg, geo(), Residual::Broadcast, false, None, 1);
        assert_eq!(fuse_residual_adds(&mut g, &reg).unwrap(), 0);
        let idx = |g: &Graph, name: &str| g.nodes.iter().position(|n| n.name == name).unwrap();
        // The conv output also read by another node.
        let (mut g, _) = graph(&reg, geo(), Residual::Input, false, None, 2);
        let y = g.nodes[idx(&g, "y")].outputs[0].unwrap();
        let extra = add_node(&mut g, &reg, 13, "Relu", &[y], &[], "extra");
        g.outputs.push(extra);
        assert_eq!(fuse_residual_adds(&mut g, &reg).unwrap(), 0);
        // The conv output is a graph output.
        let (mut g, _) = graph(&reg, geo(), Residual::Input, true, None, 3);
        let y = g.nodes[idx(&g, "y")].outputs[0].unwrap();
        g.outputs.push(y);
        assert_eq!(fuse_residual_adds(&mut g, &reg).unwrap(), 0);
        // Add(y, y).
        let (mut g, _) = graph(&reg, geo(), Residual::Input, false, None, 4);
        let y = g.nodes[idx(&g, "y")].outputs[0].unwrap();
        let ai = idx(&g, "sum");
        g.nodes[ai].inputs = vec![Some(y), Some(y)];
        assert_eq!(fuse_residual_adds(&mut g, &reg).unwrap(), 0);
        // Conv → Relu → Add: the activation fuses first and comes before the sum.
        let (mut g, _) = graph(&reg, geo(), Residual::Input, false, None, 5);
        let y = g.nodes[idx(&g, "y")].outputs[0].unwrap();
        let relu = add_node(&mut g, &reg, 13, "Relu", &[y], &[], "relu");
        let node = g.nodes.pop().unwrap();
        let ai = idx(&g, "sum");
        g.nodes.insert(ai, node);
        g.nodes[ai + 1].inputs[0] = Some(relu);
        g.infer_facts().unwrap();
        assert_eq!(crate::optimize::fuse_activations(&mut g, &reg).unwrap(), 1);
        assert!(g.nodes[idx(&g, "y")]
            .desc
            .attrs
            .contains_key(ACTIVATION_ATTR));
        assert_eq!(fuse_residual_adds(&mut g, &reg).unwrap(), 0);
    }
}
