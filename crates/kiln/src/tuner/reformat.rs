//! Inserting reformat layers where the tuner chose different formats for a producer and a
//! consumer.
//!
//! A layer tuned to a lower precision reads its activations in that precision: an ONNX
//! `Cast` named `reformat:<value>-><precision>` is inserted in front of it (its float
//! weights are converted once, at build time). Its outputs are produced in that precision
//! under a new name, and a `Cast` back to FP32 (named `reformat:<value>->fp32`) restores the
//! original value for FP32 consumers and engine outputs; consumers in the same precision
//! read the low-precision value directly.
//!
//! A layer tuned to the channels-last layout (`fp32/nhwc`) reads and writes N × H × W × C:
//! an ONNX `Transpose` named `reformat:<value>->nhwc` converts each of its rank-4
//! activation inputs (once per value), its outputs are produced under new names
//! (`<value>:nhwc`), and a `Transpose` back (`reformat:<value>:nhwc->linear`) restores the
//! original value where a linear consumer or an engine output reads it. A run of
//! channels-last layers passes its tensors on with no reformat between them.

use std::collections::{HashMap, HashSet};

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
    one_to_one(name, desc, input, output)
}

/// A reformat layer: `desc`'s op reading `input` and writing `output`.
fn one_to_one(name: String, desc: OpDesc, input: ValueId, output: ValueId) -> Result<Node> {
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
    one_to_one(name, desc, input, output)
}

fn with_dtype(fact: &Fact, dtype: DType) -> Fact {
    Fact {
        dtype: Some(dtype),
        konst: None,
        ..fact.clone()
    }
}

/// The shape a tensor of linear (ONNX) shape `shape` has when stored in `layout`.
pub fn layout_shape(layout: Layout, shape: &[usize]) -> Vec<usize> {
    match layout {
        Layout::Linear => shape.to_vec(),
        Layout::ChannelsLast => kiln_cpu::ops::conv::nhwc::to_nhwc(shape),
    }
}

/// The reformat layer converting the FP32 tensor of linear shape `shape` (rank 4) from
/// layout `from` to `to`: an ONNX `Transpose` reading value `input` and writing `output`.
/// Returns it with the shape it reads.
pub(crate) fn layout_node(
    name: String,
    input: ValueId,
    output: ValueId,
    from: Layout,
    to: Layout,
    shape: &[usize],
) -> Result<(Node, Vec<usize>)> {
    if shape.len() != 4 {
        return Err(KilnError::Other(format!(
            "layout reformat {name}: only rank-4 tensors change layout, found shape {shape:?}"
        )));
    }
    use kiln_cpu::ops::conv::nhwc::{NCHW_TO_NHWC, NHWC_TO_NCHW};
    let perm = match (from, to) {
        (Layout::Linear, Layout::ChannelsLast) => NCHW_TO_NHWC,
        (Layout::ChannelsLast, Layout::Linear) => NHWC_TO_NCHW,
        _ => {
            return Err(KilnError::Other(format!(
                "layout reformat {name}: no conversion from {} to {}",
                from.name(),
                to.name()
            )))
        }
    };
    let mut desc = OpDesc::new("", "Transpose", 13);
    let perm = perm.iter().map(|&a| a as i64).collect();
    desc.attrs.insert("perm".into(), Attr::Ints(perm));
    Ok((
        one_to_one(name, desc, input, output)?,
        layout_shape(from, shape),
    ))
}

/// Rewrites `graph` so every node in `formats` (node index → chosen format; absent = FP32,
/// linear) reads and writes its chosen format. Returns the number of reformat layers
/// inserted.
pub fn insert(graph: &mut Graph, formats: &HashMap<usize, Format>) -> Result<usize> {
    let channels_last: HashSet<String> = formats
        .iter()
        .filter(|(_, f)| f.layout == Layout::ChannelsLast)
        .map(|(&ni, _)| graph.nodes[ni].name.clone())
        .collect();
    if let Some(f) = formats
        .values()
        .find(|f| f.layout == Layout::ChannelsLast && f.precision != Precision::Fp32)
    {
        return Err(KilnError::Other(format!(
            "the tuner chose format {f}: channels-last layers run in fp32 only"
        )));
    }
    let mut inserted = insert_precisions(graph, formats)?;
    if !channels_last.is_empty() {
        inserted += insert_layouts(graph, &channels_last)?;
    }
    Ok(inserted)
}

