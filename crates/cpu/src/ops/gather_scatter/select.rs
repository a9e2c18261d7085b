//! Data-dependent selection: Compress, NonZero, TopK, Unique.

use std::any::Any;
use std::cmp::Ordering;

use kiln_core::{BuildCtx, DType, Dim, Fact, Op, Result, Tensor, Value};

use crate::ops::shape::common::*;
use crate::ops::shape::transpose::transpose_tensor;

/// Elements of a bool or numeric tensor as truth values (strings: non-empty).
pub(crate) fn truth_values(t: &Tensor) -> Result<Vec<bool>> {
    match t.dtype() {
        DType::Bool => Ok(t.as_bools()?.to_vec()),
        DType::String => Ok(t.as_strings()?.iter().map(|s| !s.is_empty()).collect()),
        _ => Ok(t.to_f64_vec()?.iter().map(|v| *v != 0.0).collect()),
    }
}

// ---------------------------------------------------------------------------------------

/// `Compress`: keeps the slices along `axis` (or elements of the flattened input) whose
/// condition is true.
#[derive(Debug)]
pub struct Compress {
    axis: Option<i64>,
}

/// Builds `Compress`.
pub fn build_compress(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Compress {
        axis: ctx.attrs().opt_int("axis")?,
    }))
}

impl Op for Compress {
    fn op_type(&self) -> &str {
        "Compress"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let cond = fact_at(inputs, 1)
            .and_then(|f| f.konst.as_ref())
            .and_then(|t| truth_values(t).ok());
        let selected = match cond {
            Some(c) => Dim::Known(c.iter().filter(|b| **b).count()),
            None => Dim::Unknown,
        };
        let shape = match (self.axis, x.and_then(|f| f.shape.as_ref())) {
            (None, _) => Some(vec![selected]),
            (Some(a), Some(s)) => {
                let a = norm_axis("Compress", a, s.len())
                    .map_err(|e| ierr("Compress", e.to_string()))?;
                let mut s = s.clone();
                s[a] = selected;
                Some(s)
            }
            _ => None,
        };
        Ok(vec![tensor_fact(dtype, shape)])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "Compress";
        let x = kiln_core::input_tensor(inputs, 0, op)?;
        let cond = truth_values(kiln_core::input_tensor(inputs, 1, op)?)?;
        let (x, axis) = match self.axis {
            Some(a) => (x.clone(), norm_axis(op, a, x.rank())?),
            None => (x.reshape(&[x.len()])?, 0),
        };
        let s = x.shape();
        let dim = s[axis];
        let sel: Vec<usize> = cond
            .iter()
            .enumerate()
            .filter(|(_, c)| **c)
            .map(|(i, _)| i)
            .collect();
        if let Some(&bad) = sel.iter().find(|&&i| i >= dim) {
            return Err(kerr(
                op,
                format!("condition selects index {bad} beyond the axis size {dim}"),
            ));
        }
        let pre: usize = s[..axis].iter().product();
        let post: usize = s[axis + 1..].iter().product();
        let offsets = (0..pre)
            .flat_map(|p| sel.iter().map(move |&i| Some((p * dim + i) * post)))
            .collect();
        let mut out = s.to_vec();
        out[axis] = sel.len();
        let g = BlockGather {
            offsets,
            block: post,
        };
        Ok(vec![move_data(&g, op, &[&x], x.dtype(), &out)?.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `NonZero`: indices of non-zero elements, shape `[rank, count]`, row-major order.
#[derive(Debug)]
pub struct NonZero;

/// Builds `NonZero`.
pub fn build_non_zero(_ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(NonZero))
}

impl Op for NonZero {
    fn op_type(&self) -> &str {
        "NonZero"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let rank = fact_at(inputs, 0).and_then(|f| f.rank());
        Ok(vec![Fact::tensor(
            DType::I64,
            vec![rank.map_or(Dim::Unknown, Dim::Known), Dim::Unknown],
        )])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = kiln_core::input_tensor(inputs, 0, "NonZero")?;
        let nz = truth_values(x)?;
        let (shape, rank) = (x.shape(), x.rank());
        let hits: Vec<usize> = nz
            .iter()
            .enumerate()
            .filter(|(_, b)| **b)
            .map(|(i, _)| i)
            .collect();
        let n = hits.len();
        let mut out = vec![0i64; rank * n];
        for (j, &flat) in hits.iter().enumerate() {
            let mut rem = flat;
            for d in (0..rank).rev() {
                out[d * n + j] = (rem % shape[d]) as i64;
                rem /= shape[d];
            }
        }
        Ok(vec![Tensor::from_vec(&[rank, n], out)?.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `TopK`: the k largest (or smallest) elements along an axis and their indices; ties go
/// to the lower index, NaN counts as the largest value.
#[derive(Debug)]
pub struct TopK {
    axis: i64,
    largest: bool,
    k_attr: Option<i64>,
}

/// Builds `TopK`.
pub fn build_top_k(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let k_attr = if ctx.opset() < 10 {
        Some(a.req_int("k")?)
    } else {
        None
    };
    Ok(Box::new(TopK {
        axis: a.int("axis", -1)?,
        largest: a.int("largest", 1)? != 0,
        k_attr,
    }))
}

/// Total order used by TopK/Unique: NaN above everything, equal NaNs equal.
pub(crate) fn cmp_nan_last<T: PartialOrd>(a: &T, b: &T) -> Ordering {
    match a.partial_cmp(b) {
        Some(o) => o,
        None => {
            #[allow(clippy::eq_op)]
            let (an, bn) = (a != a, b != b);
            an.cmp(&bn)
        }
    }
}

fn topk_typed<T: kiln_core::Element + PartialOrd + Copy>(
    x: &Tensor,
    axis: usize,
    k: usize,
    largest: bool,
) -> Result<(Tensor, Tensor)> {
    let s = x.shape();
    let data = x.as_slice::<T>()?;
    let (pre, dim, post) = (
        s[..axis].iter().product::<usize>(),
        s[axis],
        s[axis + 1..].iter().product::<usize>(),
    );
    let total = pre * k * post;
    let mut oshape = s.to_vec();
    oshape[axis] = k;
    if total == 0 {
        return Ok((
            Tensor::from_vec(&oshape, Vec::<T>::new())?,
            Tensor::from_vec(&oshape, Vec::<i64>::new())?,
        ));
    }
    let mut idxs = vec![0i64; total];
    let mut out_vals = vec![data[0]; total];
    let mut order: Vec<usize> = Vec::with_capacity(dim);
    for p in 0..pre {
        for q in 0..post {
            order.clear();
            order.extend(0..dim);
            let at = |i: usize| data[(p * dim + i) * post + q];
            let cmp = |a: &usize, b: &usize| {
                let o = cmp_nan_last(&at(*a), &at(*b));
                let o = if largest { o.reverse() } else { o };
                o.then(a.cmp(b))
            };
            if k < dim {
                order.select_nth_unstable_by(k, cmp);
                order.truncate(k);
            }
            order.sort_unstable_by(cmp);
            for (j, &i) in order.iter().take(k).enumerate() {
                let o = (p * k + j) * post + q;
                out_vals[o] = at(i);
                idxs[o] = i as i64;
            }
        }
    }
    Ok((
        Tensor::from_vec(&oshape, out_vals)?,
        Tensor::from_vec(&oshape, idxs)?,
    ))
}

impl Op for TopK {
    fn op_type(&self) -> &str {
        "TopK"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let k = match self.k_attr {
            Some(k) => Some(k),
            None => konst_ints(fact_at(inputs, 1)).and_then(|v| v.first().copied()),
        };
        let shape = match x.and_then(|f| f.shape.as_ref()) {
            Some(s) => {
                let a = norm_axis("TopK", self.axis, s.len())
                    .map_err(|e| ierr("TopK", e.to_string()))?;
                let mut s = s.clone();
                s[a] = match k {
                    Some(k) if k >= 0 => Dim::Known(k as usize),
                    _ => Dim::Unknown,
                };
                Some(s)
            }
            None => None,
        };
        Ok(vec![
            tensor_fact(dtype, shape.clone()),
            tensor_fact(Some(DType::I64), shape),
        ])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "TopK";
        let x = kiln_core::input_tensor(inputs, 0, op)?;
        let k = match self.k_attr {
            Some(k) => k,
            None => {
                let v = ints_input(inputs, 1, op)?;
                *v.first().ok_or_else(|| kerr(op, "K is empty"))?
            }
        };
        let axis = norm_axis(op, self.axis, x.rank())?;
        let dim = x.shape()[axis];
        if k < 0 || k as usize > dim {
            return Err(kerr(
                op,
                format!("k = {k} is out of range for an axis of size {dim}"),
            ));
        }
        let k = k as usize;
        let (v, i) = crate::dispatch_numeric!(x.dtype(), T => topk_typed::<T>(x, axis, k, self.largest)?,
            _ => return Err(kerr(op, format!("unsupported dtype {}", x.dtype()))));
        Ok(vec![v.into(), i.into()])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------

/// `Unique`: unique elements (or slices along `axis`), with first-occurrence indices,
/// inverse indices and counts; sorted ascending unless `sorted=0` (first-occurrence order).
#[derive(Debug)]
pub struct Unique {
    axis: Option<i64>,
    sorted: bool,
}

/// Builds `Unique`.
pub fn build_unique(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    Ok(Box::new(Unique {
        axis: a.opt_int("axis")?,
        sorted: a.int("sorted", 1)? != 0,
    }))
}

/// Groups `n` rows (compared by `cmp`): returns (first index of each group in output
/// order, inverse index per row, count per group).
fn group_rows<F: Fn(usize, usize) -> Ordering>(
    n: usize,
    sorted: bool,
    cmp: F,
) -> (Vec<usize>, Vec<i64>, Vec<i64>) {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| cmp(a, b).then(a.cmp(&b)));
    // groups in sorted order
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for &r in &order {
        match groups.last_mut() {
            Some((first, members)) if cmp(*first, r) == Ordering::Equal => members.push(r),
            _ => groups.push((r, vec![r])),
        }
    }
    if !sorted {
        groups.sort_by_key(|g| g.0);
    }
    let mut inverse = vec![0i64; n];
    let mut firsts = Vec::with_capacity(groups.len());
    let mut counts = Vec::with_capacity(groups.len());
    for (gi, (first, members)) in groups.iter().enumerate() {
        firsts.push(*first);
        counts.push(members.len() as i64);
        for &m in members {
            inverse[m] = gi as i64;
        }
    }
    (firsts, inverse, counts)
}

fn row_cmp_typed<T: PartialOrd>(data: &[T], row: usize, a: usize, b: usize) -> Ordering {
    let (ra, rb) = (&data[a * row..(a + 1) * row], &data[b * row..(b + 1) * row]);
    for (x, y) in ra.iter().zip(rb) {
        let o = cmp_nan_last(x, y);
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

impl Op for Unique {
    fn op_type(&self) -> &str {
        "Unique"
    }
    fn infer(&self, inputs: &[Option<&Fact>], n: usize) -> Result<Vec<Fact>> {
        let x = fact_at(inputs, 0);
        let dtype = x.and_then(|f| f.dtype);
        let y_shape = match (self.axis, x.and_then(|f| f.shape.as_ref())) {
            (None, _) => Some(vec![Dim::Unknown]),
            (Some(a), Some(s)) => {
                let a =
                    norm_axis("Unique", a, s.len()).map_err(|e| ierr("Unique", e.to_string()))?;
                let mut s = s.clone();
                s[a] = Dim::Unknown;
                Some(s)
            }
            _ => None,
        };
        let n_rows = match (self.axis, x.and_then(|f| f.shape.as_ref())) {
            (None, Some(s)) => super::super::shape::basic::dims_product(s),
            (Some(a), Some(s)) => norm_axis("Unique", a, s.len())
                .map(|a| s[a].clone())
                .unwrap_or(Dim::Unknown),
            _ => Dim::Unknown,
        };
        let mut out = vec![tensor_fact(dtype, y_shape)];
        for i in 1..n {
            let d = if i == 2 { n_rows.clone() } else { Dim::Unknown };
            out.push(Fact::tensor(DType::I64, vec![d]));
        }
        Ok(out)
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "Unique";
        let x = kiln_core::input_tensor(inputs, 0, op)?;
        // Move the axis to the front so each unique candidate is a contiguous row.
        let (rows_t, axis) = match self.axis {
            None => (x.reshape(&[x.len(), 1])?, None),
            Some(a) => {
                let a = norm_axis(op, a, x.rank())?;
                let mut perm: Vec<usize> = vec![a];
                perm.extend((0..x.rank()).filter(|&d| d != a));
                (transpose_tensor(op, x, &perm)?, Some((a, perm)))
            }
        };
        let n = rows_t.shape().first().copied().unwrap_or(1);
        let row = rows_t.len().checked_div(n).unwrap_or(0);
        let (firsts, inverse, counts) = match rows_t.dtype() {
            DType::String => {
                let d = rows_t.as_strings()?;
                group_rows(n, self.sorted, |a, b| row_cmp_typed(d, row, a, b))
            }
            DType::Bool => {
                let d = rows_t.as_bools()?;
                group_rows(n, self.sorted, |a, b| row_cmp_typed(d, row, a, b))
            }
            dt => crate::dispatch_numeric!(dt, T => {
                let d = rows_t.as_slice::<T>()?;
                group_rows(n, self.sorted, |a, b| row_cmp_typed(d, row, a, b))
            }, _ => return Err(kerr(op, format!("unsupported dtype {dt}")))),
        };
        let g = BlockGather {
            offsets: firsts.iter().map(|&f| Some(f * row)).collect(),
            block: row,
        };
        let mut yshape = rows_t.shape().to_vec();
        if yshape.is_empty() {
            yshape.push(0);
        }
        yshape[0] = firsts.len();
        let y = move_data(&g, op, &[&rows_t], rows_t.dtype(), &yshape)?;
        let y = match axis {
            None => y.reshape(&[firsts.len()])?,
            Some((_, perm)) => {
                let mut inv = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p] = i;
                }
                transpose_tensor(op, &y, &inv)?
            }
        };
        let nf = firsts.len();
        Ok(vec![
            y.into(),
            Tensor::from_vec(&[nf], firsts.iter().map(|&f| f as i64).collect())?.into(),
            Tensor::from_vec(&[n], inverse)?.into(),
            Tensor::from_vec(&[nf], counts)?.into(),
        ])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<T: kiln_core::Element>(shape: &[usize], v: Vec<T>) -> Value {
        Tensor::from_vec(shape, v).unwrap().into()
    }

    #[test]
    fn compress_and_nonzero() {
        let x = t(&[3, 2], vec![1f32, 2., 3., 4., 5., 6.]);
        let c: Value = Tensor::from_bools(&[2], &[false, true]).unwrap().into();
        let y = Compress { axis: Some(0) }
            .eval(&[Some(&x), Some(&c)])
            .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![3., 4.]
        );
        let y = Compress { axis: None }.eval(&[Some(&x), Some(&c)]).unwrap();
        assert_eq!(y[0].as_tensor().unwrap().to_f32_vec().unwrap(), vec![2.]);
        let c3: Value = Tensor::from_bools(&[3], &[false, true, true])
            .unwrap()
            .into();
        assert!(Compress { axis: Some(1) }
            .eval(&[Some(&x), Some(&c3)])
            .is_err());
        let z = t(&[2, 2], vec![1i32, 0, 1, 1]);
        let y = NonZero.eval(&[Some(&z)]).unwrap();
        let y = y[0].as_tensor().unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.to_i64_vec().unwrap(), vec![0, 1, 1, 0, 0, 1]);
    }

    #[test]
    fn topk_ties_and_nan() {
        let x = t(&[1, 6], vec![3f32, 1., 3., f32::NAN, 2., 1.]);
        let k: Value = Tensor::from_vec(&[1], vec![3i64]).unwrap().into();
        let op = TopK {
            axis: -1,
            largest: true,
            k_attr: None,
        };
        let y = op.eval(&[Some(&x), Some(&k)]).unwrap();
        assert_eq!(
            y[1].as_tensor().unwrap().to_i64_vec().unwrap(),
            vec![3, 0, 2]
        );
        let op = TopK {
            axis: 1,
            largest: false,
            k_attr: None,
        };
        let y = op.eval(&[Some(&x), Some(&k)]).unwrap();
        assert_eq!(
            y[1].as_tensor().unwrap().to_i64_vec().unwrap(),
            vec![1, 5, 4]
        );
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![1., 1., 2.]
        );
        let k9: Value = Tensor::from_vec(&[1], vec![9i64]).unwrap().into();
        assert!(op.eval(&[Some(&x), Some(&k9)]).is_err());
        // axis 0 on 2-D
        let x = t(&[3, 2], vec![1u64, 9, 5, 2, 3, 7]);
        let k2: Value = Tensor::from_vec(&[1], vec![2i64]).unwrap().into();
        let y = TopK {
            axis: 0,
            largest: true,
            k_attr: None,
        }
        .eval(&[Some(&x), Some(&k2)])
        .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_i64_vec().unwrap(),
            vec![5, 9, 3, 7]
        );
        assert_eq!(
            y[1].as_tensor().unwrap().to_i64_vec().unwrap(),
            vec![1, 0, 2, 2]
        );
    }

    #[test]
    fn unique_flat_and_axis() {
        let x = t(&[6], vec![2f32, 1., 1., 3., 4., 3.]);
        let y = Unique {
            axis: None,
            sorted: false,
        }
        .eval(&[Some(&x)])
        .unwrap();
        let v: Vec<Vec<f64>> = y
            .iter()
            .map(|v| v.as_tensor().unwrap().to_f64_vec().unwrap())
            .collect();
        assert_eq!(v[0], vec![2., 1., 3., 4.]);
        assert_eq!(v[1], vec![0., 1., 3., 4.]);
        assert_eq!(v[2], vec![0., 1., 1., 2., 3., 2.]);
        assert_eq!(v[3], vec![1., 2., 2., 1.]);
        let y = Unique {
            axis: None,
            sorted: true,
        }
        .eval(&[Some(&x)])
        .unwrap();
        assert_eq!(
            y[0].as_tensor().unwrap().to_f32_vec().unwrap(),
            vec![1., 2., 3., 4.]
        );
        assert_eq!(
            y[1].as_tensor().unwrap().to_i64_vec().unwrap(),
            vec![1, 0, 3, 4]
        );
        // axis=0 on [[1,0,0],[1,0,0],[2,3,4]]
        let x = t(&[3, 3], vec![1i32, 0, 0, 1, 0, 0, 2, 3, 4]);
        let y = Unique {
            axis: Some(0),
            sorted: true,
        }
        .eval(&[Some(&x)])
        .unwrap();
        assert_eq!(y[0].as_tensor().unwrap().shape(), &[2, 3]);
        assert_eq!(
            y[2].as_tensor().unwrap().to_i64_vec().unwrap(),
            vec![0, 0, 1]
        );
        // axis=1
        let x = t(&[2, 3], vec![1i32, 0, 1, 2, 5, 2]);
        let y = Unique {
            axis: Some(-1),
            sorted: true,
        }
        .eval(&[Some(&x)])
        .unwrap();
        assert_eq!(y[0].as_tensor().unwrap().shape(), &[2, 2]);
        assert_eq!(
            y[0].as_tensor().unwrap().to_i64_vec().unwrap(),
            vec![0, 1, 5, 2]
        );
    }
}
