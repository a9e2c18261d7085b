//! The GPU's FP16 precision policy, checked without a GPU: the optimised graph of every real
//! model runs on the CPU reference ops with exactly the roundings an FP16 GPU engine applies
//! (float weights of FP16 layers, values stored in F16 between layers, saturating at ±65504;
//! biases read in F32 and arithmetic inside a layer in f32, as the GPU kernels do), and the
//! layers the policy keeps in FP32 unrounded. Every case must stay within the FP16 limit of the GPU check (rel L2 ≤
//! 1e-2 against ONNX Runtime, same argmax for classifiers), and the emulation without the
//! policy must be worse on at least one case (so the policy is what makes it pass).
//!
//! `KILN_FP16_SWEEP=<case>` prints, for that case, the error with each layer alone kept in
//! FP32 (the sensitivity table the policy was derived from). `KILN_FP16_SWEEP_MODE=draws`
//! instead prints the error's spread over rounding draws (below); `KILN_FP16_BIAS16=1`
//! rounds biases too (as before they were read in F32).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use half::f16;
use kiln::{parse_shapes, Builder, BuilderConfig, DeviceKind, Tensor, Value};
use kiln_core::{DType, Graph};
use kiln_cuda::exec::plan_layers;
use kiln_cuda::precision::{f16_rounding_error, fp32_layers, reads_f32, Policy};
use kiln_cuda::GpuOptions;

const CLASSIFIERS: &[&str] = &["orientation_b1", "orientation_b4", "ppocr_cls_b6"];

/// Rounding draw: 0 rounds to nearest; draw d > 0 rounds tensors of at least 16 elements
/// (weights and activations, not scalars or Resize scales) as `round(x·s)/s` with
/// `s = 1 + frac(d·0.618…)`, which keeps the size of every rounding error but changes which
/// way each value rounds: the same computation under another set of rounding errors.
static DRAW: AtomicU32 = AtomicU32::new(0);

fn round16(v: &Value) -> Value {
    match v {
        Value::Tensor(t) if t.dtype() == DType::F32 => {
            let draw = DRAW.load(Ordering::Relaxed);
            let s = if draw > 0 && t.len() >= 16 {
                1.0 + (draw as f32 * 0.618_034).fract()
            } else {
                1.0
            };
            let d: Vec<f32> = t
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .map(|&x| {
                    if x.is_nan() {
                        x
                    } else {
                        f16::from_f32((x * s).clamp(-65504.0, 65504.0)).to_f32() / s
                    }
                })
                .collect();
            Value::Tensor(Tensor::from_vec(t.shape(), d).unwrap())
        }
        other => other.clone(),
    }
}

/// Runs `graph` with FP16 roundings: `fp32[i]` keeps node i in FP32; `cpu[i]` marks CPU
/// fallbacks (they read exact weights, but their stored outputs are rounded like any FP16
/// layer's unless kept in FP32). FP16 layers read their biases ([`reads_f32`]) unrounded.
fn emulate(graph: &Graph, inputs: &[(String, Tensor)], fp32: &[bool], cpu: &[bool]) -> Vec<Tensor> {
    let bias16 = std::env::var_os("KILN_FP16_BIAS16").is_some();
    let mut vals: HashMap<usize, (Value, bool)> = HashMap::new();
    // A graph input is stored in F16 unless an FP32 layer reads it.
    for &i in &graph.inputs {
        let name = &graph.values[i].name;
        let t = &inputs.iter().find(|(n, _)| n == name).expect("input").1;
        let read32 = graph
            .nodes
            .iter()
            .enumerate()
            .any(|(k, n)| fp32[k] && n.inputs.contains(&Some(i)));
        vals.insert(i, (Value::Tensor(t.clone()), !read32));
    }
    for (k, node) in graph.nodes.iter().enumerate() {
        let lo = !fp32[k];
        let args: Vec<Option<Value>> = node
            .inputs
            .iter()
            .enumerate()
            .map(|(j, inp)| {
                // Read in F16: inputs of FP16 GPU layers, biases excepted.
                let read16 = lo && !cpu[k] && (bias16 || !reads_f32(node, j));
                inp.map(|v| {
                    if let Some(c) = graph.constants.get(&v) {
                        let c = Value::Tensor(c.clone());
                        if read16 {
                            round16(&c)
                        } else {
                            c
                        }
                    } else {
                        let (x, stored16) = &vals[&v];
                        if *stored16 || read16 {
                            round16(x)
                        } else {
                            x.clone()
                        }
                    }
                })
            })
            .collect();
        let refs: Vec<Option<&Value>> = args.iter().map(|a| a.as_ref()).collect();
        let outs = node.op.eval(&refs).expect("eval");
        for (o, v) in node.outputs.iter().zip(outs) {
            if let Some(o) = o {
                vals.insert(*o, (v, lo));
            }
        }
    }
    graph
        .outputs
        .iter()
        .map(|o| {
            if let Some(c) = graph.constants.get(o) {
                return c.clone();
            }
            let (v, s16) = &vals[o];
            let v = if *s16 { round16(v) } else { v.clone() };
            v.as_tensor().unwrap().clone()
        })
        .collect()
}

