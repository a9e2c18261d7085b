//! `GraphProto` to [`kiln_core::Graph`]: values, constants, nodes, subgraphs and captures.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use kiln_core::op::normalize_domain;
use kiln_core::{
    Attr, BuildCtx, Dim, Fact, Graph, KilnError, Node, OpDesc, OpRegistry, Result, Tensor, ValueId,
    ValueKind,
};

use crate::proto::{self, attribute_proto::AttributeType, type_proto};
use crate::tensor::{dtype_from_onnx, sparse_to_dense, tensor_from_proto};

/// Converts a `TypeProto` to a [`Fact`] (kind, element dtype, shape with symbolic dims).
///
/// `what` names the value for error messages. Map, sparse and opaque types, and element
/// types kiln does not support, are errors; callers that only want hints (`value_info`)
/// ignore them.
pub fn fact_from_type(tp: &proto::TypeProto, what: &str) -> Result<Fact> {
    match &tp.value {
        None => Ok(Fact::unknown()),
        Some(type_proto::Value::TensorType(t)) => {
            let dtype = match t.elem_type() {
                0 => None,
                code => Some(dtype_from_onnx(code, what)?),
            };
            let shape = t
                .shape
                .as_ref()
                .map(|s| s.dim.iter().map(dim_from_proto).collect());
            Ok(Fact {
                kind: ValueKind::Tensor,
                dtype,
                shape,
                konst: None,
            })
        }
        Some(type_proto::Value::SequenceType(s)) => {
            let inner = match &s.elem_type {
                Some(e) => fact_from_type(e, what)?,
                None => Fact::unknown(),
            };
            if inner.kind != ValueKind::Tensor {
                return Err(KilnError::Other(format!(
                    "{what}: sequences of non-tensors are not supported"
                )));
            }
            Ok(Fact {
                kind: ValueKind::Sequence,
                ..inner
            })
        }
        Some(type_proto::Value::OptionalType(o)) => {
            let inner = match &o.elem_type {
                Some(e) => fact_from_type(e, what)?,
                None => Fact::unknown(),
            };
            let kind = match inner.kind {
                ValueKind::Tensor => ValueKind::Optional,
                ValueKind::Sequence => ValueKind::OptionalSequence,
                _ => {
                    return Err(KilnError::Other(format!(
                        "{what}: nested optionals are not supported"
                    )))
                }
            };
            Ok(Fact { kind, ..inner })
        }
        Some(type_proto::Value::MapType(_)) => Err(KilnError::Other(format!(
            "{what}: map types are not supported"
        ))),
        Some(type_proto::Value::SparseTensorType(_)) => Err(KilnError::Other(format!(
            "{what}: sparse tensor types are not supported"
        ))),
        Some(type_proto::Value::OpaqueType(_)) => Err(KilnError::Other(format!(
            "{what}: opaque types are not supported"
        ))),
    }
}

fn dim_from_proto(d: &proto::tensor_shape_proto::Dimension) -> Dim {
    use proto::tensor_shape_proto::dimension::Value as V;
    match &d.value {
        Some(V::DimValue(v)) if *v >= 0 => {
            usize::try_from(*v).map(Dim::Known).unwrap_or(Dim::Unknown)
        }
        Some(V::DimParam(p)) if !p.is_empty() => Dim::Sym(p.clone()),
        _ => Dim::Unknown,
    }
}

/// The declared fact of a graph input/output; errors name the value.
fn io_fact(vi: &proto::ValueInfoProto, role: &str) -> Result<Fact> {
    match &vi.r#type {
        Some(tp) => fact_from_type(tp, &format!("{role} {}", vi.name())),
        None => Ok(Fact::unknown()),
    }
}

