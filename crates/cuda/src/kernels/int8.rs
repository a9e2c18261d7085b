//! kiln's INT8 layers on the GPU: `kiln.Int8Quantize`, `kiln.Int8Dequantize`,
//! `kiln.Int8Conv` and `kiln.Int8MatMul`, with the semantics of `kiln_cpu::ops::int8`
//! (symmetric, zero point 0, values in [-127, 127]; the CPU ops are the reference).
//!
//! - Quantize: `q = clamp(rint(x · (1/scale)), -127, 127)` (round half to even, NaN → 0),
//!   with `1/scale` computed in f32 on the host exactly as the CPU op does.
//! - Products: i8 × i8 products summed in `int` (`__dp4a` four at a time where the
//!   reduction is contiguous and a multiple of 4), then `y = act(acc·mul[m] + bias[m])`
//!   with `mul[m] = x_scale · w_scale[m]` and `q = quantize(y / y_scale)`. The per-channel
//!   multipliers and biases are build-time constants, written into the module as a
//!   `__constant__` table (exact f32 literals), so the layer reads no extra buffers.
//!   `__fmul_rn` / `__fadd_rn` keep the epilogue from being contracted into an FMA, so it
//!   rounds like the CPU's; fused activations may still differ by one f32 ulp, i.e. by at
//!   most one quantization step on a tie.
//!
//! One thread per output value: these are the correctness-first kernels (tactic ids
//! `nvrtc.int8.*`); they do not use the tensor cores' IMMA path.

use kiln_core::DType;

use super::common::{
    grid_for, load, prelude, source, store, KernelLayer, Params, Ptr, Step, BLOCK,
};
use super::elementwise::fl;
use super::LowerCx;
use crate::library::{act_code, conv_geometry, fused_activation, CONV_STRUCT};

/// Largest per-channel table written into a module (`__constant__` memory is 64 KiB).
const MAX_CHANNELS: usize = 4096;

/// Lowers the INT8 ops of the `kiln` domain.
pub fn lower(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    if !cx.single_output() {
        return None;
    }
    if !symmetric(cx.node) {
        return None;
    }
    match cx.op() {
        "Int8Quantize" => qdq(cx, true),
        "Int8Dequantize" => qdq(cx, false),
        "Int8Conv" => conv(cx),
        "Int8MatMul" => matmul(cx),
        _ => None,
    }
}

/// True for the symmetric INT8 layers these kernels cover; explicit-quantization layers
/// (zero points, u8 or f32 outputs) are left to the CPU.
pub fn symmetric(node: &kiln_core::Node) -> bool {
    let attrs = &node.desc.attrs;
    !["x_zero_point", "y_zero_point", "y_dtype"]
        .iter()
        .any(|k| attrs.contains_key(*k))
}

/// A positive finite float attribute.
fn scale(cx: &LowerCx<'_>, name: &str) -> Option<f32> {
    cx.attrs()
        .opt_float(name)
        .ok()
        .flatten()
        .filter(|s| s.is_finite() && *s > 0.0)
}

/// The C helper that quantizes a float already divided by the scale.
const QUANT_FN: &str = "__device__ __forceinline__ signed char kiln_q(float v) {\n\
  if (v != v) return 0;\n\
  v = fminf(fmaxf(v, -127.0f), 127.0f);\n\
  return (signed char)rintf(v);\n}\n";

fn step(func: &'static str, n: usize, ptrs: Vec<Ptr>, params: Params) -> Step {
    Step::Launch {
        func,
        grid: grid_for(n),
        block: BLOCK,
        shmem: 0,
        ptrs,
        params,
    }
}

