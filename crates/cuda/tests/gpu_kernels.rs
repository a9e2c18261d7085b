//! kiln's NVRTC kernels against the CPU reference ops, on the GPU.
//!
//! Without a CUDA driver this prints "skipped: no CUDA driver" and passes. With one, every
//! case builds the CPU op from kiln-cpu's registry, evaluates it on random non-zero inputs
//! with odd shapes, lowers the node with `kiln_cuda::kernels::lower`, compiles the layer's
//! sources with NVRTC (sm_90), runs it on poisoned outputs and compares, in F32 and in F16
//! (F16 inputs are the rounded F32 ones, so the reference sees the same values). A compile
//! error prints the numbered source and the NVRTC log, and the other cases go on. The run
//! ends with one line per family and fails if any case failed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use half::f16;
use kiln_core::{Attr, BuildCtx, DType, Fact, Node, OpDesc, Tensor, Value};
use kiln_cuda::kernels;
use kiln_cuda::{DevTensor, LaunchCx, ModuleSet};

// ------------------------------------------------------------------------------------------
// Case description
// ------------------------------------------------------------------------------------------

#[derive(Clone)]
enum In {
    /// Random float data, values in ±[0.1, 2] (follows the run's float dtype).
    R(Vec<usize>),
    /// Random positive float data in [0.5, 2.5].
    Pos(Vec<usize>),
    /// A random tensor of a fixed dtype (not converted in F16 runs).
    As(DType, Vec<usize>),
    /// A constant int64 tensor (a build-time constant).
    I(Vec<i64>),
    /// An int64 tensor known only at run time.
    Iv(Vec<i64>),
    /// An int64 tensor of a shape, known only at run time.
    Ix(Vec<usize>, Vec<i64>),
    /// A constant float tensor (follows the run's float dtype).
    F(Vec<usize>, Vec<f32>),
    /// Random indices in [-n, n) of dtype (I32/I64), not constant.
    Idx(DType, Vec<usize>, i64),
    /// Random bools.
    B(Vec<usize>),
    /// An int32 tensor known only at run time (LSTM's sequence_lens).
    I32(Vec<i32>),
    /// An absent optional input.
    None,
}