/// What an enclosing graph offers to the subgraphs of its nodes.
pub(crate) struct Scope<'p> {
    parent: Option<&'p Scope<'p>>,
    /// Every name defined in this graph (inputs, initializers, node outputs, captures).
    names: HashSet<String>,
    /// The subset of names that are constants, with their values.
    constants: HashMap<String, Tensor>,
    /// Declared facts (inputs, value_info, outputs).
    declared: HashMap<String, Fact>,
}

/// How a subgraph sees a name it does not define.
enum Outer {
    /// A constant of an enclosing graph: copied into the subgraph.
    Constant(Tensor),
    /// A runtime value of an enclosing graph: captured.
    Capture(Fact),
}

impl Scope<'_> {
    fn lookup(&self, name: &str) -> Option<Outer> {
        if let Some(t) = self.constants.get(name) {
            return Some(Outer::Constant(t.clone()));
        }
        if self.names.contains(name) {
            return Some(Outer::Capture(
                self.declared.get(name).cloned().unwrap_or_default(),
            ));
        }
        self.parent.and_then(|p| p.lookup(name))
    }
}

/// Turns ONNX graphs into kiln graphs.
pub(crate) struct Importer<'a> {
    pub reg: &'a OpRegistry,
    pub opsets: &'a BTreeMap<String, i64>,
    pub base_dir: Option<&'a Path>,
    pub warnings: Vec<String>,
}

/// The graph being built, with its name table.
struct Builder<'s> {
    graph: Graph,
    ids: HashMap<String, ValueId>,
    /// Names produced by this graph's nodes (to detect double definitions).
    produced: HashSet<String>,
    /// Every name this graph defines itself.
    local: HashSet<String>,
    declared: HashMap<String, Fact>,
    parent: Option<&'s Scope<'s>>,
}

impl Builder<'_> {
    fn fact_for(&self, name: &str) -> Fact {
        self.declared.get(name).cloned().unwrap_or_default()
    }

    /// The id of a value read by a node or a graph output: local, or taken from an
    /// enclosing graph (constant copy or capture).
    fn resolve(&mut self, name: &str, reader: &dyn Fn() -> String) -> Result<ValueId> {
        if let Some(&id) = self.ids.get(name) {
            return Ok(id);
        }
        if self.local.contains(name) {
            let id = self.graph.add_value(name, self.fact_for(name));
            self.ids.insert(name.to_string(), id);
            return Ok(id);
        }
        match self.parent.and_then(|p| p.lookup(name)) {
            Some(Outer::Constant(t)) => {
                let id = self.graph.add_value(name, Fact::constant(t.clone()));
                self.graph.constants.insert(id, t);
                self.ids.insert(name.to_string(), id);
                Ok(id)
            }
            Some(Outer::Capture(fact)) => {
                let id = self.graph.add_value(name, fact);
                self.graph.captures.push(id);
                self.ids.insert(name.to_string(), id);
                Ok(id)
            }
            None => Err(KilnError::InvalidModel(format!(
                "{} reads value {name:?}, which no node, graph input or initializer defines",
                reader()
            ))),
        }
    }

    /// Defines a node output.
    fn define_output(&mut self, name: &str, node: &str) -> Result<ValueId> {
        if !self.produced.insert(name.to_string()) {
            return Err(KilnError::InvalidModel(format!(
                "value {name:?} is produced twice (again by node {node})"
            )));
        }
        if let Some(&id) = self.ids.get(name) {
            if self.graph.inputs.contains(&id) || self.graph.constants.contains_key(&id) {
                return Err(KilnError::InvalidModel(format!(
                    "node {node} writes {name:?}, which is already a graph input or initializer"
                )));
            }
            return Ok(id);
        }
        let id = self.graph.add_value(name, self.fact_for(name));
        self.ids.insert(name.to_string(), id);
        Ok(id)
    }

    fn add_constant(&mut self, name: &str, t: Tensor, what: &str) -> Result<()> {
        if self.ids.contains_key(name) {
            return Err(KilnError::InvalidModel(format!(
                "{what} {name:?} is defined twice"
            )));
        }
        let id = self.graph.add_value(name, Fact::constant(t.clone()));
        self.graph.constants.insert(id, t);
        self.ids.insert(name.to_string(), id);
        Ok(())
    }
}