fn qdq(cx: &LowerCx<'_>, quantize: bool) -> Option<KernelLayer> {
    let s = scale(cx, "scale")?;
    let (dx, sx) = cx.input(0)?;
    let (dy, sy) = cx.output(0)?;
    if sx != sy {
        return None;
    }
    let n: usize = sx.iter().product();
    let (src_t, dst_t, body, family) = if quantize {
        if !super::common::is_kernel_float(dx) || dy != DType::I8 {
            return None;
        }
        let inv = 1.0f32 / s;
        (
            super::common::ctype(dx)?,
            "signed char",
            format!(
                "y[i] = kiln_q(__fmul_rn({}, {}));",
                load(dx, "x[i]"),
                fl(inv)
            ),
            "quantize",
        )
    } else {
        if dx != DType::I8 || !super::common::is_kernel_float(dy) {
            return None;
        }
        (
            "signed char",
            super::common::ctype(dy)?,
            format!(
                "y[i] = {};",
                store(dy, &format!("__fmul_rn((float)x[i], {})", fl(s)))
            ),
            "dequantize",
        )
    };
    let code = format!(
        "{}{QUANT_FN}struct P {{ long long n; }};\n\
extern \"C\" __global__ void kiln_i8_qdq(const {src_t}* __restrict__ x, {dst_t}* __restrict__ y, const P p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) {{ {body} }}\n}}\n",
        prelude(&[dx, dy])
    );
    let mut p = Params::new();
    p.i(n as i64);
    Some(KernelLayer {
        tactic: format!("nvrtc.int8.{family}"),
        src: Some(source("int8", code)),
        steps: vec![step(
            "kiln_i8_qdq",
            n,
            vec![Ptr::In(0, 0), Ptr::Out(0, 0)],
            p,
        )],
        in_facts: vec![Some((dx, sx))],
        out_facts: vec![Some((dy, sy))],
        work: 0,
    })
}

/// `__constant__` tables of the per-channel multiplier and bias, and the epilogue
/// expression producing the quantized output from `acc` for channel `ch`.
fn epilogue(cx: &LowerCx<'_>, channels: usize) -> Option<(String, String)> {
    if channels == 0 || channels > MAX_CHANNELS {
        return None;
    }
    let xs = scale(cx, "x_scale")?;
    let ys = scale(cx, "y_scale")?;
    let ws = cx.attrs().opt_floats("w_scales").ok().flatten()?;
    if ws.len() != channels {
        return None;
    }
    let bias: Vec<f32> = if cx.present(2) {
        // The bias must be a build-time constant of one value per channel.
        let b = cx.konst(2)?;
        let v = b.to_f64_vec().ok()?;
        if v.len() != channels {
            return None;
        }
        v.into_iter().map(|x| x as f32).collect()
    } else {
        vec![0.0; channels]
    };
    let act = fused_activation(cx.node).ok()?;
    let mul: Vec<String> = ws.iter().map(|w| fl(xs * w)).collect();
    let add: Vec<String> = bias.iter().map(|&b| fl(b)).collect();
    let tables = format!(
        "__constant__ float kiln_mul[{channels}] = {{{}}};\n__constant__ float kiln_bias[{channels}] = {{{}}};\n",
        mul.join(","),
        add.join(",")
    );
    let y = act_code(&act, "v")?;
    let inv_y = 1.0f32 / ys;
    let expr = format!(
        "float v = __fadd_rn(__fmul_rn((float)acc, kiln_mul[ch]), kiln_bias[ch]); v = {y}; \
         return kiln_q(__fmul_rn(v, {}));",
        fl(inv_y)
    );
    Some((tables, expr))
}

/// The geometry of an `Int8Conv` with i8 input, weights and output.
fn i8_conv_geometry(cx: &LowerCx<'_>) -> Option<crate::library::ConvParams> {
    let (dx, sx) = cx.input(0)?;
    let (dw, sw) = cx.input(1)?;
    let (dy, sy) = cx.output(0)?;
    if dx != DType::I8 || dw != DType::I8 || dy != DType::I8 {
        return None;
    }
    conv_geometry(cx.node, &sx, &sw, &sy)
}

