//! Small tensor helpers shared by the control-flow, sequence and signal ops: axis
//! normalisation, slicing along an axis, concatenation and stacking for every dtype
//! (strings included), and the gathering of subgraph captures.

use kiln_core::{DType, Dim, Fact, KilnError, Result, Tensor, Value, ValueKind};

/// Normalises a possibly negative `axis` for a tensor of rank `rank` (valid range
/// `[-rank, rank)`).
pub(crate) fn norm_axis(op: &str, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        return Err(KilnError::kernel(
            op,
            format!("axis {axis} is out of range for rank {rank}"),
        ));
    }
    Ok(if axis < 0 {
        (axis + r) as usize
    } else {
        axis as usize
    })
}

/// `(outer, dim, inner)` sizes around `axis`.
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

fn narrow_slice<T: Clone>(
    data: &[T],
    shape: &[usize],
    axis: usize,
    start: usize,
    len: usize,
) -> Vec<T> {
    let (outer, dim, inner) = around(shape, axis);
    let mut out = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = (o * dim + start) * inner;
        out.extend_from_slice(&data[base..base + len * inner]);
    }
    out
}

/// The elements `start..start + len` of `t` along `axis` (the axis is kept).
pub(crate) fn narrow(
    op: &str,
    t: &Tensor,
    axis: usize,
    start: usize,
    len: usize,
) -> Result<Tensor> {
    let shape = t.shape();
    if axis >= shape.len() {
        return Err(KilnError::kernel(
            op,
            format!("axis {axis} is out of range for shape {shape:?}"),
        ));
    }
    let end = start
        .checked_add(len)
        .ok_or_else(|| KilnError::kernel(op, "slice bounds overflow"))?;
    if end > shape[axis] {
        return Err(KilnError::kernel(
            op,
            format!("slice {start}..{end} is out of range for axis {axis} of shape {shape:?}"),
        ));
    }
    let mut out_shape = shape.to_vec();
    out_shape[axis] = len;
    if t.dtype() == DType::String {
        let data = narrow_slice(t.as_strings()?, shape, axis, start, len);
        return Tensor::from_strings(&out_shape, data);
    }
    crate::dispatch_pod!(t.dtype(), T => {
        let data = narrow_slice(t.as_raw::<T>()?, shape, axis, start, len);
        Tensor::from_raw(t.dtype(), &out_shape, &data)
    }, _ => Err(KilnError::kernel(op, format!("unsupported dtype {}", t.dtype()))))
}

/// Element `index` of `t` along `axis`, with that axis removed.
pub(crate) fn take(op: &str, t: &Tensor, axis: usize, index: usize) -> Result<Tensor> {
    let part = narrow(op, t, axis, index, 1)?;
    let mut shape = t.shape().to_vec();
    shape.remove(axis);
    part.reshape(&shape)
}

fn concat_slices<T: Clone>(
    parts: &[(&[T], usize)],
    outer: usize,
    inner: usize,
    total: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (data, dim) in parts {
            let chunk = dim * inner;
            out.extend_from_slice(&data[o * chunk..(o + 1) * chunk]);
        }
    }
    out
}

/// Concatenates tensors along an existing `axis`; all must share dtype, rank and the
/// other dims.
pub(crate) fn concat(op: &str, parts: &[Tensor], axis: usize) -> Result<Tensor> {
    let first = parts
        .first()
        .ok_or_else(|| KilnError::kernel(op, "nothing to concatenate"))?;
    let rank = first.rank();
    if axis >= rank {
        return Err(KilnError::kernel(
            op,
            format!("axis {axis} is out of range for rank {rank}"),
        ));
    }
    let mut total = 0usize;
    for p in parts {
        if p.dtype() != first.dtype() {
            return Err(KilnError::kernel(
                op,
                format!(
                    "cannot concatenate {} and {} tensors",
                    first.dtype(),
                    p.dtype()
                ),
            ));
        }
        let same = p.rank() == rank
            && p.shape()
                .iter()
                .zip(first.shape())
                .enumerate()
                .all(|(i, (a, b))| i == axis || a == b);
        if !same {
            return Err(KilnError::kernel(
                op,
                format!(
                    "cannot concatenate shapes {:?} and {:?} along axis {axis}",
                    first.shape(),
                    p.shape()
                ),
            ));
        }
        total = total
            .checked_add(p.shape()[axis])
            .ok_or_else(|| KilnError::kernel(op, "size overflow"))?;
    }
    let (outer, _, inner) = around(first.shape(), axis);
    let mut out_shape = first.shape().to_vec();
    out_shape[axis] = total;
    if first.dtype() == DType::String {
        let views: Vec<(&[String], usize)> = parts
            .iter()
            .map(|p| Ok((p.as_strings()?, p.shape()[axis])))
            .collect::<Result<_>>()?;
        return Tensor::from_strings(&out_shape, concat_slices(&views, outer, inner, total));
    }
    crate::dispatch_pod!(first.dtype(), T => {
        let views: Vec<(&[T], usize)> =
            parts.iter().map(|p| Ok((p.as_raw::<T>()?, p.shape()[axis]))).collect::<Result<_>>()?;
        Tensor::from_raw(first.dtype(), &out_shape, &concat_slices(&views, outer, inner, total))
    }, _ => Err(KilnError::kernel(op, format!("unsupported dtype {}", first.dtype()))))
}

