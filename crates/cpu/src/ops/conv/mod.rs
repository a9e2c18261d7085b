//! Convolutions: Conv (1-D/2-D/3-D, groups, depthwise, dilations, auto_pad; in the `kiln`
//! domain a fused activation and a fused residual, see [`RESIDUAL_INPUT`]), ConvTranspose,
//! ConvInteger, QLinearConv, DeformConv.

pub mod deform;
pub mod dw_block;
pub mod flat;
pub mod geom;
pub mod kernel;
pub mod nhwc;
pub mod quant;
pub mod reference;
pub mod tactics;
pub mod transpose;
mod transpose_tiles;
pub mod winograd;

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result,
    Tactic, Tensor, TensorMut, Value,
};

use self::geom::{Spatial, WindowAttrs};
use self::kernel::{ConvAlgo, ConvF32};
use self::reference::ConvDims;
use crate::fused::{Activation, KILN_DOMAIN};
use crate::ops::linalg::sgemm::Isa;
use crate::ops::linalg::{as_f32, from_f32};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("Conv", build_conv);
    reg.register_in(KILN_DOMAIN, "Conv", build_conv);
    reg.register("ConvTranspose", transpose::build_conv_transpose);
    reg.register("ConvInteger", quant::build_conv_integer);
    reg.register("QLinearConv", quant::build_qlinear_conv);
    reg.register("DeformConv", deform::build_deform_conv);
}

fn infer_err(op: &str, msg: impl Into<String>) -> KilnError {
    KilnError::Inference {
        node: String::new(),
        op: op.into(),
        msg: msg.into(),
    }
}

/// Checks X (N × C × spatial) and W (M × C/group × kernel) of a convolution and resolves
/// the window. Shared by Conv, ConvInteger, QLinearConv and DeformConv.
pub fn conv_geometry(
    op: &str,
    win: &WindowAttrs,
    group: usize,
    xs: &[usize],
    ws: &[usize],
) -> Result<(ConvDims, Spatial)> {
    if xs.len() < 3 {
        return Err(KilnError::kernel(
            op,
            format!("X must have rank ≥ 3 (N, C, spatial...), found shape {xs:?}"),
        ));
    }
    if ws.len() != xs.len() {
        return Err(KilnError::kernel(
            op,
            format!("W shape {ws:?} must have the rank of X {xs:?}"),
        ));
    }
    let (n, c, m) = (xs[0], xs[1], ws[0]);
    if group == 0 || c != ws[1] * group || m % group != 0 {
        return Err(KilnError::kernel(
            op,
            format!("X has {c} channels and W is {ws:?}: with group={group}, need C = W[1]·group and M divisible by group"),
        ));
    }
    if let Some(k) = &win.kernel_shape {
        if k.as_slice() != &ws[2..] {
            return Err(KilnError::kernel(
                op,
                format!("kernel_shape {k:?} does not match W shape {ws:?}"),
            ));
        }
    }
    let sp = win.resolve(op, &xs[2..], &ws[2..])?;
    Ok((ConvDims { n, c, m, group }, sp))
}

/// Output facts of a convolution-like op with output channels taken from W's dim 0.
pub fn infer_conv_like(
    op: &str,
    win: &WindowAttrs,
    x: Option<&Fact>,
    w: Option<&Fact>,
    dtype: Option<DType>,
) -> Result<Fact> {
    let Some(xs) = x.and_then(|f| f.shape.as_ref()) else {
        return Ok(Fact {
            dtype,
            ..Fact::unknown()
        });
    };
    if xs.len() < 3 {
        return Err(infer_err(
            op,
            format!("X must have rank ≥ 3, found rank {}", xs.len()),
        ));
    }
    let ws = w.and_then(|f| f.shape.as_ref());
    let m = ws.and_then(|s| s.first().cloned()).unwrap_or(Dim::Unknown);
    let kernel: Option<Vec<usize>> = match (&win.kernel_shape, ws) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(ws)) => ws.iter().skip(2).map(|d| d.known()).collect(),
        _ => None,
    };
    let spatial = match kernel {
        Some(k) if k.len() == xs.len() - 2 => win.resolve_dims(op, &xs[2..], &k)?,
        Some(k) => {
            return Err(infer_err(
                op,
                format!("kernel {k:?} does not match X rank {}", xs.len()),
            ))
        }
        None => vec![Dim::Unknown; xs.len() - 2],
    };
    let mut shape = vec![xs[0].clone(), m];
    shape.extend(spatial);
    Ok(match dtype {
        Some(d) => Fact::tensor(d, shape),
        None => Fact {
            shape: Some(shape),
            ..Fact::unknown()
        },
    })
}

/// The output shape N × M × spatial.
pub fn out_shape(dims: &ConvDims, sp: &Spatial) -> kiln_core::Shape {
    let mut s: kiln_core::Shape = smallvec::smallvec![dims.n, dims.m];
    s.extend_from_slice(&sp.output);
    s
}

/// ONNX Conv (and its fused form in the `kiln` domain).
#[derive(Debug, Clone)]
pub struct Conv {
    /// Window attributes.
    pub win: WindowAttrs,
    /// Number of groups.
    pub group: usize,
    /// Activation applied to the output (kiln's fused form).
    pub act: Activation,
    /// The implementation the tuner chose (`Auto` when untuned).
    pub algo: ConvAlgo,
    /// `Some(isa)` when W was packed at build time for that GEMM kernel family
    /// (attribute [`WEIGHT_LAYOUT_ATTR`] = `packed_a.<isa>`), or, with a Winograd `algo`,
    /// transformed and packed ([`winograd::transform_weights`], `winograd_<f23|f43>.<isa>`,
    /// stored as M × C/group × α × α).
    pub packed: Option<Isa>,
}