#[derive(Clone)]
struct Case {
    family: &'static str,
    op: &'static str,
    opset: i64,
    attrs: Vec<(&'static str, Attr)>,
    inputs: Vec<In>,
    n_out: usize,
    f16: bool,
}

fn c(family: &'static str, op: &'static str, opset: i64, inputs: Vec<In>) -> Case {
    Case {
        family,
        op,
        opset,
        attrs: vec![],
        inputs,
        n_out: 1,
        f16: true,
    }
}

impl Case {
    fn a(mut self, k: &'static str, v: Attr) -> Self {
        self.attrs.push((k, v));
        self
    }
    fn f32_only(mut self) -> Self {
        self.f16 = false;
        self
    }
    fn outs(mut self, n: usize) -> Self {
        self.n_out = n;
        self
    }
}

fn r(s: &[usize]) -> In {
    In::R(s.to_vec())
}
fn pos(s: &[usize]) -> In {
    In::Pos(s.to_vec())
}
fn ints(v: &[i64]) -> In {
    In::I(v.to_vec())
}
fn ai(v: &[i64]) -> Attr {
    Attr::Ints(v.to_vec())
}
fn s(v: &str) -> Attr {
    Attr::String(v.into())
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // --- library layers (cuBLAS GEMM, im2col/direct convolution, fused epilogues)
    let l = "library";
    v.push(c(l, "MatMul", 13, vec![r(&[3, 5, 7]), r(&[7, 4])]));
    v.push(c(l, "MatMul", 13, vec![r(&[2, 3, 5, 7]), r(&[2, 3, 7, 6])]));
    v.push(c(l, "MatMul", 13, vec![r(&[5, 7]), r(&[2, 7, 3])]));
    v.push(c(l, "MatMul", 13, vec![r(&[7]), r(&[7, 3])]));
    v.push(c(l, "MatMul", 13, vec![r(&[4, 7]), r(&[7])]));
    v.push(c(l, "MatMul", 13, vec![r(&[2, 5, 9]), r(&[9, 3])]).a("kiln_activation", s("Relu")));
    v.push(c(l, "Gemm", 13, vec![r(&[5, 7]), r(&[7, 3]), r(&[3])]));
    v.push(
        c(l, "Gemm", 13, vec![r(&[7, 5]), r(&[3, 7]), r(&[5, 1])])
            .a("transA", Attr::Int(1))
            .a("transB", Attr::Int(1))
            .a("alpha", Attr::Float(0.7))
            .a("beta", Attr::Float(-1.3)),
    );
    v.push(c(l, "Gemm", 13, vec![r(&[5, 7]), r(&[7, 3]), r(&[5, 3])]).a("beta", Attr::Float(0.5)));
    v.push(c(l, "Gemm", 13, vec![r(&[5, 7]), r(&[7, 3])]));
    v.push(
        c(l, "Gemm", 13, vec![r(&[6, 9]), r(&[4, 9]), r(&[4])])
            .a("transB", Attr::Int(1))
            .a("kiln_activation", s("Sigmoid")),
    );
    v.push(
        c(
            l,
            "Conv",
            11,
            vec![r(&[2, 3, 9, 11]), r(&[4, 3, 3, 3]), r(&[4])],
        )
        .a("pads", ai(&[1, 1, 1, 1]))
        .a("strides", ai(&[2, 2])),
    );
    v.push(c(l, "Conv", 11, vec![r(&[2, 6, 5, 7]), r(&[8, 6, 1, 1])]));
    v.push(
        c(l, "Conv", 11, vec![r(&[2, 4, 17]), r(&[5, 4, 3]), r(&[5])])
            .a("dilations", ai(&[2]))
            .a("pads", ai(&[1, 2])),
    );
    v.push(
        c(
            l,
            "Conv",
            11,
            vec![r(&[1, 4, 8, 8]), r(&[6, 2, 3, 3]), r(&[6])],
        )
        .a("group", Attr::Int(2)),
    );
    v.push(
        c(l, "Conv", 11, vec![r(&[2, 4, 7, 7]), r(&[4, 1, 3, 3])])
            .a("group", Attr::Int(4))
            .a("pads", ai(&[1, 1, 1, 1])),
    );
    v.push(
        c(l, "Conv", 11, vec![r(&[1, 3, 10, 9]), r(&[5, 3, 3, 2])])
            .a("auto_pad", s("SAME_UPPER"))
            .a("strides", ai(&[2, 2])),
    );
    v.push(
        c(
            l,
            "Conv",
            11,
            vec![r(&[2, 3, 6, 6]), r(&[4, 3, 3, 3]), r(&[4])],
        )
        .a("pads", ai(&[0, 1, 2, 1]))
        .a("kiln_activation", s("Relu")),
    );
    v.push(
        c(
            l,
            "Conv",
            11,
            vec![r(&[2, 4, 6, 6]), r(&[4, 2, 3, 3]), r(&[4])],
        )
        .a("group", Attr::Int(2))
        .a("kiln_activation", s("LeakyRelu"))
        .a("kiln_activation_params", Attr::Floats(vec![0.1])),
    );
    v.push(c(
        l,
        "Conv",
        11,
        vec![r(&[1, 2, 4, 5, 6]), r(&[3, 2, 2, 3, 3])],
    ));
    // FP16 layers read their bias in F32 (`precision::reads_f32`): in the F16 runs these
    // cases add an F32 bias (im2col with an activation, 1×1, depthwise direct; cuDNN and
    // kiln's paths, below).
    let b32 = |n: usize| In::As(DType::F32, vec![n]);
    v.push(
        c(
            l,
            "Conv",
            11,
            vec![r(&[2, 3, 9, 11]), r(&[4, 3, 3, 3]), b32(4)],
        )
        .a("pads", ai(&[1, 1, 1, 1]))
        .a("kiln_activation", s("Relu")),
    );
    v.push(c(
        l,
        "Conv",
        11,
        vec![r(&[2, 6, 5, 7]), r(&[8, 6, 1, 1]), b32(8)],
    ));
    v.push(
        c(
            l,
            "Conv",
            11,
            vec![r(&[2, 4, 7, 7]), r(&[4, 1, 3, 3]), b32(4)],
        )
        .a("group", Attr::Int(4))
        .a("pads", ai(&[1, 1, 1, 1])),
    );
    // Every convolution again on kiln's own paths (the plain cases take cuDNN where it loads).
    let own: Vec<Case> = v
        .iter()
        .filter(|c| c.op == "Conv")
        .map(|c| c.clone().a("kiln_gpu_tactic", s("kiln")))
        .collect();
    v.extend(own);
    // --- cuBLASLt tactic (kiln_gpu_tactic = cublaslt): bias / ReLU / GELU in cuBLASLt's
    // epilogue, the rest in the NVRTC epilogue; odd M/N/K and batches.
    let lt = |c: Case| c.a("kiln_gpu_tactic", s("cublaslt"));
    v.push(lt(c(
        l,
        "Gemm",
        13,
        vec![r(&[33, 17]), r(&[17, 65]), r(&[65])],
    )));
    v.push(lt(c(
        l,
        "Gemm",
        13,
        vec![r(&[17, 33]), r(&[65, 17]), r(&[1, 65])],
    )
    .a("transA", Attr::Int(1))
    .a("transB", Attr::Int(1))
    .a("alpha", Attr::Float(0.7))
    .a("kiln_activation", s("Relu"))));
    v.push(lt(c(
        l,
        "Gemm",
        13,
        vec![r(&[7, 13]), r(&[13, 9]), r(&[9])],
    )
    .a("kiln_activation", s("GeluTanh"))));
    v.push(lt(
        c(l, "Gemm", 13, vec![r(&[7, 13]), r(&[13, 9])]).a("kiln_activation", s("GeluTanh"))
    ));
    v.push(lt(c(
        l,
        "Gemm",
        13,
        vec![r(&[5, 7]), r(&[7, 3]), r(&[5, 3])],
    )
    .a("beta", Attr::Float(0.5))));
    v.push(lt(c(l, "Gemm", 13, vec![r(&[6, 9]), r(&[4, 9]), r(&[4])])
        .a("transB", Attr::Int(1))
        .a("kiln_activation", s("Sigmoid"))));
    v.push(lt(c(
        l,
        "Gemm",
        13,
        vec![r(&[5, 7]), r(&[7, 3]), r(&[5, 1])],
    )
    .a("kiln_activation", s("Relu"))));
    v.push(lt(c(l, "MatMul", 13, vec![r(&[3, 5, 7]), r(&[7, 11])])));
    v.push(lt(c(
        l,
        "MatMul",
        13,
        vec![r(&[2, 3, 5, 7]), r(&[2, 3, 7, 6])],
    )
    .a("kiln_activation", s("Relu"))));
    v.push(lt(c(
        l,
        "MatMul",
        13,
        vec![r(&[3, 9, 31]), r(&[3, 31, 19])],
    )
    .a("kiln_activation", s("GeluTanh"))));
    v.push(lt(c(l, "MatMul", 13, vec![r(&[4, 7]), r(&[7])])));
    // An F32 bias under F16 data: cuBLAS + NVRTC epilogue, and cuBLASLt (the bias then in
    // the NVRTC epilogue, not cuBLASLt's).
    v.push(c(l, "Gemm", 13, vec![r(&[5, 7]), r(&[7, 3]), b32(3)]));
    v.push(lt(c(
        l,
        "Gemm",
        13,
        vec![r(&[33, 17]), r(&[17, 65]), b32(65)],
    )
    .a("kiln_activation", s("Relu"))));
    // --- ConvTranspose (per-group cuBLAS GEMM + NVRTC col2im gather), in the library family.
    let ct = "ConvTranspose";
    v.push(
        c(l, ct, 11, vec![r(&[2, 4, 5, 7]), r(&[4, 3, 2, 2]), b32(3)]).a("strides", ai(&[2, 2])),
    );
    v.push(
        c(l, ct, 11, vec![r(&[2, 4, 5, 7]), r(&[4, 3, 2, 2]), r(&[3])]).a("strides", ai(&[2, 2])),
    );
    v.push(
        c(l, ct, 11, vec![r(&[1, 3, 6, 5]), r(&[3, 4, 3, 3])])
            .a("strides", ai(&[2, 3]))
            .a("pads", ai(&[1, 0, 2, 1]))
            .a("output_padding", ai(&[1, 2]))
            .a("dilations", ai(&[2, 1])),
    );
    v.push(
        c(l, ct, 11, vec![r(&[2, 6, 5, 4]), r(&[6, 2, 3, 3]), r(&[6])])
            .a("group", Attr::Int(3))
            .a("strides", ai(&[1, 2]))
            .a("pads", ai(&[1, 1, 1, 1])),
    );
    v.push(
        c(l, ct, 11, vec![r(&[2, 4, 7]), r(&[4, 5, 3]), r(&[5])])
            .a("strides", ai(&[2]))
            .a("output_shape", ai(&[16])),
    );
    v.push(
        c(l, ct, 11, vec![r(&[1, 3, 5]), r(&[3, 2, 4])])
            .a("strides", ai(&[3]))
            .a("auto_pad", s("SAME_UPPER")),
    );
    v.push(
        c(l, ct, 11, vec![r(&[1, 2, 4, 5]), r(&[2, 3, 3, 3])])
            .a("strides", ai(&[2, 2]))
            .a("auto_pad", s("SAME_LOWER")),
    );
    v.push(
        c(
            l,
            ct,
            11,
            vec![r(&[1, 2, 3, 4, 3]), r(&[2, 3, 2, 2, 2]), r(&[3])],
        )
        .a("strides", ai(&[2, 1, 2])),
    );
    // --- LSTM (cuBLAS projections + NVRTC cell kernel; F32 only: the FP16 policy keeps
    // recurrent layers in FP32). seq 5, batch 3, input 7, hidden 9.
    let ls = "lstm";
    let (sq, bt, ni, nh) = (5usize, 3usize, 7usize, 9usize);
    let lstm = |nd: usize, layout: usize, ins: Vec<In>, n_out: usize| {
        let mut inputs = vec![
            r(&if layout == 0 {
                [sq, bt, ni]
            } else {
                [bt, sq, ni]
            }),
            r(&[nd, 4 * nh, ni]),
            r(&[nd, 4 * nh, nh]),
        ];
        inputs.extend(ins);
        let mut cs = c(ls, "LSTM", 14, inputs).outs(n_out).f32_only();
        if nd == 2 {
            cs = cs.a("direction", s("bidirectional"));
        }
        if layout == 1 {
            cs = cs.a("layout", Attr::Int(1));
        }
        cs.a("hidden_size", Attr::Int(nh as i64))
    };
    let st = |nd: usize, layout: usize| {
        r(&if layout == 0 {
            [nd, bt, nh]
        } else {
            [bt, nd, nh]
        })
    };
    // Forward, no optional input, every output.
    v.push(lstm(1, 0, vec![], 3));
    // Forward with B, Y only.
    v.push(lstm(1, 0, vec![r(&[1, 8 * nh])], 1));
    // Bidirectional with B, sequence_lens, initial states.
    v.push(lstm(
        2,
        0,
        vec![r(&[2, 8 * nh]), In::I32(vec![5, 2, 4]), st(2, 0), st(2, 0)],
        3,
    ));
    // Reverse with sequence_lens (one empty row), initial states and peepholes.
    v.push(
        lstm(
            1,
            0,
            vec![
                r(&[1, 8 * nh]),
                In::I32(vec![3, 0, 5]),
                st(1, 0),
                st(1, 0),
                r(&[1, 3 * nh]),
            ],
            3,
        )
        .a("direction", s("reverse")),
    );
    // Bidirectional, peepholes, no sequence_lens, Y and Y_h.
    v.push(lstm(
        2,
        0,
        vec![
            r(&[2, 8 * nh]),
            In::None,
            In::None,
            st(2, 0),
            r(&[2, 3 * nh]),
        ],
        2,
    ));
    // Layout 1, bidirectional, everything.
    v.push(lstm(
        2,
        1,
        vec![
            r(&[2, 8 * nh]),
            In::I32(vec![4, 5, 1]),
            st(2, 1),
            st(2, 1),
            r(&[2, 3 * nh]),
        ],
        3,
    ));
    // Layout 1, forward, no optional input.
    v.push(lstm(1, 1, vec![], 3));
    // Clip and input_forget.
    v.push(
        lstm(1, 0, vec![r(&[1, 8 * nh]), In::None, st(1, 0), st(1, 0)], 3)
            .a("clip", Attr::Float(0.8))
            .a("input_forget", Attr::Int(1)),
    );
    // Other activations with alpha/beta (HardSigmoid takes 0.3 and 0.4, ScaledTanh 0.7
    // and 1.3).
    v.push(
        lstm(1, 0, vec![r(&[1, 8 * nh])], 3)
            .a(
                "activations",
                Attr::Strings(vec![
                    "HardSigmoid".into(),
                    "Tanh".into(),
                    "ScaledTanh".into(),
                ]),
            )
            .a("activation_alpha", Attr::Floats(vec![0.3, 0.7]))
            .a("activation_beta", Attr::Floats(vec![0.4, 1.3])),
    );
    // --- elementwise
    let e = "elementwise";
    v.push(c(e, "Add", 14, vec![r(&[3, 5, 7]), r(&[5, 1])]));
    v.push(c(e, "Sub", 14, vec![r(&[3, 5, 7]), r(&[7])]));
    v.push(c(e, "Mul", 14, vec![r(&[2, 3, 37]), r(&[2, 3, 37])]));
    v.push(c(e, "Div", 14, vec![r(&[33]), pos(&[33])]));
    v.push(c(e, "Pow", 15, vec![pos(&[4, 9]), r(&[9])]));
    v.push(c(e, "Max", 13, vec![r(&[2, 3, 5]), r(&[3, 1]), r(&[5])]));
    v.push(c(e, "Min", 13, vec![r(&[2, 3, 5]), r(&[3, 1])]));
    v.push(c(e, "Sum", 13, vec![r(&[2, 3, 5]), r(&[3, 1]), r(&[5])]));
    v.push(c(e, "Mean", 13, vec![r(&[2, 3, 5]), r(&[1, 5])]));
    for op in [
        "Relu",
        "Sigmoid",
        "Tanh",
        "Exp",
        "Abs",
        "Neg",
        "Erf",
        "Floor",
        "Ceil",
        "Sin",
        "Cos",
        "Softplus",
        "Softsign",
        "HardSwish",
        "Elu",
        "Selu",
        "Sign",
        "Atan",
    ] {
        v.push(c(e, op, 14, vec![r(&[3, 41])]));
    }
    for op in ["Log", "Sqrt", "Reciprocal"] {
        v.push(c(e, op, 13, vec![pos(&[5, 19])]));
    }
    v.push(c(e, "Round", 11, vec![r(&[67])]));
    v.push(
        c(e, "HardSigmoid", 6, vec![r(&[5, 13])])
            .a("alpha", Attr::Float(0.3))
            .a("beta", Attr::Float(0.4)),
    );
    v.push(c(e, "LeakyRelu", 16, vec![r(&[5, 13])]).a("alpha", Attr::Float(0.1)));
    v.push(c(e, "Celu", 12, vec![r(&[5, 13])]).a("alpha", Attr::Float(1.5)));
    v.push(c(e, "ThresholdedRelu", 10, vec![r(&[5, 13])]).a("alpha", Attr::Float(0.5)));
    v.push(c(e, "Mish", 18, vec![r(&[5, 13])]));
    v.push(c(e, "Gelu", 20, vec![r(&[5, 13])]));
    v.push(c(e, "Gelu", 20, vec![r(&[5, 13])]).a("approximate", s("tanh")));
    v.push(c(
        e,
        "Clip",
        13,
        vec![
            r(&[4, 17]),
            In::F(vec![], vec![-0.5]),
            In::F(vec![], vec![0.7]),
        ],
    ));
    v.push(c(
        e,
        "Clip",
        13,
        vec![r(&[4, 17]), In::None, In::F(vec![], vec![0.7])],
    ));
    v.push(
        c(e, "Clip", 6, vec![r(&[4, 17])])
            .a("min", Attr::Float(-0.2))
            .a("max", Attr::Float(1.1)),
    );
    v.push(c(
        e,
        "Where",
        16,
        vec![In::B(vec![3, 1, 5]), r(&[3, 4, 5]), r(&[5])],
    ));
    v.push(c(e, "Less", 13, vec![r(&[3, 4]), r(&[4])]));
    v.push(c(e, "GreaterOrEqual", 16, vec![r(&[3, 4]), r(&[3, 1])]));
    v.push(c(
        e,
        "Equal",
        13,
        vec![
            In::Idx(DType::I64, vec![6, 5], 3),
            In::Idx(DType::I64, vec![5], 3),
        ],
    ));
    v.push(c(e, "PRelu", 16, vec![r(&[2, 3, 4, 5]), r(&[3, 1, 1])]));
    v.push(
        c(
            e,
            "Add",
            14,
            vec![
                In::Idx(DType::I64, vec![5, 3], 100),
                In::Idx(DType::I64, vec![3], 100),
            ],
        )
        .f32_only(),
    );
    v.push(
        c(
            e,
            "Mul",
            14,
            vec![
                In::Idx(DType::I32, vec![5, 3], 100),
                In::Idx(DType::I32, vec![5, 3], 100),
            ],
        )
        .f32_only(),
    );
    v.push(c(e, "And", 7, vec![In::B(vec![4, 5]), In::B(vec![5])]).f32_only());
    v.push(c(e, "Not", 1, vec![In::B(vec![4, 5])]).f32_only());
    v.push(c(e, "IsNaN", 13, vec![r(&[4, 5])]));
    // --- cast (explicit dtypes)
    let k = "cast";
    let cast = |from: DType, to: DType| {
        c(k, "Cast", 19, vec![In::As(from, vec![3, 7, 5])])
            .a("to", Attr::Int(onnx_type(to)))
            .f32_only()
    };
    v.push(cast(DType::F32, DType::F16));
    v.push(cast(DType::F16, DType::F32));
    v.push(cast(DType::F32, DType::I64));
    v.push(cast(DType::I64, DType::F32));
    v.push(cast(DType::F32, DType::Bool));
    v.push(cast(DType::Bool, DType::F32));
    v.push(cast(DType::I32, DType::I64));
    v.push(cast(DType::F32, DType::BF16));
    // --- reductions
    let rd = "reduce";
    v.push(c(rd, "ReduceMean", 18, vec![r(&[3, 5, 129]), ints(&[-1])]));
    v.push(c(rd, "ReduceSum", 13, vec![r(&[4, 3, 5]), ints(&[0, 2])]).a("keepdims", Attr::Int(0)));
    v.push(c(rd, "ReduceSum", 13, vec![r(&[3, 70, 40])]).a("keepdims", Attr::Int(0)));
    v.push(c(rd, "ReduceMax", 13, vec![r(&[2, 3001])]).a("axes", ai(&[1])));
    v.push(c(rd, "ReduceMin", 13, vec![r(&[6, 7, 3])]).a("axes", ai(&[1])));
    v.push(c(rd, "ReduceL2", 13, vec![r(&[6, 7, 3])]).a("axes", ai(&[0, 2])));
    v.push(c(rd, "ReduceL1", 13, vec![r(&[6, 7, 3])]).a("axes", ai(&[2])));
    v.push(c(rd, "ReduceSumSquare", 13, vec![r(&[6, 7, 3])]).a("axes", ai(&[1])));
    v.push(c(rd, "ReduceLogSum", 13, vec![pos(&[6, 7, 3])]).a("axes", ai(&[1])));
    v.push(c(rd, "ReduceProd", 13, vec![pos(&[6, 5])]).a("axes", ai(&[1])));
    v.push(c(rd, "ReduceMean", 13, vec![r(&[1, 5000, 3])]).a("axes", ai(&[1])));
    v.push(
        c(
            rd,
            "ReduceSum",
            13,
            vec![In::Idx(DType::I64, vec![4, 6], 50), ints(&[1])],
        )
        .f32_only(),
    );
    v.push(c(
        rd,
        "ReduceMean",
        18,
        vec![r(&[3, 5, 7]), In::Iv(vec![0, -1])],
    ));
    v.push(c(rd, "ArgMax", 13, vec![r(&[3, 7, 5])]).a("axis", Attr::Int(1)));
    v.push(
        c(rd, "ArgMin", 13, vec![r(&[4, 33])])
            .a("axis", Attr::Int(-1))
            .a("keepdims", Attr::Int(0))
            .a("select_last_index", Attr::Int(1)),
    );
    v.push(
        c(rd, "ArgMax", 13, vec![In::Idx(DType::I64, vec![5, 9], 4)])
            .a("axis", Attr::Int(1))
            .f32_only(),
    );
    v.push(c(rd, "GlobalAveragePool", 1, vec![r(&[2, 3, 7, 9])]));
    v.push(c(rd, "GlobalMaxPool", 1, vec![r(&[2, 3, 5, 5, 3])]));
    // --- softmax
    let sm = "softmax";
    v.push(c(sm, "Softmax", 13, vec![r(&[3, 5, 77])]));
    v.push(c(sm, "Softmax", 13, vec![r(&[2, 7, 3])]).a("axis", Attr::Int(1)));
    v.push(c(sm, "Softmax", 11, vec![r(&[2, 3, 4])]));
    v.push(c(sm, "LogSoftmax", 13, vec![r(&[4, 300])]));
    v.push(c(sm, "Softmax", 13, vec![r(&[2, 1500])]));
    // --- normalizations
    let nm = "norm";
    v.push(
        c(
            nm,
            "LayerNormalization",
            17,
            vec![r(&[2, 5, 37]), r(&[37]), r(&[37])],
        )
        .a("epsilon", Attr::Float(1e-5)),
    );
    v.push(
        c(
            nm,
            "LayerNormalization",
            17,
            vec![r(&[2, 3, 4, 5]), r(&[4, 5])],
        )
        .a("axis", Attr::Int(-2)),
    );
    v.push(c(
        nm,
        "LayerNormalization",
        17,
        vec![r(&[3, 700]), r(&[700]), r(&[700])],
    ));
    v.push(c(
        nm,
        "InstanceNormalization",
        6,
        vec![r(&[2, 3, 4, 5]), r(&[3]), r(&[3])],
    ));
    v.push(c(
        nm,
        "BatchNormalization",
        15,
        vec![r(&[2, 3, 4, 5]), r(&[3]), r(&[3]), r(&[3]), pos(&[3])],
    ));
    // --- pooling
    let pl = "pool";
    v.push(
        c(pl, "MaxPool", 12, vec![r(&[1, 3, 9, 11])])
            .a("kernel_shape", ai(&[3, 3]))
            .a("strides", ai(&[2, 2]))
            .a("pads", ai(&[1, 1, 1, 1])),
    );
    v.push(
        c(pl, "MaxPool", 12, vec![r(&[1, 2, 8, 8])])
            .a("kernel_shape", ai(&[3, 3]))
            .a("strides", ai(&[2, 2]))
            .a("ceil_mode", Attr::Int(1)),
    );
    v.push(
        c(pl, "MaxPool", 12, vec![r(&[1, 2, 7, 7])])
            .a("kernel_shape", ai(&[2, 2]))
            .a("strides", ai(&[2, 2]))
            .a("auto_pad", s("SAME_UPPER")),
    );
    v.push(
        c(pl, "MaxPool", 12, vec![r(&[1, 1, 9, 9])])
            .a("kernel_shape", ai(&[2, 2]))
            .a("dilations", ai(&[2, 2])),
    );
    v.push(
        c(pl, "AveragePool", 11, vec![r(&[1, 3, 9, 11])])
            .a("kernel_shape", ai(&[3, 3]))
            .a("strides", ai(&[2, 2]))
            .a("pads", ai(&[1, 1, 1, 1])),
    );
    v.push(
        c(pl, "AveragePool", 11, vec![r(&[1, 3, 9, 11])])
            .a("kernel_shape", ai(&[3, 3]))
            .a("strides", ai(&[2, 2]))
            .a("pads", ai(&[1, 1, 1, 1]))
            .a("count_include_pad", Attr::Int(1)),
    );
    v.push(
        c(pl, "AveragePool", 11, vec![r(&[2, 3, 11])])
            .a("kernel_shape", ai(&[4]))
            .a("strides", ai(&[3])),
    );
    v.push(c(pl, "AveragePool", 11, vec![r(&[1, 2, 5, 6, 7])]).a("kernel_shape", ai(&[2, 3, 2])));
    // --- resize
    let rs = "resize";
    let scales = |v: &[f32]| In::F(vec![v.len()], v.to_vec());
    let empty = In::F(vec![0], vec![]);
    v.push(
        c(
            rs,
            "Resize",
            13,
            vec![
                r(&[1, 3, 5, 7]),
                empty.clone(),
                scales(&[1.0, 1.0, 2.0, 2.0]),
            ],
        )
        .a("mode", s("nearest"))
        .a("coordinate_transformation_mode", s("asymmetric"))
        .a("nearest_mode", s("floor")),
    );
    v.push(
        c(
            rs,
            "Resize",
            13,
            vec![r(&[1, 3, 5, 7]), In::None, In::None, ints(&[1, 3, 9, 11])],
        )
        .a("mode", s("linear")),
    );
    v.push(
        c(
            rs,
            "Resize",
            13,
            vec![
                r(&[1, 3, 5, 7]),
                empty.clone(),
                scales(&[1.0, 1.0, 1.5, 2.5]),
            ],
        )
        .a("mode", s("linear"))
        .a("coordinate_transformation_mode", s("align_corners")),
    );
    v.push(
        c(
            rs,
            "Resize",
            13,
            vec![
                r(&[1, 2, 8, 9]),
                empty.clone(),
                scales(&[1.0, 1.0, 0.5, 0.5]),
            ],
        )
        .a("mode", s("nearest")),
    );
    v.push(
        c(
            rs,
            "Resize",
            13,
            vec![r(&[1, 2, 4, 5]), In::None, In::None, ints(&[1, 2, 7, 3])],
        )
        .a("mode", s("linear"))
        .a("coordinate_transformation_mode", s("pytorch_half_pixel")),
    );
    v.push(
        c(
            rs,
            "Resize",
            13,
            vec![r(&[2, 3, 4]), empty, scales(&[1.0, 2.0, 3.0])],
        )
        .a("mode", s("nearest"))
        .a("coordinate_transformation_mode", s("half_pixel"))
        .a("nearest_mode", s("round_prefer_ceil")),
    );
    // --- movement
    let mv = "movement";
    v.push(c(mv, "Reshape", 14, vec![r(&[2, 3, 5]), ints(&[5, -1])]));
    v.push(c(mv, "Flatten", 13, vec![r(&[2, 3, 5])]).a("axis", Attr::Int(2)));
    v.push(c(mv, "Unsqueeze", 13, vec![r(&[2, 3]), ints(&[0, 3])]));
    v.push(c(mv, "Squeeze", 13, vec![r(&[2, 1, 3]), ints(&[1])]));
    v.push(c(mv, "Identity", 16, vec![r(&[7, 3])]));
    v.push(c(mv, "Transpose", 13, vec![r(&[2, 3, 5, 7])]).a("perm", ai(&[0, 2, 3, 1])));
    v.push(c(mv, "Transpose", 13, vec![r(&[3, 4, 5])]));
    v.push(c(
        mv,
        "Slice",
        13,
        vec![
            r(&[3, 7, 9]),
            ints(&[1, -3]),
            ints(&[100, -1]),
            ints(&[1, 2]),
            ints(&[2, 1]),
        ],
    ));
    v.push(c(
        mv,
        "Slice",
        13,
        vec![
            r(&[3, 7, 9]),
            ints(&[-1]),
            ints(&[-100]),
            ints(&[2]),
            ints(&[-2]),
        ],
    ));
    v.push(c(
        mv,
        "Expand",
        13,
        vec![r(&[3, 1, 5]), ints(&[2, 3, 4, 5])],
    ));
    v.push(
        c(
            mv,
            "Concat",
            13,
            vec![r(&[2, 3, 5]), r(&[2, 1, 5]), r(&[2, 4, 5])],
        )
        .a("axis", Attr::Int(1)),
    );
    v.push(c(mv, "Concat", 13, vec![r(&[2, 3, 5]), r(&[2, 3, 2])]).a("axis", Attr::Int(-1)));
    v.push(
        c(mv, "Split", 13, vec![r(&[2, 3, 9]), ints(&[2, 3, 4])])
            .a("axis", Attr::Int(2))
            .outs(3),
    );
    v.push(c(
        mv,
        "Pad",
        13,
        vec![
            r(&[2, 3, 4]),
            ints(&[0, 1, 2, 0, 2, 1]),
            In::F(vec![], vec![1.5]),
        ],
    ));
    for mode in ["reflect", "edge", "wrap"] {
        v.push(c(mv, "Pad", 19, vec![r(&[3, 5]), ints(&[2, 1, 1, 3])]).a("mode", s(mode)));
    }
    v.push(c(mv, "Pad", 13, vec![r(&[4, 6]), ints(&[-1, 2, 0, -2])]));
    v.push(c(mv, "Tile", 13, vec![r(&[2, 3, 4]), ints(&[2, 1, 3])]));
    v.push(c(
        mv,
        "Gather",
        13,
        vec![r(&[50, 16]), In::Idx(DType::I64, vec![3, 4], 50)],
    ));
    v.push(
        c(
            mv,
            "Gather",
            13,
            vec![r(&[4, 9, 3]), In::Idx(DType::I32, vec![5], 9)],
        )
        .a("axis", Attr::Int(1)),
    );
    v.push(
        c(
            mv,
            "GatherElements",
            13,
            vec![r(&[3, 5]), In::Idx(DType::I64, vec![3, 4], 5)],
        )
        .a("axis", Attr::Int(1)),
    );
    v.push(c(
        mv,
        "GatherElements",
        13,
        vec![r(&[4, 3, 2]), In::Idx(DType::I32, vec![2, 3, 2], 4)],
    ));
    v.push(c(mv, "DepthToSpace", 13, vec![r(&[1, 8, 3, 2])]).a("blocksize", Attr::Int(2)));
    v.push(
        c(mv, "DepthToSpace", 13, vec![r(&[2, 8, 3, 2])])
            .a("blocksize", Attr::Int(2))
            .a("mode", s("CRD")),
    );
    v.push(c(mv, "SpaceToDepth", 13, vec![r(&[2, 3, 4, 6])]).a("blocksize", Attr::Int(2)));
    // --- extra
    let x = "extra";
    v.push(c(x, "Shape", 15, vec![r(&[2, 3, 5])]).a("start", Attr::Int(1)));
    v.push(c(x, "Size", 13, vec![r(&[2, 3, 5])]));
    v.push(c(x, "Trilu", 14, vec![r(&[2, 4, 5]), ints(&[1])]));
    v.push(c(x, "Trilu", 14, vec![r(&[3, 6])]).a("upper", Attr::Int(0)));
    v.push(c(x, "CumSum", 14, vec![r(&[3, 7, 4]), ints(&[1])]));
    v.push(
        c(x, "CumSum", 14, vec![r(&[3, 7, 4]), ints(&[-1])])
            .a("exclusive", Attr::Int(1))
            .a("reverse", Attr::Int(1)),
    );
    v.push(c(
        x,
        "GatherND",
        13,
        vec![r(&[4, 5, 3]), In::Idx(DType::I64, vec![3, 2], 4)],
    ));
    v.push(
        c(
            x,
            "GatherND",
            13,
            vec![r(&[2, 4, 3]), In::Idx(DType::I64, vec![2, 3, 1], 4)],
        )
        .a("batch_dims", Attr::Int(1)),
    );
    v.push(
        c(
            x,
            "ScatterElements",
            16,
            vec![r(&[4, 5]), In::Idx(DType::I64, vec![4, 1], 5), r(&[4, 1])],
        )
        .a("axis", Attr::Int(1)),
    );
    v.push(c(
        x,
        "ScatterND",
        16,
        vec![r(&[5, 4]), In::Ix(vec![2, 1], vec![1, -2]), r(&[2, 4])],
    ));
    v.push(c(e, "Mod", 13, vec![r(&[4, 7]), pos(&[7])]).a("fmod", Attr::Int(1)));
    v.push(
        c(
            e,
            "Mod",
            13,
            vec![
                In::Idx(DType::I64, vec![4, 7], 50),
                In::Ix(vec![7], vec![3, -3, 7, -5, 1, 2, -9]),
            ],
        )
        .f32_only(),
    );
    v.push(
        c(mv, "ConstantOfShape", 9, vec![ints(&[2, 3, 5])])
            .a(
                "value",
                Attr::Tensor(Tensor::from_vec(&[1], vec![2.5f32]).unwrap()),
            )
            .f32_only(),
    );
    // --- INT8 layers (kiln domain; the CPU ops of kiln_cpu::ops::int8 are the reference)
    let q = "int8";
    let i8s = |s: &[usize]| In::As(DType::I8, s.to_vec());
    let scales = |m: usize| Attr::Floats((0..m).map(|i| 0.02 + 0.005 * i as f32).collect());
    let bias = |m: usize| In::F(vec![m], (0..m).map(|i| 0.3 * i as f32 - 0.7).collect());
    v.push(c(q, "Int8Quantize", 1, vec![r(&[3, 5, 7])]).a("scale", Attr::Float(0.013)));
    v.push(c(q, "Int8Dequantize", 1, vec![i8s(&[4, 9])]).a("scale", Attr::Float(0.05)));
    v.push(
        c(
            q,
            "Int8Conv",
            1,
            vec![i8s(&[2, 5, 9, 11]), i8s(&[6, 5, 3, 3]), bias(6)],
        )
        .a("pads", ai(&[1, 1, 1, 1]))
        .a("strides", ai(&[2, 1]))
        .a("x_scale", Attr::Float(0.05))
        .a("y_scale", Attr::Float(0.01))
        .a("w_scales", scales(6))
        .a("kiln_activation", s("Relu")),
    );
    v.push(
        c(
            q,
            "Int8Conv",
            1,
            vec![i8s(&[1, 6, 7, 7]), i8s(&[4, 3, 3, 3])],
        )
        .a("group", Attr::Int(2))
        .a("x_scale", Attr::Float(0.05))
        .a("y_scale", Attr::Float(0.02))
        .a("w_scales", scales(4)),
    );
    v.push(
        c(
            q,
            "Int8Conv",
            1,
            vec![i8s(&[2, 4, 17]), i8s(&[5, 4, 3]), bias(5)],
        )
        .a("dilations", ai(&[2]))
        .a("auto_pad", s("SAME_UPPER"))
        .a("x_scale", Attr::Float(0.05))
        .a("y_scale", Attr::Float(0.01))
        .a("w_scales", scales(5)),
    );
    v.push(
        c(
            q,
            "Int8MatMul",
            1,
            vec![i8s(&[2, 5, 8]), i8s(&[3, 8]), bias(3)],
        )
        .a("x_scale", Attr::Float(0.05))
        .a("y_scale", Attr::Float(0.01))
        .a("w_scales", scales(3))
        .a("kiln_activation", s("HardSwish")),
    );
    v.push(
        c(q, "Int8MatMul", 1, vec![i8s(&[7, 13]), i8s(&[9, 13])])
            .a("x_scale", Attr::Float(0.05))
            .a("y_scale", Attr::Float(0.02))
            .a("w_scales", scales(9)),
    );
    // cuBLASLt IMMA (kiln_gpu_tactic = cublaslt; reduction and output channels multiples of
    // 4): i32 sums on the tensor cores, then the same requantization; 1×1 convolutions
    // through an NHWC copy; `prepare` checks they did not fall back to the NVRTC kernels.
    v.push(
        c(
            q,
            "Int8Conv",
            1,
            vec![i8s(&[2, 16, 5, 7]), i8s(&[12, 16, 1, 1]), bias(12)],
        )
        .a("x_scale", Attr::Float(0.05))
        .a("y_scale", Attr::Float(0.02))
        .a("w_scales", scales(12))
        .a("kiln_activation", s("Relu"))
        .a("kiln_gpu_tactic", s("cublaslt")),
    );
    v.push(
        c(
            q,
            "Int8Conv",
            1,
            vec![i8s(&[1, 96, 9, 11]), i8s(&[40, 96, 1, 1])],
        )
        .a("x_scale", Attr::Float(0.02))
        .a("y_scale", Attr::Float(0.05))
        .a("w_scales", scales(40))
        .a("kiln_gpu_tactic", s("cublaslt")),
    );
    v.push(
        c(
            q,
            "Int8MatMul",
            1,
            vec![i8s(&[2, 9, 32]), i8s(&[12, 32]), bias(12)],
        )
        .a("x_scale", Attr::Float(0.05))
        .a("y_scale", Attr::Float(0.01))
        .a("w_scales", scales(12))
        .a("kiln_activation", s("HardSwish"))
        .a("kiln_gpu_tactic", s("cublaslt")),
    );
    v.push(
        c(q, "Int8MatMul", 1, vec![i8s(&[37, 264]), i8s(&[40, 264])])
            .a("x_scale", Attr::Float(0.02))
            .a("y_scale", Attr::Float(0.03))
            .a("w_scales", scales(40))
            .a("kiln_gpu_tactic", s("cublaslt")),
    );
    v
}

fn onnx_type(d: DType) -> i64 {
    match d {
        DType::F32 => 1,
        DType::U8 => 2,
        DType::I8 => 3,
        DType::I32 => 6,
        DType::I64 => 7,
        DType::Bool => 9,
        DType::F16 => 10,
        DType::F64 => 11,
        DType::BF16 => 16,
        _ => 0,
    }
}

// ------------------------------------------------------------------------------------------
// Inputs and the CPU reference
// ------------------------------------------------------------------------------------------

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// ±[0.1, 2].
    fn val(&mut self) -> f32 {
        let m = 0.1 + 1.9 * self.unit();
        if self.next() & 1 == 0 {
            m
        } else {
            -m
        }
    }
}

