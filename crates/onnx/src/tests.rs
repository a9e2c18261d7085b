//! Unit tests: small models built with the prost types, encoded, then parsed back.

use std::any::Any;
use std::path::Path;

use kiln_core::{
    exec::run_graph, input_tensor, Attr, BuildCtx, DType, Dim, Fact, Graph, KilnError, Op,
    OpRegistry, Result, Tensor, Value, ValueKind,
};
use prost::Message;

use crate::proto::{self, tensor_proto::DataType as DT};
use crate::*;

// ---------------------------------------------------------------- model builders

fn tensor_type(elem: DT, dims: &[Option<i64>]) -> proto::TypeProto {
    use proto::tensor_shape_proto::{dimension::Value as V, Dimension};
    let dim = dims
        .iter()
        .enumerate()
        .map(|(i, d)| Dimension {
            value: Some(match d {
                Some(v) => V::DimValue(*v),
                None => V::DimParam(format!("d{i}")),
            }),
            ..Default::default()
        })
        .collect();
    proto::TypeProto {
        value: Some(proto::type_proto::Value::TensorType(
            proto::type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(proto::TensorShapeProto { dim }),
            },
        )),
        ..Default::default()
    }
}

fn vi(name: &str, tp: Option<proto::TypeProto>) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: tp,
        ..Default::default()
    }
}

fn f32_vi(name: &str, dims: &[Option<i64>]) -> proto::ValueInfoProto {
    vi(name, Some(tensor_type(DT::Float, dims)))
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> proto::NodeProto {
    proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn attr_graph(name: &str, g: proto::GraphProto) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    }
}

fn f32_tensor(name: &str, dims: &[i64], data: &[f32]) -> proto::TensorProto {
    proto::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DT::Float as i32),
        float_data: data.to_vec(),
        ..Default::default()
    }
}

fn graph(
    nodes: Vec<proto::NodeProto>,
    inputs: Vec<proto::ValueInfoProto>,
    outputs: Vec<proto::ValueInfoProto>,
) -> proto::GraphProto {
    proto::GraphProto {
        name: Some("g".into()),
        node: nodes,
        input: inputs,
        output: outputs,
        ..Default::default()
    }
}

fn model(g: proto::GraphProto, opset: i64) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: Some(8),
        producer_name: Some("kiln-tests".into()),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        graph: Some(g),
        ..Default::default()
    }
}

fn parse(m: &proto::ModelProto, reg: &OpRegistry) -> Result<Model> {
    parse_model(&m.encode_to_vec(), None, reg)
}

// ---------------------------------------------------------------- test ops

/// Elementwise f32 add (with scalar broadcast), enough to run small graphs.
#[derive(Debug)]
struct TestAdd;

impl Op for TestAdd {
    fn op_type(&self) -> &str {
        "Add"
    }
    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let a = inputs[0].cloned().unwrap_or_default();
        Ok(vec![Fact { konst: None, ..a }])
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let a = input_tensor(inputs, 0, "Add")?;
        let b = input_tensor(inputs, 1, "Add")?;
        let (av, bv) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
        let out: Vec<f32> = if bv.len() == 1 {
            av.iter().map(|x| x + bv[0]).collect()
        } else {
            av.iter().zip(bv).map(|(x, y)| x + y).collect()
        };
        Ok(vec![Value::Tensor(Tensor::from_vec(a.shape(), out)?)])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn build_add(_: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(TestAdd))
}

/// Runs its `body` subgraph on no formal inputs of its own except the ones it is given;
/// captures come after the formal inputs (the importer's convention).
#[derive(Debug)]
struct TestCall {
    body: std::sync::Arc<Graph>,
    n_formal: usize,
}

impl Op for TestCall {
    fn op_type(&self) -> &str {
        "Call"
    }
    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let k = self.body.captures.len();
        assert_eq!(inputs.len(), self.n_formal + k);
        let vals: Vec<Value> = inputs
            .iter()
            .map(|v| v.cloned().expect("present"))
            .collect();
        let (formal, caps) = vals.split_at(inputs.len() - k);
        run_graph(&self.body, formal, caps)
    }
    fn subgraphs(&self) -> Vec<std::sync::Arc<Graph>> {
        vec![self.body.clone()]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn build_call(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(TestCall {
        body: ctx.attrs().graph("body")?,
        n_formal: ctx.n_inputs,
    }))
}

