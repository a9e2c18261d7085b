//! Image ops: `Resize`, `Upsample`, `GridSample`, `AffineGrid`, `RoiAlign`, `Col2Im`.

use kiln_core::OpRegistry;

pub mod grid;
pub mod resize;
pub mod roi;

#[cfg(test)]
mod node_cases;

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    resize::register(reg);
    grid::register(reg);
    roi::register(reg);
}