fn round_f16(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect()
}

/// (tensor for the CPU reference, tensor for the device, is_constant)
fn make_input(i: &In, rng: &mut Rng, fdt: DType) -> Option<(Tensor, Tensor, bool)> {
    let conv = |v: Vec<f32>, shape: &[usize]| -> (Tensor, Tensor) {
        if fdt == DType::F16 {
            let v = round_f16(v);
            let cpu = Tensor::from_vec(shape, v.clone()).unwrap();
            (cpu.clone(), cpu.cast(DType::F16).unwrap())
        } else {
            let t = Tensor::from_vec(shape, v).unwrap();
            (t.clone(), t)
        }
    };
    Some(match i {
        In::None => return None,
        In::R(s) | In::Pos(s) => {
            let n: usize = s.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    if matches!(i, In::Pos(_)) {
                        0.5 + 2.0 * rng.unit()
                    } else {
                        rng.val()
                    }
                })
                .collect();
            let (a, b) = conv(v, s);
            (a, b, false)
        }
        In::As(dt, s) => {
            let n: usize = s.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.val() * 3.0).collect();
            let v = round_f16(v);
            let t = Tensor::from_vec(s, v).unwrap().cast(*dt).unwrap();
            (t.clone(), t, false)
        }
        In::I(v) | In::Iv(v) => {
            let t = Tensor::from_vec(&[v.len()], v.clone()).unwrap();
            (t.clone(), t, matches!(i, In::I(_)))
        }
        In::Ix(s, v) => {
            let t = Tensor::from_vec(s, v.clone()).unwrap();
            (t.clone(), t, false)
        }
        In::F(s, v) => {
            let (a, b) = conv(v.clone(), s);
            (a, b, true)
        }
        In::Idx(dt, s, n) => {
            let len: usize = s.iter().product();
            let v: Vec<i64> = (0..len)
                .map(|_| (rng.next() % (2 * *n as u64)) as i64 - n)
                .collect();
            let t = Tensor::from_vec(s, v).unwrap().cast(*dt).unwrap();
            (t.clone(), t, false)
        }
        In::I32(v) => {
            let t = Tensor::from_vec(&[v.len()], v.clone()).unwrap();
            (t.clone(), t, false)
        }
        In::B(s) => {
            let len: usize = s.iter().product();
            let v: Vec<bool> = (0..len).map(|_| rng.next() & 1 == 1).collect();
            let t = Tensor::from_bools(s, &v).unwrap();
            (t.clone(), t, false)
        }
    })
}

