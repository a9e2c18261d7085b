//! Signal ops: `HannWindow`, `HammingWindow`, `BlackmanWindow`, `DFT` (opset 17 axis
//! attribute, opset 20 axis input), `STFT`, `MelWeightMatrix`.
//!
//! The DFT is the plain O(n²) sum with a precomputed twiddle table (exact enough and
//! simple; these ops are rare and small in inference graphs). Computation is in f64.

use std::any::Any;
use std::f64::consts::PI;

use kiln_core::{BuildCtx, DType, Dim, Fact, KilnError, Op, OpRegistry, Result, Tensor, Value};

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("HannWindow", |c| build_window(c, Window::Hann));
    reg.register("HammingWindow", |c| build_window(c, Window::Hamming));
    reg.register("BlackmanWindow", |c| build_window(c, Window::Blackman));
    reg.register("DFT", build_dft);
    reg.register("STFT", build_stft);
    reg.register("MelWeightMatrix", build_mel);
}

/// The `output_datatype` attribute (default f32).
fn output_dtype(ctx: &BuildCtx) -> Result<DType> {
    let a = ctx.attrs();
    let code = a.int("output_datatype", 1)?;
    let d = i32::try_from(code)
        .ok()
        .and_then(DType::from_onnx_code)
        .ok_or_else(|| a.unsupported(format!("output_datatype {code}")))?;
    if d == DType::String || d == DType::Bool {
        return Err(a.invalid(format!("output_datatype cannot be {d}")));
    }
    Ok(d)
}

/// A scalar (or one-element) integer input.
fn int_scalar(inputs: &[Option<&Value>], i: usize, op: &str, what: &str) -> Result<i64> {
    let t = kiln_core::input_tensor(inputs, i, op)?;
    let v = t
        .to_i64_vec()
        .map_err(|e| KilnError::kernel(op, format!("{what}: {e}")))?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => Err(KilnError::kernel(
            op,
            format!("{what} must be a scalar, found shape {:?}", t.shape()),
        )),
    }
}

/// A scalar (or one-element) numeric input as f64.
fn float_scalar(inputs: &[Option<&Value>], i: usize, op: &str, what: &str) -> Result<f64> {
    let t = kiln_core::input_tensor(inputs, i, op)?;
    let v = t
        .to_f64_vec()
        .map_err(|e| KilnError::kernel(op, format!("{what}: {e}")))?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => Err(KilnError::kernel(
            op,
            format!("{what} must be a scalar, found shape {:?}", t.shape()),
        )),
    }
}

/// A non-negative size from an integer scalar input.
fn size_input(inputs: &[Option<&Value>], i: usize, op: &str, what: &str) -> Result<usize> {
    let v = int_scalar(inputs, i, op, what)?;
    usize::try_from(v)
        .map_err(|_| KilnError::kernel(op, format!("{what} must be non-negative, found {v}")))
}

// ---------------------------------------------------------------- windows

#[derive(Debug, Clone, Copy, PartialEq)]
enum Window {
    Hann,
    Hamming,
    Blackman,
}

/// `HannWindow`, `HammingWindow`, `BlackmanWindow`.
#[derive(Debug)]
pub struct WindowOp {
    kind: Window,
    periodic: bool,
    dtype: DType,
}

fn build_window(ctx: &BuildCtx, kind: Window) -> Result<Box<dyn Op>> {
    Ok(Box::new(WindowOp {
        kind,
        periodic: ctx.attrs().int("periodic", 1)? != 0,
        dtype: output_dtype(ctx)?,
    }))
}

impl WindowOp {
    fn values(&self, size: usize) -> Vec<f64> {
        let denom = if self.periodic {
            size as f64
        } else {
            size as f64 - 1.0
        };
        (0..size)
            .map(|n| {
                if denom <= 0.0 {
                    return 1.0;
                }
                let x = 2.0 * PI * n as f64 / denom;
                match self.kind {
                    Window::Hann => 0.5 - 0.5 * x.cos(),
                    Window::Hamming => {
                        let alpha = 25.0 / 46.0;
                        alpha - (1.0 - alpha) * x.cos()
                    }
                    Window::Blackman => 0.42 - 0.5 * x.cos() + 0.08 * (2.0 * x).cos(),
                }
            })
            .collect()
    }
}

