//! Engines (immutable, shared by all threads) and the runtime that loads plan files.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use kiln_core::{Graph, KilnError, OpRegistry, Result, Tensor, Value};
use serde::Serialize;

use crate::context::{ExecutionContext, IoInfo};
use crate::fingerprint::Fingerprint;
use crate::memory::{plan_for_inputs, InputSignature, ShapePlan};
use crate::optimize::OptimizeReport;
use crate::plan;
use crate::profile::{OptimizationProfile, ProfileBound};
use crate::tuner::TuneReport;

/// The registry of every op kiln's CPU backend implements (built once).
pub fn registry() -> &'static OpRegistry {
    static REG: OnceLock<OpRegistry> = OnceLock::new();
    REG.get_or_init(kiln_cpu::registry)
}

/// The plan computed at build time for an engine whose input shapes are all known.
pub(crate) type StaticPlan = (InputSignature, Arc<ShapePlan>);

pub(crate) struct EngineInner {
    pub graph: Graph,
    pub fingerprint: Fingerprint,
    pub build_shapes: BTreeMap<String, Vec<usize>>,
    pub profiles: Vec<OptimizationProfile>,
    pub report: OptimizeReport,
    pub opsets: BTreeMap<String, i64>,
    pub source: String,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub static_plan: Option<StaticPlan>,
    /// The tuner's report (engines built in this process only; not stored in plans).
    pub tuning: Option<TuneReport>,
    pub gpu: Option<Arc<kiln_cuda::GpuEngine>>,
}

/// How an engine's GPU side is made.
pub(crate) enum GpuSetup {
    /// A CPU engine.
    None,
    /// Build now (lower, compile with NVRTC, upload weights).
    Build(kiln_cuda::GpuOptions),
    /// From a plan: lower again, load the stored CUBIN modules, upload weights.
    Load(plan::GpuPlanRec),
}

/// A built engine: the optimised graph, its weights and its plan. Immutable, `Send + Sync`,
/// cheap to clone (shared). Run it through an [`ExecutionContext`] per thread.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

/// One layer of an engine, for `kiln inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// Layer (node) name.
    pub name: String,
    /// Op type, with `kiln.` in front for fused layers.
    pub op: String,
    /// Source nodes fused into this layer.
    pub fused_from: Vec<String>,
    /// Precision it runs in.
    pub precision: String,
    /// Kernel (tactic) that runs it: the tuned tactic id, or `cpu.<op>` for the op's own
    /// heuristic.
    pub tactic: String,
    /// Where it runs: `cpu`, `gpu`, or `cpu` as a fallback inside a GPU engine.
    pub device: String,
    /// The tuned tactic's median time on the build device (ms), when it was tuned.
    pub tactic_time_ms: Option<f64>,
    /// True for a reformat layer the tuner inserted between layers of different formats.
    pub reformat: bool,
    /// Inputs: name and `dtype[shape]`.
    pub inputs: Vec<(String, String)>,
    /// Outputs: name and `dtype[shape]`.
    pub outputs: Vec<(String, String)>,
}

/// Memory facts of an engine at given shapes.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Arena size in bytes.
    pub arena_bytes: usize,
    /// Largest total of activations alive at one time (no plan can use less).
    pub liveness_lower_bound_bytes: usize,
    /// Activations placed in the arena.
    pub arena_tensors: usize,
    /// Activations allocated at run time (dynamic shapes, sequences, outputs).
    pub dynamic_tensors: usize,
    /// Bytes of weights (constants).
    pub weight_bytes: usize,
}

