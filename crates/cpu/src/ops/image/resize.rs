//! `Resize` (opsets 10, 11, 13, 18, 19) and `Upsample` (opsets 7, 9, 10).
//!
//! Semantics follow ONNX's reference implementation (`onnx/reference/ops/op_resize.py`):
//! every resized axis gets a table of taps (source index, weight) per output index; the
//! interpolation is separable, so the kernel applies one pass per resized axis, innermost
//! axis first (the order the reference combines them in). Nearest resizes of any dtype
//! are pure gathers on raw bytes; other modes compute in f32 (f64 for f64 inputs, and for
//! integer inputs, rounded and saturated on the way back as the reference does).
//! Passes run in parallel over the outer dimensions (N×C for NCHW images).

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result,
    Tensor, TensorMut, Value,
};
use rayon::prelude::*;

use crate::plan_cache::{PlanCache, PlanKey};
use crate::scratch::with_scratch;

/// Registers `Resize` and `Upsample`.
pub fn register(reg: &mut OpRegistry) {
    reg.register("Resize", build_resize);
    reg.register("Upsample", build_upsample);
}

/// Interpolation mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Nearest neighbour.
    Nearest,
    /// (Multi-)linear.
    Linear,
    /// Cubic convolution.
    Cubic,
}

/// How output coordinates map back to input coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ctm {
    /// (x + 0.5) / scale − 0.5.
    HalfPixel,
    /// half_pixel, centred for non-integer output sizes.
    HalfPixelSymmetric,
    /// half_pixel, but −0.5 for an output length of 1.
    PytorchHalfPixel,
    /// x · (in − 1) / (out − 1).
    AlignCorners,
    /// x / scale.
    Asymmetric,
    /// (x + 0.5) / scale (opset 11 only).
    TfHalfPixelForNn,
    /// Crop by `roi`, extrapolate outside.
    TfCropAndResize,
}

/// Rounding of nearest mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NearestMode {
    /// Round, ties down.
    RoundPreferFloor,
    /// Round, ties up.
    RoundPreferCeil,
    /// Floor.
    Floor,
    /// Ceil.
    Ceil,
    /// Opset ≤ 10 (and `Upsample`): floor when upsampling, ceil when downsampling.
    Simple,
}

/// `keep_aspect_ratio_policy`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AspectPolicy {
    /// Use the sizes as given.
    Stretch,
    /// One scale for all axes, the smallest.
    NotLarger,
    /// One scale for all axes, the largest.
    NotSmaller,
}

/// `Resize` / `Upsample` with parsed attributes.
#[derive(Debug, Clone)]
pub struct Resize {
    op_name: &'static str,
    /// Inputs are (X, scales) rather than (X, roi, scales, sizes).
    legacy: bool,
    /// `Upsample-7` scales attribute.
    scales_attr: Option<Vec<f32>>,
    /// Interpolation mode.
    pub mode: Mode,
    /// Coordinate transformation.
    pub ctm: Ctm,
    /// Nearest rounding.
    pub nearest: NearestMode,
    /// Cubic coefficient A.
    pub cubic_a: f64,
    /// Zero weights of taps outside the input, renormalize.
    pub exclude_outside: bool,
    /// Value for points outside the crop in tf_crop_and_resize.
    pub extrapolation: f64,
    /// Antialiasing filter when downscaling (linear, cubic).
    pub antialias: bool,
    /// Axes the scales/sizes/roi refer to.
    pub axes: Option<Vec<i64>>,
    /// Aspect-ratio policy for sizes.
    pub policy: AspectPolicy,
    /// The last call's plan (tap tables per axis), reused while shapes and parameters
    /// stay the same.
    plan_cache: PlanCache<ResizePlan>,
}

/// What one Resize call computes for one input shape and parameter set.
#[derive(Debug)]
struct ResizePlan {
    out_shape: Vec<usize>,
    /// Per axis, the tap table, or `None` where the axis is unchanged.
    axes: Vec<Option<AxisPlan>>,
    /// Every resized axis is a pure gather (nearest with in-range taps).
    gather: bool,
}

fn parse_mode(a: &kiln_core::AttrReader, legacy: bool) -> Result<Mode> {
    Ok(
        match a.string("mode", "nearest")?.to_ascii_lowercase().as_str() {
            "nearest" => Mode::Nearest,
            "linear" | "bilinear" | "trilinear" => Mode::Linear,
            "cubic" if !legacy => Mode::Cubic,
            other => return Err(a.invalid(format!("unsupported mode {other:?}"))),
        },
    )
}

fn build_resize(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let legacy = ctx.opset() < 11;
    let mode = parse_mode(&a, legacy)?;
    let (ctm, nearest) = if legacy {
        (Ctm::Asymmetric, NearestMode::Simple)
    } else {
        let ctm = match a
            .string("coordinate_transformation_mode", "half_pixel")?
            .as_str()
        {
            "half_pixel" => Ctm::HalfPixel,
            "half_pixel_symmetric" => Ctm::HalfPixelSymmetric,
            "pytorch_half_pixel" => Ctm::PytorchHalfPixel,
            "align_corners" => Ctm::AlignCorners,
            "asymmetric" => Ctm::Asymmetric,
            "tf_half_pixel_for_nn" => Ctm::TfHalfPixelForNn,
            "tf_crop_and_resize" => Ctm::TfCropAndResize,
            other => {
                return Err(a.invalid(format!("unknown coordinate_transformation_mode {other:?}")))
            }
        };
        let nearest = match a.string("nearest_mode", "round_prefer_floor")?.as_str() {
            "round_prefer_floor" => NearestMode::RoundPreferFloor,
            "round_prefer_ceil" => NearestMode::RoundPreferCeil,
            "floor" => NearestMode::Floor,
            "ceil" => NearestMode::Ceil,
            other => return Err(a.invalid(format!("unknown nearest_mode {other:?}"))),
        };
        (ctm, nearest)
    };
    let policy = match a.string("keep_aspect_ratio_policy", "stretch")?.as_str() {
        "stretch" => AspectPolicy::Stretch,
        "not_larger" => AspectPolicy::NotLarger,
        "not_smaller" => AspectPolicy::NotSmaller,
        other => return Err(a.invalid(format!("unknown keep_aspect_ratio_policy {other:?}"))),
    };
    Ok(Box::new(Resize {
        op_name: "Resize",
        legacy,
        scales_attr: None,
        mode,
        ctm,
        nearest,
        cubic_a: a.float("cubic_coeff_a", -0.75)? as f64,
        exclude_outside: a.int("exclude_outside", 0)? != 0,
        extrapolation: a.float("extrapolation_value", 0.0)? as f64,
        antialias: a.int("antialias", 0)? != 0,
        axes: a.opt_ints("axes")?,
        policy,
        plan_cache: PlanCache::default(),
    }))
}

