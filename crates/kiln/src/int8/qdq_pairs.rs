//! Explicit quantization: the QuantizeLinear → DequantizeLinear pairs that a Q/DQ model
//! keeps between its float ops (Add, Mul, HardSigmoid, depthwise Conv, ...) become one f32
//! → f32 `kiln::ElementwiseChain` each ("fake quantization"), which the elementwise fusion
//! then merges with the float ops around it.
//!
//! Without this, every such pair is two passes over memory (f32 → u8, u8 → f32) and splits
//! the elementwise chains into single ops. The chain step (`ChainOp::FakeQuant`, one
//! instruction kept in registers) computes exactly what the pair does (kiln's vectorised
//! QuantizeLinear/DequantizeLinear kernels, bit for bit):
//!
//! ```text
//! d = x / scale                      (f32 division, as QuantizeLinear)
//! d = NaN ? −zp : d                  (QuantizeLinear writes code 0 for NaN)
//! r = round_half_even(clamp(d, lo − zp, hi − zp))
//! y = r · scale + 0                  (DequantizeLinear: (q − zp) · scale; +0 turns −0 into +0)
//! ```
//!
//! Conditions: per-tensor f32 scale and u8/i8 zero point (constants), the DequantizeLinear
//! with bit-identical parameters, f32 in and out, no blocked quantization. Each matching
//! DequantizeLinear is replaced in place; the QuantizeLinear stays while anything else
//! (e.g. a `kiln.Int8Conv`) reads its integer output. CPU engines only (the GPU executor has
//! no chain layer); the builder runs it before the elementwise fusion.
//!
//! Measured on PP-OCR det QDQ (1 thread, interleaved ×5): 126 → 111 ms. Written as seven
//! separate chain steps the pair made the engine slower (each step one pass over a scratch
//! chunk); one FakeQuant step keeps the pair in registers (docs/int8.md).

use kiln_core::{BuildCtx, DType, Graph, Node, Result, ValueId};
use kiln_cpu::ops::elementwise::chain::{ChainOp, Instr, Program};

use super::qdq::{int_attr, is_onnx, scales, zero_point};
use crate::engine::registry;

/// The per-tensor parameters of a QuantizeLinear/DequantizeLinear pair.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PairParams {
    scale: f32,
    zp: i32,
    code: DType,
}

impl PairParams {
    /// The chain that computes `DequantizeLinear(QuantizeLinear(x))` with these parameters:
    /// one FakeQuant instruction (the whole pair in registers).
    fn program(self) -> Program {
        let (lo, hi) = match self.code {
            DType::I8 => (i8::MIN as i32, i8::MAX as i32),
            _ => (u8::MIN as i32, u8::MAX as i32),
        };
        let z = self.zp;
        // Operand 0: x; constants 1..=4, FakeQuant's parameter block.
        Program {
            inputs: 1,
            constants: vec![self.scale, -z as f32, (lo - z) as f32, (hi - z) as f32],
            instrs: vec![Instr {
                op: ChainOp::FakeQuant,
                a: 0,
                b: 1,
            }],
        }
    }
}

/// The parameters of a QuantizeLinear node the pair rewrite accepts.
fn quantize_params(graph: &Graph, q: &Node) -> Option<PairParams> {
    if !is_onnx(q, "QuantizeLinear") || int_attr(&q.desc, "block_size", 0) != 0 {
        return None;
    }
    let x = q.inputs.first().copied().flatten()?;
    if graph.constants.contains_key(&x) || graph.values[x].fact.dtype != Some(DType::F32) {
        return None;
    }
    let s = scales(graph, q)?;
    let default = match int_attr(&q.desc, "output_dtype", 0) {
        0 | 2 => DType::U8,
        3 => DType::I8,
        _ => return None,
    };
    let (zp, code) = zero_point(graph, q, default)?;
    let y = q.outputs.first().copied().flatten()?;
    if graph.values[y].fact.dtype.is_some_and(|d| d != code) {
        return None;
    }
    (s.len() == 1).then_some(PairParams {
        scale: s[0],
        zp,
        code,
    })
}

