//! Elementwise ops with numpy broadcasting: unary math and activations, binary arithmetic and
//! comparisons, variadic Sum/Mean/Max/Min, Where, Clip, Cast/CastLike and kiln's fused
//! `Activation`. One generated kernel per (expression, dtypes): each thread maps an output
//! index to every input's offset through coalesced broadcast strides (rank 1 when all inputs
//! have the output's shape, so no division at all), loads in the compute type (`float` for
//! F32/F16/BF16), evaluates the expression and stores converted.

use kiln_core::DType;

use super::common::{
    broadcast_strides, coalesce, compute_type, ctype, grid_for, is_kernel_float, load, prelude,
    source, store, strides, KernelLayer, Params, Ptr, Step, BLOCK, MAX_RANK,
};
use super::LowerCx;

/// Most inputs of one elementwise kernel.
pub const MAX_INPUTS: usize = 8;

/// An elementwise computation: which node inputs it reads and the C expression over
/// `x0, x1, ...` (compute-typed values of those inputs, in order).
#[derive(Debug, Clone, PartialEq)]
pub struct EwSpec {
    /// Node input indices read, in the order x0, x1, ...
    pub inputs: Vec<usize>,
    /// C expression of the result (compute type).
    pub expr: String,
}

/// A CUDA float literal for `v` (NaN and infinities spelled out).
pub(crate) fn fl(v: f32) -> String {
    if v.is_nan() {
        "__int_as_float(0x7fffffff)".into()
    } else if v == f32::INFINITY {
        "KILN_INF".into()
    } else if v == f32::NEG_INFINITY {
        "(-KILN_INF)".into()
    } else {
        format!("{:e}f", v)
    }
}

fn max_e(float: bool, a: &str, b: &str) -> String {
    if float {
        format!("fmaxf({a}, {b})")
    } else {
        format!("(({a}) > ({b}) ? ({a}) : ({b}))")
    }
}

fn min_e(float: bool, a: &str, b: &str) -> String {
    if float {
        format!("fminf({a}, {b})")
    } else {
        format!("(({a}) < ({b}) ? ({a}) : ({b}))")
    }
}

/// Expression of a float activation applied to `x` by ONNX name and parameters
/// (shared by the plain ops and kiln's fused `Activation`).
pub fn activation_expr(name: &str, p: &[f32], x: &str) -> Option<String> {
    let g = |i: usize, d: f32| p.get(i).copied().unwrap_or(d);
    Some(match name {
        "None" | "Identity" => x.to_string(),
        "Relu" => format!("fmaxf({x}, 0.0f)"),
        "Sigmoid" => format!("(1.0f / (1.0f + expf(-({x}))))"),
        "Tanh" => format!("tanhf({x})"),
        "HardSigmoid" => format!(
            "fminf(fmaxf({} * ({x}) + {}, 0.0f), 1.0f)",
            fl(g(0, 0.2)),
            fl(g(1, 0.5))
        ),
        "HardSwish" => format!("(({x}) * fminf(fmaxf(({x}) / 6.0f + 0.5f, 0.0f), 1.0f))"),
        "Swish" => format!("(({x}) / (1.0f + expf(-({x}))))"),
        "LeakyRelu" => format!("(({x}) >= 0.0f ? ({x}) : {} * ({x}))", fl(g(0, 0.01))),
        "Clip" => format!("fminf(fmaxf({x}, {}), {})", fl(g(0, f32::NEG_INFINITY)), fl(g(1, f32::INFINITY))),
        "Elu" => format!("(({x}) >= 0.0f ? ({x}) : {} * (expf({x}) - 1.0f))", fl(g(0, 1.0))),
        "Selu" => {
            let (a, gm) = (g(0, 1.673_263_2), g(1, 1.050_701));
            format!(
                "(({x}) > 0.0f ? {} * ({x}) : {} * ({} * expf({x}) - {}))",
                fl(gm),
                fl(gm),
                fl(a),
                fl(a)
            )
        }
        "Celu" => {
            let a = g(0, 1.0);
            format!(
                "(fmaxf({x}, 0.0f) + fminf(0.0f, {} * (expf(({x}) / {}) - 1.0f)))",
                fl(a),
                fl(a)
            )
        }
        "ThresholdedRelu" => format!("(({x}) > {} ? ({x}) : 0.0f)", fl(g(0, 1.0))),
        "Softplus" => format!(
            "(({x}) > 0.0f ? ({x}) + log1pf(expf(-({x}))) : log1pf(expf({x})))"
        ),
        "Softsign" => format!("(({x}) / (1.0f + fabsf({x})))"),
        "Mish" => format!(
            "(({x}) * tanhf(({x}) > 0.0f ? ({x}) + log1pf(expf(-({x}))) : log1pf(expf({x}))))"
        ),
        "GeluErf" => format!("(0.5f * ({x}) * (1.0f + erff(({x}) * 0.70710678118654752f)))"),
        "GeluTanh" => format!(
            "(0.5f * ({x}) * (1.0f + tanhf(0.79788456080286536f * (({x}) + 0.044715f * ({x}) * ({x}) * ({x})))))"
        ),
        _ => return None,
    })
}

