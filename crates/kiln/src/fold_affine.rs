//! Folding constant per-channel affines into Conv weights and biases.
//!
//! Exporters often write a BatchNormalization, a learnable scale or a normalisation as
//! plain `Mul`/`Add`/`Sub`/`Div` nodes with constants. When such a node is the only reader
//! of a Conv's output and its constant broadcasts per output channel (shapes `[]`, `[1]`,
//! `[M,1,1]`, `[1,M,1,1]`, `[M,1]` for a 1-D conv, …), [`fold_affine_into_conv`] folds it
//! into the Conv: `Mul` by `s` scales output channel m's filter and bias by `s[m]`, `Add`
//! of `t` adds `t[m]` to the bias (created when absent). Applied repeatedly it folds whole
//! Mul/Add chains, so an activation that follows (e.g. written-out hard-swish) then fuses
//! into the Conv's epilogue.
//!
//! [`fold_affine_into_next_conv`] folds the other way: an affine that is the only reader
//! of a Conv's input, per input channel, goes into that Conv's weights and bias when the
//! Conv pads nothing (every value it reads is a real input value, e.g. a 1×1 conv):
//! `conv(W, a·z + b) = conv(W·a, z) + Σ W·b`.
//!
//! Only f32 constants with finite values are folded; nodes with weights already packed or
//! a tactic chosen are left alone.

use kiln_core::{Attr, DType, Fact, Graph, OpRegistry, Result, Tensor, ValueId};
use kiln_cpu::fused::{ACTIVATION_ATTR, ACTIVATION_PARAMS_ATTR, KILN_DOMAIN};

use crate::optimize::{is_plain, rebuild, sole_consumer};

