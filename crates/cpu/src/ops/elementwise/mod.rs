//! Elementwise ops: unary math, broadcasting binary arithmetic / comparison / logic,
//! `Where`, variadic `Max Min Sum Mean`, `Cast` and `CastLike`.
//!
//! Shared building blocks live here and are `pub` so other families can reuse them:
//! [`broadcast::Plan`] (numpy broadcasting kernels), [`num::Num`] (per-dtype scalar
//! arithmetic), [`new_tensor`] (fills a fresh aligned output) and the inference helpers
//! [`infer_unary`] / [`infer_broadcast`].

pub mod broadcast;
pub mod chain;
pub mod num;

mod binary;
mod cast;
mod unary;
mod variadic;

#[cfg(test)]
mod localconf;

use kiln_core::{
    AlignedBuf, DType, Dim, Fact, KilnError, OpRegistry, Result, Tensor, Value, ValueKind,
};

pub use broadcast::{broadcast_shape, map_into, Plan};
pub use cast::cast_tensor;

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    unary::register(reg);
    binary::register(reg);
    variadic::register(reg);
    cast::register(reg);
    chain::register(reg);
}

/// A fresh tensor of `dtype` and `shape` whose elements (viewed as `T`, of the dtype's
/// size; `u8` for bool) are written by `fill`.
pub fn new_tensor<T: bytemuck::Pod>(
    dtype: DType,
    shape: &[usize],
    fill: impl FnOnce(&mut [T]) -> Result<()>,
) -> Result<Tensor> {
    let n = checked_numel(shape)?;
    let bytes = n
        .checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| KilnError::Other(format!("tensor of shape {shape:?} is too large")))?;
    let mut buf = AlignedBuf::zeroed(bytes);
    fill(bytemuck::cast_slice_mut(buf.as_mut_slice()))?;
    Tensor::from_aligned(dtype, shape, buf)
}

/// Number of elements of a shape, failing on overflow instead of wrapping.
pub fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| KilnError::Other(format!("shape {shape:?} has too many elements")))
}

/// A shape-inference error naming the op.
pub fn infer_err(op: &str, msg: impl Into<String>) -> KilnError {
    KilnError::Inference {
        node: String::new(),
        op: op.to_string(),
        msg: msg.into(),
    }
}

/// Output fact of a shape-preserving op: the first input's shape, with `dtype` (or the
/// input's dtype when `None`).
pub fn infer_unary(inputs: &[Option<&Fact>], dtype: Option<DType>) -> Result<Vec<Fact>> {
    Ok(vec![match inputs.first().copied().flatten() {
        Some(f) => Fact {
            kind: ValueKind::Tensor,
            dtype: dtype.or(f.dtype),
            shape: f.shape.clone(),
            konst: None,
        },
        None => Fact {
            dtype,
            ..Fact::unknown()
        },
    }])
}

/// Output fact of a broadcasting op over all present inputs: the broadcast shape, with
/// `dtype` (or the first input's dtype when `None`).
pub fn infer_broadcast(
    op: &str,
    inputs: &[Option<&Fact>],
    dtype: Option<DType>,
) -> Result<Vec<Fact>> {
    let dtype = dtype.or_else(|| inputs.first().copied().flatten().and_then(|f| f.dtype));
    let mut shape: Option<Vec<Dim>> = Some(Vec::new());
    for f in inputs {
        let s = f.and_then(|f| f.shape.as_ref());
        shape = match (shape, s) {
            (Some(acc), Some(s)) => Some(fact_broadcast(op, &acc, s)?),
            _ => None,
        };
    }
    Ok(vec![Fact {
        kind: ValueKind::Tensor,
        dtype,
        shape,
        konst: None,
    }])
}

