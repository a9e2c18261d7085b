//! Less common ops the ONNX suite uses: Shape and Size (values known at build time, written
//! by a small constant kernel), Trilu, CumSum, GatherND, ScatterElements and ScatterND
//! (reduction `none`; duplicate indices are undefined in ONNX and race here).

use kiln_core::DType;

use super::common::{
    compute_type, ctype, grid_for, is_kernel_float, load, prelude, raw_type, source, store,
    strides, KernelLayer, Params, Ptr, Step, BLOCK, MAX_RANK,
};
use super::LowerCx;

/// Most values the constant kernel writes.
pub const MAX_CONSTS: usize = 64;

fn launch(func: &'static str, n: usize, ptrs: Vec<Ptr>, params: Params) -> Step {
    Step::Launch {
        func,
        grid: grid_for(n),
        block: BLOCK,
        shmem: 0,
        ptrs,
        params,
    }
}

fn one_launch(
    tactic: String,
    code: String,
    step: Step,
    in_facts: Vec<Option<(DType, Vec<usize>)>>,
    out: (DType, Vec<usize>),
) -> KernelLayer {
    KernelLayer {
        tactic,
        src: Some(source("extra", code)),
        steps: vec![step],
        in_facts,
        out_facts: vec![Some(out)],
        work: 0,
    }
}

/// Lowers the ops of this module.
pub fn lower(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    if !cx.single_output() {
        return None;
    }
    match cx.op() {
        "Shape" | "Size" => shape(cx),
        "Trilu" => trilu(cx),
        "CumSum" => cumsum(cx),
        "GatherND" => gather_nd(cx),
        "ScatterElements" | "ScatterND" => scatter(cx),
        _ => None,
    }
}

/// Source of the constant kernel.
pub fn consts_code() -> String {
    format!(
        "{}struct P {{ long long n; long long v[{MAX_CONSTS}]; }};\n\
extern \"C\" __global__ void kiln_consts(long long* __restrict__ y, const P p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) y[i] = p.v[i];\n\
}}\n",
        prelude(&[])
    )
}

fn shape(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    // Only the shape of input 0 is needed, never its data.
    let f = cx.inputs.first()?;
    let s = f.concrete_shape()?;
    let out = cx.output(0)?;
    if out.0 != DType::I64 {
        return None;
    }
    let vals: Vec<i64> = if cx.op() == "Size" {
        vec![s.iter().product::<usize>() as i64]
    } else {
        let r = s.len() as i64;
        let a = cx.attrs();
        let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let start = clampi(a.int("start", 0).ok()?);
        let end = clampi(a.int("end", r).ok()?);
        s[start..end.max(start)].iter().map(|&d| d as i64).collect()
    };
    if vals.len() > MAX_CONSTS || vals.len() != out.1.iter().product::<usize>() {
        return None;
    }
    let mut p = Params::new();
    p.i(vals.len() as i64).arr(&vals, MAX_CONSTS, 0);
    Some(one_launch(
        format!("nvrtc.consts.{}", cx.op()),
        consts_code(),
        launch("kiln_consts", vals.len(), vec![Ptr::Out(0, 0)], p),
        vec![None; cx.n_in()],
        out,
    ))
}

/// Source of the Trilu kernel (type-blind).
pub fn trilu_code(size: usize) -> Option<String> {
    let t = raw_type(size)?;
    Some(format!(
        "{}struct P {{ long long n; long long rows; long long cols; long long k; long long upper; }};\n\
extern \"C\" __global__ void kiln_trilu(const {t}* __restrict__ x, {t}* __restrict__ y, const P p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) {{\n\
    long long j = i % p.cols; long long r = (i / p.cols) % p.rows;\n\
    bool keep = p.upper ? (j >= r + p.k) : (j <= r + p.k);\n\
    y[i] = keep ? x[i] : ({t})0;\n\
  }}\n\
}}\n",
        prelude(&[])
    ))
}

