use super::*;
use crate::ops::conv::test_util::{max_diff, Lcg};

fn naive(a: &[f32], b: &[f32], plan: &MatMulPlan) -> Vec<f32> {
    let MatMulPlan { m, k, n, .. } = *plan;
    let mut out = vec![];
    for &(oa, ob) in &plan.offsets {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for l in 0..k {
                    s += a[oa + i * k + l] as f64 * b[ob + l * n + j] as f64;
                }
                out.push(s as f32);
            }
        }
    }
    out
}

fn run_matmul(op: &MatMul, a: Tensor, b: Tensor) -> Tensor {
    op.eval(&[Some(&a.into()), Some(&b.into())])
        .unwrap()
        .remove(0)
        .into_tensor()
        .unwrap()
}

#[test]
fn matmul_shapes_and_values() {
    let cases: &[(&[usize], &[usize], &[usize])] = &[
        (&[3, 5], &[5, 7], &[3, 7]),
        (&[2, 3, 5], &[5, 7], &[2, 3, 7]),
        (&[2, 1, 3, 5], &[4, 5, 7], &[2, 4, 3, 7]),
        (&[5], &[2, 5, 7], &[2, 7]),
        (&[2, 3, 5], &[5], &[2, 3]),
        (&[5], &[5], &[]),
        (&[1, 3, 5], &[2, 5, 4], &[2, 3, 4]),
        (&[2, 64, 40], &[40, 70], &[2, 64, 70]),
        (&[3, 0, 5], &[5, 2], &[3, 0, 2]),
    ];
    let mut r = Lcg(3);
    for (sa, sb, so) in cases {
        let a = r.vec(sa.iter().product());
        let b = r.vec(sb.iter().product());
        let plan = matmul_plan("MatMul", sa, sb).unwrap();
        assert_eq!(plan.out_shape.as_slice(), &so[..]);
        let got = run_matmul(
            &MatMul {
                act: Activation::None,
            },
            Tensor::from_vec(sa, a.clone()).unwrap(),
            Tensor::from_vec(sb, b.clone()).unwrap(),
        );
        assert_eq!(got.shape(), *so);
        assert!(
            max_diff(got.as_slice::<f32>().unwrap(), &naive(&a, &b, &plan)) < 1e-4,
            "{sa:?} {sb:?}"
        );
        let da: Vec<Dim> = sa.iter().map(|&d| Dim::Known(d)).collect();
        let db: Vec<Dim> = sb.iter().map(|&d| Dim::Known(d)).collect();
        assert_eq!(
            Fact::tensor(DType::F32, matmul_dims("MatMul", &da, &db).unwrap())
                .concrete_shape()
                .unwrap(),
            so.to_vec()
        );
    }
    assert!(matmul_plan("MatMul", &[2, 3], &[4, 5]).is_err());
    assert!(matmul_plan("MatMul", &[2, 2, 3], &[3, 3, 5]).is_err());
}

#[test]
fn matmul_ints_wrap_and_fused_relu() {
    let a = Tensor::from_vec(&[1, 2], vec![i64::MAX, 2]).unwrap();
    let b = Tensor::from_vec(&[2, 1], vec![2i64, 3]).unwrap();
    let y = run_matmul(
        &MatMul {
            act: Activation::None,
        },
        a,
        b,
    );
    assert_eq!(
        y.as_slice::<i64>().unwrap(),
        &[i64::MAX.wrapping_mul(2).wrapping_add(6)]
    );
    let a = Tensor::from_vec(&[2, 2], vec![1.0f32, -2.0, 3.0, 4.0]).unwrap();
    let b = Tensor::from_vec(&[2, 2], vec![1.0f32, 0.0, 0.0, 1.0]).unwrap();
    let y = run_matmul(
        &MatMul {
            act: Activation::Relu,
        },
        a.clone(),
        b.clone(),
    );
    assert_eq!(y.as_slice::<f32>().unwrap(), &[1.0, 0.0, 3.0, 4.0]);
    let y = run_matmul(
        &MatMul {
            act: Activation::None,
        },
        a.cast(DType::F16).unwrap(),
        b.cast(DType::F16).unwrap(),
    );
    assert_eq!(y.to_f32_vec().unwrap(), vec![1.0, -2.0, 3.0, 4.0]);
    // eval_into writes the slot
    let op = MatMul {
        act: Activation::None,
    };
    let mut bytes = vec![0u8; 16];
    let mut slots = [TensorMut::new(DType::F32, &[2, 2], &mut bytes).unwrap()];
    op.eval_into(&[Some(&a.into()), Some(&b.into())], &mut slots)
        .unwrap();
    assert_eq!(
        bytemuck::cast_slice::<u8, f32>(&bytes),
        &[1.0, -2.0, 3.0, 4.0]
    );
}

