//! What is known about a value before running: kind, dtype, shape (with symbolic dims) and,
//! for constants, the value itself. Shape inference computes facts node by node.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::tensor::Tensor;

/// One dimension of a shape as known at build time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// A known size.
    Known(usize),
    /// A named symbolic size (e.g. `batch`); equal names are equal sizes.
    Sym(String),
    /// Unknown size.
    Unknown,
}

impl Dim {
    /// The size when known.
    pub fn known(&self) -> Option<usize> {
        match self {
            Dim::Known(n) => Some(*n),
            _ => None,
        }
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => write!(f, "{s}"),
            Dim::Unknown => write!(f, "?"),
        }
    }
}

/// The kind of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ValueKind {
    /// A tensor.
    #[default]
    Tensor,
    /// A sequence of tensors (dtype/shape describe the elements).
    Sequence,
    /// An optional (dtype/shape describe the contained tensor).
    Optional,
    /// An optional holding a sequence.
    OptionalSequence,
}

/// Build-time knowledge about a value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Fact {
    /// Tensor, sequence or optional.
    pub kind: ValueKind,
    /// Element dtype, when known.
    pub dtype: Option<DType>,
    /// Shape, when the rank is known.
    pub shape: Option<Vec<Dim>>,
    /// The value itself, when it is a build-time constant.
    #[serde(skip)]
    pub konst: Option<Tensor>,
}

impl Fact {
    /// Nothing known.
    pub fn unknown() -> Fact {
        Fact::default()
    }

    /// A tensor of known dtype and shape.
    pub fn tensor(dtype: DType, shape: Vec<Dim>) -> Fact {
        Fact {
            kind: ValueKind::Tensor,
            dtype: Some(dtype),
            shape: Some(shape),
            konst: None,
        }
    }

    /// A tensor of known dtype and concrete shape.
    pub fn concrete(dtype: DType, shape: &[usize]) -> Fact {
        Fact::tensor(dtype, shape.iter().map(|&d| Dim::Known(d)).collect())
    }

    /// A tensor of known dtype, unknown shape.
    pub fn of_dtype(dtype: DType) -> Fact {
        Fact {
            kind: ValueKind::Tensor,
            dtype: Some(dtype),
            shape: None,
            konst: None,
        }
    }

    /// The fact of a constant tensor.
    pub fn constant(t: Tensor) -> Fact {
        let mut f = Fact::concrete(t.dtype(), t.shape());
        f.konst = Some(t);
        f
    }

    /// The concrete shape, when every dim is known.
    pub fn concrete_shape(&self) -> Option<Vec<usize>> {
        self.shape.as_ref()?.iter().map(|d| d.known()).collect()
    }

    /// Rank, when known.
    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.len())
    }

    /// True when this is a tensor of fully known dtype and shape.
    pub fn is_static_tensor(&self) -> bool {
        self.kind == ValueKind::Tensor
            && self.dtype.is_some_and(|d| d != DType::String)
            && self.concrete_shape().is_some()
    }

    /// Human-readable `f32[1,3,?,batch]`.
    pub fn describe(&self) -> String {
        let dt = self
            .dtype
            .map(|d| d.name().to_string())
            .unwrap_or_else(|| "?".into());
        let shape = match &self.shape {
            Some(s) => format!(
                "[{}]",
                s.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            None => "[..]".to_string(),
        };
        let kind = match self.kind {
            ValueKind::Tensor => "",
            ValueKind::Sequence => "seq ",
            ValueKind::Optional => "opt ",
            ValueKind::OptionalSequence => "opt seq ",
        };
        format!("{kind}{dt}{shape}")
    }
}

/// Numpy-style broadcasting of two symbolic shapes. Returns `None` when they cannot
/// broadcast (two different known sizes, neither 1).
pub fn broadcast_dims(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            &a[i + a.len() - rank]
        } else {
            &Dim::Known(1)
        };
        let db = if i + b.len() >= rank {
            &b[i + b.len() - rank]
        } else {
            &Dim::Known(1)
        };
        let d = match (da, db) {
            (Dim::Known(1), x) | (x, Dim::Known(1)) => x.clone(),
            (Dim::Known(x), Dim::Known(y)) if x == y => Dim::Known(*x),
            (Dim::Known(_), Dim::Known(_)) => return None,
            (Dim::Sym(x), Dim::Sym(y)) if x == y => Dim::Sym(x.clone()),
            (Dim::Known(x), _) | (_, Dim::Known(x)) => Dim::Known(*x),
            _ => Dim::Unknown,
        };
        out.push(d);
    }
    Some(out)
}

/// Numpy-style broadcasting of concrete shapes, `None` when incompatible.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}
