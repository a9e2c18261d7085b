//! Normalization ops: BatchNormalization, InstanceNormalization, LayerNormalization,
//! GroupNormalization (opset 18 per-group and opset 21 per-channel affine),
//! RMSNormalization, LpNormalization, MeanVarianceNormalization, LRN.
//!
//! Inputs of f16/bf16 are computed in f32; f64 stays f64. Statistics accumulate in f64.

use std::any::Any;

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result,
    Tensor, Value, ValueKind,
};
use rayon::prelude::*;

use super::elementwise::broadcast::PAR_MIN;
use super::elementwise::num::{Num, Real};
use super::elementwise::{bad_dtype, infer_unary, new_tensor, Plan};
use kiln_core::Element;

/// The dtype a float kernel computes in: f64 for f64, f32 for the other floats.
fn compute_dtype(op: &str, dt: DType) -> Result<DType> {
    match dt {
        DType::F64 => Ok(DType::F64),
        DType::F32 | DType::F16 | DType::BF16 => Ok(DType::F32),
        other => Err(bad_dtype(op, other)),
    }
}

/// Casts a float tensor to the compute dtype (free when it already is).
fn to_compute(op: &str, t: &Tensor, cdt: DType) -> Result<Tensor> {
    if !t.dtype().is_float() {
        return Err(bad_dtype(op, t.dtype()));
    }
    t.cast(cdt)
}

/// Runs a float kernel on `x` (and float side inputs), casting to f32/f64 and back.
macro_rules! float_kernel {
    ($op:expr, $x:expr, $T:ident => $body:expr) => {{
        let cdt = compute_dtype($op, $x.dtype())?;
        let outs: Vec<Tensor> = match cdt {
            DType::F64 => {
                type $T = f64;
                $body
            }
            _ => {
                type $T = f32;
                $body
            }
        };
        outs
    }};
}

fn cast_back(outs: Vec<Tensor>, dt: DType) -> Result<Vec<Value>> {
    outs.into_iter()
        .map(|t| Ok(Value::Tensor(if t.dtype() == dt { t } else { t.cast(dt)? })))
        .collect()
}

fn normalize_axis(op: &str, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a > r {
        return Err(KilnError::kernel(
            op,
            format!("axis {axis} is out of range for rank {rank}"),
        ));
    }
    Ok(a as usize)
}

/// Expands a per-channel parameter of `c` elements (any shape holding `c` values) to a Vec.
fn per_channel<T: Real>(op: &str, name: &str, t: &Tensor, c: usize) -> Result<Vec<T>> {
    if t.len() != c {
        return Err(KilnError::kernel(
            op,
            format!("{name} has {} elements, expected {c}", t.len()),
        ));
    }
    Ok(t.cast(T::DTYPE)?.as_slice::<T>()?.to_vec())
}

/// Broadcasts a parameter to `shape` (unidirectionally) and returns it flattened.
fn broadcast_param<T: Real>(op: &str, name: &str, t: &Tensor, shape: &[usize]) -> Result<Vec<T>> {
    let t = t.cast(T::DTYPE)?;
    if t.shape() == shape {
        return Ok(t.as_slice::<T>()?.to_vec());
    }
    let plan = Plan::new(op, &[shape, t.shape()])?;
    if plan.out_shape.as_slice() != shape {
        return Err(KilnError::kernel(
            op,
            format!(
                "{name} of shape {:?} does not broadcast to {shape:?}",
                t.shape()
            ),
        ));
    }
    let src = t.as_slice::<T>()?;
    Ok(plan.indices().iter().map(|ix| src[ix[1]]).collect())
}

// ---------------------------------------------------------------------------------------
// BatchNormalization

/// BatchNormalization (inference, or training statistics when asked for).
#[derive(Debug, Clone)]
pub struct BatchNorm {
    epsilon: f32,
    momentum: f32,
    training: bool,
    /// Opset < 14 training outputs (Y, mean, var, saved_mean, saved_var).
    legacy_outputs: bool,
}

impl Op for BatchNorm {
    fn op_type(&self) -> &str {
        "BatchNormalization"
    }