/// Float-only unary math by op type.
fn unary_float(op: &str) -> Option<&'static str> {
    Some(match op {
        "Exp" => "expf(X)",
        "Log" => "logf(X)",
        "Sqrt" => "sqrtf(X)",
        "Erf" => "erff(X)",
        "Reciprocal" => "(1.0f / (X))",
        "Floor" => "floorf(X)",
        "Ceil" => "ceilf(X)",
        "Round" => "rintf(X)",
        "Sin" => "sinf(X)",
        "Cos" => "cosf(X)",
        "Tan" => "tanf(X)",
        "Asin" => "asinf(X)",
        "Acos" => "acosf(X)",
        "Atan" => "atanf(X)",
        "Sinh" => "sinhf(X)",
        "Cosh" => "coshf(X)",
        "Asinh" => "asinhf(X)",
        "Acosh" => "acoshf(X)",
        "Atanh" => "atanhf(X)",
        _ => return None,
    })
}

/// Works out what a node computes; `None` when not an elementwise op this module handles
/// with these dtypes and attributes.
pub fn spec(cx: &LowerCx<'_>) -> Option<EwSpec> {
    let a = cx.attrs();
    let (odt, _) = cx.output(0)?;
    let dt = |i: usize| cx.input(i).map(|x| x.0);
    let d0 = dt(0)?;
    let numeric = |d: DType| {
        matches!(
            d,
            DType::F32
                | DType::F16
                | DType::BF16
                | DType::I8
                | DType::I16
                | DType::I32
                | DType::I64
                | DType::U8
                | DType::U16
                | DType::U32
                | DType::U64
        )
    };
    let float0 = is_kernel_float(d0);
    let one = |e: String| {
        Some(EwSpec {
            inputs: vec![0],
            expr: e,
        })
    };
    let op = cx.op();
    // Ops with attributes read defaults when absent; bad attribute types mean "not lowered".
    if cx.node.desc.domain == "kiln" {
        if op != "Activation" || !float0 || odt != d0 || cx.n_in() != 1 {
            return None;
        }
        let name = a.opt_string("kiln_activation").ok()??;
        let params = a
            .opt_floats("kiln_activation_params")
            .ok()?
            .unwrap_or_default();
        return one(activation_expr(&name, &params, "x0")?);
    }
    if let Some(t) = unary_float(op) {
        if !float0 || odt != d0 || cx.n_in() != 1 {
            return None;
        }
        return one(t.replace('X', "x0"));
    }
    match op {
        "Relu" | "Sigmoid" | "Tanh" | "HardSigmoid" | "HardSwish" | "LeakyRelu" | "Elu"
        | "Selu" | "Celu" | "ThresholdedRelu" | "Softplus" | "Softsign" | "Mish" | "Gelu" => {
            if odt != d0 || cx.n_in() != 1 {
                return None;
            }
            if op == "Relu" && !float0 && numeric(d0) {
                return one("(x0 > 0 ? x0 : 0)".into());
            }
            if !float0 {
                return None;
            }
            let f = |n: &str, d: f32| a.float(n, d).ok();
            let (name, params): (&str, Vec<f32>) = match op {
                "HardSigmoid" => (op, vec![f("alpha", 0.2)?, f("beta", 0.5)?]),
                "LeakyRelu" => (op, vec![f("alpha", 0.01)?]),
                "Elu" | "Celu" | "ThresholdedRelu" => (op, vec![f("alpha", 1.0)?]),
                "Selu" => (op, vec![f("alpha", 1.673_263_2)?, f("gamma", 1.050_701)?]),
                "Gelu" => match a.string("approximate", "none").ok()?.as_str() {
                    "none" => ("GeluErf", vec![]),
                    "tanh" => ("GeluTanh", vec![]),
                    _ => return None,
                },
                _ => (op, vec![]),
            };
            one(activation_expr(name, &params, "x0")?)
        }
        "Neg" | "Abs" | "Sign" => {
            if odt != d0 || cx.n_in() != 1 || !numeric(d0) {
                return None;
            }
            one(match (op, float0) {
                ("Neg", _) => "(-x0)".into(),
                ("Abs", true) => "fabsf(x0)".into(),
                ("Abs", false) => "(x0 < 0 ? -x0 : x0)".into(),
                ("Sign", true) => "(x0 > 0.0f ? 1.0f : (x0 < 0.0f ? -1.0f : 0.0f))".into(),
                _ => "(x0 > 0 ? 1 : (x0 < 0 ? -1 : 0))".into(),
            })
        }
        "IsNaN" => (float0 && odt == DType::Bool && cx.n_in() == 1).then(|| EwSpec {
            inputs: vec![0],
            expr: "(x0 != x0)".into(),
        }),
        "IsInf" => {
            if !(float0 && odt == DType::Bool && cx.n_in() == 1) {
                return None;
            }
            let pos = a.int("detect_positive", 1).ok()? != 0;
            let neg = a.int("detect_negative", 1).ok()? != 0;
            one(format!(
                "(({} && x0 == KILN_INF) || ({} && x0 == -KILN_INF))",
                pos as i32, neg as i32
            ))
        }
        "Not" => (d0 == DType::Bool && odt == DType::Bool && cx.n_in() == 1).then(|| EwSpec {
            inputs: vec![0],
            expr: "(!x0)".into(),
        }),
        "Cast" | "CastLike" => {
            // Float8 and strings are not kernel types; `saturate` only matters for float8.
            ctype(d0)?;
            ctype(odt)?;
            if op == "Cast" && cx.n_in() != 1 {
                return None;
            }
            // Float to bool goes through `!= 0` in `store`; float to int truncates.
            Some(EwSpec {
                inputs: vec![0],
                expr: "x0".into(),
            })
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            if cx.n_in() != 2 || dt(1)? != d0 || odt != d0 || !numeric(d0) {
                return None;
            }
            // Legacy (opset < 7) broadcast with `axis` differs from numpy's.
            if cx.opset() < 7 && a.has("broadcast") {
                return None;
            }
            let sym = match op {
                "Add" => "+",
                "Sub" => "-",
                "Mul" => "*",
                _ => "/",
            };
            if op == "Div" && !float0 {
                // Integer division by zero is undefined in C; give 0 rather than garbage.
                return Some(EwSpec {
                    inputs: vec![0, 1],
                    expr: "(x1 == 0 ? 0 : x0 / x1)".into(),
                });
            }
            Some(EwSpec {
                inputs: vec![0, 1],
                expr: format!("(x0 {sym} x1)"),
            })
        }
        "Mod" => {
            if cx.n_in() != 2 || dt(1)? != d0 || odt != d0 || !numeric(d0) {
                return None;
            }
            let fmod = a.int("fmod", 0).ok()? != 0;
            let e = match (float0, fmod) {
                (true, true) => "fmodf(x0, x1)",
                // Float Mod needs fmod=1 (ONNX); leave the error to the CPU.
                (true, false) => return None,
                (false, true) => "(x1 == 0 ? 0 : x0 % x1)",
                (false, false) => {
                    "(x1 == 0 ? 0 : ((x0 % x1) != 0 && (((x0 % x1) < 0) != (x1 < 0)) ? (x0 % x1) + x1 : (x0 % x1)))"
                }
            };
            Some(EwSpec {
                inputs: vec![0, 1],
                expr: e.into(),
            })
        }
        "Pow" => {
            let d1 = dt(1)?;
            if cx.n_in() != 2 || !float0 || odt != d0 || !numeric(d1) {
                return None;
            }
            Some(EwSpec {
                inputs: vec![0, 1],
                expr: "powf(x0, (float)x1)".into(),
            })
        }
        "PRelu" => {
            if cx.n_in() != 2 || !float0 || dt(1)? != d0 || odt != d0 {
                return None;
            }
            Some(EwSpec {
                inputs: vec![0, 1],
                expr: "(x0 < 0.0f ? x0 * x1 : x0)".into(),
            })
        }
        "Max" | "Min" | "Sum" | "Mean" => {
            let n = cx.n_in();
            if n == 0 || n > MAX_INPUTS || odt != d0 || !numeric(d0) {
                return None;
            }
            if (0..n).any(|i| dt(i) != Some(d0)) || (op == "Mean" && !float0) {
                return None;
            }
            let mut e = "x0".to_string();
            for i in 1..n {
                let xi = format!("x{i}");
                e = match op {
                    "Max" => max_e(float0, &e, &xi),
                    "Min" => min_e(float0, &e, &xi),
                    _ => format!("({e} + {xi})"),
                };
            }
            if op == "Mean" {
                e = format!("({e} / {}.0f)", n);
            }
            Some(EwSpec {
                inputs: (0..n).collect(),
                expr: e,
            })
        }
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" => {
            if cx.n_in() != 2 || dt(1)? != d0 || odt != DType::Bool {
                return None;
            }
            if !(numeric(d0) || d0 == DType::Bool) {
                return None;
            }
            let sym = match op {
                "Equal" => "==",
                "Less" => "<",
                "Greater" => ">",
                "LessOrEqual" => "<=",
                _ => ">=",
            };
            Some(EwSpec {
                inputs: vec![0, 1],
                expr: format!("(x0 {sym} x1)"),
            })
        }
        "And" | "Or" | "Xor" => {
            if cx.n_in() != 2 || d0 != DType::Bool || dt(1)? != DType::Bool || odt != DType::Bool {
                return None;
            }
            let e = match op {
                "And" => "(x0 && x1)",
                "Or" => "(x0 || x1)",
                _ => "((x0 != 0) != (x1 != 0))",
            };
            Some(EwSpec {
                inputs: vec![0, 1],
                expr: e.into(),
            })
        }
        "Where" => {
            if cx.n_in() != 3 || d0 != DType::Bool || dt(1)? != odt || dt(2)? != odt {
                return None;
            }
            ctype(odt)?;
            Some(EwSpec {
                inputs: vec![0, 1, 2],
                expr: "(x0 ? x1 : x2)".into(),
            })
        }
        "Clip" => {
            if odt != d0 || !numeric(d0) {
                return None;
            }
            if cx.opset() < 11 {
                if !float0 {
                    return None;
                }
                let lo = a.float("min", f32::NEG_INFINITY).ok()?;
                let hi = a.float("max", f32::INFINITY).ok()?;
                return one(activation_expr("Clip", &[lo, hi], "x0")?);
            }
            let mut inputs = vec![0];
            let mut e = "x0".to_string();
            for (k, i) in [1usize, 2].into_iter().enumerate() {
                if cx.present(i) {
                    let (di, si) = cx.input(i)?;
                    if di != d0 || si.iter().product::<usize>() != 1 {
                        return None;
                    }
                    let xi = format!("x{}", inputs.len());
                    inputs.push(i);
                    e = if k == 0 {
                        max_e(float0, &e, &xi)
                    } else {
                        min_e(float0, &e, &xi)
                    };
                }
            }
            Some(EwSpec { inputs, expr: e })
        }
        _ => None,
    }
}

