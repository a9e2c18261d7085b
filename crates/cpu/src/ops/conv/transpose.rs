//! ConvTranspose: GEMM (Wᵀ·X per group) then col2im scatter-add, with output_padding,
//! output_shape, auto_pad, groups and dilations. Geometries whose taps never overlap (e.g.
//! 2×2 stride 2) take [`super::transpose_tiles`] instead: tiled GEMM, direct writes.

use rayon::prelude::*;

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Dim, Fact, KilnError, Op, Result, TensorMut,
    Value,
};

use super::geom::AutoPad;
use crate::ops::linalg::blas::{self, MatRef};
use crate::ops::linalg::{as_f32, from_f32};
use crate::plan_cache::{PlanCache, PlanKey};
use crate::scratch::with_scratch;

/// ONNX ConvTranspose.
#[derive(Debug, Clone)]
pub struct ConvTranspose {
    auto_pad: AutoPad,
    group: usize,
    kernel_shape: Option<Vec<usize>>,
    strides: Option<Vec<usize>>,
    dilations: Option<Vec<usize>>,
    pads: Option<Vec<i64>>,
    output_padding: Option<Vec<usize>>,
    output_shape: Option<Vec<usize>>,
    /// The last call's geometry `(n, c, m, geometry)`, reused while shapes stay the same.
    geometry_cache: PlanCache<(usize, usize, usize, TGeom)>,
}

