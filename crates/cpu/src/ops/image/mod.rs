//! Image ops: `Resize`, `Upsample`, `GridSample`, `AffineGrid`, `RoiAlign`, `Col2Im`.

use kiln_core::OpRegistry;

pub mod resize;

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    resize::register(reg);
}
