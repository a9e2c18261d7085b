//! Engines (immutable, shared by all threads) and the runtime that loads plan files.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use kiln_core::{Graph, KilnError, OpRegistry, Result};
use serde::Serialize;

use crate::context::{ExecutionContext, IoInfo};
use crate::fingerprint::Fingerprint;
use crate::memory::{plan_for_inputs, InputSignature, ShapePlan};
use crate::optimize::OptimizeReport;
use crate::plan;
use crate::profile::{OptimizationProfile, ProfileBound};

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
    /// Kernel (tactic) that runs it.
    pub tactic: String,
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
    pub(crate) fn from_parts(
        graph: Graph,
        fingerprint: Fingerprint,
        build_shapes: BTreeMap<String, Vec<usize>>,
        profiles: Vec<OptimizationProfile>,
        report: OptimizeReport,
        opsets: BTreeMap<String, i64>,
        source: String,
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
            }),
        })
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

    /// Device name for reports: the backend (`cpu`).
    pub fn device(&self) -> &str {
        let fingerprint = &self.inner.fingerprint;
        &fingerprint.backend
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
        let describe = |id: usize| {
            let f = facts.map(|f| &f[id]).unwrap_or(&g.values[id].fact);
            (g.values[id].name.clone(), f.describe())
        };
        g.nodes
            .iter()
            .map(|n| {
                let fused = n.desc.domain == kiln_cpu::fused::KILN_DOMAIN;
                let activation =
                    n.desc
                        .attrs
                        .get(kiln_cpu::fused::ACTIVATION_ATTR)
                        .map(|a| match a {
                            kiln_core::Attr::String(s) => s.clone(),
                            _ => String::new(),
                        });
                let op = match &activation {
                    Some(a) => format!("kiln.{}+{}", n.desc.op_type, a),
                    None if fused => format!("kiln.{}", n.desc.op_type),
                    None => n.desc.op_type.clone(),
                };
                LayerInfo {
                    name: n.name.clone(),
                    op,
                    fused_from: n.fused_from.clone(),
                    precision: "fp32".into(),
                    tactic: format!("cpu.{}", n.desc.op_type.to_ascii_lowercase()),
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
        let here = Fingerprint::cpu();
        let loaded = plan::load_plan(path, registry(), &here)?;
        Engine::from_parts(
            loaded.graph,
            loaded.header.fingerprint,
            loaded.build_shapes,
            loaded.profiles,
            loaded.optimize_report,
            loaded.opsets,
            loaded.source,
        )
    }
}