impl Engine {
    #[allow(clippy::too_many_arguments)] // one argument per part of an engine
    pub(crate) fn from_parts(
        graph: Graph,
        fingerprint: Fingerprint,
        build_shapes: BTreeMap<String, Vec<usize>>,
        profiles: Vec<OptimizationProfile>,
        report: OptimizeReport,
        opsets: BTreeMap<String, i64>,
        source: String,
        gpu: GpuSetup,
    ) -> Result<Engine> {
        let io = |ids: &[usize]| -> Vec<IoInfo> {
            ids.iter()
                .map(|&id| {
                    let v = &graph.values[id];
                    IoInfo {
                        name: v.name.clone(),
                        kind: v.fact.kind,
                        dtype: v.fact.dtype,
                        shape: v.fact.shape.clone(),
                    }
                })
                .collect()
        };
        let inputs = io(&graph.inputs);
        let outputs = io(&graph.outputs);
        // When every input is fully known, plan memory now (and report it in inspect).
        let static_key: Option<InputSignature> = inputs
            .iter()
            .map(|i| {
                let shape: Option<Vec<usize>> =
                    i.shape.as_ref()?.iter().map(|d| d.known()).collect();
                Some(Some((i.dtype?, shape?)))
            })
            .collect();
        let static_plan = match static_key {
            Some(key)
                if inputs
                    .iter()
                    .all(|i| i.kind == kiln_core::ValueKind::Tensor) =>
            {
                let plan = plan_for_inputs(&graph, &key)?;
                Some((key, Arc::new(plan)))
            }
            _ => None,
        };
        let gpu_opts = match &gpu {
            GpuSetup::None => None,
            GpuSetup::Build(o) => Some((*o, None)),
            GpuSetup::Load(rec) => Some((rec.options, Some(&rec.modules))),
        };
        let gpu = match gpu_opts {
            None => None,
            Some((opts, images)) => {
                let Some((_, plan)) = &static_plan else {
                    // Like TensorRT, GPU engines bind tensors only: a sequence, map or
                    // optional graph input has no device buffer to plan.
                    let non_tensor: Vec<String> = inputs
                        .iter()
                        .filter(|i| i.kind != kiln_core::ValueKind::Tensor)
                        .map(|i| format!("{} ({})", i.name, i.describe()))
                        .collect();
                    if !non_tensor.is_empty() {
                        return Err(KilnError::Other(format!(
                            "GPU engines take tensor inputs only; {} {} not a tensor: build \
                             this model for the CPU (--device cpu)",
                            non_tensor.join(", "),
                            if non_tensor.len() == 1 { "is" } else { "are" }
                        )));
                    }
                    let missing: Vec<String> = inputs
                        .iter()
                        .filter(|i| {
                            !i.shape
                                .as_ref()
                                .is_some_and(|s| s.iter().all(|d| d.known().is_some()))
                        })
                        .map(|i| format!("{} ({})", i.name, i.describe()))
                        .collect();
                    return Err(KilnError::Other(format!(
                        "GPU engines need a concrete shape for every input: pass --shapes for {}",
                        missing.join(", ")
                    )));
                };
                Some(Arc::new(kiln_cuda::GpuEngine::build(
                    &graph,
                    &plan.facts,
                    opts,
                    images,
                )?))
            }
        };
        Ok(Engine {
            inner: Arc::new(EngineInner {
                graph,
                fingerprint,
                build_shapes,
                profiles,
                report,
                opsets,
                source,
                inputs,
                outputs,
                static_plan,
                gpu,
                tuning: None,
            }),
        })
    }

    /// Every tensor value the engine computes (not the inputs or constants), by name, in the
    /// order the layers produce them. For debugging (`kiln compare --per-layer`): slower
    /// than an [`ExecutionContext`](crate::ExecutionContext) and it keeps every tensor. A
    /// CPU engine runs its graph op by op on the CPU ([`Self::cpu_values`]); a GPU engine
    /// runs on the GPU a copy of itself in which every produced device value is an output
    /// (the same layers and kernels; only the memory plan differs, since every tensor
    /// stays live).
    pub fn all_values(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        let Some(gpu) = &self.inner.gpu else {
            return self.cpu_values(inputs);
        };
        let (mut g, args) = self.values_graph(inputs)?;
        let facts = self
            .planned_facts()
            .ok_or_else(|| KilnError::Other("a GPU engine without a static plan".into()))?;
        // Only values with a device buffer can be outputs of a GPU engine.
        g.outputs.retain(|&v| {
            let f = &facts[v];
            f.kind == kiln_core::ValueKind::Tensor
                && f.concrete_shape().is_some()
                && f.dtype
                    .is_some_and(|d| kiln_cuda::kernels::common::ctype(d).is_some())
        });
        let engine = kiln_cuda::GpuEngine::build(&g, facts, gpu.options(), Some(gpu.images()))?;
        let mut ctx = kiln_cuda::GpuContext::new(Arc::new(engine))?;
        let refs: Vec<&Value> = args.iter().collect();
        let values = ctx.run(&g, &refs)?;
        Ok(named(&g, values))
    }