/// Builds the kernel source of an elementwise computation.
pub fn kernel_code(in_dts: &[DType], odt: DType, expr: &str) -> Option<String> {
    let n = in_dts.len();
    let mut all = in_dts.to_vec();
    all.push(odt);
    let mut s = prelude(&all);
    s.push_str(&format!(
        "struct P {{ long long n; long long rank; long long dims[{MAX_RANK}]; long long st[{n}][{MAX_RANK}]; }};\n"
    ));
    // Two entry points: 64-bit index math, and 32-bit (`kiln_ew32`, chosen when every index
    // fits in 31 bits; 64-bit division is many times slower on the GPU).
    for (name, ix) in [("kiln_ew", "long long"), ("kiln_ew32", "unsigned int")] {
        s.push_str(&format!("extern \"C\" __global__ void {name}("));
        for (k, d) in in_dts.iter().enumerate() {
            s.push_str(&format!("const {}* __restrict__ a{k}, ", ctype(*d)?));
        }
        s.push_str(&format!("{}* __restrict__ y, const P p) {{\n", ctype(odt)?));
        s.push_str(&format!(
            "  const {ix} n = ({ix})p.n; const {ix} step = ({ix})gridDim.x * ({ix})blockDim.x;\n\
  for ({ix} i = ({ix})blockIdx.x * ({ix})blockDim.x + ({ix})threadIdx.x; i < n; i += step) {{\n    {ix} rem = i;\n"
        ));
        for k in 0..n {
            s.push_str(&format!("    {ix} o{k} = 0;\n"));
        }
        s.push_str(&format!(
            "    for (int d = (int)p.rank - 1; d > 0; --d) {{\n      const {ix} dd = ({ix})p.dims[d]; {ix} c = rem % dd; rem /= dd;\n"
        ));
        for k in 0..n {
            s.push_str(&format!("      o{k} += c * ({ix})p.st[{k}][d];\n"));
        }
        s.push_str("    }\n");
        for (k, d) in in_dts.iter().enumerate() {
            s.push_str(&format!("    o{k} += rem * ({ix})p.st[{k}][0];\n"));
            s.push_str(&format!(
                "    {} x{k} = {};\n",
                compute_type(*d)?,
                load(*d, &format!("a{k}[o{k}]"))
            ));
        }
        s.push_str(&format!("    y[i] = {};\n  }}\n}}\n", store(odt, expr)));
    }
    Some(s)
}

