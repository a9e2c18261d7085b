//! From calibrated FP32 layers to INT8 ones.
//!
//! 1. [`annotate`]: every Conv, MatMul and Gemm whose input and output tensors have scales
//!    in the calibration cache gets them as attributes ([`X_SCALE_ATTR`], [`Y_SCALE_ATTR`]).
//! 2. [`tactics`]: such layers offer INT8 tactics (`cpu.int8.<conv|matmul>.<isa>`) next to
//!    their FP32 ones; the tuner times both and weighs the reformats (quantize/dequantize)
//!    INT8 layers need between FP32 neighbours.
//! 3. [`lower_node`]: a layer the tuner put in the INT8 pool becomes `kiln.Int8Conv` or
//!    `kiln.Int8MatMul` with its weights quantized per output channel at build time; the
//!    reformat pass then inserts `kiln.Int8Quantize` / `kiln.Int8Dequantize` around it.

use kiln_core::tactic::{TACTIC_ATTR, TACTIC_TIME_ATTR};
use kiln_core::{
    Attr, BuildCtx, DType, Fact, Graph, KilnError, Node, OpDesc, Result, Tactic, Tensor,
};
use kiln_cpu::ops::int8 as k8;

use crate::engine::registry;
use crate::int8::cache::CalibrationCache;

/// Attribute: the calibrated scale of a layer's input activation.
pub const X_SCALE_ATTR: &str = "kiln_int8_x_scale";
/// Attribute: the calibrated scale of a layer's output activation.
pub const Y_SCALE_ATTR: &str = "kiln_int8_y_scale";
/// The id of the FP32 tactic offered next to INT8 ones for ops with no tactics of their
/// own (MatMul, Gemm): their one built-in implementation.
pub const BUILTIN_TACTIC: &str = "cpu.builtin";

/// Marks the Conv/MatMul/Gemm layers whose input and output scales the cache has; returns
/// how many.
pub fn annotate(graph: &mut Graph, cache: &CalibrationCache) -> usize {
    let mut count = 0;
    for node in &mut graph.nodes {
        // A Conv with a fused residual has no INT8 form (its kernels take no residual).
        if !matches!(node.desc.op_type.as_str(), "Conv" | "MatMul" | "Gemm")
            || kiln_cpu::ops::conv::has_residual(node)
        {
            continue;
        }
        let (Some(Some(x)), Some(Some(y))) = (node.inputs.first(), node.outputs.first()) else {
            continue;
        };
        let (Some(sx), Some(sy)) = (
            cache.scale(&graph.values[*x].name),
            cache.scale(&graph.values[*y].name),
        ) else {
            continue;
        };
        node.desc.attrs.insert(X_SCALE_ATTR.into(), Attr::Float(sx));
        node.desc.attrs.insert(Y_SCALE_ATTR.into(), Attr::Float(sy));
        count += 1;
    }
    count
}

/// The INT8 tactics of an annotated layer (none for others).
pub fn tactics(node: &Node, inputs: &[Option<&Fact>]) -> Vec<Tactic> {
    if !node.desc.attrs.contains_key(X_SCALE_ATTR) {
        return Vec::new();
    }
    k8::tactics_for(&node.desc, inputs)
}

fn float_attr(desc: &OpDesc, name: &str) -> Result<f32> {
    match desc.attrs.get(name) {
        Some(Attr::Float(v)) => Ok(*v),
        _ => Err(KilnError::Other(format!(
            "layer is not calibrated (no {name} attribute): it cannot run in INT8"
        ))),
    }
}

fn weight<'a>(node: &Node, consts: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    match consts.get(i).copied().flatten() {
        Some(t) if t.dtype() == DType::F32 => Ok(t),
        Some(t) => Err(KilnError::Other(format!(
            "layer {}: input {i} is {}, INT8 lowering needs f32 weights",
            node.name,
            t.dtype()
        ))),
        None => Err(KilnError::Other(format!(
            "layer {}: input {i} is not a constant, INT8 lowering needs constant weights",
            node.name
        ))),
    }
}

