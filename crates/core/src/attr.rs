//! Node attributes and the description of an op (what a plan stores to rebuild it).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::{KilnError, Result};
use crate::fact::Fact;
use crate::graph::Graph;
use crate::tensor::Tensor;

/// One attribute value, as in ONNX's `AttributeProto`.
#[derive(Debug, Clone)]
pub enum Attr {
    /// A float.
    Float(f32),
    /// An integer.
    Int(i64),
    /// A string (ONNX strings are bytes; kiln keeps them as text, lossily decoded).
    String(String),
    /// A tensor.
    Tensor(Tensor),
    /// A subgraph (`If` branches, `Loop`/`Scan` bodies).
    Graph(Arc<Graph>),
    /// A type (the `type` attribute of `Optional`).
    Type(Fact),
    /// A list of floats.
    Floats(Vec<f32>),
    /// A list of integers.
    Ints(Vec<i64>),
    /// A list of strings.
    Strings(Vec<String>),
    /// A list of tensors.
    Tensors(Vec<Tensor>),
    /// A list of subgraphs.
    Graphs(Vec<Arc<Graph>>),
}

/// Everything needed to build an op again: its type, domain, opset and attributes.
/// Plans store this, so loading a plan re-creates ops without the ONNX file.
#[derive(Debug, Clone)]
pub struct OpDesc {
    /// Operator domain ("" for `ai.onnx`, "kiln" for kiln's fused ops).
    pub domain: String,
    /// Operator type (`Conv`, `kiln.FusedConv`, ...).
    pub op_type: String,
    /// The opset version imported for the domain.
    pub opset: i64,
    /// Attributes by name.
    pub attrs: BTreeMap<String, Attr>,
}

impl OpDesc {
    /// How many trailing node inputs are captured outer values rather than formal inputs.
    /// All subgraph attributes of one node share one capture list (the importer's
    /// contract), so this is the capture count of the first subgraph attribute.
    pub fn capture_count(&self) -> usize {
        self.attrs
            .values()
            .find_map(|a| match a {
                Attr::Graph(g) => Some(g.captures.len()),
                Attr::Graphs(gs) => gs.first().map(|g| g.captures.len()),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// A description with no attributes.
    pub fn new(domain: &str, op_type: &str, opset: i64) -> Self {
        OpDesc {
            domain: domain.into(),
            op_type: op_type.into(),
            opset,
            attrs: BTreeMap::new(),
        }
    }
}

/// Typed access to a node's attributes, with errors that name the node.
pub struct AttrReader<'a> {
    /// The node's name.
    pub node: &'a str,
    /// The op description.
    pub desc: &'a OpDesc,
}

impl<'a> AttrReader<'a> {
    fn err(&self, msg: String) -> KilnError {
        KilnError::InvalidNode {
            node: self.node.into(),
            op: self.desc.op_type.clone(),
            msg,
        }
    }

    fn get(&self, name: &str) -> Option<&'a Attr> {
        self.desc.attrs.get(name)
    }

    /// True when the attribute is present.
    pub fn has(&self, name: &str) -> bool {
        self.desc.attrs.contains_key(name)
    }

    /// An integer attribute, or `default`.
    pub fn int(&self, name: &str, default: i64) -> Result<i64> {
        Ok(self.opt_int(name)?.unwrap_or(default))
    }

    /// An integer attribute if present.
    pub fn opt_int(&self, name: &str) -> Result<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Int(v)) => Ok(Some(*v)),
            Some(other) => Err(self.err(format!(
                "attribute {name} should be an int, found {other:?}"
            ))),
        }
    }

    /// A required integer attribute.
    pub fn req_int(&self, name: &str) -> Result<i64> {
        self.opt_int(name)?
            .ok_or_else(|| self.err(format!("required attribute {name} is missing")))
    }

    /// A float attribute, or `default`.
    pub fn float(&self, name: &str, default: f32) -> Result<f32> {
        Ok(self.opt_float(name)?.unwrap_or(default))
    }

    /// A float attribute if present (ints are accepted and converted).
    pub fn opt_float(&self, name: &str) -> Result<Option<f32>> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Float(v)) => Ok(Some(*v)),
            Some(Attr::Int(v)) => Ok(Some(*v as f32)),
            Some(other) => Err(self.err(format!(
                "attribute {name} should be a float, found {other:?}"
            ))),
        }
    }

    /// A string attribute, or `default`.
    pub fn string(&self, name: &str, default: &str) -> Result<String> {
        Ok(self
            .opt_string(name)?
            .unwrap_or_else(|| default.to_string()))
    }

    /// A string attribute if present.
    pub fn opt_string(&self, name: &str) -> Result<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::String(v)) => Ok(Some(v.clone())),
            Some(other) => Err(self.err(format!(
                "attribute {name} should be a string, found {other:?}"
            ))),
        }
    }

    /// An int-list attribute if present.
    pub fn opt_ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Ints(v)) => Ok(Some(v.clone())),
            Some(Attr::Int(v)) => Ok(Some(vec![*v])),
            Some(other) => Err(self.err(format!(
                "attribute {name} should be a list of ints, found {other:?}"
            ))),
        }
    }

    /// An int-list attribute, or an empty list.
    pub fn ints(&self, name: &str) -> Result<Vec<i64>> {
        Ok(self.opt_ints(name)?.unwrap_or_default())
    }

    /// A float-list attribute if present.
    pub fn opt_floats(&self, name: &str) -> Result<Option<Vec<f32>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Floats(v)) => Ok(Some(v.clone())),
            Some(Attr::Float(v)) => Ok(Some(vec![*v])),
            Some(other) => Err(self.err(format!(
                "attribute {name} should be a list of floats, found {other:?}"
            ))),
        }
    }

    /// A string-list attribute if present.
    pub fn opt_strings(&self, name: &str) -> Result<Option<Vec<String>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Strings(v)) => Ok(Some(v.clone())),
            Some(other) => Err(self.err(format!(
                "attribute {name} should be a list of strings, found {other:?}"
            ))),
        }
    }

    /// A tensor attribute if present.
    pub fn opt_tensor(&self, name: &str) -> Result<Option<Tensor>> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Tensor(v)) => Ok(Some(v.clone())),
            Some(other) => Err(self.err(format!(
                "attribute {name} should be a tensor, found {other:?}"
            ))),
        }
    }

    /// A required subgraph attribute.
    pub fn graph(&self, name: &str) -> Result<Arc<Graph>> {
        match self.get(name) {
            Some(Attr::Graph(g)) => Ok(g.clone()),
            None => Err(self.err(format!("required graph attribute {name} is missing"))),
            Some(other) => Err(self.err(format!(
                "attribute {name} should be a graph, found {other:?}"
            ))),
        }
    }

    /// A type attribute if present.
    pub fn opt_type(&self, name: &str) -> Result<Option<Fact>> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Type(f)) => Ok(Some(f.clone())),
            Some(other) => Err(self.err(format!(
                "attribute {name} should be a type, found {other:?}"
            ))),
        }
    }

    /// An error for an attribute value kiln does not support, naming the node.
    pub fn unsupported(&self, detail: impl Into<String>) -> KilnError {
        KilnError::UnsupportedOp {
            op: self.desc.op_type.clone(),
            opset: self.desc.opset,
            node: self.node.into(),
            detail: detail.into(),
        }
    }

    /// An error for an invalid attribute combination, naming the node.
    pub fn invalid(&self, msg: impl Into<String>) -> KilnError {
        self.err(msg.into())
    }
}
