//! Unary math and logic: Abs Neg Sign, float functions (Exp Log Sqrt ... Atanh), IsNaN,
//! IsInf, Not, BitwiseNot.

use std::any::Any;

use kiln_core::{input_tensor, BuildCtx, DType, Fact, Op, OpRegistry, Result, Tensor, Value};

use super::num::{dispatch_int, Int, Num, Real};
use super::{bad_dtype, infer_unary, map_into, new_tensor, one};

/// Which unary function an op computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryKind {
    /// |x|.
    Abs,
    /// -x.
    Neg,
    /// sign(x).
    Sign,
    /// e^x.
    Exp,
    /// ln x.
    Log,
    /// √x.
    Sqrt,
    /// 1/x.
    Reciprocal,
    /// ⌊x⌋.
    Floor,
    /// ⌈x⌉.
    Ceil,
    /// Round half to even.
    Round,
    /// Error function.
    Erf,
    /// sin.
    Sin,
    /// cos.
    Cos,
    /// tan.
    Tan,
    /// asin.
    Asin,
    /// acos.
    Acos,
    /// atan.
    Atan,
    /// sinh.
    Sinh,
    /// cosh.
    Cosh,
    /// tanh.
    Tanh,
    /// asinh.
    Asinh,
    /// acosh.
    Acosh,
    /// atanh.
    Atanh,
    /// isnan(x) → bool.
    IsNaN,
    /// isinf(x) → bool, restricted to the signs asked for.
    IsInf {
        /// Report +inf.
        pos: bool,
        /// Report -inf.
        neg: bool,
    },
    /// Logical not (bool).
    Not,
    /// Bitwise not (integers).
    BitwiseNot,
}

/// An elementwise unary op.
#[derive(Debug, Clone)]
pub struct Unary {
    name: &'static str,
    kind: UnaryKind,
}

impl Unary {
    /// A unary op named `name` computing `kind`.
    pub fn new(name: &'static str, kind: UnaryKind) -> Self {
        Unary { name, kind }
    }
}