fn fact_broadcast(op: &str, a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>> {
    kiln_core::fact::broadcast_dims(a, b).ok_or_else(|| {
        let show = |s: &[Dim]| {
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        infer_err(
            op,
            format!("shapes [{}] and [{}] cannot be broadcast", show(a), show(b)),
        )
    })
}

/// Wraps one output tensor.
pub fn one(t: Tensor) -> Result<Vec<Value>> {
    Ok(vec![Value::Tensor(t)])
}

/// A kernel error for an input dtype the op does not accept.
pub fn bad_dtype(op: &str, dtype: DType) -> KilnError {
    KilnError::kernel(op, format!("unsupported input dtype {dtype}"))
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers for the unit tests of this crate's elementwise-style ops.

    use kiln_core::{Attr, BuildCtx, Op, OpDesc, Tensor, Value};

    /// Builds an op through the full registry.
    pub fn build(
        op: &str,
        opset: i64,
        attrs: Vec<(&str, Attr)>,
        n_in: usize,
        n_out: usize,
    ) -> kiln_core::Result<std::sync::Arc<dyn Op>> {
        let mut desc = OpDesc::new("", op, opset);
        for (k, v) in attrs {
            desc.attrs.insert(k.to_string(), v);
        }
        let reg = crate::registry();
        let ctx = BuildCtx {
            node: "n",
            desc: &desc,
            n_inputs: n_in,
            n_outputs: n_out,
        };
        reg.build(&ctx)
    }

    /// Runs an op on tensors (None for absent optional inputs).
    pub fn run(op: &dyn Op, inputs: &[Option<Tensor>]) -> kiln_core::Result<Vec<Tensor>> {
        let vals: Vec<Option<Value>> = inputs
            .iter()
            .map(|t| t.clone().map(Value::Tensor))
            .collect();
        let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
        op.eval(&refs)?
            .into_iter()
            .map(|v| v.into_tensor())
            .collect()
    }

    /// Runs `eval_into` with fresh output buffers shaped like `eval`'s outputs and checks
    /// both agree bit for bit (NaN equal).
    pub fn check_into(op: &dyn Op, inputs: &[Option<Tensor>]) {
        check_into_n(op, inputs, usize::MAX)
    }

    /// [`check_into`] with only the first `n` outputs requested.
    pub fn check_into_n(op: &dyn Op, inputs: &[Option<Tensor>], n: usize) {
        let mut want = run(op, inputs).unwrap();
        want.truncate(n);
        let vals: Vec<Option<Value>> = inputs
            .iter()
            .map(|t| t.clone().map(Value::Tensor))
            .collect();
        let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
        let mut bufs: Vec<kiln_core::AlignedBuf> = want
            .iter()
            .map(|t| kiln_core::AlignedBuf::zeroed(t.len() * t.dtype().size()))
            .collect();
        {
            let mut views: Vec<kiln_core::TensorMut<'_>> = bufs
                .iter_mut()
                .zip(&want)
                .map(|(b, t)| {
                    kiln_core::TensorMut::new(t.dtype(), t.shape(), b.as_mut_slice()).unwrap()
                })
                .collect();
            op.eval_into(&refs, &mut views).unwrap();
        }
        for (b, t) in bufs.into_iter().zip(&want) {
            let got = Tensor::from_aligned(t.dtype(), t.shape(), b).unwrap();
            assert!(
                got.same_as(t),
                "{}: eval_into differs from eval",
                op.op_type()
            );
        }
    }

    /// Builds and runs in one go, returning the first output.
    pub fn run1(
        op: &str,
        opset: i64,
        attrs: Vec<(&str, Attr)>,
        inputs: &[Option<Tensor>],
    ) -> kiln_core::Result<Tensor> {
        let o = build(op, opset, attrs, inputs.len(), 1)?;
        Ok(run(o.as_ref(), inputs)?.remove(0))
    }

    /// f32 tensor.
    pub fn f32t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape, v).unwrap()
    }

    /// Deterministic pseudo-random non-zero values in [-2, 2].
    pub fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0;
                if v == 0.0 {
                    0.5
                } else {
                    v
                }
            })
            .collect()
    }

    /// Asserts two float slices are close.
    pub fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let ok = (x - y).abs() <= tol * (1.0 + y.abs()) || (x.is_nan() && y.is_nan()) || x == y;
            assert!(ok, "element {i}: {x} vs {y}");
        }
    }
}

#[cfg(test)]
mod into_tests {
    use super::testutil::*;
    use kiln_core::{Attr, Tensor};