/// The layout part of [`insert`]: Transposes around the nodes named in `channels_last`.
fn insert_layouts(graph: &mut Graph, channels_last: &HashSet<String>) -> Result<usize> {
    let old_nodes = std::mem::take(&mut graph.nodes);
    // linear value → the value holding it channels-last.
    let mut converted: HashMap<ValueId, ValueId> = HashMap::new();
    let mut nodes = Vec::with_capacity(old_nodes.len());
    let mut inserted = 0;
    let nhwc_value = |graph: &mut Graph, v: ValueId| -> Option<(ValueId, Vec<usize>)> {
        let fact = &graph.values[v].fact;
        let shape = fact.concrete_shape().filter(|s| s.len() == 4)?;
        let fact = Fact::concrete(fact.dtype?, &layout_shape(Layout::ChannelsLast, &shape));
        let name = format!("{}:nhwc", graph.values[v].name);
        Some((graph.add_value(name, fact), shape))
    };
    for mut node in old_nodes {
        if !channels_last.contains(&node.name) {
            nodes.push(node);
            continue;
        }
        // A Conv's constants are its weights, in the Conv's own layout; the constant
        // operands of the other (elementwise) layers are permuted like their activations.
        let is_conv = node.desc.op_type == "Conv";
        for input in node.inputs.iter_mut().flatten() {
            let v = *input;
            let konst = graph.constants.contains_key(&v);
            if konst && is_conv {
                continue;
            }
            if let Some(&c) = converted.get(&v) {
                *input = c;
                continue;
            }
            let Some((c, shape)) = nhwc_value(graph, v) else {
                continue; // not rank 4: read as it is
            };
            if let Some(t) = graph.constants.get(&v) {
                let permuted = permute_constant(t)?;
                graph.constants.insert(c, permuted);
                converted.insert(v, c);
                *input = c;
                continue;
            }
            let name = format!("reformat:{}->nhwc", graph.values[v].name);
            let to = Layout::ChannelsLast;
            nodes.push(layout_node(name, v, c, Layout::Linear, to, &shape)?.0);
            inserted += 1;
            converted.insert(v, c);
            *input = c;
        }
        let mut restores = Vec::new();
        for output in node.outputs.iter_mut().flatten() {
            let v = *output;
            let Some((c, shape)) = nhwc_value(graph, v) else {
                return Err(KilnError::Other(format!(
                    "layer {} was tuned channels-last, but its output {} is not a known rank-4 tensor",
                    node.name, graph.values[v].name
                )));
            };
            *output = c;
            converted.insert(v, c);
            let name = format!("reformat:{}->linear", graph.values[c].name);
            let from = Layout::ChannelsLast;
            restores.push(layout_node(name, c, v, from, Layout::Linear, &shape)?.0);
        }
        nodes.push(node);
        inserted += restores.len();
        nodes.extend(restores);
    }
    finish(graph, nodes, inserted)
}

/// A rank-4 constant `t` (linear layout) in the channels-last layout.
pub(crate) fn permute_constant(t: &kiln_core::Tensor) -> Result<kiln_core::Tensor> {
    let (node, _) = layout_node(
        "constant".into(),
        0,
        1,
        Layout::Linear,
        Layout::ChannelsLast,
        t.shape(),
    )?;
    node.op
        .eval(&[Some(&kiln_core::Value::Tensor(t.clone()))])?
        .remove(0)
        .into_tensor()
}

/// The precision part of [`insert`]: Casts (or INT8 quantize/dequantize layers) around the
/// nodes tuned to a lower precision.
fn insert_precisions(graph: &mut Graph, formats: &HashMap<usize, Format>) -> Result<usize> {
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
    finish(graph, nodes, inserted)
}

/// Installs the rewritten node list: restores no consumer or engine output reads are
/// dropped again, the nodes are put back in topological order. Returns how many of the
/// `inserted` reformat layers remain.
fn finish(graph: &mut Graph, nodes: Vec<Node>, inserted: usize) -> Result<usize> {
    graph.nodes = nodes;
    let before = graph.nodes.len();
    passes::remove_dead_nodes(graph)?;
    let inserted = inserted.saturating_sub(before - graph.nodes.len());
    graph.toposort()?;
    Ok(inserted)
}