/// `v·scale[c] + shift[c]` for each channel c.
struct Affine {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

/// The values of f32 constant `t` per channel, when `t` broadcast against a tensor of rank
/// `rank` with `channels` channels on axis 1 neither changes that tensor's shape nor varies
/// over any axis but the channel axis. `channels` values, or None.
fn per_channel(t: &Tensor, rank: usize, channels: usize) -> Option<Vec<f32>> {
    let shape = t.shape();
    if t.dtype() != DType::F32 || t.is_empty() || shape.len() > rank {
        return None;
    }
    let offset = rank - shape.len();
    let per_channel_only = shape
        .iter()
        .enumerate()
        .all(|(i, &d)| d == 1 || (offset + i == 1 && d == channels));
    if !per_channel_only {
        return None;
    }
    let data = t.as_slice::<f32>().ok()?;
    if data.iter().any(|x| !x.is_finite()) {
        return None;
    }
    Some(if data.len() == 1 {
        vec![data[0]; channels]
    } else {
        data.to_vec()
    })
}

/// What elementwise node `node` computes from its input `v` when it is `Mul`, `Add`,
/// `Sub` or `Div` with a per-channel f32 constant as its other operand (`v / c` only, not
/// `c / v`), as an affine over the `channels` channels of a rank-`rank` tensor.
fn affine_of(
    graph: &Graph,
    node: usize,
    v: ValueId,
    rank: usize,
    channels: usize,
) -> Option<Affine> {
    let n = &graph.nodes[node];
    if n.inputs.len() != 2 || n.outputs.len() != 1 || n.outputs[0].is_none() {
        return None;
    }
    let (v_first, other) = match (n.inputs[0], n.inputs[1]) {
        (Some(a), Some(b)) if a == v && b != v => (true, b),
        (Some(a), Some(b)) if b == v && a != v => (false, a),
        _ => return None,
    };
    let c = per_channel(graph.constants.get(&other)?, rank, channels)?;
    let ones = vec![1.0; channels];
    let zeros = vec![0.0; channels];
    let (scale, shift) = if is_plain(graph, node, "Mul") {
        (c, zeros)
    } else if is_plain(graph, node, "Add") {
        (ones, c)
    } else if is_plain(graph, node, "Sub") {
        if v_first {
            (ones, c.iter().map(|x| -x).collect())
        } else {
            (vec![-1.0; channels], c)
        }
    } else if is_plain(graph, node, "Div") && v_first && c.iter().all(|&x| x != 0.0) {
        let inv: Vec<f32> = c.iter().map(|x| 1.0 / x).collect();
        if inv.iter().any(|x| !x.is_finite()) {
            return None;
        }
        (inv, zeros)
    } else {
        return None;
    };
    Some(Affine { scale, shift })
}

/// Whether node `ci` is a Conv whose weights and bias a pass may rewrite: default domain,
/// or kiln's fused Conv (with no activation unless `activation_ok`), and no other kiln
/// attribute (packed weights, a chosen tactic).
fn rewritable_conv(graph: &Graph, ci: usize, activation_ok: bool) -> bool {
    let n = &graph.nodes[ci];
    let d = &n.desc;
    // A fused residual: an affine after the sum is not one of the Conv's weights.
    if d.op_type != "Conv" || n.outputs.len() != 1 || n.inputs.len() > 3 {
        return false;
    }
    if d.domain.is_empty() {
        return true;
    }
    if d.domain != KILN_DOMAIN {
        return false;
    }
    let no_activation = match d.attrs.get(ACTIVATION_ATTR) {
        None => true,
        Some(Attr::String(s)) => s == "None",
        Some(_) => false,
    };
    (activation_ok || no_activation)
        && d.attrs
            .keys()
            .all(|k| !k.starts_with("kiln_") || k == ACTIVATION_ATTR || k == ACTIVATION_PARAMS_ATTR)
}

/// A Conv's constant f32 weights (shape [M, C/group, k…]) and bias (zeros when absent).
struct ConvParams {
    weights: Vec<f32>,
    shape: Vec<usize>,
    bias: Vec<f32>,
    group: usize,
}

impl ConvParams {
    fn read(graph: &Graph, ci: usize) -> Option<ConvParams> {
        let n = &graph.nodes[ci];
        let w = graph.constants.get(&n.inputs.get(1).copied().flatten()?)?;
        let shape = w.shape().to_vec();
        if w.dtype() != DType::F32 || shape.len() < 3 || w.is_empty() {
            return None;
        }
        let m = shape[0];
        let group = match n.desc.attrs.get("group") {
            None => 1,
            Some(Attr::Int(g)) => usize::try_from(*g).ok().filter(|&g| g > 0)?,
            Some(_) => return None,
        };
        if m % group != 0 {
            return None;
        }
        let bias = match n.inputs.get(2).copied().flatten() {
            None => vec![0.0; m],
            Some(b) => {
                let b = graph.constants.get(&b)?;
                if b.dtype() != DType::F32 || b.shape() != [m] {
                    return None;
                }
                b.as_slice::<f32>().ok()?.to_vec()
            }
        };
        Some(ConvParams {
            weights: w.as_slice::<f32>().ok()?.to_vec(),
            shape,
            bias,
            group,
        })
    }

    /// Output channels.
    fn m(&self) -> usize {
        self.shape[0]
    }

    /// Input channels (all groups).
    fn c(&self) -> usize {
        self.shape[1] * self.group
    }

