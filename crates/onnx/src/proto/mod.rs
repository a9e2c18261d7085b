//! ONNX's protobuf schema as prost types (`onnx-ml.proto` + `onnx-data.proto`).
//!
//! The Rust code in `onnx.rs` is generated once by `crates/onnx/regen-proto.sh` and
//! committed, so building kiln needs no `protoc`.

#![allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]

include!("onnx.rs");
