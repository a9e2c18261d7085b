//! Reductions (ReduceSum/Mean/Max/Min/Prod/L1/L2/SumSquare/LogSum, GlobalAveragePool,
//! GlobalMaxPool) and Softmax/LogSoftmax.
//!
//! Reductions: kept and reduced dims are coalesced separately; one warp per output (or one
//! block per output when the reduction is long and outputs are few) strides over the reduced
//! index space, accumulates in `float` (`long long` for ints) and combines with shuffles.
//! Softmax: one block per row, block-wide max and sum in `float`.

use kiln_core::DType;

use super::common::{
    coalesce, compute_type, ctype, is_kernel_float, load, prelude, source, store, strides,
    KernelLayer, Params, Ptr, Step, MAX_RANK,
};
use super::LowerCx;

/// Block-wide reductions every row kernel uses (all threads get the result; blockDim must be
/// a multiple of 32 and every thread of the block must call them).
pub const BLOCK_REDUCE: &str = r#"
__device__ __forceinline__ float kiln_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float kiln_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ float kiln_block_sum(float v, float* sh) {
  v = kiln_warp_sum(v);
  int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  v = (l < nw) ? sh[l] : 0.0f;
  return kiln_warp_sum(v);
}
__device__ float kiln_block_max(float v, float* sh) {
  v = kiln_warp_max(v);
  int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  v = (l < nw) ? sh[l] : -KILN_INF;
  return kiln_warp_max(v);
}
"#;

/// A reduction kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Red {
    /// Σx.
    Sum,
    /// Σx / n.
    Mean,
    /// max.
    Max,
    /// min.
    Min,
    /// Πx.
    Prod,
    /// Σ|x|.
    L1,
    /// sqrt(Σx²).
    L2,
    /// Σx².
    SumSquare,
    /// log(Σx).
    LogSum,
}

impl Red {
    fn of(op: &str) -> Option<(Red, i64)> {
        // (kind, first opset where axes is an input)
        Some(match op {
            "ReduceSum" => (Red::Sum, 13),
            "ReduceMean" => (Red::Mean, 18),
            "ReduceMax" => (Red::Max, 18),
            "ReduceMin" => (Red::Min, 18),
            "ReduceProd" => (Red::Prod, 18),
            "ReduceL1" => (Red::L1, 18),
            "ReduceL2" => (Red::L2, 18),
            "ReduceSumSquare" => (Red::SumSquare, 18),
            "ReduceLogSum" => (Red::LogSum, 18),
            _ => return None,
        })
    }

    /// (accumulator type, init, map of `v`, combine of `a`,`b`, final of `acc` with `n`).
    fn parts(self, float: bool) -> Option<(&'static str, String, String, String, String)> {
        let acc = if float { "float" } else { "long long" };
        let (init, map, comb, fin) = match (self, float) {
            (Red::Sum, _) => ("0", "v", "a + b", "acc"),
            (Red::Mean, true) => ("0", "v", "a + b", "acc / (float)p.red_n"),
            (Red::Max, true) => ("-KILN_INF", "v", "fmaxf(a, b)", "acc"),
            (Red::Max, false) => ("KILN_LL_MIN", "v", "(a > b ? a : b)", "acc"),
            (Red::Min, true) => ("KILN_INF", "v", "fminf(a, b)", "acc"),
            (Red::Min, false) => ("KILN_LL_MAX", "v", "(a < b ? a : b)", "acc"),
            (Red::Prod, _) => ("1", "v", "a * b", "acc"),
            (Red::L1, true) => ("0", "fabsf(v)", "a + b", "acc"),
            (Red::L2, true) => ("0", "v * v", "a + b", "sqrtf(acc)"),
            (Red::SumSquare, _) => ("0", "v * v", "a + b", "acc"),
            (Red::LogSum, true) => ("0", "v", "a + b", "logf(acc)"),
            _ => return None,
        };
        Some((acc, init.into(), map.into(), comb.into(), fin.into()))
    }
}