/// The parameters of a DequantizeLinear reading an integer tensor of type `code`.
fn dequantize_params(graph: &Graph, dq: &Node, code: DType) -> Option<PairParams> {
    if !is_onnx(dq, "DequantizeLinear")
        || int_attr(&dq.desc, "block_size", 0) != 0
        || !matches!(int_attr(&dq.desc, "output_dtype", 0), 0 | 1)
    {
        return None;
    }
    let y = dq.outputs.first().copied().flatten()?;
    if graph.values[y].fact.dtype != Some(DType::F32) {
        return None;
    }
    let s = scales(graph, dq)?;
    let (zp, zdt) = zero_point(graph, dq, code)?;
    (s.len() == 1 && zdt == code).then_some(PairParams {
        scale: s[0],
        zp,
        code,
    })
}

/// Rewrites every QuantizeLinear → DequantizeLinear pair with equal per-tensor parameters
/// into a chain; returns the number of DequantizeLinear nodes replaced. QuantizeLinear
/// nodes left without readers are removed.
pub fn fold_qdq_pairs(graph: &mut Graph) -> Result<usize> {
    let producers = graph.producers();
    let mut plan: Vec<(usize, ValueId, PairParams, Vec<String>)> = Vec::new();
    for (di, dq) in graph.nodes.iter().enumerate() {
        let Some(v) = dq.inputs.first().copied().flatten() else {
            continue;
        };
        let Some(qi) = producers.get(v).copied().flatten() else {
            continue;
        };
        let q = &graph.nodes[qi];
        let Some(qp) = quantize_params(graph, q) else {
            continue;
        };
        let Some(dp) = dequantize_params(graph, dq, qp.code) else {
            continue;
        };
        if qp.scale.to_bits() != dp.scale.to_bits() || qp.zp != dp.zp {
            continue;
        }
        let x = q.inputs[0].expect("checked by quantize_params");
        let mut from = q.fused_from.clone();
        from.extend(dq.fused_from.iter().cloned());
        plan.push((di, x, qp, from));
    }
    let reg = registry();
    for (di, x, params, fused_from) in &plan {
        let desc = params.program().to_desc();
        let name = format!("{}.qdq", graph.nodes[*di].name);
        let op = reg.build(&BuildCtx {
            node: &name,
            desc: &desc,
            n_inputs: 1,
            n_outputs: 1,
        })?;
        let outputs = graph.nodes[*di].outputs.clone();
        graph.nodes[*di] = Node {
            name,
            desc,
            op,
            inputs: vec![Some(*x)],
            outputs,
            fused_from: fused_from.clone(),
        };
    }
    if !plan.is_empty() {
        kiln_core::passes::remove_dead_nodes(graph)?;
    }
    Ok(plan.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_graph::{add_constant, add_node};
    use kiln_core::{Attr, Fact, Tensor, Value};

    /// x → Q(s, z) → DQ(s, z) → Mul(·, x), then the whole graph through the elementwise
    /// fusion too when `fuse`; when `int_reader`, Q's output is also read by a second
    /// DequantizeLinear with another scale (which must stay, and keep Q alive).
    fn sample(code: DType, zp: i32, scale: f32, int_reader: bool) -> Graph {
        let reg = registry();
        let mut g = Graph::default();
        let x = g.add_value("x", Fact::concrete(DType::F32, &[3, 37]));
        g.inputs.push(x);
        let s = add_constant(&mut g, "s", Tensor::from_vec(&[], vec![scale]).unwrap());
        let zt = match code {
            DType::I8 => Tensor::from_vec(&[], vec![zp as i8]).unwrap(),
            _ => Tensor::from_vec(&[], vec![zp as u8]).unwrap(),
        };
        let z = add_constant(&mut g, "z", zt);
        let xq = add_node(&mut g, reg, 19, "QuantizeLinear", &[x, s, z], &[], "xq");
        let xd = add_node(&mut g, reg, 19, "DequantizeLinear", &[xq, s, z], &[], "xd");
        let y = add_node(&mut g, reg, 19, "Mul", &[xd, x], &[], "y");
        g.outputs.push(y);
        if int_reader {
            let s2 = add_constant(
                &mut g,
                "s2",
                Tensor::from_vec(&[], vec![scale * 2.0]).unwrap(),
            );
            let xd2 = add_node(
                &mut g,
                reg,
                19,
                "DequantizeLinear",
                &[xq, s2, z],
                &[],
                "xd2",
            );
            g.outputs.push(xd2);
        }
        g.infer_facts().unwrap();
        g
    }

    /// Inputs over three times the quantizer's range, exact ties of both parities, NaN,
    /// ±∞, ±0 and tiny negatives (which must dequantize to +0).
    fn inputs(scale: f32) -> Vec<f32> {
        let mut lcg = 11u64;
        let mut v: Vec<f32> = (0..111)
            .map(|i| {
                lcg = lcg
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (lcg >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                match i % 5 {
                    0 => ((i as f32) - 55.0 + 0.5) * scale,
                    _ => u * 3.0 * 255.0 * scale,
                }
            })
            .collect();
        v[1] = f32::NAN;
        v[2] = f32::INFINITY;
        v[3] = f32::NEG_INFINITY;
        v[4] = -0.0;
        v[6] = -0.1 * scale;
        v[7] = 1e30;
        v
    }

    fn run(g: &Graph, x: &[f32]) -> Vec<Vec<u32>> {
        let xv = Value::from(Tensor::from_vec(&[3, 37], x.to_vec()).unwrap());
        kiln_core::exec::run_graph(g, &[xv], &[])
            .unwrap()
            .iter()
            .map(|o| {
                let t = o.as_tensor().unwrap();
                t.as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn folded_pairs_give_the_bits_of_quantize_then_dequantize() {
        for (code, zp, scale) in [
            (DType::U8, 0, 0.05f32),
            (DType::U8, 128, 0.013),
            (DType::U8, 255, 0.7),
            (DType::I8, 0, 0.021),
            (DType::I8, -9, 0.5),
            (DType::I8, 127, 0.003),
        ] {
            for int_reader in [false, true] {
                let g = sample(code, zp, scale, int_reader);
                let x = inputs(scale);
                let want = run(&g, &x);
                let mut f = g.clone();
                let n = fold_qdq_pairs(&mut f).unwrap();
                assert_eq!(n, 1, "{code:?} zp {zp}");
                f.infer_facts().unwrap();
                let kept_q = f.nodes.iter().any(|n| n.desc.op_type == "QuantizeLinear");
                assert_eq!(
                    kept_q, int_reader,
                    "Q stays only while an integer reader does"
                );
                assert_eq!(run(&f, &x), want, "{code:?} zp {zp} scale {scale}");
                // ... and after the elementwise fusion merged the pair with the Mul.
                let chains = crate::fuse_elementwise::fuse_elementwise(&mut f, registry());
                assert_eq!(chains.unwrap(), 1);
                f.infer_facts().unwrap();
                assert_eq!(f.nodes.len(), if int_reader { 3 } else { 1 });
                assert_eq!(run(&f, &x), want, "fused: {code:?} zp {zp} scale {scale}");
            }
        }
    }

    #[test]
    fn pairs_with_other_parameters_or_blocked_scales_stay() {
        // The only DequantizeLinear has another scale than the QuantizeLinear.
        let mut g = sample(DType::U8, 3, 0.1, false);
        let s2 = add_constant(&mut g, "s2", Tensor::from_vec(&[], vec![0.2f32]).unwrap());
        g.nodes[1].inputs[1] = Some(s2);
        assert_eq!(fold_qdq_pairs(&mut g).unwrap(), 0);
        // Another zero point.
        let mut g = sample(DType::U8, 3, 0.1, false);
        let z2 = add_constant(&mut g, "z2", Tensor::from_vec(&[], vec![4u8]).unwrap());
        g.nodes[1].inputs[2] = Some(z2);
        assert_eq!(fold_qdq_pairs(&mut g).unwrap(), 0);
        // Blocked quantization.
        let mut b = sample(DType::U8, 3, 0.1, false);
        b.nodes[0]
            .desc
            .attrs
            .insert("block_size".into(), Attr::Int(2));
        assert_eq!(fold_qdq_pairs(&mut b).unwrap(), 0);
    }
}
