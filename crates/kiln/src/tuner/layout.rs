//! Layers that run in any layout with their usual kernel: elementwise ops whose operands
//! are all rank 4 (or a single broadcast value). Permuting every operand's axes the same way
//! keeps the broadcasting and the result, so such a layer can stay inside a run of
//! channels-last layers (a squeeze-and-excitation block's `x · s`, an activation or residual
//! add left unfused) instead of forcing a transpose to and from the linear layout. The tuner
//! offers them two tactics: [`LINEAR_TACTIC`] and [`NHWC_TACTIC`] (format `fp32/nhwc`).

use kiln_core::{DType, Fact, Node, Tactic};
use kiln_cpu::ops::conv::tactics::FP32_NHWC;

/// The elementwise layer run on its operands as they are (linear layout).
pub const LINEAR_TACTIC: &str = "cpu.elementwise";
/// The same kernel on channels-last operands.
pub const NHWC_TACTIC: &str = "cpu.elementwise.nhwc";

/// ONNX elementwise ops (default domain) whose result does not depend on the axis order.
const ELEMENTWISE: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
    "Sum",
    "Clip",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Neg",
    "Abs",
    "Sqrt",
    "Exp",
];

/// Whether `node` is an f32 elementwise layer every operand of which is rank 4 or a single
/// value, so that it computes the same in any layout.
pub fn is_layout_free(node: &Node, inputs: &[Option<&Fact>]) -> bool {
    let elementwise = match node.desc.domain.as_str() {
        "" | "ai.onnx" => ELEMENTWISE.contains(&node.desc.op_type.as_str()),
        d => {
            d == kiln_cpu::fused::KILN_DOMAIN
                && node.desc.op_type == kiln_cpu::ops::elementwise::chain::CHAIN_OP
        }
    };
    if !elementwise || node.outputs.len() != 1 {
        return false;
    }
    let mut rank4 = false;
    for f in inputs.iter().flatten() {
        let Some(shape) = f.concrete_shape() else {
            return false;
        };
        if f.dtype != Some(DType::F32) && shape.len() == 4 {
            return false;
        }
        match shape.len() {
            4 => rank4 = true,
            _ if shape.iter().all(|&d| d == 1) => {}
            _ => return false,
        }
    }
    rank4
}

/// The two tactics of a layout-free layer.
pub fn tactics() -> Vec<Tactic> {
    vec![
        Tactic::fp32(LINEAR_TACTIC, 1),
        Tactic {
            id: NHWC_TACTIC.into(),
            format: FP32_NHWC,
            min_level: 1,
        },
    ]
}
