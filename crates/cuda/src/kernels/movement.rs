//! Data movement: device copies (Reshape, Flatten, Squeeze, Unsqueeze, Identity, Dropout at
//! inference), one strided-copy kernel (Transpose, Slice, Expand, Concat, Split,
//! DepthToSpace, SpaceToDepth), a pad kernel (Pad in all four modes, Tile), Gather,
//! GatherElements and a fill kernel (ConstantOfShape). Everything but Pad's constant value
//! is type-blind: kernels move raw 1/2/4/8-byte elements.

use kiln_core::{Attr, DType};

use super::common::{
    coalesce, ctype, grid_for, prelude, raw_type, source, store, strides, KernelLayer, Params, Ptr,
    Step, BLOCK, MAX_RANK,
};
use super::LowerCx;

fn layer(
    tactic: String,
    code: Option<String>,
    steps: Vec<Step>,
    in_facts: Vec<Option<(DType, Vec<usize>)>>,
    out_facts: Vec<Option<(DType, Vec<usize>)>>,
) -> KernelLayer {
    KernelLayer {
        tactic,
        src: code.map(|c| source("move", c)),
        steps,
        in_facts,
        out_facts,
        work: 0,
    }
}

fn only(n: usize, i: usize, f: (DType, Vec<usize>)) -> Vec<Option<(DType, Vec<usize>)>> {
    let mut v = vec![None; n];
    v[i] = Some(f);
    v
}

/// Source of the strided copy kernel for elements of `size` bytes.
pub fn strided_code(size: usize) -> Option<String> {
    let t = raw_type(size)?;
    let mut s = prelude(&[]);
    s.push_str(&format!(
        "struct P {{ long long n; long long rank; long long dims[{R}]; long long ist[{R}]; long long ost[{R}]; long long ib; long long ob; }};\n",
        R = MAX_RANK
    ));
    // 64-bit and 32-bit (`kiln_strided32`, when every offset fits in 31 bits) index math.
    for (name, ix) in [("kiln_strided", "long long"), ("kiln_strided32", "int")] {
        s.push_str(&format!(
            "extern \"C\" __global__ void {name}(const {t}* __restrict__ x, {t}* __restrict__ y, const P p) {{\n\
  const {ix} n = ({ix})p.n; const {ix} step = ({ix})gridDim.x * ({ix})blockDim.x;\n\
  for ({ix} i = ({ix})blockIdx.x * ({ix})blockDim.x + ({ix})threadIdx.x; i < n; i += step) {{\n\
    {ix} rem = i, oi = ({ix})p.ib, oo = ({ix})p.ob;\n\
    for (int d = (int)p.rank - 1; d > 0; --d) {{\n\
      const {ix} dd = ({ix})p.dims[d]; {ix} c = rem % dd; rem /= dd;\n\
      oi += c * ({ix})p.ist[d]; oo += c * ({ix})p.ost[d];\n\
    }}\n\
    oi += rem * ({ix})p.ist[0]; oo += rem * ({ix})p.ost[0];\n\
    y[oo] = x[oi];\n\
  }}\n\
}}\n"
        ));
    }
    Some(s)
}

/// One strided copy: iterate `dims`, read input `src` at `ib + Σ c·ist`, write output `dst`
/// at `ob + Σ c·ost` (all in elements).
pub struct Strided {
    /// Node input read.
    pub src: usize,
    /// Node output written.
    pub dst: usize,
    /// Iteration dims.
    pub dims: Vec<usize>,
    /// Input strides per iteration dim.
    pub ist: Vec<i64>,
    /// Output strides per iteration dim.
    pub ost: Vec<i64>,
    /// Input base offset.
    pub ib: i64,
    /// Output base offset.
    pub ob: i64,
}