fn registry() -> OpRegistry {
    let mut reg = OpRegistry::new();
    reg.register("Add", build_add);
    reg.register("Call", build_call);
    reg
}

fn run(m: &Model, inputs: &[Tensor]) -> Vec<Tensor> {
    let vals: Vec<Value> = inputs.iter().cloned().map(Value::Tensor).collect();
    run_graph(&m.graph, &vals, &[])
        .unwrap()
        .into_iter()
        .map(|v| v.into_tensor().unwrap())
        .collect()
}

// ---------------------------------------------------------------- tests

#[test]
fn simple_add_model_imports_and_runs() {
    let g = graph(
        vec![node("Add", "", &["x", "y"], &["z"])],
        vec![f32_vi("x", &[None, Some(3)]), f32_vi("y", &[None, Some(3)])],
        vec![f32_vi("z", &[None, Some(3)])],
    );
    let m = parse(&model(g, 17), &registry()).unwrap();
    assert_eq!(m.opsets.get(""), Some(&17));
    assert_eq!(m.ir_version, 8);
    assert_eq!(m.producer, "kiln-tests");
    assert_eq!(m.graph.nodes.len(), 1);
    assert_eq!(m.graph.nodes[0].name, "Add_0");
    assert_eq!(m.graph.nodes[0].desc.opset, 17);
    let x = m.graph.inputs[0];
    assert_eq!(
        m.graph.values[x].fact.shape,
        Some(vec![Dim::Sym("d0".into()), Dim::Known(3)])
    );
    assert_eq!(m.graph.values[x].fact.dtype, Some(DType::F32));
    let a = Tensor::from_vec(&[1, 3], vec![1.0f32, 2.0, 3.0]).unwrap();
    let b = Tensor::from_vec(&[1, 3], vec![10.0f32, 20.0, 30.0]).unwrap();
    let out = run(&m, &[a, b]);
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[11.0, 22.0, 33.0]);
}

#[test]
fn initializers_that_are_inputs_are_constants() {
    let mut g = graph(
        vec![node("Add", "add", &["x", "w"], &["z"])],
        vec![f32_vi("x", &[Some(2)]), f32_vi("w", &[Some(2)])],
        vec![f32_vi("z", &[Some(2)])],
    );
    g.initializer.push(f32_tensor("w", &[2], &[0.5, 0.25]));
    let m = parse(&model(g, 13), &registry()).unwrap();
    assert_eq!(m.graph.inputs.len(), 1);
    assert_eq!(m.inputs.len(), 1);
    assert_eq!(m.inputs[0].name, "x");
    assert_eq!(m.graph.constants.len(), 1);
    let out = run(&m, &[Tensor::from_vec(&[2], vec![1.0f32, 1.0]).unwrap()]);
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[1.5, 1.25]);
}

#[test]
fn constant_nodes_become_constants() {
    let mut c = node("Constant", "", &[], &["c"]);
    c.attribute.push(proto::AttributeProto {
        name: Some("value_floats".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Floats as i32),
        floats: vec![1.0, 2.0],
        ..Default::default()
    });
    let mut c2 = node("Constant", "", &[], &["s"]);
    c2.attribute.push(proto::AttributeProto {
        name: Some("value_int".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        i: Some(7),
        ..Default::default()
    });
    let g = graph(
        vec![c, node("Add", "", &["x", "c"], &["z"]), c2],
        vec![f32_vi("x", &[Some(2)])],
        vec![f32_vi("z", &[Some(2)]), vi("s", None)],
    );
    let m = parse(&model(g, 13), &registry()).unwrap();
    assert_eq!(m.graph.nodes.len(), 1);
    assert_eq!(m.graph.nodes[0].name, "Add_1");
    let out = run(&m, &[Tensor::from_vec(&[2], vec![1.0f32, 1.0]).unwrap()]);
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[2.0, 3.0]);
    assert_eq!(out[1].as_slice::<i64>().unwrap(), &[7]);
    assert_eq!(out[1].shape(), &[] as &[usize]);
}

