//! ONNX backend conformance for kiln: runs ONNX's backend test cases
//! (`assets/onnx-backend/<suite>/<case>/model.onnx` + `test_data_set_N/`) and compares
//! kiln's outputs with the expected ones the way ONNX's backend runner does.
//!
//! [`run_case`] runs one case in-process; the `kiln-conformance` binary runs each case in
//! a child process (crash and timeout isolation) and aggregates, reports and checks the
//! results against `tests/conformance/expected_pass.txt`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_core::{DType, KilnError, Result, Tensor, Value};
use kiln_onnx::proto::ModelProto;
use prost::Message;
use serde::{Deserialize, Serialize};

pub mod report;

/// The suites (folders of `assets/onnx-backend`), in report order.
pub const SUITES: [&str; 4] = ["node", "simple", "pytorch-operator", "pytorch-converted"];

/// Relative tolerance of ONNX's backend runner.
pub const RTOL: f64 = 1e-3;
/// Absolute tolerance of ONNX's backend runner.
pub const ATOL: f64 = 1e-7;

/// The outcome of one case.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Status {
    /// Every output of every data set matched.
    Pass,
    /// Something failed; see the reason.
    Fail,
}

/// The result of running one case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    /// `suite/case`, e.g. `node/test_abs`.
    pub case: String,
    /// Pass or fail.
    pub status: Status,
    /// One line saying why it failed (empty on success).
    pub reason: String,
    /// Op types of the model's top-level nodes (`domain.Op` outside the default domain).
    pub ops: Vec<String>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// True when a graph input or output is a floating-point tensor (f32, f16, bf16, f64):
    /// the "float cases" a GPU run is judged on.
    #[serde(default)]
    pub float: bool,
    /// Layers that ran on the GPU and layers in all, for a case built for CUDA.
    #[serde(default)]
    pub gpu_layers: Option<[usize; 2]>,
    /// Op types of the layers of a CUDA-built case that fell back to the CPU.
    #[serde(default)]
    pub cpu_fallback_ops: Vec<String>,
}

impl CaseResult {
    /// True when the case passed.
    pub fn passed(&self) -> bool {
        self.status == Status::Pass
    }

    /// A failed result with a reason (only its first line is kept).
    pub fn fail(case: &str, reason: &str, ops: Vec<String>, seconds: f64) -> Self {
        CaseResult {
            case: case.into(),
            status: Status::Fail,
            reason: first_line(reason),
            ops,
            seconds,
            float: false,
            gpu_layers: None,
            cpu_fallback_ops: Vec::new(),
        }
    }
}

/// The first non-empty line of a message, trimmed.
pub fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

/// The `suite/case` name of a case directory.
pub fn case_name(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suite = dir
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned());
    match suite {
        Some(s) => format!("{s}/{name}"),
        None => name,
    }
}

/// The assets directory: `KILN_ASSETS`, else `assets/` of the workspace, else (in a git
/// worktree without assets) `assets/` of the main checkout.
pub fn default_assets_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_ASSETS") {
        return PathBuf::from(p);
    }
    let local = workspace_root().join("assets");
    if local.join("onnx-backend").is_dir() {
        return local;
    }
    let common = Command::new("git")
        .args(["rev-parse", "--path-format=absolute", "--git-common-dir"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(main) = common.as_deref().and_then(Path::parent) {
        if main.join("assets/onnx-backend").is_dir() {
            return main.join("assets");
        }
    }
    local
}

/// The workspace root: the current directory when it is the kiln workspace (the usual
/// `cargo run` from the repository root), else the one this crate was built from.
pub fn workspace_root() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    if cwd.join("crates/conformance/Cargo.toml").is_file() {
        return cwd;
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    built.canonicalize().unwrap_or(built)
}

/// All case directories of a suite, sorted by name.
pub fn discover(assets: &Path, suite: &str) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(assets.join("onnx-backend").join(suite)) else {
        return Vec::new();
    };
    let mut cases: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    cases.sort();
    cases
}