fn uints(a: &kiln_core::AttrReader, name: &str, min: i64) -> Result<Option<Vec<usize>>> {
    match a.opt_ints(name)? {
        None => Ok(None),
        Some(v) => v
            .iter()
            .map(|&x| {
                usize::try_from(x)
                    .ok()
                    .filter(|_| x >= min)
                    .ok_or_else(|| a.invalid(format!("invalid {name} {v:?}")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
    }
}

/// Builds ConvTranspose.
pub fn build_conv_transpose(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let group = usize::try_from(a.int("group", 1)?)
        .ok()
        .filter(|&g| g > 0)
        .ok_or_else(|| a.invalid("group must be positive"))?;
    let pads = a.opt_ints("pads")?;
    if pads.as_ref().is_some_and(|p| p.len() % 2 != 0) {
        return Err(a.invalid("pads must have an even length"));
    }
    Ok(Box::new(ConvTranspose {
        auto_pad: AutoPad::parse(&a)?,
        group,
        kernel_shape: uints(&a, "kernel_shape", 1)?,
        strides: uints(&a, "strides", 1)?,
        dilations: uints(&a, "dilations", 1)?,
        pads,
        output_padding: uints(&a, "output_padding", 0)?,
        output_shape: uints(&a, "output_shape", 0)?,
        geometry_cache: PlanCache::default(),
    }))
}

/// Resolved geometry (3-D canonical; pads may be negative when output_shape asks for
/// more than the natural size).
#[derive(Debug, Clone, Copy)]
pub struct TGeom {
    /// Input spatial sizes.
    pub input: [usize; 3],
    /// Kernel.
    pub kernel: [usize; 3],
    /// Strides.
    pub strides: [usize; 3],
    /// Dilations.
    pub dilations: [usize; 3],
    /// Padding before (signed).
    pub pad_begin: [i64; 3],
    /// Output sizes.
    pub output: [usize; 3],
}

impl TGeom {
    /// Output coordinate of input position `i`, tap `k` in dim `d`, when inside the output.
    #[inline(always)]
    pub fn out_coord(&self, d: usize, i: usize, k: usize) -> Option<usize> {
        let o = (i * self.strides[d] + k * self.dilations[d]) as i64 - self.pad_begin[d];
        (o >= 0 && (o as usize) < self.output[d]).then_some(o as usize)
    }
}

impl ConvTranspose {
    fn list(
        &self,
        v: &Option<Vec<usize>>,
        n: usize,
        default: usize,
        name: &str,
    ) -> Result<Vec<usize>> {
        match v {
            None => Ok(vec![default; n]),
            Some(v) if v.len() == n => Ok(v.clone()),
            Some(v) => Err(KilnError::kernel(
                "ConvTranspose",
                format!("{name} {v:?} should have {n} values"),
            )),
        }
    }

    /// Output spatial sizes and begin pads for spatial input `input` and kernel `kernel`.
    fn resolve(&self, input: &[usize], kernel: &[usize]) -> Result<(Vec<usize>, Vec<i64>)> {
        let n = input.len();
        let s = self.list(&self.strides, n, 1, "strides")?;
        let d = self.list(&self.dilations, n, 1, "dilations")?;
        let op = self.list(&self.output_padding, n, 0, "output_padding")?;
        let out_attr = match &self.output_shape {
            Some(v) if v.len() == n + 2 => Some(v[2..].to_vec()),
            other => other.clone(),
        };
        if out_attr.as_ref().is_some_and(|v| v.len() != n) {
            return Err(KilnError::kernel(
                "ConvTranspose",
                format!("output_shape {out_attr:?} should have {n} values"),
            ));
        }
        let same = matches!(self.auto_pad, AutoPad::SameUpper | AutoPad::SameLower);
        let mut outs = vec![0; n];
        let mut begins = vec![0; n];
        for i in 0..n {
            let natural = s[i] as i64 * (input[i] as i64 - 1)
                + op[i] as i64
                + ((kernel[i] as i64 - 1) * d[i] as i64 + 1);
            if out_attr.is_some() || same {
                let out = match &out_attr {
                    Some(o) => o[i] as i64,
                    None => input[i] as i64 * s[i] as i64,
                };
                let total = natural - out;
                let half = total.div_euclid(2);
                begins[i] = if self.auto_pad == AutoPad::SameUpper {
                    half
                } else {
                    total - half
                };
                outs[i] = out;
            } else {
                let pads = match &self.pads {
                    None => vec![0; 2 * n],
                    Some(p) if p.len() == 2 * n => p.clone(),
                    Some(p) => {
                        return Err(KilnError::kernel(
                            "ConvTranspose",
                            format!("pads {p:?} should have {} values", 2 * n),
                        ))
                    }
                };
                begins[i] = pads[i];
                outs[i] = natural - pads[i] - pads[i + n];
            }
        }
        let outs = outs
            .into_iter()
            .map(|o| {
                usize::try_from(o).map_err(|_| {
                    KilnError::kernel("ConvTranspose", format!("negative output size {o}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((outs, begins))
    }

    fn geometry(&self, xs: &[usize], ws: &[usize]) -> Result<(usize, usize, usize, TGeom)> {
        if xs.len() < 3 || ws.len() != xs.len() {
            return Err(KilnError::kernel(
                "ConvTranspose",
                format!("X {xs:?} and W {ws:?} must have one rank ≥ 3"),
            ));
        }
        let nd = xs.len() - 2;
        if nd > 3 {
            return Err(KilnError::kernel(
                "ConvTranspose",
                format!("{nd} spatial dims are not supported (at most 3)"),
            ));
        }
        let (c, m) = (xs[1], ws[1] * self.group);
        if ws[0] != c || c % self.group != 0 {
            return Err(KilnError::kernel(
                "ConvTranspose",
                format!("W {ws:?} does not fit X {xs:?} with group {}", self.group),
            ));
        }
        if let Some(k) = &self.kernel_shape {
            if k.as_slice() != &ws[2..] {
                return Err(KilnError::kernel(
                    "ConvTranspose",
                    format!("kernel_shape {k:?} does not match W {ws:?}"),
                ));
            }
        }
        let (outs, begins) = self.resolve(&xs[2..], &ws[2..])?;
        let pad3 = |v: &[usize], f: usize| {
            let mut a = [f; 3];
            a[3 - v.len()..].copy_from_slice(v);
            a
        };
        let mut pb = [0i64; 3];
        pb[3 - nd..].copy_from_slice(&begins);
        let g = TGeom {
            input: pad3(&xs[2..], 1),
            kernel: pad3(&ws[2..], 1),
            strides: pad3(&self.list(&self.strides, nd, 1, "strides")?, 1),
            dilations: pad3(&self.list(&self.dilations, nd, 1, "dilations")?, 1),
            pad_begin: pb,
            output: pad3(&outs, 1),
        };
        Ok((xs[0], c, m, g))
    }

    /// [`Self::geometry`], memoised for the last input and weight shapes.
    fn cached_geometry(&self, xs: &[usize], ws: &[usize]) -> Result<(usize, usize, usize, TGeom)> {
        let mut key = PlanKey::new();
        key.push_dims(xs).push_dims(ws);
        let cached = self
            .geometry_cache
            .get_or_build(&key, || self.geometry(xs, ws))?;
        Ok(*cached)
    }

    /// f32 kernel: per (image, group) GEMM into a column buffer, then col2im (or the tiled
    /// direct path when taps do not overlap).
    #[allow(clippy::too_many_arguments)]
    fn run_f32(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        n: usize,
        c: usize,
        m: usize,
        g: &TGeom,
        out: &mut [f32],
    ) -> Result<()> {
        let group = self.group;
        let (cg, mg) = (c / group, m / group);
        let pin: usize = g.input.iter().product();
        let pout: usize = g.output.iter().product();
        let ksz: usize = g.kernel.iter().product();
        let rows = mg * ksz;
        if out.is_empty() {
            return Ok(());
        }
        if super::transpose_tiles::non_overlapping(g) {
            return super::transpose_tiles::run(
                x,
                w,
                b,
                (n, c, m, group),
                g,
                out,
                crate::parallel::threads() > 1,
            );
        }
        let chunks = n * group;
        let outer = chunks > 1 && crate::parallel::threads() > 1;
        let body = |(idx, chunk): (usize, &mut [f32])| -> Result<()> {
            let (bn, gi) = (idx / group, idx % group);
            let xg = &x[(bn * c + gi * cg) * pin..(bn * c + (gi + 1) * cg) * pin];
            let wg = &w[gi * cg * rows..(gi + 1) * cg * rows];
            with_scratch::<f32, _>(rows * pin, |col| {
                let par = !outer && rows * pin * cg >= blas::PARALLEL_THRESHOLD;
                blas::gemm(
                    rows,
                    pin,
                    cg,
                    col,
                    pin,
                    false,
                    MatRef::transposed(wg, rows),
                    MatRef::row_major(xg, pin),
                    1.0,
                    par,
                )?;
                let col: &[f32] = col;
                let plane_body = |(mi, plane): (usize, &mut [f32])| {
                    plane.fill(b.map_or(0.0, |b| b[gi * mg + mi]));
                    col2im_add(&col[mi * ksz * pin..(mi + 1) * ksz * pin], g, plane);
                };
                // col2im is a full pass over the columns: split its output channels over
                // threads too when the (image, group) loop is not parallel.
                let per = col2im_planes_per_task(mg, ksz * pin, crate::parallel::threads());
                if !outer && per < mg {
                    chunk
                        .par_chunks_mut(per * pout)
                        .enumerate()
                        .for_each(|(t, planes)| {
                            for (i, plane) in planes.chunks_mut(pout).enumerate() {
                                plane_body((t * per + i, plane));
                            }
                        });
                } else {
                    chunk.chunks_mut(pout).enumerate().for_each(plane_body);
                }
                Ok(())
            })
        };
        if outer {
            out.par_chunks_mut(mg * pout).enumerate().try_for_each(body)
        } else {
            out.chunks_mut(mg * pout).enumerate().try_for_each(body)
        }
    }
}

/// Minimum column values per col2im task.
const COL2IM_TASK_WORK: usize = 1 << 15;

/// Output channels per col2im task for `planes` channels of `work` column values each on
/// `threads` threads: all of them (serial) for one thread or little work, else about four
/// tasks per thread of at least [`COL2IM_TASK_WORK`] values.
fn col2im_planes_per_task(planes: usize, work: usize, threads: usize) -> usize {
    let total = planes.saturating_mul(work.max(1));
    if threads <= 1 || planes <= 1 || total < 2 * COL2IM_TASK_WORK {
        return planes.max(1);
    }
    let tasks = (threads * 4)
        .min(planes)
        .min(total / COL2IM_TASK_WORK)
        .max(1);
    planes.div_ceil(tasks)
}

/// Adds the columns of one output channel (ksz × P_in) into its output plane.
fn col2im_add(col: &[f32], g: &TGeom, plane: &mut [f32]) {
    let [kd_n, kh_n, kw_n] = g.kernel;
    let [id_n, ih_n, iw_n] = g.input;
    let [_, oh_n, ow_n] = g.output;
    let pin = id_n * ih_n * iw_n;
    let mut r = 0;
    for kd in 0..kd_n {
        for kh in 0..kh_n {
            for kw in 0..kw_n {
                let crow = &col[r * pin..(r + 1) * pin];
                r += 1;
                for id in 0..id_n {
                    let Some(od) = g.out_coord(0, id, kd) else {
                        continue;
                    };
                    for ih in 0..ih_n {
                        let Some(oh) = g.out_coord(1, ih, kh) else {
                            continue;
                        };
                        let orow = &mut plane[(od * oh_n + oh) * ow_n..(od * oh_n + oh + 1) * ow_n];
                        let irow = &crow[(id * ih_n + ih) * iw_n..(id * ih_n + ih + 1) * iw_n];
                        for (iw, &v) in irow.iter().enumerate() {
                            if let Some(ow) = g.out_coord(2, iw, kw) {
                                orow[ow] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Op for ConvTranspose {
    fn op_type(&self) -> &str {
        "ConvTranspose"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let w = inputs.get(1).copied().flatten();
        let dtype = x.and_then(|f| f.dtype);
        let (Some(xs), Some(ws)) = (
            x.and_then(|f| f.shape.as_ref()),
            w.and_then(|f| f.shape.as_ref()),
        ) else {
            return Ok(vec![Fact {
                dtype,
                ..Fact::unknown()
            }]);
        };
        let m = match ws.get(1) {
            Some(Dim::Known(v)) => Dim::Known(v * self.group),
            _ => Dim::Unknown,
        };
        let mut shape = vec![xs.first().cloned().unwrap_or(Dim::Unknown), m];
        let input: Option<Vec<usize>> = xs.iter().skip(2).map(|d| d.known()).collect();
        let kernel: Option<Vec<usize>> = ws.iter().skip(2).map(|d| d.known()).collect();
        match (input, kernel) {
            (Some(i), Some(k)) if i.len() == k.len() => {
                shape.extend(self.resolve(&i, &k)?.0.into_iter().map(Dim::Known))
            }
            _ => shape.extend(vec![Dim::Unknown; xs.len().saturating_sub(2)]),
        }
        Ok(vec![Fact {
            dtype,
            shape: Some(shape),
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "ConvTranspose")?;
        let w = input_tensor(inputs, 1, "ConvTranspose")?;
        let b = optional_tensor(inputs, 2, "ConvTranspose")?;
        if !x.dtype().is_float()
            || w.dtype() != x.dtype()
            || b.is_some_and(|b| b.dtype() != x.dtype())
        {
            return Err(KilnError::kernel(
                "ConvTranspose",
                "X, W and B must be float tensors of one dtype",
            ));
        }
        let (n, c, m, g) = self.cached_geometry(x.shape(), w.shape())?;
        if b.is_some_and(|b| b.shape() != [m]) {
            return Err(KilnError::kernel(
                "ConvTranspose",
                format!("B must have shape [{m}]"),
            ));
        }
        let nd = x.rank() - 2;
        let mut shape = vec![n, m];
        shape.extend_from_slice(&g.output[3 - nd..]);
        let mut out = vec![0.0f32; shape.iter().product()];
        let bf = b.map(as_f32).transpose()?;
        self.run_f32(
            &as_f32(x)?,
            &as_f32(w)?,
            bf.as_deref(),
            n,
            c,
            m,
            &g,
            &mut out,
        )?;
        Ok(vec![from_f32(x.dtype(), &shape, out)?.into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = input_tensor(inputs, 0, "ConvTranspose")?;
        let w = input_tensor(inputs, 1, "ConvTranspose")?;
        let b = optional_tensor(inputs, 2, "ConvTranspose")?;
        let all_f32 = x.dtype() == DType::F32
            && w.dtype() == DType::F32
            && b.is_none_or(|b| b.dtype() == DType::F32);
        let [out] = outputs else {
            return Err(KilnError::kernel(
                "ConvTranspose",
                "expected one output slot",
            ));
        };
        if !all_f32 || out.dtype() != DType::F32 {
            // Other float types go through the reference path (converting to f32).
            let y = self.eval(inputs)?;
            return out.copy_from(y[0].as_tensor()?);
        }
        let (n, c, m, g) = self.cached_geometry(x.shape(), w.shape())?;
        if b.is_some_and(|b| b.shape() != [m]) {
            return Err(KilnError::kernel(
                "ConvTranspose",
                format!("B must have shape [{m}]"),
            ));
        }
        let nd = x.rank() - 2;
        let want_spatial = &g.output[3 - nd..];
        if out.shape().len() != nd + 2
            || out.shape()[..2] != [n, m]
            || &out.shape()[2..] != want_spatial
        {
            return Err(KilnError::kernel(
                "ConvTranspose",
                format!(
                    "output slot has shape {:?}, the inputs give [{n}, {m}, {want_spatial:?}]",
                    out.shape()
                ),
            ));
        }
        let bias = b.map(|b| b.as_slice::<f32>()).transpose()?;
        self.run_f32(
            x.as_slice::<f32>()?,
            w.as_slice::<f32>()?,
            bias,
            n,
            c,
            m,
            &g,
            out.as_mut_slice::<f32>()?,
        )
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::test_util::{max_diff, Lcg};
    use kiln_core::{DType, Tensor};

    fn ct(group: usize) -> ConvTranspose {
        ConvTranspose {
            auto_pad: AutoPad::NotSet,
            group,
            kernel_shape: None,
            strides: None,
            dilations: None,
            pads: None,
            output_padding: None,
            output_shape: None,
            geometry_cache: PlanCache::default(),
        }
    }

    /// Naive scatter: y[n, g·Mg+m, i·s + k·d − p] += x[n, g·Cg+c, i] · w[g·Cg+c, m, k].
    fn naive(
        x: &[f32],
        xs: &[usize],
        w: &[f32],
        ws: &[usize],
        b: &[f32],
        group: usize,
        g: &TGeom,
    ) -> Vec<f32> {
        let (n, c, mg) = (xs[0], xs[1], ws[1]);
        let m = mg * group;
        let cg = c / group;
        let pin: usize = g.input.iter().product();
        let pout: usize = g.output.iter().product();
        let ksz: usize = g.kernel.iter().product();
        let mut y = vec![0.0f64; n * m * pout];
        for bn in 0..n {
            for om in 0..m {
                for p in 0..pout {
                    y[(bn * m + om) * pout + p] = b[om] as f64;
                }
            }
            for ci in 0..c {
                let gi = ci / cg;
                for mi in 0..mg {
                    let om = gi * mg + mi;
                    for ip in 0..pin {
                        let (id, ih, iw) = (
                            ip / (g.input[1] * g.input[2]),
                            (ip / g.input[2]) % g.input[1],
                            ip % g.input[2],
                        );
                        for kp in 0..ksz {
                            let (kd, kh, kw) = (
                                kp / (g.kernel[1] * g.kernel[2]),
                                (kp / g.kernel[2]) % g.kernel[1],
                                kp % g.kernel[2],
                            );
                            if let (Some(od), Some(oh), Some(ow)) = (
                                g.out_coord(0, id, kd),
                                g.out_coord(1, ih, kh),
                                g.out_coord(2, iw, kw),
                            ) {
                                let o = (od * g.output[1] + oh) * g.output[2] + ow;
                                y[(bn * m + om) * pout + o] += x[(bn * c + ci) * pin + ip] as f64
                                    * w[(ci * mg + mi) * ksz + kp] as f64;
                            }
                        }
                    }
                }
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    fn check(op: &ConvTranspose, xs: &[usize], ws: &[usize], want_spatial: &[usize]) {
        let mut r = Lcg(21);
        let x = r.vec(xs.iter().product());
        let w = r.vec(ws.iter().product());
        let b = r.vec(ws[1] * op.group);
        let xv: Value = Tensor::from_vec(xs, x.clone()).unwrap().into();
        let wv: Value = Tensor::from_vec(ws, w.clone()).unwrap().into();
        let bv: Value = Tensor::from_vec(&[b.len()], b.clone()).unwrap().into();
        let y = op
            .eval(&[Some(&xv), Some(&wv), Some(&bv)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(&y.shape()[2..], want_spatial);
        let (_, _, _, g) = op.geometry(xs, ws).unwrap();
        let want = naive(&x, xs, &w, ws, &b, op.group, &g);
        assert!(max_diff(y.as_slice::<f32>().unwrap(), &want) < 1e-4);
        let f = op
            .infer(
                &[
                    Some(&Fact::concrete(DType::F32, xs)),
                    Some(&Fact::concrete(DType::F32, ws)),
                ],
                1,
            )
            .unwrap();
        assert_eq!(f[0].concrete_shape().unwrap(), y.shape());
        // The in-place path (scratch columns, cached geometry) writes the same bits, twice.
        for _ in 0..2 {
            let mut buf = vec![0xA5u8; y.bytes().len()];
            let mut slot = [TensorMut::new(DType::F32, y.shape(), &mut buf).unwrap()];
            op.eval_into(&[Some(&xv), Some(&wv), Some(&bv)], &mut slot)
                .unwrap();
            assert_eq!(buf.as_slice(), y.bytes());
        }
    }

    #[test]
    fn conv_transpose_variants() {
        check(&ct(1), &[1, 2, 3, 4], &[2, 3, 3, 3], &[5, 6]);
        let mut op = ct(1);
        op.strides = Some(vec![2, 3]);
        op.pads = Some(vec![1, 0, 0, 2]);
        op.output_padding = Some(vec![1, 1]);
        op.dilations = Some(vec![1, 2]);
        check(&op, &[2, 3, 4, 5], &[3, 2, 3, 2], &[9, 14]);
        let mut op = ct(2);
        op.strides = Some(vec![2, 2]);
        check(&op, &[1, 4, 3, 3], &[4, 3, 3, 3], &[7, 7]);
        let mut op = ct(1);
        op.strides = Some(vec![3, 2]);
        op.output_shape = Some(vec![10, 8]);
        check(&op, &[1, 1, 3, 3], &[1, 2, 3, 3], &[10, 8]);
        for ap in [AutoPad::SameUpper, AutoPad::SameLower] {
            let mut op = ct(1);
            op.auto_pad = ap;
            op.strides = Some(vec![2, 2]);
            check(&op, &[1, 1, 3, 3], &[1, 2, 3, 3], &[6, 6]);
        }
        let mut op = ct(1);
        op.strides = Some(vec![2]);
        check(&op, &[1, 2, 5], &[2, 2, 3], &[11]);
        check(&ct(1), &[1, 1, 2, 3, 2], &[1, 2, 2, 2, 2], &[3, 4, 3]);
    }

    /// col2im split over output channels (one image and group, so the (image, group) loop
    /// is serial) at 1, 2 and 3 threads, odd channel counts, against the naive kernel.
    /// Geometries whose taps never overlap take the tiled direct path
    /// (`transpose_tiles`): exact 2×2 stride 2, gaps (stride > kernel) with pads and output
    /// padding, dilation, groups and batches, 1-D and 3-D, several tiles; each against the
    /// naive kernel (through `check`, so the in-place path too) and at 1, 2 and 3 threads.
    #[test]
    fn non_overlapping_taps_take_the_tiled_path() {
        let op_with = |group: usize, s: &[usize], f: &dyn Fn(&mut ConvTranspose)| {
            let mut op = ct(group);
            op.strides = Some(s.to_vec());
            f(&mut op);
            op
        };
        /// (op, X shape, W shape, output spatial shape).
        type Case = (ConvTranspose, Vec<usize>, Vec<usize>, Vec<usize>);
        let cases: Vec<Case> = vec![
            (
                op_with(1, &[2, 2], &|_| {}),
                vec![1, 5, 7, 9],
                vec![5, 3, 2, 2],
                vec![14, 18],
            ),
            (
                op_with(1, &[3, 3], &|o| {
                    o.pads = Some(vec![1, 0, 0, 2]);
                    o.output_padding = Some(vec![1, 1]);
                }),
                vec![1, 3, 4, 5],
                vec![3, 2, 2, 2],
                vec![11, 13],
            ),
            (
                op_with(1, &[4, 4], &|o| o.dilations = Some(vec![2, 3])),
                vec![1, 2, 3, 4],
                vec![2, 3, 2, 2],
                vec![11, 16],
            ),
            (
                op_with(2, &[2, 2], &|_| {}),
                vec![2, 4, 6, 5],
                vec![4, 3, 2, 2],
                vec![12, 10],
            ),
            (
                op_with(1, &[2], &|_| {}),
                vec![1, 3, 11],
                vec![3, 2, 2],
                vec![22],
            ),
            (
                op_with(1, &[2, 2, 2], &|_| {}),
                vec![1, 2, 3, 4, 2],
                vec![2, 2, 2, 2, 2],
                vec![6, 8, 4],
            ),
            (
                op_with(1, &[2, 2], &|o| o.auto_pad = AutoPad::SameUpper),
                vec![1, 3, 5, 6],
                vec![3, 2, 2, 2],
                vec![10, 12],
            ),
            (
                op_with(1, &[2, 2], &|_| {}),
                vec![1, 16, 64, 64],
                vec![16, 16, 2, 2],
                vec![128, 128],
            ),
        ];
        for (op, xs, ws, want_spatial) in &cases {
            let (_, _, _, g) = op.geometry(xs, ws).unwrap();
            assert!(
                super::super::transpose_tiles::non_overlapping(&g),
                "{xs:?} {ws:?}"
            );
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| check(op, xs, ws, want_spatial));
            }
        }
    }

    #[test]
    fn conv_transpose_parallel_col2im_at_1_2_3_threads() {
        let mut op = ct(1);
        op.strides = Some(vec![2, 2]);
        op.pads = Some(vec![1, 0, 1, 1]);
        let (xs, ws) = ([1, 5, 19, 23], [5, 13, 3, 4]);
        let mut r = Lcg(33);
        let x = r.vec(xs.iter().product());
        let w = r.vec(ws.iter().product());
        let b = r.vec(ws[1]);
        let (_, _, _, g) = op.geometry(&xs, &ws).unwrap();
        let want = naive(&x, &xs, &w, &ws, &b, 1, &g);
        let xv: Value = Tensor::from_vec(&xs, x).unwrap().into();
        let wv: Value = Tensor::from_vec(&ws, w).unwrap().into();
        let bv: Value = Tensor::from_vec(&[b.len()], b).unwrap().into();
        assert!(col2im_planes_per_task(13, 12 * 19 * 23, 2) < 13);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let y = pool
                .install(|| op.eval(&[Some(&xv), Some(&wv), Some(&bv)]))
                .unwrap()
                .remove(0)
                .into_tensor()
                .unwrap();
            let d = max_diff(y.as_slice::<f32>().unwrap(), &want);
            assert!(d < 1e-4, "{threads} threads: diff {d}");
        }
    }

    #[test]
    fn conv_transpose_errors() {
        let x: Value = Tensor::from_vec(&[1, 2, 3, 3], vec![0.0f32; 18])
            .unwrap()
            .into();
        let w: Value = Tensor::from_vec(&[3, 1, 3, 3], vec![0.0f32; 27])
            .unwrap()
            .into();
        assert!(ct(1).eval(&[Some(&x), Some(&w)]).is_err());
        let mut op = ct(1);
        op.pads = Some(vec![5, 5, 5, 5]);
        let w: Value = Tensor::from_vec(&[2, 1, 3, 3], vec![0.0f32; 18])
            .unwrap()
            .into();
        assert!(op.eval(&[Some(&x), Some(&w)]).is_err());
    }
}
