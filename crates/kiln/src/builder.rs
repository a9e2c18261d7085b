//! The builder: ONNX model in, optimised engine out (TensorRT's `IBuilder`).

use std::path::Path;

use kiln_core::{Dim, Fact, KilnError, Result};

use crate::config::{BuilderConfig, DeviceKind};
use crate::engine::{registry, Engine, GpuSetup};
use crate::fingerprint::Fingerprint;
use crate::memory::plan_for_inputs;
use crate::optimize::optimize;
use crate::profile::{OptimizationProfile, ProfileBound};
use crate::tuner::{
    self, whole_engine, CpuTimer, LayerTimer, TacticLister, TimingCache, TuneReport, TuneSettings,
};

/// Builds engines from ONNX models.
#[derive(Debug, Default, Clone)]
pub struct Builder;

impl Builder {
    /// A builder for this machine.
    pub fn new() -> Builder {
        Builder
    }

    /// Parses, optimises and plans an ONNX model file.
    pub fn build_onnx_file(&self, path: &Path, config: &BuilderConfig) -> Result<Engine> {
        let mut timer = CpuTimer::for_config(config)?;
        self.build_onnx_file_with(path, config, &tuner::cpu_tactics, &mut timer)
    }

    /// [`Builder::build_onnx_file`] with the tactic offer and the timer given: tests inject
    /// deterministic ones so they know which choice is right.
    pub fn build_onnx_file_with(
        &self,
        path: &Path,
        config: &BuilderConfig,
        tactics: &TacticLister<'_>,
        timer: &mut dyn LayerTimer,
    ) -> Result<Engine> {
        let fingerprint = self.resolve_device(config)?;
        if config.int8 {
            let Some(cache) = &config.calibration else {
                return Err(KilnError::Other(
                    "--int8 needs per-tensor scales: pass --calib-cache MODEL.calib (make one with `kiln calibrate MODEL.onnx --data DIR --cache MODEL.calib`)".into(),
                ));
            };
            cache.check_model(&crate::int8::cache::file_sha256(path)?)?;
        }
        let model = kiln_onnx::load_model(path, registry())?;
        let source = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.build_model(model, fingerprint, config, source, tactics, timer)
    }

    fn resolve_device(&self, config: &BuilderConfig) -> Result<Fingerprint> {
        let cuda = || -> Result<Fingerprint> {
            let ctx = kiln_cuda::device::context()?;
            Ok(Fingerprint::cuda(kiln_cuda::device::info(&ctx)?))
        };
        match config.device {
            DeviceKind::Cpu => Ok(Fingerprint::cpu()),
            DeviceKind::Cuda => cuda(),
            DeviceKind::Auto => {
                if kiln_cuda::device::gpu_usable() {
                    cuda()
                } else {
                    tracing::info!("--device auto: no usable CUDA GPU, building for the CPU");
                    Ok(Fingerprint::cpu())
                }
            }
        }
    }