/// Index of the residual input of kiln's fused Conv: `Y = act(Conv(X, W, B) + R)` with R
/// of Y's shape (an `Add` after the Conv fused by the graph optimiser; no broadcasting).
pub const RESIDUAL_INPUT: usize = 3;

/// Whether `node` is a Conv carrying a fused residual input (see [`RESIDUAL_INPUT`]).
pub fn has_residual(node: &kiln_core::Node) -> bool {
    node.desc.op_type == "Conv" && matches!(node.inputs.get(RESIDUAL_INPUT), Some(Some(_)))
}

/// Attribute naming the layout of a Conv's constant weights when the builder packed them
/// (`packed_a.scalar`, `packed_a.avx2`, `packed_a.avx512`, or `winograd_f23.<isa>` /
/// `winograd_f43.<isa>` for Winograd-transformed weights); absent: ONNX layout.
pub const WEIGHT_LAYOUT_ATTR: &str = "kiln_weight_layout";

/// [`WEIGHT_LAYOUT_ATTR`] prefix of the channels-last 1×1 tactic's weights, stored C × M
/// (the ONNX M × C transposed) under their ONNX shape.
pub const NHWC_IO_LAYOUT: &str = "nhwc_io";

impl Conv {
    /// The kernel family to pack this layer's weights for at build time, when its GEMM
    /// tactic would use the packed product (not the depthwise direct kernel, not a product
    /// with ≤ 4 filters per group or a handful of output positions, which take unpacked
    /// paths); `None` otherwise.
    pub fn weight_packing(&self, x: &[usize], w: &[usize]) -> Option<Isa> {
        if self.packed.is_some() || self.algo.is_direct() {
            return None;
        }
        if self.algo == ConvAlgo::NhwcPointwise {
            // Channels-last 1×1 weights are always stored transposed (C × M).
            return (w.len() == 4 && w[0] > 0).then(Isa::detect);
        }
        let (dims, sp) = conv_geometry("Conv", &self.win, self.group, x, w).ok()?;
        let sp = sp.to3("Conv").ok()?;
        if let ConvAlgo::Winograd(_) = self.algo {
            // Winograd weights are always transformed at build time.
            return (winograd::applies(&sp) && dims.m > 0).then(Isa::detect);
        }
        let (cg, mg) = (dims.c / dims.group, dims.m / dims.group);
        if cg == 1 && dims.group > 1 && self.algo == ConvAlgo::Auto {
            return None;
        }
        let (p, k) = (sp.out_size(), cg * sp.kernel_size());
        let tile_elems = match self.algo {
            ConvAlgo::Im2colGemm { tile_elems, .. } => tile_elems.max(1),
            _ => kernel::TILE_ELEMS,
        };
        let n = if dims.group == 1 && dims.n > 1 && p <= kernel::BATCH_COLUMNS_MAX_P {
            // The batch runs as one product with every image's positions side by side.
            dims.n * p
        } else if sp.is_pointwise() {
            p
        } else {
            (tile_elems / k.max(1)).max(128).min(p)
        };
        let isa = Isa::detect();
        let nr = match isa {
            Isa::Scalar => 4,
            Isa::Avx2 => 16,
            Isa::Avx512 => 32,
        };
        (mg > 4 && n * 4 > nr && k > 0).then_some(isa)
    }

    /// This op reading weights packed for `isa` (the builder sets the same in the
    /// description with [`WEIGHT_LAYOUT_ATTR`]).
    pub fn with_packed(&self, isa: Isa) -> Conv {
        Conv {
            packed: Some(isa),
            ..self.clone()
        }
    }

    /// The weights `w` (ONNX layout, shape `ws`) as [`Conv::with_packed`]`(isa)` reads
    /// them, and their shape: packed-A blocks of the same shape for the GEMM tactics,
    /// Winograd-transformed (M × C/group × α × α) for the Winograd ones.
    pub fn packed_weights(
        &self,
        w: &[f32],
        ws: &[usize],
        isa: Isa,
    ) -> Result<(Vec<f32>, Vec<usize>)> {
        if ws.len() < 2 {
            return Err(KilnError::kernel("Conv", format!("bad W shape {ws:?}")));
        }
        match self.algo {
            ConvAlgo::Winograd(t) => {
                let a = t.alpha();
                let data = winograd::transform_weights(t, w, ws[0], self.group, Some(isa))?;
                Ok((data, vec![ws[0], ws[1], a, a]))
            }
            ConvAlgo::NhwcPointwise => Ok((nhwc::transpose_weights(w, ws[0])?, ws.to_vec())),
            _ => Ok((
                kernel::pack_weights(w, ws[0], self.group, isa)?,
                ws.to_vec(),
            )),
        }
    }

    /// The [`WEIGHT_LAYOUT_ATTR`] value of [`Conv::packed_weights`] for `isa`.
    pub fn weight_layout(&self, isa: Isa) -> String {
        match self.algo {
            ConvAlgo::Winograd(t) => format!("winograd_{}.{}", t.name(), isa.name()),
            ConvAlgo::NhwcPointwise => format!("{NHWC_IO_LAYOUT}.{}", isa.name()),
            _ => format!("packed_a.{}", isa.name()),
        }
    }

    /// W's shape as the window sees it: Winograd weights transformed at build time are
    /// stored as M × C/group × α × α for a 3 × 3 window.
    fn logical_w_shape(&self, ws: &[usize]) -> Result<kiln_core::Shape> {
        let mut s: kiln_core::Shape = ws.iter().copied().collect();
        if let (ConvAlgo::Winograd(t), Some(_)) = (self.algo, self.packed) {
            let a = t.alpha();
            if ws.len() != 4 || ws[2] != a || ws[3] != a {
                return Err(KilnError::kernel(
                    "Conv",
                    format!(
                        "Winograd weights must have shape M × C/group × {a} × {a}, found {ws:?}"
                    ),
                ));
            }
            s[2] = 3;
            s[3] = 3;
        }
        Ok(s)
    }
}

