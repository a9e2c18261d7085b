//! `GridSample` (opsets 16 and 20, N-D) and `AffineGrid` (opset 20).
//!
//! Semantics follow ONNX's reference (`op_grid_sample.py`, `op_affine_grid.py`). The
//! sampling taps of each output location are computed once per batch item and shared by
//! every channel; channels run in parallel.

use kiln_core::{
    input_tensor, BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result, Tensor, Value,
};
use rayon::prelude::*;

/// Registers `GridSample` and `AffineGrid`.
pub fn register(reg: &mut OpRegistry) {
    reg.register("GridSample", build_grid_sample);
    reg.register("AffineGrid", build_affine_grid);
}

/// Interpolation of `GridSample`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GsMode {
    /// Nearest (round half to even).
    Nearest,
    /// (Multi-)linear.
    Linear,
    /// Cubic (A = −0.75).
    Cubic,
}

/// Padding of `GridSample` for out-of-range locations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Padding {
    /// Zeros outside.
    Zeros,
    /// Clamp to the border.
    Border,
    /// Reflect at the border.
    Reflection,
}

/// `GridSample`.
#[derive(Debug, Clone)]
pub struct GridSample {
    /// Interpolation.
    pub mode: GsMode,
    /// Padding.
    pub padding: Padding,
    /// Extrema −1/1 refer to the centres (true) or the edges (false) of corner pixels.
    pub align_corners: bool,
}

fn build_grid_sample(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let mode = match a
        .string(
            "mode",
            if ctx.opset() < 20 {
                "bilinear"
            } else {
                "linear"
            },
        )?
        .as_str()
    {
        "nearest" => GsMode::Nearest,
        "bilinear" | "linear" => GsMode::Linear,
        "bicubic" | "cubic" => GsMode::Cubic,
        other => return Err(a.invalid(format!("unknown mode {other:?}"))),
    };
    let padding = match a.string("padding_mode", "zeros")?.as_str() {
        "zeros" => Padding::Zeros,
        "border" => Padding::Border,
        "reflection" => Padding::Reflection,
        other => return Err(a.invalid(format!("unknown padding_mode {other:?}"))),
    };
    Ok(Box::new(GridSample {
        mode,
        padding,
        align_corners: a.int("align_corners", 0)? != 0,
    }))
}

fn reflect(x: f64, lo: f64, hi: f64) -> f64 {
    let rng = hi - lo;
    if rng <= 0.0 {
        return lo;
    }
    if x < lo {
        let dx = lo - x;
        let n = (dx / rng) as i64;
        let r = dx - n as f64 * rng;
        if n % 2 == 0 {
            lo + r
        } else {
            hi - r
        }
    } else if x > hi {
        let dx = x - hi;
        let n = (dx / rng) as i64;
        let r = dx - n as f64 * rng;
        if n % 2 == 0 {
            hi - r
        } else {
            lo + r
        }
    } else {
        x
    }
}