/// Op types of the top-level nodes of a model file (empty when it cannot be decoded).
pub fn model_ops(model_path: &Path) -> Vec<String> {
    decode_model(model_path)
        .map(|m| ops_of(&m))
        .unwrap_or_default()
}

fn ops_of(m: &ModelProto) -> Vec<String> {
    let mut ops: Vec<String> = m
        .graph
        .iter()
        .flat_map(|g| g.node.iter())
        .map(|n| match kiln_core::op::normalize_domain(n.domain()) {
            "" => n.op_type().to_string(),
            d => format!("{d}.{}", n.op_type()),
        })
        .collect();
    ops.sort();
    ops.dedup();
    ops
}

/// Builds the case's model into an engine through kiln's public API (the same path as
/// `kiln build`: import, optimise, plan). This is the one place that chooses the engine.
///
/// For [`kiln::DeviceKind::Cuda`] the engine is built at `shapes` (GPU engines need
/// concrete input shapes; the runner passes the first data set's) with tactic timing off
/// (`--opt-level 0`: the heuristic tactic of every layer; timing per case would cost more
/// than the case), in FP32 without TF32, so ONNX's tolerances apply unchanged.
pub fn build_engine(
    model_path: &Path,
    device: kiln::DeviceKind,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<kiln::Engine> {
    let mut config = kiln::BuilderConfig {
        device,
        ..kiln::BuilderConfig::default()
    };
    if device == kiln::DeviceKind::Cuda {
        config.shapes = shapes.clone();
        config.opt_level = 0;
    }
    kiln::Builder::new().build_onnx_file(model_path, &config)
}

/// True when a graph input or output of the model is a floating-point tensor.
pub fn model_is_float(model_path: &Path) -> bool {
    decode_model(model_path).is_some_and(|m| is_float(&m))
}

fn is_float(m: &ModelProto) -> bool {
    let Some(g) = m.graph.as_ref() else {
        return false;
    };
    g.input.iter().chain(g.output.iter()).any(|vi| {
        vi.r#type
            .as_ref()
            .and_then(|t| kiln_onnx::fact_from_type(t, vi.name()).ok())
            .is_some_and(|f| {
                f.kind == kiln_core::ValueKind::Tensor
                    && matches!(
                        f.dtype,
                        Some(DType::F32 | DType::F16 | DType::BF16 | DType::F64)
                    )
            })
    })
}

/// Shapes of the tensor inputs of a data set, by graph input name (inputs that are not
/// tensors, or whose file cannot be decoded, are left out).
pub fn data_set_shapes(model_path: &Path, set: &Path) -> BTreeMap<String, Vec<usize>> {
    decode_model(model_path)
        .map(|m| shapes_of(&m, set))
        .unwrap_or_default()
}

fn shapes_of(m: &ModelProto, set: &Path) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    let Some(g) = m.graph.as_ref() else {
        return out;
    };
    let inits: std::collections::BTreeSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    let inputs = g.input.iter().filter(|vi| !inits.contains(vi.name()));
    for (vi, file) in inputs.zip(numbered(set, "input")) {
        let is_tensor = matches!(
            vi.r#type.as_ref().and_then(|t| t.value.as_ref()),
            Some(kiln_onnx::proto::type_proto::Value::TensorType(_))
        );
        if !is_tensor {
            continue;
        }
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        if let Ok(t) = kiln_onnx::proto::TensorProto::decode(bytes.as_slice()) {
            if t.dims.iter().all(|&d| d >= 0) {
                out.insert(
                    vi.name().to_string(),
                    t.dims.iter().map(|&d| d as usize).collect(),
                );
            }
        }
    }
    out
}

fn decode_model(model_path: &Path) -> Option<ModelProto> {
    let bytes = std::fs::read(model_path).ok()?;
    ModelProto::decode(bytes.as_slice()).ok()
}

