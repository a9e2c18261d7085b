//! Operator implementations, one module per family. Each module exposes
//! `pub fn register(reg: &mut OpRegistry)`.

use kiln_core::OpRegistry;

pub mod activation;
pub mod elementwise;
pub mod reduce;
pub mod normalization;
pub mod shape;
pub mod gather_scatter;
pub mod control_flow;
pub mod sequence;
pub mod conv;
pub mod pool;
pub mod linalg;
pub mod rnn;
pub mod misc;

/// Registers every op family.
pub fn register_all(reg: &mut OpRegistry) {
    activation::register(reg);
    elementwise::register(reg);
    reduce::register(reg);
    normalization::register(reg);
    shape::register(reg);
    gather_scatter::register(reg);
    control_flow::register(reg);
    sequence::register(reg);
    conv::register(reg);
    pool::register(reg);
    linalg::register(reg);
    rnn::register(reg);
    misc::register(reg);
}
