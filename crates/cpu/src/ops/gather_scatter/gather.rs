//! Gather, GatherElements, GatherND: source offsets are computed from the indices, then
//! whole contiguous blocks are copied.

use std::any::Any;

use kiln_core::{BuildCtx, DType, Fact, Op, Result, Tensor, TensorMut, Value};

use crate::ops::shape::common::*;

/// `Gather`: picks slices along `axis` by index (negative indices count from the end).
#[derive(Debug)]
pub struct Gather {
    axis: i64,
}

/// Builds `Gather`.
pub fn build_gather(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Gather {
        axis: ctx.attrs().int("axis", 0)?,
    }))
}

impl Gather {
    fn plan<'a>(
        &self,
        inputs: &[Option<&'a Value>],
    ) -> Result<(&'a Tensor, Vec<usize>, BlockGather)> {
        let x = kiln_core::input_tensor(inputs, 0, "Gather")?;
        let idx = kiln_core::input_tensor(inputs, 1, "Gather")?;
        let axis = norm_axis("Gather", self.axis, x.rank())?;
        let s = x.shape();
        let idx = norm_indices("Gather", idx, s[axis]).map(|v| (v, idx.shape().to_vec()))?;
        let (idx, idx_shape) = idx;
        let pre: usize = s[..axis].iter().product();
        let post: usize = s[axis + 1..].iter().product();
        let mut offsets = Vec::with_capacity(pre * idx.len());
        for p in 0..pre {
            for &i in &idx {
                offsets.push(Some((p * s[axis] + i) * post));
            }
        }
        let mut out = s[..axis].to_vec();
        out.extend_from_slice(&idx_shape);
        out.extend_from_slice(&s[axis + 1..]);
        Ok((
            x,
            out,
            BlockGather {
                offsets,
                block: post,
            },
        ))
    }
}