/// The launch of one strided copy (None when its coalesced rank is too large).
pub fn strided_step(s: &Strided) -> Option<Step> {
    let n: usize = s.dims.iter().product();
    let (dims, st) = coalesce(&s.dims, &[s.ist.clone(), s.ost.clone()]);
    if dims.len() > MAX_RANK {
        return None;
    }
    let mut p = Params::new();
    p.i(n as i64)
        .i(dims.len() as i64)
        .arr(
            &dims.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            MAX_RANK,
            1,
        )
        .arr(&st[0], MAX_RANK, 0)
        .arr(&st[1], MAX_RANK, 0)
        .i(s.ib)
        .i(s.ob);
    // Largest offset either side reaches, to pick 32-bit index math when it is safe.
    let reach = |base: i64, st: &[i64]| -> i64 {
        base.abs()
            + dims
                .iter()
                .zip(st)
                .map(|(&d, &s)| (d as i64 - 1) * s.abs())
                .sum::<i64>()
    };
    let small = (n as i64) < (1 << 31) - (1 << 29)
        && reach(s.ib, &st[0]) < (1 << 31) - 1
        && reach(s.ob, &st[1]) < (1 << 31) - 1;
    Some(Step::Launch {
        func: if small {
            "kiln_strided32"
        } else {
            "kiln_strided"
        },
        grid: grid_for(n),
        block: BLOCK,
        shmem: 0,
        ptrs: vec![Ptr::In(s.src, 0), Ptr::Out(s.dst, 0)],
        params: p,
    })
}

fn strided_layer(
    cx: &LowerCx<'_>,
    dt: DType,
    copies: Vec<Strided>,
    in_facts: Vec<Option<(DType, Vec<usize>)>>,
    out_facts: Vec<Option<(DType, Vec<usize>)>>,
) -> Option<KernelLayer> {
    let code = strided_code(dt.size())?;
    if dt == DType::String {
        return None;
    }
    let steps = copies
        .iter()
        .map(strided_step)
        .collect::<Option<Vec<_>>>()?;
    Some(layer(
        format!("nvrtc.strided.{}.{}", cx.op(), dt.name()),
        Some(code),
        steps,
        in_facts,
        out_facts,
    ))
}

fn ints_of(cx: &LowerCx<'_>, i: usize) -> Option<Vec<i64>> {
    cx.konst(i)?.to_i64_vec().ok()
}

/// Lowers a data-movement node.
pub fn lower(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let op = cx.op();
    match op {
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" | "Dropout" => copy(cx),
        "Transpose" => transpose(cx),
        "Slice" => slice(cx),
        "Expand" => expand(cx),
        "Concat" => concat(cx),
        "Split" => split(cx),
        "DepthToSpace" | "SpaceToDepth" => depth_space(cx),
        "Pad" | "Tile" => pad(cx),
        "Gather" => gather(cx),
        "GatherElements" => gather_elements(cx),
        "ConstantOfShape" => constant_of_shape(cx),
        _ => None,
    }
}

fn copy(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    if !cx.single_output() {
        return None;
    }
    let (dt, ishape) = cx.input(0)?;
    let (odt, oshape) = cx.output(0)?;
    if dt != odt
        || dt == DType::String
        || ishape.iter().product::<usize>() != oshape.iter().product::<usize>()
    {
        return None;
    }
    if cx.op() == "Dropout" {
        if cx.opset() < 7 {
            return None;
        }
        if cx.present(2) {
            let t = cx.konst(2)?;
            if t.to_i64_vec().ok()?.iter().any(|&v| v != 0) {
                return None;
            }
        }
    }
    let bytes = oshape.iter().product::<usize>() * dt.size();
    Some(layer(
        format!("copy.{}", cx.op()),
        None,
        vec![Step::Copy {
            src: Ptr::In(0, 0),
            dst: Ptr::Out(0, 0),
            bytes,
        }],
        only(cx.n_in(), 0, (dt, ishape)),
        vec![Some((odt, oshape))],
    ))
}

