//! `kiln build`: ONNX model in, plan file out, with a summary of what the builder did.

use std::path::Path;
use std::time::Instant;

use kiln::Engine;

use crate::common::{self, human_bytes, io_json, CliError, CliResult, Context, Globals, ModelKind};
use crate::BuildArgs;

/// Bytes of the engine's weights (constants).
pub fn weight_bytes(engine: &Engine) -> usize {
    engine
        .graph()
        .constants
        .values()
        .map(|t| t.bytes().len())
        .sum()
}

/// `--accuracy-budget`: build, measure against FP32 on the batches of `dir`, fall back.
fn build_within_budget(
    g: &Globals,
    a: &BuildArgs,
    mut config: kiln::BuilderConfig,
    budget: f64,
    dir: &Path,
) -> CliResult<common::Loaded> {
    if common::looks_like_plan(&a.model)? {
        return Err(CliError(format!(
            "{} is already a plan; kiln build takes an ONNX model",
            a.model.display()
        )));
    }
    let inputs = kiln::int8::calibrate::model_inputs(&a.model)?;
    let files = kiln::int8::data::list_batches(dir, &inputs)?;
    let batches = files
        .iter()
        .map(|b| b.load())
        .collect::<kiln::Result<Vec<_>>>()?;
    if config.shapes.is_empty() && config.profiles.is_empty() {
        config.shapes = batches[0]
            .iter()
            .map(|(n, t)| (n.clone(), t.shape().to_vec()))
            .collect();
    }
    let start = Instant::now();
    let pb = common::spinner(
        g,
        format!(
            "building {} within rel L2 {budget} of FP32 on {} batches",
            a.model.display(),
            batches.len()
        ),
    );
    let mut timer = kiln::tuner::CpuTimer::for_config(&config)?;
    let engine = kiln::int8::budget::build_within_budget(
        &a.model,
        &config,
        budget,
        &batches,
        &kiln::tuner::cpu_tactics,
        &mut timer,
    );
    pb.finish_and_clear();
    Ok(common::Loaded {
        engine: engine?,
        kind: ModelKind::Onnx,
        elapsed: start.elapsed(),
    })
}