#[test]
fn unknown_op_is_a_clear_error() {
    let g = graph(
        vec![node("Foo", "my_node", &["x"], &["y"])],
        vec![f32_vi("x", &[Some(1)])],
        vec![f32_vi("y", &[])],
    );
    let err = parse(&model(g, 11), &registry()).unwrap_err().to_string();
    assert!(
        err.contains("unsupported operator Foo (opset 11) at node my_node"),
        "{err}"
    );
}

#[test]
fn opset_of_other_domain_and_ai_onnx_normalised() {
    let mut n = node("Add", "", &["x", "x"], &["y"]);
    n.domain = Some("ai.onnx".into());
    let mut m = model(
        graph(
            vec![n],
            vec![f32_vi("x", &[Some(1)])],
            vec![f32_vi("y", &[Some(1)])],
        ),
        9,
    );
    m.opset_import.push(proto::OperatorSetIdProto {
        domain: Some("ai.onnx.ml".into()),
        version: Some(3),
    });
    let m = parse(&m, &registry()).unwrap();
    assert_eq!(m.graph.nodes[0].desc.domain, "");
    assert_eq!(m.opsets.get("ai.onnx.ml"), Some(&3));
    let mut n = node("Bar", "b", &["x"], &["y"]);
    n.domain = Some("ai.onnx.ml".into());
    let mut mm = model(
        graph(
            vec![n],
            vec![f32_vi("x", &[Some(1)])],
            vec![f32_vi("y", &[Some(1)])],
        ),
        9,
    );
    mm.opset_import.push(proto::OperatorSetIdProto {
        domain: Some("ai.onnx.ml".into()),
        version: Some(3),
    });
    let err = parse(&mm, &registry()).unwrap_err().to_string();
    assert!(
        err.contains("unsupported operator ai.onnx.ml.Bar (opset 3) at node b"),
        "{err}"
    );
}

#[test]
fn garbage_and_truncated_files_fail_cleanly() {
    let err = parse_model(b"this is a text file, not a model\n", None, &registry()).unwrap_err();
    assert!(matches!(err, KilnError::InvalidModel(_)), "{err}");
    assert!(err.to_string().contains("not an ONNX model"), "{err}");
    let g = graph(
        vec![node("Add", "", &["x", "x"], &["y"])],
        vec![f32_vi("x", &[Some(1)])],
        vec![f32_vi("y", &[Some(1)])],
    );
    let bytes = model(g, 13).encode_to_vec();
    for cut in [1, 5, bytes.len() / 2, bytes.len() - 1] {
        let err = parse_model(&bytes[..cut], None, &registry()).unwrap_err();
        assert!(
            matches!(err, KilnError::InvalidModel(_)),
            "cut {cut}: {err}"
        );
    }
    let err = parse_model(&[], None, &registry()).unwrap_err();
    assert!(err.to_string().contains("not an ONNX model"), "{err}");
    let no_graph = proto::ModelProto {
        ir_version: Some(7),
        ..Default::default()
    };
    let err = parse(&no_graph, &registry()).unwrap_err();
    assert!(err.to_string().contains("model has no graph"), "{err}");
    let empty = model(proto::GraphProto::default(), 13);
    let err = parse(&empty, &registry()).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    // Random bytes never panic.
    let mut state = 0x1234_5678u32;
    for len in 0..200 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        assert!(parse_model(&bytes, None, &registry()).is_err());
    }
}

