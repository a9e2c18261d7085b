//! ONNX import (stub until the importer lands).
use kiln_core::{Graph, OpRegistry, Result, KilnError};
use std::collections::BTreeMap;
use std::path::Path;
/// A model.
pub struct Model { /// graph
 pub graph: Graph, /// opsets
 pub opsets: BTreeMap<String, i64> }
/// Loads a model.
pub fn load_model(_path: &Path, _reg: &OpRegistry) -> Result<Model> { Err(KilnError::Other("stub".into())) }
