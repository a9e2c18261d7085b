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
                if matches!(op, "Conv" | "Gemm" | "MatMul") && !dynamic {
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
