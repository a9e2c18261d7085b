//! kiln's own CUDA C kernels (compiled with NVRTC) for every op that cuBLASLt and cuDNN do not
//! cover: elementwise chains, reductions, softmax, normalizations, pooling, resize and data
//! movement (concat, slice, transpose, gather, pad, ...).
//!
//! Entry point: [`lower`], which the GPU executor calls for each node it does not hand to a
//! library; `None` means "no GPU kernel for this node", and the executor runs it on the CPU.
//!
//! Calling convention of the layers built here: `enqueue` gets one [`DevTensor`] per node
//! input and output, **in node order** (an absent optional input may be given as a tensor
//! with `ptr == 0`; layers never read inputs they did not record as present). Parameters that
//! ONNX passes as inputs (Slice starts, Pad pads, Resize scales, reduction axes, ...) must be
//! build-time constants (`Fact::konst`) or the node is not lowered.
//!
//! [`DevTensor`]: crate::layer::DevTensor

pub mod common;
pub mod elementwise;
pub mod extra;
pub mod int8;
pub mod movement;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod resize;

use kiln_core::{AttrReader, DType, Fact, Node, Result, Tensor};

use crate::layer::GpuLayer;

pub use common::KernelLayer;

/// What a lowering function sees: the node and the concrete facts of its values.
pub struct LowerCx<'a> {
    /// The node.
    pub node: &'a Node,
    /// Facts of the node's inputs (absent optional inputs: anything).
    pub inputs: &'a [Fact],
    /// Facts of the node's outputs.
    pub outputs: &'a [Fact],
}

impl<'a> LowerCx<'a> {
    /// The op type.
    pub fn op(&self) -> &str {
        &self.node.desc.op_type
    }
    /// The imported opset.
    pub fn opset(&self) -> i64 {
        self.node.desc.opset
    }
    /// Attribute reader.
    pub fn attrs(&self) -> AttrReader<'a> {
        AttrReader {
            node: &self.node.name,
            desc: &self.node.desc,
        }
    }
    /// Number of node inputs (trailing absent ones included).
    pub fn n_in(&self) -> usize {
        self.node.inputs.len()
    }
    /// True when input `i` is given.
    pub fn present(&self, i: usize) -> bool {
        matches!(self.node.inputs.get(i), Some(Some(_))) && i < self.inputs.len()
    }
    /// (dtype, concrete shape) of input `i`, when given and fully known.
    pub fn input(&self, i: usize) -> Option<(DType, Vec<usize>)> {
        if !self.present(i) {
            return None;
        }
        let f = &self.inputs[i];
        if f.kind != kiln_core::ValueKind::Tensor {
            return None;
        }
        Some((f.dtype?, f.concrete_shape()?))
    }
    /// The constant value of input `i`, when it is a build-time constant.
    pub fn konst(&self, i: usize) -> Option<&'a Tensor> {
        if !self.present(i) {
            return None;
        }
        self.inputs[i].konst.as_ref()
    }
    /// Number of node outputs that are used (given).
    pub fn n_out_present(&self) -> usize {
        self.node.outputs.iter().filter(|o| o.is_some()).count()
    }
    /// True when only output 0 exists (others absent).
    pub fn single_output(&self) -> bool {
        matches!(self.node.outputs.first(), Some(Some(_)))
            && self.node.outputs.iter().skip(1).all(|o| o.is_none())
    }
    /// (dtype, concrete shape) of output `i`.
    pub fn output(&self, i: usize) -> Option<(DType, Vec<usize>)> {
        if !matches!(self.node.outputs.get(i), Some(Some(_))) {
            return None;
        }
        let f = self.outputs.get(i)?;
        if f.kind != kiln_core::ValueKind::Tensor {
            return None;
        }
        Some((f.dtype?, f.concrete_shape()?))
    }
    /// Normalizes a possibly negative axis against `rank`.
    pub fn axis(&self, a: i64, rank: usize) -> Option<usize> {
        let r = rank as i64;
        let a = if a < 0 { a + r } else { a };
        (0..r).contains(&a).then_some(a as usize)
    }
}

/// Lowers `node` to a GPU layer, given the *concrete* facts (dtype and fully known shape) of
/// its inputs and outputs as they will be on the device (float tensors may be F16 in an FP16
/// engine). Returns `None` when this module has no kernel for the node.
pub fn lower(node: &Node, inputs: &[Fact], outputs: &[Fact]) -> Option<Result<Box<dyn GpuLayer>>> {
    let cx = LowerCx {
        node,
        inputs,
        outputs,
    };
    let layer = lower_layer(&cx)?;
    Some(Ok(Box::new(layer)))
}