/// Runs an engine on one set of inputs (in the engine's input order).
pub fn run_engine(ctx: &mut kiln::ExecutionContext, inputs: Vec<Value>) -> Result<Vec<Value>> {
    let names: Vec<String> = ctx
        .engine()
        .inputs()
        .iter()
        .map(|i| i.name.clone())
        .collect();
    let named: Vec<(&str, Value)> = names.iter().map(|n| n.as_str()).zip(inputs).collect();
    ctx.execute(&named)
}

/// Runs one case (a directory with `model.onnx` and `test_data_set_N/`) in-process, on
/// `device`.
pub fn run_case(dir: &Path, device: kiln::DeviceKind) -> CaseResult {
    let start = Instant::now();
    // Decoded once: op list, float-ness and (for CUDA) the build shapes all come from it.
    let model = decode_model(&dir.join("model.onnx"));
    let ops = model.as_ref().map(ops_of).unwrap_or_default();
    let name = case_name(dir);
    let mut gpu_layers = None;
    let mut fallback = Vec::new();
    let outcome = run_case_inner(dir, model.as_ref(), device, &mut gpu_layers, &mut fallback);
    let seconds = start.elapsed().as_secs_f64();
    let reason = outcome.as_ref().err().map_or("", String::as_str);
    let mut r = CaseResult::fail(&name, reason, ops, seconds);
    if outcome.is_ok() {
        r.status = Status::Pass;
    }
    r.float = model.as_ref().is_some_and(is_float);
    r.gpu_layers = gpu_layers;
    r.cpu_fallback_ops = fallback;
    r
}

/// The test data sets of a case, in numeric order.
fn data_sets(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sets: Vec<(u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("test_data_set_")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    sets.sort();
    sets.into_iter().map(|(_, p)| p).collect()
}

/// Numbered files `<prefix>_K.pb` of a data set, in order.
fn numbered(set: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for k in 0.. {
        let p = set.join(format!("{prefix}_{k}.pb"));
        if !p.is_file() {
            break;
        }
        out.push(p);
    }
    out
}

fn run_case_inner(
    dir: &Path,
    proto: Option<&ModelProto>,
    device: kiln::DeviceKind,
    gpu_layers: &mut Option<[usize; 2]>,
    cpu_fallback_ops: &mut Vec<String>,
) -> std::result::Result<(), String> {
    let model = dir.join("model.onnx");
    let sets = data_sets(dir);
    if sets.is_empty() {
        return Err("no test_data_set_N directory".into());
    }
    // Only GPU engines are built at fixed shapes.
    let shapes = match (device, proto) {
        (kiln::DeviceKind::Cuda, Some(m)) => shapes_of(m, &sets[0]),
        _ => BTreeMap::new(),
    };
    let engine = build_engine(&model, device, &shapes).map_err(|e| e.to_string())?;
    if device == kiln::DeviceKind::Cuda {
        let layers = engine.layers();
        let on_gpu = layers.iter().filter(|l| l.device == "gpu").count();
        *gpu_layers = Some([on_gpu, layers.len()]);
        cpu_fallback_ops.extend(
            layers
                .iter()
                .filter(|l| l.device != "gpu")
                .map(|l| l.op.clone()),
        );
    }
    let mut ctx = engine.create_context();
    let (model_inputs, model_outputs) = (engine.inputs(), engine.outputs());
    for set in &sets {
        let set_name = set
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let in_files = numbered(set, "input");
        if in_files.len() != model_inputs.len() {
            return Err(format!(
                "{set_name} has {} inputs, the model takes {}",
                in_files.len(),
                model_inputs.len()
            ));
        }
        let inputs = in_files
            .iter()
            .zip(model_inputs)
            .map(|(p, io)| kiln_onnx::read_value_pb(p, io.kind))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| format!("reading {set_name}: {e}"))?;
        let out_files = numbered(set, "output");
        if out_files.len() != model_outputs.len() {
            return Err(format!(
                "{set_name} has {} outputs, the model produces {}",
                out_files.len(),
                model_outputs.len()
            ));
        }
        let expected = out_files
            .iter()
            .zip(model_outputs)
            .map(|(p, io)| kiln_onnx::read_value_pb(p, io.kind))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| format!("reading {set_name}: {e}"))?;
        let got = run_engine(&mut ctx, inputs).map_err(|e| e.to_string())?;
        if got.len() != expected.len() {
            return Err(format!(
                "produced {} outputs, expected {}",
                got.len(),
                expected.len()
            ));
        }
        for (k, (g, e)) in got.iter().zip(&expected).enumerate() {
            compare_values(g, e).map_err(|m| {
                let sets_note = if sets.len() > 1 {
                    format!(" ({set_name})")
                } else {
                    String::new()
                };
                format!("output {k} ({}){sets_note}: {m}", model_outputs[k].name)
            })?;
        }
    }
    Ok(())
}

