//! Pooling: MaxPool (with indices), AveragePool, LpPool, their global forms, MaxUnpool.
//!
//! Every window kernel works on one (n, c) plane in 3-D canonical form (1-D and 2-D
//! inputs get leading size-1 dims), with per-output-position tap ranges precomputed so
//! the inner loops have no bounds branches; planes run in parallel with rayon.

use num_traits::Float;
use rayon::prelude::*;

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result,
    Tactic, Tensor, TensorMut, Value,
};

use super::conv::geom::{Spatial3, WindowAttrs};
use super::pool_nhwc::{GlobalPoolNhwc, NHWC_TACTIC};
use crate::dispatch_numeric;
use crate::plan_cache::{CachedPlan, PlanCache, PlanKey};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("MaxPool", build_max_pool);
    reg.register("AveragePool", build_average_pool);
    reg.register("LpPool", build_lp_pool);
    reg.register("GlobalMaxPool", |ctx| build_global(ctx, GlobalKind::Max));
    reg.register("GlobalAveragePool", |ctx| {
        build_global(ctx, GlobalKind::Avg)
    });
    reg.register("GlobalLpPool", build_global_lp_pool);
    reg.register("MaxUnpool", build_max_unpool);
}

fn infer_err(op: &str, msg: impl Into<String>) -> KilnError {
    KilnError::Inference {
        node: String::new(),
        op: op.into(),
        msg: msg.into(),
    }
}

/// Planes of at least this many elements (all planes together) run in parallel.
const PAR_MIN: usize = 1 << 14;

// ---------------------------------------------------------------------------------------
// Window pools

/// What a window pool computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PoolKind {
    /// Maximum (optionally with argmax indices; `storage_order` 1 = column-major indices).
    Max {
        /// 0: row-major indices, 1: column-major.
        storage_order: i64,
    },
    /// Mean.
    Avg {
        /// Count padded positions in the divisor.
        count_include_pad: bool,
    },
    /// (Σ |x|^p)^(1/p).
    Lp {
        /// The norm's exponent.
        p: f32,
    },
}

/// MaxPool, AveragePool or LpPool.
#[derive(Debug, Clone)]
pub struct Pool {
    name: &'static str,
    kind: PoolKind,
    win: WindowAttrs,
    kernel: Vec<usize>,
    with_indices: bool,
    /// The last call's geometry, reused while the input shape stays the same.
    geometry_cache: PlanCache<PoolGeom>,
}

fn pool_attrs(ctx: &BuildCtx, name: &str) -> Result<(WindowAttrs, Vec<usize>)> {
    let a = ctx.attrs();
    let win = WindowAttrs::parse(&a)?;
    let kernel = win
        .kernel_shape
        .clone()
        .ok_or_else(|| a.invalid(format!("{name} requires kernel_shape")))?;
    Ok((win, kernel))
}

fn build_max_pool(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let (win, kernel) = pool_attrs(ctx, "MaxPool")?;
    let storage_order = ctx.attrs().int("storage_order", 0)?;
    if !(0..=1).contains(&storage_order) {
        return Err(ctx.attrs().invalid(format!(
            "storage_order must be 0 or 1, found {storage_order}"
        )));
    }
    Ok(Box::new(Pool {
        name: "MaxPool",
        kind: PoolKind::Max { storage_order },
        win,
        kernel,
        with_indices: ctx.n_outputs > 1,
        geometry_cache: PlanCache::default(),
    }))
}

fn build_average_pool(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let (win, kernel) = pool_attrs(ctx, "AveragePool")?;
    let count_include_pad = ctx.attrs().int("count_include_pad", 0)? != 0;
    Ok(Box::new(Pool {
        name: "AveragePool",
        kind: PoolKind::Avg { count_include_pad },
        win,
        kernel,
        with_indices: false,
        geometry_cache: PlanCache::default(),
    }))
}

fn build_lp_pool(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let (win, kernel) = pool_attrs(ctx, "LpPool")?;
    let a = ctx.attrs();
    let p = if ctx.opset() < 2 {
        a.float("p", 2.0)?
    } else {
        a.int("p", 2)? as f32
    };
    if p <= 0.0 {
        return Err(a.invalid(format!("p must be positive, found {p}")));
    }
    Ok(Box::new(Pool {
        name: "LpPool",
        kind: PoolKind::Lp { p },
        win,
        kernel,
        with_indices: false,
        geometry_cache: PlanCache::default(),
    }))
}