// ------------------------------------------------------------------------------------------
// The device harness
// ------------------------------------------------------------------------------------------

struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    modules: HashMap<String, std::result::Result<Arc<CudaModule>, String>>,
}

impl Gpu {
    fn module(&mut self, name: &str, code: &str) -> std::result::Result<Arc<CudaModule>, String> {
        if let Some(m) = self.modules.get(name) {
            return m.clone();
        }
        let opts = CompileOptions {
            arch: Some("sm_90"),
            include_paths: vec!["/usr/local/cuda/include".into()],
            ..Default::default()
        };
        let res = match compile_ptx_with_opts(code, opts) {
            Ok(ptx) => self.ctx.load_module(ptx).map_err(|e| format!("load: {e}")),
            Err(e) => {
                let numbered: String = code
                    .lines()
                    .enumerate()
                    .map(|(i, l)| format!("{:4} {l}\n", i + 1))
                    .collect();
                Err(format!("NVRTC compile error in {name}: {e:?}\n{numbered}"))
            }
        };
        if let Err(e) = &res {
            eprintln!("{e}");
        }
        self.modules.insert(name.to_string(), res.clone());
        res
    }

    fn upload(&self, t: &Tensor) -> std::result::Result<u64, String> {
        let bytes = t.bytes();
        let n = bytes.len().max(1);
        // SAFETY: plain allocation and copy of `n` bytes from a live host slice.
        unsafe {
            let p = cudarc::driver::result::malloc_sync(n).map_err(|e| e.to_string())?;
            if !bytes.is_empty() {
                cudarc::driver::result::memcpy_htod_sync(p, bytes).map_err(|e| e.to_string())?;
            }
            Ok(p)
        }
    }
}