/// Source of a reduction kernel (entry points `kiln_reduce_warp`, `kiln_reduce_block`).
pub fn reduce_code(red: Red, dt: DType, odt: DType) -> Option<String> {
    let float = is_kernel_float(dt);
    if !float && !matches!(dt, DType::I32 | DType::I64) {
        return None;
    }
    let (acc, init, map, comb, fin) = red.parts(float)?;
    let t = ctype(dt)?;
    let to = ctype(odt)?;
    let c = compute_type(dt)?;
    let comb_fn = format!(
        "__device__ __forceinline__ {acc} kiln_comb({acc} a, {acc} b) {{ return {comb}; }}\n"
    );
    let body = |ix: &str, head: &str, lane: &str, step: &str, tail: &str| {
        format!(
            "  for ({ix} o = {head}) {{\n\
    {ix} rem = o, base = 0;\n\
    for (int d = (int)p.krank - 1; d >= 0; --d) {{ const {ix} dd = ({ix})p.kdims[d]; {ix} c = rem % dd; rem /= dd; base += c * ({ix})p.kst[d]; }}\n\
    {acc} acc = {init};\n\
    for ({ix} r = {lane}; r < ({ix})p.red_n; r += {step}) {{\n\
      {ix} rr = r, off = base;\n\
      for (int d = (int)p.rrank - 1; d >= 0; --d) {{ const {ix} dd = ({ix})p.rdims[d]; {ix} c = rr % dd; rr /= dd; off += c * ({ix})p.rst[d]; }}\n\
      {acc} v = ({acc})({ld});\n\
      acc = kiln_comb(acc, {map});\n\
    }}\n\
{tail}\
  }}\n",
            ld = load(dt, "x[off]"),
            acc = acc,
            init = init,
            map = map,
        )
    };
    let _ = c;
    let warp_tail = format!(
        "    for (int s = 16; s > 0; s >>= 1) acc = kiln_comb(acc, __shfl_xor_sync(0xffffffffu, acc, s));\n\
    if ((threadIdx.x & 31) == 0) y[o] = {};\n",
        store(odt, &fin)
    );
    let block_tail = format!(
        "    for (int s = 16; s > 0; s >>= 1) acc = kiln_comb(acc, __shfl_xor_sync(0xffffffffu, acc, s));\n\
    __syncthreads();\n\
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = acc;\n\
    __syncthreads();\n\
    if (threadIdx.x < 32) {{\n\
      acc = (threadIdx.x < (blockDim.x >> 5)) ? sh[threadIdx.x] : ({acc})({init});\n\
      for (int s = 16; s > 0; s >>= 1) acc = kiln_comb(acc, __shfl_xor_sync(0xffffffffu, acc, s));\n\
      if (threadIdx.x == 0) y[o] = {st};\n\
    }}\n",
        st = store(odt, &fin)
    );
    let mut code = format!(
        "{pre}struct P {{ long long n_out; long long red_n; long long krank; long long rrank; long long kdims[{R}]; long long kst[{R}]; long long rdims[{R}]; long long rst[{R}]; }};\n{comb_fn}",
        pre = prelude(&[dt, odt]),
        R = MAX_RANK,
    );
    // 64-bit and 32-bit (`..32`, when every input offset fits in 31 bits) index math.
    for (sfx, ix) in [("", "long long"), ("32", "unsigned int")] {
        code.push_str(&format!(
            "extern \"C\" __global__ void kiln_reduce_warp{sfx}(const {t}* __restrict__ x, {to}* __restrict__ y, const P p) {{\n\
  const {ix} warp = (({ix})blockIdx.x * ({ix})blockDim.x + ({ix})threadIdx.x) >> 5;\n\
  const {ix} nwarps = (({ix})gridDim.x * ({ix})blockDim.x) >> 5;\n\
{wbody}}}\n\
extern \"C\" __global__ void kiln_reduce_block{sfx}(const {t}* __restrict__ x, {to}* __restrict__ y, const P p) {{\n\
  __shared__ {acc} sh[32];\n\
{bbody}}}\n",
            wbody = body(ix, &format!("warp; o < ({ix})p.n_out; o += nwarps"), "(threadIdx.x & 31)", "32", &warp_tail),
            bbody = body(ix, &format!("blockIdx.x; o < ({ix})p.n_out; o += gridDim.x"), "threadIdx.x", &format!("({ix})blockDim.x"), &block_tail),
        ));
    }
    Some(code)
}

