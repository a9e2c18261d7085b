//! Operator implementations, one module per family. Each module exposes
//! `pub fn register(reg: &mut OpRegistry)`.

use kiln_core::OpRegistry;

pub mod activation;
pub mod elementwise;
pub mod reduce;
pub mod normalization;
pub mod quantize;
pub mod loss;
pub mod shape;
pub mod gather_scatter;
pub mod misc;
pub mod control_flow;
pub mod sequence;
pub mod string;
pub mod random;
pub mod signal;
pub mod ml;
pub mod conv;
pub mod pool;
pub mod linalg;
pub mod rnn;
pub mod image;
pub mod detection;
pub mod attention;

/// Registers every op family.
pub fn register_all(reg: &mut OpRegistry) {
    activation::register(reg);
    elementwise::register(reg);
    reduce::register(reg);
    normalization::register(reg);
    quantize::register(reg);
    loss::register(reg);
    shape::register(reg);
    gather_scatter::register(reg);
    misc::register(reg);
    control_flow::register(reg);
    sequence::register(reg);
    string::register(reg);
    random::register(reg);
    signal::register(reg);
    ml::register(reg);
    conv::register(reg);
    pool::register(reg);
    linalg::register(reg);
    rnn::register(reg);
    image::register(reg);
    detection::register(reg);
    attention::register(reg);
}
