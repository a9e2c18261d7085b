//! Slice: a strided view (steps may be negative), copied with block copies of the innermost
//! contiguous run.

use std::any::Any;

use kiln_core::{BuildCtx, DType, Dim, Fact, Op, Result, Tensor, TensorMut, Value};

use super::common::*;

/// `Slice`: starts/ends/axes attributes (opset 1-9) or inputs with optional axes and steps
/// (opset 10+).
#[derive(Debug)]
pub struct Slice {
    attrs: Option<SliceAttrs>,
}

/// Opset 1-9 attributes: starts, ends, axes.
type SliceAttrs = (Vec<i64>, Vec<i64>, Option<Vec<i64>>);

/// Builds `Slice`.
pub fn build_slice(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let attrs = if ctx.opset() < 10 {
        let starts = a
            .opt_ints("starts")?
            .ok_or_else(|| a.invalid("Slice-1 needs starts"))?;
        let ends = a
            .opt_ints("ends")?
            .ok_or_else(|| a.invalid("Slice-1 needs ends"))?;
        Some((starts, ends, a.opt_ints("axes")?.filter(|v| !v.is_empty())))
    } else {
        None
    };
    Ok(Box::new(Slice { attrs }))
}

/// One resolved slice along one axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AxisSlice {
    /// First index taken.
    pub start: usize,
    /// Number of elements taken.
    pub count: usize,
    /// Step (non-zero).
    pub step: i64,
}

/// Resolves start/end/step against a dim with ONNX's clamping rules.
pub(crate) fn resolve_axis(
    op: &str,
    start: i64,
    end: i64,
    step: i64,
    dim: usize,
) -> Result<AxisSlice> {
    if step == 0 {
        return Err(kerr(op, "step cannot be 0"));
    }
    let d = dim as i64;
    let fix = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
    let (s, e) = (fix(start), fix(end));
    let (s, e, count) = if step > 0 {
        let s = s.clamp(0, d);
        let e = e.clamp(0, d);
        (s, e, if e > s { (e - s - 1) / step + 1 } else { 0 })
    } else {
        // numpy semantics (ONNX's reference): a start below 0 selects nothing.
        let s = s.clamp(-1, d - 1);
        let e = e.clamp(-1, d - 1);
        let neg = step.unsigned_abs().min(i64::MAX as u64) as i64;
        (s.max(0), e, if s > e { (s - e - 1) / neg + 1 } else { 0 })
    };
    let _ = e;
    Ok(AxisSlice {
        start: s as usize,
        count: count as usize,
        step,
    })
}

/// Parsed slicing parameters: (starts, ends, axes, steps).
type Params = (Ints, Ints, Option<Ints>, Option<Ints>);

/// Per-axis slices for the whole shape (untouched axes take everything).
pub(crate) fn plan_slices(
    op: &str,
    shape: &[usize],
    p: &Params,
) -> Result<smallvec::SmallVec<[AxisSlice; 8]>> {
    let (starts, ends, axes, steps) = p;
    let rank = shape.len();
    if starts.len() != ends.len() {
        return Err(kerr(
            op,
            format!("starts {starts:?} and ends {ends:?} differ in length"),
        ));
    }
    let axes: Dims = match axes {
        Some(a) => {
            if a.len() != starts.len() {
                return Err(kerr(
                    op,
                    format!("axes {a:?} and starts {starts:?} differ in length"),
                ));
            }
            norm_axes(op, a, rank)?
        }
        None => {
            if starts.len() > rank {
                return Err(kerr(op, format!("{} starts for rank {rank}", starts.len())));
            }
            (0..starts.len()).collect()
        }
    };
    if let Some(s) = steps {
        if s.len() != starts.len() {
            return Err(kerr(
                op,
                format!("steps {s:?} and starts {starts:?} differ in length"),
            ));
        }
    }
    let mut out: smallvec::SmallVec<[AxisSlice; 8]> = shape
        .iter()
        .map(|&d| AxisSlice {
            start: 0,
            count: d,
            step: 1,
        })
        .collect();
    for (i, &a) in axes.iter().enumerate() {
        let step = steps.as_ref().map_or(1, |s| s[i]);
        out[a] = resolve_axis(op, starts[i], ends[i], step, shape[a])?;
    }
    Ok(out)
}

