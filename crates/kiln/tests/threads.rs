//! One engine shared by 8 threads, each with its own context, 50 inferences each on
//! different inputs: every result must equal the one computed serially.

mod common;

use std::sync::Arc;

use kiln::{Builder, BuilderConfig, Tensor};

fn perturbed(base: &Tensor, k: usize) -> Tensor {
    let v: Vec<f32> = base
        .to_f32_vec()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, x)| x + 0.01 * (((i * 31 + k * 17) % 97) as f32 - 48.0) / 48.0)
        .collect();
    Tensor::from_vec(base.shape(), v).unwrap()
}

#[test]
fn eight_threads_match_serial_results() {
    let Some(assets) = common::assets() else {
        return;
    };
    let case = common::case(&assets, "orientation_b1");
    let engine = Builder::new()
        .build_onnx_file(&case.model, &BuilderConfig::default())
        .expect("build");
    let (name, base) = case.inputs[0].clone();
    const THREADS: usize = 8;
    const RUNS: usize = 50;
    let inputs: Vec<Tensor> = (0..THREADS * RUNS).map(|k| perturbed(&base, k)).collect();
    let mut serial_ctx = engine.create_context();
    serial_ctx.set_threads(1).unwrap();
    let serial: Vec<Vec<Tensor>> = inputs
        .iter()
        .map(|x| {
            serial_ctx
                .execute_tensors(&[(&name, x.clone())])
                .expect("serial run")
        })
        .collect();
    // Different inputs really give different outputs (else the test could not fail).
    assert!(!serial[0][0].same_as(&serial[1][0]));
    let inputs = Arc::new(inputs);
    let serial = Arc::new(serial);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let engine = engine.clone();
            let inputs = inputs.clone();
            let serial = serial.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                let mut ctx = engine.create_context();
                ctx.set_threads(1).unwrap();
                for r in 0..RUNS {
                    let k = r * THREADS + t;
                    let out = ctx
                        .execute_tensors(&[(&name, inputs[k].clone())])
                        .expect("threaded run");
                    for (a, b) in out.iter().zip(&serial[k]) {
                        assert!(
                            a.same_as(b),
                            "thread {t} run {r}: result differs from serial"
                        );
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker thread panicked");
    }
}
