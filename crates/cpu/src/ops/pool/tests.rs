use super::*;
use crate::ops::conv::geom::AutoPad;
use crate::ops::conv::test_util::{max_diff, Lcg};

fn pool(kind: PoolKind, win: WindowAttrs, with_indices: bool) -> Pool {
    let name = match kind {
        PoolKind::Max { .. } => "MaxPool",
        PoolKind::Avg { .. } => "AveragePool",
        PoolKind::Lp { .. } => "LpPool",
    };
    let kernel = win.kernel_shape.clone().unwrap();
    Pool {
        name,
        kind,
        win,
        kernel,
        with_indices,
        geometry_cache: PlanCache::default(),
    }
}

/// Naive 2-D reference following ONNX's reference implementation.
fn naive2d(
    kind: PoolKind,
    x: &[f32],
    xs: &[usize],
    win: &WindowAttrs,
) -> (Vec<f32>, Vec<i64>, Vec<usize>) {
    let sp = win
        .resolve("T", &xs[2..], win.kernel_shape.as_ref().unwrap())
        .unwrap();
    let (h, w) = (xs[2], xs[3]);
    let mut y = vec![];
    let mut ind = vec![];
    for pl in 0..xs[0] * xs[1] {
        for oh in 0..sp.output[0] {
            for ow in 0..sp.output[1] {
                let mut vals = vec![];
                let mut best: Option<(f32, i64)> = None;
                let mut padded = 0;
                for kh in 0..sp.kernel[0] {
                    for kw in 0..sp.kernel[1] {
                        let ph = (oh * sp.strides[0] + kh * sp.dilations[0]) as i64
                            - sp.pad_begin[0] as i64;
                        let pw = (ow * sp.strides[1] + kw * sp.dilations[1]) as i64
                            - sp.pad_begin[1] as i64;
                        if ph < (h + sp.pad_end[0]) as i64 && pw < (w + sp.pad_end[1]) as i64 {
                            padded += 1;
                        }
                        if ph < 0 || pw < 0 || ph >= h as i64 || pw >= w as i64 {
                            continue;
                        }
                        let v = x[pl * h * w + ph as usize * w + pw as usize];
                        vals.push(v);
                        if best.is_none_or(|b| v > b.0) {
                            let local = match kind {
                                PoolKind::Max { storage_order: 1 } => ph as usize + pw as usize * h,
                                _ => ph as usize * w + pw as usize,
                            };
                            best = Some((v, (pl * h * w + local) as i64));
                        }
                    }
                }
                match kind {
                    PoolKind::Max { .. } => {
                        y.push(best.unwrap().0);
                        ind.push(best.unwrap().1);
                    }
                    PoolKind::Avg { count_include_pad } => {
                        let n = if count_include_pad {
                            padded
                        } else {
                            vals.len()
                        };
                        y.push(vals.iter().sum::<f32>() / n as f32);
                    }
                    PoolKind::Lp { p } => y.push(
                        vals.iter()
                            .map(|v| v.abs().powf(p))
                            .sum::<f32>()
                            .powf(1.0 / p),
                    ),
                }
            }
        }
    }
    let mut shape = xs[..2].to_vec();
    shape.extend(&sp.output);
    (y, ind, shape)
}

fn win(
    k: [usize; 2],
    pads: Option<Vec<usize>>,
    strides: Option<Vec<usize>>,
    dil: Option<Vec<usize>>,
    ceil: bool,
    ap: AutoPad,
) -> WindowAttrs {
    WindowAttrs {
        auto_pad: ap,
        kernel_shape: Some(k.to_vec()),
        strides,
        dilations: dil,
        pads,
        ceil_mode: ceil,
    }
}