fn trilu(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, s) = cx.input(0)?;
    let out = cx.output(0)?;
    if out != (dt, s.clone()) || s.len() < 2 || dt == DType::String {
        return None;
    }
    let k = if cx.present(1) {
        let t = cx.konst(1)?;
        *t.to_i64_vec().ok()?.first()?
    } else {
        0
    };
    let upper = cx.attrs().int("upper", 1).ok()? != 0;
    let n: usize = s.iter().product();
    let r = s.len();
    let mut p = Params::new();
    p.i(n as i64)
        .i(s[r - 2] as i64)
        .i(s[r - 1] as i64)
        .i(k)
        .i(upper as i64);
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, s));
    Some(one_launch(
        format!("nvrtc.trilu.{}", dt.name()),
        trilu_code(dt.size())?,
        launch("kiln_trilu", n, vec![Ptr::In(0, 0), Ptr::Out(0, 0)], p),
        in_facts,
        out,
    ))
}

/// Source of the CumSum kernel: one thread per line, serial scan in the compute type.
pub fn cumsum_code(dt: DType) -> Option<String> {
    let t = ctype(dt)?;
    let c = compute_type(dt)?;
    Some(format!(
        "{pre}struct P {{ long long lines; long long R; long long inner; long long exclusive; long long reverse; }};\n\
extern \"C\" __global__ void kiln_cumsum(const {t}* __restrict__ x, {t}* __restrict__ y, const P p) {{\n\
  for (long long l = KILN_TID; l < p.lines; l += KILN_STRIDE) {{\n\
    long long base = (l / p.inner) * p.R * p.inner + (l % p.inner);\n\
    {c} acc = ({c})0;\n\
    for (long long q = 0; q < p.R; ++q) {{\n\
      long long r = p.reverse ? p.R - 1 - q : q;\n\
      long long off = base + r * p.inner;\n\
      {c} v = {lv};\n\
      if (p.exclusive) {{ y[off] = {st}; acc += v; }} else {{ acc += v; y[off] = {st}; }}\n\
    }}\n\
  }}\n\
}}\n",
        pre = prelude(&[dt]),
        lv = load(dt, "x[off]"),
        st = store(dt, "acc"),
    ))
}

fn cumsum(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, s) = cx.input(0)?;
    let out = cx.output(0)?;
    if out != (dt, s.clone()) || s.is_empty() {
        return None;
    }
    if !(is_kernel_float(dt) || matches!(dt, DType::I32 | DType::I64)) {
        return None;
    }
    let axis = cx.axis(*cx.konst(1)?.to_i64_vec().ok()?.first()?, s.len())?;
    let a = cx.attrs();
    let exclusive = a.int("exclusive", 0).ok()? != 0;
    let reverse = a.int("reverse", 0).ok()? != 0;
    let inner: usize = s[axis + 1..].iter().product();
    let lines = s[..axis].iter().product::<usize>() * inner;
    let mut p = Params::new();
    p.i(lines as i64)
        .i(s[axis] as i64)
        .i(inner as i64)
        .i(exclusive as i64)
        .i(reverse as i64);
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, s));
    Some(one_launch(
        format!("nvrtc.cumsum.{}", dt.name()),
        cumsum_code(dt)?,
        launch("kiln_cumsum", lines, vec![Ptr::In(0, 0), Ptr::Out(0, 0)], p),
        in_facts,
        out,
    ))
}

fn index_type(dt: DType) -> Option<&'static str> {
    match dt {
        DType::I32 => Some("int"),
        DType::I64 => Some("long long"),
        _ => None,
    }
}

/// Source of the GatherND kernel.
pub fn gather_nd_code(size: usize, idt: DType) -> Option<String> {
    let t = raw_type(size)?;
    let it = index_type(idt)?;
    Some(format!(
        "{pre}struct P {{ long long n; long long slice; long long k; long long nq; long long bstride; long long dims[{R}]; long long dst[{R}]; }};\n\
extern \"C\" __global__ void kiln_gather_nd(const {t}* __restrict__ x, const {it}* __restrict__ ind, {t}* __restrict__ y, const P p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) {{\n\
    long long t = i / p.slice, s = i % p.slice;\n\
    long long off = (t / p.nq) * p.bstride + s; bool bad = false;\n\
    for (int j = 0; j < (int)p.k; ++j) {{\n\
      long long v = (long long)ind[t * p.k + j];\n\
      if (v < 0) v += p.dims[j];\n\
      if (v < 0 || v >= p.dims[j]) bad = true;\n\
      off += v * p.dst[j];\n\
    }}\n\
    y[i] = bad ? ({t})0 : x[off];\n\
  }}\n\
}}\n",
        pre = prelude(&[]),
        R = MAX_RANK
    ))
}

