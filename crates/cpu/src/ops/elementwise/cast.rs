//! Cast and CastLike.

use std::any::Any;

use kiln_core::lowp::E8M0Round;
use kiln_core::{
    input_tensor, BuildCtx, CastOptions, DType, Fact, KilnError, Op, OpRegistry, Result, Tensor,
    TensorMut, Value,
};

use super::{infer_unary, one};

/// Converts a tensor to `to` with ONNX `Cast` semantics (see [`Tensor::cast`]).
pub fn cast_tensor(t: &Tensor, to: DType) -> Result<Tensor> {
    cast_tensor_with(t, to, CastOptions::default())
}

/// [`cast_tensor`] with the `saturate` / `round_mode` options of float8 targets.
pub fn cast_tensor_with(t: &Tensor, to: DType, opts: CastOptions) -> Result<Tensor> {
    t.cast_with(to, opts)
        .map_err(|e| KilnError::kernel("Cast", format!("{} to {to}: {e}", t.dtype())))
}

/// Allocation-free casts for the common pairs: same dtype (a copy), and integer or f32/f64
/// sources to f32/f64/i64/i32 (Rust's `as`, as the reference does: round-to-nearest into
/// floats, truncating and saturating into integers) and to bool. Returns false, writing nothing, for
/// any other pair.
fn cast_into(x: &Tensor, out: &mut TensorMut<'_>) -> Result<bool> {
    if x.dtype() == out.dtype() && x.dtype() != DType::String {
        out.bytes_mut().copy_from_slice(x.bytes());
        return Ok(true);
    }
    macro_rules! to_float {
        ($F:ty) => {{
            let o = out.as_mut_slice::<$F>()?;
            match x.dtype() {
                DType::F32 => o
                    .iter_mut()
                    .zip(x.as_slice::<f32>()?)
                    .for_each(|(d, s)| *d = *s as $F),
                DType::F64 => o
                    .iter_mut()
                    .zip(x.as_slice::<f64>()?)
                    .for_each(|(d, s)| *d = *s as $F),
                DType::I64 => o
                    .iter_mut()
                    .zip(x.as_slice::<i64>()?)
                    .for_each(|(d, s)| *d = *s as $F),
                DType::I32 => o
                    .iter_mut()
                    .zip(x.as_slice::<i32>()?)
                    .for_each(|(d, s)| *d = *s as $F),
                DType::U8 => o
                    .iter_mut()
                    .zip(x.as_slice::<u8>()?)
                    .for_each(|(d, s)| *d = *s as $F),
                DType::I8 => o
                    .iter_mut()
                    .zip(x.as_slice::<i8>()?)
                    .for_each(|(d, s)| *d = *s as $F),
                _ => return Ok(false),
            }
            Ok(true)
        }};
    }
    // Integer targets convert like the reference (`as`: truncation toward zero,
    // saturating, NaN → 0).
    match out.dtype() {
        DType::F32 => to_float!(f32),
        DType::F64 => to_float!(f64),
        DType::I64 => to_float!(i64),
        DType::I32 => to_float!(i32),
        DType::Bool => cast_to_bool(x, out.bytes_mut()),
        _ => Ok(false),
    }
}

/// Bool target (one byte per element): any non-zero value (NaN included) is true, as in
/// the reference's `x != 0.0`.
fn cast_to_bool(x: &Tensor, o: &mut [u8]) -> Result<bool> {
    macro_rules! nonzero {
        ($T:ty, $zero:expr) => {
            o.iter_mut()
                .zip(x.as_slice::<$T>()?)
                .for_each(|(d, s)| *d = (*s != $zero) as u8)
        };
    }
    match x.dtype() {
        DType::F32 => nonzero!(f32, 0.0),
        DType::F64 => nonzero!(f64, 0.0),
        DType::I64 => nonzero!(i64, 0),
        DType::I32 => nonzero!(i32, 0),
        DType::U8 => nonzero!(u8, 0),
        DType::I8 => nonzero!(i8, 0),
        _ => return Ok(false),
    }
    Ok(true)
}