/// Builds the layer for `spec` given input shapes and the output shape.
pub fn build(
    tactic: String,
    spec: &EwSpec,
    ins: &[(DType, Vec<usize>)],
    out: &(DType, Vec<usize>),
    n_node_inputs: usize,
) -> Option<KernelLayer> {
    let (odt, oshape) = out;
    if oshape.len() > MAX_RANK || ins.len() > MAX_INPUTS || ins.is_empty() {
        return None;
    }
    let mut lists = Vec::new();
    for (_, s) in ins {
        lists.push(broadcast_strides(s, oshape)?);
    }
    let (dims, st) = coalesce(oshape, &lists);
    if dims.len() > MAX_RANK {
        return None;
    }
    let dts: Vec<DType> = ins.iter().map(|x| x.0).collect();
    let code = kernel_code(&dts, *odt, &spec.expr)?;
    let n: usize = oshape.iter().product();
    let mut p = Params::new();
    p.i(n as i64).i(dims.len() as i64).arr(
        &dims.iter().map(|&d| d as i64).collect::<Vec<_>>(),
        MAX_RANK,
        1,
    );
    for s in &st {
        p.arr(s, MAX_RANK, 0);
    }
    let mut ptrs: Vec<Ptr> = spec.inputs.iter().map(|&i| Ptr::In(i, 0)).collect();
    ptrs.push(Ptr::Out(0, 0));
    let mut in_facts = vec![None; n_node_inputs];
    for (k, &i) in spec.inputs.iter().enumerate() {
        in_facts[i] = Some(ins[k].clone());
    }
    let _ = strides;
    Some(KernelLayer {
        tactic,
        src: Some(source("ew", code)),
        steps: vec![Step::Launch {
            // Inputs never hold more elements than the output (broadcast only expands).
            func: if n < (1 << 31) {
                "kiln_ew32"
            } else {
                "kiln_ew"
            },
            grid: grid_for(n),
            block: BLOCK,
            shmem: 0,
            ptrs,
            params: p,
        }],
        in_facts,
        out_facts: vec![Some(out.clone())],
        work: 0,
    })
}

