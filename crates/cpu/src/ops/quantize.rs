//! Linear quantization: QuantizeLinear, DequantizeLinear (per-tensor, per-axis and blocked;
//! 4-, 8- and 16-bit integer types, float8 and float4) and DynamicQuantizeLinear.
//!
//! The reference kernels compute through f64. The common case of Q/DQ models — f32 ↔
//! u8/i8 with f32 scales per tensor or per axis — runs the vectorised kernels of
//! [`crate::ops::int8::linear`] instead (bit-identical, see there), writing in place.

use std::any::Any;

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Fact, KilnError, Op, OpRegistry, Result,
    Tensor, TensorMut, Value,
};

use super::elementwise::num::Num;
use super::elementwise::{bad_dtype, infer_unary, new_tensor};
use super::int8::linear::{self, Code};

/// How scale / zero-point elements map onto input elements.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per index along the axis.
    Axis { c: usize, inner: usize },
    /// Blocks of `bs` along the axis.
    Block {
        n: usize,
        nb: usize,
        bs: usize,
        inner: usize,
    },
}

impl Layout {
    fn of(op: &str, x: &[usize], scale: &[usize], axis: i64, block: i64) -> Result<Layout> {
        let n_scale: usize = scale.iter().product();
        if scale.is_empty() || (n_scale == 1 && block <= 0) {
            return Ok(Layout::Tensor);
        }
        let r = x.len() as i64;
        let a = if axis < 0 { axis + r } else { axis };
        if a < 0 || a >= r {
            return Err(KilnError::kernel(
                op,
                format!("axis {axis} is out of range for rank {r}"),
            ));
        }
        let a = a as usize;
        let inner: usize = x[a + 1..].iter().product();
        if block <= 0 {
            if scale.len() != 1 || scale[0] != x[a] {
                return Err(KilnError::kernel(
                    op,
                    format!(
                        "per-axis scale of shape {scale:?} must be 1-D of length {} (axis {a})",
                        x[a]
                    ),
                ));
            }
            return Ok(Layout::Axis { c: x[a], inner });
        }
        let bs = block as usize;
        let nb = x[a].div_ceil(bs);
        let ok = scale.len() == x.len()
            && scale
                .iter()
                .enumerate()
                .all(|(i, &d)| if i == a { d == nb } else { d == x[i] });
        if !ok {
            return Err(KilnError::kernel(
                op,
                format!("blocked scale of shape {scale:?} does not match input {x:?} with block_size {bs} on axis {a}"),
            ));
        }
        Ok(Layout::Block {
            n: x[a],
            nb,
            bs,
            inner,
        })
    }

    #[inline]
    fn idx(&self, i: usize) -> usize {
        match *self {
            Layout::Tensor => 0,
            Layout::Axis { c, inner } => (i / inner) % c,
            Layout::Block { n, nb, bs, inner } => {
                let j = i % inner;
                let k = (i / inner) % n;
                let o = i / (inner * n);
                (o * nb + k / bs) * inner + j
            }
        }
    }
}

fn quant_range(dt: DType) -> Option<(f64, f64)> {
    Some(match dt {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::U4 => (0.0, 15.0),
        DType::I4 => (-8.0, 7.0),
        _ => return None,
    })
}

fn unsupported_type_name(code: i64) -> String {
    match code {
        17..=20 => "float8".into(),
        21 | 22 => "int4/uint4".into(),
        23 => "float4".into(),
        other => format!("type code {other}"),
    }
}

/// True for the float types QuantizeLinear can produce (float8 and float4).
fn is_quant_float(dt: DType) -> bool {
    matches!(
        dt,
        DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F4E2M1
    )
}

/// QuantizeLinear.
#[derive(Debug, Clone)]
pub struct Quantize {
    axis: i64,
    block_size: i64,
    output_dtype: Option<DType>,
    /// Float8 outputs clamp to the largest finite value instead of NaN / infinity.
    saturate: bool,
}

