//! `RoiAlign` (opsets 10, 16) and `Col2Im` (opset 18).

use kiln_core::{
    input_tensor, BuildCtx, Dim, Fact, KilnError, Op, OpRegistry, Result, Tensor, Value,
};

/// Registers `RoiAlign` and `Col2Im`.
pub fn register(reg: &mut OpRegistry) {
    reg.register("RoiAlign", build_roi_align);
    reg.register("Col2Im", build_col2im);
}

/// `RoiAlign`.
#[derive(Debug, Clone)]
pub struct RoiAlign {
    /// Max pooling instead of average.
    pub max: bool,
    /// Shift pixel coordinates by −0.5 (opset 16's default `half_pixel`).
    pub half_pixel: bool,
    /// Output height.
    pub out_h: usize,
    /// Output width.
    pub out_w: usize,
    /// Sampling points per bin (0: adaptive).
    pub sampling_ratio: i64,
    /// Scale from roi coordinates to input pixels.
    pub spatial_scale: f64,
}

fn build_roi_align(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let max = match a.string("mode", "avg")?.to_ascii_lowercase().as_str() {
        "avg" => false,
        "max" => true,
        other => return Err(a.invalid(format!("mode must be avg or max, got {other:?}"))),
    };
    let default_ctm = if ctx.opset() >= 16 {
        "half_pixel"
    } else {
        "output_half_pixel"
    };
    let half_pixel = match a
        .string("coordinate_transformation_mode", default_ctm)?
        .as_str()
    {
        "half_pixel" => true,
        "output_half_pixel" => false,
        other => return Err(a.invalid(format!("unknown coordinate_transformation_mode {other:?}"))),
    };
    let out_h = a.int("output_height", 1)?;
    let out_w = a.int("output_width", 1)?;
    if !(1..1 << 20).contains(&out_h) || !(1..1 << 20).contains(&out_w) {
        return Err(a.invalid(format!(
            "output_height/output_width must be positive, got {out_h}x{out_w}"
        )));
    }
    let sampling_ratio = a.int("sampling_ratio", 0)?;
    if sampling_ratio < 0 {
        return Err(a.invalid(format!("sampling_ratio must be ≥ 0, got {sampling_ratio}")));
    }
    Ok(Box::new(RoiAlign {
        max,
        half_pixel,
        out_h: out_h as usize,
        out_w: out_w as usize,
        sampling_ratio,
        spatial_scale: a.float("spatial_scale", 1.0)? as f64,
    }))
}

/// Bilinear sample positions and weights of one sampling point.
#[derive(Clone, Copy, Default)]
struct Sample {
    pos: [usize; 4],
    w: [f64; 4],
}

fn sample_at(y: f64, x: f64, h: usize, w: usize) -> Sample {
    let (hf, wf) = (h as f64, w as f64);
    if y < -1.0 || y > hf || x < -1.0 || x > wf {
        return Sample::default();
    }
    let (mut y, mut x) = (y.max(0.0), x.max(0.0));
    let mut y_low = y as usize;
    let mut x_low = x as usize;
    let y_high;
    let x_high;
    if y_low >= h - 1 {
        y_low = h - 1;
        y_high = h - 1;
        y = y_low as f64;
    } else {
        y_high = y_low + 1;
    }
    if x_low >= w - 1 {
        x_low = w - 1;
        x_high = w - 1;
        x = x_low as f64;
    } else {
        x_high = x_low + 1;
    }
    let (ly, lx) = (y - y_low as f64, x - x_low as f64);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    Sample {
        pos: [
            y_low * w + x_low,
            y_low * w + x_high,
            y_high * w + x_low,
            y_high * w + x_high,
        ],
        w: [hy * hx, hy * lx, ly * hx, ly * lx],
    }
}

