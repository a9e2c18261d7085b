//! Broadcasting binary ops: arithmetic (Add Sub Mul Div Mod Pow), bitwise (BitShift,
//! BitwiseAnd/Or/Xor), logic (And Or Xor), comparisons, PRelu; and the ternary `Where`.

use std::any::Any;

use kiln_core::{
    input_tensor, BuildCtx, DType, Fact, KilnError, Op, OpRegistry, Result, Tensor, Value,
};

use super::num::{dispatch_int, Int, Num};
use super::{bad_dtype, infer_broadcast, infer_unary, map_into, new_tensor, one, Plan};

/// Which binary function an op computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BinKind {
    /// a + b.
    Add,
    /// a - b.
    Sub,
    /// a * b.
    Mul,
    /// a / b (integers truncate toward zero).
    Div,
    /// Remainder: C `fmod` when `fmod`, else Python-style (sign of the divisor).
    Mod {
        /// The `fmod` attribute.
        fmod: bool,
    },
    /// a ^ b (exponent of any numeric dtype).
    Pow,
    /// Shift left or right (integers).
    BitShift {
        /// Direction LEFT.
        left: bool,
    },
    /// a & b (integers).
    BitwiseAnd,
    /// a | b (integers).
    BitwiseOr,
    /// a ^ b (integers).
    BitwiseXor,
    /// Logical and (bool).
    And,
    /// Logical or (bool).
    Or,
    /// Logical xor (bool).
    Xor,
    /// a == b → bool.
    Equal,
    /// a < b → bool.
    Less,
    /// a <= b → bool.
    LessOrEqual,
    /// a > b → bool.
    Greater,
    /// a >= b → bool.
    GreaterOrEqual,
    /// x < 0 ? slope·x : x, slope broadcast to x.
    PRelu,
}

impl BinKind {
    fn is_bool_output(self) -> bool {
        use BinKind::*;
        matches!(
            self,
            And | Or | Xor | Equal | Less | LessOrEqual | Greater | GreaterOrEqual
        )
    }
}

/// An elementwise binary op with numpy broadcasting.
#[derive(Debug, Clone)]
pub struct Binary {
    name: &'static str,
    kind: BinKind,
    /// Opset < 7 `broadcast=1, axis=k`: B is aligned with A starting at dim k.
    legacy_axis: Option<i64>,
}

impl Binary {
    /// A binary op named `name` computing `kind`.
    pub fn new(name: &'static str, kind: BinKind) -> Self {
        Binary {
            name,
            kind,
            legacy_axis: None,
        }
    }

    fn align_legacy(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if self.kind == BinKind::PRelu {
            return prelu_slope(a, b);
        }
        let Some(axis) = self.legacy_axis else {
            return Ok(b.clone());
        };
        let ra = a.rank() as i64;
        let axis = if axis < 0 { axis + ra } else { axis };
        let rb = b.rank() as i64;
        if axis < 0 || axis + rb > ra {
            return Err(KilnError::kernel(
                self.name,
                format!("legacy broadcast axis {axis} does not fit shapes"),
            ));
        }
        let mut shape = vec![1usize; axis as usize];
        shape.extend_from_slice(b.shape());
        shape.resize(ra as usize, 1);
        b.reshape(&shape)
    }
}