struct Model {
    engine: kiln::Engine,
    case: common::Case,
}

fn load(assets: &std::path::Path, name: &str) -> Model {
    let case = common::case(assets, name);
    let config = BuilderConfig {
        device: DeviceKind::Cpu,
        shapes: parse_shapes(&case.shapes).expect("shapes"),
        ..Default::default()
    };
    let engine = Builder::new()
        .build_onnx_file(&case.model, &config)
        .expect("build");
    Model { engine, case }
}

/// (worst rel L2 over outputs, argmax same).
fn score(m: &Model, fp32: &[bool]) -> (f64, bool) {
    let g = m.engine.graph();
    let facts = m.engine.planned_facts().expect("static plan");
    let opts = GpuOptions {
        fp16: true,
        tf32: false,
    };
    let cpu: Vec<bool> = plan_layers(g, facts, opts)
        .expect("lowering")
        .iter()
        .map(|l| l.device == "cpu")
        .collect();
    let got = emulate(g, &m.case.inputs, fp32, &cpu);
    let mut worst: f64 = 0.0;
    let mut same = true;
    for (k, v) in g.outputs.iter().enumerate() {
        let name = &g.values[*v].name;
        let want = &m.case.outputs.iter().find(|(n, _)| n == name).unwrap().1;
        let e = common::rel_l2(&got[k], want);
        if std::env::var_os("KILN_FP16_VERBOSE").is_some() {
            eprintln!("  output {name} {:?}: rel L2 {e:.3e}", want.shape());
        }
        worst = worst.max(e);
        if k == 0 && CLASSIFIERS.contains(&m.case.name.as_str()) {
            same &= common::argmax_rows(&got[k]) == common::argmax_rows(want);
        }
    }
    (worst, same)
}

#[test]
fn fp16_policy_keeps_real_models_within_limits() {
    let Some(assets) = common::assets() else {
        return;
    };
    if let Ok(name) = std::env::var("KILN_FP16_SWEEP") {
        sweep(&load(&assets, &name));
        return;
    }
    let mut without_worse = false;
    let mut failed = Vec::new();
    for name in common::case_names(&assets) {
        let m = load(&assets, &name);
        let g = m.engine.graph();
        let facts = m.engine.planned_facts().expect("static plan");
        let none = vec![false; g.nodes.len()];
        let policy = fp32_layers(g, facts, &policy_from_env());
        let kept: Vec<&str> = g
            .nodes
            .iter()
            .zip(&policy)
            .filter(|(_, &k)| k)
            .map(|(n, _)| n.desc.op_type.as_str())
            .collect();
        let (e0, a0) = score(&m, &none);
        let (e1, a1) = score(&m, &policy);
        eprintln!(
            "{name}: all FP16 {e0:.3e} (argmax same {a0}); policy {e1:.3e} (argmax same {a1}), {} of {} layers FP32: {kept:?}",
            kept.len(),
            g.nodes.len()
        );
        if e0 > 1e-2 || !a0 {
            without_worse = true;
        }
        if e1.is_nan() || e1 > 1e-2 || !a1 {
            failed.push(name.clone());
        }
    }
    assert!(
        failed.is_empty(),
        "FP16 emulation over the limit: {failed:?}"
    );
    assert!(
        without_worse,
        "no case fails without the policy: the test no longer shows the policy working"
    );
}

