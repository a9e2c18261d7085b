//! Variadic broadcasting ops: Max, Min, Sum, Mean.

use std::any::Any;

use kiln_core::{BuildCtx, Fact, KilnError, Op, OpRegistry, Result, Tensor, Value};

use super::num::Num;
use super::{bad_dtype, infer_broadcast, map_into, new_tensor, one, Plan};

/// Which reduction across inputs a variadic op computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VarKind {
    /// Elementwise maximum (NaN-propagating).
    Max,
    /// Elementwise minimum (NaN-propagating).
    Min,
    /// Elementwise sum.
    Sum,
    /// Elementwise mean.
    Mean,
}

/// A variadic elementwise op with numpy broadcasting across all inputs.
#[derive(Debug, Clone)]
pub struct Variadic {
    name: &'static str,
    kind: VarKind,
}

impl Op for Variadic {
    fn op_type(&self) -> &str {
        self.name
    }

    fn infer(&self, inputs: &[Option<&Fact>], _n: usize) -> Result<Vec<Fact>> {
        infer_broadcast(self.name, inputs, None)
    }

    fn eval(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>> {
        let ts: Vec<&Tensor> = inputs
            .iter()
            .flatten()
            .map(|v| {
                v.as_tensor()
                    .map_err(|e| KilnError::kernel(self.name, e.to_string()))
            })
            .collect::<Result<_>>()?;
        let Some(first) = ts.first() else {
            return Err(KilnError::kernel(self.name, "needs at least one input"));
        };
        let dt = first.dtype();
        if let Some(t) = ts.iter().find(|t| t.dtype() != dt) {
            return Err(KilnError::kernel(
                self.name,
                format!("input dtypes differ: {dt} and {}", t.dtype()),
            ));
        }
        let out = crate::dispatch_numeric!(dt, T => variadic::<T>(self.name, self.kind, &ts), _ => Err(bad_dtype(self.name, dt)))?;
        one(out)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn variadic<T: Num>(op: &str, kind: VarKind, ts: &[&Tensor]) -> Result<Tensor> {
    let mut acc = ts[0].clone();
    for t in &ts[1..] {
        let plan = Plan::new(op, &[acc.shape(), t.shape()])?;
        let (x, y) = (acc.as_slice::<T>()?, t.as_slice::<T>()?);
        let next = new_tensor::<T>(T::DTYPE, &plan.out_shape, |o| {
            match kind {
                VarKind::Max => plan.binary(x, y, o, |a, b| a.maxv(*b)),
                VarKind::Min => plan.binary(x, y, o, |a, b| a.minv(*b)),
                _ => plan.binary(x, y, o, |a, b| a.addv(*b)),
            }
            Ok(())
        })?;
        acc = next;
    }
    if kind == VarKind::Mean && ts.len() > 1 {
        let n = T::of_f64(ts.len() as f64);
        let x = acc.as_slice::<T>()?;
        return new_tensor::<T>(T::DTYPE, acc.shape(), |o| {
            map_into(x, o, |a| a.divv(n));
            Ok(())
        });
    }
    Ok(acc)
}

/// Registers Max, Min, Sum, Mean.
pub fn register(reg: &mut OpRegistry) {
    macro_rules! v {
        ($($name:ident),*) => {$(
            reg.register(stringify!($name), |_ctx: &BuildCtx| Ok(Box::new(Variadic { name: stringify!($name), kind: VarKind::$name })));
        )*};
    }
    v!(Max, Min, Sum, Mean);
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use kiln_core::Tensor;

    #[test]
    fn variadic_ops() {
        let a = f32t(&[3], vec![1.0, 5.0, 3.0]);
        let b = f32t(&[2, 1], vec![2.0, 4.0]);
        let c = f32t(&[], vec![0.0]);
        let y = run1(
            "Max",
            13,
            vec![],
            &[Some(a.clone()), Some(b.clone()), Some(c.clone())],
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(
            y.as_slice::<f32>().unwrap(),
            &[2.0, 5.0, 3.0, 4.0, 5.0, 4.0]
        );
        let y = run1("Mean", 13, vec![], &[Some(a.clone()), Some(b.clone())]).unwrap();
        assert_eq!(
            y.as_slice::<f32>().unwrap(),
            &[1.5, 3.5, 2.5, 2.5, 4.5, 3.5]
        );
        let y = run1("Sum", 13, vec![], &[Some(a.clone())]).unwrap();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[1.0, 5.0, 3.0]);
        let i = Tensor::from_vec(&[2], vec![3u8, 9]).unwrap();
        let j = Tensor::from_vec(&[2], vec![4u8, 1]).unwrap();
        let y = run1("Min", 13, vec![], &[Some(i), Some(j)]).unwrap();
        assert_eq!(y.as_slice::<u8>().unwrap(), &[3, 1]);
        let y = run1(
            "Max",
            13,
            vec![],
            &[Some(a), Some(f32t(&[1], vec![f32::NAN]))],
        )
        .unwrap();
        assert!(y.as_slice::<f32>().unwrap()[0].is_nan());
        assert!(run1("Max", 13, vec![], &[]).is_err());
    }
}
