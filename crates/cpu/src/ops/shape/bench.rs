//! Rough timings of the data-movement kernels on large f32 tensors (ignored by default:
//! `cargo test --release -p kiln-cpu --lib shape::bench -- --ignored --nocapture`).

use std::time::Instant;

use kiln_core::{Attr, AttrReader, BuildCtx, OpDesc, Tensor, Value};

fn build(
    op: &str,
    opset: i64,
    attrs: Vec<(&str, Attr)>,
    n_out: usize,
) -> std::sync::Arc<dyn kiln_core::Op> {
    let mut d = OpDesc::new("", op, opset);
    for (k, v) in attrs {
        d.attrs.insert(k.into(), v);
    }
    let _ = AttrReader {
        node: "b",
        desc: &d,
    };
    crate::registry()
        .build(&BuildCtx {
            node: "b",
            desc: &d,
            n_inputs: 2,
            n_outputs: n_out,
        })
        .unwrap()
}

fn time(name: &str, bytes: usize, mut f: impl FnMut()) {
    f();
    let n = 10;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    eprintln!(
        "{name:40} {:8.3} ms  {:6.2} GB/s",
        s * 1e3,
        bytes as f64 / s / 1e9
    );
}

#[test]
#[ignore]
fn bench_data_movement() {
    let shape = [8usize, 12, 512, 64];
    let n: usize = shape.iter().product();
    let x: Value = Tensor::from_vec(&shape, (0..n).map(|v| v as f32).collect())
        .unwrap()
        .into();
    let bytes = n * 4 * 2;
    let src = x.as_tensor().unwrap().as_slice::<f32>().unwrap().to_vec();
    time("memcpy baseline", bytes, || {
        let v = src.clone();
        std::hint::black_box(v);
    });
    let t = build(
        "Transpose",
        13,
        vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        1,
    );
    time("Transpose 0213", bytes, || {
        t.eval(&[Some(&x)]).unwrap();
    });
    let t = build(
        "Transpose",
        13,
        vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
        1,
    );
    time("Transpose 0132", bytes, || {
        t.eval(&[Some(&x)]).unwrap();
    });
    let t = build(
        "Transpose",
        13,
        vec![("perm", Attr::Ints(vec![3, 1, 2, 0]))],
        1,
    );
    time("Transpose 3120", bytes, || {
        t.eval(&[Some(&x)]).unwrap();
    });
    let c = build("Concat", 13, vec![("axis", Attr::Int(2))], 1);
    time("Concat axis2 (2 inputs)", bytes * 2, || {
        c.eval(&[Some(&x), Some(&x)]).unwrap();
    });
    let sl = build("Slice", 13, vec![], 1);
    let st: Value = Tensor::from_vec(&[1], vec![1i64]).unwrap().into();
    let en: Value = Tensor::from_vec(&[1], vec![-1i64]).unwrap().into();
    let ax: Value = Tensor::from_vec(&[1], vec![3i64]).unwrap().into();
    time("Slice last axis 1..-1", bytes, || {
        sl.eval(&[Some(&x), Some(&st), Some(&en), Some(&ax)])
            .unwrap();
    });
    let sp = build("Split", 13, vec![("axis", Attr::Int(3))], 2);
    time("Split axis3 in 2", bytes, || {
        sp.eval(&[Some(&x)]).unwrap();
    });
    let emb: Value = Tensor::from_vec(&[30000, 768], vec![1f32; 30000 * 768])
        .unwrap()
        .into();
    let idx: Value = Tensor::from_vec(
        &[8, 512],
        (0..4096).map(|i| (i * 7 % 30000) as i64).collect(),
    )
    .unwrap()
    .into();
    let g = build("Gather", 13, vec![], 1);
    time("Gather embeddings 4096x768", 4096 * 768 * 8, || {
        g.eval(&[Some(&emb), Some(&idx)]).unwrap();
    });
    let p = build("Pad", 13, vec![], 1);
    let pads: Value = Tensor::from_vec(&[8], vec![0i64, 0, 1, 1, 0, 0, 1, 1])
        .unwrap()
        .into();
    time("Pad H,W by 1", bytes, || {
        p.eval(&[Some(&x), Some(&pads)]).unwrap();
    });
    let e = build("Expand", 13, vec![], 1);
    let small: Value = Tensor::from_vec(&[1, 12, 1, 64], vec![1f32; 768])
        .unwrap()
        .into();
    let es: Value = Tensor::from_vec(&[4], vec![8i64, 12, 512, 64])
        .unwrap()
        .into();
    time("Expand to [8,12,512,64]", n * 4, || {
        e.eval(&[Some(&small), Some(&es)]).unwrap();
    });
}

#[test]
#[ignore]
fn bench_views_no_alloc() {
    use super::common::{istrides, StridedView};
    let shape = [8usize, 12, 512, 64];
    let n: usize = shape.iter().product();
    let src: Vec<u32> = (0..n as u32).collect();
    let mut dst = vec![0u32; n];
    let st = istrides(&shape);
    let perm = |p: [usize; 4]| StridedView {
        shape: p.iter().map(|&i| shape[i]).collect(),
        strides: p.iter().map(|&i| st[i]).collect(),
        offset: 0,
    };
    time("copy_from_slice", n * 8, || {
        let mut d = vec![0u32; 0];
        d.extend_from_slice(&src);
        std::hint::black_box(d);
    });
    let mut dd = vec![0u32; n];
    time("copy into prealloc", n * 8, || {
        dd.copy_from_slice(&src);
    });
    for p in [[0, 1, 2, 3], [0, 2, 1, 3], [0, 1, 3, 2], [3, 1, 2, 0]] {
        let v = perm(p);
        let t = Instant::now();
        for _ in 0..10 {
            v.copy_to(&src, &mut dst);
        }
        let s = t.elapsed().as_secs_f64() / 10.0;
        eprintln!(
            "view {p:?} {:.3} ms {:.2} GB/s",
            s * 1e3,
            (n * 8) as f64 / s / 1e9
        );
    }
}