#[test]
fn missing_values_are_named() {
    let g = graph(
        vec![node("Add", "a", &["x", "nope"], &["y"])],
        vec![f32_vi("x", &[Some(1)])],
        vec![f32_vi("y", &[])],
    );
    let err = parse(&model(g, 13), &registry()).unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("node a"), "{err}");
    let g = graph(
        vec![node("Add", "a", &["x", "x"], &["y"])],
        vec![f32_vi("x", &[Some(1)])],
        vec![f32_vi("zz", &[])],
    );
    let err = parse(&model(g, 13), &registry()).unwrap_err().to_string();
    assert!(err.contains("graph output \"zz\""), "{err}");
    let g = graph(
        vec![node("Add", "a", &["x", "x"], &["y"])],
        vec![f32_vi("x", &[Some(1)])],
        vec![f32_vi("", &[])],
    );
    let err = parse(&model(g, 13), &registry()).unwrap_err().to_string();
    assert!(err.contains("empty name"), "{err}");
    let g = graph(
        vec![
            node("Add", "a", &["x", "x"], &["y"]),
            node("Add", "b", &["x", "x"], &["y"]),
        ],
        vec![f32_vi("x", &[Some(1)])],
        vec![f32_vi("y", &[])],
    );
    let err = parse(&model(g, 13), &registry()).unwrap_err().to_string();
    assert!(err.contains("produced twice"), "{err}");
}

#[test]
fn nodes_out_of_order_are_sorted_and_optional_io_is_none() {
    let g = graph(
        vec![
            node("Add", "second", &["t", "x"], &["y", ""]),
            node("Add", "first", &["x", "x"], &["t"]),
        ],
        vec![f32_vi("x", &[Some(1)])],
        vec![f32_vi("y", &[Some(1)])],
    );
    let m = parse(&model(g, 13), &registry()).unwrap();
    assert_eq!(m.graph.nodes[0].name, "first");
    assert_eq!(m.graph.nodes[1].outputs[1], None);
    let out = run(&m, &[Tensor::from_vec(&[1], vec![2.0f32]).unwrap()]);
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[6.0]);
}

#[test]
fn subgraph_captures_propagate_through_levels() {
    // inner: z = a + w   (a: outer-outer input, w: middle-level node output)
    let inner = graph(
        vec![node("Add", "in_add", &["a", "w"], &["z"])],
        vec![],
        vec![vi("z", None)],
    );
    let mut call_inner = node("Call", "call_inner", &[], &["m_out"]);
    call_inner.attribute.push(attr_graph("body", inner));
    // middle: w = b + k (k: top-level constant), then runs inner.
    let middle = graph(
        vec![node("Add", "mid_add", &["b", "k"], &["w"]), call_inner],
        vec![],
        vec![vi("m_out", None)],
    );
    let mut call_mid = node("Call", "call_mid", &[], &["out"]);
    call_mid.attribute.push(attr_graph("body", middle));
    let mut g = graph(
        vec![call_mid],
        vec![f32_vi("a", &[Some(2)]), f32_vi("b", &[Some(2)])],
        vec![f32_vi("out", &[Some(2)])],
    );
    g.initializer.push(f32_tensor("k", &[], &[100.0]));
    let m = parse(&model(g, 13), &registry()).unwrap();
    let top = &m.graph.nodes[0];
    let mid = match top.desc.attrs.get("body") {
        Some(Attr::Graph(g)) => g.clone(),
        other => panic!("{other:?}"),
    };
    let cap_names: Vec<&str> = mid.captures.iter().map(|c| mid.name_of(*c)).collect();
    assert_eq!(cap_names, vec!["b", "a"]);
    assert_eq!(top.inputs.len(), 2);
    // k is a constant of the middle graph, not a capture.
    assert_eq!(mid.constants.len(), 1);
    let a = Tensor::from_vec(&[2], vec![1.0f32, 2.0]).unwrap();
    let b = Tensor::from_vec(&[2], vec![10.0f32, 20.0]).unwrap();
    let out = run(&m, &[a, b]);
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[111.0, 122.0]);
}

