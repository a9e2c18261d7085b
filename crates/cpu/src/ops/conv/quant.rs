//! TODO

use kiln_core::{BuildCtx, Op, Result};

/// Builds the op.
pub fn build_conv_integer(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Err(ctx.attrs().unsupported("not yet"))
}

/// Builds the op.
pub fn build_qlinear_conv(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Err(ctx.attrs().unsupported("not yet"))
}
