//! The one error type of kiln's core, shared by every crate of the workspace.

use crate::dtype::DType;

/// Everything that can go wrong while importing, building or running a model.
///
/// Each variant names the thing that was wrong (node, tensor, file field) and what was
/// expected, so a user can act on the message without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum KilnError {
    /// The model file could not be decoded (truncated, not ONNX, bad protobuf).
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// An operator kiln has no implementation for.
    #[error("unsupported operator {op} (opset {opset}) at node {node}{}", if .detail.is_empty() { String::new() } else { format!(": {}", .detail) })]
    UnsupportedOp {
        /// Op type as written in the model, with its domain when not the default one.
        op: String,
        /// The opset version the model imports for the op's domain.
        opset: i64,
        /// Node name (or a synthesized one when the model left it empty).
        node: String,
        /// Extra context (an unsupported attribute value, say); may be empty.
        detail: String,
    },
    /// A node whose attributes or inputs break the ONNX spec.
    #[error("node {node} ({op}): {msg}")]
    InvalidNode {
        /// Node name.
        node: String,
        /// Op type.
        op: String,
        /// What was wrong.
        msg: String,
    },
    /// Shape or type inference failed.
    #[error("shape inference failed at node {node} ({op}): {msg}")]
    Inference {
        /// Node name.
        node: String,
        /// Op type.
        op: String,
        /// What was wrong.
        msg: String,
    },
    /// A kernel failed at run time (bad shapes reaching it, an index out of range, ...).
    #[error("{op} failed{}: {msg}", if .node.is_empty() { String::new() } else { format!(" at node {}", .node) })]
    Kernel {
        /// Node name (empty when the kernel runs outside a graph).
        node: String,
        /// Op type.
        op: String,
        /// What was wrong.
        msg: String,
    },
    /// An input given by the user does not fit the model.
    #[error("input {name}: {msg}")]
    BadInput {
        /// Input tensor name.
        name: String,
        /// What was expected and what was found.
        msg: String,
    },
    /// An input shape outside the active optimization profile's range.
    #[error("input {name}: dimension {axis} is {found}, outside optimization profile {profile}, which allows {min}..={max} for it ({context})")]
    ShapeOutsideProfile {
        /// Input tensor name.
        name: String,
        /// Index of the active optimization profile.
        profile: usize,
        /// The first dimension (axis) outside the range.
        axis: usize,
        /// Smallest value the profile allows for that dimension.
        min: usize,
        /// Largest value the profile allows for that dimension.
        max: usize,
        /// The value found.
        found: usize,
        /// The profile's whole range and the shape given, e.g.
        /// `profile range 1x3x64x64 to 1x3x256x256, shape given 1x3x320x96`.
        context: String,
    },
    /// A dtype that an op or a file format does not accept.
    #[error("unsupported dtype {dtype} for {context}")]
    UnsupportedDType {
        /// The dtype found.
        dtype: DType,
        /// Where it was found.
        context: String,
    },
    /// A plan file that cannot be loaded (wrong magic, version, device, checksum).
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    /// Input/output errors, with the path that failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Anything else, with a message.
    #[error("{0}")]
    Other(String),
}

/// kiln's result type.
pub type Result<T, E = KilnError> = std::result::Result<T, E>;

impl KilnError {
    /// A kernel error without node context; the executor adds the node later.
    pub fn kernel(op: &str, msg: impl Into<String>) -> Self {
        KilnError::Kernel {
            node: String::new(),
            op: op.to_string(),
            msg: msg.into(),
        }
    }

    /// Attaches a node name to kernel/inference errors raised without one.
    pub fn at_node(self, node_name: &str) -> Self {
        match self {
            KilnError::Kernel { node, op, msg } if node.is_empty() => KilnError::Kernel {
                node: node_name.to_string(),
                op,
                msg,
            },
            KilnError::Inference { node, op, msg } if node.is_empty() => KilnError::Inference {
                node: node_name.to_string(),
                op,
                msg,
            },
            KilnError::InvalidNode { node, op, msg } if node.is_empty() => KilnError::InvalidNode {
                node: node_name.to_string(),
                op,
                msg,
            },
            other => other,
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        KilnError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// Returns early with a [`KilnError::Kernel`] built from a format string.
#[macro_export]
macro_rules! bail_kernel {
    ($op:expr, $($arg:tt)*) => {
        return Err($crate::KilnError::kernel($op, format!($($arg)*)))
    };
}
