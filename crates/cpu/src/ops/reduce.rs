//! Reductions: ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2
//! ReduceLogSum ReduceLogSumExp ReduceSumSquare, ArgMax ArgMin, CumSum.
//!
//! Reductions walk the input once in memory order: dimensions are coalesced into
//! alternating kept/reduced groups, and the innermost group is processed as a contiguous
//! run (folded into one output element when reduced, added elementwise into a contiguous
//! output run when kept).

use std::any::Any;

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result,
    Tensor, TensorMut, Value, ValueKind,
};

use super::elementwise::num::Num;
use super::elementwise::{bad_dtype, infer_err, new_tensor, one};

/// Which reduction a [`Reduce`] op computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RedKind {
    /// Σ x.
    Sum,
    /// Σ x / n.
    Mean,
    /// max x.
    Max,
    /// min x.
    Min,
    /// Π x.
    Prod,
    /// Σ |x|.
    L1,
    /// √(Σ x²).
    L2,
    /// ln Σ x.
    LogSum,
    /// ln Σ eˣ.
    LogSumExp,
    /// Σ x².
    SumSquare,
}

/// A Reduce* op.
#[derive(Debug, Clone)]
pub struct Reduce {
    name: &'static str,
    kind: RedKind,
    /// Axes from the attribute (older opsets); `None` when absent.
    axes_attr: Option<Vec<i64>>,
    /// Axes come from input 1.
    axes_input: bool,
    keepdims: bool,
    noop_with_empty_axes: bool,
}

/// Normalises axes against a rank (negative axes count from the end); errors name `op`.
pub fn normalize_axes(op: &str, axes: &[i64], rank: usize) -> Result<Vec<usize>> {
    let r = rank as i64;
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = if a < 0 { a + r } else { a };
        if n < 0 || n >= r {
            return Err(KilnError::kernel(
                op,
                format!("axis {a} is out of range for rank {rank}"),
            ));
        }
        let n = n as usize;
        if out.contains(&n) {
            return Err(KilnError::kernel(op, format!("axis {a} is repeated")));
        }
        out.push(n);
    }
    Ok(out)
}

impl Reduce {
    /// The axes to reduce for this call: `None` means "return the input unchanged".
    fn axes(&self, inputs: &[Option<&Value>], rank: usize) -> Result<Option<Vec<bool>>> {
        let raw: Option<Vec<i64>> = if self.axes_input {
            match optional_tensor(inputs, 1, self.name)? {
                Some(t) => Some(
                    t.to_i64_vec()
                        .map_err(|e| KilnError::kernel(self.name, format!("axes: {e}")))?,
                ),
                None => None,
            }
        } else {
            self.axes_attr.clone()
        };
        let raw = raw.unwrap_or_default();
        if raw.is_empty() {
            if self.noop_with_empty_axes {
                return Ok(None);
            }
            return Ok(Some(vec![true; rank]));
        }
        if rank == 0 {
            // A scalar: any axis list is accepted by reference implementations only as
            // "reduce everything"; anything else is out of range.
            return Err(KilnError::kernel(
                self.name,
                "cannot reduce a rank-0 tensor along an axis",
            ));
        }
        let ax = normalize_axes(self.name, &raw, rank)?;
        let mut mask = vec![false; rank];
        for a in ax {
            mask[a] = true;
        }
        Ok(Some(mask))
    }