/// The default policy, with experiment overrides (`KILN_FP16_WERR`, `KILN_FP16_FIRST=0`,
/// `KILN_FP16_OPS=Exp,Log,...`, `KILN_FP16_DIV=0`) for deriving thresholds.
fn policy_from_env() -> Policy {
    let mut p = Policy::default();
    if let Ok(v) = std::env::var("KILN_FP16_WERR") {
        p.weight_rel_err = v.parse().expect("KILN_FP16_WERR");
    }
    if let Ok(v) = std::env::var("KILN_FP16_MACS") {
        p.min_macs = v.parse().expect("KILN_FP16_MACS");
    }
    if let Ok(v) = std::env::var("KILN_FP16_SUMS16") {
        p.sums_fp16 = v == "1";
    }
    if let Ok(v) = std::env::var("KILN_FP16_NEW") {
        p.new_values_fp32 = v == "1";
    }
    if let Ok(v) = std::env::var("KILN_FP16_STEM") {
        p.stem_layers = v.parse().expect("KILN_FP16_STEM");
    }
    if let Ok(v) = std::env::var("KILN_FP16_DIV") {
        p.products_of_values = v == "1";
    }
    if let Ok(v) = std::env::var("KILN_FP16_OPS") {
        p.ops = v
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
    }
    p
}

