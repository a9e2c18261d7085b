//! TODO

use kiln_core::{BuildCtx, Op, Result};

/// Builds the op.
pub fn build_deform_conv(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Err(ctx.attrs().unsupported("not yet"))
}
