//! TODO

use kiln_core::{BuildCtx, Op, Result};

/// Builds the op.
pub fn build_einsum(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Err(ctx.attrs().unsupported("not yet"))
}