fn conv(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let g = i8_conv_geometry(cx)?;
    let (tables, expr) = epilogue(cx, g.m as usize)?;
    let code = format!(
        "{}{QUANT_FN}typedef long long I;\n{CONV_STRUCT}{tables}\
__device__ __forceinline__ signed char kiln_epi(int acc, long long ch) {{ {expr} }}\n\
extern \"C\" __global__ void kiln_i8_conv(const signed char* __restrict__ x, const signed char* __restrict__ w, signed char* __restrict__ y, const ConvP p) {{\n\
  long long total = p.n * p.m * p.opos;\n\
  for (long long i = KILN_TID; i < total; i += KILN_STRIDE) {{\n\
    long long o = i % p.opos, m = (i / p.opos) % p.m, n = i / (p.opos * p.m);\n\
    long long g = m / p.mg;\n\
    const signed char* xb = x + (n * p.c + g * p.cg) * p.ipos;\n\
    const signed char* wb = w + m * p.cg * p.kpos;\n\
    int acc = 0;\n\
    for (long long k = 0; k < p.kpos; ++k) {{\n\
      I off;\n\
      if (!kiln_conv_in(p, k, o, &off)) continue;\n\
      for (long long c = 0; c < p.cg; ++c) acc += (int)xb[c * p.ipos + off] * (int)wb[c * p.kpos + k];\n\
    }}\n\
    y[i] = kiln_epi(acc, m);\n\
  }}\n}}\n",
        prelude(&[])
    );
    let mut p = Params::new();
    for v in [g.n, g.c, g.m, g.cg, g.mg, g.kpos, g.opos, g.ipos] {
        p.i(v);
    }
    for a in [g.is, g.os, g.ks, g.st, g.dl, g.pb] {
        p.arr(&a, 3, 0);
    }
    let total = (g.n * g.m * g.opos) as usize;
    let in_facts = product_in_facts(cx)?;
    Some(KernelLayer {
        tactic: "nvrtc.int8.conv".into(),
        src: Some(source("int8", code)),
        steps: vec![step(
            "kiln_i8_conv",
            total,
            vec![Ptr::In(0, 0), Ptr::In(1, 0), Ptr::Out(0, 0)],
            p,
        )],
        in_facts,
        out_facts: vec![Some(cx.output(0)?)],
        work: 0,
    })
}

/// The sizes `(rows, n, k)` of an `Int8MatMul` (`[.., k]` i8 activations, `[n, k]` i8
/// weights, `[.., n]` i8 output); `None` when the facts do not fit.
pub fn matmul_dims(cx: &LowerCx<'_>) -> Option<(usize, usize, usize)> {
    let (da, sa) = cx.input(0)?;
    let (dw, sw) = cx.input(1)?;
    let (dy, sy) = cx.output(0)?;
    if da != DType::I8 || dw != DType::I8 || dy != DType::I8 || sa.len() < 2 || sw.len() != 2 {
        return None;
    }
    let (n, k) = (sw[0], sw[1]);
    let r = sa.len();
    if sa[r - 1] != k || sy.len() != r || sy[..r - 1] != sa[..r - 1] || sy[r - 1] != n {
        return None;
    }
    Some((sa[..r - 1].iter().product(), n, k))
}

/// Expected `(dtype, shape)` of each input of a layer (`None`: absent or not read).
type InFacts = Vec<Option<(DType, Vec<usize>)>>;

/// Expected input facts of an INT8 product layer (activations, weights; others unread).
fn product_in_facts(cx: &LowerCx<'_>) -> Option<InFacts> {
    let mut v = vec![Some(cx.input(0)?), Some(cx.input(1)?)];
    v.resize(cx.n_in(), None);
    Some(v)
}

/// `(batch, c, m, positions)` of an `Int8Conv` that is a plain product: 1×1 kernel,
/// strides 1, no pads, one group (`y[b][m][p] = Σ_c w[m][c]·x[b][c][p]`); `None` otherwise.
pub fn pointwise_dims(cx: &LowerCx<'_>) -> Option<(usize, usize, usize, usize)> {
    let g = i8_conv_geometry(cx)?;
    let plain = g.kpos == 1 && g.cg == g.c && g.st == [1; 3] && g.pb == [0; 3] && g.is == g.os;
    plain.then_some((g.n as usize, g.c as usize, g.m as usize, g.opos as usize))
}