fn gemm_op(alpha: f32, beta: f32, ta: bool, tb: bool) -> Gemm {
    Gemm {
        alpha,
        beta,
        trans_a: ta,
        trans_b: tb,
        no_broadcast: false,
        act: Activation::None,
    }
}

#[test]
fn gemm_matches_naive() {
    let mut r = Lcg(5);
    let (m, k, n) = (5, 7, 3);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        for cshape in [vec![], vec![1], vec![n], vec![m, 1], vec![m, n], vec![1, n]] {
            let a = r.vec(m * k);
            let b = r.vec(k * n);
            let c = r.vec(cshape.iter().product());
            let at = Tensor::from_vec(&if ta { [k, m] } else { [m, k] }, a.clone()).unwrap();
            let bt = Tensor::from_vec(&if tb { [n, k] } else { [k, n] }, b.clone()).unwrap();
            let ct = Tensor::from_vec(&cshape, c.clone()).unwrap();
            let op = gemm_op(0.5, 2.0, ta, tb);
            let y = op
                .eval(&[Some(&at.into()), Some(&bt.into()), Some(&ct.into())])
                .unwrap()
                .remove(0)
                .into_tensor()
                .unwrap();
            let mut want = vec![];
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0;
                    for l in 0..k {
                        let av = if ta { a[l * m + i] } else { a[i * k + l] };
                        let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                        s += av * bv;
                    }
                    let cv = match cshape.len() {
                        0 => c[0],
                        1 => c[if cshape[0] == 1 { 0 } else { j }],
                        _ => {
                            c[(if cshape[0] == 1 { 0 } else { i }) * cshape[1]
                                + if cshape[1] == 1 { 0 } else { j }]
                        }
                    };
                    want.push(0.5 * s + 2.0 * cv);
                }
            }
            assert!(max_diff(y.as_slice::<f32>().unwrap(), &want) < 1e-4);
        }
    }
}

#[test]
fn gemm_ints_no_c_and_errors() {
    let a = Tensor::from_vec(&[2, 2], vec![1i32, 2, 3, 4]).unwrap();
    let b = Tensor::from_vec(&[2, 2], vec![5i32, 6, 7, 8]).unwrap();
    let c = Tensor::from_vec(&[2], vec![1i32, -1]).unwrap();
    let y = gemm_op(1.0, 1.0, false, false)
        .eval(&[
            Some(&a.clone().into()),
            Some(&b.clone().into()),
            Some(&c.into()),
        ])
        .unwrap()
        .remove(0)
        .into_tensor()
        .unwrap();
    assert_eq!(y.as_slice::<i32>().unwrap(), &[20, 21, 44, 49]);
    let y = gemm_op(1.0, 1.0, false, false)
        .eval(&[Some(&a.clone().into()), Some(&b.clone().into())])
        .unwrap()
        .remove(0)
        .into_tensor()
        .unwrap();
    assert_eq!(y.as_slice::<i32>().unwrap(), &[19, 22, 43, 50]);
    let bad = Tensor::from_vec(&[3], vec![1i32, 2, 3]).unwrap();
    assert!(gemm_op(1.0, 1.0, false, false)
        .eval(&[Some(&a.clone().into()), Some(&b.into()), Some(&bad.into())])
        .is_err());
    let v = Tensor::from_vec(&[4], vec![1i32, 2, 3, 4]).unwrap();
    assert!(gemm_op(1.0, 1.0, false, false)
        .eval(&[Some(&a.into()), Some(&v.into())])
        .is_err());
}