/// Compares a produced value with the expected one; `Err` says how they differ.
pub fn compare_values(got: &Value, want: &Value) -> std::result::Result<(), String> {
    match (got, want) {
        (Value::Tensor(g), Value::Tensor(w)) => compare_tensors(g, w),
        (Value::Sequence(g), Value::Sequence(w)) => {
            if g.len() != w.len() {
                return Err(format!(
                    "sequence of {} tensors, expected {}",
                    g.len(),
                    w.len()
                ));
            }
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                compare_tensors(a, b).map_err(|m| format!("sequence element {i}: {m}"))?;
            }
            Ok(())
        }
        (Value::Optional(g), Value::Optional(w)) => match (g, w) {
            (None, None) => Ok(()),
            (Some(a), Some(b)) => compare_values(a, b),
            (None, Some(_)) => Err("empty optional, expected a value".into()),
            (Some(_), None) => Err("optional holds a value, expected an empty one".into()),
        },
        (g, w) => Err(format!(
            "got a {}, expected a {}",
            g.kind_name(),
            w.kind_name()
        )),
    }
}

fn fmt_shape(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// The multi-index of a flat position, for messages.
fn index_of(mut flat: usize, shape: &[usize]) -> String {
    let mut idx = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[i] = flat % d;
            flat /= d;
        }
    }
    fmt_shape(&idx)
}