    fn infer(&self, inputs: &[Option<&Fact>], n: usize) -> Result<Vec<Fact>> {
        let mut out = infer_unary(inputs, None)?;
        let x = inputs.first().copied().flatten();
        let c = x
            .and_then(|f| f.shape.as_ref())
            .and_then(|s| s.get(1).cloned())
            .unwrap_or(Dim::Unknown);
        let dt = inputs
            .get(3)
            .copied()
            .flatten()
            .and_then(|f| f.dtype)
            .or(x.and_then(|f| f.dtype));
        for _ in 1..n {
            out.push(Fact {
                kind: ValueKind::Tensor,
                dtype: dt,
                shape: Some(vec![c.clone()]),
                konst: None,
            });
        }
        Ok(out)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "BatchNormalization";
        let x = input_tensor(inputs, 0, OP)?;
        let p: Vec<&Tensor> = (1..5)
            .map(|i| input_tensor(inputs, i, OP))
            .collect::<Result<_>>()?;
        if x.rank() < 2 {
            if x.rank() == 1 {
                // A 1-D input is [C] with no batch or spatial dims.
                let x2 = x.reshape(&[1, x.len()])?;
                let vals: Vec<Value> = self.eval(&[
                    Some(&Value::Tensor(x2)),
                    inputs[1],
                    inputs[2],
                    inputs[3],
                    inputs[4],
                ])?;
                let y = vals[0].as_tensor()?.reshape(x.shape())?;
                let mut out = vec![Value::Tensor(y)];
                out.extend(vals.into_iter().skip(1));
                return Ok(out);
            }
            return Err(KilnError::kernel(
                OP,
                format!("input must have rank >= 1, found {:?}", x.shape()),
            ));
        }
        let (n, c) = (x.shape()[0], x.shape()[1]);
        let spatial: usize = x.shape()[2..].iter().product();
        let xdt = x.dtype();
        let stat_dt = p[2].dtype();
        let outs = float_kernel!(OP, x, T => {
            let xs = to_compute(OP, x, T::DTYPE)?;
            let xv = xs.as_slice::<T>()?;
            let scale = per_channel::<T>(OP, "scale", p[0], c)?;
            let bias = per_channel::<T>(OP, "B", p[1], c)?;
            let mut mean = per_channel::<T>(OP, "input_mean", p[2], c)?;
            let mut var = per_channel::<T>(OP, "input_var", p[3], c)?;
            let mut extra: Vec<Tensor> = Vec::new();
            if self.training || self.legacy_outputs {
                let (bm, bv) = batch_stats(xv, n, c, spatial);
                let mom = T::of_f64(self.momentum as f64);
                let run_m: Vec<T> = mean.iter().zip(&bm).map(|(&m, &b)| m * mom + b * (T::ONE - mom)).collect();
                let run_v: Vec<T> = var.iter().zip(&bv).map(|(&v, &b)| v * mom + b * (T::ONE - mom)).collect();
                extra.push(Tensor::from_vec(&[c], run_m)?.cast(stat_dt)?);
                extra.push(Tensor::from_vec(&[c], run_v)?.cast(stat_dt)?);
                if self.legacy_outputs {
                    extra.push(Tensor::from_vec(&[c], bm.clone())?.cast(stat_dt)?);
                    extra.push(Tensor::from_vec(&[c], bv.clone())?.cast(stat_dt)?);
                }
                mean = bm;
                var = bv;
            }
            let eps = T::of_f64(self.epsilon as f64);
            let a: Vec<T> = (0..c).map(|i| scale[i] / (var[i] + eps).sqrt()).collect();
            let b: Vec<T> = (0..c).map(|i| bias[i] - mean[i] * a[i]).collect();
            let y = new_tensor::<T>(T::DTYPE, x.shape(), |o| {
                affine_channels(xv, o, c, spatial, &a, &b);
                Ok(())
            })?;
            let mut outs = vec![y.cast(xdt)?];
            outs.extend(extra);
            outs
        });
        Ok(outs.into_iter().map(Value::Tensor).collect())
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Value>],
        outputs: &mut [kiln_core::TensorMut<'_>],
    ) -> Result<()> {
        const OP: &str = "BatchNormalization";
        let x = input_tensor(inputs, 0, OP)?;
        let inference = !self.training && !self.legacy_outputs && outputs.len() == 1;
        if inference
            && x.dtype() == DType::F32
            && x.rank() >= 2
            && outputs[0].dtype() == DType::F32
            && outputs[0].shape() == x.shape()
        {
            let c = x.shape()[1];
            let spatial: usize = x.shape()[2..].iter().product();
            let plain = |i: usize| {
                input_tensor(inputs, i, OP)
                    .ok()
                    .filter(|t| t.dtype() == DType::F32 && t.shape() == [c])
                    .and_then(|t| t.as_slice::<f32>().ok())
            };
            if let (Some(scale), Some(bias), Some(mean), Some(var)) =
                (plain(1), plain(2), plain(3), plain(4))
            {
                // The usual [C] f32 parameters: per-channel affine coefficients in scratch.
                let y = outputs[0].as_mut_slice::<f32>()?;
                crate::scratch::with_scratch::<f32, _>(2 * c, |ab| {
                    let (a, b) = ab.split_at_mut(c);
                    for i in 0..c {
                        a[i] = scale[i] / (var[i] + self.epsilon).sqrt();
                        b[i] = bias[i] - mean[i] * a[i];
                    }
                    affine_channels(x.as_slice::<f32>()?, y, c, spatial, a, b);
                    Ok(())
                })?;
                return Ok(());
            }
            let p: Vec<&Tensor> = (1..5)
                .map(|i| input_tensor(inputs, i, OP))
                .collect::<Result<_>>()?;
            let scale = per_channel::<f32>(OP, "scale", p[0], c)?;
            let bias = per_channel::<f32>(OP, "B", p[1], c)?;
            let mean = per_channel::<f32>(OP, "input_mean", p[2], c)?;
            let var = per_channel::<f32>(OP, "input_var", p[3], c)?;
            let a: Vec<f32> = (0..c)
                .map(|i| scale[i] / (var[i] + self.epsilon).sqrt())
                .collect();
            let b: Vec<f32> = (0..c).map(|i| bias[i] - mean[i] * a[i]).collect();
            affine_channels(
                x.as_slice::<f32>()?,
                outputs[0].as_mut_slice::<f32>()?,
                c,
                spatial,
                &a,
                &b,
            );
            return Ok(());
        }
        let r = self.eval(inputs)?;
        for (o, v) in outputs.iter_mut().zip(&r) {
            o.copy_from(v.as_tensor()?)?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Per-channel mean and population variance over (N, spatial).
fn batch_stats<T: Real>(x: &[T], n: usize, c: usize, spatial: usize) -> (Vec<T>, Vec<T>) {
    let cnt = (n * spatial).max(1) as f64;
    let mut mean = vec![T::ZERO; c];
    let mut var = vec![T::ZERO; c];
    for ch in 0..c {
        let mut s = 0f64;
        for b in 0..n {
            let base = (b * c + ch) * spatial;
            s += x[base..base + spatial]
                .iter()
                .map(|v| v.as_f64())
                .sum::<f64>();
        }
        let m = s / cnt;
        let mut q = 0f64;
        for b in 0..n {
            let base = (b * c + ch) * spatial;
            q += x[base..base + spatial]
                .iter()
                .map(|v| (v.as_f64() - m) * (v.as_f64() - m))
                .sum::<f64>();
        }
        mean[ch] = T::of_f64(m);
        var[ch] = T::of_f64(q / cnt);
    }
    (mean, var)
}

/// `o = x * a[c] + b[c]` over an [N, C, spatial] layout.
pub fn affine_channels<T: Real>(x: &[T], o: &mut [T], c: usize, spatial: usize, a: &[T], b: &[T]) {
    if spatial == 0 || c == 0 {
        return;
    }
    let work = |(i, (dst, src)): (usize, (&mut [T], &[T]))| {
        let ch = i % c;
        let (a, b) = (a[ch], b[ch]);
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s * a + b;
        }
    };
    if x.len() >= PAR_MIN && crate::parallel::enabled() {
        o.par_chunks_mut(spatial)
            .zip(x.par_chunks(spatial))
            .enumerate()
            .for_each(work);
    } else {
        o.chunks_mut(spatial)
            .zip(x.chunks(spatial))
            .enumerate()
            .for_each(work);
    }
}

// ---------------------------------------------------------------------------------------
// Row-wise normalizations (Layer, RMS, Instance, Group, MVN) share this helper.

/// Mean and 1/sqrt(var + eps) of a row (f64 accumulation, two passes).
fn row_stats<T: Real>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len().max(1) as f64;
    let mean = row.iter().map(|v| v.as_f64()).sum::<f64>() / n;
    let var = row
        .iter()
        .map(|v| (v.as_f64() - mean) * (v.as_f64() - mean))
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Applies `f(row_index, src_row, dst_row)` over rows of `len`, in parallel when large.
fn for_rows<T: Real>(x: &[T], o: &mut [T], len: usize, f: impl Fn(usize, &[T], &mut [T]) + Sync) {
    if len == 0 {
        return;
    }
    if x.len() >= PAR_MIN && x.len() / len > 1 && crate::parallel::enabled() {
        o.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .for_each(|(i, (d, s))| f(i, s, d));
    } else {
        o.chunks_mut(len)
            .zip(x.chunks(len))
            .enumerate()
            .for_each(|(i, (d, s))| f(i, s, d));
    }
}

/// LayerNormalization.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    axis: i64,
    epsilon: f32,
    stash_f64: bool,
}

impl Op for LayerNorm {
    fn op_type(&self) -> &str {
        "LayerNormalization"
    }

