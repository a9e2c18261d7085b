//! Operator implementations, one module per family. Each module exposes
//! `pub fn register(reg: &mut OpRegistry)`.

use kiln_core::OpRegistry;

pub mod activation;
pub mod attention;
pub mod control_flow;
pub mod conv;
pub mod detection;
pub mod elementwise;
pub mod gather_scatter;
pub mod image;
pub mod int8;
pub mod linalg;
pub mod loss;
pub mod misc;
pub mod ml;
pub mod normalization;
pub mod pool;
pub mod pool_nhwc;
pub mod quantize;
pub mod random;
pub mod reduce;
pub mod rnn;
pub mod sequence;
pub mod shape;
pub mod signal;
pub mod string;

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
    int8::register(reg);
}
