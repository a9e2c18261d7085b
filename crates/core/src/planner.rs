//! Activation memory planning.
