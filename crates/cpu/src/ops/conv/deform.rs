//! DeformConv (opset 19), 2-D: bilinearly sampled, optionally masked columns (one per
//! input channel and kernel tap), then one GEMM per group.

use kiln_core::{input_tensor, optional_tensor, BuildCtx, Fact, KilnError, Op, Result, Value};

use super::geom::WindowAttrs;
use super::{conv_geometry, infer_conv_like, out_shape};
use crate::ops::linalg::blas::{self, MatRef};
use crate::ops::linalg::{as_f32, from_f32};

/// ONNX DeformConv.
#[derive(Debug, Clone)]
pub struct DeformConv {
    win: WindowAttrs,
    group: usize,
    offset_group: usize,
}

/// Builds DeformConv.
pub fn build_deform_conv(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let pos = |name: &str| -> Result<usize> {
        usize::try_from(a.int(name, 1)?)
            .ok()
            .filter(|&g| g > 0)
            .ok_or_else(|| a.invalid(format!("{name} must be positive")))
    };
    let mut win = WindowAttrs::parse(&a)?;
    win.ceil_mode = false;
    Ok(Box::new(DeformConv {
        win,
        group: pos("group")?,
        offset_group: pos("offset_group")?,
    }))
}

/// Bilinear sample of a plane at real coordinates, zero outside.
#[inline]
fn bilinear(plane: &[f32], h: usize, w: usize, y: f32, x: f32) -> f32 {
    let (y0, x0) = (y.floor(), x.floor());
    let (fy, fx) = (y - y0, x - x0);
    let (y0, x0) = (y0 as i64, x0 as i64);
    let at = |yy: i64, xx: i64| -> f32 {
        if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
            plane[yy as usize * w + xx as usize]
        } else {
            0.0
        }
    };
    at(y0, x0) * (1.0 - fy) * (1.0 - fx)
        + at(y0, x0 + 1) * (1.0 - fy) * fx
        + at(y0 + 1, x0) * fy * (1.0 - fx)
        + at(y0 + 1, x0 + 1) * fy * fx
}

