//! The FP16 precision policy: which layers of an FP16 GPU engine stay in FP32.
//!
//! TensorRT's rule, "layers that overflow or lose accuracy in FP16 stay FP32", made concrete
//! from what the real models showed (see `docs/cuda.md`, "FP16 precision policy"). A layer
//! stays in FP32 when
//!
//! 1. its **op class** is precision-sensitive: exponentials, logarithms and powers (their
//!    outputs leave F16's range or amplify its rounding), reciprocals and divisions by a
//!    computed value, products of two computed values, long sums (sum-like reductions, CumSum), and recurrent layers (their
//!    state is fed back every step, so rounding accumulates); or
//! 2. its **float weights lose precision in F16**, measured at build: the relative L2 error
//!    of rounding the layer's constant float inputs to F16 exceeds
//!    [`Policy::weight_rel_err`] (ordinary normal-range weights round with ≈ 1.4e-4; weights
//!    whose magnitudes sit in F16's subnormal range, below 6.1e-5, or beyond 65504 do much
//!    worse), or
//! 3. it is one of the first [`Policy::stem_layers`] layers with weights: they see the raw
//!    input, whose range the build cannot bound, and every later layer amplifies their
//!    rounding.
//!
//! Inside an FP16 layer, one input stays FP32 ([`reads_f32`]): the **bias** of a Conv,
//! ConvTranspose or Gemm. Its rounding would be one fixed error per output channel, the same
//! at every output position, so unlike the rounding of activations (a different error at
//! each element) it does not average out in the sums, poolings and products that follow;
//! and a bias that nearly cancels the product it is added to (an affine folded into the
//! layer, a BatchNorm shift) rounds with an error large against the output. On the real
//! models this was the largest FP16 error left once the rules above apply (see
//! `docs/cuda.md`). The kernels add the bias in f32 anyway, so reading it in F32 costs one
//! f32 load per output channel.
//!
//! The decision is a pure function of the graph and its facts (no GPU), so it is recomputed
//! identically when a plan is loaded.

use half::f16;
use kiln_core::{DType, Fact, Graph, Node, Tensor};

/// Thresholds of the FP16 policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Op types always kept in FP32.
    pub ops: Vec<String>,
    /// Products of two computed tensors (Mul) and divisions by a computed tensor (Div) stay
    /// in FP32: their relative error is the sum of their operands' (a quotient's grows
    /// without bound as the divisor nears 0), so every such layer doubles the rounding
    /// noise it passes on.
    pub products_of_values: bool,
    /// A layer whose constant float inputs round to F16 with a larger relative L2 error stays
    /// in FP32.
    pub weight_rel_err: f64,
    /// Layers without weights that compute new values (anything but the
    /// [`VALUE_PRESERVING`] ops) stay in FP32, as under mixed-precision autocasting: only
    /// layers with weights (convolutions, matrix products) run in FP16. Chains of
    /// elementwise layers then round once, where they feed the next FP16 layer, instead of
    /// after every step (a scale-and-shift whose terms cancel would otherwise amplify the
    /// rounding of its product).
    pub new_values_fp32: bool,
    /// Under [`new_values_fp32`](Self::new_values_fp32), sums ([`SUMS`]) still run in FP16:
    /// a sum of stored values rounds once, like the layer that produced them, and keeping
    /// residual additions in FP16 avoids converting both operands.
    pub sums_fp16: bool,
    /// Layers with weights doing fewer multiply-adds than this stay in FP32: they are
    /// launch-bound, so FP16 saves them no time and costs only its rounding.
    pub min_macs: u64,
    /// The first this many layers with weights (in execution order) stay in FP32: they see
    /// the raw input, whose range the build cannot bound, and their rounding is amplified
    /// by every later layer (the first-and-last-layers rule of reduced-precision practice).
    pub stem_layers: usize,
}

/// Constant float inputs with at least this many elements count as weights (scales,
/// scalars and Resize factors do not).
pub const WEIGHT_MIN_LEN: usize = 16;