fn dev(ptr: u64, t: (DType, Vec<usize>)) -> DevTensor {
    DevTensor {
        ptr,
        dtype: t.0,
        shape: t.1.into_iter().collect(),
    }
}

fn to_f32(t: &Tensor) -> Vec<f64> {
    match t.dtype() {
        DType::Bool => t
            .as_bools()
            .unwrap()
            .iter()
            .map(|&b| b as i64 as f64)
            .collect(),
        _ => t.to_f64_vec().unwrap(),
    }
}

/// A case made ready for the device: inputs, the CPU's answer and the lowered layer.
struct Prepared {
    made: Vec<Option<(Tensor, Tensor, bool)>>,
    want: Vec<Tensor>,
    out_facts: Vec<Fact>,
    layer: Box<dyn kiln_cuda::GpuLayer>,
}

/// Builds inputs, evaluates the CPU reference and lowers the node (no GPU needed).
fn prepare(case: &Case, fdt: DType, seed: u64) -> std::result::Result<Prepared, String> {
    let mut rng = Rng(seed | 1);
    // Cases carrying kiln's fused activation are kiln-domain layers (Conv/Gemm/MatMul+act).
    let domain =
        if case.op.starts_with("Int8") || case.attrs.iter().any(|(k, _)| *k == "kiln_activation") {
            "kiln"
        } else {
            ""
        };
    let mut desc = OpDesc::new(domain, case.op, case.opset);
    for (k, v) in &case.attrs {
        desc.attrs.insert(k.to_string(), v.clone());
    }
    // kiln's CPU fusion has no GELU: the reference is the plain op followed by tanh-GELU.
    let gelu_tanh =
        matches!(desc.attrs.get("kiln_activation"), Some(Attr::String(a)) if a == "GeluTanh");
    let mut cpu_desc = desc.clone();
    if gelu_tanh {
        cpu_desc.attrs.remove("kiln_activation");
        cpu_desc.domain = String::new();
    }
    let made: Vec<Option<(Tensor, Tensor, bool)>> = case
        .inputs
        .iter()
        .map(|i| make_input(i, &mut rng, fdt))
        .collect();
    let reg = kiln_cpu::registry();
    let op = reg
        .build(&BuildCtx {
            node: "case",
            desc: &cpu_desc,
            n_inputs: made.len(),
            n_outputs: case.n_out,
        })
        .map_err(|e| format!("CPU build: {e}"))?;
    let vals: Vec<Option<Value>> = made
        .iter()
        .map(|m| m.as_ref().map(|x| Value::Tensor(x.0.clone())))
        .collect();
    let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
    let want = op.eval(&refs).map_err(|e| format!("CPU eval: {e}"))?;
    // Ops with optional outputs (LayerNormalization's Mean, ...) may compute more than asked.
    let want: Vec<Tensor> = want
        .into_iter()
        .take(case.n_out)
        .map(|v| v.into_tensor().unwrap())
        .map(|t| {
            if !gelu_tanh {
                return t;
            }
            let v: Vec<f32> = t
                .to_f32_vec()
                .unwrap()
                .into_iter()
                .map(|x| {
                    let x = x as f64;
                    (0.5 * x
                        * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh()))
                        as f32
                })
                .collect();
            Tensor::from_vec(t.shape(), v).unwrap()
        })
        .collect();
    // Facts as the device sees them.
    let in_facts: Vec<Fact> = made
        .iter()
        .map(|m| match m {
            None => Fact::unknown(),
            Some((_, d, true)) => Fact::constant(d.clone()),
            Some((_, d, false)) => Fact::concrete(d.dtype(), d.shape()),
        })
        .collect();
    let dev_out_dt = |t: &Tensor| {
        if t.dtype() == DType::F32 && fdt == DType::F16 {
            DType::F16
        } else {
            t.dtype()
        }
    };
    let out_facts: Vec<Fact> = want
        .iter()
        .map(|t| Fact::concrete(dev_out_dt(t), t.shape()))
        .collect();
    let node = Node {
        name: format!("case_{}", case.op),
        desc,
        op,
        inputs: made
            .iter()
            .enumerate()
            .map(|(i, m)| m.as_ref().map(|_| i))
            .collect(),
        outputs: (0..case.n_out).map(|i| Some(1000 + i)).collect(),
        fused_from: vec![],
    };
    let layer = match kiln_cuda::library::lower(&node, &in_facts, &out_facts)
        .or_else(|| kernels::lower(&node, &in_facts, &out_facts))
    {
        None => return Err("not lowered".into()),
        Some(Err(e)) => return Err(format!("lower: {e}")),
        Some(Ok(l)) => l,
    };
    let imma = matches!(case.op, "Int8MatMul" | "Int8Conv")
        && case.attrs.iter().any(|(k, v)| {
            *k == "kiln_gpu_tactic" && matches!(v, Attr::String(t) if t == "cublaslt")
        });
    if imma && kiln_cuda::lt::available() && !layer.tactic().starts_with("cublaslt.int8.imma") {
        return Err(format!("IMMA case lowered to {}", layer.tactic()));
    }
    Ok(Prepared {
        made,
        want,
        out_facts,
        layer,
    })
}

