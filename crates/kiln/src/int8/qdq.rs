//! Explicit quantization: models that carry their own QuantizeLinear/DequantizeLinear pairs
//! (e.g. `onnxruntime.quantization.quantize_static` in the QDQ format) run their Conv,
//! MatMul and Gemm layers on the INT8 kernels with the model's scales and zero points, no
//! calibration cache needed.
//!
//! [`lower_qdq`] rewrites
//!
//! ```text
//! DequantizeLinear(xq) ─┐
//! DequantizeLinear(Wq) ─┼─ Conv | MatMul | Gemm ─ QuantizeLinear → yq
//! [bias: f32 or DequantizeLinear(int32)] ┘
//! ```
//!
//! into one `kiln.Int8Conv` / `kiln.Int8MatMul` reading `xq` (u8 or i8, its zero point
//! compensated exactly in the i32 sums) and writing `yq` (u8 or i8 with its zero point),
//! or, when no QuantizeLinear follows (or the product has other readers), the f32 product.
//! Conditions (anything else is left alone and runs through the reference
//! QuantizeLinear/DequantizeLinear ops and the float op, which is exact ONNX semantics):
//! per-tensor activation scales and zero points, int8 weights with zero points 0 and one
//! scale per tensor or per output channel (Conv axis 0; MatMul `[K, N]` axis 1; Gemm on its
//! N axis), constant weights and bias, the same channel criterion as calibrated INT8
//! (≥ 4 output and input channels per group, so depthwise convolutions stay float).
//!
//! The pass runs before the optimiser (whose constant folding would turn `DQ(Wq)` into
//! float weights) on CPU engines.

use kiln_core::{Attr, BuildCtx, DType, Fact, Graph, Node, OpDesc, Result, Tensor, ValueId};
use kiln_cpu::ops::int8 as k8;

use crate::engine::registry;

/// What [`lower_qdq`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QdqReport {
    /// QuantizeLinear + DequantizeLinear nodes in the graph before the pass.
    pub qdq_nodes: usize,
    /// Layers lowered to INT8 (source node names), in graph order.
    pub lowered: Vec<String>,
    /// Of those, how many also absorbed their QuantizeLinear (INT8 output).
    pub int8_outputs: usize,
}

pub(super) fn is_onnx(node: &Node, op: &str) -> bool {
    node.desc.op_type == op && (node.desc.domain.is_empty() || node.desc.domain == "ai.onnx")
}

/// A constant input of `node` (by index), if it has one.
fn konst<'a>(graph: &'a Graph, node: &Node, i: usize) -> Option<&'a Tensor> {
    let v = node.inputs.get(i).copied().flatten()?;
    graph.constants.get(&v)
}

/// A DequantizeLinear/QuantizeLinear's scale: f32 constant, `n` values or one.
pub(super) fn scales(graph: &Graph, node: &Node) -> Option<Vec<f32>> {
    let s = konst(graph, node, 1)?;
    if s.dtype() != DType::F32 {
        return None;
    }
    let v = s.as_slice::<f32>().ok()?.to_vec();
    v.iter().all(|x| x.is_finite() && *x > 0.0).then_some(v)
}

/// Per-tensor zero point of a Q/DQ node (`None` input: 0 of `default`), with its type.
pub(super) fn zero_point(graph: &Graph, node: &Node, default: DType) -> Option<(i32, DType)> {
    match node.inputs.get(2).copied().flatten() {
        None => Some((0, default)),
        Some(v) => {
            let t = graph.constants.get(&v)?;
            if t.len() != 1 {
                return None;
            }
            let z = match t.dtype() {
                DType::U8 => t.as_slice::<u8>().ok()?[0] as i32,
                DType::I8 => t.as_slice::<i8>().ok()?[0] as i32,
                _ => return None,
            };
            Some((z, t.dtype()))
        }
    }
}

pub(super) fn int_attr(desc: &OpDesc, name: &str, default: i64) -> i64 {
    match desc.attrs.get(name) {
        Some(Attr::Int(v)) => *v,
        _ => default,
    }
}