#[test]
fn subgraphs_of_one_node_share_captures() {
    let then_g = graph(
        vec![node("Add", "t", &["a", "a"], &["r1"])],
        vec![],
        vec![vi("r1", None)],
    );
    let else_g = graph(
        vec![node("Add", "e", &["b", "b"], &["r2"])],
        vec![],
        vec![vi("r2", None)],
    );
    let mut n = node("Call", "if", &[], &["out"]);
    n.attribute.push(attr_graph("body", then_g));
    n.attribute.push(attr_graph("else_branch", else_g));
    let g = graph(
        vec![n],
        vec![f32_vi("a", &[Some(1)]), f32_vi("b", &[Some(1)])],
        vec![f32_vi("out", &[Some(1)])],
    );
    let m = parse(&model(g, 13), &registry()).unwrap();
    let node = &m.graph.nodes[0];
    for key in ["body", "else_branch"] {
        let Some(Attr::Graph(sg)) = node.desc.attrs.get(key) else {
            panic!()
        };
        let names: Vec<&str> = sg.captures.iter().map(|c| sg.name_of(*c)).collect();
        assert_eq!(names, vec!["a", "b"], "{key}");
    }
    let out = run(
        &m,
        &[
            Tensor::scalar(3.0f32).reshape(&[1]).unwrap(),
            Tensor::scalar(5.0f32).reshape(&[1]).unwrap(),
        ],
    );
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[6.0]);
}

#[test]
fn subgraph_reading_unknown_name_fails() {
    let inner = graph(
        vec![node("Add", "in_add", &["ghost", "ghost"], &["z"])],
        vec![],
        vec![vi("z", None)],
    );
    let mut n = node("Call", "c", &[], &["out"]);
    n.attribute.push(attr_graph("body", inner));
    let g = graph(vec![n], vec![], vec![vi("out", None)]);
    let err = parse(&model(g, 13), &registry()).unwrap_err().to_string();
    assert!(err.contains("ghost"), "{err}");
}

#[test]
fn ref_attr_name_is_rejected() {
    let mut n = node("Add", "a", &["x", "x"], &["y"]);
    n.attribute.push(proto::AttributeProto {
        name: Some("alpha".into()),
        ref_attr_name: Some("outer_alpha".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
        ..Default::default()
    });
    let g = graph(
        vec![n],
        vec![f32_vi("x", &[Some(1)])],
        vec![f32_vi("y", &[])],
    );
    let err = parse(&model(g, 13), &registry()).unwrap_err().to_string();
    assert!(err.contains("ref_attr_name"), "{err}");
}

#[test]
fn sequence_and_optional_types_become_kinds() {
    let seq = proto::TypeProto {
        value: Some(proto::type_proto::Value::SequenceType(Box::new(
            proto::type_proto::Sequence {
                elem_type: Some(Box::new(tensor_type(DT::Int64, &[Some(2)]))),
            },
        ))),
        ..Default::default()
    };
    let opt = proto::TypeProto {
        value: Some(proto::type_proto::Value::OptionalType(Box::new(
            proto::type_proto::Optional {
                elem_type: Some(Box::new(seq.clone())),
            },
        ))),
        ..Default::default()
    };
    let f = fact_from_type(&seq, "s").unwrap();
    assert_eq!(f.kind, ValueKind::Sequence);
    assert_eq!(f.dtype, Some(DType::I64));
    let f = fact_from_type(&opt, "o").unwrap();
    assert_eq!(f.kind, ValueKind::OptionalSequence);
    let bad = tensor_type(DT::Complex64, &[]);
    let err = fact_from_type(&bad, "graph input q")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("COMPLEX64") && err.contains("graph input q"),
        "{err}"
    );
}