/// Reads the `saturate` (opset 19+) and `round_mode` (opset 24+) attributes of
/// Cast / CastLike.
fn cast_options(ctx: &BuildCtx) -> Result<CastOptions> {
    let a = ctx.attrs();
    let saturate = a.int("saturate", 1)? != 0;
    let mode = a.string("round_mode", "up")?;
    let round_mode = E8M0Round::parse(&mode).ok_or_else(|| {
        a.invalid(format!(
            "round_mode must be up, down or nearest, got {mode:?}"
        ))
    })?;
    Ok(CastOptions {
        saturate,
        round_mode,
    })
}

/// Name of an ONNX dtype code kiln cannot represent (float8, int4, complex, ...).
fn onnx_type_name(code: i64) -> &'static str {
    match code {
        14 => "complex64",
        15 => "complex128",
        17 => "float8e4m3fn",
        18 => "float8e4m3fnuz",
        19 => "float8e5m2",
        20 => "float8e5m2fnuz",
        21 => "uint4",
        22 => "int4",
        23 => "float4e2m1",
        24 => "float8e8m0",
        _ => "unknown",
    }
}

/// `Cast(input)` to the dtype of the `to` attribute.
#[derive(Debug, Clone)]
pub struct Cast {
    to: DType,
    opts: CastOptions,
}

impl Op for Cast {
    fn op_type(&self) -> &str {
        "Cast"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_unary(inputs, Some(self.to))
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        one(cast_tensor_with(
            input_tensor(inputs, 0, "Cast")?,
            self.to,
            self.opts,
        )?)
    }

