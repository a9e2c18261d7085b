//! Conversion between the in-memory graph and its serialisable mirror. Ops are stored as
//! their descriptions (type, domain, opset, attributes) and rebuilt through the op registry
//! on load; numeric tensors of 64 bytes or more go to the plan's aligned weights section.

use std::sync::Arc;

use kiln_core::{
    Attr, BuildCtx, Bytes, DType, Fact, Graph, KilnError, Node, OpDesc, OpRegistry, Result, Tensor,
    ValueInfo,
};
use serde::{Deserialize, Serialize};

/// Tensors at least this large are stored in the weights section (mmap'd on load).
const WEIGHT_THRESHOLD: usize = 64;

/// A tensor in the metadata: inline bytes, strings, or a reference into the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TensorRec {
    /// Small numeric tensor stored inline.
    Inline {
        /// Element type.
        dtype: DType,
        /// Shape.
        shape: Vec<usize>,
        /// Raw little-endian bytes.
        bytes: Vec<u8>,
    },
    /// String tensor.
    Strings {
        /// Shape.
        shape: Vec<usize>,
        /// Elements.
        data: Vec<String>,
    },
    /// Numeric tensor in the weights section.
    Weight {
        /// Element type.
        dtype: DType,
        /// Shape.
        shape: Vec<usize>,
        /// Offset from the start of the weights section.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Serialisable attribute.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AttrRec {
    /// Float.
    Float(f32),
    /// Int.
    Int(i64),
    /// String.
    String(String),
    /// Tensor.
    Tensor(TensorRec),
    /// Subgraph.
    Graph(GraphRec),
    /// Type.
    Type(Fact),
    /// Floats.
    Floats(Vec<f32>),
    /// Ints.
    Ints(Vec<i64>),
    /// Strings.
    Strings(Vec<String>),
    /// Tensors.
    Tensors(Vec<TensorRec>),
    /// Subgraphs.
    Graphs(Vec<GraphRec>),
}

/// Serialisable node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRec {
    /// Node name.
    pub name: String,
    /// Domain.
    pub domain: String,
    /// Op type.
    pub op_type: String,
    /// Opset.
    pub opset: i64,
    /// Attributes.
    pub attrs: Vec<(String, AttrRec)>,
    /// Inputs.
    pub inputs: Vec<Option<usize>>,
    /// Outputs.
    pub outputs: Vec<Option<usize>>,
    /// Source nodes fused into this one.
    pub fused_from: Vec<String>,
}

/// Serialisable graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphRec {
    /// Name.
    pub name: String,
    /// Values: name and fact.
    pub values: Vec<(String, Fact)>,
    /// Nodes.
    pub nodes: Vec<NodeRec>,
    /// Inputs.
    pub inputs: Vec<usize>,
    /// Outputs.
    pub outputs: Vec<usize>,
    /// Constants.
    pub constants: Vec<(usize, TensorRec)>,
    /// Captured outer values.
    pub captures: Vec<usize>,
}

/// Collects weights while encoding.
#[derive(Default)]
pub struct WeightWriter {
    /// The weights section being built (each tensor 64-byte aligned).
    pub data: Vec<u8>,
}

impl WeightWriter {
    fn tensor(&mut self, t: &Tensor) -> Result<TensorRec> {
        if t.dtype() == DType::String {
            return Ok(TensorRec::Strings {
                shape: t.shape().to_vec(),
                data: t.as_strings()?.to_vec(),
            });
        }
        let bytes = t.bytes();
        if bytes.len() < WEIGHT_THRESHOLD {
            return Ok(TensorRec::Inline {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                bytes: bytes.to_vec(),
            });
        }
        let offset = self.data.len().div_ceil(64) * 64;
        self.data.resize(offset, 0);
        self.data.extend_from_slice(bytes);
        Ok(TensorRec::Weight {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            offset: offset as u64,
            len: bytes.len() as u64,
        })
    }

    /// Encodes a graph, moving its large tensors into the weights section.
    pub fn graph(&mut self, g: &Graph) -> Result<GraphRec> {
        let mut constants = Vec::with_capacity(g.constants.len());
        for (id, t) in &g.constants {
            constants.push((*id, self.tensor(t)?));
        }
        let mut nodes = Vec::with_capacity(g.nodes.len());
        for n in &g.nodes {
            let mut attrs = Vec::with_capacity(n.desc.attrs.len());
            for (k, a) in &n.desc.attrs {
                attrs.push((k.clone(), self.attr(a)?));
            }
            nodes.push(NodeRec {
                name: n.name.clone(),
                domain: n.desc.domain.clone(),
                op_type: n.desc.op_type.clone(),
                opset: n.desc.opset,
                attrs,
                inputs: n.inputs.clone(),
                outputs: n.outputs.clone(),
                fused_from: n.fused_from.clone(),
            });
        }
        Ok(GraphRec {
            name: g.name.clone(),
            values: g
                .values
                .iter()
                .map(|v| (v.name.clone(), strip_konst(&v.fact)))
                .collect(),
            nodes,
            inputs: g.inputs.clone(),
            outputs: g.outputs.clone(),
            constants,
            captures: g.captures.clone(),
        })
    }

