//! Integer convolutions: ConvInteger (i32 accumulation of zero-point-shifted u8/i8) and
//! QLinearConv (requantized output, per-tensor or per-channel weight scales/zero points).
//!
//! Both run the exact reference kernel (f64 sums of integer products are exact).

use kiln_core::{
    input_tensor, optional_tensor, BuildCtx, DType, Fact, KilnError, Op, Result, Tensor, Value,
};

use super::geom::WindowAttrs;
use super::reference::conv_reference;
use super::{conv_geometry, infer_conv_like, out_shape};

fn build_common(ctx: &BuildCtx) -> Result<(WindowAttrs, usize)> {
    let a = ctx.attrs();
    let group = usize::try_from(a.int("group", 1)?)
        .ok()
        .filter(|&g| g > 0)
        .ok_or_else(|| a.invalid("group must be positive"))?;
    let mut win = WindowAttrs::parse(&a)?;
    win.ceil_mode = false;
    Ok((win, group))
}

/// Values of an 8-bit (or other integer) tensor minus a zero point that is either a scalar
/// or one value per `per` index of `axis0_len` blocks (per output channel for weights).
fn shifted(op: &str, t: &Tensor, zp: Option<&Tensor>, what: &str) -> Result<Vec<f64>> {
    if !matches!(t.dtype(), DType::U8 | DType::I8) {
        return Err(KilnError::kernel(
            op,
            format!("{what} must be u8 or i8, found {}", t.dtype()),
        ));
    }
    let v = t.to_f64_vec()?;
    let Some(zp) = zp else { return Ok(v) };
    if zp.dtype() != t.dtype() {
        return Err(KilnError::kernel(
            op,
            format!(
                "{what} zero point must be {}, found {}",
                t.dtype(),
                zp.dtype()
            ),
        ));
    }
    let z = zp.to_f64_vec()?;
    if z.len() == 1 {
        return Ok(v.into_iter().map(|x| x - z[0]).collect());
    }
    let rows = t.shape().first().copied().unwrap_or(0);
    if zp.rank() != 1 || z.len() != rows || rows == 0 {
        return Err(KilnError::kernel(
            op,
            format!(
                "{what} zero point of shape {:?} must be a scalar or have {rows} values",
                zp.shape()
            ),
        ));
    }
    let per = v.len() / rows;
    Ok(v.into_iter()
        .enumerate()
        .map(|(i, x)| x - z[i / per])
        .collect())
}

/// ONNX ConvInteger.
#[derive(Debug, Clone)]
pub struct ConvInteger {
    win: WindowAttrs,
    group: usize,
}

/// Builds ConvInteger.
pub fn build_conv_integer(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let (win, group) = build_common(ctx)?;
    Ok(Box::new(ConvInteger { win, group }))
}

