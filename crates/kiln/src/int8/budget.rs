//! `--accuracy-budget`: per-layer FP32 fallback until an INT8 engine is within a given
//! error of the FP32 one (TensorRT leaves this to the user).
//!
//! On the given batches ([`build_within_budget`]):
//!
//! 1. build the FP32 engine (the reference) and the INT8 engine as configured; if every
//!    output's relative L2 error `‖int8 − fp32‖ / ‖fp32‖` (over all batches) is within the
//!    budget, keep it;
//! 2. otherwise measure each INT8 layer's own error: the engine with only that layer in
//!    INT8 (every other one pinned to FP32), its worst output's rel L2;
//! 3. pin layers to FP32 greedily, largest own error first, rebuilding and measuring after
//!    each, until the engine is within budget (with every layer in FP32 it is the FP32
//!    engine, so this ends).
//!
//! Pins go through [`BuilderConfig::layer_precision`], so the tuner still decides per layer
//! among what stays allowed. Every rebuild also pins to FP32 the INT8-capable layers the
//! unconstrained build kept in float: a pin elsewhere changes a layer's neighbours and so
//! its reformat costs, and the tuner could otherwise move a layer into INT8 whose error was
//! never measured (the final engine must hold only measured INT8 layers). Builds share a timing cache (a temporary file when the
//! configuration has none), so rebuilds time nothing new.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_core::{KilnError, Precision, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::builder::Builder;
use crate::config::BuilderConfig;
use crate::engine::Engine;
use crate::tuner::{LayerTimer, TacticLister};

/// One INT8 layer's own error (only it in INT8).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerError {
    /// Layer (node) name.
    pub layer: String,
    /// Worst output rel L2 with only this layer in INT8.
    pub rel_l2: f64,
}

/// What `--accuracy-budget` measured and decided (stored in the plan's optimiser report).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BudgetReport {
    /// The budget: largest rel L2 allowed per output.
    pub budget: f64,
    /// Batches measured on.
    pub batches: usize,
    /// INT8 layers of the unconstrained build.
    pub int8_layers: Vec<String>,
    /// Worst output rel L2 of the unconstrained build.
    pub initial_rel_l2: f64,
    /// Per-layer errors, largest first (empty when the first build was within budget).
    pub layer_errors: Vec<LayerError>,
    /// Layers pinned to FP32, in the order they fell back.
    pub fallback: Vec<String>,
    /// Worst output rel L2 of the final engine.
    pub final_rel_l2: f64,
    /// Builds made (reference and unconstrained included).
    pub builds: usize,
}

/// The INT8 layers of an engine (lowered Conv/MatMul/Gemm), by node name.
pub fn int8_layers(engine: &Engine) -> Vec<String> {
    engine
        .graph()
        .nodes
        .iter()
        .filter(|n| matches!(n.desc.op_type.as_str(), "Int8Conv" | "Int8MatMul"))
        .map(|n| n.name.clone())
        .collect()
}

/// Every output of `engine` on every batch.
pub fn run_all(engine: &Engine, batches: &[Vec<(String, Tensor)>]) -> Result<Vec<Vec<Tensor>>> {
    let mut ctx = engine.create_context();
    batches
        .iter()
        .map(|b| {
            let args: Vec<(&str, Tensor)> =
                b.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            ctx.execute_tensors(&args)?
                .into_iter()
                .map(|t| t.cast(kiln_core::DType::F32))
                .collect()
        })
        .collect()
}

/// The worst (largest) per-output rel L2 of `got` against `want` over all batches.
pub fn worst_rel_l2(want: &[Vec<Tensor>], got: &[Vec<Tensor>]) -> Result<f64> {
    let outputs = want.first().map_or(0, |b| b.len());
    let mut worst = 0.0f64;
    for o in 0..outputs {
        let (mut err, mut norm) = (0.0f64, 0.0f64);
        for (wb, gb) in want.iter().zip(got) {
            let (w, g) = (wb[o].as_slice::<f32>()?, gb[o].as_slice::<f32>()?);
            if w.len() != g.len() {
                return Err(KilnError::Other(format!(
                    "output {o}: {} values vs {}",
                    w.len(),
                    g.len()
                )));
            }
            for (&a, &b) in w.iter().zip(g) {
                err += (a as f64 - b as f64).powi(2);
                norm += (a as f64).powi(2);
            }
        }
        let r = if norm > 0.0 {
            (err / norm).sqrt()
        } else if err > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        worst = worst.max(r);
    }
    Ok(worst)
}