    fn infer(&self, inputs: &[Option<&Fact>], n: usize) -> Result<Vec<Fact>> {
        let mut out = infer_unary(inputs, None)?;
        let x = inputs.first().copied().flatten();
        let stat_dt = x.and_then(|f| f.dtype).map(|d| self.stat_dtype(d));
        let shape = x.and_then(|f| f.shape.as_ref()).and_then(|s| {
            let a = normalize_axis("LayerNormalization", self.axis, s.len()).ok()?;
            Some(
                s.iter()
                    .enumerate()
                    .map(|(i, d)| if i < a { d.clone() } else { Dim::Known(1) })
                    .collect(),
            )
        });
        for _ in 1..n {
            out.push(Fact {
                kind: ValueKind::Tensor,
                dtype: stat_dt,
                shape: shape.clone(),
                konst: None,
            });
        }
        Ok(out)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "LayerNormalization";
        let x = input_tensor(inputs, 0, OP)?;
        let w = input_tensor(inputs, 1, OP)?;
        let b = optional_tensor(inputs, 2, OP)?;
        let axis = normalize_axis(OP, self.axis, x.rank())?;
        let norm_shape = &x.shape()[axis..];
        let len: usize = norm_shape.iter().product();
        let mut stat_shape = x.shape().to_vec();
        for d in &mut stat_shape[axis..] {
            *d = 1;
        }
        let xdt = x.dtype();
        let stat_dt = self.stat_dtype(xdt);
        let eps = self.epsilon as f64;
        let outs = float_kernel!(OP, x, T => {
            let xs = to_compute(OP, x, T::DTYPE)?;
            let xv = xs.as_slice::<T>()?;
            let wv = broadcast_param::<T>(OP, "Scale", w, norm_shape)?;
            let bv = match b {
                Some(b) => Some(broadcast_param::<T>(OP, "B", b, norm_shape)?),
                None => None,
            };
            let rows = xv.len().checked_div(len).unwrap_or(0);
            let mut means = vec![T::ZERO; rows];
            let mut invs = vec![T::ZERO; rows];
            let y = new_tensor::<T>(T::DTYPE, x.shape(), |o| {
                layer_norm_rows(xv, o, len, &wv, bv.as_deref(), eps, Some((&mut means, &mut invs)));
                Ok(())
            })?;
            vec![
                y.cast(xdt)?,
                Tensor::from_vec(&stat_shape, means)?.cast(stat_dt)?,
                Tensor::from_vec(&stat_shape, invs)?.cast(stat_dt)?,
            ]
        });
        Ok(outs.into_iter().map(Value::Tensor).collect())
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Value>],
        outputs: &mut [kiln_core::TensorMut<'_>],
    ) -> Result<()> {
        if outputs.len() == 1 && self.fast_f32(inputs, &mut outputs[0])? {
            return Ok(());
        }
        let r = self.eval(inputs)?;
        for (o, v) in outputs.iter_mut().zip(&r) {
            o.copy_from(v.as_tensor()?)?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl LayerNorm {
    fn fast_f32(
        &self,
        inputs: &[Option<&Value>],
        o: &mut kiln_core::TensorMut<'_>,
    ) -> Result<bool> {
        const OP: &str = "LayerNormalization";
        let x = input_tensor(inputs, 0, OP)?;
        if x.dtype() != DType::F32 || o.dtype() != DType::F32 || o.shape() != x.shape() {
            return Ok(false);
        }
        let w = input_tensor(inputs, 1, OP)?;
        let b = optional_tensor(inputs, 2, OP)?;
        let axis = normalize_axis(OP, self.axis, x.rank())?;
        let norm_shape = &x.shape()[axis..];
        let len: usize = norm_shape.iter().product();
        let wv = broadcast_param::<f32>(OP, "Scale", w, norm_shape)?;
        let bv = match b {
            Some(b) => Some(broadcast_param::<f32>(OP, "B", b, norm_shape)?),
            None => None,
        };
        layer_norm_rows(
            x.as_slice::<f32>()?,
            o.as_mut_slice::<f32>()?,
            len,
            &wv,
            bv.as_deref(),
            self.epsilon as f64,
            None,
        );
        Ok(true)
    }

    fn stat_dtype(&self, x: DType) -> DType {
        if self.stash_f64 || x == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }
}

/// LayerNorm over rows of `len`: `o = (x - mean) * inv_std * w + b`; optionally records
/// per-row mean and inverse std.
pub fn layer_norm_rows<T: Real>(
    x: &[T],
    o: &mut [T],
    len: usize,
    w: &[T],
    b: Option<&[T]>,
    eps: f64,
    stats: Option<(&mut [T], &mut [T])>,
) {
    if len == 0 {
        return;
    }
    let row = |_: usize, s: &[T], d: &mut [T]| {
        let (m, inv) = row_stats(s, eps);
        let (m, inv) = (T::of_f64(m), T::of_f64(inv));
        match b {
            Some(b) => {
                for (((d, &s), &w), &b) in d.iter_mut().zip(s).zip(w).zip(b) {
                    *d = (s - m) * inv * w + b;
                }
            }
            None => {
                for ((d, &s), &w) in d.iter_mut().zip(s).zip(w) {
                    *d = (s - m) * inv * w;
                }
            }
        }
    };
    for_rows(x, o, len, row);
    if let Some((means, invs)) = stats {
        for (i, s) in x.chunks(len).enumerate() {
            let (m, inv) = row_stats(s, eps);
            means[i] = T::of_f64(m);
            invs[i] = T::of_f64(inv);
        }
    }
}

/// RMSNormalization (opset 23).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    axis: i64,
    epsilon: f32,
}

impl Op for RmsNorm {
    fn op_type(&self) -> &str {
        "RMSNormalization"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_unary(inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "RMSNormalization";
        let x = input_tensor(inputs, 0, OP)?;
        let w = input_tensor(inputs, 1, OP)?;
        let axis = normalize_axis(OP, self.axis, x.rank())?;
        let norm_shape = &x.shape()[axis..];
        let len: usize = norm_shape.iter().product();
        let eps = self.epsilon as f64;
        let xdt = x.dtype();
        let outs = float_kernel!(OP, x, T => {
            let xs = to_compute(OP, x, T::DTYPE)?;
            let xv = xs.as_slice::<T>()?;
            let wv = broadcast_param::<T>(OP, "scale", w, norm_shape)?;
            vec![new_tensor::<T>(T::DTYPE, x.shape(), |o| {
                for_rows(xv, o, len, |_, s, d| {
                    let ms = s.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>() / len as f64;
                    let inv = T::of_f64(1.0 / (ms + eps).sqrt());
                    for ((d, &s), &w) in d.iter_mut().zip(s).zip(&wv) {
                        *d = s * inv * w;
                    }
                });
                Ok(())
            })?]
        });
        cast_back(outs, xdt)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// InstanceNormalization: per (n, c) statistics over spatial dims.
#[derive(Debug, Clone)]
pub struct InstanceNorm {
    epsilon: f32,
}

impl Op for InstanceNorm {
    fn op_type(&self) -> &str {
        "InstanceNormalization"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_unary(inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "InstanceNormalization";
        let x = input_tensor(inputs, 0, OP)?;
        let s = input_tensor(inputs, 1, OP)?;
        let b = input_tensor(inputs, 2, OP)?;
        if x.rank() < 2 {
            return Err(KilnError::kernel(
                OP,
                format!("input must have rank >= 2, found {:?}", x.shape()),
            ));
        }
        let c = x.shape()[1];
        let spatial: usize = x.shape()[2..].iter().product();
        let eps = self.epsilon as f64;
        let xdt = x.dtype();
        let outs = float_kernel!(OP, x, T => {
            let xs = to_compute(OP, x, T::DTYPE)?;
            let xv = xs.as_slice::<T>()?;
            let sv = per_channel::<T>(OP, "scale", s, c)?;
            let bv = per_channel::<T>(OP, "B", b, c)?;
            vec![new_tensor::<T>(T::DTYPE, x.shape(), |o| {
                for_rows(xv, o, spatial, |i, src, d| {
                    let (m, inv) = row_stats(src, eps);
                    let ch = i % c;
                    let a = T::of_f64(inv) * sv[ch];
                    let m = T::of_f64(m);
                    for (d, &v) in d.iter_mut().zip(src) {
                        *d = (v - m) * a + bv[ch];
                    }
                });
                Ok(())
            })?]
        });
        cast_back(outs, xdt)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// GroupNormalization: statistics per (n, group); affine per group (opset 18) or per
/// channel (opset 21).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    epsilon: f32,
    num_groups: i64,
    per_channel: bool,
}

impl Op for GroupNorm {
    fn op_type(&self) -> &str {
        "GroupNormalization"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_unary(inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "GroupNormalization";
        let x = input_tensor(inputs, 0, OP)?;
        let s = input_tensor(inputs, 1, OP)?;
        let b = input_tensor(inputs, 2, OP)?;
        if x.rank() < 2 {
            return Err(KilnError::kernel(
                OP,
                format!("input must have rank >= 2, found {:?}", x.shape()),
            ));
        }
        let c = x.shape()[1];
        let g = usize::try_from(self.num_groups).unwrap_or(0);
        if g == 0 || c % g != 0 {
            return Err(KilnError::kernel(
                OP,
                format!(
                    "num_groups {} must divide the {c} channels",
                    self.num_groups
                ),
            ));
        }
        let spatial: usize = x.shape()[2..].iter().product();
        let cpg = c / g;
        let group_len = cpg * spatial;
        let eps = self.epsilon as f64;
        let xdt = x.dtype();
        let n_aff = if self.per_channel { c } else { g };
        let outs = float_kernel!(OP, x, T => {
            let xs = to_compute(OP, x, T::DTYPE)?;
            let xv = xs.as_slice::<T>()?;
            let sv = per_channel::<T>(OP, "scale", s, n_aff)?;
            let bv = per_channel::<T>(OP, "bias", b, n_aff)?;
            let per_channel = self.per_channel;
            vec![new_tensor::<T>(T::DTYPE, x.shape(), |o| {
                for_rows(xv, o, group_len, |i, src, d| {
                    let (m, inv) = row_stats(src, eps);
                    let (m, inv) = (T::of_f64(m), T::of_f64(inv));
                    let grp = i % g;
                    for (k, (dc, sc)) in d.chunks_mut(spatial.max(1)).zip(src.chunks(spatial.max(1))).enumerate() {
                        let idx = if per_channel { grp * cpg + k } else { grp };
                        let (a, bb) = (sv[idx], bv[idx]);
                        for (d, &v) in dc.iter_mut().zip(sc) {
                            *d = (v - m) * inv * a + bb;
                        }
                    }
                });
                Ok(())
            })?]
        });
        cast_back(outs, xdt)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// MeanVarianceNormalization: `(x - mean) / (sqrt(E[x²] - mean²) + 1e-9)` over `axes`.
#[derive(Debug, Clone)]
pub struct Mvn {
    axes: Vec<i64>,
}

impl Op for Mvn {
    fn op_type(&self) -> &str {
        "MeanVarianceNormalization"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_unary(inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "MeanVarianceNormalization";
        let x = input_tensor(inputs, 0, OP)?;
        let axes = super::reduce::normalize_axes(OP, &self.axes, x.rank())?;
        let mask: Vec<bool> = (0..x.rank()).map(|i| axes.contains(&i)).collect();
        let xdt = x.dtype();
        let outs = float_kernel!(OP, x, T => {
            let xs = to_compute(OP, x, T::DTYPE)?;
            let xv = xs.as_slice::<T>()?;
            let cnt: usize = x.shape().iter().zip(&mask).filter(|(_, m)| **m).map(|(d, _)| *d).product();
            let sums = super::reduce::fold_runs(xv, x.shape(), &mask, (0f64, 0f64), |(s, q), v, _| {
                let v = v.as_f64();
                (s + v, q + v * v)
            });
            let stats: Vec<(f64, f64)> = sums
                .iter()
                .map(|(s, q)| {
                    let m = s / cnt.max(1) as f64;
                    (m, 1.0 / ((q / cnt.max(1) as f64 - m * m).max(0.0).sqrt() + 1e-9))
                })
                .collect();
            let kept: Vec<usize> = x.shape().iter().zip(&mask).map(|(&d, &m)| if m { 1 } else { d }).collect();
            let plan = Plan::new(OP, &[x.shape(), &kept])?;
            vec![new_tensor::<T>(T::DTYPE, x.shape(), |o| {
                plan.binary(xv, &stats, o, |v, (m, inv)| T::of_f64((v.as_f64() - m) * inv));
                Ok(())
            })?]
        });
        cast_back(outs, xdt)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// LpNormalization along one axis (p = 1 or 2).
#[derive(Debug, Clone)]
pub struct LpNorm {
    axis: i64,
    p: i64,
}

impl Op for LpNorm {
    fn op_type(&self) -> &str {
        "LpNormalization"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_unary(inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "LpNormalization";
        let x = input_tensor(inputs, 0, OP)?;
        let axes = super::reduce::normalize_axes(OP, &[self.axis], x.rank())?;
        let mask: Vec<bool> = (0..x.rank()).map(|i| axes.contains(&i)).collect();
        let p = self.p;
        let xdt = x.dtype();
        let outs = float_kernel!(OP, x, T => {
            let xs = to_compute(OP, x, T::DTYPE)?;
            let xv = xs.as_slice::<T>()?;
            let norms = super::reduce::fold_runs(xv, x.shape(), &mask, 0f64, |a, v, _| {
                let v = v.as_f64();
                if p == 1 { a + v.abs() } else { a + v * v }
            });
            let norms: Vec<f64> = norms.into_iter().map(|n| if p == 1 { n } else { n.sqrt() }).collect();
            let kept: Vec<usize> = x.shape().iter().zip(&mask).map(|(&d, &m)| if m { 1 } else { d }).collect();
            let plan = Plan::new(OP, &[x.shape(), &kept])?;
            vec![new_tensor::<T>(T::DTYPE, x.shape(), |o| {
                plan.binary(xv, &norms, o, |v, n| T::of_f64(v.as_f64() / n));
                Ok(())
            })?]
        });
        cast_back(outs, xdt)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Local response normalization across channels.
#[derive(Debug, Clone)]
pub struct Lrn {
    alpha: f32,
    beta: f32,
    bias: f32,
    size: usize,
}

impl Op for Lrn {
    fn op_type(&self) -> &str {
        "LRN"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_unary(inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "LRN";
        let x = input_tensor(inputs, 0, OP)?;
        if x.rank() < 2 {
            return Err(KilnError::kernel(
                OP,
                format!("input must have rank >= 2, found {:?}", x.shape()),
            ));
        }
        let (n, c) = (x.shape()[0], x.shape()[1]);
        let spatial: usize = x.shape()[2..].iter().product();
        let (lo, hi) = ((self.size - 1) / 2, (self.size - 1).div_ceil(2));
        let (alpha, beta, bias, size) = (
            self.alpha as f64,
            self.beta as f64,
            self.bias as f64,
            self.size as f64,
        );
        let xdt = x.dtype();
        let outs = float_kernel!(OP, x, T => {
            let xs = to_compute(OP, x, T::DTYPE)?;
            let xv = xs.as_slice::<T>()?;
            vec![new_tensor::<T>(T::DTYPE, x.shape(), |o| {
                for b in 0..n {
                    for ch in 0..c {
                        let (c0, c1) = (ch.saturating_sub(lo), (ch + hi).min(c - 1));
                        for s in 0..spatial {
                            let mut sq = 0f64;
                            for k in c0..=c1 {
                                let v = xv[(b * c + k) * spatial + s].as_f64();
                                sq += v * v;
                            }
                            let i = (b * c + ch) * spatial + s;
                            o[i] = T::of_f64(xv[i].as_f64() / (bias + alpha / size * sq).powf(beta));
                        }
                    }
                }
                Ok(())
            })?]
        });
        cast_back(outs, xdt)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn stash_is_f64(ctx: &BuildCtx) -> Result<bool> {
    let a = ctx.attrs();
    match a.int("stash_type", 1)? {
        1 => Ok(false),
        11 => Ok(true),
        other => Err(a.unsupported(format!(
            "stash_type {other} (only float and double are supported)"
        ))),
    }
}

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("BatchNormalization", |ctx: &BuildCtx| {
        let a = ctx.attrs();
        let training = ctx.opset() >= 14 && a.int("training_mode", 0)? != 0;
        let legacy_outputs = ctx.opset() < 14 && ctx.n_outputs > 1;
        Ok(Box::new(BatchNorm {
            epsilon: a.float("epsilon", 1e-5)?,
            momentum: a.float("momentum", 0.9)?,
            training,
            legacy_outputs,
        }))
    });
    reg.register("LayerNormalization", |ctx: &BuildCtx| {
        let a = ctx.attrs();
        Ok(Box::new(LayerNorm {
            axis: a.int("axis", -1)?,
            epsilon: a.float("epsilon", 1e-5)?,
            stash_f64: stash_is_f64(ctx)?,
        }))
    });
    reg.register("RMSNormalization", |ctx: &BuildCtx| {
        let a = ctx.attrs();
        stash_is_f64(ctx)?;
        Ok(Box::new(RmsNorm {
            axis: a.int("axis", -1)?,
            epsilon: a.float("epsilon", 1e-5)?,
        }))
    });
    reg.register("InstanceNormalization", |ctx: &BuildCtx| {
        Ok(Box::new(InstanceNorm {
            epsilon: ctx.attrs().float("epsilon", 1e-5)?,
        }))
    });
    reg.register("GroupNormalization", |ctx: &BuildCtx| {
        let a = ctx.attrs();
        if ctx.opset() >= 21 {
            stash_is_f64(ctx)?;
        }
        Ok(Box::new(GroupNorm {
            epsilon: a.float("epsilon", 1e-5)?,
            num_groups: a.req_int("num_groups")?,
            per_channel: ctx.opset() >= 21,
        }))
    });
    reg.register("MeanVarianceNormalization", |ctx: &BuildCtx| {
        let axes = ctx
            .attrs()
            .opt_ints("axes")?
            .unwrap_or_else(|| vec![0, 2, 3]);
        Ok(Box::new(Mvn { axes }))
    });
    reg.register("LpNormalization", |ctx: &BuildCtx| {
        let a = ctx.attrs();
        let p = a.int("p", 2)?;
        if p != 1 && p != 2 {
            return Err(a.invalid(format!("p must be 1 or 2, found {p}")));
        }
        Ok(Box::new(LpNorm {
            axis: a.int("axis", -1)?,
            p,
        }))
    });
    reg.register("LRN", |ctx: &BuildCtx| {
        let a = ctx.attrs();
        let size = a.req_int("size")?;
        if size < 1 {
            return Err(a.invalid(format!("size must be positive, found {size}")));
        }
        Ok(Box::new(Lrn {
            alpha: a.float("alpha", 1e-4)?,
            beta: a.float("beta", 0.75)?,
            bias: a.float("bias", 1.0)?,
            size: size as usize,
        }))
    });
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::testutil::*;
    use kiln_core::{Attr, Tensor};

    fn naive_norm(x: &[f32], rows: usize, len: usize, eps: f32) -> Vec<f32> {
        let mut out = Vec::new();
        for r in 0..rows {
            let s = &x[r * len..(r + 1) * len];
            let m: f32 = s.iter().sum::<f32>() / len as f32;
            let v: f32 = s.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / len as f32;
            out.extend(s.iter().map(|a| (a - m) / (v + eps).sqrt()));
        }
        out
    }

    #[test]
    fn layer_norm() {
        let x = rand(3 * 4 * 5, 11);
        let w = rand(20, 12);
        let b = rand(20, 13);
        let op = build("LayerNormalization", 17, vec![("axis", Attr::Int(1))], 3, 3).unwrap();
        let outs = run(
            op.as_ref(),
            &[
                Some(f32t(&[3, 4, 5], x.clone())),
                Some(f32t(&[4, 5], w.clone())),
                Some(f32t(&[4, 5], b.clone())),
            ],
        )
        .unwrap();
        let n = naive_norm(&x, 3, 20, 1e-5);
        let want: Vec<f32> = n
            .iter()
            .enumerate()
            .map(|(i, v)| v * w[i % 20] + b[i % 20])
            .collect();
        close(outs[0].as_slice::<f32>().unwrap(), &want, 1e-5);
        assert_eq!(outs[1].shape(), &[3, 1, 1]);
        let m0: f32 = x[..20].iter().sum::<f32>() / 20.0;
        close(&outs[1].as_slice::<f32>().unwrap()[..1], &[m0], 1e-5);
        // Scale broadcast ([5] over [4, 5]) and no bias.
        let y = run1(
            "LayerNormalization",
            17,
            vec![("axis", Attr::Int(-2))],
            &[
                Some(f32t(&[3, 4, 5], x.clone())),
                Some(f32t(&[5], w[..5].to_vec())),
            ],
        )
        .unwrap();
        let want: Vec<f32> = n.iter().enumerate().map(|(i, v)| v * w[i % 5]).collect();
        close(y.as_slice::<f32>().unwrap(), &want, 1e-5);
        assert!(run1(
            "LayerNormalization",
            17,
            vec![],
            &[Some(f32t(&[3, 4, 5], x)), Some(f32t(&[4], vec![1.0; 4]))]
        )
        .is_err());
    }

    #[test]
    fn batch_norm_inference_and_training() {
        let x = rand(2 * 3 * 4, 21);
        let s = vec![1.0, 2.0, 0.5];
        let b = vec![0.1, -0.2, 0.3];
        let m = vec![0.2, -0.1, 0.0];
        let v = vec![1.0, 0.5, 2.0];
        let t = |v: &Vec<f32>| Some(f32t(&[3], v.clone()));
        let y = run1(
            "BatchNormalization",
            15,
            vec![],
            &[
                Some(f32t(&[2, 3, 4], x.clone())),
                t(&s),
                t(&b),
                t(&m),
                t(&v),
            ],
        )
        .unwrap();
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let c = (i / 4) % 3;
                s[c] * (a - m[c]) / (v[c] + 1e-5).sqrt() + b[c]
            })
            .collect();
        close(y.as_slice::<f32>().unwrap(), &want, 1e-5);
        let op = build(
            "BatchNormalization",
            15,
            vec![("training_mode", Attr::Int(1))],
            5,
            3,
        )
        .unwrap();
        let outs = run(
            op.as_ref(),
            &[
                Some(f32t(&[2, 3, 4], x.clone())),
                t(&s),
                t(&b),
                t(&m),
                t(&v),
            ],
        )
        .unwrap();
        assert_eq!(outs.len(), 3);
        let c0: Vec<f32> = x
            .iter()
            .enumerate()
            .filter(|(i, _)| (i / 4) % 3 == 0)
            .map(|(_, a)| *a)
            .collect();
        let bm = c0.iter().sum::<f32>() / 8.0;
        close(
            &outs[1].as_slice::<f32>().unwrap()[..1],
            &[0.2 * 0.9 + bm * 0.1],
            1e-5,
        );
        assert!(run1(
            "BatchNormalization",
            15,
            vec![],
            &[
                Some(f32t(&[2, 3, 4], x)),
                t(&s),
                t(&b),
                t(&m),
                Some(f32t(&[2], vec![1.0; 2]))
            ]
        )
        .is_err());
    }

    #[test]
    fn instance_group_rms_mvn_lp_lrn() {
        let x = rand(2 * 4 * 3, 31);
        let y = run1(
            "InstanceNormalization",
            6,
            vec![],
            &[
                Some(f32t(&[2, 4, 3], x.clone())),
                Some(f32t(&[4], vec![1.0; 4])),
                Some(f32t(&[4], vec![0.0; 4])),
            ],
        )
        .unwrap();
        close(
            y.as_slice::<f32>().unwrap(),
            &naive_norm(&x, 8, 3, 1e-5),
            1e-4,
        );
        let y = run1(
            "GroupNormalization",
            21,
            vec![("num_groups", Attr::Int(2))],
            &[
                Some(f32t(&[2, 4, 3], x.clone())),
                Some(f32t(&[4], vec![1.0; 4])),
                Some(f32t(&[4], vec![0.0; 4])),
            ],
        )
        .unwrap();
        close(
            y.as_slice::<f32>().unwrap(),
            &naive_norm(&x, 4, 6, 1e-5),
            1e-4,
        );
        let y = run1(
            "GroupNormalization",
            18,
            vec![("num_groups", Attr::Int(2))],
            &[
                Some(f32t(&[2, 4, 3], x.clone())),
                Some(f32t(&[2], vec![2.0; 2])),
                Some(f32t(&[2], vec![1.0; 2])),
            ],
        )
        .unwrap();
        let want: Vec<f32> = naive_norm(&x, 4, 6, 1e-5)
            .iter()
            .map(|v| v * 2.0 + 1.0)
            .collect();
        close(y.as_slice::<f32>().unwrap(), &want, 1e-4);
        let y = run1(
            "RMSNormalization",
            23,
            vec![],
            &[
                Some(f32t(&[2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.0, 1.0])),
                Some(f32t(&[3], vec![1.0; 3])),
            ],
        )
        .unwrap();
        let r1 = ((1.0 + 4.0 + 9.0) / 3.0f32 + 1e-5).sqrt();
        let r2 = (2.0 / 3.0f32 + 1e-5).sqrt();
        close(
            y.as_slice::<f32>().unwrap(),
            &[1.0 / r1, 2.0 / r1, 3.0 / r1, -1.0 / r2, 0.0, 1.0 / r2],
            1e-5,
        );
        let y = run1(
            "LpNormalization",
            1,
            vec![],
            &[Some(f32t(&[2, 2], vec![3.0, 4.0, 1.0, 0.0]))],
        )
        .unwrap();
        close(y.as_slice::<f32>().unwrap(), &[0.6, 0.8, 1.0, 0.0], 1e-6);
        let y = run1(
            "MeanVarianceNormalization",
            13,
            vec![("axes", Attr::Ints(vec![1]))],
            &[Some(f32t(&[2, 2], vec![1.0, 3.0, 2.0, 2.0]))],
        )
        .unwrap();
        close(y.as_slice::<f32>().unwrap(), &[-1.0, 1.0, 0.0, 0.0], 1e-6);
        let xl = f32t(&[1, 3, 1, 1], vec![1.0, 2.0, 3.0]);
        let y = run1(
            "LRN",
            13,
            vec![
                ("size", Attr::Int(3)),
                ("alpha", Attr::Float(3.0)),
                ("beta", Attr::Float(1.0)),
                ("bias", Attr::Float(1.0)),
            ],
            &[Some(xl)],
        )
        .unwrap();
        close(
            y.as_slice::<f32>().unwrap(),
            &[1.0 / 6.0, 2.0 / 15.0, 3.0 / 14.0],
            1e-6,
        );
        assert!(run1(
            "GroupNormalization",
            21,
            vec![("num_groups", Attr::Int(3))],
            &[
                Some(f32t(&[2, 4, 3], x)),
                Some(f32t(&[4], vec![1.0; 4])),
                Some(f32t(&[4], vec![0.0; 4]))
            ]
        )
        .is_err());
        let _ = Tensor::scalar(0f32);
    }
}