/// Runs `kiln build`.
pub fn run(g: &Globals, a: BuildArgs) -> CliResult<()> {
    let shapes = common::merge_shapes(&a.shapes)?;
    let profiles = common::profiles_from_args(&a.min_shapes, &a.opt_shapes, &a.max_shapes)?;
    let output = a
        .output
        .clone()
        .unwrap_or_else(|| a.model.with_extension("plan"));
    if output == a.model {
        return Err(CliError(format!(
            "the output {} would overwrite the model; pass -o MODEL.plan",
            output.display()
        )));
    }
    let start = Instant::now();
    let mut layer_precision = std::collections::BTreeMap::new();
    for spec in &a.layer_precision {
        layer_precision
            .extend(kiln::parse_layer_precision(spec).map_err(|e| CliError(e.to_string()))?);
    }
    let config = kiln::BuilderConfig {
        device: a.device.into(),
        shapes,
        optimize: !a.no_optimize,
        opt_level: a.opt_level,
        fp16: a.fp16,
        tf32: a.tf32,
        int8: a.int8,
        explicit_int8: !a.no_explicit_int8,
        calibration: match &a.calib_cache {
            Some(p) => Some(std::sync::Arc::new(
                kiln::int8::CalibrationCache::load(p).map_err(|e| CliError(e.to_string()))?,
            )),
            None => None,
        },
        observe_activations: false,
        layer_precision,
        timing_cache: a.timing_cache.clone(),
        engine_check: !a.no_engine_check,
        threads: a.threads.map(|n| n as usize),
        profiles,
    };
    let loaded = match (a.accuracy_budget, &a.calib_data) {
        (Some(budget), Some(dir)) => build_within_budget(g, &a, config, budget, dir)?,
        _ => common::load_model_with(g, &a.model, &config)?,
    };
    if loaded.kind == ModelKind::Plan {
        return Err(CliError(format!(
            "{} is already a plan; kiln build takes an ONNX model",
            a.model.display()
        )));
    }
    let engine = loaded.engine;
    let build_time = loaded.elapsed;
    let pb = common::spinner(g, format!("writing {}", output.display()));
    let saved = engine
        .save(&output)
        .context(|| format!("cannot write plan {}", output.display()));
    pb.finish_and_clear();
    saved?;
    let plan_bytes = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
    let total = start.elapsed();
    tracing::info!(plan = %output.display(), bytes = plan_bytes, "wrote plan");

    let report = engine.optimize_report().clone();
    let memory = engine.memory_report(None)?;
    let weights = weight_bytes(&engine);
    if a.json {
        let v = serde_json::json!({
            "model": a.model.display().to_string(),
            "plan": output.display().to_string(),
            "kiln_version": kiln::VERSION,
            "device": engine.device(),
            "fingerprint": engine.fingerprint(),
            "build_shapes": engine.build_shapes(),
            "profiles": engine.profiles(),
            "optimized": !a.no_optimize,
            "layers_before": if a.no_optimize { engine.graph().nodes.len() } else { report.nodes_before },
            "layers_after": engine.graph().nodes.len(),
            "optimizer": report,
            "memory": memory,
            "gpu": engine.gpu().map(|gpu| serde_json::json!({
                "options": gpu.options(),
                "fallback_layers": gpu.fallbacks(),
                "modules": gpu.images().len(),
                "arena_bytes": gpu.arena_bytes().0,
                "weight_bytes": gpu.weight_bytes(),
            })),
            "weights_bytes": weights,
            "plan_bytes": plan_bytes,
            "tuning": engine.tuning_report(),
            "int8_layers": int8_layer_count(&engine),
            "explicit_quantization": &report.qdq,
            "accuracy_budget": &report.int8_fallback,
            "build_time_s": build_time.as_secs_f64(),
            "total_time_s": total.as_secs_f64(),
            "inputs": engine.inputs().iter().map(io_json).collect::<Vec<_>>(),
            "outputs": engine.outputs().iter().map(io_json).collect::<Vec<_>>(),
        });
        return common::print_json(&v);
    }
    if g.verbose > 0 {
        if let Some(t) = engine.tuning_report() {
            print_tuning(t);
        }
    }
    print_summary(
        &a.model,
        &output,
        &engine,
        a.no_optimize,
        memory.as_ref(),
        weights,
        plan_bytes,
        build_time,
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn print_summary(
    model: &Path,
    output: &Path,
    engine: &Engine,
    no_optimize: bool,
    memory: Option<&kiln::MemoryReport>,
    weights: usize,
    plan_bytes: u64,
    build_time: std::time::Duration,
) {
    let r = engine.optimize_report();
    let fp = engine.fingerprint();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |k: &str, v: String| rows.push(vec![format!("  {k}"), v]);
    row(
        "device",
        format!(
            "{} ({}; {})",
            fp.backend,
            fp.device,
            fp.cpu_features.join(" ")
        ),
    );
    let shapes = engine.build_shapes();
    row(
        "shapes",
        if shapes.is_empty() {
            "none given: memory is planned per input shape at run time".into()
        } else {
            shapes
                .iter()
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
    let after = engine.graph().nodes.len();
    if no_optimize {
        row("layers", format!("{after} (optimisation off)"));
    } else {
        row("layers", format!("{} -> {after}", r.nodes_before));
        row(
            "fusions",
            format!(
                "{} BatchNormalization folded into Conv, {} activations fused, {} residual Adds fused into Conv, {} folding/cleanup rewrites",
                r.batchnorms_folded, r.activations_fused, r.residuals_fused, r.generic_rewrites
            ),
        );
        if r.qdq_pairs_folded > 0 {
            row(
                "Q/DQ pairs",
                format!(
                    "{} QuantizeLinear -> DequantizeLinear pairs folded into fused elementwise chains",
                    r.qdq_pairs_folded
                ),
            );
        }
    }
    for i in engine.inputs() {
        row("input", format!("{} {}", i.name, i.describe()));
    }
    for o in engine.outputs() {
        row("output", format!("{} {}", o.name, o.describe()));
    }
    row(
        "weights",
        format!(
            "{} in {} tensors",
            human_bytes(weights),
            engine.graph().constants.len()
        ),
    );
    row(
        "arena",
        match memory {
            Some(m) => format!(
                "{} (liveness lower bound {}{}), {} activations planned, {} allocated at run time",
                human_bytes(m.arena_bytes),
                human_bytes(m.liveness_lower_bound_bytes),
                overhead(m.arena_bytes, m.liveness_lower_bound_bytes),
                m.arena_tensors,
                m.dynamic_tensors
            ),
            None => "planned per input shape at run time (dynamic input shapes)".into(),
        },
    );
    row(
        "plan file",
        format!(
            "{} ({})",
            output.display(),
            human_bytes(plan_bytes as usize)
        ),
    );
    if let Some(t) = engine.tuning_report() {
        row(
            "tuning",
            if t.level == 0 {
                "opt level 0: heuristic tactics, nothing timed".into()
            } else {
                format!(
                    "opt level {}{}: {} layers tuned, {} tactics timed, {} from the timing cache, {} reformat layers, {:.2} s",
                    t.level,
                    t.threads.map_or(String::new(), |n| format!(
                        ", timed at {n} thread{}",
                        if n == 1 { "" } else { "s" }
                    )),
                    t.layers.len(),
                    t.timed,
                    t.cache_hits,
                    t.reformats,
                    t.seconds
                )
            },
        );
    }
    if let Some(race) = engine.tuning_report().and_then(|t| t.whole_engine.as_ref()) {
        use kiln::tuner::whole_engine::{Check, Kept};
        let (tuned, other, lost) = match race.check {
            Check::Int8 => (
                format!("{} INT8 layers", race.int8_layers),
                "float-only",
                "float engine (INT8 did not pay end to end)",
            ),
            Check::Layouts => (
                "channels-last layers".to_string(),
                "linear-only",
                "linear engine (channels-last did not pay end to end)",
            ),
        };
        row(
            "engine check",
            format!(
                "tuned engine ({tuned}) {:.3} ms vs {other} {:.3} ms ({}, median of {} runs each): kept the {}",
                race.tuned_ms,
                race.float_ms,
                race.clock,
                race.rounds,
                match race.kept {
                    Kept::Tuned => "tuned engine",
                    Kept::Float => lost,
                }
            ),
        );
    }
    if r.qdq.qdq_nodes > 0 {
        row(
            "explicit INT8",
            format!(
                "Q/DQ model: {} Conv/MatMul/Gemm layers lowered to INT8 kernels with the model's scales and zero points ({} with INT8 outputs); Q->DQ pairs with equal parameters run inside the fused elementwise chains, the other QuantizeLinear/DequantizeLinear nodes as their own layers (vectorised f32<->u8/i8 kernels where per tensor or per axis)",
                r.qdq.lowered.len(),
                r.qdq.int8_outputs
            ),
        );
    }
    let int8 = int8_layer_count(engine);
    if int8 > 0 || r.int8_fallback.is_some() {
        row("INT8 layers", int8.to_string());
    }
    if let Some(b) = &r.int8_fallback {
        row(
            "accuracy budget",
            if b.fallback.is_empty() {
                format!(
                    "rel L2 {:.5} ≤ {} on {} batches with all {} INT8 layers kept",
                    b.final_rel_l2,
                    b.budget,
                    b.batches,
                    b.int8_layers.len()
                )
            } else {
                format!(
                    "{} of {} INT8 layers fell back to FP32 (rel L2 {:.5} -> {:.5}, budget {}, {} batches, {} builds): {}",
                    b.fallback.len(),
                    b.int8_layers.len(),
                    b.initial_rel_l2,
                    b.final_rel_l2,
                    b.budget,
                    b.batches,
                    b.builds,
                    b.fallback.join(", ")
                )
            },
        );
    }
    row("build time", format!("{:.2} s", build_time.as_secs_f64()));
    println!("Built {} -> {}", model.display(), output.display());
    print!("{}", common::table(&rows));
}

/// Layers running on the INT8 kernels.
pub fn int8_layer_count(engine: &Engine) -> usize {
    engine
        .graph()
        .nodes
        .iter()
        .filter(|n| matches!(n.desc.op_type.as_str(), "Int8Conv" | "Int8MatMul"))
        .count()
}

/// ` , +12.5%` style overhead of the arena over the lower bound.
pub fn overhead(arena: usize, bound: usize) -> String {
    if bound == 0 || arena <= bound {
        if arena == bound {
            ", optimal".into()
        } else {
            String::new()
        }
    } else {
        format!(", +{:.1}%", (arena - bound) as f64 * 100.0 / bound as f64)
    }
}

/// `-v`: every tuned layer's candidates with their times, the winner marked.
fn print_tuning(t: &kiln::TuneReport) {
    eprintln!("tactics (opt level {}):", t.level);
    for l in &t.layers {
        eprintln!("  {}", l.layer);
        for c in &l.candidates {
            let mark = if c.tactic == l.chosen { "*" } else { " " };
            let time = match (&c.time_ms, &c.dropped) {
                (Some(ms), _) => format!("{ms:9.4} ms{}", if c.cached { " (cache)" } else { "" }),
                (None, Some(why)) => format!("dropped: {why}"),
                (None, None) => "-".into(),
            };
            eprintln!("    {mark} {:<40} {:<14} {time}", c.tactic, c.format);
        }
    }
    eprintln!(
        "  total {:.4} ms as chosen (reformats counted) vs {:.4} ms layer by layer",
        t.estimated_ms, t.layerwise_ms
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_text() {
        assert_eq!(overhead(100, 100), ", optimal");
        assert_eq!(overhead(125, 100), ", +25.0%");
        assert_eq!(overhead(0, 0), ", optimal");
    }
}