    fn build_model(
        &self,
        model: kiln_onnx::Model,
        fingerprint: Fingerprint,
        config: &BuilderConfig,
        source: String,
        tactics: &TacticLister<'_>,
        timer: &mut dyn LayerTimer,
    ) -> Result<Engine> {
        if !config.profiles.is_empty() && !config.shapes.is_empty() {
            return Err(KilnError::Other(
                "--shapes and optimization profiles (--min-shapes/--opt-shapes/--max-shapes) cannot be combined: --shapes is itself one profile with min = opt = max; give that input the same shape in all three instead".into(),
            ));
        }
        let mut graph = model.graph;
        // Apply user shapes to inputs.
        for (name, shape) in &config.shapes {
            let Some(&id) = graph
                .inputs
                .iter()
                .find(|&&i| graph.values[i].name == *name)
            else {
                let names: Vec<&str> = graph
                    .inputs
                    .iter()
                    .map(|&i| graph.values[i].name.as_str())
                    .collect();
                return Err(KilnError::BadInput {
                    name: name.clone(),
                    msg: format!(
                        "--shapes names an input the model does not have (its inputs are: {})",
                        names.join(", ")
                    ),
                });
            };
            let fact = &graph.values[id].fact;
            if let Some(dims) = &fact.shape {
                if dims.len() != shape.len() {
                    return Err(KilnError::BadInput {
                        name: name.clone(),
                        msg: format!(
                            "--shapes gives rank {} but the model declares {}",
                            shape.len(),
                            fact.describe()
                        ),
                    });
                }
                for (axis, (d, s)) in dims.iter().zip(shape).enumerate() {
                    if let Dim::Known(k) = d {
                        if k != s {
                            return Err(KilnError::BadInput {
                                name: name.clone(),
                                msg: format!(
                                    "--shapes sets dimension {axis} to {s} but the model fixes it to {k} ({})",
                                    fact.describe()
                                ),
                            });
                        }
                    }
                }
            }
            let dtype = fact.dtype.ok_or_else(|| KilnError::BadInput {
                name: name.clone(),
                msg: "the model does not declare this input's dtype".into(),
            })?;
            graph.values[id].fact = Fact::concrete(dtype, shape);
        }
        graph.infer_facts_with(true)?;
        for n in &mut graph.nodes {
            if n.fused_from.is_empty() {
                n.fused_from.push(n.name.clone());
            }
        }
        if config.observe_activations {
            // Calibration: every float activation of the source model is an output too.
            let produced: Vec<bool> = graph.producers().iter().map(|p| p.is_some()).collect();
            let extra: Vec<usize> = (0..graph.values.len())
                .filter(|&v| {
                    produced[v]
                        && !graph.is_output(v)
                        && !graph.constants.contains_key(&v)
                        && graph.values[v].fact.kind == kiln_core::ValueKind::Tensor
                        && graph.values[v].fact.dtype == Some(kiln_core::DType::F32)
                })
                .collect();
            graph.outputs.extend(extra);
        }
        // Explicit quantization (Q/DQ models): before the optimiser, whose constant folding
        // would turn DequantizeLinear(weights) into float weights. CPU engines only (the GPU
        // backend has no INT8 kernels); not while calibrating (every tensor must stay).
        let qdq = if config.explicit_int8
            && fingerprint.backend == "cpu"
            && !config.observe_activations
        {
            let r = crate::int8::qdq::lower_qdq(&mut graph)?;
            if !r.lowered.is_empty() {
                graph.infer_facts_with(true)?;
                tracing::info!(
                    layers = r.lowered.len(),
                    qdq_nodes = r.qdq_nodes,
                    "explicit quantization: Q/DQ layers lowered to INT8"
                );
            }
            r
        } else {
            Default::default()
        };
        let mut report = if config.optimize {
            let r = optimize(&mut graph, registry())?;
            graph.infer_facts_with(true)?;
            r
        } else {
            Default::default()
        };
        if config.optimize && fingerprint.backend != "cuda" {
            // CPU engines only: the GPU executor has no layer for the fused chain.
            // Q -> DQ pairs of a Q/DQ model become FakeQuant chain steps first, so that the
            // elementwise fusion below merges them with the float ops around them (exact;
            // det QDQ 126 -> 111 ms, docs/int8.md). Not while observing activations, whose
            // names the calibration reads.
            if !config.observe_activations {
                let pairs = crate::int8::qdq_pairs::fold_qdq_pairs(&mut graph)?;
                if pairs > 0 {
                    graph.infer_facts_with(true)?;
                    report.nodes_after = graph.nodes.len();
                }
                report.qdq_pairs_folded = pairs;
                tracing::info!(pairs, "Q/DQ pairs folded into chains");
            }
            // Residual Adds into the Conv before the chains (which would take the Add).
            let residuals = crate::fuse_residual::fuse_residual_adds(&mut graph, registry())?;
            if residuals > 0 {
                graph.infer_facts_with(true)?;
                report.nodes_after = graph.nodes.len();
            }
            report.residuals_fused = residuals;
            tracing::info!(residuals, "residual adds fused into Conv");
            let chains = crate::fuse_elementwise::fuse_elementwise(&mut graph, registry())?;
            if chains > 0 {
                graph.infer_facts_with(true)?;
                report.nodes_after = graph.nodes.len();
            }
            tracing::info!(chains, "fused elementwise chains");
        }
        report.qdq = qdq;
        tracing::info!(
            before = report.nodes_before,
            after = report.nodes_after,
            bn = report.batchnorms_folded,
            act = report.activations_fused,
            "optimised graph"
        );
        let mut fingerprint = fingerprint;
        let gpu = if fingerprint.backend == "cuda" {
            let all_static = graph.inputs.iter().all(|&i| {
                let f = &graph.values[i].fact;
                f.kind == kiln_core::ValueKind::Tensor && f.concrete_shape().is_some()
            });
            if !all_static && config.device == DeviceKind::Auto {
                tracing::warn!(
                    "--device auto: the GPU needs --shapes for every input; building for the CPU"
                );
                fingerprint = Fingerprint::cpu();
                GpuSetup::None
            } else {
                GpuSetup::Build(kiln_cuda::GpuOptions {
                    fp16: config.fp16,
                    tf32: config.tf32,
                })
            }
        } else {
            GpuSetup::None
        };
        // Tactics are timed on the device the engine is for.
        let int8_layers = match (&config.calibration, config.int8) {
            (Some(cache), true) => crate::int8::lower::annotate(&mut graph, cache),
            _ => 0,
        };
        if config.int8 {
            tracing::info!(layers = int8_layers, "layers with calibrated INT8 scales");
            if fingerprint.backend != "cpu" && config.opt_level == 0 {
                // GPU engines at level 0 (nothing timed): every calibrated layer with an
                // INT8 form runs in INT8. From level 1 the GPU tuner times the INT8 pool.
                let lowered = crate::int8::gpu::lower_all(&mut graph)?;
                tracing::info!(
                    layers = lowered,
                    "layers lowered to INT8 for the GPU (untimed)"
                );
            }
        }
        // With --int8, calibrated layers also offer INT8 tactics (and ops with no tactics of
        // their own an FP32 "builtin" one to compare them with).
        let with_int8 = |node: &kiln_core::Node, facts: &[Option<&Fact>]| {
            let mut offered = tactics(node, facts);
            if config.int8 {
                let extra = crate::int8::lower::tactics(node, facts);
                if !extra.is_empty() && offered.is_empty() {
                    offered.push(kiln_core::Tactic::fp32(
                        crate::int8::lower::BUILTIN_TACTIC,
                        1,
                    ));
                }
                offered.extend(extra);
            }
            offered
        };
        let parts = EngineParts {
            fingerprint: &fingerprint,
            optimized: &report,
            opsets: &model.opsets,
            source: &source,
            gpu: match gpu {
                GpuSetup::Build(options) => Some(options),
                _ => None,
            },
        };
        let mut cache = load_timing_cache(config, &fingerprint);
        // The whole-engine check (`tuner::whole_engine`): keep a copy of the graph as it is
        // before tuning, to build the float-only engine the tuned one is raced against.
        // The same check races an engine with channels-last layers against one tuned in the
        // linear layout only.
        let before_tuning = (whole_engine::applies(config)
            || whole_engine::applies_to_layouts(config))
        .then(|| graph.clone());
        let pools = Pools {
            int8: config.int8,
            layouts: true,
        };
        let engine =
            self.tune_and_assemble(graph, config, &parts, pools, &with_int8, timer, &mut cache)?;
        let report = engine.tuning_report();
        let int8_layers = report.is_some_and(|t| t.int8_layers() > 0);
        let nhwc_layers = report.is_some_and(|t| t.channels_last_layers() > 0);
        let engine = match before_tuning {
            Some(g) if int8_layers && whole_engine::applies(config) => {
                let float = Pools {
                    int8: false,
                    ..pools
                };
                let float = self
                    .tune_and_assemble(g, config, &parts, float, &with_int8, timer, &mut cache)?;
                whole_engine::keep_faster(engine, float, timer, whole_engine::Check::Int8)?
            }
            Some(g) if nhwc_layers && !int8_layers => {
                let linear = Pools {
                    layouts: false,
                    ..pools
                };
                let linear = self
                    .tune_and_assemble(g, config, &parts, linear, &with_int8, timer, &mut cache)?;
                whole_engine::keep_faster(engine, linear, timer, whole_engine::Check::Layouts)?
            }
            _ => engine,
        };
        if let Some(path) = &config.timing_cache {
            cache.save(path)?;
        }
        Ok(engine)
    }

