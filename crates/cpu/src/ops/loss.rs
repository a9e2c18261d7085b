//! loss ops.

use kiln_core::OpRegistry;

/// Registers this family's ops.
pub fn register(_reg: &mut OpRegistry) {}