/// Builds `path` with `config` (which must allow INT8) and falls layers back to FP32 until
/// every output is within `budget` rel L2 of the FP32 engine on `batches` (module docs).
pub fn build_within_budget(
    path: &Path,
    config: &BuilderConfig,
    budget: f64,
    batches: &[Vec<(String, Tensor)>],
    tactics: &TacticLister<'_>,
    timer: &mut dyn LayerTimer,
) -> Result<Engine> {
    if !(budget >= 0.0 && budget.is_finite()) {
        return Err(KilnError::Other(format!(
            "--accuracy-budget {budget}: expected a finite rel L2 ≥ 0 (e.g. 0.02)"
        )));
    }
    if !config.int8 {
        return Err(KilnError::Other(
            "--accuracy-budget needs --int8 (and --calib-cache): it chooses which INT8 layers fall back to FP32".into(),
        ));
    }
    if batches.is_empty() {
        return Err(KilnError::Other(
            "--accuracy-budget needs data to measure on (--calib-data DIR); none given".into(),
        ));
    }
    let tmp_cache = std::env::temp_dir().join(format!(
        "kiln-budget-{}-{:?}.timing",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut base = config.clone();
    // The budget chooses INT8 layers by accuracy from the tuner's choice; the whole-engine
    // check (which may replace that choice by the float engine) would make each build's
    // layers depend on a race, so it is off here.
    base.engine_check = false;
    if base.timing_cache.is_none() {
        base.timing_cache = Some(tmp_cache.clone());
    }
    let result = (|| {
        let builder = Builder::new();
        let mut builds = 0;
        let mut build =
            |pins: &BTreeMap<String, Precision>, int8: bool, timer: &mut dyn LayerTimer| {
                let mut c = base.clone();
                c.int8 = int8;
                c.layer_precision
                    .extend(pins.iter().map(|(k, v)| (k.clone(), *v)));
                builds += 1;
                builder.build_onnx_file_with(path, &c, tactics, timer)
            };
        let fp32 = build(&BTreeMap::new(), false, timer)?;
        let want = run_all(&fp32, batches)?;
        let first = build(&BTreeMap::new(), true, timer)?;
        let layers = int8_layers(&first);
        let initial = worst_rel_l2(&want, &run_all(&first, batches)?)?;
        let mut report = BudgetReport {
            budget,
            batches: batches.len(),
            int8_layers: layers.clone(),
            initial_rel_l2: initial,
            final_rel_l2: initial,
            ..Default::default()
        };
        tracing::info!(
            layers = layers.len(),
            rel_l2 = initial,
            budget,
            "accuracy budget: all-INT8 build measured"
        );
        if initial <= budget || layers.is_empty() {
            report.builds = builds;
            return Ok(first.with_int8_fallback(report));
        }
        // Layers that could have run in INT8 but did not stay in float in every rebuild.
        let int8 = Precision::Int8.name();
        let stay_float: BTreeMap<String, Precision> = first
            .tuning_report()
            .map(|t| {
                t.layers
                    .iter()
                    .filter(|l| !l.format.starts_with(int8))
                    .filter(|l| l.candidates.iter().any(|c| c.format.starts_with(int8)))
                    .map(|l| (l.layer.clone(), Precision::Fp32))
                    .collect()
            })
            .unwrap_or_default();
        // 2. Each layer alone in INT8.
        let mut all_fp32 = stay_float.clone();
        all_fp32.extend(layers.iter().map(|l| (l.clone(), Precision::Fp32)));
        let mut errors = Vec::new();
        for l in &layers {
            let mut pins = all_fp32.clone();
            pins.insert(l.clone(), Precision::Int8);
            let e = build(&pins, true, timer)?;
            let r = worst_rel_l2(&want, &run_all(&e, batches)?)?;
            tracing::info!(layer = %l, rel_l2 = r, "accuracy budget: layer alone in INT8");
            errors.push(LayerError {
                layer: l.clone(),
                rel_l2: r,
            });
        }
        errors.sort_by(|a, b| b.rel_l2.total_cmp(&a.rel_l2).then(a.layer.cmp(&b.layer)));
        report.layer_errors = errors.clone();
        // 3. Greedy fallback, largest own error first.
        let mut pins = stay_float;
        let mut engine = first;
        for le in &errors {
            pins.insert(le.layer.clone(), Precision::Fp32);
            report.fallback.push(le.layer.clone());
            engine = build(&pins, true, timer)?;
            let r = worst_rel_l2(&want, &run_all(&engine, batches)?)?;
            report.final_rel_l2 = r;
            tracing::info!(layer = %le.layer, rel_l2 = r, "accuracy budget: fell back to FP32");
            if r <= budget {
                break;
            }
        }
        report.builds = builds;
        Ok(engine.with_int8_fallback(report))
    })();
    if config.timing_cache.is_none() {
        let _ = std::fs::remove_file(&tmp_cache);
    }
    result
}