/// Ops whose outputs are input values moved, selected or compared (no new rounding in F16):
/// they run in the precision of their inputs' storage, FP16.
pub const VALUE_PRESERVING: &[&str] = &[
    "Relu",
    "Clip",
    "Max",
    "Min",
    "MaxPool",
    "GlobalMaxPool",
    "ReduceMax",
    "ReduceMin",
    "ArgMax",
    "ArgMin",
    "TopK",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Dropout",
    "Transpose",
    "Slice",
    "Split",
    "Concat",
    "Gather",
    "GatherElements",
    "GatherND",
    "Expand",
    "Tile",
    "Pad",
    "DepthToSpace",
    "SpaceToDepth",
    "Cast",
    "CastLike",
    "Shape",
    "Size",
    "Where",
    "Abs",
    "Neg",
    "Sign",
    "Floor",
    "Ceil",
    "Round",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "Not",
    "And",
    "Or",
    "Xor",
    "IsNaN",
    "IsInf",
    "ConstantOfShape",
    "Trilu",
    "ScatterND",
    "ScatterElements",
    "NonZero",
];

/// Sums (see [`Policy::sums_fp16`]).
pub const SUMS: &[&str] = &["Add", "Sub", "Sum"];

/// Op types of rule 1.
pub const SENSITIVE_OPS: &[&str] = &[
    "Exp",
    "Log",
    "Pow",
    "Reciprocal",
    "Softplus",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
    "CumSum",
    "LSTM",
    "GRU",
    "RNN",
];

impl Default for Policy {
    fn default() -> Self {
        Policy {
            ops: SENSITIVE_OPS.iter().map(|s| s.to_string()).collect(),
            products_of_values: true,
            weight_rel_err: 3e-4,
            new_values_fp32: true,
            sums_fp16: true,
            min_macs: 1 << 20,
            stem_layers: 2,
        }
    }
}

/// Op types (ONNX's or kiln's fused forms) whose input 2 is a bias that FP16 layers read in
/// FP32 (see [`reads_f32`]).
pub const BIASED_OPS: &[&str] = &["Conv", "ConvTranspose", "Gemm"];

/// True when input `input` of `node` is read in FP32 even when the node runs in FP16: the
/// bias (input 2) of the [`BIASED_OPS`], in the default or kiln domain.
pub fn reads_f32(node: &Node, input: usize) -> bool {
    let domain = kiln_core::op::normalize_domain(&node.desc.domain);
    input == 2
        && (domain.is_empty() || domain == "kiln")
        && BIASED_OPS.contains(&node.desc.op_type.as_str())
}

/// The device dtype in which `node` reads its input `input` of graph dtype `dtype`, when the
/// node runs in FP16 (`lo`) or not: F32 becomes F16 in FP16 layers, except the inputs of
/// [`reads_f32`].
pub fn read_dtype(node: &Node, input: usize, dtype: DType, lo: bool) -> DType {
    if lo && dtype == DType::F32 && !reads_f32(node, input) {
        DType::F16
    } else {
        dtype
    }
}

/// Relative L2 error of rounding `t` (F32) to F16, saturating at ±65504; 0 for other
/// dtypes and all-zero tensors.
pub fn f16_rounding_error(t: &Tensor) -> f64 {
    let Ok(v) = t.as_slice::<f32>() else {
        return 0.0;
    };
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for &x in v {
        if !x.is_finite() {
            continue;
        }
        let r = f16::from_f32(x.clamp(-65504.0, 65504.0)).to_f32();
        num += ((x - r) as f64).powi(2);
        den += (x as f64).powi(2);
    }
    if den == 0.0 {
        0.0
    } else {
        (num / den).sqrt()
    }
}