/// Gemm and MatMul with a fused activation (applied in the kernels' epilogue) and every C
/// broadcast (per column and per row: the epilogue's biases; full and scalar: written then
/// accumulated onto), on the packed, narrow and few-rows paths, depth split in blocks.
#[test]
fn fused_activation_and_c_match_naive_then_activation() {
    let acts = [
        Activation::Relu,
        Activation::HardSwish,
        Activation::LeakyRelu { alpha: 0.2 },
        Activation::Sigmoid,
        Activation::Clip {
            min: -0.5,
            max: 0.5,
        },
    ];
    let mut r = Lcg(77);
    for (si, &(m, k, n)) in [(37, 300, 45), (3, 20, 50), (20, 9, 5), (9, 600, 33)]
        .iter()
        .enumerate()
    {
        for (ci, cshape) in [vec![], vec![n], vec![1, n], vec![m, 1], vec![m, n], vec![1]]
            .into_iter()
            .enumerate()
        {
            let act = acts[(si + ci) % acts.len()];
            let beta = if ci % 2 == 0 { 1.0 } else { 2.0 };
            let (ta, tb) = (ci % 3 == 1, si % 2 == 1);
            let a = r.vec(m * k);
            let b = r.vec(k * n);
            let c = r.vec(cshape.iter().product());
            let at = Tensor::from_vec(&if ta { [k, m] } else { [m, k] }, a.clone()).unwrap();
            let bt = Tensor::from_vec(&if tb { [n, k] } else { [k, n] }, b.clone()).unwrap();
            let ct = Tensor::from_vec(&cshape, c.clone()).unwrap();
            let op = Gemm {
                act,
                ..gemm_op(0.5, beta, ta, tb)
            };
            let y = op
                .eval(&[Some(&at.into()), Some(&bt.into()), Some(&ct.into())])
                .unwrap()
                .remove(0)
                .into_tensor()
                .unwrap();
            let mut want = vec![];
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0f64;
                    for l in 0..k {
                        let av = if ta { a[l * m + i] } else { a[i * k + l] };
                        let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                        s += av as f64 * bv as f64;
                    }
                    let cv = match cshape.len() {
                        0 => c[0],
                        1 => c[if cshape[0] == 1 { 0 } else { j }],
                        _ => {
                            c[(if cshape[0] == 1 { 0 } else { i }) * cshape[1]
                                + if cshape[1] == 1 { 0 } else { j }]
                        }
                    };
                    want.push(act.apply(0.5 * s as f32 + beta * cv));
                }
            }
            let d = max_diff(y.as_slice::<f32>().unwrap(), &want);
            assert!(d < 1e-4, "{m}x{k}x{n} C {cshape:?} {act:?}: diff {d}");
        }
        let act = acts[si % acts.len()];
        let (sa, sb) = ([2, m, k], [k, n]);
        let a = r.vec(2 * m * k);
        let b = r.vec(k * n);
        let plan = matmul_plan("MatMul", &sa, &sb).unwrap();
        let want: Vec<f32> = naive(&a, &b, &plan).iter().map(|&v| act.apply(v)).collect();
        let op = MatMul { act };
        let (ta, tb) = (
            Tensor::from_vec(&sa, a).unwrap(),
            Tensor::from_vec(&sb, b).unwrap(),
        );
        let got = run_matmul(&op, ta.clone(), tb.clone());
        assert!(max_diff(got.as_slice::<f32>().unwrap(), &want) < 1e-4);
        let mut bytes = vec![0u8; want.len() * 4];
        let out_shape = [2, m, n];
        let mut slots = [TensorMut::new(DType::F32, &out_shape, &mut bytes).unwrap()];
        op.eval_into(&[Some(&ta.into()), Some(&tb.into())], &mut slots)
            .unwrap();
        let d = max_diff(bytemuck::cast_slice::<u8, f32>(&bytes), &want);
        assert!(d < 1e-4, "MatMul {m}x{k}x{n} {act:?}: diff {d}");
    }
}