fn build_conv(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let group = usize::try_from(a.int("group", 1)?)
        .ok()
        .filter(|&g| g > 0)
        .ok_or_else(|| a.invalid("group must be positive"))?;
    let mut win = WindowAttrs::parse(&a)?;
    win.ceil_mode = false;
    let algo = match a.opt_string(kiln_core::tactic::TACTIC_ATTR)? {
        Some(id) => tactics::parse(&id).map_err(|e| a.invalid(e.to_string()))?,
        None => ConvAlgo::Auto,
    };
    let packed = match a.opt_string(WEIGHT_LAYOUT_ATTR)? {
        None => None,
        Some(l) => {
            // The layout must be the one the tactic reads.
            let prefix = match algo {
                ConvAlgo::Winograd(t) => format!("winograd_{}.", t.name()),
                ConvAlgo::NhwcPointwise => format!("{NHWC_IO_LAYOUT}."),
                _ => "packed_a.".to_string(),
            };
            Some(
                l.strip_prefix(prefix.as_str())
                    .and_then(Isa::from_name)
                    .ok_or_else(|| {
                        a.invalid(format!(
                            "weight layout `{l}` does not fit tactic {algo:?} (this kiln knows packed_a.<scalar|avx2|avx512>, winograd_<f23|f43>.<isa> for the Winograd tactics and nhwc_io.<isa> for cpu.conv.nhwc.gemm_1x1); rebuild the plan"
                        ))
                    })?,
            )
        }
    };
    Ok(Box::new(Conv {
        win,
        group,
        act: Activation::from_attrs(&a)?,
        algo,
        packed,
    }))
}

/// Resolved inputs of one Conv call.
struct ConvCall<'a> {
    x: &'a Tensor,
    w: &'a Tensor,
    b: Option<&'a Tensor>,
    /// The fused residual, of the output's shape.
    r: Option<&'a Tensor>,
    dims: ConvDims,
    sp: Spatial,
    /// The output's shape as stored (N × H × W × M for the channels-last tactics).
    y_shape: kiln_core::Shape,
}

impl Conv {
    /// X's shape as the window sees it (N × C × spatial): the channels-last tactics store
    /// it N × H × W × C.
    fn logical_x_shape(&self, xs: &[usize]) -> Result<kiln_core::Shape> {
        // (a Shape, not a Vec: the steady state allocates nothing)
        if !self.algo.is_nhwc() {
            return Ok(xs.iter().copied().collect());
        }
        if xs.len() != 4 {
            return Err(KilnError::kernel(
                "Conv",
                format!("the channels-last tactics take N × H × W × C inputs, found shape {xs:?}"),
            ));
        }
        Ok(nhwc::to_nchw(xs))
    }

    /// The output's shape as this op stores it.
    fn stored_out_shape(&self, dims: &ConvDims, sp: &Spatial) -> kiln_core::Shape {
        let s = out_shape(dims, sp);
        if self.algo.is_nhwc() {
            nhwc::to_nhwc(&s)
        } else {
            s
        }
    }

    fn prepare<'a>(&self, inputs: &[Option<&'a Value>]) -> Result<ConvCall<'a>> {
        let x = input_tensor(inputs, 0, "Conv")?;
        let w = input_tensor(inputs, 1, "Conv")?;
        let b = optional_tensor(inputs, 2, "Conv")?;
        let r = optional_tensor(inputs, RESIDUAL_INPUT, "Conv")?;
        if !x.dtype().is_float() {
            return Err(KilnError::kernel(
                "Conv",
                format!("X must be a float tensor, found {}", x.dtype()),
            ));
        }
        if w.dtype() != x.dtype() || b.is_some_and(|b| b.dtype() != x.dtype()) {
            return Err(KilnError::kernel("Conv", "X, W and B must share one dtype"));
        }
        let ws = self.logical_w_shape(w.shape())?;
        let xs = self.logical_x_shape(x.shape())?;
        let (dims, sp) = conv_geometry("Conv", &self.win, self.group, &xs, &ws)?;
        if let Some(b) = b {
            if b.shape() != [dims.m] {
                return Err(KilnError::kernel(
                    "Conv",
                    format!("B must have shape [{}], found {:?}", dims.m, b.shape()),
                ));
            }
        }
        let y_shape = self.stored_out_shape(&dims, &sp);
        if let Some(r) = r {
            let want = &y_shape;
            if r.dtype() != x.dtype() || r.shape() != want.as_slice() {
                return Err(KilnError::kernel(
                    "Conv",
                    format!(
                        "the residual must be {} of the output's shape {want:?}, found {} {:?}",
                        x.dtype(),
                        r.dtype(),
                        r.shape()
                    ),
                ));
            }
        }
        Ok(ConvCall {
            x,
            w,
            b,
            r,
            dims,
            sp,
            y_shape,
        })
    }

    fn compute(&self, call: &ConvCall, out: &mut [f32]) -> Result<()> {
        let (x, w) = (as_f32(call.x)?, as_f32(call.w)?);
        let b = call.b.map(as_f32).transpose()?;
        let r = call.r.map(as_f32).transpose()?;
        ConvF32 {
            x: &x,
            w: &w,
            bias: b.as_deref(),
            dims: call.dims,
            sp: call.sp.to3("Conv")?,
            act: self.act,
            residual: r.as_deref(),
            algo: self.algo,
            packed: self.packed,
        }
        .run(out)
    }
}