fn build_upsample(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let mode = parse_mode(&a, true)?;
    let scales_attr = if ctx.opset() < 9 {
        Some(
            a.opt_floats("scales")?
                .ok_or_else(|| a.invalid("Upsample-7 needs the scales attribute"))?,
        )
    } else {
        None
    };
    Ok(Box::new(Resize {
        op_name: "Upsample",
        legacy: true,
        scales_attr,
        mode,
        ctm: Ctm::Asymmetric,
        nearest: NearestMode::Simple,
        cubic_a: -0.75,
        exclude_outside: false,
        extrapolation: 0.0,
        antialias: false,
        axes: None,
        policy: AspectPolicy::Stretch,
        plan_cache: PlanCache::default(),
    }))
}

// ---------------------------------------------------------------------------------------
// Per-axis tap tables
// ---------------------------------------------------------------------------------------

/// The taps of one axis: output `y` reads `taps[start[y]..start[y+1]]`, or the
/// extrapolation value when `extrap[y]`.
#[derive(Debug, Clone)]
struct AxisPlan {
    in_len: usize,
    out_len: usize,
    start: Vec<usize>,
    taps: Vec<(usize, f64)>,
    extrap: Vec<bool>,
}

impl AxisPlan {
    fn is_identity(&self) -> bool {
        self.in_len == self.out_len
            && !self.extrap.iter().any(|&e| e)
            && (0..self.out_len).all(|y| {
                let t = &self.taps[self.start[y]..self.start[y + 1]];
                t.len() == 1 && t[0].0 == y && t[0].1 == 1.0
            })
    }

    fn is_gather(&self) -> bool {
        !self.extrap.iter().any(|&e| e)
            && (0..self.out_len).all(|y| {
                let t = &self.taps[self.start[y]..self.start[y + 1]];
                t.len() == 1 && t[0].1 == 1.0
            })
    }
}

fn cubic_coeffs(r: f64, a: f64) -> Vec<f64> {
    vec![
        ((a * (r + 1.0) - 5.0 * a) * (r + 1.0) + 8.0 * a) * (r + 1.0) - 4.0 * a,
        ((a + 2.0) * r - (a + 3.0)) * r * r + 1.0,
        ((a + 2.0) * (1.0 - r) - (a + 3.0)) * (1.0 - r) * (1.0 - r) + 1.0,
        ((a * ((1.0 - r) + 1.0) - 5.0 * a) * ((1.0 - r) + 1.0) + 8.0 * a) * ((1.0 - r) + 1.0)
            - 4.0 * a,
    ]
}

fn cubic_coeffs_antialias(r: f64, scale: f64, a: f64) -> Vec<f64> {
    let scale = scale.min(1.0);
    let k = |x: f64| {
        let x = x.abs();
        let (x2, x3) = (x * x, x * x * x);
        if x <= 1.0 {
            (a + 2.0) * x3 - (a + 3.0) * x2 + 1.0
        } else if x < 2.0 {
            a * x3 - 5.0 * a * x2 + 8.0 * a * x - 4.0 * a
        } else {
            0.0
        }
    };
    let i_start = (-2.0 / scale).floor() as i64 + 1;
    let i_end = 2 - i_start;
    let c: Vec<f64> = (i_start..i_end)
        .map(|i| k(scale * (i as f64 - r)))
        .collect();
    let s: f64 = c.iter().sum();
    c.into_iter().map(|v| v / s).collect()
}

fn linear_coeffs_antialias(r: f64, scale: f64) -> Vec<f64> {
    let scale = scale.min(1.0);
    let start = (-1.0 / scale).floor() as i64 + 1;
    let footprint = 2 - 2 * start;
    let c: Vec<f64> = (start..start + footprint)
        .map(|i| (1.0 - ((i as f64 - r) * scale).abs()).clamp(0.0, 1.0))
        .collect();
    let s: f64 = c.iter().sum();
    c.into_iter().map(|v| v / s).collect()
}

impl Resize {
    fn err(&self, msg: impl Into<String>) -> KilnError {
        KilnError::kernel(self.op_name, msg)
    }

    fn coeffs(&self, ratio: f64, scale: f64) -> Vec<f64> {
        match self.mode {
            Mode::Nearest => {
                if ratio == 1.0 {
                    return vec![0.0, 1.0];
                }
                let first = match self.nearest {
                    NearestMode::RoundPreferFloor => ratio <= 0.5,
                    NearestMode::RoundPreferCeil => ratio < 0.5,
                    NearestMode::Floor => true,
                    NearestMode::Ceil => false,
                    NearestMode::Simple => scale >= 1.0,
                };
                if first {
                    vec![1.0, 0.0]
                } else {
                    vec![0.0, 1.0]
                }
            }
            Mode::Linear if self.antialias => linear_coeffs_antialias(ratio, scale),
            Mode::Linear => vec![1.0 - ratio, ratio],
            Mode::Cubic if self.antialias => cubic_coeffs_antialias(ratio, scale, self.cubic_a),
            Mode::Cubic => cubic_coeffs(ratio, self.cubic_a),
        }
    }