#[test]
fn pools_match_naive_2d() {
    let wins = [
        win([3, 3], None, None, None, false, AutoPad::NotSet),
        win(
            [3, 2],
            Some(vec![1, 0, 2, 1]),
            Some(vec![2, 1]),
            None,
            false,
            AutoPad::NotSet,
        ),
        win([2, 2], None, Some(vec![2, 2]), None, true, AutoPad::NotSet),
        win(
            [3, 3],
            Some(vec![1, 1, 1, 1]),
            Some(vec![2, 2]),
            Some(vec![2, 1]),
            true,
            AutoPad::NotSet,
        ),
        win(
            [3, 3],
            None,
            Some(vec![2, 2]),
            None,
            false,
            AutoPad::SameUpper,
        ),
        win(
            [2, 3],
            None,
            Some(vec![2, 1]),
            None,
            false,
            AutoPad::SameLower,
        ),
        win([3, 3], None, Some(vec![2, 2]), None, false, AutoPad::Valid),
    ];
    let kinds = [
        PoolKind::Max { storage_order: 0 },
        PoolKind::Max { storage_order: 1 },
        PoolKind::Avg {
            count_include_pad: false,
        },
        PoolKind::Avg {
            count_include_pad: true,
        },
        PoolKind::Lp { p: 2.0 },
        PoolKind::Lp { p: 3.0 },
    ];
    let xs = [2, 3, 7, 13];
    let mut r = Lcg(77);
    let x = r.vec(xs.iter().product());
    let xt: Value = Tensor::from_vec(&xs, x.clone()).unwrap().into();
    for w in &wins {
        for &k in &kinds {
            let op = pool(k, w.clone(), true);
            let got = op.eval(&[Some(&xt)]).unwrap();
            let (want, ind, shape) = naive2d(k, &x, &xs, w);
            let y = got[0].as_tensor().unwrap();
            assert_eq!(y.shape(), shape.as_slice(), "{k:?} {w:?}");
            assert!(
                max_diff(y.as_slice::<f32>().unwrap(), &want) < 1e-5,
                "{k:?} {w:?}"
            );
            if let PoolKind::Max { .. } = k {
                assert_eq!(
                    got[1].as_tensor().unwrap().as_slice::<i64>().unwrap(),
                    ind.as_slice(),
                    "{k:?} {w:?}"
                );
                // Without the Indices output (its own path): the same values.
                let values_only = pool(k, w.clone(), false).eval(&[Some(&xt)]).unwrap();
                assert_eq!(values_only.len(), 1);
                assert_eq!(
                    values_only[0].as_tensor().unwrap().bytes(),
                    y.bytes(),
                    "{k:?} {w:?}"
                );
            }
            let f = op
                .infer(&[Some(&Fact::concrete(DType::F32, &xs))], 1)
                .unwrap();
            assert_eq!(f[0].concrete_shape().unwrap(), shape);
            // The in-place path (cached geometry) writes the same values and indices.
            let n: usize = shape.iter().product();
            let (mut yb, mut ib) = (vec![0xA5u8; n * 4], vec![0xA5u8; n * 8]);
            let mut slots = [
                TensorMut::new(DType::F32, &shape, &mut yb).unwrap(),
                TensorMut::new(DType::I64, &shape, &mut ib).unwrap(),
            ];
            let slots = if matches!(k, PoolKind::Max { .. }) {
                &mut slots[..]
            } else {
                &mut slots[..1]
            };
            op.eval_into(&[Some(&xt)], slots).unwrap();
            assert_eq!(yb.as_slice(), y.bytes(), "{k:?} {w:?}");
            if let PoolKind::Max { .. } = k {
                assert_eq!(ib.as_slice(), got[1].as_tensor().unwrap().bytes());
            }
        }
    }
}

#[test]
fn pool_1d_3d_and_int() {
    // 1-D max pool on u8 and 3-D average pool, checked by hand.
    let x: Value = Tensor::from_vec(&[1, 1, 5], vec![3u8, 9, 1, 4, 7])
        .unwrap()
        .into();
    let op = pool(
        PoolKind::Max { storage_order: 0 },
        WindowAttrs {
            kernel_shape: Some(vec![2]),
            strides: Some(vec![2]),
            ceil_mode: true,
            ..Default::default()
        },
        false,
    );
    let y = op.eval(&[Some(&x)]).unwrap();
    assert_eq!(y.len(), 1);
    assert_eq!(
        y[0].as_tensor().unwrap().as_slice::<u8>().unwrap(),
        &[9, 4, 7]
    );
    let x: Value = Tensor::from_vec(&[1, 1, 2, 2, 2], (1..=8).map(|v| v as f64).collect())
        .unwrap()
        .into();
    let op = pool(
        PoolKind::Avg {
            count_include_pad: false,
        },
        WindowAttrs {
            kernel_shape: Some(vec![2, 2, 2]),
            ..Default::default()
        },
        false,
    );
    let y = op.eval(&[Some(&x)]).unwrap();
    assert_eq!(y[0].as_tensor().unwrap().as_slice::<f64>().unwrap(), &[4.5]);
}