impl Op for Conv {
    fn op_type(&self) -> &str {
        "Conv"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let dtype = x.and_then(|f| f.dtype);
        if let Some(d) = dtype {
            if !d.is_float() {
                return Err(infer_err(
                    "Conv",
                    format!("X must be a float tensor, found {d}"),
                ));
            }
        }
        let mut w = inputs.get(1).copied().flatten();
        let logical;
        if let (ConvAlgo::Winograd(_), Some(_), Some(ws)) =
            (self.algo, self.packed, w.and_then(|f| f.shape.as_ref()))
        {
            // Transformed weights: the window is 3 × 3.
            let mut s = ws.clone();
            if s.len() == 4 {
                s[2] = Dim::Known(3);
                s[3] = Dim::Known(3);
            }
            logical = Fact {
                shape: Some(s),
                dtype: w.and_then(|f| f.dtype),
                ..Fact::unknown()
            };
            w = Some(&logical);
        }
        if !self.algo.is_nhwc() {
            return Ok(vec![infer_conv_like("Conv", &self.win, x, w, dtype)?]);
        }
        // Channels-last: X is N × H × W × C, and so is the output.
        let logical_x = match x {
            Some(f) => match &f.shape {
                Some(s) if s.len() == 4 => Some(Fact {
                    shape: Some(nhwc::to_nchw(s)),
                    ..f.clone()
                }),
                Some(s) => {
                    return Err(infer_err(
                        "Conv",
                        format!(
                        "the channels-last tactics take rank-4 N × H × W × C inputs, found rank {}",
                        s.len()
                    ),
                    ))
                }
                None => Some(f.clone()),
            },
            None => None,
        };
        let mut y = infer_conv_like("Conv", &self.win, logical_x.as_ref(), w, dtype)?;
        if let Some(s) = &y.shape {
            y.shape = Some(nhwc::to_nhwc(s));
        }
        Ok(vec![y])
    }

