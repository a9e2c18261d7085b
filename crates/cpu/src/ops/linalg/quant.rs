//! TODO

use kiln_core::{BuildCtx, Op, Result};

/// Builds the op.
pub fn build_matmul_integer(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Err(ctx.attrs().unsupported("not yet"))
}

/// Builds the op.
pub fn build_qlinear_matmul(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Err(ctx.attrs().unsupported("not yet"))
}
