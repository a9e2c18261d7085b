//! Shape, Size, Reshape, Flatten, Squeeze, Unsqueeze, Identity, ConstantOfShape, Dropout.
//! The reshaping ops are zero-copy: the output shares the input's data.

use std::any::Any;

use kiln_core::{BuildCtx, DType, Dim, Fact, KilnError, Op, Result, Tensor, TensorMut, Value};

use super::common::*;

/// The in-place form of the view ops (Reshape, Flatten, Squeeze, Unsqueeze, Identity):
/// copies `x`'s elements into the planned output slot, which must have shape `dims`.
fn copy_as(op: &str, x: &Tensor, dims: &[usize], outputs: &mut [TensorMut<'_>]) -> Result<()> {
    let out = outputs
        .first_mut()
        .ok_or_else(|| kerr(op, "no output slot"))?;
    if out.shape() != dims || out.dtype() != x.dtype() || x.dtype() == DType::String {
        return Err(kerr(
            op,
            format!(
                "output slot is {} {:?}, the kernel produces {} {dims:?}",
                out.dtype(),
                out.shape(),
                x.dtype()
            ),
        ));
    }
    out.bytes_mut().copy_from_slice(x.bytes());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Shape

/// `Shape`: the input's shape as a 1-D i64 tensor, optionally sliced by `start`/`end`.
#[derive(Debug)]
pub struct ShapeOp {
    start: i64,
    end: Option<i64>,
}

impl ShapeOp {
    fn range(&self, rank: usize) -> (usize, usize) {
        let r = rank as i64;
        let clamp = |v: i64| -> usize {
            let v = if v < 0 { v + r } else { v };
            v.clamp(0, r) as usize
        };
        let s = clamp(self.start);
        let e = self.end.map_or(rank, clamp);
        (s, e.max(s))
    }
}

/// Builds `Shape`.
pub fn build_shape(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    Ok(Box::new(ShapeOp {
        start: a.int("start", 0)?,
        end: a.opt_int("end")?,
    }))
}

impl Op for ShapeOp {
    fn op_type(&self) -> &str {
        "Shape"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let Some(shape) = fact_at(inputs, 0).and_then(|f| f.shape.as_ref()) else {
            return Ok(vec![Fact::tensor(DType::I64, vec![Dim::Unknown])]);
        };
        let (s, e) = self.range(shape.len());
        let dims = &shape[s..e];
        let known: Option<Vec<i64>> = dims.iter().map(|d| d.known().map(|v| v as i64)).collect();
        Ok(vec![match known {
            Some(v) => Fact::constant(Tensor::from_vec(&[v.len()], v)?),
            None => Fact::concrete(DType::I64, &[dims.len()]),
        }])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Shape")?;
        let (s, e) = self.range(x.rank());
        let v: Vec<i64> = x.shape()[s..e].iter().map(|&d| d as i64).collect();
        Ok(vec![Tensor::from_vec(&[v.len()], v)?.into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = kiln_core::input_tensor(inputs, 0, "Shape")?;
        let (s, e) = self.range(x.rank());
        let dims = &x.shape()[s..e];
        let [out] = outputs else {
            return Err(KilnError::kernel("Shape", "expected one output slot"));
        };
        if out.shape() != [dims.len()] {
            return Err(KilnError::kernel(
                "Shape",
                format!(
                    "output slot has shape {:?}, expected [{}]",
                    out.shape(),
                    dims.len()
                ),
            ));
        }
        for (o, &d) in out.as_mut_slice::<i64>()?.iter_mut().zip(dims) {
            *o = d as i64;
        }
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// Size

/// `Size`: the number of elements as an i64 scalar.
#[derive(Debug)]
pub struct SizeOp;

/// Builds `Size`.
pub fn build_size(_ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(SizeOp))
}

impl Op for SizeOp {
    fn op_type(&self) -> &str {
        "Size"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        if let Some(s) = fact_at(inputs, 0).and_then(|f| f.concrete_shape()) {
            return Ok(vec![Fact::constant(Tensor::scalar(
                s.iter().product::<usize>() as i64,
            ))]);
        }
        Ok(vec![Fact::concrete(DType::I64, &[])])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Size")?;
        Ok(vec![Tensor::scalar(x.len() as i64).into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = kiln_core::input_tensor(inputs, 0, "Size")?;
        match outputs {
            [out] if out.shape().is_empty() => {
                out.as_mut_slice::<i64>()?[0] = x.len() as i64;
                Ok(())
            }
            _ => Err(KilnError::kernel("Size", "expected one scalar output slot")),
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// Reshape

/// `Reshape`: new shape from an input (opset 5+) or the `shape` attribute (opset 1-4);
/// 0 copies the input dim (unless `allowzero`), -1 is inferred.
#[derive(Debug)]
pub struct Reshape {
    shape_attr: Option<Vec<i64>>,
    allowzero: bool,
}

/// Builds `Reshape`.
pub fn build_reshape(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let shape_attr = if ctx.opset() < 5 {
        Some(
            a.opt_ints("shape")?
                .ok_or_else(|| a.invalid("Reshape-1 needs a shape attribute"))?,
        )
    } else {
        None
    };
    Ok(Box::new(Reshape {
        shape_attr,
        allowzero: a.int("allowzero", 0)? != 0,
    }))
}

/// Resolves a Reshape target against a concrete input shape.
pub(crate) fn reshape_dims(
    op: &str,
    input: &[usize],
    target: &[i64],
    allowzero: bool,
) -> Result<Dims> {
    let total: usize = input.iter().product();
    let mut out = Dims::new();
    let mut infer_at = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 => {
                if infer_at.replace(i).is_some() {
                    return Err(kerr(op, format!("shape {target:?} has more than one -1")));
                }
                out.push(1);
            }
            0 if !allowzero => {
                let v = *input.get(i).ok_or_else(|| {
                    kerr(
                        op,
                        format!("shape {target:?}: 0 at index {i} has no input dim to copy"),
                    )
                })?;
                out.push(v);
            }
            d if d < 0 => {
                return Err(kerr(
                    op,
                    format!("invalid dimension {d} in shape {target:?}"),
                ))
            }
            d => out.push(d as usize),
        }
    }
    if allowzero && infer_at.is_some() && target.contains(&0) {
        return Err(kerr(
            op,
            format!("shape {target:?} has both 0 and -1 with allowzero"),
        ));
    }
    let mut known: usize = 1;
    for &d in &out {
        known = known
            .checked_mul(d)
            .ok_or_else(|| kerr(op, format!("shape {target:?} is too large")))?;
    }
    if let Some(i) = infer_at {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(kerr(op, format!("cannot reshape {input:?} to {target:?}")));
        }
        out[i] = total / known;
    } else if known != total {
        return Err(kerr(
            op,
            format!("cannot reshape {input:?} ({total} elements) to {target:?}"),
        ));
    }
    Ok(out)
}

/// Symbolic Reshape: the output dims from symbolic input dims and a known target.
fn reshape_symbolic(input: &[Dim], target: &[i64], allowzero: bool) -> Option<Vec<Dim>> {
    let mut out: Vec<Dim> = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 => {
                infer_at = Some(i);
                out.push(Dim::Known(1));
            }
            0 if !allowzero => out.push(input.get(i)?.clone()),
            d if d < 0 => return None,
            d => out.push(Dim::Known(d as usize)),
        }
    }
    let Some(at) = infer_at else { return Some(out) };
    out[at] = solve_missing(input, &out, at);
    Some(out)
}

/// The dim at `at` such that the product of `out` equals the product of `input`.
fn solve_missing(input: &[Dim], out: &[Dim], at: usize) -> Dim {
    let mut in_syms: Vec<&str> = Vec::new();
    let mut in_known: usize = 1;
    for d in input {
        match d {
            Dim::Known(k) => in_known = in_known.saturating_mul(*k),
            Dim::Sym(s) => in_syms.push(s),
            Dim::Unknown => return Dim::Unknown,
        }
    }
    let mut out_known: usize = 1;
    for (i, d) in out.iter().enumerate() {
        if i == at {
            continue;
        }
        match d {
            Dim::Known(k) => out_known = out_known.saturating_mul(*k),
            Dim::Sym(s) => match in_syms.iter().position(|x| x == s) {
                Some(p) => {
                    in_syms.remove(p);
                }
                None => return Dim::Unknown,
            },
            Dim::Unknown => return Dim::Unknown,
        }
    }
    match in_syms.len() {
        0 if out_known != 0 && in_known.is_multiple_of(out_known) => {
            Dim::Known(in_known / out_known)
        }
        1 if in_known == out_known && out_known != 0 => Dim::Sym(in_syms[0].to_string()),
        _ => Dim::Unknown,
    }
}

impl Reshape {
    fn target(&self, inputs: &[Option<&Value>]) -> Result<Ints> {
        match &self.shape_attr {
            Some(s) => Ok(s.iter().copied().collect()),
            None => ints_input(inputs, 1, "Reshape"),
        }
    }
}

impl Op for Reshape {
    fn op_type(&self) -> &str {
        "Reshape"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let target = match &self.shape_attr {
            Some(s) => Some(s.clone()),
            None => konst_ints(fact_at(inputs, 1)),
        };
        let shape = match (target, x.and_then(|f| f.shape.as_ref())) {
            (Some(t), Some(xs)) => reshape_symbolic(xs, &t, self.allowzero),
            (Some(t), None) => Some(
                t.iter()
                    .map(|&d| {
                        if d > 0 || (d == 0 && self.allowzero) {
                            Dim::Known(d as usize)
                        } else {
                            Dim::Unknown
                        }
                    })
                    .collect(),
            ),
            (None, _) => match fact_at(inputs, 1).and_then(|f| f.concrete_shape()) {
                Some(s) if s.len() == 1 => Some(vec![Dim::Unknown; s[0]]),
                _ => None,
            },
        };
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Reshape")?;
        let target = self.target(inputs)?;
        let dims = reshape_dims("Reshape", x.shape(), &target, self.allowzero)?;
        Ok(vec![x.reshape(&dims)?.into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = kiln_core::input_tensor(inputs, 0, "Reshape")?;
        let target = self.target(inputs)?;
        let dims = reshape_dims("Reshape", x.shape(), &target, self.allowzero)?;
        copy_as("Reshape", x, &dims, outputs)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// Flatten

/// `Flatten`: to 2-D `[prod(d[..axis]), prod(d[axis..])]`.
#[derive(Debug)]
pub struct Flatten {
    axis: i64,
}

/// Builds `Flatten`.
pub fn build_flatten(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Flatten {
        axis: ctx.attrs().int("axis", 1)?,
    }))
}

impl Flatten {
    fn split(&self, rank: usize) -> Result<usize> {
        let r = rank as i64;
        let a = if self.axis < 0 {
            self.axis + r
        } else {
            self.axis
        };
        if a < 0 || a > r {
            return Err(kerr(
                "Flatten",
                format!("axis {} is out of range for rank {rank}", self.axis),
            ));
        }
        Ok(a as usize)
    }
}

/// Product of symbolic dims (known, a single symbol, or unknown).
pub(crate) fn dims_product(dims: &[Dim]) -> Dim {
    let mut known: usize = 1;
    let mut sym: Option<&str> = None;
    for d in dims {
        match d {
            Dim::Known(k) => known = known.saturating_mul(*k),
            Dim::Sym(s) if sym.is_none() => sym = Some(s),
            _ => return Dim::Unknown,
        }
    }
    match sym {
        None => Dim::Known(known),
        Some(s) if known == 1 => Dim::Sym(s.to_string()),
        Some(_) if known == 0 => Dim::Known(0),
        _ => Dim::Unknown,
    }
}

impl Op for Flatten {
    fn op_type(&self) -> &str {
        "Flatten"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let shape = match x.and_then(|f| f.shape.as_ref()) {
            Some(s) => {
                let a = self
                    .split(s.len())
                    .map_err(|e| ierr("Flatten", e.to_string()))?;
                Some(vec![dims_product(&s[..a]), dims_product(&s[a..])])
            }
            None => Some(vec![Dim::Unknown, Dim::Unknown]),
        };
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Flatten")?;
        let a = self.split(x.rank())?;
        let outer: usize = x.shape()[..a].iter().product();
        let inner: usize = x.shape()[a..].iter().product();
        Ok(vec![x.reshape(&[outer, inner])?.into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = kiln_core::input_tensor(inputs, 0, "Flatten")?;
        let a = self.split(x.rank())?;
        let outer: usize = x.shape()[..a].iter().product();
        let inner: usize = x.shape()[a..].iter().product();
        copy_as("Flatten", x, &[outer, inner], outputs)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// Squeeze / Unsqueeze

/// `Squeeze`: removes size-1 dims (the given axes, or all of them).
#[derive(Debug)]
pub struct Squeeze {
    axes_attr: Option<Vec<i64>>,
    from_input: bool,
}

/// Builds `Squeeze`.
pub fn build_squeeze(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let from_input = ctx.opset() >= 13;
    let axes_attr = if from_input {
        None
    } else {
        ctx.attrs().opt_ints("axes")?
    };
    Ok(Box::new(Squeeze {
        axes_attr,
        from_input,
    }))
}

impl Squeeze {
    fn out_dims(&self, shape: &[usize], axes: Option<&[i64]>) -> Result<Dims> {
        match axes {
            Some(axes) if !axes.is_empty() => {
                let ax = norm_axes("Squeeze", axes, shape.len())?;
                for &a in &ax {
                    if shape[a] != 1 {
                        return Err(kerr(
                            "Squeeze",
                            format!("cannot squeeze axis {a} of size {} in {shape:?}", shape[a]),
                        ));
                    }
                }
                Ok(shape
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !ax.contains(i))
                    .map(|(_, &d)| d)
                    .collect())
            }
            _ => Ok(shape.iter().copied().filter(|&d| d != 1).collect()),
        }
    }
}

impl Op for Squeeze {
    fn op_type(&self) -> &str {
        "Squeeze"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let axes: Option<Option<Vec<i64>>> = if self.from_input {
            match fact_at(inputs, 1) {
                None => Some(None),
                Some(f) => konst_ints(Some(f)).map(Some),
            }
        } else {
            Some(self.axes_attr.clone())
        };
        let shape = match (x.and_then(|f| f.shape.as_ref()), axes) {
            (Some(s), Some(Some(axes))) if !axes.is_empty() => {
                let ax = norm_axes("Squeeze", &axes, s.len())
                    .map_err(|e| ierr("Squeeze", e.to_string()))?;
                Some(
                    s.iter()
                        .enumerate()
                        .filter(|(i, _)| !ax.contains(i))
                        .map(|(_, d)| d.clone())
                        .collect(),
                )
            }
            (Some(s), Some(_)) if s.iter().all(|d| d.known().is_some()) => {
                Some(s.iter().filter(|d| **d != Dim::Known(1)).cloned().collect())
            }
            _ => None,
        };
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Squeeze")?;
        let axes = if self.from_input {
            opt_ints_input(inputs, 1, "Squeeze")?
        } else {
            self.axes_attr.as_ref().map(|a| a.iter().copied().collect())
        };
        let dims = self.out_dims(x.shape(), axes.as_deref())?;
        Ok(vec![x.reshape(&dims)?.into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = kiln_core::input_tensor(inputs, 0, "Squeeze")?;
        let axes = if self.from_input {
            opt_ints_input(inputs, 1, "Squeeze")?
        } else {
            self.axes_attr.as_ref().map(|a| a.iter().copied().collect())
        };
        let dims = self.out_dims(x.shape(), axes.as_deref())?;
        copy_as("Squeeze", x, &dims, outputs)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `Unsqueeze`: inserts size-1 dims at the given axes (of the output).
#[derive(Debug)]
pub struct Unsqueeze {
    axes_attr: Option<Vec<i64>>,
}

/// Builds `Unsqueeze`.
pub fn build_unsqueeze(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let axes_attr = if ctx.opset() >= 13 {
        None
    } else {
        Some(
            a.opt_ints("axes")?
                .ok_or_else(|| a.invalid("Unsqueeze needs an axes attribute"))?,
        )
    };
    Ok(Box::new(Unsqueeze { axes_attr }))
}

/// Positions (in the output) of inserted unit dims, sorted, validated.
fn unsqueeze_positions(op: &str, axes: &[i64], in_rank: usize) -> Result<Dims> {
    let out_rank = in_rank + axes.len();
    let mut ax = norm_axes(op, axes, out_rank)?;
    ax.sort_unstable();
    Ok(ax)
}

fn unsqueeze_dims<D: Clone>(dims: &[D], pos: &[usize], one: D) -> smallvec::SmallVec<[D; 8]> {
    let mut out = smallvec::SmallVec::new();
    let mut it = dims.iter();
    for i in 0..dims.len() + pos.len() {
        if pos.contains(&i) {
            out.push(one.clone());
        } else if let Some(d) = it.next() {
            out.push(d.clone());
        }
    }
    out
}

impl Op for Unsqueeze {
    fn op_type(&self) -> &str {
        "Unsqueeze"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let axes = match &self.axes_attr {
            Some(a) => Some(a.clone()),
            None => konst_ints(fact_at(inputs, 1)),
        };
        let shape = match (x.and_then(|f| f.shape.as_ref()), axes) {
            (Some(s), Some(axes)) => {
                let pos = unsqueeze_positions("Unsqueeze", &axes, s.len())
                    .map_err(|e| ierr("Unsqueeze", e.to_string()))?;
                Some(unsqueeze_dims(s, &pos, Dim::Known(1)).into_vec())
            }
            (Some(s), None) => match fact_at(inputs, 1).and_then(|f| f.concrete_shape()) {
                Some(a) if a.len() <= 1 => Some(vec![
                    Dim::Unknown;
                    s.len() + a.first().copied().unwrap_or(1)
                ]),
                _ => None,
            },
            _ => None,
        };
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Unsqueeze")?;
        let axes: Ints = match &self.axes_attr {
            Some(a) => a.iter().copied().collect(),
            None => ints_input(inputs, 1, "Unsqueeze")?,
        };
        let pos = unsqueeze_positions("Unsqueeze", &axes, x.rank())?;
        let dims = unsqueeze_dims(x.shape(), &pos, 1);
        Ok(vec![x.reshape(&dims)?.into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = kiln_core::input_tensor(inputs, 0, "Unsqueeze")?;
        let axes: Ints = match &self.axes_attr {
            Some(a) => a.iter().copied().collect(),
            None => ints_input(inputs, 1, "Unsqueeze")?,
        };
        let pos = unsqueeze_positions("Unsqueeze", &axes, x.rank())?;
        let dims = unsqueeze_dims(x.shape(), &pos, 1);
        copy_as("Unsqueeze", x, &dims, outputs)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// Identity

/// `Identity`: passes its input value (tensor, sequence or optional) through.
#[derive(Debug)]
pub struct Identity;

/// Builds `Identity`.
pub fn build_identity(_ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Identity))
}

impl Op for Identity {
    fn op_type(&self) -> &str {
        "Identity"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![fact_at(inputs, 0).cloned().unwrap_or_default()])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let v = inputs
            .first()
            .copied()
            .flatten()
            .ok_or_else(|| kerr("Identity", "required input 0 is missing"))?;
        Ok(vec![v.clone()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = kiln_core::input_tensor(inputs, 0, "Identity")?;
        copy_as("Identity", x, x.shape(), outputs)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// ConstantOfShape

/// `ConstantOfShape`: a tensor of the given shape filled with `value` (default f32 0).
#[derive(Debug)]
pub struct ConstantOfShape {
    value: Tensor,
}

/// Builds `ConstantOfShape`.
pub fn build_constant_of_shape(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let value = match a.opt_tensor("value")? {
        Some(t) if t.len() == 1 => t.reshape(&[1])?,
        Some(t) => {
            return Err(a.invalid(format!(
                "value must hold one element, found shape {:?}",
                t.shape()
            )))
        }
        None => Tensor::from_vec(&[1], vec![0f32])?,
    };
    Ok(Box::new(ConstantOfShape { value }))
}

struct FillMover;

impl Mover for FillMover {
    fn run<T: Clone + Send + Sync>(&self, srcs: &[&[T]], dst: &mut [T]) -> Result<()> {
        if let Some(v) = srcs[0].first() {
            dst.fill(v.clone());
        }
        Ok(())
    }
}

/// A tensor of `shape` filled with the single element of `value`.
pub(crate) fn filled(op: &str, value: &Tensor, shape: &[usize]) -> Result<Tensor> {
    move_data(&FillMover, op, &[value], value.dtype(), shape)
}

impl Op for ConstantOfShape {
    fn op_type(&self) -> &str {
        "ConstantOfShape"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let s = fact_at(inputs, 0);
        let shape = match konst_ints(s) {
            Some(v) => Some(
                v.iter()
                    .map(|&d| {
                        if d >= 0 {
                            Dim::Known(d as usize)
                        } else {
                            Dim::Unknown
                        }
                    })
                    .collect(),
            ),
            None => match s.and_then(|f| f.concrete_shape()) {
                Some(r) if r.len() == 1 => Some(vec![Dim::Unknown; r[0]]),
                Some(r) if r.is_empty() => Some(vec![]),
                _ => None,
            },
        };
        Ok(vec![tensor_fact(Some(self.value.dtype()), shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let dims = to_dims(
            "ConstantOfShape",
            &ints_input(inputs, 0, "ConstantOfShape")?,
        )?;
        Ok(vec![filled("ConstantOfShape", &self.value, &dims)?.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------
// Dropout

/// `Dropout`: identity at inference; in training mode (opset 12+ `training_mode` input)
/// drops elements with numpy's MT19937 stream when a `seed` is given, like ONNX's reference.
#[derive(Debug)]
pub struct Dropout {
    opset: i64,
    ratio_attr: f32,
    seed: Option<i64>,
}

/// Builds `Dropout`.
pub fn build_dropout(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    Ok(Box::new(Dropout {
        opset: ctx.opset(),
        ratio_attr: a.float("ratio", 0.5)?,
        seed: a.opt_int("seed")?,
    }))
}

impl Op for Dropout {
    fn op_type(&self) -> &str {
        "Dropout"
    }
    fn infer(&self, inputs: &[Option<&Fact>], n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0).cloned().unwrap_or_default();
        let mut out = vec![Fact {
            konst: None,
            ..x.clone()
        }];
        if n > 1 {
            let mask_dtype = if self.opset >= 10 {
                Some(DType::Bool)
            } else {
                x.dtype
            };
            out.push(tensor_fact(mask_dtype, x.shape.clone()));
        }
        Ok(out)
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Dropout")?;
        let (ratio, training) = if self.opset >= 12 {
            let r = match kiln_core::optional_tensor(inputs, 1, "Dropout")? {
                Some(t) => t.to_f64_vec()?.first().copied().unwrap_or(0.5),
                None => 0.5,
            };
            let t = match kiln_core::optional_tensor(inputs, 2, "Dropout")? {
                Some(t) => truthy(t)?,
                None => false,
            };
            (r, t)
        } else {
            (self.ratio_attr as f64, false)
        };
        if !training || ratio == 0.0 {
            let mask = if self.opset >= 10 {
                Tensor::from_bools(x.shape(), &vec![true; x.len()])?
            } else {
                filled(
                    "Dropout",
                    &Tensor::from_vec(&[1], vec![1f32])?.cast(x.dtype())?,
                    x.shape(),
                )?
            };
            return Ok(vec![x.clone().into(), mask.into()]);
        }
        if !(0.0..1.0).contains(&ratio) {
            return Err(kerr("Dropout", format!("ratio {ratio} must be in [0, 1)")));
        }
        let mut rng = Mt19937::new(self.seed.unwrap_or_else(random_seed) as u32);
        let keep: Vec<bool> = (0..x.len()).map(|_| rng.next_f64() >= ratio).collect();
        let scale = 1.0 / (1.0 - ratio);
        let xs = x.to_f64_vec()?;
        let y: Vec<f64> = xs
            .iter()
            .zip(&keep)
            .map(|(&v, &k)| if k { v * scale } else { 0.0 })
            .collect();
        let y = Tensor::from_vec(x.shape(), y)?.cast(x.dtype())?;
        Ok(vec![y.into(), Tensor::from_bools(x.shape(), &keep)?.into()])
    }
    fn is_deterministic(&self) -> bool {
        self.seed.is_some() || self.opset < 12
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// True when the first element of a bool or numeric tensor is non-zero.
pub(crate) fn truthy(t: &Tensor) -> Result<bool> {
    if t.dtype() == DType::Bool {
        return Ok(t.as_bools()?.first().copied().unwrap_or(false));
    }
    Ok(t.to_f64_vec()?.first().is_some_and(|v| *v != 0.0))
}

fn random_seed() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as i64)
        .unwrap_or(0)
}

/// numpy's legacy MT19937 (`np.random.RandomState(seed)`), for reference-exact dropout.
pub(crate) struct Mt19937 {
    mt: [u32; 624],
    idx: usize,
}

impl Mt19937 {
    /// Seeds like `init_genrand`.
    pub(crate) fn new(seed: u32) -> Self {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for i in 1..624 {
            mt[i] = 1812433253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { mt, idx: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.idx >= 624 {
            for i in 0..624 {
                let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.mt[i] = v;
            }
            self.idx = 0;
        }
        let mut y = self.mt[self.idx];
        self.idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// A double in [0, 1) with 53 random bits (numpy's `random_sample`).
    pub(crate) fn next_f64(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67108864.0 + b) / 9007199254740992.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(shape, (0..n).map(|v| v as f32 + 0.5).collect()).unwrap()
    }

    fn run(op: &dyn Op, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
        let refs: Vec<Option<&Value>> = inputs.iter().map(|v| v.as_ref()).collect();
        op.eval(&refs)
    }

    fn i64s(v: &[i64]) -> Option<Value> {
        Some(Tensor::from_vec(&[v.len()], v.to_vec()).unwrap().into())
    }

    #[test]
    fn shape_slicing() {
        let x = Some(Value::from(t(&[2, 3, 4, 5])));
        for (start, end, want) in [
            (0, None, vec![2, 3, 4, 5]),
            (1, Some(-1), vec![3, 4]),
            (-10, Some(10), vec![2, 3, 4, 5]),
            (3, Some(1), vec![]),
            (-1, None, vec![5]),
        ] {
            let op = ShapeOp { start, end };
            let out = run(&op, std::slice::from_ref(&x)).unwrap();
            assert_eq!(out[0].as_tensor().unwrap().to_i64_vec().unwrap(), want);
        }
        let f = Fact::tensor(DType::F32, vec![Dim::Sym("b".into()), Dim::Known(3)]);
        let inf = ShapeOp {
            start: 1,
            end: None,
        }
        .infer(&[Some(&f)], 1)
        .unwrap();
        assert_eq!(
            inf[0].konst.as_ref().unwrap().to_i64_vec().unwrap(),
            vec![3]
        );
        let inf = ShapeOp {
            start: 0,
            end: None,
        }
        .infer(&[Some(&f)], 1)
        .unwrap();
        assert!(inf[0].konst.is_none());
        assert_eq!(inf[0].concrete_shape().unwrap(), vec![2]);
    }

    #[test]
    fn reshape_semantics() {
        assert_eq!(
            reshape_dims("R", &[2, 3, 4], &[0, -1], false)
                .unwrap()
                .to_vec(),
            vec![2, 12]
        );
        assert_eq!(
            reshape_dims("R", &[2, 3, 4], &[4, 0, 2], false)
                .unwrap()
                .to_vec(),
            vec![4, 3, 2]
        );
        assert_eq!(
            reshape_dims("R", &[0, 3], &[3, 0], true).unwrap().to_vec(),
            vec![3, 0]
        );
        assert!(reshape_dims("R", &[2, 3], &[-1, -1], false).is_err());
        assert!(reshape_dims("R", &[2, 3], &[5], false).is_err());
        assert!(reshape_dims("R", &[2, 3], &[-2, 3], false).is_err());
        assert!(reshape_dims("R", &[2], &[0, 0, 2], false).is_err());
        let op = Reshape {
            shape_attr: None,
            allowzero: false,
        };
        let out = run(&op, &[Some(t(&[2, 3, 4]).into()), i64s(&[4, -1])]).unwrap();
        let y = out[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[4, 6]);
        assert_eq!(
            y.as_slice::<f32>().unwrap(),
            t(&[24]).as_slice::<f32>().unwrap()
        );
    }

    #[test]
    fn reshape_symbolic_infer() {
        let x = Fact::tensor(
            DType::F32,
            vec![Dim::Sym("b".into()), Dim::Sym("s".into()), Dim::Known(768)],
        );
        let shape = Fact::constant(Tensor::from_vec(&[4], vec![0i64, -1, 12, 64]).unwrap());
        let op = Reshape {
            shape_attr: None,
            allowzero: false,
        };
        let f = op.infer(&[Some(&x), Some(&shape)], 1).unwrap();
        assert_eq!(
            f[0].shape.as_ref().unwrap(),
            &vec![
                Dim::Sym("b".into()),
                Dim::Sym("s".into()),
                Dim::Known(12),
                Dim::Known(64)
            ]
        );
        let shape = Fact::concrete(DType::I64, &[3]);
        let f = op.infer(&[Some(&x), Some(&shape)], 1).unwrap();
        assert_eq!(f[0].rank(), Some(3));
    }

    #[test]
    fn flatten_squeeze_unsqueeze() {
        let x: Option<Value> = Some(t(&[2, 1, 3, 1]).into());
        let f = Flatten { axis: -1 };
        assert_eq!(
            run(&f, std::slice::from_ref(&x)).unwrap()[0]
                .as_tensor()
                .unwrap()
                .shape(),
            &[6, 1]
        );
        let f = Flatten { axis: 0 };
        assert_eq!(
            run(&f, std::slice::from_ref(&x)).unwrap()[0]
                .as_tensor()
                .unwrap()
                .shape(),
            &[1, 6]
        );
        assert!(run(&Flatten { axis: 5 }, std::slice::from_ref(&x)).is_err());
        let s = Squeeze {
            axes_attr: None,
            from_input: true,
        };
        assert_eq!(
            run(&s, std::slice::from_ref(&x)).unwrap()[0]
                .as_tensor()
                .unwrap()
                .shape(),
            &[2, 3]
        );
        let out = run(&s, &[x.clone(), i64s(&[-1])]).unwrap();
        assert_eq!(out[0].as_tensor().unwrap().shape(), &[2, 1, 3]);
        assert!(run(&s, &[x.clone(), i64s(&[0])]).is_err());
        let u = Unsqueeze { axes_attr: None };
        let out = run(&u, &[Some(t(&[3, 4]).into()), i64s(&[-1, 0])]).unwrap();
        assert_eq!(out[0].as_tensor().unwrap().shape(), &[1, 3, 4, 1]);
        assert!(run(&u, &[Some(t(&[3, 4]).into()), i64s(&[0, 0])]).is_err());
        let xf = Fact::tensor(DType::F32, vec![Dim::Sym("n".into()), Dim::Known(4)]);
        let axes = Fact::constant(Tensor::from_vec(&[1], vec![1i64]).unwrap());
        let inf = u.infer(&[Some(&xf), Some(&axes)], 1).unwrap();
        assert_eq!(
            inf[0].shape.as_ref().unwrap(),
            &vec![Dim::Sym("n".into()), Dim::Known(1), Dim::Known(4)]
        );
        let inf = Flatten { axis: 1 }.infer(&[Some(&xf)], 1).unwrap();
        assert_eq!(
            inf[0].shape.as_ref().unwrap(),
            &vec![Dim::Sym("n".into()), Dim::Known(4)]
        );
    }

    #[test]
    fn constant_of_shape_and_identity() {
        let op = ConstantOfShape {
            value: Tensor::from_vec(&[1], vec![7i32]).unwrap(),
        };
        let out = run(&op, &[i64s(&[2, 3])]).unwrap();
        assert_eq!(
            out[0].as_tensor().unwrap().as_slice::<i32>().unwrap(),
            &[7; 6]
        );
        assert!(run(&op, &[i64s(&[-2, 3])]).is_err());
        assert!(run(&op, &[i64s(&[i64::MAX, i64::MAX])]).is_err());
        let out = run(&op, &[i64s(&[])]).unwrap();
        assert_eq!(out[0].as_tensor().unwrap().shape(), &[] as &[usize]);
        let seq = Value::Sequence(vec![t(&[2])]);
        let out = run(&Identity, &[Some(seq)]).unwrap();
        assert_eq!(out[0].as_sequence().unwrap().len(), 1);
        let s = Tensor::from_strings(&[2], vec!["a".into(), "b".into()]).unwrap();
        let op = ConstantOfShape {
            value: Tensor::from_strings(&[1], vec!["z".into()]).unwrap(),
        };
        let out = run(&op, &[i64s(&[3])]).unwrap();
        assert_eq!(
            out[0].as_tensor().unwrap().as_strings().unwrap(),
            &["z", "z", "z"]
        );
        let _ = s;
    }

    #[test]
    fn mt19937_matches_numpy() {
        // np.random.RandomState(0).uniform(0, 1, 3)
        let mut r = Mt19937::new(0);
        let v: Vec<f64> = (0..3).map(|_| r.next_f64()).collect();
        assert!((v[0] - 0.5488135039273248).abs() < 1e-15);
        assert!((v[1] - 0.7151893663724195).abs() < 1e-15);
        assert!((v[2] - 0.6027633760716439).abs() < 1e-15);
    }

    #[test]
    fn dropout_inference_and_training() {
        let op = Dropout {
            opset: 13,
            ratio_attr: 0.5,
            seed: Some(0),
        };
        let x: Option<Value> = Some(t(&[2, 3]).into());
        let out = run(&op, std::slice::from_ref(&x)).unwrap();
        assert!(out[0]
            .as_tensor()
            .unwrap()
            .same_as(x.as_ref().unwrap().as_tensor().unwrap()));
        assert!(out[1]
            .as_tensor()
            .unwrap()
            .as_bools()
            .unwrap()
            .iter()
            .all(|b| *b));
        let r = Some(Tensor::scalar(0.5f32).into());
        let tr = Some(Tensor::from_bools(&[], &[true]).unwrap().into());
        let out = run(&op, &[x, r, tr]).unwrap();
        let mask = out[1].as_tensor().unwrap().as_bools().unwrap().to_vec();
        // uniform draws 0.549 0.715 0.603 0.545 0.424 0.646 -> >= 0.5
        assert_eq!(mask, vec![true, true, true, true, false, true]);
    }
}