/// Runs one case in one float dtype; Ok(max abs error) or Err(reason).
fn run_case(gpu: &mut Gpu, case: &Case, fdt: DType, seed: u64) -> std::result::Result<f64, String> {
    let Prepared {
        made,
        want,
        out_facts,
        layer,
    } = prepare(case, fdt, seed)?;
    let mut ms = ModuleSet::default();
    for src in layer.sources() {
        let m = gpu.module(&src.module, &src.code)?;
        ms.insert(src.module.clone(), m);
    }
    // Device buffers: inputs uploaded, outputs poisoned with 0x7f bytes.
    let mut ins = Vec::new();
    let mut allocs = Vec::new();
    for m in &made {
        match m {
            None => ins.push(DevTensor {
                ptr: 0,
                dtype: DType::F32,
                shape: Default::default(),
            }),
            Some((_, d, _)) => {
                let p = gpu.upload(d)?;
                allocs.push(p);
                ins.push(dev(p, (d.dtype(), d.shape().to_vec())));
            }
        }
    }
    let mut outs = Vec::new();
    for f in &out_facts {
        let dt = f.dtype.unwrap();
        let shape = f.concrete_shape().unwrap();
        let bytes = shape.iter().product::<usize>() * dt.size();
        // SAFETY: plain allocation and byte fill of a fresh buffer.
        let p = unsafe {
            let p = cudarc::driver::result::malloc_sync(bytes.max(1)).map_err(|e| e.to_string())?;
            cudarc::driver::result::memset_d8_sync(p, 0x7f, bytes.max(1))
                .map_err(|e| e.to_string())?;
            p
        };
        allocs.push(p);
        outs.push(dev(p, (dt, shape)));
    }
    let dnn = if layer.uses_dnn() {
        Some(kiln_cuda::dnn::DnnHandle::new(&gpu.stream).map_err(|e| e.to_string())?)
    } else {
        None
    };
    layer
        .prepare(&kiln_cuda::PrepareCx {
            dnn: dnn.as_ref(),
            tf32: false,
        })
        .map_err(|e| format!("prepare: {e}"))?;
    let wbytes = layer.workspace_bytes(&ins);
    let work = if wbytes > 0 {
        // SAFETY: plain allocation.
        let p =
            unsafe { cudarc::driver::result::malloc_sync(wbytes) }.map_err(|e| e.to_string())?;
        allocs.push(p);
        p
    } else {
        0
    };
    let cx = LaunchCx {
        stream: &gpu.stream,
        modules: &ms,
        workspace: work,
        workspace_bytes: wbytes,
        blas: Some(&gpu.blas),
        tf32: false,
        dnn: dnn.as_ref(),
    };
    let res = layer
        .enqueue(&cx, &ins, &outs)
        .map_err(|e| format!("enqueue: {e}"));
    let sync = gpu.stream.synchronize().map_err(|e| format!("sync: {e}"));
    let mut got = Vec::new();
    if res.is_ok() && sync.is_ok() {
        for o in &outs {
            let mut buf = vec![0u8; o.bytes()];
            // SAFETY: copies `o.bytes()` from a buffer allocated with that size.
            unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut buf, o.ptr) }
                .map_err(|e| e.to_string())?;
            got.push(Tensor::from_bytes(o.dtype, &o.shape, &buf).map_err(|e| e.to_string())?);
        }
    }
    for p in allocs {
        // SAFETY: each pointer came from malloc_sync above and is freed once.
        unsafe { cudarc::driver::result::free_sync(p) }.ok();
    }
    res?;
    sync?;
    let (atol, rtol) = if fdt == DType::F16 {
        (1.5e-2, 1.5e-2)
    } else {
        (2e-5, 2e-4)
    };
    let mut worst = 0.0f64;
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        if g.shape() != w.shape() {
            return Err(format!(
                "output {k}: shape {:?}, want {:?}",
                g.shape(),
                w.shape()
            ));
        }
        let exact = !w.dtype().is_float();
        let (gv, wv) = (to_f32(g), to_f32(w));
        for (i, (a, b)) in gv.iter().zip(&wv).enumerate() {
            let err = (a - b).abs();
            // INT8 outputs: one quantization step for a rounding tie decided differently
            // by a last-ulp difference in the f32 epilogue.
            let tol = if w.dtype() == DType::I8 {
                1.0
            } else if exact {
                0.0
            } else {
                atol + rtol * b.abs()
            };
            // NaN errors fail too.
            if err.is_nan() || err > tol {
                return Err(format!("output {k}[{i}]: got {a}, want {b} (tol {tol})"));
            }
            worst = worst.max(err);
        }
    }
    Ok(worst)
}