/// Lowers an elementwise node.
pub fn lower(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    if !cx.single_output() {
        return None;
    }
    let spec = spec(cx)?;
    let out = cx.output(0)?;
    let ins: Vec<(DType, Vec<usize>)> = spec
        .inputs
        .iter()
        .map(|&i| cx.input(i))
        .collect::<Option<_>>()?;
    let tactic = format!("nvrtc.elementwise.{}.{}", cx.op(), out.0.name());
    build(tactic, &spec, &ins, &out, cx.n_in())
}

#[cfg(test)]
mod tests {
    use kiln_core::{Attr, DType};

    use super::*;
    use crate::kernels::testutil::{f, node};
    use crate::kernels::{lower_layer, LowerCx};

    fn try_lower(
        op: &str,
        opset: i64,
        attrs: Vec<(&str, Attr)>,
        ins: &[(DType, &[usize])],
        out: (DType, &[usize]),
    ) -> Option<crate::kernels::KernelLayer> {
        let n = node(op, opset, attrs, ins.len(), 1);
        let fi: Vec<_> = ins.iter().map(|(d, s)| f(*d, s)).collect();
        let fo = vec![f(out.0, out.1)];
        lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
    }

    #[test]
    fn lowers_common_ops() {
        let l = try_lower(
            "Add",
            14,
            vec![],
            &[(DType::F32, &[2, 3, 4]), (DType::F32, &[3, 1])],
            (DType::F32, &[2, 3, 4]),
        )
        .unwrap();
        let code = &l.src.as_ref().unwrap().code;
        assert!(code.contains("extern \"C\" __global__ void kiln_ew("));
        assert!(code.contains("(x0 + x1)"));
        assert_eq!(l.tactic, "nvrtc.elementwise.Add.f32");
        match &l.steps[0] {
            Step::Launch {
                params, ptrs, func, ..
            } => {
                assert_eq!(*func, "kiln_ew32");
                assert_eq!(ptrs, &vec![Ptr::In(0, 0), Ptr::In(1, 0), Ptr::Out(0, 0)]);
                // n, rank 3 (2,3,4 do not merge: input 1 breaks both joints).
                assert_eq!(params.0[0], 24);
                assert_eq!(params.0[1], 3);
            }
            _ => panic!(),
        }
        let h = try_lower(
            "Relu",
            14,
            vec![],
            &[(DType::F16, &[5])],
            (DType::F16, &[5]),
        )
        .unwrap();
        let code = &h.src.as_ref().unwrap().code;
        assert!(code.contains("cuda_fp16.h") && code.contains("__half2float"));
        assert!(try_lower(
            "Erf",
            13,
            vec![],
            &[(DType::BF16, &[5])],
            (DType::BF16, &[5])
        )
        .is_some());
        assert!(try_lower(
            "Where",
            16,
            vec![],
            &[
                (DType::Bool, &[1, 5]),
                (DType::F32, &[3, 5]),
                (DType::F32, &[1])
            ],
            (DType::F32, &[3, 5])
        )
        .is_some());
        assert!(try_lower(
            "Cast",
            19,
            vec![("to", Attr::Int(7))],
            &[(DType::F16, &[4])],
            (DType::I64, &[4])
        )
        .is_some());
        assert!(try_lower(
            "IsNaN",
            13,
            vec![],
            &[(DType::F32, &[4])],
            (DType::Bool, &[4])
        )
        .is_some());
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        // Float-only math on ints, bad broadcast, legacy broadcast, F64 math, unknown gelu mode.
        assert!(try_lower("Exp", 13, vec![], &[(DType::I32, &[4])], (DType::I32, &[4])).is_none());
        assert!(try_lower(
            "Add",
            14,
            vec![],
            &[(DType::F32, &[2, 3]), (DType::F32, &[2])],
            (DType::F32, &[2, 3])
        )
        .is_none());
        assert!(try_lower(
            "Add",
            6,
            vec![("broadcast", Attr::Int(1))],
            &[(DType::F32, &[2, 3]), (DType::F32, &[3])],
            (DType::F32, &[2, 3])
        )
        .is_none());
        assert!(try_lower("Exp", 13, vec![], &[(DType::F64, &[4])], (DType::F64, &[4])).is_none());
        assert!(try_lower(
            "Gelu",
            20,
            vec![("approximate", Attr::String("x".into()))],
            &[(DType::F32, &[4])],
            (DType::F32, &[4])
        )
        .is_none());
        assert!(try_lower(
            "Pow",
            15,
            vec![],
            &[(DType::I32, &[4]), (DType::I32, &[4])],
            (DType::I32, &[4])
        )
        .is_none());
        // Zero-sized outputs stay on the CPU.
        assert!(try_lower(
            "Relu",
            14,
            vec![],
            &[(DType::F32, &[0])],
            (DType::F32, &[0])
        )
        .is_none());
    }

    #[test]
    fn activation_params_reach_the_code() {
        let l = try_lower(
            "LeakyRelu",
            16,
            vec![("alpha", Attr::Float(0.25))],
            &[(DType::F32, &[3])],
            (DType::F32, &[3]),
        )
        .unwrap();
        assert!(l.src.unwrap().code.contains("2.5e-1f"));
        let mut n = node(
            "Activation",
            1,
            vec![
                ("kiln_activation", Attr::String("Clip".into())),
                ("kiln_activation_params", Attr::Floats(vec![0.0, 6.0])),
            ],
            1,
            1,
        );
        n.desc.domain = "kiln".into();
        let fi = vec![f(DType::F32, &[7])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fi,
        })
        .unwrap();
        assert!(l.src.unwrap().code.contains("fminf(fmaxf(x0, 0e0f), 6e0f)"));
    }
}