impl RoiAlign {
    fn run(&self, x: &Tensor, rois: &Tensor, batch: &Tensor) -> Result<Tensor> {
        let err = |m: String| KilnError::kernel("RoiAlign", m);
        let xs = x.shape();
        if xs.len() != 4 {
            return Err(err(format!("X must have rank 4, found {xs:?}")));
        }
        let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
        let num_rois = batch.len();
        if batch.rank() != 1 || rois.shape() != [num_rois, 4] {
            return Err(err(format!(
                "rois must be [num_rois, 4] and batch_indices [num_rois], found {:?} and {:?}",
                rois.shape(),
                batch.shape()
            )));
        }
        let (ph_n, pw_n) = (self.out_h, self.out_w);
        let out_shape = [num_rois, c, ph_n, pw_n];
        if num_rois * c == 0 {
            return Ok(Tensor::zeros(x.dtype(), &out_shape));
        }
        if h == 0 || w == 0 {
            return Err(err("X has an empty spatial dimension".into()));
        }
        let xv = x.to_f64_vec()?;
        let rv = rois.to_f64_vec()?;
        let bv = batch.to_i64_vec()?;
        let mut out = vec![0.0f64; num_rois * c * ph_n * pw_n];
        let plane = ph_n * pw_n;
        crate::parallel::try_for_each_chunk_mut(&mut out, c * plane, |r, dst| {
            let b = bv[r];
            if b < 0 || b as usize >= n {
                return Err(err(format!("batch index {b} is out of range [0, {n})")));
            }
            let off = if self.half_pixel { 0.5 } else { 0.0 };
            let roi = &rv[r * 4..r * 4 + 4];
            let (sw, sh) = (
                roi[0] * self.spatial_scale - off,
                roi[1] * self.spatial_scale - off,
            );
            let (ew, eh) = (
                roi[2] * self.spatial_scale - off,
                roi[3] * self.spatial_scale - off,
            );
            let (mut rw, mut rh) = (ew - sw, eh - sh);
            if !self.half_pixel {
                rw = rw.max(1.0);
                rh = rh.max(1.0);
            }
            let (bh, bw) = (rh / ph_n as f64, rw / pw_n as f64);
            let grid = |v: f64, p: usize| -> usize {
                if self.sampling_ratio > 0 {
                    self.sampling_ratio as usize
                } else {
                    (v / p as f64).ceil().clamp(0.0, 1e6) as usize
                }
            };
            let (gh, gw) = (grid(rh, ph_n), grid(rw, pw_n));
            let count = (gh * gw).max(1) as f64;
            let mut samples = Vec::with_capacity(plane * gh * gw);
            for ph in 0..ph_n {
                for pw in 0..pw_n {
                    for iy in 0..gh {
                        let yy = sh + ph as f64 * bh + (iy as f64 + 0.5) * bh / gh as f64;
                        for ix in 0..gw {
                            let xx = sw + pw as f64 * bw + (ix as f64 + 0.5) * bw / gw as f64;
                            samples.push(sample_at(yy, xx, h, w));
                        }
                    }
                }
            }
            let per = gh * gw;
            for (ch, d) in dst.chunks_mut(plane).enumerate() {
                let src = &xv[(b as usize * c + ch) * h * w..(b as usize * c + ch + 1) * h * w];
                for (p, v) in d.iter_mut().enumerate() {
                    let ss = &samples[p * per..(p + 1) * per];
                    if self.max {
                        let mut acc: Option<f64> = None;
                        for s in ss {
                            let m = (0..4)
                                .map(|k| s.w[k] * src[s.pos[k]])
                                .fold(f64::NEG_INFINITY, f64::max);
                            acc = Some(acc.map_or(m, |a| a.max(m)));
                        }
                        *v = acc.unwrap_or(0.0);
                    } else {
                        let sum: f64 = ss
                            .iter()
                            .map(|s| (0..4).map(|k| s.w[k] * src[s.pos[k]]).sum::<f64>())
                            .sum();
                        *v = sum / count;
                    }
                }
            }
            Ok(())
        })?;
        Tensor::from_vec(&out_shape, out)?.cast(x.dtype())
    }
}