#[test]
fn tensors_from_all_fields() {
    let mk = |dt: DT, dims: &[i64]| proto::TensorProto {
        name: Some("t".into()),
        data_type: Some(dt as i32),
        dims: dims.to_vec(),
        ..Default::default()
    };
    let mut t = mk(DT::Float, &[2]);
    t.raw_data = Some(
        [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    );
    assert_eq!(
        tensor_from_proto(&t, None)
            .unwrap()
            .as_slice::<f32>()
            .unwrap(),
        &[1.5, -2.0]
    );
    let mut t = mk(DT::Int8, &[3]);
    t.int32_data = vec![-1, 5, 127];
    assert_eq!(
        tensor_from_proto(&t, None)
            .unwrap()
            .as_slice::<i8>()
            .unwrap(),
        &[-1, 5, 127]
    );
    let mut t = mk(DT::Bool, &[2]);
    t.int32_data = vec![1, 0];
    assert_eq!(
        tensor_from_proto(&t, None).unwrap().as_bools().unwrap(),
        &[true, false]
    );
    let mut t = mk(DT::Float16, &[1]);
    t.int32_data = vec![half::f16::from_f32(0.5).to_bits() as i32];
    assert_eq!(
        tensor_from_proto(&t, None)
            .unwrap()
            .as_slice::<half::f16>()
            .unwrap()[0]
            .to_f32(),
        0.5
    );
    let mut t = mk(DT::Bfloat16, &[1]);
    t.int32_data = vec![half::bf16::from_f32(-3.0).to_bits() as i32];
    assert_eq!(
        tensor_from_proto(&t, None)
            .unwrap()
            .as_slice::<half::bf16>()
            .unwrap()[0]
            .to_f32(),
        -3.0
    );
    let mut t = mk(DT::Uint32, &[2]);
    t.uint64_data = vec![7, 4_000_000_000];
    assert_eq!(
        tensor_from_proto(&t, None)
            .unwrap()
            .as_slice::<u32>()
            .unwrap(),
        &[7, 4_000_000_000]
    );
    let mut t = mk(DT::Uint64, &[1]);
    t.uint64_data = vec![u64::MAX];
    assert_eq!(
        tensor_from_proto(&t, None)
            .unwrap()
            .as_slice::<u64>()
            .unwrap(),
        &[u64::MAX]
    );
    let mut t = mk(DT::Double, &[1]);
    t.double_data = vec![2.25];
    assert_eq!(
        tensor_from_proto(&t, None)
            .unwrap()
            .as_slice::<f64>()
            .unwrap(),
        &[2.25]
    );
    let mut t = mk(DT::Int64, &[]);
    t.int64_data = vec![-9];
    let s = tensor_from_proto(&t, None).unwrap();
    assert_eq!(
        (s.shape().len(), s.as_slice::<i64>().unwrap()),
        (0, &[-9i64][..])
    );
    let mut t = mk(DT::String, &[2]);
    t.string_data = vec![b"hi".to_vec(), vec![0xff, b'x']];
    let s = tensor_from_proto(&t, None).unwrap();
    assert_eq!(s.as_strings().unwrap()[0], "hi");
    assert_eq!(s.as_strings().unwrap()[1], "\u{fffd}x");
    let t = mk(DT::Float, &[0, 3]);
    assert_eq!(tensor_from_proto(&t, None).unwrap().shape(), &[0, 3]);
}

#[test]
fn tensor_errors_name_the_tensor() {
    let mut t = f32_tensor("weights", &[2, 2], &[1.0, 2.0, 3.0]);
    let err = tensor_from_proto(&t, None).unwrap_err().to_string();
    assert!(
        err.contains("weights") && err.contains("float_data has 3"),
        "{err}"
    );
    t.float_data.clear();
    t.raw_data = Some(vec![0; 15]);
    let err = tensor_from_proto(&t, None).unwrap_err().to_string();
    assert!(err.contains("weights") && err.contains("16 bytes"), "{err}");
    t.data_type = Some(DT::Complex64 as i32);
    let err = tensor_from_proto(&t, None).unwrap_err().to_string();
    assert!(
        err.contains("weights") && err.contains("COMPLEX64"),
        "{err}"
    );
    // A packed 4-bit tensor whose byte count does not fit its shape.
    t.data_type = Some(DT::Int4 as i32);
    let err = tensor_from_proto(&t, None).unwrap_err().to_string();
    assert!(err.contains("weights") && err.contains("i4"), "{err}");
    let mut t = f32_tensor("neg", &[-1], &[]);
    t.dims = vec![-1];
    assert!(tensor_from_proto(&t, None)
        .unwrap_err()
        .to_string()
        .contains("negative"));
    let t = f32_tensor("huge", &[1 << 40, 1 << 40, 1 << 40], &[]);
    assert!(tensor_from_proto(&t, None)
        .unwrap_err()
        .to_string()
        .contains("too large"));
}

fn external(
    name: &str,
    location: &str,
    offset: Option<u64>,
    length: Option<u64>,
    dims: &[i64],
) -> proto::TensorProto {
    let kv = |k: &str, v: String| proto::StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    let mut ext = vec![kv("location", location.into())];
    if let Some(o) = offset {
        ext.push(kv("offset", o.to_string()));
    }
    if let Some(l) = length {
        ext.push(kv("length", l.to_string()));
    }
    proto::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DT::Float as i32),
        external_data: ext,
        data_location: Some(proto::tensor_proto::DataLocation::External as i32),
        ..Default::default()
    }
}

