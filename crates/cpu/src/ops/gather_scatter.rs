//! Indexing ops: Gather, GatherElements, GatherND, ScatterElements, Scatter, ScatterND,
//! TensorScatter, Compress, NonZero, TopK, Unique.

use kiln_core::OpRegistry;

pub mod gather;
pub mod scatter;
pub mod select;

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("Gather", gather::build_gather);
    reg.register("GatherElements", gather::build_gather_elements);
    reg.register("GatherND", gather::build_gather_nd);
    reg.register("ScatterElements", scatter::build_scatter_elements);
    reg.register("Scatter", scatter::build_scatter);
    reg.register("ScatterND", scatter::build_scatter_nd);
    reg.register("TensorScatter", scatter::build_tensor_scatter);
    reg.register("Compress", select::build_compress);
    reg.register("NonZero", select::build_non_zero);
    reg.register("TopK", select::build_top_k);
    reg.register("Unique", select::build_unique);
}
