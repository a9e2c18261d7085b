//! Test helpers: a hand-made graph builder and a few tiny ops to put in subgraphs.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_core::{
    Attr, BuildCtx, Fact, Graph, KilnError, Node, Op, OpBuilder, OpDesc, Result, Tensor, Value,
    ValueId,
};

/// Builds small graphs by hand.
pub(crate) struct GraphBuilder {
    pub g: Graph,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            g: Graph {
                name: name.into(),
                ..Graph::default()
            },
        }
    }

    pub fn input(&mut self, name: &str) -> ValueId {
        let id = self.g.add_value(name, Fact::unknown());
        self.g.inputs.push(id);
        id
    }

    pub fn capture(&mut self, name: &str) -> ValueId {
        let id = self.g.add_value(name, Fact::unknown());
        self.g.captures.push(id);
        id
    }

    pub fn constant(&mut self, name: &str, t: Tensor) -> ValueId {
        let id = self.g.add_value(name, Fact::constant(t.clone()));
        self.g.constants.insert(id, t);
        id
    }

    pub fn node(&mut self, op: Arc<dyn Op>, inputs: &[ValueId], n_out: usize) -> Vec<ValueId> {
        let idx = self.g.nodes.len();
        let outs: Vec<ValueId> = (0..n_out)
            .map(|o| self.g.add_value(format!("n{idx}_o{o}"), Fact::unknown()))
            .collect();
        self.g.nodes.push(Node {
            name: format!("n{idx}"),
            desc: OpDesc::new("", op.op_type(), 1),
            op,
            inputs: inputs.iter().map(|i| Some(*i)).collect(),
            outputs: outs.iter().map(|o| Some(*o)).collect(),
            fused_from: vec![],
        });
        outs
    }

    pub fn output(&mut self, id: ValueId) {
        self.g.outputs.push(id);
    }

    pub fn set_fact(&mut self, id: ValueId, f: Fact) {
        self.g.values[id].fact = f;
    }

    pub fn finish(self) -> Arc<Graph> {
        Arc::new(self.g)
    }
}

/// Builds an op through its builder with the given attributes.
pub(crate) fn build(
    builder: OpBuilder,
    op_type: &str,
    opset: i64,
    attrs: Vec<(&str, Attr)>,
    n_in: usize,
    n_out: usize,
) -> Result<Box<dyn Op>> {
    let desc = OpDesc {
        domain: String::new(),
        op_type: op_type.into(),
        opset,
        attrs: attrs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<BTreeMap<_, _>>(),
    };
    let ctx = BuildCtx {
        node: "test",
        desc: &desc,
        n_inputs: n_in,
        n_outputs: n_out,
    };
    builder(&ctx)
}

/// Runs an op's `eval` on owned values.
pub(crate) fn run(op: &dyn Op, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let refs: Vec<Option<&Value>> = inputs.iter().map(|v| v.as_ref()).collect();
    op.eval(&refs)
}

/// A tensor value.
pub(crate) fn tv(t: Tensor) -> Option<Value> {
    Some(Value::Tensor(t))
}

/// f32 tensor.
pub(crate) fn f32t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_slice(shape, v).expect("test tensor")
}

/// Element-wise binary op on f32 data (one side may hold a single element).
#[derive(Debug)]
pub(crate) struct Bin(pub &'static str, pub fn(f32, f32) -> f32);

impl Op for Bin {
    fn op_type(&self) -> &str {
        self.0
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let a = kiln_core::input_tensor(inputs, 0, self.0)?;
        let b = kiln_core::input_tensor(inputs, 1, self.0)?;
        let (x, y) = (a.to_f32_vec()?, b.to_f32_vec()?);
        let (shape, v): (Vec<usize>, Vec<f32>) = if x.len() == y.len() {
            (
                a.shape().to_vec(),
                x.iter().zip(&y).map(|(p, q)| (self.1)(*p, *q)).collect(),
            )
        } else if y.len() == 1 {
            (
                a.shape().to_vec(),
                x.iter().map(|p| (self.1)(*p, y[0])).collect(),
            )
        } else if x.len() == 1 {
            (
                b.shape().to_vec(),
                y.iter().map(|q| (self.1)(x[0], *q)).collect(),
            )
        } else {
            return Err(KilnError::kernel(self.0, "shape mismatch"));
        };
        Ok(vec![Value::Tensor(Tensor::from_vec(&shape, v)?)])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `a + b` on f32.
pub(crate) fn add() -> Arc<dyn Op> {
    Arc::new(Bin("Add", |a, b| a + b))
}

/// `a < b` as a bool scalar (first elements).
#[derive(Debug)]
pub(crate) struct Less;

impl Op for Less {
    fn op_type(&self) -> &str {
        "Less"
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let a = kiln_core::input_tensor(inputs, 0, "Less")?.to_f64_vec()?;
        let b = kiln_core::input_tensor(inputs, 1, "Less")?.to_f64_vec()?;
        Ok(vec![Value::Tensor(Tensor::from_bools(
            &[],
            &[a[0] < b[0]],
        )?)])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Passes its input through (any kind of value).
#[derive(Debug)]
pub(crate) struct Ident;

impl Op for Ident {
    fn op_type(&self) -> &str {
        "Identity"
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        match inputs.first().copied().flatten() {
            Some(v) => Ok(vec![v.clone()]),
            None => Err(KilnError::kernel("Identity", "missing input")),
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Casts to f32.
#[derive(Debug)]
pub(crate) struct ToF32;

impl Op for ToF32 {
    fn op_type(&self) -> &str {
        "ToF32"
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let a = kiln_core::input_tensor(inputs, 0, "ToF32")?;
        Ok(vec![Value::Tensor(a.cast(kiln_core::DType::F32)?)])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A graph attribute.
pub(crate) fn gattr(g: &Arc<Graph>) -> Attr {
    Attr::Graph(g.clone())
}
