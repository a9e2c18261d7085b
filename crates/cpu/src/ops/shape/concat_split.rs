//! Concat and Split: block copies of the contiguous run below the axis.

use std::any::Any;

use kiln_core::{BuildCtx, DType, Dim, Fact, Op, Result, Tensor, TensorMut, Value};

use super::common::*;

/// `Concat`: joins tensors along an axis.
#[derive(Debug)]
pub struct Concat {
    axis: i64,
}

/// Builds `Concat`.
pub fn build_concat(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let axis = if ctx.opset() < 4 {
        a.int("axis", 1)?
    } else {
        a.req_int("axis")?
    };
    Ok(Box::new(Concat { axis }))
}

struct ConcatMover {
    /// Elements each input contributes per outer index.
    chunks: Dims,
}

impl Mover for ConcatMover {
    fn run<T: Clone + Send + Sync>(&self, srcs: &[&[T]], dst: &mut [T]) -> Result<()> {
        let row: usize = self.chunks.iter().sum();
        if row == 0 || dst.is_empty() {
            return Ok(());
        }
        let n_rows = dst.len() / row;
        par_blocks(dst, row, n_rows, |chunk, first| {
            for (k, out_row) in chunk.chunks_mut(row).enumerate() {
                let o = first + k;
                let mut pos = 0;
                for (src, &c) in srcs.iter().zip(&self.chunks) {
                    out_row[pos..pos + c].clone_from_slice(&src[o * c..(o + 1) * c]);
                    pos += c;
                }
            }
        });
        Ok(())
    }
}

impl Concat {
    fn plan(&self, xs: &[&Tensor]) -> Result<(Dims, ConcatMover)> {
        let first = xs
            .first()
            .ok_or_else(|| kerr("Concat", "needs at least one input"))?;
        let rank = first.rank();
        let axis = norm_axis("Concat", self.axis, rank)?;
        let mut shape: Dims = first.shape().into();
        shape[axis] = 0;
        for (i, x) in xs.iter().enumerate() {
            if x.rank() != rank || x.dtype() != first.dtype() {
                return Err(kerr(
                    "Concat",
                    format!(
                        "input {i} ({} {:?}) does not match input 0 ({} {:?})",
                        x.dtype(),
                        x.shape(),
                        first.dtype(),
                        first.shape()
                    ),
                ));
            }
            for d in 0..rank {
                if d != axis && x.shape()[d] != first.shape()[d] {
                    return Err(kerr(
                        "Concat",
                        format!(
                            "input {i} has shape {:?}, input 0 has {:?} (axis {axis})",
                            x.shape(),
                            first.shape()
                        ),
                    ));
                }
            }
            shape[axis] += x.shape()[axis];
        }
        let inner: usize = shape[axis + 1..].iter().product();
        let chunks = xs.iter().map(|x| x.shape()[axis] * inner).collect();
        Ok((shape, ConcatMover { chunks }))
    }

    fn tensors<'a>(inputs: &[Option<&'a Value>]) -> Result<smallvec::SmallVec<[&'a Tensor; 8]>> {
        (0..inputs.len())
            .map(|i| kiln_core::input_tensor(inputs, i, "Concat"))
            .collect()
    }
}