impl Op for Binary {
    fn op_type(&self) -> &str {
        self.name
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        if self.kind == BinKind::PRelu || self.legacy_axis.is_some() {
            return infer_unary(inputs, None);
        }
        let dt = if self.kind.is_bool_output() {
            Some(DType::Bool)
        } else {
            None
        };
        infer_broadcast(self.name, &inputs[..inputs.len().min(2)], dt)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let a = input_tensor(inputs, 0, self.name)?;
        let b = input_tensor(inputs, 1, self.name)?;
        let b = self.align_legacy(a, b)?;
        one(binary_eval(self.name, self.kind, a, &b)?)
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Value>],
        outputs: &mut [kiln_core::TensorMut<'_>],
    ) -> Result<()> {
        let a = input_tensor(inputs, 0, self.name)?;
        let b = input_tensor(inputs, 1, self.name)?;
        let b = self.align_legacy(a, b)?;
        let Some(o) = outputs.first_mut() else {
            return Ok(());
        };
        let dt = a.dtype();
        let arith = matches!(
            self.kind,
            BinKind::Add | BinKind::Sub | BinKind::Mul | BinKind::Div | BinKind::Mod { .. }
        );
        if arith && b.dtype() == dt && o.dtype() == dt {
            let plan = Plan::new(self.name, &[a.shape(), b.shape()])?;
            if plan.len() == o.shape().iter().product::<usize>() {
                let done = crate::dispatch_numeric!(dt, T => {
                    arith_into::<T>(&plan, self.kind, a.as_slice::<T>()?, b.as_slice::<T>()?, o.as_mut_slice::<T>()?);
                    true
                }, _ => false);
                if done {
                    return Ok(());
                }
            }
        }
        let all_f32 = dt == DType::F32 && b.dtype() == DType::F32 && o.dtype() == DType::F32;
        if self.kind == BinKind::Pow && all_f32 {
            let plan = Plan::new(self.name, &[a.shape(), b.shape()])?;
            if plan.len() == o.shape().iter().product::<usize>() {
                pow_f32_into(&plan, a.as_slice()?, b.as_slice()?, o.as_mut_slice()?);
                return Ok(());
            }
        }
        o.copy_from(&binary_eval(self.name, self.kind, a, &b)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Computes a binary op on two tensors (the kernel behind [`Binary`]).
pub fn binary_eval(op: &str, kind: BinKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    use BinKind as K;
    let dt = a.dtype();
    if kind != K::Pow && dt != b.dtype() {
        return Err(KilnError::kernel(
            op,
            format!("input dtypes differ: {} and {}", dt, b.dtype()),
        ));
    }
    let plan = Plan::new(op, &[a.shape(), b.shape()])?;
    match kind {
        K::Add | K::Sub | K::Mul | K::Div | K::Mod { .. } => {
            crate::dispatch_numeric!(dt, T => arith::<T>(&plan, kind, a, b), _ => Err(bad_dtype(op, dt)))
        }
        K::Pow => pow(op, &plan, a, b),
        K::BitShift { .. } | K::BitwiseAnd | K::BitwiseOr | K::BitwiseXor => {
            dispatch_int!(dt, T => bits::<T>(&plan, kind, a, b), _ => Err(bad_dtype(op, dt)))
        }
        K::And | K::Or | K::Xor => logic(op, &plan, kind, a, b),
        K::PRelu => {
            if plan.out_shape.as_slice() != a.shape() {
                return Err(KilnError::kernel(
                    op,
                    format!(
                        "slope of shape {:?} does not broadcast to X of shape {:?}",
                        b.shape(),
                        a.shape()
                    ),
                ));
            }
            crate::dispatch_numeric!(dt, T => prelu::<T>(&plan, a, b), _ => Err(bad_dtype(op, dt)))
        }
        _ => match dt {
            DType::String => compare(&plan, kind, a.as_strings()?, b.as_strings()?),
            DType::Bool => compare(&plan, kind, a.as_raw::<u8>()?, b.as_raw::<u8>()?),
            _ => {
                crate::dispatch_numeric!(dt, T => compare(&plan, kind, a.as_slice::<T>()?, b.as_slice::<T>()?),
                _ => Err(bad_dtype(op, dt)))
            }
        },
    }
}

fn arith<T: Num>(plan: &Plan, kind: BinKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (x, y) = (a.as_slice::<T>()?, b.as_slice::<T>()?);
    new_tensor::<T>(T::DTYPE, &plan.out_shape, |o| {
        arith_into(plan, kind, x, y, o);
        Ok(())
    })
}

/// Arithmetic kernel writing into `o` (of `plan.len()` elements).
pub fn arith_into<T: Num>(plan: &Plan, kind: BinKind, x: &[T], y: &[T], o: &mut [T]) {
    {
        match kind {
            BinKind::Add => plan.binary(x, y, o, |a, b| a.addv(*b)),
            BinKind::Sub => plan.binary(x, y, o, |a, b| a.subv(*b)),
            BinKind::Mul => plan.binary(x, y, o, |a, b| a.mulv(*b)),
            BinKind::Div => plan.binary(x, y, o, |a, b| a.divv(*b)),
            BinKind::Mod { fmod: true } => plan.binary(x, y, o, |a, b| a.rem_c(*b)),
            _ => plan.binary(x, y, o, |a, b| a.rem_py(*b)),
        }
    }
}

fn bits<T: Int>(plan: &Plan, kind: BinKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (x, y) = (a.as_slice::<T>()?, b.as_slice::<T>()?);
    new_tensor::<T>(T::DTYPE, &plan.out_shape, |o| {
        match kind {
            BinKind::BitShift { left: true } => plan.binary(x, y, o, |a, b| a.shl(*b)),
            BinKind::BitShift { left: false } => plan.binary(x, y, o, |a, b| a.shr(*b)),
            BinKind::BitwiseAnd => plan.binary(x, y, o, |a, b| a.and(*b)),
            BinKind::BitwiseOr => plan.binary(x, y, o, |a, b| a.or(*b)),
            _ => plan.binary(x, y, o, |a, b| a.xor(*b)),
        }
        Ok(())
    })
}

fn logic(op: &str, plan: &Plan, kind: BinKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() != DType::Bool {
        return Err(bad_dtype(op, a.dtype()));
    }
    let (x, y) = (a.as_raw::<u8>()?, b.as_raw::<u8>()?);
    new_tensor::<u8>(DType::Bool, &plan.out_shape, |o| {
        match kind {
            BinKind::And => plan.binary(x, y, o, |a, b| a & b),
            BinKind::Or => plan.binary(x, y, o, |a, b| a | b),
            _ => plan.binary(x, y, o, |a, b| a ^ b),
        }
        Ok(())
    })
}

fn compare<T: PartialOrd + Sync>(plan: &Plan, kind: BinKind, x: &[T], y: &[T]) -> Result<Tensor> {
    new_tensor::<u8>(DType::Bool, &plan.out_shape, |o| {
        match kind {
            BinKind::Equal => plan.binary(x, y, o, |a, b| (a == b) as u8),
            BinKind::Less => plan.binary(x, y, o, |a, b| (a < b) as u8),
            BinKind::LessOrEqual => plan.binary(x, y, o, |a, b| (a <= b) as u8),
            BinKind::Greater => plan.binary(x, y, o, |a, b| (a > b) as u8),
            _ => plan.binary(x, y, o, |a, b| (a >= b) as u8),
        }
        Ok(())
    })
}

/// A 1-D slope with one value per channel (as exporters write it for opsets where slope
/// was per channel) is aligned with X's channel axis when plain broadcasting would fail.
fn prelu_slope(x: &Tensor, slope: &Tensor) -> Result<Tensor> {
    let xs = x.shape();
    let per_channel = slope.rank() == 1
        && xs.len() >= 2
        && slope.len() == xs[1]
        && slope.len() != 1
        && xs.last() != Some(&slope.len());
    if per_channel {
        let mut shape = vec![1usize; xs.len() - 1];
        shape[0] = slope.len();
        return slope.reshape(&shape);
    }
    Ok(slope.clone())
}

fn prelu<T: Num>(plan: &Plan, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (x, s) = (a.as_slice::<T>()?, b.as_slice::<T>()?);
    new_tensor::<T>(T::DTYPE, &plan.out_shape, |o| {
        plan.binary(x, s, o, |x, s| if *x < T::ZERO { x.mulv(*s) } else { *x });
        Ok(())
    })
}

fn pow(op: &str, plan: &Plan, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (da, db) = (a.dtype(), b.dtype());
    if da == DType::F32 && db == DType::F32 {
        return pow_f32(plan, a, b);
    }
    if !(db.is_float() || db.is_int()) {
        return Err(bad_dtype(op, db));
    }
    if da.is_float() || db.is_float() {
        let e = b.to_f64_vec()?;
        return crate::dispatch_numeric!(da, T => {
            let x = a.as_slice::<T>()?;
            new_tensor::<T>(da, &plan.out_shape, |o| {
                plan.binary(x, &e, o, |x, e| T::of_f64(x.as_f64().powf(*e)));
                Ok(())
            })
        }, _ => Err(bad_dtype(op, da)));
    }
    let e = b.to_i64_vec()?;
    dispatch_int!(da, T => {
        let x = a.as_slice::<T>()?;
        new_tensor::<T>(da, &plan.out_shape, |o| {
            plan.binary(x, &e, o, |x, e| x.powi(*e));
            Ok(())
        })
    }, _ => Err(bad_dtype(op, da)))
}

fn pow_f32(plan: &Plan, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (x, y) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
    new_tensor::<f32>(DType::F32, &plan.out_shape, |o| {
        pow_f32_into(plan, x, y, o);
        Ok(())
    })
}

/// `o = x ^ y` (broadcast by `plan`), with the common constant exponents special-cased.
fn pow_f32_into(plan: &Plan, x: &[f32], y: &[f32], o: &mut [f32]) {
    if y.len() == 1 && x.len() == o.len() {
        let e = y[0];
        if e == 2.0 {
            map_into(x, o, |v| v * v);
        } else if e == 1.0 {
            o.copy_from_slice(x);
        } else if e == 0.5 {
            map_into(x, o, |v| v.sqrt());
        } else if e == 3.0 {
            map_into(x, o, |v| v * v * v);
        } else {
            map_into(x, o, |v| v.powf(e));
        }
    } else {
        plan.binary(x, y, o, |a, b| a.powf(*b));
    }
}

/// `Where(cond, X, Y)`: picks X where cond is true, else Y, with 3-way broadcasting.
#[derive(Debug, Clone)]
pub struct Where;

impl Op for Where {
    fn op_type(&self) -> &str {
        "Where"
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        let dt = inputs.get(1).copied().flatten().and_then(|f| f.dtype);
        infer_broadcast("Where", &inputs[..inputs.len().min(3)], dt)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let c = input_tensor(inputs, 0, "Where")?;
        let x = input_tensor(inputs, 1, "Where")?;
        let y = input_tensor(inputs, 2, "Where")?;
        one(where_eval(c, x, y)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The kernel of [`Where`].
pub fn where_eval(c: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if c.dtype() != DType::Bool {
        return Err(KilnError::kernel(
            "Where",
            format!("condition must be bool, found {}", c.dtype()),
        ));
    }
    let dt = x.dtype();
    if dt != y.dtype() {
        return Err(KilnError::kernel(
            "Where",
            format!("X and Y dtypes differ: {dt} and {}", y.dtype()),
        ));
    }
    let plan = Plan::new("Where", &[c.shape(), x.shape(), y.shape()])?;
    let cv = c.as_raw::<u8>()?;
    if dt == DType::String {
        let (xs, ys) = (x.as_strings()?, y.as_strings()?);
        let out = plan
            .indices()
            .iter()
            .map(|ix| {
                if cv[ix[0]] != 0 {
                    xs[ix[1]].clone()
                } else {
                    ys[ix[2]].clone()
                }
            })
            .collect();
        return Tensor::from_strings(&plan.out_shape, out);
    }
    crate::dispatch_pod!(dt, T => {
        let (xv, yv) = (x.as_raw::<T>()?, y.as_raw::<T>()?);
        new_tensor::<T>(dt, &plan.out_shape, |o| {
            plan.ternary(cv, xv, yv, o, |c, x, y| if *c != 0 { *x } else { *y });
            Ok(())
        })
    }, _ => Err(bad_dtype("Where", dt)))
}

fn build_binary(ctx: &BuildCtx, name: &'static str, kind: BinKind) -> Result<Box<dyn Op>> {
    let mut op = Binary::new(name, kind);
    let a = ctx.attrs();
    if ctx.opset() < 7 && a.int("broadcast", 0)? != 0 {
        op.legacy_axis = a.opt_int("axis")?;
    }
    Ok(Box::new(op))
}

/// Registers the binary ops and `Where`.
pub fn register(reg: &mut OpRegistry) {
    macro_rules! simple {
        ($($name:ident),*) => {$(
            reg.register(stringify!($name), |ctx: &BuildCtx| build_binary(ctx, stringify!($name), BinKind::$name));
        )*};
    }
    simple!(
        Add,
        Sub,
        Mul,
        Div,
        Pow,
        BitwiseAnd,
        BitwiseOr,
        BitwiseXor,
        And,
        Or,
        Xor,
        Equal,
        Less,
        LessOrEqual,
        Greater,
        GreaterOrEqual,
        PRelu
    );
    reg.register("Mod", |ctx: &BuildCtx| {
        let fmod = ctx.attrs().int("fmod", 0)? != 0;
        build_binary(ctx, "Mod", BinKind::Mod { fmod })
    });
    reg.register("BitShift", |ctx: &BuildCtx| {
        let dir = ctx.attrs().string("direction", "")?;
        let left = match dir.as_str() {
            "LEFT" => true,
            "RIGHT" => false,
            other => {
                return Err(ctx
                    .attrs()
                    .invalid(format!("direction must be LEFT or RIGHT, found {other:?}")))
            }
        };
        build_binary(ctx, "BitShift", BinKind::BitShift { left })
    });
    reg.register("Where", |_ctx: &BuildCtx| Ok(Box::new(Where)));
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use kiln_core::{Attr, DType, Dim, Fact, Tensor};

    fn naive_bcast(
        a: &[f32],
        sa: &[usize],
        b: &[f32],
        sb: &[usize],
        f: fn(f32, f32) -> f32,
    ) -> (Vec<f32>, Vec<usize>) {
        let out = super::super::broadcast_shape("T", &[sa, sb]).unwrap();
        let n: usize = out.iter().product();
        let os = kiln_core::strides(&out);
        let idx = |s: &[usize], i: usize| {
            let st = kiln_core::strides(s);
            let mut k = 0;
            for (j, &d) in s.iter().enumerate() {
                let od = j + out.len() - s.len();
                if d != 1 {
                    k += ((i / os[od]) % out[od]) * st[j];
                }
            }
            k
        };
        (
            (0..n).map(|i| f(a[idx(sa, i)], b[idx(sb, i)])).collect(),
            out.to_vec(),
        )
    }

    #[test]
    fn arithmetic_broadcast_f32() {
        let shapes: Vec<(Vec<usize>, Vec<usize>)> = vec![
            (vec![2, 3, 5], vec![5]),
            (vec![2, 1, 5], vec![3, 1]),
            (vec![], vec![4, 3]),
            (vec![7, 300], vec![7, 300]),
            (vec![300, 1, 301], vec![1, 3, 301]),
        ];
        #[allow(clippy::type_complexity)]
        let ops: Vec<(&str, fn(f32, f32) -> f32)> = vec![
            ("Add", |a, b| a + b),
            ("Sub", |a, b| a - b),
            ("Mul", |a, b| a * b),
            ("Div", |a, b| a / b),
        ];
        for (sa, sb) in &shapes {
            let a = rand(sa.iter().product(), 3);
            let b = rand(sb.iter().product(), 4);
            for (op, f) in &ops {
                let y = run1(
                    op,
                    14,
                    vec![],
                    &[Some(f32t(sa, a.clone())), Some(f32t(sb, b.clone()))],
                )
                .unwrap();
                let (want, shape) = naive_bcast(&a, sa, &b, sb, *f);
                assert_eq!(y.shape(), &shape[..]);
                close(y.as_slice::<f32>().unwrap(), &want, 1e-6);
            }
        }
    }

    #[test]
    fn integer_div_mod() {
        let a = Tensor::from_vec(&[4], vec![7i32, -7, 7, -7]).unwrap();
        let b = Tensor::from_vec(&[4], vec![2i32, 2, -2, -2]).unwrap();
        let y = run1("Div", 14, vec![], &[Some(a.clone()), Some(b.clone())]).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[3, -3, -3, 3]);
        let y = run1("Mod", 13, vec![], &[Some(a.clone()), Some(b.clone())]).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[1, 1, -1, -1]);
        let y = run1("Mod", 13, vec![("fmod", Attr::Int(1))], &[Some(a), Some(b)]).unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[1, -1, 1, -1]);
        let z = Tensor::from_vec(&[1], vec![0i32]).unwrap();
        let y = run1(
            "Div",
            14,
            vec![],
            &[Some(Tensor::from_vec(&[1], vec![5i32]).unwrap()), Some(z)],
        )
        .unwrap();
        assert_eq!(y.as_slice::<i32>().unwrap(), &[0]);
    }

    #[test]
    fn pow_mixed() {
        let a = f32t(&[3], vec![2.0, 3.0, 4.0]);
        let y = run1(
            "Pow",
            15,
            vec![],
            &[
                Some(a.clone()),
                Some(Tensor::from_vec(&[1], vec![2i64]).unwrap()),
            ],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[4.0, 9.0, 16.0]);
        let y = run1(
            "Pow",
            15,
            vec![],
            &[Some(a.clone()), Some(f32t(&[], vec![0.5]))],
        )
        .unwrap();
        close(
            y.as_slice::<f32>().unwrap(),
            &[2f32.sqrt(), 3f32.sqrt(), 2.0],
            1e-6,
        );
        let i = Tensor::from_vec(&[3], vec![2i64, 3, 4]).unwrap();
        let y = run1("Pow", 15, vec![], &[Some(i.clone()), Some(i)]).unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[4, 27, 256]);
    }

    #[test]
    fn compare_logic_where() {
        let a = f32t(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let b = f32t(&[2], vec![2.0, 2.0]);
        let y = run1("Less", 13, vec![], &[Some(a.clone()), Some(b.clone())]).unwrap();
        assert_eq!(y.as_bools().unwrap(), &[true, false, false, false]);
        let y = run1(
            "GreaterOrEqual",
            16,
            vec![],
            &[Some(a.clone()), Some(b.clone())],
        )
        .unwrap();
        assert_eq!(y.as_bools().unwrap(), &[false, true, true, true]);
        let s1 = Tensor::from_strings(&[2], vec!["a".into(), "b".into()]).unwrap();
        let s2 = Tensor::from_strings(&[1], vec!["b".into()]).unwrap();
        let y = run1("Equal", 19, vec![], &[Some(s1.clone()), Some(s2)]).unwrap();
        assert_eq!(y.as_bools().unwrap(), &[false, true]);
        let c = Tensor::from_bools(&[2, 1], &[true, false]).unwrap();
        let y = run1("Where", 16, vec![], &[Some(c.clone()), Some(a), Some(b)]).unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[1.0, 2.0, 2.0, 2.0]);
        let y = run1(
            "Where",
            16,
            vec![],
            &[Some(c.clone()), Some(s1.clone()), Some(s1)],
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 2]);
        let t = Tensor::from_bools(&[2], &[true, false]).unwrap();
        let y = run1("Xor", 7, vec![], &[Some(c), Some(t)]).unwrap();
        assert_eq!(y.as_bools().unwrap(), &[false, true, true, false]);
    }

    #[test]
    fn bitshift_prelu_legacy() {
        let a = Tensor::from_vec(&[3], vec![16u8, 4, 1]).unwrap();
        let b = Tensor::from_vec(&[3], vec![1u8, 2, 9]).unwrap();
        let y = run1(
            "BitShift",
            11,
            vec![("direction", Attr::String("RIGHT".into()))],
            &[Some(a.clone()), Some(b.clone())],
        )
        .unwrap();
        assert_eq!(y.as_slice::<u8>().unwrap(), &[8, 1, 0]);
        let y = run1(
            "BitShift",
            11,
            vec![("direction", Attr::String("LEFT".into()))],
            &[Some(a), Some(b)],
        )
        .unwrap();
        assert_eq!(y.as_slice::<u8>().unwrap(), &[32, 16, 0]);
        let x = f32t(&[2, 2], vec![-1.0, 2.0, -3.0, 4.0]);
        let y = run1(
            "PRelu",
            16,
            vec![],
            &[Some(x.clone()), Some(f32t(&[2], vec![0.5, 0.1]))],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[-0.5, 2.0, -1.5, 4.0]);
        let y = run1(
            "Add",
            6,
            vec![("broadcast", Attr::Int(1)), ("axis", Attr::Int(0))],
            &[Some(x), Some(f32t(&[2], vec![10.0, 20.0]))],
        )
        .unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[9.0, 12.0, 17.0, 24.0]);
    }

    #[test]
    fn errors_and_infer() {
        let a = f32t(&[2, 3], vec![1.0; 6]);
        assert!(run1(
            "Add",
            14,
            vec![],
            &[Some(a.clone()), Some(f32t(&[2], vec![1.0; 2]))]
        )
        .is_err());
        let i = Tensor::from_vec(&[1], vec![1i32]).unwrap();
        assert!(run1("Add", 14, vec![], &[Some(a), Some(i)]).is_err());
        let op = build("Less", 13, vec![], 2, 1).unwrap();
        let fa = Fact::tensor(DType::F32, vec![Dim::Sym("n".into()), Dim::Known(1)]);
        let fb = Fact::tensor(DType::F32, vec![Dim::Known(4)]);
        let f = op.infer(&[Some(&fa), Some(&fb)], 1).unwrap();
        assert_eq!(f[0].dtype, Some(DType::Bool));
        assert_eq!(f[0].shape, Some(vec![Dim::Sym("n".into()), Dim::Known(4)]));
    }
}