fn is_constant_node(n: &proto::NodeProto) -> bool {
    n.op_type() == "Constant" && normalize_domain(n.domain()).is_empty()
}

/// The value of a `Constant` node, from whichever `value*` attribute it has.
fn constant_value(
    n: &proto::NodeProto,
    node_name: &str,
    base_dir: Option<&Path>,
) -> Result<Tensor> {
    let err = |msg: String| KilnError::InvalidNode {
        node: node_name.into(),
        op: "Constant".into(),
        msg,
    };
    let a = match n.attribute.as_slice() {
        [a] => a,
        [] => return Err(err("has no value attribute".into())),
        _ => return Err(err("must have exactly one value attribute".into())),
    };
    if a.ref_attr_name.is_some() {
        return Err(err(format!(
            "attribute {} refers to a function attribute",
            a.name()
        )));
    }
    let strings = |v: &[Vec<u8>]| {
        v.iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
    };
    match a.name() {
        "value" => {
            let t =
                a.t.as_ref()
                    .ok_or_else(|| err("attribute value holds no tensor".into()))?;
            tensor_from_proto(t, base_dir)
        }
        "sparse_value" => {
            let s = a
                .sparse_tensor
                .as_ref()
                .ok_or_else(|| err("attribute sparse_value holds no tensor".into()))?;
            sparse_to_dense(s, base_dir)
        }
        "value_float" => Ok(Tensor::scalar(a.f())),
        "value_floats" => Tensor::from_slice(&[a.floats.len()], &a.floats),
        "value_int" => Ok(Tensor::scalar(a.i())),
        "value_ints" => Tensor::from_slice(&[a.ints.len()], &a.ints),
        "value_string" => {
            Tensor::from_strings(&[], vec![String::from_utf8_lossy(a.s()).into_owned()])
        }
        "value_strings" => Tensor::from_strings(&[a.strings.len()], strings(&a.strings)),
        other => Err(err(format!("unknown attribute {other}"))),
    }
}

