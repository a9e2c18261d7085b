//! Running the FP32 model on calibration batches with every float activation observed.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_core::{DType, KilnError, Result, Tensor};

use crate::config::{BuilderConfig, DeviceKind};
use crate::int8::cache::{file_sha256, Algorithm, CalibrationCache};
use crate::int8::histogram::TensorStats;
use crate::{Builder, Engine};

/// Collects activation statistics of one model over calibration batches.
pub struct Calibrator {
    engine: Engine,
    model_sha256: String,
    model_file: String,
    /// Statistics per observed tensor (engine output order).
    stats: Vec<(String, TensorStats)>,
    batches: usize,
}

impl Calibrator {
    /// Builds the observing FP32 CPU engine for `model` at the shapes of the first batch:
    /// not optimised (so every tensor of the source model exists under its own name) and
    /// with every float activation as an extra output.
    pub fn new(model: &Path, shapes: BTreeMap<String, Vec<usize>>) -> Result<Calibrator> {
        let config = BuilderConfig {
            device: DeviceKind::Cpu,
            shapes,
            optimize: false,
            opt_level: 0,
            observe_activations: true,
            ..Default::default()
        };
        let engine = Builder::new().build_onnx_file(model, &config)?;
        let stats = engine
            .outputs()
            .iter()
            .filter(|o| o.dtype == Some(DType::F32))
            .map(|o| (o.name.clone(), TensorStats::default()))
            .collect();
        Ok(Calibrator {
            engine,
            model_sha256: file_sha256(model)?,
            model_file: model
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            stats,
            batches: 0,
        })
    }

    /// The observing engine (its inputs are the model's).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Tensors observed.
    pub fn tensors(&self) -> usize {
        self.stats.len()
    }

    /// Runs one batch and adds every float activation to its statistics.
    pub fn observe(&mut self, inputs: &[(String, Tensor)]) -> Result<()> {
        let args: Vec<(&str, Tensor)> = inputs
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        let mut ctx = self.engine.create_context();
        let outs = ctx.execute_tensors(&args)?;
        let names: Vec<&str> = self
            .engine
            .outputs()
            .iter()
            .map(|o| o.name.as_str())
            .collect();
        let by_name: BTreeMap<&str, &Tensor> = names.iter().copied().zip(outs.iter()).collect();
        // The inputs themselves are observed too (the first layer quantizes them).
        for (name, t) in inputs {
            if t.dtype() == DType::F32
                && !by_name.contains_key(name.as_str())
                && !self.stats.iter().any(|(n, _)| n == name)
            {
                self.stats.push((name.clone(), TensorStats::default()));
            }
        }
        for (name, stats) in &mut self.stats {
            let t = match by_name.get(name.as_str()) {
                Some(t) => *t,
                None => inputs
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| {
                        KilnError::Other(format!("calibration: tensor {name} was not produced"))
                    })?,
            };
            stats.observe(t.as_slice::<f32>()?);
        }
        self.batches += 1;
        Ok(())
    }

    /// The cache for `algorithm` from everything observed so far.
    pub fn cache(&self, algorithm: Algorithm) -> CalibrationCache {
        let mut meta = vec![
            ("model".to_string(), self.model_file.clone()),
            ("batches".to_string(), self.batches.to_string()),
            ("kiln".to_string(), crate::VERSION.to_string()),
        ];
        if let Algorithm::Percentile(p) = algorithm {
            meta.insert(0, ("percentile".into(), p.to_string()));
        }
        CalibrationCache {
            algorithm,
            model_sha256: self.model_sha256.clone(),
            meta,
            scales: self
                .stats
                .iter()
                .filter(|(_, s)| s.count > 0)
                .map(|(n, s)| (n.clone(), s.scale(algorithm)))
                .collect(),
        }
    }
}

/// The names of a model file's inputs (to match data files before building anything).
pub fn model_inputs(model: &Path) -> Result<Vec<String>> {
    let m = kiln_onnx::load_model(model, crate::registry())?;
    Ok(m.graph
        .inputs
        .iter()
        .map(|&i| m.graph.values[i].name.clone())
        .collect())
}