    /// Runs the engine's graph on the CPU op by op, whatever device the engine was built
    /// for (a GPU engine's layers through their CPU ops: the reference its kernels must
    /// match), and returns every tensor value it computes (not the inputs or constants), by
    /// name, in the order the layers produce them. For debugging; keeps every tensor.
    pub fn cpu_values(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        let (g, args) = self.values_graph(inputs)?;
        let values = kiln_core::exec::run_graph(&g, &args, &[])?;
        Ok(named(&g, values))
    }

    /// The engine's graph with every produced (non-constant) value as an output, in the
    /// order the layers produce them, and `inputs` in the graph's input order.
    fn values_graph(&self, inputs: &[(&str, Tensor)]) -> Result<(Graph, Vec<Value>)> {
        let mut g = self.inner.graph.clone();
        let mut args = Vec::with_capacity(g.inputs.len());
        for &id in &g.inputs {
            let name = &g.values[id].name;
            let t = inputs
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| KilnError::BadInput {
                    name: name.clone(),
                    msg: "no value given for this engine input".into(),
                })?;
            args.push(Value::Tensor(t.1.clone()));
        }
        let mut produced = Vec::new();
        for n in &g.nodes {
            for &o in n.outputs.iter().flatten() {
                if !g.constants.contains_key(&o) && !produced.contains(&o) {
                    produced.push(o);
                }
            }
        }
        g.outputs = produced;
        Ok((g, args))
    }

    /// Records what `--accuracy-budget` did (kept in the plan's optimiser report).
    pub(crate) fn with_int8_fallback(mut self, r: crate::int8::budget::BudgetReport) -> Engine {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.report.int8_fallback = Some(r);
        }
        self
    }

    /// Attaches the tuning report of the build that made this engine.
    pub(crate) fn with_tuning(mut self, tuning: TuneReport) -> Engine {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.tuning = Some(tuning);
        }
        self
    }

    /// What the tuner measured and chose, for an engine built in this process (plans keep
    /// only the choices: see [`LayerInfo::tactic`]).
    pub fn tuning_report(&self) -> Option<&TuneReport> {
        self.inner.tuning.as_ref()
    }

    /// A new execution context (own arena) for this engine.
    pub fn create_context(&self) -> ExecutionContext {
        ExecutionContext::new(self.clone())
    }

    /// The optimised graph.
    pub fn graph(&self) -> &Graph {
        &self.inner.graph
    }

    /// Engine inputs.
    pub fn inputs(&self) -> &[IoInfo] {
        &self.inner.inputs
    }

    /// Engine outputs.
    pub fn outputs(&self) -> &[IoInfo] {
        &self.inner.outputs
    }

    /// What the engine was built for.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.inner.fingerprint
    }

    /// Input shapes the engine was specialised to at build time.
    pub fn build_shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.inner.build_shapes
    }

    /// The optimization profiles: shape ranges the engine accepts for its dynamic inputs
    /// (one fixed profile for an engine built with `--shapes`; none for an engine that
    /// accepts any shape the model allows).
    pub fn profiles(&self) -> &[OptimizationProfile] {
        &self.inner.profiles
    }

    /// The input signature (dtype and shape of every input, in order) at one of a
    /// profile's three shapes; inputs the profile does not cover take their fixed shape.
    pub fn profile_signature(&self, profile: usize, bound: ProfileBound) -> Result<InputSignature> {
        let p = self.inner.profiles.get(profile).ok_or_else(|| {
            KilnError::Other(format!(
                "optimization profile {profile} does not exist (the engine has {})",
                self.inner.profiles.len()
            ))
        })?;
        self.inputs()
            .iter()
            .map(|info| {
                if info.kind != kiln_core::ValueKind::Tensor {
                    return Ok(None);
                }
                let dtype = info.dtype.ok_or_else(|| KilnError::BadInput {
                    name: info.name.clone(),
                    msg: "the model does not declare this input's dtype".into(),
                })?;
                let shape = match p.shape(&info.name, bound) {
                    Some(s) => s.to_vec(),
                    None => info
                        .shape
                        .as_ref()
                        .and_then(|d| d.iter().map(|d| d.known()).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| KilnError::BadInput {
                            name: info.name.clone(),
                            msg: format!(
                                "optimization profile {profile} gives no shape for this input ({})",
                                info.describe()
                            ),
                        })?,
                };
                Ok(Some((dtype, shape)))
            })
            .collect()
    }

    /// What the optimiser did.
    pub fn optimize_report(&self) -> &OptimizeReport {
        &self.inner.report
    }

    /// Name of the source model.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Device name for reports: the backend (`cpu` or `cuda`).
    pub fn device(&self) -> &str {
        let fingerprint = &self.inner.fingerprint;
        &fingerprint.backend
    }

    /// Facts of every value at the build shapes (engines built with concrete shapes only).
    pub fn planned_facts(&self) -> Option<&[kiln_core::Fact]> {
        self.static_plan().map(|(_, p)| p.facts.as_slice())
    }

    /// The GPU side of a CUDA engine.
    pub fn gpu(&self) -> Option<&Arc<kiln_cuda::GpuEngine>> {
        self.inner.gpu.as_ref()
    }

    pub(crate) fn static_plan(&self) -> Option<&StaticPlan> {
        self.inner.static_plan.as_ref()
    }

    /// Memory report at the build shapes, or at `shapes` (one per input, in order).
    pub fn memory_report(&self, shapes: Option<&InputSignature>) -> Result<Option<MemoryReport>> {
        let plan = match (shapes, self.static_plan()) {
            (Some(s), _) => Arc::new(plan_for_inputs(self.graph(), s)?),
            (None, Some((_, p))) => p.clone(),
            (None, None) => return Ok(None),
        };
        let produced: usize = self
            .graph()
            .nodes
            .iter()
            .map(|n| n.outputs.iter().flatten().count())
            .sum();
        Ok(Some(MemoryReport {
            arena_bytes: plan.arena_size,
            liveness_lower_bound_bytes: plan.lower_bound,
            arena_tensors: plan.arena_values(),
            dynamic_tensors: produced - plan.arena_values(),
            weight_bytes: self
                .graph()
                .constants
                .values()
                .map(|t| t.bytes().len())
                .sum(),
        }))
    }

    /// The layers after optimisation.
    pub fn layers(&self) -> Vec<LayerInfo> {
        let g = self.graph();
        let facts = self.static_plan().map(|(_, p)| &p.facts);
        let placements = self.gpu().map(|g| g.placements());
        let describe = |id: usize| {
            let f = facts.map(|f| &f[id]).unwrap_or(&g.values[id].fact);
            (g.values[id].name.clone(), f.describe())
        };
        g.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let fused = n.desc.domain == kiln_cpu::fused::KILN_DOMAIN;
                let activation =
                    n.desc
                        .attrs
                        .get(kiln_cpu::fused::ACTIVATION_ATTR)
                        .map(|a| match a {
                            kiln_core::Attr::String(s) => s.clone(),
                            _ => String::new(),
                        });
                // A fused residual shows as `+Add` (`kiln.Conv+Add+Relu`).
                let op_type = if kiln_cpu::ops::conv::has_residual(n) {
                    format!("{}+Add", n.desc.op_type)
                } else {
                    n.desc.op_type.clone()
                };
                let op = match &activation {
                    Some(a) => format!("kiln.{op_type}+{a}"),
                    None if fused => format!("kiln.{op_type}"),
                    None => op_type,
                };
                let (device, tactic, precision) =
                    match placements.as_ref().and_then(|p| p.get(i)) {
                        Some(p) => (p.device.to_string(), p.tactic.clone(), p.precision.clone()),
                        None => {
                            (
                                "cpu".to_string(),
                                match n.desc.attrs.get(kiln_core::tactic::TACTIC_ATTR) {
                                    Some(kiln_core::Attr::String(t)) => t.clone(),
                                    _ => format!("cpu.{}", n.desc.op_type.to_ascii_lowercase()),
                                },
                                match n.outputs.iter().flatten().next().map(|&o| {
                                    facts.map(|f| &f[o]).unwrap_or(&g.values[o].fact).dtype
                                }) {
                                    // Explicit-quantization layers may write u8 or f32.
                                    _ if matches!(
                                        n.desc.op_type.as_str(),
                                        "Int8Conv" | "Int8MatMul"
                                    ) =>
                                    {
                                        "int8".to_string()
                                    }
                                    Some(Some(kiln_core::DType::F16)) => "fp16".to_string(),
                                    Some(Some(kiln_core::DType::I8)) => "int8".to_string(),
                                    _ => "fp32".to_string(),
                                },
                            )
                        }
                    };
                LayerInfo {
                    name: n.name.clone(),
                    op,
                    fused_from: n.fused_from.clone(),
                    precision,
                    tactic,
                    device,
                    tactic_time_ms: match n.desc.attrs.get(kiln_core::tactic::TACTIC_TIME_ATTR) {
                        Some(kiln_core::Attr::Float(ms)) => Some(*ms as f64),
                        _ => None,
                    },
                    reformat: n.name.starts_with("reformat:"),
                    inputs: n.inputs.iter().flatten().map(|&i| describe(i)).collect(),
                    outputs: n.outputs.iter().flatten().map(|&i| describe(i)).collect(),
                }
            })
            .collect()
    }

    /// Serialises the engine as a plan file's bytes.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let i = &self.inner;
        plan::write_plan(
            &i.graph,
            &i.fingerprint,
            &i.build_shapes,
            &i.profiles,
            &i.report,
            &i.opsets,
            &i.source,
            i.gpu.as_ref().map(|g| plan::GpuPlanRec {
                options: g.options(),
                modules: g.images().clone(),
            }),
        )
    }

    /// Writes the plan file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.serialize()?;
        // Write to a temporary file first so a failed write never leaves a half plan.
        let tmp = path.with_extension("plan.partial");
        std::fs::write(&tmp, &bytes).map_err(|e| KilnError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| KilnError::io(path, e))
    }
}