fn sweep(m: &Model) {
    let g = m.engine.graph();
    let n = g.nodes.len();
    let (base, _) = score(m, &vec![false; n]);
    eprintln!("{}: all FP16 {base:.3e}", m.case.name);
    let weighted: Vec<usize> = (0..n)
        .filter(|&i| {
            g.nodes[i]
                .inputs
                .iter()
                .flatten()
                .any(|v| g.constants.get(v).is_some_and(|t| t.len() > 16))
        })
        .collect();
    if std::env::var("KILN_FP16_SWEEP_MODE").as_deref() == Ok("draws") {
        // One case's error is one draw of the rounding errors: its spread over 17 draws
        // (the policy against all-FP16), to compare policies and graphs by more than luck.
        let facts = m.engine.planned_facts().expect("static plan");
        let policy = fp32_layers(g, facts, &policy_from_env());
        let (mut e_policy, mut e_all) = (Vec::new(), Vec::new());
        for draw in 0..17 {
            DRAW.store(draw, Ordering::Relaxed);
            e_policy.push(score(m, &policy).0);
            e_all.push(score(m, &vec![false; n]).0);
        }
        DRAW.store(0, Ordering::Relaxed);
        for (what, mut e) in [("policy", e_policy), ("all FP16", e_all)] {
            let rms = (e.iter().map(|x| x * x).sum::<f64>() / e.len() as f64).sqrt();
            e.sort_by(|a, b| a.total_cmp(b));
            let over = e.iter().filter(|&&x| x > 1e-2).count();
            eprintln!(
                "{what}: rms {rms:.2e}, median {:.2e}, max {:.2e}, {over} of {} over 1e-2",
                e[e.len() / 2],
                e[e.len() - 1],
                e.len()
            );
        }
        return;
    }
    if std::env::var("KILN_FP16_SWEEP_MODE").as_deref() == Ok("types") {
        // Every layer of one op type in FP32 (weighted and unweighted layers apart).
        let mut types: Vec<(String, bool)> = (0..n)
            .map(|i| (g.nodes[i].desc.op_type.clone(), weighted.contains(&i)))
            .collect();
        types.sort();
        types.dedup();
        for (t, w) in types {
            let f: Vec<bool> = (0..n)
                .map(|i| g.nodes[i].desc.op_type == t && weighted.contains(&i) == w)
                .collect();
            let count = f.iter().filter(|&&b| b).count();
            eprintln!("type {t} weighted {w} ({count}): {:.3e}", score(m, &f).0);
        }
        return;
    }
    if std::env::var("KILN_FP16_SWEEP_MODE").as_deref() == Ok("ends") {
        // The first / last k weighted layers in FP32.
        for k in [1usize, 2, 4, 8, 16, 32, 64] {
            if k > weighted.len() {
                break;
            }
            let mut f = vec![false; n];
            for &i in &weighted[weighted.len() - k..] {
                f[i] = true;
            }
            let (e_last, _) = score(m, &f);
            let mut f = vec![false; n];
            for &i in &weighted[..k] {
                f[i] = true;
            }
            let (e_first, _) = score(m, &f);
            eprintln!("k {k}: last k weighted FP32 {e_last:.3e}, first k {e_first:.3e}");
        }
        let mut f = vec![false; n];
        for &i in &weighted {
            f[i] = true;
        }
        eprintln!("all weighted FP32: {:.3e}", score(m, &f).0);
        let f: Vec<bool> = (0..n).map(|i| !weighted.contains(&i)).collect();
        eprintln!("all but weighted FP32: {:.3e}", score(m, &f).0);
        return;
    }
    let mut rows = Vec::new();
    for &i in &weighted {
        let mut f = vec![false; n];
        f[i] = true;
        let (e, _) = score(m, &f);
        rows.push((e, i));
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Activation ranges of the exact run: max |x| and the share of F16-subnormal values.
    let exact = vec![true; n];
    let stats = activation_stats(g, &m.case.inputs, &exact);
    for (e, i) in rows.iter().take(25) {
        let node = &g.nodes[*i];
        let werr = node
            .inputs
            .iter()
            .flatten()
            .filter_map(|v| g.constants.get(v))
            .map(f16_rounding_error)
            .fold(0.0, f64::max);
        let (mx, sub) = stats[*i];
        eprintln!(
            "{e:.3e} node {i} {} {} weight f16 err {werr:.2e} out max {mx:.2e} subnormal {sub:.3}",
            node.desc.op_type, node.name
        );
    }
}

/// Per node: (max |output|, share of nonzero outputs below F16's smallest normal).
fn activation_stats(g: &Graph, inputs: &[(String, Tensor)], fp32: &[bool]) -> Vec<(f32, f64)> {
    let mut vals: HashMap<usize, Value> = HashMap::new();
    for &i in &g.inputs {
        let name = &g.values[i].name;
        let t = &inputs.iter().find(|(n, _)| n == name).expect("input").1;
        vals.insert(i, Value::Tensor(t.clone()));
    }
    let _ = fp32;
    let mut out = Vec::new();
    for node in &g.nodes {
        let args: Vec<Option<Value>> = node
            .inputs
            .iter()
            .map(|inp| {
                inp.map(|v| match g.constants.get(&v) {
                    Some(c) => Value::Tensor(c.clone()),
                    None => vals[&v].clone(),
                })
            })
            .collect();
        let refs: Vec<Option<&Value>> = args.iter().map(|a| a.as_ref()).collect();
        let outs = node.op.eval(&refs).expect("eval");
        let mut mx = 0.0f32;
        let (mut sub, mut nz) = (0usize, 0usize);
        if let Some(Value::Tensor(t)) = outs.first() {
            if let Ok(v) = t.as_slice::<f32>() {
                for &x in v {
                    mx = mx.max(x.abs());
                    if x != 0.0 {
                        nz += 1;
                        if x.abs() < 6.1e-5 {
                            sub += 1;
                        }
                    }
                }
            }
        }
        out.push((mx, sub as f64 / nz.max(1) as f64));
        for (o, v) in node.outputs.iter().zip(outs) {
            if let Some(o) = o {
                vals.insert(*o, v);
            }
        }
    }
    out
}