    /// The in-place f32 path (every kind but LogSumExp), accumulating in f64 scratch like
    /// the reference. Returns false, writing nothing, where it does not apply.
    fn reduce_f32_into(
        &self,
        inputs: &[Option<&Value>],
        outputs: &mut [TensorMut<'_>],
    ) -> Result<bool> {
        let x = input_tensor(inputs, 0, self.name)?;
        let rank = x.rank();
        let [out] = outputs else {
            return Ok(false);
        };
        if x.dtype() != DType::F32 || out.dtype() != DType::F32 || self.kind == RedKind::LogSumExp {
            return Ok(false);
        }
        // The reduced-axes mask, on the stack.
        let mut mask = smallvec::SmallVec::<[bool; MAX_GROUPS]>::from_elem(false, rank);
        let axes_tensor = if self.axes_input {
            optional_tensor(inputs, 1, self.name)?.filter(|t| !t.is_empty())
        } else {
            None
        };
        let attr_axes = self.axes_attr.as_deref().unwrap_or_default();
        let n_axes = axes_tensor.map_or(attr_axes.len(), |t| t.len());
        if n_axes == 0 {
            if self.noop_with_empty_axes {
                return Ok(false);
            }
            mask.iter_mut().for_each(|m| *m = true);
        } else {
            if rank == 0 {
                return Ok(false);
            }
            let from_tensor = axes_tensor.map(|t| t.as_slice::<i64>()).transpose();
            let Ok(from_tensor) = from_tensor else {
                return Ok(false);
            };
            for k in 0..n_axes {
                let a = match from_tensor {
                    Some(v) => v[k],
                    None => attr_axes[k],
                };
                let n = if a < 0 { a + rank as i64 } else { a };
                if n < 0 || n >= rank as i64 || mask[n as usize] {
                    // Out of range or repeated: the reference path reports it.
                    return Ok(false);
                }
                mask[n as usize] = true;
            }
        }
        let shape = x.shape();
        let kept = shape
            .iter()
            .zip(&mask)
            .filter_map(|(&d, &m)| match (m, self.keepdims) {
                (false, _) => Some(d),
                (true, true) => Some(1),
                (true, false) => None,
            });
        if !kept.eq(out.shape().iter().copied()) {
            return Ok(false);
        }
        let count: usize = shape
            .iter()
            .zip(&mask)
            .filter(|(_, &m)| m)
            .map(|(&d, _)| d)
            .product();
        let xv = x.as_slice::<f32>()?;
        let y = out.as_mut_slice::<f32>()?;
        match self.kind {
            RedKind::Max | RedKind::Min => {
                let max = self.kind == RedKind::Max;
                y.fill(if max {
                    <f32 as Num>::LOWEST
                } else {
                    <f32 as Num>::HIGHEST
                });
                fold_runs_into(
                    xv,
                    shape,
                    &mask,
                    y,
                    |a, b, _| {
                        if max {
                            a.maxv(b)
                        } else {
                            a.minv(b)
                        }
                    },
                );
            }
            kind => {
                let (init, f): (f64, fn(f64, f64) -> f64) = match kind {
                    RedKind::Prod => (1.0, |a, b| a * b),
                    RedKind::L1 => (0.0, |a, b| a + b.abs()),
                    RedKind::L2 | RedKind::SumSquare => (0.0, |a, b| a + b * b),
                    _ => (0.0, |a, b| a + b),
                };
                crate::scratch::with_scratch::<f64, _>(y.len(), |acc| {
                    acc.fill(init);
                    fold_runs_into(xv, shape, &mask, acc, |a, b, _| f(a, b as f64));
                    let n = count as f64;
                    for (o, &a) in y.iter_mut().zip(acc.iter()) {
                        *o = match kind {
                            RedKind::Mean => a / n,
                            RedKind::L2 => a.sqrt(),
                            RedKind::LogSum => a.ln(),
                            _ => a,
                        } as f32;
                    }
                });
            }
        }
        Ok(true)
    }

    fn known_axes(&self, inputs: &[Option<&Fact>]) -> Option<Vec<i64>> {
        if self.axes_input {
            match inputs.get(1).copied().flatten() {
                None => Some(vec![]),
                Some(f) => f.konst.as_ref().and_then(|t| t.to_i64_vec().ok()),
            }
        } else {
            Some(self.axes_attr.clone().unwrap_or_default())
        }
    }
}

impl Op for Reduce {
    fn op_type(&self) -> &str {
        self.name
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let Some(x) = inputs.first().copied().flatten() else {
            return Ok(vec![Fact::unknown()]);
        };
        let mut f = Fact {
            kind: ValueKind::Tensor,
            dtype: x.dtype,
            shape: None,
            konst: None,
        };
        let Some(shape) = &x.shape else {
            return Ok(vec![f]);
        };
        let rank = shape.len();
        match self.known_axes(inputs) {
            Some(raw) if raw.is_empty() && self.noop_with_empty_axes => {
                f.shape = Some(shape.clone())
            }
            Some(raw) => {
                let mask: Vec<bool> = if raw.is_empty() {
                    vec![true; rank]
                } else {
                    let ax = normalize_axes(self.name, &raw, rank)
                        .map_err(|e| infer_err(self.name, e.to_string()))?;
                    (0..rank).map(|i| ax.contains(&i)).collect()
                };
                f.shape = Some(
                    shape
                        .iter()
                        .zip(&mask)
                        .filter_map(|(d, &m)| match (m, self.keepdims) {
                            (false, _) => Some(d.clone()),
                            (true, true) => Some(Dim::Known(1)),
                            (true, false) => None,
                        })
                        .collect(),
                );
            }
            None if self.keepdims => f.shape = Some(vec![Dim::Unknown; rank]),
            None => {}
        }
        Ok(vec![f])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.name)?;
        let Some(mask) = self.axes(inputs, x.rank())? else {
            return one(x.clone());
        };
        one(reduce_tensor(
            self.name,
            self.kind,
            x,
            &mask,
            self.keepdims,
        )?)
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        if !self.reduce_f32_into(inputs, outputs)? {
            let produced = self.eval(inputs)?;
            for (slot, value) in outputs.iter_mut().zip(&produced) {
                slot.copy_from(value.as_tensor()?)?;
            }
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Reduces `x` over the dims where `mask` is true.
pub fn reduce_tensor(
    op: &str,
    kind: RedKind,
    x: &Tensor,
    mask: &[bool],
    keepdims: bool,
) -> Result<Tensor> {
    let out_shape: Vec<usize> = x
        .shape()
        .iter()
        .zip(mask)
        .filter_map(|(&d, &m)| {
            if !m {
                Some(d)
            } else if keepdims {
                Some(1)
            } else {
                None
            }
        })
        .collect();
    let dt = x.dtype();
    let shape = x.shape();
    if dt == DType::Bool && matches!(kind, RedKind::Max | RedKind::Min) {
        let v = x.as_raw::<u8>()?;
        let init = if kind == RedKind::Max { 0u8 } else { 1 };
        let acc = fold_runs(v, shape, mask, init, |a, b, _| {
            if kind == RedKind::Max {
                a | b
            } else {
                a & b
            }
        });
        return Tensor::from_raw(DType::Bool, &out_shape, &acc);
    }
    crate::dispatch_numeric!(dt, T => reduce_typed::<T>(kind, x.as_slice::<T>()?, shape, mask, &out_shape),
        _ => Err(bad_dtype(op, dt)))
}

fn reduce_typed<T: Num>(
    kind: RedKind,
    v: &[T],
    shape: &[usize],
    mask: &[bool],
    out_shape: &[usize],
) -> Result<Tensor> {
    let count: usize = shape
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .map(|(&d, _)| d)
        .product();
    let out: Vec<T> = match kind {
        RedKind::Max => fold_runs(v, shape, mask, T::LOWEST, |a, b, _| a.maxv(b)),
        RedKind::Min => fold_runs(v, shape, mask, T::HIGHEST, |a, b, _| a.minv(b)),
        RedKind::Sum | RedKind::Prod | RedKind::L1 | RedKind::SumSquare if !T::FLOAT => {
            let acc: Vec<i64> = match kind {
                RedKind::Sum => {
                    fold_runs(v, shape, mask, 0i64, |a, b, _| a.wrapping_add(b.as_i64()))
                }
                RedKind::Prod => {
                    fold_runs(v, shape, mask, 1i64, |a, b, _| a.wrapping_mul(b.as_i64()))
                }
                RedKind::L1 => fold_runs(v, shape, mask, 0i64, |a, b, _| {
                    a.wrapping_add(b.as_i64().wrapping_abs())
                }),
                _ => fold_runs(v, shape, mask, 0i64, |a, b, _| {
                    a.wrapping_add(b.as_i64().wrapping_mul(b.as_i64()))
                }),
            };
            acc.into_iter().map(T::of_i64).collect()
        }
        RedKind::LogSumExp => {
            let mx: Vec<f64> = fold_runs(v, shape, mask, f64::NEG_INFINITY, |a, b, _| {
                let b = b.as_f64();
                if b.is_infinite() {
                    a
                } else {
                    a.max(b)
                }
            });
            let shift: Vec<f64> = mx
                .iter()
                .map(|m| if m.is_finite() { *m } else { 0.0 })
                .collect();
            let s = fold_runs(v, shape, mask, 0f64, |a, b, o| {
                a + (b.as_f64() - shift[o]).exp()
            });
            s.iter()
                .zip(&shift)
                .map(|(s, m)| T::of_f64(s.ln() + m))
                .collect()
        }
        _ => {
            let (init, f): (f64, fn(f64, f64) -> f64) = match kind {
                RedKind::Prod => (1.0, |a, b| a * b),
                RedKind::L1 => (0.0, |a, b| a + b.abs()),
                RedKind::L2 | RedKind::SumSquare => (0.0, |a, b| a + b * b),
                _ => (0.0, |a, b| a + b),
            };
            let acc = fold_runs(v, shape, mask, init, |a, b, _| f(a, b.as_f64()));
            let n = count as f64;
            acc.into_iter()
                .map(|a| {
                    T::of_f64(match kind {
                        RedKind::Mean => a / n,
                        RedKind::L2 => a.sqrt(),
                        RedKind::LogSum => a.ln(),
                        _ => a,
                    })
                })
                .collect()
        }
    };
    Tensor::from_vec(out_shape, out)
}

/// Folds `x` (of `shape`) over the dims where `mask` is true into one accumulator per
/// output element; `f(acc, x, out_index)`.
pub fn fold_runs<T: Copy, A: Copy>(
    x: &[T],
    shape: &[usize],
    mask: &[bool],
    init: A,
    f: impl Fn(A, T, usize) -> A,
) -> Vec<A> {
    let out_len: usize = shape
        .iter()
        .zip(mask)
        .filter(|(_, &m)| !m)
        .map(|(&d, _)| d)
        .product();
    let mut acc = vec![init; out_len];
    fold_runs_into(x, shape, mask, &mut acc, f);
    acc
}

/// Most dims [`fold_runs_into`] handles (coalesced groups of dims, kept on the stack).
const MAX_GROUPS: usize = 32;

/// [`fold_runs`] into caller-provided accumulators `acc` (one per output element, already
/// holding the initial value). Allocation-free for inputs of rank ≤ 32 (the bookkeeping
/// lives on the stack; higher ranks spill it to the heap).
pub fn fold_runs_into<T: Copy, A: Copy>(
    x: &[T],
    shape: &[usize],
    mask: &[bool],
    acc: &mut [A],
    f: impl Fn(A, T, usize) -> A,
) {
    if x.is_empty() || acc.is_empty() {
        return;
    }
    // Coalesce into groups (size, reduced), skipping size-1 dims.
    let mut groups = smallvec::SmallVec::<[(usize, bool); MAX_GROUPS]>::new();
    for (&d, &m) in shape.iter().zip(mask) {
        if d == 1 {
            continue;
        }
        match groups.last_mut() {
            Some(g) if g.1 == m => g.0 *= d,
            _ => groups.push((d, m)),
        }
    }
    let (inner, inner_red) = groups.pop().unwrap_or((1, true));
    // Output strides of the outer groups (0 for reduced ones).
    let mut ostr = smallvec::SmallVec::<[usize; MAX_GROUPS]>::from_elem(0, groups.len());
    let mut s = if inner_red { 1 } else { inner };
    for (i, g) in groups.iter().enumerate().rev() {
        if !g.1 {
            ostr[i] = s;
            s *= g.0;
        }
    }
    let mut coords = smallvec::SmallVec::<[usize; MAX_GROUPS]>::from_elem(0, groups.len());
    let mut o = 0usize;
    for run in x.chunks(inner) {
        if inner_red {
            let mut a = acc[o];
            for &v in run {
                a = f(a, v, o);
            }
            acc[o] = a;
        } else {
            for (k, (a, &v)) in acc[o..o + inner].iter_mut().zip(run).enumerate() {
                *a = f(*a, v, o + k);
            }
        }
        for i in (0..groups.len()).rev() {
            coords[i] += 1;
            o += ostr[i];
            if coords[i] < groups[i].0 {
                break;
            }
            o -= ostr[i] * groups[i].0;
            coords[i] = 0;
        }
    }
}

/// ArgMax / ArgMin along one axis.
#[derive(Debug, Clone)]
pub struct ArgReduce {
    name: &'static str,
    max: bool,
    axis: i64,
    keepdims: bool,
    last: bool,
}

impl Op for ArgReduce {
    fn op_type(&self) -> &str {
        self.name
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let mut f = Fact::of_dtype(DType::I64);
        if let Some(shape) = inputs
            .first()
            .copied()
            .flatten()
            .and_then(|x| x.shape.clone())
        {
            let ax = normalize_axes(self.name, &[self.axis], shape.len())
                .map_err(|e| infer_err(self.name, e.to_string()))?[0];
            let mut s = shape;
            if self.keepdims {
                s[ax] = Dim::Known(1);
            } else {
                s.remove(ax);
            }
            f.shape = Some(s);
        }
        Ok(vec![f])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.name)?;
        let ax = normalize_axes(self.name, &[self.axis], x.rank())?[0];
        let shape = x.shape();
        let (outer, n, inner): (usize, usize, usize) = (
            shape[..ax].iter().product(),
            shape[ax],
            shape[ax + 1..].iter().product(),
        );
        if n == 0 {
            return Err(KilnError::kernel(
                self.name,
                "cannot take the arg of an empty axis",
            ));
        }
        let mut out_shape = shape.to_vec();
        if self.keepdims {
            out_shape[ax] = 1;
        } else {
            out_shape.remove(ax);
        }
        let dt = x.dtype();
        let idx = crate::dispatch_numeric!(dt, T => self.arg::<T>(x.as_slice::<T>()?, outer, n, inner),
            _ => if dt == DType::Bool { self.arg::<u8>(x.as_raw::<u8>()?, outer, n, inner) } else { return Err(bad_dtype(self.name, dt)) });
        one(Tensor::from_vec(&out_shape, idx)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl ArgReduce {
    fn arg<T: PartialOrd + Copy>(&self, v: &[T], outer: usize, n: usize, inner: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(outer * inner);
        for a in 0..outer {
            for j in 0..inner {
                let at = |k: usize| v[a * n * inner + k * inner + j];
                let mut best = at(0);
                let mut bi = 0usize;
                for k in 1..n {
                    let c = at(k);
                    #[allow(clippy::eq_op)]
                    let c_nan = c != c;
                    #[allow(clippy::eq_op)]
                    let b_nan = best != best;
                    let better = if b_nan {
                        false
                    } else if c_nan {
                        true
                    } else if self.max {
                        c > best || (self.last && c == best)
                    } else {
                        c < best || (self.last && c == best)
                    };
                    if better {
                        best = c;
                        bi = k;
                    }
                }
                out.push(bi as i64);
            }
        }
        out
    }
}

/// CumSum along the axis given by input 1.
#[derive(Debug, Clone)]
pub struct CumSum {
    exclusive: bool,
    reverse: bool,
}

impl Op for CumSum {
    fn op_type(&self) -> &str {
        "CumSum"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        super::elementwise::infer_unary(inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "CumSum")?;
        let a = input_tensor(inputs, 1, "CumSum")?;
        let axv = a
            .to_i64_vec()
            .map_err(|e| KilnError::kernel("CumSum", format!("axis: {e}")))?;
        if axv.len() != 1 || a.rank() > 1 {
            return Err(KilnError::kernel(
                "CumSum",
                format!("axis must be a scalar, found shape {:?}", a.shape()),
            ));
        }
        let ax = normalize_axes("CumSum", &axv, x.rank())?[0];
        let shape = x.shape();
        let (outer, n, inner): (usize, usize, usize) = (
            shape[..ax].iter().product(),
            shape[ax],
            shape[ax + 1..].iter().product(),
        );
        let dt = x.dtype();
        let out = crate::dispatch_numeric!(dt, T => {
            let v = x.as_slice::<T>()?;
            new_tensor::<T>(dt, shape, |o| { self.cumsum(v, o, outer, n, inner); Ok(()) })
        }, _ => Err(bad_dtype("CumSum", dt)))?;
        one(out)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl CumSum {
    fn cumsum<T: Num>(&self, v: &[T], o: &mut [T], outer: usize, n: usize, inner: usize) {
        for a in 0..outer {
            for j in 0..inner {
                let mut acc = T::ZERO;
                for step in 0..n {
                    let k = if self.reverse { n - 1 - step } else { step };
                    let i = a * n * inner + k * inner + j;
                    if self.exclusive {
                        o[i] = acc;
                        acc = acc.addv(v[i]);
                    } else {
                        acc = acc.addv(v[i]);
                        o[i] = acc;
                    }
                }
            }
        }
    }
}

fn build_reduce(ctx: &BuildCtx, name: &'static str, kind: RedKind) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let input_since = if kind == RedKind::Sum { 13 } else { 18 };
    let axes_input = ctx.opset() >= input_since;
    Ok(Box::new(Reduce {
        name,
        kind,
        axes_attr: if axes_input {
            None
        } else {
            a.opt_ints("axes")?
        },
        axes_input,
        keepdims: a.int("keepdims", 1)? != 0,
        noop_with_empty_axes: axes_input && a.int("noop_with_empty_axes", 0)? != 0,
    }))
}

fn build_arg(ctx: &BuildCtx, name: &'static str, max: bool) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    Ok(Box::new(ArgReduce {
        name,
        max,
        axis: a.int("axis", 0)?,
        keepdims: a.int("keepdims", 1)? != 0,
        last: a.int("select_last_index", 0)? != 0,
    }))
}

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    macro_rules! red {
        ($($name:literal => $kind:ident),*) => {$(
            reg.register($name, |c: &BuildCtx| build_reduce(c, $name, RedKind::$kind));
        )*};
    }
    red!("ReduceSum" => Sum, "ReduceMean" => Mean, "ReduceMax" => Max, "ReduceMin" => Min, "ReduceProd" => Prod,
        "ReduceL1" => L1, "ReduceL2" => L2, "ReduceLogSum" => LogSum, "ReduceLogSumExp" => LogSumExp,
        "ReduceSumSquare" => SumSquare);
    reg.register("ArgMax", |c: &BuildCtx| build_arg(c, "ArgMax", true));
    reg.register("ArgMin", |c: &BuildCtx| build_arg(c, "ArgMin", false));
    reg.register("CumSum", |c: &BuildCtx| {
        let a = c.attrs();
        Ok(Box::new(CumSum {
            exclusive: a.int("exclusive", 0)? != 0,
            reverse: a.int("reverse", 0)? != 0,
        }))
    });
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::testutil::*;
    use kiln_core::{Attr, DType, Dim, Fact, Tensor};

    fn naive(x: &[f32], shape: &[usize], mask: &[bool], f: fn(&[f32]) -> f32) -> Vec<f32> {
        let out_shape: Vec<usize> = shape
            .iter()
            .zip(mask)
            .map(|(&d, &m)| if m { 1 } else { d })
            .collect();
        let n_out: usize = out_shape.iter().product();
        let st = kiln_core::strides(shape);
        let ost = kiln_core::strides(&out_shape);
        let mut groups = vec![Vec::new(); n_out];
        for (i, &v) in x.iter().enumerate() {
            let mut o = 0;
            for d in 0..shape.len() {
                let c = (i / st[d]) % shape[d];
                if !mask[d] {
                    o += c * ost[d];
                }
            }
            groups[o].push(v);
        }
        groups.iter().map(|g| f(g)).collect()
    }

    #[test]
    fn reductions_match_naive() {
        let shape = [3, 4, 5, 2];
        let x = rand(120, 5);
        #[allow(clippy::type_complexity)]
        let kinds: Vec<(&str, fn(&[f32]) -> f32)> = vec![
            ("ReduceSum", |g| g.iter().sum()),
            ("ReduceMean", |g| g.iter().sum::<f32>() / g.len() as f32),
            ("ReduceMax", |g| g.iter().cloned().fold(f32::MIN, f32::max)),
            ("ReduceMin", |g| g.iter().cloned().fold(f32::MAX, f32::min)),
            ("ReduceProd", |g| g.iter().product()),
            ("ReduceL1", |g| g.iter().map(|v| v.abs()).sum()),
            ("ReduceL2", |g| g.iter().map(|v| v * v).sum::<f32>().sqrt()),
            ("ReduceSumSquare", |g| g.iter().map(|v| v * v).sum()),
            ("ReduceLogSumExp", |g| {
                g.iter().map(|v| v.exp()).sum::<f32>().ln()
            }),
        ];
        let axes_sets: Vec<Vec<i64>> = vec![vec![1], vec![0, 2], vec![-1], vec![1, 3], vec![]];
        for (op, f) in &kinds {
            for axes in &axes_sets {
                let mask: Vec<bool> = (0..4)
                    .map(|i| axes.is_empty() || axes.iter().any(|&a| (a + 4) % 4 == i as i64))
                    .collect();
                let want = naive(&x, &shape, &mask, *f);
                // Opset 18: axes as input.
                let ax = if axes.is_empty() {
                    None
                } else {
                    Some(Tensor::from_vec(&[axes.len()], axes.clone()).unwrap())
                };
                let inputs = [Some(f32t(&shape, x.clone())), ax];
                let y = run1(op, 18, vec![], &inputs).unwrap();
                close(y.as_slice::<f32>().unwrap(), &want, 1e-4);
                // The in-place path agrees bit for bit.
                check_into(build(op, 18, vec![], 2, 1).unwrap().as_ref(), &inputs);
                // Opset 13 (ReduceSum excepted): axes attribute, keepdims=0.
                if *op != "ReduceSum" {
                    let mut attrs = vec![("keepdims", Attr::Int(0))];
                    if !axes.is_empty() {
                        attrs.push(("axes", Attr::Ints(axes.clone())));
                    }
                    let inputs = [Some(f32t(&shape, x.clone()))];
                    check_into(
                        build(op, 13, attrs.clone(), 1, 1).unwrap().as_ref(),
                        &inputs,
                    );
                    let y = run1(op, 13, attrs, &inputs).unwrap();
                    let kept: Vec<usize> = shape
                        .iter()
                        .zip(&mask)
                        .filter(|(_, m)| !**m)
                        .map(|(d, _)| *d)
                        .collect();
                    assert_eq!(y.shape(), &kept[..]);
                    close(y.as_slice::<f32>().unwrap(), &want, 1e-4);
                }
            }
        }
    }

    #[test]
    fn reduce_edge_cases() {
        let x = f32t(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let empty = Tensor::from_vec::<i64>(&[0], vec![]).unwrap();
        let y = run1(
            "ReduceSum",
            13,
            vec![("noop_with_empty_axes", Attr::Int(1))],
            &[Some(x.clone()), Some(empty)],
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        let e = f32t(&[2, 0], vec![]);
        let ax = Tensor::from_vec(&[1], vec![1i64]).unwrap();
        let y = run1(
            "ReduceSum",
            13,
            vec![],
            &[Some(e.clone()), Some(ax.clone())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[0.0, 0.0]);
        let y = run1(
            "ReduceProd",
            18,
            vec![],
            &[Some(e.clone()), Some(ax.clone())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[1.0, 1.0]);
        let y = run1(
            "ReduceMax",
            18,
            vec![],
            &[Some(e.clone()), Some(ax.clone())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[f32::NEG_INFINITY; 2]);
        let y = run1("ReduceLogSumExp", 18, vec![], &[Some(e), Some(ax.clone())]).unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[f32::NEG_INFINITY; 2]);
        let i = Tensor::from_vec(&[2, 2], vec![1i32, 2, 3, 4]).unwrap();
        let y = run1(
            "ReduceMean",
            18,
            vec![],
            &[Some(i.clone()), Some(ax.clone())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[1, 3]);
        let y = run1("ReduceProd", 18, vec![], &[Some(i), Some(ax)]).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[2, 12]);
        let bad = Tensor::from_vec(&[1], vec![5i64]).unwrap();
        assert!(run1("ReduceSum", 13, vec![], &[Some(x.clone()), Some(bad)]).is_err());
        let op = build("ReduceMean", 13, vec![("axes", Attr::Ints(vec![1]))], 1, 1).unwrap();
        let f = op
            .infer(
                &[Some(&Fact::tensor(
                    DType::F32,
                    vec![Dim::Sym("b".into()), Dim::Known(7)],
                ))],
                1,
            )
            .unwrap();
        assert_eq!(f[0].shape, Some(vec![Dim::Sym("b".into()), Dim::Known(1)]));
    }

    #[test]
    fn argmax_cumsum() {
        let x = f32t(&[2, 3], vec![1.0, 5.0, 5.0, 7.0, 2.0, 7.0]);
        let y = run1(
            "ArgMax",
            13,
            vec![("axis", Attr::Int(1))],
            &[Some(x.clone())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[1, 0]);
        assert_eq!(y.shape(), &[2, 1]);
        let y = run1(
            "ArgMax",
            13,
            vec![
                ("axis", Attr::Int(1)),
                ("select_last_index", Attr::Int(1)),
                ("keepdims", Attr::Int(0)),
            ],
            &[Some(x.clone())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[2, 2]);
        let y = run1("ArgMin", 13, vec![], &[Some(x.clone())]).unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[0, 1, 0]);
        let ax = Tensor::scalar(1i32);
        let y = run1("CumSum", 14, vec![], &[Some(x.clone()), Some(ax.clone())]).unwrap();
        assert_eq!(
            y.as_slice::<f32>().unwrap(),
            &[1.0, 6.0, 11.0, 7.0, 9.0, 16.0]
        );
        let y = run1(
            "CumSum",
            14,
            vec![("exclusive", Attr::Int(1)), ("reverse", Attr::Int(1))],
            &[Some(x.clone()), Some(ax)],
        )
        .unwrap();
        assert_eq!(
            y.as_slice::<f32>().unwrap(),
            &[10.0, 5.0, 0.0, 9.0, 7.0, 0.0]
        );
        assert!(run1(
            "CumSum",
            14,
            vec![],
            &[Some(x.clone()), Some(Tensor::scalar(2i64))]
        )
        .is_err());
        assert!(run1("ArgMax", 13, vec![("axis", Attr::Int(2))], &[Some(x)]).is_err());
    }
}