/// The INT8 description of `node` for tactic `tactic_id`, and the constants that replace
/// its weight inputs (by input index; `None` = keep the input). `consts[i]` is input `i`'s
/// value when it is a constant.
pub fn lowered(
    node: &Node,
    consts: &[Option<&Tensor>],
    tactic_id: &str,
) -> Result<(OpDesc, Vec<Option<Tensor>>)> {
    let src = &node.desc;
    let op_type = match src.op_type.as_str() {
        "Conv" => "Int8Conv",
        "MatMul" | "Gemm" => "Int8MatMul",
        other => {
            return Err(KilnError::Other(format!(
                "layer {}: {other} has no INT8 form",
                node.name
            )))
        }
    };
    let mut desc = OpDesc::new(kiln_cpu::fused::KILN_DOMAIN, op_type, 1);
    for (k, v) in &src.attrs {
        let internal = [TACTIC_ATTR, TACTIC_TIME_ATTR, X_SCALE_ATTR, Y_SCALE_ATTR];
        if !internal.contains(&k.as_str()) {
            desc.attrs.insert(k.clone(), v.clone());
        }
    }
    desc.attrs.insert(
        k8::X_SCALE.into(),
        Attr::Float(float_attr(src, X_SCALE_ATTR)?),
    );
    desc.attrs.insert(
        k8::Y_SCALE.into(),
        Attr::Float(float_attr(src, Y_SCALE_ATTR)?),
    );
    desc.attrs
        .insert(TACTIC_ATTR.into(), Attr::String(tactic_id.to_string()));
    let mut out: Vec<Option<Tensor>> = vec![None; node.inputs.len().max(3)];
    let (w_q, scales, bias) = if op_type == "Int8Conv" {
        let w = weight(node, consts, 1)?;
        let rows = w.shape().first().copied().unwrap_or(0);
        let cols = w.len() / rows.max(1);
        let (q, s) = k8::quantize_rows(w.as_slice::<f32>()?, rows, cols);
        let bias = match node.inputs.get(2).copied().flatten() {
            Some(_) => Some(weight(node, consts, 2)?.clone()),
            None => None,
        };
        (Tensor::from_vec(w.shape(), q)?, s, bias)
    } else {
        let int = |n: &str| match src.attrs.get(n) {
            Some(Attr::Int(v)) => *v,
            _ => 0,
        };
        let fl = |n: &str| match src.attrs.get(n) {
            Some(Attr::Float(v)) => *v,
            _ => 1.0,
        };
        let gemm = src.op_type == "Gemm";
        if gemm && int("transA") != 0 {
            return Err(KilnError::Other(format!(
                "layer {}: Gemm with transA has no INT8 form",
                node.name
            )));
        }
        let b = weight(node, consts, 1)?;
        if b.shape().len() != 2 {
            return Err(KilnError::Other(format!(
                "layer {}: INT8 MatMul needs a 2-D weight, found {:?}",
                node.name,
                b.shape()
            )));
        }
        let bv = b.as_slice::<f32>()?;
        let alpha = if gemm { fl("alpha") } else { 1.0 };
        // W = alpha · op(B)ᵀ, N × K.
        let (n, k, wt): (usize, usize, Vec<f32>) = if gemm && int("transB") != 0 {
            let (n, k) = (b.shape()[0], b.shape()[1]);
            (n, k, bv.iter().map(|v| v * alpha).collect())
        } else {
            let (k, n) = (b.shape()[0], b.shape()[1]);
            let mut t = vec![0.0; n * k];
            for kk in 0..k {
                for nn in 0..n {
                    t[nn * k + kk] = bv[kk * n + nn] * alpha;
                }
            }
            (n, k, t)
        };
        let (q, s) = k8::quantize_rows(&wt, n, k);
        let bias = match (gemm, node.inputs.get(2).copied().flatten()) {
            (true, Some(_)) => {
                let c = weight(node, consts, 2)?;
                let beta = fl("beta");
                let cv = c.as_slice::<f32>()?;
                let full: Vec<f32> = match cv.len() {
                    1 => vec![cv[0] * beta; n],
                    l if l == n => cv.iter().map(|v| v * beta).collect(),
                    _ => {
                        return Err(KilnError::Other(format!(
                            "layer {}: Gemm's C {:?} is not one value per output column",
                            node.name,
                            c.shape()
                        )))
                    }
                };
                Some(Tensor::from_vec(&[n], full)?)
            }
            _ => None,
        };
        for k in ["alpha", "beta", "transA", "transB"] {
            desc.attrs.remove(k);
        }
        (Tensor::from_vec(&[n, k], q)?, s, bias)
    };
    desc.attrs.insert(k8::W_SCALES.into(), Attr::Floats(scales));
    out[1] = Some(w_q);
    out[2] = bias;
    out.truncate(if out[2].is_some() { 3 } else { 2 });
    Ok((desc, out))
}

/// Rewrites node `ni` of `graph` into its INT8 form for `tactic_id` (weights quantized and
/// stored as new constants; the old ones are dropped when nothing else reads them).
pub fn lower_node(graph: &mut Graph, ni: usize, tactic_id: &str) -> Result<()> {
    let (desc, replaced) = {
        let node = &graph.nodes[ni];
        let consts: Vec<Option<&Tensor>> = node
            .inputs
            .iter()
            .map(|i| i.and_then(|v| graph.constants.get(&v)))
            .collect();
        lowered(node, &consts, tactic_id)?
    };
    let name = graph.nodes[ni].name.clone();
    let mut old = Vec::new();
    let mut inputs = graph.nodes[ni].inputs.clone();
    inputs.truncate(replaced.len());
    for (i, t) in replaced.into_iter().enumerate() {
        let Some(t) = t else { continue };
        let id = graph.add_value(
            format!("{name}:int8_input{i}"),
            Fact::concrete(t.dtype(), t.shape()),
        );
        graph.constants.insert(id, t);
        if let Some(Some(prev)) = inputs.get(i) {
            old.push(*prev);
        }
        if i < inputs.len() {
            inputs[i] = Some(id);
        } else {
            inputs.push(Some(id));
        }
    }
    let node = &mut graph.nodes[ni];
    node.inputs = inputs;
    node.op = registry().build(&BuildCtx {
        node: &node.name,
        desc: &desc,
        n_inputs: node.inputs.len(),
        n_outputs: node.outputs.len(),
    })?;
    node.desc = desc;
    for v in old {
        let used = graph
            .nodes
            .iter()
            .any(|n| n.inputs.iter().flatten().any(|&i| i == v))
            || graph.outputs.contains(&v);
        if !used {
            graph.constants.remove(&v);
        }
    }
    Ok(())
}