fn transpose(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let (odt, oshape) = cx.output(0)?;
    let r = ishape.len();
    if dt != odt || r > MAX_RANK || !cx.single_output() {
        return None;
    }
    let perm: Vec<usize> = match cx.attrs().opt_ints("perm").ok()? {
        Some(p) => p.iter().map(|&a| cx.axis(a, r)).collect::<Option<_>>()?,
        None => (0..r).rev().collect(),
    };
    let mut seen = vec![false; r];
    for &p in &perm {
        if seen[p] {
            return None;
        }
        seen[p] = true;
    }
    if perm.len() != r || perm.iter().map(|&p| ishape[p]).collect::<Vec<_>>() != oshape {
        return None;
    }
    let ist = strides(&ishape);
    let c = Strided {
        src: 0,
        dst: 0,
        dims: oshape.clone(),
        ist: perm.iter().map(|&p| ist[p]).collect(),
        ost: strides(&oshape),
        ib: 0,
        ob: 0,
    };
    strided_layer(
        cx,
        dt,
        vec![c],
        only(cx.n_in(), 0, (dt, ishape)),
        vec![Some((odt, oshape))],
    )
}

fn slice(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let (odt, oshape) = cx.output(0)?;
    let r = ishape.len();
    // An empty input axis would make the start clamp below meaningless: CPU.
    if dt != odt || r > MAX_RANK || oshape.len() != r || !cx.single_output() || ishape.contains(&0)
    {
        return None;
    }
    let (starts, ends, axes, steps) = if cx.opset() < 10 {
        let a = cx.attrs();
        let s = a.opt_ints("starts").ok()??;
        let e = a.opt_ints("ends").ok()??;
        let ax = a.opt_ints("axes").ok()?;
        (s, e, ax, None)
    } else {
        let s = ints_of(cx, 1)?;
        let e = ints_of(cx, 2)?;
        let ax = if cx.present(3) {
            Some(ints_of(cx, 3)?)
        } else {
            None
        };
        let st = if cx.present(4) {
            Some(ints_of(cx, 4)?)
        } else {
            None
        };
        (s, e, ax, st)
    };
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&x| cx.axis(x, r)).collect::<Option<_>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = steps.unwrap_or_else(|| vec![1; axes.len()]);
    if starts.len() != axes.len() || ends.len() != axes.len() || steps.len() != axes.len() {
        return None;
    }
    let mut start = vec![0i64; r];
    let mut step = vec![1i64; r];
    for (k, &ax) in axes.iter().enumerate() {
        let dim = ishape[ax] as i64;
        let st = steps[k];
        if st == 0 {
            return None;
        }
        let mut s = starts[k];
        if s < 0 {
            s += dim;
        }
        s = if st > 0 {
            s.clamp(0, dim)
        } else {
            s.clamp(0, dim - 1)
        };
        start[ax] = s;
        step[ax] = st;
        let _ = ends[k];
    }
    // The output shape (from inference) fixes the counts; check every read is in range.
    for d in 0..r {
        let last = start[d] + (oshape[d] as i64 - 1) * step[d];
        if start[d] < 0 || start[d] >= ishape[d] as i64 || last < 0 || last >= ishape[d] as i64 {
            return None;
        }
    }
    let ist = strides(&ishape);
    let c = Strided {
        src: 0,
        dst: 0,
        dims: oshape.clone(),
        ist: (0..r).map(|d| ist[d] * step[d]).collect(),
        ost: strides(&oshape),
        ib: (0..r).map(|d| start[d] * ist[d]).sum(),
        ob: 0,
    };
    strided_layer(
        cx,
        dt,
        vec![c],
        only(cx.n_in(), 0, (dt, ishape)),
        vec![Some((odt, oshape))],
    )
}

fn expand(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let (odt, oshape) = cx.output(0)?;
    if dt != odt || oshape.len() > MAX_RANK || !cx.single_output() {
        return None;
    }
    let ist = super::common::broadcast_strides(&ishape, &oshape)?;
    let c = Strided {
        src: 0,
        dst: 0,
        dims: oshape.clone(),
        ist,
        ost: strides(&oshape),
        ib: 0,
        ob: 0,
    };
    strided_layer(
        cx,
        dt,
        vec![c],
        only(cx.n_in(), 0, (dt, ishape)),
        vec![Some((odt, oshape))],
    )
}