#[test]
fn external_data_is_read_and_confined() {
    let dir = std::env::temp_dir().join(format!("kiln-onnx-ext-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let data: Vec<u8> = [9.0f32, 1.0, 2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(dir.join("sub/w.bin"), &data).unwrap();
    let t = external("w", "sub/w.bin", Some(4), Some(12), &[3]);
    let got = tensor_from_proto(&t, Some(&dir)).unwrap();
    assert_eq!(got.as_slice::<f32>().unwrap(), &[1.0, 2.0, 3.0]);
    let t = external("w", "sub/w.bin", None, None, &[4]);
    assert_eq!(tensor_from_proto(&t, Some(&dir)).unwrap().len(), 4);
    let t = external("w", "sub/w.bin", Some(8), Some(12), &[3]);
    assert!(tensor_from_proto(&t, Some(&dir))
        .unwrap_err()
        .to_string()
        .contains("beyond the end"));
    for bad in ["../w.bin", "/etc/passwd", "sub/../../x"] {
        let t = external("w", bad, None, None, &[1]);
        let err = tensor_from_proto(&t, Some(&dir)).unwrap_err().to_string();
        assert!(err.contains("inside the model's directory"), "{bad}: {err}");
    }
    let t = external("w", "sub/w.bin", None, None, &[4]);
    assert!(tensor_from_proto(&t, None).is_err());
    // Through a model file on disk.
    let mut g = graph(
        vec![node("Add", "", &["x", "w"], &["y"])],
        vec![f32_vi("x", &[Some(3)])],
        vec![f32_vi("y", &[Some(3)])],
    );
    g.initializer
        .push(external("w", "sub/w.bin", Some(4), Some(12), &[3]));
    let path = dir.join("m.onnx");
    std::fs::write(&path, model(g, 13).encode_to_vec()).unwrap();
    let m = load_model(&path, &registry()).unwrap();
    let out = run(&m, &[Tensor::from_vec(&[3], vec![1.0f32; 3]).unwrap()]);
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[2.0, 3.0, 4.0]);
    let err = load_model(Path::new("/nonexistent/x.onnx"), &registry())
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/x.onnx"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sparse_tensors_densify() {
    let sp = proto::SparseTensorProto {
        values: Some(f32_tensor("sp", &[2], &[5.0, 6.0])),
        indices: Some(proto::TensorProto {
            dims: vec![2, 2],
            data_type: Some(DT::Int64 as i32),
            int64_data: vec![0, 1, 1, 2],
            ..Default::default()
        }),
        dims: vec![2, 3],
    };
    let t = sparse_to_dense(&sp, None).unwrap();
    assert_eq!(
        t.as_slice::<f32>().unwrap(),
        &[0.0, 5.0, 0.0, 0.0, 0.0, 6.0]
    );
    let mut bad = sp.clone();
    bad.dims = vec![1, 1];
    assert!(sparse_to_dense(&bad, None).is_err());
}

#[test]
fn test_data_files_parse() {
    let t = f32_tensor("x", &[2], &[1.0, 2.0]);
    assert_eq!(
        parse_tensor_pb(&t.encode_to_vec())
            .unwrap()
            .as_slice::<f32>()
            .unwrap(),
        &[1.0, 2.0]
    );
    let seq = proto::SequenceProto {
        elem_type: Some(proto::sequence_proto::DataType::Tensor as i32),
        tensor_values: vec![t.clone(), t.clone()],
        ..Default::default()
    };
    match parse_sequence_pb(&seq.encode_to_vec()).unwrap() {
        Value::Sequence(v) => assert_eq!(v.len(), 2),
        other => panic!("{other:?}"),
    }
    let opt = proto::OptionalProto {
        elem_type: Some(proto::optional_proto::DataType::Tensor as i32),
        tensor_value: Some(t),
        ..Default::default()
    };
    assert!(matches!(
        parse_optional_pb(&opt.encode_to_vec()).unwrap(),
        Value::Optional(Some(_))
    ));
    let empty = proto::OptionalProto {
        elem_type: Some(1),
        ..Default::default()
    };
    assert!(matches!(
        parse_optional_pb(&empty.encode_to_vec()).unwrap(),
        Value::Optional(None)
    ));
    assert!(parse_tensor_pb(&[0xff, 0xff, 0xff]).is_err());
}

#[test]
fn local_functions_are_inlined() {
    // AddTwice(a, b) -> (r): t = a + b; r = t + b   (in domain "custom")
    let f = proto::FunctionProto {
        name: Some("AddTwice".into()),
        domain: Some("custom".into()),
        input: vec!["a".into(), "b".into()],
        output: vec!["r".into()],
        node: vec![
            node("Add", "", &["a", "b"], &["t"]),
            node("Add", "", &["t", "b"], &["r"]),
        ],
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(13),
        }],
        ..Default::default()
    };
    let mut call1 = node("AddTwice", "c1", &["x", "y"], &["z1"]);
    call1.domain = Some("custom".into());
    let mut call2 = node("AddTwice", "c2", &["z1", "y"], &["z2"]);
    call2.domain = Some("custom".into());
    let g = graph(
        vec![call1, call2],
        vec![f32_vi("x", &[Some(1)]), f32_vi("y", &[Some(1)])],
        vec![f32_vi("z2", &[Some(1)])],
    );
    let mut m = model(g, 13);
    m.functions.push(f);
    m.opset_import.push(proto::OperatorSetIdProto {
        domain: Some("custom".into()),
        version: Some(1),
    });
    let m = parse(&m, &registry()).unwrap();
    assert_eq!(m.graph.nodes.len(), 4);
    let out = run(
        &m,
        &[
            Tensor::from_vec(&[1], vec![1.0f32]).unwrap(),
            Tensor::from_vec(&[1], vec![10.0f32]).unwrap(),
        ],
    );
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[41.0]);
}