    fn attr(&mut self, a: &Attr) -> Result<AttrRec> {
        Ok(match a {
            Attr::Float(v) => AttrRec::Float(*v),
            Attr::Int(v) => AttrRec::Int(*v),
            Attr::String(v) => AttrRec::String(v.clone()),
            Attr::Tensor(t) => AttrRec::Tensor(self.tensor(t)?),
            Attr::Graph(g) => AttrRec::Graph(self.graph(g)?),
            Attr::Type(f) => AttrRec::Type(strip_konst(f)),
            Attr::Floats(v) => AttrRec::Floats(v.clone()),
            Attr::Ints(v) => AttrRec::Ints(v.clone()),
            Attr::Strings(v) => AttrRec::Strings(v.clone()),
            Attr::Tensors(v) => {
                AttrRec::Tensors(v.iter().map(|t| self.tensor(t)).collect::<Result<_>>()?)
            }
            Attr::Graphs(v) => {
                AttrRec::Graphs(v.iter().map(|g| self.graph(g)).collect::<Result<_>>()?)
            }
        })
    }
}

fn strip_konst(f: &Fact) -> Fact {
    Fact {
        konst: None,
        ..f.clone()
    }
}

/// Rebuilds graphs from their records; weights are views into the mapped plan file.
pub struct GraphReader<'a> {
    /// The op registry.
    pub registry: &'a OpRegistry,
    /// The mapped plan file.
    pub map: Arc<memmap2::Mmap>,
    /// Offset of the weights section in the file.
    pub weights_offset: usize,
    /// Length of the weights section.
    pub weights_len: usize,
}

impl GraphReader<'_> {
    fn tensor(&self, r: &TensorRec) -> Result<Tensor> {
        match r {
            TensorRec::Inline {
                dtype,
                shape,
                bytes,
            } => Tensor::from_bytes(*dtype, shape, bytes),
            TensorRec::Strings { shape, data } => Tensor::from_strings(shape, data.clone()),
            TensorRec::Weight {
                dtype,
                shape,
                offset,
                len,
            } => {
                let (offset, len) = (*offset as usize, *len as usize);
                if offset
                    .checked_add(len)
                    .is_none_or(|end| end > self.weights_len)
                    || offset % 64 != 0
                {
                    return Err(KilnError::InvalidPlan(format!(
                        "weight at offset {offset} ({len} bytes) lies outside the weights section"
                    )));
                }
                let bytes = Bytes::Mapped {
                    map: self.map.clone(),
                    offset: self.weights_offset + offset,
                    len,
                };
                let t = Tensor::from_storage(*dtype, shape, bytes)
                    .map_err(|e| KilnError::InvalidPlan(e.to_string()))?;
                if *dtype == DType::Bool {
                    // Keep the bool invariant (bytes are 0 or 1) even for a hand-edited plan.
                    if t.bytes().iter().any(|b| *b > 1) {
                        return Err(KilnError::InvalidPlan(
                            "bool weight holds a byte other than 0 or 1".into(),
                        ));
                    }
                }
                Ok(t)
            }
        }
    }

    /// Decodes a graph and rebuilds its ops.
    pub fn graph(&self, r: &GraphRec) -> Result<Graph> {
        let n_values = r.values.len();
        let check = |id: usize| -> Result<usize> {
            if id < n_values {
                Ok(id)
            } else {
                Err(KilnError::InvalidPlan(format!(
                    "value index {id} out of range ({n_values} values)"
                )))
            }
        };
        let mut g = Graph {
            name: r.name.clone(),
            values: r
                .values
                .iter()
                .map(|(n, f)| ValueInfo {
                    name: n.clone(),
                    fact: f.clone(),
                })
                .collect(),
            nodes: Vec::with_capacity(r.nodes.len()),
            inputs: r.inputs.iter().map(|&i| check(i)).collect::<Result<_>>()?,
            outputs: r.outputs.iter().map(|&i| check(i)).collect::<Result<_>>()?,
            constants: Default::default(),
            captures: r
                .captures
                .iter()
                .map(|&i| check(i))
                .collect::<Result<_>>()?,
        };
        for (id, t) in &r.constants {
            let t = self.tensor(t)?;
            g.values[check(*id)?].fact = Fact::constant(t.clone());
            g.constants.insert(*id, t);
        }
        for n in &r.nodes {
            for id in n.inputs.iter().chain(n.outputs.iter()).flatten() {
                check(*id)?;
            }
            let mut desc = OpDesc::new(&n.domain, &n.op_type, n.opset);
            for (k, a) in &n.attrs {
                desc.attrs.insert(k.clone(), self.attr(a)?);
            }
            let op = self.registry.build(&BuildCtx {
                node: &n.name,
                desc: &desc,
                n_inputs: n.inputs.len().saturating_sub(desc.capture_count()),
                n_outputs: n.outputs.len(),
            })?;
            g.nodes.push(Node {
                name: n.name.clone(),
                desc,
                op,
                inputs: n.inputs.clone(),
                outputs: n.outputs.clone(),
                fused_from: n.fused_from.clone(),
            });
        }
        Ok(g)
    }

    fn attr(&self, a: &AttrRec) -> Result<Attr> {
        Ok(match a {
            AttrRec::Float(v) => Attr::Float(*v),
            AttrRec::Int(v) => Attr::Int(*v),
            AttrRec::String(v) => Attr::String(v.clone()),
            AttrRec::Tensor(t) => Attr::Tensor(self.tensor(t)?),
            AttrRec::Graph(g) => Attr::Graph(Arc::new(self.graph(g)?)),
            AttrRec::Type(f) => Attr::Type(f.clone()),
            AttrRec::Floats(v) => Attr::Floats(v.clone()),
            AttrRec::Ints(v) => Attr::Ints(v.clone()),
            AttrRec::Strings(v) => Attr::Strings(v.clone()),
            AttrRec::Tensors(v) => {
                Attr::Tensors(v.iter().map(|t| self.tensor(t)).collect::<Result<_>>()?)
            }
            AttrRec::Graphs(v) => Attr::Graphs(
                v.iter()
                    .map(|g| self.graph(g).map(Arc::new))
                    .collect::<Result<_>>()?,
            ),
        })
    }
}