/// Compares two tensors: same dtype and shape; floats within `ATOL + RTOL*|want|` (NaN
/// equals NaN, infinities must match); everything else exactly.
pub fn compare_tensors(got: &Tensor, want: &Tensor) -> std::result::Result<(), String> {
    if got.dtype() != want.dtype() {
        return Err(format!("dtype {}, expected {}", got.dtype(), want.dtype()));
    }
    if got.shape() != want.shape() {
        return Err(format!(
            "shape {}, expected {}",
            fmt_shape(got.shape()),
            fmt_shape(want.shape())
        ));
    }
    let shape = want.shape();
    match want.dtype() {
        DType::String => {
            let (g, w) = (
                got.as_strings().map_err(|e| e.to_string())?,
                want.as_strings().map_err(|e| e.to_string())?,
            );
            let bad: Vec<usize> = (0..w.len()).filter(|&i| g[i] != w[i]).collect();
            if let Some(&i) = bad.first() {
                return Err(format!(
                    "{} of {} strings differ, first at {}: got {:?}, expected {:?}",
                    bad.len(),
                    w.len(),
                    index_of(i, shape),
                    g[i],
                    w[i]
                ));
            }
            Ok(())
        }
        d if d.is_low_precision() => {
            // float8 / float4 / int4: exact values (NaN equals NaN).
            let g = got.to_f64_vec().map_err(|e| e.to_string())?;
            let w = want.to_f64_vec().map_err(|e| e.to_string())?;
            let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
            let bad: Vec<usize> = (0..w.len()).filter(|&i| !same(g[i], w[i])).collect();
            if let Some(&i) = bad.first() {
                return Err(format!(
                    "{} of {} values differ, first at {}: got {}, expected {}",
                    bad.len(),
                    w.len(),
                    index_of(i, shape),
                    g[i],
                    w[i]
                ));
            }
            Ok(())
        }
        d if d.is_float() => {
            let g = got.to_f64_vec().map_err(|e| e.to_string())?;
            let w = want.to_f64_vec().map_err(|e| e.to_string())?;
            let mut n_bad = 0;
            let mut worst: Option<(usize, f64)> = None;
            for i in 0..w.len() {
                let (a, b) = (g[i], w[i]);
                let ok = if a.is_nan() || b.is_nan() {
                    a.is_nan() && b.is_nan()
                } else if a.is_infinite() || b.is_infinite() {
                    a == b
                } else {
                    (a - b).abs() <= ATOL + RTOL * b.abs()
                };
                if !ok {
                    n_bad += 1;
                    let err = if (a - b).is_nan() {
                        f64::INFINITY
                    } else {
                        (a - b).abs()
                    };
                    if worst.is_none_or(|(_, e)| err > e) {
                        worst = Some((i, err));
                    }
                }
            }
            if let Some((i, _)) = worst {
                return Err(format!(
                    "{n_bad} of {} values differ (rtol {RTOL}, atol {ATOL}), worst at {}: got {}, expected {}",
                    w.len(),
                    index_of(i, shape),
                    g[i],
                    w[i]
                ));
            }
            Ok(())
        }
        _ => {
            if got.bytes() == want.bytes() {
                return Ok(());
            }
            let g = got.to_vec::<i128>().map_err(|e| e.to_string());
            let w = want.to_vec::<i128>().map_err(|e| e.to_string());
            match (g, w) {
                (Ok(g), Ok(w)) => {
                    let bad: Vec<usize> = (0..w.len()).filter(|&i| g[i] != w[i]).collect();
                    let i = bad.first().copied().unwrap_or(0);
                    Err(format!(
                        "{} of {} values differ, first at {}: got {}, expected {}",
                        bad.len(),
                        w.len(),
                        index_of(i, shape),
                        g.get(i).copied().unwrap_or_default(),
                        w.get(i).copied().unwrap_or_default()
                    ))
                }
                _ => Err("values differ".into()),
            }
        }
    }
}

/// Reads the expectations file (one `suite/case` per line; `#` comments and blank lines
/// ignored). A missing file is an empty list.
pub fn read_expected(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Writes the expectations file, sorted, with a header.
pub fn write_expected(path: &Path, cases: &[String]) -> Result<()> {
    let mut sorted: Vec<&String> = cases.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut text = String::from(
        "# ONNX backend cases kiln passes. Generated by `kiln-conformance --update`; do not edit by hand.\n",
    );
    for c in sorted {
        text.push_str(c);
        text.push('\n');
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| KilnError::io(dir, e))?;
    }
    std::fs::write(path, text).map_err(|e| KilnError::io(path, e))
}

/// Pass/fail counts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Tally {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
}

