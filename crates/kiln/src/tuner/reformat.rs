//! Inserting reformat layers where the tuner chose different formats for a producer and a
//! consumer.
//!
//! A layer tuned to a lower precision reads its activations in that precision: an ONNX
//! `Cast` named `reformat:<value>-><precision>` is inserted in front of it (its float
//! weights are converted once, at build time). Its outputs are produced in that precision
//! under a new name, and a `Cast` back to FP32 (named `reformat:<value>->fp32`) restores the
//! original value for FP32 consumers and engine outputs; consumers in the same precision
//! read the low-precision value directly. Layout changes are not implemented yet and are
//! refused with an error.

use std::collections::HashMap;

use kiln_core::{
    passes, Attr, BuildCtx, DType, Fact, Format, Graph, KilnError, Layout, Node, OpDesc, Precision,
    Result, ValueId,
};

use crate::engine::registry;

/// ONNX `TensorProto.DataType` codes for the precisions a reformat converts between.
fn onnx_code(p: Precision) -> Result<(i64, DType)> {
    match p {
        Precision::Fp32 => Ok((1, DType::F32)),
        Precision::Fp16 => Ok((10, DType::F16)),
        Precision::Int8 => Ok((3, DType::I8)),
    }
}

/// The scale attribute (`x_scale` for inputs, `y_scale` for outputs) of a lowered INT8 layer.
fn int8_scale(node: &Node, attr: &str) -> Result<f32> {
    match node.desc.attrs.get(attr) {
        Some(Attr::Float(s)) => Ok(*s),
        _ => Err(KilnError::Other(format!(
            "INT8 layer {} has no {attr} attribute: it was not lowered",
            node.name
        ))),
    }
}

/// `kiln.Int8Quantize` (to INT8) or `kiln.Int8Dequantize` (back to FP32) with one scale.
pub(crate) fn qdq_node(
    name: String,
    input: ValueId,
    output: ValueId,
    quantize: bool,
    scale: f32,
) -> Result<Node> {
    let op = if quantize {
        "Int8Quantize"
    } else {
        "Int8Dequantize"
    };
    let mut desc = OpDesc::new(kiln_cpu::fused::KILN_DOMAIN, op, 1);
    desc.attrs.insert("scale".into(), Attr::Float(scale));
    let op = registry().build(&BuildCtx {
        node: &name,
        desc: &desc,
        n_inputs: 1,
        n_outputs: 1,
    })?;
    Ok(Node {
        fused_from: vec![name.clone()],
        name,
        desc,
        op,
        inputs: vec![Some(input)],
        outputs: vec![Some(output)],
    })
}

fn cast_node(name: String, input: ValueId, output: ValueId, to: Precision) -> Result<Node> {
    let mut desc = OpDesc::new("", "Cast", 19);
    desc.attrs.insert("to".into(), Attr::Int(onnx_code(to)?.0));
    let op = registry().build(&BuildCtx {
        node: &name,
        desc: &desc,
        n_inputs: 1,
        n_outputs: 1,
    })?;
    Ok(Node {
        fused_from: vec![name.clone()],
        name,
        desc,
        op,
        inputs: vec![Some(input)],
        outputs: vec![Some(output)],
    })
}

fn with_dtype(fact: &Fact, dtype: DType) -> Fact {
    Fact {
        dtype: Some(dtype),
        konst: None,
        ..fact.clone()
    }
}

/// Rewrites `graph` so every node in `formats` (node index → chosen format; absent = FP32)
/// reads and writes its chosen format. Returns the number of reformat layers inserted.
pub fn insert(graph: &mut Graph, formats: &HashMap<usize, Format>) -> Result<usize> {
    if let Some(f) = formats.values().find(|f| f.layout != Layout::Linear) {
        return Err(KilnError::Other(format!(
            "the tuner chose format {f}, but layout reformats are not implemented yet"
        )));
    }
    if formats.values().all(|f| f.precision == Precision::Fp32) {
        return Ok(0);
    }
    let precision_of = |ni: usize| formats.get(&ni).map_or(Precision::Fp32, |f| f.precision);
    let old_nodes = std::mem::take(&mut graph.nodes);
    // (value, precision) → the value holding it in that precision.
    let mut converted: HashMap<(ValueId, Precision), ValueId> = HashMap::new();
    let mut nodes = Vec::with_capacity(old_nodes.len());
    let mut inserted = 0;
    for (ni, mut node) in old_nodes.into_iter().enumerate() {
        let p = precision_of(ni);
        if p == Precision::Fp32 {
            // Reads FP32: values produced in another precision were restored by a Cast.
            nodes.push(node);
            continue;
        }
        let (_, dtype) = onnx_code(p)?;
        let int8 = p == Precision::Int8;
        let (x_scale, y_scale) = if int8 {
            (int8_scale(&node, "x_scale")?, int8_scale(&node, "y_scale")?)
        } else {
            (1.0, 1.0)
        };
        for input in node.inputs.iter_mut().flatten() {
            let v = *input;
            if graph.values[v].fact.dtype != Some(DType::F32) {
                continue; // only FP32 activations and weights change precision
            }
            if int8 && graph.constants.contains_key(&v) {
                continue; // lowering quantized the weights; biases stay FP32
            }
            if let Some(&c) = converted.get(&(v, p)) {
                *input = c;
                continue;
            }
            let name = format!("{}->{}", graph.values[v].name, p);
            let low_fact = with_dtype(&graph.values[v].fact, dtype);
            let c = graph.add_value(name.clone(), low_fact);
            if let Some(t) = graph.constants.get(&v) {
                let t = t.cast(dtype)?;
                graph.constants.insert(c, t);
            } else if int8 {
                nodes.push(qdq_node(format!("reformat:{name}"), v, c, true, x_scale)?);
                inserted += 1;
            } else {
                nodes.push(cast_node(format!("reformat:{name}"), v, c, p)?);
                inserted += 1;
            }
            converted.insert((v, p), c);
            *input = c;
        }
        let mut restores = Vec::new();
        for output in node.outputs.iter_mut().flatten() {
            let v = *output;
            if graph.values[v].fact.dtype != Some(DType::F32) {
                continue;
            }
            let name = format!("{}:{}", graph.values[v].name, p);
            let low = graph.add_value(name.clone(), with_dtype(&graph.values[v].fact, dtype));
            *output = low;
            converted.insert((v, p), low);
            let restore = format!("reformat:{name}->fp32");
            restores.push(if int8 {
                qdq_node(restore, low, v, false, y_scale)?
            } else {
                cast_node(restore, low, v, Precision::Fp32)?
            });
        }
        nodes.push(node);
        inserted += restores.len();
        nodes.extend(restores);
    }
    graph.nodes = nodes;
    // Restores whose value no FP32 consumer or output reads are dropped again.
    let before = graph.nodes.len();
    passes::remove_dead_nodes(graph)?;
    inserted = inserted.saturating_sub(before - graph.nodes.len());
    graph.toposort()?;
    Ok(inserted)
}
