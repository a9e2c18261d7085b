//! Linear quantization: QuantizeLinear, DequantizeLinear (per-tensor, per-axis and blocked;
//! 4-, 8- and 16-bit integer types, float8 and float4) and DynamicQuantizeLinear.

use std::any::Any;

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Fact, KilnError, Op, OpRegistry, Result,
    Tensor, Value,
};

use super::elementwise::num::Num;
use super::elementwise::{bad_dtype, infer_unary, new_tensor};

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

    fn as_any(&self) -> &dyn Any {
        self
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

    fn as_any(&self) -> &dyn Any {
        self
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
