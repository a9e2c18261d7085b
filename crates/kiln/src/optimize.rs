//! The optimisation pipeline: generic folding and cleanup from `kiln_core::passes`, plus the
//! fusions that need kiln's CPU kernels (BatchNormalization and constant per-channel
//! Mul/Add/Sub/Div folded into Conv weights, see [`crate::fold_affine`], activations fused
//! into the epilogue of Conv, Gemm and MatMul).
//!
//! Subgraphs (If/Loop/Scan bodies) are not optimised yet; they run as imported.

use kiln_core::passes::{self, Pass};
use kiln_core::{
    Attr, BuildCtx, DType, Fact, Graph, KilnError, OpRegistry, Result, Tensor, ValueId,
};
use kiln_cpu::fused::Activation;

use crate::fold_affine;

/// What the optimiser did, for logs and `kiln inspect`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct OptimizeReport {
    /// Nodes in the imported graph.
    pub nodes_before: usize,
    /// Nodes after optimisation.
    pub nodes_after: usize,
    /// Rewrites by the generic passes (folding, dead code, identities).
    pub generic_rewrites: usize,
    /// BatchNormalization nodes folded into a preceding Conv.
    pub batchnorms_folded: usize,
    /// Activations fused into Conv/Gemm/MatMul.
    pub activations_fused: usize,
    /// Residual Adds fused into the Conv before them (CPU engines, see
    /// [`crate::fuse_residual`]).
    #[serde(default)]
    pub residuals_fused: usize,
    /// QuantizeLinear → DequantizeLinear pairs folded into FakeQuant chain steps (CPU
    /// engines, see [`crate::int8::qdq_pairs`]).
    #[serde(default)]
    pub qdq_pairs_folded: usize,
    /// Explicit quantization: QuantizeLinear/DequantizeLinear layers lowered to INT8
    /// kernels (see [`crate::int8::qdq`]).
    #[serde(default)]
    pub qdq: crate::int8::qdq::QdqReport,
    /// `--accuracy-budget`: calibrated layers kept in FP32 to meet the budget (source node
    /// names), and the measured error of each output afterwards.
    #[serde(default)]
    pub int8_fallback: Option<crate::int8::budget::BudgetReport>,
}

/// Runs every pass to a fixpoint.
pub fn optimize(graph: &mut Graph, registry: &OpRegistry) -> Result<OptimizeReport> {
    let mut report = OptimizeReport {
        nodes_before: graph.nodes.len(),
        ..Default::default()
    };
    let generic: [(&str, Pass); 4] = [
        ("fold_known_values", passes::fold_known_values),
        ("fold_constants", passes::fold_constants),
        ("remove_identities", passes::remove_identities),
        ("remove_dead_nodes", passes::remove_dead_nodes),
    ];
    let mut affines = (0, 0);
    for _ in 0..8 {
        let g = passes::run_to_fixpoint(graph, &generic)?;
        let g = g + inline_constant_ifs(graph, registry)?;
        let bn = fold_batchnorm_into_conv(graph, registry)?;
        // Constant affines into the producing Conv before the activation fusion, so an
        // activation behind a per-channel Mul/Add (an unfused BatchNorm) fuses too.
        let into_conv = fold_affine::fold_affine_into_conv(graph, registry)?;
        let act = fuse_activations(graph, registry)?;
        // After the activation fusion: a written-out activation's constants (`/ 6`) must
        // not be folded forward before the activation is recognised.
        let into_next = fold_affine::fold_affine_into_next_conv(graph, registry)?;
        report.generic_rewrites += g;
        report.batchnorms_folded += bn;
        report.activations_fused += act;
        affines.0 += into_conv;
        affines.1 += into_next;
        if g + bn + act + into_conv + into_next == 0 {
            break;
        }
        graph.infer_facts()?;
    }
    tracing::debug!(
        into_conv = affines.0,
        into_next_conv = affines.1,
        "constant affines folded into Conv weights"
    );
    passes::remove_dead_nodes(graph)?;
    report.nodes_after = graph.nodes.len();
    Ok(report)
}