    /// The input coordinate of output index `x`, or `None` to extrapolate.
    fn original_coord(
        &self,
        x: f64,
        in_len: usize,
        out_len: usize,
        scale: f64,
        roi: (f64, f64),
    ) -> Option<f64> {
        let input_width = in_len as f64;
        let output_width = scale * input_width;
        Some(match self.ctm {
            Ctm::AlignCorners => {
                if output_width == 1.0 {
                    0.0
                } else {
                    x * (input_width - 1.0) / (output_width - 1.0)
                }
            }
            Ctm::Asymmetric => x / scale,
            Ctm::TfCropAndResize => {
                let v = if output_width == 1.0 {
                    (roi.1 - roi.0) * (input_width - 1.0) / 2.0
                } else {
                    x * (roi.1 - roi.0) * (input_width - 1.0) / (output_width - 1.0)
                } + roi.0 * (input_width - 1.0);
                if v < 0.0 || v > input_width - 1.0 {
                    return None;
                }
                v
            }
            Ctm::PytorchHalfPixel => {
                if output_width == 1.0 {
                    -0.5
                } else {
                    (x + 0.5) / scale - 0.5
                }
            }
            Ctm::HalfPixel => (x + 0.5) / scale - 0.5,
            Ctm::HalfPixelSymmetric => {
                let adjustment = out_len as f64 / output_width;
                let center = input_width / 2.0;
                let offset = center * (1.0 - adjustment);
                offset + (x + 0.5) / scale - 0.5
            }
            Ctm::TfHalfPixelForNn => (x + 0.5) / scale,
        })
    }

    fn axis_plan(
        &self,
        in_len: usize,
        out_len: usize,
        scale: f64,
        roi: (f64, f64),
    ) -> Result<AxisPlan> {
        if in_len == 0 && out_len > 0 {
            return Err(self.err("cannot resize an empty axis to a non-empty one"));
        }
        let mut plan = AxisPlan {
            in_len,
            out_len,
            start: Vec::with_capacity(out_len + 1),
            taps: Vec::with_capacity(out_len * 2),
            extrap: vec![false; out_len],
        };
        plan.start.push(0);
        for y in 0..out_len {
            match self.original_coord(y as f64, in_len, out_len, scale, roi) {
                None => plan.extrap[y] = true,
                Some(x) => {
                    let fl = x.floor();
                    let (base, ratio) = if x == fl {
                        (fl as i64 - 1, 1.0)
                    } else {
                        (fl as i64, x - fl)
                    };
                    let mut c = self.coeffs(ratio, scale);
                    let n = c.len() as i64;
                    let first = base - (n / 2 - 1);
                    if self.exclude_outside {
                        for (k, w) in c.iter_mut().enumerate() {
                            let idx = first + k as i64;
                            if idx < 0 || idx >= in_len as i64 {
                                *w = 0.0;
                            }
                        }
                        let s: f64 = c.iter().sum();
                        c.iter_mut().for_each(|w| *w /= s);
                    }
                    for (k, &w) in c.iter().enumerate() {
                        if w == 0.0 {
                            continue;
                        }
                        let idx = (first + k as i64).clamp(0, in_len as i64 - 1) as usize;
                        plan.taps.push((idx, w));
                    }
                }
            }
            plan.start.push(plan.taps.len());
        }
        Ok(plan)
    }
}

// ---------------------------------------------------------------------------------------
// Sizes, scales, roi
// ---------------------------------------------------------------------------------------

/// What the inputs say about the output: per axis (all axes) output size, scale and roi.
struct Resolved {
    out_shape: Vec<usize>,
    scales: Vec<f64>,
    roi: Vec<(f64, f64)>,
}

impl Resize {
    fn norm_axes(&self, rank: usize) -> Result<Vec<usize>> {
        match &self.axes {
            None => Ok((0..rank).collect()),
            Some(ax) => {
                let mut out = Vec::with_capacity(ax.len());
                for &a in ax {
                    let v = if a < 0 { a + rank as i64 } else { a };
                    if v < 0 || v >= rank as i64 {
                        return Err(self.err(format!("axis {a} is out of range for rank {rank}")));
                    }
                    if out.contains(&(v as usize)) {
                        return Err(self.err(format!("axis {a} appears twice in axes")));
                    }
                    out.push(v as usize);
                }
                Ok(out)
            }
        }
    }

    fn resolve(
        &self,
        in_shape: &[usize],
        roi: Option<Vec<f64>>,
        scales: Option<Vec<f64>>,
        sizes: Option<Vec<i64>>,
    ) -> Result<Resolved> {
        let rank = in_shape.len();
        let axes = self.norm_axes(rank)?;
        let mut out_shape = in_shape.to_vec();
        let mut full_scales = vec![1.0f64; rank];
        match (scales, sizes) {
            (Some(s), None) => {
                if s.len() != axes.len() {
                    return Err(self.err(format!(
                        "scales has {} values, expected {}",
                        s.len(),
                        axes.len()
                    )));
                }
                for (&ax, &v) in axes.iter().zip(&s) {
                    if v.is_nan() || v <= 0.0 || !v.is_finite() {
                        return Err(
                            self.err(format!("scales must be positive and finite, got {v}"))
                        );
                    }
                    full_scales[ax] = v;
                    let o = v * in_shape[ax] as f64;
                    if o >= (1u64 << 48) as f64 {
                        return Err(self.err(format!("output size {o} is too large")));
                    }
                    out_shape[ax] = o as usize;
                }
            }
            (None, Some(sz)) => {
                if sz.len() != axes.len() {
                    return Err(self.err(format!(
                        "sizes has {} values, expected {}",
                        sz.len(),
                        axes.len()
                    )));
                }
                for &v in &sz {
                    if !(0..1i64 << 48).contains(&v) {
                        return Err(self.err(format!("sizes must be non-negative, got {v}")));
                    }
                }
                let ratios: Vec<f64> = axes
                    .iter()
                    .zip(&sz)
                    .map(|(&ax, &v)| v as f64 / in_shape[ax] as f64)
                    .collect();
                match self.policy {
                    AspectPolicy::Stretch => {
                        for ((&ax, &v), &r) in axes.iter().zip(&sz).zip(&ratios) {
                            full_scales[ax] = r;
                            out_shape[ax] = v as usize;
                        }
                    }
                    policy => {
                        let s = if policy == AspectPolicy::NotLarger {
                            ratios.iter().copied().fold(f64::INFINITY, f64::min)
                        } else {
                            ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                        };
                        for &ax in &axes {
                            full_scales[ax] = s;
                            out_shape[ax] = (s * in_shape[ax] as f64 + 0.5) as usize;
                        }
                    }
                }
                for &ax in &axes {
                    if in_shape[ax] == 0 && out_shape[ax] != 0 {
                        return Err(self.err("cannot resize an empty axis to a non-empty one"));
                    }
                }
            }
            (Some(_), Some(_)) => return Err(self.err("only one of scales and sizes may be given")),
            (None, None) => return Err(self.err("one of scales and sizes must be given")),
        }
        let mut full_roi = vec![(0.0, 1.0); rank];
        if self.ctm == Ctm::TfCropAndResize {
            let r = roi.ok_or_else(|| self.err("tf_crop_and_resize needs the roi input"))?;
            if r.len() != 2 * axes.len() {
                return Err(self.err(format!(
                    "roi has {} values, expected {}",
                    r.len(),
                    2 * axes.len()
                )));
            }
            let n = axes.len();
            for (i, &ax) in axes.iter().enumerate() {
                full_roi[ax] = (r[i], r[n + i]);
            }
        }
        Ok(Resolved {
            out_shape,
            scales: full_scales,
            roi: full_roi,
        })
    }

