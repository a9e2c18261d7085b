//! TODO

use kiln_core::{BuildCtx, Op, Result};

/// Builds the op.
pub fn build_det(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Err(ctx.attrs().unsupported("not yet"))
}