fn float_attr(desc: &OpDesc, name: &str, default: f32) -> f32 {
    match desc.attrs.get(name) {
        Some(Attr::Float(v)) => *v,
        _ => default,
    }
}

/// The activation side: `DequantizeLinear(xq, sx, zx)` with one scale and zero point.
struct ActIn {
    xq: ValueId,
    scale: f32,
    zp: i32,
}

fn act_in(graph: &Graph, producers: &[Option<usize>], v: ValueId) -> Option<ActIn> {
    let dq = &graph.nodes[producers[v]?];
    if !is_onnx(dq, "DequantizeLinear") {
        return None;
    }
    let xq = dq.inputs.first().copied().flatten()?;
    if graph.constants.contains_key(&xq) {
        return None;
    }
    let xdt = graph.values[xq].fact.dtype?;
    if !matches!(xdt, DType::U8 | DType::I8) {
        return None;
    }
    let s = scales(graph, dq)?;
    let (zp, zdt) = zero_point(graph, dq, xdt)?;
    (s.len() == 1 && zdt == xdt).then_some(ActIn {
        xq,
        scale: s[0],
        zp,
    })
}

/// The weight side: `DequantizeLinear(Wq const int8, scales, zero 0)`: the int8 values, their
/// shape, and one scale per index of `axis` (per tensor: broadcast).
fn weight_in(
    graph: &Graph,
    producers: &[Option<usize>],
    v: ValueId,
) -> Option<(Tensor, Vec<f32>, Option<usize>)> {
    let dq = &graph.nodes[producers[v]?];
    if !is_onnx(dq, "DequantizeLinear") {
        return None;
    }
    let w = konst(graph, dq, 0)?;
    if w.dtype() != DType::I8 {
        return None;
    }
    let s = scales(graph, dq)?;
    if let Some(z) = konst(graph, dq, 2) {
        if z.dtype() != DType::I8 || z.as_slice::<i8>().ok()?.iter().any(|&v| v != 0) {
            return None;
        }
    }
    if int_attr(&dq.desc, "block_size", 0) > 0 {
        return None;
    }
    let axis = if s.len() == 1 {
        None
    } else {
        let r = w.shape().len() as i64;
        let a = int_attr(&dq.desc, "axis", 1);
        let a = if a < 0 { a + r } else { a };
        if a < 0 || a >= r || w.shape()[a as usize] != s.len() {
            return None;
        }
        Some(a as usize)
    };
    Some((w.clone(), s, axis))
}

/// A bias: an f32 constant, or the DequantizeLinear of a constant (int32 bias).
fn bias_in(graph: &Graph, producers: &[Option<usize>], v: ValueId) -> Option<Vec<f32>> {
    if let Some(t) = graph.constants.get(&v) {
        if t.dtype() != DType::F32 {
            return None;
        }
        return Some(t.as_slice::<f32>().ok()?.to_vec());
    }
    let dq = &graph.nodes[producers[v]?];
    if !is_onnx(dq, "DequantizeLinear") {
        return None;
    }
    let q = konst(graph, dq, 0)?;
    let s = scales(graph, dq)?;
    let z = match konst(graph, dq, 2) {
        Some(z) => z.to_f64_vec().ok()?,
        None => vec![0.0],
    };
    let qv = q.to_f64_vec().ok()?;
    if q.shape().len() > 1
        || (s.len() != 1 && s.len() != qv.len())
        || (z.len() != 1 && z.len() != qv.len())
    {
        return None;
    }
    Some(
        qv.iter()
            .enumerate()
            // As DequantizeLinear computes it: (q − z) in f32 times the f32 scale.
            .map(|(i, &q)| (q - z[i % z.len()]) as f32 * s[i % s.len()])
            .collect(),
    )
}

/// The output side: the product's only reader is a per-tensor QuantizeLinear to u8/i8.
struct ActOut {
    q_node: usize,
    yq: ValueId,
    scale: f32,
    zp: i32,
    u8: bool,
}