    /// Reads roi / scales / sizes from the inputs (empty tensors count as absent).
    #[allow(clippy::type_complexity)] // three independent optional parameter lists
    fn read_params(
        &self,
        inputs: &[Option<&Value>],
    ) -> Result<(Option<Vec<f64>>, Option<Vec<f64>>, Option<Vec<i64>>)> {
        let op = self.op_name;
        if self.legacy {
            let scales = match &self.scales_attr {
                Some(s) => s.iter().map(|&v| v as f64).collect(),
                None => input_tensor(inputs, 1, op)?
                    .to_f64_vec()
                    .map_err(|e| self.err(format!("scales: {e}")))?,
            };
            return Ok((None, Some(scales), None));
        }
        let roi = match non_empty(optional_tensor(inputs, 1, op)?) {
            Some(t) => Some(t.to_f64_vec().map_err(|e| self.err(format!("roi: {e}")))?),
            None => None,
        };
        let scales = match non_empty(optional_tensor(inputs, 2, op)?) {
            Some(t) => {
                if !t.dtype().is_float() {
                    return Err(self.err(format!(
                        "scales must be a float tensor, found {}",
                        t.dtype()
                    )));
                }
                Some(t.to_f64_vec()?)
            }
            None => None,
        };
        let sizes = match non_empty(optional_tensor(inputs, 3, op)?) {
            Some(t) => Some(
                t.to_i64_vec()
                    .map_err(|e| self.err(format!("sizes: {e}")))?,
            ),
            None => None,
        };
        Ok((roi, scales, sizes))
    }
}

fn non_empty(t: Option<&Tensor>) -> Option<&Tensor> {
    t.filter(|t| !t.is_empty())
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

/// Elements per rayon task.
const TASK: usize = 1 << 14;

/// A gather pass along one axis: `src` is `[outer, in_len, inner]`, `dst` is
/// `[outer, out_len, inner]`.
fn gather_pass<T: Copy + Send + Sync>(
    src: &[T],
    outer: usize,
    inner: usize,
    plan: &AxisPlan,
    dst: &mut [T],
) {
    let (il, ol) = (plan.in_len, plan.out_len);
    let block = ol * inner;
    if block == 0 {
        return;
    }
    let source = |y: usize| plan.taps[plan.start[y]].0;
    let body = |o: usize, dst: &mut [T]| {
        let s = &src[o * il * inner..(o + 1) * il * inner];
        if inner == 1 {
            for (y, d) in dst.iter_mut().enumerate() {
                *d = s[source(y)];
            }
        } else {
            for (y, d) in dst.chunks_exact_mut(inner).enumerate() {
                let i = source(y);
                d.copy_from_slice(&s[i * inner..(i + 1) * inner]);
            }
        }
    };
    for_each_block(&mut dst[..outer * block], block, body);
}

/// Runs `body(o, block)` for every `block`-long chunk of `dst`, in parallel when large.
fn for_each_block<T: Send>(dst: &mut [T], block: usize, body: impl Fn(usize, &mut [T]) + Sync) {
    if dst.len() >= 2 * TASK && crate::parallel::enabled() {
        let per = (TASK / block).max(1);
        dst.par_chunks_mut(per * block)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (k, d) in chunk.chunks_mut(block).enumerate() {
                    body(c * per + k, d);
                }
            });
    } else {
        for (o, d) in dst.chunks_mut(block).enumerate() {
            body(o, d);
        }
    }
}

/// An interpolation pass along one axis: `src` is `[outer, in_len, inner]`, `dst` is
/// `[outer, out_len, inner]`; `ev` fills extrapolated points.
fn interp_pass<T: num_traits::Float + Send + Sync>(
    src: &[T],
    outer: usize,
    inner: usize,
    plan: &AxisPlan,
    ev: T,
    dst: &mut [T],
) {
    let (il, ol) = (plan.in_len, plan.out_len);
    let block = ol * inner;
    if block == 0 {
        return;
    }
    let weight = |w: f64| T::from(w).unwrap_or_else(T::nan);
    let body = |o: usize, dst: &mut [T]| {
        let s = &src[o * il * inner..(o + 1) * il * inner];
        for (y, d) in dst.chunks_exact_mut(inner).enumerate() {
            if plan.extrap[y] {
                d.fill(ev);
                continue;
            }
            let t = &plan.taps[plan.start[y]..plan.start[y + 1]];
            if inner == 1 {
                d[0] = t
                    .iter()
                    .fold(T::zero(), |acc, &(i, w)| acc + weight(w) * s[i]);
                continue;
            }
            match t {
                [(i, w)] if *w == 1.0 => d.copy_from_slice(&s[i * inner..(i + 1) * inner]),
                _ => {
                    d.fill(T::zero());
                    for &(i, w) in t {
                        let w = weight(w);
                        let row = &s[i * inner..(i + 1) * inner];
                        d.iter_mut()
                            .zip(row)
                            .for_each(|(dv, &sv)| *dv = *dv + w * sv);
                    }
                }
            }
        }
    };
    for_each_block(&mut dst[..outer * block], block, body);
}