/// Builds a reduction of `ishape` over `axes` (sorted, unique) into an output of
/// `n_out` elements laid out as the kept dims in order.
pub fn build_reduce(
    tactic: String,
    red: Red,
    dt: DType,
    ishape: &[usize],
    axes: &[usize],
    out: (DType, Vec<usize>),
    n_node_inputs: usize,
) -> Option<KernelLayer> {
    let r = ishape.len();
    if r > MAX_RANK || axes.iter().any(|&a| a >= r) {
        return None;
    }
    let st = strides(ishape);
    let (mut kd, mut ks, mut rd, mut rs) = (vec![], vec![], vec![], vec![]);
    for d in 0..r {
        if axes.contains(&d) {
            rd.push(ishape[d]);
            rs.push(st[d]);
        } else {
            kd.push(ishape[d]);
            ks.push(st[d]);
        }
    }
    let n_out: usize = kd.iter().product();
    let red_n: usize = rd.iter().product();
    if red_n == 0 || n_out != out.1.iter().product::<usize>() {
        return None;
    }
    let (kd, ks) = coalesce(&kd, &[ks]);
    let (rd, rs) = coalesce(&rd, &[rs]);
    let code = reduce_code(red, dt, out.0)?;
    let mut p = Params::new();
    p.i(n_out as i64)
        .i(red_n as i64)
        .i(kd.len() as i64)
        .i(rd.len() as i64)
        .arr(
            &kd.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            MAX_RANK,
            1,
        )
        .arr(&ks[0], MAX_RANK, 0)
        .arr(
            &rd.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            MAX_RANK,
            1,
        )
        .arr(&rs[0], MAX_RANK, 0);
    // Long reductions with few outputs get a block each; otherwise a warp each.
    let block = red_n >= 2048 && n_out < 4096;
    let small = ishape.iter().product::<usize>() < (1 << 31) - (1 << 29);
    let (func, grid) = match (block, small) {
        (true, true) => ("kiln_reduce_block32", n_out.min(1 << 20) as u32),
        (true, false) => ("kiln_reduce_block", n_out.min(1 << 20) as u32),
        (false, true) => (
            "kiln_reduce_warp32",
            n_out.div_ceil(8).clamp(1, 1 << 20) as u32,
        ),
        (false, false) => (
            "kiln_reduce_warp",
            n_out.div_ceil(8).clamp(1, 1 << 20) as u32,
        ),
    };
    let threads = 256u32;
    let mut in_facts = vec![None; n_node_inputs];
    in_facts[0] = Some((dt, ishape.to_vec()));
    Some(KernelLayer {
        tactic,
        src: Some(source("reduce", code)),
        steps: vec![Step::Launch {
            func,
            grid,
            block: threads,
            shmem: 0,
            ptrs: vec![Ptr::In(0, 0), Ptr::Out(0, 0)],
            params: p,
        }],
        in_facts,
        out_facts: vec![Some(out)],
        work: 0,
    })
}