/// The value of a single-element constant condition, if `v` is one.
fn constant_condition(graph: &Graph, v: Option<ValueId>) -> Option<bool> {
    let v = v?;
    let t = graph
        .constants
        .get(&v)
        .or(graph.values[v].fact.konst.as_ref())?;
    if t.len() != 1 {
        return None;
    }
    let x = t.to_f64_vec().ok()?;
    Some(x[0] != 0.0)
}

/// Replaces every `If` whose condition is a known constant by the nodes of the branch it
/// takes (captured values wired to the node's inputs, branch constants added to the
/// graph's), so the branch is optimised, planned and run like the rest of the graph.
/// Conditions often become constant once input shapes are known (`Equal(Shape(x)[1], 1)`).
pub fn inline_constant_ifs(graph: &mut Graph, registry: &OpRegistry) -> Result<usize> {
    let mut inlined = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let node = &graph.nodes[i];
        if !is_plain(graph, i, "If") {
            i += 1;
            continue;
        }
        let Some(cond) = constant_condition(graph, node.inputs.first().copied().flatten()) else {
            i += 1;
            continue;
        };
        let subs = node.op.subgraphs();
        let [then_g, else_g] = subs.as_slice() else {
            i += 1;
            continue;
        };
        let branch = if cond { then_g.clone() } else { else_g.clone() };
        match splice_branch(graph, i, &branch, registry)? {
            Some(n) => {
                inlined += 1;
                i += n;
            }
            None => i += 1,
        }
    }
    Ok(inlined)
}

/// Replaces node `at` (an If) by the nodes of `branch`; returns how many nodes took its
/// place, or None (graph untouched) when the branch does not fit the node.
fn splice_branch(
    graph: &mut Graph,
    at: usize,
    branch: &Graph,
    registry: &OpRegistry,
) -> Result<Option<usize>> {
    let node = graph.nodes[at].clone();
    let n_caps = branch.captures.len();
    if !branch.inputs.is_empty()
        || branch.outputs.len() < node.outputs.len()
        || node.inputs.len() < 1 + n_caps
    {
        return Ok(None);
    }
    let start = node.inputs.len() - n_caps;
    let mut map: Vec<Option<ValueId>> = vec![None; branch.values.len()];
    for (k, cap) in branch.captures.iter().enumerate() {
        map[*cap] = node.inputs[start + k];
    }
    let mut names: std::collections::HashSet<String> =
        graph.values.iter().map(|v| v.name.clone()).collect();
    let mut fresh = |graph: &mut Graph, v: ValueId| -> ValueId {
        let info = &branch.values[v];
        let mut name = info.name.clone();
        while names.contains(&name) {
            name = format!("{name}/inlined");
        }
        names.insert(name.clone());
        graph.add_value(name, info.fact.clone())
    };
    for (id, t) in &branch.constants {
        if map[*id].is_none() {
            let v = fresh(graph, *id);
            graph.constants.insert(v, t.clone());
            map[*id] = Some(v);
        }
    }
    // Branch outputs produced by a branch node take the If's output ids directly.
    let mut claimed = vec![false; node.outputs.len()];
    let mut nodes = Vec::with_capacity(branch.nodes.len() + node.outputs.len());
    for bn in &branch.nodes {
        let mut inputs = Vec::with_capacity(bn.inputs.len());
        for inp in &bn.inputs {
            match inp {
                None => inputs.push(None),
                Some(v) => match map[*v] {
                    Some(m) => inputs.push(Some(m)),
                    None => return Ok(None),
                },
            }
        }
        let mut outputs = Vec::with_capacity(bn.outputs.len());
        for out in &bn.outputs {
            let Some(o) = out else {
                outputs.push(None);
                continue;
            };
            let target = branch
                .outputs
                .iter()
                .position(|bo| bo == o)
                .filter(|&j| j < node.outputs.len() && !claimed[j])
                .and_then(|j| node.outputs[j].map(|id| (j, id)));
            let id = match target {
                Some((j, id)) => {
                    claimed[j] = true;
                    id
                }
                None => fresh(graph, *o),
            };
            map[*o] = Some(id);
            outputs.push(Some(id));
        }
        let mut n = bn.clone();
        n.inputs = inputs;
        n.outputs = outputs;
        nodes.push(n);
    }
    // Outputs that are captures, constants or repeated: copy them with an Identity.
    for (j, out) in node.outputs.iter().enumerate() {
        let Some(out) = out else { continue };
        if claimed[j] {
            continue;
        }
        let Some(src) = map[branch.outputs[j]] else {
            return Ok(None);
        };
        let desc = kiln_core::OpDesc::new("", "Identity", 13);
        let name = format!("{}/output{j}", node.name);
        let op = registry.build(&BuildCtx {
            node: &name,
            desc: &desc,
            n_inputs: 1,
            n_outputs: 1,
        })?;
        nodes.push(kiln_core::Node {
            name,
            desc,
            op,
            inputs: vec![Some(src)],
            outputs: vec![Some(*out)],
            fused_from: node.fused_from.clone(),
        });
    }
    let n = nodes.len();
    graph.nodes.splice(at..at + 1, nodes);
    Ok(Some(n))
}