    /// Tunes `graph` (with or without the INT8 pool), packs weights and makes the engine.
    #[allow(clippy::too_many_arguments)]
    fn tune_and_assemble(
        &self,
        mut graph: kiln_core::Graph,
        config: &BuilderConfig,
        parts: &EngineParts<'_>,
        pools: Pools,
        tactics: &TacticLister<'_>,
        timer: &mut dyn LayerTimer,
        cache: &mut TimingCache,
    ) -> Result<Engine> {
        let fingerprint = parts.fingerprint;
        let tuning = if fingerprint.backend == "cpu" {
            let mut tuning = self.tune(&mut graph, config, pools, tactics, timer, cache)?;
            tuning.threads = config.threads;
            if config.optimize {
                // After tuning: the chosen tactics decide which weights the packed GEMM reads.
                let packed = crate::pack_weights::pack_conv_weights(&mut graph, registry())?;
                tracing::info!(packed, "conv weights packed at build time");
            }
            tuning
        } else if config.opt_level > 0 && parts.gpu.is_some() {
            // GPU tactics (cuDNN algorithms, kiln's own paths, INT8 layers with their
            // reformats) timed on this GPU.
            let g = tuner::gpu::GpuTactics::new(
                &graph,
                config.fp16,
                config.tf32,
                pools.int8,
                config.opt_level,
            )?;
            let lister = |n: &kiln_core::Node, f: &[Option<&Fact>]| g.list(n, f);
            let lister_ptr: &TacticLister<'_> = &lister;
            // The lister and the timer share the device tuner (one borrow at a time).
            let mut timer2 = tuner::gpu::GpuTactics::sharing(&g);
            self.tune(&mut graph, config, pools, lister_ptr, &mut timer2, cache)?
        } else {
            tracing::info!(
                "GPU engine: opt level 0, tactics chosen by the CUDA backend's heuristics"
            );
            TuneReport::default()
        };
        let profiles = if config.profiles.is_empty() && !config.shapes.is_empty() {
            vec![OptimizationProfile::fixed(&config.shapes)]
        } else {
            config.profiles.clone()
        };
        let engine = Engine::from_parts(
            graph,
            fingerprint.clone(),
            config.shapes.clone(),
            profiles,
            parts.optimized.clone(),
            parts.opsets.clone(),
            parts.source.to_string(),
            match parts.gpu {
                Some(options) => GpuSetup::Build(options),
                None => GpuSetup::None,
            },
        )?;
        for (index, p) in config.profiles.iter().enumerate() {
            p.validate(index, engine.inputs(), true)?;
            // The model must run at the profile's corners: infer and plan there now, so a
            // profile the model cannot take fails at build time, not at run time.
            for bound in [ProfileBound::Min, ProfileBound::Opt, ProfileBound::Max] {
                let signature = engine.profile_signature(index, bound)?;
                plan_for_inputs(engine.graph(), &signature).map_err(|e| {
                    KilnError::Other(format!(
                        "optimization profile {index}: the model cannot run at its {} shapes ({}): {e}",
                        bound.name(),
                        p.describe().join("; ")
                    ))
                })?;
            }
        }
        Ok(engine.with_tuning(tuning))
    }