fn concat(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (odt, oshape) = cx.output(0)?;
    let r = oshape.len();
    if r > MAX_RANK || !cx.single_output() || r == 0 {
        return None;
    }
    let axis = cx.axis(cx.attrs().opt_int("axis").ok()??, r)?;
    let ost = strides(&oshape);
    let mut off = 0usize;
    let mut copies = Vec::new();
    let mut in_facts = Vec::with_capacity(cx.n_in());
    for i in 0..cx.n_in() {
        let (dt, s) = cx.input(i)?;
        if dt != odt || s.len() != r || (0..r).any(|d| d != axis && s[d] != oshape[d]) {
            return None;
        }
        if s[axis] > 0 {
            copies.push(Strided {
                src: i,
                dst: 0,
                dims: s.clone(),
                ist: strides(&s),
                ost: ost.clone(),
                ib: 0,
                ob: off as i64 * ost[axis],
            });
        }
        off += s[axis];
        in_facts.push(Some((dt, s)));
    }
    if off != oshape[axis] {
        return None;
    }
    strided_layer(cx, odt, copies, in_facts, vec![Some((odt, oshape))])
}

fn split(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let r = ishape.len();
    if r > MAX_RANK || r == 0 {
        return None;
    }
    let axis = cx.axis(cx.attrs().int("axis", 0).ok()?, r)?;
    let ist = strides(&ishape);
    let mut off = 0usize;
    let mut copies = Vec::new();
    let mut out_facts = Vec::new();
    for o in 0..cx.node.outputs.len() {
        // Unused outputs still occupy their part of the axis; we need their shapes anyway.
        let f = cx.outputs.get(o)?;
        let s = f.concrete_shape()?;
        if f.dtype? != dt || s.len() != r || (0..r).any(|d| d != axis && s[d] != ishape[d]) {
            return None;
        }
        if cx.node.outputs[o].is_some() {
            copies.push(Strided {
                src: 0,
                dst: o,
                dims: s.clone(),
                ist: ist.clone(),
                ost: strides(&s),
                ib: off as i64 * ist[axis],
                ob: 0,
            });
            out_facts.push(Some((dt, s.clone())));
        } else {
            out_facts.push(None);
        }
        off += s[axis];
    }
    if off != ishape[axis] {
        return None;
    }
    strided_layer(cx, dt, copies, only(cx.n_in(), 0, (dt, ishape)), out_facts)
}

fn depth_space(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let (odt, oshape) = cx.output(0)?;
    if dt != odt || ishape.len() != 4 || !cx.single_output() {
        return None;
    }
    let b = cx.attrs().opt_int("blocksize").ok()??;
    if !(1..=1 << 16).contains(&b) {
        return None;
    }
    let b = b as usize;
    let [n, c, h, w] = [ishape[0], ishape[1], ishape[2], ishape[3]];
    let (dims, ist) = if cx.op() == "DepthToSpace" {
        if c % (b * b) != 0 || oshape != [n, c / (b * b), h * b, w * b] {
            return None;
        }
        let cp = c / (b * b);
        let crd = cx.attrs().string("mode", "DCR").ok()? == "CRD";
        // Iterate the output as [N, C', H, b1, W, b2].
        if crd {
            let v = strides(&[n, cp, b, b, h, w]);
            (
                vec![n, cp, h, b, w, b],
                vec![v[0], v[1], v[4], v[2], v[5], v[3]],
            )
        } else {
            let v = strides(&[n, b, b, cp, h, w]);
            (
                vec![n, cp, h, b, w, b],
                vec![v[0], v[3], v[4], v[1], v[5], v[2]],
            )
        }
    } else {
        if h % b != 0 || w % b != 0 || oshape != [n, c * b * b, h / b, w / b] {
            return None;
        }
        let v = strides(&[n, c, h / b, b, w / b, b]);
        // Output as [N, b1, b2, C, H', W'].
        (
            vec![n, b, b, c, h / b, w / b],
            vec![v[0], v[3], v[5], v[1], v[2], v[4]],
        )
    };
    let ost = strides(&dims);
    let cp = Strided {
        src: 0,
        dst: 0,
        dims,
        ist,
        ost,
        ib: 0,
        ob: 0,
    };
    strided_layer(
        cx,
        dt,
        vec![cp],
        only(cx.n_in(), 0, (dt, ishape)),
        vec![Some((odt, oshape))],
    )
}

