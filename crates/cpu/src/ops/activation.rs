//! Activations (Relu LeakyRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Softplus
//! Softsign Gelu Mish Swish ThresholdedRelu Shrink Clip) and the axis-wise Softmax,
//! LogSoftmax and Hardmax.

use std::any::Any;

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Fact, KilnError, Op, OpRegistry, Result,
    Tensor, Value,
};
use rayon::prelude::*;

use super::elementwise::num::{Num, Real};
use super::elementwise::{bad_dtype, infer_unary, map_into, new_tensor, one};

/// An elementwise activation and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    /// max(x, 0).
    Relu,
    /// x ≥ 0 ? x : alpha·x.
    LeakyRelu(f32),
    /// x ≥ 0 ? x : alpha·(eˣ − 1).
    Elu(f32),
    /// gamma·(x > 0 ? x : alpha·(eˣ − 1)).
    Selu(f32, f32),
    /// max(0, x) + min(0, alpha·(e^(x/alpha) − 1)).
    Celu(f32),
    /// 1 / (1 + e⁻ˣ).
    Sigmoid,
    /// clamp(alpha·x + beta, 0, 1).
    HardSigmoid(f32, f32),
    /// x · clamp(x/6 + 1/2, 0, 1).
    HardSwish,
    /// ln(1 + eˣ).
    Softplus,
    /// x / (1 + |x|).
    Softsign,
    /// Gelu, exact (erf) or tanh approximation.
    Gelu {
        /// `approximate = "tanh"`.
        tanh: bool,
    },
    /// x · tanh(softplus(x)).
    Mish,
    /// x · sigmoid(alpha·x).
    Swish(f32),
    /// x > alpha ? x : 0.
    ThresholdedRelu(f32),
    /// x < −lambd ? x + bias : x > lambd ? x − bias : 0.
    Shrink {
        /// Added/subtracted outside the band.
        bias: f32,
        /// Half-width of the band mapped to 0.
        lambd: f32,
    },
}

/// An elementwise activation op.
#[derive(Debug, Clone)]
pub struct Activation {
    name: &'static str,
    act: Act,
}

impl Activation {
    /// An op named `name` applying `act`.
    pub fn new(name: &'static str, act: Act) -> Self {
        Activation { name, act }
    }

    /// The activation.
    pub fn act(&self) -> Act {
        self.act
    }
}