impl Op for Unary {
    fn op_type(&self) -> &str {
        self.name
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        match self.kind {
            UnaryKind::IsNaN | UnaryKind::IsInf { .. } => infer_unary(inputs, Some(DType::Bool)),
            _ => infer_unary(inputs, None),
        }
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let x = input_tensor(inputs, 0, self.name)?;
        one(unary_eval(self.name, self.kind, x)?)
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Value>],
        outputs: &mut [kiln_core::TensorMut<'_>],
    ) -> Result<()> {
        let x = input_tensor(inputs, 0, self.name)?;
        let Some(o) = outputs.first_mut() else {
            return Ok(());
        };
        let plain_float = !matches!(
            self.kind,
            UnaryKind::Abs
                | UnaryKind::Neg
                | UnaryKind::Sign
                | UnaryKind::IsNaN
                | UnaryKind::IsInf { .. }
                | UnaryKind::Not
                | UnaryKind::BitwiseNot
        );
        if plain_float
            && x.dtype() == DType::F32
            && o.dtype() == DType::F32
            && o.shape() == x.shape()
        {
            float_map_into(x.as_slice::<f32>()?, o.as_mut_slice::<f32>()?, self.kind);
            return Ok(());
        }
        o.copy_from(&unary_eval(self.name, self.kind, x)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Applies a unary function to a tensor (the kernel behind [`Unary`]).
pub fn unary_eval(op: &str, kind: UnaryKind, x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    match kind {
        UnaryKind::Abs | UnaryKind::Neg | UnaryKind::Sign => {
            crate::dispatch_numeric!(dt, T => signed_map::<T>(x, kind), _ => Err(bad_dtype(op, dt)))
        }
        UnaryKind::IsNaN | UnaryKind::IsInf { .. } => {
            crate::dispatch_float!(dt, T => float_test::<T>(x, kind), _ => Err(bad_dtype(op, dt)))
        }
        UnaryKind::Not => {
            if dt != DType::Bool {
                return Err(bad_dtype(op, dt));
            }
            let v = x.as_raw::<u8>()?;
            new_tensor::<u8>(DType::Bool, x.shape(), |o| {
                map_into(v, o, |b| 1 - b);
                Ok(())
            })
        }
        UnaryKind::BitwiseNot => {
            dispatch_int!(dt, T => int_not::<T>(x), _ => Err(bad_dtype(op, dt)))
        }
        _ => crate::dispatch_float!(dt, T => float_map::<T>(x, kind), _ => Err(bad_dtype(op, dt))),
    }
}

fn signed_map<T: Num>(x: &Tensor, kind: UnaryKind) -> Result<Tensor> {
    let v = x.as_slice::<T>()?;
    new_tensor::<T>(T::DTYPE, x.shape(), |o| {
        match kind {
            UnaryKind::Abs => map_into(v, o, |a| a.absv()),
            UnaryKind::Neg => map_into(v, o, |a| a.negv()),
            _ => map_into(v, o, |a| a.signv()),
        }
        Ok(())
    })
}

fn int_not<T: Int>(x: &Tensor) -> Result<Tensor> {
    let v = x.as_slice::<T>()?;
    new_tensor::<T>(T::DTYPE, x.shape(), |o| {
        map_into(v, o, |a| a.not());
        Ok(())
    })
}

fn float_test<T: Real>(x: &Tensor, kind: UnaryKind) -> Result<Tensor> {
    let v = x.as_slice::<T>()?;
    new_tensor::<u8>(DType::Bool, x.shape(), |o| {
        match kind {
            UnaryKind::IsInf { pos, neg } => map_into(v, o, |a| {
                let a = *a;
                (a.is_infinite() && ((pos && a > T::ZERO) || (neg && a < T::ZERO))) as u8
            }),
            _ => map_into(v, o, |a| a.is_nan() as u8),
        }
        Ok(())
    })
}

/// Round half to even.
pub fn round_even<T: Real>(a: T) -> T {
    T::of_f64(a.as_f64().round_ties_even())
}

fn float_map<T: Real>(x: &Tensor, kind: UnaryKind) -> Result<Tensor> {
    let v = x.as_slice::<T>()?;
    new_tensor::<T>(T::DTYPE, x.shape(), |o| {
        float_map_into(v, o, kind);
        Ok(())
    })
}

/// Float unary kernel writing into `o` (same length as `v`).
pub fn float_map_into<T: Real>(v: &[T], o: &mut [T], kind: UnaryKind) {
    use UnaryKind as K;
    {
        macro_rules! m {
            ($f:expr) => {
                map_into(v, o, |a: &T| $f(*a))
            };
        }
        match kind {
            K::Exp => m!(|a: T| a.exp()),
            K::Log => m!(|a: T| a.ln()),
            K::Sqrt => m!(|a: T| a.sqrt()),
            K::Reciprocal => m!(|a: T| a.recip()),
            K::Floor => m!(|a: T| a.floor()),
            K::Ceil => m!(|a: T| a.ceil()),
            K::Round => m!(round_even::<T>),
            K::Erf => m!(|a: T| T::of_f64(libm::erf(a.as_f64()))),
            K::Sin => m!(|a: T| a.sin()),
            K::Cos => m!(|a: T| a.cos()),
            K::Tan => m!(|a: T| a.tan()),
            K::Asin => m!(|a: T| a.asin()),
            K::Acos => m!(|a: T| a.acos()),
            K::Atan => m!(|a: T| a.atan()),
            K::Sinh => m!(|a: T| a.sinh()),
            K::Cosh => m!(|a: T| a.cosh()),
            K::Tanh => m!(|a: T| a.tanh()),
            K::Asinh => m!(|a: T| a.asinh()),
            K::Acosh => m!(|a: T| a.acosh()),
            K::Atanh => m!(|a: T| a.atanh()),
            _ => m!(|a: T| a),
        }
    }
}

/// Registers the unary ops.
pub fn register(reg: &mut OpRegistry) {
    macro_rules! simple {
        ($($name:ident),*) => {$(
            reg.register(stringify!($name), |_ctx: &BuildCtx| Ok(Box::new(Unary::new(stringify!($name), UnaryKind::$name))));
        )*};
    }
    simple!(
        Abs, Neg, Sign, Exp, Log, Sqrt, Reciprocal, Floor, Ceil, Round, Erf, Sin, Cos, Tan, Asin,
        Acos, Atan, Sinh, Cosh, Tanh, Asinh, Acosh, Atanh, IsNaN, Not, BitwiseNot
    );
    reg.register("IsInf", |ctx: &BuildCtx| {
        let a = ctx.attrs();
        let pos = a.int("detect_positive", 1)? != 0;
        let neg = a.int("detect_negative", 1)? != 0;
        Ok(Box::new(Unary::new("IsInf", UnaryKind::IsInf { pos, neg })))
    });
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use kiln_core::{Attr, Tensor};

    #[test]
    fn float_functions() {
        let x = rand(37, 1);
        let t = f32t(&[37], x.clone());
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, fn(f32) -> f32)> = vec![
            ("Exp", f32::exp),
            ("Tanh", f32::tanh),
            ("Abs", f32::abs),
            ("Neg", |a| -a),
            ("Floor", f32::floor),
            ("Ceil", f32::ceil),
            ("Sin", f32::sin),
            ("Atan", f32::atan),
            ("Reciprocal", f32::recip),
        ];
        for (op, f) in cases {
            let y = run1(op, 13, vec![], &[Some(t.clone())]).unwrap();
            let want: Vec<f32> = x.iter().map(|v| f(*v)).collect();
            close(y.as_slice::<f32>().unwrap(), &want, 1e-6);
        }
        let y = run1("Erf", 13, vec![], &[Some(f32t(&[3], vec![0.0, 1.0, -0.5]))]).unwrap();
        close(
            y.as_slice::<f32>().unwrap(),
            &[0.0, 0.842_700_8, -0.520_499_9],
            1e-6,
        );
    }

    #[test]
    fn round_half_even_and_ints() {
        let y = run1(
            "Round",
            11,
            vec![],
            &[Some(f32t(&[5], vec![0.5, 1.5, 2.5, -0.5, -1.4]))],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[0.0, 2.0, 2.0, -0.0, -1.0]);
        let t = Tensor::from_vec(&[4], vec![-3i32, 0, 5, i32::MIN]).unwrap();
        let y = run1("Abs", 13, vec![], &[Some(t.clone())]).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[3, 0, 5, i32::MIN]);
        let y = run1("Sign", 13, vec![], &[Some(t)]).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[-1, 0, 1, -1]);
        let y = run1(
            "BitwiseNot",
            18,
            vec![],
            &[Some(Tensor::from_vec(&[2], vec![0u8, 5]).unwrap())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<u8>().unwrap(), &[255, 250]);
    }

    #[test]
    fn isinf_isnan_not() {
        let t = f32t(&[4], vec![f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1.0]);
        let y = run1(
            "IsInf",
            10,
            vec![("detect_negative", Attr::Int(0))],
            &[Some(t.clone())],
        )
        .unwrap();
        assert_eq!(y.as_bools().unwrap(), &[true, false, false, false]);
        let y = run1("IsNaN", 13, vec![], &[Some(t)]).unwrap();
        assert_eq!(y.as_bools().unwrap(), &[false, false, true, false]);
        let y = run1(
            "Not",
            1,
            vec![],
            &[Some(Tensor::from_bools(&[2], &[true, false]).unwrap())],
        )
        .unwrap();
        assert_eq!(y.as_bools().unwrap(), &[false, true]);
    }

    #[test]
    fn errors() {
        let t = Tensor::from_vec(&[1], vec![1i32]).unwrap();
        assert!(run1("Exp", 13, vec![], &[Some(t.clone())]).is_err());
        assert!(run1("Not", 1, vec![], &[Some(t)]).is_err());
        assert!(run1("Exp", 13, vec![], &[None]).is_err());
    }
}