/// For one dim: for each output position, the range of valid taps and (for
/// count_include_pad) the number of taps inside the padded extent.
#[derive(Debug, Clone)]
struct DimTaps {
    lo: Vec<usize>,
    hi: Vec<usize>,
    padded: Vec<usize>,
}

fn dim_taps(sp: &Spatial3, pad_end: usize, d: usize) -> DimTaps {
    let (s, dil, pb, inp, k) = (
        sp.strides[d],
        sp.dilations[d],
        sp.pad_begin[d],
        sp.input[d],
        sp.kernel[d],
    );
    let mut t = DimTaps {
        lo: vec![],
        hi: vec![],
        padded: vec![],
    };
    for o in 0..sp.output[d] {
        let start = o * s; // window start in padded coordinates
        let lo = if pb > start {
            (pb - start).div_ceil(dil)
        } else {
            0
        }
        .min(k);
        let hi = if inp + pb > start {
            (inp + pb - start).div_ceil(dil)
        } else {
            0
        }
        .min(k)
        .max(lo);
        let padded = if inp + pb + pad_end > start {
            (inp + pb + pad_end - start).div_ceil(dil)
        } else {
            0
        }
        .min(k);
        t.lo.push(lo);
        t.hi.push(hi);
        t.padded.push(padded);
    }
    t
}

/// The geometry of one pool call.
struct PoolGeom {
    sp: Spatial3,
    taps: [DimTaps; 3],
    nd: usize,
}

impl PoolGeom {
    /// Input coordinate of tap `k` of output position `o` in dim `d` (tap known valid).
    #[inline(always)]
    fn coord(&self, d: usize, o: usize, k: usize) -> usize {
        o * self.sp.strides[d] + k * self.sp.dilations[d] - self.sp.pad_begin[d]
    }

    /// Visits every output position of a plane with its valid input flat indices.
    #[inline(always)]
    fn for_each_window<A>(
        &self,
        mut init: impl FnMut() -> A,
        mut step: impl FnMut(&mut A, usize, [usize; 3]),
        mut finish: impl FnMut(usize, A, usize, usize),
    ) {
        let sp = &self.sp;
        let [_, ih_n, iw_n] = sp.input;
        let [od_n, oh_n, ow_n] = sp.output;
        let mut oi = 0;
        for od in 0..od_n {
            let (d_lo, d_hi, d_pad) = (
                self.taps[0].lo[od],
                self.taps[0].hi[od],
                self.taps[0].padded[od],
            );
            for oh in 0..oh_n {
                let (h_lo, h_hi, h_pad) = (
                    self.taps[1].lo[oh],
                    self.taps[1].hi[oh],
                    self.taps[1].padded[oh],
                );
                for ow in 0..ow_n {
                    let (w_lo, w_hi, w_pad) = (
                        self.taps[2].lo[ow],
                        self.taps[2].hi[ow],
                        self.taps[2].padded[ow],
                    );
                    let mut acc = init();
                    for kd in d_lo..d_hi {
                        let id = self.coord(0, od, kd);
                        for kh in h_lo..h_hi {
                            let ih = self.coord(1, oh, kh);
                            let row = (id * ih_n + ih) * iw_n;
                            for kw in w_lo..w_hi {
                                let iw = self.coord(2, ow, kw);
                                step(&mut acc, row + iw, [id, ih, iw]);
                            }
                        }
                    }
                    let valid = (d_hi - d_lo) * (h_hi - h_lo) * (w_hi - w_lo);
                    finish(oi, acc, valid, d_pad * h_pad * w_pad);
                    oi += 1;
                }
            }
        }
    }
}