/// Stacks tensors of one shape along a new `axis` (in `0..=rank`).
pub(crate) fn stack(op: &str, parts: &[Tensor], axis: usize) -> Result<Tensor> {
    let first = parts
        .first()
        .ok_or_else(|| KilnError::kernel(op, "nothing to stack"))?;
    if axis > first.rank() {
        return Err(KilnError::kernel(
            op,
            format!("axis {axis} is out of range for rank {}", first.rank() + 1),
        ));
    }
    let mut expanded = Vec::with_capacity(parts.len());
    for p in parts {
        if p.shape() != first.shape() || p.dtype() != first.dtype() {
            return Err(KilnError::kernel(
                op,
                format!(
                    "cannot stack {} {:?} with {} {:?}: every element must have the same type and shape",
                    first.dtype(),
                    first.shape(),
                    p.dtype(),
                    p.shape()
                ),
            ));
        }
        let mut s = p.shape().to_vec();
        s.insert(axis, 1);
        expanded.push(p.reshape(&s)?);
    }
    concat(op, &expanded, axis)
}

/// The elements of `t` (flattened) at `idx`, as a tensor of `shape`.
pub(crate) fn gather_flat(op: &str, t: &Tensor, idx: &[usize], shape: &[usize]) -> Result<Tensor> {
    if let Some(bad) = idx.iter().find(|i| **i >= t.len()) {
        return Err(KilnError::kernel(
            op,
            format!("index {bad} is out of range for {} elements", t.len()),
        ));
    }
    if t.dtype() == DType::String {
        let s = t.as_strings()?;
        return Tensor::from_strings(shape, idx.iter().map(|&i| s[i].clone()).collect());
    }
    crate::dispatch_pod!(t.dtype(), T => {
        let d = t.as_raw::<T>()?;
        let v: Vec<T> = idx.iter().map(|&i| d[i]).collect();
        Tensor::from_raw(t.dtype(), shape, &v)
    }, _ => Err(KilnError::kernel(op, format!("unsupported dtype {}", t.dtype()))))
}

/// A tensor is "true" when it holds one non-zero element (bool or numeric).
pub(crate) fn truthy(op: &str, t: &Tensor) -> Result<bool> {
    if t.len() != 1 {
        return Err(KilnError::kernel(
            op,
            format!(
                "condition must hold one element, found shape {:?}",
                t.shape()
            ),
        ));
    }
    if t.dtype() == DType::Bool {
        return Ok(t.as_bools()?[0]);
    }
    if t.dtype() == DType::String {
        return Err(KilnError::kernel(op, "condition cannot be a string tensor"));
    }
    Ok(t.to_f64_vec()?[0] != 0.0)
}

/// Clones `n` capture values starting at input `start`.
pub(crate) fn captures(
    op: &str,
    inputs: &[Option<&Value>],
    start: usize,
    n: usize,
) -> Result<Vec<Value>> {
    (start..start + n)
        .map(|i| match inputs.get(i).copied().flatten() {
            Some(v) => Ok(v.clone()),
            None => Err(KilnError::kernel(
                op,
                format!("captured outer value (input {i}) is missing"),
            )),
        })
        .collect()
}

/// Runs a subgraph, prefixing its errors with the op that ran it.
pub(crate) fn run_body(
    op: &str,
    what: &str,
    graph: &kiln_core::Graph,
    inputs: &[Value],
    caps: &[Value],
) -> Result<Vec<Value>> {
    kiln_core::exec::run_graph(graph, inputs, caps)
        .map_err(|e| KilnError::kernel(op, format!("{what}: {e}")))
}

/// The facts of a subgraph's outputs.
pub(crate) fn output_facts(graph: &kiln_core::Graph) -> Vec<Fact> {
    graph
        .outputs
        .iter()
        .map(|&o| graph.values[o].fact.clone())
        .collect()
}

/// Follows `Identity` nodes back from `value` to the value they copy.
pub(crate) fn skip_identities(
    graph: &kiln_core::Graph,
    mut value: kiln_core::ValueId,
) -> kiln_core::ValueId {
    for _ in 0..graph.nodes.len() {
        let producer = graph
            .nodes
            .iter()
            .find(|n| n.outputs.first() == Some(&Some(value)));
        match producer {
            Some(n) if n.op.op_type() == "Identity" => match n.inputs.first() {
                Some(Some(src)) => value = *src,
                _ => break,
            },
            _ => break,
        }
    }
    value
}

