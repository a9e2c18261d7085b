//! INT8: post-training calibration, the portable calibration cache, and lowering layers
//! to INT8 kernels. See `docs/int8.md`.

pub mod budget;
pub mod cache;
pub mod calibrate;
pub mod data;
pub mod gpu;
pub mod histogram;
pub mod lower;
pub mod qdq;
pub mod qdq_pairs;

pub use cache::{Algorithm, CalibCacheError, CalibrationCache};
pub use calibrate::Calibrator;