#[test]
fn global_pools() {
    let x: Value = Tensor::from_vec(
        &[1, 2, 2, 2],
        vec![1.0f32, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0],
    )
    .unwrap()
    .into();
    let run = |k| {
        GlobalPool { kind: k }
            .eval(&[Some(&x)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap()
    };
    let y = run(GlobalKind::Avg);
    assert_eq!(y.shape(), &[1, 2, 1, 1]);
    assert_eq!(y.as_slice::<f32>().unwrap(), &[2.5, -2.5]);
    assert_eq!(
        run(GlobalKind::Max).as_slice::<f32>().unwrap(),
        &[4.0, -1.0]
    );
    let l = run(GlobalKind::Lp(2.0));
    assert!((l.as_slice::<f32>().unwrap()[0] - 30f32.sqrt()).abs() < 1e-5);
}

/// The lane reductions against sequential f64 sums and maxima, on random planes of odd
/// sizes (shorter than, equal to and longer than the lane count), with a NaN planted in
/// one plane for GlobalMaxPool.
#[test]
fn global_pools_match_sequential_reference_on_odd_planes() {
    let mut r = Lcg(17);
    for &sz in &[1usize, 3, 7, 8, 9, 31, 49, 300, 1001] {
        let planes = 5;
        let mut data = r.vec(planes * sz);
        for (kind, exp) in [
            (GlobalKind::Avg, 0.0),
            (GlobalKind::Max, 0.0),
            (GlobalKind::Lp(1.0), 1.0),
            (GlobalKind::Lp(2.0), 2.0),
            (GlobalKind::Lp(3.0), 3.0),
        ] {
            let got = GlobalPool { kind }.reduce(&data, planes);
            for (pl, &g) in data.chunks(sz).zip(&got) {
                let want = match kind {
                    GlobalKind::Avg => pl.iter().map(|&v| v as f64).sum::<f64>() / sz as f64,
                    GlobalKind::Max => pl.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64)),
                    GlobalKind::Lp(_) => pl
                        .iter()
                        .map(|&v| (v as f64).abs().powf(exp))
                        .sum::<f64>()
                        .powf(1.0 / exp),
                };
                let tol = 1e-5 * (1.0 + want.abs());
                assert!(
                    (g as f64 - want).abs() <= tol,
                    "{kind:?} size {sz}: {g} vs {want}"
                );
            }
        }
        data[2 * sz + sz / 2] = f32::NAN;
        let got = GlobalPool {
            kind: GlobalKind::Max,
        }
        .reduce(&data, planes);
        assert!(got[2].is_nan(), "size {sz}: NaN not propagated");
        assert!(got[1].is_finite() && got[3].is_finite());
    }
}

#[test]
fn max_unpool_roundtrip() {
    let xs = [1, 2, 4, 4];
    let mut r = Lcg(5);
    let x: Value = Tensor::from_vec(&xs, r.vec(32)).unwrap().into();
    let mp = pool(
        PoolKind::Max { storage_order: 0 },
        win([2, 2], None, Some(vec![2, 2]), None, false, AutoPad::NotSet),
        true,
    );
    let out = mp.eval(&[Some(&x)]).unwrap();
    let up = MaxUnpool {
        kernel: vec![2, 2],
        strides: Some(vec![2, 2]),
        pads: None,
    };
    let y = up
        .eval(&[Some(&out[0]), Some(&out[1])])
        .unwrap()
        .remove(0)
        .into_tensor()
        .unwrap();
    assert_eq!(y.shape(), &[1, 2, 4, 4]);
    let nonzero = y
        .as_slice::<f32>()
        .unwrap()
        .iter()
        .filter(|v| **v != 0.0)
        .count();
    assert_eq!(nonzero, 8);
    let os: Value = Tensor::from_vec(&[4], vec![1i64, 2, 5, 5]).unwrap().into();
    let y2 = up
        .eval(&[Some(&out[0]), Some(&out[1]), Some(&os)])
        .unwrap()
        .remove(0)
        .into_tensor()
        .unwrap();
    assert_eq!(y2.shape(), &[1, 2, 5, 5]);
    assert_eq!(
        y2.as_slice::<f32>().unwrap()[..4],
        y.as_slice::<f32>().unwrap()[..4]
    );
    let bad: Value = Tensor::from_vec(&[1, 2, 2, 2], vec![1000i64; 8])
        .unwrap()
        .into();
    assert!(up.eval(&[Some(&out[0]), Some(&bad)]).is_err());
}