impl Op for ConvInteger {
    fn op_type(&self) -> &str {
        "ConvInteger"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        Ok(vec![infer_conv_like(
            "ConvInteger",
            &self.win,
            inputs.first().copied().flatten(),
            inputs.get(1).copied().flatten(),
            Some(DType::I32),
        )?])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "ConvInteger";
        let x = input_tensor(inputs, 0, op)?;
        let w = input_tensor(inputs, 1, op)?;
        let xz = optional_tensor(inputs, 2, op)?;
        if xz.is_some_and(|z| z.len() != 1) {
            return Err(KilnError::kernel(op, "x_zero_point must be a scalar"));
        }
        let xv = shifted(op, x, xz, "x")?;
        let wv = shifted(op, w, optional_tensor(inputs, 3, op)?, "w")?;
        let (dims, sp) = conv_geometry(op, &self.win, self.group, x.shape(), w.shape())?;
        let y = conv_reference(&xv, &wv, None, dims, &sp.to3(op)?);
        let y: Vec<i32> = y.into_iter().map(|v| v as i64 as i32).collect();
        Ok(vec![Tensor::from_vec(&out_shape(&dims, &sp), y)?.into()])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// ONNX QLinearConv.
#[derive(Debug, Clone)]
pub struct QLinearConv {
    win: WindowAttrs,
    group: usize,
}

/// Builds QLinearConv.
pub fn build_qlinear_conv(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let (win, group) = build_common(ctx)?;
    Ok(Box::new(QLinearConv { win, group }))
}

/// Rounds half to even and saturates to the range of an 8-bit (or wider) integer dtype.
pub fn requantize(v: f64, dtype: DType) -> f64 {
    let (lo, hi) = match dtype {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::I16 => (-32768.0, 32767.0),
        DType::I32 => (i32::MIN as f64, i32::MAX as f64),
        _ => (f64::MIN, f64::MAX),
    };
    v.round_ties_even().clamp(lo, hi)
}

fn scalar_f64(op: &str, t: &Tensor, what: &str) -> Result<f64> {
    if t.len() != 1 {
        return Err(KilnError::kernel(
            op,
            format!("{what} must be a scalar, found shape {:?}", t.shape()),
        ));
    }
    Ok(t.to_f64_vec()?[0])
}

impl Op for QLinearConv {
    fn op_type(&self) -> &str {
        "QLinearConv"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n_outputs: usize) -> Result<Vec<Fact>> {
        let dtype = inputs
            .get(7)
            .copied()
            .flatten()
            .and_then(|f| f.dtype)
            .or(inputs.first().copied().flatten().and_then(|f| f.dtype));
        Ok(vec![infer_conv_like(
            "QLinearConv",
            &self.win,
            inputs.first().copied().flatten(),
            inputs.get(3).copied().flatten(),
            dtype,
        )?])
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let op = "QLinearConv";
        let x = input_tensor(inputs, 0, op)?;
        let xs = scalar_f64(op, input_tensor(inputs, 1, op)?, "x_scale")?;
        let xz = optional_tensor(inputs, 2, op)?;
        let w = input_tensor(inputs, 3, op)?;
        let ws = input_tensor(inputs, 4, op)?.to_f64_vec()?;
        let wz = optional_tensor(inputs, 5, op)?;
        let ys = scalar_f64(op, input_tensor(inputs, 6, op)?, "y_scale")?;
        let yz = optional_tensor(inputs, 7, op)?;
        let b = optional_tensor(inputs, 8, op)?;
        if xz.is_some_and(|z| z.len() != 1) || yz.is_some_and(|z| z.len() != 1) {
            return Err(KilnError::kernel(
                op,
                "x_zero_point and y_zero_point must be scalars",
            ));
        }
        let xv = shifted(op, x, xz, "x")?;
        let wv = shifted(op, w, wz, "w")?;
        let (dims, sp) = conv_geometry(op, &self.win, self.group, x.shape(), w.shape())?;
        if ws.len() != 1 && ws.len() != dims.m {
            return Err(KilnError::kernel(
                op,
                format!("w_scale must be a scalar or have {} values", dims.m),
            ));
        }
        let bias = match b {
            None => None,
            Some(b) if b.dtype() == DType::I32 && b.shape() == [dims.m] => Some(b.to_f64_vec()?),
            Some(b) => {
                return Err(KilnError::kernel(
                    op,
                    format!(
                        "B must be i32 of shape [{}], found {} {:?}",
                        dims.m,
                        b.dtype(),
                        b.shape()
                    ),
                ))
            }
        };
        let acc = conv_reference(&xv, &wv, bias.as_deref(), dims, &sp.to3(op)?);
        let out_dtype = yz.map_or(x.dtype(), |z| z.dtype());
        let zp = yz
            .map(|z| z.to_f64_vec())
            .transpose()?
            .map_or(0.0, |v| v[0]);
        let plane = sp.output.iter().product::<usize>().max(1);
        let y: Vec<f64> = acc
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let m = (i / plane) % dims.m.max(1);
                let s = xs * ws[if ws.len() == 1 { 0 } else { m }] / ys;
                requantize(a * s + zp, out_dtype)
            })
            .collect();
        let shape = out_shape(&dims, &sp);
        Ok(vec![Tensor::from_vec(&shape, y)?.cast(out_dtype)?.into()])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_integer_example() {
        // ONNX's ConvInteger example: x = 2..10 (3×3), w = ones (2×2), x_zero_point = 1.
        let x: Value = Tensor::from_vec(&[1, 1, 3, 3], (2u8..11).collect())
            .unwrap()
            .into();
        let w: Value = Tensor::from_vec(&[1, 1, 2, 2], vec![1u8; 4])
            .unwrap()
            .into();
        let z: Value = Tensor::scalar(1u8).into();
        let op = ConvInteger {
            win: WindowAttrs::default(),
            group: 1,
        };
        let y = op
            .eval(&[Some(&x), Some(&w), Some(&z)])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[12, 16, 24, 28]);
        let bad: Value = Tensor::from_vec(&[1, 1, 3, 3], vec![1.0f32; 9])
            .unwrap()
            .into();
        assert!(op.eval(&[Some(&bad), Some(&w)]).is_err());
    }

    #[test]
    fn qlinear_conv_requantizes() {
        let x: Value = Tensor::from_vec(&[1, 1, 2, 2], vec![10u8, 20, 30, 40])
            .unwrap()
            .into();
        let w: Value = Tensor::from_vec(&[2, 1, 1, 1], vec![2i8, -1])
            .unwrap()
            .into();
        let f = |v: f32| -> Value { Tensor::scalar(v).into() };
        let ws: Value = Tensor::from_vec(&[2], vec![0.5f32, 1.0]).unwrap().into();
        let (xz, wz, yz): (Value, Value, Value) = (
            Tensor::scalar(10u8).into(),
            Tensor::scalar(0i8).into(),
            Tensor::scalar(100u8).into(),
        );
        let b: Value = Tensor::from_vec(&[2], vec![1i32, 0]).unwrap().into();
        let op = QLinearConv {
            win: WindowAttrs::default(),
            group: 1,
        };
        let (xs, ys) = (f(0.1), f(0.05));
        let y = op
            .eval(&[
                Some(&x),
                Some(&xs),
                Some(&xz),
                Some(&w),
                Some(&ws),
                Some(&wz),
                Some(&ys),
                Some(&yz),
                Some(&b),
            ])
            .unwrap()
            .remove(0)
            .into_tensor()
            .unwrap();
        assert_eq!(y.dtype(), DType::U8);
        // channel 0: ((x-10)*2 + 1) * 0.1*0.5/0.05 + 100 ; channel 1: -(x-10) * 2 + 100
        let want: Vec<u8> = [0.0f64, 10.0, 20.0, 30.0]
            .iter()
            .map(|v| ((v * 2.0 + 1.0) + 100.0) as u8)
            .chain(
                [0.0f64, 10.0, 20.0, 30.0]
                    .iter()
                    .map(|v| (100.0 - v * 2.0) as u8),
            )
            .collect();
        assert_eq!(y.as_slice::<u8>().unwrap(), want.as_slice());
    }
}
