//! kiln-cpu: the CPU backend.
//!
//! Every ONNX operator kiln supports has one struct implementing [`kiln_core::Op`]: its
//! attributes parsed at build time, shape inference (`infer`) and the reference kernel
//! (`eval`). Fast paths (`eval_into` writing into the arena, rayon, packed GEMM) live next
//! to the reference and are tested against it.
//!
//! Ops are grouped by family under [`ops`]; [`registry`] returns a registry that knows
//! all of them.

pub mod dispatch;
pub mod fused;
pub mod ops;
pub mod parallel;
pub mod plan_cache;
pub mod scratch;

use kiln_core::OpRegistry;

/// A registry holding every op this backend implements.
pub fn registry() -> OpRegistry {
    let mut reg = OpRegistry::new();
    ops::register_all(&mut reg);
    reg
}