#[test]
fn pool_errors() {
    let x: Value = Tensor::from_vec(&[1, 1, 2, 2], vec![1.0f32; 4])
        .unwrap()
        .into();
    let op = pool(
        PoolKind::Max { storage_order: 0 },
        win([3, 3], None, None, None, false, AutoPad::NotSet),
        false,
    );
    assert!(op.eval(&[Some(&x)]).is_err());
    let op = pool(
        PoolKind::Avg {
            count_include_pad: false,
        },
        WindowAttrs {
            kernel_shape: Some(vec![2]),
            ..Default::default()
        },
        false,
    );
    assert!(op.eval(&[Some(&x)]).is_err());
    let xi: Value = Tensor::from_vec(&[1, 1, 2, 2], vec![1i32; 4])
        .unwrap()
        .into();
    let op = pool(
        PoolKind::Avg {
            count_include_pad: false,
        },
        win([2, 2], None, None, None, false, AutoPad::NotSet),
        false,
    );
    assert!(op.eval(&[Some(&xi)]).is_err());
}

/// The row-by-row max kernel equals the per-window visit (the op's reference loop) on
/// random data with NaNs, for 1-D/2-D/3-D windows with pads, strides, dilations, ceil mode
/// and windows that fall wholly in the padding.
#[test]
fn max_rows_equal_the_window_visit() {
    let cases: [(Vec<usize>, WindowAttrs); 6] = [
        (
            vec![2, 3, 7, 9],
            win([3, 3], None, None, None, false, AutoPad::NotSet),
        ),
        (
            vec![1, 2, 6, 11],
            win([2, 2], None, Some(vec![2, 2]), None, true, AutoPad::NotSet),
        ),
        (
            vec![1, 2, 5, 8],
            win(
                [3, 2],
                Some(vec![2, 1, 2, 1]),
                Some(vec![2, 3]),
                Some(vec![2, 1]),
                true,
                AutoPad::NotSet,
            ),
        ),
        (
            vec![1, 1, 4, 4],
            win(
                [3, 3],
                None,
                Some(vec![1, 2]),
                None,
                false,
                AutoPad::SameUpper,
            ),
        ),
        (
            vec![2, 3, 13],
            WindowAttrs {
                kernel_shape: Some(vec![4]),
                pads: Some(vec![3, 3]),
                strides: Some(vec![3]),
                ..Default::default()
            },
        ),
        (
            vec![1, 2, 3, 4, 5],
            WindowAttrs {
                kernel_shape: Some(vec![2, 3, 2]),
                pads: Some(vec![1, 0, 1, 1, 2, 0]),
                strides: Some(vec![1, 2, 2]),
                ceil_mode: true,
                ..Default::default()
            },
        ),
    ];
    for (ci, (xs, w)) in cases.iter().enumerate() {
        let p = pool(PoolKind::Max { storage_order: 0 }, w.clone(), false);
        let g = p.geometry(xs).unwrap();
        let mut r = Lcg(ci as u64 + 5);
        let isz = g.sp.in_size();
        let mut x = r.vec(isz);
        // NaNs first in some windows and later in others.
        for i in (0..isz).step_by(7) {
            x[i] = f32::NAN;
        }
        let mut want = vec![0.0f32; g.sp.out_size()];
        g.for_each_window(
            || (0.0f32, false),
            |acc, fi, _| {
                if !acc.1 || x[fi] > acc.0 {
                    *acc = (x[fi], true);
                }
            },
            |oi, acc, _, _| want[oi] = acc.0,
        );
        let mut got = vec![7.5f32; g.sp.out_size()];
        g.max_plane_rows(&x, &mut got);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits(),
                "case {ci} output {i}: rows {a} vs window visit {b}"
            );
        }
    }
}