impl PoolGeom {
    /// Max pooling of one plane, values only, output row by output row: every tap is one
    /// pass over the output positions it is valid for, instead of a window visit per
    /// output. Same result as the window visit: each output starts from its first valid
    /// tap and takes any later tap that compares greater (so a leading NaN stays), and an
    /// output without a valid tap is `T::default()`.
    fn max_plane_rows<T: Copy + PartialOrd + Default>(&self, xp: &[T], yp: &mut [T]) {
        let sp = &self.sp;
        let [_, ih_n, iw_n] = sp.input;
        let [od_n, oh_n, ow_n] = sp.output;
        let (sw, kw_n) = (sp.strides[2], sp.kernel[2]);
        let ranges: smallvec::SmallVec<[(usize, usize); 16]> =
            (0..kw_n).map(|kw| sp.valid_range(2, kw)).collect();
        let w_taps = &self.taps[2];
        for od in 0..od_n {
            let (d_lo, d_hi) = (self.taps[0].lo[od], self.taps[0].hi[od]);
            for oh in 0..oh_n {
                let (h_lo, h_hi) = (self.taps[1].lo[oh], self.taps[1].hi[oh]);
                let orow = &mut yp[(od * oh_n + oh) * ow_n..(od * oh_n + oh + 1) * ow_n];
                if d_lo == d_hi || h_lo == h_hi {
                    orow.fill(T::default());
                    continue;
                }
                // The first valid tap of each output: (d_lo, h_lo, its first valid kw).
                let first = (self.coord(0, od, d_lo) * ih_n + self.coord(1, oh, h_lo)) * iw_n;
                for (ow, o) in orow.iter_mut().enumerate() {
                    let (lo, hi) = (w_taps.lo[ow], w_taps.hi[ow]);
                    *o = if lo < hi {
                        xp[first + self.coord(2, ow, lo)]
                    } else {
                        T::default()
                    };
                }
                for kd in d_lo..d_hi {
                    let id = self.coord(0, od, kd);
                    for kh in h_lo..h_hi {
                        let row = (id * ih_n + self.coord(1, oh, kh)) * iw_n;
                        for (kw, &(lo, hi)) in ranges.iter().enumerate() {
                            if lo >= hi {
                                continue;
                            }
                            // Input column of output `lo`; each next output is `sw` further.
                            let c0 = self.coord(2, lo, kw);
                            let src = &xp[row + c0..];
                            // Written as an unconditional select (max instructions, no
                            // branch to mispredict on random data).
                            if sw == 1 {
                                for (o, &v) in orow[lo..hi].iter_mut().zip(src) {
                                    let cur = *o;
                                    *o = if v > cur { v } else { cur };
                                }
                            } else {
                                for (j, o) in orow[lo..hi].iter_mut().enumerate() {
                                    let (v, cur) = (src[j * sw], *o);
                                    *o = if v > cur { v } else { cur };
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Pool {
    fn geometry(&self, xs: &[usize]) -> Result<PoolGeom> {
        if xs.len() < 3 {
            return Err(KilnError::kernel(
                self.name,
                format!("X must have rank ≥ 3 (N, C, spatial...), found {xs:?}"),
            ));
        }
        let sp = self.win.resolve(self.name, &xs[2..], &self.kernel)?;
        let nd = sp.input.len();
        let s3 = sp.to3(self.name)?;
        let mut pad_end = [0; 3];
        pad_end[3 - nd..].copy_from_slice(&sp.pad_end);
        let taps = [
            dim_taps(&s3, pad_end[0], 0),
            dim_taps(&s3, pad_end[1], 1),
            dim_taps(&s3, pad_end[2], 2),
        ];
        Ok(PoolGeom { sp: s3, taps, nd })
    }

    /// [`Self::geometry`], memoised for the last input shape.
    fn cached_geometry(&self, xs: &[usize]) -> Result<CachedPlan<PoolGeom>> {
        let mut key = PlanKey::new();
        key.push_dims(xs);
        self.geometry_cache.get_or_build(&key, || self.geometry(xs))
    }

    fn out_shape(&self, xs: &[usize], g: &PoolGeom) -> Vec<usize> {
        let mut s = xs[..2].to_vec();
        s.extend_from_slice(&g.sp.output[3 - g.nd..]);
        s
    }

    /// Whether `shape` is the output shape of input shape `xs` under `g`.
    fn is_out_shape(xs: &[usize], g: &PoolGeom, shape: &[usize]) -> bool {
        shape.len() == g.nd + 2 && shape[..2] == xs[..2] && shape[2..] == g.sp.output[3 - g.nd..]
    }

    /// Max pooling into `y` (and the argmax indices into `idx` unless it is empty).
    fn max_pool<T: Copy + PartialOrd + Default + Send + Sync>(
        &self,
        x: &[T],
        g: &PoolGeom,
        y: &mut [T],
        idx: &mut [i64],
        col_major: bool,
    ) {
        let (isz, osz) = (g.sp.in_size(), g.sp.out_size());
        if idx.is_empty() {
            // Values only: a two-word accumulator instead of the argmax bookkeeping (same
            // rule: the first valid tap, replaced by any later one that compares greater).
            let body = |pl: usize, yp: &mut [T], _: &mut [i64]| {
                g.max_plane_rows(&x[pl * isz..(pl + 1) * isz], yp);
            };
            run_planes(y, idx, osz, x.len(), body);
            return;
        }
        let [id_n, ih_n, _] = g.sp.input;
        let body = |pl: usize, yp: &mut [T], ip: &mut [i64]| {
            let xp = &x[pl * isz..(pl + 1) * isz];
            g.for_each_window(
                || (None::<T>, 0usize, [0usize; 3]),
                |acc, fi, c| {
                    let v = xp[fi];
                    if acc.0.is_none_or(|b| v > b) {
                        *acc = (Some(v), fi, c);
                    }
                },
                |oi, acc, _, _| {
                    yp[oi] = acc.0.unwrap_or_default();
                    if !ip.is_empty() {
                        ip[oi] = match acc.0 {
                            None => -1,
                            Some(_) => {
                                let [d, h, w] = acc.2;
                                let local = if col_major {
                                    d + id_n * (h + ih_n * w)
                                } else {
                                    acc.1
                                };
                                (pl * isz + local) as i64
                            }
                        };
                    }
                },
            );
        };
        run_planes(y, idx, osz, x.len(), body);
    }

    /// Average or Lp pooling into `y`.
    fn avg_lp_pool<F: Float + Send + Sync>(&self, x: &[F], g: &PoolGeom, y: &mut [F]) {
        let (isz, osz) = (g.sp.in_size(), g.sp.out_size());
        let kind = self.kind;
        let body = |pl: usize, yp: &mut [F], _: &mut [i64]| {
            let xp = &x[pl * isz..(pl + 1) * isz];
            match kind {
                PoolKind::Avg { count_include_pad } => g.for_each_window(
                    F::zero,
                    |acc, fi, _| *acc = *acc + xp[fi],
                    |oi, acc, valid, padded| {
                        let n = if count_include_pad { padded } else { valid };
                        yp[oi] = if n == 0 {
                            F::zero()
                        } else {
                            acc / F::from(n).unwrap_or_else(F::one)
                        };
                    },
                ),
                PoolKind::Lp { p } => {
                    let pf = F::from(p).unwrap_or_else(F::one);
                    let two = p == 2.0;
                    g.for_each_window(
                        F::zero,
                        |acc, fi, _| {
                            let v = xp[fi].abs();
                            *acc = *acc + if two { v * v } else { v.powf(pf) };
                        },
                        |oi, acc, _, _| {
                            yp[oi] = if two {
                                acc.sqrt()
                            } else {
                                acc.powf(pf.recip())
                            }
                        },
                    )
                }
                PoolKind::Max { .. } => {}
            }
        };
        run_planes(y, &mut [], osz, x.len(), body);
    }
}

/// Runs `body(plane, output plane, index plane)` on each plane of `y` (`osz` elements
/// each; index planes are empty when `idx` is), in parallel when `work` is worth it.
fn run_planes<T: Send>(
    y: &mut [T],
    idx: &mut [i64],
    osz: usize,
    work: usize,
    body: impl Fn(usize, &mut [T], &mut [i64]) + Send + Sync,
) {
    let osz = osz.max(1);
    let par = work >= PAR_MIN && y.len() > osz && crate::parallel::threads() > 1;
    match (idx.is_empty(), par) {
        (true, true) => y
            .par_chunks_mut(osz)
            .enumerate()
            .for_each(|(pl, yp)| body(pl, yp, &mut [])),
        (true, false) => y
            .chunks_mut(osz)
            .enumerate()
            .for_each(|(pl, yp)| body(pl, yp, &mut [])),
        (false, true) => y
            .par_chunks_mut(osz)
            .zip(idx.par_chunks_mut(osz))
            .enumerate()
            .for_each(|(pl, (yp, ip))| body(pl, yp, ip)),
        (false, false) => y
            .chunks_mut(osz)
            .zip(idx.chunks_mut(osz))
            .enumerate()
            .for_each(|(pl, (yp, ip))| body(pl, yp, ip)),
    }
}

impl Op for Pool {
    fn op_type(&self) -> &str {
        self.name
    }

    fn infer(&self, inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let dtype = x.and_then(|f| f.dtype);
        let shape = match x.and_then(|f| f.shape.as_ref()) {
            None => None,
            Some(s) if s.len() < 3 => {
                return Err(infer_err(
                    self.name,
                    format!("X must have rank ≥ 3, found {}", s.len()),
                ))
            }
            Some(s) if s.len() - 2 != self.kernel.len() => {
                return Err(infer_err(
                    self.name,
                    format!(
                        "kernel_shape {:?} does not match X rank {}",
                        self.kernel,
                        s.len()
                    ),
                ))
            }
            Some(s) => {
                let mut o = s[..2].to_vec();
                o.extend(self.win.resolve_dims(self.name, &s[2..], &self.kernel)?);
                Some(o)
            }
        };
        let mut out = vec![Fact {
            dtype,
            shape: shape.clone(),
            ..Fact::unknown()
        }];
        if n_outputs > 1 {
            out.push(Fact {
                dtype: Some(DType::I64),
                shape,
                ..Fact::unknown()
            });
        }
        Ok(out)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.name)?;
        let xs = x.shape();
        let g = self.cached_geometry(xs)?;
        let n_out = xs[0] * xs[1] * g.sp.out_size();
        let shape = self.out_shape(xs, &g);
        let dt = x.dtype();
        match self.kind {
            PoolKind::Max { storage_order } => {
                let ok = dt.is_float() || matches!(dt, DType::I8 | DType::U8);
                if !ok {
                    return Err(KilnError::kernel(
                        "MaxPool",
                        format!("unsupported dtype {dt}"),
                    ));
                }
                dispatch_numeric!(dt, T => {
                    let mut y = vec![T::default(); n_out];
                    let mut idx = vec![0i64; if self.with_indices { n_out } else { 0 }];
                    self.max_pool::<T>(x.as_slice::<T>()?, &g, &mut y, &mut idx, storage_order == 1);
                    let mut out = vec![Tensor::from_vec(&shape, y)?.into()];
                    if self.with_indices {
                        out.push(Tensor::from_vec(&shape, idx)?.into());
                    }
                    Ok(out)
                }, _ => Err(KilnError::kernel("MaxPool", format!("unsupported dtype {dt}"))))
            }
            _ => match dt {
                DType::F64 => {
                    let mut y = vec![0f64; n_out];
                    self.avg_lp_pool(x.as_slice::<f64>()?, &g, &mut y);
                    Ok(vec![Tensor::from_vec(&shape, y)?.into()])
                }
                d if d.is_float() => {
                    let mut y = vec![0f32; n_out];
                    match x.as_slice::<f32>() {
                        Ok(xf) => self.avg_lp_pool(xf, &g, &mut y),
                        Err(_) => self.avg_lp_pool(&x.to_f32_vec()?, &g, &mut y),
                    }
                    Ok(vec![Tensor::from_vec(&shape, y)?.cast(d)?.into()])
                }
                d => Err(KilnError::kernel(
                    self.name,
                    format!("X must be a float tensor, found {d}"),
                )),
            },
        }
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = input_tensor(inputs, 0, self.name)?;
        let xs = x.shape();
        let g = self.cached_geometry(xs)?;
        let dt = x.dtype();
        let (first, rest) = outputs.split_at_mut(1.min(outputs.len()));
        let Some(y) = first.first_mut() else {
            return Err(KilnError::kernel(self.name, "no output slot"));
        };
        let idx = rest.first_mut();
        let shapes_ok = y.dtype() == dt
            && Self::is_out_shape(xs, &g, y.shape())
            && idx
                .as_ref()
                .is_none_or(|i| i.dtype() == DType::I64 && Self::is_out_shape(xs, &g, i.shape()));
        let in_place = shapes_ok
            && match self.kind {
                PoolKind::Max { .. } => {
                    matches!(dt, DType::F32 | DType::F64 | DType::I8 | DType::U8)
                }
                _ => matches!(dt, DType::F32 | DType::F64),
            };
        if !in_place {
            let produced = self.eval(inputs)?;
            for (slot, value) in outputs.iter_mut().zip(&produced) {
                slot.copy_from(value.as_tensor()?)?;
            }
            return Ok(());
        }
        match self.kind {
            PoolKind::Max { storage_order } => {
                let mut none: [i64; 0] = [];
                let idx: &mut [i64] = match idx {
                    Some(i) => i.as_mut_slice::<i64>()?,
                    None => &mut none,
                };
                dispatch_numeric!(dt, T => {
                    self.max_pool::<T>(x.as_slice::<T>()?, &g, y.as_mut_slice::<T>()?, idx, storage_order == 1);
                    Ok(())
                }, _ => Err(KilnError::kernel("MaxPool", format!("unsupported dtype {dt}"))))
            }
            _ if dt == DType::F64 => {
                self.avg_lp_pool(x.as_slice::<f64>()?, &g, y.as_mut_slice::<f64>()?);
                Ok(())
            }
            _ => {
                self.avg_lp_pool(x.as_slice::<f32>()?, &g, y.as_mut_slice::<f32>()?);
                Ok(())
            }
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// Global pools

#[derive(Debug, Clone, Copy, PartialEq)]
enum GlobalKind {
    Max,
    Avg,
    Lp(f32),
}

/// GlobalMaxPool, GlobalAveragePool, GlobalLpPool: one value per (n, c) plane.
#[derive(Debug, Clone)]
pub struct GlobalPool {
    kind: GlobalKind,
}

/// GlobalMaxPool / GlobalAveragePool, channels-last when the tuner chose
/// [`NHWC_TACTIC`].
fn build_global(ctx: &BuildCtx, kind: GlobalKind) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    match a.opt_string(kiln_core::tactic::TACTIC_ATTR)?.as_deref() {
        None | Some(LINEAR_TACTIC) => Ok(Box::new(GlobalPool { kind })),
        Some(NHWC_TACTIC) => Ok(Box::new(GlobalPoolNhwc {
            max: kind == GlobalKind::Max,
        })),
        Some(t) => Err(a.invalid(format!(
            "unknown tactic `{t}` (this kiln knows {LINEAR_TACTIC} and {NHWC_TACTIC}); rebuild the plan"
        ))),
    }
}

/// Id of the global pools' linear tactic.
const LINEAR_TACTIC: &str = "cpu.globalpool";

fn build_global_lp_pool(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let p = if ctx.opset() < 2 {
        a.float("p", 2.0)?
    } else {
        a.int("p", 2)? as f32
    };
    if p <= 0.0 {
        return Err(a.invalid(format!("p must be positive, found {p}")));
    }
    Ok(Box::new(GlobalPool {
        kind: GlobalKind::Lp(p),
    }))
}

impl GlobalPool {
    fn name(&self) -> &'static str {
        match self.kind {
            GlobalKind::Max => "GlobalMaxPool",
            GlobalKind::Avg => "GlobalAveragePool",
            GlobalKind::Lp(_) => "GlobalLpPool",
        }
    }

    fn reduce<F: Float + Send + Sync>(&self, x: &[F], planes: usize) -> Vec<F> {
        let mut out = vec![F::zero(); planes];
        self.reduce_into(x, &mut out);
        out
    }

    /// One value per plane of `x` (as many planes as `out` has elements).
    fn reduce_into<F: Float + Send + Sync>(&self, x: &[F], out: &mut [F]) {
        let planes = out.len();
        let sz = x.len().checked_div(planes).unwrap_or(0);
        let f = |p: &[F]| -> F {
            match self.kind {
                GlobalKind::Max => lane_max(p),
                GlobalKind::Avg => lane_sum(p, |v| v) / F::from(p.len()).unwrap_or_else(F::one),
                GlobalKind::Lp(1.0) => lane_sum(p, |v| v.abs()),
                GlobalKind::Lp(2.0) => lane_sum(p, |v| v * v).sqrt(),
                GlobalKind::Lp(pw) => {
                    let pw = F::from(pw).unwrap_or_else(F::one);
                    lane_sum(p, |v| v.abs().powf(pw)).powf(pw.recip())
                }
            }
        };
        if sz == 0 {
            out.fill(F::zero());
            return;
        }
        if x.len() >= PAR_MIN && crate::parallel::threads() > 1 {
            out.par_iter_mut()
                .zip(x.par_chunks(sz))
                .for_each(|(o, p)| *o = f(p));
        } else {
            out.iter_mut()
                .zip(x.chunks(sz))
                .for_each(|(o, p)| *o = f(p));
        }
    }
}

/// Independent accumulators of the plane reductions: enough to hide the add latency and
/// let the compiler keep them in vector registers (the result differs from a sequential
/// sum only by rounding).
const LANES: usize = 8;

/// Sum of `term(v)` over `x`, in [`LANES`] interleaved partial sums.
#[inline]
fn lane_sum<F: Float>(x: &[F], term: impl Fn(F) -> F) -> F {
    let mut acc = [F::zero(); LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = *a + term(v);
        }
    }
    let tail = rest.iter().fold(F::zero(), |a, &v| a + term(v));
    acc.iter().fold(F::zero(), |a, &v| a + v) + tail
}

/// Maximum of `x` (−inf when empty), NaN when any element is NaN, as ONNX
/// GlobalMaxPool propagates it.
#[inline]
fn lane_max<F: Float>(x: &[F]) -> F {
    let mut acc = [F::neg_infinity(); LANES];
    let mut nan = [false; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for ((a, n), &v) in acc.iter_mut().zip(nan.iter_mut()).zip(c) {
            *a = if v > *a { v } else { *a };
            *n |= v.is_nan();
        }
    }
    if nan.iter().any(|&n| n) || rest.iter().any(|v| v.is_nan()) {
        return F::nan();
    }
    acc.iter()
        .chain(rest)
        .fold(F::neg_infinity(), |a, &v| if v > a { v } else { a })
}

impl Op for GlobalPool {
    fn op_type(&self) -> &str {
        self.name()
    }

    fn tactics(&self, inputs: &[Option<&Fact>]) -> Vec<Tactic> {
        // Average and max pools of rank-4 f32 data also run channels-last.
        let x = inputs.first().copied().flatten();
        let rank4_f32 = x.is_some_and(|f| {
            f.dtype == Some(DType::F32) && f.concrete_shape().is_some_and(|s| s.len() == 4)
        });
        if matches!(self.kind, GlobalKind::Lp(_)) || !rank4_f32 {
            return Vec::new();
        }
        vec![
            Tactic::fp32(LINEAR_TACTIC, 1),
            Tactic {
                id: NHWC_TACTIC.into(),
                format: crate::ops::conv::tactics::FP32_NHWC,
                min_level: 1,
            },
        ]
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let shape = match x.and_then(|f| f.shape.as_ref()) {
            None => None,
            Some(s) if s.len() < 2 => return Err(infer_err(self.name(), "X must have rank ≥ 2")),
            Some(s) => Some(
                s.iter()
                    .enumerate()
                    .map(|(i, d)| if i < 2 { d.clone() } else { Dim::Known(1) })
                    .collect(),
            ),
        };
        Ok(vec![Fact {
            dtype: x.and_then(|f| f.dtype),
            shape,
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.name())?;
        let xs = x.shape();
        if xs.len() < 2 {
            return Err(KilnError::kernel(
                self.name(),
                format!("X must have rank ≥ 2, found {xs:?}"),
            ));
        }
        let shape: Vec<usize> = xs
            .iter()
            .enumerate()
            .map(|(i, &d)| if i < 2 { d } else { 1 })
            .collect();
        let planes = xs[0] * xs[1];
        let t = match x.dtype() {
            DType::F32 => Tensor::from_vec(&shape, self.reduce(x.as_slice::<f32>()?, planes))?,
            DType::F64 => Tensor::from_vec(&shape, self.reduce(x.as_slice::<f64>()?, planes))?,
            d if d.is_float() => {
                Tensor::from_vec(&shape, self.reduce(&x.to_f32_vec()?, planes))?.cast(d)?
            }
            d => {
                return Err(KilnError::kernel(
                    self.name(),
                    format!("X must be a float tensor, found {d}"),
                ))
            }
        };
        Ok(vec![t.into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = input_tensor(inputs, 0, self.name())?;
        let xs = x.shape();
        let Some(out) = outputs.first_mut() else {
            return Err(KilnError::kernel(self.name(), "no output slot"));
        };
        let fits = xs.len() >= 2
            && out.dtype() == x.dtype()
            && out.shape().len() == xs.len()
            && out.shape()[..2] == xs[..2]
            && out.shape()[2..].iter().all(|&d| d == 1);
        match x.dtype() {
            DType::F32 if fits => self.reduce_into(x.as_slice::<f32>()?, out.as_mut_slice()?),
            DType::F64 if fits => self.reduce_into(x.as_slice::<f64>()?, out.as_mut_slice()?),
            _ => {
                // Other dtypes (and mismatches, which the reference reports) go through it.
                let v = self.eval(inputs)?;
                out.copy_from(v[0].as_tensor()?)?;
            }
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// MaxUnpool

/// MaxUnpool: scatters values to the positions MaxPool's indices name.
#[derive(Debug, Clone)]
pub struct MaxUnpool {
    kernel: Vec<usize>,
    strides: Option<Vec<usize>>,
    pads: Option<Vec<usize>>,
}

fn build_max_unpool(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let win = WindowAttrs::parse(&a)?;
    let kernel = win
        .kernel_shape
        .ok_or_else(|| a.invalid("MaxUnpool requires kernel_shape"))?;
    Ok(Box::new(MaxUnpool {
        kernel,
        strides: win.strides,
        pads: win.pads,
    }))
}

impl MaxUnpool {
    fn inferred(&self, xs: &[usize]) -> Result<Vec<usize>> {
        let nd = self.kernel.len();
        if xs.len() != nd + 2 {
            return Err(KilnError::kernel(
                "MaxUnpool",
                format!("X {xs:?} does not match kernel_shape {:?}", self.kernel),
            ));
        }
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; nd]);
        let pads = self.pads.clone().unwrap_or_else(|| vec![0; 2 * nd]);
        if strides.len() != nd || pads.len() != 2 * nd {
            return Err(KilnError::kernel(
                "MaxUnpool",
                "strides/pads do not match kernel_shape",
            ));
        }
        let mut out = xs[..2].to_vec();
        for i in 0..nd {
            let v = (xs[i + 2].saturating_sub(1) as i128) * strides[i] as i128
                + self.kernel[i] as i128
                - pads[i] as i128
                - pads[i + nd] as i128;
            out.push(usize::try_from(v).map_err(|_| {
                KilnError::kernel("MaxUnpool", format!("negative output size in dim {i}"))
            })?);
        }
        Ok(out)
    }
}

impl Op for MaxUnpool {
    fn op_type(&self) -> &str {
        "MaxUnpool"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let dtype = x.and_then(|f| f.dtype);
        if inputs.get(2).copied().flatten().is_some() {
            let konst = inputs[2]
                .and_then(|f| f.konst.as_ref())
                .map(|t| t.to_i64_vec())
                .transpose()?;
            let shape = konst.map(|v| {
                v.iter()
                    .map(|&d| usize::try_from(d).map(Dim::Known).unwrap_or(Dim::Unknown))
                    .collect()
            });
            return Ok(vec![Fact {
                dtype,
                shape,
                ..Fact::unknown()
            }]);
        }
        let shape = match x.and_then(|f| f.concrete_shape()) {
            Some(s) => Some(self.inferred(&s)?.into_iter().map(Dim::Known).collect()),
            None => None,
        };
        Ok(vec![Fact {
            dtype,
            shape,
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "MaxUnpool")?;
        let ind = input_tensor(inputs, 1, "MaxUnpool")?;
        if ind.shape() != x.shape() {
            return Err(KilnError::kernel(
                "MaxUnpool",
                format!(
                    "I {:?} must have the shape of X {:?}",
                    ind.shape(),
                    x.shape()
                ),
            ));
        }
        let inferred = self.inferred(x.shape())?;
        let shape = match optional_tensor(inputs, 2, "MaxUnpool")? {
            None => inferred.clone(),
            Some(t) => t
                .to_i64_vec()?
                .iter()
                .map(|&d| {
                    usize::try_from(d).map_err(|_| {
                        KilnError::kernel("MaxUnpool", format!("negative output_shape {d}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        if shape.len() != inferred.len() || shape.iter().zip(&inferred).any(|(a, b)| a < b) {
            return Err(KilnError::kernel(
                "MaxUnpool",
                format!("output_shape {shape:?} is smaller than the unpooled shape {inferred:?}"),
            ));
        }
        let idx = ind.to_i64_vec()?;
        let total: usize = inferred.iter().product();
        crate::dispatch_pod!(x.dtype(), T => {
            let xv = x.as_raw::<T>()?;
            let mut y = vec![T::default(); total];
            for (&i, &v) in idx.iter().zip(xv) {
                let i = usize::try_from(i).ok().filter(|&i| i < total)
                    .ok_or_else(|| KilnError::kernel("MaxUnpool", format!("index {i} is out of range for {inferred:?}")))?;
                y[i] = v;
            }
            // Embed the unpooled tensor in the top-left corner of output_shape.
            let out = embed(&y, &inferred, &shape);
            Ok(vec![Tensor::from_raw(x.dtype(), &shape, &out)?.into()])
        }, _ => Err(KilnError::kernel("MaxUnpool", "string tensors are not supported")))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Copies `src` (shape `from`) into the leading corner of a zero tensor of shape `to`.
fn embed<T: Copy + Default>(src: &[T], from: &[usize], to: &[usize]) -> Vec<T> {
    if from == to {
        return src.to_vec();
    }
    let mut out = vec![T::default(); to.iter().product()];
    let last = *from.last().unwrap_or(&1);
    let rows = src.len().checked_div(last).unwrap_or(0);
    let mut idx = vec![0usize; from.len().saturating_sub(1)];
    for r in 0..rows {
        let mut off = 0;
        for (d, &i) in idx.iter().enumerate() {
            off = off * to[d] + i;
        }
        off *= to[to.len() - 1];
        out[off..off + last].copy_from_slice(&src[r * last..(r + 1) * last]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < from[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests;