/// The requantization of an INT8 product whose i32 sums are at the start of the layer's
/// workspace, row-major `acc[batch · positions, m]` (one row per output pixel or MatMul
/// row): `y[b][ch][p] = quantize(act(acc·mul[ch] + bias[ch]))`, the epilogue of the
/// `nvrtc.int8.*` kernels (`positions` = 1 for MatMul, whose output is `[rows, m]`). Used
/// after cuBLASLt's IMMA product ([`crate::lt::Int8LtLayer`]).
pub fn requant_layer(
    cx: &LowerCx<'_>,
    batch: usize,
    m: usize,
    positions: usize,
) -> Option<KernelLayer> {
    let (tables, expr) = epilogue(cx, m)?;
    let head = format!(
        "{}{QUANT_FN}{tables}__device__ __forceinline__ signed char kiln_epi(int acc, long long ch) {{ {expr} }}\n",
        prelude(&[])
    );
    // i = (b, ch, q) of the NCHW output; the sums are [b, q, ch].
    let total = batch * m * positions;
    grid3_layer(
        cx,
        Grid3 {
            func: "kiln_i8_requant",
            head,
            args: "const int* __restrict__ acc, signed char* __restrict__ y",
            body: "y[i] = kiln_epi(acc[(i0 * p.d1 + i1) * p.d2 + i2], i2);",
        },
        [total, positions, m],
        vec![Ptr::Work(0), Ptr::Out(0, 0)],
        total * 4,
    )
}

/// One grid-stride kernel over `i < p.total`, with `i` split as `(i0, i2, i1)` for the
/// sizes `p.d2` (middle) and `p.d1` (innermost): `i1 = i % d1`, `i2 = (i / d1) % d2`,
/// `i0 = i / (d1 · d2)`.
struct Grid3 {
    func: &'static str,
    /// Code before the kernel (prelude, helpers).
    head: String,
    /// Pointer parameters.
    args: &'static str,
    /// Statement computing element `i`.
    body: &'static str,
}

/// A layer of one [`Grid3`] kernel with `[total, d1, d2]` = `dims`, the INT8 product's
/// input/output facts, and `work` bytes of workspace.
fn grid3_layer(
    cx: &LowerCx<'_>,
    k: Grid3,
    dims: [usize; 3],
    ptrs: Vec<Ptr>,
    work: usize,
) -> Option<KernelLayer> {
    let code = format!(
        "{}struct P {{ long long total, d1, d2; }};\n\
extern \"C\" __global__ void {}({}, const P p) {{\n\
  for (long long i = KILN_TID; i < p.total; i += KILN_STRIDE) {{\n\
    long long i1 = i % p.d1, i2 = (i / p.d1) % p.d2, i0 = i / (p.d1 * p.d2);\n\
    {}\n\
  }}\n}}\n",
        k.head, k.func, k.args, k.body
    );
    let mut p = Params::new();
    for v in dims {
        p.i(v as i64);
    }
    Some(KernelLayer {
        tactic: format!("nvrtc.int8.{}", k.func.trim_start_matches("kiln_i8_")),
        src: Some(source("int8", code)),
        steps: vec![step(k.func, dims[0], ptrs, p)],
        in_facts: product_in_facts(cx)?,
        out_facts: vec![Some(cx.output(0)?)],
        work,
    })
}

/// The NCHW → NHWC copy in front of a 1×1 convolution on IMMA: `x[b][ch][p]` to
/// `xt[(b · positions + p) · c + ch]` at the start of the layer's workspace (the row-major
/// `[batch · positions, c]` operand cuBLASLt's TN product takes).
pub fn nhwc_layer(
    cx: &LowerCx<'_>,
    batch: usize,
    c: usize,
    positions: usize,
) -> Option<KernelLayer> {
    // i = (b, q, ch) of the NHWC copy.
    let total = batch * c * positions;
    grid3_layer(
        cx,
        Grid3 {
            func: "kiln_i8_nhwc",
            head: prelude(&[]),
            args: "const signed char* __restrict__ x, signed char* __restrict__ xt",
            body: "xt[i] = x[(i0 * p.d1 + i1) * p.d2 + i2];",
        },
        [total, c, positions],
        vec![Ptr::In(0, 0), Ptr::Work(0)],
        total,
    )
}