fn seed_of(n: usize) -> u64 {
    0x9e37_79b9_7f4a_7c15 ^ (n as u64 * 7919)
}

/// Runs without a GPU: every case's CPU reference evaluates and its node lowers, and the
/// generated sources name the entry points the layer launches.
#[test]
fn every_case_lowers() {
    let mut bad = Vec::new();
    for (n, case) in cases().iter().enumerate() {
        let dts: &[DType] = if case.f16 {
            &[DType::F32, DType::F16]
        } else {
            &[DType::F32]
        };
        for &dt in dts {
            match prepare(case, dt, seed_of(n)) {
                Ok(p) => {
                    let srcs = p.layer.sources();
                    for src in &srcs {
                        assert!(src.code.contains("extern \"C\" __global__"), "{}", case.op);
                    }
                }
                Err(e) => bad.push(format!("{} {} {}: {e}", case.op, n, dt.name())),
            }
        }
    }
    assert!(bad.is_empty(), "cases that do not lower: {bad:#?}");
}

#[test]
fn gpu_kernels_match_cpu_reference() {
    if !kiln_cuda::driver_present() {
        println!("skipped: no CUDA driver");
        return;
    }
    // SAFETY: only probes whether the NVRTC library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        println!("skipped: no NVRTC library");
        return;
    }
    let ctx = CudaContext::new(0).expect("CUDA context");
    let stream = ctx.default_stream();
    let blas = cudarc::cublas::CudaBlas::new(stream.clone()).expect("cuBLAS handle");
    let mut gpu = Gpu {
        ctx,
        stream,
        blas,
        modules: HashMap::new(),
    };
    let filter = std::env::var("KILN_GPU_CASES").ok();
    let mut fam: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for (n, case) in cases().iter().enumerate() {
        if let Some(f) = &filter {
            if !case.op.contains(f.as_str()) && case.family != f {
                continue;
            }
        }
        let dts: &[DType] = if case.f16 {
            &[DType::F32, DType::F16]
        } else {
            &[DType::F32]
        };
        for &dt in dts {
            let t0 = std::time::Instant::now();
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_case(&mut gpu, case, dt, seed_of(n))
            }))
            .unwrap_or_else(|_| Err("panicked".into()));
            let e = fam.entry(case.family).or_default();
            let label = format!("{} {}#{} {}", case.family, case.op, n, dt.name());
            match res {
                Ok(err) => {
                    e.0 += 1;
                    println!(
                        "PASS {label} maxerr={err:.3e} ({:.0} ms)",
                        t0.elapsed().as_secs_f64() * 1e3
                    );
                }
                Err(why) => {
                    e.1 += 1;
                    let first = why.lines().next().unwrap_or("").to_string();
                    println!("FAIL {label}: {first}");
                    failures.push(label);
                }
            }
        }
    }
    println!("==== summary (family: pass/fail) ====");
    for (f, (p, q)) in &fam {
        println!("{f:12} {p:3} pass {q:3} fail");
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

/// Throughput of a few large layers (only with `KILN_GPU_BENCH=1` and a GPU); prints
/// effective bandwidth (bytes read + written once / time). No assertions on speed.
#[test]
fn gpu_kernel_throughput() {
    if std::env::var("KILN_GPU_BENCH").is_err() || !kiln_cuda::driver_present() {
        println!("skipped: set KILN_GPU_BENCH=1 on a machine with a GPU");
        return;
    }
    let ctx = CudaContext::new(0).expect("CUDA context");
    let stream = ctx.default_stream();
    let blas = cudarc::cublas::CudaBlas::new(stream.clone()).expect("cuBLAS handle");
    let mut gpu = Gpu {
        ctx,
        stream,
        blas,
        modules: HashMap::new(),
    };
    type B = (
        &'static str,
        i64,
        Vec<(&'static str, Attr)>,
        Vec<(DType, Vec<usize>)>,
        (DType, Vec<usize>),
    );
    let h = DType::F16;
    let f = DType::F32;
    let benches: Vec<B> = vec![
        (
            "Add",
            14,
            vec![],
            vec![(f, vec![1 << 26]), (f, vec![1 << 26])],
            (f, vec![1 << 26]),
        ),
        (
            "Add",
            14,
            vec![],
            vec![(h, vec![1 << 26]), (h, vec![1 << 26])],
            (h, vec![1 << 26]),
        ),
        (
            "Add",
            14,
            vec![],
            vec![(h, vec![256, 64, 56, 56]), (h, vec![64, 1, 1])],
            (h, vec![256, 64, 56, 56]),
        ),
        (
            "Relu",
            14,
            vec![],
            vec![(h, vec![256, 64, 112, 112])],
            (h, vec![256, 64, 112, 112]),
        ),
        (
            "Erf",
            13,
            vec![],
            vec![(h, vec![64 * 128, 3072])],
            (h, vec![64 * 128, 3072]),
        ),
        (
            "Softmax",
            13,
            vec![],
            vec![(h, vec![64 * 12 * 128, 128])],
            (h, vec![64 * 12 * 128, 128]),
        ),
        (
            "Transpose",
            13,
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
            vec![(h, vec![64, 128, 12, 64])],
            (h, vec![64, 12, 128, 64]),
        ),
        (
            "GlobalAveragePool",
            1,
            vec![],
            vec![(h, vec![256, 2048, 7, 7])],
            (h, vec![256, 2048, 1, 1]),
        ),
        (
            "MaxPool",
            12,
            vec![
                ("kernel_shape", Attr::Ints(vec![3, 3])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![1, 1, 1, 1])),
            ],
            vec![(h, vec![256, 64, 112, 112])],
            (h, vec![256, 64, 56, 56]),
        ),
        (
            "ReduceMean",
            13,
            vec![("axes", Attr::Ints(vec![-1]))],
            vec![(f, vec![64 * 128, 768])],
            (f, vec![64 * 128, 1]),
        ),
    ];
    let mut lnorm: Vec<B> = vec![(
        "LayerNormalization",
        17,
        vec![],
        vec![(h, vec![64 * 128, 768]), (h, vec![768]), (h, vec![768])],
        (h, vec![64 * 128, 768]),
    )];
    lnorm.extend(benches);
    println!(
        "{:20} {:>6} {:>28} {:>10} {:>10}",
        "op", "dtype", "shape", "us", "GB/s"
    );
    for (op, opset, attrs, ins, out) in lnorm {
        let mut desc = OpDesc::new("", op, opset);
        for (k, v) in attrs {
            desc.attrs.insert(k.to_string(), v);
        }
        let n_in = ins.len();
        let node = Node {
            name: op.into(),
            desc,
            op: Arc::new(NoOp),
            inputs: (0..n_in).map(Some).collect(),
            outputs: vec![Some(1000)],
            fused_from: vec![],
        };
        let in_facts: Vec<Fact> = ins.iter().map(|(d, s)| Fact::concrete(*d, s)).collect();
        let out_facts = vec![Fact::concrete(out.0, &out.1)];
        let Some(Ok(layer)) = kernels::lower(&node, &in_facts, &out_facts) else {
            println!("{op}: not lowered");
            continue;
        };
        let mut ms = ModuleSet::default();
        let mut ok = true;
        for src in layer.sources() {
            match gpu.module(&src.module, &src.code) {
                Ok(m) => ms.insert(src.module.clone(), m),
                Err(_) => ok = false,
            }
        }
        if !ok {
            continue;
        }
        let mut allocs = Vec::new();
        let mut mk = |dt: DType, s: &[usize]| -> DevTensor {
            let bytes = s.iter().product::<usize>() * dt.size();
            // SAFETY: plain allocation and fill.
            let p = unsafe {
                let p = cudarc::driver::result::malloc_sync(bytes).unwrap();
                cudarc::driver::result::memset_d8_sync(p, 0x3c, bytes).unwrap();
                p
            };
            allocs.push(p);
            dev(p, (dt, s.to_vec()))
        };
        let dins: Vec<DevTensor> = ins.iter().map(|(d, s)| mk(*d, s)).collect();
        let douts = vec![mk(out.0, &out.1)];
        let cx = LaunchCx {
            stream: &gpu.stream,
            modules: &ms,
            workspace: 0,
            workspace_bytes: 0,
            blas: None,
            tf32: false,
            dnn: None,
        };
        for _ in 0..3 {
            layer.enqueue(&cx, &dins, &douts).unwrap();
        }
        gpu.stream.synchronize().unwrap();
        let iters = 20;
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            layer.enqueue(&cx, &dins, &douts).unwrap();
        }
        gpu.stream.synchronize().unwrap();
        let us = t0.elapsed().as_secs_f64() * 1e6 / iters as f64;
        let bytes: usize = dins.iter().chain(&douts).map(|t| t.bytes()).sum();
        println!(
            "{:20} {:>6} {:>28} {:>10.1} {:>10.1}",
            op,
            ins[0].0.name(),
            format!("{:?}", ins[0].1),
            us,
            bytes as f64 / us / 1e3
        );
        for p in allocs {
            // SAFETY: allocated above, freed once.
            unsafe { cudarc::driver::result::free_sync(p) }.ok();
        }
    }
}

/// A placeholder op for nodes that are only lowered, never evaluated.
#[derive(Debug)]
struct NoOp;
impl kiln_core::Op for NoOp {
    fn op_type(&self) -> &str {
        "NoOp"
    }
    fn eval(&self, _: &[Option<&Value>]) -> kiln_core::Result<Vec<Value>> {
        Ok(vec![])
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