impl Op for RoiAlign {
    fn op_type(&self) -> &str {
        "RoiAlign"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let dtype = match x.and_then(|f| f.dtype) {
            Some(d) => d,
            None => return Ok(vec![Fact::unknown()]),
        };
        let c = x
            .and_then(|f| f.shape.as_ref())
            .and_then(|s| s.get(1).cloned())
            .unwrap_or(Dim::Unknown);
        let r = inputs
            .get(2)
            .copied()
            .flatten()
            .and_then(|f| f.shape.as_ref())
            .and_then(|s| s.first().cloned())
            .unwrap_or(Dim::Unknown);
        Ok(vec![Fact::tensor(
            dtype,
            vec![r, c, Dim::Known(self.out_h), Dim::Known(self.out_w)],
        )])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "RoiAlign")?;
        let rois = input_tensor(inputs, 1, "RoiAlign")?;
        let batch = input_tensor(inputs, 2, "RoiAlign")?;
        if !x.dtype().is_float() || !rois.dtype().is_float() {
            return Err(KilnError::kernel(
                "RoiAlign",
                "X and rois must be float tensors",
            ));
        }
        Ok(vec![Value::Tensor(self.run(x, rois, batch)?)])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// `Col2Im`: rearranges column blocks back into a (multi-dimensional) image, summing overlaps.
#[derive(Debug, Clone)]
pub struct Col2Im {
    dilations: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
    strides: Option<Vec<i64>>,
}

fn build_col2im(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    Ok(Box::new(Col2Im {
        dilations: a.opt_ints("dilations")?,
        pads: a.opt_ints("pads")?,
        strides: a.opt_ints("strides")?,
    }))
}

impl Col2Im {
    fn run(&self, x: &Tensor, image: &[i64], block: &[i64]) -> Result<Tensor> {
        let err = |m: String| KilnError::kernel("Col2Im", m);
        let r = image.len();
        if r == 0 || block.len() != r {
            return Err(err(format!("image_shape {image:?} and block_shape {block:?} must have the same non-zero length")));
        }
        let attr = |v: &Option<Vec<i64>>, n: usize, d: i64, name: &str| -> Result<Vec<i64>> {
            match v {
                None => Ok(vec![d; n]),
                Some(v) if v.len() == n => Ok(v.clone()),
                Some(v) => Err(err(format!("{name} must have {n} values, got {v:?}"))),
            }
        };
        let dil = attr(&self.dilations, r, 1, "dilations")?;
        let pads = attr(&self.pads, 2 * r, 0, "pads")?;
        let strides = attr(&self.strides, r, 1, "strides")?;
        let big = 1i64 << 31;
        let ok = |v: &[i64], lo: i64| v.iter().all(|&x| x >= lo && x < big);
        if !ok(image, 0) || !ok(block, 1) || !ok(&dil, 1) || !ok(&strides, 1) || !ok(&pads, 0) {
            return Err(err(
                "image_shape, block_shape, dilations, strides and pads are out of range".into(),
            ));
        }
        let xs = x.shape();
        if xs.len() != 3 {
            return Err(err(format!("input must have rank 3, found {xs:?}")));
        }
        let k: i64 = block.iter().product();
        if k == 0 || xs[1] as i64 % k != 0 {
            return Err(err(format!(
                "input dim 1 ({}) must be a multiple of prod(block_shape) = {k}",
                xs[1]
            )));
        }
        let (n, c) = (xs[0], xs[1] / k as usize);
        let mut ncols = Vec::with_capacity(r);
        for i in 0..r {
            let v = (image[i] + pads[i] + pads[r + i] - dil[i] * (block[i] - 1) - 1)
                .div_euclid(strides[i])
                + 1;
            if v < 1 {
                return Err(err(format!("no sliding block fits along axis {i}")));
            }
            ncols.push(v as usize);
        }
        let l: usize = ncols.iter().product();
        if xs[2] != l {
            return Err(err(format!(
                "input dim 2 is {}, but the blocks give {l}",
                xs[2]
            )));
        }
        let img: Vec<usize> = image.iter().map(|&v| v as usize).collect();
        let img_size: usize = img.iter().product();
        let mut out_shape = vec![n, c];
        out_shape.extend_from_slice(&img);
        let xv = x.to_f64_vec()?;
        let mut out = vec![0.0f64; n * c * img_size];
        let kshape: Vec<usize> = block.iter().map(|&v| v as usize).collect();
        let kst = kiln_core::strides(&kshape);
        let lst = kiln_core::strides(&ncols);
        let ist = kiln_core::strides(&img);
        let ku = k as usize;
        crate::parallel::try_for_each_chunk_mut(&mut out, img_size.max(1), |nc, dst| {
            let (b, ch) = (nc / c, nc % c);
            for kk in 0..ku {
                let src = &xv[(b * c * ku + ch * ku + kk) * l..(b * c * ku + ch * ku + kk + 1) * l];
                for (li, &v) in src.iter().enumerate() {
                    let mut pos = 0usize;
                    let mut inside = true;
                    for ax in 0..r {
                        let ko = (kk / kst[ax]) % kshape[ax];
                        let lo = (li / lst[ax]) % ncols[ax];
                        let p = lo as i64 * strides[ax] - pads[ax] + ko as i64 * dil[ax];
                        if p < 0 || p >= image[ax] {
                            inside = false;
                            break;
                        }
                        pos += p as usize * ist[ax];
                    }
                    if inside {
                        dst[pos] += v;
                    }
                }
            }
            Ok::<(), KilnError>(())
        })?;
        Tensor::from_vec(&out_shape, out)?.cast(x.dtype())
    }
}

impl Op for Col2Im {
    fn op_type(&self) -> &str {
        "Col2Im"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let dtype = match x.and_then(|f| f.dtype) {
            Some(d) => d,
            None => return Ok(vec![Fact::unknown()]),
        };
        let image = inputs
            .get(1)
            .copied()
            .flatten()
            .and_then(|f| f.konst.as_ref())
            .and_then(|t| t.to_i64_vec().ok());
        let block = inputs
            .get(2)
            .copied()
            .flatten()
            .and_then(|f| f.konst.as_ref())
            .and_then(|t| t.to_i64_vec().ok());
        let xs = x.and_then(|f| f.shape.as_ref());
        match (image, xs) {
            (Some(img), Some(xs)) if xs.len() == 3 && img.iter().all(|&v| v >= 0) => {
                let c = match (&xs[1], block.map(|b| b.iter().product::<i64>())) {
                    (Dim::Known(v), Some(k)) if k > 0 => Dim::Known(*v / k as usize),
                    _ => Dim::Unknown,
                };
                let mut s = vec![xs[0].clone(), c];
                s.extend(img.iter().map(|&v| Dim::Known(v as usize)));
                Ok(vec![Fact::tensor(dtype, s)])
            }
            _ => Ok(vec![Fact::of_dtype(dtype)]),
        }
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "Col2Im")?;
        let image = input_tensor(inputs, 1, "Col2Im")?.to_i64_vec()?;
        let block = input_tensor(inputs, 2, "Col2Im")?.to_i64_vec()?;
        if x.dtype() == kiln_core::DType::String {
            return Err(KilnError::kernel("Col2Im", "string input"));
        }
        Ok(vec![Value::Tensor(self.run(x, &image, &block)?)])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn col2im_matches_onnx_example() {
        // ONNX test_col2im: input 1x5x5 (values 1..25), image 5x4, block 1x5.
        let x = Tensor::from_vec(&[1, 5, 5], (1..=25).map(|v| v as f32).collect()).unwrap();
        let op = Col2Im {
            dilations: None,
            pads: None,
            strides: None,
        };
        let y = op.run(&x, &[5, 5], &[1, 5]).unwrap();
        assert_eq!(y.shape(), &[1, 1, 5, 5]);
        let v = y.to_f32_vec().unwrap();
        // Block column l, kernel row k → image (l, k): value = k*5 + l + 1.
        for i in 0..5 {
            for j in 0..5 {
                assert_eq!(v[i * 5 + j], (j * 5 + i + 1) as f32);
            }
        }
        assert!(op.run(&x, &[5, 5], &[2, 5]).is_err());
    }