/// Rebuilds node `node`'s kernel from its (changed) description.
pub(crate) fn rebuild(graph: &mut Graph, node: usize, registry: &OpRegistry) -> Result<()> {
    let n = &graph.nodes[node];
    let op = registry.build(&BuildCtx {
        node: &n.name,
        desc: &n.desc,
        n_inputs: n.inputs.len().saturating_sub(n.desc.capture_count()),
        n_outputs: n.outputs.len(),
    })?;
    graph.nodes[node].op = op;
    Ok(())
}

/// The only node reading `v`, when exactly one node (and no graph output) reads it.
pub(crate) fn sole_consumer(graph: &Graph, consumers: &[Vec<usize>], v: ValueId) -> Option<usize> {
    if graph.is_output(v) {
        return None;
    }
    match consumers[v].as_slice() {
        [c] => {
            let reads = graph.nodes[*c]
                .inputs
                .iter()
                .filter(|i| **i == Some(v))
                .count();
            (reads == 1).then_some(*c)
        }
        _ => None,
    }
}

/// The data of `v` when it is an f32 constant.
pub(crate) fn constant_f32(graph: &Graph, v: Option<ValueId>) -> Option<Vec<f32>> {
    let t = graph.constants.get(&v?)?;
    (t.dtype() == DType::F32)
        .then(|| t.as_slice::<f32>().ok().map(|s| s.to_vec()))
        .flatten()
}

/// Whether node `node` is a default-domain `op_type`.
pub(crate) fn is_plain(graph: &Graph, node: usize, op_type: &str) -> bool {
    let d = &graph.nodes[node].desc;
    d.domain.is_empty() && d.op_type == op_type
}

/// Folds `BatchNormalization(Conv(x, W, b))` into `Conv(x, W', b')` when W, b and the BN
/// parameters are f32 constants and the Conv output feeds only the BN.
pub fn fold_batchnorm_into_conv(graph: &mut Graph, registry: &OpRegistry) -> Result<usize> {
    let mut folded = 0;
    loop {
        let consumers = graph.consumers();
        let mut found = None;
        for (ci, conv) in graph.nodes.iter().enumerate() {
            if !is_plain(graph, ci, "Conv") || conv.outputs.len() != 1 {
                continue;
            }
            let Some(y) = conv.outputs[0] else { continue };
            let Some(bi) = sole_consumer(graph, &consumers, y) else {
                continue;
            };
            let bn = &graph.nodes[bi];
            if !is_plain(graph, bi, "BatchNormalization")
                || bn.inputs.len() != 5
                || bn.inputs[0] != Some(y)
            {
                continue;
            }
            if bn
                .outputs
                .iter()
                .skip(1)
                .any(|o| o.is_some_and(|o| !consumers[o].is_empty() || graph.is_output(o)))
            {
                continue;
            }
            if matches!(bn.desc.attrs.get("training_mode"), Some(Attr::Int(1))) {
                continue;
            }
            found = Some((ci, bi));
            break;
        }
        let Some((ci, bi)) = found else { break };
        if !try_fold_bn(graph, ci, bi, registry)? {
            // Parameters not constant/f32: mark by skipping this pair permanently.
            break;
        }
        folded += 1;
    }
    Ok(folded)
}