fn gather_nd(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ds) = cx.input(0)?;
    let (idt, is) = cx.input(1)?;
    let out = cx.output(0)?;
    let b = cx.attrs().int("batch_dims", 0).ok()? as usize;
    if out.0 != dt || is.is_empty() || b >= is.len() || b > ds.len() {
        return None;
    }
    let k = *is.last()?;
    if k == 0 || b + k > ds.len() || k > MAX_RANK || ds[..b] != is[..b] {
        return None;
    }
    let slice: usize = ds[b + k..].iter().product();
    let nq: usize = is[b..is.len() - 1].iter().product();
    let st = strides(&ds);
    let bstride: usize = ds[b..].iter().product();
    let n = out.1.iter().product::<usize>();
    let nb: usize = ds[..b].iter().product();
    if n != nb * nq * slice {
        return None;
    }
    let mut p = Params::new();
    p.i(n as i64)
        .i(slice as i64)
        .i(k as i64)
        .i(nq as i64)
        .i(bstride as i64)
        .arr(
            &ds[b..b + k].iter().map(|&d| d as i64).collect::<Vec<_>>(),
            MAX_RANK,
            1,
        )
        .arr(&st[b..b + k], MAX_RANK, 0);
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, ds));
    in_facts[1] = Some((idt, is));
    Some(one_launch(
        format!("nvrtc.gather_nd.{}", dt.name()),
        gather_nd_code(dt.size(), idt)?,
        launch(
            "kiln_gather_nd",
            n,
            vec![Ptr::In(0, 0), Ptr::In(1, 0), Ptr::Out(0, 0)],
            p,
        ),
        in_facts,
        out,
    ))
}

/// Source of the scatter kernels (`kiln_scatter_el`, `kiln_scatter_nd`); out-of-range
/// indices are skipped.
pub fn scatter_code(size: usize, idt: DType) -> Option<String> {
    let t = raw_type(size)?;
    let it = index_type(idt)?;
    Some(format!(
        "{pre}struct PE {{ long long n; long long rank; long long axis; long long axis_len; long long udims[{R}]; long long dst[{R}]; }};\n\
extern \"C\" __global__ void kiln_scatter_el(const {it}* __restrict__ ind, const {t}* __restrict__ upd, {t}* __restrict__ y, const PE p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) {{\n\
    long long rem = i, off = 0;\n\
    for (int d = (int)p.rank - 1; d >= 0; --d) {{\n\
      long long c = rem % p.udims[d]; rem /= p.udims[d];\n\
      if (d != (int)p.axis) off += c * p.dst[d];\n\
    }}\n\
    long long v = (long long)ind[i];\n\
    if (v < 0) v += p.axis_len;\n\
    if (v < 0 || v >= p.axis_len) continue;\n\
    y[off + v * p.dst[p.axis]] = upd[i];\n\
  }}\n\
}}\n\
struct PN {{ long long n; long long slice; long long k; long long dims[{R}]; long long dst[{R}]; }};\n\
extern \"C\" __global__ void kiln_scatter_nd(const {it}* __restrict__ ind, const {t}* __restrict__ upd, {t}* __restrict__ y, const PN p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) {{\n\
    long long t = i / p.slice, s = i % p.slice;\n\
    long long off = s; bool bad = false;\n\
    for (int j = 0; j < (int)p.k; ++j) {{\n\
      long long v = (long long)ind[t * p.k + j];\n\
      if (v < 0) v += p.dims[j];\n\
      if (v < 0 || v >= p.dims[j]) bad = true;\n\
      off += v * p.dst[j];\n\
    }}\n\
    if (!bad) y[off] = upd[i];\n\
  }}\n\
}}\n",
        pre = prelude(&[]),
        R = MAX_RANK
    ))
}