/// Lowers reductions and softmax.
pub fn lower(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    if !cx.single_output() {
        return None;
    }
    let op = cx.op();
    if op == "Softmax" || op == "LogSoftmax" {
        return softmax(cx);
    }
    if op == "ArgMax" || op == "ArgMin" {
        return argmax(cx);
    }
    let (dt, ishape) = cx.input(0)?;
    let out = cx.output(0)?;
    let r = ishape.len();
    if out.0 != dt {
        return None;
    }
    if op == "GlobalAveragePool" || op == "GlobalMaxPool" {
        if r < 3 || !is_kernel_float(dt) {
            return None;
        }
        let red = if op == "GlobalAveragePool" {
            Red::Mean
        } else {
            Red::Max
        };
        let axes: Vec<usize> = (2..r).collect();
        return build_reduce(
            format!("nvrtc.reduce.{op}.{}", dt.name()),
            red,
            dt,
            &ishape,
            &axes,
            out,
            cx.n_in(),
        );
    }
    let (red, axes_input_from) = Red::of(op)?;
    let a = cx.attrs();
    let axes: Option<Vec<i64>> = if cx.opset() >= axes_input_from {
        if cx.present(1) {
            match cx.konst(1) {
                Some(t) => Some(t.to_i64_vec().ok()?),
                None => None,
            }
        } else {
            None
        }
    } else {
        if cx.n_in() != 1 {
            return None;
        }
        a.opt_ints("axes").ok()?
    };
    let keepdims = a.int("keepdims", 1).ok()? != 0;
    let axes = match axes {
        // Axes given as a run-time input: with keepdims the shapes tell which axes shrink
        // (reducing a size-1 axis changes nothing, so including or not is the same).
        None if cx.present(1) && keepdims && out.1.len() == r => (0..r)
            .filter(|&d| out.1[d] != ishape[d] || ishape[d] == 1)
            .collect(),
        None if cx.present(1) => return None,
        Some(v) if !v.is_empty() => {
            let mut v: Vec<usize> = v.iter().map(|&x| cx.axis(x, r)).collect::<Option<_>>()?;
            v.sort_unstable();
            v.dedup();
            v
        }
        _ => {
            if a.int("noop_with_empty_axes", 0).ok()? != 0 {
                return None;
            }
            (0..r).collect()
        }
    };
    build_reduce(
        format!("nvrtc.reduce.{op}.{}", dt.name()),
        red,
        dt,
        &ishape,
        &axes,
        out,
        cx.n_in(),
    )
}

/// Source of the ArgMax/ArgMin kernel (`kiln_arg`): one warp per output, first index of
/// the extreme value (last with `p.last`), int64 result.
pub fn arg_code(dt: DType, max: bool) -> Option<String> {
    let t = ctype(dt)?;
    let c = compute_type(dt)?;
    let better = |a: &str, b: &str| {
        if max {
            format!("({a} > {b})")
        } else {
            format!("({a} < {b})")
        }
    };
    Some(format!(
        "{pre}struct P {{ long long n_out; long long R; long long inner; long long last; }};\n\
extern \"C\" __global__ void kiln_arg(const {t}* __restrict__ x, long long* __restrict__ y, const P p) {{\n\
  long long warp = KILN_TID >> 5; long long nwarps = KILN_STRIDE >> 5; int lane = threadIdx.x & 31;\n\
  for (long long o = warp; o < p.n_out; o += nwarps) {{\n\
    long long base = (o / p.inner) * p.R * p.inner + (o % p.inner);\n\
    {c} best = ({c})0; long long bi = -1;\n\
    for (long long r = lane; r < p.R; r += 32) {{\n\
      {c} v = {lv};\n\
      if (bi < 0 || {b1} || (p.last && v == best)) {{ best = v; bi = r; }}\n\
    }}\n\
    for (int s = 16; s > 0; s >>= 1) {{\n\
      {c} ov = __shfl_xor_sync(0xffffffffu, best, s);\n\
      long long oi = __shfl_xor_sync(0xffffffffu, bi, s);\n\
      if (oi >= 0 && (bi < 0 || {b2} || (ov == best && (p.last ? oi > bi : oi < bi)))) {{ best = ov; bi = oi; }}\n\
    }}\n\
    if (lane == 0) y[o] = bi;\n\
  }}\n\
}}\n",
        pre = prelude(&[dt]),
        lv = load(dt, "x[base + r * p.inner]"),
        b1 = better("v", "best"),
        b2 = better("ov", "best"),
    ))
}