    #[test]
    fn col2im_overlaps_sum() {
        // 1-D: image 4, block 2, stride 1 → 3 columns; ones everywhere.
        let x = Tensor::from_vec(&[1, 2, 3], vec![1.0f32; 6]).unwrap();
        let op = Col2Im {
            dilations: None,
            pads: None,
            strides: None,
        };
        let y = op.run(&x, &[4], &[2]).unwrap();
        assert_eq!(y.to_f32_vec().unwrap(), [1.0, 2.0, 2.0, 1.0]);
    }

    #[test]
    fn roi_align_avg_constant_and_max() {
        let x = Tensor::from_vec(&[1, 2, 4, 4], vec![3.0f32; 32]).unwrap();
        let rois = Tensor::from_vec(&[1, 4], vec![0.0f32, 0.0, 3.0, 3.0]).unwrap();
        let b = Tensor::from_vec(&[1], vec![0i64]).unwrap();
        let op = RoiAlign {
            max: false,
            half_pixel: true,
            out_h: 2,
            out_w: 2,
            sampling_ratio: 2,
            spatial_scale: 1.0,
        };
        let y = op.run(&x, &rois, &b).unwrap();
        assert_eq!(y.shape(), &[1, 2, 2, 2]);
        for v in y.to_f32_vec().unwrap() {
            assert!((v - 3.0).abs() < 1e-6);
        }
        let bad = Tensor::from_vec(&[1], vec![5i64]).unwrap();
        assert!(op.run(&x, &rois, &bad).is_err());
    }
}