    fn tactics(&self, inputs: &[Option<&Fact>]) -> Vec<Tactic> {
        let shape = |i: usize| inputs.get(i).copied().flatten()?.concrete_shape();
        let (Some(x), Some(w)) = (shape(0), shape(1)) else {
            return Vec::new();
        };
        let Ok((dims, sp)) = conv_geometry("Conv", &self.win, self.group, &x, &w) else {
            return Vec::new();
        };
        let cg = dims.c / dims.group.max(1);
        let Ok(sp3) = sp.to3("Conv") else {
            return Vec::new();
        };
        let mg = dims.m / dims.group.max(1);
        tactics::list(tactics::ConvShapeClass {
            depthwise: cg == 1 && dims.group > 1,
            wide_rows: sp3.output[2] >= kernel::DIRECT_ROWS_MIN_WIDTH,
            pointwise: sp3.is_pointwise(),
            flat: !sp3.is_pointwise() && kernel::flat_fits(cg, &sp3),
            chunks: dims.n * dims.group,
            winograd: winograd::applies(&sp3)
                && cg >= winograd::MIN_CHANNELS
                && mg >= winograd::MIN_CHANNELS,
            nhwc_pointwise: x.len() == 4 && sp3.is_pointwise() && dims.group == 1,
            nhwc_depthwise: x.len() == 4 && cg == 1 && dims.group > 1,
        })
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let call = self.prepare(inputs)?;
        let shape = call.y_shape.clone();
        let mut out = vec![0.0f32; shape.iter().product()];
        self.compute(&call, &mut out)?;
        Ok(vec![from_f32(call.x.dtype(), &shape, out)?.into()])
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let call = self.prepare(inputs)?;
        let shape = call.y_shape.clone();
        let Some(slot) = outputs.first_mut() else {
            return Err(KilnError::kernel("Conv", "no output slot"));
        };
        if slot.shape() != shape.as_slice() || slot.dtype() != call.x.dtype() {
            return Err(KilnError::kernel(
                "Conv",
                format!(
                    "output slot is {} {:?}, expected {:?}",
                    slot.dtype(),
                    slot.shape(),
                    shape
                ),
            ));
        }
        if slot.dtype() == DType::F32 {
            return self.compute(&call, slot.as_mut_slice::<f32>()?);
        }
        let mut out = vec![0.0f32; shape.iter().product()];
        self.compute(&call, &mut out)?;
        slot.copy_from(&from_f32(call.x.dtype(), &shape, out)?)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Helpers shared by the tests of the conv and pool modules.

    /// A tiny deterministic generator of values in [-1, 1).
    pub struct Lcg(pub u64);

    impl Lcg {
        /// The next value.
        pub fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }

        /// `n` values.
        pub fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// A random f32 convolution problem: its geometry, input, weights, bias and the
    /// reference output (in f64, then `act`), with or without the bias.
    pub struct Problem {
        /// Window geometry.
        pub sp: super::geom::Spatial3,
        /// Input, weights, bias.
        pub x: Vec<f32>,
        /// Weights.
        pub w: Vec<f32>,
        /// Bias (M values; the reference used it only with `with_bias`).
        pub b: Vec<f32>,
        /// Reference output.
        pub want: Vec<f32>,
    }

    /// Makes a [`Problem`] for `dims`, `win` over `input` with `kernel`, seeded.
    pub fn problem(
        dims: super::reference::ConvDims,
        win: &super::geom::WindowAttrs,
        (input, kernel): (&[usize], &[usize]),
        with_bias: bool,
        act: crate::fused::Activation,
        seed: u64,
    ) -> Problem {
        let sp = win
            .resolve("Conv", input, kernel)
            .unwrap()
            .to3("Conv")
            .unwrap();
        let mut r = Lcg(seed);
        let x = r.vec(dims.n * dims.c * sp.in_size());
        let w = r.vec(dims.m * (dims.c / dims.group) * sp.kernel_size());
        let b = r.vec(dims.m);
        let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let bias = with_bias.then(|| f64v(&b));
        let want =
            super::reference::conv_reference(&f64v(&x), &f64v(&w), bias.as_deref(), dims, &sp)
                .iter()
                .map(|&v| act.apply(v as f32))
                .collect();
        Problem { sp, x, w, b, want }
    }

    /// Max absolute difference, asserting equal lengths.
    pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::geom::AutoPad;
    use super::reference::conv_reference;
    use super::test_util::*;
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn check(
        xs: &[usize],
        ws: &[usize],
        group: usize,
        win: WindowAttrs,
        bias: bool,
        act: Activation,
        seed: u64,
    ) {
        let mut r = Lcg(seed);
        let x = r.vec(xs.iter().product());
        let w = r.vec(ws.iter().product());
        let b = r.vec(ws[0]);
        let xt = Tensor::from_vec(xs, x.clone()).unwrap();
        let wt = Tensor::from_vec(ws, w.clone()).unwrap();
        let bt = Tensor::from_vec(&[ws[0]], b.clone()).unwrap();
        let (xv, wv, bv) = (Value::from(xt), Value::from(wt), Value::from(bt));
        let inputs = if bias {
            vec![Some(&xv), Some(&wv), Some(&bv)]
        } else {
            vec![Some(&xv), Some(&wv)]
        };
        let (dims, sp) = conv_geometry("Conv", &win, group, xs, ws).unwrap();
        let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let want = conv_reference(
            &f64v(&x),
            &f64v(&w),
            bias.then(|| f64v(&b)).as_deref(),
            dims,
            &sp.to3("Conv").unwrap(),
        );
        let raw: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let want: Vec<f32> = raw.iter().map(|&v| act.apply(v)).collect();
        // A fused residual (input 3, bias present or not): act(conv + R), with this case's
        // activation and one more that rotates with the seed.
        let res = r.vec(raw.len());
        let rv = Value::from(Tensor::from_vec(&out_shape(&dims, &sp), res.clone()).unwrap());
        let mut res_inputs = inputs.clone();
        res_inputs.resize(RESIDUAL_INPUT, None);
        res_inputs.push(Some(&rv));
        let extra = [
            Activation::Relu,
            Activation::Clip {
                min: -0.25,
                max: 0.5,
            },
            Activation::HardSwish,
            Activation::Sigmoid,
            Activation::None,
        ][seed as usize % 5];
        let fx = Fact::concrete(DType::F32, xs);
        let fw = Fact::concrete(DType::F32, ws);
        let heuristic = Conv {
            win: win.clone(),
            group,
            act,
            algo: ConvAlgo::Auto,
            packed: None,
        };
        // The heuristic and every tactic the tuner may choose compute the same function.
        let tactics = heuristic.tactics(&[Some(&fx), Some(&fw)]);
        assert!(!tactics.is_empty());
        let algos = std::iter::once(ConvAlgo::Auto)
            .chain(tactics.iter().map(|t| tactics::parse(&t.id).unwrap()));
        for algo in algos {
            let conv = Conv {
                algo,
                ..heuristic.clone()
            };
            if algo.is_nhwc() {
                let res = (&res[..], extra);
                check_nhwc(&conv, &inputs, (&w, ws), res, &raw, &out_shape(&dims, &sp));
                continue;
            }
            let got = conv.eval(&inputs).unwrap().remove(0).into_tensor().unwrap();
            assert_eq!(got.shape(), out_shape(&dims, &sp).as_slice());
            // Winograd loses some precision (relative to the values' magnitude).
            let scale = want.iter().fold(1.0f32, |a, &v| a.max(v.abs()));
            let tol = match algo {
                ConvAlgo::Winograd(_) => 2e-5 * scale,
                _ => 1e-4,
            };
            let d = max_diff(got.as_slice::<f32>().unwrap(), &want);
            assert!(
                d < tol,
                "xs={xs:?} ws={ws:?} group={group} win={win:?} {algo:?}: diff {d}"
            );
            // weights packed at build time give the same result, for every kernel family
            // (one this CPU lacks unpacks into scratch)
            let depthwise = ws[1] == 1 && group > 1;
            if !(algo.is_direct() || (depthwise && algo == ConvAlgo::Auto)) {
                for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                    let (pw, pshape) = conv.packed_weights(&w, ws, isa).unwrap();
                    let pwv = Value::from(Tensor::from_vec(&pshape, pw).unwrap());
                    let mut pin = inputs.clone();
                    pin[1] = Some(&pwv);
                    let got = conv
                        .with_packed(isa)
                        .eval(&pin)
                        .unwrap()
                        .remove(0)
                        .into_tensor()
                        .unwrap();
                    let d = max_diff(got.as_slice::<f32>().unwrap(), &want);
                    assert!(
                        d < tol,
                        "xs={xs:?} ws={ws:?} {algo:?} packed {isa:?}: diff {d}"
                    );
                    // infer agrees on the packed form
                    let fpw = Fact::concrete(DType::F32, &pshape);
                    let f = conv
                        .with_packed(isa)
                        .infer(&[Some(&fx), Some(&fpw)], 1)
                        .unwrap()
                        .remove(0);
                    assert_eq!(f.concrete_shape().unwrap(), got.shape());
                }
            } else {
                let pw = Value::from(Tensor::from_vec(ws, w.clone()).unwrap());
                let mut pin = inputs.clone();
                pin[1] = Some(&pw);
                assert!(conv.with_packed(Isa::Scalar).eval(&pin).is_err());
            }
            // infer agrees
            let f = conv.infer(&[Some(&fx), Some(&fw)], 1).unwrap().remove(0);
            assert_eq!(f.concrete_shape().unwrap(), got.shape());
            // eval_into agrees
            let mut bytes = vec![0u8; got.len() * 4];
            let shape = got.shape().to_vec();
            let mut slots = [TensorMut::new(DType::F32, &shape, &mut bytes).unwrap()];
            conv.eval_into(&inputs, &mut slots).unwrap();
            assert_eq!(bytes, got.bytes());
            // With the residual: every path adds it before the activation, plain or
            // packed weights.
            for ract in [act, extra] {
                let want: Vec<f32> = raw
                    .iter()
                    .zip(&res)
                    .map(|(v, r)| ract.apply(v + r))
                    .collect();
                // Winograd's error scales with the values before the activation.
                let scale = raw
                    .iter()
                    .zip(&res)
                    .fold(1.0f32, |a, (v, r)| a.max((v + r).abs()));
                let tol = match algo {
                    ConvAlgo::Winograd(_) => 2e-5 * scale,
                    _ => 1e-4,
                };
                let rconv = Conv {
                    act: ract,
                    ..conv.clone()
                };
                let mut runs = vec![("plain", rconv.clone(), None)];
                if !(algo.is_direct() || (depthwise && algo == ConvAlgo::Auto)) {
                    let isa = Isa::detect();
                    let (pw, pshape) = rconv.packed_weights(&w, ws, isa).unwrap();
                    let pwv = Value::from(Tensor::from_vec(&pshape, pw).unwrap());
                    runs.push(("packed", rconv.with_packed(isa), Some(pwv)));
                }
                for (name, c, pw) in &runs {
                    let mut ins = res_inputs.clone();
                    if let Some(pw) = pw {
                        ins[1] = Some(pw);
                    }
                    let mut bytes = vec![0u8; got.len() * 4];
                    let mut slots = [TensorMut::new(DType::F32, &shape, &mut bytes).unwrap()];
                    c.eval_into(&ins, &mut slots).unwrap();
                    let got: Vec<f32> = bytes
                        .chunks_exact(4)
                        .map(|q| f32::from_le_bytes([q[0], q[1], q[2], q[3]]))
                        .collect();
                    let d = max_diff(&got, &want);
                    assert!(
                        d < tol,
                        "residual, {ract:?}, {name}: xs={xs:?} ws={ws:?} group={group} \
                         win={win:?} {algo:?}: diff {d}"
                    );
                }
            }
        }
        // A residual of the wrong shape is an error.
        let bad = Value::from(Tensor::from_vec(&[res.len()], res.clone()).unwrap());
        let mut ins = res_inputs.clone();
        ins[RESIDUAL_INPUT] = Some(&bad);
        assert!(heuristic.eval(&ins).is_err());
    }