    /// Chooses a tactic per layer by timing candidates on this device (the CPU here).
    fn tune(
        &self,
        graph: &mut kiln_core::Graph,
        config: &BuilderConfig,
        pools: Pools,
        tactics: &TacticLister<'_>,
        timer: &mut dyn LayerTimer,
        cache: &mut TimingCache,
    ) -> Result<TuneReport> {
        if config.opt_level > 5 {
            return Err(KilnError::Other(format!(
                "--opt-level {} is out of range (0..=5)",
                config.opt_level
            )));
        }
        let settings = TuneSettings {
            level: config.opt_level,
            pools: tuner::pools(config.fp16, pools.int8)?,
            pins: config.layer_precision.clone(),
            layouts: pools.layouts && config.profiles.is_empty(),
        };
        let report = match config.profiles.first() {
            None => tuner::tune(graph, &settings, tactics, timer, cache)?,
            Some(profile) => {
                // Engines with optimization profiles keep symbolic shapes: tune a copy whose
                // inputs take the first profile's opt shapes (shape inference only, so its
                // nodes are the same), then carry each node's choice over.
                let mut at_opt = graph.clone();
                for (name, shape) in profile.opt_shapes() {
                    if let Some(&id) = at_opt
                        .inputs
                        .iter()
                        .find(|&&i| at_opt.values[i].name == *name)
                    {
                        if let Some(dtype) = at_opt.values[id].fact.dtype {
                            at_opt.values[id].fact = Fact::concrete(dtype, shape);
                        }
                    }
                }
                at_opt.infer_facts_with(true)?;
                let report = tuner::tune(&mut at_opt, &settings, tactics, timer, cache)?;
                if at_opt.nodes.len() != graph.nodes.len() {
                    return Err(KilnError::Other(
                        "tuning at the opt shape inserted reformat layers, which engines with optimization profiles do not support yet; build with --shapes or without --fp16".into(),
                    ));
                }
                for (node, tuned) in graph.nodes.iter_mut().zip(at_opt.nodes) {
                    node.desc = tuned.desc;
                    node.op = tuned.op;
                }
                report
            }
        };
        if report.reformats > 0 {
            graph.infer_facts_with(true)?;
        }
        tracing::info!(
            level = report.level,
            layers = report.layers.len(),
            timed = report.timed,
            cache_hits = report.cache_hits,
            reformats = report.reformats,
            seconds = report.seconds,
            "tuned tactics"
        );
        Ok(report)
    }
}