/// What two facts have in common (for values that may come from either of two sources):
/// equal dims are kept, the rest becomes unknown; a dtype known on one side only is kept
/// (ONNX requires both sources to share it). Constants are dropped.
pub(crate) fn merge_facts(a: &Fact, b: &Fact) -> Fact {
    let dtype = match (a.dtype, b.dtype) {
        (Some(x), Some(y)) if x != y => None,
        (x, y) => x.or(y),
    };
    let shape = match (&a.shape, &b.shape) {
        (Some(x), Some(y)) if x.len() == y.len() => Some(
            x.iter()
                .zip(y)
                .map(|(p, q)| if p == q { p.clone() } else { Dim::Unknown })
                .collect(),
        ),
        _ => None,
    };
    let kind = if a.kind == b.kind || b.dtype.is_none() && b.shape.is_none() {
        a.kind
    } else {
        b.kind
    };
    Fact {
        kind,
        dtype,
        shape,
        konst: None,
    }
}

/// A fact describing the tensor obtained by stacking values of fact `elem` along a new
/// `axis`, `n` of them.
pub(crate) fn stacked_fact(elem: &Fact, axis: i64, n: Dim) -> Fact {
    let shape = elem.shape.as_ref().and_then(|s| {
        let r = s.len() as i64 + 1;
        let a = if axis < 0 { axis + r } else { axis };
        if a < 0 || a >= r {
            return None;
        }
        let mut s = s.clone();
        s.insert(a as usize, n);
        Some(s)
    });
    Fact {
        kind: ValueKind::Tensor,
        dtype: elem.dtype,
        shape,
        konst: None,
    }
}

/// An empty tensor for a scan output that saw no iteration: shape from the element fact
/// when it is known (0 inserted at `axis`), else `[0]`.
pub(crate) fn empty_stacked(elem: &Fact, axis: usize) -> Result<Tensor> {
    let dtype = elem.dtype.unwrap_or(DType::F32);
    let shape = match elem.concrete_shape() {
        Some(mut s) if axis <= s.len() => {
            s.insert(axis, 0);
            s
        }
        _ => vec![0],
    };
    Ok(Tensor::zeros(dtype, &shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape, v).unwrap()
    }

    #[test]
    fn narrow_and_take() {
        let x = t(&[2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let n = narrow("T", &x, 1, 1, 2).unwrap();
        assert_eq!(n.shape(), &[2, 2]);
        assert_eq!(n.as_slice::<f32>().unwrap(), &[2., 3., 5., 6.]);
        let r = take("T", &x, 0, 1).unwrap();
        assert_eq!(r.shape(), &[3]);
        assert_eq!(r.as_slice::<f32>().unwrap(), &[4., 5., 6.]);
        assert!(narrow("T", &x, 1, 2, 2).is_err());
        assert!(narrow("T", &x, 2, 0, 1).is_err());
    }

    #[test]
    fn concat_and_stack() {
        let a = t(&[2, 1], vec![1., 2.]);
        let b = t(&[2, 2], vec![3., 4., 5., 6.]);
        let c = concat("T", &[a.clone(), b.clone()], 1).unwrap();
        assert_eq!(c.shape(), &[2, 3]);
        assert_eq!(c.as_slice::<f32>().unwrap(), &[1., 3., 4., 2., 5., 6.]);
        assert!(concat("T", &[a.clone(), b.clone()], 0).is_err());
        let s = stack("T", &[a.clone(), a.clone()], 2).unwrap();
        assert_eq!(s.shape(), &[2, 1, 2]);
        assert_eq!(s.as_slice::<f32>().unwrap(), &[1., 1., 2., 2.]);
        assert!(stack("T", &[a, b], 0).is_err());
        let st = Tensor::from_strings(&[2], vec!["a".into(), "b".into()]).unwrap();
        let s = stack("T", &[st.clone(), st], 1).unwrap();
        assert_eq!(s.as_strings().unwrap(), &["a", "a", "b", "b"]);
    }

    #[test]
    fn axes_and_truth() {
        assert_eq!(norm_axis("T", -1, 3).unwrap(), 2);
        assert!(norm_axis("T", 3, 3).is_err());
        assert!(truthy("T", &Tensor::from_bools(&[1], &[true]).unwrap()).unwrap());
        assert!(!truthy("T", &Tensor::scalar(0i64)).unwrap());
        assert!(truthy("T", &Tensor::from_bools(&[2], &[true, true]).unwrap()).is_err());
    }
}