impl Op for WindowOp {
    fn op_type(&self) -> &str {
        match self.kind {
            Window::Hann => "HannWindow",
            Window::Hamming => "HammingWindow",
            Window::Blackman => "BlackmanWindow",
        }
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let size = inputs
            .first()
            .copied()
            .flatten()
            .and_then(|f| f.konst.as_ref())
            .and_then(|t| t.to_i64_vec().ok())
            .and_then(|v| v.first().and_then(|s| usize::try_from(*s).ok()));
        Ok(vec![Fact::tensor(
            self.dtype,
            vec![size.map_or(Dim::Unknown, Dim::Known)],
        )])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let size = size_input(inputs, 0, self.op_type(), "size")?;
        let t = Tensor::from_vec(&[size], self.values(size))?.cast(self.dtype)?;
        Ok(vec![Value::Tensor(t)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- DFT core

/// A complex signal batch laid out as `[outer, n, inner]` (the transformed axis in the middle).
struct Complex {
    re: Vec<f64>,
    im: Vec<f64>,
    outer: usize,
    n: usize,
    inner: usize,
}

/// Splits a `[..., 1|2]` tensor into real/imaginary parts around `axis` (an axis of the
/// shape without the last dim).
fn to_complex(op: &str, x: &Tensor, axis: usize) -> Result<Complex> {
    let shape = x.shape();
    let comps = *shape
        .last()
        .ok_or_else(|| KilnError::kernel(op, "input must have a last dim of 1 or 2"))?;
    if comps != 1 && comps != 2 {
        return Err(KilnError::kernel(
            op,
            format!("last dim must be 1 (real) or 2 (complex), found {comps}"),
        ));
    }
    let sig = &shape[..shape.len() - 1];
    if axis >= sig.len() {
        return Err(KilnError::kernel(
            op,
            format!("axis {axis} is out of range for signal shape {sig:?}"),
        ));
    }
    if !x.dtype().is_float() {
        return Err(KilnError::kernel(
            op,
            format!("input must be a float tensor, found {}", x.dtype()),
        ));
    }
    let v = x.to_f64_vec()?;
    let (re, im) = if comps == 1 {
        (v, vec![0.0; x.len()])
    } else {
        (
            v.iter().step_by(2).copied().collect(),
            v.iter().skip(1).step_by(2).copied().collect(),
        )
    };
    Ok(Complex {
        re,
        im,
        outer: sig[..axis].iter().product(),
        n: sig[axis],
        inner: sig[axis + 1..].iter().product(),
    })
}

/// DFT of each `[outer, :, inner]` line, zero-padded/truncated to `len`, keeping the first
/// `keep` bins. Inverse transforms use `+i` and divide by `len`. Returns interleaved
/// re/im values in `[outer, keep, inner, 2]` order.
fn dft_lines(c: &Complex, len: usize, keep: usize, inverse: bool) -> Vec<f64> {
    let cos: Vec<f64> = (0..len)
        .map(|k| (2.0 * PI * k as f64 / len as f64).cos())
        .collect();
    let sin: Vec<f64> = (0..len)
        .map(|k| (2.0 * PI * k as f64 / len as f64).sin())
        .collect();
    let sign = if inverse { 1.0 } else { -1.0 };
    let scale = if inverse { 1.0 / len as f64 } else { 1.0 };
    let used = c.n.min(len);
    let mut out = vec![0.0; c.outer * keep * c.inner * 2];
    let mut xr = vec![0.0; used];
    let mut xi = vec![0.0; used];
    for o in 0..c.outer {
        for i in 0..c.inner {
            for t in 0..used {
                let idx = (o * c.n + t) * c.inner + i;
                xr[t] = c.re[idx];
                xi[t] = c.im[idx];
            }
            for k in 0..keep {
                let (mut sr, mut si) = (0.0, 0.0);
                for t in 0..used {
                    let w = (k * t) % len;
                    let (wr, wi) = (cos[w], sign * sin[w]);
                    sr += xr[t] * wr - xi[t] * wi;
                    si += xr[t] * wi + xi[t] * wr;
                }
                let dst = ((o * keep + k) * c.inner + i) * 2;
                out[dst] = sr * scale;
                out[dst + 1] = si * scale;
            }
        }
    }
    out
}

// ---------------------------------------------------------------- DFT

/// `DFT`: discrete Fourier transform along one axis of a real or complex signal.
#[derive(Debug)]
pub struct Dft {
    /// Opset < 20: the axis attribute; opset 20 reads input 2 (default -2).
    axis_attr: Option<i64>,
    inverse: bool,
    onesided: bool,
}

fn build_dft(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let axis_attr = if ctx.opset() < 20 {
        Some(a.int("axis", 1)?)
    } else {
        None
    };
    let inverse = a.int("inverse", 0)? != 0;
    let onesided = a.int("onesided", 0)? != 0;
    Ok(Box::new(Dft {
        axis_attr,
        inverse,
        onesided,
    }))
}

impl Dft {
    /// The transformed axis, normalised against the full input rank (must not be the last).
    fn axis(&self, axis: i64, rank: usize) -> Result<usize> {
        let r = rank as i64;
        let a = if axis < 0 { axis + r } else { axis };
        if a < 0 || a >= r - 1 {
            return Err(KilnError::kernel(
                "DFT",
                format!("axis {axis} is out of range for an input of rank {rank}"),
            ));
        }
        Ok(a as usize)
    }
}

impl Op for Dft {
    fn op_type(&self) -> &str {
        "DFT"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let Some(x) = inputs.first().copied().flatten() else {
            return Ok(vec![Fact::unknown()]);
        };
        let konst_int = |i: usize| -> Option<i64> {
            inputs
                .get(i)
                .copied()
                .flatten()?
                .konst
                .as_ref()?
                .to_i64_vec()
                .ok()?
                .first()
                .copied()
        };
        let axis = match self.axis_attr {
            Some(a) => Some(a),
            None if inputs.get(2).copied().flatten().is_none() => Some(-2),
            None => konst_int(2),
        };
        let len_known = inputs.get(1).copied().flatten().is_none() || konst_int(1).is_some();
        let shape = match (&x.shape, axis) {
            (Some(s), Some(axis)) if !s.is_empty() => self.axis(axis, s.len()).ok().map(|a| {
                let mut s = s.clone();
                let n = if inputs.get(1).copied().flatten().is_some() {
                    konst_int(1)
                        .and_then(|l| usize::try_from(l).ok())
                        .map_or(Dim::Unknown, Dim::Known)
                } else {
                    s[a].clone()
                };
                s[a] = match (n, self.onesided) {
                    (Dim::Known(n), true) => Dim::Known(n / 2 + 1),
                    (_, true) => Dim::Unknown,
                    (n, false) if len_known => n,
                    _ => Dim::Unknown,
                };
                let last = s.len() - 1;
                s[last] = Dim::Known(2);
                s
            }),
            (Some(s), None) => {
                let mut s: Vec<Dim> = s.iter().map(|_| Dim::Unknown).collect();
                if let Some(l) = s.last_mut() {
                    *l = Dim::Known(2);
                }
                Some(s)
            }
            _ => None,
        };
        Ok(vec![Fact {
            dtype: x.dtype,
            shape,
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "DFT";
        let x = kiln_core::input_tensor(inputs, 0, OP)?;
        let axis = match self.axis_attr {
            Some(a) => a,
            None => match kiln_core::optional_tensor(inputs, 2, OP)? {
                Some(_) => int_scalar(inputs, 2, OP, "axis")?,
                None => -2,
            },
        };
        if x.rank() < 2 {
            return Err(KilnError::kernel(
                OP,
                format!("input must have rank >= 2, found shape {:?}", x.shape()),
            ));
        }
        let axis = self.axis(axis, x.rank())?;
        let c = to_complex(OP, x, axis)?;
        let len = match kiln_core::optional_tensor(inputs, 1, OP)? {
            Some(_) => size_input(inputs, 1, OP, "dft_length")?,
            None => c.n,
        };
        if len == 0 {
            return Err(KilnError::kernel(OP, "dft_length must be positive"));
        }
        let keep = if self.onesided { len / 2 + 1 } else { len };
        let data = dft_lines(&c, len, keep, self.inverse);
        let mut shape = x.shape().to_vec();
        shape[axis] = keep;
        let last = shape.len() - 1;
        shape[last] = 2;
        let t = Tensor::from_vec(&shape, data)?.cast(x.dtype())?;
        Ok(vec![Value::Tensor(t)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- STFT

/// `STFT`: short-time Fourier transform of `[batch, length, 1|2]` signals.
#[derive(Debug)]
pub struct Stft {
    onesided: bool,
}

fn build_stft(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(Stft {
        onesided: ctx.attrs().int("onesided", 1)? != 0,
    }))
}

impl Op for Stft {
    fn op_type(&self) -> &str {
        "STFT"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let x = inputs.first().copied().flatten();
        let batch = x
            .and_then(|f| f.shape.as_ref()?.first().cloned())
            .unwrap_or(Dim::Unknown);
        Ok(vec![Fact {
            dtype: x.and_then(|f| f.dtype),
            shape: Some(vec![batch, Dim::Unknown, Dim::Unknown, Dim::Known(2)]),
            ..Fact::unknown()
        }])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "STFT";
        let x = kiln_core::input_tensor(inputs, 0, OP)?;
        let [batch, sig_len, comps] = *x.shape() else {
            return Err(KilnError::kernel(
                OP,
                format!("signal must be [batch, length, 1|2], found {:?}", x.shape()),
            ));
        };
        let step = size_input(inputs, 1, OP, "frame_step")?;
        if step == 0 {
            return Err(KilnError::kernel(OP, "frame_step must be positive"));
        }
        let window = match kiln_core::optional_tensor(inputs, 2, OP)? {
            Some(w) if w.rank() == 1 => Some(w.to_f64_vec()?),
            Some(w) => {
                return Err(KilnError::kernel(
                    OP,
                    format!("window must be 1-D, found {:?}", w.shape()),
                ))
            }
            None => None,
        };
        let frame_len = match kiln_core::optional_tensor(inputs, 3, OP)? {
            Some(_) => size_input(inputs, 3, OP, "frame_length")?,
            None => window.as_ref().map_or(sig_len, Vec::len),
        };
        let window = window.unwrap_or_else(|| vec![1.0; frame_len]);
        if frame_len == 0 || window.len() > sig_len || frame_len > sig_len {
            return Err(KilnError::kernel(
                OP,
                format!(
                    "frame length {frame_len} / window {} must be in 1..={sig_len}",
                    window.len()
                ),
            ));
        }
        let n_frames = 1 + (sig_len - frame_len) / step;
        let win = window.len();
        // Frames as a [batch * n_frames, win, comps] signal.
        let v = x.to_f64_vec()?;
        let mut frames = Vec::with_capacity(batch * n_frames * win * comps);
        for b in 0..batch {
            for f in 0..n_frames {
                for (t, w) in window.iter().enumerate() {
                    let pos = f * step + t;
                    for c in 0..comps {
                        let s = if pos < sig_len {
                            v[(b * sig_len + pos) * comps + c]
                        } else {
                            0.0
                        };
                        frames.push(s * w);
                    }
                }
            }
        }
        let ft = Tensor::from_vec(&[batch * n_frames, win, comps], frames)?;
        let c = to_complex(OP, &ft, 1)?;
        let keep = if self.onesided {
            frame_len / 2 + 1
        } else {
            frame_len
        };
        let data = dft_lines(&c, frame_len, keep, false);
        let t = Tensor::from_vec(&[batch, n_frames, keep, 2], data)?.cast(x.dtype())?;
        Ok(vec![Value::Tensor(t)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------- MelWeightMatrix

/// `MelWeightMatrix`: triangular mel filter bank `[dft_length / 2 + 1, num_mel_bins]`.
#[derive(Debug)]
pub struct MelWeightMatrix {
    dtype: DType,
}

fn build_mel(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    Ok(Box::new(MelWeightMatrix {
        dtype: output_dtype(ctx)?,
    }))
}

impl Op for MelWeightMatrix {
    fn op_type(&self) -> &str {
        "MelWeightMatrix"
    }

    fn infer(&self, _inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        Ok(vec![Fact::tensor(
            self.dtype,
            vec![Dim::Unknown, Dim::Unknown],
        )])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "MelWeightMatrix";
        let num_mel = size_input(inputs, 0, OP, "num_mel_bins")?;
        let dft_len = size_input(inputs, 1, OP, "dft_length")?;
        let rate = int_scalar(inputs, 2, OP, "sample_rate")?;
        let low = float_scalar(inputs, 3, OP, "lower_edge_hertz")?;
        let high = float_scalar(inputs, 4, OP, "upper_edge_hertz")?;
        if rate <= 0 {
            return Err(KilnError::kernel(
                OP,
                format!("sample_rate must be positive, found {rate}"),
            ));
        }
        let n_bins = dft_len / 2 + 1;
        let mel = |hz: f64| 2595.0 * (1.0 + hz / 700.0).log10();
        let (low_mel, high_mel) = (mel(low), mel(high));
        let step = (high_mel - low_mel) / (num_mel + 2) as f64;
        let points: Vec<i64> = (0..num_mel + 2)
            .map(|i| {
                let hz = 700.0 * (10f64.powf((i as f64 * step + low_mel) / 2595.0) - 1.0);
                (((dft_len + 1) as f64 * hz) / rate as f64).floor() as i64
            })
            .collect();
        let mut out = vec![0.0f64; n_bins * num_mel];
        let mut set = |j: i64, i: usize, v: f64| -> Result<()> {
            let j = usize::try_from(j).ok().filter(|j| *j < n_bins).ok_or_else(|| {
                KilnError::kernel(OP, format!("frequency bin {j} is out of range 0..{n_bins} (check the edge frequencies)"))
            })?;
            out[j * num_mel + i] = v;
            Ok(())
        };
        for i in 0..num_mel {
            let (lo, center, hi) = (points[i], points[i + 1], points[i + 2]);
            let up = center - lo;
            if up == 0 {
                set(center, i, 1.0)?;
            } else {
                for j in lo..=center {
                    set(j, i, (j - lo) as f64 / up as f64)?;
                }
            }
            let down = hi - center;
            if down > 0 {
                for j in center..hi {
                    set(j, i, (hi - j) as f64 / down as f64)?;
                }
            }
        }
        let t = Tensor::from_vec(&[n_bins, num_mel], out)?.cast(self.dtype)?;
        Ok(vec![Value::Tensor(t)])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::control_flow::testutil::*;
    use kiln_core::Attr;

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    fn out(op: &dyn Op, inputs: &[Option<Value>]) -> Tensor {
        run(op, inputs).unwrap().remove(0).into_tensor().unwrap()
    }

    #[test]
    fn windows() {
        let hann = build(
            |c| build_window(c, Window::Hann),
            "HannWindow",
            17,
            vec![],
            1,
            1,
        )
        .unwrap();
        let w = out(hann.as_ref(), &[tv(Tensor::scalar(4i64))]);
        assert_eq!(w.dtype(), DType::F32);
        close(&w.to_f64_vec().unwrap(), &[0.0, 0.5, 1.0, 0.5], 1e-6);
        let sym = build(
            |c| build_window(c, Window::Hann),
            "HannWindow",
            17,
            vec![("periodic", Attr::Int(0))],
            1,
            1,
        )
        .unwrap();
        close(
            &out(sym.as_ref(), &[tv(Tensor::scalar(3i32))])
                .to_f64_vec()
                .unwrap(),
            &[0.0, 1.0, 0.0],
            1e-6,
        );
        let ham = build(
            |c| build_window(c, Window::Hamming),
            "HammingWindow",
            17,
            vec![("output_datatype", Attr::Int(11))],
            1,
            1,
        )
        .unwrap();
        let w = out(ham.as_ref(), &[tv(Tensor::scalar(2i64))]);
        assert_eq!(w.dtype(), DType::F64);
        close(
            &w.to_f64_vec().unwrap(),
            &[25.0 / 46.0 - 21.0 / 46.0, 1.0],
            1e-12,
        );
        let bl = build(
            |c| build_window(c, Window::Blackman),
            "BlackmanWindow",
            17,
            vec![],
            1,
            1,
        )
        .unwrap();
        let w = out(bl.as_ref(), &[tv(Tensor::scalar(4i64))]);
        close(&w.to_f64_vec().unwrap(), &[0.0, 0.34, 1.0, 0.34], 1e-6);
        assert!(run(bl.as_ref(), &[tv(Tensor::scalar(-1i64))]).is_err());
        let f = bl
            .infer(&[Some(&Fact::constant(Tensor::scalar(10i64)))], 1)
            .unwrap();
        assert_eq!(f[0].concrete_shape(), Some(vec![10]));
    }

    fn naive_dft(x: &[(f64, f64)], inverse: bool) -> Vec<(f64, f64)> {
        let n = x.len();
        let s = if inverse { 1.0 } else { -1.0 };
        (0..n)
            .map(|k| {
                let mut acc = (0.0, 0.0);
                for (t, (r, i)) in x.iter().enumerate() {
                    let a = s * 2.0 * PI * (k * t) as f64 / n as f64;
                    acc.0 += r * a.cos() - i * a.sin();
                    acc.1 += r * a.sin() + i * a.cos();
                }
                if inverse {
                    (acc.0 / n as f64, acc.1 / n as f64)
                } else {
                    acc
                }
            })
            .collect()
    }

    #[test]
    fn dft_real_complex_onesided_inverse() {
        let op = build(build_dft, "DFT", 17, vec![], 2, 1).unwrap();
        // [1, 5, 1] real signal, axis 1.
        let sig = [1.0, 2.0, -1.0, 0.5, 3.0];
        let x = f32t(&[1, 5, 1], &sig.map(|v| v as f32));
        let y = out(op.as_ref(), &[tv(x.clone())]);
        assert_eq!(y.shape(), &[1, 5, 2]);
        let expect = naive_dft(&sig.map(|v| (v, 0.0)), false);
        let flat: Vec<f64> = expect.iter().flat_map(|(r, i)| [*r, *i]).collect();
        close(&y.to_f64_vec().unwrap(), &flat, 1e-4);
        // Onesided keeps n/2+1 bins; dft_length pads.
        let one = build(build_dft, "DFT", 17, vec![("onesided", Attr::Int(1))], 2, 1).unwrap();
        let y = out(one.as_ref(), &[tv(x.clone()), tv(Tensor::scalar(8i64))]);
        assert_eq!(y.shape(), &[1, 5, 2]);
        let mut padded: Vec<(f64, f64)> = sig.map(|v| (v, 0.0)).to_vec();
        padded.resize(8, (0.0, 0.0));
        let expect = naive_dft(&padded, false);
        let flat: Vec<f64> = expect[..5].iter().flat_map(|(r, i)| [*r, *i]).collect();
        close(&y.to_f64_vec().unwrap(), &flat, 1e-4);
        // Inverse of the forward transform gives the signal back (opset 20, axis input).
        let inv = build(build_dft, "DFT", 20, vec![("inverse", Attr::Int(1))], 3, 1).unwrap();
        let fwd = out(op.as_ref(), &[tv(x.clone())]);
        let back = out(inv.as_ref(), &[tv(fwd), None, tv(Tensor::scalar(-2i64))]);
        let flat: Vec<f64> = sig.iter().flat_map(|v| [*v, 0.0]).collect();
        close(&back.to_f64_vec().unwrap(), &flat, 1e-4);
        // Axis 0 of a [3, 2, 1] input (complex input on a non-default axis).
        let x = f32t(
            &[3, 2, 2],
            &[1., 0., 2., 1., 0., 1., -1., 0., 2., 2., 0., 3.],
        );
        let ax0 = build(build_dft, "DFT", 17, vec![("axis", Attr::Int(0))], 1, 1).unwrap();
        let y = out(ax0.as_ref(), &[tv(x)]);
        let a0 = naive_dft(&[(1., 0.), (0., 1.), (2., 2.)], false);
        let got = y.to_f64_vec().unwrap();
        for k in 0..3 {
            close(&got[k * 4..k * 4 + 2], &[a0[k].0, a0[k].1], 1e-4);
        }
        // Errors.
        assert!(run(op.as_ref(), &[tv(f32t(&[2, 3], &[0.; 6]))]).is_err());
        let ax = build(build_dft, "DFT", 17, vec![("axis", Attr::Int(2))], 1, 1).unwrap();
        assert!(run(ax.as_ref(), &[tv(f32t(&[1, 2, 1], &[0.; 2]))]).is_err());
        let f = op
            .infer(&[Some(&Fact::concrete(DType::F32, &[1, 5, 1]))], 1)
            .unwrap();
        assert_eq!(f[0].concrete_shape(), Some(vec![1, 5, 2]));
    }

    #[test]
    fn stft_matches_framed_dft() {
        let op = build(build_stft, "STFT", 17, vec![], 4, 1).unwrap();
        let sig: Vec<f32> = (0..10).map(|i| (i as f32 * 0.7).sin()).collect();
        let x = f32t(&[1, 10, 1], &sig);
        let w = f32t(&[4], &[0.5, 1.0, 1.0, 0.5]);
        let y = out(op.as_ref(), &[tv(x), tv(Tensor::scalar(3i64)), tv(w), None]);
        // frames = 1 + (10 - 4) / 3 = 3, bins = 4/2+1 = 3
        assert_eq!(y.shape(), &[1, 3, 3, 2]);
        let got = y.to_f64_vec().unwrap();
        let win = [0.5, 1.0, 1.0, 0.5];
        for f in 0..3 {
            let frame: Vec<(f64, f64)> = (0..4)
                .map(|t| (f64::from(sig[f * 3 + t]) * win[t], 0.0))
                .collect();
            let e = naive_dft(&frame, false);
            for k in 0..3 {
                close(
                    &got[(f * 3 + k) * 2..(f * 3 + k) * 2 + 2],
                    &[e[k].0, e[k].1],
                    1e-4,
                );
            }
        }
        assert!(run(
            op.as_ref(),
            &[tv(f32t(&[1, 3, 1], &[0.; 3])), tv(Tensor::scalar(0i64))]
        )
        .is_err());
    }

    #[test]
    fn mel_weight_matrix_matches_reference_layout() {
        let op = build(build_mel, "MelWeightMatrix", 17, vec![], 5, 1).unwrap();
        let y = out(
            op.as_ref(),
            &[
                tv(Tensor::scalar(8i64)),
                tv(Tensor::scalar(16i64)),
                tv(Tensor::scalar(8192i64)),
                tv(Tensor::scalar(0.0f32)),
                tv(Tensor::scalar(4096.0f32)),
            ],
        );
        assert_eq!(y.shape(), &[9, 8]);
        // Each filter peaks at 1.
        let v = y.to_f64_vec().unwrap();
        for i in 0..8 {
            let m = (0..9).map(|j| v[j * 8 + i]).fold(0.0, f64::max);
            assert!((m - 1.0).abs() < 1e-6);
        }
        let bad = run(
            op.as_ref(),
            &[
                tv(Tensor::scalar(8i64)),
                tv(Tensor::scalar(16i64)),
                tv(Tensor::scalar(100i64)),
                tv(Tensor::scalar(0.0f32)),
                tv(Tensor::scalar(8192.0f32)),
            ],
        );
        assert!(bad.is_err());
    }
}
