//! The operator trait every layer implements, and the registry that builds ops from
//! their descriptions (ONNX import and plan loading both go through it).

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use crate::attr::{AttrReader, OpDesc};
use crate::error::{KilnError, Result};
use crate::fact::Fact;
use crate::graph::Graph;
use crate::tensor::TensorMut;
use crate::value::Value;

/// An operator instance: attributes already parsed and validated.
///
/// `eval` is the *reference* kernel: plain, obviously right, allocating its outputs.
/// `eval_into` writes into pre-planned output slots (an execution context's arena); its
/// default runs `eval` and copies, and fast ops override it to write in place.
pub trait Op: Send + Sync + std::fmt::Debug {
    /// The op type, e.g. `"Conv"`.
    fn op_type(&self) -> &str;

    /// Output facts from input facts (`None` for an absent optional input).
    ///
    /// Ops that cannot tell return [`Fact::unknown`] for those outputs; the executor then
    /// keeps them out of the arena and allocates them at run time.
    fn infer(&self, inputs: &[Option<&Fact>], n_outputs: usize) -> Result<Vec<Fact>> {
        let _ = inputs;
        Ok(vec![Fact::unknown(); n_outputs])
    }

    /// The reference kernel.
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>>;

    /// Writes the outputs into `outputs`, whose dtypes and shapes were inferred at build time.
    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let produced = self.eval(inputs)?;
        if produced.len() < outputs.len() {
            return Err(KilnError::kernel(
                self.op_type(),
                format!(
                    "produced {} outputs, {} expected",
                    produced.len(),
                    outputs.len()
                ),
            ));
        }
        for (slot, value) in outputs.iter_mut().zip(produced.iter()) {
            slot.copy_from(value.as_tensor()?)?;
        }
        Ok(())
    }

    /// False for ops whose outputs must not be computed at build time (random generators).
    fn is_deterministic(&self) -> bool {
        true
    }

    /// The alternative implementations ("tactics") this op can run with for these concrete
    /// input facts, in the op's own order of preference (the first is what it runs without
    /// tuning). An empty list means one built-in implementation: nothing to tune. The
    /// builder's tuner records its choice as the [`crate::tactic::TACTIC_ATTR`] attribute.
    fn tactics(&self, inputs: &[Option<&Fact>]) -> Vec<crate::tactic::Tactic> {
        let _ = inputs;
        Vec::new()
    }

    /// The subgraphs this op runs (for inspection and planning).
    fn subgraphs(&self) -> Vec<Arc<Graph>> {
        Vec::new()
    }

    /// For downcasting in optimisation passes.
    fn as_any(&self) -> &dyn Any;
}

/// Everything a builder gets to construct an op.
pub struct BuildCtx<'a> {
    /// The node's name (for error messages).
    pub node: &'a str,
    /// The op's description (type, domain, opset, attributes).
    pub desc: &'a OpDesc,
    /// How many inputs the node has (trailing empty optional inputs included).
    pub n_inputs: usize,
    /// How many outputs the node has.
    pub n_outputs: usize,
}

impl<'a> BuildCtx<'a> {
    /// Typed attribute access.
    pub fn attrs(&self) -> AttrReader<'a> {
        AttrReader {
            node: self.node,
            desc: self.desc,
        }
    }

    /// The opset version the model imports for this op's domain.
    pub fn opset(&self) -> i64 {
        self.desc.opset
    }
}

/// A function that builds an op from its description.
pub type OpBuilder = fn(&BuildCtx) -> Result<Box<dyn Op>>;

/// Registry of op builders, keyed by (domain, op type).
#[derive(Default, Clone)]
pub struct OpRegistry {
    builders: HashMap<(String, String), OpBuilder>,
}

impl OpRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a builder for an op of the default ONNX domain.
    pub fn register(&mut self, op_type: &str, builder: OpBuilder) {
        self.register_in("", op_type, builder);
    }

    /// Registers a builder for an op of a given domain.
    pub fn register_in(&mut self, domain: &str, op_type: &str, builder: OpBuilder) {
        self.builders.insert(
            (normalize_domain(domain).to_string(), op_type.to_string()),
            builder,
        );
    }

    /// True when an op is known.
    pub fn contains(&self, domain: &str, op_type: &str) -> bool {
        self.builders
            .contains_key(&(normalize_domain(domain).to_string(), op_type.to_string()))
    }

    /// All registered (domain, op type) pairs, sorted.
    pub fn ops(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self.builders.keys().cloned().collect();
        v.sort();
        v
    }

    /// Builds the op of a node, or says clearly that it is not supported.
    pub fn build(&self, ctx: &BuildCtx) -> Result<Arc<dyn Op>> {
        let key = (
            normalize_domain(&ctx.desc.domain).to_string(),
            ctx.desc.op_type.clone(),
        );
        match self.builders.get(&key) {
            Some(b) => b(ctx).map(Arc::from),
            None => Err(KilnError::UnsupportedOp {
                op: if key.0.is_empty() {
                    key.1
                } else {
                    format!("{}.{}", key.0, key.1)
                },
                opset: ctx.desc.opset,
                node: ctx.node.to_string(),
                detail: String::new(),
            }),
        }
    }
}

/// `ai.onnx` and the empty domain are the same domain.
pub fn normalize_domain(domain: &str) -> &str {
    if domain == "ai.onnx" {
        ""
    } else {
        domain
    }
}