/// The strided view of `shape` selected by `slices`.
pub(crate) fn slice_view(shape: &[usize], slices: &[AxisSlice]) -> StridedView {
    let st = istrides(shape);
    let mut offset = 0usize;
    let mut strides = IStrides::new();
    for (i, s) in slices.iter().enumerate() {
        if s.count > 0 {
            offset += s.start * st[i] as usize;
        }
        strides.push(st[i] * s.step as isize);
    }
    StridedView {
        shape: slices.iter().map(|s| s.count).collect(),
        strides,
        offset,
    }
}

impl Slice {
    fn params(&self, inputs: &[Option<&Value>]) -> Result<Params> {
        match &self.attrs {
            Some((s, e, a)) => Ok((
                s.iter().copied().collect(),
                e.iter().copied().collect(),
                a.as_ref().map(|a| a.iter().copied().collect()),
                None,
            )),
            None => Ok((
                ints_input(inputs, 1, "Slice")?,
                ints_input(inputs, 2, "Slice")?,
                opt_ints_input(inputs, 3, "Slice")?,
                opt_ints_input(inputs, 4, "Slice")?,
            )),
        }
    }

    fn plan<'a>(&self, inputs: &[Option<&'a Value>]) -> Result<(&'a Tensor, StridedView)> {
        let x = kiln_core::input_tensor(inputs, 0, "Slice")?;
        let p = self.params(inputs)?;
        let slices = plan_slices("Slice", x.shape(), &p)?;
        Ok((x, slice_view(x.shape(), &slices)))
    }

    fn infer_params(&self, inputs: &[Option<&Fact>]) -> Option<Params> {
        match &self.attrs {
            Some((s, e, a)) => Some((
                s.iter().copied().collect(),
                e.iter().copied().collect(),
                a.as_ref().map(|a| a.iter().copied().collect()),
                None,
            )),
            None => {
                let ints = |i: usize| konst_ints(fact_at(inputs, i)).map(Ints::from_vec);
                let opt = |i: usize| match fact_at(inputs, i) {
                    None => Some(None),
                    Some(_) => ints(i).map(Some),
                };
                Some((ints(1)?, ints(2)?, opt(3)?, opt(4)?))
            }
        }
    }
}