impl Gather {
    /// The in-place path for int32/int64 indices: copies each selected block straight into
    /// the slot, reading indices as it goes (no offset table, no allocation). Returns false
    /// when it does not apply (strings, other index types, a slot of another shape).
    fn gather_direct(
        &self,
        inputs: &[Option<&Value>],
        outputs: &mut [TensorMut<'_>],
    ) -> Result<bool> {
        let x = kiln_core::input_tensor(inputs, 0, "Gather")?;
        let idx = kiln_core::input_tensor(inputs, 1, "Gather")?;
        let Some(slot) = outputs.first_mut() else {
            return Ok(false);
        };
        let axis = norm_axis("Gather", self.axis, x.rank())?;
        let s = x.shape();
        let o = slot.shape();
        let shape_fits = o.len() == s.len() - 1 + idx.rank()
            && o[..axis] == s[..axis]
            && o[axis..axis + idx.rank()] == *idx.shape()
            && o[axis + idx.rank()..] == s[axis + 1..];
        let (i32s, i64s) = match idx.dtype() {
            DType::I32 => (Some(idx.as_slice::<i32>()?), None),
            DType::I64 => (None, Some(idx.as_slice::<i64>()?)),
            _ => return Ok(false),
        };
        if !shape_fits || x.dtype() == DType::String || slot.dtype() != x.dtype() {
            return Ok(false);
        }
        let dim = s[axis] as i64;
        let index = |k: usize| -> Result<usize> {
            let i = match (i32s, i64s) {
                (Some(v), _) => v[k] as i64,
                (_, Some(v)) => v[k],
                (None, None) => 0,
            };
            let j = if i < 0 { i + dim } else { i };
            if j < 0 || j >= dim {
                return Err(kerr(
                    "Gather",
                    format!("index {i} is out of range for a dim of size {dim}"),
                ));
            }
            Ok(j as usize)
        };
        let pre: usize = s[..axis].iter().product();
        let post: usize = s[axis + 1..].iter().product();
        let n_idx = idx.len();
        crate::dispatch_pod!(x.dtype(), T => {
            let src = x.as_raw::<T>()?;
            let dst = slot.as_raw_mut::<T>()?;
            for p in 0..pre {
                for k in 0..n_idx {
                    let from = (p * s[axis] + index(k)?) * post;
                    let to = (p * n_idx + k) * post;
                    dst[to..to + post].copy_from_slice(&src[from..from + post]);
                }
            }
            Ok(true)
        }, _ => Ok(false))
    }
}

impl Op for Gather {
    fn op_type(&self) -> &str {
        "Gather"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let shape = match (
            x.and_then(|f| f.shape.as_ref()),
            fact_at(inputs, 1).and_then(|f| f.shape.as_ref()),
        ) {
            (Some(s), Some(i)) => {
                let axis = norm_axis("Gather", self.axis, s.len())
                    .map_err(|e| ierr("Gather", e.to_string()))?;
                let mut out = s[..axis].to_vec();
                out.extend(i.iter().cloned());
                out.extend(s[axis + 1..].iter().cloned());
                Some(out)
            }
            _ => None,
        };
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let (x, out, g) = self.plan(inputs)?;
        Ok(vec![move_data(&g, "Gather", &[x], x.dtype(), &out)?.into()])
    }
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        if self.gather_direct(inputs, outputs)? {
            return Ok(());
        }
        let (x, out, g) = self.plan(inputs)?;
        match outputs.first_mut() {
            Some(slot) if x.dtype() != DType::String => move_into(&g, "Gather", &[x], slot, &out),
            _ => Err(kerr("Gather", "no output slot")),
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `GatherElements`: `out[i][j][k] = data[idx[i][j][k]][j][k]` (for axis 0), output shaped
/// like the indices.
#[derive(Debug)]
pub struct GatherElements {
    axis: i64,
}

/// Builds `GatherElements`.
pub fn build_gather_elements(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(GatherElements {
        axis: ctx.attrs().int("axis", 0)?,
    }))
}

/// Offsets into `data` for an elementwise index tensor along `axis` (shared with
/// ScatterElements). `idx` holds normalised indices shaped `ishape`.
pub(crate) fn elementwise_offsets(
    op: &str,
    dshape: &[usize],
    ishape: &[usize],
    axis: usize,
    idx: &[usize],
) -> Result<Vec<usize>> {
    if dshape.len() != ishape.len() {
        return Err(kerr(
            op,
            format!(
                "indices rank {} differs from data rank {}",
                ishape.len(),
                dshape.len()
            ),
        ));
    }
    for d in 0..dshape.len() {
        if d != axis && ishape[d] > dshape[d] {
            return Err(kerr(
                op,
                format!("indices shape {ishape:?} exceeds data shape {dshape:?} at dim {d}"),
            ));
        }
    }
    let dst = kiln_core::strides(dshape);
    let rank = dshape.len();
    let mut pos = vec![0usize; rank];
    let mut out = Vec::with_capacity(idx.len());
    for &i in idx {
        let mut off = 0;
        for d in 0..rank {
            off += if d == axis { i } else { pos[d] } * dst[d];
        }
        out.push(off);
        for d in (0..rank).rev() {
            pos[d] += 1;
            if pos[d] < ishape[d] {
                break;
            }
            pos[d] = 0;
        }
    }
    Ok(out)
}

impl Op for GatherElements {
    fn op_type(&self) -> &str {
        "GatherElements"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let dtype = fact_at(inputs, 0).and_then(|f| f.dtype);
        Ok(vec![tensor_fact(
            dtype,
            fact_at(inputs, 1).and_then(|f| f.shape.clone()),
        )])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "GatherElements";
        let x = kiln_core::input_tensor(inputs, 0, op)?;
        let it = kiln_core::input_tensor(inputs, 1, op)?;
        let axis = norm_axis(op, self.axis, x.rank())?;
        let idx = norm_indices(op, it, x.shape()[axis])?;
        let offs = elementwise_offsets(op, x.shape(), it.shape(), axis, &idx)?;
        let g = BlockGather {
            offsets: offs.into_iter().map(Some).collect(),
            block: 1,
        };
        Ok(vec![move_data(&g, op, &[x], x.dtype(), it.shape())?.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `GatherND`: index tuples into the leading dims of data (after `batch_dims`).
#[derive(Debug)]
pub struct GatherND {
    batch_dims: usize,
}

/// Builds `GatherND`.
pub fn build_gather_nd(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let b = a.int("batch_dims", 0)?;
    let batch_dims =
        usize::try_from(b).map_err(|_| a.invalid(format!("batch_dims must be >= 0, got {b}")))?;
    Ok(Box::new(GatherND { batch_dims }))
}

/// Layout shared by GatherND and ScatterND: for each index tuple, the data offset of the
/// addressed block; plus the block size and the output (or updates) shape.
pub(crate) fn nd_offsets(
    op: &str,
    dshape: &[usize],
    it: &Tensor,
    batch_dims: usize,
) -> Result<(Vec<usize>, usize, Vec<usize>)> {
    let ishape = it.shape();
    let (r, q, b) = (dshape.len(), ishape.len(), batch_dims);
    if q < 1 || r < 1 || b >= q.min(r) {
        return Err(kerr(
            op,
            format!("invalid ranks: data {dshape:?}, indices {ishape:?}, batch_dims {b}"),
        ));
    }
    if dshape[..b] != ishape[..b] {
        return Err(kerr(
            op,
            format!("batch dims differ: data {dshape:?}, indices {ishape:?}"),
        ));
    }
    let k = ishape[q - 1];
    if k > r - b {
        return Err(kerr(
            op,
            format!(
                "index tuples of length {k} are too long for data {dshape:?} after {b} batch dims"
            ),
        ));
    }
    let raw = it
        .to_i64_vec()
        .map_err(|e| kerr(op, format!("indices: {e}")))?;
    let st = kiln_core::strides(dshape);
    let block: usize = dshape[b + k..].iter().product();
    let batch_stride: usize = dshape[b..].iter().product();
    let per_batch: usize = ishape[b..q - 1].iter().product();
    let mut offsets = Vec::with_capacity(raw.len() / k.max(1));
    let n_tuples: usize = ishape[..q - 1].iter().product();
    for t in 0..n_tuples {
        let batch = t / per_batch.max(1);
        let mut off = batch * batch_stride;
        for j in 0..k {
            let d = dshape[b + j] as i64;
            let v = raw[t * k + j];
            let v = if v < 0 { v + d } else { v };
            if v < 0 || v >= d {
                return Err(kerr(
                    op,
                    format!(
                        "index {} out of range for dim {} of size {d}",
                        raw[t * k + j],
                        b + j
                    ),
                ));
            }
            off += v as usize * st[b + j];
        }
        offsets.push(off);
    }
    let mut out = ishape[..q - 1].to_vec();
    out.extend_from_slice(&dshape[b + k..]);
    Ok((offsets, block, out))
}

impl Op for GatherND {
    fn op_type(&self) -> &str {
        "GatherND"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let shape = match (
            x.and_then(|f| f.shape.as_ref()),
            fact_at(inputs, 1).and_then(|f| f.shape.as_ref()),
        ) {
            (Some(d), Some(i)) if !i.is_empty() => match i[i.len() - 1].known() {
                Some(k) if self.batch_dims + k <= d.len() => {
                    let mut out = i[..i.len() - 1].to_vec();
                    out.extend(d[self.batch_dims + k..].iter().cloned());
                    Some(out)
                }
                _ => None,
            },
            _ => None,
        };
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "GatherND")?;
        let it = kiln_core::input_tensor(inputs, 1, "GatherND")?;
        let (offsets, block, out) = nd_offsets("GatherND", x.shape(), it, self.batch_dims)?;
        let g = BlockGather {
            offsets: offsets.into_iter().map(Some).collect(),
            block,
        };
        Ok(vec![
            move_data(&g, "GatherND", &[x], x.dtype(), &out)?.into()
        ])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32t(shape: &[usize]) -> Value {
        let n: usize = shape.iter().product();
        Tensor::from_vec(shape, (0..n).map(|v| v as f32).collect())
            .unwrap()
            .into()
    }

    fn i64t(shape: &[usize], v: &[i64]) -> Value {
        Tensor::from_vec(shape, v.to_vec()).unwrap().into()
    }

    #[test]
    fn gather_axes_and_negative() {
        let x = f32t(&[3, 4]);
        let y = Gather { axis: 1 }
            .eval(&[Some(&x), Some(&i64t(&[2, 2], &[0, -1, 2, 1]))])
            .unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[3, 2, 2]);
        assert_eq!(&y.as_slice::<f32>().unwrap()[..4], &[0., 3., 2., 1.]);
        let y = Gather { axis: 0 }
            .eval(&[Some(&x), Some(&i64t(&[], &[-1]))])
            .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
            &[8., 9., 10., 11.]
        );
        assert!(Gather { axis: 0 }
            .eval(&[Some(&x), Some(&i64t(&[1], &[3]))])
            .is_err());
        assert!(Gather { axis: 2 }
            .eval(&[Some(&x), Some(&i64t(&[1], &[0]))])
            .is_err());
        let i32i: Value = Tensor::from_vec(&[1], vec![1i32]).unwrap().into();
        let y = Gather { axis: 0 }.eval(&[Some(&x), Some(&i32i)]).unwrap();
        assert_eq!(y[0].as_tensor().unwrap().shape(), &[1, 4]);
    }

    #[test]
    fn gather_elements_matches_spec() {
        let x: Value = Tensor::from_vec(&[2, 2], vec![1f32, 2., 3., 4.])
            .unwrap()
            .into();
        let y = GatherElements { axis: 1 }
            .eval(&[Some(&x), Some(&i64t(&[2, 2], &[0, 0, 1, 0]))])
            .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
            &[1., 1., 4., 3.]
        );
        let y = GatherElements { axis: 0 }
            .eval(&[Some(&x), Some(&i64t(&[1, 2], &[1, -2]))])
            .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().as_slice::<f32>().unwrap(),
            &[3., 2.]
        );
        assert!(GatherElements { axis: 0 }
            .eval(&[Some(&x), Some(&i64t(&[2], &[0, 0]))])
            .is_err());
    }

    #[test]
    fn gather_nd_batch_dims() {
        let x: Value = Tensor::from_vec(&[2, 2, 2], (0..8).collect::<Vec<i32>>())
            .unwrap()
            .into();
        let y = GatherND { batch_dims: 1 }
            .eval(&[Some(&x), Some(&i64t(&[2, 1], &[1, 0]))])
            .unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[2, 3, 4, 5]);
        let y = GatherND { batch_dims: 0 }
            .eval(&[Some(&x), Some(&i64t(&[2, 3], &[0, 1, 1, 1, 0, -1]))])
            .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().as_slice::<i32>().unwrap(),
            &[3, 5]
        );
        assert!(GatherND { batch_dims: 0 }
            .eval(&[Some(&x), Some(&i64t(&[1, 4], &[0, 0, 0, 0]))])
            .is_err());
    }
}