/// Source of the pad kernel (modes: 0 constant, 1 edge, 2 reflect, 3 wrap).
pub fn pad_code(dt: DType) -> Option<String> {
    let t = ctype(dt)?;
    Some(format!(
        "{pre}struct P {{ long long n; long long rank; long long mode; double value; long long odims[{R}]; long long idims[{R}]; long long ist[{R}]; long long pb[{R}]; }};\n\
extern \"C\" __global__ void kiln_pad(const {t}* __restrict__ x, {t}* __restrict__ y, const P p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) {{\n\
    long long rem = i, off = 0; bool outside = false;\n\
    for (int d = (int)p.rank - 1; d >= 0; --d) {{\n\
      long long c = rem % p.odims[d]; rem /= p.odims[d];\n\
      long long v = c - p.pb[d]; long long len = p.idims[d];\n\
      if (v < 0 || v >= len) {{\n\
        if (p.mode == 0) {{ outside = true; v = 0; }}\n\
        else if (p.mode == 1) {{ v = v < 0 ? 0 : len - 1; }}\n\
        else if (p.mode == 2) {{\n\
          if (len == 1) {{ v = 0; }} else {{\n\
            long long period = 2 * (len - 1);\n\
            v = ((v % period) + period) % period;\n\
            if (v >= len) v = period - v;\n\
          }}\n\
        }} else {{ v = ((v % len) + len) % len; }}\n\
      }}\n\
      off += v * p.ist[d];\n\
    }}\n\
    y[i] = outside ? {val} : x[off];\n\
  }}\n\
}}\n",
        pre = prelude(&[dt]),
        R = MAX_RANK,
        val = store(dt, "p.value"),
    ))
}

fn pad(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let (odt, oshape) = cx.output(0)?;
    let r = ishape.len();
    if dt != odt || r > MAX_RANK || r == 0 || oshape.len() != r || !cx.single_output() {
        return None;
    }
    if ishape.contains(&0) {
        return None;
    }
    let a = cx.attrs();
    let (mode, pb, value) = if cx.op() == "Tile" {
        (3i64, vec![0i64; r], 0.0f64)
    } else {
        let mode = match a.string("mode", "constant").ok()?.as_str() {
            "constant" => 0,
            "edge" => 1,
            "reflect" => 2,
            "wrap" => 3,
            _ => return None,
        };
        let (pads, value) = if cx.opset() < 11 {
            let p = a
                .opt_ints(if cx.opset() < 2 { "paddings" } else { "pads" })
                .ok()??;
            (p, a.float("value", 0.0).ok()? as f64)
        } else {
            let p = ints_of(cx, 1)?;
            let v = if cx.present(2) {
                let t = cx.konst(2)?;
                if t.len() != 1 || t.dtype() != dt {
                    return None;
                }
                t.to_f64_vec().ok()?[0]
            } else {
                0.0
            };
            (p, v)
        };
        let axes: Vec<usize> = if cx.present(3) {
            ints_of(cx, 3)?
                .iter()
                .map(|&x| cx.axis(x, r))
                .collect::<Option<_>>()?
        } else {
            (0..r).collect()
        };
        if pads.len() != 2 * axes.len() {
            return None;
        }
        let mut pb = vec![0i64; r];
        for (k, &ax) in axes.iter().enumerate() {
            pb[ax] = pads[k];
            if ishape[ax] as i64 + pads[k] + pads[k + axes.len()] != oshape[ax] as i64 {
                return None;
            }
        }
        (mode, pb, value)
    };
    // Integer values beyond f64's exact range would be rounded: leave them to the CPU.
    if value.abs() > 9.0e15 {
        return None;
    }
    if cx.op() == "Tile" && (0..r).any(|d| oshape[d] % ishape[d] != 0) {
        return None;
    }
    let n: usize = oshape.iter().product();
    let mut p = Params::new();
    p.i(n as i64)
        .i(r as i64)
        .i(mode)
        .f(value)
        .arr(
            &oshape.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            MAX_RANK,
            1,
        )
        .arr(
            &ishape.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            MAX_RANK,
            1,
        )
        .arr(&strides(&ishape), MAX_RANK, 0)
        .arr(&pb, MAX_RANK, 0);
    Some(layer(
        format!("nvrtc.pad.{}.{}", cx.op(), dt.name()),
        Some(pad_code(dt)?),
        vec![Step::Launch {
            func: "kiln_pad",
            grid: grid_for(n),
            block: BLOCK,
            shmem: 0,
            ptrs: vec![Ptr::In(0, 0), Ptr::Out(0, 0)],
            params: p,
        }],
        only(cx.n_in(), 0, (dt, ishape)),
        vec![Some((odt, oshape))],
    ))
}