fn act_out(graph: &Graph, consumers: &[Vec<usize>], y: ValueId) -> Option<ActOut> {
    if graph.is_output(y) || consumers[y].len() != 1 {
        return None;
    }
    let qi = consumers[y][0];
    let q = &graph.nodes[qi];
    if !is_onnx(q, "QuantizeLinear") || q.inputs.first().copied().flatten() != Some(y) {
        return None;
    }
    let yq = q.outputs.first().copied().flatten()?;
    let s = scales(graph, q)?;
    let default = match int_attr(&q.desc, "output_dtype", 0) {
        0 | 2 => DType::U8,
        3 => DType::I8,
        _ => return None,
    };
    let (zp, dt) = zero_point(graph, q, default)?;
    (s.len() == 1).then_some(ActOut {
        q_node: qi,
        yq,
        scale: s[0],
        zp,
        u8: dt == DType::U8,
    })
}

/// One planned rewrite.
struct Rewrite {
    node: usize,
    desc: OpDesc,
    weight: Tensor,
    bias: Option<Tensor>,
    xq: ValueId,
    out: Option<ActOut>,
}

/// Per-output-channel scales from a weight scale vector given on `axis` (or per tensor).
fn per_channel(s: &[f32], axis: Option<usize>, want_axis: usize, m: usize) -> Option<Vec<f32>> {
    match axis {
        None => Some(vec![s[0]; m]),
        Some(a) if a == want_axis && s.len() == m => Some(s.to_vec()),
        _ => None,
    }
}

fn plan(
    graph: &Graph,
    producers: &[Option<usize>],
    consumers: &[Vec<usize>],
    ni: usize,
) -> Option<Rewrite> {
    let node = &graph.nodes[ni];
    let kind = ["Conv", "MatMul", "Gemm"]
        .into_iter()
        .find(|k| is_onnx(node, k))?;
    if node.outputs.len() != 1 {
        return None;
    }
    let x = act_in(graph, producers, node.inputs.first().copied().flatten()?)?;
    let (w, ws, axis) = weight_in(graph, producers, node.inputs.get(1).copied().flatten()?)?;
    let bias = match node.inputs.get(2).copied().flatten() {
        Some(b) => Some(bias_in(graph, producers, b)?),
        None => None,
    };
    let y = node.outputs[0]?;
    let out = act_out(graph, consumers, y);
    let facts: Vec<Option<&Fact>> = node
        .inputs
        .iter()
        .map(|i| i.map(|v| &graph.values[v].fact))
        .collect();
    let (op_type, weight, w_scales, bias) = match kind {
        "Conv" => {
            if !k8::conv::lowerable(&node.desc, &facts) {
                return None;
            }
            let m = w.shape()[0];
            let s = per_channel(&ws, axis, 0, m)?;
            if bias.as_ref().is_some_and(|b| b.len() != m) {
                return None;
            }
            ("Int8Conv", w, s, bias)
        }
        _ => {
            let gemm = kind == "Gemm";
            if !k8::matmul::lowerable(&node.desc, &facts) || w.shape().len() != 2 {
                return None;
            }
            let trans_b = gemm && int_attr(&node.desc, "transB", 0) != 0;
            let (k, n) = if trans_b {
                (w.shape()[1], w.shape()[0])
            } else {
                (w.shape()[0], w.shape()[1])
            };
            let alpha = if gemm {
                float_attr(&node.desc, "alpha", 1.0)
            } else {
                1.0
            };
            if !(alpha.is_finite() && alpha > 0.0) {
                return None;
            }
            let s: Vec<f32> = per_channel(&ws, axis, if trans_b { 0 } else { 1 }, n)?
                .into_iter()
                .map(|v| v * alpha)
                .collect();
            let wv = w.as_slice::<i8>().ok()?;
            let wt: Vec<i8> = if trans_b {
                wv.to_vec()
            } else {
                let mut t = vec![0i8; n * k];
                for kk in 0..k {
                    for nn in 0..n {
                        t[nn * k + kk] = wv[kk * n + nn];
                    }
                }
                t
            };
            let bias = match (gemm, bias) {
                (true, Some(c)) => {
                    let beta = float_attr(&node.desc, "beta", 1.0);
                    match c.len() {
                        1 => Some(vec![c[0] * beta; n]),
                        l if l == n => Some(c.iter().map(|v| v * beta).collect()),
                        _ => return None,
                    }
                }
                (_, b) => b,
            };
            ("Int8MatMul", Tensor::from_vec(&[n, k], wt).ok()?, s, bias)
        }
    };
    let mut desc = OpDesc::new(kiln_cpu::fused::KILN_DOMAIN, op_type, 1);
    if op_type == "Int8Conv" {
        for (k, v) in &node.desc.attrs {
            desc.attrs.insert(k.clone(), v.clone());
        }
    }
    desc.attrs.insert(k8::X_SCALE.into(), Attr::Float(x.scale));
    desc.attrs
        .insert(k8::X_ZERO_POINT.into(), Attr::Int(x.zp as i64));
    desc.attrs
        .insert(k8::W_SCALES.into(), Attr::Floats(w_scales));
    match &out {
        Some(o) => {
            desc.attrs.insert(k8::Y_SCALE.into(), Attr::Float(o.scale));
            desc.attrs
                .insert(k8::Y_ZERO_POINT.into(), Attr::Int(o.zp as i64));
            desc.attrs
                .insert(k8::Y_DTYPE.into(), Attr::Int(if o.u8 { 2 } else { 3 }));
        }
        None => {
            desc.attrs.insert(k8::Y_DTYPE.into(), Attr::Int(1));
        }
    }
    let family = if op_type == "Int8Conv" {
        "conv"
    } else {
        "matmul"
    };
    desc.attrs.insert(
        kiln_core::tactic::TACTIC_ATTR.into(),
        Attr::String(format!("cpu.int8.{family}.{}", k8::explicit_isa().name())),
    );
    let bias = match bias {
        Some(b) => Some(Tensor::from_vec(&[b.len()], b).ok()?),
        None => None,
    };
    Some(Rewrite {
        node: ni,
        desc,
        weight,
        bias,
        xq: x.xq,
        out,
    })
}