    /// A channels-last tactic computes the convolution on NHWC data: plain and with weights
    /// packed at build time, with the fused residual (NHWC too) under two activations.
    fn check_nhwc(
        conv: &Conv,
        inputs: &[Option<&Value>],
        (w, ws): (&[f32], &[usize]),
        (res, extra): (&[f32], Activation),
        raw: &[f32],
        ys: &[usize],
    ) {
        let x = inputs[0].unwrap().as_tensor().unwrap();
        let xs = x.shape().to_vec();
        let permute = |v: &[f32], s: &[usize], to_nhwc: bool| {
            nhwc::permute_data(v, [s[0], s[1], s[2], s[3]], to_nhwc)
        };
        let nhwc_shape = |s: &[usize]| nhwc::to_nhwc::<_, Vec<usize>>(s);
        let xv = Value::from(
            Tensor::from_vec(
                &nhwc_shape(&xs),
                permute(x.as_slice::<f32>().unwrap(), &xs, true),
            )
            .unwrap(),
        );
        let rv = Value::from(Tensor::from_vec(&nhwc_shape(ys), permute(res, ys, true)).unwrap());
        let fx = Fact::concrete(DType::F32, &nhwc_shape(&xs));
        let fw = Fact::concrete(DType::F32, ws);
        let f = conv.infer(&[Some(&fx), Some(&fw)], 1).unwrap().remove(0);
        assert_eq!(f.concrete_shape().unwrap(), nhwc_shape(ys));
        let mut variants = vec![(conv.clone(), None)];
        if let Some(isa) = conv.weight_packing(&xs, ws) {
            let (pw, pshape) = conv.packed_weights(w, ws, isa).unwrap();
            variants.push((
                conv.with_packed(isa),
                Some(Tensor::from_vec(&pshape, pw).unwrap()),
            ));
        }
        for (c, pw) in &variants {
            let pwv = pw.clone().map(Value::from);
            for (act, residual) in [(conv.act, false), (conv.act, true), (extra, true)] {
                let c = Conv { act, ..c.clone() };
                let mut ins = inputs.to_vec();
                ins[0] = Some(&xv);
                if let Some(p) = &pwv {
                    ins[1] = Some(p);
                }
                if residual {
                    ins.resize(RESIDUAL_INPUT, None);
                    ins.push(Some(&rv));
                }
                let got = c.eval(&ins).unwrap().remove(0).into_tensor().unwrap();
                assert_eq!(got.shape(), nhwc_shape(ys).as_slice());
                let got = permute(got.as_slice::<f32>().unwrap(), ys, false);
                let want: Vec<f32> = raw
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| act.apply(if residual { v + res[i] } else { v }))
                    .collect();
                let d = max_diff(&got, &want);
                assert!(
                    d < 1e-4,
                    "{:?} packed={} residual={residual} {act:?} xs={xs:?} ws={ws:?}: diff {d}",
                    conv.algo,
                    pw.is_some()
                );
            }
        }
    }

    fn win(
        pads: Option<Vec<usize>>,
        strides: Option<Vec<usize>>,
        dil: Option<Vec<usize>>,
    ) -> WindowAttrs {
        WindowAttrs {
            pads,
            strides,
            dilations: dil,
            ..Default::default()
        }
    }

    #[test]
    fn conv2d_matches_reference() {
        check(
            &[2, 3, 7, 13],
            &[5, 3, 3, 3],
            1,
            win(None, None, None),
            true,
            Activation::None,
            1,
        );
        check(
            &[1, 3, 7, 13],
            &[5, 3, 3, 2],
            1,
            win(Some(vec![1, 0, 2, 1]), Some(vec![2, 1]), Some(vec![1, 2])),
            true,
            Activation::Relu,
            2,
        );
        check(
            &[2, 4, 9, 8],
            &[6, 2, 3, 3],
            2,
            win(Some(vec![1, 1, 1, 1]), Some(vec![2, 2]), None),
            false,
            Activation::HardSwish,
            3,
        );
        check(
            &[1, 5, 11, 7],
            &[5, 1, 3, 3],
            5,
            win(Some(vec![1, 1, 1, 1]), Some(vec![2, 2]), Some(vec![2, 2])),
            true,
            Activation::None,
            4,
        );
        check(
            &[2, 4, 12, 12],
            &[8, 1, 3, 3],
            4,
            win(Some(vec![1, 1, 1, 1]), None, None),
            true,
            Activation::Clip { min: 0.0, max: 6.0 },
            5,
        );
        check(
            &[2, 6, 5, 7],
            &[4, 6, 1, 1],
            1,
            win(None, None, None),
            true,
            Activation::Sigmoid,
            6,
        );
        check(
            &[1, 6, 5, 7],
            &[4, 3, 1, 1],
            2,
            win(None, Some(vec![2, 2]), None),
            true,
            Activation::None,
            7,
        );
        // depthwise with a depth multiplier, strides 2×3, dilation, asymmetric pads
        check(
            &[2, 6, 13, 17],
            &[12, 1, 3, 5],
            6,
            win(Some(vec![1, 2, 0, 1]), Some(vec![2, 3]), Some(vec![1, 2])),
            true,
            Activation::HardSwish,
            14,
        );
        // depthwise, stride 2, wide rows (full SIMD vectors plus a tail)
        check(
            &[1, 3, 9, 53],
            &[3, 1, 3, 3],
            3,
            win(Some(vec![1, 1, 1, 1]), Some(vec![2, 2]), None),
            false,
            Activation::Relu,
            15,
        );
        // 3×3 stride 1 with enough channels per group for the Winograd tactics: two
        // groups, a batch, asymmetric pads, odd sizes
        check(
            &[2, 16, 9, 7],
            &[18, 8, 3, 3],
            2,
            win(Some(vec![1, 0, 2, 1]), None, None),
            true,
            Activation::Relu,
            9,
        );
        // large enough to use several im2col tiles
        check(
            &[1, 8, 40, 37],
            &[16, 8, 3, 3],
            1,
            win(Some(vec![1, 1, 1, 1]), None, None),
            true,
            Activation::None,
            8,
        );
    }

    /// The fused residual (and the rest of [`check`]) on the paths small cases miss, at 1, 2
    /// and 3 threads: Winograd (one group and two), batch columns, output positions split
    /// over threads, depthwise planes split over tasks (flattened and row kernels), and the
    /// flattened kernel's channel × row split of one image.
    #[test]
    fn residual_on_every_path_at_1_2_3_threads() {
        /// X shape, W shape, group, window, bias, activation.
        type Case<'a> = (
            &'a [usize],
            &'a [usize],
            usize,
            WindowAttrs,
            bool,
            Activation,
        );
        let p1 = || Some(vec![1, 1, 1, 1]);
        let clip = Activation::Clip {
            min: -0.5,
            max: 0.75,
        };
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let cases: [Case<'_>; 7] = [
                    (
                        &[1, 32, 13, 17],
                        &[40, 32, 3, 3],
                        1,
                        win(p1(), None, None),
                        true,
                        Activation::Relu,
                    ),
                    (
                        &[2, 64, 9, 10],
                        &[64, 32, 3, 3],
                        2,
                        win(Some(vec![1, 0, 1, 1]), None, None),
                        false,
                        Activation::None,
                    ),
                    (
                        &[4, 9, 3, 4],
                        &[11, 9, 3, 3],
                        1,
                        win(p1(), None, None),
                        true,
                        Activation::HardSwish,
                    ),
                    (
                        &[1, 5, 41, 37],
                        &[13, 5, 3, 3],
                        1,
                        win(Some(vec![1, 0, 1, 2]), None, None),
                        true,
                        clip,
                    ),
                    (
                        &[1, 33, 20, 21],
                        &[33, 1, 3, 3],
                        33,
                        win(p1(), None, None),
                        true,
                        Activation::Relu,
                    ),
                    (
                        &[2, 8, 9, 70],
                        &[16, 1, 3, 3],
                        8,
                        win(p1(), Some(vec![2, 2]), None),
                        true,
                        Activation::None,
                    ),
                    (
                        &[1, 3, 40, 41],
                        &[16, 3, 3, 3],
                        1,
                        win(p1(), Some(vec![2, 2]), None),
                        true,
                        Activation::Sigmoid,
                    ),
                ];
                for (i, (xs, ws, group, w, bias, act)) in cases.into_iter().enumerate() {
                    check(xs, ws, group, w, bias, act, 40 + i as u64);
                }
            });
        }
    }

    #[test]
    fn conv1d_and_3d_and_auto_pad() {
        check(
            &[2, 3, 17],
            &[4, 3, 5],
            1,
            win(Some(vec![2, 1]), Some(vec![3]), None),
            true,
            Activation::None,
            10,
        );
        check(
            &[1, 4, 17],
            &[4, 1, 3],
            4,
            win(Some(vec![1, 1]), None, Some(vec![2])),
            true,
            Activation::None,
            11,
        );
        check(
            &[1, 2, 5, 6, 7],
            &[3, 2, 3, 2, 3],
            1,
            win(Some(vec![1, 0, 1, 1, 1, 0]), Some(vec![1, 2, 2]), None),
            true,
            Activation::None,
            12,
        );
        // 3-D depthwise, strides in every dim
        check(
            &[1, 2, 5, 6, 19],
            &[2, 1, 3, 2, 3],
            2,
            win(Some(vec![1, 0, 1, 1, 1, 2]), Some(vec![2, 2, 2]), None),
            true,
            Activation::None,
            16,
        );
        for ap in [AutoPad::SameUpper, AutoPad::SameLower, AutoPad::Valid] {
            let w = WindowAttrs {
                auto_pad: ap,
                strides: Some(vec![2, 2]),
                ..Default::default()
            };
            check(
                &[1, 3, 7, 8],
                &[2, 3, 3, 4],
                1,
                w,
                true,
                Activation::None,
                13,
            );
        }
    }

    #[test]
    fn other_float_dtypes() {
        let x = Tensor::from_vec(&[1, 1, 3, 3], (0..9).map(|v| v as f64).collect()).unwrap();
        let w = Tensor::from_vec(&[1, 1, 2, 2], vec![1.0f64; 4]).unwrap();
        let conv = Conv {
            win: WindowAttrs::default(),
            group: 1,
            act: Activation::None,
            algo: ConvAlgo::Auto,
            packed: None,
        };
        let y = conv
            .eval(&[Some(&x.clone().into()), Some(&w.clone().into())])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(y.as_slice::<f64>().unwrap(), &[8.0, 12.0, 20.0, 24.0]);
        let x16 = x.cast(DType::F16).unwrap();
        let w16 = w.cast(DType::F16).unwrap();
        let y = conv
            .eval(&[Some(&x16.into()), Some(&w16.into())])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(y.dtype(), DType::F16);
        assert_eq!(y.to_f32_vec().unwrap(), vec![8.0, 12.0, 20.0, 24.0]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let conv = Conv {
            win: WindowAttrs::default(),
            group: 2,
            act: Activation::None,
            algo: ConvAlgo::Auto,
            packed: None,
        };
        let x: Value = Tensor::from_vec(&[1, 3, 4, 4], vec![0.0f32; 48])
            .unwrap()
            .into();
        let w: Value = Tensor::from_vec(&[2, 1, 3, 3], vec![0.0f32; 18])
            .unwrap()
            .into();
        assert!(conv.eval(&[Some(&x), Some(&w)]).is_err());
        let conv = Conv {
            win: WindowAttrs::default(),
            group: 1,
            act: Activation::None,
            algo: ConvAlgo::Auto,
            packed: None,
        };
        let w: Value = Tensor::from_vec(&[2, 3, 5, 5], vec![0.0f32; 150])
            .unwrap()
            .into();
        assert!(conv.eval(&[Some(&x), Some(&w)]).is_err());
        let xi: Value = Tensor::from_vec(&[1, 3, 4, 4], vec![0i32; 48])
            .unwrap()
            .into();
        assert!(conv.eval(&[Some(&xi), Some(&w)]).is_err());
        assert!(conv.eval(&[Some(&x)]).is_err());
    }

    #[test]
    fn fused_conv_registered_in_kiln_domain() {
        let mut reg = OpRegistry::new();
        register(&mut reg);
        assert!(reg.contains(KILN_DOMAIN, "Conv"));
        assert!(reg.contains("", "Conv"));
    }

    #[test]
    #[ignore]
    fn bench_conv() {
        use std::time::Instant;
        let cases: [(&str, [usize; 4], [usize; 4], usize); 3] = [
            ("3x3 64->64 56x56", [1, 64, 56, 56], [64, 64, 3, 3], 1),
            ("dw 3x3 32ch 112x112", [1, 32, 112, 112], [32, 1, 3, 3], 32),
            ("1x1 64->256 56x56", [1, 64, 56, 56], [256, 64, 1, 1], 1),
        ];
        for (name, xs, ws, group) in cases {
            let mut r = Lcg(9);
            let x: Value = Tensor::from_vec(&xs, r.vec(xs.iter().product()))
                .unwrap()
                .into();
            let w: Value = Tensor::from_vec(&ws, r.vec(ws.iter().product()))
                .unwrap()
                .into();
            let b: Value = Tensor::from_vec(&[ws[0]], r.vec(ws[0])).unwrap().into();
            let conv = Conv {
                win: win(Some(vec![ws[2] / 2; 4]), None, None),
                group,
                act: Activation::Relu,
                algo: ConvAlgo::Auto,
                packed: None,
            };
            let inputs = [Some(&x), Some(&w), Some(&b)];
            let y = conv.eval(&inputs).unwrap().remove(0).into_tensor().unwrap();
            let shape = y.shape().to_vec();
            let mut bytes = vec![0u8; y.len() * 4];
            let flops = 2.0 * y.len() as f64 * (ws[1] * ws[2] * ws[3]) as f64;
            let mut best = f64::MAX;
            for _ in 0..20 {
                let mut slots = [TensorMut::new(DType::F32, &shape, &mut bytes).unwrap()];
                let t = Instant::now();
                conv.eval_into(&inputs, &mut slots).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{name}: {:.3} ms, {:.1} GFLOP/s ({} threads)",
                best * 1e3,
                flops / best / 1e9,
                crate::parallel::threads()
            );
        }
    }
}
