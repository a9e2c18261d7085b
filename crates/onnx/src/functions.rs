//! Model-local functions (`ModelProto.functions`): calls are inlined before import.
//!
//! A node whose `(domain, op_type)` names a local function, and that the op registry does
//! not implement itself, is replaced by the function body: formal inputs/outputs are bound
//! to the node's actual values, the body's internal values get a unique prefix, and
//! attribute references (`ref_attr_name`) take the calling node's attribute or the
//! function's default. Calls inside function bodies and inside subgraphs are expanded too.

use std::collections::{HashMap, HashSet};

use kiln_core::op::normalize_domain;
use kiln_core::{KilnError, OpRegistry, Result};

use crate::proto;

/// Nesting deeper than this is taken for recursion.
const MAX_DEPTH: usize = 32;

type Key = (String, String, String);

/// The functions of a model by (domain, name, overload).
pub(crate) struct Functions<'a> {
    by_key: HashMap<Key, &'a proto::FunctionProto>,
    reg: &'a OpRegistry,
    counter: usize,
}

fn key(domain: &str, name: &str, overload: &str) -> Key {
    (
        normalize_domain(domain).to_string(),
        name.to_string(),
        overload.to_string(),
    )
}

impl<'a> Functions<'a> {
    /// Indexes the model's functions.
    pub fn new(m: &'a proto::ModelProto, reg: &'a OpRegistry) -> Self {
        let by_key = m
            .functions
            .iter()
            .map(|f| (key(f.domain(), f.name(), f.overload()), f))
            .collect();
        Functions {
            by_key,
            reg,
            counter: 0,
        }
    }

    /// True when the model has no local functions (nothing to do).
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    fn function_for(&self, n: &proto::NodeProto) -> Option<&'a proto::FunctionProto> {
        if self.reg.contains(n.domain(), n.op_type()) {
            return None;
        }
        self.by_key
            .get(&key(n.domain(), n.op_type(), n.overload()))
            .copied()
    }

    /// A copy of the graph with every call of a local function expanded, subgraphs included.
    pub fn inline_graph(&mut self, g: &proto::GraphProto) -> Result<proto::GraphProto> {
        let mut out = g.clone();
        out.node = self.inline_nodes(&g.node, 0)?;
        Ok(out)
    }

    fn inline_nodes(
        &mut self,
        nodes: &[proto::NodeProto],
        depth: usize,
    ) -> Result<Vec<proto::NodeProto>> {
        if depth > MAX_DEPTH {
            return Err(KilnError::InvalidModel(format!(
                "model-local functions nest deeper than {MAX_DEPTH} levels (recursive function?)"
            )));
        }
        let mut out = Vec::with_capacity(nodes.len());
        for n in nodes {
            let mut n = n.clone();
            for a in &mut n.attribute {
                if let Some(g) = &a.g {
                    a.g = Some(self.inline_graph(g)?);
                }
                for g in &mut a.graphs {
                    *g = self.inline_graph(g)?;
                }
            }
            match self.function_for(&n) {
                None => out.push(n),
                Some(f) => {
                    let body = self.expand(&n, f)?;
                    out.extend(self.inline_nodes(&body, depth + 1)?);
                }
            }
        }
        Ok(out)
    }

    /// The body of `f` for the call `call`, with names bound and attributes resolved.
    fn expand(
        &mut self,
        call: &proto::NodeProto,
        f: &proto::FunctionProto,
    ) -> Result<Vec<proto::NodeProto>> {
        self.counter += 1;
        let prefix = format!("__{}_{}/", f.name(), self.counter);
        let err = |msg: String| {
            KilnError::InvalidModel(format!(
                "call of function {} (node {:?}): {msg}",
                f.name(),
                call.name()
            ))
        };
        if call.input.len() > f.input.len() || call.output.len() > f.output.len() {
            return Err(err(format!(
                "{} inputs/{} outputs given, the function declares {}/{}",
                call.input.len(),
                call.output.len(),
                f.input.len(),
                f.output.len()
            )));
        }
        let mut bind: HashMap<String, String> = HashMap::new();
        for (i, formal) in f.input.iter().enumerate() {
            bind.insert(
                formal.clone(),
                call.input.get(i).cloned().unwrap_or_default(),
            );
        }
        for (i, formal) in f.output.iter().enumerate() {
            let actual = call.output.get(i).filter(|s| !s.is_empty()).cloned();
            bind.insert(
                formal.clone(),
                actual.unwrap_or_else(|| format!("{prefix}{formal}")),
            );
        }
        // Every name the function body defines or binds; other names are left alone.
        let mut scope: HashSet<String> = f.input.iter().chain(f.output.iter()).cloned().collect();
        for n in &f.node {
            scope.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
        }
        let rename = |name: &str| -> String {
            if name.is_empty() {
                return String::new();
            }
            match bind.get(name) {
                Some(actual) => actual.clone(),
                None if scope.contains(name) => format!("{prefix}{name}"),
                None => name.to_string(),
            }
        };
        let attrs = |a: &proto::AttributeProto| -> Option<proto::AttributeProto> {
            let Some(r) = &a.ref_attr_name else {
                return Some(a.clone());
            };
            let found = call
                .attribute
                .iter()
                .find(|c| c.name() == r)
                .or_else(|| f.attribute_proto.iter().find(|d| d.name() == r))?;
            let mut v = found.clone();
            v.name = a.name.clone();
            Some(v)
        };
        let mut body = Vec::with_capacity(f.node.len());
        for (i, n) in f.node.iter().enumerate() {
            let mut n = n.clone();
            let base = if n.name().is_empty() {
                format!("{}_{i}", n.op_type())
            } else {
                n.name().to_string()
            };
            n.name = Some(format!("{prefix}{base}"));
            n.input = n.input.iter().map(|s| rename(s)).collect();
            n.output = n.output.iter().map(|s| rename(s)).collect();
            n.attribute = n.attribute.iter().filter_map(attrs).collect();
            for a in &mut n.attribute {
                if let Some(g) = &mut a.g {
                    rewrite_subgraph(g, &rename, &attrs);
                }
                for g in &mut a.graphs {
                    rewrite_subgraph(g, &rename, &attrs);
                }
            }
            body.push(n);
        }
        Ok(body)
    }
}

/// Renames the outer (function-scope) names a subgraph of a function body reads and
/// resolves its attribute references; names the subgraph defines itself are kept.
fn rewrite_subgraph(
    g: &mut proto::GraphProto,
    rename: &dyn Fn(&str) -> String,
    attrs: &dyn Fn(&proto::AttributeProto) -> Option<proto::AttributeProto>,
) {
    let mut local: HashSet<String> = g.input.iter().map(|v| v.name().to_string()).collect();
    local.extend(g.initializer.iter().map(|t| t.name().to_string()));
    for n in &g.node {
        local.extend(n.output.iter().cloned());
    }
    let outer = |name: &str| {
        if local.contains(name) {
            name.to_string()
        } else {
            rename(name)
        }
    };
    for n in &mut g.node {
        n.input = n.input.iter().map(|s| outer(s)).collect();
        n.attribute = n.attribute.iter().filter_map(attrs).collect();
        for a in &mut n.attribute {
            if let Some(sg) = &mut a.g {
                rewrite_subgraph(sg, &outer, attrs);
            }
            for sg in &mut a.graphs {
                rewrite_subgraph(sg, &outer, attrs);
            }
        }
    }
    for o in &mut g.output {
        let name = outer(o.name());
        o.name = Some(name);
    }
}