fn matmul(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (rows, n, k) = matmul_dims(cx)?;
    let (tables, expr) = epilogue(cx, n)?;
    // Four products per __dp4a when every row starts on a 4-byte boundary.
    let dot = if k % 4 == 0 {
        "const int* a4 = (const int*)(a + row * p.k); const int* w4 = (const int*)(w + col * p.k);\n\
    for (long long t = 0; t < p.k / 4; ++t) acc = __dp4a(a4[t], w4[t], acc);"
    } else {
        "for (long long t = 0; t < p.k; ++t) acc += (int)a[row * p.k + t] * (int)w[col * p.k + t];"
    };
    let code = format!(
        "{}{QUANT_FN}{tables}struct P {{ long long rows, n, k; }};\n\
__device__ __forceinline__ signed char kiln_epi(int acc, long long ch) {{ {expr} }}\n\
extern \"C\" __global__ void kiln_i8_matmul(const signed char* __restrict__ a, const signed char* __restrict__ w, signed char* __restrict__ y, const P p) {{\n\
  long long total = p.rows * p.n;\n\
  for (long long i = KILN_TID; i < total; i += KILN_STRIDE) {{\n\
    long long row = i / p.n, col = i % p.n;\n\
    int acc = 0;\n\
    {dot}\n\
    y[i] = kiln_epi(acc, col);\n\
  }}\n}}\n",
        prelude(&[])
    );
    let mut p = Params::new();
    p.i(rows as i64).i(n as i64).i(k as i64);
    let in_facts = product_in_facts(cx)?;
    let (dy, sy) = cx.output(0)?;
    Some(KernelLayer {
        tactic: "nvrtc.int8.matmul".into(),
        src: Some(source("int8", code)),
        steps: vec![step(
            "kiln_i8_matmul",
            rows * n,
            vec![Ptr::In(0, 0), Ptr::In(1, 0), Ptr::Out(0, 0)],
            p,
        )],
        in_facts,
        out_facts: vec![Some((dy, sy))],
        work: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{f, node};
    use kiln_core::{Attr, Fact, Tensor};

    fn kiln_node(op: &str, attrs: Vec<(&str, Attr)>, n_in: usize) -> kiln_core::Node {
        let mut n = node(op, 1, attrs, n_in, 1);
        n.desc.domain = "kiln".into();
        n
    }

    #[test]
    fn quantize_and_dequantize_lower_with_exact_scales() {
        let n = kiln_node("Int8Quantize", vec![("scale", Attr::Float(0.1))], 1);
        let l = lower(&LowerCx {
            node: &n,
            inputs: &[f(DType::F16, &[2, 3])],
            outputs: &[f(DType::I8, &[2, 3])],
        })
        .expect("lowered");
        let code = &l.src.as_ref().unwrap().code;
        assert!(code.contains(&fl(1.0f32 / 0.1)), "{code}");
        assert!(code.contains("__half2float"), "{code}");
        // A bad scale or dtype is not lowered (the CPU op reports it).
        let bad = kiln_node("Int8Quantize", vec![("scale", Attr::Float(0.0))], 1);
        assert!(lower(&LowerCx {
            node: &bad,
            inputs: &[f(DType::F32, &[2])],
            outputs: &[f(DType::I8, &[2])],
        })
        .is_none());
        let d = kiln_node("Int8Dequantize", vec![("scale", Attr::Float(0.25))], 1);
        assert!(lower(&LowerCx {
            node: &d,
            inputs: &[f(DType::I8, &[5])],
            outputs: &[f(DType::F32, &[5])],
        })
        .is_some());
    }

    #[test]
    fn products_embed_per_channel_tables() {
        let attrs = vec![
            ("x_scale", Attr::Float(0.5)),
            ("y_scale", Attr::Float(0.25)),
            ("w_scales", Attr::Floats(vec![0.1, 0.2, 0.3])),
            ("kiln_activation", Attr::String("Relu".into())),
        ];
        let n = kiln_node("Int8MatMul", attrs.clone(), 3);
        let bias = Fact::constant(Tensor::from_vec(&[3], vec![1.0f32, -2.0, 0.5]).unwrap());
        let (ins, outs) = (
            [
                f(DType::I8, &[2, 5, 8]),
                f(DType::I8, &[3, 8]),
                bias.clone(),
            ],
            [f(DType::I8, &[2, 5, 3])],
        );
        let cx = LowerCx {
            node: &n,
            inputs: &ins,
            outputs: &outs,
        };
        let l = lower(&cx).expect("lowered");
        let code = &l.src.as_ref().unwrap().code;
        assert!(code.contains("__dp4a"), "K = 8 uses dp4a: {code}");
        assert!(code.contains(&fl(0.5f32 * 0.2)), "{code}");
        assert!(code.contains("fmaxf(v, 0.0f)"), "{code}");
        // A bias that is not a build-time constant, or scales of the wrong length: None.
        let lower_with = |bias: Fact, n: &kiln_core::Node| {
            lower(&LowerCx {
                node: n,
                inputs: &[f(DType::I8, &[5, 7]), f(DType::I8, &[3, 7]), bias],
                outputs: &[f(DType::I8, &[5, 3])],
            })
        };
        assert!(lower_with(f(DType::F32, &[3]), &n).is_none());
        let short = kiln_node(
            "Int8MatMul",
            vec![
                ("x_scale", Attr::Float(0.5)),
                ("y_scale", Attr::Float(0.25)),
                ("w_scales", Attr::Floats(vec![0.1])),
            ],
            3,
        );
        assert!(lower_with(bias.clone(), &short).is_none());
        // The requantization after cuBLASLt's IMMA product reads the i32 sums from the
        // workspace, with the same tables.
        let rq = requant_layer(&cx, 10, 3, 1).expect("requant");
        assert_eq!(rq.work, 2 * 5 * 3 * 4);
        let rcode = &rq.src.as_ref().unwrap().code;
        assert!(rcode.contains("kiln_i8_requant") && rcode.contains(&fl(0.5f32 * 0.2)));
        assert!(matches!(&rq.steps[0], Step::Launch { ptrs, .. } if ptrs[0] == Ptr::Work(0)));
        assert_eq!(matmul_dims(&cx), Some((10, 3, 8)));
        // K = 7: the plain loop.
        let l = lower_with(bias, &n).expect("lowered");
        assert!(!l.src.unwrap().code.contains("__dp4a"));
        // Conv: 2-D with pads.
        let mut cattrs = attrs.clone();
        cattrs.push(("pads", Attr::Ints(vec![1, 1, 1, 1])));
        let c = kiln_node("Int8Conv", cattrs, 2);
        let padded = LowerCx {
            node: &c,
            inputs: &[f(DType::I8, &[1, 4, 5, 6]), f(DType::I8, &[3, 4, 3, 3])],
            outputs: &[f(DType::I8, &[1, 3, 5, 6])],
        };
        assert!(lower(&padded).is_some());
        assert_eq!(
            pointwise_dims(&padded),
            None,
            "3x3 with pads is not a plain product"
        );
        // A 1×1 conv is: the NHWC copy and the requantization with positions.
        let pw = kiln_node("Int8Conv", attrs, 2);
        let cx = LowerCx {
            node: &pw,
            inputs: &[f(DType::I8, &[2, 4, 5, 6]), f(DType::I8, &[3, 4, 1, 1])],
            outputs: &[f(DType::I8, &[2, 3, 5, 6])],
        };
        assert_eq!(pointwise_dims(&cx), Some((2, 4, 3, 30)));
        let t = nhwc_layer(&cx, 2, 4, 30).expect("nhwc");
        assert_eq!(t.work, 2 * 4 * 30);
        assert!(matches!(&t.steps[0], Step::Launch { ptrs, .. } if ptrs[1] == Ptr::Work(0)));
        let rq = requant_layer(&cx, 2, 3, 30).expect("requant");
        assert_eq!(rq.work, 2 * 30 * 3 * 4);
    }
}