fn try_fold_bn(graph: &mut Graph, ci: usize, bi: usize, registry: &OpRegistry) -> Result<bool> {
    let conv = &graph.nodes[ci];
    let bn = &graph.nodes[bi];
    let Some(w_id) = conv.inputs.get(1).copied().flatten() else {
        return Ok(false);
    };
    let Some(w) = graph.constants.get(&w_id).cloned() else {
        return Ok(false);
    };
    if w.dtype() != DType::F32 || w.rank() < 3 {
        return Ok(false);
    }
    let m = w.shape()[0];
    let bias = match conv.inputs.get(2).copied().flatten() {
        Some(b) => match constant_f32(graph, Some(b)) {
            Some(b) if b.len() == m => b,
            _ => return Ok(false),
        },
        None => vec![0.0; m],
    };
    let params: Option<Vec<Vec<f32>>> = (1..5).map(|i| constant_f32(graph, bn.inputs[i])).collect();
    let Some(params) = params else {
        return Ok(false);
    };
    if params.iter().any(|p| p.len() != m) {
        return Ok(false);
    }
    let eps = match bn.desc.attrs.get("epsilon") {
        Some(Attr::Float(e)) => *e,
        _ => 1e-5,
    };
    let (gamma, beta, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
    let scale: Vec<f32> = (0..m).map(|i| gamma[i] / (var[i] + eps).sqrt()).collect();
    let per_out = w.len() / m;
    let mut new_w = w.as_slice::<f32>()?.to_vec();
    for (i, chunk) in new_w.chunks_mut(per_out).enumerate() {
        for x in chunk {
            *x *= scale[i];
        }
    }
    let new_b: Vec<f32> = (0..m)
        .map(|i| (bias[i] - mean[i]) * scale[i] + beta[i])
        .collect();
    let conv_name = conv.name.clone();
    let bn_name = bn.name.clone();
    let bn_out =
        bn.outputs[0].ok_or_else(|| KilnError::Other(format!("{bn_name} has no output")))?;
    let w_new = graph.add_value(
        format!("{conv_name}.folded_weight"),
        Fact::concrete(DType::F32, w.shape()),
    );
    graph
        .constants
        .insert(w_new, Tensor::from_vec(w.shape(), new_w)?);
    let b_new = graph.add_value(
        format!("{conv_name}.folded_bias"),
        Fact::concrete(DType::F32, &[m]),
    );
    graph
        .constants
        .insert(b_new, Tensor::from_vec(&[m], new_b)?);
    let conv = &mut graph.nodes[ci];
    conv.inputs.resize(3, None);
    conv.inputs[1] = Some(w_new);
    conv.inputs[2] = Some(b_new);
    conv.outputs[0] = Some(bn_out);
    conv.fused_from.push(bn_name);
    rebuild(graph, ci, registry)?;
    graph.nodes.remove(bi);
    Ok(true)
}

/// The activation a node computes, when it is one kiln can fuse.
fn activation_of(graph: &Graph, node: usize) -> Option<Activation> {
    let n = &graph.nodes[node];
    if !n.desc.domain.is_empty() || n.outputs.len() != 1 {
        return None;
    }
    let fattr = |name: &str, default: f32| match n.desc.attrs.get(name) {
        Some(Attr::Float(v)) => *v,
        _ => default,
    };
    Some(match n.desc.op_type.as_str() {
        "Relu" => Activation::Relu,
        "Sigmoid" => Activation::Sigmoid,
        "Tanh" => Activation::Tanh,
        "HardSwish" => Activation::HardSwish,
        "HardSigmoid" => Activation::HardSigmoid {
            alpha: fattr("alpha", 0.2),
            beta: fattr("beta", 0.5),
        },
        "LeakyRelu" => Activation::LeakyRelu {
            alpha: fattr("alpha", 0.01),
        },
        "Clip" => {
            if n.desc.opset < 11 {
                Activation::Clip {
                    min: fattr("min", f32::MIN),
                    max: fattr("max", f32::MAX),
                }
            } else {
                let bound = |i: usize, default: f32| -> Option<f32> {
                    match n.inputs.get(i).copied().flatten() {
                        None => Some(default),
                        Some(v) => {
                            let t = graph.constants.get(&v)?;
                            if t.dtype() != DType::F32 || t.len() != 1 {
                                return None;
                            }
                            t.as_slice::<f32>().ok().map(|s| s[0])
                        }
                    }
                };
                Activation::Clip {
                    min: bound(1, f32::MIN)?,
                    max: bound(2, f32::MAX)?,
                }
            }
        }
        _ => return None,
    })
}

const FUSABLE_PRODUCERS: &[&str] = &["Conv", "Gemm", "MatMul"];

/// The single f32 value of constant `v` (a scalar or a one-element tensor).
fn scalar_f32(graph: &Graph, v: Option<ValueId>) -> Option<f32> {
    match constant_f32(graph, v)?.as_slice() {
        [c] => Some(*c),
        _ => None,
    }
}

/// Whether node `n` computes `v / 6` (Div by 6, or Mul by 1/6 in either order).
fn divides_by_six(graph: &Graph, n: usize, v: ValueId) -> bool {
    let ins = &graph.nodes[n].inputs;
    if ins.len() != 2 {
        return false;
    }
    let (a, b) = (ins[0], ins[1]);
    if is_plain(graph, n, "Div") {
        return a == Some(v) && scalar_f32(graph, b) == Some(6.0);
    }
    let sixth =
        |c: Option<ValueId>| scalar_f32(graph, c).is_some_and(|c| (c - 1.0 / 6.0).abs() < 1e-6);
    is_plain(graph, n, "Mul") && ((a == Some(v) && sixth(b)) || (b == Some(v) && sixth(a)))
}

/// Matches hard-swish written out after `y`: `y · clip(y + 3, 0, 6) / 6`, with the division
/// by 6 (or multiplication by 1/6) before or after the product, or `y · HardSigmoid(y)`
/// with alpha 1/6 and beta 0.5. Every intermediate value must feed only the next node.
/// Returns the nodes to remove and the value the activation's result replaces.
fn written_hard_swish(
    graph: &Graph,
    consumers: &[Vec<usize>],
    y: ValueId,
) -> Option<(Vec<usize>, ValueId)> {
    let [c0, c1] = consumers[y].as_slice() else {
        return None;
    };
    let out_of = |n: usize| graph.nodes[n].outputs.first().copied().flatten();
    let product_of = |m: usize, gate: ValueId| {
        let ins = &graph.nodes[m].inputs;
        is_plain(graph, m, "Mul")
            && ins.len() == 2
            && ((ins[0] == Some(y) && ins[1] == Some(gate))
                || (ins[0] == Some(gate) && ins[1] == Some(y)))
    };
    for (gi, mi) in [(*c0, *c1), (*c1, *c0)] {
        // The gate: HardSigmoid(y), or clip(y + 3, 0, 6) with an optional / 6.
        let mut chain = vec![gi];
        let mut gate = out_of(gi)?;
        let mut scaled = false;
        if is_plain(graph, gi, "HardSigmoid") {
            let sixth_plus_half = matches!(
                activation_of(graph, gi),
                Some(Activation::HardSigmoid { alpha, beta })
                    if (alpha - 1.0 / 6.0).abs() < 1e-6 && beta == 0.5
            );
            if !sixth_plus_half {
                continue;
            }
            scaled = true;
        } else {
            let ins = &graph.nodes[gi].inputs;
            let adds_three = is_plain(graph, gi, "Add")
                && ins.len() == 2
                && ((ins[0] == Some(y) && scalar_f32(graph, ins[1]) == Some(3.0))
                    || (ins[1] == Some(y) && scalar_f32(graph, ins[0]) == Some(3.0)));
            if !adds_three {
                continue;
            }
            let Some(ci) = sole_consumer(graph, consumers, gate) else {
                continue;
            };
            let relu6 = Activation::Clip { min: 0.0, max: 6.0 };
            if !is_plain(graph, ci, "Clip")
                || graph.nodes[ci].inputs.first() != Some(&Some(gate))
                || activation_of(graph, ci) != Some(relu6)
            {
                continue;
            }
            chain.push(ci);
            gate = out_of(ci)?;
            if let Some(di) = sole_consumer(graph, consumers, gate) {
                if di != mi && divides_by_six(graph, di, gate) {
                    chain.push(di);
                    gate = out_of(di)?;
                    scaled = true;
                }
            }
        }
        if sole_consumer(graph, consumers, gate) != Some(mi) || !product_of(mi, gate) {
            continue;
        }
        chain.push(mi);
        let mut out = out_of(mi)?;
        if !scaled {
            let di = sole_consumer(graph, consumers, out)?;
            if !divides_by_six(graph, di, out) {
                continue;
            }
            chain.push(di);
            out = out_of(di)?;
        }
        return Some((chain, out));
    }
    None
}

/// Fuses a following activation (or the x·sigmoid(x) pattern) into Conv, Gemm and MatMul
/// with f32 outputs.
pub fn fuse_activations(graph: &mut Graph, registry: &OpRegistry) -> Result<usize> {
    let mut fused = 0;
    loop {
        let consumers = graph.consumers();
        let mut plan: Option<(usize, Vec<usize>, Activation, ValueId)> = None;
        for (pi, p) in graph.nodes.iter().enumerate() {
            let fusable_kind = FUSABLE_PRODUCERS.contains(&p.desc.op_type.as_str())
                && (p.desc.domain.is_empty()
                    || (p.desc.domain == kiln_cpu::fused::KILN_DOMAIN
                        && !p.desc.attrs.contains_key(kiln_cpu::fused::ACTIVATION_ATTR)));
            if !fusable_kind || p.outputs.len() != 1 {
                continue;
            }
            let Some(y) = p.outputs[0] else { continue };
            if graph.is_output(y) || graph.values[y].fact.dtype != Some(DType::F32) {
                continue;
            }
            // y -> activation
            if let Some(ai) = sole_consumer(graph, &consumers, y) {
                if graph.nodes[ai].inputs.first() == Some(&Some(y)) {
                    if let (Some(act), Some(out)) =
                        (activation_of(graph, ai), graph.nodes[ai].outputs[0])
                    {
                        plan = Some((pi, vec![ai], act, out));
                        break;
                    }
                }
            }
            // Hard-swish written out: y · clip(y + 3, 0, 6) / 6 and its orderings.
            if let Some((removed, out)) = written_hard_swish(graph, &consumers, y) {
                plan = Some((pi, removed, Activation::HardSwish, out));
                break;
            }
            // y -> Sigmoid -> Mul(y, sigmoid(y))
            if consumers[y].len() == 2 {
                let (a, b) = (consumers[y][0], consumers[y][1]);
                for (si, mi) in [(a, b), (b, a)] {
                    let s = &graph.nodes[si];
                    let m = &graph.nodes[mi];
                    if !is_plain(graph, si, "Sigmoid") || !is_plain(graph, mi, "Mul") {
                        continue;
                    }
                    let Some(s_out) = s.outputs[0] else { continue };
                    if sole_consumer(graph, &consumers, s_out) != Some(mi) {
                        continue;
                    }
                    let ins = (
                        m.inputs.first().copied().flatten(),
                        m.inputs.get(1).copied().flatten(),
                    );
                    if ins == (Some(y), Some(s_out)) || ins == (Some(s_out), Some(y)) {
                        if let Some(out) = m.outputs[0] {
                            plan = Some((pi, vec![si, mi], Activation::Swish, out));
                            break;
                        }
                    }
                }
                if plan.is_some() {
                    break;
                }
            }
        }
        let Some((pi, removed, act, out)) = plan else {
            break;
        };
        let names: Vec<String> = removed
            .iter()
            .map(|&i| graph.nodes[i].name.clone())
            .collect();
        let p = &mut graph.nodes[pi];
        act.write_to(&mut p.desc);
        p.outputs[0] = Some(out);
        p.fused_from.extend(names);
        rebuild(graph, pi, registry)?;
        let mut removed = removed;
        removed.sort_unstable_by(|a, b| b.cmp(a));
        for i in removed {
            graph.nodes.remove(i);
        }
        fused += 1;
    }
    Ok(fused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_graph::add_node;
    use kiln_core::Value;

    fn constant(graph: &mut Graph, name: &str, shape: &[usize], v: Vec<f32>) -> ValueId {
        crate::test_graph::add_constant(graph, name, Tensor::from_vec(shape, v).unwrap())
    }

    /// Conv followed by hard-swish written out in one of its forms.
    fn conv_then(reg: &OpRegistry, form: usize) -> Graph {
        let mut g = Graph::default();
        let x = g.add_value("x", Fact::concrete(DType::F32, &[1, 2, 5, 6]));
        g.inputs = vec![x];
        let w: Vec<f32> = (0..3 * 2 * 9)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let w = constant(&mut g, "w", &[3, 2, 3, 3], w);
        let b = constant(&mut g, "b", &[3], vec![0.5, -1.0, 2.0]);
        let three = constant(&mut g, "three", &[], vec![3.0]);
        let zero = constant(&mut g, "zero", &[], vec![0.0]);
        let six = constant(&mut g, "six", &[], vec![6.0]);
        let sixth = constant(&mut g, "sixth", &[1], vec![1.0 / 6.0]);
        let pads = ("pads", Attr::Ints(vec![1, 1, 1, 1]));
        let y = add_node(&mut g, reg, 13, "Conv", &[x, w, b], &[pads], "y");
        let out = match form {
            // y · clip(y + 3, 0, 6) / 6
            0 => {
                let a = add_node(&mut g, reg, 13, "Add", &[y, three], &[], "a");
                let c = add_node(&mut g, reg, 13, "Clip", &[a, zero, six], &[], "c");
                let m = add_node(&mut g, reg, 13, "Mul", &[c, y], &[], "m");
                add_node(&mut g, reg, 13, "Div", &[m, six], &[], "out")
            }
            // y · (clip(3 + y, 0, 6) · 1/6)
            1 => {
                let a = add_node(&mut g, reg, 13, "Add", &[three, y], &[], "a");
                let c = add_node(&mut g, reg, 13, "Clip", &[a, zero, six], &[], "c");
                let d = add_node(&mut g, reg, 13, "Mul", &[sixth, c], &[], "d");
                add_node(&mut g, reg, 13, "Mul", &[y, d], &[], "out")
            }
            // y · HardSigmoid(y; 1/6, 0.5)
            _ => {
                let attrs = [
                    ("alpha", Attr::Float(1.0 / 6.0)),
                    ("beta", Attr::Float(0.5)),
                ];
                let h = add_node(&mut g, reg, 13, "HardSigmoid", &[y], &attrs, "h");
                add_node(&mut g, reg, 13, "Mul", &[y, h], &[], "out")
            }
        };
        g.outputs = vec![out];
        g.infer_facts().unwrap();
        g
    }

    /// Every written-out hard-swish becomes the Conv's fused activation and computes the
    /// same values; a gate that is not clip(y + 3, 0, 6) is left alone.
    #[test]
    fn written_out_hard_swish_fuses_into_conv() {
        let reg = kiln_cpu::registry();
        let x: Vec<f32> = (0..60)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 2.5)
            .collect();
        let input = [Value::from(Tensor::from_vec(&[1, 2, 5, 6], x).unwrap())];
        for form in 0..3 {
            let mut g = conv_then(&reg, form);
            let want = kiln_core::exec::run_graph(&g, &input, &[]).unwrap();
            assert_eq!(fuse_activations(&mut g, &reg).unwrap(), 1, "form {form}");
            assert_eq!(g.nodes.len(), 1, "form {form}");
            assert_eq!(g.nodes[0].desc.op_type, "Conv");
            let got = kiln_core::exec::run_graph(&g, &input, &[]).unwrap();
            let (a, b) = (
                want[0]
                    .as_tensor()
                    .unwrap()
                    .as_slice::<f32>()
                    .unwrap()
                    .to_vec(),
                got[0]
                    .as_tensor()
                    .unwrap()
                    .as_slice::<f32>()
                    .unwrap()
                    .to_vec(),
            );
            assert!(a.iter().any(|&v| v > 0.0) && a.contains(&0.0));
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                    "form {form}: {p} vs {q}"
                );
            }
        }
        // clip(y + 3, 0, 6) · y / 5 is not hard-swish: nothing fuses.
        let mut g = conv_then(&reg, 0);
        let five = constant(&mut g, "five", &[], vec![5.0]);
        let div = g.nodes.len() - 1;
        g.nodes[div].inputs[1] = Some(five);
        assert_eq!(fuse_activations(&mut g, &reg).unwrap(), 0);
        assert_eq!(g.nodes.len(), 5);
    }
}