#[test]
fn function_attribute_refs_resolve() {
    // Scale(a) -> (r) = Constant(value_float = @k) + a ; default k = 2.5
    let mut c = node("Constant", "", &[], &["k"]);
    c.attribute.push(proto::AttributeProto {
        name: Some("value_float".into()),
        ref_attr_name: Some("k".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
        ..Default::default()
    });
    let f = proto::FunctionProto {
        name: Some("Shift".into()),
        domain: Some("custom".into()),
        input: vec!["a".into()],
        output: vec!["r".into()],
        attribute_proto: vec![proto::AttributeProto {
            name: Some("k".into()),
            r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
            f: Some(2.5),
            ..Default::default()
        }],
        node: vec![c, node("Add", "", &["a", "k"], &["r"])],
        ..Default::default()
    };
    let mut call_default = node("Shift", "s1", &["x"], &["y1"]);
    call_default.domain = Some("custom".into());
    let mut call_given = node("Shift", "s2", &["x"], &["y2"]);
    call_given.domain = Some("custom".into());
    call_given.attribute.push(proto::AttributeProto {
        name: Some("k".into()),
        r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
        f: Some(100.0),
        ..Default::default()
    });
    let g = graph(
        vec![call_default, call_given],
        vec![f32_vi("x", &[Some(1)])],
        vec![f32_vi("y1", &[Some(1)]), f32_vi("y2", &[Some(1)])],
    );
    let mut m = model(g, 13);
    m.functions.push(f);
    let m = parse(&m, &registry()).unwrap();
    let out = run(&m, &[Tensor::from_vec(&[1], vec![1.0f32]).unwrap()]);
    assert_eq!(out[0].to_f32_vec().unwrap(), vec![3.5]);
    assert_eq!(out[1].to_f32_vec().unwrap(), vec![101.0]);
}