/// Applies the non-identity axis plans, innermost axis first, from `src` (shape
/// `in_shape`) into `dst` (shape `out_shape`). Intermediate results live in thread-local
/// scratch, so a warm call allocates nothing.
fn run_passes_into<T, F>(
    src: &[T],
    in_shape: &[usize],
    out_shape: &[usize],
    plans: &[Option<AxisPlan>],
    dst: &mut [T],
    pass: F,
) where
    T: bytemuck::Pod,
    F: Fn(&[T], usize, usize, &AxisPlan, &mut [T]),
{
    let rank = in_shape.len();
    // (axis, outer, inner, elements after the pass), innermost axis first.
    let step = |ax: usize| {
        let outer: usize = in_shape[..ax].iter().product();
        let inner: usize = out_shape[ax + 1..].iter().product();
        (outer, inner, outer * out_shape[ax] * inner)
    };
    let active = || (0..rank).rev().filter(|&ax| plans[ax].is_some());
    let n = active().count();
    if n == 0 {
        dst.copy_from_slice(src);
        return;
    }
    let scratch_len = active().take(n - 1).map(|ax| step(ax).2).max().unwrap_or(0);
    let second_len = if n > 2 { scratch_len } else { 0 };
    with_scratch::<T, _>(scratch_len, |a| {
        with_scratch::<T, _>(second_len, |b| {
            for (j, ax) in active().enumerate() {
                let plan = plans[ax].as_ref().expect("active axes have plans");
                let (outer, inner, len) = step(ax);
                let last = j + 1 == n;
                // Pass j reads pass j-1's result (the input for j = 0) and writes into
                // a, b, a, … in turn, the last pass into `dst`.
                let (from, to): (&[T], &mut [T]) = match (j % 2, last) {
                    (0, true) if j == 0 => (src, &mut *dst),
                    (0, true) => (&b[..], &mut *dst),
                    (1, true) => (&a[..], &mut *dst),
                    (0, false) if j == 0 => (src, &mut a[..len]),
                    (0, false) => (&b[..], &mut a[..len]),
                    _ => (&a[..], &mut b[..len]),
                };
                pass(from, outer, inner, plan, to);
            }
        })
    });
}

impl Resize {
    fn plans(&self, in_shape: &[usize], r: &Resolved) -> Result<Vec<Option<AxisPlan>>> {
        let mut plans = Vec::with_capacity(in_shape.len());
        for (ax, &len) in in_shape.iter().enumerate() {
            let p = self.axis_plan(len, r.out_shape[ax], r.scales[ax], r.roi[ax])?;
            plans.push(if p.is_identity() { None } else { Some(p) });
        }
        Ok(plans)
    }