/// Like [`lower`], returning the concrete layer (for tests and inspection).
pub fn lower_layer(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    // Outputs must be fully known tensors; zero-sized outputs are left to the CPU.
    for i in 0..cx.node.outputs.len() {
        if cx.node.outputs[i].is_some() {
            let (_, s) = cx.output(i)?;
            if s.contains(&0) {
                return None;
            }
        }
    }
    let domain = kiln_core::op::normalize_domain(&cx.node.desc.domain);
    if domain == "kiln" {
        return match cx.op() {
            "Activation" => elementwise::lower(cx),
            "Int8Quantize" | "Int8Dequantize" | "Int8Conv" | "Int8MatMul" => int8::lower(cx),
            _ => None,
        };
    }
    if !domain.is_empty() {
        return None;
    }
    movement::lower(cx)
        .or_else(|| elementwise::lower(cx))
        .or_else(|| reduce::lower(cx))
        .or_else(|| norm::lower(cx))
        .or_else(|| pool::lower(cx))
        .or_else(|| resize::lower(cx))
        .or_else(|| extra::lower(cx))
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::sync::Arc;

    use kiln_core::{Attr, DType, Fact, Node, OpDesc, Result, Value};

    /// A do-nothing op for lowering tests.
    #[derive(Debug)]
    pub struct Nop;
    impl kiln_core::Op for Nop {
        fn op_type(&self) -> &str {
            "Nop"
        }
        fn eval(&self, _: &[Option<&Value>]) -> Result<Vec<Value>> {
            Ok(vec![])
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    /// A node with `n_in` inputs (None where `absent`) and `n_out` outputs.
    pub fn node(op: &str, opset: i64, attrs: Vec<(&str, Attr)>, n_in: usize, n_out: usize) -> Node {
        let mut desc = OpDesc::new("", op, opset);
        for (k, v) in attrs {
            desc.attrs.insert(k.into(), v);
        }
        Node {
            name: format!("test_{op}"),
            desc,
            op: Arc::new(Nop),
            inputs: (0..n_in).map(Some).collect(),
            outputs: (0..n_out).map(|i| Some(100 + i)).collect(),
            fused_from: vec![],
        }
    }

    /// A concrete fact.
    pub fn f(dt: DType, s: &[usize]) -> Fact {
        Fact::concrete(dt, s)
    }
}

#[cfg(test)]
mod robustness {
    use kiln_core::{Attr, DType, Fact, Tensor};

    use super::testutil::{f, node};
    use super::{lower_layer, LowerCx};

    /// Odd facts (scalars, empty and size-1 dims, mismatched ranks, bad attributes) never
    /// make lowering panic: the answer is a layer or `None`.
    #[test]
    fn lowering_never_panics() {
        let ops = [
            "Add",
            "Where",
            "Clip",
            "Cast",
            "Relu",
            "Max",
            "ReduceSum",
            "ReduceMean",
            "ArgMax",
            "Softmax",
            "LogSoftmax",
            "LayerNormalization",
            "InstanceNormalization",
            "BatchNormalization",
            "MaxPool",
            "AveragePool",
            "GlobalAveragePool",
            "Resize",
            "Reshape",
            "Transpose",
            "Slice",
            "Expand",
            "Concat",
            "Split",
            "Pad",
            "Tile",
            "Gather",
            "GatherElements",
            "GatherND",
            "ScatterND",
            "ScatterElements",
            "DepthToSpace",
            "SpaceToDepth",
            "ConstantOfShape",
            "Trilu",
            "CumSum",
            "Shape",
            "Size",
            "Mod",
        ];
        let shapes: [&[usize]; 5] = [&[], &[0], &[1], &[3, 4], &[2, 1, 3, 5]];
        let attrs: Vec<Vec<(&str, Attr)>> = vec![
            vec![],
            vec![("axis", Attr::Int(-7)), ("perm", Attr::Ints(vec![5, 0]))],
            vec![
                ("kernel_shape", Attr::Ints(vec![-1])),
                ("blocksize", Attr::Int(-3)),
            ],
            vec![("axes", Attr::Ints(vec![9])), ("pads", Attr::Ints(vec![1]))],
        ];
        let konst = Fact::constant(Tensor::from_vec(&[2], vec![-9i64, 99]).unwrap());
        for op in ops {
            for a in &attrs {
                for n_in in 1..=5 {
                    for si in &shapes {
                        for so in &shapes {
                            for dt in [DType::F32, DType::I64, DType::Bool] {
                                let nd = node(op, 13, a.clone(), n_in, 1);
                                let mut fi: Vec<Fact> = (0..n_in).map(|_| f(dt, si)).collect();
                                if n_in > 1 {
                                    fi[1] = konst.clone();
                                }
                                let fo = vec![f(dt, so)];
                                let _ = lower_layer(&LowerCx {
                                    node: &nd,
                                    inputs: &fi,
                                    outputs: &fo,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
}