fn argmax(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let out = cx.output(0)?;
    let r = ishape.len();
    if out.0 != DType::I64
        || r == 0
        || !(is_kernel_float(dt) || matches!(dt, DType::I32 | DType::I64))
    {
        return None;
    }
    let a = cx.attrs();
    let axis = cx.axis(a.int("axis", 0).ok()?, r)?;
    let last = a.int("select_last_index", 0).ok()?;
    let len = ishape[axis];
    let outer: usize = ishape[..axis].iter().product();
    let inner: usize = ishape[axis + 1..].iter().product();
    let n_out = outer * inner;
    if len == 0 || n_out != out.1.iter().product::<usize>() {
        return None;
    }
    let mut p = Params::new();
    p.i(n_out as i64)
        .i(len as i64)
        .i(inner as i64)
        .i((last != 0) as i64);
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, ishape));
    Some(KernelLayer {
        tactic: format!("nvrtc.reduce.{}.{}", cx.op(), dt.name()),
        src: Some(source("arg", arg_code(dt, cx.op() == "ArgMax")?)),
        steps: vec![Step::Launch {
            func: "kiln_arg",
            grid: n_out.div_ceil(8).clamp(1, 1 << 20) as u32,
            block: 256,
            shmem: 0,
            ptrs: vec![Ptr::In(0, 0), Ptr::Out(0, 0)],
            params: p,
        }],
        in_facts,
        out_facts: vec![Some(out)],
        work: 0,
    })
}

/// Source of the softmax kernel (`kiln_softmax`; `log` selects LogSoftmax).
pub fn softmax_code(dt: DType, log: bool) -> Option<String> {
    let t = ctype(dt)?;
    let ld = |e: &str| load(dt, e);
    let res = if log {
        "v - m - logs"
    } else {
        "expf(v - m) * inv"
    };
    Some(format!(
        "{pre}{br}struct P {{ long long rows; long long R; long long inner; }};\n\
extern \"C\" __global__ void kiln_softmax(const {t}* __restrict__ x, {t}* __restrict__ y, const P p) {{\n\
  __shared__ float sh[32];\n\
  for (long long row = blockIdx.x; row < p.rows; row += gridDim.x) {{\n\
    long long o = row / p.inner, k = row % p.inner;\n\
    long long base = o * p.R * p.inner + k;\n\
    float m = -KILN_INF;\n\
    for (long long r = threadIdx.x; r < p.R; r += blockDim.x) m = fmaxf(m, {l1});\n\
    m = kiln_block_max(m, sh);\n\
    float s = 0.0f;\n\
    for (long long r = threadIdx.x; r < p.R; r += blockDim.x) s += expf({l1} - m);\n\
    s = kiln_block_sum(s, sh);\n\
    float inv = 1.0f / s; float logs = logf(s);\n\
    for (long long r = threadIdx.x; r < p.R; r += blockDim.x) {{\n\
      float v = {l1};\n\
      y[base + r * p.inner] = {st};\n\
    }}\n\
  }}\n\
}}\n",
        pre = prelude(&[dt]),
        br = BLOCK_REDUCE,
        l1 = ld("x[base + r * p.inner]"),
        st = store(dt, res),
    ))
}

/// Threads for a row kernel over rows of `r` elements.
pub fn row_threads(r: usize) -> u32 {
    if r <= 64 {
        32
    } else if r <= 512 {
        128
    } else {
        256
    }
}

fn softmax(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let out = cx.output(0)?;
    if !is_kernel_float(dt) || out.0 != dt || out.1 != ishape || ishape.is_empty() {
        return None;
    }
    let r = ishape.len();
    let new = cx.opset() >= 13;
    let axis = cx.axis(cx.attrs().int("axis", if new { -1 } else { 1 }).ok()?, r)?;
    let outer: usize = ishape[..axis].iter().product();
    let (len, inner) = if new {
        (ishape[axis], ishape[axis + 1..].iter().product::<usize>())
    } else {
        (ishape[axis..].iter().product::<usize>(), 1)
    };
    if len == 0 {
        return None;
    }
    let rows = outer * inner;
    let mut p = Params::new();
    p.i(rows as i64).i(len as i64).i(inner as i64);
    let log = cx.op() == "LogSoftmax";
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, ishape));
    Some(KernelLayer {
        tactic: format!("nvrtc.softmax.{}.{}", cx.op(), dt.name()),
        src: Some(source("softmax", softmax_code(dt, log)?)),
        steps: vec![Step::Launch {
            func: "kiln_softmax",
            grid: rows.clamp(1, 1 << 20) as u32,
            block: row_threads(len),
            shmem: 0,
            ptrs: vec![Ptr::In(0, 0), Ptr::Out(0, 0)],
            params: p,
        }],
        in_facts,
        out_facts: vec![Some(out)],
        work: 0,
    })
}