fn index_type(dt: DType) -> Option<&'static str> {
    match dt {
        DType::I32 => Some("int"),
        DType::I64 => Some("long long"),
        _ => None,
    }
}

/// Source of the Gather kernel.
pub fn gather_code(size: usize, idt: DType) -> Option<String> {
    let t = raw_type(size)?;
    let it = index_type(idt)?;
    Some(format!(
        "{pre}struct P {{ long long n; long long inner; long long nidx; long long axis_len; }};\n\
extern \"C\" __global__ void kiln_gather(const {t}* __restrict__ x, const {it}* __restrict__ ind, {t}* __restrict__ y, const P p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) {{\n\
    long long k = i % p.inner; long long q = i / p.inner;\n\
    long long j = q % p.nidx; long long o = q / p.nidx;\n\
    long long idx = (long long)ind[j];\n\
    if (idx < 0) idx += p.axis_len;\n\
    y[i] = (idx < 0 || idx >= p.axis_len) ? ({t})0 : x[(o * p.axis_len + idx) * p.inner + k];\n\
  }}\n\
}}\n",
        pre = prelude(&[])
    ))
}

fn gather(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let (idt, jshape) = cx.input(1)?;
    let (odt, oshape) = cx.output(0)?;
    let r = ishape.len();
    if dt != odt || r == 0 || !cx.single_output() || ishape.contains(&0) {
        return None;
    }
    let axis = cx.axis(cx.attrs().int("axis", 0).ok()?, r)?;
    let outer: usize = ishape[..axis].iter().product();
    let inner: usize = ishape[axis + 1..].iter().product();
    let nidx: usize = jshape.iter().product();
    let mut expect = ishape[..axis].to_vec();
    expect.extend_from_slice(&jshape);
    expect.extend_from_slice(&ishape[axis + 1..]);
    if expect != oshape {
        return None;
    }
    let n = outer * nidx * inner;
    let mut p = Params::new();
    p.i(n as i64)
        .i(inner as i64)
        .i(nidx as i64)
        .i(ishape[axis] as i64);
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, ishape));
    in_facts[1] = Some((idt, jshape));
    Some(layer(
        format!("nvrtc.gather.{}", dt.name()),
        Some(gather_code(dt.size(), idt)?),
        vec![Step::Launch {
            func: "kiln_gather",
            grid: grid_for(n),
            block: BLOCK,
            shmem: 0,
            ptrs: vec![Ptr::In(0, 0), Ptr::In(1, 0), Ptr::Out(0, 0)],
            params: p,
        }],
        in_facts,
        vec![Some((odt, oshape))],
    ))
}

/// Source of the GatherElements kernel.
pub fn gather_elements_code(size: usize, idt: DType) -> Option<String> {
    let t = raw_type(size)?;
    let it = index_type(idt)?;
    Some(format!(
        "{pre}struct P {{ long long n; long long rank; long long axis; long long axis_len; long long odims[{R}]; long long dst[{R}]; }};\n\
extern \"C\" __global__ void kiln_gather_el(const {t}* __restrict__ x, const {it}* __restrict__ ind, {t}* __restrict__ y, const P p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) {{\n\
    long long rem = i, off = 0;\n\
    for (int d = (int)p.rank - 1; d >= 0; --d) {{\n\
      long long c = rem % p.odims[d]; rem /= p.odims[d];\n\
      if (d != (int)p.axis) off += c * p.dst[d];\n\
    }}\n\
    long long idx = (long long)ind[i];\n\
    if (idx < 0) idx += p.axis_len;\n\
    y[i] = (idx < 0 || idx >= p.axis_len) ? ({t})0 : x[off + idx * p.dst[p.axis]];\n\
  }}\n\
}}\n",
        pre = prelude(&[]),
        R = MAX_RANK
    ))
}