impl Op for Concat {
    fn op_type(&self) -> &str {
        "Concat"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let facts: Vec<Option<&Fact>> = (0..inputs.len()).map(|i| fact_at(inputs, i)).collect();
        let dtype = facts.iter().flatten().find_map(|f| f.dtype);
        let shapes: Option<Vec<&Vec<Dim>>> = facts
            .iter()
            .map(|f| f.and_then(|f| f.shape.as_ref()))
            .collect();
        let Some(shapes) = shapes else {
            let rank = facts.iter().flatten().find_map(|f| f.rank());
            return Ok(vec![tensor_fact(
                dtype,
                rank.map(|r| vec![Dim::Unknown; r]),
            )]);
        };
        let Some(first) = shapes.first() else {
            return Ok(vec![tensor_fact(dtype, None)]);
        };
        let rank = first.len();
        if shapes.iter().any(|s| s.len() != rank) {
            return Err(ierr("Concat", "inputs have different ranks"));
        }
        let axis =
            norm_axis("Concat", self.axis, rank).map_err(|e| ierr("Concat", e.to_string()))?;
        let mut out = Vec::with_capacity(rank);
        for d in 0..rank {
            if d == axis {
                let sum: Option<usize> = shapes
                    .iter()
                    .try_fold(0usize, |a, s| a.checked_add(s[d].known()?));
                let nonzero: Vec<&Dim> = shapes
                    .iter()
                    .map(|s| &s[d])
                    .filter(|x| **x != Dim::Known(0))
                    .collect();
                out.push(match (sum, nonzero.as_slice()) {
                    (Some(s), _) => Dim::Known(s),
                    (None, [one]) => (*one).clone(),
                    _ => Dim::Unknown,
                });
            } else {
                let known = shapes.iter().find_map(|s| s[d].known());
                out.push(match known {
                    Some(k) => Dim::Known(k),
                    None => first[d].clone(),
                });
            }
        }
        Ok(vec![tensor_fact(dtype, Some(out))])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let xs = Self::tensors(inputs)?;
        let (shape, mover) = self.plan(&xs)?;
        Ok(vec![move_data(
            &mover,
            "Concat",
            &xs,
            xs[0].dtype(),
            &shape,
        )?
        .into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let xs = Self::tensors(inputs)?;
        let (shape, mover) = self.plan(&xs)?;
        match outputs.first_mut() {
            Some(out) if xs[0].dtype() != DType::String => {
                move_into(&mover, "Concat", &xs, out, &shape)
            }
            _ => Err(kerr("Concat", "no output slot")),
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// Parameters of `Split`: cuts a tensor into parts along an axis (sizes from the `split` input or
/// attribute, or equal parts; opset 18 `num_outputs` allows a smaller last part).
#[derive(Debug)]
pub struct Split {
    axis: i64,
    split_attr: Option<Vec<i64>>,
    num_outputs: Option<i64>,
}

/// Part sizes of a dim of size `d` split into `n` parts (uneven: smaller last part).
fn equal_parts(op: &str, d: usize, n: usize, uneven_ok: bool) -> Result<Vec<usize>> {
    if n == 0 {
        return Err(kerr(op, "no outputs"));
    }
    if d.is_multiple_of(n) {
        return Ok(vec![d / n; n]);
    }
    if !uneven_ok {
        return Err(kerr(
            op,
            format!("dim {d} cannot be split evenly into {n} parts"),
        ));
    }
    let c = d / n + 1;
    let last = d as i64 - (c * (n - 1)) as i64;
    if last < 0 {
        return Err(kerr(
            op,
            format!("dim {d} cannot be split into {n} parts of {c}"),
        ));
    }
    let mut v = vec![c; n];
    v[n - 1] = last as usize;
    Ok(v)
}

impl Split {
    fn parts(&self, d: usize, split: Option<Vec<i64>>, n_out: usize) -> Result<Vec<usize>> {
        match split.or_else(|| self.split_attr.clone()) {
            Some(s) if !s.is_empty() => {
                let s = to_dims("Split", &s)?;
                if s.len() != n_out
                    || s.iter().try_fold(0usize, |a, &v| a.checked_add(v)) != Some(d)
                {
                    return Err(kerr(
                        "Split",
                        format!("split {s:?} does not fit dim {d} and {n_out} outputs"),
                    ));
                }
                Ok(s.to_vec())
            }
            _ => match self.num_outputs {
                Some(n) => equal_parts("Split", d, n as usize, true),
                None => equal_parts("Split", d, n_out, false),
            },
        }
    }
}

impl Split {
    fn infer_split(&self, inputs: &[Option<&Fact>], n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let Some(shape) = x.and_then(|f| f.shape.as_ref()) else {
            return Ok(vec![tensor_fact(dtype, None); n]);
        };
        let axis =
            norm_axis("Split", self.axis, shape.len()).map_err(|e| ierr("Split", e.to_string()))?;
        let split = match fact_at(inputs, 1) {
            Some(f) => match konst_ints(Some(f)) {
                Some(s) => Some(s),
                None => {
                    let mut s = shape.clone();
                    s[axis] = Dim::Unknown;
                    return Ok(vec![tensor_fact(dtype, Some(s)); n]);
                }
            },
            None => None,
        };
        let parts: Vec<Dim> = match shape[axis].known() {
            Some(d) => match self.parts(d, split, n) {
                Ok(p) => p.into_iter().map(Dim::Known).collect(),
                Err(e) => return Err(ierr("Split", e.to_string())),
            },
            None => match split.or_else(|| self.split_attr.clone()) {
                Some(s) if s.len() == n => s
                    .iter()
                    .map(|&v| {
                        if v >= 0 {
                            Dim::Known(v as usize)
                        } else {
                            Dim::Unknown
                        }
                    })
                    .collect(),
                _ => vec![Dim::Unknown; n],
            },
        };
        Ok(parts
            .into_iter()
            .map(|p| {
                let mut s = shape.clone();
                s[axis] = p;
                tensor_fact(dtype, Some(s))
            })
            .collect())
    }
}

impl Split {
    fn split_into(
        &self,
        x: &Tensor,
        axis: usize,
        split: Option<Vec<i64>>,
        n_out: usize,
    ) -> Result<Vec<Value>> {
        let parts = self.parts(x.shape()[axis], split, n_out)?;
        let st = istrides(x.shape());
        let mut start = 0;
        let mut outs = Vec::with_capacity(parts.len());
        for p in parts {
            let mut shape = x.shape().to_vec();
            shape[axis] = p;
            let view = StridedView {
                shape: shape.as_slice().into(),
                strides: st.clone(),
                offset: start * st[axis] as usize,
            };
            outs.push(move_data(&ViewMover(view), "Split", &[x], x.dtype(), &shape)?.into());
            start += p;
        }
        Ok(outs)
    }
}

/// A Split whose output count is fixed by the node (equal parts with no `split`).
#[derive(Debug)]
pub struct SplitN {
    inner: Split,
    n_out: usize,
}

/// Builds `Split`, remembering how many outputs the node has.
pub fn build_split_n(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let split_attr = if ctx.opset() < 13 {
        a.opt_ints("split")?
    } else {
        None
    };
    let num_outputs = a.opt_int("num_outputs")?;
    if let Some(n) = num_outputs {
        if n < 1 || n as usize != ctx.n_outputs {
            return Err(a.invalid(format!(
                "num_outputs {n} does not match the node's {} outputs",
                ctx.n_outputs
            )));
        }
    }
    let inner = Split {
        axis: a.int("axis", 0)?,
        split_attr,
        num_outputs,
    };
    Ok(Box::new(SplitN {
        inner,
        n_out: ctx.n_outputs,
    }))
}

impl Op for SplitN {
    fn op_type(&self) -> &str {
        "Split"
    }
    fn infer(&self, inputs: &[Option<&Fact>], n: usize) -> Result<Vec<Fact>> {
        self.inner.infer_split(inputs, n)
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "Split")?;
        let axis = norm_axis("Split", self.inner.axis, x.rank())?;
        let split = opt_ints_input(inputs, 1, "Split")?;
        let n_out = match (&split, &self.inner.split_attr, self.inner.num_outputs) {
            (Some(s), _, _) if !s.is_empty() => s.len(),
            (_, Some(s), _) if !s.is_empty() => s.len(),
            (_, _, Some(n)) => n as usize,
            _ => self.n_out,
        };
        self.inner
            .split_into(x, axis, split.map(|s| s.to_vec()), n_out)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], off: f32) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(shape, (0..n).map(|v| v as f32 + off).collect()).unwrap()
    }

    #[test]
    fn concat_axes() {
        let a = t(&[2, 3], 0.0);
        let b = t(&[2, 1], 100.0);
        let op = Concat { axis: -1 };
        let (av, bv): (Value, Value) = (a.into(), b.into());
        let y = op.eval(&[Some(&av), Some(&bv)]).unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[2, 4]);
        assert_eq!(
            y.as_slice::<f32>().unwrap(),
            &[0., 1., 2., 100., 3., 4., 5., 101.]
        );
        assert!(Concat { axis: 0 }.eval(&[Some(&av), Some(&bv)]).is_err());
        let e: Value = Tensor::zeros(kiln_core::DType::F32, &[2, 0]).into();
        let y = op.eval(&[Some(&e), Some(&bv)]).unwrap();
        assert_eq!(y[0].as_tensor().unwrap().shape(), &[2, 1]);
        // big parallel path
        let a = t(&[300, 500], 0.0);
        let b = t(&[300, 700], 1.0);
        let (av, bv): (Value, Value) = (a.clone().into(), b.clone().into());
        let y = Concat { axis: 1 }.eval(&[Some(&av), Some(&bv)]).unwrap();
        let y = y[0].as_tensor().unwrap().as_slice::<f32>().unwrap();
        assert_eq!(y[1200 * 7 + 3], a.as_slice::<f32>().unwrap()[500 * 7 + 3]);
        assert_eq!(
            y[1200 * 299 + 500 + 6],
            b.as_slice::<f32>().unwrap()[700 * 299 + 6]
        );
    }

    #[test]
    fn concat_infer() {
        let a = Fact::tensor(DType::F32, vec![Dim::Sym("b".into()), Dim::Known(3)]);
        let b = Fact::tensor(DType::F32, vec![Dim::Unknown, Dim::Known(4)]);
        let f = Concat { axis: 1 }.infer(&[Some(&a), Some(&b)], 1).unwrap();
        assert_eq!(
            f[0].shape.as_ref().unwrap(),
            &vec![Dim::Sym("b".into()), Dim::Known(7)]
        );
    }

    #[test]
    fn split_variants() {
        let x: Value = t(&[2, 7], 0.0).into();
        let op = SplitN {
            inner: Split {
                axis: 1,
                split_attr: None,
                num_outputs: Some(3),
            },
            n_out: 3,
        };
        let y = op.eval(&[Some(&x)]).unwrap();
        let shapes: Vec<_> = y
            .iter()
            .map(|v| v.as_tensor().unwrap().shape().to_vec())
            .collect();
        assert_eq!(shapes, vec![vec![2, 3], vec![2, 3], vec![2, 1]]);
        assert_eq!(
            y[2].as_tensor().unwrap().as_slice::<f32>().unwrap(),
            &[6., 13.]
        );
        let s: Value = Tensor::from_vec(&[2], vec![2i64, 5]).unwrap().into();
        let op = SplitN {
            inner: Split {
                axis: -1,
                split_attr: None,
                num_outputs: None,
            },
            n_out: 2,
        };
        let y = op.eval(&[Some(&x), Some(&s)]).unwrap();
        assert_eq!(
            y[1].as_tensor().unwrap().as_slice::<f32>().unwrap(),
            &[2., 3., 4., 5., 6., 9., 10., 11., 12., 13.]
        );
        let op = SplitN {
            inner: Split {
                axis: 0,
                split_attr: None,
                num_outputs: None,
            },
            n_out: 2,
        };
        let y = op.eval(&[Some(&x)]).unwrap();
        assert_eq!(y[1].as_tensor().unwrap().shape(), &[1, 7]);
        let op = SplitN {
            inner: Split {
                axis: 1,
                split_attr: None,
                num_outputs: None,
            },
            n_out: 2,
        };
        assert!(op.eval(&[Some(&x)]).is_err());
        let bad: Value = Tensor::from_vec(&[2], vec![2i64, 4]).unwrap().into();
        assert!(op.eval(&[Some(&x), Some(&bad)]).is_err());
        let zero: Value = Tensor::from_vec(&[3], vec![0i64, 7, 0]).unwrap().into();
        let op = SplitN {
            inner: Split {
                axis: 1,
                split_attr: None,
                num_outputs: None,
            },
            n_out: 3,
        };
        let y = op.eval(&[Some(&x), Some(&zero)]).unwrap();
        assert_eq!(y[0].as_tensor().unwrap().shape(), &[2, 0]);
    }
}