fn scatter(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ds) = cx.input(0)?;
    let (idt, is) = cx.input(1)?;
    let (udt, us) = cx.input(2)?;
    let out = cx.output(0)?;
    if out != (dt, ds.clone()) || udt != dt || cx.n_in() != 3 || ds.is_empty() {
        return None;
    }
    if cx.attrs().string("reduction", "none").ok()? != "none" {
        return None;
    }
    let r = ds.len();
    let st = strides(&ds);
    let n: usize = us.iter().product();
    let (func, p) = if cx.op() == "ScatterElements" {
        let axis = cx.axis(cx.attrs().int("axis", 0).ok()?, r)?;
        if is != us || is.len() != r || r > MAX_RANK {
            return None;
        }
        if (0..r).any(|d| d != axis && is[d] > ds[d]) {
            return None;
        }
        let mut p = Params::new();
        p.i(n as i64)
            .i(r as i64)
            .i(axis as i64)
            .i(ds[axis] as i64)
            .arr(
                &us.iter().map(|&d| d as i64).collect::<Vec<_>>(),
                MAX_RANK,
                1,
            )
            .arr(&st, MAX_RANK, 0);
        ("kiln_scatter_el", p)
    } else {
        let k = *is.last()?;
        if k == 0 || k > r || k > MAX_RANK {
            return None;
        }
        let q = &is[..is.len() - 1];
        let mut expect = q.to_vec();
        expect.extend_from_slice(&ds[k..]);
        if expect != us {
            return None;
        }
        let slice: usize = ds[k..].iter().product();
        let mut p = Params::new();
        p.i(n as i64)
            .i(slice as i64)
            .i(k as i64)
            .arr(
                &ds[..k].iter().map(|&d| d as i64).collect::<Vec<_>>(),
                MAX_RANK,
                1,
            )
            .arr(&st[..k], MAX_RANK, 0);
        ("kiln_scatter_nd", p)
    };
    let bytes = ds.iter().product::<usize>() * dt.size();
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, ds));
    in_facts[1] = Some((idt, is));
    in_facts[2] = Some((udt, us));
    Some(KernelLayer {
        tactic: format!("nvrtc.scatter.{}.{}", cx.op(), dt.name()),
        src: Some(source("scatter", scatter_code(dt.size(), idt)?)),
        steps: vec![
            Step::Copy {
                src: Ptr::In(0, 0),
                dst: Ptr::Out(0, 0),
                bytes,
            },
            Step::Launch {
                func,
                grid: grid_for(n),
                block: BLOCK,
                shmem: 0,
                ptrs: vec![Ptr::In(1, 0), Ptr::In(2, 0), Ptr::Out(0, 0)],
                params: p,
            },
        ],
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
    fn shape_values_are_parameters() {
        let n = node("Shape", 15, vec![("start", Attr::Int(-2))], 1, 1);
        let fi = vec![f(DType::F16, &[2, 3, 5])];
        let fo = vec![f(DType::I64, &[2])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
        .unwrap();
        match &l.steps[0] {
            Step::Launch { params, .. } => assert_eq!(&params.0[..3], &[2, 3, 5]),
            _ => panic!(),
        }
    }

    #[test]
    fn scatter_nd_checks_shapes() {
        let n = node("ScatterND", 16, vec![], 3, 1);
        let fi = vec![
            f(DType::F32, &[5, 4]),
            f(DType::I64, &[2, 1]),
            f(DType::F32, &[2, 4]),
        ];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fi[..1],
        })
        .unwrap();
        assert_eq!(l.steps.len(), 2);
        let bad = vec![
            f(DType::F32, &[5, 4]),
            f(DType::I64, &[2, 1]),
            f(DType::F32, &[2, 5]),
        ];
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &bad,
            outputs: &fi[..1]
        })
        .is_none());
        let n = node(
            "ScatterND",
            16,
            vec![("reduction", Attr::String("add".into()))],
            3,
            1,
        );
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fi[..1]
        })
        .is_none());
    }

    #[test]
    fn cumsum_needs_constant_axis() {
        let n = node("CumSum", 14, vec![], 2, 1);
        let fi = vec![
            f(DType::F32, &[3, 4]),
            Fact::constant(Tensor::from_vec(&[], vec![1i64]).unwrap()),
        ];
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fi[..1]
        })
        .is_some());
        let fi2 = vec![f(DType::F32, &[3, 4]), f(DType::I64, &[])];
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi2,
            outputs: &fi[..1]
        })
        .is_none());
    }
}