/// Which tactics one tuning of a build may choose beyond FP32 (and FP16 with `--fp16`) in
/// the linear layout.
#[derive(Debug, Clone, Copy)]
struct Pools {
    /// The INT8 pool (`--int8`).
    int8: bool,
    /// Layouts other than the linear one (the CPU's channels-last tactics).
    layouts: bool,
}

/// What every engine a build makes shares, whatever its tactics.
struct EngineParts<'a> {
    fingerprint: &'a Fingerprint,
    optimized: &'a crate::optimize::OptimizeReport,
    opsets: &'a std::collections::BTreeMap<String, i64>,
    source: &'a str,
    /// GPU engines: the options to build the device side with.
    gpu: Option<kiln_cuda::GpuOptions>,
}

/// The build's timing cache: `--timing-cache`'s file (a stale or foreign one is reported
/// and replaced), or an empty one. One cache serves every tuning of the build.
fn load_timing_cache(config: &BuilderConfig, fingerprint: &Fingerprint) -> TimingCache {
    let device = match config.threads {
        // Times measured on another thread count do not transfer.
        Some(n) if fingerprint.backend == "cpu" => {
            format!("{}|threads={n}", fingerprint.device_key())
        }
        _ => fingerprint.device_key(),
    };
    match &config.timing_cache {
        Some(path) => {
            let (cache, warning) = TimingCache::load(path, &device);
            if let Some(w) = warning {
                tracing::warn!("{w}");
                eprintln!("warning: {w}");
            }
            cache
        }
        None => TimingCache::new(device),
    }
}