impl Op for DeformConv {
    fn op_type(&self) -> &str {
        "DeformConv"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        Ok(vec![infer_conv_like(
            "DeformConv",
            &self.win,
            x,
            inputs.get(1).copied().flatten(),
            x.and_then(|f| f.dtype),
        )?])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "DeformConv";
        let x = input_tensor(inputs, 0, op)?;
        let w = input_tensor(inputs, 1, op)?;
        let offset = input_tensor(inputs, 2, op)?;
        let b = optional_tensor(inputs, 3, op)?;
        let mask = optional_tensor(inputs, 4, op)?;
        if !x.dtype().is_float() {
            return Err(KilnError::kernel(
                op,
                format!("X must be a float tensor, found {}", x.dtype()),
            ));
        }
        if x.rank() != 4 {
            return Err(KilnError::kernel(
                op,
                format!("only 2-D DeformConv is supported, X is {:?}", x.shape()),
            ));
        }
        let (dims, sp) = conv_geometry(op, &self.win, self.group, x.shape(), w.shape())?;
        let (n, c, m, og) = (dims.n, dims.c, dims.m, self.offset_group);
        let (ih, iw) = (sp.input[0], sp.input[1]);
        let (kh, kw) = (sp.kernel[0], sp.kernel[1]);
        let (oh, ow) = (sp.output[0], sp.output[1]);
        let ksz = kh * kw;
        let p = oh * ow;
        if c % og != 0 {
            return Err(KilnError::kernel(
                op,
                format!("{c} channels do not split into offset_group {og}"),
            ));
        }
        if offset.shape() != [n, og * ksz * 2, oh, ow] {
            return Err(KilnError::kernel(
                op,
                format!(
                    "offset must be [{n}, {}, {oh}, {ow}], found {:?}",
                    og * ksz * 2,
                    offset.shape()
                ),
            ));
        }
        if mask.is_some_and(|mk| mk.shape() != [n, og * ksz, oh, ow]) {
            return Err(KilnError::kernel(
                op,
                format!("mask must be [{n}, {}, {oh}, {ow}]", og * ksz),
            ));
        }
        if b.is_some_and(|b| b.shape() != [m]) {
            return Err(KilnError::kernel(op, format!("B must have shape [{m}]")));
        }
        let (xv, wv, ov) = (as_f32(x)?, as_f32(w)?, as_f32(offset)?);
        let mv = mask.map(as_f32).transpose()?;
        let bv = b.map(as_f32).transpose()?;
        let (cg, mg) = (c / dims.group, m / dims.group);
        let cpo = c / og;
        let mut out = vec![0.0f32; n * m * p];
        let mut col = vec![0.0f32; c * ksz * p];
        for bn in 0..n {
            for ci in 0..c {
                let g_off = ci / cpo;
                let plane = &xv[(bn * c + ci) * ih * iw..(bn * c + ci + 1) * ih * iw];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let k = ky * kw + kx;
                        let row = &mut col[(ci * ksz + k) * p..(ci * ksz + k + 1) * p];
                        let oc_h = ((bn * og + g_off) * ksz + k) * 2;
                        for i in 0..oh {
                            for j in 0..ow {
                                let q = i * ow + j;
                                let dy = ov[oc_h * p + q];
                                let dx = ov[(oc_h + 1) * p + q];
                                let y = (i * sp.strides[0] + ky * sp.dilations[0]) as f32
                                    - sp.pad_begin[0] as f32
                                    + dy;
                                let xx = (j * sp.strides[1] + kx * sp.dilations[1]) as f32
                                    - sp.pad_begin[1] as f32
                                    + dx;
                                let mk = mv
                                    .as_ref()
                                    .map_or(1.0, |mv| mv[((bn * og + g_off) * ksz + k) * p + q]);
                                row[q] = mk * bilinear(plane, ih, iw, y, xx);
                            }
                        }
                    }
                }
            }
            for g in 0..dims.group {
                let kk = cg * ksz;
                let dst = &mut out[(bn * m + g * mg) * p..(bn * m + (g + 1) * mg) * p];
                let wg = &wv[g * mg * kk..(g + 1) * mg * kk];
                blas::gemm(
                    mg,
                    p,
                    kk,
                    dst,
                    p,
                    false,
                    MatRef::row_major(wg, kk),
                    MatRef::row_major(&col[g * kk * p..(g + 1) * kk * p], p),
                    1.0,
                    false,
                )?;
                if let Some(bv) = &bv {
                    for (r, rowv) in dst.chunks_mut(p.max(1)).enumerate() {
                        rowv.iter_mut().for_each(|v| *v += bv[g * mg + r]);
                    }
                }
            }
        }
        Ok(vec![
            from_f32(x.dtype(), &out_shape(&dims, &sp), out)?.into()
        ])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::reference::conv_reference;
    use crate::ops::conv::test_util::{max_diff, Lcg};
    use kiln_core::Tensor;

    #[test]
    fn zero_offsets_equal_conv_and_shifts_interpolate() {
        let mut r = Lcg(3);
        let (xs, ws) = ([1usize, 4, 5, 6], [4usize, 2, 3, 3]);
        let x = r.vec(120);
        let w = r.vec(72);
        let win = WindowAttrs {
            pads: Some(vec![1, 1, 1, 1]),
            ..Default::default()
        };
        let op = DeformConv {
            win: win.clone(),
            group: 2,
            offset_group: 2,
        };
        let xv: Value = Tensor::from_vec(&xs, x.clone()).unwrap().into();
        let wv: Value = Tensor::from_vec(&ws, w.clone()).unwrap().into();
        let off: Value = Tensor::zeros(kiln_core::DType::F32, &[1, 2 * 9 * 2, 5, 6]).into();
        let y = op
            .eval(&[Some(&xv), Some(&wv), Some(&off)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        let (dims, sp) = conv_geometry("T", &win, 2, &xs, &ws).unwrap();
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let want: Vec<f32> = conv_reference(&f(&x), &f(&w), None, dims, &sp.to3("T").unwrap())
            .iter()
            .map(|&v| v as f32)
            .collect();
        assert!(max_diff(y.as_slice::<f32>().unwrap(), &want) < 1e-4);
        // half-pixel shift of a 1×1 kernel averages neighbours; mask scales
        let x: Value = Tensor::from_vec(&[1, 1, 1, 3], vec![0.0f32, 2.0, 4.0])
            .unwrap()
            .into();
        let w: Value = Tensor::from_vec(&[1, 1, 1, 1], vec![1.0f32])
            .unwrap()
            .into();
        let off: Value = Tensor::from_vec(&[1, 2, 1, 3], vec![0.0f32, 0.0, 0.0, 0.5, 0.5, 0.5])
            .unwrap()
            .into();
        let b: Value = Tensor::from_vec(&[1], vec![1.0f32]).unwrap().into();
        let mask: Value = Tensor::from_vec(&[1, 1, 1, 3], vec![1.0f32, 1.0, 0.5])
            .unwrap()
            .into();
        let op = DeformConv {
            win: WindowAttrs::default(),
            group: 1,
            offset_group: 1,
        };
        let y = op
            .eval(&[Some(&x), Some(&w), Some(&off), Some(&b), Some(&mask)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[2.0, 4.0, 2.0]);
        assert!(op.eval(&[Some(&x), Some(&w)]).is_err());
    }
}