fn cubic_coeffs(t: f64) -> [f64; 4] {
    let a = -0.75;
    let x = t.abs();
    [
        ((a * (x + 1.0) - 5.0 * a) * (x + 1.0) + 8.0 * a) * (x + 1.0) - 4.0 * a,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        ((a + 2.0) * (1.0 - x) - (a + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0,
        ((a * (2.0 - x) - 5.0 * a) * (2.0 - x) + 8.0 * a) * (2.0 - x) - 4.0 * a,
    ]
}

impl GridSample {
    /// Index of integer position `i` along an axis of length `len`, or None (zero).
    fn pixel(&self, i: i64, len: usize, lo: f64, hi: f64) -> Option<usize> {
        let n = len as i64;
        match self.padding {
            Padding::Zeros => (0..n).contains(&i).then_some(i as usize),
            Padding::Border => Some(i.clamp(0, n - 1) as usize),
            Padding::Reflection => {
                Some((reflect(i as f64, lo, hi) as i64).clamp(0, n - 1) as usize)
            }
        }
    }

    /// Taps (index or None, weight) of one axis for a normalized coordinate.
    fn axis_taps(&self, g: f64, len: usize, taps: &mut Vec<(Option<usize>, f64)>) {
        taps.clear();
        let l = len as f64;
        let mut x = if self.align_corners {
            (g + 1.0) / 2.0 * (l - 1.0)
        } else {
            ((g + 1.0) * l - 1.0) / 2.0
        };
        let (lo, hi) = if self.align_corners {
            (0.0, l - 1.0)
        } else {
            (-0.5, l - 0.5)
        };
        if self.mode == GsMode::Nearest {
            x = x.round_ties_even();
        }
        if x < lo || x > hi {
            match self.padding {
                Padding::Border => x = x.clamp(0.0, l - 1.0),
                Padding::Reflection => x = reflect(x, lo, hi),
                Padding::Zeros => {}
            }
        }
        if !x.is_finite() {
            taps.push((None, 1.0));
            return;
        }
        let x = x.clamp(-1e15, 1e15);
        match self.mode {
            GsMode::Nearest => taps.push((self.pixel(x as i64, len, lo, hi), 1.0)),
            GsMode::Linear => {
                let x0 = x.floor();
                let t = x - x0;
                taps.push((self.pixel(x0 as i64, len, lo, hi), 1.0 - t));
                taps.push((self.pixel(x0 as i64 + 1, len, lo, hi), t));
            }
            GsMode::Cubic => {
                let x0 = x.floor();
                let c = cubic_coeffs(x - x0);
                for (k, w) in c.iter().enumerate() {
                    taps.push((self.pixel(x0 as i64 - 1 + k as i64, len, lo, hi), *w));
                }
            }
        }
    }

    fn run(&self, x: &Tensor, grid: &Tensor) -> Result<Tensor> {
        let err = |m: String| KilnError::kernel("GridSample", m);
        let xs = x.shape();
        let gs = grid.shape();
        if xs.len() < 3 {
            return Err(err(format!("X must have rank ≥ 3, found {xs:?}")));
        }
        let r = xs.len() - 2;
        if gs.len() != r + 2 || gs[0] != xs[0] || gs[r + 1] != r {
            return Err(err(format!(
                "grid must have shape [{}, ..{r} dims.., {r}], found {gs:?}",
                xs[0]
            )));
        }
        let (n, c) = (xs[0], xs[1]);
        let in_sp = &xs[2..];
        let out_sp = &gs[1..r + 1];
        let mut out_shape = vec![n, c];
        out_shape.extend_from_slice(out_sp);
        let n_out: usize = out_sp.iter().product();
        let n_in: usize = in_sp.iter().product();
        if n * c * n_out == 0 {
            return Ok(Tensor::zeros(x.dtype(), &out_shape));
        }
        let xv = x.to_f64_vec()?;
        let gv = grid.to_f64_vec()?;
        let in_strides = kiln_core::strides(in_sp);
        let mut out = vec![0.0f64; n * c * n_out];
        let mut axis_taps: Vec<Vec<(Option<usize>, f64)>> = vec![Vec::new(); r];
        for b in 0..n {
            // Per output location: flattened (index, weight) taps; None index means zero.
            let mut start = Vec::with_capacity(n_out + 1);
            let mut taps: Vec<(usize, f64)> = Vec::new();
            start.push(0);
            for o in 0..n_out {
                let g = &gv[(b * n_out + o) * r..(b * n_out + o + 1) * r];
                for ax in 0..r {
                    // The grid lists coordinates innermost axis first (x, y, z).
                    let mut t = std::mem::take(&mut axis_taps[ax]);
                    self.axis_taps(g[r - 1 - ax], in_sp[ax], &mut t);
                    axis_taps[ax] = t;
                }
                push_product(&axis_taps, &in_strides, &mut taps);
                start.push(taps.len());
            }
            let xb = &xv[b * c * n_in..(b + 1) * c * n_in];
            let ob = &mut out[b * c * n_out..(b + 1) * c * n_out];
            let body = |(ch, dst): (usize, &mut [f64])| {
                let src = &xb[ch * n_in..(ch + 1) * n_in];
                for (o, d) in dst.iter_mut().enumerate() {
                    *d = taps[start[o]..start[o + 1]]
                        .iter()
                        .fold(0.0, |acc, &(i, w)| acc + w * src[i]);
                }
            };
            if c * n_out >= 1 << 14 && crate::parallel::enabled() {
                ob.par_chunks_mut(n_out).enumerate().for_each(body);
            } else {
                ob.chunks_mut(n_out).enumerate().for_each(body);
            }
        }
        Tensor::from_vec(&out_shape, out)?.cast(x.dtype())
    }
}

/// Appends the tensor product of per-axis taps (zero taps dropped).
fn push_product(
    axis_taps: &[Vec<(Option<usize>, f64)>],
    strides: &[usize],
    out: &mut Vec<(usize, f64)>,
) {
    fn rec(
        ax: usize,
        idx: usize,
        w: f64,
        at: &[Vec<(Option<usize>, f64)>],
        st: &[usize],
        out: &mut Vec<(usize, f64)>,
    ) {
        if ax == at.len() {
            out.push((idx, w));
            return;
        }
        for &(i, wi) in &at[ax] {
            if let Some(i) = i {
                rec(ax + 1, idx + i * st[ax], w * wi, at, st, out);
            }
        }
    }
    rec(0, 0, 1.0, axis_taps, strides, out);
}

impl Op for GridSample {
    fn op_type(&self) -> &str {
        "GridSample"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let g = inputs.get(1).copied().flatten();
        let dtype = match x.and_then(|f| f.dtype) {
            Some(d) => d,
            None => return Ok(vec![Fact::unknown()]),
        };
        match (
            x.and_then(|f| f.shape.as_ref()),
            g.and_then(|f| f.shape.as_ref()),
        ) {
            (Some(xs), Some(gs)) if xs.len() >= 3 && gs.len() == xs.len() => {
                let mut s = vec![xs[0].clone(), xs[1].clone()];
                s.extend(gs[1..gs.len() - 1].iter().cloned());
                Ok(vec![Fact::tensor(dtype, s)])
            }
            (Some(xs), _) => {
                let mut s = vec![
                    xs.first().cloned().unwrap_or(Dim::Unknown),
                    xs.get(1).cloned().unwrap_or(Dim::Unknown),
                ];
                s.extend((2..xs.len()).map(|_| Dim::Unknown));
                Ok(vec![Fact::tensor(dtype, s)])
            }
            _ => Ok(vec![Fact::of_dtype(dtype)]),
        }
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "GridSample")?;
        let grid = input_tensor(inputs, 1, "GridSample")?;
        if !grid.dtype().is_float() || x.dtype() == DType::String || x.dtype() == DType::Bool {
            return Err(KilnError::kernel(
                "GridSample",
                format!("unsupported dtypes X {} grid {}", x.dtype(), grid.dtype()),
            ));
        }
        Ok(vec![Value::Tensor(self.run(x, grid)?)])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// `AffineGrid`: a sampling grid from batched affine matrices.
#[derive(Debug, Clone)]
pub struct AffineGrid {
    /// Extrema −1/1 refer to pixel centres of the corners.
    pub align_corners: bool,
}

fn build_affine_grid(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(AffineGrid {
        align_corners: ctx.attrs().int("align_corners", 0)? != 0,
    }))
}

impl AffineGrid {
    fn base(&self, len: usize, i: usize) -> f64 {
        if self.align_corners {
            if len <= 1 {
                -1.0
            } else {
                -1.0 + i as f64 * (2.0 / (len as f64 - 1.0))
            }
        } else {
            let step = 2.0 / len as f64;
            -1.0 + step / 2.0 + i as f64 * step
        }
    }

    fn run(&self, theta: &Tensor, size: &[i64]) -> Result<Tensor> {
        let err = |m: String| KilnError::kernel("AffineGrid", m);
        if size.len() != 4 && size.len() != 5 {
            return Err(err(format!("size must have 4 or 5 values, got {size:?}")));
        }
        if size.iter().any(|&v| !(0..1 << 40).contains(&v)) {
            return Err(err(format!(
                "size values must be non-negative, got {size:?}"
            )));
        }
        let r = size.len() - 2;
        let n = size[0] as usize;
        if theta.shape() != [n, r, r + 1] {
            return Err(err(format!(
                "theta must have shape [{n}, {r}, {}], found {:?}",
                r + 1,
                theta.shape()
            )));
        }
        let sp: Vec<usize> = size[2..].iter().map(|&v| v as usize).collect();
        let total = sp
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&t| t < 1 << 40);
        let total = total.ok_or_else(|| err(format!("size {size:?} is too large")))?;
        let th = theta.to_f64_vec()?;
        let mut out = Vec::with_capacity(n * total * r);
        let st = kiln_core::strides(&sp);
        for b in 0..n {
            let m = &th[b * r * (r + 1)..(b + 1) * r * (r + 1)];
            for flat in 0..total {
                // Homogeneous base point, innermost axis first: (x, y[, z], 1).
                let mut p = vec![1.0; r + 1];
                for ax in 0..r {
                    let i = (flat / st[ax]) % sp[ax];
                    p[r - 1 - ax] = self.base(sp[ax], i);
                }
                for row in 0..r {
                    out.push((0..=r).map(|k| m[row * (r + 1) + k] * p[k]).sum::<f64>());
                }
            }
        }
        let mut shape = vec![n];
        shape.extend_from_slice(&sp);
        shape.push(r);
        Tensor::from_vec(&shape, out)?.cast(theta.dtype())
    }
}

impl Op for AffineGrid {
    fn op_type(&self) -> &str {
        "AffineGrid"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let dtype = inputs.first().copied().flatten().and_then(|f| f.dtype);
        let size = inputs
            .get(1)
            .copied()
            .flatten()
            .and_then(|f| f.konst.as_ref())
            .and_then(|t| t.to_i64_vec().ok());
        match (dtype, size) {
            (Some(d), Some(s)) if (s.len() == 4 || s.len() == 5) && s.iter().all(|&v| v >= 0) => {
                let mut shape: Vec<Dim> = vec![Dim::Known(s[0] as usize)];
                shape.extend(s[2..].iter().map(|&v| Dim::Known(v as usize)));
                shape.push(Dim::Known(s.len() - 2));
                Ok(vec![Fact::tensor(d, shape)])
            }
            (Some(d), _) => Ok(vec![Fact::of_dtype(d)]),
            _ => Ok(vec![Fact::unknown()]),
        }
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let theta = input_tensor(inputs, 0, "AffineGrid")?;
        let size = input_tensor(inputs, 1, "AffineGrid")?.to_i64_vec()?;
        if !theta.dtype().is_float() {
            return Err(KilnError::kernel(
                "AffineGrid",
                format!("theta must be float, found {}", theta.dtype()),
            ));
        }
        Ok(vec![Value::Tensor(self.run(theta, &size)?)])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gs(mode: GsMode, padding: Padding, align_corners: bool) -> GridSample {
        GridSample {
            mode,
            padding,
            align_corners,
        }
    }

    fn x_4x4() -> Tensor {
        Tensor::from_vec(&[1, 1, 4, 4], (0..16).map(|v| v as f32).collect()).unwrap()
    }

    #[test]
    fn identity_grid_reproduces_input() {
        // AffineGrid with identity theta + GridSample (linear, align_corners 0) = identity.
        let ag = AffineGrid {
            align_corners: false,
        };
        let theta = Tensor::from_vec(&[1, 2, 3], vec![1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0]).unwrap();
        let grid = ag.run(&theta, &[1, 1, 4, 4]).unwrap();
        assert_eq!(grid.shape(), &[1, 4, 4, 2]);
        for mode in [GsMode::Linear, GsMode::Nearest, GsMode::Cubic] {
            let y = gs(mode, Padding::Zeros, false)
                .run(&x_4x4(), &grid)
                .unwrap();
            let yv = y.to_f32_vec().unwrap();
            for (i, v) in yv.iter().enumerate() {
                assert!((v - i as f32).abs() < 1e-4, "{mode:?} {yv:?}");
            }
        }
    }

    #[test]
    fn padding_modes() {
        let x = Tensor::from_vec(&[1, 1, 1, 3], vec![1.0f32, 2.0, 3.0]).unwrap();
        // x far right (2.0 normalized) on a single row.
        let grid = Tensor::from_vec(&[1, 1, 2, 2], vec![2.0f32, 0.0, -1.0, 0.0]).unwrap();
        let z = gs(GsMode::Linear, Padding::Zeros, true)
            .run(&x, &grid)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        assert_eq!(z, [0.0, 1.0]);
        let b = gs(GsMode::Linear, Padding::Border, true)
            .run(&x, &grid)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        assert_eq!(b, [3.0, 1.0]);
        // Reflection: x = 3 reflects to 1 over [0, 2].
        let r = gs(GsMode::Linear, Padding::Reflection, true)
            .run(&x, &grid)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        assert_eq!(r, [2.0, 1.0]);
    }

    #[test]
    fn affine_grid_3d_shape_and_errors() {
        let ag = AffineGrid {
            align_corners: true,
        };
        let mut t = vec![0.0f32; 12];
        t[0] = 1.0;
        t[5] = 1.0;
        t[10] = 1.0;
        let theta = Tensor::from_vec(&[1, 3, 4], t).unwrap();
        let g = ag.run(&theta, &[1, 1, 2, 3, 4]).unwrap();
        assert_eq!(g.shape(), &[1, 2, 3, 4, 3]);
        let v = g.to_f32_vec().unwrap();
        assert_eq!(&v[..3], &[-1.0, -1.0, -1.0]);
        assert!(ag.run(&theta, &[1, 1, 2, 3]).is_err());
        assert!(gs(GsMode::Linear, Padding::Zeros, false)
            .run(&x_4x4(), &theta)
            .is_err());
    }
}