#[cfg(test)]
mod tests {
    use kiln_core::{Attr, DType, Fact, Tensor};

    use super::*;
    use crate::kernels::testutil::{f, node};
    use crate::kernels::{lower_layer, LowerCx};

    #[test]
    fn reduce_axes_and_choice() {
        let n = node("ReduceMean", 18, vec![("keepdims", Attr::Int(1))], 2, 1);
        let fi = vec![
            f(DType::F32, &[2, 3, 4, 5]),
            Fact::constant(Tensor::from_vec(&[2], vec![-1i64, -2]).unwrap()),
        ];
        let fo = vec![f(DType::F32, &[2, 3, 1, 1])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
        .unwrap();
        match &l.steps[0] {
            Step::Launch { func, params, .. } => {
                assert_eq!(*func, "kiln_reduce_warp32");
                // n_out 6, red_n 20, kept [6] stride [20], reduced [20] stride [1].
                assert_eq!(&params.0[..4], &[6, 20, 1, 1]);
            }
            _ => panic!(),
        }
        let code = l.src.unwrap().code;
        assert!(code.contains("kiln_reduce_block") && code.contains("acc / (float)p.red_n"));
        // Axes not constant: inferred from the shapes with keepdims, refused without.
        let fi2 = vec![f(DType::F32, &[2, 3, 4, 5]), f(DType::I64, &[2])];
        let l2 = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi2,
            outputs: &fo,
        })
        .unwrap();
        assert_eq!(l2.steps, l.steps);
        let n0 = node("ReduceMean", 18, vec![("keepdims", Attr::Int(0))], 2, 1);
        let fo0 = vec![f(DType::F32, &[2, 3])];
        assert!(lower_layer(&LowerCx {
            node: &n0,
            inputs: &fi2,
            outputs: &fo0
        })
        .is_none());
        let n = node(
            "ReduceMean",
            13,
            vec![("axes", Attr::Ints(vec![2, 3]))],
            1,
            1,
        );
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi[..1],
            outputs: &fo
        })
        .is_some());
        // ReduceL2 on ints is refused.
        let n = node("ReduceL2", 13, vec![], 1, 1);
        let fi3 = vec![f(DType::I32, &[4])];
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi3,
            outputs: &[f(DType::I32, &[1])]
        })
        .is_none());
    }

    #[test]
    fn argmax_lowering() {
        let n = node(
            "ArgMax",
            13,
            vec![("axis", Attr::Int(1)), ("select_last_index", Attr::Int(1))],
            1,
            1,
        );
        let fi = vec![f(DType::F16, &[3, 7, 5])];
        let fo = vec![f(DType::I64, &[3, 1, 5])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
        .unwrap();
        match &l.steps[0] {
            Step::Launch { params, .. } => assert_eq!(&params.0[..4], &[15, 7, 5, 1]),
            _ => panic!(),
        }
        assert!(l.src.unwrap().code.contains("(v > best)"));
        let bad = vec![f(DType::I32, &[3, 1, 5])];
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &bad
        })
        .is_none());
    }

    #[test]
    fn softmax_rows() {
        let n = node("Softmax", 11, vec![], 1, 1);
        let fi = vec![f(DType::F16, &[2, 3, 4])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fi,
        })
        .unwrap();
        match &l.steps[0] {
            Step::Launch { params, .. } => assert_eq!(&params.0[..3], &[2, 12, 1]),
            _ => panic!(),
        }
        let n = node("Softmax", 13, vec![("axis", Attr::Int(1))], 1, 1);
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fi,
        })
        .unwrap();
        match &l.steps[0] {
            Step::Launch { params, .. } => assert_eq!(&params.0[..3], &[8, 3, 4]),
            _ => panic!(),
        }
    }
}
