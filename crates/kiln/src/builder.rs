//! The builder: ONNX model in, optimised engine out (TensorRT's `IBuilder`).

use std::path::Path;

use kiln_core::{Dim, Fact, KilnError, Result};

use crate::config::{BuilderConfig, DeviceKind};
use crate::engine::{registry, Engine};
use crate::fingerprint::Fingerprint;
use crate::memory::plan_for_inputs;
use crate::optimize::optimize;
use crate::profile::{OptimizationProfile, ProfileBound};

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
        let fingerprint = self.resolve_device(config)?;
        let model = kiln_onnx::load_model(path, registry())?;
        let source = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.build_model(model, fingerprint, config, source)
    }

    fn resolve_device(&self, config: &BuilderConfig) -> Result<Fingerprint> {
        match config.device {
            DeviceKind::Cpu | DeviceKind::Auto => Ok(Fingerprint::cpu()),
            DeviceKind::Cuda => Err(KilnError::Other(
                "--device cuda: this kiln build has no CUDA backend yet (see README: CUDA is not implemented); use --device cpu or auto".into(),
            )),
        }
    }

    fn build_model(
        &self,
        model: kiln_onnx::Model,
        fingerprint: Fingerprint,
        config: &BuilderConfig,
        source: String,
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
        let report = if config.optimize {
            let r = optimize(&mut graph, registry())?;
            graph.infer_facts_with(true)?;
            r
        } else {
            Default::default()
        };
        tracing::info!(
            before = report.nodes_before,
            after = report.nodes_after,
            bn = report.batchnorms_folded,
            act = report.activations_fused,
            "optimised graph"
        );
        let profiles = if config.profiles.is_empty() && !config.shapes.is_empty() {
            vec![OptimizationProfile::fixed(&config.shapes)]
        } else {
            config.profiles.clone()
        };
        let engine = Engine::from_parts(
            graph,
            fingerprint,
            config.shapes.clone(),
            profiles,
            report,
            model.opsets,
            source,
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
        Ok(engine)
    }
}