/// Multiply-adds of a layer with output shape `out` and (first) weight shape `w`: each
/// output element reduces over the weight's elements per output feature (Conv: `W[0]` output
/// channels; MatMul/Gemm: the output's last dim; others: `W[0]`).
pub fn macs(op: &str, out: &[usize], w: &[usize]) -> u64 {
    let n_out: u64 = out.iter().map(|&d| d as u64).product();
    let n_w: u64 = w.iter().map(|&d| d as u64).product();
    let per = match op {
        "MatMul" | "Gemm" => out.last().copied().unwrap_or(1),
        _ => w.first().copied().unwrap_or(1),
    }
    .max(1) as u64;
    n_out.saturating_mul(n_w / per)
}

/// For each node of `graph`, true when it stays in FP32 in an FP16 engine. `facts` are the
/// engine's facts, one per value (constants carry their tensors there or in
/// `graph.constants`).
pub fn fp32_layers(graph: &Graph, facts: &[Fact], policy: &Policy) -> Vec<bool> {
    let konst = |v: usize| -> Option<&Tensor> {
        graph
            .constants
            .get(&v)
            .or_else(|| facts.get(v).and_then(|f| f.konst.as_ref()))
    };
    let mut weighted_seen = 0usize;
    let producers = graph.producers();
    let mut keep: Vec<bool> = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let k = (|| {
            let op = node.desc.op_type.as_str();
            if policy.ops.iter().any(|o| o == op) {
                return true;
            }
            let computed = |i: usize| {
                node.inputs
                    .get(i)
                    .copied()
                    .flatten()
                    .is_some_and(|v| konst(v).is_none())
            };
            if policy.products_of_values
                && ((op == "Div" && computed(1)) || (op == "Mul" && computed(0) && computed(1)))
            {
                return true;
            }
            // Constant float inputs the layer reads in F16 (biases stay F32).
            let weights: Vec<&Tensor> = node
                .inputs
                .iter()
                .enumerate()
                .filter(|&(j, _)| !reads_f32(node, j))
                .filter_map(|(_, &v)| konst(v?))
                .filter(|t| t.dtype() == DType::F32 && t.len() >= WEIGHT_MIN_LEN)
                .collect();
            if weights.is_empty() {
                if VALUE_PRESERVING.contains(&op) {
                    // Moves values: stays in the precision its inputs were produced in (no
                    // conversion either way).
                    return node
                        .inputs
                        .iter()
                        .flatten()
                        .any(|&v| konst(v).is_none() && producers[v].is_some_and(|p| keep[p]));
                }
                return policy.new_values_fp32 && !(policy.sums_fp16 && SUMS.contains(&op));
            }
            weighted_seen += 1;
            if weighted_seen <= policy.stem_layers {
                return true;
            }
            let out = node
                .outputs
                .first()
                .copied()
                .flatten()
                .and_then(|o| facts.get(o))
                .and_then(|f| f.concrete_shape());
            if let Some(out) = out {
                if macs(op, &out, weights[0].shape()) < policy.min_macs {
                    return true;
                }
            }
            weights
                .iter()
                .any(|t| f16_rounding_error(t) > policy.weight_rel_err)
        })();
        keep.push(k);
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Node, OpDesc};

    #[test]
    fn rounding_error_of_normal_and_subnormal_weights() {
        let normal = Tensor::from_vec(&[4], vec![0.1f32, -0.37, 1.3, 0.77]).unwrap();
        assert!(f16_rounding_error(&normal) < 3e-4);
        let tiny = Tensor::from_vec(&[4], vec![1.1e-6f32, -3.7e-7, 2.3e-6, 7.7e-7]).unwrap();
        assert!(f16_rounding_error(&tiny) > 1e-2);
        let huge = Tensor::from_vec(&[2], vec![1e6f32, 1.0]).unwrap();
        assert!(f16_rounding_error(&huge) > 0.9);
        let ints = Tensor::from_vec(&[2], vec![1i64, 2]).unwrap();
        assert_eq!(f16_rounding_error(&ints), 0.0);
    }

    fn node(op: &str, inputs: &[usize], output: usize) -> Node {
        Node {
            name: format!("{op}_{output}"),
            desc: OpDesc::new("", op, 17),
            op: std::sync::Arc::new(Dummy(op.to_string())),
            inputs: inputs.iter().map(|&i| Some(i)).collect(),
            outputs: vec![Some(output)],
            fused_from: vec![],
        }
    }

    /// An op object for decision tests (the policy only reads the node's description).
    #[derive(Debug)]
    struct Dummy(String);
    impl kiln_core::Op for Dummy {
        fn op_type(&self) -> &str {
            &self.0
        }
        fn eval(
            &self,
            _: &[Option<&kiln_core::Value>],
        ) -> kiln_core::Result<Vec<kiln_core::Value>> {
            unreachable!("decision tests never run ops")
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    #[test]
    fn biases_read_in_f32() {
        let mut conv = node("Conv", &[0, 1, 2], 3);
        assert!(reads_f32(&conv, 2));
        assert!(!reads_f32(&conv, 0) && !reads_f32(&conv, 1));
        assert_eq!(read_dtype(&conv, 2, DType::F32, true), DType::F32);
        assert_eq!(read_dtype(&conv, 1, DType::F32, true), DType::F16);
        assert_eq!(read_dtype(&conv, 1, DType::F32, false), DType::F32);
        assert_eq!(read_dtype(&conv, 2, DType::I64, true), DType::I64);
        conv.desc = OpDesc::new("kiln", "Conv", 1);
        assert!(reads_f32(&conv, 2));
        conv.desc = OpDesc::new("com.example", "Conv", 1);
        assert!(!reads_f32(&conv, 2));
        assert!(reads_f32(&node("Gemm", &[0, 1, 2], 3), 2));
        assert!(reads_f32(&node("ConvTranspose", &[0, 1, 2], 3), 2));
        // Other ops' third inputs are not biases (Clip's max, Where's else branch).
        assert!(!reads_f32(&node("Clip", &[0, 1, 2], 3), 2));
        assert!(!reads_f32(&node("Where", &[0, 1, 2], 3), 2));
    }

    #[test]
    fn bias_rounding_does_not_count_against_fp16() {
        // Normal-range weights, a bias with F16-subnormal entries: the bias is read in F32,
        // so only the weights decide (the layer runs in FP16).
        let mut g = Graph::default();
        let x = g.add_value("x", Fact::concrete(DType::F32, &[1, 16, 8, 8]));
        g.inputs.push(x);
        let w = g.add_value("w", Fact::concrete(DType::F32, &[16, 16, 1, 1]));
        let wv: Vec<f32> = (0..256).map(|i| 0.05 + 0.003 * (i % 50) as f32).collect();
        g.constants
            .insert(w, Tensor::from_vec(&[16, 16, 1, 1], wv).unwrap());
        let b = g.add_value("b", Fact::concrete(DType::F32, &[16]));
        let bv: Vec<f32> = (0..16).map(|i| 1.3e-7 * (i + 1) as f32).collect();
        let bt = Tensor::from_vec(&[16], bv).unwrap();
        assert!(f16_rounding_error(&bt) > 1e-2);
        g.constants.insert(b, bt);
        let y = g.add_value("y", Fact::concrete(DType::F32, &[1, 16, 8, 8]));
        g.nodes = vec![node("Conv", &[x, w, b], y)];
        let facts: Vec<Fact> = g.values.iter().map(|v| v.fact.clone()).collect();
        let p = Policy {
            stem_layers: 0,
            min_macs: 0,
            ..Policy::default()
        };
        assert_eq!(fp32_layers(&g, &facts, &p), vec![false]);
        // The same values as the weights: FP32.
        g.nodes = vec![node("Conv", &[x, b, w], y)];
        assert_eq!(fp32_layers(&g, &facts, &p), vec![true]);
    }

    #[test]
    fn multiply_adds() {
        // Conv 64->128, 3x3, output 1x128x56x56: 56*56*128 outputs x 64*9.
        assert_eq!(
            macs("Conv", &[1, 128, 56, 56], &[128, 64, 3, 3]),
            56 * 56 * 128 * 576
        );
        // MatMul [128, 768] x [768, 3072].
        assert_eq!(macs("MatMul", &[128, 3072], &[768, 3072]), 128 * 3072 * 768);
        // Gemm with transB: W [N, K] = [1000, 2048].
        assert_eq!(macs("Gemm", &[1, 1000], &[1000, 2048]), 1000 * 2048);
    }

    #[test]
    fn decisions_by_class_weights_and_inputs() {
        let mut g = Graph::default();
        let x = g.add_value("x", Fact::concrete(DType::F32, &[1, 4]));
        g.inputs.push(x);
        let w_ok = g.add_value("w_ok", Fact::concrete(DType::F32, &[4, 4]));
        let vals: Vec<f32> = (0..16).map(|i| 0.05 + 0.013 * i as f32).collect();
        g.constants
            .insert(w_ok, Tensor::from_vec(&[4, 4], vals.clone()).unwrap());
        let w_tiny = g.add_value("w_tiny", Fact::concrete(DType::F32, &[4, 4]));
        let tiny: Vec<f32> = vals.iter().map(|v| v * 1e-5).collect();
        g.constants
            .insert(w_tiny, Tensor::from_vec(&[4, 4], tiny).unwrap());
        let two = g.add_value("two", Fact::concrete(DType::F32, &[]));
        g.constants
            .insert(two, Tensor::from_vec(&[], vec![2.0f32]).unwrap());
        let ids: Vec<usize> = (0..10)
            .map(|i| g.add_value(format!("t{i}"), Fact::concrete(DType::F32, &[1, 4])))
            .collect();
        g.nodes = vec![
            node("MatMul", &[x, w_ok], ids[0]),        // stem: FP32
            node("MatMul", &[ids[0], w_ok], ids[1]),   // stem: FP32
            node("MatMul", &[ids[1], w_tiny], ids[2]), // subnormal weights: FP32
            node("Exp", &[ids[2]], ids[3]),            // class: FP32
            node("Div", &[ids[3], two], ids[4]),       // by a constant: FP16
            node("Div", &[ids[4], ids[3]], ids[5]),    // by a value: FP32
            node("Relu", &[ids[5]], ids[6]),           // follows its FP32 producer
            node("MatMul", &[ids[6], w_ok], ids[7]),   // ordinary weights: FP16
            node("Mul", &[ids[7], two], ids[8]),       // scaling by a constant: FP16
            node("Mul", &[ids[8], ids[7]], ids[9]),    // product of values: FP32
        ];
        let facts: Vec<Fact> = g.values.iter().map(|v| v.fact.clone()).collect();
        let p = Policy {
            min_macs: 0,
            new_values_fp32: false,
            ..Policy::default()
        };
        let got = fp32_layers(&g, &facts, &p);
        assert_eq!(
            got,
            vec![true, true, true, true, false, true, true, false, false, true]
        );
        // Autocast-like: unweighted layers computing new values (Div, Mul by constants) in
        // FP32 too; Relu only moves values (in its producer's precision).
        let p = Policy {
            min_macs: 0,
            ..Policy::default()
        };
        assert_eq!(
            fp32_layers(&g, &facts, &p),
            vec![true, true, true, true, true, true, true, false, true, true]
        );
        // Tiny layers (16 multiply-adds here) stay in FP32 by the work rule.
        let p = Policy {
            stem_layers: 0,
            ..Policy::default()
        };
        assert!(fp32_layers(&g, &facts, &p)[7]);
        let lax = Policy {
            ops: vec![],
            products_of_values: false,
            weight_rel_err: 1.0,
            new_values_fp32: false,
            sums_fp16: false,
            min_macs: 0,
            stem_layers: 0,
        };
        assert_eq!(fp32_layers(&g, &facts, &lax), vec![false; 10]);
    }
}