impl Op for Slice {
    fn op_type(&self) -> &str {
        "Slice"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let Some(shape) = x.and_then(|f| f.shape.as_ref()) else {
            return Ok(vec![tensor_fact(dtype, None)]);
        };
        let rank = shape.len();
        let Some((starts, ends, axes, steps)) = self.infer_params(inputs) else {
            // Unknown parameters: which axes are touched is unknown too (unless axes are).
            let axes = match &self.attrs {
                None => konst_ints(fact_at(inputs, 3)),
                Some(_) => None,
            };
            let out = match axes.and_then(|a| norm_axes("Slice", &a, rank).ok()) {
                Some(ax) => shape
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        if ax.contains(&i) {
                            Dim::Unknown
                        } else {
                            d.clone()
                        }
                    })
                    .collect(),
                None => vec![Dim::Unknown; rank],
            };
            return Ok(vec![tensor_fact(dtype, Some(out))]);
        };
        let axes_n: Dims = match &axes {
            Some(a) => norm_axes("Slice", a, rank).map_err(|e| ierr("Slice", e.to_string()))?,
            None => (0..starts.len().min(rank)).collect(),
        };
        if starts.len() != ends.len()
            || axes_n.len() != starts.len()
            || steps.as_ref().is_some_and(|s| s.len() != starts.len())
        {
            return Err(ierr("Slice", "starts/ends/axes/steps lengths differ"));
        }
        let mut out = shape.clone();
        for (i, &a) in axes_n.iter().enumerate() {
            let step = steps.as_ref().map_or(1, |s| s[i]);
            out[a] = match shape[a].known() {
                Some(d) => Dim::Known(
                    resolve_axis("Slice", starts[i], ends[i], step, d)
                        .map_err(|e| ierr("Slice", e.to_string()))?
                        .count,
                ),
                None if step == 1 && starts[i] == 0 && ends[i] >= i32::MAX as i64 => {
                    shape[a].clone()
                }
                None if step == 1
                    && starts[i] >= 0
                    && ends[i] >= starts[i]
                    && ends[i] < i32::MAX as i64 =>
                {
                    Dim::Unknown
                }
                None => Dim::Unknown,
            };
        }
        Ok(vec![tensor_fact(dtype, Some(out))])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let (x, view) = self.plan(inputs)?;
        let shape = view.shape.clone();
        Ok(vec![move_data(
            &ViewMover(view),
            "Slice",
            &[x],
            x.dtype(),
            &shape,
        )?
        .into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let (x, view) = self.plan(inputs)?;
        let shape = view.shape.clone();
        match outputs.first_mut() {
            Some(out) if x.dtype() != DType::String => {
                move_into(&ViewMover(view), "Slice", &[x], out, &shape)
            }
            _ => Err(kerr("Slice", "no output slot")),
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i64s(v: &[i64]) -> Value {
        Tensor::from_vec(&[v.len()], v.to_vec()).unwrap().into()
    }

    /// Naive python-style slice on one axis.
    fn py_range(start: i64, end: i64, step: i64, d: i64) -> Vec<i64> {
        let mut out = vec![];
        let (mut s, mut e) = (start, end);
        if s < 0 {
            s += d;
        }
        if e < 0 {
            e += d;
        }
        if step > 0 {
            s = s.clamp(0, d);
            e = e.clamp(0, d);
            let mut i = s;
            while i < e {
                out.push(i);
                i += step;
            }
        } else {
            s = s.clamp(-1, d - 1);
            e = e.clamp(-1, d - 1);
            let mut i = s;
            while i > e {
                out.push(i);
                i += step;
            }
        }
        out
    }

    #[test]
    fn resolve_matches_python() {
        for d in [0i64, 1, 5, 8] {
            for start in [-20, -9, -5, -1, 0, 1, 3, 7, 9, 20, i64::MIN, i64::MAX] {
                for end in [-20, -9, -5, -1, 0, 1, 3, 7, 9, 20, i64::MIN, i64::MAX] {
                    for step in [-3, -1, 1, 2, 5] {
                        let r = resolve_axis("S", start, end, step, d as usize).unwrap();
                        let want = py_range(start, end, step, d);
                        assert_eq!(r.count, want.len(), "{start} {end} {step} {d}");
                        if let Some(&f) = want.first() {
                            assert_eq!(r.start as i64, f, "{start} {end} {step} {d}");
                        }
                    }
                }
            }
        }
        assert!(resolve_axis("S", 0, 1, 0, 3).is_err());
    }

    #[test]
    fn slice_2d_with_steps() {
        let x: Value = Tensor::from_vec(&[3, 4], (0..12).map(|v| v as f32).collect::<Vec<_>>())
            .unwrap()
            .into();
        let op = Slice { attrs: None };
        let y = op
            .eval(&[
                Some(&x),
                Some(&i64s(&[-1, 3])),
                Some(&i64s(&[-4, 0])),
                Some(&i64s(&[1, 0])),
                Some(&i64s(&[-2, -1])),
            ])
            .unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[11., 9., 7., 5.]);
        let op = Slice {
            attrs: Some((vec![1], vec![1000], None)),
        };
        let y = op.eval(&[Some(&x)]).unwrap();
        assert_eq!(y[0].as_tensor().unwrap().shape(), &[2, 4]);
        assert!(Slice { attrs: None }
            .eval(&[Some(&x), Some(&i64s(&[0])), Some(&i64s(&[1, 2]))])
            .is_err());
    }

    #[test]
    fn slice_infer() {
        let x = Fact::tensor(DType::F32, vec![Dim::Sym("b".into()), Dim::Known(10)]);
        let c = |v: &[i64]| Fact::constant(Tensor::from_vec(&[v.len()], v.to_vec()).unwrap());
        let (s, e, a) = (c(&[2]), c(&[-1]), c(&[1]));
        let f = Slice { attrs: None }
            .infer(&[Some(&x), Some(&s), Some(&e), Some(&a)], 1)
            .unwrap();
        assert_eq!(
            f[0].shape.as_ref().unwrap(),
            &vec![Dim::Sym("b".into()), Dim::Known(7)]
        );
        let u = Fact::concrete(DType::I64, &[1]);
        let f = Slice { attrs: None }
            .infer(&[Some(&x), Some(&u), Some(&u), Some(&a)], 1)
            .unwrap();
        assert_eq!(
            f[0].shape.as_ref().unwrap(),
            &vec![Dim::Sym("b".into()), Dim::Unknown]
        );
    }
}
