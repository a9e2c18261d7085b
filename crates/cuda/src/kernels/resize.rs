//! Resize in `nearest` and `linear` modes (any rank up to 6, every axis may scale), with the
//! coordinate transformations half_pixel, half_pixel_symmetric, pytorch_half_pixel,
//! align_corners, asymmetric and tf_half_pixel_for_nn, mirroring the CPU reference's tap
//! rule (coordinates in double). Cubic, antialias, tf_crop_and_resize and `axes` stay on the
//! CPU.

use kiln_core::DType;

use super::common::{
    ctype, grid_for, is_kernel_float, load, prelude, source, store, strides, KernelLayer, Params,
    Ptr, Step, BLOCK,
};
use super::LowerCx;

/// Most dims Resize handles here.
pub const MAX_RESIZE_RANK: usize = 6;

/// Source of the resize kernel.
pub fn resize_code(dt: DType) -> Option<String> {
    let t = ctype(dt)?;
    let r = MAX_RESIZE_RANK;
    Some(format!(
        "{pre}struct P {{ long long n; long long rank; long long ctm; long long linear; long long nearest; long long id[{r}]; long long od[{r}]; long long ist[{r}]; double scale[{r}]; }};\n\
extern \"C\" __global__ void kiln_resize(const {t}* __restrict__ x, {t}* __restrict__ y, const P p) {{\n\
  for (long long i = KILN_TID; i < p.n; i += KILN_STRIDE) {{\n\
    long long i0[{r}], i1[{r}]; double w0[{r}], w1[{r}];\n\
    long long rem = i;\n\
    for (int d = (int)p.rank - 1; d >= 0; --d) {{\n\
      long long o = rem % p.od[d]; rem /= p.od[d];\n\
      double xo = (double)o, s = p.scale[d], inw = (double)p.id[d], outw = s * inw, xi;\n\
      switch (p.ctm) {{\n\
        case 0: xi = (xo + 0.5) / s - 0.5; break;\n\
        case 1: {{ double adj = (double)p.od[d] / outw; double off = inw / 2.0 * (1.0 - adj); xi = off + (xo + 0.5) / s - 0.5; }} break;\n\
        case 2: xi = (outw == 1.0) ? -0.5 : (xo + 0.5) / s - 0.5; break;\n\
        case 3: xi = (outw == 1.0) ? 0.0 : xo * (inw - 1.0) / (outw - 1.0); break;\n\
        case 4: xi = xo / s; break;\n\
        default: xi = (xo + 0.5) / s; break;\n\
      }}\n\
      double fl = floor(xi); long long base; double ratio;\n\
      if (xi == fl) {{ base = (long long)fl - 1; ratio = 1.0; }} else {{ base = (long long)fl; ratio = xi - fl; }}\n\
      double c0, c1;\n\
      if (p.linear) {{ c0 = 1.0 - ratio; c1 = ratio; }}\n\
      else if (ratio == 1.0) {{ c0 = 0.0; c1 = 1.0; }}\n\
      else {{\n\
        bool first = (p.nearest == 0) ? (ratio <= 0.5) : (p.nearest == 1) ? (ratio < 0.5) : (p.nearest == 2);\n\
        c0 = first ? 1.0 : 0.0; c1 = first ? 0.0 : 1.0;\n\
      }}\n\
      long long last = p.id[d] - 1;\n\
      long long a = base < 0 ? 0 : (base > last ? last : base);\n\
      long long b = base + 1 < 0 ? 0 : (base + 1 > last ? last : base + 1);\n\
      i0[d] = a; i1[d] = b; w0[d] = c0; w1[d] = c1;\n\
    }}\n\
    double acc = 0.0;\n\
    for (int m = 0; m < (1 << (int)p.rank); ++m) {{\n\
      double w = 1.0; long long off = 0;\n\
      for (int d = 0; d < (int)p.rank; ++d) {{\n\
        bool hi = (m >> d) & 1;\n\
        double f = hi ? w1[d] : w0[d];\n\
        if (f == 0.0) {{ w = 0.0; break; }}\n\
        w *= f; off += (hi ? i1[d] : i0[d]) * p.ist[d];\n\
      }}\n\
      if (w != 0.0) acc += w * (double){lx};\n\
    }}\n\
    y[i] = {st};\n\
  }}\n\
}}\n",
        pre = prelude(&[dt]),
        lx = load(dt, "x[off]"),
        st = store(dt, "acc"),
    ))
}

fn floats_of(t: &kiln_core::Tensor) -> Option<Vec<f64>> {
    t.to_f64_vec().ok()
}

