//! `kiln inspect`: what an engine is made of.

use kiln::{Engine, LayerInfo};

use crate::build::{overhead, weight_bytes};
use crate::common::{self, human_bytes, io_json, CliError, CliResult, Context, Globals, ModelKind};
use crate::InspectArgs;

/// Runs `kiln inspect`.
pub fn run(g: &Globals, a: InspectArgs) -> CliResult<()> {
    let shapes = common::merge_shapes(&a.shapes)?;
    let loaded = common::load_model(g, &a.model, &shapes, &[], kiln::DeviceKind::Auto, true)?;
    let engine = loaded.engine;
    common::check_shape_names(&engine, &shapes)?;
    let (built_by, format_version) = match loaded.kind {
        ModelKind::Plan => {
            let bytes =
                std::fs::read(&a.model).context(|| format!("cannot read {}", a.model.display()))?;
            let h = kiln::plan::read_header(&bytes)?;
            (h.kiln_version, Some(h.format_version))
        }
        ModelKind::Onnx => (kiln::VERSION.to_string(), None),
    };
    // Memory: at the engine's static shapes, else at --shapes (plans built without shapes).
    let (memory, memory_note) = match engine.memory_report(None)? {
        Some(m) => (Some(m), None),
        None if !shapes.is_empty() => {
            let key = engine
                .inputs()
                .iter()
                .map(|i| {
                    // Sequences and optionals are not planned: no shape needed.
                    if i.kind != kiln_core::ValueKind::Tensor {
                        return Ok(None);
                    }
                    let dtype = i.dtype.ok_or_else(|| {
                        CliError(format!("input {}: the model does not declare its dtype", i.name))
                    })?;
                    Ok(Some((dtype, common::resolve_shape(i, &shapes)?)))
                })
                .collect::<CliResult<Vec<_>>>()?;
            (engine.memory_report(Some(&key))?, Some("at the shapes given with --shapes".to_string()))
        }
        None if !engine.profiles().is_empty() => {
            let key = engine.profile_signature(0, kiln::ProfileBound::Opt)?;
            (
                engine.memory_report(Some(&key))?,
                Some("at optimization profile 0's opt shapes (pass --shapes for others)".to_string()),
            )
        }
        None => (
            None,
            Some("dynamic input shapes: memory is planned per input shape at run time; pass --shapes to see a plan".into()),
        ),
    };
    let layers = engine.layers();
    let weights = weight_bytes(&engine);
    if a.json {
        let v = serde_json::json!({
            "model": a.model.display().to_string(),
            "kind": if loaded.kind == ModelKind::Plan { "plan" } else { "onnx" },
            "kiln_version": built_by,
            "format_version": format_version,
            "source": engine.source(),
            "fingerprint": engine.fingerprint(),
            "build_shapes": engine.build_shapes(),
            "profiles": engine.profiles(),
            "inputs": engine.inputs().iter().map(io_json).collect::<Vec<_>>(),
            "outputs": engine.outputs().iter().map(io_json).collect::<Vec<_>>(),
            "memory": memory,
            "memory_note": memory_note,
            "gpu": engine.gpu().map(|g| serde_json::json!({
                "options": g.options(),
                "info": g.info(),
                "arena_bytes": g.arena_bytes().0,
                "arena_lower_bound_bytes": g.arena_bytes().1,
                "weight_bytes": g.weight_bytes(),
                "modules": g.images().len(),
                "fallback_layers": g.fallbacks(),
            })),
            "weights_bytes": weights,
            "weights_tensors": engine.graph().constants.len(),
            "optimizer": engine.optimize_report(),
            "layers": layers,
        });
        return common::print_json(&v);
    }
    print_text(
        &a,
        &engine,
        &built_by,
        format_version,
        loaded.kind,
        memory.as_ref(),
        memory_note,
        weights,
        &layers,
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn print_text(
    a: &InspectArgs,
    engine: &Engine,
    built_by: &str,
    format_version: Option<u32>,
    kind: ModelKind,
    memory: Option<&kiln::MemoryReport>,
    memory_note: Option<String>,
    weights: usize,
    layers: &[LayerInfo],
) {
    let fp = engine.fingerprint();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |k: &str, v: String| rows.push(vec![k.to_string(), v]);
    row("model", a.model.display().to_string());
    match (kind, format_version) {
        (ModelKind::Plan, Some(v)) => row(
            "built by",
            format!("kiln {built_by} (plan format version {v})"),
        ),
        _ => row(
            "built by",
            format!("kiln {built_by} (in memory, from ONNX)"),
        ),
    }
    row("source", engine.source().to_string());
    row(
        "fingerprint",
        format!("{} / {} / {}", fp.backend, fp.device, fp.arch),
    );
    row(
        "cpu features",
        if fp.cpu_features.is_empty() {
            "-".into()
        } else {
            fp.cpu_features.join(" ")
        },
    );
    if !fp.required_features.is_empty() {
        row("requires", fp.required_features.join(" "));
    }
    let bs = engine.build_shapes();
    row(
        "build shapes",
        if bs.is_empty() {
            "none (dynamic)".into()
        } else {
            bs.iter()
                .map(|(k, v)| {
                    format!(
                        "{k}:{}",
                        v.iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join("x")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    for (k, p) in engine.profiles().iter().enumerate() {
        row(&format!("profile {k}"), p.describe().join("; "));
    }
    print!("{}", common::table(&rows));

    println!("\nInputs");
    let io_rows: Vec<Vec<String>> = engine
        .inputs()
        .iter()
        .map(|i| vec![format!("  {}", i.name), i.describe()])
        .collect();
    print!("{}", common::table(&io_rows));
    println!("Outputs");
    let io_rows: Vec<Vec<String>> = engine
        .outputs()
        .iter()
        .map(|i| vec![format!("  {}", i.name), i.describe()])
        .collect();
    print!("{}", common::table(&io_rows));

    println!("\nMemory");
    let mut rows: Vec<Vec<String>> = Vec::new();
    match memory {
        Some(m) => {
            rows.push(vec![
                "  arena".into(),
                format!(
                    "{} ({} bytes; liveness lower bound {} = {} bytes{})",
                    human_bytes(m.arena_bytes),
                    m.arena_bytes,
                    human_bytes(m.liveness_lower_bound_bytes),
                    m.liveness_lower_bound_bytes,
                    overhead(m.arena_bytes, m.liveness_lower_bound_bytes)
                ),
            ]);
            rows.push(vec![
                "  activations".into(),
                format!(
                    "{} in the arena, {} allocated at run time",
                    m.arena_tensors, m.dynamic_tensors
                ),
            ]);
        }
        None => rows.push(vec!["  arena".into(), "-".into()]),
    }
    if let Some(n) = memory_note {
        rows.push(vec!["  note".into(), n]);
    }
    if let Some(g) = engine.gpu() {
        let (arena, bound) = g.arena_bytes();
        rows.push(vec![
            "  GPU".into(),
            format!(
                "arena {} (lower bound {}), weights {} on the device, {} CUBIN modules, {} layers on the CPU (fallback), {}",
                human_bytes(arena),
                human_bytes(bound),
                human_bytes(g.weight_bytes()),
                g.images().len(),
                g.fallbacks(),
                if g.options().fp16 { "FP16 (values shown below are the graph's FP32 types)" } else if g.options().tf32 { "FP32 with TF32 GEMMs" } else { "FP32" }
            ),
        ]);
    }
    rows.push(vec![
        "  weights".into(),
        format!(
            "{} in {} tensors",
            human_bytes(weights),
            engine.graph().constants.len()
        ),
    ]);
    print!("{}", common::table(&rows));

    let r = engine.optimize_report();
    println!("\nOptimizer");
    let rows = vec![
        vec![
            "  layers".to_string(),
            format!("{} -> {}", r.nodes_before, r.nodes_after),
        ],
        vec![
            "  BatchNorm folded".to_string(),
            r.batchnorms_folded.to_string(),
        ],
        vec![
            "  activations fused".to_string(),
            r.activations_fused.to_string(),
        ],
        vec![
            "  residual Adds fused".to_string(),
            r.residuals_fused.to_string(),
        ],
        vec![
            "  Q/DQ pairs folded".to_string(),
            r.qdq_pairs_folded.to_string(),
        ],
        vec![
            "  folding/cleanup rewrites".to_string(),
            r.generic_rewrites.to_string(),
        ],
    ];
    let mut rows = rows;
    if r.qdq.qdq_nodes > 0 {
        rows.push(vec![
            "  explicit INT8 (Q/DQ)".to_string(),
            format!(
                "{} layers lowered to INT8 kernels ({} with INT8 outputs) of a model with {} QuantizeLinear/DequantizeLinear nodes",
                r.qdq.lowered.len(),
                r.qdq.int8_outputs,
                r.qdq.qdq_nodes
            ),
        ]);
    }
    if let Some(b) = &r.int8_fallback {
        rows.push(vec![
            "  accuracy budget".to_string(),
            format!(
                "rel L2 ≤ {}: {} of {} INT8 layers fell back to FP32 (rel L2 {:.5} -> {:.5}){}{}",
                b.budget,
                b.fallback.len(),
                b.int8_layers.len(),
                b.initial_rel_l2,
                b.final_rel_l2,
                if b.fallback.is_empty() { "" } else { ": " },
                b.fallback.join(", ")
            ),
        ]);
    }
    print!("{}", common::table(&rows));

    println!("\nLayers ({})", layers.len());
    let mut rows = vec![vec![
        "#".to_string(),
        "name".into(),
        "op".into(),
        "fused from".into(),
        "device".into(),
        "precision".into(),
        "tactic".into(),
        "inputs -> outputs".into(),
    ]];
    for (i, l) in layers.iter().enumerate() {
        let fused = if l.fused_from.len() <= 1 && l.fused_from.first().is_none_or(|f| *f == l.name)
        {
            "-".to_string()
        } else {
            l.fused_from.join(" + ")
        };
        let io = |v: &[(String, String)]| {
            v.iter()
                .map(|(n, d)| format!("{n}:{d}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.push(vec![
            i.to_string(),
            l.name.clone(),
            l.op.clone(),
            fused,
            l.device.clone(),
            l.precision.clone(),
            l.tactic.clone(),
            format!("{} -> {}", io(&l.inputs), io(&l.outputs)),
        ]);
    }
    print!("{}", common::table(&rows));
}