fn gather_elements(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (dt, ishape) = cx.input(0)?;
    let (idt, jshape) = cx.input(1)?;
    let (odt, oshape) = cx.output(0)?;
    let r = ishape.len();
    if dt != odt
        || r == 0
        || r > MAX_RANK
        || jshape != oshape
        || jshape.len() != r
        || !cx.single_output()
    {
        return None;
    }
    let axis = cx.axis(cx.attrs().int("axis", 0).ok()?, r)?;
    if (0..r).any(|d| d != axis && jshape[d] > ishape[d]) || ishape[axis] == 0 {
        return None;
    }
    let n: usize = oshape.iter().product();
    let mut p = Params::new();
    p.i(n as i64)
        .i(r as i64)
        .i(axis as i64)
        .i(ishape[axis] as i64)
        .arr(
            &oshape.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            MAX_RANK,
            1,
        )
        .arr(&strides(&ishape), MAX_RANK, 0);
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, ishape));
    in_facts[1] = Some((idt, jshape));
    Some(layer(
        format!("nvrtc.gather_elements.{}", dt.name()),
        Some(gather_elements_code(dt.size(), idt)?),
        vec![Step::Launch {
            func: "kiln_gather_el",
            grid: grid_for(n),
            block: BLOCK,
            shmem: 0,
            ptrs: vec![Ptr::In(0, 0), Ptr::In(1, 0), Ptr::Out(0, 0)],
            params: p,
        }],
        in_facts,
        vec![Some((odt, oshape))],
    ))
}

/// Source of the fill kernel (writes the low bytes of `p.bits` to every element).
pub fn fill_code(size: usize) -> Option<String> {
    let t = raw_type(size)?;
    Some(format!(
        "{pre}struct P {{ long long n; unsigned long long bits; }};\n\
extern \"C\" __global__ void kiln_fill({t}* __restrict__ y, const P p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) y[i] = ({t})p.bits;\n\
}}\n",
        pre = prelude(&[])
    ))
}

fn constant_of_shape(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    let (odt, oshape) = cx.output(0)?;
    if !cx.single_output() || raw_type(odt.size()).is_none() || odt == DType::String {
        return None;
    }
    let bits: u64 = match cx.node.desc.attrs.get("value") {
        None => 0,
        Some(Attr::Tensor(t)) => {
            if t.len() != 1 || t.dtype() != odt {
                return None;
            }
            let mut b = [0u8; 8];
            b[..odt.size()].copy_from_slice(t.bytes().get(..odt.size())?);
            u64::from_le_bytes(b)
        }
        Some(_) => return None,
    };
    let n: usize = oshape.iter().product();
    let mut p = Params::new();
    p.i(n as i64).i(bits as i64);
    Some(layer(
        format!("nvrtc.fill.{}", odt.name()),
        Some(fill_code(odt.size())?),
        vec![Step::Launch {
            func: "kiln_fill",
            grid: grid_for(n),
            block: BLOCK,
            shmem: 0,
            ptrs: vec![Ptr::Out(0, 0)],
            params: p,
        }],
        vec![None; cx.n_in()],
        vec![Some((odt, oshape))],
    ))
}

#[cfg(test)]
mod tests {
    use kiln_core::{Attr, DType, Tensor};

    use super::*;
    use crate::kernels::testutil::{f, node};
    use crate::kernels::{lower_layer, LowerCx};

    fn params(l: &KernelLayer, k: usize) -> Vec<i64> {
        match &l.steps[k] {
            Step::Launch { params, .. } => params.0.clone(),
            Step::Copy { .. } => vec![],
        }
    }