    /// The plan for this call's input shape and parameters (cached across calls).
    fn plan(
        &self,
        x: &Tensor,
        inputs: &[Option<&Value>],
    ) -> Result<crate::plan_cache::CachedPlan<ResizePlan>> {
        let mut key = PlanKey::new();
        key.push_dims(x.shape());
        let first_param = if self.legacy && self.scales_attr.is_some() {
            inputs.len()
        } else {
            1
        };
        for i in first_param..inputs.len().min(4) {
            key.push_tensor(optional_tensor(inputs, i, self.op_name)?);
        }
        self.plan_cache.get_or_build(&key, || {
            let (roi, scales, sizes) = self.read_params(inputs)?;
            let r = self.resolve(x.shape(), roi, scales, sizes)?;
            let n_out = r
                .out_shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d));
            if n_out.is_none_or(|n| n > (1usize << 40)) {
                return Err(self.err(format!("output shape {:?} is too large", r.out_shape)));
            }
            let axes = if x.is_empty() || n_out == Some(0) {
                vec![None; x.shape().len()]
            } else {
                self.plans(x.shape(), &r)?
            };
            let gather = axes.iter().flatten().all(|p| p.is_gather());
            Ok(ResizePlan {
                out_shape: r.out_shape,
                axes,
                gather,
            })
        })
    }

    /// Computes into `out` (already of the plan's shape and `x`'s dtype) when a kernel
    /// writes this dtype in place; returns false otherwise.
    fn run_into(&self, x: &Tensor, p: &ResizePlan, out: &mut TensorMut<'_>) -> Result<bool> {
        if x.is_empty() || p.out_shape.contains(&0) {
            return Ok(false);
        }
        let (in_shape, out_shape) = (x.shape(), &p.out_shape[..]);
        if p.gather && x.dtype() != DType::String {
            crate::dispatch_pod!(x.dtype(), T => {
                run_passes_into(x.as_raw::<T>()?, in_shape, out_shape, &p.axes,
                    out.as_raw_mut::<T>()?, gather_pass);
            }, _ => return Ok(false));
            return Ok(true);
        }
        match x.dtype() {
            DType::F32 => {
                let ev = self.extrapolation as f32;
                run_passes_into(
                    x.as_slice::<f32>()?,
                    in_shape,
                    out_shape,
                    &p.axes,
                    out.as_mut_slice::<f32>()?,
                    |s, o, i, a, d| interp_pass(s, o, i, a, ev, d),
                );
                Ok(true)
            }
            DType::F64 => {
                run_passes_into(
                    x.as_slice::<f64>()?,
                    in_shape,
                    out_shape,
                    &p.axes,
                    out.as_mut_slice::<f64>()?,
                    |s, o, i, a, d| interp_pass(s, o, i, a, self.extrapolation, d),
                );
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The reference path: computes a new tensor (any supported dtype).
    fn run(&self, x: &Tensor, p: &ResizePlan) -> Result<Tensor> {
        let out_shape = &p.out_shape;
        let n_out: usize = out_shape.iter().product();
        if x.dtype() != DType::String {
            let mut bytes = vec![0u8; n_out * x.dtype().size()];
            let mut out = TensorMut::new(x.dtype(), out_shape, &mut bytes)?;
            if self.run_into(x, p, &mut out)? {
                return Tensor::from_bytes(x.dtype(), out_shape, &bytes);
            }
        }
        if x.is_empty() || n_out == 0 {
            return Ok(Tensor::zeros(x.dtype(), out_shape));
        }
        let in_shape = x.shape();
        match x.dtype() {
            DType::F16 | DType::BF16 => {
                let data = x.to_f32_vec()?;
                let ev = self.extrapolation as f32;
                let mut out = vec![0f32; n_out];
                run_passes_into(
                    &data,
                    in_shape,
                    out_shape,
                    &p.axes,
                    &mut out,
                    |s, o, i, a, d| interp_pass(s, o, i, a, ev, d),
                );
                Tensor::from_vec(out_shape, out)?.cast(x.dtype())
            }
            DType::String | DType::Bool => {
                Err(self.err(format!("unsupported dtype {}", x.dtype())))
            }
            dt => {
                // Integers: interpolate in f64, round half to even, saturate.
                let data = x.to_f64_vec()?;
                let mut out = vec![0f64; n_out];
                run_passes_into(
                    &data,
                    in_shape,
                    out_shape,
                    &p.axes,
                    &mut out,
                    |s, o, i, a, d| interp_pass(s, o, i, a, self.extrapolation, d),
                );
                out.iter_mut().for_each(|v| *v = v.round_ties_even());
                Tensor::from_vec(out_shape, out)?.cast(dt)
            }
        }
    }
}

impl Op for Resize {
    fn op_type(&self) -> &str {
        self.op_name
    }

    fn infer(&self, inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        let _ = n_outputs;
        let x = match inputs.first().copied().flatten() {
            Some(f) => f,
            None => return Ok(vec![Fact::unknown()]),
        };
        let dtype = match x.dtype {
            Some(d) => d,
            None => return Ok(vec![Fact::unknown()]),
        };
        let shape = match &x.shape {
            Some(s) => s.clone(),
            None => return Ok(vec![Fact::of_dtype(dtype)]),
        };
        let konst = |i: usize| {
            inputs
                .get(i)
                .copied()
                .flatten()
                .and_then(|f| f.konst.clone())
        };
        let present = |i: usize| {
            inputs.get(i).copied().flatten().is_some_and(|f| {
                f.shape
                    .as_ref()
                    .is_none_or(|s| s.iter().any(|d| d != &Dim::Known(0)))
            })
        };
        // Try the exact computation when every input dimension and parameter is known.
        if let Some(concrete) = x.concrete_shape() {
            let params = if self.legacy {
                match &self.scales_attr {
                    Some(s) => Some((None, Some(s.iter().map(|&v| v as f64).collect()), None)),
                    None => konst(1)
                        .and_then(|t| t.to_f64_vec().ok())
                        .map(|s| (None, Some(s), None)),
                }
            } else {
                let roi = konst(1)
                    .and_then(|t| t.to_f64_vec().ok())
                    .filter(|v| !v.is_empty());
                let scales = if present(2) {
                    konst(2)
                        .and_then(|t| t.to_f64_vec().ok())
                        .filter(|v| !v.is_empty())
                } else {
                    None
                };
                let sizes = if present(3) {
                    konst(3)
                        .and_then(|t| t.to_i64_vec().ok())
                        .filter(|v| !v.is_empty())
                } else {
                    None
                };
                let scales_unknown =
                    present(2) && scales.is_none() && konst(2).is_none_or(|t| !t.is_empty());
                let sizes_unknown =
                    present(3) && sizes.is_none() && konst(3).is_none_or(|t| !t.is_empty());
                if scales_unknown || sizes_unknown {
                    None
                } else {
                    Some((roi, scales, sizes))
                }
            };
            if let Some((roi, scales, sizes)) = params {
                let r = self.resolve(&concrete, roi, scales, sizes).map_err(|e| {
                    KilnError::Inference {
                        node: String::new(),
                        op: self.op_name.into(),
                        msg: e.to_string(),
                    }
                })?;
                return Ok(vec![Fact::concrete(dtype, &r.out_shape)]);
            }
        }
        // Otherwise keep the rank; axes not resized keep their dims.
        let rank = shape.len();
        let axes = self.norm_axes(rank).unwrap_or_else(|_| (0..rank).collect());
        let out: Vec<Dim> = (0..rank)
            .map(|i| {
                if axes.contains(&i) {
                    Dim::Unknown
                } else {
                    shape[i].clone()
                }
            })
            .collect();
        Ok(vec![Fact::tensor(dtype, out)])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.op_name)?;
        let plan = self.plan(x, inputs)?;
        Ok(vec![Value::Tensor(self.run(x, &plan)?)])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = input_tensor(inputs, 0, self.op_name)?;
        let plan = self.plan(x, inputs)?;
        let Some(out) = outputs.first_mut() else {
            return Err(self.err("no output slot"));
        };
        if out.shape() != plan.out_shape.as_slice() || out.dtype() != x.dtype() {
            return Err(self.err(format!(
                "output slot is {} {:?}, the inputs give {} {:?}",
                out.dtype(),
                out.shape(),
                x.dtype(),
                plan.out_shape
            )));
        }
        if !self.run_into(x, &plan, out)? {
            out.copy_from(&self.run(x, &plan)?)?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // expected values copied from ONNX's reference
mod tests {
    use super::*;
    use kiln_core::{Attr, OpDesc};

    fn build(op: &str, opset: i64, attrs: Vec<(&str, Attr)>) -> Result<Box<dyn Op>> {
        let mut desc = OpDesc::new("", op, opset);
        for (k, v) in attrs {
            desc.attrs.insert(k.to_string(), v);
        }
        let ctx = BuildCtx {
            node: "n",
            desc: &desc,
            n_inputs: 4,
            n_outputs: 1,
        };
        if op == "Upsample" {
            build_upsample(&ctx)
        } else {
            build_resize(&ctx)
        }
    }

    fn run(op: &dyn Op, inputs: Vec<Option<Tensor>>) -> Result<Tensor> {
        let vals: Vec<Option<Value>> = inputs.into_iter().map(|t| t.map(Value::Tensor)).collect();
        let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
        op.eval(&refs)?.remove(0).into_tensor()
    }

    fn s(v: &str) -> Attr {
        Attr::String(v.into())
    }

    fn f32t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape, v).unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    fn x_1234() -> Tensor {
        f32t(&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0])
    }

    #[test]
    fn upsample_nearest_scales() {
        // ONNX test_resize_upsample_scales_nearest.
        let op = build("Resize", 19, vec![("mode", s("nearest"))]).unwrap();
        let scales = f32t(&[4], vec![1.0, 1.0, 2.0, 3.0]);
        let y = run(op.as_ref(), vec![Some(x_1234()), None, Some(scales)]).unwrap();
        assert_eq!(y.shape(), &[1, 1, 4, 6]);
        let want = vec![
            1., 1., 1., 2., 2., 2., 1., 1., 1., 2., 2., 2., 3., 3., 3., 4., 4., 4., 3., 3., 3., 4.,
            4., 4.,
        ];
        assert_eq!(y.to_f32_vec().unwrap(), want);
    }

    #[test]
    fn upsample_linear_half_pixel() {
        // ONNX test_resize_upsample_scales_linear.
        let op = build("Resize", 19, vec![("mode", s("linear"))]).unwrap();
        let y = run(
            op.as_ref(),
            vec![
                Some(x_1234()),
                None,
                Some(f32t(&[4], vec![1.0, 1.0, 2.0, 2.0])),
            ],
        )
        .unwrap();
        let want = [
            1.0, 1.25, 1.75, 2.0, 1.5, 1.75, 2.25, 2.5, 2.5, 2.75, 3.25, 3.5, 3.0, 3.25, 3.75, 4.0,
        ];
        close(&y.to_f32_vec().unwrap(), &want, 1e-6);
    }

    #[test]
    fn linear_align_corners() {
        // ONNX test_resize_upsample_scales_linear_align_corners.
        let op = build(
            "Resize",
            13,
            vec![
                ("mode", s("linear")),
                ("coordinate_transformation_mode", s("align_corners")),
            ],
        )
        .unwrap();
        let y = run(
            op.as_ref(),
            vec![
                Some(x_1234()),
                None,
                Some(f32t(&[4], vec![1.0, 1.0, 2.0, 2.0])),
            ],
        )
        .unwrap();
        let want = [
            1.0,
            1.333_333_3,
            1.666_666_7,
            2.0,
            1.666_666_7,
            2.0,
            2.333_333_3,
            2.666_666_7,
            2.333_333_3,
            2.666_666_7,
            3.0,
            3.333_333_3,
            3.0,
            3.333_333_3,
            3.666_666_7,
            4.0,
        ];
        close(&y.to_f32_vec().unwrap(), &want, 1e-5);
    }

    fn x_4x4() -> Tensor {
        f32t(&[1, 1, 4, 4], (1..=16).map(|v| v as f32).collect())
    }

    #[test]
    fn cubic_upsample() {
        // ONNX test_resize_upsample_scales_cubic (first row).
        let op = build("Resize", 13, vec![("mode", s("cubic"))]).unwrap();
        let y = run(
            op.as_ref(),
            vec![
                Some(x_4x4()),
                None,
                Some(f32t(&[4], vec![1.0, 1.0, 2.0, 2.0])),
            ],
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 1, 8, 8]);
        let want = [
            0.47265625, 0.76953125, 1.24609375, 1.875, 2.28125, 2.91015625, 3.38671875, 3.68359375,
        ];
        close(&y.to_f32_vec().unwrap()[..8], &want, 1e-5);
    }

    #[test]
    fn cubic_downsample_antialias() {
        // ONNX test_resize_downsample_scales_cubic_antialias.
        let op = build(
            "Resize",
            18,
            vec![("mode", s("cubic")), ("antialias", Attr::Int(1))],
        )
        .unwrap();
        let y = run(
            op.as_ref(),
            vec![
                Some(x_4x4()),
                None,
                Some(f32t(&[4], vec![1.0, 1.0, 0.6, 0.6])),
            ],
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 1, 2, 2]);
        close(
            &y.to_f32_vec().unwrap(),
            &[2.5180721, 4.2858863, 9.589329, 11.357142],
            1e-4,
        );
    }

    #[test]
    fn linear_downsample_antialias() {
        // ONNX test_resize_downsample_scales_linear_antialias.
        let op = build(
            "Resize",
            18,
            vec![("mode", s("linear")), ("antialias", Attr::Int(1))],
        )
        .unwrap();
        let y = run(
            op.as_ref(),
            vec![
                Some(x_4x4()),
                None,
                Some(f32t(&[4], vec![1.0, 1.0, 0.6, 0.6])),
            ],
        )
        .unwrap();
        close(&y.to_f32_vec().unwrap(), &[2.875, 4.5, 9.375, 11.0], 1e-5);
    }

    #[test]
    fn nearest_sizes_modes() {
        // ONNX test_resize_upsample_sizes_nearest_ceil_half_pixel: first row.
        let op = build(
            "Resize",
            13,
            vec![
                ("mode", s("nearest")),
                ("coordinate_transformation_mode", s("half_pixel")),
                ("nearest_mode", s("ceil")),
            ],
        )
        .unwrap();
        let sizes = Tensor::from_vec(&[4], vec![1i64, 1, 8, 8]).unwrap();
        let y = run(op.as_ref(), vec![Some(x_4x4()), None, None, Some(sizes)]).unwrap();
        assert_eq!(
            y.to_f32_vec().unwrap()[..8],
            [1., 2., 2., 3., 3., 4., 4., 4.]
        );
        // ONNX test_resize_upsample_sizes_nearest_floor_align_corners: first row.
        let op = build(
            "Resize",
            13,
            vec![
                ("mode", s("nearest")),
                ("coordinate_transformation_mode", s("align_corners")),
                ("nearest_mode", s("floor")),
            ],
        )
        .unwrap();
        let sizes = Tensor::from_vec(&[4], vec![1i64, 1, 8, 8]).unwrap();
        let y = run(op.as_ref(), vec![Some(x_4x4()), None, None, Some(sizes)]).unwrap();
        assert_eq!(
            y.to_f32_vec().unwrap()[..8],
            [1., 1., 1., 2., 2., 3., 3., 4.]
        );
    }

    #[test]
    fn keep_aspect_ratio_and_axes() {
        // ONNX test_resize_downsample_sizes_nearest_not_larger: 2x2 → sizes [1,3] → 1x1 ... shape [1,1,1,2].
        let x = f32t(&[1, 1, 2, 4], (1..=8).map(|v| v as f32).collect());
        let op = build(
            "Resize",
            18,
            vec![
                ("mode", s("nearest")),
                ("keep_aspect_ratio_policy", s("not_larger")),
                ("axes", Attr::Ints(vec![2, 3])),
            ],
        )
        .unwrap();
        let y = run(
            op.as_ref(),
            vec![
                Some(x.clone()),
                None,
                None,
                Some(Tensor::from_vec(&[2], vec![1i64, 3]).unwrap()),
            ],
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 1, 1, 2]);
        assert_eq!(y.to_f32_vec().unwrap(), [1., 3.]);
        let op = build(
            "Resize",
            18,
            vec![
                ("mode", s("nearest")),
                ("keep_aspect_ratio_policy", s("not_smaller")),
                ("axes", Attr::Ints(vec![3, 2])),
            ],
        )
        .unwrap();
        let y = run(
            op.as_ref(),
            vec![
                Some(x),
                None,
                None,
                Some(Tensor::from_vec(&[2], vec![3i64, 1]).unwrap()),
            ],
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 1, 2, 3]);
    }

    #[test]
    fn tf_crop_and_resize_extrapolation() {
        // ONNX test_resize_tf_crop_and_resize_extrapolation_value.
        let op = build(
            "Resize",
            13,
            vec![
                ("mode", s("linear")),
                ("coordinate_transformation_mode", s("tf_crop_and_resize")),
                ("extrapolation_value", Attr::Float(10.0)),
            ],
        )
        .unwrap();
        let roi = f32t(&[8], vec![0.0, 0.0, 0.4, 0.6, 1.0, 1.0, 1.2, 1.7]);
        let sizes = Tensor::from_vec(&[4], vec![1i64, 1, 3, 3]).unwrap();
        let y = run(
            op.as_ref(),
            vec![Some(x_4x4()), Some(roi), None, Some(sizes)],
        )
        .unwrap();
        close(
            &y.to_f32_vec().unwrap(),
            &[7.6, 10.0, 10.0, 12.4, 10.0, 10.0, 10.0, 10.0, 10.0],
            1e-5,
        );
    }

    #[test]
    fn int_and_legacy_and_upsample_op() {
        let x = Tensor::from_vec(&[1, 2], vec![10i32, 20]).unwrap();
        let op = build("Resize", 10, vec![("mode", s("linear"))]).unwrap();
        let y = run(
            op.as_ref(),
            vec![Some(x.clone()), Some(f32t(&[2], vec![1.0, 2.0]))],
        )
        .unwrap();
        assert_eq!(y.to_i64_vec().unwrap(), [10, 15, 20, 20]);
        let op = build(
            "Upsample",
            7,
            vec![
                ("mode", s("nearest")),
                ("scales", Attr::Floats(vec![2.0, 1.5])),
            ],
        )
        .unwrap();
        let y = run(op.as_ref(), vec![Some(x)]).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.to_i64_vec().unwrap(), [10, 10, 20, 10, 10, 20]);
    }

    #[test]
    fn fast_nearest_large_matches_naive() {
        let (n, c, h, w) = (2, 5, 37, 41);
        let data: Vec<f32> = (0..n * c * h * w)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let x = f32t(&[n, c, h, w], data.clone());
        let op = build(
            "Resize",
            12,
            vec![
                ("mode", s("nearest")),
                ("coordinate_transformation_mode", s("asymmetric")),
                ("nearest_mode", s("floor")),
            ],
        )
        .unwrap();
        let y = run(
            op.as_ref(),
            vec![
                Some(x.clone()),
                Some(f32t(&[0], vec![])),
                Some(f32t(&[4], vec![1.0, 1.0, 2.0, 2.0])),
            ],
        )
        .unwrap();
        let yv = y.to_f32_vec().unwrap();
        for p in 0..n * c {
            for yy in 0..2 * h {
                for xx in 0..2 * w {
                    assert_eq!(
                        yv[(p * 2 * h + yy) * 2 * w + xx],
                        data[(p * h + yy / 2) * w + xx / 2]
                    );
                }
            }
        }
        // Linear ×2 (half_pixel) against a direct bilinear formula.
        let op = build("Resize", 13, vec![("mode", s("linear"))]).unwrap();
        let y = run(
            op.as_ref(),
            vec![Some(x), None, Some(f32t(&[4], vec![1.0, 1.0, 2.0, 2.0]))],
        )
        .unwrap();
        let yv = y.to_f32_vec().unwrap();
        let src = |p: usize, i: i64, j: i64| {
            data[(p * h + i.clamp(0, h as i64 - 1) as usize) * w
                + j.clamp(0, w as i64 - 1) as usize]
        };
        for p in [0, 7] {
            for yy in 0..2 * h {
                for xx in 0..2 * w {
                    let fy = (yy as f64 + 0.5) / 2.0 - 0.5;
                    let fx = (xx as f64 + 0.5) / 2.0 - 0.5;
                    let (y0, x0) = (fy.floor(), fx.floor());
                    let (ry, rx) = ((fy - y0) as f32, (fx - x0) as f32);
                    let (y0, x0) = (y0 as i64, x0 as i64);
                    let top = src(p, y0, x0) * (1.0 - rx) + src(p, y0, x0 + 1) * rx;
                    let bot = src(p, y0 + 1, x0) * (1.0 - rx) + src(p, y0 + 1, x0 + 1) * rx;
                    let want = top * (1.0 - ry) + bot * ry;
                    assert!((yv[(p * 2 * h + yy) * 2 * w + xx] - want).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn errors() {
        assert!(build("Resize", 13, vec![("mode", s("bogus"))]).is_err());
        let op = build("Resize", 13, vec![]).unwrap();
        // Neither scales nor sizes.
        assert!(run(op.as_ref(), vec![Some(x_1234())]).is_err());
        // Wrong scales length, negative scale.
        assert!(run(
            op.as_ref(),
            vec![Some(x_1234()), None, Some(f32t(&[2], vec![1.0, 2.0]))]
        )
        .is_err());
        assert!(run(
            op.as_ref(),
            vec![
                Some(x_1234()),
                None,
                Some(f32t(&[4], vec![1.0, 1.0, -2.0, 2.0]))
            ]
        )
        .is_err());
        let op = build("Resize", 18, vec![("axes", Attr::Ints(vec![2, 2]))]).unwrap();
        assert!(run(
            op.as_ref(),
            vec![Some(x_1234()), None, Some(f32t(&[2], vec![2.0, 2.0]))]
        )
        .is_err());
    }

    #[test]
    fn infers_constant_scales() {
        let op = build("Resize", 13, vec![]).unwrap();
        let x = Fact::concrete(DType::F32, &[1, 3, 10, 20]);
        let scales = Fact::constant(f32t(&[4], vec![1.0, 1.0, 2.0, 0.5]));
        let f = op.infer(&[Some(&x), None, Some(&scales)], 1).unwrap();
        assert_eq!(f[0].concrete_shape().unwrap(), vec![1, 3, 20, 10]);
    }
}