/// The attribute's type, inferred from the fields set when the model leaves it UNDEFINED.
fn attr_type(a: &proto::AttributeProto) -> AttributeType {
    let declared =
        AttributeType::try_from(a.r#type.unwrap_or(0)).unwrap_or(AttributeType::Undefined);
    if declared != AttributeType::Undefined {
        return declared;
    }
    if !a.floats.is_empty() {
        AttributeType::Floats
    } else if !a.ints.is_empty() {
        AttributeType::Ints
    } else if !a.strings.is_empty() {
        AttributeType::Strings
    } else if !a.tensors.is_empty() {
        AttributeType::Tensors
    } else if !a.graphs.is_empty() {
        AttributeType::Graphs
    } else if a.t.is_some() {
        AttributeType::Tensor
    } else if a.g.is_some() {
        AttributeType::Graph
    } else if a.sparse_tensor.is_some() {
        AttributeType::SparseTensor
    } else if a.tp.is_some() {
        AttributeType::TypeProto
    } else if a.s.is_some() {
        AttributeType::String
    } else if a.i.is_some() {
        AttributeType::Int
    } else if a.f.is_some() {
        AttributeType::Float
    } else {
        AttributeType::Undefined
    }
}

impl Importer<'_> {
    /// The opset imported for a (normalised) domain; the default domain's when missing.
    fn opset_for(&self, domain: &str) -> i64 {
        self.opsets
            .get(domain)
            .or_else(|| self.opsets.get(""))
            .copied()
            .unwrap_or(1)
    }

    /// Imports a graph. `parent` is the scope of the enclosing graph for subgraphs.
    pub fn import_graph(&mut self, g: &proto::GraphProto, parent: Option<&Scope>) -> Result<Graph> {
        let mut b = Builder {
            graph: Graph {
                name: g.name().to_string(),
                ..Graph::default()
            },
            ids: HashMap::new(),
            produced: HashSet::new(),
            local: HashSet::new(),
            declared: HashMap::new(),
            parent,
        };
        // Declared types: value_info is a hint (errors ignored); inputs/outputs are checked below.
        for vi in &g.value_info {
            if let Some(Ok(f)) = vi.r#type.as_ref().map(|t| fact_from_type(t, vi.name())) {
                b.declared.insert(vi.name().to_string(), f);
            }
        }
        for vo in &g.output {
            if vo.name().is_empty() {
                return Err(KilnError::InvalidModel(format!(
                    "graph {:?} has an output with an empty name",
                    g.name()
                )));
            }
            b.declared
                .insert(vo.name().to_string(), io_fact(vo, "graph output")?);
        }
        // Initializers (dense and sparse) are constants.
        for t in &g.initializer {
            if t.name().is_empty() {
                return Err(KilnError::InvalidModel("an initializer has no name".into()));
            }
            let tensor = tensor_from_proto(t, self.base_dir)?;
            b.add_constant(t.name(), tensor, "initializer")?;
        }
        for s in &g.sparse_initializer {
            let name = s.values.as_ref().map(|v| v.name()).unwrap_or_default();
            if name.is_empty() {
                return Err(KilnError::InvalidModel(
                    "a sparse initializer has no name".into(),
                ));
            }
            let tensor = sparse_to_dense(s, self.base_dir)?;
            b.add_constant(name, tensor, "initializer")?;
        }
        // Graph inputs; those with an initializer are constants (ONNX Runtime's default).
        for vi in &g.input {
            let name = vi.name();
            if name.is_empty() {
                return Err(KilnError::InvalidModel(format!(
                    "graph {:?} has an input with an empty name",
                    g.name()
                )));
            }
            if b.ids.contains_key(name) {
                continue;
            }
            let fact = io_fact(vi, "graph input")?;
            b.declared.insert(name.to_string(), fact.clone());
            let id = b.graph.add_value(name, fact);
            b.ids.insert(name.to_string(), id);
            b.graph.inputs.push(id);
        }
        // Constant nodes become constants; record every name the graph defines.
        let names: Vec<String> = g
            .node
            .iter()
            .enumerate()
            .map(|(i, n)| synth_name(n, i))
            .collect();
        let names = dedupe(names, g);
        for (i, n) in g.node.iter().enumerate() {
            if is_constant_node(n) {
                let out = n.output.first().map(String::as_str).unwrap_or("");
                if out.is_empty() {
                    return Err(KilnError::InvalidModel(format!(
                        "Constant node {} has no output",
                        names[i]
                    )));
                }
                let t = constant_value(n, &names[i], self.base_dir)?;
                b.add_constant(out, t, "value")?;
                b.produced.insert(out.to_string());
            }
        }
        b.local.extend(b.ids.keys().cloned());
        for n in &g.node {
            b.local
                .extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
        }
        let scope = Scope {
            parent,
            names: b.local.clone(),
            constants: b
                .graph
                .constants
                .iter()
                .map(|(id, t)| (b.graph.name_of(*id).to_string(), t.clone()))
                .collect(),
            declared: b.declared.clone(),
        };
        for (i, n) in g.node.iter().enumerate() {
            if !is_constant_node(n) {
                self.import_node(&mut b, &scope, n, &names[i])?;
            }
        }
        for vo in &g.output {
            let name = vo.name();
            let id = b.resolve(name, &|| format!("graph output {name:?}"))?;
            b.graph.outputs.push(id);
        }
        let mut graph = b.graph;
        graph.toposort()?;
        if let Err(e) = graph.infer_facts() {
            let msg = format!("graph {:?}: {e}", graph.name);
            tracing::warn!("{msg}");
            self.warnings.push(msg);
        }
        Ok(graph)
    }

    fn import_node(
        &mut self,
        b: &mut Builder,
        scope: &Scope,
        n: &proto::NodeProto,
        name: &str,
    ) -> Result<()> {
        let domain = normalize_domain(n.domain()).to_string();
        let op_type = n.op_type().to_string();
        if op_type.is_empty() {
            return Err(KilnError::InvalidModel(format!(
                "node {name} has no op_type"
            )));
        }
        let opset = self.opset_for(&domain);
        let mut desc = OpDesc {
            domain,
            op_type,
            opset,
            attrs: BTreeMap::new(),
        };
        // Subgraph attributes: imported first, then given one shared capture list.
        let mut subgraphs: Vec<(String, Vec<Graph>, bool)> = Vec::new();
        for a in &n.attribute {
            let aname = a.name().to_string();
            if let Some(r) = &a.ref_attr_name {
                return Err(KilnError::InvalidModel(format!(
                    "node {name} ({}): attribute {aname} refers to function attribute {r:?} (ref_attr_name), \
                     which is only valid inside a function body",
                    desc.op_type
                )));
            }
            match attr_type(a) {
                AttributeType::Graph => {
                    let sg =
                        a.g.as_ref()
                            .ok_or_else(|| self.bad_attr(name, &desc, &aname, "holds no graph"))?;
                    subgraphs.push((aname, vec![self.import_graph(sg, Some(scope))?], false));
                }
                AttributeType::Graphs => {
                    let gs = a
                        .graphs
                        .iter()
                        .map(|sg| self.import_graph(sg, Some(scope)))
                        .collect::<Result<_>>()?;
                    subgraphs.push((aname, gs, true));
                }
                _ => {
                    let v = self.convert_attr(a, name, &desc)?;
                    desc.attrs.insert(aname, v);
                }
            }
        }
        let captures = share_captures(&mut subgraphs);
        for (aname, gs, many) in subgraphs {
            let gs: Vec<Arc<Graph>> = gs.into_iter().map(Arc::new).collect();
            let attr = if many {
                Attr::Graphs(gs)
            } else {
                Attr::Graph(gs.into_iter().next().expect("one graph"))
            };
            desc.attrs.insert(aname, attr);
        }
        let reader = || format!("node {name} ({})", n.op_type());
        let mut inputs = Vec::with_capacity(n.input.len() + captures.len());
        for i in &n.input {
            inputs.push(if i.is_empty() {
                None
            } else {
                Some(b.resolve(i, &reader)?)
            });
        }
        for c in &captures {
            inputs.push(Some(b.resolve(c, &reader)?));
        }
        let mut outputs = Vec::with_capacity(n.output.len());
        for o in &n.output {
            outputs.push(if o.is_empty() {
                None
            } else {
                Some(b.define_output(o, name)?)
            });
        }
        let ctx = BuildCtx {
            node: name,
            desc: &desc,
            n_inputs: n.input.len(),
            n_outputs: n.output.len(),
        };
        let op = self.reg.build(&ctx)?;
        b.graph.nodes.push(Node {
            name: name.to_string(),
            desc,
            op,
            inputs,
            outputs,
            fused_from: vec![name.to_string()],
        });
        Ok(())
    }

    fn bad_attr(&self, node: &str, desc: &OpDesc, attr: &str, msg: &str) -> KilnError {
        KilnError::InvalidNode {
            node: node.into(),
            op: desc.op_type.clone(),
            msg: format!("attribute {attr} {msg}"),
        }
    }

    fn convert_attr(&self, a: &proto::AttributeProto, node: &str, desc: &OpDesc) -> Result<Attr> {
        let aname = a.name();
        let lossy = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
        Ok(match attr_type(a) {
            AttributeType::Float => Attr::Float(a.f()),
            AttributeType::Int => Attr::Int(a.i()),
            AttributeType::String => Attr::String(lossy(a.s())),
            AttributeType::Tensor => {
                let t =
                    a.t.as_ref()
                        .ok_or_else(|| self.bad_attr(node, desc, aname, "holds no tensor"))?;
                Attr::Tensor(tensor_from_proto(t, self.base_dir)?)
            }
            AttributeType::SparseTensor => {
                let s = a
                    .sparse_tensor
                    .as_ref()
                    .ok_or_else(|| self.bad_attr(node, desc, aname, "holds no tensor"))?;
                Attr::Tensor(sparse_to_dense(s, self.base_dir)?)
            }
            AttributeType::TypeProto => {
                let tp =
                    a.tp.as_ref()
                        .ok_or_else(|| self.bad_attr(node, desc, aname, "holds no type"))?;
                Attr::Type(fact_from_type(
                    tp,
                    &format!("attribute {aname} of node {node}"),
                )?)
            }
            AttributeType::Floats => Attr::Floats(a.floats.clone()),
            AttributeType::Ints => Attr::Ints(a.ints.clone()),
            AttributeType::Strings => Attr::Strings(a.strings.iter().map(|s| lossy(s)).collect()),
            AttributeType::Tensors => Attr::Tensors(
                a.tensors
                    .iter()
                    .map(|t| tensor_from_proto(t, self.base_dir))
                    .collect::<Result<_>>()?,
            ),
            AttributeType::SparseTensors => Attr::Tensors(
                a.sparse_tensors
                    .iter()
                    .map(|s| sparse_to_dense(s, self.base_dir))
                    .collect::<Result<_>>()?,
            ),
            AttributeType::TypeProtos => {
                return Err(self.bad_attr(
                    node,
                    desc,
                    aname,
                    "is a list of types, which kiln does not support",
                ))
            }
            AttributeType::Undefined => {
                // An attribute with no value at all: ONNX treats it as absent-but-named;
                // an empty list is the closest (`ints = []`).
                Attr::Ints(Vec::new())
            }
            AttributeType::Graph | AttributeType::Graphs => unreachable!("handled by import_node"),
        })
    }
}