impl Tally {
    /// Adds one result.
    pub fn add(&mut self, passed: bool) {
        if passed {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    /// Total cases.
    pub fn total(&self) -> usize {
        self.passed + self.failed
    }

    /// `N passed, M failed`.
    pub fn line(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed)
    }
}

/// Counts per suite, in [`SUITES`] order.
pub fn tally_by_suite(results: &[CaseResult]) -> BTreeMap<String, Tally> {
    let mut m: BTreeMap<String, Tally> = BTreeMap::new();
    for r in results {
        let suite = r.case.split('/').next().unwrap_or("").to_string();
        m.entry(suite).or_default().add(r.passed());
    }
    m
}

/// A duration as a short human string (`12.3s`, `4m05s`).
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{s:.1}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t32(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape, v).unwrap()
    }

    /// A node-suite case from the assets, or None (with a note) when assets are missing.
    fn node_case(name: &str) -> Option<PathBuf> {
        let dir = default_assets_dir().join("onnx-backend/node").join(name);
        if dir.join("model.onnx").is_file() {
            Some(dir)
        } else {
            eprintln!(
                "{} missing: run `python3 scripts/assets.py all`",
                dir.display()
            );
            None
        }
    }

    #[test]
    fn float_cases_and_first_set_shapes() {
        let (Some(abs), Some(shift), Some(gather)) = (
            node_case("test_abs"),
            node_case("test_bitshift_right_uint8"),
            node_case("test_gather_0"),
        ) else {
            return;
        };
        assert!(model_is_float(&abs.join("model.onnx")));
        assert!(!model_is_float(&shift.join("model.onnx")));
        let set = |d: &Path| data_sets(d).into_iter().next().unwrap();
        let s = data_set_shapes(&abs.join("model.onnx"), &set(&abs));
        assert_eq!(s.get("x"), Some(&vec![3, 4, 5]), "{s:?}");
        // Two inputs: float data, int64 indices; both named and shaped.
        let s = data_set_shapes(&gather.join("model.onnx"), &set(&gather));
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s.get("data"), Some(&vec![5, 4, 3, 2]), "{s:?}");
        assert_eq!(s.get("indices"), Some(&vec![3]), "{s:?}");
    }

    #[test]
    fn float_tolerance_matches_onnx_runner() {
        let w = t32(&[3], vec![1.0, f32::NAN, f32::INFINITY]);
        assert!(compare_tensors(&t32(&[3], vec![1.0005, f32::NAN, f32::INFINITY]), &w).is_ok());
        let e = compare_tensors(&t32(&[3], vec![1.01, f32::NAN, f32::INFINITY]), &w).unwrap_err();
        assert!(e.contains("1 of 3") && e.contains("[0]"), "{e}");
        assert!(compare_tensors(&t32(&[3], vec![1.0, 0.0, f32::INFINITY]), &w).is_err());
        assert!(compare_tensors(&t32(&[3], vec![1.0, f32::NAN, f32::NEG_INFINITY]), &w).is_err());
        assert!(
            compare_tensors(&t32(&[1, 3], vec![1.0, f32::NAN, f32::INFINITY]), &w)
                .unwrap_err()
                .contains("shape")
        );
        let w0 = t32(&[1], vec![0.0]);
        assert!(compare_tensors(&t32(&[1], vec![1e-8]), &w0).is_ok());
        assert!(compare_tensors(&t32(&[1], vec![1e-6]), &w0).is_err());
    }

    #[test]
    fn exact_for_ints_strings_and_kinds() {
        let a = Tensor::from_vec(&[2], vec![1i64, 2]).unwrap();
        let b = Tensor::from_vec(&[2], vec![1i64, 3]).unwrap();
        assert!(compare_tensors(&a, &a).is_ok());
        assert!(compare_tensors(&a, &b)
            .unwrap_err()
            .contains("got 2, expected 3"));
        let c = Tensor::from_vec(&[2], vec![1i32, 2]).unwrap();
        assert!(compare_tensors(&c, &a).unwrap_err().contains("dtype"));
        let s1 = Tensor::from_strings(&[1], vec!["a".into()]).unwrap();
        let s2 = Tensor::from_strings(&[1], vec!["b".into()]).unwrap();
        assert!(compare_tensors(&s1, &s2).is_err());
        let seq = Value::Sequence(vec![a.clone()]);
        assert!(compare_values(&seq, &Value::Sequence(vec![a.clone()])).is_ok());
        assert!(compare_values(&seq, &Value::Sequence(vec![b])).is_err());
        assert!(compare_values(&seq, &Value::Tensor(a.clone())).is_err());
        assert!(compare_values(&Value::Optional(None), &Value::Optional(None)).is_ok());
        assert!(compare_values(
            &Value::Optional(None),
            &Value::Optional(Some(Box::new(Value::Tensor(a))))
        )
        .is_err());
    }
}