/// Lowers Resize.
pub fn lower(cx: &LowerCx<'_>) -> Option<KernelLayer> {
    if cx.op() != "Resize" || !cx.single_output() || cx.opset() < 10 {
        return None;
    }
    let (dt, ishape) = cx.input(0)?;
    let (odt, oshape) = cx.output(0)?;
    let r = ishape.len();
    if !is_kernel_float(dt) || odt != dt || oshape.len() != r || r == 0 || r > MAX_RESIZE_RANK {
        return None;
    }
    if ishape.contains(&0) {
        return None;
    }
    let a = cx.attrs();
    if a.has("axes") || a.int("antialias", 0).ok()? != 0 {
        return None;
    }
    let linear = match a
        .string("mode", "nearest")
        .ok()?
        .to_ascii_lowercase()
        .as_str()
    {
        "nearest" => false,
        "linear" | "bilinear" | "trilinear" => true,
        _ => return None,
    };
    let (ctm, nearest) = if cx.opset() < 11 {
        (4i64, 0i64)
    } else {
        let ctm = match a
            .string("coordinate_transformation_mode", "half_pixel")
            .ok()?
            .as_str()
        {
            "half_pixel" => 0,
            "half_pixel_symmetric" => 1,
            "pytorch_half_pixel" => 2,
            "align_corners" => 3,
            "asymmetric" => 4,
            "tf_half_pixel_for_nn" => 5,
            _ => return None,
        };
        let nearest = match a
            .string("nearest_mode", "round_prefer_floor")
            .ok()?
            .as_str()
        {
            "round_prefer_floor" => 0,
            "round_prefer_ceil" => 1,
            "floor" => 2,
            "ceil" => 3,
            _ => return None,
        };
        (ctm, nearest)
    };
    let non_empty = |i: usize| -> Option<Option<&kiln_core::Tensor>> {
        if !cx.present(i) {
            return Some(None);
        }
        let t = cx.konst(i)?;
        Some(if t.is_empty() { None } else { Some(t) })
    };
    let (scales_t, sizes_t) = if cx.opset() < 11 {
        (non_empty(1)?, None)
    } else {
        (non_empty(2)?, non_empty(3)?)
    };
    let scales: Vec<f64> = match (scales_t, sizes_t) {
        (Some(s), None) => {
            let s = floats_of(s)?;
            if s.len() != r || s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return None;
            }
            for d in 0..r {
                if (s[d] * ishape[d] as f64) as usize != oshape[d] {
                    return None;
                }
            }
            s
        }
        (None, Some(z)) => {
            if a.string("keep_aspect_ratio_policy", "stretch").ok()? != "stretch" {
                return None;
            }
            let z = z.to_i64_vec().ok()?;
            if z.len() != r || (0..r).any(|d| z[d] != oshape[d] as i64) {
                return None;
            }
            (0..r)
                .map(|d| oshape[d] as f64 / ishape[d] as f64)
                .collect()
        }
        _ => return None,
    };
    let n: usize = oshape.iter().product();
    let mut p = Params::new();
    p.i(n as i64)
        .i(r as i64)
        .i(ctm)
        .i(linear as i64)
        .i(nearest)
        .arr(
            &ishape.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            MAX_RESIZE_RANK,
            1,
        )
        .arr(
            &oshape.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            MAX_RESIZE_RANK,
            1,
        )
        .arr(&strides(&ishape), MAX_RESIZE_RANK, 0);
    for d in 0..MAX_RESIZE_RANK {
        p.f(scales.get(d).copied().unwrap_or(1.0));
    }
    let mut in_facts = vec![None; cx.n_in()];
    in_facts[0] = Some((dt, ishape));
    Some(KernelLayer {
        tactic: format!(
            "nvrtc.resize.{}.{}",
            if linear { "linear" } else { "nearest" },
            dt.name()
        ),
        src: Some(source("resize", resize_code(dt)?)),
        steps: vec![Step::Launch {
            func: "kiln_resize",
            grid: grid_for(n),
            block: BLOCK,
            shmem: 0,
            ptrs: vec![Ptr::In(0, 0), Ptr::Out(0, 0)],
            params: p,
        }],
        in_facts,
        out_facts: vec![Some((odt, oshape))],
        work: 0,
    })
}

#[cfg(test)]
mod tests {
    use kiln_core::{Attr, DType, Fact, Tensor};

    use super::*;
    use crate::kernels::testutil::{f, node};
    use crate::kernels::{lower_layer, LowerCx};

    #[test]
    fn resize_scales_and_refusals() {
        let n = node(
            "Resize",
            13,
            vec![
                ("mode", Attr::String("nearest".into())),
                (
                    "coordinate_transformation_mode",
                    Attr::String("asymmetric".into()),
                ),
                ("nearest_mode", Attr::String("floor".into())),
            ],
            3,
            1,
        );
        let fi = vec![
            f(DType::F32, &[1, 2, 3, 5]),
            Fact::constant(Tensor::from_vec(&[0], Vec::<f32>::new()).unwrap()),
            Fact::constant(Tensor::from_vec(&[4], vec![1.0f32, 1.0, 2.0, 2.0]).unwrap()),
        ];
        let fo = vec![f(DType::F32, &[1, 2, 6, 10])];
        let l = lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &fo,
        })
        .unwrap();
        match &l.steps[0] {
            Step::Launch { params, .. } => assert_eq!(&params.0[..5], &[120, 4, 4, 0, 2]),
            _ => panic!(),
        }
        // Output not matching the scales: refused; cubic: refused.
        let bad = vec![f(DType::F32, &[1, 2, 7, 10])];
        assert!(lower_layer(&LowerCx {
            node: &n,
            inputs: &fi,
            outputs: &bad
        })
        .is_none());
        let n2 = node(
            "Resize",
            13,
            vec![("mode", Attr::String("cubic".into()))],
            3,
            1,
        );
        assert!(lower_layer(&LowerCx {
            node: &n2,
            inputs: &fi,
            outputs: &fo
        })
        .is_none());
    }
}