/// Lowers every matched `DQ → Conv/MatMul/Gemm [→ Q]` of `graph` (see the module docs) and
/// removes the nodes that became dead. Facts are re-inferred by the caller.
pub fn lower_qdq(graph: &mut Graph) -> Result<QdqReport> {
    let mut report = QdqReport {
        qdq_nodes: graph
            .nodes
            .iter()
            .filter(|n| is_onnx(n, "QuantizeLinear") || is_onnx(n, "DequantizeLinear"))
            .count(),
        ..Default::default()
    };
    if report.qdq_nodes == 0 {
        return Ok(report);
    }
    let producers = graph.producers();
    let consumers = graph.consumers();
    let rewrites: Vec<Rewrite> = (0..graph.nodes.len())
        .filter_map(|ni| plan(graph, &producers, &consumers, ni))
        .collect();
    let mut dead_q = Vec::new();
    for rw in rewrites {
        let name = graph.nodes[rw.node].name.clone();
        let wid = graph.add_value(
            format!("{name}:qdq_weight"),
            Fact::concrete(DType::I8, rw.weight.shape()),
        );
        graph.constants.insert(wid, rw.weight);
        let mut inputs = vec![Some(rw.xq), Some(wid)];
        if let Some(b) = rw.bias {
            let bid = graph.add_value(
                format!("{name}:qdq_bias"),
                Fact::concrete(DType::F32, b.shape()),
            );
            graph.constants.insert(bid, b);
            inputs.push(Some(bid));
        }
        let op = registry().build(&BuildCtx {
            node: &name,
            desc: &rw.desc,
            n_inputs: inputs.len(),
            n_outputs: 1,
        })?;
        let node = &mut graph.nodes[rw.node];
        if let Some(o) = &rw.out {
            node.outputs = vec![Some(o.yq)];
            dead_q.push(o.q_node);
            report.int8_outputs += 1;
        }
        let q_name = rw.out.as_ref().map(|o| o.q_node);
        node.inputs = inputs;
        node.desc = rw.desc;
        node.op = op;
        report.lowered.push(name);
        if let Some(qi) = q_name {
            let qn = graph.nodes[qi].name.clone();
            graph.nodes[rw.node].fused_from.push(qn);
        }
    }
    dead_q.sort_unstable();
    for qi in dead_q.into_iter().rev() {
        graph.nodes.remove(qi);
    }
    kiln_core::passes::remove_dead_nodes(graph)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Value;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 >> 11
        }
        /// Uniform in [lo, hi).
        fn f(&mut self, lo: f32, hi: f32) -> f32 {
            lo + (hi - lo) * (self.next() % 1_000_000) as f32 / 1e6
        }
        fn i8(&mut self) -> i8 {
            ((self.next() % 255) as i32 - 127) as i8
        }
    }

    fn konst(g: &mut Graph, name: &str, t: Tensor) -> ValueId {
        crate::test_graph::add_constant(g, name, t)
    }

    fn node(
        g: &mut Graph,
        op: &str,
        inputs: &[ValueId],
        attrs: &[(&str, Attr)],
        out: &str,
    ) -> ValueId {
        crate::test_graph::add_node(g, registry(), 21, op, inputs, attrs, out)
    }

    /// Scale and zero point constants of one activation quantizer.
    fn qparams(g: &mut Graph, name: &str, scale: f32, zp: i32, u8: bool) -> (ValueId, ValueId) {
        let s = konst(
            g,
            &format!("{name}_s"),
            Tensor::from_vec(&[], vec![scale]).unwrap(),
        );
        let z = if u8 {
            Tensor::from_vec(&[], vec![zp as u8]).unwrap()
        } else {
            Tensor::from_vec(&[], vec![zp as i8]).unwrap()
        };
        (s, konst(g, &format!("{name}_z"), z))
    }

    /// Which product the synthetic model wraps in Q/DQ.
    #[derive(Clone, Copy, Debug)]
    enum Case {
        /// Conv: (n, c, m, group, h, w, k, stride, pad), trailing Q or not.
        Conv([usize; 9], bool),
        /// MatMul: (batch, rows, k, n).
        MatMul([usize; 4]),
        /// Gemm with transB, alpha, beta and a per-column C.
        Gemm([usize; 3]),
    }

    /// `x → Q → DQ → op(DQ(W), bias) [→ Q → DQ]`, with u8 activations (Conv; zero points
    /// 37 in, 140 out) or i8 ones (MatMul/Gemm; zero points −9 in, 5 out), per-channel
    /// weight scales, an int32 DequantizeLinear bias (Conv) or an f32 one.
    fn model(case: Case, rng: &mut Rng) -> (Graph, Vec<usize>) {
        let mut g = Graph::default();
        let (xshape, u8) = match case {
            Case::Conv([n, c, _, _, h, w, ..], _) => (vec![n, c, h, w], true),
            Case::MatMul([b, r, k, _]) => (vec![b, r, k], false),
            Case::Gemm([r, k, _]) => (vec![r, k], false),
        };
        let x = g.add_value("x", Fact::concrete(DType::F32, &xshape));
        g.inputs = vec![x];
        let sx = 0.031;
        let (zx, zy) = if u8 { (37, 140) } else { (-9, 5) };
        let (s, z) = qparams(&mut g, "x", sx, zx, u8);
        let xq = node(&mut g, "QuantizeLinear", &[x, s, z], &[], "xq");
        let xd = node(&mut g, "DequantizeLinear", &[xq, s, z], &[], "xd");
        let mut trailing_q = true;
        let y = match case {
            Case::Conv([_, c, m, group, _, _, k, stride, pad], q) => {
                trailing_q = q;
                let wshape = [m, c / group, k, k];
                let wq: Vec<i8> = (0..wshape.iter().product()).map(|_| rng.i8()).collect();
                let ws: Vec<f32> = (0..m).map(|_| rng.f(0.002, 0.02)).collect();
                let w = konst(&mut g, "wq", Tensor::from_vec(&wshape, wq).unwrap());
                let wsc = konst(&mut g, "ws", Tensor::from_vec(&[m], ws.clone()).unwrap());
                let wd = node(
                    &mut g,
                    "DequantizeLinear",
                    &[w, wsc],
                    &[("axis", Attr::Int(0))],
                    "wd",
                );
                let bq: Vec<i32> = (0..m).map(|_| (rng.next() % 2001) as i32 - 1000).collect();
                let bs: Vec<f32> = ws.iter().map(|w| w * sx).collect();
                let b = konst(&mut g, "bq", Tensor::from_vec(&[m], bq).unwrap());
                let bsc = konst(&mut g, "bs", Tensor::from_vec(&[m], bs).unwrap());
                let bd = node(
                    &mut g,
                    "DequantizeLinear",
                    &[b, bsc],
                    &[("axis", Attr::Int(0))],
                    "bd",
                );
                let attrs = [
                    ("group", Attr::Int(group as i64)),
                    ("strides", Attr::Ints(vec![stride as i64; 2])),
                    ("pads", Attr::Ints(vec![pad as i64; 4])),
                    ("kernel_shape", Attr::Ints(vec![k as i64; 2])),
                ];
                node(&mut g, "Conv", &[xd, wd, bd], &attrs, "conv")
            }
            Case::MatMul([_, _, k, n]) => {
                let wq: Vec<i8> = (0..k * n).map(|_| rng.i8()).collect();
                let ws: Vec<f32> = (0..n).map(|_| rng.f(0.002, 0.02)).collect();
                let w = konst(&mut g, "wq", Tensor::from_vec(&[k, n], wq).unwrap());
                let wsc = konst(&mut g, "ws", Tensor::from_vec(&[n], ws).unwrap());
                let wd = node(
                    &mut g,
                    "DequantizeLinear",
                    &[w, wsc],
                    &[("axis", Attr::Int(1))],
                    "wd",
                );
                node(&mut g, "MatMul", &[xd, wd], &[], "mm")
            }
            Case::Gemm([_, k, n]) => {
                let wq: Vec<i8> = (0..k * n).map(|_| rng.i8()).collect();
                let ws: Vec<f32> = (0..n).map(|_| rng.f(0.002, 0.02)).collect();
                let w = konst(&mut g, "wq", Tensor::from_vec(&[n, k], wq).unwrap());
                let wsc = konst(&mut g, "ws", Tensor::from_vec(&[n], ws).unwrap());
                let wd = node(
                    &mut g,
                    "DequantizeLinear",
                    &[w, wsc],
                    &[("axis", Attr::Int(0))],
                    "wd",
                );
                let cv: Vec<f32> = (0..n).map(|_| rng.f(-1.0, 1.0)).collect();
                let c = konst(&mut g, "c", Tensor::from_vec(&[n], cv).unwrap());
                let attrs = [
                    ("transB", Attr::Int(1)),
                    ("alpha", Attr::Float(0.75)),
                    ("beta", Attr::Float(1.5)),
                ];
                node(&mut g, "Gemm", &[xd, wd, c], &attrs, "gemm")
            }
        };
        let out = if trailing_q {
            let (s, z) = qparams(&mut g, "y", 0.043, zy, u8);
            let yq = node(&mut g, "QuantizeLinear", &[y, s, z], &[], "yq");
            node(&mut g, "DequantizeLinear", &[yq, s, z], &[], "yd")
        } else {
            y
        };
        g.outputs = vec![out];
        g.infer_facts().unwrap();
        (g, xshape)
    }

    /// The lowered INT8 graph against the reference Q/DQ + float op graph, on random
    /// inputs spread over the quantizer's whole range (and past it: saturation).
    #[test]
    fn lowered_qdq_layers_match_the_reference_qdq_graph() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let cases = [
            Case::Conv([1, 5, 8, 1, 9, 7, 3, 1, 1], true),
            Case::Conv([2, 8, 12, 2, 11, 10, 3, 2, 1], true),
            Case::Conv([1, 6, 7, 1, 13, 5, 5, 1, 2], true),
            Case::Conv([1, 4, 9, 1, 6, 6, 1, 1, 0], false),
            Case::Conv([1, 7, 5, 1, 8, 9, 3, 2, 1], false),
            Case::MatMul([2, 3, 37, 9]),
            Case::MatMul([1, 70, 64, 5]),
            Case::Gemm([5, 33, 11]),
        ];
        for case in cases {
            let (plain, xshape) = model(case, &mut rng);
            let mut lowered = plain.clone();
            let report = lower_qdq(&mut lowered).unwrap();
            lowered.infer_facts().unwrap();
            assert_eq!(report.lowered.len(), 1, "{case:?}: nothing lowered");
            let int8 = lowered
                .nodes
                .iter()
                .filter(|n| n.desc.op_type.starts_with("Int8"))
                .count();
            assert_eq!(int8, 1, "{case:?}");
            let xs: Vec<f32> = (0..xshape.iter().product())
                .map(|_| rng.f(-2.5, 6.0))
                .collect();
            let x = [Value::Tensor(Tensor::from_vec(&xshape, xs).unwrap())];
            let want = kiln_core::exec::run_graph(&plain, &x, &[]).unwrap();
            let got = kiln_core::exec::run_graph(&lowered, &x, &[]).unwrap();
            let (w, g) = (want[0].as_tensor().unwrap(), got[0].as_tensor().unwrap());
            assert_eq!(w.shape(), g.shape(), "{case:?}");
            let (w, g) = (w.as_slice::<f32>().unwrap(), g.as_slice::<f32>().unwrap());
            let trailing_q = !matches!(case, Case::Conv(_, false));
            if trailing_q {
                // Dequantized codes: equal, or one step apart where the float reference's
                // sum lands within rounding error of a half step (rare).
                let step = 0.043;
                let mut off = 0;
                for (a, b) in w.iter().zip(g) {
                    let d = ((a - b) / step).abs();
                    assert!(d < 1.01, "{case:?}: {a} vs {b}");
                    off += usize::from(d > 0.5);
                }
                assert!(
                    off * 200 <= w.len(),
                    "{case:?}: {off} of {} values off by a step",
                    w.len()
                );
                let distinct: std::collections::BTreeSet<i64> =
                    w.iter().map(|v| (v / step).round() as i64).collect();
                assert!(
                    distinct.len() > 20,
                    "{case:?}: degenerate output {distinct:?}"
                );
            } else {
                // f32 output: exact integer sums, one f32 rounding of the scale product.
                for (a, b) in w.iter().zip(g) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                        "{case:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Layers the pass must leave alone: per-tensor-only activations, non-zero weight zero
    /// points, depthwise convolutions.
    #[test]
    fn unsupported_patterns_are_left_to_the_reference_ops() {
        let mut rng = Rng(7);
        // Depthwise: group == channels.
        let (mut g, _) = model(Case::Conv([1, 8, 8, 8, 6, 6, 3, 1, 1], true), &mut rng);
        assert!(lower_qdq(&mut g).unwrap().lowered.is_empty());
        // A non-zero weight zero point.
        let (mut g, _) = model(Case::MatMul([1, 4, 16, 8]), &mut rng);
        let dq = g.nodes.iter().position(|n| n.name == "wd").unwrap();
        let z = konst(&mut g, "wz", Tensor::from_vec(&[8], vec![1i8; 8]).unwrap());
        g.nodes[dq].inputs.push(Some(z));
        assert!(lower_qdq(&mut g).unwrap().lowered.is_empty());
    }
}
