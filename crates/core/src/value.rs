//! Runtime values: tensors, sequences of tensors, optionals.

use crate::error::{KilnError, Result};
use crate::tensor::Tensor;

/// A value flowing along a graph edge.
#[derive(Clone, Debug)]
pub enum Value {
    /// A tensor (the common case).
    Tensor(Tensor),
    /// An ONNX sequence of tensors.
    Sequence(Vec<Tensor>),
    /// An ONNX optional: `None` or one value.
    Optional(Option<Box<Value>>),
}

impl Value {
    /// The tensor, or an error naming what was found instead.
    pub fn as_tensor(&self) -> Result<&Tensor> {
        match self {
            Value::Tensor(t) => Ok(t),
            other => Err(KilnError::Other(format!(
                "expected a tensor, found {}",
                other.kind_name()
            ))),
        }
    }

    /// The sequence, or an error naming what was found instead.
    pub fn as_sequence(&self) -> Result<&[Tensor]> {
        match self {
            Value::Sequence(s) => Ok(s),
            other => Err(KilnError::Other(format!(
                "expected a sequence, found {}",
                other.kind_name()
            ))),
        }
    }

    /// Consumes the value into its tensor.
    pub fn into_tensor(self) -> Result<Tensor> {
        match self {
            Value::Tensor(t) => Ok(t),
            other => Err(KilnError::Other(format!(
                "expected a tensor, found {}",
                other.kind_name()
            ))),
        }
    }

    /// "tensor", "sequence" or "optional".
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Tensor(_) => "tensor",
            Value::Sequence(_) => "sequence",
            Value::Optional(_) => "optional",
        }
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::Tensor(t)
    }
}

/// The `i`-th input as a tensor; errors name the op and the input index when it is missing.
pub fn input_tensor<'a>(inputs: &[Option<&'a Value>], i: usize, op: &str) -> Result<&'a Tensor> {
    match inputs.get(i).copied().flatten() {
        Some(v) => v
            .as_tensor()
            .map_err(|e| KilnError::kernel(op, format!("input {i}: {e}"))),
        None => Err(KilnError::kernel(
            op,
            format!("required input {i} is missing"),
        )),
    }
}

/// The `i`-th input as a tensor if present (ONNX optional inputs are empty names).
pub fn optional_tensor<'a>(
    inputs: &[Option<&'a Value>],
    i: usize,
    op: &str,
) -> Result<Option<&'a Tensor>> {
    match inputs.get(i).copied().flatten() {
        Some(v) => v
            .as_tensor()
            .map(Some)
            .map_err(|e| KilnError::kernel(op, format!("input {i}: {e}"))),
        None => Ok(None),
    }
}
