//! ONNX import: reads an `.onnx` file (protobuf) into kiln's graph IR.
//!
//! - [`load_model`] / [`parse_model`]: a whole model, ops built through an [`OpRegistry`].
//! - [`tensor_from_proto`]: one `TensorProto` (raw, typed or external data).
//! - [`read_value_pb`], [`parse_tensor_pb`], [`parse_sequence_pb`], [`parse_optional_pb`]:
//!   the `input_K.pb` / `output_K.pb` files of ONNX's backend tests.
//!
//! # How a model maps to kiln's IR
//!
//! - Every graph input, initializer and node output is a value. Initializers are
//!   [`Graph::constants`]; a graph input that also has an initializer is a constant, not an
//!   input (ONNX Runtime's default for IR ≥ 4). `Constant` nodes (every `value*` form,
//!   sparse included) become constants too and do not appear as nodes.
//! - Declared types (graph inputs/outputs, `value_info`) seed the value facts: element
//!   dtype, dims (`dim_value` → [`Dim::Known`](kiln_core::Dim), `dim_param` → `Sym`,
//!   neither → `Unknown`), sequence/optional kinds.
//! - Node op types keep their domain (`ai.onnx` is normalised to `""`); the opset is the
//!   model's `opset_import` version for that domain (the default domain's when missing).
//!   Empty node names become `<OpType>_<index>`. Omitted optional inputs/outputs (`""`)
//!   are `None`.
//! - Subgraphs (`If`, `Loop`, `Scan`, ...) are imported recursively. A name a subgraph
//!   reads from an enclosing graph is either copied in as a constant (when it is a
//!   constant there) or becomes one of the subgraph's [`Graph::captures`]. **All subgraph
//!   attributes of one node share the same capture list** (same names, same order; a
//!   branch that does not use some capture still lists it), and the owning node gets those
//!   outer values appended to its inputs after its formal inputs. So at run time an op
//!   finds the captures of any of its subgraphs `g` as the last `g.captures.len()` inputs,
//!   and [`BuildCtx::n_inputs`](kiln_core::BuildCtx) counts only the formal inputs.
//!   Captures propagate through any depth of nesting.
//! - Model-local functions (`ModelProto.functions`) that the registry does not implement
//!   are inlined at their call sites (attribute references resolved from the call or the
//!   function's defaults); the inlined nodes use the model's opsets, and domains only the
//!   functions import are added to [`Model::opsets`].
//! - After building, nodes are sorted topologically (ONNX requires the order, kiln is
//!   lenient) and [`Graph::infer_facts`] runs. **Inference errors are not fatal at
//!   import**: they are logged and kept in [`Model::warnings`], since a model that the
//!   interpreter can run should still load; engines that plan memory re-run inference and
//!   decide. Structural errors (values nothing defines, cycles, values defined twice) are
//!   [`KilnError::InvalidModel`].

mod functions;
mod import;
pub mod proto;
mod tensor;

use std::collections::BTreeMap;
use std::path::Path;

use kiln_core::{Fact, Graph, KilnError, OpRegistry, Result};
use prost::Message;

pub use import::fact_from_type;
pub use tensor::{
    dtype_from_onnx, onnx_dtype_name, optional_to_value, parse_optional_pb, parse_sequence_pb,
    parse_tensor_pb, read_value_pb, sequence_to_value, sparse_to_dense, tensor_from_proto,
};

/// A declared graph input or output: its name and the type the model gives it.
#[derive(Debug, Clone)]
pub struct IoInfo {
    /// The value's name.
    pub name: String,
    /// The declared type (kind, dtype, shape), before any inference.
    pub fact: Fact,
}

/// An imported model.
#[derive(Debug, Clone)]
pub struct Model {
    /// The main graph, ops built, sorted and with inferred facts.
    pub graph: Graph,
    /// Imported opsets by domain (`""` is the default ONNX domain).
    pub opsets: BTreeMap<String, i64>,
    /// The model's IR version.
    pub ir_version: i64,
    /// `producer_name` (e.g. `pytorch`).
    pub producer: String,
    /// `producer_version`.
    pub producer_version: String,
    /// The model's own domain (`ModelProto.domain`).
    pub domain: String,
    /// `model_version`.
    pub model_version: i64,
    /// `doc_string`.
    pub doc_string: String,
    /// `metadata_props`.
    pub metadata: BTreeMap<String, String>,
    /// Graph inputs fed by the caller (initializers excluded), as declared, in order.
    pub inputs: Vec<IoInfo>,
    /// Graph outputs as declared, in order.
    pub outputs: Vec<IoInfo>,
    /// Non-fatal problems found while importing (shape inference failures, ...).
    pub warnings: Vec<String>,
}

