//! Shape and data-movement ops: Shape, Size, Reshape, Flatten, Squeeze, Unsqueeze,
//! Transpose, Concat, Split, Slice, Expand, Tile, Pad, DepthToSpace, SpaceToDepth,
//! ConstantOfShape, Identity, Dropout, CenterCropPad.
//!
//! Every kernel is written once over element type (all numeric dtypes, bool and string)
//! through [`common::Mover`]; copies are block copies of the innermost contiguous run.
//! Reshape-like ops share the input's data.

use kiln_core::OpRegistry;

pub mod basic;
pub(crate) mod common;
pub mod concat_split;
pub mod expand_tile;
pub mod pad;
pub mod slice;
pub mod transpose;

#[cfg(test)]
mod local_conformance;

#[cfg(test)]
mod bench;

#[cfg(test)]
mod fuzz;

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("Shape", basic::build_shape);
    reg.register("Size", basic::build_size);
    reg.register("Reshape", basic::build_reshape);
    reg.register("Flatten", basic::build_flatten);
    reg.register("Squeeze", basic::build_squeeze);
    reg.register("Unsqueeze", basic::build_unsqueeze);
    reg.register("Identity", basic::build_identity);
    reg.register("ConstantOfShape", basic::build_constant_of_shape);
    reg.register("Dropout", basic::build_dropout);
    reg.register("Transpose", transpose::build_transpose);
    reg.register("DepthToSpace", transpose::build_depth_to_space);
    reg.register("SpaceToDepth", transpose::build_space_to_depth);
    reg.register("Concat", concat_split::build_concat);
    reg.register("Split", concat_split::build_split_n);
    reg.register("Slice", slice::build_slice);
    reg.register("Expand", expand_tile::build_expand);
    reg.register("Tile", expand_tile::build_tile);
    reg.register("Pad", pad::build_pad);
    reg.register("CenterCropPad", pad::build_center_crop_pad);
}
