//! Generators and masks: Range, EyeLike, OneHot, Trilu, ReverseSequence.

use std::any::Any;

use kiln_core::{BuildCtx, DType, Dim, Fact, Op, OpRegistry, Result, Tensor, Value};

use crate::ops::shape::common::*;

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("Range", build_range);
    reg.register("EyeLike", build_eye_like);
    reg.register("OneHot", build_one_hot);
    reg.register("Trilu", build_trilu);
    reg.register("ReverseSequence", build_reverse_sequence);
}

fn scalar_of(inputs: &[Option<&Value>], i: usize, op: &str) -> Result<Tensor> {
    let t = kiln_core::input_tensor(inputs, i, op)?;
    if t.len() != 1 {
        return Err(kerr(
            op,
            format!("input {i} must hold one value, found shape {:?}", t.shape()),
        ));
    }
    Ok(t.clone())
}

// ---------------------------------------------------------------------------------------

/// `Range`: `start, start + delta, ...` up to (excluding) `limit`.
#[derive(Debug)]
pub struct Range;

/// Builds `Range`.
pub fn build_range(_ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Range))
}

impl Op for Range {
    fn op_type(&self) -> &str {
        "Range"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![tensor_fact(
            fact_at(inputs, 0).and_then(|f| f.dtype),
            Some(vec![Dim::Unknown]),
        )])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "Range";
        let (s, l, d) = (
            scalar_of(inputs, 0, op)?,
            scalar_of(inputs, 1, op)?,
            scalar_of(inputs, 2, op)?,
        );
        let dt = s.dtype();
        if l.dtype() != dt || d.dtype() != dt {
            return Err(kerr(op, "start, limit and delta must have the same dtype"));
        }
        if dt.is_int() {
            let (s, l, d) = (
                s.to_i64_vec()?[0] as i128,
                l.to_i64_vec()?[0] as i128,
                d.to_i64_vec()?[0] as i128,
            );
            if d == 0 {
                return Err(kerr(op, "delta cannot be 0"));
            }
            let n = ((l - s) + d - d.signum()) / d;
            let n = n.max(0) as usize;
            checked_numel(op, &[n], 8)?;
            let v: Vec<i64> = (0..n).map(|i| (s + i as i128 * d) as i64).collect();
            return Ok(vec![Tensor::from_vec(&[n], v)?.cast(dt)?.into()]);
        }
        if !dt.is_float() {
            return Err(kerr(op, format!("unsupported dtype {dt}")));
        }
        let (s, l, d) = (s.to_f64_vec()?[0], l.to_f64_vec()?[0], d.to_f64_vec()?[0]);
        if d == 0.0 || !d.is_finite() || !s.is_finite() || !l.is_finite() {
            return Err(kerr(
                op,
                format!("invalid range start={s} limit={l} delta={d}"),
            ));
        }
        let n = ((l - s) / d).ceil().max(0.0);
        if n > (MAX_OUTPUT_BYTES / 8) as f64 {
            return Err(kerr(op, format!("range of {n} elements is too large")));
        }
        let n = n as usize;
        let out = match dt {
            DType::F32 => {
                let (s, d) = (s as f32, d as f32);
                Tensor::from_vec(&[n], (0..n).map(|i| s + i as f32 * d).collect())?
            }
            _ => Tensor::from_vec(&[n], (0..n).map(|i| s + i as f64 * d).collect())?.cast(dt)?,
        };
        Ok(vec![out.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `EyeLike`: a 2-D tensor shaped like the input with ones on diagonal `k`.
#[derive(Debug)]
pub struct EyeLike {
    dtype: Option<DType>,
    k: i64,
}

/// Builds `EyeLike`.
pub fn build_eye_like(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let dtype = match a.opt_int("dtype")? {
        Some(c) => Some(
            DType::from_onnx_code(c as i32)
                .ok_or_else(|| a.unsupported(format!("dtype code {c}")))?,
        ),
        None => None,
    };
    Ok(Box::new(EyeLike {
        dtype,
        k: a.int("k", 0)?,
    }))
}

impl Op for EyeLike {
    fn op_type(&self) -> &str {
        "EyeLike"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = self.dtype.or(x.and_then(|f| f.dtype));
        Ok(vec![tensor_fact(dtype, x.and_then(|f| f.shape.clone()))])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "EyeLike")?;
        let dt = self.dtype.unwrap_or(x.dtype());
        if dt == DType::String {
            return Err(kerr("EyeLike", "string output is not supported"));
        }
        let (r, c) = match x.shape() {
            [n] => (*n, *n),
            [r, c] => (*r, *c),
            s => return Err(kerr("EyeLike", format!("input must be 2-D, got {s:?}"))),
        };
        let mut v = vec![0u8; r * c];
        for i in 0..r {
            let j = (i as i64).saturating_add(self.k);
            if j >= 0 && (j as usize) < c {
                v[i * c + j as usize] = 1;
            }
        }
        Ok(vec![Tensor::from_vec(&[r, c], v)?.cast(dt)?.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `OneHot`: `values[1]` at each index's position along a new `axis`, `values[0]` elsewhere.
#[derive(Debug)]
pub struct OneHot {
    axis: i64,
}

/// Builds `OneHot`.
pub fn build_one_hot(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(OneHot {
        axis: ctx.attrs().int("axis", -1)?,
    }))
}

struct OneHotMover {
    on: Vec<usize>,
}

impl Mover for OneHotMover {
    fn run<T: Clone + Send + Sync>(&self, srcs: &[&[T]], dst: &mut [T]) -> Result<()> {
        let (off, on) = (srcs[0][0].clone(), srcs[0][1].clone());
        dst.fill(off);
        for &p in &self.on {
            dst[p] = on.clone();
        }
        Ok(())
    }
}

fn as_i64s(t: &Tensor) -> Result<Vec<i64>> {
    if t.dtype().is_float() {
        t.to_vec::<i64>()
    } else {
        t.to_i64_vec()
    }
}

impl Op for OneHot {
    fn op_type(&self) -> &str {
        "OneHot"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let dtype = fact_at(inputs, 2).and_then(|f| f.dtype);
        let depth = fact_at(inputs, 1)
            .and_then(|f| f.konst.as_ref())
            .and_then(|t| as_i64s(t).ok())
            .and_then(|v| v.first().copied());
        let shape = fact_at(inputs, 0).and_then(|f| f.shape.as_ref()).map(|s| {
            let r = s.len() as i64 + 1;
            let a = if self.axis < 0 {
                self.axis + r
            } else {
                self.axis
            };
            let mut out = s.clone();
            let d = match depth {
                Some(d) if d > 0 => Dim::Known(d as usize),
                _ => Dim::Unknown,
            };
            if (0..r).contains(&a) {
                out.insert(a as usize, d);
            }
            out
        });
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "OneHot";
        let idx_t = kiln_core::input_tensor(inputs, 0, op)?;
        let depth = as_i64s(&scalar_of(inputs, 1, op)?)?[0];
        let values = kiln_core::input_tensor(inputs, 2, op)?;
        if values.len() != 2 {
            return Err(kerr(
                op,
                format!(
                    "values must hold [off, on], found shape {:?}",
                    values.shape()
                ),
            ));
        }
        if depth < 1 {
            return Err(kerr(op, format!("depth must be positive, got {depth}")));
        }
        let idx = as_i64s(idx_t)?;
        let axis = norm_axis(op, self.axis, idx_t.rank() + 1)?;
        let d = usize::try_from(depth).map_err(|_| kerr(op, "depth is too large"))?;
        let s = idx_t.shape();
        let mut oshape = s.to_vec();
        oshape.insert(axis, d);
        checked_numel(op, &oshape, values.dtype().size())?;
        let pre: usize = s[..axis].iter().product();
        let post: usize = s[axis..].iter().product();
        let mut on = Vec::with_capacity(idx.len());
        for (flat, &i) in idx.iter().enumerate() {
            let i = if i < 0 { i + depth } else { i };
            if (0..depth).contains(&i) {
                let (p, q) = (flat / post.max(1), flat % post.max(1));
                on.push((p * d + i as usize) * post + q);
            }
        }
        let mut out = s[..axis].to_vec();
        out.push(d);
        out.extend_from_slice(&s[axis..]);
        let _ = pre;
        let values = values.reshape(&[2])?;
        Ok(vec![move_data(
            &OneHotMover { on },
            op,
            &[&values],
            values.dtype(),
            &out,
        )?
        .into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `Trilu`: keeps the upper (or lower) triangle of the last two dims from diagonal `k`.
#[derive(Debug)]
pub struct Trilu {
    upper: bool,
}

/// Builds `Trilu`.
pub fn build_trilu(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Trilu {
        upper: ctx.attrs().int("upper", 1)? != 0,
    }))
}

struct TriluMover {
    n: usize,
    m: usize,
    k: i64,
    upper: bool,
}

impl Mover for TriluMover {
    fn run<T: Clone + Send + Sync>(&self, srcs: &[&[T]], dst: &mut [T]) -> Result<()> {
        let (n, m) = (self.n, self.m);
        let src = srcs[0];
        if n * m == 0 {
            return Ok(());
        }
        for (mat, out) in dst.chunks_mut(n * m).enumerate() {
            let base = mat * n * m;
            for i in 0..n {
                let diag = (i as i64).saturating_add(self.k);
                let (lo, hi) = if self.upper {
                    (diag.clamp(0, m as i64) as usize, m)
                } else {
                    (0, diag.saturating_add(1).clamp(0, m as i64) as usize)
                };
                if lo < hi {
                    out[i * m + lo..i * m + hi]
                        .clone_from_slice(&src[base + i * m + lo..base + i * m + hi]);
                }
            }
        }
        Ok(())
    }
}

impl Op for Trilu {
    fn op_type(&self) -> &str {
        "Trilu"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let mut f = fact_at(inputs, 0).cloned().unwrap_or_default();
        f.konst = None;
        Ok(vec![f])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "Trilu";
        let x = kiln_core::input_tensor(inputs, 0, op)?;
        let k = match kiln_core::optional_tensor(inputs, 1, op)? {
            Some(t) => *t
                .to_i64_vec()?
                .first()
                .ok_or_else(|| kerr(op, "k is empty"))?,
            None => 0,
        };
        let r = x.rank();
        if r < 2 {
            return Err(kerr(
                op,
                format!("input must have rank >= 2, got {:?}", x.shape()),
            ));
        }
        let mv = TriluMover {
            n: x.shape()[r - 2],
            m: x.shape()[r - 1],
            k,
            upper: self.upper,
        };
        Ok(vec![move_data(&mv, op, &[x], x.dtype(), x.shape())?.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `ReverseSequence`: reverses the first `sequence_lens[b]` steps along `time_axis` for
/// each batch entry along `batch_axis`.
#[derive(Debug)]
pub struct ReverseSequence {
    batch_axis: usize,
    time_axis: usize,
}

/// Builds `ReverseSequence`.
pub fn build_reverse_sequence(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let (b, t) = (a.int("batch_axis", 1)?, a.int("time_axis", 0)?);
    if !matches!((b, t), (0, 1) | (1, 0)) {
        return Err(a.invalid(format!("batch_axis {b} and time_axis {t} must be 0 and 1")));
    }
    Ok(Box::new(ReverseSequence {
        batch_axis: b as usize,
        time_axis: t as usize,
    }))
}

impl Op for ReverseSequence {
    fn op_type(&self) -> &str {
        "ReverseSequence"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let mut f = fact_at(inputs, 0).cloned().unwrap_or_default();
        f.konst = None;
        Ok(vec![f])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "ReverseSequence";
        let x = kiln_core::input_tensor(inputs, 0, op)?;
        let lens = ints_input(inputs, 1, op)?;
        let s = x.shape();
        if s.len() < 2 {
            return Err(kerr(op, format!("input must have rank >= 2, got {s:?}")));
        }
        let (nb, nt) = (s[self.batch_axis], s[self.time_axis]);
        if lens.len() != nb {
            return Err(kerr(
                op,
                format!(
                    "sequence_lens has {} values for batch size {nb}",
                    lens.len()
                ),
            ));
        }
        let inner: usize = s[2..].iter().product();
        let mut offsets = Vec::with_capacity(s[0] * s[1]);
        for i0 in 0..s[0] {
            for i1 in 0..s[1] {
                let (b, t) = if self.batch_axis == 0 {
                    (i0, i1)
                } else {
                    (i1, i0)
                };
                let l = lens[b];
                if l < 0 || l as usize > nt {
                    return Err(kerr(
                        op,
                        format!("sequence length {l} is out of range for {nt} steps"),
                    ));
                }
                let l = l as usize;
                let st = if t < l { l - 1 - t } else { t };
                let (j0, j1) = if self.batch_axis == 0 {
                    (b, st)
                } else {
                    (st, b)
                };
                offsets.push(Some((j0 * s[1] + j1) * inner));
            }
        }
        let g = BlockGather {
            offsets,
            block: inner,
        };
        Ok(vec![move_data(&g, op, &[x], x.dtype(), s)?.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc<T: kiln_core::Element>(v: T) -> Value {
        Tensor::scalar(v).into()
    }

    #[test]
    fn range_int_float() {
        let y = Range
            .eval(&[Some(&sc(10i32)), Some(&sc(4i32)), Some(&sc(-3i32))])
            .unwrap();
        assert_eq!(y[0].as_tensor().unwrap().to_i64_vec().unwrap(), vec![10, 7]);
        let y = Range
            .eval(&[Some(&sc(1f32)), Some(&sc(5f32)), Some(&sc(2f32))])
            .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![1., 3.]
        );
        let y = Range
            .eval(&[Some(&sc(1f32)), Some(&sc(0f32)), Some(&sc(2f32))])
            .unwrap();
        assert_eq!(y[0].as_tensor().unwrap().len(), 0);
        assert!(Range
            .eval(&[Some(&sc(1i64)), Some(&sc(5i64)), Some(&sc(0i64))])
            .is_err());
        assert!(Range
            .eval(&[Some(&sc(0f32)), Some(&sc(1e30f32)), Some(&sc(1e-30f32))])
            .is_err());
    }

    #[test]
    fn eye_like_onehot() {
        let x: Value = Tensor::zeros(DType::I32, &[3, 4]).into();
        let y = EyeLike {
            dtype: Some(DType::F32),
            k: 1,
        }
        .eval(&[Some(&x)])
        .unwrap();
        let y = y[0].as_tensor().unwrap().to_f32_vec().unwrap();
        assert_eq!(y, vec![0., 1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1.]);
        let idx: Value = Tensor::from_vec(&[3], vec![0i64, -1, 5]).unwrap().into();
        let vals: Value = Tensor::from_vec(&[2], vec![0f32, 3.]).unwrap().into();
        let y = OneHot { axis: -1 }
            .eval(&[Some(&idx), Some(&sc(3i64)), Some(&vals)])
            .unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[3, 3]);
        assert_eq!(
            y.to_f32_vec().unwrap(),
            vec![3., 0., 0., 0., 0., 3., 0., 0., 0.]
        );
        let y = OneHot { axis: 0 }
            .eval(&[Some(&idx), Some(&sc(3f32)), Some(&vals)])
            .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![3., 0., 0., 0., 0., 0., 0., 3., 0.]
        );
    }

    #[test]
    fn trilu_and_reverse_sequence() {
        let x: Value = Tensor::from_vec(&[3, 3], (1..=9).map(|v| v as f32).collect())
            .unwrap()
            .into();
        let y = Trilu { upper: true }.eval(&[Some(&x)]).unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![1., 2., 3., 0., 5., 6., 0., 0., 9.]
        );
        let y = Trilu { upper: false }
            .eval(&[Some(&x), Some(&sc(-1i64))])
            .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![0., 0., 0., 4., 0., 0., 7., 8., 0.]
        );
        // time_axis 0, batch_axis 1: x[t][b]
        let x: Value = Tensor::from_vec(&[3, 2], vec![0i32, 10, 1, 11, 2, 12])
            .unwrap()
            .into();
        let lens: Value = Tensor::from_vec(&[2], vec![3i64, 2]).unwrap().into();
        let y = ReverseSequence {
            batch_axis: 1,
            time_axis: 0,
        }
        .eval(&[Some(&x), Some(&lens)])
        .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_i64_vec().unwrap(),
            vec![2, 11, 1, 10, 0, 12]
        );
        let bad: Value = Tensor::from_vec(&[2], vec![4i64, 2]).unwrap().into();
        assert!(ReverseSequence {
            batch_axis: 1,
            time_axis: 0
        }
        .eval(&[Some(&x), Some(&bad)])
        .is_err());
    }
}