    fn eval_into(&self, inputs: &[Option<&Value>], outputs: &mut [TensorMut<'_>]) -> Result<()> {
        let x = input_tensor(inputs, 0, "Cast")?;
        let Some(out) = outputs.first_mut() else {
            return Err(KilnError::kernel("Cast", "no output slot"));
        };
        if out.shape() == x.shape() && out.dtype() == self.to && cast_into(x, out)? {
            return Ok(());
        }
        // Other pairs (strings, low-precision floats, float → int) use the reference.
        let v = self.eval(inputs)?;
        out.copy_from(v[0].as_tensor()?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `CastLike(input, target_type)`: casts to the dtype of the second input.
#[derive(Debug, Clone)]
pub struct CastLike {
    opts: CastOptions,
}

impl Op for CastLike {
    fn op_type(&self) -> &str {
        "CastLike"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let dt = inputs.get(1).copied().flatten().and_then(|f| f.dtype);
        let mut f = infer_unary(inputs, dt)?;
        if dt.is_none() {
            f[0].dtype = None;
        }
        Ok(f)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, "CastLike")?;
        let like = input_tensor(inputs, 1, "CastLike")?;
        one(cast_tensor_with(x, like.dtype(), self.opts)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn build_cast(ctx: &BuildCtx) -> Result<Box<dyn Op>> {
    let a = ctx.attrs();
    let code = a.req_int("to")?;
    let to = i32::try_from(code).ok().and_then(DType::from_onnx_code);
    match to {
        Some(to) => Ok(Box::new(Cast {
            to,
            opts: cast_options(ctx)?,
        })),
        None => Err(a.unsupported(format!(
            "cast to {} (type code {code}) is not supported",
            onnx_type_name(code)
        ))),
    }
}

/// Registers Cast and CastLike.
pub fn register(reg: &mut OpRegistry) {
    reg.register("Cast", build_cast);
    reg.register("CastLike", |ctx: &BuildCtx| {
        Ok(Box::new(CastLike {
            opts: cast_options(ctx)?,
        }))
    });
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use kiln_core::{Attr, Tensor};

    #[test]
    fn cast_basic() {
        let x = f32t(&[4], vec![1.7, -2.5, 0.0, 300.0]);
        let y = run1("Cast", 19, vec![("to", Attr::Int(6))], &[Some(x.clone())]).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[1, -2, 0, 300]);
        let y = run1("Cast", 19, vec![("to", Attr::Int(9))], &[Some(x.clone())]).unwrap();
        assert_eq!(y.as_bools().unwrap(), &[true, true, false, true]);
        let s = Tensor::from_strings(&[2], vec!["1.5".into(), "-INF".into()]).unwrap();
        let y = run1("Cast", 19, vec![("to", Attr::Int(1))], &[Some(s)]).unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[1.5, f32::NEG_INFINITY]);
        let like = Tensor::from_vec(&[1], vec![0f64]).unwrap();
        let y = run1("CastLike", 19, vec![], &[Some(x), Some(like)]).unwrap();
        assert_eq!(y.dtype(), kiln_core::DType::F64);
        assert!(build("Cast", 19, vec![("to", Attr::Int(14))], 1, 1).is_err());
        assert!(build("Cast", 19, vec![], 1, 1).is_err());
    }

    /// Every pair the in-place cast handles itself agrees bit for bit with the reference,
    /// on values that exercise rounding, saturation, zero and NaN.
    #[test]
    fn in_place_casts_match_the_reference() {
        use kiln_core::DType;
        let vals = [1.7f64, -2.5, 0.0, 3e10, -0.4, 255.0, f64::NAN, 7.0];
        let sources: Vec<Tensor> = vec![
            f32t(&[8], vals.iter().map(|v| *v as f32).collect()),
            Tensor::from_vec(&[8], vals.to_vec()).unwrap(),
            Tensor::from_vec(&[2, 4], vec![5i64, -3, 0, i64::MAX, 9, -1, 2, 1 << 40]).unwrap(),
            Tensor::from_vec(&[8], vec![5i32, -3, 0, i32::MIN, 9, -1, 2, 77]).unwrap(),
            Tensor::from_vec(&[8], vec![5u8, 0, 255, 1, 9, 0, 2, 128]).unwrap(),
            Tensor::from_vec(&[8], vec![5i8, -3, 0, -128, 127, -1, 2, 1]).unwrap(),
        ];
        for x in &sources {
            for to in [DType::F32, DType::F64, DType::I64, DType::I32, DType::Bool] {
                let op = build(
                    "Cast",
                    19,
                    vec![("to", Attr::Int(to.onnx_code() as i64))],
                    1,
                    1,
                )
                .unwrap();
                check_into(op.as_ref(), &[Some(x.clone())]);
            }
        }
    }

    #[test]
    fn cast_low_precision() {
        use kiln_core::DType;
        let x = f32t(&[3], vec![448.0, 1e6, f32::NAN]);
        let y = run1("Cast", 19, vec![("to", Attr::Int(17))], &[Some(x.clone())]).unwrap();
        assert_eq!(y.dtype(), DType::F8E4M3FN);
        assert_eq!(y.as_raw::<u8>().unwrap(), &[0x7E, 0x7E, 0x7F]);
        let y = run1(
            "Cast",
            19,
            vec![("to", Attr::Int(17)), ("saturate", Attr::Int(0))],
            &[Some(x.clone())],
        )
        .unwrap();
        assert_eq!(y.as_raw::<u8>().unwrap(), &[0x7E, 0x7F, 0x7F]);
        let back = run1("Cast", 19, vec![("to", Attr::Int(1))], &[Some(y)]).unwrap();
        let b = back.as_slice::<f32>().unwrap();
        assert_eq!(b[0], 448.0);
        assert!(b[1].is_nan() && b[2].is_nan());
        let y = run1("Cast", 19, vec![("to", Attr::Int(19))], &[Some(x)]).unwrap();
        assert_eq!(y.as_raw::<u8>().unwrap(), &[0x5F, 0x7B, 0x7E]);
        // INT4 wraps like a C cast; back to int8 sign-extends.
        let x = f32t(&[4], vec![-9.0, 7.0, 8.0, -8.0]);
        let y = run1("Cast", 21, vec![("to", Attr::Int(22))], &[Some(x)]).unwrap();
        assert_eq!(y.dtype(), DType::I4);
        let y = run1("Cast", 21, vec![("to", Attr::Int(3))], &[Some(y)]).unwrap();
        assert_eq!(y.as_slice::<i8>().unwrap(), &[7, 7, -8, -8]);
        // E8M0 with round_mode.
        let x = f32t(&[2], vec![1.1, 3.0]);
        let y = run1(
            "Cast",
            24,
            vec![
                ("to", Attr::Int(24)),
                ("round_mode", Attr::String("down".into())),
            ],
            &[Some(x.clone())],
        )
        .unwrap();
        assert_eq!(y.as_raw::<u8>().unwrap(), &[127, 128]);
        let like = Tensor::zeros(DType::F8E8M0, &[1]);
        let y = run1("CastLike", 24, vec![], &[Some(x), Some(like)]).unwrap();
        assert_eq!(y.as_raw::<u8>().unwrap(), &[128, 129]);
    }
}
