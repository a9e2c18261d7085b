//! Tactics: the alternative implementations one op can run a layer with.
//!
//! An op lists its tactics for concrete input facts ([`crate::Op::tactics`]); the builder's
//! tuner times them on the device and records the winner in the node's description under
//! [`TACTIC_ATTR`], so the choice travels in the plan and the op's builder reads it back.
//! A node without the attribute runs the op's own heuristic choice.

use serde::{Deserialize, Serialize};

/// Attribute (string) naming the tactic a node was tuned to.
pub const TACTIC_ATTR: &str = "kiln_tactic";
/// Attribute (float) holding the tuned tactic's measured median time in milliseconds.
pub const TACTIC_TIME_ATTR: &str = "kiln_tactic_ms";

/// Numeric precision a tactic computes and stores its activations in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Precision {
    /// 32-bit float.
    Fp32,
    /// 16-bit float (IEEE half).
    Fp16,
    /// 8-bit integer (quantized).
    Int8,
}

impl Precision {
    /// Lower-case name (`fp32`, `fp16`, `int8`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
        }
    }

    /// Parses `fp32`, `fp16` or `int8` (case-insensitive).
    pub fn parse(s: &str) -> Option<Precision> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Some(Precision::Fp32),
            "fp16" | "f16" | "float16" | "half" => Some(Precision::Fp16),
            "int8" | "i8" => Some(Precision::Int8),
            _ => None,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Memory layout of a tactic's activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Layout {
    /// Plain row-major (NCHW for images): what ONNX specifies.
    Linear,
    /// Channels last (NHWC).
    ChannelsLast,
}

impl Layout {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Linear => "linear",
            Layout::ChannelsLast => "nhwc",
        }
    }
}

/// The format a tensor is stored in between two layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Format {
    /// Element precision.
    pub precision: Precision,
    /// Memory layout.
    pub layout: Layout,
}

impl Format {
    /// FP32 in ONNX's own layout: the format of engine inputs and outputs.
    pub const FP32_LINEAR: Format = Format {
        precision: Precision::Fp32,
        layout: Layout::Linear,
    };
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.precision, self.layout.name())
    }
}

/// One candidate implementation of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tactic {
    /// Stable id, e.g. `cpu.conv.im2col_gemm.t65536`; what the plan and timing cache store.
    pub id: String,
    /// The format this tactic reads its activation inputs and writes its outputs in.
    pub format: Format,
    /// The lowest builder optimisation level that considers this tactic (1 = always timed;
    /// higher levels time more candidates).
    pub min_level: u8,
}

impl Tactic {
    /// An FP32, linear-layout tactic considered from optimisation level `min_level`.
    pub fn fp32(id: impl Into<String>, min_level: u8) -> Tactic {
        Tactic {
            id: id.into(),
            format: Format::FP32_LINEAR,
            min_level,
        }
    }
}