    #[test]
    fn transpose_strides() {
        let n = node(
            "Transpose",
            13,
            vec![("perm", Attr::Ints(vec![0, 2, 1]))],
            1,
            1,
        );
        let fi = vec![f(DType::F16, &[2, 3, 4])];
        let fo = vec![f(DType::F16, &[2, 4, 3])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
        .unwrap();
        let p = params(&l, 0);
        // n=24, rank 3, dims [2,4,3], ist [12,1,4], ost [12,3,1]
        assert_eq!(p[0], 24);
        assert_eq!(p[1], 3);
        assert_eq!(&p[2..5], &[2, 4, 3]);
        assert_eq!(&p[10..13], &[12, 1, 4]);
        assert_eq!(&p[18..21], &[12, 3, 1]);
        assert!(l.src.unwrap().code.contains("unsigned short"));
        // A bad perm is refused.
        let n = node(
            "Transpose",
            13,
            vec![("perm", Attr::Ints(vec![0, 0, 1]))],
            1,
            1,
        );
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo
        })
        .is_none());
    }

    #[test]
    fn slice_needs_constants_and_checks_range() {
        let n = node("Slice", 13, vec![], 5, 1);
        let mut fi = vec![
            f(DType::F32, &[10, 6]),
            Fact::constant(Tensor::from_vec(&[1], vec![-1i64]).unwrap()),
            Fact::constant(Tensor::from_vec(&[1], vec![-100i64]).unwrap()),
            Fact::constant(Tensor::from_vec(&[1], vec![0i64]).unwrap()),
            Fact::constant(Tensor::from_vec(&[1], vec![-3i64]).unwrap()),
        ];
        let fo = vec![f(DType::F32, &[4, 6])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
        .unwrap();
        let p = params(&l, 0);
        // start row 9, step -3: ib = 9*6 = 54; rows and cols coalesce? No: ist row = -18.
        assert_eq!(p[p.len() - 2], 54);
        let mut fz = fi.clone();
        fz[0] = f(DType::F32, &[10, 0]);
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fz,
            outputs: &fo
        })
        .is_none());
        fi[1] = f(DType::I64, &[1]);
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo
        })
        .is_none());
    }

    #[test]
    fn depth_to_space_rejects_bad_blocksize() {
        let fi = vec![f(DType::F32, &[1, 8, 3, 2])];
        let fo = vec![f(DType::F32, &[1, 2, 6, 4])];
        let n = node("DepthToSpace", 13, vec![("blocksize", Attr::Int(2))], 1, 1);
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo
        })
        .is_some());
        for b in [-2, 0, 1 << 40] {
            let n = node("DepthToSpace", 13, vec![("blocksize", Attr::Int(b))], 1, 1);
            assert!(lower_layer(&LowerCx {
                node: &n,
                inputs: &fi,
                outputs: &fo
            })
            .is_none());
        }
    }

    #[test]
    fn concat_offsets() {
        let n = node("Concat", 13, vec![("axis", Attr::Int(1))], 2, 1);
        let fi = vec![f(DType::F32, &[2, 3, 5]), f(DType::F32, &[2, 4, 5])];
        let fo = vec![f(DType::F32, &[2, 7, 5])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
        .unwrap();
        assert_eq!(l.steps.len(), 2);
        let p = params(&l, 1);
        assert_eq!(p[p.len() - 1], 15);
        let bad = vec![f(DType::F32, &[2, 7, 6])];
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &bad
        })
        .is_none());
    }

    #[test]
    fn pad_modes() {
        let n = node(
            "Pad",
            18,
            vec![("mode", Attr::String("reflect".into()))],
            2,
            1,
        );
        let fi = vec![
            f(DType::F32, &[3, 4]),
            Fact::constant(Tensor::from_vec(&[4], vec![1i64, 2, 0, 1]).unwrap()),
        ];
        let fo = vec![f(DType::F32, &[4, 7])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
        .unwrap();
        assert_eq!(params(&l, 0)[2], 2);
        let n = node(
            "Pad",
            18,
            vec![("mode", Attr::String("bogus".into()))],
            2,
            1,
        );
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo
        })
        .is_none());
    }

    use kiln_core::Fact;
}