impl Op for Quantize {
    fn op_type(&self) -> &str {
        "QuantizeLinear"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let zp = inputs.get(2).copied().flatten().and_then(|f| f.dtype);
        let mut f = infer_unary(inputs, Some(zp.or(self.output_dtype).unwrap_or(DType::U8)))?;
        if zp.is_none() && inputs.get(2).copied().flatten().is_some() {
            f[0].dtype = None;
        }
        Ok(f)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "QuantizeLinear";
        let x = input_tensor(inputs, 0, OP)?;
        let scale = input_tensor(inputs, 1, OP)?;
        let zp = optional_tensor(inputs, 2, OP)?;
        if let Some((out_dt, layout)) = self.fast(x, scale, zp) {
            let out = if out_dt == DType::U8 {
                let mut q = vec![0u8; x.len()];
                quantize_fast(x, scale, zp, layout, &mut q)?;
                Tensor::from_vec(x.shape(), q)?
            } else {
                let mut q = vec![0i8; x.len()];
                quantize_fast(x, scale, zp, layout, &mut q)?;
                Tensor::from_vec(x.shape(), q)?
            };
            return Ok(vec![Value::Tensor(out)]);
        }
        self.eval_reference(inputs)
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        const OP: &str = "QuantizeLinear";
        let x = input_tensor(inputs, 0, OP)?;
        let scale = input_tensor(inputs, 1, OP)?;
        let zp = optional_tensor(inputs, 2, OP)?;
        if let (Some((out_dt, layout)), Some(slot)) = (self.fast(x, scale, zp), outputs.first_mut())
        {
            if slot.dtype() == out_dt && slot.shape() == x.shape() {
                return if out_dt == DType::U8 {
                    quantize_fast::<u8>(x, scale, zp, layout, slot.as_mut_slice()?)
                } else {
                    quantize_fast::<i8>(x, scale, zp, layout, slot.as_mut_slice()?)
                };
            }
        }
        copy_reference(OP, self.eval(inputs)?, outputs)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Quantize {
    /// The output type and layout when the fast kernels apply: f32 input and scale, u8/i8
    /// output (zero point absent or of the output type, one per scale), one scale per
    /// tensor or per axis index. `None` otherwise (the reference kernel then runs, and
    /// reports any error).
    fn fast(&self, x: &Tensor, scale: &Tensor, zp: Option<&Tensor>) -> Option<(DType, Layout)> {
        if x.dtype() != DType::F32 || scale.dtype() != DType::F32 {
            return None;
        }
        let out_dt = match (zp.map(Tensor::dtype), self.output_dtype) {
            (Some(z), Some(o)) if z != o => return None,
            (Some(z), _) => z,
            (None, Some(o)) => o,
            (None, None) => DType::U8,
        };
        fast_layout(out_dt, x, scale, zp, self.axis, self.block_size).map(|l| (out_dt, l))
    }

    /// The reference kernel (through f64; every type and layout).
    pub fn eval_reference(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "QuantizeLinear";
        let x = input_tensor(inputs, 0, OP)?;
        let scale = input_tensor(inputs, 1, OP)?;
        let zp = optional_tensor(inputs, 2, OP)?;
        let out_dt = match (zp, self.output_dtype) {
            (Some(z), Some(o)) if z.dtype() != o => {
                return Err(KilnError::kernel(
                    OP,
                    format!(
                        "zero point dtype {} differs from output_dtype {o}",
                        z.dtype()
                    ),
                ))
            }
            (Some(z), _) => z.dtype(),
            (None, Some(o)) => o,
            (None, None) => DType::U8,
        };
        let range = quant_range(out_dt);
        if range.is_none() && !is_quant_float(out_dt) {
            return Err(KilnError::kernel(
                OP,
                format!("unsupported quantized type {out_dt}"),
            ));
        }
        let (lo, hi) = range.unwrap_or((0.0, 0.0));
        let layout = Layout::of(OP, x.shape(), scale.shape(), self.axis, self.block_size)?;
        if let Some(z) = zp {
            if z.len() != scale.len() {
                return Err(KilnError::kernel(
                    OP,
                    format!("zero point has {} elements, scale {}", z.len(), scale.len()),
                ));
            }
        }
        if !(x.dtype().is_float() || x.dtype() == DType::I32) {
            return Err(bad_dtype(OP, x.dtype()));
        }
        let xf = x.to_f64_vec()?;
        // Division happens in the input's precision (f32 unless the input is f64).
        let narrow = x.dtype() != DType::F64;
        let sv = scale.to_f64_vec()?;
        let zv = match zp {
            Some(z) => z.to_f64_vec()?,
            None => vec![0.0],
        };
        let q = |i: usize, v: f64| -> f64 {
            let k = layout.idx(i);
            let d = if narrow {
                (v as f32 / sv[k] as f32) as f64
            } else {
                v / sv[k]
            };
            let z = if zp.is_some() { zv[k] } else { 0.0 };
            (d.round_ties_even() + z).clamp(lo, hi)
        };
        if out_dt.is_low_precision() {
            let bytes = quantize_low_precision(out_dt, &xf, self.saturate, |i, v| {
                let k = layout.idx(i);
                let d = if narrow {
                    (v as f32 / sv[k] as f32) as f64
                } else {
                    v / sv[k]
                };
                (d, zv[if zp.is_some() { k } else { 0 }])
            })
            .ok_or_else(|| bad_dtype(OP, out_dt))?;
            return Ok(vec![Value::Tensor(Tensor::from_bytes(
                out_dt,
                x.shape(),
                &bytes,
            )?)]);
        }
        let out = crate::dispatch_numeric!(out_dt, T => new_tensor::<T>(out_dt, x.shape(), |o| {
            for (i, (d, &v)) in o.iter_mut().zip(&xf).enumerate() {
                *d = T::of_f64(q(i, v));
            }
            Ok(())
        }), _ => Err(bad_dtype(OP, out_dt)))?;
        Ok(vec![Value::Tensor(out)])
    }
}

/// The layout when the fast kernels apply to codes of `dt` (u8 or i8) with these scale and
/// zero point tensors: per tensor or per axis, the zero point of the codes' type and one
/// per scale.
fn fast_layout(
    dt: DType,
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    axis: i64,
    block: i64,
) -> Option<Layout> {
    if !matches!(dt, DType::U8 | DType::I8)
        || zp.is_some_and(|z| z.dtype() != dt || z.len() != scale.len())
    {
        return None;
    }
    match Layout::of("", x.shape(), scale.shape(), axis, block).ok()? {
        l @ (Layout::Tensor | Layout::Axis { .. }) => Some(l),
        Layout::Block { .. } => None,
    }
}

/// The fast kernels' per-channel arguments: the zero points (as codes of `T`, empty when
/// absent) and the run length `inner` of one scale (the whole tensor per tensor).
fn fast_args<T: kiln_core::Element>(
    zp: Option<&Tensor>,
    layout: Layout,
    n: usize,
) -> Result<(&[T], usize)> {
    let zps = match zp {
        Some(z) => z.as_slice::<T>()?,
        None => &[],
    };
    let inner = match layout {
        Layout::Axis { inner, .. } => inner,
        _ => n,
    };
    Ok((zps, inner))
}

/// A fast QuantizeLinear into `dst` (codes of `T`, u8 or i8, as many as `x` has; see
/// [`Quantize::fast`]).
fn quantize_fast<T: Code + kiln_core::Element>(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    layout: Layout,
    dst: &mut [T],
) -> Result<()> {
    let (zps, inner) = fast_args(zp, layout, x.len())?;
    linear::quantize(x.as_slice()?, scale.as_slice()?, zps, inner, dst);
    Ok(())
}

/// A fast DequantizeLinear of codes of `T` (u8 or i8) into `dst` (f32, as many as `x`
/// has; see [`Dequantize::fast`]).
fn dequantize_fast<T: Code + kiln_core::Element>(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    layout: Layout,
    dst: &mut [f32],
) -> Result<()> {
    let (zps, inner) = fast_args::<T>(zp, layout, x.len())?;
    linear::dequantize(x.as_slice()?, scale.as_slice()?, zps, inner, dst);
    Ok(())
}

/// `eval_into` for the cases the fast kernels decline: the reference kernel's one output
/// copied into the slot.
fn copy_reference(op: &str, produced: Vec<Value>, outputs: &mut [TensorMut<'_>]) -> Result<()> {
    match (produced.first(), outputs.first_mut()) {
        (Some(v), Some(slot)) => slot.copy_from(v.as_tensor()?),
        _ => Err(KilnError::kernel(op, "expected one output")),
    }
}

/// Quantizes to a low-precision dtype, one byte per element: `scaled(i, x)` gives the
/// scaled value `x / scale` and the zero point (as a number). INT4/UINT4 round half to even,
/// add the zero point and clamp; float4 adds the zero point and rounds (saturating); float8
/// ignores the zero point and rounds, saturating when asked.
fn quantize_low_precision(
    dt: DType,
    xs: &[f64],
    saturate: bool,
    scaled: impl Fn(usize, f64) -> (f64, f64),
) -> Option<Vec<u8>> {
    xs.iter()
        .enumerate()
        .map(|(i, &v)| {
            let (d, z) = scaled(i, v);
            match dt {
                DType::I4 | DType::U4 => {
                    kiln_core::lowp::encode_saturating_int(dt, d.round_ties_even() + z)
                }
                DType::F4E2M1 => kiln_core::lowp::encode(dt, d + z, true),
                _ => kiln_core::lowp::encode(dt, d, saturate),
            }
        })
        .collect()
}

/// DequantizeLinear.
#[derive(Debug, Clone)]
pub struct Dequantize {
    axis: i64,
    block_size: i64,
    output_dtype: Option<DType>,
}

impl Op for Dequantize {
    fn op_type(&self) -> &str {
        "DequantizeLinear"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let sdt = inputs.get(1).copied().flatten().and_then(|f| f.dtype);
        let dt = self.output_dtype.or(sdt);
        let mut f = infer_unary(inputs, dt)?;
        f[0].dtype = dt;
        Ok(f)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "DequantizeLinear";
        let x = input_tensor(inputs, 0, OP)?;
        let scale = input_tensor(inputs, 1, OP)?;
        let zp = optional_tensor(inputs, 2, OP)?;
        if let Some(layout) = self.fast(x, scale, zp) {
            let mut out = vec![0f32; x.len()];
            if x.dtype() == DType::U8 {
                dequantize_fast::<u8>(x, scale, zp, layout, &mut out)?;
            } else {
                dequantize_fast::<i8>(x, scale, zp, layout, &mut out)?;
            }
            return Ok(vec![Value::Tensor(Tensor::from_vec(x.shape(), out)?)]);
        }
        self.eval_reference(inputs)
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        const OP: &str = "DequantizeLinear";
        let x = input_tensor(inputs, 0, OP)?;
        let scale = input_tensor(inputs, 1, OP)?;
        let zp = optional_tensor(inputs, 2, OP)?;
        if let (Some(layout), Some(slot)) = (self.fast(x, scale, zp), outputs.first_mut()) {
            if slot.dtype() == DType::F32 && slot.shape() == x.shape() {
                let dst = slot.as_mut_slice::<f32>()?;
                return if x.dtype() == DType::U8 {
                    dequantize_fast::<u8>(x, scale, zp, layout, dst)
                } else {
                    dequantize_fast::<i8>(x, scale, zp, layout, dst)
                };
            }
        }
        copy_reference(OP, self.eval(inputs)?, outputs)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Dequantize {
    /// The layout when the fast kernels apply: u8/i8 input, f32 scale and output, zero
    /// point absent or of the input's type (one per scale), one scale per tensor or per axis
    /// index. `None` otherwise (the reference kernel then runs, and reports any error).
    fn fast(&self, x: &Tensor, scale: &Tensor, zp: Option<&Tensor>) -> Option<Layout> {
        if scale.dtype() != DType::F32 || self.output_dtype.is_some_and(|d| d != DType::F32) {
            return None;
        }
        fast_layout(x.dtype(), x, scale, zp, self.axis, self.block_size)
    }

    /// The reference kernel (through f64; every type and layout).
    pub fn eval_reference(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "DequantizeLinear";
        let x = input_tensor(inputs, 0, OP)?;
        let scale = input_tensor(inputs, 1, OP)?;
        let zp = optional_tensor(inputs, 2, OP)?;
        if !(x.dtype().is_int() || x.dtype().is_low_precision()) {
            return Err(bad_dtype(OP, x.dtype()));
        }
        // Float8 / float4 inputs have no integer zero point: it must be zero and is ignored.
        let zp = if is_quant_float(x.dtype()) || x.dtype() == DType::F8E8M0 {
            None
        } else {
            zp
        };
        if !scale.dtype().is_float() {
            return Err(KilnError::kernel(
                OP,
                format!("scale must be a float tensor, found {}", scale.dtype()),
            ));
        }
        if let Some(z) = zp {
            if z.dtype() != x.dtype() {
                return Err(KilnError::kernel(
                    OP,
                    format!(
                        "zero point dtype {} differs from input {}",
                        z.dtype(),
                        x.dtype()
                    ),
                ));
            }
            if z.len() != scale.len() {
                return Err(KilnError::kernel(
                    OP,
                    format!("zero point has {} elements, scale {}", z.len(), scale.len()),
                ));
            }
        }
        let layout = Layout::of(OP, x.shape(), scale.shape(), self.axis, self.block_size)?;
        let out_dt = self.output_dtype.unwrap_or(scale.dtype());
        let xv = x.to_f64_vec()?;
        let sv = scale.to_f32_vec()?;
        let zv = match zp {
            Some(z) => z.to_f64_vec()?,
            None => vec![0.0],
        };
        let has_zp = zp.is_some();
        let vals: Vec<f32> = xv
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let k = layout.idx(i);
                let z = if has_zp { zv[k] } else { 0.0 };
                (v - z) as f32 * sv[k]
            })
            .collect();
        let out = Tensor::from_vec(x.shape(), vals)?.cast(out_dt)?;
        Ok(vec![Value::Tensor(out)])
    }
}

/// DynamicQuantizeLinear: u8 quantization with scale and zero point computed from the data.
#[derive(Debug, Clone)]
pub struct DynamicQuantize;

impl Op for DynamicQuantize {
    fn op_type(&self) -> &str {
        "DynamicQuantizeLinear"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let mut f = infer_unary(inputs, Some(DType::U8))?;
        f.push(Fact::concrete(DType::F32, &[]));
        f.push(Fact::concrete(DType::U8, &[]));
        Ok(f)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        const OP: &str = "DynamicQuantizeLinear";
        let x = input_tensor(inputs, 0, OP)?;
        if x.dtype() != DType::F32 {
            return Err(bad_dtype(OP, x.dtype()));
        }
        let v = x.as_slice::<f32>()?;
        let mx = v.iter().fold(0f32, |a, &b| a.max(b));
        let mn = v.iter().fold(0f32, |a, &b| a.min(b));
        let scale = if mx == mn { 1.0f32 } else { (mx - mn) / 255.0 };
        let zp = (0.0 - mn / scale).clamp(0.0, 255.0).round_ties_even();
        let y: Vec<u8> = v
            .iter()
            .map(|&a| ((a / scale).round_ties_even() + zp).clamp(0.0, 255.0) as u8)
            .collect();
        Ok(vec![
            Value::Tensor(Tensor::from_vec(x.shape(), y)?),
            Value::Tensor(Tensor::scalar(scale)),
            Value::Tensor(Tensor::scalar(zp as u8)),
        ])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn read_output_dtype(ctx: &BuildCtx) -> Result<Option<DType>> {
    let a = ctx.attrs();
    match a.opt_int("output_dtype")? {
        None | Some(0) => Ok(None),
        Some(code) => match i32::try_from(code).ok().and_then(DType::from_onnx_code) {
            Some(d) => Ok(Some(d)),
            None => Err(a.unsupported(format!(
                "output_dtype {} is not supported",
                unsupported_type_name(code)
            ))),
        },
    }
}

/// Registers this family's ops.
pub fn register(reg: &mut OpRegistry) {
    reg.register("QuantizeLinear", |ctx: &BuildCtx| {
        let a = ctx.attrs();
        let out = read_output_dtype(ctx)?;
        if let Some(d) = out {
            if quant_range(d).is_none() && !is_quant_float(d) {
                return Err(a.unsupported(format!("quantizing to {d}")));
            }
        }
        Ok(Box::new(Quantize {
            axis: a.int("axis", 1)?,
            block_size: a.int("block_size", 0)?,
            output_dtype: out,
            saturate: a.int("saturate", 1)? != 0,
        }))
    });
    reg.register("DequantizeLinear", |ctx: &BuildCtx| {
        let a = ctx.attrs();
        Ok(Box::new(Dequantize {
            axis: a.int("axis", 1)?,
            block_size: a.int("block_size", 0)?,
            output_dtype: read_output_dtype(ctx)?,
        }))
    });
    reg.register("DynamicQuantizeLinear", |_ctx: &BuildCtx| {
        Ok(Box::new(DynamicQuantize))
    });
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::testutil::*;
    use kiln_core::{Attr, Tensor};

    #[test]
    fn quantize_dequantize() {
        let x = f32t(&[6], vec![0.0, 2.0, 3.0, 1000.0, -254.0, -1000.0]);
        let y = run1(
            "QuantizeLinear",
            13,
            vec![],
            &[
                Some(x.clone()),
                Some(Tensor::scalar(2f32)),
                Some(Tensor::scalar(128u8)),
            ],
        )
        .unwrap();
        assert_eq!(y.as_slice::<u8>().unwrap(), &[128, 129, 130, 255, 1, 0]);
        let y = run1(
            "QuantizeLinear",
            13,
            vec![],
            &[
                Some(x.clone()),
                Some(Tensor::scalar(2f32)),
                Some(Tensor::scalar(0i8)),
            ],
        )
        .unwrap();
        assert_eq!(y.as_slice::<i8>().unwrap(), &[0, 1, 2, 127, -127, -128]);
        // Per-axis.
        let x2 = f32t(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let s = f32t(&[2], vec![1.0, 2.0]);
        let z = Tensor::from_vec(&[2], vec![0u8, 10]).unwrap();
        let y = run1(
            "QuantizeLinear",
            13,
            vec![("axis", Attr::Int(1))],
            &[Some(x2.clone()), Some(s.clone()), Some(z.clone())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<u8>().unwrap(), &[1, 11, 3, 12]);
        let d = run1(
            "DequantizeLinear",
            13,
            vec![("axis", Attr::Int(1))],
            &[Some(y), Some(s), Some(z)],
        )
        .unwrap();
        assert_eq!(d.as_slice::<f32>().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
        // Blocked along axis 1 with block 2 (3 columns → 2 blocks).
        let x3 = f32t(&[1, 3], vec![2.0, 4.0, 9.0]);
        let s3 = f32t(&[1, 2], vec![2.0, 3.0]);
        let y = run1(
            "QuantizeLinear",
            21,
            vec![("axis", Attr::Int(1)), ("block_size", Attr::Int(2))],
            &[Some(x3), Some(s3), None],
        )
        .unwrap();
        assert_eq!(y.as_slice::<u8>().unwrap(), &[1, 2, 3]);
        let q = Tensor::from_vec(&[3], vec![-3i32, 0, 7]).unwrap();
        let d = run1(
            "DequantizeLinear",
            13,
            vec![],
            &[Some(q), Some(Tensor::scalar(0.5f32))],
        )
        .unwrap();
        assert_eq!(d.as_slice::<f32>().unwrap(), &[-1.5, 0.0, 3.5]);
        assert!(build(
            "QuantizeLinear",
            21,
            vec![("output_dtype", Attr::Int(24))],
            2,
            1
        )
        .is_err());
        assert!(run1(
            "QuantizeLinear",
            13,
            vec![("axis", Attr::Int(1))],
            &[Some(x2), Some(f32t(&[3], vec![1.0; 3]))]
        )
        .is_err());
    }

    /// Deterministic pseudo-random numbers.
    struct Rng(u64);
    impl Rng {
        fn unit(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    /// `n` inputs for a quantizer of `scale` and zero point `zp` (codes in [lo, hi]): random
    /// values over three times the representable range, every third one an exact tie
    /// `(k + ½)·scale` (scales here are powers of two or ties are approximate), and the
    /// special values NaN, ±∞, −0 and ±1e30.
    fn inputs(n: usize, scale: f32, zp: i32, lo: i32, hi: i32, rng: &mut Rng) -> Vec<f32> {
        let span = (hi - lo) as f32 * scale;
        let centre = (-zp as f32 + (lo + hi) as f32 / 2.0) * scale;
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e30,
            -1e30,
        ];
        (0..n)
            .map(|i| match i % 3 {
                _ if i % 97 == 5 => special[(i / 97) % special.len()],
                0 => {
                    let k = (rng.unit() * 3.0 * (hi - lo) as f32) as i32 - (hi - lo) * 3 / 2;
                    (k as f32 + 0.5 + (lo + hi) as f32 / 2.0 - zp as f32).round() * scale
                        - 0.5 * scale
                }
                _ => centre + (rng.unit() - 0.5) * 3.0 * span,
            })
            .collect()
    }

    /// Runs `op` (QuantizeLinear or DequantizeLinear, opset 13) on `ins` three ways — the
    /// reference kernel, `eval` and `eval_into` — checks that the fast kernels were
    /// eligible and that all three agree bit for bit, and returns the reference output.
    fn agree(op: &str, attrs: Vec<(&str, Attr)>, ins: &[Option<Tensor>], what: &str) -> Tensor {
        use super::{Dequantize, Quantize};
        use kiln_core::Value;
        let o = build(op, 13, attrs, ins.len(), 1).unwrap();
        let vals: Vec<Option<Value>> = ins.iter().map(|t| t.clone().map(Value::Tensor)).collect();
        let refs: Vec<Option<&Value>> = vals.iter().map(|v| v.as_ref()).collect();
        let t = |i: usize| ins[i].as_ref().unwrap();
        let want = if let Some(q) = o.as_any().downcast_ref::<Quantize>() {
            assert!(q.fast(t(0), t(1), ins[2].as_ref()).is_some(), "{what}");
            q.eval_reference(&refs)
        } else {
            let d = o.as_any().downcast_ref::<Dequantize>().unwrap();
            assert!(d.fast(t(0), t(1), ins[2].as_ref()).is_some(), "{what}");
            d.eval_reference(&refs)
        };
        let want = want.unwrap().remove(0).into_tensor().unwrap();
        let got = run(o.as_ref(), ins).unwrap().remove(0);
        assert_eq!(got.dtype(), want.dtype(), "{what}");
        assert_eq!(got.bytes(), want.bytes(), "{op} eval: {what}");
        // eval_into (the executor's path) writes the same in place.
        let mut buf = vec![0xAAu8; want.bytes().len()];
        let shape = want.shape().to_vec();
        let mut slot = [kiln_core::TensorMut::new(want.dtype(), &shape, &mut buf).unwrap()];
        o.eval_into(&refs, &mut slot).unwrap();
        assert_eq!(&buf, want.bytes(), "{op} eval_into: {what}");
        want
    }

    /// Per tensor, u8 and i8, zero points 0 / mid / extreme, odd lengths (SIMD tails,
    /// parallel chunks): the op (fast kernels) gives exactly the reference kernel's codes,
    /// then dequantizes them to exactly the reference's floats; and each kernel
    /// implementation this CPU has matches the reference too.
    #[test]
    fn fast_quantize_dequantize_match_the_reference() {
        use super::super::int8::linear;
        use crate::ops::linalg::sgemm::Isa;
        use kiln_core::DType;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut cases = 0;
        let mut ties = 0;
        // (dtype, zero point, scale)
        let params: [(DType, i32, f32); 7] = [
            (DType::U8, 0, 0.25),
            (DType::U8, 128, 0.0625),
            (DType::U8, 37, 0.037),
            (DType::U8, 255, 2.0),
            (DType::I8, 0, 0.5),
            (DType::I8, -9, 0.125),
            (DType::I8, 127, 0.011),
        ];
        let isas = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported());
        for &(dt, zp, scale) in &params {
            let (lo, hi) = if dt == DType::U8 {
                (0, 255)
            } else {
                (-128, 127)
            };
            for n in [1usize, 7, 15, 16, 17, 31, 33, 63, 100, 1001, 70_001] {
                let x = inputs(n, scale, zp, lo, hi, &mut rng);
                ties += x
                    .iter()
                    .filter(|v| {
                        let d = *v / scale;
                        d.fract().abs() == 0.5 && d > (lo - zp) as f32 && d < (hi - zp) as f32
                    })
                    .count();
                let zt = if dt == DType::U8 {
                    Tensor::scalar(zp as u8)
                } else {
                    Tensor::scalar(zp as i8)
                };
                let st = Tensor::scalar(scale);
                let what = format!("{dt} zp {zp} scale {scale} n {n}");
                let xt = Tensor::from_vec(&[n], x.clone()).unwrap();
                let ins = [Some(xt), Some(st.clone()), Some(zt.clone())];
                let want = agree("QuantizeLinear", vec![], &ins, &what);
                assert_eq!(want.dtype(), dt);
                // Dequantize the codes back.
                let dins = [Some(want.clone()), Some(st), Some(zt)];
                let dwant = agree("DequantizeLinear", vec![], &dins, &what);
                // Each implementation, straight.
                for isa in isas.clone() {
                    let mut f = vec![f32::NAN; n];
                    let codes: Vec<u8> = if dt == DType::U8 {
                        let mut d = vec![0u8; n];
                        linear::quantize_run(isa, &x, scale, zp as u8, &mut d);
                        let w = want.as_slice::<u8>().unwrap();
                        linear::dequantize_run(isa, w, scale, zp as u8, &mut f);
                        d
                    } else {
                        let mut d = vec![0i8; n];
                        linear::quantize_run(isa, &x, scale, zp as i8, &mut d);
                        let w = want.as_slice::<i8>().unwrap();
                        linear::dequantize_run(isa, w, scale, zp as i8, &mut f);
                        d.iter().map(|&v| v as u8).collect()
                    };
                    assert_eq!(&codes, want.bytes(), "{isa:?} quantize {what}");
                    let fb: &[u8] = bytemuck::cast_slice(&f);
                    assert_eq!(fb, dwant.bytes(), "{isa:?} dequantize {what}");
                }
                cases += 1;
            }
        }
        assert_eq!(cases, 77);
        // Both kinds of tie (even and odd integer below) were exercised many times.
        assert!(ties > 10_000, "only {ties} ties");
    }

    #[test]
    fn fast_quantize_rounds_ties_to_even_and_saturates() {
        // x / scale = k + ½: to the even neighbour, then + zp, then clamped.
        let x = f32t(
            &[10],
            vec![
                0.5,
                1.5,
                2.5,
                -0.5,
                -1.5,
                -2.5,
                126.5,
                300.0,
                -300.0,
                f32::NAN,
            ],
        );
        let y = run1(
            "QuantizeLinear",
            13,
            vec![],
            &[
                Some(x.clone()),
                Some(Tensor::scalar(1f32)),
                Some(Tensor::scalar(3i8)),
            ],
        )
        .unwrap();
        assert_eq!(
            y.as_slice::<i8>().unwrap(),
            &[3, 5, 5, 3, 1, 1, 127, 127, -128, 0]
        );
        let y = run1(
            "QuantizeLinear",
            13,
            vec![],
            &[
                Some(x),
                Some(Tensor::scalar(1f32)),
                Some(Tensor::scalar(2u8)),
            ],
        )
        .unwrap();
        assert_eq!(
            y.as_slice::<u8>().unwrap(),
            &[2, 4, 4, 2, 0, 0, 128, 255, 0, 0]
        );
    }

    /// Per-axis scales and zero points (axis 1 of a 4-D tensor with odd sizes, the last
    /// axis, a negative axis, the first), u8 and i8: the fast op equals the reference.
    #[test]
    fn fast_per_axis_matches_the_reference() {
        use kiln_core::DType;
        let mut rng = Rng(77);
        let shape = [2usize, 5, 3, 37];
        let n: usize = shape.iter().product();
        for (axis, c) in [(1i64, 5usize), (3, 37), (-2, 3), (0, 2)] {
            for dt in [DType::U8, DType::I8] {
                let scales: Vec<f32> = (0..c).map(|_| 0.01 + rng.unit() * 0.2).collect();
                let off = if dt == DType::I8 { 128 } else { 0 };
                let zps: Vec<i32> = (0..c).map(|_| (rng.unit() * 255.0) as i32 - off).collect();
                let x: Vec<f32> = (0..n).map(|_| (rng.unit() - 0.5) * 120.0).collect();
                let xt = Tensor::from_vec(&shape, x).unwrap();
                let st = Tensor::from_vec(&[c], scales).unwrap();
                let zt = if dt == DType::U8 {
                    Tensor::from_vec(&[c], zps.iter().map(|&z| z as u8).collect()).unwrap()
                } else {
                    Tensor::from_vec(&[c], zps.iter().map(|&z| z as i8).collect()).unwrap()
                };
                let what = format!("axis {axis} {dt}");
                let attrs = || vec![("axis", Attr::Int(axis))];
                let ins = [Some(xt), Some(st.clone()), Some(zt.clone())];
                let q = agree("QuantizeLinear", attrs(), &ins, &what);
                agree(
                    "DequantizeLinear",
                    attrs(),
                    &[Some(q), Some(st), Some(zt)],
                    &what,
                );
            }
        }
    }

    #[test]
    fn fast_path_declines_what_it_does_not_handle() {
        use super::Quantize;
        let x = f32t(&[1, 4], vec![1.0, 2.0, 3.0, 4.0]);
        let q = build(
            "QuantizeLinear",
            21,
            vec![("block_size", Attr::Int(2))],
            2,
            1,
        )
        .unwrap();
        let qop = q.as_any().downcast_ref::<Quantize>().unwrap();
        // Blocked scales, u16 zero points, f64 inputs: the reference kernel runs.
        assert!(qop.fast(&x, &f32t(&[1, 2], vec![1.0, 2.0]), None).is_none());
        let q = build("QuantizeLinear", 13, vec![], 3, 1).unwrap();
        let qop = q.as_any().downcast_ref::<Quantize>().unwrap();
        assert!(qop
            .fast(&x, &Tensor::scalar(1f32), Some(&Tensor::scalar(3u16)))
            .is_none());
        let x64 = Tensor::from_vec(&[2], vec![1.0f64, 2.0]).unwrap();
        assert!(qop.fast(&x64, &Tensor::scalar(1f32), None).is_none());
        // A zero point of the wrong length is the reference kernel's error, not a panic.
        let z = Tensor::from_vec(&[2], vec![1u8, 2]).unwrap();
        assert!(run1(
            "QuantizeLinear",
            13,
            vec![],
            &[Some(x), Some(Tensor::scalar(1f32)), Some(z)]
        )
        .is_err());
    }

    #[test]
    fn quantize_low_precision_types() {
        use kiln_core::DType;
        let x = f32t(&[5], vec![0.0, 2.0, 3.0, 1000.0, -7.0]);
        // INT4 with zero point 1: round half to even, then clamp to [-8, 7].
        let z = Tensor::scalar(1f32).cast(DType::I4).unwrap();
        let y = run1(
            "QuantizeLinear",
            21,
            vec![],
            &[Some(x.clone()), Some(Tensor::scalar(2f32)), Some(z.clone())],
        )
        .unwrap();
        assert_eq!(y.dtype(), DType::I4);
        assert_eq!(y.to_i64_vec().unwrap(), &[1, 2, 3, 7, -3]);
        let d = run1(
            "DequantizeLinear",
            21,
            vec![],
            &[Some(y), Some(Tensor::scalar(2f32)), Some(z)],
        )
        .unwrap();
        assert_eq!(d.as_slice::<f32>().unwrap(), &[0.0, 2.0, 4.0, 12.0, -8.0]);
        // UINT4 through output_dtype.
        let y = run1(
            "QuantizeLinear",
            21,
            vec![("output_dtype", Attr::Int(21))],
            &[Some(x.clone()), Some(Tensor::scalar(1f32))],
        )
        .unwrap();
        assert_eq!(y.to_i64_vec().unwrap(), &[0, 2, 3, 15, 0]);
        // float8 E4M3FN: saturating by default, NaN without saturation.
        let y = run1(
            "QuantizeLinear",
            21,
            vec![("output_dtype", Attr::Int(17))],
            &[Some(x.clone()), Some(Tensor::scalar(1f32))],
        )
        .unwrap();
        assert_eq!(y.as_raw::<u8>().unwrap(), &[0x00, 0x40, 0x44, 0x7E, 0xCE]);
        let y = run1(
            "QuantizeLinear",
            21,
            vec![("output_dtype", Attr::Int(17)), ("saturate", Attr::Int(0))],
            &[Some(x.clone()), Some(Tensor::scalar(1f32))],
        )
        .unwrap();
        assert_eq!(y.as_raw::<u8>().unwrap()[3], 0x7F);
        let d = run1(
            "DequantizeLinear",
            21,
            vec![],
            &[Some(y), Some(Tensor::scalar(2f32))],
        )
        .unwrap();
        let d = d.as_slice::<f32>().unwrap();
        assert_eq!(&d[..3], &[0.0, 4.0, 6.0]);
        assert!(d[3].is_nan());
        // float4 E2M1 saturates at 6.
        let y = run1(
            "QuantizeLinear",
            21,
            vec![("output_dtype", Attr::Int(23))],
            &[Some(x), Some(Tensor::scalar(1f32))],
        )
        .unwrap();
        assert_eq!(y.as_raw::<u8>().unwrap(), &[0x0, 0x4, 0x5, 0x7, 0xF]);
    }

    #[test]
    fn dynamic_quantize() {
        let x = f32t(&[3], vec![0.0, 2.0, -3.0]);
        let op = build("DynamicQuantizeLinear", 11, vec![], 1, 3).unwrap();
        let o = run(op.as_ref(), &[Some(x)]).unwrap();
        let scale = 5.0f32 / 255.0;
        assert_eq!(o[1].as_slice::<f32>().unwrap(), &[scale]);
        let zp = (3.0f32 / scale).round();
        assert_eq!(o[2].as_slice::<u8>().unwrap(), &[zp as u8]);
        assert_eq!(o[0].as_slice::<u8>().unwrap()[0], zp as u8);
    }
}