    #[test]
    fn eval_into_matches_eval() {
        let big = rand(70_000, 5);
        let x = f32t(&[70, 1000], big.clone());
        let row = f32t(&[1000], rand(1000, 6));
        let ops2 = ["Add", "Sub", "Mul", "Div"];
        for op in ops2 {
            let o = build(op, 14, vec![], 2, 1).unwrap();
            check_into(o.as_ref(), &[Some(x.clone()), Some(row.clone())]);
            check_into(o.as_ref(), &[Some(x.clone()), Some(x.clone())]);
        }
        let i = Tensor::from_vec(&[3], vec![1i64, 2, 3]).unwrap();
        check_into(
            build("Add", 14, vec![], 2, 1).unwrap().as_ref(),
            &[Some(i.clone()), Some(i)],
        );
        for op in [
            "Relu",
            "Sigmoid",
            "Tanh",
            "Exp",
            "Sqrt",
            "HardSwish",
            "HardSigmoid",
            "Erf",
            "Softmax",
            "LogSoftmax",
        ] {
            check_into(
                build(op, 14, vec![], 1, 1).unwrap().as_ref(),
                &[Some(x.clone())],
            );
        }
        let clip = build("Clip", 13, vec![], 3, 1).unwrap();
        check_into(
            clip.as_ref(),
            &[
                Some(x.clone()),
                Some(Tensor::scalar(-0.5f32)),
                Some(Tensor::scalar(0.5f32)),
            ],
        );
        let ln = build(
            "LayerNormalization",
            17,
            vec![("axis", Attr::Int(-1))],
            3,
            1,
        )
        .unwrap();
        check_into(
            ln.as_ref(),
            &[Some(x.clone()), Some(row.clone()), Some(row.clone())],
        );
        check_into_n(
            ln.as_ref(),
            &[Some(x.clone()), Some(row.clone()), Some(row.clone())],
            1,
        );
        // Cast: same dtype, integers and floats to f32/f64, and a pair served by the
        // reference (f32 → i64).
        let ints = Tensor::from_vec(&[2, 3], vec![-7i64, 0, 3, 1 << 40, 9, -2]).unwrap();
        let odd = f32t(&[3, 7, 5], rand(105, 9));
        for (to, input) in [
            (1i64, odd.clone()),
            (1, ints.clone()),
            (11, ints.clone()),
            (11, odd.clone()),
            (7, odd.clone()),
        ] {
            let cast = build("Cast", 19, vec![("to", Attr::Int(to))], 1, 1).unwrap();
            check_into(cast.as_ref(), &[Some(input)]);
        }
        // The view ops write a copy into their slot.
        let shape = |v: &[i64]| Some(Tensor::from_vec(&[v.len()], v.to_vec()).unwrap());
        check_into(
            build("Reshape", 14, vec![], 2, 1).unwrap().as_ref(),
            &[Some(odd.clone()), shape(&[7, -1])],
        );
        check_into(
            build("Unsqueeze", 13, vec![], 2, 1).unwrap().as_ref(),
            &[Some(odd.clone()), shape(&[0, -1])],
        );
        let ones = f32t(&[3, 1, 5, 1], rand(15, 10));
        check_into(
            build("Squeeze", 13, vec![], 2, 1).unwrap().as_ref(),
            &[Some(ones.clone()), shape(&[-1])],
        );
        check_into(
            build("Squeeze", 13, vec![], 1, 1).unwrap().as_ref(),
            &[Some(ones)],
        );
        check_into(
            build("Flatten", 13, vec![("axis", Attr::Int(2))], 1, 1)
                .unwrap()
                .as_ref(),
            &[Some(odd.clone())],
        );
        check_into(
            build("Identity", 13, vec![], 1, 1).unwrap().as_ref(),
            &[Some(ints)],
        );
        for op in ["GlobalAveragePool", "GlobalMaxPool"] {
            check_into(
                build(op, 13, vec![], 1, 1).unwrap().as_ref(),
                &[Some(f32t(&[2, 3, 7, 5], rand(210, 11)))],
            );
        }
        let x4 = f32t(&[2, 5, 70, 100], big);
        let c = f32t(&[5], vec![0.5, 1.0, 1.5, 2.0, 2.5]);
        let bn = build("BatchNormalization", 15, vec![], 5, 1).unwrap();
        check_into(
            bn.as_ref(),
            &[
                Some(x4),
                Some(c.clone()),
                Some(c.clone()),
                Some(c.clone()),
                Some(c),
            ],
        );
    }
}
