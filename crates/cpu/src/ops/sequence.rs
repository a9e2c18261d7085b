//! Sequence and optional ops: `SequenceConstruct`, `SequenceEmpty`, `SequenceAt`,
//! `SequenceInsert`, `SequenceErase`, `SequenceLength`, `ConcatFromSequence`,
//! `SplitToSequence`, `SequenceMap`, `Optional`, `OptionalHasElement`,
//! `OptionalGetElement`.
//!
//! `SequenceMap`'s body captures follow the contract described in `control_flow`: their
//! values are the node's last inputs, after `input_sequence` and `additional_inputs`.

use std::any::Any;
use std::sync::Arc;

use kiln_core::{
    BuildCtx, DType, Dim, Fact, Graph, KilnError, Op, OpRegistry, Result, Tensor, Value, ValueKind,
};

use super::control_flow::util::{
    captures, concat, merge_facts, narrow, norm_axis, output_facts, run_body, stack,
};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("SequenceConstruct", |_| Ok(Box::new(SequenceConstruct)));
    reg.register("SequenceEmpty", build_sequence_empty);
    reg.register("SequenceAt", |_| Ok(Box::new(SequenceAt)));
    reg.register("SequenceInsert", |_| Ok(Box::new(SequenceInsert)));
    reg.register("SequenceErase", |_| Ok(Box::new(SequenceErase)));
    reg.register("SequenceLength", |_| Ok(Box::new(SequenceLength)));
    reg.register("ConcatFromSequence", build_concat_from_sequence);
    reg.register("SplitToSequence", build_split_to_sequence);
    reg.register("SequenceMap", build_sequence_map);
    reg.register("Optional", build_optional);
    reg.register("OptionalHasElement", |_| Ok(Box::new(OptionalHasElement)));
    reg.register("OptionalGetElement", |_| Ok(Box::new(OptionalGetElement)));
}

/// The `i`-th input as a sequence.
fn input_sequence<'a>(inputs: &[Option<&'a Value>], i: usize, op: &str) -> Result<&'a [Tensor]> {
    match inputs.get(i).copied().flatten() {
        Some(v) => v
            .as_sequence()
            .map_err(|e| KilnError::kernel(op, format!("input {i}: {e}"))),
        None => Err(KilnError::kernel(
            op,
            format!("required input {i} is missing"),
        )),
    }
}

/// A fact for a sequence whose elements are described by `elem`.
fn seq_fact(elem: &Fact) -> Fact {
    Fact {
        kind: ValueKind::Sequence,
        dtype: elem.dtype,
        shape: elem.shape.clone(),
        konst: None,
    }
}

/// A fact for one element of a sequence described by `seq`.
fn elem_fact(seq: &Fact) -> Fact {
    Fact {
        kind: ValueKind::Tensor,
        dtype: seq.dtype,
        shape: seq.shape.clone(),
        konst: None,
    }
}

/// A scalar integer position input, normalised into `0..=max` (negative counts from `len`).
fn position(op: &str, t: &Tensor, len: usize, max: usize) -> Result<usize> {
    let v = t
        .to_i64_vec()
        .map_err(|e| KilnError::kernel(op, format!("position: {e}")))?;
    let p = match v.as_slice() {
        [p] => *p,
        _ => {
            return Err(KilnError::kernel(
                op,
                format!("position must be a scalar, found shape {:?}", t.shape()),
            ))
        }
    };
    let q = if p < 0 { p + len as i64 } else { p };
    if q < 0 || q as usize > max {
        return Err(KilnError::kernel(
            op,
            format!("position {p} is out of range for a sequence of length {len}"),
        ));
    }
    Ok(q as usize)
}

macro_rules! simple_op {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug)]
        pub struct $name;
    };
}

// ---------------------------------------------------------------- SequenceConstruct

simple_op!(
    SequenceConstruct,
    "`SequenceConstruct`: a sequence of its input tensors."
);