/// Loads an ONNX model file. External data is looked up next to the file.
pub fn load_model(path: &Path, reg: &OpRegistry) -> Result<Model> {
    let bytes = std::fs::read(path).map_err(|e| KilnError::io(path, e))?;
    parse_model(&bytes, path.parent(), reg)
}

/// Parses a serialized ONNX model. `base_dir` is the directory external data paths are
/// relative to (`None`: external data is refused).
pub fn parse_model(bytes: &[u8], base_dir: Option<&Path>, reg: &OpRegistry) -> Result<Model> {
    let m = proto::ModelProto::decode(bytes).map_err(|e| {
        KilnError::InvalidModel(format!("not an ONNX model: protobuf decode failed: {e}"))
    })?;
    import_model(&m, base_dir, reg)
}

/// Imports a decoded `ModelProto`.
pub fn import_model(
    m: &proto::ModelProto,
    base_dir: Option<&Path>,
    reg: &OpRegistry,
) -> Result<Model> {
    let g = match &m.graph {
        Some(g) => g,
        None if m.ir_version.is_none() && m.opset_import.is_empty() => {
            return Err(KilnError::InvalidModel(
                "not an ONNX model: no ir_version, opset_import or graph found".into(),
            ))
        }
        None => return Err(KilnError::InvalidModel("model has no graph".into())),
    };
    if g.node.is_empty() && g.output.is_empty() {
        return Err(KilnError::InvalidModel(
            "model graph is empty (no nodes, no outputs)".into(),
        ));
    }
    if g.output.is_empty() {
        return Err(KilnError::InvalidModel("model graph has no outputs".into()));
    }
    let mut opsets = BTreeMap::new();
    for o in &m.opset_import {
        let domain = kiln_core::op::normalize_domain(o.domain()).to_string();
        opsets.insert(domain, o.version());
    }
    // Model-local functions are inlined; their own opset imports fill in missing domains.
    let mut funcs = functions::Functions::new(m, reg);
    let inlined;
    let body = if funcs.is_empty() {
        g
    } else {
        for f in &m.functions {
            for o in &f.opset_import {
                let domain = kiln_core::op::normalize_domain(o.domain()).to_string();
                opsets.entry(domain).or_insert(o.version());
            }
        }
        inlined = funcs.inline_graph(g)?;
        &inlined
    };
    let mut imp = import::Importer {
        reg,
        opsets: &opsets,
        base_dir,
        warnings: Vec::new(),
    };
    let graph = imp.import_graph(body, None)?;
    let initializers: std::collections::HashSet<&str> = g
        .initializer
        .iter()
        .map(|t| t.name())
        .chain(
            g.sparse_initializer
                .iter()
                .filter_map(|s| s.values.as_ref().map(|v| v.name())),
        )
        .collect();
    let io = |vi: &proto::ValueInfoProto| IoInfo {
        name: vi.name().to_string(),
        fact: vi
            .r#type
            .as_ref()
            .and_then(|t| fact_from_type(t, vi.name()).ok())
            .unwrap_or_default(),
    };
    Ok(Model {
        graph,
        ir_version: m.ir_version(),
        producer: m.producer_name().to_string(),
        producer_version: m.producer_version().to_string(),
        domain: m.domain().to_string(),
        model_version: m.model_version(),
        doc_string: m.doc_string().to_string(),
        metadata: m
            .metadata_props
            .iter()
            .map(|kv| (kv.key().to_string(), kv.value().to_string()))
            .collect(),
        inputs: g
            .input
            .iter()
            .filter(|vi| !initializers.contains(vi.name()))
            .map(io)
            .collect(),
        outputs: g.output.iter().map(io).collect(),
        warnings: imp.warnings,
        opsets,
    })
}

#[cfg(test)]
mod tests;
