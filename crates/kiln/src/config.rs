//! Build configuration: target device, input shapes, optimisation switches.

use std::collections::BTreeMap;

use kiln_core::{KilnError, Result};

use crate::profile::OptimizationProfile;

/// The device an engine is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// The CUDA backend.
    Cuda,
}

impl std::str::FromStr for DeviceKind {
    type Err = KilnError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceKind::Auto),
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" | "gpu" => Ok(DeviceKind::Cuda),
            other => Err(KilnError::Other(format!(
                "unknown device {other:?}: expected auto, cpu or cuda"
            ))),
        }
    }
}

/// The builder optimisation level used when none is given.
pub const DEFAULT_OPT_LEVEL: u8 = 3;

/// Parses `--layer-precision` items: `NAME:fp32,OTHER:fp16`.
pub fn parse_layer_precision(spec: &str) -> Result<BTreeMap<String, kiln_core::Precision>> {
    let mut out = BTreeMap::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, p) = part.trim().rsplit_once(':').ok_or_else(|| {
            KilnError::Other(format!(
                "--layer-precision item {part:?} must look like LAYER:fp32"
            ))
        })?;
        let p = kiln_core::Precision::parse(p).ok_or_else(|| {
            KilnError::Other(format!(
                "--layer-precision {name}: unknown precision {p:?} (expected fp32, fp16 or int8)"
            ))
        })?;
        out.insert(name.to_string(), p);
    }
    Ok(out)
}

/// How to build an engine (TensorRT's `IBuilderConfig`).
#[derive(Debug, Clone)]
pub struct BuilderConfig {
    /// Target device.
    pub device: DeviceKind,
    /// Concrete shapes for inputs with symbolic or unknown dims. An engine built with
    /// shapes is specialised to them (shape subgraphs folded); without, it plans memory
    /// per input shape at run time.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// Optimization profiles (min/opt/max shape ranges) for inputs with dynamic dims. The
    /// engine keeps those dims symbolic and accepts any shape inside the active profile.
    /// Cannot be combined with `shapes` (which is one profile with min = opt = max, and
    /// specialises the engine).
    pub profiles: Vec<OptimizationProfile>,
    /// Run the optimisation passes (folding, fusion). Off only for debugging.
    pub optimize: bool,
    /// Builder optimisation level 0..=5: 0 takes each op's heuristic tactic (no timing);
    /// higher levels time more tactic candidates, with more repetitions. Default 3.
    pub opt_level: u8,
    /// Allow FP16 layers (the FP16 + FP32 precision pools). GPU engines store float weights
    /// and activations in FP16 (FP32 accumulation in GEMMs).
    pub fp16: bool,
    /// GPU engines: allow TF32 tensor-core math in FP32 matrix products.
    pub tf32: bool,
    /// Allow INT8 layers (the INT8 + FP32 precision pools; CPU only). Needs
    /// `calibration` (or a model with QuantizeLinear/DequantizeLinear pairs).
    pub int8: bool,
    /// Explicit quantization: lower the model's QuantizeLinear/DequantizeLinear-wrapped
    /// Conv/MatMul/Gemm layers to INT8 kernels with the model's scales and zero points
    /// (CPU engines; on by default, needs no calibration). Off: they run through the
    /// reference Q/DQ ops and float layers.
    pub explicit_int8: bool,
    /// Per-tensor INT8 scales (`--calib-cache`), checked against the model's hash.
    pub calibration: Option<std::sync::Arc<crate::int8::CalibrationCache>>,
    /// Calibration: skip nothing and make every float activation of the source model an
    /// extra engine output (used by [`crate::int8::Calibrator`]).
    pub observe_activations: bool,
    /// Layers pinned to one precision (`--layer-precision NAME:fp32`).
    pub layer_precision: BTreeMap<String, kiln_core::Precision>,
    /// Timing cache file read before tuning and written after (`--timing-cache`).
    pub timing_cache: Option<std::path::PathBuf>,
    /// The whole-engine check (`--no-engine-check` turns it off): when tuning put layers
    /// in INT8 (or, on the CPU, in the channels-last layout), the engine is raced end to
    /// end against the float-only (linear-only) engine and the faster is kept (per-layer
    /// times do not always add up to the engine's).
    pub engine_check: bool,
    /// CPU engines: the intra-op thread count the engine will run with (`--threads`), so
    /// the tuner times tactics and races engines at it (a tactic or layout that wins on
    /// two threads can lose on one). `None`: the global pool, one thread per core. Part of
    /// the timing cache's key.
    pub threads: Option<usize>,
}

impl Default for BuilderConfig {
    fn default() -> Self {
        BuilderConfig {
            device: DeviceKind::Auto,
            shapes: BTreeMap::new(),
            profiles: Vec::new(),
            optimize: true,
            opt_level: DEFAULT_OPT_LEVEL,
            fp16: false,
            tf32: false,
            int8: false,
            explicit_int8: true,
            calibration: None,
            observe_activations: false,
            layer_precision: BTreeMap::new(),
            timing_cache: None,
            engine_check: true,
            threads: None,
        }
    }
}

/// Parses `name:1x3x224x224,other:4x5` into a shape map. A scalar is written `name:` or
/// `name:scalar`.
pub fn parse_shapes(spec: &str) -> Result<BTreeMap<String, Vec<usize>>> {
    let mut out = BTreeMap::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, dims) = part.rsplit_once(':').ok_or_else(|| {
            KilnError::Other(format!(
                "bad shape {part:?}: expected NAME:DIMxDIMx..., e.g. x:1x3x224x224"
            ))
        })?;
        let dims = dims.trim();
        let shape = if dims.is_empty() || dims == "scalar" {
            vec![]
        } else {
            dims.split(['x', 'X'])
                .map(|d| {
                    d.trim().parse::<usize>().map_err(|_| {
                        KilnError::Other(format!("bad dimension {d:?} in shape {part:?}: expected a non-negative integer"))
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        if out.insert(name.trim().to_string(), shape).is_some() {
            return Err(KilnError::Other(format!(
                "shape for input {name} given twice"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shapes() {
        let s = parse_shapes("x:1x3x224x224,sr:,y:4").unwrap();
        assert_eq!(s["x"], vec![1, 3, 224, 224]);
        assert_eq!(s["sr"], Vec::<usize>::new());
        assert_eq!(s["y"], vec![4]);
        assert!(parse_shapes("x:1xAx3").is_err());
        assert!(parse_shapes("x1x3").is_err());
        assert!(parse_shapes("x:1,x:2").is_err());
    }
}