impl Op for Activation {
    fn op_type(&self) -> &str {
        self.name
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_unary(inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.name)?;
        one(activation_eval(self.name, self.act, x)?)
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Value>],
        outputs: &mut [kiln_core::TensorMut<'_>],
    ) -> Result<()> {
        let x = input_tensor(inputs, 0, self.name)?;
        match outputs.first_mut() {
            Some(o) if x.dtype() == DType::F32 && o.dtype() == DType::F32 => {
                let o = o.as_mut_slice::<f32>()?;
                let v = x.as_slice::<f32>()?;
                if o.len() != v.len() {
                    return Err(KilnError::kernel(
                        self.name,
                        "output slot size differs from the input",
                    ));
                }
                act_f32(self.act, v, o);
                Ok(())
            }
            Some(o) => o.copy_from(&activation_eval(self.name, self.act, x)?),
            None => Ok(()),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Applies an activation to a tensor (the kernel behind [`Activation`]).
pub fn activation_eval(op: &str, act: Act, x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    if dt == DType::F32 {
        let v = x.as_slice::<f32>()?;
        return new_tensor::<f32>(dt, x.shape(), |o| {
            act_f32(act, v, o);
            Ok(())
        });
    }
    if dt.is_float() {
        return crate::dispatch_float!(dt, T => {
            let v = x.as_slice::<T>()?;
            new_tensor::<T>(dt, x.shape(), |o| { float_act(act, v, o); Ok(()) })
        }, _ => Err(bad_dtype(op, dt)));
    }
    match act {
        Act::Relu | Act::Shrink { .. } => crate::dispatch_numeric!(dt, T => {
            let v = x.as_slice::<T>()?;
            new_tensor::<T>(dt, x.shape(), |o| { int_act(act, v, o); Ok(()) })
        }, _ => Err(bad_dtype(op, dt))),
        _ => Err(bad_dtype(op, dt)),
    }
}

fn int_act<T: Num>(act: Act, v: &[T], o: &mut [T]) {
    match act {
        Act::Shrink { bias, lambd } => {
            let (bias, lambd) = (bias as f64, lambd as f64);
            map_into(v, o, |x| {
                let f = x.as_f64();
                T::of_f64(if f < -lambd {
                    f + bias
                } else if f > lambd {
                    f - bias
                } else {
                    0.0
                })
            })
        }
        _ => map_into(v, o, |x| x.maxv(T::ZERO)),
    }
}

/// Applies a float activation from `v` into `o` (same length).
pub fn float_act<T: Real>(act: Act, v: &[T], o: &mut [T]) {
    let c = |f: f32| T::of_f64(f as f64);
    let (zero, one) = (T::ZERO, T::ONE);
    match act {
        // NaN fails `x < zero` and propagates, as numpy's maximum does.
        Act::Relu => map_into(v, o, |&x| if x < zero { zero } else { x }),
        Act::LeakyRelu(a) => {
            let a = c(a);
            map_into(v, o, |&x| if x >= zero { x } else { a * x })
        }
        Act::Elu(a) => {
            let a = c(a);
            map_into(v, o, |&x| if x >= zero { x } else { a * (x.exp() - one) })
        }
        Act::Selu(a, g) => {
            let (a, g) = (c(a), c(g));
            map_into(v, o, |&x| {
                if x > zero {
                    g * x
                } else {
                    g * (a * x.exp() - a)
                }
            })
        }
        Act::Celu(a) => {
            let a = c(a);
            map_into(v, o, |&x| {
                x.max(zero) + (a * ((x / a).exp() - one)).min(zero)
            })
        }
        Act::Sigmoid => map_into(v, o, |&x| sigmoid(x)),
        Act::HardSigmoid(a, b) => {
            let (a, b) = (c(a), c(b));
            map_into(v, o, |&x| (a * x + b).max(zero).min(one))
        }
        Act::HardSwish => {
            let (s, h) = (c(1.0 / 6.0), c(0.5));
            map_into(v, o, |&x| x * (x * s + h).max(zero).min(one))
        }
        Act::Softplus => map_into(v, o, |&x| softplus(x)),
        Act::Softsign => map_into(v, o, |&x| x / (one + x.abs())),
        Act::Gelu { tanh: false } => map_into(v, o, |&x| {
            let f = x.as_f64();
            T::of_f64(0.5 * f * (1.0 + libm::erf(f * std::f64::consts::FRAC_1_SQRT_2)))
        }),
        Act::Gelu { tanh: true } => map_into(v, o, |&x| {
            let f = x.as_f64();
            let k = (2.0 / std::f64::consts::PI).sqrt();
            T::of_f64(0.5 * f * (1.0 + (k * (f + 0.044715 * f * f * f)).tanh()))
        }),
        Act::Mish => map_into(v, o, |&x| x * softplus(x).tanh()),
        Act::Swish(a) => {
            let a = c(a);
            map_into(v, o, |&x| x * sigmoid(a * x))
        }
        Act::ThresholdedRelu(a) => {
            let a = c(a);
            map_into(v, o, |&x| if x > a { x } else { zero })
        }
        Act::Shrink { bias, lambd } => {
            let (b, l) = (c(bias), c(lambd));
            map_into(v, o, |&x| {
                if x < -l {
                    x + b
                } else if x > l {
                    x - b
                } else {
                    zero
                }
            })
        }
    }
}

/// e^x for f32 written with plain arithmetic so loops over it vectorize (Cephes
/// polynomial, relative error ~2e-7). Inputs are clamped to [-87, 88]; NaN propagates.
#[inline(always)]
pub fn exp_f32_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = if x > 88.0 { 88.0 } else { x };
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

/// tanh for f32 written with plain arithmetic so loops over it vectorize: `1 − 2 / (1 +
/// e^{2x})` with [`exp_f32_fast`] (absolute error ~1e-7; ±1 at the extremes, NaN kept),
/// and the Taylor series to x⁷ for |x| < 1/16, where that formula would lose the relative
/// precision of tiny results.
#[inline(always)]
pub fn tanh_f32_fast(v: f32) -> f32 {
    let big = 1.0 - 2.0 / (1.0 + exp_f32_fast(2.0 * v));
    let v2 = v * v;
    let small = v * (1.0 + v2 * (-1.0 / 3.0 + v2 * (2.0 / 15.0 + v2 * (-17.0 / 315.0))));
    if v.abs() < 0.0625 {
        small
    } else {
        big
    }
}

/// f32 activations with vectorizable fast paths for the common ones.
pub fn act_f32(act: Act, v: &[f32], o: &mut [f32]) {
    match act {
        Act::Relu => map_into(v, o, |&x| if x < 0.0 { 0.0 } else { x }),
        Act::Sigmoid => map_into(v, o, |&x| 1.0 / (1.0 + exp_f32_fast(-x))),
        Act::Swish(a) => map_into(v, o, |&x| x / (1.0 + exp_f32_fast(-a * x))),
        Act::HardSigmoid(a, b) => map_into(v, o, |&x| clamp_plain(a * x + b, 0.0, 1.0)),
        Act::HardSwish => map_into(v, o, |&x| x * clamp_plain(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)),
        Act::LeakyRelu(a) => map_into(v, o, |&x| if x < 0.0 { a * x } else { x }),
        _ => float_act(act, v, o),
    }
}

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

#[inline(always)]
fn softplus<T: Real>(x: T) -> T {
    if x > T::ZERO {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `Clip(x, min, max)`: bounds from attributes (opset < 11) or optional inputs.
#[derive(Debug, Clone)]
pub struct Clip {
    /// Attribute bounds (opset < 11).
    attr_bounds: Option<(f32, f32)>,
}

impl Op for Clip {
    fn op_type(&self) -> &str {
        "Clip"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_unary(inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "Clip")?;
        let (lo, hi) = self.bounds(inputs, x)?;
        let dt = x.dtype();
        let out = crate::dispatch_numeric!(dt, T => clip::<T>(x, lo.as_ref(), hi.as_ref()), _ => Err(bad_dtype("Clip", dt)))?;
        one(out)
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Value>],
        outputs: &mut [kiln_core::TensorMut<'_>],
    ) -> Result<()> {
        let x = input_tensor(inputs, 0, "Clip")?;
        let Some(o) = outputs.first_mut() else {
            return Ok(());
        };
        if x.dtype() == DType::F32 && o.dtype() == DType::F32 && o.shape() == x.shape() {
            let (lo, hi) = self.bounds(inputs, x)?;
            let lo = lo.map_or(Ok(f32::NEG_INFINITY), |t| t.as_slice::<f32>().map(|s| s[0]))?;
            let hi = hi.map_or(Ok(f32::INFINITY), |t| t.as_slice::<f32>().map(|s| s[0]))?;
            map_into(x.as_slice::<f32>()?, o.as_mut_slice::<f32>()?, |a| {
                clamp_plain(*a, lo, hi)
            });
            return Ok(());
        }
        let r = self.eval(inputs)?;
        o.copy_from(r[0].as_tensor()?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Clip {
    fn bounds(
        &self,
        inputs: &[Option<&Value>],
        x: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (lo, hi) = match self.attr_bounds {
            Some((lo, hi)) => (
                Some(Tensor::scalar(lo).cast(x.dtype())?),
                Some(Tensor::scalar(hi).cast(x.dtype())?),
            ),
            None => (
                optional_tensor(inputs, 1, "Clip")?.cloned(),
                optional_tensor(inputs, 2, "Clip")?.cloned(),
            ),
        };
        for b in [&lo, &hi].into_iter().flatten() {
            if b.dtype() != x.dtype() || b.len() != 1 {
                return Err(KilnError::kernel(
                    "Clip",
                    format!(
                        "min/max must be {} scalars, found {} {:?}",
                        x.dtype(),
                        b.dtype(),
                        b.shape()
                    ),
                ));
            }
        }
        Ok((lo, hi))
    }
}

fn clip<T: Num>(x: &Tensor, lo: Option<&Tensor>, hi: Option<&Tensor>) -> Result<Tensor> {
    let lo = match lo {
        Some(t) => t.as_slice::<T>()?[0],
        None => T::LOWEST,
    };
    let hi = match hi {
        Some(t) => t.as_slice::<T>()?[0],
        None => T::HIGHEST,
    };
    let v = x.as_slice::<T>()?;
    new_tensor::<T>(T::DTYPE, x.shape(), |o| {
        // NaN inputs fall through both comparisons and propagate, as in numpy.
        map_into(v, o, |a| clamp_plain(*a, lo, hi));
        Ok(())
    })
}

#[inline(always)]
fn clamp_plain<T: PartialOrd + Copy>(a: T, lo: T, hi: T) -> T {
    let a = if a < lo { lo } else { a };
    if a > hi {
        hi
    } else {
        a
    }
}

/// Which axis-wise normalisation a [`SoftmaxOp`] computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SoftKind {
    /// exp(x) / Σ exp(x).
    Softmax,
    /// log of softmax.
    LogSoftmax,
    /// One-hot of the first maximum.
    Hardmax,
}

/// Softmax / LogSoftmax / Hardmax along an axis (opset < 13: over the 2-D coercion at `axis`).
#[derive(Debug, Clone)]
pub struct SoftmaxOp {
    name: &'static str,
    kind: SoftKind,
    axis: i64,
    coerce_2d: bool,
}

impl SoftmaxOp {
    /// Splits a shape into (outer, axis length, inner) for this op's axis.
    fn split(&self, shape: &[usize]) -> Result<(usize, usize, usize)> {
        let r = shape.len() as i64;
        let ax = if self.axis < 0 {
            self.axis + r
        } else {
            self.axis
        };
        if ax < 0 || ax > r || (ax == r && !(self.coerce_2d || r == 0)) {
            return Err(KilnError::kernel(
                self.name,
                format!("axis {} out of range for rank {r}", self.axis),
            ));
        }
        let ax = ax as usize;
        let outer: usize = shape[..ax].iter().product();
        if self.coerce_2d || r == 0 {
            return Ok((outer, shape[ax..].iter().product(), 1));
        }
        Ok((outer, shape[ax], shape[ax + 1..].iter().product()))
    }
}

impl Op for SoftmaxOp {
    fn op_type(&self) -> &str {
        self.name
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_unary(inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.name)?;
        let (outer, n, inner) = self.split(x.shape())?;
        let dt = x.dtype();
        let out = match dt {
            DType::F32 => {
                let v = x.as_slice::<f32>()?;
                new_tensor::<f32>(dt, x.shape(), |o| {
                    softmax_into_f32(v, o, self.kind, outer, n, inner);
                    Ok(())
                })?
            }
            DType::F64 => softmax_t::<f64>(x, self.kind, outer, n, inner)?,
            DType::F16 | DType::BF16 => {
                softmax_t::<f32>(&x.cast(DType::F32)?, self.kind, outer, n, inner)?.cast(dt)?
            }
            _ => return Err(bad_dtype(self.name, dt)),
        };
        one(out)
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Value>],
        outputs: &mut [kiln_core::TensorMut<'_>],
    ) -> Result<()> {
        let x = input_tensor(inputs, 0, self.name)?;
        match outputs.first_mut() {
            Some(o) if x.dtype() == DType::F32 && o.dtype() == DType::F32 => {
                let (outer, n, inner) = self.split(x.shape())?;
                let o = o.as_mut_slice::<f32>()?;
                let v = x.as_slice::<f32>()?;
                if o.len() != v.len() {
                    return Err(KilnError::kernel(
                        self.name,
                        "output slot size differs from the input",
                    ));
                }
                softmax_into_f32(v, o, self.kind, outer, n, inner);
                Ok(())
            }
            Some(o) => {
                let r = self.eval(inputs)?;
                o.copy_from(r[0].as_tensor()?)
            }
            None => Ok(()),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn softmax_t<T: Real>(
    x: &Tensor,
    kind: SoftKind,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<Tensor> {
    let v = x.as_slice::<T>()?;
    new_tensor::<T>(T::DTYPE, x.shape(), |o| {
        softmax_into(v, o, kind, outer, n, inner);
        Ok(())
    })
}

/// Softmax-family kernel over a [outer, n, inner] view.
pub fn softmax_into<T: Real>(
    v: &[T],
    o: &mut [T],
    kind: SoftKind,
    outer: usize,
    n: usize,
    inner: usize,
) {
    let block = n * inner;
    if block == 0 || outer == 0 {
        return;
    }
    let work = |src: &[T], dst: &mut [T]| {
        if inner == 1 {
            soft_row(src, dst, kind);
        } else {
            soft_strided(src, dst, kind, n, inner);
        }
    };
    if v.len() >= super::elementwise::broadcast::PAR_MIN && outer > 1 && crate::parallel::enabled()
    {
        o.par_chunks_mut(block)
            .zip(v.par_chunks(block))
            .for_each(|(d, s)| work(s, d));
    } else {
        for (d, s) in o.chunks_mut(block).zip(v.chunks(block)) {
            work(s, d);
        }
    }
}

/// Sum with 8 independent lanes (vectorizes; differs from a sequential sum only by rounding).
#[inline]
pub fn sum_f32(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Maximum ignoring NaN (−inf for an empty or all-NaN slice), with 8 lanes.
#[inline]
pub fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a })
}

/// f32 softmax-family kernel: contiguous rows use a vectorized exp; other layouts fall back
/// to [`softmax_into`].
pub fn softmax_into_f32(
    v: &[f32],
    o: &mut [f32],
    kind: SoftKind,
    outer: usize,
    n: usize,
    inner: usize,
) {
    if inner != 1 || kind == SoftKind::Hardmax || n == 0 || outer == 0 {
        return softmax_into(v, o, kind, outer, n, inner);
    }
    if v.len() >= super::elementwise::broadcast::PAR_MIN && outer > 1 && crate::parallel::enabled()
    {
        let rows = (super::elementwise::broadcast::PAR_CHUNK / n).max(1);
        o.par_chunks_mut(rows * n)
            .zip(v.par_chunks(rows * n))
            .for_each(|(d, s)| {
                for (d, s) in d.chunks_mut(n).zip(s.chunks(n)) {
                    soft_row_f32(s, d, kind);
                }
            });
    } else {
        for (d, s) in o.chunks_mut(n).zip(v.chunks(n)) {
            soft_row_f32(s, d, kind);
        }
    }
}

fn soft_row_f32(x: &[f32], o: &mut [f32], kind: SoftKind) {
    let m = if x.iter().any(|v| v.is_nan()) {
        f32::NAN
    } else {
        max_f32(x)
    };
    for (d, &a) in o.iter_mut().zip(x) {
        *d = exp_f32_fast(a - m);
    }
    let s = sum_f32(o);
    if kind == SoftKind::Softmax {
        let inv = 1.0 / s;
        for d in o.iter_mut() {
            *d *= inv;
        }
    } else {
        let ls = s.ln() + m;
        for (d, &a) in o.iter_mut().zip(x) {
            *d = a - ls;
        }
    }
}

fn soft_row<T: Real>(x: &[T], o: &mut [T], kind: SoftKind) {
    let mut m = x[0];
    let mut arg = 0;
    for (i, &a) in x.iter().enumerate().skip(1) {
        if a > m {
            m = a;
            arg = i;
        }
    }
    match kind {
        SoftKind::Hardmax => {
            for (i, d) in o.iter_mut().enumerate() {
                *d = if i == arg { T::ONE } else { T::ZERO };
            }
        }
        SoftKind::Softmax => {
            let mut s = T::ZERO;
            for (d, &a) in o.iter_mut().zip(x) {
                *d = (a - m).exp();
                s = s + *d;
            }
            let inv = T::ONE / s;
            for d in o.iter_mut() {
                *d = *d * inv;
            }
        }
        SoftKind::LogSoftmax => {
            let mut s = T::ZERO;
            for &a in x {
                s = s + (a - m).exp();
            }
            let ls = s.ln() + m;
            for (d, &a) in o.iter_mut().zip(x) {
                *d = a - ls;
            }
        }
    }
}

fn soft_strided<T: Real>(x: &[T], o: &mut [T], kind: SoftKind, n: usize, inner: usize) {
    let mut m = x[..inner].to_vec();
    let mut arg = vec![0usize; inner];
    for k in 1..n {
        for (j, (mj, aj)) in m.iter_mut().zip(arg.iter_mut()).enumerate() {
            let a = x[k * inner + j];
            if a > *mj {
                *mj = a;
                *aj = k;
            }
        }
    }
    match kind {
        SoftKind::Hardmax => {
            for k in 0..n {
                for j in 0..inner {
                    o[k * inner + j] = if arg[j] == k { T::ONE } else { T::ZERO };
                }
            }
        }
        SoftKind::Softmax | SoftKind::LogSoftmax => {
            let mut s = vec![T::ZERO; inner];
            for k in 0..n {
                for j in 0..inner {
                    let e = (x[k * inner + j] - m[j]).exp();
                    o[k * inner + j] = e;
                    s[j] = s[j] + e;
                }
            }
            for k in 0..n {
                for j in 0..inner {
                    let i = k * inner + j;
                    o[i] = if kind == SoftKind::Softmax {
                        o[i] / s[j]
                    } else {
                        x[i] - m[j] - s[j].ln()
                    };
                }
            }
        }
    }
}

fn build_softmax(ctx: &BuildCtx, name: &'static str, kind: SoftKind) -> Result<Box<dyn Op>> {
    let coerce_2d = ctx.opset() < 13;
    let axis = ctx.attrs().int("axis", if coerce_2d { 1 } else { -1 })?;
    Ok(Box::new(SoftmaxOp {
        name,
        kind,
        axis,
        coerce_2d,
    }))
}

fn build_clip(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    if ctx.opset() < 11 {
        let a = ctx.attrs();
        let lo = a.float("min", f32::MIN)?;
        let hi = a.float("max", f32::MAX)?;
        return Ok(Box::new(Clip {
            attr_bounds: Some((lo, hi)),
        }));
    }
    Ok(Box::new(Clip { attr_bounds: None }))
}

fn act_op(name: &'static str, act: Act) -> Result<Box<dyn Op>> {
    Ok(Box::new(Activation::new(name, act)))
}

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("Relu", |_c: &BuildCtx| act_op("Relu", Act::Relu));
    reg.register("Sigmoid", |_c: &BuildCtx| act_op("Sigmoid", Act::Sigmoid));
    reg.register("HardSwish", |_c: &BuildCtx| {
        act_op("HardSwish", Act::HardSwish)
    });
    reg.register("Softplus", |_c: &BuildCtx| {
        act_op("Softplus", Act::Softplus)
    });
    reg.register("Softsign", |_c: &BuildCtx| {
        act_op("Softsign", Act::Softsign)
    });
    reg.register("Mish", |_c: &BuildCtx| act_op("Mish", Act::Mish));
    reg.register("LeakyRelu", |c: &BuildCtx| {
        act_op("LeakyRelu", Act::LeakyRelu(c.attrs().float("alpha", 0.01)?))
    });
    reg.register("Elu", |c: &BuildCtx| {
        act_op("Elu", Act::Elu(c.attrs().float("alpha", 1.0)?))
    });
    reg.register("Celu", |c: &BuildCtx| {
        act_op("Celu", Act::Celu(c.attrs().float("alpha", 1.0)?))
    });
    reg.register("Swish", |c: &BuildCtx| {
        act_op("Swish", Act::Swish(c.attrs().float("alpha", 1.0)?))
    });
    reg.register("ThresholdedRelu", |c: &BuildCtx| {
        act_op(
            "ThresholdedRelu",
            Act::ThresholdedRelu(c.attrs().float("alpha", 1.0)?),
        )
    });
    reg.register("Selu", |c: &BuildCtx| {
        let a = c.attrs();
        act_op(
            "Selu",
            Act::Selu(a.float("alpha", 1.673_263_2)?, a.float("gamma", 1.050_701)?),
        )
    });
    reg.register("HardSigmoid", |c: &BuildCtx| {
        let a = c.attrs();
        act_op(
            "HardSigmoid",
            Act::HardSigmoid(a.float("alpha", 0.2)?, a.float("beta", 0.5)?),
        )
    });
    reg.register("Shrink", |c: &BuildCtx| {
        let a = c.attrs();
        act_op(
            "Shrink",
            Act::Shrink {
                bias: a.float("bias", 0.0)?,
                lambd: a.float("lambd", 0.5)?,
            },
        )
    });
    reg.register("Gelu", |c: &BuildCtx| {
        let a = c.attrs();
        let tanh = match a.string("approximate", "none")?.as_str() {
            "none" => false,
            "tanh" => true,
            other => {
                return Err(a.invalid(format!("approximate must be none or tanh, found {other:?}")))
            }
        };
        act_op("Gelu", Act::Gelu { tanh })
    });
    reg.register("Clip", build_clip);
    reg.register("Softmax", |c: &BuildCtx| {
        build_softmax(c, "Softmax", SoftKind::Softmax)
    });
    reg.register("LogSoftmax", |c: &BuildCtx| {
        build_softmax(c, "LogSoftmax", SoftKind::LogSoftmax)
    });
    reg.register("Hardmax", |c: &BuildCtx| {
        build_softmax(c, "Hardmax", SoftKind::Hardmax)
    });
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::testutil::*;
    use kiln_core::{Attr, Tensor};

    fn check(op: &str, attrs: Vec<(&str, Attr)>, f: impl Fn(f32) -> f32) {
        let x = rand(53, 7);
        let y = run1(op, 22, attrs, &[Some(f32t(&[53], x.clone()))]).unwrap();
        let want: Vec<f32> = x.iter().map(|v| f(*v)).collect();
        close(y.as_slice::<f32>().unwrap(), &want, 1e-5);
    }

    #[test]
    fn activations() {
        check("Relu", vec![], |x| x.max(0.0));
        check("Sigmoid", vec![], |x| 1.0 / (1.0 + (-x).exp()));
        check("LeakyRelu", vec![("alpha", Attr::Float(0.1))], |x| {
            if x >= 0.0 {
                x
            } else {
                0.1 * x
            }
        });
        check("Elu", vec![], |x| if x >= 0.0 { x } else { x.exp() - 1.0 });
        check("HardSigmoid", vec![], |x| (0.2 * x + 0.5).clamp(0.0, 1.0));
        check("HardSwish", vec![], |x| x * (x / 6.0 + 0.5).clamp(0.0, 1.0));
        check("Softplus", vec![], |x| (x.exp() + 1.0).ln());
        check("Softsign", vec![], |x| x / (1.0 + x.abs()));
        check("Mish", vec![], |x| x * ((x.exp() + 1.0).ln()).tanh());
        check("Swish", vec![("alpha", Attr::Float(2.0))], |x| {
            x / (1.0 + (-2.0 * x).exp())
        });
        check("ThresholdedRelu", vec![], |x| if x > 1.0 { x } else { 0.0 });
        check("Shrink", vec![("bias", Attr::Float(0.3))], |x| {
            if x < -0.5 {
                x + 0.3
            } else if x > 0.5 {
                x - 0.3
            } else {
                0.0
            }
        });
        check("Celu", vec![("alpha", Attr::Float(2.0))], |x| {
            x.max(0.0) + (2.0 * ((x / 2.0).exp() - 1.0)).min(0.0)
        });
        check(
            "Gelu",
            vec![("approximate", Attr::String("tanh".into()))],
            |x| {
                0.5 * x
                    * (1.0
                        + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
            },
        );
        let y = run1(
            "Relu",
            14,
            vec![],
            &[Some(Tensor::from_vec(&[3], vec![-1i8, 0, 5]).unwrap())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<i8>().unwrap(), &[0, 0, 5]);
        assert!(run1(
            "Sigmoid",
            13,
            vec![],
            &[Some(Tensor::from_vec(&[1], vec![1i32]).unwrap())]
        )
        .is_err());
    }

    #[test]
    fn fast_exp_accuracy() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp_f32_fast(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-6, "{x}: {a} vs {b}");
            x += 0.0137;
        }
        assert!(super::exp_f32_fast(f32::NAN).is_nan());
        assert_eq!(super::exp_f32_fast(0.0), 1.0);
        let big = rand(200_000, 3);
        let y = run1(
            "Sigmoid",
            13,
            vec![],
            &[Some(f32t(&[200, 1000], big.clone()))],
        )
        .unwrap();
        let want: Vec<f32> = big.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
        close(y.as_slice::<f32>().unwrap(), &want, 1e-6);
        let y = run1(
            "Softmax",
            13,
            vec![],
            &[Some(f32t(&[200, 1000], big.clone()))],
        )
        .unwrap();
        close(
            y.as_slice::<f32>().unwrap(),
            &naive_softmax(&big, &[200, 1000], 1, false),
            1e-5,
        );
        let nan = f32t(&[2, 2], vec![1.0, f32::NAN, 1.0, 2.0]);
        let y = run1("Softmax", 13, vec![], &[Some(nan)]).unwrap();
        let y = y.as_slice::<f32>().unwrap();
        assert!(y[0].is_nan() && y[1].is_nan() && !y[2].is_nan());
    }

    #[test]
    fn clip_versions() {
        let x = f32t(&[4], vec![-3.0, -0.5, 0.5, 3.0]);
        let y = run1(
            "Clip",
            6,
            vec![("min", Attr::Float(-1.0)), ("max", Attr::Float(1.0))],
            &[Some(x.clone())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[-1.0, -0.5, 0.5, 1.0]);
        let y = run1(
            "Clip",
            13,
            vec![],
            &[Some(x.clone()), None, Some(f32t(&[], vec![0.0]))],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[-3.0, -0.5, 0.0, 0.0]);
        let y = run1("Clip", 13, vec![], &[Some(x.clone())]).unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), x.as_slice::<f32>().unwrap());
        let i = Tensor::from_vec(&[3], vec![-5i64, 2, 9]).unwrap();
        let lo = Tensor::scalar(0i64);
        let y = run1(
            "Clip",
            13,
            vec![],
            &[Some(i), Some(lo), Some(Tensor::scalar(4i64))],
        )
        .unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[0, 2, 4]);
        assert!(run1("Clip", 13, vec![], &[Some(x), Some(Tensor::scalar(0i64))]).is_err());
    }

    fn naive_softmax(x: &[f32], shape: &[usize], axis: usize, log: bool) -> Vec<f32> {
        let outer: usize = shape[..axis].iter().product();
        let n = shape[axis];
        let inner: usize = shape[axis + 1..].iter().product();
        let mut out = vec![0.0; x.len()];
        for a in 0..outer {
            for j in 0..inner {
                let idx = |k: usize| a * n * inner + k * inner + j;
                let m = (0..n).map(|k| x[idx(k)]).fold(f32::MIN, f32::max);
                let s: f32 = (0..n).map(|k| (x[idx(k)] - m).exp()).sum();
                for k in 0..n {
                    out[idx(k)] = if log {
                        x[idx(k)] - m - s.ln()
                    } else {
                        (x[idx(k)] - m).exp() / s
                    };
                }
            }
        }
        out
    }

    #[test]
    fn softmax_axes() {
        let shape = [3, 4, 5];
        let x = rand(60, 9);
        for axis in 0..3 {
            for (op, log) in [("Softmax", false), ("LogSoftmax", true)] {
                let y = run1(
                    op,
                    13,
                    vec![("axis", Attr::Int(axis as i64))],
                    &[Some(f32t(&shape, x.clone()))],
                )
                .unwrap();
                close(
                    y.as_slice::<f32>().unwrap(),
                    &naive_softmax(&x, &shape, axis, log),
                    1e-5,
                );
            }
        }
        // Opset 11: coerced to 2-D at axis 1 → softmax over the last 20 elements.
        let y = run1("Softmax", 11, vec![], &[Some(f32t(&shape, x.clone()))]).unwrap();
        close(
            y.as_slice::<f32>().unwrap(),
            &naive_softmax(&x, &[3, 20], 1, false),
            1e-5,
        );
        let y = run1(
            "Hardmax",
            13,
            vec![("axis", Attr::Int(0))],
            &[Some(f32t(&[2, 2], vec![1.0, 5.0, 3.0, 5.0]))],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[0.0, 1.0, 1.0, 0.0]);
        let y = run1(
            "Hardmax",
            13,
            vec![],
            &[Some(f32t(&[1, 3], vec![3.0, 3.0, 1.0]))],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[1.0, 0.0, 0.0]);
        assert!(run1(
            "Softmax",
            13,
            vec![("axis", Attr::Int(3))],
            &[Some(f32t(&shape, x))]
        )
        .is_err());
    }
}
