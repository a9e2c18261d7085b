//! Times one 3×3 conv (pads 1, one image, ReLU) with im2col, the flat direct kernel and
//! the two Winograd tactics at 1 thread, weights prepacked as the engine stores them:
//! `cargo run --release -p kiln-cpu --example wino_bench -- C K HW` (best of 15 runs).
use kiln_cpu::fused::Activation;
use kiln_cpu::ops::conv::geom::WindowAttrs;
use kiln_cpu::ops::conv::kernel::{pack_weights, ConvAlgo, ConvF32, TILE_ELEMS};
use kiln_cpu::ops::conv::reference::ConvDims;
use kiln_cpu::ops::conv::winograd::{transform_weights, WinoTile};
use kiln_cpu::ops::linalg::sgemm::Isa;
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (c, m, h) = (args[0], args[1], args[2]);
    let win = WindowAttrs {
        pads: Some(vec![1; 4]),
        ..Default::default()
    };
    let sp = win
        .resolve("Conv", &[h, h], &[3, 3])
        .unwrap()
        .to3("Conv")
        .unwrap();
    let dims = ConvDims {
        n: 1,
        c,
        m,
        group: 1,
    };
    let mut s = 1u64;
    let mut r = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
        ((s >> 40) as f32 / 16777216.0) - 0.5
    };
    let x: Vec<f32> = (0..c * h * h).map(|_| r()).collect();
    let w: Vec<f32> = (0..m * c * 9).map(|_| r()).collect();
    let b: Vec<f32> = (0..m).map(|_| r()).collect();
    let isa = Isa::detect();
    let pw = pack_weights(&w, m, 1, isa).unwrap();
    let mut out = vec![0.0f32; m * h * h];
    let mut variants: Vec<(String, ConvAlgo, Vec<f32>)> = vec![
        (
            "im2col".into(),
            ConvAlgo::Im2colGemm {
                tile_elems: TILE_ELEMS,
                parallel_outer: false,
            },
            pw.clone(),
        ),
        ("direct".into(), ConvAlgo::Direct, w.clone()),
    ];
    for t in [WinoTile::F23, WinoTile::F43] {
        variants.push((
            format!("{t:?}"),
            ConvAlgo::Winograd(t),
            transform_weights(t, &w, m, 1, Some(isa)).unwrap(),
        ));
    }
    let flops = 2.0 * (m * c * 9 * h * h) as f64;
    kiln_cpu::parallel::serial(|| {
        for (name, algo, wv) in &variants {
            let conv = ConvF32 {
                x: &x,
                w: wv,
                bias: Some(&b),
                dims,
                sp,
                act: Activation::Relu,
                residual: None,
                algo: *algo,
                packed: if matches!(algo, ConvAlgo::Direct) {
                    None
                } else {
                    Some(isa)
                },
            };
            if conv.run(&mut out).is_err() {
                println!("{name}: n/a");
                continue;
            }
            let mut best = f64::MAX;
            for _ in 0..15 {
                let t = Instant::now();
                conv.run(&mut out).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{c}->{m} {h}x{h} {name}: {:.3} ms ({:.1} GFLOP/s direct-equivalent)",
                best * 1e3,
                flops / best / 1e9
            );
        }
    });
}