impl Op for SequenceConstruct {
    fn op_type(&self) -> &str {
        "SequenceConstruct"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let mut facts = inputs.iter().flatten();
        let Some(first) = facts.next() else {
            return Ok(vec![Fact {
                kind: ValueKind::Sequence,
                ..Fact::unknown()
            }]);
        };
        let merged = facts.fold(elem_fact(first), |acc, f| merge_facts(&acc, &elem_fact(f)));
        Ok(vec![seq_fact(&merged)])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let mut seq = Vec::with_capacity(inputs.len());
        for i in 0..inputs.len() {
            let t = kiln_core::input_tensor(inputs, i, "SequenceConstruct")?;
            if let Some(first) = seq.first() {
                let first: &Tensor = first;
                if first.dtype() != t.dtype() {
                    return Err(KilnError::kernel(
                        "SequenceConstruct",
                        format!(
                            "all inputs must share a dtype, found {} and {}",
                            first.dtype(),
                            t.dtype()
                        ),
                    ));
                }
            }
            seq.push(t.clone());
        }
        Ok(vec![Value::Sequence(seq)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- SequenceEmpty

/// `SequenceEmpty`: an empty sequence of a given element dtype.
#[derive(Debug)]
pub struct SequenceEmpty {
    dtype: DType,
}

fn build_sequence_empty(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let code = a.int("dtype", 1)?;
    let dtype = i32::try_from(code)
        .ok()
        .and_then(DType::from_onnx_code)
        .ok_or_else(|| a.unsupported(format!("dtype {code}")))?;
    Ok(Box::new(SequenceEmpty { dtype }))
}

impl Op for SequenceEmpty {
    fn op_type(&self) -> &str {
        "SequenceEmpty"
    }

    fn infer(&self, _inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![Fact {
            kind: ValueKind::Sequence,
            dtype: Some(self.dtype),
            shape: None,
            konst: None,
        }])
    }

    fn eval(&self, _inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        Ok(vec![Value::Sequence(Vec::new())])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- SequenceAt

simple_op!(
    SequenceAt,
    "`SequenceAt`: the tensor at a position of a sequence."
);

impl Op for SequenceAt {
    fn op_type(&self) -> &str {
        "SequenceAt"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![inputs
            .first()
            .copied()
            .flatten()
            .map(elem_fact)
            .unwrap_or_default()])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let seq = input_sequence(inputs, 0, "SequenceAt")?;
        let pos = kiln_core::input_tensor(inputs, 1, "SequenceAt")?;
        if seq.is_empty() {
            return Err(KilnError::kernel("SequenceAt", "the sequence is empty"));
        }
        let p = position("SequenceAt", pos, seq.len(), seq.len() - 1)?;
        Ok(vec![Value::Tensor(seq[p].clone())])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- SequenceInsert

simple_op!(
    SequenceInsert,
    "`SequenceInsert`: inserts a tensor at a position (default: the end)."
);

impl Op for SequenceInsert {
    fn op_type(&self) -> &str {
        "SequenceInsert"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let seq = inputs.first().copied().flatten();
        let t = inputs.get(1).copied().flatten();
        let elem = match (seq, t) {
            (Some(s), Some(t)) => merge_facts(&elem_fact(s), &elem_fact(t)),
            (Some(s), None) => elem_fact(s),
            (None, Some(t)) => Fact {
                shape: None,
                ..elem_fact(t)
            },
            (None, None) => Fact::unknown(),
        };
        Ok(vec![seq_fact(&elem)])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "SequenceInsert";
        let seq = input_sequence(inputs, 0, OP)?;
        let t = kiln_core::input_tensor(inputs, 1, OP)?;
        if let Some(first) = seq.first() {
            if first.dtype() != t.dtype() {
                return Err(KilnError::kernel(
                    OP,
                    format!(
                        "cannot insert a {} tensor into a sequence of {}",
                        t.dtype(),
                        first.dtype()
                    ),
                ));
            }
        }
        let p = match kiln_core::optional_tensor(inputs, 2, OP)? {
            Some(pos) => position(OP, pos, seq.len(), seq.len())?,
            None => seq.len(),
        };
        let mut out = seq.to_vec();
        out.insert(p, t.clone());
        Ok(vec![Value::Sequence(out)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- SequenceErase

simple_op!(
    SequenceErase,
    "`SequenceErase`: removes the tensor at a position (default: the last)."
);

impl Op for SequenceErase {
    fn op_type(&self) -> &str {
        "SequenceErase"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![inputs
            .first()
            .copied()
            .flatten()
            .map(seq_fact)
            .unwrap_or_default()])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "SequenceErase";
        let seq = input_sequence(inputs, 0, OP)?;
        if seq.is_empty() {
            return Err(KilnError::kernel(OP, "cannot erase from an empty sequence"));
        }
        let p = match kiln_core::optional_tensor(inputs, 1, OP)? {
            Some(pos) => position(OP, pos, seq.len(), seq.len() - 1)?,
            None => seq.len() - 1,
        };
        let mut out = seq.to_vec();
        out.remove(p);
        Ok(vec![Value::Sequence(out)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- SequenceLength

simple_op!(
    SequenceLength,
    "`SequenceLength`: the number of tensors in a sequence, as an i64 scalar."
);

impl Op for SequenceLength {
    fn op_type(&self) -> &str {
        "SequenceLength"
    }

    fn infer(&self, _inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![Fact::concrete(DType::I64, &[])])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let seq = input_sequence(inputs, 0, "SequenceLength")?;
        Ok(vec![Value::Tensor(Tensor::scalar(seq.len() as i64))])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- ConcatFromSequence

/// `ConcatFromSequence`: concatenates (or stacks, with `new_axis`) the tensors of a sequence.
#[derive(Debug)]
pub struct ConcatFromSequence {
    axis: i64,
    new_axis: bool,
}

fn build_concat_from_sequence(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let axis = a.req_int("axis")?;
    let new_axis = match a.int("new_axis", 0)? {
        0 => false,
        1 => true,
        v => return Err(a.invalid(format!("new_axis must be 0 or 1, found {v}"))),
    };
    Ok(Box::new(ConcatFromSequence { axis, new_axis }))
}

impl Op for ConcatFromSequence {
    fn op_type(&self) -> &str {
        "ConcatFromSequence"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let Some(seq) = inputs.first().copied().flatten() else {
            return Ok(vec![Fact::unknown()]);
        };
        let shape = seq.shape.as_ref().and_then(|s| {
            let mut s = s.clone();
            let rank = s.len() + usize::from(self.new_axis);
            let axis = norm_axis("ConcatFromSequence", self.axis, rank).ok()?;
            if self.new_axis {
                s.insert(axis, Dim::Unknown);
            } else {
                s[axis] = Dim::Unknown;
            }
            Some(s)
        });
        Ok(vec![Fact {
            kind: ValueKind::Tensor,
            dtype: seq.dtype,
            shape,
            konst: None,
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "ConcatFromSequence";
        let seq = input_sequence(inputs, 0, OP)?;
        let first = seq
            .first()
            .ok_or_else(|| KilnError::kernel(OP, "the sequence is empty"))?;
        let out = if self.new_axis {
            let axis = norm_axis(OP, self.axis, first.rank() + 1)?;
            stack(OP, seq, axis)?
        } else {
            let axis = norm_axis(OP, self.axis, first.rank())?;
            concat(OP, seq, axis)?
        };
        Ok(vec![Value::Tensor(out)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- SplitToSequence

/// `SplitToSequence`: splits a tensor along an axis into a sequence.
#[derive(Debug)]
pub struct SplitToSequence {
    axis: i64,
    keepdims: bool,
}

fn build_split_to_sequence(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    Ok(Box::new(SplitToSequence {
        axis: a.int("axis", 0)?,
        keepdims: a.int("keepdims", 1)? != 0,
    }))
}

impl SplitToSequence {
    /// The chunk sizes along an axis of size `dim`.
    fn sizes(split: Option<&Tensor>, dim: usize) -> Result<Vec<usize>> {
        const OP: &str = "SplitToSequence";
        let Some(split) = split else {
            return Ok(vec![1; dim]);
        };
        let v = split
            .to_i64_vec()
            .map_err(|e| KilnError::kernel(OP, format!("split: {e}")))?;
        if split.rank() == 0 {
            let chunk = usize::try_from(v[0])
                .ok()
                .filter(|c| *c > 0)
                .ok_or_else(|| {
                    KilnError::kernel(OP, format!("split size {} must be positive", v[0]))
                })?;
            let mut sizes = vec![chunk; dim / chunk];
            if !dim.is_multiple_of(chunk) {
                sizes.push(dim % chunk);
            }
            return Ok(sizes);
        }
        if split.rank() != 1 {
            return Err(KilnError::kernel(
                OP,
                format!(
                    "split must be a scalar or 1-D, found shape {:?}",
                    split.shape()
                ),
            ));
        }
        let sizes: Vec<usize> = v
            .iter()
            .map(|&s| {
                usize::try_from(s)
                    .map_err(|_| KilnError::kernel(OP, format!("negative split size {s}")))
            })
            .collect::<Result<_>>()?;
        let total = sizes.iter().try_fold(0usize, |acc, s| acc.checked_add(*s));
        if total != Some(dim) {
            return Err(KilnError::kernel(
                OP,
                format!("split sizes {v:?} do not add up to the axis size {dim}"),
            ));
        }
        Ok(sizes)
    }
}

impl Op for SplitToSequence {
    fn op_type(&self) -> &str {
        "SplitToSequence"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let Some(x) = inputs.first().copied().flatten() else {
            return Ok(vec![Fact {
                kind: ValueKind::Sequence,
                ..Fact::unknown()
            }]);
        };
        let has_split = inputs.get(1).copied().flatten().is_some();
        let shape = x.shape.as_ref().and_then(|s| {
            let axis = norm_axis("SplitToSequence", self.axis, s.len()).ok()?;
            let mut s = s.clone();
            if has_split {
                s[axis] = Dim::Unknown;
            } else if self.keepdims {
                s[axis] = Dim::Known(1);
            } else {
                s.remove(axis);
            }
            Some(s)
        });
        Ok(vec![Fact {
            kind: ValueKind::Sequence,
            dtype: x.dtype,
            shape,
            konst: None,
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "SplitToSequence";
        let x = kiln_core::input_tensor(inputs, 0, OP)?;
        let split = kiln_core::optional_tensor(inputs, 1, OP)?;
        let axis = norm_axis(OP, self.axis, x.rank())?;
        let sizes = Self::sizes(split, x.shape()[axis])?;
        let mut out = Vec::with_capacity(sizes.len());
        let mut start = 0;
        for s in sizes {
            let part = narrow(OP, x, axis, start, s)?;
            start += s;
            if split.is_none() && !self.keepdims {
                let mut shape = part.shape().to_vec();
                shape.remove(axis);
                out.push(part.reshape(&shape)?);
            } else {
                out.push(part);
            }
        }
        Ok(vec![Value::Sequence(out)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- SequenceMap

/// `SequenceMap`: applies a body graph to each element of the input sequence(s).
#[derive(Debug)]
pub struct SequenceMap {
    body: Arc<Graph>,
}

fn build_sequence_map(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let body = a.graph("body")?;
    if body.inputs.is_empty() {
        return Err(a.invalid("SequenceMap body needs at least one input"));
    }
    Ok(Box::new(SequenceMap { body }))
}

impl Op for SequenceMap {
    fn op_type(&self) -> &str {
        "SequenceMap"
    }

    fn infer(&self, _inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        let mut out: Vec<Fact> = output_facts(&self.body).iter().map(seq_fact).collect();
        out.resize(
            n_outputs,
            Fact {
                kind: ValueKind::Sequence,
                ..Fact::unknown()
            },
        );
        Ok(out)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "SequenceMap";
        let n_in = self.body.inputs.len();
        let n_caps = self.body.captures.len();
        if inputs.len() < n_in + n_caps {
            return Err(KilnError::kernel(
                OP,
                format!("expected {} inputs, got {}", n_in + n_caps, inputs.len()),
            ));
        }
        let caps = captures(OP, inputs, inputs.len() - n_caps, n_caps)?;
        let formal: Vec<&Value> = (0..n_in)
            .map(|i| {
                inputs[i].ok_or_else(|| KilnError::kernel(OP, format!("input {i} is missing")))
            })
            .collect::<Result<_>>()?;
        let len = formal[0]
            .as_sequence()
            .map_err(|e| KilnError::kernel(OP, format!("input_sequence: {e}")))?
            .len();
        for (i, v) in formal.iter().enumerate() {
            if let Value::Sequence(s) = v {
                if s.len() != len {
                    return Err(KilnError::kernel(
                        OP,
                        format!(
                            "input {i} is a sequence of length {}, input_sequence has {len}",
                            s.len()
                        ),
                    ));
                }
            }
        }
        let n_out = self.body.outputs.len();
        let mut outs: Vec<Vec<Tensor>> = vec![Vec::with_capacity(len); n_out];
        for e in 0..len {
            let args: Vec<Value> = formal
                .iter()
                .map(|v| match v {
                    Value::Sequence(s) => Value::Tensor(s[e].clone()),
                    other => (*other).clone(),
                })
                .collect();
            let res = run_body(OP, &format!("body (element {e})"), &self.body, &args, &caps)?;
            for (acc, v) in outs.iter_mut().zip(res) {
                acc.push(
                    v.into_tensor()
                        .map_err(|err| KilnError::kernel(OP, format!("body output: {err}")))?,
                );
            }
        }
        Ok(outs.into_iter().map(Value::Sequence).collect())
    }

    fn subgraphs(&self) -> Vec<Arc<Graph>> {
        vec![self.body.clone()]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- Optional

/// `Optional`: wraps its input into an optional, or builds an empty optional of `type`.
#[derive(Debug)]
pub struct Optional {
    ty: Option<Fact>,
}

fn build_optional(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let ty = ctx.attrs().opt_type("type")?;
    Ok(Box::new(Optional { ty }))
}

/// The fact of an optional holding values described by `inner`.
fn optional_fact(inner: &Fact) -> Fact {
    let kind = match inner.kind {
        ValueKind::Sequence | ValueKind::OptionalSequence => ValueKind::OptionalSequence,
        _ => ValueKind::Optional,
    };
    Fact {
        kind,
        dtype: inner.dtype,
        shape: inner.shape.clone(),
        konst: None,
    }
}

impl Op for Optional {
    fn op_type(&self) -> &str {
        "Optional"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let inner = inputs.first().copied().flatten().or(self.ty.as_ref());
        Ok(vec![inner.map(optional_fact).unwrap_or(Fact {
            kind: ValueKind::Optional,
            ..Fact::unknown()
        })])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        match inputs.first().copied().flatten() {
            Some(v) => Ok(vec![Value::Optional(Some(Box::new(v.clone())))]),
            None if self.ty.is_some() => Ok(vec![Value::Optional(None)]),
            None => Err(KilnError::kernel(
                "Optional",
                "an empty Optional needs the type attribute",
            )),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

simple_op!(
    OptionalHasElement,
    "`OptionalHasElement`: whether an optional (or any input) holds a value."
);

impl Op for OptionalHasElement {
    fn op_type(&self) -> &str {
        "OptionalHasElement"
    }

    fn infer(&self, _inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![Fact::concrete(DType::Bool, &[])])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let has = match inputs.first().copied().flatten() {
            None | Some(Value::Optional(None)) => false,
            Some(_) => true,
        };
        Ok(vec![Value::Tensor(Tensor::from_bools(&[], &[has])?)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

simple_op!(
    OptionalGetElement,
    "`OptionalGetElement`: the value inside an optional (a plain input passes through)."
);

impl Op for OptionalGetElement {
    fn op_type(&self) -> &str {
        "OptionalGetElement"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let Some(f) = inputs.first().copied().flatten() else {
            return Ok(vec![Fact::unknown()]);
        };
        let kind = match f.kind {
            ValueKind::Optional => ValueKind::Tensor,
            ValueKind::OptionalSequence => ValueKind::Sequence,
            k => k,
        };
        Ok(vec![Fact { kind, ..f.clone() }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        match inputs.first().copied().flatten() {
            Some(Value::Optional(Some(v))) => Ok(vec![(**v).clone()]),
            Some(Value::Optional(None)) => Err(KilnError::kernel(
                "OptionalGetElement",
                "the optional is empty",
            )),
            Some(v) => Ok(vec![v.clone()]),
            None => Err(KilnError::kernel(
                "OptionalGetElement",
                "required input 0 is missing",
            )),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::control_flow::testutil::*;
    use kiln_core::Attr;

    fn i64t(shape: &[usize], v: &[i64]) -> Tensor {
        Tensor::from_slice(shape, v).unwrap()
    }

    fn seq_of(v: &Value) -> Vec<Vec<f32>> {
        v.as_sequence()
            .unwrap()
            .iter()
            .map(|t| t.to_f32_vec().unwrap())
            .collect()
    }

    #[test]
    fn construct_at_insert_erase_length() {
        let a = f32t(&[2], &[1., 2.]);
        let b = f32t(&[1], &[3.]);
        let s = run(&SequenceConstruct, &[tv(a.clone()), tv(b.clone())])
            .unwrap()
            .remove(0);
        assert_eq!(seq_of(&s), vec![vec![1., 2.], vec![3.]]);
        let at = run(&SequenceAt, &[Some(s.clone()), tv(Tensor::scalar(-1i64))]).unwrap();
        assert_eq!(at[0].as_tensor().unwrap().to_f32_vec().unwrap(), vec![3.]);
        assert!(run(&SequenceAt, &[Some(s.clone()), tv(Tensor::scalar(2i64))]).is_err());
        assert!(run(&SequenceAt, &[Some(s.clone()), tv(Tensor::scalar(-3i64))]).is_err());
        let c = f32t(&[], &[9.]);
        let ins = run(
            &SequenceInsert,
            &[Some(s.clone()), tv(c.clone()), tv(Tensor::scalar(0i32))],
        )
        .unwrap()
        .remove(0);
        assert_eq!(seq_of(&ins), vec![vec![9.], vec![1., 2.], vec![3.]]);
        let ins = run(&SequenceInsert, &[Some(s.clone()), tv(c.clone())])
            .unwrap()
            .remove(0);
        assert_eq!(seq_of(&ins)[2], vec![9.]);
        let ins = run(
            &SequenceInsert,
            &[Some(s.clone()), tv(c.clone()), tv(Tensor::scalar(2i64))],
        )
        .unwrap()
        .remove(0);
        assert_eq!(seq_of(&ins)[2], vec![9.]);
        assert!(run(
            &SequenceInsert,
            &[Some(s.clone()), tv(c), tv(Tensor::scalar(3i64))]
        )
        .is_err());
        assert!(run(
            &SequenceInsert,
            &[Some(s.clone()), tv(Tensor::scalar(1i64))]
        )
        .is_err());
        let er = run(&SequenceErase, &[Some(s.clone())]).unwrap().remove(0);
        assert_eq!(seq_of(&er), vec![vec![1., 2.]]);
        let er = run(
            &SequenceErase,
            &[Some(s.clone()), tv(Tensor::scalar(-2i64))],
        )
        .unwrap()
        .remove(0);
        assert_eq!(seq_of(&er), vec![vec![3.]]);
        assert!(run(&SequenceErase, &[Some(Value::Sequence(vec![]))]).is_err());
        let len = run(&SequenceLength, &[Some(s)]).unwrap();
        assert_eq!(len[0].as_tensor().unwrap().to_i64_vec().unwrap(), vec![2]);
        // A tensor where a sequence is expected is an error.
        assert!(run(&SequenceLength, &[tv(a.clone())]).is_err());
        // Mixed dtypes.
        assert!(run(&SequenceConstruct, &[tv(a), tv(i64t(&[1], &[1]))]).is_err());
    }

    #[test]
    fn sequence_empty_has_dtype() {
        let op = build(
            build_sequence_empty,
            "SequenceEmpty",
            11,
            vec![("dtype", Attr::Int(7))],
            0,
            1,
        )
        .unwrap();
        let f = op.infer(&[], 1).unwrap();
        assert_eq!(f[0].dtype, Some(DType::I64));
        assert_eq!(f[0].kind, ValueKind::Sequence);
        assert!(run(op.as_ref(), &[]).unwrap()[0]
            .as_sequence()
            .unwrap()
            .is_empty());
        assert!(build(
            build_sequence_empty,
            "SequenceEmpty",
            11,
            vec![("dtype", Attr::Int(99))],
            0,
            1
        )
        .is_err());
    }

    #[test]
    fn concat_from_sequence_axis_and_new_axis() {
        let a = f32t(&[2, 1], &[1., 2.]);
        let b = f32t(&[2, 1], &[3., 4.]);
        let s = Value::Sequence(vec![a, b]);
        let op = build(
            build_concat_from_sequence,
            "ConcatFromSequence",
            11,
            vec![("axis", Attr::Int(-1))],
            1,
            1,
        )
        .unwrap();
        let out = run(op.as_ref(), &[Some(s.clone())]).unwrap();
        let t = out[0].as_tensor().unwrap();
        assert_eq!(t.shape(), &[2, 2]);
        assert_eq!(t.to_f32_vec().unwrap(), vec![1., 3., 2., 4.]);
        let op = build(
            build_concat_from_sequence,
            "ConcatFromSequence",
            11,
            vec![("axis", Attr::Int(-1)), ("new_axis", Attr::Int(1))],
            1,
            1,
        )
        .unwrap();
        let out = run(op.as_ref(), &[Some(s.clone())]).unwrap();
        let t = out[0].as_tensor().unwrap();
        assert_eq!(t.shape(), &[2, 1, 2]);
        assert_eq!(t.to_f32_vec().unwrap(), vec![1., 3., 2., 4.]);
        let f = op
            .infer(
                &[Some(&Fact {
                    kind: ValueKind::Sequence,
                    ..Fact::concrete(DType::F32, &[2, 1])
                })],
                1,
            )
            .unwrap();
        assert_eq!(
            f[0].shape,
            Some(vec![Dim::Known(2), Dim::Known(1), Dim::Unknown])
        );
        assert!(run(op.as_ref(), &[Some(Value::Sequence(vec![]))]).is_err());
        assert!(build(
            build_concat_from_sequence,
            "ConcatFromSequence",
            11,
            vec![],
            1,
            1
        )
        .is_err());
    }

    #[test]
    fn split_to_sequence_variants() {
        let x = f32t(&[3, 2], &[1., 2., 3., 4., 5., 6.]);
        let op = build(build_split_to_sequence, "SplitToSequence", 11, vec![], 1, 1).unwrap();
        let s = run(op.as_ref(), &[tv(x.clone())]).unwrap().remove(0);
        assert_eq!(s.as_sequence().unwrap()[0].shape(), &[1, 2]);
        assert_eq!(seq_of(&s), vec![vec![1., 2.], vec![3., 4.], vec![5., 6.]]);
        let op = build(
            build_split_to_sequence,
            "SplitToSequence",
            11,
            vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))],
            1,
            1,
        )
        .unwrap();
        let s = run(op.as_ref(), &[tv(x.clone())]).unwrap().remove(0);
        assert_eq!(s.as_sequence().unwrap()[1].shape(), &[3]);
        assert_eq!(seq_of(&s), vec![vec![1., 3., 5.], vec![2., 4., 6.]]);
        let op = build(build_split_to_sequence, "SplitToSequence", 11, vec![], 2, 1).unwrap();
        let s = run(op.as_ref(), &[tv(x.clone()), tv(Tensor::scalar(2i64))])
            .unwrap()
            .remove(0);
        assert_eq!(seq_of(&s), vec![vec![1., 2., 3., 4.], vec![5., 6.]]);
        let s = run(op.as_ref(), &[tv(x.clone()), tv(i64t(&[2], &[1, 2]))])
            .unwrap()
            .remove(0);
        assert_eq!(s.as_sequence().unwrap()[1].shape(), &[2, 2]);
        assert!(run(op.as_ref(), &[tv(x.clone()), tv(i64t(&[2], &[1, 1]))]).is_err());
        assert!(run(op.as_ref(), &[tv(x.clone()), tv(Tensor::scalar(0i64))]).is_err());
        assert!(run(op.as_ref(), &[tv(x), tv(i64t(&[2], &[-1, 4]))]).is_err());
    }

    #[test]
    fn sequence_map_with_tensor_and_capture() {
        // body(s, t) = s + t + w (w captured)
        let mut b = GraphBuilder::new("body");
        let s = b.input("s");
        let t = b.input("t");
        let w = b.capture("w");
        let o = b.node(add(), &[s, t], 1)[0];
        let o = b.node(add(), &[o, w], 1)[0];
        b.output(o);
        let body = b.finish();
        let op = build(
            build_sequence_map,
            "SequenceMap",
            17,
            vec![("body", gattr(&body))],
            3,
            1,
        )
        .unwrap();
        let seq = Value::Sequence(vec![f32t(&[2], &[1., 2.]), f32t(&[2], &[3., 4.])]);
        let t = f32t(&[2], &[10., 20.]);
        let w = f32t(&[], &[100.]);
        let out = run(
            op.as_ref(),
            &[Some(seq.clone()), tv(t.clone()), tv(w.clone())],
        )
        .unwrap();
        assert_eq!(seq_of(&out[0]), vec![vec![111., 122.], vec![113., 124.]]);
        // Two sequences of different lengths.
        let short = Value::Sequence(vec![f32t(&[2], &[0., 0.])]);
        assert!(run(op.as_ref(), &[Some(seq), Some(short), tv(w)]).is_err());
        assert_eq!(op.subgraphs().len(), 1);
    }

    #[test]
    fn optionals() {
        let x = f32t(&[1], &[1.]);
        let op = build(build_optional, "Optional", 15, vec![], 1, 1).unwrap();
        let o = run(op.as_ref(), &[tv(x.clone())]).unwrap().remove(0);
        assert!(matches!(o, Value::Optional(Some(_))));
        assert!(run(op.as_ref(), &[None]).is_err());
        let ty = Fact {
            kind: ValueKind::Sequence,
            ..Fact::of_dtype(DType::F32)
        };
        let op = build(
            build_optional,
            "Optional",
            15,
            vec![("type", Attr::Type(ty))],
            0,
            1,
        )
        .unwrap();
        let empty = run(op.as_ref(), &[]).unwrap().remove(0);
        assert!(matches!(empty, Value::Optional(None)));
        assert_eq!(
            op.infer(&[], 1).unwrap()[0].kind,
            ValueKind::OptionalSequence
        );
        let has = |v: Option<Value>| {
            run(&OptionalHasElement, &[v]).unwrap()[0]
                .as_tensor()
                .unwrap()
                .as_bools()
                .unwrap()[0]
        };
        assert!(has(Some(o.clone())));
        assert!(!has(Some(empty.clone())));
        assert!(!has(None));
        assert!(has(tv(x.clone())));
        let got = run(&OptionalGetElement, &[Some(o)]).unwrap().remove(0);
        assert_eq!(got.as_tensor().unwrap().to_f32_vec().unwrap(), vec![1.]);
        assert!(run(&OptionalGetElement, &[Some(empty)]).is_err());
        let got = run(&OptionalGetElement, &[tv(x)]).unwrap().remove(0);
        assert!(got.as_tensor().is_ok());
        let f = OptionalGetElement
            .infer(
                &[Some(&Fact {
                    kind: ValueKind::OptionalSequence,
                    ..Fact::unknown()
                })],
                1,
            )
            .unwrap();
        assert_eq!(f[0].kind, ValueKind::Sequence);
    }
}
