//! Thread-safety stress test (the seed's FAQ 2): 2 × cores threads, each with its own
//! execution context on one shared engine, run thousands of inferences with different
//! inputs and different shapes inside one optimization profile; every output must be
//! bitwise equal to the result computed serially.

mod common;

use std::sync::Arc;

use kiln::{parse_shapes, Builder, BuilderConfig, OptimizationProfile, Tensor};

/// Deterministic, non-trivial values (never all zeros).
fn input(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(shape, v).unwrap()
}

#[test]
fn threads_with_own_contexts_match_serial_results_across_shapes() {
    let Some(assets) = common::assets() else {
        return;
    };
    let model = assets.join("models/ch_ppocr_mobile_v2.0_cls_infer.onnx");
    let profile = OptimizationProfile::new(
        parse_shapes("x:1x3x48x64").unwrap(),
        parse_shapes("x:2x3x48x160").unwrap(),
        parse_shapes("x:4x3x48x192").unwrap(),
    )
    .unwrap();
    let config = BuilderConfig {
        profiles: vec![profile],
        ..Default::default()
    };
    let engine = Builder::new()
        .build_onnx_file(&model, &config)
        .expect("build");

    // 8 shapes inside the profile × 3 inputs each.
    let shapes: [[usize; 4]; 8] = [
        [1, 3, 48, 64],
        [1, 3, 48, 192],
        [2, 3, 48, 96],
        [2, 3, 48, 160],
        [3, 3, 48, 128],
        [3, 3, 48, 72],
        [4, 3, 48, 112],
        [4, 3, 48, 192],
    ];
    let cases: Vec<Tensor> = shapes
        .iter()
        .flat_map(|s| (0..3u64).map(move |k| (*s, k)))
        .enumerate()
        .map(|(i, (s, _))| input(&s, i as u64 + 1))
        .collect();
    let mut serial_ctx = engine.create_context();
    serial_ctx.set_threads(1).unwrap();
    let serial: Vec<Vec<Tensor>> = cases
        .iter()
        .map(|x| {
            serial_ctx
                .execute_tensors(&[("x", x.clone())])
                .expect("serial")
        })
        .collect();
    // The test can fail: different inputs give different outputs.
    assert!(!serial[0][0].same_as(&serial[1][0]));

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads = 2 * cores;
    // Thousands of runs in total, whatever the core count.
    let runs_per_thread = 2400usize.div_ceil(threads);
    let cases = Arc::new(cases);
    let serial = Arc::new(serial);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let engine = engine.clone();
            let (cases, serial) = (cases.clone(), serial.clone());
            std::thread::spawn(move || {
                let mut ctx = engine.create_context();
                ctx.set_threads(1).unwrap();
                for r in 0..runs_per_thread {
                    // Each thread walks the cases in its own order, so shapes change
                    // from one run to the next and differ between threads.
                    let k = (r * 7 + t * 5) % cases.len();
                    let out = ctx
                        .execute_tensors(&[("x", cases[k].clone())])
                        .expect("threaded run");
                    assert_eq!(out.len(), serial[k].len());
                    for (a, b) in out.iter().zip(&serial[k]) {
                        assert!(
                            a.same_as(b),
                            "thread {t} run {r} (case {k}, shape {:?}): differs from serial",
                            cases[k].shape()
                        );
                    }
                }
                runs_per_thread
            })
        })
        .collect();
    let total: usize = handles
        .into_iter()
        .map(|h| h.join().expect("worker thread panicked"))
        .sum();
    assert!(total >= 2000, "{total} runs");
}