/// Loads plan files (TensorRT's `IRuntime`).
pub struct Runtime;

impl Runtime {
    /// Loads a plan, refusing one from another format version or device, or a damaged one.
    pub fn load(path: &Path) -> Result<Engine> {
        let here = match plan::peek_backend(path)?.as_str() {
            "cuda" => {
                let ctx = kiln_cuda::device::context().map_err(|e| {
                    KilnError::InvalidPlan(format!("plan is for the cuda backend, but {e}"))
                })?;
                Fingerprint::cuda(kiln_cuda::device::info(&ctx)?)
            }
            _ => Fingerprint::cpu(),
        };
        let loaded = plan::load_plan(path, registry(), &here)?;
        let gpu = match loaded.gpu {
            Some(rec) => GpuSetup::Load(rec),
            None if loaded.header.fingerprint.backend == "cuda" => {
                return Err(KilnError::InvalidPlan(
                    "plan is for the cuda backend but has no GPU section".into(),
                ))
            }
            None => GpuSetup::None,
        };
        Engine::from_parts(
            loaded.graph,
            loaded.header.fingerprint,
            loaded.build_shapes,
            loaded.profiles,
            loaded.optimize_report,
            loaded.opsets,
            loaded.source,
            gpu,
        )
    }
}

/// `values` (one per output of `g`) by the outputs' names, tensors only.
fn named(g: &Graph, values: Vec<Value>) -> Vec<(String, Tensor)> {
    g.outputs
        .iter()
        .zip(values)
        .filter_map(|(&id, v)| match v {
            Value::Tensor(t) => Some((g.values[id].name.clone(), t)),
            _ => None,
        })
        .collect()
}