/// Gives every subgraph of one node the same capture list (the union, in order of first
/// appearance), so the node can append one set of outer values after its formal inputs
/// and each subgraph finds its captures there.
fn share_captures(subgraphs: &mut [(String, Vec<Graph>, bool)]) -> Vec<String> {
    let mut union: Vec<String> = Vec::new();
    for (_, gs, _) in subgraphs.iter() {
        for g in gs {
            for &c in &g.captures {
                let name = g.name_of(c);
                if !union.iter().any(|u| u == name) {
                    union.push(name.to_string());
                }
            }
        }
    }
    for (_, gs, _) in subgraphs.iter_mut() {
        for g in gs.iter_mut() {
            let mut caps = Vec::with_capacity(union.len());
            for name in &union {
                let existing = g.captures.iter().copied().find(|&c| g.name_of(c) == name);
                caps.push(match existing {
                    Some(id) => id,
                    None => g.add_value(name.clone(), Fact::unknown()),
                });
            }
            g.captures = caps;
        }
    }
    union
}

fn synth_name(n: &proto::NodeProto, index: usize) -> String {
    match n.name() {
        "" => format!("{}_{index}", n.op_type()),
        s => s.to_string(),
    }
}

/// Makes synthesized node names unique (explicit names are kept as written).
fn dedupe(mut names: Vec<String>, g: &proto::GraphProto) -> Vec<String> {
    let explicit: HashSet<String> = g
        .node
        .iter()
        .map(|n| n.name().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    let mut used = explicit.clone();
    for (i, n) in g.node.iter().enumerate() {
        if n.name().is_empty() && !used.insert(names[i].clone()) {
            let mut k = 1;
            while !used.insert(format!("{}_{k}", names[i])) {
                k += 1;
            }
            names[i] = format!("{}_{k}", names[i]);
        }
    }
    names
}