    /// Stores the weights and bias as new constants of node `ci` (constants may be shared
    /// with other nodes, so they are never changed in place).
    fn write(self, graph: &mut Graph, ci: usize) -> Result<()> {
        let name = graph.nodes[ci].name.clone();
        let m = self.m();
        let w_name = fresh_name(graph, &format!("{name}.affine_weight"));
        let w = graph.add_value(w_name, Fact::concrete(DType::F32, &self.shape));
        graph
            .constants
            .insert(w, Tensor::from_vec(&self.shape, self.weights)?);
        let b_name = fresh_name(graph, &format!("{name}.affine_bias"));
        let b = graph.add_value(b_name, Fact::concrete(DType::F32, &[m]));
        graph
            .constants
            .insert(b, Tensor::from_vec(&[m], self.bias)?);
        let conv = &mut graph.nodes[ci];
        conv.inputs.resize(3, None);
        conv.inputs[1] = Some(w);
        conv.inputs[2] = Some(b);
        Ok(())
    }
}

/// `base`, or `base.k` with the smallest k ≥ 1 that no value is named yet.
fn fresh_name(graph: &Graph, base: &str) -> String {
    if graph.value_by_name(base).is_none() {
        return base.to_string();
    }
    (1..)
        .map(|k| format!("{base}.{k}"))
        .find(|n| graph.value_by_name(n).is_none())
        .expect("an unused name")
}

/// Folds `Mul`/`Add`/`Sub`/`Div` by a per-output-channel f32 constant that is the only
/// reader of a Conv's output (not a graph output) into the Conv's weights and bias.
/// The Conv takes over the folded node's output value (its name included). Returns how
/// many nodes were folded.
pub fn fold_affine_into_conv(graph: &mut Graph, registry: &OpRegistry) -> Result<usize> {
    let mut folded = 0;
    loop {
        let consumers = graph.consumers();
        let mut found = None;
        for ci in 0..graph.nodes.len() {
            if !rewritable_conv(graph, ci, false) {
                continue;
            }
            let Some(y) = graph.nodes[ci].outputs[0] else {
                continue;
            };
            let Some(ei) = sole_consumer(graph, &consumers, y) else {
                continue;
            };
            let Some(p) = ConvParams::read(graph, ci) else {
                continue;
            };
            if let Some(a) = affine_of(graph, ei, y, p.shape.len(), p.m()) {
                found = Some((ci, ei, p, a));
                break;
            }
        }
        let Some((ci, ei, mut p, a)) = found else {
            break;
        };
        let per_out = p.weights.len() / p.m();
        for (m, filter) in p.weights.chunks_mut(per_out).enumerate() {
            filter.iter_mut().for_each(|w| *w *= a.scale[m]);
            p.bias[m] = p.bias[m] * a.scale[m] + a.shift[m];
        }
        p.write(graph, ci)?;
        let out = graph.nodes[ei].outputs[0];
        let name = graph.nodes[ei].name.clone();
        let conv = &mut graph.nodes[ci];
        conv.outputs[0] = out;
        conv.fused_from.push(name);
        rebuild(graph, ci, registry)?;
        graph.nodes.remove(ei);
        folded += 1;
    }
    Ok(folded)
}

/// Whether Conv node `ci` reads only real input values: no `pads` other than zeros and no
/// `SAME_*` auto-padding.
fn pads_nothing(graph: &Graph, ci: usize) -> bool {
    let attrs = &graph.nodes[ci].desc.attrs;
    match attrs.get("auto_pad") {
        None => {}
        Some(Attr::String(s)) if s == "NOTSET" || s.is_empty() => {}
        Some(Attr::String(s)) if s == "VALID" => return true,
        Some(_) => return false,
    }
    match attrs.get("pads") {
        None => true,
        Some(Attr::Ints(p)) => p.iter().all(|&x| x == 0),
        Some(_) => false,
    }
}

/// Folds `Mul`/`Add`/`Sub`/`Div` by a per-input-channel f32 constant whose output is read
/// only by a Conv (as its data input) that pads nothing into that Conv: the Conv reads the
/// affine's input instead, with weights `W·a` and bias `B + Σ W·b` over each filter's
/// window. Returns how many nodes were folded.
pub fn fold_affine_into_next_conv(graph: &mut Graph, registry: &OpRegistry) -> Result<usize> {
    let mut folded = 0;
    loop {
        let consumers = graph.consumers();
        let mut found = None;
        for ei in 0..graph.nodes.len() {
            let e = &graph.nodes[ei];
            if e.inputs.len() != 2 || e.outputs.len() != 1 {
                continue;
            }
            let Some(u) = e.outputs[0] else { continue };
            let Some(ci) = sole_consumer(graph, &consumers, u) else {
                continue;
            };
            if graph.nodes[ci].inputs.first() != Some(&Some(u))
                || !rewritable_conv(graph, ci, true)
                || !pads_nothing(graph, ci)
            {
                continue;
            }
            // The non-constant operand, which must have the affine output's shape.
            let z = match (e.inputs[0], e.inputs[1]) {
                (Some(a), Some(b)) if graph.constants.contains_key(&b) => a,
                (Some(a), Some(b)) if graph.constants.contains_key(&a) => b,
                _ => continue,
            };
            let (zf, uf) = (&graph.values[z].fact, &graph.values[u].fact);
            if zf.dtype != Some(DType::F32) || zf.shape.is_none() || zf.shape != uf.shape {
                continue;
            }
            let Some(p) = ConvParams::read(graph, ci) else {
                continue;
            };
            if zf.rank() != Some(p.shape.len()) {
                continue;
            }
            if let Some(a) = affine_of(graph, ei, z, p.shape.len(), p.c()) {
                found = Some((ei, ci, z, p, a));
                break;
            }
        }
        let Some((ei, ci, z, mut p, a)) = found else {
            break;
        };
        let (m_all, c_per_group) = (p.m(), p.shape[1]);
        let m_per_group = m_all / p.group;
        let window = p.weights.len() / (m_all * c_per_group);
        for m in 0..m_all {
            let first_channel = (m / m_per_group) * c_per_group;
            for j in 0..c_per_group {
                let c = first_channel + j;
                let at = (m * c_per_group + j) * window;
                let taps = &mut p.weights[at..at + window];
                // Σ W·b uses the weights before they are scaled.
                let sum: f32 = taps.iter().sum();
                p.bias[m] += sum * a.shift[c];
                taps.iter_mut().for_each(|w| *w *= a.scale[c]);
            }
        }
        p.write(graph, ci)?;
        let name = graph.nodes[ei].name.clone();
        let conv = &mut graph.nodes[ci];
        conv.inputs[0] = Some(z);
        conv.fused_from.insert(0, name);
        rebuild(graph, ci, registry)?;
        graph.nodes.remove(ei);
        folded += 1;
    }
    Ok(folded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_graph::{add_constant, add_node};
    use kiln_core::Value;

    /// Deterministic values in ±[0.1, 1.1] (never zero).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                let v = 0.1 + u;
                if s & 1 == 0 {
                    v
                } else {
                    -v
                }
            })
            .collect()
    }

    fn constant(g: &mut Graph, name: &str, shape: &[usize], seed: u64) -> ValueId {
        let n = shape.iter().product();
        add_constant(g, name, Tensor::from_vec(shape, values(n, seed)).unwrap())
    }

    /// A Conv from `c` to `m` channels (kernel `k`, `pads`, `group`, bias or not) over an
    /// input `x` of shape `x_shape`; returns the graph and the Conv's output.
    struct ConvSpec<'a> {
        x_shape: &'a [usize],
        m: usize,
        kernel: &'a [usize],
        group: usize,
        bias: bool,
        pad: i64,
    }

    fn conv_graph(reg: &OpRegistry, s: &ConvSpec) -> (Graph, ValueId, ValueId) {
        let mut g = Graph::default();
        let x = g.add_value("x", Fact::concrete(DType::F32, s.x_shape));
        g.inputs = vec![x];
        let mut w_shape = vec![s.m, s.x_shape[1] / s.group];
        w_shape.extend_from_slice(s.kernel);
        let w = constant(&mut g, "w", &w_shape, 1);
        let mut ins = vec![x, w];
        if s.bias {
            ins.push(constant(&mut g, "b", &[s.m], 2));
        }
        let attrs = [
            ("group", Attr::Int(s.group as i64)),
            ("pads", Attr::Ints(vec![s.pad; 2 * s.kernel.len()])),
        ];
        let y = add_node(&mut g, reg, 13, "Conv", &ins, &attrs, "y");
        (g, x, y)
    }

    fn input(shape: &[usize]) -> Vec<Value> {
        let n = shape.iter().product();
        vec![Value::from(Tensor::from_vec(shape, values(n, 7)).unwrap())]
    }

    fn run(g: &Graph, inputs: &[Value]) -> Vec<f32> {
        let out = kiln_core::exec::run_graph(g, inputs, &[]).unwrap();
        out[0]
            .as_tensor()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    fn assert_close(want: &[f32], got: &[f32], what: &str) {
        assert_eq!(want.len(), got.len(), "{what}");
        for (i, (p, q)) in want.iter().zip(got).enumerate() {
            assert!(
                (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                "{what}: element {i}: {p} vs {q}"
            );
        }
    }

    /// Appends `op(y, c)` (or `op(c, y)` when `const_first`) and returns its output.
    fn affine_node(
        g: &mut Graph,
        reg: &OpRegistry,
        op: &str,
        y: ValueId,
        c: ValueId,
        const_first: bool,
        out: &str,
    ) -> ValueId {
        let ins = if const_first { [c, y] } else { [y, c] };
        add_node(g, reg, 13, op, &ins, &[], out)
    }

    /// Per-channel and scalar constants of every accepted shape, with each op, fold into a
    /// Conv with and without bias, grouped or not, and compute the same values.
    #[test]
    fn per_channel_and_scalar_constants_fold_into_conv() {
        let reg = kiln_cpu::registry();
        let x_shape = [1, 4, 5, 6];
        let inputs = input(&x_shape);
        let shapes: [&[usize]; 6] = [
            &[],
            &[1],
            &[6, 1, 1],
            &[1, 6, 1, 1],
            &[1, 1, 1],
            &[1, 1, 1, 1],
        ];
        let ops = [
            ("Mul", false),
            ("Mul", true),
            ("Add", false),
            ("Add", true),
            ("Sub", false),
            ("Sub", true),
            ("Div", false),
        ];
        for (shape_i, c_shape) in shapes.iter().enumerate() {
            for &(op, const_first) in &ops {
                for (bias, group) in [(true, 1), (false, 1), (true, 2), (false, 2)] {
                    let what = format!(
                        "{op} const_first={const_first} {c_shape:?} bias={bias} group={group}"
                    );
                    let spec = ConvSpec {
                        x_shape: &x_shape,
                        m: 6,
                        kernel: &[3, 3],
                        group,
                        bias,
                        pad: 1,
                    };
                    let (mut g, _, y) = conv_graph(&reg, &spec);
                    let c = constant(&mut g, "c", c_shape, 10 + shape_i as u64);
                    let out = affine_node(&mut g, &reg, op, y, c, const_first, "out");
                    g.outputs = vec![out];
                    g.infer_facts().unwrap();
                    let want = run(&g, &inputs);
                    assert_eq!(fold_affine_into_conv(&mut g, &reg).unwrap(), 1, "{what}");
                    assert_eq!(g.nodes.len(), 1, "{what}");
                    assert_eq!(g.nodes[0].outputs[0], Some(out), "{what}");
                    assert_eq!(g.name_of(out), "out");
                    g.infer_facts().unwrap();
                    assert_close(&want, &run(&g, &inputs), &what);
                }
            }
        }
    }

    /// A Mul then an Add then a Sub fold one after the other; a 1-D conv takes `[M, 1]`.
    #[test]
    fn chains_and_1d_conv_fold() {
        let reg = kiln_cpu::registry();
        let x_shape = [2, 3, 9];
        let inputs = input(&x_shape);
        let spec = ConvSpec {
            x_shape: &x_shape,
            m: 5,
            kernel: &[3],
            group: 1,
            bias: false,
            pad: 0,
        };
        let (mut g, _, y) = conv_graph(&reg, &spec);
        let s = constant(&mut g, "s", &[5, 1], 3);
        let t = constant(&mut g, "t", &[1, 5, 1], 4);
        let u = constant(&mut g, "u", &[], 5);
        let a = affine_node(&mut g, &reg, "Mul", y, s, false, "a");
        let b = affine_node(&mut g, &reg, "Add", a, t, true, "b");
        let out = affine_node(&mut g, &reg, "Sub", b, u, false, "out");
        g.outputs = vec![out];
        g.infer_facts().unwrap();
        let want = run(&g, &inputs);
        assert_eq!(fold_affine_into_conv(&mut g, &reg).unwrap(), 3);
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.nodes[0].fused_from, ["y", "a", "b", "out"]);
        g.infer_facts().unwrap();
        assert_close(&want, &run(&g, &inputs), "1-D chain");
    }

    /// Constants varying over a spatial axis or the batch, `c / y`, a second reader of the
    /// Conv output, and a Conv output that is a graph output are all left alone.
    #[test]
    fn refuses_what_is_not_a_per_channel_affine_of_a_private_output() {
        let reg = kiln_cpu::registry();
        let x_shape = [1, 2, 4, 4];
        let spec = ConvSpec {
            x_shape: &x_shape,
            m: 3,
            kernel: &[1, 1],
            group: 1,
            bias: true,
            pad: 0,
        };
        let refused: [(&str, &[usize], bool); 6] = [
            ("Mul", &[3, 4, 1], false),       // varies over H
            ("Add", &[1, 1, 1, 4], false),    // varies over W
            ("Mul", &[2, 1, 1, 1], false),    // broadcasts the batch up
            ("Add", &[1, 1, 1, 1, 1], false), // raises the rank
            ("Div", &[], true),               // c / y is not affine
            ("Pow", &[], false),              // not an affine op
        ];
        for (op, c_shape, const_first) in refused {
            let (mut g, _, y) = conv_graph(&reg, &spec);
            let c = constant(&mut g, "c", c_shape, 3);
            let out = affine_node(&mut g, &reg, op, y, c, const_first, "out");
            g.outputs = vec![out];
            g.infer_facts().unwrap();
            assert_eq!(
                fold_affine_into_conv(&mut g, &reg).unwrap(),
                0,
                "{op} {c_shape:?}"
            );
            assert_eq!(g.nodes.len(), 2);
        }
        // Two readers of the Conv output.
        let (mut g, _, y) = conv_graph(&reg, &spec);
        let c = constant(&mut g, "c", &[1, 3, 1, 1], 3);
        let a = affine_node(&mut g, &reg, "Mul", y, c, false, "a");
        let r = add_node(&mut g, &reg, 13, "Relu", &[y], &[], "r");
        g.outputs = vec![a, r];
        g.infer_facts().unwrap();
        assert_eq!(fold_affine_into_conv(&mut g, &reg).unwrap(), 0);
        // The Conv output is a graph output.
        let (mut g, _, y) = conv_graph(&reg, &spec);
        let c = constant(&mut g, "c", &[], 3);
        let a = affine_node(&mut g, &reg, "Mul", y, c, false, "a");
        g.outputs = vec![a, y];
        g.infer_facts().unwrap();
        assert_eq!(fold_affine_into_conv(&mut g, &reg).unwrap(), 0);
        // A zero divisor.
        let (mut g, _, y) = conv_graph(&reg, &spec);
        let c = add_constant(
            &mut g,
            "c",
            Tensor::from_vec(&[3, 1, 1], vec![1.0f32, 0.0, 2.0]).unwrap(),
        );
        let a = affine_node(&mut g, &reg, "Div", y, c, false, "a");
        g.outputs = vec![a];
        g.infer_facts().unwrap();
        assert_eq!(fold_affine_into_conv(&mut g, &reg).unwrap(), 0);
    }

    /// `a·z + b` (per input channel, scalar, Sub and Div forms) read only by an unpadded
    /// Conv folds into it, grouped or not; a padded Conv refuses.
    #[test]
    fn affine_folds_forward_into_an_unpadded_conv() {
        let reg = kiln_cpu::registry();
        let x_shape = [1, 4, 5, 5];
        let inputs = input(&x_shape);
        // (op, constant shape, constant first) for the first and the second node.
        type Step<'a> = (&'a str, &'a [usize], bool);
        let forms: [(Step, Step); 4] = [
            (("Mul", &[1, 4, 1, 1], false), ("Add", &[4, 1, 1], true)),
            (("Mul", &[], true), ("Add", &[1], false)),
            (("Div", &[4, 1, 1], false), ("Sub", &[], false)),
            (("Mul", &[1], false), ("Sub", &[1, 4, 1, 1], true)),
        ];
        for (i, &((op1, s1, f1), (op2, s2, f2))) in forms.iter().enumerate() {
            for (group, kernel) in [(1, [1, 1]), (2, [1, 1]), (2, [2, 3]), (4, [3, 3])] {
                for pad in [0, 1] {
                    let what = format!("form {i} group {group} kernel {kernel:?} pad {pad}");
                    let mut g = Graph::default();
                    let x = g.add_value("x", Fact::concrete(DType::F32, &x_shape));
                    g.inputs = vec![x];
                    let z = add_node(&mut g, &reg, 13, "Relu", &[x], &[], "z");
                    let c1 = constant(&mut g, "c1", s1, 20 + i as u64);
                    let c2 = constant(&mut g, "c2", s2, 30 + i as u64);
                    let a = affine_node(&mut g, &reg, op1, z, c1, f1, "a");
                    let b = affine_node(&mut g, &reg, op2, a, c2, f2, "b");
                    let w = constant(&mut g, "w", &[8, 4 / group, kernel[0], kernel[1]], 40);
                    let bias = constant(&mut g, "bias", &[8], 41);
                    let attrs = [
                        ("group", Attr::Int(group as i64)),
                        ("pads", Attr::Ints(vec![pad; 4])),
                    ];
                    let out = add_node(&mut g, &reg, 13, "Conv", &[b, w, bias], &attrs, "out");
                    g.outputs = vec![out];
                    g.infer_facts().unwrap();
                    let want = run(&g, &inputs);
                    let folded = fold_affine_into_next_conv(&mut g, &reg).unwrap();
                    if pad == 0 {
                        assert_eq!(folded, 2, "{what}");
                        assert_eq!(g.nodes.len(), 2, "{what}");
                        assert_eq!(g.nodes[1].inputs[0], Some(z), "{what}");
                    } else {
                        assert_eq!(folded, 0, "{what}");
                    }
                    g.infer_facts().unwrap();
                    assert_close(&want, &run(&g, &inputs), &what);
                }
            }
        }
    }

    /// The whole pipeline on PP-LCNetV3's pattern: Conv, per-channel Mul/Add (an unfused
    /// BatchNorm), hard-swish written out, a scalar affine, then a 1×1 Conv — two layers.
    #[test]
    fn optimizer_folds_bn_affine_hard_swish_and_scalar_affine() {
        let reg = kiln_cpu::registry();
        let x_shape = [1, 3, 6, 6];
        let inputs = input(&x_shape);
        let spec = ConvSpec {
            x_shape: &x_shape,
            m: 4,
            kernel: &[3, 3],
            group: 1,
            bias: false,
            pad: 1,
        };
        let (mut g, _, y) = conv_graph(&reg, &spec);
        let scale = constant(&mut g, "scale", &[1, 4, 1, 1], 50);
        let shift = constant(&mut g, "shift", &[1, 4, 1, 1], 51);
        let three = add_constant(
            &mut g,
            "three",
            Tensor::from_vec(&[], vec![3.0f32]).unwrap(),
        );
        let zero = add_constant(&mut g, "zero", Tensor::from_vec(&[], vec![0.0f32]).unwrap());
        let six = add_constant(&mut g, "six", Tensor::from_vec(&[], vec![6.0f32]).unwrap());
        let a = constant(&mut g, "a", &[1], 52);
        let b = constant(&mut g, "b", &[1], 53);
        let bn1 = affine_node(&mut g, &reg, "Mul", y, scale, false, "bn1");
        let bn2 = affine_node(&mut g, &reg, "Add", bn1, shift, false, "bn2");
        let p3 = add_node(&mut g, &reg, 13, "Add", &[bn2, three], &[], "p3");
        let cl = add_node(&mut g, &reg, 13, "Clip", &[p3, zero, six], &[], "cl");
        let m = add_node(&mut g, &reg, 13, "Mul", &[bn2, cl], &[], "m");
        let hs = add_node(&mut g, &reg, 13, "Div", &[m, six], &[], "hs");
        let la = affine_node(&mut g, &reg, "Mul", hs, a, false, "la");
        let lb = affine_node(&mut g, &reg, "Add", la, b, false, "lb");
        let w2 = constant(&mut g, "w2", &[5, 4, 1, 1], 54);
        let out = add_node(&mut g, &reg, 13, "Conv", &[lb, w2], &[], "out");
        g.outputs = vec![out];
        g.infer_facts().unwrap();
        let want = run(&g, &inputs);
        crate::optimize::optimize(&mut g, &reg).unwrap();
        let ops: Vec<_> = g.nodes.iter().map(|n| n.desc.op_type.as_str()).collect();
        assert_eq!(ops, ["Conv", "Conv"]);
        assert!(matches!(
            g.nodes[0].desc.attrs.get(ACTIVATION_ATTR),
            Some(Attr::String(s)) if s == "HardSwish"
        ));
        assert_eq!(g.name_of(g.outputs[0]), "out");
        g.infer_facts().unwrap();
        assert_close(&want, &run(&g, &inputs), "pipeline");
    }
}
